"""Random-access image-classification sources: IDX folders, TFDS, synthetic.

Every source is an :class:`ArraySource` holding the whole split in memory:
``images`` uint8 [N, H, W, C] and ``labels`` int32 [N]. It follows grain's
``RandomAccessDataSource`` protocol (``__len__``, ``__getitem__``); the input
pipeline reads ``images``/``labels`` directly to batch and augment vectorised.
Keeping splits in memory suits MNIST/CIFAR scale; ImageNet-scale splits use
``source="tfds_stream"`` (kdjax.data.streaming: read lazily, nothing copied).
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

VALID_SOURCES = ("idx", "tfds", "tfds_stream", "synthetic")
DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"
IDX_INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"
IDX_REINSTALL_HINT = "apt-get install --reinstall dataset-fashion-mnist"
# IDX files carry no class count: the MNIST-format datasets kdjax knows, by data.name.
IDX_NUM_CLASSES = {"fashion_mnist": 10, "mnist": 10, "kmnist": 10}

_IDX_UBYTE = 0x08
_IDX_PREFIX = {"train": "train", "test": "t10k"}


class MissingDatasetError(FileNotFoundError):
  """A dataset's files are absent; the message says where and how to prepare."""


class DatasetInfo(NamedTuple):
  """Static facts about a dataset: ``image_shape`` is (H, W, C)."""

  num_classes: int
  image_shape: tuple[int, int, int]
  name: str


class Splits(NamedTuple):
  """Train, validation (``None`` when ``validation_size == 0``) and test sources."""

  train: "ArraySource"
  validation: "ArraySource | None"
  test: "ArraySource"
  info: DatasetInfo


class ArraySource:
  """In-memory random-access source over uint8 images [N,H,W,C], int32 labels [N].

  ``source[i]`` is ``{"image": uint8[H,W,C], "label": int32}``.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(
          f"images must be uint8 [N,H,W,C], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
      raise ValueError(
          f"labels must be [N={len(images)}], got shape {labels.shape}")
    self.images = images
    self.labels = labels.astype(np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {"image": self.images[index], "label": self.labels[index]}

  def subset(self, indices: np.ndarray) -> "ArraySource":
    """A new source holding the examples at ``indices`` [M], in that order."""
    return ArraySource(self.images[indices], self.labels[indices])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C)."""
    return tuple(int(d) for d in self.images.shape[1:])


# ----------------------------------------------------------------------------
# IDX (MNIST format)


def _open_maybe_gzip(path: Path):
  with open(path, "rb") as f:
    gzipped = f.read(2) == b"\x1f\x8b"
  return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
  """Reads an IDX file of unsigned bytes with ``ndim`` dimensions (gzip or not).

  Returns a uint8 array of the shape stored in the header. Raises ValueError on
  a wrong magic number, dimension count or data size.
  """
  path = Path(path)
  try:
    with _open_maybe_gzip(path) as f:
      raw = f.read()
  except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    raise ValueError(f"{path} is damaged or truncated ({type(e).__name__}: {e}); "
                     f"{_repair_hint(path)}") from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4]!r})")
  if raw[2] != _IDX_UBYTE or raw[3] != ndim:
    raise ValueError(
        f"{path}: expected IDX magic 0x0000{_IDX_UBYTE:02x}{ndim:02x} "
        f"(uint8, {ndim}-d), got 0x{raw[:4].hex()}")
  header_end = 4 + 4 * ndim
  if len(raw) < header_end:
    raise ValueError(f"{path}: truncated IDX header")
  shape = tuple(int(d) for d in np.frombuffer(raw[4:header_end], dtype=">u4"))
  expected = int(np.prod(shape))
  if len(raw) - header_end != expected:
    raise ValueError(
        f"{path}: IDX header says shape {shape} ({expected} bytes) but the file "
        f"holds {len(raw) - header_end} data bytes; {_repair_hint(path)}")
  return np.frombuffer(raw, dtype=np.uint8, offset=header_end).reshape(shape)


def _repair_hint(path: Path) -> str:
  """How to get an intact copy of a damaged IDX file."""
  if path.parent == Path(DEFAULT_IDX_DIR):
    return f"reinstall the dataset with `{IDX_REINSTALL_HINT}`"
  return "replace it with an intact copy"


def check_labels(labels: np.ndarray, num_classes: int, where) -> None:
  """Raises ValueError naming ``where`` unless every label is in [0, num_classes)."""
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if len(bad):
    raise ValueError(
        f"{where}: label {int(labels[bad[0]])} at index {int(bad[0])} is outside "
        f"[0, {num_classes}) ({len(bad)} such labels); the dataset has "
        f"{num_classes} classes")


