"""Pictures: a run's bits per byte (training and validation) and KV fraction per HAM layer over
the steps, from metrics.jsonl; a quality metric against KV fraction for the experiments. Drawn on
matplotlib Figures, never through pyplot, so the caller's backend is left alone."""

from __future__ import annotations

import pathlib

from matplotlib.figure import Figure

from hamjax.train.run_folder import read_metrics


def plot_run(run_dir: str | pathlib.Path, kv_target: float | None = None) -> pathlib.Path:
    """Write run_dir/plot.png; returns its path."""
    run = pathlib.Path(run_dir)
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig = Figure(figsize=(11, 4))  # not pyplot: the caller's matplotlib backend stays as it is
    ax_loss, ax_kv = fig.subplots(1, 2)
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
    return path


BASELINE_STYLES = {"Transformer": ("s", "C0"), "Transformer + conv": ("P", "C9"), "GDN": ("o", "C1"),
                   "GDN + SWA": ("^", "C2"), "GDN + attention": ("D", "C4")}
NEAR = 0.03  # a baseline this close to a HAM point (KV fraction; share of the values' span) labels on the left


def plot_against_kv_fraction(ax, ham: list[tuple[float, float, float]], baselines: list[tuple[str, float, float]]) -> None:
    """Draw a quality metric against KV fraction on a matplotlib Axes: ham holds (kv_fraction, value,
    kv_target) per HAM model, joined into one line with each point labelled by its target; baselines
    (name, kv_fraction, value) are labelled markers (styles for the names in BASELINE_STYLES). So that
    labels of nearby points stay apart, HAM's alternate above and below the line, baselines at the
    same KV fraction stack theirs downwards in the order given, and a baseline whose point nearly
    covers a HAM point's (within NEAR of the KV fraction and of the values' span) has its label on
    the left of its marker, away from HAM's."""
    ham = sorted(ham)
    if ham:
        ax.plot([f for f, _, _ in ham], [v for _, v, _ in ham], "-o", color="C3", label="HAM")
        for i, (f, v, target) in enumerate(ham):
            ax.annotate(f"target {target:g}", (f, v), fontsize=7, textcoords="offset points",
                        xytext=(4, 5 if i % 2 == 0 else -10))
    values = [v for _, v, _ in ham] + [v for _, _, v in baselines]
    span = max(values) - min(values) if values else 0.0
    for i, (name, f, v) in enumerate(baselines):
        marker, color = BASELINE_STYLES.get(name, ("x", "k"))
        ax.plot(f, v, marker, color=color, label=name)
        stacked = sum(other_f == f for _, other_f, _ in baselines[:i])
        left = any(abs(f - ham_f) <= NEAR and abs(v - ham_v) <= NEAR * span for ham_f, ham_v, _ in ham)
        ax.annotate(name, (f, v), fontsize=7, textcoords="offset points", xytext=(-4 if left else 4, 4 - 9 * stacked),
                    ha="right" if left else "left")
    ax.set_xlabel("KV fraction (mean over layers of tokens held in a KV cache)")
