"""The text of ``nsa-dsl explain``: what a spec attends to and what it costs.

``explain(spec)`` returns a plain-text report (no printing here: the CLI prints):
the spec one line per branch, the keys each query attends per branch as formulas
in ``t`` (and the overlap weights of a select branch scored by a compress branch),
the cost model, and one table per sequence length (keys per query, forward FLOPs
and K/V bytes per branch against dense causal attention), then a summary.

The report is a list of :class:`Section`; ``explain_sections`` returns them so the
CLI can append more (the codegen's "kernel plan") before ``format_report``::

    sections = explain_sections(spec)
    sections.append(Section("kernel plan", plan_text))
    print(format_report(spec, sections))
"""
from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from nsa_dsl.language import cost, symbolic
from nsa_dsl.language import shapes as S
from nsa_dsl.language.ir import Spec

__all__ = ["Section", "explain", "explain_sections", "format_report", "spec_lines",
           "formula_lines", "cost_table", "summary_table", "DEFAULT_LENGTHS"]

DEFAULT_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
WIDTH = 96          # lines stay under this many columns
_IND = "  "


@dataclass(frozen=True)
class Section:
    """One titled part of the report; ``body`` is preformatted text (no trailing newline)."""
    title: str
    body: str


# ---------------------------------------------------------------- pieces

def _output_text(spec: Spec) -> str:
    o = spec.output
    if o.kind == "branch":
        return o.branches[0]
    head = [o.activation] if o.activation else []
    return f"{o.kind}({', '.join(head + list(o.branches))})"


def spec_lines(spec: Spec, dims: cost.Dims, given: Iterable[str] = ()) -> list[str]:
    """The spec, one line per branch, and the dims the costs use (and where they came
    from: ``given`` names the ones the caller passed)."""
    w = max(len(b.name) for b in spec.branches) if spec.branches else 4
    lines = []
    for b in spec.branches:      # a long call continues under its opening parenthesis
        head = f"{_IND}branch {b.name:<{w}} = "
        call = b.call_text()
        pad = " " * (len(head) + call.index("(") + 1)
        lines += textwrap.wrap(call, WIDTH, initial_indent=head, subsequent_indent=pad,
                               break_long_words=False)
    lines.append(f"{_IND}output = {_output_text(spec)}" + ("" if spec.causal else "   (causal = false)"))
    group = dims.heads // dims.kv_heads if dims.kv_heads else 0
    lines.append(f"{_IND}heads {dims.heads}, kv_heads {dims.kv_heads} (group {group}), "
                 f"qk_dim {dims.qk_dim}, v_dim {dims.v_dim}, {dims.dtype_bytes} bytes per element")
    given = set(given)
    names = ("heads", "kv_heads", "qk_dim", "v_dim")
    src = [("declared in the spec", [n for n in names if n not in given and n not in dims.defaulted]),
           ("given", [n for n in names if n in given]),
           ("defaulted (64 heads, 4 kv heads, dims 128)", list(dims.defaulted))]
    lines.append(f"{_IND}(" + "; ".join(f"{', '.join(ns)}: {what}" for what, ns in src if ns) + ")")
    return lines


def _txt(e) -> str:
    return symbolic.render(e, "text")


def _put(lines: list, label: str, formula: str, width: int, notes: Sequence[str] = ()) -> None:
    """``label  formula   note``, then further notes below the formula, all wrapped."""
    head = f"{_IND}{label:<{width}}  "
    pad = " " * len(head)
    notes = list(notes)
    if not formula and not label:        # notes that continue the previous entry
        for note in notes:
            lines.extend(textwrap.wrap(note, WIDTH, initial_indent=pad, subsequent_indent=pad + "  "))
        return
    line = head + formula
    if notes and len(line) + 3 + len(notes[0]) <= WIDTH:
        line += "   " + notes.pop(0)
    if len(line) <= WIDTH:
        lines.append(line)
    else:
        lines.append(head.rstrip())
        lines.append(" " * (len(_IND) + 4) + formula)
    for note in notes:
        lines.extend(textwrap.wrap(note, WIDTH, initial_indent=pad, subsequent_indent=pad + "  "))


