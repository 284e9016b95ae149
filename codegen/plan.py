"""Lower a checked Spec, bound to tensor shapes, to a kernel plan.

A plan is data: which kernel families run, for which branch, with which
compile-time constants. Rendering (nsa_dsl.codegen.render) and caching
(nsa_dsl.codegen.cache) consume it; nothing here touches torch or triton.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import NamedTuple, Optional

from nsa_dsl.errors import SpecError
from nsa_dsl.language.ir import Compress, Select, Spec, Window

from .ints import cdiv, next_pow2


@dataclass(frozen=True)
class Binding:
    """The tensor shapes a spec is specialised for (Triton constexprs)."""
    heads: int
    kv_heads: int
    qk_dim: int
    v_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class KernelPlan:
    """One rendered module: a kernel family specialised for one branch."""
    name: str                                  # e.g. "compress_cmp": unique in a plan
    branch: str                                # branch name, or "output"
    family: str                                # compress | topk | select | window | combine
    variables: tuple[tuple[str, object], ...]  # template variables, sorted

    @property
    def template(self) -> str:
        return f"{self.family}.py.j2"

    def vars(self) -> dict:
        return dict(self.variables)


@dataclass(frozen=True)
class Plan:
    spec: Spec
    binding: Binding
    kernels: tuple[KernelPlan, ...]

    def kernel(self, name: str) -> KernelPlan:
        for k in self.kernels:
            if k.name == name:
                return k
        raise KeyError(name)

    def of_branch(self, branch: str) -> dict[str, str]:
        """The kernels of one branch (or of ``"output"``): family -> kernel name."""
        return {k.family: k.name for k in self.kernels if k.branch == branch}

    def canonical(self) -> str:
        """Stable text of everything that determines the generated code."""
        return json.dumps({
            "spec": self.spec.canonical(),
            "binding": [self.binding.heads, self.binding.kv_heads,
                        self.binding.qk_dim, self.binding.v_dim],
            "kernels": [[k.name, k.family, [list(v) for v in k.variables]] for k in self.kernels],
        }, sort_keys=True)

    @property
    def varlen(self) -> bool:
        """Kernels for packed variable-length sequences (``cu_seqlens``)."""
        return any(k.vars().get("VARLEN", False) for k in self.kernels)

    def describe(self) -> str:
        b = self.binding
        lines = [f"plan for {self.spec.name}: heads={b.heads} kv_heads={b.kv_heads} "
                 f"(G={b.group}) qk_dim={b.qk_dim} v_dim={b.v_dim}"
                 + (" packed sequences (varlen)" if self.varlen else "")]
        for k in self.kernels:
            args = ", ".join(f"{n}={v}" for n, v in k.variables)
            lines.append(f"  {k.name:<20} {k.template:<16} {args}")
        return "\n".join(lines)


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
_WORDS = {"cmp", "mean_pool"}    # the only strings a template variable may hold


def _kernel(name, branch, family, **variables) -> KernelPlan:
    """Only validated numbers and words from a fixed vocabulary reach a template."""
    if not _IDENTIFIER.match(branch):
        raise SpecError("E116", f"branch name {branch!r} is not an identifier",
                        hint="names are letters, digits and '_', starting with a letter or '_'")
    for key, value in variables.items():
        ok = all(isinstance(x, bool) or (type(x) is int and 0 <= x <= 1 << 20)
                 or (isinstance(x, str) and x in _WORDS)
                 for x in (value if isinstance(value, tuple) else (value,)))   # a tuple: of such values
        if not ok:
            raise SpecError("E216", f"branch '{branch}': {key} = {value!r} is not a valid value",
                            hint="build specs with nsa_dsl.parse or nsa_dsl.load, which check every value")
    return KernelPlan(name, branch, family, tuple(sorted(variables.items())))


def bind(spec: Spec, heads: int, kv_heads: int, qk_dim: int, v_dim: int) -> Binding:
    """Check call-time shapes against the spec's declared fields and the kernels' limits."""
    declared = {"heads": spec.heads, "kv_heads": spec.kv_heads,
                "qk_dim": spec.qk_dim, "v_dim": spec.v_dim}
    actual = {"heads": heads, "kv_heads": kv_heads, "qk_dim": qk_dim, "v_dim": v_dim}
    for field, want in declared.items():
        if want is not None and want != actual[field]:
            raise SpecError("E602", f"spec '{spec.name}' declares {field} = {want}, "
                            f"but the tensors have {field} = {actual[field]}",
                            hint="pass tensors of the declared shape, or drop the field "
                                 "from the spec to bind it at the first call")
    if kv_heads < 1 or heads % kv_heads != 0:
        raise SpecError("E603", f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})",
                        hint="q is [B, T, HQ, D] and k, v are [B, T, H, D] with HQ % H == 0")
    if not 1 <= heads // kv_heads <= 64:
        raise SpecError("E604", f"{heads // kv_heads} query heads per kv head; kernels support 1 to 64",
                        hint="use more kv heads")
    for field in ("qk_dim", "v_dim"):
        d = actual[field]
        if d % 16 or not 16 <= d <= 256:
            raise SpecError("E605", f"{field} = {d}: kernels need a multiple of 16 between 16 and 256",
                            hint="pad the head dimension to a multiple of 16")
    return Binding(heads, kv_heads, qk_dim, v_dim)


def tile_vars(G: int, DQK: int, DV: int) -> dict:
    """The tile constants every attention family derives from the binding: ``GP`` (the G heads
    of a kv group padded to a power of two: rows of a tile), ``BDK`` / ``BDV`` (head dims padded
    to powers of two, at least 16: the tl.dot widths)."""
    return dict(G=G, GP=next_pow2(G), DQK=DQK, DV=DV, BDK=max(16, next_pow2(DQK)), BDV=max(16, next_pow2(DV)))


def topk_vars(L: int, STRIDE: int, LS: int, TOPK: int, SCORE: str) -> dict:
    """The constants the top-k family derives from a select branch: ``TOPKP`` (its top-k buffer:
    TOPK padded to a power of two) and, scored by a compression branch (``SCORE == "cmp"``),
    ``A = L / STRIDE`` and ``C = LS / STRIDE``: the STRIDE-key segments of a compressed block and
    of a select block."""
    out = dict(TOPKP=next_pow2(TOPK))
    if SCORE == "cmp":
        if L % STRIDE or LS % STRIDE:
            raise ValueError(f"scoring by compression needs STRIDE | L and STRIDE | LS; got L = {L}, "
                             f"STRIDE = {STRIDE}, LS = {LS}")
        out.update(A=L // STRIDE, C=LS // STRIDE)
    return out


def select_vars(LS: int, TOPK: int) -> dict:
    """The selection's tile constants: ``TOPKP`` (TOPK padded to a power of two, at least 2: the
    width of a row's idx tile); ``BN`` (the key tile: the whole block when it fits in 64 keys, as a
    power of two >= 16 covering it, else the largest of 64, 32 dividing it, else 64 with a mask on
    the block's end) and ``NT`` (tiles per block); ``PARTIAL`` (the block's end is masked: LS is no
    multiple of BN); ``BN_CHOICES`` (the key tiles a config may pick: BN, then 16 to 128 keys
    dividing the block, so no block-end mask is needed; a block with a masked end keeps BN);
    ``MULTI_NT`` (some choice needs several tiles per block: the per-block tile loop is rendered)."""
    if LS <= 64:
        BN = max(16, next_pow2(LS))
    else:
        BN = 64 if LS % 64 == 0 else 32 if LS % 32 == 0 else 64
    partial = LS % BN != 0
    choices = (BN,) + (() if partial else tuple(b for b in (16, 32, 64, 128) if b != BN and b <= LS and LS % b == 0))
    NT = cdiv(LS, BN)
    return dict(TOPKP=max(2, next_pow2(TOPK)), BN=BN, NT=NT, PARTIAL=partial, BN_CHOICES=choices,
                MULTI_NT=NT > 1 or any(LS // b > 1 for b in choices[1:]))


def indexer_vars(HI: int, DI: int) -> dict:
    """The indexer's tile constants: ``HIP`` (its HI heads padded to a power of two: rows of a
    scoring tile per position) and ``BDI`` (DI padded to a power of two, at least 16: the tl.dot
    width)."""
    return dict(HI=HI, HIP=next_pow2(HI), DI=DI, BDI=max(16, next_pow2(DI)))


def lower(spec: Spec, binding: Binding, varlen: bool = False, offsets: bool = False) -> Plan:
    """Which kernels run, in dependency order: compression, selection, window, combination.

    ``varlen=True``: kernels for packed variable-length sequences (``cu_seqlens``); the attention
    families get the template variable ``VARLEN = True`` (a plan without it renders no varlen
    code, and the variable is part of the cache key). Combination needs no variant. ``CAUSAL``
    (the spec's) goes to every attention family. ``offsets=True``: the top-k and selection kernels,
    and an indexer-scored branch's indexer, gather and index-loss kernels, take query pieces
    (``OFFSETS = True``: launchers' ``q_start``, fewer queries than keys; not with ``varlen``;
    compress and window take them in every module without ``VARLEN``). A select branch's ``QB`` (its query_block) goes to its top-k and selection
    kernels. Kernel names are spelled here only: the runtime finds a branch's kernels with
    :meth:`Plan.of_branch`.
    """
    if varlen and offsets:
        raise ValueError("query pieces (offsets) and packed sequences (varlen) do not mix")
    G, DQK, DV = binding.group, binding.qk_dim, binding.v_dim
    tiles = tile_vars(G, DQK, DV)
    seq = {"VARLEN": True} if varlen else {}
    seq["CAUSAL"] = spec.causal             # every attention family: causal or both-sided masks
    pieces = {"OFFSETS": True} if offsets else {}   # top-k, selection and the indexer's: q_start, Tq != Tk
    kernels = []
    for b in spec.of_kind("compress"):
        kernels.append(_kernel(f"compress_{b.name}", b.name, "compress", **tiles, L=b.block, STRIDE=b.stride, **seq))
    for b in spec.of_kind("select"):
        if spec.score_kind(b) == "indexer":      # tokens: indexer scoring, gather attention, the index loss
            ix = indexer_vars(spec.branch(b.score).heads, spec.branch(b.score).dim)
            kernels.append(_kernel(f"indexer_{b.name}", b.name, "indexer", **ix, TOPK=b.top_k,
                                   KEEP_FIRST=b.keep_first, KEEP_LAST=b.keep_last, **pieces, **seq))
            kernels.append(_kernel(f"gather_{b.name}", b.name, "gather", **tiles, TOPK=b.top_k, **pieces, **seq))
            kernels.append(_kernel(f"index_loss_{b.name}", b.name, "index_loss", G=G, GP=tiles["GP"], DQK=DQK,
                                   BDK=tiles["BDK"], **ix, TOPK=b.top_k, **pieces, **seq))
            continue
        if b.score == "mean_pool":
            L, STRIDE, SCORE = b.block, b.block, "mean_pool"
        else:
            src = spec.branch(b.score)
            L, STRIDE, SCORE = src.block, src.stride, "cmp"
        kernels.append(_kernel(f"topk_{b.name}", b.name, "topk",
                               G=G, GP=tiles["GP"], DQK=DQK, BDK=tiles["BDK"], L=L, STRIDE=STRIDE, LS=b.block,
                               TOPK=b.top_k, KEEP_FIRST=b.keep_first, KEEP_LAST=b.keep_last, SCORE=SCORE,
                               **topk_vars(L, STRIDE, b.block, b.top_k, SCORE), QB=b.query_block, **pieces, **seq))
        kernels.append(_kernel(f"select_{b.name}", b.name, "select", **tiles, LS=b.block, TOPK=b.top_k,
                               **select_vars(b.block, b.top_k), QB=b.query_block, **pieces, **seq))
    for b in spec.of_kind("window"):
        kernels.append(_kernel(f"window_{b.name}", b.name, "window", **tiles, W=b.size, SINKS=b.sinks, **seq))
    out = spec.output
    kernels.append(_kernel("combine", "output", "combine",
                           C=len(out.branches), DV=DV, BDV=tiles["BDV"], GATED=out.kind == "gate"))
    return Plan(spec, binding, tuple(kernels))


class DecodePair(NamedTuple):
    """In the decode plan: a select branch scored by a compress branch (``score = <compress>``)."""
    cmp: str        # the compress branch's word ("c0", ...) and its index among them
    ci: int
    sel: str        # the select branch's word ("s0", ...) and its index among them
    si: int
    L: int          # the compress block and stride, the select block
    STRIDE: int
    LS: int
    A: int          # L / STRIDE: segments of STRIDE keys per compressed block
    C: int          # LS / STRIDE: per select block
    CP: int         # C padded to a power of two: slots per select block in a fused scoring tile
    fused: bool     # split-K / ONEPASS score it in the compress branch's own pass
    slot: int       # its index among the fused pairs (their ws_u / ws_mu entries); 0 when not fused


class DecodeCmp(NamedTuple):
    """A compress branch of the decode plan."""
    name: str                     # its word: "c" + its index among the compress branches
    aux: int                      # its place in the aux outputs (compress, select, window branches)
    out: bool                     # the output combines it,
    gate: int                     # with this gate (when gated)
    part: int                     # its split-K partial state (compress, then window branches)
    L: int
    STRIDE: int
    fuse: Optional[DecodePair]    # the select branch it scores in its own pass (split-K / ONEPASS)
    MEAN: bool                    # mean pooling (the append kernel pools it; else the caller's learned pool)
    LP: int                       # L padded to a power of two: a block's keys as one tile (append)


class DecodeSel(NamedTuple):
    """A select branch of the decode plan."""
    name: str                     # "s" + index
    index: int
    aux: int
    out: bool
    gate: int
    LS: int
    TOPK: int
    TOPKP: int                    # TOPK padded to a power of two: the top-k buffer's width
    KEEP_FIRST: int
    KEEP_LAST: int
    SCORE: str                    # "cmp" | "mean_pool"
    BN: int                       # key tile of its attention, NT tiles per block, PARTIAL: the block's
    NT: int                       # end masked (as the select family: select_vars)
    PARTIAL: bool
    score: Optional[DecodePair]   # SCORE == "cmp": its scoring compress branch
    LSP: int                      # keys per tile of a block mean (append, mean_pool): LS up to 64, padded


class DecodeWin(NamedTuple):
    """A window branch of the decode plan."""
    name: str                     # "w" + index
    aux: int
    out: bool
    gate: int
    part: int
    W: int
    SINKS: int


_DECODE_WORD = re.compile(r"[csw][0-9]{1,3}\Z")   # the decode plan's branch words


def _leaves(value):
    """The numbers and words of a (nested) plan value; None (an absent record) has none."""
    if isinstance(value, tuple):
        for x in value:
            yield from _leaves(x)
    elif value is not None:
        yield value


def lower_decode(spec: Spec, binding: Binding) -> Plan:
    """The decoding / chunked-prefill plan: one kernel module (``templates/decode.py.j2``) that
    computes every branch of ``spec`` for new tokens over a KV cache (``nsa_dsl.runtime.decoding``); its
    launchers are ``nsa_dsl.codegen.launch.decode``.

    Template variables are finished numbers and words of a fixed vocabulary, never spec text:
    branches are named by kind and index (``c0``, ``s0``, ``w0``, ...). ``tile_vars`` (G, GP, DQK,
    DV, BDK, BDV); ``CMP`` / ``SEL`` / ``WIN`` one record per compress / select / window branch
    (:class:`DecodeCmp`, :class:`DecodeSel`, :class:`DecodeWin`: its place in the output and the
    aux outputs, its numbers); ``OUT`` the output's branch words in gate order, ``NG`` their
    number, ``GATED``; ``NP`` the branches whose key ranges split-K divides (compress, window),
    ``NBR`` all branches; ``NF`` the fused scoring pairs.

    Fused scoring (split-K and ONEPASS): a compress branch computes the block scores of the first
    select branch it scores when a compressed block reaches at most one select block past its own
    (A - 1 <= C: L - STRIDE <= LS) and a select block spans at most 8 compressed blocks (C <= 8);
    the pair (:class:`DecodePair`) sits on both records (``DecodeCmp.fuse``, ``DecodeSel.score``).
    Every leaf passes the same check as a scalar variable (``_kernel``).
    """
    cmps, sels, wins = spec.of_kind("compress"), spec.of_kind("select"), spec.of_kind("window")
    tiles = tile_vars(binding.group, binding.qk_dim, binding.v_dim)
    words = {b.name: f"{k}{i}" for k, kind in (("c", cmps), ("s", sels), ("w", wins)) for i, b in enumerate(kind)}
    aux = {b.name: i for i, b in enumerate(cmps + sels + wins)}
    gates = {n: i for i, n in enumerate(spec.output.branches)}

    def place(b) -> dict:
        return dict(name=words[b.name], aux=aux[b.name], out=b.name in gates, gate=gates.get(b.name, 0))

    c_index = {b.name: i for i, b in enumerate(cmps)}
    fuse, SEL = {}, []                                   # compress index -> its fused pair
    for si, b in enumerate(sels):
        src = None if b.score == "mean_pool" else cmps[c_index[b.score]]
        L, STRIDE = (src.block, src.stride) if src else (b.block, b.block)
        tk = topk_vars(L, STRIDE, b.block, b.top_k, "cmp" if src else "mean_pool")
        pair = None
        if src:
            ci = c_index[src.name]
            fused = ci not in fuse and L - STRIDE <= b.block <= 8 * STRIDE
            pair = DecodePair(cmp=words[src.name], ci=ci, sel=words[b.name], si=si, L=L, STRIDE=STRIDE, LS=b.block,
                              A=tk["A"], C=tk["C"], CP=next_pow2(tk["C"]), fused=fused, slot=len(fuse) if fused else 0)
            if fused:
                fuse[ci] = pair
        tiles_s = select_vars(b.block, b.top_k)
        SEL.append(DecodeSel(**place(b), index=si, LS=b.block, TOPK=b.top_k, TOPKP=tk["TOPKP"],
                             KEEP_FIRST=b.keep_first, KEEP_LAST=b.keep_last, SCORE="cmp" if src else "mean_pool",
                             BN=tiles_s["BN"], NT=tiles_s["NT"], PARTIAL=tiles_s["PARTIAL"], score=pair,
                             LSP=min(64, next_pow2(b.block))))
    CMP = tuple(DecodeCmp(**place(b), part=ci, L=b.block, STRIDE=b.stride, fuse=fuse.get(ci),
                          MEAN=b.pool == "mean", LP=next_pow2(b.block))
                for ci, b in enumerate(cmps))
    WIN = tuple(DecodeWin(**place(b), part=len(cmps) + wi, W=b.size, SINKS=b.sinks) for wi, b in enumerate(wins))
    variables = dict(**tiles, GATED=spec.output.kind == "gate", CMP=CMP, SEL=tuple(SEL), WIN=WIN,
                     OUT=tuple(words[n] for n in spec.output.branches), NG=len(spec.output.branches),
                     NP=len(cmps) + len(wins), NBR=len(aux), NF=len(fuse))
    leaves = list(_leaves(tuple(variables.values())))
    names = [x for x in leaves if isinstance(x, str) and _DECODE_WORD.match(x)]
    _kernel("decode", "decode", "decode", **{f"v{i}": x for i, x in enumerate(leaves) if x not in names})
    kernel = KernelPlan("decode", "decode", "decode", tuple(sorted(variables.items())))
    return Plan(spec, binding, (kernel,))


__all__ = ["Binding", "KernelPlan", "Plan", "bind", "lower", "lower_decode",
           "Compress", "Select", "Window"]
