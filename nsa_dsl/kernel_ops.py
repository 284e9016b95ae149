"""The generated kernels as torch.library custom ops, with autograd and fake kernels.

Kernels are specialised per spec and shapes, so the ops are generic: their first
argument is a key naming a loaded generated module (``register_module``). A key
is a plain string, so ``torch.compile(fullgraph=True)`` traces calls without
graph breaks, and the fake implementations give it every output shape.

No gradient flows through the choice of blocks (``idx``) or through the
log-sum-exps, which are returned for inspection and for the scoring pass.

Packed variable-length batches: every attention and top-k op takes an optional
``cu_seqlens [N + 1]`` int32 (``B = 1``), passed to the launchers of a module generated
with ``VARLEN`` (``codegen.plan.lower(..., varlen=True)``); it gets no gradient, and the
output shapes are the same as without it.
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from codegen import tuning

_MODULES: dict[str, ModuleType] = {}


def register_module(key: str, module: ModuleType) -> str:
    _MODULES[key] = module
    return key


def module(key: str) -> ModuleType:
    try:
        return _MODULES[key]
    except KeyError:
        raise RuntimeError(f"nsa-dsl: no generated kernel module is loaded under {key!r}; "
                           "call the op from nsa_dsl.compile(spec) in this process first") from None


def _o_lse(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    B, T, HQ, _ = q.shape
    return q.new_empty(B, T, HQ, v.shape[-1]), q.new_empty(B, T, HQ, dtype=torch.float32)


def _no_grad_outputs(ctx, *tensors):
    ctx.mark_non_differentiable(*tensors)


# -- attention branches: (o, lse) forward, (dq, dk, dv) backward --------------------------------

def _seq(cu_seqlens: Optional[Tensor]) -> dict:
    """Launcher keyword for packed sequences (none without them: the plain launchers' call)."""
    return {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}


def _run(key: str, launcher: str, q: Tensor, *args, **kwargs):
    """``module(key).<launcher>(*args, **kwargs)`` with the tuned configs of q's shape bucket on
    this GPU, if any (``codegen.tuning``: a dict lookup; tunes first when asked to)."""
    mod = module(key)
    config = tuning.config_for(key, mod, launcher, q, args, kwargs)
    if config:
        kwargs["config"] = config
    return getattr(mod, launcher)(*args, **kwargs)


@torch.library.custom_op("nsa_dsl::compress_fwd", mutates_args=())
def compress_fwd(key: str, q: Tensor, k: Tensor, v: Tensor, scale: float,
                 cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    return _run(key, "fwd", q, q, k, v, scale, **_seq(cu_seqlens))


@torch.library.custom_op("nsa_dsl::compress_bwd", mutates_args=())
def compress_bwd(key: str, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
                 scale: float, cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    return _run(key, "bwd", q, q, k, v, o, lse, do, scale, **_seq(cu_seqlens))


@torch.library.custom_op("nsa_dsl::window_fwd", mutates_args=())
def window_fwd(key: str, q: Tensor, k: Tensor, v: Tensor, scale: float,
               cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    return _run(key, "fwd", q, q, k, v, scale, **_seq(cu_seqlens))


@torch.library.custom_op("nsa_dsl::window_bwd", mutates_args=())
def window_bwd(key: str, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
               scale: float, cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    return _run(key, "bwd", q, q, k, v, o, lse, do, scale, **_seq(cu_seqlens))


@torch.library.custom_op("nsa_dsl::select_fwd", mutates_args=())
def select_fwd(key: str, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float,
               cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    return _run(key, "fwd", q, q, k, v, idx, scale, **_seq(cu_seqlens))


@torch.library.custom_op("nsa_dsl::select_bwd", mutates_args=())
def select_bwd(key: str, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, o: Tensor, lse: Tensor,
               do: Tensor, scale: float, cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    return _run(key, "bwd", q, q, k, v, idx, o, lse, do, scale, **_seq(cu_seqlens))


for _fwd in (compress_fwd, window_fwd):
    _fwd.register_fake(lambda key, q, k, v, scale, cu_seqlens=None: _o_lse(q, v))
select_fwd.register_fake(lambda key, q, k, v, idx, scale, cu_seqlens=None: _o_lse(q, v))


def _grads_fake(key, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


for _bwd in (compress_bwd, window_bwd, select_bwd):
    _bwd.register_fake(_grads_fake)


def _setup_qkv(ctx, inputs, output):
    key, q, k, v, scale, cu_seqlens = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.key, ctx.scale = key, scale
    _no_grad_outputs(ctx, lse)


def _backward_with(bwd_op):
    def backward(ctx, do, dlse):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = bwd_op(ctx.key, q, k, v, o, lse, do.contiguous(), ctx.scale, cu_seqlens)
        return None, dq, dk, dv, None, None
    return backward


compress_fwd.register_autograd(_backward_with(compress_bwd), setup_context=_setup_qkv)
window_fwd.register_autograd(_backward_with(window_bwd), setup_context=_setup_qkv)


def _setup_select(ctx, inputs, output):
    key, q, k, v, idx, scale, cu_seqlens = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, idx, o, lse, cu_seqlens)
    ctx.key, ctx.scale = key, scale
    _no_grad_outputs(ctx, lse)


def _select_backward(ctx, do, dlse):
    q, k, v, idx, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = select_bwd(ctx.key, q, k, v, idx, o, lse, do.contiguous(), ctx.scale, cu_seqlens)
    return None, dq, dk, dv, None, None, None


select_fwd.register_autograd(_select_backward, setup_context=_setup_select)


# -- the window branch with the output's combination (inference) ------------------------------

@torch.library.custom_op("nsa_dsl::window_combine_fwd", mutates_args=())
def window_combine_fwd(key: str, q: Tensor, k: Tensor, v: Tensor, others: list[Tensor],
                       gates: Optional[Tensor], wpos: int, scale: float,
                       cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """The op's output from the window kernel's epilogue: the window branch at index ``wpos`` of
    the output's branches, ``others`` the rest in order. No autograd (the op calls it only when
    nothing needs a gradient; training runs window_fwd and combine_fwd)."""
    return _run(key, "fwd_combine", q, q, k, v, scale, others, wpos, gates, **_seq(cu_seqlens))


@window_combine_fwd.register_fake
def _(key, q, k, v, others, gates, wpos, scale, cu_seqlens=None):
    return q.new_empty(*q.shape[:3], v.shape[-1])


# -- block selection (no gradient) ------------------------------------------------------------

@torch.library.custom_op("nsa_dsl::topk_cmp", mutates_args=())
def topk_cmp(key: str, q: Tensor, k_cmp: Tensor, lse_cmp: Tensor, scale: float, top_k: int,
             cu_seqlens: Optional[Tensor] = None) -> Tensor:
    return _run(key, "topk", q, q, k_cmp, lse_cmp, scale, **_seq(cu_seqlens))


@torch.library.custom_op("nsa_dsl::topk_mean_pool", mutates_args=())
def topk_mean_pool(key: str, q: Tensor, k: Tensor, kv_heads: int, top_k: int,
                   cu_seqlens: Optional[Tensor] = None) -> Tensor:
    return _run(key, "topk_mean_pool", q, q, k, **_seq(cu_seqlens))


@topk_cmp.register_fake
def _(key, q, k_cmp, lse_cmp, scale, top_k, cu_seqlens=None):
    B, T = q.shape[:2]
    return q.new_empty(B, T, k_cmp.shape[2], top_k, dtype=torch.int32)


@topk_mean_pool.register_fake
def _(key, q, k, kv_heads, top_k, cu_seqlens=None):
    B, T = q.shape[:2]
    return q.new_empty(B, T, kv_heads, top_k, dtype=torch.int32)


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
    return torch.empty_like(outs[0])


@combine_bwd.register_fake
def _(key, outs, gates, do):
    return [torch.empty_like(o) for o in outs] + ([torch.empty_like(gates)] if gates is not None else [])


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
