"""Spec text -> checked IR.

    parse_source(text, file) -> SpecFile   # parse, evaluate lets, lower, check
    read_spec_text(path) -> str            # read a spec file, or a SpecError
    pick_spec(specfile, name) -> Spec      # one block of a file

Every problem surfaces as a SpecError carrying the source text, so it renders
with the offending line and a caret; lark's exceptions never escape.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Optional

from lark import Lark, Token, Tree
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from nsa_dsl.errors import SpecError
from nsa_dsl.language import checks
from nsa_dsl.language.ir import Compress, Indexer, Output, Param, Select, Span, Spec, SpecFile, Window

MAX_BYTES = 1 << 20     # larger files are refused before reading them whole
# lark's LALR parser runs at roughly 50k tokens/s; real specs have a few
# hundred tokens, and this cap keeps the worst case well under a second.
MAX_TOKENS = 10_000
MAX_NESTING = 64        # parentheses / unary signs inside one expression
MAX_VALUE = 2 ** 62     # any literal or intermediate result beyond this is absurd

_BRANCH_TYPES = {"compress": Compress, "select": Select, "window": Window, "indexer": Indexer}
_KEYWORDS = ("ATTENTION", "LET", "BRANCH", "OUTPUT")
_COMMENT_RE = re.compile(r"#[^\n]*")
_TOKEN_RE = re.compile(r"\w+|//|\S")


# ------------------------------------------------------------------ public

def parse_source(text: str, file: str = "<string>") -> SpecFile:
    """Parse and check every ``attention`` block of ``text``; raise SpecError."""
    if not isinstance(text, str):
        raise TypeError(f"spec text must be str, not {type(text).__name__}")
    try:
        return _Lowering(text, file).file(_syntax_tree(text, file))
    except SpecError as e:
        if e.source is None:  # checks raise without the text; attach it for the caret
            raise SpecError(e.code, e.message, e.span, e.hint, text) from None
        raise
    except RecursionError:  # belt and braces: nothing here should recurse deeply
        raise SpecError("E103", "the spec is nested too deeply", None, None, text) from None


def read_spec_text(path) -> str:
    """The text of a spec file; SpecError (E104-E106) if it is missing, too large or not text."""
    name = os.fspath(path)
    try:
        if os.path.isdir(name):
            raise SpecError("E105", f"cannot read '{name}': it is a directory",
                            hint="pass a .nsa file")
        with open(name, "rb") as f:
            data = f.read(MAX_BYTES + 1)  # bounded: the path may be a device or a pipe
    except FileNotFoundError:
        raise SpecError("E105", f"cannot read '{name}': no such file",
                        hint="check the path; spec files usually end in .nsa") from None
    except PermissionError:
        raise SpecError("E105", f"cannot read '{name}': permission denied") from None
    except OSError as e:
        raise SpecError("E105", f"cannot read '{name}': {e.strerror or e}") from None
    if len(data) > MAX_BYTES:
        raise SpecError("E104", f"'{name}' is larger than {MAX_BYTES} bytes; "
                                "it is not a spec file", hint="spec files are a few lines long")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise SpecError("E106", f"'{name}' is not UTF-8 text (byte 0x{data[e.start]:02x} at "
                                f"line {line}, column {column})",
                        hint="save the spec as UTF-8") from None


def pick_spec(specfile: SpecFile, name: Optional[str] = None) -> Spec:
    """The block called ``name``; the only block when ``name`` is None."""
    names = [s.name for s in specfile.specs]
    if name is None:
        if len(specfile.specs) == 1:
            return specfile.specs[0]
        raise SpecError("E110", f"{specfile.file} declares {len(names)} attention blocks "
                                f"({', '.join(names)}); say which one to use",
                        hint=f"pass name=..., or --name on the command line, e.g. --name {names[0]}")
    try:
        return specfile.get(name)
    except KeyError:
        raise SpecError("E111", f"{specfile.file} has no attention block '{name}'",
                        hint=checks.join_hints(checks.did_you_mean(name, names),
                                                f"it declares {', '.join(names)}")) from None


def as_spec(spec, name: Optional[str] = None) -> Spec:
    """The one rule by which the API takes a spec: a ``Spec`` as it is; a ``SpecFile`` (its block
    ``name``, or its only one); a path (``os.PathLike``, or a string naming an existing file) is
    read and parsed; any other string is spec text when it holds a ``{`` (every block does), else
    a path (which then fails to read, E105)."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, SpecFile):
        return pick_spec(spec, name)
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and (os.path.isfile(spec) or "{" not in spec)):
        return pick_spec(parse_source(read_spec_text(spec), str(spec)), name)
    if isinstance(spec, str):
        return pick_spec(parse_source(spec), name)
    raise SpecError("E600", f"expected a Spec, a .nsa file's path or spec text, got "
                            f"{'None' if spec is None else type(spec).__name__}",
                    hint="nsa_dsl.load('examples/nsa_paper_mean.nsa'), nsa_dsl.parse(text), or the path itself")


