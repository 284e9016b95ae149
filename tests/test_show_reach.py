"""show for the second release's kinds: non-causal masks see both sides, indexer specs draw
their token selection (the indexer itself has no mask), query_block rows share a selection."""
import numpy as np

import nsa_dsl
from nsa_dsl.tools import show


def _spec(body, causal=True):
    return nsa_dsl.parse("attention x {\n" + ("causal = false\n" if not causal else "") + body + "\n}")


def test_non_causal_masks_equal_the_brute_key_sets():
    spec = _spec("branch cmp = compress(block = 8, stride = 4)\nbranch swa = window(size = 5, sinks = 2)\n"
                 "output = sum(cmp, swa)", causal=False)
    T = 30
    masks = show.attention_masks(spec, T)
    for t in range(T):
        win = set(range(max(0, t - 4), min(T - 1, t + 4) + 1)) | {0, 1}
        assert set(np.flatnonzero(masks["swa"][t])) == win
        nc = (T - 8) // 4 + 1
        assert set(np.flatnonzero(masks["cmp"][t])) == set(range((nc - 1) * 4 + 8))


def test_an_indexer_spec_draws_its_tokens():
    spec = _spec("branch idx = indexer(heads = 64, dim = 128)\n"
                 "branch tok = select(block = 1, top_k = 8, score = idx, keep_first = 1, keep_last = 1)\n"
                 "output = tok")
    T = 40
    indices, note = show.random_selection(spec, T)
    masks = show.attention_masks(spec, T, indices)
    assert set(masks) == {"tok"}
    counts = masks["tok"].sum(1)
    assert (counts == np.minimum(8, np.arange(T) + 1)).all()
    assert show.keys_per_query(spec, T, indices)["tok"] == counts.mean()


def test_query_block_rows_share_their_group_s_blocks():
    spec = _spec("branch slc = select(block = 8, top_k = 2, score = mean_pool, keep_first = 0, keep_last = 1, "
                 "query_block = 4)\noutput = slc")
    T = 32
    indices, _ = show.random_selection(spec, T)
    idx = indices["slc"]
    assert all((idx[u:u + 4] == idx[u]).all() for u in range(0, T, 4))
