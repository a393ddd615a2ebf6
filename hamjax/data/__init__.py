"""Text data: tokenizers (bytes by default), documents through Hugging Face `datasets`, packing into
rows with segment ids, corpora prepared once on disk and read as memory maps or streamed, and
deterministic resumable batches; the synthetic recall tasks MQAR and pass-key
retrieval, with their metric."""

from hamjax.data.batches import batch_at, batch_indices, sequential_indices
from hamjax.data.corpus import DEFAULT_CORPUS, kjv_path, load_documents
from hamjax.data.mqar import MQARConfig, mqar_batch
from hamjax.data.needle import needle_batch
from hamjax.data.packing import PackedRows, pack_documents, split_documents, target_mask
from hamjax.data.prepared import Corpus, default_cache_dir, open_prepared, prepare_corpus
from hamjax.data.recall import IGNORE_INDEX, recall_accuracy, recall_hits
from hamjax.data.streaming import RowStream, stream_documents, streamed_corpus
from hamjax.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "DEFAULT_CORPUS",
    "ByteTokenizer",
    "Corpus",
    "HFTokenizer",
    "IGNORE_INDEX",
    "MQARConfig",
    "PackedRows",
    "RowStream",
    "Tokenizer",
    "batch_at",
    "batch_indices",
    "default_cache_dir",
    "kjv_path",
    "load_documents",
    "load_tokenizer",
    "mqar_batch",
    "needle_batch",
    "open_prepared",
    "pack_documents",
    "prepare_corpus",
    "recall_accuracy",
    "recall_hits",
    "sequential_indices",
    "split_documents",
    "stream_documents",
    "streamed_corpus",
    "target_mask",
]
