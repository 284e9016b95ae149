"""The on-disk kernel cache.

An entry is a folder named by the sha256 of everything that determines the
generated code: the plan (canonical IR, binding, template variables, generator
version), the templates' contents, and the triton and torch versions. It holds
one rendered module per kernel and a manifest of their hashes. Entries are
built in a temporary folder and renamed into place, so a reader never sees a
torn entry; a manifest mismatch (truncated or edited file) rebuilds the entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

from filelock import FileLock

from . import render as _render
from .loader import import_file
from .plan import Plan

log = logging.getLogger("nsa_dsl.cache")

MANIFEST = "manifest.json"


def _versions() -> str:
    import torch
    import triton
    return f"triton={triton.__version__} torch={torch.__version__}"


def default_dir() -> Path:
    env = os.environ.get("NSA_DSL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs
        return Path(platformdirs.user_cache_dir("nsa-dsl"))
    except ImportError:
        return Path.home() / ".cache" / "nsa-dsl"


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe", delete=True)
        probe.close()
        return True
    except OSError:
        return False


def cache_dir() -> Path:
    """The cache folder; an unwritable one falls back to a temporary folder, with a warning."""
    path = default_dir()
    if _writable(path):
        return path
    fallback = Path(tempfile.gettempdir()) / f"nsa-dsl-cache-{os.getuid() if hasattr(os, 'getuid') else 0}"
    warnings.warn(f"nsa-dsl: kernel cache {path} is not writable; using {fallback} "
                  f"(set NSA_DSL_CACHE_DIR to choose another folder)", RuntimeWarning, stacklevel=3)
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def cache_key(plan: Plan) -> str:
    h = hashlib.sha256()
    h.update(plan.canonical().encode())
    for template in sorted({k.template for k in plan.kernels}) + _render.partials():   # + included pieces
        h.update(template.encode())
        h.update(_render.template_source(template).encode())
    h.update(_versions().encode())
    return h.hexdigest()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def render_plan(plan: Plan) -> dict[str, str]:
    """Render every kernel of the plan: module name -> source."""
    return {k.name: _render.render(k.template, **k.vars()) for k in plan.kernels}


def _valid(entry: Path) -> bool:
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        return all(_sha((entry / f"{name}.py").read_text()) == digest
                   for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_entry(entry: Path, plan: Plan, sources: dict[str, str]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name[:12]}-", dir=entry.parent))
    try:
        for name, src in sources.items():
            (tmp / f"{name}.py").write_text(src)
        (tmp / "plan.txt").write_text(plan.describe() + "\n")
        (tmp / MANIFEST).write_text(json.dumps(
            {"files": {n: _sha(s) for n, s in sources.items()}, "versions": _versions()}, indent=1))
        if entry.exists():  # a corrupt entry (we hold its lock): move it aside, install ours
            trash = entry.with_name(entry.name + f".bad{os.getpid()}")
            try:
                os.replace(entry, trash)
                shutil.rmtree(trash, ignore_errors=True)
            except OSError:
                pass
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class KernelCache:
    """Maps a plan to loaded kernel modules, rendering only on a miss."""

    def __init__(self, directory: Path | None = None):
        self.directory = Path(directory) if directory else cache_dir()
        self._loaded: dict[str, dict[str, ModuleType]] = {}
        self.renders = 0  # how many plans this cache rendered (tests read it)

    def entry(self, plan: Plan) -> Path:
        key = cache_key(plan)
        return self.directory / key[:2] / key

    def load(self, plan: Plan) -> dict[str, ModuleType]:
        key = cache_key(plan)
        if key in self._loaded:
            return self._loaded[key]
        entry = self.directory / key[:2] / key
        entry.parent.mkdir(parents=True, exist_ok=True)
        if not _valid(entry):
            # one writer at a time per entry; a second process waits, then finds it valid
            with FileLock(str(entry) + ".lock"):
                if not _valid(entry):
                    if entry.exists():
                        log.warning("nsa-dsl: cache entry %s is corrupt; rebuilding", entry)
                    self.renders += 1
                    _write_entry(entry, plan, render_plan(plan))
        modules = {k.name: import_file(entry / f"{k.name}.py", f"nsa_dsl_generated.k{key[:16]}.{k.name}")
                   for k in plan.kernels}
        self._loaded[key] = modules
        return modules
