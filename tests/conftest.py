"""Every test process prepares corpora in its own temporary cache (hamjax.data.prepared), never in
the user's ~/.cache; subprocesses inherit it."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def prepared_corpus_cache(tmp_path_factory):
    os.environ["HAMJAX_CACHE"] = str(tmp_path_factory.mktemp("hamjax-cache"))