# ------------------------------------------------------------------ syntax

@functools.lru_cache(maxsize=None)
def _lark() -> Lark:
    return Lark.open("grammar.lark", rel_to=__file__, propagate_positions=True, parser="lalr")


def _syntax_tree(text: str, file: str) -> Tree:
    if len(text) > MAX_BYTES:
        raise SpecError("E104", f"{file} is longer than {MAX_BYTES} characters; it is not a spec",
                        hint="spec files are a few lines long")
    n = 0
    for _ in _TOKEN_RE.finditer(_COMMENT_RE.sub("", text)):
        n += 1
        if n > MAX_TOKENS:
            raise SpecError("E104", f"{file} has more than {MAX_TOKENS} tokens; it is not a spec",
                            hint="spec files are a few lines long")
    # Comments become spaces before lark sees them: positions stay the same (a
    # comment never spans lines), and a file of many comment lines lexes as one
    # blank instead of a token per line.
    blanked = _COMMENT_RE.sub(lambda m: " " * len(m.group()), text)
    try:
        return _lark().parse(blanked)
    except UnexpectedInput as e:
        raise _syntax_error(e, text, file) from None
    except LarkError as e:  # not expected from LALR parsing, but never leak lark
        raise SpecError("E100", f"cannot parse the spec ({type(e).__name__})",
                        Span(file, 1, 1, 1, 1)) from None


def _syntax_error(e: UnexpectedInput, text: str, file: str) -> SpecError:
    stack = _value_stack(e)
    if isinstance(e, UnexpectedCharacters):
        char = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
        span = Span(file, e.line, e.column, e.line, e.column + 1)
        return SpecError("E101", f"unexpected character {_show_char(char)}{_context(stack)}",
                         span, _char_hint(char))
    if isinstance(e, UnexpectedToken):
        tok = e.token
        accepts = _accepts(e)
        if tok.type == "$END":
            line, column = _end_of(_COMMENT_RE.sub("", text))  # not after a trailing comment
            return SpecError("E102", f"the file ends early: expected {_expected(accepts)}"
                                     f"{_context(stack)}",
                             Span(file, line, column, line, column + 1),
                             "close the attention block with '}'" if "RBRACE" in accepts
                             else "is a closing ')' missing?" if "RPAR" in accepts
                             else "the last statement is incomplete")
        span = Span(file, tok.line, tok.column, tok.end_line or tok.line,
                    tok.end_column or tok.column + 1)
        return SpecError("E100", f"expected {_expected(accepts)}{_context(stack)}, "
                                 f"found {_show_token(tok)}", span, _token_hint(tok, accepts, stack))
    return SpecError("E100", "cannot parse the spec", Span(file, e.line, e.column, e.line, e.column + 1))


def _value_stack(e: UnexpectedInput) -> list:
    ip = getattr(e, "interactive_parser", None)
    try:
        return list(ip.parser_state.value_stack) if ip is not None else []
    except AttributeError:
        return []


