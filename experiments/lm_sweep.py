"""Byte-level language models on the default corpus with one token budget: validation bits per byte,
overall and on the recall hits, against KV fraction, HAM across KV targets against a Transformer,
GDN and hybrids of equal size.

    python experiments/lm_sweep.py                  # FULL, T = 128 (27 min on 2 shared cores, before the recall split)
    python experiments/lm_sweep.py --setting long   # LONG, T = 1024, 2 seeds (63 min on 2 quiet cores)
    python experiments/lm_sweep.py --quick          # QUICK, 1.5 min (2 compiled models, 2 seeds), for the tests

Contenders, all 4 layers of the same width (d_model, heads, key and value dims), SwiGLU MLPs:
all-HAM ("ham") at the setting's KV targets, Transformer ("attention"), GDN ("gdn"), GDN with every
4th layer attention ("gdn,gdn,gdn,attention") and GDN interleaved with sliding-window attention
("gdn,swa"). Each contender is trained once per seed of the setting (--seeds overrides them), each
time one `hamjax.train.train` run (the CLI's loop: AdamW with warmup and cosine decay, the threshold
controller after every step) in its own folder <run_dir>/<contender>-seed<seed>; the bits per byte
and HAM KV fractions are those of the run's final evaluation on the whole validation split. The
table and the plot give per contender the mean over its seeds and their spread, max - min (the
plot's grey bars span min to max); the JSON has every run's record.

Equal tokens: every run has the same data (the KJV corpus, bytes, seq_len), steps and batch, and
the data order is a pure function of (seed, step), so at each seed every contender is trained on
the same rows in the same order. The seed also sets the parameter initialisation.

Equal parameters: the Transformer's parameter count is the reference. A model more than
PARAM_TOLERANCE (5%) away from it gets the MLP hidden width (a multiple of 8) that brings its count
closest to the reference; every layer's mixer keeps the common width. A GDN or HAM mixer has a
third more weights than an attention mixer (the output gate, beta and the decay), so in FULL and
LONG (T, the window and HAM's capacity hold no parameters) all-HAM and GDN (+9.0%) and GDN +
attention (+6.7%) get MLP hidden 168 instead of 192 (then 232,288, 232,144 and 226,988 parameters
against the Transformer's 229,952), and GDN + SWA (+4.5%, 240,264) keeps 192. The JSON records each
model's count and MLP width.

The KV fraction of a model (the x axis) is the mean over its layers of the fraction of a row's
tokens held in the layer's KV cache after the row has been read (ModelConfig.kv_fractions): 1 for
full attention, min(window, T) / T for sliding-window attention, 0 for GDN, and for HAM the measured
admitted / tokens over the validation split (the controller drives it toward the target during
training; the measured value is what is reported).

Recall hits: after training, `hamjax.train.evaluate_checkpoint` evaluates the final checkpoint
again with recall_ngram n = RECALL_NGRAM (6), splitting the validation targets into recall hits
(`hamjax.data.recall_hits`: the n bytes before the target, all of its document, occurred earlier in
the same document and row, so a model that remembers the row can look up what followed them;
Zoology's analysis) and the rest, with bits per byte over each (hit_bpb, other_bpb). Its overall
bits per byte must be the run's own final ones (within BPB_TOLERANCE), else the script stops. Why
6: the share of hits among the scored validation targets of the default corpus (bytes, 2% of the
chapters held out), measured with recall_hits on the rows of `hamjax.train.loop.load_corpus` (the
corpus `train` prepares) for the run's config at each T:

    n               4      6      8      12     16
    T = 1024      35.8%  20.2%  12.3%   6.4%   4.3%
    T = 128       11.1%   4.6%   2.2%   0.7%   0.3%

A KJV word is 4.3 letters on average (the same rows, split at whitespace), so 6 bytes are about a
word with the spaces around it: a repeat of them is a repeated word in context, not a common
letter pattern, as many at 4 bytes are (" the", "and "), which a model predicts without looking back. At T
= 1024, n = 6 makes hits a clear minority that is not rare (20%, 18.8k of 93k targets); no n gives
T = 128 both (its only share above 10% is n = 4's), so FULL keeps the same n and its hits are rare
(4.6%, 4.3k targets): the same definition of a hit in every setting.

Setting FULL, chosen for the compute budget (the whole default run in about 20 minutes on this
project's 2 CPU cores when nothing else runs):
- Width: d_model 64, 2 heads of key and value dim 32 (the `small` preset at half its width), 4
  layers; T = 128 bytes per row (half the preset's); HAM with the surprise router, capacity T (room
  for every token, so the controller alone sets the fraction), the default (compacted) routed attention, tau_lr
  0.1 and no freeze; GDN chunk 64; KV targets 0.05, 0.1, 0.25, 0.5 and 1; seed 0.
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
  (experiments/results/lm_sweep_cpu.json was written before the seeds and the recall split: its
  records have neither, and its run folders were named without the seed.)

Setting LONG, issue 22's item 4 (language modelling at a length where recall matters): FULL's width,
learning rate, warmup and validation split with
- T = 1024 bytes and a window of T / 2 = 512 (GDN + SWA again at 0.25, with GDN + attention and
  HAM 0.25); HAM capacity T;
- KV targets 0.05, 0.1, 0.25 and 0.5 (1 is the Transformer's fraction);
- batch 8, 250 steps: 2.05M tokens a run, 4x FULL's 512k;
- seeds 0 and 1: 16 runs.
- Run time, measured: the 16 runs took 63 minutes on a quiet machine (nothing else running on its
  2 cores), 172 to 315 s a run with its evaluations: about 3 minutes the Transformer's and the GDN
  models', 4.2 to 5.3 a HAM run's (the seconds are in the results file). Timing probes beforehand,
  under load (load average 4.5 to 5.6), had estimated about 3 hours. The run may span sessions:
  Ctrl-C (or the end of a session) stops it after a checkpoint, and the same command resumes from
  its run folders under runs/lm_sweep_long; the runs go seed by seed, so a stopped run already has
  whole comparisons at its first seeds.

A run folder that already holds a finished run is not retrained: `train` resumes it at its last
step and evaluates it again (its seconds are then only the evaluation's). A run folder holding
another config is refused; pass another --run_dir. Ctrl-C stops the current run after a checkpoint,
and running the same command again resumes it.
"""

