"""grain input pipelines: shuffled, augmented training batches and padded eval.

Batches are built whole: element ``g`` of the training ``grain.MapDataset`` is
global step ``g``. Its examples are positions ``[b*G, (b+1)*G)`` of epoch
``e``'s permutation (``e, b = divmod(g, steps_per_epoch)``), and its
augmentation parameters are drawn for the whole global batch from
``(seed, epoch, b)``; each process keeps its own contiguous slice. So batches
depend only on ``(seed, step)``, the iterator state is just the next step, and
the processes' slices together equal the single-process batch.

A training batch is ``{"image": float32 [B,H,W,C], "label": int32 [B],
"index": int32 [B]}`` (``index``: each example's position in the training split,
e.g. a row of a CRD memory bank); eval batches are ``{"image", "label", "mask":
float32 [B]}``. ``B = global_batch_size // process_count``.
"""

from __future__ import annotations

import sys

from absl import flags
import grain
import numpy as np

VALID_AUGMENTATIONS = ("none", "crop_flip")

# Seed-sequence tags keeping the permutation and augmentation streams apart.
_PERMUTATION_TAG = 0
_AUGMENT_TAG = 1


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full global batches in one epoch (the remainder is dropped)."""
  steps = num_examples // global_batch_size
  if steps == 0:
    raise ValueError(
        f"{num_examples} examples cannot fill one batch of {global_batch_size}")
  return steps


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """Per-process batch size; the global batch must divide evenly."""
  if global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} is not divisible by "
        f"process_count={process_count}")
  return global_batch_size // process_count


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of ``epoch``: a permutation of range(num_examples)."""
  rng = np.random.default_rng([seed, _PERMUTATION_TAG, epoch])
  return rng.permutation(num_examples)


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
  """uint8 [...,C] -> float32 ``(x/255 - mean)/std`` with per-channel mean/std [C]."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  channels = images.shape[-1]
  if mean.shape != (channels,) or std.shape != (channels,):
    raise ValueError(
        f"data.mean {tuple(mean.tolist())} and data.std {tuple(std.tolist())} "
        f"need one value per channel ({channels}) of the images")
  scale = 1.0 / (255.0 * std)
  return images.astype(np.float32) * scale - mean / std


def crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray,
              padding: int) -> np.ndarray:
  """Crops shifted windows from zero-padded images, then flips some of them.

  images uint8 [B,H,W,C]; offsets int [B,2] in [0, 2*padding] (row, column of
  the window in the padded image); flips bool [B] (horizontal flip). Returns
  uint8 [B,H,W,C].
  """
  _, h, w, _ = images.shape
  p = padding
  padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
  out = np.empty_like(images)
  for i, ((dy, dx), flip) in enumerate(zip(offsets, flips)):
    window = padded[i, dy:dy + h, dx:dx + w]
    out[i] = window[:, ::-1] if flip else window
  return out


def crop_flip_params(rng: np.random.Generator, batch_size: int,
                     padding: int) -> tuple[np.ndarray, np.ndarray]:
  """Random crop offsets int [B,2] in [0, 2*padding] and flips bool [B]."""
  offsets = rng.integers(0, 2 * padding + 1, (batch_size, 2))
  flips = rng.random(batch_size) < 0.5
  return offsets, flips


def _check_augment(augment: str) -> None:
  if augment not in VALID_AUGMENTATIONS:
    raise ValueError(f"Unknown data.augment {augment!r} for in-memory sources; "
                     f"valid: {', '.join(VALID_AUGMENTATIONS)} "
                     f"(\"inception_crop\" needs data.source=\"tfds_stream\")")


class _SplitReader:
  """This process's slice of global batches of a split: shared state of the readers."""

  def __init__(self, source, data_cfg, global_batch_size, process_index,
               process_count):
    self.images = source.images
    self.labels = source.labels
    self.global_batch_size = global_batch_size
    self.local = local_batch_size(global_batch_size, process_count)
    self.start = process_index * self.local
    self.mean = tuple(data_cfg.mean)
    self.std = tuple(data_cfg.std)
    normalize(self.images[:1], self.mean, self.std)  # Fail early on bad stats.


