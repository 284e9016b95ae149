"""Compression and window kernels beyond the causal whole-sequence call, against the float64
reference (nsa_dsl.semantics.reference), forward and every gradient:

- ``causal = false`` (template variable CAUSAL): compression sees every complete block, the
  window ``[max(0, t-w+1), min(T-1, t+w-1)]`` plus every sink; plain and packed sequences.
- query offsets (``q_start``): q holds the positions q_start .. of a sequence whose keys are all
  given; each piece equals the reference at q_start and the whole call's rows (o, lse, dq), and
  the pieces' key gradients add up to the whole call's.
- logits far below -1e30 (the running max starts at -inf): outputs and lse finite and right.

CPU: Triton's interpreter (fp32 at 1e-5, fp16 at 5e-3). GPU (``pytest -m gpu``): bf16 / fp16
against the float64 reference, within 5e-3 or twice the low-precision reference's own error.
Outputs are NaN-filled before the kernels run (conftest), so an unwritten element fails.
"""
from __future__ import annotations

import pytest
import torch

from kernel_utils import load_family, rand, rel_err, render_family
from nsa_dsl.semantics.reference import compress_attention, num_compressed_blocks, window_attention

NAMES = ("o", "lse", "dq", "dk", "dv")
HAS_CUDA = torch.cuda.is_available()


# ----------------------------------------------------------------------------- helpers

def family(kind: str, causal: bool, G: int, DQK: int, DV: int, params: tuple, varlen: bool = False):
    """The launchers of ``kind`` ("compress": params (L, STRIDE); "window": (W, SINKS))."""
    names = ("L", "STRIDE") if kind == "compress" else ("W", "SINKS")
    extra = {"VARLEN": True} if varlen else {}
    return load_family(f"{kind}.py.j2", G=G, DQK=DQK, DV=DV, CAUSAL=causal, **dict(zip(names, params)), **extra)


def n_keys(kind: str, Tk: int, params: tuple) -> int:
    """Rows of k / v for a sequence of Tk keys: compressed blocks, or the keys themselves."""
    return num_compressed_blocks(Tk, *params) if kind == "compress" else Tk


def inputs(kind, B, T, H, G, DQK, DV, params, dtype=torch.float32, device="cpu", rows=None):
    """q, k, v, do: q / do [B, T, HQ, *], k / v [B, rows (default: n_keys(T)), H, *]."""
    rows = n_keys(kind, T, params) if rows is None else rows
    q = rand((B, T, H * G, DQK), dtype, 1, device)
    k = rand((B, rows, H, DQK), dtype, 2, device)
    v = rand((B, rows, H, DV), dtype, 3, device)
    do = rand((B, T, H * G, DV), dtype, 4, device)
    return q, k, v, do


