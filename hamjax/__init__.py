"""hamjax: Hybrid Associative Memory (HAM) layers in JAX and Flax."""

__version__ = "0.1.0"
