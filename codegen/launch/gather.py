"""Token-gather attention (``templates/gather.py.j2``): configs and launchers.

Variables (the plan's): G, GP (G padded to a power of two), DQK, DV, BDK, BDV (head dims padded to
powers of two), TOPK, CAUSAL, VARLEN, OFFSETS. The launchers take the select family's arguments
(``fwd(q, k, v, idx, scale)``, ``bwd(q, k, v, idx, o, lse, do, scale, delta=, dq_acc=)``, ``q_start=``)
with ``idx [B, T, 1, TOPK]`` token positions shared by every kv head, so the runtime's select ops
run either family. Query pieces (OFFSETS): ``q_start = s``, q holds the positions s .. of a
sequence whose keys k, v hold.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from . import family
from .base import LOG2E, Config, Family, check_piece, dq_buffer, is_tile, new_output, row_delta, unit_last
from .packed import check_packed, packed, seq_of_rows


@family("gather")
class Gather(Family):
    KINDS = ("fwd", "bwd")
    TUNE_KINDS = {"fwd": ("fwd",), "bwd": ("bwd",)}

    def __init__(self, kernels, variables: Mapping):
        super().__init__(kernels, variables)
        v = self.variables
        self.G, self.GP, self.DQK, self.DV = v["G"], v["GP"], v["DQK"], v["DV"]
        self.BDK, self.BDV, self.TOPK = v["BDK"], v["BDV"], v["TOPK"]
        self.BM = max(16, self.GP)                       # rows: the G heads of one position, padded
        self.varlen = bool(v.get("VARLEN", False))
        self.offsets = bool(v.get("OFFSETS", False))

    # -- configs ---------------------------------------------------------------------------------
    def _heuristic(self, kind: str, gpu: bool, T: int) -> Config:
        """The untuned config {BN, num_warps, num_stages}: BN gathered tokens per tile. GPU: 4 warps,
        8 for tiles of 8k elements and more (sm_90 through ptxas: G = 64, DQK = 192, DV = 128
        spills 568 bytes in bwd on 4 warps, 8 on 8; G = 16, D = 128 takes 164 registers on 4)."""
        if not gpu:
            return dict(BN=32, num_warps=4, num_stages=1)
        big = self.BM * max(self.BDK, self.BDV) >= 8192
        return dict(BN=64 if kind == "fwd" else 32, num_warps=8 if big else 4, num_stages=2)

    def _invalid(self, kind: str, cfg: Config) -> Optional[str]:
        if not is_tile(cfg["BN"]):
            return "BN must be a power of two of at least 16 (tl.dot)"
        return None

    def smem_bytes(self, kind: str, cfg: Config, dtype_bytes: int = 2) -> int:
        """The q tile (and do for bwd) loaded once, num_stages - 1 buffers of the gathered k / v tiles."""
        BM, BN, bufs = self.BM, cfg["BN"], max(1, cfg["num_stages"] - 1)
        once = BM * self.BDK + (BM * self.BDV if kind == "bwd" else 0)
        return (once + bufs * BN * (self.BDK + self.BDV)) * dtype_bytes

    def config_space(self, kind: str, T: int, *, smem: Optional[int] = None, dtype_bytes: int = 2) -> list[Config]:
        """16 to 128 tokens per tile x 2 / 4 / 8 warps x 2 / 3 stages."""
        cands = [dict(BN=bn, num_warps=w, num_stages=st) for bn in (16, 32, 64, 128) for w in (2, 4, 8) for st in (2, 3)]
        return self._prune(kind, cands, T, smem, dtype_bytes)

    # -- launchers ---------------------------------------------------------------------------------
    def _check(self, q, k, v, idx, cu_seqlens, q_start: int = 0):
        """(B, T, HQ, H, the sequence arguments): q [B, T, HQ, DQK] holds the positions q_start ..
        of a sequence whose keys are k [B, Tk, H, DQK], v [B, Tk, H, DV]."""
        B, T, HQ, dqk = q.shape
        H, Tk = k.shape[2], k.shape[1]
        if HQ != H * self.G or dqk != self.DQK or k.shape[3] != self.DQK or v.shape[3] != self.DV:
            raise ValueError(f"gather kernels were generated for G = {self.G}, DQK = {self.DQK}, DV = {self.DV}: "
                             f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        if k.shape[0] != B or v.shape[:3] != k.shape[:3]:
            raise ValueError(f"k and v must be [B, Tk, H, D] with q's B: k {tuple(k.shape)}, v {tuple(v.shape)}")
        if tuple(idx.shape) != (B, T, 1, self.TOPK):
            raise ValueError(f"idx has shape {tuple(idx.shape)}, expected {(B, T, 1, self.TOPK)}")
        check_packed(q, cu_seqlens, self.varlen, "gather")
        check_piece(q_start, T, Tk, 1, self.offsets, cu_seqlens, "gather")
        return B, T, HQ, H, self._seq(T, Tk, q_start, cu_seqlens)

    def _seq(self, T: int, Tk: int, q_start: int, cu_seqlens) -> tuple:
        """The sequence arguments: (cu_seqlens, the sequence of each row, T) packed, (Tk, T,
        q_start) with OFFSETS, else (T,)."""
        if self.offsets:
            return Tk, T, q_start
        if not self.varlen:
            return (T,)
        cu, _ = packed(cu_seqlens)
        return cu, seq_of_rows(cu, T).to(torch.int32), T

    @staticmethod
    def _strides(q, k, v, idx):
        return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), idx.stride(0), idx.stride(1))

    def _consts(self, cfg: Config) -> dict:
        return dict(G=self.G, BM=self.BM, TOPK=self.TOPK, BN=cfg["BN"], DQK=self.DQK, DV=self.DV,
                    BDK=self.BDK, BDV=self.BDV, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    def fwd(self, q, k, v, idx, scale, *, config=None, cu_seqlens=None, q_start: int = 0):
        """o [B, T, HQ, DV] (q.dtype), lse [B, T, HQ] (fp32); idx [B, T, 1, TOPK] int32 positions,
        ascending, -1 padded (packed: each sequence's own positions). q_start (OFFSETS): q's rows
        are the positions q_start .. of the sequence whose keys k, v [B, Tk, H, D] hold."""
        B, T, HQ, H, seq = self._check(q, k, v, idx, cu_seqlens, q_start)
        q, k, v, idx = unit_last(q), unit_last(k), unit_last(v), unit_last(idx.to(torch.int32))
        o = new_output((B, T, HQ, self.DV), q.dtype, q.device)
        lse = new_output((B, T, HQ), torch.float32, q.device)
        if B * T == 0:
            return o, lse
        cfg = self.resolve_config(q, "fwd", config)
        self.kernels.gather_fwd_kernel[(T, B * H)](
            q, k, v, idx, o, lse, scale * LOG2E, *seq, H, *self._strides(q, k, v, idx),
            **self._consts(cfg))
        return o, lse

    def bwd(self, q, k, v, idx, o, lse, do, scale, *, config=None, cu_seqlens=None, delta=None, dq_acc=None,
            q_start: int = 0):
        """(dq, dk, dv) in q.dtype; recomputes P from lse. delta: rowsum(o * do) [B, T, HQ] fp32
        when the caller has it; dq_acc: other branches' gradient of q (contiguous), added to in
        place and returned as dq. dk / dv sum in fp32 with atomics (the order of the adds is not
        fixed on a GPU: equal to rounding, not bit for bit, from run to run). q_start: as fwd;
        dk, dv [B, Tk, H, D] hold what q's rows give."""
        B, T, HQ, H, seq = self._check(q, k, v, idx, cu_seqlens, q_start)
        q, k, v, idx = unit_last(q), unit_last(k), unit_last(v), unit_last(idx.to(torch.int32))
        o, do, lse = o.contiguous(), do.contiguous(), lse.contiguous()
        dq = dq_buffer(q, dq_acc)
        if B * T == 0:
            return dq, k.new_zeros(k.shape), v.new_zeros(v.shape)      # no query row: no gradient to the keys
        delta = row_delta(self.kernels, o, do, self.DV, self.BDV) if delta is None else delta.contiguous()
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        cfg = self.resolve_config(q, "bwd", config)
        self.kernels.gather_bwd_kernel[(T, B * H)](
            q, k, v, idx, do, lse, delta, dq, dk, dv, scale * LOG2E, scale, *seq, H,
            *self._strides(q, k, v, idx), ACC=dq_acc is not None, **self._consts(cfg))
        return dq, dk.to(k.dtype), dv.to(v.dtype)
