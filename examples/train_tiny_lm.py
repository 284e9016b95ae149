"""Train a tiny decoder-only language model whose attention layers are nsa_dsl.SparseAttention.

The task needs long-range retrieval and comes with no download: multi-query associative
recall. Each sequence is random filler tokens with ``--pairs`` pairs ``KEY_i VALUE_i``
scattered in it, all of them farther back than the sliding window reaches. The
sequence ends with ``SEP`` and ``--queries`` of those keys, each followed by its value:

    f f K3 V9 f f f ... f K7 V2 f ... f f | SEP K7 [V2] K3 [V9] ...
                                                     ^^^^     ^^^^  the answers (loss, accuracy)

Only the answers are scored; chance is 1 / n_values. The window cannot see the pairs: the
answers must come from the compressed and selected blocks.

Each block mixes its attention input with the previous position's (``--token-shift``, on by
default; see ``Block``), so one attention layer can match a query key against the value that
follows it. Without it, retrieval waits for a previous-token head to form first: training sat
on a plateau at a loss of ln(pairs) (copying some value of the context) for thousands of steps
(CPU, T=128: 20-30% accuracy after 800 steps). With it, on the CPU (hidden 128, heads 2): the
SDPA model reaches 99% at T=256 in 200 steps (batch 32); the NSA model learns more slowly, as
its compressed scores must first learn to rank the pair's block among the 4 blocks of 16 it
selects (13 candidates at T=256): 30% and rising after 220 steps at T=128 (batch 32), 19% and
rising after 430 steps at T=256 (batch 16). Give it thousands of steps at a large batch, which
a GPU does in about a minute. (A ``--curriculum 0.5`` over the pairs made no difference there.)

    python examples/train_tiny_lm.py                      # 40 steps on the CPU (reference attention)
    python examples/train_tiny_lm.py --compare            # same steps again with full SDPA attention
    python examples/train_tiny_lm.py --device cuda --compare --max-time 70 --log-json tiny.json
        # CUDA defaults: T=256, batch 256, hidden 128, 2 heads, 4000 steps or 70 s per model
    python examples/train_tiny_lm.py --save tiny.pt       # also writes tiny.nsa, the spec; then:
    nsa-dsl show tiny.nsa --seq-len 256 --from-model tiny.pt
    torchrun --nproc-per-node 2 examples/train_tiny_lm.py --device cuda --ddp    # or --fsdp (FSDP2)
    torchrun --nproc-per-node 2 examples/check_distributed.py --device cuda      # DDP/FSDP2 gradients
    torchrun --nproc-per-node 4 examples/train_tiny_lm.py --device cuda --cp 2 --fsdp --seq-len 4096
        # context parallel: each sequence split over 2 ranks, 2 data-parallel groups of 2

Schedule: linear warmup (``--warmup``), cosine decay to 10% at the end of ``--steps``, or of
``--max-time`` seconds when the clock runs out first (the decay follows whichever is further
along). ``--curriculum F`` ramps the pairs per sequence from ``--pairs-start`` up to ``--pairs``
over the first fraction F of training. Log lines ``step N loss L acc A (S s)`` give the mean
training loss and answer accuracy over the steps since the previous line (every batch is fresh,
so the accuracy is held-out too) and the seconds since training started; ``--log-json FILE``
writes the same curve and each model's summary (final accuracy on held-out batches, steps,
seconds, training tokens/s).

Context parallelism (``--cp N``, under torchrun): the world is a data x context mesh of
``world / N`` x ``N`` ranks; each sequence of a data group is split over its ``N`` ranks
(``nsa_dsl.runtime.context_parallel``: rank ``r`` holds chunks ``r`` and ``2N-1-r`` of ``2N``),
the SparseAttention layers all-gather K/V (``cp_mesh``), the token shift fetches each chunk's
predecessor row from its rank, and gradients are averaged over every rank (DDP, or FSDP2 with
``--fsdp``: the flattened data x context mesh, as torchtitan does), the loss being each rank's
share of the global mean over the answers.

On a CPU, SparseAttention's backend "auto" runs nsa_dsl.reference (pure PyTorch); on CUDA
it runs the generated Triton kernels (compiled by one forward/backward pass before the clock
starts), and the script reports tokens per second against the same model with SDPA attention.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

try:  # the repository root on sys.path when the script runs from a source checkout
    import nsa_dsl
except ModuleNotFoundError:  # pragma: no cover
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import nsa_dsl

CHECKPOINT_FORMAT = "nsa-dsl/train_tiny_lm"
CUDA_HIDDEN, CUDA_HEADS = 128, 2      # the CUDA defaults: a wider model, head dim 64 (free on a GPU)
CHECKPOINT_VERSION = 1

# The NSA pattern of the paper with blocks and window scaled down for short sequences:
# compression l = 16, d = 8; selection l' = 16, 4 blocks (the first and the query's own
# forced); a 32-key window. At T = 256 a query reads at most 31 + 64 + 32 keys of 256.
TINY_SPEC = """\
attention tiny_nsa {
    causal = true
    branch cmp = compress(block = 16, stride = 8, pool = mean)
    branch slc = select(block = 16, top_k = 4, score = cmp, keep_first = 1, keep_last = 1)
    branch swa = window(size = 32)
    output = gate(sigmoid, cmp, slc, swa)
}
"""


# ---------------------------------------------------------------------------------- config

@dataclass
class Config:
    seq_len: int = 256
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 1
    n_keys: int = 32
    n_values: int = 32
    n_filler: int = 64
    pairs: int = 8
    queries: int = 8
    min_gap: int = 0          # 0: the spec's widest window (pairs lie beyond it)
    token_shift: bool = True  # attention input x_t + g * x_{t-1} (see Block); False in old checkpoints

    # token ids: PAD, SEP, then keys, values, filler
    @property
    def key0(self) -> int:
        return 2

    @property
    def value0(self) -> int:
        return 2 + self.n_keys

    @property
    def filler0(self) -> int:
        return 2 + self.n_keys + self.n_values

    @property
    def vocab(self) -> int:
        return 2 + self.n_keys + self.n_values + self.n_filler

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


SEP = 1


def spec_gap(spec) -> int:
    """The widest window of ``spec`` (0 without one): pairs must lie farther back."""
    return max([b.size for b in spec.of_kind("window")] + [0])


def min_seq_len(cfg: Config, min_gap: Optional[int] = None) -> int:
    """The shortest sequence :func:`make_batch` can fill: the pairs (two tokens each, at even
    positions), then the gap, then ``SEP`` and the questions."""
    gap = cfg.min_gap if min_gap is None else min_gap
    return 2 * cfg.pairs + 1 + gap + 1 + 2 * cfg.queries


# ------------------------------------------------------------------------------------ task

def make_batch(cfg: Config, batch: int, generator: torch.Generator, seq_len: Optional[int] = None,
               min_gap: Optional[int] = None):
    """``(tokens [B, T] int64, targets [B, T] int64)``: targets are -100 except at the answers.

    The targets are shifted already: ``targets[:, t]`` is the token the model must predict at
    position ``t`` (the value following the query key at ``t``).
    """
    T = seq_len or cfg.seq_len
    gap = cfg.min_gap if min_gap is None else min_gap
    tail = 1 + 2 * cfg.queries                      # SEP K V K V ...
    region = T - tail - gap                         # pairs start in [0, region - 1)
    slots = (region - 1) // 2                       # pairs at even positions never overlap
    if cfg.queries > cfg.pairs or cfg.pairs > min(cfg.n_keys, slots):
        raise ValueError(f"seq_len {T} is too short for {cfg.pairs} pairs beyond a gap of {gap} "
                         f"(or pairs > n_keys, or queries > pairs)")
    g = generator
    tokens = torch.randint(cfg.filler0, cfg.vocab, (batch, T), generator=g)
    targets = torch.full((batch, T), -100, dtype=torch.long)
    # per row: distinct keys, random values, distinct even start slots (vectorised: a batch of
    # 256 costs about a millisecond; a Python loop over the rows cost tens of ms a step)
    keys = torch.rand(batch, cfg.n_keys, generator=g).argsort(1)[:, :cfg.pairs]          # [B, P]
    values = torch.randint(0, cfg.n_values, (batch, cfg.pairs), generator=g)
    starts = 2 * torch.rand(batch, slots, generator=g).argsort(1)[:, :cfg.pairs]
    rows = torch.arange(batch)[:, None]
    tokens[rows, starts] = cfg.key0 + keys
    tokens[rows, starts + 1] = cfg.value0 + values
    asked = torch.rand(batch, cfg.pairs, generator=g).argsort(1)[:, :cfg.queries]       # [B, Q]
    pos = T - tail
    tokens[:, pos] = SEP
    kpos = pos + 1 + 2 * torch.arange(cfg.queries)                                       # [Q]
    tokens[:, kpos] = cfg.key0 + keys.gather(1, asked)
    answer = cfg.value0 + values.gather(1, asked)
    tokens[:, kpos + 1] = answer
    targets[:, kpos] = answer
    return tokens, targets


# ----------------------------------------------------------------------------------- model

class Rotary(nn.Module):
    """Rotary position embedding, ``(q [B, T, HQ, D], k [B, T, H, D], positions) -> (q, k)``."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim, self.base = dim, base

    def forward(self, q, k, positions):
        half = self.dim // 2
        inv = self.base ** (-torch.arange(half, device=q.device, dtype=torch.float32) / half)
        ang = positions.to(torch.float32)[:, None] * inv[None, :]            # [T, D/2]
        cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]

        def rot(x):
            x1, x2 = x.float()[..., :half], x.float()[..., half:2 * half]
            out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x.float()[..., 2 * half:]], -1)
            return out.to(x.dtype)
        return rot(q), rot(k)


