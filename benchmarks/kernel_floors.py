"""Every kernel of one training step against its floor (GPU; `--check` runs the work model on a CPU).

    python benchmarks/kernel_floors.py [--spec FILE] [--length 65536] [--workload random] [--json OUT]
    python benchmarks/kernel_floors.py --tma        # compression and window kernels with config TMA pinned
    ncu --clock-control none -k regex:select_ --metrics ... python benchmarks/kernel_floors.py --ncu

Measures the card first: the dense bf16 matmul rate (torch.matmul, 8192 cubed), the HBM rate (a
copy of 2 GiB) and an L2 read rate (a sum over a 24 MiB buffer read 64 times through an expanded
view). Then profiles forward+backward steps of the op (torch.profiler, kernel time on the device,
averaged over the steps) and sets each generated kernel beside its floor in the current
algorithm, from the cost model's forward work of its branch (``nsa_dsl.tools.bench.branch_costs``):

- compression and window: FLOPs at the dense rate; the forward is 2 matmuls (QK, PV), the dq
  kernel 3 (QK, dO V, dS K), the dk/dv kernel 4 (QK, dO V, P dO, dS Q);
- scoring + top-k: its QK pass at the dense rate;
- selection forward and dq: the gathered K/V bytes at the L2 rate (keys are re-read by
  neighbouring positions: cache, not HBM);
- selection dk/dv: the gathered q and dO rows (top_k per position and kv head) at the HBM rate;
- combination: its tensors once (forward: C branch outputs and the gates in, the output out;
  backward, gates folded into the branches: dO, C outputs, the gates and C lse in, the gates'
  gradient and C folded lse and delta out) at the HBM rate.

Kernels outside the model (torch's sorts, casts, fills) are listed with their time and no floor.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import nsa_dsl  # noqa: E402
from nsa_dsl.tools.bench import _bench, branch_costs, make_inputs  # noqa: E402

# kernel name pattern -> (branch kind, multiple of the branch's forward work, bound)
MODEL = [
    (r"^compress_fwd", "compress", 1.0, "dense"),
    (r"^compress_bwd_dq", "compress", 1.5, "dense"),
    (r"^compress_bwd_dkdv", "compress", 2.0, "dense"),
    (r"^topk_", "topk", 1.0, "dense"),
    (r"^select_fwd", "select", 1.0, "l2"),
    (r"^select_bwd_dq", "select", 1.0, "l2"),
    (r"^select_bwd_dkdv", "select_qdo", 1.0, "hbm"),
    (r"^window_fwd", "window", 1.0, "dense"),
    (r"^window_bwd_dq", "window", 1.5, "dense"),
    (r"^window_bwd_dkdv", "window", 2.0, "dense"),
    (r"^combine_fwd", "combine_fwd", 1.0, "hbm"),
    (r"^combine_bwd", "combine_bwd", 1.0, "hbm"),
]


def work(spec, T: int, HQ: int, H: int, D: int, B: int = 1) -> dict[str, float]:
    """Forward work per model key: FLOPs for the dense-bound kernels, bytes for the rest."""
    c = branch_costs(spec, T, B=B, HQ=HQ, H=H, Dqk=D, Dv=D)
    w = {}
    for key, (flops, nbytes) in c.items():
        kind = key.rsplit("_", 1)[1]
        w[kind] = nbytes if kind == "select" else flops
    for b in spec.of_kind("select"):
        w["select_qdo"] = 2.0 * B * T * HQ * 2 * D * b.top_k      # q and dO rows, bf16
    C = len(spec.output.branches) if spec.output.kind == "gate" else 0
    row = 2.0 * B * T * HQ * D
    w["combine_fwd"] = (C + 1) * row + 2.0 * B * T * HQ * C
    w["combine_bwd"] = (C + 1) * row + (4.0 + 12.0) * B * T * HQ * C   # + lse in, lse' and delta out (fp32)
    return w


def rates() -> dict[str, float]:
    """The card's dense bf16 matmul rate (FLOP/s) and HBM and L2 read rates (bytes/s)."""
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dense = 2.0 * n ** 3 / (_bench(lambda: a @ b) * 1e-3)
    del a, b
    x = torch.empty(1 << 30, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    hbm = 2.0 * x.nbytes / (_bench(lambda: y.copy_(x)) * 1e-3)
    del x, y
    s = torch.randn(12 << 20, device="cuda", dtype=torch.bfloat16)
    rep = s.unsqueeze(0).expand(64, -1)
    l2 = 64.0 * s.nbytes / (_bench(lambda: rep.sum(dtype=torch.float32)) * 1e-3)
    return {"dense": dense, "hbm": hbm, "l2": l2}


def profile(op, inputs, do, steps: int = 3) -> dict[str, float]:
    """Device milliseconds per kernel name, averaged over ``steps`` forward+backward steps."""
    leaves = [x for x in inputs if x is not None]

    def step():
        torch.autograd.grad(op(*inputs), leaves, do)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    ms = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            ms[e.name] += e.device_time / 1e3 / steps
    return dict(ms)


# the kernel kinds that take config TMA, per family
TMA_KINDS = {"compress": ("fwd", "dq", "dkdv"), "window": ("fwd", "fwd_combine", "dq", "dkdv")}


def pin_tma(op, HQ: int, H: int, D: int, on: bool = True) -> list[str]:
    """Pin config TMA on the compression and window kernels of ``op`` at these shapes (over each
    family's heuristic, as a tuned config would be), or with ``on=False`` take the pins off;
    returns the kernel names."""
    from nsa_dsl.runtime import kernel_ops
    keys = op._kernels(op.binding(heads=HQ, kv_heads=H, qk_dim=D, v_dim=D))[1]
    names = [n for n in keys if n.split("_")[0] in TMA_KINDS]
    for n in names:
        mod = kernel_ops.module(keys[n])
        mod.__dict__.pop("_heuristic", None)
        if on:
            kinds, heuristic = TMA_KINDS[n.split("_")[0]], mod._heuristic
            mod._heuristic = lambda kind, gpu, T, h=heuristic, kinds=kinds: \
                {**h(kind, gpu, T), **({"TMA": True} if kind in kinds else {})}
    return names


def table(ms: dict[str, float], w: dict[str, float], r: dict[str, float]) -> list[dict]:
    rows = []
    for name, t in sorted(ms.items(), key=lambda kv: -kv[1]):
        row = {"kernel": name, "ms": t}
        for pat, key, mult, bound in MODEL:
            if re.match(pat, name) and key in w:
                row.update(work=mult * w[key], bound=bound, floor_ms=mult * w[key] / r[bound] * 1e3)
                row["ratio"] = t / row["floor_ms"]
                break
        rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default=str(ROOT / "examples" / "nsa_paper_mean.nsa"))
    p.add_argument("--length", type=int, default=65536)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--workload", default="random")
    p.add_argument("--ncu", action="store_true", help="two training steps and nothing else (to run under ncu)")
    p.add_argument("--tma", action="store_true",
                   help="pin config TMA on the compression kernels (fwd / dq: K/V tiles, dkdv: q / dO tiles) "
                        "and the window's (fwd / dq: K/V tiles, dkdv: q / dO tiles)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--check", action="store_true", help="print the work model only (no GPU)")
    args = p.parse_args()
    spec = nsa_dsl.load(args.spec)
    T, HQ, H, D = args.length, args.heads, args.kv_heads, args.dim
    w = work(spec, T, HQ, H, D)
    if args.check:
        print(json.dumps(w, indent=1))
        return 0
    import triton
    r = None if args.ncu else rates()
    op = nsa_dsl.compile(spec)
    C = len(spec.output.branches) if spec.output.kind == "gate" else 0
    q, k, v, gates = make_inputs(args.workload, B=1, T=T, HQ=HQ, H=H, Dqk=D, Dv=D, gates=C, seed=T)
    for x in (q, k, v, gates):
        if x is not None:
            x.requires_grad_()
    do = torch.randn_like(q)
    if args.tma:
        pin_tma(op, HQ, H, D)
    if args.ncu:
        for _ in range(2):
            torch.autograd.grad(op(q, k, v, gates), (q, k, v, gates), do)
        torch.cuda.synchronize()
        return 0
    rows = table(profile(op, (q, k, v, gates), do), w, r)
    total = sum(x["ms"] for x in rows)
    floor = sum(x.get("floor_ms", 0.0) for x in rows)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"{spec.name}, T={T}, HQ={HQ}, H={H}, D={D}, bf16, {args.workload}{', compression and window TMA' if args.tma else ''}; "
          f"dense {r['dense'] / 1e12:.0f} "
          f"TFLOP/s, HBM {r['hbm'] / 1e12:.2f} TB/s, L2 {r['l2'] / 1e12:.2f} TB/s")
    print("| kernel | ms | work | bound | floor ms | ratio |\n|---|---|---|---|---|---|")
    for x in rows:
        if "floor_ms" in x:
            unit = "FLOP" if x["bound"] == "dense" else "B"
            print(f"| {x['kernel']} | {x['ms']:.2f} | {x['work']:.3g} {unit} | {x['bound']} | "
                  f"{x['floor_ms']:.2f} | {x['ratio']:.2f} |")
        elif x["ms"] >= 0.01:
            print(f"| {x['kernel'][:60]} | {x['ms']:.2f} | | | | |")
    print(f"| all kernels | {total:.2f} | | | {floor:.2f} (modelled ones) | |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rates": r, "rows": rows, "T": T, "HQ": HQ, "H": H, "tma": args.tma,
                                               "D": D, "gpu": torch.cuda.get_device_name()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
