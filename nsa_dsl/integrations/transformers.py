"""NSA inside Hugging Face ``transformers`` models (transformers 5.x; ``pip install nsa-dsl[transformers]``).

    from transformers import AutoModelForCausalLM
    from nsa_dsl.integrations import transformers as nsa_tf

    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-0.6B")
    nsa_tf.convert(model, "examples/nsa_paper_mean.nsa")   # in place; returns the model
    ...train...                                             # packed batches: position_ids restart at 0
    model.generate(input_ids, max_new_tokens=64)           # decodes through the NSA KV cache
    model.save_pretrained("out")
    model = nsa_tf.from_pretrained("out")                  # the NSA model again, same logits

What :func:`convert` does, for a causal LM of the Llama, Mistral, Qwen2 and Qwen3 families:

* every decoder layer's ``self_attn`` becomes an :class:`NSAAttention`, a
  :class:`~nsa_dsl.runtime.module.SparseAttention` of the spec that *adopts* the dense layer's
  ``q_proj``/``k_proj``/``v_proj``/``o_proj`` modules (biases included: Qwen2), its per-head
  ``q_norm``/``k_norm`` (Qwen3; applied before rotary, as there), its softmax scale, and the
  model's own rotary embedding (``model.model.rotary_emb`` with the family's
  ``apply_rotary_pos_emb``: rope scaling types work unchanged). Shapes come from the model
  (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``: GQA and head dims other than
  ``hidden_size / heads`` are fine); a spec that declares other shapes is refused (E701). The
  state-dict names of the adopted weights do not change, so a dense checkpoint is the starting
  point of continued training;
* the spec's own parameters are added with SparseAttention's initialisation: the gate
  projection ``gate_proj`` (``output = gate(sigmoid, ...)``) starts with zero weight and bias
  ``logit(1/C)``, so every branch gate is ``1/C`` for any input and the layer starts as the plain
  average of its ``C`` branch outputs; learned pooling ``k_pool``/``v_pool`` (``pool = linear``)
  starts as exact mean pooling with a zero position embedding (``pool = mlp``: PyTorch's default
  Linear init, zero position embedding); an indexer's projections keep SparseAttention's init
  (``IndexerProjection``), and train on the index loss: ``loss = out.loss + index_loss(model)``;
* ``config.nsa_dsl`` records the spec (its text and block name): ``save_pretrained`` writes it
  into ``config.json`` and :func:`from_pretrained` rebuilds the NSA model from it;
* the model's attention implementation becomes ``"nsa_dsl"``, registered in transformers'
  ``AttentionInterface`` and ``AttentionMaskInterface``: transformers then builds no dense
  ``[T, T]`` masks (NSA layers are causal by construction); the mask function hands each layer
  only the padding of its query tokens. The attention itself runs inside the NSA layers (the
  attention interface's ``(q, k, v, mask)`` call has neither the hidden states the gates read
  nor the layer's pooling weights and cache).

Inputs the NSA layers take:

* a batch ``[B, T]``, optionally with a 2-D ``attention_mask`` (left or right padding): the
  real tokens of each row run as one sequence (packed), pads output 0;
* packed sequences without padding: ``input_ids [1, N]`` with ``position_ids`` restarting at 0
  at each sequence (transformers' ``DataCollatorWithFlattening``), or ``cu_seq_lens_q`` (its
  flash-attention kwargs), or ``cu_seqlens=`` passed to the model: each sequence is computed as
  if alone (``SparseAttention(..., cu_seqlens=...)``);
* a transformers ``Cache`` (``model.generate()``, ``use_cache=True``): each NSA layer keeps an
  :class:`~nsa_dsl.runtime.kv_cache.NSACache` in its slot of the cache, an
  :class:`NSACacheLayer` (a transformers ``CacheLayerMixin``). The default ``DynamicCache``
  that ``generate()`` makes is adopted: an empty slot is replaced by an NSA layer on the first
  forward, so plain ``model.generate()`` decodes through the NSA cache; :class:`NSAModelCache`
  is the same cache made up front (``max_len`` sizes it once). A prompt that starts a sequence
  runs the full NSA op (the training kernels on CUDA) and fills the cache; later chunks (one
  token while decoding) run the decode path of SparseAttention. The cache grows (by doubling)
  when a sequence outgrows it. Gradients do not flow into keys already in a cache.

Not supported (clear errors): 4-D custom attention masks (E721), a cache that already holds
dense keys, ``crop()`` (assisted decoding) (E723), families other than the four above (E720).
"""
from __future__ import annotations

