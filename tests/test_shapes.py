"""nsa_dsl.language.shapes: every expression against brute-force counting, the printer by round trips."""
from __future__ import annotations

import ast
import random

import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsa_dsl.language import cost, symbolic
from nsa_dsl.language import shapes as S
from nsa_dsl.language.ir import Compress, Output, Select, Span, Spec, Window

SPAN = Span.unknown()
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def cmp_(l=32, d=16, name="cmp"):
    return Compress(name, l, d, "mean", SPAN)


def slc_(ls=64, n=16, score="cmp", kf=1, kl=2, name="slc"):
    return Select(name, ls, n, score, kf, kl, SPAN)


def swa_(w=512, sinks=0, name="swa"):
    return Window(name, w, sinks, SPAN)


def spec_(*branches, heads=None, kv_heads=None, qk_dim=None, v_dim=None, name="s"):
    out = Output("sum", tuple(b.name for b in branches), None, SPAN)
    return Spec(name, heads, kv_heads, qk_dim, v_dim, True, tuple(branches), out, SPAN)


# ---------------------------------------------------------------- brute force

def bf_n_blocks(n_keys, l, d):
    return sum(1 for k in range(n_keys + 1) if k * d + l <= n_keys)


def bf_visible(q, l, d):
    return sum(1 for k in range(q + 2) if k * d + l - 1 <= q)


def bf_window(q, w, sinks):
    return len(set(range(max(0, q - w + 1), q + 1)) | set(range(min(sinks, q + 1))))


def bf_select(q, ls, n, kf, kl, score, rng, own=None):
    """Keys <= q of one valid selection (random among the valid ones). ``own`` forces
    (True) or forbids (False) t's own block where the semantics leave it open."""
    E = q // ls + 1
    blocks = list(range(E))
    if E <= n:
        chosen = set(blocks)
    else:
        forced = set(range(min(kf, E))) | set(range(max(0, E - kl), E))
        cand = [b for b in blocks if b not in forced]
        if score == "mean_pool":   # an incomplete block scores -inf
            cand = [b for b in cand if (b + 1) * ls - 1 <= q]
        if own is not None and E - 1 in cand:
            cand.remove(E - 1)
            if own:
                forced = forced | {E - 1}
        rng.shuffle(cand)
        chosen = forced | set(cand[: n - len(forced)])
        assert len(chosen) == n
    return sum(min((b + 1) * ls, q + 1) - b * ls for b in chosen)


def f(expr, *syms):
    return symbolic.lambdify_int(expr, *syms)


# ---------------------------------------------------------------- compress

@HYP
@given(d=st.integers(1, 8), a=st.integers(1, 5), T=st.integers(0, 120))
def test_compress_against_brute_force(d, a, T):
    l = a * d
    bs = S.branch_shapes(cmp_(l, d))
    assert symbolic.evaluate(bs.n_blocks, T=T) == bf_n_blocks(T, l, d)
    vis = f(bs.keys, symbolic.t)
    counts = [bf_visible(q, l, d) for q in range(T)]
    assert [vis(q) for q in range(T)] == counts
    assert symbolic.evaluate(bs.keys_sum, T=T) == sum(counts)
    for k in range(0, 6):
        assert symbolic.evaluate(bs.first_key, i=k) == k * d
        assert symbolic.evaluate(bs.last_key, i=k) == k * d + l - 1
    if T:
        assert symbolic.evaluate(bs.keys_last, T=T) == counts[-1]


@pytest.mark.parametrize("l,d", [(32, 16), (16, 16), (32, 8), (7, 7), (5, 1), (64, 32)])
def test_compress_sympy_subs_matches(l, d):
    """evaluate() (sympy) and the rendered Python agree with brute force."""
    bs = S.branch_shapes(cmp_(l, d))
    for q in list(range(0, 3 * l)) + [1000, 4095]:
        assert symbolic.evaluate(bs.keys, t=q) == bf_visible(q, l, d)


