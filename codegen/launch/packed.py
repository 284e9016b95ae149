"""Launcher tables for packed variable-length batches (``cu_seqlens``), plain torch.

``cu_seqlens [N + 1]`` int32 (as FlashAttention's varlen API): sequence s holds rows
``[cu[s], cu[s + 1])`` of a packed batch with B = 1 and is computed exactly as if it ran alone
(positions restart at 0). A kernel program reads its (sequence, tile) from a tile table, then
the sequence's first row ``bos = cu[s]`` and length ``T = cu[s + 1] - cu[s]`` from cu_seqlens,
and moves its base pointers to row ``bos``: the rest of the kernel is the one of a single
sequence. Tables are built with torch ops only, no host sync: their length is a bound known on
the host (rows past the real tiles hold sequence N and their programs return at once).
"""
from __future__ import annotations

from typing import Optional

import torch


def packed(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cu int32 [N + 1] contiguous, lens int64 [N]) of a packed batch."""
    cu = cu_seqlens.to(torch.int32).contiguous()
    return cu, (cu[1:] - cu[:-1]).long()


def cumsum0(counts: torch.Tensor) -> torch.Tensor:
    """[0, c0, c0 + c1, ...] as int32: offsets of per-sequence pieces in a packed tensor."""
    return torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32).contiguous()


def tile_table(lens: torch.Tensor, size: int, total: int) -> torch.Tensor:
    """The tiles of `size` rows of every sequence: int32 [n, 2], row = (sequence, tile number
    inside the sequence), sequences in order. n = total // size + N bounds sum(cdiv(lens, size))
    for sum(lens) <= total; rows past the real tiles hold (N, 0)."""
    N = lens.numel()
    counts = (lens + size - 1) // size
    ends = torch.cumsum(counts, 0)                       # tile e belongs to the first s with e < ends[s]
    e = torch.arange(total // size + N, device=lens.device)
    seq = torch.searchsorted(ends, e, right=True)
    first = (ends - counts).gather(0, seq.clamp(max=max(N - 1, 0)))
    tile = torch.where(seq < N, e - first, 0)
    return torch.stack((seq, tile), 1).to(torch.int32).contiguous()


def seq_of_rows(cu: torch.Tensor, T: int) -> torch.Tensor:
    """[T] int64: the sequence of each packed row (rows of empty sequences never occur)."""
    return torch.searchsorted(cu[1:].long(), torch.arange(T, device=cu.device), right=True)


def check_packed(q: torch.Tensor, cu_seqlens: Optional[torch.Tensor], varlen: bool, what: str) -> None:
    """A module rendered with VARLEN needs cu_seqlens (B = 1); one without refuses it."""
    if varlen and (cu_seqlens is None or q.shape[0] != 1):
        raise ValueError(f"these {what} kernels were generated for packed sequences (VARLEN): "
                         f"pass cu_seqlens with B = 1; got B = {q.shape[0]}, cu_seqlens {cu_seqlens is not None}")
    if not varlen and cu_seqlens is not None:
        raise ValueError(f"these {what} kernels were generated without packed sequences: "
                         "cu_seqlens needs a plan lowered with varlen=True")
