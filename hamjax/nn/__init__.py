"""Flax NNX modules that own parameters and call hamjax.ops."""

from hamjax.nn.attention import Attention
from hamjax.nn.conv import ShortConv, causal_conv, causal_conv_step
from hamjax.nn.gdn import GatedDeltaNet, GDNCache
from hamjax.nn.ham import HAM, HAMCache, LearnedRouter, Threshold
from hamjax.nn.mixer import MixerStats
from hamjax.nn.mlp import SwiGLU
from hamjax.nn.model import MIXERS, Block, LanguageModel, ModelCache, ModelConfig, ModelStats
from hamjax.nn.norm import RMSNorm
from hamjax.nn.projections import DeltaInputs, DeltaProjections
from hamjax.nn.variables import NoWeightDecay

__all__ = [
    "MIXERS",
    "Attention",
    "Block",
    "DeltaInputs",
    "DeltaProjections",
    "GDNCache",
    "GatedDeltaNet",
    "HAM",
    "HAMCache",
    "LanguageModel",
    "LearnedRouter",
    "MixerStats",
    "ModelCache",
    "ModelConfig",
    "ModelStats",
    "NoWeightDecay",
    "RMSNorm",
    "ShortConv",
    "SwiGLU",
    "Threshold",
    "causal_conv",
    "causal_conv_step",
]
