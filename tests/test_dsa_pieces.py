"""Query pieces (``q_start``) of a select branch scored by an indexer (DSA): q's rows are the
positions s .. s + Tq - 1 of a sequence whose keys k, v and indexer keys k_idx are all given;
q_idx, w_idx and the gates have q's rows.

The kernels rendered with ``OFFSETS`` (the indexer's top-k, the gather attention forward and
backward, the index loss forward and backward) and the compiled op against the float64 reference
at ``q_start``: pieces that split a sequence in 2 or 3 (the first at 0, odd starts, the last
ending at Tk), odd lengths (Tk = 45, 100), G = 1 and 3, Dqk != Dv, causal and not, float32 and
float16. Outputs are NaN-filled (conftest: ``NSA_DSL_NAN_FILL=1``), so a row a kernel does not
write fails; the pieces' outputs concatenated (their key gradients summed) equal the whole call.

CPU: Triton's interpreter.
"""
from __future__ import annotations

import pytest
import torch

import nsa_dsl
from kernel_utils import load_family, rand, rel_err
from nsa_dsl.codegen.plan import indexer_vars, tile_vars
from nsa_dsl.semantics import reference as S
from test_dsa_kernels import assert_tokens, index_inputs
from test_dsa_op import dsa
from test_dsa_op import inputs as op_inputs

KF, KL = 1, 2          # keep_first, keep_last of the kernel cases


def families(G, DQK, DV, HI, DI, K, causal, offsets=True):
    """(indexer, gather, index loss) launchers, rendered as the plan renders them (OFFSETS: the
    plan lowered with offsets=True)."""
    pieces = {"OFFSETS": True} if offsets else {}
    t = tile_vars(G, DQK, DV)
    return (load_family("indexer.py.j2", **indexer_vars(HI, DI), TOPK=K, KEEP_FIRST=KF, KEEP_LAST=KL, CAUSAL=causal,
                        **pieces),
            load_family("gather.py.j2", G=G, DQK=DQK, DV=DV, TOPK=K, CAUSAL=causal, **pieces),
            load_family("index_loss.py.j2", G=G, GP=t["GP"], DQK=DQK, BDK=t["BDK"], **indexer_vars(HI, DI), TOPK=K,
                        CAUSAL=causal, **pieces))


def spans(cuts):
    return list(zip(cuts[:-1], cuts[1:]))


# ----------------------------------------------------------------------------- the kernels

