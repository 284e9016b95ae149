"""The op is a torch.library citizen: opcheck passes and torch.compile(fullgraph=True) traces it."""
import pytest
import torch

import nsa_dsl
from nsa_dsl.runtime import kernel_ops as ops

SPEC = """
attention tiny {
    branch cmp = compress(block = 16, stride = 8)
    branch slc = select(block = 16, top_k = 3, score = cmp, keep_first = 1, keep_last = 1)
    branch swa = window(size = 16, sinks = 2)
    output = gate(sigmoid, cmp, slc, swa)
}
"""


@pytest.fixture
def op(tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    return nsa_dsl.compile(nsa_dsl.parse(SPEC))


def _inputs(T=40, HQ=4, H=2, D=16, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, h, D, generator=g) for h in (HQ, H, H))
    gates = torch.rand(1, T, HQ, 3, generator=g)
    if requires_grad:
        for x in (q, k, v, gates):
            x.requires_grad_()
    return q, k, v, gates


def test_opcheck_every_custom_op(op):
    q, k, v, gates = _inputs()
    plan, keys = op._kernels(op.binding(heads=4, kv_heads=2, qk_dim=16, v_dim=16))
    scale = 0.25
    kc = torch.randn(1, 4, 2, 16, requires_grad=True)
    vc = torch.randn(1, 4, 2, 16, requires_grad=True)
    o_c, lse_c = ops.compress_fwd(keys["compress_cmp"], q.detach(), kc.detach(), vc.detach(), scale)
    idx = ops.topk_cmp(keys["topk_slc"], q.detach(), kc.detach(), lse_c, scale, 3)
    outs = [torch.randn(1, 40, 4, 16, requires_grad=True) for _ in range(3)]
    cases = [
        (ops.compress_fwd, (keys["compress_cmp"], q, kc, vc, scale)),
        (ops.window_fwd, (keys["window_swa"], q, k, v, scale)),
        (ops.select_fwd, (keys["select_slc"], q, k, v, idx, scale)),
        (ops.topk_cmp, (keys["topk_slc"], q.detach(), kc.detach(), lse_c, scale, 3)),
        (ops.combine_fwd, (keys["combine"], outs, gates)),
        # the whole op as one node (training): kv = [k_cmp, v_cmp, k, v, k, v] in launch order
        (ops.attention, (op._programs[(op.binding(heads=4, kv_heads=2, qk_dim=16, v_dim=16), False)],
                         q, [kc, vc, k, v, k, v], gates, scale, None)),
    ]
    for fn, args in cases:
        torch.library.opcheck(fn, args, test_utils=("test_schema", "test_autograd_registration",
                                                    "test_faketensor", "test_aot_dispatch_dynamic"))


def test_fake_gradients_have_the_kernels_strides_for_strided_kv(op):
    """K/V as views of a [B, H, T, D] buffer: the one-node backward's fake must give gradients
    with the strides the kernels give (contiguous), or inductor's compiled graph reads them wrong."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    q, _, _, gates = (x.detach() for x in _inputs())
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(1, 2, 40, 16, generator=g).transpose(1, 2) for _ in range(2))
    kc, vc = (torch.randn(1, 2, 4, 16, generator=g).transpose(1, 2) for _ in range(2))
    assert not k.is_contiguous()
    op._kernels(op.binding(heads=4, kv_heads=2, qk_dim=16, v_dim=16))
    prog = op._programs[(op.binding(heads=4, kv_heads=2, qk_dim=16, v_dim=16), False)]
    kv = [kc, vc, k, v, k, v]
    out = ops.attention(prog, q, kv, gates, 0.25, None)
    outs, lses, idxs = out[1:4], out[4:7], out[7:]
    args = (prog, q, kv, gates, outs, lses, idxs, torch.randn_like(out[0]), 0.25)
    real = ops.attention_bwd(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = ops.attention_bwd(prog, *(mode.from_tensor(x) if isinstance(x, torch.Tensor) else
                                         [mode.from_tensor(y) for y in x] if isinstance(x, list) else x
                                         for x in args[1:]))
    assert [(r.shape, r.stride()) for r in real] == [(f.shape, f.stride()) for f in fake]


class TinyModel(torch.nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.embed = torch.nn.Linear(hidden, hidden)
        self.attn = nsa_dsl.SparseAttention(nsa_dsl.parse(SPEC), hidden, heads=4, kv_heads=2,
                                            qk_dim=16, v_dim=16, backend="kernels")
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, x):
        return self.head(self.attn(torch.relu(self.embed(x)))).sum()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_backward(backend, tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    model = TinyModel()
    x = torch.randn(2, 40, 32)
    eager_loss = model(x)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    loss = compiled(x)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert torch.allclose(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, eager_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
