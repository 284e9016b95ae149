"""Context parallelism: one sequence across the ranks of a torch.distributed group.

    o = op(q, k, v, gates, cp_group=group)                    # CompiledOp; q, k, v, gates: this rank's shard
    o = context_parallel.attention(spec, q, k, v, gates, group=group)   # the reference
    layer = nsa_dsl.SparseAttention(spec, hidden, cp_mesh=mesh["cp"])  # x: this rank's shard

Layout (load-balanced for causal attention, as torch's context-parallel SDPA): the sequence of
``T`` positions is cut into ``2N`` chunks of ``c = T / 2N``; rank ``r`` of ``N`` holds chunks ``r``
and ``2N-1-r``, in that order, as its ``T / N`` rows (``shard_sequence``). Packed sequences keep
one global ``cu_seqlens`` on every rank; their boundaries may fall anywhere, inside or across
shards.

Per layer (the all-gather design of flash_nsa: GQA keeps K/V a small fraction of the queries):
  1. all-gather the raw K/V (and indexer keys) in global order (``gather_sequence``: one
     ``torch.distributed`` functional all-gather per tensor, issued asynchronously; its backward
     reduce-scatters the gradient, so each rank gets the gradient of its own K/V rows summed
     over every rank's queries);
  2. pool the compressed blocks locally from the gathered keys (mean pooling here; learned
     pooling by the caller: the layer's pools run on the gathered keys, on every rank);
  3. attend the rank's queries over the whole sequence's keys: one call per contiguous range
     of rows with ``q_start`` = its first position (rank ``N-1``'s two chunks are adjacent: one
     call). Packed: the sequences wholly inside a range run as one packed call, and each
     sequence the range cuts runs its piece as a ``q_start`` call on that sequence's keys.

Parameters are replicated over the context group and each rank's loss covers its own tokens,
so every parameter's gradient (projections, learned pools, gates) is a per-rank partial sum,
exactly as under data parallelism: reduce gradients over the flattened data x context mesh
(FSDP2 ``fully_shard(model, mesh=mesh["dp", "cp"]._flatten())``, as torchtitan does, or DDP over
that group, or ``all_reduce_gradients``). Only the K/V gradients need the reduce-scatter of
step 1, and it is inside ``gather_sequence``.

``query_block = Q`` selections share a choice between Q aligned positions, so every cut must be
at a multiple of Q inside its sequence: the chunk length ``T / 2N`` (packed: each chunk boundary
that falls inside a sequence, counted from its start) is checked (E629).

The op is the reference or the compiled op, whose kernels take query pieces (``q_start``; an op
without it gets E614 where a piece would be needed, on every rank before any collective).

What each rank communicates and holds per layer: ``nsa-dsl explain FILE --cp N``
(``nsa_dsl.tools.explain.cp_cost``); ``STATS`` counts what this process actually sent and
received, for tests and measurements.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from nsa_dsl.errors import SpecError
from nsa_dsl.language.ir import Spec
from nsa_dsl.language.rules import num_compressed_blocks
from nsa_dsl.semantics import varlen
from nsa_dsl.semantics.inputs import needed_branches
from nsa_dsl.semantics.reference import Aux, mean_pool, reference

__all__ = ["attention", "attention_gathered", "gather_sequence", "shard_sequence", "Layout",
           "process_group", "all_reduce_gradients", "STATS", "CommStats", "layer_forward"]


# ----------------------------------------------------------------------------- the group

def process_group(cp):
    """``(group, world, rank)`` of a ``cp_group`` / ``cp_mesh``: a ProcessGroup or a 1-D DeviceMesh
    (no collective runs)."""
    import torch.distributed as dist
    if not dist.is_available():
        raise SpecError("E650", "context parallelism needs torch.distributed, which this torch build lacks")
    from torch.distributed.device_mesh import DeviceMesh
    if isinstance(cp, DeviceMesh):
        if cp.ndim != 1:
            raise SpecError("E650", f"cp_mesh has {cp.ndim} dims {tuple(cp.mesh_dim_names or ())}; context "
                                    "parallelism runs over one", hint='pass its context dim: mesh["cp"]')
        cp = cp.get_group()
    if not isinstance(cp, dist.ProcessGroup):
        raise SpecError("E650", f"cp_group must be a torch.distributed ProcessGroup or a 1-D DeviceMesh, "
                                f"got {type(cp).__name__}",
                        hint='dist.new_group(ranks), or init_device_mesh(...)["cp"]')
    if not dist.is_initialized():
        raise SpecError("E650", "context parallelism needs torch.distributed initialised",
                        hint="launch with torchrun and call torch.distributed.init_process_group() first")
    return cp, dist.get_world_size(cp), dist.get_rank(cp)


# ----------------------------------------------------------------------------- communication

@dataclass
class CommStats:
    """Bytes this process moved through ``gather_sequence``: ``gathered`` received by its
    all-gathers (forward), ``scattered`` sent by their reduce-scatters (backward); the ring
    algorithms' volume, ``(N-1)/N`` of the whole tensor. Not counted under torch.compile."""
    gathered: int = 0
    scattered: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.gathered = self.scattered = self.calls = 0


