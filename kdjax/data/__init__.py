"""Data layer: in-memory random-access sources and grain input pipelines.

Typical use::

  splits = load_splits(config.data, seed=config.seed)
  train_it = make_train_iterator(splits.train, config.data,
                                 global_batch_size=128, seed=config.seed)
  batch = next(train_it)  # {"image": f32[B,H,W,C], "label": i32[B]}
  for batch in eval_batches(splits.test, config.data, global_batch_size=256):
    ...                   # plus "mask": f32[B] (0 on padding)
"""

import ml_collections

from kdjax.data.pipeline import (crop_flip, epoch_permutation, eval_batches,
                                 local_batch_size, make_train_iterator,
                                 normalize, steps_per_epoch)
from kdjax.data.sources import (ArraySource, DatasetInfo, MissingDatasetError,
                                Splits, idx_source, load_splits, read_idx,
                                split_indices, synthetic_source, tfds_source)


def default_data_config() -> ml_collections.ConfigDict:
  """The ``data`` config section with its defaults (embedded Fashion-MNIST).

  name: dataset name ("fashion_mnist", "cifar10", "synthetic", any TFDS name).
  source: "idx" | "tfds" | "tfds_stream" | "synthetic" ("tfds_stream": an
    array_record split read lazily, for ImageNet scale; see
    kdjax.data.streaming).
  data_dir: "" = the default folder of the source (IDX: the Debian package's
    /usr/share/datasets/fashion-mnist; TFDS: $TFDS_DATA_DIR or
    ~/tensorflow_datasets).
  validation_size: examples carved from the train split (0 = no validation).
  train_size: 0 = all remaining training examples, N > 0 = only the first N.
  test_split: the TFDS split reported as test ("validation" for imagenet2012).
  augment: "none" | "crop_flip" (zero-pad by crop_padding, random crop, random
    horizontal flip); with tfds_stream "none" | "inception_crop" (random
    resized crop + flip) | "crop_flip" (images stored at image_size).
  image_size: tfds_stream only: the square side every image is cropped and
    resized to (0 = unset, required > 0 there).
  mean, std: per-channel normalisation (x/255 - mean)/std, one value a channel.
  synthetic_*: size, image shape (H,W,C) and classes of the synthetic source.
  num_workers: grain worker processes (0 = in-process).
  """
  return ml_collections.ConfigDict({
      "name": "fashion_mnist",
      "source": "idx",
      "data_dir": "",
      "validation_size": 5000,
      "train_size": 0,
      "test_split": "test",
      "augment": "none",
      "image_size": 0,
      "crop_padding": 4,
      "mean": (0.5,),
      "std": (0.5,),
      "synthetic_train": 512,
      "synthetic_test": 128,
      "synthetic_shape": (32, 32, 3),
      "synthetic_classes": 10,
      "num_workers": 0,
  })


__all__ = [
    "ArraySource", "DatasetInfo", "MissingDatasetError", "Splits", "crop_flip",
    "default_data_config", "epoch_permutation", "eval_batches", "idx_source",
    "load_splits", "local_batch_size", "make_train_iterator", "normalize",
    "read_idx", "split_indices", "steps_per_epoch", "synthetic_source",
    "tfds_source",
]
