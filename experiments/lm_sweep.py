"""Byte-level language models on the default corpus with one token budget: validation bits per byte
against KV fraction, HAM across KV targets against a Transformer, GDN and hybrids of equal size.

    python experiments/lm_sweep.py            # the CPU run (27 minutes on 2 cores shared with another job)
    python experiments/lm_sweep.py --quick    # about a minute (2 compiled models), for the tests

Contenders, all 4 layers of the same width (d_model, heads, key and value dims), SwiGLU MLPs:
all-HAM ("ham") at the KV targets HAM_TARGETS, Transformer ("attention"), GDN ("gdn"), GDN with every
4th layer attention ("gdn,gdn,gdn,attention") and GDN interleaved with sliding-window attention
("gdn,swa"). Each is one `hamjax.train.train` run (the CLI's loop: AdamW with warmup and cosine
decay, the threshold controller after every step) in its own folder under --run_dir; the bits per
byte and HAM KV fractions are those of the run's final evaluation on the whole validation split.

Equal tokens: every run has the same data (the KJV corpus, bytes, seq_len), seed, steps and batch,
and the data order is a pure function of (seed, step), so every contender is trained on the same
rows in the same order. --seed also sets the parameter initialisation.

Equal parameters: the Transformer's parameter count is the reference. A model more than
PARAM_TOLERANCE (5%) away from it gets the MLP hidden width (a multiple of 8) that brings its count
closest to the reference; every layer's mixer keeps the common width. A GDN or HAM mixer has a
third more weights than an attention mixer (the output gate, beta and the decay), so in the
default setting all-HAM and GDN (+9.0%) and GDN + attention (+6.7%) get MLP hidden 168 instead of
192 (then 232,288, 232,144 and 226,988 parameters against the Transformer's 229,952), and GDN + SWA
(+4.5%, 240,264) keeps 192. The JSON records each model's count and MLP width.

The KV fraction of a model (the x axis) is the mean over its layers of the fraction of a row's
tokens held in the layer's KV cache after the row has been read (ModelConfig.kv_fractions): 1 for
full attention, min(window, T) / T for sliding-window attention, 0 for GDN, and for HAM the measured
admitted / tokens over the validation split (the controller drives it toward the target during
training; the measured value is what is reported).

Setting, chosen for the compute budget (the whole default run in about 20 minutes on this
project's 2 CPU cores when nothing else runs):
- Width: d_model 64, 2 heads of key and value dim 32 (the `small` preset at half its width), 4
  layers; T = 128 bytes per row (half the preset's); HAM with the surprise router, capacity T (room
  for every token, so the controller alone sets the fraction), the default (compacted) routed attention, tau_lr
  0.1 and no freeze; GDN chunk 64.
- A sliding window of T / 2: GDN + SWA then holds a quarter of the tokens, as GDN + attention and
  HAM at 0.25 do, so three contenders meet at the same KV fraction.
- Training: batch 16, 250 steps (512k tokens, 0.13 epochs of the training split), learning rate
  3e-3 (the `small` preset's), 25 warmup steps, cosine decay to 0.1 x; one evaluation, at the end,
  on the whole validation split (2% of the chapters, 93k bytes).
- Timing probes (training steps alone, with the machine shared: the `small` preset ran at 877
  tokens/s against the 2,570 of the README's quiet run, so 2.9x slower): a training step of this
  setting took 1.19 s (HAM), 0.62 s (GDN + attention) and 0.36 s (Transformer), and the first one
  (compilation) 41 s, 43 s and 12 s; the evaluation step compiled in 23 s for HAM (and again, 17 s,
  for the validation split's shorter last batch). Scaled to a quiet machine (steps / 2.9,
  compilations at their CPU time), a HAM run takes about 2.7 minutes, the Transformer's about one,
  the GDN models' about 1.8; under load like that of the probes the whole run takes about 45 minutes.

A run folder that already holds a finished run is not retrained: `train` resumes it at its last
step and evaluates it again (its seconds are then only the evaluation's). A run folder holding
another config is refused; pass another --run_dir. Ctrl-C stops the current run after a checkpoint,
and running the same command again resumes it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import time

import jax
import numpy as np
from flax import nnx
from matplotlib.figure import Figure
from tqdm import tqdm

from hamjax.nn import LanguageModel, ModelConfig
from hamjax.train import RunConfig, preset, train
from hamjax.train.plot import plot_against_kv_fraction
from hamjax.train.run_folder import read_metrics

from experiment_common import KV_FRACTION_DEFINITION, environment, experiment_parser, save, select

DEFAULT_OUTPUT = "experiments/results/lm_sweep_cpu.json"
HAM_TARGETS = (0.05, 0.1, 0.25, 0.5, 1.0)
PARAM_TOLERANCE = 0.05  # relative to the Transformer's parameter count
BASELINES = {"Transformer": "attention", "GDN": "gdn", "GDN + attention": "gdn,gdn,gdn,attention",
             "GDN + SWA": "gdn,swa"}


@dataclasses.dataclass(frozen=True)
class Setting:
    """Everything a run of the experiment depends on besides the contender's mixer pattern and KV target."""

    d_model: int
    n_layers: int
    heads: int
    head_dim: int  # key and value dim of every mixer's heads
    seq_len: int  # T
    window: int  # sliding-window attention
    chunk_size: int  # delta rule
    batch_size: int
    steps: int
    warmup_steps: int
    learning_rate: float
    validation_fraction: float  # share of the corpus's documents held out
    ham_targets: tuple[float, ...] = HAM_TARGETS
    baselines: tuple[str, ...] = tuple(BASELINES)


