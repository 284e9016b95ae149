"""compress.py.j2: compression-branch attention forward and backward against the float64 reference."""
import pytest
import torch

from kernel_utils import load_family, rand, rel_err, render_family
from nsa_dsl.semantics.reference import compress_attention, num_compressed_blocks

HAS_CUDA = torch.cuda.is_available()


def _load(G, DQK, DV, L, S):
    return load_family("compress.py.j2", G=G, DQK=DQK, DV=DV, L=L, STRIDE=S)


def _inputs(B, T, H, G, DQK, DV, L, S, dtype, device="cpu"):
    NC = num_compressed_blocks(T, L, S)
    q = rand((B, T, H * G, DQK), dtype, 1, device)
    k = rand((B, NC, H, DQK), dtype, 2, device)
    v = rand((B, NC, H, DV), dtype, 3, device)
    do = rand((B, T, H * G, DV), dtype, 4, device)
    return q, k, v, do


def _reference(q, k, v, do, L, S, scale, dtype=torch.float64):
    """(o, lse, dq, dk, dv) of the reference in `dtype`, gradients through autograd."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    o, lse = compress_attention(q, k, v, L, S, scale)
    o.backward(do.to(dtype))
    return o.detach(), lse.detach(), q.grad, k.grad, v.grad


def _check(mod, B, T, H, G, DQK, DV, L, S, dtype, tol, device="cpu"):
    q, k, v, do = _inputs(B, T, H, G, DQK, DV, L, S, dtype, device)
    scale = DQK ** -0.5
    o, lse = mod.fwd(q, k, v, scale)
    dq, dk, dv = mod.bwd(q, k, v, o, lse, do, scale)
    assert o.dtype == dtype and lse.dtype == torch.float32 and dq.dtype == dtype
    ref = _reference(q, k, v, do, L, S, scale)
    for name, got, want in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv), ref):
        assert got.shape == want.shape, name
        assert not torch.isnan(got).any(), f"{name} has NaN (unwritten or 0/0)"
        err = rel_err(got, want)
        assert err < tol, f"{name}: rel err {err:.3g} >= {tol}"
    return o, lse, dq, dk, dv


# (B, T, H, G, DQK, DV, L, STRIDE)
CASES = [
    (1, 1, 2, 3, 32, 16, 16, 16),       # T = 1: nothing visible
    (2, 15, 1, 1, 32, 16, 16, 16),      # T < L: NC = 0
    (1, 15, 2, 4, 32, 16, 8, 4),        # small blocks, overlapping
    (2, 100, 2, 3, 32, 16, 32, 16),     # the paper's l = 32, d = 16
    (1, 100, 1, 16, 64, 32, 16, 16),    # L == STRIDE, G = 16
    (1, 300, 1, 4, 48, 32, 32, 16),     # DQK not a power of two
    (1, 300, 2, 1, 16, 48, 16, 8),      # G = 1, DV not a power of two
    (1, 300, 1, 3, 80, 16, 64, 32),
    (1, 100, 2, 3, 32, 16, 128, 64),    # blocks larger than T: NC = 0
]


def _id(c):
    B, T, H, G, DQK, DV, L, S = c
    return f"B{B}-T{T}-H{H}-G{G}-D{DQK}x{DV}-L{L}-S{S}"


@pytest.mark.parametrize("case", [pytest.param(c, id=_id(c)) for c in CASES])
def test_compress_fp32(case):
    B, T, H, G, DQK, DV, L, S = case
    o, lse, dq, dk, dv = _check(_load(G, DQK, DV, L, S), *case, torch.float32, 1e-5)
    # rows before the first block ends: o = 0, lse = -inf, dq = 0 (exactly)
    first = min(T, L - 1)
    assert (o[:, :first] == 0).all() and (lse[:, :first] == float("-inf")).all()
    assert (dq[:, :first] == 0).all()
    assert torch.isfinite(o).all() and torch.isfinite(dq).all()
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


# small tiles: the unmasked loops (key tiles every row sees, query tiles that see a whole key tile) run too
@pytest.mark.parametrize("case", [pytest.param(c, id=_id(c)) for c in [
    (1, 300, 1, 1, 32, 16, 16, 16),
    (2, 300, 1, 3, 32, 48, 32, 16),
]])
def test_compress_small_tiles(case, monkeypatch):
    B, T, H, G, DQK, DV, L, S = case
    mod = _load(G, DQK, DV, L, S)
    R = max(1, 16 // mod.GP)
    # dkdv: 48 query positions per program, so most key tiles split their queries
    monkeypatch.setattr(mod, "CONFIG", {"fwd": (R, 16, 1, 1), "dq": (R, 16, 1, 1), "dkdv": (R, 16, 1, 1, 48)})
    _check(mod, *case, torch.float32, 1e-5)


# tiles by TMA descriptor (a tuner candidate): fwd / dq K/V, dkdv q / dO; head-dim padding (48 -> 64),
# padded heads (G = 3 in 4 rows), rows past the last compressed block and past a query split,
# several key tiles and their masked tail
@pytest.mark.parametrize("case", [pytest.param(c, id=_id(c)) for c in [
    (1, 300, 1, 4, 48, 32, 32, 16),
    (2, 300, 2, 3, 32, 48, 16, 8),
    (1, 100, 1, 16, 64, 32, 16, 16),
]])
def test_compress_tma(case, monkeypatch):
    B, T, H, G, DQK, DV, L, S = case
    mod = _load(G, DQK, DV, L, S)
    tile = dict(R=max(1, 16 // mod.GP), BN=16, num_warps=1, num_stages=1, TMA=True)
    # dkdv: 48 query positions per program, so splits end inside the queries (rows past t_hi)
    monkeypatch.setattr(mod, "CONFIG", {"fwd": tile, "dq": tile, "dkdv": dict(tile, QS=48)})
    q, k = _inputs(B, T, H, G, DQK, DV, L, S, torch.float32)[:2]
    assert mod._kv_descs(k, k, mod.resolve_config(q, "fwd"))[2]          # the descriptors are taken
    _check(mod, *case, torch.float32, 1e-5)
    # a query piece: the second half of the positions, every compressed block given
    q, k, v, do = _inputs(B, T, H, G, DQK, DV, L, S, torch.float32)
    p0 = T // 2 + 1
    o, lse = mod.fwd(q, k, v, DQK ** -0.5)
    dq = mod.bwd(q, k, v, o, lse, do, DQK ** -0.5)[0]
    o2, lse2 = mod.fwd(q[:, p0:], k, v, DQK ** -0.5, q_start=p0)
    dq2 = mod.bwd(q[:, p0:], k, v, o2, lse2, do[:, p0:], DQK ** -0.5, q_start=p0)[0]
    assert rel_err(o2, o[:, p0:]) < 1e-6 and rel_err(dq2, dq[:, p0:]) < 1e-6


@pytest.mark.parametrize("case", [pytest.param(c, id=_id(c)) for c in [
    (1, 100, 2, 3, 32, 16, 32, 16),
    (1, 300, 1, 16, 64, 32, 16, 16),
]])
def test_compress_fp16(case):
    B, T, H, G, DQK, DV, L, S = case
    _check(_load(G, DQK, DV, L, S), *case, torch.float16, 5e-3)


def test_compress_strided_inputs():
    """Inputs that are views (non-contiguous heads / time) give the same result."""
    B, T, H, G, DQK, DV, L, S = 1, 100, 2, 3, 32, 16, 32, 16
    mod = _load(G, DQK, DV, L, S)
    q, k, v, do = _inputs(B, T, H, G, DQK, DV, L, S, torch.float32)
    qs = torch.cat([q, q], -1)[..., :DQK]               # strides differ from the shape's
    o, lse = mod.fwd(qs, k, v, DQK ** -0.5)
    o2, lse2 = mod.fwd(q, k, v, DQK ** -0.5)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
    dq, dk, dv = mod.bwd(qs, k, v, o, lse, torch.cat([do, do], 2)[:, :, :H * G], DQK ** -0.5)
    ref = _reference(q, k, v, do, L, S, DQK ** -0.5)
    assert rel_err(dq, ref[2]) < 1e-5 and rel_err(dk, ref[3]) < 1e-5 and rel_err(dv, ref[4]) < 1e-5


def test_compress_rendering_specializes():
    """Jinja renders only what the variables need."""
    same = render_family("compress.py.j2", G=4, DQK=64, DV=32, L=16, STRIDE=16)
    assert "n_all = (t_first + 1) // 16 " in same                 # l == d: no clip at 0

    assert "< DQK" not in same and "< DV" not in same      # power-of-two dims: no dim masks
    assert "% GP < G" not in same                          # G a power of two: no padded heads
    over = render_family("compress.py.j2", G=3, DQK=48, DV=80, L=32, STRIDE=16)
    assert "n_all = tl.maximum(0, (t_first + 1) // 16 - 1)" in over        # from nsa_dsl.language.shapes
    assert "(o_k < DQK)" in over and "(o_v < DV)" in over and "o_r % GP < G" in over
    one = render_family("compress.py.j2", G=1, DQK=32, DV=32, L=32, STRIDE=16)
    assert "o_r // GP" not in one                          # G = 1: rows are positions


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [pytest.param(c, id=_id(c)) for c in [
    (2, 1000, 2, 3, 64, 32, 32, 16),
    (1, 4096, 4, 16, 128, 128, 32, 16),
    (1, 4096, 1, 16, 192, 128, 32, 16),
    (1, 2049, 2, 64, 64, 64, 16, 16),
]])
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_compress_gpu(case, dtype, tma):
    """The GPU heuristic's tiles, with pointer loads and with TMA descriptor loads (the tuner's
    other candidate) of the streamed tiles."""
    B, T, H, G, DQK, DV, L, S = case
    mod = _load(G, DQK, DV, L, S)
    q, k, v, do = _inputs(B, T, H, G, DQK, DV, L, S, dtype, "cuda")
    scale = DQK ** -0.5
    config = {"TMA": tma}
    assert mod._kv_descs(k, v, mod.resolve_config(q, "fwd", config))[2] is tma
    o, lse = mod.fwd(q, k, v, scale, config=config)
    got = (o, lse, *mod.bwd(q, k, v, o, lse, do, scale, config=config))
    ref = _reference(q, k, v, do, L, S, scale)
    low = _reference(q, k, v, do, L, S, scale, dtype)     # the reference's own error in `dtype`
    for name, g, r, lo in zip(("o", "lse", "dq", "dk", "dv"), got, ref, low):
        assert not torch.isnan(g).any(), name
        err, err_low = rel_err(g, r), rel_err(lo, r)
        assert err < max(5e-3, 2 * err_low), f"{name}: {err:.3g} (reference in {dtype}: {err_low:.3g})"
