"""What the experiment scripts share: their common flags, the choice of contenders, the mean of
held-out recall evaluations, and the results record (its environment fields, the JSON file and the
plot beside it). The scripts import it as a sibling module (`python experiments/<name>.py` puts this
folder on sys.path)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable

import jax
import numpy as np

KV_FRACTION_DEFINITION = (
    "mean over layers of the fraction of a row's tokens held in the layer's KV cache after the row: "
    "attention 1, sliding window min(window, T) / T, GDN 0, HAM measured admitted / tokens"
)


def experiment_parser(doc: str, default_output: str) -> argparse.ArgumentParser:
    """The flags every experiment takes: --quick, --output, --models (each script adds its own)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a few steps, for the tests")
    parser.add_argument("--output", default=default_output, help="results JSON; the plot goes next to it as .png")
    parser.add_argument("--models", nargs="+", help="run only these contenders (names as in the results)")
    return parser


def select(contenders: list[dict], names: list[str] | None) -> list[dict]:
    """The contenders named (all when names is None); SystemExit listing them when none matches."""
    chosen = [c for c in contenders if not names or c["name"] in names]
    if not chosen:
        raise SystemExit(f"--models matches none of {[c['name'] for c in contenders]}")
    return chosen


def mean_recall(results) -> dict:
    """Equal held-out batches' RecallEvaluations -> mean accuracy, loss and HAM KV fraction per layer."""
    return dict(
        accuracy=float(np.mean([r.accuracy for r in results])),  # equal batches: equal scored targets
        loss=float(np.mean([r.loss for r in results])),
        ham_kv_fraction=np.mean([r.kv_fraction for r in results], axis=0).tolist(),
    )


def environment(start: float) -> dict:
    """The record's last fields: seconds since `start` (time.perf_counter), platform, device, JAX version."""
    return dict(seconds=time.perf_counter() - start, platform=platform.platform(), device=str(jax.devices()[0]),
                jax_version=jax.__version__)


def save(result: dict, output: str, plot: Callable[[str], None]) -> None:
    """Write the record as JSON to `output` (making its folder) and plot(path) next to it as .png."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=1)
    plot(os.path.splitext(output)[0] + ".png")
