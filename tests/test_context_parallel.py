"""Context parallelism (nsa_dsl.runtime.context_parallel): the layout and its plan of calls, the
accounting of ``explain --cp``, a group of one in this process (reference, kernels, the layer,
torch.compile), and 2 and 4 gloo ranks under torchrun (tests/cp_worker.py: outputs and every
gradient equal to one process on the whole sequence; FSDP2 x CP on a 2 x 2 mesh)."""
import functools
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import nsa_dsl  # noqa: E402
from nsa_dsl.errors import SpecError  # noqa: E402
from nsa_dsl.language.cost import Dims  # noqa: E402
from nsa_dsl.runtime import context_parallel as cp  # noqa: E402
from nsa_dsl.semantics.reference import reference  # noqa: E402
from nsa_dsl.tools.explain import cp_cost  # noqa: E402

ROOT = Path(__file__).parents[1]
WORKER = ROOT / "tests" / "cp_worker.py"
sys.path.insert(0, str(ROOT / "tests"))
import cp_worker as W  # noqa: E402  (the specs and the packing the workers use)

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


# ------------------------------------------------------------------------------ layout

@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_the_sequence_once_and_balance_causal_work(world):
    T = 24 * world
    x = torch.arange(T)[None, :]
    shards = [cp.shard_sequence(x, world=world, rank=r) for r in range(world)]
    assert sorted(torch.cat(shards, 1)[0].tolist()) == list(range(T))
    c = T // (2 * world)
    for r, s in enumerate(shards):
        assert s[0].tolist() == list(range(r * c, (r + 1) * c)) + list(range((2 * world - 1 - r) * c, (2 * world - r) * c))
        assert torch.equal(cp.Layout.of(nsa_dsl.parse(W.PAPER), world, r, T // world).rows(), s[0])
    work = {int((s + 1).sum()) for s in shards}          # causal keys per rank: sum of (t + 1)
    assert len(work) == 1


def _plan_covers(spec, T, world, cu):
    """Every rank's pieces cover its rows once, each row at its position in its sequence."""
    bounds = list(zip(cu[:-1], cu[1:]))
    seq_of = {row: j for j, (a, b) in enumerate(bounds) for row in range(a, b)}
    for r in range(world):
        lay = cp.Layout.of(spec, world, r, T // world, torch.tensor(cu))
        rows = lay.rows().tolist()
        seen = []
        for p in lay.pieces:
            a, b = p.keys
            for i in range(*p.rows):
                g = rows[i]
                seen.append(i)
                assert a <= g < b
                if p.q_start is not None:                 # a piece of one sequence
                    assert (a, b) == bounds[seq_of[g]] and g - a == p.q_start + i - p.rows[0]
                else:                                     # whole sequences
                    assert bounds[seq_of[g]][0] >= a and bounds[seq_of[g]][1] <= b
                    assert p.cu is None or list(p.cu) == [x - a for x in cu[p.seqs[0]:p.seqs[1] + 1]]
        assert seen == list(range(T // world))
        assert torch.equal(lay.positions(), torch.tensor([g - bounds[seq_of[g]][0] for g in rows]))
    return lay


@pytest.mark.parametrize("world", [1, 2, 4])
def test_packed_plan(world):
    spec = nsa_dsl.parse(W.PAPER)
    _plan_covers(spec, 64, world, W.CU)
    _plan_covers(spec, 64, world, [0, 64])
    _plan_covers(spec, 64, world, [0, 0, 16, 16, 48, 64, 64])


def test_plain_plan():
    spec = nsa_dsl.parse(W.PAPER)
    assert cp.Layout.of(spec, 1, 0, 40).pieces == (cp.Piece((0, 40), (0, 40)),)      # one rank: the plain call
    two = [cp.Layout.of(spec, 2, r, 32).pieces for r in range(2)]
    assert two[0] == (cp.Piece((0, 16), (0, 64), 0), cp.Piece((16, 32), (0, 64), 48))
    assert two[1] == (cp.Piece((0, 32), (0, 64), 16),)                     # chunks 1 and 2: adjacent


def test_layout_refusals():
    spec, qb = nsa_dsl.parse(W.PAPER), nsa_dsl.parse(W.QBLOCK)
    with pytest.raises(SpecError, match="E651"):
        cp.Layout.of(spec, 2, 0, 31)                      # odd shard
    with pytest.raises(SpecError, match="E651"):
        cp.shard_sequence(torch.zeros(1, 30), world=4, rank=0)
    with pytest.raises(SpecError, match="E625"):
        cp.Layout.of(spec, 2, 0, 32, torch.tensor([0, 60]))
    cp.Layout.of(qb, 2, 1, 32)                            # chunks of 16: groups of 4 stay whole
    with pytest.raises(SpecError, match="E629") as e:
        cp.Layout.of(qb, 4, 0, 6)                         # chunks of 3
    assert "multiples of 4" in str(e.value)
    with pytest.raises(SpecError, match="E629"):          # a cut 11 positions into a sequence
        cp.Layout.of(qb, 2, 0, 32, torch.tensor([0, 5, 64]))
    cp.Layout.of(qb, 2, 0, 32, torch.tensor([0, 4, 64]))
    with pytest.raises(SpecError, match="E614"):          # every rank refuses, not only those with pieces
        cp.Layout.of(spec, 2, 1, 32, takes_q_start=False)
    cp.Layout.of(spec, 2, 1, 32, torch.tensor([0, 16, 32, 48, 64]), takes_q_start=False)   # no cut sequence
    with pytest.raises(SpecError, match="E650"):
        cp.process_group("cp")
    with pytest.raises(SpecError, match="E650"):
        nsa_dsl.SparseAttention(spec, 32, heads=4, cp_mesh=3)


# ------------------------------------------------------------------------------ accounting

def test_cp_cost_by_hand():
    spec = nsa_dsl.parse(W.PAPER)                         # cmp (8, 4), slc top 3, swa; gate of 3
    d = Dims(4, 2, 16, 8, 2)
    c = cp_cost(spec, 64, 4, d)
    row = 2 * (16 + 8) * 2                                # one position's K and V: 96 bytes
    assert c.gather == c.scatter == 48 * row
    assert c.gathered == 64 * row and c.compressed == 15 * row   # (64 - 8) // 4 + 1 blocks
    own = 16 * 4 * (16 * 2 + 3 * 2 + 8 * 2 * 4 + 3 * 4) + 16 * 2 * 3 * 4
    assert c.local == own
    assert c.backward == c.gathered + c.compressed + 16 * 4 * (16 * 2 + 3 * 2) + 16 * 4 * (8 * 2 * 4 + 4 * 3)
    assert c.peak == c.local + c.gathered + c.compressed + c.backward
    one = cp_cost(spec, 64, 1, d)
    assert one.gather == one.scatter == 0 and one.local == 4 * own
    dsa = cp_cost(nsa_dsl.parse(W.DSA), 64, 2, d)         # + the indexer keys (dim 16)
    assert dsa.gather == 32 * (row + 16 * 2)
    assert cp_cost(spec, 60, 4, d).T == 64                # padded to whole chunks


def test_explain_cp_section(capsys):
    from nsa_dsl.tools.cli import main
    assert main(["explain", str(ROOT / "examples" / "nsa_paper.nsa"), "--cp", "8", "--lengths", "256k,1m"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("context parallel over up to 8 ranks"):]
    section = section[:section.index("\n\n")]
    rows = [line.split() for line in section.splitlines()[3:19]]
    assert [(r[0], r[1]) for r in rows[:8]] == [("262144", n) for n in "1 2 3* 4 5* 6* 7* 8".split()]
    assert rows[1][2:4] == ["320", "MiB"] and rows[7][2:4] == ["560", "MiB"]    # 256k x 4 x 320 x 2 B x (N-1)/N
    assert rows[15][:4] == ["1048576", "8", "2.19", "GiB"]
    assert max(len(line) for line in section.splitlines()) <= 96
    assert "context parallel" not in main_text(capsys)


def main_text(capsys):
    from nsa_dsl.tools.cli import main
    main(["explain", str(ROOT / "examples" / "nsa_paper.nsa"), "--lengths", "8k"])
    return capsys.readouterr().out


# ------------------------------------------------------------------------------ a group of one, here

@pytest.fixture
def group_of_one():
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _inputs(spec, T, HQ=4, H=2, D=16, Dv=16, dtype=torch.float64, B=1):
    g = torch.Generator().manual_seed(0)
    C = len(spec.output.branches)
    xs = [torch.randn(B, T, h, d, generator=g, dtype=dtype) for h, d in ((HQ, D), (H, D), (H, Dv), (HQ, C))]
    return [x.requires_grad_() for x in xs]


KERNEL_SPEC = W.KERNEL_SPEC              # block 16 / stride 8: shapes the kernels take



@pytest.mark.parametrize("packed", [False, True])
def test_group_of_one_reference(group_of_one, packed):
    spec = nsa_dsl.parse(W.PAPER)
    q, k, v, gates = _inputs(spec, 64)
    kw = {"cu_seqlens": torch.tensor(W.CU)} if packed else {}
    want = reference(spec, q, k, v, gates, **kw)
    gw = torch.autograd.grad(want.square().sum(), (q, k, v, gates))
    cp.STATS.reset()
    got = cp.attention(spec, q, k, v, gates, group=group_of_one, **kw)
    gg = torch.autograd.grad(got.square().sum(), (q, k, v, gates))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)   # packed: pooled in another order
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert cp.STATS.gathered == cp.STATS.scattered == 0 and cp.STATS.calls == 2   # k, v; nothing moves


def test_group_of_one_kernels_equal_the_plain_op(group_of_one, tmp_path, monkeypatch):
    """The CP code path of the compiled op with a group of one (gather, pooling, one piece)
    equals the plain op: output and every gradient."""
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    spec = nsa_dsl.parse(KERNEL_SPEC)
    op = nsa_dsl.compile(spec)
    q, k, v, gates = _inputs(spec, 32, dtype=torch.float32)
    want = op(q, k, v, gates)
    gw = torch.autograd.grad(want.square().sum(), (q, k, v, gates))
    got = op(q, k, v, gates, cp_group=group_of_one)
    gg = torch.autograd.grad(got.square().sum(), (q, k, v, gates))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_compiled_op_query_pieces(tmp_path, monkeypatch):
    """op(..., q_start=s): queries that are positions s .. of a sequence whose keys are all given
    (what a context-parallel rank runs), against the float64 reference; output, selections and
    every gradient (keys included: rows after the piece get their share, zero where causal)."""
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    spec = nsa_dsl.parse(KERNEL_SPEC)
    op = nsa_dsl.compile(spec)
    q, k, v, gates = (x.detach() for x in _inputs(spec, 64, dtype=torch.float32))
    for s, e in ((16, 48), (0, 16)):
        xs = [x.clone().requires_grad_() for x in (q[:, s:e], k, v, gates[:, s:e])]
        ref = [x.detach().double().requires_grad_() for x in xs]
        o, aux = op(*xs, q_start=s, return_aux=True)
        o_ref, aux_ref = reference(spec, *ref, q_start=s, return_aux=True)
        assert torch.equal(aux.indices["slc"], aux_ref.indices["slc"])
        do = torch.randn_like(o)
        with torch.no_grad():                          # inference: the window kernel combines
            torch.testing.assert_close(op(*[x.detach() for x in xs], q_start=s).double(), o_ref, rtol=2e-5, atol=2e-5)
        o = op(*xs, q_start=s)                         # training: the one-node op
        for a, b in zip(torch.autograd.grad(o, xs, do), torch.autograd.grad(o_ref, ref, do.double())):
            assert (a.double() - b).norm() <= 2e-5 * b.norm()


@pytest.mark.slow
def test_group_of_one_kernel_layer_compiles_fullgraph(group_of_one, tmp_path, monkeypatch):
    """The layer with cp_mesh on the kernels compiles whole (torch.compile, fullgraph: the
    gathers, the pooling and the op's custom ops in one graph) to the eager values. (The 2-rank
    worker's compile case covers the same on the reference in the fast suite.)"""
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    spec = nsa_dsl.parse(KERNEL_SPEC)
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = nsa_dsl.SparseAttention(spec, 32, heads=4, kv_heads=2, qk_dim=16, v_dim=16, backend="kernels",
                                    cp_mesh=group_of_one)
    x = torch.randn(1, 32, 32)
    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), list(layer.parameters()))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    yc = compiled(x)
    gc = torch.autograd.grad(yc.square().sum(), list(layer.parameters()))
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-6)
    for a, b in zip(gc, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ torchrun, gloo

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# every case on 2 ranks; on 4, the paper spec, learned pooling, packing and the 2 x 2 mesh
CASES = {2: list(W.CASES.keys() - {"fsdp_mesh", "kernels"}),
         4: ["paper", "paper_packed", "layer_learned_packed", "layer_indexer_packed", "qblock", "stats", "fsdp_mesh"]}


@functools.lru_cache(maxsize=None)
def _run_workers(world: int) -> tuple[str, str]:
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                        "--master-port", str(_free_port()), str(WORKER), "--cases", ",".join(sorted(CASES[world]))],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    return r.stdout, r.stderr


@needs_gloo
@pytest.mark.parametrize("world,case", [(w, c) for w in CASES for c in sorted(CASES[w])])
def test_ranks_equal_one_process(world, case):
    """Outputs and every gradient (inputs, parameters summed over the ranks) equal one process
    running the reference on the whole sequence; fsdp_mesh: FSDP2 over the flattened 2 x 2 data x
    context mesh gives one process's gradients; compile: the layer under torch.compile with the
    collectives and their reduce-scatters in the traced graphs."""
    out, err = _run_workers(world)
    m = re.search(rf"^CP {case} (PASS|FAIL) (.*)$", out, re.M)
    assert m, out[-3000:] + err[-3000:]
    assert m.group(1) == "PASS", m.group(2) + "\n" + err[-3000:]


@pytest.mark.slow
@needs_gloo
def test_two_ranks_kernels():
    """The compiled op (interpreter, float32) over 2 gloo ranks, plain and packed, against the
    float64 reference on the whole sequence: the kernels' query pieces (q_start) under CP."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(_free_port()), str(WORKER), "--cases", "kernels"],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert re.search(r"^CP kernels PASS", r.stdout, re.M), r.stdout[-3000:] + r.stderr[-3000:]


# ------------------------------------------------------------------------------ the example

@pytest.mark.slow
@needs_gloo
def test_train_tiny_lm_cp_two_ranks_equals_one_process():
    """examples/train_tiny_lm.py --cp 2 under torchrun: each sequence split over two ranks (the
    token shift across chunk edges too); the logged losses equal one process's."""
    script = ROOT / "examples" / "train_tiny_lm.py"
    argv = ["--device", "cpu", "--steps", "3", "--batch", "2", "--seq-len", "128", "--log-every", "1",
            "--eval-batches", "1", "--layers", "1"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), str(script), "--cp", "2", *argv],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert "x 2 ranks (cp 2" in two.stdout
    one = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    losses = [re.findall(r"^step \d+ loss (\S+)", r.stdout, re.M) for r in (two, one)]
    assert len(losses[0]) == 3 and [float(x) for x in losses[0]] == pytest.approx([float(x) for x in losses[1]],
                                                                                  abs=2e-4)


# ------------------------------------------------------------------------------ GPU (the lead runs these)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_group_of_one_equals_the_plain_op(dtype, tmp_path, monkeypatch):
    """On one GPU (NCCL group of one): the CP path of the compiled op equals the plain op, output
    and gradients, bit for bit up to the gather's copy (the same kernels on the same values)."""
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    import os
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        spec = nsa_dsl.load(ROOT / "examples" / "nsa_paper_mean.nsa")
        op = nsa_dsl.compile(spec)
        q, k, v, gates = (x.detach().cuda().to(dtype).requires_grad_()
                          for x in _inputs(spec, 4096, 64, 4, 128, 128, torch.float32))
        want = op(q, k, v, gates)
        gw = torch.autograd.grad(want.float().square().sum(), (q, k, v, gates))
        got = op(q, k, v, gates, cp_group=dist.group.WORLD)
        gg = torch.autograd.grad(got.float().square().sum(), (q, k, v, gates))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for a, b in zip(gg, gw):
            assert (a.float() - b.float()).norm() <= 1e-2 * b.float().norm()   # dK/dV: atomics' order
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_query_pieces(dtype, tmp_path, monkeypatch):
    """The kernels' query pieces on the GPU (what each rank runs under CP): op(..., q_start=s) on
    rows s .. e of the paper pattern against the float32 reference, output and gradients."""
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    spec = nsa_dsl.load(ROOT / "examples" / "nsa_paper_mean.nsa")
    op = nsa_dsl.compile(spec)
    q, k, v, gates = (x.detach().cuda() for x in _inputs(spec, 4096, 64, 4, 128, 128, torch.float32))
    def err(a, b):
        return ((a.float() - b).norm() / b.norm()).item()
    for s, e in ((1024, 3072), (0, 1024), (3072, 4096)):
        xs = [x.to(dtype).requires_grad_() for x in (q[:, s:e], k, v, gates[:, s:e])]
        lp = [x.detach().requires_grad_() for x in xs]            # the reference in the same dtype
        ref = [x.detach().float().requires_grad_() for x in xs]
        outs = [op(*xs, q_start=s), reference(spec, *lp, q_start=s), reference(spec, *ref, q_start=s)]
        do = torch.randn_like(outs[2])
        grads = [torch.autograd.grad(o, x, do.to(o.dtype)) for o, x in zip(outs, (xs, lp, ref))]
        # within 5e-3, or twice the same dtype's reference error (the repository's GPU standard)
        assert err(outs[0], outs[2]) <= max(5e-3, 2 * err(outs[1], outs[2]))
        for a, b, c in zip(*grads):
            assert err(a, c) <= max(5e-3, 2 * err(b, c))
