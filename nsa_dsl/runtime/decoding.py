"""Decoding and chunked prefill over a KV cache (``nsa_dsl.runtime.kv_cache``): in plain PyTorch
(``decode_torch``, the reference semantics at the new tokens' positions) or with the generated
decode kernels (``DecodeOp``, ``templates/decode.py.j2``).

    step = cache.append(k_new, v_new)                     # [B, C, H, D]
    o = DecodeOp(spec)(q_new, cache, step, gates_new)     # generated kernels
    o = decode_torch(spec, q_new, cache, step, gates_new) # the same in plain PyTorch (CPU friendly)

Token ``i`` of sequence ``b`` sits at position ``start[b] + i`` and attends causally to the cache
``[0, t]``, its own chunk included: the outputs equal those of the full forward
(``nsa_dsl.reference``) at the same positions, for every branch. A decode step is a group of
one: selections with ``query_block = Q`` choose per token here (a group's later positions are
not known yet when its first tokens decode).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import Tensor

from nsa_dsl.errors import SpecError
from nsa_dsl.language.ir import Spec
from nsa_dsl.language.rules import num_compressed_blocks
from nsa_dsl.runtime.backend import check_kernel_device
from nsa_dsl.runtime.kv_cache import DecodeStep, NSACache, check_decode_call
from nsa_dsl.semantics.inputs import check_scale
from nsa_dsl.semantics.reference import Aux, reference

__all__ = ["DecodeOp", "decode_torch", "per_token"]


def _err(code: str, message: str, hint: str | None = None) -> SpecError:
    return SpecError(code, message, hint=hint)


def per_token(spec: Spec) -> Spec:
    """``spec`` with every selection made per token (``query_block = 1``): what decoding runs."""
    if all(b.kind != "select" or b.query_block == 1 for b in spec.branches):
        return spec
    return dataclasses.replace(spec, branches=tuple(
        dataclasses.replace(b, query_block=1) if b.kind == "select" else b for b in spec.branches))


def decode_torch(spec: Spec, q: Tensor, cache: NSACache, step: DecodeStep, gates: Optional[Tensor] = None, *,
                 scale: Optional[float] = None, return_aux: bool = False,
                 index: Optional[Mapping[str, tuple]] = None):
    """Every branch for the chunk of ``step``: ``nsa_dsl.reference`` on each sequence's new tokens
    (``q_start`` = its cache length before the chunk) over the keys the cache holds, its pooled
    compressed blocks (mean or learned) and indexer keys. ``q [B, C, HQ, Dqk]``, ``gates
    [B, C, HQ, n_gates]`` (logits); ``index``: indexer branch -> ``(q_idx [B, C, HI, DI], w_idx
    [B, C, HI])``. Returns ``o [B, C, HQ, Dv]`` (q.dtype) or ``(o, Aux)``; padded tokens give 0.
    Computes in fp32 (float64 inputs stay float64)."""
    check_decode_call(spec, q, cache, step, gates)
    B, C, HQ, Dqk = q.shape
    scale = check_scale(scale, Dqk)
    run = per_token(spec)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    index = dict(index or {})
    if set(index) != set(cache.k_idx):
        raise _err("E627", f"decoding {spec.name} needs index inputs for {sorted(cache.k_idx)}, got {sorted(index)}",
                   hint="index={name: (q_idx [B, C, HI, DI], w_idx [B, C, HI])}")
    o = q.new_zeros(B, C, HQ, cache.v_dim, dtype=acc)
    auxes = []
    for b in range(B):
        s, n = step.start_host[b], step.n_host[b]
        L = s + n
        if n == 0:
            auxes.append(None)
            continue
        keys = {name: cache.k[name][b:b + 1, :L].to(acc) for name in spec.attention_names}
        vals = {name: cache.v[name][b:b + 1, :L].to(acc) for name in spec.attention_names}
        compressed = {c.name: tuple(x[b:b + 1, :num_compressed_blocks(L, c.block, c.stride)].to(acc)
                                    for x in (cache.k_cmp[c.name], cache.v_cmp[c.name]))
                      for c in spec.of_kind("compress")}
        idx_in = {name: (qi[b:b + 1, :n].to(acc), cache.k_idx[name][b:b + 1, :L].to(acc), wi[b:b + 1, :n].to(acc))
                  for name, (qi, wi) in index.items()}
        out = reference(run, q[b:b + 1, :n].to(acc), keys, vals,
                        None if gates is None else gates[b:b + 1, :n].to(acc), compressed=compressed or None,
                        scale=scale, return_aux=return_aux, index=idx_in or None, q_start=s)
        o_b, aux_b = out if return_aux else (out, None)
        o[b:b + 1, :n] = o_b
        auxes.append(aux_b)
    if not return_aux:
        return o.to(q.dtype)
    return o.to(q.dtype), _stack_aux(spec, auxes, B, C, HQ, cache, q)


def _stack_aux(spec: Spec, auxes, B, C, HQ, cache, q) -> Aux:
    """The sequences' Aux as one, padded tokens as the kernels give them (-1, -inf, 0)."""
    dev = q.device
    indices, lse, outputs = {}, {}, {}
    for b_ in spec.of_kind("select"):
        H = 1 if spec.score_kind(b_) == "indexer" else cache.kv_heads
        indices[b_.name] = torch.full((B, C, H, b_.top_k), -1, dtype=torch.int32, device=dev)
    for name in spec.attention_names:
        lse[name] = torch.full((B, C, HQ), float("-inf"), dtype=torch.float32, device=dev)
        outputs[name] = q.new_zeros(B, C, HQ, cache.v_dim)
    for b, aux in enumerate(auxes):
        if aux is None:
            continue
        for name, x in aux.indices.items():
            indices[name][b, :x.shape[1]] = x[0]
        for name, x in aux.lse.items():
            lse[name][b, :x.shape[1]] = x[0].float()
        for name, x in aux.outputs.items():
            outputs[name][b, :x.shape[1]] = x[0].to(q.dtype)
    return Aux(indices=indices, lse=lse, outputs=outputs, spec=spec)


