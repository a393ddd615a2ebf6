"""What bfloat16 saves: the memory of a training step and of a decode cache, bf16 beside fp32.

    python experiments/bench_precision.py            # the small shape, T = 2048
    python experiments/bench_precision.py --quick    # the tiny shape, T = 128

Training: HAM, the Transformer and GDN in the `small` preset's shape, one row of T tokens, the
training step built with ModelConfig.dtype and cache_dtype (HAM's buffer of admitted tokens is its
KV cache) both float32 or both bfloat16, the weights float32 in both (--quick: HAM and the
Transformer in the `tiny` shape). Two
deterministic measures of each, nothing timed:
- compiled: XLA's memory analysis of the compiled step (`memory.compiled_step`: argument + output +
  temp - alias, every buffer counted), and
- saved: the bytes autodiff keeps from the forward pass for the backward (the residuals of jax.vjp
  of the step's loss, as JAX hands them to XLA, before XLA fuses and schedules them; weights
  included), which does not depend on the backend.
XLA's CPU backend computes a bf16 matmul in float32 on converted operands and may keep those
float32 copies for the backward, so on a CPU the compiled ratio overstates what bf16 keeps where
matmuls take bf16 operands (GPUs, TPUs); the saved ratio is the backend-neutral figure.

Decoding: the KV bytes allocated by HAM's and the Transformer's caches for a context of T tokens
(HAM: the preset's capacity per head; the Transformer: every token), with ModelConfig.cache_dtype
float32 and bfloat16 (`hamjax.generate.cache_memory`).
"""

from __future__ import annotations

import jax
from flax import nnx

from hamjax.bench.common import memory_need, parse_args, save_results, synthetic_rows, variant
from hamjax.bench.memory import compiled_step
from hamjax.generate import cache_memory
from hamjax.train import PRESETS
from hamjax.train.loop import build
from hamjax.train.step import summed_loss

DEFAULT_OUTPUT = "runs/bench/precision.json"
MODELS = {"ham": {}, "transformer": {"pattern": "attention"}, "gdn": {"pattern": "gdn"}}
QUICK_MODELS = DECODE_MODELS = ("ham", "transformer")
DTYPES = ("float32", "bfloat16")
MIB = 2**20


def saved_bytes(config) -> int:
    """Bytes of the residuals jax.vjp keeps for the backward of the training loss of a freshly built
    model on one synthetic row (shapes only: nothing is computed)."""
    model, _ = build(config)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rows, segment_ids = synthetic_rows(1, 1, config.data.seq_len, config.model.vocab_size)
    loss = lambda params: summed_loss(nnx.merge(graphdef, params, rest), rows[0], segment_ids[0])[0]
    residuals = jax.eval_shape(lambda params: jax.tree.leaves(jax.vjp(loss, params)[1]), params)
    return sum(r.size * r.dtype.itemsize for r in residuals)


def kv_bytes(config, context: int) -> int:
    """KV bytes allocated by one row's decode cache for `context` tokens, summed over the layers."""
    model, _ = build(config)
    return sum(layer.kv_bytes for layer in cache_memory(model, model.init_cache(1, context), context))


def main(argv=None):
    lengths, _, output, quick = parse_args(argv, __doc__, DEFAULT_OUTPUT, [2048], None, [128], None)
    preset = PRESETS["tiny" if quick else "small"]
    rows = []
    for t in lengths:
        for name in QUICK_MODELS if quick else MODELS:
            changes = MODELS[name]
            row = {"T": t, "model": name, "compiled_bytes": {}, "saved_bytes": {}}
            for dtype in DTYPES:
                config = variant(preset, t, dtype=dtype, cache_dtype=dtype, **changes)
                row["compiled_bytes"][dtype] = memory_need(compiled_step(config)[0])
                row["saved_bytes"][dtype] = saved_bytes(config)
            row["compiled_ratio"] = row["compiled_bytes"]["bfloat16"]["peak"] / row["compiled_bytes"]["float32"]["peak"]
            row["saved_ratio"] = row["saved_bytes"]["bfloat16"] / row["saved_bytes"]["float32"]
            if name in DECODE_MODELS:
                row["kv_bytes"] = {d: kv_bytes(variant(preset, t, cache_dtype=d, **changes), t) for d in DTYPES}
                row["kv_ratio"] = row["kv_bytes"]["bfloat16"] / row["kv_bytes"]["float32"]
            rows.append(row)
            print(f"T={t:5d} {name:12s} compiled {row['compiled_ratio']:.2f}x  saved {row['saved_ratio']:.2f}x"
                  + (f"  KV cache {row['kv_ratio']:.2f}x" if "kv_ratio" in row else ""), flush=True)
    return save_results(
        f"bfloat16 against float32 ({'tiny' if quick else 'small'} preset shape, one row of T tokens): the training "
        "step's compiled memory and the bytes autodiff saves for its backward; the decode cache's KV bytes",
        rows,
        None,
        output,
        preset="tiny" if quick else "small",
    )


def summary(result: dict) -> str:
    """Per T and model: peak compiled MiB and saved MiB in fp32 and bf16 with their ratios, and the
    KV cache's bytes ratio."""
    lines = [
        "| T | model | compiled MiB fp32 | bf16 | bf16 / fp32 | saved for the backward MiB fp32 | bf16 | bf16 / fp32 "
        "| KV cache bf16 / fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        compiled, saved = row["compiled_bytes"], row["saved_bytes"]
        kv = f"{row['kv_ratio']:.2f}x" if "kv_ratio" in row else "-"
        lines.append(
            f"| {row['T']} | {row['model']} | {compiled['float32']['peak'] / MIB:.0f} | "
            f"{compiled['bfloat16']['peak'] / MIB:.0f} | {row['compiled_ratio']:.2f}x | {saved['float32'] / MIB:.0f} | "
            f"{saved['bfloat16'] / MIB:.0f} | {row['saved_ratio']:.2f}x | {kv} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
