"""``nsa-dsl bench``: a compiled spec against dense attention and fla-core's NSA on one GPU, in one run.

One *case* is a sequence length T, a workload and a head shape (HQ, H). Each case measures, every
measurement wrapped so that a failure is written into the row ("oom", "error", with the message in
``<method>_error``) and the run goes on:

- the whole op: forward and forward+backward time, and the peak memory of each beyond the inputs
  (``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated before the call);
- each branch's kernels alone, forward (compression attention, scoring + top-k, selection,
  window), and how many distinct blocks R = 4 adjacent tokens of a kv head choose (selection
  sharing: 16 blocks each means 16 to 64 for four tokens);
- PyTorch SDPA with the cuDNN and flash backends (dense causal attention), up to ``peer_max_len``
  (SDPA at 256k takes minutes) and once per length and shape (dense time does not depend on
  the data, so not again for a second workload);
- fla-core's ``parallel_nsa`` when ``fla.ops.nsa`` imports, in *its own* configuration
  (``FLA_CONFIG``: compression and selection blocks l = l' = d = 64, n = 16, no window; fla
  needs flash-attn for a window and at least 16 query heads per kv head).

:func:`annotate_rows` then derives achieved TFLOP/s (and GB/s for the branch kernels), ms per
query head and speedups over cuDNN. FLOP are *useful* work, from ``nsa_dsl.language.cost.cost``
(keys each query attends, causal masking counted): QK and PV (2 * (Dqk + Dv) per key and query
head) for attention branches, QK only (2 * Dqk) for a selection's scoring pass. Forward+backward
follows FlashAttention's convention: the backward does 2.5x the forward's matmul work (QK
recomputed, dV, dP, dQ, dK); the scoring pass has no backward (no gradient flows through the
choice of blocks). GB/s: the K/V bytes each (token, kv head) reads once for its G query heads
(``cost.cost``'s bytes), an effective rate (tiles shared between tokens read less from memory).

Row fields (JSON): ``T, workload, B, HQ, H, G, Dqk, Dv, dtype, inputs_gib``; the op's
``nsa_fwd_ms, nsa_fwdbwd_ms, nsa_fwd_peak_gib, nsa_fwdbwd_peak_gib``; per branch kernel
``<branch>_compress_ms``, ``<branch>_topk_ms`` (scoring + top-k), ``<branch>_select_ms``,
``<branch>_window_ms`` and ``<branch>_distinct_r4``; peers ``cudnn_*``, ``flash_*``, ``fla_*``
``_fwd_ms`` / ``_fwdbwd_ms``; failures ``<what>_error``. Derived (:func:`annotate_rows`):
``nsa_fwd_tflop, nsa_fwdbwd_tflop, fla_*_tflop, dense_fwd_tflop`` (work, 1e12 FLOP), achieved
``*_tflops`` (TFLOP/s) for the op, the peers and each branch kernel, ``<kernel>_gbs``,
``nsa_fwd_ms_per_head, nsa_fwdbwd_ms_per_head`` and ``speedup_fwd_vs_cudnn,
speedup_fwdbwd_vs_cudnn, fla_speedup_*_vs_cudnn``. A time field holds "oom", "error" or
"skipped" (SDPA above ``peer_max_len``) instead of a number when it was not measured.

Workloads (:func:`make_inputs`):

- ``random``: q, k, v iid standard normal. Selections are then nearly independent between
  neighbouring tokens, more diverse than a trained model's.
- ``local``: keys drift slowly along T and queries follow recent keys, so neighbouring tokens
  choose mostly the same blocks, as in trained models (docs/KERNELS.md, "Known performance weaknesses"). Per kv head ``h``,
  ``z_h[t]`` is a moving sum of ``L = LOCAL_DRIFT`` (128) iid normal steps divided by ``sqrt(L)``: a
  stationary process of unit variance whose correlation between tokens ``s`` apart is
  ``max(0, 1 - s / L)``. Keys are ``k[t, h] = (z_h[t] + 0.5 n) / sqrt(1.25)`` with ``n`` iid
  normal (per-token detail). Query head ``j`` of kv head ``h`` is
  ``q[t, j] = a z_h[t] + b y_j[t] + c n'``: ``z_h`` makes recent blocks score high, ``y_j`` (a
  drifting process of the head's own) picks far blocks that neighbouring tokens share, ``n'`` is
  per-token noise; ``a = 0.3``, ``c = 0.9``, ``b = sqrt(1 - a^2 - c^2)`` (unit variance, so scores
  have the random workload's scale). Values stay iid normal. The weights are calibrated on the
  reference top-k (``nsa_dsl.semantics.reference``; paper pattern, G = 16, D = 64, T = 8192): 2 / 4 / 8 / 16
  adjacent tokens choose about 22 / 29 / 37 / 44 distinct blocks (random inputs, T = 16384:
  27 / 44 / 69 / 98), near an earlier measurement with drifting keys (22 / 30 / 42 / 59).
"""
from __future__ import annotations

import inspect
import math
import re
import statistics
from contextlib import contextmanager
from typing import Callable, Iterable, Sequence

import torch

from nsa_dsl.runtime import kernel_ops as ops
from nsa_dsl.runtime.op import CompiledOp, mean_pool
from nsa_dsl.tools.random_inputs import side_inputs
from nsa_dsl.language.cost import Dims, cost
from nsa_dsl.language.shapes import spec_shapes

