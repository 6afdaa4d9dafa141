"""Cloud versioning: `version_aware` and `worktree` remotes on a versioned S3 bucket (moto).

Such a remote keeps no content-addressed objects: each output's files are at their path in the
registry, and a metafile records the version of each (`cloud: {REMOTE: {version_id, etag}}`).
Files are overwritten between tags, so a revision is readable only by its version ids. Built with
the real `dvc push`; every revision mounted is compared with `dvc pull` of it:

- main, remote `versioned` (version_aware): v1 (a directory, a file, a pipeline whose `dvc.lock`
  records a directory and a file), v2 (files overwritten, added and removed);
- flat: v1 with its metafiles in the older flat form (`version_id` and `etag` on each entry, as
  DVC 2.42 and older wrote them; DVC pulls it as well);
- worktree: remote `wt` (worktree), tags wt1 and wt2 with a file and a directory overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.registry import Registry, random_bytes, run_concurrently
from tests.trees import assert_same_tree, cache_objects, md5_hex, snapshot

BUCKET = "versioned-bucket"


@dataclass
class VersionedRegistry:
    registry: Registry
    overwritten: bytes  # model.bin at v1, overwritten since


def _versioned_bucket(endpoint_url: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})


def _remote(registry: Registry, name: str, prefix: str, flag: str, endpoint_url: str, default: bool) -> None:
    registry.dvc("remote", "add", *(["-d"] if default else []), name, f"s3://{BUCKET}/{prefix}")
    registry.dvc("remote", "modify", name, "endpointurl", endpoint_url)
    registry.dvc("remote", "modify", name, flag, "true")


def to_flat_form(path: Path) -> None:
    """Rewrite a `.dvc` or `dvc.lock` file from `cloud: {REMOTE: {...}}` to the older flat form."""
    data = yaml.safe_load(path.read_text())
    outputs = [out for stage in data.get("stages", {}).values() for out in stage.get("outs", [])] \
        if "stages" in data else data["outs"]
    for output in outputs:
        for entry in [output, *output.get("files", [])]:
            for meta in entry.pop("cloud", {}).values():
                entry.update(meta)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def build_main_and_flat(registry: Registry) -> bytes:
    """main (v1, v2) on the version-aware remote, and flat from v1; returns model.bin at v1."""
    overwritten = random_bytes(61, 300_000)
    registry.write("data/a.txt", "a version 1\n")
    registry.write("data/sub/c.txt", "c, removed in v2\n")
    registry.write("data/tool.sh", "#!/bin/sh\necho v1\n", executable=True)
    registry.write("model.bin", overwritten)
    registry.write("dvc.yaml", "stages:\n  make:\n    cmd: mkdir -p out && cp model.bin out/copy.bin "
                               "&& echo made > out/made.txt && wc -c < model.bin > size.txt\n"
                               "    deps: [model.bin]\n    outs: [out, size.txt]\n")
    registry.add("data", "model.bin")
    registry.dvc("repro")
    registry.push()
    registry.commit("v1")
    registry.tag("v1")

    registry.write("data/a.txt", "a version 2, longer\n")
    registry.write("data/new.txt", "new in v2\n")
    registry.remove("data/sub")
    registry.write("model.bin", random_bytes(62, 200_000))
    registry.add("data", "model.bin")  # dvc.lock keeps v1's outputs and their versions
    registry.push()
    registry.commit("v2")
    registry.tag("v2")

    registry.checkout("v1")
    registry.checkout("flat", new_branch=True)
    for metafile in ("data.dvc", "model.bin.dvc", "dvc.lock"):
        to_flat_form(registry.path / metafile)
    registry.commit("v1 in the flat form")
    registry.checkout("main")
    return overwritten


def build_worktree(registry: Registry, endpoint_url: str) -> None:
    """The branch worktree, from the commit `registry` is at, with tags wt1 and wt2."""
    registry.checkout("worktree", new_branch=True)
    _remote(registry, "wt", "worktree", "worktree", endpoint_url, default=True)
    for version in (1, 2):
        registry.write("w.txt", f"worktree file, version {version}\n")
        registry.write("wdir/x.bin", random_bytes(62 + version, 50_000))
        registry.write("wdir/y.txt", "unchanged\n")
        registry.add("w.txt", "wdir")
        registry.push()
        registry.commit(f"worktree version {version}")
        registry.tag(f"wt{version}")


@pytest.fixture(scope="module")
def versioned_registry(tools, s3_server, tmp_path_factory) -> VersionedRegistry:
    _versioned_bucket(s3_server.endpoint_url)
    parent = tmp_path_factory.mktemp("cloud-versioning")
    registry = Registry.create(tools, parent / "registry")
    _remote(registry, "versioned", "registry", "version_aware", s3_server.endpoint_url, default=True)
    registry.commit("a version-aware remote")
    # The worktree branch is built at once in a clone (its data goes to its own remote and
    # prefix, none to the registry's cache) and fetched into the registry with its tags.
    tools.run(["git", "clone", "-q", registry.path, parent / "worktree-build"], cwd=parent)
    builder = Registry(tools, parent / "worktree-build", tools.dvc3)
    overwritten, _ = run_concurrently(lambda: build_main_and_flat(registry),
                                      lambda: build_worktree(builder, s3_server.endpoint_url))
    registry.git("fetch", "-q", "--tags", builder.path, "worktree:worktree")
    return VersionedRegistry(registry, overwritten)


def test_every_revision_equals_the_oracle(versioned_registry, mount, oracle):
    registry = versioned_registry.registry
    assert "cloud:" in (registry.path / "dvc.lock").read_text(), "the fixture has no cloud-versioned dvc.lock"
    flat = registry.git("show", "flat:data.dvc")
    assert "version_id" in flat and "cloud:" not in flat, flat
    expected = oracle.trees(registry.path, ("v1", "v2", "flat", "wt1", "wt2"))
    mounted = mount(registry.path)
    for ref, tree in expected.items():
        assert_same_tree(snapshot(mounted / ref), tree, f"cloud versioning @{ref}")
    # The cache still names objects by their md5, as DVC's does.
    digest = md5_hex(versioned_registry.overwritten)
    assert f"files/md5/{digest[:2]}/{digest[2:]}" in cache_objects(mounted.cache_dir)
