"""Benchmarks, measured side by side in one run: the delta rule, a HAM layer against attention and
GDN, the training step (speed, MFU, where its time goes), its memory against T and its time and
memory on long packed rows, what bfloat16 saves against float32, decoding at long contexts, the
training loop's own cost; `run_suite` (`hamjax bench`) runs them all."""

from hamjax.bench.suite import BENCHMARKS, markdown_report, run_suite

__all__ = ["BENCHMARKS", "markdown_report", "run_suite"]
