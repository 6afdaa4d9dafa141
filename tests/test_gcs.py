"""A registry whose remote is Google Cloud Storage: gcp-storage-emulator on 127.0.0.1.

The registry is built with the real `dvc push` (dvc-gs), the remote `gs://registry-bucket/prefix`
with DVC's `endpointurl` and `allow_anonymous_login` committed (the emulator checks no
credentials, so a refused login cannot be tested here). The mount equals `dvc pull`; a missing
bucket, missing objects and nothing listening each give one error line naming the remote, and EIO
through the mount.
"""

from __future__ import annotations

import pytest

from tests.registry import Registry
from tests.servers import free_port, read_fails_with_eio, sample_registry
from tests.trees import assert_same_tree, snapshot

BUCKET = "registry-bucket"


@pytest.fixture(scope="module")
def gcs_registry(tools, gcs_server, tmp_path_factory) -> Registry:
    gcs_server.create_bucket(BUCKET)
    return sample_registry(tools, tmp_path_factory.mktemp("gcs") / "registry", "gsstore", f"gs://{BUCKET}/prefix",
                           [("endpointurl", gcs_server.endpoint), ("allow_anonymous_login", "true")],
                           51, "in a GCS bucket")


def test_gcs_registry_equals_the_oracle(gcs_registry, mount, oracle):
    mounted = mount(f"{gcs_registry.path}@main")
    assert_same_tree(snapshot(mounted.path), oracle.tree(gcs_registry.path, "main"), "GCS registry @main")


def test_a_missing_bucket_is_eio_through_the_mount(gcs_registry, mount):
    mounted = mount(f"{gcs_registry.path}@main", "--remote-config", "gsstore.url=gs://no-such-bucket/prefix",
                    "--remote-config", "gsstore.retries=0", expect_errors=r"bucket 'no-such-bucket' does not exist")
    read_fails_with_eio(mounted, "plain.txt", "gsstore")


@pytest.mark.parametrize("case", ["missing object", "nothing listens"])
def test_each_failure_is_one_clear_line(gcs_registry, regfs_cli, tmp_path, case):
    """(A missing bucket: test_a_missing_bucket_is_eio_through_the_mount.)"""
    if case == "missing object":
        options = [f"gsstore.url=gs://{BUCKET}/empty-prefix"]
        expected = "is missing on remote 'gsstore'"
    else:
        options = [f"gsstore.endpointurl=http://127.0.0.1:{free_port()}"]
        expected = "Connect call failed"
    result = regfs_cli("cat", f"{gcs_registry.path}@main", "blobs/one.bin", "--cache-dir", tmp_path / "cache",
                       *[arg for option in options for arg in ("--remote-config", option)],
                       "--remote-config", "gsstore.retries=0")
    assert result.returncode != 0
    (line,) = result.error_lines()
    assert expected in line and "remote 'gsstore'" in line, line
