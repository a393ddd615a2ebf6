"""The benchmark scripts run end to end in their --quick mode and report what they claim to."""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))

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