# ---------------------------------------------------------------------------------------------
# Decoding with the generated kernels
# ---------------------------------------------------------------------------------------------

class DecodeOp:
    """The spec's decode kernels (``templates/decode.py.j2`` rendered through ``codegen``,
    cached on disk like the training kernels). ``op(q, cache, step, gates)`` -> o [B, C, HQ, Dv]."""

    def __init__(self, spec: Spec, kernel_cache=None):
        self.spec = spec
        self._cache = kernel_cache
        self._modules = {}

    @property
    def kernel_cache(self):
        if self._cache is None:
            from nsa_dsl.codegen.cache import KernelCache
            self._cache = KernelCache()
        return self._cache

    def plan(self, heads: int, kv_heads: int, qk_dim: int, v_dim: int):
        from nsa_dsl.codegen.plan import bind, lower_decode
        return lower_decode(self.spec, bind(self.spec, heads, kv_heads, qk_dim, v_dim))

    def module(self, heads: int, kv_heads: int, qk_dim: int, v_dim: int):
        """The launcher for these shapes (``nsa_dsl.codegen.launch.decode.Decode``) over its rendered kernels."""
        key = (heads, kv_heads, qk_dim, v_dim)
        if key not in self._modules:
            from nsa_dsl.codegen import launch
            plan = self.plan(*key)
            self._modules[key] = launch.build(plan, self.kernel_cache.load(plan))["decode"]
        return self._modules[key]

    def source(self, heads: int, kv_heads: int, qk_dim: int, v_dim: int) -> str:
        """The generated Triton source for these shapes."""
        return Path(self.module(heads, kv_heads, qk_dim, v_dim).kernels.__file__).read_text()

    def __call__(self, q: Tensor, cache: NSACache, step: DecodeStep, gates: Optional[Tensor] = None, *,
                 scale: Optional[float] = None, return_aux: bool = False, config: Optional[dict] = None):
        spec = self.spec
        check_decode_call(spec, q, cache, step, gates)
        check_kernel_device(q, q.dtype, reference_hint="decode_torch (backend='reference')")
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise _err("E606", f"q has dtype {q.dtype}; the decode kernels take float16, bfloat16 or float32",
                       hint="use decode_torch (backend='reference') for float64")
        if spec.of_kind("indexer"):
            raise _err("E627", f"{spec.name} scores with an indexer, which the decode kernels do not run yet",
                       hint="decode with decode_torch (the layer's backend='reference')")
        B, C, HQ, Dqk = q.shape
        mod = self.module(HQ, cache.kv_heads, Dqk, cache.v_dim)
        scale = check_scale(scale, Dqk)
        cmp = [(cache.k_cmp[b.name], cache.v_cmp[b.name]) for b in spec.of_kind("compress")]
        sel = [(cache.k[b.name], cache.v[b.name], cache.k_mean.get(b.name)) for b in spec.of_kind("select")]
        win = [(cache.k[b.name], cache.v[b.name]) for b in spec.of_kind("window")]
        g = gates if spec.output.kind == "gate" else None
        o, idx, bo, blse = mod.decode(q, step.start, step.n_new, cmp, sel, win, g, scale,
                                      t_max=step.t_max, aux=return_aux, config=config)
        if not return_aux:
            return o
        order = [b.name for k in ("compress", "select", "window") for b in spec.of_kind(k)]
        return o, Aux(indices={b.name: i for b, i in zip(spec.of_kind("select"), idx)},
                      lse={n: blse[i] for i, n in enumerate(order)},
                      outputs={n: bo[i] for i, n in enumerate(order)}, spec=spec)

