"""DSA kernels (templates/indexer.py.j2, gather.py.j2, index_loss.py.j2) against the float64
reference: the indexer's token choice (exact where ties are exact, near ties otherwise), the
gather attention's output, lse and gradients, the index loss and its gradients to q_idx, k_idx,
w_idx; causal and not, odd T, G = 1, 3, 16, Dqk != Dv, packed sequences.

CPU: the kernels run through Triton's interpreter (float32 at 1e-5, a float16 set at 5e-3).
GPU (``pytest -m gpu``): bf16 / fp16 at longer lengths.
"""
from __future__ import annotations

import pytest
import torch

from kernel_utils import load_family, rand, rel_err, run_sm90_check
from nsa_dsl.codegen.plan import indexer_vars
from nsa_dsl.semantics import reference as S

HAS_CUDA = torch.cuda.is_available()


def indexer(HI, DI, K, kf, kl, causal, varlen=False):
    return load_family("indexer.py.j2", **indexer_vars(HI, DI), TOPK=K, KEEP_FIRST=kf, KEEP_LAST=kl,
                       CAUSAL=causal, **({"VARLEN": True} if varlen else {}))


def gather(G, DQK, DV, K, causal, varlen=False):
    return load_family("gather.py.j2", G=G, DQK=DQK, DV=DV, TOPK=K, CAUSAL=causal, **({"VARLEN": True} if varlen else {}))


def loss_family(G, DQK, HI, DI, K, causal, varlen=False):
    from nsa_dsl.codegen.plan import tile_vars
    t = tile_vars(G, DQK, DQK)
    return load_family("index_loss.py.j2", G=G, GP=t["GP"], DQK=DQK, BDK=t["BDK"], **indexer_vars(HI, DI), TOPK=K,
                       CAUSAL=causal, **({"VARLEN": True} if varlen else {}))


def index_inputs(B, T, HI, DI, seed=0, device="cpu"):
    """q_idx, k_idx, w_idx (signed weights: scores of both signs)."""
    return (rand((B, T, HI, DI), seed=seed, device=device, scale=0.5), rand((B, T, DI), seed=seed + 1, device=device),
            rand((B, T, HI), seed=seed + 2, device=device))


def assert_tokens(idx, ref, scores, keep_first, keep_last, causal, rtol=1e-5):
    """``idx`` equals the float64 reference ``ref`` except between tokens whose float64 scores
    ``[B, T, 1, T]`` tie within ``rtol`` of the row's largest |score| (rounding decides those);
    the number chosen and the forced tokens agree everywhere."""
    assert idx.shape == ref.shape and idx.dtype == torch.int32, (idx.shape, ref.shape, idx.dtype)
    idx, ref, scores = idx.cpu(), ref.cpu(), scores.double().cpu()
    T = scores.shape[-1]
    for b, t, h in (idx != ref).any(-1).nonzero().tolist():
        got, want = idx[b, t, h], ref[b, t, h]
        assert (got >= 0).sum() == (want >= 0).sum(), (t, got.tolist(), want.tolist())
        g, w = got[got >= 0].long(), want[want >= 0].long()
        assert torch.all(g[1:] > g[:-1]) and int(g.max()) <= (t if causal else T - 1), (t, got.tolist())
        forced = lambda s: (s < keep_first) | ((s > t - keep_last) & (s <= t))
        assert torch.equal(g[forced(g)], w[forced(w)]), (t, got.tolist(), want.tolist())
        s = scores[b, t, 0]
        sg, sw = s[g[~forced(g)]].sort().values, s[w[~forced(w)]].sort().values
        tol = rtol * s[torch.isfinite(s)].abs().max().clamp(min=1e-30)
        assert torch.all((sg - sw).abs() <= tol), (t, got.tolist(), want.tolist())


def reference_tokens(qi, ki, wi, K, kf, kl, causal):
    q64, k64, w64 = (x.double() for x in (qi, ki, wi))
    return (S.select_tokens_indexer(q64, k64, w64, K, kf, kl, causal),
            S.block_scores_indexer(q64, k64, w64, causal))