FULL = Setting(
    d_model=64, n_layers=4, heads=2, head_dim=32, seq_len=128, window=64, chunk_size=64, batch_size=16, steps=250,
    warmup_steps=25, learning_rate=3e-3, validation_fraction=0.02,
)
# The `tiny` preset's shape (2 layers), a Transformer and one HAM (its MLP narrowed to match the
# parameters), a few steps and a small held-out share (the final evaluation reads the whole split):
# the compilations take most of the time.
QUICK = Setting(
    d_model=32, n_layers=2, heads=2, head_dim=16, seq_len=64, window=32, chunk_size=16, batch_size=4, steps=3,
    warmup_steps=1, learning_rate=3e-3, validation_fraction=0.002, ham_targets=(0.25,), baselines=("Transformer",),
)


def contenders(setting: Setting) -> list[dict]:
    """The contenders: name, slug (run folder), mixer pattern, HAM kv_target (None: not a HAM model)."""
    baselines = [dict(name=name, pattern=BASELINES[name], kv_target=None) for name in setting.baselines]
    hams = [dict(name=f"HAM {f:g}", pattern="ham", kv_target=f) for f in setting.ham_targets]
    return [dict(spec, slug=spec["name"].lower().replace(" + ", "-").replace(" ", "-")) for spec in baselines + hams]


def model_config(setting: Setting, pattern: str, kv_target: float | None) -> ModelConfig:
    """The `small` preset's model resized to the setting, with HAM capacity T."""
    s = setting
    return dataclasses.replace(
        preset("small").model, d_model=s.d_model, n_layers=s.n_layers, pattern=pattern, heads=s.heads,
        key_dim=s.head_dim, value_dim=s.head_dim, window=s.window, capacity=s.seq_len, kv_target=kv_target,
        chunk_size=s.chunk_size,
    )


@functools.lru_cache
def parameter_count(config: ModelConfig) -> int:
    """The number of trained parameters (nnx.Param leaves; HAM thresholds are not among them)."""
    model = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def match_parameters(config: ModelConfig, reference: int, tolerance: float = PARAM_TOLERANCE) -> ModelConfig:
    """config itself when its parameter count is within tolerance x reference of `reference`, else
    config with the MLP hidden width (a multiple of 8) whose count comes closest to it."""
    count = parameter_count(config)
    if abs(count - reference) <= tolerance * reference:
        return config
    per_unit = parameter_count(dataclasses.replace(config, mlp_hidden=config.mlp_width + 1)) - count
    hidden = 8 * round((config.mlp_width - (count - reference) / per_unit) / 8)
    return dataclasses.replace(config, mlp_hidden=hidden)


def run_config(setting: Setting, model: ModelConfig, run_dir: str, seed: int) -> RunConfig:
    """The `small` preset's run with the setting's data and schedule: one evaluation (the whole
    validation split) and one checkpoint, both at the last step."""
    s, base = setting, preset("small")
    return RunConfig(
        model=model,
        data=dataclasses.replace(base.data, seq_len=s.seq_len, validation_fraction=s.validation_fraction),
        train=dataclasses.replace(
            base.train, steps=s.steps, batch_size=s.batch_size, learning_rate=s.learning_rate,
            warmup_steps=s.warmup_steps, seed=seed, eval_every=s.steps, eval_batches=0, save_every=s.steps,
            keep_checkpoints=1,
        ),
        run_dir=run_dir,
    )


