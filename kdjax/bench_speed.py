"""Bench modes of issue 17 (called from ``python -m kdjax.bench``):

  --pruned-latency MODEL: MODEL compacted at several MACs targets (L1 scores,
      ``saliency.prune_to``) with widths unrounded and rounded to 8 / 16; eval-mode
      inference of each (batch ``--batch``, jit, median of ``--repeats``) against the
      dense model: a markdown table (MACs, params, latency, speed-up vs the MACs ratio)
      and a PNG of latency against MACs;
  --population-eval: EMO-PMS candidate evaluations per second of one sub-network's
      fitness (resnet56, stage 2) for loop / vmap / map on 1 and 2 devices.
"""

from __future__ import annotations

import time

from kdjax import reports

TARGETS = (0.7, 0.45, 0.24)   # MACs ratios; 0.24 ≈ the 4.18x of issue 17
MULTIPLES = (1, 8, 16)


def pruned_models(model_name: str, args, targets=TARGETS, multiples=MULTIPLES) -> list[dict]:
    """[{'target', 'round_to', 'model', 'variables', 'macs', 'params'}], the dense model
    first (target 1.0, round_to 1); random (seeded) weights, L1 scores."""
    from kdjax import models
    from kdjax.pipelines import common
    from kdjax.pruning import compact, cost, saliency
    from kdjax.pruning import masks as masks_lib

    shape = tuple(args.image)
    model = models.get_model(model_name, args.classes)
    variables = common.init_variables(model, shape, 0)
    dense = cost.model_cost(model, shape)
    rows = [{"target": 1.0, "round_to": 1, "model": model, "variables": variables, **dense}]
    scores = saliency.l1_scores(model, variables["params"])
    ones = masks_lib.ones_masks(model)
    for target in targets:
        for multiple in multiples:
            masks = saliency.prune_to(scores, ones, macs_target=target * dense["macs"],
                                      model=model, input_shape=shape, round_to=multiple)
            small, small_vars = compact.compact(model, variables, masks)
            rows.append({"target": target, "round_to": multiple, "model": small,
                         "variables": small_vars, **cost.model_cost(small, shape)})
    return rows


def pruned_latency(model_name: str, args, png: str, targets=TARGETS,
                   multiples=MULTIPLES) -> list[dict]:
    """Time every pruned model's eval forward; print the table, write ``png``; returns
    the rows with 'seconds' (median per batch) and 'speedup' (dense / pruned)."""
    import jax

    from kdjax.bench import median_seconds

    rows = pruned_models(model_name, args, targets, multiples)
    x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, *args.image))
    for row in rows:
        model = row["model"]
        infer = jax.jit(lambda v, x, m=model: m.apply(v, x, train=False)[0])
        row["seconds"] = median_seconds(
            lambda: jax.block_until_ready(infer(row["variables"], x)), args.warmup, args.repeats)
    dense = rows[0]
    print(f"| {model_name} MACs target | round_to | MACs (M) | params | ms / batch {args.batch} "
          f"| speed-up | MACs reduction | speed-up / MACs reduction |\n"
          f"|---|---|---|---|---|---|---|---|")
    for row in rows:
        row["speedup"] = dense["seconds"] / row["seconds"]
        reduction = dense["macs"] / row["macs"]
        print(f"| {row['target']:.2f} | {row['round_to']} | {row['macs'] / 1e6:.2f} | "
              f"{row['params']:,} | {1e3 * row['seconds']:.2f} | {row['speedup']:.2f}x | "
              f"{reduction:.2f}x | {row['speedup'] / reduction:.2f} |", flush=True)
    reports.latency_plot(rows, model_name, png)
    return rows


def population_problem(model_name: str, population: int, eval_batch: int, args):
    """(build(strategy, chunk, mesh) -> evaluator, genomes [P, G], eval_args) for the
    fitness of ``model_name``'s second sub-network (random weights and selector)."""
    import functools

    import jax
    import jax.numpy as jnp

    from kdjax import models
    from kdjax.evolution import nsga2
    from kdjax.pipelines import common
    from kdjax.pruning import channel_search, cost, split

    shape = tuple(args.image)
    model = models.get_model(model_name, args.classes)
    variables = common.init_variables(model, shape, 0)
    table = cost.cost_table(model, shape)
    sub = split.split(model, split.default_boundaries(model), shape)[1]
    key = jax.random.PRNGKey(0)
    images = jax.random.normal(key, (eval_batch, *shape))
    labels = jax.random.randint(key, (eval_batch,), 0, args.classes)
    h = model.apply(variables, images, stop=sub.start, train=False)[1][sub.start]
    out = model.apply(variables, h, start=sub.start, stop=sub.stop, train=False)[1][sub.stop]
    selector = {"w": 0.01 * jax.random.normal(key, (out.shape[-1], args.classes)),
                "b": jnp.zeros(args.classes)}
    genomes = nsga2.initial_population(key, population, len(split.layout(sub.groups)),
                                       (0.3, 1.0))
    build = functools.partial(channel_search.population_fitness, model, sub.groups,
                              functools.partial(split.retained_ratio, table), sub.start,
                              sub.stop, models.mask_groups(model))
    return build, genomes, (variables, selector, h, labels)


def population_eval(args, model_name: str = "resnet56", population: int = 20,
                    eval_batch: int = 256, chunk: int = 8) -> list[dict]:
    """Candidate evaluations/s per strategy on 1 and 2 devices (if there are 2); prints
    a table, returns [{'strategy', 'devices', 'evals_per_s'}]."""
    import jax

    from kdjax.bench import median_seconds
    from kdjax.train import sharding

    build, genomes, eval_args = population_problem(model_name, population, eval_batch, args)
    device_counts = [1, 2] if len(jax.devices()) >= 2 else [1]
    rows = []
    print(f"| {model_name} stage-2 fitness, P={population}, batch {eval_batch} | devices | "
          f"evaluations/s | vs loop, same devices | vs 1 device |\n|---|---|---|---|---|")
    for strategy, c in (("loop", 0), ("vmap", 0), ("map", chunk)):
        for devices in device_counts:
            mesh = sharding.make_mesh(devices)
            inputs = sharding.replicate((genomes, *eval_args), mesh)
            fn = jax.jit(build(strategy, c, mesh if devices > 1 else None))
            start = time.perf_counter()
            jax.block_until_ready(fn(*inputs))
            compile_s = time.perf_counter() - start
            seconds = median_seconds(lambda: jax.block_until_ready(fn(*inputs)),
                                     args.warmup, args.repeats)
            rows.append({"strategy": strategy if not c else f"map (chunk {c})",
                         "devices": devices, "evals_per_s": population / seconds,
                         "compile_s": compile_s})
            loop = next(r for r in rows if r["strategy"] == "loop" and r["devices"] == devices)
            one = next(r for r in rows if r["strategy"] == rows[-1]["strategy"]
                       and r["devices"] == 1)
            print(f"| {rows[-1]['strategy']} (first call {compile_s:.1f}s) | {devices} | "
                  f"{rows[-1]['evals_per_s']:.1f} | "
                  f"{rows[-1]['evals_per_s'] / loop['evals_per_s']:.2f}x | "
                  f"{rows[-1]['evals_per_s'] / one['evals_per_s']:.2f}x |", flush=True)
    return rows
