"""Semantic checks: every problem is a SpecError with a stable code, the span
of the offending text and a hint that suggests a fix.

Two kinds of checks live here:

* rules the parser consults while it lowers a block (``field_rule``,
  ``branch_rules``, ``param_rule``, ``check_fields``, ``check_params``,
  ``check_activation``): they catch what cannot be represented in the IR at
  all (an unknown parameter, a duplicate field, a missing value);
* ``problems(spec)`` / ``check_spec(spec)`` over a built ``Spec``: values,
  references between branches and the output.

The codes are documented in docs/LANGUAGE.md; tests and tools match on them,
so never renumber one.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterator, Optional, Union

from nsa_dsl.errors import SpecError
from nsa_dsl.language.ir import Compress, Indexer, Param, Select, Span, Spec, Window

MAX_SIZE = 2 ** 20      # largest block, stride, top_k, window, head count
MAX_DIM = 256           # largest head dimension the kernels support
DIM_MULTIPLE = 16       # tl.dot needs dims that are multiples of 16
MAX_GROUP = 64          # query heads per kv head the kernels pack into one tile
MAX_TOP_K = 64          # block top-k: the kernel keeps [rows, top_k, top_k] rank tiles in registers
MAX_TOKEN_TOP_K = 8192  # token top-k (score = an indexer): the gather kernels walk the list in tiles
MAX_QUERY_BLOCK = 128   # query_block: positions sharing one selection (dense query tiles)
MAX_SEGMENTS = 64       # block / stride of a compress branch that scores a select (segments per block)
MAX_SELECT_SEGMENTS = 256   # select block / stride of its score source
MAX_LEARNED_BLOCK = 512     # pool = linear | mlp: a Linear of block * head_dim inputs
MAX_NAME = 64           # characters of a name (it becomes part of kernel and module names)
ACTIVATIONS = ("sigmoid",)
COMBINERS = ("gate", "sum")
MEAN_POOL = "mean_pool"  # the score source that needs no compress branch

_REQUIRED = object()
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,%d}\Z" % (MAX_NAME - 1))


@dataclass(frozen=True)
class Rule:
    """What one field or branch parameter accepts."""
    type: str                           # "int" | "name" | "bool"
    default: object = _REQUIRED
    minimum: int = 1                    # sizes must be positive, counts may be 0
    choices: tuple[str, ...] = ()       # for fixed-vocabulary names
    example: str = ""                   # shown in hints

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


FIELDS: dict[str, Rule] = {
    "heads": Rule("int", None, example="64"),
    "kv_heads": Rule("int", None, example="4"),
    "qk_dim": Rule("int", None, example="128"),
    "v_dim": Rule("int", None, example="128"),
    "head_dim": Rule("int", None, example="128"),
    "causal": Rule("bool", True, example="true"),
}

BRANCH_PARAMS: dict[str, dict[str, Rule]] = {
    "compress": {
        "block": Rule("int", example="32"),
        "stride": Rule("int", example="16"),
        "pool": Rule("name", "mean", choices=("mean", "linear", "mlp"), example="mean"),
    },
    "select": {
        "block": Rule("int", example="64"),
        "top_k": Rule("int", example="16"),
        "score": Rule("name", example="cmp"),
        "keep_first": Rule("int", 1, minimum=0, example="1"),
        "keep_last": Rule("int", 2, minimum=0, example="2"),
        "query_block": Rule("int", 1, example="64"),
    },
    "window": {
        "size": Rule("int", example="512"),
        "sinks": Rule("int", 0, minimum=0, example="4"),
    },
    "indexer": {
        "heads": Rule("int", example="64"),
        "dim": Rule("int", example="128"),
    },
}

_EXAMPLE_CALL = {
    "compress": "compress(block = 32, stride = 16)",
    "select": "select(block = 64, top_k = 16, score = cmp)",
    "window": "window(size = 512)",
    "indexer": "indexer(heads = 64, dim = 128)",
}


# ---------------------------------------------------------------- helpers

def did_you_mean(word: str, candidates) -> Optional[str]:
    """'did you mean 'x'?' for close matches, else None."""
    close = difflib.get_close_matches(word, sorted(set(candidates)), n=2, cutoff=0.6)
    if not close:
        return None
    return "did you mean " + " or ".join(repr(c) for c in close) + "?"


def words(items) -> str:
    """'a', 'a or b', 'a, b or c'."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


