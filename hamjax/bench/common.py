"""What the benchmark scripts share: the command line, realistic inputs, interleaved timing,
compiled memory needs, log-log slopes, the results file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def parse_args(argv, description: str, default_output: str, lengths: list[int], repeats: int | None,
               quick_lengths: list[int], quick_repeats: int | None):
    """--quick / --lengths / --repeats / --output. Returns (lengths, repeats, output path or None,
    quick): --quick picks the tiny sizes and writes no file unless --output is given. repeats None:
    a benchmark that times nothing (no --repeats flag)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--lengths", type=int, nargs="+", default=lengths)
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--output", help=f"results JSON (default {default_output}; none with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        return quick_lengths, quick_repeats, args.output, True
    return args.lengths, getattr(args, "repeats", None), args.output or default_output, False


def make_inputs(t: int, batch: int, heads: int, dk: int, dv: int, seed: int = 0):
    """Realistic inputs as float32 NumPy arrays: unit keys, g <= 0, beta in (0, 1)."""
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(batch, t, heads, dk))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    arrays = dict(
        q=rng.normal(size=(batch, t, heads, dk)),
        k=k,
        v=rng.normal(size=(batch, t, heads, dv)),
        g=-np.logaddexp(0.0, rng.normal(-2.0, 1.0, size=(batch, t, heads))),
        beta=1.0 / (1.0 + np.exp(-rng.normal(size=(batch, t, heads)))),
        cotangent=rng.normal(size=(batch, t, heads, dv)),
    )
    return {name: x.astype(np.float32) for name, x in arrays.items()}


def variant(preset, seq_len: int, **model_changes):
    """A RunConfig preset with seq_len tokens per row and these ModelConfig fields changed."""
    model = dataclasses.replace(preset.model, **model_changes)
    return dataclasses.replace(preset, model=model, data=dataclasses.replace(preset.data, seq_len=seq_len))


def synthetic_rows(micro_batches: int, batch: int, t: int, vocab: int, seed: int = 0):
    """Training rows of random tokens, one document per row: (rows, segment_ids) [A, B, T + 1]
    int32, the segment ids all 1."""
    rows = np.random.default_rng(seed).integers(0, vocab, size=(micro_batches, batch, t + 1), dtype=np.int32)
    return jnp.asarray(rows), jnp.ones_like(rows)


def median_times(runners: dict, repeats: int) -> dict:
    """Warm each runner once, then time them interleaved; median seconds per runner.

    A runner that refuses to run (e.g. fla's Triton backward on some Triton/GPU pairs) is dropped."""
    for name, run in list(runners.items()):
        try:
            run()
        except RuntimeError as refusal:
            print(f"{name} skipped: {str(refusal).splitlines()[0]}")
            del runners[name]
    samples = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def memory_need(compiled: jax.stages.Compiled) -> dict[str, int]:
    """XLA's buffer assignment of a compiled program, in bytes: argument, output, temp, alias
    (outputs living in donated arguments) and peak = argument + output + temp - alias. On a CPU,
    buffers that YNNPACK allocates inside a fused dot are not counted (see `count_every_buffer`)."""
    stats = compiled.memory_analysis()
    need = {
        "argument": stats.argument_size_in_bytes,
        "output": stats.output_size_in_bytes,
        "temp": stats.temp_size_in_bytes,
        "alias": stats.alias_size_in_bytes,
    }
    return need | {"peak": need["argument"] + need["output"] + need["temp"] - need["alias"]}


def count_every_buffer() -> dict:
    """Compiler options under which `memory_need` counts every buffer: on a CPU, no YNNPACK fusions
    (XLA leaves their intermediates to YNNPACK at run time: ham_layer's attention fwd+bwd at
    T = 4096 counts 784 MiB of temp with them, 1040 MiB without); none elsewhere."""
    return {"xla_cpu_experimental_ynn_fusion_type": ""} if jax.default_backend() == "cpu" else {}


def memory_budget() -> int:
    """Half the memory of the device: the accelerator's (its memory_stats bytes_limit) or, on a CPU,
    the machine's physical memory. Programs that need more are skipped, not run into the OOM killer;
    the other half is the margin for what `memory_need` does not see."""
    stats = jax.devices()[0].memory_stats() or {}
    total = stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // 2


def loglog_slope(lengths, values) -> float:
    """Least-squares slope of log(value) against log(T)."""
    return float(np.polyfit(np.log(lengths), np.log(values), 1)[0])


def save_results(benchmark: str, rows: list, repeats: int | None, output: str | None, **extra) -> dict:
    """The results record (with the device it ran on), written as JSON to `output` unless None."""
    result = {
        "benchmark": benchmark,
        "device": f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores)",
        "jax": jax.__version__,
        "repeats": repeats,
        "rows": rows,
        **extra,
    }
    if output:
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
        with open(output, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {output}")
    return result
