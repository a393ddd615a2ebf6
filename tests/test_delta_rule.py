"""Numerics of hamjax.ops.delta_rule: chunked == recurrent == step loop == float64 oracle == fla.

Relative RMS errors (tests/oracles.py `rel_rms`) are checked against the float64 oracle at TOL = 1e-5,
DESIGN.md's float32 target; see §1.3 and §3.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from hamjax import ops
from hamjax.ops import DeltaRuleResult
from oracles import (
    gated_delta_rule_reference,
    gated_delta_rule_reference_jax,
    random_inputs,
    rel_rms,
)

TOL = 1e-5  # relative RMS error allowed for float32 against the float64 oracle
ARGS = ("q", "k", "v", "g", "beta", "initial_state")
METHODS = ("chunk", "recurrent")
FORMS = METHODS + ("step",)  # "step": a Python loop of gated_delta_rule_step
REF_REASON = "needs the `ref` extra: pip install -e .[ref]"


# ----------------------------------------------------------------------------------------- helpers


def positional(inputs):
    return [inputs[name] for name in ARGS]


@functools.cache
def case(seed, **shape):
    """(inputs, float64 oracle result) for `random_inputs(seed, **shape)`; cached, do not mutate."""
    inputs = random_inputs(seed, **shape)
    return inputs, DeltaRuleResult(*gated_delta_rule_reference(*positional(inputs)))


def sequence_fn(method, chunk_size=64, scale=None):
    """Positional (q, k, v, g, beta, initial_state) -> DeltaRuleResult, ready for jit/variants."""

    def fn(q, k, v, g, beta, initial_state):
        return ops.gated_delta_rule_with_errors(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, method=method,
            chunk_size=chunk_size,
        )

    return fn


@functools.cache
def jitted(method, chunk_size=64, scale=None):
    """One jitted function per (method, chunk size, scale), so equal shapes compile once."""
    return jax.jit(sequence_fn(method, chunk_size, scale))


_jitted_step = jax.jit(ops.gated_delta_rule_step)


def step_loop(q, k, v, g, beta, initial_state, step=_jitted_step):
    """The sequence as a Python loop over `step` (gated_delta_rule_step, jitted or not)."""
    batch, steps, heads, dk = q.shape
    state = initial_state
    if state is None:
        state = jnp.zeros((batch, heads, dk, v.shape[-1]), jnp.float32)
    outputs, errors = [], []
    for t in range(steps):
        o_t, state, e_t = step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        outputs.append(o_t)
        errors.append(e_t)
    return DeltaRuleResult(jnp.stack(outputs, 1), state, jnp.stack(errors, 1))


def run_form(form, inputs, chunk_size=64, wrap=None):
    """Run `form` on `inputs`; `wrap` (e.g. a chex variant) defaults to a cached jax.jit."""
    if form == "step":
        step = _jitted_step if wrap is None else wrap(ops.gated_delta_rule_step)
        return step_loop(*positional(inputs), step=step)
    fn = jitted(form, chunk_size) if wrap is None else wrap(sequence_fn(form, chunk_size))
    return fn(*positional(inputs))


def time_slice(inputs, steps, initial_state):
    """inputs restricted to the token slice `steps`, starting from `initial_state`."""
    return {**{n: inputs[n][:, steps] for n in ARGS[:5]}, "initial_state": initial_state}


def assert_matches(result, expected, label, fields=DeltaRuleResult._fields, tol=TOL):
    """The `fields` (default all: output, state, errors) are finite and within `tol` relative RMS
    of `expected`."""
    for field in fields:
        got = np.asarray(getattr(result, field), np.float64)
        want = getattr(expected, field)
        assert np.isfinite(got).all(), f"{label}: {field} has non-finite values"
        err = rel_rms(got, want)
        assert err <= tol, f"{label}: {field} relative RMS error {err:.2e} > {tol:.0e}"


def with_edge_gates(inputs, seed, g=(), beta=(), fraction=0.25):
    """Copy of `inputs` where a random `fraction` of the (b, t, h) rows take g / beta values drawn
    from the given lists (token 0 always included)."""
    rng = np.random.default_rng(seed)
    out = dict(inputs)
    for name, values in (("g", g), ("beta", beta)):
        if values:
            rows = rng.random(inputs[name].shape) < fraction
            rows[:, 0] = True
            picked = rng.choice(np.asarray(values, np.float32), size=inputs[name].shape)
            out[name] = np.where(rows, picked, inputs[name]).astype(np.float32)
    return out


# ------------------------------------------------- chunk == recurrent == step loop == float64 oracle


class FormsMatchOracleTest(chex.TestCase):
    """The three forms, jitted and not, against the oracle: outputs, final state and errors."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        dict(testcase_name="T1", steps=1, dk=5, dv=7, chunk_size=64),
        dict(testcase_name="T57_K13_V3", steps=57, dk=13, dv=3, chunk_size=64),
        dict(testcase_name="T61_K5_V7_chunk16", steps=61, dk=5, dv=7, chunk_size=16),
        dict(testcase_name="T200_K13_V3_chunk48", steps=200, dk=13, dv=3, chunk_size=48),
        dict(testcase_name="T57_K13_V3_no_initial_state", steps=57, dk=13, dv=3, chunk_size=64,
             initial_state=False),
    )
    def test_forms_match_oracle(self, chunk_size, **shape):
        inputs, expected = case(seed=shape["steps"], batch=2, heads=3, **shape)
        batch, steps, heads, dk = inputs["q"].shape
        dv = inputs["v"].shape[-1]
        for form in FORMS:
            result = run_form(form, inputs, chunk_size, wrap=self.variant)
            chex.assert_shape(result.output, (batch, steps, heads, dv))
            chex.assert_shape(result.state, (batch, heads, dk, dv))
            chex.assert_shape(result.errors, (batch, steps, heads, dv))
            chex.assert_type([result.output, result.state, result.errors], jnp.float32)
            assert_matches(result, expected, f"{form} ({self.variant.type})")


