"""Training step on long packed rows: HAM's attention paths against a Transformer and GDN, in time
and compiled memory, side by side in one run.

    python experiments/bench_packed_step.py            # timed at T from 1k to 8k; memory from 1k to 16k
    python experiments/bench_packed_step.py --quick    # the tiny preset at T = 128 and 256, two models

The `small` preset's shape, one row per step (A = B = 1) packing two documents of T/2 tokens
(segment ids 1 and 2, so nothing crosses the boundary). HAM holds T/8 slots per document and head
(capacity) and each layer's tau is set, layer by layer, to the 0.75 quantile of its surprise
scores on the row (`calibrate_thresholds`), with the controller off: about a quarter of each
document's tokens score above tau, spread through it, and fill its slots, a KV fraction of about
0.25 (the measured one is recorded). The models: HAM with the dense T x T reference attention
(ham_dense), HAM with compacted attention (ham_compacted), the same shape as a Transformer
(pattern "attention") and as GDN. Their attention runs blockwise (`ops.blockwise_attend`) except
ham_dense's.

Per T: the compiled memory of the training step (`memory.compiled_step`: argument + output + temp
- alias, deterministic) and, at the --time_lengths, the median step time (`train_step`, timed
interleaved after a compiling call) with each model's ratio to the Transformer's. A model whose
memory need is over `common.memory_budget` is not run. Per model, the log-log slope in T of its
temp bytes.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from hamjax.bench.common import loglog_slope, median_times, memory_budget, memory_need, save_results, variant
from hamjax.bench.memory import compiled_step
from hamjax.train import PRESETS, train_step
from hamjax.train.loop import build

DEFAULT_OUTPUT = "runs/bench/packed_step.json"
MODELS = {
    "ham_dense": {"ham_attention": "dense"},
    "ham_compacted": {"ham_attention": "compacted"},
    "transformer": {"pattern": "attention"},
    "gdn": {"pattern": "gdn"},
}
QUICK_MODELS = ("ham_compacted", "transformer")  # each model is a compile of several seconds
KV_FRACTION = 0.25
MIB = 2**20


def packed_rows(t: int, vocab: int, seed: int = 0):
    """One training row of t + 1 random tokens in two documents (the first t/2 tokens, then the
    rest): (rows, segment_ids) [A = 1, B = 1, t + 1] int32."""
    rows = np.random.default_rng(seed).integers(0, vocab, size=(1, 1, t + 1), dtype=np.int32)
    segment_ids = np.where(np.arange(t + 1) < t // 2, 1, 2).astype(np.int32)
    return jnp.asarray(rows), jnp.asarray(np.broadcast_to(segment_ids, rows.shape))


def calibrate_thresholds(model, tokens, segment_ids, fraction: float) -> None:
    """Set each HAM layer's tau to the (1 - fraction) quantile of its surprise scores on tokens
    [B, T] (segment_ids [B, T]), layer by layer, as the layers before it then read the row."""
    x = model.embed(tokens)
    for block in model.blocks:
        if block.kind == "ham":
            _, _, stats = block.mixer(block.mixer_norm(x), segment_ids=segment_ids, tau=jnp.inf)
            log_tau = jnp.log(jnp.quantile(stats.scores, 1.0 - fraction))
            block.mixer.threshold.set_value(block.mixer.threshold.get_value()._replace(log_tau=log_tau))
        x, _, _ = block(x, segment_ids=segment_ids)


def configs(t: int, quick: bool) -> dict:
    preset = PRESETS["tiny" if quick else "small"]
    return {name: variant(preset, t, capacity=max(1, t // 8), kv_target=None, **MODELS[name])
            for name in (QUICK_MODELS if quick else MODELS)}


def built(config, rows, segment_ids):
    """(model, optimizer), HAM thresholds calibrated on the row."""
    model, optimizer = build(config)
    if model.ham_layers:
        calibrate_thresholds(model, rows[0, :, :-1], segment_ids[0, :, :-1], KV_FRACTION)
    return model, optimizer


def measure(t: int, timed: bool, repeats: int, quick: bool) -> dict:
    row = {"T": t, "bytes": {}, "kv_fraction": {}}
    runners = {}
    for name, config in configs(t, quick).items():
        rows, segment_ids = packed_rows(t, config.model.vocab_size)
        need = memory_need(compiled_step(config)[0])
        row["bytes"][name] = need
        if not timed:
            continue
        if need["peak"] > memory_budget():
            row.setdefault("not_run", {})[name] = f"compiled memory need {need['peak'] / MIB:.0f} MiB over the budget"
            continue
        model, optimizer = built(config, rows, segment_ids)
        metrics = train_step(model, optimizer, rows, segment_ids)
        row["kv_fraction"][name] = [float(f) for f in metrics.kv_fraction]
        runners[name] = lambda m=model, o=optimizer, r=rows, s=segment_ids: jax.block_until_ready(train_step(m, o, r, s))
    if timed:
        row["seconds_per_step"] = median_times(runners, repeats)
        base = row["seconds_per_step"].get("transformer")
        row["over_transformer"] = {n: s / base for n, s in row["seconds_per_step"].items()} if base else {}
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                        help="T of the memory measurement")
    parser.add_argument("--time_lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                        help="T of the timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", help=f"results JSON (default {DEFAULT_OUTPUT}; none with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.time_lengths, args.repeats = [128, 256], [256], 1
    output = args.output if args.quick else args.output or DEFAULT_OUTPUT
    rows = []
    for t in sorted(set(args.lengths) | set(args.time_lengths)):
        row = measure(t, t in args.time_lengths, args.repeats, args.quick)
        rows.append(row)
        print(f"T={t:5d}  " + "  ".join(f"{n} {b['peak'] / MIB:.0f} MiB" for n, b in row["bytes"].items()), flush=True)
        for name, seconds in row.get("seconds_per_step", {}).items():
            print(f"         {name:14s} {1e3 * seconds:9.1f} ms/step ({row['over_transformer'][name]:.2f}x the "
                  f"Transformer)  KV fraction {row['kv_fraction'][name]}", flush=True)
    memory_rows = [row for row in rows if row["T"] in args.lengths]
    slopes = {name: loglog_slope([r["T"] for r in memory_rows], [r["bytes"][name]["temp"] for r in memory_rows])
              for name in memory_rows[0]["bytes"]} if len(memory_rows) > 1 else {}
    return save_results(
        f"training step of the {'tiny' if args.quick else 'small'} preset's shape on one packed row of two "
        f"documents of T/2 tokens, HAM with T/8 slots per document and tau at the {1 - KV_FRACTION} quantile "
        f"of its scores: {', '.join(rows[0]['bytes'])}; compiled memory and step time",
        rows,
        args.repeats,
        output,
        temp_loglog_slope=slopes,
    )


def summary(result: dict) -> str:
    """Per T: each model's step time and its ratio to the Transformer's (where timed), peak and
    temp MiB; then each model's log-log slope of temp bytes in T."""
    names = list(result["rows"][0]["bytes"])
    lines = ["| T | model | ms / step (/ Transformer) | KV fraction | peak MiB | temp MiB |", "|---" * 6 + "|"]
    for row in result["rows"]:
        for name in names:
            need = row["bytes"][name]
            timed = row.get("seconds_per_step", {})
            time = f"{1e3 * timed[name]:.0f} ({row['over_transformer'][name]:.2f}x)" if name in timed else "-"
            fraction = ", ".join(f"{f:.2f}" for f in row["kv_fraction"].get(name, [])) or "-"
            lines.append(f"| {row['T']} | {name} | {time} | {fraction} | {need['peak'] / MIB:.0f} | "
                         f"{need['temp'] / MIB:.0f} |")
    slopes = result["temp_loglog_slope"]
    if slopes:
        lines += ["", "Log-log slope of temp bytes in T: " + ", ".join(f"{n} {s:.2f}" for n, s in slopes.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