def _nearest(candidates, target: int, n: int = 2) -> list[int]:
    """The ``n`` candidates closest to ``target``, ascending."""
    return sorted(sorted(candidates, key=lambda c: (abs(c - target), c))[:n])


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _err(code: str, message: str, span: Optional[Span], hint: Optional[str] = None) -> SpecError:
    return SpecError(code, message, span, hint)


def join_hints(*hints: Optional[str]) -> Optional[str]:
    return " ".join(h for h in hints if h) or None


# ------------------------------------------------- rules used while lowering

def field_rule(name: str, span: Span) -> Rule:
    if name in FIELDS:
        return FIELDS[name]
    if name in BRANCH_PARAMS:
        hint = f"declare a branch: branch NAME = {_EXAMPLE_CALL[name]}"
    elif any(name in rules for rules in BRANCH_PARAMS.values()):
        owners = words(k for k, rules in BRANCH_PARAMS.items() if name in rules)
        hint = f"{name} is a parameter of {owners}: write it inside the branch's parentheses"
    else:
        hint = join_hints(did_you_mean(name, FIELDS),
                           f"fields are {words(FIELDS)}; constants are declared with `let {name} = ...`")
    raise _err("E306", f"unknown field '{name}'", span, hint)


def branch_rules(kind: str, span: Span) -> dict[str, Rule]:
    if kind in BRANCH_PARAMS:
        return BRANCH_PARAMS[kind]
    hint = join_hints(did_you_mean(kind, BRANCH_PARAMS),
                       f"branch kinds are {words(BRANCH_PARAMS)}")
    raise _err("E308", f"unknown branch kind '{kind}'", span, hint)


def param_rule(kind: str, name: str, span: Span) -> Rule:
    rules = BRANCH_PARAMS[kind]
    if name in rules:
        return rules[name]
    hint = join_hints(did_you_mean(name, rules), f"{kind} takes {words(rules)}")
    raise _err("E307", f"{kind} has no parameter '{name}'", span, hint)


_DIMS = ("qk_dim", "v_dim", "head_dim")


def check_fields(fields: tuple[Param, ...]) -> None:
    """Duplicate fields, and head_dim next to the dims it sets."""
    seen: dict[str, Param] = {}
    for p in fields:
        if p.name in seen:
            raise _err("E304", f"field '{p.name}' is set twice", p.span,
                       f"it was first set on line {seen[p.name].span.line}; keep one")
        if p.name in _DIMS:
            clash = next((seen[d] for d in _DIMS if d in seen and "head_dim" in (d, p.name)), None)
            if clash is not None:
                raise _err("E313", f"'{p.name}' conflicts with '{clash.name}' on line {clash.span.line}",
                           p.span, "head_dim sets both qk_dim and v_dim: use head_dim alone, "
                                   "or qk_dim and v_dim")
        seen[p.name] = p


def check_params(kind: str, branch: str, params: tuple[Param, ...], call_span: Span) -> None:
    """Duplicate and missing parameters of one branch call."""
    seen: dict[str, Param] = {}
    for p in params:
        if p.name in seen:
            raise _err("E305", f"parameter '{p.name}' of branch {branch} is given twice", p.span,
                       f"it was first given on line {seen[p.name].span.line}; keep one")
        seen[p.name] = p
    missing = [n for n, r in BRANCH_PARAMS[kind].items() if r.required and n not in seen]
    if missing:
        what = "parameter" if len(missing) == 1 else "parameters"
        example = ", ".join(f"{n} = {BRANCH_PARAMS[kind][n].example}" for n in missing)
        raise _err("E309", f"{kind} branch {branch} is missing the {what} {words(missing)}",
                   call_span, f"add {example}; e.g. branch {branch} = {_EXAMPLE_CALL[kind]}")


