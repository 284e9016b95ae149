"""The second release's patterns through the compiled op (interpreter on CPU): non-causal specs,
tile-shared selection (query_block) and both, plain and packed, outputs, selections and every
gradient against the float64 reference; the training call (one autograd node) too."""
import pytest
import torch

import nsa_dsl

from kernel_utils import assert_selections
from test_op import CPU, DEVICE, make_inputs, rel, spec_text

REACH = {
    "encoder": spec_text(["cmp = compress(block = 16, stride = 8)",
                          "slc = select(block = 16, top_k = 3, score = cmp, keep_first = 1, keep_last = 1)",
                          "swa = window(size = 16, sinks = 2)"], "gate(sigmoid, cmp, slc, swa)").replace(
        "attention t {", "attention t {\n    causal = false"),
    "tiles": spec_text(["cmp = compress(block = 16, stride = 8)",
                        "slc = select(block = 16, top_k = 3, score = cmp, keep_first = 1, keep_last = 1, "
                        "query_block = 16)",
                        "swa = window(size = 16)"], "gate(sigmoid, cmp, slc, swa)"),
    "encoder-tiles-mean": spec_text(["slc = select(block = 16, top_k = 2, score = mean_pool, keep_first = 0, "
                                     "keep_last = 1, query_block = 8)",
                                     "swa = window(size = 8)"], "sum(slc, swa)").replace(
        "attention t {", "attention t {\n    causal = false"),
}
SHAPES = [pytest.param((1, 1, 3, 1, 32, 16), id="T1-G3"),
          pytest.param((2, 45, 4, 2, 16, 32), id="B2-T45-G2"),
          pytest.param((1, 100, 16, 1, 32, 16), id="T100-G16")]


def _check(spec, op, leaves, gates, cu_seqlens=None, seed=1):
    q, k, v = leaves[:3]
    o, aux = op(q, k, v, gates, return_aux=True, cu_seqlens=cu_seqlens)
    assert not o.isnan().any()
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    g64 = leaves64[3] if gates is not None else None
    if cu_seqlens is None:
        assert_selections(spec, aux.indices, q, k)       # near ties: rounding may pick either block
    sel = {n: i.long() for n, i in aux.indices.items()}
    o_ref = nsa_dsl.reference(spec, *leaves64[:3], g64, indices=sel, cu_seqlens=cu_seqlens)
    assert rel(o, o_ref) < 1e-5
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, o.dtype)
    ref = torch.autograd.grad(o_ref, leaves64, do.double())
    for one_node in (False, True):            # per-branch nodes (aux asked), then the training node
        out = op(q, k, v, gates, cu_seqlens=cu_seqlens) if one_node else o
        assert not one_node or "attention" in out.grad_fn.name()
        for name, a, b in zip(("q", "k", "v", "gates"), torch.autograd.grad(out, leaves, do), ref):
            assert torch.isfinite(a).all(), name
            assert rel(a, b) < 1e-5, (name, one_node)
    return aux


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("which", list(REACH))
def test_reach_matches_reference(which, shape, tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    B, T, HQ, H, Dqk, Dv = shape
    spec = nsa_dsl.parse(REACH[which])
    q, k, v, gates = make_inputs(spec, B, T, HQ, H, Dqk, Dv, seed=3)
    leaves = [x.requires_grad_() for x in (q, k, v, gates) if x is not None]
    aux = _check(spec, nsa_dsl.compile(spec), leaves, gates)
    Q = spec.branch("slc").query_block
    idx = aux.indices["slc"]
    for u in range(0, T, Q):               # a tile of Q positions shares one selection
        assert (idx[:, u:u + Q] == idx[:, u:u + 1]).all()


@pytest.mark.parametrize("which", list(REACH))
def test_reach_packed(which, tmp_path, monkeypatch):
    """Packed sequences (lengths 17, 0, 32, 5): each a sequence of its own, non-causal ones seeing
    their own future only; tiles start at each sequence's first position."""
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    spec = nsa_dsl.parse(REACH[which])
    cu = torch.tensor([0, 17, 17, 49, 54], dtype=torch.int32, device=DEVICE)
    q, k, v, gates = make_inputs(spec, 1, 54, 4, 2, 16, 16, seed=4)
    leaves = [x.requires_grad_() for x in (q, k, v, gates) if x is not None]
    _check(spec, nsa_dsl.compile(spec), leaves, gates, cu_seqlens=cu)


@pytest.mark.gpu
@pytest.mark.skipif(CPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("which", list(REACH))
def test_gpu_reach_low_precision(which, dtype, tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    spec = nsa_dsl.parse(REACH[which])
    op = nsa_dsl.compile(spec)
    q, k, v, gates = make_inputs(spec, 2, 1000, 16, 2, 64, 64, dtype=dtype)
    leaves = [x.requires_grad_() for x in (q, k, v, gates) if x is not None]
    o, aux = op(q, k, v, gates, return_aux=True)
    sel = {n: i.long() for n, i in aux.indices.items()}

    def ref_run(dt):
        ys = [x.detach().to(dt).requires_grad_() for x in leaves]
        return ys, nsa_dsl.reference(spec, *ys[:3], ys[3] if gates is not None else None, indices=sel)
    L64, o64 = ref_run(torch.float64)
    Llp, olp = ref_run(dtype)
    do = torch.randn_like(o)
    assert rel(o, o64) <= max(5e-3, 2 * rel(olp, o64))
    g64, glp = torch.autograd.grad(o64, L64, do.double()), torch.autograd.grad(olp, Llp, do)
    for name, a, b, c in zip("q k v gates".split(), torch.autograd.grad(op(q, k, v, gates), leaves, do), g64, glp):
        assert rel(a, b) <= max(5e-3, 2 * rel(c, b)), name
