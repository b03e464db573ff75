"""Prepares a registered TFDS dataset in array_record format for kdjax.

  python -m kdjax.data.prepare NAME [--data_dir DIR]

Downloading and preparing needs TensorFlow (the ``[tf]`` extra); training later
reads the prepared files with ``tfds.data_source`` and needs no TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from kdjax.data.sources import default_tfds_dir

TF_EXTRA_HINT = "pip install 'kdjax[tf]'"
_PREPARE_DEPS = ("tensorflow", "tensorflow_datasets", "importlib_resources")


def missing_prepare_deps() -> list[str]:
  """Names of the modules that preparing a TFDS builder needs but are absent."""
  return [m for m in _PREPARE_DEPS if importlib.util.find_spec(m) is None]


def prepare(name: str, data_dir: str) -> str:
  """Downloads and prepares ``name`` under ``data_dir``; returns its folder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return str(builder.data_dir)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m kdjax.data.prepare",
      description="Prepare a TFDS dataset in array_record format.")
  parser.add_argument("name", help="registered TFDS name, e.g. cifar10")
  parser.add_argument("--data_dir", default="",
                      help="TFDS data dir (default $TFDS_DATA_DIR or "
                      "~/tensorflow_datasets)")
  args = parser.parse_args(argv)
  missing = missing_prepare_deps()
  if missing:
    print(f"Preparing TFDS datasets needs these missing modules: "
          f"{', '.join(missing)}. Install them with: {TF_EXTRA_HINT}",
          file=sys.stderr)
    return 1
  data_dir = args.data_dir or default_tfds_dir()
  try:
    path = prepare(args.name, data_dir)
  except ImportError as e:
    print(f"Preparing {args.name} failed on a missing module ({e}). Install "
          f"the preparation extras with: {TF_EXTRA_HINT}", file=sys.stderr)
    return 1
  print(f"Prepared {args.name} in array_record format at {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
