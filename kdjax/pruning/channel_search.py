"""NSGA-II over channel bits: the population fitness of a masked span and the search loop
(EMO-PMS per sub-network, and its whole-network NSGA-II baseline). No file I/O; progress
goes to an optional ``report`` callback.

Genome g ∈ {0,1}^G, G = Σ_groups C (kdjax.pruning.split.layout); candidate masks
m = genome_to_masks(g) on the searched groups, ones on every other group. Two objectives,
both minimised:

    f_1(g) = ratio_fn(m)                               (e.g. retained MACs / unpruned MACs)
    f_2(g) = CE(selector(span(h; m)), y)               (BAD_LOSS when not finite)

where span = the model from tap ``start`` (the image when None) to tap ``stop`` (the logits
when None), h [B, ...] its input, y [B] labels, selector = a linear head on the span's output
(kdjax.pruning.emo.selector_loss; None = the span ends at the logits).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.evolution import nsga2, population
from kdjax.pruning import split as split_lib
from kdjax.pruning.emo import apply_span, selector_loss

BAD_LOSS = 1e6  # stands in for a diverged (non-finite) fitness
CROSSOVERS = {"uniform": nsga2.uniform_crossover, "one_point": nsga2.one_point_crossover}


class SearchSettings(NamedTuple):
    """NSGA-II hyper-parameters. mutation_rate ≤ 0 means 1/G; crossover ∈ CROSSOVERS."""
    population: int
    generations: int
    init_keep_range: tuple[float, float]
    crossover: str = "uniform"
    crossover_prob: float = 0.9
    mutation_rate: float = 0.0


def population_fitness(model, groups: Mapping[str, int], ratio_fn: Callable, start, stop,
                       all_groups: Mapping[str, int], strategy: str = "vmap",
                       chunk: int = 0, mesh=None) -> Callable:
    """``evaluate(genomes [P, G], variables, selector, h, labels) -> [P, 2]`` = (f_1, f_2)
    per candidate (module docstring), the candidates evaluated by ``strategy`` ("loop" |
    "vmap" | "map" in chunks of ``chunk``) and split over ``mesh``'s devices
    (kdjax.evolution.population)."""
    ones = {g: jnp.ones((c,), jnp.float32) for g, c in all_groups.items() if g not in groups}

    def one(genome, variables, selector, h, labels):
        sub = split_lib.genome_to_masks(genome, groups)
        out = apply_span(model, variables, h, {**ones, **sub}, start, stop)
        loss = selector_loss(selector, out, labels)
        loss = jnp.where(jnp.isfinite(loss), loss, BAD_LOSS)
        return jnp.stack([ratio_fn(sub), loss])

    return population.sharded(population.batched(one, strategy, chunk), mesh)


_generation = jax.jit(nsga2.generation, static_argnames=(
    "evaluate_fn", "num_groups", "crossover_fn", "with_children"))


def archived(archive) -> tuple[np.ndarray, np.ndarray]:
    """(genomes [A', G], objectives [A', 2]) of the valid archive rows."""
    genomes, objectives, valid = (np.asarray(a) for a in archive)
    return genomes[valid], objectives[valid]


def nsga2_search(key: jax.Array, evaluators: Mapping[str, Callable], eval_args: tuple,
                 groups: Mapping[str, int], settings: SearchSettings, *, mesh=None,
                 report: Callable[[dict], Any] | None = None) -> dict:
    """NSGA-II over the channel bits of ``groups`` (repair keeps every group non-empty),
    with an external archive of every non-dominated candidate evaluated (capacity = all
    evaluations, so nothing is dropped).

    evaluators: {strategy: evaluate} (``population_fitness``); with more than one, each is
    timed on the initial population and the fastest is used. mesh: where the population
    and ``eval_args`` are placed (replicated); None = the first device. report: called
    with {'generation', 'hypervolume', 'objectives' (archive [A', 2]), 'seconds',
    'evals_per_s'} after the initial population (generation 0; 'seconds' includes
    compilation) and after every generation.

    Returns {'genomes' [A, G], 'objectives' [A, 2] (the archive: the non-dominated
    candidates of the whole search), 'population' [P, 2] (final population objectives),
    'hypervolume' [generations + 1] (of the archive: never decreasing), 'reference' [2],
    'evaluated' [(1 + generations)·P, 2] (the initial population, then each generation's
    children: every candidate evaluated, in order), 'evaluations', 'seconds' (generations only),
    'population_eval' (the strategy used)}. The hypervolume reference is fixed from the
    initial population (split.reference_point: (1.05, 1.1 · max initial loss)).
    """
    report = report or (lambda info: None)
    group_index = jnp.asarray(split_lib.layout(groups))
    num_genes = int(group_index.shape[0])
    size = settings.population
    k_init, key = jax.random.split(key)
    genomes = nsga2.initial_population(k_init, size, num_genes, tuple(settings.init_keep_range))
    # Committed like the evaluation data, so that the jitted generation sees the same
    # input placement every call (no recompilation after generation 1).
    target = (jax.devices()[0] if mesh is None
              else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    genomes = jax.device_put(nsga2.repair(genomes, group_index, len(groups)), target)
    eval_args = jax.device_put(eval_args, target)
    name = (next(iter(evaluators)) if len(evaluators) == 1
            else population.fastest(evaluators, (genomes, *eval_args)))
    evaluate = evaluators[name]
    t0 = time.perf_counter()
    objectives = jax.jit(evaluate)(genomes, *eval_args)
    evaluated = [np.asarray(objectives)]
    first_seconds = time.perf_counter() - t0
    reference = split_lib.reference_point(evaluated[0])
    archive = nsga2.archive_update(
        *nsga2.archive_init(size * (settings.generations + 1), num_genes, 2),
        genomes, objectives)
    history = [float(nsga2.hypervolume_2d(archived(archive)[1], reference))]
    report({"generation": 0, "hypervolume": history[0], "objectives": archived(archive)[1],
            "seconds": first_seconds, "evals_per_s": size / first_seconds,
            "reference": reference, "num_genes": num_genes})
    rate = float(settings.mutation_rate) if settings.mutation_rate > 0 else 1.0 / num_genes
    seconds = 0.0
    for gen in range(1, settings.generations + 1):
        key, k_gen = jax.random.split(key)
        t0 = time.perf_counter()
        genomes, objectives, archive, children = _generation(
            k_gen, genomes, objectives, evaluate, eval_args=eval_args,
            group_index=group_index, num_groups=len(groups),
            crossover_fn=CROSSOVERS[settings.crossover],
            crossover_prob=float(settings.crossover_prob), mutation_rate=rate,
            archive=archive, with_children=True)
        objectives.block_until_ready()
        elapsed = time.perf_counter() - t0
        seconds += elapsed
        evaluated.append(np.asarray(children))
        history.append(float(nsga2.hypervolume_2d(archived(archive)[1], reference)))
        report({"generation": gen, "hypervolume": history[-1],
                "objectives": archived(archive)[1], "seconds": elapsed,
                "evals_per_s": size / elapsed})
    front_genomes, front = archived(archive)
    return {"genomes": front_genomes, "objectives": front,
            "population": np.asarray(objectives), "hypervolume": history,
            "reference": reference.tolist(), "evaluated": np.concatenate(evaluated),
            "evaluations": size * (settings.generations + 1), "seconds": seconds,
            "population_eval": name}