def test_compress_simplified_when_block_equals_stride():
    bs = S.branch_shapes(cmp_(16, 16))
    assert not bs.keys.has(sp.Max)                       # no clip at 0
    assert symbolic.render(bs.keys) == "(t + 1) // 16"
    assert symbolic.render(bs.n_blocks) == "T // 16"
    assert symbolic.render(S.branch_shapes(cmp_(32, 16)).keys) == "max(0, (t + 1) // 16 - 1)"


# ---------------------------------------------------------------- select

@HYP
@given(ls=st.integers(1, 9), n=st.integers(1, 6), kf=st.integers(0, 3), kl=st.integers(0, 3),
       score=st.sampled_from(["cmp", "mean_pool"]), T=st.integers(0, 100),
       seed=st.integers(0, 2**16))
def test_select_against_brute_force(ls, n, kf, kl, score, T, seed):
    kf = min(kf, n)
    kl = min(kl, n - kf)
    rng = random.Random(seed)
    spec = spec_(cmp_(4, 2), slc_(ls, n, score, kf, kl)) if score == "cmp" else \
        spec_(slc_(ls, n, score, kf, kl))
    bs = S.spec_shapes(spec).branch("slc")
    hi, lo = f(bs.keys, symbolic.t), f(bs.keys_min, symbolic.t)
    elig, sel, own = f(bs.eligible, symbolic.t), f(bs.selected, symbolic.t), f(bs.own_block, symbolic.t)
    computed, complete = f(bs.keys_computed, symbolic.t), f(bs.complete, symbolic.t)
    forced, ffe, fls = f(bs.forced, symbolic.t), f(bs.forced_first_end, symbolic.t), f(bs.forced_last_start, symbolic.t)
    sums_hi = sums_lo = 0
    for q in range(T):
        E = q // ls + 1
        assert elig(q) == E and own(q) == E - 1 and sel(q) == min(n, E)
        assert computed(q) == min(n, E) * ls
        assert complete(q) == sum(1 for b in range(E) if (b + 1) * ls - 1 <= q)
        fset = set(range(min(kf, E))) | set(range(max(0, E - kl), E))
        assert forced(q) == len(fset)
        assert set(range(ffe(q))) | set(range(fls(q), E)) == fset
        got = {bf_select(q, ls, n, kf, kl, score, rng) for _ in range(3)}
        if bs.exact:
            assert got == {hi(q)}, (q, got, hi(q))
        else:
            assert all(lo(q) <= g <= hi(q) for g in got)
            assert bf_select(q, ls, n, kf, kl, score, rng, own=True) == lo(q)    # bounds attained
            assert bf_select(q, ls, n, kf, kl, score, rng, own=False) == hi(q)
        assert hi(q) <= q + 1 and hi(q) <= n * ls
        sums_hi += hi(q)
        sums_lo += lo(q)
    assert symbolic.evaluate(bs.keys_sum, T=T) == sums_hi
    assert symbolic.evaluate(bs.keys_min_sum, T=T) == sums_lo
    assert symbolic.evaluate(bs.n_blocks, T=T) == -(-T // ls)
    score_keys = f(bs.score_keys, symbolic.t)
    assert symbolic.evaluate(bs.score_keys_sum, T=T) == sum(score_keys(q) for q in range(T))


def test_select_exactness_by_spec():
    assert S.branch_shapes(slc_(kl=2), spec_(cmp_(), slc_(kl=2))).exact
    assert S.branch_shapes(slc_(score="mean_pool", kf=1, kl=0)).exact
    assert S.branch_shapes(slc_(n=2, kf=2, kl=0), spec_(cmp_(), slc_(n=2, kf=2, kl=0))).exact
    bs = S.branch_shapes(slc_(kl=0), spec_(cmp_(), slc_(kl=0)))
    assert not bs.exact and "data-dependent" in bs.note


def test_select_paper_counts():
    bs = S.branch_shapes(slc_(), spec_(cmp_(), slc_()))
    assert symbolic.render(bs.keys) == "64 * min(15, t // 64) + t % 64 + 1"
    # own block partial: 960 full keys + (t mod 64) + 1
    assert symbolic.evaluate(bs.keys, t=65535) == 1024
    assert symbolic.evaluate(bs.keys, t=65536 - 64) == 961
    assert symbolic.evaluate(bs.keys, t=100) == 101


def test_select_forced_simplifies():
    bs = S.branch_shapes(slc_(score="mean_pool", kf=0, kl=0))
    assert bs.forced == 0 and bs.forced_first_end == 0
    assert sp.simplify(bs.forced_last_start - bs.eligible) == 0      # empty range
    bs = S.branch_shapes(slc_(score="mean_pool", kf=0, kl=1))
    assert bs.forced_first_end == 0 and bs.forced == 1


# ---------------------------------------------------------------- overlap weights

def test_overlap_weights_paper():
    bs = S.branch_shapes(slc_(), spec_(cmp_(32, 16), slc_()))
    assert bs.weight_profile() == (1, 2, 2, 2, 1)
    for jj in range(1, 6):
        lo, hi = symbolic.evaluate(bs.weight_lo, j=jj), symbolic.evaluate(bs.weight_hi, j=jj)
        assert (lo, hi) == (4 * jj - 1, 4 * jj + 3)
        assert [symbolic.evaluate(bs.weight, i=k, j=jj) for k in range(lo, hi + 1)] == [1, 2, 2, 2, 1]
        assert symbolic.evaluate(bs.weight, i=lo - 1, j=jj) == 0
        assert symbolic.evaluate(bs.weight, i=hi + 1, j=jj) == 0
    assert symbolic.evaluate(bs.weight_lo, j=0) == 0      # clipped at 0
    assert [symbolic.evaluate(bs.weight, i=k, j=0) for k in range(4)] == [2, 2, 2, 1]


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 6), a=st.integers(1, 5), b=st.integers(1, 5))
def test_overlap_weights_brute_force(d, a, b):
    l, ls = a * d, b * d
    bs = S.branch_shapes(slc_(ls, 4, kf=0, kl=0), spec_(cmp_(l, d), slc_(ls, 4, kf=0, kl=0)))
    w = f(bs.weight, symbolic.i, symbolic.j)
    lo_f, hi_f = f(bs.weight_lo, symbolic.j), f(bs.weight_hi, symbolic.j)
    for jj in range(4):
        nz = []
        for ii in range(0, (jj + 2) * b + a + 2):
            keys_c = set(range(ii * d, ii * d + l))
            keys_s = set(range(jj * ls, (jj + 1) * ls))
            shared = len(keys_c & keys_s)
            assert shared % d == 0
            assert w(ii, jj) == shared // d
            if shared:
                nz.append(ii)
        assert (lo_f(jj), hi_f(jj)) == (nz[0], nz[-1])