@pytest.mark.parametrize("chunk_size", range(1, 65))
def test_every_chunk_size_matches_oracle(chunk_size):
    """T = 70 with chunk sizes 1..64 (most do not divide T; 64 leaves a 6-token last chunk).

    64 programs, whose compile time dominates: besides the suite's LLVM level 0 (tests/conftest.py),
    LLVM's expensive passes are off too.
    """
    inputs, expected = case(seed=70, batch=1, steps=70, heads=2, dk=5, dv=7)
    lowered = jax.jit(sequence_fn("chunk", chunk_size)).lower(*positional(inputs))
    compiled = lowered.compile(
        {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    )
    assert_matches(compiled(*positional(inputs)), expected, f"chunk_size={chunk_size}")


# ------------------------------------------------------------------------------------- edge gates

EDGE_GATES = {
    "g_zero": dict(g=[0.0]),
    "beta_tiny": dict(beta=[1e-6]),
    "beta_near_one": dict(beta=[1 - 1e-6]),
    "g_zero_beta_0_or_1": dict(g=[0.0], beta=[0.0, 1.0]),
    "g_minus_50_beta_0_or_1": dict(g=[-50.0], beta=[0.0, 1.0]),
    "g_minus_1e3_beta_0_or_1": dict(g=[-1e3], beta=[0.0, 1.0]),
    "g_minus_1e30_and_minus_inf": dict(g=[-1e30, -np.inf]),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("gates", EDGE_GATES)
def test_edge_gates_finite_and_match_oracle(gates, form):
    """Rows with g = 0, beta ~ 0 or ~ 1, and extreme decays. The oracle stays well conditioned:
    exp(g) only shrinks the state and, k being unit-norm, I - beta k k^T is non-expansive."""
    base, _ = case(seed=11, batch=2, steps=100, heads=2, dk=5, dv=7)
    inputs = with_edge_gates(base, seed=12, **EDGE_GATES[gates])
    expected = DeltaRuleResult(*gated_delta_rule_reference(*positional(inputs)))
    assert_matches(run_form(form, inputs), expected, f"{form}, {gates}")


# ------------------------------------------------------------------------ packed sequences

SEGMENT_IDS = np.array(
    [
        # boundaries inside chunks, on a chunk boundary (16, 32) and a one-token segment (40)
        [0] * 5 + [1] * 11 + [2] * 16 + [3] * 8 + [4] + [5] * 29,
        # ids need not increase: a change of id starts a segment
        [7] * 30 + [3] * 20 + [7] * 20,
    ],
    np.int32,
)


def segmented_reference(inputs, segment_ids):
    """Oracle for packed rows: each segment run on its own, the first from the initial state."""
    outputs, errors, states = [], [], []
    for b, row in enumerate(segment_ids):
        bounds = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1]] + [len(row)]
        state = inputs["initial_state"][b : b + 1]
        row_o, row_e = [], []
        for first, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            piece = {n: inputs[n][b : b + 1, lo:hi] for n in ARGS[:5]}
            start = state if first == 0 else np.zeros_like(state)
            o, state, e = gated_delta_rule_reference(*positional({**piece, "initial_state": start}))
            row_o.append(o)
            row_e.append(e)
        outputs.append(np.concatenate(row_o, axis=1))
        errors.append(np.concatenate(row_e, axis=1))
        states.append(state)
    return DeltaRuleResult(*(np.concatenate(x) for x in (outputs, states, errors)))


