"""A brute-force implementation of docs/SEMANTICS.md, used only by tests.

Written independently of ``nsa_dsl.reference`` and as plainly as possible: Python loops over
batch, position and head, an explicit list of key positions per query, a softmax over that
list, and a top-k by sorting ``(-score, index)``.  Slow; meant for T <= ~100.
"""
from __future__ import annotations

import math

import torch

from nsa_dsl.language.ir import Compress, Select, Spec, Window

NEG_INF = float("-inf")


def attend(qv, keys, values, scale):
    """One query over an explicit list of keys: ``(o [Dv], lse)``; no keys: zeros and -inf."""
    if keys.shape[0] == 0:
        return values.sum(0) * 0.0, qv.new_tensor(NEG_INF)
    logits = (keys @ qv) * scale
    lse = torch.logsumexp(logits, 0)
    return torch.exp(logits - lse) @ values, lse


def run_per_query(q, k, v, keys_of, scale):
    """``keys_of(b, t, h) -> sorted list of key rows of k/v[b, :, h // G]``; returns (o, lse)."""
    B, T, HQ, _ = q.shape
    H = k.shape[2]
    G = HQ // H
    outs, lses = [], []
    for b in range(B):
        for t in range(T):
            for h in range(HQ):
                rows = torch.tensor(keys_of(b, t, h), dtype=torch.long)
                o, lse = attend(q[b, t, h], k[b, rows, h // G], v[b, rows, h // G], scale)
                outs.append(o)
                lses.append(lse)
    o = torch.stack(outs).reshape(B, T, HQ, v.shape[-1])
    lse = torch.stack(lses).reshape(B, T, HQ)
    return o, lse


# ----------------------------------------------------------------------------- branches

def mean_pool(k, block, stride):
    T = k.shape[1]
    n = (T - block) // stride + 1 if T >= block else 0
    if n == 0:
        return k[:, :0]
    return torch.stack([k[:, i * stride:i * stride + block].mean(1) for i in range(n)], 1)


def compress(q, k_cmp, v_cmp, block, stride, scale, causal=True):
    def keys_of(b, t, h):
        return [i for i in range(k_cmp.shape[1]) if i * stride + block - 1 <= t or not causal]
    return run_per_query(q, k_cmp, v_cmp, keys_of, scale)


def window(q, k, v, size, sinks, scale, causal=True):
    T = q.shape[1]

    def keys_of(b, t, h):
        last = t if causal else min(T - 1, t + size - 1)
        band = set(range(max(0, t - size + 1), last + 1))
        sink = set(range(0, min(sinks, t + 1 if causal else T)))
        return sorted(band | sink)
    return run_per_query(q, k, v, keys_of, scale)


def select(q, k, v, idx, select_block, scale, causal=True):
    T = q.shape[1]
    H = k.shape[2]
    G = q.shape[2] // H

    def keys_of(b, t, h):
        keys = set()
        for j in idx[b, t, 0 if idx.shape[2] == 1 else h // G].tolist():
            if j >= 0:
                keys |= {p for p in range(j * select_block, (j + 1) * select_block)
                         if (p <= t or not causal) and p < T}
        return sorted(keys)
    return run_per_query(q, k, v, keys_of, scale)


def overlap(i, j, block, stride, select_block):
    """Segments shared by compressed block i and selection block j, by counting a set."""
    cmp_segments = set(range(i, i + block // stride))
    sel_segments = set(range(j * select_block // stride, (j + 1) * select_block // stride))
    return len(cmp_segments & sel_segments)


def choose(score, t, n_sel, select_block, top_k, keep_first, keep_last, causal=True):
    """Blocks (tokens with select_block = 1) for position t: a sorted list padded with -1."""
    eligible = [j for j in range(n_sel) if j * select_block <= t or not causal]
    if len(eligible) <= top_k:
        chosen = list(eligible)
    else:
        own = t // select_block
        forced = [j for j in eligible if j < keep_first or own - keep_last < j <= own]
        rest = sorted((j for j in eligible if j not in forced), key=lambda j: (-score(j), j))
        chosen = forced + rest[:top_k - len(forced)]
    chosen = sorted(chosen)
    return chosen + [-1] * (top_k - len(chosen))


def groups(T, query_block):
    """[(positions of the group, its last position)] for groups of query_block positions."""
    return [(list(range(u, min(u + query_block, T))), min(u + query_block, T) - 1) for u in range(0, T, query_block)]


def select_blocks_cmp(q, k_cmp, lse_cmp, scale, block, stride, select_block, top_k,
                      keep_first, keep_last, causal=True, query_block=1):
    B, T, HQ, _ = q.shape
    H, Nc = k_cmp.shape[2], k_cmp.shape[1]
    G = HQ // H
    n_sel = math.ceil(T / select_block)
    out = torch.full((B, T, H, top_k), -1, dtype=torch.int32)
    with torch.no_grad():
        for b in range(B):
            for members, last in groups(T, query_block):
                for g in range(H):
                    # p[t, h, i]: compression probabilities of the group's positions and heads
                    p = {}
                    for t in members:
                        visible = [i for i in range(Nc) if i * stride + block - 1 <= t or not causal]
                        for h in range(g * G, (g + 1) * G):
                            lse = float(lse_cmp[b, t, h])
                            for i in visible:
                                p[t, h, i] = math.exp(float(q[b, t, h] @ k_cmp[b, i, g]) * scale - lse)

                    def score(j):
                        return sum(overlap(i, j, block, stride, select_block) * pv for (t, h, i), pv in p.items())
                    row = torch.tensor(choose(score, last, n_sel, select_block, top_k, keep_first, keep_last, causal))
                    for t in members:
                        out[b, t, g] = row
    return out


def select_blocks_mean_pool(q, k, select_block, top_k, keep_first, keep_last, causal=True, query_block=1):
    B, T, HQ, _ = q.shape
    H = k.shape[2]
    G = HQ // H
    n_sel = math.ceil(T / select_block)
    out = torch.full((B, T, H, top_k), -1, dtype=torch.int32)
    with torch.no_grad():
        for b in range(B):
            for members, last in groups(T, query_block):
                for g in range(H):
                    def score(j):
                        if causal and (j + 1) * select_block - 1 > last:
                            return NEG_INF
                        mean = k[b, j * select_block:(j + 1) * select_block, g].mean(0)
                        return sum(float(q[b, t, h] @ mean) for t in members for h in range(g * G, (g + 1) * G))
                    row = torch.tensor(choose(score, last, n_sel, select_block, top_k, keep_first, keep_last, causal))
                    for t in members:
                        out[b, t, g] = row
    return out


def index_score(q_idx, k_idx, w_idx, b, t, s):
    """I[t, s] = sum_j w[t, j] * relu(q_idx[t, j] . k_idx[s])."""
    return sum(float(w_idx[b, t, j]) * max(0.0, float(q_idx[b, t, j] @ k_idx[b, s])) for j in range(q_idx.shape[2]))


def select_tokens_indexer(q_idx, k_idx, w_idx, top_k, keep_first, keep_last, causal=True):
    B, T = q_idx.shape[:2]
    out = torch.full((B, T, 1, top_k), -1, dtype=torch.int32)
    with torch.no_grad():
        for b in range(B):
            for t in range(T):
                out[b, t, 0] = torch.tensor(choose(lambda s: index_score(q_idx, k_idx, w_idx, b, t, s), t, T, 1,
                                                   top_k, keep_first, keep_last, causal))
    return out


def index_loss(q, k, idx, scale, q_idx, k_idx, w_idx, causal=True):
    """[B, T]: KL(p_t || softmax over S_t of I[t, s]), p_t the heads' mean attention over S_t."""
    B, T, HQ, _ = q.shape
    G = HQ // k.shape[2]
    rows = []
    for b in range(B):
        for t in range(T):
            S = [s for s in idx[b, t, 0].tolist() if s >= 0 and (s <= t or not causal)]
            if not S:
                rows.append(q_idx.new_zeros(()).float())
                continue
            with torch.no_grad():
                p = sum(torch.softmax(torch.stack([q[b, t, h] @ k[b, s, h // G] for s in S]) * scale, 0)
                        for h in range(HQ)) / HQ
            scores = torch.stack([sum(w_idx[b, t, j] * torch.relu(q_idx[b, t, j] @ k_idx[b, s])
                                      for j in range(q_idx.shape[2])) for s in S])
            log_q = torch.log_softmax(scores, 0)
            rows.append((p * (torch.log(p) - log_q)).sum().float())
    return torch.stack(rows).reshape(B, T)


# ----------------------------------------------------------------------------- the whole spec

def brute_reference(spec: Spec, q, k, v, gates=None, *, compressed=None, scale=None,
                    indices=None, index=None, losses=None):
    """Returns ``(o, indices, lse, outputs)`` (dicts by branch name); ``indices``: caller-given
    selections (attended as they are: keys out of range or, causal, after t are skipped);
    ``index``: indexer inputs by branch; ``losses``: a dict to fill with index losses."""
    compressed = compressed or {}
    given = indices or {}
    causal = spec.causal
    if scale is None:
        scale = q.shape[-1] ** -0.5

    def kv(name):
        kb = k[name] if isinstance(k, dict) else k
        vb = v[name] if isinstance(v, dict) else v
        return kb, vb

    needed = set(spec.output.branches)
    for name in spec.output.branches:
        b = spec.branch(name)
        if isinstance(b, Select) and b.score != "mean_pool":
            needed.add(b.score)

    outputs, lses, indices, pooled = {}, {}, {}, {}
    # compress branches first: select branches may score with them
    order = [b for b in spec.branches if isinstance(b, Compress)] + \
            [b for b in spec.branches if not isinstance(b, Compress)]
    for b in order:
        if b.name not in needed or b.kind == "indexer":
            continue
        if isinstance(b, Compress):
            if b.name in compressed:
                k_cmp, v_cmp = compressed[b.name]
            else:
                kb, vb = kv(b.name)
                k_cmp, v_cmp = mean_pool(kb, b.block, b.stride), mean_pool(vb, b.block, b.stride)
            pooled[b.name] = (k_cmp, v_cmp)
            o, lse = compress(q, k_cmp, v_cmp, b.block, b.stride, scale, causal)
        elif isinstance(b, Select):
            kb, vb = kv(b.name)
            source = None if b.score == "mean_pool" else spec.branch(b.score)
            if b.name in given:
                idx = given[b.name]
            elif source is None:
                idx = select_blocks_mean_pool(q, kb, b.block, b.top_k, b.keep_first, b.keep_last, causal,
                                              b.query_block)
            elif source.kind == "indexer":
                idx = select_tokens_indexer(*index[source.name], b.top_k, b.keep_first, b.keep_last, causal)
            else:
                idx = select_blocks_cmp(q, pooled[source.name][0], lses[source.name], scale, source.block,
                                        source.stride, b.block, b.top_k, b.keep_first, b.keep_last, causal,
                                        b.query_block)
            indices[b.name] = idx
            o, lse = select(q, kb, vb, idx, b.block, scale, causal)
            if source is not None and source.kind == "indexer" and losses is not None:
                losses[b.name] = index_loss(q, kb, idx, scale, *index[source.name], causal)
        elif isinstance(b, Window):
            kb, vb = kv(b.name)
            o, lse = window(q, kb, vb, b.size, b.sinks, scale, causal)
        outputs[b.name], lses[b.name] = o, lse

    names = spec.output.branches
    if spec.output.kind == "gate":
        o = sum(torch.sigmoid(gates[..., c:c + 1]) * outputs[n] for c, n in enumerate(names))
    else:
        o = sum(outputs[n] for n in names)
    return o, indices, lses, outputs
