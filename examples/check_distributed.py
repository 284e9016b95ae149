"""Check that DDP and FSDP2 compute the gradients one process computes, for the tiny NSA model.

Launch with torchrun (any number of ranks that divides the batch):

    torchrun --nproc-per-node 2 examples/check_distributed.py --device cuda   # NCCL, Triton kernels
    torchrun --nproc-per-node 2 examples/check_distributed.py --device cpu    # gloo, nsa_dsl.reference

Every rank builds the model of ``train_tiny_lm.py`` (SparseAttention layers) from the same seed and
takes its share of one global batch of the retrieval task. The gradients of one backward pass are
computed three ways:

  ddp     DistributedDataParallel (gradients all-reduced, averaged over ranks),
  fsdp    FSDP2 ``fully_shard`` per block and on the whole model (sharded parameters,
          gradients reduce-scattered; gathered here with ``full_tensor()``),
  single  on rank 0, the same model without any wrapper on the whole global batch.

Every sequence has the same number of scored answers, so the mean of the ranks' mean losses is
the global mean and all three gradients are the same quantity. Rank 0 prints, per parameter, the
largest absolute difference and that difference relative to the largest magnitude of the single
gradient (``max|a - b| / max|b|``; element-wise ratios blow up on entries near zero), then one line
per comparison, ``ddp vs single: max rel diff X over N params: PASS`` (or FAIL, exit status 1).

Precision and tolerance: everything runs in float32 (no autocast). The results still differ in
the last bits, because a different batch per GEMM changes cuBLAS's summation order (and on the CPU
oneDNN's), DDP/FSDP sum two half-batch gradients where one process sums one batch, and some
backward kernels accumulate dK/dV with float32 atomics, whose order is not fixed; Triton's
``tl.dot`` on float32 runs TF32 (10-bit mantissa) by default. Such rounding noise is 1e-7 to 1e-4
relative; it can also flip a near-tie in the top-k block selection for a few queries, which moves
those queries' gradients by O(1) and the summed parameter gradients by about 1e-4 to 1e-3. A real
fault (a gradient not reduced, reduced twice, summed instead of averaged, a shard missing) is an
O(1) difference. Tolerance: 1e-2 on CUDA, 1e-3 on the CPU (``--tol`` overrides).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))          # train_tiny_lm beside this file
import train_tiny_lm as ex  # noqa: E402

import nsa_dsl  # noqa: E402  (train_tiny_lm put the repository root on sys.path if needed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--batch", type=int, default=None, help="global batch (default 16 on cuda, 4 on cpu)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--layers", type=int, default=ex.Config.layers)
    p.add_argument("--hidden", type=int, default=ex.Config.hidden)
    p.add_argument("--heads", type=int, default=ex.Config.heads)
    p.add_argument("--kv-heads", type=int, default=ex.Config.kv_heads)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=None,
                   help="largest max|a-b|/max|b| per parameter that passes (default 1e-2 cuda, 1e-3 cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="float32 (default), or bfloat16 autocast as train_tiny_lm.py trains on cuda "
                        "(gradients of bf16 GEMMs: default tolerance 3e-2)")
    p.add_argument("--modes", default="ddp,fsdp", help="comma-separated: ddp, fsdp")
    p.add_argument("--backend", choices=("nccl", "gloo"), default=None,
                   help="process group backend (default nccl on cuda, gloo on cpu); with fewer GPUs "
                        "than ranks, ranks share GPUs (rank %% GPUs), which NCCL refuses: use gloo "
                        "there (DDP; FSDP2 may need NCCL)")
    p.add_argument("--quiet", action="store_true", help="print only the summary lines")
    return p


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def compare(ref: dict, other: dict) -> list[tuple[str, float, float, float]]:
    """``[(name, max abs diff, max abs diff / max |ref|, ||diff|| / ||ref||)]`` per parameter."""
    rows = []
    for name, g in ref.items():
        o = other[name]
        diff = (o.double() - g.double()).abs()
        scale = g.double().abs().max().item()
        norm = g.double().norm().item()
        rows.append((name, diff.max().item(), diff.max().item() / scale if scale > 0 else
                     (0.0 if diff.max().item() == 0 else float("inf")),
                     diff.norm().item() / norm if norm > 0 else (0.0 if diff.max().item() == 0 else float("inf"))))
    return rows


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    import torch.distributed as dist
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("launch with torchrun: torchrun --nproc-per-node 2 examples/check_distributed.py")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    if args.device == "cuda":
        gpu = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(gpu)
        device = torch.device("cuda", gpu)
    else:
        torch.set_num_threads(1)                 # tiny tensors; ranks share the cores
        device = torch.device("cpu")
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    main_rank = rank == 0
    batch = args.batch or (16 if args.device == "cuda" else 4)
    if batch % world:
        raise SystemExit(f"--batch {batch} is not divisible by {world} ranks")
    if args.dtype == "bfloat16" and args.device != "cuda":
        raise SystemExit("--dtype bfloat16 is for --device cuda (autocast as in train_tiny_lm.py)")
    tol = args.tol if args.tol is not None else (
        3e-2 if args.dtype == "bfloat16" else 1e-2 if args.device == "cuda" else 1e-3)
    modes = [m for m in args.modes.split(",") if m]
    say = print if main_rank else (lambda *a, **k: None)

    spec = nsa_dsl.parse(ex.TINY_SPEC)
    cfg = ex.Config(seq_len=args.seq_len, layers=args.layers, hidden=args.hidden, heads=args.heads,
                    kv_heads=args.kv_heads, min_gap=ex.spec_gap(spec))
    tokens, targets = ex.make_batch(cfg, batch, torch.Generator().manual_seed(args.seed + 1))
    per = batch // world
    mine = slice(rank * per, (rank + 1) * per)

    def fresh():
        torch.manual_seed(args.seed)
        return ex.TinyLM(cfg, spec, "nsa").to(device)

    def loss_of(model, tok, tgt):
        with ex._autocast(device) if args.dtype == "bfloat16" else contextlib.nullcontext():
            logits = model(tok.to(device))
        loss, _, _ = ex.answer_loss(logits, tgt.to(device))
        return loss

    say(f"check_distributed: {world} ranks ({backend}, {device.type}), global batch "
        f"{batch} ({per} per rank), T={cfg.seq_len}, {cfg.layers} layers, hidden {cfg.hidden}, heads "
        f"{cfg.heads}/{cfg.kv_heads}, {args.dtype}, torch {torch.__version__}")
    grads, losses = {}, {}

    if "ddp" in modes:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = fresh()
        ddp = DDP(model, device_ids=[device.index] if args.device == "cuda" else None)
        loss = loss_of(ddp, tokens[mine], targets[mine])
        loss.backward()
        grads["ddp"] = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}
        t = loss.detach().reshape(1).double()
        dist.all_reduce(t)
        losses["ddp"] = t.item() / world
        del ddp, model

    if "fsdp" in modes:
        fully_shard = _fully_shard()
        model = fresh()
        for blk in model.blocks:
            fully_shard(blk)
        fully_shard(model)
        loss = loss_of(model, tokens[mine], targets[mine])
        loss.backward()
        g = {}
        for n, p in model.named_parameters():       # sharded DTensor gradients: gather (a collective)
            full = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            g[n] = full.detach().cpu().clone()
        grads["fsdp"] = g
        t = loss.detach().reshape(1).double()
        t = t.to_local() if hasattr(t, "to_local") else t
        dist.all_reduce(t)
        losses["fsdp"] = t.item() / world
        del model

    status = 0
    if main_rank:
        model = fresh()                              # no wrapper, the whole batch, one process
        loss = loss_of(model, tokens, targets)
        loss.backward()
        ref = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}
        say(f"single: loss {loss.item():.6f}; " + ", ".join(f"{m}: loss {losses[m]:.6f}" for m in losses))
        for m in modes:
            rows = compare(ref, grads[m])
            if not args.quiet:
                say(f"-- {m} vs single, per parameter: max|diff|, max|diff|/max|single|, ||diff||/||single||")
                for name, a, r, rn in rows:
                    say(f"   {name:42s} {a:10.3e} {r:10.3e} {rn:10.3e}")
            worst = max(rows, key=lambda row: row[2])
            ok = worst[2] <= tol and abs(losses[m] - loss.item()) <= tol * abs(loss.item())
            status |= 0 if ok else 1
            say(f"{m} vs single: max rel diff {worst[2]:.3e} over {len(rows)} params (worst {worst[0]}; "
                f"loss diff {abs(losses[m] - loss.item()):.2e}; tol {tol:g}): {'PASS' if ok else 'FAIL'}")
        if {"ddp", "fsdp"} <= set(modes):
            rows = compare(grads["ddp"], grads["fsdp"])
            worst = max(rows, key=lambda row: row[2])
            say(f"fsdp vs ddp: max rel diff {worst[2]:.3e} over {len(rows)} params (worst {worst[0]})")
        say(f"check_distributed: {'PASS' if status == 0 else 'FAIL'} in {time.perf_counter() - t_start:.1f} s")
    flag = torch.tensor([status], device=device)
    dist.broadcast(flag, 0)
    dist.barrier()
    dist.destroy_process_group()
    return int(flag.item())


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: after a clean destroy_process_group, gloo's worker threads
    # can still hold work objects whose destruction during finalization aborts the process
    # ("terminate called without an active exception": rank 1, once, in a CPU run of the tests)
    os._exit(code)
