"""Numerics of hamjax.ops.ham: ham_sequence (parallel form, both attention paths, both delta-rule
methods) == a lax.scan / Python loop of ham_step == the float64 per-token oracle (tests/oracles.py
`ham_reference`), for both routers, with capacity overflow, padding and segment resets (DESIGN.md
§1.1, §1.3, §1.4, §3).

Relative RMS errors are checked at TOL = 1e-5 against float64. Admission decisions are compared
exactly, so every tau is picked in the middle of a wide gap between the oracle's sorted scores, at
least MARGIN away from any of them (§1.3, ties). Cache contents are compared in occupied slots only.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hamjax import ops
from hamjax.ops import HamOutput, HamState, KVCache
from hamjax.ops import blockwise_attention
from oracles import (
    HamReference,
    RefState,
    empty_ref_state,
    gated_delta_rule_reference,
    ham_reference,
    ham_reference_segmented,
    masked_attention_reference,
    random_inputs,
    rel_rms,
    rope_reference,
    softmax_read,
)

TOL = 1e-5  # relative RMS error allowed for float32 against the float64 oracle
MARGIN = 1e-4  # smallest allowed distance between tau and any valid token's oracle score
ROUTERS = ("surprise", "learned")
INPUT_NAMES = ("q", "k", "v", "g", "beta", "router_scores", "valid", "segment_ids")
ALL_FORMS = (("compacted", "chunk"), ("dense", "recurrent"), ("compacted", "recurrent"), ("dense", "chunk"))

# Boundaries inside 16-token chunks, on chunk boundaries (16, 32), a one-token segment (40); ids need
# not increase (row 1 returns to id 7).
SEGMENT_IDS_70 = np.array(
    [[0] * 5 + [1] * 11 + [2] * 16 + [3] * 8 + [4] + [5] * 29, [7] * 30 + [3] * 20 + [7] * 20], np.int32)


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int
    steps: int
    heads: int
    dk: int
    dv: int
    capacity: int
    prefix: int  # tokens the oracle runs first (from a random RNN state) to make the initial state
    prefix_quantile: float | None  # the prefix's tau: this quantile of its scores; None: -inf
    quantile: float  # tau sits near this quantile of the valid tokens' scores
    padding: bool = False
    segments: bool = False
    per_head_tau: bool = True
    overflow: bool = True  # the case must turn candidates away because the cache is full
    chunk_size: int = 16
    forms: tuple = ALL_FORMS[:2]  # sequence forms checked (plus the step scan, without segments)


CONFIGS = {
    "T1_K6_V5": Config(2, 1, 2, 6, 5, capacity=4, prefix=6, prefix_quantile=0.6, quantile=0.2,
                       per_head_tau=False, overflow=False, chunk_size=64),
    "T37_K4_V3_overflow_padding": Config(2, 37, 3, 4, 3, capacity=8, prefix=5, prefix_quantile=0.3,
                                         quantile=0.55, padding=True),
    # prefix 9 > capacity 6 with tau = -inf: the initial cache is full.
    "T70_K8_V5_segments_padding": Config(2, 70, 2, 8, 5, capacity=6, prefix=9, prefix_quantile=None,
                                         quantile=0.6, padding=True, segments=True, forms=ALL_FORMS),
}
# Only for the prefix -> suffix test: 74 tokens split 37 + 37, so both halves reuse the T37 programs.
SPLIT_CONFIG = Config(2, 74, 3, 4, 3, capacity=8, prefix=0, prefix_quantile=None, quantile=0.85, padding=True)


# ----------------------------------------------------------------------------------------- cases


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def to_ham_state(ref: RefState) -> HamState:
    """float32 HamState from a float64 RefState."""
    f32, i32 = (lambda x: jnp.asarray(x, jnp.float32)), (lambda x: jnp.asarray(x, jnp.int32))
    cache = KVCache(f32(ref.keys), f32(ref.values), i32(ref.positions), f32(ref.scores), i32(ref.count))
    return HamState(f32(ref.rnn), cache, i32(ref.position))


def to_ref_state(state: HamState) -> RefState:
    c = state.cache
    return RefState(*(np.asarray(x) for x in (state.rnn, c.keys, c.values, c.positions, c.scores, c.count,
                                               state.position)))


def reference(inputs, state: RefState, tau, logit_scale, capacity) -> HamReference:
    """The oracle on `inputs` (a dict with INPUT_NAMES; segment_ids -> each segment run separately)."""
    args = {n: inputs[n] for n in INPUT_NAMES[:7]}
    kwargs = dict(tau=tau, logit_scale=logit_scale, capacity=capacity, state=state)
    if inputs["segment_ids"] is None:
        return ham_reference(**args, **kwargs)
    return ham_reference_segmented(**args, segment_ids=inputs["segment_ids"], **kwargs)


def safe_tau(scores, valid, quantile, per_head):
    """float32 tau (scalar, or [H] per head) in the middle of the widest gap between consecutive
    sorted valid scores within +-1/8 of the sorted list around `quantile`; also returns the margin,
    the smallest |score - tau| over valid tokens."""
    valid = np.ones(scores.shape[:2], bool) if valid is None else valid
    groups = [scores[..., h][valid] for h in range(scores.shape[-1])] if per_head else [scores[valid].ravel()]
    taus = []
    for s in groups:
        s = np.sort(s)
        n = len(s)
        middle, half = int(quantile * (n - 1)), max(1, n // 8)
        i = max(range(max(0, middle - half), min(n - 1, middle + half + 1)), key=lambda i: s[i + 1] - s[i])
        taus.append((s[i] + s[i + 1]) / 2)
    tau = np.asarray(taus if per_head else taus[0], np.float32)
    margin = np.abs(scores - np.broadcast_to(tau.astype(np.float64), scores.shape[-1:]))[valid].min()
    return tau, float(margin)


class Case(NamedTuple):
    inputs: dict  # INPUT_NAMES -> float32 / bool / int32 arrays or None
    state: HamState
    ref_state: RefState  # the same state in float64
    tau: np.ndarray
    margin: float
    logit_scale: np.ndarray
    expected: HamReference


@functools.cache
def make_case(name, router, seed=0) -> Case:
    """Random inputs for config `name` (q, k unit vectors; GDN-like gates; learned-router scores in
    (0.05, 0.95)); the initial state is the oracle's after `prefix` tokens from a random RNN state,
    rounded to float32; tau = safe_tau of the oracle's scores."""
    cfg = CONFIGS.get(name, SPLIT_CONFIG)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), ROUTERS.index(router)])
    b, p, t, h = cfg.batch, cfg.prefix, cfg.steps, cfg.heads
    raw = random_inputs(int(rng.integers(2**31)), batch=b, steps=p + t, heads=h, dk=cfg.dk, dv=cfg.dv)
    raw["q"] = unit(raw["q"]).astype(np.float32)
    learned = router == "learned"
    raw["router_scores"] = rng.uniform(0.05, 0.95, (b, p + t, h)).astype(np.float32) if learned else None
    logit_scale = (np.sqrt(cfg.dk) * rng.uniform(1.0, 3.0, h)).astype(np.float32)
    split = lambda x, s: None if x is None else x[:, s]  # noqa: E731
    names = ("q", "k", "v", "g", "beta", "router_scores")
    prefix = {n: split(raw[n], slice(None, p)) for n in names} | dict(valid=None, segment_ids=None)
    inputs = {n: split(raw[n], slice(p, None)) for n in names} | dict(
        valid=rng.random((b, t)) > 0.25 if cfg.padding else None,
        segment_ids=SEGMENT_IDS_70 if cfg.segments else None)
    start = empty_ref_state(b, h, cfg.dk, cfg.dv, cfg.capacity)
    start = start._replace(rnn=raw["initial_state"].astype(np.float64))
    if p:
        prefix_tau = -np.inf
        if cfg.prefix_quantile is not None:
            scores = reference(prefix, start, np.inf, logit_scale, cfg.capacity).scores
            prefix_tau = np.quantile(scores, cfg.prefix_quantile)
        start = reference(prefix, start, prefix_tau, logit_scale, cfg.capacity).state
    state = to_ham_state(start)
    ref_state = to_ref_state(state)
    scores = reference(inputs, ref_state, np.inf, logit_scale, cfg.capacity).scores
    tau, margin = safe_tau(scores, inputs["valid"], cfg.quantile, cfg.per_head_tau)
    expected = reference(inputs, ref_state, tau, logit_scale, cfg.capacity)
    return Case(inputs, state, ref_state, tau, margin, logit_scale, expected)


