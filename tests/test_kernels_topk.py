"""topk.py.j2: block scoring + top-k selection against the reference: exact indices where ties
are exact in float32, near ties (within rounding) decided either way elsewhere."""
import pytest
import torch

from kernel_utils import assert_near_ties, load_family, rand, ranked_scores, render_family
from nsa_dsl.semantics.reference import (block_scores_cmp, block_scores_mean_pool, compress_attention,
                               num_compressed_blocks, select_blocks_cmp, select_blocks_mean_pool)

HAS_CUDA = torch.cuda.is_available()


def _cmp_mod(G, D, L, S, LS, K, KF, KL):
    return load_family("topk.py.j2", G=G, DQK=D, L=L, STRIDE=S, LS=LS, TOPK=K,
                       KEEP_FIRST=KF, KEEP_LAST=KL, SCORE="cmp")


def _mp_mod(G, D, LS, K, KF, KL):
    return load_family("topk.py.j2", G=G, DQK=D, LS=LS, TOPK=K, KEEP_FIRST=KF, KEEP_LAST=KL,
                       SCORE="mean_pool")


def _cmp_inputs(B, T, H, G, D, L, S, dtype=torch.float32, device="cpu"):
    q = rand((B, T, H * G, D), dtype, 1, device)
    k_cmp = rand((B, num_compressed_blocks(T, L, S), H, D), dtype, 2, device)
    _, lse = compress_attention(q.double(), k_cmp.double(), k_cmp.double(), L, S, D ** -0.5)
    return q, k_cmp, lse.float()


def _assert_same(idx, ref):
    assert idx.dtype == torch.int32 and idx.shape == ref.shape
    bad = (idx != ref).any(-1)
    if bad.any():
        where = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{int(bad.sum())} rows differ; first at (b, t, h) = {where}: "
                             f"kernel {idx[where].tolist()} reference {ref[where].tolist()}")


# (B, T, H, G, D, L, STRIDE, LS, TOPK, KEEP_FIRST, KEEP_LAST)
CMP_CASES = [
    (1, 1, 2, 3, 32, 16, 16, 16, 2, 1, 0),      # T = 1
    (1, 15, 1, 2, 32, 16, 8, 8, 1, 0, 0),       # NC = 0: all scores 0, ties to the lower block
    (2, 100, 2, 3, 32, 32, 16, 64, 2, 1, 0),    # at most TOPK eligible: all chosen
    (1, 300, 2, 3, 48, 32, 16, 16, 4, 1, 2),    # the paper's overlap (1, 2, 2, 2, 1 with LS = 64: below)
    (1, 300, 1, 1, 32, 16, 16, 16, 5, 0, 0),    # L == STRIDE, TOPK not a power of two
    (1, 700, 1, 4, 32, 32, 16, 64, 3, 1, 1),    # the paper's l, d, l'
    (1, 700, 1, 4, 32, 32, 16, 16, 3, 1, 1),    # 44 blocks: several chunks, carried overlap
    (1, 300, 1, 16, 32, 32, 16, 32, 4, 2, 0),   # G = 16
    (1, 500, 1, 3, 32, 48, 16, 48, 3, 0, 2),    # A = C = 3 segments
    (1, 400, 1, 2, 32, 32, 16, 16, 16, 1, 2),   # TOPK = 16 of 25 blocks
    (1, 2300, 1, 4, 32, 32, 16, 64, 4, 1, 2),   # paper blocks, long enough for unmasked chunks
]


def _cmp_id(c):
    B, T, H, G, D, L, S, LS, K, KF, KL = c
    return f"B{B}-T{T}-H{H}-G{G}-D{D}-L{L}-S{S}-LS{LS}-K{K}-F{KF}-L{KL}"


# NI: insertion steps of the unsorted-buffer merge (0: the sorted buffer, rank merges only; 1:
# nearly every chunk past the first ranks too; 3: most late chunks insert)
NIS = [pytest.param(0, id="NI0"), pytest.param(1, id="NI1"), pytest.param(3, id="NI3")]


