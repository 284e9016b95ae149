"""Paged KV caches (``PagedNSACache``) and the serving path (``DecodeOp.runner``: the kernels'
append and decode bound to a cache, no host sync; ``nsa_with_kvcache``: an engine's block table).

Paged decoding equals contiguous decoding and the full forward of the float64 reference (selected
blocks included): example specs and small ones, ragged batches (sequences of different lengths and
schedules), page sizes 16 and 64, pages handed out in a shuffled order, chunked prefill,
speculative steps (several tokens per step), a page freed by one sequence and reused by another,
learned pooling, the engine's call with its own table, the checks of block tables and the device
guards, and ``torch.compile`` around ``layer(x, cache=cache)``. Kernels run through Triton's
interpreter; caches and outputs are NaN-filled (NSA_DSL_NAN_FILL=1), so a read of a slot nothing
wrote fails.
"""
from __future__ import annotations

import copy
import random

import pytest
import torch

import nsa_dsl
from nsa_dsl.errors import SpecError
from nsa_dsl.runtime.decoding import DecodeOp, decode_torch, nsa_with_kvcache
from nsa_dsl.runtime.kv_cache import NSACache, PagedNSACache, check_block_table
from test_decode import DEVICE, SMALL, check, example, make_inputs, schedule, shapes_for, spec_text
from test_decode import _kernel_cache, _one_thread  # noqa: F401 - the same autouse fixtures

CPU = DEVICE == "cpu"


def new_cache(spec, B, T, H, Dqk, Dv, page_size, *, dtype=torch.float32, seed=0, num_pages=None):
    """A contiguous cache (page_size None) or a paged one handing its pages out in a shuffled order."""
    if page_size is None:
        return NSACache(spec, B, T, kv_heads=H, qk_dim=Dqk, v_dim=Dv, dtype=dtype, device=DEVICE)
    n = num_pages or B * -(-T // page_size)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return PagedNSACache(spec, B, T, page_size=page_size, num_pages=n, page_order=order, kv_heads=H,
                         qk_dim=Dqk, v_dim=Dv, dtype=dtype, device=DEVICE)


def take(x, start, C, T):
    """Each sequence's next C tokens from its start (past the end: the last token, as padding)."""
    pos = torch.tensor([[min(s + c, T - 1) for c in range(C)] for s in start], dtype=torch.long)
    return x[torch.arange(x.shape[0])[:, None], pos.to(x.device)]


def stream(spec, q, k, v, gates, steps, *, cache, backend="kernels", config=None):
    """Feed each sequence its tokens by ``steps`` through ``cache``: the serving path (``kernels``:
    DecodeOp.runner) or ``cache.append`` + ``decode_torch``; outputs [B, T, HQ, Dv] (NaN where never
    fed) and the selected blocks by branch."""
    B, T, HQ, _ = q.shape
    H, Dv = k.shape[2], v.shape[3]
    op = DecodeOp(spec)
    out = torch.full((B, T, HQ, Dv), float("nan"), dtype=torch.float64)
    idx = {b.name: torch.full((B, T, H, b.top_k), -2, dtype=torch.int32) for b in spec.of_kind("select")}
    for n in steps:
        C, start = max(n), cache.lengths_host
        g = take(gates, start, C, T) if gates is not None else None
        if backend == "kernels":
            run = op.runner(cache, C, HQ, aux=True, config=config)
            o, aux = run(take(q, start, C, T), take(k, start, C, T), take(v, start, C, T), g, n_new=n)
        else:
            st = cache.append(take(k, start, C, T), take(v, start, C, T), n_new=n)
            o, aux = decode_torch(spec, take(q, start, C, T), cache, st, g, return_aux=True)
        for b in range(B):
            out[b, start[b]:start[b] + n[b]] = o[b, :n[b]].double().cpu()
            assert torch.equal(o[b, n[b]:], torch.zeros_like(o[b, n[b]:])), "padding tokens output 0"
            for name, i in aux.indices.items():
                idx[name][b, start[b]:start[b] + n[b]] = i[b, :n[b]].cpu()
    assert cache.lengths_host == tuple(sum(s[b] for s in steps) for b in range(B))
    return out, idx


