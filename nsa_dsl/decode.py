"""Inference: a KV cache per layer, decoding and chunked prefill generated from the same spec.

    cache = layer.new_cache(batch_size, max_len)          # nsa_dsl.SparseAttention
    y = layer(x_prompt, cache=cache)                      # prefill (any chunk size, in pieces or at once)
    y = layer(x_token, cache=cache)                       # decode: x [B, 1, hidden]

or, below the module, with tensors:

    cache = NSACache(spec, batch_size, max_len, kv_heads=H, qk_dim=Dqk, v_dim=Dv)
    step = cache.append(k_new, v_new)                     # [B, C, H, D]; pools new compressed blocks
    o = DecodeOp(spec)(q_new, cache, step, gates_new)     # generated kernels (templates/decode.py.j2)
    o = decode_torch(spec, q_new, cache, step, gates_new) # the same in plain PyTorch (CPU friendly)

Token ``i`` of a chunk of ``C`` new tokens of sequence ``b`` sits at position ``start[b] + i``
(``start`` = the cache length before the chunk) and attends causally to the cache ``[0, t]``,
its own chunk included: the outputs equal those of the full forward (``nsa_dsl.reference``)
at the same positions, for every branch (docs/SEMANTICS.md is causal throughout). Sequences
of a batch may have different lengths; ``append(..., n_new=[...])`` appends fewer than ``C``
tokens to some of them (right padding; padded tokens output 0).

What the cache holds (``NSACache``), per layer:
  raw keys / values ``[B, max_len, H, D]``: one pair shared by every branch (``shared_kv``) or
  one per branch (the paper's independent K/V); compress branches read them only to pool new
  blocks. Compressed keys / values ``[B, max_Nc, H, D]`` per compress branch: block ``i`` is
  pooled once, when its last key arrives (``i*d + l - 1 < length``): mean pooling of its ``l``
  keys, or the caller's learned pooling (``pool=`` callable) on the new blocks only. Block means
  ``[B, max_len // l', H, Dqk]`` (fp32) per ``score = mean_pool`` select branch, once a block is
  complete. Lengths ``[B]`` int32 on the device (for kernels) and on the host (for shapes).

No gradients: decoding is inference (``torch.no_grad`` is the caller's business; the cache
buffers are plain tensors written in place).
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .errors import SpecError
from .ir import Spec
from .backend import check_kernel_device
from .inputs import check_scale
from .semantics import gate_activation

__all__ = ["NSACache", "DecodeStep", "DecodeOp", "decode_torch", "decode_bench",
           "new_cache", "forward_cached"]

TensorOrDict = Union[Tensor, Mapping[str, Tensor]]
# pool(name, k_blocks [P, l, H, Dqk], v_blocks [P, l, H, Dv]) -> (k_cmp [P, H, Dqk], v_cmp [P, H, Dv])
Pool = Callable[[str, Tensor, Tensor], tuple[Tensor, Tensor]]


def _err(code: str, message: str, hint: str | None = None) -> SpecError:
    return SpecError(code, message, hint=hint)


def _n_compressed(T: int, block: int, stride: int) -> int:
    return 0 if T < block else (T - block) // stride + 1


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

        names = spec.branch_names            # every branch reads raw keys (compress: to pool)
        if self.shared_kv:
            k = _new_buffer((B, max_len, H, qk_dim), dtype, self.device)
            v = _new_buffer((B, max_len, H, v_dim), dtype, self.device)
            self.k, self.v = {n: k for n in names}, {n: v for n in names}
        else:
            self.k = {n: _new_buffer((B, max_len, H, qk_dim), dtype, self.device) for n in names}
            self.v = {n: _new_buffer((B, max_len, H, v_dim), dtype, self.device) for n in names}
        self.k_cmp, self.v_cmp, self.k_mean = {}, {}, {}
        for b in spec.of_kind("compress"):
            n = max(1, _n_compressed(max_len, b.block, b.stride))
            self.k_cmp[b.name] = _new_buffer((B, n, H, qk_dim), dtype, self.device)
            self.v_cmp[b.name] = _new_buffer((B, n, H, v_dim), dtype, self.device)
        for b in spec.of_kind("select"):
            if b.score == "mean_pool":
                n = max(1, max_len // b.block)
                self.k_mean[b.name] = _new_buffer((B, n, H, qk_dim), torch.float32, self.device)

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
                  *self.k_mean.values()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    # -- appending ---------------------------------------------------------------------------------
    def _per_branch(self, x: TensorOrDict, what: str) -> dict:
        names = self.spec.branch_names
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

    def append(self, k: TensorOrDict, v: TensorOrDict, *, n_new=None, pool: Optional[Pool] = None) -> DecodeStep:
        """Append a chunk ``k [B, C, H, Dqk]``, ``v [B, C, H, Dv]`` (or dicts by branch) and pool
        the compressed blocks (and block means) it completes; returns where the chunk sits.

        ``n_new``: tokens to take per sequence (``<= C``; the rest is padding), default all ``C``.
        ``pool``: learned pooling for ``pool = linear | mlp`` branches, called on the new blocks only
        (``pool(name, k_blocks [P, l, H, Dqk], v_blocks [P, l, H, Dv]) -> (k_cmp [P, H, Dqk], v_cmp)``).
        """
        ks, vs = self._per_branch(k, "k"), self._per_branch(v, "v")
        B, H = self.batch_size, self.kv_heads
        first = next(iter(ks.values()))
        if first.dim() != 4:
            raise _err("E803", f"k must be [B, C, H, Dqk]; got shape {list(first.shape)}")
        C = first.shape[1]
        for name in self.spec.branch_names:
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
            for name in self.spec.branch_names:
                for buf, src in ((self.k[name], ks[name]), (self.v[name], vs[name])):
                    if id(buf) not in done:
                        done.add(id(buf))
                        write(buf, src)

        # compressed blocks completed by the chunk: block i of (l, d) ends at i*d + l - 1
        for b in self.spec.of_kind("compress"):
            first = [_n_compressed(x, b.block, b.stride) for x in old]
            counts = [_n_compressed(x, b.block, b.stride) - f for x, f in zip(new, first)]
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


# ---------------------------------------------------------------------------------------------
# Decoding in plain PyTorch (the "reference" backend of the cached module path)
# ---------------------------------------------------------------------------------------------

def _softmax(logits: Tensor, mask: Tensor):
    """Masked softmax over the last dim: ``(p, lse)``; p = 0 and lse = -inf for rows without keys."""
    s = logits.masked_fill(~mask, float("-inf"))
    if s.shape[-1] == 0:
        return s, s.new_full(s.shape[:-1], float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    z = e.sum(-1, keepdim=True)
    p = e / torch.where(z > 0, z, torch.ones_like(z))
    lse = torch.where(z > 0, torch.log(torch.where(z > 0, z, torch.ones_like(z))) + m,
                      torch.full_like(z, float("-inf")))
    return p, lse.squeeze(-1)


def _attend(qg: Tensor, keys: Tensor, vals: Tensor, mask: Tensor, scale: float, valid: Tensor):
    """qg [B, C, H, G, D]; keys, vals [B, C, H, N, D] (gathered per query) or [B, N, H, D] (shared);
    mask broadcastable to [B, C, H, G, N]; valid: which keys / values hold data (the rest of a
    buffer may be unwritten, NaN under NSA_DSL_NAN_FILL): [B, C, H, N] or [B, N]."""
    if keys.dim() == 4:
        keys = torch.where(valid[:, :, None, None], keys, 0.)
        vals = torch.where(valid[:, :, None, None], vals, 0.)
        logits = torch.einsum("bchgd,bnhd->bchgn", qg, keys) * scale
        p, lse = _softmax(logits, mask)
        return torch.einsum("bchgn,bnhe->bchge", p, vals), lse, p
    keys = torch.where(valid[..., None], keys, 0.)
    vals = torch.where(valid[..., None], vals, 0.)
    logits = torch.einsum("bchgd,bchnd->bchgn", qg, keys) * scale
    p, lse = _softmax(logits, mask)
    return torch.einsum("bchgn,bchne->bchge", p, vals), lse, p


def _gather(buf: Tensor, pos: Tensor) -> Tensor:
    """buf [B, L, H, D], pos [B, C, H, N] (clamped inside) -> [B, C, H, N, D]."""
    B, L, H, _ = buf.shape
    bi = torch.arange(B, device=buf.device)[:, None, None, None]
    hi = torch.arange(H, device=buf.device)[None, None, :, None]
    return buf[bi, pos.clamp(0, L - 1), hi]


def _pick(scores: Tensor, t: Tensor, block: int, top_k: int, keep_first: int, keep_last: int) -> Tensor:
    """scores [B, C, H, NS] (-inf allowed), t [B, C] positions (-1: padding) -> idx [B, C, H, top_k]
    int32: forced blocks, then the best scores, ties to the lower block; ascending, -1 padded."""
    NS = scores.shape[-1]
    j = torch.arange(NS, device=scores.device)
    own = torch.where(t >= 0, torch.div(t, block, rounding_mode="floor"), torch.full_like(t, -1))[..., None, None]
    eligible = j <= own                                              # [B, C, 1, NS]: a prefix
    forced = eligible & ((j < keep_first) | (j > own - keep_last))
    key = torch.where(forced, float("inf"), torch.where(eligible, scores, float("-inf")))
    # eligible blocks are a prefix: a stable descending sort puts them before the ineligible ones
    # on equal keys, and orders ties by block
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :top_k]
    chosen = torch.where(order <= own, order, NS)
    chosen = torch.sort(chosen, dim=-1).values
    chosen = torch.where(chosen == NS, -1, chosen)
    if chosen.shape[-1] < top_k:
        chosen = torch.nn.functional.pad(chosen, (0, top_k - chosen.shape[-1]), value=-1)
    return chosen.to(torch.int32)


def _decode_chunk(spec: Spec, q: Tensor, cache: NSACache, t: Tensor, lengths: Tensor, gates, scale: float, acc):
    """Every branch for queries q [B, C, HQ, Dqk] at positions t [B, C] (-1: padding), over
    caches of lengths [B] (int64)."""
    T = int(max(cache.lengths_host))
    B, C, HQ, _ = q.shape
    H = cache.kv_heads
    qg = q.to(acc).unflatten(2, (H, HQ // H))                         # [B, C, H, G, Dqk]
    dev = q.device
    outs, lses, idxs, probs = {}, {}, {}, {}
    for b in spec.of_kind("compress"):
        N = _n_compressed(T, b.block, b.stride)
        kc, vc = cache.k_cmp[b.name][:, :N].to(acc), cache.v_cmp[b.name][:, :N].to(acc)
        ends = torch.arange(N, device=dev) * b.stride + b.block - 1
        mask = (ends <= t[..., None])[:, :, None, None, :]             # [B, C, 1, 1, N]
        valid = ends[None, :] < lengths[:, None]                       # [B, N] blocks pooled for b
        outs[b.name], lses[b.name], probs[b.name] = _attend(qg, kc, vc, mask, scale, valid)
    for b in spec.of_kind("select"):
        NS = -(-T // b.block)
        if b.score == "mean_pool":
            NF = T // b.block
            kbar = cache.k_mean[b.name][:, :NF].to(acc)                # [B, NF, H, Dqk]
            sc = torch.einsum("bchgd,bjhd->bchj", qg, kbar)
            sc = torch.nn.functional.pad(sc, (0, NS - NF), value=float("-inf"))
            last = (torch.arange(NS, device=dev) + 1) * b.block - 1
            sc = torch.where((last <= t[..., None])[:, :, None, :], sc, float("-inf"))
        else:
            c = spec.branch(b.score)
            p = probs[c.name].sum(3)                                   # [B, C, H, N] summed over the group
            A, CS = c.block // c.stride, b.block // c.stride
            # block i covers segments i .. i + A - 1 (of STRIDE keys); select block j segments j*CS .. j*CS + CS - 1
            seg = p.new_zeros(p.shape[:-1] + (NS * CS,))
            N = p.shape[-1]
            for a in range(A):
                n = min(N, NS * CS - a)
                if n > 0:
                    seg[..., a:a + n] += p[..., :n]
            sc = seg.unflatten(-1, (NS, CS)).sum(-1)                   # [B, C, H, NS]
        idx = _pick(sc, t, b.block, b.top_k, b.keep_first, b.keep_last)
        idxs[b.name] = idx
        pos = idx.long()[..., None] * b.block + torch.arange(b.block, device=dev)   # [B, C, H, K, LS]
        ok = (idx[..., None] >= 0) & (pos <= t[:, :, None, None, None])
        keys = _gather(cache.k[b.name], pos.flatten(3)).to(acc)
        vals = _gather(cache.v[b.name], pos.flatten(3)).to(acc)
        ok = ok.flatten(3)                                              # [B, C, H, K*LS]
        outs[b.name], lses[b.name], _ = _attend(qg, keys, vals, ok[:, :, :, None, :], scale, ok)
    for b in spec.of_kind("window"):
        Wb = min(b.size, T)
        band = t[..., None] - Wb + 1 + torch.arange(Wb, device=dev)      # [B, C, Wb], ends at t
        ok = (band >= 0) & (band > t[..., None] - b.size) & (t[..., None] >= 0)
        sinks = torch.arange(min(b.sinks, T), device=dev).expand(B, C, -1)
        ok_s = sinks <= t[..., None] - b.size                            # sinks outside the band only
        pos = torch.cat([sinks, band], -1)[:, :, None, :].expand(B, C, H, -1)
        ok = torch.cat([ok_s, ok], -1)[:, :, None, :].expand(B, C, H, -1)   # [B, C, H, N]
        keys = _gather(cache.k[b.name], pos).to(acc)
        vals = _gather(cache.v[b.name], pos).to(acc)
        outs[b.name], lses[b.name], _ = _attend(qg, keys, vals, ok[:, :, :, None, :], scale, ok)
    outs = {n: o.flatten(2, 3) for n, o in outs.items()}                 # [B, C, HQ, Dv]
    lses = {n: l.flatten(2, 3) for n, l in lses.items()}
    names = spec.output.branches
    if spec.output.kind == "gate":
        act = gate_activation(spec.output.activation)
        o = sum(act(gates[..., i, None].to(acc)) * outs[n] for i, n in enumerate(names))
    else:
        o = sum(outs[n] for n in names)
    return o, outs, lses, idxs


def decode_torch(spec: Spec, q: Tensor, cache: NSACache, step: DecodeStep, gates: Optional[Tensor] = None, *,
                 scale: Optional[float] = None, return_aux: bool = False, query_chunk: int = 64):
    """Every branch for the chunk of ``step`` in plain PyTorch; ``q [B, C, HQ, Dqk]``,
    ``gates [B, C, HQ, n_gates]`` for ``gate(...)`` outputs. Returns ``o [B, C, HQ, Dv]`` (q.dtype)
    or ``(o, Aux)`` (``nsa_dsl.op.Aux``: indices, lse, outputs by branch).

    Gathers only the keys each position reads (visible compressed blocks, selected blocks, the
    window), so a decoding step costs O(keys read), not O(T). Computes in fp32 (float64 inputs
    stay float64); queries run ``query_chunk`` at a time to bound memory on long chunks.
    """
    _check_q(spec, q, cache, step, gates)
    B, C, HQ, Dqk = q.shape
    scale = check_scale(scale, Dqk)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    pos = step.start.to(dev).long()[:, None] + torch.arange(C, device=dev)
    t_all = torch.where(torch.arange(C, device=dev) < step.n_new.to(dev).long()[:, None], pos, -1)
    lengths = (step.start.to(dev) + step.n_new.to(dev)).long()
    pieces = []
    if C == 0:                                # an empty chunk: empty outputs
        q = q.new_zeros(B, 1, HQ, Dqk)
        gates = gates.new_zeros(gates.shape[:1] + (1,) + gates.shape[2:]) if gates is not None else None
        t_all = t_all.new_full((B, 1), -1)
    for c0 in range(0, max(C, 1), query_chunk):
        g = gates[:, c0:c0 + query_chunk] if gates is not None else None
        pieces.append(_decode_chunk(spec, q[:, c0:c0 + query_chunk], cache, t_all[:, c0:c0 + query_chunk],
                                    lengths, g, scale, acc))
    o = torch.cat([p[0] for p in pieces], 1).to(q.dtype)[:, :C]
    if not return_aux:
        return o
    from .op import Aux
    names = [b.name for b in spec.branches]
    return o, Aux(indices={n: torch.cat([p[3][n] for p in pieces], 1)[:, :C] for n in pieces[0][3]},
                  lse={n: torch.cat([p[2][n] for p in pieces], 1).float()[:, :C] for n in names},
                  outputs={n: torch.cat([p[1][n] for p in pieces], 1).to(q.dtype)[:, :C] for n in names})


def _check_q(spec: Spec, q: Tensor, cache: NSACache, step: DecodeStep, gates) -> None:
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


# ---------------------------------------------------------------------------------------------
# Decoding with the generated kernels
# ---------------------------------------------------------------------------------------------

class DecodeOp:
    """The spec's decode kernels (``templates/decode.py.j2`` rendered through ``codegen``,
    cached on disk like the training kernels). ``op(q, cache, step, gates)`` -> o [B, C, HQ, Dv]."""

    def __init__(self, spec: Spec, kernel_cache=None):
        self.spec = spec
        self._cache = kernel_cache
        self._modules = {}

    @property
    def kernel_cache(self):
        if self._cache is None:
            from codegen.cache import KernelCache
            self._cache = KernelCache()
        return self._cache

    def plan(self, heads: int, kv_heads: int, qk_dim: int, v_dim: int):
        from codegen.plan import bind, lower_decode
        return lower_decode(self.spec, bind(self.spec, heads, kv_heads, qk_dim, v_dim))

    def module(self, heads: int, kv_heads: int, qk_dim: int, v_dim: int):
        """The launcher for these shapes (``codegen.launch.decode.Decode``) over its rendered kernels."""
        key = (heads, kv_heads, qk_dim, v_dim)
        if key not in self._modules:
            from codegen import launch
            plan = self.plan(*key)
            self._modules[key] = launch.build(plan, self.kernel_cache.load(plan))["decode"]
        return self._modules[key]

    def source(self, heads: int, kv_heads: int, qk_dim: int, v_dim: int) -> str:
        """The generated Triton source for these shapes."""
        from pathlib import Path
        return Path(self.module(heads, kv_heads, qk_dim, v_dim).kernels.__file__).read_text()

    def __call__(self, q: Tensor, cache: NSACache, step: DecodeStep, gates: Optional[Tensor] = None, *,
                 scale: Optional[float] = None, return_aux: bool = False, config: Optional[dict] = None):
        spec = self.spec
        _check_q(spec, q, cache, step, gates)
        check_kernel_device(q, q.dtype, reference_hint="decode_torch (backend='reference')")
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise _err("E606", f"q has dtype {q.dtype}; the decode kernels take float16, bfloat16 or float32",
                       hint="use decode_torch (backend='reference') for float64")
        if q.dtype != cache.dtype or (gates is not None and gates.dtype != q.dtype):
            raise _err("E606", f"q has dtype {q.dtype}; the cache holds {cache.dtype}"
                               + (f" and gates are {gates.dtype}" if gates is not None else "")
                               + ": one dtype for all")
        B, C, HQ, Dqk = q.shape
        mod = self.module(HQ, cache.kv_heads, Dqk, cache.v_dim)
        scale = check_scale(scale, Dqk)
        cmp = [(cache.k_cmp[b.name], cache.v_cmp[b.name]) for b in spec.of_kind("compress")]
        sel = [(cache.k[b.name], cache.v[b.name], cache.k_mean.get(b.name)) for b in spec.of_kind("select")]
        win = [(cache.k[b.name], cache.v[b.name]) for b in spec.of_kind("window")]
        g = gates if spec.output.kind == "gate" else None
        o, idx, bo, blse = mod.decode(q, step.start, step.n_new, cmp, sel, win, g, scale,
                                      t_max=step.t_max, aux=return_aux, config=config)
        if not return_aux:
            return o
        from .op import Aux
        order = [b.name for k in ("compress", "select", "window") for b in spec.of_kind(k)]
        return o, Aux(indices={b.name: i for b, i in zip(spec.of_kind("select"), idx)},
                      lse={n: blse[i] for i, n in enumerate(order)},
                      outputs={n: bo[i] for i, n in enumerate(order)})


# ---------------------------------------------------------------------------------------------
# SparseAttention glue (module.py calls these)
# ---------------------------------------------------------------------------------------------

_DECODE_OPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def new_cache(layer, batch_size: int, max_len: int, *, dtype=None, device=None) -> NSACache:
    """``layer.new_cache(batch_size, max_len)``: a cache shaped for ``layer`` (its dtype / device
    unless given; one raw key/value pair, or one per branch with ``separate_kv``)."""
    w = layer.q_proj.weight
    return NSACache(layer.spec, batch_size, max_len, kv_heads=layer.kv_heads, qk_dim=layer.qk_dim,
                    v_dim=layer.v_dim, shared_kv=not layer.separate_kv,
                    dtype=dtype or w.dtype, device=device or w.device)


def _pool_for(layer) -> Optional[Pool]:
    if len(layer.k_pool) == 0:
        return None

    def pool(name, kb, vb):          # kb [P, l, H, D]: one block per "batch" row -> [P, 1, H, D]
        return layer.k_pool[name](kb)[:, 0], layer.v_pool[name](vb)[:, 0]
    return pool


def _rotate(layer, q, k, starts: Sequence[int]):
    """Rotary at each token's own position (starts[b] + i); one call per sequence when starts differ."""
    C = q.shape[1]
    names = list(k) if isinstance(k, dict) else None
    k_all = torch.cat([k[n] for n in names], 2) if names else k
    if len(set(starts)) <= 1:
        pos = torch.arange(C, device=q.device) + (starts[0] if starts else 0)
        q, k_all = layer.rotary(q, k_all, pos)
    else:
        qs, ks = [], []
        for b, s in enumerate(starts):
            qb, kb = layer.rotary(q[b:b + 1], k_all[b:b + 1], torch.arange(C, device=q.device) + s)
            qs.append(qb)
            ks.append(kb)
        q, k_all = torch.cat(qs), torch.cat(ks)
    if names:
        return q, dict(zip(names, k_all.split(layer.kv_heads, dim=2)))
    return q, k_all


