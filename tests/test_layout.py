"""The house rules of the package layout, read from the source: the core imports no capability (the entry points
that dispatch to every capability excepted), and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nemo_layerfx"
CAPABILITIES = ("importance", "fd", "fl", "depth", "pruning", "lowrank")
# the edges of the core: the public API, the `layerfx` commands and the config-target path of a capability's callback
EDGES = ("nemo_layerfx", "nemo_layerfx.cli", "nemo_layerfx.callbacks")


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports (at module level or inside functions, or lazily through ``attach`` /
    ``declare_encoder_option``), resolved to known modules."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("attach", "declare_encoder_option"):
            # what a lazy package exports, or where a declared encoder option lives: imported on first use
            names = [c.value.partition(":")[0] for c in ast.walk(node)
                     if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value.startswith("nemo_layerfx")]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("nemo_layerfx"):
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def capability(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in CAPABILITIES else None


@pytest.mark.unit
def test_the_core_imports_no_capability():
    bad = {m: sorted(d for d in deps if capability(d)) for m, deps in graph().items()
           if capability(m) is None and m not in EDGES}
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"core modules importing a capability: {bad}"


def find_cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle of ``g`` once, starting from its smallest module."""
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str], seen: set[str]) -> None:
        for nxt in sorted(g.get(node, ())):
            if nxt == path[0]:
                cycles.append(path + [nxt])
            elif nxt not in seen and nxt > path[0]:
                seen.add(nxt)
                visit(nxt, path + [nxt], seen)

    for start in sorted(g):
        visit(start, [start], {start})
    return cycles


@pytest.mark.unit
def test_no_import_circles():
    # `import nemo_layerfx` (the plugin registration every module may ask for) is the one edge left out
    g = {m: deps - {"nemo_layerfx"} for m, deps in graph().items() if m != "nemo_layerfx"}
    cycles = find_cycles(g)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


@pytest.mark.unit
def test_the_rules_can_fail(tmp_path):
    """The scanner sees an import inside a function (how the old cli -> fl -> client_app -> cli circle hid), and
    that circle is found."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from nemo_layerfx.cli import run\n")
    assert imports(source, {"nemo_layerfx.cli"}) == {"nemo_layerfx.cli"}
    old = {"nemo_layerfx.cli": {"nemo_layerfx.fl"}, "nemo_layerfx.fl": {"nemo_layerfx.fl.task"},
           "nemo_layerfx.fl.client_app": {"nemo_layerfx.cli", "nemo_layerfx.fl.task"}, "nemo_layerfx.fl.task": set()}
    old["nemo_layerfx.fl"].add("nemo_layerfx.fl.client_app")
    assert find_cycles(old) == [["nemo_layerfx.cli", "nemo_layerfx.fl", "nemo_layerfx.fl.client_app",
                                 "nemo_layerfx.cli"]]


@pytest.mark.slow  # a fresh interpreter
def test_config_modules_and_the_parser_import_without_nemo():
    """``layerfx``'s flag checks call the config classes' own validation, so those modules must load without NeMo
    (the lazy package imports); ``import nemo_layerfx`` itself loads none of the capabilities."""
    from conftest import fresh_python

    code = ("import sys\n"
            "import nemo_layerfx, nemo_layerfx_cli\n"
            "from nemo_layerfx.importance.config import ProbeConfig\n"
            "from nemo_layerfx.pruning.config import AdaptiveDropoutConfig\n"
            "from nemo_layerfx.lowrank.config import LowRankConfig\n"
            "LowRankConfig(att=[0.1, 0.2]); ProbeConfig(draws=2); AdaptiveDropoutConfig()\n"
            "print(sorted(m for m in sys.modules if m == 'nemo' or m.startswith(('nemo.', 'lightning'))),"
            " sorted(m for m in sys.modules if m.startswith('nemo_layerfx.') and m.count('.') == 1))\n")
    line = fresh_python(code, timeout=120)
    nemo, ours = line.split("] [")
    assert nemo == "[" and "encoder" not in ours, line


@pytest.mark.unit
def test_a_lazy_export_is_seen_as_an_import(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('__getattr__, __dir__, __all__ = attach(__name__, {"f": "nemo_layerfx.fd.plan"})\n')
    assert imports(source, {"nemo_layerfx.fd.plan"}) == {"nemo_layerfx.fd.plan"}


@pytest.mark.slow  # imports every module the scripts name
def test_every_import_of_the_package_resolves():
    """Benchmarks, experiments, notebooks, examples and tests import names from the package; a name that moved (a
    dropped alias) must fail here, not on the GPU machine that finally runs a benchmark."""
    import importlib
    import importlib.util
    import json
    import sys

    sys.path[:0] = [str(PACKAGE.parent / d) for d in ("experiments", "benchmarks", "tests")]
    sources = [(p, p.read_text()) for d in ("benchmarks", "experiments", "examples", "scripts", "tests", "nemo_layerfx")
               for p in (PACKAGE.parent / d).rglob("*.py")]
    for nb in (PACKAGE.parent / "notebooks").glob("*.ipynb"):
        cells = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
        sources.append((nb, "\n".join("".join(c["source"]) for c in cells
                                      if not "".join(c["source"]).lstrip().startswith(("!", "%")))))
    missing = []
    for path, text in sources:
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("nemo_layerfx"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name) and importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                        missing.append(f"{path.relative_to(PACKAGE.parent)}: {node.module}.{alias.name}")
    assert not missing, missing
