"""Pass-key retrieval (a needle in a haystack of KJV text, in bytes): accuracy against context length.

    python experiments/needle.py            # the CPU run (18 minutes on 2 cores shared with other jobs)
    python experiments/needle.py --quick    # about 30 seconds, for the tests

The task is hamjax.data.needle_batch: T bytes of King James Bible text with the sentence
" The pass key is NNNNN. Remember it. " inserted at a uniform random depth, ending in
" What is the pass key? The pass key is " and the key; the five digits are scored (per-digit
argmax accuracy; chance 0.1). Contenders, all of the same width (d_model, heads, key and value
dims, layers, SwiGLU MLPs, vocabulary 256): Transformer ("attention"), GDN ("gdn") and HAM ("ham",
surprise router, KV targets `ham_targets`). Each trains with hamjax.train.recall_train_step on fresh
rows (step s: seed s - 1), then is evaluated on held-out rows (seeds from 10**6 up, never used in
training) at its training lengths and at 1k to 8k. The KV fraction of a model is the mean over its
layers of the share of a row's tokens held in a KV cache: 1 for attention, 0 for GDN, the measured
admitted / tokens for HAM (its controller drives it toward the target at the training lengths; how
it moves at longer rows is measured, not set).

Long rows: HAM's KV capacity C is a ModelConfig field that no parameter shape depends on, so each
length T > C is read by a copy of the trained model with capacity T (`at_length`): admission stays
by the threshold alone. Evaluation reads at most `eval_tokens` tokens per call (one row at 8k: the
dense T x T scores of one row and 4 heads are 1 GiB). Both attention and HAM use RoPE at base
10000; positions past the longest training row are extrapolation.

Choices, from short probes on this machine's 2 CPU cores (shared with other jobs, load 2 to 9):
- Width: d_model 64, 4 heads of K = V = 16, 2 layers, GDN chunk 64. With 2 heads of 16 the
  Transformer reached 0.49 at T=128 after 700 steps, with 4 heads 0.83 after 450.
- Learning rate 3e-3 (warmup 50, cosine decay; TrainConfig's other defaults). At 1e-2 the
  Transformer stalled at 0.23 after 450 steps and GDN (4 heads) stayed at chance for 400; at 3e-3
  GDN solved T=128 (1.00 per digit and whole key) by step 450, HAM 0.25 reached 0.87 to 0.91 after
  600 steps.
- Training in two stages of 2,048 tokens per step: 500 steps at T=128 (16 rows), where the copy is
  learnt fastest, then 250 at T=512 (4 rows). Trained at T=128 alone, the attention models did not
  carry the copy to longer rows: the Transformer went from 0.69 (T=128) to 0.18 (T=1024) and HAM
  from 0.91 to 0.22, wherever the needle was (needles in the last quarter of a 1k row: 0.12 for the
  Transformer), while GDN kept 0.71 at 1k (0.73 at 128). Longer rows hold more text that looks
  like the needle's context and spread the softmax over more keys; HAM's attention logit scale
  stayed near its initial sqrt(K) = 4, and multiplying it by 4 at T=1024 raised HAM from 0.22 to
  0.34. After the T=512 stage the Transformer reached 0.71 at 512, 0.53 at 1k, 0.29 at 2k, and HAM
  (a probe: 600 steps at 128, then 250 at 512) 0.91 at 512, 0.56 at 1k, 0.43 at 2k, 0.29 at 4k.
- Evaluation: 16 held-out rows per length (80 digits: standard error at most 0.056).
  Whole-key exact match is not recorded: recall_evaluate returns per-digit accuracy only.
- Time (measured in the probes, with other jobs on the cores): a training step of T=128 x 16 rows
  takes about 0.1 to 0.2 s (Transformer), 0.2 s (GDN), 0.35 to 0.7 s (HAM); of T=512 x 4 rows
  0.35 s (Transformer) and 0.9 s (HAM); compiling a training step 5 to 40 s; reading 16 rows of 4k
  25 s for HAM. One HAM contender (target 0.25) fits the budget; `ham_targets` takes more.

What the committed run gave (experiments/results/needle_cpu.json: 1,073 s, one seed):

    T              128     512     1k      2k      4k      8k
    Transformer    0.688   0.713   0.525   0.287   0.100   0.113
    GDN            0.738   0.750   0.663   0.712   0.650   0.438
    HAM 0.25       0.637   0.838   0.613   0.388   0.225   0.212   (KV fraction 0.33 at 128, 0.21 at 8k)

No model carries the copy far beyond its training lengths at this size. HAM is at or above the
Transformer at every length from 512 up while holding about a fifth of the tokens, but both fall
off beyond 512 and GDN degrades least: the opposite of the paper's "GDN falls off" at this scale.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib.figure import Figure
from tqdm import tqdm

from hamjax.data import needle_batch
from hamjax.data.needle import KEY_DIGITS, NEEDLE, QUERY
from hamjax.nn import LanguageModel, ModelConfig
from hamjax.train import TrainConfig, make_optimizer, preset, recall_evaluate, recall_train_step

from experiment_common import KV_FRACTION_DEFINITION, environment, experiment_parser, mean_recall, save, select

DEFAULT_OUTPUT = "experiments/results/needle_cpu.json"
EVAL_SEED = 10**6  # held-out batches use seeds from here up; training uses seeds 0 .. steps - 1


@dataclasses.dataclass(frozen=True)
class Setting:
    """Everything a run of the experiment depends on besides the contender."""

    stages: tuple[tuple[int, int, int], ...]  # training: (T, batch size, steps) in order
    eval_lengths: tuple[int, ...]  # T of the held-out rows after training (the training lengths are added)
    d_model: int
    heads: int
    head_dim: int  # key and value dim of every mixer's heads
    n_layers: int
    chunk_size: int  # delta rule
    warmup_steps: int
    learning_rate: float
    eval_every: int  # training curve: held-out rows at the current stage's length every this many steps
    eval_rows: int  # held-out rows per evaluation, at every length
    eval_tokens: int  # the most tokens one evaluation call reads (rows x T): bounds dense T x T memory
    ham_targets: tuple[float, ...] = (0.25,)
    baselines: tuple[str, ...] = ("Transformer", "GDN")

    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self.stages)

    @property
    def train_lengths(self) -> tuple[int, ...]:
        return tuple(sorted({length for length, _, _ in self.stages}))

    @property
    def lengths(self) -> tuple[int, ...]:
        """The evaluation lengths, the training lengths among them, ascending."""
        return tuple(sorted({*self.train_lengths, *self.eval_lengths}))

    def with_steps(self, steps: int) -> Setting:
        """The setting with `steps` training steps in all, shared among the stages in proportion
        (at least one each)."""
        shares = [max(1, round(steps * n / self.steps)) for _, _, n in self.stages]
        return dataclasses.replace(self, stages=tuple((t, b, n) for (t, b, _), n in zip(self.stages, shares)))


FULL = Setting(
    stages=((128, 16, 500), (512, 4, 250)), eval_lengths=(1024, 2048, 4096, 8192), d_model=64, heads=4,
    head_dim=16, n_layers=2, chunk_size=64, warmup_steps=50, learning_rate=3e-3, eval_every=125, eval_rows=16,
    eval_tokens=8192,
)
QUICK = Setting(
    stages=((96, 4, 2), (96, 4, 2)), eval_lengths=(192,), d_model=16, heads=2, head_dim=8, n_layers=1,
    chunk_size=32, warmup_steps=1, learning_rate=3e-3, eval_every=2, eval_rows=4, eval_tokens=384,
    baselines=("Transformer",),
)
BASELINES = {"Transformer": "attention", "GDN": "gdn"}


def models(setting: Setting) -> list[dict]:
    """The contenders: name, mixer pattern, HAM kv_target (None: not a HAM model)."""
    return [dict(name=name, pattern=BASELINES[name], kv_target=None) for name in setting.baselines] + [
        dict(name=f"HAM {f:g}", pattern="ham", kv_target=f) for f in setting.ham_targets
    ]


def model_config(setting: Setting, pattern: str, kv_target: float | None) -> ModelConfig:
    """The `tiny` preset's model resized: bytes (vocabulary 256), the setting's width and depth,
    HAM capacity = the first stage's length (room for every token, so the controller alone sets the
    fraction; `at_length` raises it for longer rows)."""
    s = setting
    return dataclasses.replace(
        preset("tiny").model, vocab_size=256, d_model=s.d_model, n_layers=s.n_layers, pattern=pattern,
        heads=s.heads, key_dim=s.head_dim, value_dim=s.head_dim, capacity=s.stages[0][0],
        kv_target=kv_target if kv_target is not None else 0.25, chunk_size=s.chunk_size,
    )


def at_length(model: LanguageModel, length: int) -> LanguageModel:
    """The model to read rows of T = length tokens: the model itself, or, when it has HAM layers with
    fewer than T KV slots, a copy with capacity T (its parameters and thresholds; their shapes do
    not depend on the capacity), so that admission at T is by the threshold alone, as in training."""
    config = model.config
    if "ham" not in config.mixers or config.capacity >= length:
        return model
    copy = LanguageModel(dataclasses.replace(config, capacity=length), rngs=nnx.Rngs(0))
    nnx.update(copy, nnx.state(model))
    return copy


def rows_per_call(rows: int, length: int, max_tokens: int) -> int:
    """The largest divisor of `rows` whose rows of `length` tokens fit in max_tokens (at least 1):
    equal batches, each call's memory bounded."""
    return max((d for d in range(1, rows + 1) if rows % d == 0 and d * length <= max_tokens), default=1)