def _accepts(e: UnexpectedToken) -> set[str]:
    try:  # exact: the interactive parser replays the reductions (LALR's expected set is merged)
        return set(e.accepts or e.expected)
    except LarkError:
        return set(e.expected)


def _end_of(text: str) -> tuple[int, int]:
    """Line and column just after the last non-blank character."""
    body = text.rstrip()
    return body.count("\n") + 1, len(body) - (body.rfind("\n") + 1) + 1


@functools.lru_cache(maxsize=None)
def _literals() -> dict[str, str]:
    return {t.name: t.pattern.value for t in _lark().terminals if t.pattern.type == "str"}


def _expected(accepts: set[str]) -> str:
    acc, lit, parts = set(accepts), _literals(), []
    if {"INT", "LPAR"} <= acc:
        parts.append("a value")
        acc -= {"INT", "NAME", "LPAR", "MINUS", "PLUS"}
    if {"BRANCH", "OUTPUT"} <= acc:
        parts.append("a new line of the block")
        acc -= {"BRANCH", "OUTPUT", "LET", "NAME"}
    ops = {n for n in acc if lit.get(n) in ("+", "-", "*", "/", "//", "%")}
    if ops:
        parts.append("an operator")
        acc -= ops
    names = {"NAME": "a name", "INT": "a number", "$END": "the end of the file"}
    for n in sorted(acc, key=lambda n: (n == "$END", n in lit, n)):
        if n in names:
            parts.append(names[n])
        elif n in lit:
            parts.append(f"'{lit[n]}'")
    return checks.words(parts) or "something else"


def _context(stack: list) -> str:
    """' after branch name 'cmp'' and the like, from the tokens just shifted."""
    if not stack or not isinstance(stack[-1], Token):
        return ""
    last = stack[-1]
    prev = stack[-2] if len(stack) > 1 and isinstance(stack[-2], Token) else None
    if last.type == "NAME" and prev is not None:
        if prev.type == "BRANCH":
            return f" after branch name '{last}'"
        if prev.type == "LET":
            return f" after 'let {last}'"
        if prev.type == "ATTENTION":
            return f" after 'attention {last}'"
    return f" after {_show_token(last)}"


def _show_token(tok: Token) -> str:
    if tok.type == "NAME":
        return f"name '{tok}'"
    if tok.type == "INT":
        return f"number {tok if len(tok) <= 20 else tok[:20] + '...'}"
    if tok.type in _KEYWORDS:
        return f"keyword '{tok}'"
    return f"'{tok}'"


def _show_char(c: str) -> str:
    if not c:
        return "at the end"
    if c.isascii() and c.isprintable():
        return f"'{c}'"
    return f"{c!r} (U+{ord(c):04X})"


def _char_hint(c: str) -> Optional[str]:
    if c == ":":
        return "write NAME = VALUE, with '=' rather than ':'"
    if c == ".":
        return "values are whole numbers (no decimals) or bare names"
    if c in "\"'`":
        return "names are written bare, without quotes: pool = mean"
    if c == ";":
        return "statements need no ';'; start the next one on a new line"
    if c == "\0":
        return "the file contains a NUL byte; is it a text file?"
    if c in "!<>&|^~=[]@$\\?":
        return "expressions use + - * / // % and parentheses"
    if c.isalpha():
        return "names use ASCII letters, digits and '_'"
    return None


