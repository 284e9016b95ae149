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
``select_blocks_mean_pool``, ``select_tokens_indexer``, ``select_attention``, ``index_loss``,
``window_attention``, ``clean_indices``; and the whole spec: ``reference``. Every one takes
``causal`` (False: encoders, see docs/SEMANTICS.md); the selections take ``query_block``.

Everything is computed in the input dtype (tests use float64).  Attention runs one query chunk
at a time and backward recomputes each chunk (see ``_QueryChunks``), so memory stays linear in
T; gradients come from autograd inside each chunk.

Calls are checked by ``nsa_dsl.semantics.inputs.check_call``, which the op shares: the same bad call gets
the same error code from both (docs/LANGUAGE.md lists them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F

from nsa_dsl.language.checks import check_spec
from nsa_dsl.errors import SpecError
from nsa_dsl.semantics.inputs import check_call, check_scale, needed_branches
from nsa_dsl.language.ir import Compress, Indexer, Select, Spec
from nsa_dsl.language.rules import num_compressed_blocks, num_select_blocks

TensorOrDict = Union[torch.Tensor, Mapping[str, torch.Tensor]]

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


def _n_keys(q, q_start: int, n_keys: Optional[int]) -> int:
    """Keys of the sequence: ``n_keys``, else (queries ending it) ``q_start + Tq``."""
    return q_start + q.shape[1] if n_keys is None else n_keys


def _check_group_start(q_start: int, query_block: int) -> None:
    """Queries that start inside a query_block group would miss the group's other positions."""
    if q_start % query_block:
        raise SpecError("E629", f"queries start at position {q_start}, inside a group of query_block = "
                                f"{query_block} positions", hint=f"start at a multiple of {query_block}")


def _positions(t0: int, n: int, device) -> torch.Tensor:
    return torch.arange(t0, t0 + n, device=device)


# ----------------------------------------------------------------------------- compression

def mean_pool(k: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """``[B, T, H, D] -> [B, Nc, H, D]``: compressed block ``i`` averages keys ``[i*d, i*d + l)``.

    With ``d | l`` a block is ``l / d`` whole segments of ``d`` keys: segment sums (in fp32, or k's
    wider dtype) added in turn, whose backward is a few small adds and one expand (the op pools
    with this too: an unfold's backward scatters every key ``l / d`` times, 0.8 ms of a 64k step)."""
    B, T, H, D = k.shape
    nc = num_compressed_blocks(T, block, stride)
    if nc == 0:
        return k[:, :0]
    if block % stride:
        return k.unfold(1, block, stride).mean(-1)   # unfold: [B, Nc, H, D, block]
    a = block // stride
    seg = k[:, :(nc + a - 1) * stride].unflatten(1, (nc + a - 1, stride))
    seg = seg.sum(2, dtype=torch.promote_types(k.dtype, torch.float32))   # [B, nc + a - 1, H, D]
    out = seg[:, :nc]
    for i in range(1, a):
        out = out + seg[:, i:i + nc]
    return (out / block).to(k.dtype)


def compress_attention(q, k_cmp, v_cmp, block: int, stride: int, scale: float, causal: bool = True,
                       q_start: int = 0):
    """Softmax attention of every query over the compressed blocks it sees; returns ``(o, lse)``.

    Causal: query ``t`` sees compressed block ``i`` iff ``i*stride + block - 1 <= t``; not
    causal: every (complete) block. ``o [B, T, HQ, Dv]``, ``lse [B, T, HQ]`` (``-inf`` and
    ``o = 0`` where no block is visible).
    """
    H, Nc = k_cmp.shape[2], k_cmp.shape[1]
    block_end = torch.arange(Nc, device=q.device) * stride + block - 1     # last key of block i

    def chunk(qc, t0, k_cmp, v_cmp):
        t = _positions(q_start + t0, qc.shape[1], q.device)
        visible = (block_end[None, :] <= t[:, None]) | (not causal)         # [Tc, Nc]
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


def group_last(t: torch.Tensor, query_block: int, T: int) -> torch.Tensor:
    """The last position ``t_u`` of each position's group ``[u*Q, min((u+1)*Q, T))``: the one
    whose eligibility and forced blocks the group's shared selection takes."""
    return torch.clamp((t // query_block + 1) * query_block, max=T) - 1


def _eligible_forced(t: torch.Tensor, n_sel: int, select_block: int, keep_first: int, keep_last: int,
                     causal: bool):
    """``(eligible, forced)`` bool ``[Tc, n_sel]`` for positions ``t``: eligible blocks start at or
    before ``t`` (causal) or are any block; forced are the first ``keep_first`` eligible blocks
    and the ``keep_last`` blocks ending at ``t``'s own block."""
    j = torch.arange(n_sel, device=t.device)[None, :]
    own = (t // select_block)[:, None]
    eligible = (j <= own) if causal else torch.ones_like(j <= own)
    forced = eligible & ((j < keep_first) | ((j > own - keep_last) & (j <= own)))
    return eligible, forced


def _pick_blocks(scores: torch.Tensor, t: torch.Tensor, select_block: int, top_k: int,
                 keep_first: int, keep_last: int, causal: bool = True) -> torch.Tensor:
    """Choose blocks from ``scores [B, Tc, H, n_sel]`` for the (reference) positions ``t [Tc]``.

    Order of preference: forced blocks, then eligible blocks by score (descending), then the
    other eligible blocks (score ``-inf``); ties go to the lower index.  Ineligible blocks are
    never chosen.  Returns ``[B, Tc, H, top_k]`` int32, ascending, -1 padded.
    """
    n_sel = scores.shape[-1]
    eligible, forced = _eligible_forced(t, n_sel, select_block, keep_first, keep_last, causal)
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


def _group_rows(x: torch.Tensor, query_block: int) -> torch.Tensor:
    """``[B, Tc, ...] -> [B, ceil(Tc / Q), ...]``: the sum over each group of Q rows (chunks start
    at multiples of Q, so groups never straddle two chunks)."""
    if query_block == 1:
        return x
    Tc = x.shape[1]
    pad = -Tc % query_block
    x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    return x.unflatten(1, (-1, query_block)).sum(2)


def _pick_shared(scores: torch.Tensor, t: torch.Tensor, T: int, select_block: int, top_k: int,
                 keep_first: int, keep_last: int, causal: bool, query_block: int) -> torch.Tensor:
    """``_pick_blocks`` for groups of ``query_block`` positions: ``scores`` are already summed per
    group (``[B, n_groups, H, n_sel]``); each position's row is its group's choice."""
    t_u = group_last(t[::query_block], query_block, T)
    chosen = _pick_blocks(scores, t_u, select_block, top_k, keep_first, keep_last, causal)
    return chosen.repeat_interleave(query_block, dim=1)[:, :t.shape[0]]


def _scores_cmp(qc, t, k_cmp, lse_c, scale: float, block: int, stride: int, w: torch.Tensor,
                causal: bool = True):
    """Group scores ``[B, Tc, H, n_sel]`` of the queries ``qc`` at positions ``t`` (see below)."""
    H, Nc = k_cmp.shape[2], k_cmp.shape[1]
    block_end = torch.arange(Nc, device=qc.device) * stride + block - 1
    logits = torch.einsum("bthgd,bnhd->bthgn", _group(qc, H), k_cmp) * scale
    lse = _group(lse_c, H)[..., None]                                       # [B, Tc, H, G, 1]
    seen = (block_end[None, :] <= t[:, None]) if causal else torch.ones_like(block_end[None, :] <= t[:, None])
    visible = seen[None, :, None, None, :] & torch.isfinite(lse)
    p = torch.where(visible, torch.exp(torch.where(visible, logits - lse, 0.0)), 0.0)
    return p.sum(3) @ w                                                     # [B, Tc, H, n_sel]


def _complete(t: torch.Tensor, n_sel: int, select_block: int) -> torch.Tensor:
    """``[Tc, n_sel]``: blocks whose last key is at or before ``t`` (causal ``mean_pool`` scores
    only these: no peeking at future keys)."""
    block_last = (torch.arange(n_sel, device=t.device) + 1) * select_block - 1
    return block_last[None, :] <= t[:, None]


def _block_means(k, select_block: int):
    """``[B, n_sel, H, D]``: the mean of each selection block's keys (the last block's mean is
    over the keys it holds)."""
    T = k.shape[1]
    n_sel = num_select_blocks(T, select_block)
    k_pad = F.pad(k, (0, 0, 0, 0, 0, n_sel * select_block - T))
    counts = torch.clamp(T - torch.arange(n_sel, device=k.device) * select_block, max=select_block)
    return k_pad.unflatten(1, (n_sel, select_block)).sum(2) / counts[None, :, None, None].to(k.dtype)


def _scores_mean_pool(qc, t, k_mean, select_block: int, causal: bool = True, query_block: int = 1, T: int = 0):
    """Scores ``[B, ceil(Tc / Q), H, n_sel]`` by block means, summed over each group of
    ``query_block`` positions; causal: blocks incomplete at the group's last position ``-inf``."""
    H, n_sel = k_mean.shape[2], k_mean.shape[1]
    scores = _group_rows(torch.einsum("bthgd,bnhd->bthn", _group(qc, H), k_mean), query_block)
    if not causal:
        return scores
    t_u = group_last(t[::query_block], query_block, T or int(t[-1]) + 1)
    return torch.where(_complete(t_u, n_sel, select_block)[None, :, None, :], scores, float("-inf"))


def block_scores_cmp(q, k_cmp, lse_cmp, scale: float, block: int, stride: int, select_block: int,
                     causal: bool = True):
    """The per-position scores ``s [B, T, H, n_sel]`` that ``score = <compress branch>`` ranks
    (see :func:`select_blocks_cmp`); for tests and inspection (memory ``O(T * n_sel)``)."""
    T = q.shape[1]
    with torch.no_grad():
        w = overlap_weights(block, stride, select_block, k_cmp.shape[1], num_select_blocks(T, select_block),
                            dtype=q.dtype, device=q.device)
        return _scores_cmp(q.detach(), _positions(0, T, q.device), k_cmp.detach(), lse_cmp.detach(),
                           scale, block, stride, w, causal)


def block_scores_mean_pool(q, k, select_block: int, causal: bool = True):
    """The per-position scores ``s [B, T, H, n_sel]`` that ``score = mean_pool`` ranks (``-inf``:
    incomplete, causal)."""
    with torch.no_grad():
        return _scores_mean_pool(q.detach(), _positions(0, q.shape[1], q.device),
                                 _block_means(k.detach(), select_block), select_block, causal, 1, q.shape[1])


def _select_chunk(query_block: int) -> int:
    """Query chunk of the selection loops: a multiple of ``query_block`` (groups stay whole)."""
    return max(query_block, _chunk_size() // query_block * query_block)


def select_blocks_cmp(q, k_cmp, lse_cmp, scale: float, block: int, stride: int,
                      select_block: int, top_k: int, keep_first: int, keep_last: int,
                      causal: bool = True, query_block: int = 1, q_start: int = 0, n_keys: Optional[int] = None):
    """Blocks chosen with ``score = <compress branch>``: ``idx [B, T, H, top_k]`` int32.

    ``s[t, g, j] = sum_{h in g} sum_i w(i, j) * p_cmp[t, h, i]`` with
    ``p_cmp = exp(scale * q.k_cmp - lse_cmp)`` over the compressed blocks ``t`` sees (0 for
    the others) and ``w`` from :func:`overlap_weights`. With ``query_block = Q``, a group of Q
    positions sums its positions' scores and shares one choice (eligibility and forced blocks
    of its last position). No gradient flows through the choice.
    """
    _check_top_k(top_k, keep_first, keep_last)
    Tq, T = q.shape[1], _n_keys(q, q_start, n_keys)
    _check_group_start(q_start, query_block)
    n_sel = num_select_blocks(T, select_block)
    with torch.no_grad():
        q, k_cmp, lse_cmp = q.detach(), k_cmp.detach(), lse_cmp.detach()
        w = overlap_weights(block, stride, select_block, k_cmp.shape[1], n_sel, dtype=q.dtype, device=q.device)
        out = []
        chunk = _select_chunk(query_block)
        for t0 in range(0, Tq, chunk):
            qc = q[:, t0:t0 + chunk]
            t = _positions(q_start + t0, qc.shape[1], q.device)
            scores = _group_rows(_scores_cmp(qc, t, k_cmp, lse_cmp[:, t0:t0 + chunk], scale, block, stride, w,
                                             causal), query_block)
            out.append(_pick_shared(scores, t, T, select_block, top_k, keep_first, keep_last, causal, query_block))
        return torch.cat(out, 1)


def select_blocks_mean_pool(q, k, select_block: int, top_k: int, keep_first: int, keep_last: int,
                            causal: bool = True, query_block: int = 1, q_start: int = 0):
    """Blocks chosen with ``score = mean_pool``: ``idx [B, T, H, top_k]`` int32.

    ``s[t, g, j] = sum_{h in g} q[t, h] . mean(k[block j])`` (unscaled); causal: only blocks
    complete at ``t`` (``(j+1)*l' - 1 <= t``) score, an incomplete one scores ``-inf`` but stays
    eligible. With ``query_block``, summed over the group (complete at its last position).
    """
    _check_top_k(top_k, keep_first, keep_last)
    Tq, T = q.shape[1], k.shape[1]
    _check_group_start(q_start, query_block)
    with torch.no_grad():
        q, k = q.detach(), k.detach()
        k_mean = _block_means(k, select_block)                               # [B, n_sel, H, D]
        out = []
        chunk = _select_chunk(query_block)
        for t0 in range(0, Tq, chunk):
            qc = q[:, t0:t0 + chunk]
            t = _positions(q_start + t0, qc.shape[1], q.device)
            scores = _scores_mean_pool(qc, t, k_mean, select_block, causal, query_block, T)
            out.append(_pick_shared(scores, t, T, select_block, top_k, keep_first, keep_last, causal, query_block))
        return torch.cat(out, 1)


def clean_indices(idx: torch.Tensor, n_blocks: int, select_block: int, causal: bool, t0: int = 0) -> torch.Tensor:
    """Caller-given selections as the branch attends them: entries outside ``0 .. n_blocks - 1``
    or (causal) after the position's own block are dropped, repeated entries count once; the
    rest ascending, ``-1`` padded, int32 (``idx [B, T, H', K]``, rows at positions ``t0 + r``)."""
    t = _positions(t0, idx.shape[1], idx.device)
    idx = idx.long()
    valid = (idx >= 0) & (idx < n_blocks)
    if causal:
        valid &= idx <= (t // select_block)[None, :, None, None]
    s = torch.sort(torch.where(valid, idx, n_blocks), dim=-1).values
    repeat = torch.zeros_like(s, dtype=torch.bool)
    repeat[..., 1:] = s[..., 1:] == s[..., :-1]
    s = torch.sort(torch.where(repeat, n_blocks, s), dim=-1).values
    return torch.where(s == n_blocks, -1, s).to(torch.int32)


def select_attention(q, k, v, idx, select_block: int, scale: float, causal: bool = True, q_start: int = 0):
    """Attention over the keys of the selected blocks (with position ``<= t`` when causal);
    ``(o, lse)``.

    ``idx [B, T, H, K]`` holds block numbers (distinct) or -1; block ``j`` covers keys
    ``[j*l', (j+1)*l')``.  Shared by the G query heads of a kv head; ``idx [B, T, 1, K]`` (a
    token selection: ``select_block = 1``) is shared by every kv head.
    """
    B, _, HQ, Dqk = q.shape
    T, H, Dv = k.shape[1], k.shape[2], v.shape[3]
    idx = idx.expand(-1, -1, H, -1)
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
        t = _positions(q_start + t0, Tc, q.device)
        blocks = idx[:, t0:t0 + Tc].long()                                   # [B, Tc, H, K]
        rows = row_base[:, None, :, None] + blocks.clamp(0, n_sel - 1)       # [B, Tc, H, K]
        k_sel = k_blocks[rows].flatten(3, 4)                                 # [B, Tc, H, K*l', Dqk]
        v_sel = v_blocks[rows].flatten(3, 4)
        pos = blocks[..., None] * select_block + offsets                     # [B, Tc, H, K, l']
        last = t[None, :, None, None, None] if causal else T - 1
        valid = ((blocks >= 0)[..., None] & (pos <= last)).flatten(3, 4)
        logits = torch.einsum("bthgd,bthkd->bthgk", _group(qc, H), k_sel) * scale
        p, lse = _masked_softmax(logits, valid[:, :, :, None, :])
        o = torch.einsum("bthgk,bthke->bthge", p, v_sel)
        return _ungroup(o), _ungroup(lse)

    per_query = B * H * max(K, 1) * select_block * (Dqk + Dv + HQ // H)
    return _over_query_chunks(chunk, q, _chunk_size(per_query), k_blocks, v_blocks)


# ----------------------------------------------------------------------------- indexer (DSA)

def _indexer_scores(qi, t, k_idx, w_idx, causal: bool):
    """``I [B, Tc, 1, T]``: ``sum_j w[t, j] * relu(q_idx[t, j] . k_idx[s])`` for the queries ``qi``
    at positions ``t`` (``-inf`` for keys after ``t`` when causal)."""
    s = torch.einsum("btjd,bsd->btjs", qi, k_idx).relu()
    scores = torch.einsum("btj,btjs->bts", w_idx, s)[:, :, None, :]
    if causal:
        after = torch.arange(k_idx.shape[1], device=qi.device)[None, :] > t[:, None]
        scores = scores.masked_fill(after[None, :, None, :], float("-inf"))
    return scores


def block_scores_indexer(q_idx, k_idx, w_idx, causal: bool = True):
    """The index scores ``I [B, T, 1, T]`` that ``score = <indexer>`` ranks (tests; O(T^2))."""
    with torch.no_grad():
        return _indexer_scores(q_idx, _positions(0, q_idx.shape[1], q_idx.device), k_idx, w_idx, causal)


def select_tokens_indexer(q_idx, k_idx, w_idx, top_k: int, keep_first: int, keep_last: int,
                          causal: bool = True, q_start: int = 0):
    """Tokens chosen with ``score = <indexer>``: ``idx [B, T, 1, top_k]`` int32 positions, one
    selection per position shared by every head. Eligible keys are ``s <= t`` (all when not
    causal); forced are the first ``keep_first`` and the ``keep_last`` ending at ``t``; the rest
    by highest ``I[t, s]``, ties to the lower position."""
    _check_top_k(top_k, keep_first, keep_last)
    Tq, T = q_idx.shape[1], k_idx.shape[1]
    with torch.no_grad():
        q_idx, k_idx, w_idx = q_idx.detach(), k_idx.detach(), w_idx.detach()
        out = []
        chunk = max(1, _chunk_size(T * q_idx.shape[2]) // 4)
        for t0 in range(0, Tq, chunk):
            t = _positions(q_start + t0, min(chunk, Tq - t0), q_idx.device)
            scores = _indexer_scores(q_idx[:, t0:t0 + chunk], t, k_idx, w_idx[:, t0:t0 + chunk], causal)
            out.append(_pick_blocks(scores, t, 1, top_k, keep_first, keep_last, causal))
        return torch.cat(out, 1) if out else torch.zeros(q_idx.shape[0], 0, 1, top_k, dtype=torch.int32,
                                                         device=q_idx.device)


def index_loss(q, k, idx, scale: float, q_idx, k_idx, w_idx, causal: bool = True, q_start: int = 0):
    """``[B, T]`` (in q's dtype; ``aux.index_loss`` holds it in float32): ``KL(p_t || softmax(I[t, S_t]))`` over each position's selected tokens
    ``S_t`` (``idx [B, T, 1, K]``), where ``p_t`` is the selection branch's attention probability
    averaged over the query heads (detached: no gradient to q, k). Its gradient reaches
    ``q_idx``, ``k_idx`` and ``w_idx`` only."""
    B, Tq, HQ, _ = q.shape
    T, H = k.shape[1], k.shape[2]
    out = [q.new_zeros(B, 0)]
    chunk = max(1, _chunk_size(idx.shape[-1] * (q.shape[-1] + q_idx.shape[2] * q_idx.shape[3])) // 4)
    for t0 in range(0, Tq, chunk):
        sel = idx[:, t0:t0 + chunk, 0].long()                                # [B, Tc, K]
        Tc = sel.shape[1]
        t = _positions(q_start + t0, Tc, q.device)
        valid = (sel >= 0) & ((sel <= t[None, :, None]) if causal else (sel < T))
        rows = sel.clamp(0, T - 1)
        bi = torch.arange(B, device=q.device)[:, None, None]
        with torch.no_grad():
            keys = k.detach()[bi, rows]                                      # [B, Tc, K, H, D]
            logits = torch.einsum("bthgd,btkhd->bthgk", _group(q.detach()[:, t0:t0 + Tc], H), keys) * scale
            p, _ = _masked_softmax(logits, valid[:, :, None, None, :])
            p = p.flatten(2, 3).mean(2)                                      # [B, Tc, K] over HQ heads
        ki = k_idx[bi, rows]                                                 # [B, Tc, K, DI]
        s = torch.einsum("btjd,btkd->btjk", q_idx[:, t0:t0 + Tc], ki).relu()
        scores = torch.einsum("btj,btjk->btk", w_idx[:, t0:t0 + Tc], s)
        log_q = torch.log_softmax(scores.masked_fill(~valid, float("-inf")), -1)
        log_p = torch.log(torch.where(p > 0, p, 1.0))
        kl = torch.where(valid & (p > 0), p * (log_p - torch.where(valid, log_q, 0.0)), 0.0).sum(-1)
        out.append(kl)
    return torch.cat(out, 1)


# ----------------------------------------------------------------------------- window

def window_attention(q, k, v, size: int, sinks: int, scale: float, causal: bool = True, q_start: int = 0):
    """Attention over keys ``[max(0, t - size + 1), t]`` (not causal: ``.. min(T - 1, t + size - 1)``,
    both sides) plus the sinks ``[0, sinks)`` (that are ``<= t`` when causal); a key in both
    counts once; returns ``(o, lse)``.
    """
    H, T = k.shape[2], k.shape[1]

    def chunk(qc, t0, k, v):
        Tc = qc.shape[1]
        p0 = q_start + t0                    # the chunk's first position
        t = _positions(p0, Tc, q.device)
        lo = max(0, p0 - size + 1)           # first window key of any query in the chunk
        hi = p0 + Tc if causal else min(T, p0 + Tc + size - 1)
        n_sink = min(sinks, lo)              # sink keys that lie before the band
        pos = torch.cat([torch.arange(n_sink, device=q.device), torch.arange(lo, hi, device=q.device)])
        keys = torch.cat([k[:, :n_sink], k[:, lo:hi]], 1)
        vals = torch.cat([v[:, :n_sink], v[:, lo:hi]], 1)
        p_, t_ = pos[None, :], t[:, None]
        band = (p_ >= t_ - size + 1) & ((p_ <= t_) if causal else (p_ <= t_ + size - 1))
        visible = band | ((p_ < sinks) & (p_ <= t_)) if causal else band | (p_ < sinks)     # [Tc, K]
        logits = torch.einsum("bthgd,bkhd->bthgk", _group(qc, H), keys) * scale
        p, lse = _masked_softmax(logits, visible[None, :, None, None, :])
        o = torch.einsum("bthgk,bkhe->bthge", p, vals)
        return _ungroup(o), _ungroup(lse)

    return _over_query_chunks(chunk, q, _chunk_size(), k, v)


# ----------------------------------------------------------------------------- the whole spec

@dataclass(frozen=True)
class Aux:
    """What ``op(..., return_aux=True)`` and ``reference(..., return_aux=True)`` return beside the
    output, keyed by branch name.

    ``indices``: select branches' ``[B, T, H, top_k]`` int32 blocks (``[B, T, 1, top_k]`` token
    positions for an indexer-scored branch), ascending, -1 padded; ``lse``: ``[B, T, HQ]`` float32
    log-sum-exps (-inf with no keys); ``outputs``: each branch's ``[B, T, HQ, Dv]`` before gating;
    ``index_loss``: indexer-scored select branches' ``[B, T]`` float32 KL (see ``index_loss``).
    """
    indices: dict = field(default_factory=dict)
    lse: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    index_loss: dict = field(default_factory=dict)
    spec: Optional[Spec] = field(default=None, repr=False, compare=False)

    def block_mask(self, branch: str):
        """A FlexAttention ``BlockMask`` with ``BLOCK_SIZE = (query_block, block)`` that reproduces
        select branch ``branch`` (``query_block >= 16``): ``flex_attention(q, k, v, block_mask=...,
        enable_gqa=True)`` over the branch's keys and values ([B, H, T, D] layout) equals its
        output (causal specs: with the causal ``mask_mod``)."""
        from torch.nn.attention.flex_attention import BlockMask
        b = self.spec.branch(branch) if self.spec is not None else None
        if not isinstance(b, Select) or b.query_block < 16 or branch not in self.indices:
            raise SpecError("E628", f"block_mask({branch!r}) needs a select branch with query_block >= 16",
                            hint="FlexAttention's blocks are at least 16 rows; use query_block = 16 .. 128")
        idx = self.indices[branch]                                          # [B, T, H, K]
        B, T, H, K = idx.shape
        HQ = self.outputs[branch].shape[2]
        Q, L = b.query_block, b.block
        n_k = num_select_blocks(T, L)
        rows = idx[:, ::Q].long().permute(0, 2, 1, 3)[..., :n_k]            # [B, H, n_q, <= n_k]: a group's row
        valid = rows >= 0
        kv_num = valid.sum(-1).to(torch.int32)                              # ascending, valid first
        kv_idx = torch.zeros(*rows.shape[:3], n_k, dtype=torch.int32, device=idx.device)
        kv_idx[..., :rows.shape[-1]] = torch.where(valid, rows, 0).to(torch.int32)
        kv_num = kv_num.repeat_interleave(HQ // H, dim=1)
        kv_idx = kv_idx.repeat_interleave(HQ // H, dim=1)

        # the mask_mod repeats the selection itself (a [B, HQ, n_q, n_k] table), so flex_attention
        # computes the branch with or without the block sparsity (eager runs apply mask_mod only)
        table = torch.zeros(*kv_idx.shape[:3], n_k + 1, dtype=torch.bool, device=idx.device)
        listed = torch.arange(n_k, device=idx.device) < kv_num[..., None]        # the valid entries
        table.scatter_(-1, torch.where(listed, kv_idx.long(), n_k), True)        # padding -> column n_k
        table = table[..., :n_k]
        causal = self.spec.causal

        def keep(b_, h, q_idx, kv_idx_):
            ok = table[b_, h, q_idx // Q, kv_idx_ // L] & (kv_idx_ < T)
            return ok & (q_idx >= kv_idx_) if causal else ok

        return BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=(Q, L), mask_mod=keep, seq_lengths=(T, n_k * L))


def reference(spec: Spec, q: torch.Tensor, k: TensorOrDict, v: TensorOrDict,
              gates: Optional[torch.Tensor] = None, *,
              compressed: Optional[Mapping[str, tuple]] = None,
              scale: Optional[float] = None, return_aux: bool = False,
              indices: Optional[Mapping[str, torch.Tensor]] = None,
              index: Optional[Mapping[str, tuple]] = None,
              cu_seqlens: Optional[torch.Tensor] = None, q_start: Optional[int] = None):
    """The semantics of ``spec`` on ``q [B, T, HQ, Dqk]``; returns ``o [B, T, HQ, Dv]`` (q.dtype).

    ``k``/``v``: tensors shared by every branch, or dicts branch name -> tensor.
    ``gates [B, T, HQ, C]``: gate logits for ``output = gate(act, ...)``, in the output's branch
    order; the spec's activation is applied here (``o = sum_c act(gates[..., c]) * o_c``). None
    for ``sum`` and single-branch outputs.
    ``compressed``: name -> ``(k_cmp, v_cmp)``, required for ``pool = linear | mlp``; for
    ``pool = mean`` it replaces the pooling. ``indices``: select branch -> caller-given selection
    (``[B, T, H, top_k]``, ``[B, T, 1, top_k]`` for an indexer-scored branch): entries out of
    range or (causal) after the position's block are ignored, repeats count once, no scoring
    runs. ``index``: indexer branch -> ``(q_idx [B, T, HI, DI], k_idx [B, T, DI], w_idx [B, T, HI])``.
    ``return_aux=True`` returns ``(o, Aux)``.
    ``cu_seqlens [N + 1]``: packed variable-length sequences (``B = 1``; see ``nsa_dsl.semantics.varlen``):
    each sequence is computed alone and the results are concatenated, which is the definition.
    ``q_start``: q's rows are the positions ``q_start ..`` of a sequence whose keys ``k``, ``v``
    hold (decoding a chunk, a context-parallel shard); ``gates``, ``indices`` and the indexer's
    ``q_idx``, ``w_idx`` have q's rows, ``k_idx`` the keys'.
    """
    if not isinstance(spec, Spec):
        raise SpecError("E600", f"reference() needs an nsa_dsl Spec, got {type(spec).__name__}")
    check_spec(spec)                                 # a Spec built by hand gets the parser's checks
    if cu_seqlens is not None:
        return _reference_packed(spec, q, k, v, gates, compressed=compressed, scale=scale,
                                 return_aux=return_aux, indices=indices, index=index, cu_seqlens=cu_seqlens)
    call = check_call(spec, q, k, v, gates, compressed=compressed, indices=indices, index=index, q_start=q_start)
    scale = check_scale(scale, call.Dqk)
    B, T, HQ = call.B, call.T, call.HQ
    causal, at = spec.causal, dict(q_start=call.q_start)
    outputs, lses, chosen, losses, pooled = {}, {}, {}, {}, {}
    for b in needed_branches(spec):
        if isinstance(b, Indexer):
            continue                                 # its inputs score the select branch below
        if T == 0:                                   # nothing to attend: empty results
            outputs[b.name] = q.new_zeros(B, 0, HQ, call.Dv)
            lses[b.name] = q.new_zeros(B, 0, HQ)
            if isinstance(b, Select):
                chosen[b.name] = torch.zeros(B, 0, 1 if spec.score_kind(b) == "indexer" else call.H, b.top_k,
                                             dtype=torch.int32, device=q.device)
            continue
        if isinstance(b, Compress):
            if b.name in call.compressed:
                k_cmp, v_cmp = call.compressed[b.name]
            else:
                k_cmp = mean_pool(call.k[b.name], b.block, b.stride)
                v_cmp = mean_pool(call.v[b.name], b.block, b.stride)
            pooled[b.name] = (k_cmp, v_cmp)
            o, lse = compress_attention(q, k_cmp, v_cmp, b.block, b.stride, scale, causal, **at)
        elif isinstance(b, Select):
            idx = _selection(spec, b, call, q, pooled, lses, scale)
            chosen[b.name] = idx
            o, lse = select_attention(q, call.k[b.name], call.v[b.name], idx, b.block, scale, causal, **at)
            if spec.score_kind(b) == "indexer" and return_aux:
                losses[b.name] = index_loss(q, call.k[b.name], idx, scale, *call.index[b.score], causal, **at).float()
        else:
            o, lse = window_attention(q, call.k[b.name], call.v[b.name], b.size, b.sinks, scale, causal, **at)
        outputs[b.name], lses[b.name] = o, lse

    out_names = spec.output.branches
    if spec.output.kind == "gate":
        act = gate_activation(spec.output.activation)
        o = sum(act(gates[..., c, None]) * outputs[name] for c, name in enumerate(out_names))
    else:
        o = sum(outputs[name] for name in out_names)
    o = o.to(q.dtype)
    if return_aux:
        return o, Aux(indices=chosen, lse=lses, outputs=outputs, index_loss=losses, spec=spec)
    return o


def _selection(spec: Spec, b: Select, call, q, pooled: dict, lses: dict, scale: float) -> torch.Tensor:
    """The blocks (or tokens) select branch ``b`` attends: the caller's, cleaned, or its score's."""
    Tk, causal, at = call.Tk, spec.causal, dict(q_start=call.q_start)
    if b.name in call.indices:
        n = Tk if spec.score_kind(b) == "indexer" else num_select_blocks(Tk, b.block)
        return clean_indices(call.indices[b.name], n, b.block, causal, t0=call.q_start)
    if b.score == "mean_pool":
        return select_blocks_mean_pool(q, call.k[b.name], b.block, b.top_k, b.keep_first, b.keep_last,
                                       causal, b.query_block, **at)
    source = spec.branch(b.score)
    if isinstance(source, Indexer):
        return select_tokens_indexer(*call.index[source.name], b.top_k, b.keep_first, b.keep_last, causal, **at)
    return select_blocks_cmp(q, pooled[source.name][0], lses[source.name], scale, source.block, source.stride,
                             b.block, b.top_k, b.keep_first, b.keep_last, causal, b.query_block, n_keys=Tk, **at)


def _reference_packed(spec: Spec, q, k, v, gates, *, compressed, scale, return_aux, indices, index,
                      cu_seqlens):
    """``reference`` on packed sequences: run each sequence alone, concatenate along T.

    Rows ``[cu[s], cu[s + 1])`` of ``q``, ``k``, ``v``, ``gates``, ``indices`` and ``index`` belong
    to sequence ``s``; compressed keys / values are packed per sequence (``nsa_dsl.semantics.varlen``).
    Empty sequences contribute nothing. Aux tensors are concatenated the same way.
    """
    from nsa_dsl.semantics.varlen import check_cu_seqlens, compressed_cu_seqlens
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise SpecError("E601", f"q must be a 4-D tensor [1, T, HQ, Dqk], got {_shape(q)}")
    cu = check_cu_seqlens(cu_seqlens, q)
    call = check_call(spec, q, k, v, gates, compressed=compressed, indices=indices, index=index, cu=cu)
    offsets = {n: compressed_cu_seqlens(cu, spec.branch(n).block, spec.branch(n).stride) for n in call.compressed}

    def rows(x, a, b):
        if isinstance(x, Mapping):
            return {n: rows(t, a, b) for n, t in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(rows(t, a, b) for t in x)
        return x[:, a:b] if isinstance(x, torch.Tensor) else x

    outs, auxes = [], []
    for s in range(len(cu) - 1):
        a, b = cu[s], cu[s + 1]
        if a == b:
            continue
        comp = {n: (kv[0][:, offsets[n][s]:offsets[n][s + 1]], kv[1][:, offsets[n][s]:offsets[n][s + 1]])
                for n, kv in call.compressed.items()}
        r = reference(spec, q[:, a:b], rows(k, a, b), rows(v, a, b), rows(gates, a, b), compressed=comp,
                      scale=scale, return_aux=return_aux, indices=rows(call.indices, a, b),
                      index=rows(call.index, a, b))
        outs.append(r[0] if return_aux else r)
        if return_aux:
            auxes.append(r[1])
    if not outs:                                      # every sequence empty: T = 0
        return reference(spec, q, k, v, gates, compressed=compressed, scale=scale, return_aux=return_aux,
                         indices=indices, index=index)
    o = torch.cat(outs, 1)
    if not return_aux:
        return o
    cat = lambda field: {n: torch.cat([getattr(x, field)[n] for x in auxes], 1) for n in getattr(auxes[0], field)}
    return o, Aux(indices=cat("indices"), lse=cat("lse"), outputs=cat("outputs"),
                  index_loss=cat("index_loss"), spec=spec)


def _shape(x) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]" if isinstance(x, torch.Tensor) else type(x).__name__
