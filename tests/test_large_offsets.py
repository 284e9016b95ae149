"""64-bit offsets: inputs with more than 2^31 elements, on the GPU.

Any int32 offset arithmetic in a kernel (``b * stride_b``, ``row * D``, a flattened
``(b * T + t) * HQ + h``) overflows past 2^31 elements and reads or writes the wrong place.
Each case builds inputs whose element count passes 2^31 and compares the part that lies past
that line with the same rows run on their own, where every offset is small. Identical inputs
run through the same kernels, so outputs and gradients agree to float32-atomic noise (1e-2
relative is generous) and the selected blocks are equal. Launchers NaN-fill their outputs
(NSA_DSL_NAN_FILL=1, conftest.py), so a row a kernel fails to write is non-finite; every big
output and gradient is checked to be finite.

  batched   B = 65, T = 4096, HQ = 64, H = 4, D = 128, bf16: q, o, dq and the branch outputs hold
            65 * 4096 * 64 * 128 = 2^31 + 2^25 elements; batch element 64 starts at 2^31.
  packed    cu_seqlens, B = 1: 68 sequences, 274,836 rows of 64 * 128 (2^31 = 262,144 rows);
            the last two sequences lie past the line.
  decode    a KV cache of 2 sequences of up to 4,202,496 positions (H = 4, D = 128): the second
            sequence's keys start past 2^31 elements; only 4,096 positions are filled.

Memory: about 50 GB at the peak (batched, packed), 18 GB (decode); each case frees its tensors.
Run: ``python -m pytest -q -s -m gpu tests/test_large_offsets.py`` (``-s`` prints timings and the
peak memory of each case).
"""
from __future__ import annotations

import gc
import time
from pathlib import Path

import pytest
import torch

import nsa_dsl

CPU = not torch.cuda.is_available()
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SPEC = EXAMPLES / "nsa_paper_mean.nsa"
TWO31 = 2 ** 31

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(CPU, reason="needs CUDA")]


# ------------------------------------------------------------------------------------- helpers

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float32 on the tensors' device (inf on a non-finite value)."""
    a, b = a.detach().float(), b.detach().float()
    assert a.shape == b.shape, (a.shape, b.shape)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def report(name: str, t0: float, device) -> str:
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if torch.device(device).type == "cuda" else 0.0
    line = f"[{name}] {time.perf_counter() - t0:.1f} s, peak {peak:.1f} GiB"
    print(line)
    return line


def make_inputs(B, T, HQ, H, D, C, device, dtype, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, T, HQ, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g)
    gates = torch.rand(B, T, HQ, C, device=device, dtype=dtype, generator=g)
    return [x.requires_grad_() for x in (q, k, v, gates)]


def run_op(op, leaves, do_seed, cu_seqlens=None):
    """Forward (with aux) and backward against ``do = randn_like(o)`` (seeded); returns
    ``(o, idx, do, [dq, dk, dv, dgates])``."""
    o, aux = op(*leaves, cu_seqlens=cu_seqlens, return_aux=True)
    g = torch.Generator(device=o.device).manual_seed(do_seed)
    do = torch.randn(o.shape, device=o.device, dtype=o.dtype, generator=g)
    grads = torch.autograd.grad(o, leaves, do)
    return o.detach(), aux.indices["slc"], do, list(grads)


NAMES = ("o", "dq", "dk", "dv", "dgates")


def check_batched(B=65, T=4096, HQ=64, H=4, D=128, device="cuda", dtype=torch.bfloat16, tol=1e-2):
    """Run the op on ``B`` sequences; batch elements 0 and ``B - 1`` again as a batch of two.
    Returns ``{name: rel error of element B - 1 (and of element 0)}`` and asserts."""
    t0 = time.perf_counter()
    spec = nsa_dsl.load(SPEC)
    op = nsa_dsl.compile(spec)
    C = len(spec.output.branches)
    leaves = make_inputs(B, T, HQ, H, D, C, device, dtype, seed=1)
    assert leaves[0].numel() > TWO31 or device == "cpu"
    o, idx, do, grads = run_op(op, leaves, do_seed=2)
    for name, x in zip(NAMES, [o] + grads):
        assert finite(x), f"batched: {name} has non-finite values (an unwritten or misplaced row)"
    pick = [0, B - 1]
    big = {n: x[pick].clone() for n, x in zip(NAMES, [o] + grads)}
    big_idx = idx[pick].clone()
    small_in = [x.detach()[pick].clone().requires_grad_() for x in leaves]
    small_do = do[pick].clone()
    del o, idx, do, grads, leaves
    free()

    o1, aux1 = op(*small_in, return_aux=True)
    small = dict(zip(NAMES, [o1.detach()] + list(torch.autograd.grad(o1, small_in, small_do))))
    errs = {}
    for n in NAMES:
        errs[n] = rel(big[n][1], small[n][1])
        errs[n + "@0"] = rel(big[n][0], small[n][0])
    same = torch.equal(big_idx, aux1.indices["slc"])
    msg = f"{report('batched', t0, device)}; rel errors {errs}; indices equal {same}"
    del big, small, small_in, o1, aux1
    free()
    assert same, msg
    assert all(e <= tol for e in errs.values()), msg
    return errs