@pytest.mark.parametrize("ni", NIS)
@pytest.mark.parametrize("case", [pytest.param(c, id=_cmp_id(c)) for c in CMP_CASES])
def test_topk_cmp(case, ni):
    B, T, H, G, D, L, S, LS, K, KF, KL = case
    q, k_cmp, lse = _cmp_inputs(B, T, H, G, D, L, S)
    idx = _cmp_mod(G, D, L, S, LS, K, KF, KL).topk(q, k_cmp, lse, D ** -0.5, config={"NI": ni})
    ref = select_blocks_cmp(q.double(), k_cmp.double(), lse.double(), D ** -0.5, L, S, LS, K, KF, KL)
    scores = block_scores_cmp(q.double(), k_cmp.double(), lse.double(), D ** -0.5, L, S, LS)
    assert_near_ties(idx, ref, scores, LS, KF, KL)       # fp32 rounding decides near ties


def test_topk_cmp_small_tiles(monkeypatch):
    """Several compressed tiles per chunk, the carry taken on the chunk's last tile only."""
    case = (1, 400, 1, 2, 32, 16, 8, 16, 4, 1, 2)       # 2 tiles per chunk of 16 blocks, 2 chunks
    B, T, H, G, D, L, S, LS, K, KF, KL = case
    mod = _cmp_mod(G, D, L, S, LS, K, KF, KL)
    monkeypatch.setattr(mod, "CONFIG", (8, 16, 16, 1, False))
    q, k_cmp, lse = _cmp_inputs(B, T, H, G, D, L, S)
    idx = mod.topk(q, k_cmp, lse, D ** -0.5)
    ref = select_blocks_cmp(q.double(), k_cmp.double(), lse.double(), D ** -0.5, L, S, LS, K, KF, KL)
    assert_near_ties(idx, ref, block_scores_cmp(q.double(), k_cmp.double(), lse.double(), D ** -0.5, L, S, LS),
                     LS, KF, KL)


@pytest.mark.parametrize("ni", NIS)
@pytest.mark.parametrize("keep", [(0, 0), (1, 1)], ids=["F0-L0", "F1-L1"])
def test_topk_cmp_exact_ties(keep, ni):
    """q = 0 and lse = 0 make every visible p exactly 1: scores are integer overlap counts and
    most blocks tie exactly; the lower block must win everywhere."""
    B, T, H, G, D, L, S, LS, K = 1, 700, 1, 3, 32, 32, 16, 16, 4
    q, k_cmp, lse = _cmp_inputs(B, T, H, G, D, L, S)
    q = torch.zeros_like(q)
    lse = torch.where(torch.isfinite(lse), 0.0, lse)
    idx = _cmp_mod(G, D, L, S, LS, K, *keep).topk(q, k_cmp, lse, D ** -0.5, config={"NI": ni})
    _assert_same(idx, select_blocks_cmp(q.double(), k_cmp.double(), lse.double(), D ** -0.5,
                                        L, S, LS, K, *keep))


# (B, T, H, G, D, LS, TOPK, KEEP_FIRST, KEEP_LAST)
MP_CASES = [
    (1, 1, 1, 3, 32, 16, 2, 1, 0),
    (1, 15, 2, 1, 32, 4, 2, 0, 1),
    (1, 300, 2, 3, 48, 16, 4, 1, 2),
    (1, 300, 1, 1, 32, 16, 5, 0, 0),
    (2, 333, 1, 16, 32, 32, 3, 0, 2),
    (1, 700, 1, 4, 64, 16, 16, 1, 2),           # 44 blocks, TOPK = 16
]


def _mp_id(c):
    B, T, H, G, D, LS, K, KF, KL = c
    return f"B{B}-T{T}-H{H}-G{G}-D{D}-LS{LS}-K{K}-F{KF}-L{KL}"


@pytest.mark.parametrize("ni", NIS)
@pytest.mark.parametrize("case", [pytest.param(c, id=_mp_id(c)) for c in MP_CASES])
def test_topk_mean_pool(case, ni):
    B, T, H, G, D, LS, K, KF, KL = case
    q = rand((B, T, H * G, D), torch.float32, 1)
    k = rand((B, T, H, D), torch.float32, 2)
    idx = _mp_mod(G, D, LS, K, KF, KL).topk_mean_pool(q, k, config={"NI": ni})
    ref = select_blocks_mean_pool(q.double(), k.double(), LS, K, KF, KL)
    assert_near_ties(idx, ref, block_scores_mean_pool(q.double(), k.double(), LS), LS, KF, KL)


