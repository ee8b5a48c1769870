"""The documentation site leaves nothing public out: every public name has its entry in the API reference, once,
and every command its page. (The site's build itself — strict, every reference resolved — is a step of .ci/run.)"""

import re
from pathlib import Path

import pytest

import xent
import xent.bench
import xent.distributed
import xent.hf
import xent.nn
import xent.train
import xent.trl
from xent.cli import COMMANDS

DOCS = Path(__file__).resolve().parents[1] / "docs"
DIRECTIVE = re.compile(r"^\.\. (?:auto(?:function|class|exception)|py:data):: ([\w.]+)", flags=re.MULTILINE)

# Names of __all__ that are not objects to document: the version string and the nn submodule (its own page).
NOT_DOCUMENTED = {"xent.__version__", "xent.nn"}
PUBLIC_MODULES = [xent, xent.nn, xent.hf, xent.trl, xent.distributed, xent.train, xent.bench]


def _documented() -> list[str]:
    return [name for page in sorted((DOCS / "api").glob("*.md")) for name in DIRECTIVE.findall(page.read_text())]


def _public() -> set[str]:
    return {f"{module.__name__}.{name}" for module in PUBLIC_MODULES for name in module.__all__} - NOT_DOCUMENTED


def test_every_public_name_is_in_the_api_reference_exactly_once():
    documented = _documented()
    missing = sorted(_public() - set(documented))
    assert not missing, f"public but not in docs/api/: {missing}"
    repeated = sorted({name for name in documented if documented.count(name) > 1})
    assert not repeated, f"documented twice in docs/api/: {repeated}"


def test_the_api_reference_documents_only_public_names():
    assert not sorted(set(_documented()) - _public()), "docs/api/ documents names that are not in any __all__"


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda module: module.__name__)
def test_each_public_module_lists_what_it_defines(module):
    """``__all__`` is the public surface the reference is checked against: every public class and function the
    module defines, or imports from its own submodules (xent.nn's modules by family), is in it (so a new loss cannot
    be left out of both)."""
    defined = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and callable(value)
        and f"{getattr(value, '__module__', None)}.".startswith(f"{module.__name__}.")
    }
    assert defined <= set(module.__all__)


@pytest.mark.parametrize("command", [name for name, _, _ in COMMANDS])
def test_every_command_has_a_page_generated_from_its_parser(command):
    page = (DOCS / "cli" / f"{command}.md").read_text()
    assert "```{argparse}" in page and f":path: {command}" in page
    assert f"\n{command}\n" in (DOCS / "cli" / "index.md").read_text()


def test_every_guide_and_reference_page_is_linked_from_readme():
    """README is the front page: it links every guide, the API reference and the command line."""
    readme = (DOCS.parent / "README.md").read_text()
    pages = [*sorted((DOCS / "guides").glob("*.md")), DOCS / "api" / "index.md", DOCS / "cli" / "index.md"]
    missing = [
        str(page.relative_to(DOCS.parent)) for page in pages if f"]({page.relative_to(DOCS.parent)})" not in readme
    ]
    assert not missing, f"README does not link {missing}"