# ---------------------------------------------------------------- window

@HYP
@given(w=st.integers(1, 40), sinks=st.integers(0, 12), T=st.integers(0, 120))
def test_window_against_brute_force(w, sinks, T):
    bs = S.branch_shapes(swa_(w, sinks))
    keys = f(bs.keys, symbolic.t)
    counts = [bf_window(q, w, sinks) for q in range(T)]
    assert [keys(q) for q in range(T)] == counts
    assert symbolic.evaluate(bs.keys_sum, T=T) == sum(counts)
    first, sink = f(bs.first_key, symbolic.t), f(bs.sink_keys, symbolic.t)
    for q in range(T):
        assert first(q) == max(0, q - w + 1)
        assert sink(q) == len(set(range(min(sinks, q + 1))) - set(range(max(0, q - w + 1), q + 1)))


def test_window_without_sinks_is_min():
    bs = S.branch_shapes(swa_(512, 0))
    assert bs.keys == sp.Min(512, symbolic.t + 1)
    assert symbolic.render(bs.keys, "triton") == "tl.minimum(512, t + 1)"


# ---------------------------------------------------------------- sums at large T

@pytest.mark.parametrize("T", [1, 31, 32, 33, 1000, 4097, 65536, 100_003])
def test_closed_form_sums_at_large_T(T):
    spec = spec_(cmp_(32, 16), slc_(64, 16, "cmp", 1, 2), swa_(512, 3),
                 slc_(32, 8, "mean_pool", 0, 0, name="mp"), slc_(64, 4, "cmp", 2, 0, name="s0"))
    sh = S.spec_shapes(spec)
    for bs in sh.branches:
        assert symbolic.evaluate(bs.keys_sum, T=T) == cost.sum_over_queries(bs.keys, T), bs.name
        assert symbolic.evaluate(bs.keys_min_sum, T=T) == cost.sum_over_queries(bs.keys_min, T), bs.name
        assert symbolic.evaluate(bs.score_keys_sum, T=T) == cost.sum_over_queries(bs.score_keys, T)
    assert symbolic.evaluate(sh.dense.keys_sum, T=T) == T * (T + 1) // 2


