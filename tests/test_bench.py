"""hamjax.bench: `hamjax bench --quick` runs every benchmark once, and each reports what it claims to."""

from __future__ import annotations

import json

import pytest

from hamjax.bench import BENCHMARKS, ham_layer
from hamjax.bench.suite import flatten
from hamjax.cli.main import main
from hamjax.nn import ModelConfig


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--quick", "--output_dir", str(folder)]) == 0
    return folder, json.loads((folder / "suite.json").read_text())


def test_the_suite_writes_every_result_and_the_report(suite):
    folder, record = suite
    assert record["quick"] is True and list(record["results"]) == list(BENCHMARKS)
    report = (folder / "suite.md").read_text()
    for name, result in record["results"].items():
        assert json.loads((folder / f"{name}.json").read_text())["rows"] == result["rows"]
        assert f"## {name}" in report
        columns = list(flatten(result["rows"][0]))
        assert "| " + " | ".join(columns) + " |" in report  # the table's header


def test_delta_rule(suite):
    (row,) = suite[1]["results"]["delta_rule"]["rows"]
    for name in ("chunk/fwd", "chunk/fwd_bwd", "recurrent/fwd", "recurrent/fwd_bwd"):
        assert row["seconds"][name] > 0
    assert row["recurrent_over_chunk/fwd_bwd"] > 0


def test_ham_layer(suite):
    result = suite[1]["results"]["ham_layer"]
    kinds = {"attention", "gdn", f"ham_cap{ham_layer.FIXED_CAPACITY}"}
    kinds |= {f"ham_{f}" for f in ham_layer.FRACTIONS}
    assert set(result["loglog_slope"]) == kinds
    assert all(set(row["seconds"]) == kinds for row in result["rows"])


def test_decode(suite):
    (row,) = suite[1]["results"]["decode"]["rows"]
    models = {"ham", "transformer", "gdn"}
    for field in ("seconds_per_token", "tokens_per_s", "kv_bytes", "state_bytes"):
        assert set(row[field]) == models
    for field in ("seconds_per_token", "tokens_per_s"):
        assert all(value > 0 for value in row[field].values())
    for ratio in ("transformer_over_ham", "transformer_over_gdn", "ham_kv_bytes_over_transformer"):
        assert row[ratio] > 0
    assert row["kv_bytes"]["ham"] > 0 and row["kv_bytes"]["transformer"] > 0 and row["kv_bytes"]["gdn"] == 0
    assert row["state_bytes"]["ham"] > 0 and row["state_bytes"]["gdn"] > 0 and row["state_bytes"]["transformer"] == 0
    assert row["ham_capacity"] == -(-row["context"] // 4)
    assert row["kv_entries"]["ham"] == ModelConfig().n_layers * 2 * row["ham_capacity"]
    assert row["ham_kv_bytes_over_transformer"] < 0.3


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2.5}}, "e": "x"}) == {"a/b": 1, "a/c/d": 2.5, "e": "x"}


def test_unknown_benchmark_is_refused(tmp_path, capsys):
    assert main(["bench", "--only", "nope", "--output_dir", str(tmp_path)]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
