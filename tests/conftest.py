"""The tests keep what they prepare out of the user's caches: corpora that hamjax prepares
(HAMJAX_CACHE) and the Arrow files `datasets` writes for the files it loads (HF_DATASETS_CACHE) go
to one temporary folder for the session. It is set before the test modules are collected, since
`datasets` reads its cache location when imported; pytest-xdist's workers and every subprocess
inherit it, and the process that made it removes it at the end.

The same folder holds JAX's persistent compilation cache for the session (unless
JAX_COMPILATION_CACHE_DIR is set already): the suite compiles the same programs in many places (the
tiny preset's training step in the CLI, README, notebook and experiment tests, each in its own process
or worker), and on this project's CPUs compiling is most of the suite's time. A hit returns the
executable XLA built for the same program earlier in the session, with its memory and cost
analyses; the cache starts empty in every session, so no result depends on an earlier run.

The suite also compiles with LLVM's optimisation level 0 (XLA_FLAGS
--xla_backend_optimization_level=0, unless XLA_FLAGS sets a level already): the tests run tiny
shapes, where LLVM's passes over the generated code cost more than the code saves (test_model's
remat and prefill tests took 41 s instead of 74 s here). The level changes how XLA's kernels are
compiled to machine code, not what XLA computes: the HLO passes, the fusions and the buffer
assignment (so every compiled memory analysis) are the same at every level. Outside the tests
XLA's default stands: the quick start's training and the benchmarks run at it."""

import os
import shutil
import tempfile

_made_here = []
MIN_CACHED_COMPILE_SECONDS = 0.25  # quicker compiles are not worth a file (JAX's default is 1 s)
LLVM_LEVEL_FLAG = "--xla_backend_optimization_level"


def pytest_configure(config):
    if "HAMJAX_TEST_CACHE" not in os.environ:
        _made_here.append(tempfile.mkdtemp(prefix="hamjax-tests-"))
        os.environ["HAMJAX_TEST_CACHE"] = _made_here[-1]
    root = os.environ["HAMJAX_TEST_CACHE"]
    os.environ["HAMJAX_CACHE"] = os.path.join(root, "hamjax")
    os.environ["HF_DATASETS_CACHE"] = os.path.join(root, "datasets")
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(root, "jax-compilation-cache")
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(MIN_CACHED_COMPILE_SECONDS)
    flags = os.environ.get("XLA_FLAGS", "")
    if LLVM_LEVEL_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {LLVM_LEVEL_FLAG}=0".strip()


def pytest_unconfigure(config):
    for root in _made_here:
        shutil.rmtree(root, ignore_errors=True)
