"""Autotuning: the fastest launch config per kernel, measured on the GPU and kept on disk.

Each kernel family declares its config space: its launchers (``nsa_dsl.codegen.launch``) have ``KINDS`` (its kernel
kinds), ``TUNE_KINDS`` (launcher -> the kinds it runs), ``config_space(kind, T, smem=...,
dtype_bytes=...)`` (valid candidates, pruned by a shared-memory estimate before compiling) and
``resolve_config(q, kind, config)``; every launcher takes ``config=`` (codegen/launch/base.py).

The tuner (``tune_launcher``) times one launcher call with each candidate of each kind it runs,
with ``triton.testing.do_bench`` (median), on the call's own inputs; a candidate that fails to
compile or launch (out of shared memory, registers) is skipped; the fastest one that computes
what the default computes wins. Kinds of one launcher (``bwd``: dq, then dkdv) are tuned in turn,
each timed as the whole launcher call, so every cost a config implies counts.

Results persist in one JSON file per GPU model next to the kernel cache::

    <cache dir>/tuning/<gpu>.json            e.g. ~/.cache/nsa-dsl/tuning/NVIDIA_H200.json
    {"version": 1, "gpu": "NVIDIA H200",
     "entries": {"<module key>|<kind>|<dtype>|<bucket>":
                 {"config": {"R": 4, "num_warps": 8}, "ms": 1.9, "default_ms": 2.3, ...}}}

``module key`` is the op's key of a generated module, ``<cache key[:16]>/<kernel name>``: the cache
key hashes the spec, the binding, the templates and the triton / torch versions, so a changed
kernel never picks up a stale config. ``kind``: fwd, dq, dkdv or topk; ``dtype``: bfloat16, ...;
``bucket``: B * T rounded up to a power of two. A stored ``{}`` means the heuristic won.

At call time ``lookup`` is a dict access (the file is read once per process); it gives None, so
the templates' heuristics run, on the CPU, under ``TRITON_INTERPRET=1`` (no driver to time on)
or when nothing is stored. ``config_for`` also tunes an untuned bucket first when
``NSA_DSL_AUTOTUNE=1``, or every call's bucket inside ``session()`` (``CompiledOp.tune``,
``nsa-dsl tune``). Writes are atomic (temporary file + ``os.replace``) under a file lock; a
corrupt store is ignored with a warning and rewritten by the next write.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from filelock import FileLock

log = logging.getLogger("nsa_dsl.tuning")

VERSION = 1
MARGIN = 0.03            # a candidate must beat the default by 3% (do_bench noise) to replace it
WARMUP_MS, REP_MS = 10, 40


# -- when tuning applies -----------------------------------------------------------------------

def interpreted() -> bool:
    """Kernels run in Triton's CPU interpreter: nothing to time, the heuristics run."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def enabled(x) -> bool:
    """Tuned configs apply to tensors on a CUDA device, outside the interpreter."""
    return bool(getattr(x, "is_cuda", False)) and not interpreted()


def autotune_requested() -> bool:
    """``NSA_DSL_AUTOTUNE=1``: tune an untuned bucket at its first call (off by default)."""
    return os.environ.get("NSA_DSL_AUTOTUNE") == "1"


def bucket(n: int) -> int:
    """The shape bucket of ``n = B * T`` rows: ``n`` rounded up to a power of two."""
    return 1 << max(0, int(n) - 1).bit_length()


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


_GPU_NAMES: dict = {}


def gpu_name(device) -> str:
    """``torch.cuda.get_device_name`` of ``device``, memoized (the hot path asks per call)."""
    index = device.index if getattr(device, "index", None) is not None else None
    if index not in _GPU_NAMES:
        import torch
        _GPU_NAMES[index] = torch.cuda.get_device_name(device)
    return _GPU_NAMES[index]


def smem_limit(device) -> int:
    """Shared memory a block may use on ``device``, from Triton's driver (bytes)."""
    import torch
    import triton
    index = device.index if getattr(device, "index", None) is not None else torch.cuda.current_device()
    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


# -- the store -----------------------------------------------------------------------------------

def store_path(gpu: str, directory=None) -> Path:
    """The store of one GPU model: ``<directory or the kernel cache dir>/tuning/<gpu>.json``."""
    if directory is None:
        from .cache import cache_dir
        directory = cache_dir()
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", gpu).strip("_") or "gpu"
    return Path(directory) / "tuning" / f"{slug}.json"


def entry_key(module_key: str, kind: str, dtype: str, bucket_: int) -> str:
    return f"{module_key}|{kind}|{dtype}|{bucket_}"


