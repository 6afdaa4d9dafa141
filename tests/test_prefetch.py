"""`regfs prefetch`: paths in a mount (the daemon fetches, asked through the `user.regfs.fetch`
attribute) and `URL@REV PATH...` (the CLI fetches into the cache a later mount uses).

The evidence is the daemon's: its `regfs stats` counters and the "fetched OBJECT" lines of its
log, one per download; the bytes are checked against the DVC oracle.
"""

from __future__ import annotations

import errno
import json
import os
import pty
import random
import re
import subprocess
import sys
from collections import Counter

import pytest

from tests.mounting import CLI_TIMEOUT, CliResult
from tests.registry import PROJECT_ROOT, Registry, random_bytes
from tests.test_cache import copy_registry
from tests.trees import assert_same_tree, md5_hex, missing_from_cache, object_path, snapshot

BUCKET = "prefetch-bucket"
FETCHED = re.compile(r"\bfetched ([0-9a-f]{32}(?:\.dir)?) \((\d+) bytes\)")
SUMMARY = re.compile(r"^regfs: prefetch: (\d+) files? fetched, (\d+) already cached, (\d+) failed, "
                     r"[\d.]+ [kMGT]?B in [\d.]+s \([\d.]+ [kMGT]?B/s\)$")
STATUS = re.compile(r"^regfs: prefetch: (\d+)/(\d+)\+? files, [\d.]+ [kMGT]?B/[\d.]+ [kMGT]?B\+?, "
                    r"[\d.]+ [kMGT]?B/s(, ETA \w+)?$")
SHARDS, DISTINCT = 150, 100  # shard i has the bytes of shard i - DISTINCT when i >= DISTINCT


# -- helpers -----------------------------------------------------------------------------------


def fetched(mounted) -> list[tuple[str, int]]:
    """(object id, size) of every download the daemon logged, in order."""
    return [(match[1], int(match[2])) for match in FETCHED.finditer(mounted.log_text())]


def stats(regfs_cli, mounted) -> dict:
    result = regfs_cli("stats", mounted.path, "--json")
    assert result.returncode == 0, result
    return json.loads(result.stdout)


def summary(result) -> tuple[int, int, int]:
    """(fetched, already cached, failed) from the last line `regfs prefetch` wrote."""
    lines = result.stderr.splitlines()
    match = SUMMARY.match(lines[-1]) if lines else None
    assert match, f"no summary line at the end: {result}"
    return int(match[1]), int(match[2]), int(match[3])


def files_below(tree: dict, prefix: str) -> dict[str, bytes]:
    """Relative path -> bytes of the regular files of an oracle snapshot below `prefix`."""
    return {path[len(prefix) + 1:]: entry[2] for path, entry in tree.items()
            if path.startswith(prefix + "/") and entry[0] == "file"}


def run_with_stdin(tools, args: list, stdin: bytes) -> CliResult:
    """`python -m regfs ARGS` reading `stdin` (no daemon is started, so pipes are safe)."""
    completed = subprocess.run([sys.executable, "-m", "regfs", *map(os.fspath, args)], cwd=PROJECT_ROOT,
                               env=tools.env, input=stdin, capture_output=True, timeout=CLI_TIMEOUT, check=False)
    return CliResult(completed.returncode, completed.stdout.decode(errors="replace"),
                     completed.stderr.decode(errors="replace"))


@pytest.fixture(scope="module")
def shards(tools, s3_server, tmp_path_factory) -> Registry:
    """An S3 registry: `shards/` (SHARDS files, DISTINCT distinct contents) and `labels.csv`."""
    s3_server.create_bucket(BUCKET)
    registry = Registry.create(tools, tmp_path_factory.mktemp("prefetch") / "registry",
                               remotes={"s3": f"s3://{BUCKET}/r"}, default_remote="s3")
    registry.dvc("remote", "modify", "s3", "endpointurl", s3_server.endpoint_url)
    for number in range(SHARDS):
        seed = number % DISTINCT
        registry.write(f"shards/{number:03d}.bin", random_bytes(1000 + seed, 2000 + seed * 331))
    registry.write("labels.csv", "path,label\n" + "".join(f"{n:03d}.bin,{n % 7}\n" for n in range(SHARDS)))
    registry.add("shards", "labels.csv")
    registry.push()
    registry.commit("shards")
    return registry


# -- a mount's daemon fetches ------------------------------------------------------------------


