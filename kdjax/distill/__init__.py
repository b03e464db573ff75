"""Distillation methods as registry entries (see ``kdjax.distill.base`` for the contract)."""

from kdjax.distill.base import Aux, Method, Outputs

__all__ = ["Aux", "Method", "Outputs"]
