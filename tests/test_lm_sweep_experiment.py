"""experiments/lm_sweep.py: `--quick` trains its contenders through hamjax.train.train at each of
its seeds and writes their records, a plot and a table of means and spreads over the seeds; every
contender sees the same tokens at a seed, the KV fractions follow the per-layer definition, the
parameters are matched to the Transformer's, and the recall split (hit and other bits per byte) is
an evaluation of each run's final checkpoint that agrees with the run's own.

The quick run (one fixture for the file) is most of this file's time: each contender compiles its
training and evaluation steps (the second seed reuses them)."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np
import pytest

from hamjax.train import Evaluation, RunSummary
from hamjax.train.run_folder import load_run_config, read_metrics

import experiment_scripts

lm_sweep = experiment_scripts.load("lm_sweep")

QUICK, FULL, LONG = lm_sweep.QUICK, lm_sweep.FULL, lm_sweep.LONG


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_sweep")
    return experiment_scripts.run_quick(lm_sweep, root, "--run_dir", str(root / "runs"))


def records_of(result: dict, name: str) -> list[dict]:
    """The records of one contender, one per seed."""
    return [r for r in result["records"] if r["name"] == name]


def test_quick_run_writes_a_record_per_contender_and_seed_a_plot_and_a_table(quick):
    path, result = quick
    assert path.with_suffix(".png").stat().st_size > 0
    assert result["quick"] is True and result["setting_name"] == "quick" and result["setting"]["steps"] == QUICK.steps
    assert {"platform", "device", "jax_version", "seconds"} <= result.keys()
    specs = lm_sweep.contenders(QUICK)
    assert [s["name"] for s in specs] == ["Transformer", "HAM 0.25"] and QUICK.seeds == (0, 1)
    runs = [(s["name"], seed) for seed in QUICK.seeds for s in specs]  # seed by seed
    assert [(r["name"], r["seed"]) for r in result["records"]] == runs
    for r in result["records"]:
        assert pathlib.Path(r["run_dir"]).name == f"{r['name'].lower().replace(' ', '-')}-seed{r['seed']}"
        assert load_run_config(r["run_dir"]).train.seed == r["seed"]
        assert r["steps"] == QUICK.steps and r["seconds"] > 0 and r["validation_tokens"] > 0
        assert math.isfinite(r["validation_bpb"]) and r["validation_bpb"] > 0
        summary = json.loads((pathlib.Path(r["run_dir"]) / "summary.json").read_text())
        assert summary["validation"]["bpb"] == pytest.approx(r["validation_bpb"])  # read off the run's own result
    assert len({r["run_dir"] for r in result["records"]}) == len(result["records"])
    transformers = records_of(result, "Transformer")
    assert transformers[0]["validation_bpb"] != transformers[1]["validation_bpb"]  # the seed changes the run


def test_recall_split_of_every_run_is_its_final_evaluation(quick):
    _, result = quick
    hits = {r["hit_tokens"] for r in result["records"]}
    assert len(hits) == 1 and 0 < hits.pop() < result["records"][0]["validation_tokens"]  # one split for all
    for r in result["records"]:
        assert r["hit_tokens"] + r["other_tokens"] == r["validation_tokens"]
        assert r["recall_evaluation_bpb"] == pytest.approx(r["validation_bpb"], rel=lm_sweep.BPB_TOLERANCE)
        assert math.isfinite(r["hit_bpb"]) and math.isfinite(r["other_bpb"])
        weighted = (r["hit_bpb"] * r["hit_tokens"] + r["other_bpb"] * r["other_tokens"]) / r["validation_tokens"]
        assert weighted == pytest.approx(r["validation_bpb"], rel=1e-5)  # bpb is linear in the summed loss


def test_recall_split_refuses_an_evaluation_that_is_not_the_runs_final_one(quick):
    _, result = quick
    r = result["records"][0]
    other = Evaluation(r["validation_loss"], 1.01 * r["validation_bpb"], r["ham_kv_fraction"], r["validation_tokens"])
    summary = RunSummary("finished", r["steps"], other, math.nan, math.nan, math.nan, 0.0)
    with pytest.raises(RuntimeError, match="not the run's final one"):
        lm_sweep.recall_split(r["run_dir"], summary, QUICK.recall_ngram)


def test_table_and_contenders_give_means_and_spreads_over_the_seeds(quick):
    _, result = quick
    assert result["contenders"] == lm_sweep.per_contender(result["records"])
    for row in result["contenders"]:
        runs = records_of(result, row["name"])
        assert row["seeds"] == list(QUICK.seeds) and row["seconds"] == pytest.approx(sum(r["seconds"] for r in runs))
        for metric in lm_sweep.SPREAD_METRICS:
            values = [r[metric] for r in runs]
            assert row[metric] == dict(mean=pytest.approx(np.mean(values)), min=min(values), max=max(values))
    table = lm_sweep.summary(result).splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert {"seeds", "validation bpb", "spread", "hit bpb", "hit spread", "other bpb"} <= set(header)
    assert len(table) == 2 + len(result["contenders"])
    transformer = dict(zip(header, (cell.strip() for cell in table[-1].strip("|").split("|"))))  # by KV fraction: last
    row = result["contenders"][0]
    assert transformer["model"] == row["name"] == "Transformer" and transformer["seeds"] == "2"
    assert transformer["vs Transformer"] == transformer["hit vs Transformer"] == "+0.0%"
    assert transformer["validation bpb"] == f"{row['validation_bpb']['mean']:.3f}"
    assert transformer["spread"] == f"{row['validation_bpb']['max'] - row['validation_bpb']['min']:.3f}"
    assert transformer["hit bpb"] == f"{row['hit_bpb']['mean']:.3f}"


def test_every_contender_trained_on_the_same_rows_at_each_seed(quick):
    _, result = quick
    configs = [load_run_config(r["run_dir"]) for r in result["records"]]
    assert len({json.dumps(dataclasses.asdict(c.data)) for c in configs}) == 1
    for seed in QUICK.seeds:  # the seed sets the data order
        trains = {json.dumps(dataclasses.asdict(c.train)) for c in configs if c.train.seed == seed}
        assert len(trains) == 1
    for r in result["records"]:
        steps = [m["step"] for m in read_metrics(pathlib.Path(r["run_dir"]) / "metrics.jsonl") if m["kind"] == "train"]
        assert steps == list(range(1, QUICK.steps + 1))
    assert {r["tokens"] for r in result["records"]} == {QUICK.steps * QUICK.batch_size * QUICK.seq_len}


def test_kv_fraction_is_the_mean_over_layers_with_measured_ham_layers(quick):
    _, result = quick
    for transformer in records_of(result, "Transformer"):
        assert transformer["kv_fraction_per_layer"] == [1.0] * QUICK.n_layers and transformer["ham_kv_fraction"] == []
    for ham in records_of(result, "HAM 0.25"):
        assert ham["kv_fraction_per_layer"] == pytest.approx(ham["ham_kv_fraction"])
        assert len(ham["tau"]) == QUICK.n_layers
        assert all(0.0 < f < 1.0 for f in ham["ham_kv_fraction"])
    for r in result["records"]:
        assert r["kv_fraction"] == pytest.approx(np.mean(r["kv_fraction_per_layer"]))


@pytest.mark.parametrize("setting", [FULL, LONG], ids=["full", "long"])
def test_kv_fractions_of_the_settings_hybrids(setting):
    config = lambda pattern: lm_sweep.model_config(setting, pattern, None)
    assert config("gdn,gdn,gdn,attention").kv_fractions(setting.seq_len, []) == [0.0, 0.0, 0.0, 1.0]
    swa = config("gdn,swa").kv_fractions(setting.seq_len, [])
    assert swa == [0.0, 0.5, 0.0, 0.5] and np.mean(swa) == 0.25  # the window: half a row
    assert config("gdn").kv_fractions(setting.seq_len, []) == [0.0] * 4
    ham = lm_sweep.model_config(setting, "ham", 0.1)
    assert ham.capacity == setting.seq_len and ham.kv_target == 0.1 and ham.ham_attention == "compacted"


def test_long_setting_is_full_at_t_1024_with_4x_the_tokens_and_2_seeds():
    assert LONG.seq_len == 1024 and LONG.seeds == (0, 1) and LONG.ham_targets == (0.05, 0.1, 0.25, 0.5)
    tokens = lambda s: s.steps * s.batch_size * s.seq_len
    assert tokens(LONG) == 4 * tokens(FULL) == 2_048_000
    same = ("d_model", "n_layers", "heads", "head_dim", "learning_rate", "warmup_steps", "validation_fraction")
    assert all(getattr(LONG, field) == getattr(FULL, field) for field in same)


def test_options_pick_the_settings_results_and_run_folders():
    _, name, setting, output, run_root = lm_sweep.options(["--setting", "long"])
    assert (name, setting, output, run_root) == ("long", LONG, "experiments/results/lm_sweep_long_cpu.json",
                                                 "runs/lm_sweep_long")
    _, name, setting, output, run_root = lm_sweep.options(["--seeds", "3", "--output", "x.json"])
    assert (name, setting.seeds, output, run_root) == ("full", (3,), "x.json", "runs/lm_sweep")
    assert lm_sweep.options([])[2] == FULL and FULL.seeds == (0,)
    with pytest.raises(SystemExit, match=r"repeats a seed: \[1, 1\]"):
        lm_sweep.options(["--seeds", "1", "1"])


def test_quick_contenders_are_matched_to_the_transformers_parameters(quick):
    _, result = quick
    reference = result["transformer_parameters"]
    d, layers, mlp = QUICK.d_model, QUICK.n_layers, 32 * math.ceil(8 * QUICK.d_model / 3 / 32)
    attention = 4 * d * QUICK.heads * QUICK.head_dim
    assert reference == 256 * d + d + layers * (attention + 3 * d * mlp + 2 * d)  # embedding, final norm, blocks
    transformer, ham = result["records"][:2]  # seed 0
    assert not transformer["mlp_matched"] and transformer["parameters"] == reference
    assert ham["mlp_matched"] and ham["mlp_hidden"] < mlp  # unmatched, HAM has 10% more parameters
    for r in result["records"]:
        assert abs(r["parameters"] / reference - 1) <= lm_sweep.PARAM_TOLERANCE
        assert r["parameters_vs_transformer"] == pytest.approx(r["parameters"] / reference - 1)
        assert r["parameters"] == lm_sweep.parameter_count(load_run_config(r["run_dir"]).model)  # what was trained


def test_match_parameters_keeps_a_close_model_and_picks_the_closest_mlp_width_otherwise():
    count = lm_sweep.parameter_count
    reference = count(lm_sweep.model_config(QUICK, "attention", None))
    gdn = lm_sweep.model_config(QUICK, "gdn", None)
    assert count(gdn) > 1.05 * reference
    matched = lm_sweep.match_parameters(gdn, reference)
    assert matched.mlp_hidden % 8 == 0 and dataclasses.replace(matched, mlp_hidden=None) == gdn
    distance = lambda hidden: abs(count(dataclasses.replace(gdn, mlp_hidden=hidden)) - reference)
    assert distance(matched.mlp_hidden) < min(distance(matched.mlp_hidden - 8), distance(matched.mlp_hidden + 8))
    assert lm_sweep.match_parameters(gdn, count(gdn) * 1.04) is gdn  # within 5%: unchanged
    assert lm_sweep.match_parameters(gdn, count(gdn) * 1.06) is not gdn
