"""Decoding: prompts of different lengths, prefill, a compiled decode loop, sampling, cache policies."""

from hamjax.generate.generation import (
    PROMPT_BUCKET,
    CachePolicy,
    DecodeSettings,
    Generation,
    continue_generation,
    decode,
    generate,
    pad_prompts,
    prefill,
    start_cache,
)
from hamjax.generate.memory import LayerMemory, cache_memory, kv_entry_bytes
from hamjax.generate.sampling import SamplingConfig, filter_logits, sample

__all__ = [
    "PROMPT_BUCKET",
    "CachePolicy",
    "DecodeSettings",
    "Generation",
    "LayerMemory",
    "SamplingConfig",
    "cache_memory",
    "continue_generation",
    "decode",
    "filter_logits",
    "generate",
    "kv_entry_bytes",
    "pad_prompts",
    "prefill",
    "sample",
    "start_cache",
]
