"""The run's picture: bits per byte (training and validation) and KV fraction per HAM layer over
the steps, from metrics.jsonl."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hamjax.train.run_folder import read_metrics  # noqa: E402


def plot_run(run_dir: str | pathlib.Path, kv_target: float | None = None) -> pathlib.Path:
    """Write run_dir/plot.png; returns its path."""
    run = pathlib.Path(run_dir)
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (ax_loss, ax_kv) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["bpb"] for r in train], lw=0.8, label="train")
    ax_loss.plot([r["step"] for r in evals], [r["bpb"] for r in evals], "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="bits per byte", title="loss")
    ax_loss.legend()
    layers = len(train[0]["kv_fraction"]) if train else 0
    for i in range(layers):
        ax_kv.plot([r["step"] for r in train], [r["kv_fraction"][i] for r in train], lw=0.8, label=f"HAM layer {i}")
    if kv_target is not None and layers:
        ax_kv.axhline(kv_target, color="k", ls="--", lw=0.8, label="target")
    ax_kv.set(xlabel="step", ylabel="admitted / tokens", title="KV fraction", ylim=(0, 1))
    if layers:
        ax_kv.legend()
    else:
        ax_kv.text(0.5, 0.5, "no HAM layers", ha="center", transform=ax_kv.transAxes)
    fig.tight_layout()
    path = run / "plot.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
