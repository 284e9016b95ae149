"""explain for the second release's kinds: the symbolic key counts against counting what the
reference attends, and what query_block saves."""
import torch

import brute
import nsa_dsl
from nsa_dsl.language import cost, shapes, symbolic
from nsa_dsl.tools.explain import explain


def _spec(body, causal=True):
    return nsa_dsl.parse("attention x {\n" + ("causal = false\n" if not causal else "") + body + "\n}")


def _keys(expr, T):
    f = symbolic.lambdify_int(expr, symbolic.t, symbolic.T) if symbolic.T in symbolic.as_expr(expr).free_symbols \
        else (lambda t_, T_: symbolic.lambdify_int(expr, symbolic.t)(t_))
    return [f(t_, T) for t_ in range(T)]


def test_non_causal_window_and_compress_counts():
    spec = _spec("branch cmp = compress(block = 8, stride = 4)\nbranch swa = window(size = 5, sinks = 2)\n"
                 "output = sum(cmp, swa)", causal=False)
    sh = shapes.spec_shapes(spec)
    for T in (1, 7, 17, 40):
        win = [len(sorted(set(range(max(0, t - 4), min(T - 1, t + 4) + 1)) | set(range(min(2, T)))))
               for t in range(T)]
        assert _keys(sh.branch("swa").keys, T) == win, T
        assert symbolic.evaluate(sh.branch("swa").keys_sum, T=T) == sum(win)
        nc = 0 if T < 8 else (T - 8) // 4 + 1
        assert symbolic.evaluate(sh.branch("cmp").keys, T=T) == nc
        assert symbolic.evaluate(sh.branch("cmp").keys_sum, T=T) == T * nc


def test_indexer_token_counts_and_bounds_hold_for_the_reference():
    spec = _spec("branch idx = indexer(heads = 2, dim = 16)\n"
                 "branch tok = select(block = 1, top_k = 5, score = idx, keep_first = 1, keep_last = 1)\n"
                 "output = tok")
    T = 23
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, h, 16, generator=g, dtype=torch.float64) for h in (2, 1, 1))
    index = {"idx": (torch.randn(1, T, 2, 16, generator=g, dtype=torch.float64),
                     torch.randn(1, T, 16, generator=g, dtype=torch.float64),
                     torch.rand(1, T, 2, generator=g, dtype=torch.float64))}
    _, aux = nsa_dsl.reference(spec, q, k, v, index=index, return_aux=True)
    counted = (aux.indices["tok"][0, :, 0] >= 0).sum(-1).tolist()
    assert _keys(shapes.spec_shapes(spec).branch("tok").keys, T) == counted


def test_query_block_reads_each_block_once_per_tile():
    one = _spec("branch cmp = compress(block = 32, stride = 16)\n"
                "branch slc = select(block = 64, top_k = 16, score = cmp)\noutput = sum(cmp, slc)")
    tiles = _spec("branch cmp = compress(block = 32, stride = 16)\n"
                  "branch slc = select(block = 64, top_k = 16, score = cmp, query_block = 64)\noutput = sum(cmp, slc)")
    dims = cost.Dims.of(one)
    a = cost.cost(shapes.spec_shapes(one), 65536, dims).row("slc")
    b = cost.cost(shapes.spec_shapes(tiles), 65536, dims).row("slc")
    per_key = (dims.qk_dim + dims.v_dim) * dims.kv_heads * dims.dtype_bytes
    assert a.bytes == a.keys_sum * per_key and b.bytes == b.keys_sum * per_key // 64
    text = explain(tiles, [65536])
    assert "64x fewer K/V" in text


def test_explain_runs_for_every_new_kind_without_kernels():
    for body, causal in [("branch swa = window(size = 8)\noutput = swa", False),
                         ("branch idx = indexer(heads = 4, dim = 32)\n"
                          "branch tok = select(block = 1, top_k = 64, score = idx)\noutput = tok", True)]:
        text = explain(_spec(body, causal), [4096])
        assert "T = 4096" in text and ("dense" in text)
