"""The benchmark scripts run end to end in their --quick mode and report what they claim to."""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))

import bench_decode  # noqa: E402
import bench_delta_rule  # noqa: E402
import bench_ham_layer  # noqa: E402


def test_bench_delta_rule_quick(tmp_path):
    out = tmp_path / "delta.json"
    result = bench_delta_rule.main(["--quick", "--output", str(out)])
    assert out.exists()
    (row,) = result["rows"]
    for name in ("chunk/fwd", "chunk/fwd_bwd", "recurrent/fwd", "recurrent/fwd_bwd"):
        assert row["seconds"][name] > 0
    assert row["recurrent_over_chunk/fwd_bwd"] > 0


def test_bench_ham_layer_quick(tmp_path):
    out = tmp_path / "ham.json"
    result = bench_ham_layer.main(["--quick", "--output", str(out)])
    assert out.exists()
    kinds = {"attention", "gdn", f"ham_cap{bench_ham_layer.FIXED_CAPACITY}"}
    kinds |= {f"ham_{f}" for f in bench_ham_layer.FRACTIONS}
    assert set(result["loglog_slope"]) == kinds
    assert all(set(row["seconds"]) == kinds for row in result["rows"])


def test_bench_decode_quick(tmp_path):
    out = tmp_path / "decode.json"
    result = bench_decode.main(["--quick", "--output", str(out)])
    assert out.exists()
    (row,) = result["rows"]
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
    assert row["kv_entries"]["ham"] == bench_decode.ModelConfig().n_layers * 2 * row["ham_capacity"]
    assert row["ham_kv_bytes_over_transformer"] < 0.3