def test_cost_paper_at_64k():
    spec = spec_(cmp_(), slc_(), swa_(), heads=64, kv_heads=4, qk_dim=128, v_dim=128)
    c = cost.cost(S.spec_shapes(spec), 65536, cost.Dims.of(spec))
    cmp, score, slc, swa = (c.row(n) for n in ("cmp", "slc score", "slc", "swa"))
    assert round(cmp.keys_avg) == 2047 and cmp.keys_last == 4095   # PERF.md: ~2046
    assert slc.keys_last == 1024 and 980 < slc.keys_avg < 1000      # own block is partial
    assert swa.keys_last == 512 and 509 < swa.keys_avg <= 512
    # PERF.md: 4.4e12, 2.2e12, 2.2e12, 1.1e12, ~9.9e12 (D = 128, 64 heads)
    assert abs(cmp.flops / 4.4e12 - 1) < 0.01
    assert abs(score.flops / 2.2e12 - 1) < 0.01
    assert abs(slc.flops / 2.2e12 - 1) < 0.05
    assert abs(swa.flops / 1.1e12 - 1) < 0.01
    assert abs(c.total.flops / 9.9e12 - 1) < 0.02
    assert c.dense.flops == 65536 * 65537 // 2 * 64 * 512
    assert c.dense.bytes == 65536 * 65537 // 2 * 4 * 256 * 2
    assert c.total.keys_last == 4095 + 1024 + 512
    assert c.flop_ratio > 7


def test_dims_defaults_and_declared():
    d = cost.Dims.of(spec_(cmp_()))
    assert (d.heads, d.kv_heads, d.qk_dim, d.v_dim) == (64, 4, 128, 128)
    assert set(d.defaulted) == {"heads", "kv_heads", "qk_dim", "v_dim"}
    d = cost.Dims.of(spec_(cmp_(), heads=6, qk_dim=192), v_dim=64)
    assert (d.heads, d.kv_heads, d.qk_dim, d.v_dim) == (6, 1, 192, 64)
    assert d.defaulted == ("kv_heads",)


def test_flops_per_query():
    bs = S.branch_shapes(slc_(), spec_(cmp_(), slc_()))
    e = cost.flops_per_query(bs, 128, 128)
    q = 5000
    assert symbolic.evaluate(e, t=q) == symbolic.evaluate(bs.keys, t=q) * 512 + symbolic.evaluate(bs.score_keys, t=q) * 256


# ---------------------------------------------------------------- queries

x, y = sp.symbols("x y", integer=True)


