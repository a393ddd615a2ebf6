"""Training step speed and model FLOP utilisation (MFU) of five models of the same shape.

    python experiments/bench_train_step.py            # the small preset: B=16 rows of T=256
    python experiments/bench_train_step.py --quick    # the tiny preset (B=4, T=64), HAM and Transformer, 1 repeat

The models: the `small` preset as is (all-HAM, compacted routed attention), the same with the
dense T x T reference attention, a Transformer (pattern "attention"), GDN, and GDN with every 4th layer attention
("gdn,gdn,gdn,attention"; the tiny preset's 2 layers leave it GDN only: see each row's mixers).
Each is built as training builds it (`hamjax.train.loop.build`) and steps with
`hamjax.train.train_step` on synthetic rows (random byte tokens, one document per row), one
optimizer update per call, as the training loop calls it (nnx.jit's Python overhead included);
the models are timed interleaved after a compiling warm-up call.

Reported per T: median seconds per step, tokens/s, training FLOPs per token by component
(`hamjax.train.flops.forward_flops_per_token` x 3: the backward is counted as twice the forward;
matmuls only) and MFU = tokens/s x training FLOPs per token / peak, the peak being
`hamjax.train.flops.measure_matmul_peak()` (the best fp32 matmul FLOP/s) measured in the same run.
--lengths sets T.
"""

from __future__ import annotations

import jax

from hamjax.bench.common import median_times, parse_args, save_results, synthetic_rows, variant
from hamjax.train import PRESETS, train_step
from hamjax.train.flops import forward_flops_per_token, measure_matmul_peak
from hamjax.train.loop import build

DEFAULT_OUTPUT = "runs/bench/train_step.json"
MODELS = {
    "ham": {},
    "ham_dense": {"ham_attention": "dense"},
    "transformer": {"pattern": "attention"},
    "gdn": {"pattern": "gdn"},
    "gdn_attention": {"pattern": "gdn,gdn,gdn,attention"},
}
QUICK_MODELS = ("ham", "transformer")  # each model is a compile of several seconds


def training_flops(config, t: int) -> dict[str, int]:
    """Training FLOPs per token by component (3 x forward) and their "total"."""
    counts = {name: 3 * n for name, n in forward_flops_per_token(config, t).items()}
    return counts | {"total": sum(counts.values())}


def step_runner(config):
    """A call that takes one training step of a freshly built model on synthetic rows."""
    model, optimizer = build(config)
    rows, segment_ids = synthetic_rows(config.train.grad_accum, config.train.batch_size, config.data.seq_len,
                                       config.model.vocab_size)
    return lambda: jax.block_until_ready(train_step(model, optimizer, rows, segment_ids))


def main(argv=None):
    lengths, repeats, output, quick = parse_args(
        argv, __doc__, DEFAULT_OUTPUT, [PRESETS["small"].data.seq_len], 5, [PRESETS["tiny"].data.seq_len], 1
    )
    preset_name, names = ("tiny", QUICK_MODELS) if quick else ("small", tuple(MODELS))
    preset = PRESETS[preset_name]
    peak = measure_matmul_peak()
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s", flush=True)
    rows = []
    for t in lengths:
        configs = {name: variant(preset, t, **MODELS[name]) for name in names}
        times = median_times({name: step_runner(c) for name, c in configs.items()}, repeats)
        tokens = preset.train.grad_accum * preset.train.batch_size * t
        flops = {name: training_flops(c.model, t) for name, c in configs.items()}
        speed = {name: tokens / s for name, s in times.items()}
        row = {
            "T": t,
            "tokens_per_step": tokens,
            "mixers": {name: ",".join(c.model.mixers) for name, c in configs.items()},
            "seconds_per_step": times,
            "tokens_per_s": speed,
            "train_flops_per_token": flops,
            "mfu": {name: speed[name] * flops[name]["total"] / peak for name in times},
        }
        rows.append(row)
        for name in times:
            print(f"T={t:5d}  {name:14s} {1e3 * times[name]:8.1f} ms/step {speed[name]:10.0f} tok/s  "
                  f"{flops[name]['total'] / 1e6:7.2f} MFLOP/token  MFU {row['mfu'][name]:.3f}", flush=True)
    return save_results(
        f"training step of the {preset_name} preset's shape (B={preset.train.batch_size}, A={preset.train.grad_accum}) "
        f"on synthetic rows: {', '.join(names)}; MFU against the measured fp32 matmul peak, training FLOPs = "
        "3 x forward (backward = 2 x forward)",
        rows,
        repeats,
        output,
        preset=preset_name,
        peak_flops=peak,
    )


def summary(result: dict) -> str:
    """Per T and model: ms per step, tokens/s, training MFLOPs per token by component and in all, MFU."""
    components = [c for c in next(iter(result["rows"][0]["train_flops_per_token"].values())) if c != "total"]
    lines = [
        f"Matmul peak {result['peak_flops'] / 1e9:.1f} GFLOP/s (fp32, measured in the same run). "
        "Training MFLOP per token by component, then in all.",
        "",
        "| T | model | mixers | ms / step | tokens / s | " + " | ".join(components) + " | total | MFU |",
        "|---" * (len(components) + 7) + "|",
    ]
    for row in result["rows"]:
        for name, seconds in row["seconds_per_step"].items():
            flops = row["train_flops_per_token"][name]
            lines.append(
                f"| {row['T']} | {name} | {row['mixers'][name]} | {1e3 * seconds:.1f} | {row['tokens_per_s'][name]:.0f} | "
                + " | ".join(f"{flops[c] / 1e6:.2f}" for c in components)
                + f" | {flops['total'] / 1e6:.2f} | {row['mfu'][name]:.3f} |"
            )
    return "\n".join(lines)

if __name__ == "__main__":
    main()
