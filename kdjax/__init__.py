"""kdjax: knowledge distillation and distillation-aware pruning in JAX/Flax."""

__version__ = "0.1.0"
