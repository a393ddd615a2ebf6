"""Documents streamed from a source too large to prepare (`datasets` streaming), packed into rows as
they arrive, with the state that resumes the stream exactly where a checkpoint left it.

Each process streams its own part of the documents (`split_dataset_by_node`: whole shards where
the process count divides them, every n-th document otherwise) and builds the rows of its own
devices' batch pieces. A document belongs to the validation split when a hash of its text falls
below validation_fraction, which needs no document count and gives every process the same split.
The stream is read in its order (no shuffling: a shuffle buffer is not part of the resumable state);
at its end it starts over (the next epoch).
"""

from __future__ import annotations

import hashlib
import pathlib

import datasets
import numpy as np
from datasets.distributed import split_dataset_by_node

from hamjax.data.corpus import DEFAULT_CORPUS, load_documents
from hamjax.data.packing import PackedRows, RowPacker
from hamjax.data.prepared import Corpus
from hamjax.data.tokenizers import Tokenizer

MAX_SHARDS = 256  # shards of a local source streamed from its Arrow table


def stream_documents(source: str, text_field: str = "text") -> datasets.IterableDataset:
    """A hub dataset's "train" split streamed (nothing downloaded ahead), or the documents of "kjv"
    or a local path (`load_documents`: memory-mapped Arrow) as a stream in shards -> an
    IterableDataset with the column "text"."""
    if source == DEFAULT_CORPUS or pathlib.Path(source).expanduser().exists():
        documents = load_documents(source, text_field)
        return documents.to_iterable_dataset(num_shards=min(len(documents), MAX_SHARDS))
    try:
        stream = datasets.load_dataset(source, split="train", streaming=True)
    except Exception as err:
        reason = (str(err).splitlines() or [""])[0]
        raise ValueError(f"cannot stream data source {source!r} ({type(err).__name__}: {reason})") from err
    if text_field not in (stream.column_names or [text_field]):
        raise ValueError(f"text_field {text_field!r} not found in hub dataset {source!r}; columns: {stream.column_names}")
    return stream.select_columns([text_field]).rename_column(text_field, "text") if text_field != "text" else stream


def is_validation(text: str, validation_fraction: float) -> bool:
    """Whether a document is held out: the first 8 bytes of its text's BLAKE2b hash, as a fraction
    of 2^64, fall below validation_fraction."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < validation_fraction * 2.0**64


class RowStream:
    """Rows of row_length tokens packed (as `pack_documents`) from the documents of one split of a
    stream, this process's part of it (process `rank` of `processes`; `documents` iterates them,
    both splits). state() after next_rows() resumes exactly there: RowStream(..., state=that)
    yields the rows that would have come next."""

    def __init__(
        self, documents: datasets.IterableDataset, tokenizer: Tokenizer, row_length: int, *, split: str,
        validation_fraction: float, rank: int = 0, processes: int = 1, state: dict | None = None,
    ):
        self.source, self.rank, self.processes = documents, rank, processes
        # The split is taken here rather than by IterableDataset.filter, whose state does not resume exactly.
        self.held_out, self.validation_fraction = split == "validation", validation_fraction
        self.tokenizer, self.split = tokenizer, split
        self.packer = RowPacker(row_length)
        self.epoch, self.bytes, self.tokens = 0, 0, 0
        if state is not None:
            self.packer.load_state(state["packer"])
            self.epoch = state["epoch"]
        self._start_pass(None if state is None else state["documents"])

    def _start_pass(self, position: dict | None = None) -> None:
        """A pass over this process's documents from their start, or from `position` (a state_dict of
        this pass). Each pass iterates a new dataset object: a state_dict taken during a second
        iteration of one object does not resume exactly."""
        self.documents = split_dataset_by_node(self.source, rank=self.rank, world_size=self.processes)
        if position is not None:
            self.documents.load_state_dict(position)
        self._documents = iter(self.documents)

    def next_rows(self, n: int) -> PackedRows:
        """The next n rows [n, row_length] int32 (at the stream's end it starts over); ValueError if
        a whole pass over the split finds no token."""
        tokens_this_pass = None  # counted from the first pass that starts here
        while self.packer.full_rows() < n:
            try:
                text = next(self._documents)["text"]
            except StopIteration:
                if tokens_this_pass == 0:
                    raise ValueError(f"the {self.split} split of the stream has fewer than {n} rows of "
                                     f"{self.packer.row_length} tokens: use a larger validation_fraction or a "
                                     "smaller seq_len") from None
                self.epoch += 1
                self._start_pass()
                tokens_this_pass = 0
                continue
            if is_validation(text, self.validation_fraction) != self.held_out:
                continue
            tokens = self.tokenizer.encode(text)
            tokens_this_pass = None if tokens_this_pass is None else tokens_this_pass + len(tokens)
            self.bytes, self.tokens = self.bytes + len(text.encode("utf-8")), self.tokens + len(tokens)
            self.packer.add(tokens, np.array([len(tokens)]))
        return self.packer.take(n)

    def state(self) -> dict:
        """JSON-serialisable: the stream's position, the packer's carried tokens and the epoch."""
        return {"documents": self.documents.state_dict(), "packer": self.packer.state(), "epoch": self.epoch}


def streamed_corpus(
    source: str, tokenizer: Tokenizer, *, seq_len: int, validation_fraction: float, validation_rows: int,
    text_field: str = "text",
) -> Corpus:
    """The validation rows of a streamed corpus: the first validation_rows rows of its validation
    split (the same in every process) -> Corpus with train None (each process streams its own
    training rows with a RowStream) and bytes per token measured over the validation documents read."""
    stream = RowStream(stream_documents(source, text_field), tokenizer, seq_len + 1, split="validation",
                       validation_fraction=validation_fraction)
    validation = stream.next_rows(validation_rows)
    return Corpus(None, validation, stream.bytes / stream.tokens, tokenizer.vocab_size)