@pytest.mark.parametrize("method,chunk_size", [("recurrent", 64), ("chunk", 16), ("chunk", 64)])
def test_segment_ids_reset_the_state(method, chunk_size):
    """segment_ids: the state is zeroed where the id changes; outputs, errors and the last
    segment's final state match running each document separately."""
    inputs, _ = case(seed=5, batch=2, steps=70, heads=2, dk=5, dv=7)
    expected = segmented_reference(inputs, SEGMENT_IDS)
    result = jax.jit(
        functools.partial(ops.gated_delta_rule_with_errors, method=method, chunk_size=chunk_size)
    )(*positional(inputs)[:5], initial_state=inputs["initial_state"], segment_ids=SEGMENT_IDS)
    assert_matches(result, expected, f"{method}, chunk {chunk_size}, segments")


def test_segment_ids_gradients_agree_between_methods():
    inputs, _ = case(seed=5, batch=2, steps=70, heads=2, dk=5, dv=7)
    cotangent = np.random.default_rng(1).standard_normal(inputs["v"].shape).astype(np.float32)

    def grads(method):
        def loss(*args):
            o, state, e = ops.gated_delta_rule_with_errors(
                *args[:5], initial_state=args[5], method=method, chunk_size=16, segment_ids=SEGMENT_IDS
            )
            return jnp.sum(o * cotangent) + jnp.sum(e * cotangent) + jnp.sum(state)

        return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*positional(inputs))

    for name, chunk, recurrent in zip(ARGS, grads("chunk"), grads("recurrent")):
        err = rel_rms(chunk, recurrent)
        assert err <= TOL, f"d/d{name}: chunk vs recurrent relative RMS {err:.2e}"


# ------------------------------------------------------------------ prefix -> state -> suffix