def _token_hint(tok: Token, accepts: set[str], stack: list) -> Optional[str]:
    last = stack[-1] if stack and isinstance(stack[-1], Token) else None
    prev = stack[-2] if len(stack) > 1 and isinstance(stack[-2], Token) else None
    if tok.type in _KEYWORDS and "NAME" in accepts:
        return f"'{tok}' is a keyword; choose another name"
    if tok.type == "ATTENTION" and "RBRACE" in accepts:
        return "close the previous attention block with '}'"
    if last is not None and last == "attention" and tok.type == "NAME":
        return "close the previous attention block with '}' before starting another"
    if last is not None and last.type == "NAME" and prev is not None and prev.type == "BRANCH":
        return f"write branch {last} = compress(...), select(...) or window(...)"
    if tok.type == "STAR" and last is not None and last.type == "STAR":
        return "there is no power operator: write 2 * 2 * 2, or use a let"
    if tok.type == "INT" and "NAME" in accepts and last is not None and last.type in ("LPAR", "COMMA"):
        return "parameters are named: compress(block = 32, stride = 16)"
    if tok.type == "RBRACE" and "RPAR" in accepts:
        return "is a ')' missing?"
    if "COMMA" in accepts and "RPAR" in accepts:
        return "separate the items in parentheses with ','"
    if accepts == {"EQUAL"} and last is not None and last.type == "NAME":
        return f"write {last} = VALUE"
    if "BRANCH" in accepts and "RBRACE" in accepts:
        return "each line of a block is NAME = VALUE, let, branch or output"
    return None


# ---------------------------------------------------------------- lowering