def formula_lines(shapes: S.SpecShapes) -> list[str]:
    """Keys attended by query t, per branch, as formulas (0 <= t < T)."""
    labels = [b.name for b in shapes.branches] + ["dense"]
    labels += [f"{b.name} score" for b in shapes.branches if b.score_keys != 0]
    w = max(len(x) for x in labels)
    lines: list[str] = []
    for b in shapes.branches:
        if isinstance(b, S.CompressShapes):
            seen = (f"is seen from t = {_txt(b.last_key)}" if shapes.causal else "is seen by every query")
            _put(lines, b.name, _txt(b.keys), w, [
                b.note,
                f"block i pools keys {_txt(b.first_key)} .. {_txt(b.last_key)} and {seen}; "
                f"T keys make {_txt(b.n_blocks)} blocks"])
        elif isinstance(b, S.IndexerShapes):
            _put(lines, b.name, _txt(b.keys), w, [f"keys scored: {b.note}"])
        elif isinstance(b, S.SelectShapes):
            forced = " and ".join(f"{k} {w}" for k, w in ((b.keep_first, "first"),
                                                           (b.keep_last, "last")) if k)
            blocks = (f"selects {_txt(b.selected)} of the {_txt(b.eligible)} eligible blocks of "
                      f"{b.block} keys ({forced + ' forced' if forced else 'none forced'}); "
                      f"T keys make {_txt(b.n_blocks)} blocks")
            if b.exact:
                _put(lines, b.name, _txt(b.keys), w, [f"exact: {b.note}", blocks])
            else:
                _put(lines, b.name, "at most " + _txt(b.keys), w, [b.note])
                _put(lines, "", "at least " + _txt(b.keys_min), w, ["(own block chosen)", blocks])
            if b.kv_reuse > 1:
                _put(lines, "", "", w, [f"query_block = {b.kv_reuse}: dense {b.kv_reuse}-row tiles read each "
                                        f"selected block once, {b.kv_reuse}x fewer K/V bytes than one "
                                        "selection per position"])
        elif isinstance(b, S.WindowShapes):
            last = "t" if shapes.causal else f"min(T - 1, t + {b.size - 1})"
            note = (f"keys {_txt(b.first_key)} .. {last}" +
                    (f", and sinks 0 .. {b.sinks - 1} left of them" if b.sinks else ""))
            formula = _txt(b.keys) if not b.sinks or not shapes.causal else \
                f"{_txt(S.window_keys(symbolic.t, b.size))} + {_txt(b.sink_keys)}"
            _put(lines, b.name, formula, w, [note])
        else:
            _put(lines, b.name, _txt(b.keys), w)
    _put(lines, "dense", _txt(shapes.dense.keys), w, [shapes.dense.note])
    for b in shapes.branches:
        if b.score_keys != 0:
            src = (f"scoring pass of {b.name}: compressed keys of {b.score}, QK only"
                   if b.score != "mean_pool" else
                   f"scoring pass of {b.name}: mean-pooled complete blocks, QK only")
            _put(lines, f"{b.name} score", _txt(b.score_keys), w, [src])
    return lines


def weight_lines(shapes: S.SpecShapes) -> list[str]:
    """The overlap weights of every select branch scored by a compress branch."""
    lines: list[str] = []
    kinds = {x.name: x.kind for x in shapes.branches}
    for b in shapes.branches:
        if not isinstance(b, S.SelectShapes) or b.score == "mean_pool":
            continue
        if kinds.get(b.score) == "indexer":
            lines.append(f"{_IND}{b.name}: I[t, s] = sum over indexer heads j of w_idx[t, j] * "
                         f"relu(q_idx[t, j] . k_idx[s])")
            lines.append(f"{_IND}  (indexer {b.score}); the top {b.top_k} tokens")
            continue
        lines.append(f"{_IND}{b.name}: s[t, g, j] = sum over heads h of g, sum over i of "
                     f"w(i, j) * p_{b.score}[t, h, i]")
        if b.weight is None:
            lines.append(f"{_IND}  (no integer weights: stride does not divide both blocks)")
            continue
        lines.append(f"{_IND}  w(i, j) = {_txt(b.weight)}")
        prof = " ".join(str(x) for x in b.weight_profile())
        lines.append(f"{_IND}  non-zero for i = {_txt(b.weight_lo)} .. {_txt(b.weight_hi)}: "
                     f"weights {prof}")
    return lines


def _num(x: float) -> str:
    return f"{x:.2e}".replace("e+", "e")