def eval_seeds(setting: Setting, length: int) -> list[int]:
    """The seeds of the held-out batches at T = length: EVAL_SEED, EVAL_SEED + 1, ... (one per call)."""
    calls = setting.eval_rows // rows_per_call(setting.eval_rows, length, setting.eval_tokens)
    return [EVAL_SEED + i for i in range(calls)]


def evaluate(model: LanguageModel, length: int, setting: Setting) -> dict:
    """Per-digit key accuracy, mean loss over the key's digits and HAM KV fraction per layer over
    the setting's eval_rows held-out rows of T = length tokens."""
    start, batch = time.perf_counter(), rows_per_call(setting.eval_rows, length, setting.eval_tokens)
    seeds = eval_seeds(setting, length)
    results = [recall_evaluate(model, *needle_batch(length, batch, seed)[:2]) for seed in seeds]
    return dict(
        length=length, **mean_recall(results), rows=batch * len(seeds), seeds=[seeds[0], seeds[-1]],
        seconds=time.perf_counter() - start,
    )


def training_rows(setting: Setting) -> Iterator[tuple[int, int, int]]:
    """(step, T, B) for steps 1 .. setting.steps, stage after stage; the step trains on the rows
    needle_batch(T, B, seed=step - 1), so every training row has its own seed below `steps`."""
    step = 0
    for length, batch_size, steps in setting.stages:
        for _ in range(steps):
            step += 1
            yield step, length, batch_size


