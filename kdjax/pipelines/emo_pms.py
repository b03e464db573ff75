"""Pipeline ``emo_pms``: EMO joint pruning with multiple sub-networks (Shang et al. 2023).

Stages (artefacts under ``workdir/<method>/``):
  teacher     — the network to prune: ``config.teacher.checkpoint`` or trained first
                under ``workdir/teacher`` (reused when finished);
  split       — cut at ``emo.boundaries`` (default: the stage taps) into sub-networks
                (kdjax.pruning.split); one feature selector (GAP + Dense) per boundary
                trained on the frozen unpruned features of the training split;
  data        — the splits are carved as the NETWORK's own (its recorded data seed; a
                network trained with other data settings is refused); the search's
                held-out data (fitness, impairment) is the validation split, or without
                one ``emo.holdout_size`` examples carved from the training split, and the
                search's own training (selectors, constraints, Taylor) uses the rest;
  search      — per sub-network NSGA-II over channel bits; objectives (minimised) =
                (retained MACs ratio of the sub-network, selector CE on its output
                computed from the UNPRUNED input features of a fixed HELD-OUT batch);
                the population is evaluated in one jitted call (vmap, loop or lax.map
                chunks, ``emo.population_eval``, optionally split over devices); an
                external archive keeps every non-dominated candidate ever evaluated;
  constraint  — K candidates per sub-network, spread over its archived Pareto front, each
                trained so that g_s(f_{s-1}) ≈ f_s (MSE, unpruned f), all K at once (vmap);
  GPIR        — Δ_s(p) = held-out CE increase of the full network with only sub-network
                s replaced by candidate p; one candidate per sub-network with the
                whole-network retained MACs ratio ≤ ``target_flops_ratio`` at min Σ Δ;
  finetune    — the assembled network is compacted and fine-tuned (CE, or KD from the
                unpruned network with ``emo.finetune_kd``) in stage ``<method>/finetune``.

Baselines (``emo.method``) share the compaction + fine-tuning path: "uniform" (uniform
width scaling), "l1" and "taylor" (saliency + ``prune_to`` the MACs budget),
"whole_nsga2" (one genome for the whole network, objective = the network's own CE, the
same number of candidate evaluations as the per-sub-network searches together).

Target: retained ratio R = MACs(pruned) / MACs(unpruned) ≤ ``config.target_flops_ratio``,
MACs per image of every conv and dense layer (kdjax.pruning.cost).
Writes pareto_<subnet>.json/.png, hypervolume.json/.png, scheme.json, results.json.

The math lives in the core: the split, genomes, costs and GPIR in kdjax.pruning.split;
selectors, constraint training and impairment in kdjax.pruning.emo; NSGA-II in
kdjax.evolution; the population fitness and the search loop in
kdjax.pruning.channel_search; the plots in kdjax.reports. This module orchestrates them,
writes the files and logs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import losses, models, reports
from kdjax.data import Splits, load_splits, pipeline as data_pipeline, split_indices
from kdjax.evolution import population
from kdjax.pipelines import common
from kdjax.pruning import channel_search
from kdjax.pruning import compact as compact_lib
from kdjax.pruning import cost as cost_lib
from kdjax.pruning import emo as emo_lib
from kdjax.pruning import masks as masks_lib
from kdjax.pruning import saliency
from kdjax.pruning import split as split_lib
from kdjax.pruning.emo import span_io, take, with_params
from kdjax.train import files, sharding

log = logging.getLogger("kdjax")

METHODS = ("emo_pms", "uniform", "l1", "taylor", "whole_nsga2")


class Network(NamedTuple):
    """The unpruned network and what every method measures it with."""

    model: Any
    variables: dict
    table: Any         # cost.CostTable
    macs: float        # unpruned MACs per image
    budget: float      # target_flops_ratio · macs


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def top1(evaluation) -> float | None:
    """Top-1 of an evaluation dict, None for a missing split."""
    return None if evaluation is None else evaluation["top1"]


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


DATA_KEYS = ("name", "validation_size", "train_size")


def network_context(ctx, teacher_results: dict):
    """``ctx`` with the splits carved exactly as for the network's own training: its
    recorded data seed (teacher_results['data_seed']) instead of ``config.seed``, so a
    validation split never holds an example the network trained on. A network trained
    with other data settings (name, validation_size, train_size) is refused; an imported
    network (its checkpoint records no kdjax data settings, e.g. kdjax.convert_torch's)
    is taken as is, with a warning that it may have trained on any training example."""
    if teacher_results.get("data_seed") is None:
        log.warning("[emo_pms] the network's checkpoint records no data settings "
                    "(imported?): it may have trained on any example of the training "
                    "split, held-out ones included")
        return ctx
    recorded, data = teacher_results.get("data") or {}, ctx.config.data
    differ = [k for k in DATA_KEYS if recorded.get(k) != data[k]]
    if differ:
        raise ValueError(
            "the network was trained with other data settings than this run's ("
            + "; ".join(f"data.{k}: network {recorded.get(k)!r}, config {data[k]!r}"
                        for k in differ)
            + "); its held-out examples would not be held out. Use the network's settings.")
    seed = teacher_results["data_seed"]
    if seed == ctx.config.seed:
        return ctx
    log.info("[emo_pms] splits carved with the network's data seed %d (config.seed %d)",
             seed, ctx.config.seed)
    return dataclasses.replace(ctx, splits=load_splits(data, seed=seed))


def search_context(ctx, data_seed: int):
    """``ctx`` whose splits are the search's: validation = the held-out examples of the
    fitness and the impairments, train = what the selectors, constraint training and
    Taylor scores use. With a validation split: unchanged. Without (the paper presets):
    ``emo.holdout_size`` examples carved from the training split (seeded with the
    network's ``data_seed``) are held out, the rest is the search's training data."""
    splits = ctx.splits
    if splits.validation is not None:
        return ctx
    size = int(ctx.config.emo.holdout_size)
    if size <= 0:
        raise ValueError("emo_pms needs held-out data for fitness and impairment: set "
                         "emo.holdout_size > 0 (or data.validation_size > 0); they are "
                         "never measured on the test split")
    rest, held = split_indices(len(splits.train), size, 0, data_seed)
    log.info("[emo_pms] search: %d held-out training examples (fitness, impairment), %d "
             "for selectors / constraint training / Taylor", len(held), len(rest))
    return dataclasses.replace(ctx, splits=Splits(splits.train.subset(rest),
                                                  splits.train.subset(held), splits.test,
                                                  splits.info))


def validation_arrays(ctx, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` (0: all) held-out examples (``search_context``), normalised:
    (images, labels). Fitness and impairment never see the test split."""
    source = ctx.splits.validation
    if source is None:
        raise ValueError("emo_pms needs a validation split (data.validation_size > 0): "
                         "fitness and impairment must not be measured on the test split")
    count = len(source) if count <= 0 else min(count, len(source))
    batch = next(iter(data_pipeline.eval_batches(source, ctx.config.data,
                                                 global_batch_size=count)))
    return batch["image"], batch["label"]


def train_batches(ctx, batch_size: int, seed_offset: int):
    """Endless iterator of training batches {'image', 'label'} (host arrays)."""
    return data_pipeline.make_train_iterator(
        ctx.splits.train, ctx.config.data, global_batch_size=batch_size,
        seed=ctx.config.seed + seed_offset)


# --------------------------------------------------------------------------
# Feature selectors
# --------------------------------------------------------------------------


def train_selectors(net: Network, subnets, batches, steps: int, lr: float,
                    num_classes: int) -> dict:
    """emo.train_selectors on the unpruned network; logs the last step's train CE.
    Returns {subnet name: params or None (span ends at the logits)}."""
    selectors, per = emo_lib.train_selectors(net.model, net.variables, subnets, batches,
                                             steps, lr, num_classes)
    if per:
        log.info("[emo_pms] selectors after %d steps: train CE %s", steps,
                 {n: round(float(v), 4) for n, v in per.items()})
    return selectors


# --------------------------------------------------------------------------
# Population evaluation and NSGA-II search
# --------------------------------------------------------------------------


def population_evaluators(emo, mesh, build) -> dict:
    """{strategy: evaluator} for ``emo.population_eval`` (population.candidate_strategies:
    all three for "auto", timed by the search on its initial population; the backend's
    measured choice for "backend"); build(strategy, chunk, mesh) -> evaluator."""
    names = population.candidate_strategies(emo.population_eval)
    return {n: build(n, emo.population_chunk, mesh) for n in names}


def population_mesh(emo):
    """The mesh the search's candidates are split over (``emo.population_devices``,
    0 = all devices), or None for one device."""
    mesh = sharding.make_mesh(emo.population_devices)
    return mesh if mesh.size > 1 else None


def search_settings(emo, generations: int) -> channel_search.SearchSettings:
    return channel_search.SearchSettings(
        population=emo.population, generations=generations,
        init_keep_range=tuple(emo.init_keep_range), crossover=emo.crossover,
        crossover_prob=float(emo.crossover_prob), mutation_rate=float(emo.mutation_rate))


def search_logger(label: str, target_ratio: float):
    """A ``channel_search.nsga2_search`` report callback: one log line per generation."""
    def report(info):
        if info["generation"] == 0:
            log.info("[emo_pms] %s: %d genes, initial hv %.4f (reference %s, first call "
                     "incl. compile %.1fs)", label, info["num_genes"], info["hypervolume"],
                     np.round(info["reference"], 4).tolist(), info["seconds"])
            return
        obj = info["objectives"]
        ok = obj[:, 0] <= target_ratio
        best = f"{obj[ok, 1].min():.4f}" if ok.any() else "none"
        log.info("[emo_pms] %s gen %d: hv %.4f, best loss at ratio <= %.2f: %s, %.1f evals/s",
                 label, info["generation"], info["hypervolume"], target_ratio, best,
                 info["evals_per_s"])
    return report


def pareto_candidates(search: dict, k: int) -> np.ndarray:
    """Indices (into the archive — every row non-dominated, one per objective vector) of
    ≤ k candidates spread over the MACs axis (split.spread_indices)."""
    return split_lib.spread_indices(search["objectives"][:, 0], k)


# --------------------------------------------------------------------------
# Cross-network constraint training and impairment (vmapped over K candidates)
# --------------------------------------------------------------------------


def constraint_train(net: Network, subnet, cand_masks: dict, batches, steps: int,
                     lr: float) -> dict:
    """emo.constraint_train of the K candidates ``cand_masks`` {group: [K, C]} of
    ``subnet`` against the unpruned network; logs the MSE per candidate at the first,
    every 100th and the last step. Returns {module: pytree [K, ...]}."""

    def on_step(i, mse):
        if i == 0 or i + 1 == steps or (i + 1) % 100 == 0:
            log.info("[emo_pms] %s constraint step %d/%d: MSE per candidate %s", subnet.name,
                     i + 1, steps, np.round(np.asarray(mse), 5).tolist())

    return emo_lib.constraint_train(net.model, net.variables, subnet, cand_masks, batches,
                                    steps, lr, on_step)


# --------------------------------------------------------------------------
# Methods: each returns (masks {group: [C]}, params override {module: ...}, info)
# --------------------------------------------------------------------------


def search_emo_pms(ctx, net: Network, out_dir) -> tuple[dict, dict, dict]:
    """Split → selectors → per-sub-network NSGA-II → constraint training → GPIR."""
    config, emo = ctx.config, ctx.config.emo
    model = net.model
    boundaries = tuple(emo.boundaries) or split_lib.default_boundaries(model)
    subnets = split_lib.split(model, boundaries, ctx.input_shape)
    all_groups = models.mask_groups(model)
    log.info("[emo_pms] sub-networks: %s", [(s.name, len(s.groups), sum(s.groups.values()))
                                            for s in subnets])
    selectors = train_selectors(net, subnets, train_batches(ctx, emo.batch_size, 11),
                                emo.selector_steps, emo.selector_lr, ctx.num_classes)
    images, labels = validation_arrays(ctx, emo.eval_batch)
    full_fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
    logits, feats = full_fwd(net.variables, images)
    key = jax.random.PRNGKey(config.seed)
    mesh = population_mesh(emo)
    searches = {}
    for s_index, sub in enumerate(subnets):
        ratio_fn = functools.partial(split_lib.retained_ratio, net.table)
        evaluators = population_evaluators(emo, mesh, functools.partial(
            channel_search.population_fitness, model, sub.groups, ratio_fn, sub.start,
            sub.stop, all_groups))
        h, _ = span_io(images, logits, feats, sub)
        search = channel_search.nsga2_search(
            jax.random.fold_in(key, s_index), evaluators,
            (net.variables, selectors[sub.name], h, labels), sub.groups,
            search_settings(emo, emo.generations), mesh=mesh,
            report=search_logger(sub.name, config.target_flops_ratio))
        picks = pareto_candidates(search, emo.candidates_per_subnet)
        search["candidates"] = picks
        searches[sub.name] = search
        write_pareto(out_dir, sub.name, search)
    write_hypervolume(out_dir, searches)

    val_images, val_labels = validation_arrays(ctx, emo.impairment_examples)
    per_subnet = []
    for s_index, sub in enumerate(subnets):
        search = searches[sub.name]
        genomes = search["genomes"][search["candidates"]]
        cand_masks = split_lib.genome_to_masks(jnp.asarray(genomes), sub.groups)
        trained = constraint_train(net, sub, cand_masks, train_batches(ctx, emo.batch_size,
                                                                       100 + s_index),
                                   emo.constraint_steps, emo.constraint_lr)
        delta = emo_lib.impairments(net.model, net.variables, sub, trained, cand_masks,
                                    val_images, val_labels, emo.eval_batch)
        log.info("[emo_pms] %s candidates: ratio %s, selector loss %s, impairment %s",
                 sub.name, np.round(search["objectives"][search["candidates"], 0], 3).tolist(),
                 np.round(search["objectives"][search["candidates"], 1], 4).tolist(),
                 np.round(delta, 4).tolist())
        per_subnet.append({"subnet": sub, "masks": cand_masks, "params": trained,
                           "delta": delta})

    kept = [{g: np.asarray(jnp.sum(p["masks"][g], axis=-1)).astype(int)
             for g in p["subnet"].groups} for p in per_subnet]
    grid = split_lib.combination_macs(net.table, [s.groups for s in subnets], kept)
    combo, total_delta = split_lib.gpir_select([p["delta"] for p in per_subnet], grid,
                                               net.budget)
    masks = masks_lib.ones_masks(model)
    params = {}
    for p, k in zip(per_subnet, combo):
        masks.update(take(p["masks"], k))
        params.update(take(p["params"], k))
    info = {
        "subnets": [{
            "name": p["subnet"].name, "start": p["subnet"].start, "stop": p["subnet"].stop,
            "groups": p["subnet"].groups, "modules": list(p["subnet"].modules),
            "chosen": int(k),
            "candidates": [{"retained_ratio": float(searches[p["subnet"].name]["objectives"][i, 0]),
                            "selector_loss": float(searches[p["subnet"].name]["objectives"][i, 1]),
                            "impairment": float(p["delta"][j]),
                            "kept": {g: int(kept[s][g][j]) for g in p["subnet"].groups}}
                           for j, i in enumerate(searches[p["subnet"].name]["candidates"])],
        } for s, (p, k) in enumerate(zip(per_subnet, combo))],
        "gpir": {"combination": list(combo), "total_impairment": total_delta,
                 "combination_macs": float(grid[combo]),
                 "feasible_combinations": int((grid <= net.budget * (1 + 1e-9)).sum()),
                 "combinations": int(grid.size)},
        "evaluations": int(sum(s["evaluations"] for s in searches.values())),
        "search_seconds": float(sum(s["seconds"] for s in searches.values())),
    }
    return masks, params, info


def search_whole_nsga2(ctx, net: Network, out_dir) -> tuple[dict, dict, dict]:
    """One genome over every group; objectives = (whole-network retained ratio, the
    network's own CE on the fitness batch); generations chosen so that the number of
    evaluations equals the per-sub-network searches' total: P·(1 + g_w) = S·P·(1 + g)."""
    config, emo, model = ctx.config, ctx.config.emo, net.model
    target = net.budget / net.macs
    boundaries = tuple(emo.boundaries) or split_lib.default_boundaries(model)
    num_subnets = len(split_lib.split(model, boundaries, ctx.input_shape))
    generations = num_subnets * (emo.generations + 1) - 1
    groups = models.mask_groups(model)
    images, labels = validation_arrays(ctx, emo.eval_batch)
    ratio_fn = lambda masks: split_lib.macs(net.table, masks) / net.macs
    mesh = population_mesh(emo)
    evaluators = population_evaluators(emo, mesh, functools.partial(
        channel_search.population_fitness, model, groups, ratio_fn, None, None, groups))
    search = channel_search.nsga2_search(
        jax.random.PRNGKey(config.seed), evaluators, (net.variables, None, images, labels),
        groups, search_settings(emo, generations), mesh=mesh,
        report=search_logger("whole", target))
    obj = search["objectives"]
    exact = [cost_lib.model_cost(model, ctx.input_shape,
                                 split_lib.genome_to_masks(jnp.asarray(g), groups))["macs"]
             for g in search["genomes"]]
    ok = np.flatnonzero(np.asarray(exact) <= net.budget)
    if not len(ok):
        raise ValueError(f"whole_nsga2: no archived candidate meets "
                         f"target_flops_ratio={config.target_flops_ratio} (smallest ratio "
                         f"{obj[:, 0].min():.3f}); lower emo.init_keep_range or add generations")
    best = int(ok[np.argmin(obj[ok, 1])])
    search["candidates"] = np.array([best])
    write_pareto(out_dir, "whole", search)
    write_hypervolume(out_dir, {"whole": search})
    masks = split_lib.genome_to_masks(jnp.asarray(search["genomes"][best]), groups)
    return masks, {}, {"chosen": {"retained_ratio": float(obj[best, 0]),
                                  "loss": float(obj[best, 1])},
                       "generations": generations, "evaluations": search["evaluations"],
                       "search_seconds": search["seconds"]}


def search_saliency(ctx, net: Network, kind: str) -> tuple[dict, dict, dict]:
    """L1 (Σ|w| of producing filters) or Taylor (|∂CE/∂m| summed over training batches)
    scores, then saliency.prune_to the MACs budget."""
    model, variables = net.model, net.variables
    ones = masks_lib.ones_masks(model)
    if kind == "l1":
        scores = saliency.l1_scores(model, variables["params"])
    else:
        @jax.jit
        def batch_scores(variables, images, labels):
            loss = lambda m: losses.cross_entropy(
                model.apply(variables, images, masks=m, train=False)[0], labels)
            return saliency.taylor_scores(loss, ones)

        batches = train_batches(ctx, ctx.config.emo.batch_size, 7)
        scores = jax.tree.map(jnp.zeros_like, ones)
        for _ in range(ctx.config.emo.taylor_batches):
            batch = next(batches)
            scores = jax.tree.map(jnp.add, scores,
                                  batch_scores(variables, batch["image"], batch["label"]))
    masks = saliency.prune_to(scores, ones, macs_target=net.budget, model=model,
                              input_shape=ctx.input_shape, round_to=ctx.config.emo.round_to)
    return masks, {}, {"scores": kind}


def search_uniform(ctx, net: Network) -> tuple[dict, dict, dict]:
    """The same fraction of every group kept, the largest one meeting the budget."""
    masks = split_lib.uniform_for_budget(net.table, models.mask_groups(net.model), net.budget,
                                         round_to=ctx.config.emo.round_to)
    return masks, {}, {}


# --------------------------------------------------------------------------
# Artefacts
# --------------------------------------------------------------------------


def write_pareto(out_dir, name: str, search: dict) -> None:
    """pareto_<name>.json (final population, archived front, candidates, all evaluations)
    and .png."""
    obj, final = search["objectives"], search["population"]
    files.save_json(out_dir / f"pareto_{name}.json", {
        "objectives": ["retained_macs_ratio", "selector_loss"],
        "population": final.tolist(), "front": obj.tolist(),
        "front_genomes": [np.flatnonzero(~g).tolist() for g in search["genomes"]],
        "candidates": np.asarray(search.get("candidates", [])).tolist(),
        "evaluated": search["evaluated"].tolist(), "reference": search["reference"]})
    reports.pareto_plot(out_dir / f"pareto_{name}.png", name, search)


def write_hypervolume(out_dir, searches: dict) -> None:
    """hypervolume.json ({search: {'reference', 'per_generation'}}) and hypervolume.png."""
    files.save_json(out_dir / "hypervolume.json", {
        n: {"reference": s["reference"], "per_generation": s["hypervolume"]}
        for n, s in searches.items()})
    reports.hypervolume_plot(out_dir / "hypervolume.png", searches)


def scheme(net: Network, masks: dict, small_model, input_shape) -> dict:
    """Per-group widths and per-layer widths/MACs of the pruned network."""
    groups = models.mask_groups(net.model)
    kept = masks_lib.count_kept(masks)
    pruned = cost_lib.model_cost(small_model, input_shape)["layers"]
    full = cost_lib.model_cost(net.model, input_shape)["layers"]
    return {"groups": {g: {"channels": c, "kept": kept[g]} for g, c in groups.items()},
            "layers": [{**l, "unpruned_in_channels": u["in_channels"],
                        "unpruned_out_channels": u["out_channels"],
                        "unpruned_macs": u["macs"], "unpruned_params": u["params"]}
                       for l, u in zip(pruned, full)]}


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def prepare(ctx) -> tuple[Network, dict]:
    """The unpruned network (trained or loaded), its cost table and the MACs budget."""
    ratio = float(ctx.config.target_flops_ratio)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"target_flops_ratio must be in (0, 1], got {ratio}")
    model, variables, teacher_results = common.obtain_teacher(ctx)
    # The search's data sit on one device unless emo.population_devices > 1 (then
    # the search replicates them); the trainer's replicated copies would otherwise clash.
    variables = jax.device_put(variables, jax.devices()[0])
    table = cost_lib.cost_table(model, tuple(ctx.input_shape))
    macs = float(cost_lib.counts_cost(table, dict(table.widths))["macs"])
    return Network(model, variables, table, macs, ratio * macs), teacher_results


def run(config, workdir) -> dict:
    """Teacher → search (``emo.method``) → compact → fine-tune; writes
    ``workdir/<method>/results.json`` and returns it."""
    emo = config.emo
    if emo.method not in METHODS:
        raise ValueError(f"unknown emo.method {emo.method!r}; valid: {', '.join(METHODS)}")
    saliency.check_round_to(emo.round_to)
    population.check_strategy(emo.population_eval)
    if emo.crossover not in channel_search.CROSSOVERS:
        raise ValueError(f"unknown emo.crossover {emo.crossover!r}; valid: {sorted(channel_search.CROSSOVERS)}")
    ctx = common.setup(config, workdir)
    if emo.finetune_kd:  # a bad distill method or tap fails before the search
        unpruned = models.get_model(config.teacher.name, ctx.num_classes)
        common.make_method(ctx, unpruned, unpruned)
    net, teacher_results = prepare(ctx)
    ctx = network_context(ctx, teacher_results)
    search_ctx = search_context(ctx, teacher_results["data_seed"])
    out_dir = files.make_dirs(ctx.workdir / emo.method)
    t0 = time.perf_counter()
    if emo.method == "emo_pms":
        masks, params, info = search_emo_pms(search_ctx, net, out_dir)
    elif emo.method == "whole_nsga2":
        masks, params, info = search_whole_nsga2(search_ctx, net, out_dir)
    elif emo.method in ("l1", "taylor"):
        masks, params, info = search_saliency(search_ctx, net, emo.method)
    else:
        masks, params, info = search_uniform(search_ctx, net)
    info["seconds"] = time.perf_counter() - t0
    variables = with_params(net.variables, params)
    # Rounding only removes channels, so the budget still holds (a no-op after l1, taylor
    # and uniform, which round inside their budget search).
    if emo.round_to > 1:
        masks = saliency.round_masks(saliency.l1_scores(net.model, variables["params"]),
                                     masks, emo.round_to)
    return finish(ctx, net, masks, variables, info, teacher_results, out_dir)


def finish(ctx, net: Network, masks: dict, variables: dict, info: dict,
           teacher_results: dict, out_dir) -> dict:
    """Compact, evaluate before/after fine-tuning, write scheme.json and results.json."""
    config, emo = ctx.config, ctx.config.emo
    shape = ctx.input_shape
    small_model, small_vars = compact_lib.compact(net.model, variables, masks)
    dense, pruned = cost_lib.model_cost(net.model, shape), cost_lib.model_cost(small_model, shape)
    ratio = pruned["macs"] / dense["macs"]
    if pruned["macs"] > net.budget * (1 + 1e-9):
        raise RuntimeError(f"pruned MACs {pruned['macs']:,} exceed the budget "
                           f"{net.budget:,.0f} (ratio {ratio:.4f})")
    kept = masks_lib.count_kept(masks)
    files.save_json(out_dir / "scheme.json", {"method": emo.method, "search": info,
                                                 **scheme(net, masks, small_model, shape)})
    log.info("[emo_pms] %s: MACs %.2fM -> %.2fM (ratio %.4f, target %.2f), params %d -> %d",
             emo.method, dense["macs"] / 1e6, pruned["macs"] / 1e6, ratio,
             config.target_flops_ratio, dense["params"], pruned["params"])
    unpruned = common.evaluate_model(ctx, net.model, net.variables)
    before = common.evaluate_model(ctx, small_model, small_vars)
    name = teacher_results.get("model", config.teacher.name)
    stage = dict(widths=kept, model=small_model, initial_variables=small_vars)
    if emo.finetune_kd:  # distil from the unpruned network with config.distill's method
        method = common.make_method(ctx, small_model, net.model)
        _, finetune = common.distill_stage(ctx, f"{emo.method}/finetune", name, emo.finetune,
                                           method, (net.model, net.variables), **stage)
    else:
        _, finetune = common.run_stage(ctx, f"{emo.method}/finetune", name, emo.finetune,
                                       common.supervised_objective, **stage)
    results = {
        "method": emo.method, "model": name, "target_flops_ratio": config.target_flops_ratio,
        "unpruned": {"macs": dense["macs"], "params": dense["params"],
                     "test_top1": unpruned["test"]["top1"],
                     "validation_top1": top1(unpruned["validation"])},
        "pruned": {"macs": pruned["macs"], "params": pruned["params"],
                   "retained_macs_ratio": ratio,
                   "macs_removed_pct": 100.0 * (1 - ratio),
                   "params_removed_pct": 100.0 * (1 - pruned["params"] / dense["params"]),
                   "widths": kept},
        "before_finetune": {"test_top1": before["test"]["top1"],
                            "validation_top1": top1(before["validation"])},
        "after_finetune": {"test_top1": finetune["test_top1_last"],
                           "test_top1_at_best_val": finetune["test_top1_at_best_val"]},
        "finetune": finetune, "teacher": teacher_results,
        "search_seconds": info.get("seconds"),
    }
    files.save_json(out_dir / "results.json", results)
    summary = (f"{emo.method}: {name} MACs {dense['macs'] / 1e6:.2f}M -> "
               f"{pruned['macs'] / 1e6:.2f}M ({100 * (1 - ratio):.1f}% removed), params "
               f"{dense['params']:,} -> {pruned['params']:,}; test top-1 unpruned "
               f"{unpruned['test']['top1']:.2f}, pruned {before['test']['top1']:.2f} -> "
               f"{finetune['test_top1_last']:.2f} after fine-tuning")
    log.info("[emo_pms] %s", summary)
    print(summary, flush=True)
    return results