# ---------------------------------------------------------------------------------- kernels

PAGED_CASES = [  # (spec, HQ, H, Dqk, Dv, lengths, chunks, page size, config)
    # the small specs choose among many blocks: selection across pages
    pytest.param("paper", 3, 1, 32, 16, [100, 83], (16, 16, 16, 7, 1, 1, 4, 1), 16, None, id="paper-P16"),
    pytest.param("paper", 4, 2, 16, 16, [80, 57], (64, 4, 1), 64, {"NS": 3, "BN": 16, "BJ": 16, "NJ": 16},
                 id="paper-P64-split3"),
    pytest.param("paper", 3, 1, 32, 16, [90, 60], (64, 7, 1, 3), 16, {"ONEPASS": True, "BN": 16, "BJ": 16, "NJ": 16},
                 id="paper-P16-onepass"),
    pytest.param("mean_pool", 3, 1, 16, 32, [120, 77], (16,) * 6 + (1, 4, 1), 16, None, id="mean_pool-P16"),
    pytest.param("carry", 16, 1, 32, 16, [100, 90], (64, 16, 1), 64, None, id="carry-G16-P64"),
    pytest.param("two_cmp", 3, 1, 16, 16, [120, 101], (64, 48, 1), 64, {"NS": 2, "BN": 16, "BJ": 16},
                 id="two_cmp-P64-split2"),
    # every example that decodes with the kernels (their blocks are large: a few per sequence here)
    pytest.param("cmp_select", None, None, None, None, [50, 40], (32, 16, 1, 3), 16, None, id="cmp_select-P16"),
    pytest.param("nsa_paper_mean", 16, 1, 32, 32, [100, 70], (64, 16, 4, 1), 64, None, id="nsa_paper_mean-P64"),
    pytest.param("moba", 3, 1, 16, 16, [80, 50], (32, 32, 7, 1), 16, None, id="moba-P16"),
    pytest.param("moba_tiles", 3, 1, 16, 16, [90, 70], (32, 32, 16, 1, 3), 64, None, id="moba_tiles-P64"),
    pytest.param("multi:long_ctx", None, None, None, None, [40, 30], (16, 16, 4, 1), 16, {"NS": 2, "BN": 16, "BJ": 16},
                 id="long_ctx-P16-split2"),
    pytest.param("multi:short_ctx", 4, 4, 16, 16, [90, 40], (32, 32, 16, 1, 1), 64, None, id="short_ctx-P64"),
    pytest.param("sinks", 1, 1, 16, 16, [60, 33], (16, 16, 16, 7, 1), 16, None, id="sinks-P16"),
]


@pytest.mark.parametrize("which, HQ, H, Dqk, Dv, lengths, chunks, page_size, config", PAGED_CASES)
def test_paged_kernels_match_full_forward(which, HQ, H, Dqk, Dv, lengths, chunks, page_size, config):
    """The serving path on a paged cache (pages in a shuffled order): every output and selected
    block of the full forward, through chunked prefill, decoding and speculative steps, ragged."""
    spec = nsa_dsl.parse(SMALL[which]) if which in SMALL else example(which)
    HQ, H, Dqk, Dv = shapes_for(spec, HQ, H, Dqk, Dv)
    q, k, v, gates = make_inputs(spec, 2, max(lengths), HQ, H, Dqk, Dv, seed=11)
    cache = new_cache(spec, 2, max(lengths), H, Dqk, Dv, page_size)
    out, idx = stream(spec, q, k, v, gates, schedule(lengths, chunks), cache=cache, config=config)
    check(spec, q, k, v, gates, lengths, out, idx)


