"""What every kernel family's launchers share: launch configs and their search space.

A config is a dict of launch parameters of one kernel kind (tiles, ``num_warps``,
``num_stages``, ``maxnreg``); what it leaves out comes from the family's heuristic. Launchers
take ``config=`` keyed by kind (``{"fwd": {...}, "dq": {...}}``: what autotuning stores, see
``nsa_dsl.codegen.tuning``) or flat (every kernel of the launcher). ``config_space(kind, T)``
lists what the tuner times on a GPU: valid configs only, pruned by an estimate of their shared
memory before anything compiles.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Any, Mapping, Optional

import torch

SMEM_DEFAULT = 232448   # bytes of shared memory a block may use on an H100 / H200 (227 KB)
LOG2E = 1.4426950408889634

Config = dict[str, Any]


def new_output(shape, dtype, device) -> torch.Tensor:
    """An output buffer: NaN-filled under ``NSA_DSL_NAN_FILL=1`` (the tests), so an element a
    kernel forgets to write fails every comparison; else ``torch.empty``."""
    if os.environ.get("NSA_DSL_NAN_FILL") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def unit_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit stride in its last dim (the kernels take the other strides)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def tma_ready(x: torch.Tensor) -> bool:
    """Whether TMA can read ``x``: unit last stride, 16-byte aligned base and other strides."""
    return (x.stride(-1) == 1 and x.data_ptr() % 16 == 0
            and all(st * x.element_size() % 16 == 0 for st in x.stride()[:-1]))


def tma_descs(want: bool, *tiles: tuple[torch.Tensor, list[int]]) -> tuple:
    """(descriptors..., TMA): host TMA descriptors of each (tensor, box) in ``tiles`` (rows past a
    tensor's end and padding past its dims load as 0) when ``want``, triton has host descriptors
    and every layout allows it; else (the tensors themselves..., False): pointer loads."""
    pointers = (*(x for x, _ in tiles), False)
    if not want:             # every launch asks: the default returns before anything else
        return pointers
    try:     # imported here: importing triton before nsa_dsl picks the interpreter (CPU) fixes it too early
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:      # triton without host TMA descriptors: pointer loads only
        return pointers
    if not all(tma_ready(x) for x, _ in tiles):
        return pointers
    return (*(TensorDescriptor(x, list(x.shape), list(x.stride()), box) for x, box in tiles), True)


def is_tile(x) -> bool:
    """A tl.dot dimension: a power of two of at least 16."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 16 and x & (x - 1) == 0


def check_q_start(q_start, cu_seqlens, what: str = "attention") -> None:
    """``q_start`` (q's rows are positions q_start .. of the sequence) is an int >= 0, and 0 with
    packed sequences (context parallelism splits those above the kernels)."""
    if not (isinstance(q_start, int) and not isinstance(q_start, bool) and q_start >= 0):
        raise ValueError(f"q_start must be an int >= 0, got {q_start!r}")
    if q_start and cu_seqlens is not None:
        raise ValueError(f"{what}: q_start = {q_start} with cu_seqlens: packed sequences start at position 0 "
                         "(split them above the kernels)")


def check_piece(q_start, Tq: int, Tk: int, QB: int, offsets: bool, cu_seqlens, what: str) -> None:
    """The q_start rules, and for kernels that take the piece as a plan variant (top-k, selection):
    kernels generated with OFFSETS when q_start > 0 or fewer queries than keys; a piece starts at a
    multiple of the query_block QB and ends by Tk."""
    check_q_start(q_start, cu_seqlens, what)
    if not offsets and (q_start or Tq != Tk):
        raise ValueError(f"these {what} kernels were generated without query pieces (OFFSETS): got q_start = "
                         f"{q_start}, {Tq} queries and {Tk} keys; lower the plan with offsets=True")
    if q_start % QB:
        raise ValueError(f"{what}: q_start = {q_start} starts inside a group of query_block = {QB} positions; "
                         f"start at a multiple of {QB}")
    if q_start + Tq > Tk:
        raise ValueError(f"{what}: queries at positions {q_start} .. {q_start + Tq - 1}, but the keys hold {Tk}")


def launch_invalid(cfg: Config) -> Optional[str]:
    """What is wrong with num_warps / num_stages / maxnreg (Triton's default when absent), or None."""
    if cfg.get("num_warps") not in (1, 2, 4, 8, 16):
        return "num_warps must be 1, 2, 4, 8 or 16"
    stages = cfg.get("num_stages")
    if "num_stages" in cfg and not (isinstance(stages, int) and not isinstance(stages, bool) and 1 <= stages <= 8):
        return "num_stages must be 1 to 8"
    reg = cfg.get("maxnreg")
    if reg is not None and not (isinstance(reg, int) and not isinstance(reg, bool) and 24 <= reg <= 255):
        return "maxnreg (registers per thread) must be 24 to 255"
    return None


def launch_options(cfg: Config) -> dict:
    """The Triton launch options of a config: num_warps, num_stages and maxnreg, where set."""
    return {k: cfg[k] for k in ("num_warps", "num_stages", "maxnreg") if cfg.get(k) is not None}


class Family:
    """The launchers of one rendered kernel module.

    ``kernels`` is the rendered module (its ``@triton.jit`` functions); ``variables`` the
    plan's finished numbers it was rendered with. A family declares its kernel kinds
    (``KINDS``), which kinds each launcher runs (``TUNE_KINDS``: what the tuner times), and
    implements ``_heuristic``, ``_invalid``, ``smem_bytes`` and ``config_space``.
    """

    family = ""
    KINDS: tuple[str, ...] = ()
    TUNE_KINDS: Mapping[str, tuple[str, ...]] = {}

    def __init__(self, kernels: ModuleType, variables: Mapping[str, Any]):
        self.kernels = kernels
        self.variables = dict(variables)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in sorted(self.variables.items()))
        return f"<{type(self).__name__} {args}>"

    # -- TMA descriptors of the streamed tiles (attention families: they define GP, BDK, BDV) ---
    def _kv_descs(self, k: torch.Tensor, v: torch.Tensor, cfg: Config) -> tuple:
        """(k_desc, v_desc, TMA): key / value tiles of BN rows of one kv head, [1, BN, 1, BD] boxes of
        k, v [B, T, H, D] (``tma_descs``: pointer loads unless cfg asks for TMA and the layouts allow it)."""
        return tma_descs(bool(cfg.get("TMA")), (k, [1, cfg["BN"], 1, self.BDK]), (v, [1, cfg["BN"], 1, self.BDV]))

    def _qdo_descs(self, q: torch.Tensor, do: torch.Tensor, cfg: Config) -> tuple:
        """(q_desc, do_desc, TMA): query / output-gradient tiles of R positions x the GP heads of one kv
        head, [1, R, GP, BD] boxes of q, do [B, T, HQ, D] (as ``_kv_descs``)."""
        R, GP = cfg["R"], self.GP
        return tma_descs(bool(cfg.get("TMA")), (q, [1, R, GP, self.BDK]), (do, [1, R, GP, self.BDV]))

    # -- configs: the family fills these in --------------------------------------------------
    def _heuristic(self, kind: str, gpu: bool, T: int) -> Config:
        """The untuned config of kernel ``kind`` on a GPU (``gpu``) or the interpreter, at length T."""
        raise NotImplementedError

    def _invalid(self, kind: str, cfg: Config) -> Optional[str]:
        """Why ``cfg`` cannot run kernel ``kind`` (beyond the launch options), or None."""
        return None

    def smem_bytes(self, kind: str, cfg: Config, dtype_bytes: int = 2) -> int:
        """The shared memory a config takes, estimated (pruning only)."""
        return 0

    def config_space(self, kind: str, T: int, *, smem: Optional[int] = None, dtype_bytes: int = 2) -> list[Config]:
        """Candidate configs of kernel ``kind`` for the tuner (GPU), partial dicts over the heuristic."""
        return []

    # -- shared machinery ----------------------------------------------------------------------
    def _for_kind(self, config: Optional[Mapping], kind: str) -> Optional[Mapping]:
        """The part of ``config`` for kernel ``kind`` (None: the heuristic)."""
        if not config:
            return None
        if any(k in config for k in self.KINDS):
            return config.get(kind) or None
        return config

    def resolve_config(self, q: torch.Tensor, kind: str, config: Optional[Mapping] = None) -> Config:
        """The full config a launcher uses for kernel ``kind`` on ``q``: the heuristic, updated by
        ``config`` (keyed by kind or flat). Raises ValueError for an invalid one."""
        cfg = self._heuristic(kind, q.is_cuda, q.shape[1])
        override = self._for_kind(config, kind)
        if override:
            cfg.update(override)
        reason = self._invalid(kind, cfg) or launch_invalid(cfg)
        if reason:
            raise ValueError(f"invalid {kind} config {cfg}: {reason}")
        return cfg

    def _prune(self, kind: str, candidates: list[Config], T: int, smem: Optional[int],
               dtype_bytes: int) -> list[Config]:
        """The candidates that are valid (over the GPU heuristic) and whose estimated shared memory
        fits in ``smem`` bytes (SMEM_DEFAULT when None), without repeats, in order."""
        limit = SMEM_DEFAULT if smem is None else smem
        out: list[Config] = []
        for c in candidates:
            full = {**self._heuristic(kind, True, T), **c}
            if c in out or self._invalid(kind, full) or launch_invalid(full):
                continue
            if self.smem_bytes(kind, full, dtype_bytes) <= limit:
                out.append(c)
        return out


