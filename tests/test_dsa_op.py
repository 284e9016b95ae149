"""DSA through the compiled op: ``op(q, k, v, gates, index={"idx": (q_idx, k_idx, w_idx)},
return_aux=True)`` against the float64 reference end to end (output, the token choice, lse,
aux.index_loss and every gradient, the indexer's included); training without aux, caller-given
token selections, packed sequences, query pieces (q_start), causal = false; the plan's indexer kernels.

CPU: Triton's interpreter (float32 at 1e-5). GPU (``pytest -m gpu``): bf16 at a longer length.
"""
from __future__ import annotations

import pytest
import torch

import nsa_dsl
from kernel_utils import rand, rel_err
from nsa_dsl import SpecError
from nsa_dsl.codegen.plan import bind, lower

DSA = """attention dsa_t {{
    causal = {causal}
    branch idx = indexer(heads = 3, dim = 16)
    branch tok = select(block = 1, top_k = 5, score = idx, keep_first = 1, keep_last = 2)
    branch swa = window(size = 4)
    output = gate(sigmoid, tok, swa)
}}"""


def dsa(causal=True):
    return nsa_dsl.parse(DSA.format(causal="true" if causal else "false"))


def inputs(B, T, H, G, dqk, dv, seed=0, device="cpu", dtype=torch.float32):
    q, k, v = rand((B, T, H * G, dqk), seed=seed), rand((B, T, H, dqk), seed=seed + 1), rand((B, T, H, dv), seed=seed + 2)
    gates = rand((B, T, H * G, 2), seed=seed + 3)
    index = (rand((B, T, 3, 16), seed=seed + 4, scale=0.5), rand((B, T, 16), seed=seed + 5), rand((B, T, 3), seed=seed + 6))
    cast = lambda x: x.to(device=device, dtype=dtype).requires_grad_()
    return [cast(x) for x in (q, k, v, gates, *index)]


def run(fn, leaves, w, **kw):
    """fn's output, aux and the gradients of sum(o * w) + sum(index_loss) to every leaf."""
    q, k, v, g, qi, ki, wi = leaves
    o, aux = fn(q, k, v, g, index={"idx": (qi, ki, wi)}, return_aux=True, **kw)
    loss = (o * w.to(o.dtype)).sum() + aux.index_loss["tok"].sum()
    return o, aux, torch.autograd.grad(loss, leaves)


def compare(spec, leaves, **kw):
    w = rand(leaves[0].shape[:3] + (leaves[2].shape[-1],), seed=42)
    o, aux, grads = run(nsa_dsl.compile(spec), leaves, w, **kw)
    ref = [x.detach().double().requires_grad_() for x in leaves]
    ro, raux, rgrads = run(lambda *a, **k: nsa_dsl.reference(spec, *a, **k), ref, w, **kw)
    assert torch.equal(aux.indices["tok"], raux.indices["tok"])
    errs = {"o": rel_err(o, ro), "loss": rel_err(aux.index_loss["tok"], raux.index_loss["tok"]),
            **{f"lse {n}": rel_err(aux.lse[n], raux.lse[n]) for n in ("tok", "swa")},
            **{n: rel_err(a, b) for n, a, b in zip(("q", "k", "v", "gates", "q_idx", "k_idx", "w_idx"), grads, rgrads)}}
    assert aux.index_loss["tok"].dtype == torch.float32
    assert max(errs.values()) < 1e-5, errs
    return aux


def test_plan_lowers_the_indexer_branch():
    spec = dsa()
    plan = lower(spec, bind(spec, 6, 2, 16, 32))
    assert plan.of_branch("tok") == {"indexer": "indexer_tok", "gather": "gather_tok", "index_loss": "index_loss_tok"}
    v = plan.kernel("indexer_tok").vars()
    assert (v["HI"], v["HIP"], v["DI"], v["BDI"], v["TOPK"], v["KEEP_FIRST"], v["KEEP_LAST"]) == (3, 4, 16, 16, 5, 1, 2)
    assert plan.kernel("gather_tok").vars()["G"] == 3 and plan.kernel("index_loss_tok").vars()["HIP"] == 4
    assert lower(spec, bind(spec, 6, 2, 16, 32), varlen=True).kernel("gather_tok").vars()["VARLEN"]
    pieces = lower(spec, bind(spec, 6, 2, 16, 32), offsets=True)     # query pieces (q_start): OFFSETS
    assert all(pieces.kernel(f"{f}_tok").vars()["OFFSETS"] for f in ("indexer", "gather", "index_loss"))
    assert "OFFSETS" not in plan.kernel("gather_tok").vars()


def test_query_pieces_equal_the_reference_and_the_whole_call():
    """op(..., q_start=s) on pieces of a sequence (its keys and indexer keys all given) equals the
    float64 reference at q_start with every gradient, the indexer's included (the pieces'
    query-piece tests in full: tests/test_dsa_pieces.py)."""
    spec = dsa()
    leaves = [x.detach() for x in inputs(1, 29, 2, 3, 16, 32, seed=11)]
    for s, e in ((0, 13), (13, 29)):
        piece = [x[:, s:e] if i in (0, 3, 4, 6) else x for i, x in enumerate(leaves)]   # q, gates, q_idx, w_idx
        compare(spec, [x.clone().requires_grad_() for x in piece], q_start=s)