WORKLOADS = ("random", "local")
DENSE_PEERS = ("cudnn", "flash")
PEERS = DENSE_PEERS + ("fla",)
SHARING_R = 4                   # adjacent tokens whose chosen blocks are counted together
BWD_FACTOR = 2.5                # backward matmul work / forward (FlashAttention's convention)
LONG_CALL_MS = 100.0            # calls slower than this are timed 3 times, not with do_bench
GIB = 2 ** 30

# The local workload (module doc): drift length in tokens, key noise, and the weights in q of
# its kv head's drift and of per-token noise (calibrated there).
LOCAL_DRIFT = 128
LOCAL_KEY_NOISE = 0.5
LOCAL_Q_SHARE, LOCAL_Q_NOISE = 0.3, 0.9

# fla-core's parallel_nsa as the issue names it: its own pattern, not the spec's.
FLA_CONFIG = {"block_size": 64, "block_counts": 16, "window_size": 0}
FLA_NOTE = ("fla = fla-core parallel_nsa in its own configuration: l = l' = d = 64, n = 16 "
            "(first block and 2 last forced), no window; not the spec's pattern")
# The same pattern in the language, to count fla's FLOP with nsa_dsl.language.shapes (approximately:
# fla's compression blocks follow its own visibility rule).
FLA_SPEC_TEXT = """attention fla_parallel_nsa {
    branch cmp = compress(block = 64, stride = 64)
    branch slc = select(block = 64, top_k = 16, score = cmp, keep_first = 1, keep_last = 2)
    output = gate(sigmoid, cmp, slc)
}"""

_KERNEL_OF_KIND = {"compress": "compress", "select": "select", "window": "window"}
_BRANCH_FIELD = re.compile(r"^(?P<key>\w+_(?:compress|topk|select|window))_ms$")


# ------------------------------------------------------------------------------- inputs

def _drift(B: int, T: int, D: int, L: int, g: torch.Generator, device, dtype) -> torch.Tensor:
    """[B, T, D]: a moving sum of L iid normal steps / sqrt(L) (unit variance, correlation
    max(0, 1 - s/L) at distance s). T + L steps, so the first tokens are as random as the rest."""
    x = torch.randn(B, T + L, D, device=device, dtype=dtype, generator=g)
    c = torch.cumsum(x, 1)
    return (c[:, L:] - c[:, :-L]) / math.sqrt(L)


def _local_qk(B, T, HQ, H, Dqk, g, device, dtype):
    """q [B, T, HQ, Dqk] and k [B, T, H, Dqk] of the local workload (module doc). One head at a
    time, so the float32 temporaries stay ~T * Dqk (not T * HQ * Dqk) at 256k."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    G = HQ // H
    a, c = LOCAL_Q_SHARE, LOCAL_Q_NOISE
    b = math.sqrt(1.0 - a * a - c * c)
    s = LOCAL_KEY_NOISE
    q = torch.empty(B, T, HQ, Dqk, device=device, dtype=dtype)
    k = torch.empty(B, T, H, Dqk, device=device, dtype=dtype)

    def noise():
        return torch.randn(B, T, Dqk, device=device, dtype=work, generator=g)
    for h in range(H):
        z = _drift(B, T, Dqk, LOCAL_DRIFT, g, device, work)
        k[:, :, h] = ((z + s * noise()) / math.sqrt(1 + s * s)).to(dtype)
        for j in range(G):            # query head h*G + j reads kv head h
            y = _drift(B, T, Dqk, LOCAL_DRIFT, g, device, work)
            q[:, :, h * G + j] = (a * z + b * y + c * noise()).to(dtype)
    return q, k


def make_inputs(workload: str, *, B: int, T: int, HQ: int, H: int, Dqk: int, Dv: int, gates: int,
                dtype=torch.bfloat16, device="cuda", seed: int = 0):
    """``(q, k, v, gates)`` of one workload (``"random"`` or ``"local"``, see the module doc);
    ``gates [B, T, HQ, gates]`` gate logits uniform in [0, 1), None when ``gates == 0``."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)
    if workload == "random":
        q, k = randn(B, T, HQ, Dqk), randn(B, T, H, Dqk)
    elif workload == "local":
        q, k = _local_qk(B, T, HQ, H, Dqk, g, device, dtype)
    else:
        raise ValueError(f"unknown workload {workload!r}; one of {', '.join(WORKLOADS)}")
    v = randn(B, T, H, Dv)
    gt = torch.rand(B, T, HQ, gates, device=device, dtype=dtype, generator=g) if gates else None
    return q, k, v, gt


