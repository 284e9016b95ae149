"""A layer's KV cache for decoding and chunked prefill: what it holds, how tokens are appended,
and the steps that say where an append's tokens sit.

    cache = NSACache(spec, batch_size, max_len, kv_heads=H, qk_dim=Dqk, v_dim=Dv)
    cache = PagedNSACache(spec, batch_size, max_len, page_size=16, ...)   # pages through a block table
    step = cache.append(k_new, v_new)                     # [B, C, H, D]; pools new compressed blocks

Token ``i`` of a chunk of ``C`` new tokens of sequence ``b`` sits at position ``start[b] + i``
(``start`` = the cache length before the chunk). Sequences of a batch may have different
lengths; ``append(..., n_new=[...])`` appends fewer than ``C`` tokens to some of them (right
padding; padded tokens output 0). ``free(seqs)`` ends sequences: their lengths go to 0 (paged:
their pages go back to the pool, for any sequence to take).

What the cache holds, per layer (streams):
  raw keys / values: one pair shared by every branch (``shared_kv``) or one per branch (the
  paper's independent K/V); compress branches read them only to pool new blocks. Compressed keys /
  values per compress branch: block ``i`` is pooled once, when its last key arrives
  (``i*d + l - 1 < length``): mean pooling of its ``l`` keys, or the caller's learned pooling
  (``pool=`` callable) on the new blocks only. Block means (fp32) per ``score = mean_pool`` select
  branch, once a block is complete. Indexer keys per indexer branch. Lengths ``[B]`` int32 on the
  device (the truth, what kernels read) and a host mirror (``lengths_host``; re-read from the device
  after steps that ran without the host: CUDA graphs, ``torch.compile``).

Layouts (``docs/SERVING.md``): contiguous (``NSACache``), one row of ``max_len`` positions per
sequence: raw ``[B, max_len, H, D]``, compressed ``[B, max_Nc, H, D]``, block means
``[B, max_len // l', H, Dqk]``, indexer keys ``[B, max_len, DI]``. Paged (``PagedNSACache``), pools
of ``num_pages`` pages of ``P`` positions, addressed through a block table ``[B, W]`` int32 (page
``j`` of sequence ``b`` = ``block_table[b, j]``, -1 when it has none): raw ``[num_pages, P, H, D]``,
compressed ``[num_pages, cdiv(P, d), H, D]``, block means ``[num_pages, cdiv(P, l'), H, Dqk]``,
indexer keys ``[num_pages, P, DI]``. A pooled entry (compressed block ``i``, starting at
position ``i * d``) lives in the page of its first position, at slot ``(i * d % P) // d``.

Decoding is causal (a new token never changes earlier outputs): a spec with ``causal = false``
has no cache (E812). No gradients: the buffers are plain tensors written in place.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from nsa_dsl.errors import SpecError
from nsa_dsl.language.ir import Spec
from nsa_dsl.language.rules import num_compressed_blocks

__all__ = ["NSACache", "PagedNSACache", "DecodeStep", "check_step", "check_decode_call", "check_block_table", "Pool"]

TensorOrDict = Union[Tensor, Mapping[str, Tensor]]
# pool(name, k_blocks [P, l, H, Dqk], v_blocks [P, l, H, Dv]) -> (k_cmp [P, H, Dqk], v_cmp [P, H, Dv])
Pool = Callable[[str, Tensor, Tensor], tuple[Tensor, Tensor]]


def _err(code: str, message: str, hint: str | None = None) -> SpecError:
    return SpecError(code, message, hint=hint)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _new_buffer(shape, dtype, device) -> Tensor:
    # NaN-filled under NSA_DSL_NAN_FILL=1 (the tests): reading a slot nothing wrote fails loudly
    if os.environ.get("NSA_DSL_NAN_FILL") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


def _with_trash_row(shape, dtype, device) -> tuple[Tensor, Tensor]:
    """A buffer ``shape`` = [N, E, *row] and its flat view [N * E + 1, *row] whose last row is spare:
    learned pooling scatters the candidate blocks a step does not complete there (no host sync)."""
    flat = _new_buffer((shape[0] * shape[1] + 1, *shape[2:]), dtype, device)
    return flat[:-1].view(shape), flat


def _host_driven() -> bool:
    """False while a CUDA graph is captured or torch.compile traces: nothing may read or advance
    the host's mirror of the lengths then (replays and compiled calls never run this Python)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


@dataclass(frozen=True)
class DecodeStep:
    """Where the chunk of one ``append`` sits: token ``i`` of sequence ``b`` at ``start[b] + i``,
    for ``i < n_new[b]`` (the rest is padding). ``start_host`` / ``n_host`` are None for a step
    whose lengths only the device knows (appended by the kernels without the host's mirror)."""
    start: Tensor                 # [B] int32, on the cache's device: lengths before the chunk
    n_new: Tensor                 # [B] int32: tokens appended per sequence (<= chunk)
    start_host: Optional[tuple[int, ...]]
    n_host: Optional[tuple[int, ...]]
    chunk: int                    # C: tokens per sequence in the chunk tensors
    cache: Optional[Callable] = field(default=None, compare=False, repr=False)   # weakref to its NSACache
    generation: int = -1          # the cache's generation (reset() / free() start a new one)
    serial: int = -1              # the cache's append count, for steps whose start is the cache's
                                  # step buffer (kernel appends: valid until the next append)

    @property
    def t_max(self) -> Optional[int]:
        """The longest cache after the append (None when only the device knows it)."""
        if self.start_host is None or self.n_host is None:
            return None
        return max((s + n for s, n in zip(self.start_host, self.n_host)), default=0)