def check_activation(name: str, span: Span, branch_names) -> None:
    """The first argument of gate(...) is its activation."""
    if name in ACTIVATIONS:
        return
    if name in branch_names:
        raise _err("E404", f"gate's first argument is its activation, not the branch '{name}'",
                   span, f"write gate(sigmoid, {name}, ...)")
    raise _err("E403", f"gate activation '{name}' is not supported", span,
               f"only {words(ACTIVATIONS)} is supported: gate(sigmoid, a, b, ...)")


# ------------------------------------------------------- checks over the IR

def check_spec(spec: Spec) -> Spec:
    """Raise the first problem of ``spec`` (in file order); return it unchanged."""
    found = problems(spec)
    if found:
        raise found[0]
    return spec


def problems(spec: Spec) -> list[SpecError]:
    """Every semantic problem of ``spec``, in the order they appear in the file. A Spec built by
    hand (not by the parser) gets the parser's own rules first: value types, choices, kinds."""
    typed = list(_types(spec))
    if typed:
        return typed
    found = [*_names(spec), *_fields(spec), *_branch_values(spec), *_scores(spec), *_output(spec)]

    def where(e: SpecError):
        return (e.span.line, e.span.column) if e.span else (0, 0)
    return sorted(found, key=where)


def _value_span(branch, name: str) -> Span:
    for p in branch.params:
        if p.name == name:
            return p.value_span
    return branch.span  # a default value: point at the branch


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _types(spec: Spec) -> Iterator[SpecError]:
    """What the parser guarantees by construction, checked for IR built by hand: known kinds,
    ints where numbers go, words from their choices, the output's combiner and activation."""
    for name in ("heads", "kv_heads", "qk_dim", "v_dim"):
        value = getattr(spec, name)
        if value is not None and not _is_int(value):
            yield _err("E213", f"{name} must be an integer, got {value!r}", spec.span)
    if not isinstance(spec.causal, bool):
        yield _err("E213", f"causal must be true or false, got {spec.causal!r}", spec.span)
    for b in spec.branches:
        kind = getattr(b, "kind", None)
        if kind not in BRANCH_PARAMS or not isinstance(b, (Compress, Select, Window, Indexer)):
            yield _err("E308", f"unknown branch kind {kind!r}", getattr(b, "span", spec.span),
                       f"branch kinds are {words(BRANCH_PARAMS)}")
            continue
        if not isinstance(b.name, str):
            yield _err("E116", f"branch name {b.name!r} is not a name", b.span)
        for pname, rule in BRANCH_PARAMS[kind].items():
            value = getattr(b, pname)
            if rule.type == "int" and not _is_int(value):
                yield _err("E213", f"branch '{b.name}': {pname} must be an integer, got {value!r}",
                           _value_span(b, pname))
            elif rule.type == "name" and not isinstance(value, str):
                yield _err("E213", f"branch '{b.name}': {pname} takes a name, got {value!r}",
                           _value_span(b, pname))
    out = spec.output
    if out.kind not in (*COMBINERS, "branch"):
        yield _err("E400", f"unknown output combiner {out.kind!r}", out.span, f"use {words(COMBINERS)}")
    elif out.kind == "gate" and out.activation not in ACTIVATIONS:
        yield _err("E403", f"gate activation {out.activation!r} is not supported", out.span,
                   f"only {words(ACTIVATIONS)} is supported: gate(sigmoid, a, b, ...)")
    elif out.kind != "gate" and out.activation is not None:
        yield _err("E403", f"output = {out.kind}(...) takes no activation", out.span)
    elif out.kind == "branch" and len(out.branches) != 1:
        yield _err("E404", "an output that names one branch names exactly one", out.span)
    if not all(isinstance(n, str) for n in out.branches):
        yield _err("E310", f"output branches must be branch names, got {list(out.branches)!r}", out.span)


