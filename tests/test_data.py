"""Tests of kdjax.data: sources (IDX, TFDS, synthetic), splits and grain pipelines."""

import gzip
import json
import os
import struct

import numpy as np
import pytest

from kdjax import data

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def write_idx(path, array, gz):
  """Writes a uint8 array as an IDX file (our own writer, independent of read_idx)."""
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(
      f">{array.ndim}I", *array.shape)
  opener = gzip.open if gz else open
  with opener(path, "wb") as f:
    f.write(header + array.tobytes())


def write_idx_folder(directory, split_prefix, images, labels, gz):
  suffix = ".gz" if gz else ""
  write_idx(directory / f"{split_prefix}-images-idx3-ubyte{suffix}", images, gz)
  write_idx(directory / f"{split_prefix}-labels-idx1-ubyte{suffix}", labels, gz)


def array_cfg(**overrides):
  """A data config for in-memory test sources (3 channels)."""
  cfg = data.default_data_config()
  cfg.mean = (0.5, 0.5, 0.5)
  cfg.std = (0.5, 0.5, 0.5)
  cfg.update(overrides)
  return cfg


def indexed_source(n, shape=(8, 8, 3), seed=0):
  """Random images whose label is their index, so batches reveal their examples."""
  images = np.random.default_rng(seed).integers(0, 256, (n, *shape), np.uint8)
  return data.ArraySource(images, np.arange(n, dtype=np.int32))


def denormalize(images, mean, std):
  """Inverse of (x/255 - mean)/std, rounded back to uint8."""
  x = (images * np.asarray(std, np.float32) + np.asarray(mean, np.float32)) * 255
  return np.round(x).astype(np.uint8)


def take(iterator, k):
  return [next(iterator) for _ in range(k)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# ----------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
  rng = np.random.default_rng(0)
  train_x = rng.integers(0, 256, (7, 5, 4), np.uint8)
  train_y = rng.integers(0, 10, 7, np.uint8)
  test_x = rng.integers(0, 256, (3, 5, 4), np.uint8)
  test_y = rng.integers(0, 10, 3, np.uint8)
  write_idx_folder(tmp_path, "train", train_x, train_y, gz)
  write_idx_folder(tmp_path, "t10k", test_x, test_y, gz)

  train = data.idx_source(tmp_path, "train")
  test = data.idx_source(tmp_path, "test")
  np.testing.assert_array_equal(train.images, train_x[..., None])
  np.testing.assert_array_equal(train.labels, train_y)
  np.testing.assert_array_equal(test.images, test_x[..., None])
  assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
  item = train[2]
  assert item["image"].shape == (5, 4, 1) and int(item["label"]) == train_y[2]


def test_idx_corrupt_magic_and_size(tmp_path):
  images = np.zeros((2, 3, 3), np.uint8)
  write_idx_folder(tmp_path, "train", images, np.zeros(2, np.uint8), gz=False)
  path = tmp_path / "train-images-idx3-ubyte"
  raw = bytearray(path.read_bytes())
  raw[2] = 0x0D  # float32 type code instead of ubyte
  path.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="magic"):
    data.idx_source(tmp_path, "train")
  raw[2] = 0x08
  path.write_bytes(bytes(raw[:-1]))  # one data byte short
  with pytest.raises(ValueError, match="data bytes"):
    data.idx_source(tmp_path, "train")


def test_idx_missing_dir_names_dir_and_command(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(data.MissingDatasetError) as e:
    data.idx_source(missing, "train")
  assert str(missing) in str(e.value)
  assert "apt-get install -y dataset-fashion-mnist" in str(e.value)
  assert isinstance(e.value, FileNotFoundError)

  cfg = data.default_data_config()
  cfg.data_dir = str(missing)
  with pytest.raises(data.MissingDatasetError, match="apt-get install"):
    data.load_splits(cfg, seed=0)


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR),
                    reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_splits():
  cfg = data.default_data_config()
  splits = data.load_splits(cfg, seed=0)
  assert (len(splits.train), len(splits.validation), len(splits.test)) == (
      55000, 5000, 10000)
  assert splits.info == data.DatasetInfo(10, (28, 28, 1), "fashion_mnist")
  assert splits.train.images.shape == (55000, 28, 28, 1)
  train_idx, val_idx = data.split_indices(60000, 5000, 0, seed=0)
  assert not set(train_idx) & set(val_idx)
  assert len(set(train_idx) | set(val_idx)) == 60000
  full = data.idx_source(FASHION_DIR, "train")
  np.testing.assert_array_equal(splits.validation.labels, full.labels[val_idx])
  np.testing.assert_array_equal(splits.train.images, full.images[train_idx])


# ----------------------------------------------------------------------------
# Splits, synthetic, config errors


