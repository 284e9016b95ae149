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

    def bwd(self, outs: Sequence[torch.Tensor], gates: Optional[torch.Tensor], do: torch.Tensor):
        """(d_outs, d_gates): d_outs[c] = g_c * do, d_gates the gradient of the gate logits (None
        when outputs are summed)."""
        if not self.GATED:
            return [do for _ in outs], None
        outs = [o.contiguous() for o in outs]
        d_outs = [new_output(o.shape, o.dtype, o.device) for o in outs]
        d_gates = self._bwd(outs, d_outs, outs, gates, do, None)     # lse pointers unread: outs stand in
        return d_outs, d_gates

    def bwd_folded(self, outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor], gates: torch.Tensor,
                   do: torch.Tensor):
        """The gated backward with each gate folded into its branch's backward (the template's
        FOLD): (d_gates, lses, deltas), branch c's backward run on ``do`` itself with
        ``lse=lses[c]`` = lse_c - ln g_c and ``delta=deltas[c]`` = rowsum(do * o_c) ([B, T, HQ]
        fp32 each) gives the gradients of d o_c = g_c * do, without writing d o_c."""
        assert self.GATED, "a summed output has no gates to fold"
        outs = [o.contiguous() for o in outs]
        folded = torch.empty((2, self.C, *do.shape[:-1]), dtype=torch.float32, device=do.device)
        lses = [x.float().contiguous() for x in lses]
        d_gates = self._bwd(outs, outs, lses, gates, do, folded)
        return d_gates, list(folded[1].unbind(0)), list(folded[0].unbind(0))

    def _bwd(self, outs, d_outs, lses, gates, do, folded):
        """One launch of combine_bwd_kernel; folded [2, C, rows] (delta, lse) selects FOLD, d_outs
        are then not written (any tensors stand in)."""
        do = do.contiguous()
        n_rows = do.numel() // self.DV
        d_gates = new_output(gates.shape, gates.dtype, gates.device)
        fold = folded is not None
        delta, lse_fold = (folded[0], folded[1]) if fold else (d_gates, d_gates)
        args = [t for c in range(self.C) for t in (outs[c], d_outs[c], lses[c])]
        self.kernels.combine_bwd_kernel[(cdiv(n_rows, self.BR),)](
            *args, gates.contiguous(), d_gates, do, delta, lse_fold, n_rows, **self._consts(), FOLD=fold)
        return d_gates
