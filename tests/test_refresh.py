"""An unpinned mount follows the registry: `--refresh N` re-fetches refs, old commits stay."""

from __future__ import annotations

import os
import time

import pytest

from tests.registry import Registry
from tests.trees import assert_same_tree, snapshot

POLL_SECONDS = 30


def poll(condition, what: str, describe_state):
    """Wait for `condition()` up to POLL_SECONDS; fail with the last observed state."""
    deadline = time.monotonic() + POLL_SECONDS
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {POLL_SECONDS} s; last state: {describe_state()}",
                        pytrace=False)
        time.sleep(0.2)


def readlink_or_error(path) -> str:
    try:
        return os.readlink(path)
    except OSError as error:
        return f"<{error!r}>"


def test_symlinks_follow_a_moving_branch(tools, oracle, mount, tmp_path):
    registry = Registry.create(tools, tmp_path / "moving" / "registry", remotes={"store": "../store"},
                               default_remote="store")
    registry.write("data.txt", "first version\n")
    registry.write("dir/x.txt", "x\n")
    registry.add("data.txt", "dir")
    registry.push()
    old = registry.commit("first")
    registry.git("branch", "doomed")
    old_tree = oracle.tree(registry.path, old)

    mounted = mount(registry.path, "--refresh", "1")
    assert os.readlink(mounted / "main") == "@" + old
    assert os.readlink(mounted / "doomed") == "@" + old
    assert_same_tree(snapshot(mounted / "main"), old_tree, "main before the change")

    registry.write("data.txt", "second version\n")
    registry.write("dir/y.txt", "y\n")
    registry.add("data.txt", "dir")
    registry.push()
    new = registry.commit("second")
    registry.tag("v-new")
    registry.git("branch", "-D", "doomed")
    new_tree = oracle.tree(registry.path, new)
    # Looked up before a refresh fetched it, `@<new>` is a miss the kernel caches for long: the
    # refresh must make it forget, as it must for the new tag and the deleted branch below.
    os.path.exists(mounted / f"@{new}")
    poll(lambda: os.path.isdir(mounted / f"@{new}"), "the new commit appearing by sha",
         lambda: sorted(os.listdir(mounted.path)))

    poll(lambda: readlink_or_error(mounted / "main") == "@" + new, "main moving to the new commit",
         lambda: readlink_or_error(mounted / "main"))
    assert_same_tree(snapshot(mounted / "main"), new_tree, "main after the change")
    assert_same_tree(snapshot(mounted / f"@{old}"), old_tree, "the old commit, still reachable by sha")
    assert os.readlink(mounted / "HEAD") == "@" + new

    poll(lambda: os.path.islink(mounted / "v-new"), "the new tag appearing",
         lambda: sorted(os.listdir(mounted.path)))
    assert os.readlink(mounted / "v-new") == "@" + new
    poll(lambda: not os.path.lexists(mounted / "doomed"), "the deleted branch disappearing",
         lambda: sorted(os.listdir(mounted.path)))
