"""Multi-controller start-up: one process per host (or per GPU), all running the same command."""

from __future__ import annotations

import os

import jax

FORCE_VARIABLE = "HAMJAX_DISTRIBUTED"


def initialize_if_requested(environ=os.environ) -> bool:
    """Call `jax.distributed.initialize` when the environment asks for it, before JAX touches a
    device; returns whether it did.

    - JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID set:
      those values (a multi-GPU host or hand-launched processes);
    - HAMJAX_DISTRIBUTED=1: JAX's cluster auto-detection (Cloud TPU pod slices, SLURM, Open MPI,
      Kubernetes).
    Otherwise this is one process and nothing happens."""
    if "JAX_COORDINATOR_ADDRESS" in environ:
        missing = [name for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if name not in environ]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} is not")
        jax.distributed.initialize(
            environ["JAX_COORDINATOR_ADDRESS"], int(environ["JAX_NUM_PROCESSES"]), int(environ["JAX_PROCESS_ID"])
        )
        return True
    if environ.get(FORCE_VARIABLE, "0") not in ("", "0"):
        jax.distributed.initialize()
        return True
    return False
