"""kdjax.evolution: pure jax.numpy multi-objective evolutionary search (NSGA-II)."""

from kdjax.evolution.nsga2 import (
    binary_tournament,
    bit_flip_mutation,
    crowding_distance,
    dominates,
    generation,
    hypervolume_2d,
    initial_population,
    non_dominated_rank,
    one_point_crossover,
    repair,
    survival,
    uniform_crossover,
)

__all__ = [
    "dominates",
    "non_dominated_rank",
    "crowding_distance",
    "binary_tournament",
    "uniform_crossover",
    "one_point_crossover",
    "bit_flip_mutation",
    "repair",
    "survival",
    "hypervolume_2d",
    "initial_population",
    "generation",
]
