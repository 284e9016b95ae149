"""The semantics' integer rules, in plain ints (no torch, no sympy): one home each, imported by
the reference, the op, the decode path, the packed-sequence helpers and the launchers. The
symbolic forms that ``explain`` and the kernels print live in ``nsa_dsl.language.shapes``."""
from __future__ import annotations


def num_compressed_blocks(T: int, block: int, stride: int) -> int:
    """``Nc = floor((T - l) / d) + 1`` compressed blocks of ``T`` keys, 0 when ``T < l``."""
    return 0 if T < block else (T - block) // stride + 1


def num_select_blocks(T: int, select_block: int) -> int:
    """Selection blocks that hold at least one of ``T`` keys: ``ceil(T / l')``."""
    return -(-T // select_block)
