"""Git-side faults of an unpinned mount that refreshes (`--refresh 1`): the registry becoming
unreachable and coming back, a force-pushed branch, a deleted tag under a process that works
inside its tree.

Registries are served the way users reach them: a bare repository pushed to from a working
clone, over the real `git daemon` (git://) on 127.0.0.1, or as a local directory. Their remote
is an absolute path, so every clone (the oracle's too) finds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.gitserver import Published, publish
from tests.registry import Registry, random_bytes
from tests.test_refresh import poll, readlink_or_error
from tests.trees import assert_same_tree, snapshot


@pytest.fixture
def published(tools, tmp_path) -> Iterator[Published]:
    work = Registry.create(tools, tmp_path / "work", remotes={"store": str(tmp_path / "store")},
                           default_remote="store")
    published = publish(work, tmp_path / "served")
    try:
        yield published
    finally:
        published.server.close()


def warnings_in(mounted, text: str) -> int:
    return sum(1 for line in mounted.log_text().splitlines() if " WARNING " in line and text in line)


@pytest.mark.parametrize("outage", ["server stopped", "directory moved away"])
def test_refresh_keeps_the_last_refs_while_the_registry_is_unreachable(published, mount, oracle, outage):
    """While the registry cannot be fetched the mount keeps serving its last refs (and warns at
    each failed refresh, even with news waiting on the server); once it is back, the refs catch up."""
    first = published.commit_and_push("first", {"data.bin": random_bytes(1, 200_000), "notes.txt": b"1\n"})
    local = outage == "directory moved away"
    mounted = mount(published.bare if local else published.url, "--refresh", "1")
    assert os.readlink(mounted / "main") == "@" + first
    first_tree = oracle.tree(published.bare, first)

    moved = published.bare.with_name("moved.git")
    if local:
        published.bare.rename(moved)
        published.work.git("remote", "set-url", "origin", moved)
    else:
        published.server.stop()
    poll(lambda: warnings_in(mounted, "refresh failed, keeping the previous refs") >= 1,
         "a warning about the failed refresh", mounted.log_tail)
    second = published.commit_and_push("second", {"data.bin": random_bytes(2, 300_000)})
    seen = warnings_in(mounted, "refresh failed")
    poll(lambda: warnings_in(mounted, "refresh failed") >= seen + 2, "two more failed refreshes",
         mounted.log_tail)
    assert os.readlink(mounted / "main") == "@" + first, "the refs changed while unreachable"
    assert_same_tree(snapshot(mounted / "main"), first_tree, "main while the registry is unreachable")

    if local:
        moved.rename(published.bare)
    else:
        published.server.start()
    poll(lambda: readlink_or_error(mounted / "main") == "@" + second, "main catching up after the outage",
         lambda: readlink_or_error(mounted / "main"))
    assert_same_tree(snapshot(mounted / "main"), oracle.tree(published.bare, second), "main after the outage")
    assert_same_tree(snapshot(mounted / f"@{first}"), first_tree, "the first commit by sha")
    assert f"fetched {published.bare if local else published.url} again" in mounted.log_text()


def test_a_force_pushed_branch_follows_the_new_commit_and_the_old_sha_still_reads(
        published, mount, oracle, regfs_cli, tmp_path):
    base = published.commit_and_push("base", {"data.bin": random_bytes(3, 50_000)})
    published.work.checkout("feature", new_branch=True)
    old = published.commit_and_push("feature, first try", {"data.bin": random_bytes(4, 60_000),
                                                          "feature.txt": b"first try\n"})
    cache = tmp_path / "shared-cache"
    mounted = mount(published.url, "--refresh", "1", cache_dir=cache)
    assert os.readlink(mounted / "feature") == "@" + old
    old_tree = oracle.tree(published.bare, old)
    assert_same_tree(snapshot(mounted / "feature"), old_tree, "feature before the force-push")

    published.work.git("reset", "-q", "--hard", base)
    new = published.commit_and_push("feature, rewritten", {"data.bin": random_bytes(5, 70_000),
                                                          "other.txt": b"rewritten\n"}, force=True)
    # The server forgets the old commit entirely.
    published.work.tools.run(["git", "reflog", "expire", "--expire=now", "--all"], cwd=published.bare)
    published.work.tools.run(["git", "gc", "-q", "--prune=now"], cwd=published.bare)
    gone = published.work.tools.run(["git", "cat-file", "-e", old], cwd=published.bare, check=False)
    assert gone.returncode != 0, "the server still has the old commit"

    poll(lambda: readlink_or_error(mounted / "feature") == "@" + new, "feature following the force-push",
         lambda: readlink_or_error(mounted / "feature"))
    assert_same_tree(snapshot(mounted / "feature"), oracle.tree(published.bare, new), "feature after it")
    assert os.readlink(mounted / "main") == "@" + base
    # The mirror keeps the old commit: by sha, by a prefix never looked up before, in a new daemon.
    assert_same_tree(snapshot(mounted / f"@{old}"), old_tree, "the old commit by sha")
    assert_same_tree(snapshot(mounted / f"@{old[:10]}"), old_tree, "the old commit by prefix")
    second = mount(f"{published.url}@{old}", cache_dir=cache)
    assert_same_tree(snapshot(second.path), old_tree, "a new mount pinned to the old commit")
    # A mirror made after the force-push never had it.
    fresh = regfs_cli("ls", f"{published.url}@{old}", "--cache-dir", tmp_path / "fresh-cache")
    assert fresh.returncode == 1 and "unknown revision" in fresh.error_lines()[0], fresh


READER = """
import hashlib, json, os, sys
for line in sys.stdin:  # waits, with its working directory in the mount, until told to read
    found = {}
    for directory, _, files in os.walk("."):
        for name in files:
            with open(os.path.join(directory, name), "rb") as file:
                found[os.path.join(directory, name)[2:]] = hashlib.md5(file.read()).hexdigest()
    print(json.dumps({"cwd": os.getcwd(), "files": found}), flush=True)
