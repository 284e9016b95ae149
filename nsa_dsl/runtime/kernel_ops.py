"""The generated kernels as torch.library custom ops, with autograd and fake kernels.

Kernels are specialised per spec and shapes, so the ops are generic: their first
argument is a key naming a loaded generated module (``register``). A key
is a plain string, so ``torch.compile(fullgraph=True)`` traces calls without
graph breaks, and the fake implementations give it every output shape.

No gradient flows through the choice of blocks (``idx``) or through the
log-sum-exps, which are returned for inspection and for the scoring pass.

Packed variable-length batches: every attention and top-k op takes an optional
``cu_seqlens [N + 1]`` int32 (``B = 1``), passed to the launchers of a module generated
with ``VARLEN`` (``nsa_dsl.codegen.plan.lower(..., varlen=True)``); it gets no gradient, and the
output shapes are the same as without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from nsa_dsl.codegen import tuning
from nsa_dsl.codegen.launch import Family

_REGISTRY: dict[str, object] = {}   # key -> a generated kernel module or a Program


def register(key: str, obj) -> str:
    """Make a generated kernel module or a Program reachable from the ops under ``key``."""
    _REGISTRY[key] = obj
    return key


def module(key: str) -> Family:
    """The launchers registered under ``key`` (a ``nsa_dsl.codegen.launch.Family``)."""
    return _registered(key, Family, "kernel family")


def _registered(key: str, kind: type, what: str):
    obj = _REGISTRY.get(key)
    if not isinstance(obj, kind):
        raise RuntimeError(f"nsa-dsl: no {what} is registered under {key!r}; "
                           "call the op from nsa_dsl.compile(spec) in this process first")
    return obj


def _o_lse(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    B, T, HQ, _ = q.shape
    return q.new_empty(B, T, HQ, v.shape[-1]), q.new_empty(B, T, HQ, dtype=torch.float32)


def _no_grad_outputs(ctx, *tensors):
    ctx.mark_non_differentiable(*tensors)


# -- attention branches: (o, lse) forward, (dq, dk, dv) backward --------------------------------

def _seq(cu_seqlens: Optional[Tensor], q_start: int = 0) -> dict:
    """Launcher keywords for packed sequences or a query piece (q's rows are positions q_start ..
    of a sequence whose keys are all given); none for the plain launchers' call."""
    return {"cu_seqlens": cu_seqlens} if cu_seqlens is not None else {"q_start": q_start} if q_start else {}


def _run(key: str, launcher: str, q: Tensor, *args, **kwargs):
    """``module(key).<launcher>(*args, **kwargs)`` with the tuned configs of q's shape bucket on
    this GPU, if any (``nsa_dsl.codegen.tuning``: a dict lookup; tunes first when asked to)."""
    mod = module(key)
    config = tuning.config_for(key, mod, launcher, q, args, kwargs)
    if config:
        kwargs["config"] = config
    return getattr(mod, launcher)(*args, **kwargs)


@torch.library.custom_op("nsa_dsl::compress_fwd", mutates_args=())
def compress_fwd(key: str, q: Tensor, k: Tensor, v: Tensor, scale: float,
                 cu_seqlens: Optional[Tensor] = None, q_start: int = 0) -> tuple[Tensor, Tensor]:
    return _run(key, "fwd", q, q, k, v, scale, **_seq(cu_seqlens, q_start))