KERNEL_CASES = [  # B, Tk, H, G, DQK, DV, HI, DI, K, piece boundaries
    (2, 45, 1, 3, 16, 32, 3, 16, 5, (0, 17, 30, 45)),
    (1, 100, 1, 1, 32, 16, 2, 16, 9, (0, 17, 100)),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("B, Tk, H, G, DQK, DV, HI, DI, K, cuts", KERNEL_CASES, ids=[str(c[:9]) for c in KERNEL_CASES])
def test_kernel_pieces_equal_the_reference_and_the_whole_call(B, Tk, H, G, DQK, DV, HI, DI, K, cuts, causal):
    """Each piece: the tokens (near ties aside), o, lse, dq, dk, dv, the index loss and its
    gradients to q_idx, k_idx, w_idx against float64 at q_start (to 1e-5); the pieces
    concatenated (key gradients summed) against the whole sequence's call of the plain kernels."""
    q, k, v, do = (rand(s, seed=i) for i, s in enumerate([(B, Tk, H * G, DQK), (B, Tk, H, DQK), (B, Tk, H, DV),
                                                          (B, Tk, H * G, DV)]))
    qi, ki, wi = index_inputs(B, Tk, HI, DI, seed=Tk)
    dl = rand((B, Tk), seed=7)
    scale = DQK ** -0.5
    ix, ga, lo = families(G, DQK, DV, HI, DI, K, causal)
    q64, k64, w64 = (x.double() for x in (qi, ki, wi))
    got = {n: [] for n in ("idx", "o", "lse", "dq", "loss", "dqi", "dwi")}
    dk = dv = dki = 0
    for s, e in spans(cuts):
        idx = ix.topk(qi[:, s:e], ki, wi[:, s:e], q_start=s)
        ref = S.select_tokens_indexer(q64[:, s:e], k64, w64[:, s:e], K, KF, KL, causal, q_start=s)
        got["idx"].append(idx)
        # the attention and the loss on the reference's choice: every value compares to float64
        o, lse = ga.fwd(q[:, s:e], k, v, ref, scale, q_start=s)
        g = ga.bwd(q[:, s:e], k, v, ref, o, lse, do[:, s:e], scale, q_start=s)
        qr, kr, vr = (x.double().requires_grad_() for x in (q[:, s:e], k, v))
        ro, rlse = S.select_attention(qr, kr, vr, ref, 1, scale, causal, q_start=s)
        ro.backward(do[:, s:e].double())
        for name, x, r in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *g), (ro, rlse, qr.grad, kr.grad, vr.grad)):
            assert rel_err(x, r) < 1e-5, (s, e, name, rel_err(x, r))
        loss, lse_i, psum = lo.fwd(q[:, s:e], k, ref, lse, qi[:, s:e], ki, wi[:, s:e], scale, q_start=s)
        li = lo.bwd(q[:, s:e], k, ref, lse, qi[:, s:e], ki, wi[:, s:e], lse_i, psum, dl[:, s:e], scale, q_start=s)
        r = [x.double().requires_grad_() for x in (qi[:, s:e], ki, wi[:, s:e])]
        rloss = S.index_loss(q[:, s:e].double(), k.double(), ref, scale, *r, causal, q_start=s)
        rloss.backward(dl[:, s:e].double())
        for name, x, want in zip(("loss", "dq_idx", "dk_idx", "dw_idx"), (loss, *li), (rloss, *(x.grad for x in r))):
            assert rel_err(x, want) < 1e-5, (s, e, name, rel_err(x, want))
        for name, x in zip(("o", "lse", "dq", "loss", "dqi", "dwi"), (o, lse, g[0], loss, li[0], li[2])):
            got[name].append(x)
        dk, dv, dki = dk + g[1], dv + g[2], dki + li[1]

    # the whole sequence through the plain kernels (no OFFSETS)
    ix1, ga1, lo1 = families(G, DQK, DV, HI, DI, K, causal, offsets=False)
    whole, scores = ix1.topk(qi, ki, wi), S.block_scores_indexer(q64, k64, w64, causal)
    assert_tokens(torch.cat(got["idx"], 1), whole, scores, KF, KL, causal)
    ref = S.select_tokens_indexer(q64, k64, w64, K, KF, KL, causal)
    o, lse = ga1.fwd(q, k, v, ref, scale)
    g = ga1.bwd(q, k, v, ref, o, lse, do, scale)
    loss, lse_i, psum = lo1.fwd(q, k, ref, lse, qi, ki, wi, scale)
    li = lo1.bwd(q, k, ref, lse, qi, ki, wi, lse_i, psum, dl, scale)
    for name, x in (("o", o), ("lse", lse), ("dq", g[0]), ("loss", loss), ("dqi", li[0]), ("dwi", li[2])):
        assert rel_err(torch.cat(got[name], 1), x) < 1e-6, name
    for name, x, y in (("dk", dk, g[1]), ("dv", dv, g[2]), ("dk_idx", dki, li[1])):
        assert rel_err(x, y) < 1e-5, name


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_kernel_pieces_float16(causal):
    """fp16 inputs: the tokens at the dtype's near ties, the attention and the loss (and their
    gradients) within 5e-3 of float64, over two pieces."""
    B, Tk, H, G, D, HI, DI, K = 1, 45, 2, 3, 32, 4, 32, 7
    q, k, v, do = (rand(s, seed=i).half() for i, s in enumerate([(B, Tk, H * G, D), (B, Tk, H, D), (B, Tk, H, D),
                                                                 (B, Tk, H * G, D)]))
    qi, ki, wi = (x.half() for x in index_inputs(B, Tk, HI, DI, seed=3))
    dl = rand((B, Tk), seed=7)
    scale = D ** -0.5
    ix, ga, lo = families(G, D, D, HI, DI, K, causal)
    idx = []
    for s, e in spans((0, 19, 45)):
        idx.append(ix.topk(qi[:, s:e], ki, wi[:, s:e], q_start=s))
        o, lse = ga.fwd(q[:, s:e], k, v, idx[-1], scale, q_start=s)
        g = ga.bwd(q[:, s:e], k, v, idx[-1], o, lse, do[:, s:e], scale, q_start=s)
        qr, kr, vr = (x.double().requires_grad_() for x in (q[:, s:e], k, v))
        ro, rlse = S.select_attention(qr, kr, vr, idx[-1], 1, scale, causal, q_start=s)
        ro.backward(do[:, s:e].double())
        for x, r in zip((o, lse, *g), (ro, rlse, qr.grad, kr.grad, vr.grad)):
            assert rel_err(x, r) < 5e-3, (s, rel_err(x, r))
        loss, lse_i, psum = lo.fwd(q[:, s:e], k, idx[-1], lse, qi[:, s:e], ki, wi[:, s:e], scale, q_start=s)
        li = lo.bwd(q[:, s:e], k, idx[-1], lse, qi[:, s:e], ki, wi[:, s:e], lse_i, psum, dl[:, s:e], scale, q_start=s)
        r = [x.double().requires_grad_() for x in (qi[:, s:e], ki, wi[:, s:e])]
        rloss = S.index_loss(q[:, s:e].double(), k.double(), idx[-1], scale, *r, causal, q_start=s)
        rloss.backward(dl[:, s:e].double())
        for x, want in zip((loss, *li), (rloss, *(x.grad for x in r))):
            assert rel_err(x, want) < 5e-3, (s, rel_err(x, want))
    q64, k64, w64 = (x.double() for x in (qi, ki, wi))
    assert_tokens(torch.cat(idx, 1), S.select_tokens_indexer(q64, k64, w64, K, KF, KL, causal),
                  S.block_scores_indexer(q64, k64, w64, causal), KF, KL, causal, rtol=2e-3)


