"""Pipeline outputs (`dvc.yaml` + `dvc.lock`), built with `dvc repro` and compared with `dvc pull`.

One registry holds every case, in two commits (`v1`, then `main` with changed params, so the
generated stages differ):

- `wdir`, a nested `dvc.yaml` whose stage writes above it (`wdir: ..`), a directory output;
- per-output flags from `dvc.yaml` joined with the lock: `cache: false` (bytes in Git), `remote:`
  (another remote), `push: false` (pullable only if the remote holds the object anyway);
- `foreach` over a list, a list of mappings and a mapping from `params.yaml` (`${key}` in `wdir`),
  `matrix`, top-level `vars` (inline and `FILE:KEY`), stage `vars`, `metrics`/`plots` outputs;
- a `dvc.yaml` with its own `params.yaml`, JSON and TOML vars files;
- what DVC ignores: a lock entry of a stage no longer in `dvc.yaml`, a `dvc.lock` without
  `dvc.yaml`, a stage that never ran.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lsparity import ALL_TEXT_FLAGS, TEXT_FLAGS, assert_ls_matches_dvc_list
from tests.registry import Registry
from tests.trees import assert_same_tree, md5_hex, object_path, snapshot

ROOT_PIPELINE = r"""
vars:
- prefix: pre
- config/naming.yaml:suffix
stages:
  build:
    wdir: sub
    cmd: >-
      mkdir -p outdir/nested &&
      cp input.txt outdir/nested/copy.txt &&
      printf 'r\n' > outdir/r.txt &&
      printf 'model\n' > model.bin &&
      printf '{"m": 1}\n' > metrics.json &&
      printf 'far away\n' > far.txt &&
      printf 'a,b\n1,2\n' > plot.csv &&
      printf 'same bytes as model\n' > not-pushed-but-present.bin &&
      printf 'never pushed\n' > never-pushed.bin
    deps:
    - input.txt
    outs:
    - outdir
    - model.bin
    - far.txt:
        remote: other
    - not-pushed-but-present.bin:
        push: false
    - never-pushed.bin:
        push: false
    metrics:
    - metrics.json:
        cache: false
    plots:
    - plot.csv
  copy-for-push:
    cmd: printf 'same bytes as model\n' > pushed-twin.bin
    outs:
    - pushed-twin.bin
  models:
    foreach: ${models}
    do:
      wdir: models/${key}
      cmd: >-
        printf '${item.size}\n' > ${prefix}-${key}${suffix} &&
        printf '{"k": "${key}"}\n' > meta.json
      outs:
      - ${prefix}-${key}${suffix}
      - meta.json:
          cache: false
  grid:
    matrix:
      axis: [x, y]
      level: ${levels}
    cmd: mkdir -p ${outdir} && printf '${item.axis}${item.level}\n' > ${outdir}/${key}.txt
    outs:
    - ${outdir}/${key}.txt:
        remote: other
  listed:
    foreach:
    - {name: one, dir: first}
    - {name: two, dir: second}
    do:
      cmd: mkdir -p ${item.dir} && printf '${item.name}\n' > ${item.dir}/${item.name}.txt
      outs:
      - ${item.dir}
  stage-vars:
    vars:
    - local_name: from-stage-vars
    cmd: printf 'stage vars\n' > ${local_name}.txt
    outs:
    - ${local_name}.txt
"""

NESTED_PIPELINE = r"""
stages:
  up:
    wdir: ..
    cmd: printf 'written from sub2/dvc.yaml\n' > up-out.txt
    outs:
    - up-out.txt
  gen:
    foreach: [alpha, beta]
    do:
      cmd: printf '${item}\n' > gen-${item}.txt
      outs:
      - gen-${item}.txt
"""

# A dvc.yaml with its own params.yaml (found beside it), a JSON vars file and a TOML one read by a
# stage relative to its wdir.
SUB3_PIPELINE = r"""
vars:
- cfg.json
stages:
  own:
    foreach: ${names}
    do:
      wdir: work
      vars:
      - stage.toml:table
      cmd: printf '${item} ${table.tag}\n' > ${item}-${table.tag}-${json_key}.txt
      outs:
      - ${item}-${table.tag}-${json_key}.txt
"""

# Added after `dvc repro`: a stage with no lock entry yet.
NEVER_RAN_STAGE = r"""
  never-ran:
    cmd: printf 'x\n' > never-ran.txt
    outs:
    - never-ran.txt
