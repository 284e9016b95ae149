"""The second release's semantics (docs/SEMANTICS.md, "second release") in the reference, against
the brute-force loops of tests/brute.py: causal = false, query_block, indexer scoring and its
index loss, caller-given selections, FlexAttention block masks."""
import pytest
import torch

import brute
import nsa_dsl
from nsa_dsl import SpecError

F64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-9)


def spec_of(body: str, causal: bool = True):
    return nsa_dsl.parse("attention r {\n" + ("    causal = false\n" if not causal else "") + body + "\n}")


SPECS = {
    "nsa-noncausal": ("""    branch cmp = compress(block = 8, stride = 4)
    branch slc = select(block = 8, top_k = 3, score = cmp, keep_first = 1, keep_last = 1)
    branch swa = window(size = 5, sinks = 2)
    output = gate(sigmoid, cmp, slc, swa)""", False),
    "meanpool-noncausal": ("""    branch slc = select(block = 7, top_k = 2, score = mean_pool, keep_first = 0, keep_last = 1)
    branch swa = window(size = 4)
    output = sum(slc, swa)""", False),
    "qblock-cmp": ("""    branch cmp = compress(block = 8, stride = 4)
    branch slc = select(block = 8, top_k = 2, score = cmp, keep_first = 1, keep_last = 0, query_block = 4)
    output = sum(cmp, slc)""", True),
    "qblock-meanpool": ("""    branch slc = select(block = 4, top_k = 2, score = mean_pool, keep_first = 0, keep_last = 1, query_block = 8)
    output = slc""", True),
    "qblock-noncausal": ("""    branch cmp = compress(block = 4, stride = 4)
    branch slc = select(block = 8, top_k = 2, score = cmp, keep_first = 0, keep_last = 1, query_block = 2)
    output = gate(sigmoid, cmp, slc)""", False),
    "dsa": ("""    branch idx = indexer(heads = 3, dim = 16)
    branch tok = select(block = 1, top_k = 5, score = idx, keep_first = 1, keep_last = 2)
    branch swa = window(size = 4)
    output = gate(sigmoid, tok, swa)""", True),
    "dsa-noncausal": ("""    branch idx = indexer(heads = 2, dim = 16)
    branch tok = select(block = 1, top_k = 4, score = idx, keep_first = 0, keep_last = 1)
    output = tok""", False),
}


def inputs(spec, B, T, H, G, dqk, dv, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=F64)
    q, k, v = r(B, T, H * G, dqk), r(B, T, H, dqk), r(B, T, H, dv)
    gates = r(B, T, H * G, len(spec.output.branches)) if spec.output.kind == "gate" else None
    index = {b.name: (r(B, T, b.heads, b.dim) * 0.5, r(B, T, b.dim), r(B, T, b.heads).abs())
             for b in spec.of_kind("indexer")}
    return q, k, v, gates, index


CASES = [pytest.param(name, B, T, H, G, id=f"{name}-B{B}-T{T}-H{H}-G{G}")
         for name in SPECS for (B, T, H, G) in [(1, 1, 1, 1), (2, 17, 2, 3), (1, 33, 1, 2)]]