def test_prefetch_in_a_mount_then_reading_fetches_nothing(basic, mount, oracle, regfs_cli):
    expected = oracle.tree(basic.path, "v2.0")
    wanted = {**{f"data/{path}": data for path, data in files_below(expected, "data").items()},
              "big.bin": expected["big.bin"][2]}
    mounted = mount(f"{basic.path}@v2.0")

    result = regfs_cli("prefetch", mounted / "data", mounted / "big.bin")
    assert result.returncode == 0 and result.stdout == "", result
    assert result.error_lines() == [], result
    new, cached, failed = summary(result)
    assert (new + cached, failed) == (len(wanted), 0), result
    downloads = fetched(mounted)
    objects = [object_id for object_id, _ in downloads if not object_id.endswith(".dir")]
    assert sorted(objects) == sorted({md5_hex(data) for data in wanted.values() if data}), downloads
    assert len([object_id for object_id, _ in downloads if object_id.endswith(".dir")]) == 1  # data's manifest
    assert stats(regfs_cli, mounted)["objects_fetched"] == len(downloads)

    assert_same_tree(snapshot(mounted / "data"), {path[5:]: entry for path, entry in expected.items()
                                                  if path.startswith("data/")}, "data after prefetch")
    assert (mounted / "big.bin").read_bytes() == wanted["big.bin"]
    assert fetched(mounted) == downloads, "reading what was prefetched downloaded again"
    after = stats(regfs_cli, mounted)
    assert after["objects_fetched"] == len(downloads) and after["errors"] == 0, after

    again = regfs_cli("prefetch", mounted / "data", mounted / "big.bin", "-j", "2")
    assert again.returncode == 0, again
    assert summary(again) == (0, len(wanted), 0), again
    assert fetched(mounted) == downloads


def test_git_files_and_imports_prefetch(basic, tools, mount, oracle, regfs_cli, tmp_path):
    """Imports are fetched from their source registry's remote; Git files need nothing."""
    registry = Registry.create(tools, tmp_path / "importer" / "registry", remotes={"store": "../store"},
                               default_remote="store")
    registry.dvc("import", basic.path, "run.sh")
    registry.dvc("import", basic.path, "data", "-o", "imported-data")
    registry.dvc("import", basic.path, "README.txt", "-o", "readme-from-git.txt")
    registry.write("own.bin", random_bytes(61, 5000))
    registry.add("own.bin")
    registry.push()
    registry.commit("imports")
    expected = oracle.tree(registry.path, "main")
    mounted = mount(f"{registry.path}@main")

    result = regfs_cli("prefetch", mounted.path)
    assert result.returncode == 0, result
    new, cached, failed = summary(result)
    regular = [path for path, entry in expected.items() if entry[0] == "file"]
    assert (new + cached, failed) == (len(regular), 0), result
    git_files = [entry for entry in registry.git_files("main").values() if entry[0] == "file"]
    assert cached >= len(git_files), "Git files are local: already cached"
    downloads = fetched(mounted)
    assert {md5_hex(expected["run.sh"][2]), md5_hex(expected["own.bin"][2])} <= {oid for oid, _ in downloads}

    assert_same_tree(snapshot(mounted.path), expected, "importer after prefetch")
    assert fetched(mounted) == downloads, "reading what was prefetched downloaded again"


def test_files_from_keeps_its_order_with_one_job(shards, mount, oracle, regfs_cli, tmp_path):
    expected = oracle.tree(shards.path, "main")
    chosen = [f"shards/{number:03d}.bin" for number in random.Random(5).sample(range(DISTINCT), 12)]
    chosen.insert(5, "labels.csv")
    listing = tmp_path / "epoch.txt"
    listing.write_text("".join(f"{path}\n" for path in chosen))
    mounted = mount(f"{shards.path}@main")

    result = regfs_cli("prefetch", "-j", "1", "--files-from", listing, mounted.path)
    assert result.returncode == 0, result
    assert summary(result) == (len(chosen), 0, 0), result
    objects = [object_id for object_id, _ in fetched(mounted) if not object_id.endswith(".dir")]
    assert objects == [md5_hex(expected[path][2]) for path in chosen]


