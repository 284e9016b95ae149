"""``nsa-dsl show``: a picture of which keys each query attends, per branch.

    masks = attention_masks(spec, T, indices)         # branch -> bool [rows, cols] (numpy)
    render_png(spec, masks, T, "show.png", title=...)  # one panel per branch + the combined one

Each branch's key set per query follows docs/SEMANTICS.md:

- ``compress(l, d)``: query ``t`` sees compressed block ``i`` iff ``i*d + l - 1 <= t``;
  block ``i`` pools keys ``[i*d, i*d + l)``: drawn as the key ranges of the visible blocks.
- ``select(l', n)``: the keys of the selected blocks ``[j*l', (j+1)*l')`` with position
  ``<= t``. The choice depends on the inputs: pass ``indices`` (``[T, top_k]`` block numbers,
  -1 padded, for one batch row and one kv head; or ``[B, T, H, top_k]``, of which row 0 and
  kv head 0 are drawn). Without them only the blocks chosen whatever the scores are drawn:
  the forced ``keep_first`` / ``keep_last`` blocks, and every eligible block while at most
  ``top_k`` are eligible.
- ``window(w, sinks)``: keys ``[max(0, t - w + 1), t]`` and the sinks ``[0, sinks)`` ``<= t``.

Masks are built from per-query key intervals, never as a dense ``[T, T]`` array when they are
downsampled: with ``size`` (pixels) below ``T``, cell ``(r, c)`` covers the queries and keys
whose position ``p`` has ``floor(p * size / T) = r`` (resp. ``c``) and is True when any pair in
the cell attends (max pooling), so a one-key band stays visible at any length.

Library code: returns values or raises :class:`~nsa_dsl.errors.SpecError` (codes E630-E635);
only the CLI prints.

| code | meaning |
|---|---|
| E630 | matplotlib is not installed |
| E631 | bad ``T`` / ``size`` / ``indices``; for ``nsa-dsl show``, a ``T`` past the cost limit (see :func:`estimate`) |
| E632 | the checkpoint cannot be read or was not written by ``examples/train_tiny_lm.py`` |
| E633 | the checkpoint's attention pattern differs from the spec's |
| E634 | the checkpoint's model has no sparse attention (``--attn sdpa``) or no such layer |
| E635 | the training example (``train_tiny_lm.py``) cannot be found |
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from nsa_dsl.errors import SpecError
from nsa_dsl.language.ir import Compress, Select, Spec, Window
from nsa_dsl.runtime.files import output_folder, replace_file

__all__ = ["attention_masks", "keys_per_query", "render_png", "random_selection", "model_selection",
           "DEFAULT_SIZE", "BRANCH_COLORS"]

DEFAULT_SIZE = 512             # pixels per side of a panel (and cells per side of its mask)
RANDOM_HEADS, RANDOM_KV_HEADS, RANDOM_DIM = 4, 1, 32

# one colour per branch kind (a second branch of a kind gets the next shade)
BRANCH_COLORS = {
    "compress": ["#2a7fd4", "#6a3d9a", "#1f9e89"],
    "select": ["#e8590c", "#c2255c", "#b8860b"],
    "window": ["#2b9348", "#5c940d", "#0b7285"],
}


# ------------------------------------------------------------------------------------ masks

def _intervals(branch, T: int, idx: Optional[np.ndarray], causal: bool = True):
    """Key intervals ``[start, end)`` per query: ``(query [N], start [N], end [N])`` int64 arrays.

    A query may own several intervals; they never overlap (so their lengths add up to the
    query's key count); empty ones have ``start >= end``. Not ``causal``: keys after the query
    too (docs/SEMANTICS.md)."""
    t = np.arange(T, dtype=np.int64)
    if isinstance(branch, Window):
        lo = np.maximum(0, t - branch.size + 1)
        qs = [t, t]                                          # the band, and the sinks before it
        starts = [lo, np.zeros(T, np.int64)]
        ends = [t + 1 if causal else np.minimum(T, t + branch.size), np.minimum(branch.sinks, lo)]
    elif isinstance(branch, Compress):
        l, d = branch.block, branch.stride
        # visible blocks i = 0 .. floor((t - l + 1) / d): union of their keys is [0, last_i*d + l);
        # not causal: every complete block, i = 0 .. floor((T - l) / d)
        last = np.floor_divide(t - l + 1, d) if causal else np.full(T, (T - l) // d if T >= l else -1)
        qs, starts = [t], [np.zeros(T, np.int64)]
        ends = [np.where(last >= 0, last * d + l, 0)]
    elif isinstance(branch, Select):
        blocks = idx if idx is not None else _static_selection(branch, T, causal)
        K = blocks.shape[1]
        qq = np.repeat(t, K)
        j = blocks.reshape(-1).astype(np.int64)
        qs = [qq]
        starts = [np.where(j >= 0, j * branch.block, 0)]
        ends = [np.where(j >= 0, np.minimum((j + 1) * branch.block, qq + 1 if causal else T), 0)]
    else:  # pragma: no cover - the checker admits no other kinds
        raise SpecError("E631", f"branch {branch.name!r} of kind {branch.kind!r} cannot be drawn")
    return np.concatenate(qs), np.concatenate(starts), np.concatenate(ends)


def _static_selection(branch: Select, T: int, causal: bool = True) -> np.ndarray:
    """``[T, top_k]``: the blocks chosen whatever the scores (forced, or all when few), -1 padded."""
    l, K = branch.block, branch.top_k
    n_sel = -(-T // l)
    t = np.arange(T)[:, None]
    j = np.arange(n_sel)[None, :]
    own = t // l
    eligible = (j <= own) if causal else np.ones_like(j <= own)
    forced = eligible & ((j < branch.keep_first) | ((j > own - branch.keep_last) & (j <= own)))
    chosen = np.where(eligible.sum(1, keepdims=True) <= K, eligible, forced)
    out = np.full((T, K), -1, np.int64)
    for row in range(T):  # at most K per row: the forced blocks count toward top_k
        picked = np.flatnonzero(chosen[row])[:K]
        out[row, :len(picked)] = picked
    return out


def _selection_for(branch: Select, T: int, indices) -> Optional[np.ndarray]:
    if indices is None:
        return None
    if isinstance(indices, Mapping):
        if branch.name not in indices:
            return None
        idx = indices[branch.name]
    else:
        idx = indices
    idx = idx.detach().cpu().numpy() if hasattr(idx, "detach") else np.asarray(idx)
    if idx.ndim == 4:                      # [B, T, H, K]: batch row 0, kv head 0
        idx = idx[0, :, 0, :]
    if idx.ndim != 2 or idx.shape[0] != T:
        raise SpecError("E631", f"indices for {branch.name!r} have shape {list(idx.shape)}, "
                                f"expected [T={T}, top_k] or [B, T={T}, H, top_k]")
    n_sel = -(-T // branch.block)
    if idx.size and (idx.min() < -1 or idx.max() >= n_sel):
        raise SpecError("E631", f"indices for {branch.name!r} hold block numbers outside "
                                f"[-1, {n_sel}) (T = {T}, block = {branch.block})")
    return idx.astype(np.int64)


def _rasterize(q, start, end, T: int, n: int, progress=None) -> np.ndarray:
    """The mask of one branch from its key intervals.

    ``n == T``: ``[T, T]`` bool, ``[t, p]`` True when query ``t`` attends key ``p``. ``n < T``:
    ``[n, n]`` float32, cell ``(r, c)`` the fraction of the queries of row ``r`` that attend at
    least one key of column ``c`` (max over the keys of the cell, mean over its queries): any
    attended pair makes a cell non-zero, so a one-key band stays visible, and a key range that
    only some queries of the row choose shows as partly covered. ``progress``: called with the
    share of the queries done after each pass.
    """
    keep = end > start
    q, start, end = q[keep], start[keep], end[keep]
    c0 = start * n // T
    c1 = (end - 1) * n // T + 1            # one past the last column touched
    order = np.argsort(q, kind="stable")
    q, c0, c1 = q[order], c0[order], c1[order]
    exact = n == T
    out = np.zeros((n, n), bool if exact else np.float32)
    chunk = max(1, (1 << 23) // (n + 1))   # queries per pass: ~8M cells of scratch at most
    bounds = np.searchsorted(q, np.arange(0, T + chunk, chunk))
    for i, t0 in enumerate(range(0, T, chunk)):
        lo, hi = bounds[i], bounds[i + 1]
        rows = min(chunk, T - t0)
        diff = np.zeros((rows, n + 1), np.int32)
        np.add.at(diff, (q[lo:hi] - t0, c0[lo:hi]), 1)
        np.add.at(diff, (q[lo:hi] - t0, c1[lo:hi]), -1)
        hit = np.cumsum(diff[:, :n], axis=1) > 0                # [rows, n]: query attends column
        if exact:
            out[t0:t0 + rows] = hit
        else:
            r = np.arange(t0, t0 + rows) * n // T                 # sorted: sum runs of rows
            uniq, first = np.unique(r, return_index=True)
            out[uniq] += np.add.reduceat(hit.astype(np.float32), first, axis=0)
        if progress is not None:
            progress((t0 + rows) / T)
    if not exact:
        out /= np.bincount(np.arange(T) * n // T, minlength=n).astype(np.float32)[:, None]
    return out


def attention_masks(spec: Spec, T: int, indices=None, size: Optional[int] = None, progress=None) -> dict:
    """Which keys each query attends, per branch: ``{branch name: bool array}`` in spec order.

    ``T``: sequence length. ``indices``: selected blocks, a dict ``{select branch: idx}`` or one
    ``idx`` for a spec with one select branch; ``idx`` is ``[T, top_k]`` or ``[B, T, H, top_k]``
    (row 0, kv head 0), -1 padded (what ``reference(..., return_aux=True)`` returns). Without
    indices a select branch shows only its forced blocks (see the module docstring).
    ``size``: None (or ``>= T``) for exact ``[T, T]`` bool masks, ``[t, p]`` True when query
    ``t`` attends key ``p``; else ``[size, size]`` float32 masks, each cell the fraction of its
    queries that attend any of its keys (see :func:`_rasterize`); ``mask > 0`` is the
    max-pooled mask. ``progress``: called with the share of the work done (0 to 1) as it goes.
    """
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise SpecError("E631", f"the sequence length must be a positive integer, got {T!r}")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise SpecError("E631", f"size must be a positive integer, got {size!r}")
    n = T if size is None else min(T, size)
    if indices is not None and not isinstance(indices, Mapping) and len(spec.of_kind("select")) != 1:
        raise SpecError("E631", "indices: pass a dict {select branch: idx} for a spec with "
                                f"{len(spec.of_kind('select'))} select branches")
    masks = {}
    drawn = _drawn(spec)
    for i, b in enumerate(drawn):
        idx = _selection_for(b, T, indices) if isinstance(b, Select) else None
        done = None if progress is None else (lambda share, i=i: progress((i + share) / len(drawn)))
        masks[b.name] = _rasterize(*_intervals(b, T, idx, spec.causal), T, n, done)
    return masks


def _drawn(spec: Spec) -> list:
    """The branches that attend keys (an indexer only scores: it has no mask of its own)."""
    return [b for b in spec.branches if b.kind != "indexer"]


def keys_per_query(spec: Spec, T: int, indices=None) -> dict:
    """Mean number of keys a query attends, per branch and ``"combined"`` (the union of the
    output's branches, which share keys); exact, from the same intervals as the masks."""
    out, per_query = {}, {}
    for b in _drawn(spec):
        idx = _selection_for(b, T, indices) if isinstance(b, Select) else None
        q, start, end = _intervals(b, T, idx, spec.causal)
        counts = np.bincount(q, weights=np.maximum(end - start, 0), minlength=T)
        out[b.name] = float(counts.mean())
        per_query[b.name] = (q, start, end)
    # the union of the output's intervals: sort them by (query, start) on one line where each
    # query owns [q * (T + 1), q * (T + 1) + T], then count what each adds past the running max end
    parts = [per_query[n] for n in spec.output.branches]
    q_all, s_all, e_all = (np.concatenate([p[i] for p in parts]) for i in range(3))
    keep = e_all > s_all
    base = q_all[keep] * (T + 1)
    s_line, e_line = base + s_all[keep], base + e_all[keep]
    order = np.lexsort((s_line,))
    s_line, e_line = s_line[order], e_line[order]
    reach = np.maximum.accumulate(np.concatenate([[-1], e_line]))[:-1]   # max end before each
    total = int(np.maximum(0, e_line - np.maximum(s_line, reach)).sum())
    out["combined"] = total / T
    return out


# ----------------------------------------------------------------------------- selections

def _shape_free(spec: Spec) -> Spec:
    """The spec without declared shapes, its indexers small (at most 4 heads of 32 dims): the
    picture's random inputs only need the pattern, and the indexer scores every pair."""
    branches = tuple(replace(b, heads=min(b.heads, 4), dim=min(b.dim, 32)) if b.kind == "indexer" else b
                     for b in spec.branches)
    return replace(spec, heads=None, kv_heads=None, qk_dim=None, v_dim=None, branches=branches)


def random_shapes(spec: Spec) -> tuple[int, int, int]:
    """``(heads, kv_heads, dim)`` of :func:`random_selection`'s inputs."""
    G = RANDOM_HEADS
    if spec.heads and spec.kv_heads:
        G = min(16, spec.heads // spec.kv_heads)
    return G * RANDOM_KV_HEADS, RANDOM_KV_HEADS, RANDOM_DIM


def random_selection(spec: Spec, T: int, seed: int = 0):
    """``({select branch: idx [T, top_k]}, description)`` from ``nsa_dsl.reference`` on random
    ``q, k, v`` (batch 1; heads 4 and kv heads 1, or the spec's group size ``heads / kv_heads``
    when it declares one, capped at 16; dims 32). Learned pools get mean pooling."""
    if not spec.of_kind("select"):
        return {}, "static pattern"
    import torch

    import nsa_dsl
    from nsa_dsl.tools.random_inputs import side_inputs
    HQ, H, D = random_shapes(spec)
    run_spec = _shape_free(spec)           # declared shapes would make the inputs huge; G is kept
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, HQ, D, generator=g)
    k = torch.randn(1, T, H, D, generator=g)
    v = torch.randn(1, T, H, D, generator=g)
    C = len(spec.output.branches)
    gates = torch.full((1, T, HQ, C), 1.0 / C) if spec.output.kind == "gate" else None
    compressed, index = side_inputs(run_spec, k, v, g)
    with torch.no_grad():
        _, aux = nsa_dsl.reference(run_spec, q, k, v, gates, compressed=compressed or None,
                                   index=index or None, return_aux=True)
    sel = {name: idx[0, :, 0].cpu().numpy() for name, idx in aux.indices.items()}
    note = (f"selection from random inputs (seed {seed}; heads {HQ}, kv_heads {H}, dims {D}"
            + ("; mean pooling for learned pools" if compressed else "") + ")")
    return sel, note


def _example_module():
    """``train_tiny_lm`` (the training example, ``nsa_dsl.examples``) as a module."""
    try:
        return importlib.import_module("nsa_dsl.examples.train_tiny_lm")
    except ModuleNotFoundError as e:
        raise SpecError("E635", f"cannot import the training example that defines the checkpoint's model ({e})",
                        hint="reinstall nsa-dsl (pip install nsa-dsl), which ships nsa_dsl.examples") from None


def _same_pattern(a: Spec, b: Spec) -> bool:
    """Same branches and output, whatever the names of the blocks and the shape fields."""
    strip = lambda s: _shape_free(s).canonical().split("\n", 2)[2]   # noqa: E731
    return strip(a) == strip(b)


def model_selection(spec: Spec, T: int, checkpoint: str, layer: int = 0, seed: int = 0):
    """``({select branch: idx [T, top_k]}, description, marks)``: the blocks layer ``layer`` of a
    model saved by ``examples/train_tiny_lm.py --save`` selects (batch row 0, kv head 0) on a
    sample sequence of its training task, of length ``T``. ``marks``: ``(t, p)`` pairs, the
    query ``t`` of each answer and the position ``p`` of the value it has to retrieve."""
    import torch
    ex = _example_module()
    if not Path(checkpoint).exists():
        raise SpecError("E632", f"cannot read checkpoint {checkpoint}: no such file")
    if not Path(checkpoint).is_file():
        raise SpecError("E632", f"cannot read checkpoint {checkpoint}: it is not a regular file",
                        hint="pass the .pt file that examples/train_tiny_lm.py --save wrote")
    try:
        model, ckpt = ex.load_checkpoint(checkpoint)
    except SpecError:
        raise
    except Exception as e:  # torch.load's many failure types
        first = (str(e).splitlines() or [""])[0][:200]
        raise SpecError("E632", f"cannot load checkpoint {checkpoint}: {first}",
                        hint="write one with: python examples/train_tiny_lm.py --save CKPT") from None
    if ckpt.get("attn") != "nsa":
        raise SpecError("E634", f"checkpoint {checkpoint} holds a model with {ckpt.get('attn')} "
                                "attention, which selects nothing",
                        hint="save the sparse model: train_tiny_lm.py --attn nsa --save CKPT")
    if not _same_pattern(spec, model.spec):
        raise SpecError("E633", f"checkpoint {checkpoint} was trained with attention "
                                f"'{model.spec.name}', whose pattern differs from '{spec.name}'",
                        hint="show the spec the model was trained with:\n"
                             + "\n".join("      " + line for line in model.spec.source.strip().splitlines()))
    n_layers = len(model.blocks)
    if not -n_layers <= layer < n_layers:
        raise SpecError("E634", f"layer {layer}: the model has {n_layers} layers (0 .. {n_layers - 1})")
    layer = layer % n_layers
    try:
        tokens, targets = ex.make_batch(model.cfg, 1, torch.Generator().manual_seed(seed), seq_len=T)
    except ValueError as e:
        raise SpecError("E631", f"--seq-len {T}: {e}") from None
    with torch.no_grad():
        _, auxes = model(tokens, return_aux=True)
    sel = {name: idx[0, :, 0].cpu().numpy() for name, idx in auxes[layer].indices.items()}
    note = (f"selection of layer {layer} (kv head 0) of {Path(checkpoint).name} "
            f"({ckpt.get('steps', '?')} steps) on a sample sequence of its task")
    marks = []                              # (answer query, position of the value it must read)
    row = tokens[0].tolist()
    for t in (targets[0] >= 0).nonzero().flatten().tolist():
        earlier = [p for p in range(t) if row[p] == row[t]]
        if earlier:
            marks.append((t, earlier[0] + 1))
    return sel, note, marks


# ----------------------------------------------------------------------------------- cost

#: ``nsa-dsl show`` warns when its estimate passes WARN_SECONDS, refuses past REFUSE_SECONDS
#: (unless ``--force``), and draws a progress bar on stderr past PROGRESS_SECONDS
WARN_SECONDS, REFUSE_SECONDS, PROGRESS_SECONDS = 20.0, 120.0, 3.0

# Seconds per unit of work, measured on a 2-core x86 CPU (torch 2.13 and numpy, float32):
# multiply-adds of the reference's small per-chunk products, of a large matrix product (the
# compressed-to-selection overlap weights), elementwise passes, scores ranked (two stable sorts),
# key/value elements gathered, mask intervals (numpy scatter-adds), mask cells (cumulative sums),
# and the picture itself. A shared or slower machine takes longer.
_SECONDS_PER = {"mac": 1.0e-10, "matmul": 1.7e-11, "elem": 1.25e-10, "rank": 4.0e-8,
                "gather": 2.0e-9, "interval": 4.0e-7, "count": 2.0e-7, "cell": 3.0e-8, "picture": 1.5}
_REFERENCE_CHUNK = 256     # queries per chunk of the reference; a window chunk reads w + 255 keys


@dataclass(frozen=True)
class Estimate:
    """What ``nsa-dsl show`` will cost: ``phases``, ``(name, seconds)`` in the order they run (a
    rough guide, see ``_SECONDS_PER``), and ``heaviest``, the largest piece of work in words."""
    phases: tuple
    heaviest: str

    @property
    def seconds(self) -> float:
        return sum(sec for _, sec in self.phases)


def _reference_terms(spec: Spec, T: int, heads: int, kv_heads: int, dim: int) -> list:
    """``[(seconds, description)]``: ``nsa_dsl.reference`` (no gradient) on ``[1, T, heads, dim]``
    queries and ``kv_heads`` key/value heads, branch by branch as it computes them."""
    c, H, G, D = _SECONDS_PER, kv_heads, max(1, heads // max(1, kv_heads)), dim
    used = set(spec.output.branches) | {b.score for b in spec.of_kind("select")}
    terms = []

    def n_cmp(b):
        return 0 if T < b.block else (T - b.block) // b.stride + 1

    for b in spec.branches:
        if b.name not in used:
            continue
        if isinstance(b, Compress):
            pairs = T * n_cmp(b) * H * G
            terms.append((pairs * (2 * D * c["mac"] + 8 * c["elem"]),
                          f"compression '{b.name}': {T} queries x {n_cmp(b)} compressed blocks"))
        elif b.kind == "indexer":               # scored at most 4 x 32 (_shape_free)
            terms.append((T * T * min(b.heads, 4) * min(b.dim, 32) * c["mac"],
                          f"indexer '{b.name}': {T} queries x {T} keys"))
        elif isinstance(b, Select) and spec.score_kind(b) == "indexer":
            keys = T * b.top_k
            terms.append((keys * H * (2 * D * c["gather"] + G * (2 * D * c["mac"] + 8 * c["elem"])) + T * T * c["rank"],
                          f"selection '{b.name}': {T} queries x {b.top_k} tokens"))
        elif isinstance(b, Select):
            n_sel = -(-T // b.block)
            if b.score == "mean_pool":
                score = T * n_sel * H * G * D * c["mac"]
                what = f"scoring '{b.name}': {T} queries x {n_sel} blocks"
            else:
                nc = n_cmp(spec.branch(b.score))
                score = T * nc * H * (G * (D * c["mac"] + 8 * c["elem"]) + n_sel * c["matmul"])
                what = f"scoring '{b.name}': {T} queries x {nc} compressed blocks x {n_sel} selection blocks"
            terms.append((score + T * H * n_sel * c["rank"], what))
            keys = T * H * b.top_k * b.block
            terms.append((keys * (2 * D * c["gather"] + G * (2 * D * c["mac"] + 8 * c["elem"])),
                          f"selection '{b.name}': {T} queries x {b.top_k * b.block} keys"))
        elif isinstance(b, Window):
            keys = min(T, b.size + _REFERENCE_CHUNK - 1) + b.sinks
            terms.append((T * keys * H * G * (2 * D * c["mac"] + 8 * c["elem"]),
                          f"window '{b.name}': {T} queries x {keys} keys per chunk"))
    return terms


def _intervals_per_branch(b, T: int) -> int:
    return T * b.top_k if isinstance(b, Select) else 2 * T if isinstance(b, Window) else \
        0 if b.kind == "indexer" else T


def estimate(spec: Spec, T: int, *, size: int = DEFAULT_SIZE, model: Optional[Mapping] = None) -> Estimate:
    """The cost of ``nsa-dsl show`` at length ``T``: the selection (``nsa_dsl.reference`` on
    random inputs of :func:`random_shapes` when the spec selects; with ``model``, a dict of
    ``heads``, ``kv_heads``, ``dim`` and ``layers`` (see :func:`checkpoint_shapes`), the model's
    forward, one reference run per layer), the masks at ``size`` cells per side, the key counts
    and the picture."""
    c = _SECONDS_PER
    terms = []
    if model:
        for sec, what in _reference_terms(spec, T, model["heads"], model["kv_heads"], model["dim"]):
            terms.append((sec * model["layers"], what + f" in each of {model['layers']} layers"))
    elif spec.of_kind("select"):
        terms = _reference_terms(spec, T, *random_shapes(spec))
    n = min(T, size)
    masks = [(_intervals_per_branch(b, T) * c["interval"] + T * (n + 1) * c["cell"],
              f"mask '{b.name}': {T} queries x {n} cells") for b in spec.branches]
    counts = sum(_intervals_per_branch(b, T) for b in spec.branches) * c["count"]
    phases = (("selection", sum(sec for sec, _ in terms)), ("masks", sum(sec for sec, _ in masks)),
              ("key counts", counts), ("picture", c["picture"]))
    heaviest = max(terms + masks, key=lambda term: term[0])[1]
    return Estimate(tuple((name, sec) for name, sec in phases if sec > 0), heaviest)


def longest_within(spec: Spec, seconds: float, *, size: int = DEFAULT_SIZE, model: Optional[Mapping] = None) -> int:
    """The largest length whose :func:`estimate` stays within ``seconds`` (at least 1)."""
    lo, hi = 1, 2
    while hi < 1 << 40 and estimate(spec, hi, size=size, model=model).seconds <= seconds:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if estimate(spec, mid, size=size, model=model).seconds <= seconds else (lo, mid)
    return lo


def checkpoint_shapes(checkpoint) -> dict:
    """``{heads, kv_heads, dim, layers}`` of a model saved by ``examples/train_tiny_lm.py``, for
    :func:`estimate`; ``{}`` when the file cannot be read that way (:func:`model_selection` then
    says why)."""
    try:
        import torch
        cfg = torch.load(str(checkpoint), map_location="cpu", weights_only=True)["config"]
        heads, hidden = int(cfg["heads"]), int(cfg["hidden"])
        return {"heads": heads, "kv_heads": int(cfg.get("kv_heads", 1)), "dim": max(1, hidden // heads),
                "layers": int(cfg["layers"])}
    except Exception:           # torch.load's many failure types; a foreign or missing file
        return {}


# -------------------------------------------------------------------------------- picture

def _colors(spec: Spec) -> dict:
    used = {}
    out = {}
    for b in spec.branches:
        shades = BRANCH_COLORS.get(b.kind, ["#555555"])
        out[b.name] = shades[used.get(b.kind, 0) % len(shades)]
        used[b.kind] = used.get(b.kind, 0) + 1
    return out


def _describe(b) -> str:
    """The branch as written in the spec; a select call breaks after its score (panel titles)."""
    return b.call_text().replace(", keep_first", ",\nkeep_first")


_PRIORITY = {"compress": 0, "select": 1, "window": 2}    # drawn in this order on the combined panel
_TINT = {"compress": 0.45}                               # compression: a light tint there


def _paint(rgb: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """White blended toward ``rgb`` by ``strength`` (0: white, 1: the colour)."""
    return 1.0 - (1.0 - rgb) * np.asarray(strength)[..., None]


def _rgb(hex_color: str) -> np.ndarray:
    h = hex_color.lstrip("#")
    return np.array([int(h[i:i + 2], 16) / 255.0 for i in (0, 2, 4)])


def _import_pyplot(code: str = "E630", needed_by: str = "nsa-dsl show", alternative: str = ""):
    """matplotlib.pyplot on the Agg backend; without matplotlib a SpecError ``code`` naming what
    needs it (``nsa-dsl bench --plot`` uses this too, with its own code)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise SpecError(code, f"{needed_by} needs matplotlib, which is not installed",
                        hint="pip install matplotlib (or: pip install 'nsa-dsl[bench]')" + alternative) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _pool(mask: np.ndarray, n: int) -> np.ndarray:
    """A mask (bool, or the fractions of :func:`_rasterize`) as ``[n, n]`` float fractions:
    rows (queries) averaged, columns (keys) max-pooled, in the binning of
    :func:`attention_masks`."""
    m = mask.shape[0]
    mask = mask.astype(np.float32)
    if n >= m:
        return mask
    edges = (np.arange(n) * m + n - 1) // n               # first source cell of each target cell
    sizes = np.diff(np.append(edges, m)).astype(np.float32)
    rows = np.add.reduceat(mask, edges, axis=0) / sizes[:, None]
    return np.maximum.reduceat(rows, edges, axis=1)


def _stripes(branch, T: int, n: int) -> Optional[np.ndarray]:
    """``[n]`` floats: a lighter shade on every other block of keys (compress: the stride-d
    segments; select: the selection blocks), so adjacent blocks stay apart; None when a
    column spans more than half a block (the stripes would alias)."""
    unit = branch.stride if isinstance(branch, Compress) else branch.block if isinstance(branch, Select) else 0
    if not unit or T / n > unit / 2:
        return None
    centre = (np.arange(n) + 0.5) * T / n
    return np.where((centre // unit) % 2 == 1, 0.72, 1.0)


def render_png(spec: Spec, masks: dict, T: int, path, *, title: str = "",
               stats: Optional[dict] = None, marks: Optional[list] = None,
               panel_px: int = DEFAULT_SIZE, dpi: int = 100) -> Path:
    """Draw ``masks`` (from :func:`attention_masks`) to a PNG at ``path``; returns the path.

    One panel per branch (its colour on white) and, for several branches, a combined panel of
    the output's branches (compression as a light tint, then selection, the window on top); query
    position down the y axis, key position along the x axis, in token positions. Each panel is
    ``panel_px`` pixels square and shows one mask cell per pixel: masks of ``panel_px`` cells
    (``attention_masks(..., size=panel_px)``) are drawn exactly, larger ones are pooled to it
    first (queries averaged, keys max-pooled). ``stats``: panel name (a branch or
    ``"combined"``) -> mean keys per query, shown in its title. ``marks``: ``(query, key)``
    positions circled on the select and combined panels (e.g. each answer of a retrieval task
    and the key it needs).
    """
    plt = _import_pyplot()
    from matplotlib.patches import Patch

    names = list(masks)
    colors = _colors(spec)
    with_combined = len(names) > 1         # one branch: the combined panel would repeat it
    panels = names + (["combined"] if with_combined else [])
    cols = len(panels) if len(panels) <= 2 else 2 if len(panels) <= 4 else 3
    rows = math.ceil(len(panels) / cols)

    # A fixed layout in inches, so each panel has exactly panel_px (+ a one-pixel margin each
    # side, which keeps a one-key column at position 0, a sink, off the axis line) pixels.
    side = (panel_px + 2) / dpi
    left, gap_x, right = 0.8, 0.9, 0.3
    top, head, foot, bottom = 0.8, 0.7, 0.6, 0.55     # figure title, panel titles, x labels, note
    width = max(left + cols * side + (cols - 1) * gap_x + right, 10.5)
    height = top + rows * (head + side + foot) + bottom
    x0 = (width - (cols * side + (cols - 1) * gap_x)) / 2 + (left - right) / 2
    fig = plt.figure(figsize=(width, height), dpi=dpi)
    axes = []
    for i in range(len(panels)):
        r, c = divmod(i, cols)
        x = x0 + c * (side + gap_x)
        y = height - top - r * (head + side + foot) - head - side
        axes.append(fig.add_axes((x / width, y / height, side / width, side / height)))

    n_mask = next(iter(masks.values())).shape[0]
    n = min(n_mask, panel_px)
    pad = T / n                                   # one cell
    extent = (0, T, T, 0)
    stats = stats or {}
    for ax, name in zip(axes, panels):
        if name == "combined":
            label = (f"combined: output = {spec.output.kind}({', '.join(spec.output.branches)})"
                     "\nwhere branches overlap the one drawn last shows")
        else:
            role = "  [scores only]" if name not in spec.output.branches else ""
            label = f"{name} = {_describe(spec.branch(name))}{role}"
        if name in stats:
            label += f"\n{stats[name]:.1f} keys per query on average"
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("key position", fontsize=9)
        ax.set_ylabel("query position", fontsize=9)
        ax.set_xlim(-pad, T + pad)
        ax.set_ylim(T + pad, -pad)
        ax.tick_params(labelsize=8)
    fig.suptitle(title or f"{spec.name}: keys attended per query, T = {T}", fontsize=12,
                 y=1 - 0.12 / height, va="top")
    per = T / n
    fig.text(0.5, 0.12 / height, ("each square is one query and one key" if per <= 1 else
             f"each pixel holds ~{per:.3g} x {per:.3g} query-key pairs; its colour strength is the share of "
             "its queries that attend one of its keys\n(pale: few of them; a band one key wide still shows)")
             + "; every other stride segment (compress) and block (select) is drawn lighter when "
               "a pixel is narrow enough", ha="center", va="bottom", fontsize=9)

    combined = np.ones((n, n, 3))
    for ax, name in zip(axes, names):
        m = _pool(masks[name], n)
        rgb = _rgb(colors[name])
        shade = _stripes(spec.branch(name), T, n)
        strength = np.where(m > 0, 0.2 + 0.8 * m, 0.0)              # any pair shows; all: full colour
        if shade is not None:
            strength = strength * shade[None, :]                    # lighter every other block
        ax.imshow(_paint(rgb, strength), extent=extent, interpolation="nearest", aspect="equal")
    # combined: compression as a light tint under everything, then selection, the window on top
    order = sorted(spec.output.branches, key=lambda nm: _PRIORITY.get(spec.branch(nm).kind, 1))
    for name in order:
        m = _pool(masks[name], n)
        tint = _TINT.get(spec.branch(name).kind, 1.0)
        strength = np.where(m > 0, (0.2 + 0.8 * m) * tint, 0.0)
        layer = _paint(_rgb(colors[name]), strength)
        combined = np.where((m > 0)[..., None], layer, combined)
    circled = [axes[i] for i, nm in enumerate(names) if spec.branch(nm).kind == "select"]
    if with_combined:
        ax = axes[len(names)]
        ax.imshow(combined, extent=extent, interpolation="nearest", aspect="equal")
        handles = [Patch(color=_paint(_rgb(colors[nm]), np.array(_TINT.get(spec.branch(nm).kind, 1.0))),
                         label=nm) for nm in spec.output.branches]
        ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9)
        circled.append(ax)
    if marks:                              # answers: the query, and the key it has to read
        tq = np.array([m[0] for m in marks]) + 0.5
        kp = np.array([m[1] for m in marks]) + 0.5
        for a in circled:
            a.scatter(kp, tq, s=36, facecolors="none", edgecolors="black", linewidths=1.0, zorder=3)

    path = Path(path)
    kinds = fig.canvas.get_supported_filetypes()
    kind = path.suffix.lstrip(".").lower()
    if kind not in kinds:
        plt.close(fig)
        raise SpecError("E631", f"--out {path}: matplotlib writes no '{kind or '(none)'}' files",
                        hint=f"end the name with one of {', '.join('.' + k for k in sorted(kinds))}, e.g. .png")
    output_folder(path.parent, "--out")
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format=kind)
    plt.close(fig)
    return replace_file(path, buffer.getvalue(), "--out")
