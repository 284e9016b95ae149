"""``decode_bench`` (``nsa-dsl bench --decode``) on the CPU: the contiguous and the paged cache's
steps, their keys and ratios, with a stand-in timer that runs each timed function several times
(every run must give the same output: the bench rewinds the cache between runs) and keeps what
it returns. Kernels run through Triton's interpreter; caches and outputs are NaN-filled
(NSA_DSL_NAN_FILL=1), so a read of a slot nothing wrote fails."""
from __future__ import annotations

import types

import pytest
import torch

from nsa_dsl.tools import decode_bench as db
from test_decode import SMALL


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "decode-kernels"))


def run_bench(T, q_len, page_size, cuda_graph, runs=2, spec=SMALL["paper"]):
    """One case of ``spec`` (B=2); returns the row and the outputs of each timed function,
    in the order timed (per cache: step, kernels, then with graphs: kernels, step)."""
    outs = []

    def timer(fn):
        got = [fn().clone() for _ in range(runs)]
        assert all(torch.equal(x, got[0]) for x in got), "a rerun of the step gives the same output"
        outs.append(got[0])
        return float(len(outs))                          # distinct stand-in times: the ratios are checked
    (row,) = db.decode_bench(spec, cache_lengths=(T,), batches=(2,), HQ=3, H=1, Dqk=16, Dv=16,
                             q_len=q_len, dtype=torch.float32, peers=(), cuda_graph=cuda_graph,
                             page_size=page_size, device="cpu", timer=timer)
    return row, outs


def test_decode_bench_paged_step_equals_contiguous():
    """Paged (shuffled pages of 16) and contiguous caches holding the same tokens give the step the
    same output, launched through the runner (append + decode) and as the decode kernels alone."""
    row, outs = run_bench(T=48, q_len=2, page_size=16, cuda_graph=False)
    assert row["page_size"] == 16 and row["T"] == 48 and row["q_len"] == 2
    assert [row[k] for k in ("nsa_step_ms", "nsa_kernel_ms", "paged_step_ms", "paged_kernel_ms")] == [1, 2, 3, 4]
    assert row["paged_vs_contiguous"] == 3 / 1 and row["paged_max_diff"] == 0.0
    assert not any(k.endswith("graph_ms") or k.endswith("vs_graph") or k.startswith("speedup") for k in row)
    assert len(outs) == 4 and outs[0].shape == (2, 2, 3, 16) and torch.isfinite(outs[0]).all()
    assert all(torch.equal(o, outs[0]) for o in outs[1:]), "paged == contiguous, step == kernels"
    assert db.table_keys([row]) == ["nsa_step_ms", "nsa_kernel_ms", "paged_step_ms", "paged_kernel_ms",
                                    "paged_vs_contiguous"]


def test_decode_bench_learned_pooling():
    """A spec that learns its pooling (the module's job) is timed with the blocks' mean standing in
    for the pool, in the prefill and in the timed steps (which complete a block here)."""
    row, outs = run_bench(T=48, q_len=4, page_size=16, cuda_graph=False,
                          spec=SMALL["paper"].replace("stride = 4)", "stride = 4, pool = mlp)"))
    assert row["paged_max_diff"] == 0.0 and torch.isfinite(outs[0]).all()
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_decode_bench_graph_keys_and_page_taking_step(monkeypatch):
    """With graphs (a stand-in that replays by calling the function): every time and ratio; the step
    takes a new page per sequence (32 tokens held, 16 more), which the rewind gives back before
    each rerun."""
    monkeypatch.setattr(db, "_graph", lambda fn: types.SimpleNamespace(replay=fn))
    row, outs = run_bench(T=48, q_len=16, page_size=16, cuda_graph=True)
    assert [row[k] for k in db.TIMES] == [1, 2, 3, 4, 5, 6, 7, 8]   # step, kernel, graph, step_graph per cache
    assert row["python_vs_graph"] == 1 / 4 and row["paged_python_vs_graph"] == 5 / 8
    assert row["paged_vs_contiguous"] == 8 / 4 and row["paged_max_diff"] == 0.0
    assert not any(k.endswith("_error") for k in row)
    assert len(outs) == 8 and torch.isfinite(outs[0]).all() and outs[0].shape == (2, 16, 3, 16)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert db.table_keys([row, {"sdpa_cudnn_ms": 1.0, "speedup": 2.0}]) == [*db.TIMES, "sdpa_cudnn_ms", "speedup",
                                                                            "python_vs_graph", "paged_python_vs_graph",
                                                                            "paged_vs_contiguous"]


def test_decode_bench_page_size_checked_first():
    """A page size that is not a power of two is refused before any cache is filled or timed."""
    from nsa_dsl.errors import SpecError
    with pytest.raises(SpecError) as e:
        db.decode_bench(SMALL["paper"], cache_lengths=(48,), batches=(2,), HQ=3, H=1, Dqk=16, Dv=16,
                        dtype=torch.float32, peers=(), cuda_graph=False, page_size=24, device="cpu",
                        timer=lambda fn: pytest.fail("timed before the page size was checked"))
    assert e.value.code == "E801"