def reference(kind, q, k, v, do, params, scale, causal, q_start=0, dtype=torch.float64):
    """(o, lse, dq, dk, dv) of the reference in ``dtype``, gradients through autograd."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    fn = compress_attention if kind == "compress" else window_attention
    o, lse = fn(q, k, v, *params, scale, causal, q_start=q_start)
    o.backward(do.to(dtype))
    return o.detach(), lse.detach(), q.grad, k.grad, v.grad


def kernels(mod, q, k, v, do, scale, **kw):
    """(o, lse, dq, dk, dv) of the kernels (fwd, then bwd from its o / lse)."""
    o, lse = mod.fwd(q, k, v, scale, **kw)
    return (o, lse, *mod.bwd(q, k, v, o, lse, do, scale, **kw))


def assert_close(got, want, tol, what="", names=NAMES):
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, (what, name, g.shape, w.shape)
        assert not torch.isnan(g).any(), f"{what} {name} has NaN (unwritten or 0/0)"
        err = rel_err(g, w)
        assert err < tol, f"{what} {name}: rel err {err:.3g} >= {tol}"


def assert_gpu_close(got, q, k, v, do, kind, params, scale, causal, q_start=0, what=""):
    """Kernel outputs in bf16 / fp16 against the float64 reference: within 5e-3, or twice the
    error of the reference computed in the same low precision."""
    ref = reference(kind, q, k, v, do, params, scale, causal, q_start)
    low = reference(kind, q, k, v, do, params, scale, causal, q_start, q.dtype)
    for name, g, r, lo in zip(NAMES, got, ref, low):
        assert not torch.isnan(g).any(), f"{what} {name} has NaN"
        err, err_low = rel_err(g, r), rel_err(lo, r)
        assert err < max(5e-3, 2 * err_low), f"{what} {name}: {err:.3g} (reference in {q.dtype}: {err_low:.3g})"


def _p(kind, B, T, H, G, DQK, DV, params, config=None):
    cid = f"{kind}-B{B}-T{T}-H{H}-G{G}-D{DQK}x{DV}-{'-'.join(map(str, params))}" + ("-small" if config else "") \
        + ("-tma" if config and config.get("TMA") else "")
    return pytest.param(kind, B, T, H, G, DQK, DV, params, config, id=cid)


# small tiles: several key / query tiles per program, so the unmasked phases run too (compress
# dkdv: 48 query positions per split; window: sink gradients in chunks of 16 positions)
CMP_SMALL = dict(R=16, BN=16, QS=48, num_warps=1, num_stages=1)
CMP_SMALL_G3 = dict(CMP_SMALL, R=4)
WIN_SMALL = dict(R=8, BN=16, CHUNK=16)
# the streamed tiles by TMA descriptor (compress: K/V in fwd / dq, q / dO in dkdv; window: K/V in
# fwd / dq): rows past the end, of the next packed sequence and of a query split masked as with
# pointer loads
CMP_TMA, WIN_TMA = dict(CMP_SMALL_G3, TMA=True), dict(WIN_SMALL, TMA=True)


# ----------------------------------------------------------------------------- causal = false

NOT_CAUSAL = [
    _p("compress", 1, 1, 2, 3, 32, 16, (8, 4)),                    # T = 1: no complete block, o = 0
    _p("compress", 2, 17, 2, 3, 32, 16, (8, 4)),
    _p("compress", 1, 15, 1, 1, 32, 16, (16, 16)),                 # T < L: NC = 0
    _p("compress", 1, 100, 1, 16, 48, 32, (16, 16)),               # G = 16, DQK not a power of two
    _p("compress", 1, 100, 2, 1, 16, 48, (32, 16), CMP_SMALL),     # G = 1, DV not a power of two
    _p("compress", 1, 100, 2, 3, 32, 16, (8, 4), CMP_SMALL_G3),
    _p("window", 1, 1, 1, 3, 16, 32, (7, 4)),                      # T = 1: one key, sinks past T
    _p("window", 2, 17, 2, 3, 32, 16, (5, 2)),
    _p("window", 1, 100, 1, 16, 48, 80, (20, 4), dict(BN=16, CHUNK=16)),
    _p("window", 1, 100, 1, 1, 32, 16, (7, 0), dict(R=16, BN=16)),
    _p("window", 1, 100, 1, 2, 16, 16, (20, 40), WIN_SMALL),       # sinks wider than the window: both sides
    _p("window", 1, 60, 1, 3, 16, 16, (200, 3)),                   # W > T: every key
    _p("compress", 1, 100, 2, 3, 32, 16, (8, 4), CMP_TMA),
    _p("window", 1, 100, 1, 2, 16, 16, (20, 40), WIN_TMA),
]


@pytest.mark.parametrize("kind,B,T,H,G,DQK,DV,params,config", NOT_CAUSAL)
def test_not_causal_fp32(kind, B, T, H, G, DQK, DV, params, config):
    mod = family(kind, False, G, DQK, DV, params)
    q, k, v, do = inputs(kind, B, T, H, G, DQK, DV, params)
    got = kernels(mod, q, k, v, do, 0.3, config=config)
    assert_close(got, reference(kind, q, k, v, do, params, 0.3, False), 1e-5)
    assert got[2].dtype == q.dtype and got[1].dtype == torch.float32


@pytest.mark.parametrize("kind,params", [("compress", (16, 8)), ("window", (9, 4))])
def test_not_causal_fp16(kind, params):
    mod = family(kind, False, 3, 32, 64, params)
    q, k, v, do = inputs(kind, 1, 100, 2, 3, 32, 64, params, torch.float16)
    got = kernels(mod, q, k, v, do, 32 ** -0.5)
    assert got[0].dtype == torch.float16 and got[3].dtype == torch.float16
    assert_close(got, reference(kind, q, k, v, do, params, 32 ** -0.5, False), 5e-3)


PACKED = [
    pytest.param("compress", 3, 32, 16, (8, 4), CMP_SMALL_G3, id="compress-G3-small"),
    pytest.param("compress", 16, 16, 48, (8, 8), None, id="compress-G16"),
    pytest.param("window", 3, 16, 32, (5, 4), WIN_SMALL, id="window-G3-sinks-small"),
    pytest.param("window", 1, 32, 16, (20, 40), dict(WIN_SMALL, R=16), id="window-G1-wide-sinks"),
    pytest.param("compress", 3, 32, 16, (8, 4), CMP_TMA, id="compress-G3-small-tma"),
    pytest.param("window", 3, 16, 32, (5, 4), WIN_TMA, id="window-G3-sinks-small-tma"),
]


def packed_inputs(kind, mod, lens, H, G, DQK, DV, params, dtype=torch.float32, device="cpu"):
    """cu_seqlens, the key offsets (compressed blocks for compress) and q, k, v, do, packed."""
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    kcu = mod.compressed_cu_seqlens(cu) if kind == "compress" else cu
    return (cu, kcu, *inputs(kind, 1, int(cu[-1]), H, G, DQK, DV, params, dtype, device, rows=int(kcu[-1])))


@pytest.mark.parametrize("kind,G,DQK,DV,params,config", PACKED)
def test_not_causal_packed(kind, G, DQK, DV, params, config):
    """Packed sequences (lengths 17, 1, 0, 40, 3): each as if alone."""
    H, lens = 2, [17, 1, 0, 40, 3]
    mod = family(kind, False, G, DQK, DV, params, varlen=True)
    cu, kcu, q, k, v, do = packed_inputs(kind, mod, lens, H, G, DQK, DV, params)
    got = kernels(mod, q, k, v, do, 0.3, config=config, cu_seqlens=cu)
    for s, n in enumerate(lens):
        if n == 0:
            continue
        a, b, ka, kb = int(cu[s]), int(cu[s + 1]), int(kcu[s]), int(kcu[s + 1])
        want = reference(kind, q[:, a:b], k[:, ka:kb], v[:, ka:kb], do[:, a:b], params, 0.3, False)
        rows = (slice(a, b),) * 3 + (slice(ka, kb),) * 2
        assert_close([x[:, r] for x, r in zip(got, rows)], want, 1e-5, f"sequence {s} (T = {n})")


# ----------------------------------------------------------------------------- q_start

PIECES = [(0, 23), (23, 24), (24, 70)]      # rows of q; keys: all 70 positions
OFFSET_CASES = [
    _p("compress", 1, 70, 2, 3, 32, 16, (8, 4), CMP_SMALL_G3),
    _p("compress", 2, 70, 1, 1, 16, 48, (16, 8)),
    _p("window", 1, 70, 1, 2, 16, 16, (12, 30), WIN_SMALL),     # sink gradients in chunks, both sides
    _p("window", 2, 70, 1, 1, 32, 16, (7, 0)),
    _p("window", 1, 70, 1, 16, 16, 32, (16, 4)),
    _p("compress", 1, 70, 2, 3, 32, 16, (8, 4), CMP_TMA),
    _p("window", 1, 70, 1, 2, 16, 16, (12, 30), WIN_TMA),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "not-causal"])
@pytest.mark.parametrize("kind,B,T,H,G,DQK,DV,params,config", OFFSET_CASES)
def test_q_start_pieces(kind, B, T, H, G, DQK, DV, params, config, causal):
    """q in pieces (one of a single row) against all the keys: each piece is the reference at its
    q_start and the whole call's rows; the pieces' dk / dv add up to the whole call's."""
    mod = family(kind, causal, G, DQK, DV, params)
    q, k, v, do = inputs(kind, B, T, H, G, DQK, DV, params)
    whole = kernels(mod, q, k, v, do, 0.3, config=config)
    dk, dv = torch.zeros_like(whole[3]), torch.zeros_like(whole[4])
    for a, b in PIECES:
        got = kernels(mod, q[:, a:b], k, v, do[:, a:b], 0.3, config=config, q_start=a)
        want = reference(kind, q[:, a:b], k, v, do[:, a:b], params, 0.3, causal, q_start=a)
        assert_close(got, want, 1e-5, f"piece {a}:{b}")
        assert_close(got[:3], [x[:, a:b] for x in whole[:3]], 1e-5, f"piece {a}:{b} against the whole call")
        dk, dv = dk + got[3], dv + got[4]
    assert_close((dk, dv), whole[3:], 1e-5, "pieces summed", names=("dk", "dv"))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "not-causal"])
