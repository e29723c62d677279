"""Every object the API pages list exists and has a docstring (``make docs`` checks the
rendered pages too, with ``docs/check_api.py``)."""

import importlib
import inspect
import os
import sys

import pytest

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
sys.path.insert(0, DOCS)
from check_api import MODEL_METHODS, listed_objects  # noqa: E402

sys.path.remove(DOCS)


def resolve(name: str):
    module_name, _, attribute = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except ModuleNotFoundError:
        parent, _, child = module_name.rpartition(".")
        return getattr(getattr(importlib.import_module(parent), child), attribute)


@pytest.mark.parametrize("name", listed_objects())
def test_api_object_has_a_docstring(name):
    doc = inspect.getdoc(resolve(name))
    assert doc and len(doc.split()) >= 5, f"{name} has no docstring"


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_model_method_has_a_docstring(method):
    import scldiff

    function = getattr(scldiff.LapDDPM, method)
    assert getattr(function, "__module__", "").startswith("scldiff"), f"{method} is scvi's"
    doc = inspect.getdoc(function)
    assert doc and len(doc.split()) >= 5