import inspect
import json
import os
import sys
import weakref
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError("nsa_dsl.integrations.transformers needs transformers 5.x: "
                      "pip install 'nsa-dsl[transformers]'") from e

from nsa_dsl.errors import SpecError
from nsa_dsl.language.ir import Spec
from nsa_dsl.language.parser import as_spec
from nsa_dsl.runtime.kv_cache import NSACache
from nsa_dsl.runtime.module import SparseAttention

if int(transformers.__version__.split(".")[0]) < 5:  # pragma: no cover
    raise ImportError(f"nsa_dsl.integrations.transformers needs transformers 5.x, found {transformers.__version__}: "
                      "pip install 'nsa-dsl[transformers]'")

__all__ = ["convert", "from_pretrained", "index_loss", "NSAAttention", "NSACacheLayer", "NSAModelCache",
           "ATTN_IMPLEMENTATION", "CONFIG_KEY", "CACHE_ARG", "SUPPORTED_MODEL_TYPES", "spec_of"]

#: The attention implementation a converted model runs under (``config._attn_implementation``).
ATTN_IMPLEMENTATION = "nsa_dsl"
#: The config field that records the spec: ``{"spec": text, "name": block name, "version": 1}``.
CONFIG_KEY = "nsa_dsl"
CONFIG_VERSION = 1
#: ``config.model_type`` of the families convert() takes (their attention layers have the same
#: projections, rotary and cache calls; Qwen2 adds q/k/v biases, Qwen3 per-head q/k norms).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: Submodules an NSAAttention takes over from the dense layer (their state-dict names are kept).
ADOPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
#: The name under which models and generate() take a cache: ``cache`` from transformers 5.25 on
#: (``past_key_values`` still accepted there, with a warning), ``past_key_values`` before.
CACHE_ARG = ("cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters
             else "past_key_values")
#: Room left after a prompt when the cache is first sized by it (tokens; then it doubles).
DECODE_ROOM = 256


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------

