"""The tests keep what they prepare out of the user's caches: corpora that hamjax prepares
(HAMJAX_CACHE) and the Arrow files `datasets` writes for the files it loads (HF_DATASETS_CACHE) go
to one temporary folder for the session. It is set before the test modules are collected, since
`datasets` reads its cache location when imported; pytest-xdist's workers and every subprocess
inherit it, and the process that made it removes it at the end."""

import os
import shutil
import tempfile

_made_here = []


def pytest_configure(config):
    if "HAMJAX_TEST_CACHE" not in os.environ:
        _made_here.append(tempfile.mkdtemp(prefix="hamjax-tests-"))
        os.environ["HAMJAX_TEST_CACHE"] = _made_here[-1]
    root = os.environ["HAMJAX_TEST_CACHE"]
    os.environ["HAMJAX_CACHE"] = os.path.join(root, "hamjax")
    os.environ["HF_DATASETS_CACHE"] = os.path.join(root, "datasets")


def pytest_unconfigure(config):
    for root in _made_here:
        shutil.rmtree(root, ignore_errors=True)
