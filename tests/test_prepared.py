"""hamjax.data.prepared and `hamjax prepare`: a corpus tokenized and packed once on disk equals
packing the whole list in memory, is reused while its settings stay and rebuilt when they change,
and is prepared and read within a memory limit that the in-memory path exceeds."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hamjax import data
from hamjax.cli.main import main
from hamjax.data import prepared


def write_corpus(folder: pathlib.Path, n_files: int, seed: int = 0, words_per_file=(0, 300)) -> pathlib.Path:
    """n_files .txt documents of random words (some empty, some multi-byte), one per file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = np.array(["alpha", "beta", "gamma", "and", "the", "of", "naïve", "λx", "rows"])
    for i in range(n_files):
        n = int(rng.integers(*words_per_file))
        (folder / f"doc{i:04d}.txt").write_text(" ".join(words[rng.integers(0, len(words), n)]))
    return folder


def in_memory(source: str, tokenizer, seq_len: int, validation_fraction: float):
    """What preparing must equal: every document in memory, split, tokenized and packed at once."""
    texts = data.load_documents(source)["text"][:]
    train_index, validation_index = data.split_documents(len(texts), validation_fraction)
    tokens = tokenizer.encode_batch(texts)
    pack = lambda index: data.pack_documents([tokens[i] for i in index], seq_len + 1)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return pack(train_index), pack(validation_index), n_bytes / sum(len(t) for t in tokens)


PREPARE_IN_PROCESSES = textwrap.dedent("""
    import sys
    from hamjax import data
    from hamjax.data import prepared

    prepared.BATCH_DOCUMENTS = 3
    prepared.prepare_corpus(sys.argv[1], data.ByteTokenizer(), seq_len=63, validation_fraction=0.2,
                            cache_dir=sys.argv[2], processes=2)
""")


@pytest.mark.parametrize("parallel", [False, True], ids=["one-process", "two-processes"])
def test_prepared_rows_equal_packing_every_document_at_once(tmp_path, monkeypatch, parallel):
    """Batches of 3 documents (rows straddle the batches, empty documents included), tokenized in
    this process or in two forked ones (from a process whose JAX runtime has not started, as
    `hamjax prepare`): the rows, segment ids and bytes per token equal the in-memory packing
    exactly, and come back as read-only memory maps."""
    source = str(write_corpus(tmp_path / "corpus", 40))
    monkeypatch.setattr(prepared, "BATCH_DOCUMENTS", 3)
    if parallel:
        subprocess.run([sys.executable, "-c", PREPARE_IN_PROCESSES, source, str(tmp_path / "cache")], check=True,
                       capture_output=True, timeout=300)
        monkeypatch.setattr(prepared, "_build", None)  # the folder must be there already
    corpus = prepared.prepare_corpus(source, data.ByteTokenizer(), seq_len=63, validation_fraction=0.2,
                                     cache_dir=tmp_path / "cache")
    train, validation, bytes_per_token = in_memory(source, data.ByteTokenizer(), 63, 0.2)
    for actual, expected in ((corpus.train, train), (corpus.validation, validation)):
        for a, e in zip(actual, expected):
            assert isinstance(a, np.memmap) and not a.flags.writeable
            assert a.dtype == e.dtype == np.int32 and a.shape == e.shape
            np.testing.assert_array_equal(a, e)
    assert corpus.bytes_per_token == bytes_per_token and corpus.vocab_size == 256
    assert corpus.train.segment_ids.max() > 0  # rows hold several documents


def test_the_prepared_folder_is_reused_and_rebuilt_when_its_settings_change(tmp_path, monkeypatch):
    source = write_corpus(tmp_path / "corpus", 12)
    cache = tmp_path / "cache"
    prepare = lambda tokenizer=data.ByteTokenizer(), seq_len=31: prepared.prepare_corpus(
        str(source), tokenizer, seq_len=seq_len, validation_fraction=0.25, cache_dir=cache)
    first = prepare()
    folders = lambda: sorted(p.name for p in cache.iterdir())
    (name,) = folders()
    built = []
    real_build = prepared._build
    monkeypatch.setattr(prepared, "_build", lambda *args: built.append(args[0].name) or real_build(*args))
    again = prepare()
    assert built == [] and folders() == [name]
    np.testing.assert_array_equal(again.train.tokens, first.train.tokens)

    class OtherBytes(data.ByteTokenizer):
        name = "other-bytes"

    prepare(seq_len=15)
    prepare(tokenizer=OtherBytes())
    os.utime(source / "doc0003.txt", ns=(0, 0))  # an edited source file
    prepare()
    assert len(built) == 3 and len(set(folders())) == 4 and name in folders()
    assert not [p for p in cache.iterdir() if "partial" in p.name]


LOADER = textwrap.dedent("""
    import re, resource, sys
    import numpy as np
    from hamjax import data
    from hamjax.data import prepared

    def vm_data():
        return int(re.search(r"VmData:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    source, cache, path, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    tokenizer = data.ByteTokenizer()
    limit = vm_data() + budget  # private memory this process may still take (shared file maps do not count)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:
        if path == "prepared":
            corpus = prepared.prepare_corpus(source, tokenizer, seq_len=256, validation_fraction=0.02, cache_dir=cache)
            rows = corpus.train.tokens
            for step in range(20):
                rows[data.batch_indices(len(rows), step, 16, seed=0)].sum()
        else:
            texts = data.load_documents(source)["text"][:]
            rows = data.pack_documents(tokenizer.encode_batch(texts), 257).tokens
        print("rows", len(rows))
    except MemoryError:
        print("MemoryError")
""")


def test_preparing_and_reading_stay_within_a_memory_limit_the_in_memory_path_exceeds(tmp_path):
    """80 MB of text in 400 files: 256 MiB of private memory beyond what the process holds after its
    imports. Packing in memory needs the text, its int32 tokens (4 bytes per byte) and their rows."""
    source = write_corpus(tmp_path / "corpus", 400, words_per_file=(20_000, 60_000))
    budget = str(256 * 2**20)
    run = lambda path: subprocess.run(
        [sys.executable, "-c", LOADER, str(source), str(tmp_path / "cache"), path, budget],
        capture_output=True, text=True, timeout=600,
    )
    in_memory_run = run("in-memory")
    assert in_memory_run.stdout.split() == ["MemoryError"], in_memory_run.stderr[-2000:]
    prepared_run = run("prepared")
    assert prepared_run.returncode == 0 and prepared_run.stdout.split()[0] == "rows", prepared_run.stderr[-2000:]
    assert int(prepared_run.stdout.split()[1]) > 250_000  # the whole corpus, 257 tokens a row


def test_prepare_command_prepares_once_and_names_the_folder(tmp_path, capsys):
    source = write_corpus(tmp_path / "corpus", 12)
    argv = ["prepare", "--preset", "tiny", "--source", str(source), "--validation_fraction", "0.25",
            "--cache_dir", str(tmp_path / "cache"), "--quiet", "--processes", "1"]  # no fork: this process runs JAX
    assert main(argv) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    (folder,) = (tmp_path / "cache").iterdir()
    assert str(folder) in first and "prepared" in first
    assert main(argv) == 0
    assert "already prepared" in capsys.readouterr().out
