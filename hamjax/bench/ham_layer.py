"""HAM vs full attention vs GDN sequence mixing, forward+backward, measured side by side.

    python experiments/bench_ham_layer.py            # T in {1024, 4096, 8192}, B=1, H=4, K=V=64
    python experiments/bench_ham_layer.py --quick    # seconds, for the tests

Each contender is the token-mixing core of a layer of the same width (the q/k/v/gate projections
and the output projection cost the same for all three and are left out):
- attention: causal softmax attention over every token with RoPE (`jax.nn.dot_product_attention`);
- GDN: the chunked gated delta rule;
- HAM at KV fraction f: the chunked gated delta rule plus routed attention on the compacted path
  with capacity f*T and tau at the (1 - f) quantile of the surprise scores (still quadratic in T,
  a quarter of the attention's cost at f = 0.25);
- HAM with a fixed capacity of 512 entries (tau at the 0.75 quantile): linear in T.
Reports median times, ratios to attention, and the log-log slope of time in T for each kind.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hamjax.bench.common import make_inputs, median_times, parse_args, save_results
from hamjax import ops

DEFAULT_OUTPUT = "experiments/results/ham_layer_cpu.json"
FRACTIONS = (0.1, 0.25, 0.5)
FIXED_CAPACITY = 512  # tau at the 0.75 quantile, but a cache that stops growing at 512 entries


def attention_loss(q, k, v, g, beta, cot, positions, logit_scale):
    q, k = ops.apply_rope(q, positions), ops.apply_rope(k, positions)
    o = jax.nn.dot_product_attention(q, k, v, scale=q.shape[-1] ** 0.5, is_causal=True)
    return jnp.sum(o * cot)


def gdn_loss(q, k, v, g, beta, cot, positions, logit_scale):
    return jnp.sum(ops.gated_delta_rule(q, k, v, g, beta)[0] * cot)


def ham_loss(tau: float, capacity: int):
    def loss(q, k, v, g, beta, cot, positions, logit_scale):
        state = ops.init_ham_state(q.shape[0], q.shape[2], q.shape[3], v.shape[3], capacity)
        out = ops.ham_sequence(q, k, v, g, beta, state, tau=tau, logit_scale=logit_scale)
        return jnp.sum((out.o_rnn + out.o_attn) * cot)

    return loss


def runner(loss, args):
    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    return lambda: jax.block_until_ready(fwd_bwd(*args))


def slope(lengths, seconds) -> float:
    """Least-squares slope of log(time) against log(T)."""
    return float(np.polyfit(np.log(lengths), np.log(seconds), 1)[0])


def main(argv=None):
    lengths, repeats, output, _ = parse_args(argv, __doc__, DEFAULT_OUTPUT, [1024, 4096, 8192], 3, [128, 256], 1)
    batch, heads, dk, dv = 1, 4, 64, 64
    logit_scale = jnp.full((heads,), dk**0.5, jnp.float32)
    rows = []
    for t in lengths:
        inputs = make_inputs(t, batch, heads, dk, dv)
        inputs["q"] /= np.linalg.norm(inputs["q"], axis=-1, keepdims=True)
        args_ = [jnp.asarray(inputs[n]) for n in ("q", "k", "v", "g", "beta", "cotangent")]
        args_ += [jnp.broadcast_to(jnp.arange(t), (batch, t)), logit_scale]
        scores = np.asarray(ops.surprise_scores(ops.gated_delta_rule_with_errors(*args_[:5]).errors))
        runners = {"attention": runner(attention_loss, args_), "gdn": runner(gdn_loss, args_)}
        for f in FRACTIONS:
            tau = float(np.quantile(scores, 1.0 - f))
            runners[f"ham_{f}"] = runner(ham_loss(tau, max(1, round(f * t))), args_)
        tau = float(np.quantile(scores, 0.75))
        runners[f"ham_cap{FIXED_CAPACITY}"] = runner(ham_loss(tau, FIXED_CAPACITY), args_)
        times = median_times(runners, repeats)
        row = {"T": t, "seconds": times, "over_attention": {n: s / times["attention"] for n, s in times.items()}}
        rows.append(row)
        print(f"T={t:5d}  " + "  ".join(f"{n} {1e3 * s:8.1f} ms ({row['over_attention'][n]:.2f}x)" for n, s in times.items()), flush=True)
    slopes = {}
    if len(lengths) > 1:
        slopes = {n: slope(lengths, [r["seconds"][n] for r in rows]) for n in rows[0]["seconds"]}
        print("log-log slope in T: " + "  ".join(f"{n} {s:.2f}" for n, s in slopes.items()))
    return save_results(
        "token mixing fwd+bwd: causal attention vs GDN vs HAM (compacted, capacity f*T), B=1 H=4 K=V=64",
        rows,
        repeats,
        output,
        loglog_slope=slopes,
    )


if __name__ == "__main__":
    main()
