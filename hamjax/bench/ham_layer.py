"""HAM vs full and sliding-window attention vs GDN sequence mixing, forward+backward, side by side.

    python experiments/bench_ham_layer.py            # T in {1k, 2k, 4k, 8k, 16k}, B=1, H=4, K=V=64
    python experiments/bench_ham_layer.py --quick    # seconds, for the tests

Each contender is the token-mixing core of a layer of the same width (the q/k/v/gate projections
and the output projection cost the same for all of them and are left out):
- attention: causal softmax attention over every token with RoPE (`jax.nn.dot_product_attention`);
- attention_blocks: the same attention as hamjax's layers run it (`ops.blockwise_attend` through
  `ops.dense_routed_attention`: blocks of queries read only the key blocks they can see, about
  half the T x T work, in memory linear in T);
- swa: the same limited to the last `ModelConfig().window` = 128 keys, the query's own included
  (`local_window_size`; XLA still computes the T x T logits and masks them);
- GDN: the chunked gated delta rule;
- HAM at KV fraction f: the chunked gated delta rule plus routed attention on the compacted path
  with capacity f*T and tau at the (1 - f) quantile of the surprise scores (still quadratic in T,
  a quarter of the attention's cost at f = 0.25);
- HAM with a fixed capacity of 512 entries (tau at the 0.75 quantile): linear in T.
--quick runs HAM at f = 0.25 only (each HAM contender is a compile of several seconds).

Before a contender runs at a length, its compiled memory need (`common.memory_need`) is read; above
the budget (`common.memory_budget`: half the device's memory) it is skipped and the row records why.
Reports median times, ratios to attention (where it ran), each contender's memory need, and the
log-log slope of time in T over the lengths each contender ran.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hamjax import ops
from hamjax.bench.common import (
    loglog_slope, make_inputs, median_times, memory_budget, memory_need, parse_args, save_results,
)
from hamjax.nn import ModelConfig

DEFAULT_OUTPUT = "runs/bench/ham_layer.json"
FRACTIONS = (0.1, 0.25, 0.5)
QUICK_FRACTIONS = (0.25,)
FIXED_CAPACITY = 512  # tau at the 0.75 quantile, but a cache that stops growing at 512 entries
WINDOW = ModelConfig().window
GIB = 2**30


def windowed_attention(q, k, v, scale: float, window: int | None = None):
    """Causal softmax attention, q, k, v [B, T, H, K] -> [B, T, H, K]: query t sees keys
    t - window < j <= t (`ops.attend`'s window), every j <= t when window is None."""
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=local)


def attention_loss(window: int | None = None):
    def loss(q, k, v, g, beta, cot, positions, logit_scale):
        q, k = ops.apply_rope(q, positions), ops.apply_rope(k, positions)
        return jnp.sum(windowed_attention(q, k, v, q.shape[-1] ** 0.5, window) * cot)

    return loss


def blocked_attention_loss(q, k, v, g, beta, cot, positions, logit_scale):
    """The same causal attention as hamjax runs it in a layer: every token a key of
    `ops.dense_routed_attention`, blockwise."""
    q, k = ops.apply_rope(q, positions), ops.apply_rope(k, positions)
    every = jnp.ones(q.shape[:3], bool)
    out = ops.dense_routed_attention(q, k, v, every, positions, logit_scale=logit_scale,
                                     blockwise=True)
    return jnp.sum(out * cot)


def gdn_loss(q, k, v, g, beta, cot, positions, logit_scale):
    return jnp.sum(ops.gated_delta_rule(q, k, v, g, beta)[0] * cot)


def ham_loss(tau: float, capacity: int):
    def loss(q, k, v, g, beta, cot, positions, logit_scale):
        state = ops.init_ham_state(q.shape[0], q.shape[2], q.shape[3], v.shape[3], capacity)
        out = ops.ham_sequence(q, k, v, g, beta, state, tau=tau, logit_scale=logit_scale)
        return jnp.sum((out.o_rnn + out.o_attn) * cot)

    return loss


@jax.jit
def surprise_scores(q, k, v, g, beta):
    """[B, T, H]: the surprise router's score of every token."""
    return ops.surprise_scores(ops.gated_delta_rule_with_errors(q, k, v, g, beta).errors)


def compile_fwd_bwd(loss, args):
    """(the compiled gradient of loss in q, k, v, g, beta, its memory need)."""
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
    return compiled, memory_need(compiled)


def runner(compiled, args):
    return lambda: jax.block_until_ready(compiled(*args))


