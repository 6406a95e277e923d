"""A Google Cloud Storage server on 127.0.0.1 for tests:
``python tests/fake_gcs.py PORT BUCKET [READ_ONLY_BUCKET]``.

It is gcp-storage-emulator (JSON API, in memory) with one addition: a download answers with
the object's ``x-goog-generation`` / ``x-goog-metageneration`` headers, as GCS does, which
TensorStore's GCS driver (orbax) reads; and READ_ONLY_BUCKET can be read but every write or
delete in it is refused with 403, as GCS answers an account without ``storage.objects.create``
/ ``delete`` permission. gcsfs reaches it through ``STORAGE_EMULATOR_HOST``,
TensorStore through ``TENSORSTORE_GCS_HTTP_URL``. Not modelled: conditional writes
(``ifGenerationMatch``), which only matter with several writers of one object.
"""

import sys
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import buckets, objects

_download = objects.download
READ_ONLY = sys.argv[3] if len(sys.argv) > 3 else None


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


def refused_in_read_only(handler, permission):
    """``handler``, except in READ_ONLY: 403 with GCS's JSON error body."""

    def guarded(request, response, storage, *args, **kwargs):
        if request.params.get("bucket_name") != READ_ONLY:
            return handler(request, response, storage, *args, **kwargs)
        message = (f"test@example.iam.gserviceaccount.com does not have {permission} access to "
                   f"the Google Cloud Storage bucket {READ_ONLY}.")
        response.status = HTTPStatus.FORBIDDEN
        response.json({"error": {"code": 403, "message": message,
                                 "errors": [{"message": message, "reason": "forbidden"}]}})

    return guarded


# Before the server module builds its routes from them:
objects.download = download
for name, permission in (("insert", "storage.objects.create"),
                         ("xml_upload", "storage.objects.create"),
                         ("upload_partial", "storage.objects.create"),
                         ("delete", "storage.objects.delete")):
    setattr(objects, name, refused_in_read_only(getattr(objects, name), permission))

if __name__ == "__main__":
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", int(sys.argv[1]), True, sys.argv[2])
    if READ_ONLY:
        buckets.create_bucket(READ_ONLY, server._storage)
    server.start()
