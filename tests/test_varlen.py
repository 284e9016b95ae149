"""Packed variable-length sequences (``cu_seqlens``): the op, the kernels, the reference and the module.

A packed batch must give exactly what running each sequence alone gives: outputs, selected
blocks (per-sequence block numbers) and every gradient (q, k, v, gates, compressed keys),
through the op (float32, 1e-5) and against the float64 reference. Packings hold empty
sequences, length-1 sequences, sequences shorter than every block and odd lengths (15, 100,
37). Launchers NaN-fill their outputs (conftest), so an unwritten row fails. On the CPU the
kernels run through Triton's interpreter.
"""
import random

import pytest
import torch

import nsa_dsl
from kernel_utils import assert_selections, load_family, rel_err
from nsa_dsl import SpecError
from nsa_dsl.semantics.varlen import compressed_cu_seqlens, positions
from test_kernels_select import random_idx
from test_op import SPECS, spec_text

CPU = not torch.cuda.is_available()
DEVICE = "cpu" if CPU else "cuda"


def cu_of(lens, device=DEVICE, dtype=torch.int32):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=dtype, device=device)


def random_lens(seed, n_extra=2, longest=100):
    """A shuffled packing with the awkward cases (empty, one token, shorter than every block,
    15, 37) and a few random lengths up to ``longest``."""
    rng = random.Random(seed)
    lens = [0, 1, 5, 15, 37] + [rng.randint(2, longest) for _ in range(n_extra)]
    rng.shuffle(lens)
    return lens


