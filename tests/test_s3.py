"""A registry whose default remote is S3 (a moto server on 127.0.0.1)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from tests.faultproxy import FaultProxy
from tests.registry import Registry, random_bytes
from tests.trees import assert_same_tree, snapshot

BUCKET = "registry-bucket"
DEAD_ENDPOINT = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused


@dataclass
class S3Registry:
    registry: Registry
    endpoint_url: str


@pytest.fixture(scope="module")
def s3_registry(tools, s3_server, tmp_path_factory) -> S3Registry:
    """main: remote `s3://registry-bucket/prefix` with the right `endpointurl` in Git;
    branch wrong-endpoint: the same data, but the config in Git names a dead endpoint."""
    s3_server.create_bucket(BUCKET)
    registry = Registry.create(tools, tmp_path_factory.mktemp("s3") / "registry",
                               remotes={"s3store": f"s3://{BUCKET}/prefix"}, default_remote="s3store")
    registry.dvc("remote", "modify", "s3store", "endpointurl", s3_server.endpoint_url)
    registry.write("plain.txt", "stored in S3\n")
    registry.write("tool.sh", "#!/bin/sh\necho s3\n", executable=True)
    registry.write("blobs/one.bin", random_bytes(21, 70_000))
    registry.write("blobs/nested/two.txt", "two\n")
    registry.write("blobs/nested/ééé.txt", "accents\n")
    registry.write("big.bin", random_bytes(22, 2 * 1024 * 1024 + 3))
    registry.add("plain.txt", "tool.sh", "blobs", "big.bin")
    registry.push()
    registry.commit("data on S3")

    registry.checkout("wrong-endpoint", new_branch=True)
    registry.dvc("remote", "modify", "s3store", "endpointurl", DEAD_ENDPOINT)
    registry.commit("config in Git names a dead endpoint")
    registry.checkout("main")
    return S3Registry(registry, s3_server.endpoint_url)


def test_s3_registry_equals_the_oracle(s3_registry, mount, oracle):
    """And before any request, the daemon has built the tree and set up the S3 client."""
    source = s3_registry.registry.path
    mounted = mount(f"{source}@main", "--debug")
    deadline = time.monotonic() + 60
    while "default revision and its remotes ready" not in mounted.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "default revision and its remotes ready" in mounted.log_text(), mounted.log_tail()
    assert "Setting up s3fs instance" in mounted.log_text(), mounted.log_tail()
    assert_same_tree(snapshot(mounted.path), oracle.tree(source, "main"), "S3 registry @main")


def test_file_url_source(s3_registry, mount, oracle):
    source = s3_registry.registry.path
    mounted = mount(f"file://{source}@main")
    assert_same_tree(snapshot(mounted.path), oracle.tree(source, "main"), "file:// URL @main")


def test_remote_config_overrides_the_config_in_git(s3_registry, mount, oracle):
    source = s3_registry.registry.path
    endpoint = s3_registry.endpoint_url
    expected = oracle.tree(source, "wrong-endpoint", local_config=[("s3store", "endpointurl", endpoint)])
    mounted = mount(f"{source}@wrong-endpoint", "--remote-config", f"s3store.endpointurl={endpoint}")
    assert_same_tree(snapshot(mounted.path), expected, "@wrong-endpoint with --remote-config")


def test_sizes_of_a_directory_output_come_from_listings(tools, s3_server, tmp_path_factory, mount, oracle):
    """`ls -l` of a directory output asks S3 for the sizes of its entries. In a store of a few
    objects per prefix directory, that is one listing of the fullest directory, then one listing of
    the whole `files/md5/` tree (pages of 1,000 keys), instead of a HEAD per object."""
    s3_server.create_bucket("listed-bucket")
    registry = Registry.create(tools, tmp_path_factory.mktemp("s3-listed") / "registry",
                               remotes={"s3store": "s3://listed-bucket/store"}, default_remote="s3store")
    registry.dvc("remote", "modify", "s3store", "endpointurl", s3_server.endpoint_url)
    for index in range(40):
        registry.write(f"many/{index:02d}.bin", random_bytes(100 + index, 1000 + index))
    registry.add("many")
    registry.push()
    registry.commit("40 files on S3")
    proxy = FaultProxy(s3_server.endpoint_url).start()
    try:
        mounted = mount(f"{registry.path}@main", "--remote-config", f"s3store.endpointurl={proxy.url}")
        sizes = {path.name: path.stat().st_size for path in (mounted.path / "many").iterdir()}
        assert sizes == {f"{index:02d}.bin": 1000 + index for index in range(40)}
        entries = [request for request in proxy.requests if not request.path.split("?")[0].endswith(".dir")]
        assert [request.method for request in entries] == ["GET", "GET"], entries
        sample, tree = (request.path for request in entries)
        assert "list-type=2" in sample and "delimiter=%2F" in sample, sample
        assert "list-type=2" in tree and "delimiter=&" in tree + "&" and "prefix=store%2Ffiles%2Fmd5%2F&" in tree + "&", tree
        assert_same_tree(snapshot(mounted.path), oracle.tree(registry.path, "main"), "S3 registry, sizes listed")
    finally:
        proxy.stop()