STATS = CommStats()


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along dim 0 with autograd (backward: reduce-scatter, sum), asynchronous: the
    result waits for the collective at its first use."""
    import torch.distributed._functional_collectives as fc
    fn = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    return fn(x, 0, group)


@dataclass
class _Started:
    """A gather in flight: the rank-ordered result (waited at first use)."""
    value: torch.Tensor
    world: int


def gather_start(x: torch.Tensor, group, world: int) -> _Started:
    """Issue the all-gather of the shards ``x [B, T/N, ...]``; ``gather_finish`` orders the result."""
    xt = x.movedim(1, 0).contiguous()                     # [T/N, B, ...]: gather along dim 0
    y = _all_gather(xt, group)                            # [N * T/N, B, ...], rank order
    if not torch.compiler.is_compiling():
        part = xt.nbytes * (world - 1)
        STATS.gathered += part
        STATS.calls += 1
        if y.requires_grad:
            y.register_hook(lambda g, part=part: _count_scatter(part))
    return _Started(y, world)


def _count_scatter(part: int) -> None:
    STATS.scattered += part


def gather_finish(s: _Started) -> torch.Tensor:
    """``[B, T, ...]`` in global order from the rank-ordered gather: rank ``r``'s rows are chunks
    ``r`` and ``2N-1-r``, so chunks ``0 .. N-1`` are the ranks' first halves and ``N .. 2N-1``
    their second halves in reverse rank order."""
    y = s.value
    if s.world == 1:
        return y.movedim(0, 1).contiguous()
    y = y.unflatten(0, (s.world, 2, -1)).movedim(3, 0)    # [B, N, 2, c, ...]
    return torch.cat([y[:, :, 0], y[:, :, 1].flip(1)], 1).flatten(1, 2)   # one contiguous copy


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """The whole sequence ``[B, T, ...]`` from every rank's shard ``x [B, T/N, ...]`` (global
    order); differentiable: the backward reduce-scatters the gradient (sum over ranks)."""
    pg, world, _ = process_group(group)
    return gather_finish(gather_start(x, pg, world))


def _gather_all(tensors: dict, group, world: int) -> dict:
    """Gather several tensors at once (each distinct tensor once): every collective is issued
    before the first result is used."""
    started, out = {}, {}
    for name, x in tensors.items():
        if id(x) not in started:
            started[id(x)] = gather_start(x, group, world)
    done = {key: gather_finish(s) for key, s in started.items()}
    for name, x in tensors.items():
        out[name] = done[id(x)]
    return out


def all_reduce_gradients(module: torch.nn.Module, group, average: bool = True) -> None:
    """All-reduce every parameter gradient of ``module`` over ``group`` (the context group, or the
    flattened data x context group), averaged by default. Needed when neither FSDP nor DDP reduces
    gradients over the context dim: each rank's gradient covers its own tokens only."""
    import torch.distributed as dist
    pg, world, _ = process_group(group)
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=pg)
            if average:
                p.grad.div_(world)


# ----------------------------------------------------------------------------- layout