def row_delta(kernels: ModuleType, o: torch.Tensor, do: torch.Tensor, DV: int, BDV: int) -> torch.Tensor:
    """``delta = rowsum(o * do)`` in fp32, [B, T, HQ], without fp32 copies of o and do (the
    rendered module's ``bwd_delta_kernel``)."""
    o, do = o.contiguous(), do.contiguous()
    delta = torch.empty(o.shape[:-1], dtype=torch.float32, device=o.device)
    n_rows = delta.numel()
    if n_rows:
        BR = 16
        kernels.bwd_delta_kernel[(-(-n_rows // BR),)](o, do, delta, n_rows, DV=DV, BDV=BDV, BR=BR)
    return delta


def dq_buffer(q: torch.Tensor, dq_acc: Optional[torch.Tensor]) -> torch.Tensor:
    """The dq a backward writes: a new tensor, or ``dq_acc`` (other branches' gradient of q,
    which the dq kernel adds its own to, in place)."""
    if dq_acc is None:
        return new_output(q.shape, q.dtype, q.device)
    if dq_acc.shape != q.shape or dq_acc.dtype != q.dtype or not dq_acc.is_contiguous():
        raise ValueError(f"dq_acc must be a contiguous {q.dtype} tensor of q's shape {list(q.shape)}, "
                         f"got {dq_acc.dtype} {list(dq_acc.shape)}")
    return dq_acc
