"""Train a byte-level code language model on the Python standard library: full attention vs NSA.

The text is the standard library's own ``.py`` source, which every Python installation carries
(found through ``sysconfig``; ``--data DIR`` reads another folder's ``*.py`` files instead). Files
are split into train and validation by a hash of their path (``--val-percent``, default 5%), so
validation bytes come from files the model never saw. Each file is a byte sequence behind a BOS
token (id 256); the vocabulary is the 256 byte values and BOS.

The model is a transformers Llama (RMSNorm, SwiGLU, RoPE, GQA) trained twice from the same
initial weights on the same batches: once with full causal attention (PyTorch SDPA, transformers'
``attn_implementation="sdpa"``) and once converted to NSA by
``nsa_dsl.integrations.transformers.convert`` (the spec's branches on the same projections).
For every ``--seq-len`` (default 8192 and 16384 on CUDA) it reports, per model:

* validation bits per byte (bpb) over steps and over training wall clock (a curve point every
  ``--eval-every`` steps, on ``--eval-windows`` fixed windows of the held-out files);
* training tokens/s and peak GPU memory;
* a long-range probe: bpb on the second half of the first ``T`` bytes of each held-out file of
  at least ``T`` bytes (``--probe-files`` of them), where distant context in the same file
  helps; the first half's bpb is given alongside;

and then ``generate()`` throughput on prompts of ``--gen-prompt`` bytes (default 32768 on CUDA)
with ``--gen-tokens`` new tokens, at each ``--gen-batch`` (default 1 and 16 on CUDA), both models
in bf16: prefill seconds, decode tokens/s (the NSA model decodes through its NSA KV cache, the
SDPA model through transformers' DynamicCache), peak memory. Everything goes to ``--log-json``, the curves to a PNG (``--plot``, default next to the
JSON), progress to tqdm bars on stderr.

    python examples/train_code_lm.py                                  # CPU: a few steps, small sizes
    python examples/train_code_lm.py --device cuda --max-time 300 --log-json code.json
        # CUDA defaults: T = 8192 and 16384, 600 steps of 65536 tokens, 8 layers, hidden 512, 8 heads
        # (head dim 64), 2 kv heads; spec examples/nsa_paper_mean.nsa; a 32k-byte generate() prompt
    python examples/train_code_lm.py --device cuda --steps 0 --seq-len 8192   # generate() timing only

The schedule: linear warmup (``--warmup``), cosine decay to 10% at ``--steps`` or at
``--max-time`` seconds of training, whichever comes first (as train_tiny_lm.py). On CUDA one
forward/backward pass before the clock starts compiles the NSA kernels; evaluation time is not
on the clock.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

try:  # the repository root on sys.path when the script runs from a source checkout
    import nsa_dsl
except ModuleNotFoundError:  # pragma: no cover
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import nsa_dsl

try:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.generation.streamers import BaseStreamer
    from nsa_dsl.integrations import transformers as nsa_tf
except ImportError as e:  # pragma: no cover
    raise SystemExit(f"this example needs transformers 5.x: pip install 'nsa-dsl[transformers]' ({e})")

from tqdm.auto import tqdm

LOG_FORMAT = "nsa-dsl/train_code_lm/log"
BOS = 256                        # file start; bytes are 0..255
VOCAB = 257
LN2 = math.log(2.0)
PAPER_SPEC = Path(__file__).with_name("nsa_paper_mean.nsa")   # l = 32, d = 16, l' = 64, n = 16, w = 512
# The same pattern scaled down for the short sequences of CPU runs (T < 1024).
SMALL_SPEC = """\
attention code_small {
    causal = true
    branch cmp = compress(block = 8, stride = 4, pool = mean)
    branch slc = select(block = 8, top_k = 4, score = cmp, keep_first = 1, keep_last = 1)
    branch swa = window(size = 16)
    output = gate(sigmoid, cmp, slc, swa)
}
"""


# ------------------------------------------------------------------------------------ data

def stdlib_root() -> Path:
    """The standard library's source folder of this Python (``sysconfig``'s ``stdlib`` path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def find_sources(root: Path, ext: str = ".py") -> list[Path]:
    """Every ``*ext`` file under ``root`` (sorted; ``site-packages`` and ``__pycache__`` left out:
    installed packages are not the standard library)."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        out += [Path(folder) / f for f in sorted(files) if f.endswith(ext)]
    return out


def is_val(rel: str, val_percent: float) -> bool:
    """The held-out split, by file: a hash of the path relative to the root (the same split on
    every machine that has the file)."""
    return zlib.crc32(rel.encode()) % 10_000 < val_percent * 100


@dataclass
class Corpus:
    """Train and validation token streams (int16: bytes and BOS), the validation files apart."""
    root: str
    train: torch.Tensor
    val: torch.Tensor
    val_files: list = field(default_factory=list)      # (relative path, int16 tokens of the bytes)
    train_files: int = 0

    @property
    def sizes(self) -> dict:
        return {"root": self.root, "files_train": self.train_files, "files_val": len(self.val_files),
                "bytes_train": int((self.train != BOS).sum()), "bytes_val": int((self.val != BOS).sum())}


def load_corpus(root: Path, val_percent: float = 5.0, max_files: Optional[int] = None, ext: str = ".py") -> Corpus:
    files = find_sources(root, ext)
    if max_files:
        files = files[:max_files]
    docs = []
    for path in files:
        data = path.read_bytes()
        if data:
            docs.append((path.relative_to(root).as_posix(), torch.frombuffer(bytearray(data), dtype=torch.uint8)))
    if len(docs) < 2:
        raise SystemExit(f"error: {root} holds {len(docs)} non-empty {ext} file(s); the split needs at least 2 "
                         f"(pass --data DIR with more)")
    val = [is_val(rel, val_percent) for rel, _ in docs]
    if not any(val) or all(val):           # tiny folders: one file goes to the other side
        i = min(range(len(docs)), key=lambda j: zlib.crc32(docs[j][0].encode()))
        val = [j == i for j in range(len(docs))]

    def stream(parts):
        return torch.cat([t for _, b in parts for t in (torch.tensor([BOS], dtype=torch.int16), b.to(torch.int16))])
    train_docs = [d for d, v in zip(docs, val) if not v]
    val_docs = [d for d, v in zip(docs, val) if v]
    return Corpus(str(root), stream(train_docs), stream(val_docs),
                  [(rel, b.to(torch.int16)) for rel, b in val_docs], len(train_docs))


def windows(stream: torch.Tensor, offsets: Sequence[int], T: int):
    """``(inputs [N, T], targets [N, T])`` int64 from ``stream`` at ``offsets``; BOS targets are -100
    (bits per byte count bytes)."""
    idx = torch.as_tensor(list(offsets), dtype=torch.long)[:, None] + torch.arange(T + 1)
    seq = stream[idx].long()
    targets = seq[:, 1:].clone()
    targets[targets == BOS] = -100
    return seq[:, :-1], targets


def train_batch(corpus: Corpus, batch: int, T: int, g: torch.Generator):
    hi = corpus.train.numel() - T - 1
    if hi <= 0:
        raise SystemExit(f"error: the training text ({corpus.train.numel()} tokens) is shorter than --seq-len {T}")
    return windows(corpus.train, torch.randint(0, hi, (batch,), generator=g).tolist(), T)


def eval_offsets(corpus: Corpus, n: int, T: int) -> list[int]:
    hi = corpus.val.numel() - T - 1
    if hi <= 0:
        raise SystemExit(f"error: the held-out text ({corpus.val.numel()} tokens) is shorter than --seq-len {T}; "
                         f"raise --val-percent or lower --seq-len")
    return sorted({int(i * hi / max(n - 1, 1)) for i in range(n)})


def probe_windows(corpus: Corpus, T: int, n: int):
    """The long-range probe's inputs: ``[BOS] + the first T bytes`` of each held-out file of at
    least ``T`` bytes (the first ``n``, longest first)."""
    long_files = sorted((b for _, b in corpus.val_files if b.numel() >= T), key=lambda b: -b.numel())[:n]
    if not long_files:
        return None
    seq = torch.stack([torch.cat([torch.tensor([BOS], dtype=torch.int16), b[:T]]) for b in long_files]).long()
    return seq[:, :-1], seq[:, 1:]


# ----------------------------------------------------------------------------------- model

@dataclass
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    max_len: int
    rope_theta: float = 500_000.0

    def config(self) -> LlamaConfig:
        return LlamaConfig(vocab_size=VOCAB, hidden_size=self.hidden, intermediate_size=_ffn(self.hidden),
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, max_position_embeddings=self.max_len,
                           rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                           tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=None, pad_token_id=None,
                           attn_implementation="sdpa")


def _ffn(hidden: int) -> int:
    """SwiGLU width: 8/3 of the hidden size, a multiple of 64."""
    return 64 * math.ceil(8 * hidden / 3 / 64)


def make_model(shape: ModelShape, attn: str, spec, seed: int, device, backend: str = "auto"):
    """The Llama model; the NSA one is the same initial model, converted."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(shape.config())
    if attn == "nsa":
        nsa_tf.convert(model, spec, backend=backend)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(device)


