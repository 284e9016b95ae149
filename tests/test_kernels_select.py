"""Selection-attention kernels (templates/select.py.j2) against the float64 reference.

CPU: the kernels run through Triton's interpreter (float32 at 1e-5, a float16 set at 5e-3).
GPU (``pytest -m gpu``): bf16 / fp16 at longer lengths.
Every launcher output is NaN-filled before the kernels run (NSA_DSL_NAN_FILL=1, conftest).
"""
from __future__ import annotations

import pytest
import torch

from kernel_utils import load_family, rand, rel_err, render_family
from nsa_dsl.semantics.reference import clean_indices, group_last, select_attention, select_blocks_mean_pool

HAS_CUDA = torch.cuda.is_available()


def random_idx(B, T, H, LS, TOPK, *, seed=0, forced=True, drop=0.3, device="cpu"):
    """A random valid selection [B, T, H, TOPK] int32: eligible blocks only (j * LS <= t),
    distinct, ascending, -1 padded at the end. ``forced``: block 0 and t's own block always in
    (as keep_first = keep_last = 1 make them); ``drop``: chance to leave out an unforced pick,
    so rows hold fewer than the possible blocks (-1 padding) even at long T."""
    g = torch.Generator().manual_seed(seed)
    NB = -(-T // LS)
    t = torch.arange(T)[:, None]
    j = torch.arange(NB)[None, :]
    score = torch.rand(B, T, H, NB, generator=g)
    score = torch.where((j * LS <= t)[None, :, None, :], score, -1.0)
    if forced:
        score = torch.where(((j == 0) | (j == t // LS))[None, :, None, :], 2.0, score)
    top, pick = score.topk(min(TOPK, NB), -1)
    keep = (top >= 0) & ~((torch.rand(top.shape, generator=g) < drop) & (top < 2))
    pick = torch.where(keep, pick, NB).sort(-1).values
    pick = torch.where(pick == NB, -1, pick)
    pick = torch.nn.functional.pad(pick, (0, TOPK - pick.shape[-1]), value=-1)
    return pick.to(torch.int32).to(device)


def reach_idx(kind, B, T, H, LS, TOPK, *, causal=True, QB=1, q_start=0, n_keys=None, seed=0, device="cpu"):
    """A random selection [B, T, H, TOPK] int32 as the second release's kernels meet it: every
    block eligible when not causal (the last one partial); with QB, one choice per group of QB
    positions (eligible for the group's last position: later rows of the group hold blocks past
    their own, as the top-k writes them). ``kind``: "groups" as said, "clean" the same cleaned
    per row (a caller's selection: rows of a group then differ), "random" one choice per row."""
    n_keys = q_start + T if n_keys is None else n_keys
    g = torch.Generator().manual_seed(seed)
    NB = -(-n_keys // LS)
    t = torch.arange(q_start, q_start + T)
    if kind != "random":
        t = group_last(t, QB, n_keys)
    j = torch.arange(NB)[None, :]
    score = torch.rand(B, T, H, NB, generator=g)
    if kind != "random":            # the group's first row's draw for every row of the group
        first = (torch.arange(T) + q_start) // QB * QB - q_start
        score = score[:, first.clamp(min=0)]
    if causal:
        score = torch.where((j * LS <= t[:, None])[None, :, None, :], score, -1.0)
    top, pick = score.topk(min(TOPK, NB), -1)
    pick = torch.where((top >= 0) & (top > 0.2), pick, NB).sort(-1).values       # some rows hold fewer
    pick = torch.where(pick == NB, -1, pick)
    pick = torch.nn.functional.pad(pick, (0, TOPK - pick.shape[-1]), value=-1).to(torch.int32)
    if kind == "clean":
        pick = clean_indices(pick, NB, LS, causal, t0=q_start)
    return pick.to(device)


def make_idx(kind, q, k, LS, TOPK, seed):
    B, T, H = k.shape[:3]
    if kind == "random":
        return random_idx(B, T, H, LS, TOPK, seed=seed, forced=False, device=q.device)
    if kind == "forced":          # block 0 and the own block chosen by everyone
        return random_idx(B, T, H, LS, TOPK, seed=seed, forced=True, device=q.device)
    if kind == "meanpool":        # the reference's own choice (keep_first=1, keep_last=2 when room)
        kl = min(2, TOPK - 1)
        return select_blocks_mean_pool(q.double(), k.double(), LS, TOPK, min(1, TOPK - kl), kl)
    raise ValueError(kind)


def run_case(B, T, H, G, DQK, DV, LS, TOPK, dtype, *, idx_kind="random", config=None,
             device="cpu", seed=0, idx=None, causal=True, QB=1, q_start=0, n_keys=None):
    """Kernel (fwd + bwd in ``dtype``) and reference (float64, autograd); returns rel errors.
    ``q_start`` / ``n_keys``: q's T rows are positions q_start .. of n_keys keys (OFFSETS kernels)."""
    n_keys = q_start + T if n_keys is None else n_keys
    pieces = dict(OFFSETS=True) if n_keys != T else {}
    mod = load_family("select.py.j2", G=G, DQK=DQK, DV=DV, LS=LS, TOPK=TOPK, CAUSAL=causal, QB=QB, **pieces)
    q = rand((B, n_keys, H * G, DQK), seed=seed + 1, device=device)[:, q_start:q_start + T]
    k = rand((B, n_keys, H, DQK), seed=seed + 2, device=device)
    v = rand((B, n_keys, H, DV), seed=seed + 3, device=device)
    do = rand((B, T, H * G, DV), seed=seed + 4, device=device)
    if idx is None:
        idx = reach_idx(idx_kind, B, T, H, LS, TOPK, causal=causal, QB=QB, q_start=q_start, n_keys=n_keys,
                        seed=seed, device=device) if idx_kind in ("groups", "clean") or not causal or pieces \
            else make_idx(idx_kind, q, k, LS, TOPK, seed)
    scale = DQK ** -0.5
    qx, kx, vx, dox = (x.to(dtype) for x in (q, k, v, do))
    at = dict(q_start=q_start) if pieces else {}
    o, lse = mod.fwd(qx, kx, vx, idx, scale, config=config, **at)
    dq, dk, dv = mod.bwd(qx, kx, vx, idx, o, lse, dox, scale, config=config, **at)

    def reference(dt):
        qr, kr, vr = (x.to(dt).detach().requires_grad_() for x in (qx, kx, vx))
        ro, rlse = select_attention(qr, kr, vr, idx, LS, scale, causal, q_start=q_start)
        ro.backward(dox.to(dt))
        return ro, rlse, qr.grad, kr.grad, vr.grad

    ref = reference(torch.float64)
    assert o.dtype == dtype and dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype
    assert lse.dtype == torch.float32
    for x in (o, dq, dk, dv):
        assert torch.isfinite(x).all()
    errs = [rel_err(x, r) for x, r in zip((o, lse, dq, dk, dv), ref)]
    return errs, ref, reference, (o, lse, dq, dk, dv)


NAMES = ("o", "lse", "dq", "dk", "dv")


def _assert_close(errs, tol):
    bad = {n: e for n, e in zip(NAMES, errs) if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {dict(zip(NAMES, errs))})"


def _p(B, T, H, G, DQK, DV, LS, TOPK, idx_kind, config=None, marks=()):
    cid = f"B{B}-T{T}-H{H}-G{G}-D{DQK}x{DV}-LS{LS}-K{TOPK}-{idx_kind}"
    if config:
        cid += "-" + "-".join(f"{k}{v}" for k, v in sorted(config.items()))
    return pytest.param(B, T, H, G, DQK, DV, LS, TOPK, idx_kind, config, id=cid, marks=marks)


FP32_CASES = [
    _p(1, 1, 1, 1, 16, 32, 16, 2, "random"),
    _p(2, 15, 2, 3, 32, 16, 16, 4, "random"),                    # one block: -1 padding everywhere
    _p(1, 100, 2, 4, 64, 32, 32, 3, "random"),
    _p(1, 100, 1, 16, 48, 80, 48, 2, "forced"),                  # LS not a power of two, D padded
    _p(1, 100, 1, 16, 32, 32, 32, 3, "random", dict(R=1, RQ=1)),  # one position per program: idx as is
    _p(1, 100, 1, 3, 32, 16, 16, 4, "random", dict(R=8, RQ=16, CHUNK=8)),  # long lists in chunks
    _p(1, 300, 1, 1, 32, 48, 16, 5, "meanpool"),
    _p(1, 300, 1, 3, 64, 64, 64, 3, "forced", dict(R=4, RQ=4, CHUNK=32)),   # minimal rows
    _p(1, 300, 1, 4, 16, 32, 100, 2, "random"),                  # LS = 100: two tiles, masked end
    _p(1, 300, 1, 16, 16, 32, 100, 3, "random", dict(R=1, RQ=1)),  # R = 1, -1 padded lists, a masked block end
    _p(1, 15, 1, 64, 16, 16, 16, 1, "forced"),                   # G = 64: BM = 64, TOPK = 1
    _p(1, 40, 1, 2, 192, 128, 16, 3, "meanpool"),                # wide heads, BDK = 256
    # K/V tiles by TMA descriptor (the GPU heuristic's fwd / dq): head-dim padding and rows past
    # T arrive as zeros, per batch; masked block ends; the union walk
    _p(1, 100, 1, 16, 48, 80, 48, 2, "forced", dict(TMA=True)),
    _p(2, 100, 2, 3, 32, 16, 16, 4, "random", dict(R=8, RQ=16, CHUNK=8, TMA=True)),
    _p(1, 300, 1, 4, 16, 32, 100, 2, "random", dict(TMA=True)),
]


@pytest.mark.parametrize("B,T,H,G,DQK,DV,LS,TOPK,idx_kind,config", FP32_CASES)
def test_select_fp32(B, T, H, G, DQK, DV, LS, TOPK, idx_kind, config):
    errs, *_ = run_case(B, T, H, G, DQK, DV, LS, TOPK, torch.float32, idx_kind=idx_kind, config=config)
    _assert_close(errs, 1e-5)


@pytest.mark.parametrize("B,T,H,G,DQK,DV,LS,TOPK,idx_kind,config", [
    _p(1, 100, 2, 3, 32, 64, 16, 3, "forced"),
    _p(1, 100, 2, 16, 64, 32, 64, 3, "meanpool", dict(R=1, TMA=True)),
    _p(2, 100, 1, 16, 64, 32, 32, 2, "meanpool"),
])
def test_select_fp16(B, T, H, G, DQK, DV, LS, TOPK, idx_kind, config):
    errs, *_ = run_case(B, T, H, G, DQK, DV, LS, TOPK, torch.float16, idx_kind=idx_kind, config=config)
    _assert_close(errs, 5e-3)


def test_select_tma_needs_aligned_layouts():
    """TMA descriptors only for 16-byte aligned bases and strides; otherwise a config asking for
    TMA runs the pointer loads, with the same results."""
    mod = load_family("select.py.j2", G=2, DQK=20, DV=16, LS=16, TOPK=2)
    cfg = mod.resolve_config(torch.empty(1, 1, 2, 20), "fwd", dict(TMA=True))
    k = torch.randn(1, 50, 1, 20, dtype=torch.float16)                 # 40-byte rows: no TMA
    v = torch.randn(1, 50, 1, 16, dtype=torch.float16)
    assert mod._kv_descs(k, v, cfg)[2] is False
    assert mod._kv_descs(k.float(), v, cfg)[2] is True                 # 80-byte rows
    assert mod._kv_descs(k.float(), v, dict(cfg, TMA=False))[2] is False
    errs, *_ = run_case(1, 50, 1, 2, 20, 16, 16, 2, torch.float16, config=dict(TMA=True))
    _assert_close(errs, 5e-3)


def test_select_rows_without_keys():
    """Rows with no block (-1 only) or only a block after t: o = 0, lse = -inf, finite gradients."""
    B, T, H, G, D, LS, K = 1, 40, 2, 3, 32, 16, 3
    idx = torch.full((B, T, H, K), -1, dtype=torch.int32)
    idx[:, ::3, 0, 0] = 0
    idx[:, 5:, 1, 0] = 2               # keys from 32 on: nothing for t < 32
    errs, ref, _, (o, lse, *_) = run_case(B, T, H, G, D, D, LS, K, torch.float32, idx=idx,
                                          config=dict(R=8, RQ=8, CHUNK=8))
    _assert_close(errs, 1e-5)
    no_key = torch.isinf(ref[1])
    assert no_key.any() and torch.equal(torch.isinf(lse), no_key)
    assert (o[no_key] == 0).all()


def test_select_strided_inputs():
    """q, k, v as views into packed projections (unit stride in the last dim only)."""
    B, T, H, G, DQK, DV, LS, K = 1, 50, 2, 2, 32, 16, 16, 2
    mod = load_family("select.py.j2", G=G, DQK=DQK, DV=DV, LS=LS, TOPK=K)
    packed = rand((B, T, H * G * DQK + H * DQK + H * DV), seed=5)
    q = packed[..., :H * G * DQK].unflatten(-1, (H * G, DQK))
    k = packed[..., H * G * DQK:H * G * DQK + H * DQK].unflatten(-1, (H, DQK))
    v = packed[..., H * G * DQK + H * DQK:].unflatten(-1, (H, DV))
    do = rand((B, T, H * G, DV), seed=6)
    idx = random_idx(B, T, H, LS, K, seed=3)
    o, lse = mod.fwd(q, k, v, idx, 0.3)
    dq, dk, dv = mod.bwd(q, k, v, idx, o, lse, do, 0.3)
    qr, kr, vr = (x.double().detach().requires_grad_() for x in (q, k, v))
    ro, rl = select_attention(qr, kr, vr, idx, LS, 0.3)
    ro.backward(do.double())
    _assert_close([rel_err(a, b) for a, b in zip((o, lse, dq, dk, dv), (ro, rl, qr.grad, kr.grad, vr.grad))], 1e-5)


def test_select_inverse_index():
    """invert(): for each (b, kv head, block) exactly the positions that chose it, ascending."""
    B, T, H, LS, K = 2, 70, 3, 16, 3
    mod = load_family("select.py.j2", G=1, DQK=16, DV=16, LS=LS, TOPK=K)
    idx = random_idx(B, T, H, LS, K, seed=1)
    pos, off, item_list, item_chunk, n_chunks = mod.invert(idx, chunk=8)
    NB = -(-T // LS)
    for b in range(B):
        for h in range(H):
            for j in range(NB):
                l = (b * H + h) * NB + j
                want = (idx[b, :, h] == j).any(-1).nonzero().flatten()
                got = pos[off[l]:off[l + 1]].long()
                assert torch.equal(got, want), (b, h, j)
                assert n_chunks[l] == max(1, -(-want.numel() // 8))
    real = item_list < B * H * NB
    pairs = sorted(zip(item_list[real].tolist(), item_chunk[real].tolist()))
    assert pairs == [(l, c) for l in range(B * H * NB) for c in range(int(n_chunks[l]))]


def test_select_block_lists():
    """block_lists(): R = 1 is idx itself; R > 1 the ascending union of the R positions."""
    B, T, H, LS, K, R = 2, 45, 2, 16, 2, 4
    mod = load_family("select.py.j2", G=1, DQK=16, DV=16, LS=LS, TOPK=K)
    idx = random_idx(B, T, H, LS, K, seed=2)
    blk, rk = mod.block_lists(idx, 1)
    assert rk == K and torch.equal(blk, idx.permute(0, 2, 1, 3))
    blk, rk = mod.block_lists(idx, R)
    assert rk == R * K and blk.shape == (B, H, -(-T // R), R * K)
    for b in range(B):
        for h in range(H):
            for p in range(blk.shape[2]):
                want = sorted(set(idx[b, p * R:(p + 1) * R, h].flatten().tolist()) - {-1})
                got = blk[b, h, p].tolist()
                assert got == want + [-1] * (R * K - len(want))


def test_select_render_specializes():
    """Jinja decides what exists: no block-end mask when BN divides LS, no head-dim masks for
    power-of-two dims; LS = 48 gets the mask, D = 48 gets the dim masks."""
    plain = render_family("select.py.j2", G=16, DQK=64, DV=64, LS=64, TOPK=16)
    assert "(i_j + 1) * LS" not in plain and "m_dk" not in plain and "m_dv" not in plain
    assert "o_g < G" not in plain                                       # G is a power of two
    assert "BN = 64" in plain and "NT = 1" in plain
    odd = render_family("select.py.j2", G=3, DQK=48, DV=80, LS=48, TOPK=3)
    assert "(i_j + 1) * LS" in odd and "m_dk = " in odd and "m_dv = " in odd and "o_g < G" in odd
    assert "for i_n in range(NT)" not in odd                            # 48 fits one tile
    long = render_family("select.py.j2", G=4, DQK=64, DV=64, LS=128, TOPK=4)
    assert "BN = 64" in long and "NT = 2" in long and "for i_n in range(NT)" in long
    assert "(i_j + 1) * LS" not in long


# ----------------------------------------------------------------------------- second release
# causal = false, query_block = QB (a tile inside a group walks its TOPK blocks with every row; the
# kernels find the union of the rows' blocks themselves), query pieces (OFFSETS: q_start)

def _r(B, T, H, G, DQK, DV, LS, TOPK, causal, QB, kind, config=None):
    cid = f"B{B}-T{T}-H{H}-G{G}-D{DQK}x{DV}-LS{LS}-K{TOPK}-{'causal' if causal else 'full'}-QB{QB}-{kind}"
    if config:
        cid += "-" + "-".join(f"{k}{v}" for k, v in sorted(config.items()))
    return pytest.param(B, T, H, G, DQK, DV, LS, TOPK, causal, QB, kind, config, id=cid)


REACH_FP32 = [
    _r(1, 100, 2, 3, 32, 16, 16, 4, False, 1, "random"),                 # every key of a block, blocks past t
    _r(1, 60, 1, 16, 32, 48, 48, 3, False, 1, "random", dict(R=1, RQ=1)),    # masked block ends, a partial last block
    _r(2, 17, 1, 3, 32, 16, 16, 2, True, 2, "groups"),
    _r(1, 130, 1, 1, 32, 16, 16, 4, True, 16, "groups"),                 # 4 groups per tile: their union
    _r(1, 100, 1, 16, 32, 16, 16, 4, True, 64, "groups", dict(R=4, RQ=4, CHUNK=16)),   # tiles inside a group
    _r(1, 100, 2, 3, 48, 32, 32, 3, False, 16, "groups"),
    _r(1, 130, 1, 3, 32, 32, 16, 4, True, 16, "clean", dict(R=16)),      # a caller's: rows of a group differ
    _r(1, 100, 1, 3, 32, 16, 16, 3, True, 16, "random"),                 # any rows
    _r(1, 1, 1, 3, 32, 16, 16, 2, False, 64, "groups"),                  # T = 1
    _r(1, 100, 1, 4, 16, 32, 100, 2, False, 1, "random", dict(TMA=True)),   # TMA, two tiles per block
    _r(1, 100, 1, 4, 16, 32, 100, 2, True, 16, "clean", dict(TMA=True)),
]


@pytest.mark.parametrize("B,T,H,G,DQK,DV,LS,TOPK,causal,QB,kind,config", REACH_FP32)
def test_select_reach_fp32(B, T, H, G, DQK, DV, LS, TOPK, causal, QB, kind, config):
    errs, *_ = run_case(B, T, H, G, DQK, DV, LS, TOPK, torch.float32, idx_kind=kind, config=config,
                        causal=causal, QB=QB)
    _assert_close(errs, 1e-5)


@pytest.mark.parametrize("B,T,H,G,DQK,DV,LS,TOPK,causal,QB,kind,config", [
    _r(1, 100, 2, 3, 32, 64, 16, 3, False, 1, "random"),
    _r(1, 130, 1, 16, 64, 32, 32, 3, True, 64, "groups", dict(R=4, TMA=True)),
])
def test_select_reach_fp16(B, T, H, G, DQK, DV, LS, TOPK, causal, QB, kind, config):
    errs, *_ = run_case(B, T, H, G, DQK, DV, LS, TOPK, torch.float16, idx_kind=kind, config=config,
                        causal=causal, QB=QB)
    _assert_close(errs, 5e-3)


@pytest.mark.parametrize("causal,QB", [(True, 1), (False, 1), (True, 16)], ids=["causal-QB1", "full-QB1", "causal-QB16"])
def test_select_pieces(causal, QB):
    """q_start pieces (OFFSETS): each piece against the reference at q_start, its outputs the whole
    call's rows, and the pieces' key gradients summing to the whole call's."""
    B, T, H, G, DQK, DV, LS, K = 1, 130, 1, 3, 32, 16, 16, 3
    mod = load_family("select.py.j2", G=G, DQK=DQK, DV=DV, LS=LS, TOPK=K, CAUSAL=causal, QB=QB, OFFSETS=True)
    q, k, v = rand((B, T, H * G, DQK), seed=1), rand((B, T, H, DQK), seed=2), rand((B, T, H, DV), seed=3)
    do = rand((B, T, H * G, DV), seed=4)
    idx = reach_idx("groups", B, T, H, LS, K, causal=causal, QB=QB, seed=5)
    o, lse = mod.fwd(q, k, v, idx, 0.3)
    dq, dk, dv = mod.bwd(q, k, v, idx, o, lse, do, 0.3)
    dk_sum, dv_sum = torch.zeros_like(dk), torch.zeros_like(dv)
    for a, b in ((0, 48), (48, 112), (112, 130)):
        po, plse = mod.fwd(q[:, a:b], k, v, idx[:, a:b], 0.3, q_start=a)
        pdq, pdk, pdv = mod.bwd(q[:, a:b], k, v, idx[:, a:b], po, plse, do[:, a:b], 0.3, q_start=a)
        qr, kr, vr = (x.double().requires_grad_() for x in (q[:, a:b], k, v))
        ro, rlse = select_attention(qr, kr, vr, idx[:, a:b], LS, 0.3, causal, q_start=a)
        ro.backward(do[:, a:b].double())
        _assert_close([rel_err(x, r) for x, r in zip((po, plse, pdq, pdk, pdv), (ro, rlse, qr.grad, kr.grad, vr.grad))],
                      1e-5)
        _assert_close([rel_err(x, r) for x, r in zip((po, plse, pdq), (o[:, a:b], lse[:, a:b], dq[:, a:b]))], 1e-5)
        dk_sum += pdk
        dv_sum += pdv
    assert rel_err(dk_sum, dk) < 1e-5 and rel_err(dv_sum, dv) < 1e-5


def test_select_render_reach():
    """QB: no block lists (the kernel walks its rows' union); not causal: no causal masks; OFFSETS:
    rows and positions apart."""
    v = dict(G=4, DQK=64, DV=64, LS=64, TOPK=8)
    plain = render_family("select.py.j2", **v)
    groups = render_family("select.py.j2", **v, QB=16)
    assert "blk" in plain and "while" not in plain
    assert " blk," not in groups and "while i_j < N_J:" in groups
    full = render_family("select.py.j2", **v, CAUSAL=False)
    assert "<= o_t" in plain and "<= o_t" not in full
    piece = render_family("select.py.j2", **v, OFFSETS=True)
    assert "o_pos = T0 + o_t" in piece and "T0 + o_t[None, :]" in piece and "T0" not in plain


def test_select_pieces_refused():
    """Pieces need OFFSETS kernels, a start on a group boundary, keys enough, and no packing."""
    q, k, v = rand((1, 40, 1, 16)), rand((1, 64, 1, 16)), rand((1, 64, 1, 16))
    idx = torch.full((1, 40, 1, 2), -1, dtype=torch.int32)
    with pytest.raises(ValueError, match="OFFSETS"):
        load_family("select.py.j2", G=1, DQK=16, DV=16, LS=16, TOPK=2).fwd(q, k, v, idx, 0.25)
    mod = load_family("select.py.j2", G=1, DQK=16, DV=16, LS=16, TOPK=2, QB=16, OFFSETS=True)
    with pytest.raises(ValueError, match="multiple of 16"):
        mod.fwd(q[:, :8], k, v, idx[:, :8], 0.25, q_start=8)
    with pytest.raises(ValueError, match="keys hold 64"):
        mod.fwd(q, k, v, idx, 0.25, q_start=32)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_select_huge_negative_logits(causal):
    """The running max starts at -inf: rows whose logits all lie far below 0 keep their weight even
    where a tile they skip comes first (R > 1: rows that did not choose a block). Logits near -125
    (exp underflows in fp32 from -104): forward and backward against the reference (at fp32's
    resolution there: 1e-4); near -1e31: the forward (every logit of a row equal), finite gradients."""
    B, T, H, G, D, LS, K = 1, 64, 1, 2, 32, 16, 3
    mod = load_family("select.py.j2", G=G, DQK=D, DV=D, LS=LS, TOPK=K, CAUSAL=causal)
    idx = reach_idx("random", B, T, H, LS, K, causal=causal, seed=0)
    for shift, tol in ((32.0, 1e-4), (1e16, None)):
        q = (rand((B, T, H * G, D), seed=1) * 8).round() / 8       # exact products and sums in fp32
        k = (rand((B, T, H, D), seed=2) * 8).round() / 8
        q[..., 0], k[..., 0] = shift, -shift                        # logits about -shift**2 / 8
        if tol is None:
            k = k[:, :1].expand_as(k).contiguous()                   # equal keys: every logit of a row equal
        v, do = rand((B, T, H, D), seed=3), rand((B, T, H * G, D), seed=4)
        o, lse = mod.fwd(q, k, v, idx, 0.125, config=dict(R=8, RQ=8))
        dq, dk, dv = mod.bwd(q, k, v, idx, o, lse, do, 0.125, config=dict(R=8, RQ=8))
        qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
        ro, rlse = select_attention(qr, kr, vr, idx, LS, 0.125, causal)
        ro.backward(do.double())
        _assert_close([rel_err(o, ro), rel_err(lse, rlse)], 1e-5)
        if tol is None:
            assert all(torch.isfinite(x).all() for x in (dq, dk, dv))
        else:
            _assert_close([rel_err(o, ro), rel_err(lse, rlse), rel_err(dq, qr.grad), rel_err(dk, kr.grad),
                           rel_err(dv, vr.grad)], tol)


@pytest.mark.parametrize("causal,QB", [(False, 1), (True, 16), (False, 64)], ids=["full-QB1", "causal-QB16", "full-QB64"])
def test_select_packed_reach(causal, QB):
    """Packed sequences (VARLEN): each sequence attends as if alone (its blocks, its groups)."""
    G, DQK, DV, LS, K = 3, 32, 16, 16, 3
    cu = torch.tensor([0, 17, 17, 117, 130], dtype=torch.int32)
    T = int(cu[-1])
    mod = load_family("select.py.j2", G=G, DQK=DQK, DV=DV, LS=LS, TOPK=K, CAUSAL=causal, QB=QB, VARLEN=True)
    q, k, v = rand((1, T, G, DQK), seed=1), rand((1, T, 1, DQK), seed=2), rand((1, T, 1, DV), seed=3)
    do = rand((1, T, G, DV), seed=4)
    idx = torch.cat([reach_idx("groups", 1, b - a, 1, LS, K, causal=causal, QB=QB, seed=a)
                     for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    cfg = dict(R=4, RQ=16, CHUNK=16)
    o, lse = mod.fwd(q, k, v, idx, 0.3, cu_seqlens=cu, config=cfg)
    dq, dk, dv = mod.bwd(q, k, v, idx, o, lse, do, 0.3, cu_seqlens=cu, config=cfg)
    got, want = [], []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if a == b:
            continue
        qr, kr, vr = (x[:, a:b].double().requires_grad_() for x in (q, k, v))
        ro, rlse = select_attention(qr, kr, vr, idx[:, a:b], LS, 0.3, causal)
        ro.backward(do[:, a:b].double())
        got.append((o[:, a:b], lse[:, a:b], dq[:, a:b], dk[:, a:b], dv[:, a:b]))
        want.append((ro, rlse, qr.grad, kr.grad, vr.grad))
    _assert_close([rel_err(torch.cat([g[i] for g in got], 1), torch.cat([w[i] for w in want], 1))
                   for i in range(5)], 1e-5)


# ----------------------------------------------------------------------------- GPU

def _gpu_case(T, H, G, DQK, DV, LS, TOPK, dtype, idx_kind):
    errs, ref, reference, _ = run_case(1, T, H, G, DQK, DV, LS, TOPK, dtype, idx_kind=idx_kind, device="cuda")
    low = reference(dtype)                       # the reference in the same precision
    ref_errs = [rel_err(x, r) for x, r in zip(low, ref)]
    for n, e, re in zip(NAMES, errs, ref_errs):
        assert e < max(5e-3, 2 * re), f"{n}: kernel {e:.2e}, {dtype} reference {re:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T,H,G,DQK,DV,LS,TOPK,idx_kind", [
    pytest.param(4096, 2, 16, 128, 128, 64, 16, "meanpool", id="T4096-H2-G16-D128-LS64-K16"),
    pytest.param(4096, 1, 16, 192, 128, 64, 16, "forced", id="T4096-H1-G16-D192x128-LS64-K16"),
    pytest.param(2000, 2, 3, 64, 48, 48, 8, "random", id="T2000-H2-G3-D64x48-LS48-K8"),
    pytest.param(4096, 1, 1, 64, 64, 32, 16, "forced", id="T4096-H1-G1-D64-LS32-K16"),
])
def test_select_gpu(T, H, G, DQK, DV, LS, TOPK, idx_kind, dtype):
    _gpu_case(T, H, G, DQK, DV, LS, TOPK, dtype, idx_kind)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T,H,G,DQK,DV,LS,TOPK,causal,QB,kind,q_start,n_keys", [
    pytest.param(4096, 2, 16, 128, 128, 64, 16, False, 1, "random", 0, None, id="T4096-G16-full"),
    pytest.param(4096, 1, 16, 128, 128, 64, 16, True, 64, "groups", 0, None, id="T4096-G16-QB64"),
    pytest.param(2000, 2, 3, 64, 48, 48, 8, True, 16, "clean", 0, None, id="T2000-G3-QB16-clean"),
    pytest.param(4096, 1, 1, 64, 64, 32, 16, False, 2, "groups", 0, None, id="T4096-G1-full-QB2"),
    pytest.param(1024, 2, 16, 128, 128, 64, 16, True, 64, "groups", 2048, 4096, id="piece-QB64"),
    pytest.param(1000, 1, 4, 64, 64, 64, 16, False, 1, "random", 3000, 4000, id="piece-full"),
])
def test_select_reach_gpu(T, H, G, DQK, DV, LS, TOPK, causal, QB, kind, q_start, n_keys, dtype):
    """The second release on the GPU: causal = false, query_block, query pieces (bf16 / fp16)."""
    errs, ref, reference, _ = run_case(1, T, H, G, DQK, DV, LS, TOPK, dtype, idx_kind=kind, device="cuda",
                                       causal=causal, QB=QB, q_start=q_start, n_keys=n_keys)
    low = reference(dtype)
    ref_errs = [rel_err(x, r) for x, r in zip(low, ref)]
    for n, e, re in zip(NAMES, errs, ref_errs):
        assert e < max(5e-3, 2 * re), f"{n}: kernel {e:.2e}, {dtype} reference {re:.2e}"


def test_shared_rows_follow_the_selection():
    """R = 4 * minimum when neighbouring positions choose alike (few distinct blocks), else the
    minimum; short sequences never pay the host sync."""
    G, LS, TOPK, H, T = 16, 64, 16, 2, 16384
    mod = load_family("select.py.j2", G=G, DQK=64, DV=64, LS=LS, TOPK=TOPK)
    g = torch.Generator().manual_seed(0)
    t = torch.arange(T)
    # iid: every position its own random blocks among those before it
    iid = (torch.rand(1, T, H, TOPK, generator=g) * (t // LS + 1)[None, :, None, None]).long()
    # local: groups of 8 positions share one choice
    local = iid[:, (t // 8) * 8]
    assert mod._shared_rows(iid.int(), 1) == 1
    assert mod._shared_rows(local.int(), 1) == 4
    assert mod._shared_rows(local[:, :4096].int(), 1) == 1          # T < SHARE_MIN_T
    cfg = dict(mod.resolve_config(torch.empty(1, T, H * G, 64), "fwd", None), R=1, SHARE=True)
    cfg, plan = mod._rows_for(cfg, local.int(), lambda R: ("plan of", R))
    assert cfg["R"] == 1 and plan == ("plan of", 1)                  # CPU tensors: never decided
