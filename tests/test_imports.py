"""`dvc import` outputs: their bytes live on the source registry's remote, not the importer's."""

from __future__ import annotations

import pytest

from tests.registry import Registry
from tests.trees import assert_same_tree, snapshot


@pytest.fixture(scope="module")
def importer(basic, tools, tmp_path_factory) -> Registry:
    """Imports from the basic registry: a file, a directory, a file at an older tag, a Git-tracked
    file; plus one output of its own on its own remote."""
    registry = Registry.create(tools, tmp_path_factory.mktemp("importer") / "registry",
                               remotes={"store": "../store"}, default_remote="store")
    source = str(basic.path)
    (registry.path / "imported").mkdir()
    registry.dvc("import", source, "run.sh")
    registry.dvc("import", source, "data", "-o", "imported/data")
    registry.dvc("import", "--rev", "v1.0", source, "données/été 1.txt", "-o", "imported/old été.txt")
    registry.dvc("import", source, "README.txt", "-o", "imported/readme-from-git.txt")
    registry.write("own.txt", "the importer's own output\n")
    registry.add("own.txt")
    registry.push()
    registry.commit("imports")
    return registry


def test_imports_equal_the_oracle(importer, mount, oracle):
    mounted = mount(f"{importer.path}@main")
    assert_same_tree(snapshot(mounted.path), oracle.tree(importer.path, "main"), "importer @main")


def test_imports_in_unpinned_mount(importer, mount, oracle):
    mounted = mount(importer.path)
    assert_same_tree(snapshot(mounted / "HEAD"), oracle.tree(importer.path, "main"), "importer HEAD")