def run_contenders(losses: dict, args, budget: int, repeats: int) -> dict:
    """Compile each loss's fwd+bwd, skip those whose memory need is over budget bytes and time the
    rest interleaved. Returns {"seconds": {name: median}, "memory_bytes": {name: peak need},
    "skipped": {name: {"reason", "bytes"}}}."""
    runners, needs, skipped = {}, {}, {}
    for name, loss in losses.items():
        compiled, need = compile_fwd_bwd(loss, args)
        needs[name] = need["peak"]
        if need["peak"] > budget:
            reason = f"compiled memory need {need['peak'] / GIB:.2f} GiB over the budget {budget / GIB:.2f} GiB"
            skipped[name] = {"reason": reason, "bytes": need["peak"]}
            print(f"T={args[0].shape[1]:5d}  {name} skipped: {reason}", flush=True)
        else:
            runners[name] = runner(compiled, args)
    return {"seconds": median_times(runners, repeats), "memory_bytes": needs, "skipped": skipped}


def slopes(rows) -> dict[str, float]:
    """Per contender, the log-log slope of its time in T over the lengths it ran (two or more)."""
    ran = {}
    for row in rows:
        for name, seconds in row["seconds"].items():
            ran.setdefault(name, []).append((row["T"], seconds))
    return {name: loglog_slope(*zip(*points)) for name, points in ran.items() if len(points) > 1}


def contenders(t: int, scores, fractions) -> dict:
    """name -> loss(q, k, v, g, beta, cot, positions, logit_scale) at length t."""
    losses = {"attention": attention_loss(), "attention_blocks": blocked_attention_loss, "swa": attention_loss(WINDOW),
              "gdn": gdn_loss}
    for f in fractions:
        losses[f"ham_{f}"] = ham_loss(float(np.quantile(scores, 1.0 - f)), max(1, round(f * t)))
    losses[f"ham_cap{FIXED_CAPACITY}"] = ham_loss(float(np.quantile(scores, 0.75)), FIXED_CAPACITY)
    return losses


def main(argv=None):
    lengths, repeats, output, quick = parse_args(
        argv, __doc__, DEFAULT_OUTPUT, [1024, 2048, 4096, 8192, 16384], 3, [128, 256], 1
    )
    batch, heads, dk, dv = 1, 4, 64, 64
    logit_scale = jnp.full((heads,), dk**0.5, jnp.float32)
    budget = memory_budget()
    rows = []
    for t in lengths:
        inputs = make_inputs(t, batch, heads, dk, dv)
        inputs["q"] /= np.linalg.norm(inputs["q"], axis=-1, keepdims=True)
        args_ = [jnp.asarray(inputs[n]) for n in ("q", "k", "v", "g", "beta", "cotangent")]
        args_ += [jnp.broadcast_to(jnp.arange(t), (batch, t)), logit_scale]
        scores = np.asarray(surprise_scores(*args_[:5]))
        fields = run_contenders(contenders(t, scores, QUICK_FRACTIONS if quick else FRACTIONS), args_, budget, repeats)
        times = fields["seconds"]
        ratios = {n: s / times["attention"] for n, s in times.items()} if "attention" in times else {}
        rows.append({"T": t, **fields, "over_attention": ratios})
        print(f"T={t:5d}  " + "  ".join(f"{n} {1e3 * s:8.1f} ms" + (f" ({ratios[n]:.2f}x)" if ratios else "")
                                        for n, s in times.items()), flush=True)
    fitted = slopes(rows)
    print("log-log slope in T: " + "  ".join(f"{n} {s:.2f}" for n, s in fitted.items()))
    return save_results(
        "token mixing fwd+bwd: causal attention vs sliding-window attention vs GDN vs HAM (compacted, "
        f"capacity f*T), B=1 H=4 K=V=64, window {WINDOW}",
        rows,
        repeats,
        output,
        loglog_slope=fitted,
        memory_budget_bytes=budget,
    )


def summary(result: dict) -> str:
    """Milliseconds and ratio to attention per contender and T, then each contender's slope."""
    names = list(dict.fromkeys(n for row in result["rows"] for n in (*row["seconds"], *row["skipped"])))
    lines = ["| T | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in result["rows"]:
        cells = []
        for name in names:
            if name in row["skipped"]:
                cells.append(f"skipped ({row['skipped'][name]['bytes'] / GIB:.1f} GiB)")
            elif name not in row["seconds"]:
                cells.append("-")
            elif name in row["over_attention"]:
                cells.append(f"{1e3 * row['seconds'][name]:.1f} ms ({row['over_attention'][name]:.2f}x)")
            else:
                cells.append(f"{1e3 * row['seconds'][name]:.1f} ms")
        lines.append(f"| {row['T']} | " + " | ".join(cells) + " |")
    slope = result["loglog_slope"]
    lines.append("| log-log slope | " + " | ".join(f"{slope[n]:.2f}" if n in slope else "-" for n in names) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
