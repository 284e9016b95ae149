"""Compile a generated kernel for sm_90 (H100 / H200) on a machine without a GPU.

Triton's interpreter accepts code the GPU compiler refuses and knows no shared-memory limit; this
runs the real compiler and ptxas instead (the CUDA backend ships both), for the tests and for
`benchmarks/decode_phases.py --check`. Run it in a process without ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import tempfile
from pathlib import Path


def decode_signature(fn, consts: dict) -> dict:
    """Triton argument types of a decode kernel (templates/decode.py.j2) with bf16 tensors."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("start", "nq", "tickets", "tbl", "lens", "start_out", "lens_out", "err", "free_pages",
                      "free_top") or name.startswith(("idx", "wsel")):
            sig[name] = "*i32"
        elif name.startswith(("gat", "dst")):    # append: flat rows of learned-pool candidates
            sig[name] = "*i64"
        elif name in ("ws_acc", "ws_m", "ws_l", "ws_u", "ws_mu", "blse") or name.startswith("kb"):   # kb: block means
            sig[name] = "*fp32"
        elif name == "qk_scale":
            sig[name] = "fp32"
        elif name.startswith(("s_", "trash")) or name in ("C", "H", "NS", "NK", "B", "n_tbl", "n_pg", "cap"):
            sig[name] = "i32"
        else:
            sig[name] = "*bf16"
    return sig


def signature(fn, consts: dict, pointers: dict, floats=("qk_scale", "scale")) -> dict:
    """Triton argument types of kernel ``fn``: ``pointers`` maps argument names to pointer types
    ("*bf16", "*fp32", "*i32"), ``floats`` are fp32 scalars, other arguments i32."""
    return {n: "constexpr" if n in consts else pointers.get(n, "fp32" if n in floats else "i32")
            for n in fn.arg_names}


def compile_kernel(fn, consts: dict, sig: dict, **options):
    """The compiled kernel (``.asm``, ``.metadata``) of ``fn`` for sm_90 with argument types ``sig``,
    pointers and strides 16-aligned as the launcher's specialization sees them (the loop pipelining
    needs it); ``options``: num_warps, num_stages, maxnreg."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or (n.startswith(("s_", "stride")) and sig[n] == "i32")}
    src = ASTSource(fn, sig, constexprs={k: v for k, v in consts.items() if k in fn.arg_names}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def compile_decode(fn, consts: dict, *, num_warps: int, num_stages: int):
    """``compile_kernel`` for a decode kernel (templates/decode.py.j2) with bf16 tensors."""
    return compile_kernel(fn, consts, decode_signature(fn, consts), num_warps=num_warps, num_stages=num_stages)


def spill_bytes(usage: str) -> int:
    """Bytes of spill stores in a ``ptxas_usage`` line."""
    m = re.search(r"(\d+) bytes spill stores", usage)
    return int(m.group(1)) if m else 0


def ptxas_usage(kernel) -> str:
    """Registers and spills of a compiled kernel, from ``ptxas -v`` (sm_90a)."""
    import triton
    tools = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas*")), key=len)
    ptx = Path(tempfile.mkdtemp()) / "kernel.ptx"
    ptx.write_text(kernel.asm["ptx"])
    r = subprocess.run([tools[-1] if tools else "ptxas", "-v", "--gpu-name", "sm_90a", str(ptx), "-o", f"{ptx}.o"],
                       capture_output=True, text=True)
    return "; ".join(line.split(":")[-1].strip() for line in r.stderr.splitlines()
                     if "registers" in line or "spill" in line)