@pytest.mark.parametrize("name, B, T, H, G", CASES)
def test_reference_matches_brute(name, B, T, H, G):
    spec = spec_of(*SPECS[name])
    q, k, v, gates, index = inputs(spec, B, T, H, G, 16, 8)
    leaves = [x.requires_grad_() for x in (q, k, v, gates) if x is not None]
    o, aux = nsa_dsl.reference(spec, q, k, v, gates, index=index or None, return_aux=True)
    losses = {}
    bo, bidx, blse, _, = brute.brute_reference(spec, q, k, v, gates, index=index, losses=losses)[:4]
    torch.testing.assert_close(o, bo, **TOL)
    for n in bidx:
        assert torch.equal(aux.indices[n], bidx[n]), n
    for n in blse:
        torch.testing.assert_close(aux.lse[n], blse[n], **TOL)
    do = torch.randn(o.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    for a, b in zip(torch.autograd.grad(o, leaves, do), torch.autograd.grad(bo, leaves, do)):
        torch.testing.assert_close(a, b, **TOL)
    for n, loss in losses.items():
        torch.testing.assert_close(aux.index_loss[n], loss.float(), rtol=1e-5, atol=1e-6)


def test_index_loss_trains_the_indexer_only():
    spec = spec_of(*SPECS["dsa"])
    q, k, v, gates, index = inputs(spec, 1, 20, 1, 2, 16, 8, seed=3)
    q_idx, k_idx, w_idx = (x.requires_grad_() for x in index["idx"])
    for x in (q, k, v, gates):
        x.requires_grad_()
    o, aux = nsa_dsl.reference(spec, q, k, v, gates, index=index, return_aux=True)
    loss = aux.index_loss["tok"]
    assert loss.shape == (1, 20) and loss.dtype == torch.float32 and (loss >= -1e-6).all()
    grads = torch.autograd.grad(loss.sum(), [q_idx, k_idx, w_idx, q, k], allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads[:3])       # the indexer learns
    assert grads[3] is None and grads[4] is None                              # the attention does not
    # and the output's gradient never reaches the indexer (the choice is discrete)
    assert torch.autograd.grad(o.sum(), [q_idx], allow_unused=True)[0] is None
    # finite differences of the loss (float64, from the reference's function) in w_idx
    from nsa_dsl.semantics.reference import index_loss
    idx = aux.indices["tok"]
    f = lambda w: index_loss(q.detach(), k.detach(), idx, 16 ** -0.5, q_idx.detach(), k_idx.detach(), w).sum()
    wd = w_idx.detach().clone().requires_grad_()
    g_auto = torch.autograd.grad(f(wd), wd)[0]
    e = torch.zeros_like(wd)
    e[0, 7, 1] = 1e-6
    fd = (f(wd.detach() + e) - f(wd.detach() - e)) / 2e-6
    assert abs(float(fd) - float(g_auto[0, 7, 1])) < 1e-6 * max(1.0, abs(float(fd)))


def test_query_block_shares_one_selection_per_group():
    spec = spec_of(*SPECS["qblock-cmp"])
    q, k, v, gates, _ = inputs(spec, 1, 30, 2, 2, 16, 8, seed=5)
    _, aux = nsa_dsl.reference(spec, q, k, v, gates, return_aux=True)
    idx = aux.indices["slc"]
    for u in range(0, 30, 4):
        assert (idx[:, u:u + 4] == idx[:, u:u + 1]).all()


def test_caller_given_selections_are_cleaned_as_the_contract_says():
    spec = spec_of(*SPECS["qblock-cmp"])
    q, k, v, gates, _ = inputs(spec, 1, 24, 1, 2, 16, 8, seed=2)
    raw = torch.tensor([2, 0, 0, 9], dtype=torch.int32).expand(1, 24, 1, 2 + 2)[..., :2].contiguous()
    raw = torch.stack([torch.tensor([2, 2], dtype=torch.int32)] * 24)[None, :, None, :]   # repeated, after t early on
    o, aux = nsa_dsl.reference(spec, q, k, v, gates, indices={"slc": raw}, return_aux=True)
    want = torch.tensor([[2, -1] if t >= 16 else [-1, -1] for t in range(24)], dtype=torch.int32)[None, :, None]
    assert torch.equal(aux.indices["slc"], want)
    bo = brute.brute_reference(spec, q, k, v, gates, indices={"slc": raw})[0]
    torch.testing.assert_close(o, bo, **TOL)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_block_mask_reproduces_the_branch_through_flex_attention(causal):
    from torch.nn.attention.flex_attention import flex_attention
    spec = spec_of("""    branch slc = select(block = 16, top_k = 2, score = mean_pool, keep_first = 0, keep_last = 1, query_block = 16)
    output = slc""", causal)
    B, T, H, G = 1, 64, 2, 2
    q, k, v, _, _ = inputs(spec, B, T, H, G, 16, 16, seed=4)
    q, k, v = q.float(), k.float(), v.float()
    o, aux = nsa_dsl.reference(spec, q, k, v, return_aux=True)
    mask = aux.block_mask("slc")
    o_flex = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                            enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(o_flex, o, rtol=1e-4, atol=1e-5)
    with pytest.raises(SpecError) as e:
        spec2 = spec_of(*SPECS["qblock-cmp"])
        q2, k2, v2, _, _ = inputs(spec2, 1, 16, 1, 2, 16, 8)
        nsa_dsl.reference(spec2, q2, k2, v2, return_aux=True)[1].block_mask("slc")
    assert e.value.code == "E628"


def test_packed_sequences_of_the_new_kinds_equal_each_sequence_alone():
    spec = spec_of(*SPECS["dsa"])
    cu = torch.tensor([0, 5, 5, 19, 30])
    q, k, v, gates, index = inputs(spec, 1, 30, 1, 2, 16, 8, seed=6)
    o, aux = nsa_dsl.reference(spec, q, k, v, gates, index=index, cu_seqlens=cu, return_aux=True)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if a == b:
            continue
        part = {n: tuple(x[:, a:b] for x in t) for n, t in index.items()}
        o1, aux1 = nsa_dsl.reference(spec, q[:, a:b], k[:, a:b], v[:, a:b], gates[:, a:b], index=part, return_aux=True)
        torch.testing.assert_close(o[:, a:b], o1, **TOL)
        assert torch.equal(aux.indices["tok"][:, a:b], aux1.indices["tok"])
        torch.testing.assert_close(aux.index_loss["tok"][:, a:b], aux1.index_loss["tok"])


def test_missing_indexer_inputs_are_a_clear_error():
    spec = spec_of(*SPECS["dsa"])
    q, k, v, gates, index = inputs(spec, 1, 10, 1, 2, 16, 8)
    with pytest.raises(SpecError) as e:
        nsa_dsl.reference(spec, q, k, v, gates)
    assert e.value.code == "E627" and "index=" in str(e.value)
    with pytest.raises(SpecError) as e:
        nsa_dsl.reference(spec, q, k, v, gates, index={"idx": index["idx"][:2]})
    assert e.value.code == "E627"
    with pytest.raises(SpecError) as e:
        nsa_dsl.reference(spec, q, k, v, gates, index={"idxx": index["idx"]})
    assert e.value.code == "E627" and "idx" in str(e.value)


@pytest.mark.parametrize("name", ["nsa-noncausal", "qblock-cmp", "dsa"])
def test_queries_from_q_start_equal_those_rows_of_the_whole_sequence(name):
    """reference(..., q_start=s) on the rows s.. (keys: the whole sequence) equals those rows of
    the full call: decoding a chunk and context-parallel shards are defined by it."""
    spec = spec_of(*SPECS[name])
    q, k, v, gates, index = inputs(spec, 2, 40, 1, 3, 16, 8, seed=9)
    o, aux = nsa_dsl.reference(spec, q, k, v, gates, index=index or None, return_aux=True)
    for s, e in [(8, 24), (32, 40), (0, 8)]:
        part = {n: (t[0][:, s:e], t[1], t[2][:, s:e]) for n, t in index.items()} or None
        o1, aux1 = nsa_dsl.reference(spec, q[:, s:e], k, v, gates[:, s:e] if gates is not None else None,
                                     index=part, return_aux=True, q_start=s)
        torch.testing.assert_close(o1, o[:, s:e], **TOL)
        for n in aux.indices:
            assert torch.equal(aux1.indices[n], aux.indices[n][:, s:e])
    with pytest.raises(SpecError) as e:
        nsa_dsl.reference(spec, q[:, 2:10], k[:, :5], v[:, :5], gates[:, 2:10] if gates is not None else None,
                          index={n: (t[0][:, 2:10], t[1][:, :5], t[2][:, 2:10]) for n, t in index.items()} or None,
                          q_start=2)
    assert e.value.code in ("E629", "E601")
