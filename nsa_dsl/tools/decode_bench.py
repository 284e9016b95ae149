"""``nsa-dsl bench --decode``: one decoding step over a KV cache, contiguous and paged, launched
from Python and replayed from a CUDA graph, timed against SDPA over the whole cache (GPU)."""
from __future__ import annotations

import os
import random
from typing import Callable, Optional, Sequence, Union

import torch

from nsa_dsl.codegen.ints import cdiv
from nsa_dsl.language.ir import Spec
from nsa_dsl.runtime.decoding import DecodeOp
from nsa_dsl.runtime.kv_cache import NSACache, PagedNSACache
from nsa_dsl.tools.random_inputs import mean_blocks

__all__ = ["decode_bench", "table_keys"]

# the timed columns of a row, contiguous then paged (table_keys: the SDPA ones follow, then RATIOS)
TIMES = tuple(f"{c}_{t}_ms" for c in ("nsa", "paged") for t in ("step", "kernel", "graph", "step_graph"))
RATIOS = ("speedup", "speedup_graph", "python_vs_graph", "paged_python_vs_graph", "paged_vs_contiguous")


def decode_bench(op: Union[DecodeOp, Spec, str, os.PathLike], cache_lengths: Sequence[int] = (8192, 65536),
                 batches: Sequence[int] = (1, 64), *, HQ: int = 64, H: int = 4, Dqk: int = 128, Dv: int = 128,
                 q_len: int = 1, dtype=torch.bfloat16, peers=("cudnn", "flash"), cuda_graph: bool = True,
                 page_size: int = 64, progress: Optional[Callable[[str], None]] = None, device="cuda",
                 timer: Optional[Callable[[Callable], float]] = None) -> list[dict]:
    """Time one decoding step per (batch, cache length) over a contiguous and a paged cache against
    SDPA over the whole cache (GPU).

    For each case a cache holds ``T - q_len`` random tokens (appended in chunks, which pools the
    compressed blocks); then, per step, ``q_len`` new tokens per sequence (``q_len > 1``:
    speculative decoding). The contiguous cache (``NSACache``) and the paged one
    (``PagedNSACache``: pages of ``page_size`` positions handed out in a shuffled order, through
    its block table) hold the same tokens and take the same step, one after the other:
      ``nsa_step_ms``         the serving step launched from Python: append + decode kernels, the
                              ``DecodeRunner`` path (what ``layer(x, cache=cache)`` runs), the
                              cache's lengths rewound first (a copy of B ints; paged, when the step
                              takes a page, the free-page stack's top and the table too),
      ``nsa_kernel_ms``       the decode kernels alone (``DecodeOp``: split-K slices + decode kernel),
      ``nsa_graph_ms``        the decode kernels replayed from a CUDA graph (``cuda_graph``; launch
                              overhead gone),
      ``nsa_step_graph_ms``   the whole step (rewind, append, decode) replayed from a CUDA graph,
      ``paged_step_ms``, ``paged_kernel_ms``, ``paged_graph_ms``, ``paged_step_graph_ms``: the
                              same over the paged cache,
      ``sdpa_<peer>_ms``      SDPA (``peers``: cudnn / flash backends) of the ``q_len`` queries over
                              all ``T`` keys of the contiguous cache (GQA), the dense baseline,
      ``speedup``             fastest SDPA / ``nsa_kernel_ms`` (``speedup_graph``: / ``nsa_graph_ms``,
                              the GPU's time without the host's launches),
      ``python_vs_graph``     ``nsa_step_ms / nsa_step_graph_ms``: what launching from Python costs
                              (``paged_python_vs_graph``: the paged cache's),
      ``paged_vs_contiguous`` ``paged_step_graph_ms / nsa_step_graph_ms`` (without graphs:
                              ``paged_step_ms / nsa_step_ms``): what paging costs the step,
      ``paged_max_diff``      max |paged - contiguous| over the step's outputs (0: the same numbers).
    A CUDA graph that fails leaves ``<key>_error`` (e.g. ``paged_step_graph_error``) instead of its
    time. Medians of ``triton.testing.do_bench`` (``timer`` replaces it, e.g. for a dry run on the
    CPU with ``device="cpu"``, ``cuda_graph=False``, ``peers=()``). Returns one dict per case.
    """
    if timer is None:
        from triton.testing import do_bench

        def timer(fn):
            return float(do_bench(fn, return_mode="median"))
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("decode_bench needs a CUDA GPU")
    if not isinstance(op, DecodeOp):
        from nsa_dsl.language.parser import as_spec
        op = DecodeOp(as_spec(op))
    spec = op.spec
    PagedNSACache(spec, 1, page_size, page_size=page_size, kv_heads=1, qk_dim=1, v_dim=1)   # E801 before any timing
    n_gates = len(spec.output.branches)
    shapes = dict(kv_heads=H, qk_dim=Dqk, v_dim=Dv, dtype=dtype, device=dev)
    rows = []
    for B in batches:
        for T in cache_lengths:
            if progress:
                progress(f"decode B={B} T={T} q_len={q_len}")
            seed = B * 100003 + T
            g = torch.Generator(device=dev).manual_seed(seed)

            def r(*shape):
                return torch.randn(*shape, device=dev, dtype=dtype, generator=g)
            q = r(B, q_len, HQ, Dqk)
            k_new, v_new = r(B, q_len, H, Dqk), r(B, q_len, H, Dv)
            gates = torch.rand(B, q_len, HQ, n_gates, device=dev, generator=g).to(dtype) \
                if spec.output.kind == "gate" else None
            row = {"B": B, "T": T, "q_len": q_len, "HQ": HQ, "H": H, "Dqk": Dqk, "Dv": Dv,
                   "dtype": str(dtype).split(".")[-1], "page_size": page_size}

            cache = NSACache(spec, B, T, **shapes)
            _prefill(cache, T - q_len, seed)
            row["cache_bytes"] = cache.nbytes()
            o = _time_step(row, "nsa", op, cache, q, k_new, v_new, gates, timer, cuda_graph)
            first = spec.branch_names[0]
            k_full = cache.k[first][:, :T].transpose(1, 2)      # [B, H, T, Dqk], a view of the cache
            v_full = cache.v[first][:, :T].transpose(1, 2)
            q_full = q.transpose(1, 2)                          # [B, HQ, q_len, Dqk]
            for peer in peers:
                try:
                    from torch.nn.attention import SDPBackend, sdpa_kernel
                    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[peer]

                    def sdpa(backend=backend):
                        with sdpa_kernel(backend):
                            return torch.nn.functional.scaled_dot_product_attention(
                                q_full, k_full, v_full, enable_gqa=True)
                    row[f"sdpa_{peer}_ms"] = timer(sdpa)
                except Exception as e:            # noqa: BLE001
                    row[f"sdpa_{peer}_error"] = f"{type(e).__name__}: {e}"
            del cache, k_full, v_full                           # one cache on the device at a time
            _release(dev)

            n_pages = B * cdiv(T, page_size)
            order = list(range(n_pages))
            random.Random(seed).shuffle(order)
            paged = PagedNSACache(spec, B, T, page_size=page_size, num_pages=n_pages, page_order=order, **shapes)
            _prefill(paged, T - q_len, seed)                    # the same tokens
            o_paged = _time_step(row, "paged", op, paged, q, k_new, v_new, gates, timer, cuda_graph)
            row["paged_max_diff"] = (o_paged.float() - o.float()).abs().max().item()
            del paged
            _release(dev)

            best = min((row[f"sdpa_{p}_ms"] for p in peers if f"sdpa_{p}_ms" in row), default=None)
            _ratio(row, "speedup", best, row["nsa_kernel_ms"])
            _ratio(row, "speedup_graph", best, row.get("nsa_graph_ms"))
            _ratio(row, "python_vs_graph", row["nsa_step_ms"], row.get("nsa_step_graph_ms"))
            _ratio(row, "paged_python_vs_graph", row["paged_step_ms"], row.get("paged_step_graph_ms"))
            graphs = "nsa_step_graph_ms" in row and "paged_step_graph_ms" in row
            _ratio(row, "paged_vs_contiguous", *((row["paged_step_graph_ms"], row["nsa_step_graph_ms"]) if graphs
                                                 else (row["paged_step_ms"], row["nsa_step_ms"])))
            rows.append(row)
    return rows


