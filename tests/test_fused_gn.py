"""The fused (Triton) valid-frame GroupNorm: exact against the reference, chosen only where it should be."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_layerfx.encoder import fused_gn
from nemo_layerfx.encoder.conv import MaskedGroupNorm

CASES = Path(__file__).parent / "kernels" / "fused_gn_cases.py"
needs_triton = pytest.mark.skipif(fused_gn.triton is None, reason="Triton is not installed (pip install triton)")


def run_cases(interpret: bool) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]


@pytest.mark.slow  # the kernels run in numpy through Triton's interpreter (~20 s)
@pytest.mark.unit
@needs_triton
def test_kernels_match_the_reference_in_tritons_interpreter():
    """The kernels' own code, run on the CPU by Triton's interpreter: float32 to 1e-5, fp16/bf16 inputs, a whole
    encoder with per-layer widths, padding exactness (tests/kernels/fused_gn_cases.py)."""
    run_cases(interpret=True)


@pytest.mark.unit
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the compiled kernels need one")
def test_compiled_kernels_match_the_reference_on_cuda():
    run_cases(interpret=False)


@pytest.mark.unit
def test_cpu_tensors_take_the_reference_path_by_default():
    norm = MaskedGroupNorm(4, 16)
    x, pad = torch.randn(2, 16, 20, requires_grad=True), torch.arange(20)[None] >= torch.tensor([[20], [9]])
    assert type(norm(x, pad).grad_fn).__name__ == "_MaskedGroupNormFnBackward"
    with fused_gn.fused_group_norm("off"):
        assert not fused_gn.use_fused(x.cuda() if torch.cuda.is_available() else x)


@pytest.mark.unit
@pytest.mark.slow  # a fresh process imports the package (~10 s)
def test_bad_modes_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        with fused_gn.fused_group_norm("fast"):
            pass
    r = subprocess.run([sys.executable, "-c", "import nemo_layerfx.encoder.fused_gn"], capture_output=True, text=True,
                       env={**os.environ, "LAYERFX_FUSED_GN": "yes"})
    assert r.returncode != 0 and "LAYERFX_FUSED_GN must be one of" in r.stderr
    if fused_gn.triton is not None and not fused_gn.interpreting():
        with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
            fused_gn.masked_group_norm(torch.randn(1, 4, 5), torch.zeros(1, 5, dtype=torch.bool), torch.ones(4),
                                       torch.zeros(4), 2, 1e-5)
    if fused_gn.triton is not None:
        with pytest.raises(ValueError, match="C divisible by 3"):
            fused_gn.masked_group_norm(torch.randn(1, 4, 5), torch.zeros(1, 5, dtype=torch.bool), torch.ones(4),
                                       torch.zeros(4), 3, 1e-5)


@pytest.mark.unit
@needs_triton
def test_a_kernel_that_fails_here_falls_back_to_the_reference_with_one_warning(monkeypatch):
    """Forced failures: the forward kernel cannot launch (on a CPU tensor it raises), then the backward kernel
    fails at the first backward; both times 'auto' takes the reference path, warns once, and gives its numbers."""
    torch.manual_seed(0)
    norm = MaskedGroupNorm(4, 16)
    x = torch.randn(3, 16, 20, requires_grad=True)
    pad = torch.zeros(3, 20, dtype=torch.bool)
    pad[1, 12:] = True
    with fused_gn.fused_group_norm("off"):
        want = norm(x, pad)
    monkeypatch.setattr(fused_gn, "_failed", None)
    monkeypatch.setattr(fused_gn, "use_fused", lambda t: fused_gn._failed is None)  # as if on a GPU
    with pytest.warns(RuntimeWarning, match="the fused GroupNorm kernels failed on this machine"):
        got = norm(x, pad)  # masked_group_norm refuses a CPU tensor: the launch failure we force
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert fused_gn._failed.startswith("RuntimeError: the fused GroupNorm runs on CUDA tensors")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(norm(x, pad), want, rtol=0, atol=0)  # from now on quietly the reference

    # the backward kernel alone failing: the reference backward gives the gradients
    monkeypatch.setattr(fused_gn, "_failed", None)

    def broken():
        raise RuntimeError("simulated: the backward kernel does not compile")

    monkeypatch.setattr(fused_gn, "_kernels", broken)

    class Ctx:
        saved_tensors = (x.detach(), pad, norm.weight.detach().float(), None, None)
        num_groups, eps = 4, norm.eps

    dy = torch.randn_like(x)
    with pytest.warns(RuntimeWarning, match="simulated: the backward kernel does not compile"):
        dx, _, dw, db, _, _ = fused_gn._FusedMaskedGroupNormFn.backward(Ctx, dy)
    ref = torch.autograd.grad(want, (x, norm.weight, norm.bias), dy)
    for g, r in zip((dx, dw, db), ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    with fused_gn.fused_group_norm("on"), pytest.raises(RuntimeError, match="simulated"):
        fused_gn._FusedMaskedGroupNormFn.backward(Ctx, dy)  # asked for explicitly: the error stands
