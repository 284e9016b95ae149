"""Every training kernel of the paper pattern, at its GPU heuristic config, compiles for sm_90
(H100 / H200) through ptxas on a machine without a GPU: within 227 KiB of shared memory and
without register spills beyond a few bytes (the 64-row dkdv tiles once held 255 registers and
spilled; the top-k's 168-register cap leaves 16 bytes); the selection's and the compression's
fwd / dq with TMA loads;
the combination's backward with the gates folded into the branches and without."""
import pytest
import torch

from kernel_utils import run_sm90_check

_CHECK = r"""
from nsa_dsl.codegen import launch
from nsa_dsl.codegen.loader import load_module
from nsa_dsl.codegen.plan import select_vars, tile_vars, topk_vars
from nsa_dsl.codegen.render import render
from nsa_dsl.codegen.sm90 import compile_kernel, ptxas_usage, signature, spill_bytes

T = 65536
G, D, L, S, LS, K, W = 16, 128, 32, 16, 64, 16, 512
BF16 = {n: "*bf16" for n in ("q", "k", "v", "o", "do", "dq")}
I32 = {n: "*i32" for n in ("idx", "blk", "pos", "list_off", "item_list", "item_chunk")}
F32 = {n: "*fp32" for n in ("lse", "delta")}

cvars = dict(tile_vars(G, D, D), L=L, STRIDE=S)
cm = launch.launchers("compress", cvars, load_module(render("compress.py.j2", **cvars), "sm90_compress"))
cvars_nc = dict(cvars, CAUSAL=False)      # causal = false: every block, every query
cm_nc = launch.launchers("compress", cvars_nc, load_module(render("compress.py.j2", **cvars_nc), "sm90_compress_nc"))
def topk_family(G, name):
    tvars = dict(tile_vars(G, D, D), L=L, STRIDE=S, LS=LS, TOPK=K, KEEP_FIRST=1, KEEP_LAST=2, SCORE="cmp",
                 **topk_vars(L, S, LS, K, "cmp"))
    return launch.launchers("topk", tvars, load_module(render("topk.py.j2", **tvars), name))

tk = topk_family(G, "sm90_topk")
svars = dict(tile_vars(G, D, D), LS=LS, TOPK=K, **select_vars(LS, K))
sm = launch.launchers("select", svars, load_module(render("select.py.j2", **svars), "sm90_select"))
wvars = dict(tile_vars(G, D, D), W=W, SINKS=0)
wm = launch.launchers("window", wvars, load_module(render("window.py.j2", **wvars), "sm90_window"))
def window_family(name, **changes):
    v = dict(wvars, **changes)
    return launch.launchers("window", v, load_module(render("window.py.j2", **v), name))

wm_nc = window_family("sm90_window_nc", CAUSAL=False)      # causal = false: the both-sided band
# with sinks (both sides of the band): their own kernel (the dkdv kernel with sinks spills ~136
# bytes at 255 registers, causal or not, as it did before causal = false existed)
wm_ncs = window_family("sm90_window_ncs", CAUSAL=False, SINKS=4)

def run(name, fn, cfg, consts, pointers, spills=64):
    opts = {k: cfg[k] for k in ("num_warps", "num_stages", "maxnreg") if cfg.get(k) is not None}
    kernel = compile_kernel(fn, consts, signature(fn, consts, pointers), **opts)
    if consts.get("TMA"):     # the descriptor loads are TMA copies
        assert "cp.async.bulk.tensor" in kernel.asm["ptx"], name
    usage = ptxas_usage(kernel)
    print(name, cfg, "shared", kernel.metadata.shared, usage)
    assert kernel.metadata.shared <= 232448, (name, kernel.metadata.shared)
    assert spill_bytes(usage) <= spills, (name, usage)

for tag, mod in (("", cm), (" not causal", cm_nc)):
    for tma in (False, True):
        for kind, fn in (("fwd", mod.kernels.compress_fwd_kernel), ("dq", mod.kernels.compress_bwd_dq_kernel),
                         ("dkdv", mod.kernels.compress_bwd_dkdv_kernel)):
            cfg = mod._heuristic(kind, True, T)
            consts = dict(G=G, GP=G, L=L, STRIDE=S, DQK=D, DV=D, BDK=D, BDV=D, R=cfg["R"], BM=G * cfg["R"],
                          BN=cfg["BN"], ACC=True, TMA=tma)   # ACC, dq: added to the other branches' (the op's fused backward)
            # TMA: the streamed tiles by descriptor, fwd / dq K/V boxes, dkdv q / dO boxes
            kv = "tensordesc<bf16[1,%d,1,%d]>" % (cfg["BN"], D) if tma else "*bf16"
            qd = "tensordesc<bf16[1,%d,%d,%d]>" % (cfg["R"], G, D) if tma else "*bf16"
            run("compress " + kind + tag, fn, dict(cfg, TMA=tma), consts,
                {**BF16, **F32, "dk": "*fp32", "dv": "*fp32", "k_desc": kv, "v_desc": kv, "q_desc": qd, "do_desc": qd})

cfg = tk._heuristic("topk", True, T)
consts = dict(G=G, GP=G, DQK=D, BDK=D, L=L, STRIDE=S, A=tk.A, C=tk.C, LS=LS, TOPK=K, TOPKP=K, KEEP_FIRST=1,
              KEEP_LAST=2, **tk.SORT_KEYS, NI=cfg.get("NI", 0), R=cfg["R"], BM=G * cfg["R"], BN=cfg["BN"],
              BJ=cfg["BJ"], LOWP=True)
run("topk", tk.kernels.topk_cmp_kernel, cfg, consts, {**BF16, **F32, **I32})
tk8 = topk_family(8, "sm90_topk_g8")
cfg = tk8._heuristic("topk", True, T)      # GQA group of 8: 64-row tiles, at most 168 registers
assert cfg["R"] * 8 == 64 and cfg["maxnreg"] == 168, cfg
consts.update(G=8, GP=8, R=cfg["R"], BM=8 * cfg["R"], BN=cfg["BN"], BJ=cfg["BJ"], NI=cfg.get("NI", 0))
run("topk G8", tk8.kernels.topk_cmp_kernel, cfg, consts, {**BF16, **F32, **I32})

for kind, fn in (("fwd", sm.kernels.select_fwd_kernel), ("dq", sm.kernels.select_bwd_dq_kernel),
                 ("dkdv", sm.kernels.select_bwd_dkdv_kernel)):
    cfg = sm._heuristic(kind, True, T)
    consts = dict(G=G, GP=G, LS=LS, BN=cfg["BN"], DQK=D, DV=D, BDK=D, BDV=D, ACC=True, TMA=cfg.get("TMA", False))
    assert consts["TMA"] == (kind != "dkdv"), cfg     # fwd / dq read K/V tiles by TMA
    desc = "tensordesc<bf16[1,%d,1,%d]>" % (cfg["BN"], D)
    if kind == "dkdv":
        consts.update(RQ=cfg["RQ"])
    else:   # one position per program: its own TOPK blocks
        consts.update(R=cfg["R"], TOPK=K, TOPKP=K, RK=K * cfg["R"], RKP=K * cfg["R"], NT=LS // cfg["BN"])
    run("select " + kind, fn, cfg, consts, {**BF16, **F32, **I32, "dk": "*fp32", "dv": "*fp32",
                                            "k_desc": desc, "v_desc": desc})

# the second release's top-k and selection: query_block = 64 (a group's 64 positions share their
# blocks: dense selection tiles; the top-k scores a group in sub-tiles) and causal = false
for QB, causal in ((64, True), (1, False)):
    tag = f" QB{QB}" if QB > 1 else " not causal"
    tvars = dict(tile_vars(G, D, D), L=L, STRIDE=S, LS=LS, TOPK=K, KEEP_FIRST=1, KEEP_LAST=2, SCORE="cmp",
                 CAUSAL=causal, QB=QB, **topk_vars(L, S, LS, K, "cmp"))
    tq = launch.launchers("topk", tvars, load_module(render("topk.py.j2", **tvars), "sm90_topk" + tag.replace(" ", "_")))
    cfg = tq._heuristic("topk", True, T)
    consts = dict(G=G, GP=G, DQK=D, BDK=D, L=L, STRIDE=S, A=tq.A, C=tq.C, LS=LS, TOPK=K, TOPKP=K, KEEP_FIRST=1,
                  KEEP_LAST=2, **tq.SORT_KEYS, NI=cfg.get("NI", 0), R=cfg["R"], BM=G * cfg["R"], BN=cfg["BN"],
                  BJ=cfg["BJ"], LOWP=True, **tq._groups(cfg["R"])[0])
    run("topk" + tag, tq.kernels.topk_cmp_kernel, cfg, consts, {**BF16, **F32, **I32})
    if QB > 1:   # mean_pool: one row per group (q summed over the group by the launcher, fp32)
        mvars = dict(tile_vars(G, D, D), LS=LS, TOPK=K, KEEP_FIRST=1, KEEP_LAST=2, SCORE="mean_pool", QB=QB,
                     **topk_vars(LS, LS, LS, K, "mean_pool"))
        tm = launch.launchers("topk", mvars, load_module(render("topk.py.j2", **mvars), "sm90_topk_mp" + tag.replace(" ", "_")))
        cfg = tm._heuristic("topk", True, T)
        consts = dict(G=G, GP=G, DQK=D, BDK=D, LS=LS, TOPK=K, TOPKP=K, KEEP_FIRST=1, KEEP_LAST=2, **tm.SORT_KEYS,
                      NI=0, R=cfg["R"], BM=tm._rows(cfg["R"]), BN=cfg["BN"], BJ=cfg["BJ"], PREC=cfg["dot"], QB=QB)
        run("topk mean_pool" + tag, tm.kernels.topk_mean_pool_kernel, cfg, consts,
            {**BF16, **F32, **I32, "q": "*fp32", "kbar": "*fp32"})
    svars = dict(tile_vars(G, D, D), LS=LS, TOPK=K, CAUSAL=causal, QB=QB, **select_vars(LS, K))
    sq = launch.launchers("select", svars, load_module(render("select.py.j2", **svars), "sm90_select" + tag.replace(" ", "_")))
    for kind, fn in (("fwd", sq.kernels.select_fwd_kernel), ("dq", sq.kernels.select_bwd_dq_kernel),
                     ("dkdv", sq.kernels.select_bwd_dkdv_kernel))[:3 if QB == 1 else 2]:   # QB: dkdv as QB = 1
        cfg = sq._heuristic(kind, True, T)
        consts = dict(G=G, GP=G, LS=LS, BN=cfg["BN"], DQK=D, DV=D, BDK=D, BDV=D, ACC=True, TMA=cfg.get("TMA", False))
        desc = "tensordesc<bf16[1,%d,1,%d]>" % (cfg["BN"], D)
        if kind == "dkdv":
            consts.update(RQ=cfg["RQ"])
        else:     # QB: the union of the tile's rows' blocks is found in the kernel (no block lists)
            consts.update(R=cfg["R"], TOPK=K, TOPKP=K, NT=LS // cfg["BN"],
                          **(dict(RK=K * cfg["R"], RKP=K * cfg["R"]) if QB == 1 else {}))
        run("select" + tag + " " + kind, fn, cfg, consts, {**BF16, **F32, **I32, "dk": "*fp32", "dv": "*fp32",
                                                         "k_desc": desc, "v_desc": desc})

for tma in (False, True):
    for kind, fn in (("fwd", wm.kernels.window_fwd_kernel), ("dq", wm.kernels.window_bwd_dq_kernel),
                     ("dkdv", wm.kernels.window_bwd_dkdv_kernel)):
        cfg = wm._heuristic(kind, True, T)
        consts = dict(G=G, GP=G, R=cfg["R"], BN=cfg["BN"], W=W, DQK=D, DV=D, BDK=D, BDV=D, ACC=True, TMA=tma)
        # TMA: fwd / dq K/V tiles, dkdv q / dO tiles by descriptor
        kv = "tensordesc<bf16[1,%d,1,%d]>" % (cfg["BN"], D) if tma else "*bf16"
        qd = "tensordesc<bf16[1,%d,%d,%d]>" % (cfg["R"], G, D) if tma else "*bf16"
        run("window " + kind, fn, dict(cfg, TMA=tma), consts, {**BF16, **F32, "dk": "*bf16", "dv": "*bf16",
                                                                "k_desc": kv, "v_desc": kv, "q_desc": qd, "do_desc": qd})
for name, kind, fn in (("fwd", "fwd", wm_nc.kernels.window_fwd_kernel), ("dq", "dq", wm_nc.kernels.window_bwd_dq_kernel),
                       ("dkdv", "dkdv", wm_nc.kernels.window_bwd_dkdv_kernel),
                       ("sinks fwd", "fwd", wm_ncs.kernels.window_fwd_kernel),
                       ("sinks dq", "dq", wm_ncs.kernels.window_bwd_dq_kernel),
                       ("sink", "dkdv", wm_ncs.kernels.window_bwd_sink_kernel)):
    cfg = wm_nc._heuristic(kind, True, T)
    consts = dict(G=G, GP=G, R=cfg["R"], BN=cfg["BN"], W=W, SINKS=4, DQK=D, DV=D, BDK=D, BDV=D, ACC=True, TMA=False)
    run("window not causal " + name, fn, cfg, consts, {**BF16, **F32, "dk": "*bf16", "dv": "*bf16",
                                                       **{n: "*fp32" for n in ("dk_part", "dv_part")},
                                                       **{n: "*bf16" for n in ("k_desc", "v_desc", "q_desc", "do_desc")}})
cfg = wm._heuristic("fwd_combine", True, T)   # the output's combination in the window kernel (inference)
consts = dict(G=G, GP=G, R=cfg["R"], BN=cfg["BN"], W=W, DQK=D, DV=D, BDK=D, BDV=D, C=3, WPOS=2, GATED=True, TMA=False)
# capped at 128 registers by its heuristic (two programs per SM, measured faster with ~330 bytes
# of spills than one program per SM at 182 registers without)
run("window fwd_combine", wm.kernels.window_fwd_combine_kernel, cfg, consts,
    {**BF16, **{n: "*bf16" for n in ("out", "o_x0", "o_x1", "o_x2", "gates", "k_desc", "v_desc")}}, spills=512)
xvars = dict(C=3, DV=D, BDV=D, GATED=True)   # the combination's backward, gates folded or not
xm = launch.launchers("combine", xvars, load_module(render("combine.py.j2", **xvars), "sm90_combine"))
for fold in (True, False):
    run(f"combine bwd fold={fold}", xm.kernels.combine_bwd_kernel, dict(num_warps=4),
        dict(DV=D, BDV=D, BR=xm.BR, FOLD=fold), {**{f"{n}{c}": t for c in range(3) for n, t in
                                                    (("o", "*bf16"), ("do", "*bf16"), ("lse", "*fp32"))},
                                                 "gates": "*bf16", "dgates": "*bf16", "do": "*bf16",
                                                 "delta": "*fp32", "lse_fold": "*fp32"}, spills=0)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on the device the kernels run for real")
def test_training_kernels_compile_for_sm90(tmp_path):
    run_sm90_check(_CHECK, [], tmp_path)
