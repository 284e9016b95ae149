"""The CLI's heavier subcommands (compile, demo, ...): they import torch and triton.

Each returns ``(exit_code, text)``-free: they *return* lines to print through the
``emit`` callback the CLI passes, so library code never prints itself.
"""
from __future__ import annotations

import os
import sys
import time
from importlib.resources import files
from pathlib import Path

from nsa_dsl.errors import SpecError


DEMO_MAX_T_CPU = 4096          # the interpreter takes minutes beyond this
DEMO_MAX_T_GPU = 1 << 18       # the demo checks against a float64 reference, which grows with T


def packaged_example(name: str = "nsa_paper.nsa") -> Path:
    """A spec shipped with the package (``nsa_dsl.examples``: the examples/ folder)."""
    return Path(str(files("nsa_dsl.examples") / name))


def _shape_args(args) -> dict:
    return {k: getattr(args, k) for k in ("heads", "kv_heads", "qk_dim", "v_dim")
            if getattr(args, k, None) is not None}


def compile_cmd(args, emit=print) -> int:
    import nsa_dsl
    spec = nsa_dsl.load(args.file, getattr(args, "name", None))
    from nsa_dsl.language.cost import Dims
    op = nsa_dsl.compile(spec)
    given = _shape_args(args)
    dims = Dims.of(spec, **given)      # the options, else the spec's, else the defaults explain assumes
    shapes = {"heads": dims.heads, "kv_heads": dims.kv_heads, "qk_dim": dims.qk_dim, "v_dim": dims.v_dim}
    if dims.defaulted:
        emit(f"shapes: {', '.join(f'{f} = {shapes[f]}' for f in dims.defaulted)} assumed (the spec does "
             f"not declare {'it' if len(dims.defaulted) == 1 else 'them'}; the defaults of `nsa-dsl explain`); "
             f"set {' '.join('--' + f.replace('_', '-') + ' N' for f in dims.defaulted)} to compile for others")
    if getattr(args, "emit", None):
        from nsa_dsl.runtime.files import output_folder
        output_folder(args.emit)                  # a folder that cannot take the files: say so first
    plan = op.plan(**shapes)
    emit(plan.describe())
    emit(f"cache entry: {op.cache.entry(plan)}")
    if getattr(args, "emit", None):
        for p in op.emit(args.emit, **shapes):
            emit(f"wrote {p}")
    return 0


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def demo_cmd(args, emit=print) -> int:
    """Parse the packaged NSA spec, compile, run forward and backward, check against the reference."""
    import torch

    on_gpu = (getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SpecError("E607", "demo --device cuda: this torch build sees no CUDA GPU"
                        + ("" if torch.version.cuda else " (it is a CPU build)"),
                        hint="run `nsa-dsl demo` without --device (the CPU interpreter), or install "
                             "a CUDA build of torch on a machine with a GPU")
    if not on_gpu:   # kernels run on the CPU through Triton's interpreter
        from nsa_dsl.runtime.backend import check_kernel_device
        if "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
        check_kernel_device(torch.empty(0), torch.float32, "the demo's input")
    import nsa_dsl
    from nsa_dsl.semantics.reference import reference

    path = Path(args.file) if getattr(args, "file", None) else packaged_example()
    spec = nsa_dsl.load(path, getattr(args, "name", None))
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    T = getattr(args, "seq_len", None) or (4096 if on_gpu else 160)
    limit = DEMO_MAX_T_GPU if on_gpu else DEMO_MAX_T_CPU
    if T > limit:
        raise SpecError("E640", f"demo --seq-len {T}: the demo runs at most {limit} tokens "
                                f"{'on a GPU' if on_gpu else 'through the CPU interpreter'}",
                        hint=f"use --seq-len {limit} or less (nsa-dsl bench times long sequences on a GPU)")
    HQ = spec.heads or (64 if on_gpu else 16)
    H = spec.kv_heads or (4 if on_gpu else 1)
    declared = spec
    if not on_gpu:  # keep the interpreter run under a minute
        HQ, H = min(HQ, 16), max(1, min(H, 16) * min(HQ, 16) // HQ)
        spec = _shrink(spec, HQ, H)
    Dqk, Dv = spec.qk_dim or 128, spec.v_dim or 128
    emit(f"spec      {path} :: {spec.name} ({', '.join(b.name + '=' + b.kind for b in spec.branches)}, "
         f"output {spec.output.kind})")
    emit(f"inputs    B=1 T={T} HQ={HQ} H={H} Dqk={Dqk} Dv={Dv} {str(dtype).replace('torch.', '')} on {device}"
         + ("" if on_gpu else " (Triton interpreter)"))
    ran = {"heads": HQ, "kv_heads": H, "qk_dim": Dqk, "v_dim": Dv}
    shrunk = [f for f in ran if getattr(declared, f) is not None and getattr(declared, f) != ran[f]]
    if shrunk:
        emit(f"shapes    the spec declares {', '.join(f'{f}={getattr(declared, f)}' for f in shrunk)}; this CPU "
             f"run uses {', '.join(f'{f}={ran[f]}' for f in shrunk)} so that the interpreter finishes in "
             "about a minute (on a GPU, `nsa-dsl demo --device cuda` runs the declared shapes)")
    undeclared = [f for f in ran if getattr(declared, f) is None]
    if undeclared:
        emit(f"shapes    {', '.join(f'{f}={ran[f]}' for f in undeclared)}: not declared by the spec, "
             "bound from the demo's tensors")

    g = torch.Generator(device="cpu").manual_seed(0)
    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()
    q, k, v = rnd(1, T, HQ, Dqk), rnd(1, T, H, Dqk), rnd(1, T, H, Dv)
    C = len(spec.output.branches)
    gates = torch.rand(1, T, HQ, C, generator=g).to(device=device, dtype=dtype).requires_grad_() \
        if spec.output.kind == "gate" else None
    compressed = {}
    from nsa_dsl.runtime.op import mean_pool
    for b in spec.of_kind("compress"):
        if b.pool != "mean":  # a learned pool's output; the module owns the real one
            compressed[b.name] = (mean_pool(k, b.block, b.stride), mean_pool(v, b.block, b.stride))
    if compressed:
        emit(f"note      learned pooling ({', '.join(compressed)}) is the module's job; the demo passes "
             "mean-pooled keys as caller-supplied compressed keys")

    t0 = time.perf_counter()
    op = nsa_dsl.compile(spec)
    o = op(q, k, v, gates, compressed=compressed or None)
    t1 = time.perf_counter()
    plan, _ = op._kernels(op.binding(heads=HQ, kv_heads=H, qk_dim=Dqk, v_dim=Dv))
    emit(f"kernels   {len(plan.kernels)} generated modules in {op.cache.entry(plan)}")
    for kp in plan.kernels:
        emit(f"            {kp.name}.py  ({kp.template})")
    do = torch.randn(o.shape, generator=g).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(o, [x for x in (q, k, v, gates) if x is not None], do)
    if on_gpu:
        torch.cuda.synchronize()
    t2 = time.perf_counter()

    def f64(x):
        return None if x is None else x.detach().double().requires_grad_()
    q64, k64, v64, g64 = f64(q), f64(k), f64(v), f64(gates)
    c64 = {n: (mean_pool(k64, spec.branch(n).block, spec.branch(n).stride),
               mean_pool(v64, spec.branch(n).block, spec.branch(n).stride)) for n in compressed}
    _, aux = op(q.detach(), k.detach(), v.detach(), None if gates is None else gates.detach(),
                compressed=compressed or None, return_aux=True)
    selection = {n: i.long() for n, i in aux.indices.items()}
    o_ref = reference(spec, q64, k64, v64, g64, compressed=c64 or None, indices=selection)
    ref_grads = torch.autograd.grad(o_ref, [x for x in (q64, k64, v64, g64) if x is not None], do.double())
    if selection:
        _, aux_ref = reference(spec, q64.detach(), k64.detach(), v64.detach(),
                               None if g64 is None else g64.detach(), compressed=c64 or None, return_aux=True)
        for n, idx in selection.items():
            same = (idx.cpu() == aux_ref.indices[n].long().cpu()).all(-1).float().mean().item()
            emit(f"selection {n}: {100 * same:.1f}% of (query, kv head) rows choose the same blocks "
                 "as the float64 reference")
    emit(f"forward   rel. error vs float64 reference: {_rel(o, o_ref):.2e}")
    for name, a, b in zip(("dq", "dk", "dv", "dgates"), grads, ref_grads):
        emit(f"backward  {name:<6} rel. error: {_rel(a, b):.2e}")
    if on_gpu:
        from triton.testing import do_bench
        fwd_ms = do_bench(lambda: op(q, k, v, gates, compressed=compressed or None))
        emit(f"timing    forward {fwd_ms:.3f} ms (do_bench median)")
    else:
        emit(f"timing    first forward (render + load + run) {t1 - t0:.1f} s; backward {t2 - t1:.1f} s "
             "(interpreter: correctness, not speed)")
    flags = "".join(f" --{f.replace('_', '-')} {ran[f]}" for f in undeclared)
    name = f" --name {declared.name}" if getattr(args, "name", None) else ""
    emit(f"source    `nsa-dsl compile {path}{name} --emit DIR{flags}` writes the generated Triton and the plan "
         f"to DIR ({'for the declared shapes; ' if shrunk else ''}in Python: print(op.source('all')) after a call)")
    dec_err = _demo_decode(spec, q.detach(), k.detach(), v.detach(), None if gates is None else gates.detach(),
                           selection, (q64, k64, v64, g64, c64), emit)
    worst = max([_rel(o, o_ref), dec_err] + [_rel(a, b) for a, b in zip(grads, ref_grads)])
    tol = 2e-2 if on_gpu else 1e-4
    emit(f"result    {'OK' if worst < tol else 'MISMATCH'} (worst rel. error {worst:.2e}, tolerance {tol:.0e})")
    return 0 if worst < tol else 1


def _demo_decode(spec, q, k, v, gates, selection, ref_inputs, emit, steps: int = 8) -> float:
    """The inference path on the same inputs: a KV cache prefilled with all but the last ``steps``
    tokens (chunked prefill), then one token per step (the decode kernels); the outputs against the
    float64 reference at those positions, run with the decode's own selected blocks (bf16 may flip
    near-tied choices). Returns the relative error."""
    import torch

    from nsa_dsl.runtime.decoding import DecodeOp
    from nsa_dsl.runtime.kv_cache import NSACache
    from nsa_dsl.semantics.reference import reference
    B, T, HQ, Dqk = q.shape
    H, Dv = k.shape[2], v.shape[3]
    steps = min(steps, T - 1)
    cache = NSACache(spec, B, T, kv_heads=H, qk_dim=Dqk, v_dim=Dv, dtype=q.dtype, device=q.device)

    def pool(name, kb, vb):   # the demo's caller-supplied compressed keys are mean-pooled (see above)
        return kb.mean(1), vb.mean(1)
    dec = DecodeOp(spec)
    outs, idx = [], {n: [] for n in selection}
    t0 = time.perf_counter()
    for a, b in [(0, T - steps)] + [(t, t + 1) for t in range(T - steps, T)]:
        step = cache.append(k[:, a:b], v[:, a:b], pool=pool)
        o, aux = dec(q[:, a:b], cache, step, None if gates is None else gates[:, a:b], return_aux=True)
        if a >= T - steps:
            outs.append(o)
            for n in idx:
                idx[n].append(aux.indices[n])
    if q.is_cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    y = torch.cat(outs, 1)
    sel = {n: i.clone() for n, i in selection.items()}
    for n in sel:
        sel[n][:, T - steps:] = torch.cat(idx[n], 1).to(sel[n].device).long()
    q64, k64, v64, g64, c64 = ref_inputs
    o_ref = reference(spec, q64.detach(), k64.detach(), v64.detach(), None if g64 is None else g64.detach(),
                      compressed={n: (a.detach(), b.detach()) for n, (a, b) in c64.items()} or None, indices=sel)
    err = _rel(y, o_ref[:, T - steps:])
    emit(f"decode    KV cache: prefill {T - steps} tokens, then {steps} steps of one token "
         f"({t1 - t0:.1f} s); rel. error vs float64 reference: {err:.2e}")
    return err


def _shrink(spec, heads, kv_heads):
    """The demo's CPU variant: fewer heads and smaller dims than declared, so the interpreter is quick."""
    from dataclasses import replace
    return replace(spec, heads=heads, kv_heads=kv_heads,
                   qk_dim=min(spec.qk_dim or 64, 64), v_dim=min(spec.v_dim or 32, 32))


def bench_cmd(args, emit=print) -> int:
    """`nsa-dsl bench FILE`: the op beside SDPA (cuDNN, flash) and fla-core's parallel_nsa on one
    GPU, in one run (nsa_dsl.tools.bench): forward and forward+backward across lengths, per-branch
    times, achieved TFLOP/s, peak memory, one or both workloads, one or several GQA groups. A
    progress bar on stderr, a Markdown table through ``emit``, JSON and a PNG on request."""
    import sys
    from dataclasses import replace

    import torch
    if not torch.cuda.is_available():
        raise SpecError("E615", "nsa-dsl bench needs a CUDA GPU, and torch sees none",
                        hint="run it on a GPU machine; `nsa-dsl explain FILE` shows FLOP and bytes without one")
    from nsa_dsl.tools import bench
    if getattr(args, "plot", None):
        bench._import_pyplot()          # a missing matplotlib fails now, not after minutes of timing
    import nsa_dsl

    spec = nsa_dsl.load(args.file, getattr(args, "name", None))
    if getattr(args, "decode", False):
        return _bench_decode(spec, args, emit)
    HQ, kv, Dqk, Dv = _bench_shapes(spec, args)
    lengths = [int(x) for x in str(getattr(args, "lengths", None) or "8192,16384,32768,65536").split(",")]
    B = getattr(args, "batch", None) or 1
    workload = getattr(args, "workload", None) or "random"
    workloads = bench.WORKLOADS if workload == "both" else (workload,)
    requested = getattr(args, "peers", None)
    requested = bench.PEERS if requested is None else tuple(requested)
    peers, notes = bench.available_peers(requested)
    peer_max_len = getattr(args, "peer_max_len", None) or 65536
    backward = not getattr(args, "forward_only", False)
    # The pattern is what is timed; the shapes come from the options (or the spec's, as defaults),
    # so the declared ones are dropped and the op binds from the tensors of each case.
    op = nsa_dsl.compile(replace(spec, heads=None, kv_heads=None, qk_dim=None, v_dim=None))

    from tqdm import tqdm
    bar = tqdm(total=bench.count_steps(lengths, workloads=workloads, kv_heads=kv, peers=peers,
                                       backward=backward, peer_max_len=peer_max_len),
               desc="bench", unit="step", file=sys.stderr, dynamic_ncols=True)
    try:
        rows = bench.bench_spec(op, lengths, B=B, HQ=HQ, H=kv, Dqk=Dqk, Dv=Dv, workloads=workloads,
                                peers=peers, peer_max_len=peer_max_len, backward=backward, progress=bar)
    finally:
        bar.close()
    fla_note = bench.load_fla()[1] if "fla" in requested else "not requested"
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "spec": str(args.file), "spec_name": spec.name,
            "B": B, "HQ": HQ, "kv_heads": list(kv), "Dqk": Dqk, "Dv": Dv, "dtype": "bfloat16",
            "workloads": list(workloads), "peers": list(peers), "peer_max_len": peer_max_len,
            "backward": backward, "fla": fla_note,
            "fla_config": dict(bench.FLA_CONFIG) if "fla" in peers else None,
            "flop": "useful forward FLOP from nsa_dsl.language.cost.cost; backward 2.5x the attention "
                    "branches' forward, scoring forward only; dense SDPA: causal, 3.5x forward for fwd+bwd",
            "local_workload": {"drift": bench.LOCAL_DRIFT, "key_noise": bench.LOCAL_KEY_NOISE,
                               "q_share": bench.LOCAL_Q_SHARE, "q_noise": bench.LOCAL_Q_NOISE},
            "memory": "peak GiB (2^30 bytes) beyond the inputs (inputs_gib), outputs and gradients included"}
    shapes = f"B={B} HQ={HQ} H={','.join(map(str, kv))} Dqk={Dqk} Dv={Dv} bf16"
    emit(f"{meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  spec {args.file} ({spec.name})  "
         f"{shapes}  workload {'+'.join(workloads)}  ms (median)")
    for note in notes:
        emit(f"note: {note}; its columns are left out")
    emit(bench.markdown_table(rows))
    return _bench_outputs(args, meta, rows, bench.plot_rows, f"{spec.name} on {meta['gpu']}: {shapes}", emit)


def _bench_shapes(spec, args):
    """(HQ, kv heads tuple, Dqk, Dv) of `nsa-dsl bench`: the options, else the spec's, else 64 / 4 / 128."""
    dim = getattr(args, "dim", None)
    HQ = getattr(args, "heads", None) or spec.heads or 64
    kv = getattr(args, "kv_heads", None) or spec.kv_heads or 4
    kv = (kv,) if isinstance(kv, int) else tuple(kv)
    Dqk = getattr(args, "qk_dim", None) or dim or spec.qk_dim or 128
    Dv = getattr(args, "v_dim", None) or dim or spec.v_dim or 128
    for h in kv:
        if HQ % h:
            raise SpecError("E617", f"{HQ} query heads are not a multiple of {h} kv heads",
                            hint="pick --kv-heads that divide --heads, e.g. --heads 32 --kv-heads 4,8")
    return HQ, kv, Dqk, Dv


def _bench_decode(spec, args, emit) -> int:
    """`nsa-dsl bench FILE --decode`: decoding steps (``--q-len`` new tokens per sequence; more than
    one: speculative decoding) over a contiguous and a paged cache (``--page-size``, default 64)
    against SDPA over the whole cache, at each cache length, batch (``--batch``, else 1, 8 and 64)
    and kv head count."""
    import sys
    from dataclasses import replace

    import torch
    from tqdm import tqdm

    from nsa_dsl.tools import bench
    from nsa_dsl.tools.decode_bench import decode_bench, table_keys
    HQ, kv, Dqk, Dv = _bench_shapes(spec, args)
    lengths = [int(x) for x in str(getattr(args, "lengths", None) or "4096,16384,65536,131072").split(",")]
    batches = (args.batch,) if getattr(args, "batch", None) else (1, 8, 64)
    q_len = getattr(args, "q_len", None) or 1
    page_size = getattr(args, "page_size", None) or 64
    # the shapes come from the options (the spec's as defaults): the declared ones are dropped
    spec = replace(spec, heads=None, kv_heads=None, qk_dim=None, v_dim=None)
    bar = tqdm(total=len(lengths) * len(batches) * len(kv), desc="decode", unit="case", file=sys.stderr,
               dynamic_ncols=True)
    rows = []
    try:
        for H in kv:
            for T in lengths:
                for B in batches:
                    rows += decode_bench(spec, [T], [B], HQ=HQ, H=H, Dqk=Dqk, Dv=Dv, q_len=q_len,
                                         page_size=page_size, progress=lambda m: bar.set_postfix_str(m))
                    bar.update(1)
    finally:
        bar.close()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "spec": str(args.file), "spec_name": spec.name,
            "HQ": HQ, "kv_heads": list(kv), "Dqk": Dqk, "Dv": Dv, "q_len": q_len, "dtype": "bfloat16",
            "page_size": page_size,
            "timing": "median ms per step (triton.testing.do_bench); nsa: the contiguous cache, paged: a "
                      "paged one (pages in a shuffled order); step: append + decode launched from Python "
                      "(DecodeRunner, the serving path); kernel: the decode kernels alone; graph: the decode "
                      "kernels replayed from a CUDA graph; step_graph: the whole step replayed; speedup: the "
                      "faster SDPA backend / nsa_kernel_ms; python_vs_graph: step / step_graph; "
                      "paged_vs_contiguous: paged / contiguous step_graph (fields: decode_bench's docstring)"}
    keys = table_keys(rows)
    emit(f"{meta['gpu']}  torch {meta['torch']}  spec {args.file}  HQ={HQ} H={','.join(map(str, kv))} "
         f"Dqk={Dqk} Dv={Dv} q_len={q_len} page_size={page_size} bf16  (decode: ms per step, then ratios)")
    emit(f"columns: {meta['timing']}")
    emit("| B | H | cache | " + " | ".join(k.removesuffix("_ms") for k in keys) + " |")
    emit("|" + "---|" * (len(keys) + 3))
    for r in rows:
        emit(f"| {r.get('B', '-')} | {r.get('H', '-')} | {r.get('T', '-')} | "
             + " | ".join(f"{r[k]:.4f}" if isinstance(r.get(k), float) else "-" for k in keys) + " |")
    return _bench_outputs(args, meta, rows, bench.plot_decode, f"{spec.name} on {meta['gpu']}: decoding", emit)


