"""hamjax.bench: `hamjax bench --quick` runs every benchmark once, and each reports what it claims to."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hamjax import ops
from hamjax.bench import BENCHMARKS, ham_layer, memory, packed_step, precision, train_loop, train_step
from hamjax.bench.common import count_every_buffer, memory_need, variant
from hamjax.cli.main import main
from hamjax.nn import ModelConfig
from hamjax.train import PRESETS
from hamjax.train.flops import forward_flops_per_token, measure_matmul_peak


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--quick", "--output_dir", str(folder)]) == 0
    return folder, json.loads((folder / "suite.json").read_text())


def test_the_suite_writes_every_result_and_its_summary(suite):
    folder, record = suite
    assert record["quick"] is True and list(record["results"]) == list(BENCHMARKS)
    report = (folder / "suite.md").read_text()
    for name, result in record["results"].items():
        assert json.loads((folder / f"{name}.json").read_text())["rows"] == result["rows"]
        table = BENCHMARKS[name].summary(result)
        assert f"## {name}" in report and table in report
        assert table.count("\n|---") == 1 and len(table.splitlines()) >= 3  # a header, a rule and rows


def test_delta_rule(suite):
    (row,) = suite[1]["results"]["delta_rule"]["rows"]
    for name in ("chunk/fwd", "chunk/fwd_bwd", "recurrent/fwd", "recurrent/fwd_bwd"):
        assert row["seconds"][name] > 0
    assert row["recurrent_over_chunk/fwd_bwd"] > 0


def test_ham_layer(suite):
    result = suite[1]["results"]["ham_layer"]
    kinds = {"attention", "attention_blocks", "swa", "gdn", f"ham_cap{ham_layer.FIXED_CAPACITY}"}
    kinds |= {f"ham_{f}" for f in ham_layer.QUICK_FRACTIONS}
    assert set(result["loglog_slope"]) == kinds
    for row in result["rows"]:
        assert set(row["seconds"]) == kinds and row["skipped"] == {}
        assert all(s > 0 for s in row["seconds"].values())
        assert set(row["memory_bytes"]) == kinds and all(b > 0 for b in row["memory_bytes"].values())
        assert row["over_attention"]["attention"] == 1.0
    assert 0 < result["memory_budget_bytes"]


def test_the_sliding_window_contender_sees_the_last_window_keys():
    t, heads, dim, window = 12, 2, 8, 4
    q, k, v = np.random.default_rng(0).normal(size=(3, 1, t, heads, dim)).astype(np.float32)
    positions = jnp.arange(t)[None]
    dense = ops.attend(q, positions, jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2), jnp.broadcast_to(positions, (1, heads, t)),
                       jnp.ones((1, heads, t), bool), logit_scale=jnp.full((heads,), 0.5), window=window)
    swa = ham_layer.windowed_attention(q, k, v, 0.5, window)
    np.testing.assert_allclose(swa, dense, rtol=1e-5, atol=1e-5)
    assert not np.allclose(ham_layer.windowed_attention(q, k, v, 0.5), dense, atol=1e-3)  # the window matters


def test_the_blocked_attention_contender_computes_the_attention_contenders_gradients():
    t, heads, dim = 200, 2, 8  # 4 query blocks of 64, the last one short
    rng = np.random.default_rng(1)
    q, k, v, cot = (jnp.asarray(rng.normal(size=(1, t, heads, dim)), jnp.float32) for _ in range(4))
    args = (q, k, v, jnp.zeros((1, t, heads)), jnp.ones((1, t, heads)), cot, jnp.arange(t)[None],
            jnp.full((heads,), dim**0.5, jnp.float32))
    grads = {name: jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
             for name, loss in (("dense", ham_layer.attention_loss()), ("blocks", ham_layer.blocked_attention_loss))}
    # Gradients reach 25 here (unnormalised q, k): float32 rounding is relative to that scale (hamjax's
    # one-block T x T softmax differs from XLA's by 1.5e-5 at its worst element).
    for dense, blocks in zip(grads["dense"], grads["blocks"]):
        np.testing.assert_allclose(blocks, dense, rtol=1e-4, atol=2e-6 * np.abs(dense).max())


def test_contenders_over_the_memory_budget_are_skipped_and_recorded():
    t = 16
    inputs = list(jnp.asarray(np.random.default_rng(0).normal(size=(3, 1, t, 2, 8)), jnp.float32))
    args = [*inputs, jnp.zeros((1, t, 2)), jnp.ones((1, t, 2)), inputs[0], jnp.arange(t)[None], jnp.ones((2,))]
    losses = {"attention": ham_layer.attention_loss(), "swa": ham_layer.attention_loss(4)}
    fields = ham_layer.run_contenders(losses, args, budget=0, repeats=1)
    assert fields["seconds"] == {} and set(fields["skipped"]) == set(losses)
    assert {name: s["bytes"] for name, s in fields["skipped"].items()} == fields["memory_bytes"]
    assert all(b > 0 for b in fields["memory_bytes"].values())
    assert all("over the budget 0.00 GiB" in s["reason"] for s in fields["skipped"].values())


def test_slopes_are_fitted_over_the_lengths_each_contender_ran():
    rows = [
        {"T": 1000, "seconds": {"a": 1.0, "b": 2.0, "c": 3.0}, "over_attention": {}, "skipped": {}},
        {"T": 2000, "seconds": {"a": 4.0, "b": 4.0}, "over_attention": {}, "skipped": {"c": {"bytes": 2**31}}},
        {"T": 4000, "seconds": {"b": 8.0}, "over_attention": {}, "skipped": {"a": {"bytes": 2**31}, "c": {"bytes": 2**31}}},
    ]
    assert ham_layer.slopes(rows) == pytest.approx({"a": 2.0, "b": 1.0})
    table = ham_layer.summary({"rows": rows, "loglog_slope": ham_layer.slopes(rows)})
    assert "| 4000 | skipped (2.0 GiB) | 8000.0 ms | skipped (2.0 GiB) |" in table
    assert table.endswith("| log-log slope | 2.00 | 1.00 | - |")


def test_train_step(suite):
    result = suite[1]["results"]["train_step"]
    (row,) = result["rows"]
    models = set(train_step.QUICK_MODELS)
    assert result["preset"] == "tiny" and result["peak_flops"] > 0
    for field in ("seconds_per_step", "tokens_per_s", "train_flops_per_token", "mfu", "mixers"):
        assert set(row[field]) == models
    config = PRESETS["tiny"]
    assert row["tokens_per_step"] == config.train.batch_size * config.data.seq_len
    for name in models:
        seconds, flops = row["seconds_per_step"][name], row["train_flops_per_token"][name]
        assert seconds > 0 and row["tokens_per_s"][name] == pytest.approx(row["tokens_per_step"] / seconds)
        assert 0 < row["mfu"][name] <= 1
        assert flops["total"] == sum(n for c, n in flops.items() if c != "total")
        forward = forward_flops_per_token(variant(config, row["T"], **train_step.MODELS[name]).model, row["T"])
        assert flops == {c: 3 * n for c, n in forward.items()} | {"total": flops["total"]}
        assert row["mfu"][name] == pytest.approx(row["tokens_per_s"][name] * flops["total"] / result["peak_flops"])
    assert row["train_flops_per_token"]["ham"]["delta_rule"] > 0 == row["train_flops_per_token"]["transformer"]["delta_rule"]
    assert row["mixers"] == {"ham": "ham,ham", "transformer": "attention,attention"}


def test_memory(suite):
    result = suite[1]["results"]["memory"]
    models = set(memory.QUICK_NAMES)
    assert [row["T"] for row in result["rows"]] == [64, 128] and result["compiler_options"] == count_every_buffer()
    for row in result["rows"]:
        assert set(row["peak_bytes"]) == models and row["over_transformer"]["transformer"] == 1.0
        for name, b in row["bytes"].items():
            assert row["peak_bytes"][name] == b["argument"] + b["output"] + b["temp"] - b["alias"] > 0
        assert row["over_transformer"]["ham"] == row["peak_bytes"]["ham"] / row["peak_bytes"]["transformer"]
    short, long = result["rows"]
    assert long["peak_bytes"]["transformer"] > short["peak_bytes"]["transformer"]
    assert long["bytes"]["transformer"]["temp"] > 2 * short["bytes"]["transformer"]["temp"]  # the T x T logits
    assert set(result["loglog_slope"]) == {"peak", "temp"}
    assert all(set(s) == models for s in result["loglog_slope"].values())
    if jax.default_backend() == "cpu":
        assert "device_peak_bytes_in_use" not in short


def test_precision(suite):
    """bf16 beside fp32 for every model: each ratio is what its bytes say, bf16 needs less under both
    measures, and the decode caches' bytes fall to about half (keys and values halve; each entry's
    int32 position and HAM's float32 score stay)."""
    rows = {row["model"]: row for row in suite[1]["results"]["precision"]["rows"]}
    assert set(rows) == set(precision.QUICK_MODELS) and all(row["T"] == 128 for row in rows.values())
    for row in rows.values():
        compiled, saved = row["compiled_bytes"], row["saved_bytes"]
        assert row["compiled_ratio"] == compiled["bfloat16"]["peak"] / compiled["float32"]["peak"] < 1
        assert row["saved_ratio"] == saved["bfloat16"] / saved["float32"] < 1
    assert {name for name, row in rows.items() if "kv_ratio" in row} == set(precision.DECODE_MODELS)
    for name in precision.DECODE_MODELS:
        assert rows[name]["kv_ratio"] == rows[name]["kv_bytes"]["bfloat16"] / rows[name]["kv_bytes"]["float32"]
        assert 0.5 < rows[name]["kv_ratio"] < 0.6


