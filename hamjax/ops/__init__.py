"""Pure JAX functions: everything a user composes into their own model. No Flax here."""

from hamjax.ops.delta_rule import (
    DeltaRuleResult,
    gated_delta_rule,
    gated_delta_rule_step,
    gated_delta_rule_with_errors,
)

__all__ = [
    "DeltaRuleResult",
    "gated_delta_rule",
    "gated_delta_rule_step",
    "gated_delta_rule_with_errors",
]
