"""What a run on random inputs passes the op besides q, k, v and gates (demo-free tools: bench,
tune, show): mean-pooled compressed keys where a branch learns its pool (the pool is the
module's job; the op then takes compressed keys from the caller), and random indexer inputs
(q_idx, k_idx, w_idx) for each indexer."""
from __future__ import annotations

from typing import Optional

import torch

from nsa_dsl.language.ir import Spec
from nsa_dsl.semantics.reference import mean_pool


def mean_blocks(name: str, k_blocks: torch.Tensor, v_blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A KV cache's ``pool`` for a learned pooling in a run on random inputs: the blocks' mean
    (``[P, l, H, D]`` -> ``[P, H, D]``), as ``side_inputs`` stands in for a training call."""
    return k_blocks.mean(1), v_blocks.mean(1)


def side_inputs(spec: Spec, k: torch.Tensor, v: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> tuple[dict, dict]:
    """``(compressed, index)`` for ``op(q, k, v, gates, compressed=..., index=...)``; each empty
    when the spec needs none. Shapes, dtype and device follow ``k``."""
    B, T = k.shape[:2]
    compressed = {b.name: (mean_pool(k, b.block, b.stride).contiguous(), mean_pool(v, b.block, b.stride).contiguous())
                  for b in spec.of_kind("compress") if b.pool != "mean"}

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=k.device, dtype=k.dtype)
    index = {b.name: (randn(B, T, b.heads, b.dim), randn(B, T, b.dim),
                      torch.rand(B, T, b.heads, generator=generator, device=k.device, dtype=k.dtype))
             for b in spec.of_kind("indexer")}
    return compressed, index
