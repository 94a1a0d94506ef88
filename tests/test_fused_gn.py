"""The fused (Triton) valid-frame GroupNorm: exact against the reference, chosen only where it should be."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_layerfx import fused_gn
from nemo_layerfx.encoder import MaskedGroupNorm

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
def test_bad_modes_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        with fused_gn.fused_group_norm("fast"):
            pass
    r = subprocess.run([sys.executable, "-c", "import nemo_layerfx.fused_gn"], capture_output=True, text=True,
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
