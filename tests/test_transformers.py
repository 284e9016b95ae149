"""nsa_dsl.integrations.transformers: tiny random Llama / Mistral / Qwen2 / Qwen3 models (no
downloads), converted to NSA and run on the CPU with the reference backend: forward and backward,
greedy generate() through the NSA cache against recomputing the whole prefix, save / load,
packed and padded batches against each sequence alone, and the errors."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, DynamicCache, GPT2Config, LlamaConfig,  # noqa: E402
                          MistralConfig, Qwen2Config, Qwen3Config)

from nsa_dsl import SpecError, SparseAttention  # noqa: E402
from nsa_dsl.integrations import transformers as nsa_tf  # noqa: E402

VOCAB = 64
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    "llama": lambda: LlamaConfig(**BASE),
    "mistral": lambda: MistralConfig(**BASE, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**BASE),                     # q/k/v biases
    "qwen3": lambda: Qwen3Config(**BASE, head_dim=32),        # q/k norms, head_dim != hidden / heads
}
# blocks small enough that compressed blocks complete while decoding a few tokens
SPEC = """
attention tiny {
    branch cmp = compress(block = 4, stride = 2, pool = mlp)
    branch slc = select(block = 4, top_k = 2, score = cmp, keep_first = 1, keep_last = 1)
    branch swa = window(size = 8)
    output = gate(sigmoid, cmp, slc, swa)
}
"""
SPEC_MEAN = SPEC.replace("pool = mlp", "pool = mean").replace("tiny", "tiny_mean")
FULL = "attention full { branch swa = window(size = 4096) output = swa }"   # full causal attention


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread beats several (and the CI machine's cores are shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def dense(family: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    model.generation_config.eos_token_id = None       # greedy runs its full length
    model.generation_config.pad_token_id = 0
    return model


def nsa(family: str, spec: str = SPEC):
    """A converted model whose gates are not at their input-independent init (so they matter)."""
    model = nsa_tf.convert(dense(family), spec, backend="reference")
    torch.manual_seed(1)
    for layer in model.modules():
        if isinstance(layer, nsa_tf.NSAAttention) and layer.gate_proj is not None:
            torch.nn.init.normal_(layer.gate_proj.weight, std=0.3)
    return model


def tokens(*shape, seed=2):
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def greedy_recompute(model, ids, n):
    for _ in range(n):
        with torch.no_grad():
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


# ------------------------------------------------------------------------------ conversion

@pytest.mark.parametrize("family", FAMILIES)
def test_full_window_spec_reproduces_the_dense_model(family):
    """A window as long as the sequence is full causal attention: the converted model is the
    dense one (projections, biases, q/k norms, rotary and scale adopted as they are)."""
    model = dense(family)
    ids = tokens(2, 30)
    with torch.no_grad():
        want = model(ids).logits
        nsa_tf.convert(model, FULL, backend="reference")
        got = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == nsa_tf.ATTN_IMPLEMENTATION


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward(family):
    model = nsa(family).train()
    layer = model.model.layers[0].self_attn
    assert isinstance(layer, nsa_tf.NSAAttention) and isinstance(layer, SparseAttention)
    assert set(layer.new_parameter_names()) >= {"gate_proj.weight", "gate_proj.bias", "k_pool.cmp.pos"}
    ids = tokens(2, 24)
    out = model(ids, labels=ids, use_cache=False)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                 "k_pool.cmp.net.0.weight", "v_pool.cmp.net.2.weight"):
        g = layer.get_parameter(name).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    if family == "qwen3":
        assert layer.q_norm.weight.grad is not None and layer.k_norm.weight.grad.abs().sum() > 0


def test_activation_checkpointing_gives_the_same_gradients():
    model = nsa("llama").train()
    ids = tokens(2, 20)
    model(ids, labels=ids, use_cache=False).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model(ids, labels=ids, use_cache=False).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-5, atol=1e-6)


def test_autocast_with_float32_weights():
    """bf16 autocast over float32 weights (mixed-precision training): Qwen3's q/k norms return
    float32 beside a bf16 v; the layer hands the op one dtype."""
    model = nsa("qwen3").train()
    ids = tokens(2, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids, use_cache=False)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert model.model.layers[0].self_attn.k_norm.weight.grad.abs().sum() > 0


def test_adopts_the_dense_weights_and_records_the_spec():
    model = dense("qwen2")
    attn = model.model.layers[1].self_attn
    q_proj, bias = attn.q_proj, attn.q_proj.bias.detach().clone()
    nsa_tf.convert(model, SPEC, backend="reference")
    layer = model.model.layers[1].self_attn
    assert layer.q_proj is q_proj and torch.equal(layer.q_proj.bias, bias)       # the module itself
    assert layer.layer_idx == 1 and layer.scale == attn.scaling
    # gate init: zero weight, every gate 1/C for any input
    assert torch.equal(layer.gate_proj.weight, torch.zeros_like(layer.gate_proj.weight))
    assert torch.allclose(torch.sigmoid(layer.gate_proj.bias), torch.tensor(1 / 3))
    assert nsa_tf.spec_of(model.config).name == "tiny"
    assert getattr(model.config, nsa_tf.CONFIG_KEY)["spec"].strip().startswith("attention tiny")


# ------------------------------------------------------------------------------ generation

@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_through_the_nsa_cache_equals_recomputing(family):
    model = nsa(family)
    ids = tokens(2, 11)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=13, do_sample=False, return_dict_in_generate=True)
    cache = getattr(out, nsa_tf.CACHE_ARG)
    assert all(isinstance(slot, nsa_tf.NSACacheLayer) for slot in cache.layers)
    assert cache.get_seq_length() == 23 and cache.layers[0].nsa.lengths_host == (23, 23)
    assert torch.equal(out.sequences, greedy_recompute(model, ids, 13))


def test_generate_with_mean_pooling_and_a_cache_that_grows():
    """mean pooling; an NSAModelCache sized for 4 tokens doubles while decoding."""
    model = nsa("llama", SPEC_MEAN)
    ids = tokens(1, 9, seed=5)
    cache = nsa_tf.NSAModelCache(model, max_len=4)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, **{nsa_tf.CACHE_ARG: cache})
    assert torch.equal(out, greedy_recompute(model, ids, 12))
    assert cache.layers[0].nsa.max_len >= 21


def test_generate_replaces_sliding_window_slots():
    """A config with sliding layers (Qwen2's use_sliding_window): generate()'s DynamicCache has
    sliding slots; the NSA layers take them over (the spec decides what each query reads)."""
    torch.manual_seed(0)
    cfg = Qwen2Config(**BASE, use_sliding_window=True, sliding_window=6, max_window_layers=1)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = None
    nsa_tf.convert(model, SPEC_MEAN, backend="reference")
    ids = tokens(2, 9, seed=12)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert all(isinstance(s, nsa_tf.NSACacheLayer) for s in getattr(out, nsa_tf.CACHE_ARG).layers)
    assert torch.equal(out.sequences, greedy_recompute(model, ids, 8))


def test_cached_chunks_equal_the_full_forward():
    """Prefill a piece of the prompt, then one token at a time: every logit as the full forward."""
    model = nsa("qwen3")
    ids = tokens(2, 20)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        got = [model(ids[:, :7], use_cache=True, **{nsa_tf.CACHE_ARG: cache}).logits]
        got += [model(ids[:, 7:12], use_cache=True, **{nsa_tf.CACHE_ARG: cache}).logits]
        got += [model(ids[:, t:t + 1], use_cache=True, **{nsa_tf.CACHE_ARG: cache}).logits for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-5, atol=1e-5)


def test_a_padded_chunk_after_the_prompt():
    """A later chunk with padding (row 0's last 2 tokens): only real tokens enter the cache, and
    the real tokens' outputs are those of each row's real tokens alone."""
    model = nsa("qwen2")
    ids = tokens(2, 12, seed=9)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 10:] = 0
    cache = nsa_tf.NSAModelCache(model)
    with torch.no_grad():
        first = model.model(ids[:, :7], attention_mask=mask[:, :7], use_cache=True, **{nsa_tf.CACHE_ARG: cache})
        second = model(ids[:, 7:], attention_mask=mask, use_cache=True, **{nsa_tf.CACHE_ARG: cache}).logits
        want0 = model(ids[:1, :10], use_cache=False).logits[0, 7:]
        want1 = model(ids[1:], use_cache=False).logits[0, 7:]
    assert first.last_hidden_state.shape == (2, 7, 64)
    assert cache.layers[0].nsa.lengths_host == (10, 12) and cache.get_seq_length() == 12
    torch.testing.assert_close(second[0, :3], want0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second[1], want1, rtol=1e-5, atol=1e-5)


def test_padded_generate_equals_each_prompt_alone():
    """Left padding: each row's real tokens are its sequence (the pads are never cached)."""
    model = nsa("mistral")
    a, b = tokens(1, 8, seed=3), tokens(1, 13, seed=4)
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), a], 1), b])
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    with torch.no_grad():
        out = model.generate(batch, attention_mask=mask, max_new_tokens=7, do_sample=False)
        alone = [model.generate(x, max_new_tokens=7, do_sample=False) for x in (a, b)]
    assert torch.equal(out[0, 5:], alone[0][0]) and torch.equal(out[1], alone[1][0])