def test_many_files_in_parallel_one_download_per_object(shards, mount, oracle, regfs_cli):
    expected = oracle.tree(shards.path, "main")
    contents = files_below(expected, "shards")
    assert len(contents) == SHARDS
    distinct = {md5_hex(data): len(data) for data in contents.values()}
    assert len(distinct) == DISTINCT
    mounted = mount(f"{shards.path}@main")

    result = regfs_cli("prefetch", "-j", "8", mounted / "shards")
    assert result.returncode == 0, result
    assert summary(result) == (DISTINCT, SHARDS - DISTINCT, 0), result
    downloads = fetched(mounted)
    counts = Counter(object_id for object_id, _ in downloads)
    assert max(counts.values()) == 1, f"objects downloaded more than once: {counts.most_common(3)}"
    files = {object_id: size for object_id, size in downloads if not object_id.endswith(".dir")}
    assert files == distinct
    assert stats(regfs_cli, mounted)["bytes_fetched"] == sum(size for _, size in downloads)

    assert_same_tree(snapshot(mounted / "shards"),
                     {path[7:]: entry for path, entry in expected.items() if path.startswith("shards/")},
                     "shards after prefetch -j 8")
    assert fetched(mounted) == downloads


def test_missing_objects_fail_their_files_and_the_others_are_prefetched(basic, mount, oracle, regfs_cli,
                                                                        tmp_path):
    """big.bin's size is in its .dvc file, so it fails when fetched; data/a.txt's size would come
    from the remote (a .dir manifest has no sizes), so it fails when the walk stats it."""
    source, store = copy_registry(basic, tmp_path / "copy")
    tree = oracle.tree(basic.path, "v2.0")
    expected = {**{f"data/{path}": data for path, data in files_below(tree, "data").items()},
                "big.bin": tree["big.bin"][2], "run.sh": tree["run.sh"][2]}
    victims = {"data/a.txt": md5_hex(expected["data/a.txt"]), "big.bin": md5_hex(expected["big.bin"])}
    for object_id in victims.values():
        object_path(store, object_id).unlink()
    mounted = mount(f"{source}@v2.0", expect_errors="|".join(victims.values()))

    result = regfs_cli("prefetch", "-j", "3", mounted / "data", mounted / "big.bin", mounted / "run.sh")
    assert result.returncode == 1, result
    assert sorted(result.error_lines()) == sorted(
        f"regfs: error: {mounted / path}: Input/output error (the mount's log names the object and the remote)"
        for path in victims), result
    new, cached, failed = summary(result)
    assert (new + cached, failed) == (len(expected) - len(victims), len(victims)), result
    for object_id in victims.values():
        assert any(object_id in line for line in mounted.error_lines()), mounted.log_tail()

    store.rename(store.with_name("store-gone"))  # what was prefetched reads without the remote
    for path, data in expected.items():
        if path not in victims:
            assert (mounted / path).read_bytes() == data, path
    with pytest.raises(OSError) as caught:
        (mounted / "big.bin").read_bytes()
    assert caught.value.errno == errno.EIO


def test_the_fetch_attribute_is_never_listed(basic, mount, oracle, regfs_cli):
    """`getfattr -d`, `cp --preserve=xattr` and `rsync -X` list the attributes, then get each:
    none of that may download anything."""
    data = oracle.tree(basic.path, "v2.0")["big.bin"][2]
    object_id = md5_hex(data)
    mounted = mount(f"{basic.path}@v2.0")
    for path in (mounted / "big.bin", mounted / "data", mounted / "data" / "a.txt", mounted.path):
        names = os.listxattr(path)
        assert "user.regfs.fetch" not in names, (path, names)
        dumped = {name: os.getxattr(path, name) for name in names}  # what `getfattr -d` does
        assert all(dumped.values()), dumped
    assert "user.regfs.hash" in os.listxattr(mounted / "big.bin")
    assert [oid for oid, _ in fetched(mounted) if not oid.endswith(".dir")] == []
    assert not object_path(mounted.cache_dir, object_id).exists()

    answer = json.loads(os.getxattr(mounted / "big.bin", "user.regfs.fetch"))
    assert answer == {"size": len(data), "object": f"md5:{object_id}", "cached": False}
    assert object_path(mounted.cache_dir, object_id).read_bytes() == data
    assert json.loads(os.getxattr(mounted / "big.bin", "user.regfs.fetch"))["cached"] is True
    assert [(oid, size) for oid, size in fetched(mounted) if not oid.endswith(".dir")] == [(object_id, len(data))]
    with pytest.raises(OSError) as caught:
        os.getxattr(mounted / "data", "user.regfs.fetch")
    assert caught.value.errno == errno.EISDIR


