"""Variable types that say how the optimizer treats a parameter."""

from __future__ import annotations

from flax import nnx


class NoWeightDecay(nnx.Param):
    """A trained parameter that must not get weight decay: decay rates and biases of the gates
    (A_log, dt_bias), norm scales, and the HAM attention scales (log lambda_h, gamma_h).

    It is an `nnx.Param`, so `nnx.Optimizer(model, tx, wrt=nnx.Param)` trains it; select the decayed
    parameters with the filter `nnx.All(nnx.Param, nnx.Not(NoWeightDecay))`.
    """
