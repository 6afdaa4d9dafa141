"""Pipeline outputs (`dvc.yaml` + `dvc.lock`): `wdir`, nested `dvc.yaml`, `foreach` stages,
`cache: false` outputs kept in Git, and outputs whose `remote:` is not the default remote."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.registry import Registry
from tests.trees import assert_same_tree, md5_hex, object_path, snapshot

ROOT_PIPELINE = """\
stages:
  build:
    wdir: sub
    cmd: >-
      mkdir -p outdir/nested &&
      cp input.txt outdir/nested/copy.txt &&
      printf 'r\\n' > outdir/r.txt &&
      printf 'model\\n' > model.bin &&
      printf '{"m": 1}\\n' > metrics.json &&
      printf 'far away\\n' > far.txt
    deps:
    - input.txt
    outs:
    - outdir
    - model.bin
    - metrics.json:
        cache: false
    - far.txt:
        remote: other
"""

NESTED_PIPELINE = """\
stages:
  up:
    wdir: ..
    cmd: printf 'written from sub2/dvc.yaml\\n' > up-out.txt
    outs:
    - up-out.txt
  gen:
    foreach: [alpha, beta]
    do:
      cmd: printf '${item}\\n' > gen-${item}.txt
      outs:
      - gen-${item}.txt
"""


@dataclass
class PipelineRegistry:
    registry: Registry
    store: Path
    other: Path


@pytest.fixture(scope="module")
def pipeline(tools, tmp_path_factory) -> PipelineRegistry:
    parent = tmp_path_factory.mktemp("pipeline")
    registry = Registry.create(tools, parent / "registry",
                               remotes={"store": "../store", "other": "../other-store"},
                               default_remote="store")
    registry.write("sub/input.txt", "pipeline input\n")
    registry.write("dvc.yaml", ROOT_PIPELINE)
    registry.write("sub2/dvc.yaml", NESTED_PIPELINE)
    registry.write("side.txt", "on the other remote\n")
    registry.add("side.txt")
    metafile = registry.path / "side.txt.dvc"
    metafile.write_text(metafile.read_text().replace("  path: side.txt\n",
                                                     "  path: side.txt\n  remote: other\n"))
    registry.dvc("repro", "-P")
    registry.push()
    registry.commit("pipelines")
    return PipelineRegistry(registry, parent / "store", parent / "other-store")


def test_fixture_spreads_objects_over_two_remotes(pipeline):
    for data in (b"far away\n", b"on the other remote\n"):
        object_id = md5_hex(data)
        assert object_path(pipeline.other, object_id).exists(), data
        assert not object_path(pipeline.store, object_id).exists(), data
    assert object_path(pipeline.store, md5_hex(b"model\n")).exists()
    assert "metrics.json" in pipeline.registry.git("ls-files", "sub")


def test_pipeline_outputs_equal_the_oracle(pipeline, mount, oracle):
    source = pipeline.registry.path
    mounted = mount(f"{source}@main")
    assert_same_tree(snapshot(mounted.path), oracle.tree(source, "main"), "pipeline registry @main")