# ----------------------------------------------------------------------------------------- forms


@functools.cache
def sequence_fn(attention, method, chunk_size):
    """jitted (inputs, state, tau, logit_scale) -> HamOutput; one per path, reused across tests."""

    def fn(inputs, state, tau, logit_scale):
        return ops.ham_sequence(
            inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"], state, tau=tau,
            logit_scale=logit_scale, router_scores=inputs["router_scores"], valid=inputs["valid"],
            segment_ids=inputs["segment_ids"], attention=attention, method=method, chunk_size=chunk_size)

    return jax.jit(fn)


@jax.jit
def step_scan(inputs, state, tau, logit_scale):
    """The sequence as a lax.scan of ham_step (no segment ids). HamOutput without kv fractions."""
    xs = {n: None if inputs[n] is None else jnp.moveaxis(jnp.asarray(inputs[n]), 1, 0) for n in INPUT_NAMES[:7]}

    def body(state, x):
        out = ops.ham_step(x["q"], x["k"], x["v"], x["g"], x["beta"], state, tau=tau, logit_scale=logit_scale,
                           router_score=x["router_scores"], valid=x["valid"])
        return out.state, (out.o_rnn, out.o_attn, out.admitted, out.scores)

    state, ys = jax.lax.scan(body, state, xs)
    o_rnn, o_attn, admitted, scores = (jnp.moveaxis(y, 0, 1) for y in ys)
    return HamOutput(o_rnn, o_attn, state, admitted, scores, None, None)


_step = jax.jit(ops.ham_step)


def step_loop(inputs, state, tau, logit_scale, step=_step):
    """The sequence as a Python loop of (jitted) ham_step calls."""
    outs = []
    for t in range(inputs["q"].shape[1]):
        x = {n: None if inputs[n] is None else inputs[n][:, t] for n in INPUT_NAMES[:7]}
        out = step(x["q"], x["k"], x["v"], x["g"], x["beta"], state, tau=tau, logit_scale=logit_scale,
                   router_score=x["router_scores"], valid=x["valid"])
        state = out.state
        outs.append(out)
    stack = lambda field: jnp.stack([getattr(o, field) for o in outs], axis=1)  # noqa: E731
    return HamOutput(stack("o_rnn"), stack("o_attn"), state, stack("admitted"), stack("scores"), None, None)


def run_form(form, inputs, state, tau, logit_scale, chunk_size=16):
    if form == "step":
        assert inputs["segment_ids"] is None
        return step_scan(inputs, state, tau, logit_scale)
    return sequence_fn(*form, chunk_size)(inputs, state, tau, logit_scale)


def forms_for(cfg, router):
    """Sequence forms (all listed for the surprise router, the first two for the learned one) and the
    step scan where there are no segments."""
    forms = list(cfg.forms if router == "surprise" else cfg.forms[:2])
    return forms + ([] if cfg.segments else ["step"])


# ------------------------------------------------------------------------------------ assertions


