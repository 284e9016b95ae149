"""Checks of what a caller hands the op, the reference and the decode path: one home, so the
same bad call gets the same error code from each (torch only; no codegen)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

from nsa_dsl.errors import SpecError
from nsa_dsl.language.ir import Spec
from nsa_dsl.language.rules import num_compressed_blocks


def check_scale(scale, qk_dim: int) -> float:
    """The softmax scale as a float: ``qk_dim ** -0.5`` when None, else a finite number > 0
    (the kernels find a row's max before scaling, which only a positive scale leaves in place)."""
    if scale is None:
        return qk_dim ** -0.5
    value: Optional[float]
    if isinstance(scale, (bool, str, bytes)):
        value = None
    else:
        try:
            value = float(scale)
        except (TypeError, ValueError):
            value = None
    if value is None or not (math.isfinite(value) and value > 0):
        raise SpecError("E618", f"scale must be a finite number > 0, got {scale!r}",
                        hint="leave scale=None for qk_dim ** -0.5, or pass a positive float")
    return value


# ------------------------------------------------------------------------------- one call

KERNEL_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Call:
    """A checked call: its shapes and each argument normalised to dicts by branch name. Queries
    are positions ``q_start .. q_start + T - 1`` of a sequence of ``Tk`` keys (``q_start = 0``,
    ``Tk = T`` unless the caller gives only a piece of the queries: decoding, context parallel)."""
    B: int
    T: int
    HQ: int
    H: int
    Dqk: int
    Dv: int
    k: dict            # branch -> raw keys, for the branches that read them
    v: dict
    compressed: dict   # compress branch -> (k_cmp, v_cmp), given by the caller
    indices: dict      # select branch -> caller-given selection
    index: dict        # indexer branch -> (q_idx, k_idx, w_idx)
    gates: object      # the gate logits, or None
    Tk: int = 0        # keys of the sequence
    q_start: int = 0   # the position of q's first row


def _shape(x) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]" if hasattr(x, "shape") else type(x).__name__


def _tensor(x, name: str, shape: tuple, q, *, dtype_of_q: bool = True) -> None:
    """``x`` is a tensor of ``shape`` (ints, or None for any), q's dtype (E606) and device (E607)."""
    import torch
    if not isinstance(x, torch.Tensor):
        raise SpecError("E601", f"{name} must be a tensor, got {type(x).__name__}")
    want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    if x.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, x.shape)):
        raise SpecError("E601", f"{name} has shape {_shape(x)}; expected {want}",
                        hint="q is [B, T, HQ, Dqk], k [B, T, H, Dqk], v [B, T, H, Dv], gates [B, T, HQ, C]")
    if dtype_of_q and x.dtype != q.dtype:
        raise SpecError("E606", f"{name} has dtype {x.dtype} but q has {q.dtype}; all inputs share one dtype")
    if x.device != q.device:
        raise SpecError("E607", f"{name} is on {x.device} but q is on {q.device}")


def _known(d, what: str, names, kind: str, code: str) -> dict:
    """A dict argument naming only branches of ``kind`` (its known names as the hint)."""
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise SpecError(code, f"{what} must be a dict branch name -> value, got {type(d).__name__}")
    unknown = sorted(str(n) for n in d if n not in names)
    if unknown:
        raise SpecError(code, f"{what} names {unknown}, which {'is' if len(unknown) == 1 else 'are'} not "
                              f"{kind} branch{'' if len(unknown) == 1 else 'es'} of the spec",
                        hint=f"its {kind} branches are {', '.join(names) or 'none'}")
    return dict(d)


def needed_branches(spec: Spec) -> list:
    """The branches a call computes: the output's and what scores their selections, scorers
    first (compress, indexer), then the rest in spec order."""
    names = set(spec.output.branches)
    for name in list(names):
        b = spec.branch(name)
        if b.kind == "select" and b.score != "mean_pool":
            names.add(b.score)
    needed = [b for b in spec.branches if b.name in names]
    first = [b for b in needed if b.kind in ("compress", "indexer")]
    return first + [b for b in needed if b not in first]