def _names(spec: Spec) -> Iterator[SpecError]:
    seen: dict[str, Union[Compress, Select, Window]] = {}
    for b in spec.branches:
        if not _IDENTIFIER.match(b.name):
            yield _err("E116", f"branch name {b.name[:80]!r} is not a name of at most {MAX_NAME} characters",
                       b.span, "names are letters, digits and '_', starting with a letter or '_'")
        if b.name == MEAN_POOL:
            yield _err("E312", f"'{MEAN_POOL}' is reserved and cannot name a branch", b.span,
                       f"score = {MEAN_POOL} selects blocks by their mean key; rename the branch")
        if b.name in seen:
            yield _err("E303", f"branch '{b.name}' is declared twice in {spec.name}", b.span,
                       f"it was first declared on line {seen[b.name].span.line}; rename one")
        seen.setdefault(b.name, b)


def _valid(size: int) -> bool:
    return 0 < size <= MAX_SIZE


def _size(name: str, value: int, span: Span, minimum: int = 1) -> Iterator[SpecError]:
    if value < minimum:
        if minimum > 0:
            yield _err("E203", f"{name} must be positive, got {value}", span,
                       f"{name} counts keys or heads; use a value of at least {minimum}")
        else:
            yield _err("E206", f"{name} must be zero or more, got {value}", span)
    elif value > MAX_SIZE:
        yield _err("E207", f"{name} = {value} is too large (the limit is {MAX_SIZE})", span)


def _fields(spec: Spec) -> Iterator[SpecError]:
    spans = dict(spec.field_spans)

    def where(name):  # qk_dim/v_dim may come from head_dim
        return (name, spans[name]) if name in spans else ("head_dim", spans.get("head_dim", spec.span))

    for name in ("heads", "kv_heads"):
        value = getattr(spec, name)
        if value is not None:
            yield from _size(name, value, spans.get(name, spec.span))
    for name in ("qk_dim", "v_dim"):
        value = getattr(spec, name)
        if value is None:
            continue
        label, span = where(name)
        if value <= 0:
            yield _err("E203", f"{label} must be positive, got {value}", span,
                       f"head dimensions are multiples of {DIM_MULTIPLE}, e.g. 64 or 128")
        else:
            yield from _dim(label, value, span, "head")
    h, kv = spec.heads, spec.kv_heads
    if h is not None and kv is not None and _valid(h) and _valid(kv):
        if h % kv:
            near = _nearest(_divisors(h), kv)
            yield _err("E209", f"heads = {h} is not a multiple of kv_heads = {kv}",
                       spans.get("kv_heads", spec.span),
                       f"each kv head serves heads / kv_heads query heads; try kv_heads = "
                       f"{words(str(d) for d in near)}")
        elif h // kv > MAX_GROUP:
            yield _err("E215", f"heads / kv_heads = {h // kv} query heads per kv head; "
                               f"the kernels support at most {MAX_GROUP}",
                       spans.get("kv_heads", spec.span),
                       f"try kv_heads = {min(d for d in _divisors(h) if h // d <= MAX_GROUP)}")