@pytest.mark.parametrize("kind,params", [("compress", (16, 8)), ("window", (9, 4))])
def test_q_start_fp16(kind, params, causal):
    """A piece in fp16 (positions 23 .. 69 of 70) against the reference at its q_start."""
    mod = family(kind, causal, 3, 32, 64, params)
    q, k, v, do = inputs(kind, 1, 70, 2, 3, 32, 64, params, torch.float16)
    got = kernels(mod, q[:, 23:], k, v, do[:, 23:], 32 ** -0.5, q_start=23)
    assert got[0].dtype == torch.float16 and got[3].dtype == torch.float16
    assert_close(got, reference(kind, q[:, 23:], k, v, do[:, 23:], params, 32 ** -0.5, causal, q_start=23), 5e-3)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "not-causal"])
def test_q_start_fwd_combine(causal):
    """The window's fused output epilogue at an offset equals fwd + the combine kernel there."""
    G, D, W, SINKS, a, b = 3, 32, 20, 4, 37, 90
    mod = family("window", causal, G, D, D, (W, SINKS))
    comb = load_family("combine.py.j2", C=3, DV=D, GATED=True)
    q, k, v, _ = inputs("window", 1, 100, 2, G, D, D, (W, SINKS))
    q = q[:, a:b]
    others = [rand((1, b - a, 2 * G, D), seed=10 + c) for c in range(2)]
    gates = rand((1, b - a, 2 * G, 3), seed=20)
    o, _ = mod.fwd(q, k, v, 0.3, q_start=a)
    got = mod.fwd_combine(q, k, v, 0.3, others, 1, gates, q_start=a)
    assert torch.equal(got, comb.fwd([others[0], o, others[1]], gates))


