"""The kernel cache imports only what this user wrote: no planted entries through a shared or
foreign folder, no symlinked entries, manifests that must list exactly the plan's modules."""
import json
import os
import stat

import pytest

import nsa_dsl
from nsa_dsl.codegen import cache as cache_mod
from nsa_dsl.codegen.cache import KernelCache, cache_key
from nsa_dsl.codegen.plan import bind, lower

SPEC = """
attention s {
    heads = 2
    kv_heads = 1
    head_dim = 16
    branch swa = window(size = 16)
    output = swa
}
"""


def _plan():
    spec = nsa_dsl.parse(SPEC)
    return lower(spec, bind(spec, 2, 1, 16, 16))


def _plant(folder, plan, marker):
    """An entry at the plan's key whose module writes ``marker`` when imported, with a manifest
    that matches it (what a hostile user could write into a folder they can write)."""
    key = cache_key(plan)
    entry = folder / key[:2] / key
    entry.mkdir(parents=True)
    evil = f"open({str(marker)!r}, 'w').write('ran')\n"
    for k in plan.kernels:
        (entry / f"{k.name}.py").write_text(evil)
    (entry / "manifest.json").write_text(json.dumps(
        {"files": {k.name: cache_mod._sha(evil) for k in plan.kernels}}))
    return entry


@pytest.mark.parametrize("mode", [0o777, 0o775], ids=["world-writable", "group-writable"])
def test_a_folder_others_can_write_is_never_imported_from(tmp_path, monkeypatch, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    plan = _plan()
    marker = tmp_path / "planted-code-ran"
    _plant(shared, plan, marker)
    os.chmod(shared, mode)
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(shared))
    with pytest.warns(RuntimeWarning, match="writable by other users"):
        cache = KernelCache()
    assert cache.directory != shared and stat.S_IMODE(os.stat(cache.directory).st_mode) == 0o700
    cache.load(plan)
    assert not marker.exists()
    with pytest.warns(RuntimeWarning, match="writable by other users"):
        KernelCache(shared)                        # an explicit folder gets the same check


def test_a_folder_of_another_owner_is_never_imported_from(tmp_path, monkeypatch):
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    plan = _plan()
    marker = tmp_path / "planted-code-ran"
    _plant(folder, plan, marker)
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(folder))
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 1)   # as if another user had made it
    with pytest.warns(RuntimeWarning, match="owned by another user"):
        cache = KernelCache()
    monkeypatch.undo()
    cache.load(plan)
    assert not marker.exists()


def test_the_fallback_folder_is_private_and_unpredictable(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(cache_mod, "_PRIVATE", {})
    with pytest.warns(RuntimeWarning, match="not writable"):
        d = cache_mod.cache_dir()
    assert cache_mod.unsafe_reason(d) is None and "nsa-dsl-cache-" in d.name
    assert d.name != f"nsa-dsl-cache-{os.getuid()}"          # not the predictable name of before


def test_a_symlinked_entry_is_not_followed(tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    plan = _plan()
    marker = tmp_path / "planted-code-ran"
    planted = _plant(tmp_path / "elsewhere", plan, marker)
    entry = KernelCache(cache_dir).entry(plan)
    entry.parent.mkdir(parents=True)
    entry.symlink_to(planted, target_is_directory=True)
    c = KernelCache(cache_dir)
    c.load(plan)
    assert not marker.exists() and c.renders == 1 and not entry.is_symlink()


def test_a_manifest_listing_no_modules_does_not_vouch_for_them(tmp_path):
    plan = _plan()
    KernelCache(tmp_path).load(plan)
    entry = KernelCache(tmp_path).entry(plan)
    marker = tmp_path / "edited-code-ran"
    (entry / "window_swa.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (entry / "manifest.json").write_text('{"files": {}}')
    c = KernelCache(tmp_path)
    c.load(plan)
    assert c.renders == 1 and not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_module_under_an_empty_manifest_is_rebuilt(tmp_path, damage):
    plan = _plan()
    KernelCache(tmp_path).load(plan)
    entry = KernelCache(tmp_path).entry(plan)
    victim = entry / "window_swa.py"
    if damage == "missing":
        victim.unlink()
    else:
        victim.write_text(victim.read_text()[:50])
    (entry / "manifest.json").write_text('{"files": {}}')
    c = KernelCache(tmp_path)
    assert "window_swa" in c.load(plan) and c.renders == 1


def test_odd_things_at_the_prefix_and_lock_paths_are_replaced(tmp_path):
    plan = _plan()
    entry = KernelCache(tmp_path).entry(plan)
    entry.parent.parent.mkdir(parents=True, exist_ok=True)
    entry.parent.write_text("a file where the prefix folder goes")
    c = KernelCache(tmp_path)
    c.load(plan)
    assert c.renders == 1
    (entry / "manifest.json").write_text("{}")
    lock = entry.parent / (entry.name + ".lock")
    if lock.exists():
        lock.unlink()
    lock.mkdir()                                    # a folder where the lock file goes
    c = KernelCache(tmp_path)
    c.load(plan)
    assert c.renders == 1
