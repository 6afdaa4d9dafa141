"""Corners of the DVC format where what `dvc pull` produces is not obvious; the oracle decides.

- an empty directory output (DVC 3.67 does not create the directory on pull);
- a directory output holding an empty subdirectory (not in the manifest);
- a `.dvc` file under a path that `.dvcignore` excludes (not collected by DVC);
- a `.dvc` file in one directory whose output path climbs out of it (`../elsewhere.txt`);
- an output name with `#`, parentheses and spaces;
- a directory output with more entries than one readdir reply holds.
"""

from __future__ import annotations

import pytest

from tests.registry import Registry
from tests.trees import assert_same_tree, snapshot


@pytest.fixture(scope="module")
def edges(tools, tmp_path_factory) -> Registry:
    registry = Registry.create(tools, tmp_path_factory.mktemp("edges") / "registry",
                               remotes={"store": "../store"}, default_remote="store")
    (registry.path / "empty-output").mkdir()
    registry.write("with-hollow/keep.txt", "kept\n")
    (registry.path / "with-hollow" / "hollow" / "deeper").mkdir(parents=True)
    registry.write("ignored/x.txt", "a .dvc file that .dvcignore hides\n")
    registry.write("elsewhere.txt", "its .dvc file lives in meta/\n")
    registry.write("weird #name (1).txt", "odd name\n")
    for number in range(1500):
        registry.write(f"many/file-{number:04d}-{'x' * 40}.txt", f"{number}\n")
    registry.add("empty-output", "with-hollow", "ignored/x.txt", "elsewhere.txt", "weird #name (1).txt",
                 "many")
    registry.push()

    metafile = registry.path / "elsewhere.txt.dvc"
    (registry.path / "meta").mkdir()
    moved = registry.path / "meta" / "elsewhere.dvc"
    moved.write_text(metafile.read_text().replace("path: elsewhere.txt", "path: ../elsewhere.txt"))
    metafile.unlink()
    with open(registry.path / ".dvcignore", "a") as dvcignore:
        dvcignore.write("ignored/\n")
    registry.commit("edge cases")
    return registry


def test_edge_cases_equal_the_oracle(edges, mount, oracle):
    mounted = mount(f"{edges.path}@main")
    assert_same_tree(snapshot(mounted.path), oracle.tree(edges.path, "main"), "edge cases @main")