"""

DROPPED_STAGE = r"""
  dropped:
    cmd: printf 'dropped later\n' > dropped.txt
    outs:
    - dropped.txt
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
    registry.write("params.yaml", "models:\n  small: {size: 1}\n  large: {size: 2}\n"
                                  "levels: [1, 2]\noutdir: grid\n")
    registry.write("config/naming.yaml", "suffix: .bin\nunused: 1\n")
    for name in ("small", "large", "medium"):
        (registry.path / "models" / name).mkdir(parents=True)
    registry.write("dvc.yaml", ROOT_PIPELINE + DROPPED_STAGE)
    registry.write("sub2/dvc.yaml", NESTED_PIPELINE)
    registry.write("sub3/dvc.yaml", SUB3_PIPELINE)
    registry.write("sub3/params.yaml", "names: [p, q]\n")
    registry.write("sub3/cfg.json", '{"json_key": "j"}\n')
    registry.write("sub3/work/stage.toml", '[table]\ntag = "t"\n')
    registry.write("side.txt", "on the other remote\n")
    registry.add("side.txt")
    metafile = registry.path / "side.txt.dvc"
    metafile.write_text(metafile.read_text().replace("  path: side.txt\n",
                                                     "  path: side.txt\n  remote: other\n"))
    registry.dvc("repro", "-P")
    # The stage `dropped` leaves dvc.yaml by hand: DVC then ignores its lock entry.
    registry.write("dvc.yaml", ROOT_PIPELINE + NEVER_RAN_STAGE)
    # A dvc.lock without its dvc.yaml: DVC never reads it.
    registry.write("orphan/dvc.lock", (registry.path / "sub2" / "dvc.lock").read_text())
    registry.write("orphan/up-out.txt.keep", "the orphan lock's output must not appear\n")
    registry.push()
    registry.commit("pipelines")
    registry.tag("v1")

    registry.write("params.yaml", "models:\n  large: {size: 2}\n  medium: {size: 3}\n"
                                  "levels: [3]\noutdir: grid2\n")
    registry.dvc("repro", "-P")
    registry.push()
    registry.commit("params changed: other generated stages")
    return PipelineRegistry(registry, parent / "store", parent / "other-store")


def test_fixture_spreads_objects_over_two_remotes(pipeline):
    """Guard against a fixture that silently stopped exercising what the tree test relies on."""
    for data in (b"far away\n", b"on the other remote\n", b"x1\n"):
        object_id = md5_hex(data)
        assert object_path(pipeline.other, object_id).exists(), data
        assert not object_path(pipeline.store, object_id).exists(), data
    assert object_path(pipeline.store, md5_hex(b"model\n")).exists()
    assert object_path(pipeline.store, md5_hex(b"same bytes as model\n")).exists()
    assert not object_path(pipeline.store, md5_hex(b"never pushed\n")).exists()
    assert "metrics.json" in pipeline.registry.git("ls-files", "sub")
    lock = pipeline.registry.git("show", "v1:dvc.lock")
    assert "dropped:" in lock and "models@small:" in lock and "grid@x-1:" in lock, lock


def test_pipeline_outputs_equal_the_oracle(pipeline, mount, oracle):
    """Each revision, through one mount, against `dvc pull` (which fails only for the
    never-pushed output)."""
    source = pipeline.registry.path
    mounted = mount(source, expect_errors=r"never-pushed\.bin|" + md5_hex(b"never pushed\n"))
    never_pushed = "sub/never-pushed.bin"
    for rev, expected in oracle.trees(source, ("v1", "main"), pull_check=False).items():
        assert never_pushed not in expected, "dvc pull should have failed to pull the never-pushed output"
        actual = snapshot(mounted / rev, skip=[never_pushed])
        assert_same_tree(actual, expected, f"pipeline registry @{rev}")
        # `push: false` and not on the remote: listed with its size, EIO on read, as `dvc pull` fails.
        assert (mounted / rev / never_pushed).stat().st_size == len(b"never pushed\n")
        with pytest.raises(OSError) as caught:
            (mounted / rev / never_pushed).read_bytes()
        assert caught.value.errno == errno.EIO


def test_ls_matches_dvc_list(pipeline, tools, oracle, regfs_cli, tmp_path):
    source = pipeline.registry.path
    for rev, paths, text_flags in (("v1", (None,), ALL_TEXT_FLAGS), ("v1", ("sub",), TEXT_FLAGS),
                                   ("main", (None,), TEXT_FLAGS)):
        workspace = oracle.clone(source, rev, pull_check=False)
        assert_ls_matches_dvc_list(tools, regfs_cli, source, rev, workspace, tmp_path / "cache", paths, text_flags)