def test_train_loop(suite):
    """Both loops ran the tiny preset's 12 steps; each median is its one sample and the ratio is theirs."""
    result = suite[1]["results"]["train_loop"]
    assert result["steps"] == 12 and [row["loop"] for row in result["rows"]] == list(train_loop.LOOPS)
    per_step, deferred = result["rows"]
    assert (per_step["log_every"], per_step["prefetch"], deferred["log_every"], deferred["prefetch"]) == (1, 0, 10, 2)
    for row in result["rows"]:
        assert row["samples"] == [row["steps_per_s"]] and row["steps_per_s"] > 0
    assert result["deferred_over_per_step"] == deferred["steps_per_s"] / per_step["steps_per_s"]


def test_packed_step(suite):
    """Two documents per row, T/8 slots per document, tau at the 0.75 quantile: HAM's KV fraction is
    about a quarter (at most one, capped by the slots); both lengths compiled, the longer one timed."""
    result = suite[1]["results"]["packed_step"]
    models = set(packed_step.QUICK_MODELS)
    short, long = result["rows"]
    assert (short["T"], long["T"]) == (128, 256) and "seconds_per_step" not in short
    assert set(long["seconds_per_step"]) == models and all(s > 0 for s in long["seconds_per_step"].values())
    assert long["over_transformer"]["transformer"] == 1.0
    for fraction in long["kv_fraction"]["ham_compacted"]:
        assert 0.15 < fraction <= 0.25
    for row in result["rows"]:
        assert set(row["bytes"]) == models
        for b in row["bytes"].values():
            assert b["peak"] == b["argument"] + b["output"] + b["temp"] - b["alias"] > 0
    assert set(result["temp_loglog_slope"]) == models


