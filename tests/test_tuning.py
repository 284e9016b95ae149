"""Autotuning (codegen/tuning.py, codegen/launch/base.py) without a GPU: the store, config
spaces, config= overrides in the interpreter, the tuner's choice with a fake clock, the CLI."""
import inspect
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from nsa_dsl.codegen import tuning
from nsa_dsl.codegen.launch.base import SMEM_DEFAULT
from kernel_utils import load_family, rand, rel_err
from nsa_dsl.tools import cli

ROOT = Path(__file__).resolve().parent.parent

# the families at the paper's shapes and at small odd ones: (template, variables)
FAMILIES = {
    "compress": ("compress.py.j2", dict(G=16, DQK=192, DV=128, L=32, STRIDE=16)),
    "compress_small": ("compress.py.j2", dict(G=3, DQK=32, DV=16, L=16, STRIDE=8)),
    "topk": ("topk.py.j2", dict(G=16, DQK=192, L=32, STRIDE=16, LS=64, TOPK=16, KEEP_FIRST=1,
                                KEEP_LAST=2, SCORE="cmp")),
    "topk_small": ("topk.py.j2", dict(G=3, DQK=32, L=32, STRIDE=8, LS=16, TOPK=3, KEEP_FIRST=1,
                                      KEEP_LAST=1, SCORE="cmp")),
    "topk_mean_pool": ("topk.py.j2", dict(G=16, DQK=128, LS=64, TOPK=16, KEEP_FIRST=1, KEEP_LAST=2,
                                          SCORE="mean_pool")),
    "select": ("select.py.j2", dict(G=16, DQK=192, DV=128, LS=64, TOPK=16)),
    "select_small": ("select.py.j2", dict(G=3, DQK=48, DV=80, LS=48, TOPK=3)),
    "select_g64": ("select.py.j2", dict(G=64, DQK=64, DV=64, LS=128, TOPK=4)),
    "window": ("window.py.j2", dict(G=16, DQK=128, DV=128, W=512, SINKS=0)),
    "window_small": ("window.py.j2", dict(G=3, DQK=16, DV=32, W=7, SINKS=4)),
}


def _mod(name):
    template, variables = FAMILIES[name]
    return load_family(template, **variables)


# ----------------------------------------------------------------------------- the store

def test_bucket():
    assert [tuning.bucket(n) for n in (0, 1, 2, 3, 8192, 8193, 65536)] == [1, 1, 2, 4, 8192, 16384, 65536]


def test_store_round_trip_and_key(tmp_path):
    path = tuning.store_path("NVIDIA H200", tmp_path)
    assert path == tmp_path / "tuning" / "NVIDIA_H200.json"
    store = tuning.Store(path, "NVIDIA H200")
    key = tuning.entry_key("abcd/select_slc", "fwd", "bfloat16", 8192)
    store.write({key: {"config": {"R": 4, "num_warps": 8}, "ms": 1.0}})
    store.write({tuning.entry_key("abcd/select_slc", "dq", "bfloat16", 8192): {"config": {}}})
    data = json.loads(path.read_text())
    assert data["version"] == tuning.VERSION and data["gpu"] == "NVIDIA H200"
    assert set(data["entries"]) == {key, "abcd/select_slc|dq|bfloat16|8192"}
    tuning.forget()
    assert tuning.stored(path, "abcd/select_slc", "bfloat16", 8192) == {"fwd": {"R": 4, "num_warps": 8}, "dq": {}}
    # the key holds the bucket, the dtype, the module and (through the file) the GPU
    assert tuning.stored(path, "abcd/select_slc", "bfloat16", 16384) is None
    assert tuning.stored(path, "abcd/select_slc", "float16", 8192) is None
    assert tuning.stored(path, "ffff/select_slc", "bfloat16", 8192) is None
    assert tuning.stored(tuning.store_path("NVIDIA H100 80GB HBM3", tmp_path), "abcd/select_slc",
                         "bfloat16", 8192) is None


def test_store_write_is_atomic(tmp_path, monkeypatch):
    path = tuning.store_path("gpu", tmp_path)
    store = tuning.Store(path, "gpu")
    store.write({"m/k|fwd|float16|64": {"config": {"R": 1}}})
    before = path.read_text()

    def torn(obj, f, **kw):   # a writer dying half-way through
        f.write('{"version": 1, "entr')
        raise OSError("disk full")
    monkeypatch.setattr(json, "dump", torn)
    with pytest.raises(OSError):
        store.write({"m/k|dq|float16|64": {"config": {"R": 2}}})
    assert path.read_text() == before                      # readers still see the old file whole
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".lock"]


@pytest.mark.parametrize("text", ["{not json", '{"version": 1, "entries": []}', '[1, 2]',
                                  '{"version": 1, "entries": {"a|b|c|1": {"config": 3}}}'])
def test_corrupt_store_is_ignored_and_rebuilt(tmp_path, text):
    path = tuning.store_path("gpu", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    tuning.forget()
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert tuning.stored(path, "m/k", "float16", 64) is None
    tuning.Store(path, "gpu").write({"m/k|fwd|float16|64": {"config": {"R": 2}}})
    tuning.forget()
    assert tuning.stored(path, "m/k", "float16", 64) == {"fwd": {"R": 2}}


def _fake_cuda(T=5000, B=1, dtype=torch.bfloat16):
    """Stands for a CUDA q in the lookup path (no GPU here)."""
    return types.SimpleNamespace(is_cuda=True, device=types.SimpleNamespace(index=0), dtype=dtype,
                                 shape=(B, T, 64, 128))


def test_lookup(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "gpu_name", lambda device: "NVIDIA H200")
    tuning.forget()
    tuning.register("k1/window_swa", tmp_path)
    tuning.Store(tuning.store_path("NVIDIA H200", tmp_path)).write(
        {"k1/window_swa|fwd|bfloat16|8192": {"config": {"BN": 64}}})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert tuning.lookup("k1/window_swa", _fake_cuda(5000)) == {"fwd": {"BN": 64}}
    assert tuning.lookup("k1/window_swa", _fake_cuda(4000, B=2)) == {"fwd": {"BN": 64}}   # B * T
    assert tuning.lookup("k1/window_swa", _fake_cuda(9000)) is None
    assert tuning.lookup("k1/window_swa", torch.zeros(1, 5000, 1, 1, dtype=torch.bfloat16)) is None  # CPU
    monkeypatch.setenv("TRITON_INTERPRET", "1")                                   # the interpreter
    assert tuning.lookup("k1/window_swa", _fake_cuda(5000)) is None
    tuning.forget()


# ----------------------------------------------------------------------------- config spaces

@pytest.mark.parametrize("name", list(FAMILIES))
def test_config_spaces_are_valid_and_pruned(name):
    mod = _mod(name)
    for kind in mod.KINDS:
        space = mod.config_space(kind, 65536)
        # at most 24 tiles per kind; compress and window time each with pointer and with TMA loads
        assert 1 <= len(space) <= (48 if name.startswith(("compress", "window")) else 24), (kind, len(space))
        assert all(c not in space[:i] for i, c in enumerate(space))             # no repeats
        for c in space:
            for gpu in (True, False):     # resolve_config reads q's device and length only
                q = types.SimpleNamespace(is_cuda=gpu, shape=(1, 65536))
                full = mod.resolve_config(q, kind, {kind: c})                   # raises if invalid
                assert all(full[key] == value for key, value in c.items())
            assert mod.smem_bytes(kind, {**mod._heuristic(kind, True, 65536), **c}) <= SMEM_DEFAULT
            if "BN" in c and name.startswith("select"):
                assert c["BN"] in mod.BN_CHOICES and (mod.LS % c["BN"] == 0 or c["BN"] == mod.BN)
        # a smaller shared memory prunes, and what is left fits
        small = 48 * 1024
        pruned = mod.config_space(kind, 65536, smem=small)
        assert len(pruned) < len(space) or all(mod.smem_bytes(kind, {**mod._heuristic(kind, True, 65536), **c})
                                               <= small for c in space)
        assert all(mod.smem_bytes(kind, {**mod._heuristic(kind, True, 65536), **c}) <= small for c in pruned)
        assert mod.config_space(kind, 65536, smem=1024) == []
        # fp32 inputs need more shared memory than bf16
        assert len(mod.config_space(kind, 65536, dtype_bytes=4)) <= len(space)


def test_invalid_configs_are_refused():
    sel, win, cmp_, tk = _mod("select"), _mod("window"), _mod("compress"), _mod("topk")
    q = torch.zeros(1, 64, 16, 192)
    bad = [(sel, "fwd", {"BN": 48}), (sel, "fwd", {"BN": 128}), (sel, "dkdv", {"RQ": 0}),
           (win, "fwd", {"R": 3}), (win, "dq", {"BN": 8}), (cmp_, "dkdv", {"QS": 1001, "R": 8}),
           (cmp_, "fwd", {"num_warps": 3}), (tk, "topk", {"BJ": 8}), (tk, "topk", {"R": 3})]
    for mod, kind, c in bad:
        with pytest.raises(ValueError, match="invalid"):
            mod.resolve_config(q, kind, {kind: c})
    # keyed by kind or flat; a kind left out keeps the heuristic
    assert sel.resolve_config(q, "fwd", {"dq": {"R": 4}}) == sel.resolve_config(q, "fwd")
    assert sel.resolve_config(q, "dq", {"dq": {"R": 4}})["R"] == 4
    assert sel.resolve_config(q, "dq", {"R": 4})["R"] == 4


# ----------------------------------------------------------------------------- config= in the interpreter

class _Spy:
    """Records the constexprs of every launch of a kernel."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, {k: v for k, v in kwargs.items() if k.isupper()}))
            return self.kernel[grid](*args, **kwargs)
        return launch


def _spied(monkeypatch, mod, names):
    holder = getattr(mod, "kernels", mod)      # a family's launchers launch its module's kernels
    spies = {n: _Spy(getattr(holder, n)) for n in names}
    for n, s in spies.items():
        monkeypatch.setattr(holder, n, s)
    return spies


def _launches(spies):
    out = {n: [c[1] for c in s.calls] for n, s in spies.items()}
    for s in spies.values():
        s.calls.clear()
    return out


def _close(a, b, tol=1e-5):
    return all(rel_err(x, y) < tol for x, y in zip(a, b))


def _default_and_pinned(spies, mod, inputs, do, config):
    """Forward and backward of ``mod`` with the heuristic, then with ``config``: the kernels'
    launch arguments of each run, and whether their outputs and gradients agree."""
    fwd0 = mod.fwd(*inputs, 0.3)
    bwd0 = mod.bwd(*inputs, *fwd0, do, 0.3)
    base = _launches(spies)
    fwd1 = mod.fwd(*inputs, 0.3, config=config)
    bwd1 = mod.bwd(*inputs, *fwd1, do, 0.3, config=config)
    tuned = _launches(spies)
    return base, tuned, _close(fwd0, fwd1) and _close(bwd0, bwd1)


def test_config_changes_compress(monkeypatch):
    mod = load_family("compress.py.j2", G=3, DQK=32, DV=16, L=16, STRIDE=8)
    spies = _spied(monkeypatch, mod, ["compress_fwd_kernel", "compress_bwd_dq_kernel", "compress_bwd_dkdv_kernel"])
    q, do = rand((1, 70, 3, 32), seed=1), rand((1, 70, 3, 16), seed=2)
    k, v = rand((1, 7, 1, 32), seed=3), rand((1, 7, 1, 16), seed=4)       # (70 - 16) // 8 + 1 blocks
    config = {"fwd": {"R": 4, "BN": 16}, "dq": {"R": 8, "BN": 16}, "dkdv": {"R": 4, "BN": 16, "QS": 24}}
    base, tuned, same = _default_and_pinned(spies, mod, (q, k, v), do, config)
    assert base["compress_fwd_kernel"][0]["BN"] == 32 and tuned["compress_fwd_kernel"][0]["BN"] == 16
    assert tuned["compress_bwd_dq_kernel"][0]["R"] == 8 and tuned["compress_bwd_dkdv_kernel"][0]["BM"] == 16
    assert same


def test_config_changes_select(monkeypatch):
    mod = load_family("select.py.j2", G=3, DQK=32, DV=16, LS=32, TOPK=3)
    assert mod.BN_CHOICES == (32, 16)
    spies = _spied(monkeypatch, mod, ["select_fwd_kernel", "select_bwd_dq_kernel", "select_bwd_dkdv_kernel"])
    T = 90
    q, do = rand((1, T, 3, 32), seed=1), rand((1, T, 3, 16), seed=2)
    k, v = rand((1, T, 1, 32), seed=3), rand((1, T, 1, 16), seed=4)
    own = torch.arange(T) // 32
    idx = torch.full((1, T, 1, 3), -1, dtype=torch.int32)                  # [0, own block, -1]
    idx[0, :, 0, 0] = 0
    idx[0, :, 0, 1] = torch.where(own > 0, own, -1)
    config = {"fwd": {"R": 4, "BN": 16}, "dq": {"R": 8, "BN": 16}, "dkdv": {"RQ": 4, "BN": 16, "CHUNK": 16}}
    base, tuned, same = _default_and_pinned(spies, mod, (q, k, v, idx), do, config)
    assert base["select_fwd_kernel"][0]["NT"] == 1 and tuned["select_fwd_kernel"][0]["NT"] == 2
    assert tuned["select_fwd_kernel"][0]["BN"] == 16 and tuned["select_bwd_dq_kernel"][0]["R"] == 8
    assert tuned["select_bwd_dkdv_kernel"][0]["BN"] == 16
    assert same


def test_config_changes_window(monkeypatch):
    mod = load_family("window.py.j2", G=3, DQK=16, DV=32, W=7, SINKS=4)
    spies = _spied(monkeypatch, mod, ["window_fwd_kernel", "window_bwd_dq_kernel", "window_bwd_dkdv_kernel"])
    q, do = rand((1, 70, 3, 16), seed=1), rand((1, 70, 3, 32), seed=2)
    k, v = rand((1, 70, 1, 16), seed=3), rand((1, 70, 1, 32), seed=4)
    config = {"fwd": {"R": 4, "BN": 16}, "dq": {"R": 8}, "dkdv": {"BN": 16, "CHUNK": 16}}
    base, tuned, same = _default_and_pinned(spies, mod, (q, k, v), do, config)
    assert (base["window_fwd_kernel"][0]["R"], tuned["window_fwd_kernel"][0]["R"]) == (16, 4)
    assert tuned["window_bwd_dq_kernel"][0]["R"] == 8 and tuned["window_bwd_dkdv_kernel"][0]["BN"] == 16
    assert same


def test_config_changes_topk(monkeypatch):
    from nsa_dsl.semantics.reference import compress_attention, num_compressed_blocks
    cmp_mod = load_family("topk.py.j2", G=3, DQK=32, L=32, STRIDE=8, LS=16, TOPK=3, KEEP_FIRST=1,
                          KEEP_LAST=1, SCORE="cmp")
    mp_mod = load_family("topk.py.j2", G=3, DQK=32, LS=16, TOPK=3, KEEP_FIRST=1, KEEP_LAST=1, SCORE="mean_pool")
    spies = _spied(monkeypatch, cmp_mod, ["topk_cmp_kernel"])
    spies.update(_spied(monkeypatch, mp_mod, ["topk_mean_pool_kernel"]))
    T = 200
    q, k = rand((1, T, 3, 32), seed=1), rand((1, T, 1, 32), seed=2)
    k_cmp = rand((1, num_compressed_blocks(T, 32, 8), 1, 32), seed=3)
    _, lse = compress_attention(q.double(), k_cmp.double(), k_cmp.double(), 32, 8, 32 ** -0.5)
    lse = lse.float()
    base = (cmp_mod.topk(q, k_cmp, lse, 32 ** -0.5), mp_mod.topk_mean_pool(q, k))
    b = _launches(spies)
    tuned = (cmp_mod.topk(q, k_cmp, lse, 32 ** -0.5, config={"topk": {"R": 4, "BJ": 32, "BN": 16}}),
             mp_mod.topk_mean_pool(q, k, config={"topk": {"R": 8, "BJ": 32}}))
    t = _launches(spies)
    assert (b["topk_cmp_kernel"][0]["BJ"], t["topk_cmp_kernel"][0]["BJ"]) == (16, 32)
    assert (b["topk_mean_pool_kernel"][0]["R"], t["topk_mean_pool_kernel"][0]["R"]) == (32, 8)
    assert torch.equal(base[0], tuned[0]) and torch.equal(base[1], tuned[1])


# ----------------------------------------------------------------------------- the tuner (fake clock)

def _fake_module(kinds=("a", "b")):
    """A launcher 'run' whose speed and output depend on its config, as a template's would."""
    mod = types.SimpleNamespace(KINDS=kinds, TUNE_KINDS={"run": kinds}, calls=[])
    heur = {"a": dict(X=1, W=4), "b": dict(Y=1)}

    def resolve_config(x, kind, config=None):
        cfg = dict(heur[kind])
        part = (config or {}).get(kind) if config and any(k in config for k in kinds) else config
        cfg.update(part or {})
        return cfg

    def config_space(kind, T, *, smem=None, dtype_bytes=2):
        return [dict(X=x) for x in (1, 2, 3, 4)] if kind == "a" else [dict(Y=y) for y in (1, 2, 3)]

    def run(x, *, config=None):
        a, b = resolve_config(x, "a", config), resolve_config(x, "b", config)
        mod.calls.append((a["X"], b["Y"]))
        if a["X"] == 4:
            raise RuntimeError("out of resources: shared memory")
        return x * (2 if a["X"] == 3 else 1)            # X = 3 computes something else
    mod.resolve_config, mod.config_space, mod.run = resolve_config, config_space, run
    return mod


def _clock(mod):
    """ms by config: a X = 3 (wrong) < X = 2 < X = 1 (default); b Y = 3 < Y = 1 (default) ~ Y = 2."""
    def bench(fn):
        fn()
        X, Y = mod.calls[-1]
        return {1: 10.0, 2: 6.0, 3: 1.0}[X] + {1: 5.0, 2: 4.95, 3: 2.0}[Y]
    return bench


def test_tuner_picks_the_fastest_correct_config():
    mod = _fake_module()
    x = torch.ones(1, 64, 1, 1)
    a, b = tuning.tune_launcher(mod, "run", (x,), {}, x, module_key="m/k", bench=_clock(mod))
    assert (a.kind, a.config, a.best_ms, a.default_ms) == ("a", {"X": 2}, 11.0, 15.0)
    assert a.tried == 4 and {str(c) for c, _ in a.failed} == {"{'X': 4}", "{'X': 3}"}
    assert "out of resources" in dict((str(c), e) for c, e in a.failed)["{'X': 4}"]
    # b is timed with a's winner; Y = 2 is within the noise margin of the default, Y = 3 wins
    assert (b.config, b.best_ms, b.default_ms, b.best) == ({"Y": 3}, 8.0, 11.0, {"Y": 3})
    assert a.speedup == pytest.approx(15 / 11) and a.dtype == "float32" and a.bucket == 64


def test_tuner_times_dq_acc_launches_on_copies():
    """A backward that adds its dq into the caller's ``dq_acc`` (the op's one-node backward) is
    timed and checked on a copy each call: the caller's buffer is left as it was."""
    mod = _fake_module()
    inner = mod.run

    def run(x, *, config=None, dq_acc=None):
        out = inner(x, config=config)
        dq_acc += 1.0                                   # in place, as the dq kernels do
        return out
    mod.run = run
    x = torch.ones(1, 64, 1, 1)
    acc = torch.zeros(3)
    tuning.tune_launcher(mod, "run", (x,), {"dq_acc": acc}, x, bench=_clock(mod))
    assert len(mod.calls) > 5 and torch.equal(acc, torch.zeros(3))


def test_tuner_refuses_a_broken_timer():
    """The heuristic's config ran just before: if it fails under the timer, the timer is broken
    (no GPU driver, say), not the config; nothing is tuned."""
    mod = _fake_module()
    x = torch.ones(1, 64, 1, 1)

    def broken(fn):
        raise RuntimeError("0 active drivers")
    with pytest.raises(RuntimeError, match="0 active drivers"):
        tuning.tune_launcher(mod, "run", (x,), {}, x, bench=broken)


def test_session_stores_and_a_second_process_finds_it(tmp_path, monkeypatch):
    mod = _fake_module()
    monkeypatch.setattr(tuning, "enabled", lambda x: True)
    monkeypatch.setattr(tuning, "gpu_name", lambda device: "Fake GPU")
    monkeypatch.setattr(tuning, "smem_limit", lambda device: 100_000)
    monkeypatch.delenv("NSA_DSL_AUTOTUNE", raising=False)
    tuning.forget()
    tuning.register("m/k", tmp_path)
    x = torch.ones(1, 100, 1, 1)
    with tuning.session(bench=_clock(mod)) as s:
        config = tuning.config_for("m/k", mod, "run", x, (x,), {})
        assert tuning.config_for("m/k", mod, "run", x, (x,), {}) == config    # once per session
    assert config == {"a": {"X": 2}, "b": {"Y": 3}} and len(s.results) == 2
    entries = json.loads((tmp_path / "tuning" / "Fake_GPU.json").read_text())["entries"]
    assert entries["m/k|a|float32|128"]["config"] == {"X": 2} and entries["m/k|a|float32|128"]["default_ms"] == 15.0
    tuning.forget()                                      # a new process: read from disk, no tuning
    n = len(mod.calls)
    assert tuning.config_for("m/k", mod, "run", x, (x,), {}) == config and len(mod.calls) == n


def test_autotune_env_tunes_an_untuned_bucket_once(tmp_path, monkeypatch):
    mod = _fake_module()
    monkeypatch.setattr(tuning, "enabled", lambda x: True)
    monkeypatch.setattr(tuning, "gpu_name", lambda device: "Fake GPU")
    monkeypatch.setattr(tuning, "smem_limit", lambda device: 100_000)
    monkeypatch.setattr(tuning, "_bench", _clock(mod))
    tuning.forget()
    tuning.register("m/k", tmp_path)
    x = torch.ones(1, 100, 1, 1)
    monkeypatch.delenv("NSA_DSL_AUTOTUNE", raising=False)
    assert tuning.config_for("m/k", mod, "run", x, (x,), {}) is None and not mod.calls   # off by default
    monkeypatch.setenv("NSA_DSL_AUTOTUNE", "1")
    assert tuning.config_for("m/k", mod, "run", x, (x,), {}) == {"a": {"X": 2}, "b": {"Y": 3}}
    n = len(mod.calls)
    assert tuning.config_for("m/k", mod, "run", x, (x,), {}) == {"a": {"X": 2}, "b": {"Y": 3}}
    assert len(mod.calls) == n                                                              # not again
    tuning.forget()


def test_tuner_on_a_real_template():
    """The window family's space through the tuner (interpreter; a fake clock prefers 64-key tiles)."""
    mod = load_family("window.py.j2", G=3, DQK=16, DV=32, W=7, SINKS=0)
    q, k, v = rand((1, 40, 3, 16), seed=1), rand((1, 40, 1, 16), seed=2), rand((1, 40, 1, 32), seed=3)

    def bench(fn):                   # reads the config the timed call would run
        config = inspect.getclosurevars(fn).nonlocals["config"]
        return 1.0 if config.get("fwd", {}).get("BN") == 64 else 2.0
    (r,) = tuning.tune_launcher(mod, "fwd", (q, k, v, 0.3), {}, q, bench=bench)
    assert r.config["BN"] == 64 and r.best["BN"] == 64 and r.tried == len(mod.config_space("fwd", 40)) + 1


SPEC = """attention t {
    branch cmp = compress(block = 16, stride = 8)
    branch slc = select(block = 16, top_k = 3, score = cmp, keep_first = 1, keep_last = 1)
    branch swa = window(size = 16)
    output = gate(sigmoid, cmp, slc, swa)
}"""


def test_op_tune_end_to_end_in_the_interpreter(tmp_path, monkeypatch):
    """op.tune through the real op, launchers and config spaces (interpreter, fake GPU and clock):
    every kernel kind of every module is tuned and stored; a new process uses the stored configs
    and computes what the heuristics compute."""
    import nsa_dsl
    monkeypatch.setattr(tuning, "enabled", lambda x: True)
    monkeypatch.setattr(tuning, "gpu_name", lambda device: "Fake GPU")
    monkeypatch.setattr(tuning, "smem_limit", lambda device: 232448)
    monkeypatch.delenv("NSA_DSL_AUTOTUNE", raising=False)
    tuning.forget()

    def bench(fn):                   # 8 warps "run fastest": the first such candidate wins
        config = inspect.getclosurevars(fn).nonlocals["config"]
        kind = list(config)[-1]
        return 1.0 if config[kind].get("num_warps") == 8 else 2.0
    monkeypatch.setattr(tuning, "_bench", bench)
    op = nsa_dsl.compile(nsa_dsl.parse(SPEC), cache_dir=tmp_path)
    q, k, v = rand((1, 70, 4, 32), seed=1), rand((1, 70, 1, 32), seed=2), rand((1, 70, 1, 16), seed=3)
    gates = torch.rand(1, 70, 4, 3)
    results = op.tune(q, k, v, gates)
    assert sorted((r.module.split("/")[1], r.kind) for r in results) == sorted(
        [("compress_cmp", "fwd"), ("topk_slc", "topk"), ("select_slc", "fwd"), ("window_swa", "fwd"),
         ("compress_cmp", "dq"), ("compress_cmp", "dkdv"), ("select_slc", "dq"), ("select_slc", "dkdv"),
         ("window_swa", "dq"), ("window_swa", "dkdv")])
    assert all(r.config.get("num_warps") == 8 and r.best_ms == 1.0 and r.default_ms == 2.0 for r in results)
    entries = json.loads((tmp_path / "tuning" / "Fake_GPU.json").read_text())["entries"]
    assert len(entries) == 10 and all(k.endswith("|float32|128") for k in entries)

    tuning.forget()                  # a new process: the op reads the store, tunes nothing
    used = []
    config_for = tuning.config_for
    monkeypatch.setattr(tuning, "config_for", lambda *a: used.append(config_for(*a)) or used[-1])
    monkeypatch.setattr(tuning, "tune_launcher", None)
    op2 = nsa_dsl.compile(nsa_dsl.parse(SPEC), cache_dir=tmp_path)
    o = op2(q, k, v, gates)                          # the forward: compress, topk, select, window
    assert len(used) == 4 and all(u and all(c["num_warps"] == 8 for c in u.values()) for u in used)
    monkeypatch.setattr(tuning, "enabled", lambda x: False)
    assert rel_err(o, op2(q, k, v, gates)) < 1e-5   # the heuristics' output


# ----------------------------------------------------------------------------- CLI and op without a GPU

def test_cli_tune_without_gpu(capsys, monkeypatch):
    assert cli.main(["tune", str(ROOT / "examples" / "nsa_paper_mean.nsa"), "--lengths", "8k"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "E616" in err and "autotuning needs a CUDA GPU" in err and "Traceback" not in err


def test_cli_tune_arguments(monkeypatch):
    seen = {}
    fake = types.ModuleType("nsa_dsl.tools.commands")

    def tune_cmd(args, emit=print):
        seen["args"] = args
    fake.tune_cmd = tune_cmd
    monkeypatch.setitem(sys.modules, "nsa_dsl.tools.commands", fake)
    assert cli.main(["tune", "s.nsa", "--lengths", "8k,16384", "--heads", "32", "--kv-heads", "2",
                     "--dim", "64", "--dtype", "fp16", "--no-backward"]) == 0
    a = seen["args"]
    assert (a.lengths, a.heads, a.kv_heads, a.dim, a.dtype, a.backward, a.batch) == \
        ((8192, 16384), 32, 2, 64, "fp16", False, 1)
    cli.main(["tune", "s.nsa"])
    assert seen["args"].backward is True and seen["args"].lengths == cli.TUNE_LENGTHS


def test_tune_table():
    from nsa_dsl.tools.commands import _tune_table
    r = tuning.Result("0123456789abcdef/select_slc", "bwd", "dq", "bfloat16", 65536, {"R": 4, "num_warps": 8},
                      {}, {}, 20.0, 16.0, 13, [({"R": 8}, "OutOfResources: shared memory")])
    same = tuning.Result("0123456789abcdef/window_swa", "fwd", "fwd", "bfloat16", 65536, {}, {}, {}, 3.5, 3.5, 17)
    head, a, b = _tune_table([r, same])
    assert "default ms" in head and "best ms" in head and "speedup" in head
    assert a.split()[:6] == ["select_slc", "dq", "20.000", "16.000", "1.25x", "R=4"] and "13 tried, 1 failed" in a
    assert "(the heuristic)" in b and "1.00x" in b


def test_op_tune_needs_a_gpu():
    import nsa_dsl
    from nsa_dsl.errors import SpecError
    op = nsa_dsl.compile(ROOT / "examples" / "nsa_paper_mean.nsa")
    q = torch.zeros(1, 16, 64, 128)
    with pytest.raises(SpecError, match="autotuning needs a CUDA GPU"):
        op.tune(q, q[:, :, :4], q[:, :, :4])


# ----------------------------------------------------------------------------- GPU (pytest -m gpu)

@pytest.mark.gpu
def test_tune_on_gpu(tmp_path, monkeypatch):
    """nsa-dsl tune on a small shape: every kernel kind tuned and stored; a fresh process (forget)
    reads the store and the op's output stays that of the heuristic configs."""
    import nsa_dsl
    from nsa_dsl.tools import commands
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    tuning.forget()
    spec_path = ROOT / "examples" / "nsa_paper_mean.nsa"
    args = types.SimpleNamespace(file=str(spec_path), name=None, lengths=(2048,), batch=1, heads=16,
                                 kv_heads=1, dim=64, qk_dim=None, v_dim=None, dtype="bf16", backward=True)
    lines = []
    assert commands.tune_cmd(args, emit=lines.append) == 0
    text = "\n".join(lines)
    for name in ("compress_cmp", "topk_slc", "select_slc", "window_swa"):
        assert name in text, text
    store = next((tmp_path / "tuning").glob("*.json"))
    entries = json.loads(store.read_text())["entries"]
    assert {k.split("|")[1] for k in entries} == {"fwd", "dq", "dkdv", "topk"} and str(store) in text
    tuning.forget()
    op = nsa_dsl.compile(spec_path)
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, 2048, 16, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, 2048, 1, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    gates = torch.rand(1, 2048, 16, 3, device="cuda", dtype=torch.bfloat16, generator=g)
    o, aux = op(q, k, v, gates, return_aux=True)
    _, keys = op._kernels(op.binding(heads=16, kv_heads=1, qk_dim=64, v_dim=64))
    assert tuning.lookup(keys["window_swa"], q) is not None                 # read back from disk
    ref = nsa_dsl.reference(op.spec, q.double(), k.double(), v.double(), gates.double(),
                            indices={n: i.long() for n, i in aux.indices.items()})
    assert rel_err(o, ref) < 2e-2