def test_queries_never_raise():
    assert symbolic.statically_divides(16, 64 * symbolic.j + 32)
    assert not symbolic.statically_divides(16, symbolic.t)
    assert symbolic.statically_divides(2, symbolic.T * (symbolic.T + 1))
    assert symbolic.statically_integer(symbolic.T * (symbolic.T + 1) / 2)
    assert not symbolic.statically_integer(symbolic.T / 2)
    assert symbolic.statically_integer(sp.Min(symbolic.T, 7) * (sp.Min(symbolic.T, 7) - 1) / 2)
    assert symbolic.statically_nonnegative(sp.floor(symbolic.t / 4)) and not symbolic.statically_nonnegative(symbolic.t - 1)
    assert symbolic.statically_positive(symbolic.t + 1)
    assert symbolic.statically_known_true(sp.Le(0, sp.floor(symbolic.t / 4)))
    assert symbolic.statically_known_true(sp.Le(sp.Mod(symbolic.t, 64), 63))
    assert not symbolic.statically_known_true(sp.Le(symbolic.t, 5))
    assert symbolic.bounds(sp.Mod(x, 8)) == (0, 7)
    assert symbolic.bounds(sp.Min(symbolic.t, 5) + 1) == (1, 6)
    assert symbolic.evaluate(sp.floor((symbolic.t - 15) / 16), t=3) == -1
    assert symbolic.evaluate(symbolic.T + symbolic.t, T=3) is None              # symbols left
    assert symbolic.evaluate(symbolic.T / 2, T=3) is None                # not an integer
    assert symbolic.evaluate(symbolic.T, {"T": 7}) == 7 and symbolic.evaluate(symbolic.T, {symbolic.T: 8}) == 8
    for bad in ("not an expression (", object(), None):
        assert symbolic.statically_divides(bad, 4) is False
        assert symbolic.statically_integer(bad) is False
        assert symbolic.statically_nonnegative(bad) is False
        assert symbolic.evaluate(bad, T=1) is None
        assert symbolic.statically_known_true(bad) is False


def test_simplify_and_helpers():
    assert symbolic.floordiv(symbolic.t - 15, 16) == sp.floor((symbolic.t + 1) / 16) - 1
    assert symbolic.floordiv(64 * symbolic.j + symbolic.t + 70, 64) == symbolic.j + 1 + sp.floor((symbolic.t + 6) / 64)
    assert symbolic.floordiv(sp.Mod(symbolic.t, 64), 64) == 0
    assert symbolic.ceildiv(symbolic.T, 64) == sp.floor((symbolic.T + 63) / 64)
    assert symbolic.clip0(symbolic.t) == symbolic.t and symbolic.clip0(-symbolic.t - 1) == 0
    assert symbolic.simplify(sp.Max(0, sp.floor(symbolic.t / 3), evaluate=False)) == sp.floor(symbolic.t / 3)
    assert symbolic.simplify(sp.Mod(sp.Mod(symbolic.t, 8), 16)) == sp.Mod(symbolic.t, 8)


# ---------------------------------------------------------------- printer

def _c_div(a, b):          # Triton integer semantics: truncate toward zero
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _c_mod(a, b):
    return a - b * _c_div(a, b)


class _FakeTl:
    maximum = staticmethod(max)
    minimum = staticmethod(min)
    where = staticmethod(lambda c, a, b: a if c else b)


class _CSemantics(ast.NodeTransformer):
    def visit_BinOp(self, node):
        self.generic_visit(node)
        fn = {ast.FloorDiv: "_c_div", ast.Mod: "_c_mod"}.get(type(node.op))
        if fn is None:
            return node
        return ast.copy_location(ast.Call(ast.Name(fn, ast.Load()), [node.left, node.right], []), node)


_ALLOWED = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Name, ast.Load, ast.Constant, ast.Call,
            ast.Attribute, ast.Compare, ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod,
            ast.USub, ast.GtE, ast.Gt, ast.Lt, ast.LtE, ast.Eq, ast.NotEq, ast.BitAnd, ast.BitOr)


def triton_as_c(text: str, syms):
    tree = ast.parse(text, mode="eval")
    for node in ast.walk(tree):               # a plain expression: no lambdas, no builtins
        assert isinstance(node, _ALLOWED), (type(node).__name__, text)
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Attribute) and node.func.value.id == "tl", text
            assert node.func.attr in ("maximum", "minimum", "where"), text
    tree = ast.fix_missing_locations(_CSemantics().visit(tree))
    code = compile(tree, "<triton>", "eval")
    env = {"tl": _FakeTl, "_c_div": _c_div, "_c_mod": _c_mod}
    return lambda *vals: eval(code, {**env, **{s.name: v for s, v in zip(syms, vals)}})  # noqa: S307


