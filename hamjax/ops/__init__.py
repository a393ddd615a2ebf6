"""Pure JAX functions: everything a user composes into their own model. No Flax here."""

from hamjax.ops.attention import attend
from hamjax.ops.blockwise_attention import blockwise_attend
from hamjax.ops.delta_rule import (
    DeltaRuleResult,
    gated_delta_rule,
    gated_delta_rule_step,
    gated_delta_rule_with_errors,
)
from hamjax.ops.ham import HamOutput, HamState, ham_sequence, ham_step, init_ham_state
from hamjax.ops.kv_cache import KVCache, append_tokens, init_kv_cache, insert_evicting
from hamjax.ops.rope import apply_rope
from hamjax.ops.routed_attention import dense_routed_attention
from hamjax.ops.routing import (
    ThresholdConfig,
    ThresholdState,
    admit,
    init_threshold,
    kv_fraction,
    surprise_scores,
    update_threshold,
)
from hamjax.ops.segments import segment_starts

__all__ = [
    "DeltaRuleResult",
    "HamOutput",
    "HamState",
    "KVCache",
    "ThresholdConfig",
    "ThresholdState",
    "admit",
    "append_tokens",
    "apply_rope",
    "attend",
    "blockwise_attend",
    "dense_routed_attention",
    "gated_delta_rule",
    "gated_delta_rule_step",
    "gated_delta_rule_with_errors",
    "ham_sequence",
    "ham_step",
    "init_ham_state",
    "init_kv_cache",
    "init_threshold",
    "insert_evicting",
    "kv_fraction",
    "segment_starts",
    "surprise_scores",
    "update_threshold",
]