def idx_num_classes(name: str) -> int:
  """The class count of the MNIST-format dataset ``name`` (IDX_NUM_CLASSES)."""
  if name not in IDX_NUM_CLASSES:
    raise ValueError(
        f"data.name={name!r}: the class count of an IDX dataset is known for "
        f"{sorted(IDX_NUM_CLASSES)} only")
  return IDX_NUM_CLASSES[name]


def _find_idx_file(directory: Path, stem: str) -> Path | None:
  for name in (stem + ".gz", stem):
    if (directory / name).is_file():
      return directory / name
  return None


def idx_source(directory: str | os.PathLike, split: str,
               num_classes: int | None = None) -> ArraySource:
  """Reads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from a folder.

  ``split`` is "train" or "test". Images [N,28,28] gain a channel axis:
  [N,28,28,1]. Raises MissingDatasetError when the files are absent, ValueError
  for a damaged file or (given ``num_classes``) a label outside [0, num_classes).
  """
  if split not in _IDX_PREFIX:
    raise ValueError(f"IDX split must be one of {sorted(_IDX_PREFIX)}, got {split!r}")
  directory = Path(directory)
  prefix = _IDX_PREFIX[split]
  image_path = _find_idx_file(directory, f"{prefix}-images-idx3-ubyte")
  label_path = _find_idx_file(directory, f"{prefix}-labels-idx1-ubyte")
  if image_path is None or label_path is None:
    raise MissingDatasetError(
        f"No MNIST-format IDX files for split {split!r} in {directory} "
        f"(expected {prefix}-images-idx3-ubyte[.gz] and "
        f"{prefix}-labels-idx1-ubyte[.gz]). Install the embedded dataset with "
        f"`{IDX_INSTALL_HINT}`, or pass --config.data.data_dir=DIR with "
        f"MNIST-format files.")
  images = read_idx(image_path, ndim=3)
  labels = read_idx(label_path, ndim=1)
  if len(images) != len(labels):
    raise ValueError(
        f"{image_path} holds {len(images)} images but {label_path} holds "
        f"{len(labels)} labels")
  if num_classes is not None:
    check_labels(labels, num_classes, label_path)
  return ArraySource(images[..., None], labels)


# ----------------------------------------------------------------------------
# TFDS (array_record, no TensorFlow)


def default_tfds_dir() -> str:
  """$TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
      "~/tensorflow_datasets")


def tfds_prepare_hint(name: str, data_dir: str) -> str:
  """The shell command that prepares TFDS dataset ``name`` under ``data_dir``."""
  return (f"pip install 'kdjax[tf]' && python -m kdjax.data.prepare {name} "
          f"--data_dir={data_dir}")


def open_tfds(name: str, split: str, data_dir: str = ""):
  """A lazy ``tfds.data_source`` over a split prepared in array_record format.

  No TensorFlow needed; items are read and decoded on access. Raises
  MissingDatasetError when the dataset is not prepared under ``data_dir``.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_dir = data_dir or default_tfds_dir()
  try:
    return tfds.data_source(
        name, split=split, data_dir=data_dir, download=False,
        builder_kwargs={"file_format": "array_record"})
  except (tfds.core.registered.DatasetNotFoundError, KeyError,
          NotImplementedError, FileNotFoundError) as e:
    raise MissingDatasetError(
        f"TFDS dataset {name!r} (split {split!r}) is not prepared in "
        f"array_record format under {data_dir}: {e}. Prepare it with "
        f"`{tfds_prepare_hint(name, data_dir)}`.") from e


def tfds_source(name: str, split: str,
                data_dir: str = "") -> tuple[ArraySource, DatasetInfo]:
  """Loads a TFDS split prepared in array_record format into memory.

  Items' "image" uint8 [H,W,C] and "label" (read with :func:`open_tfds`)
  become an ArraySource; the info (num_classes, image shape) comes from the
  builder's features. Raises MissingDatasetError when the dataset is not
  prepared under ``data_dir``.
  """
  data = open_tfds(name, split, data_dir)
  features = data.dataset_info.features
  n = len(data)
  first = data[0] if n else None
  image_shape = tuple(first["image"].shape) if n else features["image"].shape
  images = np.empty((n, *image_shape), np.uint8)
  labels = np.empty((n,), np.int32)
  for i in range(n):
    item = first if i == 0 else data[i]
    images[i] = item["image"]
    labels[i] = item["label"]
  if images.ndim == 3:
    images = images[..., None]
  info = DatasetInfo(num_classes=int(features["label"].num_classes),
                     image_shape=tuple(images.shape[1:]), name=name)
  check_labels(labels, info.num_classes, f"TFDS {name} split {split!r} in {data_dir}")
  return ArraySource(images, labels), info


