"""The on-disk kernel cache.

An entry is a folder named by the sha256 of everything that determines the
generated code: the plan (canonical IR, binding, template variables), the
generator's own sources (templates and the Python that renders them), and the
triton and torch versions. It holds
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
import stat
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
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe", delete=True)
        probe.close()
        return True
    except OSError:
        return False


def unsafe_reason(path: Path) -> str | None:
    """Why generated code must not be imported from folder ``path``, or None: it must be a real
    folder (not a link), owned by the current user and writable by no one else, or another local
    user could plant a module that this process would import and run."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"is owned by another user (uid {st.st_uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


_PRIVATE: dict[str, Path] = {}      # the process's private fallback folder, made once


def cache_dir() -> Path:
    """The cache folder: ``$NSA_DSL_CACHE_DIR``, else the platform cache folder. One that is not
    writable, or not safe to import code from (:func:`unsafe_reason`), is replaced by a private
    temporary folder (``mkdtemp``: unpredictable, mode 0700), with a warning."""
    path = default_dir()
    reason = None if _writable(path) else "is not writable"
    reason = reason or unsafe_reason(path)
    if reason is None:
        return path
    if "dir" not in _PRIVATE:
        _PRIVATE["dir"] = Path(tempfile.mkdtemp(prefix="nsa-dsl-cache-"))
    fallback = _PRIVATE["dir"]
    warnings.warn(f"nsa-dsl: kernel cache {path} {reason}; using the private folder {fallback} for this "
                  f"process (set NSA_DSL_CACHE_DIR to a folder of your own, mode 0700)", RuntimeWarning, stacklevel=3)
    return fallback


def generator_digest() -> str:
    """sha256 of every file that writes kernel text: the templates (all of them: they import and
    include each other), and the Python that renders them or computes what they print (render,
    plan, the shapes printer). A change to any of them is a new cache key; no version to bump."""
    from nsa_dsl.language import shapes, symbolic
    from . import ints, plan
    h = hashlib.sha256()
    for name in sorted(p.name for p in _render.templates_dir().glob("*.j2")):
        h.update(name.encode() + b"\0" + _render.template_source(name).encode() + b"\0")
    for module in (_render, plan, ints, shapes, symbolic):
        h.update(module.__name__.encode() + b"\0" + Path(module.__file__).read_bytes() + b"\0")
    return h.hexdigest()


def cache_key(plan: Plan) -> str:
    h = hashlib.sha256()
    h.update(plan.canonical().encode())
    h.update(generator_digest().encode())
    h.update(_versions().encode())
    return h.hexdigest()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def render_plan(plan: Plan) -> dict[str, str]:
    """Render every kernel of the plan: module name -> source."""
    return {k.name: _render.render(k.template, **k.vars()) for k in plan.kernels}


def _valid(entry: Path, plan: Plan) -> bool:
    """An entry whose manifest lists exactly the plan's modules, each a regular file (not a link)
    whose sha256 matches; anything else (missing, truncated, edited, extra) is rebuilt."""
    try:
        if unsafe_reason(entry) is not None:
            return False
        manifest = json.loads((entry / MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or set(files) != {k.name for k in plan.kernels}:
            return False
        for name, digest in files.items():
            path = entry / f"{name}.py"
            if not stat.S_ISREG(os.lstat(path).st_mode) or _sha(path.read_text()) != digest:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return False


def _clear(path: Path) -> None:
    """Remove whatever sits at ``path`` (a file, a link, a folder) inside the cache folder."""
    if os.path.islink(path) or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _write_entry(entry: Path, plan: Plan, sources: dict[str, str]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name[:12]}-", dir=entry.parent))
    try:
        for name, src in sources.items():
            (tmp / f"{name}.py").write_text(src)
        (tmp / "plan.txt").write_text(plan.describe() + "\n")
        (tmp / MANIFEST).write_text(json.dumps(
            {"files": {n: _sha(s) for n, s in sources.items()}, "versions": _versions()}, indent=1))
        if os.path.lexists(entry):  # a corrupt entry (we hold its lock): move it aside, install ours
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
        if directory is not None:
            directory = Path(directory)
            reason = None if _writable(directory) else "is not writable"
            reason = reason or unsafe_reason(directory)
            if reason is not None:
                warnings.warn(f"nsa-dsl: kernel cache {directory} {reason}; using the default cache "
                              "folder instead", RuntimeWarning, stacklevel=2)
                directory = None
        self.directory = directory if directory is not None else cache_dir()
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
        prefix = entry.parent
        if os.path.lexists(prefix) and unsafe_reason(prefix) is not None:
            log.warning("nsa-dsl: cache folder %s is not a plain folder of ours; replacing it", prefix)
            _clear(prefix)
        prefix.mkdir(mode=0o700, exist_ok=True)
        if not _valid(entry, plan):
            lock = Path(str(entry) + ".lock")
            if os.path.lexists(lock) and not stat.S_ISREG(os.lstat(lock).st_mode):
                _clear(lock)                  # a folder or a link where the lock file goes
            # one writer at a time per entry; a second process waits, then finds it valid
            with FileLock(str(lock)):
                if not _valid(entry, plan):
                    if os.path.lexists(entry):
                        log.warning("nsa-dsl: cache entry %s is corrupt; rebuilding", entry)
                    self.renders += 1
                    _write_entry(entry, plan, render_plan(plan))
        modules = {k.name: import_file(entry / f"{k.name}.py", f"nsa_dsl_generated.k{key[:16]}.{k.name}")
                   for k in plan.kernels}
        self._loaded[key] = modules
        return modules
