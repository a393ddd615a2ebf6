"""The gated delta rule (Gated DeltaNet's recurrence) in recurrent, chunked and single-step forms.

Layout and meaning follow flash-linear-attention (fla): q, k [B, T, H, K]; v [B, T, H, V];
g (log decay, <= 0) and beta [B, T, H]; state [B, H, K, V]. Per head and token:

    S~  = exp(g_t) S_{t-1}                  decay first (fla's convention)
    e_t = v_t - S~^T k_t                    prediction error, returned for routing
    S_t = S~ + beta_t k_t e_t^T
    o_t = S_t^T (scale * q_t)

All state and gate math runs in float32; outputs come back in the inputs' dtype, errors and states in
float32. The chunked form is the WY/UT algorithm (fla's naive chunk) and equals the recurrent form to
float32 rounding; with bfloat16 inputs its products between chunks of tokens take bf16 operands
(accumulating in float32), as fla's kernels do, and the recurrent form stays float32 throughout.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hamjax.ops import validation
from hamjax.ops.segments import segment_starts

METHODS = ("chunk", "recurrent")
UNROLLED_CHUNKS = 8  # the chunked form loops over chunks in Python up to this many, lax.scan beyond


class DeltaRuleResult(NamedTuple):
    """output [B, T, H, V] (input dtype unless asked otherwise); state [B, H, K, V] fp32; errors e_t [B, T, H, V] fp32.

    The single step drops the T axis from output and errors.
    """

    output: jax.Array
    state: jax.Array
    errors: jax.Array


def gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale=None,
    initial_state=None,
    output_final_state: bool = False,
    method: str = "chunk",
    chunk_size: int = 64,
    segment_ids=None,
):
    """fla-compatible entry point: returns (o [B, T, H, V], final_state [B, H, K, V] or None)."""
    result = gated_delta_rule_with_errors(
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        initial_state=initial_state,
        method=method,
        chunk_size=chunk_size,
        segment_ids=segment_ids,
    )
    return result.output, (result.state if output_final_state else None)


def gated_delta_rule_with_errors(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale=None,
    initial_state=None,
    method: str = "chunk",
    chunk_size: int = 64,
    segment_ids=None,
    output_dtype=None,
) -> DeltaRuleResult:
    """The gated delta rule over a sequence, also returning the final state and the errors e_t.

    method="recurrent" scans token by token; method="chunk" uses the chunked WY/UT form with
    `chunk_size` tokens per chunk (T is padded internally to a multiple of it).
    segment_ids [B, T] (packed sequences): where the id changes, the state is reset to zero before
    that token; the final state is the last segment's. output_dtype: the output's dtype (None: the
    inputs', as fla returns it; float32 keeps the output as computed, unrounded).
    """
    _check_sequence_inputs(q, k, v, g, beta, initial_state, segment_ids)
    validation.check_choice("method", method, METHODS)
    validation.check_positive_int("chunk_size", chunk_size)
    batch, _, heads, dk = q.shape
    dv = v.shape[-1]
    out_dtype = jnp.result_type(q, k, v) if output_dtype is None else output_dtype
    scale = dk**-0.5 if scale is None else scale
    g, beta = (jnp.asarray(x, jnp.float32) for x in (g, beta))
    state = (
        jnp.zeros((batch, heads, dk, dv), jnp.float32)
        if initial_state is None
        else jnp.asarray(initial_state, jnp.float32)
    )
    starts = (
        jnp.zeros((batch, q.shape[1]), bool) if segment_ids is None else segment_starts(segment_ids)
    )
    if method == "recurrent":
        o, state, e = _recurrent(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), g, beta, scale, state, starts)
    else:
        o, state, e = _chunked(q, k, v, g, beta, scale, state, starts, chunk_size)
    return DeltaRuleResult(o.astype(out_dtype), state, e)


def gated_delta_rule_step(q, k, v, g, beta, state, *, scale=None, output_dtype=None) -> DeltaRuleResult:
    """One token: q, k [B, H, K]; v [B, H, V]; g, beta [B, H]; state [B, H, K, V].

    Returns output [B, H, V] (output_dtype; None: the inputs'), the new state and the error e_t
    [B, H, V] (fp32).
    """
    _check_step_inputs(q, k, v, g, beta, state)
    out_dtype = jnp.result_type(q, k, v) if output_dtype is None else output_dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v, g, beta, state)]
    o, new_state, e = _step(*f32, scale)
    return DeltaRuleResult(o.astype(out_dtype), new_state, e)


def _step(q, k, v, g, beta, state, scale):
    """fp32 core of one token; shapes as in `gated_delta_rule_step`. Returns (o, state, e)."""
    state = state * jnp.exp(g)[..., None, None]
    error = v - jnp.einsum("bhk,bhkv->bhv", k, state)
    state = state + k[..., :, None] * (beta[..., None] * error)[..., None, :]
    o = jnp.einsum("bhk,bhkv->bhv", q * scale, state)
    return o, state, error


def _recurrent(q, k, v, g, beta, scale, state, starts):
    """Per-token `lax.scan`; inputs fp32 in [B, T, ...] layout; starts [B, T] bool resets the state.

    Returns (o, final state, errors).
    """

    def body(carry, xs):
        *token, start = xs
        carry = jnp.where(start[:, None, None, None], 0.0, carry)
        o, carry, e = _step(*token, carry, scale)
        return carry, (o, e)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta, starts))
    state, (o, e) = jax.lax.scan(body, state, xs)
    return jnp.moveaxis(o, 0, 1), state, jnp.moveaxis(e, 0, 1)


def _to_chunks(x, chunk_size: int):
    """[B, T, H, ...] -> [B, H, N, chunk_size, ...], zero-padding T up to N * chunk_size."""
    batch, t = x.shape[:2]
    n = -(-t // chunk_size)
    x = jnp.pad(x, [(0, 0), (0, n * chunk_size - t)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(batch, n, chunk_size, *x.shape[2:])
    return jnp.moveaxis(x, 3, 1)


def _from_chunks(x, t: int):
    """[B, H, N, C, V] -> [B, t, H, V], dropping the padding."""
    batch, heads, n, c, d = x.shape
    return jnp.moveaxis(x, 1, 3).reshape(batch, n * c, heads, d)[:, :t]


def _chunked(q, k, v, g, beta, scale, state, starts, chunk_size: int):
    """Chunked WY/UT form (fla's naive chunk algorithm); inputs in [B, T, ...] layout, g and beta
    float32, q, k and v in their own dtype.

    The products between chunks of tokens (K K^T, Q K^T, the WY products and the read-outs) take
    their operands rounded to q, k and v's dtype (bfloat16 halves what the backward pass keeps of
    them) and accumulate in float32; the decays, the triangular inverse and the state carried
    between chunks are float32 throughout.

    starts [B, T] bool marks tokens whose state is reset to zero before they are read.
    Padding tokens have k = v = 0, g = beta = 0, so they leave the state untouched.
    Everything that does not depend on the state is computed for all chunks at once; the loop over
    chunks only carries S through Delta = U - W S and S' = e^{gamma_C} S + (K e^{gamma_C - gamma})^T Delta.
    Decay between tokens i >= j of a chunk is exp(g_{j+1} + ... + g_i), summed directly rather than as
    a difference of running totals, which would cancel catastrophically after a very negative g.
    """
    t, heads = q.shape[1], q.shape[2]
    operand_dtype = jnp.result_type(q, k, v)
    q = jnp.asarray(q, jnp.float32) * scale
    starts = jnp.broadcast_to(starts[:, :, None], starts.shape + (heads,))
    q, k, v = (x.astype(operand_dtype) for x in (q, k, v))
    q, k, v, g, beta, starts = (_to_chunks(x, chunk_size) for x in (q, k, v, g, beta, starts))
    segment = jnp.cumsum(starts, axis=-1)  # [B, H, N, C] segment index within the chunk
    from_start = segment == 0  # tokens that still see the state carried into the chunk
    to_end = segment == segment[..., -1:]  # tokens whose writes reach the state leaving the chunk
    same = segment[..., :, None] == segment[..., None, :]
    causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
    strict = jnp.tril(causal, -1)
    # log Gamma_ij = sum_{j < l <= i} g_l: a cumulative sum down the rows of g_l placed where l > j.
    log_decay = jnp.cumsum(jnp.where(strict, g[..., :, None], 0.0), axis=-2)
    decay = jnp.where(causal & same, jnp.exp(log_decay), 0.0)  # Gamma_ij (i >= j, same segment)
    mm = functools.partial(_matmul, operand_dtype=operand_dtype)
    k_t = jnp.swapaxes(k, -1, -2)
    kk_strict = jnp.where(strict, mm(k, k_t) * decay, 0.0)
    qk = mm(q, k_t) * decay
    e_gamma = jnp.where(from_start, jnp.exp(jnp.cumsum(g, axis=-1)), 0.0)[..., None]
    # [U W] = (I + StrictLower(beta K K^T Gamma))^-1 [beta V, beta K e^gamma]
    t_inv = unit_lower_inverse(beta[..., :, None] * kk_strict)
    u = mm(t_inv, beta[..., None] * v)
    w = mm(t_inv, beta[..., None] * k * e_gamma)
    g_from = jnp.cumsum(g[..., ::-1], axis=-1)[..., ::-1]  # sum_{l >= j} g_l
    g_after = jnp.concatenate([g_from[..., 1:], jnp.zeros_like(g_from[..., :1])], axis=-1)  # l > j
    k_to_end = k * jnp.where(to_end, jnp.exp(g_after), 0.0)[..., None]
    decay_all = jnp.where(from_start[..., -1], jnp.exp(jnp.sum(g, axis=-1)), 0.0)

    # No jax.checkpoint: the body's residuals are its inputs and the carried state, which it
    # outputs anyway.
    def body(s, xs):
        u_n, w_n, k_n, decay_n = xs
        delta = u_n - jnp.einsum("bhck,bhkv->bhcv", w_n, s)
        s_next = decay_n[..., None, None] * s + jnp.einsum("bhck,bhcv->bhkv", k_n, delta)
        return s_next, (s, delta)

    xs = (u, w, k_to_end, decay_all)  # chunks on axis 2
    n = u.shape[2]
    if n <= UNROLLED_CHUNKS:  # straight-line code: no loop for XLA to carry, stack and differentiate
        per_chunk = []
        for i in range(n):
            state, out = body(state, tuple(x[:, :, i] for x in xs))
            per_chunk.append(out)
        chunk_states, delta = (jnp.stack(parts, axis=2) for parts in zip(*per_chunk))  # [B, H, N, K|C, V]
    else:
        state, (chunk_states, delta) = jax.lax.scan(body, state, tuple(jnp.moveaxis(x, 2, 0) for x in xs))
        chunk_states, delta = jnp.moveaxis(chunk_states, 0, 2), jnp.moveaxis(delta, 0, 2)
    o = mm(q * e_gamma, chunk_states) + mm(qk, delta)
    e = v - mm(k * e_gamma, chunk_states) - mm(kk_strict, delta)
    return _from_chunks(o, t), state, _from_chunks(e, t)


def _matmul(a, b, operand_dtype):
    """a @ b with both operands rounded to operand_dtype, accumulated and returned in float32."""
    return jnp.matmul(a.astype(operand_dtype), b.astype(operand_dtype), preferred_element_type=jnp.float32)


@jax.custom_jvp
def unit_lower_inverse(strict_lower):
    """(I + L)^-1 for strictly lower-triangular L [..., n, n], by block recursion on matmuls.

    At each level the inverses of two diagonal blocks A, D give that of [[A, 0], [X, D]] as
    [[A^-1, 0], [-D^-1 X A^-1, D^-1]]. Only matmuls: fast on every backend (jaxlib 0.10's batched
    LAPACK triangular solve can deadlock on a 2-thread CPU pool). The derivative is the inverse's own,
    dY = -Y StrictLower(dL) Y with Y = (I + L)^-1 (a custom_jvp, so forward mode works; reverse
    mode transposes it to dL = StrictLower(-Y^T dY Y^T)): two full matmuls instead of
    differentiating the recursion's gathers and concatenations.
    """
    n = strict_lower.shape[-1]
    size = 1 << (n - 1).bit_length()  # pad to a power of two; identity rows in the padding
    pad = [(0, 0)] * (strict_lower.ndim - 2) + [(0, size - n), (0, size - n)]
    lower = jnp.pad(strict_lower, pad)
    inv = jnp.ones(lower.shape[:-2] + (size, 1, 1), lower.dtype)  # inverses of the 1x1 diagonal blocks
    block = 1
    while block < size:
        pairs = size // (2 * block)
        i = np.arange(pairs)[:, None, None]
        r = np.arange(block)[None, :, None]
        c = np.arange(block)[None, None, :]
        below = lower[..., (2 * i + 1) * block + r, 2 * i * block + c]  # [..., pairs, block, block]
        upper_inv, lower_inv = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        corner = -(lower_inv @ below @ upper_inv)
        top = jnp.concatenate([upper_inv, jnp.zeros_like(upper_inv)], axis=-1)
        bottom = jnp.concatenate([corner, lower_inv], axis=-1)
        inv = jnp.concatenate([top, bottom], axis=-2)
        block *= 2
    return inv[..., 0, :n, :n]


@unit_lower_inverse.defjvp
def _unit_lower_inverse_jvp(primals, tangents):
    (strict_lower,), (d_lower,) = primals, tangents
    inv = unit_lower_inverse(strict_lower)
    d_lower = jnp.where(np.tri(inv.shape[-1], k=-1, dtype=bool), d_lower, 0.0)
    return inv, -(inv @ d_lower @ inv)


def _check_sequence_inputs(q, k, v, g, beta, initial_state, segment_ids) -> None:
    for name, x, rank, layout in (
        ("q", q, 4, "[B, T, H, K]"),
        ("k", k, 4, "[B, T, H, K]"),
        ("v", v, 4, "[B, T, H, V]"),
        ("g", g, 3, "[B, T, H]"),
        ("beta", beta, 3, "[B, T, H]"),
    ):
        validation.check_floating(name, x)
        validation.check_rank(name, x, rank, layout)
    validation.check_dims_match([("q", q), ("k", k)], (0, 1, 2, 3), "B, T, H, K")
    validation.check_dims_match([("q", q), ("v", v), ("g", g), ("beta", beta)], (0, 1, 2), "B, T, H")
    if initial_state is not None:
        validation.check_floating("initial_state", initial_state)
        b, _, h, dk = q.shape
        expected = (b, h, dk, v.shape[-1])
        validation.check_shape("initial_state", initial_state, expected, "[B, H, K, V]")
    if segment_ids is not None:
        validation.check_integer("segment_ids", segment_ids)
        validation.check_shape("segment_ids", segment_ids, q.shape[:2], "[B, T]")


def _check_step_inputs(q, k, v, g, beta, state) -> None:
    for name, x, rank, layout in (
        ("q", q, 3, "[B, H, K]"),
        ("k", k, 3, "[B, H, K]"),
        ("v", v, 3, "[B, H, V]"),
        ("g", g, 2, "[B, H]"),
        ("beta", beta, 2, "[B, H]"),
        ("state", state, 4, "[B, H, K, V]"),
    ):
        validation.check_floating(name, x)
        validation.check_rank(name, x, rank, layout)
    validation.check_dims_match([("q", q), ("k", k)], (0, 1, 2), "B, H, K")
    validation.check_dims_match([("q", q), ("v", v), ("g", g), ("beta", beta)], (0, 1), "B, H")
    b, h, dk = q.shape
    validation.check_shape("state", state, (b, h, dk, v.shape[-1]), "[B, H, K, V]")
