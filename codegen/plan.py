"""Lower a checked Spec, bound to tensor shapes, to a kernel plan.

A plan is data: which kernel families run, for which branch, with which
compile-time constants. Rendering (codegen.render) and caching
(codegen.cache) consume it; nothing here touches torch or triton.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from nsa_dsl.errors import SpecError
from nsa_dsl.ir import Compress, Select, Spec, Window

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


def lower(spec: Spec, binding: Binding, varlen: bool = False) -> Plan:
    """Which kernels run, in dependency order: compression, selection, window, combination.

    ``varlen=True``: kernels for packed variable-length sequences (``cu_seqlens``); the attention
    families get the template variable ``VARLEN = True`` (a plan without it renders no varlen
    code, and the variable is part of the cache key). Combination needs no variant.
    """
    G, DQK, DV = binding.group, binding.qk_dim, binding.v_dim
    tiles = tile_vars(G, DQK, DV)
    seq = {"VARLEN": True} if varlen else {}
    kernels = []
    for b in spec.of_kind("compress"):
        kernels.append(_kernel(f"compress_{b.name}", b.name, "compress", **tiles, L=b.block, STRIDE=b.stride, **seq))
    for b in spec.of_kind("select"):
        if b.score == "mean_pool":
            L, STRIDE, SCORE = b.block, b.block, "mean_pool"
        else:
            src = spec.branch(b.score)
            L, STRIDE, SCORE = src.block, src.stride, "cmp"
        kernels.append(_kernel(f"topk_{b.name}", b.name, "topk",
                               G=G, GP=tiles["GP"], DQK=DQK, BDK=tiles["BDK"], L=L, STRIDE=STRIDE, LS=b.block,
                               TOPK=b.top_k, KEEP_FIRST=b.keep_first, KEEP_LAST=b.keep_last, SCORE=SCORE,
                               **topk_vars(L, STRIDE, b.block, b.top_k, SCORE), **seq))
        kernels.append(_kernel(f"select_{b.name}", b.name, "select", **tiles, LS=b.block, TOPK=b.top_k,
                               **select_vars(b.block, b.top_k), **seq))
    for b in spec.of_kind("window"):
        kernels.append(_kernel(f"window_{b.name}", b.name, "window", **tiles, W=b.size, SINKS=b.sinks, **seq))
    out = spec.output
    kernels.append(_kernel("combine", "output", "combine",
                           C=len(out.branches), DV=DV, BDV=tiles["BDV"], GATED=out.kind == "gate"))
    return Plan(spec, binding, tuple(kernels))


def lower_decode(spec: Spec, binding: Binding) -> Plan:
    """The decoding / chunked-prefill plan: one kernel module (``templates/decode.py.j2``) that
    computes every branch of ``spec`` for new tokens over a KV cache (``nsa_dsl.decode``).

    Template variables name branches by kind and index, never by spec text: ``CMP`` holds
    ``(block, stride)`` per compress branch, ``SEL`` ``(block, top_k, keep_first, keep_last,
    score, src)`` per select branch (``score`` is ``"cmp"`` with ``src`` indexing ``CMP``, or
    ``"mean_pool"`` with ``src = 0``), ``WIN`` ``(size, sinks)`` per window branch, ``OUT`` the
    output's branches as indices into the list compress, then select, then window branches.
    Every leaf of these tuples passes the same check as a scalar variable (``_kernel``).
    """
    cmps, sels, wins = spec.of_kind("compress"), spec.of_kind("select"), spec.of_kind("window")
    order = [b.name for b in cmps] + [b.name for b in sels] + [b.name for b in wins]
    c_index = {b.name: i for i, b in enumerate(cmps)}
    variables = dict(
        G=binding.group, DQK=binding.qk_dim, DV=binding.v_dim, GATED=spec.output.kind == "gate",
        CMP=tuple((b.block, b.stride) for b in cmps),
        SEL=tuple((b.block, b.top_k, b.keep_first, b.keep_last, "mean_pool", 0) if b.score == "mean_pool"
                  else (b.block, b.top_k, b.keep_first, b.keep_last, "cmp", c_index[b.score]) for b in sels),
        WIN=tuple((b.size, b.sinks) for b in wins),
        OUT=tuple(order.index(n) for n in spec.output.branches))
    leaves = {}
    for key, value in variables.items():
        items = [x for t in value for x in (t if isinstance(t, tuple) else (t,))] if isinstance(value, tuple) else [value]
        leaves.update({f"{key}_{i}": x for i, x in enumerate(items)})
    _kernel("decode", "decode", "decode", **leaves)     # validates every leaf
    kernel = KernelPlan("decode", "decode", "decode", tuple(sorted(variables.items())))
    return Plan(spec, binding, (kernel,))


__all__ = ["Binding", "KernelPlan", "Plan", "bind", "lower", "lower_decode",
           "Compress", "Select", "Window"]
