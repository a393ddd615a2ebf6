"""What a decode cache holds, layer by layer, in entries and bytes, and what a full-attention
model of the same shape would hold at the same context."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hamjax import ops
from hamjax.nn.model import LanguageModel

POSITION_BYTES = 4  # every cached entry keeps its int32 position


class LayerMemory(NamedTuple):
    """One layer's decode cache for one row: entries (KV entries held, summed over heads), slots
    (entries allocated, summed over heads), entry_bytes (bytes of one entry: key, value and bookkeeping), kv_bytes
    (allocated KV bytes = slots * entry_bytes), state_bytes (fixed-size RNN and conv state),
    full_attention_bytes (the KV bytes of a full-attention layer with the same heads and key and
    value sizes at this context: context * heads * ((K + V) * 4 + 4))."""

    kind: str
    entries: int
    slots: int
    entry_bytes: int
    kv_bytes: int
    state_bytes: int
    full_attention_bytes: int

    @property
    def used_bytes(self) -> int:
        """Bytes of the entries held: entries * entry_bytes."""
        return self.entries * self.entry_bytes


def kv_entry_bytes(key_dim: int, value_dim: int) -> int:
    """Bytes of one HAM KV-cache entry (ops.KVCache: fp32 key and value, int32 position, fp32 score)."""
    empty = jax.eval_shape(lambda: ops.init_kv_cache(1, 1, 1, key_dim, value_dim))
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in (empty.keys, empty.values, empty.positions, empty.scores))


def cache_memory(model: LanguageModel, cache: tuple, context: int, row: int = 0) -> list[LayerMemory]:
    """The memory of row `row` of `cache` (from model.init_cache / extend / generate) at `context`
    tokens seen, one LayerMemory per block."""
    c = model.config
    full = context * c.heads * ((c.key_dim + c.value_dim) * 4 + POSITION_BYTES)
    layers = []
    for kind, layer in zip(c.mixers, cache):
        nbytes = lambda arrays: sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in arrays)
        if kind == "ham":
            kv = layer.ham.cache
            slots = kv.capacity * c.heads
            entries = int(jnp.sum(kv.count[row]))
            entry = kv_entry_bytes(c.key_dim, c.value_dim)
            state = nbytes((layer.ham.rnn, layer.conv))
        elif kind == "gdn":
            slots = entries = entry = 0
            state = nbytes((layer.rnn, layer.conv))
        else:
            slots = layer.keys.shape[2] * c.heads
            entries = int(jnp.sum(layer.occupied[row]))
            entry = (layer.keys.shape[3] + layer.values.shape[3]) * layer.keys.dtype.itemsize + POSITION_BYTES
            state = 0
        layers.append(LayerMemory(kind, entries, slots, entry, slots * entry, state, full))
    return layers
