"""Context-parallel checks on gloo ranks (launched by tests/test_context_parallel.py under torchrun).

    torchrun --nproc-per-node 2 tests/cp_worker.py [--cases a,b]

Every rank builds the same whole-sequence inputs from one seed, takes its shard, runs the
context-parallel path and compares its rows of the output and of every gradient with one
process running the plain reference on the whole sequence (float64, every rank computes the
plain run itself). Gradients of shared parameters are summed over the group first (each rank's
loss covers its own rows). Rank 0 prints one line per case, ``CP <case> PASS <max rel err>`` or
``CP <case> FAIL <why>``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nsa_dsl  # noqa: E402
from nsa_dsl.errors import SpecError  # noqa: E402
from nsa_dsl.runtime import context_parallel as cp  # noqa: E402

F64 = torch.float64
TOL = 1e-9

PAPER = """attention paper_small {
    branch cmp = compress(block = 8, stride = 4, pool = mean)
    branch slc = select(block = 8, top_k = 3, score = cmp, keep_first = 1, keep_last = 2)
    branch swa = window(size = 8, sinks = 1)
    output = gate(sigmoid, cmp, slc, swa)
}"""
LEARNED = PAPER.replace("pool = mean", "pool = mlp").replace("paper_small", "learned")
QBLOCK = """attention qblock {
    branch cmp = compress(block = 8, stride = 4)
    branch slc = select(block = 8, top_k = 2, score = cmp, keep_first = 1, keep_last = 0, query_block = 4)
    branch swa = window(size = 6)
    output = sum(cmp, slc, swa)
}"""
DSA = """attention dsa {
    branch idx = indexer(heads = 3, dim = 16)
    branch tok = select(block = 1, top_k = 5, score = idx, keep_first = 1, keep_last = 2)
    branch swa = window(size = 4)
    output = gate(sigmoid, tok, swa)
}"""
NONCAUSAL = """attention enc {
    causal = false
    branch cmp = compress(block = 8, stride = 4)
    branch slc = select(block = 8, top_k = 3, score = cmp, keep_first = 1, keep_last = 1)
    branch swa = window(size = 5, sinks = 2)
    output = gate(sigmoid, cmp, slc, swa)
}"""
MEANPOOL = """attention mp {
    branch slc = select(block = 4, top_k = 2, score = mean_pool, keep_first = 0, keep_last = 1)
    branch swa = window(size = 4)
    output = sum(slc, swa)
}"""
# packed sequences of a 64-row batch: an empty one, ones cut by the chunk boundaries of 2 and of
# 4 ranks (every multiple of 8), ones wholly inside a chunk, one spanning several chunks
CU = [0, 5, 5, 30, 31, 47, 52, 64]

RANK = WORLD = 0
GROUP = None


def rnd(g, *shape, grad=True):
    x = torch.randn(*shape, generator=g, dtype=F64)
    return x.requires_grad_(grad)


def shard(x):
    return cp.shard_sequence(x, world=WORLD, rank=RANK)


def rel(a, b) -> float:
    """max |a - b| / max |b| over finite entries; infinities (lse with no keys) must match exactly."""
    a, b = a.detach(), b.detach()
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)) or not torch.equal(a[~torch.isfinite(b)],
                                                                               b[~torch.isfinite(b)]):
        return float("inf")
    fin = torch.isfinite(b)
    if not fin.any():
        return 0.0
    scale = max(b[fin].abs().max().item(), 1e-6)     # gradients that are 0 in exact arithmetic
    return (a[fin] - b[fin]).abs().max().item() / scale


class Checker:
    """Collects mismatches instead of raising at the first, so every rank runs the same
    collectives to the end of the case."""

    def __init__(self, tol: float = TOL):
        self.err, self.failures, self.tol = 0.0, [], tol

    def near(self, what, got, want):
        if got.shape != want.shape:
            self.failures.append(f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}")
            return
        e = rel(got, want)
        if not e <= self.tol:
            self.failures.append(f"{what}: rel err {e:.2e}")
        elif e > self.err:
            self.err = e

    def same(self, what, got, want):
        if not torch.equal(got, want):
            self.failures.append(f"{what} differ")


def sharded_grads(c: Checker, names, locals_, wholes):
    for n, a, b in zip(names, locals_, wholes):
        c.near(f"grad {n}", a.grad, shard(b.grad))


def plain_vs_cp(c: Checker, spec, B, T, HQ, H, D, Dv, *, cu=None, index=False, return_aux=True, op=None):
    """op-level: every output, aux field and input gradient."""
    g = torch.Generator().manual_seed(1)
    q, k, v = rnd(g, B, T, HQ, D), rnd(g, B, T, H, D), rnd(g, B, T, H, Dv)
    C = len(spec.output.branches)
    gates = rnd(g, B, T, HQ, C) if spec.output.kind == "gate" else None
    do = rnd(g, B, T, HQ, Dv, grad=False)
    whole = [q, k, v] + ([gates] if gates is not None else [])
    names = ["q", "k", "v", "gates"][:len(whole)]
    idx_in = {}
    if index:
        b = spec.of_kind("indexer")[0]
        trip = (rnd(g, B, T, b.heads, b.dim), rnd(g, B, T, b.dim), rnd(g, B, T, b.heads))
        idx_in = {b.name: trip}
        whole += list(trip)
        names += ["q_idx", "k_idx", "w_idx"]
    kw = {} if cu is None else {"cu_seqlens": torch.tensor(cu, dtype=torch.int32)}
    o, aux = nsa_dsl.reference(spec, q, k, v, gates, index=idx_in or None, return_aux=True, **kw)
    loss = (o * do).sum() + sum(x.sum() for x in aux.index_loss.values())
    loss.backward()

    local = [shard(x.detach()).requires_grad_() for x in whole]
    ql, kl, vl = local[:3]
    gl = local[3] if gates is not None else None
    il = {n: tuple(local[-3:]) for n in idx_in}
    out = cp.attention(op or spec, ql, kl, vl, gl, group=GROUP, index=il or None, return_aux=return_aux, **kw)
    ol, al = out if return_aux else (out, None)
    c.near("o", ol, shard(o))
    lloss = (ol * shard(do)).sum()
    if al is not None:
        for fld in ("lse", "outputs", "index_loss", "indices"):
            for n, t in getattr(aux, fld).items():
                got = getattr(al, fld)[n]
                if fld == "indices":
                    c.same(f"aux.indices[{n}]", got, shard(t))
                else:
                    c.near(f"aux.{fld}[{n}]", got, shard(t))
        lloss = lloss + sum(x.sum() for x in al.index_loss.values())
    lloss.backward()
    sharded_grads(c, names, local, whole)


# ------------------------------------------------------------------------------ cases

def case_paper(c):
    plain_vs_cp(c, nsa_dsl.parse(PAPER), 2, 64, 4, 2, 16, 8)


def case_paper_packed(c):
    plain_vs_cp(c, nsa_dsl.parse(PAPER), 1, 64, 4, 2, 16, 8, cu=CU)


def case_noncausal_packed(c):
    plain_vs_cp(c, nsa_dsl.parse(NONCAUSAL), 1, 64, 2, 1, 16, 16, cu=CU)


def case_meanpool(c):
    plain_vs_cp(c, nsa_dsl.parse(MEANPOOL), 1, 64, 3, 1, 16, 8)


def case_qblock(c):
    plain_vs_cp(c, nsa_dsl.parse(QBLOCK), 1, 64, 4, 2, 16, 16)
    # packed: a cut 3 positions into a sequence splits a group of 4 -> E629 on every rank
    spec = nsa_dsl.parse(QBLOCK)
    q = torch.zeros(1, 64 // WORLD, 4, 16, dtype=F64)
    k = torch.zeros(1, 64 // WORLD, 2, 16, dtype=F64)
    try:
        cp.attention(spec, q, k, k, group=GROUP, cu_seqlens=torch.tensor([0, 5, 64], dtype=torch.int32))
    except SpecError as e:
        assert e.code == "E629", e
    else:
        raise AssertionError("a cut inside a query_block group was not refused")


def case_indexer(c):
    plain_vs_cp(c, nsa_dsl.parse(DSA), 1, 64, 4, 2, 16, 16, index=True)


def case_indexer_packed(c):
    plain_vs_cp(c, nsa_dsl.parse(DSA), 1, 64, 4, 1, 16, 16, index=True, cu=CU)


def rotary(q, k, positions):
    """Rotary embedding (half-split), so positions matter: a shard must rotate at its global ones."""
    ang = positions.to(F64)[:, None] * 10000.0 ** (-torch.arange(8, dtype=F64) / 8)
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]

    def rot(x):
        a, b = x[..., :8], x[..., 8:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
    return rot(q), rot(k)


def _layer(spec_text, cp_mesh, **kw):
    torch.manual_seed(3)
    layer = nsa_dsl.SparseAttention(nsa_dsl.parse(spec_text), 32, heads=4, kv_heads=2, qk_dim=16, v_dim=8,
                                    backend="reference", rotary=rotary, cp_mesh=cp_mesh, pool_hidden=24,
                                    dtype=F64, **kw)
    with torch.no_grad():                      # learned pools and gates away from their init
        for p in layer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=F64))
    return layer


def layer_vs_cp(c, spec_text, B, T, cu=None, **kw):
    """module-level: y, dx, aux.index_loss and every parameter gradient (summed over the group);
    the loss adds the index losses (an indexer trains through them)."""
    single, sharded = _layer(spec_text, None, **kw), _layer(spec_text, GROUP, **kw)
    g = torch.Generator().manual_seed(2)
    x = rnd(g, B, T, 32)
    dy = rnd(g, B, T, 32, grad=False)
    pk = {} if cu is None else {"cu_seqlens": torch.tensor(cu, dtype=torch.int32)}
    y, aux = single(x, return_aux=True, **pk)
    ((y * dy).sum() + sum(x.sum() for x in aux.index_loss.values())).backward()
    xl = shard(x.detach()).requires_grad_()
    yl, al = sharded(xl, return_aux=True, **pk)
    c.near("y", yl, shard(y))
    for n, t in aux.index_loss.items():
        c.near(f"index_loss[{n}]", al.index_loss[n], shard(t))
    ((yl * shard(dy)).sum() + sum(x.sum() for x in al.index_loss.values())).backward()
    c.near("dx", xl.grad, shard(x.grad))
    cp.all_reduce_gradients(sharded, GROUP, average=False)
    for (n, a), (_, b) in zip(sharded.named_parameters(), single.named_parameters()):
        c.near(f"d {n}", a.grad, b.grad)


def case_layer_learned(c):
    layer_vs_cp(c, LEARNED, 2, 64)


def case_layer_learned_packed(c):
    layer_vs_cp(c, LEARNED, 1, 64, cu=CU)


def case_layer_separate_kv(c):
    layer_vs_cp(c, PAPER, 1, 64, separate_kv=True)


def case_layer_indexer_packed(c):
    layer_vs_cp(c, DSA, 1, 64, cu=CU, index_rotary=True)


def case_op_learned(c):
    """op-level learned pooling: the caller pools the gathered keys; the pool's gradient is summed."""
    from nsa_dsl.runtime.module import LearnedPool
    spec = nsa_dsl.parse(LEARNED)
    pools = []
    for _ in range(2):
        torch.manual_seed(4)
        pools.append([LearnedPool("mlp", 8, 4, d, 24, dtype=F64) for d in (16, 8)])
    g = torch.Generator().manual_seed(5)
    q, k, v, gates = rnd(g, 1, 64, 4, 16), rnd(g, 1, 64, 2, 16), rnd(g, 1, 64, 2, 8), rnd(g, 1, 64, 4, 3)
    do = rnd(g, 1, 64, 4, 8, grad=False)
    kp, vp = pools[0]
    o = nsa_dsl.reference(spec, q, k, v, gates, compressed={"cmp": (kp(k), vp(v))})
    (o * do).sum().backward()
    local = [shard(x.detach()).requires_grad_() for x in (q, k, v, gates)]
    kp2, vp2 = pools[1]
    k_all, v_all = cp.gather_sequence(local[1], GROUP), cp.gather_sequence(local[2], GROUP)
    ol = cp.attention(spec, *local, group=GROUP, compressed={"cmp": (kp2(k_all), vp2(v_all))})
    c.near("o", ol, shard(o))
    (ol * shard(do)).sum().backward()
    sharded_grads(c, "q k v gates".split(), local, [q, k, v, gates])
    for m2, m in ((kp2, kp), (vp2, vp)):
        cp.all_reduce_gradients(m2, GROUP, average=False)
        for a, b in zip(m2.parameters(), m.parameters()):
            c.near("d pool", a.grad, b.grad)