class Store:
    """One JSON file of tuned configs (one GPU model)."""

    def __init__(self, path: Path, gpu: str = ""):
        self.path = Path(path)
        self.gpu = gpu

    def read(self) -> dict:
        """The entries; {} when the file is missing, and when it is corrupt (with a warning: the
        next write replaces it)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as e:
            warnings.warn(f"nsa-dsl: cannot read the tuning store {self.path} ({e}); "
                          "using the heuristic configs", RuntimeWarning, stacklevel=2)
            return {}
        try:
            data = json.loads(text)
            entries = data["entries"]
            if data.get("version") != VERSION or not isinstance(entries, dict) \
                    or not all(isinstance(e, dict) and isinstance(e.get("config"), dict) for e in entries.values()):
                raise ValueError("unexpected layout")
            return entries
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            warnings.warn(f"nsa-dsl: the tuning store {self.path} is corrupt ({type(e).__name__}: {str(e)[:100]}); ignoring it "
                          "(it is rebuilt by the next tuning run)", RuntimeWarning, stacklevel=2)
            return {}

    def write(self, entries: dict) -> dict:
        """Merge ``entries`` into the file; returns everything stored. One writer at a time
        (a file lock, as the kernel cache), and readers never see a torn file (os.replace)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")     # a corrupt file is simply replaced here
                merged = self.read()
            merged.update(entries)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}-", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"version": VERSION, "gpu": self.gpu, "entries": merged}, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return merged


# -- lookup at call time -------------------------------------------------------------------------

_DIRS: dict[str, Path] = {}          # module key -> the directory of its op's kernel cache
_INDEX: dict[Path, dict] = {}        # store path -> {(module key, dtype, bucket): {kind: config}}
_PATHS: dict[tuple, Path] = {}       # (module key, device index) -> store path


def register(module_key: str, directory) -> None:
    """Where the store of a module's op lives (its kernel cache's directory)."""
    _DIRS[module_key] = Path(directory)
    for k in [k for k in _PATHS if k[0] == module_key]:
        del _PATHS[k]


def _index(path: Path, entries: Optional[dict] = None) -> dict:
    """{(module key, dtype, bucket): {kind: entry}} of one store, read once per process."""
    if entries is not None or path not in _INDEX:
        if entries is None:
            entries = Store(path).read()
        index: dict = {}
        for key, entry in entries.items():
            parts = key.split("|")
            if len(parts) != 4 or not parts[3].isdigit():
                continue
            module_key, kind, dtype, b = parts
            index.setdefault((module_key, dtype, int(b)), {})[kind] = entry
        _INDEX[path] = index
        for k in [k for k in _CHECKED if k[0] == path]:
            del _CHECKED[k]
    return _INDEX[path]


def stored(path: Path, module_key: str, dtype: str, bucket_: int) -> Optional[dict]:
    """The configs stored for one module, dtype and bucket, ``{kind: config}``, or None."""
    found = _index(path if isinstance(path, Path) else Path(path)).get((module_key, dtype, bucket_))
    return {kind: entry["config"] for kind, entry in found.items()} if found else None


_CHECKED: dict[tuple, Optional[dict]] = {}   # (path, module key, dtype, bucket) -> the valid configs


def _bad_entry(module, kind: str, entry: dict, x, bucket_: int) -> Optional[str]:
    """Why a stored entry cannot run (None: it can): its config must be the heuristic ({}) or a
    candidate of the kernel's own config space at the length it was tuned for."""
    if kind not in getattr(module, "KINDS", ()):
        return f"no kernel kind {kind!r}"
    config = entry.get("config")
    if not isinstance(config, dict):
        return "the config is not a mapping"
    if not config:
        return None
    T, B = entry.get("T"), entry.get("B", 1)
    if not (type(T) is int and type(B) is int and T >= 1 and B >= 1 and bucket(B * T) == bucket_):
        return "no tuning length of this bucket recorded"
    smem = smem_limit(x.device) if enabled(x) else None
    if config not in module.config_space(kind, T, smem=smem, dtype_bytes=x.element_size()):
        return f"{config} is not in the kernel's config space"
    try:
        module.resolve_config(x, kind, {kind: config})
    except (ValueError, TypeError, KeyError) as e:
        return str(e)
    return None


def checked(path: Path, module_key: str, module, x, dtype: str, bucket_: int) -> Optional[dict]:
    """:func:`stored`, with every entry checked once per process against the kernel's config
    space: a bad one (hand-edited, from another version) is dropped with a warning, and its
    kernel runs the heuristic."""
    tag = (path, module_key, dtype, bucket_)
    if tag not in _CHECKED:
        found = _index(path).get((module_key, dtype, bucket_)) or {}
        good = {}
        for kind, entry in found.items():
            reason = _bad_entry(module, kind, entry if isinstance(entry, dict) else {}, x, bucket_)
            if reason is None:
                good[kind] = entry["config"]
            else:
                warnings.warn(f"nsa-dsl: the tuning store {path} holds an unusable {kind} config for "
                              f"{module_key} ({reason}); running the heuristic config instead",
                              RuntimeWarning, stacklevel=3)
        _CHECKED[tag] = good or None
    found = _CHECKED[tag]
    return dict(found) if found else None


