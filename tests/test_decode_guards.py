"""Decode steps cannot read out of bounds: a step is bound to its cache and the cache's
generation, and lies inside its lengths; cache inputs are checked where they enter."""
import math

import pytest
import torch

import nsa_dsl
from nsa_dsl import SpecError
from nsa_dsl.runtime.decoding import DecodeOp, decode_torch
from nsa_dsl.runtime.kv_cache import DecodeStep, NSACache

SPEC = nsa_dsl.parse("""
attention d {
    branch cmp = compress(block = 8, stride = 4)
    branch slc = select(block = 8, top_k = 2, score = cmp, keep_first = 1, keep_last = 1)
    branch swa = window(size = 8)
    output = gate(sigmoid, cmp, slc, swa)
}
""")
H, HQ, D = 1, 2, 16


def _cache(B=2, L=32, **kw):
    return NSACache(SPEC, B, L, kv_heads=H, qk_dim=D, v_dim=D, **kw)


def _chunk(B, C, dtype=torch.float32):
    g = torch.Generator().manual_seed(C)
    return [torch.randn(B, C, h, D, generator=g, dtype=dtype) for h in (HQ, H, H)] + \
        [torch.randn(B, C, HQ, 3, generator=g, dtype=dtype)]


DECODERS = [pytest.param(lambda: (lambda *a, **k: decode_torch(SPEC, *a, **k)), id="reference"),
            pytest.param(lambda: DecodeOp(SPEC), id="kernels")]


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_step_of_another_cache_is_refused(decoder, tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    big, small = _cache(L=32), _cache(L=32)
    q, k, v, g = _chunk(2, 20)
    step = big.append(k, v)
    small.append(k[:, :2], v[:, :2])
    with pytest.raises(SpecError) as e:
        decoder()(q, small, step, g)                # would read positions 2..19 of small
    assert e.value.code == "E811" and "another cache" in str(e.value)


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_step_from_before_reset_is_refused(decoder, tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    cache = _cache()
    q, k, v, g = _chunk(2, 20)
    step = cache.append(k, v)
    cache.reset()
    cache.append(k[:, :1], v[:, :1])
    with pytest.raises(SpecError) as e:
        decoder()(q, cache, step, g)
    assert e.value.code == "E811" and "reset" in str(e.value)


def test_hand_made_steps_are_refused_and_step_at_is_checked():
    cache = _cache()
    q, k, v, g = _chunk(2, 4)
    cache.append(k, v)
    forged = DecodeStep(torch.zeros(2, dtype=torch.int32), torch.full((2,), 4, dtype=torch.int32), (0, 0), (4, 4), 4)
    with pytest.raises(SpecError, match="E811"):
        decode_torch(SPEC, q, cache, forged, g)
    with pytest.raises(SpecError, match="beyond the cache's lengths"):
        cache.step_at((2, 2), (4, 4), 4)            # positions 2..5 of caches holding 4
    assert decode_torch(SPEC, q, cache, cache.step_at((0, 0), (4, 4), 4), g).shape == (2, 4, HQ, D)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.bool, torch.complex64])
def test_append_never_casts_silently(dtype):
    cache = _cache()
    k = torch.ones(2, 3, H, D).to(dtype)
    with pytest.raises(SpecError) as e:
        cache.append(k, k)
    assert e.value.code == "E803" and "cast" in str(e.value) and cache.lengths_host == (0, 0)


@pytest.mark.parametrize("n_new", [[1.9, 2], "12", [True, 1], torch.tensor([1.0, 2.0]), 3])
def test_n_new_must_be_integer_counts(n_new):
    cache = _cache()
    _, k, v, _ = _chunk(2, 3)
    with pytest.raises(SpecError) as e:
        cache.append(k, v, n_new=n_new)
    assert e.value.code == "E804" and cache.lengths_host == (0, 0)


def test_a_cache_of_integers_is_refused():
    with pytest.raises(SpecError) as e:
        _cache(dtype=torch.int32)
    assert e.value.code == "E801" and "floating-point" in str(e.value)


@pytest.mark.parametrize("scale", [-0.25, 0.0, math.nan, math.inf, True])
def test_decode_scale_is_checked_as_the_op_checks_it(scale):
    cache = _cache()
    q, k, v, g = _chunk(2, 3)
    step = cache.append(k, v)
    with pytest.raises(SpecError) as e:
        decode_torch(SPEC, q, cache, step, g, scale=scale)
    assert e.value.code == "E618"
