"""Pruning core: mask pytrees, analytic cost, physical compaction, saliency, STE masks.

Pure functions of models, arrays and pytrees (no I/O), usable without the pipelines:

  masks     ones_masks, population_ones, random_masks, apply_masks, binarize, count_kept,
            sparsity_summary, with_widths, axis_groups (which group owns each variable axis)
  cost      model_cost (exact ints, per layer), cost_table + masked_cost / counts_cost
            (jnp, jit/vmap/grad-safe)
  compact   compact (masked model -> smaller zoo model + sliced variables), zoo_spec,
            kept_indices
  saliency  taylor_scores, l1_scores, bn_scale_scores, normalize_scores, prune_to
  ste       pdd_mask (sign forward, ApproxSign backward)
  learned_masks  LearnedMasks (a zoo model gated by learned STE masks, PDD),
            binary_masks
  split     EMO-PMS: sub-network split, genomes, costs per sub-network, GPIR
  emo       EMO-PMS: feature selectors, constraint training, impairment
"""
