"""Sliding-window attention (``templates/window.py.j2``): configs and launchers.

Variables (the plan's): G, GP (G padded to a power of two), DQK, DV, BDK, BDV (head dims padded
to powers of two), W, SINKS, VARLEN, CAUSAL (false: the band reaches W - 1 keys past the query
too and every sink is seen).

Query offsets (plain mode): ``q_start = s`` makes q [B, Tq, HQ, D] the positions s .. s + Tq - 1 of
a sequence whose keys are k, v [B, Tk, H, D] (Tk >= s + Tq): masks use the positions, o / lse / dq
have q's rows, dk / dv the keys' (from q's rows only). Packed sequences take no offset.

Config ``TMA``: the streamed tiles by TMA descriptor loads, as the selection's and the
compression's: fwd / fwd_combine / dq the key / value tiles (host descriptors over k / v
[B, Tk, H, D], [1, BN, 1, BD] boxes), dkdv the q / dO tiles ([1, R, GP, BD] boxes of [B, Tq, HQ, D];
the sink kernel keeps pointer loads); pointer loads where a layout is not 16-byte aligned. Off in the heuristic until the
device has timed it; the tuner's candidates hold both.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from ..ints import cdiv
from . import family
from .base import (LOG2E, Config, Family, check_q_start, dq_buffer, is_tile, launch_options, new_output,
                   row_delta, unit_last)
from .packed import check_packed, packed, tile_table


@family("window")
class Window(Family):
    KINDS = ("fwd", "fwd_combine", "dq", "dkdv")
    TUNE_KINDS = {"fwd": ("fwd",), "fwd_combine": ("fwd_combine",), "bwd": ("dq", "dkdv")}

    def __init__(self, kernels, variables: Mapping):
        super().__init__(kernels, variables)
        v = self.variables
        self.G, self.GP, self.DQK, self.DV = v["G"], v["GP"], v["DQK"], v["DV"]
        self.BDK, self.BDV, self.W, self.SINKS = v["BDK"], v["BDV"], v["W"], v["SINKS"]
        self.varlen = bool(v.get("VARLEN", False))
        self.causal = bool(v.get("CAUSAL", True))

    # -- configs ---------------------------------------------------------------------------------
    def _heuristic(self, kind: str, gpu: bool, T: int) -> Config:
        """The untuned config {R, BN, CHUNK, num_warps, num_stages} of kernel ``kind``.

        Rows per program BM = R * GP. On the GPU: the forward takes BM = 128 rows against BN = 32
        keys up to 128-wide heads (measured on an H200 at G = 16, D = 128, W = 512, T = 64k: 3.2 ms
        with 8 warps and 3 stages, against 3.8 ms for 64 x 64), else BM = 64 against BN = 64 (32
        above 128-wide heads). Under the interpreter (CPU): BM = 64, BN = 32 (few programs keep the
        run short). CHUNK: queries per program of the sink kernel."""
        GP, d = self.GP, max(self.BDK, self.BDV)
        if not gpu:
            return dict(R=max(1, 64 // GP), BN=32, CHUNK=64, num_warps=4, num_stages=1, TMA=False)
        if kind == "fwd" and d <= 128:   # H200, T = 64k, G = 16: 8 warps, 3 stages 3.18 ms; 4 warps, 2 stages 3.46
            return dict(R=max(1, 128 // GP), BN=32, CHUNK=1024, num_warps=8, num_stages=3, TMA=False)
        if kind == "fwd_combine" and d <= 128:
            # the fwd tiles; the combination epilogue lifts them to 182 registers (one program per SM):
            # capped at 128 (some spills, two per SM): H200, 64k: 3.73 ms against 4.61 uncapped and
            # 4.16 for fwd + the combine kernel; 32k: 1.87 / 2.31 / 2.06
            return dict(R=max(1, 128 // GP), BN=32, CHUNK=1024, num_warps=8, num_stages=3, maxnreg=128, TMA=False)
        if kind == "dkdv" and d <= 128:   # 32-row tiles, 3 stages: backward 11.2 ms against 12.3 (64 rows spill)
            return dict(R=max(1, 32 // GP), BN=64, CHUNK=1024, num_warps=4, num_stages=3, TMA=False)
        return dict(R=max(1, 64 // GP), BN=64 if d <= 128 else 32, CHUNK=1024,
                    num_warps=4 if d <= 128 else 8, num_stages=2, TMA=False)

    def _invalid(self, kind: str, cfg: Config) -> Optional[str]:
        R = cfg["R"]
        if not (isinstance(R, int) and R >= 1 and is_tile(R * self.GP)):
            return "row tiles R * GP must be powers of two of at least 16 (tl.dot)"
        if not is_tile(cfg["BN"]):
            return "BN must be a power of two of at least 16"
        if not (isinstance(cfg["CHUNK"], int) and cfg["CHUNK"] >= 1):
            return "CHUNK must be a positive int"
        if not isinstance(cfg.get("TMA", False), bool):
            return "TMA must be True or False"
        return None

    def smem_bytes(self, kind: str, cfg: Config, dtype_bytes: int = 2) -> int:
        """Shared memory of a config, estimated: the tl.dot operands loaded once (fwd: the q tile;
        dq: q and do; dkdv: the k and v tiles) plus num_stages - 1 buffers (at least one) of those
        the main loop loads (fwd / dq: k and v tiles; dkdv: q and do rows), and for dkdv an fp32
        [BN, BM] tile for layout conversions. Within ~20% of what triton 3.9 allocates for sm_90;
        the tuner still catches the compiler's out-of-resources error where it is low."""
        BDK, BDV = self.BDK, self.BDV
        BM, BN, bufs = cfg["R"] * self.GP, cfg["BN"], max(1, cfg["num_stages"] - 1)
        if kind in ("fwd", "fwd_combine"):
            elems = BM * BDK + bufs * BN * (BDK + BDV)
        elif kind == "dq":
            elems = BM * (BDK + BDV) + bufs * BN * (BDK + BDV)
        else:
            return (BN * (BDK + BDV) + bufs * BM * (BDK + BDV)) * dtype_bytes + BM * BN * 4
        return elems * dtype_bytes

    def config_space(self, kind: str, T: int, *, smem: Optional[int] = None, dtype_bytes: int = 2) -> list[Config]:
        """fwd: 64 / 128 rows x 32 / 64 keys x 4 / 8 warps x 2 / 3 stages; fwd_combine: the same
        (at the heuristic's register cap) and the heuristic uncapped; dq: the same with 2 stages;
        dkdv: 32 / 64 / 128 keys x 32 / 64 rows x 4 / 8 warps; each with pointer and TMA loads."""
        GP = self.GP
        if kind == "dkdv":
            cands = [dict(BN=bn, R=m // GP, num_warps=w) for bn in (32, 64, 128) for m in (32, 64) if m >= GP
                     for w in (4, 8)]
        else:
            cands = [dict(R=m // GP, BN=bn, num_warps=w, num_stages=st) for m in (64, 128) if m >= GP
                     for bn in (32, 64) for w in (4, 8) for st in ((2, 3) if kind != "dq" else (2,))]
            if kind == "fwd_combine":
                cands.append(dict(maxnreg=None))
        cands += [dict(c, TMA=True) for c in cands]
        return self._prune(kind, cands, T, smem, dtype_bytes)

    # -- launchers ---------------------------------------------------------------------------------
    def _check(self, q, k, v, cu_seqlens, q_start: int = 0):
        """(B, Tq, Tk, HQ, H): q [B, Tq, HQ, DQK] holds the positions q_start .. of a sequence whose
        keys are k [B, Tk, H, DQK], v [B, Tk, H, DV] (Tk >= q_start + Tq; packed: Tk = Tq)."""
        B, T, HQ, dqk = q.shape
        Tk, H = k.shape[1], k.shape[2]
        assert HQ == H * self.G, f"window kernels were generated for G = {self.G}: HQ = {HQ}, H = {H}"
        assert dqk == self.DQK and k.shape[3] == self.DQK and v.shape[3] == self.DV, \
            "head dims differ from the generated ones"
        check_packed(q, cu_seqlens, self.varlen, "window")
        check_q_start(q_start, cu_seqlens)
        assert k.shape[:3] == (B, Tk, H) and v.shape[:3] == (B, Tk, H), "k and v must be [B, Tk, H, D] alike"
        if Tk < q_start + T or (self.varlen and Tk != T):
            raise ValueError(f"queries at positions {q_start} .. {q_start + T - 1} need their keys: k, v hold {Tk}"
                             + (" (packed: as many as q's rows)" if self.varlen else ""))
        return B, T, Tk, HQ, H

    def _grid(self, q, k, H, size, cu_seqlens, q_start, keys=False):
        """Grid (tiles of `size` query positions, or keys with ``keys``, x kv heads) and the
        sequence arguments of a kernel."""
        B, T, Tk = q.shape[0], q.shape[1], k.shape[1]
        if self.varlen:
            cu, lens = packed(cu_seqlens)
            tiles = tile_table(lens, size, T)                            # (sequence, tile)
            return (tiles.shape[0], H), (cu, tiles, lens.numel())
        return (cdiv(Tk if keys else T, size), B * H), (Tk, T, q_start)

    @staticmethod
    def _strides(q, k, v):
        return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2))

    def _consts(self) -> dict:
        c = dict(G=self.G, GP=self.GP, W=self.W, DQK=self.DQK, DV=self.DV, BDK=self.BDK, BDV=self.BDV)
        if self.SINKS:
            c["SINKS"] = self.SINKS
        return c

    def fwd(self, q, k, v, scale, *, config=None, cu_seqlens=None, q_start: int = 0):
        """o [B, Tq, HQ, DV] (q.dtype), lse [B, Tq, HQ] (fp32). Packed sequences (VARLEN): B = 1,
        cu_seqlens [N + 1]. q_start (plain mode): q's rows are positions q_start .. of the sequence
        whose keys are k, v [B, Tk, H, D]."""
        B, T, Tk, HQ, H = self._check(q, k, v, cu_seqlens, q_start)
        q, k, v = unit_last(q), unit_last(k), unit_last(v)
        o = new_output((B, T, HQ, self.DV), q.dtype, q.device)
        lse = new_output((B, T, HQ), torch.float32, q.device)
        if B * T == 0:
            return o, lse
        cfg = self.resolve_config(q, "fwd", config)
        grid, seq = self._grid(q, k, H, cfg["R"], cu_seqlens, q_start)
        k_desc, v_desc, tma = self._kv_descs(k, v, cfg)
        self.kernels.window_fwd_kernel[grid](
            q, k, v, k_desc, v_desc, o, lse, scale * LOG2E, *seq, H, *self._strides(q, k, v),
            R=cfg["R"], BN=cfg["BN"], **self._consts(), TMA=tma,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return o, lse

    def fwd_combine(self, q, k, v, scale, others, wpos, gates=None, *, config=None, cu_seqlens=None,
                    q_start: int = 0):
        """The output of a spec whose last branch is this window, without the branch's o / lse
        (inference): out [B, T, HQ, DV] = sum_c sigmoid(g_c) * o_c (gate logits [B, T, HQ, C])
        or sum_c o_c over the C = len(others) + 1 <= 4 branches, this one at index ``wpos``,
        ``others`` the rest in order ([B, T, HQ, DV] each). Equal to fwd + the combine kernel,
        bit for bit. q_start: as fwd."""
        B, T, Tk, HQ, H = self._check(q, k, v, cu_seqlens, q_start)
        C = len(others) + 1
        if not (C <= 4 and 0 <= wpos < C):
            raise ValueError(f"fwd_combine takes at most 3 other branches and 0 <= wpos < {C}; got {C - 1}, {wpos}")
        q, k, v = unit_last(q), unit_last(k), unit_last(v)
        others = [x.contiguous() for x in others]
        for x in others:
            assert x.shape == (B, T, HQ, self.DV) and x.dtype == q.dtype, \
                "branch outputs must be [B, T, HQ, DV] in q's dtype"
        out = new_output((B, T, HQ, self.DV), q.dtype, q.device)
        if gates is not None:
            gates = gates.contiguous()
            assert gates.shape == (B, T, HQ, C), f"gates must be [B, T, HQ, {C}]"
        if B * T == 0:
            return out
        cfg = self.resolve_config(q, "fwd_combine", config)
        grid, seq = self._grid(q, k, H, cfg["R"], cu_seqlens, q_start)
        o_x = others + [out] * (3 - len(others))                      # unused pointers: never read
        k_desc, v_desc, tma = self._kv_descs(k, v, cfg)
        self.kernels.window_fwd_combine_kernel[grid](
            q, k, v, k_desc, v_desc, out, *o_x, out if gates is None else gates, scale * LOG2E, *seq, H,
            *self._strides(q, k, v), R=cfg["R"], BN=cfg["BN"], **self._consts(), TMA=tma,
            C=C, WPOS=wpos, GATED=gates is not None, **launch_options(cfg))
        return out

    def bwd(self, q, k, v, o, lse, do, scale, *, config=None, cu_seqlens=None, delta=None, dq_acc=None,
            q_start: int = 0):
        """(dq, dk, dv) in q.dtype; recomputes P from lse (natural log, as fwd returns it).
        delta: rowsum(o * do) [B, T, HQ] fp32 when the caller has it; dq_acc: a contiguous
        q-shaped tensor holding other branches' gradient of q, to which this one is added in
        place (returned as dq). q_start: as fwd; dk, dv [B, Tk, H, D] hold what q's rows give."""
        B, T, Tk, HQ, H = self._check(q, k, v, cu_seqlens, q_start)
        q, k, v = unit_last(q), unit_last(k), unit_last(v)
        o, do, lse = o.contiguous(), do.contiguous(), lse.contiguous()
        dq = dq_buffer(q, dq_acc)
        if B * T == 0:   # no queries: nothing reaches the keys
            return dq, k.new_zeros((B, Tk, H, self.DQK)), v.new_zeros((B, Tk, H, self.DV))
        dk = new_output((B, Tk, H, self.DQK), k.dtype, k.device)
        dv = new_output((B, Tk, H, self.DV), v.dtype, v.device)
        delta = row_delta(self.kernels, o, do, self.DV, self.BDV) if delta is None else delta.contiguous()
        strides, consts = self._strides(q, k, v), self._consts()

        cfg = self.resolve_config(q, "dq", config)
        grid, seq = self._grid(q, k, H, cfg["R"], cu_seqlens, q_start)
        k_desc, v_desc, tma = self._kv_descs(k, v, cfg)
        self.kernels.window_bwd_dq_kernel[grid](
            q, k, v, k_desc, v_desc, do, lse, delta, dq, scale * LOG2E, scale, *seq, H, *strides,
            R=cfg["R"], BN=cfg["BN"], **consts, ACC=dq_acc is not None, TMA=tma,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

        cfg = self.resolve_config(q, "dkdv", config)
        R, BN = cfg["R"], cfg["BN"]
        extra = self._sink_grads(q, k, v, do, lse, delta, scale, cfg, cu_seqlens, q_start) if self.SINKS else ()
        grid, seq = self._grid(q, k, H, BN, cu_seqlens, q_start, keys=True)
        q_desc, do_desc, tma = self._qdo_descs(q, do, cfg)
        self.kernels.window_bwd_dkdv_kernel[grid](
            q, k, v, do, q_desc, do_desc, lse, delta, dk, dv, *extra, scale * LOG2E, scale, *seq, H, *strides,
            R=R, BN=BN, **consts, TMA=tma, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return dq, dk, dv

    def _sink_grads(self, q, k, v, do, lse, delta, scale, cfg, cu_seqlens, q_start):
        """The sink keys' gradients from the queries whose band does not hold them (causal: those
        past their window), split in chunks of CHUNK positions and summed: the dkdv kernel's
        (dk_sink, dv_sink, rows) arguments."""
        B, T = q.shape[:2]
        H, W, R, BN = k.shape[2], self.W, cfg["R"], cfg["BN"]
        n_tiles = cdiv(self.SINKS, BN)
        chunk = cdiv(cfg["CHUNK"], R) * R
        if self.varlen:   # parts = (sequence, chunk of its queries past the window), summed per sequence
            cu, lens = packed(cu_seqlens)
            N = lens.numel()
            parts = tile_table((lens - W).clamp(min=0) if self.causal else lens, chunk, T)
            n_chunks, seq = parts.shape[0], (cu, parts, N)
        else:   # causal: the first sink tile's queries past the window, positions max(W, q_start) .. q_start + T - 1
            n_queries = q_start + T - max(W, q_start) if self.causal else T
            n_chunks, seq = max(1, cdiv(max(n_queries, 0), chunk)), (k.shape[1], T, q_start)
        dk_part = torch.empty((B * H, n_chunks, n_tiles * BN, self.DQK), dtype=torch.float32, device=q.device)
        dv_part = torch.empty((B * H, n_chunks, n_tiles * BN, self.DV), dtype=torch.float32, device=q.device)
        self.kernels.window_bwd_sink_kernel[(n_tiles, B * H, n_chunks)](
            q, k, v, do, lse, delta, dk_part, dv_part, scale * LOG2E, scale, *seq, H, chunk,
            *self._strides(q, k, v), R=R, BN=BN, **self._consts(),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        if self.varlen:   # [N + 1, H, n_tiles * BN, D] per sequence (row N takes the idle parts, which wrote nothing)
            part_seq = parts[:, 0].long()
            dk_sink = dk_part.new_zeros((N + 1, H, n_tiles * BN, self.DQK)).index_add_(0, part_seq, dk_part.transpose(0, 1))
            dv_sink = dv_part.new_zeros((N + 1, H, n_tiles * BN, self.DV)).index_add_(0, part_seq, dv_part.transpose(0, 1))
            return dk_sink, dv_sink, n_tiles * BN
        return dk_part.sum(1), dv_part.sum(1), n_tiles * BN               # [B * H, n_tiles * BN, D]