@pytest.mark.parametrize("ni", NIS)
@pytest.mark.parametrize("keep", [(0, 0), (1, 2)], ids=["F0-L0", "F1-L2"])
def test_topk_mean_pool_equal_keys(keep, ni):
    """All keys equal (integer-valued, so every score is exact): every complete block ties."""
    B, T, H, G, D, LS, K = 1, 600, 2, 3, 32, 16, 4
    q = rand((B, T, H * G, D), torch.float32, 1).round()
    k = rand((B, 1, H, D), torch.float32, 2).round().expand(B, T, H, D).contiguous()
    idx = _mp_mod(G, D, LS, K, *keep).topk_mean_pool(q, k, config={"NI": ni})
    _assert_same(idx, select_blocks_mean_pool(q.double(), k.double(), LS, K, *keep))


def test_topk_rendering_specializes():
    """One store (the indices: no score tensor is written); code only for the features in use."""
    paper = render_family("topk.py.j2", G=16, DQK=128, L=32, STRIDE=16, LS=64, TOPK=16,
                          KEEP_FIRST=1, KEEP_LAST=2, SCORE="cmp")
    assert paper.count("tl.store(") == 1
    assert "b_carry" in paper and "m_forced" in paper and "only the best TOPK slots" not in paper
    plain = render_family("topk.py.j2", G=4, DQK=64, L=16, STRIDE=16, LS=64, TOPK=5,
                          KEEP_FIRST=0, KEEP_LAST=0, SCORE="cmp")
    assert "b_carry" not in plain and "m_forced" not in plain and "KEEP_LAST)" not in plain
    assert "only the best TOPK slots" in plain                            # TOPK = 5: padded buffer slots
    mp = render_family("topk.py.j2", G=1, DQK=48, LS=64, TOPK=4, KEEP_FIRST=1, KEEP_LAST=0, SCORE="mean_pool")
    assert mp.count("tl.store(") == 1 and "topk_cmp_kernel" not in mp and "b_lse" not in mp
    assert "(o_j[None, :] < KEEP_FIRST)" in mp and "o_own[:, None] - KEEP_LAST" not in mp


# ----------------------------------------------------------------------------- second release
# causal = false, query_block = QB (aligned groups of QB positions share one choice), query pieces
# (q_start: q holds positions q_start .. of a longer sequence; OFFSETS kernels)

def _reach_cmp(G, D, L, S, LS, K, KF, KL, causal, QB, **extra):
    return load_family("topk.py.j2", G=G, DQK=D, L=L, STRIDE=S, LS=LS, TOPK=K, KEEP_FIRST=KF, KEEP_LAST=KL,
                       SCORE="cmp", CAUSAL=causal, QB=QB, **extra)


def _reach_mp(G, D, LS, K, KF, KL, causal, QB, **extra):
    return load_family("topk.py.j2", G=G, DQK=D, LS=LS, TOPK=K, KEEP_FIRST=KF, KEEP_LAST=KL,
                       SCORE="mean_pool", CAUSAL=causal, QB=QB, **extra)


def _cmp_piece(B, T, H, G, D, L, S, causal, q_start, Tq, dtype=torch.float32, device="cpu"):
    """q's rows q_start .. q_start + Tq of a T-key sequence, its compressed keys, and lse over them."""
    q = rand((B, T, H * G, D), dtype, 1, device)[:, q_start:q_start + Tq]
    k_cmp = rand((B, num_compressed_blocks(T, L, S), H, D), dtype, 2, device)
    _, lse = compress_attention(q.double(), k_cmp.double(), k_cmp.double(), L, S, D ** -0.5, causal, q_start=q_start)
    return q, k_cmp, lse.float()


def _check_cmp(idx, q, k_cmp, lse, L, S, LS, K, KF, KL, causal, QB, q_start=0, n_keys=None, rtol=1e-5):
    scale = q.shape[-1] ** -0.5
    ref = select_blocks_cmp(q.double(), k_cmp.double(), lse.double(), scale, L, S, LS, K, KF, KL, causal, QB,
                            q_start=q_start, n_keys=n_keys)
    scores = ranked_scores(q, k_cmp, LS, lse=lse, scale=scale, block=L, stride=S, causal=causal, query_block=QB,
                           q_start=q_start, n_keys=n_keys)
    assert_near_ties(idx, ref, scores, LS, KF, KL, rtol, causal=causal, query_block=QB, q_start=q_start, n_keys=n_keys)


