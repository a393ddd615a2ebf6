"""experiments/lm_sweep.py: `--quick` trains its contenders through hamjax.train.train and writes
their records, a plot and a table; every contender sees the same tokens, the KV fractions follow
the per-layer definition and the parameters are matched to the Transformer's.

The quick run (one fixture for the file) is most of this file's time: each contender compiles its
training and evaluation steps."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np
import pytest

from hamjax.train.run_folder import load_run_config, read_metrics

import experiment_scripts

lm_sweep = experiment_scripts.load("lm_sweep")

QUICK, FULL = lm_sweep.QUICK, lm_sweep.FULL


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_sweep")
    return experiment_scripts.run_quick(lm_sweep, root, "--run_dir", str(root / "runs"))


def test_quick_run_writes_a_record_per_contender_a_plot_and_a_table(quick):
    path, result = quick
    assert path.with_suffix(".png").stat().st_size > 0
    assert result["quick"] is True and result["setting"]["steps"] == QUICK.steps
    assert {"platform", "device", "jax_version", "seconds"} <= result.keys()
    names = [c["name"] for c in lm_sweep.contenders(QUICK)]
    assert [r["name"] for r in result["records"]] == names == ["Transformer", "HAM 0.25"]
    for r in result["records"]:
        assert r["steps"] == QUICK.steps and r["seconds"] > 0 and r["validation_tokens"] > 0
        assert math.isfinite(r["validation_bpb"]) and r["validation_bpb"] > 0
        summary = json.loads((pathlib.Path(r["run_dir"]) / "summary.json").read_text())
        assert summary["validation"]["bpb"] == pytest.approx(r["validation_bpb"])  # read off the run's own result
    table = lm_sweep.summary(result).splitlines()
    assert len(table) == 2 + len(names) and "| Transformer | attention |" in table[-1]  # by KV fraction: 1 is last
    assert "| +0.0% |" in table[-1]


def test_every_contender_trained_on_the_same_rows(quick):
    _, result = quick
    configs = [load_run_config(r["run_dir"]) for r in result["records"]]
    assert len({json.dumps(dataclasses.asdict(c.data)) for c in configs}) == 1
    assert len({json.dumps(dataclasses.asdict(c.train)) for c in configs}) == 1  # the seed sets the data order
    for r in result["records"]:
        steps = [m["step"] for m in read_metrics(pathlib.Path(r["run_dir"]) / "metrics.jsonl") if m["kind"] == "train"]
        assert steps == list(range(1, QUICK.steps + 1))
    assert {r["tokens"] for r in result["records"]} == {QUICK.steps * QUICK.batch_size * QUICK.seq_len}


def test_kv_fraction_is_the_mean_over_layers_with_measured_ham_layers(quick):
    _, result = quick
    transformer, ham = result["records"]
    assert transformer["kv_fraction_per_layer"] == [1.0] * QUICK.n_layers and transformer["ham_kv_fraction"] == []
    assert ham["kv_fraction_per_layer"] == pytest.approx(ham["ham_kv_fraction"]) and len(ham["tau"]) == QUICK.n_layers
    assert all(0.0 < f < 1.0 for f in ham["ham_kv_fraction"])
    for r in result["records"]:
        assert r["kv_fraction"] == pytest.approx(np.mean(r["kv_fraction_per_layer"]))


def test_kv_fractions_of_the_full_settings_hybrids():
    config = lambda pattern: lm_sweep.model_config(FULL, pattern, None)
    assert config("gdn,gdn,gdn,attention").kv_fractions(FULL.seq_len, []) == [0.0, 0.0, 0.0, 1.0]
    swa = config("gdn,swa").kv_fractions(FULL.seq_len, [])
    assert swa == [0.0, 0.5, 0.0, 0.5] and np.mean(swa) == 0.25  # the window: half a row
    assert config("gdn").kv_fractions(FULL.seq_len, []) == [0.0] * 4
    ham = lm_sweep.model_config(FULL, "ham", 0.1)
    assert ham.capacity == FULL.seq_len and ham.kv_target == 0.1 and ham.ham_attention == "compacted"


def test_quick_contenders_are_matched_to_the_transformers_parameters(quick):
    _, result = quick
    reference = result["transformer_parameters"]
    d, layers, mlp = QUICK.d_model, QUICK.n_layers, 32 * math.ceil(8 * QUICK.d_model / 3 / 32)
    attention = 4 * d * QUICK.heads * QUICK.head_dim
    assert reference == 256 * d + d + layers * (attention + 3 * d * mlp + 2 * d)  # embedding, final norm, blocks
    transformer, ham = result["records"]
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