class NSACache:
    """Preallocated contiguous KV cache of one layer for ``spec``; see the module docstring.

    Args:
        spec: the layer's spec.
        batch_size, max_len: sequences and the longest cache they may reach.
        kv_heads, qk_dim, v_dim: key/value heads and head dims.
        shared_kv: one raw key/value pair for every branch (else one per branch).
        dtype, device: of the buffers (block means are fp32).
    Attributes: ``k``, ``v`` (branch name -> raw buffer; shared buffers are the same tensor),
    ``k_cmp``, ``v_cmp`` (compress branch -> buffer), ``k_mean`` (mean_pool select branch ->
    fp32 buffer), ``k_idx`` (indexer branch -> buffer), ``lengths`` ([B] int32 on ``device``),
    ``lengths_host`` (tuple of ints), ``page_size`` (None: contiguous), ``capacity`` (positions
    a sequence may reach).
    """

    page_size: Optional[int] = None

    def __init__(self, spec: Spec, batch_size: int, max_len: int, *, kv_heads: int, qk_dim: int,
                 v_dim: int, shared_kv: bool = True, dtype: torch.dtype = torch.float32, device="cpu"):
        for name, x in (("batch_size", batch_size), ("max_len", max_len), ("kv_heads", kv_heads),
                        ("qk_dim", qk_dim), ("v_dim", v_dim)):
            if not isinstance(x, int) or isinstance(x, bool) or x < 1:
                raise _err("E801", f"{type(self).__name__}: {name} must be a positive integer, got {x!r}")
        if not spec.causal:
            raise _err("E812", f"spec '{spec.name}' is not causal (causal = false): a KV cache decodes "
                               "causal attention, where a new token never changes earlier outputs",
                       hint="run the whole sequence at once: call the op or the layer without a cache")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise _err("E801", f"{type(self).__name__}: dtype must be a floating-point torch dtype, got {dtype!r}",
                       hint="float16, bfloat16 or float32 (float64 for the reference backend)")
        self.spec = spec
        self.batch_size, self.max_len = batch_size, max_len
        self.kv_heads, self.qk_dim, self.v_dim = kv_heads, qk_dim, v_dim
        self.shared_kv = bool(shared_kv)
        self.dtype, self.device = dtype, torch.device(device)
        B = batch_size
        self.generation = 0                    # reset() / free() start a new one: older steps are refused
        self.serial = 0                        # appends by the kernels (their steps share step_start)
        self.lengths = torch.zeros(B, dtype=torch.int32, device=self.device)
        self.device = self.lengths.device      # "cuda" -> "cuda:0": compares equal to tensors' devices
        self.step_start = torch.zeros(B, dtype=torch.int32, device=self.device)   # kernel appends: the step's start
        self.err = torch.zeros(1, dtype=torch.int32, device=self.device)          # kernel appends: 1 capacity, 2 pages
        self._lengths = [0] * B
        self._host_ok = True                   # the host mirror equals the device lengths
        self._runners: dict = {}               # the kernels' bound launches of this cache (decoding.py)
        self._allocate()
        self._mark_static()

    # -- layout ------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """The positions a sequence may reach."""
        return self.max_len

    def _rows_per_seq(self, span: int) -> int:
        """Entries of a stream of span ``span`` per sequence (contiguous) or per page (paged)."""
        return self.max_len if span == 1 else max(1, self.max_len // span)

    def _allocate(self) -> None:
        """The buffers, [rows, entries, ...]: rows = sequences here, pages when paged."""
        spec, H, n = self.spec, self.kv_heads, self._n_rows()
        names = spec.attention_names         # every attention branch reads raw keys (compress: to pool)
        raw = (n, self._rows_per_seq(1), H)
        if self.shared_kv:
            k, v = _new_buffer((*raw, self.qk_dim), self.dtype, self.device), _new_buffer((*raw, self.v_dim), self.dtype, self.device)
            self.k, self.v = {x: k for x in names}, {x: v for x in names}
        else:
            self.k = {x: _new_buffer((*raw, self.qk_dim), self.dtype, self.device) for x in names}
            self.v = {x: _new_buffer((*raw, self.v_dim), self.dtype, self.device) for x in names}
        self.k_cmp, self.v_cmp, self.k_mean, self._flat_cmp = {}, {}, {}, {}
        for b in spec.of_kind("compress"):
            e = self._cmp_entries(b)
            kc, kf = _with_trash_row((n, e, H, self.qk_dim), self.dtype, self.device)
            vc, vf = _with_trash_row((n, e, H, self.v_dim), self.dtype, self.device)
            self.k_cmp[b.name], self.v_cmp[b.name], self._flat_cmp[b.name] = kc, vc, (kf, vf)
        for b in spec.of_kind("select"):
            if b.score == "mean_pool":
                self.k_mean[b.name] = _new_buffer((n, self._rows_per_seq(b.block), H, self.qk_dim),
                                                  torch.float32, self.device)
        self.k_idx = {b.name: _new_buffer((n, self._rows_per_seq(1), b.dim), self.dtype, self.device)
                      for b in spec.of_kind("indexer")}

    def _n_rows(self) -> int:
        return self.batch_size

    def _cmp_entries(self, b) -> int:
        return max(1, num_compressed_blocks(self.max_len, b.block, b.stride))

    def _mark_static(self) -> None:
        """The buffers keep their addresses for the cache's life: torch.compile's CUDA graphs
        (mode="reduce-overhead") may then write them in place, as transformers' StaticCache does."""
        if torch.compiler.is_compiling() or self.device.type != "cuda":
            return
        for t in self.tensors():
            torch._dynamo.mark_static_address(t)

    def tensors(self) -> list[Tensor]:
        """Every buffer of the cache, each once."""
        seen, out = set(), []
        for t in [*self.k.values(), *self.v.values(), *(f for pair in self._flat_cmp.values() for f in pair),
                  *self.k_mean.values(), *self.k_idx.values(), self.lengths, self.step_start, self.err,
                  *self._extra_tensors()]:
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out

    def _extra_tensors(self) -> list[Tensor]:
        return []

    def _rows(self, bi: Tensor, first: Tensor, span: int, per: int) -> Tensor:
        """Flat rows (int64) of entries ``first`` of sequences ``bi`` in a stream whose entry ``i``
        starts at position ``i * span`` (raw: span 1), ``per`` entries per sequence."""
        return bi * per + first

    def flat(self, t: Tensor) -> Tensor:
        """A buffer as rows [entries of every sequence or page, *row] (the view the rows index)."""
        return t.view(t.shape[0] * t.shape[1], *t.shape[2:])

    def __repr__(self) -> str:
        paged = f", page_size={self.page_size}" if self.page_size else ""
        return (f"{type(self).__name__}({self.spec.name}: B={self.batch_size}, max_len={self.max_len}{paged}, "
                f"H={self.kv_heads}, Dqk={self.qk_dim}, Dv={self.v_dim}, {self.dtype}, "
                f"lengths={list(self.lengths_host)})")

    # -- lengths -----------------------------------------------------------------------------------
    @property
    def lengths_host(self) -> tuple[int, ...]:
        """The lengths as host ints: the mirror, re-read from the device (a sync) after steps that
        ran without the host."""
        if not self._host_ok:
            self._refresh_host()
        return tuple(self._lengths)

    def _refresh_host(self) -> None:
        self._lengths = [int(x) for x in self.lengths.tolist()]
        self._host_ok = True

    def check(self) -> None:
        """Raise what the kernels' appends flagged on the device (a sync): E805 (a chunk past the
        capacity) or E816 (the page pool ran out); those chunks were not written."""
        flag = int(self.err.item())
        if flag:
            self.err.zero_()
            self._host_ok = False
            if flag & 1:
                raise _err("E805", f"an append on the device went past the cache's capacity ({self.capacity} "
                                   "positions); its tokens were not written",
                           hint="allocate a longer cache (new_cache(batch_size, max_len)) or free() sequences")
            raise _err("E816", "an append on the device found no free page in the pool; its tokens were not written",
                       hint="free() finished sequences, or allocate more pages (num_pages=)")

    def reset(self) -> None:
        """Forget every sequence (buffers are kept; their stale contents are never read)."""
        self.free(range(self.batch_size))

    def free(self, seqs: Sequence[int]) -> None:
        """End sequences ``seqs`` (indices into the batch): their lengths go to 0 and, paged, their
        pages back to the pool. Steps from before are refused (E811). No host sync."""
        seqs = self._check_seqs(seqs)
        if not seqs:
            return
        idx = torch.tensor(seqs, dtype=torch.long, device=self.device) if len(seqs) < self.batch_size else None
        self._free_pages(idx)
        if idx is None:
            self.lengths.zero_()
        else:
            self.lengths.index_fill_(0, idx, 0)
        if self._host_ok:
            self._freed_host(seqs)
            for b in seqs:
                self._lengths[b] = 0
        self.generation += 1

    def _freed_host(self, seqs: Sequence[int]) -> None:
        """Paged caches count the pages ``seqs`` give back in the host's mirror."""

    def _free_pages(self, idx: Optional[Tensor]) -> None:
        pass

    def _check_seqs(self, seqs) -> list[int]:
        out = sorted({int(b) for b in seqs}) if not isinstance(seqs, int) else [seqs]
        if any(b < 0 or b >= self.batch_size for b in out) or \
                any(isinstance(b, bool) or not isinstance(b, int) for b in ([seqs] if isinstance(seqs, int) else seqs)):
            raise _err("E801", f"free(): sequences must be indices in [0, {self.batch_size}), got {seqs!r}")
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # -- one sequence, contiguous (the reference) --------------------------------------------------
    def sequence(self, b: int, L: int) -> dict:
        """Sequence ``b``'s first ``L`` positions as tensors [1, ...] (views of a
        contiguous cache, a gather of the pages of a paged one): ``k`` / ``v`` (branch ->
        [1, L, H, D]), ``cmp`` (compress branch -> (k, v) [1, Nc(L), H, D]), ``idx`` (indexer
        branch -> [1, L, DI])."""
        out = {"k": {n: self._entries(t, b, L, 1) for n, t in self.k.items()},
               "v": {n: self._entries(t, b, L, 1) for n, t in self.v.items()},
               "idx": {n: self._entries(t, b, L, 1) for n, t in self.k_idx.items()}, "cmp": {}}
        for c in self.spec.of_kind("compress"):
            n = num_compressed_blocks(L, c.block, c.stride)
            out["cmp"][c.name] = (self._entries(self.k_cmp[c.name], b, n, c.stride),
                                  self._entries(self.v_cmp[c.name], b, n, c.stride))
        return out

    def _entries(self, t: Tensor, b: int, n: int, span: int) -> Tensor:
        """Sequence ``b``'s first ``n`` entries of buffer ``t`` (entry ``i`` at position ``i * span``),
        ``[1, n, ...]``: a view (no copy, whatever the cache's length)."""
        return t[b:b + 1, :n]

    # -- appending (PyTorch: the reference's path; DecodeOp.append is the kernels') ----------------
    def _per_branch(self, x: TensorOrDict, what: str) -> dict:
        names = self.spec.attention_names
        if isinstance(x, Tensor):
            return {n: x for n in names}
        if isinstance(x, Mapping):
            missing = [n for n in names if n not in x]
            unknown = sorted(set(x) - set(names))
            if missing or unknown:
                raise _err("E802", f"{what}: a dict needs one tensor per branch {list(names)}; "
                                   f"missing {missing}, unknown {unknown}")
            if self.shared_kv and len({id(x[n]) for n in names}) > 1:
                raise _err("E802", f"{what}: this cache shares one key/value buffer between branches "
                                   "(shared_kv=True) but different tensors were given per branch",
                           hint="build the cache with shared_kv=False")
            return dict(x)
        raise _err("E802", f"{what} must be a tensor or a dict branch name -> tensor, got {type(x).__name__}")

    def check_chunk(self, k: TensorOrDict, v: TensorOrDict, k_idx=None,
                    batch: Optional[int] = None) -> tuple[dict, dict, dict, int]:
        """The chunk's keys and values by branch, its indexer keys and C: shapes, devices and dtypes
        checked (E802, E803; nothing is cast). ``batch``: the rows of an engine's block table (default
        the cache's batch size)."""
        ks, vs = self._per_branch(k, "k"), self._per_branch(v, "v")
        B, H = batch or self.batch_size, self.kv_heads
        first = next(iter(ks.values()))
        if not isinstance(first, Tensor) or first.dim() != 4:
            raise _err("E803", f"k must be [B, C, H, Dqk]; got shape {list(getattr(first, 'shape', []))}")
        C = first.shape[1]
        k_idx = dict(k_idx or {})
        if set(k_idx) != set(self.k_idx):
            raise _err("E803", f"k_idx must hold the chunk's indexer keys for {sorted(self.k_idx)}, got {sorted(k_idx)}",
                       hint="append(k, v, k_idx={name: [B, C, dim]}) (SparseAttention does this for you)")
        for name, x in k_idx.items():
            want = (B, C, self.k_idx[name].shape[-1])
            if not isinstance(x, Tensor) or tuple(x.shape) != want or x.dtype != self.dtype or x.device != self.device:
                raise _err("E803", f"k_idx['{name}'] must be a {self.dtype} tensor {list(want)} on {self.device}, "
                                   f"got {getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")
        for name in self.spec.attention_names:
            for x, D, what in ((ks[name], self.qk_dim, "k"), (vs[name], self.v_dim, "v")):
                if not isinstance(x, Tensor) or tuple(x.shape) != (B, C, H, D):
                    raise _err("E803", f"{what} for branch '{name}' has shape {list(getattr(x, 'shape', []))}; "
                                       f"expected [{B}, {C}, {H}, {D}] (batch, chunk, kv heads, dim)")
                if x.device != self.device:
                    raise _err("E803", f"{what} is on {x.device}; the cache is on {self.device}")
                if x.dtype != self.dtype:
                    raise _err("E803", f"{what} for branch '{name}' is {x.dtype}; the cache holds {self.dtype}",
                               hint=f"cast it: {what}.to({self.dtype}) (nothing is cast silently)")
        return ks, vs, k_idx, C

    def check_room(self, old: Sequence[int], n_host: Sequence[int]) -> None:
        """E805 when appending ``n_host`` tokens to lengths ``old`` passes the capacity."""
        new = [s + n for s, n in zip(old, n_host)]
        if max(new, default=0) > self.capacity:
            raise _err("E805", f"the cache holds {self.capacity} positions; appending {list(n_host)} to "
                               f"lengths {list(old)} would reach {max(new)}",
                       hint="allocate a longer cache (new_cache(batch_size, max_len)) or free() sequences")

    def append(self, k: TensorOrDict, v: TensorOrDict, *, n_new=None, pool: Optional[Pool] = None,
               k_idx: Optional[Mapping[str, Tensor]] = None) -> DecodeStep:
        """Append a chunk ``k [B, C, H, Dqk]``, ``v [B, C, H, Dv]`` (or dicts by branch) and pool
        the compressed blocks (and block means) it completes; returns where the chunk sits.

        ``n_new``: tokens to take per sequence (``<= C``; the rest is padding), default all ``C``.
        ``pool``: learned pooling for ``pool = linear | mlp`` branches, called on the new blocks only
        (``pool(name, k_blocks [P, l, H, Dqk], v_blocks [P, l, H, Dv]) -> (k_cmp [P, H, Dqk], v_cmp)``).
        ``k_idx``: indexer branch -> its keys of the chunk ``[B, C, DI]`` (specs with an indexer).
        PyTorch, driven by the host's lengths (the reference's path; ``DecodeOp.append`` runs the
        kernels' append without them).
        """
        ks, vs, k_idx, C = self.check_chunk(k, v, k_idx)
        B = self.batch_size
        n_host = [C] * B if n_new is None else _counts(n_new, B, C)
        old = list(self.lengths_host)
        self.check_room(old, n_host)
        for b in self.spec.of_kind("compress"):
            if b.pool != "mean" and pool is None and _blocks_between(old, n_host, b):
                raise _err("E806", f"branch '{b.name}' pools with '{b.pool}': append() needs "
                                   "pool=callable(name, k_blocks, v_blocks) for its new blocks",
                           hint="SparseAttention(..., cache=...) passes its learned pooling")
        new = [s + n for s, n in zip(old, n_host)]
        dev = self.device
        self._reserve(old, new)

        # raw keys / values (and indexer keys): token c of sequence b to position old[b] + c
        if C and any(n_host):
            bi, ci = _ranges([0] * B, n_host, dev)                                  # (sequence, token) pairs
            rows = self._rows(bi, torch.tensor(old, device=dev)[bi] + ci, 1, self._rows_per_seq(1))
            done = set()
            for name in self.spec.attention_names:
                for buf, src in ((self.k[name], ks[name]), (self.v[name], vs[name])):
                    if id(buf) not in done:
                        done.add(id(buf))
                        self.flat(buf)[rows] = src[bi, ci]
            for name, src in k_idx.items():
                self.flat(self.k_idx[name])[rows] = src[bi, ci]

        # compressed blocks completed by the chunk: block i of (l, d) ends at i*d + l - 1
        for b in self.spec.of_kind("compress"):
            first = [num_compressed_blocks(x, b.block, b.stride) for x in old]
            counts = [num_compressed_blocks(x, b.block, b.stride) - f for x, f in zip(new, first)]
            if not any(counts):                  # most decoding steps complete no block
                continue
            si, ii = _ranges(first, counts, dev)
            key_rows = self._rows(si[:, None], ii[:, None] * b.stride + torch.arange(b.block, device=dev), 1,
                                  self._rows_per_seq(1))                             # [P, l]
            kb, vb = self.flat(self.k[b.name])[key_rows], self.flat(self.v[b.name])[key_rows]   # [P, l, H, D]
            k_c, v_c = (kb.mean(1), vb.mean(1)) if b.pool == "mean" else pool(b.name, kb, vb)
            rows = self._rows(si, ii, b.stride, self.k_cmp[b.name].shape[1])
            self.flat(self.k_cmp[b.name])[rows] = k_c.to(self.dtype)
            self.flat(self.v_cmp[b.name])[rows] = v_c.to(self.dtype)

        # block means of the select blocks the chunk completes (score = mean_pool)
        for b in self.spec.of_kind("select"):
            if b.score != "mean_pool":
                continue
            counts = [y // b.block - x // b.block for x, y in zip(old, new)]
            if not any(counts):
                continue
            si, ji = _ranges([x // b.block for x in old], counts, dev)
            key_rows = self._rows(si[:, None], ji[:, None] * b.block + torch.arange(b.block, device=dev), 1,
                                  self._rows_per_seq(1))
            rows = self._rows(si, ji, b.block, self.k_mean[b.name].shape[1])
            self.flat(self.k_mean[b.name])[rows] = self.flat(self.k[b.name])[key_rows].float().mean(1)

        self._lengths = new
        start = self.lengths.clone()
        whole = all(n == C for n in n_host)
        n_dev = torch.full((B,), C, dtype=torch.int32, device=dev) if whole else \
            torch.tensor(n_host, dtype=torch.int32, device=dev)
        self.lengths += n_dev
        return DecodeStep(start, n_dev, tuple(old), tuple(n_host), C, weakref.ref(self), self.generation)

    def _reserve(self, old: Sequence[int], new: Sequence[int]) -> None:
        """Paged caches take pages for positions [old, new) here."""

    def step_at(self, start: Sequence[int], n_new: Sequence[int], chunk: int) -> DecodeStep:
        """A step over tokens already in the cache: token ``i < n_new[b]`` of sequence ``b`` at
        ``start[b] + i`` (benchmarks replay a step this way); checked against the lengths."""
        start, n_new = [int(s) for s in start], [int(n) for n in n_new]
        step = DecodeStep(torch.tensor(start, dtype=torch.int32, device=self.device),
                          torch.tensor(n_new, dtype=torch.int32, device=self.device),
                          tuple(start), tuple(n_new), int(chunk), weakref.ref(self), self.generation)
        check_step(self, step)
        return step


class PagedNSACache(NSACache):
    """A KV cache whose streams are pools of pages addressed through a block table (see the module
    docstring and ``docs/SERVING.md``); the same API as :class:`NSACache`.

    Args (besides NSACache's): ``page_size`` P (positions per page, a power of two: 16, 64, ...);
    ``num_pages`` in the pool (default ``batch_size * cdiv(max_len, P)``, what the contiguous cache
    holds; fewer let sequences of different lengths share the pool); ``page_order``: the order
    pages are handed out (a permutation of range(num_pages); default ascending).
    Attributes: ``block_table`` [B, cdiv(max_len, P)] int32 (-1: no page), ``free_pages``
    [num_pages + 1] int32 (a stack: ``free_pages[:free_top]`` are free, the top last; the last
    element is spare), ``free_top`` [1] int32. Pages are taken as sequences grow (by ``append``, or
    on the device by the kernels' append, no host sync) and given back by ``free()``.
    """

    def __init__(self, spec: Spec, batch_size: int, max_len: int, *, page_size: int, kv_heads: int, qk_dim: int,
                 v_dim: int, num_pages: Optional[int] = None, page_order: Optional[Sequence[int]] = None,
                 shared_kv: bool = True, dtype: torch.dtype = torch.float32, device="cpu"):
        if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1 or page_size & (page_size - 1):
            raise _err("E801", f"PagedNSACache: page_size must be a power of two (16, 64, ...), got {page_size!r}")
        self.page_size = page_size
        self.width = _cdiv(max_len, page_size) if isinstance(max_len, int) and max_len > 0 else 1
        if num_pages is None and isinstance(batch_size, int) and batch_size > 0:
            num_pages = batch_size * self.width
        if not isinstance(num_pages, int) or isinstance(num_pages, bool) or num_pages < 1:
            raise _err("E801", f"PagedNSACache: num_pages must be a positive integer, got {num_pages!r}")
        self.num_pages = num_pages
        self._order = None if page_order is None else [int(p) for p in page_order]
        if self._order is not None and sorted(self._order) != list(range(num_pages)):
            raise _err("E801", f"PagedNSACache: page_order must be a permutation of range({num_pages})")
        super().__init__(spec, batch_size, max_len, kv_heads=kv_heads, qk_dim=qk_dim, v_dim=v_dim,
                         shared_kv=shared_kv, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.width * self.page_size

    def _n_rows(self) -> int:
        return self.num_pages

    def _rows_per_seq(self, span: int) -> int:
        return _cdiv(self.page_size, span)            # entries per page

    def _cmp_entries(self, b) -> int:
        return _cdiv(self.page_size, b.stride)

    def _allocate(self) -> None:
        super()._allocate()
        B, dev = self.batch_size, self.device
        self.block_table = torch.full((B, self.width), -1, dtype=torch.int32, device=dev)
        # the stack pops from the top: the first page handed out is page_order[0]
        order = list(range(self.num_pages)) if self._order is None else self._order
        self.free_pages = torch.tensor([*reversed(order), 0], dtype=torch.int32, device=dev)
        self.free_top = torch.full((1,), self.num_pages, dtype=torch.int32, device=dev)
        self._free_count = self.num_pages       # the host's mirror of free_top

    def _extra_tensors(self) -> list[Tensor]:
        return [self.block_table, self.free_pages, self.free_top]

    def _entries(self, t: Tensor, b: int, n: int, span: int) -> Tensor:
        bi = torch.full((1,), b, dtype=torch.long, device=self.device)      # the pages gathered
        return self.flat(t)[self._rows(bi, torch.arange(n, device=self.device), span, t.shape[1])][None]

    def _rows(self, bi: Tensor, first: Tensor, span: int, per: int) -> Tensor:
        P = self.page_size
        pos = first * span
        page = self.block_table[bi, torch.div(pos, P, rounding_mode="floor")].long()
        return page * per + torch.div(pos % P, span, rounding_mode="floor")

    def _reserve(self, old: Sequence[int], new: Sequence[int]) -> None:
        """Pages for positions [old[b], new[b]) of every sequence, off the free stack (a host sync:
        the PyTorch path; the kernels' append pops pages on the device)."""
        P = self.page_size
        need = [(b, j) for b, (x, y) in enumerate(zip(old, new)) for j in range(_cdiv(x, P), _cdiv(y, P))]
        if not need:
            return
        top = int(self.free_top.item())
        self._free_count = top
        if len(need) > top:
            raise _err("E816", f"the chunk needs {len(need)} new pages but {top} of {self.num_pages} are free",
                       hint="free() finished sequences, or allocate more pages (num_pages=)")
        pages = self.free_pages[top - len(need):top].flip(0)       # the top first
        bi = torch.tensor([b for b, _ in need], device=self.device)
        ji = torch.tensor([j for _, j in need], device=self.device)
        self.block_table[bi, ji] = pages
        self.free_top -= len(need)
        self._free_count = top - len(need)

    def _refresh_host(self) -> None:
        super()._refresh_host()
        self._free_count = int(self.free_top.item())

    def _free_host(self) -> int:
        """Free pages, as the host's mirror knows them."""
        if not self._host_ok:
            self._refresh_host()
        return self._free_count

    def _taken(self, n: int) -> None:
        self._free_count -= n

    def _freed_host(self, seqs: Sequence[int]) -> None:
        self._free_count += sum(_cdiv(self._lengths[b], self.page_size) for b in seqs)

    def _free_pages(self, idx: Optional[Tensor]) -> None:
        """Push the pages of sequences ``idx`` (None: all) back on the stack, table rows to -1;
        device ops only (the count per sequence is never read on the host)."""
        rows = self.block_table if idx is None else self.block_table[idx]           # [S, W]
        lens = self.lengths if idx is None else self.lengths[idx]
        held = torch.arange(self.width, device=self.device)[None, :] < (lens[:, None] + self.page_size - 1) // self.page_size
        held = held.flatten()
        dst = torch.where(held, self.free_top.long() + torch.cumsum(held, 0) - 1, self.num_pages)   # spare slot
        self.free_pages.index_copy_(0, dst, rows.flatten())
        self.free_top += held.sum().to(torch.int32)
        if idx is None:
            self.block_table.fill_(-1)
        else:
            self.block_table.index_fill_(0, idx, -1)

    def pages_in_use(self) -> int:
        """Pages held by sequences (a sync)."""
        return self.num_pages - int(self.free_top.item())


def check_step(cache: "NSACache", step) -> None:
    """A step must come from ``cache`` (``append`` or ``step_at``), in its current generation
    (no ``reset()`` / ``free()`` since; a kernel append's step: no append since), and lie inside
    its lengths: otherwise the kernels would read past what the cache holds."""
    if not isinstance(step, DecodeStep) or step.cache is None:
        raise _err("E811", "step must be a DecodeStep from cache.append(...) (or cache.step_at(...))")
    if step.cache() is not cache:
        raise _err("E811", "this decode step belongs to another cache",
                   hint="pass the step returned by this cache's append()")
    if step.generation != cache.generation:
        raise _err("E811", "this decode step is from before the cache's last reset() or free()",
                   hint="append the tokens again and use the new step")
    if step.serial >= 0 and step.serial != cache.serial:
        raise _err("E811", "this decode step is from before the cache's last append (a kernel append's step "
                           "holds until the next one)", hint="use the step of the last append")
    if step.start_host is None or not cache._host_ok:
        return                       # only the device knows: the kernels bound every read by the lengths
    lengths = cache.lengths_host
    if len(step.start_host) != len(lengths) or len(step.n_host) != len(lengths) or any(
            s < 0 or n < 0 or n > step.chunk or s + n > L for s, n, L in zip(step.start_host, step.n_host, lengths)):
        raise _err("E811", f"the step covers positions start {list(step.start_host)} + n_new {list(step.n_host)}, "
                           f"beyond the cache's lengths {list(lengths)}")


def check_block_table(cache: "PagedNSACache", block_table: Tensor, seq_lens, *, n_new=None) -> None:
    """An engine's block table and lengths against a paged cache's pool (``docs/SERVING.md``):
    ``block_table`` [B, W] int32 on the cache's device (E813); every page a sequence holds or will
    hold after appending ``n_new`` tokens (positions ``[0, seq_lens[b] + n_new[b])``) inside the
    pool (E814), no page held by two sequences (E814), no length past the table's W * P positions
    (E815). Reads the table and lengths on the host (a sync): call it once per table update (the
    engine-facing call checks every step only with ``NSA_DSL_DEBUG=1``); the kernels never read
    outside the table or the pool whatever it holds."""
    if not isinstance(cache, PagedNSACache):
        raise _err("E813", f"a block table needs a PagedNSACache (its page pool), got {type(cache).__name__}")
    if not isinstance(block_table, Tensor) or block_table.dim() != 2 or block_table.dtype != torch.int32 \
            or block_table.device != cache.device:
        raise _err("E813", f"block_table must be an int32 tensor [B, W] on {cache.device}, got "
                           f"{getattr(block_table, 'dtype', type(block_table).__name__)} "
                           f"{list(getattr(block_table, 'shape', []))}",
                   hint="block_table[b, j] = the pool page of sequence b's positions [j * P, (j + 1) * P)")
    B, W = block_table.shape
    lens = seq_lens.tolist() if isinstance(seq_lens, Tensor) else list(seq_lens)
    extra = [0] * B if n_new is None else (n_new.tolist() if isinstance(n_new, Tensor) else list(n_new))
    if len(lens) != B or len(extra) != B:
        raise _err("E813", f"seq_lens (and n_new) must hold {B} lengths, one per block table row; got "
                           f"{len(lens)} (and {len(extra)})")
    P = cache.page_size
    table = block_table.tolist()
    owner = {}
    for b, (L, n) in enumerate(zip(lens, extra)):
        end = int(L) + int(n)
        if L < 0 or n < 0 or end > W * P:
            raise _err("E815", f"sequence {b} reaches position {end}, past its {W} pages of {P} positions "
                               f"({W * P}) in the block table", hint="give it more pages (a wider table)")
        for j in range(_cdiv(end, P)):
            page = table[b][j]
            if not 0 <= page < cache.num_pages:
                raise _err("E814", f"block_table[{b}, {j}] = {page}: not a page of the pool (0 .. {cache.num_pages - 1})",
                           hint="every page a sequence holds (positions < seq_lens + n_new) must be a pool page")
            if owner.setdefault(page, b) != b:
                raise _err("E814", f"page {page} is held by sequences {owner[page]} and {b}",
                           hint="a page holds one sequence's positions: give each its own pages")


def _blocks_between(old: Sequence[int], n_host: Sequence[int], b) -> bool:
    """Does appending ``n_host`` tokens to ``old`` complete a block of compress branch ``b``?"""
    return any(num_compressed_blocks(x + n, b.block, b.stride) > num_compressed_blocks(x, b.block, b.stride)
               for x, n in zip(old, n_host))


def _counts(n_new, B: int, C: int) -> list[int]:
    """``n_new`` as B ints in [0, C]: a sequence or 1-D tensor of integers (no floats, bools, strings)."""
    if isinstance(n_new, Tensor):
        if n_new.dim() != 1 or n_new.dtype.is_floating_point or n_new.dtype.is_complex or n_new.dtype == torch.bool:
            raise _err("E804", f"n_new must be a 1-D integer tensor of {B} counts; got {n_new.dtype} {list(n_new.shape)}")
        counts = n_new.tolist()
    elif isinstance(n_new, (list, tuple)):
        counts = list(n_new)
    else:
        raise _err("E804", f"n_new must be a list or tensor of {B} integer counts; got {type(n_new).__name__}")
    if len(counts) != B or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= C for n in counts):
        raise _err("E804", f"n_new must hold {B} integer counts in [0, {C}]; got {counts!r}")
    return counts


def _ranges(firsts: Sequence[int], counts: Sequence[int], device) -> tuple[Tensor, Tensor]:
    """Pairs (b, firsts[b] + r) for r < counts[b], as two int64 tensors, without a Python loop
    over the pairs (a long prompt appends B * C of them)."""
    counts_t = torch.tensor(counts, dtype=torch.int64, device=device)
    total = int(sum(counts))
    bi = torch.repeat_interleave(torch.arange(len(counts), device=device), counts_t, output_size=total)
    starts = torch.cumsum(counts_t, 0) - counts_t                        # first pair of each b
    ri = torch.arange(total, device=device) - starts[bi]
    return bi, torch.tensor(firsts, dtype=torch.int64, device=device)[bi] + ri


def check_decode_call(spec: Spec, q: Tensor, cache: NSACache, step: DecodeStep, gates) -> None:
    """The step, q and gates of a decode call, with the op's codes for the same mistakes."""
    check_step(cache, step)
    check_queries(spec, q, cache, step.chunk, gates)


def check_queries(spec: Spec, q: Tensor, cache: NSACache, C: int, gates, batch: Optional[int] = None) -> None:
    """q [B, C, HQ, Dqk] and gates of a decode call against ``cache`` (E601, E603, E606, E607, E609);
    ``batch``: B when it is not the cache's (an engine's block table)."""
    if not isinstance(q, Tensor) or q.dim() != 4:
        raise _err("E601", f"q must be a 4-D tensor [B, C, HQ, Dqk], got {getattr(q, 'shape', type(q).__name__)}")
    B, Cq, HQ, Dqk = q.shape
    want = cache.batch_size if batch is None else batch
    if B != want or Cq != C or Dqk != cache.qk_dim:
        raise _err("E601", f"q has shape {list(q.shape)}; expected [{want}, {C}, HQ, "
                           f"{cache.qk_dim}] for this cache and step")
    if HQ % cache.kv_heads:
        raise _err("E603", f"query heads ({HQ}) must be a multiple of the cache's kv heads ({cache.kv_heads})")
    if q.device != cache.device:
        raise _err("E607", f"q is on {q.device} but the cache is on {cache.device}")
    if not q.is_floating_point() or q.dtype != cache.dtype:
        raise _err("E606", f"q has dtype {q.dtype}; the cache holds {cache.dtype}: one dtype for all")
    if spec.output.kind == "gate":
        n = len(spec.output.branches)
        if gates is None:
            raise _err("E609", f"output = gate(...) needs gate logits [{B}, {C}, {HQ}, {n}]")
        if not isinstance(gates, Tensor) or tuple(gates.shape) != (B, C, HQ, n):
            raise _err("E601", f"gates have shape {list(getattr(gates, 'shape', []))}; expected [{B}, {C}, {HQ}, {n}]")
        if gates.dtype != q.dtype:
            raise _err("E606", f"gates have dtype {gates.dtype} but q has {q.dtype}; all inputs share one dtype")
    elif gates is not None:
        raise _err("E609", f"output = {spec.output.kind}(...) takes no gates, but gates were given")