def assert_close(got, want, label, tol=TOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{label}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all(), f"{label}: non-finite values"
    if not want.any():
        assert not got.any(), f"{label}: expected all zeros, max |got| = {np.abs(got).max():.2e}"
        return
    err = rel_rms(got, want)
    assert err <= tol, f"{label}: relative RMS error {err:.2e} > {tol:.0e}"


def assert_state_matches(state: HamState, ref: RefState, label, tol=TOL):
    """RNN state, position and count exactly/closely; cache entries in occupied slots only."""
    got = to_ref_state(state)
    np.testing.assert_array_equal(got.count, ref.count, err_msg=f"{label}: cache count")
    np.testing.assert_array_equal(got.position, ref.position, err_msg=f"{label}: position")
    assert_close(got.rnn, ref.rnn, f"{label}: rnn state", tol)
    occupied = np.arange(ref.keys.shape[2]) < ref.count[..., None]
    np.testing.assert_array_equal(got.positions[occupied], ref.positions[occupied],
                                  err_msg=f"{label}: cache positions")
    for field in ("keys", "values", "scores"):
        assert_close(getattr(got, field)[occupied], getattr(ref, field)[occupied], f"{label}: cache {field}", tol)


def assert_matches(out: HamOutput, expected: HamReference, label, valid=None, tol=TOL):
    """Admitted masks exactly; outputs, scores and state within `tol`; the KV fraction (sequence
    forms) = admitted / valid tokens."""
    np.testing.assert_array_equal(out.admitted, expected.admitted, err_msg=f"{label}: admitted")
    for field in ("o_rnn", "o_attn", "scores"):
        assert_close(getattr(out, field), getattr(expected, field), f"{label}: {field}", tol)
    assert_state_matches(out.state, expected.state, label, tol)
    if out.kv_fraction is not None:
        tokens = expected.admitted.shape[0] * expected.admitted.shape[1] if valid is None else valid.sum()
        per_head = expected.admitted.sum(axis=(0, 1)) / tokens
        np.testing.assert_allclose(out.kv_fraction_per_head, per_head, rtol=1e-6, err_msg=f"{label}: kv fraction")
        np.testing.assert_allclose(out.kv_fraction, per_head.mean(), rtol=1e-6, err_msg=f"{label}: kv fraction")


def candidates(case):
    """Valid tokens scoring above tau [B, T, H]."""
    valid = np.ones(case.expected.scores.shape[:2], bool) if case.inputs["valid"] is None else case.inputs["valid"]
    return (case.expected.scores > case.tau) & valid[..., None]


# --------------------------------------------------------------- parallel == step == float64 oracle


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("config", CONFIGS)
def test_forms_match_oracle(config, router):
    """Every form against the per-token oracle: o_rnn, o_attn, admitted, scores, KV fraction, the
    RNN state, the cache (occupied slots, count) and the position. With segment ids the oracle runs
    each segment separately (the first from the initial state, the others from an empty state), so
    the final cache must hold the last segment's entries only."""
    cfg = CONFIGS[config]
    case = make_case(config, router)
    assert case.margin > MARGIN, f"tau is {case.margin:.1e} from a score"
    # The case exercises what it claims.
    counts = case.ref_state.count
    if cfg.prefix_quantile is None:
        assert (counts == cfg.capacity).all(), "the initial cache is not full"
    else:
        assert ((0 < counts) & (counts < cfg.capacity)).any(), "no head starts from a partly filled cache"
    assert case.expected.admitted.any() and (candidates(case) | ~case.expected.admitted).all()
    if cfg.overflow:
        assert (candidates(case) & ~case.expected.admitted).any(), "no candidate was turned away by a full cache"
    if cfg.padding:
        padded_candidates = (case.expected.scores > case.tau) & ~case.inputs["valid"][..., None]
        assert padded_candidates.any(), "no padding token scores above tau"
    for form in forms_for(cfg, router):
        out = run_form(form, case.inputs, case.state, case.tau, case.logit_scale, cfg.chunk_size)
        chex.assert_shape([out.o_rnn, out.o_attn], (cfg.batch, cfg.steps, cfg.heads, cfg.dv))
        chex.assert_type([out.o_rnn, out.o_attn, out.scores], jnp.float32)
        assert_matches(out, case.expected, f"{config}/{router}/{form}", case.inputs["valid"])


@pytest.mark.parametrize("router", ROUTERS)
def test_step_python_loop_matches_oracle(router):
    """A Python loop of jitted ham_step over the T37 case (37 steps, capacity 8: the cache fills)."""
    case = make_case("T37_K4_V3_overflow_padding", router)
    out = step_loop(case.inputs, case.state, case.tau, case.logit_scale)
    assert_matches(out, case.expected, f"step loop/{router}")


def test_rows_at_different_positions():
    """Rows of a batch need not share a position: the T37 case with row 1 moved 11 positions later
    (its cache entries too, keys re-rotated: RoPE(RoPE(k, p), s) = RoPE(k, p + s)). Every form equals
    the oracle; RoPE being relative, the outputs equal the unshifted case's."""
    config = "T37_K4_V3_overflow_padding"
    case = make_case(config, "surprise")
    shift = np.array([0, 11])
    ref = case.ref_state
    occupied = np.arange(ref.keys.shape[2]) < ref.count[..., None]
    shifted = ref._replace(
        keys=rope_reference(ref.keys, shift[:, None, None]),
        positions=np.where(occupied, ref.positions + shift[:, None, None], -1),
        position=ref.position + shift)
    state = to_ham_state(shifted)
    expected = reference(case.inputs, to_ref_state(state), case.tau, case.logit_scale, CONFIGS[config].capacity)
    np.testing.assert_array_equal(expected.admitted, case.expected.admitted)
    # (the shifted cache keys were rounded to float32 again)
    assert_close(expected.o_attn, case.expected.o_attn, "oracle: shifted vs unshifted o_attn", tol=1e-6)
    for form in forms_for(CONFIGS[config], "surprise"):
        out = run_form(form, case.inputs, state, case.tau, case.logit_scale)
        assert_matches(out, expected, f"rows shifted/{form}", case.inputs["valid"])


# ----------------------------------------------------------------------- prefix -> state -> suffix


@pytest.mark.parametrize("form", ALL_FORMS[:2], ids="-".join)
@pytest.mark.parametrize("router", ROUTERS)
def test_prefix_state_suffix_equals_one_pass(router, form):
    """Tokens [0, 37) from an empty state, then [37, 74) from the returned HamState (RNN state, a
    partly filled cache, position 37): equal to one pass over all 74 tokens and to the oracle."""
    case = make_case("T74_split", router)
    assert case.margin > MARGIN
    cfg = SPLIT_CONFIG
    half = cfg.steps // 2
    piece = lambda s: {n: None if x is None else x[:, s] for n, x in case.inputs.items()}  # noqa: E731
    fn = sequence_fn(*form, cfg.chunk_size)
    first = fn(piece(slice(None, half)), case.state, case.tau, case.logit_scale)
    count = np.asarray(first.state.cache.count)
    assert ((0 < count) & (count < cfg.capacity)).any(), f"the prefix does not partly fill the cache: {count}"
    second = fn(piece(slice(half, None)), first.state, case.tau, case.logit_scale)
    assert (candidates(case)[:, half:] & ~case.expected.admitted[:, half:]).any(), "the suffix never overflows"
    np.testing.assert_array_equal(second.state.position, np.full(cfg.batch, cfg.steps))
    joined = HamOutput(*(jnp.concatenate([getattr(first, f), getattr(second, f)], axis=1)
                         for f in ("o_rnn", "o_attn")), second.state,
                       *(jnp.concatenate([getattr(first, f), getattr(second, f)], axis=1)
                         for f in ("admitted", "scores")), None, None)
    assert_matches(joined, case.expected, f"prefix+suffix/{router}/{form}")
    one_pass = sequence_fn("compacted", "chunk", cfg.chunk_size)(
        case.inputs, case.state, case.tau, case.logit_scale)
    assert_matches(one_pass, case.expected, f"one pass/{router}", case.inputs["valid"])
    np.testing.assert_array_equal(joined.admitted, one_pass.admitted)
    for field in ("o_rnn", "o_attn"):
        assert_close(getattr(joined, field), getattr(one_pass, field), f"prefix+suffix vs one pass: {field}")


# ------------------------------------------------------------------------------ tau = +inf, -inf


@pytest.mark.parametrize("form", [*ALL_FORMS[:2], "step"], ids=lambda f: f if isinstance(f, str) else "-".join(f))
def test_tau_plus_inf_is_the_gated_delta_rule(form):
    """Nothing is admitted, o_attn == 0, the cache stays empty, and o_rnn and the RNN state are
    gated_delta_rule's (padding = g = beta = 0), at 1e-6."""
    case = make_case("T37_K4_V3_overflow_padding", "surprise")
    empty = case.state._replace(cache=ops.init_kv_cache(2, 3, 8, 4, 3))
    tau = np.full(3, np.inf, np.float32)
    out = run_form(form, case.inputs, empty, tau, case.logit_scale)
    assert not np.asarray(out.admitted).any()
    assert not np.asarray(out.o_attn).any(), "o_attn must be exactly 0 with an empty cache"
    np.testing.assert_array_equal(out.state.cache.count, 0)
    if out.kv_fraction is not None:
        assert float(out.kv_fraction) == 0.0
    x = case.inputs
    valid = x["valid"][..., None]
    method = "recurrent" if form == "step" else form[1]
    o, state = jax.jit(functools.partial(ops.gated_delta_rule, output_final_state=True, method=method,
                                         chunk_size=16))(
        x["q"], x["k"], x["v"], np.where(valid, x["g"], 0), np.where(valid, x["beta"], 0),
        initial_state=case.state.rnn)
    assert_close(out.o_rnn, o, f"{form}: o_rnn vs gated_delta_rule", tol=1e-6)
    assert_close(out.state.rnn, state, f"{form}: state vs gated_delta_rule", tol=1e-6)


@pytest.mark.parametrize("form", ALL_FORMS[:2], ids="-".join)
def test_tau_minus_inf_with_room_for_all_is_full_causal_attention(form):
    """capacity == T: every valid token is admitted and o_attn is causal softmax attention with RoPE
    over all valid tokens (float64 oracle); o_rnn is the gated delta rule's with padding skipped."""
    b, t, h, dk, dv = 2, 37, 3, 4, 3
    rng = np.random.default_rng(37)
    x = random_inputs(38, batch=b, steps=t, heads=h, dk=dk, dv=dv, initial_state=False)
    x["q"] = unit(x["q"]).astype(np.float32)
    inputs = dict(x, router_scores=None, valid=rng.random((b, t)) > 0.25, segment_ids=None)
    logit_scale = np.array([2.0, 4.0, 6.0], np.float32)
    out = sequence_fn(*form, 16)(inputs, ops.init_ham_state(b, h, dk, dv, t), -np.inf, logit_scale)
    valid = inputs["valid"]
    np.testing.assert_array_equal(out.admitted, np.broadcast_to(valid[..., None], (b, t, h)))
    np.testing.assert_allclose(out.kv_fraction, 1.0, rtol=1e-6)
    positions = np.broadcast_to(np.arange(t), (b, t))
    q_rot = rope_reference(x["q"], positions[..., None])
    k_rot = np.moveaxis(rope_reference(x["k"], positions[..., None]), 1, 2)
    mask = np.broadcast_to(np.tril(np.ones((t, t), bool))[None, None] & valid[:, None, None, :], (b, h, t, t))
    expected = masked_attention_reference(q_rot, k_rot, np.moveaxis(x["v"], 1, 2), mask, logit_scale)
    assert_close(out.o_attn, expected, f"{form}: o_attn vs full causal attention")
    g, beta = (np.where(valid[..., None], x[n], 0) for n in ("g", "beta"))
    o_rnn, state, _ = gated_delta_rule_reference(x["q"], x["k"], x["v"], g, beta)
    assert_close(out.o_rnn, o_rnn, f"{form}: o_rnn")
    assert_close(out.state.rnn, state, f"{form}: rnn state")


# --------------------------------------------------------------------------- dense == compacted


@pytest.mark.parametrize("router", ROUTERS)
def test_dense_equals_compacted_with_segments(router):
    """A second random draw of the T70 case (segments, padding, full initial cache): every other
    form equals compacted/chunk directly (which equals the oracle); at 1e-6 where the delta-rule
    method is the same and only the attention path differs."""
    cfg = CONFIGS["T70_K8_V5_segments_padding"]
    case = make_case("T70_K8_V5_segments_padding", router, seed=1)
    assert case.margin > MARGIN
    forms = [f for f in forms_for(cfg, router) if f != "step"]
    outs = {form: run_form(form, case.inputs, case.state, case.tau, case.logit_scale) for form in forms}
    compacted = outs[("compacted", "chunk")]
    assert_matches(compacted, case.expected, f"compacted/{router}", case.inputs["valid"])
    assert any(form[0] == "dense" for form in outs)
    for form, out in outs.items():
        np.testing.assert_array_equal(out.admitted, compacted.admitted)
        tol = 1e-6 if form[1] == "chunk" else TOL
        for field in ("o_rnn", "o_attn"):
            assert_close(getattr(out, field), getattr(compacted, field), f"{form} vs compacted: {field}", tol)
        assert_state_matches(out.state, to_ref_state(compacted.state), f"{form} vs compacted", tol)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("name", ["T37_K4_V3_overflow_padding", "T70_K8_V5_segments_padding"])
def test_empty_start_equals_an_empty_state(name, router):
    """state=None with `capacity` (attention reads no earlier cache; the compacted buffer holds at
    most T) == the same call from an empty init_ham_state, for every path: outputs, admissions,
    KV fractions and the state handed on (cache compared in occupied slots)."""
    cfg = CONFIGS[name]
    case = make_case(name, router)
    empty = ops.init_ham_state(cfg.batch, cfg.heads, cfg.dk, cfg.dv, cfg.capacity)
    for attention, method in ALL_FORMS[:2]:

        def run(state, capacity=None):
            x = case.inputs
            return jax.jit(functools.partial(ops.ham_sequence, capacity=capacity, attention=attention,
                                             method=method, chunk_size=cfg.chunk_size))(
                x["q"], x["k"], x["v"], x["g"], x["beta"], state, tau=case.tau, logit_scale=case.logit_scale,
                router_scores=x["router_scores"], valid=x["valid"], segment_ids=x["segment_ids"])

        got, want = run(None, cfg.capacity), run(empty)
        label = f"{attention}/{method}"
        assert int(np.sum(want.admitted)) > 0, f"{label}: nothing admitted"
        np.testing.assert_array_equal(got.admitted, want.admitted)
        np.testing.assert_array_equal(got.kv_fraction_per_head, want.kv_fraction_per_head)
        for field in ("o_rnn", "o_attn"):
            assert_close(getattr(got, field), getattr(want, field), f"{label}: {field}", 1e-6)
        assert_state_matches(got.state, to_ref_state(want.state), label, 1e-6)


# ------------------------------------------------------------------------------ KV fraction vs tau


@pytest.mark.parametrize("router", ROUTERS)
def test_kv_fraction_never_increases_with_tau(router):
    """Sweep tau (the same for every head) over 25 values spanning the scores, on fixed inputs: the
    layer's and every head's KV fraction never increase, from its maximum (tau = -inf) to 0."""
    case = make_case("T37_K4_V3_overflow_padding", router)
    fn = sequence_fn("compacted", "chunk", 16)
    lo, hi = case.expected.scores.min(), case.expected.scores.max()
    taus = [-np.inf, *np.linspace(lo - 0.01, hi + 0.01, 23), np.inf]
    fractions, per_head = [], []
    for tau in taus:
        out = fn(case.inputs, case.state, np.full(3, tau, np.float32), case.logit_scale)
        fractions.append(float(out.kv_fraction))
        per_head.append(np.asarray(out.kv_fraction_per_head))
    fractions, per_head = np.array(fractions), np.array(per_head)
    assert (np.diff(fractions) <= 0).all(), f"KV fraction increased with tau: {fractions}"
    assert (np.diff(per_head, axis=0) <= 0).all(), "a head's KV fraction increased with tau"
    assert fractions[0] > 0 and fractions[-1] == 0 and len(np.unique(fractions)) > 5


# -------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("router", ROUTERS)
def test_gradients_agree_between_paths(router):
    """d loss / d (q, k, v, g, beta, logit_scale[, router_scores]) for loss = <o_rnn, c1> + <o_attn, c2>:
    finite, not all zero, and equal between compacted/chunk and dense/recurrent (same admitted set,
    tau with a safe margin), relative RMS <= 1e-5."""
    case = make_case("T37_K4_V3_overflow_padding", router)
    assert case.margin > MARGIN
    names = ["q", "k", "v", "g", "beta", "logit_scale"] + (["router_scores"] if router == "learned" else [])
    rng = np.random.default_rng(7)
    shape = case.expected.o_rnn.shape
    c1, c2 = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)

    def gradients(form):
        def loss(*xs):
            args = dict(zip(names, xs))
            logit_scale = args.pop("logit_scale")
            out = sequence_fn(*form, 16)({**case.inputs, **args}, case.state, case.tau, logit_scale)
            return jnp.sum(out.o_rnn * c1) + jnp.sum(out.o_attn * c2)

        values = [case.logit_scale if n == "logit_scale" else case.inputs[n] for n in names]
        return jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))(*values)

    fast, reference_grads = gradients(("compacted", "chunk")), gradients(("dense", "recurrent"))
    for name, a, b in zip(names, fast, reference_grads):
        a, b = np.asarray(a), np.asarray(b)
        assert np.isfinite(a).all() and np.isfinite(b).all(), f"d/d{name} is not finite"
        assert np.abs(b).max() > 0, f"d/d{name} is zero"
        err = rel_rms(a, b)
        assert err <= TOL, f"d/d{name}: compacted/chunk vs dense/recurrent relative RMS {err:.2e}"


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("config", ["T37_K4_V3_overflow_padding", "T70_K8_V5_segments_padding"])
def test_compacted_path_in_small_blocks_matches_oracle(config, router, monkeypatch):
    """The compacted path with blocks of 8 queries and 3 keys (blocks that straddle segment starts,
    the cache's entries and the buffer's end) against the oracle, and its gradients against the
    dense/recurrent reference's."""
    monkeypatch.setattr(blockwise_attention, "QUERY_BLOCK", 8)
    monkeypatch.setattr(blockwise_attention, "KEY_BLOCK", 3)
    cfg, case = CONFIGS[config], make_case(config, router)
    names = ["q", "k", "v", "logit_scale"] + (["router_scores"] if router == "learned" else [])
    rng = np.random.default_rng(8)
    c1, c2 = (rng.standard_normal(case.expected.o_rnn.shape).astype(np.float32) for _ in range(2))

    def run(attention, method):
        def fn(*xs):
            args = dict(zip(names, xs))
            logit_scale = args.pop("logit_scale")
            inputs = {**case.inputs, **args}
            return ops.ham_sequence(
                inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"], case.state, tau=case.tau,
                logit_scale=logit_scale, router_scores=inputs["router_scores"], valid=inputs["valid"],
                segment_ids=inputs["segment_ids"], attention=attention, method=method, chunk_size=cfg.chunk_size)

        def loss(*xs):
            out = fn(*xs)
            return jnp.sum(out.o_rnn * c1) + jnp.sum(out.o_attn * c2)

        values = [case.logit_scale if n == "logit_scale" else case.inputs[n] for n in names]
        return jax.jit(fn)(*values), jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))(*values)

    (out, grads), (_, reference_grads) = run("compacted", "chunk"), run("dense", "recurrent")
    assert_matches(out, case.expected, f"{config}/{router}/small blocks", case.inputs["valid"])
    for name, a, b in zip(names, grads, reference_grads):
        assert np.abs(np.asarray(b)).max() > 0, f"d/d{name} is zero"
        assert_close(a, np.asarray(b, np.float64), f"d/d{name}, small blocks")