from __future__ import annotations

import argparse
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
from hamjax.train import RunConfig, RunSummary, evaluate_checkpoint, preset, train
from hamjax.train.plot import plot_against_kv_fraction
from hamjax.train.run_folder import read_metrics

from experiment_common import KV_FRACTION_DEFINITION, environment, experiment_parser, save, select

HAM_TARGETS = (0.05, 0.1, 0.25, 0.5, 1.0)
RECALL_NGRAM = 6  # a target is a recall hit when the 6 bytes before it occurred earlier in its document and row
PARAM_TOLERANCE = 0.05  # relative to the Transformer's parameter count
BPB_TOLERANCE = 1e-6  # relative: the recall evaluation's overall bpb against the run's own final one
SPREAD = "mean over the seeds, spread max - min"
SPREAD_METRICS = ("kv_fraction", "validation_bpb", "hit_bpb", "other_bpb")  # per contender
BASELINES = {"Transformer": "attention", "GDN": "gdn", "GDN + attention": "gdn,gdn,gdn,attention",
             "GDN + SWA": "gdn,swa"}


@dataclasses.dataclass(frozen=True)
class Setting:
    """Everything a run of the experiment depends on besides the contender's mixer pattern, KV target
    and seed; `seeds` are the seeds every contender is trained with (one run each)."""

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
    seeds: tuple[int, ...] = (0,)
    recall_ngram: int = RECALL_NGRAM


