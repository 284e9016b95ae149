"""DSA in ``SparseAttention``: the layer owns the indexer's projections, ``aux.index_loss`` trains
them, the kernels' training step equals the reference's, packed sequences equal each sequence
alone, and decoding token by token (and in chunks) over the KV cache equals the full forward."""
from __future__ import annotations

import pytest
import torch

import nsa_dsl
from nsa_dsl import SparseAttention, SpecError

SPEC = """attention dsa_m {
    branch idx = indexer(heads = 3, dim = 16)
    branch tok = select(block = 1, top_k = 5, score = idx, keep_first = 1, keep_last = 1)
    branch swa = window(size = 3)
    output = gate(sigmoid, tok, swa)
}"""


def rotary(q, k, positions):
    """A rotary of any even head dim (q, k: [B, T, heads, D]; positions [T])."""
    D = q.shape[-1]
    f = positions.to(q.dtype)[:, None] * (10000.0 ** (-torch.arange(0, D, 2, device=q.device, dtype=q.dtype) / D))
    cos, sin = f.cos()[None, :, None, :], f.sin()[None, :, None, :]

    def rot(x):
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)
    return rot(q), rot(k)


def layer(backend="reference", dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return SparseAttention(nsa_dsl.parse(SPEC), 32, heads=4, kv_heads=2, qk_dim=16, backend=backend, dtype=dtype, **kw)


def test_the_layer_owns_the_indexer_projections():
    m = layer()
    names = {n for n, _ in m.named_parameters() if n.startswith("indexer.")}
    assert names == {"indexer.idx.q_proj.weight", "indexer.idx.k_proj.weight", "indexer.idx.w_proj.weight"}
    p = m.indexer["idx"]
    assert (p.q_proj.out_features, p.k_proj.out_features, p.w_proj.out_features) == (3 * 16, 16, 3)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    qi, ki, wi = m.index_inputs(x)["idx"]
    assert qi.shape == (2, 7, 3, 16) and ki.shape == (2, 7, 16) and wi.shape == (2, 7, 3)
    torch.testing.assert_close(wi, p.w_proj(x) * (3 * 16) ** -0.5)
    assert "idx=indexer(heads=3, dim=16)" in repr(m)
    # separate_kv: key / value projections for the attention branches only
    assert set(layer(separate_kv=True).k_proj.keys()) == {"tok", "swa"}


def test_a_training_step_trains_the_indexer_and_the_kernels_equal_the_reference():
    x = torch.randn(1, 9, 32)
    grads = {}
    for backend in ("reference", "kernels"):
        m = layer(backend, torch.float32, rotary=rotary, index_rotary=True)
        y, aux = m(x, return_aux=True)
        (y.square().mean() + aux.index_loss["tok"].mean()).backward()
        grads[backend] = {n: p.grad for n, p in m.named_parameters()}
        assert all(grads[backend][n].abs().sum() > 0 for n in grads[backend] if n.startswith("indexer."))
    for n, g in grads["kernels"].items():
        torch.testing.assert_close(g, grads["reference"][n], rtol=1e-4, atol=1e-6, msg=n)


def test_packed_sequences_equal_each_sequence_alone():
    m = layer(rotary=rotary, index_rotary=True)
    cu = torch.tensor([0, 4, 11, 12])
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    y, aux = m(x, cu_seqlens=cu, return_aux=True)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        y1, aux1 = m(x[:, a:b], return_aux=True)
        torch.testing.assert_close(y[:, a:b], y1)
        torch.testing.assert_close(aux.index_loss["tok"][:, a:b], aux1.index_loss["tok"])


def decode_in_chunks(m, x, chunks, max_len):
    """The layer's cached decoding of x in chunks, each chunk's selections checked against the
    full forward's; returns (decoded outputs, full forward, cache)."""
    y, aux = m(x, return_aux=True)
    cache = m.new_cache(x.shape[0], max_len)
    outs, t = [], 0
    for c in chunks:
        y_c, aux_c = m(x[:, t:t + c], cache=cache, return_aux=True)
        assert torch.equal(aux_c.indices["tok"], aux.indices["tok"][:, t:t + c])
        outs.append(y_c)
        t += c
    return torch.cat(outs, 1), y, cache


@pytest.mark.parametrize("chunks", [[1] * 13, [5, 1, 4, 3]], ids=["token-by-token", "chunks"])
def test_decoding_equals_the_full_forward(chunks):
    m = layer(rotary=rotary, index_rotary=True)
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    steps, y, cache = decode_in_chunks(m, x, chunks, 16)
    torch.testing.assert_close(steps, y)
    torch.testing.assert_close(cache.k_idx["idx"][:, :13], m.index_inputs(x, torch.arange(13))["idx"][1])


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float64), ("kernels", torch.float32)])
def test_ragged_decoding(backend, dtype, tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    m = layer(backend, dtype)
    x = torch.randn(2, 6, 32, dtype=dtype)
    tol = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        cache = m.new_cache(2, 8)
        y0 = m(x[:, :3], cache=cache, n_new=[3, 1])              # sequence 1 takes one token
        y1 = m(x[:, 3:4], cache=cache)
        torch.testing.assert_close(y0[0], m(x[:1, :3])[0], **tol)
        full = m(torch.cat([x[1:, :1], x[1:, 3:4]], 1))
        torch.testing.assert_close(y0[1, 0], full[0, 0], **tol)
        torch.testing.assert_close(y1[1, 0], full[0, 1], **tol)


@pytest.mark.parametrize("chunks", [[1] * 7, [4, 1, 2]], ids=["token-by-token", "chunks"])
def test_kernels_decoding_equals_the_full_forward(chunks, tmp_path, monkeypatch):
    """On the kernels an indexer spec decodes through the op's query pieces (the decode kernels
    do not score tokens): each chunk equals the full forward (ragged steps: test_ragged_decoding)."""
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    m = layer("kernels", torch.float32, rotary=rotary, index_rotary=True)
    with torch.no_grad():
        steps, y, cache = decode_in_chunks(m, torch.randn(2, 7, 32), chunks, 8)
        torch.testing.assert_close(steps, y, rtol=1e-4, atol=1e-5)
        with pytest.raises(SpecError) as e:              # the decode kernels themselves say what runs instead
            nsa_dsl.runtime.decoding.DecodeOp(m.spec)(torch.randn(2, 1, 4, 16), cache, cache.step_at([6, 6], (1, 1), 1),
                                                      torch.zeros(2, 1, 4, 2))
        assert e.value.code == "E627"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_training_step_and_decoding():
    """On a GPU ("auto": the kernels) a training step equals the reference's (fp32 inputs, the
    kernels' tl.dot in tf32: 1e-2), and decoding (the op's query pieces for an indexer spec) equals the
    full forward."""
    import copy

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()
    m = layer("auto", torch.float32, rotary=rotary, index_rotary=True).cuda()
    ref = copy.deepcopy(m)
    ref.backend = "reference"
    x = torch.randn(2, 300, 32, device="cuda")
    outs = []
    for layer_ in (m, ref):
        y, aux = layer_(x, return_aux=True)
        (y.square().mean() + aux.index_loss["tok"].mean()).backward()
        outs.append((y, aux.index_loss["tok"], {n: p.grad for n, p in layer_.named_parameters()}))
    (y, loss, grads), (ry, rloss, rgrads) = outs
    assert rel(y, ry) < 1e-2 and rel(loss, rloss) < 1e-2
    for n, g in grads.items():
        assert rel(g, rgrads[n]) < 2e-2, n
    with torch.no_grad():
        cache = m.new_cache(2, 300)
        steps = torch.cat([m(x[:, i:i + 50], cache=cache) for i in range(0, 300, 50)], 1)
    assert rel(steps, y) < 1e-2