# -- URL@REV: the CLI fetches ------------------------------------------------------------------


def test_a_revision_prefetch_fills_the_cache_a_mount_then_uses(basic, tools, mount, oracle, tmp_path):
    cache = tmp_path / "cache"
    expected = oracle.tree(basic.path, "v2.0")
    listed = ["big.bin", "links/data-link/a.txt", "data/sub"]  # a link named is followed
    wanted = 1 + 1 + len(files_below(expected, "data/sub"))
    result = run_with_stdin(tools, ["prefetch", f"{basic.path}@v2.0", "--files-from", "-", "--cache-dir", cache],
                            "".join(f"{path}\n" for path in listed).encode())
    assert result.returncode == 0, result
    assert summary(result) == (wanted, 0, 0), result
    for path in ("big.bin", "data/a.txt", "data/sub/tool.sh"):
        assert object_path(cache, md5_hex(expected[path][2])).read_bytes() == expected[path][2], path

    whole = run_with_stdin(tools, ["prefetch", f"{basic.path}@v2.0", ".", "-j", "3", "--cache-dir", cache],
                           b"")
    assert whole.returncode == 0, whole
    regular = [path for path, entry in expected.items() if entry[0] == "file"]
    new, cached, failed = summary(whole)
    assert (new + cached, failed) == (len(regular), 0) and cached >= wanted, whole
    assert missing_from_cache(cache, oracle.clone(basic.path, "v2.0")) == set()

    mounted = mount(f"{basic.path}@v2.0", cache_dir=cache)
    assert_same_tree(snapshot(mounted.path), expected, "a mount on the prefetched cache")
    assert fetched(mounted) == []


# -- output and errors -------------------------------------------------------------------------


def test_plain_progress_lines_off_a_terminal(basic, mount, oracle, regfs_cli):
    expected = files_below(oracle.tree(basic.path, "v2.0"), "data")
    mounted = mount(f"{basic.path}@v2.0")
    result = regfs_cli("prefetch", "--progress-interval", "0", "-j", "2", mounted / "data", mounted / "nope")
    assert result.returncode == 1 and result.stdout == "", result
    assert result.error_lines() == [f"regfs: error: {mounted / 'nope'}: No such file or directory"], result
    lines = result.stderr.splitlines()
    statuses = [STATUS.match(line) for line in lines if not line.startswith("regfs: error:")][:-1]
    assert all(statuses), result
    assert [int(match[1]) for match in statuses] == list(range(1, len(expected) + 2)), result  # one per file
    assert int(statuses[-1][2]) == len(expected) + 1
    assert summary(result)[2] == 1


def test_live_progress_on_a_terminal(basic, mount, tools, tmp_path):
    mounted = mount(f"{basic.path}@v2.0")
    controller, terminal = pty.openpty()
    completed = subprocess.run([sys.executable, "-m", "regfs", "prefetch", mounted.path / "data"],
                               cwd=PROJECT_ROOT, env=tools.env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=terminal, timeout=CLI_TIMEOUT, check=False)
    os.close(terminal)
    shown = os.read(controller, 65536).decode(errors="replace")
    os.close(controller)
    assert completed.returncode == 0, shown
    assert shown.startswith("\r") and shown.endswith("\x1b[K\r\n"), repr(shown)
    assert SUMMARY.match(shown.rsplit("\r", 2)[-2].removesuffix("\x1b[K")), repr(shown)


def test_what_is_not_in_a_regfs_mount_is_refused(basic, mount, regfs_cli, tmp_path):
    mounted = mount(f"{basic.path}@v2.0")
    for args, reason in [
        ([tmp_path], "is not inside a regfs mount"),
        ([mounted / "data", tmp_path], f"{tmp_path} is not inside a regfs mount"),
        ([mounted / "data", "--remote", "store"], "--remote: for URL@REV only"),
        ([f"{basic.path}@v2.0"], "give the paths to prefetch"),
        ([f"{basic.path}@v2.0", "--files-from", tmp_path / "no-such-list"], "cannot read --files-from"),
    ]:
        result = regfs_cli("prefetch", *args)
        assert result.returncode == 1 and len(result.error_lines()) == 1, result
        assert reason in result.error_lines()[0] and "Traceback" not in result.stderr, result
    assert fetched(mounted) == []
