"""What the benchmark scripts share: the command line, realistic inputs, interleaved timing, the
results file."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np


def parse_args(argv, description: str, default_output: str, lengths: list[int], repeats: int,
               quick_lengths: list[int], quick_repeats: int):
    """--quick / --lengths / --repeats / --output. Returns (lengths, repeats, output path or None,
    quick): --quick picks the tiny sizes and writes no file unless --output is given."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--lengths", type=int, nargs="+", default=lengths)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--output", help=f"results JSON (default {default_output}; none with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        return quick_lengths, quick_repeats, args.output, True
    return args.lengths, args.repeats, args.output or default_output, False


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


def save_results(benchmark: str, rows: list, repeats: int, output: str | None, **extra) -> dict:
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