def test_op_equals_the_reference_with_every_gradient():
    compare(dsa(), inputs(2, 17, 2, 3, 16, 32))


def test_op_trains_without_aux_and_the_indexer_gets_no_gradient_then():
    spec = dsa()
    q, k, v, g, qi, ki, wi = inputs(1, 9, 1, 2, 16, 16, seed=3)
    o = nsa_dsl.compile(spec)(q, k, v, g, index={"idx": (qi, ki, wi)})
    ro = nsa_dsl.reference(spec, *(x.detach().double().requires_grad_() for x in (q, k, v, g)),
                           index={"idx": tuple(x.detach().double() for x in (qi, ki, wi))})
    assert rel_err(o, ro) < 1e-5
    grads = torch.autograd.grad(o.sum(), [q, k, v, g, qi, ki, wi], allow_unused=True)
    assert all(x is not None for x in grads[:4]) and all(x is None for x in grads[4:])


def test_caller_given_token_selections_skip_scoring():
    spec = dsa()
    q, k, v, g, qi, ki, wi = inputs(1, 13, 1, 2, 16, 16, seed=5)
    raw = torch.randint(-2, 16, (1, 13, 1, 5), generator=torch.Generator().manual_seed(1))
    o, aux = nsa_dsl.compile(spec)(q, k, v, g, index={"idx": (qi, ki, wi)}, indices={"tok": raw}, return_aux=True)
    ro, raux = nsa_dsl.reference(spec, *(x.detach().double() for x in (q, k, v, g)), return_aux=True,
                                 index={"idx": tuple(x.detach().double() for x in (qi, ki, wi))}, indices={"tok": raw})
    assert torch.equal(aux.indices["tok"], raux.indices["tok"])
    assert rel_err(o, ro) < 1e-5 and rel_err(aux.index_loss["tok"], raux.index_loss["tok"]) < 1e-5


def test_packed_sequences_equal_each_sequence_alone():
    spec = dsa()
    cu = torch.tensor([0, 5, 5, 14, 23], dtype=torch.int32)
    leaves = inputs(1, 23, 1, 2, 16, 16, seed=7)
    aux = compare(spec, leaves, cu_seqlens=cu)
    q, k, v, g, qi, ki, wi = (x.detach().double() for x in leaves)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if a < b:
            _, one = nsa_dsl.reference(spec, q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], return_aux=True,
                                       index={"idx": (qi[:, a:b], ki[:, a:b], wi[:, a:b])})
            assert torch.equal(aux.indices["tok"][:, a:b], one.indices["tok"])


def test_noncausal_dsa():
    spec = dsa(causal=False)
    compare(spec, inputs(1, 11, 1, 2, 16, 16, seed=9))


def test_missing_indexer_inputs_are_e627():
    spec = dsa()
    q, k, v, g, *_ = inputs(1, 4, 1, 1, 16, 16)
    with pytest.raises(SpecError) as e:
        nsa_dsl.compile(spec)(q, k, v, g)
    assert e.value.code == "E627" and "index=" in str(e.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_op(dtype):
    """The op on a GPU at bf16 / fp16: the output and every gradient within 2x of the same
    dtype's reference error (or 5e-3), the choice up to near ties."""
    spec = nsa_dsl.parse("""attention dsa_g {
        branch idx = indexer(heads = 64, dim = 128)
        branch tok = select(block = 1, top_k = 256, score = idx, keep_first = 1, keep_last = 1)
        branch swa = window(size = 128)
        output = gate(sigmoid, tok, swa)
    }""")
    B, T, H, G, D = 1, 2000, 2, 8, 128
    g = torch.Generator().manual_seed(0)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to("cuda", dtype).requires_grad_()
    leaves = [mk(B, T, H * G, D), mk(B, T, H, D), mk(B, T, H, D), mk(B, T, H * G, 2), mk(B, T, 64, 128, sc=0.3),
              mk(B, T, 128), mk(B, T, 64)]
    w = torch.randn(B, T, H * G, D, generator=g).to("cuda")
    o, aux, grads = run(nsa_dsl.compile(spec), leaves, w)
    lo, laux, lgrads = run(lambda *a, **k: nsa_dsl.reference(spec, *a, **k),
                           [x.detach().clone().requires_grad_() for x in leaves], w, indices={"tok": aux.indices["tok"]})
    hi = [x.detach().double().requires_grad_() for x in leaves]
    ro, raux, rgrads = run(lambda *a, **k: nsa_dsl.reference(spec, *a, **k), hi, w, indices={"tok": aux.indices["tok"]})
    for x, lx, r in zip((o, aux.index_loss["tok"], *grads), (lo, laux.index_loss["tok"], *lgrads),
                        (ro, raux.index_loss["tok"], *rgrads)):
        assert rel_err(x, r) <= max(5e-3, 2 * rel_err(lx, r))