def _ratio(dense: float, sparse: float) -> str:
    if sparse <= 0:
        return "n/a"
    r = dense / sparse
    return f"{r:.1f}x fewer" if r >= 1 else f"{1 / r:.1f}x more"


def cost_table(c: cost.Cost, shapes: Optional[S.SpecShapes] = None) -> list[str]:
    """One length (the caller titles it): a row per pass (a select's scoring pass
    apart), total, dense, and the ratio to dense."""
    inexact = {b.name for b in shapes.branches if not b.exact} if shapes else set()
    w = max([14] + [len(r.name) + 3 for r in c.rows])
    lines = [f"{_IND}{'pass':<{w}}{'keys/query':>12}{'keys at':>10}{'FLOP':>11}{'share':>7}"
             f"{'K/V bytes':>12}",
             f"{_IND}{'':<{w}}{'(average)':>12}{'t = T-1':>10}"]

    def row(r: cost.CostRow, share: bool = True) -> str:
        name = r.name + ("*" if r.name in inexact else "")
        pct = f"{100 * r.flops / c.total.flops:>6.1f}%" if share and c.total.flops else " " * 7
        return (f"{_IND}{name:<{w}}{r.keys_avg:>12.1f}{r.keys_last:>10d}{_num(r.flops):>11}"
                f"{pct}{_num(r.bytes):>12}")

    for r in c.rows:
        lines.append(row(r))
    lines.append(row(c.total, share=False))
    dense = "dense causal" if shapes is None or shapes.causal else "dense"
    lines.append(row(dataclasses.replace(c.dense, name=dense), share=False))
    lines.append(f"{_IND}vs {dense}: {_ratio(c.dense.flops, c.total.flops)} FLOP, "
                 f"{_ratio(c.dense.bytes, c.total.bytes)} K/V bytes")
    if inexact:
        lines.append(f"{_IND}* upper bound: which blocks, so how many keys, depends on the data "
                     f"(see the branch's note above)")
    return lines


def summary_table(costs: Sequence[cost.Cost]) -> list[str]:
    """One line per length: totals against dense causal attention."""
    lines = [f"{_IND}{'T':>7}{'keys/query':>12}{'FLOP':>11}{'dense FLOP':>12}{'vs dense':>14}"
             f"{'K/V bytes':>12}{'dense bytes':>13}"]
    for c in costs:
        lines.append(f"{_IND}{c.T:>7}{c.total.keys_avg:>12.1f}{_num(c.total.flops):>11}"
                     f"{_num(c.dense.flops):>12}{_ratio(c.dense.flops, c.total.flops):>14}"
                     f"{_num(c.total.bytes):>12}{_num(c.dense.bytes):>13}")
    return lines


_MODEL = """\
  keys: what each query attends, per branch (a key attended by two branches counts twice);
    compress counts compressed keys. Averages are over t = 0 .. T-1.
  FLOP (forward, all query heads): 2*qk_dim per score and 2*v_dim per value for every key;
    a select branch adds its scoring pass (2*qk_dim per key scored). Pooling and gating
    are not counted.
  K/V bytes: each (query position, kv head) program reads the K and V rows of the keys it
    attends, no reuse across positions (the scoring pass reads K only). Dense causal
    attention is costed the same way (T*(T + 1)/2 keys), so bytes scale as FLOP here."""


# ---------------------------------------------------------------- context parallel

@dataclass(frozen=True)
class CPCost:
    """One attention layer under context parallelism over ``ranks`` ranks, per rank, in bytes
    (the accounting of ``nsa_dsl.runtime.context_parallel``; B = 1, one K/V for every branch
    unless ``kv_sets`` says how many). ``gather``: received by the forward all-gathers of K, V
    (and indexer keys); ``scatter``: sent by the backward reduce-scatters of their gradients
    (both (N-1)/N of the whole tensor, the ring algorithms' volume; compressed keys are pooled
    locally and never sent). Memory the layer holds: ``local``, the rank's own rows (q, gates,
    indexer queries, o, each output branch's o and float32 lse, int32 selections); ``gathered``,
    the whole sequence's K/V and indexer keys; ``compressed``, the K/V pooled from them;
    ``backward``, what the backward adds at its start (the incoming do, each output branch's
    d o and float32 delta from the combination's backward, dq and d gates of the rank's rows,
    dK/dV and d(compressed) of the whole sequence before the reduce-scatter): an upper bound,
    as the branches free theirs in turn. Kernel scratch (tiles) is not counted. ``T`` is the
    sequence length padded to a multiple of ``2 * ranks`` (the layout's chunks)."""
    T: int
    ranks: int
    gather: int
    scatter: int
    local: int
    gathered: int
    compressed: int
    backward: int

    @property
    def peak(self) -> int:
        return self.local + self.gathered + self.compressed + self.backward


