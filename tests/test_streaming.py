"""Tests of kdjax.data.streaming: lazy TFDS array_record input at ImageNet scale."""

import math

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdjax import data
from kdjax.data import pipeline
from kdjax.data import streaming

MOCK_EXAMPLES = 24


class CountingData:
  """A random-access dataset that records which items were read."""

  def __init__(self, inner):
    self.inner = inner
    self.reads = []

  def __len__(self):
    return len(self.inner)

  def __getitem__(self, i):
    self.reads.append(int(i))
    return self.inner[i]


def stream_cfg(**overrides):
  cfg = data.default_data_config()
  cfg.update(dict(name="imagenet2012", source="tfds_stream", image_size=16,
                  augment="inception_crop", test_split="validation",
                  validation_size=4, mean=streaming.IMAGENET_MEAN,
                  std=streaming.IMAGENET_STD))
  cfg.update(overrides)
  return cfg


@pytest.fixture
def mock_imagenet():
  """imagenet2012 replaced by TFDS's generated mock (random sizes, no files)."""
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def counting_train(cfg, seed=0):
  """The train split of load_splits, with every read of the raw split recorded."""
  splits = data.load_splits(cfg, seed=seed)
  counter = CountingData(splits.train.data)
  return streaming.StreamingSource(counter, splits.train.indices), counter, splits


def take(iterator, k):
  return [next(iterator) for _ in range(k)]


def test_load_splits_reads_nothing_and_shapes(mock_imagenet):
  cfg = stream_cfg()
  source, counter, splits = counting_train(cfg)
  assert splits.info.image_shape == (16, 16, 3)
  assert splits.info.num_classes == 1000
  assert len(splits.train) == MOCK_EXAMPLES - 4 and len(splits.validation) == 4
  assert set(splits.train.indices).isdisjoint(splits.validation.indices)
  it = pipeline.make_train_iterator(source, cfg, global_batch_size=4, seed=0)
  batch = next(it)
  assert batch["image"].shape == (4, 16, 16, 3)
  assert batch["image"].dtype == np.float32
  # Only the first global batch was read (grain may prefetch a few more), never
  # the whole split.
  assert 4 <= len(counter.reads) <= 4 * 5 < MOCK_EXAMPLES * 2


def test_two_processes_cover_epoch_once(mock_imagenet):
  cfg = stream_cfg(validation_size=0)
  steps = MOCK_EXAMPLES // 6  # global batch 6: 4 steps cover the 24 examples
  reads = []
  for process_index in (0, 1):
    source, counter, _ = counting_train(cfg)
    batch_fn = streaming.StreamTrainBatch(source, cfg, 6, 0, process_index, 2)
    for step in range(steps):
      assert batch_fn(step)["image"].shape == (3, 16, 16, 3)
    reads.append(counter.reads)
  assert sorted(reads[0] + reads[1]) == list(range(MOCK_EXAMPLES))


def test_process_slices_equal_single_process_batch(mock_imagenet):
  cfg = stream_cfg()
  source, _, _ = counting_train(cfg)
  whole = streaming.StreamTrainBatch(source, cfg, 4, 7, 0, 1)
  halves = [streaming.StreamTrainBatch(source, cfg, 4, 7, p, 2) for p in (0, 1)]
  for step in (0, 6):  # 5 steps an epoch: step 6 is in epoch 1
    expected = whole(step)
    got = [h(step) for h in halves]
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([g[key] for g in got]), expected[key])


