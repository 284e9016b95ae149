"""The IR: frozen dataclasses with source spans, built by the parser.

Passes never mutate the IR; they return new values (``dataclasses.replace``).
Spans are 1-based ``line``/``column``; ``end_column`` is exclusive.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass(frozen=True)
class Span:
    file: str
    line: int
    column: int
    end_line: int
    end_column: int

    @staticmethod
    def unknown(file: str = "<spec>") -> "Span":
        return Span(file, 1, 1, 1, 1)


@dataclass(frozen=True)
class Param:
    """One ``key = value`` of a branch call, value already evaluated.

    ``value`` is an int, a bool, or a bare identifier (str) such as ``mean``
    or a branch name.
    """
    name: str
    value: Union[int, bool, str]
    span: Span = field(compare=False)
    value_span: Span = field(compare=False)


@dataclass(frozen=True)
class Compress:
    name: str
    block: int          # l: keys pooled per compressed block
    stride: int         # d: distance between compressed blocks
    pool: str           # "mean" | "linear" | "mlp"
    span: Span = field(compare=False)
    params: tuple[Param, ...] = field(default=(), compare=False)
    kind = "compress"

    def call_text(self) -> str:
        """The branch call as it reads in the language (reports, pictures)."""
        return f"compress(block = {self.block}, stride = {self.stride}, pool = {self.pool})"


@dataclass(frozen=True)
class Select:
    name: str
    block: int          # l': keys per selection block
    top_k: int          # n: blocks selected per query (forced ones included)
    score: str          # name of a compress branch, or "mean_pool"
    keep_first: int
    keep_last: int
    span: Span = field(compare=False)
    params: tuple[Param, ...] = field(default=(), compare=False)
    query_block: int = 1    # Q: aligned groups of Q positions share one selection
    kind = "select"

    def call_text(self) -> str:
        return (f"select(block = {self.block}, top_k = {self.top_k}, score = {self.score}, "
                f"keep_first = {self.keep_first}, keep_last = {self.keep_last}"
                + (f", query_block = {self.query_block})" if self.query_block != 1 else ")"))


@dataclass(frozen=True)
class Window:
    name: str
    size: int           # w: keys [t - w + 1, t]
    sinks: int          # keys [0, sinks) always visible (when <= t)
    span: Span = field(compare=False)
    params: tuple[Param, ...] = field(default=(), compare=False)
    kind = "window"

    def call_text(self) -> str:
        return f"window(size = {self.size}" + (f", sinks = {self.sinks})" if self.sinks else ")")


@dataclass(frozen=True)
class Indexer:
    """A learned scoring branch (DeepSeek-V3.2's lightning indexer): it scores the tokens a
    ``select(block = 1, score = <indexer>)`` branch attends; it has no output of its own."""
    name: str
    heads: int          # HI: indexer heads
    dim: int            # DI: indexer head dim (one key of DI per position)
    span: Span = field(compare=False)
    params: tuple[Param, ...] = field(default=(), compare=False)
    kind = "indexer"

    def call_text(self) -> str:
        return f"indexer(heads = {self.heads}, dim = {self.dim})"


Branch = Union[Compress, Select, Window, Indexer]


@dataclass(frozen=True)
class Output:
    """How branch outputs combine: ``gate(sigmoid, a, b)``, ``sum(a, b)`` or ``a``."""
    kind: str                       # "gate" | "sum" | "branch"
    branches: tuple[str, ...]
    activation: Optional[str]       # "sigmoid" for gate, else None
    span: Span = field(compare=False)
    branch_spans: tuple[Span, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Spec:
    """One checked ``attention`` block: the unit the compiler specializes."""
    name: str
    heads: Optional[int]
    kv_heads: Optional[int]
    qk_dim: Optional[int]
    v_dim: Optional[int]
    causal: bool
    branches: tuple[Branch, ...]
    output: Output
    span: Span = field(compare=False)
    source: str = field(default="", compare=False, repr=False)
    field_spans: tuple[tuple[str, Span], ...] = field(default=(), compare=False, repr=False)

    def branch(self, name: str) -> Branch:
        for b in self.branches:
            if b.name == name:
                return b
        raise KeyError(name)

    @property
    def branch_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.branches)

    @property
    def attention_names(self) -> tuple[str, ...]:
        """Branches that attend keys (every kind but the indexer, which only scores)."""
        return tuple(b.name for b in self.branches if b.kind != "indexer")

    @property
    def output_branches(self) -> tuple[Branch, ...]:
        """Branches whose outputs are combined, in output order."""
        return tuple(self.branch(n) for n in self.output.branches)

    def of_kind(self, kind: str) -> tuple[Branch, ...]:
        return tuple(b for b in self.branches if b.kind == kind)

    def score_kind(self, select: "Select") -> str:
        """What scores a select branch: "mean_pool", "compress" or "indexer"."""
        return "mean_pool" if select.score == "mean_pool" else self.branch(select.score).kind

    def canonical(self) -> str:
        """A stable text of everything that changes the computation (cache keys)."""
        parts = [f"attention {self.name}",
                 f"heads={self.heads} kv_heads={self.kv_heads} qk_dim={self.qk_dim} "
                 f"v_dim={self.v_dim} causal={self.causal}"]
        for b in self.branches:
            if isinstance(b, Compress):
                parts.append(f"{b.name}=compress(block={b.block},stride={b.stride},pool={b.pool})")
            elif isinstance(b, Select):
                parts.append(f"{b.name}=select(block={b.block},top_k={b.top_k},score={b.score},"
                             f"keep_first={b.keep_first},keep_last={b.keep_last},query_block={b.query_block})")
            elif isinstance(b, Indexer):
                parts.append(f"{b.name}=indexer(heads={b.heads},dim={b.dim})")
            else:
                parts.append(f"{b.name}=window(size={b.size},sinks={b.sinks})")
        o = self.output
        parts.append(f"output={o.kind}({o.activation},{','.join(o.branches)})")
        return "\n".join(parts)


@dataclass(frozen=True)
class SpecFile:
    """Everything one file declares: one or more attention blocks."""
    specs: tuple[Spec, ...]
    file: str
    source: str = field(repr=False, default="")

    def get(self, name: str) -> Spec:
        for s in self.specs:
            if s.name == name:
                return s
        raise KeyError(name)