def _bench_outputs(args, meta, rows, plot, title, emit) -> int:
    """Write a bench's --json (meta and rows) and --plot when asked for."""
    import json
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        emit(f"wrote {args.json}")
    if getattr(args, "plot", None):
        plot(rows, args.plot, title=title)
        emit(f"wrote {args.plot}")
    return 0


class _PhaseBar:
    """A tqdm bar on stderr over work in phases of estimated length (``show.Estimate.phases``).
    A phase that reports its own progress moves the bar through the callback ``phase`` yields;
    during one that cannot (a single reference run), a thread moves it at the estimated pace,
    never past 95% of the phase until the phase ends. ``enabled=False``: no bar, no thread."""

    STEPS = 1000

    def __init__(self, phases, enabled: bool, desc: str):
        import threading

        from tqdm import tqdm
        self.phases = dict(phases)
        self.total = sum(self.phases.values()) or 1.0
        self.enabled = enabled
        self.done = 0.0                       # share of the estimate behind the current phase
        self.lock = threading.Lock()
        self.bar = tqdm(total=self.STEPS, desc=desc, file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")

    def _move(self, share: float) -> None:
        with self.lock:
            n = min(self.STEPS, int(share * self.STEPS))
            if n > self.bar.n:
                self.bar.update(n - self.bar.n)

    def phase(self, name: str):
        import contextlib
        import threading
        bar = self

        @contextlib.contextmanager
        def run():
            begin, est = bar.done, bar.phases.get(name, 0.0)
            width = est / bar.total
            stop, thread = threading.Event(), None
            if bar.enabled:
                bar.bar.set_postfix_str(name)
                t0 = time.perf_counter()

                def tick():
                    while not stop.wait(0.25):
                        bar._move(begin + width * min(0.95, (time.perf_counter() - t0) / max(est, 1e-9)))
                thread = threading.Thread(target=tick, daemon=True)
                thread.start()
            try:
                yield lambda share: bar._move(begin + width * min(1.0, share))
            finally:
                stop.set()
                if thread is not None:
                    thread.join()
                bar.done = begin + width
                bar._move(bar.done)
        return run()

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} minutes"


