"""kdjax.evolution."""
