"""topk.py.j2: block scoring + top-k selection against the reference: exact indices where ties
are exact in float32, near ties (within rounding) decided either way elsewhere."""
import pytest
import torch

from kernel_utils import assert_near_ties, load_family, rand, render_family
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