class SDPAAttention(nn.Module):
    """Full causal attention with the projections of SparseAttention (the baseline)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, rotary: Rotary):
        super().__init__()
        self.heads, self.kv_heads, self.dim = heads, kv_heads, hidden // heads
        self.q_proj = nn.Linear(hidden, heads * self.dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.dim, bias=False)
        self.o_proj = nn.Linear(heads * self.dim, hidden, bias=False)
        self.rotary = rotary

    def forward(self, x, return_aux: bool = False):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.dim)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.dim)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.dim)
        q, k = self.rotary(q, k, torch.arange(T, device=x.device))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=self.heads != self.kv_heads)
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.dim))
        return (y, None) if return_aux else y


class Block(nn.Module):
    """Pre-norm block: ``x + attn(mix(ln1(x)))``, then ``x + mlp(ln2(x))``.

    ``mix`` (``cfg.token_shift``) adds the previous position's input, scaled per channel by a
    learned ``shift`` (init 0.5): ``h_t + shift * h_{t-1}`` (a token shift, as RWKV's, or the
    "smeared keys" of Olsson et al. 2022). Keys then carry their predecessor, so one attention
    layer can match a query key against the value that follows it: retrieval no longer waits for
    a previous-token head to form in an earlier layer, which is most of the long loss plateau
    of this task. The attention still has to reach the pair, far beyond the window, through the
    compressed and selected blocks. Both models (nsa, sdpa) get the same mix.
    """

    def __init__(self, cfg: Config, spec, attn: str, cp_mesh=None):
        super().__init__()
        rotary = Rotary(cfg.hidden // cfg.heads)
        self.cp_mesh = cp_mesh
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.shift = nn.Parameter(torch.full((cfg.hidden,), 0.5)) if cfg.token_shift else None
        if attn == "nsa":
            self.attn = nsa_dsl.SparseAttention(spec, cfg.hidden, heads=cfg.heads, kv_heads=cfg.kv_heads,
                                                rotary=rotary, cp_mesh=cp_mesh)
        else:
            self.attn = SDPAAttention(cfg.hidden, cfg.heads, cfg.kv_heads, rotary)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden, 4 * cfg.hidden), nn.GELU(),
                                 nn.Linear(4 * cfg.hidden, cfg.hidden))

    def forward(self, x, return_aux: bool = False):
        h = self.ln1(x)
        if self.shift is not None:
            h = h + self.shift * previous_rows(h, self.cp_mesh)
        a, aux = self.attn(h, return_aux=True) if return_aux else (self.attn(h), None)
        x = x + a
        x = x + self.mlp(self.ln2(x))
        return (x, aux) if return_aux else x


def previous_rows(h, cp_mesh=None):
    """Each row's predecessor in the whole sequence (zeros before the first). Context parallel
    (``h`` this rank's chunks ``r`` and ``2N-1-r``): the row before each chunk is the last row
    of the chunk before it, on another rank: the chunks' last rows are all-gathered (2N rows,
    in global order; the backward reduce-scatters their gradients)."""
    if cp_mesh is None:
        return F.pad(h[:, :-1], (0, 0, 1, 0))
    from nsa_dsl.runtime import context_parallel as cpar
    group, world, rank = cpar.process_group(cp_mesh)
    c = h.shape[1] // 2
    ends = cpar.gather_sequence(torch.stack([h[:, c - 1], h[:, -1]], 1), group)     # [B, 2N, D]
    before = F.pad(ends, (0, 0, 1, 0))[:, [rank, 2 * world - 1 - rank]]             # chunk j: end of j - 1
    return torch.cat([before[:, :1], h[:, :c - 1], before[:, 1:], h[:, c:-1]], 1)


class TinyLM(nn.Module):
    """Embedding, ``layers`` pre-norm blocks (attention + MLP), final norm, tied output head.
    ``cp_mesh``: context parallel, ``tokens`` are this rank's shard of each sequence."""

    def __init__(self, cfg: Config, spec, attn: str = "nsa", cp_mesh=None):
        super().__init__()
        if attn not in ("nsa", "sdpa"):
            raise ValueError(f"attn must be 'nsa' or 'sdpa', got {attn!r}")
        self.cfg, self.spec, self.attn_kind = cfg, spec, attn
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg, spec, attn, cp_mesh) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.hidden)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens, return_aux: bool = False):
        """``tokens [B, T] -> logits [B, T, vocab]``; with ``return_aux`` also one aux per layer
        (``SparseAttention``'s: selected blocks, per-branch lse and outputs; None for SDPA)."""
        x = self.embed(tokens)
        auxes = []
        for blk in self.blocks:
            if return_aux:
                x, aux = blk(x, return_aux=True)
                auxes.append(aux)
            else:
                x = blk(x)
        logits = self.norm(x) @ self.embed.weight.t()
        return (logits, auxes) if return_aux else logits