# ----------------------------------------------------------------------------
# Synthetic


def synthetic_source(num_examples: int, image_shape: tuple[int, int, int],
                     num_classes: int, *, seed: int,
                     stream: int = 0) -> ArraySource:
  """A learnable synthetic dataset: class template (fixed by ``seed``) + noise.

  Image i of class y is ``0.6 * template[y] + 0.4 * noise`` (uint8
  [N,H,W,C]). Different ``stream`` values draw different examples from the same
  class templates (use one stream for train and another for test).
  """
  shape = tuple(int(d) for d in image_shape)
  templates = np.random.default_rng([seed, 0]).integers(
      0, 256, (num_classes, *shape)).astype(np.float32)
  rng = np.random.default_rng([seed, 1, stream])
  labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
  noise = rng.integers(0, 256, (num_examples, *shape), dtype=np.uint8)
  images = 0.6 * templates[labels] + 0.4 * noise.astype(np.float32)
  return ArraySource(np.round(images).astype(np.uint8), labels)


# ----------------------------------------------------------------------------
# Splits


def split_indices(num_examples: int, validation_size: int, train_size: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Carves validation from the train split: returns (train_idx, val_idx).

  A seeded permutation of range(num_examples) gives the first
  ``validation_size`` entries to validation; the rest, in original order, go to
  train, truncated to ``train_size`` when it is > 0. Both int arrays, disjoint.
  """
  if not 0 <= validation_size < num_examples:
    raise ValueError(
        f"validation_size={validation_size} must be in [0, {num_examples})")
  perm = np.random.default_rng([seed, 2]).permutation(num_examples)
  val_idx = np.sort(perm[:validation_size])
  train_idx = np.sort(perm[validation_size:])
  if train_size > 0:
    train_idx = train_idx[:train_size]
  return train_idx, val_idx


def _load_train_test(data_cfg, seed: int):
  """Returns (train ArraySource, test ArraySource, DatasetInfo)."""
  source = data_cfg.source
  if source == "idx":
    directory = data_cfg.data_dir or DEFAULT_IDX_DIR
    num_classes = idx_num_classes(data_cfg.name)
    train = idx_source(directory, "train", num_classes)
    test = idx_source(directory, "test", num_classes)
    return train, test, DatasetInfo(num_classes, train.image_shape,
                                    data_cfg.name)
  if source == "tfds":
    train, info = tfds_source(data_cfg.name, "train", data_cfg.data_dir)
    test, _ = tfds_source(data_cfg.name, data_cfg.test_split, data_cfg.data_dir)
    return train, test, info
  if source == "tfds_stream":
    from kdjax.data import streaming  # pylint: disable=g-import-not-at-top

    streaming.check_stream_config(data_cfg)
    train, classes, channels = streaming.tfds_stream_source(
        data_cfg.name, "train", data_cfg.data_dir)
    test, _, _ = streaming.tfds_stream_source(
        data_cfg.name, data_cfg.test_split, data_cfg.data_dir)
    size = int(data_cfg.image_size)
    return train, test, DatasetInfo(classes, (size, size, channels),
                                    data_cfg.name)
  if source == "synthetic":
    shape = tuple(data_cfg.synthetic_shape)
    classes = int(data_cfg.synthetic_classes)
    train = synthetic_source(data_cfg.synthetic_train, shape, classes,
                             seed=seed, stream=0)
    test = synthetic_source(data_cfg.synthetic_test, shape, classes,
                            seed=seed, stream=1)
    return train, test, DatasetInfo(classes, shape, data_cfg.name)
  raise ValueError(
      f"Unknown data source {source!r}; valid sources: {', '.join(VALID_SOURCES)}")


def load_splits(data_cfg, seed: int) -> Splits:
  """Loads train/validation/test per the ``data`` config (see default_data_config).

  Validation (``data_cfg.validation_size`` examples) is carved from the train
  split with ``split_indices(..., seed)``; it is None when the size is 0. A
  streaming source's subsets are index views (nothing is read here).
  """
  train, test, info = _load_train_test(data_cfg, seed)
  train_idx, val_idx = split_indices(len(train), int(data_cfg.validation_size),
                                     int(data_cfg.train_size), seed)
  validation = train.subset(val_idx) if len(val_idx) else None
  return Splits(train.subset(train_idx), validation, test, info)
