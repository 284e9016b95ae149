"""`nsa-dsl bench` without a GPU: FLOP accounting, the workloads, the report, the CLI wiring.

The timings themselves need CUDA (the lead runs them on the device); here stand-in timers and a
stand-in op (the float reference) drive the same bookkeeping on the CPU.
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import nsa_dsl
from nsa_dsl.tools import bench
from nsa_dsl.tools import cli
from nsa_dsl.semantics import reference as S

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "examples" / "nsa_paper.nsa"
PAPER_MEAN = ROOT / "examples" / "nsa_paper_mean.nsa"

# A small NSA for the float64 reference: 32 selection blocks at T = 1024, top 8.
SMALL = """attention small {
    branch cmp = compress(block = 16, stride = 8)
    branch slc = select(block = 32, top_k = 8, score = cmp, keep_first = 1, keep_last = 2)
    branch swa = window(size = 64)
    output = gate(sigmoid, cmp, slc, swa)
}"""


# ------------------------------------------------------------------------- FLOP

def test_flops_match_a_hand_count_for_the_paper_spec():
    spec = nsa_dsl.load(PAPER)               # l=32, d=16, l'=64, n=16 (1 first + 2 last), w=512
    T, HQ, H, Dqk, Dv = 4000, 64, 4, 192, 128  # 4000: the last selection block is partial
    cmp = sum(max(0, (t - 31) // 16 + 1) for t in range(T))          # blocks i*16+31 <= t
    slc = sum(64 * min(15, t // 64) + t % 64 + 1 for t in range(T))  # own block forced, causal in it
    swa = sum(min(512, t + 1) for t in range(T))
    qkpv, qk = 2 * (Dqk + Dv), 2 * Dqk
    want = {"cmp_compress": (HQ * cmp * qkpv, H * cmp * (Dqk + Dv) * 2),
            "slc_topk": (HQ * cmp * qk, H * cmp * Dqk * 2),
            "slc_select": (HQ * slc * qkpv, H * slc * (Dqk + Dv) * 2),
            "swa_window": (HQ * swa * qkpv, H * swa * (Dqk + Dv) * 2)}
    got = bench.branch_costs(spec, T, HQ=HQ, H=H, Dqk=Dqk, Dv=Dv)
    assert got == {k: (float(f), float(b)) for k, (f, b) in want.items()}
    fwd, fwdbwd = bench.op_flops(spec, T, HQ=HQ, H=H, Dqk=Dqk, Dv=Dv)
    assert fwd == sum(f for f, _ in want.values())
    attention = fwd - want["slc_topk"][0]     # no backward through the scoring pass
    assert fwdbwd == pytest.approx(fwd + 2.5 * attention)
    assert bench.op_flops(spec, T, B=2, HQ=HQ, H=H, Dqk=Dqk, Dv=Dv) == (2 * fwd, 2 * fwdbwd)
    assert bench.dense_flops(T, HQ, Dqk, Dv) == 2 * HQ * (T * (T + 1) / 2) * (Dqk + Dv)


def _row(T=65536, workload="random", H=4, **ms):
    return {"T": T, "workload": workload, "B": 1, "HQ": 64, "H": H, "G": 64 // H, "Dqk": 128, "Dv": 128,
            "dtype": "bfloat16", **ms}


def test_annotate_rows_derives_rates_per_head_and_speedups():
    spec = nsa_dsl.load(PAPER_MEAN)
    rows = [_row(nsa_fwd_ms=40.0, nsa_fwdbwd_ms=120.0, cudnn_fwd_ms=120.0, cudnn_fwdbwd_ms="oom",
                 cmp_compress_ms=10.0, slc_select_ms=16.0, swa_window_ms="error", fla_fwd_ms=20.0),
            _row(workload="local", nsa_fwd_ms=30.0, nsa_fwdbwd_ms="oom")]
    bench.annotate_rows(rows, spec)
    r, loc = rows
    dims = dict(HQ=64, H=4, Dqk=128, Dv=128)
    fwd, fwdbwd = bench.op_flops(spec, 65536, **dims)
    assert r["nsa_fwd_tflops"] == pytest.approx(fwd / 40e-3 / 1e12)
    assert r["nsa_fwdbwd_tflops"] == pytest.approx(fwdbwd / 120e-3 / 1e12)
    assert r["nsa_fwd_ms_per_head"] == pytest.approx(40 / 64)
    dense = bench.dense_flops(65536, 64, 128, 128)
    assert r["cudnn_fwd_tflops"] == pytest.approx(dense / 120e-3 / 1e12)
    assert "cudnn_fwdbwd_tflops" not in r and "swa_window_tflops" not in r
    costs = bench.branch_costs(spec, 65536, **dims)
    assert r["slc_select_tflops"] == pytest.approx(costs["slc_select"][0] / 16e-3 / 1e12)
    assert r["slc_select_gbs"] == pytest.approx(costs["slc_select"][1] / 16e-3 / 1e9)
    assert r["cmp_compress_tflops"] == pytest.approx(costs["cmp_compress"][0] / 10e-3 / 1e12)
    assert r["speedup_fwd_vs_cudnn"] == pytest.approx(3.0) and "speedup_fwdbwd_vs_cudnn" not in r
    assert r["fla_speedup_fwd_vs_cudnn"] == pytest.approx(6.0) and r["fla_fwd_tflops"] > 0
    # SDPA runs for the first workload only: the local row compares with the same shape's cuDNN
    assert loc["speedup_fwd_vs_cudnn"] == pytest.approx(4.0)
    assert "nsa_fwdbwd_tflops" not in loc and "nsa_fwdbwd_ms_per_head" not in loc
    assert r["dense_fwd_tflop"] == pytest.approx(dense / 1e12)


# -------------------------------------------------------------------- workloads

def test_distinct_blocks_by_hand():
    idx = torch.tensor([[0, 1], [0, 1], [1, 2], [-1, -1],      # tokens 0..3: {0, 1, 2}
                        [3, -1], [3, 4], [5, 6], [7, 8]],       # tokens 4..7: {3, 4, 5, 6, 7, 8}
                       dtype=torch.int32).view(1, 8, 1, 2)
    assert bench.distinct_blocks(idx, 4) == pytest.approx((3 + 6) / 2)
    assert bench.distinct_blocks(idx, 4, start=1) == 6          # groups start at a multiple of R
    assert bench.distinct_blocks(idx, 2) == pytest.approx((2 + 2 + 2 + 4) / 4)
    assert math.isnan(bench.distinct_blocks(idx, 4, start=5))
    two_heads = torch.cat([idx, idx + (idx >= 0) * 10], 2)      # kv heads count separately
    assert bench.distinct_blocks(two_heads, 4) == pytest.approx(4.5)


def _reference_topk(spec, q, k, v):
    cmp, slc = spec.branch("cmp"), spec.branch("slc")
    kc, vc = S.mean_pool(k, cmp.block, cmp.stride), S.mean_pool(v, cmp.block, cmp.stride)
    scale = q.shape[-1] ** -0.5
    _, lse = S.compress_attention(q, kc, vc, cmp.block, cmp.stride, scale)
    return S.select_blocks_cmp(q, kc, lse, scale, cmp.block, cmp.stride, slc.block, slc.top_k,
                               slc.keep_first, slc.keep_last)


def test_local_workload_neighbours_share_more_blocks_than_random():
    spec = nsa_dsl.parse(SMALL)
    slc = spec.branch("slc")
    shape = dict(B=1, T=1024, HQ=16, H=1, Dqk=32, Dv=32, gates=3, dtype=torch.float64, device="cpu", seed=1)
    distinct = {}
    for workload in bench.WORKLOADS:
        q, k, v, gates = bench.make_inputs(workload, **shape)
        assert gates.shape == (1, 1024, 16, 3)
        idx = _reference_topk(spec, q, k, v)
        start = (slc.top_k - 1) * slc.block
        assert bench.distinct_blocks(idx, 1, start) == slc.top_k
        distinct[workload] = bench.distinct_blocks(idx, 4, start)
    # random: ~14.8 of at most 32; local: ~11.3 (drifting queries keep choosing the same far blocks)
    assert distinct["local"] < distinct["random"] - 2, distinct


def test_local_workload_drifts_slowly_and_queries_follow_their_keys():
    q, k, _, _ = bench.make_inputs("local", B=1, T=4096, HQ=4, H=2, Dqk=64, Dv=8, gates=0,
                                   dtype=torch.float64, device="cpu", seed=0)
    assert q.std().item() == pytest.approx(1, abs=0.1) and k.std().item() == pytest.approx(1, abs=0.1)

    def corr(a, b):  # mean over tokens of the cosine-like correlation of two [T, D] series
        return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean().item()
    k0 = k[0, :, 0]
    L = bench.LOCAL_DRIFT
    assert corr(k0[1:], k0[:-1]) > 0.7                       # neighbours: nearly the same key
    assert abs(corr(k0[2 * L:], k0[:-2 * L])) < 0.05         # beyond the drift length: unrelated
    assert corr(q[0, :, 0], k[0, :, 0]) > 0.15               # query heads 0, 1 read kv head 0
    assert abs(corr(q[0, :, 0], k[0, :, 1])) < 0.05
    with pytest.raises(ValueError, match="unknown workload"):
        bench.make_inputs("zipf", B=1, T=8, HQ=1, H=1, Dqk=8, Dv=8, gates=0, device="cpu")


# ------------------------------------------------------------------------ steps

def test_case_steps_skip_sdpa_above_the_peer_limit_and_for_a_second_workload():
    steps = bench.case_steps(65536, dense_here=True, peers=("cudnn", "flash", "fla"), backward=True,
                             peer_max_len=65536)
    assert steps == ["inputs", "nsa fwd", "nsa fwd+bwd", "nsa memory", "branch kernels", "cudnn fwd",
                     "cudnn fwd+bwd", "flash fwd", "flash fwd+bwd", "fla fwd", "fla fwd+bwd"]
    assert "cudnn fwd" not in bench.case_steps(131072, dense_here=True, peers=("cudnn", "fla"),
                                               backward=True, peer_max_len=65536)
    assert bench.case_steps(8192, dense_here=False, peers=("cudnn", "fla"), backward=False,
                            peer_max_len=65536) == ["inputs", "nsa fwd", "nsa memory", "branch kernels", "fla fwd"]
    n = bench.count_steps([8192, 262144], workloads=("random", "local"), kv_heads=(4, 8), peers=("cudnn",),
                          backward=True, peer_max_len=65536)
    assert n == 2 * (7 + 5) + 2 * (5 + 5)


def test_fla_kwargs_follow_the_installed_signature():
    def parallel_nsa(q, k, v, g_cmp=None, g_slc=None, g_swa=None, block_indices=None, block_counts=16,
                     block_size=64, window_size=0, scale=None, cu_seqlens=None):   # fla-core 0.6.0
        pass
    kw = bench.fla_kwargs(parallel_nsa, "gc", "gs")
    assert kw == {"g_cmp": "gc", "g_slc": "gs", "block_size": 64, "block_counts": 16, "window_size": 0}

    def other(q, k, v, g_cmp, g_slc, block_indices, block_size=64):
        pass
    with pytest.raises(TypeError, match="block_counts, window_size"):
        bench.fla_kwargs(other, None, None)


class _Bar:
    def __init__(self):
        self.n, self.labels = 0, []

    def update(self, n):
        self.n += n

    def set_postfix_str(self, s):
        self.labels.append(s)


class _StandInOp:
    """The op's interface (a cheap function of every input, not attention: the bookkeeping is
    under test); out of memory for a backward at T >= 128."""

    def __init__(self, spec):
        self.spec = spec

    def __call__(self, q, k, v, gates, compressed=None, index=None):
        if torch.is_grad_enabled() and q.requires_grad and q.shape[1] >= 128:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        G = q.shape[2] // k.shape[2]
        kv = (k[..., :v.shape[-1]] + v).repeat_interleave(G, 2)
        return q[..., :v.shape[-1]] * gates.sum(-1, keepdim=True) + kv

    def binding(self, **shapes):
        raise NotImplementedError("no kernels on this machine")


def test_bench_spec_records_failures_and_goes_on(monkeypatch):
    monkeypatch.setattr(bench, "_bench", lambda fn: (fn(), 1.0)[1])      # one call, "1 ms"
    monkeypatch.setattr(bench, "_peak_gib", lambda fn: (fn(), 0.5)[1])
    spec = nsa_dsl.parse(SMALL)
    bar = _Bar()
    kw = dict(workloads=("random", "local"), peers=("cudnn",), peer_max_len=64, backward=True)
    rows = bench.bench_spec(_StandInOp(spec), [64, 128], HQ=4, H=(1, 2), Dqk=16, Dv=16, dtype=torch.float32,
                            progress=bar, device="cpu", **kw)
    assert bar.n == bench.count_steps([64, 128], kv_heads=(1, 2), **kw) == len(bar.labels)
    assert [(r["T"], r["H"], r["workload"]) for r in rows] == [
        (T, H, w) for T in (64, 128) for H in (1, 2) for w in ("random", "local")]
    short, long_ = rows[0], rows[-4]
    assert short["nsa_fwd_ms"] == short["nsa_fwdbwd_ms"] == 1.0
    assert short["nsa_fwd_peak_gib"] == short["nsa_fwdbwd_peak_gib"] == 0.5
    assert short["nsa_fwd_tflops"] > 0 and short["nsa_fwdbwd_ms_per_head"] == 0.25
    assert long_["nsa_fwd_ms"] == 1.0 and long_["nsa_fwdbwd_ms"] == long_["nsa_fwdbwd_peak_gib"] == "oom"
    assert "nsa_error" not in long_                         # an oom is its own message
    assert long_["cudnn_fwd_ms"] == long_["cudnn_fwdbwd_ms"] == "skipped"
    assert "cudnn_fwd_ms" in short                            # timed (or an error on a CPU)
    assert "cudnn_fwd_ms" not in rows[1]                      # once per length and shape
    for field in bench.branch_fields(spec):                   # no kernels here: said once per row
        assert short[field] == "error"
    assert "no kernels" in short["branch_kernels_error"]
    assert short["inputs_gib"] > 0
    table = bench.markdown_table(rows)
    assert "oom" in table and "skipped" in table and "HQ/H" in table and "local" in table


def test_bench_spec_when_the_inputs_do_not_fit(monkeypatch):
    def no_memory(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(bench, "make_inputs", no_memory)
    (row,) = bench.bench_spec(_StandInOp(nsa_dsl.parse(SMALL)), [262144], HQ=4, H=1, Dqk=16, Dv=16,
                              peers=("cudnn",), device="cpu")
    assert row["inputs_gib"] == row["nsa_fwd_ms"] == row["slc_select_ms"] == "oom"
    assert row["cudnn_fwd_ms"] == "skipped"


DSA_SMALL = """attention dsa_small {
    branch idx = indexer(heads = 2, dim = 16)
    branch tok = select(block = 1, top_k = 8, score = idx, keep_first = 1, keep_last = 1)
    branch swa = window(size = 8)
    output = gate(sigmoid, tok, swa)
}"""


def test_bench_runs_an_indexer_spec_through_the_kernels(monkeypatch, tmp_path):
    """Indexer inputs are made, the forward+backward trains the indexer on its index loss, and the
    branch step times the indexer's top-k and the token gather (the interpreter stands in for a GPU)."""
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(bench, "_bench", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(bench, "_peak_gib", lambda fn: (fn(), 0.5)[1])
    spec = nsa_dsl.parse(DSA_SMALL)
    (row,) = bench.bench_spec(nsa_dsl.compile(spec), [24], HQ=2, H=1, Dqk=16, Dv=16, dtype=torch.float32,
                              peers=(), device="cpu", backward=True)
    errors = {k: v for k, v in row.items() if k.endswith("_error")}
    assert not errors
    assert row["nsa_fwd_ms"] == row["nsa_fwdbwd_ms"] == 1.0
    assert bench.branch_fields(spec) == ["tok_topk_ms", "tok_distinct_r4", "tok_select_ms", "swa_window_ms"]
    assert row["tok_topk_ms"] == row["tok_select_ms"] == row["swa_window_ms"] == 1.0


# ----------------------------------------------------------------------- report

def _fake_rows():
    rows = []
    for T in (8192, 16384, 32768, 65536, 131072):
        for H in (4, 8):
            for w in ("random", "local"):
                dense = w == "random"
                r = _row(T=T, workload=w, H=H, nsa_fwd_ms=T / 2000, nsa_fwdbwd_ms=T / 700,
                         nsa_fwdbwd_peak_gib=T / 9000, cmp_compress_ms=T / 9000, slc_topk_ms=T / 8000,
                         slc_distinct_r4=50.0 if dense else 30.0, slc_select_ms=T / 5000, swa_window_ms=T / 20000,
                         fla_fwd_ms=T / 1500, fla_fwdbwd_ms="error", fla_error="AssertionError: Group size")
                if dense:
                    r.update(cudnn_fwd_ms=(T / 8192) ** 2 * 1.7 if T <= 65536 else "skipped",
                             flash_fwd_ms=(T / 8192) ** 2 * 3.3 if T <= 65536 else "skipped",
                             cudnn_fwdbwd_ms="oom" if T == 65536 else (T / 8192) ** 2 * 6.8,
                             flash_fwdbwd_ms="skipped" if T > 65536 else (T / 8192) ** 2 * 12.6)
                rows.append(r)
    return bench.annotate_rows(rows, nsa_dsl.load(PAPER_MEAN))


def test_markdown_table_shows_failures_and_notes():
    text = bench.markdown_table(_fake_rows())
    lines = text.splitlines()
    assert lines[0].startswith("(fla = fla-core parallel_nsa") and "l = l' = d = 64, n = 16" in lines[0]
    head = lines[1]
    for col in ("workload", "HQ/H", "nsa fwd ms", "fwd TFLOP/s", "fwd+bwd ms/head", "fwd+bwd peak GiB",
                "cuDNN fwd+bwd", "fla fwd", "speedup fwd vs cuDNN"):
        assert col in head
    row_65k = next(line for line in lines if line.startswith("| random | 64/4 | 65536 |"))
    assert "| oom |" in row_65k and "| error |" in row_65k
    row_128k = next(line for line in lines if line.startswith("| random | 64/4 | 131072 |"))
    assert "skipped" in row_128k
    assert "slc scoring+top-k ms" in text and "slc select GB/s" in text and "slc distinct blocks, 4 tokens" in text
    assert "Failures:" in text and "- fla (T=8192 H=4 random, T=8192 H=4 local, T=8192 H=8 random and 17 more): AssertionError: Group size" in text
    widths = {line.count("|") for line in lines if line.startswith("| random | 64/4 | 8192")}
    assert len(widths) == 2                                      # the op table and the branch table
    one = bench.markdown_table([_row(T=8192, nsa_fwd_ms=1.0)])
    assert "workload" not in one and "HQ/H" not in one and "fla" not in one


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.png"
    bench.plot_rows(_fake_rows(), out, title="stand-in rows")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bench.plot_rows([_row(T=8192, nsa_fwd_ms="oom")], tmp_path / "empty.png")   # nothing to draw: still a file
    assert (tmp_path / "empty.png").exists()


def test_decode_plot_writes_a_png(tmp_path):
    """The decode plot from rows shaped like the H200 run's (benchmarks/RESULTS.md), with a
    missing peer cell left out."""
    pytest.importorskip("matplotlib")
    rows = [dict(B=B, T=T, nsa_kernel_ms=0.2 + T / 4e5, nsa_graph_ms=0.15 + T / 4e5,
                 sdpa_cudnn_ms=B * T / 2.3e6, sdpa_flash_ms=None if T > 65536 else B * T / 1.3e6)
            for B in (1, 8, 64) for T in (4096, 65536, 131072)]
    out = tmp_path / "decode.png"
    bench.plot_decode(rows, out, title="stand-in decode rows")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -------------------------------------------------------------------------- CLI

def test_bench_options_parse():
    args = cli.build_parser().parse_args(
        ["bench", "s.nsa", "--lengths", "8k,256k", "--workload", "both", "--peers", "cudnn,fla",
         "--peer-max-len", "64k", "--heads", "32", "--kv-heads", "4,8", "--dim", "64", "--forward-only"])
    assert (args.lengths, args.workload, args.peers, args.peer_max_len) == ("8192,262144", "both", ("cudnn", "fla"), 65536)
    assert (args.heads, args.kv_heads, args.dim, args.forward_only) == (32, (4, 8), 64, True)
    defaults = cli.build_parser().parse_args(["bench", "s.nsa"])
    assert (defaults.workload, defaults.peers, defaults.peer_max_len, defaults.kv_heads) == ("random", None, 65536, None)
    assert cli.build_parser().parse_args(["bench", "s.nsa", "--peers", "none"]).peers == ()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_bench_without_a_gpu_says_so(capsys):
    assert cli.main(["bench", str(PAPER_MEAN), "--lengths", "8192"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "E615" in err and "needs a CUDA GPU" in err and "Traceback" not in err


def test_bench_plot_without_matplotlib_fails_before_timing(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(bench, "bench_spec", lambda *a, **k: pytest.fail("timed without matplotlib"))
    assert cli.main(["bench", str(PAPER_MEAN), "--plot", "x.png"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "E617" in err and "matplotlib" in err


def test_bench_command_wiring(monkeypatch, tmp_path):
    """`nsa-dsl bench` on a GPU, with bench_spec and the device name as stand-ins."""
    from nsa_dsl.tools import commands
    seen = {}

    def fake_bench_spec(op, lengths, **kw):
        seen.update(kw, lengths=list(lengths), op=op)
        return _fake_rows()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in GPU")
    monkeypatch.setattr(bench, "bench_spec", fake_bench_spec)
    args = cli.build_parser().parse_args(
        ["bench", str(PAPER), "--lengths", "8192,131072", "--heads", "32", "--kv-heads", "4,8",
         "--workload", "both", "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])
    if "matplotlib" not in sys.modules:
        pytest.importorskip("matplotlib")
    lines = []
    assert commands.bench_cmd(args, emit=lines.append) == 0
    assert seen["lengths"] == [8192, 131072] and seen["HQ"] == 32 and seen["H"] == (4, 8)
    assert (seen["Dqk"], seen["Dv"], seen["workloads"], seen["peer_max_len"]) == (192, 128, ("random", "local"), 65536)
    assert seen["op"].spec.heads is None and seen["op"].spec.kv_heads is None   # shapes from the options
    assert set(seen["peers"]) <= {"cudnn", "flash", "fla"} and {"cudnn", "flash"} <= set(seen["peers"])
    text = "\n".join(lines)
    assert "stand-in GPU" in text and "| nsa fwd ms |" in text
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["meta"]["HQ"] == 32 and data["meta"]["kv_heads"] == [4, 8] and data["meta"]["fla"]
    assert len(data["rows"]) == len(_fake_rows()) and "nsa_fwd_tflops" in data["rows"][0]
    assert (tmp_path / "b.png").exists()
    args.kv_heads = (5,)
    with pytest.raises(nsa_dsl.SpecError) as e:
        commands.bench_cmd(args, emit=lines.append)
    assert e.value.code == "E617"