def given_tokens(B, T, K, causal, seed=0):
    """A cleaned caller-style selection [B, T, 1, K]: random entries, some out of range or in the
    future (dropped), repeats, -1 padding."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(-2, T + 3, (B, T, 1, K), generator=g)
    return S.clean_indices(raw, T, 1, causal)


# ----------------------------------------------------------------------------- the indexer's choice

INDEXER_CASES = [  # B, T, HI, DI, K, keep_first, keep_last
    (1, 1, 1, 16, 4, 1, 2),
    (2, 17, 3, 16, 5, 1, 2),
    (1, 100, 4, 32, 9, 0, 0),
    (1, 100, 2, 48, 128, 1, 1),      # K > T: every eligible token; DI padded to 64
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("B, T, HI, DI, K, kf, kl", INDEXER_CASES, ids=[str(c) for c in INDEXER_CASES])
def test_indexer_choice_matches_reference(B, T, HI, DI, K, kf, kl, causal):
    qi, ki, wi = index_inputs(B, T, HI, DI, seed=T + K)
    mod = indexer(HI, DI, K, kf, kl, causal)
    idx = mod.topk(qi, ki, wi)
    ref, scores = reference_tokens(qi, ki, wi, K, kf, kl, causal)
    assert_tokens(idx, ref, scores, kf, kl, causal)


def test_indexer_chunks_and_exact_ties():
    """A small BUFFER walks many chunks (causal chunks grow as their keys do); small integers make
    every score exact in any precision and order of summation, and keys repeated at several
    positions tie exactly: the lower position wins."""
    B, T, HI, DI, K = 2, 40, 2, 16, 6
    g = torch.Generator().manual_seed(3)
    qi, wi = torch.randint(-3, 4, (B, T, HI, DI), generator=g).float(), torch.randint(-3, 4, (B, T, HI), generator=g).float()
    ki = torch.randint(-3, 4, (B, 7, DI), generator=g).float()[:, torch.arange(T) % 7].contiguous()   # 7 keys, repeated
    for causal in (True, False):
        mod = indexer(HI, DI, K, 1, 1, causal)
        ref = S.select_tokens_indexer(qi.double(), ki.double(), wi.double(), K, 1, 1, causal)
        assert torch.equal(mod.topk(qi, ki, wi), ref)
        assert torch.equal(mod.topk(qi, ki, wi, config={"BUFFER": 300, "BN": 16}), ref)


def test_indexer_float16():
    B, T, HI, DI, K = 1, 33, 4, 32, 7
    qi, ki, wi = index_inputs(B, T, HI, DI, seed=5)
    mod = indexer(HI, DI, K, 1, 2, True)
    idx = mod.topk(*(x.half() for x in (qi, ki, wi)))
    ref, scores = reference_tokens(*(x.half() for x in (qi, ki, wi)), K, 1, 2, True)
    assert_tokens(idx, ref, scores, 1, 2, True, rtol=2e-3)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_indexer_packed_sequences(causal):
    cu = torch.tensor([0, 5, 5, 19, 30], dtype=torch.int32)
    HI, DI, K = 2, 16, 6
    qi, ki, wi = index_inputs(1, 30, HI, DI, seed=11)
    idx = indexer(HI, DI, K, 1, 1, causal, varlen=True).topk(qi, ki, wi, cu, config={"BUFFER": 64})
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if a < b:
            ref = S.select_tokens_indexer(qi[:, a:b].double(), ki[:, a:b].double(), wi[:, a:b].double(), K, 1, 1, causal)
            assert torch.equal(idx[:, a:b], ref), (a, b)


# ----------------------------------------------------------------------------- the gather attention

GATHER_CASES = [  # B, T, H, G, DQK, DV, K
    (1, 1, 1, 1, 16, 16, 4),
    (2, 17, 2, 3, 16, 32, 5),
    (1, 100, 1, 16, 32, 16, 24),
]


def run_gather(B, T, H, G, DQK, DV, K, causal, dtype=torch.float32, idx=None, seed=0):
    q = rand((B, T, H * G, DQK), seed=seed + 1)
    k = rand((B, T, H, DQK), seed=seed + 2)
    v = rand((B, T, H, DV), seed=seed + 3)
    do = rand((B, T, H * G, DV), seed=seed + 4)
    if idx is None:
        idx = given_tokens(B, T, K, causal, seed=seed)
    scale = DQK ** -0.5
    mod = gather(G, DQK, DV, K, causal)
    qx, kx, vx, dox = (x.to(dtype) for x in (q, k, v, do))
    o, lse = mod.fwd(qx, kx, vx, idx, scale)
    dq, dk, dv = mod.bwd(qx, kx, vx, idx, o, lse, dox, scale)
    qr, kr, vr = (x.double().requires_grad_() for x in (qx, kx, vx))
    ro, rlse = S.select_attention(qr, kr, vr, idx, 1, scale, causal)
    ro.backward(dox.double())
    return [rel_err(x, r) for x, r in zip((o, lse, dq, dk, dv), (ro, rlse, qr.grad, kr.grad, vr.grad))]


# the long case runs causal only (the interpreter's time): T = 1 and 17 and packed cover causal = false
GATHER_RUNS = [(*c, causal) for c in GATHER_CASES for causal in (True, False) if causal or c[1] < 100]


@pytest.mark.parametrize("B, T, H, G, DQK, DV, K, causal", GATHER_RUNS, ids=[str(c) for c in GATHER_RUNS])
def test_gather_attention_matches_reference(B, T, H, G, DQK, DV, K, causal):
    errs = run_gather(B, T, H, G, DQK, DV, K, causal, seed=T)
    assert max(errs) < 1e-5, errs


def test_gather_attention_of_the_indexer_choice_float16():
    """The indexer's own choice (every list full once t >= K), fp16 inputs."""
    B, T, H, G, D, K = 1, 40, 2, 4, 32, 8
    qi, ki, wi = index_inputs(B, T, 2, 16, seed=2)
    idx = S.select_tokens_indexer(qi.double(), ki.double(), wi.double(), K, 1, 2)
    errs = run_gather(B, T, H, G, D, D, K, True, dtype=torch.float16, idx=idx)
    assert max(errs) < 5e-3, errs


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gather_packed_sequences(causal):
    cu = torch.tensor([0, 5, 5, 19, 30], dtype=torch.int32)
    T, H, G, DQK, DV, K = 30, 1, 2, 16, 32, 6
    q, k, v, do = rand((1, T, H * G, DQK), seed=1), rand((1, T, H, DQK), seed=2), rand((1, T, H, DV), seed=3), \
        rand((1, T, H * G, DV), seed=4)
    idx = torch.cat([given_tokens(1, b - a, K, causal, seed=a) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    mod = gather(G, DQK, DV, K, causal, varlen=True)
    o, lse = mod.fwd(q, k, v, idx, 0.25, cu_seqlens=cu)
    dq, dk, dv = mod.bwd(q, k, v, idx, o, lse, do, 0.25, cu_seqlens=cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if a == b:
            continue
        qr, kr, vr = (x[:, a:b].double().requires_grad_() for x in (q, k, v))
        ro, rlse = S.select_attention(qr, kr, vr, idx[:, a:b], 1, 0.25, causal)
        ro.backward(do[:, a:b].double())
        for x, r in zip((o, lse, dq, dk, dv), (ro, rlse, qr.grad, kr.grad, vr.grad)):
            assert rel_err(x[:, a:b], r) < 1e-5, (a, b)


def test_gather_dq_adds_to_other_branches():
    """dq_acc (the op's one-node backward): the gradient is added to what the buffer holds."""
    B, T, H, G, D, K = 1, 9, 1, 2, 16, 4
    q, k, v, do = rand((B, T, H * G, D), seed=1), rand((B, T, H, D), seed=2), rand((B, T, H, D), seed=3), \
        rand((B, T, H * G, D), seed=4)
    idx = given_tokens(B, T, K, True)
    mod = gather(G, D, D, K, True)
    o, lse = mod.fwd(q, k, v, idx, 0.25)
    dq = mod.bwd(q, k, v, idx, o, lse, do, 0.25)[0]
    acc = rand(q.shape, seed=9)
    dq2 = mod.bwd(q, k, v, idx, o, lse, do, 0.25, dq_acc=acc.clone())[0]
    assert rel_err(dq2, dq + acc) < 1e-6


# ----------------------------------------------------------------------------- the index loss

LOSS_CASES = [  # B, T, H, G, DQK, HI, DI, K
    (1, 1, 1, 1, 16, 1, 16, 4),
    (2, 17, 2, 3, 16, 3, 16, 5),
    (1, 60, 1, 16, 32, 4, 48, 12),
]


def run_loss(B, T, H, G, DQK, HI, DI, K, causal, idx=None, seed=0, cu=None):
    q, k, v = rand((B, T, H * G, DQK), seed=seed + 1), rand((B, T, H, DQK), seed=seed + 2), rand((B, T, H, DQK), seed=seed + 3)
    qi, ki, wi = index_inputs(B, T, HI, DI, seed=seed + 4)
    dl = rand((B, T), seed=seed + 8)
    scale = DQK ** -0.5
    if idx is None:
        idx = S.select_tokens_indexer(qi.double(), ki.double(), wi.double(), K, 1, 1, causal)
    varlen = cu is not None
    seq = {"cu_seqlens": cu} if varlen else {}
    o, lse = gather(G, DQK, DQK, K, causal, varlen).fwd(q, k, v, idx, scale, **seq)
    mod = loss_family(G, DQK, HI, DI, K, causal, varlen)
    loss, lse_i, psum = mod.fwd(q, k, idx, lse, qi, ki, wi, scale, **seq)
    grads = mod.bwd(q, k, idx, lse, qi, ki, wi, lse_i, psum, dl, scale, **seq)
    return (q, k, idx, qi, ki, wi, dl, scale), loss, grads


def reference_loss(q, k, idx, qi, ki, wi, dl, scale, causal):
    r = [x.double().requires_grad_() for x in (qi, ki, wi)]
    loss = S.index_loss(q.double(), k.double(), idx, scale, *r, causal)
    loss.backward(dl.double())
    return loss, [x.grad for x in r]


LOSS_RUNS = [(*c, causal) for c in LOSS_CASES for causal in (True, False) if causal or c[1] < 60]


@pytest.mark.parametrize("B, T, H, G, DQK, HI, DI, K, causal", LOSS_RUNS, ids=[str(c) for c in LOSS_RUNS])
def test_index_loss_matches_reference(B, T, H, G, DQK, HI, DI, K, causal):
    args, loss, grads = run_loss(B, T, H, G, DQK, HI, DI, K, causal, seed=T)
    rloss, rgrads = reference_loss(*args, causal)
    assert loss.dtype == torch.float32 and loss.shape == (B, T)
    errs = [rel_err(loss, rloss)] + [rel_err(g, r) for g, r in zip(grads, rgrads)]
    assert max(errs) < 1e-5, errs


def test_index_loss_of_lists_with_holes():
    """Caller-style lists (fewer than K tokens, -1 padding, a position with none)."""
    B, T, K = 1, 23, 6
    idx = given_tokens(B, T, K, True, seed=4)
    idx[0, 7] = -1                                         # no token: loss 0, no gradient
    args, loss, grads = run_loss(B, T, 1, 2, 16, 2, 16, K, True, idx=idx)
    rloss, rgrads = reference_loss(*args, True)
    assert loss[0, 7] == 0
    errs = [rel_err(loss, rloss)] + [rel_err(g, r) for g, r in zip(grads, rgrads)]
    assert max(errs) < 1e-5, errs


def test_index_loss_packed_sequences():
    cu = torch.tensor([0, 5, 5, 19, 30], dtype=torch.int32)
    T, K = 30, 6
    idx = torch.cat([given_tokens(1, b - a, K, True, seed=a) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    (q, k, idx, qi, ki, wi, dl, scale), loss, grads = run_loss(1, T, 1, 2, 16, 2, 16, K, True, idx=idx, cu=cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if a == b:
            continue
        part = lambda x: x[:, a:b]
        rloss, rgrads = reference_loss(*map(part, (q, k, idx, qi, ki, wi, dl)), scale, True)
        assert rel_err(loss[:, a:b], rloss) < 1e-5
        for g, r in zip(grads, rgrads):
            assert rel_err(g[:, a:b], r) < 1e-5, (a, b)


# ----------------------------------------------------------------------------- sm_90 compile (CPU)

_SM90 = r"""
import nsa_dsl
from nsa_dsl.codegen import launch
from nsa_dsl.codegen.cache import render_plan
from nsa_dsl.codegen.loader import load_module
from nsa_dsl.codegen.plan import bind, lower
from nsa_dsl.codegen.sm90 import compile_kernel, ptxas_usage, signature, spill_bytes
from nsa_dsl.codegen.launch.topk import SORT_KEYS

from importlib.resources import files
spec = nsa_dsl.load(str(files("nsa_dsl.examples") / "dsa.nsa"))   # G = 64, DQK = 192, DV = 128, HI = 64, DI = 128
for G, offsets in ((64, False), (64, True)):     # whole sequences, and query pieces (OFFSETS)
    plan = lower(spec, bind(spec, 64, 64 // G, 192, 128), offsets=offsets)
    src = render_plan(plan)
    P = {n: "*bf16" for n in ("q", "k", "v", "o", "do", "dq", "q_idx", "k_idx", "w_idx", "dq_idx", "dw_idx")}
    P.update({n: "*fp32" for n in ("lse", "delta", "dk", "dv", "loss", "lse_i", "psum", "dloss", "dk_idx")})
    P.update(idx="*i32", key="*i64", seq_bos="*i64", seq_len="*i32", seq_q="*i64")
    for k in plan.kernels:
        if k.family not in ("indexer", "gather", "index_loss"):
            continue
        fam = launch.launchers(k.family, k.vars(), load_module(src[k.name], f"sm90_{k.name}_{G}_{offsets}"))
        v = k.vars()
        for kind in fam.KINDS:
            cfg = fam._heuristic(kind, True, 65536)
            if k.family == "indexer":
                fn = fam.kernels.indexer_score_kernel
                consts = dict(IDX_MAX=SORT_KEYS["IDX_MAX"], INELIGIBLE=SORT_KEYS["INELIGIBLE"], BT=cfg["BT"], BN=cfg["BN"],
                              **{n: v[n] for n in ("HI", "HIP", "DI", "BDI", "KEEP_FIRST", "KEEP_LAST")})
            elif k.family == "gather":
                fn = getattr(fam.kernels, f"gather_{kind}_kernel")
                consts = dict(fam._consts(cfg), ACC=True)
            else:
                fn = getattr(fam.kernels, f"index_loss_{kind}_kernel")
                consts = fam._consts(cfg)
            opts = {n: consts.pop(n) for n in ("num_warps", "num_stages") if n in consts}
            opts = opts or {n: cfg[n] for n in ("num_warps", "num_stages")}
            kern = compile_kernel(fn, consts, signature(fn, consts, P), **opts)
            usage = ptxas_usage(kern)
            print(G, offsets, k.name, kind, cfg, kern.metadata.shared, usage)
            assert kern.metadata.shared <= 232448 and spill_bytes(usage) <= 64, (k.name, kind, usage)
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.skipif(HAS_CUDA, reason="on the device the kernels run for real")
def test_dsa_kernels_compile_for_sm90(tmp_path):
    """examples/dsa.nsa's indexer, gather and index-loss kernels (G = 64, DQK = 192: the largest
    tiles; whole sequences and query pieces) at their GPU heuristics compile for sm_90 through
    ptxas: within shared memory, (almost) no spills."""
    run_sm90_check(_SM90, [], tmp_path)


# ----------------------------------------------------------------------------- GPU (bf16 / fp16)

def _within(x, low, ref):
    """The kernel's error against float64 is at most 5e-3 or twice the same dtype's reference's."""
    err, own = rel_err(x, ref), rel_err(low, ref)
    assert err <= max(5e-3, 2 * own), (err, own)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("B, T, H, G, D, HI, DI, K", [(2, 1000, 2, 16, 128, 64, 128, 256), (1, 4097, 1, 1, 64, 8, 64, 2048),
                                                      (1, 777, 4, 3, 128, 16, 32, 100), (1, 1500, 1, 64, 128, 64, 128, 512)])
def test_gpu_dsa_kernels(B, T, H, G, D, HI, DI, K, causal, dtype):
    """The three families at the GPU heuristics against float64: the choice (near ties at the
    dtype's rounding), the attention and its gradients, the index loss and its gradients (each
    within 5e-3 or twice the error of the reference run in the same dtype)."""
    dev = "cuda"
    qi, ki, wi = (x.to(dtype) for x in index_inputs(B, T, HI, DI, seed=1, device=dev))
    idx = indexer(HI, DI, K, 1, 1, causal).topk(qi, ki, wi)
    ref, scores = reference_tokens(qi, ki, wi, K, 1, 1, causal)
    assert_tokens(idx, ref.to(dev), scores, 1, 1, causal, rtol=1e-3)
    q, k, v, do = (rand(s, seed=i, device=dev).to(dtype) for i, s in
                   enumerate([(B, T, H * G, D), (B, T, H, D), (B, T, H, D), (B, T, H * G, D)]))
    scale = D ** -0.5
    g = gather(G, D, D, K, causal)
    o, lse = g.fwd(q, k, v, idx, scale)
    dq, dk, dv = g.bwd(q, k, v, idx, o, lse, do, scale)

    def attention(dt):
        r = [x.to(dt).requires_grad_() for x in (q, k, v)]
        ro, rlse = S.select_attention(*r, idx, 1, scale, causal)
        ro.backward(do.to(dt))
        return (ro, rlse, *(x.grad for x in r))
    for x, low, r in zip((o, lse, dq, dk, dv), attention(dtype), attention(torch.float64)):
        _within(x, low, r)
    L = loss_family(G, D, HI, DI, K, causal)
    dl = rand((B, T), seed=7, device=dev)
    loss, lse_i, psum = L.fwd(q, k, idx, lse, qi, ki, wi, scale)
    grads = L.bwd(q, k, idx, lse, qi, ki, wi, lse_i, psum, dl, scale)

    def index_loss(dt):
        r = [x.to(dt).requires_grad_() for x in (qi, ki, wi)]
        out = S.index_loss(q.to(dt), k.to(dt), idx, scale, *r, causal)
        out.backward(dl.to(dt))
        return (out, *(x.grad for x in r))
    for x, low, r in zip((loss, *grads), index_loss(dtype), index_loss(torch.float64)):
        _within(x, low, r)
