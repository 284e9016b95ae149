"""Decoding and chunked prefill over a KV cache (``nsa_dsl.runtime.kv_cache``): in plain PyTorch
(``decode_torch``, the reference semantics at the new tokens' positions) or with the generated
decode kernels (``DecodeOp``, ``templates/decode.py.j2``).

    step = cache.append(k_new, v_new)                     # [B, C, H, D]
    o = DecodeOp(spec)(q_new, cache, step, gates_new)     # generated kernels
    o = decode_torch(spec, q_new, cache, step, gates_new) # the same in plain PyTorch (CPU friendly)

    run = DecodeOp(spec).runner(cache, C, HQ)            # the serving path: append + decode bound to
    o = run(q_new, k_new, v_new, gates_new)              # the cache, no host sync, graph-capturable

    o = nsa_with_kvcache(spec, q, k, v, pages, block_table, cache_seqlens)   # an engine's call

Token ``i`` of sequence ``b`` sits at position ``start[b] + i`` and attends causally to the cache
``[0, t]``, its own chunk included: the outputs equal those of the full forward
(``nsa_dsl.reference``) at the same positions, for every branch. A decode step is a group of
one: selections with ``query_block = Q`` choose per token here (a group's later positions are
not known yet when its first tokens decode). Contiguous and paged caches
(``PagedNSACache``) run the same kernels; the engine contract is docs/SERVING.md.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import weakref
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from nsa_dsl.errors import SpecError
from nsa_dsl.language.ir import Spec
from nsa_dsl.language.rules import num_compressed_blocks
from nsa_dsl.runtime.backend import check_kernel_device
from nsa_dsl.runtime.kv_cache import (DecodeStep, NSACache, PagedNSACache, Pool, _blocks_between, _counts,
                                      _host_driven, check_block_table, check_decode_call, check_queries)
from nsa_dsl.semantics.inputs import check_scale
from nsa_dsl.semantics.reference import Aux, reference

__all__ = ["DecodeOp", "DecodeRunner", "decode_torch", "per_token", "nsa_with_kvcache"]


def _err(code: str, message: str, hint: str | None = None) -> SpecError:
    return SpecError(code, message, hint=hint)


def per_token(spec: Spec) -> Spec:
    """``spec`` with every selection made per token (``query_block = 1``): what decoding runs."""
    if all(b.kind != "select" or b.query_block == 1 for b in spec.branches):
        return spec
    return dataclasses.replace(spec, branches=tuple(
        dataclasses.replace(b, query_block=1) if b.kind == "select" else b for b in spec.branches))


def decode_torch(spec: Spec, q: Tensor, cache: NSACache, step: DecodeStep, gates: Optional[Tensor] = None, *,
                 scale: Optional[float] = None, return_aux: bool = False,
                 index: Optional[Mapping[str, tuple]] = None, op=None):
    """Every branch for the chunk of ``step``: ``nsa_dsl.reference`` on each sequence's new tokens
    (``q_start`` = its cache length before the chunk) over the keys the cache holds, its pooled
    compressed blocks (mean or learned) and indexer keys (a paged cache's pages gathered into one
    contiguous sequence first). ``q [B, C, HQ, Dqk]``, ``gates [B, C, HQ, n_gates]`` (logits);
    ``index``: indexer branch -> ``(q_idx [B, C, HI, DI], w_idx [B, C, HI])``. Returns
    ``o [B, C, HQ, Dv]`` (q.dtype) or ``(o, Aux)``; padded tokens give 0. Computes in fp32
    (float64 inputs stay float64). ``op``: a compiled op of ``per_token(spec)`` to run instead of
    the reference (its kernels take query pieces), in q's dtype: how indexer specs decode on the
    kernels (one call per sequence, a host sync for the lengths)."""
    check_decode_call(spec, q, cache, step, gates)
    B, C, HQ, Dqk = q.shape
    scale = check_scale(scale, Dqk)
    run = per_token(spec)
    if op is None:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        attend = functools.partial(reference, run)
    else:
        acc, attend = q.dtype, op
    index = dict(index or {})
    if set(index) != set(cache.k_idx):
        raise _err("E627", f"decoding {spec.name} needs index inputs for {sorted(cache.k_idx)}, got {sorted(index)}",
                   hint="index={name: (q_idx [B, C, HI, DI], w_idx [B, C, HI])}")
    start = step.start_host if step.start_host is not None else tuple(step.start.tolist())
    n_new = step.n_host if step.n_host is not None else tuple(step.n_new.tolist())
    o = q.new_zeros(B, C, HQ, cache.v_dim, dtype=acc)
    auxes = []
    for b in range(B):
        s, n = start[b], n_new[b]
        if n == 0:
            auxes.append(None)
            continue
        seq = cache.sequence(b, s + n)
        keys = {name: seq["k"][name].to(acc) for name in spec.attention_names}
        vals = {name: seq["v"][name].to(acc) for name in spec.attention_names}
        compressed = {name: (kc.to(acc), vc.to(acc)) for name, (kc, vc) in seq["cmp"].items()}
        idx_in = {name: (qi[b:b + 1, :n].to(acc), seq["idx"][name].to(acc), wi[b:b + 1, :n].to(acc))
                  for name, (qi, wi) in index.items()}
        out = attend(q[b:b + 1, :n].to(acc), keys, vals,
                        None if gates is None else gates[b:b + 1, :n].to(acc), compressed=compressed or None,
                        scale=scale, return_aux=return_aux, index=idx_in or None, q_start=s)
        o_b, aux_b = out if return_aux else (out, None)
        o[b:b + 1, :n] = o_b
        auxes.append(aux_b)
    if not return_aux:
        return o.to(q.dtype)
    return o.to(q.dtype), _stack_aux(spec, auxes, B, C, HQ, cache, q)


def _stack_aux(spec: Spec, auxes, B, C, HQ, cache, q) -> Aux:
    """The sequences' Aux as one, padded tokens as the kernels give them (-1, -inf, 0)."""
    dev = q.device
    indices, lse, outputs = {}, {}, {}
    for b_ in spec.of_kind("select"):
        H = 1 if spec.score_kind(b_) == "indexer" else cache.kv_heads
        indices[b_.name] = torch.full((B, C, H, b_.top_k), -1, dtype=torch.int32, device=dev)
    for name in spec.attention_names:
        lse[name] = torch.full((B, C, HQ), float("-inf"), dtype=torch.float32, device=dev)
        outputs[name] = q.new_zeros(B, C, HQ, cache.v_dim)
    for b, aux in enumerate(auxes):
        if aux is None:
            continue
        for name, x in aux.indices.items():
            indices[name][b, :x.shape[1]] = x[0]
        for name, x in aux.lse.items():
            lse[name][b, :x.shape[1]] = x[0].float()
        for name, x in aux.outputs.items():
            outputs[name][b, :x.shape[1]] = x[0].to(q.dtype)
    return Aux(indices=indices, lse=lse, outputs=outputs, spec=spec)


