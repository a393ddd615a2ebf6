"""A corpus prepared once on disk and read back as memory maps, so that a training process holds only
the rows it reads, whatever the corpus's size.

Preparing: documents through `datasets` (`load_documents`), split by document, tokenized with
`Dataset.map` (batched; in parallel processes on request) into Arrow files, then packed
(exactly as `pack_documents` packs the whole list) into rows of seq_len + 1 tokens written as NumPy
.npy files: fixed-size int32 rows, which a memory map reads by row number with no decoding. The
folder is named by a fingerprint of everything the rows depend on (the source's files, their sizes
and modification times, text_field, the tokenizer, seq_len, validation_fraction), so a second run
reuses it and a change rebuilds it. A folder is complete once its meta.json exists: it is built
under another name and renamed into place.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import shutil
from typing import NamedTuple

import datasets
import numpy as np
import pyarrow.compute as pc
from tqdm.auto import tqdm

from hamjax.data.corpus import DEFAULT_CORPUS, kjv_path, load_documents, local_files
from hamjax.data.packing import PackedRows, RowPacker, split_documents
from hamjax.data.tokenizers import Tokenizer
from hamjax.ops.validation import check_positive_int

FORMAT_VERSION = 1
BATCH_DOCUMENTS = 32  # documents per batch through tokenization, its Arrow writer and packing
SPLITS = ("train", "validation")
TOKENIZED = datasets.Features({"tokens": datasets.Sequence(datasets.Value("int32")), "bytes": datasets.Value("int64")})


class Corpus(NamedTuple):
    """Packed train and validation rows [N, seq_len + 1], split by document (train None when the
    training rows are streamed: hamjax.data.streaming)."""

    train: PackedRows | None
    validation: PackedRows
    bytes_per_token: float  # UTF-8 bytes / tokens over all documents: converts nats/token to bits/byte
    vocab_size: int


def default_cache_dir() -> pathlib.Path:
    """$HAMJAX_CACHE/prepared, or ~/.cache/hamjax/prepared."""
    root = os.environ.get("HAMJAX_CACHE") or pathlib.Path.home() / ".cache" / "hamjax"
    return pathlib.Path(root) / "prepared"


def source_identity(source: str) -> list:
    """What identifies the source's content: [path, size, mtime_ns] of each local file (the embedded
    corpus's file for "kjv"), or the hub dataset's name."""
    path = pathlib.Path(source).expanduser()
    if source == DEFAULT_CORPUS:
        files = [kjv_path()]
    elif path.exists():
        files = local_files(path)
    else:
        return [source]
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def fingerprint(source: str, text_field: str, tokenizer: str, seq_len: int, validation_fraction: float) -> str:
    """16 hex digits naming the prepared folder of these settings."""
    settings = dict(
        format=FORMAT_VERSION, source=source_identity(source), text_field=text_field, tokenizer=tokenizer,
        seq_len=seq_len, validation_fraction=validation_fraction,
    )
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def prepared_folder(
    source: str, tokenizer: str, *, seq_len: int, validation_fraction: float, text_field: str = "text",
    cache_dir: str | pathlib.Path | None = None,
) -> pathlib.Path:
    """Where `prepare_corpus` keeps the corpus of these settings (tokenizer: its name)."""
    name = fingerprint(source, text_field, tokenizer, seq_len, validation_fraction)
    return pathlib.Path(cache_dir or default_cache_dir()) / name


def prepare_corpus(
    source: str, tokenizer: Tokenizer, *, seq_len: int, validation_fraction: float, text_field: str = "text",
    cache_dir: str | pathlib.Path | None = None, progress: bool = False, processes: int | None = None,
) -> Corpus:
    """`source` (see `load_documents`) split by document, tokenized and packed into rows of
    seq_len + 1 tokens (inputs row[:, :-1], targets row[:, 1:]), prepared under cache_dir (default
    `default_cache_dir()`) unless already there -> Corpus whose rows are read-only memory maps.
    processes: tokenize in that many forked processes (None or 1: in this one). Forking a process whose
    JAX runtime has started can deadlock, so training prepares in one process and `hamjax prepare`,
    which starts no runtime, in several."""
    check_positive_int("seq_len", seq_len)
    folder = prepared_folder(source, tokenizer.name, seq_len=seq_len, validation_fraction=validation_fraction,
                             text_field=text_field, cache_dir=cache_dir)
    if not (folder / "meta.json").exists():
        _build(folder, source, tokenizer, seq_len, validation_fraction, text_field, progress, processes)
    return open_prepared(folder)


def open_prepared(folder: str | pathlib.Path) -> Corpus:
    """A prepared folder -> Corpus of memory-mapped rows."""
    folder = pathlib.Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    rows = {
        split: PackedRows(*(np.load(folder / f"{split}.{part}.npy", mmap_mode="r") for part in ("tokens", "segment_ids")))
        for split in SPLITS
    }
    return Corpus(rows["train"], rows["validation"], meta["bytes"] / meta["tokens"], meta["vocab_size"])


def _build(folder, source, tokenizer, seq_len, validation_fraction, text_field, progress, processes) -> None:
    documents = load_documents(source, text_field)
    work = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    meta = {"source": source, "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "seq_len": seq_len,
            "validation_fraction": validation_fraction, "bytes": 0, "tokens": 0}
    forks = processes if processes and processes > 1 else None  # datasets forks even for num_proc=1
    try:
        for split, index in zip(SPLITS, split_documents(len(documents), validation_fraction)):
            tokenized = documents.select(index).map(
                functools.partial(_encode, tokenizer), batched=True, batch_size=BATCH_DOCUMENTS,
                writer_batch_size=BATCH_DOCUMENTS, remove_columns=["text"], features=TOKENIZED,
                cache_file_name=str(work / f"{split}.arrow"),
                new_fingerprint=f"{folder.name}-{split}", num_proc=forks if len(index) > 1 else None,
                desc=f"tokenizing the {split} split",
            )
            meta["bytes"] += int(pc.sum(tokenized.data.column("bytes")).as_py() or 0)
            meta[f"{split}_rows"], tokens = _write_rows(tokenized, seq_len + 1, work / split, split, progress)
            meta["tokens"] += tokens
            tokenized.cleanup_cache_files()
        (work / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        work.rename(folder)
    except OSError:
        if not (folder / "meta.json").exists():
            raise
        # another process prepared the same folder first
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _encode(tokenizer: Tokenizer, batch: dict) -> dict:
    texts = batch["text"]
    return {"tokens": tokenizer.encode_batch(texts), "bytes": [len(text.encode("utf-8")) for text in texts]}


def _write_rows(tokenized: datasets.Dataset, row_length: int, prefix: pathlib.Path, split: str, progress: bool):
    """The documents packed by a RowPacker (as `pack_documents`; the final partial row dropped)
    into <prefix>.tokens.npy and <prefix>.segment_ids.npy [N, row_length] int32, one batch of
    documents at a time. Returns (N, tokens in all documents)."""
    total = int(pc.sum(pc.list_value_length(tokenized.data.column("tokens"))).as_py() or 0)
    n_rows = total // row_length
    if n_rows == 0:
        raise ValueError(
            f"the {split} split has {total} tokens, fewer than one row of seq_len + 1 = {row_length}: "
            f"use a larger validation_fraction or a smaller seq_len"
        )
    open_rows = lambda part: np.lib.format.open_memmap(f"{prefix}.{part}.npy", "w+", np.int32, (n_rows, row_length))
    tokens_out, segments_out = open_rows("tokens"), open_rows("segment_ids")
    packer, row = RowPacker(row_length), 0
    bar = tqdm(total=n_rows, unit="row", desc=f"packing the {split} split", disable=not progress)
    for batch in tokenized.with_format("arrow").iter(batch_size=BATCH_DOCUMENTS):
        column = batch.column("tokens").combine_chunks()
        packer.add(column.flatten().to_numpy(zero_copy_only=False),
                   pc.list_value_length(column).to_numpy(zero_copy_only=False))
        rows = packer.take(min(packer.full_rows(), n_rows - row))
        tokens_out[row:row + len(rows.tokens)], segments_out[row:row + len(rows.tokens)] = rows
        row += len(rows.tokens)
        bar.update(len(rows.tokens))
    bar.close()
    tokens_out.flush()
    segments_out.flush()
    return n_rows, total