def show_cmd(args, emit=print) -> int:
    """`nsa-dsl show FILE --seq-len T [--out PNG] [--from-model CKPT] [--force]`: a PNG of the keys
    each query attends, per branch (logic in nsa_dsl.tools.show). The work is estimated first
    (``show.estimate``): past ``show.REFUSE_SECONDS`` it refuses without ``--force``, past
    ``show.WARN_SECONDS`` it warns, past ``show.PROGRESS_SECONDS`` a progress bar runs on stderr."""
    import nsa_dsl
    from nsa_dsl.tools import show

    spec = nsa_dsl.load(args.file, getattr(args, "name", None))
    T = int(args.seq_len)
    show._import_pyplot()                 # a missing matplotlib fails before any work
    from_model = getattr(args, "from_model", None)
    model = show.checkpoint_shapes(from_model) if from_model else None
    cost = show.estimate(spec, T, model=model)
    if cost.seconds > show.REFUSE_SECONDS and not getattr(args, "force", False):
        quick = show.longest_within(spec, show.WARN_SECONDS, model=model)
        quick = int(float(f"{quick:.2g}")) if quick >= 100 else quick     # a round number
        raise SpecError("E631", f"show --seq-len {T} is about {_duration(cost.seconds)} of work on a "
                                f"2-core CPU (the most: {cost.heaviest})",
                        hint=f"a smaller --seq-len (up to about {quick} takes under "
                             f"{show.WARN_SECONDS:.0f} s), or --force to run it anyway")
    if cost.seconds > show.WARN_SECONDS:
        print(f"nsa-dsl show: --seq-len {T} is about {_duration(cost.seconds)} of work on a 2-core CPU "
              f"(the most: {cost.heaviest}); a smaller --seq-len is quicker", file=sys.stderr)
    bar = _PhaseBar(cost.phases, enabled=cost.seconds > show.PROGRESS_SECONDS, desc=f"show T={T}")
    try:
        marks = None
        if from_model:
            with bar.phase("selection"):
                indices, note, marks = show.model_selection(spec, T, from_model,
                                                            layer=getattr(args, "layer", None) or 0)
        elif spec.of_kind("select"):
            with bar.phase("selection"):
                indices, note = show.random_selection(spec, T)
        else:
            indices, note = None, "static pattern"
        with bar.phase("masks") as done:
            masks = show.attention_masks(spec, T, indices, size=show.DEFAULT_SIZE, progress=done)
        with bar.phase("key counts"):
            stats = show.keys_per_query(spec, T, indices)
        out = getattr(args, "out", None) or f"show_{spec.name}_T{T}.png"
        dense = f"dense causal: {(T + 1) / 2:.1f}" if spec.causal else f"dense: {T}"
        title = (f"{spec.name}: keys attended per query, T = {T} ({dense} keys "
                 f"per query on average)\n{note}" + ("\ncircles: each answer's query (row) and the value it must retrieve (column)" if marks else ""))
        with bar.phase("picture"):
            path = show.render_png(spec, masks, T, out, title=title, stats=stats, marks=marks)
    finally:
        bar.close()
    emit(f"wrote {path}")
    return 0