@torch.library.custom_op("nsa_dsl::compress_bwd", mutates_args=())
def compress_bwd(key: str, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
                 scale: float, cu_seqlens: Optional[Tensor] = None, q_start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    return _run(key, "bwd", q, q, k, v, o, lse, do, scale, **_seq(cu_seqlens, q_start))


@torch.library.custom_op("nsa_dsl::window_fwd", mutates_args=())
def window_fwd(key: str, q: Tensor, k: Tensor, v: Tensor, scale: float,
               cu_seqlens: Optional[Tensor] = None, q_start: int = 0) -> tuple[Tensor, Tensor]:
    return _run(key, "fwd", q, q, k, v, scale, **_seq(cu_seqlens, q_start))


@torch.library.custom_op("nsa_dsl::window_bwd", mutates_args=())
def window_bwd(key: str, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
               scale: float, cu_seqlens: Optional[Tensor] = None, q_start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    return _run(key, "bwd", q, q, k, v, o, lse, do, scale, **_seq(cu_seqlens, q_start))


@torch.library.custom_op("nsa_dsl::select_fwd", mutates_args=())
def select_fwd(key: str, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float,
               cu_seqlens: Optional[Tensor] = None, q_start: int = 0) -> tuple[Tensor, Tensor]:
    return _run(key, "fwd", q, q, k, v, idx, scale, **_seq(cu_seqlens, q_start))


@torch.library.custom_op("nsa_dsl::select_bwd", mutates_args=())
def select_bwd(key: str, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, o: Tensor, lse: Tensor,
               do: Tensor, scale: float, cu_seqlens: Optional[Tensor] = None,
               q_start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    return _run(key, "bwd", q, q, k, v, idx, o, lse, do, scale, **_seq(cu_seqlens, q_start))


for _fwd in (compress_fwd, window_fwd):
    _fwd.register_fake(lambda key, q, k, v, scale, cu_seqlens=None, q_start=0: _o_lse(q, v))
select_fwd.register_fake(lambda key, q, k, v, idx, scale, cu_seqlens=None, q_start=0: _o_lse(q, v))


def _grads_fake(key, q, k, v, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


for _bwd in (compress_bwd, window_bwd, select_bwd):
    _bwd.register_fake(_grads_fake)


def _setup_qkv(ctx, inputs, output):
    key, q, k, v, scale, cu_seqlens, q_start = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.key, ctx.scale, ctx.q_start = key, scale, q_start
    _no_grad_outputs(ctx, lse)


def _backward_with(bwd_op):
    def backward(ctx, do, dlse):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = bwd_op(ctx.key, q, k, v, o, lse, do.contiguous(), ctx.scale, cu_seqlens, ctx.q_start)
        return None, dq, dk, dv, None, None, None
    return backward


compress_fwd.register_autograd(_backward_with(compress_bwd), setup_context=_setup_qkv)
window_fwd.register_autograd(_backward_with(window_bwd), setup_context=_setup_qkv)


def _setup_select(ctx, inputs, output):
    key, q, k, v, idx, scale, cu_seqlens, q_start = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, idx, o, lse, cu_seqlens)
    ctx.key, ctx.scale, ctx.q_start = key, scale, q_start
    _no_grad_outputs(ctx, lse)


def _select_backward(ctx, do, dlse):
    q, k, v, idx, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = select_bwd(ctx.key, q, k, v, idx, o, lse, do.contiguous(), ctx.scale, cu_seqlens, ctx.q_start)
    return None, dq, dk, dv, None, None, None, None


select_fwd.register_autograd(_select_backward, setup_context=_setup_select)


# -- the window branch with the output's combination (inference) ------------------------------

@torch.library.custom_op("nsa_dsl::window_combine_fwd", mutates_args=())
def window_combine_fwd(key: str, q: Tensor, k: Tensor, v: Tensor, others: list[Tensor],
                       gates: Optional[Tensor], wpos: int, scale: float,
                       cu_seqlens: Optional[Tensor] = None, q_start: int = 0) -> Tensor:
    """The op's output from the window kernel's epilogue: the window branch at index ``wpos`` of
    the output's branches, ``others`` the rest in order. No autograd (the op calls it only when
    nothing needs a gradient; training runs window_fwd and combine_fwd)."""
    return _run(key, "fwd_combine", q, q, k, v, scale, others, wpos, gates, **_seq(cu_seqlens, q_start))


@window_combine_fwd.register_fake
def _(key, q, k, v, others, gates, wpos, scale, cu_seqlens=None, q_start=0):
    return q.new_empty(*q.shape[:3], v.shape[-1])


# -- block selection (no gradient) ------------------------------------------------------------

@torch.library.custom_op("nsa_dsl::topk_cmp", mutates_args=())
def topk_cmp(key: str, q: Tensor, k_cmp: Tensor, lse_cmp: Tensor, scale: float, top_k: int,
             cu_seqlens: Optional[Tensor] = None, q_start: int = 0, n_keys: int = 0) -> Tensor:
    """``n_keys``: a query piece's sequence length (its compressed keys alone do not tell it)."""
    piece = {"n_keys": n_keys} if n_keys else {}
    return _run(key, "topk", q, q, k_cmp, lse_cmp, scale, **_seq(cu_seqlens, q_start), **piece)


@torch.library.custom_op("nsa_dsl::topk_mean_pool", mutates_args=())
def topk_mean_pool(key: str, q: Tensor, k: Tensor, kv_heads: int, top_k: int,
                   cu_seqlens: Optional[Tensor] = None, q_start: int = 0) -> Tensor:
    return _run(key, "topk_mean_pool", q, q, k, **_seq(cu_seqlens, q_start))


@topk_cmp.register_fake
def _(key, q, k_cmp, lse_cmp, scale, top_k, cu_seqlens=None, q_start=0, n_keys=0):
    B, T = q.shape[:2]
    return q.new_empty(B, T, k_cmp.shape[2], top_k, dtype=torch.int32)


@topk_mean_pool.register_fake
def _(key, q, k, kv_heads, top_k, cu_seqlens=None, q_start=0):
    B, T = q.shape[:2]
    return q.new_empty(B, T, kv_heads, top_k, dtype=torch.int32)


# -- token selection by an indexer (no gradient) and the indexer's loss --------------------------

@torch.library.custom_op("nsa_dsl::indexer_topk", mutates_args=())
def indexer_topk(key: str, q_idx: Tensor, k_idx: Tensor, w_idx: Tensor, top_k: int,
                 cu_seqlens: Optional[Tensor] = None, q_start: int = 0) -> Tensor:
    """The tokens each position attends, [B, T, 1, top_k] int32 (``codegen.launch.indexer``)."""
    return _run(key, "topk", q_idx, q_idx, k_idx, w_idx, **_seq(cu_seqlens, q_start))


@indexer_topk.register_fake
def _(key, q_idx, k_idx, w_idx, top_k, cu_seqlens=None, q_start=0):
    return q_idx.new_empty(*q_idx.shape[:2], 1, top_k, dtype=torch.int32)


@torch.library.custom_op("nsa_dsl::index_loss_fwd", mutates_args=())
def index_loss_fwd(key: str, q: Tensor, k: Tensor, idx: Tensor, lse: Tensor, q_idx: Tensor, k_idx: Tensor,
                   w_idx: Tensor, scale: float, cu_seqlens: Optional[Tensor] = None,
                   q_start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, lse of the index scores, sum of p), each [B, T] fp32 (``codegen.launch.index_loss``)."""
    return _run(key, "fwd", q, q, k, idx, lse, q_idx, k_idx, w_idx, scale, **_seq(cu_seqlens, q_start))


@torch.library.custom_op("nsa_dsl::index_loss_bwd", mutates_args=())
def index_loss_bwd(key: str, q: Tensor, k: Tensor, idx: Tensor, lse: Tensor, q_idx: Tensor, k_idx: Tensor,
                   w_idx: Tensor, lse_i: Tensor, psum: Tensor, dloss: Tensor, scale: float,
                   cu_seqlens: Optional[Tensor] = None, q_start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    return _run(key, "bwd", q, q, k, idx, lse, q_idx, k_idx, w_idx, lse_i, psum, dloss, scale,
                **_seq(cu_seqlens, q_start))


@index_loss_fwd.register_fake
def _(key, q, k, idx, lse, q_idx, k_idx, w_idx, scale, cu_seqlens=None, q_start=0):
    return tuple(q.new_empty(q.shape[:2], dtype=torch.float32) for _ in range(3))


@index_loss_bwd.register_fake
def _(key, q, k, idx, lse, q_idx, k_idx, w_idx, lse_i, psum, dloss, scale, cu_seqlens=None, q_start=0):
    return q_idx.new_empty(q_idx.shape), k_idx.new_empty(k_idx.shape), w_idx.new_empty(w_idx.shape)


def _setup_index_loss(ctx, inputs, output):
    key, q, k, idx, lse, q_idx, k_idx, w_idx, scale, cu_seqlens, q_start = inputs
    _, lse_i, psum = output
    ctx.save_for_backward(q, k, idx, lse, q_idx, k_idx, w_idx, lse_i, psum, cu_seqlens)
    ctx.key, ctx.scale, ctx.q_start = key, scale, q_start
    _no_grad_outputs(ctx, lse_i, psum)


def _index_loss_backward(ctx, dloss, dlse_i, dpsum):
    q, k, idx, lse, q_idx, k_idx, w_idx, lse_i, psum, cu_seqlens = ctx.saved_tensors
    dq_idx, dk_idx, dw_idx = index_loss_bwd(ctx.key, q, k, idx, lse, q_idx, k_idx, w_idx, lse_i, psum,
                                            dloss.contiguous(), ctx.scale, cu_seqlens, ctx.q_start)
    return None, None, None, None, None, dq_idx, dk_idx, dw_idx, None, None, None


index_loss_fwd.register_autograd(_index_loss_backward, setup_context=_setup_index_loss)


def index_losses(prog: "Program", q: Tensor, kv: dict, idxs: dict, lses: dict, index: dict, scale: float,
                 cu_seqlens: Optional[Tensor] = None, q_start: int = 0) -> dict:
    """``aux.index_loss``: [B, T] fp32 for each select branch an indexer scores, from its forward's
    selection and lse; the gradient reaches the indexer's inputs only (q, k, lse detached).
    ``q_start``: a query piece (see run_forward)."""
    return {b.name: index_loss_fwd(b.loss, q.detach(), kv[b.name][0].detach(), idxs[b.name], lses[b.name].detach(),
                                   *index[b.score], scale, cu_seqlens, q_start)[0]
            for b in prog.selects if b.loss}


# -- combination of branch outputs -------------------------------------------------------------

@torch.library.custom_op("nsa_dsl::combine_fwd", mutates_args=())
def combine_fwd(key: str, outs: list[Tensor], gates: Optional[Tensor]) -> Tensor:
    return module(key).fwd(outs, gates)


@torch.library.custom_op("nsa_dsl::combine_bwd", mutates_args=())
def combine_bwd(key: str, outs: list[Tensor], gates: Optional[Tensor], do: Tensor) -> list[Tensor]:
    d_outs, d_gates = module(key).bwd(outs, gates, do)
    return list(d_outs) + ([d_gates] if d_gates is not None else [])


@combine_fwd.register_fake
def _(key, outs, gates):
    return outs[0].new_empty(outs[0].shape)


@combine_bwd.register_fake
def _(key, outs, gates, do):
    return [o.new_empty(o.shape) for o in outs] + ([gates.new_empty(gates.shape)] if gates is not None else [])


def _setup_combine(ctx, inputs, output):
    key, outs, gates = inputs
    ctx.key, ctx.n, ctx.gated = key, len(outs), gates is not None
    if gates is not None:
        ctx.save_for_backward(*outs, gates)


def _combine_backward(ctx, do):
    if not ctx.gated:  # a plain sum passes the gradient through unchanged
        return None, [do] * ctx.n, None
    saved = ctx.saved_tensors
    outs, gates = list(saved[:ctx.n]), saved[ctx.n]
    grads = combine_bwd(ctx.key, outs, gates, do.contiguous())
    return None, grads[:ctx.n], grads[ctx.n]


combine_fwd.register_autograd(_combine_backward, setup_context=_setup_combine)


# -- the whole op as one autograd node (training) -----------------------------------------------
# The branches' backward passes then share what the per-branch ops cannot: the combination's
# backward hands each branch its rowsum(o * do) (no pass over o and do per branch), and each
# branch adds its gradient of q into one buffer inside its dq kernel (no gradient sums by autograd).

@dataclass(frozen=True)
class BranchKernels:
    """One branch of a program, in launch order: its kind, name and kernel modules (the spec's
    branch itself is ``nsa_dsl.language.ir.Branch``)."""
    kind: str                  # "compress", "select" or "window"
    name: str
    key: str                   # the branch's kernel module
    topk: str = ""             # select: the top-k module
    score: str = ""            # select: "mean_pool", or the compress branch whose scores it uses
    top_k: int = 0
    loss: str = ""             # select scored by an indexer: the index-loss module


@dataclass(frozen=True)
class Program:
    """What a compiled spec runs for one binding: branches in launch order (compress, select,
    window), the output's branches (gated when the call passes gates), the combine module."""
    branches: tuple[BranchKernels, ...]
    output: tuple[str, ...]
    combine: str
    kv_heads: int

    def branch(self, name: str) -> BranchKernels:
        return next(b for b in self.branches if b.name == name)

    @property
    def selects(self) -> tuple[BranchKernels, ...]:
        return tuple(b for b in self.branches if b.kind == "select")


def program(key: str) -> Program:
    return _registered(key, Program, "program")


def run_forward(prog: Program, q: Tensor, kv: dict, gates: Optional[Tensor], scale: float,
                cu_seqlens: Optional[Tensor] = None, *, given: Optional[dict] = None,
                combine_in: Optional[str] = None, index: Optional[dict] = None, q_start: int = 0):
    """The branches' forward through the per-branch ops: (outs, lses, idxs) by branch name, and
    the output when ``combine_in`` names the window branch whose kernel combines it (inference:
    that branch's o and lse are never stored), else None. ``kv``: branch name -> (k, v) its
    kernels read (compressed keys and values for compress branches); ``given``: select branch ->
    the caller's (cleaned) selection, which replaces its scoring; ``index``: indexer branch ->
    (q_idx, k_idx, w_idx), which score the select branches it names. ``q_start``: q's rows are the
    positions q_start .. of a sequence whose keys ``kv`` hold (a plan lowered with offsets)."""
    seq = (cu_seqlens, q_start)
    outs, lses, idxs = {}, {}, {}
    given, index = given or {}, index or {}
    for b in prog.branches:
        k, v = kv[b.name]
        if b.kind == "compress":
            outs[b.name], lses[b.name] = compress_fwd(b.key, q, k, v, scale, *seq)
        elif b.kind == "select":
            if b.name in given:
                idx = given[b.name]
            elif b.score in index:     # tokens, scored by an indexer
                idx = indexer_topk(b.topk, *(x.detach() for x in index[b.score]), b.top_k, *seq)
            elif b.score == "mean_pool":
                idx = topk_mean_pool(b.topk, q.detach(), k.detach(), prog.kv_heads, b.top_k, *seq)
            else:
                idx = topk_cmp(b.topk, q.detach(), kv[b.score][0].detach(), lses[b.score].detach(),
                               scale, b.top_k, *seq, k.shape[1] if k.shape[1] != q.shape[1] else 0)
            idxs[b.name] = idx
            outs[b.name], lses[b.name] = select_fwd(b.key, q, k, v, idx, scale, *seq)
        elif b.name == combine_in:     # the last branch launched
            others = [outs[n] for n in prog.output if n != b.name]
            return outs, lses, idxs, window_combine_fwd(b.key, q, k, v, others, gates,
                                                        prog.output.index(b.name), scale, *seq)
        else:
            outs[b.name], lses[b.name] = window_fwd(b.key, q, k, v, scale, *seq)
    return outs, lses, idxs, None


def _pairs(prog: Program, kv: list[Tensor]) -> dict:
    return {b.name: (kv[2 * i], kv[2 * i + 1]) for i, b in enumerate(prog.branches)}


@torch.library.custom_op("nsa_dsl::attention", mutates_args=())
def attention(key: str, q: Tensor, kv: list[Tensor], gates: Optional[Tensor], scale: float,
              cu_seqlens: Optional[Tensor], q_start: int = 0) -> list[Tensor]:
    """The whole op (program ``key``): [o, the output's branch outputs, their lse, the select
    branches' idx]; ``kv`` = [k, v] of each branch in launch order; ``cu_seqlens`` None without
    packed sequences (an argument without default: the backward returns a slot for each). Only
    o has a gradient. ``q_start``: a query piece (see run_forward)."""
    prog = program(key)
    outs, lses, idxs, _ = run_forward(prog, q, _pairs(prog, kv), gates, scale, cu_seqlens, q_start=q_start)
    o = module(prog.combine).fwd([outs[n] for n in prog.output], gates)
    return [o, *(outs[n] for n in prog.output), *(lses[n] for n in prog.output),
            *(idxs[b.name] for b in prog.selects)]


@attention.register_fake
def _(key, q, kv, gates, scale, cu_seqlens, q_start=0):
    prog = program(key)
    B, T, HQ = q.shape[:3]
    v = _pairs(prog, kv)[prog.output[0]][1]
    o = [q.new_empty(B, T, HQ, v.shape[-1]) for _ in range(1 + len(prog.output))]
    lse = [q.new_empty(B, T, HQ, dtype=torch.float32) for _ in prog.output]
    idx = [q.new_empty(B, T, prog.kv_heads, b.top_k, dtype=torch.int32) for b in prog.selects]
    return o + lse + idx


@torch.library.custom_op("nsa_dsl::attention_bwd", mutates_args=())
def attention_bwd(key: str, q: Tensor, kv: list[Tensor], gates: Optional[Tensor], outs: list[Tensor],
                  lses: list[Tensor], idxs: list[Tensor], do: Tensor, scale: float,
                  cu_seqlens: Optional[Tensor] = None, q_start: int = 0) -> list[Tensor]:
    """[dq, dk and dv of each branch in kv's order, (d gates)]: the combination's backward (gates:
    folded into each branch's lse and delta, ``Combine.bwd_folded``), then the branches' backward
    on do itself, adding into one dq (branches outside the output get zero gradients)."""
    prog = program(key)
    pairs = _pairs(prog, kv)
    if gates is not None:     # each gate folded into its branch's lse and delta: every branch runs on do
        d_gates, lses, deltas = module(prog.combine).bwd_folded(outs, lses, gates, do)
    else:
        d_gates, deltas = None, [None] * len(outs)
    idx = {b.name: i for b, i in zip(prog.selects, idxs)}
    seq = _seq(cu_seqlens, q_start)
    dq, grads = None, {}
    for i, name in enumerate(prog.output):
        b = prog.branch(name)
        k, v = pairs[name]
        extra = () if b.kind != "select" else (idx[name],)
        dq, dk, dv = _run(b.key, "bwd", q, q, k, v, *extra, outs[i], lses[i], do, scale,
                          delta=deltas[i], dq_acc=dq, **seq)
        grads[name] = (dk, dv)
    # contiguous like the kernels' gradients (and the fake below): zeros_like would copy K/V's strides
    flat = [g for b in prog.branches
            for g in grads.get(b.name, tuple(x.new_zeros(x.shape) for x in pairs[b.name]))]
    return [dq, *flat] + ([d_gates] if d_gates is not None else [])


@attention_bwd.register_fake      # every gradient contiguous, as the kernels return them
def _(key, q, kv, gates, outs, lses, idxs, do, scale, cu_seqlens=None, q_start=0):
    return [q.new_empty(q.shape), *(x.new_empty(x.shape) for x in kv)] + \
        ([gates.new_empty(gates.shape)] if gates is not None else [])


def _setup_attention(ctx, inputs, output):
    key, q, kv, gates, scale, cu_seqlens, q_start = inputs
    prog = program(key)
    n = len(prog.output)
    outs, lses, idxs = output[1:1 + n], output[1 + n:1 + 2 * n], output[1 + 2 * n:]
    ctx.save_for_backward(q, gates, cu_seqlens, *kv, *outs, *lses, *idxs)
    ctx.key, ctx.scale, ctx.n_kv, ctx.n, ctx.q_start = key, scale, len(kv), n, q_start
    _no_grad_outputs(ctx, *output[1:])
    ctx.set_materialize_grads(False)   # no zero-filled gradients for the aux outputs (3 x o's size)


def _attention_backward(ctx, grads):
    # a slot per argument the call passed: the dispatcher drops q_start when it is its default (0)
    # and the list input makes autograd check the structure
    tail = (None, None, None) if ctx.q_start else (None, None)
    if grads[0] is None:                      # o took no part in the loss
        return None, None, [None] * ctx.n_kv, None, *tail
    q, gates, cu_seqlens, *rest = ctx.saved_tensors
    kv, rest = rest[:ctx.n_kv], rest[ctx.n_kv:]
    outs, lses, idxs = rest[:ctx.n], rest[ctx.n:2 * ctx.n], rest[2 * ctx.n:]
    g = attention_bwd(ctx.key, q, kv, gates, outs, lses, idxs, grads[0].contiguous(), ctx.scale, cu_seqlens,
                      ctx.q_start)
    d_gates = g[1 + ctx.n_kv] if gates is not None else None
    return None, g[0], g[1:1 + ctx.n_kv], d_gates, *tail


attention.register_autograd(_attention_backward, setup_context=_setup_attention)
