"""Indexer scoring + token top-k (``templates/indexer.py.j2``): configs and launchers.

Variables (the plan's): HI, HIP (HI padded to a power of two), DI, BDI (DI padded, at least 16),
TOPK, KEEP_FIRST, KEEP_LAST, CAUSAL, VARLEN, OFFSETS (``nsa_dsl.codegen.plan.indexer_vars``).

``topk(q_idx, k_idx, w_idx)`` never holds a [T, T] score tensor: it walks the query positions in
chunks of TC, the kernel writes the int64 sort key of every (position of the chunk, key) of
every sequence into one bounded buffer (config ``BUFFER`` keys; causal chunks stop at the chunk's
last position), and ``torch.topk`` of the keys is the choice: the keys are unique and ordered as
the semantics rank (forced, then the score, ties to the lower position), so the top-k is exact.
Query pieces (OFFSETS): ``q_start = s``, q_idx and w_idx hold the positions s .. of sequences whose
keys k_idx holds; the chunks walk those positions only.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from ..ints import cdiv
from . import family
from .base import Config, Family, check_piece, is_tile
from .packed import check_packed, packed
from .topk import IDX_MAX, INELIGIBLE, VALID, new_idx


@family("indexer")
class Indexer(Family):
    KINDS = ("score",)
    TUNE_KINDS = {"topk": ("score",)}

    def __init__(self, kernels, variables: Mapping):
        super().__init__(kernels, variables)
        v = self.variables
        self.HI, self.HIP, self.DI, self.BDI = v["HI"], v["HIP"], v["DI"], v["BDI"]
        self.TOPK, self.KEEP_FIRST, self.KEEP_LAST = v["TOPK"], v["KEEP_FIRST"], v["KEEP_LAST"]
        self.causal = bool(v["CAUSAL"])
        self.varlen = bool(v.get("VARLEN", False))
        self.offsets = bool(v.get("OFFSETS", False))

    # -- configs ---------------------------------------------------------------------------------
    def _heuristic(self, kind: str, gpu: bool, T: int) -> Config:
        """The untuned config {BT, BN, BUFFER, num_warps, num_stages}: BT positions x HIP heads
        rows (at least 16, tl.dot) against BN keys per program; BUFFER int64 sort keys per chunk
        (GPU: 2^27, 1 GiB; the interpreter: 2^20)."""
        if gpu:
            return dict(BT=max(1, 128 // self.HIP), BN=64, BUFFER=1 << 27, num_warps=4, num_stages=2)
        return dict(BT=max(1, 64 // self.HIP), BN=64, BUFFER=1 << 20, num_warps=4, num_stages=1)

    def _invalid(self, kind: str, cfg: Config) -> Optional[str]:
        BT = cfg["BT"]
        if not (isinstance(BT, int) and BT >= 1 and BT & (BT - 1) == 0 and is_tile(BT * self.HIP)):
            return "BT must be a power of two with BT * HIP a power of two of at least 16 (tl.dot)"
        if not is_tile(cfg["BN"]):
            return "BN must be a power of two of at least 16"
        if not (isinstance(cfg["BUFFER"], int) and cfg["BUFFER"] >= 1):
            return "BUFFER (sort keys per chunk) must be a positive int"
        return None

    def smem_bytes(self, kind: str, cfg: Config, dtype_bytes: int = 2) -> int:
        """The q_idx and k_idx tiles (tl.dot operands) and the fp32 [BR, BN] products."""
        BR = cfg["BT"] * self.HIP
        return (BR + cfg["BN"]) * self.BDI * dtype_bytes + BR * cfg["BN"] * 4

    def config_space(self, kind: str, T: int, *, smem: Optional[int] = None, dtype_bytes: int = 2) -> list[Config]:
        """64 / 128 / 256 rows x 32 / 64 / 128 keys x 4 / 8 warps."""
        cands = [dict(BT=max(1, m // self.HIP), BN=bn, num_warps=w) for m in (64, 128, 256) if m >= self.HIP
                 for bn in (32, 64, 128) for w in (4, 8)]
        return self._prune(kind, cands, T, smem, dtype_bytes)

    # -- launcher ----------------------------------------------------------------------------------
    def _sequences(self, B: int, Tq: int, Tk: int, q_start: int, cu_seqlens) -> tuple[list, list, list, list]:
        """(first key rows, first query rows, key counts, one past the last query position) of the
        sequences, on the host (packed: one sync to read cu_seqlens; a piece's queries are
        positions q_start .. q_start + Tq - 1 of each batch row)."""
        if not self.varlen:
            return [b * Tk for b in range(B)], [b * Tq for b in range(B)], [Tk] * B, [q_start + Tq] * B
        cu = packed(cu_seqlens)[0].tolist()
        lens = [e - s for s, e in zip(cu[:-1], cu[1:])]
        return cu[:-1], cu[:-1], lens, lens

    def _chunk(self, t0: int, t_end: int, n_keys: int, n_seq: int, budget: int) -> tuple[int, int]:
        """(TC, W): query positions of the chunk from t0 (before t_end) and keys per row (of
        n_keys), with n_seq * TC * W <= budget where possible (at least one position). Causal rows
        see keys < t0 + TC only."""
        per = max(1, budget // n_seq)
        if not self.causal:
            return max(1, min(t_end - t0, per // n_keys)), n_keys
        tc = int((-t0 + math.isqrt(t0 * t0 + 4 * per)) // 2)      # tc * (t0 + tc) <= per
        tc = max(1, min(t_end - t0, tc))
        return tc, min(n_keys, t0 + tc)

    def topk(self, q_idx, k_idx, w_idx, cu_seqlens=None, *, config=None, q_start: int = 0) -> torch.Tensor:
        """The tokens each position attends: idx [B, Tq, 1, TOPK] int32 positions, ascending, -1
        padded. q_idx [B, Tq, HI, DI], k_idx [B, Tk, DI], w_idx [B, Tq, HI]. Packed sequences
        (VARLEN): B = 1, cu_seqlens [N + 1]; idx holds each sequence's own positions. Query pieces
        (OFFSETS): q_idx, w_idx hold positions q_start .. q_start + Tq - 1 of the Tk keys."""
        B, T = q_idx.shape[:2]
        Tk = k_idx.shape[1]
        HI, DI, K = self.HI, self.DI, self.TOPK
        if tuple(q_idx.shape) != (B, T, HI, DI) or tuple(k_idx.shape) != (B, Tk, DI) or tuple(w_idx.shape) != (B, T, HI):
            raise ValueError(f"indexer kernels were generated for HI = {HI}, DI = {DI}: q_idx {tuple(q_idx.shape)}, "
                             f"k_idx {tuple(k_idx.shape)}, w_idx {tuple(w_idx.shape)}")
        check_packed(q_idx, cu_seqlens, self.varlen, "indexer")
        check_piece(q_start, T, Tk, 1, self.offsets, cu_seqlens, "indexer")
        if B * T == 0:
            return new_idx((B, T, 1, K), q_idx.device)
        q_idx, k_idx, w_idx = q_idx.contiguous(), k_idx.contiguous(), w_idx.contiguous()
        cfg = self.resolve_config(q_idx, "score", config)
        bos, qbos, lens, ends = self._sequences(B, T, Tk, q_start, cu_seqlens)
        dev = q_idx.device
        flat = new_idx((B * T + 1, K), dev)      # row B * T: where rows past a sequence's end go (no host sync)
        t0 = q_start
        while t0 < max(ends):
            live = [s for s, e in enumerate(ends) if e > t0]            # sequences with positions from t0
            TC, W = self._chunk(t0, max(ends[s] for s in live), max(lens[s] for s in live), len(live), cfg["BUFFER"])
            seq_bos = torch.tensor([bos[s] for s in live], dtype=torch.int64, device=dev)
            seq_len = torch.tensor([lens[s] for s in live], dtype=torch.int32, device=dev)
            seq_q = torch.tensor([qbos[s] for s in live], dtype=torch.int64, device=dev)
            key = torch.empty((len(live), TC, W), dtype=torch.int64, device=dev)
            self.kernels.indexer_score_kernel[(cdiv(TC, cfg["BT"]), cdiv(W, cfg["BN"]), len(live))](
                q_idx, k_idx, w_idx, key, seq_bos, seq_len, *((seq_q, q_start) if self.offsets else ()), t0, TC, W,
                IDX_MAX=IDX_MAX, INELIGIBLE=INELIGIBLE, HI=HI, HIP=self.HIP, DI=DI, BDI=self.BDI,
                KEEP_FIRST=self.KEEP_FIRST, KEEP_LAST=self.KEEP_LAST,
                BT=cfg["BT"], BN=cfg["BN"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            top = torch.topk(key, min(K, W), dim=-1, sorted=False).values   # [S, TC, <= K]
            del key
            sel = torch.where(top >= VALID, IDX_MAX - (top & 0xFFFFFFFF), IDX_MAX).sort(-1).values
            sel = torch.where(sel == IDX_MAX, -1, sel).to(torch.int32)
            if sel.shape[-1] < K:
                sel = torch.nn.functional.pad(sel, (0, K - sel.shape[-1]), value=-1)
            t = torch.arange(t0, t0 + TC, device=dev)
            rows = seq_q[:, None] + (t - q_start)[None, :]                  # [S, TC] rows of idx
            seq_end = torch.tensor([ends[s] for s in live], dtype=torch.int64, device=dev)
            rows = torch.where(t[None, :] < seq_end[:, None], rows, B * T)
            flat[rows.flatten()] = sel.flatten(0, 1)
            t0 += TC
        return flat[:B * T].view(B, T, 1, K)
