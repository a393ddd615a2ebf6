"""Multi-head causal softmax attention, full or sliding-window, with RoPE: the Transformer baseline."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hamjax import ops
from hamjax.nn.conv import ShortConv
from hamjax.nn.mixer import MixerStats, check_cache_size
from hamjax.ops import validation
from hamjax.ops.segments import segment_index


class AttentionCache(NamedTuple):
    """S slots per row and head, written round-robin (slot = position mod S): keys [B, H, S, K]
    (RoPE applied), values [B, H, S, K], positions [B, H, S] int32 (-1: empty), position [B] int32
    (the next token's); conv [B, W-1, 3HK]: the short convolution's state (the last W-1 projected
    q | k | v), None for a layer without one. Read by ops.dense_routed_attention like an ops.KVCache."""

    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    position: jax.Array
    conv: jax.Array | None = None

    @property
    def slot_arrays(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """keys, values, positions: the arrays with a [B, H, S] entry per slot."""
        return self.keys, self.values, self.positions

    @property
    def occupied(self) -> jax.Array:
        """[B, H, S] bool: which slots hold an entry."""
        return self.positions >= 0

    def write(self, keys, values, positions, valid) -> AttentionCache:
        """The cache after tokens keys, values [B, T, H, K] at positions [B, T] (valid [B, T]): each
        valid token among the last S positions goes to slot position mod S."""
        slots = self.keys.shape[2]
        last = jnp.max(positions, axis=1, keepdims=True)
        slot = jnp.where(valid & (positions > last - slots), positions % slots, slots)  # slots: dropped
        # One index per (row, token, head), as in ops.kv_cache: XLA then scatters in place.
        b = jnp.arange(keys.shape[0])[:, None, None]
        h = jnp.arange(keys.shape[2])[None, None, :]
        slot = slot[..., None]
        per_head = jnp.broadcast_to(positions[..., None], keys.shape[:3])
        return AttentionCache(
            self.keys.at[b, h, slot].set(keys.astype(self.keys.dtype), mode="drop"),
            self.values.at[b, h, slot].set(values.astype(self.values.dtype), mode="drop"),
            self.positions.at[b, h, slot].set(per_head, mode="drop"),
            last[:, 0] + 1,
            self.conv,
        )

    def resized(self, slots: int) -> AttentionCache:
        """The same entries in a cache of `slots` slots, each at slot position mod slots. slots may not
        be fewer than now, so no entry is dropped (the entries span fewer positions than the old
        slots, so they stay apart)."""
        validation.check_positive_int("slots", slots)
        batch, heads, now, _ = self.keys.shape
        if slots < now:
            raise ValueError(f"an attention cache of {now} slots cannot shrink to {slots} without dropping entries")
        b = jnp.arange(batch)[:, None, None]
        h = jnp.arange(heads)[None, :, None]
        slot = jnp.where(self.occupied, self.positions % slots, slots)  # slots: empty, dropped
        move = lambda a, fill: jnp.full((batch, heads, slots, *a.shape[3:]), fill, a.dtype).at[b, h, slot].set(
            a, mode="drop"
        )
        return AttentionCache(
            move(self.keys, 0), move(self.values, 0), move(self.positions, -1), self.position, self.conv
        )


class Attention(nnx.Module):
    """y = W_o[softmax_j(q_t . k_j / sqrt(head_dim)) v_j] per head, over the keys j <= t (within the
    last `window` positions, t included, when `window` is given; all of them when None). q and k are
    RoPE-rotated at their positions (base `rope_theta`; None: no RoPE). x [B, T, D] -> y [B, T, D].
    With `conv_width`, q, k and v are first each passed through a short causal depthwise
    convolution (nn.ShortConv over the projections q | k | v; no activation), as in Zoology's
    stronger attention baselines: then one layer can match a query with the token after its key.

    Parameters: q_proj, k_proj, v_proj [D, H head_dim], out_proj [H head_dim, D] (param_dtype), no
    biases; conv [W, 3 H head_dim] with conv_width; projections in `dtype`, the softmax in float32;
    the decode cache's keys and values in `cache_dtype`.
    """

    def __init__(
        self,
        d_model: int,
        heads: int,
        head_dim: int,
        *,
        window: int | None = None,
        rope_theta: float | None = 10000.0,
        conv_width: int | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        cache_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        for name, value in (("d_model", d_model), ("heads", heads), ("head_dim", head_dim)):
            validation.check_positive_int(name, value)
        if window is not None:
            validation.check_positive_int("window", window)
        if conv_width is not None:
            validation.check_positive_int("conv_width", conv_width)
        if rope_theta is not None:
            validation.check_positive_float("rope_theta", rope_theta)
            if head_dim % 2:
                raise ValueError(f"RoPE needs an even head_dim, got {head_dim} (or pass rope_theta=None)")
        self.d_model, self.heads, self.head_dim = d_model, heads, head_dim
        self.window, self.rope_theta, self.cache_dtype = window, rope_theta, cache_dtype
        linear = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(d_model, heads * head_dim)
        self.k_proj = linear(d_model, heads * head_dim)
        self.v_proj = linear(d_model, heads * head_dim)
        self.out_proj = linear(heads * head_dim, d_model)
        qkv = 3 * heads * head_dim
        self.conv = None if conv_width is None else ShortConv(qkv, conv_width, param_dtype=param_dtype, rngs=rngs)

    def init_cache(self, batch: int, max_len: int, capacity: int | None = None) -> AttentionCache:
        """An empty cache of S = min(window, max_len) slots (max_len for full attention; max_len: the
        longest context a decode will reach; past it the oldest entries are overwritten). capacity
        (hamjax.nn.mixer's protocol) bounds nothing here."""
        check_cache_size(batch, max_len, capacity)
        slots = min(self.window or max_len, max_len)
        keys = jnp.zeros((batch, self.heads, slots, self.head_dim), self.cache_dtype)
        positions = jnp.full((batch, self.heads, slots), -1, jnp.int32)
        conv = None if self.conv is None else self.conv.init_state(batch)
        return AttentionCache(keys, keys, positions, jnp.zeros((batch,), jnp.int32), conv)

    def __call__(self, x, *, cache: AttentionCache | None = None, segment_ids=None, valid=None):
        """x [B, T, D]; cache from `init_cache` or a previous call: the tokens continue at its
        position and also attend to its entries (None: positions 0..T-1, no cache kept); segment_ids
        [B, T] (a query sees only the keys of its own segment, a run of equal ids; not with a cache);
        valid [B, T] (False = padding: never a key nor cached, though the position counts it;
        outputs there are to be ignored). Returns (y [B, T, D], the new cache or None, MixerStats()
        (none measured)).
        """
        validation.check_sequence_inputs(x, self.d_model, segment_ids, valid)
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids are not supported together with a cache")
        batch, t, _ = x.shape
        shape = (batch, t, self.heads, self.head_dim)
        q, k, v, conv = self._project(x, cache, segment_ids, valid)
        q, k, v = (a.reshape(shape) for a in (q, k, v))
        start = jnp.zeros((batch,), jnp.int32) if cache is None else cache.position
        positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)
        if self.rope_theta is not None:
            rope_positions = positions[:1] if cache is None else positions  # without a cache every row has 0..T-1
            q, k = (ops.apply_rope(a, rope_positions, self.rope_theta) for a in (q, k))
        valid = jnp.ones((batch, t), bool) if valid is None else jnp.asarray(valid, bool)
        logit_scale = jnp.full((self.heads,), self.head_dim**-0.5, jnp.float32)
        if cache is not None and t == 1:
            # Decode step: write the token in its slot, then read the cache in place (no copy of it).
            cache = cache.write(k, v, positions, valid)._replace(conv=conv)
            o = ops.attend(
                q, positions, cache.keys, cache.values, cache.positions, cache.occupied,
                logit_scale=logit_scale, window=self.window,
            )
            return self.out_proj(o.reshape(batch, t, -1)), cache, MixerStats()
        o = ops.dense_routed_attention(
            q,
            k,
            v,
            jnp.broadcast_to(valid[..., None], shape[:3]),
            positions,
            logit_scale=logit_scale,
            segment_ids=None if segment_ids is None else segment_index(segment_ids),
            cache=cache,
            window=self.window,
            blockwise=True,
        )
        y = self.out_proj(o.reshape(batch, t, -1))
        return y, None if cache is None else cache.write(k, v, positions, valid)._replace(conv=conv), MixerStats()

    def _project(self, x, cache, segment_ids, valid):
        """q, k, v [B, T, H head_dim] (through the conv when the layer has one) and its new state (None without
        a conv or without a cache; a call without a cache starts the conv from zeros)."""
        q, k, v = (proj(x) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.conv is None:
            return q, k, v, None
        state = self.conv.init_state(x.shape[0]) if cache is None else cache.conv
        qkv, state = self.conv(jnp.concatenate([q, k, v], axis=-1), state, segment_ids=segment_ids, valid=valid)
        return *jnp.split(qkv, 3, axis=-1), None if cache is None else state