def _check_mp(idx, q, k, LS, K, KF, KL, causal, QB, q_start=0, rtol=1e-5):
    ref = select_blocks_mean_pool(q.double(), k.double(), LS, K, KF, KL, causal, QB, q_start=q_start)
    scores = ranked_scores(q, k, LS, causal=causal, query_block=QB, q_start=q_start)
    assert_near_ties(idx, ref, scores, LS, KF, KL, rtol, causal=causal, query_block=QB, q_start=q_start,
                     n_keys=k.shape[1])


# (B, T, H, G, D, L, STRIDE, LS, TOPK, KEEP_FIRST, KEEP_LAST, causal, QB, config)
REACH_CMP = [
    (1, 100, 2, 3, 48, 32, 16, 16, 4, 1, 2, False, 1, None),    # every block eligible, keep_last before t's own only
    (1, 130, 1, 16, 32, 32, 16, 32, 3, 1, 1, False, 1, {"NI": 3}),   # a partial last block, the unsorted buffer
    (2, 17, 1, 3, 32, 16, 16, 16, 2, 1, 1, True, 2, None),      # groups of 2, T odd
    (1, 130, 2, 1, 32, 32, 16, 16, 4, 1, 2, True, 16, None),    # 8 groups of 16 per tile
    (1, 130, 1, 16, 32, 32, 16, 16, 4, 1, 2, True, 64, None),   # a group in 8 sub-tiles
    (1, 100, 1, 3, 48, 32, 16, 64, 2, 0, 1, False, 16, None),
    (1, 1, 1, 3, 32, 16, 16, 16, 2, 1, 0, False, 64, None),      # T = 1
    (1, 100, 1, 3, 32, 48, 16, 48, 3, 0, 2, True, 64, None),    # A = C = 3: the carry, 2 sub-tiles
    (1, 130, 1, 4, 32, 32, 16, 32, 3, 1, 1, True, 16, {"BN": 16}),   # tiles smaller than a chunk's blocks
]


def _reach_id(c):
    B, T, H, G, D, L, S, LS, K, KF, KL, causal, QB, cfg = c
    return f"B{B}-T{T}-H{H}-G{G}-L{L}-S{S}-LS{LS}-K{K}-F{KF}-L{KL}-{'causal' if causal else 'full'}-QB{QB}" \
        + ("".join(f"-{k}{v}" for k, v in cfg.items()) if cfg else "")


@pytest.mark.parametrize("case", [pytest.param(c, id=_reach_id(c)) for c in REACH_CMP])
def test_topk_cmp_reach(case):
    B, T, H, G, D, L, S, LS, K, KF, KL, causal, QB, cfg = case
    q, k_cmp, lse = _cmp_piece(B, T, H, G, D, L, S, causal, 0, T)
    idx = _reach_cmp(G, D, L, S, LS, K, KF, KL, causal, QB).topk(q, k_cmp, lse, D ** -0.5, config=cfg)
    _check_cmp(idx, q, k_cmp, lse, L, S, LS, K, KF, KL, causal, QB)


# (B, T, H, G, D, LS, TOPK, KEEP_FIRST, KEEP_LAST, causal, QB)
REACH_MP = [
    (1, 100, 2, 3, 48, 16, 4, 1, 2, False, 1),                  # every block scored, the last one partial
    (1, 130, 1, 16, 32, 32, 3, 0, 2, False, 1),
    (2, 17, 1, 3, 32, 16, 2, 1, 1, True, 2),
    (1, 130, 2, 1, 32, 16, 4, 1, 2, True, 16),
    (1, 130, 1, 16, 32, 16, 4, 1, 2, False, 64),
    (1, 1, 1, 3, 32, 16, 2, 1, 0, True, 64),
]