def check_packed(lens=(4096,) * 66 + (3000, 1500), HQ=64, H=4, D=128, device="cuda",
                 dtype=torch.bfloat16, tol=1e-2):
    """Packed sequences (cu_seqlens) past 2^31 elements: the first and the last two sequences
    again, packed on their own."""
    t0 = time.perf_counter()
    spec = nsa_dsl.load(SPEC)
    op = nsa_dsl.compile(spec)
    C = len(spec.output.branches)
    cu_list = [0]
    for n in lens:
        cu_list.append(cu_list[-1] + n)
    T = cu_list[-1]
    cu = torch.tensor(cu_list, dtype=torch.int32, device=device)
    leaves = make_inputs(1, T, HQ, H, D, C, device, dtype, seed=3)
    assert leaves[0].numel() > TWO31 or device == "cpu"
    assert cu_list[-3] * HQ * D >= TWO31 or device == "cpu"      # the last two sequences lie past 2^31
    o, idx, do, grads = run_op(op, leaves, do_seed=4, cu_seqlens=cu)
    for name, x in zip(NAMES, [o] + grads):
        assert finite(x), f"packed: {name} has non-finite values (an unwritten or misplaced row)"
    spans = [(cu_list[0], cu_list[1]), (cu_list[-3], cu_list[-2]), (cu_list[-2], cu_list[-1])]

    def take(x):
        return torch.cat([x[:, a:b] for a, b in spans], 1)
    big = {n: take(x).clone() for n, x in zip(NAMES, [o] + grads)}
    big_idx = take(idx).clone()
    small_in = [take(x.detach()).clone().requires_grad_() for x in leaves]
    small_do = take(do).clone()
    del o, idx, do, grads, leaves
    free()

    small_cu = torch.tensor([0] + [sum(b - a for a, b in spans[:i + 1]) for i in range(len(spans))],
                            dtype=torch.int32, device=device)
    o1, aux1 = op(*small_in, cu_seqlens=small_cu, return_aux=True)
    small = dict(zip(NAMES, [o1.detach()] + list(torch.autograd.grad(o1, small_in, small_do))))
    errs = {}
    bounds = small_cu.tolist()
    for n in NAMES:
        for s, tag in enumerate(("first", "last-1", "last")):
            a, b = bounds[s], bounds[s + 1]
            errs[f"{n}@{tag}"] = rel(big[n][:, a:b], small[n][:, a:b])
    same = torch.equal(big_idx, aux1.indices["slc"])
    msg = f"{report('packed', t0, device)}; rel errors {errs}; indices equal {same}"
    del big, small, small_in, o1, aux1
    free()
    assert same, msg
    assert all(e <= tol for e in errs.values()), msg
    return errs


def check_decode(max_len=TWO31 // (4 * 128) + 8192, prefill=4000, chunk=64, HQ=64, H=4, D=128,
                 device="cuda", dtype=torch.bfloat16, tol=1e-2):
    """Decode kernels over a cache whose second sequence starts past 2^31 elements: a prefill
    chunk and one decoding step, against the same appends to a cache just long enough."""
    from nsa_dsl.runtime.decoding import DecodeOp, NSACache
    t0 = time.perf_counter()
    spec = nsa_dsl.load(SPEC)
    C = len(spec.output.branches)
    op = DecodeOp(spec)
    g = torch.Generator(device=device).manual_seed(5)

    def r(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)
    B = 2
    k0, v0 = r(B, prefill, H, D), r(B, prefill, H, D)
    steps = []                                             # (q, k, v, gates) per call
    for c in (chunk, 1):
        steps.append((r(B, c, HQ, D), r(B, c, H, D), r(B, c, H, D),
                      torch.rand(B, c, HQ, C, device=device, generator=g).to(dtype)))

    def run(length):
        cache = NSACache(spec, B, length, kv_heads=H, qk_dim=D, v_dim=D, dtype=dtype, device=device)
        cache.append(k0, v0)
        outs = []
        for q, k, v, gates in steps:
            step = cache.append(k, v)
            o, aux = op(q, cache, step, gates, return_aux=True)
            outs.append((o, aux.indices["slc"]))
        return cache, outs

    big_cache, big = run(max_len)
    assert big_cache.k["slc"].stride(0) * (B - 1) >= TWO31 or device == "cpu"
    del big_cache
    free()
    _, small = run(prefill + chunk + 1)
    errs, same = {}, True
    for i, ((ob, ib), (os_, is_)) in enumerate(zip(big, small)):
        assert finite(ob), f"decode call {i}: non-finite output"
        errs[f"call{i}@0"] = rel(ob[0], os_[0])
        errs[f"call{i}@1"] = rel(ob[1], os_[1])
        same = same and torch.equal(ib, is_)
    msg = f"{report('decode', t0, device)}; rel errors {errs}; indices equal {same}"
    del big, small
    free()
    assert same, msg
    assert all(e <= tol for e in errs.values()), msg
    return errs


# --------------------------------------------------------------------------------------- tests

@pytest.fixture(autouse=True)
def _fresh_memory():
    free()
    torch.cuda.reset_peak_memory_stats()
    yield
    free()


def test_batched_past_2_31_elements():
    check_batched()


def test_packed_past_2_31_elements():
    check_packed()


def test_decode_cache_past_2_31_elements():
    check_decode()