def test_packed_rows_hold_two_documents():
    rows, segment_ids = packed_step.packed_rows(10, 256)
    assert rows.shape == segment_ids.shape == (1, 1, 11)
    np.testing.assert_array_equal(segment_ids[0, 0], [1] * 5 + [2] * 6)


def test_every_buffer_is_counted():
    """On a CPU, XLA hands a fused matmul chain to YNNPACK, whose intermediates memory_analysis does
    not see: the memory benchmark compiles without it."""
    x = jnp.ones((256, 256))
    chain = jax.jit(lambda x: jnp.sum(jnp.exp(x @ x) @ x)).lower(x)
    assert memory_need(chain.compile(compiler_options=count_every_buffer()))["temp"] >= x.nbytes


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


def test_unknown_benchmark_is_refused(tmp_path, capsys):
    assert main(["bench", "--only", "nope", "--output_dir", str(tmp_path)]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_the_matmul_peak_is_measured_once_per_process_and_arguments():
    first = measure_matmul_peak(64, 1)
    assert measure_matmul_peak(64, 1) is first
    assert measure_matmul_peak(64, 2) is not first


def test_profile(suite):
    result = suite[1]["results"]["profile"]
    (row,) = result["rows"]
    assert result["preset"] == "tiny" and row["T"] == PRESETS["tiny"].data.seq_len
    record = row["models"]["ham"]
    assert record["op_ms_per_step"] > 0
    for table in ("by_file", "by_line"):
        assert sum(v["share"] for v in record[table].values()) == pytest.approx(1.0)
        assert sum(v["ms"] for v in record[table].values()) == pytest.approx(record["op_ms_per_step"])
    # The delta rule and attention are charged to their own lines, whose code is quoted.
    for path in ("ops/delta_rule.py", "ops/blockwise_attention.py", "nn/conv.py"):
        assert record["by_file"][path]["share"] > 0.01
    lines = [k for k in record["by_line"] if k.startswith("ops/blockwise_attention.py:")]
    assert lines and all(record["by_line"][k]["code"] for k in lines)


def test_profile_charges_each_operation_to_its_source_line():
    """A jitted apply_rope: its compiled operations are charged to ops/rope.py lines, whose code
    is the rotation's."""
    from hamjax.bench.profile import source_lines, source_text

    x, positions = jnp.ones((1, 8, 2, 4), jnp.float32), jnp.arange(8)[None]
    compiled = jax.jit(lambda x, p: ops.apply_rope(x, p) * 3.0).lower(x, positions).compile()
    charged = source_lines(compiled.as_text())
    rope_lines = {where for where in charged.values() if where.startswith("ops/rope.py:")}
    assert rope_lines, charged
    assert any("sin" in source_text(where) or "cos" in source_text(where) for where in rope_lines)
    assert source_text("(no hamjax frame) add") == ""