def check_call(spec: Spec, q, k, v, gates=None, *, compressed=None, indices=None, index=None,
               cu=None, kernels: bool = False, q_start: Optional[int] = None) -> Call:
    """Check a call of the op (``kernels``: also what the generated kernels need) or of the
    reference; the same bad call gets the same code from both (and from the decode path, which
    shares these helpers). ``cu``: the packed sequences' offsets (a list), or None. ``q_start``:
    q's rows are positions ``q_start ..`` of a sequence whose keys k, v hold (all of them); None:
    q holds every position (k and v as many)."""
    import torch
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise SpecError("E601", f"q must be a 4-D tensor [B, T, HQ, Dqk], got {_shape(q)}")
    if not q.is_floating_point():
        raise SpecError("E606", f"q has dtype {q.dtype}; expected a floating-point dtype")
    if kernels and str(q.dtype).replace("torch.", "") not in KERNEL_DTYPES:
        raise SpecError("E606", f"q has dtype {q.dtype}; the kernels take float16, bfloat16 or float32",
                        hint="use nsa_dsl.reference for float64")
    B, T, HQ, Dqk = q.shape
    piece = q_start is not None
    q_start = 0 if q_start is None else q_start
    if not (isinstance(q_start, int) and not isinstance(q_start, bool) and q_start >= 0) or (piece and cu is not None):
        raise SpecError("E629", f"q_start must be an int >= 0 (and unset with cu_seqlens), got {q_start!r}")
    Tk = q_start + T                                # keys: the raw keys' length when q is a piece
    names = spec.branch_names
    compressed = _known(compressed, "compressed", [b.name for b in spec.of_kind("compress")], "compress", "E610")
    indices = _known(indices, "indices", [b.name for b in spec.of_kind("select")], "select", "E626")
    index = _known(index, "index", [b.name for b in spec.of_kind("indexer")], "indexer", "E627")
    branches = needed_branches(spec)
    raw = [b for b in branches if b.kind in ("select", "window")
           or (b.kind == "compress" and b.name not in compressed)]
    for b in branches:
        if b.kind == "compress" and b.pool != "mean" and b.name not in compressed:
            raise SpecError("E611", f"branch '{b.name}' pools with '{b.pool}', a learned pooling: "
                                    "the op needs its compressed keys and values",
                            hint=f"pass compressed={{'{b.name}': (k_cmp, v_cmp)}} "
                                 "(nsa_dsl.SparseAttention does this for you)")
    ks, vs = _per_branch(k, "k", names, raw), _per_branch(v, "v", names, raw)
    H = Dv = None
    if piece and raw and isinstance(ks[raw[0].name], torch.Tensor) and ks[raw[0].name].dim() == 4:
        Tk = ks[raw[0].name].shape[1]
        if Tk < q_start + T:
            raise SpecError("E629", f"queries at positions {q_start} .. {q_start + T - 1}, but the keys hold "
                                    f"{Tk} positions", hint="k and v hold every key of the sequence")
    for b in raw:
        _tensor(ks[b.name], f"k['{b.name}']" if isinstance(k, Mapping) else "k", (B, Tk, None, Dqk), q)
        _tensor(vs[b.name], f"v['{b.name}']" if isinstance(v, Mapping) else "v", (B, Tk, ks[b.name].shape[2], None), q)
        H, Dv = _agree(H, ks[b.name].shape[2], Dv, vs[b.name].shape[3], b.name)
    for name, pair in compressed.items():
        b = spec.branch(name)
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise SpecError("E610", f"compressed['{name}'] must be a pair (k_cmp, v_cmp)")
        Nc = num_compressed_blocks(Tk, b.block, b.stride) if cu is None else \
            sum(num_compressed_blocks(e - s, b.block, b.stride) for s, e in zip(cu[:-1], cu[1:]))
        try:
            _tensor(pair[0], f"compressed['{name}'][0]", (B, Nc, None, Dqk), q)
            _tensor(pair[1], f"compressed['{name}'][1]", (B, Nc, pair[0].shape[2], None), q)
        except SpecError as e:
            if cu is None or e.code != "E601":
                raise
            raise SpecError("E601", e.message, hint=f"packed sequences: each sequence's compressed blocks in "
                            f"turn, sum over sequences of (len - {b.block}) // {b.stride} + 1 = {Nc} rows") from None
        H, Dv = _agree(H, pair[0].shape[2], Dv, pair[1].shape[3], f"compressed['{name}']")
    if H is None:                                   # every branch given compressed, or none
        raise SpecError("E608", "no keys/values reach any branch", hint="pass k and v")
    if H < 1 or HQ % H:
        raise SpecError("E603", f"query heads ({HQ}) must be a multiple of kv heads ({H})",
                        hint="q is [B, T, HQ, D] and k, v are [B, T, H, D] with HQ % H == 0")
    for field_name, declared, actual in (("heads", spec.heads, HQ), ("kv_heads", spec.kv_heads, H),
                                         ("qk_dim", spec.qk_dim, Dqk), ("v_dim", spec.v_dim, Dv)):
        if declared is not None and declared != actual:
            raise SpecError("E602", f"spec '{spec.name}' declares {field_name} = {declared}, "
                                    f"but the tensors have {field_name} = {actual}",
                            hint="pass tensors of the declared shape, or drop the field from the spec "
                                 "to bind it at the first call")
    C = len(spec.output.branches)
    if spec.output.kind == "gate":
        if gates is None:
            raise SpecError("E609", f"output = gate(...) needs gate logits [B, T, HQ, {C}]",
                            hint=f"pass gates for branches {', '.join(spec.output.branches)} in that order")
        _tensor(gates, "gates", (B, T, HQ, C), q)
    elif gates is not None:
        raise SpecError("E609", f"output = {spec.output.kind}(...) takes no gates, but gates were given",
                        hint="drop the gates argument, or use output = gate(sigmoid, ...)")
    for name, idx in indices.items():
        b = spec.branch(name)
        Hs = 1 if spec.score_kind(b) == "indexer" else H
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64) \
                or tuple(idx.shape) != (B, T, Hs, b.top_k):
            raise SpecError("E626", f"indices['{name}'] must be an int32 tensor [{B}, {T}, {Hs}, {b.top_k}] "
                                    f"(block numbers, -1 padded); got {_shape(idx)} "
                                    f"{getattr(idx, 'dtype', '')}")
        if idx.device != q.device:
            raise SpecError("E607", f"indices['{name}'] is on {idx.device} but q is on {q.device}")
    for b in branches:
        if b.kind != "indexer":
            continue
        if b.name not in index:
            raise SpecError("E627", f"branch '{b.name}' is an indexer: the call needs its inputs",
                            hint=f"pass index={{'{b.name}': (q_idx [B, T, {b.heads}, {b.dim}], "
                                 f"k_idx [B, T, {b.dim}], w_idx [B, T, {b.heads}])}} "
                                 "(nsa_dsl.SparseAttention does this for you)")
        triple = index[b.name]
        if not (isinstance(triple, (tuple, list)) and len(triple) == 3):
            raise SpecError("E627", f"index['{b.name}'] must be a triple (q_idx, k_idx, w_idx)")
        for x, what, shape in zip(triple, ("q_idx", "k_idx", "w_idx"),
                                  ((B, T, b.heads, b.dim), (B, Tk, b.dim), (B, T, b.heads))):
            _tensor(x, f"index['{b.name}'] {what}", shape, q)
    return Call(B, T, HQ, H, Dqk, Dv, ks, vs, compressed, indices, index, gates, Tk, q_start)


