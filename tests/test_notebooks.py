"""The tutorials in notebooks/ execute top to bottom (with a small budget)."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

pytestmark = pytest.mark.slow  # end-to-end: left out of `scripts/test.sh --fast`

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.integration
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERFX_NB_BUDGET", "small")
    nb = nbformat.read(str(path), as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Traceback" not in outputs
    # as quiet as the layerfx commands: no NeMo info lines, no Lightning banners
    assert "[NeMo I" not in outputs and "GPU available" not in outputs and "`Trainer.fit` stopped" not in outputs