def chunk_ranges(T: int, world: int, rank: int) -> list[tuple[int, int]]:
    """The global rows ``[(start, end)]`` rank ``rank`` holds, in its local order: chunks ``rank``
    and ``2N-1-rank`` of ``2N``, merged into one range when adjacent (rank ``N-1``)."""
    c = T // (2 * world)
    first, second = (rank * c, (rank + 1) * c), ((2 * world - 1 - rank) * c, (2 * world - rank) * c)
    if first[1] == second[0]:
        return [(first[0], second[1])]
    return [first, second]


def shard_sequence(x: torch.Tensor, group=None, *, world: Optional[int] = None, rank: Optional[int] = None,
                   dim: int = 1) -> torch.Tensor:
    """This rank's shard of a whole sequence ``x`` (along ``dim``): chunks ``r`` and ``2N-1-r`` of
    ``2N``. ``group`` (a ProcessGroup or 1-D DeviceMesh), or ``world`` and ``rank`` explicitly."""
    if group is not None:
        _, world, rank = process_group(group)
    T = x.shape[dim]
    _check_length(T, world)
    return torch.cat([x.narrow(dim, s, e - s) for s, e in chunk_ranges(T, world, rank)], dim)


def _check_length(T: int, world: int) -> None:
    if world > 1 and T % (2 * world):
        raise SpecError("E651", f"a sequence of {T} positions does not split into 2 x {world} equal chunks",
                        hint=f"context parallelism over {world} ranks needs T a multiple of {2 * world} "
                             f"(each rank holds T / {world} rows: chunks r and {2 * world - 1} - r); pad the batch")


@dataclass(frozen=True)
class Piece:
    """One attention call of a rank: local query rows ``rows``, positions ``q_start ..`` of a
    sequence whose keys are the global rows ``keys`` (``q_start`` None: the rows are whole
    sequences, ``cu`` their packed offsets when several, ``seqs`` the packed sequences' indices)."""
    rows: tuple[int, int]
    keys: tuple[int, int]
    q_start: Optional[int] = None
    cu: Optional[tuple[int, ...]] = None
    seqs: Optional[tuple[int, int]] = None


@dataclass(frozen=True)
class Layout:
    """A rank's shard of one (possibly packed) sequence and the calls that attend it."""
    T: int
    world: int
    rank: int
    cu: Optional[tuple[int, ...]]            # global packed offsets, or None
    pieces: tuple[Piece, ...] = field(default=())

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return chunk_ranges(self.T, self.world, self.rank)

    def rows(self, device=None) -> torch.Tensor:
        """``[T / N]`` int64: the global row of each local row."""
        return torch.cat([torch.arange(s, e, device=device) for s, e in self.ranges])

    def positions(self, device=None) -> torch.Tensor:
        """Each local row's position in its sequence (rotary): the global row, or with packed
        sequences the row's offset in its own sequence."""
        rows = self.rows(device)
        return rows if self.cu is None else varlen.positions(list(self.cu), device)[rows]

    @staticmethod
    def of(spec: Spec, world: int, rank: int, T_local: int, cu_seqlens=None, device=None,
           takes_q_start: bool = True) -> "Layout":
        """Check the shard (every rank reaches the same verdict: no rank enters a collective that
        another has left) and plan its calls."""
        if world > 1 and T_local % 2:
            raise SpecError("E651", f"a shard of {T_local} rows: each rank holds two equal chunks",
                            hint="shard with nsa_dsl.runtime.context_parallel.shard_sequence")
        T = T_local * world
        _check_length(T, world)
        cu = None
        if cu_seqlens is not None:
            whole = torch.empty(1, 1, device=device if device is not None else cu_seqlens.device).expand(1, T)
            cu = tuple(varlen.check_cu_seqlens(cu_seqlens, whole, f"the whole sequence ({world} shards of {T_local})"))
        bounds = [(0, T)] if cu is None else list(zip(cu[:-1], cu[1:]))
        cuts = sorted({e for r in range(world) for _, e in chunk_ranges(T, world, r)} - {T})
        cut_in = [(x, a) for x in cuts for a, b in bounds if a < x < b]   # (cut, start of the sequence it cuts)
        Q = max([b.query_block for b in needed_branches(spec) if b.kind == "select"] + [1])
        bad = [(x, a) for x, a in cut_in if (x - a) % Q]
        if bad:
            x, a = bad[0]
            raise SpecError("E629", f"context parallel over {world} ranks cuts a sequence at its position {x - a} "
                                    f"(row {x}), inside a group of query_block = {Q} positions",
                            hint=f"chunks of T / {2 * world} = {T // (2 * world)} rows must start at multiples of {Q} "
                                 "in their sequence: pad T, or align packed sequences to the chunks")
        if cut_in and not takes_q_start:
            raise SpecError("E614", "context parallel over several ranks attends pieces of sequences "
                                    "(q_start), which this op does not take (no q_start argument)",
                            hint="use nsa_dsl.compile(spec) or the reference (context_parallel.attention(spec, ...)), "
                                 "or one rank")
        layout = Layout(T, world, rank, cu)
        return Layout(T, world, rank, cu, tuple(layout._plan()))

    def _plan(self):
        lo = 0
        for s, e in self.ranges:
            if self.cu is None:
                yield Piece((lo, lo + e - s), (0, self.T), None if (s, e) == (0, self.T) else s)
            else:
                yield from self._plan_packed(s, e, lo)
            lo += e - s

    def _plan_packed(self, s: int, e: int, lo: int):
        cu, run = self.cu, []             # run: consecutive whole sequences (empty ones between)

        def flush():
            if run:
                j0, j1 = run[0], run[-1] + 1
                a, b = cu[j0], cu[j1]
                yield Piece((lo + a - s, lo + b - s), (a, b), None,
                            None if j1 - j0 == 1 else tuple(x - a for x in cu[j0:j1 + 1]), (j0, j1))
                run.clear()
        for j in range(len(cu) - 1):
            a, b = cu[j], cu[j + 1]
            if b <= s or a >= e or a == b:
                continue
            if s <= a and b <= e:
                run.append(j)
                continue
            yield from flush()
            p, q = max(a, s), min(b, e)
            yield Piece((lo + p - s, lo + q - s), (a, b), p - a, None, (j, j + 1))
        yield from flush()


