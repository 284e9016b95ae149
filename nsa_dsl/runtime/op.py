"""``nsa_dsl.compile(spec)``: the generated kernels behind one PyTorch callable.

The pipeline, once per spec and tensor shapes:
    bind shapes -> lower to a plan -> render templates (or hit the cache) -> load -> run
Each stage lives in ``codegen``; this module checks the caller's tensors,
orchestrates the branches and returns outputs (and, on request, the selected blocks).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import Tensor

from nsa_dsl.codegen import launch, tuning
from nsa_dsl.codegen.cache import KernelCache, cache_key
from nsa_dsl.codegen.plan import Binding, Plan, bind, lower

from nsa_dsl.runtime import kernel_ops as ops
from nsa_dsl.semantics import varlen as _varlen
from nsa_dsl.runtime.backend import check_kernel_device
from nsa_dsl.runtime.files import output_folder, replace_file
from nsa_dsl.language.checks import check_spec
from nsa_dsl.language.parser import as_spec
from nsa_dsl.errors import SpecError
from nsa_dsl.semantics.inputs import check_call, check_scale
from nsa_dsl.language.ir import Spec
from nsa_dsl.language.rules import num_select_blocks
from nsa_dsl.semantics.reference import Aux, clean_indices, mean_pool

TensorOrDict = Union[Tensor, Mapping[str, Tensor]]


def _err(code: str, message: str, hint: str | None = None) -> SpecError:
    return SpecError(code, message, hint=hint)


class CompiledOp:
    """A spec compiled to kernels. Call it like ``nsa_dsl.reference``::

        o = op(q, k, v, gates)
        o, aux = op(q, {"cmp": k1, "slc": k2, "swa": k3}, {...}, gates, return_aux=True)
        o = op(q, k, v, gates, compressed={"cmp": (k_cmp, v_cmp)})
        o = op(q, k, v, gates, cu_seqlens=cu)   # packed sequences: q [1, T, HQ, D], cu [N + 1]

    Packed variable-length batches (``cu_seqlens``, see ``nsa_dsl.semantics.varlen``) run kernels
    generated with ``VARLEN``: a second plan per binding, built on the first such call.
    """

    #: inference calls (no gradient, no ``return_aux``) combine the branches in the window
    #: kernel's epilogue when the output holds the one window branch; False: always run the
    #: combine kernel (the same result, bit for bit; for comparisons)
    fuse_output: bool = True
    #: training calls without ``return_aux`` run the whole op as one autograd node whose backward
    #: shares work between the branches (``kernel_ops.attention``); False: one node per branch
    #: (the same gradients up to rounding; for comparisons)
    fuse_backward: bool = True

    def __init__(self, spec: Spec, cache: KernelCache | None = None):
        self.spec = check_spec(spec)        # a Spec built by hand gets the parser's checks
        self._cache = cache
        self._keys: dict[tuple[Binding, bool], tuple[Plan, dict[str, str]]] = {}
        self._programs: dict[tuple[Binding, bool], str] = {}
        self._bound: Binding | None = None       # the shapes of the last call (see binding())

    @property
    def cache(self) -> KernelCache:
        if self._cache is None:
            self._cache = KernelCache()
        return self._cache

    def __repr__(self) -> str:
        return f"CompiledOp({self.spec.name}: {', '.join(self.spec.branch_names)})"

    # -- pipeline ------------------------------------------------------------------------------
    def binding(self, heads=None, kv_heads=None, qk_dim=None, v_dim=None) -> Binding:
        """The shapes to plan for: each field as given, else as the spec declares it, else as the
        op's last call bound it from its tensors. E612 when a field is none of these."""
        s, last = self.spec, self._bound
        given = {"heads": heads, "kv_heads": kv_heads, "qk_dim": qk_dim, "v_dim": v_dim}
        shapes = {f: given[f] or getattr(s, f) or (getattr(last, f) if last is not None else None)
                  for f in given}
        missing = [f for f, value in shapes.items() if value is None]
        if missing:
            raise _err("E612", f"spec '{s.name}' does not declare {', '.join(missing)}, and no call "
                               "has bound them from tensors yet",
                       hint="call the op once (the tensors' shapes bind them), or give them: in Python "
                            "op.source(heads=16, kv_heads=1, qk_dim=64, v_dim=64) (plan and emit take the "
                            "same), on the command line --heads 16 --kv-heads 1 --qk-dim 64 --v-dim 64")
        return bind(s, **shapes)

    def plan(self, *, varlen: bool = False, **shapes) -> Plan:
        """The kernel plan for ``shapes`` (see :meth:`binding`: by default the declared shapes,
        else those of the last call)."""
        return lower(self.spec, self.binding(**shapes), varlen=varlen)

    def _kernels(self, binding: Binding, varlen: bool = False, *, record: bool = True,
                 offsets: bool = False) -> tuple[Plan, dict[str, str]]:
        """Plan, render or load from the cache, register: kernel name -> op key. ``record``: the
        binding becomes the one :meth:`binding` falls back to (calls record theirs; source and
        emit, which only read, do not). ``offsets``: the plan of query pieces (``q_start``)."""
        if record:
            self._bound = binding
        plan_key = (binding, varlen) + ((True,) if offsets else ())
        if plan_key not in self._keys:
            plan = lower(self.spec, binding, varlen=varlen, offsets=offsets)
            modules = launch.build(plan, self.cache.load(plan))
            prefix = cache_key(plan)[:16]
            keys = {name: ops.register(f"{prefix}/{name}", mod) for name, mod in modules.items()}
            for key in keys.values():               # tuned configs live beside the kernel cache
                tuning.register(key, self.cache.directory)
            self._keys[plan_key] = (plan, keys)
            self._programs[plan_key] = ops.register(f"{prefix}/program", self._program(plan, keys))
        return self._keys[plan_key]

    def _program(self, plan: Plan, keys: dict[str, str]) -> ops.Program:
        """The branches in launch order (compress, select, window) with their kernel keys."""
        spec = self.spec

        def key(branch: str, family: str) -> str:
            return keys[plan.of_branch(branch)[family]]
        branches = [ops.BranchKernels("compress", b.name, key(b.name, "compress")) for b in spec.of_kind("compress")]
        branches += [ops.BranchKernels("select", b.name, key(b.name, "gather"), key(b.name, "indexer"), b.score, b.top_k,
                                       loss=key(b.name, "index_loss"))
                     if spec.score_kind(b) == "indexer" else
                     ops.BranchKernels("select", b.name, key(b.name, "select"), key(b.name, "topk"), b.score, b.top_k)
                     for b in spec.of_kind("select")]
        branches += [ops.BranchKernels("window", b.name, key(b.name, "window")) for b in spec.of_kind("window")]
        return ops.Program(tuple(branches), tuple(spec.output.branches), key("output", "combine"),
                           plan.binding.kv_heads)

    def source(self, which: str = "all", *, varlen: bool = False, **shapes) -> str:
        """The generated Triton source: ``"all"`` (or ``"fwd"``/``"bwd"``: every module holds
        both), or one kernel module by name, e.g. ``"window_swa"``. ``varlen=True``: the
        kernels for packed sequences (``cu_seqlens``). ``shapes`` (heads, kv_heads, qk_dim,
        v_dim) default to the spec's declared ones, else to those of the op's last call."""
        plan, _ = self._kernels(self.binding(**shapes), varlen, record=False)
        entry = self.cache.entry(plan)
        names = [k.name for k in plan.kernels]
        if which not in ("all", "fwd", "bwd"):
            if which not in names:
                raise _err("E613", f"no generated kernel named {which!r}", hint=f"one of: {', '.join(names)}")
            names = [which]
        return "\n\n".join(f"# ===== {n}: {entry / (n + '.py')} =====\n" + (entry / f"{n}.py").read_text()
                           for n in names)

    def emit(self, directory, *, varlen: bool = False, **shapes) -> list[Path]:
        """Write the plan and every rendered module to ``directory`` (shapes as :meth:`source`)."""
        out = output_folder(directory)            # before any kernel work: a bad folder fails fast
        plan, _ = self._kernels(self.binding(**shapes), varlen, record=False)
        entry = self.cache.entry(plan)
        written = [replace_file(out / f"{k.name}.py", (entry / f"{k.name}.py").read_text()) for k in plan.kernels]
        written.append(replace_file(out / "plan.txt", plan.describe() + "\n"))
        return written

    # -- the call ------------------------------------------------------------------------------
    def __call__(self, q: Tensor, k: TensorOrDict, v: TensorOrDict, gates: Optional[Tensor] = None, *,
                 compressed: Optional[Mapping[str, tuple[Tensor, Tensor]]] = None,
                 scale: Optional[float] = None, return_aux: bool = False,
                 indices: Optional[Mapping[str, Tensor]] = None,
                 cu_seqlens: Optional[Tensor] = None, cp_group=None,
                 index: Optional[Mapping[str, tuple[Tensor, Tensor, Tensor]]] = None,
                 q_start: Optional[int] = None):
        """The spec's attention, as ``nsa_dsl.reference`` computes it (see there for the
        arguments). ``indices``: select branch -> the caller's selection (no scoring runs; entries
        out of range or after the position's block are ignored, repeats count once).
        ``index``: indexer branch -> ``(q_idx [B, T, HI, DI], k_idx [B, T, DI], w_idx [B, T, HI])``;
        with ``return_aux``, ``aux.index_loss`` holds the loss that trains them.
        ``cu_seqlens [N + 1]`` (int32 or int64, on q's device): packed variable-length sequences
        with ``B = 1``, each computed as if alone (``nsa_dsl.semantics.varlen``); compressed keys / values
        then hold each sequence's blocks in turn, ``[1, sum Nc_s, H, D]``.
        ``cp_group`` (a ProcessGroup or 1-D DeviceMesh): context parallel, every tensor holds this
        rank's shard of the sequence and ``cu_seqlens`` the global offsets; ``compressed``, when
        given, the whole sequence's (``nsa_dsl.runtime.context_parallel.attention``).
        ``q_start``: q's rows (and gates', indices', q_idx' and w_idx') are the positions q_start ..
        of a sequence whose keys k, v (and k_idx) hold (a query piece, as the reference's; not with
        cu_seqlens)."""
        if cp_group is not None:
            from nsa_dsl.runtime import context_parallel
            return context_parallel.attention(self, q, k, v, gates, group=cp_group, compressed=compressed,
                                              scale=scale, return_aux=return_aux, indices=indices,
                                              index=index, cu_seqlens=cu_seqlens)
        spec = self.spec
        if isinstance(q, Tensor):
            check_kernel_device(q, q.dtype)
        cu = None                                   # the packed sequences' offsets, on the host
        if cu_seqlens is not None:
            if not isinstance(q, Tensor) or q.dim() != 4:
                raise _err("E601", "q must be a 4-D tensor [1, T, HQ, Dqk] with cu_seqlens")
            cu = _varlen.check_cu_seqlens(cu_seqlens, q)
            cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
        call = check_call(spec, q, k, v, gates, compressed=compressed, indices=indices, index=index, cu=cu,
                          kernels=True, q_start=q_start)
        binding = bind(spec, call.HQ, call.H, call.Dqk, call.Dv)
        piece = call.q_start > 0 or call.Tk != call.T       # a query piece: the plan with offsets
        plan, keys = self._kernels(binding, cu is not None, offsets=piece)
        scale = check_scale(scale, call.Dqk)
        q = _unit_last_stride(q)
        seq = () if cu is None else (cu_seqlens,)  # the ops' last argument, with packed sequences

        kv = {}                                     # branch -> the (k, v) its kernels read
        for b in spec.branches:
            if b.kind in ("select", "window"):
                kv[b.name] = (_unit_last_stride(call.k[b.name]), _unit_last_stride(call.v[b.name]))
            elif b.kind != "compress":
                continue
            elif b.name in call.compressed:
                k_c, v_c = call.compressed[b.name]
                kv[b.name] = (_unit_last_stride(k_c), _unit_last_stride(v_c))
            elif cu is not None:                    # each sequence's blocks, packed
                kv[b.name] = (_varlen.mean_pool(call.k[b.name], cu, b.block, b.stride),
                              _varlen.mean_pool(call.v[b.name], cu, b.block, b.stride))
            else:
                kv[b.name] = (mean_pool(call.k[b.name], b.block, b.stride), mean_pool(call.v[b.name], b.block, b.stride))
        given = {name: self._given(name, idx, call.Tk, cu, call.q_start) for name, idx in call.indices.items()}
        g = _unit_last_stride(gates) if spec.output.kind == "gate" else None
        prog_key = self._programs[(binding, cu is not None) + ((True,) if piece else ())]
        prog = ops.program(prog_key)

        training = torch.is_grad_enabled() and any(
            isinstance(x, Tensor) and x.requires_grad for x in (q, g, *(t for pair in kv.values() for t in pair)))
        if training and self.fuse_backward and not return_aux and not given and not call.index:
            # the whole op as one autograd node: its backward hands each branch its delta from
            # the combination's and sums the gradient of q inside the dq kernels
            flat = [t for b in prog.branches for t in kv[b.name]]
            return ops.attention(prog_key, q, flat, g, scale, cu_seqlens if cu is not None else None,
                                 call.q_start)[0]
        fused = None if training or return_aux else self._fused_window()
        outs, lses, idxs, o = ops.run_forward(prog, q, kv, g, scale, *seq, given=given, index=call.index,
                                              combine_in=fused.name if fused is not None else None,
                                              q_start=call.q_start)
        if o is not None:
            return o
        o = ops.combine_fwd(prog.combine, [outs[n] for n in spec.output.branches], g)
        if return_aux:
            losses = ops.index_losses(prog, q, kv, idxs, lses, call.index, scale, *seq, q_start=call.q_start)
            return o, Aux(indices=idxs, lse=lses, outputs=outs, index_loss=losses, spec=spec)
        return o

    def _given(self, name: str, idx: Tensor, T: int, cu, q_start: int = 0) -> Tensor:
        """A caller's selection as the kernels take it: cleaned (the reference's rule), int32
        (``T`` keys; rows at positions ``q_start ..``)."""
        b = self.spec.branch(name)
        if cu is None:
            return clean_indices(idx, num_select_blocks(T, b.block), b.block, self.spec.causal, t0=q_start)
        parts = [clean_indices(idx[:, s:e], num_select_blocks(e - s, b.block), b.block, self.spec.causal)
                 for s, e in zip(cu[:-1], cu[1:])]
        return torch.cat(parts, 1) if parts else idx.to(torch.int32)

    def _fused_window(self):
        """For inference calls without aux outputs: the window branch whose kernel can also
        combine the output, or None. It must be the spec's only window branch, in the output, of
        at most 4 branches (windows run last, so the others are ready)."""
        wins, out = self.spec.of_kind("window"), self.spec.output
        if not self.fuse_output or len(wins) != 1 or wins[0].name not in out.branches or len(out.branches) > 4:
            return None
        return wins[0]

    # -- autotuning ------------------------------------------------------------------------------
    def tune(self, q: Tensor, k: TensorOrDict, v: TensorOrDict, gates: Optional[Tensor] = None, *,
             backward: bool = True, compressed: Optional[Mapping[str, tuple[Tensor, Tensor]]] = None,
             scale: Optional[float] = None, cu_seqlens: Optional[Tensor] = None,
             index: Optional[Mapping[str, tuple[Tensor, Tensor, Tensor]]] = None) -> list:
        """Autotune the kernels for the shapes of these inputs (GPU; their values only feed the
        timed calls): runs the forward, and the backward unless ``backward=False``, once, with
        every kernel's config space timed on the real intermediate tensors (``nsa_dsl.codegen.tuning``;
        an indexer spec takes its ``index`` inputs and tunes the index loss's kernels too).
        The winners are stored per GPU, kernel module, kernel kind, dtype and bucket of B * T
        beside the kernel cache, so later calls, in this process or another, run them.
        Returns a ``nsa_dsl.codegen.tuning.Result`` per kernel kind."""
        if not tuning.enabled(q):
            raise _err("E616", "autotuning needs a CUDA GPU; on the CPU and under TRITON_INTERPRET=1 "
                               "the kernels run the heuristic configs",
                       hint="call op.tune on CUDA tensors (or run `nsa-dsl tune FILE` on a GPU machine)")

        def leaf(x):
            return x.detach().requires_grad_(backward and x.is_floating_point())
        q = leaf(q)
        k = {n: leaf(x) for n, x in k.items()} if isinstance(k, Mapping) else leaf(k)
        v = {n: leaf(x) for n, x in v.items()} if isinstance(v, Mapping) else leaf(v)
        gates = None if gates is None else leaf(gates)
        compressed = {n: (leaf(a), leaf(b)) for n, (a, b) in compressed.items()} if compressed else None
        index = {n: tuple(leaf(x) for x in t) for n, t in index.items()} if index else None
        with tuning.session() as s:
            out = self(q, k, v, gates, compressed=compressed, scale=scale, cu_seqlens=cu_seqlens, index=index,
                       return_aux=index is not None)
            o, extra = (out[0], sum(x.sum() for x in out[1].index_loss.values())) if index else (out, 0)
            if backward:
                ((o * torch.randn_like(o)).sum() + extra).backward()
        return s.results

def _unit_last_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def compile(spec: Union[Spec, str, os.PathLike], *, cache_dir=None) -> CompiledOp:
    """Compile a spec (a ``Spec``, the path of a ``.nsa`` file with one block, or spec text: the
    rule of ``nsa_dsl.language.parser.as_spec``) to an op.

    Kernels are generated lazily at the first call, when the tensor shapes bind the
    spec's undeclared fields, and cached on disk (``$NSA_DSL_CACHE_DIR``).
    """
    return CompiledOp(as_spec(spec), KernelCache(Path(cache_dir)) if cache_dir else None)
