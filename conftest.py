"""Every example is a test: Sybil collects the Python blocks of README.md and docs/ and the docstrings' examples.

A Markdown ```python block is executed; one written as a session (``>>>`` lines and what they print) must print
exactly that. The blocks of one page share a namespace, in order. Docstring examples run in their module's namespace
with ``torch`` and ``xent`` imported and the random seed set to 0.
"""

import doctest
import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter. The variable is read when a kernel is defined,
# so it is set before anything imports xent.kernels.triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser
from sybil.parsers.rest import DocTestParser

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _seeded(namespace: dict) -> None:
    import xent

    namespace.setdefault("torch", torch)
    namespace.setdefault("xent", xent)
    torch.manual_seed(0)


pages = Sybil(
    parsers=[PythonCodeBlockParser(doctest_optionflags=FLAGS), SkipParser()],
    patterns=["*.md"],
    setup=lambda namespace: torch.manual_seed(0),
    name="pages",
)
docstrings = Sybil(
    parsers=[DocTestParser(optionflags=FLAGS)],
    patterns=["*.py"],
    path="./src",
    setup=_seeded,
    name="docstrings",
)
pytest_collect_file = (pages + docstrings).pytest()