def to_bf16(model):
    """The model in bfloat16 for generation, its rotary frequencies kept in float32 (as
    transformers loads them): positions up to 32k need more than bf16's 8 bits of mantissa."""
    rotary = model.model.rotary_emb
    keep = {n: b.clone() for n, b in rotary.named_buffers()}
    model = model.to(torch.bfloat16)
    for n, b in keep.items():
        setattr(rotary, n, b)
    return model


def _autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_sums(model, inputs, targets, device, mask=None):
    """Summed cross entropy (nats) and the count of scored bytes; ``mask [N, T]`` restricts them."""
    with _autocast(device):
        logits = model(input_ids=inputs.to(device), use_cache=False).logits
    targets = targets.to(device)
    if mask is not None:
        targets = targets.masked_fill(~mask.to(device), -100)
    ce = F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100, reduction="sum")
    return ce, int((targets != -100).sum())


@torch.no_grad()
def bits_per_byte(model, batches, device, mask=None) -> float:
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in batches:
        ce, n = loss_sums(model, inputs, targets, device, None if mask is None else mask[:inputs.shape[0]])
        total, count = total + ce.item(), count + n
    model.train()
    return total / max(count, 1) / LN2


def chunks(x: torch.Tensor, y: torch.Tensor, size: int):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]