# ---------------------------------------------------------------------------------------------
# Decoding with the generated kernels
# ---------------------------------------------------------------------------------------------

def _aux_of(spec: Spec, idx, bo, blse) -> Aux:
    order = [b.name for k in ("compress", "select", "window") for b in spec.of_kind(k)]
    return Aux(indices={b.name: i for b, i in zip(spec.of_kind("select"), idx)},
               lse={n: blse[i] for i, n in enumerate(order)},
               outputs={n: bo[i] for i, n in enumerate(order)}, spec=spec)


def _raw_names(spec: Spec) -> list[str]:
    """Attention branches in the decode plan's order (compress, select, window): the raw buffers
    the append kernel writes."""
    return [b.name for k in ("compress", "select", "window") for b in spec.of_kind(k)]


def _config_key(config: Optional[dict]):
    return None if not config else tuple(sorted(config.items()))


class DecodeOp:
    """The spec's decode kernels (``templates/decode.py.j2`` rendered through ``codegen``,
    cached on disk like the training kernels). ``op(q, cache, step, gates)`` -> o [B, C, HQ, Dv];
    ``op.append(cache, k, v)`` appends with the kernels (a step, no host sync);
    ``op.runner(cache, C, HQ)`` binds append + decode of chunks of C tokens to a cache (the
    serving path)."""

    def __init__(self, spec: Spec, kernel_cache=None):
        self.spec = spec
        self._cache = kernel_cache
        self._modules = {}

    @property
    def kernel_cache(self):
        if self._cache is None:
            from nsa_dsl.codegen.cache import KernelCache
            self._cache = KernelCache()
        return self._cache

    def plan(self, heads: int, kv_heads: int, qk_dim: int, v_dim: int):
        from nsa_dsl.codegen.plan import bind, lower_decode
        return lower_decode(self.spec, bind(self.spec, heads, kv_heads, qk_dim, v_dim))

    def module(self, heads: int, kv_heads: int, qk_dim: int, v_dim: int):
        """The launcher for these shapes (``nsa_dsl.codegen.launch.decode.Decode``) over its rendered kernels."""
        key = (heads, kv_heads, qk_dim, v_dim)
        if key not in self._modules:
            from nsa_dsl.codegen import launch
            plan = self.plan(*key)
            self._modules[key] = launch.build(plan, self.kernel_cache.load(plan))["decode"]
        return self._modules[key]

    def source(self, heads: int, kv_heads: int, qk_dim: int, v_dim: int) -> str:
        """The generated Triton source for these shapes."""
        return Path(self.module(heads, kv_heads, qk_dim, v_dim).kernels.__file__).read_text()

    def _check_runs(self, q: Tensor) -> None:
        check_kernel_device(q, q.dtype, reference_hint="decode_torch (backend='reference')")
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise _err("E606", f"q has dtype {q.dtype}; the decode kernels take float16, bfloat16 or float32",
                       hint="use decode_torch (backend='reference') for float64")
        if self.spec.of_kind("indexer"):
            raise _err("E627", f"{self.spec.name} scores with an indexer, which the decode kernels do not run yet",
                       hint="decode with decode_torch (the layer's backend='reference')")

    def _launch(self, cache: NSACache, q: Tensor, scale: float, aux: bool, config, t_max: int):
        """The decode launch bound to ``cache`` for q's shape (kept by the cache, per planned length)."""
        key = ("decode", id(self), tuple(q.shape), q.stride(), q.dtype, scale, aux, _config_key(config), t_max)
        launch = cache._runners.get(key)
        if launch is None:
            spec = self.spec
            mod = self.module(q.shape[2], cache.kv_heads, cache.qk_dim, cache.v_dim)
            cmp = [(cache.k_cmp[b.name], cache.v_cmp[b.name]) for b in spec.of_kind("compress")]
            sel = [(cache.k[b.name], cache.v[b.name], cache.k_mean.get(b.name)) for b in spec.of_kind("select")]
            win = [(cache.k[b.name], cache.v[b.name]) for b in spec.of_kind("window")]
            launch = cache._runners[key] = mod.bind(q, cmp, sel, win, scale, t_max=t_max, aux=aux, config=config,
                                                    table=getattr(cache, "block_table", None),
                                                    page=cache.page_size or 0)
        return launch

    def __call__(self, q: Tensor, cache: NSACache, step: DecodeStep, gates: Optional[Tensor] = None, *,
                 scale: Optional[float] = None, return_aux: bool = False, config: Optional[dict] = None):
        check_decode_call(self.spec, q, cache, step, gates)
        self._check_runs(q)
        scale = check_scale(scale, q.shape[-1])
        if q.stride(-1) != 1:
            q = q.contiguous()
        # planned for the step's longest cache (a power of two: few plans as a cache grows), else the capacity
        t = step.t_max
        t_plan = cache.capacity if t is None else min(cache.capacity, 1 << max(t - 1, 0).bit_length())
        launch = self._launch(cache, q, scale, return_aux, config, t_plan)
        o, idx, bo, blse = launch(q, step.start, step.n_new, gates)
        return (o, _aux_of(self.spec, idx, bo, blse)) if return_aux else o

    def append(self, cache: NSACache, k, v, *, n_new=None, pool: Optional[Pool] = None) -> DecodeStep:
        """Append a chunk with the kernels (``append_kernel``): no host sync, the lengths advance on
        the device (the host's mirror too when it knows ``n_new``). Returns its step, valid until
        the next append. ``k``, ``v``, ``n_new`` and ``pool`` as ``NSACache.append``."""
        ks, vs, _, C = cache.check_chunk(k, v, None)
        run = self.runner(cache, C, None)
        nq = run.counts(n_new)
        run.append(ks, vs, nq, pool, n_host=n_new)
        cache.serial += 1
        return DecodeStep(cache.step_start, run.n_full if nq is None else nq, None, None, C, weakref.ref(cache),
                          cache.generation, cache.serial)

    def runner(self, cache: NSACache, C: int, heads: Optional[int], *, scale: Optional[float] = None,
               aux: bool = False, config: Optional[dict] = None) -> "DecodeRunner":
        """Append + decode of chunks of ``C`` tokens of ``cache`` with ``heads`` query heads (None:
        append only), bound once and kept by the cache."""
        key = ("runner", id(self), C, heads, scale, aux, _config_key(config))
        run = cache._runners.get(key)
        if run is None:     # under torch.compile: a graph break the first time (the binding allocates)
            run = _new_runner(self, cache, key, C, heads, scale, aux, config)
        return run