@pytest.mark.parametrize("case", [pytest.param(c, id="-".join(map(str, c))) for c in REACH_MP])
def test_topk_mean_pool_reach(case):
    B, T, H, G, D, LS, K, KF, KL, causal, QB = case
    q = rand((B, T, H * G, D), torch.float32, 1)
    k = rand((B, T, H, D), torch.float32, 2)
    idx = _reach_mp(G, D, LS, K, KF, KL, causal, QB).topk_mean_pool(q, k)
    _check_mp(idx, q, k, LS, K, KF, KL, causal, QB)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_topk_groups_exact_ties(causal):
    """q = 0 and lse = 0: every seen compressed block has p = 1, a group's scores are integer
    counts times its positions, and many blocks tie exactly: the lower block must win."""
    B, T, H, G, D, L, S, LS, K, QB = 1, 130, 1, 3, 32, 32, 16, 16, 4, 16
    q, k_cmp, lse = _cmp_piece(B, T, H, G, D, L, S, causal, 0, T)
    q, lse = torch.zeros_like(q), torch.where(torch.isfinite(lse), 0.0, lse)
    idx = _reach_cmp(G, D, L, S, LS, K, 1, 1, causal, QB).topk(q, k_cmp, lse, D ** -0.5)
    _assert_same(idx, select_blocks_cmp(q.double(), k_cmp.double(), lse.double(), D ** -0.5, L, S, LS, K, 1, 1,
                                        causal, QB))


@pytest.mark.parametrize("causal,QB", [(True, 1), (False, 1), (True, 16), (False, 16)],
                         ids=["causal-QB1", "full-QB1", "causal-QB16", "full-QB16"])
def test_topk_pieces(causal, QB):
    """q_start pieces (OFFSETS kernels) give the rows of the whole call, and the reference's choice
    at q_start: cmp with lse over the piece's rows, mean_pool over all the keys."""
    B, T, H, G, D, L, S, LS, K, KF, KL = 1, 130, 1, 3, 32, 32, 16, 16, 3, 1, 1
    cmp = _reach_cmp(G, D, L, S, LS, K, KF, KL, causal, QB, OFFSETS=True)
    mp = _reach_mp(G, D, LS, K, KF, KL, causal, QB, OFFSETS=True)
    q, k_cmp, lse = _cmp_piece(B, T, H, G, D, L, S, causal, 0, T)
    k = rand((B, T, H, D), torch.float32, 2)
    whole_c, whole_m = cmp.topk(q, k_cmp, lse, D ** -0.5), mp.topk_mean_pool(q, k)
    for a, b in ((0, 48), (48, 112), (112, 130)):
        idx = cmp.topk(q[:, a:b], k_cmp, lse[:, a:b], D ** -0.5, q_start=a, n_keys=T)
        _assert_same(idx, whole_c[:, a:b])
        _check_cmp(idx, q[:, a:b], k_cmp, lse[:, a:b], L, S, LS, K, KF, KL, causal, QB, q_start=a, n_keys=T)
        idx = mp.topk_mean_pool(q[:, a:b], k, q_start=a)
        _assert_same(idx, whole_m[:, a:b])
        _check_mp(idx, q[:, a:b], k, LS, K, KF, KL, causal, QB, q_start=a)


def test_topk_rendering_reach():
    """Code only for what the plan asks: no causal masks when not causal, group sub-tiles and
    per-group stores with QB, the piece's offsets with OFFSETS."""
    v = dict(G=4, DQK=64, L=32, STRIDE=16, LS=64, TOPK=8, KEEP_FIRST=1, KEEP_LAST=2, SCORE="cmp")
    causal, full = render_family("topk.py.j2", **v), render_family("topk.py.j2", **v, CAUSAL=False)
    assert "<= o_t[:, None]" in causal and "<= o_t[:, None]" not in full and "(o_j < n_sel)" in full
    assert "T0" not in causal and "range(NSUB)" not in causal
    groups = render_family("topk.py.j2", **v, QB=16, OFFSETS=True)
    assert "for i_sub in range(NSUB)" in groups and "for i_s in range(QB)" in groups and "o_t - T0" in groups
    mp = render_family("topk.py.j2", G=4, DQK=64, LS=64, TOPK=8, KEEP_FIRST=1, KEEP_LAST=2, SCORE="mean_pool",
                       QB=16, CAUSAL=False)
    assert "o_gr" in mp and "float(\"-inf\")" not in mp.split("def topk_mean_pool_kernel")[1]