@pytest.mark.parametrize("fresh", [True, False])
def test_segments_that_each_fill_their_cache_all_attend(fresh):
    """Three packed segments per row that each fill a cache of 3 (tau = -inf admits every token): the
    compacted path's buffer holds every segment's entries (a buffer sized for one cache, as an
    explicit buffer_size once allowed, zeroed the later segments' attention). Against the float64
    per-segment oracle, from an empty start and from a cache that already holds entries."""
    b, t, h, dk, dv, capacity = 2, 24, 2, 4, 3, 3
    x = random_inputs(21, batch=b, steps=t, heads=h, dk=dk, dv=dv, initial_state=False)
    segment_ids = np.repeat(np.array([[0, 1, 2], [5, 6, 7]]), 8, axis=1)
    tau, logit_scale = -np.inf, np.array([2.0, 4.0], np.float32)
    state, ref_state = None, None
    if not fresh:  # a previous call's cache, full, continued by the first segment
        prefix = random_inputs(22, batch=b, steps=5, heads=h, dk=dk, dv=dv, initial_state=False)
        names = ("q", "k", "v", "g", "beta")
        state = jax.jit(functools.partial(ops.ham_sequence, tau=tau, logit_scale=logit_scale))(
            *(prefix[n] for n in names), ops.init_ham_state(b, h, dk, dv, capacity)
        ).state
        ref_state = ham_reference(*(prefix[n] for n in names), tau=tau, logit_scale=logit_scale,
                                  capacity=capacity).state
    out = jax.jit(functools.partial(ops.ham_sequence, capacity=capacity if fresh else None, attention="compacted"))(
        x["q"], x["k"], x["v"], x["g"], x["beta"], state, tau=tau, logit_scale=logit_scale,
        segment_ids=jnp.asarray(segment_ids),
    )
    expected = ham_reference_segmented(x["q"], x["k"], x["v"], x["g"], x["beta"], segment_ids=segment_ids,
                                       state=ref_state, tau=tau, logit_scale=logit_scale, capacity=capacity)
    assert np.all(np.abs(np.asarray(out.o_attn)[:, 8:]).sum(-1) > 0)  # the later segments do attend
    assert rel_rms(out.o_attn, expected.o_attn) <= TOL


