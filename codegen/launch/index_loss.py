"""The indexer's loss (``templates/index_loss.py.j2``): configs and launchers.

Variables (the plan's): G, GP, DQK, BDK (the attention's), HI, HIP, DI, BDI (the indexer's,
``nsa_dsl.codegen.plan.indexer_vars``), TOPK, CAUSAL, VARLEN, OFFSETS.

``fwd`` gives ``loss [B, T]`` (fp32: ``KL(p_t || softmax(I[t, S_t]))``, the semantics'
``index_loss``) with what ``bwd`` needs, the log-sum-exp of the index scores over each list and
the sum of p; ``bwd`` the gradients of q_idx, k_idx and w_idx (none to q, k: p is detached).
Memory: O(T) beside the inputs; every position recomputes its p and I tile by tile. Query pieces
(OFFSETS): ``q_start = s``, q, idx, lse, q_idx, w_idx hold the positions s .. of a sequence whose
keys k, k_idx hold.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from . import family
from .base import LOG2E, Config, Family, check_piece, is_tile, new_output
from .packed import check_packed, packed, seq_of_rows


@family("index_loss")
class IndexLoss(Family):
    KINDS = ("fwd", "bwd")
    TUNE_KINDS = {"fwd": ("fwd",), "bwd": ("bwd",)}

    def __init__(self, kernels, variables: Mapping):
        super().__init__(kernels, variables)
        v = self.variables
        self.G, self.GP, self.DQK, self.BDK = v["G"], v["GP"], v["DQK"], v["BDK"]
        self.HI, self.HIP, self.DI, self.BDI, self.TOPK = v["HI"], v["HIP"], v["DI"], v["BDI"], v["TOPK"]
        self.BM, self.BJ = max(16, self.GP), max(16, self.HIP)   # rows of the tl.dot tiles
        self.varlen = bool(v.get("VARLEN", False))
        self.offsets = bool(v.get("OFFSETS", False))

    # -- configs ---------------------------------------------------------------------------------
    def _heuristic(self, kind: str, gpu: bool, T: int) -> Config:
        """The untuned config {BN, num_warps, num_stages}: BN listed tokens per tile. GPU: 4 warps,
        8 for tiles of 8k elements and more (sm_90 through ptxas: HI = 64, DI = 128 takes 254
        registers in bwd on 4 warps, 170 on 8)."""
        if not gpu:
            return dict(BN=32, num_warps=4, num_stages=1)
        big = max(self.BM * self.BDK, self.BJ * self.BDI) >= 8192
        return dict(BN=32, num_warps=8 if big else 4, num_stages=2)

    def _invalid(self, kind: str, cfg: Config) -> Optional[str]:
        if not is_tile(cfg["BN"]):
            return "BN must be a power of two of at least 16 (tl.dot)"
        return None

    def smem_bytes(self, kind: str, cfg: Config, dtype_bytes: int = 2) -> int:
        """The q, q_idx tiles and num_stages - 1 buffers of the gathered k, k_idx tiles."""
        BN, bufs = cfg["BN"], max(1, cfg["num_stages"] - 1)
        return (self.BM * self.BDK + self.BJ * self.BDI + bufs * BN * (self.BDK + self.BDI)) * dtype_bytes

    def config_space(self, kind: str, T: int, *, smem: Optional[int] = None, dtype_bytes: int = 2) -> list[Config]:
        """16 to 64 tokens per tile x 4 / 8 warps x 2 / 3 stages."""
        cands = [dict(BN=bn, num_warps=w, num_stages=st) for bn in (16, 32, 64) for w in (4, 8) for st in (2, 3)]
        return self._prune(kind, cands, T, smem, dtype_bytes)

    # -- launchers ---------------------------------------------------------------------------------
    def _check(self, q, k, idx, lse, q_idx, k_idx, w_idx, cu_seqlens, q_start: int = 0):
        """(B, T, H): q [B, T, HQ, DQK] (and idx, lse, q_idx, w_idx) holds the positions q_start ..
        of a sequence whose keys are k [B, Tk, H, DQK], k_idx [B, Tk, DI]."""
        B, T, HQ, dqk = q.shape
        H, Tk = k.shape[2], k.shape[1]
        if HQ != H * self.G or dqk != self.DQK or tuple(k.shape) != (B, Tk, H, self.DQK):
            raise ValueError(f"index_loss kernels were generated for G = {self.G}, DQK = {self.DQK}: "
                             f"q {tuple(q.shape)}, k {tuple(k.shape)}")
        want = {"idx": (B, T, 1, self.TOPK), "lse": (B, T, HQ), "q_idx": (B, T, self.HI, self.DI),
                "k_idx": (B, Tk, self.DI), "w_idx": (B, T, self.HI)}
        for name, x in zip(want, (idx, lse, q_idx, k_idx, w_idx)):
            if tuple(x.shape) != want[name]:
                raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {want[name]}")
        check_packed(q, cu_seqlens, self.varlen, "index_loss")
        check_piece(q_start, T, Tk, 1, self.offsets, cu_seqlens, "index_loss")
        return B, T, H

    def _args(self, q, k, T, H, cu_seqlens, q_start: int) -> tuple:
        """The sequence arguments ((cu_seqlens, the sequence of each row, T) packed, (Tk, T,
        q_start) with OFFSETS, else (T,)), H and the strides of q, k."""
        seq = (k.shape[1], T, q_start) if self.offsets else (T,)
        if self.varlen:
            cu, _ = packed(cu_seqlens)
            seq = (cu, seq_of_rows(cu, T).to(torch.int32), T)
        return (*seq, H, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))

    def _consts(self, cfg: Config) -> dict:
        return dict(G=self.G, BM=self.BM, DQK=self.DQK, BDK=self.BDK, HI=self.HI, BJ=self.BJ, DI=self.DI,
                    BDI=self.BDI, TOPK=self.TOPK, BN=cfg["BN"], num_warps=cfg["num_warps"],
                    num_stages=cfg["num_stages"])

    @staticmethod
    def _inputs(q, k, idx, lse, q_idx, k_idx, w_idx):
        u = lambda x: x if x.stride(-1) == 1 else x.contiguous()
        return (u(q), u(k), idx.to(torch.int32).contiguous(), lse.float().contiguous(), q_idx.contiguous(),
                k_idx.contiguous(), w_idx.contiguous())

    def fwd(self, q, k, idx, lse, q_idx, k_idx, w_idx, scale, *, config=None, cu_seqlens=None, q_start: int = 0):
        """(loss, lse_i, psum), each [B, T] fp32: the loss of every position, the log-sum-exp of
        its index scores over its list, the sum of its p (1 up to rounding; 0 with no token).
        q_start (OFFSETS): q's T rows are the positions q_start .. of the keys' sequence."""
        B, T, H = self._check(q, k, idx, lse, q_idx, k_idx, w_idx, cu_seqlens, q_start)
        q, k, idx, lse, q_idx, k_idx, w_idx = self._inputs(q, k, idx, lse, q_idx, k_idx, w_idx)
        out = [new_output((B, T), torch.float32, q.device) for _ in range(3)]
        if B * T == 0:
            return tuple(out)
        cfg = self.resolve_config(q, "fwd", config)
        self.kernels.index_loss_fwd_kernel[(T, B)](
            q, k, idx, lse, q_idx, k_idx, w_idx, *out, scale * LOG2E, *self._args(q, k, T, H, cu_seqlens, q_start),
            **self._consts(cfg))
        return tuple(out)

    def bwd(self, q, k, idx, lse, q_idx, k_idx, w_idx, lse_i, psum, dloss, scale, *, config=None, cu_seqlens=None,
            q_start: int = 0):
        """(dq_idx, dk_idx, dw_idx) in the inputs' dtypes for the loss's gradient ``dloss [B, T]``;
        q_start: as fwd (dk_idx [B, Tk, DI] holds what q's rows give)."""
        B, T, H = self._check(q, k, idx, lse, q_idx, k_idx, w_idx, cu_seqlens, q_start)
        q, k, idx, lse, q_idx, k_idx, w_idx = self._inputs(q, k, idx, lse, q_idx, k_idx, w_idx)
        dq_idx = new_output(q_idx.shape, q_idx.dtype, q.device)
        dw_idx = new_output(w_idx.shape, w_idx.dtype, q.device)
        dk_idx = torch.zeros(k_idx.shape, dtype=torch.float32, device=q.device)
        if B * T == 0:
            return dq_idx, dk_idx.to(k_idx.dtype), dw_idx
        cfg = self.resolve_config(q, "bwd", config)
        self.kernels.index_loss_bwd_kernel[(T, B)](
            q, k, idx, lse, q_idx, k_idx, w_idx, lse_i.contiguous(), psum.contiguous(), dloss.float().contiguous(),
            dq_idx, dk_idx, dw_idx, scale * LOG2E, *self._args(q, k, T, H, cu_seqlens, q_start), **self._consts(cfg))
        return dq_idx, dk_idx.to(k_idx.dtype), dw_idx
