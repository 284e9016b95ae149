"""Sliding-window kernels (templates/window.py.j2) against the float64 reference.

CPU: the kernels run through Triton's interpreter (float32 at 1e-5, a float16 set at 5e-3).
GPU (``pytest -m gpu``): bf16 / fp16 at longer lengths.
Every launcher output is NaN-filled before the kernels run (NSA_DSL_NAN_FILL=1, conftest).
"""
from __future__ import annotations

import pytest
import torch

from kernel_utils import load_family, rand, rel_err, render_family
from nsa_dsl.semantics.reference import window_attention

NAMES = ("o", "lse", "dq", "dk", "dv")


def run_case(B, T, H, G, DQK, DV, W, SINKS, dtype, *, config=None, device="cpu", seed=0, qkv=None):
    """Kernel (fwd + bwd in ``dtype``) and reference (float64, autograd); returns rel errors."""
    mod = load_family("window.py.j2", G=G, DQK=DQK, DV=DV, W=W, SINKS=SINKS)
    if qkv is None:
        q = rand((B, T, H * G, DQK), seed=seed + 1, device=device)
        k = rand((B, T, H, DQK), seed=seed + 2, device=device)
        v = rand((B, T, H, DV), seed=seed + 3, device=device)
    else:
        q, k, v = qkv
    do = rand((B, T, H * G, DV), seed=seed + 4, device=device)
    scale = DQK ** -0.5
    qx, kx, vx, dox = (x.to(dtype) for x in (q, k, v, do))
    o, lse = mod.fwd(qx, kx, vx, scale, config=config)
    dq, dk, dv = mod.bwd(qx, kx, vx, o, lse, dox, scale, config=config)

    def reference(dt):
        qr, kr, vr = (x.to(dt).detach().requires_grad_() for x in (qx, kx, vx))
        ro, rlse = window_attention(qr, kr, vr, W, SINKS, scale)
        ro.backward(dox.to(dt))
        return ro, rlse, qr.grad, kr.grad, vr.grad

    ref = reference(torch.float64)
    assert o.dtype == dtype and dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype
    assert lse.dtype == torch.float32
    for x in (o, lse, dq, dk, dv):
        assert torch.isfinite(x).all()
    errs = [rel_err(x, r) for x, r in zip((o, lse, dq, dk, dv), ref)]
    return errs, ref, reference


def _assert_close(errs, tol):
    bad = {n: e for n, e in zip(NAMES, errs) if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {dict(zip(NAMES, errs))})"


def _p(B, T, H, G, DQK, DV, W, SINKS, config=None, marks=()):
    cid = f"B{B}-T{T}-H{H}-G{G}-D{DQK}x{DV}-W{W}-S{SINKS}"
    if config:
        cid += "-" + "-".join(f"{k}{v}" for k, v in sorted(config.items()))
    return pytest.param(B, T, H, G, DQK, DV, W, SINKS, config, id=cid, marks=marks)


FP32_CASES = [
    _p(1, 1, 1, 1, 16, 32, 7, 4),
    _p(2, 15, 2, 3, 32, 16, 7, 4),
    _p(1, 100, 1, 4, 64, 32, 64, 0),
    _p(1, 100, 1, 16, 48, 80, 1, 4),                               # W = 1: the diagonal only
    _p(1, 300, 1, 1, 32, 48, 64, 4),
    _p(1, 300, 1, 3, 64, 64, 7, 0, dict(R=4, BN=16)),              # minimal rows and keys
    _p(1, 300, 1, 3, 16, 32, 7, 4, dict(R=8, BN=16, CHUNK=40)),    # sinks past the window in chunks
    _p(1, 37, 1, 3, 16, 16, 200, 4),                               # W > T
    _p(1, 100, 1, 2, 32, 32, 16, 40, dict(BN=16)),                 # sinks over several key tiles
    _p(1, 15, 1, 64, 16, 16, 7, 4),                                # G = 64: BM = 64
    _p(1, 40, 1, 2, 192, 128, 7, 4),                               # wide heads, BDK = 256
    _p(1, 300, 1, 3, 48, 32, 64, 4, dict(R=8, BN=16, TMA=True)),   # K/V tiles by TMA: padded dims, sinks
    _p(2, 100, 2, 4, 32, 32, 16, 0, dict(BN=16, TMA=True)),        # TMA: batch and head coordinates
]


@pytest.mark.parametrize("B,T,H,G,DQK,DV,W,SINKS,config", FP32_CASES)
def test_window_fp32(B, T, H, G, DQK, DV, W, SINKS, config):
    errs, *_ = run_case(B, T, H, G, DQK, DV, W, SINKS, torch.float32, config=config)
    _assert_close(errs, 1e-5)


@pytest.mark.parametrize("B,T,H,G,DQK,DV,W,SINKS,config", [
    _p(1, 100, 2, 3, 32, 64, 7, 4),
    _p(2, 100, 1, 16, 64, 32, 64, 0),
])
def test_window_fp16(B, T, H, G, DQK, DV, W, SINKS, config):
    errs, *_ = run_case(B, T, H, G, DQK, DV, W, SINKS, torch.float16, config=config)
    _assert_close(errs, 5e-3)