def distinct_blocks(idx: torch.Tensor, R: int = SHARING_R, start: int = 0) -> float:
    """Average number of distinct blocks chosen by R adjacent tokens of one kv head.

    ``idx [B, T, H, top_k]`` (-1 padded). Tokens are grouped as [t0, t0 + R), [t0 + R, ...)
    from the first multiple of R at or after ``start`` (pass the first token with ``top_k``
    eligible blocks, so short prefixes do not lower the average); NaN when no group fits."""
    B, T, H, K = idx.shape
    t0 = min(-(-start // R) * R, T)
    n = (T - t0) // R
    if n == 0:
        return math.nan
    x = idx[:, t0:t0 + n * R].reshape(B, n, R, H, K).transpose(2, 3).reshape(B, n, H, R * K)
    s = x.sort(-1).values
    new = torch.ones_like(s, dtype=torch.bool)
    new[..., 1:] = s[..., 1:] != s[..., :-1]
    return float((new & (s >= 0)).sum(-1).double().mean())


# -------------------------------------------------------------------------------- FLOP

def dense_flops(T: int, HQ: int, Dqk: int, Dv: int, B: int = 1) -> float:
    """Causal dense attention forward: QK and PV over T(T+1)/2 key pairs per head."""
    return 2.0 * B * HQ * (T * (T + 1) / 2) * (Dqk + Dv)


def _cost(spec, T, HQ, H, Dqk, Dv, dtype_bytes):
    return cost(spec_shapes(spec), T, Dims.of(spec, heads=HQ, kv_heads=H, qk_dim=Dqk, v_dim=Dv,
                                               dtype_bytes=dtype_bytes))


def branch_costs(spec, T: int, *, B: int = 1, HQ: int, H: int, Dqk: int, Dv: int,
                 dtype_bytes: int = 2) -> dict[str, tuple[float, float]]:
    """Forward ``(FLOP, K/V bytes)`` of each branch kernel the bench times, keyed as its timing
    field without ``_ms``: ``cmp_compress``, ``slc_topk`` (the scoring pass, QK only),
    ``slc_select``, ``swa_window``."""
    c = _cost(spec, T, HQ, H, Dqk, Dv, dtype_bytes)
    out = {}
    for b in spec.branches:
        if b.kind == "indexer":        # scoring only: its time is its select branch's topk
            continue
        if b.kind == "select":
            r = c.row(b.score if spec.score_kind(b) == "indexer" else f"{b.name} score")
            out[f"{b.name}_topk"] = (float(B * r.flops), float(B * r.bytes))
        r = c.row(b.name)
        out[f"{b.name}_{_KERNEL_OF_KIND[b.kind]}"] = (float(B * r.flops), float(B * r.bytes))
    return out


def op_flops(spec, T: int, *, B: int = 1, HQ: int, H: int, Dqk: int, Dv: int) -> tuple[float, float]:
    """``(forward, forward+backward)`` FLOP of the whole op (module doc: 2.5x backward for the
    attention branches, none for scoring)."""
    c = _cost(spec, T, HQ, H, Dqk, Dv, 2)
    fwd = float(sum(r.flops for r in c.rows))
    attention = float(sum(r.flops for r in c.rows if r.kind != "score"))
    return B * fwd, B * (fwd + BWD_FACTOR * attention)


_FLA_SPEC = None


def fla_spec():
    """FLA_CONFIG's pattern as a Spec (for FLOP counts)."""
    global _FLA_SPEC
    if _FLA_SPEC is None:
        from nsa_dsl.language.parser import parse_source
        _FLA_SPEC = parse_source(FLA_SPEC_TEXT, "<fla>").specs[0]
    return _FLA_SPEC


def annotate_rows(rows: list[dict], spec) -> list[dict]:
    """Add derived fields to rows that hold the measured ``*_ms`` (in place; returns rows):
    FLOP counts (``*_tflop``, in 1e12), achieved ``*_tflops`` (TFLOP/s), branch kernels' ``*_gbs``,
    ``nsa_*_ms_per_head`` (ms / HQ) and ``speedup_*_vs_cudnn`` (cuDNN's time at the same length
    and shape from any row of the run, since SDPA runs for the first workload only)."""
    def shape(r):
        return (r["B"], r["T"], r["HQ"], r["H"], r["Dqk"], r["Dv"])
    cudnn = {}
    for r in rows:
        for mode in ("fwd", "fwdbwd"):
            if isinstance(r.get(f"cudnn_{mode}_ms"), float):
                cudnn.setdefault((shape(r), mode), r[f"cudnn_{mode}_ms"])
    for r in rows:
        try:
            _annotate(r, spec, cudnn.get((shape(r), "fwd")), cudnn.get((shape(r), "fwdbwd")))
        except Exception as e:   # derived numbers are a nicety: never lose the measured ones
            r["annotate_error"] = f"{type(e).__name__}: {e}"[:300]
    return rows


def _annotate(r: dict, spec, cudnn_fwd, cudnn_fwdbwd) -> None:
    """annotate_rows for one row, given cuDNN's times at its shape (None where not measured)."""
    B, T, HQ, H, Dqk, Dv = (r[k] for k in ("B", "T", "HQ", "H", "Dqk", "Dv"))
    dims = dict(B=B, HQ=HQ, H=H, Dqk=Dqk, Dv=Dv)
    work = {"nsa": op_flops(spec, T, **dims)}
    dense = dense_flops(T, HQ, Dqk, Dv, B)
    for peer in DENSE_PEERS:
        work[peer] = (dense, (1 + BWD_FACTOR) * dense)
    if any(k.startswith("fla_") for k in r):
        try:
            work["fla"] = op_flops(fla_spec(), T, **dims)
        except Exception:   # a FLOP count is a nicety; never lose the row over it
            pass
    for method, (fwd, fwdbwd) in work.items():
        if method in ("nsa", "fla"):
            r[f"{method}_fwd_tflop"], r[f"{method}_fwdbwd_tflop"] = fwd / 1e12, fwdbwd / 1e12
        for mode, flop in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            ms = r.get(f"{method}_{mode}_ms")
            if _num(ms):
                r[f"{method}_{mode}_tflops"] = flop / (ms * 1e-3) / 1e12
    r["dense_fwd_tflop"] = dense / 1e12
    dtype_bytes = torch.empty(0, dtype=getattr(torch, r.get("dtype", "bfloat16"))).element_size()
    for key, (flop, nbytes) in branch_costs(spec, T, **dims, dtype_bytes=dtype_bytes).items():
        ms = r.get(f"{key}_ms")
        if _num(ms):
            r[f"{key}_tflops"] = flop / (ms * 1e-3) / 1e12
            r[f"{key}_gbs"] = nbytes / (ms * 1e-3) / 1e9
    for mode in ("fwd", "fwdbwd"):
        ms = r.get(f"nsa_{mode}_ms")
        if _num(ms):
            r[f"nsa_{mode}_ms_per_head"] = ms / HQ
        base = cudnn_fwd if mode == "fwd" else cudnn_fwdbwd
        for method in ("nsa", "fla"):
            ms = r.get(f"{method}_{mode}_ms")
            if base is not None and _num(ms):
                r[f"{'speedup' if method == 'nsa' else 'fla_speedup'}_{mode}_vs_cudnn"] = base / ms


def _num(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


# ------------------------------------------------------------------------------ timing

def _event_ms(fn: Callable) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end))


def _bench(fn: Callable, warmup: int = 5, rep: int = 20) -> float:
    """Median ms of ``fn``. The first call compiles / autotunes and is not timed; a call of
    LONG_CALL_MS or more is timed 3 times directly (do_bench would run it 8+ times: minutes
    for SDPA at 128k), shorter ones go to ``triton.testing.do_bench``."""
    fn()
    torch.cuda.synchronize()
    one = _event_ms(fn)
    if one >= LONG_CALL_MS:
        return float(statistics.median([one, _event_ms(fn), _event_ms(fn)]))
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _peak_gib(fn: Callable) -> float:
    """GiB allocated by one call of ``fn`` at its peak, beyond what was allocated before it
    (the inputs). Outputs and gradients count (they are part of the call's footprint)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GIB


def _release() -> None:
    """Hand cached blocks back to the device after a case or a failure. A device left in a sticky
    error state (an illegal access) raises here too: the next measurements record that instead."""
    try:
        torch.cuda.empty_cache()
    except Exception:
        pass


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


@contextmanager
def _requires_grad(tensors):
    for x in tensors:
        x.requires_grad_(True)
    try:
        yield
    finally:
        for x in tensors:
            x.requires_grad_(False)


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend_name]

    def run(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return run


# --------------------------------------------------------------------------- fla-core

_FLA: dict = {}


def load_fla():
    """``(parallel_nsa, note)``: the function when ``fla.ops.nsa`` imports, else ``(None, why)``."""
    if "fn" not in _FLA:
        try:
            from fla.ops.nsa import parallel_nsa
            try:
                from importlib.metadata import version
                ver = version("fla-core")
            except Exception:
                ver = "unknown version"
            _FLA["fn"], _FLA["note"] = parallel_nsa, f"fla-core {ver}"
        except Exception as e:  # not installed, or broken against this torch / triton
            _FLA["fn"], _FLA["note"] = None, f"fla-core not importable ({type(e).__name__}: {str(e)[:120]})"
    return _FLA["fn"], _FLA["note"]


def fla_kwargs(fn: Callable, g_cmp, g_slc) -> dict:
    """Keyword arguments for ``parallel_nsa(q, k, v, **kwargs)`` in FLA_CONFIG, checked against
    the installed signature (fla-core 0.6.0: ``parallel_nsa(q, k, v, g_cmp, g_slc, g_swa,
    block_indices=None, block_counts=16, block_size=64, window_size=0, scale=None,
    cu_seqlens=None)``, q [B, T, HQ, D], k/v [B, T, H, D], gates [B, T, HQ])."""
    params = inspect.signature(fn).parameters
    want = {"g_cmp": g_cmp, "g_slc": g_slc, **FLA_CONFIG}
    missing = [n for n in want if n not in params]
    if missing:
        raise TypeError(f"parallel_nsa{inspect.signature(fn)} lacks {', '.join(missing)}: "
                        "an fla-core this bench does not know")
    return want


# ------------------------------------------------------------------------------- cases

def branch_fields(spec) -> list[str]:
    """The row fields the branch-kernel step writes, in spec order."""
    out = []
    for b in spec.branches:
        if b.kind == "indexer":        # scoring only: its time is its select branch's topk
            continue
        if b.kind == "select":
            out += [f"{b.name}_topk_ms", f"{b.name}_distinct_r{SHARING_R}"]
        out.append(f"{b.name}_{_KERNEL_OF_KIND[b.kind]}_ms")
    return out


def case_steps(T: int, *, dense_here: bool, peers: Sequence[str], backward: bool,
               peer_max_len: int) -> list[str]:
    """The measurements of one case, in order (the progress bar counts them). ``peers`` holds
    only the available ones; ``dense_here``: this case's workload is the first (SDPA runs once)."""
    steps = ["inputs", "nsa fwd"] + (["nsa fwd+bwd"] if backward else []) + ["nsa memory", "branch kernels"]
    if dense_here and T <= peer_max_len:
        for p in peers:
            if p in DENSE_PEERS:
                steps += [f"{p} fwd"] + ([f"{p} fwd+bwd"] if backward else [])
    if "fla" in peers:
        steps += ["fla fwd"] + (["fla fwd+bwd"] if backward else [])
    return steps


def count_steps(lengths: Iterable[int], *, workloads: Sequence[str], kv_heads: Sequence[int],
                peers: Sequence[str], backward: bool, peer_max_len: int) -> int:
    return sum(len(case_steps(T, dense_here=i == 0, peers=peers, backward=backward, peer_max_len=peer_max_len))
               for T in lengths for _ in kv_heads for i in range(len(workloads)))


def available_peers(peers: Sequence[str]) -> tuple[tuple[str, ...], list[str]]:
    """The peers that can run here, and notes on those dropped (fla-core not importable)."""
    kept, notes = [], []
    for p in peers:
        if p not in PEERS:
            raise ValueError(f"unknown peer {p!r}; one of {', '.join(PEERS)}")
        if p == "fla":
            fn, note = load_fla()
            if fn is None:
                notes.append(note)
                continue
        kept.append(p)
    return tuple(kept), notes


class _Case:
    """One (T, workload, shape): the tensors and the measurements; a failure is written into
    the row and never raised, so one out-of-memory loses one cell, not the run."""

    def __init__(self, op: CompiledOp, row: dict, workload: str, dtype, backward: bool, device="cuda"):
        self.op, self.spec, self.row = op, op.spec, row
        self.workload, self.dtype, self.backward, self.device = workload, dtype, backward, device
        self.status = None     # "oom" / "error" when the inputs could not be made: every cell says so
        self.t = {}

    # -- bookkeeping
    def attempt(self, method: str, fn: Callable):
        """``fn()``, or "oom" / "error" (the message kept in ``<method>_error``) when it raises."""
        if self.status:
            return self.status
        try:
            value = fn()
        except Exception as e:
            if _is_oom(e):
                value = "oom"
            else:
                value = "error"
                self.row.setdefault(f"{method}_error", f"{type(e).__name__}: {e}"[:300])
        if isinstance(value, str):
            _release()                 # after the except block: the traceback's tensors are gone
        return value

    def measure(self, field: str, method: str, fn: Callable):
        self.row[field] = value = self.attempt(method, fn)
        return value

    def run(self, label: str) -> None:
        method, _, mode = label.partition(" ")
        if label == "inputs":
            self.measure("inputs_gib", "inputs", self._inputs)
            self.status = self.row["inputs_gib"] if isinstance(self.row["inputs_gib"], str) else None
        elif label == "nsa fwd":
            self.measure("nsa_fwd_ms", "nsa", lambda: _bench(self._call))
        elif label == "nsa fwd+bwd":
            with _requires_grad(self._leaves()):
                self.measure("nsa_fwdbwd_ms", "nsa", lambda: _bench(self._fwd_bwd))
        elif label == "nsa memory":
            self.measure("nsa_fwd_peak_gib", "nsa", lambda: _peak_gib(self._call))
            if self.backward:
                with _requires_grad(self._leaves()):
                    self.measure("nsa_fwdbwd_peak_gib", "nsa", lambda: _peak_gib(self._fwd_bwd))
        elif label == "branch kernels":
            self._branch_kernels()
        elif method in DENSE_PEERS:
            self._sdpa(method, mode == "fwd+bwd")
        elif method == "fla":
            self._fla(mode == "fwd+bwd")
        else:
            raise ValueError(label)

    def free(self):
        self.t.clear()

    # -- the op
    def _inputs(self) -> float:
        r, spec = self.row, self.spec
        C = len(spec.output.branches) if spec.output.kind == "gate" else 0
        q, k, v, gates = make_inputs(self.workload, B=r["B"], T=r["T"], HQ=r["HQ"], H=r["H"], Dqk=r["Dqk"],
                                     Dv=r["Dv"], gates=C, dtype=self.dtype, device=self.device, seed=r["T"])
        # learned pools' stand-ins and indexer inputs (random_inputs), made here, untimed
        g = torch.Generator(device=self.device).manual_seed(r["T"] + 1)
        compressed, index = side_inputs(spec, k, v, g)
        do = torch.randn(r["B"], r["T"], r["HQ"], r["Dv"], device=self.device, dtype=self.dtype)
        self.t = dict(q=q, k=k, v=v, gates=gates, compressed=compressed, index=index, do=do)
        return sum(x.numel() * x.element_size() for x in self._leaves() + [do]) / GIB

    def _call(self):
        t = self.t
        return self.op(t["q"], t["k"], t["v"], t["gates"], compressed=t["compressed"] or None,
                       index=t["index"] or None)

    def _leaves(self):
        t = self.t
        if not t:
            return []
        return [x for x in (t["q"], t["k"], t["v"], t["gates"]) if x is not None] + \
            [x for p in t["compressed"].values() for x in p] + [x for p in t["index"].values() for x in p]

    def _fwd_bwd(self):
        t = self.t
        if not t["index"]:
            torch.autograd.grad(self._call(), self._leaves(), t["do"])
            return
        # an indexer trains on its index loss (the attention's gradient never reaches it): both
        o, aux = self.op(t["q"], t["k"], t["v"], t["gates"], compressed=t["compressed"] or None,
                         index=t["index"], return_aux=True)
        loss = (o.float() * t["do"]).sum() + sum(x.sum() for x in aux.index_loss.values())
        torch.autograd.grad(loss, self._leaves())

    def _branch_kernels(self) -> None:
        """Forward time of each branch's kernels alone, on the op's inputs, called through the
        same ops as the whole op (so with its tuned configs, if any); the top-k's indices also
        give the selection sharing (distinct blocks of SHARING_R adjacent tokens)."""
        spec, r, t = self.spec, self.row, self.t

        def kernel_keys():
            binding = self.op.binding(heads=r["HQ"], kv_heads=r["H"], qk_dim=r["Dqk"], v_dim=r["Dv"])
            return self.op._kernels(binding)[1]
        keys = self.attempt("branch_kernels", kernel_keys)
        if isinstance(keys, str):      # no kernels ("oom" / "error", the message kept once)
            for field in branch_fields(spec):
                r[field] = keys
            return
        q, k, v = t.get("q"), t.get("k"), t.get("v")
        scale = r["Dqk"] ** -0.5
        kcmp, lses = {}, {}            # compressed keys and log-sum-exps that scoring reads
        for b in spec.of_kind("compress"):
            def compress(b=b):
                kc = mean_pool(k, b.block, b.stride).contiguous()
                vc = mean_pool(v, b.block, b.stride).contiguous()
                key = keys[f"compress_{b.name}"]
                kcmp[b.name], lses[b.name] = kc, ops.compress_fwd(key, q, kc, vc, scale)[1]
                return _bench(lambda: ops.compress_fwd(key, q, kc, vc, scale))
            self.measure(f"{b.name}_compress_ms", f"{b.name}_compress", compress)
        for b in spec.of_kind("select"):
            idx = {}

            by_indexer = spec.score_kind(b) == "indexer"

            def topk(b=b, by_indexer=by_indexer):
                if by_indexer:         # tokens: the indexer's scoring and top-k
                    key = keys[f"indexer_{b.name}"]
                    f = lambda: ops.indexer_topk(key, *t["index"][b.score], b.top_k)
                    idx["i"] = f()
                    return _bench(f)
                key = keys[f"topk_{b.name}"]
                if b.score != "mean_pool" and b.score not in lses:
                    raise RuntimeError(f"no scores: the compression branch {b.score!r} failed")
                if b.score == "mean_pool":
                    f = lambda: ops.topk_mean_pool(key, q, k, r["H"], b.top_k)
                else:
                    f = lambda: ops.topk_cmp(key, q, kcmp[b.score], lses[b.score], scale, b.top_k)
                idx["i"] = f()
                return _bench(f)
            self.measure(f"{b.name}_topk_ms", f"{b.name}_topk", topk)
            # first token with top_k eligible blocks: earlier ones choose fewer and would
            # lower the average
            self.measure(f"{b.name}_distinct_r{SHARING_R}", f"{b.name}_topk",
                         lambda b=b: distinct_blocks(idx["i"], SHARING_R, start=(b.top_k - 1) * b.block))

            def select(b=b, by_indexer=by_indexer):
                if "i" not in idx:
                    raise RuntimeError("no selected blocks: the top-k failed")
                key = keys[f"{'gather' if by_indexer else 'select'}_{b.name}"]
                return _bench(lambda: ops.select_fwd(key, q, k, v, idx["i"], scale))
            self.measure(f"{b.name}_select_ms", f"{b.name}_select", select)
        for b in spec.of_kind("window"):
            def window(b=b):
                key = keys[f"window_{b.name}"]
                return _bench(lambda: ops.window_fwd(key, q, k, v, scale))
            self.measure(f"{b.name}_window_ms", f"{b.name}_window", window)
        kcmp.clear()
        lses.clear()

    # -- peers
    def _sdpa(self, peer: str, backward: bool) -> None:
        t = self.t

        def run():
            fn = _sdpa(peer)
            # SDPA's layout is [B, heads, T, D]: transposed views of the same inputs.
            qkv = [t[n].transpose(1, 2).detach() for n in ("q", "k", "v")]
            if not backward:
                return _bench(lambda: fn(*qkv))
            leaves = [x.requires_grad_() for x in qkv]
            do = t["do"].transpose(1, 2).contiguous()

            def fwd_bwd():
                torch.autograd.grad(fn(*leaves), leaves, do)
            return _bench(fwd_bwd)
        self.measure(f"{peer}_{'fwdbwd' if backward else 'fwd'}_ms", peer, run)

    def _fla(self, backward: bool) -> None:
        t = self.t

        def run():
            parallel_nsa, _ = load_fla()
            B, T, HQ, _ = t["q"].shape
            g_cmp, g_slc = (torch.rand(B, T, HQ, device=self.device, dtype=self.dtype) for _ in range(2))
            kwargs = fla_kwargs(parallel_nsa, g_cmp, g_slc)
            qkv = [t[n].detach() for n in ("q", "k", "v")]
            if not backward:
                return _bench(lambda: parallel_nsa(*qkv, **kwargs))
            leaves = [x.requires_grad_() for x in qkv + [g_cmp, g_slc]]   # the gates are in kwargs

            def fwd_bwd():
                torch.autograd.grad(parallel_nsa(*qkv, **kwargs), leaves, t["do"], allow_unused=True)
            return _bench(fwd_bwd)
        self.measure(f"fla_{'fwdbwd' if backward else 'fwd'}_ms", "fla", run)


def bench_spec(op: CompiledOp, lengths: Iterable[int], *, B=1, HQ=64, H: int | Sequence[int] = 4,
               Dqk=128, Dv=128, dtype=torch.bfloat16, workloads: Sequence[str] = ("random",),
               peers: Sequence[str] = DENSE_PEERS, peer_max_len: int = 65536, backward=True,
               progress=None, device="cuda") -> list[dict]:
    """Rows of measurements (one per length, kv-head count and workload), annotated
    (:func:`annotate_rows`). ``H``: one kv-head count or several (GQA groups HQ / H side by side).
    ``peers``: of PEERS; fla is dropped when it does not import. SDPA peers run only up to
    ``peer_max_len`` (their cells read "skipped" above it). ``progress``: a tqdm-like object
    (``set_postfix_str``, ``update``), advanced once per measurement step (:func:`case_steps`).
    ``device``: "cuda"; another only with stand-in timers (the tests)."""
    spec = op.spec
    peers, _ = available_peers(peers)
    Hs = (H,) if isinstance(H, int) else tuple(H)
    rows = []
    for T in lengths:
        for h in Hs:
            for w, workload in enumerate(workloads):
                row = {"T": T, "workload": workload, "B": B, "HQ": HQ, "H": h, "G": HQ // h, "Dqk": Dqk,
                       "Dv": Dv, "dtype": str(dtype).split(".")[-1]}
                if w == 0 and T > peer_max_len:
                    for p in peers:
                        if p in DENSE_PEERS:
                            row[f"{p}_fwd_ms"] = "skipped"
                            if backward:
                                row[f"{p}_fwdbwd_ms"] = "skipped"
                case = _Case(op, row, workload, dtype, backward, device)
                for label in case_steps(T, dense_here=w == 0, peers=peers, backward=backward,
                                        peer_max_len=peer_max_len):
                    if progress is not None:
                        progress.set_postfix_str(f"T={T} H={h} {workload}: {label}")
                    case.run(label)
                    if progress is not None:
                        progress.update(1)
                case.free()
                del case
                _release()
                rows.append(row)
    return annotate_rows(rows, spec)


# ------------------------------------------------------------------------------ report

def _cell(x, digits: int = 2, suffix: str = "") -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}f}{suffix}"
    if isinstance(x, int):
        return str(x)
    return "-" if x is None else str(x)


