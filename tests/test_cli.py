"""The `layerfx` command as a new user meets it: instant, complete help; flag errors before anything loads."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from nemo_layerfx_cli import build_parser, main


@pytest.mark.unit
def test_help_imports_neither_torch_nor_nemo():
    """Help is instant because the parser imports only the standard library (checked, not timed)."""
    code = ("import sys, contextlib, io\nfrom nemo_layerfx_cli import build_parser, main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    for argv in (['--help'], ['probe', '--help'], ['lowrank', '--help']):\n"
            "        try:\n            main(argv)\n        except SystemExit:\n            pass\n"
            "heavy = sorted(m for m in ('torch', 'nemo', 'lightning', 'nemo_layerfx') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.unit
def test_every_option_of_every_command_is_explained_with_an_example():
    parser = build_parser()
    for name, sub in _subparsers(parser).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"layerfx {name}: {action.option_strings or action.dest} has no help text"
        text = sub.format_help()
        assert f"example:\n  layerfx {name}" in text, f"layerfx {name} --help has no example on its own line"
        assert sub.description, name


@pytest.mark.unit
@pytest.mark.parametrize("argv, message", [
    (["extract", "{model}", "out.nemo", "--rate", "1.5"], "--rate is 1.5; a dropout rate is the fraction of units dropped"),
    (["extract", "{model}", "{model}"], "refusing to overwrite the input model"),
    (["extract", "missing.nemo", "out.nemo"], "model missing.nemo: no such file"),
    (["probe", "{model}", "--manifest", "nope.json"], "--manifest nope.json: no such file"),
    (["probe", "{model}", "--manifest", "{model}", "--mode", "reinit"], "--mode reinit needs --init"),
    (["probe", "{model}", "--manifest", "{model}", "--draws", "0"], "--draws 0: draws must be >= 1, got 0"),
    (["probe", "{model}", "--manifest", "{model}", "--ci-level", "1.5"], "--ci-level 1.5: ci_level must be in (0, 1)"),
    (["probe", "{model}", "--manifest", "{model}", "--rule", "ci", "--bootstrap", "0"],
     "--bootstrap 0: rule ci needs bootstrap >= 1"),
    (["probe", "{model}", "--manifest", "{model}", "--threshold", "-1"], "--threshold -1.0: ambient_rel_threshold must be"),
    (["lowrank", "{model}", "out.nemo", "--att", "0.1,x"], "--att 0.1,x: cannot read the rank spec '0.1,x'"),
    (["lowrank", "{model}", "out.nemo", "--att", "r:0"], "--att r:0: low_rank.att.ranks must be integers >= 1"),
    (["lowrank", "{model}", "out.nemo", "--ffn", "0.5", "--multiple-of", "0"], "--multiple-of 0: low_rank multiple_of"),
    (["make-corpus", "--out", "x", "--n", "0"], "--n 0: must be >= 1"),
    (["make-corpus", "--out", "x", "--dev-frac", "1.2"], "--dev-frac 1.2: a fraction of the sentences, in [0, 1)"),
    (["make-corpus", "--out", "x", "--dev-frac", "0.5", "--test-frac", "0.5"], "leave no training sentences"),
    (["make-corpus", "--out", "x", "--workers", "0"], "--workers 0: must be >= 1"),
    (["probe", "{model}", "--manifest", "{model}", "--max-utterances", "0"], "--max-utterances 0: must be >= 1"),
    (["depth-sweep", "{model}", "--manifest", "{model}", "--max-utterances", "-5"], "--max-utterances -5: must be >= 1"),
    (["eval", "{model}", "--manifest", "{model}", "--max-utterances", "0"], "--max-utterances 0: must be >= 1"),
    (["eval", "{model}", "--manifest", "{model}", "--ci-level", "1.5"], "--ci-level 1.5: must be in (0, 1)"),
    (["eval", "{model}", "--manifest", "nope.json"], "--manifest nope.json: no such file"),
    (["convert-norm", "{model}", "out.nemo", "--groups", "0"], "--groups 0: must be >= 1"),
    (["set-depth", "{model}", "out.nemo", "--depth", "-1"], "--depth -1: an inference depth is 1..n_layers"),
    (["fl", "--config-name", "fd_nope"], "--config-name fd_nope: no such federated config; shipped: fd_ambient, "
                                         "fd_critical, fd_flat"),
    (["probe", "{model}", "--manifest", "{model}", "--out", "{done}"], "already holds probe.json from an earlier run"),
    (["depth-sweep", "{model}", "--manifest", "{model}", "--out", "{done}"], "already holds depth_sweep.json"),
])
def test_bad_flags_fail_before_anything_is_loaded(tmp_path, capsys, argv, message):
    model = tmp_path / "model.nemo"
    model.write_bytes(b"not looked at: the flag check comes first")
    done = tmp_path / "done"  # the output folder of an earlier probe and sweep
    done.mkdir()
    (done / "probe.json").write_text("{}")
    (done / "depth_sweep.json").write_text("{}")
    code = main([a.replace("{model}", str(model)).replace("{done}", str(done)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err  # one line; the garbage model never read