def _takes_q_start(op) -> bool:
    try:
        params = inspect.signature(op).parameters
    except (TypeError, ValueError):
        return False
    return "q_start" in params


# ----------------------------------------------------------------------------- attention

def _spec_op(op):
    """``(spec, callable)``: a Spec runs the reference; an op (CompiledOp) carries its spec."""
    if isinstance(op, Spec):
        return op, functools.partial(reference, op)
    spec = getattr(op, "spec", None)
    if not isinstance(spec, Spec):
        raise SpecError("E600", f"context parallel attention needs a Spec or a compiled op, got {type(op).__name__}")
    return spec, op


def _raw_names(spec: Spec, compressed: Mapping) -> list[str]:
    """Branches whose raw keys the call reads (the tensors to gather)."""
    return [b.name for b in needed_branches(spec)
            if b.kind in ("select", "window") or (b.kind == "compress" and b.name not in compressed)]


def _per_name(x, names):
    return {n: (x[n] if isinstance(x, Mapping) else x) for n in names}


def attention(op, q: torch.Tensor, k, v, gates: Optional[torch.Tensor] = None, *, group,
              compressed: Optional[Mapping] = None, scale: Optional[float] = None, return_aux: bool = False,
              indices: Optional[Mapping] = None, index: Optional[Mapping] = None,
              cu_seqlens: Optional[torch.Tensor] = None):
    """The spec's attention for this rank's shard: ``q [B, T/N, HQ, Dqk]``, ``k``, ``v``
    (``[B, T/N, H, D]`` tensors or dicts by branch), ``gates``, ``indices`` and the indexer's
    ``q_idx``, ``k_idx``, ``w_idx`` hold the rank's rows (``shard_sequence``); returns the rank's
    rows of the output (and of ``Aux`` with ``return_aux``). ``op``: a Spec (the reference runs)
    or a compiled op. ``compressed``: the *whole* sequence's compressed keys and values (learned
    pooling: pool ``gather_sequence(k, group)``). ``cu_seqlens``: the global packed offsets."""
    spec, fn = _spec_op(op)
    pg, world, rank = process_group(group)
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise SpecError("E601", f"q must be a 4-D tensor [B, T/N, HQ, Dqk] (this rank's shard), got {type(q).__name__}")
    layout = Layout.of(spec, world, rank, q.shape[1], cu_seqlens, q.device, _takes_q_start(fn))
    compressed = dict(compressed or {})
    names = _raw_names(spec, compressed)
    for what, x in (("k", k), ("v", v)):
        if not isinstance(x, (torch.Tensor, Mapping)):
            raise SpecError("E601", f"{what} must be a tensor or a dict of branch name -> tensor, got {type(x).__name__}")
        if isinstance(x, Mapping) and any(n not in x for n in names):
            raise SpecError("E608", f"{what} has no tensor for branch(es) {[n for n in names if n not in x]}, "
                                    "which read raw keys")
    todo = {("k", n): t for n, t in _per_name(k, names).items()}
    todo.update({("v", n): t for n, t in _per_name(v, names).items()})
    index = dict(index or {})
    for name, triple in index.items():
        if isinstance(triple, (tuple, list)) and len(triple) == 3:
            todo[("index", name)] = triple[1]
    got = _gather_all(todo, pg, world)
    k_all = got[("k", names[0])] if isinstance(k, torch.Tensor) and names else {n: got[("k", n)] for n in names}
    v_all = got[("v", names[0])] if isinstance(v, torch.Tensor) and names else {n: got[("v", n)] for n in names}
    index = {n: (t[0], got[("index", n)], t[2]) if ("index", n) in got else t for n, t in index.items()}
    return attention_gathered(fn, spec, q, k_all, v_all, gates, layout, compressed=compressed, scale=scale,
                              return_aux=return_aux, indices=indices, index=index)


