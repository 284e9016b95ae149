"""The reference semantics of nsa-dsl, in plain PyTorch: the oracle every kernel is judged by.

Everything here follows docs/SEMANTICS.md literally; readability beats speed, but the code
is vectorized and works on query chunks so the paper's pattern at T = 4096 runs on a CPU in
seconds and never builds a ``[T, T]`` matrix per head.

Layout (see docs/ARCHITECTURE.md, "Semantics"):
``q [B, T, HQ, Dqk]``, ``k [B, T, H, Dqk]``, ``v [B, T, H, Dv]``, ``G = HQ // H``; query head
``h`` reads kv head ``h // G``.  Compressed keys ``k_cmp [B, Nc, H, Dqk]``, ``v_cmp [B, Nc, H, Dv]``.
Log-sum-exps ``lse [B, T, HQ]`` are natural logs of ``sum exp(scale * q.k)`` over the keys a
branch attends, ``-inf`` where there are none (the output there is exactly 0 and every gradient
is finite).  Selected blocks ``idx [B, T, H, top_k]`` int32, ascending, padded with -1 at the end.

Per-branch functions (each kernel family is judged against one of them):
``mean_pool``, ``compress_attention``, ``overlap_weights``, ``select_blocks_cmp``,
``select_blocks_mean_pool``, ``select_attention``, ``window_attention``; and the whole spec:
``reference``.

Everything is computed in the input dtype (tests use float64).  Attention runs one query chunk
at a time and backward recomputes each chunk (see ``_QueryChunks``), so memory stays linear in
T; gradients come from autograd inside each chunk.

Error codes raised here (``SpecError``, span None):
E600 a spec value the reference cannot run (the checker should have refused it),
E601 a tensor of the wrong rank or shape, E602 wrong dtype, E603 wrong device,
E604 per-branch tensors missing or naming an unknown branch, E605 bad or missing gates,
E606 a bad ``selection`` override.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F

from .errors import SpecError
from .ir import Compress, Select, Spec, Window

__all__ = [
    "Aux", "reference", "mean_pool", "compress_attention", "overlap_weights",
    "select_blocks_cmp", "select_blocks_mean_pool", "select_attention", "window_attention",
    "block_scores_cmp", "block_scores_mean_pool", "gate_activation",
    "num_compressed_blocks", "num_select_blocks",
]

# Queries per chunk.  Tests lower it to exercise chunking on short sequences.
_QUERY_CHUNK = 256
# Upper bound on the elements of gathered keys + values per chunk of the select branch.
_GATHER_BUDGET = 1 << 24


# ----------------------------------------------------------------------------- small helpers

def num_compressed_blocks(T: int, block: int, stride: int) -> int:
    """``Nc = floor((T - l) / d) + 1``, 0 when ``T < l``."""
    return 0 if T < block else (T - block) // stride + 1


def num_select_blocks(T: int, select_block: int) -> int:
    """Selection blocks that hold at least one key: ``ceil(T / l')``."""
    return -(-T // select_block)


def gate_activation(name: str):
    """The torch function of a gate activation the language names (``gate(sigmoid, ...)``)."""
    if name == "sigmoid":
        return torch.sigmoid
    raise SpecError("E600", f"gate activation {name!r} has no reference semantics")


def _group(x: torch.Tensor, H: int) -> torch.Tensor:
    """``[B, T, HQ, ...] -> [B, T, H, G, ...]``: the G query heads of each kv head side by side."""
    return x.unflatten(2, (H, x.shape[2] // H))


def _ungroup(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, G, ...] -> [B, T, HQ, ...]``."""
    return x.flatten(2, 3)


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor):
    """Softmax over the last dim restricted to ``mask``; returns ``(p, lse)``.

    Masked entries get probability exactly 0.  A row with no key gets ``p = 0`` and
    ``lse = -inf``; forward and backward stay free of NaN (no ``inf - inf``, no ``0 / 0``).
    """
    s = torch.where(mask, logits, float("-inf"))
    if s.shape[-1] > 0:
        m = s.detach().amax(-1, keepdim=True)        # lse and p do not depend on m: detach is exact
    else:
        m = s.new_zeros(s.shape[:-1] + (1,))
    m = torch.where(torch.isfinite(m), m, 0.0)
    e = torch.exp(s - m)                             # exactly 0 where masked
    z = e.sum(-1, keepdim=True)
    has_keys = z > 0
    z_safe = torch.where(has_keys, z, 1.0)
    p = e / z_safe
    lse = torch.where(has_keys, torch.log(z_safe) + m, float("-inf")).squeeze(-1)
    return p, lse


def _chunk_size(per_query: int = 0) -> int:
    size = _QUERY_CHUNK
    if per_query > 0:
        size = min(size, max(1, _GATHER_BUDGET // per_query))
    return max(1, size)


class _QueryChunks(torch.autograd.Function):
    """Attention computed one query chunk at a time, recomputed chunk by chunk in backward.

    ``fn(q_chunk, t0, *tensors) -> (o, lse)`` must be a pure function of its arguments (what
    it captures gets no gradient).  Forward writes each chunk into one output and keeps no
    activations; backward reruns each chunk under autograd and accumulates its gradients, so
    memory stays linear in T and no chunk's temporaries outlive it.  Double backward works
    (with ``create_graph=True`` the recomputation keeps its graph).
    """

    @staticmethod
    def forward(ctx, fn, chunk, q, *tensors):
        B, T, HQ, _ = q.shape
        o = lse = None
        for t0 in range(0, T, chunk):
            o_c, lse_c = fn(q[:, t0:t0 + chunk], t0, *tensors)
            if o is None:
                o = o_c.new_empty((B, T, HQ, o_c.shape[-1]))
                lse = lse_c.new_empty((B, T, HQ))
            o[:, t0:t0 + chunk] = o_c
            lse[:, t0:t0 + chunk] = lse_c
        ctx.fn, ctx.chunk = fn, chunk
        ctx.save_for_backward(q, *tensors)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        inputs = ctx.saved_tensors
        wants = ctx.needs_input_grad[2:]
        create_graph = torch.is_grad_enabled()       # backward(create_graph=True): keep a graph
        grads = [None] * len(inputs)
        for t0 in range(0, inputs[0].shape[1], ctx.chunk):
            with torch.enable_grad():
                # fresh aliases: gradients by argument, even when one tensor is passed twice
                xs = [x.view_as(x) if w else x.detach() for x, w in zip(inputs, wants)]
                o_c, lse_c = ctx.fn(xs[0][:, t0:t0 + ctx.chunk], t0, *xs[1:])
                wanted = [i for i, w in enumerate(wants) if w]
                gs = torch.autograd.grad((o_c, lse_c), [xs[i] for i in wanted],
                                         (do[:, t0:t0 + ctx.chunk], dlse[:, t0:t0 + ctx.chunk]),
                                         allow_unused=True, create_graph=create_graph)
            for i, g in zip(wanted, gs):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i] + g
        return (None, None, *grads)


def _over_query_chunks(fn, q: torch.Tensor, chunk: int, *tensors):
    """Run ``fn(q[:, t0:t0 + chunk], t0, *tensors) -> (o, lse)`` over query chunks; ``(o, lse)``."""
    return _QueryChunks.apply(fn, chunk, q, *tensors)


def _positions(t0: int, n: int, device) -> torch.Tensor:
    return torch.arange(t0, t0 + n, device=device)


# ----------------------------------------------------------------------------- compression

def mean_pool(k: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """``[B, T, H, D] -> [B, Nc, H, D]``: compressed block ``i`` averages keys ``[i*d, i*d + l)``."""
    B, T, H, D = k.shape
    if num_compressed_blocks(T, block, stride) == 0:
        return k[:, :0]
    return k.unfold(1, block, stride).mean(-1)       # unfold: [B, Nc, H, D, block]


def compress_attention(q, k_cmp, v_cmp, block: int, stride: int, scale: float):
    """Softmax attention of every query over the compressed blocks it sees; returns ``(o, lse)``.

    Query ``t`` sees compressed block ``i`` iff ``i*stride + block - 1 <= t``.
    ``o [B, T, HQ, Dv]``, ``lse [B, T, HQ]`` (``-inf`` and ``o = 0`` before the first block ends).
    """
    H, Nc = k_cmp.shape[2], k_cmp.shape[1]
    block_end = torch.arange(Nc, device=q.device) * stride + block - 1     # last key of block i

    def chunk(qc, t0, k_cmp, v_cmp):
        t = _positions(t0, qc.shape[1], q.device)
        visible = block_end[None, :] <= t[:, None]                          # [Tc, Nc]
        logits = torch.einsum("bthgd,bnhd->bthgn", _group(qc, H), k_cmp) * scale
        p, lse = _masked_softmax(logits, visible[None, :, None, None, :])
        o = torch.einsum("bthgn,bnhe->bthge", p, v_cmp)
        return _ungroup(o), _ungroup(lse)

    return _over_query_chunks(chunk, q, _chunk_size(), k_cmp, v_cmp)


# ----------------------------------------------------------------------------- selection

def overlap_weights(block: int, stride: int, select_block: int, n_cmp: int, n_sel: int,
                    *, dtype: Optional[torch.dtype] = None, device=None) -> torch.Tensor:
    """``w [n_cmp, n_sel]``: stride-``d`` segments shared by compressed block ``i``
    (segments ``i .. i + l/d - 1``) and selection block ``j`` (segments
    ``j*l'/d .. (j+1)*l'/d - 1``).  Integer counts (int64 unless ``dtype`` is given).
    """
    if block % stride or select_block % stride:
        raise SpecError("E600", f"stride {stride} must divide the compress block {block} and "
                                f"the select block {select_block} to score by compression")
    i = torch.arange(n_cmp, device=device)[:, None]
    j = torch.arange(n_sel, device=device)[None, :]
    per_sel = select_block // stride
    first = torch.maximum(i, j * per_sel)                       # first shared segment
    end = torch.minimum(i + block // stride, (j + 1) * per_sel)  # one past the last
    w = (end - first).clamp(min=0)
    return w if dtype is None else w.to(dtype)


def _check_top_k(top_k: int, keep_first: int, keep_last: int) -> None:
    if top_k < 1 or keep_first < 0 or keep_last < 0 or keep_first + keep_last > top_k:
        raise SpecError("E600", f"select needs top_k >= 1 and keep_first + keep_last <= top_k, "
                                f"got top_k={top_k}, keep_first={keep_first}, keep_last={keep_last}")


def _pick_blocks(scores: torch.Tensor, t: torch.Tensor, select_block: int, top_k: int,
                 keep_first: int, keep_last: int) -> torch.Tensor:
    """Choose blocks from ``scores [B, Tc, H, n_sel]`` for the query positions ``t [Tc]``.

    Order of preference: forced blocks, then eligible blocks by score (descending), then the
    other eligible blocks (score ``-inf``); ties go to the lower index.  Ineligible blocks are
    never chosen.  Returns ``[B, Tc, H, top_k]`` int32, ascending, -1 padded.
    """
    n_sel = scores.shape[-1]
    j = torch.arange(n_sel, device=scores.device)[None, :]
    own = (t // select_block)[:, None]                               # t's own block
    eligible = j <= own                                              # j*l' <= t
    forced = eligible & ((j < keep_first) | (j > own - keep_last))   # [Tc, n_sel]
    eligible = eligible[None, :, None, :].expand_as(scores)
    forced = forced[None, :, None, :].expand_as(scores)

    key = torch.where(forced, float("inf"), torch.where(eligible, scores, float("-inf")))
    # Two stable sorts make a lexicographic order: (eligible first, key descending, index).
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    tier = eligible.gather(-1, order).to(torch.int8)
    order = order.gather(-1, torch.sort(tier, dim=-1, descending=True, stable=True).indices)

    chosen = order[..., :top_k]
    chosen = torch.where(eligible.gather(-1, chosen), chosen, n_sel)  # n_sel: "none"
    chosen = torch.sort(chosen, dim=-1).values
    chosen = torch.where(chosen == n_sel, -1, chosen)
    if chosen.shape[-1] < top_k:                                     # fewer blocks than top_k
        chosen = F.pad(chosen, (0, top_k - chosen.shape[-1]), value=-1)
    return chosen.to(torch.int32)


def _scores_cmp(qc, t, k_cmp, lse_c, scale: float, block: int, stride: int, w: torch.Tensor):
    """Group scores ``[B, Tc, H, n_sel]`` of the queries ``qc`` at positions ``t`` (see below)."""
    H, Nc = k_cmp.shape[2], k_cmp.shape[1]
    block_end = torch.arange(Nc, device=qc.device) * stride + block - 1
    logits = torch.einsum("bthgd,bnhd->bthgn", _group(qc, H), k_cmp) * scale
    lse = _group(lse_c, H)[..., None]                                       # [B, Tc, H, G, 1]
    visible = (block_end[None, :] <= t[:, None])[None, :, None, None, :] & torch.isfinite(lse)
    p = torch.where(visible, torch.exp(torch.where(visible, logits - lse, 0.0)), 0.0)
    return p.sum(3) @ w                                                     # [B, Tc, H, n_sel]


def _scores_mean_pool(qc, t, k_mean, select_block: int):
    """Group scores ``[B, Tc, H, n_sel]`` by block means (incomplete blocks ``-inf``)."""
    H, n_sel = k_mean.shape[2], k_mean.shape[1]
    block_last = (torch.arange(n_sel, device=qc.device) + 1) * select_block - 1
    scores = torch.einsum("bthgd,bnhd->bthn", _group(qc, H), k_mean)
    complete = (block_last[None, :] <= t[:, None])[None, :, None, :]
    return torch.where(complete, scores, float("-inf"))


def _block_means(k, select_block: int):
    """``[B, n_sel, H, D]``: the mean of each selection block's keys (the last may be partial)."""
    T = k.shape[1]
    n_sel = num_select_blocks(T, select_block)
    k_pad = F.pad(k, (0, 0, 0, 0, 0, n_sel * select_block - T))
    return k_pad.unflatten(1, (n_sel, select_block)).mean(2)


def block_scores_cmp(q, k_cmp, lse_cmp, scale: float, block: int, stride: int, select_block: int):
    """The scores ``s [B, T, H, n_sel]`` that ``score = <compress branch>`` ranks (see
    :func:`select_blocks_cmp`); for tests and inspection (memory ``O(T * n_sel)``)."""
    T = q.shape[1]
    with torch.no_grad():
        w = overlap_weights(block, stride, select_block, k_cmp.shape[1], num_select_blocks(T, select_block),
                            dtype=q.dtype, device=q.device)
        return _scores_cmp(q.detach(), _positions(0, T, q.device), k_cmp.detach(), lse_cmp.detach(),
                           scale, block, stride, w)


def block_scores_mean_pool(q, k, select_block: int):
    """The scores ``s [B, T, H, n_sel]`` that ``score = mean_pool`` ranks (``-inf``: incomplete)."""
    with torch.no_grad():
        return _scores_mean_pool(q.detach(), _positions(0, q.shape[1], q.device),
                                 _block_means(k.detach(), select_block), select_block)


def select_blocks_cmp(q, k_cmp, lse_cmp, scale: float, block: int, stride: int,
                      select_block: int, top_k: int, keep_first: int, keep_last: int):
    """Blocks chosen with ``score = <compress branch>``: ``idx [B, T, H, top_k]`` int32.

    ``s[t, g, j] = sum_{h in g} sum_i w(i, j) * p_cmp[t, h, i]`` with
    ``p_cmp = exp(scale * q.k_cmp - lse_cmp)`` over the compressed blocks ``t`` sees (0 for
    the others) and ``w`` from :func:`overlap_weights`.  No gradient flows through the choice.
    """
    _check_top_k(top_k, keep_first, keep_last)
    T = q.shape[1]
    n_sel = num_select_blocks(T, select_block)
    with torch.no_grad():
        q, k_cmp, lse_cmp = q.detach(), k_cmp.detach(), lse_cmp.detach()
        w = overlap_weights(block, stride, select_block, k_cmp.shape[1], n_sel, dtype=q.dtype, device=q.device)
        out = []
        chunk = _chunk_size()
        for t0 in range(0, T, chunk):
            qc = q[:, t0:t0 + chunk]
            t = _positions(t0, qc.shape[1], q.device)
            scores = _scores_cmp(qc, t, k_cmp, lse_cmp[:, t0:t0 + chunk], scale, block, stride, w)
            out.append(_pick_blocks(scores, t, select_block, top_k, keep_first, keep_last))
        return torch.cat(out, 1)


def select_blocks_mean_pool(q, k, select_block: int, top_k: int, keep_first: int, keep_last: int):
    """Blocks chosen with ``score = mean_pool``: ``idx [B, T, H, top_k]`` int32.

    ``s[t, g, j] = sum_{h in g} q[t, h] . mean(k[block j])`` (unscaled) for complete blocks
    (``(j+1)*l' - 1 <= t``); an incomplete block scores ``-inf`` but stays eligible.
    """
    _check_top_k(top_k, keep_first, keep_last)
    T = q.shape[1]
    with torch.no_grad():
        q, k = q.detach(), k.detach()
        k_mean = _block_means(k, select_block)                               # [B, n_sel, H, D]
        out = []
        chunk = _chunk_size()
        for t0 in range(0, T, chunk):
            qc = q[:, t0:t0 + chunk]
            t = _positions(t0, qc.shape[1], q.device)
            scores = _scores_mean_pool(qc, t, k_mean, select_block)
            out.append(_pick_blocks(scores, t, select_block, top_k, keep_first, keep_last))
        return torch.cat(out, 1)


def select_attention(q, k, v, idx, select_block: int, scale: float):
    """Attention over the keys of the selected blocks with position ``<= t``; ``(o, lse)``.

    ``idx [B, T, H, K]`` holds block numbers (distinct) or -1; block ``j`` covers keys
    ``[j*l', (j+1)*l')``.  Shared by the G query heads of a kv head.
    """
    B, T, HQ, Dqk = q.shape
    H, Dv = k.shape[2], v.shape[3]
    K = idx.shape[-1]
    n_sel = num_select_blocks(T, select_block)
    pad = n_sel * select_block - T
    # [B * H * n_sel, l', D]: the keys of each (batch, kv head, block), ready to gather
    def blocks_of(x):
        x = F.pad(x, (0, 0, 0, 0, 0, pad)).unflatten(1, (n_sel, select_block))   # [B, n_sel, l', H, D]
        return x.permute(0, 3, 1, 2, 4).flatten(0, 2).contiguous()
    k_blocks, v_blocks = blocks_of(k), blocks_of(v)
    offsets = torch.arange(select_block, device=q.device)
    # row of block j of (b, h) in k_blocks: (b * H + h) * n_sel + j
    row_base = (torch.arange(B, device=q.device)[:, None] * H
                + torch.arange(H, device=q.device)[None, :]) * n_sel          # [B, H]

    def chunk(qc, t0, k_blocks, v_blocks):
        Tc = qc.shape[1]
        t = _positions(t0, Tc, q.device)
        blocks = idx[:, t0:t0 + Tc].long()                                   # [B, Tc, H, K]
        rows = row_base[:, None, :, None] + blocks.clamp(0, n_sel - 1)       # [B, Tc, H, K]
        k_sel = k_blocks[rows].flatten(3, 4)                                 # [B, Tc, H, K*l', Dqk]
        v_sel = v_blocks[rows].flatten(3, 4)
        pos = blocks[..., None] * select_block + offsets                     # [B, Tc, H, K, l']
        valid = ((blocks >= 0)[..., None] & (pos <= t[None, :, None, None, None])).flatten(3, 4)
        logits = torch.einsum("bthgd,bthkd->bthgk", _group(qc, H), k_sel) * scale
        p, lse = _masked_softmax(logits, valid[:, :, :, None, :])
        o = torch.einsum("bthgk,bthke->bthge", p, v_sel)
        return _ungroup(o), _ungroup(lse)

    per_query = B * H * max(K, 1) * select_block * (Dqk + Dv + HQ // H)
    return _over_query_chunks(chunk, q, _chunk_size(per_query), k_blocks, v_blocks)


# ----------------------------------------------------------------------------- window

def window_attention(q, k, v, size: int, sinks: int, scale: float):
    """Attention over keys ``[max(0, t - size + 1), t]`` plus the sinks ``[0, sinks)`` that
    are ``<= t`` (a key in both counts once); returns ``(o, lse)``.
    """
    H = k.shape[2]

    def chunk(qc, t0, k, v):
        Tc = qc.shape[1]
        t = _positions(t0, Tc, q.device)
        lo = max(0, t0 - size + 1)           # first window key of any query in the chunk
        n_sink = min(sinks, lo)              # sink keys that lie before the band
        pos = torch.cat([torch.arange(n_sink, device=q.device),
                         torch.arange(lo, t0 + Tc, device=q.device)])
        keys = torch.cat([k[:, :n_sink], k[:, lo:t0 + Tc]], 1)
        vals = torch.cat([v[:, :n_sink], v[:, lo:t0 + Tc]], 1)
        p_, t_ = pos[None, :], t[:, None]
        visible = (p_ <= t_) & ((p_ >= t_ - size + 1) | (p_ < sinks))      # [Tc, K]
        logits = torch.einsum("bthgd,bkhd->bthgk", _group(qc, H), keys) * scale
        p, lse = _masked_softmax(logits, visible[None, :, None, None, :])
        o = torch.einsum("bthgk,bkhe->bthge", p, vals)
        return _ungroup(o), _ungroup(lse)

    return _over_query_chunks(chunk, q, _chunk_size(), k, v)


# ----------------------------------------------------------------------------- the whole spec

@dataclass(frozen=True)
class Aux:
    """Per-branch intermediate results, keyed by branch name.

    ``indices``: select branches' ``[B, T, H, top_k]`` int32 blocks; ``lse``: ``[B, T, HQ]``;
    ``outputs``: each branch's ``[B, T, HQ, Dv]`` before gating.
    """
    indices: dict = field(default_factory=dict)
    lse: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)


TensorOrDict = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def _shape(x) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def _check_tensor(name: str, x, expected: tuple, ref: torch.Tensor, code: str = "E601") -> None:
    """``expected``: ints, or None for "any"; checks rank, shape (error ``code``), dtype, device."""
    if not isinstance(x, torch.Tensor):
        raise SpecError(code, f"{name} must be a torch.Tensor, got {type(x).__name__}")
    want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
    if x.dim() != len(expected) or any(e is not None and e != s for e, s in zip(expected, x.shape)):
        raise SpecError(code, f"{name} has shape {_shape(x)}, expected {want}")
    if x.dtype != ref.dtype:
        raise SpecError("E602", f"{name} has dtype {x.dtype}, expected {ref.dtype} (the dtype of q)")
    if x.device != ref.device:
        raise SpecError("E603", f"{name} is on {x.device}, expected {ref.device} (the device of q)")


def _needed_branches(spec: Spec):
    """Branches to compute: the output's and the compress branches they score with.

    Compress branches come first (selection reads their log-sum-exps), then spec order.
    """
    names = set(spec.output.branches)
    for name in list(names):
        b = spec.branch(name)
        if isinstance(b, Select) and b.score != "mean_pool":
            if b.score not in spec.branch_names or not isinstance(spec.branch(b.score), Compress):
                raise SpecError("E600", f"select {b.name!r} scores with {b.score!r}, "
                                        f"which is not a compress branch of the spec")
            names.add(b.score)
    needed = [b for b in spec.branches if b.name in names]
    return [b for b in needed if isinstance(b, Compress)] + [b for b in needed if not isinstance(b, Compress)]


def _per_branch(what: str, x: TensorOrDict, branches, spec: Spec) -> dict:
    """Resolve ``k`` or ``v`` (a tensor, or a dict by branch) for the branches that need raw keys."""
    if isinstance(x, Mapping):
        unknown = sorted(set(x) - set(spec.branch_names))
        if unknown:
            raise SpecError("E604", f"{what} names unknown branch(es) {unknown}; "
                                    f"the spec's branches are {list(spec.branch_names)}")
        missing = [b.name for b in branches if b.name not in x]
        if missing:
            raise SpecError("E604", f"{what} is a dict without an entry for branch(es) {missing}, "
                                    f"which attend raw keys; give every such branch a tensor")
        return {b.name: x[b.name] for b in branches}
    return {b.name: x for b in branches}


def reference(spec: Spec, q: torch.Tensor, k: TensorOrDict, v: TensorOrDict,
              gates: Optional[torch.Tensor] = None, *,
              compressed: Optional[Mapping[str, tuple]] = None,
              scale: Optional[float] = None, return_aux: bool = False,
              selection: Optional[Mapping[str, torch.Tensor]] = None,
              cu_seqlens: Optional[torch.Tensor] = None):
    """The semantics of ``spec`` on ``q [B, T, HQ, Dqk]``; returns ``o [B, T, HQ, Dv]`` (q.dtype).

    ``k``/``v``: tensors shared by every branch, or dicts branch name -> tensor.
    ``gates [B, T, HQ, C]``: gate logits for ``output = gate(act, ...)``, in the output's branch
    order; the spec's activation is applied here (``o = sum_c act(gates[..., c]) * o_c``). None
    for ``sum`` and single-branch outputs.
    ``compressed``: name -> ``(k_cmp, v_cmp)``, required for ``pool = linear | mlp``; for
    ``pool = mean`` it replaces the pooling.  ``selection``: name -> ``idx`` replaces a select
    branch's choice of blocks.  ``return_aux=True`` returns ``(o, Aux)``.
    ``cu_seqlens [N + 1]``: packed variable-length sequences (``B = 1``; see ``nsa_dsl.varlen``):
    each sequence is computed alone and the results are concatenated, which is the definition.
    """
    if cu_seqlens is not None:
        return _reference_packed(spec, q, k, v, gates, compressed=compressed, scale=scale,
                                 return_aux=return_aux, selection=selection, cu_seqlens=cu_seqlens)
    if not isinstance(spec, Spec):
        raise SpecError("E600", f"reference() needs an nsa_dsl Spec, got {type(spec).__name__}")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        got = _shape(q) if isinstance(q, torch.Tensor) else type(q).__name__
        raise SpecError("E601", f"q must be a 4-d tensor [B, T, HQ, Dqk], got {got}")
    if not q.is_floating_point():
        raise SpecError("E602", f"q must be a floating-point tensor, got {q.dtype}")
    B, T, HQ, Dqk = q.shape
    if T < 1:
        raise SpecError("E601", f"q has shape {_shape(q)}: the sequence length T must be >= 1")

    compressed = dict(compressed or {})
    selection = dict(selection or {})
    for what, d, kind in (("compressed", compressed, "compress"), ("selection", selection, "select")):
        for name in d:
            if name not in spec.branch_names or spec.branch(name).kind != kind:
                raise SpecError("E604" if what == "compressed" else "E606",
                                f"{what} names {name!r}, which is not a {kind} branch of the spec; "
                                f"its {kind} branches are {[b.name for b in spec.of_kind(kind)]}")

    branches = _needed_branches(spec)
    raw = [b for b in branches if not (isinstance(b, Compress) and b.name in compressed)]
    for b in branches:
        if isinstance(b, Compress) and b.pool != "mean" and b.name not in compressed:
            raise SpecError("E604", f"branch {b.name!r} pools with {b.pool!r}: pass its pooled keys "
                                    f"and values as compressed={{{b.name!r}: (k_cmp, v_cmp)}}")
    ks = _per_branch("k", k, raw, spec)
    vs = _per_branch("v", v, raw, spec)

    # Shapes: H and Dv come from the first tensors given; everything else must agree.
    first_k = next(iter(ks.values()), None)
    first_v = next(iter(vs.values()), None)
    if first_k is None:
        first_k, first_v = next(iter(compressed.values()))
    for x, what in ((first_k, "k"), (first_v, "v")):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = _shape(x) if isinstance(x, torch.Tensor) else type(x).__name__
            raise SpecError("E601", f"{what} must be a 4-d tensor [B, T, H, D], got {got}")
    H, Dv = first_k.shape[2], first_v.shape[3]
    for name, x in ks.items():
        _check_tensor(f"k[{name!r}]" if isinstance(k, Mapping) else "k", x, (B, T, H, Dqk), q)
    for name, x in vs.items():
        _check_tensor(f"v[{name!r}]" if isinstance(v, Mapping) else "v", x, (B, T, H, Dv), q)
    if H < 1 or HQ % H:
        raise SpecError("E601", f"q has {HQ} heads, which is not a multiple of the {H} kv heads of k")
    for field_name, declared, actual in (("heads", spec.heads, HQ), ("kv_heads", spec.kv_heads, H),
                                         ("qk_dim", spec.qk_dim, Dqk), ("v_dim", spec.v_dim, Dv)):
        if declared is not None and declared != actual:
            raise SpecError("E601", f"the spec declares {field_name} = {declared}, "
                                    f"but the tensors have {actual}")
    for name, kv in compressed.items():
        b = spec.branch(name)
        if not isinstance(kv, (tuple, list)) or len(kv) != 2:
            raise SpecError("E604", f"compressed[{name!r}] must be a pair (k_cmp, v_cmp)")
        Nc = num_compressed_blocks(T, b.block, b.stride)
        _check_tensor(f"compressed[{name!r}][0] (k_cmp)", kv[0], (B, Nc, H, Dqk), q)
        _check_tensor(f"compressed[{name!r}][1] (v_cmp)", kv[1], (B, Nc, H, Dv), q)

    out_names = spec.output.branches
    if spec.output.kind == "gate":
        if gates is None:
            raise SpecError("E605", f"output = gate(...) needs gates [B, T, HQ, {len(out_names)}]")
        _check_tensor("gates", gates, (B, T, HQ, len(out_names)), q, code="E605")
    elif gates is not None:
        raise SpecError("E605", f"output = {spec.output.kind}(...) takes no gates; pass gates=None")

    if scale is None:
        scale = Dqk ** -0.5

    outputs, lses, indices, pooled = {}, {}, {}, {}
    for b in branches:
        if isinstance(b, Compress):
            if b.name in compressed:
                k_cmp, v_cmp = compressed[b.name]
            else:
                k_cmp = mean_pool(ks[b.name], b.block, b.stride)
                v_cmp = mean_pool(vs[b.name], b.block, b.stride)
            pooled[b.name] = (k_cmp, v_cmp)
            o, lse = compress_attention(q, k_cmp, v_cmp, b.block, b.stride, scale)
        elif isinstance(b, Select):
            if b.name in selection:
                idx = _check_selection(b, selection[b.name], (B, T, H), q)
            elif b.score == "mean_pool":
                idx = select_blocks_mean_pool(q, ks[b.name], b.block, b.top_k, b.keep_first, b.keep_last)
            else:
                c = spec.branch(b.score)
                idx = select_blocks_cmp(q, pooled[c.name][0], lses[c.name], scale, c.block, c.stride,
                                        b.block, b.top_k, b.keep_first, b.keep_last)
            indices[b.name] = idx
            o, lse = select_attention(q, ks[b.name], vs[b.name], idx, b.block, scale)
        elif isinstance(b, Window):
            o, lse = window_attention(q, ks[b.name], vs[b.name], b.size, b.sinks, scale)
        else:
            raise SpecError("E600", f"branch {b.name!r} of kind {getattr(b, 'kind', '?')!r} "
                                    f"has no reference semantics")
        outputs[b.name], lses[b.name] = o, lse

    if spec.output.kind == "gate":
        act = gate_activation(spec.output.activation)
        o = sum(act(gates[..., c, None]) * outputs[name] for c, name in enumerate(out_names))
    else:
        o = sum(outputs[name] for name in out_names)
    o = o.to(q.dtype)
    if return_aux:
        return o, Aux(indices=indices, lse=lses, outputs=outputs)
    return o


def _reference_packed(spec: Spec, q, k, v, gates, *, compressed, scale, return_aux, selection,
                      cu_seqlens):
    """``reference`` on packed sequences: run each sequence alone, concatenate along T.

    Rows ``[cu[s], cu[s + 1])`` of ``q``, ``k``, ``v``, ``gates`` and ``selection`` belong to
    sequence ``s``; compressed keys / values are packed per sequence (``nsa_dsl.varlen``).
    Empty sequences contribute nothing. Aux tensors are concatenated the same way.
    """
    from .varlen import check_cu_seqlens, compressed_cu_seqlens
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        got = _shape(q) if isinstance(q, torch.Tensor) else type(q).__name__
        raise SpecError("E601", f"q must be a 4-d tensor [1, T, HQ, Dqk], got {got}")
    cu = check_cu_seqlens(cu_seqlens, q)
    compressed = dict(compressed or {})
    offsets = {}                        # compress branch -> offsets of its sequences' blocks
    for name, kv in compressed.items():
        if name in spec.branch_names and isinstance(spec.branch(name), Compress) \
                and isinstance(kv, (tuple, list)) and len(kv) == 2:
            b = spec.branch(name)
            offsets[name] = compressed_cu_seqlens(cu, b.block, b.stride)
            for x, what in zip(kv, ("k_cmp", "v_cmp")):
                if isinstance(x, torch.Tensor) and (x.dim() != 4 or x.shape[:2] != (1, offsets[name][-1])):
                    raise SpecError("E601", f"compressed[{name!r}] ({what}) has shape {_shape(x)}, expected "
                                            f"[1, {offsets[name][-1]}, *, *]: the sequences' compressed blocks "
                                            f"(sum of (len - {b.block}) // {b.stride} + 1), packed")

    def rows(x, a, b):
        if isinstance(x, Mapping):
            return {n: t[:, a:b] for n, t in x.items()}
        return x[:, a:b] if isinstance(x, torch.Tensor) else x

    outs, auxes = [], []
    for s in range(len(cu) - 1):
        a, b = cu[s], cu[s + 1]
        if a == b:
            continue
        comp = {n: (kv if n not in offsets else
                    (kv[0][:, offsets[n][s]:offsets[n][s + 1]], kv[1][:, offsets[n][s]:offsets[n][s + 1]]))
                for n, kv in compressed.items()}
        sel = None if selection is None else {n: rows(i, a, b) for n, i in selection.items()}
        r = reference(spec, q[:, a:b], rows(k, a, b), rows(v, a, b), rows(gates, a, b),
                      compressed=comp, scale=scale, return_aux=return_aux, selection=sel)
        outs.append(r[0] if return_aux else r)
        if return_aux:
            auxes.append(r[1])
    if not outs:
        raise SpecError("E601", f"q has shape {_shape(q)}: the sequence length T must be >= 1")
    o = torch.cat(outs, 1)
    if not return_aux:
        return o
    cat = lambda field: {n: torch.cat([getattr(x, field)[n] for x in auxes], 1) for n in getattr(auxes[0], field)}
    return o, Aux(indices=cat("indices"), lse=cat("lse"), outputs=cat("outputs"))


def _check_selection(b: Select, idx, BTH: tuple, q: torch.Tensor) -> torch.Tensor:
    """Validate an override of the blocks chosen by select branch ``b``."""
    B, T, H = BTH
    where = f"selection[{b.name!r}]"
    if not isinstance(idx, torch.Tensor) or tuple(idx.shape) != (B, T, H, b.top_k):
        got = _shape(idx) if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise SpecError("E606", f"{where} has shape {got}, expected [{B}, {T}, {H}, {b.top_k}]")
    if idx.dtype not in (torch.int32, torch.int64):
        raise SpecError("E606", f"{where} has dtype {idx.dtype}, expected torch.int32")
    if idx.device != q.device:
        raise SpecError("E603", f"{where} is on {idx.device}, expected {q.device} (the device of q)")
    n_sel = num_select_blocks(T, b.block)
    if idx.numel() and (idx.min() < -1 or idx.max() >= n_sel):
        raise SpecError("E606", f"{where} holds block numbers outside [-1, {n_sel}) "
                                f"(T = {T}, block = {b.block})")
    s = torch.sort(idx, dim=-1).values
    if bool(((s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)).any()):
        raise SpecError("E606", f"{where} repeats a block for some query; blocks must be distinct")
    return idx