def _path_for(module_key: str, x) -> Path:
    """The store of a module on x's GPU (memoized: finding the cache dir probes the disk)."""
    k = (module_key, x.device.index)
    if k not in _PATHS:
        _PATHS[k] = store_path(gpu_name(x.device), _DIRS.get(module_key))
    return _PATHS[k]


def lookup(module_key: str, x) -> Optional[dict]:
    """The tuned ``config=`` for a call of module ``module_key`` on ``x`` (q: device, dtype and
    B * T pick the entry), ``{kind: config}``; None on the CPU, in the interpreter, or untuned."""
    if not enabled(x):
        return None
    return stored(_path_for(module_key, x), module_key, dtype_name(x.dtype), bucket(x.shape[0] * x.shape[1]))


def forget() -> None:
    """Drop what this process read from the stores (tests; after editing a store by hand)."""
    _INDEX.clear()
    _CHECKED.clear()
    _PATHS.clear()
    _ATTEMPTED.clear()


# -- the tuner ----------------------------------------------------------------------------------

@dataclass
class Result:
    """The outcome of tuning one kernel kind of one launcher call."""
    module: str                 # module key
    launcher: str
    kind: str
    dtype: str
    bucket: int
    config: dict                # the winner, partial over the heuristic ({}: the heuristic)
    default: dict               # the heuristic's full config
    best: dict                  # the winner's full config
    default_ms: float
    best_ms: float
    tried: int                  # candidates (the default included)
    failed: list = field(default_factory=list)     # (config, error) of those that did not run

    @property
    def speedup(self) -> float:
        return self.default_ms / self.best_ms if self.best_ms > 0 else 1.0


def _bench(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))


def _tensors(out) -> list:
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if t is not None]


def agrees(out, ref) -> bool:
    """A candidate computes what the default computes: floats to a relative error of 1e-4
    (2e-2 in 16-bit types: summation order differs between tiles), -inf / NaN where the default
    has them; integer outputs (the selected blocks) equal in 99% of entries (near-tied scores
    may flip with the summation order)."""
    import torch
    a, b = _tensors(out), _tensors(ref)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return False
        if not x.is_floating_point():
            if x.numel() and (x == y).float().mean().item() < 0.99:
                return False
            continue
        tol = 1e-4 if x.dtype in (torch.float32, torch.float64) else 2e-2
        x, y = x.double(), y.double()
        fx, fy = torch.isfinite(x), torch.isfinite(y)
        if not torch.equal(fx, fy) or not torch.equal(x[~fx].nan_to_num(), y[~fy].nan_to_num()):
            return False
        x, y = x[fx], y[fy]
        if x.numel() and (x - y).norm().item() > tol * max(y.norm().item(), 1e-30):
            return False
    return True


def _sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()   # a sticky CUDA error (not a compile error) surfaces here


def tune_launcher(module, launcher: str, args: tuple, kwargs: dict, x, *, module_key: str = "",
                  bench: Callable = _bench, smem: Optional[int] = None) -> list[Result]:
    """Time ``module.<launcher>(*args, config=..., **kwargs)`` with each candidate of each kind
    the launcher runs (``module.TUNE_KINDS``); ``x`` is the call's q (its length, dtype and
    device). Returns one Result per kind; nothing is stored here."""
    launch = getattr(module, launcher)

    def run(*a, **kw):   # a backward that adds into dq_acc (the caller's) adds into a copy
        if kw.get("dq_acc") is not None:
            kw = dict(kw, dq_acc=kw["dq_acc"].clone())
        return launch(*a, **kw)
    T, eb = int(x.shape[1]), x.element_size()
    if smem is None and enabled(x):
        smem = smem_limit(x.device)
    dtype, b = dtype_name(x.dtype), bucket(x.shape[0] * x.shape[1])
    reference = run(*args, **kwargs)                       # the heuristic's output
    chosen: dict = {}                                      # kind -> winner, for the kinds done
    results = []
    for kind in module.TUNE_KINDS[launcher]:
        default = module.resolve_config(x, kind, None)
        candidates, seen = [{}], [default]
        for c in module.config_space(kind, T, smem=smem, dtype_bytes=eb):
            full = module.resolve_config(x, kind, {kind: c})
            if full not in seen:                           # the default, or a repeat
                seen.append(full)
                candidates.append(c)
        timed, failed = [], []
        for c in candidates:
            config = {**chosen, kind: c}
            try:
                ms = bench(lambda: run(*args, config=config, **kwargs))
            except Exception as e:     # compile / launch errors of this config: out of resources, ...
                _sync()
                if not c:              # the heuristic ran a moment ago: the timer itself fails
                    raise
                failed.append((c, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))
                log.info("nsa-dsl tune: %s %s %s failed: %s", module_key, kind, c, failed[-1][1])
                continue
            timed.append((ms, len(timed), c))
        default_ms = next((ms for ms, _, c in timed if not c), float("inf"))
        best, best_ms = {}, default_ms
        for ms, _, c in sorted(timed, key=lambda t: t[:2]):
            if not c or ms > default_ms * (1 - MARGIN):
                break                                      # the heuristic is as fast
            if agrees(run(*args, config={**chosen, kind: c}, **kwargs), reference):
                best, best_ms = c, ms
                break
            failed.append((c, "output differs from the default config's"))
        chosen[kind] = best
        results.append(Result(module_key, launcher, kind, dtype, b, dict(best), default,
                              module.resolve_config(x, kind, {kind: best}), default_ms, best_ms,
                              len(candidates), failed))
    return results


