"""kdjax.pruning."""
