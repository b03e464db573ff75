"""Streaming sources for ImageNet-scale datasets: read lazily, decoded on access.

A :class:`StreamingSource` wraps any random-access sequence of
``{"image": uint8 [H,W,C] or [H,W], "label": int}`` items, typically a TFDS
array_record split opened with ``tfds.data_source`` (no TensorFlow, no copy
into memory: an item is read and decoded only when a batch asks for it). A
subset (the validation carve) is an index array over the same reader.

Batches follow the same contract as the in-memory pipeline (see
``kdjax.data.pipeline``): global step ``g`` holds positions
``[b*G, (b+1)*G)`` of epoch ``e``'s permutation (``e, b = divmod(g, steps)``),
each process decodes only its contiguous slice, and an example's augmentation
is drawn from ``(seed, epoch, global position)``. So a batch depends only on
``(seed, step)``, the processes' slices together equal the single-process
batch, and the iterator state is the next step.

Preprocessing (images of any size become ``image_size`` squares):
  training, ``augment="inception_crop"``: a random box of 8%–100% of the
    image area with aspect ratio in [3/4, 4/3], resized to image_size, then a
    horizontal flip with probability 1/2;
  evaluation (and training with ``augment="none"``): resize the shorter side
    to ``round(image_size / 0.875)``, then take the centred image_size square.
  ``augment="crop_flip"``, for datasets stored at their training size (e.g. 64×64
    downsampled ImageNet): images must be image_size squares; training pads by
    ``crop_padding``, crops at a random offset and flips (the CIFAR protocol),
    evaluation uses them as stored.
Both resize bilinearly (Pillow) and normalise with ``data.mean``/``data.std``.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from kdjax.data import pipeline

VALID_STREAM_AUGMENTATIONS = ("none", "inception_crop", "crop_flip")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875
CROP_AREA_RANGE = (0.08, 1.0)
CROP_RATIO_RANGE = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10

# Seed-sequence tag of the per-example augmentation stream (the in-memory
# pipeline uses 0 for permutations and 1 for its batch-level augmentation).
_EXAMPLE_AUGMENT_TAG = 3


class StreamingSource:
  """Lazy random access to ``data`` (optionally through an index subset).

  ``source[i]`` reads item ``indices[i]`` (or ``i``) from ``data`` and returns
  ``{"image": uint8 [H,W,C], "label": int32}``; nothing is cached.
  """

  streaming = True

  def __init__(self, data, indices: np.ndarray | None = None):
    self.data = data
    self.indices = None if indices is None else np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.data) if self.indices is None else len(self.indices)

  def __getitem__(self, index: int) -> dict:
    i = int(index) if self.indices is None else int(self.indices[index])
    item = self.data[i]
    image = np.asarray(item["image"], np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    return {"image": image, "label": np.int32(item["label"])}

  def subset(self, indices: np.ndarray) -> "StreamingSource":
    """The examples at ``indices`` [M] of this source, as a view (no reads)."""
    indices = np.asarray(indices, np.int64)
    inner = indices if self.indices is None else self.indices[indices]
    return StreamingSource(self.data, inner)


def check_stream_config(data_cfg) -> None:
  """Fails early on a streaming config the pipeline cannot run."""
  if data_cfg.augment not in VALID_STREAM_AUGMENTATIONS:
    raise ValueError(
        f"Unknown data.augment {data_cfg.augment!r} for data.source="
        f"{data_cfg.source!r}; valid: {', '.join(VALID_STREAM_AUGMENTATIONS)}")
  if int(data_cfg.image_size) <= 0:
    raise ValueError(
        f"data.image_size={data_cfg.image_size} must be > 0 for data.source="
        f"{data_cfg.source!r} (images of any size are cropped to this square)")


# ----------------------------------------------------------------------------
# Geometry and resizing (boxes are (top, left, height, width) in pixels)


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            area_range=CROP_AREA_RANGE,
                            ratio_range=CROP_RATIO_RANGE) -> tuple:
  """A random box covering a fraction of the image area in ``area_range``
  with aspect ratio (width/height) in ``ratio_range``, log-uniform.

  Up to CROP_ATTEMPTS draws; if none fits inside the image, the largest
  centred box whose ratio is clipped to ``ratio_range``.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio_range[0]), math.log(ratio_range[1])
  for _ in range(CROP_ATTEMPTS):
    target = area * rng.uniform(*area_range)
    ratio = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * ratio)))
    h = int(round(math.sqrt(target / ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  ratio = min(max(width / height, ratio_range[0]), ratio_range[1])
  if width / height > ratio:  # too wide: keep the height
    h, w = height, int(round(height * ratio))
  else:
    h, w = int(round(width / ratio)), width
  return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int, image_size: int,
                    fraction: float = EVAL_CROP_FRACTION) -> tuple:
  """The evaluation box in original pixels (float): the centred window that,
  after scaling the shorter side to ``round(image_size / fraction)``, is the
  ``image_size`` square."""
  resized = round(image_size / fraction)
  scale = min(height, width) / resized  # original pixels per resized pixel
  new_h, new_w = round(height / scale), round(width / scale)
  top = (new_h - image_size) // 2
  left = (new_w - image_size) // 2
  sy, sx = height / new_h, width / new_w
  return top * sy, left * sx, image_size * sy, image_size * sx


def crop_resize(image: np.ndarray, box: tuple, size: int) -> np.ndarray:
  """uint8 [H,W,C] -> the ``box`` (top, left, height, width) resized to
  uint8 [size,size,C], bilinear with Pillow's antialiasing."""
  top, left, h, w = box

  def resize(plane: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(plane)).resize(
        (size, size), Image.BILINEAR, box=(left, top, left + w, top + h)))

  if image.shape[-1] == 3:  # one RGB resize
    return resize(image)
  return np.stack([resize(image[..., c]) for c in range(image.shape[-1])],
                  axis=-1)


def eval_preprocess(image: np.ndarray, image_size: int) -> np.ndarray:
  """Resize the shorter side to image_size/0.875 and take the centred square."""
  box = center_crop_box(image.shape[0], image.shape[1], image_size)
  return crop_resize(image, box, image_size)


def train_preprocess(image: np.ndarray, image_size: int,
                     rng: np.random.Generator) -> np.ndarray:
  """Random-resized crop to image_size, then a horizontal flip with p = 1/2."""
  box = random_resized_crop_box(rng, image.shape[0], image.shape[1])
  out = crop_resize(image, box, image_size)
  return out[:, ::-1] if rng.random() < 0.5 else out


def example_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
  """The augmentation stream of global ``position`` in ``epoch``."""
  return np.random.default_rng([seed, _EXAMPLE_AUGMENT_TAG, epoch, position])


# ----------------------------------------------------------------------------
# Batch builders (grain map functions; picklable for worker processes)


class _StreamReader:
  """This process's slice of global batches of a streaming split."""

  def __init__(self, source, data_cfg, global_batch_size, process_index,
               process_count):
    check_stream_config(data_cfg)
    self.source = source
    self.global_batch_size = global_batch_size
    self.local = pipeline.local_batch_size(global_batch_size, process_count)
    self.start = process_index * self.local
    self.image_size = int(data_cfg.image_size)
    self.augment = data_cfg.augment
    self.padding = int(data_cfg.crop_padding)
    self.mean = tuple(data_cfg.mean)
    self.std = tuple(data_cfg.std)

  def _eval_image(self, image: np.ndarray) -> np.ndarray:
    """Evaluation preprocessing; with "crop_flip" the stored image, checked."""
    if self.augment != "crop_flip":
      return eval_preprocess(image, self.image_size)
    if image.shape[:2] != (self.image_size, self.image_size):
      raise ValueError(
          f"data.augment='crop_flip' streams images stored at data.image_size "
          f"({self.image_size}x{self.image_size}), got {image.shape[0]}x"
          f"{image.shape[1]}; use 'inception_crop' for images of other sizes")
    return image

  def _batch(self, images: list, labels: list) -> dict:
    return {"image": pipeline.normalize(np.stack(images), self.mean, self.std),
            "label": np.asarray(labels, np.int32)}


class StreamTrainBatch(_StreamReader):
  """Global step -> this process's preprocessed, normalised training batch."""

  def __init__(self, source, data_cfg, global_batch_size, seed, process_index,
               process_count):
    super().__init__(source, data_cfg, global_batch_size, process_index,
                     process_count)
    self.steps = pipeline.steps_per_epoch(len(source), global_batch_size)
    self.seed = seed
    self._cache = (None, None)

  def _permutation(self, epoch: int) -> np.ndarray:
    cached_epoch, perm = self._cache
    if cached_epoch != epoch:
      perm = pipeline.epoch_permutation(len(self.source), self.seed, epoch)
      self._cache = (epoch, perm)
    return perm

  def __call__(self, step: int) -> dict:
    epoch, b = divmod(int(step), self.steps)
    perm = self._permutation(epoch)
    first = b * self.global_batch_size + self.start
    images, labels = [], []
    for position in range(first, first + self.local):
      item = self.source[perm[position]]
      rng = example_rng(self.seed, epoch, position)
      images.append(self._train_image(item["image"], rng))
      labels.append(item["label"])
    return self._batch(images, labels)

  def _train_image(self, image: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    if self.augment == "inception_crop":
      return train_preprocess(image, self.image_size, rng)
    image = self._eval_image(image)
    if self.augment == "crop_flip":
      offsets, flips = pipeline.crop_flip_params(rng, 1, self.padding)
      image = pipeline.crop_flip(image[None], offsets, flips, self.padding)[0]
    return image


class StreamEvalBatch(_StreamReader):
  """Batch number -> this process's slice of the in-order, padded eval batch."""

  def __call__(self, b: int) -> dict:
    idx, mask = pipeline.eval_slice(b, self, len(self.source))
    images, labels = [], []
    for i in idx:
      item = self.source[i]
      images.append(self._eval_image(item["image"]))
      labels.append(item["label"])
    batch = self._batch(images, labels)
    batch["mask"] = mask
    return batch


# ----------------------------------------------------------------------------
# TFDS


def tfds_stream_source(name: str, split: str, data_dir: str = ""):
  """Opens a TFDS split prepared in array_record format, lazily.

  Returns (StreamingSource, num_classes, channels). Raises
  MissingDatasetError (with the prepare command) when it is not prepared.
  """
  from kdjax.data import sources  # pylint: disable=g-import-not-at-top

  data = sources.open_tfds(name, split, data_dir)
  features = data.dataset_info.features
  channels = features["image"].shape[-1] or 3
  return (StreamingSource(data), int(features["label"].num_classes),
          int(channels))