FULL = Setting(
    d_model=64, n_layers=4, heads=2, head_dim=32, seq_len=128, window=64, chunk_size=64, batch_size=16, steps=250,
    warmup_steps=25, learning_rate=3e-3, validation_fraction=0.02,
)
# Issue 22, item 4: FULL's width and learning rate at T = 1024 with 4x its tokens, over 2 seeds.
LONG = dataclasses.replace(
    FULL, seq_len=1024, window=512, batch_size=8, steps=250, ham_targets=(0.05, 0.1, 0.25, 0.5), seeds=(0, 1),
)
# The `tiny` preset's shape (2 layers), a Transformer and one HAM (its MLP narrowed to match the
# parameters), a few steps, 2 seeds and a small held-out share (the final evaluation reads the
# whole split): the compilations take most of the time, and the second seed reuses them.
QUICK = Setting(
    d_model=32, n_layers=2, heads=2, head_dim=16, seq_len=64, window=32, chunk_size=16, batch_size=4, steps=3,
    warmup_steps=1, learning_rate=3e-3, validation_fraction=0.002, ham_targets=(0.25,), baselines=("Transformer",),
    seeds=(0, 1),
)
SETTINGS = {"full": FULL, "long": LONG}  # --setting
DEFAULT_OUTPUTS = {"full": "experiments/results/lm_sweep_cpu.json",
                   "long": "experiments/results/lm_sweep_long_cpu.json"}
RUN_ROOTS = {"full": "runs/lm_sweep", "long": "runs/lm_sweep_long", "quick": "runs/lm_sweep_quick"}


def contenders(setting: Setting) -> list[dict]:
    """The contenders: name, slug (run folders), mixer pattern, HAM kv_target (None: not a HAM model)."""
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


def run_folder(run_root: str, spec: dict, seed: int) -> str:
    """The run folder of one contender and seed."""
    return os.path.join(run_root, f"{spec['slug']}-seed{seed}")


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


def run_contender(spec: dict, config: RunConfig, reference: int, recall_ngram: int) -> dict:
    """Train one contender with one seed and read its record off the RunSummary, the run folder and
    a recall evaluation of its final checkpoint."""
    summary = train(config, progress=True)
    if summary.status != "finished":
        raise SystemExit(f"{spec['name']} interrupted at step {summary.step}: run the same command again to resume")
    v, tc, model = summary.validation, config.train, config.model
    layers = model.kv_fractions(config.data.seq_len, v.kv_fraction)
    train_records = [r for r in read_metrics(pathlib.Path(config.run_dir) / "metrics.jsonl") if r["kind"] == "train"]
    parameters = parameter_count(model)
    split = recall_split(config.run_dir, summary, recall_ngram)
    return dict(
        name=spec["name"], pattern=spec["pattern"], kv_target=spec["kv_target"], seed=tc.seed, run_dir=config.run_dir,
        parameters=parameters, parameters_vs_transformer=parameters / reference - 1.0, mlp_hidden=model.mlp_width,
        mlp_matched=model.mlp_hidden is not None, steps=summary.step,
        tokens=summary.step * tc.batch_size * tc.grad_accum * config.data.seq_len,
        validation_bpb=v.bpb, validation_loss=v.loss, validation_tokens=v.tokens, kv_fraction=float(np.mean(layers)),
        kv_fraction_per_layer=layers, ham_kv_fraction=v.kv_fraction, tau=train_records[-1]["tau"],
        tokens_per_s=summary.tokens_per_s, seconds=summary.seconds, **split,
    )


def recall_split(run_dir: str, summary: RunSummary, n: int) -> dict:
    """The final checkpoint's validation bits per byte over the recall hits (preceding n-gram seen
    earlier in the row) and over the other targets, with their counts. RuntimeError when that
    evaluation's overall bpb or tokens are not the run's own final ones (another checkpoint or split)."""
    step, evaluation = evaluate_checkpoint(run_dir, recall_ngram=n)
    v = summary.validation
    if step != summary.step or evaluation.tokens != v.tokens or abs(evaluation.bpb / v.bpb - 1) > BPB_TOLERANCE:
        raise RuntimeError(
            f"{run_dir}: the recall evaluation (step {step}, {evaluation.tokens} tokens, {evaluation.bpb!r} bpb) "
            f"is not the run's final one (step {summary.step}, {v.tokens} tokens, {v.bpb!r} bpb)"
        )
    return dict(recall_evaluation_bpb=evaluation.bpb, hit_bpb=evaluation.hit_bpb, hit_tokens=evaluation.hit_tokens,
                other_bpb=evaluation.other_bpb, other_tokens=evaluation.other_tokens)


def spread(values: list[float]) -> dict:
    """Values over seeds -> their mean, min and max."""
    return dict(mean=float(np.mean(values)), min=float(np.min(values)), max=float(np.max(values)))


def per_contender(records: list[dict]) -> list[dict]:
    """Records (one per contender and seed) -> one per contender, in the records' order: name,
    pattern, kv_target, parameters, seeds, seconds (summed over the seeds) and spread() of each of
    SPREAD_METRICS over the seeds."""
    names = list(dict.fromkeys(r["name"] for r in records))
    rows = []
    for name in names:
        runs = [r for r in records if r["name"] == name]
        first = runs[0]
        rows.append(dict(
            name=name, pattern=first["pattern"], kv_target=first["kv_target"], parameters=first["parameters"],
            seeds=[r["seed"] for r in runs], seconds=sum(r["seconds"] for r in runs),
            **{metric: spread([r[metric] for r in runs]) for metric in SPREAD_METRICS},
        ))
    return rows


def plot(records: list[dict], path: str) -> None:
    """Validation bits per byte overall and over the recall hits against KV fraction, means over the
    seeds with grey min-max bars: HAM a line over its targets, the baselines labelled points."""
    rows = per_contender(records)
    fig = Figure(figsize=(12, 4.6))
    for ax, metric, label in zip(fig.subplots(1, 2), ("validation_bpb", "hit_bpb"),
                                 ("validation bits per byte", "bits per byte on the recall hits")):
        plot_metric(ax, rows, metric)
        ax.set(ylabel=label, xlim=(-0.05, 1.2))
        ax.legend(fontsize=7)
    fig.suptitle("Byte-level LM, equal parameters and tokens (mean over seeds, bars: min to max)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_metric(ax, rows: list[dict], metric: str) -> None:
    """One panel: the per_contender rows' mean `metric` against their mean KV fraction, with error bars."""
    point = lambda row: (row["kv_fraction"]["mean"], row[metric]["mean"])
    plot_against_kv_fraction(
        ax, [(*point(row), row["kv_target"]) for row in rows if row["kv_target"] is not None],
        [(row["name"], *point(row)) for row in rows if row["kv_target"] is None],
    )
    values = [row[metric] for row in rows]
    ax.errorbar(
        [row["kv_fraction"]["mean"] for row in rows], [v["mean"] for v in values],
        yerr=[[v["mean"] - v["min"] for v in values], [v["max"] - v["mean"] for v in values]],
        fmt="none", ecolor="grey", capsize=3, zorder=1,
    )


def options(argv=None) -> tuple[argparse.Namespace, str, Setting, str, str]:
    """The command line -> (its arguments, the setting's name: "quick" with --quick, else --setting,
    the setting with --steps and --seeds applied, the results path, the root of the run folders).
    SystemExit when a seed repeats (its runs would share a folder)."""
    parser = experiment_parser(__doc__, None)
    parser.add_argument("--setting", choices=SETTINGS, default="full",
                        help="full: T = 128 (default); long: T = 1024, 4x the tokens, 2 seeds")
    parser.add_argument("--run_dir", help=f"root of the run folders (default {', '.join(RUN_ROOTS.values())})")
    parser.add_argument("--steps", type=int, help="training steps per run (default: the setting's)")
    parser.add_argument("--seeds", type=int, nargs="+", help="initialisation and data-order seeds, one run of "
                        "every contender each (default: the setting's)")
    args = parser.parse_args(argv)
    name = "quick" if args.quick else args.setting
    setting = QUICK if args.quick else SETTINGS[args.setting]
    if args.steps:
        setting = dataclasses.replace(setting, steps=args.steps, warmup_steps=min(setting.warmup_steps, args.steps))
    if args.seeds is not None:
        if len(set(args.seeds)) != len(args.seeds):
            raise SystemExit(f"--seeds repeats a seed: {args.seeds}")
        setting = dataclasses.replace(setting, seeds=tuple(args.seeds))
    return args, name, setting, args.output or DEFAULT_OUTPUTS[args.setting], args.run_dir or RUN_ROOTS[name]


def main(argv=None) -> dict:
    args, name, setting, output, run_root = options(argv)
    specs = select(contenders(setting), args.models)
    reference = parameter_count(model_config(setting, BASELINES["Transformer"], None))
    models = {spec["name"]: match_parameters(model_config(setting, spec["pattern"], spec["kv_target"]), reference)
              for spec in specs}
    start, records = time.perf_counter(), []
    # Seed by seed: a run stopped half-way has whole comparisons at the first seeds.
    with tqdm(total=len(specs) * len(setting.seeds), desc="LM sweep", unit="run", position=0) as bar:
        for seed in setting.seeds:
            for spec in specs:
                model = models[spec["name"]]
                config = run_config(setting, model, run_folder(run_root, spec, seed), seed)
                tqdm.write(f"{spec['name']}, seed {seed}: {parameter_count(model):,} parameters (Transformer "
                           f"{reference:,}), MLP hidden {model.mlp_width}{' (matched)' if model.mlp_hidden else ''}")
                records.append(run_contender(spec, config, reference, setting.recall_ngram))
                bar.set_postfix_str(f"{spec['name']}, seed {seed}: {records[-1]['validation_bpb']:.3f} bpb")
                bar.update()
    result = dict(
        experiment="lm_sweep", setting_name=name, quick=args.quick, setting=dataclasses.asdict(setting),
        transformer_parameters=reference, param_tolerance=PARAM_TOLERANCE,
        kv_fraction_definition=KV_FRACTION_DEFINITION, spread=SPREAD, records=records,
        contenders=per_contender(records), **environment(start),
    )
    save(result, output, lambda path: plot(records, path))
    print(summary(result))
    return result


def summary(result: dict) -> str:
    """The Markdown table of the contenders by mean KV fraction: means over the seeds of the bits per
    byte overall, on the recall hits and on the other targets, spreads (max - min over the seeds),
    the overall and hit means also relative to the Transformer's where it ran; seconds summed over
    the seeds."""
    rows = per_contender(result["records"])
    transformer = next((r for r in rows if r["name"] == "Transformer"), None)
    relative = lambda row, metric: (
        f"{row[metric]['mean'] / transformer[metric]['mean'] - 1:+.1%}" if transformer else "-"
    )
    lines = ["| model | pattern | parameters | seeds | KV fraction | validation bpb | spread | vs Transformer | "
             "hit bpb | hit spread | hit vs Transformer | other bpb | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kv_fraction"]["mean"], r["name"])):
        width = lambda metric: r[metric]["max"] - r[metric]["min"]
        lines.append(
            f"| {r['name']} | {r['pattern']} | {r['parameters']:,} | {len(r['seeds'])} | "
            f"{r['kv_fraction']['mean']:.3f} | {r['validation_bpb']['mean']:.3f} | {width('validation_bpb'):.3f} | "
            f"{relative(r, 'validation_bpb')} | {r['hit_bpb']['mean']:.3f} | {width('hit_bpb'):.3f} | "
            f"{relative(r, 'hit_bpb')} | {r['other_bpb']['mean']:.3f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