def test_window_strided_inputs():
    """q, k, v as views into packed projections (unit stride in the last dim only)."""
    B, T, H, G, DQK, DV = 1, 50, 2, 2, 32, 16
    packed = rand((B, T, H * G * DQK + H * DQK + H * DV), seed=5)
    q = packed[..., :H * G * DQK].unflatten(-1, (H * G, DQK))
    k = packed[..., H * G * DQK:H * G * DQK + H * DQK].unflatten(-1, (H, DQK))
    v = packed[..., H * G * DQK + H * DQK:].unflatten(-1, (H, DV))
    errs, *_ = run_case(B, T, H, G, DQK, DV, 16, 4, torch.float32, qkv=(q, k, v))
    _assert_close(errs, 1e-5)


def test_window_render_specializes():
    """Jinja decides what exists: no sink code without sinks, no head-dim masks for
    power-of-two dims, no head-padding mask when G is a power of two."""
    plain = render_family("window.py.j2", G=16, DQK=128, DV=128, W=512, SINKS=0)
    assert not [line for line in plain.lower().splitlines()
                if "sink" in line and not line.lstrip().startswith(("#", "sinks = 0"))]
    assert "m_dk" not in plain and "m_dv" not in plain and "o_g < G" not in plain
    sinks = render_family("window.py.j2", G=3, DQK=48, DV=80, W=64, SINKS=4)
    assert "window_bwd_sink_kernel" in sinks and "n_sink" in sinks
    assert "m_dk = " in sinks and "m_dv = " in sinks and "o_g < G" in sinks


def _combine_case(B, T, H, G, D, W, SINKS, C, wpos, gated, dtype, device, config=None):
    """fwd_combine against fwd + the combine kernel (bit for bit): other branches' outputs and
    the gates random, this window at ``wpos`` of C branches."""
    mod = load_family("window.py.j2", G=G, DQK=D, DV=D, W=W, SINKS=SINKS)
    comb = load_family("combine.py.j2", C=C, DV=D, GATED=gated)
    q = rand((B, T, H * G, D), seed=1, device=device).to(dtype)
    k = rand((B, T, H, D), seed=2, device=device).to(dtype)
    v = rand((B, T, H, D), seed=3, device=device).to(dtype)
    others = [rand((B, T, H * G, D), seed=10 + c, device=device).to(dtype) for c in range(C - 1)]
    gates = rand((B, T, H * G, C), seed=20, device=device).to(dtype) if gated else None   # logits
    scale = D ** -0.5
    o, _ = mod.fwd(q, k, v, scale, config=config)
    want = comb.fwd(others[:wpos] + [o] + others[wpos:], gates)
    got = mod.fwd_combine(q, k, v, scale, others, wpos, gates, config=config)
    assert got.dtype == dtype and got.shape == want.shape and torch.isfinite(got).all()
    assert torch.equal(got, want), f"max |diff| {(got.float() - want.float()).abs().max().item():.3g}"


@pytest.mark.parametrize("C,wpos,gated", [(3, 2, True), (3, 0, True), (2, 1, False), (4, 1, True), (1, 0, True)],
                         ids=["C3-last-gated", "C3-first", "C2-summed", "C4-middle", "C1"])
@pytest.mark.parametrize("B,T,H,G,D,W,SINKS", [(2, 77, 2, 3, 48, 20, 0), (1, 130, 1, 16, 32, 64, 4)],
                         ids=["G3-D48-odd", "G16-sinks"])
def test_window_fwd_combine(B, T, H, G, D, W, SINKS, C, wpos, gated):
    """The gating epilogue (inference forward) equals fwd + the combine kernel bit for bit."""
    _combine_case(B, T, H, G, D, W, SINKS, C, wpos, gated, torch.float32, "cpu")


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T,H,G,DQK,DV,W,SINKS", [
    pytest.param(4096, 2, 16, 128, 128, 512, 0, id="T4096-H2-G16-D128-W512-S0"),
    pytest.param(4096, 1, 16, 192, 128, 512, 4, id="T4096-H1-G16-D192x128-W512-S4"),
    pytest.param(2000, 2, 3, 64, 48, 100, 4, id="T2000-H2-G3-D64x48-W100-S4"),
    pytest.param(4096, 1, 1, 64, 64, 7, 0, id="T4096-H1-G1-D64-W7-S0"),
])
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_window_gpu(T, H, G, DQK, DV, W, SINKS, dtype, tma):
    """The GPU heuristic's tiles, with pointer loads and with TMA descriptor loads of the streamed
    tiles (the tuner's other candidate)."""
    errs, ref, reference = run_case(1, T, H, G, DQK, DV, W, SINKS, dtype, device="cuda", config={"TMA": tma})
    low = reference(dtype)                       # the reference in the same precision
    ref_errs = [rel_err(x, r) for x, r in zip(low, ref)]
    for n, e, re in zip(NAMES, errs, ref_errs):
        assert e < max(5e-3, 2 * re), f"{n}: kernel {e:.2e}, {dtype} reference {re:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("C,wpos,gated", [(3, 2, True), (2, 0, False)], ids=["C3-last-gated", "C2-first-summed"])
def test_window_fwd_combine_gpu(C, wpos, gated, dtype):
    _combine_case(1, 3001, 2, 16, 128, 512, 0, C, wpos, gated, dtype, "cuda")
