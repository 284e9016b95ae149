"""How fast fp32 tiles can be added into a buffer that stays in L2, and into one that does not (GPU;
`--check` compiles the kernels for sm_90 on a CPU).

    python benchmarks/reduce_add.py [--json OUT]
    python benchmarks/reduce_add.py --check

The question behind two levers (benchmarks/RESULTS.md): a compression backward that forms dq in
its dk/dv kernel, and a selection dq with key blocks outside and positions inside, both add
[rows, D] fp32 tiles of dq from many programs into one buffer. They pay only if those adds run
near the rate the kernels' matmuls need (about 2.5 * BN FLOP per byte added at a key tile of BN:
4.4 TB/s at BN = 64 and 700 TFLOP/s). Each program here adds its [BM, D] tile ``REPS`` times
into rows chosen round-robin over the buffer, as many programs as the card holds:

- ``atomic``: ``tl.atomic_add`` of the tile (relaxed: no fence per add);
- ``tma``: the tensor descriptor's ``atomic_add`` (the TMA unit's reduce-add, one instruction
  per tile), where this triton has it;
- ``store``: a plain store of the same tiles, the write ceiling beside them.

Buffers: 16 MiB (L2-resident on H100 / H200: 50 / 60 MB of L2) and 2 GiB. Prints TB/s of fp32
added (bytes of the added tiles over the kernel time) per mode and buffer, card and versions.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

D, BM, REPS = 128, 64, 16
HAS_TMA_ADD = hasattr(tl.tensor_descriptor, "atomic_add")


@triton.jit
def add_tiles(buf, N_TILES, BM: tl.constexpr, D: tl.constexpr, REPS: tl.constexpr, ATOMIC: tl.constexpr):
    pid, n = tl.program_id(0), tl.num_programs(0)
    o = tl.arange(0, BM)[:, None] * D + tl.arange(0, D)[None, :]
    x = (o % 7).to(tl.float32)
    for r in range(REPS):
        p = buf + ((pid + r * n) % N_TILES).to(tl.int64) * (BM * D) + o
        if ATOMIC:
            tl.atomic_add(p, x, sem="relaxed")
        else:
            tl.store(p, x)


@triton.jit
def add_tma(buf, N_TILES, BM: tl.constexpr, D: tl.constexpr, REPS: tl.constexpr):
    pid, n = tl.program_id(0), tl.num_programs(0)
    desc = tl.make_tensor_descriptor(buf, shape=[N_TILES * BM, D], strides=[D, 1], block_shape=[BM, D])
    o = tl.arange(0, BM)[:, None] * D + tl.arange(0, D)[None, :]
    x = (o % 7).to(tl.float32)
    for r in range(REPS):
        tile = (pid + r * n) % N_TILES
        desc.atomic_add([tile * BM, 0], x)


# mode -> (kernel, its mode constexprs)
KERNELS = {"atomic": (add_tiles, {"ATOMIC": True}), "store": (add_tiles, {"ATOMIC": False}),
           **({"tma": (add_tma, {})} if HAS_TMA_ADD else {})}


def check() -> int:
    """Compile every kernel for sm_90 (no GPU needed)."""
    from nsa_dsl.codegen.sm90 import compile_kernel, ptxas_usage
    for name, (fn, mode) in KERNELS.items():
        consts = dict(BM=BM, D=D, REPS=REPS, **mode)
        k = compile_kernel(fn, consts, {"buf": "*fp32", "N_TILES": "i32", **{c: "constexpr" for c in consts}},
                           num_warps=4)
        print(name, ptxas_usage(k), "TMA reduce" if "cp.reduce.async.bulk.tensor" in k.asm["ptx"] else "")
    if not HAS_TMA_ADD:
        print(f"triton {triton.__version__}: tensor descriptors have no atomic_add; tma left out")
    print("compiled")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--check", action="store_true", help="compile for sm_90 only (no GPU)")
    args = p.parse_args()
    if args.check:
        return check()
    from nsa_dsl.tools.bench import _bench
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for mib in (16, 2048):
        buf = torch.zeros(mib << 18, device="cuda", dtype=torch.float32)     # mib MiB of fp32
        n_tiles = buf.numel() // (BM * D)
        grid = (4 * sms,)
        for name, (fn, mode) in KERNELS.items():
            ms = _bench(lambda: fn[grid](buf, n_tiles, BM=BM, D=D, REPS=REPS, num_warps=4, **mode))
            tbs = grid[0] * REPS * BM * D * 4 / (ms * 1e-3) / 1e12
            rows.append(dict(mode=name, buffer_mib=mib, ms=ms, tb_s=tbs))
        del buf
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"[{BM}, {D}] fp32 tiles, {REPS} per program, {4 * sms} programs")
    print("| mode | buffer | ms | TB/s added |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['buffer_mib']} MiB | {r['ms']:.3f} | {r['tb_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