def train_and_evaluate(spec: dict, setting: Setting, seed: int, bar) -> dict:
    """Train one contender through the stages (the training curve: held-out rows at the current
    stage's length every eval_every steps and at the end of each stage), then evaluate it at every
    length. Returns its record."""
    model = LanguageModel(model_config(setting, spec["pattern"], spec["kv_target"]), rngs=nnx.Rngs(seed))
    optimizer = make_optimizer(model, TrainConfig(  # the optimizer holds no model: it goes on with at_length's copy
        steps=setting.steps, batch_size=setting.stages[0][1], learning_rate=setting.learning_rate,
        warmup_steps=setting.warmup_steps, seed=seed,
    ))
    stage_ends = set(itertools.accumulate(steps for _, _, steps in setting.stages))
    start, history = time.perf_counter(), []
    for step, length, batch_size in training_rows(setting):
        model = at_length(model, length)
        inputs, targets, _ = needle_batch(length, batch_size, seed=step - 1)
        metrics = recall_train_step(model, optimizer, jnp.asarray(inputs), jnp.asarray(targets))
        if step % setting.eval_every == 0 or step in stage_ends:
            result = evaluate(model, length, setting)
            history.append(dict(step=step, length=length, train_loss=float(metrics.loss), loss=result["loss"],
                                accuracy=result["accuracy"], ham_kv_fraction=result["ham_kv_fraction"]))
            bar.set_postfix_str(f"{spec['name']} step {step} T={length} acc {result['accuracy']:.3f}")
        bar.update()
    train_seconds, evaluations = time.perf_counter() - start, []
    for length in setting.lengths:
        result = evaluate(at_length(model, length), length, setting)
        layers = model.config.kv_fractions(length, result["ham_kv_fraction"])
        evaluations.append(dict(result, kv_fraction_per_layer=layers, kv_fraction=float(np.mean(layers))))
        bar.set_postfix_str(f"{spec['name']} T={length} acc {result['accuracy']:.3f}")
        bar.update()
    return dict(
        spec, config=dataclasses.asdict(model.config), steps=setting.steps, train_seconds=train_seconds,
        seconds=time.perf_counter() - start, tau=np.asarray(model.taus()).tolist(), history=history,
        evaluations=evaluations,
    )