# -- tuning at call time -------------------------------------------------------------------------

@dataclass
class Session:
    """Open while ``session()`` runs: every launcher call tunes its bucket once, stored or not."""
    results: list = field(default_factory=list)
    done: set = field(default_factory=set)
    bench: Optional[Callable] = None   # None: do_bench


_SESSION: Optional[Session] = None
_ATTEMPTED: set = set()              # NSA_DSL_AUTOTUNE: (module, launcher, dtype, bucket) tried


@contextlib.contextmanager
def session(bench: Optional[Callable] = None):
    """Tune every kernel a launcher call inside runs (again, even when stored); the results
    collect in the yielded Session. ``bench(fn) -> ms`` replaces do_bench (tests)."""
    global _SESSION
    previous, _SESSION = _SESSION, Session(bench=bench)
    try:
        yield _SESSION
    finally:
        _SESSION = previous


def _capturing() -> bool:
    import torch
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def config_for(module_key: str, module, launcher: str, x, args: tuple, kwargs: dict) -> Optional[dict]:
    """``config=`` for a launcher call: the stored configs of its bucket (None: the heuristics),
    after tuning first inside ``session()``, or with NSA_DSL_AUTOTUNE=1 when a kind is untuned."""
    if not enabled(x):
        return None
    path, dtype, b = _path_for(module_key, x), dtype_name(x.dtype), bucket(x.shape[0] * x.shape[1])
    found = checked(path, module_key, module, x, dtype, b)
    if _SESSION is None and not autotune_requested():
        return found                                   # the common case: a lookup, no tuning
    kinds = getattr(module, "TUNE_KINDS", {}).get(launcher, ())
    tag = (module_key, launcher, dtype, b)
    if _SESSION is not None:
        want = tag not in _SESSION.done
    else:
        want = (autotune_requested() and tag not in _ATTEMPTED
                and (found is None or any(k not in found for k in kinds)))
    if not kinds or not want or _capturing():
        return found
    _ATTEMPTED.add(tag)
    bench = (_SESSION.bench if _SESSION is not None else None) or _bench
    t0 = time.perf_counter()
    results = tune_launcher(module, launcher, args, kwargs, x, module_key=module_key, bench=bench)
    log.info("nsa-dsl: tuned %s %s (%s, bucket %d) in %.1f s", module_key, launcher, dtype, b,
             time.perf_counter() - t0)
    entries = {entry_key(module_key, r.kind, dtype, b): {
        "config": r.config, "ms": round(r.best_ms, 5), "default_ms": round(r.default_ms, 5),
        "tried": r.tried, "failed": len(r.failed), "T": int(x.shape[1]), "B": int(x.shape[0]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S")} for r in results}
    try:
        _index(path, Store(path, gpu_name(x.device)).write(entries))
    except OSError as e:               # keep the configs for this process at least
        warnings.warn(f"nsa-dsl: cannot write the tuning store {path} ({e})", RuntimeWarning, stacklevel=2)
        current = _index(path)
        current.setdefault((module_key, dtype, b), {}).update(
            {r.kind: entries[entry_key(module_key, r.kind, dtype, b)] for r in results})
        _CHECKED.pop((path, module_key, dtype, b), None)
    if _SESSION is not None:
        _SESSION.done.add(tag)
        _SESSION.results.extend(results)
    return checked(path, module_key, module, x, dtype, b)
