"""The cache is shared: by threads of one daemon, by several daemons, and with DVC itself.

Each object is downloaded once however many readers race for it (the daemons log one `fetched`
line per real download), and every reader gets DVC's bytes.
"""

from __future__ import annotations

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.registry import Registry, random_bytes
from tests.trees import assert_same_tree, snapshot

FILES = 24


def _fetch_counts(*logs: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for text in logs:
        for object_id in re.findall(r"fetched ([0-9a-f]{32}(?:\.dir)?) ", text):
            counts[object_id] = counts.get(object_id, 0) + 1
    return counts


def test_racing_readers_in_two_daemons_download_each_object_once(tools, mount, tmp_path: Path):
    registry = Registry.create(tools, tmp_path / "registry", remotes={"store": "../store"},
                               default_remote="store")
    contents = {f"shards/part-{i:02}.bin": random_bytes(100 + i, 2 * 1024 * 1024 + i) for i in range(FILES)}
    for relpath, data in contents.items():
        registry.write(relpath, data)
    registry.add("shards")
    registry.commit("shards")
    registry.push()

    cache = tmp_path / "shared-cache"
    first = mount(f"{registry.path}@main", cache_dir=cache)
    second = mount(f"{registry.path}@main", cache_dir=cache)
    reads = [(mounted / relpath, relpath) for relpath in contents for mounted in (first, second)] * 2

    def digest(item):
        path, relpath = item
        return relpath, hashlib.md5(Path(path).read_bytes()).hexdigest()

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(digest, reads))
    for relpath, actual in results:
        assert actual == hashlib.md5(contents[relpath]).hexdigest(), relpath

    counts = _fetch_counts(first.log_text(), second.log_text())
    file_objects = {oid: n for oid, n in counts.items() if not oid.endswith(".dir")}
    expected = {hashlib.md5(data).hexdigest() for data in contents.values()}
    assert set(file_objects) == expected
    assert all(n == 1 for n in file_objects.values()), file_objects


def test_dvc_checks_out_from_the_cache_regfs_filled(basic, tools, mount, oracle, tmp_path: Path):
    """regfs's cache is a DVC cache: after reading a revision through the mount, DVC checks the same
    revision out of it with no remote at all."""
    cache = tmp_path / "cache"
    mounted = mount(f"{basic.path}@main", cache_dir=cache)
    assert_same_tree(snapshot(mounted.path), oracle.tree(basic.path, "main"), "mount @main")

    workspace = tmp_path / "workspace"
    tools.run(["git", "clone", "-q", basic.path, workspace], cwd=tmp_path)
    tools.run([tools.dvc3, "cache", "dir", "--local", cache], cwd=workspace)
    tools.run([tools.dvc3, "remote", "modify", "--local", "store", "url", tmp_path / "no-such-remote"],
              cwd=workspace)
    tools.run([tools.dvc3, "checkout", "-q"], cwd=workspace)
    assert_same_tree(snapshot(workspace), oracle.tree(basic.path, "main"), "dvc checkout from regfs's cache")
