"""Decoding and chunked prefill over a KV cache (``templates/decode.py.j2``): config and launcher.

Variables (the plan's, ``nsa_dsl.codegen.plan.lower_decode``): G, GP, DQK, DV, BDK, BDV; CMP / SEL / WIN,
one record per compress / select / window branch (``DecodeCmp`` / ``DecodeSel`` / ``DecodeWin``,
a select branch scored by a compress branch carrying their ``DecodePair``); OUT, NG, GATED; NP,
NBR, NF. ``nsa_dsl.runtime.decoding.DecodeOp`` calls :meth:`Decode.decode`.

The config is a heuristic of the call's shapes (batch, chunk, kv heads, the longest cache), not
autotuned: the family has no tuned kinds.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from nsa_dsl.semantics.reference import num_compressed_blocks, num_select_blocks

from ..ints import cdiv, next_pow2
from . import family
from .base import LOG2E, Config, Family, new_output
from .topk import new_idx


@family("decode")
class Decode(Family):
    """The launcher of one rendered decode module: :meth:`decode` runs every branch of the spec for
    the new tokens of each sequence (``decode_kernel``, and under split-K ``decode_split_kernel``)."""

    WS_CAP = 256 << 20   # bytes of split-K workspaces; above it (long chunked prefills) decode_kernel runs alone
    _SMS: dict = {}      # streaming multiprocessors per CUDA device

    def __init__(self, kernels, variables: Mapping):
        super().__init__(kernels, variables)
        v = self.variables
        self.G, self.GP, self.DQK, self.DV, self.BDK, self.BDV = (v[k] for k in ("G", "GP", "DQK", "DV", "BDK", "BDV"))
        self.CMP, self.SEL, self.WIN = v["CMP"], v["SEL"], v["WIN"]
        self.NP, self.NBR, self.NG, self.GATED = v["NP"], v["NBR"], v["NG"], v["GATED"]
        # the (compress, select) pairs whose block scores split-K / ONEPASS compute in the compression pass
        self.pairs = [c.fuse for c in self.CMP if c.fuse]
        self.FUSED = [(p.ci, p.si) for p in self.pairs]
        self.CONFIG: Optional[dict] = None   # a pinned config (any of _config's keys); None: the heuristic

    @classmethod
    def _sm_count(cls, device) -> int:
        if device not in cls._SMS:
            cls._SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
        return cls._SMS[device]

    # -- config ----------------------------------------------------------------------------------
    def _min_bj(self) -> int:
        """A compressed block read by chunk j0 may overlap select blocks up to (A - 2) // C + 1 past the
        chunk's end; its share is carried into the next chunk only, so BJ must cover that reach."""
        need = 1
        for s in self.SEL:
            if s.score and s.score.A > 1:
                need = max(need, (s.score.A - 2) // s.score.C + 1)
        return next_pow2(need)

    def _n_chunks(self, t_max: int, BJ: int) -> int:
        """NK: scoring chunks (BJ select blocks each) of the fused select branches at a cache of t_max
        tokens, the depth of the ws_u workspace."""
        return max([cdiv(num_select_blocks(t_max, p.LS), BJ) for p in self.pairs] + [1])

    def _split_units(self, t_max: int, BN: int, BJ: int) -> int:
        """The most slices worth cutting at a cache of t_max tokens: per branch its key tiles / 4 (a slice
        keeps at least 4 tiles), for a fused compress branch its scoring chunks / 2 (one tile of BJ
        select blocks each)."""
        units = [1]
        for c in self.CMP:
            if c.fuse:
                units.append(cdiv(num_select_blocks(t_max, c.fuse.LS), BJ) // 2)
            else:
                units.append(cdiv(num_compressed_blocks(t_max, c.L, c.STRIDE), BN) // 4)
        units += [cdiv(min(t_max, w.W + w.SINKS), BN) // 4 for w in self.WIN]
        return max(units)

    def _ws_bytes(self, B: int, C: int, H: int, t_max: int, cfg: Config) -> int:
        """fp32 workspaces of split-K: partial states [NS, n_qt, B*H, NP, BM, BDV + 2], fused scores
        [n_qt, B*H, NF, NK, BM, BJ + 2]."""
        rows = cdiv(C, cfg["R"]) * B * H * cfg["R"] * self.GP
        return 4 * rows * (cfg["NS"] * self.NP * (self.BDV + 2)
                           + len(self.FUSED) * self._n_chunks(t_max, cfg["BJ"]) * (cfg["BJ"] + 2))

    def _config(self, q: torch.Tensor, t_max: int, override: Optional[Mapping] = None) -> Config:
        """Tiles and the split factor: {R, BN, BJ, NS, SPLIT, ONEPASS, TAIL, BN_split, BJM, NJ,
        num_warps, split_warps, num_stages}; a heuristic, no autotuning.

        R tokens per program: the chunk's tokens up to 8 (speculative decoding shares K/V reads
        between them), at least 16 // GP so that BM = R * GP >= 16 rows. BN keys (compressed blocks)
        per tile of decode_kernel, BN_split of decode_split_kernel, BJ select blocks per scoring chunk.
        GPU: BM <= 32 rows, BN = 32, 8 warps, 3 stages: no spills for the paper's heads (ptxas, sm_90,
        triton 3.9, with the launcher's 16-byte alignment specialization, which the loop pipelining
        needs: decode_kernel 128 registers at D = 128 and BM = 16 split, 166 unsplit; ~190 at BM = 32;
        decode_split_kernel 80 at BM = 16, 128 at BM = 32). Unsplit, BJ = 32 <= BM = 32 makes Triton
        lay the scoring loop's dots out with the warps along M (a p @ w dot with N <= M): replicated
        tiles, but no spills; a larger BJ would grow the top-k merge's R * BJ^2 pairwise ranks.
        ONEPASS: on the GPU when the programs fill it (one per SM at least) and a select branch is fused:
        decode_kernel alone, scoring in its compression pass. SPLIT, NS (split-K): otherwise, on the GPU,
        decode_split_kernel runs whenever NS > 1 and its workspaces stay under WS_CAP bytes. NS: slices
        for ~4 programs per SM (80 registers at 8 warps: 3 split programs resident per SM), each slice
        keeping at least 4 key tiles of its branch (2 one-tile scoring chunks of a fused compress
        branch), at most 8 (_split_units, at the longest cache, t_max tokens). Split: BJ = 16 (a fused compress branch reads one tile per chunk of BJ select
        blocks: 64 compressed blocks for the paper), BN_split = 32, BJM = 64 >> (bits(R) // 2) select
        blocks per top-k merge in decode_kernel (64 for one token, 16 for 8 or 16) of the branches it
        scores with a second pass; NJ select blocks per extraction window of the fused ones (below).
        Interpreter: BM up to 128 rows and BN = 128 (few, large programs run fastest), no split.
        Pinned (``CONFIG``, then ``override``): NS > 1 implies SPLIT unless SPLIT is pinned too; SPLIT
        = False forces NS = 1; ONEPASS = True forces SPLIT = False (and needs a fused branch, else it
        is off); a pinned BN without BN_split sets both.
        """
        GP, FUSED = self.GP, self.FUSED
        C = q.shape[1]
        rows = 32 if q.is_cuda else 128
        R = max(16 // GP, min(next_pow2(max(C, 1)), 8, max(1, rows // GP)))
        cfg = dict(R=R, BN=32 if q.is_cuda else 128, BJ=max(32 if q.is_cuda else 16, self._min_bj()),
                   num_warps=8 if q.is_cuda else 1, num_stages=3 if q.is_cuda else 1, NS=1, SPLIT=False)
        if q.is_cuda and self.NP > 0:
            B, H = q.shape[0], q.shape[2] // self.G
            programs = cdiv(C, R) * B * H
            sms = self._sm_count(q.device)
            split = dict(BJ=max(16, self._min_bj()), BN_split=32)
            # H200, paper pattern, 64k cache: B = 1 NS = 8 0.093 ms per step, 16 0.104, 32 0.141, 64 0.222
            # (decode_kernel merges the slices, 4 programs); B = 8 NS = 8 0.108, 17 0.142. When the programs
            # fill the GPU one slice whose tail combines (one fused kernel): B = 64 0.248 ms, against NS = 3
            # 0.259 (tail) / 0.264 (decode_kernel)
            ns = 1 if programs >= sms else \
                max(1, min(cdiv(4 * sms, programs), self._split_units(t_max, split["BN_split"], split["BJ"]), 8))
            fits = self._ws_bytes(B, C, H, t_max, dict(cfg, NS=ns, **split)) <= self.WS_CAP
            if ns == 1 and FUSED and fits:
                # the programs fill the GPU: decode_kernel alone, its fused compress branches scoring their
                # select blocks in the same pass (H200, paper, B = 64, 64k: 0.207 ms per step, against
                # 0.247 for the split kernel's one slice with a combining tail; at B = 8 / 1 ONEPASS takes
                # 0.19 / 0.18, split-K 0.100 / 0.087)
                cfg.update(ONEPASS=True, **split)
            elif ns > 1 and fits:
                cfg.update(NS=ns, SPLIT=True, **split)
            # 3 stages (H200, paper pattern, graph ms per step at 64k): B = 64 0.295 against 0.354 with 2
            # (split kernel, third session; ONEPASS: 0.207 against 0.246, 4 stages 0.211); B = 1 0.074
            # against 0.086 (4: 0.074), B = 8 0.089 against 0.100 (4: 0.090); B = 1 at 16k 0.063 / 0.071
            if programs >= sms and R * GP <= 16:
                # 4 warps for 16-row tiles when the programs fill the GPU: B = 64 0.261 against 0.281 (split
                # kernel), ONEPASS 0.207 against 0.264; at B = 1 and 8, 8 warps are faster (B = 1: 0.074 / 0.092)
                cfg["num_warps"] = 4
        pinned = {**(self.CONFIG or {}), **(override or {})}
        cfg.update(pinned)
        if "SPLIT" not in pinned and cfg["NS"] > 1:
            cfg["SPLIT"] = True
        if pinned.get("ONEPASS"):
            cfg.update(NS=1, SPLIT=False)
        if self.NP == 0 or not cfg["SPLIT"]:
            cfg.update(NS=1, SPLIT=False)
        # ONEPASS: decode_kernel alone computes the fused compress branches with their block scores
        cfg["ONEPASS"] = bool(cfg.get("ONEPASS")) and bool(FUSED) and not cfg["SPLIT"]
        if cfg["ONEPASS"] and "BJ" not in pinned:
            cfg["BJ"] = max(16, self._min_bj())
        if "BN" in pinned and "BN_split" not in pinned:
            cfg["BN_split"] = cfg["BN"]
        cfg.setdefault("BN_split", cfg["BN"])             # decode_split_kernel's key tile
        # TAIL: the split kernel's last slice per program combines (no decode_kernel); by default only for
        # a pinned split with one slice (B = 8, NS = 8: 0.108 ms against 0.126 with the tail; B = 1 equal)
        cfg.setdefault("TAIL", cfg["NS"] == 1)
        cfg.setdefault("split_warps", cfg["num_warps"])   # and warps
        if not cfg["SPLIT"] and not cfg["ONEPASS"]:
            cfg["BJM"] = cfg["BJ"]
        # select blocks per top-k merge of decode_kernel: its pairwise ranks hold R * BJM^2 int64 keys
        cfg.setdefault("BJM", max(cfg["BJ"], 64 >> (cfg["R"].bit_length() // 2)))
        assert cfg["BJM"] % cfg["BJ"] == 0 and cfg["BJM"] & (cfg["BJM"] - 1) == 0, "BJM: a power-of-two multiple of BJ"
        # fused select branches under SPLIT: select blocks per extraction window, [R, NJ] scores and keys
        # in registers: every block of the longest cache up to 2048 for one token (128k for the paper;
        # 255 registers at 4 warps, no spills, ptxas sm_90), 512 / R for more; at least 256 on the GPU
        # (few variants to compile as a cache grows); 64 in the interpreter (the tests pin 16 to merge
        # several windows)
        n_blk = max([num_select_blocks(t_max, p.LS) for p in self.pairs] + [1])
        cap = 2048 if cfg["R"] == 1 else max(16, 512 // cfg["R"])
        cfg.setdefault("NJ", min(max(next_pow2(n_blk), 256), cap) if q.is_cuda else 64)
        assert cfg["NJ"] & (cfg["NJ"] - 1) == 0, "NJ: a power of two"
        assert cfg["NJ"] >= cfg["BJ"] or not (cfg["SPLIT"] or cfg["ONEPASS"]), "NJ: at least BJ (whole chunks per window)"
        assert cfg["R"] * GP >= 16 and min(cfg["BN"], cfg["BN_split"], cfg["BJ"]) >= 16, "tl.dot needs tiles of at least 16"
        assert cfg["BJ"] >= self._min_bj(), f"BJ = {cfg['BJ']} is too small for the overlap of the scoring blocks"
        return cfg

    # -- launchers --------------------------------------------------------------------------------
    def decode(self, q, start, nq, cmp, sel, win, gates, scale, *, t_max, aux=False, config=None,
               table=None, page: int = 0):
        """Every branch for the C new tokens of each sequence (one call: :meth:`bind` + run).

        q [B, C, HQ, DQK]; start [B] int32 (cache length before the chunk), nq [B] int32 (real tokens);
        cmp: [(k_cmp, v_cmp)] per compress branch ([B, MAXNC, H, D]); sel: [(k, v, kbar)] per select
        branch (raw [B, MAXLEN, H, D]; kbar [B, MAXNS, H, DQK] fp32 for mean_pool scores, else None);
        win: [(k, v)] per window branch; gates [B, C, HQ, NG] or None; t_max: the longest cache
        (host int, >= max(start + nq): the split heuristic and the depth of the fused-score workspace;
        chunks past it are not scored). All raw buffers share one layout.
        Paged (``page`` = P > 0, ``table`` [B, W] int32 block table): every buffer is a pool of pages
        [NPG, P | entries per page, H, D] (raw: P positions; a pooled entry i, starting at position
        i * stride, in the page of that position at slot (i * stride % P) // stride); entries of
        pages outside the table or the pool are never read.
        Returns o [B, C, HQ, DV] (q.dtype) and, with aux, (idx list [B, C, H, TOPK] int32,
        branch outputs [NBR, B, C, HQ, DV], lse [NBR, B, C, HQ] fp32); else (o, None, None, None).
        """
        if q.stride(-1) != 1:
            q = q.contiguous()
        run = self.bind(q, cmp, sel, win, scale, t_max=t_max, aux=aux, config=config, table=table, page=page)
        return run(q, start, nq, gates)

    def bind(self, q, cmp, sel, win, scale, *, t_max, aux=False, config=None, table=None, page: int = 0) -> "DecodeLaunch":
        """The launches of decode calls with q's shape, dtype, device and strides over these buffers
        (see :meth:`decode`): config, grids, workspaces and arguments made once; the returned
        object runs a call with ``(q, start, nq, gates)``."""
        return DecodeLaunch(self, q, cmp, sel, win, scale, t_max=t_max, aux=aux, config=config, table=table, page=page)

    def bind_append(self, raw, cmp, means, *, C: int, state, table=None, page: int = 0, alloc=None,
                    shared: bool = True) -> "AppendLaunch":
        """The launch of appends of chunks of C tokens to these buffers (``append_kernel``): raw
        [(k, v)] per attention branch (compress, select, window order; SHARED: the same pair for
        all), cmp [(k_cmp_flat, v_cmp_flat)] per compress branch (rows [entries + 1, H, D], the last
        spare), means [kbar] per mean_pool select branch; ``state`` = (lens, start_out, lens_out,
        err, cap) (start_out / lens_out None: the lengths are the caller's); paged: ``table``,
        ``page``, ``alloc`` = (free_pages, free_top) to take pages on the device, or None."""
        return AppendLaunch(self, raw, cmp, means, C=C, state=state, table=table, page=page, alloc=alloc,
                            shared=shared)


class DecodeLaunch:
    """Decode calls bound to their buffers (:meth:`Decode.bind`): what a call launches, decided
    once, so that a call from Python costs the kernels' launches, the outputs' allocation and a
    copy of the argument list."""

    def __init__(self, fam: Decode, q, cmp, sel, win, scale, *, t_max, aux, config, table, page):
        G, GP, DV, NP, NBR, FUSED = fam.G, fam.GP, fam.DV, fam.NP, fam.NBR, fam.FUSED
        B, C, HQ, dqk = q.shape
        assert dqk == fam.DQK and HQ % G == 0, f"decode kernels were generated for G = {G}, DQK = {fam.DQK}"
        H = HQ // G
        assert len(cmp) == len(fam.CMP) and len(sel) == len(fam.SEL) and len(win) == len(fam.WIN)
        raw = [t for (k, v, _) in sel for t in (k, v)] + [t for pair in win for t in pair]
        rk, rv = raw[0::2], raw[1::2]
        rows = rk[0].shape[0] if rk else (cmp[0][0].shape[0] if cmp else B)   # sequences, or pages of the pool
        for t in rk + rv + [t for pair in cmp for t in pair]:
            assert t.stride(-1) == 1 and t.shape[0] == (rows if page else B) and t.shape[2] == H, \
                "cache buffers: [B, N, H, D] (paged: [pages, N, H, D]), unit last stride"
        assert not page or (table is not None and table.dtype == torch.int32 and table.shape[0] == B), \
            "paged: a block table [B, W] int32"
        assert all(t.stride() == rk[0].stride() for t in rk) and all(t.stride() == rv[0].stride() for t in rv), \
            "raw key (value) buffers must share one layout"
        self.fam, self.aux, self.shape, self.dtype, self.device = fam, bool(aux), (B, C, HQ), q.dtype, q.device
        self.q_strides, self.scale = q.stride(), scale
        self.empty = B * C == 0
        if self.empty:
            return
        dev = q.device
        cfg = self.cfg = fam._config(q, t_max, config)
        R, NS, SPLIT, BJ, ONEPASS = cfg["R"], cfg["NS"], cfg["SPLIT"], cfg["BJ"], cfg["ONEPASS"]
        BM = R * GP
        n_qt = cdiv(C, R)
        NK = fam._n_chunks(t_max, BJ)
        if SPLIT or ONEPASS:
            ws_m = torch.empty((NS, n_qt, B * H, NP, BM), dtype=torch.float32, device=dev)   # ONEPASS: lse2 scratch
            ws_acc = torch.empty((NS, n_qt, B * H, NP, BM, fam.BDV), dtype=torch.float32, device=dev) if SPLIT else ws_m
            ws_l = torch.empty_like(ws_m) if SPLIT else ws_m
            if FUSED:   # every chunk a token tile's last token sees is written by one slice
                ws_mu = torch.empty((n_qt, B * H, len(FUSED), NK, 2, BM), dtype=torch.float32, device=dev)
                ws_u = torch.empty((n_qt, B * H, len(FUSED), NK, BM, BJ), dtype=torch.float32, device=dev)
            else:
                ws_u = ws_mu = ws_m                           # unused
        else:
            ws_acc = ws_m = ws_l = ws_u = ws_mu = torch.empty(1, dtype=torch.float32, device=dev)   # unused
        self.dummy = torch.empty(1, dtype=torch.float32, device=dev)
        self.scratch = {id(t) for t in (ws_acc, ws_m, ws_l, ws_u, ws_mu, self.dummy)}   # the launch's own
        args = [None, None, None]                          # q, start, nq: per call
        for (k_c, v_c) in cmp:
            args += [k_c, v_c, k_c.stride(0), k_c.stride(1), k_c.stride(2), v_c.stride(0), v_c.stride(1), v_c.stride(2)]
        for s, (k, v, kbar) in zip(fam.SEL, sel):
            args += [k, v]
            if s.SCORE == "mean_pool":
                assert kbar is not None and kbar.dtype == torch.float32 and kbar.stride(-1) == 1
                args += [kbar, kbar.stride(0), kbar.stride(1), kbar.stride(2)]
        for (k, v) in win:
            args += [k, v]
        args += [ws_acc, ws_m, ws_l, ws_u, ws_mu, q.stride(0), q.stride(1), q.stride(2)]
        args += list(rk[0].stride()[:3]) + list(rv[0].stride()[:3]) if rk else [0] * 6
        if page:
            args += [table, table.stride(0), table.shape[1], rows]
        else:
            args += [self.dummy, 0, 0, 0]                 # no table: never read
        args += [C, H, NS, NK, scale * LOG2E]
        self.args = args
        # scratch of the select branches' union walk, per program's rows
        self.wsel = [torch.empty((n_qt * B * H, 2, R, s.TOPKP), dtype=torch.int32, device=dev) for s in fam.SEL]
        consts = dict(G=G, GP=GP, R=R, BM=BM, BJ=BJ, DQK=fam.DQK, DV=DV, BDK=fam.BDK, BDV=fam.BDV, NP=max(NP, 1),
                      LOWP=q.is_cuda, PAGE=page, num_stages=cfg["num_stages"], AUX=self.aux, BJM=cfg["BJM"], NJ=cfg["NJ"])
        # TAIL: the last slice of each program's rows to finish combines them (tickets count the slices)
        self.tickets = torch.zeros(n_qt * B * H, dtype=torch.int32, device=dev) if SPLIT and cfg["TAIL"] else None
        self.launches = []
        if SPLIT:   # (NP > 0: split-K has key ranges to divide)
            self.launches.append((fam.kernels.decode_split_kernel[(n_qt, B * H, NS)], True,
                                  dict(consts, BN=cfg["BN_split"], TAIL=cfg["TAIL"], num_warps=cfg["split_warps"])))
        if not (SPLIT and cfg["TAIL"]):
            self.launches.append((fam.kernels.decode_kernel[(n_qt, B * H)], False,
                                  dict(consts, SPLIT=SPLIT, ONEPASS=ONEPASS, BN=cfg["BN"], num_warps=cfg["num_warps"])))

    def tensors(self) -> list:
        """The cache's tensors the bound launches read (not their own workspaces), each once."""
        return [] if self.empty else _tensors(self.args, self.scratch)

    def __call__(self, q, start, nq, gates=None, out=None, bufs=None):
        """One call: o [B, C, HQ, DV] (into ``out`` when given) and, with aux, (idx, bo, blse).
        ``bufs``: tensors standing in for :meth:`tensors` (a traced custom op's functional copies)."""
        fam, aux = self.fam, self.aux
        B, C, HQ = self.shape
        o = out if out is not None else new_output((B, C, HQ, fam.DV), self.dtype, self.device)
        H = HQ // fam.G
        idx = [new_idx((B, C, H, s.TOPK), self.device) for s in fam.SEL] if aux else []
        bo = new_output((fam.NBR, B, C, HQ, fam.DV), self.dtype, self.device) if aux else o
        blse = new_output((fam.NBR, B, C, HQ), torch.float32, self.device) if aux else o
        if self.empty:
            return (o, idx, bo, blse) if aux else (o, None, None, None)
        args = self.args.copy() if bufs is None else _substitute(self.args, self.tensors(), bufs)
        args[0], args[1], args[2] = q, start, nq
        if fam.GATED:
            assert gates is not None and gates.shape == (B, C, HQ, fam.NG), f"gates must be [B, C, HQ, {fam.NG}]"
            tail = [o, gates if gates.is_contiguous() else gates.contiguous()]
        else:
            tail = [o]
        for i in range(len(fam.SEL)):   # chosen blocks, scratch for the union walk
            tail += [idx[i] if aux else self.dummy, self.wsel[i]]
        tail += [bo, blse, B]
        if self.tickets is not None:
            self.tickets.zero_()
        for kernel, split, kw in self.launches:
            if split:   # without TAIL no ticket is read: start stands in
                kernel(*args, *tail, self.tickets if self.tickets is not None else start, **kw)
            else:
                kernel(*args, *tail, **kw)
        return (o, idx, bo, blse) if aux else (o, None, None, None)


class AppendLaunch:
    """Appends of chunks of C tokens bound to a cache's buffers (:meth:`Decode.bind_append`):
    ``append_kernel`` writes the raw keys and values, takes pages (paged, ``alloc``), pools the
    mean-pool compressed blocks and the block means, and lists the candidate blocks of the
    learned-pool branches (``gather`` / ``dest`` by compress branch index: flat rows of their keys
    and entries) that the caller pools and scatters. No host sync."""

    BC = 16   # tokens per tile

    def __init__(self, fam: Decode, raw, cmp, means, *, C, state, table, page, alloc, shared):
        assert len(raw) == len(fam.CMP) + len(fam.SEL) + len(fam.WIN) and len(cmp) == len(fam.CMP)
        assert len(means) == sum(1 for s in fam.SEL if not s.score)
        lens, start_out, lens_out, err, cap = state
        dev = lens.device
        k0, v0 = raw[0]
        assert all(k.stride() == k0.stride() and v.stride() == v0.stride() for k, v in raw), \
            "raw key (value) buffers must share one layout"
        for k, v in raw:
            assert k.stride(-1) == 1 and k.stride(-2) == fam.DQK and v.stride(-1) == 1 and v.stride(-2) == fam.DV, \
                "raw buffers: (H, D) contiguous"
        self.fam, self.C, self.dev = fam, C, dev
        self.B = B = lens.shape[0]
        # learned pooling: at most MC blocks complete per sequence and chunk
        self.MC = max(1, max([cdiv(C, c.STRIDE) for c in fam.CMP if not c.MEAN] + [1]))
        self.gather, self.dest = {}, {}
        self.n_raw = len(raw)
        args = [None] * (4 * len(raw))                    # per branch: its new keys / values (per call), buffers
        for i, (k, v) in enumerate(raw):
            args[4 * i + 2], args[4 * i + 3] = k, v
        for ci, (c, (kf, vf)) in enumerate(zip(fam.CMP, cmp)):
            kc, vc = kf[:-1], vf[:-1]                      # [rows * entries, H, D] views; the last row is spare
            e = kc.shape[0] // (k0.shape[0] if page else B)
            args += [kc, vc, e * kc.stride(0), kc.stride(0), e * vc.stride(0), vc.stride(0)]
            if not c.MEAN:
                self.gather[ci] = torch.zeros((B * self.MC, c.L), dtype=torch.int64, device=dev)
                self.dest[ci] = torch.zeros(B * self.MC, dtype=torch.int64, device=dev)
                args += [self.gather[ci], self.dest[ci], kc.shape[0]]
        for kb in means:
            args += [kb, kb.stride(0), kb.stride(1)]
        update = start_out is not None
        dummy = torch.zeros(1, dtype=torch.int32, device=dev)
        args += [lens, None, start_out if update else dummy, lens_out if update else dummy, err, cap]
        self.I_NQ = len(args) - 5
        if page:
            free_pages, free_top = alloc if alloc is not None else (dummy, dummy)
            args += [table, table.stride(0), table.shape[1], k0.shape[0], free_pages, free_top]
        else:
            args += [dummy, 0, 0, 0, dummy, dummy]
        self.I_SRC = len(args)                            # then the new chunk's strides (per call)
        args += [None] * 4 + [k0.stride(0), k0.stride(1), v0.stride(0), v0.stride(1), C, k0.shape[2]]
        self.args = args
        self.n_full = torch.full((B,), C, dtype=torch.int32, device=dev)
        self.kernel = fam.kernels.append_kernel[(B,)]
        self.consts = dict(DQK=fam.DQK, DV=fam.DV, BDK=fam.BDK, BDV=fam.BDV, BC=self.BC, PAGE=page,
                           ALLOC=alloc is not None, BPG=next_pow2(cdiv(C, page) + 1) if page else 1,
                           SHARED=bool(shared), MC=self.MC, UPDATE=update, num_warps=4)

    def tensors(self) -> list:
        """Every tensor the bound append reads or writes besides a call's own (the cache's buffers,
        the candidates' rows), each once."""
        return _tensors(self.args, ())

    def __call__(self, k_new, v_new, nq=None, bufs=None) -> None:
        """Append the chunk: ``k_new`` / ``v_new`` [B, C, H, D] per raw buffer (lists, in the order
        bound; (H, D) contiguous; one pair when shared), ``nq`` [B] int32 tokens per sequence (None: C).
        ``bufs``: tensors standing in for :meth:`tensors` (a traced custom op's functional copies)."""
        args = self.args.copy() if bufs is None else _substitute(self.args, self.tensors(), bufs)
        for i, (k, v) in enumerate(zip(k_new, v_new)):
            args[4 * i], args[4 * i + 1] = k, v
        for i in range(len(k_new), self.n_raw):         # shared: one source for every branch
            args[4 * i], args[4 * i + 1] = k_new[0], v_new[0]
        args[self.I_NQ] = self.n_full if nq is None else nq
        k, v = k_new[0], v_new[0]
        args[self.I_SRC:self.I_SRC + 4] = [k.stride(0), k.stride(1), v.stride(0), v.stride(1)]
        self.kernel(*args, **self.consts)


def _tensors(args, skip) -> list:
    """The tensors of an argument list, each once, in order, except those whose id is in ``skip``."""
    seen = {}
    for t in args:
        if isinstance(t, torch.Tensor) and id(t) not in skip:
            seen.setdefault(id(t), t)
    return list(seen.values())


def _substitute(args: list, tensors: list, bufs: list) -> list:
    """``args`` with each of ``tensors`` replaced by its stand-in in ``bufs`` (same order)."""
    sub = {id(t): b for t, b in zip(tensors, bufs)}
    return [sub.get(id(a), a) if isinstance(a, torch.Tensor) else a for a in args]
