"""Pruning core: mask pytrees, analytic cost, physical compaction, saliency, STE masks.

Pure functions of models, arrays and pytrees (no I/O): usable without the pipelines.
"""