def test_paged_equals_contiguous():
    """The same kernels over the same tokens: a paged cache's outputs and blocks are the contiguous
    cache's, bit for bit (only the addresses differ)."""
    spec = nsa_dsl.parse(SMALL["paper"])
    lengths, steps = [70, 57], schedule([70, 57], (48, 16, 1, 3))
    q, k, v, gates = make_inputs(spec, 2, 70, 3, 1, 16, 16, seed=12)
    res = [stream(spec, q, k, v, gates, steps, cache=new_cache(spec, 2, 70, 1, 16, 16, ps),
                  config={"NS": 2, "BN": 16, "BJ": 16}) for ps in (None, 16)]
    assert torch.equal(res[0][0].nan_to_num(), res[1][0].nan_to_num())
    assert all(torch.equal(res[0][1][n], res[1][1][n]) for n in res[0][1])
    check(spec, q, k, v, gates, lengths, *res[1])


def test_torch_paged_every_example():
    """decode_torch gathers a paged cache's pages: equal to the full forward for every example
    spec that decodes (fixed pooling), page sizes 16 and 64."""
    for which, ps in (("cmp_select", 16), ("moba", 64), ("moba_tiles", 16), ("multi:short_ctx", 64),
                      ("multi:long_ctx", 16), ("nsa_paper_mean", 64), ("sinks", 16)):
        spec = example(which)
        HQ, H, Dqk, Dv = shapes_for(spec, 4, 2, 16, 16)
        q, k, v, gates = make_inputs(spec, 2, 140, HQ, H, Dqk, Dv, seed=13)
        cache = new_cache(spec, 2, 140, H, Dqk, Dv, ps, dtype=torch.float64)
        out, idx = stream(spec, q.double(), k.double(), v.double(), None if gates is None else gates.double(),
                          schedule([140, 97], (64, 7, 1, 16, 3)), cache=cache, backend="torch")
        check(spec, q, k, v, gates, [140, 97], out, idx, tol=1e-10)


def test_a_page_freed_and_reused_by_another_sequence():
    """A pool with too few pages for both sequences at once: sequence 0 ends and is freed, a new
    sequence in its slot takes the freed pages (some of them now hold its keys, compressed blocks
    and block means) while sequence 1 decodes on; every output is the full forward's."""
    spec = nsa_dsl.parse(SMALL["paper"])
    P, T = 16, 96
    q, k, v, gates = make_inputs(spec, 3, T, 3, 1, 16, 16, seed=14)   # rows 0, 1: first pair; row 2: the new one
    cache = new_cache(spec, 2, T, 1, 16, 16, P, num_pages=9, seed=3)
    op = DecodeOp(spec)
    outs = {0: [], 1: [], 2: []}

    def feed(rows, t0, C, n_new=None):
        run = op.runner(cache, C, 3)
        sl = [slice(t0[i], t0[i] + C) for i in range(2)]
        pick = lambda x: torch.stack([x[r, s] for r, s in zip(rows, sl)])
        o = run(pick(q), pick(k), pick(v), pick(gates), n_new=n_new)
        for i, r in enumerate(rows):
            outs[r].append(o[i, :(n_new or [C, C])[i]])

    feed([0, 1], [0, 0], 48)                          # 3 + 3 pages
    first = set(cache.block_table[0, :3].tolist())
    for t in range(48, 50):
        feed([0, 1], [t, t], 1)                       # a page each: 8 of 9
    cache.free([0])                                   # sequence 0 ends: its 4 pages go back
    assert cache.lengths_host == (0, 50) and cache.pages_in_use() == 4
    feed([2, 1], [0, 50], 16, n_new=[16, 10])         # the new sequence takes freed pages
    feed([2, 1], [16, 60], 32, n_new=[32, 4])
    for t in range(4):
        feed([2, 1], [48 + t, 64 + t], 1)
    assert set(cache.block_table[0, :4].tolist()) & first, "freed pages are handed out again"
    assert cache.lengths_host == (52, 68)
    ref = nsa_dsl.reference(spec, q.double(), k.double(), v.double(), gates.double())
    for r, n in ((0, 50), (1, 68), (2, 52)):
        got = torch.cat(outs[r]).double()
        assert got.shape[0] == n
        err = ((got - ref[r, :n]).norm() / ref[r, :n].norm()).item()
        assert err < 1e-5, (r, err)


