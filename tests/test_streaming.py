"""hamjax.data.streaming and `hamjax train --streaming`: a stream's rows are the packing of its split's
documents in order, its state resumes it exactly (across the end of an epoch too), two processes
stream disjoint documents, and a streamed run resumed from a checkpoint equals one run straight
through, bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hamjax import data
from hamjax.data import streaming
from test_prepared import write_corpus
from test_train import assert_trees_equal, checkpoint_state, records, run_config, stop_after

FRACTION = 0.2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(write_corpus(tmp_path_factory.mktemp("stream") / "corpus", 30, seed=1))


def split_texts(source, split):
    texts = data.load_documents(source)["text"][:]
    return [t for t in texts if streaming.is_validation(t, FRACTION) == (split == "validation")]


def stream(source, split="train", **kwargs):
    return data.RowStream(data.stream_documents(source), data.ByteTokenizer(), 33, split=split,
                          validation_fraction=FRACTION, **kwargs)


def rows_of(stream_, counts):
    parts = [stream_.next_rows(n) for n in counts]
    return data.PackedRows(*(np.concatenate(p) for p in zip(*parts)))


def test_stream_rows_are_the_packing_of_the_split_in_order(corpus):
    tokenizer = data.ByteTokenizer()
    for split in ("train", "validation"):
        expected = data.pack_documents(tokenizer.encode_batch(split_texts(corpus, split)), 33)
        n = len(expected.tokens)
        actual = rows_of(stream(corpus, split), [1, 3, n - 4])
        for a, e in zip(actual, expected):
            assert a.dtype == np.int32
            np.testing.assert_array_equal(a, e)
    assert 0 < len(split_texts(corpus, "validation")) < len(split_texts(corpus, "train"))


def test_a_stream_resumes_exactly_from_its_state(corpus):
    """Rows taken in uneven pieces past the end of the first epoch; the state after every piece,
    through JSON, starts a stream whose next rows are the ones that followed."""
    n = len(data.pack_documents(data.ByteTokenizer().encode_batch(split_texts(corpus, "train")), 33).tokens)
    counts = [5, n - 7, 4, 6, n]
    straight = rows_of(stream(corpus), counts)
    resumed = stream(corpus)
    pieces = []
    for count in counts:
        pieces.append(resumed.next_rows(count))
        resumed = stream(corpus, state=json.loads(json.dumps(resumed.state())))
    joined = data.PackedRows(*(np.concatenate(p) for p in zip(*pieces)))
    for a, e in zip(joined, straight):
        np.testing.assert_array_equal(a, e)
    assert resumed.epoch >= 1  # the pieces crossed into the second epoch


def test_two_processes_stream_disjoint_documents_that_make_up_the_split(corpus):
    parts = [[d["text"] for d in stream(corpus, rank=rank, processes=2).documents] for rank in (0, 1)]
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(data.load_documents(corpus)["text"][:])


def test_an_empty_split_is_named(tmp_path):
    source = str(write_corpus(tmp_path / "corpus", 3, seed=2))
    with pytest.raises(ValueError, match="validation split of the stream has fewer than 1 rows"):
        data.RowStream(data.stream_documents(source), data.ByteTokenizer(), 33, split="validation",
                       validation_fraction=1e-9).next_rows(1)


STREAM_FLAGS = ["--streaming", "--eval_batches", "2", "--validation_fraction", str(FRACTION)]


def test_a_streamed_run_resumed_from_a_checkpoint_equals_one_run_straight_through(corpus, tmp_path, monkeypatch):
    from hamjax.train import train

    straight = run_config(tmp_path / "straight", "--source", corpus, *STREAM_FLAGS)
    resumed = run_config(tmp_path / "resumed", "--source", corpus, *STREAM_FLAGS)
    assert train(straight, progress=False).status == "finished"
    stop_after(monkeypatch, 13)
    assert train(resumed, progress=False).status == "interrupted"
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "resumed" / "stream").iterdir()) == ["step_00000010.process_0.json",
                                                                                  "step_00000013.process_0.json"]
    assert train(resumed, progress=False).status == "finished"
    a, b = checkpoint_state(tmp_path / "straight"), checkpoint_state(tmp_path / "resumed")
    assert a[0] == b[0]
    assert_trees_equal(b[1], a[1], "model")
    assert_trees_equal(b[2], a[2], "optimizer")
    compared = lambda run: [(r["step"], r["loss"], r["kv_fraction"]) for r in records(run)]
    assert compared(tmp_path / "resumed") == compared(tmp_path / "straight")


def test_streaming_needs_eval_batches(tmp_path, corpus):
    with pytest.raises(ValueError, match="eval_batches"):
        run_config(tmp_path / "run", "--source", corpus, "--streaming", "--eval_batches", "0")
