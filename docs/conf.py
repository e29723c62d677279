"""Sphinx configuration for scldiff (myst-nb renders the markdown pages and notebooks;
autosummary writes the API pages as reStructuredText)."""

import socket
import sys
import urllib.parse
from importlib.metadata import version as _version

project = "scldiff"
author = "scldiff developers"
copyright = "2026, scldiff developers"
try:
    release = _version("scldiff")
except Exception:  # docs built from a source tree without installation
    release = "0.0.0"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
]
autosummary_generate = True
templates_path = ["_templates"]
autodoc_member_order = "bysource"
napoleon_numpy_docstring = True
myst_enable_extensions = ["dollarmath", "colon_fence"]
nb_execution_mode = "off"  # notebooks are committed with their outputs; docs never train
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
html_theme = "sphinx_book_theme"
_INTERSPHINX = {
    "python": ("https://docs.python.org/3", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
    "torch": ("https://pytorch.org/docs/stable/", None),
    "torch_geometric": ("https://pytorch-geometric.readthedocs.io/en/latest/", None),
}


def _reachable(url: str) -> bool:
    try:
        socket.getaddrinfo(urllib.parse.urlparse(url).hostname, 443)
        return True
    except OSError:
        return False


# Offline (no DNS), the inventories cannot be fetched: their links are left out, said here,
# so that `make docs` can fail on every other warning (-W).
intersphinx_mapping = {name: entry for name, entry in _INTERSPHINX.items()
                       if _reachable(entry[0])}
if len(intersphinx_mapping) < len(_INTERSPHINX):
    print("intersphinx: offline; no links to "
          + ", ".join(sorted(set(_INTERSPHINX) - set(intersphinx_mapping))), file=sys.stderr)