def _tune_table(results) -> list[str]:
    """Per tuned kernel kind: the heuristic's time, the winner's, the speedup and the winner."""
    lines = [f"  {'kernel':<20} {'kind':<5} {'default ms':>10} {'best ms':>9} {'speedup':>7}  config"]
    for r in results:
        cfg = " ".join(f"{key}={val}" for key, val in r.config.items()) or "(the heuristic)"
        note = f"{r.tried} tried" + (f", {len(r.failed)} failed" if r.failed else "")
        lines.append(f"  {r.module.split('/', 1)[-1]:<20} {r.kind:<5} {r.default_ms:>10.3f} {r.best_ms:>9.3f} "
                     f"{r.speedup:>6.2f}x  {cfg}  ({note})")
    return lines


def tune_cmd(args, emit=print) -> int:
    """`nsa-dsl tune FILE [--lengths ...]`: time every kernel's config space on this GPU, forward
    and backward, on random inputs of each length, and store the fastest configs beside the
    kernel cache (nsa_dsl.codegen.tuning), where every later op call on this GPU finds them."""
    import torch

    from nsa_dsl.codegen import tuning
    if tuning.interpreted() or not torch.cuda.is_available():
        why = ("TRITON_INTERPRET=1 runs the kernels on the CPU" if tuning.interpreted()
               else "torch sees none")
        raise SpecError("E616", f"autotuning needs a CUDA GPU; {why} (untuned kernels run their "
                                "heuristic configs)", hint="run `nsa-dsl tune FILE` on a GPU machine")
    import nsa_dsl
    from nsa_dsl.tools.random_inputs import side_inputs

    spec = nsa_dsl.load(args.file, getattr(args, "name", None))
    op = nsa_dsl.compile(spec)
    HQ, kv, Dqk, Dv = _bench_shapes(spec, args)
    H = kv[0]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[getattr(args, "dtype", None) or "bf16"]
    B = getattr(args, "batch", None) or 1
    lengths = getattr(args, "lengths", None) or (8192, 16384, 32768, 65536)
    backward = getattr(args, "backward", True)
    gpu = torch.cuda.get_device_name()
    emit(f"{gpu}  torch {torch.__version__}  triton {__import__('triton').__version__}  spec {args.file} "
         f"({spec.name})  B={B} HQ={HQ} H={H} Dqk={Dqk} Dv={Dv} {str(dtype).replace('torch.', '')}  "
         f"{'forward + backward' if backward else 'forward'}")
    for T in lengths:
        g = torch.Generator(device="cuda").manual_seed(0)

        def rnd(*shape):
            return torch.randn(*shape, generator=g, device="cuda", dtype=dtype)
        q, k, v = rnd(B, T, HQ, Dqk), rnd(B, T, H, Dqk), rnd(B, T, H, Dv)
        gates = torch.rand(B, T, HQ, len(spec.output.branches), generator=g, device="cuda", dtype=dtype) \
            if spec.output.kind == "gate" else None
        compressed, index = side_inputs(spec, k, v, g)
        t0 = time.perf_counter()
        results = op.tune(q, k, v, gates, backward=backward, compressed=compressed or None, index=index or None)
        emit(f"\nT = {T} (bucket B*T <= {tuning.bucket(B * T)}): {time.perf_counter() - t0:.1f} s")
        for line in _tune_table(results):
            emit(line)
        del q, k, v, gates, compressed, index
        torch.cuda.empty_cache()
    emit(f"\nstored in {tuning.store_path(gpu, op.cache.directory)}")
    return 0