def cp_cost(spec: Spec, T: int, ranks: int, dims: cost.Dims, kv_sets: int = 1) -> CPCost:
    """What one layer of ``spec`` communicates and holds per rank at length ``T`` over ``ranks``."""
    from nsa_dsl.language.rules import num_compressed_blocks
    from nsa_dsl.semantics.inputs import needed_branches
    b, HQ, H, dq, dv = dims.dtype_bytes, dims.heads, dims.kv_heads, dims.qk_dim, dims.v_dim
    needed = needed_branches(spec)
    if ranks > 1:
        T = -(-T // (2 * ranks)) * 2 * ranks                   # padded to whole chunks
    T_rank = T // ranks
    kv_row = kv_sets * H * (dq + dv) * b                       # one position's K and V
    idx_row = sum(x.dim for x in needed if x.kind == "indexer") * b
    moved = (T - T_rank) * (kv_row + idx_row)
    C = len(spec.output.branches)
    gates = T_rank * HQ * C * b if spec.output.kind == "gate" else 0
    local = (T_rank * HQ * dq * b + gates + T_rank * HQ * dv * b * (1 + C) + T_rank * HQ * 4 * C
             + sum(T_rank * x.heads * (x.dim + 1) * b for x in needed if x.kind == "indexer")
             + sum(T_rank * (1 if spec.score_kind(x) == "indexer" else H) * x.top_k * 4
                   for x in needed if x.kind == "select"))
    compressed = sum(num_compressed_blocks(T, x.block, x.stride) * H * (dq + dv) * b
                     for x in needed if x.kind == "compress")
    gathered = T * (kv_row + idx_row)
    backward = (gathered + compressed + T_rank * HQ * dq * b + gates
                + T_rank * HQ * (dv * b * (1 + C) + 4 * C))      # do, then d o and delta per branch
    return CPCost(T, ranks, moved, moved, local, gathered, compressed, backward)


def _size(x: int) -> str:
    """Bytes in three digits: ``560 MiB``, ``2.19 GiB``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x} B"


CP_COLUMNS = ("T", "N", "gather fwd", "scatter bwd", "own rows", "K/V all", "compressed", "bwd adds", "peak")


def cp_rows(spec: Spec, lengths: Iterable[int], ranks: Iterable[int], dims: cost.Dims,
            kv_sets: int = 1) -> list[tuple[str, ...]]:
    """One row of ``CP_COLUMNS`` per length and rank count (sizes as text)."""
    out = []
    for T in lengths:
        for n in ranks:
            c = cp_cost(spec, int(T), n, dims, kv_sets)
            out.append((str(T), str(n) + ("*" if c.T != T else ""), *(_size(x) for x in (c.gather, c.scatter, c.local, c.gathered,
                                                                c.compressed, c.backward, c.peak))))
    return out


def cp_markdown(spec: Spec, lengths: Iterable[int], ranks: Iterable[int], dims: cost.Dims,
                kv_sets: int = 1) -> str:
    """``cp_rows`` as a markdown table (benchmarks/RESULTS.md)."""
    rows = cp_rows(spec, lengths, ranks, dims, kv_sets)
    return "\n".join(["| " + " | ".join(CP_COLUMNS) + " |", "|" + "---|" * len(CP_COLUMNS)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def cp_ranks(n: int) -> list[int]:
    """The rank counts a table shows up to ``n``: every count to 8, then powers of two, and ``n``."""
    return sorted({r for r in range(1, min(n, 8) + 1)} | {1 << i for i in range(n.bit_length()) if 1 << i <= n} | {n})


def cp_table(spec: Spec, lengths: Iterable[int], ranks: int, dims: cost.Dims) -> list[str]:
    """``explain --cp N``: per layer and rank, what is communicated and held."""
    rows = [CP_COLUMNS] + cp_rows(spec, lengths, cp_ranks(ranks), dims)
    w = [max(len(r[i]) for r in rows) for i in range(len(CP_COLUMNS))]
    lines = [_IND + "  ".join(f"{x:>{w[i]}}" for i, x in enumerate(r)) for r in rows]
    lines.insert(1, _IND + "-" * (len(lines[0]) - len(_IND)))
    lines += textwrap.wrap(
        "Per attention layer and rank, N ranks (B = 1, one K/V shared by the branches; separate "
        "K/V per branch multiply the K/V columns). gather fwd: bytes each rank receives in the "
        "forward's all-gathers (K, V and indexer keys of the other ranks' rows, (N-1)/N of the "
        "sequence's); scatter bwd: bytes each rank sends in the backward's reduce-scatters (their "
        "gradients, as many). Compressed keys are pooled locally from the gathered keys: nothing "
        "sent. own rows: q, gates, o, each output branch's o and lse, selections of the rank's T/N "
        "rows; K/V all: the whole sequence's, held for the backward; bwd adds: dK/dV and "
        "d(compressed) of the whole sequence before the reduce-scatter, dq, and the incoming do "
        "with each output branch's d o. peak: the sum (kernel scratch not counted). *: T padded "
        "to a multiple of 2N (the layout's chunks).",
        WIDTH, initial_indent=_IND, subsequent_indent=_IND)
    return lines


# ---------------------------------------------------------------- the report

def explain_sections(spec: Spec, lengths: Iterable[int] = DEFAULT_LENGTHS, heads=None,
                     qk_dim=None, v_dim=None, *, kv_heads=None,
                     dtype_bytes: int = cost.DEFAULT_DTYPE_BYTES, cp: Optional[int] = None) -> list[Section]:
    """The report's sections, in order, for the CLI to extend (``cp``: context parallelism over
    up to that many ranks, a section of its own)."""
    dims = cost.Dims.of(spec, heads=heads, kv_heads=kv_heads, qk_dim=qk_dim, v_dim=v_dim,
                     dtype_bytes=dtype_bytes)
    shapes = S.spec_shapes(spec)
    given = [n for n, v in (("heads", heads), ("kv_heads", kv_heads), ("qk_dim", qk_dim),
                            ("v_dim", v_dim)) if v is not None]
    sections = [Section("spec", "\n".join(spec_lines(spec, dims, given))),
                Section("keys attended by query t (0 <= t < T)", "\n".join(formula_lines(shapes)))]
    wl = weight_lines(shapes)
    if wl:
        sections.append(Section("selection scores", "\n".join(wl)))
    sections.append(Section("cost model", _MODEL))
    costs = [cost.cost(shapes, int(n), dims) for n in lengths]
    for c in costs:
        sections.append(Section(f"T = {c.T} (forward)", "\n".join(cost_table(c, shapes))))
    if len(costs) > 1:
        sections.append(Section("summary (forward, all heads)", "\n".join(summary_table(costs))))
    if cp:
        sections.append(Section(f"context parallel over up to {cp} ranks (per layer, per rank)",
                                "\n".join(cp_table(spec, [c.T for c in costs], cp, dims))))
    return sections


def format_report(spec: Spec, sections: Iterable[Section]) -> str:
    """Join sections under a title line."""
    out = [f"nsa-dsl explain: attention {spec.name}"]
    for s in sections:
        out += ["", s.title, s.body]
    return "\n".join(out) + "\n"


def explain(spec: Spec, lengths: Iterable[int] = DEFAULT_LENGTHS, heads: Optional[int] = None,
            qk_dim: Optional[int] = None, v_dim: Optional[int] = None, *,
            kv_heads: Optional[int] = None, dtype_bytes: int = cost.DEFAULT_DTYPE_BYTES,
            extra_sections: Iterable[Section] = (), cp: Optional[int] = None) -> str:
    """A readable plain-text report of ``spec``: formulas, keys, FLOPs, bytes vs dense.

    Head counts and dims: the arguments, else the spec's declared ones, else 64 heads,
    4 kv heads, head dims 128 (the header says which). ``extra_sections`` are appended
    (the CLI's kernel plan). ``cp``: what context parallelism over up to that many ranks
    communicates and holds per layer (``cp_cost``).
    """
    sections = explain_sections(spec, lengths, heads, qk_dim, v_dim, kv_heads=kv_heads,
                                dtype_bytes=dtype_bytes, cp=cp)
    return format_report(spec, [*sections, *extra_sections])