class _Lowering:
    """Walks the lark tree once: evaluates lets and builds frozen IR with spans."""

    def __init__(self, text: str, file: str):
        self.text = text
        self.file_name = file
        self.lets: dict[str, tuple[int, Span]] = {}     # top-level lets seen so far
        self.all_lets: dict[str, list[tuple[int, Optional[str]]]] = {}  # for hints
        self.branch_names: tuple[str, ...] = ()         # of the block being lowered

    def span(self, node) -> Span:
        if isinstance(node, Token):
            return Span(self.file_name, node.line, node.column, node.end_line, node.end_column)
        m = node.meta
        return Span(self.file_name, m.line, m.column, m.end_line, m.end_column)

    # -- file and blocks

    def file(self, tree: Tree) -> SpecFile:
        for item in tree.children:  # every let, for "defined later" hints
            lets = [item] if item.data == "let" else [c for c in item.children
                                                     if isinstance(c, Tree) and c.data == "let"]
            owner = None if item.data == "let" else str(item.children[0])
            for let in lets:
                self.all_lets.setdefault(str(let.children[0]), []).append(
                    (let.children[0].line, owner))
        specs: list[Spec] = []
        for item in tree.children:
            if item.data == "let":
                self.let(item, self.lets)
                continue
            name = item.children[0]
            first = next((s for s in specs if s.name == name), None)
            if first is not None:
                raise SpecError("E302", f"attention block '{name}' is declared twice", self.span(name),
                                f"it was first declared on line {first.span.line}; rename one")
            specs.append(self.block(item))
        if not specs:
            raise SpecError("E107", "the file declares no attention block", Span(self.file_name, 1, 1, 1, 1),
                            "declare one: attention NAME { branch swa = window(size = 512)  output = swa }")
        return SpecFile(tuple(specs), self.file_name, self.text)

    def block(self, tree: Tree) -> Spec:
        name, *stmts = tree.children
        env = dict(self.lets)  # block lets are local to the block
        self.branch_names = tuple(str(s.children[0]) for s in stmts if s.data == "branch")
        fields: list[Param] = []
        branches = []
        outputs = []
        for st in stmts:
            if st.data == "let":
                self.let(st, env)
            elif st.data == "field":
                fields.append(self.field(st, env))
            elif st.data == "branch":
                branches.append(self.branch(st, env))
            else:
                outputs.append(st)
        checks.check_fields(tuple(fields))
        if not branches:
            raise SpecError("E108", f"attention block '{name}' declares no branch", self.span(name),
                            "add one, e.g. branch swa = window(size = 512), and output = swa")
        if not outputs:
            raise SpecError("E405", f"attention block '{name}' has no output", self.span(name),
                            f"add: output = {self._default_output(branches)}")
        if len(outputs) > 1:
            raise SpecError("E406", "output is declared twice", self.span(outputs[1]),
                            f"it was first declared on line {outputs[0].meta.line}; keep one")
        values = {p.name: p.value for p in fields}
        return checks.check_spec(Spec(
            name=str(name),
            heads=values.get("heads"),
            kv_heads=values.get("kv_heads"),
            qk_dim=values.get("qk_dim", values.get("head_dim")),
            v_dim=values.get("v_dim", values.get("head_dim")),
            causal=values.get("causal", True),
            branches=tuple(branches),
            output=self.output(outputs[0]),
            span=self.span(tree),
            source=self.text,
            # value spans of the fields as written; head_dim stands for both dims
            field_spans=tuple((p.name, p.value_span) for p in fields),
        ))

    @staticmethod
    def _default_output(branches) -> str:
        names = [b.name for b in branches if not isinstance(b, Indexer)]
        scores = {b.score for b in branches if isinstance(b, Select)}
        names = [n for n in names if n not in scores] or names
        return names[0] if len(names) == 1 else f"gate(sigmoid, {', '.join(names)})"

    # -- statements

    def let(self, tree: Tree, env: dict) -> None:
        name, expr = tree.children
        if str(name) in env:
            raise SpecError("E301", f"'{name}' is already defined", self.span(name),
                            f"it was defined on line {env[str(name)][1].line}; lets cannot be redefined")
        env[str(name)] = (self.eval(expr, env), self.span(name))

    def field(self, tree: Tree, env: dict) -> Param:
        name, expr = tree.children
        rule = checks.field_rule(str(name), self.span(name))
        return Param(str(name), self.value(rule, str(name), expr, env), self.span(tree), self.span(expr))

    def branch(self, tree: Tree, env: dict):
        name, kind, *args = tree.children
        checks.branch_rules(str(kind), self.span(kind))
        params = []
        for arg in args:
            pname, expr = arg.children
            rule = checks.param_rule(str(kind), str(pname), self.span(pname))
            params.append(Param(str(pname), self.value(rule, str(pname), expr, env),
                                self.span(arg), self.span(expr)))
        end = self.span(tree)
        call = Span(self.file_name, kind.line, kind.column, end.end_line, end.end_column)
        checks.check_params(str(kind), str(name), tuple(params), call)
        values = {n: r.default for n, r in checks.BRANCH_PARAMS[str(kind)].items() if not r.required}
        values.update((p.name, p.value) for p in params)
        return _BRANCH_TYPES[str(kind)](name=str(name), span=self.span(tree), params=tuple(params), **values)

    def output(self, tree: Tree) -> Output:
        if tree.data == "output_name":
            (name,) = tree.children
            return Output("branch", (str(name),), None, self.span(tree), (self.span(name),))
        combiner, *names = tree.children
        call = self.span(tree)
        if combiner not in checks.COMBINERS:
            raise SpecError("E400", f"unknown output combiner '{combiner}'", self.span(combiner),
                            checks.join_hints(checks.did_you_mean(str(combiner), checks.COMBINERS),
                                               "write gate(sigmoid, a, b), sum(a, b) or one branch name"))
        activation = None
        if combiner == "gate":
            if not names:
                raise SpecError("E404", "gate() names no activation and no branch", call,
                                "write gate(sigmoid, a, b, ...)")
            act, *names = names
            checks.check_activation(str(act), self.span(act), self.branch_names)
            activation = str(act)
        if not names:
            raise SpecError("E404", f"{combiner}(...) combines no branch", call,
                            f"list the branches to combine: {combiner}("
                            + ("sigmoid, " if combiner == "gate" else "")
                            + ", ".join(self.branch_names or ("a", "b")) + ")")
        return Output(str(combiner), tuple(str(n) for n in names), activation, call,
                      tuple(self.span(n) for n in names))

    # -- values and expressions

    def value(self, rule: checks.Rule, name: str, expr, env: dict):
        """Evaluate ``expr`` as the ``rule`` of parameter/field ``name`` wants."""
        if rule.type == "int":
            return self.eval(expr, env)
        bare = str(expr.children[0]) if expr.data == "ref" else None
        if rule.type == "bool":
            if bare in ("true", "false"):
                return bare == "true"
            raise SpecError("E213", f"{name} must be true or false", self.span(expr),
                            f"write {name} = true")
        if bare is None:
            options = checks.words(rule.choices) if rule.choices else "a branch name or mean_pool"
            raise SpecError("E213", f"{name} takes a name ({options}), not a number or an expression",
                            self.span(expr), f"write {name} = {rule.example}")
        return bare

    def eval(self, expr: Tree, env: dict) -> int:
        """Exact integer value of ``expr``. Iterative: ``1 + 1 + ... + 1`` is a tree
        as deep as it is long, too deep for recursion."""
        todo = [(expr, 0, False)]
        values: list[int] = []
        while todo:
            node, depth, ready = todo.pop()
            kind = node.data
            if kind == "number":
                values.append(self.number(node.children[0]))
            elif kind == "ref":
                values.append(self.ref(node.children[0], env))
            elif not ready:
                if kind in ("paren", "neg", "pos"):
                    depth += 1
                    if depth > MAX_NESTING:
                        raise SpecError("E103", f"expression nested more than {MAX_NESTING} deep",
                                        self.span(node), "simplify it, or split it with lets")
                todo.append((node, depth, True))
                todo.extend((c, depth, False) for c in reversed(node.children))
            elif kind == "neg":
                values.append(self.bounded(-values.pop(), node))
            elif kind not in ("paren", "pos"):
                b, a = values.pop(), values.pop()
                values.append(self.binary(kind, a, b, node))
        return values[0]

    def binary(self, op: str, a: int, b: int, node: Tree) -> int:
        if op == "add":
            r = a + b
        elif op == "sub":
            r = a - b
        elif op == "mul":
            r = a * b
        else:
            sym = {"div": "/", "floordiv": "//", "mod": "%"}[op]
            if b == 0:
                raise SpecError("E201", f"division by zero ({a} {sym} 0)", self.span(node))
            if op == "div" and a % b:
                raise SpecError("E202", f"{a} / {b} is not a whole number", self.span(node),
                                f"'/' must divide exactly; write {a} // {b} to round down "
                                f"(= {a // b})")
            r = a % b if op == "mod" else a // b
        return self.bounded(r, node)

    def bounded(self, value: int, node) -> int:
        if abs(value) > MAX_VALUE:
            raise SpecError("E200", f"value too large ({'-' if value < 0 else ''}more than 2**62)",
                            self.span(node), "sizes are at most 2**20")
        return value

    def number(self, tok: Token) -> int:
        digits = str(tok).replace("_", "").lstrip("0")
        if len(digits) > 19:  # before int(): Python refuses very long digit strings
            raise SpecError("E200", f"number {tok[:20]}... is too large", self.span(tok),
                            "sizes are at most 2**20")
        return self.bounded(int(digits or "0"), tok)

    def ref(self, tok: Token, env: dict) -> int:
        name = str(tok)
        if name in env:
            return env[name][0]
        span = self.span(tok)
        if name in ("true", "false"):
            raise SpecError("E213", f"expected a number, found {name}", span,
                            "true and false are values of causal only")
        later = [(line, owner) for line, owner in self.all_lets.get(name, ()) if line >= tok.line]
        elsewhere = [owner for _, owner in self.all_lets.get(name, ()) if owner is not None]
        if later:
            hint = f"it is defined on line {later[0][0]}; move that let above this line"
        elif elsewhere:
            hint = (f"it is local to attention block {elsewhere[0]}; "
                    "move the let to the top level to share it")
        elif name in self.branch_names:
            hint = f"'{name}' is a branch; only lets and numbers are allowed here"
        else:
            hint = checks.join_hints(checks.did_you_mean(name, env),
                                      f"define it first: let {name} = ...")
        raise SpecError("E300", f"unknown constant '{name}'", span, hint)