def _exprs():
    yield sp.floor((x - 15) / 16), (x,)
    yield sp.floor((-3 * x + y + 7) / 5), (x, y)
    yield sp.Mod(x - 3, 16), (x,)
    yield sp.Mod(-x, 7) + sp.floor(x / 3), (x,)
    yield sp.ceiling((x - 1) / 4), (x,)
    yield sp.ceiling(x / 4) * 2 - sp.Max(x, y, 3), (x, y)
    yield sp.Min(x, -y) - sp.Max(0, sp.floor((x + y) / 2)), (x, y)
    yield x * (x + 1) / 2 - sp.Min(x, 4) * (sp.Min(x, 4) - 1) / 2, (x,)
    yield -sp.floor(x / 3) - (y - x) ** 2, (x, y)
    yield sp.Piecewise((x - y, sp.Le(x, y)), (sp.floor(x / 4), True)), (x, y)
    yield sp.floor((sp.floor((x - 7) / 3) - 2) / 4), (x,)


@pytest.mark.parametrize("k", range(11))
def test_render_round_trip_signed(k):
    expr, syms = list(_exprs())[k]
    py = eval(f"lambda {', '.join(s.name for s in syms)}: {symbolic.render(expr, 'python')}",  # noqa: S307
              {"max": max, "min": min})
    tr = triton_as_c(symbolic.render(expr, "triton"), syms)
    pts = [tuple(v) for v in zip(*[range(-33, 34, 1)] * len(syms))]
    rng = random.Random(k)
    pts += [tuple(rng.randint(-200, 200) for _ in syms) for _ in range(60)]
    for n, p in enumerate(pts):
        ref = expr.subs(dict(zip(syms, p))) if n % 4 == 0 else None   # sympy is the slow oracle
        if ref is None:
            ref = symbolic.evaluate(expr, dict(zip(syms, p)))
        assert py(*p) == ref, (expr, p)
        assert tr(*p) == ref, (expr, p, symbolic.render(expr, "triton"))