def test_piece_rules():
    """check_piece's rules (codegen/launch/base.py): a module without OFFSETS takes whole
    sequences only, a piece ends by the keys' end, no pieces of packed sequences."""
    ix, ga, lo = families(2, 16, 16, 2, 16, 4, True)
    ix0, ga0, lo0 = families(2, 16, 16, 2, 16, 4, True, offsets=False)
    q, k, v = rand((1, 5, 2, 16)), rand((1, 9, 1, 16)), rand((1, 9, 1, 16))
    qi, ki, wi = index_inputs(1, 9, 2, 16)
    idx = torch.full((1, 5, 1, 4), -1, dtype=torch.int32)
    with pytest.raises(ValueError, match="OFFSETS"):
        ix0.topk(qi[:, 4:], ki, wi[:, 4:], q_start=4)
    with pytest.raises(ValueError, match="OFFSETS"):
        ga0.fwd(q, k, v, idx, 0.25, q_start=4)
    with pytest.raises(ValueError, match="keys hold 9"):
        ix.topk(qi[:, 4:], ki, wi[:, 4:], q_start=5)
    with pytest.raises(ValueError, match="keys hold 9"):
        ga.fwd(q, k, v, idx, 0.25, q_start=5)
    lse = torch.zeros(1, 5, 2)
    with pytest.raises(ValueError, match="keys hold 9"):
        lo.fwd(q, k, idx, lse, qi[:, 4:], ki, wi[:, 4:], 0.25, q_start=5)
    assert torch.equal(ga.fwd(q, k, v, idx, 0.25, q_start=4)[0], torch.zeros(1, 5, 2, 16))   # no token: o = 0


# ----------------------------------------------------------------------------- the op

OP_CASES = [  # B, Tk, H, G, Dqk, Dv, piece boundaries
    (2, 45, 1, 3, 16, 32, (0, 17, 30, 45)),
    (1, 100, 1, 1, 32, 16, (0, 17, 100)),
]


def _op_run(fn, leaves, w, **kw):
    q, k, v, g, qi, ki, wi = leaves
    o, aux = fn(q, k, v, g, index={"idx": (qi, ki, wi)}, return_aux=True, **kw)
    loss = (o * w.to(o.dtype)).sum() + aux.index_loss["tok"].sum()
    return o, aux, torch.autograd.grad(loss, leaves)


def _piece(leaves, s, e):
    """q, gates, q_idx, w_idx: the piece's rows; k, v, k_idx: every key."""
    return [x[:, s:e] if i in (0, 3, 4, 6) else x for i, x in enumerate(leaves)]