def _multi(rows, key) -> bool:
    return len({r.get(key) for r in rows}) > 1


def markdown_table(rows: list[dict]) -> str:
    """Markdown: the whole op beside its peers (ms, achieved TFLOP/s, ms per query head, peak
    memory, speedups), then each branch's forward kernels; measurement failures read "oom",
    "error" (messages listed below the tables) or "skipped" (SDPA above --peer-max-len)."""
    if not rows:
        return "(no rows)"
    lead = [("workload", "workload", 0, "")] if _multi(rows, "workload") or rows[0].get("workload") != "random" else []
    if _multi(rows, "H") or _multi(rows, "HQ"):
        lead.append(("HQ/H", None, 0, ""))
    lead.append(("T", "T", 0, ""))
    cols = [("nsa fwd ms", "nsa_fwd_ms", 2, ""), ("nsa fwd+bwd ms", "nsa_fwdbwd_ms", 2, ""),
            ("fwd TFLOP/s", "nsa_fwd_tflops", 1, ""), ("fwd+bwd TFLOP/s", "nsa_fwdbwd_tflops", 1, ""),
            ("fwd ms/head", "nsa_fwd_ms_per_head", 3, ""), ("fwd+bwd ms/head", "nsa_fwdbwd_ms_per_head", 3, ""),
            ("fwd+bwd peak GiB", "nsa_fwdbwd_peak_gib", 2, ""),
            ("cuDNN fwd", "cudnn_fwd_ms", 2, ""), ("cuDNN fwd+bwd", "cudnn_fwdbwd_ms", 2, ""),
            ("flash fwd", "flash_fwd_ms", 2, ""), ("flash fwd+bwd", "flash_fwdbwd_ms", 2, ""),
            ("fla fwd", "fla_fwd_ms", 2, ""), ("fla fwd+bwd", "fla_fwdbwd_ms", 2, ""),
            ("speedup fwd vs cuDNN", "speedup_fwd_vs_cudnn", 2, "x"),
            ("speedup fwd+bwd vs cuDNN", "speedup_fwdbwd_vs_cudnn", 2, "x")]
    cols = [c for c in cols if any(c[1] in r for r in rows)]
    out = []
    if any("fla_fwd_ms" in r or "fla_fwdbwd_ms" in r for r in rows):
        out.append(f"({FLA_NOTE})")
    out += _table(rows, lead + cols)

    branch = []
    for r in rows:
        for key in r:
            m = _BRANCH_FIELD.match(key)
            if m and m["key"] not in branch:
                branch.append(m["key"])
    if branch:
        bcols = []
        for key in branch:
            name, kind = key.rsplit("_", 1)
            label = f"{name} {'scoring+top-k' if kind == 'topk' else kind}"
            bcols += [(f"{label} ms", f"{key}_ms", 3, ""), (f"{label} TFLOP/s", f"{key}_tflops", 1, "")]
            if key.endswith("_select"):
                bcols.append((f"{label} GB/s", f"{key}_gbs", 0, ""))
                bcols.append((f"{name} distinct blocks, {SHARING_R} tokens", f"{name}_distinct_r{SHARING_R}", 1, ""))
        out += ["", "Forward per branch (each kernel alone, same inputs):", ""] + _table(rows, lead + bcols)
    failures: dict = {}            # (what failed, message) -> the cases it failed in
    for r in rows:
        for k, v in r.items():
            if k.endswith("_error"):
                failures.setdefault((k[:-len("_error")], v), []).append(f"T={r['T']} H={r['H']} {r.get('workload', '')}")
    if failures:
        out += ["", "Failures:"]
        for (what, message), cases in failures.items():
            where = ", ".join(cases[:3]) + (f" and {len(cases) - 3} more" if len(cases) > 3 else "")
            out.append(f"- {what} ({where}): {message}")
    return "\n".join(out)


