"""A layer's KV cache for decoding and chunked prefill: what it holds, how tokens are appended,
and the steps that say where an append's tokens sit.

    cache = NSACache(spec, batch_size, max_len, kv_heads=H, qk_dim=Dqk, v_dim=Dv)
    step = cache.append(k_new, v_new)                     # [B, C, H, D]; pools new compressed blocks

Token ``i`` of a chunk of ``C`` new tokens of sequence ``b`` sits at position ``start[b] + i``
(``start`` = the cache length before the chunk). Sequences of a batch may have different
lengths; ``append(..., n_new=[...])`` appends fewer than ``C`` tokens to some of them (right
padding; padded tokens output 0).

What the cache holds, per layer:
  raw keys / values ``[B, max_len, H, D]``: one pair shared by every branch (``shared_kv``) or
  one per branch (the paper's independent K/V); compress branches read them only to pool new
  blocks. Compressed keys / values ``[B, max_Nc, H, D]`` per compress branch: block ``i`` is
  pooled once, when its last key arrives (``i*d + l - 1 < length``): mean pooling of its ``l``
  keys, or the caller's learned pooling (``pool=`` callable) on the new blocks only. Block means
  ``[B, max_len // l', H, Dqk]`` (fp32) per ``score = mean_pool`` select branch, once a block is
  complete. Indexer keys ``[B, max_len, DI]`` per indexer branch. Lengths ``[B]`` int32 on the
  device (for kernels) and on the host (for shapes).

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

__all__ = ["NSACache", "DecodeStep", "check_step", "check_decode_call", "Pool"]

TensorOrDict = Union[Tensor, Mapping[str, Tensor]]
# pool(name, k_blocks [P, l, H, Dqk], v_blocks [P, l, H, Dv]) -> (k_cmp [P, H, Dqk], v_cmp [P, H, Dv])
Pool = Callable[[str, Tensor, Tensor], tuple[Tensor, Tensor]]


def _err(code: str, message: str, hint: str | None = None) -> SpecError:
    return SpecError(code, message, hint=hint)


def _new_buffer(shape, dtype, device) -> Tensor:
    # NaN-filled under NSA_DSL_NAN_FILL=1 (the tests): reading a slot nothing wrote fails loudly
    if os.environ.get("NSA_DSL_NAN_FILL") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class DecodeStep:
    """Where the chunk of one ``append`` sits: token ``i`` of sequence ``b`` at ``start[b] + i``,
    for ``i < n_new[b]`` (the rest is padding)."""
    start: Tensor                 # [B] int32, on the cache's device: lengths before the chunk
    n_new: Tensor                 # [B] int32: tokens appended per sequence (<= chunk)
    start_host: tuple[int, ...]
    n_host: tuple[int, ...]
    chunk: int                    # C: tokens per sequence in the chunk tensors
    cache: Optional[Callable] = field(default=None, compare=False, repr=False)   # weakref to its NSACache
    generation: int = -1          # the cache's generation (reset() starts a new one)

    @property
    def t_max(self) -> int:
        """The longest cache after the append."""
        return max((s + n for s, n in zip(self.start_host, self.n_host)), default=0)


class NSACache:
    """Preallocated KV cache of one layer for ``spec``; see the module docstring for its contents.

    Args:
        spec: the layer's spec.
        batch_size, max_len: sequences and the longest cache they may reach.
        kv_heads, qk_dim, v_dim: key/value heads and head dims.
        shared_kv: one raw key/value pair for every branch (else one per branch).
        dtype, device: of the buffers (block means are fp32).
    Attributes: ``k``, ``v`` (branch name -> raw buffer; shared buffers are the same tensor),
    ``k_cmp``, ``v_cmp`` (compress branch -> buffer), ``k_mean`` (mean_pool select branch ->
    fp32 buffer), ``lengths`` ([B] int32 on ``device``), ``lengths_host`` (tuple of ints).
    """

    def __init__(self, spec: Spec, batch_size: int, max_len: int, *, kv_heads: int, qk_dim: int,
                 v_dim: int, shared_kv: bool = True, dtype: torch.dtype = torch.float32, device="cpu"):
        for name, x in (("batch_size", batch_size), ("max_len", max_len), ("kv_heads", kv_heads),
                        ("qk_dim", qk_dim), ("v_dim", v_dim)):
            if not isinstance(x, int) or isinstance(x, bool) or x < 1:
                raise _err("E801", f"NSACache: {name} must be a positive integer, got {x!r}")
        if not spec.causal:
            raise _err("E812", f"spec '{spec.name}' is not causal (causal = false): a KV cache decodes "
                               "causal attention, where a new token never changes earlier outputs",
                       hint="run the whole sequence at once: call the op or the layer without a cache")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise _err("E801", f"NSACache: dtype must be a floating-point torch dtype, got {dtype!r}",
                       hint="float16, bfloat16 or float32 (float64 for the reference backend)")
        self.spec = spec
        self.batch_size, self.max_len = batch_size, max_len
        self.kv_heads, self.qk_dim, self.v_dim = kv_heads, qk_dim, v_dim
        self.shared_kv = bool(shared_kv)
        self.dtype, self.device = dtype, torch.device(device)
        B, H = batch_size, kv_heads
        self.generation = 0                    # reset() starts a new one: older steps are refused
        self.lengths = torch.zeros(B, dtype=torch.int32, device=self.device)
        self.device = self.lengths.device      # "cuda" -> "cuda:0": compares equal to tensors' devices
        self._lengths = [0] * B

        names = spec.attention_names         # every attention branch reads raw keys (compress: to pool)
        if self.shared_kv:
            k = _new_buffer((B, max_len, H, qk_dim), dtype, self.device)
            v = _new_buffer((B, max_len, H, v_dim), dtype, self.device)
            self.k, self.v = {n: k for n in names}, {n: v for n in names}
        else:
            self.k = {n: _new_buffer((B, max_len, H, qk_dim), dtype, self.device) for n in names}
            self.v = {n: _new_buffer((B, max_len, H, v_dim), dtype, self.device) for n in names}
        self.k_cmp, self.v_cmp, self.k_mean = {}, {}, {}
        for b in spec.of_kind("compress"):
            n = max(1, num_compressed_blocks(max_len, b.block, b.stride))
            self.k_cmp[b.name] = _new_buffer((B, n, H, qk_dim), dtype, self.device)
            self.v_cmp[b.name] = _new_buffer((B, n, H, v_dim), dtype, self.device)
        for b in spec.of_kind("select"):
            if b.score == "mean_pool":
                n = max(1, max_len // b.block)
                self.k_mean[b.name] = _new_buffer((B, n, H, qk_dim), torch.float32, self.device)
        self.k_idx = {b.name: _new_buffer((B, max_len, b.dim), dtype, self.device) for b in spec.of_kind("indexer")}

    def __repr__(self) -> str:
        return (f"NSACache({self.spec.name}: B={self.batch_size}, max_len={self.max_len}, "
                f"H={self.kv_heads}, Dqk={self.qk_dim}, Dv={self.v_dim}, {self.dtype}, "
                f"lengths={list(self._lengths)})")

    @property
    def lengths_host(self) -> tuple[int, ...]:
        return tuple(self._lengths)

    def reset(self) -> None:
        """Forget every sequence (buffers are kept; their stale contents are never read)."""
        self._lengths = [0] * self.batch_size
        self.lengths.zero_()
        self.generation += 1

    def nbytes(self) -> int:
        seen, total = set(), 0
        for t in [*self.k.values(), *self.v.values(), *self.k_cmp.values(), *self.v_cmp.values(),
                  *self.k_mean.values(), *self.k_idx.values()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    # -- appending ---------------------------------------------------------------------------------
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

    def append(self, k: TensorOrDict, v: TensorOrDict, *, n_new=None, pool: Optional[Pool] = None,
               k_idx: Optional[Mapping[str, Tensor]] = None) -> DecodeStep:
        """Append a chunk ``k [B, C, H, Dqk]``, ``v [B, C, H, Dv]`` (or dicts by branch) and pool
        the compressed blocks (and block means) it completes; returns where the chunk sits.

        ``n_new``: tokens to take per sequence (``<= C``; the rest is padding), default all ``C``.
        ``pool``: learned pooling for ``pool = linear | mlp`` branches, called on the new blocks only
        (``pool(name, k_blocks [P, l, H, Dqk], v_blocks [P, l, H, Dv]) -> (k_cmp [P, H, Dqk], v_cmp)``).
        ``k_idx``: indexer branch -> its keys of the chunk ``[B, C, DI]`` (specs with an indexer).
        """
        ks, vs = self._per_branch(k, "k"), self._per_branch(v, "v")
        B, H = self.batch_size, self.kv_heads
        first = next(iter(ks.values()))
        if first.dim() != 4:
            raise _err("E803", f"k must be [B, C, H, Dqk]; got shape {list(first.shape)}")
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
                if tuple(x.shape) != (B, C, H, D):
                    raise _err("E803", f"{what} for branch '{name}' has shape {list(x.shape)}; "
                                       f"expected [{B}, {C}, {H}, {D}] (batch, chunk, kv heads, dim)")
                if x.device != self.device:
                    raise _err("E803", f"{what} is on {x.device}; the cache is on {self.device}")
                if x.dtype != self.dtype:
                    raise _err("E803", f"{what} for branch '{name}' is {x.dtype}; the cache holds {self.dtype}",
                               hint=f"cast it: {what}.to({self.dtype}) (nothing is cast silently)")
        n_host = [C] * B if n_new is None else _counts(n_new, B, C)
        old = list(self._lengths)
        new = [s + n for s, n in zip(old, n_host)]
        if max(new, default=0) > self.max_len:
            raise _err("E805", f"the cache holds {self.max_len} positions; appending {n_host} to "
                               f"lengths {old} would reach {max(new)}",
                       hint="allocate a longer cache (new_cache(batch_size, max_len)) or reset() it")
        dev = self.device

        # raw keys / values: token c of sequence b goes to position old[b] + c. Decoding (every
        # sequence takes the whole chunk) writes with a slice (one start) or one index_put from the
        # device lengths: a handful of ops and no host-to-device copy per step
        whole = all(n == C for n in n_host)
        if C == 0 or not any(n_host):
            write = None
        elif whole and len(set(old)) == 1:
            def write(buf, src):
                buf[:, old[0]:old[0] + C].copy_(src)
        elif whole:
            rows = torch.arange(B, device=dev)[:, None]                              # [B, 1]
            pos = self.lengths.long()[:, None] + torch.arange(C, device=dev)         # [B, C]

            def write(buf, src):
                buf.index_put_((rows, pos), src.to(buf.dtype))
        else:
            bi, ci = _ranges([0] * B, n_host, dev)                                  # (sequence, token) pairs
            pos = torch.tensor(old, device=dev)[bi] + ci

            def write(buf, src):
                buf[bi, pos] = src[bi, ci].to(buf.dtype)
        if write is not None:
            done = set()
            for name in self.spec.attention_names:
                for buf, src in ((self.k[name], ks[name]), (self.v[name], vs[name])):
                    if id(buf) not in done:
                        done.add(id(buf))
                        write(buf, src)
            for name, src in k_idx.items():
                write(self.k_idx[name], src)

        # compressed blocks completed by the chunk: block i of (l, d) ends at i*d + l - 1
        for b in self.spec.of_kind("compress"):
            first = [num_compressed_blocks(x, b.block, b.stride) for x in old]
            counts = [num_compressed_blocks(x, b.block, b.stride) - f for x, f in zip(new, first)]
            if not any(counts):                  # most decoding steps complete no block
                continue
            si, ii = _ranges(first, counts, dev)
            pos = ii[:, None] * b.stride + torch.arange(b.block, device=dev)       # [P, l]
            kb = self.k[b.name][si[:, None], pos]                                 # [P, l, H, Dqk]
            vb = self.v[b.name][si[:, None], pos]                                 # [P, l, H, Dv]
            if b.pool == "mean":
                k_c, v_c = kb.mean(1), vb.mean(1)
            else:
                if pool is None:
                    raise _err("E806", f"branch '{b.name}' pools with '{b.pool}': append() needs "
                                       "pool=callable(name, k_blocks, v_blocks) for its new blocks",
                               hint="SparseAttention(..., cache=...) passes its learned pooling")
                k_c, v_c = pool(b.name, kb, vb)
            self.k_cmp[b.name][si, ii] = k_c.to(self.dtype)
            self.v_cmp[b.name][si, ii] = v_c.to(self.dtype)

        # block means of the select blocks the chunk completes (score = mean_pool)
        for b in self.spec.of_kind("select"):
            if b.score != "mean_pool":
                continue
            counts = [y // b.block - x // b.block for x, y in zip(old, new)]
            if not any(counts):
                continue
            si, ji = _ranges([x // b.block for x in old], counts, dev)
            pos = ji[:, None] * b.block + torch.arange(b.block, device=dev)
            self.k_mean[b.name][si, ji] = self.k[b.name][si[:, None], pos].float().mean(1)

        self._lengths = new
        start = self.lengths.clone()
        if whole:
            n_dev = torch.full((B,), C, dtype=torch.int32, device=dev)
            self.lengths += C
        else:
            n_dev = torch.tensor(n_host, dtype=torch.int32, device=dev)
            self.lengths += n_dev
        return DecodeStep(start, n_dev, tuple(old), tuple(n_host), C, weakref.ref(self), self.generation)

    def step_at(self, start: Sequence[int], n_new: Sequence[int], chunk: int) -> DecodeStep:
        """A step over tokens already in the cache: token ``i < n_new[b]`` of sequence ``b`` at
        ``start[b] + i`` (benchmarks replay a step this way); checked against the lengths."""
        start, n_new = [int(s) for s in start], [int(n) for n in n_new]
        step = DecodeStep(torch.tensor(start, dtype=torch.int32, device=self.device),
                          torch.tensor(n_new, dtype=torch.int32, device=self.device),
                          tuple(start), tuple(n_new), int(chunk), weakref.ref(self), self.generation)
        check_step(self, step)
        return step


def check_step(cache: "NSACache", step) -> None:
    """A step must come from ``cache`` (``append`` or ``step_at``), in its current generation
    (no ``reset()`` since), and lie inside its lengths: otherwise the kernels would read past
    what the cache holds."""
    if not isinstance(step, DecodeStep) or step.cache is None:
        raise _err("E811", "step must be a DecodeStep from cache.append(...) (or cache.step_at(...))")
    if step.cache() is not cache:
        raise _err("E811", "this decode step belongs to another cache",
                   hint="pass the step returned by this cache's append()")
    if step.generation != cache.generation:
        raise _err("E811", "this decode step is from before the cache's last reset()",
                   hint="append the tokens again and use the new step")
    lengths = cache.lengths_host
    if len(step.start_host) != len(lengths) or len(step.n_host) != len(lengths) or any(
            s < 0 or n < 0 or n > step.chunk or s + n > L for s, n, L in zip(step.start_host, step.n_host, lengths)):
        raise _err("E811", f"the step covers positions start {list(step.start_host)} + n_new {list(step.n_host)}, "
                           f"beyond the cache's lengths {list(lengths)}")


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
    if not isinstance(q, Tensor) or q.dim() != 4:
        raise _err("E601", f"q must be a 4-D tensor [B, C, HQ, Dqk], got {getattr(q, 'shape', type(q).__name__)}")
    B, C, HQ, Dqk = q.shape
    if B != cache.batch_size or C != step.chunk or Dqk != cache.qk_dim:
        raise _err("E601", f"q has shape {list(q.shape)}; expected [{cache.batch_size}, {step.chunk}, HQ, "
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
