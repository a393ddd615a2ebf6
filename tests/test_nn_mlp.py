"""hamjax.nn.mlp: the SwiGLU feed-forward block against NumPy with its own weights."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from hamjax.nn.mlp import SwiGLU
from layer_checks import TOL, normal
from oracles import rel_rms

B, T, D, HIDDEN = 2, 7, 12, 20
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def test_matches_numpy():
    layer = SwiGLU(D, HIDDEN, rngs=nnx.Rngs(0))
    x = normal(1, (B, T, D))
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    assert y.shape == (B, T, D)
    w = {name: np.asarray(getattr(layer, name).kernel[...], np.float64) for name in PROJECTIONS}
    x64 = np.asarray(x, np.float64)
    gate = x64 @ w["gate_proj"]
    expected = (gate / (1.0 + np.exp(-gate)) * (x64 @ w["up_proj"])) @ w["down_proj"]
    assert rel_rms(y, expected) <= TOL
    assert layer(x[0]).shape == (T, D)  # any leading axes


def test_parameters():
    layer = SwiGLU(D, HIDDEN, rngs=nnx.Rngs(0))
    shapes = {".".join(map(str, path)): v.shape for path, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
    assert shapes == {"gate_proj.kernel": (D, HIDDEN), "up_proj.kernel": (D, HIDDEN),
                      "down_proj.kernel": (HIDDEN, D)}


@pytest.mark.parametrize("kwargs, match", [(dict(hidden=0), "hidden"), (dict(d_model=-1), "d_model")])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SwiGLU(**{"d_model": D, "hidden": HIDDEN, **kwargs}, rngs=nnx.Rngs(0))
