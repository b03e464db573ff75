"""kdjax.pruning.channel_search.nsga2_search on a problem with a known Pareto front."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.pruning import channel_search

GROUPS = {"a": 4, "b": 6}   # 10 genes
TARGET = np.array([1, 0, 1, 0, 1, 1, 0, 0, 1, 0], bool)


def fitness(genomes, target):
    """(fraction kept, Hamming distance to ``target`` / G): both minimised, conflicting."""
    kept = genomes.mean(axis=1)
    dist = (genomes != target).mean(axis=1)
    return jnp.stack([kept, dist], axis=1)


def dominated_by(rows, others):
    """NumPy brute force: rows[i] dominated by some others[j] (≤ everywhere, < somewhere)."""
    a, b = np.asarray(rows), np.asarray(others)
    le = (b[None, :, :] <= a[:, None, :]).all(-1)
    lt = (b[None, :, :] < a[:, None, :]).any(-1)
    return (le & lt).any(axis=1)


def dominated(objectives):
    return dominated_by(objectives, objectives)


def test_search_archive_is_a_non_dominated_front_and_reports_every_generation():
    settings = channel_search.SearchSettings(population=8, generations=6,
                                             init_keep_range=(0.3, 1.0))
    reports = []
    out = channel_search.nsga2_search(
        jax.random.PRNGKey(0), {"vmap": fitness}, (jnp.asarray(TARGET),), GROUPS, settings,
        report=reports.append)
    assert [r["generation"] for r in reports] == list(range(7))
    assert out["evaluations"] == 8 * 7 and out["evaluated"].shape == (56, 2)
    # no evaluated candidate dominates an archived one, and every non-dominated
    # evaluated candidate's objectives are in the archive
    evaluated, archive = out["evaluated"], out["objectives"]
    assert not dominated_by(archive, evaluated).any()
    assert not dominated(archive).any()
    front = {tuple(np.round(r, 6)) for r in evaluated[~dominated(evaluated)]}
    assert front <= {tuple(np.round(r, 6)) for r in archive}
    # each archived genome really has its objectives, and every group keeps a channel
    recomputed = np.asarray(fitness(jnp.asarray(out["genomes"]), jnp.asarray(TARGET)))
    np.testing.assert_allclose(recomputed, out["objectives"], atol=1e-6)
    assert out["genomes"][:, :4].any(axis=1).all() and out["genomes"][:, 4:].any(axis=1).all()
    hv = np.asarray(out["hypervolume"])
    assert (np.diff(hv) >= -1e-9).all() and hv[-1] > hv[0]
    assert out["population_eval"] == "vmap"


@pytest.mark.slow  # ≈ 14 s of compilation; the default run keeps the archive test
def test_evaluated_is_every_candidate_the_search_evaluated_in_order():
    """'evaluated' = the objectives of every call of the fitness, in call order (recorded
    by a NumPy host callback): the initial population, then each generation's children —
    not the survivors (elitism would repeat those and hide dominated children)."""
    calls = []

    def numpy_fitness(genomes, target):
        kept = genomes.mean(axis=1)
        dist = (genomes != target).mean(axis=1)
        out = np.stack([kept, dist], axis=1).astype(np.float32)
        calls.append(out)
        return out

    def recorded(genomes, target):
        shape = jax.ShapeDtypeStruct((genomes.shape[0], 2), jnp.float32)
        return jax.pure_callback(numpy_fitness, shape, genomes, target)

    settings = channel_search.SearchSettings(population=8, generations=4,
                                             init_keep_range=(0.3, 1.0))
    out = channel_search.nsga2_search(jax.random.PRNGKey(1), {"vmap": recorded},
                                      (jnp.asarray(TARGET),), GROUPS, settings)
    assert len(calls) == 5
    np.testing.assert_array_equal(out["evaluated"], np.concatenate(calls))
