"""The docs: generated pages are fresh, everything is documented, links resolve."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest

from fed_unlearn.config import METHOD_OPTIONS_KEY, RunConfig
from fed_unlearn.losses import LOSSES
from fed_unlearn.methods import METHOD_REGISTRY
from simulations import docs as gen

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: The README's first commands (CI and users depend on them).
INSTALL = (
    "    python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip "
    'install -c requirements.lock -e ".[dev]" && .venv/bin/fed-unlearn run --out '
    "runs/quickstart"
)
TESTS = "    .venv/bin/python -m pytest -q"

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _pages() -> list[pathlib.Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def test_generated_docs_are_fresh():
    stale = [str(p.relative_to(ROOT)) for p in gen.stale(ROOT)]
    assert stale == [], f"stale docs {stale}: run `python -m simulations.docs`"


def test_every_config_key_is_documented():
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    keys = [
        f.name.replace("_", "-")
        for f in dataclasses.fields(RunConfig)
        if f.name not in ("extra", "method_options")
    ]
    keys += [METHOD_OPTIONS_KEY, *gen.flwr_app_config(ROOT)]
    missing = sorted({k for k in keys if f"| `{k}" not in text})
    assert missing == []
    assert "(undocumented)" not in text


def test_every_method_has_a_page_with_every_option():
    for name, entry in sorted(METHOD_REGISTRY.items()):
        page = DOCS / "methods" / f"{name}.md"
        assert page.exists(), f"{name}: no docs/methods/{name}.md"
        text = page.read_text(encoding="utf-8")
        for section in ("## Paper", "## What crosses the wire", "## Provenance"):
            assert section in text, f"{page.name}: no {section!r} section"
        for f in dataclasses.fields(entry.config_cls):
            assert f"| `{f.name}` |" in text, f"{page.name}: option {f.name}"
        assert "(undocumented)" not in text, f"{page.name}: an option lacks a docstring"


def test_readme_methods_table_links_every_method():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in METHOD_REGISTRY:
        assert f"[`{name}`](docs/methods/{name}.md)" in text, name


def test_every_inner_loss_is_documented():
    text = (DOCS / "losses.md").read_text(encoding="utf-8")
    for name in LOSSES:
        assert f"### `{name}`" in text, name
    assert "(undocumented)" not in text
    assert set(gen.loss_definitions()) == set(LOSSES)


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:12]
    assert INSTALL in head
    assert TESTS in head
    assert head.index(INSTALL) < head.index(TESTS)


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in _LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # external or in-page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert broken == []


def test_parse_parameters_reads_grouped_and_continued_entries():
    doc = """Summary.

    Parameters
    ----------
    a, b : int
        First line
        second line with ``code``.
    c
        See :class:`~x.y.Z`.

    Returns
    -------
    int
        Not a parameter.
    """
    got = gen.parse_parameters(doc)
    assert got == {
        "a": ("int", "First line second line with `code`."),
        "b": ("int", "First line second line with `code`."),
        "c": ("", "See `Z`."),
    }


def test_replace_block_keeps_the_prose(tmp_path):
    text = f"# t\n\nprose\n\n{gen.BEGIN}\nold\n{gen.END}\n\nmore\n"
    out = gen.replace_block(text, "new", tmp_path / "p.md")
    assert out == f"# t\n\nprose\n\n{gen.BEGIN}\nnew\n{gen.END}\n\nmore\n"
    with pytest.raises(ValueError, match="needs exactly one"):
        gen.replace_block("no markers", "new", tmp_path / "p.md")
