"""A Google Cloud Storage server on 127.0.0.1 for tests: ``python tests/fake_gcs.py PORT BUCKET``.

It is gcp-storage-emulator (JSON API, in memory) with one addition: a download answers with
the object's ``x-goog-generation`` / ``x-goog-metageneration`` headers, as GCS does, which
TensorStore's GCS driver (orbax) reads. gcsfs reaches it through ``STORAGE_EMULATOR_HOST``,
TensorStore through ``TENSORSTORE_GCS_HTTP_URL``. Not modelled: conditional writes
(``ifGenerationMatch``), which only matter with several writers of one object.
"""

import sys

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = download  # before the server module builds its routes from it

if __name__ == "__main__":
    from gcp_storage_emulator.server import create_server

    create_server("127.0.0.1", int(sys.argv[1]), True, sys.argv[2]).start()
