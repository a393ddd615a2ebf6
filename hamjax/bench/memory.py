"""Peak memory of a training step against T: HAM vs Transformer vs GDN, from XLA's buffer assignment.

    python experiments/bench_memory.py            # T in {512, 1k, 2k, 4k, 8k, 16k}, one row of T tokens
    python experiments/bench_memory.py --quick    # the tiny preset's shape, T in {64, 128}, HAM and Transformer

The `small` preset's model shape, one row per step (A = B = 1): HAM (the preset: compacted routed
attention, blockwise), HAM with the dense T x T reference attention, a Transformer (pattern
"attention") and GDN. For each model and T the training step (`hamjax.train.step.state_train_step`:
train_step with its optimizer update, as a function of the model and optimizer state) is compiled,
and XLA's memory analysis of it gives argument, output, temp and alias
bytes and peak = argument + output + temp - alias (`common.memory_need`): deterministic, nothing
is timed. Arguments: parameters, optimizer state and rows; outputs: their updated copies
(train_step donates nothing); temp: what the backward keeps and the working buffers. On a CPU the
step is compiled without YNNPACK fusions so that every buffer is counted
(`common.count_every_buffer`). On an accelerator one real step also runs (when its need is within
`common.memory_budget`) and the device's peak_bytes_in_use after it is recorded: the process's
high-water mark, exact for a step that needs more than every step before it.

Reports per T each model's bytes and its peak over the Transformer's, and per model the log-log
slope in T of its peak bytes and of its temp bytes (the part that grows with T). At short T the
parameters and optimizer state (in the arguments and outputs) dominate the peak.
"""

from __future__ import annotations

import jax
from flax import nnx

from hamjax.bench.common import (
    count_every_buffer, loglog_slope, memory_budget, memory_need, parse_args, save_results, synthetic_rows, variant,
)
from hamjax.bench.train_step import MODELS
from hamjax.train import PRESETS
from hamjax.train.loop import build
from hamjax.train.step import state_train_step

DEFAULT_OUTPUT = "runs/bench/memory.json"
NAMES = ("ham", "ham_dense", "transformer", "gdn")
QUICK_NAMES = ("ham", "transformer")
MIB = 2**20


def compiled_step(config, rows: int = 1, compiler_options: dict | None = None):
    """(the training step of a freshly built model on `rows` synthetic rows of config's seq_len (one
    micro-batch), compiled as a function (state, rows, segment_ids) -> (new state, StepMetrics), its
    arguments). compiler_options default: `count_every_buffer()`."""
    graphdef, state = nnx.split(build(config))
    args = (state, *synthetic_rows(1, rows, config.data.seq_len, config.model.vocab_size))
    options = count_every_buffer() if compiler_options is None else compiler_options
    return jax.jit(state_train_step(graphdef)).lower(*args).compile(compiler_options=options), args


def device_peak(compiled, args, need: int) -> int | None:
    """The device's peak_bytes_in_use after one real step; None where the device keeps no such
    statistic (a CPU) or the step needs more than the budget."""
    if "peak_bytes_in_use" not in (jax.devices()[0].memory_stats() or {}) or need > memory_budget():
        return None
    jax.block_until_ready(compiled(*args))
    return jax.devices()[0].memory_stats()["peak_bytes_in_use"]


def main(argv=None):
    lengths, _, output, quick = parse_args(argv, __doc__, DEFAULT_OUTPUT, [512, 1024, 2048, 4096, 8192, 16384], None,
                                           [64, 128], None)
    names, preset_name = (QUICK_NAMES, "tiny") if quick else (NAMES, "small")
    rows = []
    for t in lengths:
        row = {"T": t, "peak_bytes": {}, "bytes": {}}
        for name in names:
            compiled, args = compiled_step(variant(PRESETS[preset_name], t, **MODELS[name]))
            need = memory_need(compiled)
            row["peak_bytes"][name], row["bytes"][name] = need["peak"], need
            peak = device_peak(compiled, args, need["peak"])
            if peak is not None:
                row.setdefault("device_peak_bytes_in_use", {})[name] = peak
        row["over_transformer"] = {n: b / row["peak_bytes"]["transformer"] for n, b in row["peak_bytes"].items()}
        rows.append(row)
        print(f"T={t:5d}  " + "  ".join(f"{n} {b / MIB:8.1f} MiB ({row['over_transformer'][n]:.2f}x)"
                                        for n, b in row["peak_bytes"].items()), flush=True)
    slopes = {
        field: {name: loglog_slope(lengths, [row["bytes"][name][field] for row in rows]) for name in names}
        for field in ("peak", "temp")
    } if len(lengths) > 1 else {}
    return save_results(
        f"compiled memory of a training step ({preset_name} preset shape, one row of T tokens): {', '.join(names)}",
        rows,
        None,
        output,
        preset=preset_name,
        loglog_slope=slopes,
        compiler_options=count_every_buffer(),
    )


def summary(result: dict) -> str:
    """Peak MiB per model and T with its ratio to the Transformer's, then the log-log slopes of
    peak and temp bytes."""
    names = list(result["rows"][0]["peak_bytes"])
    lines = ["| T | " + " | ".join(f"{n} peak MiB (/ Transformer)" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in result["rows"]:
        lines.append(f"| {row['T']} | " + " | ".join(
            f"{row['peak_bytes'][n] / MIB:.1f} ({row['over_transformer'][n]:.2f}x)" for n in names) + " |")
    for field, slopes in result["loglog_slope"].items():
        lines.append(f"| log-log slope ({field}) | " + " | ".join(f"{slopes[n]:.2f}" for n in names) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
