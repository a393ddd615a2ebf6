"""hamjax.data: tokenizers, document loading (local files and the offline KJV default), packing with
segment ids (== a token-by-token loop), the document split and the resumable batch order
(DESIGN.md §5)."""

from __future__ import annotations

import json
import sys

import datasets
import numpy as np
import pytest

from hamjax import data
from hamjax.data import PackedRows, recall_hits, target_mask

# ------------------------------------------------------------------------------------ tokenizers


def test_byte_tokenizer_round_trips_utf8():
    tok = data.load_tokenizer("bytes")
    assert isinstance(tok, data.ByteTokenizer) and tok.vocab_size == 256 and tok.name == "bytes"
    text = "In the beginning — Mōšeh, 神, 🙂\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode_batch(["ab", ""])[0].tolist() == [97, 98]
    assert tok.decode(tok.encode("神")[:2]) == "\ufffd"  # a cut character decodes, replaced
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        tok.decode([65, 256])


def test_hf_tokenizer_without_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match="pip install transformers"):
        data.load_tokenizer("gpt2")


def test_hf_tokenizer_round_trips_and_packs(tmp_path):
    transformers = pytest.importorskip("transformers", reason="HFTokenizer needs transformers")
    tokenizers = pytest.importorskip("tokenizers", reason="building a test tokenizer needs tokenizers")
    words = ["[UNK]", "in", "the", "beginning", "god", "created", "heaven", "and", "earth"]
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, "[UNK]"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(
        tmp_path / "tok"
    )
    tok = data.load_tokenizer(str(tmp_path / "tok"))
    assert isinstance(tok, data.HFTokenizer) and tok.vocab_size == len(words)
    sentence = "in the beginning god created the heaven and the earth"
    ids = tok.encode(sentence)
    assert ids.dtype == np.int32 and ids.tolist() == [1, 2, 3, 4, 5, 2, 6, 7, 2, 8]
    assert tok.decode(ids) == sentence
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"{i}.txt").write_text((sentence + " ") * 10)
    corpus = data.prepare_corpus(str(docs), tok, seq_len=7, validation_fraction=0.25)
    assert corpus.vocab_size == len(words) and corpus.bytes_per_token > 1
    assert corpus.train.tokens.max() < len(words) and len(corpus.validation.tokens) > 0


# --------------------------------------------------------------------------------------- packing


def pack_reference(documents, row_length):
    """Token-by-token loop: fill rows of `row_length`, numbering documents within each row from 0."""
    rows, segments, row, segment = [], [], [], []
    for doc in documents:
        for j, token in enumerate(doc):
            seg = segment[-1] + (j == 0) if row else 0
            row.append(int(token))
            segment.append(seg)
            if len(row) == row_length:
                rows.append(row)
                segments.append(segment)
                row, segment = [], []
    shape = (-1, row_length)
    return np.array(rows, np.int32).reshape(shape), np.array(segments, np.int32).reshape(shape)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("row_length", [2, 3, 7, 16, 64])
def test_pack_documents_matches_token_loop(seed, row_length):
    rng = np.random.default_rng(seed)
    lengths = rng.choice([0, 1, 1, 2, 5, 9, 30, 150], size=40)
    documents = [rng.integers(0, 256, n).astype(np.int64) for n in lengths]
    packed = data.pack_documents(documents, row_length)
    tokens, segments = pack_reference(documents, row_length)
    assert packed.tokens.dtype == np.int32 and packed.segment_ids.dtype == np.int32
    np.testing.assert_array_equal(packed.tokens, tokens)
    np.testing.assert_array_equal(packed.segment_ids, segments)
    assert len(packed.tokens) == lengths.sum() // row_length  # the final partial row is dropped


