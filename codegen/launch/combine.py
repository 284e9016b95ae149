"""Combination of branch outputs (``templates/combine.py.j2``): launchers.

Variables (the plan's): C (branches), DV, BDV (DV padded to a power of two), GATED (gate logits:
out = sum_c sigmoid(g_c) * o_c; else sum_c o_c). No launch configs: one program per BR rows.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from ..ints import cdiv
from . import family
from .base import Family, new_output


@family("combine")
class Combine(Family):
    BR = 16                     # rows per program

    def __init__(self, kernels, variables: Mapping):
        super().__init__(kernels, variables)
        v = self.variables
        self.C, self.DV, self.BDV, self.GATED = v["C"], v["DV"], v["BDV"], bool(v["GATED"])

    def _consts(self) -> dict:
        return dict(DV=self.DV, BDV=self.BDV, BR=self.BR)

    def fwd(self, outs: Sequence[torch.Tensor], gates: Optional[torch.Tensor]) -> torch.Tensor:
        """outs: C tensors [B, T, HQ, DV]; gates: [B, T, HQ, C] logits when GATED, else None."""
        outs = [o.contiguous() for o in outs]
        ref = outs[0]
        n_rows = ref.numel() // self.DV
        out = new_output(ref.shape, ref.dtype, ref.device)
        extra = (gates.contiguous(),) if self.GATED else ()
        self.kernels.combine_fwd_kernel[(cdiv(n_rows, self.BR),)](*outs, *extra, out, n_rows, **self._consts())
        return out

    def bwd(self, outs: Sequence[torch.Tensor], gates: Optional[torch.Tensor], do: torch.Tensor, *,
            with_delta: bool = False):
        """Returns (d_outs, d_gates), d_gates the gradient of the gate logits (None when outputs
        are summed). with_delta: returns (d_outs, d_gates, deltas) with deltas[c] =
        rowsum(d_outs[c] * outs[c]) [B, T, HQ] fp32 (None when outputs are summed: nothing is
        computed then, the branches find their own)."""
        if not self.GATED:
            return ([do for _ in outs], None, [None] * self.C) if with_delta else ([do for _ in outs], None)
        outs = [o.contiguous() for o in outs]
        do = do.contiguous()
        n_rows = do.numel() // self.DV
        d_outs = [new_output(o.shape, o.dtype, o.device) for o in outs]
        d_gates = new_output(gates.shape, gates.dtype, gates.device)
        delta = torch.empty((self.C, *do.shape[:-1]), dtype=torch.float32, device=do.device) if with_delta else d_gates
        args = [t for pair in zip(outs, d_outs) for t in pair]
        self.kernels.combine_bwd_kernel[(cdiv(n_rows, self.BR),)](
            *args, gates.contiguous(), d_gates, do, delta, n_rows, **self._consts(), DELTA=with_delta)
        return (d_outs, d_gates, list(delta.unbind(0))) if with_delta else (d_outs, d_gates)
