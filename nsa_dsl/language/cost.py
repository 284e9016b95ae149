"""What a spec costs at a length: FLOPs and K/V bytes per branch against dense attention
(``nsa-dsl explain``, ``nsa-dsl bench``), from the per-query key counts of
``nsa_dsl.language.shapes``. Forward, per query head: ``2*Dqk`` per score and ``2*Dv`` per value
for every attended key; a select branch adds its scoring pass. Bytes: each (query position, kv
head) program reads the K and V rows of the keys it attends, plus the K rows its scoring reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from nsa_dsl.language.ir import Spec
from nsa_dsl.language.shapes import BranchShapes, SpecShapes
from nsa_dsl.language.symbolic import Dqk, Dv, Expr, IntLike, evaluate, lambdify_int, simplify, t

# ---------------------------------------------------------------------------
# Costs at a length
# ---------------------------------------------------------------------------

DEFAULT_HEADS, DEFAULT_KV_HEADS, DEFAULT_HEAD_DIM, DEFAULT_DTYPE_BYTES = 64, 4, 128, 2


@dataclass(frozen=True)
class Dims:
    """Head counts and dims to cost a spec with; ``defaulted`` names the fields
    the spec did not declare (filled from the defaults: 64 heads, 4 kv heads, 128)."""
    heads: int
    kv_heads: int
    qk_dim: int
    v_dim: int
    dtype_bytes: int = DEFAULT_DTYPE_BYTES
    defaulted: tuple[str, ...] = ()

    @staticmethod
    def of(spec: Optional[Spec] = None, heads=None, kv_heads=None, qk_dim=None, v_dim=None,
           dtype_bytes: int = DEFAULT_DTYPE_BYTES) -> "Dims":
        """Explicit arguments win, then the spec's declared fields, then defaults."""
        defaulted = []

        def pick(name, given, default):
            if given is not None:
                return int(given)
            declared = getattr(spec, name, None) if spec is not None else None
            if declared is not None:
                return int(declared)
            defaulted.append(name)
            return default

        h = pick("heads", heads, DEFAULT_HEADS)
        kv_default = DEFAULT_KV_HEADS if h % DEFAULT_KV_HEADS == 0 else 1
        kv = pick("kv_heads", kv_heads, kv_default)
        dq = pick("qk_dim", qk_dim, DEFAULT_HEAD_DIM)
        dv = pick("v_dim", v_dim, DEFAULT_HEAD_DIM)
        return Dims(h, kv, dq, dv, dtype_bytes, tuple(defaulted))


@dataclass(frozen=True)
class CostRow:
    """One pass at one length: ``keys_sum`` over all queries, ``keys_last`` at t = T-1,
    forward ``flops`` over all query heads, ``bytes`` of K/V read over all kv heads."""
    name: str
    kind: str
    T: int
    keys_sum: int
    keys_last: int
    flops: int
    bytes: int

    @property
    def keys_avg(self) -> float:
        return self.keys_sum / self.T if self.T else 0.0


@dataclass(frozen=True)
class Cost:
    T: int
    dims: Dims
    rows: tuple[CostRow, ...]   # per branch, a select's scoring pass as its own row
    total: CostRow
    dense: CostRow

    @property
    def flop_ratio(self) -> float:
        """dense FLOPs / sparse FLOPs (how many times fewer)."""
        return self.dense.flops / self.total.flops if self.total.flops else math.inf

    @property
    def bytes_ratio(self) -> float:
        return self.dense.bytes / self.total.bytes if self.total.bytes else math.inf

    def row(self, name: str) -> CostRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)


def flops_per_query(shapes: BranchShapes, qk_dim: int, v_dim: int) -> Expr:
    """Forward FLOPs for query t and one query head, an expression in t."""
    return simplify(shapes.flops.subs({Dqk: qk_dim, Dv: v_dim}))


def _row(name, kind, n, keys_sum, keys_last, per_key_flops, per_key_elems, dims, *,
         per_head: bool = True, reuse: int = 1) -> CostRow:
    """A pass: FLOPs per key per query head (``per_head``; else per query: an indexer), K/V
    elements per key per kv head, read once per ``reuse`` positions (query_block tiles)."""
    return CostRow(name, kind, n, keys_sum, keys_last,
                   flops=keys_sum * per_key_flops * (dims.heads if per_head else 1),
                   bytes=keys_sum * per_key_elems * (dims.kv_heads if per_head else 1) * dims.dtype_bytes // reuse)


def cost(shapes: SpecShapes, T_value: int, dims: Dims) -> Cost:
    """Keys, forward FLOPs and K/V bytes of every branch (and dense causal attention)
    at sequence length ``T_value``, exactly (closed forms; fast for any T)."""
    n = int(T_value)
    dq, dv = dims.qk_dim, dims.v_dim
    last = max(n - 1, 0)
    rows = []
    for b in shapes.branches:
        keys_last = evaluate(b.keys, t=last, T=n) if n else 0
        if b.kind == "indexer":             # scoring only: heads x dim products per key, once per query
            rows.append(_row(b.name, "score", n, evaluate(b.keys_sum, T=n), keys_last,
                             2 * b.heads * b.dim + 2 * b.heads, b.dim, dims, per_head=False))
            continue
        if b.score_keys_sum != 0:
            rows.append(_row(f"{b.name} score", "score", n, evaluate(b.score_keys_sum, T=n),
                             evaluate(b.score_keys, t=last, T=n) if n else 0, 2 * dq, dq, dims))
        rows.append(_row(b.name, b.kind, n, evaluate(b.keys_sum, T=n), keys_last,
                         2 * dq + 2 * dv, dq + dv, dims, reuse=b.kv_reuse))
    d = shapes.dense
    dense = _row("dense", "dense", n, evaluate(d.keys_sum, T=n), n, 2 * dq + 2 * dv, dq + dv, dims)
    total = CostRow("total", "total", n,
                    sum(r.keys_sum for r in rows if r.kind != "score"),
                    sum(r.keys_last for r in rows if r.kind != "score"),
                    sum(r.flops for r in rows), sum(r.bytes for r in rows))
    return Cost(n, dims, tuple(rows), total, dense)


def sum_over_queries(expr: IntLike, T_value: int) -> int:
    """sum of ``expr`` (in ``t``) over t in [0, T) by direct evaluation: the fallback
    for expressions without a closed form (exact; ~1 s per million queries)."""
    f = lambdify_int(expr, t)
    return sum(f(k) for k in range(int(T_value)))