# ----------------------------------------------------------------------------------------- decode


def test_decode_step_compiles_once_as_the_cache_fills():
    """jit(ham_step) traced once for 12 steps into a cache of capacity 5 (tau = -inf: every valid
    token is admitted until the cache is full, then none)."""
    b, h, dk, dv, capacity, steps = 2, 2, 4, 3, 5, 12
    x = random_inputs(12, batch=b, steps=steps, heads=h, dk=dk, dv=dv, initial_state=False)
    valid = np.ones((b, steps), bool)
    valid[1, 2::3] = False
    step = jax.jit(chex.assert_max_traces(ops.ham_step, n=1))
    state = ops.init_ham_state(b, h, dk, dv, capacity)
    tau, logit_scale = jnp.float32(-jnp.inf), jnp.array([3.0, 5.0], jnp.float32)
    for t in range(steps):
        out = step(*(x[n][:, t] for n in ("q", "k", "v", "g", "beta")), state, tau=tau,
                   logit_scale=logit_scale, valid=valid[:, t])
        state = out.state
        admitted_so_far = np.minimum(valid[:, : t + 1].sum(1), capacity)
        np.testing.assert_array_equal(state.cache.count, np.repeat(admitted_so_far[:, None], h, 1))
    assert (np.asarray(state.cache.count) == capacity).all()
    expected_positions = [np.flatnonzero(valid[i])[:capacity] for i in range(b)]
    np.testing.assert_array_equal(state.cache.positions[:, 0], np.stack(expected_positions))