# -------------------------------------------------------------------------------- training

def train_one(corpus: Corpus, shape: ModelShape, spec, attn: str, T: int, batch: int, args, device) -> dict:
    """Train one model at sequence length ``T``; returns its curve and summary (and the model)."""
    model = make_model(shape, attn, spec, args.seed, device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    steps, max_time = args.steps, args.max_time
    warmup = max(1, min(args.warmup if args.warmup is not None else max(1, steps // 20), max(steps, 1)))

    def lr_at(step, p_time):
        if step <= warmup:
            return args.lr * step / warmup
        p = min(1.0, max((step - warmup) / max(1, steps - warmup), p_time))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    data = torch.Generator().manual_seed(args.seed + T)            # the same batches for both models
    val = chunks(*windows(corpus.val, eval_offsets(corpus, args.eval_windows, T), T), batch)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    compile_s = 0.0
    if device.type == "cuda" and steps > 0:                          # kernels compile outside the clock
        t0 = time.perf_counter()
        inputs, targets = train_batch(corpus, batch, T, torch.Generator().manual_seed(args.seed + 1))
        ce, n = loss_sums(model, inputs, targets, device)
        (ce / n).backward()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        compile_s = time.perf_counter() - t0

    curve, train_s, timed_s, timed_steps, seen_loss = [], 0.0, 0.0, 0, [0.0, 0]
    p_time, done = 0.0, 0
    model.train()
    bar = tqdm(total=steps, desc=f"{attn} T={T}", unit="step", dynamic_ncols=True, leave=False, disable=args.quiet,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)     # a log file gets a line every 30 s
    for step in range(1, steps + 1):
        inputs, targets = train_batch(corpus, batch, T, data)
        lr = lr_at(step, p_time)
        for group in opt.param_groups:
            group["lr"] = lr
        _sync(device)
        t0 = time.perf_counter()
        ce, n = loss_sums(model, inputs, targets, device)
        loss = ce / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen_loss[0] += loss.item()
        seen_loss[1] += 1
        _sync(device)
        dt = time.perf_counter() - t0
        train_s += dt
        if step > 1:                                   # the first step pays allocator warmup
            timed_s, timed_steps = timed_s + dt, timed_steps + 1
        done = step
        if max_time:
            p_time = train_s / max_time
        stop = bool(max_time) and train_s >= max_time and step < steps
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item() / LN2:.3f} bpb", tok_s=f"{batch * T * step / max(train_s, 1e-9):,.0f}")
        if step % args.eval_every == 0 or step == steps or stop or step == 1:
            point = {"step": step, "train_s": round(train_s, 3), "train_bpb": seen_loss[0] / seen_loss[1] / LN2,
                     "val_bpb": bits_per_byte(model, val, device), "lr": lr}
            seen_loss = [0.0, 0]
            curve.append(point)
            if not args.quiet:
                bar.write(f"{attn} T={T} step {step}: val {point['val_bpb']:.4f} bpb, "
                          f"train {point['train_bpb']:.4f} bpb ({train_s:.1f} s)")
        if stop:
            bar.write(f"{attn} T={T}: --max-time {max_time:g} s reached after {step} of {steps} steps")
            break
    bar.close()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    final = curve[-1]["val_bpb"] if curve else bits_per_byte(model, val, device)
    probe = probe_windows(corpus, T, args.probe_files)
    long_range = None
    if probe is not None:
        second = torch.zeros(probe[0].shape, dtype=torch.bool)
        second[:, T // 2:] = True
        long_range = {"files": probe[0].shape[0], "second_half_bpb": bits_per_byte(model, chunks(*probe, batch), device, second),
                      "first_half_bpb": bits_per_byte(model, chunks(*probe, batch), device, ~second)}
    tps = timed_steps * batch * T / timed_s if timed_s > 0 else (batch * T * done / train_s if train_s else None)
    return {"model": model, "params": params, "steps": done, "train_s": train_s, "compile_s": compile_s,
            "tokens_per_s": tps, "peak_mem_gib": peak, "val_bpb": final, "long_range": long_range,
            "curve": curve, "batch": batch}


# ------------------------------------------------------------------------------ generation

class TokenClock(BaseStreamer):
    """A generate() streamer that only notes when each step's tokens reach the host (the copy
    synchronizes the device): the prompt, then the first new token (after the prefill), then
    one entry per decoding step."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


@torch.no_grad()
def time_generate(model, prompt: torch.Tensor, new_tokens: int, device) -> dict:
    """generate() on ``prompt [B, P]`` after a warmup call (two new tokens, which compiles the
    kernels for these shapes), timed within one call: prefill = start to the first new token,
    decode tokens/s = (new_tokens - 1) * B / (first to last new token)."""
    model.eval()
    prompt = prompt.to(device)
    kw = dict(do_sample=False, use_cache=True)
    model.generate(prompt, max_new_tokens=2, **kw)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    clock = TokenClock()
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock,
                         return_dict_in_generate=True, **kw)
    _sync(device)
    total_s = time.perf_counter() - t0
    first, last = clock.times[1], clock.times[-1]        # times[0]: the prompt, handed over at the start
    cache = getattr(out, nsa_tf.CACHE_ARG)
    B = prompt.shape[0]
    return {"prompt": prompt.shape[1], "batch": B, "new_tokens": new_tokens, "prefill_s": first - t0,
            "total_s": total_s,
            "decode_tokens_per_s": (new_tokens - 1) * B / (last - first) if new_tokens > 1 and last > first else None,
            "tokens_per_s": new_tokens * B / total_s,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "cache": type(cache.layers[0]).__name__ if cache is not None and getattr(cache, "layers", None) else None,
            "tokens": out.sequences[0, prompt.shape[1]:].tolist()}


def gen_prompts(corpus: Corpus, batch: int, length: int) -> torch.Tensor:
    """``[batch, length]``: consecutive windows of the held-out text (repeated if it is short)."""
    n = max(1, min(batch, corpus.val.numel() // length))
    rows = corpus.val[:n * length].long().view(n, length)
    return rows.repeat((batch + n - 1) // n, 1)[:batch]


# ---------------------------------------------------------------------------------- output

def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items() if k != "model"}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_plot(path: str, runs: dict) -> bool:
    """Validation bpb against steps and against training seconds, one row per sequence length."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lengths = sorted(runs)
    fig, axes = plt.subplots(len(lengths), 2, figsize=(11, 3.6 * len(lengths)), squeeze=False)
    for row, T in zip(axes, lengths):
        for attn, r in sorted(runs[T].items()):
            steps = [p["step"] for p in r["curve"]]
            secs = [p["train_s"] for p in r["curve"]]
            bpb = [p["val_bpb"] for p in r["curve"]]
            label = f"{attn} ({r['tokens_per_s'] or 0:,.0f} tok/s)"
            row[0].plot(steps, bpb, marker=".", label=label)
            row[1].plot(secs, bpb, marker=".", label=label)
        row[0].set(xlabel="step", ylabel="validation bits per byte", title=f"T = {T}")
        row[1].set(xlabel="training wall clock (s)", ylabel="validation bits per byte", title=f"T = {T}")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def summary_lines(runs: dict, gen: Optional[dict]) -> list[str]:
    lines = ["", f"{'T':>6} {'attn':>5} {'steps':>6} {'train s':>8} {'tok/s':>10} {'peak GiB':>9} {'val bpb':>8} "
                 f"{'probe 2nd half':>15} {'1st half':>9}"]
    for T in sorted(runs):
        for attn, r in sorted(runs[T].items()):
            lr = r["long_range"] or {}
            lines.append(f"{T:>6} {attn:>5} {r['steps']:>6} {r['train_s']:>8.1f} {r['tokens_per_s'] or 0:>10,.0f} "
                         f"{r['peak_mem_gib'] if r['peak_mem_gib'] is not None else float('nan'):>9.2f} "
                         f"{r['val_bpb']:>8.4f} {lr.get('second_half_bpb', float('nan')):>15.4f} "
                         f"{lr.get('first_half_bpb', float('nan')):>9.4f}")
    if gen:
        lines.append("")
        lines.append(f"generate(): prompt {gen['prompt']} bytes, {gen['new_tokens']} new tokens")
        for B, pair in gen["batches"].items():
            for attn in ("nsa", "sdpa"):
                g = pair.get(attn)
                if g:
                    lines.append(f"  batch {B:>3} {attn:>5}: prefill {g['prefill_s']:.3f} s, decode "
                                 f"{g['decode_tokens_per_s'] or float('nan'):,.1f} tok/s, total {g['tokens_per_s']:,.1f} tok/s"
                                 + (f", peak {g['peak_mem_gib']:.2f} GiB" if g["peak_mem_gib"] is not None else "")
                                 + f" ({g['cache']})")
            if pair.get("nsa") and pair.get("sdpa") and pair["nsa"]["decode_tokens_per_s"] and pair["sdpa"]["decode_tokens_per_s"]:
                lines.append(f"  batch {B:>3}: decode nsa/sdpa "
                             f"{pair['nsa']['decode_tokens_per_s'] / pair['sdpa']['decode_tokens_per_s']:.2f}x, "
                             f"prefill sdpa/nsa {pair['sdpa']['prefill_s'] / pair['nsa']['prefill_s']:.2f}x")
    return lines


# ------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--data", metavar="DIR", help="read DIR's *.py files instead of the standard library's")
    p.add_argument("--val-percent", type=float, default=5.0, help="held-out files, percent (by path hash)")
    p.add_argument("--max-files", type=int, default=None, help="use the first N files only (sorted by path)")
    p.add_argument("--seq-len", type=int, nargs="+", default=None,
                   help="sequence lengths, each trained for both models (default 8192 16384 on cuda, 128 on cpu)")
    p.add_argument("--attn", choices=("both", "nsa", "sdpa"), default="both", help="which models to train")
    p.add_argument("--spec", metavar="FILE", help="an .nsa spec (default examples/nsa_paper_mean.nsa; "
                                                   "a scaled-down one below T = 1024)")
    p.add_argument("--spec-name", metavar="NAME", help="the attention block of --spec to use")
    p.add_argument("--layers", type=int, default=None, help="default 8 on cuda, 2 on cpu")
    p.add_argument("--hidden", type=int, default=None, help="default 512 on cuda, 64 on cpu")
    p.add_argument("--heads", type=int, default=None, help="default 8 on cuda, 4 on cpu (head dim hidden/heads)")
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per model (default 600 on cuda: about "
                                                           "1.3 passes over the standard library; 6 on cpu); 0: no "
                                                           "training (generate() timing only)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per step at every T: batch = batch_tokens // T (default 65536 on cuda)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (overrides --batch-tokens)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, betas 0.9/0.95, wd 0.1)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default steps/20)")
    p.add_argument("--max-time", type=float, default=None, metavar="SECONDS",
                   help="stop training each model after this many seconds of training")
    p.add_argument("--eval-every", type=int, default=None, help="steps between validation points (default "
                                                                "50 on cuda, 3 on cpu)")
    p.add_argument("--eval-windows", type=int, default=None, help="validation windows of T (default 32 on cuda, 2 on cpu)")
    p.add_argument("--probe-files", type=int, default=None, help="held-out files of >= T bytes in the long-range "
                                                                 "probe (default 32 on cuda, 4 on cpu)")
    p.add_argument("--gen-prompt", type=int, default=None, help="generate() prompt bytes (default 32768 on cuda, "
                                                                "96 on cpu; 0: no generate() timing)")
    p.add_argument("--gen-tokens", type=int, default=None, help="new tokens (default 256 on cuda, 4 on cpu)")
    p.add_argument("--gen-batch", type=int, nargs="+", default=None,
                   help="prompts per generate() call, each timed (default 1 16 on cuda: one sequence, and a batch "
                        "where reading the KV cache dominates a decoding step; 1 on cpu)")
    p.add_argument("--log-json", metavar="FILE", help="write curves, summaries and generate() timings as JSON")
    p.add_argument("--plot", metavar="PNG", help="the curves as a PNG (default: --log-json with .png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on cpu; restored after)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-eval lines")
    return p


def _defaults(args) -> None:
    cuda = args.device == "cuda"
    for name, gpu, cpu in (("seq_len", [8192, 16384], [128]), ("layers", 8, 2), ("hidden", 512, 64), ("heads", 8, 4),
                           ("steps", 600, 6), ("eval_every", 50, 3), ("eval_windows", 32, 2),
                           ("probe_files", 32, 4), ("gen_prompt", 32768, 96), ("gen_tokens", 256, 4),
                           ("batch_tokens", 65536, 256), ("gen_batch", [1, 16], [1])):
        if getattr(args, name) is None:
            setattr(args, name, gpu if cuda else cpu)


def main(argv: Optional[Sequence[str]] = None, log=print) -> dict:
    args = build_parser().parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available")
    _defaults(args)
    device = torch.device(args.device)
    if args.hidden % args.heads or args.heads % args.kv_heads:
        raise SystemExit(f"error: --hidden {args.hidden} must be a multiple of --heads {args.heads}, and --heads of "
                         f"--kv-heads {args.kv_heads}")
    lengths = sorted(set(args.seq_len))
    if args.spec:
        spec = nsa_dsl.load(args.spec, args.spec_name)
    else:
        spec = nsa_dsl.parse(SMALL_SPEC) if max(lengths) < 1024 else nsa_dsl.load(PAPER_SPEC)
    root = Path(args.data) if args.data else stdlib_root()
    threads = torch.get_num_threads()
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    try:
        corpus = load_corpus(root, args.val_percent, args.max_files)
        shape = ModelShape(args.layers, args.hidden, args.heads, args.kv_heads,
                           max_len=max(lengths + [args.gen_prompt + args.gen_tokens]))
        log(f"data: {root}: {corpus.sizes['files_train']} train files ({corpus.sizes['bytes_train']:,} bytes), "
            f"{corpus.sizes['files_val']} held-out files ({corpus.sizes['bytes_val']:,} bytes)")
        log(f"model: Llama, {args.layers} layers, hidden {args.hidden}, heads {args.heads} (head dim "
            f"{args.hidden // args.heads}), kv heads {args.kv_heads}, vocab {VOCAB} (bytes + BOS); on {device}")
        log(f"nsa: spec {spec.name} ({', '.join(f'{b.name}={b.kind}' for b in spec.branches)}); sdpa: full causal")
        attns = ["nsa", "sdpa"] if args.attn == "both" else [args.attn]
        runs: dict = {}
        last: dict = {}
        for T in lengths:
            batch = args.batch or max(1, args.batch_tokens // T)
            runs[T] = {}
            for attn in attns:
                if args.steps == 0:
                    break
                log(f"== {attn}, T = {T}, batch {batch} ({batch * T:,} tokens a step), {args.steps} steps"
                    + (f" or {args.max_time:g} s" if args.max_time else ""))
                r = train_one(corpus, shape, spec, attn, T, batch, args, device)
                last[attn] = r.pop("model")
                runs[T][attn] = r
                lr = r["long_range"]
                log(f"{attn} T={T}: val {r['val_bpb']:.4f} bpb after {r['steps']} steps ({r['train_s']:.1f} s), "
                    f"{r['tokens_per_s'] or 0:,.0f} tok/s"
                    + (f", peak {r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else "")
                    + (f"; long-range probe ({lr['files']} files): 2nd half {lr['second_half_bpb']:.4f} bpb, "
                       f"1st half {lr['first_half_bpb']:.4f}" if lr else "; no held-out file is that long (no probe)"))
            if not runs[T]:
                del runs[T]
        gen = None
        if args.gen_prompt and args.gen_tokens:
            if corpus.val.numel() < args.gen_prompt:
                raise SystemExit(f"error: --gen-prompt {args.gen_prompt} exceeds the held-out text ({corpus.val.numel()} tokens)")
            gen = {"prompt": args.gen_prompt, "new_tokens": args.gen_tokens,
                   "trained_at": lengths[-1] if last else None, "batches": {}}
            for attn in attns:
                model = last.pop(attn, None) or make_model(shape, attn, spec, args.seed, device)
                if device.type == "cuda":
                    model = to_bf16(model)
                for B in args.gen_batch:
                    log(f"== generate(): {attn}, batch {B}, prompt {args.gen_prompt} bytes, {args.gen_tokens} new tokens")
                    prompt = gen_prompts(corpus, B, args.gen_prompt)
                    gen["batches"].setdefault(str(B), {})[attn] = time_generate(model, prompt, args.gen_tokens, device)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        for line in summary_lines(runs, gen):
            log(line)
        doc = {"format": LOG_FORMAT, "version": 1, "args": vars(args), "data": corpus.sizes,
               "model": {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "kv_heads": args.kv_heads,
                         "head_dim": args.hidden // args.heads, "vocab": VOCAB, "ffn": _ffn(args.hidden)},
               "spec": spec.source, "spec_name": spec.name, "device": args.device,
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
               "runs": {str(T): r for T, r in runs.items()}, "generate": gen}
        doc = _clean(doc)
        if args.log_json:
            Path(args.log_json).write_text(json.dumps(doc, indent=1) + "\n")
            log(f"wrote {args.log_json}")
        plot = args.plot or (str(Path(args.log_json).with_suffix(".png")) if args.log_json else None)
        if plot and runs:
            if write_plot(plot, runs):
                log(f"wrote {plot}")
            else:
                log("matplotlib is not installed: no plot")
        return doc
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    try:
        main()
    except nsa_dsl.SpecError as e:     # a bad --spec, or one the model cannot take: no traceback
        raise SystemExit(e.render())
