"""The training steps' metrics on the host: kept on the device as the steps are dispatched, fetched
every few steps in one transfer, checked for a non-finite loss, written and shown on the progress bar.
Throughput is measured over the steps between two fetches, so no step waits for the host."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import jax
import numpy as np

from hamjax.train.step import StepMetrics, bits_per_byte


class NonFiniteLoss(RuntimeError):
    """Training stopped because the loss became NaN or infinite."""


class StepLog:
    """add(step, metrics) as each step is dispatched; fetch() reads every pending step back (one
    device-to-host transfer), checks it, passes its record to `write` and moves `bar`. A non-finite
    loss or gradient norm raises NonFiniteLoss naming the step and `last_checkpoint()`, after the
    records of the finite steps before it. Each step of a fetch is charged the fetch's mean time
    since the last fetch or `restart_clock()` (call it after work that is not training: an
    evaluation, a save)."""

    def __init__(
        self, write: Callable[[dict], None], bar, *, bytes_per_token: float, flops_per_token: float,
        peak_flops: float, checkpoint_message: Callable[[], str],
    ):
        self.write, self.bar = write, bar
        self.bytes_per_token, self.flops_per_token, self.peak_flops = bytes_per_token, flops_per_token, peak_flops
        self.checkpoint_message = checkpoint_message
        self.pending: list[tuple[int, StepMetrics]] = []
        self.fetches = 0
        # Over the fetches after the first (which compiles):
        self.measured_steps = self.measured_tokens = self.measured_seconds = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.since = time.perf_counter()

    def add(self, step: int, metrics: StepMetrics) -> None:
        self.pending.append((step, metrics))

    def fetch(self) -> None:
        if not self.pending:
            return
        fetched = jax.device_get([metrics for _, metrics in self.pending])
        seconds = (time.perf_counter() - self.since) / len(fetched)
        steps = [step for step, _ in self.pending]
        self.pending = []
        for step, metrics in zip(steps, fetched):
            self._record(step, metrics, seconds)
        if self.fetches:
            self.measured_steps += len(fetched)
            self.measured_tokens += sum(int(m.tokens) for m in fetched)
            self.measured_seconds += seconds * len(fetched)
        self.fetches += 1
        self.restart_clock()

    def _record(self, step: int, metrics: StepMetrics, seconds: float) -> None:
        loss, grad_norm = float(metrics.loss), float(metrics.grad_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise NonFiniteLoss(
                f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}: "
                f"training {self.checkpoint_message()}"
            )
        tokens_per_s = int(metrics.tokens) / seconds
        kv = [float(f) for f in np.asarray(metrics.kv_fraction)]
        self.write({
            "kind": "train", "step": step, "loss": loss, "bpb": bits_per_byte(loss, self.bytes_per_token),
            "grad_norm": grad_norm, "kv_fraction": kv, "tau": np.asarray(metrics.tau).tolist(),
            "tokens_per_s": tokens_per_s, "mfu": self.mfu(tokens_per_s),
        })
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}", kv=" ".join(f"{f:.2f}" for f in kv),
                             refresh=False)

    def mfu(self, tokens_per_s: float) -> float:
        return tokens_per_s * self.flops_per_token / self.peak_flops

    @property
    def tokens_per_s(self) -> float:
        """Scored tokens per second over the fetches after the first; nan before there are any."""
        return self.measured_tokens / self.measured_seconds if self.measured_seconds else float("nan")

    @property
    def steps_per_s(self) -> float:
        """Steps per second over the fetches after the first; nan before there are any."""
        return self.measured_steps / self.measured_seconds if self.measured_seconds else float("nan")
