"""``nsa-dsl bench --decode``: one decoding step over a KV cache, timed against SDPA over the
whole cache (GPU)."""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Union

import torch

from nsa_dsl.language.ir import Spec
from nsa_dsl.runtime.decoding import DecodeOp
from nsa_dsl.runtime.kv_cache import NSACache

__all__ = ["decode_bench"]


def decode_bench(op: Union[DecodeOp, Spec, str, os.PathLike], cache_lengths: Sequence[int] = (8192, 65536),
                 batches: Sequence[int] = (1, 64), *, HQ: int = 64, H: int = 4, Dqk: int = 128, Dv: int = 128,
                 q_len: int = 1, dtype=torch.bfloat16, peers=("cudnn", "flash"), cuda_graph: bool = True,
                 progress: Optional[Callable[[str], None]] = None, device="cuda",
                 timer: Optional[Callable[[Callable], float]] = None) -> list[dict]:
    """Time one decoding step per (batch, cache length) against SDPA over the whole cache (GPU).

    For each case the cache holds ``T - q_len`` random tokens (appended in chunks, which pools the
    compressed blocks); then, per step, ``q_len`` new tokens per sequence (``q_len > 1``:
    speculative decoding):
      ``nsa_step_ms``    append (host bookkeeping, pooling) + the decode kernels,
      ``nsa_kernel_ms``  the decode kernels alone (``DecodeOp``: split-K slices + decode kernel),
      ``nsa_graph_ms``   the same replayed from a CUDA graph (``cuda_graph``; launch overhead gone),
      ``sdpa_<peer>_ms`` SDPA (``peers``: cudnn / flash backends) of the ``q_len`` queries over all
                         ``T`` keys of the same cache (GQA), the dense baseline,
      ``speedup``        fastest SDPA / ``nsa_kernel_ms`` (``speedup_graph``: / ``nsa_graph_ms``, the
                         GPU's time without the host's launches).
    Medians of ``triton.testing.do_bench`` (``timer`` replaces it, e.g. for a dry run on the CPU
    with ``device="cpu"``, ``cuda_graph=False``, ``peers=()``). Returns one dict per case.
    """
    if timer is None:
        from triton.testing import do_bench

        def timer(fn):
            return float(do_bench(fn, return_mode="median"))
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("decode_bench needs a CUDA GPU")
    if not isinstance(op, DecodeOp):
        from nsa_dsl.language.parser import as_spec
        op = DecodeOp(as_spec(op))
    spec = op.spec
    n_gates = len(spec.output.branches)
    rows = []
    for B in batches:
        for T in cache_lengths:
            if progress:
                progress(f"decode B={B} T={T} q_len={q_len}")
            g = torch.Generator(device=dev).manual_seed(B * 100003 + T)

            def r(*shape):
                return torch.randn(*shape, device=dev, dtype=dtype, generator=g)
            cache = NSACache(spec, B, T, kv_heads=H, qk_dim=Dqk, v_dim=Dv, dtype=dtype, device=dev)
            fill = max(1, min(T, (1 << 26) // max(1, B * H * (Dqk + Dv))))   # tokens per prefill append
            for c0 in range(0, T - q_len, fill):
                n = min(fill, T - q_len - c0)
                cache.append(r(B, n, H, Dqk), r(B, n, H, Dv))
            q = r(B, q_len, HQ, Dqk)
            k_new, v_new = r(B, q_len, H, Dqk), r(B, q_len, H, Dv)
            gates = torch.rand(B, q_len, HQ, n_gates, device=dev, generator=g).to(dtype) \
                if spec.output.kind == "gate" else None
            lengths_host, lengths_dev = list(cache._lengths), cache.lengths.clone()

            def one_step():                        # rewind the lengths, append the same tokens, decode
                cache._lengths = list(lengths_host)
                cache.lengths.copy_(lengths_dev)
                return op(q, cache, cache.append(k_new, v_new), gates)
            one_step()                             # compiles; leaves the cache holding T tokens
            step = cache.step_at(lengths_host, (q_len,) * B, q_len)
            row = {"B": B, "T": T, "q_len": q_len, "HQ": HQ, "H": H, "Dqk": Dqk, "Dv": Dv,
                   "dtype": str(dtype).split(".")[-1], "cache_bytes": cache.nbytes()}
            row["nsa_step_ms"] = timer(one_step)
            row["nsa_kernel_ms"] = timer(lambda: op(q, cache, step, gates))
            if cuda_graph:
                try:
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        op(q, cache, step, gates)  # warm, outside the capture
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        op(q, cache, step, gates)
                    row["nsa_graph_ms"] = timer(graph.replay)
                except Exception as e:            # noqa: BLE001 - report it, keep benchmarking
                    row["nsa_graph_error"] = f"{type(e).__name__}: {e}"
            first = spec.branch_names[0]
            k_full = cache.k[first][:, :T].transpose(1, 2)      # [B, H, T, Dqk], a view of the cache
            v_full = cache.v[first][:, :T].transpose(1, 2)
            q_full = q.transpose(1, 2)                          # [B, HQ, q_len, Dqk]
            for peer in peers:
                try:
                    from torch.nn.attention import SDPBackend, sdpa_kernel
                    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[peer]

                    def sdpa(backend=backend):
                        with sdpa_kernel(backend):
                            return torch.nn.functional.scaled_dot_product_attention(
                                q_full, k_full, v_full, enable_gqa=True)
                    row[f"sdpa_{peer}_ms"] = timer(sdpa)
                except Exception as e:            # noqa: BLE001
                    row[f"sdpa_{peer}_error"] = f"{type(e).__name__}: {e}"
            best = min((row[f"sdpa_{p}_ms"] for p in peers if f"sdpa_{p}_ms" in row), default=None)
            if best is not None and row["nsa_kernel_ms"] > 0:
                row["speedup"] = best / row["nsa_kernel_ms"]
            if best is not None and row.get("nsa_graph_ms", 0) > 0:
                row["speedup_graph"] = best / row["nsa_graph_ms"]
            rows.append(row)
            del cache, k_full, v_full
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows
