"""Symbolic shapes: the index arithmetic of every branch as sympy expressions.

sympy lives behind this one module. It has two faces, as Inductor's ``sizevars``:

* **queries that never raise** -- ``bounds``, ``statically_nonnegative``,
  ``statically_integer``, ``statically_divides``, ``statically_known_true``,
  ``evaluate``: each answers ``False``/``None`` when it cannot prove or compute;
* **a printer** -- ``render(expr, target="python"|"triton"|"text", names=...)``
  turns an integer expression into code the kernels paste (or text for people).

Symbols: ``T`` (sequence length), ``t`` (query position, ``0 <= t < T``), ``i``
(compressed block), ``j`` (selection block), ``Dqk``/``Dv`` (head dims). All
are non-negative integers. Expressions are built from a branch's concrete
numbers, so they come out simplified for that spec (``l == d`` drops the clip
at 0 of the compressed count, ``sinks = 0`` drops the sink term, ...).

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

import functools
import itertools
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Mapping, Optional, Union

import sympy as sp

from .ir import Branch, Compress, Select, Spec, Window

__all__ = [
    # symbols
    "T", "t", "i", "j", "Dqk", "Dv",
    # queries that never raise
    "bounds", "statically_nonnegative", "statically_positive", "statically_integer",
    "statically_divides", "statically_known_true", "evaluate",
    # building and simplifying
    "floordiv", "ceildiv", "clip0", "simplify",
    # printer
    "render", "lambdify_int",
    # per-branch expressions
    "BranchShapes", "CompressShapes", "SelectShapes", "WindowShapes", "DenseShapes",
    "SpecShapes", "branch_shapes", "spec_shapes",
    "compress_n_blocks", "compress_visible", "overlap_weight",
    "window_keys", "select_keys_exact", "select_keys_max",
    # costs
    "Dims", "CostRow", "Cost", "cost", "flops_per_query", "sum_over_queries",
]

Expr = sp.Expr
IntLike = Union[int, sp.Expr]

T = sp.Symbol("T", integer=True, nonnegative=True)
t = sp.Symbol("t", integer=True, nonnegative=True)
i = sp.Symbol("i", integer=True, nonnegative=True)
j = sp.Symbol("j", integer=True, nonnegative=True)
Dqk = sp.Symbol("Dqk", integer=True, positive=True)
Dv = sp.Symbol("Dv", integer=True, positive=True)


def _S(x) -> Expr:
    return sp.sympify(x, strict=True)     # ints and sympy objects; never parses strings


# ---------------------------------------------------------------------------
# Queries that never raise
# ---------------------------------------------------------------------------

_INF = math.inf


def _symbol_bounds(s: sp.Symbol):
    if s.is_positive and s.is_integer:
        return 1, _INF
    if s.is_nonnegative:
        return 0, _INF
    if s.is_negative and s.is_integer:
        return -_INF, -1
    if s.is_nonpositive:
        return -_INF, 0
    return -_INF, _INF


def _mul_iv(a, b):
    prods = [0 if (x == 0 or y == 0) else x * y for x in a for y in b]   # 0 * oo = 0 here
    return min(prods), max(prods)


def _num(x):
    return int(x) if x.is_Integer else Fraction(int(x.p), int(x.q))


def _floor_iv(v):
    return v if math.isinf(v) else math.floor(v)


def _ceil_iv(v):
    return v if math.isinf(v) else math.ceil(v)


@functools.lru_cache(maxsize=8192)
def _bounds(e: Expr):
    """Interval arithmetic on Python numbers (ints, Fractions, +-inf)."""
    if e.is_Rational:
        v = _num(e)
        return v, v
    if e.is_Symbol:
        return _symbol_bounds(e)
    if e.is_Add:
        lo = hi = 0
        for a in e.args:
            alo, ahi = _bounds(a)
            lo, hi = lo + alo, hi + ahi          # -inf + inf cannot happen: lo <= hi each
        return lo, hi
    if e.is_Mul:
        iv = (1, 1)
        for a in e.args:
            iv = _mul_iv(iv, _bounds(a))
        return iv
    if e.is_Pow and e.exp.is_Integer and e.exp > 0:
        lo, hi = _bounds(e.base)
        n = int(e.exp)
        if lo >= 0:
            return lo ** n, hi ** n
        if n % 2 == 0:
            return 0, max(lo ** n, hi ** n)
        return lo ** n, hi ** n
    if isinstance(e, sp.floor):
        lo, hi = _bounds(e.args[0])
        return _floor_iv(lo), _floor_iv(hi)
    if isinstance(e, sp.ceiling):
        lo, hi = _bounds(e.args[0])
        return _ceil_iv(lo), _ceil_iv(hi)
    if isinstance(e, sp.Mod):
        a, q = e.args
        if q.is_Integer and q > 0:
            lo, hi = _bounds(a)
            if lo >= 0 and hi < int(q):
                return lo, hi
            return 0, int(q) - 1
        return -_INF, _INF
    if isinstance(e, (sp.Max, sp.Min)):
        ivs = [_bounds(a) for a in e.args]
        pick = max if isinstance(e, sp.Max) else min
        return pick(v[0] for v in ivs), pick(v[1] for v in ivs)
    if isinstance(e, sp.Piecewise):
        ivs = [_bounds(a.expr) for a in e.args]
        return min(v[0] for v in ivs), max(v[1] for v in ivs)
    return -_INF, _INF


def _to_sympy(v):
    if isinstance(v, float) and math.isinf(v):
        return sp.oo if v > 0 else -sp.oo
    return sp.Rational(v.numerator, v.denominator) if isinstance(v, Fraction) else sp.Integer(v)


def bounds(expr: IntLike) -> tuple:
    """``(lo, hi)`` with ``lo <= expr <= hi`` for all values of its symbols (sympy
    numbers, ``-oo``/``oo`` where unbounded). Interval arithmetic: sound, maybe loose."""
    try:
        lo, hi = _bounds(_S(expr))
        return _to_sympy(lo), _to_sympy(hi)
    except Exception:  # never raise: unknown means unbounded
        return -sp.oo, sp.oo


def _lo(expr) -> "int | Fraction | float":
    try:
        return _bounds(_S(expr))[0]
    except Exception:
        return -_INF


def _hi(expr) -> "int | Fraction | float":
    try:
        return _bounds(_S(expr))[1]
    except Exception:
        return _INF


def statically_nonnegative(expr: IntLike) -> bool:
    """True iff ``expr >= 0`` is provable for every value of its symbols."""
    try:
        e = _S(expr)
        return bool(e.is_nonnegative) or _lo(e) >= 0
    except Exception:
        return False


def statically_positive(expr: IntLike) -> bool:
    """True iff ``expr > 0`` is provable."""
    try:
        e = _S(expr)
        return bool(e.is_positive) or _lo(e) > 0
    except Exception:
        return False


def _poly_atoms(e: Expr, out: set) -> bool:
    """Collect the non-polynomial leaves of ``e``; False if a leaf is not integer-valued."""
    if e.is_Number:
        return True
    if e.is_Add or e.is_Mul:
        return all(_poly_atoms(a, out) for a in e.args)
    if e.is_Pow and e.exp.is_Integer and e.exp >= 0:
        return _poly_atoms(e.base, out)
    if e.is_integer:
        out.add(e)
        return True
    return False


_RESIDUE_LIMIT = 1 << 14


def _integer_valued(e: Expr) -> bool:
    """Prove ``e`` takes integer values: write it ``P/q`` with ``P`` a polynomial over
    integer-valued leaves and check ``P = 0 mod q`` at every residue of the leaves."""
    if e.is_integer:
        return True
    num, den = sp.fraction(sp.together(e))
    if not den.is_Integer:
        return False
    q = int(den)
    atoms: set = set()
    if not _poly_atoms(num, atoms):
        return False
    atoms = sorted(atoms, key=sp.default_sort_key)
    if not atoms:
        return num.is_Integer and int(num) % q == 0
    if q ** len(atoms) > _RESIDUE_LIMIT:
        return False
    poly = sp.Poly(num, *atoms)
    if not all(c.is_Integer for c in poly.coeffs()):
        return False
    terms = [(int(c), m) for m, c in poly.terms()]
    for res in itertools.product(range(q), repeat=len(atoms)):
        v = 0
        for c, m in terms:
            p = c
            for r, k in zip(res, m):
                p *= r ** k
            v += p
        if v % q:
            return False
    return True


def statically_integer(expr: IntLike) -> bool:
    """True iff ``expr`` provably takes integer values (``T*(T + 1)/2`` does)."""
    try:
        return _integer_valued(_S(expr))
    except Exception:
        return False


def statically_divides(divisor: IntLike, expr: IntLike) -> bool:
    """True iff ``divisor`` provably divides ``expr`` (reads "divisor | expr"):
    ``statically_divides(16, 64*j + 32)`` is True, ``statically_divides(16, t)`` False."""
    try:
        d, e = _S(divisor), _S(expr)
        if d == 0:
            return bool(e == 0)
        return _integer_valued(e / d)
    except Exception:
        return False


def statically_known_true(cond) -> bool:
    """True iff the relation ``cond`` (e.g. ``sp.Le(a, b)``, or a bool) provably holds."""
    try:
        if isinstance(cond, bool):
            return cond
        c = _S(cond)
        if c is sp.true:
            return True
        if c is sp.false:
            return False
        if isinstance(c, sp.And):
            return all(statically_known_true(a) for a in c.args)
        if isinstance(c, sp.Or):
            return any(statically_known_true(a) for a in c.args)
        if isinstance(c, (sp.Ge, sp.Gt, sp.Le, sp.Lt, sp.Eq)):
            diff = simplify(c.lhs - c.rhs)
            if isinstance(c, sp.Eq):
                return diff == 0
            if isinstance(c, (sp.Le, sp.Lt)):
                diff = -diff
            lo = _lo(diff)
            return lo > 0 if isinstance(c, (sp.Gt, sp.Lt)) else lo >= 0
        return False
    except Exception:
        return False


def evaluate(expr: IntLike, values: Optional[Mapping] = None, **kw) -> Optional[int]:
    """The integer value of ``expr`` at ``values`` (names or symbols -> ints), e.g.
    ``evaluate(e, T=4096)``; None if symbols remain or the value is not an integer."""
    try:
        vals = dict(values or {})
        vals.update(kw)
        e = _S(expr)
        by_name = {s.name: s for s in e.free_symbols}
        sub = {}
        for k, v in vals.items():
            s = by_name.get(k) if isinstance(k, str) else k
            if s is not None:
                sub[s] = sp.Integer(int(v))
        r = e.xreplace(sub) if sub else e
        if r.free_symbols:
            r = r.subs(sub)
        if r.is_Integer:
            return int(r)
        if r.is_Rational and r.q == 1:
            return int(r.p)
        return None
    except Exception:
        return None


# ---------------------------------------------------------------------------
# Building and simplifying
# ---------------------------------------------------------------------------

def _floor_normalized(arg: Expr) -> Expr:
    """floor(P/q) with the parts of P that q divides moved outside, and the constant
    of P brought into [0, q): floor((t - 15)/16) -> floor((t + 1)/16) - 1."""
    num, den = sp.fraction(sp.together(arg))
    if not (den.is_Integer and den > 0) or not num.is_integer:
        return sp.floor(arg)
    q = int(den)
    if q == 1:
        return num
    outside, inside = sp.Integer(0), sp.Integer(0)
    for term in sp.Add.make_args(sp.expand(num, deep=False)):
        c, rest = term.as_coeff_Mul()
        if not (c.is_Integer and rest.is_integer):
            inside += term
            continue
        c = int(c)
        if rest == 1:
            k, r = divmod(c, q)                 # constant into [0, q)
        else:
            k = int(c / q)                      # truncate: keep -t inside as -t
            r = c - k * q
        outside += k * rest
        inside += r * rest
    lo, hi = _lo(inside), _hi(inside)
    if not (math.isinf(lo) or math.isinf(hi)):
        flo, fhi = math.floor(Fraction(lo) / q), math.floor(Fraction(hi) / q)
        if flo == fhi:
            return outside + flo
    if inside == 0:
        return outside
    return outside + sp.floor(inside / q)


def floordiv(a: IntLike, b: IntLike) -> Expr:
    """floor(a / b), normalized (b a positive integer or expression)."""
    return _floor_normalized(_S(a) / _S(b))


def ceildiv(a: IntLike, b: IntLike) -> Expr:
    """ceil(a / b) for integer-valued a and positive integer b, as floor((a + b - 1)/b)."""
    a, b = _S(a), _S(b)
    if b.is_Integer and b > 0 and a.is_integer:
        return floordiv(a + b - 1, b)
    return sp.ceiling(a / b)


def _prune(args, is_max: bool):
    keep = list(args)
    changed = True
    while changed and len(keep) > 1:
        changed = False
        for x in keep:
            for y in keep:
                if x is y:
                    continue
                diff = (x - y) if is_max else (y - x)
                if _lo(diff) >= 0:   # x dominates y
                    keep.remove(y)
                    changed = True
                    break
            if changed:
                break
    return keep


def simplify(expr: IntLike) -> Expr:
    """Bottom-up integer simplification: normalized floors, ceil as floor, ``Mod`` and
    ``Max``/``Min`` arguments dropped where interval bounds prove them redundant."""
    e = _S(expr)
    if e.is_Atom:
        return e
    if isinstance(e, sp.Piecewise):
        return e.func(*[(simplify(a.expr), a.cond) for a in e.args])
    args = [simplify(a) for a in e.args]
    if isinstance(e, sp.floor):
        return _floor_normalized(args[0])
    if isinstance(e, sp.ceiling):
        num, den = sp.fraction(sp.together(args[0]))
        if den.is_Integer and den > 0 and num.is_integer:
            return ceildiv(num, den)
        return sp.ceiling(args[0])
    if isinstance(e, sp.Mod):
        a, q = args
        if q.is_Integer and q > 0:
            if _lo(a) >= 0 and _hi(a) < int(q):
                return a
        return sp.Mod(a, q)
    if isinstance(e, (sp.Max, sp.Min)):
        is_max = isinstance(e, sp.Max)
        keep = _prune(args, is_max)
        if len(keep) == 1:
            return keep[0]
        # sympy's own Max/Min simplification is slow; the pruning above did the work
        return (sp.Max if is_max else sp.Min)(*keep, evaluate=False)
    if all(a is b for a, b in zip(args, e.args)):
        return e
    return e.func(*args)


def clip0(x: IntLike) -> Expr:
    """max(0, x), without the max where x >= 0 is provable (and 0 where x <= 0 is)."""
    x = simplify(x)
    if _lo(x) >= 0:
        return x
    if _hi(x) <= 0:
        return sp.Integer(0)
    return sp.Max(0, x, evaluate=False)


def _min(*a) -> Expr:
    return simplify(sp.Min(*[_S(x) for x in a], evaluate=False))


def _max(*a) -> Expr:
    return simplify(sp.Max(*[_S(x) for x in a], evaluate=False))


# ---------------------------------------------------------------------------
# Printer: integer expressions as Python / Triton code, or text for people
# ---------------------------------------------------------------------------

_ATOM, _UNARY, _MUL, _ADD, _CMP, _AND, _OR, _COND = 100, 60, 50, 40, 30, 20, 15, 10
_TARGETS = ("python", "triton", "text")


class _Renderer:
    def __init__(self, target: str, names: Optional[Mapping]):
        if target not in _TARGETS:
            raise ValueError(f"render: target must be one of {_TARGETS}, not {target!r}")
        self.target = target
        self.names = {(k.name if isinstance(k, sp.Symbol) else str(k)): str(v)
                      for k, v in (names or {}).items()}

    # -- helpers
    @staticmethod
    def wrap(r, prec):
        text, p = r
        return f"({text})" if p < prec else text

    def call(self, fn, args):
        return f"{fn}({', '.join(self.r(a)[0] for a in args)})", _ATOM

    def r(self, e: Expr):
        e = _S(e)
        if e.is_Integer:
            v = int(e)
            return (str(v), _ATOM) if v >= 0 else (str(v), _UNARY)
        if e.is_Rational:
            if self.target == "text":
                return f"{e.p}/{e.q}", _MUL
            raise ValueError(f"render: {e} is not an integer")
        if e.is_Symbol:
            text = self.names.get(e.name, e.name)
            return text, (_ATOM if text.isidentifier() else _ADD)
        if e is sp.true or e is sp.false:
            return ("True" if e is sp.true else "False"), _ATOM
        if e.is_Add or e.is_Mul:
            return self.arith(e)
        if e.is_Pow:
            if e.exp.is_Integer and e.exp > 0:
                base = self.wrap(self.r(e.base), _ATOM)
                if self.target == "text":
                    return f"{base}^{int(e.exp)}", _ATOM
                return " * ".join([base] * int(e.exp)), _MUL
            raise ValueError(f"render: {e} is not an integer expression")
        if isinstance(e, sp.floor):
            return self.floor(e.args[0])
        if isinstance(e, sp.ceiling):
            num, den = sp.fraction(sp.together(e.args[0]))
            if self.target == "text":
                return f"ceil({self.quotient(num, den)})", _ATOM
            if den.is_Integer and den > 0 and num.is_integer:
                return self.floor((num + den - 1) / den)
            return self.r(-sp.floor(-e.args[0], evaluate=False))
        if isinstance(e, sp.Mod):
            return self.mod(*e.args)
        if isinstance(e, (sp.Max, sp.Min)):
            is_max = isinstance(e, sp.Max)
            args = sorted(e.args, key=lambda a: (not a.is_Number, sp.default_sort_key(a)))
            if self.target == "triton":
                fn = "tl.maximum" if is_max else "tl.minimum"
                text = self.r(args[-1])[0]
                for a in reversed(args[:-1]):
                    text = f"{fn}({self.r(a)[0]}, {text})"
                return text, _ATOM
            return self.call("max" if is_max else "min", args)
        if isinstance(e, sp.Piecewise):
            return self.piecewise(e)
        if isinstance(e, (sp.Lt, sp.Le, sp.Gt, sp.Ge, sp.Eq, sp.Ne)):
            op = {sp.Lt: "<", sp.Le: "<=", sp.Gt: ">", sp.Ge: ">=", sp.Eq: "==", sp.Ne: "!="}[type(e)]
            return (f"{self.wrap(self.r(e.lhs), _ADD)} {op} {self.wrap(self.r(e.rhs), _ADD)}", _CMP)
        if isinstance(e, (sp.And, sp.Or)):
            is_and = isinstance(e, sp.And)
            if self.target == "triton":
                op = " & " if is_and else " | "
                return op.join(f"({self.r(a)[0]})" for a in e.args), _MUL
            op, prec = (" and ", _AND) if is_and else (" or ", _OR)
            return op.join(self.wrap(self.r(a), prec + 1) for a in e.args), prec
        raise ValueError(f"render: cannot render {type(e).__name__}: {e}")

    def arith(self, e: Expr):
        num, den = sp.fraction(sp.together(e)) if self._has_rational(e) else (e, 1)
        den = _S(den)
        if den != 1:
            if self.target == "text":
                return f"{self.wrap(self.r(num), _MUL)}/{self.wrap(self.r(den), _ATOM)}", _MUL
            if not (den.is_Integer and statically_integer(e)):
                raise ValueError(f"render: cannot prove {e} is an integer")
            # exact division: // is right in Python and in Triton (no remainder)
            return f"{self.wrap(self.r(num), _MUL)} // {self.wrap(self.r(den), _ATOM)}", _MUL
        if e.is_Add:
            return self.add(e)
        return self.mul(e)

    @staticmethod
    def _has_rational(e):
        """A non-integer coefficient or a negative power at the top of a sum/product."""
        for term in sp.Add.make_args(e):
            for f in sp.Mul.make_args(term):
                if f.is_Rational and not f.is_Integer:
                    return True
                if f.is_Pow and f.exp.is_negative:
                    return True
        return False

    def add(self, e: Expr):
        terms = e.as_ordered_terms()
        # positive terms first, remainders after them, constants last (stable sort):
        # "min(i + 1, 4*j + 3) - max(i, 4*j) + 1", "64*min(15, floor(t/64)) + (t mod 64) + 1"
        def negative(term):
            c = term.as_coeff_Mul()[0]
            return bool(c.is_Number and c < 0)
        terms = sorted(terms, key=lambda x: (x.is_Number, negative(x), isinstance(x, sp.Mod)))
        parts = [self.r(terms[0])[0]]
        for term in terms[1:]:
            if negative(term):
                parts.append(f" - {self.wrap(self.r(-term), _MUL)}")
            else:
                parts.append(f" + {self.wrap(self.r(term), _MUL)}")
        return "".join(parts), _ADD

    def mul(self, e: Expr):
        c, rest = e.as_coeff_Mul()
        factors = list(sp.Mul.make_args(rest))
        sep = "*" if self.target == "text" else " * "
        texts = [self.wrap(self.r(f), _ATOM) for f in factors]
        body = sep.join(texts)
        if c == 1:
            return body, (_MUL if len(factors) > 1 else _ATOM)
        if c == -1:
            return f"-{self.wrap((body, _MUL if len(factors) > 1 else _ATOM), _ATOM)}", _UNARY
        return f"{self.wrap(self.r(c), _UNARY)}{sep}{body}", _MUL

    def quotient(self, num, den):
        return f"{self.wrap(self.r(num), _MUL)}/{self.wrap(self.r(den), _ATOM)}"

    def floor(self, arg: Expr):
        num, den = sp.fraction(sp.together(arg))
        num, den = _S(num), _S(den)
        if den == 1:
            if self.target == "text":
                return f"floor({self.r(num)[0]})", _ATOM
            if not num.is_integer:
                raise ValueError(f"render: floor of a non-integer {num}")
            return self.r(num)
        if self.target == "text":
            return f"floor({self.quotient(num, den)})", _ATOM
        if not num.is_integer or not statically_positive(den):
            raise ValueError(f"render: floor({arg}) needs an integer numerator and a positive denominator")
        d = self.wrap(self.r(den), _ATOM)
        if self.target == "python" or statically_nonnegative(num):
            # Python's // is floor division for any sign; Triton's // truncates toward
            # zero, which is floor only for a non-negative numerator.
            return f"{self.wrap(self.r(num), _MUL)} // {d}", _MUL
        lo = _lo(num)
        if den.is_Integer and not math.isinf(lo):
            k = (-math.floor(lo) + int(den) - 1) // int(den)    # shift the numerator to >= 0
            shifted = sp.expand(num + k * den)
            return f"{self.wrap(self.r(shifted), _MUL)} // {d} - {k}", _ADD
        n = self.r(num)[0]
        neg = self.wrap(self.r(-num + den - 1), _MUL)
        return f"tl.where({n} >= 0, ({n}) // {d}, -({neg} // {d}))", _ATOM

    def mod(self, a: Expr, q: Expr):
        if self.target == "text":
            return f"({self.wrap(self.r(a), _MUL)} mod {self.wrap(self.r(q), _ATOM)})", _ATOM
        if not (a.is_integer and statically_positive(q)):
            raise ValueError(f"render: Mod({a}, {q}) needs an integer and a positive modulus")
        m = self.wrap(self.r(q), _ATOM)
        if self.target == "python" or statically_nonnegative(a):
            return f"{self.wrap(self.r(a), _MUL)} % {m}", _MUL
        lo = _lo(a)
        if q.is_Integer and not math.isinf(lo):
            k = (-math.floor(lo) + int(q) - 1) // int(q)
            return f"{self.wrap(self.r(sp.expand(a + k * q)), _MUL)} % {m}", _MUL
        return f"({self.wrap(self.r(a), _MUL)} % {m} + {m}) % {m}", _MUL

    def piecewise(self, e: Expr):
        pieces = list(e.args)
        last = pieces[-1]
        if last.cond is not sp.true:
            raise ValueError("render: Piecewise needs a final `True` branch")
        text = self.r(last.expr)[0]
        for p in reversed(pieces[:-1]):
            v, c = self.r(p.expr)[0], self.r(p.cond)[0]
            if self.target == "triton":
                text = f"tl.where({c}, {v}, {text})"
            else:
                text = f"({v} if {c} else {text})"
        return text, _ATOM


def render(expr: IntLike, target: str = "python", names: Optional[Mapping] = None) -> str:
    """Render an integer expression as code (``python``, ``triton``) or text.

    ``names`` maps symbols (or their names) to the text that stands for them, e.g.
    ``{"t": "o_t", "i": "o_i"}``. Python: ``floor(a/b)`` -> ``a // b`` (floor for
    any sign), ``Max``/``Min`` -> ``max``/``min``. Triton: ``//`` and ``%`` only where
    the numerator is provably non-negative (Triton truncates toward zero), else
    shifted by a multiple of the divisor or a ``tl.where`` form; ``tl.maximum``/
    ``tl.minimum``. ``text``: ``floor(a/b)``, ``(a mod b)``, for reports.
    Raises ValueError for a non-integer expression (a programming error).
    """
    return _Renderer(target, names).r(_S(expr))[0]


def lambdify_int(expr: IntLike, *symbols) -> Callable[..., int]:
    """A plain-Python function of ``symbols`` (default: sorted free symbols) that
    computes ``expr`` exactly on ints, through the python printer."""
    e = _S(expr)
    syms = symbols or tuple(sorted(e.free_symbols, key=lambda s: s.name))
    args = [f"_a{k}" for k in range(len(syms))]
    text = render(e, "python", {s: a for s, a in zip(syms, args)})
    return eval(f"lambda {', '.join(args)}: {text}", {"max": max, "min": min})  # noqa: S307


# ---------------------------------------------------------------------------
# Closed-form sums (all over v = 0 .. N-1, for integer N >= 0)
# ---------------------------------------------------------------------------

def _sum_floor(N: Expr, d: IntLike) -> Expr:
    """sum floor(v/d) = d*q*(q - 1)/2 + (N - d*q)*q, q = floor(N/d)."""
    q = floordiv(N, d)
    return d * q * (q - 1) / 2 + (N - d * q) * q


def _sum_mod(N: Expr, m: IntLike) -> Expr:
    """sum (v mod m) = m*(m - 1)/2*q + r*(r - 1)/2, q = floor(N/m), r = N - m*q."""
    q = floordiv(N, m)
    r = N - m * q
    return _S(m) * (m - 1) / 2 * q + r * (r - 1) / 2


def _sum_min(N: Expr, c: IntLike) -> Expr:
    """sum min(v + 1, c) for c >= 0 = A*(A + 1)/2 + (N - A)*c, A = min(N, c)."""
    A = _min(N, c)
    return A * (A + 1) / 2 + (N - A) * c


# ---------------------------------------------------------------------------
# Per-branch index arithmetic (numbers or symbols for the parameters)
# ---------------------------------------------------------------------------

def compress_n_blocks(n_keys: IntLike, block: IntLike, stride: IntLike) -> Expr:
    """Compressed blocks that fit in ``n_keys`` keys: max(0, floor((n - l)/d) + 1)."""
    return clip0(floordiv(_S(n_keys) - block + stride, stride))


def compress_visible(query: IntLike, block: IntLike, stride: IntLike) -> Expr:
    """Compressed blocks query ``t`` sees (``i*d + l - 1 <= t``): n_blocks(t + 1)."""
    return compress_n_blocks(_S(query) + 1, block, stride)


def overlap_weight(ci: IntLike, sj: IntLike, block: int, stride: int, select_block: int) -> Expr:
    """w(i, j): stride segments shared by compressed block i (segments i .. i + l/d - 1)
    and selection block j (segments j*l'/d .. (j+1)*l'/d - 1)."""
    a, b = sp.Rational(block, stride), sp.Rational(select_block, stride)
    ci, sj = _S(ci), _S(sj)
    return clip0(_min(ci + a - 1, (sj + 1) * b - 1) - _max(ci, sj * b) + 1)


def window_keys(query: IntLike, size: IntLike, sinks: IntLike = 0) -> Expr:
    """Keys of window(w, sinks) for query t: min(t + 1, w) + min(sinks, max(0, t - w + 1))."""
    q = _S(query)
    return simplify(_min(q + 1, size) + _min(sinks, clip0(q - size + 1)))


def select_keys_exact(query: IntLike, block: IntLike, top_k: IntLike) -> Expr:
    """Keys <= t in min(n, eligible) blocks including t's own partial block:
    l'*min(n - 1, floor(t/l')) + (t mod l') + 1."""
    q = _S(query)
    return simplify(block * _min(_S(top_k) - 1, floordiv(q, block)) + sp.Mod(q, block) + 1)


def select_keys_max(query: IntLike, block: IntLike, top_k: IntLike) -> Expr:
    """Keys <= t in min(n, eligible) blocks when t's own block is not among them
    unless every eligible block is: min(n*l', t + 1) (also an upper bound always)."""
    return _min(_S(top_k) * block, _S(query) + 1)


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
        """K/V elements read per kv head, summed over T queries (see the module doc)."""
        return self.keys_sum * (Dqk + Dv) + self.score_keys_sum * Dqk


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
class DenseShapes(BranchShapes):
    """Dense causal attention, for comparison: t + 1 keys, T*(T + 1)/2 in all."""


def _compress_shapes(b: Compress) -> CompressShapes:
    l, d = b.block, b.stride
    vis = compress_visible(t, l, d)
    N = clip0(T - l + 1)
    total = simplify(N + _sum_floor(N, d))
    return CompressShapes(
        name=b.name, kind="compress", keys=vis, keys_min=vis, exact=True,
        keys_sum=total, keys_min_sum=total, block=l, stride=d,
        n_blocks=compress_n_blocks(T, l, d), visible=vis,
        first_key=simplify(i * d), last_key=simplify(i * d + l - 1),
        note="compressed keys")


def _select_shapes(b: Select, score_branch: Optional[Compress]) -> SelectShapes:
    ls, n, kf, kl = b.block, b.top_k, b.keep_first, b.keep_last
    own = floordiv(t, ls)
    elig = simplify(own + 1)
    upper = select_keys_max(t, ls, n)
    lower = select_keys_exact(t, ls, n)
    upper_sum = simplify(_sum_min(T, n * ls))
    qT = floordiv(T, ls)
    # sum over t of l'*min(n - 1, floor(t/l')): q full periods of l' queries, then r more
    lower_sum = simplify(ls * (ls * (_sum_min(qT, n) - qT) + (T - ls * qT) * _min(n - 1, qT))
                         + _sum_mod(T, ls) + T)
    if kl >= 1:
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
    complete = floordiv(t + 1, ls)
    weight = wlo = whi = sl = sd = None
    if score_branch is not None:
        sl, sd = score_branch.block, score_branch.stride
        l, d = score_branch.block, score_branch.stride
        score_keys = compress_visible(t, l, d)
        N = clip0(T - l + 1)
        score_sum = simplify(N + _sum_floor(N, d))
        if l % d == 0 and ls % d == 0:
            a, bb = l // d, ls // d
            weight = overlap_weight(i, j, l, d, ls)
            wlo = clip0(j * bb - a + 1)
            whi = simplify((j + 1) * bb - 1)
    else:
        score_keys = complete
        score_sum = simplify(_sum_floor(T + 1, ls))
    return SelectShapes(
        name=b.name, kind="select", keys=keys, keys_min=lower if not exact else keys,
        exact=exact, keys_sum=keys_sum, keys_min_sum=lower_sum if not exact else keys_sum,
        score_keys=score_keys, score_keys_sum=score_sum, note=note,
        block=ls, top_k=n, keep_first=kf, keep_last=kl, score=b.score,
        n_blocks=ceildiv(T, ls), own_block=own, eligible=elig, selected=_min(n, elig),
        complete=complete, forced=_min(elig, kf + kl), forced_first_end=_min(kf, elig),
        forced_last_start=clip0(own - kl + 1), first_key=simplify(j * ls),
        last_key=simplify((j + 1) * ls - 1), keys_computed=simplify(_min(n, elig) * ls),
        score_block=sl, score_stride=sd, weight=weight, weight_lo=wlo, weight_hi=whi)


def _window_shapes(b: Window) -> WindowShapes:
    w, s = b.size, b.sinks
    keys = window_keys(t, w, s)
    total = simplify(_sum_min(T, w) + _sum_min(clip0(T - w), s))
    return WindowShapes(
        name=b.name, kind="window", keys=keys, keys_min=keys, exact=True,
        keys_sum=total, keys_min_sum=total, size=w, sinks=s,
        first_key=clip0(t - w + 1), sink_keys=_min(s, clip0(t - w + 1)))


def _dense_shapes() -> DenseShapes:
    total = T * (T + 1) / 2
    return DenseShapes(name="dense", kind="dense", keys=t + 1, keys_min=t + 1, exact=True,
                       keys_sum=total, keys_min_sum=total, note="dense causal attention")


def branch_shapes(branch: Branch, spec: Optional[Spec] = None) -> BranchShapes:
    """The shapes of one branch. A select branch scored by a compress branch needs
    ``spec`` to find it (without it, it is treated as scored by mean_pool)."""
    if isinstance(branch, Compress):
        return _compress_shapes(branch)
    if isinstance(branch, Select):
        score = None
        if branch.score != "mean_pool" and spec is not None:
            try:
                cand = spec.branch(branch.score)
            except KeyError:
                cand = None
            score = cand if isinstance(cand, Compress) else None
        return _select_shapes(branch, score)
    if isinstance(branch, Window):
        return _window_shapes(branch)
    raise TypeError(f"unknown branch {branch!r}")


@dataclass(frozen=True)
class SpecShapes:
    """The shapes of every branch of a spec, in spec order, and dense causal attention."""
    name: str
    branches: tuple[BranchShapes, ...]
    dense: DenseShapes = field(default_factory=_dense_shapes)

    def branch(self, name: str) -> BranchShapes:
        for b in self.branches:
            if b.name == name:
                return b
        raise KeyError(name)

    @property
    def keys(self) -> Expr:
        """Keys per query, all branches (a branch's keys count once per branch)."""
        return sp.Add(*[b.keys for b in self.branches])

    @property
    def keys_sum(self) -> Expr:
        return sp.Add(*[b.keys_sum for b in self.branches])


_SPEC_CACHE: dict = {}


def spec_shapes(spec: Spec) -> SpecShapes:
    """Shapes of every branch of ``spec`` (cached per canonical spec)."""
    key = spec.canonical()
    hit = _SPEC_CACHE.get(key)
    if hit is None:
        hit = SpecShapes(spec.name, tuple(branch_shapes(b, spec) for b in spec.branches))
        if len(_SPEC_CACHE) > 256:
            _SPEC_CACHE.clear()
        _SPEC_CACHE[key] = hit
    return hit


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


def _row(name, kind, n, keys_sum, keys_last, per_key_flops, per_key_elems, dims) -> CostRow:
    return CostRow(name, kind, n, keys_sum, keys_last,
                   flops=keys_sum * per_key_flops * dims.heads,
                   bytes=keys_sum * per_key_elems * dims.kv_heads * dims.dtype_bytes)


def cost(shapes: SpecShapes, T_value: int, dims: Dims) -> Cost:
    """Keys, forward FLOPs and K/V bytes of every branch (and dense causal attention)
    at sequence length ``T_value``, exactly (closed forms; fast for any T)."""
    n = int(T_value)
    dq, dv = dims.qk_dim, dims.v_dim
    last = max(n - 1, 0)
    rows = []
    for b in shapes.branches:
        if b.score_keys_sum != 0:
            rows.append(_row(f"{b.name} score", "score", n, evaluate(b.score_keys_sum, T=n),
                             evaluate(b.score_keys, t=last) if n else 0, 2 * dq, dq, dims))
        rows.append(_row(b.name, b.kind, n, evaluate(b.keys_sum, T=n),
                         evaluate(b.keys, t=last) if n else 0, 2 * dq + 2 * dv, dq + dv, dims))
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
