"""Sphinx configuration of the jaxce documentation (``make docs``).

The build is offline: no intersphinx inventories are fetched, and the notebooks are rendered
from the outputs committed with them (``nb_execution_mode = "off"``), never re-executed.
"""

import importlib.metadata

project = "jaxce"
author = "jaxce contributors"
copyright = "jaxce contributors, Apache-2.0"
release = importlib.metadata.version("jaxce")
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",
]

# `notebooks` is a link to the repository's notebooks/; only the .ipynb files are pages.
exclude_patterns = ["_build", "jupyter_execute", "notebooks/README.md"]
# A class page: its docstring (fields under Attributes), without a bare list of the fields.
templates_path = ["_templates"]

# API pages: one per public name, generated from the docstrings at build time.
autosummary_generate = True
autosummary_ignore_module_all = False
autodoc_default_options = {"members": True, "undoc-members": True, "member-order": "bysource"}
# Signatures show names and defaults; the Args sections give types and shapes (autodoc would
# expand `jax.typing.ArrayLike` into a union of a dozen types).
autodoc_typehints = "none"
autodoc_preserve_defaults = True
add_module_names = False

# The docstrings are Google style (Args, Returns, Example, References) with reST math.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True

# Notebooks: rendered as committed.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"jaxce {release}"
html_static_path: list[str] = []
