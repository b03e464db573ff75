"""NSGA-II building blocks (Deb, Pratap, Agarwal, Meyarivan 2002) in pure jax.numpy.

Every function is a pure function of arrays with fixed output shapes, so a
whole generation can be compiled once with ``jax.jit`` and reused.

Conventions
-----------
* ``P`` individuals, ``M`` objectives, ``G`` genes.
* Objectives are MINIMISED, ``[P, M]`` float. They must be finite (replace a
  diverged NaN/inf evaluation by a large finite value before ranking): NaN never
  compares, so it would silently land on the Pareto front.
* Genomes are boolean ``[P, G]``; ``True`` = keep the gene (channel / group).
* Random keys are ``jax.random`` keys (``jax.random.key`` or ``PRNGKey``).

Functions
---------
``dominates``, ``non_dominated_rank``, ``crowding_distance``,
``binary_tournament``, ``uniform_crossover``, ``one_point_crossover``,
``bit_flip_mutation``, ``repair``, ``survival``, ``hypervolume_2d``,
``initial_population``, ``offspring``, ``generation``, ``archive_init``,
``archive_update``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

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
    "offspring",
    "generation",
    "archive_init",
    "archive_update",
]


# --------------------------------------------------------------------------
# Ranking
# --------------------------------------------------------------------------


def dominates(a: ArrayLike, b: ArrayLike) -> jax.Array:
    """Pairwise Pareto domination (minimisation).

    ``D[i, j] = all_m(a[i, m] <= b[j, m]) and any_m(a[i, m] < b[j, m])``.

    Args:
      a: ``[P, M]`` objectives.
      b: ``[Q, M]`` objectives.
    Returns:
      bool ``[P, Q]``. Identical rows do not dominate each other.
    """
    a = jnp.asarray(a)[:, None, :]
    b = jnp.asarray(b)[None, :, :]
    return jnp.all(a <= b, axis=-1) & jnp.any(a < b, axis=-1)


def non_dominated_rank(objectives: ArrayLike) -> jax.Array:
    """Non-domination rank by iterative front peeling.

    Front 0 is the set of points dominated by no other point; front ``r`` is the
    set of points dominated by no point outside fronts ``0..r-1``. The loop is a
    ``lax.while_loop`` that peels one front per step (at most ``P`` steps, each
    ``O(P^2)`` on a precomputed ``[P, P]`` domination matrix).

    Args:
      objectives: ``[P, M]`` finite objectives (minimised).
    Returns:
      int32 ``[P]`` ranks in ``[0, P)``; duplicates share a rank.
    """
    dom = dominates(objectives, objectives)  # dom[i, j]: i dominates j
    num = dom.shape[0]

    def cond(state):
        _, _, remaining = state
        return jnp.any(remaining)

    def body(state):
        front_id, ranks, remaining = state
        dominated = jnp.any(dom & remaining[:, None], axis=0)
        front = remaining & ~dominated
        return (front_id + 1,
                jnp.where(front, front_id, ranks),
                remaining & ~front)

    init = (jnp.int32(0), jnp.zeros(num, jnp.int32), jnp.ones(num, bool))
    return lax.while_loop(cond, body, init)[1]


def crowding_distance(objectives: ArrayLike, ranks: jax.Array) -> jax.Array:
    """Crowding distance of every point within its own front (Deb et al. 2002).

    For each objective ``m``, the members of a front are sorted by ``f_m``
    (ties broken by the keys ``(rank, f_m, index)``, i.e. a stable sort by
    index). The first and last member of the front get ``+inf``; an interior
    member at sorted position ``k`` gets
    ``(f_m[k+1] - f_m[k-1]) / (max_front f_m - min_front f_m)``, or 0 when the
    front's span in ``m`` is 0. The distance is the sum over objectives. All
    fronts are handled at once by sorting on ``(rank, f_m)``.

    Args:
      objectives: ``[P, M]`` finite objectives.
      ranks: int ``[P]`` front ids in ``[0, P)`` (e.g. ``non_dominated_rank``).
    Returns:
      float32 ``[P]``; single- and two-member fronts are all ``+inf``.
    """
    objectives = jnp.asarray(objectives, jnp.float32)
    ranks = jnp.asarray(ranks, jnp.int32)
    num, num_obj = objectives.shape
    index = jnp.arange(num, dtype=jnp.int32)
    distance = jnp.zeros(num, jnp.float32)
    for m in range(num_obj):
        r, f, order = lax.sort((ranks, objectives[:, m], index), num_keys=3)
        same = r[1:] == r[:-1]
        has_prev = jnp.concatenate([jnp.zeros(1, bool), same])
        has_next = jnp.concatenate([same, jnp.zeros(1, bool)])
        lo = jax.ops.segment_min(f, r, num, indices_are_sorted=True)[r]
        hi = jax.ops.segment_max(f, r, num, indices_are_sorted=True)[r]
        span = hi - lo
        gap = jnp.roll(f, -1) - jnp.roll(f, 1)
        interior = jnp.where(span > 0, gap / jnp.where(span > 0, span, 1.0), 0.0)
        contribution = jnp.where(has_prev & has_next, interior, jnp.inf)
        distance = distance.at[order].add(contribution)
    return distance


def _sort_by_rank_then_crowding(ranks, crowding):
    """Indices ``[P]`` sorted by (rank ascending, crowding descending, index)."""
    index = jnp.arange(ranks.shape[0], dtype=jnp.int32)
    return lax.sort((ranks, -crowding, index), num_keys=3)[2]


def survival(objectives: ArrayLike, num_survivors: int) -> jax.Array:
    """Elitist (mu + lambda) NSGA-II survival.

    Ranks the combined parent + offspring population, computes crowding per
    front, sorts by ``(rank ascending, crowding descending, index ascending)``
    and keeps the first ``num_survivors``. Whole fronts that fit are kept; the
    last front is truncated by crowding distance (boundary points first).

    Args:
      objectives: ``[N, M]`` objectives of the combined population.
      num_survivors: static int ``<= N``.
    Returns:
      int32 ``[num_survivors]`` indices into the combined population.
    """
    ranks = non_dominated_rank(objectives)
    crowding = crowding_distance(objectives, ranks)
    return _sort_by_rank_then_crowding(ranks, crowding)[:num_survivors]


def hypervolume_2d(objectives: ArrayLike, reference: ArrayLike) -> jax.Array:
    """Dominated hypervolume of a 2-objective (minimisation) point set.

    ``HV = area( union_i [f1_i, r1] x [f2_i, r2] )`` over the points with
    ``f_i < r`` in both objectives; other points contribute nothing, and
    dominated or duplicated points are not double counted. Computed by sorting on
    ``f1`` and sweeping the running minimum of ``f2``:
    ``HV = sum_k (x_{k+1} - x_k) * (r2 - min_{j<=k} y_j)`` with ``x_{K} = r1``.

    Args:
      objectives: ``[P, 2]`` objectives.
      reference: ``[2]`` reference point.
    Returns:
      float scalar.
    """
    objectives = jnp.asarray(objectives, jnp.float32)
    if objectives.ndim != 2 or objectives.shape[1] != 2:
        raise ValueError(f"hypervolume_2d needs [P, 2] objectives, got {objectives.shape}")
    ref = jnp.asarray(reference, jnp.float32)
    inside = jnp.all(objectives < ref, axis=1, keepdims=True)
    points = jnp.where(inside, objectives, ref)  # outside points: zero-area boxes
    x, y = lax.sort((points[:, 0], points[:, 1]), num_keys=2)
    best_y = lax.cummin(y)
    x_next = jnp.concatenate([x[1:], ref[:1]])
    return jnp.sum((x_next - x) * (ref[1] - best_y))


# --------------------------------------------------------------------------
# Selection and variation
# --------------------------------------------------------------------------


def binary_tournament(key: jax.Array, ranks: jax.Array, crowding: jax.Array,
                      num: int) -> jax.Array:
    """Binary tournaments with the crowded-comparison operator.

    Each tournament draws two indices uniformly (with replacement); ``i`` beats
    ``j`` iff ``rank_i < rank_j`` or (``rank_i == rank_j`` and
    ``crowding_i > crowding_j``); when neither beats the other a fair coin picks.

    Args:
      key: PRNG key.
      ranks: int ``[P]``.
      crowding: float ``[P]``.
      num: static number of tournaments.
    Returns:
      int32 ``[num]`` winner indices.
    """
    k_pair, k_coin = jax.random.split(key)
    pop = ranks.shape[0]
    i, j = jax.random.randint(k_pair, (2, num), 0, pop, dtype=jnp.int32)

    def beats(a, b):
        return (ranks[a] < ranks[b]) | ((ranks[a] == ranks[b]) & (crowding[a] > crowding[b]))

    coin = jax.random.bernoulli(k_coin, 0.5, (num,))
    pick_i = beats(i, j) | (~beats(j, i) & coin)
    return jnp.where(pick_i, i, j)


def uniform_crossover(key: jax.Array, parents_a: jax.Array, parents_b: jax.Array,
                      rate: float = 0.5) -> jax.Array:
    """Uniform crossover: ``child[n, g] = b[n, g]`` with probability ``rate``, else ``a[n, g]``.

    Args:
      key: PRNG key.
      parents_a, parents_b: bool ``[N, G]``.
      rate: probability of taking each gene from ``parents_b``.
    Returns:
      bool ``[N, G]``, one child per pair.
    """
    take_b = jax.random.bernoulli(key, rate, parents_a.shape)
    return jnp.where(take_b, parents_b, parents_a)


def one_point_crossover(key: jax.Array, parents_a: jax.Array,
                        parents_b: jax.Array) -> jax.Array:
    """One-point crossover: ``child[n] = a[n, :c_n] ++ b[n, c_n:]``.

    The cut ``c_n`` is uniform in ``{1, ..., G-1}`` so both parents contribute
    (for ``G == 1`` the child is ``a``).

    Args:
      key: PRNG key.
      parents_a, parents_b: bool ``[N, G]``.
    Returns:
      bool ``[N, G]``, one child per pair.
    """
    num, genes = parents_a.shape
    cut = jax.random.randint(key, (num, 1), 1, max(genes, 2))
    return jnp.where(jnp.arange(genes)[None, :] < cut, parents_a, parents_b)


def bit_flip_mutation(key: jax.Array, genomes: jax.Array,
                      rate: Optional[float] = None) -> jax.Array:
    """Independent bit flips: ``out = genomes XOR (u < rate)``, ``u ~ U[0, 1)``.

    Args:
      key: PRNG key.
      genomes: bool ``[N, G]``.
      rate: per-bit flip probability; default ``1 / G``.
    Returns:
      bool ``[N, G]``.
    """
    if rate is None:
        rate = 1.0 / genomes.shape[-1]
    return genomes ^ jax.random.bernoulli(key, rate, genomes.shape)


def repair(genomes: jax.Array, group_index: ArrayLike, num_groups: int,
           key: Optional[jax.Array] = None) -> jax.Array:
    """Keep at least one gene per group.

    Gene ``g`` belongs to group ``group_index[g]``. For every (individual,
    group) with no ``True`` gene, one gene of that group is set to ``True``:
    the first gene of the group when ``key`` is None, otherwise a uniformly
    random gene of the group (independently per individual). Individuals whose
    groups all already keep a gene are returned unchanged; groups with no genes
    are ignored.

    Special cases: ``group_index = zeros(G), num_groups = 1`` keeps at least one
    gene per genome; ``group_index = arange(G), num_groups = G`` (every gene its
    own group) makes every gene mandatory, i.e. repairs every genome to all-ones.

    Args:
      genomes: bool ``[N, G]``.
      group_index: int ``[G]`` group id of each gene, in ``[0, num_groups)``.
      num_groups: static number of groups ``K``.
      key: optional PRNG key for the random choice.
    Returns:
      bool ``[N, G]``.
    """
    num, genes = genomes.shape
    group_index = jnp.asarray(group_index, jnp.int32)
    if key is None:  # unique priorities; the highest one wins inside a group
        priority = jnp.broadcast_to(genes - jnp.arange(genes, dtype=jnp.int32), (num, genes))
    else:
        priority = jnp.argsort(jax.random.uniform(key, (num, genes)), axis=1).astype(jnp.int32)
    kept = jax.ops.segment_max(genomes.T.astype(jnp.int32), group_index, num_groups)  # [K, N]
    best = jax.ops.segment_max(priority.T, group_index, num_groups)  # [K, N]
    empty = (kept[group_index] == 0).T  # [N, G]: gene's group keeps nothing
    chosen = priority == best[group_index].T
    return genomes | (empty & chosen)


def initial_population(key: jax.Array, pop_size: int, num_genes: int,
                       keep_prob_range: Sequence[float] = (0.5, 1.0)) -> jax.Array:
    """Biased random genomes spread across sizes.

    Individual ``i`` draws ``p_i ~ U[lo, hi)`` and each of its genes is ``True``
    with probability ``p_i``. Individual 0 is the all-ones (unpruned) genome.

    Args:
      key: PRNG key.
      pop_size, num_genes: static ``P`` and ``G``.
      keep_prob_range: ``(lo, hi)`` range of per-individual keep probabilities.
    Returns:
      bool ``[P, G]``.
    """
    k_prob, k_bits = jax.random.split(key)
    lo, hi = keep_prob_range
    keep_prob = jax.random.uniform(k_prob, (pop_size, 1), minval=lo, maxval=hi)
    genomes = jax.random.uniform(k_bits, (pop_size, num_genes)) < keep_prob
    return genomes.at[0].set(True)


# --------------------------------------------------------------------------
# One generation
# --------------------------------------------------------------------------


def offspring(key: jax.Array, genomes: jax.Array, objectives: jax.Array,
              evaluate_fn: Callable[..., Any], *,
              eval_args: tuple = (),
              group_index: Optional[ArrayLike] = None,
              num_groups: Optional[int] = None,
              crossover_fn: Callable = uniform_crossover,
              crossover_prob: float = 0.9,
              mutation_rate: Optional[float] = None) -> tuple[jax.Array, jax.Array]:
    """Steps 1-5 of :func:`generation`: ``P`` evaluated children of the population.

    Returns ``(children bool [P, G], child_objectives [P, M])``; arguments as in
    :func:`generation`.
    """
    pop = genomes.shape[0]
    k_sel, k_cx, k_do, k_mut, k_rep = jax.random.split(key, 5)
    ranks = non_dominated_rank(objectives)
    crowding = crowding_distance(objectives, ranks)
    parents = binary_tournament(k_sel, ranks, crowding, 2 * pop)
    first, second = genomes[parents[:pop]], genomes[parents[pop:]]
    crossed = jax.random.bernoulli(k_do, crossover_prob, (pop, 1))
    children = jnp.where(crossed, crossover_fn(k_cx, first, second), first)
    children = bit_flip_mutation(k_mut, children, mutation_rate)
    if group_index is not None:
        children = repair(children, group_index, num_groups, key=k_rep)
    return children, jnp.asarray(evaluate_fn(children, *eval_args), objectives.dtype)


def generation(key: jax.Array, genomes: jax.Array, objectives: jax.Array,
               evaluate_fn: Callable[..., Any], *,
               eval_args: tuple = (),
               group_index: Optional[ArrayLike] = None,
               num_groups: Optional[int] = None,
               crossover_fn: Callable = uniform_crossover,
               crossover_prob: float = 0.9,
               mutation_rate: Optional[float] = None,
               archive: Optional[tuple] = None,
               with_children: bool = False) -> tuple:
    """One NSGA-II generation with a fixed population size ``P``.

    1. crowded binary tournaments pick ``2P`` parents -> pairs ``(a_n, b_n)``;
    2. ``child_n = crossover_fn(a_n, b_n)`` with probability ``crossover_prob``,
       else ``a_n``;
    3. ``bit_flip_mutation(child, mutation_rate)``;
    4. ``repair`` (random choice) when ``group_index`` is given, else no repair;
    5. ``child_objectives = evaluate_fn(children, *eval_args)`` ``[P, M]``;
    6. ``survival`` over the ``2P`` parents + children keeps ``P``.

    To compile once, jit with the callables and ``num_groups`` static, e.g.
    ``jax.jit(generation, static_argnames=("evaluate_fn", "num_groups",
    "crossover_fn"))``. Pass large arrays the evaluation needs (model
    parameters, data) through ``eval_args`` so they are traced, not baked in.

    Args:
      key: PRNG key.
      genomes: bool ``[P, G]`` current population.
      objectives: ``[P, M]`` its objectives.
      evaluate_fn: vectorised ``(genomes [P, G], *eval_args) -> [P, M]``.
      eval_args: extra (pytree) arguments of ``evaluate_fn``.
      group_index, num_groups: see ``repair``.
      crossover_fn: ``(key, a, b) -> child``, e.g. ``uniform_crossover``.
      crossover_prob: probability that a pair is crossed over.
      mutation_rate: per-bit flip probability; default ``1 / G``.
      archive: optional external archive ``(genomes, objectives, valid)`` (see
        :func:`archive_update`), updated with the children.
      with_children: also return the children's objectives ``[P, M]`` (the
        candidates this generation evaluated) as the last element.
    Returns:
      ``(genomes [P, G], objectives [P, M])`` of the next generation, then the
      updated archive when ``archive`` is given, then the children's objectives
      when ``with_children``.
    """
    children, child_objectives = offspring(
        key, genomes, objectives, evaluate_fn, eval_args=eval_args,
        group_index=group_index, num_groups=num_groups, crossover_fn=crossover_fn,
        crossover_prob=crossover_prob, mutation_rate=mutation_rate)
    all_genomes = jnp.concatenate([genomes, children])
    all_objectives = jnp.concatenate([objectives, child_objectives])
    keep = survival(all_objectives, genomes.shape[0])
    result = (all_genomes[keep], all_objectives[keep])
    if archive is not None:
        result += (archive_update(*archive, children, child_objectives),)
    if with_children:
        result += (child_objectives,)
    return result


# --------------------------------------------------------------------------
# External archive of non-dominated candidates
# --------------------------------------------------------------------------


def archive_init(capacity: int, num_genes: int, num_objectives: int,
                 dtype=jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
    """An empty archive ``(genomes bool [A, G], objectives [A, M], valid bool [A])``."""
    return (jnp.zeros((capacity, num_genes), bool),
            jnp.zeros((capacity, num_objectives), dtype),
            jnp.zeros((capacity,), bool))


def archive_update(genomes: jax.Array, objectives: jax.Array, valid: jax.Array,
                   new_genomes: jax.Array, new_objectives: ArrayLike
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Merge evaluated candidates into a fixed-capacity archive of non-dominated ones.

    Over the ``A + N`` rows of (archive, new), a row is kept iff it is valid (new rows
    always are), no valid row dominates it, and no earlier valid row has exactly the
    same objectives (one representative per objective vector, the oldest). Kept rows
    move to the front in their order (archive rows first); the first ``A`` are
    returned. With ``A`` ≥ the number of candidates ever merged nothing is dropped,
    so the archive is exactly the non-dominated set of every candidate seen, and the
    region it dominates — hence its hypervolume — can only grow.

    Args:
      genomes, objectives, valid: the archive, ``[A, G]``, ``[A, M]``, ``[A]``.
      new_genomes, new_objectives: ``[N, G]``, ``[N, M]`` (finite objectives).
    Returns:
      the updated archive ``(genomes [A, G], objectives [A, M], valid [A])``.
    """
    cap = genomes.shape[0]
    all_genomes = jnp.concatenate([genomes, new_genomes])
    all_objectives = jnp.concatenate([objectives, new_objectives.astype(objectives.dtype)])
    live = jnp.concatenate([valid, jnp.ones((new_genomes.shape[0],), bool)])
    num = live.shape[0]
    dominated = jnp.any(dominates(all_objectives, all_objectives) & live[:, None], axis=0)
    same = jnp.all(all_objectives[:, None, :] == all_objectives[None, :, :], axis=-1)
    earlier = jnp.arange(num)[:, None] < jnp.arange(num)[None, :]
    duplicate = jnp.any(same & earlier & live[:, None], axis=0)
    keep = live & ~dominated & ~duplicate
    order = jnp.argsort(~keep, stable=True)[:cap]
    return all_genomes[order], all_objectives[order], keep[order]