def test_beam_search_reorders_the_nsa_cache():
    model = nsa("llama", SPEC_MEAN)
    ids = tokens(1, 10, seed=6)
    kw = dict(max_new_tokens=6, num_beams=2, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))


DSA = """
attention dsa_tiny {
    branch idx = indexer(heads = 2, dim = 16)
    branch tok = select(block = 1, top_k = 6, score = idx, keep_first = 1, keep_last = 1)
    branch swa = window(size = 4)
    output = gate(sigmoid, tok, swa)
}
"""


def test_indexer_spec_trains_generates_and_round_trips(tmp_path):
    """A DSA spec: the layer adds the indexer projections; index_loss(model) trains them; greedy
    generate() through the cache (indexer keys included) equals recomputing; save / load."""
    model = nsa("llama", DSA)
    layer = model.model.layers[0].self_attn
    assert {"indexer.idx.q_proj.weight", "indexer.idx.k_proj.weight", "indexer.idx.w_proj.weight"} \
        <= set(layer.new_parameter_names())
    ids = tokens(2, 20, seed=13)
    model.train()
    out = model(ids, labels=ids, use_cache=False)
    idx_loss = nsa_tf.index_loss(model)
    assert idx_loss.item() > 0 and nsa_tf.index_loss(model).item() == 0        # collected once
    (out.loss + idx_loss).backward()
    assert layer.indexer.idx.q_proj.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.generate(ids[:, :9], max_new_tokens=10, do_sample=False),
                           greedy_recompute(model, ids[:, :9], 10))
    model.save_pretrained(tmp_path)
    loaded = nsa_tf.from_pretrained(tmp_path, backend="reference").eval()
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, loaded(ids, use_cache=False).logits)