def _branch_values(spec: Spec) -> Iterator[SpecError]:
    for b in spec.branches:
        ok = True
        for pname, rule in BRANCH_PARAMS[b.kind].items():
            value = getattr(b, pname)
            if rule.type == "int":
                errs = list(_size(pname, value, _value_span(b, pname), rule.minimum))
                ok = ok and not errs
                yield from errs
            elif rule.choices and value not in rule.choices:
                yield _err("E214", f"{pname} = {value} is not one of {words(rule.choices)}",
                           _value_span(b, pname),
                           join_hints(did_you_mean(value, rule.choices),
                                       f"write {pname} = {words(rule.choices)}"))
        if not ok:
            continue  # divisibility below needs valid sizes
        if isinstance(b, Compress) and b.block % b.stride:
            near = _nearest([d for d in _divisors(b.block)], b.stride)
            yield _err("E204", f"stride {b.stride} does not divide block {b.block}",
                       _value_span(b, "stride"), f"try {words(str(d) for d in near)}")
        if isinstance(b, Select):
            yield from _select_values(spec, b)
        if isinstance(b, Indexer):
            yield from _dim("dim", b.dim, _value_span(b, "dim"), "the indexer's")
        if isinstance(b, Compress) and b.pool != "mean" and b.block > MAX_LEARNED_BLOCK:
            yield _err("E219", f"pool = {b.pool} over blocks of {b.block} keys: the learned pooling is a "
                               f"Linear of block * head_dim inputs; at most {MAX_LEARNED_BLOCK} keys",
                       _value_span(b, "block"), f"use pool = mean, or block <= {MAX_LEARNED_BLOCK}")
        if isinstance(b, Select) and b.top_k < b.keep_first + b.keep_last:
            need = b.keep_first + b.keep_last
            yield _err("E208", f"top_k = {b.top_k} is less than keep_first + keep_last = "
                               f"{b.keep_first} + {b.keep_last}", _value_span(b, "top_k"),
                       f"the forced blocks count toward top_k: raise top_k to {need} or more, "
                       f"or lower keep_first / keep_last (defaults 1 and 2)")


def _select_values(spec: Spec, b: Select) -> Iterator[SpecError]:
    """top_k within what the kernels rank, query_block a power of two up to MAX_QUERY_BLOCK."""
    source = {x.name: x for x in spec.branches}.get(b.score)
    tokens = isinstance(source, Indexer)
    limit = MAX_TOKEN_TOP_K if tokens else MAX_TOP_K
    if b.top_k > limit:
        what = "tokens the indexer's gather kernels attend" if tokens else "blocks the selection kernels rank"
        yield _err("E217", f"top_k = {b.top_k} is above {limit}, the most {what} per query",
                   _value_span(b, "top_k"),
                   f"use top_k <= {limit}" + ("" if tokens else " with larger blocks (top_k * block keys are attended)"))
    Q = b.query_block
    if Q > MAX_QUERY_BLOCK or Q & (Q - 1):
        below = 1 << (min(Q, MAX_QUERY_BLOCK).bit_length() - 1)
        yield _err("E220", f"query_block = {Q} must be a power of two from 1 to {MAX_QUERY_BLOCK}",
                   _value_span(b, "query_block"),
                   f"try {words(str(x) for x in sorted({below, min(2 * below, MAX_QUERY_BLOCK)}))}")


def _dim(label: str, value: int, span: Span, whose: str) -> Iterator[SpecError]:
    """A tl.dot width: a multiple of DIM_MULTIPLE up to MAX_DIM."""
    if value > MAX_DIM:
        yield _err("E211", f"{label} = {value} is above {MAX_DIM}, the largest {whose} dimension the "
                           "kernels support", span, f"use at most {MAX_DIM}")
    elif value % DIM_MULTIPLE:
        near = _nearest([m for m in range(DIM_MULTIPLE, MAX_DIM + 1, DIM_MULTIPLE)], value)
        yield _err("E210", f"{label} = {value} is not a multiple of {DIM_MULTIPLE}", span,
                   f"the kernels tile {whose} dimensions by {DIM_MULTIPLE}; try {words(str(m) for m in near)}")