@torch.compiler.disable
def _new_runner(op: DecodeOp, cache: NSACache, key, C, heads, scale, aux, config) -> "DecodeRunner":
    run = cache._runners[key] = DecodeRunner(op, cache, C, heads, scale=scale, aux=aux, config=config)
    return run


class DecodeRunner:
    """The serving path of one cache: chunks of C tokens appended (``append_kernel``: raw keys and
    values, pages taken on the device, mean pooling; learned pooling as PyTorch ops on the
    candidate blocks) and decoded (the decode kernels), with the launches bound once.

    ``run(q, k, v, gates, n_new=None, pool=None)`` -> o: no host sync and nothing read from the
    host's mirror of the lengths, so a CUDA graph or ``torch.compile`` can capture it. Outside a
    capture, when the host knows the counts (``n_new`` None or a list), it keeps its mirror of the
    lengths and free pages and refuses an append past the capacity (E805) or the pool (E816)
    before anything runs, and skips learned pooling on steps that complete no block; inside one
    (or with ``n_new`` a tensor) the kernels guard the capacity and the pool on the device (the
    chunk is dropped, ``cache.check()`` raises) and the mirror is re-read when next needed."""

    def __init__(self, op: DecodeOp, cache: NSACache, C: int, heads: Optional[int], *, scale, aux, config):
        spec = op.spec
        self.op, self.spec, self.cache, self.C = op, spec, weakref.ref(cache), C
        self.heads, self.aux = heads, aux
        fam = op.module(heads, cache.kv_heads, cache.qk_dim, cache.v_dim) if heads is not None else \
            _any_module(op, cache)
        names = _raw_names(spec)
        self.raw = [names[0]] if cache.shared_kv else names
        paged = isinstance(cache, PagedNSACache)
        state = (cache.lengths, cache.step_start, cache.lengths, cache.err, cache.capacity)
        self.app = fam.bind_append([(cache.k[n], cache.v[n]) for n in names],
                                   [cache._flat_cmp[b.name] for b in spec.of_kind("compress")],
                                   [cache.k_mean[b.name] for b in spec.of_kind("select") if b.score == "mean_pool"],
                                   C=C, state=state, table=cache.block_table if paged else None,
                                   page=cache.page_size or 0,
                                   alloc=(cache.free_pages, cache.free_top) if paged else None,
                                   shared=cache.shared_kv)
        self.n_full = self.app.n_full
        self.learned = [(i, b) for i, b in enumerate(spec.of_kind("compress")) if b.pool != "mean"]
        self.dec = None
        if heads is not None:
            self.scale = check_scale(scale, cache.qk_dim)
            q = torch.empty((cache.batch_size, C, heads, cache.qk_dim), dtype=cache.dtype, device=cache.device)
            self.dec = op._launch(cache, q, self.scale, aux, config, cache.capacity)
            _key(self.dec)
        _key(self.app)                                # the custom ops' names for them (torch.compile)

    def counts(self, n_new) -> Optional[Tensor]:
        """``n_new`` as the kernels take it: None (every sequence takes C), an int32 device tensor."""
        cache = self.cache()
        if n_new is None:
            return None
        if isinstance(n_new, Tensor) and n_new.device == cache.device and n_new.dtype == torch.int32 \
                and n_new.shape == (cache.batch_size,):
            return n_new
        counts = _counts(n_new, cache.batch_size, self.C)
        t = torch.tensor(counts, dtype=torch.int32)
        if cache.device.type == "cuda":
            return t.pin_memory().to(cache.device, non_blocking=True)    # no sync
        return t.to(cache.device)

    def _host_counts(self, cache: NSACache, n_new) -> Optional[tuple[list, list]]:
        """(lengths before, tokens) of the chunk as the host knows them, room checked (E805, E816);
        None when the host cannot know (capturing, compiling, counts only on the device)."""
        if not _host_driven() or isinstance(n_new, Tensor):
            return None
        if not cache._host_ok:
            cache._refresh_host()                     # a sync, once after steps that ran without the host
        B, C = cache.batch_size, self.C
        n_host = [C] * B if n_new is None else _counts(n_new, B, C)
        old = list(cache._lengths)
        cache.check_room(old, n_host)
        if isinstance(cache, PagedNSACache):
            P = cache.page_size
            need = sum(-(-(s + n) // P) + (s // -P) for s, n in zip(old, n_host))
            if need > cache._free_host():
                raise _err("E816", f"the chunk needs {need} new pages but {cache._free_host()} of "
                                   f"{cache.num_pages} are free",
                           hint="free() finished sequences, or allocate more pages (num_pages=)")
        return old, n_host

    def append(self, ks: Mapping[str, Tensor], vs: Mapping[str, Tensor], nq: Optional[Tensor],
               pool: Optional[Pool], n_host=None) -> None:
        """Append the chunk (keys / values by branch; ``nq`` the kernels' counts, ``n_host`` the
        caller's ``n_new`` as given)."""
        cache = self.cache()
        known = self._host_counts(cache, n_host)
        complete = [(i, b) for i, b in self.learned if known is None or _blocks_between(known[0], known[1], b)]
        if complete and pool is None:
            raise _err("E806", f"branch '{complete[0][1].name}' pools with '{complete[0][1].pool}': the append needs "
                               "pool=callable(name, k_blocks, v_blocks) for its new blocks",
                       hint="SparseAttention(..., cache=...) passes its learned pooling")
        if known is None:
            cache._host_ok = False                    # re-read when next needed
        else:
            old, n_host = known
            if isinstance(cache, PagedNSACache):
                P = cache.page_size
                cache._taken(sum(-(-(s + n) // P) + (s // -P) for s, n in zip(old, n_host)))
            cache._lengths = [s + n for s, n in zip(old, n_host)]
        _run_append(self.app, [_unit_rows(ks[n]) for n in self.raw], [_unit_rows(vs[n]) for n in self.raw], nq)
        for i, b in complete:                         # learned pooling of the candidate blocks the kernel listed
            _pool_candidates(cache, b.name, self.app.gather[i], self.app.dest[i], pool)

    def __call__(self, q: Tensor, k, v, gates: Optional[Tensor] = None, *, n_new=None,
                 pool: Optional[Pool] = None):
        """Append ``k``, ``v`` (tensors [B, C, H, D] or dicts by branch) and decode ``q`` [B, C, HQ, Dqk]:
        o [B, C, HQ, Dv] (and Aux when bound with aux)."""
        cache = self.cache()
        ks, vs = cache._per_branch(k, "k"), cache._per_branch(v, "v")
        nq = self.counts(n_new)
        self.append(ks, vs, nq, pool, n_host=n_new)
        if q.stride() != self.dec.q_strides:
            q = q.contiguous()
        o, idx, bo, blse = _run_decode(self.dec, q, cache.step_start, self.n_full if nq is None else nq, gates)
        return (o, _aux_of(self.spec, idx, bo, blse)) if self.aux else o


def _any_module(op: DecodeOp, cache: NSACache):
    """A decode module for the cache's kv heads and dims (appends only: any query head count will do)."""
    for (_, H, Dqk, Dv), mod in op._modules.items():
        if (H, Dqk, Dv) == (cache.kv_heads, cache.qk_dim, cache.v_dim):
            return mod
    return op.module(op.spec.heads or cache.kv_heads, cache.kv_heads, cache.qk_dim, cache.v_dim)


def _pool_candidates(cache: NSACache, name: str, g: Tensor, d: Tensor, pool: Pool) -> None:
    """Learned pooling of compress branch ``name``'s candidate blocks listed by the append kernel
    (their keys' flat rows ``g``, their entries' ``d``; candidates a chunk does not complete go to
    the spare row): PyTorch ops, no host sync."""
    k_c, v_c = pool(name, cache.flat(cache.k[name])[g], cache.flat(cache.v[name])[g])   # [B * MC, L, H, D] each
    kf, vf = cache._flat_cmp[name]
    kf.index_copy_(0, d, k_c.to(cache.dtype))
    vf.index_copy_(0, d, v_c.to(cache.dtype))


def _unit_rows(x: Tensor) -> Tensor:
    """A chunk [B, C, H, D] with (H, D) contiguous, as the append kernel reads it."""
    return x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous()


# ---------------------------------------------------------------------------------------------
# The engine-facing call (docs/SERVING.md)
# ---------------------------------------------------------------------------------------------

def nsa_with_kvcache(op, q: Tensor, k, v, pages: PagedNSACache, block_table: Tensor, cache_seqlens: Tensor, *,
                     n_new: Optional[Tensor] = None, gates: Optional[Tensor] = None, pool: Optional[Pool] = None,
                     scale: Optional[float] = None, check: Optional[bool] = None) -> Tensor:
    """Attention of the new tokens over a paged cache, in ``flash_attn_with_kvcache``'s convention:
    an engine's call (docs/SERVING.md).

    op: a :class:`DecodeOp` (or a spec); q [B, C, HQ, Dqk]; k, v [B, C, H, D] the new tokens' keys
    and values (dicts by branch for per-branch K/V; None: already in the cache), written at
    positions ``cache_seqlens[b] + i`` through ``block_table``, with the compressed blocks and block
    means they complete pooled (learned pooling through ``pool``); pages: the layer's page pools (a
    :class:`PagedNSACache`; its own table and lengths play no part); block_table [B, W] int32 (the
    engine's: entry j = the pool page of positions [j * P, (j + 1) * P), every page up to
    ``cache_seqlens[b] + n_new[b]`` allocated); cache_seqlens [B] int32 lengths before the chunk
    (the engine advances them); n_new [B] int32 real tokens per sequence (None: C; vLLM's seq_lens
    = cache_seqlens + n_new). Returns o [B, C, HQ, Dv]. No host sync: the table and lengths are
    checked against the pool (:func:`~nsa_dsl.runtime.kv_cache.check_block_table`, a sync) only
    with ``check=True`` or ``NSA_DSL_DEBUG=1``; engines call it once per table update. The kernels
    never read or write outside the table or the pool whatever they hold."""
    if not isinstance(op, DecodeOp):
        from nsa_dsl.language.parser import as_spec
        op = _ops_of(as_spec(op))
    if not isinstance(pages, PagedNSACache):
        raise _err("E813", f"pages must be a PagedNSACache (the layer's page pools), got {type(pages).__name__}")
    _check_table_shape(pages, block_table, cache_seqlens, n_new)
    B = block_table.shape[0]
    C = q.shape[1] if isinstance(q, Tensor) and q.dim() == 4 else -1
    check_queries(op.spec, q, pages, C, gates, batch=B)
    op._check_runs(q)
    if check if check is not None else os.environ.get("NSA_DSL_DEBUG") == "1":
        check_block_table(pages, block_table, cache_seqlens, n_new=n_new if n_new is not None else [C] * B)
    scale = check_scale(scale, q.shape[-1])
    key = ("engine", id(op), tuple(q.shape), q.dtype, scale, block_table.data_ptr(), tuple(block_table.shape),
           block_table.stride(0), cache_seqlens.data_ptr())
    run = pages._runners.get(key)
    if run is None:
        engine = [x for x in pages._runners if x[0] == "engine"]
        for x in engine[:max(0, len(engine) - 3)]:    # the last few tables an engine used stay bound
            del pages._runners[x]
        run = pages._runners[key] = _EngineRun(op, pages, q, scale, block_table, cache_seqlens)
    return run(q, k, v, gates, n_new, pool)


def _check_table_shape(pages: PagedNSACache, block_table, cache_seqlens, n_new) -> None:
    """What costs nothing per step: the tensors' kinds and shapes (E813)."""
    if not isinstance(block_table, Tensor) or block_table.dim() != 2 or block_table.dtype != torch.int32 \
            or block_table.device != pages.device:
        raise _err("E813", f"block_table must be an int32 tensor [B, W] on {pages.device}, got "
                           f"{getattr(block_table, 'dtype', type(block_table).__name__)} "
                           f"{list(getattr(block_table, 'shape', []))}")
    B = block_table.shape[0]
    for name, t in (("cache_seqlens", cache_seqlens), ("n_new", n_new)):
        if t is None and name == "n_new":
            continue
        if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.device != pages.device or tuple(t.shape) != (B,):
            raise _err("E813", f"{name} must be an int32 tensor [{B}] (one per block table row) on "
                               f"{pages.device}, got {getattr(t, 'dtype', type(t).__name__)} "
                               f"{list(getattr(t, 'shape', []))}")


_OPS: dict = {}


def _ops_of(spec: Spec) -> DecodeOp:
    op = _OPS.get(spec)
    if op is None:
        op = _OPS[spec] = DecodeOp(spec)
    return op


class _EngineRun:
    """The engine call's launches bound to one pool, block table and lengths tensor (``nsa_with_kvcache``)."""

    def __init__(self, op: DecodeOp, pages: PagedNSACache, q: Tensor, scale: float, block_table, cache_seqlens):
        spec = op.spec
        C, HQ = q.shape[1], q.shape[2]
        self.spec, self.pages = spec, weakref.ref(pages)
        fam = op.module(HQ, pages.kv_heads, pages.qk_dim, pages.v_dim)
        names = _raw_names(spec)
        self.raw = [names[0]] if pages.shared_kv else names
        cap = block_table.shape[1] * pages.page_size
        self.app = fam.bind_append([(pages.k[n], pages.v[n]) for n in names],
                                   [pages._flat_cmp[b.name] for b in spec.of_kind("compress")],
                                   [pages.k_mean[b.name] for b in spec.of_kind("select") if b.score == "mean_pool"],
                                   C=C, state=(cache_seqlens, None, None, pages.err, cap), table=block_table,
                                   page=pages.page_size, alloc=None, shared=pages.shared_kv)
        self.learned = [(i, b) for i, b in enumerate(spec.of_kind("compress")) if b.pool != "mean"]
        qc = q if q.stride(-1) == 1 else q.contiguous()
        cmp = [(pages.k_cmp[b.name], pages.v_cmp[b.name]) for b in spec.of_kind("compress")]
        sel = [(pages.k[b.name], pages.v[b.name], pages.k_mean.get(b.name)) for b in spec.of_kind("select")]
        win = [(pages.k[b.name], pages.v[b.name]) for b in spec.of_kind("window")]
        self.dec = fam.bind(qc, cmp, sel, win, scale, t_max=cap, table=block_table, page=pages.page_size)
        self.seqlens = cache_seqlens
        _key(self.app), _key(self.dec)

    def __call__(self, q, k, v, gates, n_new, pool):
        pages = self.pages()
        if k is not None:
            if self.learned and pool is None:
                raise _err("E806", f"branch '{self.learned[0][1].name}' pools with '{self.learned[0][1].pool}': the call "
                                   "needs pool=callable(name, k_blocks, v_blocks) for the blocks it completes")
            ks, vs, _, C = pages.check_chunk(k, v, batch=q.shape[0])   # shapes only: no sync
            if C != q.shape[1]:
                raise _err("E803", f"k and v hold {C} new tokens per sequence, q holds {q.shape[1]}",
                           hint="the chunk's q, k and v have the same C: [B, C, heads, dim]")
            _run_append(self.app, [_unit_rows(ks[n]) for n in self.raw], [_unit_rows(vs[n]) for n in self.raw], n_new)
            for i, b in self.learned:
                _pool_candidates(pages, b.name, self.app.gather[i], self.app.dest[i], pool)
        if q.stride() != self.dec.q_strides:
            q = q.contiguous()
        return _run_decode(self.dec, q, self.seqlens, self.app.n_full if n_new is None else n_new, gates)[0]


# ---------------------------------------------------------------------------------------------
# torch.compile: the bound launches as custom ops (eager calls launch directly: no dispatch cost)
# ---------------------------------------------------------------------------------------------

_BOUND: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()   # kept alive by their caches


def _key(launch) -> str:
    """The string a custom op finds a bound launch by (dynamo traces a string, not the object);
    registered when the launch is bound, outside any trace."""
    key = getattr(launch, "_op_key", None)
    if key is None:
        key = launch._op_key = f"{type(launch).__name__}.{id(launch)}"
        _BOUND[key] = launch
    return key


def _run_append(app, k_new: list, v_new: list, nq: Optional[Tensor]) -> None:
    if torch.compiler.is_compiling():
        torch.ops.nsa_dsl.decode_append(app._op_key, k_new, v_new, nq, app.tensors())
    else:
        app(k_new, v_new, nq)


def _run_decode(dec, q: Tensor, start: Tensor, nq: Tensor, gates: Optional[Tensor]):
    if not torch.compiler.is_compiling():
        return dec(q, start, nq, gates)
    outs = torch.ops.nsa_dsl.decode_attend(dec._op_key, q, start, nq, gates, dec.tensors())
    if not dec.aux:
        return outs[0], None, None, None
    n = len(dec.fam.SEL)
    return outs[0], outs[1:1 + n], outs[1 + n], outs[2 + n]


@torch.library.custom_op("nsa_dsl::decode_append", mutates_args=("bufs",))
def decode_append(key: str, k_new: list[Tensor], v_new: list[Tensor], nq: Optional[Tensor],
                  bufs: list[Tensor]) -> None:
    """A bound append (``AppendLaunch``): writes the cache's buffers ``bufs`` (all it touches)."""
    _BOUND[key](k_new, v_new, nq, bufs=bufs)


@decode_append.register_fake
def _decode_append_fake(key, k_new, v_new, nq, bufs) -> None:
    return None


@torch.library.custom_op("nsa_dsl::decode_attend", mutates_args=())
def decode_attend(key: str, q: Tensor, start: Tensor, nq: Tensor, gates: Optional[Tensor],
                  bufs: list[Tensor]) -> list[Tensor]:
    """A bound decode (``DecodeLaunch``) over the cache's buffers ``bufs``: [o] (with aux: [o, idx of
    each select branch, branch outputs, lse])."""
    dec = _BOUND[key]
    o, idx, bo, blse = dec(q, start, nq, gates, bufs=bufs)
    return [o, *idx, bo, blse] if dec.aux else [o]


@decode_attend.register_fake
def _decode_attend_fake(key, q, start, nq, gates, bufs) -> list[Tensor]:
    dec = _BOUND[key]
    fam, (B, C, HQ) = dec.fam, dec.shape
    o = q.new_empty(B, C, HQ, fam.DV)
    if not dec.aux:
        return [o]
    H = HQ // fam.G
    return [o, *[q.new_empty(B, C, H, s.TOPK, dtype=torch.int32) for s in fam.SEL],
            q.new_empty(fam.NBR, B, C, HQ, fam.DV), q.new_empty(fam.NBR, B, C, HQ, dtype=torch.float32)]
