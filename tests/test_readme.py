"""The user documentation runs: README's API example executes as written (on the shipped toy
pipeline), and every ``python -m`` command and config field the README and docs/ name exists."""

import importlib
import re
from pathlib import Path

import jax
import pytest

from parrot_jax import config as schema

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _api_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.usefixtures("fast_compiles")
def test_readme_api_example_runs():
    scope: dict = {}
    exec(compile(_api_example(), "README.md (API)", "exec"), scope)  # noqa: S102
    metrics = scope["metrics"]
    assert abs(float(metrics["ratio"]) - 1.0) < 1e-5  # the policy that sampled: ratio 1
    assert float(metrics["clipfrac"]) == 0.0
    assert int(scope["state"].step) == 1
    assert jax.tree.leaves(scope["state"].trainable)


def test_documented_commands_and_fields_exist():
    text = "\n".join(p.read_text() for p in DOCS)
    modules = set(re.findall(r"python -m (parrot_jax[\w.]*)", text))
    assert {"parrot_jax.sample", "parrot_jax.evaluate", "parrot_jax.plan",
            "parrot_jax.analysis.transfer"} <= modules
    for name in sorted(modules):
        module = importlib.import_module(name)
        assert callable(getattr(module, "main", None)), name
    fields = set(re.findall(r"--config\.([\w.]+)=", text)) - {"a.b"}  # the syntax itself
    unknown = sorted(f for f in fields if schema.field_of(f) is None)
    assert fields and not unknown, unknown
    for doc in DOCS:  # the documentation stands on its own
        assert "shared folder" not in doc.read_text() and "METHOD.md" not in doc.read_text()


def test_method_doc_carries_the_config_schema():
    """docs/method.md ends with ``python -m parrot_jax.config --markdown``: every field, its
    default and meaning, as the schema defines them."""
    text = (ROOT / "docs" / "method.md").read_text()
    assert text.endswith(schema.markdown()), "regenerate: python -m parrot_jax.config --markdown"