class HFRotary:
    """``rotary(q, k, positions)`` for SparseAttention from a transformers model's rotary embedding:
    ``cos, sin = rotary_emb(q, positions[None])`` and the family's ``apply_rotary_pos_emb`` on
    ``[B, T, H, D]`` tensors. A plain object (not a submodule): the embedding stays registered
    once, at ``model.model.rotary_emb``, and follows the model's ``.to()``."""

    def __init__(self, rotary_emb: torch.nn.Module, apply_fn):
        self.rotary_emb, self.apply_fn = rotary_emb, apply_fn

    def __call__(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        cos, sin = self.rotary_emb(q, positions[None])          # [1, T, D] each, q's dtype
        return self.apply_fn(q, k, cos, sin, unsqueeze_dim=2)

    def __repr__(self) -> str:
        return f"HFRotary({type(self.rotary_emb).__name__})"


class NSAAttention(SparseAttention):
    """A transformers self-attention layer that is a ``SparseAttention`` of ``spec``.

    Built by :func:`convert` from a dense attention layer ``attn``: adopts its projections, q/k
    norms and softmax scale; ``rotary`` is the model's (:class:`HFRotary`). Takes the keyword
    arguments transformers' decoder layers pass (``hidden_states``, ``attention_mask``,
    ``position_ids``, ``past_key_values`` / ``cache``, ...) and returns ``(output, None)`` (no
    attention weights). ``layer_idx`` is its slot in a transformers cache.
    """

    def __init__(self, spec: Spec, attn: torch.nn.Module, config, rotary: HFRotary, *,
                 layer_idx: int, backend: str = "auto"):
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = attn.head_dim
        _check_shapes(spec, heads=heads, kv_heads=kv_heads, qk_dim=head_dim, v_dim=head_dim)
        w = attn.q_proj.weight
        super().__init__(spec, config.hidden_size, heads=heads, kv_heads=kv_heads, qk_dim=head_dim,
                         v_dim=head_dim, bias=attn.q_proj.bias is not None, rotary=rotary, backend=backend,
                         scale=getattr(attn, "scaling", None), q_norm=getattr(attn, "q_norm", None),
                         k_norm=getattr(attn, "k_norm", None), device=w.device, dtype=w.dtype)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):   # the modules themselves: no copy
            setattr(self, name, getattr(attn, name))
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.is_causal = True
        self.index_loss: Optional[torch.Tensor] = None

    def project(self, x: torch.Tensor):
        """SparseAttention's projections, then q and k in v's dtype: under autocast with float32
        weights a q/k norm (Qwen3's RMSNorm: ``weight * x``) returns float32 beside a bf16 v,
        and the op takes one dtype (dense attention gets the same cast from autocast's SDPA)."""
        q, k, v = super().project(x)
        return q.to(v.dtype), k.to(v.dtype), v

    def new_parameter_names(self) -> list[str]:
        """State-dict names (relative to this layer) of the parameters the spec added."""
        return [n for n in self.state_dict() if n.split(".")[0] not in ADOPTED]

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, cache=None, position_ids=None, **kwargs):
        x = hidden_states
        hf_cache = cache if cache is not None else past_key_values
        pad = _query_padding(attention_mask, x)                 # None, or bool [B, T]: real tokens
        if hf_cache is not None:
            if kwargs.get("cu_seqlens") is not None or kwargs.get("cu_seq_lens_q") is not None:
                raise SpecError("E706", "packed sequences (cu_seqlens) together with a KV cache",
                                hint="run packed batches with use_cache=False")
            return _cache_slot(hf_cache, self.layer_idx).forward(self, x, pad), None
        cu = _packed_offsets(kwargs, position_ids, x)
        if pad is not None:
            if cu is not None:
                raise SpecError("E721", "an attention mask with padding together with packed sequences "
                                        "(position_ids restarting, or cu_seqlens)",
                                hint="pack without padding, or pad without packing")
            return _run_padded(self, x, pad), None
        if cu is not None:
            B, T, D = x.shape
            y = self.full(x.reshape(1, B * T, D), cu_seqlens=cu)
            return y.reshape(B, T, D), None
        return self.full(x), None

    def full(self, x: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        """SparseAttention's forward without a cache. A spec with an indexer, training: the
        layer keeps its index loss (the mean KL of each indexer-scored select branch, with its
        graph) in ``self.index_loss`` for :func:`index_loss` to collect; else it is None."""
        self.index_loss = None
        if len(getattr(self, "indexer", ())) and self.training and torch.is_grad_enabled():
            y, aux = SparseAttention.forward(self, x, cu_seqlens=cu_seqlens, return_aux=True)
            self.index_loss = sum(loss.mean() for loss in aux.index_loss.values())
            return y
        return SparseAttention.forward(self, x, cu_seqlens=cu_seqlens)

    def prefill(self, x: torch.Tensor, nsa: NSACache, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A chunk that starts every sequence of ``nsa`` (an empty cache): the full op for the
        outputs (the training kernels on CUDA, differentiable; padded rows packed as in
        :func:`_run_padded`), then the keys and values of the real tokens appended to the cache.
        (Specs with an indexer do not come here: SparseAttention's cached path fills their
        indexer keys.)"""
        if valid is None:
            y, n_new = self.full(x), None
        else:
            y = _run_padded(self, x, valid)
            x, n_new = _compact(x, valid)
        with torch.no_grad():
            q, k, v = self.project(x)
            if self.rotary is not None:                 # every row starts at position 0
                q, k = self._rotate(q, k, x.shape[1])
            nsa.append(k.to(nsa.dtype), v.to(nsa.dtype), n_new=n_new,
                       pool=self._pool_blocks if len(self.k_pool) else None)
        return y


def index_loss(model) -> torch.Tensor:
    """The index losses of the model's NSA layers from its last training forward, summed (0 for
    specs without an indexer): ``loss = out.loss + index_loss(model)`` trains the indexers (their
    top-k selection passes no gradient to them otherwise). Each layer's is cleared."""
    losses = []
    for layer in model.modules():
        if isinstance(layer, NSAAttention) and getattr(layer, "index_loss", None) is not None:
            losses.append(layer.index_loss)
            layer.index_loss = None
    return sum(losses) if losses else torch.zeros((), device=next(model.parameters()).device)


def _check_shapes(spec: Spec, **model_shapes) -> None:
    for field, value in model_shapes.items():
        declared = getattr(spec, field)
        if declared is not None and declared != value:
            raise SpecError("E701", f"spec '{spec.name}' declares {field} = {declared}, but the model's "
                                    f"attention has {field} = {value}",
                            hint=f"remove `{field} = ...` from the spec (convert() takes the model's shapes), "
                                 f"or declare {field} = {value}")


def _query_padding(mask, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The padding of the layer's query tokens: None (none), or a bool ``[B, T]`` (True: real),
    as the ``nsa_dsl`` mask function hands it (:func:`_nsa_mask`)."""
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == tuple(x.shape[:2]):
        return mask.to(torch.bool)
    shape = list(mask.shape) if hasattr(mask, "shape") else type(mask).__name__
    raise SpecError("E721", f"the NSA layers take no {shape} attention mask: they are causal and read "
                            f"padding from a 2-D mask [batch, tokens] (attention_mask=) only",
                    hint=f"pass a 2-D attention_mask, and keep the model's attention implementation "
                         f"'{ATTN_IMPLEMENTATION}' (model.set_attn_implementation('{ATTN_IMPLEMENTATION}'))")


_PACKED_LAST: list = [None]      # (weakref to position_ids, its version, cu_seqlens): the last answer


def _packed_offsets(kwargs: dict, position_ids, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``cu_seqlens`` of packed sequences (over the flattened ``[B * T]`` rows), or None when
    every row is one sequence: ``cu_seqlens=`` / ``cu_seq_lens_q`` as given, else from
    ``position_ids`` (a new sequence wherever the position is not the previous one + 1).
    The decoder layers share one ``position_ids`` tensor: it is read once per forward."""
    for key in ("cu_seqlens", "cu_seq_lens_q"):
        cu = kwargs.get(key)
        if cu is not None:
            return cu.to(device=x.device)
    if position_ids is None or x.shape[1] < 2:
        return None
    last = _PACKED_LAST[0]
    if last is not None and last[0]() is position_ids and last[1] == position_ids._version:
        return last[2]
    B, T = x.shape[:2]
    pos = position_ids.expand(B, T).reshape(-1)
    start = torch.ones_like(pos, dtype=torch.bool)
    start[1:] = pos[1:] != pos[:-1] + 1
    start[::T] = True                                   # every row starts a sequence
    cu = None
    if int(start.sum()) > B:
        cu = F.pad(torch.nonzero(start).flatten(), (0, 1), value=B * T).to(torch.int32)
    _PACKED_LAST[0] = (weakref.ref(position_ids), position_ids._version, cu)
    return cu


def _run_padded(layer: NSAAttention, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Padded rows without a cache: each row's real tokens packed as one sequence; pads output 0."""
    counts = valid.sum(1)
    cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    y = layer.full(x[valid][None], cu_seqlens=cu)
    out = x.new_zeros(x.shape[0], x.shape[1], y.shape[-1])
    out[valid] = y[0].to(out.dtype)
    return out


def _compact(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Each row's real tokens moved to its front, in order (the rest: pads); with their counts."""
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    return x.gather(1, order[..., None].expand(-1, -1, x.shape[-1])), valid.sum(1).tolist()


def _compact_mask(counts: list[int], C: int, device) -> torch.Tensor:
    """``[B, C]`` bool: the first ``counts[b]`` positions of row ``b`` (where _compact put them)."""
    return torch.arange(C, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]


def _nsa_attention(module, query, key, value, attention_mask, **kwargs):
    """``AttentionInterface`` entry for ``"nsa_dsl"``: only an attention layer convert() did not
    replace calls it."""
    raise SpecError("E720", f"{type(module).__name__} runs under attn_implementation '{ATTN_IMPLEMENTATION}' but "
                            "is not an NSA layer",
                    hint="convert the model with nsa_dsl.integrations.transformers.convert(model, spec)")


def _nsa_mask(batch_size=None, q_length=None, kv_length=None, kv_offset=0, attention_mask=None, **kwargs):
    """``AttentionMaskInterface`` entry for ``"nsa_dsl"``: no dense mask (NSA is causal by
    construction); the padding of the query tokens, bool ``[B, q_length]``, when there is any."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    end = kv_offset + kv_length
    m = attention_mask[:, max(end - q_length, 0):end].to(torch.bool)
    return None if bool(m.all()) else m


AttentionInterface.register(ATTN_IMPLEMENTATION, _nsa_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _nsa_mask)


# ----------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------

class NSACacheLayer(CacheLayerMixin):
    """One layer's slot in a transformers ``Cache``: an :class:`~nsa_dsl.runtime.kv_cache.NSACache`
    that the layer's :class:`NSAAttention` fills (there is no dense ``update()``).

    ``max_len``: the first size of the NSACache (default: the first chunk + ``DECODE_ROOM``); it
    doubles when a sequence outgrows it (the keys are appended to a larger cache). ``seen`` is
    the number of tokens transformers has fed (padding included), which ``get_seq_length()``
    reports; the NSACache holds the real tokens of each sequence.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, max_len: Optional[int] = None, **kwargs):
        super().__init__()
        if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
            raise SpecError("E801", f"NSACacheLayer: max_len must be a positive integer, got {max_len!r}")
        self.max_len = max_len
        self.nsa: Optional[NSACache] = None
        self.seen = 0
        self._layer = None             # weakref to the NSAAttention that fills it

    def __repr__(self) -> str:
        return f"NSACacheLayer(seen={self.seen}, {self.nsa!r})"

    # -- what NSAAttention calls -------------------------------------------------------------
    def forward(self, layer: NSAAttention, x: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
        """Append the chunk ``x [B, C, hidden]`` (``valid``: its real tokens) and return its outputs."""
        B, C, _ = x.shape
        self._layer = weakref.ref(layer)
        nsa = self._reserve(layer, B, C)
        self.seen += C
        if max(nsa.lengths_host) == 0 and not layer.spec.of_kind("indexer"):
            return layer.prefill(x, nsa, valid)
        if valid is None:
            return SparseAttention.forward(layer, x, cache=nsa)
        # real tokens first in each row, appended with n_new; outputs put back in place, pads 0
        xc, counts = _compact(x, valid)
        y = SparseAttention.forward(layer, xc, cache=nsa, n_new=counts)
        out = y.new_zeros(y.shape)
        out[valid] = y[_compact_mask(counts, C, x.device)]
        return out

    def _reserve(self, layer: NSAAttention, B: int, C: int) -> NSACache:
        if self.nsa is None:
            if self.seen:
                raise SpecError("E723", f"this cache slot saw {self.seen} tokens but holds no NSA keys",
                                hint="start generation from a fresh cache")
            self.nsa = layer.new_cache(B, max(self.max_len or 0, C + DECODE_ROOM))
        elif B != self.nsa.batch_size:
            raise SpecError("E809", f"x has batch {B}; the NSA cache holds {self.nsa.batch_size} sequences",
                            hint="a new cache for a new batch (generate() makes one)")
        need = max(self.nsa.lengths_host) + C
        if need > self.nsa.max_len:
            self.nsa = _rebuild(layer, self.nsa, None, max(need, 2 * self.nsa.max_len))
        return self.nsa

    # -- transformers' CacheLayerMixin -------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        raise SpecError("E723", "an NSA cache slot is filled by its NSA layer, not with dense keys")

    def update(self, key_states, value_states, *args, **kwargs):
        raise SpecError("E723", "an NSA cache slot takes no dense update(): it holds compressed blocks and "
                                "raw keys for its NSA layer only",
                        hint="a model with dense attention layers needs its own cache")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1                                        # grows

    def reset(self) -> None:
        if self.nsa is not None:
            self.nsa.reset()
        self.seen = 0

    def offload(self):                                   # kept on its device
        pass

    def prefetch(self):
        pass

    def crop(self, tokens_to_remove: int) -> None:
        raise SpecError("E723", "an NSA cache cannot drop tokens (crop): its compressed blocks are pooled "
                                "already", hint="assisted / speculative decoding is not supported")

    def _select(self, rows: list[int]) -> None:
        if self.nsa is None:
            return
        if max(self.nsa.lengths_host) == 0:        # nothing kept: the next chunk allocates for its batch
            self.nsa = None
            return
        layer = self._layer() if self._layer is not None else None
        if layer is None:
            raise SpecError("E723", "this NSA cache slot has lost its layer (the model was freed)")
        self.nsa = _rebuild(layer, self.nsa, rows, self.nsa.max_len)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select([int(i) for i in beam_idx.tolist()])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select([int(i) for i in indices.tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.nsa is not None:
            self._select([b for b in range(self.nsa.batch_size) for _ in range(repeats)])


def _rebuild(layer: NSAAttention, old: NSACache, rows: Optional[list[int]], max_len: int) -> NSACache:
    """A new NSACache of ``max_len`` holding the sequences ``rows`` of ``old`` (all by default):
    their keys and values appended again (pooling their blocks again, learned pools included)."""
    lengths = list(old.lengths_host)
    rows = list(range(old.batch_size)) if rows is None else rows
    new = layer.new_cache(len(rows), max_len, dtype=old.dtype, device=old.device)
    counts = [lengths[r] for r in rows]
    L = max(counts, default=0)
    if L:
        idx = torch.tensor(rows, device=old.device)
        name = old.spec.attention_names[0]
        k_idx = {n: t[idx, :L] for n, t in old.k_idx.items()} or None
        new.append(old.k[name][idx, :L], old.v[name][idx, :L], n_new=counts,
                   pool=layer._pool_blocks if len(layer.k_pool) else None, k_idx=k_idx)
    return new


def _cache_slot(cache, layer_idx: int) -> NSACacheLayer:
    """The NSA slot of ``layer_idx`` in a transformers ``Cache``: an :class:`NSACacheLayer` as is;
    an empty slot of another kind (generate()'s DynamicCache) is replaced by one."""
    if not isinstance(cache, Cache):
        raise SpecError("E723", f"the NSA layers take a transformers Cache, got {type(cache).__name__}",
                        hint="pass a Cache (NSAModelCache(model)), or none")
    layers = cache.layers
    while len(layers) <= layer_idx:
        layers.append(NSACacheLayer())
    slot = layers[layer_idx]
    if isinstance(slot, NSACacheLayer):
        return slot
    if slot.get_seq_length() > 0:
        raise SpecError("E723", f"cache layer {layer_idx} holds {slot.get_seq_length()} dense keys "
                                f"({type(slot).__name__}); an NSA layer cannot continue from them",
                        hint="start from a fresh cache (generate() makes one), or NSAModelCache(model)")
    layers[layer_idx] = slot = NSACacheLayer()
    return slot


class NSAModelCache(Cache):
    """A transformers ``Cache`` of :class:`NSACacheLayer` slots, one per decoder layer:
    ``model.generate(ids, past_key_values=NSAModelCache(model, max_len=4096))`` (transformers
    names the argument ``cache`` from 5.25 on; both are accepted there). ``max_len`` sizes each
    layer's NSACache once (it still doubles when outgrown). ``generate()`` without it adopts its
    own ``DynamicCache`` instead (:func:`_cache_slot`)."""

    def __init__(self, model_or_config, max_len: Optional[int] = None):
        config = getattr(model_or_config, "config", model_or_config)
        n = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[NSACacheLayer(max_len) for _ in range(n)])


# ----------------------------------------------------------------------------------------------
# convert, spec_of, from_pretrained
# ----------------------------------------------------------------------------------------------

def _decoder(model):
    """``(decoder model with .layers and .rotary_emb, config)`` of a supported causal LM."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SpecError("E720", f"convert() takes causal LMs of the model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
                                f"got {type(model).__name__} (model_type {model_type!r})",
                        hint="load one with AutoModelForCausalLM (LlamaForCausalLM, Qwen3ForCausalLM, ...)")
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    if not (hasattr(base, "layers") and hasattr(base, "rotary_emb")):
        raise SpecError("E720", f"{type(model).__name__}: no decoder layers with a rotary embedding found "
                                f"(expected model.{getattr(model, 'base_model_prefix', 'model')}.layers and .rotary_emb)")
    return base, config


def convert(model, spec, *, name: Optional[str] = None, backend: str = "auto"):
    """Make every self-attention layer of ``model`` an :class:`NSAAttention` of ``spec``, in place;
    returns ``model``. See the module docstring for what is adopted, added and recorded.

    Args:
        model: a transformers causal LM of the Llama, Mistral, Qwen2 or Qwen3 family.
        spec: a :class:`~nsa_dsl.language.ir.Spec`, a ``.nsa`` path or spec text (``name`` picks
            a block of several). It must be causal and leave out shape fields or match the model's.
        backend: SparseAttention's: ``"auto"`` (kernels for CUDA inputs, the reference
            otherwise), ``"reference"`` or ``"kernels"``.
    """
    spec = as_spec(spec, name)
    base, config = _decoder(model)
    if not spec.causal:
        raise SpecError("E720", f"spec '{spec.name}' is not causal (causal = false); a causal LM needs causal attention",
                        hint="declare causal = true")
    if not spec.source:
        raise SpecError("E720", f"spec '{spec.name}' has no source text to record in the model's config",
                        hint="build it with nsa_dsl.parse(text) or nsa_dsl.load(path)")
    layers = list(base.layers)
    if any(isinstance(layer.self_attn, NSAAttention) for layer in layers):
        raise SpecError("E720", f"{type(model).__name__} is converted already",
                        hint="convert a dense model, or load a saved NSA model with from_pretrained()")
    head_dim = layers[0].self_attn.head_dim if layers else 0
    w = layers[0].self_attn.q_proj.weight if layers else None
    if w is not None and (backend == "kernels" or (backend == "auto" and w.is_cuda)) \
            and (head_dim % 16 or not 16 <= head_dim <= 256):
        raise SpecError("E605", f"the model's head_dim is {head_dim}; the generated kernels take multiples of "
                                f"16 from 16 to 256", hint="convert(..., backend='reference') runs any head dim")
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        apply_fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None) or _apply_rotary
        layer.self_attn = NSAAttention(spec, attn, config, HFRotary(base.rotary_emb, apply_fn),
                                       layer_idx=getattr(attn, "layer_idx", i), backend=backend)
    setattr(config, CONFIG_KEY, {"version": CONFIG_VERSION, "spec": spec.source, "name": spec.name})
    try:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    except (ValueError, AttributeError, ImportError):    # older 5.x checks: set the config field itself
        config._attn_implementation = ATTN_IMPLEMENTATION
    return model


def _apply_rotary(q, k, cos, sin, unsqueeze_dim=1):
    """Rotary as the Llama family applies it (rotate_half), for a module that does not define it."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rot(x):
        x1, x2 = x[..., :x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def spec_of(config) -> Optional[Spec]:
    """The spec a converted model's config records (``config.nsa_dsl``), or None."""
    field = getattr(config, CONFIG_KEY, None)
    if field is None:
        return None
    if not isinstance(field, dict) or "spec" not in field or field.get("version") != CONFIG_VERSION:
        raise SpecError("E722", f"config.{CONFIG_KEY} is not a spec record of version {CONFIG_VERSION}: {field!r}")
    return as_spec(field["spec"], field.get("name"))


def from_pretrained(path: Union[str, os.PathLike], *, backend: str = "auto", **kwargs):
    """Load a model saved by ``save_pretrained`` after :func:`convert`: the dense model with
    ``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` (dtype, device_map, ... as there),
    converted with the spec its config records, then the spec's own parameters from the same
    checkpoint (safetensors, one file or sharded)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(path)
    spec = spec_of(config)
    if spec is None:
        raise SpecError("E722", f"{path}: config.json has no '{CONFIG_KEY}' field: not a model saved after convert()",
                        hint="load the dense model with transformers and call convert(model, spec)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()         # the NSA weights are "unexpected" to the dense model: loaded below
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    convert(model, spec, backend=backend)
    wanted = {}
    for prefix, module in model.named_modules():
        if isinstance(module, NSAAttention):
            wanted.update({f"{prefix}.{n}": (module, n) for n in module.new_parameter_names()})
    found = _read_tensors(path, set(wanted))
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise SpecError("E722", f"{path}: the checkpoint lacks {len(missing)} NSA weights, e.g. {missing[:3]}",
                        hint="save the converted model with model.save_pretrained(dir)")
    with torch.no_grad():
        for key, tensor in found.items():
            module, name = wanted[key]
            module.state_dict(keep_vars=True)[name].copy_(tensor)
    return model


def _read_tensors(path, keys: set) -> dict:
    """``keys`` from the safetensors checkpoint at ``path`` (a folder or a hub id)."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    def find(filename):
        return cached_file(str(path), filename, _raise_exceptions_for_missing_entries=False)

    index = find("model.safetensors.index.json")
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        files = sorted({weight_map[k] for k in keys if k in weight_map})
    else:
        files = ["model.safetensors"]
    out = {}
    for filename in files:
        file = find(filename)
        if file is None:
            raise SpecError("E722", f"{path}: no {filename} (the NSA weights are read from safetensors files)")
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if k in keys})
    return out
