"""What the training loop costs beside its steps: metrics read back every step against every 10 steps
with the next batches built ahead.

    python experiments/bench_train_loop.py            # the tiny preset, 200 steps, 3 runs of each loop
    python experiments/bench_train_loop.py --quick    # 12 steps, 1 run of each

Two loops of `hamjax.train.train` over the same steps of the tiny preset (evaluation and checkpoint
only at the end):
- per_step: `--log_every 1 --prefetch 0`, the loop as it was before issue 21: each step's loss is
  read back to the host before the next batch is built;
- deferred: `--log_every 10 --prefetch 2`, the default: metrics are fetched every 10 steps and
  the next 2 batches are built in a background thread while the step runs.
Both train bit for bit alike (tests/test_train.py). Steps per second are the run summary's: the steps
after the first (which compiles), evaluations and saves left out. The runs alternate; the table
gives each loop's median and their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile

from hamjax.bench.common import save_results
from hamjax.train import PRESETS, train

DEFAULT_OUTPUT = "runs/bench/train_loop.json"
LOOPS = {"per_step": {"log_every": 1, "prefetch": 0}, "deferred": {"log_every": 10, "prefetch": 2}}


def loop_config(steps: int, run_dir: str, **bookkeeping):
    """The tiny preset for `steps` steps, evaluated and saved only at the end, on 2 chapters of
    validation text, with these TrainConfig fields."""
    tiny = PRESETS["tiny"]
    return dataclasses.replace(
        tiny,
        data=dataclasses.replace(tiny.data, validation_fraction=0.002),
        train=dataclasses.replace(tiny.train, steps=steps, eval_every=steps, save_every=steps, eval_batches=0,
                                  **bookkeeping),
        run_dir=run_dir,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12 steps, 1 run of each loop, for the tests")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", help=f"results JSON (default {DEFAULT_OUTPUT}; none with --quick)")
    args = parser.parse_args(argv)
    steps, repeats = (12, 1) if args.quick else (args.steps, args.repeats)
    output = args.output if args.quick else args.output or DEFAULT_OUTPUT
    samples = {name: [] for name in LOOPS}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(repeats):
            for name, bookkeeping in LOOPS.items():
                summary = train(loop_config(steps, f"{folder}/{name}{repeat}", **bookkeeping), progress=False)
                samples[name].append(summary.steps_per_s)
                print(f"{name:9s} run {repeat + 1}: {summary.steps_per_s:.1f} steps/s", flush=True)
    rows = [
        {"loop": name, **LOOPS[name], "steps_per_s": statistics.median(samples[name]), "samples": samples[name]}
        for name in LOOPS
    ]
    ratio = rows[1]["steps_per_s"] / rows[0]["steps_per_s"]
    print(f"deferred / per_step: {ratio:.2f}x steps/s")
    return save_results(
        f"the training loop of the tiny preset, {steps} steps: metrics fetched every step against every 10 "
        "steps with 2 batches prefetched", rows, repeats, output, steps=steps, deferred_over_per_step=ratio,
    )


def summary(result: dict) -> str:
    """Per loop: its settings, median steps per second and the ratio to the per-step loop."""
    lines = ["| loop | log_every | prefetch | steps / s | / per_step |", "|---|---|---|---|---|"]
    base = result["rows"][0]["steps_per_s"]
    for row in result["rows"]:
        lines.append(f"| {row['loop']} | {row['log_every']} | {row['prefetch']} | {row['steps_per_s']:.1f} | "
                     f"{row['steps_per_s'] / base:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