def _per_branch(x, what: str, names, raw) -> dict:
    """``k`` or ``v``: one tensor shared by every branch, or a dict by branch name with an entry
    for each branch that reads raw keys."""
    import torch
    if isinstance(x, torch.Tensor):
        return {b.name: x for b in raw}
    if isinstance(x, Mapping):
        unknown = sorted(str(n) for n in x if n not in names)
        if unknown:
            raise SpecError("E608", f"{what} has keys for unknown branches {unknown}",
                            hint=f"the spec's branches are {', '.join(names)}")
        missing = [b.name for b in raw if b.name not in x]
        if missing:
            raise SpecError("E608", f"{what} has no tensor for branch(es) {missing}, which read raw keys",
                            hint="pass k and v as tensors shared by all branches, or dicts with an entry "
                                 f"for each of {', '.join(b.name for b in raw)}")
        return {b.name: x[b.name] for b in raw}
    raise SpecError("E601", f"{what} must be a tensor or a dict of branch name -> tensor, got {type(x).__name__}")


def _agree(H, h, Dv, dv, where: str):
    if H is not None and h != H:
        raise SpecError("E601", f"{where}: {h} kv heads, but another branch has {H}")
    if Dv is not None and dv != Dv:
        raise SpecError("E601", f"{where}: value dim {dv}, but another branch has {Dv}")
    return h, dv