def plot(result: dict, path: str) -> None:
    """Two panels against context length (log2 axis), one line per contender: per-digit accuracy,
    and the KV fraction (mean over layers); the training lengths marked."""
    fig = Figure(figsize=(12, 4.4))
    axes = fig.subplots(1, 2)
    for i, run in enumerate(result["contenders"]):
        lengths = [e["length"] for e in run["evaluations"]]
        for ax, field in zip(axes, ("accuracy", "kv_fraction")):
            ax.plot(lengths, [e[field] for e in run["evaluations"]], "-o", color=f"C{i}", label=run["name"])
    train_lengths = sorted({length for length, _, _ in result["setting"]["stages"]})
    chance = 1 / 10  # a uniform guess among the ten digits
    for ax, ylabel in zip(axes, ("pass-key accuracy (per digit)", "KV fraction (mean over layers)")):
        for i, length in enumerate(train_lengths):
            ax.axvline(length, color="grey", ls="--", lw=0.8, label="training lengths" if i == 0 else None)
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["lengths"], labels=[str(t) for t in result["lengths"]])
        ax.minorticks_off()
        ax.set(xlabel="context length T (bytes)", ylabel=ylabel, ylim=(-0.02, 1.05))
        ax.legend(fontsize=7)
    axes[0].axhline(chance, color="grey", ls=":", lw=0.6)
    axes[0].set_title("pass-key retrieval against context length")
    axes[1].set_title("share of tokens held in a KV cache")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__, DEFAULT_OUTPUT)
    parser.add_argument(
        "--steps", type=int, help=f"training steps per contender, shared among the stages in proportion (default: {FULL.steps})"
    )
    parser.add_argument("--lengths", type=int, nargs="+", help="evaluation lengths (the training lengths are added)")
    parser.add_argument("--seed", type=int, default=0, help="parameter initialisation seed")
    args = parser.parse_args(argv)
    setting = QUICK if args.quick else FULL
    if args.steps:
        setting = setting.with_steps(args.steps)
    if args.lengths:
        setting = dataclasses.replace(setting, eval_lengths=tuple(args.lengths))
    specs = select(models(setting), args.models)
    start = time.perf_counter()
    with tqdm(total=len(specs) * (setting.steps + len(setting.lengths)), desc="needle", unit="step") as bar:
        contenders = [train_and_evaluate(spec, setting, args.seed, bar) for spec in specs]
    result = dict(
        experiment="needle", quick=args.quick, setting=dataclasses.asdict(setting), lengths=list(setting.lengths),
        task=dict(needle=NEEDLE, query=QUERY, key_digits=KEY_DIGITS, corpus="kjv"),
        train_seeds=[0, setting.steps - 1], eval_seed_start=EVAL_SEED,
        kv_fraction_definition=KV_FRACTION_DEFINITION, contenders=contenders, **environment(start),
    )
    save(result, args.output, lambda path: plot(result, path))
    print(summary(result))
    return result


def summary(result: dict) -> str:
    """The Markdown table: a row per contender, a column per evaluation length (per-digit accuracy,
    with the measured KV fraction for HAM), and the contender's seconds."""
    train_lengths = {length for length, _, _ in result["setting"]["stages"]}
    heads = [f"T={t}" + (" (train)" if t in train_lengths else "") for t in result["lengths"]]
    lines = ["| model | " + " | ".join(heads) + " | seconds |", "|---|" + "---|" * (len(heads) + 1)]
    for run in result["contenders"]:
        cells = [
            f"{e['accuracy']:.3f}" + (f" (KV {e['kv_fraction']:.2f})" if run["kv_target"] is not None else "")
            for e in run["evaluations"]
        ]
        lines.append(f"| {run['name']} | " + " | ".join(cells) + f" | {run['seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