@pytest.mark.parametrize("split", [1, 23])
@pytest.mark.parametrize("suffix_method", METHODS)
@pytest.mark.parametrize("prefix_method", METHODS)
def test_prefix_state_suffix_equals_one_pass(prefix_method, suffix_method, split):
    """Run tokens [0, split) then [split, T) from the prefix's state: same as one pass and oracle."""
    inputs, expected = case(seed=61, batch=2, steps=61, heads=3, dk=5, dv=7)
    head = time_slice(inputs, slice(None, split), inputs["initial_state"])
    prefix = run_form(prefix_method, head, chunk_size=16)
    suffix = run_form(suffix_method, time_slice(inputs, slice(split, None), prefix.state), 16)
    joined = DeltaRuleResult(
        jnp.concatenate([prefix.output, suffix.output], 1),
        suffix.state,
        jnp.concatenate([prefix.errors, suffix.errors], 1),
    )
    assert_matches(joined, expected, f"{prefix_method}[:{split}] + {suffix_method}[{split}:]")
    one_pass = run_form(prefix_method, inputs, chunk_size=16)
    chex.assert_trees_all_close(joined, one_pass, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- gradients


def loss_fn(fn, cotangents):
    """Scalar loss touching every output: sum(o * co) + sum(state * cs) + sum(errors * ce)."""

    def loss(*args):
        return sum(jnp.sum(x * c) for x, c in zip(fn(*args), cotangents))

    return loss


GRAD_INPUTS = {
    "realistic": dict(),
    "edge_gates": dict(g=[0.0], beta=[0.0, 1e-6, 1 - 1e-6, 1.0]),
}


@pytest.mark.parametrize("inputs_kind", GRAD_INPUTS)
def test_gradients_chunk_recurrent_and_float64_agree(inputs_kind):
    """d loss / d (q, k, v, g, beta, initial_state): chunk (its chunks looped in Python and under
    lax.scan) vs recurrent, and both vs the float64 oracle differentiated by JAX under jax.enable_x64."""
    base, expected = case(seed=45, batch=2, steps=45, heads=2, dk=5, dv=7)
    inputs = with_edge_gates(base, seed=46, **GRAD_INPUTS[inputs_kind])
    rng = np.random.default_rng(47)
    cotangents = [rng.standard_normal(x.shape) for x in expected]
    args = positional(inputs)
    argnums = tuple(range(len(ARGS)))

    def gradients(fn, args):
        return jax.jit(jax.grad(loss_fn(fn, cotangents), argnums))(*args)

    grads = {method: gradients(sequence_fn(method, 16), args) for method in METHODS}
    # 45 tokens in chunks of 16: 3 chunks, looped in Python; in chunks of 4: 12, under lax.scan.
    assert -(-45 // 16) <= ops.delta_rule.UNROLLED_CHUNKS < -(-45 // 4)
    grads["scanned"] = gradients(sequence_fn("chunk", 4), args)
    with jax.enable_x64(True):
        args64 = [jnp.asarray(x, jnp.float64) for x in args]
        grads64 = [np.asarray(x) for x in gradients(gated_delta_rule_reference_jax, args64)]
    assert all(x.dtype == np.float64 for x in grads64), "the reference gradients are not float64"
    for name, chunk, scanned, recurrent, reference in zip(ARGS, grads["chunk"], grads["scanned"], grads["recurrent"],
                                                          grads64):
        chex.assert_type([chunk, scanned, recurrent], jnp.float32)
        for label, got, want in (("chunk vs recurrent", chunk, recurrent),
                                 ("recurrent vs float64", recurrent, reference),
                                 ("chunk vs float64", chunk, reference),
                                 ("chunk (scanned) vs float64", scanned, reference)):
            err = rel_rms(got, want)
            assert err <= TOL, f"d/d{name} {label}: relative RMS error {err:.2e} > {TOL:.0e}"


@pytest.mark.parametrize("n", [1, 5, 64])
def test_unit_lower_inverse_and_its_backward_match_float64(n):
    """(I + L)^-1 and its written-out backward against NumPy's float64 inverse and JAX's float64
    autodiff of jnp.linalg.inv, on a batch of strictly lower L (n = 5 exercises the padding)."""
    rng = np.random.default_rng(48)
    lower = np.tril(rng.standard_normal((3, 2, n, n)) * 0.3, -1)
    cotangent = rng.standard_normal(lower.shape)
    inverse, vjp = jax.vjp(ops.delta_rule.unit_lower_inverse, jnp.asarray(lower, jnp.float32))
    (grad,) = vjp(jnp.asarray(cotangent, jnp.float32))
    with jax.enable_x64(True):
        def reference(x):
            return jnp.sum(jnp.linalg.inv(jnp.eye(n) + jnp.tril(x, -1)) * cotangent)

        grad64 = np.asarray(jax.grad(reference)(jnp.asarray(lower, jnp.float64)))
    assert grad64.dtype == np.float64
    assert rel_rms(inverse, np.linalg.inv(np.eye(n) + lower)) <= TOL
    assert rel_rms(grad, grad64) <= TOL if n > 1 else np.all(np.asarray(grad) == 0.0)
    assert np.all(np.asarray(grad)[..., np.triu_indices(n)[0], np.triu_indices(n)[1]] == 0.0)


# ---------------------------------------------------------------------- dtypes and fla API


@pytest.mark.parametrize("form", FORMS)
def test_bf16_inputs_give_bf16_output_and_fp32_state_and_errors(form):
    """State and gate math stay float32. The recurrent and single-step forms compute in float32 throughout: its
    state/errors match the oracle (on the bf16-rounded inputs) at float32 tolerance and its output
    is that result rounded once to bf16. The chunked form also rounds the operands of its products
    between chunks of tokens (the WY products, K K^T, the read-outs) to bf16 and accumulates in
    float32, as fla's kernels do: each rounding adds a relative error of RMS u / sqrt(3) (u = 2^-8),
    and a state passes through about three in sequence (the inverse and beta V into U, U - W S into
    the state, that into the next chunk's read-out), with two operands each: sqrt(6) u / sqrt(3) =
    1.4 u. Allowed: 2 u = 2^-7 (measured 2.3e-3 = 0.6 u)."""
    base, _ = case(seed=37, batch=2, steps=37, heads=3, dk=5, dv=7)
    inputs = {n: jnp.asarray(x, jnp.bfloat16) for n, x in base.items() if n != "initial_state"}
    inputs["initial_state"] = base["initial_state"]  # states are float32
    rounded = [np.asarray(x, np.float64) for x in positional(inputs)]
    expected = DeltaRuleResult(*gated_delta_rule_reference(*rounded))
    result = run_form(form, inputs)
    chex.assert_type(result.output, jnp.bfloat16)
    chex.assert_type([result.state, result.errors], jnp.float32)
    tol = 2**-7 if form == "chunk" else TOL
    assert_matches(result, expected, f"{form} bf16", fields=("state", "errors"), tol=tol)
    # bf16 keeps 8 significant bits: round-to-nearest is within 2^-8 relative.
    output = np.asarray(result.output, np.float64)
    if form != "chunk":
        chex.assert_trees_all_close(output, expected.output, rtol=2**-8, atol=1e-6)
    else:
        assert rel_rms(output, expected.output) <= tol


@pytest.mark.parametrize("method", METHODS)
def test_output_final_state_flag_follows_fla(method):
    """gated_delta_rule returns (o, None) by default and (o, state) with output_final_state=True."""
    inputs, expected = case(seed=29, batch=2, steps=29, heads=2, dk=5, dv=7)

    def call(output_final_state):
        def fn(q, k, v, g, beta, initial_state):
            return ops.gated_delta_rule(
                q, k, v, g, beta, initial_state=initial_state,
                output_final_state=output_final_state, method=method, chunk_size=16)

        return jax.jit(fn)(*positional(inputs))

    o, state = call(False)
    assert state is None
    assert_matches(DeltaRuleResult(o, None, None), expected, method, fields=("output",))
    o, state = call(True)
    assert_matches(DeltaRuleResult(o, state, None), expected, method, fields=("output", "state"))


# -------------------------------------------------------------------------------- bad input


def _set(name, fn):
    """Mutation replacing inputs[name] by fn(inputs[name])."""
    return lambda inputs: {**inputs, name: fn(inputs[name])}


# (id, argument the message must name, mutation of the valid inputs, extra keyword arguments)
SEQUENCE_ERRORS = [
    ("k_wrong_K", "k", _set("k", lambda x: x[..., :4]), {}),
    ("k_wrong_T", "k", _set("k", lambda x: x[:, :-1]), {}),
    ("v_wrong_B", "v", _set("v", lambda x: x[:1]), {}),
    ("v_wrong_T", "v", _set("v", lambda x: x[:, :-1]), {}),
    ("v_wrong_H", "v", _set("v", lambda x: x[:, :, :2]), {}),
    ("g_wrong_T", "g", _set("g", lambda x: x[:, :-1]), {}),
    ("beta_wrong_H_vs_g", "beta", _set("beta", lambda x: x[:, :, :2]), {}),
    ("q_rank_3", "q", _set("q", lambda x: x[..., 0]), {}),
    ("v_rank_5", "v", _set("v", lambda x: x[..., None]), {}),
    ("g_rank_4", "g", _set("g", lambda x: x[..., None]), {}),
    ("beta_rank_2", "beta", _set("beta", lambda x: x[..., 0]), {}),
    ("q_int32", "q", _set("q", lambda x: x.astype(np.int32)), {}),
    ("v_int32", "v", _set("v", lambda x: x.astype(np.int32)), {}),
    ("g_int32", "g", _set("g", lambda x: x.astype(np.int32)), {}),
    ("beta_bool", "beta", _set("beta", lambda x: x > 0.5), {}),
    ("initial_state_transposed", "initial_state", _set("initial_state", lambda x: x.mT), {}),
    ("initial_state_no_batch", "initial_state", _set("initial_state", lambda x: x[0]), {}),
    ("initial_state_int32", "initial_state",
     _set("initial_state", lambda x: x.astype(np.int32)), {}),
    ("chunk_size_0", "chunk_size", None, dict(chunk_size=0)),
    ("chunk_size_negative", "chunk_size", None, dict(chunk_size=-16)),
    ("chunk_size_float", "chunk_size", None, dict(chunk_size=16.0)),
    ("chunk_size_bool", "chunk_size", None, dict(chunk_size=True)),
    ("method_unknown", "method", None, dict(method="parallel")),
    ("segment_ids_float", "segment_ids", None, dict(segment_ids=np.zeros((2, 9), np.float32))),
    ("segment_ids_wrong_T", "segment_ids", None, dict(segment_ids=np.zeros((2, 8), np.int32))),
]

STEP_ERRORS = [
    ("state_transposed", "state", _set("state", lambda x: x.mT), {}),
    ("state_wrong_B", "state", _set("state", lambda x: x[:1]), {}),
    ("state_rank_3", "state", _set("state", lambda x: x[0]), {}),
    ("state_int32", "state", _set("state", lambda x: x.astype(np.int32)), {}),
    ("q_with_T_axis", "q", _set("q", lambda x: x[:, None]), {}),
    ("v_wrong_H", "v", _set("v", lambda x: x[:, :2]), {}),
    ("beta_wrong_B", "beta", _set("beta", lambda x: x[:1]), {}),
]


def error_pattern(arg, inputs):
    """The message must start with the argument's name and, for arrays, contain its bad shape."""
    pattern = rf"^{arg}\b"
    if arg in inputs:
        pattern += rf".*{re.escape(str(tuple(np.shape(inputs[arg]))))}"
    return pattern


def assert_raises_at_trace_time(fn, inputs, pattern, use_jit):
    """ValueError matching `pattern`, eagerly, or while jax.jit traces (nothing is compiled or run)."""
    names = list(inputs)
    call = lambda *xs: fn(**dict(zip(names, xs)))  # noqa: E731
    with pytest.raises(ValueError, match=pattern):
        if use_jit:
            jax.jit(call).trace(*inputs.values())
        else:
            call(*inputs.values())


def error_cases(cases):
    return pytest.mark.parametrize("arg, mutate, kwargs", [c[1:] for c in cases],
                                   ids=[c[0] for c in cases])


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@error_cases(SEQUENCE_ERRORS)
def test_sequence_bad_input_raises_naming_argument(arg, mutate, kwargs, use_jit):
    valid, _ = case(seed=9, batch=2, steps=9, heads=3, dk=5, dv=7)
    inputs = mutate(valid) if mutate else dict(valid)
    fn = functools.partial(ops.gated_delta_rule_with_errors, **kwargs)
    assert_raises_at_trace_time(fn, inputs, error_pattern(arg, inputs), use_jit)


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@error_cases(STEP_ERRORS)
def test_step_bad_input_raises_naming_argument(arg, mutate, kwargs, use_jit):
    valid, _ = case(seed=9, batch=2, steps=9, heads=3, dk=5, dv=7)
    step_inputs = {n: valid[n][:, 0] for n in ARGS[:5]} | {"state": valid["initial_state"]}
    inputs = mutate(step_inputs)
    fn = functools.partial(ops.gated_delta_rule_step, **kwargs)
    assert_raises_at_trace_time(fn, inputs, error_pattern(arg, inputs), use_jit)


def test_valid_inputs_do_not_raise():
    """The bad-input tests start from these inputs; they must themselves be accepted."""
    valid, _ = case(seed=9, batch=2, steps=9, heads=3, dk=5, dv=7)
    for method in METHODS:
        jax.jit(sequence_fn(method, 4)).trace(*positional(valid))
    step_args = [valid[n][:, 0] for n in ARGS[:5]] + [valid["initial_state"]]
    jax.jit(ops.gated_delta_rule_step).trace(*step_args)


# ---------------------------------------------------------------------------- fla cross-check


@pytest.fixture(scope="module")
def fla_naive():
    """fla/ops/gated_delta_rule/naive.py loaded by path: importing `fla.ops` would pull in triton."""
    if any(importlib.util.find_spec(m) is None for m in ("torch", "fla", "einops")):
        pytest.skip(REF_REASON)
    (fla_dir,) = importlib.util.find_spec("fla").submodule_search_locations
    path = pathlib.Path(fla_dir) / "ops" / "gated_delta_rule" / "naive.py"
    spec = importlib.util.spec_from_file_location("fla_gated_delta_rule_naive", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_matches_fla_naive_references(fla_naive, chunk_size, scale):
    """Ours (both methods) vs fla's naive recurrent and chunk references: outputs and final state,
    nonzero initial state, T = 100 (not a multiple of 64 or 16). fla is also checked against the
    oracle, so that a convention mismatch (argument order, scale) is reported as such."""
    import torch

    inputs, _ = case(seed=100, batch=2, steps=100, heads=2, dk=5, dv=7)
    expected = gated_delta_rule_reference(*positional(inputs), scale=scale)
    t = {name: torch.from_numpy(x) for name, x in inputs.items()}
    common = dict(scale=scale, initial_state=t["initial_state"], output_final_state=True)
    fla = {  # mind the order: recurrent takes (..., beta, g), chunk takes (..., g, beta)
        "fla recurrent": fla_naive.naive_recurrent_gated_delta_rule(
            t["q"], t["k"], t["v"], t["beta"], t["g"], **common),
        "fla chunk": fla_naive.naive_chunk_gated_delta_rule(
            t["q"], t["k"], t["v"], t["g"], t["beta"], chunk_size=chunk_size, **common),
    }
    ours = {method: jitted(method, chunk_size, scale)(*positional(inputs))[:2] for method in METHODS}
    for fla_name, (fla_o, fla_state) in fla.items():
        fla_o, fla_state = fla_o.numpy(), fla_state.numpy()
        for field, got, want in (("output", fla_o, expected[0]), ("state", fla_state, expected[1])):
            err = rel_rms(got, want)
            assert err <= TOL, f"{fla_name} {field} vs oracle: relative RMS error {err:.2e}"
        for method, (o, state) in ours.items():
            for field, got, want in (("output", o, fla_o), ("state", state, fla_state)):
                err = rel_rms(got, want)
                assert err <= TOL, f"{method} vs {fla_name} {field}: relative RMS error {err:.2e}"