def test_pack_documents_rejects_bad_arguments():
    with pytest.raises(ValueError, match="row_length"):
        data.pack_documents([np.arange(10)], 1)
    with pytest.raises(ValueError, match=r"5 tokens .*row_length=6"):
        data.pack_documents([np.arange(3), np.array([], np.int32), np.arange(2)], 6)
    with pytest.raises(ValueError, match="1-D"):
        data.pack_documents([np.zeros((2, 3), np.int32)], 2)


def test_target_mask_never_crosses_a_document_boundary():
    segment_ids = np.array([[0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 2, 2]], np.int32)
    expected = np.array([[1, 0, 1, 1, 0], [0, 0, 1, 1, 1]], bool)
    np.testing.assert_array_equal(data.target_mask(segment_ids), expected)
    packed = data.pack_documents([np.full(n, 7) for n in (3, 1, 4, 2, 6)], 4)
    # Documents start at stream positions 0, 3, 4, 8, 10: targets at those positions are not scored.
    starts = np.zeros(packed.tokens.size, bool)
    starts[[3, 4, 8, 10]] = True
    expected = ~starts.reshape(-1, 4)[:, 1:]
    np.testing.assert_array_equal(data.target_mask(packed.segment_ids), expected)


# ---------------------------------------------------------------------------------- recall hits