"""


def test_a_deleted_tag_disappears_while_a_process_inside_its_tree_keeps_reading(tools, mount, oracle,
                                                                             tmp_path):
    registry = Registry.create(tools, tmp_path / "registry", remotes={"store": str(tmp_path / "store")},
                               default_remote="store")
    registry.write("data/a.bin", random_bytes(6, 40_000))
    registry.write("data/sub/b.txt", "b\n")
    registry.write("big.bin", random_bytes(7, 2 * 1024 * 1024))
    registry.add("data", "big.bin")
    registry.push()
    kept = registry.commit("kept")
    registry.tag("v-kept")
    registry.checkout("experiment", new_branch=True)
    registry.write("data/a.bin", random_bytes(8, 50_000))
    registry.add("data")
    registry.push()
    doomed = registry.commit("experiment")
    registry.git("tag", "-a", "-m", "to be deleted", "v-doomed")
    registry.checkout("main")
    doomed_tree = oracle.tree(registry.path, doomed)

    mounted = mount(registry.path, "--refresh", "1")
    assert os.readlink(mounted / "v-doomed") == "@" + doomed
    with subprocess.Popen([sys.executable, "-c", READER], cwd=mounted / "v-doomed" / "data",
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as inside:
        with open(mounted / "v-doomed" / "big.bin", "rb") as big:
            head = big.read(1024 * 1024)
            # Deleting the branch too leaves the commit reachable from no ref of the registry.
            registry.git("tag", "-d", "v-doomed")
            registry.git("branch", "-D", "experiment")
            poll(lambda: not os.path.lexists(mounted / "v-doomed"), "the deleted tag disappearing",
                 lambda: sorted(os.listdir(mounted.path)))
            assert not os.path.lexists(mounted / "experiment")
            whole = head + big.read()
        output, _ = inside.communicate("go\n", timeout=60)
    assert hashlib.md5(whole).hexdigest() == hashlib.md5(doomed_tree["big.bin"][2]).hexdigest()
    report = json.loads(output)
    assert report["cwd"] == os.fspath(mounted / f"@{doomed}" / "data")
    expected = {relpath[len("data/"):]: hashlib.md5(entry[2]).hexdigest()
                for relpath, entry in doomed_tree.items()
                if relpath.startswith("data/") and entry[0] == "file"}
    assert report["files"] == expected
    assert sorted(os.listdir(mounted.path)) == ["HEAD", "main", "v-kept"]
    assert os.readlink(mounted / "v-kept") == "@" + kept
    assert_same_tree(snapshot(mounted / f"@{doomed}"), doomed_tree, "the deleted tag's commit by sha")