@pytest.mark.parametrize("k", [2, 6])  # 5 steps an epoch: k=6 resumes in epoch 1
def test_exact_resume(mock_imagenet, k):
  cfg = stream_cfg()
  splits = data.load_splits(cfg, seed=0)
  make = lambda: pipeline.make_train_iterator(splits.train, cfg,
                                              global_batch_size=4, seed=3)
  uninterrupted = take(make(), k + 3)
  first = make()
  take(first, k)
  state = first.get_state()
  resumed = make()
  resumed.set_state(state)
  for a, b in zip(take(resumed, 3), uninterrupted[k:]):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_eval_batches_cover_split_in_order(mock_imagenet):
  cfg = stream_cfg()
  splits = data.load_splits(cfg, seed=0)
  batches = list(pipeline.eval_batches(splits.test, cfg, global_batch_size=10))
  assert len(batches) == 3  # 24 examples: 10 + 10 + 4 real, 6 padding
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == MOCK_EXAMPLES and mask[:MOCK_EXAMPLES].all()
  labels = np.concatenate([b["label"] for b in batches])[:MOCK_EXAMPLES]
  expected = [splits.test[i]["label"] for i in range(MOCK_EXAMPLES)]
  np.testing.assert_array_equal(labels, expected)


def ramp_image(height, width):
  """Channel 0 = column index, channel 1 = row index (linear ramps)."""
  rows, cols = np.mgrid[0:height, 0:width]
  return np.stack([cols, rows, np.zeros_like(rows)], -1).astype(np.uint8)


def sampled_coordinate(out_index, out_size, start, length):
  """Original-pixel coordinate (float64) sampled by output pixel ``out_index``
  when the window [start, start+length) is resized to ``out_size`` pixels."""
  return start + (out_index + 0.5) * length / out_size - 0.5


def test_eval_preprocess_geometry_on_ramps():
  # 120 x 200: shorter side 120 -> round(32/0.875) = 37, width 200*37/120 = 61.67
  # -> 62; centred 32 square: top (37-32)//2 = 2, left (62-32)//2 = 15 resized px.
  h, w, size = 120, 200, 32
  out = streaming.eval_preprocess(ramp_image(h, w), size).astype(np.float64)
  assert out.shape == (size, size, 3)
  sy, sx = h / 37, w / 62
  interior = slice(3, size - 3)  # away from the antialiasing border
  j = np.arange(size)[interior]
  want_cols = sampled_coordinate(j, size, 15 * sx, size * sx)
  want_rows = sampled_coordinate(j, size, 2 * sy, size * sy)
  np.testing.assert_allclose(out[5, interior, 0], want_cols, atol=1.0)
  np.testing.assert_allclose(out[interior, 5, 1], want_rows, atol=1.0)


def test_random_resized_crop_boxes_in_range():
  rng = np.random.default_rng(0)
  for h, w in [(100, 100), (60, 200), (300, 90)]:
    for _ in range(200):
      top, left, bh, bw = streaming.random_resized_crop_box(rng, h, w)
      assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w
      # Rounding the sides moves area/ratio by at most ~1 pixel per side.
      assert 0.08 * h * w - (bh + bw) <= bh * bw <= h * w
      assert 3 / 4 - 2 / min(bh, bw) <= bw / bh <= 4 / 3 + 2 / min(bh, bw)


def test_random_resized_crop_fallback_is_centred_clipped_ratio():
  class NeverFits:
    """Draws the largest area and an extreme ratio: never fits a 10x1000 strip."""

    def uniform(self, lo, hi):
      return hi

    def integers(self, lo, hi):
      raise AssertionError("no offset is drawn in the fallback")

  top, left, bh, bw = streaming.random_resized_crop_box(NeverFits(), 10, 1000)
  assert (bh, bw) == (10, round(10 * 4 / 3))
  assert top == 0 and left == (1000 - bw) // 2


def test_train_preprocess_resamples_its_box():
  image = ramp_image(90, 150)
  rng_box = np.random.default_rng([5, 1])
  box = streaming.random_resized_crop_box(rng_box, 90, 150)
  flip = rng_box.random() < 0.5
  out = streaming.train_preprocess(image, 24, np.random.default_rng([5, 1]))
  top, left, bh, bw = box
  cols = sampled_coordinate(np.arange(24), 24, left, bw)
  if flip:
    cols = cols[::-1]
  np.testing.assert_allclose(out[12, 4:20, 0], cols[4:20], atol=1.0)
  rows = sampled_coordinate(np.arange(24), 24, top, bh)
  np.testing.assert_allclose(out[4:20, 12, 1], rows[4:20], atol=1.0)