def run_contender(spec: dict, config: RunConfig, reference: int) -> dict:
    """Train one contender and read its record off the RunSummary and the run folder."""
    summary = train(config, progress=True)
    if summary.status != "finished":
        raise SystemExit(f"{spec['name']} interrupted at step {summary.step}: run the same command again to resume")
    v, tc, model = summary.validation, config.train, config.model
    layers = model.kv_fractions(config.data.seq_len, v.kv_fraction)
    train_records = [r for r in read_metrics(pathlib.Path(config.run_dir) / "metrics.jsonl") if r["kind"] == "train"]
    parameters = parameter_count(model)
    return dict(
        name=spec["name"], pattern=spec["pattern"], kv_target=spec["kv_target"], run_dir=config.run_dir,
        parameters=parameters, parameters_vs_transformer=parameters / reference - 1.0, mlp_hidden=model.mlp_width,
        mlp_matched=model.mlp_hidden is not None, steps=summary.step,
        tokens=summary.step * tc.batch_size * tc.grad_accum * config.data.seq_len,
        validation_bpb=v.bpb, validation_loss=v.loss, validation_tokens=v.tokens, kv_fraction=float(np.mean(layers)),
        kv_fraction_per_layer=layers, ham_kv_fraction=v.kv_fraction, tau=train_records[-1]["tau"],
        tokens_per_s=summary.tokens_per_s, seconds=summary.seconds,
    )


def plot(records: list[dict], path: str) -> None:
    """Validation bits per byte against KV fraction: HAM a line over its targets, the baselines
    labelled points."""
    fig = Figure(figsize=(7, 4.6))
    ax = fig.subplots()
    plot_against_kv_fraction(
        ax, [(r["kv_fraction"], r["validation_bpb"], r["kv_target"]) for r in records if r["kv_target"] is not None],
        [(r["name"], r["kv_fraction"], r["validation_bpb"]) for r in records if r["kv_target"] is None],
    )
    ax.set(ylabel="validation bits per byte", title="Byte-level LM, equal parameters and tokens", xlim=(-0.05, 1.2))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__, DEFAULT_OUTPUT)
    parser.add_argument("--run_dir", help="root of the run folders (default runs/lm_sweep, runs/lm_sweep_quick)")
    parser.add_argument("--steps", type=int, help="training steps per run (default: the setting's)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed, shared by all")
    args = parser.parse_args(argv)
    setting = QUICK if args.quick else FULL
    if args.steps:
        setting = dataclasses.replace(setting, steps=args.steps, warmup_steps=min(setting.warmup_steps, args.steps))
    run_root = args.run_dir or ("runs/lm_sweep_quick" if args.quick else "runs/lm_sweep")
    specs = select(contenders(setting), args.models)
    reference = parameter_count(model_config(setting, BASELINES["Transformer"], None))
    start, records = time.perf_counter(), []
    with tqdm(total=len(specs), desc="LM sweep", unit="model", position=0) as bar:
        for spec in specs:
            model = match_parameters(model_config(setting, spec["pattern"], spec["kv_target"]), reference)
            config = run_config(setting, model, os.path.join(run_root, spec["slug"]), args.seed)
            tqdm.write(f"{spec['name']}: {parameter_count(model):,} parameters (Transformer {reference:,}), "
                       f"MLP hidden {model.mlp_width}{' (matched)' if model.mlp_hidden else ''}")
            records.append(run_contender(spec, config, reference))
            bar.set_postfix_str(f"{spec['name']}: {records[-1]['validation_bpb']:.3f} bpb")
            bar.update()
    result = dict(
        experiment="lm_sweep", quick=args.quick, setting=dataclasses.asdict(setting), seed=args.seed,
        transformer_parameters=reference, param_tolerance=PARAM_TOLERANCE,
        kv_fraction_definition=KV_FRACTION_DEFINITION, records=records, **environment(start),
    )
    save(result, args.output, lambda path: plot(records, path))
    print(summary(result))
    return result


def summary(result: dict) -> str:
    """The Markdown table of the contenders, by KV fraction; bits per byte also relative to the
    Transformer's where it ran."""
    transformer = next((r["validation_bpb"] for r in result["records"] if r["name"] == "Transformer"), None)
    lines = ["| model | pattern | parameters | KV fraction | validation bpb | vs Transformer | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(result["records"], key=lambda r: (r["kv_fraction"], r["name"])):
        relative = f"{r['validation_bpb'] / transformer - 1:+.1%}" if transformer else "-"
        lines.append(
            f"| {r['name']} | {r['pattern']} | {r['parameters']:,} | {r['kv_fraction']:.3f} | "
            f"{r['validation_bpb']:.3f} | {relative} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
