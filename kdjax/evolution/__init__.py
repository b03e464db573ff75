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

from kdjax.evolution.nsga2 import __all__  # noqa: E402,F401  (one list of the public names)