class _TrainBatch(_SplitReader):
  """Global step -> this process's augmented, normalised training batch."""

  def __init__(self, source, data_cfg, global_batch_size, seed, process_index,
               process_count):
    _check_augment(data_cfg.augment)
    super().__init__(source, data_cfg, global_batch_size, process_index,
                     process_count)
    self.steps = steps_per_epoch(len(self.labels), global_batch_size)
    self.seed = seed
    self.augment = data_cfg.augment
    self.padding = int(data_cfg.crop_padding)
    self._cache = (None, None)

  def _permutation(self, epoch: int) -> np.ndarray:
    """Epoch ``epoch``'s order [N], cached for the current epoch."""
    cached_epoch, perm = self._cache
    if cached_epoch != epoch:
      perm = epoch_permutation(len(self.labels), self.seed, epoch)
      self._cache = (epoch, perm)
    return perm

  def __call__(self, step: int) -> dict:
    epoch, b = divmod(int(step), self.steps)
    g = self.global_batch_size
    idx = self._permutation(epoch)[b * g:(b + 1) * g]
    mine = slice(self.start, self.start + self.local)
    images = self.images[idx[mine]]
    if self.augment == "crop_flip":
      rng = np.random.default_rng([self.seed, _AUGMENT_TAG, epoch, b])
      offsets, flips = crop_flip_params(rng, g, self.padding)
      images = crop_flip(images, offsets[mine], flips[mine], self.padding)
    return {"image": normalize(images, self.mean, self.std),
            "label": self.labels[idx[mine]],
            "index": idx[mine].astype(np.int32)}


def _builders(source) -> tuple[type, type]:
  """(train, eval) batch builders: in-memory arrays, or a streaming source."""
  if getattr(source, "streaming", False):
    from kdjax.data import streaming  # pylint: disable=g-import-not-at-top

    return streaming.StreamTrainBatch, streaming.StreamEvalBatch
  return _TrainBatch, _EvalBatch


def make_train_iterator(source, data_cfg, *, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1):
  """An endless iterator of this process's training batches.

  Yields {"image": float32 [B,H,W,C], "label": int32 [B], "index": int32 [B]}
  (dataset indices of the examples) with B = global_batch_size // process_count. Each epoch is a fresh permutation
  seeded by (seed, epoch), its last incomplete batch dropped. The returned
  grain iterator has ``get_state()`` (a JSON-serialisable dict) and
  ``set_state(state)``; ``data_cfg.num_workers > 0`` prefetches in grain
  worker processes.
  """
  batch_cls = _builders(source)[0]
  batch_fn = batch_cls(source, data_cfg, global_batch_size, seed,
                       process_index, process_count)
  dataset = grain.MapDataset.range(sys.maxsize).map(batch_fn)
  return iter(_prefetched(dataset, data_cfg.num_workers))


def _prefetched(dataset, num_workers: int):
  """``dataset`` as an IterDataset, built in ``num_workers`` grain worker
  processes when > 0 (order kept)."""
  iter_dataset = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
  if num_workers > 0:
    # grain's worker processes read absl flags; outside an absl app use their
    # defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_dataset = iter_dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=int(num_workers)))
  return iter_dataset


def eval_slice(b: int, reader, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Eval batch ``b``'s slice for ``reader`` (global_batch_size, start, local)
  over a split of ``n``: example indices int [B] (padding repeats the last one)
  and mask float32 [B] (0 on padding)."""
  first = b * reader.global_batch_size + reader.start
  positions = np.arange(first, first + reader.local)
  return np.minimum(positions, n - 1), (positions < n).astype(np.float32)


class _EvalBatch(_SplitReader):
  """Batch number -> this process's slice of the in-order, padded eval batch."""

  def __call__(self, b: int) -> dict:
    idx, mask = eval_slice(b, self, len(self.labels))
    return {"image": normalize(self.images[idx], self.mean, self.std),
            "label": self.labels[idx],
            "mask": mask}


def eval_batches(source, data_cfg, *, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1):
  """The whole split once, in order, unaugmented: a re-iterable grain MapDataset.

  Each element is {"image": float32 [B,H,W,C], "label": int32 [B],
  "mask": float32 [B]} with B = global_batch_size // process_count; the last
  global batch is padded (mask 0) so every batch has the same shape. All
  processes see the same number of batches. A streaming source is decoded in
  ``data_cfg.num_workers`` grain worker processes (then an iterable, in order).
  """
  if len(source) == 0:
    raise ValueError("eval_batches needs a non-empty source")
  num_batches = -(-len(source) // global_batch_size)
  batch_cls = _builders(source)[1]
  batch_fn = batch_cls(source, data_cfg, global_batch_size, process_index,
                       process_count)
  dataset = grain.MapDataset.range(num_batches).map(batch_fn)
  if getattr(source, "streaming", False) and data_cfg.num_workers > 0:
    return _prefetched(dataset, data_cfg.num_workers)
  return dataset
