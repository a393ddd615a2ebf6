"""Text data: tokenizers (bytes by default), documents through Hugging Face `datasets`, packing into
rows with segment ids, and deterministic resumable batches."""

from hamjax.data.batches import Corpus, batch_at, prepare_corpus, sequential_batches
from hamjax.data.corpus import DEFAULT_CORPUS, kjv_path, load_documents
from hamjax.data.packing import PackedRows, pack_documents, split_documents, target_mask
from hamjax.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "DEFAULT_CORPUS",
    "ByteTokenizer",
    "Corpus",
    "HFTokenizer",
    "PackedRows",
    "Tokenizer",
    "batch_at",
    "kjv_path",
    "load_documents",
    "load_tokenizer",
    "pack_documents",
    "prepare_corpus",
    "sequential_batches",
    "split_documents",
    "target_mask",
]
