"""The documentation a new user reads: every relative link resolves, the README stays short, its commands exist."""

from __future__ import annotations

import re

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", REPO / "benchmarks" / "README.md", REPO / "experiments" / "README.md",
         *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.unit
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_resolve(page):
    text = page.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        if path and not (page.parent / path).exists():
            broken.append(target)
        if anchor and not path:  # an anchor in the same page: a heading with that slug
            slugs = {re.sub(r"[^\w\- ]", "", h.strip("# ").lower()).replace(" ", "-")
                     for h in text.splitlines() if h.startswith("#")}
            if anchor not in slugs:
                broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: broken links {broken}"


@pytest.mark.unit
def test_readme_is_for_a_newcomer():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    first = text.split("```")[1]  # the two commands open it, the fast tier beside them
    assert "bash scripts/demo.sh" in first and "bash scripts/test.sh" in first
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()
    from nemo_layerfx_cli import build_parser
    import argparse

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    used = set(re.findall(r"^layerfx ([a-z-]+)", text, flags=re.M))
    assert used and used <= set(action.choices), used - set(action.choices)