def table_keys(rows: Sequence[dict]) -> list[str]:
    """The columns of a table of decode rows, in order: the times (contiguous, paged, then SDPA and
    any other ``*_ms``), then the ratios; a key no row has is left out."""
    seen = list(dict.fromkeys(k for r in rows for k in r))
    return ([k for k in TIMES if k in seen] + [k for k in seen if k.endswith("_ms") and k not in TIMES]
            + [k for k in RATIOS if k in seen])


def _pool(cache: NSACache):
    """The cache's ``pool`` where a branch learns its pooling (the module's job): the blocks' mean."""
    return mean_blocks if any(b.pool != "mean" for b in cache.spec.of_kind("compress")) else None


def _prefill(cache: NSACache, n: int, seed: int) -> None:
    """``n`` random tokens per sequence appended in chunks (which pools the compressed blocks): the
    same tokens for every cache of the same shapes and seed."""
    B, H, Dqk, Dv = cache.batch_size, cache.kv_heads, cache.qk_dim, cache.v_dim
    g = torch.Generator(device=cache.device).manual_seed(seed + 1)
    fill = max(1, min(n, (1 << 26) // max(1, B * H * (Dqk + Dv))))    # tokens per append
    for c0 in range(0, n, fill):
        m = min(fill, n - c0)
        cache.append(*(torch.randn(B, m, H, D, device=cache.device, dtype=cache.dtype, generator=g) for D in (Dqk, Dv)),
                     pool=_pool(cache))


def _time_step(row: dict, prefix: str, op: DecodeOp, cache: NSACache, q, k_new, v_new, gates, timer,
               cuda_graph: bool) -> torch.Tensor:
    """Time the step over ``cache`` into ``row`` (``<prefix>_step_ms``, ``_kernel_ms``, ``_graph_ms``,
    ``_step_graph_ms``); returns the step's output."""
    B, q_len, HQ = q.shape[:3]
    run, pool = op.runner(cache, q_len, HQ), _pool(cache)
    rewind = _rewinder(cache, q_len)
    before = list(cache.lengths_host)

    def step():                                # the serving step: rewind, append the same tokens, decode
        rewind()
        return run(q, k_new, v_new, gates, pool=pool)

    out = step().clone()                       # compiles; leaves the cache holding T tokens
    at = cache.step_at(before, (q_len,) * B, q_len)

    def kernels():
        return op(q, cache, at, gates)
    row[f"{prefix}_step_ms"] = timer(step)
    row[f"{prefix}_kernel_ms"] = timer(kernels)
    if cuda_graph:
        for key, fn in (("graph", kernels), ("step_graph", step)):
            try:
                row[f"{prefix}_{key}_ms"] = timer(_graph(fn).replay)
            except Exception as e:            # noqa: BLE001 - report it, keep benchmarking
                row[f"{prefix}_{key}_error"] = f"{type(e).__name__}: {e}"
    cache.check()                              # E805 / E816 if a timed append was dropped on the device
    return out


def _rewinder(cache: NSACache, q_len: int) -> Callable[[], None]:
    """A function that puts ``cache`` back where it stands now, before a step of ``q_len`` tokens:
    the lengths (paged: the free-page stack's top and the block table, when the step takes pages)
    on the device, device copies only (a CUDA graph captures them), and the host's mirror."""
    host = list(cache.lengths_host)
    saved = [(cache.lengths, cache.lengths.clone())]
    paged = isinstance(cache, PagedNSACache)
    if paged:
        free = cache.num_pages - cache.pages_in_use()
        P = cache.page_size
        if any(cdiv(s + q_len, P) > cdiv(s, P) for s in host):     # the step takes pages
            saved += [(cache.free_top, cache.free_top.clone()), (cache.block_table, cache.block_table.clone())]

    def rewind():
        for t, s in saved:
            t.copy_(s)
        cache._lengths, cache._host_ok = list(host), True
        if paged:
            cache._free_count = free
    return rewind


def _graph(fn: Callable) -> "torch.cuda.CUDAGraph":
    """``fn`` captured in a CUDA graph (run once on a side stream first, outside the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _ratio(row: dict, key: str, num: Optional[float], den: Optional[float]) -> None:
    if num is not None and den is not None and den > 0:
        row[key] = num / den


def _release(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
