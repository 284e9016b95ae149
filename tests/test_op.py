"""The compiled op end to end (through the interpreter on CPU): every branch kind and combinator,
outputs, selected blocks and gradients against the float64 reference; input errors."""
import math
import random

import pytest
import torch

import nsa_dsl
from nsa_dsl import SpecError

from kernel_utils import assert_selections

CPU = not torch.cuda.is_available()
DEVICE = "cpu" if CPU else "cuda"


def spec_text(branches, output, name="t"):
    lines = [f"attention {name} {{"]
    lines += [f"    branch {b}" for b in branches]
    lines.append(f"    output = {output}")
    lines.append("}")
    return "\n".join(lines)


PAPER = spec_text(["cmp = compress(block = 32, stride = 16)",
                   "slc = select(block = 64, top_k = 4, score = cmp, keep_first = 1, keep_last = 2)",
                   "swa = window(size = 64)"], "gate(sigmoid, cmp, slc, swa)")
SPECS = {
    "paper": PAPER,
    "l_eq_d-sum": spec_text(["cmp = compress(block = 16, stride = 16)",
                             "slc = select(block = 16, top_k = 3, score = cmp, keep_first = 0, keep_last = 1)"],
                            "sum(cmp, slc)"),
    "moba-gate": spec_text(["slc = select(block = 32, top_k = 2, score = mean_pool, keep_first = 0, keep_last = 1)",
                            "swa = window(size = 16, sinks = 4)"], "gate(sigmoid, slc, swa)"),
    "sinks-only": spec_text(["swa = window(size = 7, sinks = 2)"], "swa"),
    "score-source-only": spec_text(["cmp = compress(block = 32, stride = 8)",
                                    "slc = select(block = 32, top_k = 2, score = cmp, keep_first = 1, keep_last = 1)"],
                                   "slc"),
}

SHAPES = [  # (B, T, HQ, H, Dqk, Dv)
    pytest.param((1, 1, 3, 1, 32, 16), id="B1-T1-H1-G3"),
    pytest.param((2, 15, 4, 4, 16, 32), id="B2-T15-H4-G1"),
    pytest.param((1, 100, 16, 1, 32, 16), id="B1-T100-H1-G16"),
    pytest.param((1, 300, 8, 2, 16, 16), id="B1-T300-H2-G4"),
]


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    n = b.norm()
    return float((a - b).norm() / n) if n > 0 else float((a - b).norm())