def _table(rows, cols) -> list[str]:
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for _, key, digits, suffix in cols:
            cells.append(f"{r['HQ']}/{r['H']}" if key is None else _cell(r.get(key), digits, suffix))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _import_pyplot():
    from nsa_dsl.tools.show import _import_pyplot
    return _import_pyplot("E617", "nsa-dsl bench --plot", ", or drop --plot")


def plot_rows(rows: list[dict], path, title: str = "") -> None:
    """A PNG with two panels: time against T (log-log) for nsa, cuDNN, flash and fla, forward
    (solid) and forward+backward (dashed); and speedup over cuDNN against T. Points whose
    measurement failed or was skipped are left out."""
    plt = _import_pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    multi_w, multi_h = _multi(rows, "workload"), _multi(rows, "H") or _multi(rows, "HQ")
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.get("workload", "random"), r["HQ"], r["H"]), []).append(r)
    colors = {"nsa": "C0", "cudnn": "C1", "flash": "C2", "fla": "C3"}
    names = {"nsa": "nsa", "cudnn": "cuDNN", "flash": "flash", "fla": "fla*"}
    markers = ["o", "s", "^", "D", "v", "P"]
    styles = {"fwd": "-", "fwdbwd": "--"}
    modes = {"fwd": "fwd", "fwdbwd": "fwd+bwd"}
    seen_dense = set()
    for n, ((workload, HQ, H), grp) in enumerate(groups.items()):
        grp = sorted(grp, key=lambda r: r["T"])
        shape_tag = [f"G={HQ // H}"] if multi_h else []
        for method in ("nsa", "cudnn", "flash", "fla"):
            dense = method in DENSE_PEERS
            if dense and (HQ, H) in seen_dense:
                continue   # dense time does not depend on the workload: one line per shape
            tag = " ".join(shape_tag if dense else ([workload] if multi_w else []) + shape_tag)
            for mode, style in styles.items():
                label = f"{names[method]} {modes[mode]}" + (f" ({tag})" if tag else "")
                pts = [(r["T"], r[f"{method}_{mode}_ms"]) for r in grp if _num(r.get(f"{method}_{mode}_ms"))]
                if pts:
                    a.plot(*zip(*pts), style, marker=markers[n % len(markers)], color=colors[method], label=label)
                key = {"nsa": "speedup", "fla": "fla_speedup"}.get(method)
                pts = [(r["T"], r[f"{key}_{mode}_vs_cudnn"]) for r in grp
                       if key and _num(r.get(f"{key}_{mode}_vs_cudnn"))]
                if pts:
                    b.plot(*zip(*pts), style, marker=markers[n % len(markers)], color=colors[method], label=label)
        seen_dense.add((HQ, H))
    notes = [title] if title else []
    if any(k.startswith("fla_") and k.endswith("_ms") for r in rows for k in r):
        notes.append("fla*: " + FLA_NOTE.split(": ", 1)[1])
    _finish(plt, fig, a, b, "T", ("ms", "time"), ("speedup over cuDNN (x)", "speedup over SDPA cuDNN"),
            notes, path)