def forward_cached(layer, x: Tensor, cache: NSACache, *, n_new=None, return_aux: bool = False):
    """``layer(x, cache=cache)``: project the chunk ``x [B, C, hidden]``, append its keys and values
    to ``cache`` (pooling the blocks it completes), attend every branch for its tokens, project out.
    The layer's ``backend`` picks ``decode_torch`` ("reference", or "auto" off CUDA) or the
    generated decode kernels ("kernels", or "auto" on CUDA)."""
    layer._check_input(x)
    if not isinstance(cache, NSACache) or cache.spec != layer.spec:
        raise _err("E809", "cache must be an NSACache of this layer's spec (layer.new_cache(batch_size, max_len))")
    B, C, _ = x.shape
    if B != cache.batch_size:
        raise _err("E809", f"x has batch {B}; the cache was made for {cache.batch_size} sequences")
    HQ, Dv = layer.heads, layer.v_dim
    q, k, v = layer.project(x)
    if layer.rotary is not None:
        q, k = _rotate(layer, q, k, cache.lengths_host)
    gates = None
    if layer.gate_proj is not None:
        gates = layer.gate_proj(x).view(B, C, HQ, layer.num_gates)     # logits: the op applies sigmoid
    def cast(x):                     # the projections' dtype (autocast) -> the cache's
        return {n: t.to(cache.dtype) for n, t in x.items()} if isinstance(x, dict) else x.to(cache.dtype)
    with torch.no_grad():
        step = cache.append(cast(k), cast(v), n_new=n_new, pool=_pool_for(layer))
    use_kernels = layer.backend == "kernels" or (layer.backend == "auto" and x.is_cuda)
    if use_kernels:
        op = _DECODE_OPS.get(layer)
        if op is None or op.spec != layer.spec:
            op = _DECODE_OPS[layer] = DecodeOp(layer.spec)
        out = op(q.to(cache.dtype), cache, step, gates.to(cache.dtype) if gates is not None else None,
                 scale=layer.scale, return_aux=return_aux)
    else:
        out = decode_torch(layer.spec, q.to(cache.dtype), cache, step, gates, scale=layer.scale,
                           return_aux=return_aux)
    o, aux = out if return_aux else (out, None)
    y = layer.o_proj(o.to(x.dtype).reshape(B, C, HQ * Dv))
    return (y, aux) if return_aux else y


