"""MQAR (multi-query associative recall, Zoology): accuracy against KV fraction of 2-layer models, 3 seeds.

    python experiments/mqar.py                  # every task: hours on 2 CPU cores
    python experiments/mqar.py --tasks 64:8     # one task (T:N)
    python experiments/mqar.py --quick          # about a minute, for the tests

Contenders, all 2 layers of the same width (d_model, heads, key and value dims), SwiGLU MLPs:
Transformer ("attention,attention"), GDN ("gdn,gdn"), GDN + sliding-window attention ("gdn,swa"),
GDN with one attention layer ("gdn,attention") and all-HAM ("ham,ham") at the KV targets
HAM_TARGETS. Each (model, task) is one hamjax.train.Sweep: its runs, one per (learning rate, seed),
train as one compiled program (the pure step vmapped over their stacked states) on the same batches;
the seeds differ in the parameter initialisation only. Per (model, task) the table reports the
learning rate with the best mean accuracy over the seeds, with the seeds' standard deviation and
range; the JSON keeps every run and its evaluations.

The KV fraction of a model (the x axis) is the mean over its layers of the fraction of a row's
tokens held in the layer's KV cache after the row has been read: 1 for full attention,
min(window, T) / T for sliding-window attention, 0 for GDN, and for HAM the measured admitted /
tokens of the held-out evaluation batch (the threshold controller has driven it toward the target
during training; the measured value is what is reported). The task needs 2N/T of the tokens (the
pairs) in a cache; the plot draws it as a dashed line.

Training: AdamW with warmup and cosine decay (hamjax.train.make_optimizer), batch
`mqar_batch(task, batch_size, seed=step)` per step, the mean cross-entropy over the scored (query)
positions (hamjax.train.recall_train_step's loss); evaluation on 256 held-out rows (seeds from
10**6 up, never used in training) every 250 steps; a sweep stops once every run is at
STOP_ACCURACY (0.99). The results file is written after every sweep, and running the same command
again trains only the sweeps it lacks (a file of another setting is refused).

Finding a setting where the Transformer solves the task (Zoology: attention solves MQAR at every
width), on this CPU, T = 64, N = 8, 2 layers of d_model 64:
- The previous setting, batch 16 for at most 1,500 steps (24k rows) at learning rates 3e-3 and
  1e-2: the Transformer stayed at chance (0.15 on N = 8, 0.10 on N = 16; one seed).
- Batch 64 (probes, one Sweep of a scratch script, warmup 100): at 3e-3 the Transformer went from
  0.15 at step 500 to 0.86 at 750 and 0.997 at 1,250; at 1e-3 from 0.30 at 1,000 to 0.995 at 1,500.
  Rows seen, not steps, were what batch 16 lacked. On N = 16 at 3e-3, 3 seeds: two were at 0.998 and
  0.999 by step 1,000, the third still at 0.19 at step 1,500 (when the jump comes varies by seed).
- So: batch 64, learning rate 3e-3 (the middle of Zoology's range), warmup 100, at most 1,500
  steps. The plain Transformer needs no convolution for N = 8. Zoology's stronger attention
  baselines put a short convolution before attention, and `ModelConfig(attention_conv=True)` gives
  hamjax's attention layers one (GDN and HAM always have theirs, width 4, on q, k, v): the
  contender "Transformer + conv". N = 16 needs it: in the run, the plain Transformer solved N = 16
  with 2 seeds of 3 (seed 1 at 0.18 after 1,500 steps, as in the probe), the Transformer + conv
  with 3 of 3 by step 250 (a scratch probe beforehand had shown the same).

Other choices, all for the compute budget:
- Tasks T = 64 with N = 8 and N = 16 pairs, and T = 128 with N = 16 (the issue asked for T = 256
  and 512; at T = 256 a step of this width costs 0.6 to 1.7 s here at batch 32). N = 16 at T = 64 is
  the densest MQAR row there is (T = 4N: the pairs fill half the row and a query fills every slot);
  T = 128 keeps the 16 pairs, more than GDN's state holds at N = 16, in a row where they take a
  quarter of the tokens, so that a KV fraction of 0.25 has room for all of them.
- Vocabulary 64 (keys from [1, 32), values from [32, 64)), not 8192: with 8192 tokens each key's
  embedding would be seen a few times in the whole run. Zoology's small examples use 256.
- Width: d_model 64 (Zoology's smallest), 2 heads of key and value dim 16 in every mixer, SwiGLU
  MLPs, RoPE in attention, a sliding window of 16 (a quarter of the row), GDN chunk 16, HAM with the
  surprise router, capacity T, tau_lr 0.1 and no freeze; weight decay 0.1, gradient clipping 1.0,
  cosine decay to 0.1 x (TrainConfig's defaults).
- Cost (probes of one Sweep step of 3 seeds at batch 64, T = 64): 0.26 s Transformer, 0.34 s
  GDN + SWA, 0.40 s GDN, 0.61 s HAM; a sweep that does not solve the task trains all 1,500 steps.

What the CPU run gave (experiments/results/mqar_cpu.json; the README has the tables and commands):
- T = 64, N = 8 (99 minutes): the Transformer, the Transformer + conv, GDN + attention and HAM at
  every target solved it with 3 seeds of 3 (HAM at KV fraction 0.10: 0.991 to 0.996); GDN and
  GDN + SWA with 2 of 3, both failing with seed 0 (0.21 and 0.83).
- T = 64, N = 16 (63 minutes): the Transformer 2 seeds of 3, the Transformer + conv and GDN +
  attention 3 of 3, HAM 0.5 2 of 3 (mean 0.991); GDN, GDN + SWA, HAM 0.1 and HAM 0.25 none (means
  0.50, 0.37, 0.79, 0.85). Seed 0 is the worst of each of those four; HAM's other seeds reach 0.97
  to 0.98 at targets 0.1 and 0.25 and stay there.
- T = 128, N = 16 (73 minutes; the Transformer + conv, GDN, HAM 0.1 and HAM 0.25 only): the
  Transformer + conv 3 of 3 by step 250, GDN none (0.07 to 0.46), HAM 0.25 1 of 3 (0.993, 0.966,
  and seed 0 at 0.40, still rising at step 1,500), HAM 0.1 none (0.986, 0.983, and seed 0 at 0.08).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from tqdm import tqdm

from hamjax.data import MQARConfig, mqar_batch
from hamjax.nn import LanguageModel, ModelConfig
from hamjax.train import Sweep, TrainConfig, preset, recall_evaluate
from hamjax.train.plot import plot_against_kv_fraction

from experiment_common import KV_FRACTION_DEFINITION, environment, experiment_parser, mean_recall, save, select

DEFAULT_OUTPUT = "experiments/results/mqar_cpu.json"
HAM_TARGETS = (0.1, 0.25, 0.5)
STOP_ACCURACY = 0.99
EVAL_SEED = 10**6  # held-out batches use seeds from here up; training uses seeds 0 .. steps - 1
# What a results file may hold more or less of than this run plans, and still lend it its sweeps.
SWEEP_PLAN = ("tasks", "ham_targets", "baselines")


@dataclasses.dataclass(frozen=True)
class Setting:
    """Everything a run of the experiment depends on besides the model."""

    tasks: tuple[tuple[int, int], ...]  # (seq_len T, num_pairs N)
    vocab_size: int
    d_model: int
    heads: int
    head_dim: int  # key and value dim of every mixer's heads
    window: int  # sliding-window attention
    chunk_size: int  # delta rule
    batch_size: int
    steps: int  # the most a sweep trains
    warmup_steps: int
    learning_rates: tuple[float, ...]
    seeds: tuple[int, ...]  # parameter initialisations; every run of a sweep sees the same batches
    eval_every: int
    eval_batches: int
    eval_batch_size: int
    ham_targets: tuple[float, ...] = HAM_TARGETS
    baselines: tuple[str, ...] = ("Transformer", "Transformer + conv", "GDN", "GDN + SWA", "GDN + attention")


FULL = Setting(
    tasks=((64, 8), (64, 16), (128, 16)), vocab_size=64, d_model=64, heads=2, head_dim=16, window=16, chunk_size=16,
    batch_size=64, steps=1500, warmup_steps=100, learning_rates=(3e-3,), seeds=(0, 1, 2), eval_every=250,
    eval_batches=1, eval_batch_size=256,
)
# Two models (a Transformer and one HAM), two seeds and one tiny shape for both tasks: the
# compilations, not the steps, take the time of a run this small.
QUICK = Setting(
    tasks=((16, 2), (16, 4)), vocab_size=32, d_model=16, heads=1, head_dim=8, window=4, chunk_size=16,
    batch_size=4, steps=4, warmup_steps=1, learning_rates=(1e-2,), seeds=(0, 1), eval_every=2, eval_batches=1,
    eval_batch_size=4, ham_targets=(0.25,), baselines=("Transformer",),
)
BASELINES = {"Transformer": "attention,attention", "Transformer + conv": "attention,attention", "GDN": "gdn,gdn",
             "GDN + SWA": "gdn,swa", "GDN + attention": "gdn,attention"}
CONV_BASELINES = ("Transformer + conv",)  # their attention layers have ModelConfig(attention_conv=True)


def models(setting: Setting) -> list[dict]:
    """The contenders: name, mixer pattern, HAM kv_target (None: not a HAM model), attention_conv."""
    return [dict(name=name, pattern=BASELINES[name], kv_target=None, attention_conv=name in CONV_BASELINES)
            for name in setting.baselines] + [
        dict(name=f"HAM {f:g}", pattern="ham,ham", kv_target=f, attention_conv=False) for f in setting.ham_targets
    ]


def model_config(setting: Setting, pattern: str, kv_target: float | None, seq_len: int,
                 attention_conv: bool = False) -> ModelConfig:
    """The `tiny` preset's model resized: the setting's width and vocabulary, HAM capacity T (room
    for every token, so the controller alone sets the fraction), attention_conv as given."""
    s = setting
    return dataclasses.replace(
        preset("tiny").model, vocab_size=s.vocab_size, d_model=s.d_model, n_layers=2, pattern=pattern,
        heads=s.heads, key_dim=s.head_dim, value_dim=s.head_dim, window=s.window, capacity=seq_len,
        kv_target=kv_target if kv_target is not None else 0.25, chunk_size=s.chunk_size,
        attention_conv=attention_conv,
    )


def train_config(setting: Setting, learning_rate: float, seed: int) -> TrainConfig:
    return TrainConfig(
        steps=setting.steps, batch_size=setting.batch_size, learning_rate=learning_rate,
        warmup_steps=setting.warmup_steps, seed=seed,
    )


def evaluate(model: LanguageModel, task: MQARConfig, setting: Setting) -> dict:
    """Accuracy, mean loss and HAM KV fraction per layer over the held-out batches."""
    return mean_recall([
        recall_evaluate(model, *mqar_batch(task, setting.eval_batch_size, EVAL_SEED + i))
        for i in range(setting.eval_batches)
    ])


def train_sweep(spec: dict, task: MQARConfig, setting: Setting, bar) -> list[dict]:
    """Every (learning rate, seed) of one model on one task, trained as one hamjax.train.Sweep on the
    batches mqar_batch(task, batch_size, seed=step), evaluated every eval_every steps and at the
    end; the sweep stops early once every run has reached STOP_ACCURACY. One record per run."""
    grid = [(lr, seed) for lr in setting.learning_rates for seed in setting.seeds]
    config = model_config(setting, spec["pattern"], spec["kv_target"], task.seq_len, spec["attention_conv"])
    sweep = Sweep(config, [train_config(setting, lr, seed) for lr, seed in grid])
    histories = [[] for _ in grid]
    start, step = time.perf_counter(), 0
    while step < setting.steps and not all(h and h[-1]["accuracy"] >= STOP_ACCURACY for h in histories):
        step += 1
        inputs, targets = mqar_batch(task, setting.batch_size, seed=step - 1)
        metrics = sweep.recall_step(jnp.asarray(inputs), jnp.asarray(targets))
        if step % setting.eval_every == 0 or step == setting.steps:
            losses = np.asarray(metrics.loss)
            for k, history in enumerate(histories):
                history.append(dict(step=step, train_loss=float(losses[k]), **evaluate(sweep.run(k)[0], task, setting)))
            accuracies = " ".join(f"{h[-1]['accuracy']:.2f}" for h in histories)
            bar.set_postfix_str(f"{spec['name']} T={task.seq_len} N={task.num_pairs} step {step} acc {accuracies}")
    seconds = time.perf_counter() - start
    bar.update()
    return [
        record(spec, task, config, lr, seed, history, np.asarray(sweep.run(k)[0].taus()).tolist(), seconds)
        for k, ((lr, seed), history) in enumerate(zip(grid, histories))
    ]


def record(spec, task, config, learning_rate, seed, history, tau, sweep_seconds) -> dict:
    """One run's results: its last evaluation, the first step it reached STOP_ACCURACY (None:
    never) and every evaluation."""
    last = history[-1]
    layers = config.kv_fractions(task.seq_len, last["ham_kv_fraction"])
    solved_at = next((h["step"] for h in history if h["accuracy"] >= STOP_ACCURACY), None)
    return dict(
        model=spec["name"], pattern=spec["pattern"], kv_target=spec["kv_target"], attention_conv=spec["attention_conv"],
        task=dict(seq_len=task.seq_len, num_pairs=task.num_pairs, vocab_size=task.vocab_size),
        learning_rate=learning_rate, seed=seed, steps=last["step"], solved_at=solved_at,
        accuracy=last["accuracy"], eval_loss=last["loss"], kv_fraction=float(np.mean(layers)),
        kv_fraction_per_layer=layers, ham_kv_fraction=last["ham_kv_fraction"], tau=tau,
        sweep_seconds=sweep_seconds, history=history,
    )


def task_key(run: dict) -> tuple[int, int]:
    return run["task"]["seq_len"], run["task"]["num_pairs"]


def best_runs(runs: list[dict]) -> list[dict]:
    """Per (model, task): the seeds' mean, spread (standard deviation, min, max) and solved count at
    the learning rate with the best mean accuracy (ties: the lower mean held-out loss)."""
    groups = {}
    for run in runs:
        groups.setdefault((run["model"], task_key(run), run["learning_rate"]), []).append(run)
    best = {}
    for (model, task, lr), group in groups.items():
        accuracy = [r["accuracy"] for r in group]
        entry = dict(
            model=model, kv_target=group[0]["kv_target"], task=group[0]["task"], learning_rate=lr,
            seeds=[r["seed"] for r in group], accuracy=float(np.mean(accuracy)), accuracy_std=float(np.std(accuracy)),
            accuracy_min=min(accuracy), accuracy_max=max(accuracy),
            solved=sum(a >= STOP_ACCURACY for a in accuracy),
            eval_loss=float(np.mean([r["eval_loss"] for r in group])),
            kv_fraction=float(np.mean([r["kv_fraction"] for r in group])),
            kv_fraction_std=float(np.std([r["kv_fraction"] for r in group])),
            steps=max(r["steps"] for r in group), sweep_seconds=group[0]["sweep_seconds"],
        )
        key = (model, task)
        if key not in best or (entry["accuracy"], -entry["eval_loss"]) > (best[key]["accuracy"], -best[key]["eval_loss"]):
            best[key] = entry
    return list(best.values())


def plot(best: list[dict], path: str) -> None:
    """One panel per task: mean accuracy against KV fraction, the seeds' standard deviation as error
    bars; HAM a line over its targets, the baselines labelled points; the pairs' share of the tokens
    (2N/T, the fraction the task needs in a cache) a vertical line."""
    tasks = sorted({task_key(r) for r in best})
    fig = Figure(figsize=(6.5 * len(tasks), 4.4))
    axes = fig.subplots(1, len(tasks), squeeze=False)
    for ax, (t, n) in zip(axes[0], tasks):
        rows = [r for r in best if task_key(r) == (t, n)]
        plot_against_kv_fraction(
            ax, [(r["kv_fraction"], r["accuracy"], r["kv_target"]) for r in rows if r["kv_target"] is not None],
            [(r["model"], r["kv_fraction"], r["accuracy"]) for r in rows if r["kv_target"] is None],
        )
        ax.errorbar([r["kv_fraction"] for r in rows], [r["accuracy"] for r in rows],
                    xerr=[r["kv_fraction_std"] for r in rows], yerr=[r["accuracy_std"] for r in rows],
                    fmt="none", ecolor="grey", elinewidth=0.8, capsize=3)
        ax.axvline(2 * n / t, color="C7", lw=0.8, ls="--", label=f"pairs' share 2N/T = {2 * n / t:g}")
        ax.axhline(STOP_ACCURACY, color="grey", lw=0.6, ls=":")
        seeds = len(rows[0]["seeds"])
        ax.set(ylabel=f"accuracy (mean of {seeds} seeds, best LR)",
               title=f"MQAR T={t}, N={n} pairs", xlim=(-0.05, 1.25), ylim=(-0.02, 1.02))
        ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_task(text: str) -> tuple[int, int]:
    """"T:N" -> (T, N)."""
    try:
        seq_len, num_pairs = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a task is T:N (sequence length, pairs), got {text!r}") from None
    return seq_len, num_pairs


def finished_sweeps(path: str, setting: Setting) -> list[dict]:
    """The runs in the results file at `path` ([] when there is none), so that the experiment goes
    on where it stopped: a sweep whose (model, task) they hold is not trained again. SystemExit when
    the file's setting differs from `setting` in more than the tasks and models (SWEEP_PLAN)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        record = json.load(f)
    comparable = lambda values: {k: v for k, v in values.items() if k not in SWEEP_PLAN}  # noqa: E731
    theirs, ours = comparable(record["setting"]), comparable(json.loads(json.dumps(dataclasses.asdict(setting))))
    if theirs != ours:
        changed = ", ".join(f"{k}: {theirs.get(k)} -> {v}" for k, v in ours.items() if theirs.get(k) != v)
        raise SystemExit(f"{path} holds runs of another setting ({changed}): pass another --output, or delete "
                         "the file to start over")
    return record["runs"]


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__, DEFAULT_OUTPUT)
    parser.add_argument("--tasks", type=parse_task, nargs="+", help="T:N pairs (default: the setting's)")
    parser.add_argument("--steps", type=int, help="the most training steps per sweep (default: the setting's)")
    parser.add_argument("--learning_rates", type=float, nargs="+", help="the learning-rate grid")
    parser.add_argument("--seeds", type=int, nargs="+", help="parameter initialisation seeds")
    args = parser.parse_args(argv)
    setting = QUICK if args.quick else FULL
    overrides = dict(tasks=args.tasks, steps=args.steps, learning_rates=args.learning_rates, seeds=args.seeds)
    setting = dataclasses.replace(setting, **{k: tuple(v) if isinstance(v, list) else v
                                              for k, v in overrides.items() if v})
    specs = select(models(setting), args.models)
    start, runs = time.perf_counter(), finished_sweeps(args.output, setting)
    done = {(r["model"], task_key(r)) for r in runs}
    with tqdm(total=len(setting.tasks) * len(specs), desc="MQAR sweeps", unit="sweep") as bar:
        for seq_len, num_pairs in setting.tasks:
            task = MQARConfig(vocab_size=setting.vocab_size, seq_len=seq_len, num_pairs=num_pairs)
            for spec in specs:
                if (spec["name"], (seq_len, num_pairs)) in done:
                    bar.update()
                    continue
                runs += train_sweep(spec, task, setting, bar)
                result = record_of(runs, setting, args.quick, start)  # saved after every sweep: nothing is lost
                save(result, args.output, lambda path: plot(result["best"], path))
    result = record_of(runs, setting, args.quick, start)
    print(summary(result))
    return result


def record_of(runs: list[dict], setting: Setting, quick: bool, start: float) -> dict:
    """The results file's record of `runs`: the setting with the tasks of all of them, the best
    learning rate per (model, task), every run, and this process's seconds (each run also has its
    sweep's)."""
    tasks = tuple(dict.fromkeys(task_key(r) for r in runs))
    return dict(
        experiment="mqar", quick=quick, setting=dataclasses.asdict(dataclasses.replace(setting, tasks=tasks)),
        stop_accuracy=STOP_ACCURACY, kv_fraction_definition=KV_FRACTION_DEFINITION, best=best_runs(runs), runs=runs,
        **environment(start),
    )


def summary(result: dict) -> str:
    """The Markdown table of the best learning rate per (model, task): the seeds' mean accuracy,
    standard deviation and range, how many reached STOP_ACCURACY, and the mean KV fraction."""
    lines = ["| task (T, N) | model | accuracy: mean ± std (min-max) | seeds solved | KV fraction | LR | steps | "
             "sweep seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["best"], key=lambda r: (task_key(r), r["kv_fraction"])):
        lines.append(
            f"| {r['task']['seq_len']}, {r['task']['num_pairs']} | {r['model']} | {r['accuracy']:.3f} ± "
            f"{r['accuracy_std']:.3f} ({r['accuracy_min']:.3f}-{r['accuracy_max']:.3f}) | {r['solved']}/"
            f"{len(r['seeds'])} | {r['kv_fraction']:.3f} | {r['learning_rate']:g} | {r['steps']} | "
            f"{r['sweep_seconds']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
