"""The device scripts under benchmarks/ without a GPU: kernel_floors' work model and floor table
against hand counts; reduce_add's kernels compiled for sm_90, and its atomic and store modes run
in the interpreter."""
import importlib.util
import math
from pathlib import Path

import pytest

import nsa_dsl
from nsa_dsl.tools.bench import branch_costs

from kernel_utils import run_sm90_check

ROOT = Path(__file__).resolve().parent.parent


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernel_floors_work_model_and_table_by_hand():
    floors = _script("kernel_floors")
    spec = nsa_dsl.load(ROOT / "examples" / "nsa_paper_mean.nsa")
    T, HQ, H, D = 65536, 64, 4, 128
    w = floors.work(spec, T, HQ, H, D)
    c = branch_costs(spec, T, HQ=HQ, H=H, Dqk=D, Dv=D)
    assert w["compress"] == c["cmp_compress"][0] and w["window"] == c["swa_window"][0]
    assert w["topk"] == c["slc_topk"][0]
    # the K and V rows (bf16) of 16 blocks of 64 keys per position and kv head; the current block
    # holds only the keys up to the position (half on average), the first positions fewer blocks
    full = T * H * 16 * 64 * 2 * D * 2
    assert w["select"] == c["slc_select"][1] and 0.95 * full < w["select"] < full
    assert w["select_qdo"] == T * HQ * 16 * 2 * D * 2                      # q and dO rows, bf16
    assert w["combine_fwd"] == 4 * T * HQ * D * 2 + T * HQ * 3 * 2         # 3 outputs + o, gates
    # dO and 3 outputs in; gates in and their gradient out; 3 lse in, 3 folded lse and deltas out
    assert w["combine_bwd"] == 4 * T * HQ * D * 2 + 2 * T * HQ * 3 * 2 + 3 * T * HQ * 3 * 4
    rates = {"dense": 700e12, "hbm": 3e12, "l2": 10e12}
    ms = {"compress_bwd_dkdv_kernel": 20.0, "select_fwd_kernel": 14.0, "select_bwd_dkdv_kernel": 15.0,
          "window_fwd_combine_kernel": 4.0, "void at::native::fill_kernel": 0.5}
    rows = {r["kernel"]: r for r in floors.table(ms, w, rates)}
    dkdv = rows["compress_bwd_dkdv_kernel"]                               # 4 matmuls = 2x the forward's 2
    assert math.isclose(dkdv["floor_ms"], 2 * w["compress"] / 700e12 * 1e3)
    assert math.isclose(dkdv["ratio"], 20.0 / dkdv["floor_ms"])
    assert math.isclose(rows["select_fwd_kernel"]["floor_ms"], w["select"] / 10e12 * 1e3)
    assert math.isclose(rows["select_bwd_dkdv_kernel"]["floor_ms"], w["select_qdo"] / 3e12 * 1e3)
    assert rows["window_fwd_combine_kernel"]["bound"] == "dense"
    assert "floor_ms" not in rows["void at::native::fill_kernel"]          # outside the model: time only
    assert list(rows) == sorted(ms, key=lambda k: -ms[k])                   # longest first


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on the device it runs for real")
def test_reduce_add_kernels_compile_for_sm90(tmp_path):
    src = (f"import runpy, sys; sys.argv = ['reduce_add', '--check']; "
           f"runpy.run_path({str(ROOT / 'benchmarks' / 'reduce_add.py')!r}, run_name='__main__')")
    run_sm90_check(src, [], tmp_path)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on the device it runs for real")
def test_reduce_add_kernels_add_what_they_count():
    """Each program adds its tile REPS times round-robin over the tiles: with 2 programs, 4 reps
    and 4 tiles every tile gets the tile twice (atomic), or holds it once (store)."""
    import torch
    import triton
    ra = _script("reduce_add")
    BM, D = 16, 32
    x = (torch.arange(BM * D) % 7).float().view(BM, D)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8))
    for name, (fn, mode) in ra.KERNELS.items():
        if name == "tma":      # the interpreter has no descriptor reduce (the sm_90 compile covers it)
            continue
        buf = torch.zeros(4 * BM * D)
        fn[(2,)](buf, 4, BM=BM, D=D, REPS=4, **mode)
        want = (1 if name == "store" else 2) * x
        assert torch.equal(buf.view(4, BM, D), want.expand(4, BM, D)), name


def test_kernel_floors_pin_tma_runs_the_compression_on_descriptors(tmp_path, monkeypatch):
    """--tma pins config TMA on the op's compression and window kernels: the same outputs and
    gradients."""
    import torch
    from nsa_dsl.runtime import kernel_ops
    from nsa_dsl.tools.bench import make_inputs
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    floors = _script("kernel_floors")
    op = nsa_dsl.compile(nsa_dsl.load(ROOT / "examples" / "nsa_paper_mean.nsa"))
    q, k, v, g = make_inputs("random", B=1, T=100, HQ=4, H=1, Dqk=16, Dv=16, gates=3, dtype=torch.float32,
                             device="cpu", seed=3)
    leaves = [x.requires_grad_() for x in (q, k, v, g)]
    do = torch.randn_like(q)

    def step():
        o = op(q, k, v, g)
        return [o, *torch.autograd.grad(o, leaves, do)]
    plain = step()
    keys = op._kernels(op.binding(heads=4, kv_heads=1, qk_dim=16, v_dim=16))[1]
    names = floors.pin_tma(op, 4, 1, 16)
    try:
        assert sorted(names) == ["compress_cmp", "window_swa"]
        for n, kinds in (("compress_cmp", ("fwd", "dq", "dkdv")), ("window_swa", ("fwd", "fwd_combine", "dq", "dkdv"))):
            mod = kernel_ops.module(keys[n])
            assert all(mod.resolve_config(q, kind)["TMA"] for kind in kinds), n
        for a, b in zip(step(), plain):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:                   # the registered modules outlive the test
        floors.pin_tma(op, 4, 1, 16, on=False)
    assert not any(kernel_ops.module(keys[n]).resolve_config(q, "fwd")["TMA"] for n in names)