KERNEL_SPEC = """attention tiny {
    branch cmp = compress(block = 16, stride = 8)
    branch slc = select(block = 16, top_k = 3, score = cmp, keep_first = 1, keep_last = 1)
    branch swa = window(size = 16, sinks = 2)
    output = gate(sigmoid, cmp, slc, swa)
}"""


def case_kernels(c):
    """The compiled op (Triton's interpreter, float32) under CP, plain and packed, and a DSA spec
    (the indexer's kernels on query pieces): its rows and gradients against the float64 reference
    on the whole sequence (fp32 tolerance)."""
    c.tol = 2e-5
    spec = nsa_dsl.parse(KERNEL_SPEC)
    op = nsa_dsl.compile(spec)
    for cu in (None, [0, 20, 64]):
        g = torch.Generator().manual_seed(9)
        whole = [rnd(g, 1, 64, h, d) for h, d in ((4, 16), (2, 16), (2, 16), (4, 3))]
        do = rnd(g, 1, 64, 4, 16, grad=False)
        kw = {} if cu is None else {"cu_seqlens": torch.tensor(cu, dtype=torch.int32)}
        o = nsa_dsl.reference(spec, *whole, **kw)
        (o * do).sum().backward()
        local = [shard(x.detach()).float().requires_grad_() for x in whole]
        ol = op(*local, cp_group=GROUP, **kw)
        c.near(f"o {cu}", ol.double(), shard(o))
        (ol * shard(do).float()).sum().backward()
        for n, a, b in zip("q k v gates".split(), local, whole):
            c.near(f"grad {n} {cu}", a.grad.double(), shard(b.grad))
    # an indexer-scored branch (DSA): the tokens, the index loss and the indexer's gradients too
    spec = nsa_dsl.parse(DSA)
    op = nsa_dsl.compile(spec)
    g = torch.Generator().manual_seed(3)
    whole = [rnd(g, 1, 64, h, d) for h, d in ((4, 16), (2, 16), (2, 16), (4, 2), (3, 16))]
    whole += [rnd(g, 1, 64, 16), rnd(g, 1, 64, 3)]
    do = rnd(g, 1, 64, 4, 16, grad=False)
    o, aux = nsa_dsl.reference(spec, *whole[:4], index={"idx": tuple(whole[4:])}, return_aux=True)
    ((o * do).sum() + aux.index_loss["tok"].sum()).backward()
    local = [shard(x.detach()).float().requires_grad_() for x in whole]
    ol, al = op(*local[:4], index={"idx": tuple(local[4:])}, return_aux=True, cp_group=GROUP)
    c.near("o dsa", ol.double(), shard(o))
    c.same("aux.indices[tok] dsa", al.indices["tok"], shard(aux.indices["tok"]))
    c.near("aux.index_loss[tok] dsa", al.index_loss["tok"].double(), shard(aux.index_loss["tok"]))
    ((ol * shard(do).float()).sum() + al.index_loss["tok"].sum()).backward()
    for n, a, b in zip("q k v gates q_idx k_idx w_idx".split(), local, whole):
        c.near(f"grad {n} dsa", a.grad.double(), shard(b.grad))