def test_q_start_errors():
    win = family("window", True, 1, 16, 16, (8, 0), varlen=True)
    cmp = family("compress", True, 1, 16, 16, (8, 4))
    plain = family("window", True, 1, 16, 16, (8, 0))
    q, k = torch.randn(1, 10, 1, 16), torch.randn(1, 10, 1, 16)
    with pytest.raises(ValueError, match="q_start = 3 with cu_seqlens"):
        win.fwd(q, k, k, 1.0, cu_seqlens=torch.tensor([0, 10], dtype=torch.int32), q_start=3)
    with pytest.raises(ValueError, match="int >= 0"):
        plain.fwd(q, k, k, 1.0, q_start=-1)
    with pytest.raises(ValueError, match="positions 5 .. 14 need their keys: k, v hold 10"):
        plain.fwd(q, k, k, 1.0, q_start=5)
    kc = torch.randn(1, num_compressed_blocks(10, 8, 4), 1, 16)   # 1 block: positions 0 .. 14 need 2
    with pytest.raises(ValueError, match=r"NC >= 2 \(the blocks of positions 0 .. 14\)"):
        cmp.fwd(q, kc, kc, 1.0, q_start=5)


# ----------------------------------------------------------------------------- extreme logits

def quantized(shape, seed, mult=1.0):
    """Normal samples rounded to quarters (times a power of two ``mult``): their dot products are
    exact in fp32, so logits differ by at least scale * mult^2 / 16 or tie exactly."""
    return (rand(shape, seed=seed) * 4).round().clamp(-12, 12) / 4 * mult


def extreme_qk(T, rows, H, G, D, mult):
    """Quantized q [1, T, H * G, D], k [1, rows, H, D] whose dot products are about -18 (two dims
    of 3 * mult against -3 * mult) plus a few units: at scale 1e30 a row's largest logit lies
    below -1e30 almost always."""
    q, k = quantized((1, T, H * G, D), 1, mult), quantized((1, rows, H, D), 2, mult)
    q[..., :2], k[..., :2] = 3 * mult, -3 * mult
    return q, k


EXTREME = [
    pytest.param("compress", (8, 4), None, id="compress"),
    pytest.param("compress", (16, 16), CMP_SMALL_G3, id="compress-small"),
    pytest.param("window", (20, 0), WIN_SMALL, id="window"),
    pytest.param("window", (20, 4), WIN_SMALL, id="window-sinks"),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "not-causal"])
