"""Where the generated kernels run: a CUDA GPU, or the CPU through Triton's interpreter.

Triton's interpreter runs a kernel on the CPU when ``TRITON_INTERPRET=1`` is set before triton
is imported (triton's own library functions are built for one mode at import). On a machine
without CUDA, the first kernel call on CPU tensors turns it on if triton is not imported yet;
otherwise it says what to do.
"""
from __future__ import annotations

import os
import sys

from nsa_dsl.errors import SpecError


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _imported_for_the_interpreter() -> bool:
    """Triton was imported with the interpreter on (its library functions are interpreted)."""
    tl = sys.modules.get("triton.language")
    if tl is None:
        return True
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(getattr(tl, "sigmoid", None), InterpretedFunction)


def check_kernel_device(x, dtype, what: str = "q", reference_hint: str = "nsa_dsl.reference") -> None:
    """Raise a SpecError unless the generated kernels can run on ``x``'s device in ``dtype``;
    on a CPU-only machine, turn Triton's interpreter on when that is still possible."""
    import torch
    if x.device.type == "cuda":
        return
    if x.device.type != "cpu":
        raise SpecError("E607", f"{what} is on {x.device}; the generated kernels run on CUDA devices "
                                "(or on the CPU through Triton's interpreter)",
                        hint=f"move the tensors to 'cuda', or use {reference_hint}")
    if not interpreting():
        if torch.cuda.is_available():
            raise SpecError("E607", f"{what} is on the CPU; the generated kernels run on the GPU here",
                            hint=f"move the tensors to 'cuda', or use {reference_hint} on the CPU")
        if "triton" in sys.modules:
            raise SpecError("E607", f"{what} is on the CPU, where the kernels run through Triton's "
                                    "interpreter, but triton was imported before it could be turned on",
                            hint="set TRITON_INTERPRET=1 in the environment before Python starts "
                                 "(or import nsa_dsl and call the op before importing triton)")
        os.environ["TRITON_INTERPRET"] = "1"
    elif not _imported_for_the_interpreter():
        raise SpecError("E607", "TRITON_INTERPRET=1 was set after triton was imported; the "
                                "interpreter needs it before the import",
                        hint="set TRITON_INTERPRET=1 in the environment before Python starts")
    if dtype == torch.bfloat16:
        raise SpecError("E619", f"{what} is bfloat16 on the CPU: Triton's interpreter computes bf16 "
                                "matrix products wrongly",
                        hint="use float32 or float16 on the CPU (bfloat16 on a GPU)")