# ------------------------------------------------------------------------------ save / load

@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_give_identical_logits(family, tmp_path):
    model = nsa(family)
    ids = tokens(2, 17)
    model.save_pretrained(tmp_path)
    loaded = nsa_tf.from_pretrained(tmp_path, backend="reference").eval()
    assert isinstance(loaded.model.layers[0].self_attn, nsa_tf.NSAAttention)
    assert loaded.config._attn_implementation == nsa_tf.ATTN_IMPLEMENTATION
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, loaded(ids, use_cache=False).logits)
    sd, ld = model.state_dict(), loaded.state_dict()
    assert sd.keys() == ld.keys() and all(torch.equal(sd[k], ld[k]) for k in sd)


def test_from_pretrained_refuses_a_dense_model_and_missing_weights(tmp_path):
    dense("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(SpecError) as e:
        nsa_tf.from_pretrained(tmp_path / "dense")
    assert e.value.code == "E722"
    # a converted config whose weights file lacks the NSA parameters
    model = nsa("llama")
    dense_model = dense("llama")
    setattr(dense_model.config, nsa_tf.CONFIG_KEY, getattr(model.config, nsa_tf.CONFIG_KEY))
    dense_model.save_pretrained(tmp_path / "half")
    with pytest.raises(SpecError) as e:
        nsa_tf.from_pretrained(tmp_path / "half")
    assert e.value.code == "E722" and "lacks" in str(e.value)


# ------------------------------------------------------------------------------ packed and padded batches

@pytest.mark.parametrize("family", FAMILIES)
def test_packed_batch_equals_each_sequence_alone(family):
    model = nsa(family)
    seqs = [tokens(1, n, seed=10 + n) for n in (13, 19, 6)]
    packed = torch.cat(seqs, 1)
    position_ids = torch.cat([torch.arange(s.shape[1]) for s in seqs])[None]
    with torch.no_grad():
        alone = torch.cat([model(s, use_cache=False).logits for s in seqs], 1)
        got = model(packed, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_packed_batch_from_flash_attention_kwargs_and_its_gradients():
    """cu_seq_lens_q as transformers' flash-attention kwargs give it, or nsa-dsl's cu_seqlens=."""
    model = nsa("qwen3").train()
    seqs = [tokens(1, n, seed=20 + n) for n in (9, 14)]
    packed = torch.cat(seqs, 1)
    cu = torch.tensor([0, 9, 23], dtype=torch.int32)
    got = model(packed, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=14, max_length_k=14,
                use_cache=False).logits
    alone = torch.cat([model(s, use_cache=False).logits for s in seqs], 1)
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(packed, cu_seqlens=cu, use_cache=False).logits, alone, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert model.model.layers[0].self_attn.gate_proj.weight.grad.abs().sum() > 0


def test_padded_batch_equals_each_sequence_alone():
    model = nsa("qwen2")
    a, b = tokens(1, 9, seed=7), tokens(1, 15, seed=8)
    pad = torch.zeros(1, 6, dtype=torch.long)
    for left in (True, False):
        row = torch.cat([pad, a] if left else [a, pad], 1)
        mask = torch.ones(2, 15, dtype=torch.long)
        mask[0, :6] = 0 if left else 1
        mask[0, 9:] = 1 if left else 0
        with torch.no_grad():
            got = model(torch.cat([row, b]), attention_mask=mask, use_cache=False).logits
            want_a, want_b = model(a, use_cache=False).logits, model(b, use_cache=False).logits
        real = got[0, 6:] if left else got[0, :9]
        torch.testing.assert_close(real, want_a[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want_b[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ errors

def test_errors():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB))
    with pytest.raises(SpecError) as e:
        nsa_tf.convert(gpt2, SPEC)
    assert e.value.code == "E720" and "llama" in str(e.value)
    with pytest.raises(SpecError) as e:
        nsa_tf.convert(dense("llama"), SPEC.replace("{", "{ causal = false", 1))
    assert e.value.code == "E720"
    with pytest.raises(SpecError) as e:                           # the spec's shapes must be the model's
        nsa_tf.convert(dense("llama"), SPEC.replace("{", "{ heads = 8", 1))
    assert e.value.code == "E701" and "heads = 4" in str(e.value)
    with pytest.raises(SpecError) as e:                           # head_dim 16: fine; 24: not for kernels
        nsa_tf.convert(dense_with(head_dim=24), SPEC, backend="kernels")
    assert e.value.code == "E605"
    model = nsa("llama")
    with pytest.raises(SpecError) as e:
        nsa_tf.convert(model, SPEC)
    assert e.value.code == "E720" and "already" in str(e.value)
    ids = tokens(1, 6)
    with pytest.raises(SpecError) as e:                           # a custom 4-D mask
        model(ids, attention_mask=torch.ones(1, 1, 6, 6, dtype=torch.bool), use_cache=False)
    assert e.value.code == "E721"
    cache = DynamicCache(config=model.config)                     # a slot holding dense keys
    cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    with pytest.raises(SpecError) as e:
        model(ids, use_cache=True, **{nsa_tf.CACHE_ARG: cache})
    assert e.value.code == "E723"
    nsa_cache = nsa_tf.NSAModelCache(model)
    with pytest.raises(SpecError) as e:
        nsa_cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    assert e.value.code == "E723"
    with pytest.raises(SpecError) as e:
        nsa_cache.crop(1)
    assert e.value.code == "E723"
    unconverted = dense("llama")                                  # a dense layer under "nsa_dsl"
    unconverted.config._attn_implementation = nsa_tf.ATTN_IMPLEMENTATION
    with pytest.raises(SpecError) as e:
        unconverted(ids, use_cache=False)
    assert e.value.code == "E720"


def dense_with(**kw):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**{**BASE, **kw}))


# ------------------------------------------------------------------------------ GPU (the lead runs these)

GPU_SPEC = """
attention gpu_tiny {
    branch cmp = compress(block = 16, stride = 8, pool = mean)
    branch slc = select(block = 16, top_k = 2, score = cmp, keep_first = 1, keep_last = 1)
    branch swa = window(size = 32)
    output = gate(sigmoid, cmp, slc, swa)
}
"""


def _bf16_kernels(model32):
    """A bf16 copy of a converted float32 model that runs the generated kernels (the rotary
    frequencies stay float32, as transformers loads them)."""
    import copy
    model = copy.deepcopy(model32)
    inv = {n: b.clone() for n, b in model.model.rotary_emb.named_buffers()}
    model = model.to(torch.bfloat16)
    for n, b in inv.items():
        setattr(model.model.rotary_emb, n, b)
    for layer in model.modules():
        if isinstance(layer, nsa_tf.NSAAttention):
            layer.backend = "kernels"
    return model


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gpu_kernels_prefill_decode_and_packed(family):
    """bf16 on CUDA with the generated kernels against the float32 reference of the same model:
    a prompt then one token at a time through the NSA cache (the training kernels, then the
    decode kernels), and a packed batch, each within 2x of the bf16 full forward's own error;
    generate() decodes through NSACacheLayer slots."""
    torch.manual_seed(0)
    cfg = FAMILIES[family]()
    cfg.head_dim = 32
    model32 = AutoModelForCausalLM.from_config(cfg).cuda().eval()
    model32.generation_config.eos_token_id = None
    nsa_tf.convert(model32, GPU_SPEC, backend="reference")
    for layer in model32.modules():                       # gates that depend on the input
        if isinstance(layer, nsa_tf.NSAAttention):
            torch.nn.init.normal_(layer.gate_proj.weight, std=0.3)
    model16 = _bf16_kernels(model32)
    ids = tokens(2, 124).cuda()

    def err(x, truth):
        return (x.float() - truth).abs().max().item()
    with torch.no_grad():
        truth = model32(ids, use_cache=False).logits
        full = err(model16(ids, use_cache=False).logits, truth)
        cache = nsa_tf.NSAModelCache(model16)
        steps = [model16(ids[:, :100], use_cache=True, **{nsa_tf.CACHE_ARG: cache}).logits]
        steps += [model16(ids[:, t:t + 1], use_cache=True, **{nsa_tf.CACHE_ARG: cache}).logits for t in range(100, 124)]
        cached = err(torch.cat(steps, 1), truth)
        assert cached <= 2 * full + 1e-2, (cached, full)

        seqs = [tokens(1, n, seed=n).cuda() for n in (70, 130)]
        alone_truth = torch.cat([model32(s, use_cache=False).logits for s in seqs], 1)
        alone = err(torch.cat([model16(s, use_cache=False).logits for s in seqs], 1), alone_truth)
        pos = torch.cat([torch.arange(s.shape[1]) for s in seqs])[None].cuda()
        packed = err(model16(torch.cat(seqs, 1), position_ids=pos, use_cache=False).logits, alone_truth)
        assert packed <= 2 * alone + 1e-2, (packed, alone)

        out = model16.generate(ids[:, :100], max_new_tokens=16, do_sample=False, pad_token_id=0,
                               return_dict_in_generate=True)
    assert out.sequences.shape == (2, 116)
    assert all(isinstance(s, nsa_tf.NSACacheLayer) for s in getattr(out, nsa_tf.CACHE_ARG).layers)