@pytest.mark.parametrize("scale,mult", [(1e30, 1.0), (0.25, 2.0 ** 53)], ids=["scale1e30", "qk2e53"])
@pytest.mark.parametrize("kind,params,config", EXTREME)
def test_logits_far_below_minus_1e30(kind, params, config, scale, mult, causal):
    """Logits of magnitude 1e30 .. 1e34 (a row's largest often below -1e30): o and lse finite
    and equal to the float64 reference (the softmax is one-hot or an exact tie)."""
    G, H, T = 3, 1, 100
    mod = family(kind, causal, G, 16, 16, params)
    rows = n_keys(kind, T, params)
    q, k = extreme_qk(T, rows, H, G, 16, mult)
    v = rand((1, rows, H, 16), seed=3)
    o, lse = mod.fwd(q, k, v, scale, config=config)
    with torch.no_grad():
        o_ref, lse_ref = (compress_attention if kind == "compress" else window_attention)(
            q.double(), k.double(), v.double(), *params, scale, causal)
    assert (lse_ref[torch.isfinite(lse_ref)] < -1e30).any()        # the case -1e30 got wrong
    assert torch.equal(torch.isfinite(lse), torch.isfinite(lse_ref)) and torch.isfinite(o).all()
    assert_close((o, lse), (o_ref, lse_ref), 1e-5, names=("o", "lse"))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "not-causal"])
@pytest.mark.parametrize("kind,params,config", EXTREME)
def test_logits_far_below_zero_with_gradients(kind, params, config, causal):
    """Every logit near -256 (exp underflows without a max subtracted): forward and every
    gradient (within fp32's rounding of such logits: 1e-4)."""
    G, H, T = 3, 1, 100
    mod = family(kind, causal, G, 16, 16, params)
    rows = n_keys(kind, T, params)
    q, k = quantized((1, T, H * G, 16), 1), quantized((1, rows, H, 16), 2)
    q[..., 0], k[..., 0] = 16., -16.                              # q . k = -256 + a few
    v, do = rand((1, rows, H, 16), seed=3), rand((1, T, H * G, 16), seed=4)
    got = kernels(mod, q, k, v, do, 1.0, config=config)
    want = reference(kind, q, k, v, do, params, 1.0, causal)
    assert (want[1][torch.isfinite(want[1])] < -200).all()
    assert_close(got, want, 1e-4)


def test_render_not_causal_specializes():
    """CAUSAL = false renders no causal visibility test; the default (the plan's causal specs)
    renders no both-sided band."""
    cmp_c = render_family("compress.py.j2", G=3, DQK=32, DV=32, L=32, STRIDE=16)
    cmp_n = render_family("compress.py.j2", G=3, DQK=32, DV=32, L=32, STRIDE=16, CAUSAL=False)
    assert "<= o_t" in cmp_c and "<= o_t" not in cmp_n and "n_all = NC" in cmp_n
    win_c = render_family("window.py.j2", G=3, DQK=32, DV=32, W=64, SINKS=4)
    win_n = render_family("window.py.j2", G=3, DQK=32, DV=32, W=64, SINKS=4, CAUSAL=False)
    assert "k_hi" not in win_c and "o_t[:, None] + W" in win_n and "<= o_t" not in win_n
    packed = render_family("window.py.j2", G=3, DQK=32, DV=32, W=64, SINKS=4, VARLEN=True)
    assert "Q0" not in packed and "t_end" not in packed          # packed: rows are positions


# ----------------------------------------------------------------------------- GPU