# -------------------------------------------------------------------------------------- bad input


def small_inputs(dk=4):
    x = random_inputs(3, batch=2, steps=9, heads=3, dk=dk, dv=5, initial_state=False)
    return {n: x[n] for n in ("q", "k", "v", "g", "beta")}


def sequence_call(state=None, dk=4, **kwargs):
    x = small_inputs(dk)
    state = ops.init_ham_state(2, 3, dk, 5, 4) if state is None else state
    kwargs = {"tau": 0.5, "logit_scale": np.ones(3, np.float32), **kwargs}
    return lambda: ops.ham_sequence(*x.values(), state, **kwargs)


def fresh_call(**kwargs):
    """ham_sequence from state=None."""
    kwargs = {"tau": 0.5, "logit_scale": np.ones(3, np.float32), **kwargs}
    return lambda: ops.ham_sequence(*small_inputs().values(), None, **kwargs)


def step_call(state=None, dk=4, **kwargs):
    x = {n: a[:, 0] for n, a in small_inputs(dk).items()}
    state = ops.init_ham_state(2, 3, dk, 5, 4) if state is None else state
    kwargs = {"tau": 0.5, "logit_scale": np.ones(3, np.float32), **kwargs}
    return lambda: ops.ham_step(*x.values(), state, **kwargs)