def _finish(plt, fig, a, b, xlabel, time_labels, speedup_labels, notes, path) -> None:
    """The shared frame of the two-panel plots: time (log-log) beside speedup (1 marked), legends
    below the panels (many series would hide the lines), notes on top; written and closed."""
    for ax, (ylabel, name) in ((a, time_labels), (b, speedup_labels)):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    a.set_yscale("log")
    b.axhline(1, color="gray", lw=0.5)
    if notes:
        fig.suptitle("\n".join(notes), fontsize=8, y=1.03)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_decode(rows: list[dict], path, title: str = "") -> None:
    """A PNG of decoding (rows of ``nsa_dsl.tools.decode_bench.decode_bench``): time per step against the cache
    length (log-log) per batch size (and kv head count, when several), the decode kernels launched
    from Python (solid) and replayed as a CUDA graph (dotted) beside SDPA cuDNN and flash over the
    whole cache; and cuDNN / nsa (the graph's time where measured: the GPU's, not the host's)."""
    plt = _import_pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    series = (("nsa_kernel_ms", "nsa kernels", "-", "C0"), ("nsa_graph_ms", "nsa kernels (graph)", ":", "C0"),
              ("paged_graph_ms", "nsa paged (graph)", "-.", "C3"),
              ("sdpa_cudnn_ms", "cuDNN", "--", "C1"), ("sdpa_flash_ms", "flash", "--", "C2"))
    markers = ["o", "s", "^", "D", "v", "P"]
    several_h = len({r.get("H") for r in rows}) > 1
    groups = sorted({(r["B"], r.get("H") or 0) for r in rows})
    for n, (B, H) in enumerate(groups):
        grp = sorted((r for r in rows if (r["B"], r.get("H") or 0) == (B, H)), key=lambda r: r["T"])
        tag = f"B={B}" + (f", H={H}" if several_h else "")
        for key, name, style, color in series:
            pts = [(r["T"], r[key]) for r in grp if _num(r.get(key))]
            if pts:
                a.plot(*zip(*pts), style, marker=markers[n % len(markers)], color=color, label=f"{name}, {tag}")
        pts = [(r["T"], r["sdpa_cudnn_ms"] / (r["nsa_graph_ms"] if _num(r.get("nsa_graph_ms")) else r["nsa_kernel_ms"]))
               for r in grp if _num(r.get("sdpa_cudnn_ms")) and _num(r.get("nsa_kernel_ms"))]
        if pts:
            b.plot(*zip(*pts), "-", marker=markers[n % len(markers)], color=f"C{n}", label=tag)
    _finish(plt, fig, a, b, "cache length", ("ms per step", "decoding: new tokens per sequence per step"),
            ("cuDNN / nsa graph (x)", "speedup over SDPA cuDNN"), [title] if title else [], path)