GPU_DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
GPU_CASES = [
    _p("compress", 2, 1000, 2, 3, 64, 32, (32, 16)),
    _p("compress", 1, 4096, 1, 16, 128, 128, (32, 16)),
    _p("compress", 1, 2049, 1, 16, 192, 128, (32, 16)),
    _p("window", 1, 4096, 2, 16, 128, 128, (512, 0)),
    _p("window", 1, 2000, 2, 3, 64, 48, (100, 4)),
    _p("window", 1, 3001, 1, 16, 192, 128, (64, 200)),            # sinks wider than the window
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@GPU_DTYPES
@pytest.mark.parametrize("kind,B,T,H,G,DQK,DV,params,config", GPU_CASES)
def test_not_causal_gpu(kind, B, T, H, G, DQK, DV, params, config, dtype):
    mod = family(kind, False, G, DQK, DV, params)
    q, k, v, do = inputs(kind, B, T, H, G, DQK, DV, params, dtype, "cuda")
    scale = DQK ** -0.5
    assert_gpu_close(kernels(mod, q, k, v, do, scale), q, k, v, do, kind, params, scale, False)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@GPU_DTYPES
@pytest.mark.parametrize("kind,G,D,params", [("compress", 16, 128, (32, 16)), ("window", 16, 128, (512, 4)),
                                             ("window", 3, 64, (100, 300))], ids=["compress", "window", "window-wide-sinks"])
def test_not_causal_packed_gpu(kind, G, D, params, dtype):
    lens, H = [1, 1000, 17, 0, 3000], 2
    mod = family(kind, False, G, D, D, params, varlen=True)
    cu, kcu, q, k, v, do = packed_inputs(kind, mod, lens, H, G, D, D, params, dtype, "cuda")
    got = kernels(mod, q, k, v, do, D ** -0.5, cu_seqlens=cu)
    for s, n in enumerate(lens):
        if n == 0:
            continue
        a, b, ka, kb = int(cu[s]), int(cu[s + 1]), int(kcu[s]), int(kcu[s + 1])
        rows = (slice(a, b),) * 3 + (slice(ka, kb),) * 2
        assert_gpu_close([x[:, r] for x, r in zip(got, rows)], q[:, a:b], k[:, ka:kb], v[:, ka:kb], do[:, a:b],
                         kind, params, D ** -0.5, False, what=f"sequence {s}")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@GPU_DTYPES
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "not-causal"])
@pytest.mark.parametrize("kind,G,D,params", [("compress", 16, 128, (32, 16)), ("window", 16, 128, (512, 4))],
                         ids=["compress", "window"])
def test_q_start_pieces_gpu(kind, G, D, params, causal, dtype):
    """Pieces of a 4096-position sequence (one of a single row) against the reference at their
    q_start; the pieces' dk / dv add up to the whole call's."""
    T, H = 4096, 2
    mod = family(kind, causal, G, D, D, params)
    q, k, v, do = inputs(kind, 1, T, H, G, D, D, params, dtype, "cuda")
    scale = D ** -0.5
    whole = kernels(mod, q, k, v, do, scale)
    dk, dv = torch.zeros_like(whole[3], dtype=torch.float32), torch.zeros_like(whole[4], dtype=torch.float32)
    for a, b in [(0, 1000), (1000, 1001), (1001, 3001), (3001, T)]:
        got = kernels(mod, q[:, a:b], k, v, do[:, a:b], scale, q_start=a)
        assert_gpu_close(got, q[:, a:b], k, v, do[:, a:b], kind, params, scale, causal, q_start=a, what=f"{a}:{b}")
        dk, dv = dk + got[3].float(), dv + got[4].float()
    assert rel_err(dk, whole[3]) < 1e-2 and rel_err(dv, whole[4]) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@GPU_DTYPES
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "not-causal"])
@pytest.mark.parametrize("kind,params", [("compress", (32, 16)), ("window", (512, 0)), ("window", (512, 4))],
                         ids=["compress", "window", "window-sinks"])
@pytest.mark.parametrize("scale,mult", [(1e10, 1.0), (1e30, 1.0), (128 ** -0.5, 2.0 ** 53)],
                         ids=["scale1e10", "scale1e30", "qk2e53"])
def test_extreme_logits_gpu(kind, params, scale, mult, causal, dtype):
    """The forward at extreme logits (scale = 1e10 gave NaN in compression outputs on an H100
    with the -1e30 start): finite, equal to the float64 reference (one-hot rows or exact ties)."""
    if mult > 1 and dtype == torch.float16:
        pytest.skip("q, k times 2^53 overflow fp16")
    T, H, G, D = 4096, 2, 16, 128
    mod = family(kind, causal, G, D, D, params)
    rows = n_keys(kind, T, params)
    q, k = extreme_qk(T, rows, H, G, D, mult)
    q, k = q.to("cuda", dtype), k.to("cuda", dtype)
    v = rand((1, rows, H, D), dtype, 3, "cuda")
    o, lse = mod.fwd(q, k, v, scale)
    with torch.no_grad():
        o_ref, lse_ref = (compress_attention if kind == "compress" else window_attention)(
            q.double(), k.double(), v.double(), *params, scale, causal)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(lse_ref)) and torch.isfinite(o).all()
    assert rel_err(lse, lse_ref) < 1e-5 and rel_err(o, o_ref) < 5e-3