def test_render_round_trip_every_shape():
    """Every per-query expression of several specs, at many t (and i, j), both targets."""
    spec = spec_(cmp_(32, 16), slc_(64, 16, "cmp", 1, 2), swa_(512, 4),
                 cmp_(48, 16, name="c2"), slc_(32, 5, "c2", 0, 0, name="s2"),
                 slc_(16, 3, "mean_pool", 1, 0, name="mp"), swa_(7, 0, name="w2"))
    sh = S.spec_shapes(spec)
    checked = 0
    for bs in sh.branches:
        for name in ("keys", "keys_min", "score_keys", "visible", "eligible", "selected",
                     "complete", "forced", "forced_first_end", "forced_last_start", "first_key",
                     "sink_keys", "weight", "weight_lo", "weight_hi", "keys_computed"):
            expr = getattr(bs, name, None)
            if expr is None:
                continue
            syms = tuple(sorted(sp.sympify(expr).free_symbols, key=lambda s: s.name))
            py = symbolic.lambdify_int(expr, *syms)
            tr = triton_as_c(symbolic.render(expr, "triton"), syms)
            for q in [0, 1, 2, 15, 16, 31, 32, 47, 63, 64, 100, 511, 512, 1023, 1024, 5000]:
                vals = (q,) * len(syms) if len(syms) < 2 else (q % 50, q // 16)
                ref = symbolic.evaluate(expr, dict(zip(syms, vals)))
                assert py(*vals) == ref == tr(*vals), (bs.name, name, vals)
            checked += 1
    assert checked > 30


def test_render_names_and_shape():
    bs = S.branch_shapes(slc_(), spec_(cmp_(), slc_()))
    text = symbolic.render(bs.weight, "triton", names={"i": "o_i[:, None]", "j": "i_j"})
    assert "o_i[:, None]" in text and "i_j" in text and "max(" not in text.replace("tl.maximum", "")
    assert symbolic.render(bs.weight, "python") == "max(0, min(i + 1, 4 * j + 3) - max(i, 4 * j) + 1)"
    assert symbolic.render(bs.weight, "text") == "max(0, min(i + 1, 4*j + 3) - max(i, 4*j) + 1)"
    assert symbolic.render(bs.n_blocks, "triton") == "(T + 63) // 64"
    assert symbolic.render(symbolic.T * (symbolic.T + 1) / 2) == "T * (T + 1) // 2"
    with pytest.raises(ValueError):
        symbolic.render(symbolic.T / 2)
    with pytest.raises(ValueError):
        symbolic.render(symbolic.T, target="cuda")


def test_triton_interpreter_agrees(tmp_path):
    """The triton text compiled by Triton (interpreter on CPU) equals sympy."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    import importlib.util
    import os
    exprs = [sp.floor((x - 15) / 16), sp.Mod(x - 3, 16), sp.ceiling((x - 1) / 4),
             sp.Max(0, sp.floor((x + 1) / 16) - 1) + sp.Min(x, 7)]
    body = "\n".join(f"    tl.store(out_ptr + {k} * N + o, {symbolic.render(e, 'triton', {'x': 'xv'})})"
                     for k, e in enumerate(exprs))
    src = ("import triton\nimport triton.language as tl\n\n@triton.jit\n"
           "def kern(x_ptr, out_ptr, N: tl.constexpr):\n"
           "    o = tl.arange(0, N)\n    xv = tl.load(x_ptr + o)\n" + body + "\n")
    path = tmp_path / "gen_shapes_kernel.py"
    path.write_text(src)
    old = os.environ.get("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("gen_shapes_kernel", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        xs = torch.arange(-64, 64, dtype=torch.int32, device=dev)
        out = torch.empty(len(exprs) * 128, dtype=torch.int32, device=dev)
        mod.kern[(1,)](xs, out, N=128)
        got = out.view(len(exprs), 128).cpu().tolist()
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
    for k, e in enumerate(exprs):
        assert got[k] == [int(e.subs(x, v)) for v in range(-64, 64)], (e, symbolic.render(e, "triton"))


def test_front_end_imports_no_torch():
    import subprocess
    import sys
    code = ("import sys, nsa_dsl.language.shapes, nsa_dsl.tools.explain; "
            "assert 'torch' not in sys.modules and 'triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def _tree(draw, depth):
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from([x, y, symbolic.t, sp.Integer(draw(st.integers(-9, 9)))]))
    op = draw(st.sampled_from(["add", "sub", "mul", "floor", "ceil", "mod", "max", "min"]))
    a = _tree(draw, depth - 1)
    if op in ("floor", "ceil", "mod"):
        k = draw(st.integers(1, 7))
        return {"floor": sp.floor(a / k), "ceil": sp.ceiling(a / k), "mod": sp.Mod(a, k)}[op]
    b = _tree(draw, depth - 1)
    return {"add": a + b, "sub": a - b, "mul": a * b, "max": sp.Max(a, b),
            "min": sp.Min(a, b)}[op]


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_render_random_expressions(data):
    """Random integer expression trees: python and triton text against sympy."""
    expr = _tree(data.draw, 4)
    syms = (x, y, symbolic.t)
    py = symbolic.lambdify_int(expr, *syms)
    tr = triton_as_c(symbolic.render(expr, "triton"), syms)
    simple = symbolic.simplify(expr)
    tr_simple = triton_as_c(symbolic.render(simple, "triton"), syms)
    lo, hi = symbolic.bounds(expr)
    for _ in range(6):
        p = (data.draw(st.integers(-60, 60)), data.draw(st.integers(-60, 60)),
             data.draw(st.integers(0, 60)))
        ref = symbolic.evaluate(expr, dict(zip(syms, p)))
        assert py(*p) == ref == tr(*p), (expr, p, symbolic.render(expr, "triton"))
        assert symbolic.evaluate(simple, dict(zip(syms, p))) == ref == tr_simple(*p), (expr, simple, p)
        assert lo <= ref <= hi