NAMES = ("q", "k", "v", "gates", "q_idx", "k_idx", "w_idx")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("B, Tk, H, G, dqk, dv, cuts", OP_CASES, ids=[str(c[:6]) for c in OP_CASES])
def test_op_pieces_equal_the_reference_and_the_whole_call(B, Tk, H, G, dqk, dv, cuts, causal):
    """op(q[s:e], k, v, gates[s:e], index=(q_idx[s:e], k_idx, w_idx[s:e]), q_start=s): the
    output, the tokens (aux.indices), lse, aux.index_loss and every gradient (the indexer's
    through the index loss) against the float64 reference at q_start; concatenated (the keys'
    gradients summed) they equal the whole call."""
    spec = dsa(causal)
    op = nsa_dsl.compile(spec)
    leaves = [x.detach() for x in op_inputs(B, Tk, H, G, dqk, dv, seed=Tk)]
    w = rand((B, Tk, H * G, dv), seed=42)
    pieces = []
    for s, e in spans(cuts):
        xs = [x.clone().requires_grad_() for x in _piece(leaves, s, e)]
        o, aux, grads = _op_run(op, xs, w[:, s:e], q_start=s)
        ref = [x.double().requires_grad_() for x in _piece(leaves, s, e)]
        ro, raux, rgrads = _op_run(lambda *a, **k: nsa_dsl.reference(spec, *a, **k), ref, w[:, s:e], q_start=s)
        assert torch.equal(aux.indices["tok"], raux.indices["tok"]), (s, e)
        errs = {"o": rel_err(o, ro), "loss": rel_err(aux.index_loss["tok"], raux.index_loss["tok"]),
                **{f"lse {n}": rel_err(aux.lse[n], raux.lse[n]) for n in ("tok", "swa")},
                **{n: rel_err(a, b) for n, a, b in zip(NAMES, grads, rgrads)}}
        assert max(errs.values()) < 1e-5, (s, e, errs)
        pieces.append((o, aux, grads))
    xs = [x.clone().requires_grad_() for x in leaves]
    o, aux, grads = _op_run(op, xs, w)
    assert torch.equal(torch.cat([a.indices["tok"] for _, a, _ in pieces], 1), aux.indices["tok"])
    assert rel_err(torch.cat([p[0] for p in pieces], 1), o) < 1e-6
    assert rel_err(torch.cat([a.index_loss["tok"] for _, a, _ in pieces], 1), aux.index_loss["tok"]) < 1e-6
    for i, n in enumerate(NAMES):
        got = torch.cat([p[2][i] for p in pieces], 1) if i in (0, 3, 4, 6) else sum(p[2][i] for p in pieces)
        assert rel_err(got, grads[i]) < 1e-5, n


def test_op_pieces_float16():
    """fp16: each piece's output, index loss and gradients within 5e-3 of the float64 reference
    run on the op's own tokens; the pieces' tokens are the whole call's."""
    spec = dsa()
    op = nsa_dsl.compile(spec)
    leaves = [x.detach().half() for x in op_inputs(1, 45, 2, 3, 16, 32, seed=5)]
    w = rand((1, 45, 6, 32), seed=42)
    with torch.no_grad():
        whole = op(*leaves[:4], index={"idx": tuple(leaves[4:])}, return_aux=True)[1].indices["tok"]
    for s, e in spans((0, 17, 30, 45)):
        xs = [x.clone().requires_grad_() for x in _piece(leaves, s, e)]
        o, aux, grads = _op_run(op, xs, w[:, s:e], q_start=s)
        assert torch.equal(aux.indices["tok"], whole[:, s:e]), (s, e)
        ref = [x.double().requires_grad_() for x in _piece(leaves, s, e)]
        ro, raux, rgrads = _op_run(lambda *a, **k: nsa_dsl.reference(spec, *a, **k), ref, w[:, s:e], q_start=s,
                                   indices={"tok": aux.indices["tok"]})
        errs = {"o": rel_err(o, ro), "loss": rel_err(aux.index_loss["tok"], raux.index_loss["tok"]),
                **{n: rel_err(a, b) for n, a, b in zip(NAMES, grads, rgrads)}}
        assert max(errs.values()) < 5e-3, (s, e, errs)
