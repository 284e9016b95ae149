"""``SparseAttention``: a spec as an ``nn.Module`` that drops into a model.

    layer = nsa_dsl.SparseAttention("examples/nsa_paper.nsa", hidden_size=2048)
    y = layer(x)                      # x, y: [B, T, hidden_size]

The layer owns every learned piece around the attention op (docs/SEMANTICS.md, compress):

    x --q_proj-------------------------------> q [B, T, HQ, Dqk] --rotary--+
    x --k_proj / v_proj (shared or per branch)-> k, v [B, T, H, D] --rotary(k)-+--> op --> o --o_proj--> y
                  compress pool = linear|mlp:  k_pool / v_pool -> k_cmp, v_cmp -+     ^
    x --gate_proj-----------> gate logits [B, T, HQ, C]  (output = gate(sigmoid, ...)) ---+

The op is ``nsa_dsl.reference`` (pure PyTorch) or ``nsa_dsl.compile(spec)``
(generated Triton kernels); both take the same arguments, and
:meth:`SparseAttention._attention` is the one place either is called.

Errors (all :class:`~nsa_dsl.errors.SpecError`, which is a ``ValueError``):

| code | meaning |
|---|---|
| E701 | a shape argument conflicts with the value the spec declares |
| E702 | a shape is neither declared by the spec nor passed (or cannot be derived) |
| E703 | a bad constructor argument (sizes, ``backend``, ``spec`` type) |
| E704 | ``x`` has the wrong number of dims or the wrong hidden size |
| E705 | ``x`` has a dtype or device other than the layer's parameters |
| E706 | ``cu_seqlens`` together with ``cache`` (packed prefill into a KV cache is not supported) |
| E620-E625 | a bad ``cu_seqlens`` (see ``nsa_dsl.semantics.varlen``) |
"""
from __future__ import annotations

import functools
import math
import os
from typing import Callable, Optional, Union

import torch
from torch import nn

from nsa_dsl.errors import SpecError
from nsa_dsl.language.checks import check_spec
from nsa_dsl.language.parser import as_spec
from nsa_dsl.language.ir import Spec
from nsa_dsl.runtime.decoding import DecodeOp, decode_torch, per_token
from nsa_dsl.runtime.kv_cache import NSACache, PagedNSACache, _host_driven

BACKENDS = ("auto", "reference", "kernels")
LEARNED_POOLS = ("linear", "mlp")

Rotary = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------------------------
# Learned compression (pool = linear | mlp)
# ----------------------------------------------------------------------------------------------

