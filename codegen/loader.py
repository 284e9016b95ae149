"""Load rendered kernel source as a Python module.

Triton's ``@jit`` reads a kernel's source with ``inspect``, so generated code must
live in a real file; the cache (nsa_dsl.codegen.cache) decides where.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType


def import_file(path: Path, module_name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # triton resolves globals through the module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def load_module(source: str, name: str, directory: Path | None = None) -> ModuleType:
    """Write ``source`` to ``directory`` (a temp dir by default) and import it."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    directory = Path(directory or Path(tempfile.gettempdir()) / "nsa_dsl_modules")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}_{digest}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(source)
        os.replace(tmp, path)
    return import_file(path, f"nsa_dsl_generated.{name}_{digest}")
