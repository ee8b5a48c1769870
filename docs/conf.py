"""Sphinx configuration of xent's documentation site: ``sphinx-build -W -n docs docs/_build/html``.

The guides are Markdown (MyST), the API reference is generated from the docstrings (Google style, with
reStructuredText math and cross-references), the command pages from the CLI's own argparse parsers, and MathJax is
served from the site itself, so the pages render without a network.
"""

import xent

project = "xent"
author = "the xent developers"
copyright = "2026, the xent developers"
release = version = xent.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinxarg.ext",
    "sphinx-mathjax-offline",  # MathJax 3 copied into _static: math renders offline
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "figures/*.py"]

# Strict: `-W -n` turns every warning, and every reference that does not resolve, into an error. Only names of other
# projects are exempt (the build is offline, so there is no intersphinx inventory to resolve them against).
nitpicky = True
OTHER_PROJECTS = "torch|numpy|np|transformers|rich|matplotlib|collections|typing|argparse|pathlib|contextlib|enum"
nitpick_ignore_regex = [
    (r"py:.*", rf"({OTHER_PROJECTS})(\..*)?"),
    (r"py:.*", r"(Tensor|Size|dtype|device|Module|Optional|Any|Callable|Sequence|Mapping|Iterator|Path|Console)"),
    (r"py:class", r"(T|optional|callable|int|float|str|bool|dict|list|tuple)"),
    # the protocol of what xent.hf reads of a head (nn.Linear or a widened LoRA head): internal, not documented
    (r"py:class", r"xent\.integrations\.heads\.LinearHead"),
]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# a signature longer than this is shown one parameter per line, as PyTorch's pages do
maximum_signature_line_length = 88
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = f"xent {release}"
html_static_path = ["_static"]
html_css_files = ["xent.css"]
html_theme_options = {"source_repository": "", "navigation_with_keys": True}
