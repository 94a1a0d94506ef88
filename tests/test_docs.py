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


@pytest.mark.unit
def test_quoted_results_are_the_reports_json():
    """README.md and experiments/README.md quote the reproductions through blocks that experiments/render.py writes
    from each REPORT.json; a block that disagrees with the JSON fails here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("render", REPO / "experiments" / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    for doc in render.DOCS:
        assert "<!-- render:" in doc.read_text(), doc
        assert render.render(doc) == doc.read_text(), f"{doc.name} is out of date: run python experiments/render.py"


@pytest.mark.unit
def test_experiments_readme_copies_no_figure_by_hand():
    """Outside the rendered blocks the page says how to run and what it costs: no measured spread (±) and no
    three-decimal figure (a WER, a ratio) that could drift from the reports."""
    text = re.sub(r"<!-- render:([\w-]+) -->.*?<!-- /render:\1 -->", "", (REPO / "experiments" / "README.md").read_text(),
                  flags=re.S)
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # commands
    copied = re.findall(r"[^\n]*(?:±|\b\d+\.\d{3,})[^\n]*", text)
    assert not copied, copied