def answer_loss(logits, targets, reduction: str = "mean"):
    """Cross entropy over the answer positions (mean, or ``reduction="sum"``); ``(loss, correct,
    count)``."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    tgt = targets.reshape(-1)
    loss = F.cross_entropy(flat, tgt, ignore_index=-100, reduction=reduction)
    mask = tgt != -100
    correct = (flat.argmax(-1)[mask] == tgt[mask]).sum()
    return loss, correct, mask.sum()


# ------------------------------------------------------------------------------ checkpoint

def save_checkpoint(path: str, model: TinyLM, state_dict: dict, extra: dict) -> None:
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "config": asdict(model.cfg), "attn": model.attn_kind,
                "spec_source": model.spec.source or TINY_SPEC, "spec_name": model.spec.name,
                "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
                **extra}, path)


def load_checkpoint(path: str, map_location="cpu"):
    """``(model, checkpoint dict)``: a TinyLM with the saved weights, in eval mode."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint written by train_tiny_lm.py")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')}, this script reads "
                         f"version {CHECKPOINT_VERSION}")
    spec = nsa_dsl.parse(ckpt["spec_source"], ckpt.get("spec_name"))
    model = TinyLM(Config.from_dict({"token_shift": False, **ckpt["config"]}), spec, ckpt["attn"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt


# -------------------------------------------------------------------------------- training

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False
    cp: int = 1                # context-parallel ranks per sequence (--cp)
    cp_mesh: object = None     # the "cp" dim of the data x context DeviceMesh

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def dp(self) -> int:       # data-parallel groups: each takes its share of the batch
        return self.world // self.cp

    @property
    def dp_rank(self) -> int:  # the mesh is (dp, cp), row-major: rank = dp_rank * cp + cp_rank
        return self.rank // self.cp

    def shard(self, x):
        """This rank's part of a batch ``x [batch, T]``: its data group's rows, then (``--cp``) its
        chunks of each sequence."""
        per = x.shape[0] // self.dp
        x = x[self.dp_rank * per:(self.dp_rank + 1) * per]
        if self.cp_mesh is None:
            return x
        from nsa_dsl.runtime.context_parallel import shard_sequence
        return shard_sequence(x, self.cp_mesh)


def _setup_dist(args) -> Dist:
    if not (args.ddp or args.fsdp or args.cp > 1):
        return Dist()
    import torch.distributed as dist
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("--ddp/--fsdp/--cp need torchrun (or RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT "
                         "in the environment): torchrun --nproc-per-node N examples/train_tiny_lm.py --ddp")
    backend = "nccl" if args.device == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    d = Dist(dist.get_rank(), dist.get_world_size(), local_rank, True)
    if args.cp > 1:
        if d.world % args.cp:
            dist.destroy_process_group()
            raise SystemExit(f"--cp {args.cp} does not divide the world size {d.world}")
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(args.device, (d.world // args.cp, args.cp), mesh_dim_names=("dp", "cp"))
        d.cp, d.cp_mesh = args.cp, mesh["cp"]
    return d


def _wrap(model: TinyLM, args, d: Dist, device):
    if args.fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        for blk in model.blocks:
            fully_shard(blk)
        fully_shard(model)
        return model
    if args.ddp or d.cp > 1:           # --cp alone: DDP over every rank (data x context)
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def _full_state_dict(model, wrapped, args) -> dict:
    if args.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def _all_max(value: float, d_device) -> float:
    import torch.distributed as dist
    t = torch.tensor([float(value)], dtype=torch.float64, device=d_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _all_sum(values, d: Dist, device):
    t = torch.tensor([float(x) for x in values], dtype=torch.float64, device=device)
    if d.active:
        import torch.distributed as dist
        dist.all_reduce(t)
    return t.tolist()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _pairs_at(cfg: Config, args, progress: float) -> int:
    """Pairs per sequence at ``progress`` (0 .. 1) of training: ``--curriculum F`` ramps them
    linearly from ``--pairs-start`` to ``--pairs`` over the first fraction F of training."""
    frac = getattr(args, "curriculum", 0.0) or 0.0
    start = min(cfg.pairs, max(1, getattr(args, "pairs_start", None) or 2))
    if frac <= 0 or start >= cfg.pairs:
        return cfg.pairs
    return min(cfg.pairs, start + int((cfg.pairs - start + 1) * min(1.0, progress / frac)))


def train(cfg: Config, spec, attn: str, args, d: Dist, log=print) -> dict:
    """Train one model; returns ``{"losses": [(step, loss)], "curve": [{step, loss, acc, ...}],
    "accuracy", "tokens_per_s", "steps", "train_s", ...}``.

    The learning rate warms up linearly over ``--warmup`` steps, then decays along a cosine to
    10% at the end of the budget: ``--steps``, or ``--max-time`` seconds when that runs out
    first (the schedule follows whichever is further along, so a run cut by the clock still
    ends at the low learning rate). On CUDA, one forward/backward pass before the clock starts
    compiles the kernels (no optimizer step: the model does not change)."""
    device = torch.device(args.device, d.local_rank) if args.device == "cuda" else torch.device("cpu")
    torch.manual_seed(args.seed)                       # same init on every rank and for both models
    model = TinyLM(cfg, spec, attn, d.cp_mesh).to(device)
    wrapped = _wrap(model, args, d, device)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = args.warmup if getattr(args, "warmup", None) is not None else max(1, min(100, args.steps // 10))
    warmup = max(1, min(warmup, args.steps))
    max_time = getattr(args, "max_time", None)

    def lr_at(step, p_time=0.0):                       # linear warmup, cosine decay to 10%
        if step <= warmup:
            return args.lr * step / warmup
        p = min(1.0, max((step - warmup) / max(1, args.steps - warmup), p_time))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    if args.batch % d.dp:
        raise SystemExit(f"--batch {args.batch} is not divisible by the data-parallel size {d.dp}")
    per_rank = args.batch // d.dp
    data = torch.Generator().manual_seed(args.seed + 1)   # same global batch on every rank
    compile_s = 0.0
    if device.type == "cuda":                          # compile the kernels outside the clock
        t0 = time.perf_counter()
        tokens, targets = make_batch(cfg, args.batch, torch.Generator().manual_seed(args.seed + 2))
        with _autocast(device):
            logits = wrapped(d.shard(tokens).to(device))
        answer_loss(logits, d.shard(targets).to(device), "sum")[0].backward()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        compile_s = time.perf_counter() - t0
    losses, curve, t_train = [], [], 0.0
    timed_steps, timed_s = 0, 0.0
    seen = [0.0, 0.0, 0.0, 0.0]                        # loss sum, steps, correct, answers since the last log
    t_start = time.perf_counter()
    t_first = None                                     # elapsed after step 1 (the time schedule starts there)
    p_time, steps_done, stopped = 0.0, 0, False
    wrapped.train()
    for step in range(1, args.steps + 1):
        pairs = _pairs_at(cfg, args, max((step - 1) / args.steps, p_time))
        step_cfg = cfg if pairs == cfg.pairs else replace(cfg, pairs=pairs, queries=min(cfg.queries, pairs))
        tokens, targets = make_batch(step_cfg, args.batch, data)     # the global batch, on every rank
        answers = int((targets >= 0).sum())
        tokens = d.shard(tokens).to(device, non_blocking=True)
        targets = d.shard(targets).to(device, non_blocking=True)
        _sync(device)
        t0 = time.perf_counter()
        lr = lr_at(step, p_time)
        for group in opt.param_groups:
            group["lr"] = lr
        with _autocast(device):
            logits = wrapped(tokens)
        if d.cp > 1:    # a rank may hold no answer: its sum over all answers, x ranks (DDP/FSDP average)
            loss, correct, count = answer_loss(logits, targets, "sum")
            loss = loss * (d.world / answers)
        else:
            loss, correct, count = answer_loss(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 1.0)
        opt.step()
        _sync(device)
        dt = time.perf_counter() - t0
        t_train += dt
        steps_done = step
        if step > min(5, args.steps // 2):                # skip compilation and warmup steps
            timed_steps += 1
            timed_s += dt
        seen[0] += loss.detach()
        seen[1] += 1
        seen[2] += correct
        seen[3] += count
        elapsed = time.perf_counter() - t_start
        if max_time is not None:
            if d.active:                               # every rank stops at the same step
                elapsed = _all_max(elapsed, device)
            if t_first is None:
                t_first = elapsed
            p_time = (elapsed - t_first) / max(1e-9, max_time - t_first)
            stopped = elapsed >= max_time and step < args.steps
        if step % args.log_every == 0 or step == 1 or step == args.steps or stopped:
            total, n, c, m = _all_sum([float(x) for x in seen], d, device)
            seen = [0.0, 0.0, 0.0, 0.0]
            losses.append((step, total / n))
            curve.append({"step": step, "loss": total / n, "acc": c / max(m, 1), "lr": lr,
                          "pairs": pairs, "elapsed_s": round(elapsed, 3)})
            if d.main:
                log(f"step {step} loss {total / n:.4f} acc {c / max(m, 1):.3f}"
                    + (f" pairs {pairs}" if pairs != cfg.pairs else "") + f" ({elapsed:.1f} s)")
        if stopped:
            if d.main:
                log(f"--max-time {max_time:g} s reached after {step} of {args.steps} steps")
            break

    # held-out accuracy on the answers
    wrapped.eval()
    evalg = torch.Generator().manual_seed(10_000 + args.seed)
    n_eval = args.eval_batches * args.batch
    sums = [0.0, 0.0, 0.0]
    with torch.no_grad():
        for _ in range(args.eval_batches):
            tokens, targets = make_batch(cfg, args.batch, evalg)
            with _autocast(device):
                logits = wrapped(d.shard(tokens).to(device))
            loss, correct, count = answer_loss(logits, d.shard(targets).to(device), "sum")
            sums[0] += loss.item()
            sums[1] += correct.item()
            sums[2] += count.item()
    loss_sum, correct, count = _all_sum(sums, d, device)
    # the full state dict is a collective under FSDP: every rank gathers, rank 0 saves
    state = _full_state_dict(model, wrapped, args) if args.save and attn == "nsa" else None
    tps = (timed_steps * per_rank * cfg.seq_len / d.cp / timed_s) if timed_s > 0 else float("nan")   # per GPU
    return {"model": model, "losses": losses, "curve": curve, "eval_loss": loss_sum / max(count, 1),
            "accuracy": correct / max(count, 1), "answers": int(count), "sequences": n_eval,
            "steps": steps_done, "train_s": t_train, "wall_s": time.perf_counter() - t_start,
            "compile_s": compile_s, "tokens_per_s": tps, "state_dict": state}


def _throughput(cfg: Config, spec, attn: str, batch: int, device, steps: int = 10) -> float:
    """Training tokens per second of a fresh model on one GPU (batch ``batch``) over ``steps``
    steps after 3 warmup steps."""
    model = TinyLM(cfg, spec, attn).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens, targets = make_batch(cfg, batch, torch.Generator().manual_seed(0))
    tokens, targets = tokens.to(device), targets.to(device)
    t0 = None
    for i in range(3 + steps):
        if i == 3:
            _sync(device)
            t0 = time.perf_counter()
        with _autocast(device):
            loss, _, _ = answer_loss(model(tokens), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return steps * tokens.numel() / (time.perf_counter() - t0)


def write_log_json(path: str, args, cfg: Config, spec, results: dict, tps: Optional[dict], d: Dist) -> None:
    """``--log-json``: the run's settings, and per model its curve (``step``, mean training
    ``loss`` and answer accuracy ``acc`` over the steps since the previous point, ``lr``,
    ``pairs``, ``elapsed_s`` since training started) and summary (held-out accuracy and loss,
    steps, seconds, training tokens/s per GPU)."""
    import json
    gpu = torch.cuda.get_device_name(d.local_rank) if args.device == "cuda" else None
    doc = {
        "format": "nsa-dsl/train_tiny_lm/log", "version": 1,
        "args": {k: v for k, v in vars(args).items()},
        "config": asdict(cfg), "spec": spec.source or TINY_SPEC, "spec_name": spec.name,
        "device": args.device, "gpu": gpu, "world_size": d.world, "torch": torch.__version__,
        "chance": 1 / cfg.n_values,
        "runs": {attn: {"accuracy": r["accuracy"], "eval_loss": r["eval_loss"], "answers": r["answers"],
                        "steps": r["steps"], "train_s": r["train_s"], "wall_s": r["wall_s"],
                        "compile_s": r["compile_s"], "tokens_per_s": r["tokens_per_s"],
                        "curve": r["curve"]}
                 for attn, r in results.items()},
        "throughput_tokens_per_s": tps,
    }

    def clean(x):                                   # NaN / inf are not JSON
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    Path(path).write_text(json.dumps(clean(doc), indent=1) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default 40 on cpu, 4000 on cuda; see --max-time)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default 256)")
    p.add_argument("--attn", choices=("nsa", "sdpa"), default="nsa",
                   help="attention of the model: nsa_dsl.SparseAttention or full SDPA")
    p.add_argument("--compare", action="store_true",
                   help="also train the same model with full SDPA attention for the same steps")
    p.add_argument("--spec", metavar="FILE", help="an .nsa spec instead of the built-in tiny one")
    p.add_argument("--spec-name", metavar="NAME", help="the attention block of --spec to use")
    p.add_argument("--layers", type=int, default=Config.layers)
    p.add_argument("--hidden", type=int, default=None,
                   help=f"model width (default {Config.hidden} on cpu, {CUDA_HIDDEN} on cuda)")
    p.add_argument("--heads", type=int, default=None,
                   help=f"query heads (default {Config.heads} on cpu, {CUDA_HEADS} on cuda)")
    p.add_argument("--kv-heads", type=int, default=Config.kv_heads)
    p.add_argument("--token-shift", choices=("on", "off"), default="on",
                   help="mix each position's attention input with its predecessor's (default on; see "
                        "Block): retrieval forms in hundreds of steps instead of thousands")
    p.add_argument("--pairs", type=int, default=Config.pairs, help="key-value pairs per sequence")
    p.add_argument("--queries", type=int, default=Config.queries, help="keys asked at the end")
    p.add_argument("--batch", type=int, default=None,
                   help="global batch, split over the ranks (default 16 on cpu, 256 on cuda)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=None,
                   help="linear warmup steps, then cosine decay to 10%% (default steps/10, at most 100)")
    p.add_argument("--max-time", type=float, default=None, metavar="SECONDS",
                   help="stop training a model after this many seconds (kernel compilation on CUDA "
                        "not counted), then evaluate as usual; the cosine decay follows the clock "
                        "when it runs out before --steps")
    p.add_argument("--curriculum", type=float, default=0.0, metavar="F",
                   help="ramp the pairs per sequence from --pairs-start to --pairs over the first "
                        "fraction F of training (0: off)")
    p.add_argument("--pairs-start", type=int, default=2, help="pairs at the start of --curriculum")
    p.add_argument("--log-json", metavar="FILE",
                   help="write the loss/accuracy curve and the summary of every model as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=None, help="default 10 on cpu, 100 on cuda")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--save", metavar="CKPT", help="save the (nsa) model here")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default 1 on cpu: the tensors are tiny, and one "
                        "thread beats several there; the previous setting is restored at the end)")
    p.add_argument("--ddp", action="store_true", help="DistributedDataParallel; launch with torchrun")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard; launch with torchrun")
    p.add_argument("--cp", type=int, default=1, metavar="N",
                   help="context parallel: split each sequence over N ranks (torchrun; the world is data x N "
                        "ranks; gradients averaged by DDP, or FSDP2 with --fsdp); --seq-len a multiple of 2N")
    return p


def main(argv: Optional[Sequence[str]] = None, log=print) -> dict:
    args = build_parser().parse_args(argv)
    if args.ddp and args.fsdp:
        raise SystemExit("choose one of --ddp and --fsdp")
    if args.cp < 1:
        raise SystemExit(f"--cp {args.cp}: expected a number of ranks >= 1")
    if args.cp > 1 and (args.compare or args.attn != "nsa"):
        raise SystemExit("--cp splits the SparseAttention layers' sequences; the SDPA model has no context "
                         "parallelism here: drop --compare / --attn sdpa")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available")
    cuda = args.device == "cuda"
    if args.steps is None:
        args.steps = 4000 if cuda else 40
    if args.batch is None:
        args.batch = 256 if cuda else 16
    if args.hidden is None:
        args.hidden = CUDA_HIDDEN if cuda else Config.hidden
    if args.heads is None:
        args.heads = CUDA_HEADS if cuda else Config.heads
    if args.log_every is None:
        args.log_every = 100 if cuda else 10
    spec = nsa_dsl.load(args.spec, args.spec_name) if args.spec else nsa_dsl.parse(TINY_SPEC)
    cfg = Config(seq_len=args.seq_len or Config.seq_len, layers=args.layers, hidden=args.hidden,
                 heads=args.heads, kv_heads=args.kv_heads, pairs=args.pairs, queries=args.queries,
                 min_gap=spec_gap(spec), token_shift=args.token_shift == "on")
    if cfg.queries > cfg.pairs or cfg.pairs > cfg.n_keys:
        raise SystemExit(f"error: --queries {cfg.queries} and --pairs {cfg.pairs}: the task asks at most "
                         f"--pairs keys and holds at most {cfg.n_keys} pairs; pass --queries <= --pairs <= {cfg.n_keys}")
    if cfg.seq_len < min_seq_len(cfg):
        raise SystemExit(f"error: --seq-len {cfg.seq_len} is too short for spec '{spec.name}': the {cfg.pairs} "
                         f"key-value pairs must lie beyond its widest window ({cfg.min_gap} keys) from the "
                         f"{cfg.queries} questions, which takes --seq-len {min_seq_len(cfg)} or more; pass "
                         f"--seq-len {min_seq_len(cfg)} (or use a spec with a smaller window, or fewer --pairs)")
    if cfg.seq_len % (2 * args.cp):
        raise SystemExit(f"error: --cp {args.cp} cuts each sequence into {2 * args.cp} equal chunks: pass a --seq-len "
                         f"that is a multiple of {2 * args.cp}")
    threads = torch.get_num_threads()
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    d = _setup_dist(args)
    try:
        runs = [args.attn] + (["sdpa" if args.attn == "nsa" else "nsa"] if args.compare else [])
        if d.main:
            log(f"task: multi-query associative recall, T={cfg.seq_len}, {cfg.pairs} pairs at least "
                f"{cfg.min_gap} tokens back, {cfg.queries} queries; chance {1 / cfg.n_values:.3f}")
            log(f"model: {cfg.layers} layers, hidden {cfg.hidden}, heads {cfg.heads}, kv_heads {cfg.kv_heads}, "
                f"vocab {cfg.vocab}; batch {args.batch} on {args.device}"
                + (f" x {d.world} ranks ({f'cp {d.cp} x dp {d.dp}, ' if d.cp > 1 else ''}"
                   f"{'fsdp' if args.fsdp else 'ddp'})" if d.active else ""))
            log(f"spec: {spec.name} ({', '.join(f'{b.name}={b.kind}' for b in spec.branches)})")
        results = {}
        for attn in runs:
            if d.main:
                log(f"== training {attn} ({args.steps} steps)")
            results[attn] = train(cfg, spec, attn, args, d, log)
            r = results[attn]
            if d.main:
                log(f"{attn}: final accuracy {r['accuracy']:.4f} ({r['answers']} answers of "
                    f"{r['sequences']} held-out sequences), eval loss {r['eval_loss']:.4f}, "
                    f"train {r['train_s']:.1f} s ({r['steps']} steps"
                    + (f"; kernels compiled in {r['compile_s']:.1f} s before" if r["compile_s"] else "")
                    + ")")
        if d.main and args.compare:
            a, b = results["nsa"], results["sdpa"]
            log(f"compare: accuracy nsa {a['accuracy']:.4f} vs sdpa {b['accuracy']:.4f}; "
                f"eval loss nsa {a['eval_loss']:.4f} vs sdpa {b['eval_loss']:.4f}")
        tps = None
        if args.device == "cuda" and d.main:
            device = torch.device("cuda", d.local_rank)
            tps = {k: v["tokens_per_s"] for k, v in results.items()}
            for attn in ("nsa", "sdpa"):      # measure the one not trained
                if attn not in tps:
                    tps[attn] = _throughput(cfg, spec, attn, args.batch // d.world, device)
            log(f"throughput (training steps, tokens/s per GPU): nsa {tps['nsa']:,.0f}, "
                f"sdpa {tps['sdpa']:,.0f} (nsa/sdpa {tps['nsa'] / tps['sdpa']:.2f}x) at T={cfg.seq_len}, "
                f"batch {args.batch // d.world} per GPU")
        if args.log_json and d.main:
            write_log_json(args.log_json, args, cfg, spec, results, tps, d)
            log(f"wrote {args.log_json}")
        if args.save:
            if "nsa" not in results:
                raise SystemExit("--save keeps the nsa model; run with --attn nsa or --compare")
            r = results["nsa"]
            if d.main:
                save_checkpoint(args.save, r["model"], r["state_dict"],
                                {"steps": args.steps, "accuracy": r["accuracy"]})
                spec_file = args.spec
                if not spec_file:            # the built-in spec, for `nsa-dsl show SPEC --from-model CKPT`
                    spec_file = str(Path(args.save).with_suffix(".nsa"))
                    if spec_file == str(args.save):
                        spec_file += ".nsa"
                    Path(spec_file).write_text(TINY_SPEC)
                log(f"saved {args.save} (picture: nsa-dsl show {spec_file} --seq-len {cfg.seq_len} "
                    f"--from-model {args.save})")
        for r in results.values():
            r.pop("state_dict", None)
        return results
    finally:
        torch.set_num_threads(threads)
        if d.active:
            import torch.distributed as dist
            try:
                if sys.exc_info()[0] is None:
                    dist.barrier()            # rank 0 may still be saving: leave together
            finally:
                dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except nsa_dsl.SpecError as e:     # a bad --spec, or one the model cannot take: no traceback
        raise SystemExit(e.render())
