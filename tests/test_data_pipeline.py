"""Data layer: IDX/TFDS/synthetic sources, splits, augmentation, epochs, resume, sharding."""

import gzip
import pathlib
import struct

import numpy as np
import pytest

from kdjax import config_lib
from kdjax.data import (MissingDatasetError, default_data_config, eval_batches, idx_source,
                        load_splits, make_train_iterator, pipeline, sources)

FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")


def write_idx(path, array, compress):
    """MNIST IDX writer (independent of the reader): magic 0x0000 0x08 ndim, big-endian dims."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(data)


def make_idx_dir(directory, n_train=30, n_test=10, compress=True, rng=None):
    rng = rng or np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels, compress)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    arrays = make_idx_dir(tmp_path, compress=compress)
    train = idx_source(tmp_path, "train")
    np.testing.assert_array_equal(train.images[..., 0], arrays["train"][0])
    np.testing.assert_array_equal(train.labels, arrays["train"][1])
    assert train[3]["image"].shape == (28, 28, 1)


def test_corrupt_idx_is_a_clear_error(tmp_path):
    make_idx_dir(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[2] = 0x0D  # wrong element type in the magic number
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="train-images"):
        idx_source(tmp_path, "train")


def test_missing_dataset_names_dir_and_command(tmp_path):
    cfg = default_data_config()
    cfg.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(MissingDatasetError) as err:
        load_splits(cfg, seed=0)
    assert str(tmp_path / "nowhere") in str(err.value)
    assert "apt-get install -y dataset-fashion-mnist" in str(err.value)


def test_tfds_missing_dataset_names_prepare_command(tmp_path):
    cfg = config_lib.cifar_data("cifar100")
    cfg.data_dir = str(tmp_path)
    with pytest.raises(MissingDatasetError) as err:
        load_splits(cfg, seed=0)
    assert "python -m kdjax.data.prepare cifar100" in str(err.value) and str(tmp_path) in str(err.value)


def test_tfds_source_through_mock_data():
    import tensorflow_datasets as tfds

    cfg = default_data_config()
    cfg.name, cfg.source, cfg.validation_size = "mnist", "tfds", 5
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        splits = load_splits(cfg, seed=0)
    assert splits.info.num_classes == 10 and splits.info.image_shape == (28, 28, 1)
    assert len(splits.train) == 19 and len(splits.validation) == 5 and len(splits.test) == 24
    assert splits.train.images.dtype == np.uint8


@pytest.mark.skipif(not FASHION.exists(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_splits():
    splits = load_splits(config_lib.fashion_mnist_data(), seed=0)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (55000, 5000, 10000)
    assert splits.info == sources.DatasetInfo(10, (28, 28, 1), "fashion_mnist")
    # validation carved from train: disjoint example sets (compare raw bytes of images)
    train_keys = {img.tobytes() for img in splits.train.images[:5000]}
    assert not any(img.tobytes() in train_keys for img in splits.validation.images[:500])


def test_split_indices_disjoint_and_sized():
    train, val = sources.split_indices(100, 20, 0, seed=3)
    assert len(val) == 20 and len(train) == 80 and not set(train) & set(val)
    train, _ = sources.split_indices(100, 20, 50, seed=3)
    assert len(train) == 50


def brute_force_matches(out, image, p):
    """True if ``out`` is some window of the zero-padded image, flipped or not."""
    h, w, _ = image.shape
    padded = np.pad(image, ((p, p), (p, p), (0, 0)))
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            window = padded[dy:dy + h, dx:dx + w]
            if np.array_equal(out, window) or np.array_equal(out, window[:, ::-1]):
                return True
    return False


def synthetic_source(n=256, shape=(8, 8, 3)):
    return sources.synthetic_source(n, shape, 10, seed=0)


def data_cfg(augment="none", channels=3):
    cfg = default_data_config()
    cfg.augment = augment
    cfg.mean, cfg.std = (0.5,) * channels, (0.25,) * channels
    return cfg


def test_crop_flip_is_a_shifted_window():
    rng = np.random.default_rng(1)
    images = rng.integers(1, 256, (16, 8, 8, 3), dtype=np.uint8)
    offsets, flips = pipeline.crop_flip_params(rng, 16, 2)
    out = pipeline.crop_flip(images, offsets, flips, 2)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert all(brute_force_matches(out[i], images[i], 2) for i in range(16))
    assert flips.any() and not flips.all()


def test_normalisation_and_no_augmentation():
    source = synthetic_source()
    batch = next(make_train_iterator(source, data_cfg("none"), global_batch_size=32, seed=0))
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    # Without augmentation each image is exactly (x/255 - mean)/std of a source image.
    raw = batch["image"] * 0.25 + 0.5
    restored = np.round(raw * 255).astype(np.uint8)
    keys = {img.tobytes(): i for i, img in enumerate(source.images)}
    for img, label in zip(restored, batch["label"]):
        assert source.labels[keys[img.tobytes()]] == label


def epoch_labels_order(source, cfg, batch, seed, steps):
    it = make_train_iterator(source, cfg, global_batch_size=batch, seed=seed)
    return [next(it) for _ in range(steps)]


def test_epochs_are_reshuffled_permutations():
    source = sources.ArraySource(np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1) * 2,
                                 np.arange(100) % 10)
    cfg = data_cfg("none", channels=1)
    per_epoch = pipeline.steps_per_epoch(100, 32)  # 3 full batches; 4 examples dropped
    batches = epoch_labels_order(source, cfg, 32, seed=5, steps=2 * per_epoch)
    ids = [np.round((b["image"][:, 0, 0, 0] * 0.25 + 0.5) * 255 / 2).astype(int) for b in batches]
    epoch0, epoch1 = np.concatenate(ids[:per_epoch]), np.concatenate(ids[per_epoch:])
    assert len(set(epoch0)) == 96 and len(set(epoch1)) == 96  # no duplicates within an epoch
    assert not np.array_equal(epoch0, epoch1)                  # a new order each epoch
    again = epoch_labels_order(source, cfg, 32, seed=5, steps=per_epoch)
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a["image"], b["image"])


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_resume_yields_the_same_batches(augment):
    source = synthetic_source(n=96)
    cfg = data_cfg(augment)
    it = make_train_iterator(source, cfg, global_batch_size=16, seed=2)
    for _ in range(4):  # 6 steps per epoch: the continuation crosses an epoch
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    resumed = make_train_iterator(source, cfg, global_batch_size=16, seed=2)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_process_slices_partition_the_global_batch():
    source = synthetic_source(n=128)
    cfg = data_cfg("crop_flip")
    whole = next(make_train_iterator(source, cfg, global_batch_size=32, seed=1))
    parts = [next(make_train_iterator(source, cfg, global_batch_size=32, seed=1,
                                      process_index=i, process_count=2)) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])
    np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), whole["label"])
    with pytest.raises(ValueError, match="divisible"):
        make_train_iterator(source, cfg, global_batch_size=33, seed=1, process_count=2)


def test_eval_batches_cover_each_example_once():
    source = synthetic_source(n=70)
    cfg = data_cfg("crop_flip")  # augmentation must not apply to evaluation
    batches = list(eval_batches(source, cfg, global_batch_size=32))
    assert len(batches) == 3 and all(b["image"].shape[0] == 32 for b in batches)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 70 and np.all(mask[:70] == 1) and np.all(mask[70:] == 0)
    images = np.concatenate([b["image"] for b in batches])[:70]
    np.testing.assert_allclose(images, (source.images / 255.0 - 0.5) / 0.25, atol=1e-5)


def test_bad_normalisation_is_a_clear_error():
    cfg = data_cfg("none", channels=1)  # one value for 3-channel images
    with pytest.raises(ValueError, match="one value per channel"):
        make_train_iterator(synthetic_source(), cfg, global_batch_size=16, seed=0)
