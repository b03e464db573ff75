"""A fake ``gs://`` for tests: objects ``gs://bucket/key`` stored as files ``ROOT/bucket/key``.

``install(root)`` makes, in this process:
- ``etils.epath`` (and so kdjax, orbax's Python side, TFDS) reach ``gs://`` through an
  fsspec file system registered for the ``gcs`` protocol (gcsfs is not installed);
- orbax's two direct calls to Google Cloud Storage local: the bucket-namespace query
  (``google.cloud.storage``) answers "flat bucket", and the TensorStore key-value store
  of a ``gs://`` checkpoint is the ``file`` driver under ``ROOT`` instead of the
  ``gcs`` driver (which needs the network).
Everything else (kdjax's paths, orbax's checkpoint layout, renames, listing) runs
unchanged on ``gs://`` paths.
"""

import os

import fsspec
from fsspec.implementations.local import LocalFileSystem

ENV = "KDJAX_TEST_FAKE_GCS"  # a root here makes sitecustomize call install(root)


def install(root: str) -> None:
    root = os.path.abspath(root)

    class FakeGCS(LocalFileSystem):
        protocol = ("gs", "gcs")
        root_marker = ""

        @classmethod
        def _strip_protocol(cls, path):
            path = os.fspath(path).removeprefix("gs://")
            return path if path.startswith(root) else f"{root}/{path.lstrip('/')}"

        def glob(self, path, **kwargs):  # epath adds "gs://" to bucket-relative names
            return [p[len(root) + 1:] for p in super().glob(path, **kwargs)]

    for protocol in FakeGCS.protocol:
        fsspec.register_implementation(protocol, FakeGCS, clobber=True)

    from orbax.checkpoint._src.path import gcs_utils

    def kvstore(path):
        bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": f"{root}/{bucket}/{key}"}

    gcs_utils.is_hierarchical_namespace_enabled = lambda path: False
    gcs_utils.get_kvstore_for_gcs = kvstore
