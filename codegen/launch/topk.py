"""Block scoring + top-k selection (``templates/topk.py.j2``): configs and launchers.

Variables (the plan's): G, GP, DQK, BDK, LS, TOPK, TOPKP (TOPK padded to a power of two),
KEEP_FIRST, KEEP_LAST, SCORE ("cmp" | "mean_pool"), L, STRIDE, VARLEN; scored by a compression
branch also A = L / STRIDE and C = LS / STRIDE (``nsa_dsl.codegen.plan.topk_vars``); CAUSAL, QB
(the branch's query_block: groups of QB positions share one choice) and OFFSETS (the launchers
take ``q_start``: q holds the positions q_start .. of a sequence of more keys).

A module rendered with ``SCORE == "cmp"`` has the launcher ``topk(q, k_cmp, lse_cmp, scale)``,
one with ``"mean_pool"`` ``topk_mean_pool(q, k)``: :class:`Topk` builds the class of its score.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

import torch

from nsa_dsl.semantics.reference import _block_means, num_compressed_blocks
from nsa_dsl.semantics.varlen import compressed_cu_seqlens

from ..ints import cdiv, next_pow2
from . import family
from .base import LOG2E, Config, Family, check_piece, is_tile, launch_options
from .packed import check_packed, cumsum0, packed, seq_of_rows, tile_table

# int64 sort keys of the top-k buffer (the template's merge_chunk): the order-preserving int32 of
# the score << 32 plus IDX_MAX - block. Below every eligible block (score >= -inf): empty slots,
# then ineligible blocks. The kernels take these as constexprs.
IDX_MAX = (1 << 31) - 1
ORD_NEG_INF = -2139095041               # the order-preserving int32 of float -inf
VALID = ORD_NEG_INF << 32               # keys >= VALID are eligible blocks
EMPTY = (ORD_NEG_INF - 1) << 32
INELIGIBLE = (ORD_NEG_INF - 2) << 32
FLOOR = (ORD_NEG_INF - 3) << 32         # below every key
PINNED = (1 << 63) - 1                  # above every key: padding slots of an unsorted buffer hold PINNED - slot
SORT_KEYS = dict(IDX_MAX=IDX_MAX, VALID=VALID, EMPTY=EMPTY, INELIGIBLE=INELIGIBLE, FLOOR=FLOOR, PINNED=PINNED)


def new_idx(shape, device) -> torch.Tensor:
    """An int32 index buffer: under ``NSA_DSL_NAN_FILL=1`` (the tests, as ``base.new_output``)
    filled with a value no kernel writes (int32 has no NaN), else empty."""
    if os.environ.get("NSA_DSL_NAN_FILL") == "1":
        return torch.full(shape, -(1 << 31), dtype=torch.int32, device=device)
    return torch.empty(shape, dtype=torch.int32, device=device)


@family("topk")
class Topk(Family):
    """The top-k launchers of one rendered module; constructing ``Topk`` gives the subclass of the
    module's score (:class:`TopkCmp` or :class:`TopkMeanPool`)."""

    KINDS = ("topk",)
    SORT_KEYS = SORT_KEYS            # the sentinels of the kernels' sort keys (constexprs), by name

    def __new__(cls, kernels, variables: Mapping):
        if cls is Topk:
            cls = TopkCmp if variables["SCORE"] == "cmp" else TopkMeanPool
        return super().__new__(cls)

    def __init__(self, kernels, variables: Mapping):
        super().__init__(kernels, variables)
        v = self.variables
        self.G, self.GP, self.DQK, self.BDK = v["G"], v["GP"], v["DQK"], v["BDK"]
        self.LS, self.TOPK, self.TOPKP = v["LS"], v["TOPK"], v["TOPKP"]
        self.KEEP_FIRST, self.KEEP_LAST = v["KEEP_FIRST"], v["KEEP_LAST"]
        self.varlen = bool(v.get("VARLEN", False))
        self.causal = bool(v.get("CAUSAL", True))
        self.QB = int(v.get("QB", 1))
        self.offsets = bool(v.get("OFFSETS", False))
        self.CONFIG: Optional[tuple] = None   # a pinned config (R, BN, BJ, num_warps, dot); None: the heuristic

    # -- configs ---------------------------------------------------------------------------------
    def _pinned(self) -> Optional[Config]:
        return None if self.CONFIG is None else dict(zip(("R", "BN", "BJ", "num_warps", "dot"), self.CONFIG))

    def _min_bj(self) -> int:
        return 1

    def _rows(self, R: int) -> int:
        """Rows of a tile of R: R positions times the GP heads (mean_pool with QB > 1: R groups)."""
        return R * self.GP

    def _invalid(self, kind: str, cfg: Config) -> Optional[str]:
        R = cfg["R"]
        if not (isinstance(R, int) and R >= 1 and is_tile(self._rows(R)) and R & (R - 1) == 0):
            return "R and the row tile R * GP must be powers of two, R * GP >= 16 (tl.dot)"
        if not (is_tile(cfg["BN"]) and is_tile(cfg["BJ"])):
            return "BN and BJ must be powers of two of at least 16 (tl.dot)"
        ni = cfg.get("NI", 0)
        if not (isinstance(ni, int) and 0 <= ni <= 16):
            return "NI (insertion steps before the rank merge) must be an int in [0, 16]"
        if cfg["BJ"] < self._min_bj():
            return f"BJ must be at least {self._min_bj()} (the overlap carry reaches that far)"
        return None

    def _candidates(self, bn) -> list[Config]:
        """64 / 128 rows x BJ of 16, 32, 64 select blocks per chunk (BN = bn(BJ) where given) x
        4 / 8 warps x 3 stages, and with 4 warps also 2 stages capped at 168 registers (3 programs
        per SM where shared memory allows); then the heuristic with 0 to 3 insertion steps (NI)."""
        GP = self.GP
        cands = [dict(R=m // GP, BJ=bj, num_warps=w, num_stages=st, maxnreg=reg, **({"BN": bn(bj)} if bn else {}))
                 for m in (64, 128) if m >= GP for bj in (16, 32, 64) for w in (4, 8)
                 for st, reg in ((3, None), (2, 168)) if w == 4 or reg is None]
        return cands + [dict(NI=n) for n in range(4)]

    # -- launchers ---------------------------------------------------------------------------------
    def _check(self, q: torch.Tensor, H: int, cu_seqlens, q_start: int = 0, Tk: Optional[int] = None) -> tuple:
        """(B, T, keys): q [B, T, HQ, DQK]; keys: the sequence arguments of a module with OFFSETS
        (Tk keys, T queries, q_start), else ()."""
        B, T, HQ, dqk = q.shape
        if dqk != self.DQK:
            raise ValueError(f"topk kernels were generated for DQK={self.DQK}; got q {tuple(q.shape)}")
        if HQ != H * self.G:
            raise ValueError(f"topk kernels were generated for G={self.G} query heads per kv head; "
                             f"got {HQ} query heads and {H} kv heads")
        check_packed(q, cu_seqlens, self.varlen, "topk")
        Tk = q_start + T if Tk is None else Tk
        check_piece(q_start, T, Tk, self.QB, self.offsets, cu_seqlens, "topk")
        return B, T, ((Tk, T, q_start) if self.offsets else ())

    def _consts(self, cfg: Config) -> dict:
        return dict(G=self.G, GP=self.GP, DQK=self.DQK, BDK=self.BDK, LS=self.LS, TOPK=self.TOPK,
                    TOPKP=self.TOPKP, KEEP_FIRST=self.KEEP_FIRST, KEEP_LAST=self.KEEP_LAST, **SORT_KEYS,
                    NI=cfg.get("NI", 0), R=cfg["R"], BM=self._rows(cfg["R"]), BN=cfg["BN"], BJ=cfg["BJ"],
                    **launch_options(cfg))


class TopkCmp(Topk):
    """Select blocks scored by the compression branch's attention probabilities."""

    TUNE_KINDS = {"topk": ("topk",)}

    def __init__(self, kernels, variables: Mapping):
        super().__init__(kernels, variables)
        v = self.variables
        self.L, self.STRIDE, self.A, self.C = v["L"], v["STRIDE"], v["A"], v["C"]

    def _min_bj(self) -> int:
        """A compressed block read by chunk j0 may overlap select blocks up to (A - 2) // C + 1 past the
        chunk's end: its share is carried into the next chunk only, so BJ must cover that reach."""
        return next_pow2((self.A - 2) // self.C + 1) if self.A > 1 else 1

    def _bn(self, BJ: int) -> int:
        """Compressed blocks per tile for chunks of BJ select blocks (BJ * C compressed blocks)."""
        return max(16, min(64, next_pow2(BJ * self.C)))

    def _heuristic(self, kind: str, gpu: bool, T: int) -> Config:
        """The untuned config {R, BN, BJ, num_warps, dot}: BM = GP * R query rows, BN compressed
        blocks per tile, BJ select blocks per chunk; dot: True scores with an fp16 tl.dot (p times
        the integer overlap weights; GPU), False in fp32."""
        pinned = self._pinned()
        if pinned is not None:
            return pinned
        GP = self.GP
        R = max(1, 128 // GP)                   # interpreter too: few, large programs
        # H200, T = 64k, G = 16, D = 128, bf16 (ms): BM = 128, BJ = 16, BN = 64 (one tile per chunk,
        # a flat loop) 13.3; BJ = 32, BN = 64 15.1; BJ = 32, BN = 128 30.9 (4 warps) / 16.4 (8 warps)
        BJ = max(16, self._min_bj())
        if gpu:   # 64-row tiles; H200, 64k (ms): G = 16 10.00 against 10.19 for 128 rows; G = 8 7.90
            R = max(1, 64 // GP)   # against 8.88; G = 4 10.62 against 16.45 (32 rows: 23.9)
        cfg = dict(R=R, BN=self._bn(BJ), BJ=BJ, num_warps=4, dot=gpu)
        if gpu and self.BDK <= 128 and R * GP <= 128:
            # 2 stages (67 KB of shared memory) and at most 168 registers: 3 programs per SM instead of
            # 2; H200, 64k / 32k / 16k: 10.9 / 2.89 / 0.81 ms against 11.7 / 3.11 / 0.87
            cfg.update(num_stages=2, maxnreg=168)
        if gpu and T >= 48 * self.LS * BJ:
            # long sequences: late chunks rarely bring a row more than 2 entrants, so 2 insertion steps
            # replace most rank merges (NI); H200, G = 16, 64k: 10.21 ms against 10.83 (NI = 1 10.67,
            # 3 10.62, 4 11.42); G = 8 (HQ = 32): 8.89 against 9.70; at 32k (32 chunks) 2.92 against 2.88
            cfg["NI"] = 2
        return cfg

    def smem_bytes(self, kind: str, cfg: Config, dtype_bytes: int = 2) -> int:
        """Shared memory of a config, estimated: the q tile (a tl.dot operand loaded once) plus
        num_stages - 1 buffers (Triton's default 3 stages) of the tiles the chunk loop loads, and
        the fp16 overlap weights as a dot operand. At or above what triton 3.9 allocates for sm_90;
        the tuner still catches out-of-resources errors."""
        BM, bufs, BDK = cfg["R"] * self.GP, max(1, (cfg.get("num_stages") or 3) - 1), self.BDK
        return (BM * BDK + bufs * BDK * cfg["BN"]) * dtype_bytes + cfg["BN"] * cfg["BJ"] * 2 * (2 if self.A > 1 else 1)

    def config_space(self, kind: str, T: int, *, smem: Optional[int] = None, dtype_bytes: int = 2) -> list[Config]:
        """Candidate configs for the tuner (GPU), partial dicts over the heuristic (``_candidates``,
        BN following BJ)."""
        return self._prune(kind, self._candidates(self._bn), T, smem, dtype_bytes)

    def topk(self, q, k_cmp, lse_cmp, scale, cu_seqlens=None, *, config=None, q_start=0,
             n_keys=None) -> torch.Tensor:
        """Select blocks scored by the compression branch -> idx [B, T, H, TOPK] int32, ascending,
        -1 padded. Packed sequences (VARLEN): B = 1, cu_seqlens [N + 1], k_cmp [1, sum NC_s, H, DQK]
        (each sequence's compressed blocks in turn); idx holds each sequence's own block numbers.
        Query pieces (OFFSETS): q's and lse_cmp's T rows are the positions q_start .. of a sequence
        of n_keys keys (default q_start + T), whose compressed blocks k_cmp holds."""
        DQK, L, STRIDE = self.DQK, self.L, self.STRIDE
        if q.stride(-1) != 1:
            q = q.contiguous()
        if k_cmp.stride(-1) != 1:
            k_cmp = k_cmp.contiguous()
        H = k_cmp.shape[2]
        B, T, keys = self._check(q, H, cu_seqlens, q_start, n_keys)
        if self.varlen:
            NC = k_cmp.shape[1]                                   # sum of NC_s, checked by the caller
            if k_cmp.shape[0] != 1 or k_cmp.shape[-1] != DQK:
                raise ValueError(f"k_cmp must be [1, NC, H, DQK]; got {tuple(k_cmp.shape)}")
        else:
            Tk = keys[0] if keys else T
            NC = num_compressed_blocks(Tk, L, STRIDE)
            if k_cmp.shape[:2] != (B, NC) or k_cmp.shape[-1] != DQK:
                raise ValueError(f"k_cmp must be [B, NC, H, DQK] with NC = {NC} for {Tk} keys; got {tuple(k_cmp.shape)}")
        lse_cmp = lse_cmp.float().contiguous()
        idx = new_idx((B, T, H, self.TOPK), q.device)
        cfg = self.resolve_config(q, "topk", config)
        if NC == 0:                                           # nothing visible: every score is 0
            k_cmp = q.new_zeros((B, 1, H, DQK))
        groups, PR = self._groups(cfg["R"])                   # positions per program
        if self.varlen:
            if T == 0:
                return idx
            cu, lens = packed(cu_seqlens)
            cu_cmp = compressed_cu_seqlens(cu, L, STRIDE)         # int32, as cu
            tiles = tile_table(lens, PR, T)                       # (sequence, query tile of PR positions)
            grid, seq = (tiles.shape[0], H), (cu, cu_cmp, tiles, lens.numel())
        else:
            grid, seq = (cdiv(T, PR), B * H), keys or (T,)
        self.kernels.topk_cmp_kernel[grid](
            q, k_cmp, lse_cmp, idx, *q.stride()[:3], *k_cmp.stride()[:3], *seq, H, scale * LOG2E,
            L=L, STRIDE=STRIDE, A=self.A, C=self.C, LOWP=cfg["dot"], **groups, **self._consts(cfg))
        return idx

    def _groups(self, R: int) -> tuple[dict, int]:
        """QB > 1: the constexprs RG (groups per program) and NSUB (tiles of R positions per
        group), and the positions per program; QB = 1: none, and R."""
        if self.QB == 1:
            return {}, R
        RG, NSUB = max(1, R // self.QB), max(1, self.QB // R)
        return dict(QB=self.QB, RG=RG, NSUB=NSUB), RG * self.QB


class TopkMeanPool(Topk):
    """Select blocks scored by q . mean(block keys)."""

    TUNE_KINDS = {"topk_mean_pool": ("topk",)}

    def _rows(self, R: int) -> int:
        """QB > 1: a tile is R groups, one row each (q summed over the group's positions and heads)."""
        return R if self.QB > 1 else R * self.GP

    def _heuristic(self, kind: str, gpu: bool, T: int) -> Config:
        """The untuned config {R, BN, BJ, num_warps, dot}: BM = GP * R query rows (QB > 1: R
        groups), BJ select blocks per chunk; dot: the input_precision of the fp32 q . kbar tl.dot."""
        pinned = self._pinned()
        if pinned is not None:
            return pinned
        if self.QB > 1:
            # one row per group: the fewest rows tl.dot takes; sm_90 (D = 128): BJ = 16 on 8 warps
            # compiles without spills (BJ = 32: 364 bytes on 8 warps, 11 KB on 4)
            return dict(R=16, BN=16, BJ=16, num_warps=8 if gpu else 4, dot="tf32" if gpu else "ieee")
        R = max(1, 128 // self.GP)              # interpreter too: few, large programs
        return dict(R=R, BN=16, BJ=32 if gpu else 16, num_warps=4, dot="tf32" if gpu else "ieee")

    def smem_bytes(self, kind: str, cfg: Config, dtype_bytes: int = 2) -> int:
        """Shared memory of a config, estimated: the fp32 q tile plus num_stages - 1 buffers
        (Triton's default 3 stages) of the fp32 block means the chunk loop loads."""
        BM, bufs, BDK = self._rows(cfg["R"]), max(1, (cfg.get("num_stages") or 3) - 1), self.BDK
        return (BM * BDK + bufs * BDK * cfg["BJ"]) * 4

    def config_space(self, kind: str, T: int, *, smem: Optional[int] = None, dtype_bytes: int = 2) -> list[Config]:
        """Candidate configs for the tuner (GPU), partial dicts over the heuristic (``_candidates``;
        QB > 1: tiles of 16 or 32 groups x BJ of 16, 32 x 4 / 8 warps, then 0 to 3 insertion steps)."""
        if self.QB > 1:
            cands = [dict(R=r, BJ=bj, num_warps=w) for r in (16, 32) for bj in (16, 32) for w in (4, 8)]
            return self._prune(kind, cands + [dict(NI=n) for n in range(4)], T, smem, dtype_bytes)
        return self._prune(kind, self._candidates(None), T, smem, dtype_bytes)

    def _means(self, k: torch.Tensor, cu_seqlens) -> tuple[torch.Tensor, int, tuple]:
        """(kbar fp32 [B, NF, H, DQK] contiguous, NF, packed offsets): the means of the blocks that
        score: the complete ones (causal) or all, the last one over the keys it holds. Packed
        sequences: each sequence's blocks in turn (offsets (cu_f,): sequence s has blocks
        [cu_f[s], cu_f[s + 1])); NF bounds their number without a host sync."""
        B, Tk, H, DQK = k.shape
        LS = self.LS
        if not self.varlen:
            NF = Tk // LS if self.causal else cdiv(Tk, LS)
            if NF == 0:                          # no complete block: every score is -inf
                return k.new_zeros((B, 1, H, DQK), dtype=torch.float32), 0, ()
            return _block_means(k[:, :NF * LS].float(), LS).contiguous(), NF, ()
        cu, lens = packed(cu_seqlens)
        N = lens.numel()
        cu_f = cumsum0(lens // LS if self.causal else (lens + LS - 1) // LS)
        NF = Tk // LS + (0 if self.causal else N)              # a bound on sum of the blocks
        if NF == 0:
            return k.new_zeros((B, 1, H, DQK), dtype=torch.float32), 0, (cu_f,)
        f = torch.arange(NF, device=k.device)
        s = torch.searchsorted(cu_f[1:].long(), f, right=True).clamp(max=N - 1)   # sequence of block f
        j = f - cu_f.long()[s]                                                    # its block in the sequence
        n = (lens[s] - j * LS).clamp(0, LS)                                       # its keys (0: past the last)
        rows = (cu.long()[s] + j * LS)[:, None] + torch.arange(LS, device=k.device)
        w = (torch.arange(LS, device=k.device) < n[:, None]).float()              # [NF, LS]
        kbar = (k[0, rows.clamp(max=Tk - 1)].float() * w[:, :, None, None]).sum(1) / n.clamp(min=1)[:, None, None]
        return kbar[None].contiguous(), NF, (cu_f,)

    def _group_sums(self, q: torch.Tensor, H: int, cu_seqlens) -> tuple[torch.Tensor, int, tuple]:
        """QB > 1: (qg fp32 [B, NG, H, DQK] contiguous: q summed over each group's positions and
        the kv head's G heads, NG, packed offsets (cu_grp,): sequence s has groups [cu_grp[s],
        cu_grp[s + 1]); NG bounds their number)."""
        B, T = q.shape[:2]
        QB = self.QB
        per_head = q.float().unflatten(2, (H, self.G)).sum(3)                    # [B, T, H, DQK]
        if not self.varlen:
            NG = cdiv(T, QB)
            per_head = torch.nn.functional.pad(per_head, (0, 0, 0, 0, 0, NG * QB - T))
            return per_head.unflatten(1, (NG, QB)).sum(2).contiguous(), NG, ()
        cu, lens = packed(cu_seqlens)
        cu_grp = cumsum0((lens + QB - 1) // QB)
        NG = T // QB + lens.numel()                                             # a bound on the groups
        s = seq_of_rows(cu, T)
        grp = cu_grp.long()[s] + (torch.arange(T, device=q.device) - cu.long()[s]) // QB
        qg = per_head.new_zeros((1, NG, H, self.DQK)).index_add_(1, grp, per_head)
        return qg, NG, (cu_grp,)

    def topk_mean_pool(self, q, k, cu_seqlens=None, *, config=None, q_start=0) -> torch.Tensor:
        """Select blocks scored by q . mean(block keys) -> idx [B, T, H, TOPK] int32, ascending, -1
        padded. Packed sequences (VARLEN): B = 1, cu_seqlens [N + 1]; blocks and their means are
        each sequence's own. Query pieces (OFFSETS): q's T rows are the positions q_start .. of the
        sequence whose keys k holds."""
        if q.stride(-1) != 1:
            q = q.contiguous()
        H = k.shape[2]
        B, T, keys = self._check(q, H, cu_seqlens, q_start, k.shape[1])
        idx = new_idx((B, T, H, self.TOPK), q.device)
        cfg = self.resolve_config(q, "topk", config)
        if self.varlen and T == 0:
            return idx
        kbar, NF, cu_f = self._means(k, cu_seqlens)
        if self.QB > 1:                      # a group scores as one row: its q summed
            q, rows, cu_g = self._group_sums(q, H, cu_seqlens)
        else:
            rows, cu_g = T, ()
        if self.varlen:
            cu, lens = packed(cu_seqlens)
            if self.QB > 1:                  # tiles of R groups
                tiles = tile_table((lens + self.QB - 1) // self.QB, cfg["R"], rows)
            else:                            # tiles of R positions
                tiles = tile_table(lens, cfg["R"], T)
            grid, seq = (tiles.shape[0], H), (cu, *cu_f, *cu_g, tiles, lens.numel(), H)
        else:
            grid, seq = (cdiv(rows, cfg["R"]), B * H), (*(keys or (T,)), H, NF)
        self.kernels.topk_mean_pool_kernel[grid](
            q, kbar, idx, *q.stride()[:3], *seq, PREC=cfg["dot"], **({"QB": self.QB} if self.QB > 1 else {}),
            **self._consts(cfg))
        return idx
