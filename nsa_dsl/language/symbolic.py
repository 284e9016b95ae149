"""Symbolic integers: sympy behind one module, with two faces (as Inductor's ``sizevars``):

* **queries that never raise** -- ``bounds``, ``statically_nonnegative``,
  ``statically_integer``, ``statically_divides``, ``statically_known_true``,
  ``evaluate``: each answers ``False``/``None`` when it cannot prove or compute;
* **a printer** -- ``render(expr, target="python"|"triton"|"text", names=...)``
  turns an integer expression into code the kernels paste (or text for people).

Symbols: ``T`` (sequence length), ``t`` (query position, ``0 <= t < T``), ``i``
(compressed block), ``j`` (selection block), ``Dqk``/``Dv`` (head dims). All
are non-negative integers. Closed-form sums over ``v = 0 .. N-1`` (``sum_floor``,
``sum_mod``, ``sum_min``) serve the per-query key counts of ``nsa_dsl.language.shapes``.
"""
from __future__ import annotations

import functools
import itertools
import math
from fractions import Fraction
from typing import Callable, Mapping, Optional, Union

import sympy as sp



Expr = sp.Expr
IntLike = Union[int, sp.Expr]

T = sp.Symbol("T", integer=True, nonnegative=True)
t = sp.Symbol("t", integer=True, nonnegative=True)
i = sp.Symbol("i", integer=True, nonnegative=True)
j = sp.Symbol("j", integer=True, nonnegative=True)
Dqk = sp.Symbol("Dqk", integer=True, positive=True)
Dv = sp.Symbol("Dv", integer=True, positive=True)


def as_expr(x) -> Expr:
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
        lo, hi = _bounds(as_expr(expr))
        return _to_sympy(lo), _to_sympy(hi)
    except Exception:  # never raise: unknown means unbounded
        return -sp.oo, sp.oo


def _lo(expr) -> "int | Fraction | float":
    try:
        return _bounds(as_expr(expr))[0]
    except Exception:
        return -_INF


def _hi(expr) -> "int | Fraction | float":
    try:
        return _bounds(as_expr(expr))[1]
    except Exception:
        return _INF


def statically_nonnegative(expr: IntLike) -> bool:
    """True iff ``expr >= 0`` is provable for every value of its symbols."""
    try:
        e = as_expr(expr)
        return bool(e.is_nonnegative) or _lo(e) >= 0
    except Exception:
        return False


def statically_positive(expr: IntLike) -> bool:
    """True iff ``expr > 0`` is provable."""
    try:
        e = as_expr(expr)
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
        return _integer_valued(as_expr(expr))
    except Exception:
        return False


def statically_divides(divisor: IntLike, expr: IntLike) -> bool:
    """True iff ``divisor`` provably divides ``expr`` (reads "divisor | expr"):
    ``statically_divides(16, 64*j + 32)`` is True, ``statically_divides(16, t)`` False."""
    try:
        d, e = as_expr(divisor), as_expr(expr)
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
        c = as_expr(cond)
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
        e = as_expr(expr)
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
    return _floor_normalized(as_expr(a) / as_expr(b))


def ceildiv(a: IntLike, b: IntLike) -> Expr:
    """ceil(a / b) for integer-valued a and positive integer b, as floor((a + b - 1)/b)."""
    a, b = as_expr(a), as_expr(b)
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
    e = as_expr(expr)
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


def smin(*a) -> Expr:
    return simplify(sp.Min(*[as_expr(x) for x in a], evaluate=False))


def smax(*a) -> Expr:
    return simplify(sp.Max(*[as_expr(x) for x in a], evaluate=False))


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
        e = as_expr(e)
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
        den = as_expr(den)
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
        num, den = as_expr(num), as_expr(den)
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
    return _Renderer(target, names).r(as_expr(expr))[0]


def lambdify_int(expr: IntLike, *symbols) -> Callable[..., int]:
    """A plain-Python function of ``symbols`` (default: sorted free symbols) that
    computes ``expr`` exactly on ints, through the python printer."""
    e = as_expr(expr)
    syms = symbols or tuple(sorted(e.free_symbols, key=lambda s: s.name))
    args = [f"_a{k}" for k in range(len(syms))]
    text = render(e, "python", {s: a for s, a in zip(syms, args)})
    return eval(f"lambda {', '.join(args)}: {text}", {"max": max, "min": min})  # noqa: S307


# ---------------------------------------------------------------------------
# Closed-form sums (all over v = 0 .. N-1, for integer N >= 0)
# ---------------------------------------------------------------------------

def sum_floor(N: Expr, d: IntLike) -> Expr:
    """sum floor(v/d) = d*q*(q - 1)/2 + (N - d*q)*q, q = floor(N/d)."""
    q = floordiv(N, d)
    return d * q * (q - 1) / 2 + (N - d * q) * q


def sum_mod(N: Expr, m: IntLike) -> Expr:
    """sum (v mod m) = m*(m - 1)/2*q + r*(r - 1)/2, q = floor(N/m), r = N - m*q."""
    q = floordiv(N, m)
    r = N - m * q
    return as_expr(m) * (m - 1) / 2 * q + r * (r - 1) / 2


def sum_min(N: Expr, c: IntLike) -> Expr:
    """sum min(v + 1, c) for c >= 0 = A*(A + 1)/2 + (N - A)*c, A = min(N, c)."""
    A = smin(N, c)
    return A * (A + 1) / 2 + (N - A) * c
