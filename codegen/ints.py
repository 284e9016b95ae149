"""Host integer helpers shared by planning and launching (plain ints; no torch, no triton).

triton.cdiv / triton.next_power_of_2 are constexpr functions on newer Triton and cost ~2 us a
call from the host, where a launcher makes several per launch.
"""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    x = int(x)
    return 1 << (x - 1).bit_length() if x > 1 else 1
