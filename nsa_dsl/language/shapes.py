"""Symbolic shapes: the index arithmetic of every branch as sympy expressions
(``nsa_dsl.language.symbolic`` holds the toolkit and the printer).

Per-branch content (``branch_shapes``/``spec_shapes``, frozen dataclasses):

* compress(l, d): ``n_blocks(T) = max(0, floor((T - l)/d) + 1)``; block ``i``
  pools keys ``[i*d, i*d + l - 1]``; query ``t`` sees block ``i`` iff
  ``i*d + l - 1 <= t``, so ``visible(t) = n_blocks(t + 1)``.
* select(l', n, keep_first, keep_last): ``n_blocks = ceil(T/l')``,
  ``eligible(t) = floor(t/l') + 1``, ``selected = min(n, eligible)``; keys
  ``<= t`` attended: ``l'*min(n - 1, floor(t/l')) + (t mod l') + 1`` when the
  own (partial) block is selected (always when ``keep_last >= 1`` or
  ``eligible <= n``); ``min(n*l', t + 1)`` when it is not (``score = mean_pool``
  never picks an incomplete block unless forced).  With ``score = <compress>``
  and ``keep_last = 0`` the count depends on the data: ``keys`` is then the
  upper bound ``min(n*l', t + 1)``, ``keys_min`` the lower one and
  ``exact`` is False.  Overlap weights ``w(i, j)`` for ``score = <compress>``.
* window(w, sinks): ``min(t + 1, w) + min(sinks, max(0, t - w + 1))``: the
  window plus the sinks left of it.

Costs (forward, per query head): ``2*Dqk`` per score and ``2*Dv`` per value for
every attended key; a select branch adds its scoring pass (``2*Dqk`` per
compressed key visible to ``t`` for ``score = <compress>``, per complete block
for ``mean_pool``). Bytes: each (query position, kv head) program reads the K
and V rows of the keys it attends (no reuse across positions), plus the K rows
its scoring pass reads. Pooling itself and the gate are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import sympy as sp

from nsa_dsl.language.ir import Branch, Compress, Indexer, Select, Spec, Window
from nsa_dsl.language.symbolic import (Dqk, Dv, Expr, IntLike, T, as_expr, ceildiv, clip0, evaluate, floordiv, i,
                                       j, lambdify_int, simplify, smax, smin, sum_floor, sum_min, sum_mod, t)

# ---------------------------------------------------------------------------
# Per-branch index arithmetic (numbers or symbols for the parameters)
# ---------------------------------------------------------------------------

def compress_n_blocks(n_keys: IntLike, block: IntLike, stride: IntLike) -> Expr:
    """Compressed blocks that fit in ``n_keys`` keys: max(0, floor((n - l)/d) + 1)."""
    return clip0(floordiv(as_expr(n_keys) - block + stride, stride))


def compress_visible(query: IntLike, block: IntLike, stride: IntLike) -> Expr:
    """Compressed blocks query ``t`` sees (``i*d + l - 1 <= t``): n_blocks(t + 1)."""
    return compress_n_blocks(as_expr(query) + 1, block, stride)


def overlap_weight(ci: IntLike, sj: IntLike, block: int, stride: int, select_block: int) -> Expr:
    """w(i, j): stride segments shared by compressed block i (segments i .. i + l/d - 1)
    and selection block j (segments j*l'/d .. (j+1)*l'/d - 1)."""
    a, b = sp.Rational(block, stride), sp.Rational(select_block, stride)
    ci, sj = as_expr(ci), as_expr(sj)
    return clip0(smin(ci + a - 1, (sj + 1) * b - 1) - smax(ci, sj * b) + 1)


def window_keys(query: IntLike, size: IntLike, sinks: IntLike = 0) -> Expr:
    """Keys of window(w, sinks) for query t: min(t + 1, w) + min(sinks, max(0, t - w + 1))."""
    q = as_expr(query)
    return simplify(smin(q + 1, size) + smin(sinks, clip0(q - size + 1)))


def select_keys_exact(query: IntLike, block: IntLike, top_k: IntLike) -> Expr:
    """Keys <= t in min(n, eligible) blocks including t's own partial block:
    l'*min(n - 1, floor(t/l')) + (t mod l') + 1."""
    q = as_expr(query)
    return simplify(block * smin(as_expr(top_k) - 1, floordiv(q, block)) + sp.Mod(q, block) + 1)


def select_keys_max(query: IntLike, block: IntLike, top_k: IntLike) -> Expr:
    """Keys <= t in min(n, eligible) blocks when t's own block is not among them
    unless every eligible block is: min(n*l', t + 1) (also an upper bound always)."""
    return smin(as_expr(top_k) * block, as_expr(query) + 1)


@dataclass(frozen=True, kw_only=True)
class BranchShapes:
    """What every branch has. ``keys(t)``: keys (for compress: compressed keys)
    attended by query ``t``; exact when ``exact``, else an upper bound with
    ``keys_min`` the lower one. ``keys_sum(T)``: sum over ``t`` in ``[0, T)``.
    ``score_keys``: keys the branch's scoring pass reads per query (QK only)."""
    name: str
    kind: str
    keys: Expr
    keys_min: Expr
    exact: bool
    keys_sum: Expr
    keys_min_sum: Expr
    score_keys: Expr = sp.Integer(0)
    score_keys_sum: Expr = sp.Integer(0)
    note: str = ""
    kv_reuse: int = 1       # positions that read each attended key once (query_block tiles)

    @property
    def keys_last(self) -> Expr:
        """keys(T - 1): the last query of a length-T sequence."""
        return simplify(self.keys.subs(t, T - 1))

    @property
    def flops(self) -> Expr:
        """Forward FLOPs per query and query head (symbols Dqk, Dv)."""
        return self.keys * (2 * Dqk + 2 * Dv) + self.score_keys * 2 * Dqk

    @property
    def flops_sum(self) -> Expr:
        """Forward FLOPs per query head, summed over the T queries."""
        return self.keys_sum * (2 * Dqk + 2 * Dv) + self.score_keys_sum * 2 * Dqk

    @property
    def kv_elems_sum(self) -> Expr:
        """K/V elements read per kv head, summed over T queries (see the module doc); a
        ``query_block`` tile reads its blocks once for its ``kv_reuse`` positions."""
        return self.keys_sum * (Dqk + Dv) / self.kv_reuse + self.score_keys_sum * Dqk


@dataclass(frozen=True, kw_only=True)
class CompressShapes(BranchShapes):
    block: int
    stride: int
    n_blocks: Expr          # Nc(T)
    visible: Expr           # blocks visible to query t (== keys)
    first_key: Expr         # first key of block i: i*d
    last_key: Expr          # last key of block i: i*d + l - 1 (== first query that sees i)

    @property
    def visible_cmp(self) -> Expr:
        return self.visible


@dataclass(frozen=True, kw_only=True)
class SelectShapes(BranchShapes):
    block: int
    top_k: int
    keep_first: int
    keep_last: int
    score: str
    n_blocks: Expr          # ceil(T/l')
    own_block: Expr         # floor(t/l')
    eligible: Expr          # floor(t/l') + 1
    selected: Expr          # min(n, eligible)
    complete: Expr          # blocks fully <= t: floor((t + 1)/l') (mean_pool scores these)
    forced: Expr            # forced blocks: min(eligible, keep_first + keep_last)
    forced_first_end: Expr  # blocks j < this are forced (keep_first)
    forced_last_start: Expr  # blocks own_block >= j >= this are forced (keep_last)
    first_key: Expr         # j*l'
    last_key: Expr          # (j + 1)*l' - 1
    keys_computed: Expr     # whole blocks: min(n, eligible)*l'
    score_block: Optional[int] = None   # l, d of the compress branch scoring this one
    score_stride: Optional[int] = None
    weight: Optional[Expr] = None     # w(i, j), score = compress branch with d | l, d | l'
    weight_lo: Optional[Expr] = None  # first i with w(i, j) > 0 (clipped at 0)
    weight_hi: Optional[Expr] = None  # last i with w(i, j) > 0

    def weight_profile(self) -> tuple[int, ...]:
        """w(i, j) for i = lo .. hi at a j far enough from 0 not to be clipped."""
        if self.weight is None:
            return ()
        jj = self.score_block // self.score_stride + 1   # lo(j) = j*l'/d - l/d + 1 >= 1
        lo, hi = evaluate(self.weight_lo, j=jj), evaluate(self.weight_hi, j=jj)
        w = lambdify_int(self.weight, i, j)              # compiled once: hi - lo can be large
        return tuple(w(k, jj) for k in range(lo, hi + 1))


@dataclass(frozen=True, kw_only=True)
class WindowShapes(BranchShapes):
    size: int
    sinks: int
    first_key: Expr         # max(0, t - w + 1)
    sink_keys: Expr         # sinks left of the window: min(sinks, max(0, t - w + 1))


@dataclass(frozen=True, kw_only=True)
class IndexerShapes(BranchShapes):
    """An indexer scores every eligible key for each query (t + 1, or T when not causal) with
    its ``heads`` x ``dim`` weighted relu products, once per query (shared by all heads)."""
    heads: int
    dim: int


@dataclass(frozen=True, kw_only=True)
class DenseShapes(BranchShapes):
    """Dense attention, for comparison: t + 1 keys (T*(T + 1)/2 in all), or T when not causal."""


def _compress_shapes(b: Compress, causal: bool = True) -> CompressShapes:
    l, d = b.block, b.stride
    n_blocks = compress_n_blocks(T, l, d)
    if causal:
        vis = compress_visible(t, l, d)
        N = clip0(T - l + 1)
        total, note = simplify(N + sum_floor(N, d)), "compressed keys"
    else:                                   # every complete block, for every query
        vis, total, note = n_blocks, simplify(T * n_blocks), "compressed keys (all blocks: not causal)"
    return CompressShapes(
        name=b.name, kind="compress", keys=vis, keys_min=vis, exact=True,
        keys_sum=total, keys_min_sum=total, block=l, stride=d,
        n_blocks=n_blocks, visible=vis,
        first_key=simplify(i * d), last_key=simplify(i * d + l - 1), note=note)


def _select_shapes(b: Select, score_branch: Optional[Compress], causal: bool = True,
                   indexer: Optional[Indexer] = None) -> SelectShapes:
    ls, n, kf, kl, Q = b.block, b.top_k, b.keep_first, b.keep_last, b.query_block
    own = floordiv(t, ls)
    n_blocks = ceildiv(T, ls)
    elig = simplify(own + 1) if causal else n_blocks
    upper = select_keys_max(t, ls, n)
    lower = select_keys_exact(t, ls, n)
    upper_sum = simplify(sum_min(T, n * ls))
    qT = floordiv(T, ls)
    # sum over t of l'*min(n - 1, floor(t/l')): q full periods of l' queries, then r more
    lower_sum = simplify(ls * (ls * (sum_min(qT, n) - qT) + (T - ls * qT) * smin(n - 1, qT))
                         + sum_mod(T, ls) + T)
    if not causal:                          # whole blocks; the last one may be partial
        upper = simplify(smin(n * ls, T))
        lower = simplify(smin(upper, (smin(n, n_blocks) - 1) * ls + T - (n_blocks - 1) * ls))
        keys, exact = upper, False
        note = "every block eligible (not causal); the partial last block may be chosen: bounds"
        keys_sum, lower_sum = simplify(T * upper), simplify(T * lower)
    elif Q > 1:
        keys, exact, keys_sum = upper, False, upper_sum
        note = (f"one selection per {Q} positions (query_block): at most min(n*l', t + 1); "
                f"K/V read once per {Q}-row tile")
    elif kl >= 1:
        keys, exact, note = lower, True, f"own block forced (keep_last = {kl})"
        keys_sum = lower_sum
    elif b.score == "mean_pool":
        keys, exact, note = upper, True, "incomplete own block never scored (mean_pool)"
        keys_sum = upper_sum
    elif kf >= n:
        keys, exact, note = upper, True, f"blocks 0..{n - 1} forced (keep_first = {kf})"
        keys_sum = upper_sum
    else:
        keys, exact = upper, False
        note = "data-dependent (keep_last = 0): bounds"
        keys_sum = upper_sum
    if indexer is not None:                 # tokens: exactly min(n, eligible) keys
        keys = simplify(smin(n, t + 1)) if causal else simplify(smin(n, T))
        exact, keys_sum = True, simplify(sum_min(T, n)) if causal else simplify(T * smin(n, T))
        lower, lower_sum = keys, keys_sum
        note = f"{n} tokens chosen by indexer {indexer.name} (its scoring: its own row)"
    complete = floordiv(t + 1, ls) if causal else n_blocks
    weight = wlo = whi = sl = sd = None
    if indexer is not None:
        score_keys, score_sum = sp.Integer(0), sp.Integer(0)
    elif score_branch is not None:
        sl, sd = score_branch.block, score_branch.stride
        l, d = score_branch.block, score_branch.stride
        if causal:
            score_keys = compress_visible(t, l, d)
            N = clip0(T - l + 1)
            score_sum = simplify(N + sum_floor(N, d))
        else:
            score_keys = compress_n_blocks(T, l, d)
            score_sum = simplify(T * score_keys)
        if l % d == 0 and ls % d == 0:
            a, bb = l // d, ls // d
            weight = overlap_weight(i, j, l, d, ls)
            wlo = clip0(j * bb - a + 1)
            whi = simplify((j + 1) * bb - 1)
    else:
        score_keys = complete
        score_sum = simplify(sum_floor(T + 1, ls)) if causal else simplify(T * n_blocks)
    return SelectShapes(
        name=b.name, kind="select", keys=keys, keys_min=lower if not exact else keys,
        exact=exact, keys_sum=keys_sum, keys_min_sum=lower_sum if not exact else keys_sum,
        score_keys=score_keys, score_keys_sum=score_sum, note=note, kv_reuse=Q,
        block=ls, top_k=n, keep_first=kf, keep_last=kl, score=b.score,
        n_blocks=n_blocks, own_block=own, eligible=elig, selected=smin(n, elig),
        complete=complete, forced=smin(elig, kf + kl), forced_first_end=smin(kf, elig),
        forced_last_start=clip0(own - kl + 1), first_key=simplify(j * ls),
        last_key=simplify((j + 1) * ls - 1), keys_computed=simplify(smin(n, elig) * ls),
        score_block=sl, score_stride=sd, weight=weight, weight_lo=wlo, weight_hi=whi)


def _indexer_shapes(b: Indexer, causal: bool = True) -> IndexerShapes:
    keys = t + 1 if causal else T
    total = T * (T + 1) / 2 if causal else T * T
    return IndexerShapes(name=b.name, kind="indexer", keys=keys, keys_min=keys, exact=True,
                         keys_sum=total, keys_min_sum=total, heads=b.heads, dim=b.dim,
                         note=f"scores every eligible key: {b.heads} heads x {b.dim} dims, once per query")


def _window_shapes(b: Window, causal: bool = True) -> WindowShapes:
    w, s_ = b.size, b.sinks
    keys = window_keys(t, w, s_)
    total = simplify(sum_min(T, w) + sum_min(clip0(T - w), s_))
    note = ""
    if not causal:                          # the other side too: min(T - 1 - t, w - 1) more keys
        keys = simplify(keys + smin(T - 1 - t, w - 1))
        total = simplify(total + sum_min(T, w) - T)
        note = "both sides (not causal)"
    return WindowShapes(
        name=b.name, kind="window", keys=keys, keys_min=keys, exact=True,
        keys_sum=total, keys_min_sum=total, size=w, sinks=s_, note=note,
        first_key=clip0(t - w + 1), sink_keys=smin(s_, clip0(t - w + 1)))


def _dense_shapes(causal: bool = True) -> DenseShapes:
    if not causal:
        return DenseShapes(name="dense", kind="dense", keys=T, keys_min=T, exact=True,
                           keys_sum=T * T, keys_min_sum=T * T, note="dense attention (not causal)")
    total = T * (T + 1) / 2
    return DenseShapes(name="dense", kind="dense", keys=t + 1, keys_min=t + 1, exact=True,
                       keys_sum=total, keys_min_sum=total, note="dense causal attention")


def branch_shapes(branch: Branch, spec: Optional[Spec] = None) -> BranchShapes:
    """The shapes of one branch (of ``spec``: its causality and a select branch's score source;
    without it, causal and scored by mean_pool)."""
    causal = spec.causal if spec is not None else True
    if isinstance(branch, Compress):
        return _compress_shapes(branch, causal)
    if isinstance(branch, Select):
        source = None
        if branch.score != "mean_pool" and spec is not None and branch.score in spec.branch_names:
            source = spec.branch(branch.score)
        return _select_shapes(branch, source if isinstance(source, Compress) else None, causal,
                              source if isinstance(source, Indexer) else None)
    if isinstance(branch, Window):
        return _window_shapes(branch, causal)
    if isinstance(branch, Indexer):
        return _indexer_shapes(branch, causal)
    raise TypeError(f"unknown branch {branch!r}")


@dataclass(frozen=True)
class SpecShapes:
    """The shapes of every branch of a spec, in spec order, and dense causal attention."""
    name: str
    branches: tuple[BranchShapes, ...]
    dense: DenseShapes = field(default_factory=_dense_shapes)
    causal: bool = True

    def branch(self, name: str) -> BranchShapes:
        for b in self.branches:
            if b.name == name:
                return b
        raise KeyError(name)

    @property
    def keys(self) -> Expr:
        """Keys attended per query, all branches (a branch's keys count once per branch)."""
        return sp.Add(*[b.keys for b in self.branches if b.kind != "indexer"])

    @property
    def keys_sum(self) -> Expr:
        return sp.Add(*[b.keys_sum for b in self.branches if b.kind != "indexer"])


_SPEC_CACHE: dict = {}


def spec_shapes(spec: Spec) -> SpecShapes:
    """Shapes of every branch of ``spec`` (cached per canonical spec)."""
    key = spec.canonical()
    hit = _SPEC_CACHE.get(key)
    if hit is None:
        hit = SpecShapes(spec.name, tuple(branch_shapes(b, spec) for b in spec.branches),
                         _dense_shapes(spec.causal), spec.causal)
        if len(_SPEC_CACHE) > 256:
            _SPEC_CACHE.clear()
        _SPEC_CACHE[key] = hit
    return hit
