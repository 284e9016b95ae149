"""Packed variable-length batches (``cu_seqlens``, as FlashAttention's varlen API).

With ``cu_seqlens`` (int32 or int64 ``[N + 1]``, starting at 0, non-decreasing, ending at the
total number of tokens), the inputs have ``B = 1`` and ``T = cu_seqlens[-1]``; sequence ``s``
occupies rows ``[cu[s], cu[s + 1])`` and is computed exactly as if it ran alone: positions
restart at 0, and no attention, compression block or selection block crosses a boundary.
Empty sequences are allowed.

Per sequence: ``Nc_s = (len_s - block) // stride + 1`` compressed blocks (0 when
``len_s < block``), packed in sequence order. Caller-supplied compressed keys and values are
``[1, sum Nc_s, H, D]``; sequence ``s`` holds rows ``[ccu[s], ccu[s + 1])`` with
``ccu = compressed_cu_seqlens(cu_seqlens, block, stride)``. Selected block indices
(``aux.indices``) are each sequence's own block numbers (block ``j`` of sequence ``s`` covers
its positions ``[j*l', (j+1)*l')``).

This module imports torch and the error type only: the reference, the op and the module
share it (validation and the bookkeeping of packed rows; no attention arithmetic).

Error codes (``SpecError``): E620 cu_seqlens is not a 1-D int32/int64 tensor with at least two
entries, E621 it is on another device than q, E622 the batch size is not 1, E623 it does not
start at 0, E624 it decreases, E625 it does not end at the number of tokens T.
"""
from __future__ import annotations

from typing import Sequence

import torch

from nsa_dsl.errors import SpecError
from nsa_dsl.language.rules import num_compressed_blocks

__all__ = ["check_cu_seqlens", "compressed_cu_seqlens", "positions",
           "block_starts", "mean_pool", "split_blocks"]

_HINT = ("cu_seqlens = [0, len_0, len_0 + len_1, ..., T] (int32, on q's device, as "
         "FlashAttention's varlen API) with q [1, T, HQ, D]")


def check_cu_seqlens(cu_seqlens, x: torch.Tensor, what: str = "q") -> list[int]:
    """Validate ``cu_seqlens`` against ``x [B, T, ...]``; return it as a Python list.

    Reading the values is one device-to-host copy of ``N + 1`` integers.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise SpecError("E620", f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}",
                        hint=_HINT)
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) \
            or cu_seqlens.numel() < 2:
        raise SpecError("E620", f"cu_seqlens must be a 1-D int32 or int64 tensor [N + 1] with N >= 1 "
                                f"sequences; got shape {list(cu_seqlens.shape)} and dtype {cu_seqlens.dtype}",
                        hint=_HINT)
    if cu_seqlens.device != x.device:
        raise SpecError("E621", f"cu_seqlens is on {cu_seqlens.device}, expected {x.device} "
                                f"(the device of {what})", hint=_HINT)
    B, T = x.shape[0], x.shape[1]
    if B != 1:
        raise SpecError("E622", f"the batch size is expected to be 1 rather than {B} when using "
                                f"cu_seqlens ({what} has shape {list(x.shape)})",
                        hint="pack the sequences along the time dimension: "
                             f"{what}.reshape(1, B * T, ...) with cu_seqlens = arange(B + 1) * T")
    cu = [int(c) for c in cu_seqlens.tolist()]
    if cu[0] != 0:
        raise SpecError("E623", f"cu_seqlens must start at 0, got {cu[0]}", hint=_HINT)
    for s in range(len(cu) - 1):
        if cu[s + 1] < cu[s]:
            raise SpecError("E624", f"cu_seqlens must be non-decreasing, but cu_seqlens[{s + 1}] = "
                                    f"{cu[s + 1]} < cu_seqlens[{s}] = {cu[s]}", hint=_HINT)
    if cu[-1] != T:
        raise SpecError("E625", f"cu_seqlens must end at the number of tokens T = {T} "
                                f"({what} has shape {list(x.shape)}), got {cu[-1]}", hint=_HINT)
    return cu


def compressed_cu_seqlens(cu_seqlens, block: int, stride: int):
    """Offsets of each sequence's compressed blocks in packed ``[1, sum Nc_s, H, D]`` tensors:
    ``[0, Nc_0, Nc_0 + Nc_1, ...]``.

    A tensor gives a tensor of its dtype on its device (torch ops, no host sync); a list gives
    a list.
    """
    if isinstance(cu_seqlens, torch.Tensor):
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
        nc = torch.where(lens >= block, torch.div(lens - block, stride, rounding_mode="floor") + 1, 0)
        return torch.nn.functional.pad(torch.cumsum(nc, 0), (1, 0)).to(cu_seqlens.dtype)
    out = [0]
    for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        out.append(out[-1] + num_compressed_blocks(b - a, block, stride))
    return out


def positions(cu: Sequence[int], device=None) -> torch.Tensor:
    """``[T]`` int64: each packed row's position inside its sequence (restarting at 0)."""
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if not lens or cu[-1] == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    starts = torch.tensor(cu[:-1], dtype=torch.long, device=device)
    counts = torch.tensor(lens, dtype=torch.long, device=device)
    return torch.arange(cu[-1], device=device) - torch.repeat_interleave(starts, counts, output_size=cu[-1])


def block_starts(cu: Sequence[int], block: int, stride: int, device=None) -> torch.Tensor:
    """``[sum Nc_s]`` int64: the packed row where each compressed block starts, in packed order."""
    starts = [a + i * stride for a, b in zip(cu[:-1], cu[1:]) for i in range(num_compressed_blocks(b - a, block, stride))]
    return torch.tensor(starts, dtype=torch.long, device=device)


def split_blocks(x: torch.Tensor, cu: Sequence[int], block: int, stride: int) -> torch.Tensor:
    """``[1, T, H, D] -> [1, sum Nc_s, H, block, D]``: each sequence's compressed blocks (block
    ``i`` of sequence ``s`` holds its positions ``[i*stride, i*stride + block)``), packed."""
    rows = block_starts(cu, block, stride, x.device)[:, None] + torch.arange(block, device=x.device)
    return x[0, rows].transpose(1, 2).unsqueeze(0)           # [Nc, block, H, D] -> [1, Nc, H, block, D]


def mean_pool(k: torch.Tensor, cu: Sequence[int], block: int, stride: int) -> torch.Tensor:
    """``[1, T, H, D] -> [1, sum Nc_s, H, D]``: mean pooling of each sequence's compressed blocks."""
    starts = block_starts(cu, block, stride, k.device)
    if starts.numel() == 0:
        return k[:, :0]
    rows = starts[:, None] + torch.arange(block, device=k.device)     # [Nc, block]
    return k[0, rows].mean(1).unsqueeze(0)
