"""Compression-branch attention (``templates/compress.py.j2``): configs and launchers.

Variables (the plan's): G, GP (G padded to a power of two), DQK, DV, BDK, BDV (head dims padded
to powers of two), L (compress block), STRIDE, VARLEN, CAUSAL (false: every query sees every
complete block).

Query offsets (plain mode): ``q_start = s`` makes q's rows the positions s .. s + T - 1 of a
sequence whose compressed keys are k_cmp, v_cmp (all its blocks: at least those the last query
sees); causal visibility uses the positions, outputs and dq have q's rows.

Query-tile programs (fwd, dq) hold BM = GP * R rows against key tiles of BN compressed blocks;
key-tile programs (dkdv) hold BN blocks against QS query positions (a multiple of R) and write
fp32 partial sums per query split, summed here.

Config ``TMA``: the streamed tiles by TMA descriptor loads, as the selection's: fwd / dq the key /
value tiles (host descriptors over k_cmp / v_cmp [B, NC, H, D], [1, BN, 1, BD] boxes), dkdv the q /
dO tiles (over q / do [B, T, HQ, D], [1, R, GP, BD] boxes); pointer loads where a layout is not
16-byte aligned. Off in the heuristic until the device has timed it; the tuner's candidates hold
both.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from nsa_dsl.semantics.reference import num_compressed_blocks
from nsa_dsl.semantics.varlen import compressed_cu_seqlens

from ..ints import cdiv
from . import family
from .base import LOG2E, Config, Family, check_q_start, dq_buffer, is_tile, new_output, row_delta, unit_last
from .packed import check_packed, packed, tile_table
from .window import Window

_FIELDS = ("R", "BN", "num_warps", "num_stages", "QS")   # a pinned config given as a tuple


def _qs(T: int, R: int, div: int = 16) -> int:
    """dkdv: query positions per program, ~T / div (at least 1024), a multiple of R."""
    return cdiv(max(1024, T // div), R) * R


@family("compress")
class Compress(Family):
    KINDS = ("fwd", "dq", "dkdv")
    TUNE_KINDS = {"fwd": ("fwd",), "bwd": ("dq", "dkdv")}   # launcher -> the kernel kinds it runs

    def __init__(self, kernels, variables: Mapping):
        super().__init__(kernels, variables)
        v = self.variables
        self.G, self.GP, self.DQK, self.DV = v["G"], v["GP"], v["DQK"], v["DV"]
        self.BDK, self.BDV, self.L, self.STRIDE = v["BDK"], v["BDV"], v["L"], v["STRIDE"]
        self.varlen = bool(v.get("VARLEN", False))
        # A pinned config per kind, e.g. {"fwd": (R, BN, num_warps, num_stages)} ("dkdv" adds QS,
        # the query positions per program) or {"fwd": {"R": 8, ...}}; None: the heuristic.
        self.CONFIG: Optional[Mapping] = None

    # -- configs ---------------------------------------------------------------------------------
    def _heuristic(self, kind: str, gpu: bool, T: int) -> Config:
        """The untuned config {R, BN, num_warps, num_stages (, QS)} of kernel ``kind``: "fwd" / "dq"
        (query-tile programs) or "dkdv" (key-tile programs). BM = GP * R query rows, BN compressed
        blocks, QS query positions per dkdv program (a multiple of R). CONFIG pins any of them."""
        cfg = self._measured(kind, gpu, T)
        pinned = (self.CONFIG or {}).get(kind)
        if pinned is not None:
            cfg.update(pinned if isinstance(pinned, dict) else zip(_FIELDS, pinned))
        return cfg

    def _measured(self, kind: str, gpu: bool, T: int) -> Config:
        GP = self.GP
        if not gpu:                             # interpreter: few, large programs
            R = max(1, 128 // GP)
            cfg = dict(R=R, BN=32, num_warps=1, num_stages=1, TMA=False)
            if kind == "dkdv":
                cfg["QS"] = cdiv(max(T, 1), R) * R
            return cfg
        # measured on an H200 at T = 64k, G = 16, bf16 (ms): D = 128: fwd 9.6 (10.9 with 64 x 64 tiles);
        # DQK = 192 (padded to 256), DV = 128: fwd 13.8 (34.6 with 64 x 32, 8 warps), bwd 75 (265 with
        # 32-row tiles, 8 warps)
        big = max(self.BDK, self.BDV) > 128
        if kind == "fwd":
            return dict(R=max(1, 128 // GP), BN=64, num_warps=8, num_stages=2, TMA=False) if big else \
                dict(R=max(1, 128 // GP), BN=128, num_warps=8, num_stages=3, TMA=False)
        cfg = dict(R=max(1, 64 // GP), BN=32 if big else 64, num_warps=4, num_stages=2, TMA=False)
        if kind == "dkdv":                      # ~T/16 positions per program, at least 1024
            if not big:   # 128 blocks x 64 rows, 8 warps, 4 stages (255 registers, 16 bytes of spills,
                # 194 KB: one program per SM); H200, 64k, whole backward 31.19 / 31.75 ms against
                # 32.65 / 32.08 for 64 blocks x 32 rows, 4 warps, 3 stages (two per SM)
                cfg.update(BN=128, num_warps=8, num_stages=4)
            cfg["QS"] = _qs(T, cfg["R"])
        return cfg

    def _invalid(self, kind: str, cfg: Config) -> Optional[str]:
        if not (isinstance(cfg["R"], int) and cfg["R"] >= 1 and is_tile(cfg["R"] * self.GP)):
            return "tl.dot needs query tiles BM = R * GP of a power of two >= 16 rows"
        if not is_tile(cfg["BN"]):
            return "BN must be a power of two of at least 16"
        if kind == "dkdv" and not (isinstance(cfg.get("QS"), int) and cfg["QS"] >= cfg["R"]
                                   and cfg["QS"] % cfg["R"] == 0):
            return "QS must be a positive multiple of R"
        if not isinstance(cfg.get("TMA", False), bool):
            return "TMA must be True or False"
        return None

    def smem_bytes(self, kind: str, cfg: Config, dtype_bytes: int = 2) -> int:
        """Shared memory of a config, estimated: the window family's estimate, whose tiles these
        are (fwd / dq: BM query rows against BN key rows; dkdv: BN key rows against BM query rows).
        Within ~20% of what triton 3.9 allocates for sm_90 (more with 3 stages: it keeps one loop
        buffer here); the tuner still catches the compiler's out-of-resources error where it is low."""
        return Window.smem_bytes(self, kind, cfg, dtype_bytes)   # type: ignore[arg-type]

    def config_space(self, kind: str, T: int, *, smem: Optional[int] = None, dtype_bytes: int = 2) -> list[Config]:
        """Candidate configs of kernel ``kind`` at length ``T`` for the tuner (GPU), partial dicts
        over the heuristic. fwd: 64 / 128 rows x 64 / 128 blocks x 4 / 8 warps x 2 / 3 stages; dq:
        64 / 128 rows x 32 / 64 blocks x 4 / 8 warps; dkdv: 32 / 64 rows x 32 / 64 / 128 blocks x 4 / 8
        warps x 3 / 4 stages (128 blocks: 8 warps), and the heuristic with QS of ~T/8 instead of
        ~T/16; each with pointer and TMA loads."""
        GP = self.GP
        rows = [m // GP for m in ((32, 64) if kind == "dkdv" else (64, 128)) if m >= GP]
        if kind == "fwd":
            cands = [dict(R=r, BN=bn, num_warps=w, num_stages=st) for r in rows for bn in (64, 128)
                     for w in (4, 8) for st in (2, 3)]
        elif kind == "dq":
            cands = [dict(R=r, BN=bn, num_warps=w) for r in rows for bn in (32, 64) for w in (4, 8)]
        else:
            cands = [dict(R=r, BN=bn, num_warps=w, num_stages=st, QS=_qs(T, r)) for r in rows
                     for bn, w in ((32, 4), (32, 8), (64, 4), (64, 8), (128, 8)) for st in (3, 4)]
            cands.append(dict(QS=_qs(T, self._heuristic(kind, True, T)["R"], 8)))
        cands += [dict(c, TMA=True) for c in cands]
        return self._prune(kind, cands, T, smem, dtype_bytes)

    # -- launchers ---------------------------------------------------------------------------------
    def n_compressed(self, T: int) -> int:
        """NC = floor((T - L) / STRIDE) + 1, 0 when T < L."""
        return num_compressed_blocks(T, self.L, self.STRIDE)

    def compressed_cu_seqlens(self, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Offsets of the sequences' compressed blocks in packed k_cmp / v_cmp [1, sum NC_s, H, D]:
        int32 [N + 1], NC_s = (len_s - L) // STRIDE + 1 (0 when len_s < L)."""
        return compressed_cu_seqlens(packed(cu_seqlens)[0], self.L, self.STRIDE)

    def _check(self, q, k_cmp, v_cmp, cu_seqlens, q_start: int = 0):
        B, T, HQ, dqk = q.shape
        DQK, DV, G = self.DQK, self.DV, self.G
        if dqk != DQK or k_cmp.shape[-1] != DQK or v_cmp.shape[-1] != DV:
            raise ValueError(f"compress kernels were generated for DQK={DQK}, DV={DV}; got q {tuple(q.shape)}, "
                             f"k_cmp {tuple(k_cmp.shape)}, v_cmp {tuple(v_cmp.shape)}")
        H = k_cmp.shape[2]
        if HQ != H * G:
            raise ValueError(f"compress kernels were generated for G={G} query heads per kv head; "
                             f"got {HQ} query heads and {H} kv heads")
        check_packed(q, cu_seqlens, self.varlen, "compress")
        check_q_start(q_start, cu_seqlens)
        if self.varlen:
            NC = k_cmp.shape[1]                                   # sum of NC_s, checked by the caller
            if v_cmp.shape[:3] != (B, NC, H) or k_cmp.shape[0] != B:
                raise ValueError(f"k_cmp/v_cmp must be [1, NC, H, D] alike; got {tuple(k_cmp.shape)} "
                                 f"and {tuple(v_cmp.shape)}")
        else:   # the blocks of the keys up to the last query at least (more: keys past the queries)
            NC, need = k_cmp.shape[1], self.n_compressed(q_start + T)
            if NC < need or k_cmp.shape[:3] != (B, NC, H) or v_cmp.shape[:3] != (B, NC, H):
                raise ValueError(f"k_cmp/v_cmp must be [B, NC, H, D] alike with NC >= {need} (the blocks of "
                                 f"positions 0 .. {q_start + T - 1}); got {tuple(k_cmp.shape)} and {tuple(v_cmp.shape)}")
        return B, T, H, NC

    def _consts(self, cfg: Config) -> dict:
        """The constexprs of a kernel launch under ``cfg``, with its launch options."""
        return dict(G=self.G, GP=self.GP, L=self.L, STRIDE=self.STRIDE, DQK=self.DQK, DV=self.DV,
                    BDK=self.BDK, BDV=self.BDV, R=cfg["R"], BM=self.GP * cfg["R"], BN=cfg["BN"],
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    def _query_grid(self, B, T, H, NC, R, cu_seqlens, q_start):
        """Grid (query tiles of R positions x kv heads) and the sequence arguments of fwd / dq."""
        if self.varlen:
            cu, lens = packed(cu_seqlens)
            tiles = tile_table(lens, R, T)                        # (sequence, query tile of R positions)
            return (tiles.shape[0], H), (cu, self.compressed_cu_seqlens(cu), tiles, lens.numel())
        return (cdiv(T, R), B * H), (T, NC, q_start)

    def fwd(self, q, k_cmp, v_cmp, scale, cu_seqlens=None, *, config=None, q_start: int = 0):
        """Attention over compressed blocks (causal: those ending at or before the query; not causal:
        all) -> (o [B, T, HQ, DV] in q.dtype, lse [B, T, HQ] fp32).
        Packed sequences (VARLEN): B = 1, cu_seqlens [N + 1]; k_cmp / v_cmp [1, sum NC_s, H, D], the
        blocks of sequence s at [cu_cmp[s], cu_cmp[s + 1]) (compressed_cu_seqlens). q_start (plain
        mode): q's rows are positions q_start .. of the sequence."""
        q, k_cmp, v_cmp = unit_last(q), unit_last(k_cmp), unit_last(v_cmp)
        B, T, H, NC = self._check(q, k_cmp, v_cmp, cu_seqlens, q_start)
        o = new_output((B, T, H * self.G, self.DV), q.dtype, q.device)
        lse = new_output((B, T, H * self.G), torch.float32, q.device)
        cfg = self.resolve_config(q, "fwd", config)
        if self.varlen and T == 0:
            return o, lse
        grid, seq = self._query_grid(B, T, H, NC, cfg["R"], cu_seqlens, q_start)
        k_desc, v_desc, tma = self._kv_descs(k_cmp, v_cmp, cfg)
        self.kernels.compress_fwd_kernel[grid](
            q, k_cmp, v_cmp, k_desc, v_desc, o, lse,
            *q.stride()[:3], *k_cmp.stride()[:3], *v_cmp.stride()[:3], *o.stride()[:3],
            *seq, H, scale * LOG2E, **self._consts(cfg), TMA=tma)
        return o, lse

    def bwd(self, q, k_cmp, v_cmp, o, lse, do, scale, cu_seqlens=None, *, config=None, delta=None, dq_acc=None,
            q_start: int = 0):
        """Gradients of fwd -> (dq, dk_cmp, dv_cmp), each in its input's dtype (dk_cmp, dv_cmp: from
        q's rows only, positions q_start .. in plain mode). delta: rowsum(o * do)
        [B, T, HQ] fp32 when the caller has it; dq_acc: a contiguous q-shaped tensor holding other
        branches' gradient of q, to which this one is added in place (returned as dq)."""
        q, k_cmp, v_cmp, do = unit_last(q), unit_last(k_cmp), unit_last(v_cmp), unit_last(do)
        B, T, H, NC = self._check(q, k_cmp, v_cmp, cu_seqlens, q_start)
        lse = lse.float().contiguous()
        # [B, T, HQ]: rowsum(o * do), fp32
        delta = row_delta(self.kernels, o, do, self.DV, self.BDV) if delta is None else delta.contiguous()
        dq = dq_buffer(q, dq_acc)
        cfg = self.resolve_config(q, "dq", config)
        if self.varlen and T == 0:
            return dq, k_cmp.new_zeros(k_cmp.shape), v_cmp.new_zeros(v_cmp.shape)
        grid, seq = self._query_grid(B, T, H, NC, cfg["R"], cu_seqlens, q_start)
        k_desc, v_desc, tma = self._kv_descs(k_cmp, v_cmp, cfg)
        self.kernels.compress_bwd_dq_kernel[grid](
            q, k_cmp, v_cmp, k_desc, v_desc, do, lse, delta, dq,
            *q.stride()[:3], *k_cmp.stride()[:3], *v_cmp.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
            *seq, H, scale * LOG2E, scale, ACC=dq_acc is not None, **self._consts(cfg), TMA=tma)
        if NC == 0:
            return dq, k_cmp.new_zeros(k_cmp.shape), v_cmp.new_zeros(v_cmp.shape)

        cfg = self.resolve_config(q, "dkdv", config)
        QS, BN = cfg["QS"], cfg["BN"]
        NS = cdiv(T, QS)                                  # query splits (of q's rows; packed: the longest sequence's <= T)
        dk = new_output((NS, B, NC, H, self.DQK), torch.float32, q.device)   # partial sums per query split
        dv = new_output((NS, B, NC, H, self.DV), torch.float32, q.device)
        if self.varlen:
            cu, cu_cmp, _, n_seq = seq
            tiles = tile_table((cu_cmp[1:] - cu_cmp[:-1]).long(), BN, NC)   # (sequence, tile of BN blocks)
            grid, seq = (tiles.shape[0], NS, H), (cu, cu_cmp, tiles, n_seq, NC)
        else:
            grid = (cdiv(NC, BN), NS, B * H)
        q_desc, do_desc, tma = self._qdo_descs(q, do, cfg)
        self.kernels.compress_bwd_dkdv_kernel[grid](
            q, k_cmp, v_cmp, do, q_desc, do_desc, lse, delta, dk, dv,
            *q.stride()[:3], *k_cmp.stride()[:3], *v_cmp.stride()[:3], *do.stride()[:3],
            *seq, H, QS, B, scale * LOG2E, scale, **self._consts(cfg), TMA=tma)
        return dq, dk.sum(0).to(k_cmp.dtype), dv.sum(0).to(v_cmp.dtype)
