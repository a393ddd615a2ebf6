"""`hamjax bench`: the benchmarks run one after another, each result saved as JSON, and all of
them gathered into one results file and one Markdown report."""

from __future__ import annotations

import json
import pathlib
import time

from hamjax.bench import (
    decode, delta_rule, ham_layer, memory, packed_step, precision, profile, train_loop, train_step,
)

BENCHMARKS = {
    "delta_rule": delta_rule, "ham_layer": ham_layer, "train_step": train_step, "profile": profile, "memory": memory,
    "packed_step": packed_step, "precision": precision, "decode": decode, "train_loop": train_loop,
}


def run_suite(output_dir: str | pathlib.Path, *, quick: bool = False, only: list[str] | None = None) -> dict:
    """Run the benchmarks named in `only` (default: all, in BENCHMARKS order), --quick sizes when
    `quick`. Writes <name>.json per benchmark, suite.json (all of them) and suite.md (a summary
    table per benchmark) under output_dir. Returns the suite record."""
    names = list(BENCHMARKS) if not only else list(only)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark {unknown[0]!r}; choose from {list(BENCHMARKS)}")
    folder = pathlib.Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        argv = (["--quick"] if quick else []) + ["--output", str(folder / f"{name}.json")]
        results[name] = BENCHMARKS[name].main(argv) | {"wall_seconds": time.perf_counter() - start}
    suite = {"quick": quick, "results": results}
    (folder / "suite.json").write_text(json.dumps(suite, indent=2) + "\n")
    (folder / "suite.md").write_text(markdown_report(suite))
    print(f"wrote {folder / 'suite.json'} and {folder / 'suite.md'}")
    return suite


def markdown_report(suite: dict) -> str:
    """One section per benchmark: what it measured, on which device, and its summary table (the
    benchmark module's `summary`); the results JSON is the complete record."""
    lines = ["# hamjax bench" + (" (--quick)" if suite["quick"] else ""), ""]
    for name, result in suite["results"].items():
        timing = f"median of {result['repeats']} runs; " if result["repeats"] else ""
        lines += [
            f"## {name}",
            "",
            f"{result['benchmark']}. Device: {result['device']}; jax {result['jax']}; {timing}"
            f"{result['wall_seconds']:.0f} s in all; every number in {name}.json.",
            "",
            BENCHMARKS[name].summary(result),
            "",
        ]
    return "\n".join(lines)