# ---------------------------------------------------------------------------------------------
# Benchmark (GPU only)
# ---------------------------------------------------------------------------------------------

def decode_bench(op: Union[DecodeOp, Spec, str, os.PathLike], cache_lengths: Sequence[int] = (8192, 65536),
                 batches: Sequence[int] = (1, 64), *, HQ: int = 64, H: int = 4, Dqk: int = 128, Dv: int = 128,
                 q_len: int = 1, dtype=torch.bfloat16, peers=("cudnn", "flash"), cuda_graph: bool = True,
                 progress: Optional[Callable[[str], None]] = None, device="cuda",
                 timer: Optional[Callable[[Callable], float]] = None) -> list[dict]:
    """Time one decoding step per (batch, cache length) against SDPA over the whole cache (GPU).

    For each case the cache holds ``T - q_len`` random tokens (appended in chunks, which pools the
    compressed blocks); then, per step, ``q_len`` new tokens per sequence (``q_len > 1``:
    speculative decoding):
      ``nsa_step_ms``    append (host bookkeeping, pooling) + the decode kernels,
      ``nsa_kernel_ms``  the decode kernels alone (``DecodeOp``: split-K slices + decode kernel),
      ``nsa_graph_ms``   the same replayed from a CUDA graph (``cuda_graph``; launch overhead gone),
      ``sdpa_<peer>_ms`` SDPA (``peers``: cudnn / flash backends) of the ``q_len`` queries over all
                         ``T`` keys of the same cache (GQA), the dense baseline,
      ``speedup``        fastest SDPA / ``nsa_kernel_ms`` (``speedup_graph``: / ``nsa_graph_ms``, the
                         GPU's time without the host's launches).
    Medians of ``triton.testing.do_bench`` (``timer`` replaces it, e.g. for a dry run on the CPU
    with ``device="cpu"``, ``cuda_graph=False``, ``peers=()``). Returns one dict per case.
    """
    if timer is None:
        from triton.testing import do_bench

        def timer(fn):
            return float(do_bench(fn, return_mode="median"))
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("decode_bench needs a CUDA GPU")
    if not isinstance(op, DecodeOp):
        if not isinstance(op, Spec):     # a path, or spec text
            from . import load, parse
            op = parse(op) if isinstance(op, str) and "{" in op else load(op)
        op = DecodeOp(op)
    spec = op.spec
    n_gates = len(spec.output.branches)
    rows = []
    for B in batches:
        for T in cache_lengths:
            if progress:
                progress(f"decode B={B} T={T} q_len={q_len}")
            g = torch.Generator(device=dev).manual_seed(B * 100003 + T)

            def r(*shape):
                return torch.randn(*shape, device=dev, dtype=dtype, generator=g)
            cache = NSACache(spec, B, T, kv_heads=H, qk_dim=Dqk, v_dim=Dv, dtype=dtype, device=dev)
            fill = max(1, min(T, (1 << 26) // max(1, B * H * (Dqk + Dv))))   # tokens per prefill append
            for c0 in range(0, T - q_len, fill):
                n = min(fill, T - q_len - c0)
                cache.append(r(B, n, H, Dqk), r(B, n, H, Dv))
            q = r(B, q_len, HQ, Dqk)
            k_new, v_new = r(B, q_len, H, Dqk), r(B, q_len, H, Dv)
            gates = torch.rand(B, q_len, HQ, n_gates, device=dev, generator=g).to(dtype) \
                if spec.output.kind == "gate" else None
            lengths_host, lengths_dev = list(cache._lengths), cache.lengths.clone()

            def one_step():                        # rewind the lengths, append the same tokens, decode
                cache._lengths = list(lengths_host)
                cache.lengths.copy_(lengths_dev)
                return op(q, cache, cache.append(k_new, v_new), gates)
            one_step()                             # compiles; leaves the cache holding T tokens
            step = cache.step_at(lengths_host, (q_len,) * B, q_len)
            row = {"B": B, "T": T, "q_len": q_len, "HQ": HQ, "H": H, "Dqk": Dqk, "Dv": Dv,
                   "dtype": str(dtype).split(".")[-1], "cache_bytes": cache.nbytes()}
            row["nsa_step_ms"] = timer(one_step)
            row["nsa_kernel_ms"] = timer(lambda: op(q, cache, step, gates))
            if cuda_graph:
                try:
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        op(q, cache, step, gates)  # warm, outside the capture
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        op(q, cache, step, gates)
                    row["nsa_graph_ms"] = timer(graph.replay)
                except Exception as e:            # noqa: BLE001 - report it, keep benchmarking
                    row["nsa_graph_error"] = f"{type(e).__name__}: {e}"
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
            best = min((row[f"sdpa_{p}_ms"] for p in peers if f"sdpa_{p}_ms" in row), default=None)
            if best is not None and row["nsa_kernel_ms"] > 0:
                row["speedup"] = best / row["nsa_kernel_ms"]
            if best is not None and row.get("nsa_graph_ms", 0) > 0:
                row["speedup_graph"] = best / row["nsa_graph_ms"]
            rows.append(row)
            del cache, k_full, v_full
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows
