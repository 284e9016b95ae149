"""One bad tuning-store entry never breaks the op: a stored config must be one of its kernel's
own config space (at the length it was tuned for), else it is dropped with a warning and the
heuristic runs; a store of any shape (deep nesting, garbage) reads as empty."""
import json

import pytest
import torch

from nsa_dsl.codegen import tuning
from kernel_utils import load_family

WINDOW = dict(G=16, DQK=128, DV=128, W=512, SINKS=0)


@pytest.fixture
def gpu_store(tmp_path, monkeypatch):
    """A store for module key "k/window" as on a GPU (name, shared memory and 'enabled' faked)."""
    monkeypatch.setattr(tuning, "enabled", lambda x: True)
    monkeypatch.setattr(tuning, "gpu_name", lambda device: "Fake GPU")
    monkeypatch.setattr(tuning, "smem_limit", lambda device: 232448)
    monkeypatch.delenv("NSA_DSL_AUTOTUNE", raising=False)
    tuning.forget()
    tuning.register("k/window", tmp_path)
    yield tuning.store_path("Fake GPU", tmp_path)
    tuning.forget()


def _entry(config, T=65536, B=1):
    return {"config": config, "ms": 1.0, "default_ms": 1.1, "T": T, "B": B}


BAD = {
    "zero tile": {"BN": 0},
    "negative warps": {"num_warps": -1},
    "too many stages": {"num_stages": 100},
    "one register": {"maxnreg": 1},
    "huge tile": {"BN": 2 ** 20},
    "huge rows (hangs)": {"R": 1024},
    "unknown key": {"XYZ": 3},
    "string value": {"BN": "64"},
}


@pytest.mark.parametrize("config", list(BAD.values()), ids=list(BAD))
def test_a_bad_entry_is_dropped_and_the_heuristic_runs(gpu_store, config):
    mod = load_family("window.py.j2", **WINDOW)
    good = mod.config_space("dq", 65536)[0]
    tuning.Store(gpu_store).write({"k/window|fwd|bfloat16|65536": _entry(config),
                                   "k/window|dq|bfloat16|65536": _entry(good)})
    x = torch.zeros(1, 65536, 1, 1, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="unusable fwd config"):
        found = tuning.config_for("k/window", mod, "fwd", x, (), {})
    assert found == {"dq": good}                                    # the good entry stays
    cfg = mod.resolve_config(x, "fwd", found)                       # what the launcher then runs
    assert cfg == mod.resolve_config(x, "fwd", None)


def test_a_candidate_of_the_space_is_kept(gpu_store):
    mod = load_family("window.py.j2", **WINDOW)
    good = mod.config_space("fwd", 65536)[1]
    tuning.Store(gpu_store).write({"k/window|fwd|bfloat16|65536": _entry(good),
                                   "k/window|dq|bfloat16|65536": _entry({})})
    x = torch.zeros(1, 65536, 1, 1, dtype=torch.bfloat16)
    assert tuning.config_for("k/window", mod, "fwd", x, (), {}) == {"fwd": good, "dq": {}}


def test_an_entry_without_its_tuning_length_is_dropped(gpu_store):
    mod = load_family("window.py.j2", **WINDOW)
    entry = _entry(mod.config_space("fwd", 65536)[1])
    del entry["T"]
    tuning.Store(gpu_store).write({"k/window|fwd|bfloat16|65536": entry})
    x = torch.zeros(1, 65536, 1, 1, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="no tuning length"):
        assert tuning.config_for("k/window", mod, "fwd", x, (), {}) is None


@pytest.mark.parametrize("text", ["[" * 100000 + "]" * 100000, '{"version": 1, "entries": ' + "[" * 5000 + "]" * 5000 + "}",
                                  "\x00\xff garbage"], ids=["deep-list", "deep-entries", "garbage"])
def test_a_store_of_any_shape_reads_as_empty(tmp_path, text):
    path = tmp_path / "s.json"
    path.write_text(text, errors="surrogateescape")
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert tuning.Store(path).read() == {}