def test_topk_pieces_refused():
    """Pieces need OFFSETS kernels, a start on a group boundary, keys enough, and no packing."""
    G, D, LS, K = 1, 32, 16, 2
    q, k = rand((1, 40, G, D)), rand((1, 64, 1, D))
    with pytest.raises(ValueError, match="OFFSETS"):
        _reach_mp(G, D, LS, K, 0, 0, True, 1).topk_mean_pool(q, k)
    mod = _reach_mp(G, D, LS, K, 0, 0, True, 16, OFFSETS=True)
    with pytest.raises(ValueError, match="multiple of 16"):
        mod.topk_mean_pool(q[:, :8], k, q_start=8)
    with pytest.raises(ValueError, match="keys hold 64"):
        mod.topk_mean_pool(q, k, q_start=32)
    packed = _reach_mp(G, D, LS, K, 0, 0, True, 1, VARLEN=True)
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed.topk_mean_pool(q, q[..., :1, :].expand(1, 40, 1, D).contiguous(), torch.tensor([0, 40]), q_start=8)


@pytest.mark.parametrize("causal,QB", [(False, 1), (True, 16), (False, 64)], ids=["full-QB1", "causal-QB16", "full-QB64"])
def test_topk_packed_reach(causal, QB):
    """Packed sequences (VARLEN): each sequence chooses as if alone (groups restart with it)."""
    from nsa_dsl.semantics.varlen import compressed_cu_seqlens
    G, D, L, S, LS, K, KF, KL = 3, 32, 32, 16, 16, 3, 1, 1
    cu = torch.tensor([0, 17, 17, 117, 130], dtype=torch.int32)
    T = int(cu[-1])
    q, k = rand((1, T, G, D), torch.float32, 1), rand((1, T, 1, D), torch.float32, 2)
    ccu = compressed_cu_seqlens(cu, L, S)
    k_cmp = rand((1, int(ccu[-1]), 1, D), torch.float32, 3)
    lse = torch.cat([compress_attention(q[:, a:b].double(), k_cmp[:, c:e].double(), k_cmp[:, c:e].double(), L, S,
                                        D ** -0.5, causal)[1] for a, b, c, e in zip(cu[:-1], cu[1:], ccu[:-1], ccu[1:])
                     if a < b], 1)
    idx_c = _reach_cmp(G, D, L, S, LS, K, KF, KL, causal, QB, VARLEN=True).topk(q, k_cmp, lse.float(), D ** -0.5, cu)
    idx_m = _reach_mp(G, D, LS, K, KF, KL, causal, QB, VARLEN=True).topk_mean_pool(q, k, cu)
    for a, b, c, e in zip(cu[:-1].tolist(), cu[1:].tolist(), ccu[:-1].tolist(), ccu[1:].tolist()):
        if a == b:
            continue
        _check_cmp(idx_c[:, a:b], q[:, a:b], k_cmp[:, c:e], lse[:, a:b].float(), L, S, LS, K, KF, KL, causal, QB)
        _check_mp(idx_m[:, a:b], q[:, a:b], k[:, a:b], LS, K, KF, KL, causal, QB)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [pytest.param(c, id=_cmp_id(c)) for c in [
    (1, 4096, 2, 16, 128, 32, 16, 64, 16, 1, 2),
    (2, 3001, 1, 3, 64, 32, 16, 32, 8, 0, 0),
]])
@pytest.mark.parametrize("ni", [0, 2], ids=["NI0", "NI2"])   # NI = 2: the heuristic from 48 chunks on
def test_topk_cmp_gpu(case, dtype, ni):
    B, T, H, G, D, L, S, LS, K, KF, KL = case
    q, k_cmp, lse = _cmp_inputs(B, T, H, G, D, L, S, dtype, "cuda")
    scale = D ** -0.5
    idx = _cmp_mod(G, D, L, S, LS, K, KF, KL).topk(q, k_cmp, lse, scale, config={"NI": ni})
    ref = select_blocks_cmp(q.double(), k_cmp.double(), lse.double(), scale, L, S, LS, K, KF, KL)
    scores = block_scores_cmp(q.double(), k_cmp.double(), lse.double(), scale, L, S, LS)
    assert_near_ties(idx, ref, scores, LS, KF, KL, 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [pytest.param(c, id=_mp_id(c)) for c in [
    (1, 4096, 2, 16, 128, 64, 16, 1, 2),
    (2, 3001, 1, 3, 192, 32, 8, 0, 0),
]])
def test_topk_mean_pool_gpu(case, dtype):
    B, T, H, G, D, LS, K, KF, KL = case
    q = rand((B, T, H * G, D), dtype, 1, "cuda")
    k = rand((B, T, H, D), dtype, 2, "cuda")
    idx = _mp_mod(G, D, LS, K, KF, KL).topk_mean_pool(q, k)
    ref = select_blocks_mean_pool(q.double(), k.double(), LS, K, KF, KL)
    assert_near_ties(idx, ref, block_scores_mean_pool(q.double(), k.double(), LS), LS, KF, KL, 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [pytest.param(c, id=_reach_id(c)) for c in [
    (1, 4096, 2, 16, 128, 32, 16, 64, 16, 1, 2, False, 1, None),
    (1, 4096, 1, 16, 128, 32, 16, 64, 16, 1, 2, True, 64, None),
    (2, 3001, 1, 3, 64, 32, 16, 32, 8, 0, 0, False, 16, None),
    (1, 4096, 2, 1, 64, 32, 16, 64, 16, 1, 2, True, 2, None),
]])
def test_topk_cmp_reach_gpu(case, dtype):
    B, T, H, G, D, L, S, LS, K, KF, KL, causal, QB, cfg = case
    q, k_cmp, lse = _cmp_piece(B, T, H, G, D, L, S, causal, 0, T, dtype, "cuda")
    idx = _reach_cmp(G, D, L, S, LS, K, KF, KL, causal, QB).topk(q, k_cmp, lse, D ** -0.5, config=cfg)
    _check_cmp(idx, q, k_cmp, lse, L, S, LS, K, KF, KL, causal, QB, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [pytest.param(c, id="-".join(map(str, c))) for c in [
    (1, 4096, 2, 16, 128, 64, 16, 1, 2, False, 1),
    (1, 4096, 1, 16, 128, 64, 16, 1, 2, True, 64),
    (2, 3001, 1, 3, 192, 32, 8, 0, 0, False, 16),
]])
def test_topk_mean_pool_reach_gpu(case, dtype):
    B, T, H, G, D, LS, K, KF, KL, causal, QB = case
    q = rand((B, T, H * G, D), dtype, 1, "cuda")
    k = rand((B, T, H, D), dtype, 2, "cuda")
    idx = _reach_mp(G, D, LS, K, KF, KL, causal, QB).topk_mean_pool(q, k)
    _check_mp(idx, q, k, LS, K, KF, KL, causal, QB, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("causal,QB", [(True, 64), (False, 1)], ids=["causal-QB64", "full-QB1"])
def test_topk_pieces_gpu(causal, QB):
    """A piece of 1024 queries from position 2048 of 4096 keys (bf16) against the reference there."""
    B, T, H, G, D, L, S, LS, K, KF, KL = 1, 4096, 2, 16, 128, 32, 16, 64, 16, 1, 2
    a, b = 2048, 3072
    q, k_cmp, lse = _cmp_piece(B, T, H, G, D, L, S, causal, a, b - a, torch.bfloat16, "cuda")
    idx = _reach_cmp(G, D, L, S, LS, K, KF, KL, causal, QB, OFFSETS=True).topk(q, k_cmp, lse, D ** -0.5,
                                                                                 q_start=a, n_keys=T)
    _check_cmp(idx, q, k_cmp, lse, L, S, LS, K, KF, KL, causal, QB, q_start=a, n_keys=T, rtol=2e-2)
    qm, k = rand((B, T, H * G, D), torch.bfloat16, 1, "cuda"), rand((B, T, H, D), torch.bfloat16, 2, "cuda")
    idx = _reach_mp(G, D, LS, K, KF, KL, causal, QB, OFFSETS=True).topk_mean_pool(qm[:, a:b], k, q_start=a)
    _check_mp(idx, qm[:, a:b], k, LS, K, KF, KL, causal, QB, q_start=a, rtol=2e-2)
