"""Where kernels run: CPU tensors through Triton's interpreter without the user setting anything,
a true error when that is no longer possible, bf16 refused on the interpreter."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import nsa_dsl
from nsa_dsl import SpecError

ROOT = Path(__file__).resolve().parent.parent
SPEC = """
attention g {
    branch cmp = compress(block = 16, stride = 8)
    branch swa = window(size = 16)
    output = gate(sigmoid, cmp, swa)
}
"""

CALL = textwrap.dedent("""
    import torch, nsa_dsl
    op = nsa_dsl.compile(nsa_dsl.parse('''{spec}'''))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, h, 16, generator=g) for h in (2, 1, 1))
    try:
        print("shape", tuple(op(q, k, v, torch.randn(1, 40, 2, 2, generator=g)).shape))
    except nsa_dsl.SpecError as e:
        print("SpecError", e.code, str(e))
""")


def _run(prelude: str, tmp_path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    env.update(NSA_DSL_CACHE_DIR=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", prelude + CALL.format(spec=SPEC)], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_cpu_tensors_run_without_setting_the_interpreter(tmp_path):
    assert "shape (1, 40, 2, 16)" in _run("", tmp_path)


def test_triton_imported_first_gives_a_true_error(tmp_path):
    out = _run("import triton\n", tmp_path)
    assert "SpecError E607" in out and "TRITON_INTERPRET=1" in out and "before" in out


def test_bf16_on_the_interpreter_is_refused(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    op = nsa_dsl.compile(nsa_dsl.parse(SPEC))
    q, k, v = (torch.randn(1, 20, h, 16, dtype=torch.bfloat16) for h in (2, 1, 1))
    with pytest.raises(SpecError) as e:
        op(q, k, v, torch.zeros(1, 20, 2, 2, dtype=torch.bfloat16))
    assert e.value.code == "E619" and "float32 or float16" in str(e.value)


def test_gates_are_logits(tmp_path, monkeypatch):
    """gate(sigmoid, ...): the op applies the sigmoid to the gates it is given (logits)."""
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    op = nsa_dsl.compile(nsa_dsl.parse(SPEC))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 40, h, 16, generator=g) for h in (2, 1, 1))
    gates = torch.full((1, 40, 2, 2), -3.0)
    gates[..., 1] = 2.0
    o, aux = op(q, k, v, gates, return_aux=True)
    want = torch.sigmoid(torch.tensor(-3.0)) * aux.outputs["cmp"] + torch.sigmoid(torch.tensor(2.0)) * aux.outputs["swa"]
    torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(op(q, k, v, gates), want, rtol=1e-5, atol=1e-6)    # the fused inference path