def make_inputs(spec, B, T, HQ, H, Dqk, Dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    def r(*s):
        return torch.randn(*s, generator=g).to(DEVICE, dtype)
    q, k, v = r(B, T, HQ, Dqk), r(B, T, H, Dqk), r(B, T, H, Dv)
    C = len(spec.output.branches)
    gates = torch.rand(B, T, HQ, C, generator=g).to(DEVICE, dtype) if spec.output.kind == "gate" else None
    return q, k, v, gates


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("which", list(SPECS))
def test_forward_backward_match_reference(which, shape, tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    B, T, HQ, H, Dqk, Dv = shape
    spec = nsa_dsl.parse(SPECS[which])
    op = nsa_dsl.compile(spec)
    q, k, v, gates = make_inputs(spec, B, T, HQ, H, Dqk, Dv)
    leaves = [x.requires_grad_() for x in (q, k, v, gates) if x is not None]
    o, aux = op(q, k, v, gates, return_aux=True)
    assert o.shape == (B, T, HQ, Dv) and not o.isnan().any()

    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    q64, k64, v64 = leaves64[:3]
    g64 = leaves64[3] if gates is not None else None
    assert_selections(spec, aux.indices, q, k)      # near ties: rounding may pick either block
    o_ref = nsa_dsl.reference(spec, q64, k64, v64, g64, indices={n: i.long() for n, i in aux.indices.items()})
    assert rel(o, o_ref) < 1e-5

    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, o.dtype)
    grads = torch.autograd.grad(o, leaves, do)
    grads_ref = torch.autograd.grad(o_ref, leaves64, do.double())
    for name, a, b in zip(("q", "k", "v", "gates"), grads, grads_ref):
        assert torch.isfinite(a).all(), name
        assert rel(a, b) < 1e-5, name


@pytest.mark.parametrize("shape", SHAPES[:-1] + [pytest.param(*SHAPES[-1].values, id=SHAPES[-1].id,
                                                                marks=pytest.mark.slow)])
@pytest.mark.parametrize("which", list(SPECS))
def test_training_call_is_one_autograd_node(which, shape, tmp_path, monkeypatch):
    """A training call without aux runs the whole op as one autograd node (kernel_ops.attention):
    the combination's backward hands each branch its delta and the branches add their gradient
    of q inside their dq kernels. Output bit for bit the per-branch nodes'; gradients the
    reference's and the per-branch nodes' (outputs start NaN-filled, see conftest)."""
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    B, T, HQ, H, Dqk, Dv = shape
    spec = nsa_dsl.parse(SPECS[which])
    op = nsa_dsl.compile(spec)
    q, k, v, gates = make_inputs(spec, B, T, HQ, H, Dqk, Dv, seed=5)
    leaves = [x.requires_grad_() for x in (q, k, v, gates) if x is not None]
    do = torch.randn(B, T, HQ, Dv, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    o = op(q, k, v, gates)
    assert "attention" in o.grad_fn.name()
    grads = torch.autograd.grad(o, leaves, do)
    op.fuse_backward = False
    o_apart = op(q, k, v, gates)
    assert "attention" not in o_apart.grad_fn.name() and torch.equal(o, o_apart)
    grads_apart = torch.autograd.grad(o_apart, leaves, do)
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    g64 = leaves64[3] if gates is not None else None
    o_ref = nsa_dsl.reference(spec, *leaves64[:3], g64)
    grads_ref = torch.autograd.grad(o_ref, leaves64, do.double())
    for name, a, b, r in zip(("q", "k", "v", "gates"), grads, grads_apart, grads_ref):
        assert torch.isfinite(a).all(), name
        scale = max(float(r.norm()), 1.0)          # dq, dk are exactly 0 at T = 1: rounding noise
        assert rel(a, r) < 1e-5 and float((a - b).double().norm()) < 1e-5 * scale, name


def test_branch_backward_takes_delta_and_adds_into_dq(tmp_path, monkeypatch):
    """Each branch backward launcher: delta= (rowsum(o * do), as the combination's backward
    gives it) changes nothing; dq_acc= adds the branch's dq into the given tensor, in place; the
    combination's folded backward gives each branch the gradients of its gated output."""
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    spec = nsa_dsl.parse(PAPER)
    op = nsa_dsl.compile(spec)
    B, T, HQ, H, D = 1, 150, 8, 2, 16
    q, k, v, gates = make_inputs(spec, B, T, HQ, H, D, D, seed=7)
    plan, keys = op._kernels(op.binding(heads=HQ, kv_heads=H, qk_dim=D, v_dim=D))
    mod = {n: nsa_dsl.runtime.kernel_ops.module(key) for n, key in keys.items()}
    g = torch.Generator().manual_seed(8)
    do = torch.randn(B, T, HQ, D, generator=g).to(DEVICE)
    acc = torch.randn(B, T, HQ, D, generator=g).to(DEVICE)
    kc, vc = nsa_dsl.runtime.op.mean_pool(k, 32, 16), nsa_dsl.runtime.op.mean_pool(v, 32, 16)
    o_c, lse_c = mod["compress_cmp"].fwd(q, kc, vc, D ** -0.5)
    idx = mod["topk_slc"].topk(q, kc, lse_c, D ** -0.5)
    o_s, lse_s = mod["select_slc"].fwd(q, k, v, idx, D ** -0.5)
    o_w, lse_w = mod["window_swa"].fwd(q, k, v, D ** -0.5)
    calls = {"compress_cmp": (lambda **kw: mod["compress_cmp"].bwd(q, kc, vc, o_c, lse_c, do, D ** -0.5, **kw), o_c),
             "select_slc": (lambda **kw: mod["select_slc"].bwd(q, k, v, idx, o_s, lse_s, do, D ** -0.5, **kw), o_s),
             "window_swa": (lambda **kw: mod["window_swa"].bwd(q, k, v, o_w, lse_w, do, D ** -0.5, **kw), o_w)}
    for name, (bwd, o) in calls.items():
        plain = bwd()
        delta = (o.double() * do.double()).sum(-1).float()
        given = bwd(delta=delta)
        for a, b in zip(given, plain):
            assert rel(a, b) < 1e-6, name
        into = acc.clone()
        added = bwd(dq_acc=into)
        assert added[0] is into, name
        assert rel(into, acc + plain[0]) < 1e-6, name
        for a, b in zip(added[1:], plain[1:]):
            assert torch.equal(a, b), name
    # the gates folded into each branch's lse and delta: the branch backward on do itself gives
    # the gradients of d o_c = g_c * do; rows whose gate underflows to 0 (logit -200) get none
    combine = mod["combine"]
    outs, lses = [o_c, o_s, o_w], [lse_c, lse_s, lse_w]
    gates = gates.clone()
    gates[:, 7::11, 1::3] = -200.0
    d_outs, d_gates = combine.bwd(outs, gates, do)
    f_gates, f_lses, f_deltas = combine.bwd_folded(outs, lses, gates, do)
    assert torch.equal(f_gates, d_gates)
    assert bool((f_lses[0] == float("inf")).any())
    args = {"compress_cmp": (q, kc, vc), "select_slc": (q, k, v, idx), "window_swa": (q, k, v)}
    for c, (name, a) in enumerate(args.items()):
        unfolded = mod[name].bwd(*a, outs[c], lses[c], d_outs[c], D ** -0.5)
        folded = mod[name].bwd(*a, outs[c], f_lses[c], do, D ** -0.5, delta=f_deltas[c])
        for x, y in zip(folded, unfolded):
            assert not x.isnan().any(), name
            assert rel(x, y) < 1e-5, name


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("which", list(SPECS))
def test_inference_output_fused_in_window_kernel(which, shape, tmp_path, monkeypatch):
    """Without gradients the window kernel combines the output in its epilogue (where the output
    holds the one window branch): the same tensor, bit for bit, as the combine kernel's, and the
    reference's; with gradients the ops stay apart."""
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    B, T, HQ, H, Dqk, Dv = shape
    spec = nsa_dsl.parse(SPECS[which])
    op = nsa_dsl.compile(spec)
    q, k, v, gates = make_inputs(spec, B, T, HQ, H, Dqk, Dv, seed=3)
    has_window = any(b in [w.name for w in spec.of_kind("window")] for b in spec.output.branches)
    calls = []
    real = nsa_dsl.runtime.kernel_ops.window_combine_fwd
    monkeypatch.setattr(nsa_dsl.runtime.kernel_ops, "window_combine_fwd", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fused = op(q, k, v, gates)
        assert len(calls) == (1 if has_window else 0)
        op.fuse_output = False
        apart = op(q, k, v, gates)
        assert len(calls) == (1 if has_window else 0)
    assert torch.equal(fused, apart)
    ref = nsa_dsl.reference(spec, q.double(), k.double(), v.double(),
                            None if gates is None else gates.double())
    assert rel(fused, ref) < 1e-5
    op.fuse_output = True
    q.requires_grad_()
    o = op(q, k, v, gates)                       # a gradient is needed: window_fwd + combine_fwd
    assert len(calls) == (1 if has_window else 0) and o.requires_grad and torch.equal(o.detach(), apart)


def test_per_branch_keys_and_caller_compressed(tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    spec = nsa_dsl.parse(PAPER.replace("stride = 16)", "stride = 16, pool = mlp)"))
    B, T, HQ, H, Dqk, Dv = 1, 70, 4, 2, 16, 32
    g = torch.Generator().manual_seed(3)
    def r(*s):
        return torch.randn(*s, generator=g).to(DEVICE).requires_grad_()
    Nc = (T - 32) // 16 + 1
    q = r(B, T, HQ, Dqk)
    ks = {"slc": r(B, T, H, Dqk), "swa": r(B, T, H, Dqk)}
    vs = {"slc": r(B, T, H, Dv), "swa": r(B, T, H, Dv)}
    comp = {"cmp": (r(B, Nc, H, Dqk), r(B, Nc, H, Dv))}
    gates = torch.rand(B, T, HQ, 3, generator=g).to(DEVICE).requires_grad_()
    op = nsa_dsl.compile(spec)
    o = op(q, ks, vs, gates, compressed=comp)
    leaves = [q, *ks.values(), *vs.values(), *comp["cmp"], gates]
    c64 = lambda x: x.detach().double().requires_grad_()
    L = [c64(x) for x in leaves]
    o_ref = nsa_dsl.reference(spec, L[0], {"slc": L[1], "swa": L[2]}, {"slc": L[3], "swa": L[4]}, L[7],
                              compressed={"cmp": (L[5], L[6])})
    assert rel(o, o_ref) < 1e-5
    do = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad(o, leaves, do), torch.autograd.grad(o_ref, L, do.double())):
        assert rel(a, b) < 1e-5


# -- input errors say expected versus actual --------------------------------------------------

@pytest.fixture
def paper_op(tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    return nsa_dsl.compile(nsa_dsl.parse(PAPER))


def test_wrong_shapes_dtypes_and_missing_args(paper_op):
    spec = paper_op.spec
    q, k, v, gates = make_inputs(spec, 1, 20, 4, 2, 16, 16)
    cases = [
        (lambda: paper_op(q, k[:, :10], v, gates), "E601", "expected [1, 20, *, 16]"),
        (lambda: paper_op(q, k, v.half(), gates), "E606", "dtype"),
        (lambda: paper_op(q, k, v, None), "E609", "needs gate logits"),
        (lambda: paper_op(q, k, v, gates[..., :2]), "E601", "expected [1, 20, 4, 3]"),
        (lambda: paper_op(q.int(), k, v, gates), "E606", "dtype"),
        (lambda: paper_op(q[0], k, v, gates), "E601", "4-D"),
        (lambda: paper_op(q, {"nope": k}, v, gates), "E608", "unknown branches"),
        (lambda: paper_op(torch.randn(1, 20, 5, 16), k, v.float(), gates), "E603", "multiple of kv heads"),
        (lambda: paper_op(q, k, v, gates, scale=0.0), "E618", "finite number > 0"),
        (lambda: paper_op(q, k, v, gates, scale=-0.25), "E618", "got -0.25"),
        (lambda: paper_op(q, k, v, gates, scale=float("nan")), "E618", None),
    ]
    for call, code, text in cases:
        with pytest.raises(SpecError) as e:
            call()
        assert e.value.code == code, (code, str(e.value))
        if text:
            assert text in str(e.value)


def test_declared_fields_are_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    spec = nsa_dsl.parse(PAPER.replace("{", "{\n    heads = 8\n    qk_dim = 32", 1))
    q, k, v, gates = make_inputs(spec, 1, 8, 4, 1, 16, 16)
    with pytest.raises(SpecError) as e:
        nsa_dsl.compile(spec)(q, k, v, gates)
    assert e.value.code == "E602" and "heads = 8" in str(e.value)


def test_learned_pool_needs_compressed(tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    spec = nsa_dsl.parse(PAPER.replace("stride = 16)", "stride = 16, pool = linear)"))
    q, k, v, gates = make_inputs(spec, 1, 8, 4, 1, 16, 16)
    with pytest.raises(SpecError) as e:
        nsa_dsl.compile(spec)(q, k, v, gates)
    assert e.value.code == "E611" and "compressed=" in str(e.value)


def test_non_contiguous_inputs_are_fine(paper_op):
    q, k, v, gates = make_inputs(paper_op.spec, 1, 33, 4, 2, 16, 16)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)   # strided T and head dims
    kd = torch.cat([k, k], -1)[..., ::2]                    # non-unit last stride
    o1 = paper_op(qt, k, v, gates)
    o2 = paper_op(q, kd.contiguous(), v, gates)
    o3 = paper_op(q, kd, v, gates)
    assert rel(o1, paper_op(q, k, v, gates)) < 1e-6
    assert rel(o2, o3) < 1e-6


# -- on the GPU: bf16 / fp16 against float64, tolerance relative to the reference's own error ---

@pytest.mark.gpu
@pytest.mark.skipif(CPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("which", ["paper", "moba-gate", "l_eq_d-sum"])
@pytest.mark.parametrize("shape", [pytest.param((1, 2048, 16, 1, 128, 128), id="B1-T2048-H1-G16-D128"),
                                   pytest.param((2, 1000, 12, 4, 64, 32), id="B2-T1000-H4-G3-D64")])
def test_gpu_low_precision_matches_reference(which, shape, dtype, tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    B, T, HQ, H, Dqk, Dv = shape
    spec = nsa_dsl.parse(SPECS[which])
    op = nsa_dsl.compile(spec)
    q, k, v, gates = make_inputs(spec, B, T, HQ, H, Dqk, Dv, dtype=dtype)
    leaves = [x.requires_grad_() for x in (q, k, v, gates) if x is not None]
    o, aux = op(q, k, v, gates, return_aux=True)
    sel = {n: i.long() for n, i in aux.indices.items()}   # near-ties flip in low precision

    def ref_run(xs, dt):
        ys = [x.detach().to(dt).requires_grad_() for x in xs]
        g = ys[3] if gates is not None else None
        return ys, nsa_dsl.reference(spec, ys[0], ys[1], ys[2], g, indices=sel)
    L64, o64 = ref_run(leaves, torch.float64)
    Llp, olp = ref_run(leaves, dtype)
    do = torch.randn_like(o)
    g_k = torch.autograd.grad(o, leaves, do)
    g64 = torch.autograd.grad(o64, L64, do.double())
    glp = torch.autograd.grad(olp, Llp, do)
    assert rel(o, o64) <= max(5e-3, 2 * rel(olp, o64))
    for name, a, b, c in zip("q k v gates".split(), g_k, g64, glp):
        assert rel(a, b) <= max(5e-3, 2 * rel(c, b)), name
    o_one = op(q, k, v, gates)                # without aux: the whole op as one autograd node
    assert "attention" in o_one.grad_fn.name() and torch.equal(o_one, o)
    for name, a, b, c in zip("q k v gates".split(), torch.autograd.grad(o_one, leaves, do), g64, glp):
        assert rel(a, b) <= max(5e-3, 2 * rel(c, b)), name


@pytest.mark.parametrize("T, block, stride", [(100, 32, 16), (32, 32, 16), (257, 48, 16), (64, 16, 16),
                                              (200, 32, 8), (90, 24, 16), (77, 20, 8)])
def test_mean_pool_by_segments(T, block, stride):
    """The op's mean pooling (segment sums when stride | block, else unfold) equals the reference
    pooling in float64, with its gradient, and rounds bf16 alike."""
    from nsa_dsl.runtime.op import mean_pool
    from nsa_dsl.semantics.reference import mean_pool as ref
    k = torch.randn(2, T, 3, 8, dtype=torch.float64, requires_grad=True)
    a, b = mean_pool(k, block, stride), ref(k, block, stride)
    assert a.shape == b.shape and rel(a, b) < 1e-14
    g = torch.randn_like(b)
    assert rel(torch.autograd.grad(a, k, g)[0], torch.autograd.grad(b, k, g)[0]) < 1e-14
    kb = k.detach().bfloat16()
    assert rel(mean_pool(kb, block, stride), ref(kb, block, stride)) < 1e-2