def with_cache(**shape):
    """A HamState for B=2, H=3, K=4, V=5 whose cache has the given (heads, key_dim, value_dim)."""
    sizes = dict(heads=3, key_dim=4, value_dim=5) | shape
    cache = ops.init_kv_cache(2, sizes["heads"], 4, sizes["key_dim"], sizes["value_dim"])
    return ops.init_ham_state(2, 3, 4, 5, 4)._replace(cache=cache)


BAD_CALLS = {
    # id: (call, pattern the ValueError message must match)
    "init_ham_state_negative_capacity": (lambda: ops.init_ham_state(2, 3, 4, 5, -1), r"^capacity\b.*-1"),
    "sequence_nan_tau": (lambda: sequence_call(tau=float("nan"))(), r"^tau\b.*nan"),
    "sequence_nan_in_per_head_tau": (lambda: sequence_call(tau=np.array([0.5, np.nan, 1.0]))(), r"^tau\b"),
    "step_nan_tau": (lambda: step_call(tau=np.float32("nan"))(), r"^tau\b"),
    "sequence_cache_wrong_heads": (lambda: sequence_call(with_cache(heads=2))(),
                                   r"^cache\.keys\b.*\(2, 2, 4, 4\)"),
    "sequence_cache_wrong_key_dim": (lambda: sequence_call(with_cache(key_dim=6))(),
                                     r"^cache\.keys\b.*\(2, 3, 4, 6\)"),
    "sequence_cache_wrong_value_dim": (lambda: sequence_call(with_cache(value_dim=2))(),
                                       r"^cache\.values\b.*\(2, 3, 4, 2\)"),
    "step_cache_wrong_heads": (lambda: step_call(with_cache(heads=4))(), r"^cache\.keys\b.*\(2, 4, 4, 4\)"),
    "step_cache_wrong_key_dim": (lambda: step_call(with_cache(key_dim=2))(), r"^cache\.keys\b.*\(2, 3, 4, 2\)"),
    "unknown_attention_path": (lambda: sequence_call(attention="flash")(), r"^attention\b.*flash"),
    "sequence_rope_odd_head_dim": (lambda: sequence_call(dk=5, method="recurrent")(),
                                   r"even head dimension.*\(2, 9, 3, 5\)"),
    "step_rope_odd_head_dim": (lambda: step_call(dk=5)(), r"even head dimension.*5\)"),
    "no_state_and_no_capacity": (lambda: fresh_call()(), r"capacity when state is None"),
    "no_state_nonpositive_capacity": (lambda: fresh_call(capacity=0)(), r"^capacity\b.*0"),
    "capacity_differs_from_state": (lambda: sequence_call(capacity=5)(), r"capacity 5 differs.*capacity 4"),
    "scalar_logit_scale": (lambda: sequence_call(logit_scale=np.float32(2.0))(), r"^logit_scale\b.*\(3,\)"),
    "tau_wrong_heads": (lambda: sequence_call(tau=np.ones(4, np.float32))(), r"^tau\b.*\(4,\)"),
    "valid_without_batch": (lambda: sequence_call(valid=np.ones(9, bool))(), r"^valid\b.*\(9,\)"),
    "router_scores_wrong_T": (lambda: sequence_call(router_scores=np.ones((2, 8, 3), np.float32))(),
                              r"^router_scores\b.*\(2, 8, 3\)"),
    "step_valid_wrong_B": (lambda: step_call(valid=np.ones(3, bool))(), r"^valid\b.*\(3,\)"),
}


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_input_raises_clear_value_error(name, use_jit):
    """Eagerly, and while jax.jit traces (arguments closed over, so nothing is compiled or run)."""
    call, pattern = BAD_CALLS[name]
    with pytest.raises(ValueError, match=pattern):
        jax.jit(call).trace() if use_jit else call()


def test_valid_calls_do_not_raise():
    """The bad-input calls start from these; odd K is fine without RoPE."""
    for call in (sequence_call(), step_call(), sequence_call(attention="dense"),
                 sequence_call(dk=5, rope_theta=None), step_call(dk=5, rope_theta=None),
                 sequence_call(tau=np.inf), sequence_call(tau=np.array([0.5, -np.inf, np.inf])),
                 sequence_call(capacity=4), fresh_call(capacity=4), fresh_call(capacity=4, attention="dense")):
        jax.jit(call).trace()


# ------------------------------------------------------------------------------ decode with eviction

_step_evict = jax.jit(ops.ham_step, static_argnames="evict")