def split_blocks(x: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """``[B, T, H, D] -> [B, Nc, H, block, D]``: block ``i`` holds positions ``[i*stride, i*stride + block)``.

    ``Nc = (T - block) // stride + 1``, 0 when ``T < block`` (an empty tensor that is still
    part of the autograd graph, so parameters downstream get zero gradients rather than none).
    """
    B, T, H, D = x.shape
    if T < block:
        return x[:, :0].unsqueeze(3).expand(B, 0, H, block, D)
    return x.unfold(1, block, stride).permute(0, 1, 2, 4, 3)   # unfold puts the window last


class LearnedPool(nn.Module):
    """Compress blocks of keys (or values) of one head dim: ``[B, T, H, D] -> [B, Nc, H, D]``.

    Each block of ``block`` positions (every ``stride``) gets a learned intra-block position
    embedding ``[block, D]`` added, is flattened to ``block * D`` and mapped back to ``D`` by
    ``Linear`` (``kind = "linear"``) or ``Linear - GELU - Linear`` (``kind = "mlp"``, width
    ``hidden``). Weights are shared by all heads, as in the public NSA implementations.

    Init: the position embedding starts at zero (as lucidrains' native-sparse-attention-pytorch
    does). The ``linear`` pool starts as exactly mean pooling (weight ``[I/l, ..., I/l]``, no
    bias: a key bias shifts every block's score by the same ``q . b`` and cancels in the
    softmax), so a learned-linear layer begins where a ``pool = mean`` layer is. The ``mlp``
    pool keeps PyTorch's default ``Linear`` init.
    """

    def __init__(self, kind: str, block: int, stride: int, dim: int, hidden: int,
                 device=None, dtype=None):
        super().__init__()
        if kind not in LEARNED_POOLS:
            raise ValueError(f"pool kind must be one of {LEARNED_POOLS}, got {kind!r}")
        fk = {"device": device, "dtype": dtype}
        self.kind, self.block, self.stride, self.dim = kind, block, stride, dim
        self.pos = nn.Parameter(torch.zeros(block, dim, **fk))
        if kind == "linear":
            self.net = nn.Linear(block * dim, dim, bias=False, **fk)
        else:
            self.net = nn.Sequential(nn.Linear(block * dim, hidden, **fk), nn.GELU(),
                                     nn.Linear(hidden, dim, **fk))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.pos)
        if self.kind == "linear":
            with torch.no_grad():   # [D, l*D] = [I/l, I/l, ...]: the mean of the block
                eye = torch.eye(self.dim, device=self.pos.device, dtype=self.pos.dtype)
                self.net.weight.copy_(eye.repeat(1, self.block) / self.block)
        else:
            for layer in (self.net[0], self.net[2]):
                layer.reset_parameters()

    def forward(self, x: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        """``cu_seqlens`` (a tensor or a list of ints): packed sequences, ``x [1, T, H, D]`` ->
        ``[1, sum Nc_s, H, D]``, each sequence's blocks in turn (``nsa_dsl.semantics.varlen``)."""
        if cu_seqlens is None:
            blocks = split_blocks(x, self.block, self.stride)          # [B, Nc, H, l, D]
        else:
            from nsa_dsl.semantics.varlen import split_blocks as split_packed
            cu = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
            blocks = split_packed(x, cu, self.block, self.stride)      # [1, sum Nc_s, H, l, D]
        return self.net((blocks + self.pos).flatten(-2))               # [B, Nc, H, D]

    def extra_repr(self) -> str:
        return f"{self.kind}, block={self.block}, stride={self.stride}, dim={self.dim}"


class IndexerProjection(nn.Module):
    """The inputs of an indexer branch (DeepSeek-V3.2's lightning indexer) from the hidden state
    ``x [B, T, hidden]``: ``q_idx [B, T, HI, DI]`` (``q_proj``: hidden -> HI * DI), ``k_idx
    [B, T, DI]`` (``k_proj``: hidden -> DI, one key per position shared by the HI heads) and the
    per-head weights ``w_idx [B, T, HI]`` (``w_proj``: hidden -> HI, times ``(HI * DI) ** -0.5``,
    the scale V3.2 gives its weights: ``n_heads ** -0.5 * softmax_scale``).

    Init: the three ``Linear`` layers (no bias) keep PyTorch's default init, as V3.2's indexer
    does; with the fixed ``(HI * DI) ** -0.5`` the scores ``I = sum_j w_j relu(q_j . k)`` keep one
    scale whatever HI and DI, so the first selections are varied (not all ties, which a zero
    init would give: every position would keep its first tokens) and the index loss reaches all
    three projections from the first step (``w`` through ``relu(q . k)``, ``q`` and ``k``
    through ``w``).
    """

    def __init__(self, hidden: int, heads: int, dim: int, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.heads, self.dim = heads, dim
        self.q_proj = nn.Linear(hidden, heads * dim, bias=False, **fk)
        self.k_proj = nn.Linear(hidden, dim, bias=False, **fk)
        self.w_proj = nn.Linear(hidden, heads, bias=False, **fk)

    def forward(self, x: torch.Tensor):
        B, T, _ = x.shape
        return (self.q_proj(x).view(B, T, self.heads, self.dim), self.k_proj(x),
                self.w_proj(x) * (self.heads * self.dim) ** -0.5)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim={self.dim}"


def _branch_dict(modules: dict[str, nn.Module]) -> nn.ModuleDict:
    """A ModuleDict keyed by branch name.

    Inserted through ``_modules`` because ``ModuleDict.__setitem__`` refuses keys that name
    an attribute of ``nn.Module`` (a branch called ``eval`` or ``to`` is a valid spec);
    indexing, iteration, ``state_dict`` and ``.to()`` all go through ``_modules``.
    """
    d = nn.ModuleDict()
    for name, m in modules.items():
        d._modules[name] = m
    return d


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------

def _resolve(spec: Spec, field: str, given: Optional[int], default: Optional[int],
             why_default: str) -> int:
    """One shape field: the spec's value, else the argument, else a default; conflicts raise."""
    declared = getattr(spec, field)
    spans = dict(spec.field_spans)
    if declared is not None:
        if given is not None and given != declared:
            raise SpecError(
                "E701", f"{field}: spec '{spec.name}' declares {field} = {declared}, "
                        f"but {field}={given} was passed to SparseAttention",
                span=spans.get(field), source=spec.source or None,
                hint=f"drop the {field}= argument, or pass {field}={declared}")
        return declared
    if given is not None:
        value = given
    elif default is not None:
        value = default
    else:
        raise SpecError("E702", f"{field}: spec '{spec.name}' does not declare {field} and no "
                                f"{field}= was passed to SparseAttention{why_default}",
                        hint=f"pass {field}=N, or declare `{field} = N` in the spec")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SpecError("E703", f"{field} must be a positive integer, got {value!r}")
    return value


class SparseAttention(nn.Module):
    """Sparse attention layer for ``spec``: ``forward(x [B, T, hidden_size]) -> [B, T, hidden_size]``.

    Args:
        spec: a :class:`~nsa_dsl.language.ir.Spec`, a path to a ``.nsa`` file, or spec text
            (a file with several blocks: use :meth:`from_file` with ``name=``).
        hidden_size: width of ``x`` and of the output.
        heads, kv_heads, qk_dim, v_dim: shape fields the spec does not declare (a value the
            spec declares may be repeated, not changed). ``heads`` is required when the spec
            does not declare it; ``kv_heads`` defaults to ``heads``, ``qk_dim`` to
            ``hidden_size // heads``, ``v_dim`` to ``qk_dim``.
        separate_kv: one key and one value projection per branch (the paper gives its three
            branches independent K/V; they reach the op as dicts branch -> tensor). Default:
            one ``k_proj`` / ``v_proj`` shared by all branches.
        bias: bias in the q/k/v/output projections.
        rotary: ``rotary(q, k, positions) -> (q, k)`` applied to ``q [B, T, HQ, Dqk]`` and the
            raw keys ``k [B, T, H', Dqk]`` before attention; ``positions`` is
            ``arange(T)`` (with ``cu_seqlens``: each row's position in its own sequence,
            restarting at 0). With ``separate_kv`` the keys of every branch are concatenated
            along the head dim for one call (rotary acts per head, so this is the same as one
            call per branch). Compressed keys are pooled from *rotated* keys, as the public
            NSA implementations do. An ``nn.Module`` rotary is registered as a submodule.
        backend: ``"reference"`` (``nsa_dsl.reference``), ``"kernels"``
            (``nsa_dsl.compile(spec)``, built on the first kernel call and cached on the
            layer), or ``"auto"``: kernels for CUDA inputs, the reference otherwise, because
            on a CPU the kernels run through Triton's interpreter, which is orders of
            magnitude slower than the PyTorch reference.
        scale: softmax scale, ``qk_dim ** -0.5`` when None.
        q_norm, k_norm: modules applied to ``q [B, T, HQ, Dqk]`` and the raw keys ``k [B, T, H, Dqk]``
            right after the projections, before rotary (a per-head norm over the last dim, as
            Qwen3's ``RMSNorm(head_dim)``); registered as submodules. None: no norm.
        pool_hidden: width of the ``pool = mlp`` hidden layer (default ``hidden_size``).
        index_rotary: apply ``rotary`` to the indexer's queries and keys too (``q_idx [B, T, HI,
            DI]``, ``k_idx`` as ``[B, T, 1, DI]``: the rotary must take DI-wide heads), as V3.2
            does; default False.
        cp_mesh: context parallelism over a 1-D DeviceMesh (e.g. ``mesh["cp"]``) or a
            ProcessGroup: ``x`` is then this rank's shard of the sequence (chunks ``r`` and
            ``2N-1-r`` of ``2N``: ``context_parallel.shard_sequence``; ``cu_seqlens`` stays global)
            and ``y`` its rows (``nsa_dsl.runtime.context_parallel``). Parameter gradients are
            per-rank partial sums: reduce them over the data x context mesh (FSDP2 or DDP over the
            flattened mesh). Decoding with a cache runs locally, without it.
        device, dtype: of every parameter.

    Parameters (``state_dict`` names): ``q_proj``, ``k_proj``, ``v_proj`` (``nn.Linear``, or
    ``nn.ModuleDict`` branch -> ``nn.Linear`` with ``separate_kv``), ``k_pool`` / ``v_pool``
    (branch -> :class:`LearnedPool`, for compress branches with ``pool = linear | mlp``),
    ``gate_proj`` (``output = gate(...)`` only), ``o_proj``; ``indexer`` (indexer branch ->
    :class:`IndexerProjection`: its ``q_proj``, ``k_proj``, ``w_proj``, init documented there).
    A spec with an indexer trains it through ``y, aux = layer(x, return_aux=True)``: add
    ``aux.index_loss[<select branch>].mean()`` (its KL, [B, T]) to the training loss.

    Gate init: ``gate_proj`` has zero weight and bias ``logit(1 / max(C, 2))``, so at init
    every gate is ``1/C`` (``C`` branches; 1/2 for a single gated branch, where 1 would need an
    infinite bias) whatever the input: the layer starts as the plain average of its branch
    outputs. That keeps the output on the scale of one attention output for any number of
    branches (a gate of 0.5 each would scale it by ``C/2``), gives no branch a random head
    start, and keeps the sigmoid away from saturation (its slope ``g(1-g)`` is far from 0),
    so the gate weights get a useful gradient ``x * dL/dlogit`` from the first step.
    """

    def __init__(self, spec: Union[Spec, str, os.PathLike], hidden_size: int, *,
                 heads: Optional[int] = None, kv_heads: Optional[int] = None,
                 qk_dim: Optional[int] = None, v_dim: Optional[int] = None,
                 separate_kv: bool = False, bias: bool = False,
                 rotary: Optional[Rotary] = None, backend: str = "auto",
                 scale: Optional[float] = None, pool_hidden: Optional[int] = None,
                 index_rotary: bool = False,
                 q_norm: Optional[nn.Module] = None, k_norm: Optional[nn.Module] = None,
                 cp_mesh=None, device=None, dtype=None):
        super().__init__()
        spec = check_spec(as_spec(spec))          # a Spec built by hand gets the parser's checks
        if not isinstance(hidden_size, int) or isinstance(hidden_size, bool) or hidden_size <= 0:
            raise SpecError("E703", f"hidden_size must be a positive integer, got {hidden_size!r}")
        if backend not in BACKENDS:
            raise SpecError("E703", f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if rotary is not None and not callable(rotary):
            raise SpecError("E703", f"rotary must be callable (q, k, positions) -> (q, k), "
                                    f"got {type(rotary).__name__}")

        HQ = _resolve(spec, "heads", heads, None, "")
        H = _resolve(spec, "kv_heads", kv_heads, HQ, "")
        if HQ % H != 0:
            raise SpecError("E701", f"heads = {HQ} is not a multiple of kv_heads = {H}",
                            hint="query head h reads kv head h // (heads // kv_heads)")
        dqk_default = hidden_size // HQ if hidden_size % HQ == 0 else None
        Dqk = _resolve(spec, "qk_dim", qk_dim, dqk_default,
                       f" (the default hidden_size // heads needs heads = {HQ} to divide "
                       f"hidden_size = {hidden_size})")
        Dv = _resolve(spec, "v_dim", v_dim, Dqk, "")

        self.spec = spec
        self.hidden_size = hidden_size
        self.heads, self.kv_heads, self.qk_dim, self.v_dim = HQ, H, Dqk, Dv
        self.separate_kv = bool(separate_kv)
        self.backend = backend
        self.scale = scale
        self.rotary = rotary
        self.q_norm, self.k_norm = q_norm, k_norm
        if cp_mesh is not None:
            from nsa_dsl.runtime.context_parallel import process_group
            process_group(cp_mesh)                 # E650 for anything but a group or a 1-D mesh
        self.cp_mesh = cp_mesh     # context parallel: forward takes this rank's shard
        self._compiled_op = None   # nsa_dsl.compile(spec), built on the first kernel call
        self._decode_op = None     # the decode kernels (DecodeOp), built on the first kernel decode
        self._piece_op = None      # indexer specs decode on the op's query pieces (compile(per_token(spec)))

        fk = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(hidden_size, HQ * Dqk, bias=bias, **fk)
        if self.separate_kv:
            names = spec.attention_names          # an indexer reads no keys / values
            self.k_proj = _branch_dict({n: nn.Linear(hidden_size, H * Dqk, bias=bias, **fk) for n in names})
            self.v_proj = _branch_dict({n: nn.Linear(hidden_size, H * Dv, bias=bias, **fk) for n in names})
        else:
            self.k_proj = nn.Linear(hidden_size, H * Dqk, bias=bias, **fk)
            self.v_proj = nn.Linear(hidden_size, H * Dv, bias=bias, **fk)

        learned = [b for b in spec.of_kind("compress") if b.pool in LEARNED_POOLS]
        width = pool_hidden if pool_hidden is not None else hidden_size
        self.k_pool = _branch_dict({b.name: LearnedPool(b.pool, b.block, b.stride, Dqk, width, **fk)
                                    for b in learned})
        self.v_pool = _branch_dict({b.name: LearnedPool(b.pool, b.block, b.stride, Dv, width, **fk)
                                    for b in learned})
        self.indexer = _branch_dict({b.name: IndexerProjection(hidden_size, b.heads, b.dim, **fk)
                                     for b in spec.of_kind("indexer")})
        self.index_rotary = bool(index_rotary)

        self.num_gates = len(spec.output.branches)
        if spec.output.kind == "gate":
            if spec.output.activation != "sigmoid":
                raise SpecError("E703", f"SparseAttention supports gate(sigmoid, ...) outputs; "
                                        f"spec '{spec.name}' uses {spec.output.activation!r}")
            self.gate_proj = nn.Linear(hidden_size, HQ * self.num_gates, bias=True, **fk)
        else:
            self.gate_proj = None
        self.o_proj = nn.Linear(HQ * Dv, hidden_size, bias=bias, **fk)
        self.reset_gate()

    # -- construction helpers ---------------------------------------------------------------

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike], hidden_size: int, name: Optional[str] = None,
                  **kw) -> "SparseAttention":
        """``SparseAttention(nsa_dsl.load(path, name), hidden_size, **kw)``."""
        from nsa_dsl import load
        return cls(load(path, name), hidden_size, **kw)

    @property
    def gate_init(self) -> float:
        """Every gate's value at init: ``1 / max(C, 2)`` (see the class docstring)."""
        return 1.0 / max(self.num_gates, 2)

    def reset_gate(self) -> None:
        """Zero weight, bias ``logit(gate_init)``: every gate starts at ``gate_init``."""
        if self.gate_proj is None:
            return
        p = self.gate_init
        nn.init.zeros_(self.gate_proj.weight)
        nn.init.constant_(self.gate_proj.bias, math.log(p / (1.0 - p)))

    def new_cache(self, batch_size: int, max_len: int, *, page_size: Optional[int] = None,
                  num_pages: Optional[int] = None, dtype=None, device=None) -> NSACache:
        """A KV cache for ``batch_size`` sequences of up to ``max_len`` tokens, for
        ``layer(x_chunk, cache=cache)``: the layer's dtype and device unless given; one raw
        key/value pair, or one per branch with ``separate_kv``. ``page_size`` None: contiguous
        (``nsa_dsl.runtime.kv_cache.NSACache``); P: pages of P positions through a block table
        (``PagedNSACache``: ``num_pages`` in the pool, default as many as the contiguous cache
        holds; pages taken as sequences grow, given back by ``cache.free(seqs)``; docs/SERVING.md)."""
        w = self.q_proj.weight
        kw = dict(kv_heads=self.kv_heads, qk_dim=self.qk_dim, v_dim=self.v_dim, shared_kv=not self.separate_kv,
                  dtype=dtype or w.dtype, device=device or w.device)
        if page_size is None:
            return NSACache(self.spec, batch_size, max_len, **kw)
        return PagedNSACache(self.spec, batch_size, max_len, page_size=page_size, num_pages=num_pages, **kw)

    # -- forward ----------------------------------------------------------------------------

    def project(self, x: torch.Tensor):
        """Query, key and value projections: ``q [B, T, HQ, Dqk]``; ``k``, ``v`` tensors
        ``[B, T, H, D]``, or dicts by branch name with ``separate_kv``."""
        B, T, _ = x.shape
        HQ, H, Dqk, Dv = self.heads, self.kv_heads, self.qk_dim, self.v_dim
        q = self.q_proj(x).view(B, T, HQ, Dqk)
        if self.separate_kv:
            k = {n: p(x).view(B, T, H, Dqk) for n, p in self.k_proj.items()}
            v = {n: p(x).view(B, T, H, Dv) for n, p in self.v_proj.items()}
        else:
            k = self.k_proj(x).view(B, T, H, Dqk)
            v = self.v_proj(x).view(B, T, H, Dv)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = {n: self.k_norm(a) for n, a in k.items()} if isinstance(k, dict) else self.k_norm(k)
        return q, k, v

    def forward(self, x: torch.Tensor, *, return_aux: bool = False, cache=None, n_new=None,
                cu_seqlens: Optional[torch.Tensor] = None):
        """``x [B, T, hidden_size] -> y [B, T, hidden_size]``; with ``return_aux``, ``(y, aux)``
        where ``aux`` is the op's (selected block indices, per-branch lse and outputs).
        With ``cache`` (``layer.new_cache(...)``), ``x`` is the next chunk of each sequence
        (a prompt, a piece of one, or one token): it is appended and its outputs returned
        (``_forward_cached``); ``n_new`` (B counts) takes fewer than the chunk's tokens of some
        sequences (ragged batches; the rest is padding).
        With ``cu_seqlens [N + 1]`` (int32/int64, on x's device), ``x [1, T, hidden_size]``
        packs N sequences (rows ``[cu[s], cu[s + 1])``), each computed as if alone: rotary
        positions restart at 0 and learned pooling runs per sequence (``nsa_dsl.semantics.varlen``)."""
        if cache is not None:
            if cu_seqlens is not None:
                raise SpecError("E706", "cu_seqlens and cache were both given; packed sequences "
                                        "run without a KV cache",
                                hint="prefill each sequence into the cache with its own call")
            return self._forward_cached(x, cache, n_new=n_new, return_aux=return_aux)
        if self.cp_mesh is not None:
            from nsa_dsl.runtime.context_parallel import layer_forward
            return layer_forward(self, x, cu_seqlens=cu_seqlens, return_aux=return_aux)
        self._check_input(x)
        B, T, _ = x.shape
        cu = None                                      # packed sequences' offsets, on the host
        if cu_seqlens is not None:
            from nsa_dsl.semantics.varlen import check_cu_seqlens
            cu = check_cu_seqlens(cu_seqlens, x, "x")
        HQ, Dv = self.heads, self.v_dim
        q, k, v = self.project(x)
        if self.rotary is not None:
            q, k = self._rotate(q, k, T, cu)

        compressed = None
        if len(self.k_pool) > 0:   # learned pooling of the (rotated) keys and the values
            compressed = {n: (self.k_pool[n](self._of_branch(k, n), cu), self.v_pool[n](self._of_branch(v, n), cu))
                          for n in self.k_pool.keys()}

        gates = None
        if self.gate_proj is not None:
            gates = self.gate_proj(x).view(B, T, HQ, self.num_gates)    # logits: the op applies sigmoid

        index = self.index_inputs(x, self._positions(T, cu, x.device)) if len(self.indexer) else {}
        out = self._attention(q, k, v, gates, compressed, return_aux, cu_seqlens, index)
        o, aux = out if return_aux else (out, None)
        y = self.o_proj(o.reshape(B, T, HQ * Dv))
        return (y, aux) if return_aux else y

    def _attention(self, q, k, v, gates, compressed, return_aux, cu_seqlens=None, index=None):
        """The one call of the attention op: ``nsa_dsl.reference`` or the compiled kernels."""
        op = self._op_for(q)
        packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        if index:
            packed["index"] = index
        return op(q, k, v, gates, compressed=compressed, scale=self.scale, return_aux=return_aux, **packed)

    def index_inputs(self, x: torch.Tensor, positions=None) -> dict:
        """Indexer branch -> ``(q_idx, k_idx, w_idx)`` of ``x [B, T, hidden]`` (empty without
        an indexer); with ``index_rotary``, rotated at ``positions`` ([T], or one [T] per batch row)."""
        out = {}
        for name, proj in self.indexer.items():
            qi, ki, wi = proj(x)
            if self.index_rotary and self.rotary is not None:
                if isinstance(positions, torch.Tensor):
                    qi, ki = self.rotary(qi, ki[:, :, None], positions)
                else:
                    rows = [self.rotary(qi[b:b + 1], ki[b:b + 1, :, None], p) for b, p in enumerate(positions)]
                    qi, ki = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
                ki = ki[:, :, 0]
            out[name] = (qi, ki, wi)
        return out

    def _op_for(self, q: torch.Tensor):
        use_kernels = self.backend == "kernels" or (self.backend == "auto" and q.is_cuda)
        if use_kernels:
            if self._compiled_op is None:
                from nsa_dsl import compile as compile_spec
                self._compiled_op = compile_spec(self.spec)
            return self._compiled_op
        from nsa_dsl.semantics.reference import reference
        return functools.partial(reference, self.spec)

    @staticmethod
    def _of_branch(t, name: str) -> torch.Tensor:
        return t[name] if isinstance(t, dict) else t

    def _rotate(self, q, k, T: int, cu=None):
        return self._apply_rotary(q, k, self._positions(T, cu, q.device))

    @staticmethod
    def _positions(T: int, cu, device) -> torch.Tensor:
        """Each row's position: ``arange(T)``, or packed (``cu``) restarting at 0 in each sequence."""
        if cu is None:
            return torch.arange(T, device=device)
        from nsa_dsl.semantics.varlen import positions as packed_positions
        return packed_positions(cu, device)

    def _apply_rotary(self, q, k, positions):
        """``rotary(q, k, positions)``; per-branch keys (``separate_kv``) concatenated along the
        head dim for one call (rotary acts per head)."""
        if not isinstance(k, dict):
            return self.rotary(q, k, positions)
        names = list(k)
        q, k_all = self.rotary(q, torch.cat([k[n] for n in names], dim=2), positions)
        return q, dict(zip(names, k_all.split(self.kv_heads, dim=2)))

    # -- decoding with a KV cache ------------------------------------------------------------

    def _forward_cached(self, x: torch.Tensor, cache: NSACache, *, n_new=None, return_aux: bool = False):
        """``layer(x, cache=cache)``: project the chunk ``x [B, C, hidden]``, append its keys and
        values to ``cache`` (pooling the blocks it completes), attend every branch for its tokens,
        project out. The ``backend`` picks ``decode_torch`` ("reference", or "auto" off CUDA) or
        the generated decode kernels ("kernels", or "auto" on CUDA)."""
        self._check_input(x)
        if not isinstance(cache, NSACache) or cache.spec != self.spec:
            raise SpecError("E809", "cache must be an NSACache of this layer's spec (layer.new_cache(batch_size, max_len))")
        B, C, _ = x.shape
        if B != cache.batch_size:
            raise SpecError("E809", f"x has batch {B}; the cache was made for {cache.batch_size} sequences")
        HQ, Dv = self.heads, self.v_dim
        q, k, v = self.project(x)
        if self.rotary is not None:       # each token at its own position: starts[b] + i
            q, k = self._rotate_cached(q, k, cache, C)
        gates = None
        if self.gate_proj is not None:
            gates = self.gate_proj(x).view(B, C, HQ, self.num_gates)     # logits: the op applies sigmoid
        if not self.spec.of_kind("indexer") and (self.backend == "kernels" or (self.backend == "auto" and x.is_cuda)):
            return self._forward_kernels(x, q, k, v, gates, cache, n_new, return_aux)

        def cast(t):                      # the projections' dtype (autocast) -> the cache's
            return {n: a.to(cache.dtype) for n, a in t.items()} if isinstance(t, dict) else t.to(cache.dtype)
        index = self.index_inputs(x, [torch.arange(C, device=x.device) + s for s in cache.lengths_host]) \
            if len(self.indexer) else {}
        with torch.no_grad():
            step = cache.append(cast(k), cast(v), n_new=n_new, pool=self._pool_blocks if len(self.k_pool) else None,
                                k_idx={n: ki.to(cache.dtype) for n, (_, ki, _) in index.items()})
        kernels = self.backend == "kernels" or (self.backend == "auto" and x.is_cuda)
        if kernels and not index:
            if self._decode_op is None:
                self._decode_op = DecodeOp(self.spec)
            out = self._decode_op(q.to(cache.dtype), cache, step, None if gates is None else gates.to(cache.dtype),
                                  scale=self.scale, return_aux=return_aux)
        else:   # the reference, or for an indexer spec on the kernels the op's query pieces (no decode kernel scores tokens)
            if kernels and self._piece_op is None:
                from nsa_dsl import compile as compile_spec
                self._piece_op = compile_spec(per_token(self.spec))
            out = decode_torch(self.spec, q.to(cache.dtype), cache, step,
                               None if gates is None else gates.to(cache.dtype), scale=self.scale,
                               return_aux=return_aux, op=self._piece_op if kernels else None,
                               index={n: (qi.to(cache.dtype), wi.to(cache.dtype)) for n, (qi, _, wi) in index.items()})
        o, aux = out if return_aux else (out, None)
        y = self.o_proj(o.to(x.dtype).reshape(B, C, HQ * Dv))
        return (y, aux) if return_aux else y

    def _forward_kernels(self, x, q, k, v, gates, cache: NSACache, n_new, return_aux: bool):
        """The cached forward on the decode kernels: append and attend bound to the cache
        (``DecodeRunner``): no host sync, nothing read from the host's lengths while a CUDA graph
        is captured or torch.compile traces, so either can capture ``layer(x, cache=cache)``."""
        if self._decode_op is None:
            self._decode_op = DecodeOp(self.spec)
        B, C, _ = x.shape
        run = self._decode_op.runner(cache, C, self.heads, scale=self.scale, aux=return_aux)

        def cast(t):                      # the projections' dtype (autocast) -> the cache's
            return {n: a.to(cache.dtype) for n, a in t.items()} if isinstance(t, dict) else t.to(cache.dtype)
        with torch.no_grad():
            out = run(q.to(cache.dtype), cast(k), cast(v), None if gates is None else gates.to(cache.dtype),
                      n_new=n_new, pool=self._pool_blocks if len(self.k_pool) else None)
        o, aux = out if return_aux else (out, None)
        y = self.o_proj(o.to(x.dtype).reshape(B, C, self.heads * self.v_dim))
        return (y, aux) if return_aux else y

    def _rotate_cached(self, q, k, cache: NSACache, C: int):
        """Rotary at each token's own position ``start[b] + i``: from the host's lengths when it
        drives (one call, or one per sequence when their starts differ); while a CUDA graph is
        captured or torch.compile traces, from the device's (``positions [B, C]``: the rotary
        must broadcast it over the heads)."""
        if not _host_driven():
            return self._apply_rotary(q, k, cache.lengths[:, None].long() + torch.arange(C, device=q.device))
        starts = cache.lengths_host
        if len(set(starts)) <= 1:
            return self._apply_rotary(q, k, torch.arange(C, device=q.device) + (starts[0] if starts else 0))
        rows = [self._apply_rotary(q[b:b + 1], self._of_rows(k, b), torch.arange(C, device=q.device) + s)
                for b, s in enumerate(starts)]
        q = torch.cat([r[0] for r in rows])
        k = {n: torch.cat([r[1][n] for r in rows]) for n in k} if isinstance(k, dict) \
            else torch.cat([r[1] for r in rows])
        return q, k

    def _pool_blocks(self, name: str, kb: torch.Tensor, vb: torch.Tensor):
        """The cache's learned pooling of new blocks: ``kb [P, l, H, D]``, one block per row."""
        return self.k_pool[name](kb)[:, 0], self.v_pool[name](vb)[:, 0]

    @staticmethod
    def _of_rows(t, b: int):
        return {n: a[b:b + 1] for n, a in t.items()} if isinstance(t, dict) else t[b:b + 1]

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise SpecError("E704", f"x: expected a tensor [B, T, hidden_size={self.hidden_size}], "
                                    f"got {type(x).__name__}")
        if x.dim() != 3:
            raise SpecError("E704", f"x: expected 3 dims [B, T, hidden_size={self.hidden_size}], "
                                    f"got {x.dim()} dims {list(x.shape)}")
        if x.shape[-1] != self.hidden_size:
            raise SpecError("E704", f"x: expected hidden size {self.hidden_size} (last dim), "
                                    f"got {x.shape[-1]} (x is {list(x.shape)})")
        w = self.q_proj.weight
        if x.device != w.device:
            raise SpecError("E705", f"x is on {x.device} but the layer's parameters are on {w.device}",
                            hint=f"move one of them: x.to('{w.device}') or layer.to('{x.device}')")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise SpecError("E705", f"x has dtype {x.dtype} but the layer's parameters are {w.dtype}",
                            hint=f"cast one of them (x.to({w.dtype}) or layer.to({x.dtype})), "
                                 f"or run under torch.autocast")

    # -- misc -------------------------------------------------------------------------------

    def __getstate__(self):
        # The compiled op holds loaded kernel modules: not copied or pickled, rebuilt on demand.
        state = self.__dict__.copy()
        state["_compiled_op"] = state["_decode_op"] = state["_piece_op"] = None
        return state

    def extra_repr(self) -> str:
        s = self.spec
        parts = []
        for b in s.branches:
            if b.kind == "compress":
                parts.append(f"{b.name}=compress(block={b.block}, stride={b.stride}, pool={b.pool})")
            elif b.kind == "select":
                parts.append(f"{b.name}=select(block={b.block}, top_k={b.top_k}, score={b.score}, "
                             f"keep_first={b.keep_first}, keep_last={b.keep_last})")
            elif b.kind == "indexer":
                parts.append(f"{b.name}=indexer(heads={b.heads}, dim={b.dim})")
            else:
                parts.append(f"{b.name}=window(size={b.size}, sinks={b.sinks})")
        o = s.output
        if o.kind == "gate":
            out = f"gate({o.activation}, {', '.join(o.branches)})"
        elif o.kind == "sum":
            out = f"sum({', '.join(o.branches)})"
        else:
            out = o.branches[0]
        lines = [f"spec={s.name}, hidden_size={self.hidden_size}, heads={self.heads}, "
                 f"kv_heads={self.kv_heads}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, "
                 f"backend={self.backend}" + (", separate_kv=True" if self.separate_kv else "")
                 + (f", scale={self.scale}" if self.scale is not None else ""),
                 "branches: " + "; ".join(parts),
                 f"output={out}"]
        return "\n".join(lines)