def test_kernel_appends_equal_the_pytorch_appends():
    """append_kernel (the serving path) writes what NSACache.append writes: raw keys, compressed
    blocks, block means, lengths, page tables up to page ids, for ragged chunks."""
    spec = nsa_dsl.parse(spec_text(["cmp = compress(block = 8, stride = 4)",
                                    "s1 = select(block = 8, top_k = 3, score = cmp)",
                                    "s2 = select(block = 24, top_k = 3, score = mean_pool)"], "sum(cmp, s1, s2)"))
    B, T, H, D = 3, 80, 2, 16
    _, k, v, _ = make_inputs(spec, B, T, 2, H, D, D, seed=15)
    for ps in (None, 16):
        a, b = new_cache(spec, B, T, H, D, D, ps), new_cache(spec, B, T, H, D, D, ps)
        op = DecodeOp(spec)
        for C, n in ((17, [17, 3, 0]), (5, None), (1, None), (30, [30, 29, 12]), (1, [1, 0, 1])):
            start = a.lengths_host
            a.append(take(k, start, C, T), take(v, start, C, T), n_new=n)
            op.append(b, take(k, start, C, T), take(v, start, C, T), n_new=n)
        assert a.lengths_host == b.lengths_host and torch.equal(a.lengths, b.lengths)
        for s in range(B):
            L = a.lengths_host[s]
            sa, sb = a.sequence(s, L), b.sequence(s, L)
            assert torch.equal(sa["k"]["cmp"], sb["k"]["cmp"]) and torch.equal(sa["v"]["cmp"], sb["v"]["cmp"])
            torch.testing.assert_close(sa["cmp"]["cmp"], sb["cmp"]["cmp"], rtol=1e-6, atol=1e-6)
            n_m = L // 24
            rows = a._rows(torch.full((n_m,), s), torch.arange(n_m), 24, a.k_mean["s2"].shape[1])
            rows_b = b._rows(torch.full((n_m,), s), torch.arange(n_m), 24, b.k_mean["s2"].shape[1])
            torch.testing.assert_close(a.flat(a.k_mean["s2"])[rows], b.flat(b.k_mean["s2"])[rows_b], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------- the engine's call

def test_engine_call_with_its_own_block_table():
    """nsa_with_kvcache: the engine allocates pages (shuffled) in its own block table and advances
    its own lengths; chunked prefill, speculative steps and decoding equal the full forward."""
    spec = nsa_dsl.parse(SMALL["paper"])
    P, T, B = 16, 90, 2
    q, k, v, gates = make_inputs(spec, B, T, 3, 1, 32, 16, seed=16)
    pages = PagedNSACache(spec, B, T, page_size=P, num_pages=14, kv_heads=1, qk_dim=32, v_dim=16, device=DEVICE)
    free = list(range(14))
    random.Random(5).shuffle(free)
    table = torch.full((B, 7), -1, dtype=torch.int32, device=DEVICE)
    seqlens = torch.zeros(B, dtype=torch.int32, device=DEVICE)
    lens = [0, 0]
    out = [[], []]
    for C, n in ((32, [32, 20]), (16, [16, 16]), (3, [3, 3]), (1, [1, 1]), (16, [16, 5]), (1, [1, 1])):
        for b in range(B):                       # the engine's page allocation, then its table update
            while -(-(lens[b] + n[b]) // P) > (table[b] >= 0).sum():
                table[b, (table[b] >= 0).sum()] = free.pop()
        check_block_table(pages, table, seqlens, n_new=n)           # once per table update
        nt = torch.tensor(n, dtype=torch.int32, device=DEVICE)
        sl = lambda x: torch.stack([x[b, lens[b]:lens[b] + C] if lens[b] + C <= T else
                                    torch.cat([x[b, lens[b]:], x[b, -1:].expand(lens[b] + C - T, *x.shape[2:])])
                                    for b in range(B)])
        o = nsa_with_kvcache(spec, sl(q), sl(k), sl(v), pages, table, seqlens, n_new=nt, gates=sl(gates))
        for b in range(B):
            out[b].append(o[b, :n[b]])
            lens[b] += n[b]
        seqlens += nt                            # the engine advances its lengths
    ref = nsa_dsl.reference(spec, q.double(), k.double(), v.double(), gates.double())
    for b in range(B):
        got = torch.cat(out[b]).double()
        assert got.shape[0] == lens[b]
        assert ((got - ref[b, :lens[b]]).norm() / ref[b, :lens[b]].norm()).item() < 1e-5


def test_block_tables_are_checked():
    spec = nsa_dsl.parse(SMALL["paper"])
    pages = PagedNSACache(spec, 2, 64, page_size=16, num_pages=8, kv_heads=1, qk_dim=16, v_dim=16, device=DEVICE)
    ok = torch.tensor([[0, 1, 2, -1], [3, 4, -1, -1]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([40, 20], dtype=torch.int32, device=DEVICE)
    check_block_table(pages, ok, lens)
    check_block_table(pages, ok, lens, n_new=[8, 12])
    cases = [(ok.long(), lens, None, "E813"), (ok[0], lens, None, "E813"),
             (ok, lens, [9, 0], "E814"),                                   # position 48 needs page slot 3: -1
             (torch.tensor([[0, 1, 9, -1], [3, 4, -1, -1]], dtype=torch.int32), lens, None, "E814"),   # not in the pool
             (torch.tensor([[0, 1, 2, -1], [3, 1, -1, -1]], dtype=torch.int32), lens, None, "E814"),   # page 1 twice
             (ok, torch.tensor([70, 20], dtype=torch.int32), None, "E815")]                          # past 4 pages
    for table, L, n, code in cases:
        with pytest.raises(SpecError) as e:
            check_block_table(pages, table.to(DEVICE), L.to(DEVICE), n_new=n)
        assert e.value.code == code, (code, str(e.value))
    q, g = torch.randn(2, 1, 2, 16, device=DEVICE), torch.rand(2, 1, 2, 3, device=DEVICE)
    with pytest.raises(SpecError) as e:                       # the engine call's free checks: kinds and shapes
        nsa_with_kvcache(spec, q, None, None, pages, ok.long(), lens)
    assert e.value.code == "E813"
    with pytest.raises(SpecError) as e:
        nsa_with_kvcache(spec, q, None, None, pages, ok, lens[:1])
    assert e.value.code == "E813"
    with pytest.raises(SpecError) as e:
        nsa_with_kvcache(spec, q, None, None, NSACache(spec, 2, 64, kv_heads=1, qk_dim=16, v_dim=16), ok, lens)
    assert e.value.code == "E813"
    with pytest.raises(SpecError) as e:                       # check=True: the full check (a sync)
        nsa_with_kvcache(spec, q, None, None, pages, torch.tensor([[0, 1, 9, -1], [3, 4, -1, -1]], dtype=torch.int32,
                                                                  device=DEVICE), lens, gates=g, check=True)
    assert e.value.code == "E814"
    k = torch.randn(2, 1, 1, 16, device=DEVICE)
    for kk, vv in ((k[:, :, :, :8], k), (k, k.double()), (torch.randn(2, 2, 1, 16, device=DEVICE),) * 2,
                   (torch.randn(3, 1, 1, 16, device=DEVICE),) * 2):
        with pytest.raises(SpecError) as e:                   # the new tokens' keys and values: shapes, dtype, C
            nsa_with_kvcache(spec, q, kk, vv, pages, ok, lens, gates=g)
        assert e.value.code == "E803", str(e.value)


def test_the_kernels_never_read_or_write_outside_the_table_or_the_pool():
    """A corrupt table (entries outside the pool, lengths past the table) runs without a fault:
    entries outside are neither read nor written; nothing else of the pool changes."""
    spec = nsa_dsl.parse(SMALL["paper"])
    pages = PagedNSACache(spec, 2, 64, page_size=16, num_pages=4, kv_heads=1, qk_dim=16, v_dim=16, device=DEVICE)
    before = [t.clone() for t in pages.tensors()]
    table = torch.tensor([[99, -7], [1 << 30, -1]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([20, 50], dtype=torch.int32, device=DEVICE)        # 50: past the table's 32 positions
    q, k, v, g = make_inputs(spec, 2, 4, 2, 1, 16, 16, seed=17)
    o = nsa_with_kvcache(spec, q, k, v, pages, table, lens, gates=g)
    assert o.shape == (2, 4, 2, 16) and int(pages.err.item()) & 1            # sequence 1: past the capacity
    for a, b in zip(before, pages.tensors()):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) or b is pages.err


# ---------------------------------------------------------------------------------- the cache's guards

def test_room_and_pages_are_checked_before_anything_runs():
    spec = nsa_dsl.parse(SMALL["paper"])
    op = DecodeOp(spec)
    q, k, v, g = make_inputs(spec, 2, 40, 3, 1, 16, 16, seed=18)
    cache = new_cache(spec, 2, 32, 1, 16, 16, None)
    run = op.runner(cache, 20, 3)
    run(q[:, :20], k[:, :20], v[:, :20], g[:, :20])
    with pytest.raises(SpecError) as e:
        run(q[:, 20:40], k[:, 20:40], v[:, 20:40], g[:, 20:40])              # 40 > 32
    assert e.value.code == "E805" and cache.lengths_host == (20, 20)
    paged = new_cache(spec, 2, 64, 1, 16, 16, 16, num_pages=3)
    run = op.runner(paged, 20, 3)
    run(q[:, :20], k[:, :20], v[:, :20], g[:, :20], n_new=[20, 5])          # 2 + 1 pages
    with pytest.raises(SpecError) as e:
        run(q[:, 20:40], k[:, 20:40], v[:, 20:40], g[:, 20:40], n_new=[0, 20])   # 1 more page needed, 0 free
    assert e.value.code == "E816" and paged.lengths_host == (20, 5)
    # counts only the device knows: the kernels drop the chunk and flag it; check() raises
    n = torch.tensor([0, 20], dtype=torch.int32, device=DEVICE)
    run(q[:, 20:40], k[:, 20:40], v[:, 20:40], g[:, 20:40], n_new=n)
    with pytest.raises(SpecError) as e:
        paged.check()
    assert e.value.code == "E816" and paged.lengths_host == (20, 5)
    paged.free([0])
    assert paged.pages_in_use() == 1
    run(q[:, 20:40], k[:, 20:40], v[:, 20:40], g[:, 20:40], n_new=n)        # now it fits
    paged.check()
    assert paged.lengths_host == (0, 25)


def test_kernel_append_steps_hold_until_the_next_append():
    spec = nsa_dsl.parse(SMALL["paper"])
    op = DecodeOp(spec)
    q, k, v, g = make_inputs(spec, 2, 8, 3, 1, 16, 16, seed=19)
    cache, other = new_cache(spec, 2, 16, 1, 16, 16, 16), new_cache(spec, 2, 16, 1, 16, 16, 16)
    step = op.append(cache, k[:, :4], v[:, :4])
    assert op(q[:, :4], cache, step, g[:, :4]).shape == (2, 4, 3, 16)
    op.append(cache, k[:, 4:8], v[:, 4:8])
    with pytest.raises(SpecError) as e:
        op(q[:, :4], cache, step, g[:, :4])
    assert e.value.code == "E811" and "last append" in str(e.value)
    with pytest.raises(SpecError) as e:
        op(q[:, :4], other, op.append(cache, k[:, :1], v[:, :1]), g[:, :4])
    assert e.value.code == "E811" and "another cache" in str(e.value)
    with pytest.raises(SpecError) as e:
        cache.free([2])
    assert e.value.code == "E801"
    with pytest.raises(SpecError) as e:
        PagedNSACache(spec, 2, 16, page_size=12, kv_heads=1, qk_dim=16, v_dim=16)
    assert e.value.code == "E801"


# ---------------------------------------------------------------------------------- the module

def _layer(spec, backend, **kw):
    torch.manual_seed(0)
    layer = nsa_dsl.SparseAttention(spec, 32, heads=4, kv_heads=2, qk_dim=16, v_dim=16, backend=backend,
                                    dtype=torch.float32, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # off the init (zero gates, zero position embeddings), so the wiring is tested
        for p in layer.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g).to(p.dtype))
    return layer.to(DEVICE)


def _rotary(q, k, positions):
    """positions [T], or [B, T] (each sequence's own: a captured or compiled cached step)."""
    D = q.shape[-1]
    inv = 1.0 / (100.0 ** (torch.arange(0, D, 2, dtype=torch.float64, device=q.device) / D))
    ang = positions.double()[..., None] * inv
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    cos, sin = (cos[None, :, None], sin[None, :, None]) if positions.dim() == 1 else (cos[:, :, None], sin[:, :, None])

    def rot(x):
        x1, x2 = x.chunk(2, -1)
        return x * cos.to(x.dtype) + torch.cat([-x2, x1], -1) * sin.to(x.dtype)
    return rot(q), rot(k)


MLP = SMALL["paper"].replace("stride = 4)", "stride = 4, pool = mlp)")


@pytest.mark.parametrize("page_size", [16, pytest.param(64, marks=pytest.mark.slow)])
def test_module_paged_kernels_learned_pooling(page_size):
    """layer.new_cache(B, T, page_size=P): learned (mlp) pooling of the blocks as they complete,
    per-branch K/V and rotary, prefill in chunks then token by token, ragged: the float64 reference's
    full forward."""
    layer = _layer(nsa_dsl.parse(MLP), "kernels", separate_kv=True, rotary=_rotary)
    ref = copy.deepcopy(layer).double()
    ref.backend = "reference"
    B, T = 2, 48
    x = torch.randn(B, T, 32, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    with torch.no_grad():
        y_full = ref(x.double())
        cache = layer.new_cache(B, T, page_size=page_size)
        assert isinstance(cache, PagedNSACache) and cache.page_size == page_size
        ys = [layer(x[:, :30], cache=cache, n_new=[30, 30])] + [layer(x[:, t:t + 1], cache=cache) for t in range(30, 33)]
        ys.append(layer(x[:, 33:], cache=cache))
    y = torch.cat(ys, 1).double()
    assert ((y - y_full).norm() / y_full.norm()).item() < 1e-5


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float64), ("kernels", torch.float32)])
def test_module_paged_indexer_pages(backend, dtype):
    """An indexer spec decodes with the reference or the op's query pieces (the decode kernels
    score no tokens): its indexer keys live in pages too; token by token and in chunks, the full
    forward."""
    from test_dsa_module import SPEC
    spec = nsa_dsl.parse(SPEC)
    torch.manual_seed(0)
    m = nsa_dsl.SparseAttention(spec, 32, heads=4, kv_heads=2, qk_dim=16, backend=backend, dtype=dtype)
    x = torch.randn(2, 13, 32, dtype=dtype)
    tol = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        y = m(x)
        for chunks in ([1] * 13, [5, 1, 4, 3]):
            cache = m.new_cache(2, 16, page_size=4)
            assert cache.k_idx["idx"].shape == (cache.num_pages, 4, 16)
            outs, t = [], 0
            for c in chunks:
                outs.append(m(x[:, t:t + c], cache=cache))
                t += c
            torch.testing.assert_close(torch.cat(outs, 1), y, **tol)


@pytest.mark.parametrize("page_size", [16, pytest.param(None, marks=pytest.mark.slow)])
def test_torch_compile_around_the_cached_layer(page_size):
    """torch.compile(fullgraph=True) around layer(x, cache=cache) (after one eager step, which binds
    the launches): appends and decodes through the custom ops, learned pooling and rotary at the
    device's positions inside the graph; the same outputs as eager."""
    torch._dynamo.reset()
    layer = _layer(nsa_dsl.parse(MLP), "kernels", rotary=_rotary)
    B, T = 2, 40
    x = torch.randn(B, T, 32, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    eager, comp = layer.new_cache(B, T, page_size=page_size), layer.new_cache(B, T, page_size=page_size)
    step = torch.compile(lambda xc: layer(xc, cache=comp), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for cache in (eager, comp):
            layer(x[:, :30], cache=cache)
            layer(x[:, 30:31], cache=cache)
        want = [layer(x[:, t:t + 1], cache=eager) for t in range(31, 33)]
        got = [step(x[:, t:t + 1]) for t in range(31, 33)]
    assert comp.lengths_host == eager.lengths_host == (33, 33)
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------- GPU

def _gpu_paper_layer():
    """The paper pattern (mlp pooling) as a bf16 kernels layer on the GPU, and inputs x [2, 1200, 256]."""
    spec = example("nsa_paper")
    torch.manual_seed(0)
    layer = nsa_dsl.SparseAttention(spec, 256, backend="kernels", dtype=torch.bfloat16, device="cuda")
    B, T = 2, 1200
    return layer, torch.randn(B, T, 256, device="cuda", dtype=torch.bfloat16), B, T


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [None, 16, 64])
def test_gpu_cuda_graph_of_the_cached_layer(page_size):
    """A CUDA graph captured around layer(x, cache=cache) (bf16, the paper pattern with mlp pooling)
    replays decoding steps: each replay appends at the device's lengths, pools the blocks it
    completes and takes pages; the outputs equal eager steps on a twin cache."""
    layer, x, B, T = _gpu_paper_layer()
    eager, graphed = layer.new_cache(B, T, page_size=page_size), layer.new_cache(B, T, page_size=page_size)
    with torch.no_grad():
        for cache in (eager, graphed):
            layer(x[:, :1000], cache=cache)
            layer(x[:, 1000:1001], cache=cache)                  # binds the one-token launches
        x_static = x[:, 1001:1002].clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_static = layer(x_static, cache=graphed)
        got, want = [], []
        for t in range(1001, 1040):
            x_static.copy_(x[:, t:t + 1])
            graph.replay()
            got.append(y_static.clone())
            want.append(layer(x[:, t:t + 1], cache=eager))
    graphed.check()
    assert graphed.lengths_host == eager.lengths_host == (1040, 1040)
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [None, 16])
def test_gpu_torch_compile_reduce_overhead(page_size):
    torch._dynamo.reset()
    layer, x, B, T = _gpu_paper_layer()
    eager, comp = layer.new_cache(B, T, page_size=page_size), layer.new_cache(B, T, page_size=page_size)
    step = torch.compile(lambda xc: layer(xc, cache=comp), mode="reduce-overhead")
    with torch.no_grad():
        for cache in (eager, comp):
            layer(x[:, :1000], cache=cache)
        got = [step(x[:, t:t + 1]).clone() for t in range(1000, 1040)]
        want = [layer(x[:, t:t + 1], cache=eager) for t in range(1000, 1040)]
    assert comp.lengths_host == eager.lengths_host == (1040, 1040)
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), rtol=2e-2, atol=2e-2)
