"""Lowering, rendering and the on-disk kernel cache."""
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap

import pytest

import nsa_dsl
from nsa_dsl.codegen import cache as cache_mod
from nsa_dsl.codegen import render as render_mod
from nsa_dsl.codegen.cache import KernelCache, cache_key
from nsa_dsl.codegen.plan import lower, bind

PAPER = """
attention paper {
    heads = 16
    kv_heads = 1
    qk_dim = 32
    v_dim = 16
    branch cmp = compress(block = 32, stride = 16)
    branch slc = select(block = 64, top_k = 4, score = cmp, keep_first = 1, keep_last = 2)
    branch swa = window(size = 64)
    output = gate(sigmoid, cmp, slc, swa)
}
"""
NO_WINDOW = """
attention nowin {
    heads = 4
    kv_heads = 2
    head_dim = 16
    branch cmp = compress(block = 16, stride = 16)
    branch slc = select(block = 32, top_k = 3, score = cmp)
    output = sum(cmp, slc)
}
"""


def plan_of(text):
    spec = nsa_dsl.parse(text)
    return lower(spec, bind(spec, spec.heads, spec.kv_heads, spec.qk_dim, spec.v_dim))


def test_plan_lists_kernels_in_dependency_order():
    plan = plan_of(PAPER)
    assert [k.name for k in plan.kernels] == ["compress_cmp", "topk_slc", "select_slc", "window_swa", "combine"]
    assert plan.kernel("topk_slc").vars()["L"] == 32 and plan.kernel("topk_slc").vars()["SCORE"] == "cmp"
    text = plan.describe()
    assert "G=16" in text and "window.py.j2" in text


def test_window_free_spec_renders_no_window_code():
    plan = plan_of(NO_WINDOW)
    sources = cache_mod.render_plan(plan)
    assert not any(k.family == "window" for k in plan.kernels)
    assert all("window" not in name for name in sources)
    for src in sources.values():
        assert "SINKS" not in src and "W =" not in src


def test_rendered_sources_are_valid_python():
    for text in (PAPER, NO_WINDOW):
        for name, src in cache_mod.render_plan(plan_of(text)).items():
            compile(src, name, "exec")


def test_second_compile_loads_from_cache_without_rendering(tmp_path, monkeypatch):
    plan = plan_of(PAPER)
    first = KernelCache(tmp_path)
    first.load(plan)
    assert first.renders == 1

    def no_render(*a, **k):
        raise AssertionError("rendered again")
    monkeypatch.setattr(render_mod, "render", no_render)
    second = KernelCache(tmp_path)            # a fresh process's view of the same folder
    modules = second.load(plan)
    assert second.renders == 0 and set(modules) == {k.name for k in plan.kernels}


def test_corrupt_entry_is_detected_and_rebuilt(tmp_path):
    plan = plan_of(PAPER)
    KernelCache(tmp_path).load(plan)
    entry = KernelCache(tmp_path).entry(plan)
    victim = entry / "window_swa.py"
    victim.write_text(victim.read_text()[:100])        # truncated
    c = KernelCache(tmp_path)
    c.load(plan)
    assert c.renders == 1
    assert "def window_fwd_kernel" in victim.read_text()
    (entry / "manifest.json").write_text("{not json")  # edited manifest
    c = KernelCache(tmp_path)
    c.load(plan)
    assert c.renders == 1


def test_versions_and_templates_are_in_the_key(monkeypatch):
    plan = plan_of(PAPER)
    base = cache_key(plan)
    monkeypatch.setattr(cache_mod, "_versions", lambda: "triton=0.0 torch=0.0")
    assert cache_key(plan) != base
    monkeypatch.undo()
    real = render_mod.template_source
    monkeypatch.setattr(render_mod, "template_source", lambda n: real(n) + "# edited\n")
    assert cache_key(plan) != base
    assert cache_key(plan_of(NO_WINDOW)) != base


def test_unwritable_cache_dir_falls_back_with_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(blocker / "cache"))
    with pytest.warns(RuntimeWarning, match="not writable"):
        d = cache_mod.cache_dir()
    assert d.exists() and d != blocker / "cache"


_CHILD = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, {root!r})
    import nsa_dsl
    from nsa_dsl.codegen.cache import KernelCache
    from nsa_dsl.codegen.plan import lower, bind
    spec = nsa_dsl.parse({text!r})
    plan = lower(spec, bind(spec, spec.heads, spec.kv_heads, spec.qk_dim, spec.v_dim))
    KernelCache({dir!r}).load(plan)
    print("ok")
""")


def test_two_processes_compiling_at_once_share_one_entry(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _CHILD.format(root=root, text=PAPER, dir=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    entries = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    assert len(entries) == 1
    assert not list(tmp_path.glob("*/.*-*"))     # no temp folders left behind


def test_op_source_and_emit(tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path / "cache"))
    op = nsa_dsl.compile(nsa_dsl.parse(PAPER))
    src = op.source("window_swa")
    assert "@triton.jit" in src
    files = op.emit(tmp_path / "emit")
    assert {f.name for f in files} >= {"compress_cmp.py", "combine.py", "plan.txt"}
    with pytest.raises(nsa_dsl.SpecError):
        op.source("nope")


def test_plan_needs_shapes_when_spec_declares_none():
    spec = nsa_dsl.parse(NO_WINDOW.replace("heads = 4\n", "").replace("kv_heads = 2\n", ""))
    with pytest.raises(nsa_dsl.SpecError) as e:
        nsa_dsl.compile(spec).plan()
    assert e.value.code == "E612"
    assert nsa_dsl.compile(spec).plan(heads=4, kv_heads=1).binding.group == 4


def test_bench_decode_wiring_formats_a_table(monkeypatch, tmp_path):
    """`nsa-dsl bench --decode` on a GPU: here decode_bench and the device name are stand-ins."""
    import argparse
    import torch
    from nsa_dsl.tools import commands
    from nsa_dsl.tools import decode_bench
    fake_rows = lambda spec, Ts, Bs, **kw: [{"B": Bs[0], "T": Ts[0], "nsa_kernel_ms": 0.1,
                                            "sdpa_cudnn_ms": 0.8, "speedup": 8.0}]
    monkeypatch.setattr(decode_bench, "decode_bench", fake_rows)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in GPU")
    lines = []
    args = argparse.Namespace(file="examples/nsa_paper_mean.nsa", lengths="4096", json=str(tmp_path / "d.json"))
    spec = nsa_dsl.load(args.file)
    assert commands._bench_decode(spec, args, lines.append) == 0
    assert any("| 64 | - | 4096 | 0.1000 | 0.8000 | 8.0000 |" in line for line in lines)   # B, H (not in these rows), T
    assert (tmp_path / "d.json").exists()


def test_host_helpers_match_triton():
    """The launchers' cdiv / next_pow2 (codegen/ints.py) equal triton.cdiv / next_power_of_2."""
    import triton
    from nsa_dsl.codegen.ints import cdiv, next_pow2
    assert all(next_pow2(x) == triton.next_power_of_2(x) for x in range(1, 5000))
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 600) for b in (1, 3, 16, 64, 100))
