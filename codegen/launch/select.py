"""Selection attention (``templates/select.py.j2``): configs and launchers.

Variables (the plan's): G, GP (G padded to a power of two), DQK, DV, BDK, BDV (head dims padded to
powers of two), LS (keys per block), TOPK, TOPKP (TOPK padded), BN (the heuristic's key tile), NT,
BN_CHOICES (key tiles a config may pick), VARLEN (``nsa_dsl.codegen.plan.select_vars``); CAUSAL,
QB (the branch's query_block: fwd / dq tiles walk the union of their rows' blocks, found in the
kernel, so a tile inside one group of QB positions is a dense tile of its blocks) and OFFSETS (the
launchers take ``q_start``: q holds the positions q_start .. of a sequence whose keys k, v hold).

fwd / dq read their K/V tiles by TMA descriptor loads on the GPU (config ``TMA``): host-built
``TensorDescriptor`` objects over k and v as [B, T, H, D] with [1, BN, 1, BD] boxes. Pointer loads
serve where a layout is not 16-byte aligned, and on a triton without host descriptors.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch

from ..ints import cdiv, next_pow2
from . import family
from .base import LOG2E, Config, Family, check_piece, dq_buffer, is_tile, new_output, row_delta, unit_last
from .packed import check_packed, cumsum0, packed, seq_of_rows, tile_table


def _union(u: torch.Tensor) -> torch.Tensor:
    """[..., M] int32 block numbers, -1 = none -> ascending distinct blocks, -1 padded at the end
    (int32 sorts: block numbers stay below 2^31 - 1)."""
    big = torch.iinfo(torch.int32).max
    u = torch.where(u < 0, big, u.to(torch.int32)).sort(-1).values
    u[..., 1:] = torch.where(u[..., 1:] == u[..., :-1], big, u[..., 1:])   # drop repeats
    u = u.sort(-1).values
    return torch.where(u == big, -1, u)


@family("select")
class Select(Family):
    KINDS = ("fwd", "dq", "dkdv")
    TUNE_KINDS = {"fwd": ("fwd",), "bwd": ("dq", "dkdv")}   # launcher -> the kernel kinds it runs

    # Row sharing (PERF.md lever 2): R positions per program read the union of their blocks once.
    # Measured on an H200 (T = 64k, G = 16, LS = 64, TOPK = 16, bf16): 4 adjacent positions chose
    # 50 distinct blocks of 64 on iid random inputs (fwd R = 1: 16.1 ms, R = 4: 23.2 ms) and 17 on
    # slowly drifting keys (R = 1: 15.7 ms, R = 4: 8.8 ms; dq + dk/dv 32.6 -> 24.7 ms): R = 4 pays
    # below about half distinct. A sample of the selection decides, at the cost of one host sync.
    SHARE_MIN_T = 8192        # shorter sequences keep R at its minimum (no sync)
    SHARE_SAMPLE = 1024       # groups of positions sampled
    SHARE_UNDER = 0.5         # distinct fraction below which R = 4 * minimum

    def __init__(self, kernels, variables: Mapping):
        super().__init__(kernels, variables)
        v = self.variables
        self.G, self.GP, self.DQK, self.DV = v["G"], v["GP"], v["DQK"], v["DV"]
        self.BDK, self.BDV, self.LS, self.TOPK = v["BDK"], v["BDV"], v["LS"], v["TOPK"]
        self.TOPKP, self.BN, self.NT = v["TOPKP"], v["BN"], v["NT"]
        self.BN_CHOICES: tuple[int, ...] = tuple(v["BN_CHOICES"])
        self.varlen = bool(v.get("VARLEN", False))
        self.causal = bool(v.get("CAUSAL", True))
        self.QB = int(v.get("QB", 1))
        self.offsets = bool(v.get("OFFSETS", False))

    # -- configs ---------------------------------------------------------------------------------
    def _heuristic(self, kind: str, gpu: bool, T: int) -> Config:
        """The untuned config {R, RQ, CHUNK, BN, num_warps, num_stages} of kernel ``kind``.

        fwd / dq: R positions per program (BM = R * GP rows, at least 16). R > the minimum shares
        block reads between neighbouring positions but masks the rows that did not choose a block:
        it pays when neighbours choose alike (PERF.md, lever 2). dkdv: RQ positions per row tile,
        CHUNK positions of a block's list per program (longer lists are split, combined by atomics).
        BN: keys per tile, one of BN_CHOICES.
        """
        GP = self.GP
        r_min = max(1, 16 // GP)
        d = max(self.BDK, self.BDV)
        if gpu and self.QB > 1:
            # groups of QB positions share their blocks: tiles of up to 128 rows inside one group
            # (several groups only where a group has fewer than 16 rows), walking TOPK blocks each
            R = max(r_min, min(self.QB, 128 // GP))
            rows = 32 if kind == "dkdv" else R * GP
            return dict(R=R, RQ=max(1, 32 // GP), CHUNK=max(256, min(4096, self.TOPK * self.LS)), BN=self.BN,
                        num_warps=4 if rows <= 64 and d <= 128 else 8, num_stages=2, TMA=kind != "dkdv")
        if gpu:   # SHARE: fwd / dq pick R from the selection itself (_shared_rows)
            # H200, T = 64k, G = 16, D = 128, random selections (ms): fwd on 16-row tiles with 2 warps
            # 15.0, 4 warps 16.1; backward with dq on 2 warps and 32-row dkdv tiles 31.1, with 4 warps
            # and 64-row dkdv tiles 33.3 (2 warps on dkdv: 488). With TMA loads of the K/V tiles (fwd /
            # dq): fwd 13.7 on 1 warp, 14.4 on 2, against 15.2-15.5 with cp.async on 2 (8k: 1.70, 1.83
            # against 1.94); the backward 30.2-30.5 against 32.7
            if kind != "dkdv" and r_min * GP == 16 and d <= 128:   # 16-row tiles
                warps = 1 if kind == "fwd" else 2
            else:
                warps = 4 if d <= 128 else 8
            return dict(R=r_min, RQ=max(1, 32 // GP), CHUNK=max(256, min(4096, self.TOPK * self.LS)), BN=self.BN,
                        num_warps=warps, num_stages=2, SHARE=True, TMA=kind != "dkdv")
        # interpreter: few programs, and CHUNK small enough to exercise the atomic path
        return dict(R=max(1, 64 // GP), RQ=max(1, 64 // GP), CHUNK=64, BN=self.BN, num_warps=4, num_stages=1)

    def _invalid(self, kind: str, cfg: Config) -> Optional[str]:
        rows = cfg["RQ"] if kind == "dkdv" else cfg["R"]
        if not (isinstance(rows, int) and rows >= 1 and is_tile(rows * self.GP)):
            return "row tiles (R * GP, RQ * GP) must be powers of two of at least 16 (tl.dot)"
        if cfg["BN"] not in self.BN_CHOICES:
            return f"BN must be one of {self.BN_CHOICES} (key tiles dividing the block of {self.LS} keys)"
        if kind == "dkdv" and not (isinstance(cfg["CHUNK"], int) and cfg["CHUNK"] >= 1):
            return "CHUNK must be a positive int"
        if not isinstance(cfg.get("TMA", False), bool):
            return "TMA must be True or False"
        return None

    def smem_bytes(self, kind: str, cfg: Config, dtype_bytes: int = 2) -> int:
        """Shared memory of a config, estimated: the tl.dot operands loaded once (fwd: the q tile;
        dq: q and do; dkdv: the k and v tiles) plus num_stages - 1 buffers (at least one) of those
        the main loop loads (fwd / dq: k and v tiles; dkdv: the q and do rows of the gathered
        positions), and for dkdv an fp32 [BN, BM] tile for layout conversions. Within ~20% of what
        triton 3.9 allocates for sm_90; the tuner still catches out-of-resources errors."""
        BDK, BDV = self.BDK, self.BDV
        BN, bufs = cfg["BN"], max(1, cfg["num_stages"] - 1)
        if kind == "dkdv":
            BM = cfg["RQ"] * self.GP
            return (BN * (BDK + BDV) + bufs * BM * (BDK + BDV)) * dtype_bytes + BM * BN * 4
        BM = cfg["R"] * self.GP
        once = BM * BDK if kind == "fwd" else BM * (BDK + BDV)
        return (once + bufs * BN * (BDK + BDV)) * dtype_bytes

    def config_space(self, kind: str, T: int, *, smem: Optional[int] = None, dtype_bytes: int = 2) -> list[Config]:
        """fwd / dq: R of 1, 2, 4 times the minimum (BM <= 128) x key tiles of 32+ keys dividing the
        block x 4 / 8 warps (and 1, 2 on 16-row tiles), with TMA loads and, at the minimum R, also
        without; dkdv: 32, 64, 128 gathered rows x key tiles x 4 / 8 warps."""
        GP = self.GP
        r_min = max(1, 16 // GP)
        tiles = [b for b in self.BN_CHOICES if b >= min(32, self.BN)]    # 16-key tiles only for 16-key blocks
        if kind == "dkdv":
            cands = [dict(RQ=m // GP, BN=bn, num_warps=w) for m in (32, 64, 128) if m >= GP
                     for bn in tiles for w in (4, 8)]
        else:
            cands = [dict(R=r, BN=bn, num_warps=w) for r in (r_min, 2 * r_min, 4 * r_min) if r * GP <= 128
                     for bn in tiles for w in ((1, 2, 4, 8) if r * GP == 16 else (4, 8))]
            cands += [dict(c, TMA=False) for c in cands if c["R"] == r_min]   # cp.async loads instead
        return self._prune(kind, cands, T, smem, dtype_bytes)

    # -- row sharing and K/V loads ---------------------------------------------------------------
    def _shared_rows(self, idx: torch.Tensor, r_min: int) -> int:
        """R for fwd / dq from the selection: 4 * r_min when groups of 4 * r_min neighbouring
        positions choose few distinct blocks (a sample of SHARE_SAMPLE groups past the first
        TOPK blocks, where every position has TOPK choices), else r_min."""
        B, T, H, K = idx.shape
        R = 4 * r_min
        first = min(T, self.TOPK * self.LS)
        n = (T - first) // R
        capturing = idx.is_cuda and torch.cuda.is_current_stream_capturing()   # no host sync in a graph
        if T < self.SHARE_MIN_T or n < 16 or R * self.GP > 128 or capturing:
            return r_min
        pick = torch.linspace(0, n - 1, min(n, self.SHARE_SAMPLE), device=idx.device).long()
        rows = first + pick[:, None] * R + torch.arange(R, device=idx.device)          # [S, R]
        u = idx[:, rows].permute(0, 3, 1, 2, 4).reshape(B, H, -1, R * K).sort(-1).values
        distinct = (u[..., 1:] != u[..., :-1]).sum(-1) + (u[..., :1] >= 0).sum(-1)     # -1 pads count 0
        return R if distinct.float().mean().item() < self.SHARE_UNDER * R * K else r_min

    def _rows_for(self, cfg: Config, idx: torch.Tensor, plan: Callable[[int], tuple]) -> tuple[Config, tuple]:
        """(cfg, plan(R)): cfg with R decided by _shared_rows when SHARE is on and R is at its
        minimum, and the launch plan of that R (_query_plan). The plan of the configured R (its
        block lists) is queued before the host sync, so the GPU is not left idle after the sync
        while the host builds it."""
        r_min = max(1, 16 // self.GP)
        queued = plan(cfg["R"])
        if cfg.get("SHARE") and cfg["R"] == r_min and idx.is_cuda:
            R = self._shared_rows(idx, r_min)
            if R != r_min:            # 64-row tiles: 4 warps at least (2 warps: 25.4 ms against 18.7)
                return dict(cfg, R=R, num_warps=max(4, cfg["num_warps"])), plan(R)
        return cfg, queued

    # -- block lists: the query side -------------------------------------------------------------
    def block_lists(self, idx: torch.Tensor, R: int, tiles: Optional[torch.Tensor] = None,
                    cu_seqlens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, int]:
        """The blocks each program of fwd / dq walks: (blk, RK) with blk [B, H, cdiv(T, R), RK],
        ascending, distinct, -1 padded at the end. R = 1: idx itself, seen through a permuted view
        (no copy). R > 1: the union of the R positions' choices (RK = R * TOPK), made with two sorts.
        Packed sequences (VARLEN; ``tiles`` from tile_table): blk [1, H, n_tiles, RK], row e = the
        union of the choices of the positions of tile e, which never leaves its sequence. For R = 1
        the tile table's real rows are the packed rows in order, so idx itself still serves."""
        B, T, H, K = idx.shape
        if R == 1:
            return idx.permute(0, 2, 1, 3), K
        if self.varlen:
            cu, lens = packed(cu_seqlens)
            N = lens.numel()
            seq = tiles[:, 0].long()
            s = seq.clamp(max=N - 1)
            local = tiles[:, 1].long()[:, None] * R + torch.arange(R, device=idx.device)   # [n, R]
            real = (seq < N)[:, None] & (local < lens[s][:, None])
            rows = (cu.long()[s][:, None] + local).clamp(max=T - 1)
            u = torch.where(real[:, :, None, None], idx[0][rows], -1)             # [n, R, H, K]
            u = u.permute(2, 0, 1, 3).reshape(1, H, tiles.shape[0], R * K)
        else:
            n = cdiv(T, R)
            u = torch.nn.functional.pad(idx, (0, 0, 0, 0, 0, n * R - T), value=-1)
            u = u.view(B, n, R, H, K).permute(0, 3, 1, 2, 4).reshape(B, H, n, R * K)
        return _union(u), R * K

    def _query_plan(self, q: torch.Tensor, H: int, idx: torch.Tensor, R: int,
                    cu_seqlens: Optional[torch.Tensor], keys: tuple = ()) -> tuple:
        """(grid, sequence arguments, block-list arguments, RK / RKP) of fwd / dq with R positions;
        ``keys``: the sequence arguments of a module with OFFSETS (T, TQ, T0). With QB > 1 the
        kernels find their blocks themselves (no block lists)."""
        B, T = q.shape[:2]
        if self.varlen:
            cu, lens = packed(cu_seqlens)
            tiles = tile_table(lens, R, T)                                    # (sequence, query tile of R)
            grid, seq = (tiles.shape[0], H), (cu, tiles, lens.numel())
        else:
            tiles, grid, seq = None, (cdiv(T, R), B * H), keys or (T,)
        if self.QB > 1:
            return grid, seq, (), {}
        blk, rk = self.block_lists(idx, R, tiles, cu_seqlens)
        return grid, seq, (blk, blk.stride(0), blk.stride(1), blk.stride(2)), dict(RK=rk, RKP=next_pow2(rk))

    # -- the selection inverted: the key side ----------------------------------------------------
    def _packed_blocks(self, cu: torch.Tensor, lens: torch.Tensor, T: int) -> tuple:
        """Select blocks of the packed sequences: (cu_blk int32 [N + 1]: sequence s has blocks
        [cu_blk[s], cu_blk[s + 1]) in packed numbering, cdiv(len_s, LS) of them; NB = T // LS + N, a
        bound on the packed blocks; blk_seq int32 [NB]: the sequence of each packed block, N past
        the last; seq_row [T] int64: the sequence of each row)."""
        LS, N = self.LS, lens.numel()
        cu_blk = cumsum0((lens + LS - 1) // LS)
        NB = T // LS + N
        blk_seq = torch.searchsorted(cu_blk[1:].long(), torch.arange(NB, device=cu.device), right=True)
        return cu_blk, NB, blk_seq.to(torch.int32), seq_of_rows(cu, T)

    def invert(self, idx: torch.Tensor, chunk: int, cu_seqlens: Optional[torch.Tensor] = None,
               n_keys: Optional[int] = None) -> tuple:
        """The selection, inverted: for each list l = (b * H + h) * NB + j (NB = cdiv(n_keys, LS),
        n_keys the keys, by default idx's rows), the rows t of idx that chose block j for kv head h,
        ascending. Packed sequences (VARLEN, B = 1):
        j is the packed block (sequence s's blocks start at cu_blk[s]), NB = T // LS + N bounds
        them, and positions are the sequence's own (row - cu[s]).

        Returns (pos [N] int32, list_off [n_lists + 1] int64: list l is pos[list_off[l]:list_off[l + 1]],
        item_list, item_chunk [n_items] int32: the work items (list, chunk of CHUNK positions); a list
        with no position still gets one item (its keys get zero gradients), n_chunks [n_lists]).
        n_items is a bound known without a device sync; items past the real ones carry list =
        n_lists and do nothing. All torch ops (a stable sort of the flattened idx), no host sync.
        """
        B, T, H, K = idx.shape
        dev = idx.device
        blk = idx.permute(0, 2, 1, 3).long()                                # [B, H, T, K]
        if self.varlen:
            cu, lens = packed(cu_seqlens)
            cu_blk, NB, _, seq_row = self._packed_blocks(cu, lens, T)
            blk = torch.where(blk >= 0, blk + cu_blk.long()[seq_row].view(1, 1, T, 1), -1)   # packed blocks
        else:
            NB = cdiv(T if n_keys is None else n_keys, self.LS)
        n_lists = B * H * NB
        base = (torch.arange(B * H, device=dev) * NB).view(B, H, 1, 1)
        key = torch.where(blk >= 0, blk + base, n_lists).flatten()          # -1 -> n_lists (dropped)
        # int32 keys when the lists fit: half the radix passes of an int64 sort
        kt = torch.int32 if n_lists < (1 << 31) - 1 else torch.int64
        key_sorted, order = torch.sort(key.to(kt), stable=True)             # stable: t ascending per list
        pos = (order // K) % T                                              # flat = ((b*H + h)*T + t)*K + s
        if self.varlen:
            pos = pos - cu.long()[seq_row[pos]]                             # the position in its sequence
        pos = pos.to(torch.int32)
        list_off = torch.searchsorted(key_sorted, torch.arange(n_lists + 1, device=dev, dtype=kt))
        count = list_off[1:] - list_off[:-1]
        n_chunks = torch.clamp((count + chunk - 1) // chunk, min=1)
        item_end = torch.cumsum(n_chunks, 0)                                # inclusive
        n_items = n_lists + key.numel() // chunk                            # >= sum(n_chunks)
        items = torch.arange(n_items, device=dev)
        item_list = torch.searchsorted(item_end, items, right=True)
        first = (item_end - n_chunks).gather(0, item_list.clamp(max=n_lists - 1))
        item_chunk = items - first
        return pos, list_off, item_list.to(torch.int32), item_chunk.to(torch.int32), n_chunks

    # -- launchers ---------------------------------------------------------------------------------
    def _check(self, q, k, v, idx, cu_seqlens, q_start: int = 0):
        """(B, T, HQ, H, keys): q [B, T, HQ, DQK]; keys: the sequence arguments of a module with
        OFFSETS (Tk, T, q_start), else ()."""
        B, T, HQ, dqk = q.shape
        Tk, H = k.shape[1], k.shape[2]
        assert HQ == H * self.G, f"select kernels were generated for G = {self.G}: HQ = {HQ}, H = {H}"
        assert dqk == self.DQK and k.shape[3] == self.DQK and v.shape[3] == self.DV, \
            "head dims differ from the generated ones"
        assert k.shape[:3] == (B, Tk, H) and v.shape[:3] == (B, Tk, H)
        assert idx.shape == (B, T, H, self.TOPK), f"idx has shape {tuple(idx.shape)}, expected {(B, T, H, self.TOPK)}"
        check_packed(q, cu_seqlens, self.varlen, "select")
        check_piece(q_start, T, Tk, self.QB, self.offsets, cu_seqlens, "select")
        return B, T, HQ, H, ((Tk, T, q_start) if self.offsets else ())

    @staticmethod
    def _strides(q, k, v, idx=None):
        s = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
             v.stride(0), v.stride(1), v.stride(2))
        return s if idx is None else s + (idx.stride(0), idx.stride(1), idx.stride(2))

    def _consts(self, cfg: Config) -> dict:
        return dict(G=self.G, GP=self.GP, LS=self.LS, BN=cfg["BN"], DQK=self.DQK, DV=self.DV,
                    BDK=self.BDK, BDV=self.BDV)

    def _query_consts(self, cfg: Config) -> dict:
        """The constexprs of fwd / dq beyond _consts: rows, the idx tile, key tiles per block."""
        return dict(R=cfg["R"], TOPK=self.TOPK, TOPKP=self.TOPKP, NT=cdiv(self.LS, cfg["BN"]))

    def fwd(self, q, k, v, idx, scale, *, config=None, cu_seqlens=None, q_start=0):
        """o [B, T, HQ, DV] (q.dtype), lse [B, T, HQ] (fp32); idx [B, T, H, TOPK] int32.
        Packed sequences (VARLEN): B = 1, cu_seqlens [N + 1]; idx holds each sequence's own block
        numbers. Query pieces (OFFSETS): q's T rows are the positions q_start .. of the sequence
        whose keys k, v [B, Tk, H, D] hold (q_start a multiple of QB)."""
        B, T, HQ, H, keys = self._check(q, k, v, idx, cu_seqlens, q_start)
        q, k, v, idx = unit_last(q), unit_last(k), unit_last(v), unit_last(idx.to(torch.int32))
        o = new_output((B, T, HQ, self.DV), q.dtype, q.device)
        lse = new_output((B, T, HQ), torch.float32, q.device)
        if B * T == 0:
            return o, lse
        cfg, (grid, seq, lists, rk) = self._rows_for(self.resolve_config(q, "fwd", config), idx,
                                                     lambda R: self._query_plan(q, H, idx, R, cu_seqlens, keys))
        k_desc, v_desc, tma = self._kv_descs(k, v, cfg)
        self.kernels.select_fwd_kernel[grid](
            q, k, v, k_desc, v_desc, idx, o, lse, scale * LOG2E, *seq, H, *self._strides(q, k, v, idx), *lists,
            **self._query_consts(cfg), **rk, **self._consts(cfg), TMA=tma,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return o, lse

    def bwd(self, q, k, v, idx, o, lse, do, scale, *, config=None, cu_seqlens=None, delta=None, dq_acc=None,
            q_start=0):
        """(dq, dk, dv) in q.dtype; recomputes P from lse (natural log, as fwd returns it).
        delta: rowsum(o * do) [B, T, HQ] fp32 when the caller has it; dq_acc: a contiguous q-shaped
        tensor holding other branches' gradient of q, to which this one is added in place (returned
        as dq). Query pieces (OFFSETS): as fwd; dk, dv have the keys' rows."""
        B, T, HQ, H, keys = self._check(q, k, v, idx, cu_seqlens, q_start)
        q, k, v, idx = unit_last(q), unit_last(k), unit_last(v), unit_last(idx.to(torch.int32))
        o, do, lse = o.contiguous(), do.contiguous(), lse.contiguous()
        dq = dq_buffer(q, dq_acc)
        if B * T == 0:                       # no query: nothing reaches the keys
            return dq, k.new_zeros(k.shape), v.new_zeros(v.shape)
        delta = row_delta(self.kernels, o, do, self.DV, self.BDV) if delta is None else delta.contiguous()

        cfg, (grid, seq, lists, rk) = self._rows_for(self.resolve_config(q, "dq", config), idx,
                                                     lambda R: self._query_plan(q, H, idx, R, cu_seqlens, keys))
        k_desc, v_desc, tma = self._kv_descs(k, v, cfg)
        self.kernels.select_bwd_dq_kernel[grid](
            q, k, v, k_desc, v_desc, idx, do, lse, delta, dq, scale * LOG2E, scale, *seq, H,
            *self._strides(q, k, v, idx), *lists, **self._query_consts(cfg), **rk, **self._consts(cfg),
            ACC=dq_acc is not None, TMA=tma, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

        cfg = self.resolve_config(q, "dkdv", config)
        LS, DQK, DV = self.LS, self.DQK, self.DV
        chunk = cdiv(cfg["CHUNK"], cfg["RQ"]) * cfg["RQ"]
        Tk = k.shape[1]
        pos, list_off, item_list, item_chunk, n_chunks = self.invert(idx, chunk, cu_seqlens, Tk)
        # fp32 accumulators; rows of blocks whose list is split in chunks start at 0 (atomics)
        dk = new_output((B, Tk, H, DQK), torch.float32, q.device)
        dv = new_output((B, Tk, H, DV), torch.float32, q.device)
        if self.varlen:
            cu, lens = packed(cu_seqlens)
            cu_blk, NB, blk_seq, seq_row = self._packed_blocks(cu, lens, T)
            row_blk = cu_blk.long()[seq_row] + (torch.arange(T, device=q.device) - cu.long()[seq_row]) // LS
            row_list = torch.arange(H, device=q.device)[None, :] * NB + row_blk[:, None]   # [T, H]: list of each key row
            split = (n_chunks[row_list] > 1)[None, :, :, None]                  # [1, T, H, 1]
            seq = (cu, cu_blk, blk_seq, lens.numel())
        else:
            NB = cdiv(Tk, LS)
            split = (n_chunks > 1).view(B, H, NB, 1).expand(B, H, NB, LS).reshape(B, H, NB * LS)[:, :, :Tk]
            split = split.transpose(1, 2)[..., None]                            # [B, Tk, H, 1]
            seq = keys or (T,)
        dk.masked_fill_(split, 0.)
        dv.masked_fill_(split, 0.)
        self.kernels.select_bwd_dkdv_kernel[(item_list.numel(), cdiv(LS, cfg["BN"]))](
            q, k, v, do, lse, delta, dk, dv, pos, list_off, item_list, item_chunk, B * H * NB, chunk,
            scale * LOG2E, scale, *seq, H, NB, *self._strides(q, k, v),
            RQ=cfg["RQ"], **self._consts(cfg), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return dq, dk.to(k.dtype), dv.to(v.dtype)