def inputs(spec, T, HQ, H, Dqk, Dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    def r(*s):
        return torch.randn(*s, generator=g).to(DEVICE, dtype)
    q, k, v = r(1, T, HQ, Dqk), r(1, T, H, Dqk), r(1, T, H, Dv)
    C = len(spec.output.branches)
    gates = torch.rand(1, T, HQ, C, generator=g).to(DEVICE, dtype) if spec.output.kind == "gate" else None
    return q, k, v, gates


def rows(x, a, b):
    return None if x is None else x[:, a:b]


# (spec, HQ, H, Dqk, Dv, lens): every branch kind, both scores, gate / sum / single outputs, G = 1, 3, 16
CASES = [
    pytest.param("paper", 2, 2, 16, 32, [15, 100, 0, 37, 1], id="paper-G1"),
    pytest.param("paper", 3, 1, 32, 16, random_lens(1), id="paper-G3-random"),
    pytest.param("paper", 16, 1, 16, 16, [37, 0, 1, 70], id="paper-G16"),
    pytest.param("l_eq_d-sum", 6, 2, 16, 16, [15, 100, 0, 37, 1], id="sum-cmp-G3"),
    pytest.param("moba-gate", 2, 2, 16, 16, random_lens(2), id="meanpool-sinks-G1-random"),
    pytest.param("moba-gate", 16, 1, 16, 16, [15, 70, 0, 37, 1], id="meanpool-sinks-G16"),
    pytest.param("sinks-only", 3, 1, 16, 32, [1, 100, 0, 3, 37], id="window-sinks-G3"),
]


@pytest.mark.parametrize("which, HQ, H, Dqk, Dv, lens", CASES)
def test_packed_equals_each_sequence_alone(which, HQ, H, Dqk, Dv, lens, tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    spec = nsa_dsl.parse(SPECS[which])
    op = nsa_dsl.compile(spec)
    cu = cu_of(lens)
    T = int(cu[-1])
    q, k, v, gates = inputs(spec, T, HQ, H, Dqk, Dv)
    leaves = [x.requires_grad_() for x in (q, k, v, gates) if x is not None]
    o, aux = op(q, k, v, gates, cu_seqlens=cu, return_aux=True)
    assert o.shape == (1, T, HQ, Dv) and torch.isfinite(o).all()
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = torch.autograd.grad(o, leaves, do)
    for name, gr in zip("q k v gates".split(), grads):
        assert torch.isfinite(gr).all(), name

    # the float64 reference on the packed batch (it runs each sequence alone)
    L64 = [x.detach().double().requires_grad_() for x in leaves]
    g64 = L64[3] if gates is not None else None
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):     # near ties: rounding may pick either block
        if a < b:
            assert_selections(spec, {n: i[:, a:b] for n, i in aux.indices.items()}, q[:, a:b], k[:, a:b])
    o_ref = nsa_dsl.reference(spec, L64[0], L64[1], L64[2], g64, cu_seqlens=cu,
                              indices={n: i.long() for n, i in aux.indices.items()})
    assert rel_err(o, o_ref) < 1e-5
    for name, a, b in zip("q k v gates".split(), grads, torch.autograd.grad(o_ref, L64, do.double())):
        assert rel_err(a, b) < 1e-5, name

    # the op on each sequence alone
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if a == b:
            continue
        o1, aux1 = op(q[:, a:b], k[:, a:b], v[:, a:b], rows(gates, a, b), return_aux=True)
        assert rel_err(o[:, a:b], o1) < 1e-5, s
        for name, idx in aux1.indices.items():   # per-sequence block numbers
            assert torch.equal(aux.indices[name][:, a:b], idx), (s, name)
        for name in aux1.lse:
            assert rel_err(aux.lse[name][:, a:b], aux1.lse[name]) < 1e-5, (s, name)
        for name, ga, gb in zip("q k v gates".split(), grads, torch.autograd.grad(o1, leaves, do[:, a:b])):
            assert rel_err(ga[:, a:b], gb[:, a:b]) < 1e-5, (s, name)


def test_caller_compressed_and_per_branch_keys(tmp_path, monkeypatch):
    """Learned pooling (pool = mlp): packed k_cmp / v_cmp [1, sum Nc_s, H, D] get the gradients of
    each sequence's own compressed blocks; per-branch keys and values."""
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    spec = nsa_dsl.parse(SPECS["paper"].replace("stride = 16)", "stride = 16, pool = mlp)"))
    HQ, H, Dqk, Dv = 6, 2, 16, 32
    lens = [70, 0, 31, 1, 100]
    cu = cu_of(lens)
    ccu = compressed_cu_seqlens(cu, 32, 16)
    assert ccu.tolist() == [0, 3, 3, 3, 3, 8] and ccu.dtype == cu.dtype
    assert compressed_cu_seqlens(cu.tolist(), 32, 16) == ccu.tolist()
    T, NC = int(cu[-1]), int(ccu[-1])
    g = torch.Generator().manual_seed(3)
    def r(*s):
        return torch.randn(*s, generator=g).to(DEVICE).requires_grad_()
    q = r(1, T, HQ, Dqk)
    ks = {"slc": r(1, T, H, Dqk), "swa": r(1, T, H, Dqk)}
    vs = {"slc": r(1, T, H, Dv), "swa": r(1, T, H, Dv)}
    k_c, v_c = r(1, NC, H, Dqk), r(1, NC, H, Dv)
    gates = torch.rand(1, T, HQ, 3, generator=g).to(DEVICE).requires_grad_()
    op = nsa_dsl.compile(spec)
    o = op(q, ks, vs, gates, compressed={"cmp": (k_c, v_c)}, cu_seqlens=cu)
    leaves = [q, *ks.values(), *vs.values(), k_c, v_c, gates]
    do = torch.randn(o.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad(o, leaves, do)
    names = ["q", "k_slc", "k_swa", "v_slc", "v_swa", "k_cmp", "v_cmp", "gates"]

    L = [x.detach().double().requires_grad_() for x in leaves]
    o_ref = nsa_dsl.reference(spec, L[0], {"slc": L[1], "swa": L[2]}, {"slc": L[3], "swa": L[4]}, L[7],
                              compressed={"cmp": (L[5], L[6])}, cu_seqlens=cu)
    assert rel_err(o, o_ref) < 1e-5
    for name, a, b in zip(names, grads, torch.autograd.grad(o_ref, L, do.double())):
        assert rel_err(a, b) < 1e-5, name

    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if a == b:
            continue
        ca, cb = int(ccu[s]), int(ccu[s + 1])
        o1 = op(q[:, a:b], {n: x[:, a:b] for n, x in ks.items()}, {n: x[:, a:b] for n, x in vs.items()},
                gates[:, a:b], compressed={"cmp": (k_c[:, ca:cb], v_c[:, ca:cb])})
        assert rel_err(o[:, a:b], o1) < 1e-5
        g1 = torch.autograd.grad(o1, leaves, do[:, a:b])
        for name, x, y in zip(names, grads, g1):
            sl = slice(ca, cb) if name in ("k_cmp", "v_cmp") else slice(a, b)
            assert rel_err(x[:, sl], y[:, sl]) < 1e-5, (s, name)


@pytest.mark.parametrize("which, HQ, H, Dqk, Dv, lens", [c for c in CASES if c.values[0] != "l_eq_d-sum"])
def test_packed_inference_combined_in_the_window_kernel(which, HQ, H, Dqk, Dv, lens, tmp_path, monkeypatch):
    """Without gradients the packed window kernel combines the output (fwd_combine): the same
    tensor, bit for bit, as the window and combine kernels apart, and each sequence alone."""
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    spec = nsa_dsl.parse(SPECS[which])
    op = nsa_dsl.compile(spec)
    cu = cu_of(lens)
    q, k, v, gates = inputs(spec, int(cu[-1]), HQ, H, Dqk, Dv, seed=5)
    with torch.no_grad():
        fused = op(q, k, v, gates, cu_seqlens=cu)
        op.fuse_output = False
        apart = op(q, k, v, gates, cu_seqlens=cu)
        op.fuse_output = True
        assert torch.equal(fused, apart)
        start = 0
        for n in lens:
            if n:
                alone = op(rows(q, start, start + n), rows(k, start, start + n), rows(v, start, start + n),
                           rows(gates, start, start + n))
                assert rel_err(fused[:, start:start + n], alone) < 1e-6
            start += n


def test_one_sequence_equals_the_plain_op_and_int64_offsets(tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    spec = nsa_dsl.parse(SPECS["score-source-only"])
    op = nsa_dsl.compile(spec)
    q, k, v, _ = inputs(spec, 77, 4, 2, 16, 16)
    o, aux = op(q, k, v, return_aux=True)
    o1, aux1 = op(q, k, v, cu_seqlens=cu_of([77], dtype=torch.int64), return_aux=True)
    assert rel_err(o1, o) < 1e-6 and torch.equal(aux1.indices["slc"], aux.indices["slc"])
    # two plans per binding, each rendered once; varlen kernels hold the packed code, plain ones none
    shapes = dict(heads=4, kv_heads=2, qk_dim=16, v_dim=16)
    packed, plain = op.source(varlen=True, **shapes), op.source(**shapes)
    # (the tile table: built by nsa_dsl.codegen.launch.packed, read by the kernels)
    assert "N_SEQ" in packed and "tl.load(tiles + " in packed
    assert "N_SEQ" not in plain and "tl.load(tiles + " not in plain and "bos" not in plain
    assert op.plan(varlen=True, **shapes).varlen and not op.plan(**shapes).varlen
    assert "VARLEN" not in op.plan(**shapes).describe()


# -- kernels with the tiles the GPU picks: R = 1 select walks, split compress dk/dv, sink chunks --

def test_select_kernels_one_position_per_program_and_atomics():
    """Varlen select with R = 1 (idx itself is the block list), small CHUNK (split lists add with
    atomics), R = 8 (the union walk) and TMA loads (rows from the sequence's first row), against
    the plain kernels on each sequence."""
    lens = [40, 3, 0, 75, 1]
    cu = cu_of(lens, device="cpu")
    G, H, LS, TOPK = 16, 1, 16, 3
    for config in (dict(R=1, RQ=1, CHUNK=16), dict(R=8, RQ=8, CHUNK=32), dict(R=1, CHUNK=16, TMA=True)):
        mv = load_family("select.py.j2", G=G, DQK=16, DV=32, LS=LS, TOPK=TOPK, VARLEN=True)
        m = load_family("select.py.j2", G=G, DQK=16, DV=32, LS=LS, TOPK=TOPK)
        T = int(cu[-1])
        q, k, v, do = (torch.randn(1, T, h, d) for h, d in ((H * G, 16), (H, 16), (H, 32), (H * G, 32)))
        idx = torch.cat([random_idx(1, n, H, LS, TOPK, seed=i) for i, n in enumerate(lens)], 1)
        o, lse = mv.fwd(q, k, v, idx, 0.25, config=config, cu_seqlens=cu)
        grads = mv.bwd(q, k, v, idx, o, lse, do, 0.25, config=config, cu_seqlens=cu)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if a == b:
                continue
            o1, l1 = m.fwd(q[:, a:b], k[:, a:b], v[:, a:b], idx[:, a:b], 0.25, config=config)
            g1 = m.bwd(q[:, a:b], k[:, a:b], v[:, a:b], idx[:, a:b], o1, l1, do[:, a:b], 0.25, config=config)
            assert rel_err(o[:, a:b], o1) < 1e-5 and rel_err(lse[:, a:b], l1) < 1e-5
            for x, y in zip(grads, g1):
                assert rel_err(x[:, a:b], y) < 1e-5, config


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_compress_kernels_split_queries(monkeypatch, tma):
    """Varlen compress dk/dv with several query splits per key tile (the GPU's layout); every
    kernel's streamed tiles by pointer loads and by TMA descriptors (rows from the sequence's first
    block / row, the next sequence's rows masked)."""
    mv = load_family("compress.py.j2", G=3, DQK=16, DV=16, L=16, STRIDE=8, VARLEN=True)
    m = load_family("compress.py.j2", G=3, DQK=16, DV=16, L=16, STRIDE=8)
    tile = dict(R=8, BN=16, num_warps=1, num_stages=1)
    monkeypatch.setattr(mv, "CONFIG", {"fwd": dict(tile, TMA=tma), "dq": dict(tile, TMA=tma),
                                       "dkdv": dict(tile, QS=24, TMA=tma)})
    monkeypatch.setattr(m, "CONFIG", {"fwd": tile, "dq": tile, "dkdv": (8, 16, 1, 1, 24)})
    lens = [100, 0, 15, 1, 37, 16]
    cu = cu_of(lens, device="cpu")
    ccu = mv.compressed_cu_seqlens(cu)
    T, NC = int(cu[-1]), int(ccu[-1])
    q, do = torch.randn(1, T, 6, 16), torch.randn(1, T, 6, 16)
    k, v = torch.randn(1, NC, 2, 16), torch.randn(1, NC, 2, 16)
    assert mv._kv_descs(k, v, mv.resolve_config(q, "fwd"))[2] is tma
    o, lse = mv.fwd(q, k, v, 0.3, cu)
    dq, dk, dv = mv.bwd(q, k, v, o, lse, do, 0.3, cu)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if a == b:
            continue
        ca, cb = int(ccu[s]), int(ccu[s + 1])
        o1, l1 = m.fwd(q[:, a:b], k[:, ca:cb], v[:, ca:cb], 0.3)
        g1 = m.bwd(q[:, a:b], k[:, ca:cb], v[:, ca:cb], o1, l1, do[:, a:b], 0.3)
        assert rel_err(o[:, a:b], o1) < 1e-5 and rel_err(lse[:, a:b], l1) < 1e-5
        for x, y, sl in zip((dq, dk, dv), g1, (slice(a, b), slice(ca, cb), slice(ca, cb))):
            assert rel_err(x[:, sl], y) < 1e-5, s


def test_window_kernels_sinks_in_chunks():
    """Varlen window with sinks wider than a key tile and sink gradients summed over chunks."""
    mv = load_family("window.py.j2", G=3, DQK=16, DV=16, W=20, SINKS=40, VARLEN=True)
    m = load_family("window.py.j2", G=3, DQK=16, DV=16, W=20, SINKS=40)
    config = dict(R=8, BN=16, CHUNK=16)
    lens = [50, 3, 0, 100, 1]
    cu = cu_of(lens, device="cpu")
    T = int(cu[-1])
    q, k, v, do = (torch.randn(1, T, h, 16) for h in (3, 1, 1, 3))
    o, lse = mv.fwd(q, k, v, 0.3, config=config, cu_seqlens=cu)
    grads = mv.bwd(q, k, v, o, lse, do, 0.3, config=config, cu_seqlens=cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if a == b:
            continue
        o1, l1 = m.fwd(q[:, a:b], k[:, a:b], v[:, a:b], 0.3, config=config)
        g1 = m.bwd(q[:, a:b], k[:, a:b], v[:, a:b], o1, l1, do[:, a:b], 0.3, config=config)
        assert rel_err(o[:, a:b], o1) < 1e-5 and rel_err(lse[:, a:b], l1) < 1e-5
        for x, y in zip(grads, g1):
            assert rel_err(x[:, a:b], y) < 1e-5


def test_plain_kernels_refuse_cu_seqlens_and_varlen_kernels_need_it():
    m = load_family("window.py.j2", G=1, DQK=16, DV=16, W=8, SINKS=0)
    mv = load_family("window.py.j2", G=1, DQK=16, DV=16, W=8, SINKS=0, VARLEN=True)
    q = torch.randn(1, 5, 1, 16)
    with pytest.raises(ValueError, match="without packed sequences"):
        m.fwd(q, q, q, 1.0, cu_seqlens=cu_of([5], device="cpu"))
    with pytest.raises(ValueError, match="packed sequences"):
        mv.fwd(q, q, q, 1.0)


# -- errors: expected versus actual ----------------------------------------------------------

def test_invalid_cu_seqlens(tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    spec = nsa_dsl.parse(SPECS["sinks-only"])
    op = nsa_dsl.compile(spec)
    q, k, v, _ = inputs(spec, 10, 2, 1, 16, 16)
    cases = [
        (torch.tensor([0.0, 10.0], device=DEVICE), "E620", "int32 or int64"),
        (torch.tensor([[0, 10]], device=DEVICE), "E620", "1-D"),
        (torch.tensor([0], device=DEVICE), "E620", "N >= 1"),
        ([0, 10], "E620", "torch.Tensor"),
        (torch.tensor([0, 10], device="meta"), "E621", "expected"),
        (torch.tensor([1, 10], device=DEVICE), "E623", "start at 0, got 1"),
        (torch.tensor([0, 6, 4, 10], device=DEVICE), "E624", "cu_seqlens[2] = 4 < cu_seqlens[1] = 6"),
        (torch.tensor([0, 4, 9], device=DEVICE), "E625", "T = 10"),
    ]
    for cu, code, text in cases:
        for run in (lambda: op(q, k, v, cu_seqlens=cu), lambda: nsa_dsl.reference(spec, q, k, v, cu_seqlens=cu)):
            with pytest.raises(SpecError) as e:
                run()
            assert e.value.code == code, (code, str(e.value))
            assert text in str(e.value), str(e.value)
    q2, k2, v2 = (torch.cat([x, x]) for x in (q, k, v))
    with pytest.raises(SpecError) as e:
        op(q2, k2, v2, cu_seqlens=cu_of([10]))
    assert e.value.code == "E622" and "expected to be 1 rather than 2" in str(e.value)


def test_compressed_with_the_wrong_packed_length(tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    spec = nsa_dsl.parse(SPECS["paper"].replace("stride = 16)", "stride = 16, pool = linear)"))
    q, k, v, gates = inputs(spec, 100, 2, 1, 16, 16)
    cu = cu_of([50, 50])                         # 2 + 2 compressed blocks, not (100 - 32) // 16 + 1 = 5
    comp = {"cmp": (torch.randn(1, 5, 1, 16, device=DEVICE), torch.randn(1, 5, 1, 16, device=DEVICE))}
    with pytest.raises(SpecError) as e:
        nsa_dsl.compile(spec)(q, k, v, gates, compressed=comp, cu_seqlens=cu)
    assert e.value.code == "E601" and "expected [1, 4, *, 16]" in str(e.value) and "packed" in str(e.value)
    with pytest.raises(SpecError) as e:                  # the same call, the same error
        nsa_dsl.reference(spec, q, k, v, gates, compressed=comp, cu_seqlens=cu)
    assert e.value.code == "E601" and "expected [1, 4, *, 16]" in str(e.value) and "packed" in str(e.value)


# -- the module: learned pooling per sequence, rotary positions restart ----------------------------

def _rotary(q, k, pos):
    ang = pos.to(q.dtype)[None, :, None, None] * 0.3
    return q * torch.cos(ang) + q.roll(1, -1) * torch.sin(ang), k * torch.cos(ang) - k.roll(1, -1) * torch.sin(ang)


def test_positions():
    assert positions([0, 3, 3, 5, 6]).tolist() == [0, 1, 2, 0, 1, 0]


@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_module_packed_equals_each_sequence_alone(backend, tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    text = SPECS["paper"].replace("stride = 16)", "stride = 16, pool = mlp)")
    dtype = torch.float64 if backend == "reference" else torch.float32
    torch.manual_seed(0)
    layer = nsa_dsl.SparseAttention(text, 32, heads=4, kv_heads=2, qk_dim=16, v_dim=16, rotary=_rotary,
                                    separate_kv=True, backend=backend, device=DEVICE, dtype=dtype)
    lens = [40, 0, 1, 70] if backend == "kernels" else [15, 100, 0, 37, 1, 64]
    cu = cu_of(lens)
    x = torch.randn(1, int(cu[-1]), 32, device=DEVICE, dtype=dtype, requires_grad=True)
    y, aux = layer(x, cu_seqlens=cu, return_aux=True)
    dy = torch.randn_like(y)
    params = [x] + list(layer.parameters())
    grads = torch.autograd.grad(y, params, dy)
    ys, gs = [], [torch.zeros_like(p) for p in params]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if a == b:
            continue
        y1, aux1 = layer(x[:, a:b], return_aux=True)
        assert torch.equal(aux.indices["slc"][:, a:b], aux1.indices["slc"])
        ys.append(y1)
        gs = [g + d for g, d in zip(gs, torch.autograd.grad(y1, params, dy[:, a:b]))]
    assert rel_err(y, torch.cat(ys, 1)) < 1e-5
    for (name, _), a, b in zip([("x", None)] + list(layer.named_parameters()), grads, gs):
        # learned key pooling only gets float noise when few compressed blocks are visible
        tol = 1e-5 if b.norm() > 1e-4 else 1e-6
        assert (a - b).norm() <= tol * max(b.norm(), 1.0), name
    with pytest.raises(SpecError) as e:
        layer(x, cu_seqlens=cu, cache=object())
    assert e.value.code == "E706"


# -- on the GPU: bf16 against float64, tolerance relative to the reference's own error ----------

@pytest.mark.gpu
@pytest.mark.skipif(CPU, reason="needs CUDA")
@pytest.mark.parametrize("which", ["paper", "moba-gate"])
@pytest.mark.parametrize("HQ, H, D", [(16, 1, 128), (12, 4, 64)], ids=["G16-D128", "G3-D64"])
def test_gpu_bf16_packed(which, HQ, H, D, tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    spec = nsa_dsl.parse(SPECS[which])
    op = nsa_dsl.compile(spec)
    lens = [1000, 0, 1, 15, 2048, 37, 600, 100]
    cu = cu_of(lens)
    T = int(cu[-1])
    q, k, v, gates = inputs(spec, T, HQ, H, D, D, dtype=torch.bfloat16)
    leaves = [x.requires_grad_() for x in (q, k, v, gates) if x is not None]
    o, aux = op(q, k, v, gates, cu_seqlens=cu, return_aux=True)
    sel = {n: i.long() for n, i in aux.indices.items()}   # near-ties flip in low precision

    def ref_run(dt):
        ys = [x.detach().to(dt).requires_grad_() for x in leaves]
        g = ys[3] if gates is not None else None
        return ys, nsa_dsl.reference(spec, ys[0], ys[1], ys[2], g, indices=sel, cu_seqlens=cu)
    L64, o64 = ref_run(torch.float64)
    Llp, olp = ref_run(torch.bfloat16)
    do = torch.randn_like(o)
    assert rel_err(o, o64) <= max(5e-3, 2 * rel_err(olp, o64))
    for name, a, b, c in zip("q k v gates".split(), torch.autograd.grad(o, leaves, do),
                             torch.autograd.grad(o64, L64, do.double()), torch.autograd.grad(olp, Llp, do)):
        assert rel_err(a, b) <= max(5e-3, 2 * rel_err(c, b)), name
    # each sequence alone through the op: the same blocks wherever the scores are not near-tied
    a, b = int(cu[4]), int(cu[5])
    o1, aux1 = op(q[:, a:b], k[:, a:b], v[:, a:b], None if gates is None else gates[:, a:b], return_aux=True)
    assert rel_err(o[:, a:b], o1) < 1e-2