def test_split_indices():
  train_idx, val_idx = data.split_indices(100, 20, 0, seed=3)
  assert len(train_idx) == 80 and len(val_idx) == 20
  assert sorted(np.concatenate([train_idx, val_idx])) == list(range(100))
  again, _ = data.split_indices(100, 20, 0, seed=3)
  np.testing.assert_array_equal(train_idx, again)
  _, other_val = data.split_indices(100, 20, 0, seed=4)
  assert set(other_val) != set(val_idx)
  small, _ = data.split_indices(100, 20, 30, seed=3)
  np.testing.assert_array_equal(small, train_idx[:30])
  with pytest.raises(ValueError):
    data.split_indices(10, 10, 0, seed=0)


def test_synthetic_splits_and_learnable():
  cfg = data.default_data_config()
  cfg.update(source="synthetic", name="synthetic", validation_size=0,
             synthetic_train=300, synthetic_test=100, synthetic_classes=4,
             synthetic_shape=(6, 6, 2))
  splits = data.load_splits(cfg, seed=1)
  assert splits.validation is None
  assert len(splits.train) == 300 and len(splits.test) == 100
  assert splits.info == data.DatasetInfo(4, (6, 6, 2), "synthetic")
  again = data.load_splits(cfg, seed=1)
  np.testing.assert_array_equal(splits.train.images, again.train.images)
  # Nearest class mean, fitted on train, classifies test almost perfectly.
  x = splits.train.images.reshape(300, -1).astype(np.float32)
  means = np.stack([x[splits.train.labels == c].mean(0) for c in range(4)])
  xt = splits.test.images.reshape(100, -1).astype(np.float32)
  pred = np.argmin(((xt[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert (pred == splits.test.labels).mean() > 0.9


def test_unknown_source_lists_valid_ones():
  cfg = data.default_data_config()
  cfg.source = "csv"
  with pytest.raises(ValueError, match="idx, tfds, tfds_stream, synthetic"):
    data.load_splits(cfg, seed=0)


# ----------------------------------------------------------------------------
# TFDS (mock_data serves array_record data_source without TensorFlow)


def test_tfds_source_with_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12):
    source, info = data.tfds_source("cifar10", "train", str(tmp_path))
    cfg = data.default_data_config()
    cfg.update(source="tfds", name="cifar10", validation_size=2,
               data_dir=str(tmp_path))
    splits = data.load_splits(cfg, seed=0)
  assert len(source) == 12
  assert source.images.shape == (12, 32, 32, 3)
  assert source.images.dtype == np.uint8 and source.labels.dtype == np.int32
  assert info == data.DatasetInfo(10, (32, 32, 3), "cifar10")
  assert (len(splits.train), len(splits.validation), len(splits.test)) == (
      10, 2, 12)
  assert set(source.labels.tolist()) <= set(range(10))


def test_tfds_missing_names_prepare_command(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(data.MissingDatasetError) as e:
    data.tfds_source("cifar10", "train", str(tmp_path))
  message = str(e.value)
  assert str(tmp_path) in message
  assert "pip install 'kdjax[tf]'" in message
  assert f"python -m kdjax.data.prepare cifar10 --data_dir={tmp_path}" in message


def test_prepare_without_tf_names_extra(capsys):
  from kdjax.data import prepare  # pylint: disable=g-import-not-at-top
  if not prepare.missing_prepare_deps():
    pytest.skip("TensorFlow is installed; prepare would download")
  assert prepare.main(["cifar10", "--data_dir", "/nonexistent"]) == 1
  assert "pip install 'kdjax[tf]'" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# Augmentation and normalisation


def matches_some_window(out, image, padding):
  """Brute force: is ``out`` one of the 2(2p+1)^2 shifted/flipped windows?"""
  h, w, _ = image.shape
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  for dy in range(2 * padding + 1):
    for dx in range(2 * padding + 1):
      window = padded[dy:dy + h, dx:dx + w]
      if np.array_equal(out, window) or np.array_equal(out, window[:, ::-1]):
        return True
  return False


def test_crop_flip_outputs_are_padded_windows():
  source = indexed_source(24, shape=(6, 7, 3))
  cfg = array_cfg(augment="crop_flip", crop_padding=2)
  iterator = data.make_train_iterator(source, cfg, global_batch_size=8, seed=0)
  moved = 0
  for batch in take(iterator, 3):
    assert batch["image"].shape == (8, 6, 7, 3)
    assert batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    raw = denormalize(batch["image"], cfg.mean, cfg.std)
    for out, label in zip(raw, batch["label"]):
      original = source.images[label]
      assert matches_some_window(out, original, padding=2)
      moved += not np.array_equal(out, original)
  assert moved > 0  # augmentation actually happens


def test_crop_flip_function_matches_definition():
  images = np.arange(2 * 3 * 4 * 1, dtype=np.uint8).reshape(2, 3, 4, 1)
  out = data.crop_flip(images, np.array([[1, 1], [0, 2]]),
                       np.array([False, True]), padding=1)
  np.testing.assert_array_equal(out[0], images[0])  # centre, no flip
  padded = np.pad(images[1], ((1, 1), (1, 1), (0, 0)))
  np.testing.assert_array_equal(out[1], padded[0:3, 2:6][:, ::-1])


def test_none_augment_is_normalised_identity():
  source = indexed_source(20)
  mean, std = (0.2, 0.4, 0.6), (0.3, 0.5, 0.7)
  cfg = array_cfg(augment="none", mean=mean, std=std)
  batch = next(data.make_train_iterator(source, cfg, global_batch_size=5,
                                        seed=0))
  expected = (source.images[batch["label"]] / 255.0 - np.array(mean)) / np.array(
      std)
  np.testing.assert_allclose(batch["image"], expected, rtol=1e-5, atol=1e-5)


def test_mean_std_length_must_match_channels():
  source = indexed_source(20)
  cfg = array_cfg(mean=(0.5,), std=(0.5,))
  with pytest.raises(ValueError, match="one value per channel"):
    data.make_train_iterator(source, cfg, global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="one value per channel"):
    data.eval_batches(source, cfg, global_batch_size=4)


# ----------------------------------------------------------------------------
# Shuffling, resumption, process split


def epoch_labels(iterator, steps):
  return np.concatenate([b["label"] for b in take(iterator, steps)])


def test_per_epoch_reshuffle():
  source = indexed_source(50)
  cfg = array_cfg()
  steps = data.steps_per_epoch(50, 8)
  assert steps == 6
  iterator = data.make_train_iterator(source, cfg, global_batch_size=8, seed=7)
  epoch0 = epoch_labels(iterator, steps)
  epoch1 = epoch_labels(iterator, steps)
  for epoch in (epoch0, epoch1):
    assert len(epoch) == 48 and len(set(epoch.tolist())) == 48  # remainder dropped
  assert not np.array_equal(epoch0, epoch1)
  same = data.make_train_iterator(source, cfg, global_batch_size=8, seed=7)
  np.testing.assert_array_equal(epoch_labels(same, steps), epoch0)
  other = data.make_train_iterator(source, cfg, global_batch_size=8, seed=8)
  assert not np.array_equal(epoch_labels(other, steps), epoch0)


@pytest.mark.parametrize("k", [2, 5])  # the n=4 later batches cross epoch 0 -> 1
def test_resume_from_state(k):
  source = indexed_source(50)
  cfg = array_cfg(augment="crop_flip", crop_padding=2)
  original = data.make_train_iterator(source, cfg, global_batch_size=8, seed=3)
  take(original, k)
  state = json.loads(json.dumps(original.get_state()))
  expected = take(original, 4)
  resumed = data.make_train_iterator(source, cfg, global_batch_size=8, seed=3)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 4), expected)


def test_process_split_partitions_global_batch():
  source = indexed_source(50)
  cfg = array_cfg(augment="crop_flip", crop_padding=2)
  kwargs = dict(global_batch_size=8, seed=5)
  single = take(data.make_train_iterator(source, cfg, **kwargs), 8)
  parts = [take(data.make_train_iterator(source, cfg, process_index=p,
                                         process_count=2, **kwargs), 8)
           for p in range(2)]
  for step, whole in enumerate(single):
    a, b = parts[0][step], parts[1][step]
    assert a["image"].shape == (4, 8, 8, 3)
    assert not set(a["label"].tolist()) & set(b["label"].tolist())
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), whole[key])
  with pytest.raises(ValueError, match="divisible"):
    data.make_train_iterator(source, cfg, global_batch_size=9, seed=0,
                             process_count=2)


# ----------------------------------------------------------------------------
# Evaluation


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_split_once(process_count):
  source = indexed_source(50)
  cfg = array_cfg(augment="crop_flip")  # eval ignores augmentation
  per_process = [
      list(data.eval_batches(source, cfg, global_batch_size=16,
                             process_index=p, process_count=process_count))
      for p in range(process_count)]
  seen = []
  for batches in per_process:
    assert len(batches) == 4
    for batch in batches:
      assert batch["image"].shape == (16 // process_count, 8, 8, 3)
      assert batch["mask"].dtype == np.float32
      real = batch["mask"] == 1
      assert set(np.unique(batch["mask"]).tolist()) <= {0.0, 1.0}
      labels = batch["label"][real]
      np.testing.assert_allclose(
          batch["image"][real], data.normalize(source.images[labels], cfg.mean,
                                               cfg.std))
      seen.extend(labels.tolist())
  assert sorted(seen) == list(range(50))
  if process_count == 1:
    assert seen == list(range(50))  # in order
    np.testing.assert_array_equal(per_process[0][-1]["mask"],
                                  [1, 1] + [0] * 14)