def recall_hits_by_brute_force(rows, segment_ids, n):
    """Target j is a hit iff it is scored, its n context tokens are in its document, and some earlier
    j' < j has the same n tokens ending at it, all in that document: loops over every pair."""
    hits = np.zeros((rows.shape[0], rows.shape[1] - 1), bool)
    for r in range(rows.shape[0]):
        doc = segment_ids[r]
        whole = lambda j: j >= n - 1 and all(doc[j - i] == doc[j + 1] for i in range(n))
        for j in range(rows.shape[1] - 1):
            if not whole(j):
                continue
            gram = list(rows[r, j - n + 1 : j + 1])
            hits[r, j] = any(whole(e) and doc[e] == doc[j] and list(rows[r, e - n + 1 : e + 1]) == gram for e in range(j))
    return hits


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_recall_hits_match_brute_force(n, seed):
    """Small vocabularies repeat n-grams often; several documents per row, one row without a boundary."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 4, size=(5, 40))
    segment_ids = np.cumsum(rng.random((5, 40)) < 0.08, axis=1)
    segment_ids[0] = 0
    hits = recall_hits(rows, segment_ids, n)
    np.testing.assert_array_equal(hits, recall_hits_by_brute_force(rows, segment_ids, n))
    assert hits.any() and not hits.all() and not (hits & ~target_mask(segment_ids)).any()


def test_recall_hits_reject_bad_arguments():
    with pytest.raises(ValueError, match="n must be a positive int"):
        recall_hits(np.zeros((1, 5), int), np.zeros((1, 5), int), 0)
    with pytest.raises(ValueError, match=r"\[N, L\], got \(1, 5\) and \(1, 4\)"):
        recall_hits(np.zeros((1, 5), int), np.zeros((1, 4), int), 2)


# ------------------------------------------------------------------------------------------ split


@pytest.mark.parametrize("n_documents", [2, 3, 10, 1189, 5000])
@pytest.mark.parametrize("fraction", [0.01, 0.02, 0.1, 0.5])
def test_split_documents_is_disjoint_covering_and_spread(n_documents, fraction):
    train, validation = data.split_documents(n_documents, fraction)
    assert len(train) >= 1 and len(validation) == max(1, round(n_documents * fraction))
    np.testing.assert_array_equal(np.sort(np.concatenate([train, validation])), np.arange(n_documents))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(validation) > 0)
    stride = n_documents / len(validation)
    assert validation[0] < stride and validation[-1] >= n_documents - stride
    assert np.all(np.diff(validation) <= stride + 1)
    again = data.split_documents(n_documents, fraction)
    np.testing.assert_array_equal(again[0], train)
    np.testing.assert_array_equal(again[1], validation)


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 0.6, 1.0])
def test_split_documents_rejects_bad_fractions(fraction):
    with pytest.raises(ValueError, match=f"validation_fraction .*{fraction!r}"):
        data.split_documents(100, fraction)


def test_split_documents_needs_two_documents():
    with pytest.raises(ValueError, match="n_documents"):
        data.split_documents(1, 0.5)


# ---------------------------------------------------------------------------------------- batches


def numbered_rows(n_rows, row_length=3):
    """Row i holds the tokens i, and segment ids -i, so a batch shows which rows it took."""
    tokens = np.repeat(np.arange(n_rows, dtype=np.int32)[:, None], row_length, axis=1)
    return PackedRows(tokens, -tokens)


def test_batch_at_visits_every_row_once_per_epoch():
    rows, batch_size, n_epochs = numbered_rows(12), 5, 5
    taken = np.concatenate([data.batch_at(rows, s, batch_size, seed=3).tokens[:, 0] for s in range(12)])
    epochs = taken.reshape(n_epochs, 12)  # 12 steps of 5 = 5 epochs of 12 rows
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(12))
    assert len({tuple(e) for e in epochs}) == n_epochs  # a fresh order each epoch


def test_batch_at_straddles_epochs_with_independent_permutations():
    rows, seed = numbered_rows(12), 7
    orders = [np.random.default_rng([seed, e]).permutation(12) for e in range(4)]
    batch = data.batch_at(rows, 2, 5, seed)  # positions 10..14: epoch 0 ends, epoch 1 starts
    np.testing.assert_array_equal(batch.tokens[:, 0], [*orders[0][10:], *orders[1][:3]])
    np.testing.assert_array_equal(batch.segment_ids, -batch.tokens)
    big = data.batch_at(rows, 1, 30, seed)  # positions 30..59 span epochs 2, 3 and 4
    np.testing.assert_array_equal(big.tokens[:18, 0], [*orders[2][6:], *orders[3]])


def test_batch_at_is_deterministic_and_resumable():
    rows = numbered_rows(50)
    run = [data.batch_at(rows, s, 8, seed=1).tokens for s in range(20)]
    data.batches._permutation.cache_clear()  # a restarted process has no cache
    for step in (0, 6, 19):
        np.testing.assert_array_equal(data.batch_at(rows, step, 8, seed=1).tokens, run[step])
    other = [data.batch_at(rows, s, 8, seed=2).tokens for s in range(20)]
    assert not np.array_equal(np.concatenate(run), np.concatenate(other))


def test_batch_at_rejects_bad_arguments():
    rows = numbered_rows(4)
    with pytest.raises(ValueError, match="step"):
        data.batch_at(rows, -1, 2, 0)
    with pytest.raises(ValueError, match="batch_size"):
        data.batch_at(rows, 0, 0, 0)
    with pytest.raises(ValueError, match="seed"):
        data.batch_at(rows, 0, 2, -1)


def test_sequential_indices_cover_all_rows_once_in_order():
    batches = list(data.sequential_indices(10, 4))
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(b) for b in data.sequential_indices(10, 5)] == [5, 5]
    with pytest.raises(ValueError, match="batch_size"):
        data.sequential_indices(10, 0)

# -------------------------------------------------------------------------------------- documents


def test_load_documents_from_a_text_file(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("Première ligne\nsecond line\n\n  third\n", encoding="utf-8")
    docs = data.load_documents(str(path))
    assert docs.column_names == ["text"]
    assert docs["text"][:] == ["Première ligne\nsecond line\n\n  third\n"]


def test_load_documents_from_a_directory_of_mixed_files(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "b1", "id": 1}\n{"text": "b2", "id": 2}\n')
    (tmp_path / "a.txt").write_text("a whole file")
    (tmp_path / "d.txt").write_text("d")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "c1"}, {"text": "c2"}]))
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.txt").write_text("ignored: not directly in the directory")
    docs = data.load_documents(str(tmp_path))
    assert docs.column_names == ["text"]
    assert docs["text"][:] == ["a whole file", "b1", "b2", "c1", "c2", "d"]


def test_load_documents_json_text_field(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"body": "first", "title": "x"}\n{"body": "second", "title": "y"}\n')
    docs = data.load_documents(str(path), text_field="body")
    assert docs.column_names == ["text"] and docs["text"][:] == ["first", "second"]
    with pytest.raises(ValueError, match=r"'text'.*records\.jsonl.*\['body', 'title'\]"):
        data.load_documents(str(path))


@pytest.mark.parametrize("source", ["no/such/dir", "./missing", "/abs/missing", "missing.txt", "a.jsonl"])
def test_load_documents_missing_path(source):
    with pytest.raises(FileNotFoundError, match=f"data source not found: {source}"):
        data.load_documents(source)


def test_load_documents_rejects_sources_without_text(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no text"):
        data.load_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "only.md").write_text("markdown")
    with pytest.raises(ValueError, match="unsupported"):
        data.load_documents(str(tmp_path / "only.md"))
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        data.load_documents(str(tmp_path / "sub"))


def test_load_documents_hub_name(monkeypatch):
    def fake_hub(name, split):
        if name != "someone/stories":
            raise ConnectionError(f"Couldn't reach '{name}' on the Hub\nmore detail")
        return datasets.Dataset.from_dict({"story": ["once", "upon"], "id": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    assert data.load_documents("someone/stories", text_field="story")["text"][:] == ["once", "upon"]
    with pytest.raises(ValueError, match=r"'offline_name' is neither a local path nor a reachable"):
        data.load_documents("offline_name")


# -------------------------------------------------------------------------------------------- kjv


@pytest.fixture(scope="module")
def kjv_documents():
    return data.load_documents(data.DEFAULT_CORPUS)["text"][:]


def test_kjv_has_one_document_per_chapter(kjv_documents):
    assert data.kjv_path().is_file()
    assert len(kjv_documents) == 1189
    assert kjv_documents[0].startswith("In the beginning God created the heaven and the earth.\nAnd the")
    assert kjv_documents[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert 4_100_000 < sum(map(len, kjv_documents)) < 4_200_000


def test_prepare_corpus_on_kjv_with_bytes(kjv_documents):
    corpus = data.prepare_corpus("kjv", data.ByteTokenizer(), seq_len=512, validation_fraction=0.02)
    assert corpus.bytes_per_token == 1.0 and corpus.vocab_size == 256
    for split in (corpus.train, corpus.validation):
        assert split.tokens.shape[1] == split.segment_ids.shape[1] == 513 and len(split.tokens) > 0
        assert split.tokens.min() >= 0 and split.tokens.max() < 256
    n_bytes = sum(len(doc.encode("utf-8")) for doc in kjv_documents)
    n_rows = len(corpus.train.tokens) + len(corpus.validation.tokens)
    assert n_bytes // 513 - 2 <= n_rows <= n_bytes // 513  # each split drops less than a row
    tok = data.ByteTokenizer()
    train_index, validation_index = data.split_documents(len(kjv_documents), 0.02)
    assert tok.decode(corpus.train.tokens[0]) == kjv_documents[train_index[0]].encode()[:513].decode()
    first_validation = kjv_documents[validation_index[0]]
    assert tok.decode(corpus.validation.tokens[0]).startswith(first_validation[:400])
    assert first_validation[:400] not in tok.decode(corpus.train.tokens.ravel())


def test_prepare_corpus_checks_its_arguments(tmp_path):
    for i in range(20):
        (tmp_path / f"{i:02d}.txt").write_text("x" * 100)
    with pytest.raises(ValueError, match="seq_len"):
        data.prepare_corpus(str(tmp_path), data.ByteTokenizer(), seq_len=0, validation_fraction=0.1)
    with pytest.raises(ValueError, match=r"validation split has 200 tokens.*larger validation_fraction"):
        data.prepare_corpus(str(tmp_path), data.ByteTokenizer(), seq_len=300, validation_fraction=0.1)