@pytest.mark.parametrize("router", ROUTERS)
def test_decode_step_with_eviction_keeps_the_most_surprising_tokens(router):
    """40 tokens (B=2, H=2, capacity 3, some padding) through ham_step with evict=True and with
    evict=False, tau near the 30% quantile of the scores (per head). With eviction: (a) the cache
    never holds more than 3 entries, nor a position twice; (b) at the end it holds exactly the 3
    highest-scoring valid tokens with score > tau (scores as the steps returned them), with
    RoPE-rotated keys, values and scores of those tokens; (c) up to the step at which a (row, head)'s
    cache first fills, its outputs and admissions equal evict=False's bit for bit (o_rnn and scores
    always); (d) each step's o_attn equals a float64 softmax over the entries held after that step's
    insertion (logit_scale, RoPE(q) at the step's position, log-score bias with the learned router)."""
    b_, t_, h_, dk, dv, capacity = 2, 40, 2, 4, 3, 3
    x = random_inputs(404, batch=b_, steps=t_, heads=h_, dk=dk, dv=dv, initial_state=False)
    x["q"] = unit(x["q"]).astype(np.float32)
    rng = np.random.default_rng(405)
    router_scores = rng.uniform(0.05, 0.95, (b_, t_, h_)).astype(np.float32) if router == "learned" else None
    valid = rng.random((b_, t_)) > 0.15
    valid[:, 0] = True
    logit_scale = np.array([3.0, 5.0], np.float32)

    def run(evict, tau):
        state, outs = ops.init_ham_state(b_, h_, dk, dv, capacity), []
        for t in range(t_):
            out = _step_evict(*(x[n][:, t] for n in ("q", "k", "v", "g", "beta")), state, tau=tau,
                              logit_scale=logit_scale, valid=valid[:, t], evict=evict,
                              router_score=None if router_scores is None else router_scores[:, t])
            state = out.state
            outs.append(jax.device_get(out))
        return outs

    free = run(False, np.full(h_, np.inf, np.float32))
    all_scores = np.stack([o.scores for o in free], axis=1)  # [B, T, H]
    tau = np.array([np.quantile(all_scores[..., h][valid], 0.3) for h in range(h_)], np.float32)
    evicting, capped = run(True, tau), run(False, tau)
    scores = np.stack([o.scores for o in evicting], axis=1)
    candidate = (scores > tau) & valid[..., None]
    assert (candidate.sum(1) > capacity + 5).all(), "every (row, head) must overflow"

    for t, (e, c) in enumerate(zip(evicting, capped)):
        # (c) o_rnn and scores never depend on the cache.
        np.testing.assert_array_equal(e.o_rnn, c.o_rnn)
        np.testing.assert_array_equal(e.scores, c.scores)
        cache = e.state.cache
        # (a)
        assert (cache.count <= capacity).all(), f"step {t}: count {cache.count}"
        np.testing.assert_array_equal(e.state.position, np.full(b_, t + 1))
        # (d) float64 softmax attention over the entries held after this step's insertion.
        q_rot = rope_reference(x["q"][:, t], t)  # [B, H, K]
        for b in range(b_):
            for h in range(h_):
                n = int(cache.count[b, h])
                positions = cache.positions[b, h, :n]
                assert len(set(positions.tolist())) == n and (positions <= t).all()
                assert not e.admitted[b, h] or t in positions.tolist()
                lw = None if router_scores is None else np.log(cache.scores[b, h, :n].astype(np.float64))
                want = softmax_read(q_rot[b, h], cache.keys[b, h, :n], cache.values[b, h, :n], logit_scale[h], lw)
                np.testing.assert_allclose(e.o_attn[b, h], want, rtol=1e-5, atol=1e-6,
                                           err_msg=f"step {t}, ({b}, {h}): o_attn")

    # (c) identical to evict=False up to the step that first fills each (row, head)'s cache.
    counts = np.stack([o.state.cache.count for o in evicting])  # [T, B, H]
    first_full = np.argmax(counts == capacity, axis=0)  # [B, H]
    assert (counts[-1] == capacity).all() and (first_full < t_ - 10).all(), first_full
    for b in range(b_):
        for h in range(h_):
            for t in range(first_full[b, h] + 1):
                e, c = evicting[t], capped[t]
                assert e.admitted[b, h] == c.admitted[b, h], f"step {t}, ({b}, {h}): admitted"
                np.testing.assert_array_equal(e.o_attn[b, h], c.o_attn[b, h], err_msg=f"step {t}, ({b}, {h})")
                for field in ("keys", "values", "positions", "scores", "count"):
                    np.testing.assert_array_equal(getattr(e.state.cache, field)[b, h],
                                                  getattr(c.state.cache, field)[b, h], err_msg=field)
    # ...and eviction does change what the cache holds afterwards.
    assert any((evicting[-1].state.cache.positions[b, h] != capped[-1].state.cache.positions[b, h]).any()
               for b in range(b_) for h in range(h_))

    # (b) the final cache holds the `capacity` highest-scoring candidates.
    final = evicting[-1].state.cache
    for b in range(b_):
        for h in range(h_):
            cand = np.flatnonzero(candidate[b, :, h])
            best = cand[np.argsort(-scores[b, cand, h], kind="stable")[:capacity]]
            assert len(set(scores[b, cand, h].tolist())) == len(cand), "test setup: tied scores"
            order = np.argsort(final.positions[b, h])
            np.testing.assert_array_equal(final.positions[b, h][order], np.sort(best), err_msg=f"({b}, {h})")
            held = final.positions[b, h][order]
            np.testing.assert_array_equal(final.scores[b, h][order], scores[b, held, h])
            np.testing.assert_array_equal(final.values[b, h][order], x["v"][b, held, h])
            np.testing.assert_allclose(final.keys[b, h][order], rope_reference(x["k"][b, held, h], held),
                                       rtol=1e-5, atol=1e-6)
            # More admissions than slots (evictions happened), and only candidates were admitted.
            admitted = np.array([o.admitted[b, h] for o in evicting])
            assert admitted.sum() > capacity and not (admitted & ~candidate[b, :, h]).any()


def test_o_rnn_of_bf16_inputs_is_float32_as_computed():
    """The RNN branch comes back in float32 as the delta rule computed it, not rounded to the
    inputs' bfloat16 on the way (which would cost ~3 significant digits before the layer's norm)."""
    x = random_inputs(23, batch=1, steps=16, heads=2, dk=4, dv=3, initial_state=False)
    bf16 = {n: jnp.asarray(x[n], jnp.bfloat16) for n in ("q", "k", "v", "g", "beta")}
    sequence = jax.jit(functools.partial(ops.ham_sequence, capacity=4, tau=0.5, logit_scale=jnp.ones(2)))
    out = sequence(*bf16.values(), None)
    exact = {
        method: jax.jit(functools.partial(ops.gated_delta_rule_with_errors, method=method, output_dtype=jnp.float32))(
            *bf16.values()
        ).output
        for method in ("chunk", "recurrent")
    }
    assert out.o_rnn.dtype == jnp.float32
    assert rel_rms(out.o_rnn, exact["chunk"]) <= TOL
    step = jax.jit(functools.partial(ops.ham_step, tau=0.5, logit_scale=jnp.ones(2)))(
        *(a[:, 0] for a in bf16.values()), ops.init_ham_state(1, 2, 4, 3, 4)
    )
    assert step.o_rnn.dtype == jnp.float32 and rel_rms(step.o_rnn, exact["recurrent"][:, 0]) <= TOL