def case_stats(c):
    """The bytes gather_sequence moved equal explain's accounting (forward and backward)."""
    from nsa_dsl.language.cost import Dims
    from nsa_dsl.tools.explain import cp_cost
    spec = nsa_dsl.parse(PAPER)
    layer = _layer(PAPER, GROUP)
    x = torch.randn(1, 64 // WORLD, 32, dtype=F64, requires_grad=True)
    cp.STATS.reset()
    layer(x).sum().backward()
    want = cp_cost(spec, 64, WORLD, Dims(4, 2, 16, 8, 8))
    assert (cp.STATS.gathered, cp.STATS.scattered) == (want.gather, want.scatter), \
        (cp.STATS, want.gather, want.scatter)
    assert cp.STATS.calls == 2


def case_refusals(c):
    spec = nsa_dsl.parse(PAPER)
    q = torch.zeros(1, 7, 4, 16, dtype=F64)
    for call, code in ((lambda: cp.attention(spec, q, q[:, :, :2], q[:, :, :2], group=GROUP), "E651"),
                       (lambda: cp.attention(lambda *a, **k: None, q, q, q, group=GROUP), "E600"),
                       (lambda: cp.attention(spec, q, q, q, group="cp"), "E650")):
        try:
            call()
        except SpecError as e:
            assert e.code == code, (code, e)
        else:
            raise AssertionError(f"no {code}")


def case_compile(c):
    """torch.compile of the context-parallel layer: the same output and gradients as eager."""
    import torch._dynamo
    torch._dynamo.reset()
    from torch._dynamo.backends.common import aot_autograd
    graphs = {"fw": [], "bw": []}

    def record(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(str(gm.graph))
            return gm.forward
        return compiler
    eager, comp = _layer(PAPER, GROUP), _layer(PAPER, GROUP)
    fn = torch.compile(comp, backend=aot_autograd(fw_compiler=record("fw"), bw_compiler=record("bw")))
    g = torch.Generator().manual_seed(6)
    x = rnd(g, 1, 64 // WORLD, 32, grad=False)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = eager(xa), fn(xb)
    c.near("y", yb, ya)
    ya.square().sum().backward()
    yb.square().sum().backward()
    c.near("dx", xb.grad, xa.grad)
    for (n, a), (_, b) in zip(comp.named_parameters(), eager.named_parameters()):
        c.near(f"d {n}", a.grad, b.grad)
    # the gathers and their reduce-scatters are in the traced graphs (not graph breaks)
    if not any("all_gather_into_tensor" in g for g in graphs["fw"]):
        c.failures.append("no all-gather in the compiled forward graphs")
    if not any("reduce_scatter_tensor" in g for g in graphs["bw"]):
        c.failures.append("no reduce-scatter in the compiled backward graphs")


def case_fsdp_mesh(c):
    """2 x 2 mesh: FSDP2 over the flattened data x context mesh, context parallel over "cp";
    the gradients equal one process on the whole batch (loss: the mean over every token)."""
    from torch.distributed.device_mesh import init_device_mesh
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    assert WORLD == 4
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    dp, cpr = mesh["dp"].get_local_rank(), mesh["cp"].get_local_rank()

    def model(cp_mesh):
        torch.manual_seed(7)
        return torch.nn.Sequential(_layer(LEARNED, cp_mesh), torch.nn.Linear(32, 32, dtype=F64))
    single, sharded = model(None), model(mesh["cp"])
    fully_shard(sharded[0], mesh=mesh["dp", "cp"]._flatten("dp_cp"))
    fully_shard(sharded, mesh=mesh["dp", "cp"]._flatten("dp_cp"))
    g = torch.Generator().manual_seed(8)
    x, w = rnd(g, 2, 64, 32, grad=False), rnd(g, 2, 64, 32, grad=False)
    (single(x) * w).mean().backward()
    xl = cp.shard_sequence(x[dp:dp + 1], mesh["cp"])
    wl = cp.shard_sequence(w[dp:dp + 1], mesh["cp"])
    (sharded(xl) * wl).mean().backward()        # FSDP averages over the 4 ranks: the global mean
    for (n, a), (_, b) in zip(sharded.named_parameters(), single.named_parameters()):
        c.near(f"d {n}", a.grad.full_tensor(), b.grad)
    del cpr


CASES = {n[5:]: f for n, f in globals().items() if n.startswith("case_")}


def main():
    global RANK, WORLD, GROUP
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    RANK, WORLD, GROUP = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    torch.set_num_threads(1)
    status = 0
    for name in args.cases.split(","):
        c = Checker()
        try:
            CASES[name](c)
            if c.failures:
                raise AssertionError("; ".join(c.failures[:4]) + (" ..." if len(c.failures) > 4 else ""))
            ok, why = 1.0, f"{c.err:.1e}"
        except Exception as e:  # noqa: BLE001  (reported, then every rank goes on)
            ok, why = 0.0, f"rank {RANK}: {type(e).__name__}: {e}".replace("\n", " | ")
            traceback.print_exc()
        flag = torch.tensor([ok])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if RANK == 0 or ok == 0:
            print(f"CP {name} {'PASS' if flag.item() == 1 else 'FAIL'} {why}", flush=True)
        status |= flag.item() != 1
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(int(status))


if __name__ == "__main__":
    main()
