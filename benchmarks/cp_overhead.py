"""Context parallelism on GPUs: the CP path of the compiled op against the plain op, and the
peak memory against ``explain --cp``'s accounting (nsa_dsl.tools.explain.cp_cost).

    python benchmarks/cp_overhead.py                         # one GPU: a group of one (NCCL)
    python benchmarks/cp_overhead.py --lengths 8k,64k --spec examples/nsa_paper_mean.nsa
    torchrun --nproc-per-node N benchmarks/cp_overhead.py    # N GPUs (needs the kernels' q_start)

One GPU: ``op(q, k, v, gates, cp_group=group)`` over a group of one runs what N ranks run (the
functional all-gather of K and V, a copy here, with the reduce-scatter in the backward; local
mean pooling; the plan of calls; here one call over the whole sequence) and must equal the plain
op; the overhead is its time over the plain op's, forward and forward+backward, medians of the
same inputs in the same process. N GPUs: each rank's time on its shard (the slowest rank's
median), the plain op's time on one GPU over the whole sequence, and the bytes each rank moved.

Prints a markdown table (card, torch and triton in its header); ``--json FILE`` writes the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nsa_dsl  # noqa: E402
from nsa_dsl.language.cost import Dims  # noqa: E402
from nsa_dsl.runtime import context_parallel as cp  # noqa: E402
from nsa_dsl.tools.bench import _bench, _peak_gib  # noqa: E402
from nsa_dsl.tools.explain import cp_cost  # noqa: E402

GIB = float(1 << 30)


def _size(text: str) -> int:
    t = text.strip().lower()
    return int(t[:-1]) * {"k": 1024, "m": 1 << 20}[t[-1]] if t[-1] in "km" else int(t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default=str(Path(__file__).resolve().parents[1] / "examples" / "nsa_paper_mean.nsa"))
    p.add_argument("--lengths", default="8k,16k,32k,64k")
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()

    if "RANK" not in os.environ:                      # one process: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    group, world, rank = cp.process_group(dist.group.WORLD)
    dtype = getattr(torch, args.dtype)
    spec = nsa_dsl.load(args.spec)
    op = nsa_dsl.compile(spec)
    HQ, H, D = args.heads, args.kv_heads, args.dim
    C = len(spec.output.branches)
    dims = Dims(HQ, H, D, D, torch.finfo(dtype).bits // 8)
    rows = []
    for T in (_size(x) for x in args.lengths.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        whole = [torch.randn(1, T, h, d, device="cuda", dtype=dtype, generator=g)
                 for h, d in ((HQ, D), (H, D), (H, D), (HQ, C))]
        do = torch.randn(1, T, HQ, D, device="cuda", dtype=dtype, generator=g)
        mine = [cp.shard_sequence(x, group).contiguous().requires_grad_() for x in whole]
        do_mine = cp.shard_sequence(do, group).contiguous()
        for x in whole:
            x.requires_grad_()

        def plain_fwd():
            with torch.no_grad():
                return op(*whole)

        def plain_step():
            torch.autograd.grad(op(*whole), whole, do)

        def cp_fwd():
            with torch.no_grad():
                return op(*mine, cp_group=group)

        def cp_step():
            torch.autograd.grad(op(*mine, cp_group=group), mine, do_mine)

        row = {"T": T, "ranks": world, "dtype": args.dtype, "HQ": HQ, "H": H, "D": D}
        if world == 1:                                # the CP path equals the plain op
            row["max_abs_diff"] = float((cp_fwd() - plain_fwd()).abs().max())
        cp.STATS.reset()
        cp_step()
        row["gathered_bytes"], row["scattered_bytes"] = cp.STATS.gathered, cp.STATS.scattered
        for name, fn in (("cp_fwd_ms", cp_fwd), ("cp_fwdbwd_ms", cp_step)):
            t = torch.tensor([_bench(fn)], device="cuda")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)          # the slowest rank sets the step
            row[name] = float(t)
        row["cp_fwdbwd_peak_gib"] = _peak_gib(cp_step) + sum(x.nbytes for x in mine) / GIB
        row["accounted_peak_gib"] = cp_cost(spec, T, world, dims).peak / GIB
        if rank == 0:
            row["plain_fwd_ms"], row["plain_fwdbwd_ms"] = _bench(plain_fwd), _bench(plain_step)
            row["overhead_fwd"] = row["cp_fwd_ms"] / row["plain_fwd_ms"] - 1
            row["overhead_fwdbwd"] = row["cp_fwdbwd_ms"] / row["plain_fwdbwd_ms"] - 1
            rows.append(row)
        del whole, mine, do, do_mine
        torch.cuda.empty_cache()
        dist.barrier()
    if rank == 0:
        import triton
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
              f"{spec.name}, HQ={HQ}, H={H}, D={D}, {args.dtype}, B=1, {world} rank(s)")
        print("| T | ranks | plain fwd | cp fwd | overhead | plain fwd+bwd | cp fwd+bwd | overhead | "
              "cp peak GiB (incl. inputs) | accounted GiB | K/V gathered MiB/rank | max diff |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['T']} | {r['ranks']} | {r['plain_fwd_ms']:.2f} | {r['cp_fwd_ms']:.2f} | "
                  f"{100 * r['overhead_fwd']:+.1f}% | {r['plain_fwdbwd_ms']:.2f} | {r['cp_fwdbwd_ms']:.2f} | "
                  f"{100 * r['overhead_fwdbwd']:+.1f}% | {r['cp_fwdbwd_peak_gib']:.2f} | {r['accounted_peak_gib']:.2f} | "
                  f"{r['gathered_bytes'] / (1 << 20):.1f} | {r.get('max_abs_diff', '')} |")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
