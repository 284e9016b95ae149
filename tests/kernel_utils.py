"""Small helpers shared by the kernel-family tests: render + load a template, compare, random inputs."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent.parent) not in sys.path:   # plain `pytest` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from codegen.loader import load_module
from codegen.render import render


@functools.lru_cache(maxsize=None)
def _load(template: str, items: tuple):
    variables = dict(items)
    source = render(template, **variables)
    stem = template.split(".")[0]
    name = stem + "_" + "_".join(f"{k}{v}" for k, v in items)
    return load_module(source, name)


def load_family(template: str, **variables):
    """Render ``templates/<template>`` with ``variables`` and import it (cached per variable set)."""
    return _load(template, tuple(sorted(variables.items())))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (absolute error when ``b`` is all zeros). NaN anywhere -> inf."""
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    assert a.shape == b.shape, (a.shape, b.shape)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        # non-finite values must agree exactly (e.g. lse = -inf rows)
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        if not torch.equal(fa, fb) or not torch.equal(a[~fa], b[~fb]):
            return float("inf")
        a, b = a[fa], b[fb]
    num = (a - b).norm().item()
    den = b.norm().item()
    return num / den if den > 0 else num


def rand(shape, dtype=torch.float32, seed: int = 0, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Reproducible standard-normal tensor (generated in float32 on the CPU, then cast/moved)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float32) * scale
    return x.to(device=device, dtype=dtype)


def run_sm90_check(script: str, args, tmp_path) -> None:
    """Run ``script`` (it compiles kernels for sm_90 through ptxas and prints "compiled") in a
    process without TRITON_INTERPRET; skips where this triton build has no CUDA backend / ptxas."""
    import os
    import subprocess
    import sys

    import pytest
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    run = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                         env=env, timeout=900)
    if "No module named" in run.stderr or "ptxas" in run.stderr and "not found" in run.stderr:
        pytest.skip("no CUDA backend / ptxas in this triton build")
    assert run.returncode == 0 and "compiled" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
