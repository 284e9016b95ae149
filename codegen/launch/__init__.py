"""Launchers: the host half of each kernel family, plain Python over a rendered kernel module.

A rendered module (``templates/<family>.py.j2``) holds ``@triton.jit`` device code only. Its
family's class here (a :class:`~nsa_dsl.codegen.launch.base.Family`) checks the tensors, picks
the launch config (heuristic, stored tuning, or ``config=``), allocates the outputs and launches
the kernels; it reads the plan's finished numbers (``KernelPlan.variables``), the same ones the
template was rendered with, so no constant is written twice.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .base import Family

_FAMILIES: dict[str, type[Family]] = {}


def family(name: str):
    """Class decorator: the launchers of kernel family ``name`` (the template's stem)."""
    def register(cls: type[Family]) -> type[Family]:
        cls.family = name
        _FAMILIES[name] = cls
        return cls
    return register


_MODULES = ("combine", "compress", "decode", "gather", "index_loss", "indexer", "select", "topk", "window")


def _families() -> dict[str, type[Family]]:
    """Every family's launcher class by family name (each module registers its class)."""
    if len(_FAMILIES) < len(_MODULES):         # a family module imported on its own registers only itself
        for name in _MODULES:
            importlib.import_module(f"{__name__}.{name}")
    return _FAMILIES


def launchers(family_name: str, variables: dict, kernels: ModuleType) -> Family:
    """The launchers of one rendered module: ``kernels`` (its jit functions) with the plan's
    ``variables`` for it."""
    return _families()[family_name](kernels, variables)


def build(plan, modules: dict[str, ModuleType]) -> dict[str, Family]:
    """The launchers of every kernel of ``plan`` by kernel name, over its loaded ``modules``."""
    return {k.name: launchers(k.family, k.vars(), modules[k.name]) for k in plan.kernels}


__all__ = ["Family", "family", "launchers", "build"]
