"""What a decode cache holds, layer by layer, in entries and bytes, and what a full-attention
model of the same shape would hold at the same context."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hamjax import ops
from hamjax.nn.model import LanguageModel, ModelCache

POSITION_BYTES = 4  # every cached entry keeps its int32 position


class LayerMemory(NamedTuple):
    """One layer's decode cache for one row: entries (KV entries held, summed over heads), slots
    (entries allocated, summed over heads), entry_bytes (bytes of one entry: key, value and bookkeeping), kv_bytes
    (allocated KV bytes = slots * entry_bytes), state_bytes (fixed-size RNN and conv state),
    full_attention_bytes (the KV bytes of a full-attention layer with the same heads, key and
    value sizes and cache dtype at this context: context * heads * ((K + V) * itemsize + 4)); dtype:
    the dtype its keys and values are held in ("" for GDN, which holds none)."""

    kind: str
    entries: int
    slots: int
    entry_bytes: int
    kv_bytes: int
    state_bytes: int
    full_attention_bytes: int
    dtype: str

    @property
    def used_bytes(self) -> int:
        """Bytes of the entries held: entries * entry_bytes."""
        return self.entries * self.entry_bytes


def _bytes(arrays, leading: int) -> int:
    """Bytes of `arrays` per index of their first `leading` axes (1: per row; 3: per [B, H, S] slot)."""
    return sum(int(np.prod(a.shape[leading:])) * a.dtype.itemsize for a in arrays)


def kv_entry_bytes(key_dim: int, value_dim: int, dtype=jnp.float32) -> int:
    """Bytes of one HAM KV-cache entry (ops.KVCache: key and value in `dtype`, int32 position, fp32 score)."""
    return _bytes(jax.eval_shape(lambda: ops.init_kv_cache(1, 1, 1, key_dim, value_dim, dtype)).slot_arrays, 3)


def cache_memory(model: LanguageModel, cache: ModelCache, context: int, row: int = 0) -> list[LayerMemory]:
    """The memory of row `row` of `cache` (from model.init_cache / extend / generate) at `context`
    tokens seen, one LayerMemory per block."""
    c = model.config
    full = context * c.heads * ((c.key_dim + c.value_dim) * c.kv_cache_dtype.itemsize + POSITION_BYTES)
    layers = []
    for kind, layer in zip(c.mixers, cache.layers):
        if kind == "gdn":
            layers.append(LayerMemory(kind, 0, 0, 0, 0, _bytes((layer.rnn, layer.conv), 1), full, ""))
            continue
        if kind == "ham":
            kv, entries = layer.ham.cache, int(jnp.sum(layer.ham.cache.count[row]))
            state = _bytes((layer.ham.rnn, layer.conv), 1)
        else:
            kv, entries = layer, int(jnp.sum(layer.occupied[row]))
            state = 0 if layer.conv is None else _bytes((layer.conv,), 1)
        slots = kv.keys.shape[2] * c.heads
        entry = _bytes(kv.slot_arrays, 3)
        layers.append(LayerMemory(kind, entries, slots, entry, slots * entry, state, full, str(kv.keys.dtype)))
    return layers
