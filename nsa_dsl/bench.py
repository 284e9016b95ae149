"""Timing of a compiled spec against dense attention on one GPU, in one run.

Measures forward and forward+backward of the whole op, each branch's kernels
alone, and PyTorch SDPA (cuDNN and flash backends) on the same shapes. Results
are plain dicts (the CLI writes JSON, a Markdown table and a plot).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from . import kernel_ops as ops
from .op import CompiledOp, mean_pool


def _bench(fn: Callable, warmup: int = 5, rep: int = 20) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend_name]

    def run(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return run


def dense_flops(T: int, HQ: int, Dqk: int, Dv: int, B: int = 1) -> float:
    """Causal dense attention forward: QK and PV over T(T+1)/2 key pairs per head."""
    return 2.0 * B * HQ * (T * (T + 1) / 2) * (Dqk + Dv)


def bench_spec(op: CompiledOp, lengths: Iterable[int], *, B=1, HQ=64, H=4, Dqk=128, Dv=128,
               dtype=torch.bfloat16, peers=("cudnn", "flash"), backward=True,
               progress: Callable[[str], None] | None = None) -> list[dict]:
    spec = op.spec
    rows = []
    for T in lengths:
        g = torch.Generator(device="cuda").manual_seed(T)
        def r(*s):
            return torch.randn(*s, device="cuda", dtype=dtype, generator=g)
        q, k, v = r(B, T, HQ, Dqk), r(B, T, H, Dqk), r(B, T, H, Dv)
        C = len(spec.output.branches)
        gates = torch.rand(B, T, HQ, C, device="cuda", dtype=dtype, generator=g) \
            if spec.output.kind == "gate" else None
        row = {"T": T, "B": B, "HQ": HQ, "H": H, "Dqk": Dqk, "Dv": Dv, "dtype": str(dtype).split(".")[-1]}
        if progress:
            progress(f"T={T}: nsa forward")
        row["nsa_fwd_ms"] = _bench(lambda: op(q, k, v, gates))
        if backward:
            leaves = [x.requires_grad_() for x in (q, k, v, gates) if x is not None]
            o = op(q, k, v, gates)
            do = torch.randn_like(o)

            def fwd_bwd():
                out = op(q, k, v, gates)
                torch.autograd.grad(out, leaves, do)
            if progress:
                progress(f"T={T}: nsa forward+backward")
            row["nsa_fwdbwd_ms"] = _bench(fwd_bwd)
            for x in leaves:
                x.requires_grad_(False)
        row.update(_branch_times(op, q, k, v, gates))
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        for peer in peers:
            if progress:
                progress(f"T={T}: sdpa {peer}")
            fn = _sdpa(peer)
            try:
                row[f"{peer}_fwd_ms"] = _bench(lambda: fn(qt, kt, vt))
                if backward:
                    ql, kl, vl = (x.detach().requires_grad_() for x in (qt, kt, vt))
                    dd = torch.randn(B, HQ, T, Dv, device="cuda", dtype=dtype)
                    def peer_fb():
                        out = fn(ql, kl, vl)
                        torch.autograd.grad(out, (ql, kl, vl), dd)
                    row[f"{peer}_fwdbwd_ms"] = _bench(peer_fb)
            except Exception as e:  # a backend missing on this GPU/torch is reported, not fatal
                row[f"{peer}_error"] = f"{type(e).__name__}: {e}"[:200]
        row["dense_tflops_fwd"] = dense_flops(T, HQ, Dqk, Dv, B) / 1e12
        rows.append(row)
        del q, k, v, gates
        torch.cuda.empty_cache()
    return rows


def _branch_times(op: CompiledOp, q, k, v, gates) -> dict:
    """Forward time of each branch's kernels alone (same inputs as the whole op)."""
    spec = op.spec
    B, T, HQ, Dqk = q.shape
    H, Dv = k.shape[2], v.shape[3]
    plan, keys = op._kernels(op.binding(heads=HQ, kv_heads=H, qk_dim=Dqk, v_dim=Dv))
    scale = Dqk ** -0.5
    out, kcmp, lses, idxs = {}, {}, {}, {}
    for b in spec.of_kind("compress"):
        kc, vc = mean_pool(k, b.block, b.stride).contiguous(), mean_pool(v, b.block, b.stride).contiguous()
        key = keys[f"compress_{b.name}"]
        out[f"{b.name}_compress_ms"] = _bench(lambda: ops.module(key).fwd(q, kc, vc, scale))
        kcmp[b.name] = kc
        lses[b.name] = ops.module(key).fwd(q, kc, vc, scale)[1]
    for b in spec.of_kind("select"):
        tk, sk = keys[f"topk_{b.name}"], keys[f"select_{b.name}"]
        if b.score == "mean_pool":
            f = lambda: ops.module(tk).topk_mean_pool(q, k)
        else:
            f = lambda: ops.module(tk).topk(q, kcmp[b.score], lses[b.score], scale)
        out[f"{b.name}_topk_ms"] = _bench(f)
        idx = f()
        out[f"{b.name}_select_ms"] = _bench(lambda: ops.module(sk).fwd(q, k, v, idx, scale))
    for b in spec.of_kind("window"):
        wk = keys[f"window_{b.name}"]
        out[f"{b.name}_window_ms"] = _bench(lambda: ops.module(wk).fwd(q, k, v, scale))
    return out


def markdown_table(rows: list[dict]) -> str:
    cols = ["T", "nsa_fwd_ms", "nsa_fwdbwd_ms", "cudnn_fwd_ms", "cudnn_fwdbwd_ms", "flash_fwd_ms",
            "flash_fwdbwd_ms"]
    cols = [c for c in cols if any(c in r for r in rows)]
    extra = sorted({c for r in rows for c in r if c.endswith("_ms") and c not in cols})
    cols += extra
    head = "| " + " | ".join(cols) + " | speedup fwd vs cuDNN | speedup fwd+bwd vs cuDNN |"
    sep = "|" + "---|" * (len(cols) + 2)
    lines = [head, sep]
    for r in rows:
        cells = [str(r["T"])] + [f"{r[c]:.3f}" if isinstance(r.get(c), float) else "-" for c in cols[1:]]
        sf = r.get("cudnn_fwd_ms", math.nan) / r.get("nsa_fwd_ms", math.nan)
        sb = r.get("cudnn_fwdbwd_ms", math.nan) / r.get("nsa_fwdbwd_ms", math.nan) if "nsa_fwdbwd_ms" in r else math.nan
        lines.append("| " + " | ".join(cells) + f" | {sf:.2f}x | {sb:.2f}x |")
    return "\n".join(lines)
