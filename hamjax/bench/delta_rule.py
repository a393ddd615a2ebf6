"""Chunked vs per-token gated delta rule, forward and forward+backward, measured side by side.

    python experiments/bench_delta_rule.py            # T in {512, 2048, 8192}, B=1, H=4, K=V=64
    python experiments/bench_delta_rule.py --quick    # a few seconds, for the tests

When the `ref` extra is installed (pip install -e .[ref]), fla's naive chunked PyTorch reference runs
at the same sizes. Timings are medians over interleaved repeats; compare ratios, not absolute times,
on a shared CPU. Writes a JSON results file.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp

from hamjax.bench.common import make_inputs, median_times, parse_args, save_results
from hamjax.ops import gated_delta_rule

DEFAULT_OUTPUT = "runs/bench/delta_rule.json"


def jax_runners(inputs, method: str):
    """(forward, forward+backward) zero-argument callables that block until done."""
    args = [jnp.asarray(inputs[n]) for n in ("q", "k", "v", "g", "beta")]
    cot = jnp.asarray(inputs["cotangent"])

    def loss(*a):
        return jnp.sum(gated_delta_rule(*a, method=method)[0] * cot)

    fwd = jax.jit(loss)
    fwd_bwd = jax.jit(jax.grad(loss, argnums=tuple(range(5))))
    return (lambda: jax.block_until_ready(fwd(*args)), lambda: jax.block_until_ready(fwd_bwd(*args)))


def load_fla_naive():
    """fla's naive.py loaded by file path (importing `fla.ops` would pull in triton); None if absent."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("fla") is None:
        return None
    (fla_dir,) = importlib.util.find_spec("fla").submodule_search_locations
    path = os.path.join(fla_dir, "ops", "gated_delta_rule", "naive.py")
    spec = importlib.util.spec_from_file_location("fla_gdn_naive", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_runners(inputs, chunk_fn):
    """(forward, forward+backward) callables for a PyTorch chunked gated delta rule
    chunk_fn(q, k, v, g, beta) -> (o, state), on the GPU when torch sees one."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors = {n: torch.from_numpy(inputs[n]).to(device) for n in ("q", "k", "v", "g", "beta")}
    cot = torch.from_numpy(inputs["cotangent"]).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    def loss(ts):
        o, _ = chunk_fn(ts["q"], ts["k"], ts["v"], ts["g"], ts["beta"])
        return (o * cot).sum()

    def fwd():
        with torch.no_grad():
            loss(tensors)
        sync()

    def fwd_bwd():
        leaves = {n: x.clone().requires_grad_(True) for n, x in tensors.items()}
        loss(leaves).backward()
        sync()

    return fwd, fwd_bwd


def fla_kernel():
    """fla's Triton chunk kernel (fp32 in and out) when a CUDA GPU and triton are there; else None."""
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("fla") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return chunk_gated_delta_rule


def main(argv=None):
    lengths, repeats, output, _ = parse_args(argv, __doc__, DEFAULT_OUTPUT, [512, 2048, 8192], 5, [128], 2)
    batch, heads, dk, dv = 1, 4, 64, 64
    naive = load_fla_naive()
    kernel = fla_kernel()
    if naive is None:
        print("fla reference skipped: needs the `ref` extra (pip install -e .[ref])")
    rows = []
    for t in lengths:
        inputs = make_inputs(t, batch, heads, dk, dv)
        runners = {}
        for label, (fwd, fwd_bwd) in [
            ("chunk", jax_runners(inputs, "chunk")),
            ("recurrent", jax_runners(inputs, "recurrent")),
            *([("fla_naive_chunk", torch_runners(inputs, naive.naive_chunk_gated_delta_rule))] if naive else []),
            *([("fla_triton_chunk", torch_runners(inputs, kernel))] if kernel else []),
        ]:
            runners[f"{label}/fwd"], runners[f"{label}/fwd_bwd"] = fwd, fwd_bwd
        times = median_times(runners, repeats)
        row = {"T": t, "seconds": times}
        for pass_ in ("fwd", "fwd_bwd"):
            chunk = times[f"chunk/{pass_}"]
            row[f"recurrent_over_chunk/{pass_}"] = times[f"recurrent/{pass_}"] / chunk
            for ref in ("fla_naive_chunk", "fla_triton_chunk"):
                if f"{ref}/{pass_}" in times:
                    row[f"{ref}_over_chunk/{pass_}"] = times[f"{ref}/{pass_}"] / chunk
        rows.append(row)
        cells = "  ".join(f"{name} {1e3 * s:8.1f} ms" for name, s in times.items())
        ratios = "  ".join(f"{k} {v:5.2f}x" for k, v in row.items() if "_over_" in k)
        print(f"T={t:5d}  {cells}\n         {ratios}", flush=True)
    return save_results(
        "gated delta rule: chunk vs recurrent (vs fla naive chunk), B=1 H=4 K=V=64",
        rows,
        repeats,
        output,
    )



def summary(result: dict) -> str:
    """Per T: the chunked form's milliseconds and every contender's time over it."""
    ratios = list(dict.fromkeys(k for row in result["rows"] for k in row if "_over_" in k))
    labels = [k.replace("_over_", " / ").replace("/fwd_bwd", " (fwd+bwd)").replace("/fwd", " (fwd)") for k in ratios]
    lines = ["| T | chunk fwd ms | chunk fwd+bwd ms | " + " | ".join(labels) + " |", "|---" * (len(ratios) + 3) + "|"]
    for row in result["rows"]:
        seconds = row["seconds"]
        lines.append(f"| {row['T']} | {1e3 * seconds['chunk/fwd']:.1f} | {1e3 * seconds['chunk/fwd_bwd']:.1f} | "
                     + " | ".join(f"{row[k]:.2f}x" if k in row else "-" for k in ratios) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