def test_bad_stream_config_names_choices(mock_imagenet):
  with pytest.raises(ValueError, match="inception_crop"):
    data.load_splits(stream_cfg(augment="mixup"), seed=0)
  with pytest.raises(ValueError, match="image_size"):
    data.load_splits(stream_cfg(image_size=0), seed=0)
  with pytest.raises(ValueError, match="tfds_stream"):
    pipeline.make_train_iterator(data.synthetic_source(8, (8, 8, 3), 2, seed=0),
                                 stream_cfg(source="synthetic"),
                                 global_batch_size=4, seed=0)


def test_grayscale_images_keep_one_channel():
  image = np.arange(30 * 40, dtype=np.uint8).reshape(30, 40)
  source = streaming.StreamingSource([{"image": image, "label": 1}])
  out = streaming.eval_preprocess(source[0]["image"], 8)
  assert out.shape == (8, 8, 1)
  assert math.isclose(float(out.mean()), float(image.mean()), rel_tol=0.1)


def test_worker_processes_give_the_same_batches():
  rng = np.random.default_rng(0)
  items = [{"image": rng.integers(0, 256, (20 + i, 30, 3), np.uint8), "label": i}
           for i in range(12)]
  source = streaming.StreamingSource(items)
  cfg = stream_cfg(source="tfds_stream")
  in_process = take(pipeline.make_train_iterator(
      source, cfg, global_batch_size=4, seed=1), 4)
  cfg.num_workers = 1
  workers = take(pipeline.make_train_iterator(
      source, cfg, global_batch_size=4, seed=1), 4)
  for a, b in zip(in_process, workers):
    np.testing.assert_array_equal(a["image"], b["image"])
  # Evaluation: decoded by the workers, same batches in the same order.
  eval_workers = list(pipeline.eval_batches(source, cfg, global_batch_size=5))
  cfg.num_workers = 0
  eval_in_process = list(pipeline.eval_batches(source, cfg, global_batch_size=5))
  assert len(eval_workers) == len(eval_in_process) == 3
  for a, b in zip(eval_workers, eval_in_process):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(a[key], b[key])


def test_crop_flip_streams_stored_size_images():
  rng = np.random.default_rng(3)
  stored = [rng.integers(1, 256, (8, 8, 3), np.uint8) for _ in range(8)]
  source = streaming.StreamingSource([{"image": im, "label": i}
                                      for i, im in enumerate(stored)])
  cfg = stream_cfg(augment="crop_flip", image_size=8, crop_padding=2,
                   mean=(0.0,) * 3, std=(1 / 255,) * 3)  # normalise = identity
  batch = streaming.StreamTrainBatch(source, cfg, 8, 0, 0, 1)(0)
  for image, label in zip(batch["image"], batch["label"]):
    padded = np.pad(stored[label], ((2, 2), (2, 2), (0, 0))).astype(np.float32)
    windows = [w for dy in range(5) for dx in range(5)
               for w in (padded[dy:dy + 8, dx:dx + 8], padded[dy:dy + 8, dx:dx + 8][:, ::-1])]
    assert any(np.allclose(image, w, atol=1e-3) for w in windows)
  evaluated = next(iter(pipeline.eval_batches(source, cfg, global_batch_size=8)))
  np.testing.assert_allclose(evaluated["image"], np.stack(stored), atol=1e-3)
  wrong = streaming.StreamingSource([{"image": stored[0][:6], "label": 0}])
  with pytest.raises(ValueError, match="inception_crop"):
    streaming.StreamEvalBatch(wrong, cfg, 1, 0, 1)(0)