def attention_gathered(op, spec: Spec, q, k_all, v_all, gates, layout: Layout, *, compressed=None, scale=None,
                       return_aux: bool = False, indices=None, index=None):
    """``attention`` after the gathers: ``k_all``, ``v_all`` (and each indexer's ``k_idx``) hold the
    whole sequence, ``q``, ``gates``, ``indices``, ``q_idx``, ``w_idx`` the rank's rows; ``op`` is
    called as the reference is, without its spec."""
    compressed = dict(compressed or {})
    cu = None if layout.cu is None else list(layout.cu)
    raw = [b for b in needed_branches(spec) if b.kind in ("select", "window")]
    for b in needed_branches(spec):      # pool once, for every call (a compress-only spec pools in the op)
        if b.kind == "compress" and b.name not in compressed and raw:
            kb, vb = _of(k_all, b.name), _of(v_all, b.name)
            pool = (lambda x: mean_pool(x, b.block, b.stride)) if cu is None else \
                (lambda x: varlen.mean_pool(x, cu, b.block, b.stride))
            compressed[b.name] = (pool(kb), pool(vb))
    _check_compressed(spec, compressed, layout)
    offsets = {n: varlen.compressed_cu_seqlens(cu, spec.branch(n).block, spec.branch(n).stride)
               for n in compressed} if cu is not None else {}

    def rows(x, p: Piece):
        return None if x is None else x[:, p.rows[0]:p.rows[1]]

    def keys(x, p: Piece):
        if isinstance(x, Mapping):
            return {n: keys(t, p) for n, t in x.items()}
        return x[:, p.keys[0]:p.keys[1]]

    outs, auxes = [], []
    for p in layout.pieces:
        kw = {"scale": scale, "return_aux": return_aux}
        if compressed:
            kw["compressed"] = {n: (kc, vc) if p.seqs is None else
                                (kc[:, offsets[n][p.seqs[0]]:offsets[n][p.seqs[1]]],
                                 vc[:, offsets[n][p.seqs[0]]:offsets[n][p.seqs[1]]])
                                for n, (kc, vc) in compressed.items()}
        if indices:
            kw["indices"] = {n: rows(x, p) for n, x in indices.items()}
        if index:
            kw["index"] = {n: (rows(qi, p), keys(ki, p), rows(wi, p)) for n, (qi, ki, wi) in index.items()}
        if p.cu is not None:
            kw["cu_seqlens"] = torch.tensor(p.cu, dtype=torch.int32, device=q.device)
        if p.q_start is not None:
            kw["q_start"] = p.q_start
        r = _eager(op)(rows(q, p), keys(k_all, p), keys(v_all, p), rows(gates, p), **kw)
        outs.append(r[0] if return_aux else r)
        if return_aux:
            auxes.append(r[1])
    o = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    if not return_aux:
        return o
    if len(auxes) == 1:
        return o, auxes[0]
    cat = lambda f: {n: torch.cat([getattr(a, f)[n] for a in auxes], 1) for n in getattr(auxes[0], f)}
    return o, Aux(indices=cat("indices"), lse=cat("lse"), outputs=cat("outputs"), index_loss=cat("index_loss"),
                  spec=spec)