def _scores(spec: Spec) -> Iterator[SpecError]:
    names = {b.name: b for b in spec.branches}
    for b in spec.of_kind("select"):
        if b.score == MEAN_POOL:
            continue
        span = _value_span(b, "score")
        compress_names = [c.name for c in spec.of_kind("compress")]
        source = names.get(b.score)
        if source is None:
            options = words([*compress_names, MEAN_POOL])
            yield _err("E310", f"score = {b.score}: {spec.name} has no branch '{b.score}'", span,
                       join_hints(did_you_mean(b.score, [*names, MEAN_POOL]),
                                   f"score takes {options}"))
        elif isinstance(source, Indexer):
            if b.block != 1:
                yield _err("E221", f"score = {b.score} is an indexer: it scores single tokens, so "
                                   f"{b.name} needs block = 1, not {b.block}", _value_span(b, "block"),
                           "write select(block = 1, top_k = 2048, score = " + b.score + ")")
            elif b.query_block != 1:
                yield _err("E221", f"score = {b.score} is an indexer: every position chooses its own "
                                   "tokens, so query_block must be 1", _value_span(b, "query_block"),
                           "drop query_block, or score blocks with a compress branch or mean_pool")
        elif not isinstance(source, Compress):
            options = words([*compress_names, *[x.name for x in spec.of_kind("indexer")], MEAN_POOL])
            yield _err("E311", f"score = {b.score} names a {source.kind} branch; "
                               "blocks are scored by a compress branch, an indexer or mean_pool", span,
                       f"use score = {options}")
        elif _valid(source.stride) and _valid(source.block) and source.block // source.stride > MAX_SEGMENTS:
            yield _err("E218", f"compress {source.name} scores {b.name} with block / stride = "
                               f"{source.block // source.stride} segments per block; the scoring kernels "
                               f"add at most {MAX_SEGMENTS}", _value_span(source, "stride"),
                       f"raise stride to {-(-source.block // MAX_SEGMENTS)} or more")
        elif _valid(source.stride) and _valid(b.block) and b.block % source.stride == 0 \
                and b.block // source.stride > MAX_SELECT_SEGMENTS:
            yield _err("E218", f"select block {b.block} spans {b.block // source.stride} strides of its "
                               f"score source {source.name}; the scoring kernels add at most "
                               f"{MAX_SELECT_SEGMENTS}", _value_span(b, "block"),
                       f"use block <= {MAX_SELECT_SEGMENTS * source.stride}, or a larger stride")
        elif _valid(source.stride) and _valid(b.block) and b.block % source.stride:
            d = source.stride
            below = b.block // d * d
            near = [m for m in (below, below + d) if m > 0]
            yield _err("E205", f"select block {b.block} is not a multiple of the stride {d} "
                               f"of its score source {source.name}", _value_span(b, "block"),
                       f"selection blocks are scored by whole compression strides; try block = "
                       f"{words(str(m) for m in near)}")


def _output(spec: Spec) -> Iterator[SpecError]:
    out = spec.output
    names = {b.name: b for b in spec.branches}
    spans = list(out.branch_spans) + [out.span] * (len(out.branches) - len(out.branch_spans))
    seen: set[str] = set()
    unknown = False
    for name, span in zip(out.branches, spans):
        if isinstance(names.get(name), Indexer):
            yield _err("E223", f"output names '{name}', an indexer: it scores a select branch and has "
                               "no output of its own", span,
                       f"output the select branch it scores (select(block = 1, score = {name}, ...))")
        elif name not in names:
            unknown = True
            yield _err("E310", f"output names '{name}', which is not a branch of {spec.name}", span,
                       join_hints(did_you_mean(name, names),
                                   f"branches are {words(names)}" if names else None))
        elif name in seen:
            yield _err("E401", f"output lists branch '{name}' twice", span,
                       "list each branch once; gate values are per branch")
        seen.add(name)
    if unknown:
        return  # "never used" would only echo the misspelt name
    reachable = set(out.branches)
    reachable |= {b.score for b in spec.of_kind("select") if b.name in reachable}
    for b in spec.branches:
        if b.name not in reachable:
            fixed = [*dict.fromkeys(out.branches), b.name]
            if out.kind == "gate":
                suggestion = f"gate(sigmoid, {', '.join(fixed)})"
            else:
                suggestion = f"sum({', '.join(fixed)})"
            yield _err("E402", f"branch '{b.name}' is never used", b.span,
                       f"add it to the output (output = {suggestion}) or delete it")