def _eager(op):
    """The reference stays eager under torch.compile (a Python oracle, chunk loops and all: tracing
    it costs minutes and gains nothing); compiled ops are custom ops that compile as they are."""
    if isinstance(op, functools.partial) and op.func is reference:
        return torch.compiler.disable(op, recursive=True)
    return op


def _of(x, name: str):
    return x[name] if isinstance(x, Mapping) else x


def _check_compressed(spec: Spec, compressed: dict, layout: Layout) -> None:
    """The caller's compressed keys cover the whole sequence (a shard's would be sliced wrong)."""
    for name, pair in compressed.items():
        b = spec.branch(name)
        want = num_compressed_blocks(layout.T, b.block, b.stride) if layout.cu is None else \
            varlen.compressed_cu_seqlens(list(layout.cu), b.block, b.stride)[-1]
        got = pair[0].shape[1] if isinstance(pair, (tuple, list)) and isinstance(pair[0], torch.Tensor) else None
        if got is not None and got != want:
            raise SpecError("E601", f"compressed['{name}'] has {got} blocks; the whole sequence of {layout.T} "
                                    f"positions has {want}",
                            hint="with context parallelism, compressed keys are the whole sequence's: pool "
                                 "context_parallel.gather_sequence(k, group)")


# ----------------------------------------------------------------------------- the layer

def layer_forward(layer, x: torch.Tensor, *, cu_seqlens=None, return_aux: bool = False):
    """``SparseAttention.forward`` of a layer built with ``cp_mesh``: ``x [B, T/N, hidden]`` is this
    rank's shard; returns its rows of ``y``. The K/V gathers are issued right after the keys are
    rotated, so the indexer's and the gates' projections run while they are in flight."""
    layer._check_input(x)
    pg, world, rank = process_group(layer.cp_mesh)
    B, T_local, _ = x.shape
    op = layer._op_for(x)
    layout = Layout.of(layer.spec, world, rank, T_local, cu_seqlens, x.device, _takes_q_start(op))
    q, k, v = layer.project(x)
    if layer.rotary is not None:
        q, k = layer._apply_rotary(q, k, layout.positions(x.device))
    ks = k if isinstance(k, dict) else {"": k}
    vs = v if isinstance(v, dict) else {"": v}
    started = {(w, n): gather_start(t, pg, world) for w, d in (("k", ks), ("v", vs)) for n, t in d.items()}
    index = layer.index_inputs(x, layout.positions(x.device)) if len(layer.indexer) else {}
    started.update({("index", n): gather_start(t[1], pg, world) for n, t in index.items()})
    gates = None
    if layer.gate_proj is not None:
        gates = layer.gate_proj(x).view(B, T_local, layer.heads, layer.num_gates)
    got = {key: gather_finish(s) for key, s in started.items()}
    k_all = got[("k", "")] if "" in ks else {n: got[("k", n)] for n in ks}
    v_all = got[("v", "")] if "" in vs else {n: got[("v", n)] for n in vs}
    index = {n: (qi, got[("index", n)], wi) for n, (qi, _, wi) in index.items()}
    cu = None if layout.cu is None else list(layout.cu)
    compressed = {n: (layer.k_pool[n](_of(k_all, n), cu), layer.v_pool[n](_of(v_all, n), cu))
                  for n in layer.k_pool.keys()} or None
    out = attention_gathered(op, layer.spec, q, k_all, v_all, gates, layout, compressed=compressed,
                             scale=layer.scale, return_aux=return_aux, index=index)
    o, aux = out if return_aux else (out, None)
    y = layer.o_proj(o.reshape(B, T_local, layer.heads * layer.v_dim))
    return (y, aux) if return_aux else y
