"""Faults regfs must survive: a daemon killed with SIGKILL (mid-download too), and a registry that
cannot be fetched when a mount starts.

These tests drive `regfs mount`/`umount` by hand (not the `mount` fixture), because they kill
daemons on purpose and mount twice on one mountpoint; every mount is removed in `finally`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.mounting import is_mounted, run_cli
from tests.registry import Registry, random_bytes
from tests.trees import assert_same_tree, snapshot

BUCKET = "faults-bucket"


def _mount(tools, source, mountpoint: Path, cache: Path, log: Path, workdir: Path):
    result = run_cli(["mount", source, mountpoint, "--cache-dir", cache, "--log-file", log, "--refresh", "0"],
                     tools.env, workdir)
    assert result.returncode == 0, f"{result}\n{log.read_text() if log.exists() else ''}"
    return result


def _daemon_pid(tools, mountpoint: Path, workdir: Path) -> int:
    records = json.loads(run_cli(["status", "--json"], tools.env, workdir).stdout)
    (record,) = [r for r in records if r["mountpoint"] == str(mountpoint)]
    return record["pid"]


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.02)
    pytest.fail(f"daemon {pid} survived SIGKILL")


def _cleanup(tools, mountpoint: Path, workdir: Path) -> None:
    if is_mounted(mountpoint):
        run_cli(["umount", mountpoint], tools.env, workdir)
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


def test_a_killed_daemon_leaves_a_dead_mount_the_next_mount_cleans(basic, tools, oracle, tmp_path):
    mountpoint, cache = tmp_path / "mnt", tmp_path / "cache"
    mountpoint.mkdir()
    try:
        _mount(tools, f"{basic.path}@v2.0", mountpoint, cache, tmp_path / "first.log", tmp_path / "cli1")
        _kill(_daemon_pid(tools, mountpoint, tmp_path / "cli2"))
        with pytest.raises(OSError) as dead:
            os.stat(mountpoint)
        assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)

        log = tmp_path / "second.log"
        result = _mount(tools, f"{basic.path}@v2.0", mountpoint, cache, log, tmp_path / "cli3")
        assert_same_tree(snapshot(mountpoint), oracle.tree(basic.path, "v2.0"), "mount after a killed daemon")
        assert "daemon died; unmounting it first" in result.stderr  # said by `regfs mount` itself
        assert " ERROR " not in log.read_text()
    finally:
        _cleanup(tools, mountpoint, tmp_path / "cli4")
    assert not is_mounted(mountpoint)


def test_a_dead_mount_regfs_did_not_make_is_refused(basic, regfs_cli, tmp_path):
    """Only regfs's own dead mounts are cleaned; anything else mounted there is an error."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mountpoint)], check=True)
    try:
        result = regfs_cli("mount", basic.path, mountpoint)
        assert result.returncode != 0
        assert result.error_lines() and "busy" in result.error_lines()[0]
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


def test_sigkill_mid_download_leaves_no_partial_object(tools, s3_server, oracle, tmp_path):
    """The daemon dies while an object streams in from S3: nothing partial is ever visible in the
    cache, the next daemon removes the dead download's temporary file and fetches it whole."""
    s3_server.create_bucket(BUCKET)
    registry = Registry.create(tools, tmp_path / "registry", remotes={"s3": f"s3://{BUCKET}/r"},
                               default_remote="s3")
    registry.dvc("remote", "modify", "s3", "endpointurl", s3_server.endpoint_url)
    data = random_bytes(77, 96 * 1024 * 1024)
    registry.write("huge.bin", data)
    registry.add("huge.bin")
    registry.push()
    registry.commit("huge")
    digest = hashlib.md5(data).hexdigest()
    final = tmp_path / "cache" / "files" / "md5" / digest[:2] / digest[2:]
    tmp_dir = tmp_path / "cache" / "regfs" / "tmp"

    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        _mount(tools, f"{registry.path}@main", mountpoint, tmp_path / "cache", tmp_path / "first.log",
               tmp_path / "cli1")
        pid = _daemon_pid(tools, mountpoint, tmp_path / "cli2")
        reader = threading.Thread(target=lambda: subprocess.run(["cat", str(mountpoint / "huge.bin")],
                                                                capture_output=True, check=False))
        reader.start()
        deadline = time.monotonic() + 60
        while not any(tmp_dir.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert any(tmp_dir.iterdir()), "the download never started"
        assert not final.exists(), "the download finished before it could be interrupted"
        _kill(pid)
        reader.join(timeout=60)
        assert not final.exists()  # the partial bytes stayed in regfs/tmp, never at the object's path

        _cleanup(tools, mountpoint, tmp_path / "cli3")
        log = tmp_path / "second.log"
        _mount(tools, f"{registry.path}@main", mountpoint, tmp_path / "cache", log, tmp_path / "cli4")
        assert "removed 1 temporary files of interrupted downloads" in log.read_text()
        assert hashlib.md5((mountpoint / "huge.bin").read_bytes()).hexdigest() == digest
        assert hashlib.md5(final.read_bytes()).hexdigest() == digest
        assert not list(tmp_dir.iterdir())
    finally:
        _cleanup(tools, mountpoint, tmp_path / "cli5")


def test_an_unreachable_registry_is_served_from_its_mirror(basic, tools, oracle, tmp_path, regfs_cli):
    """The registry cannot be fetched when a mount starts: the mirror and cache from earlier
    serve it, and the log says so."""
    import shutil

    source = tmp_path / "registry"
    shutil.copytree(basic.path, source, symlinks=True)
    shutil.copytree(basic.store, tmp_path / "store", symlinks=True)
    mountpoint, cache = tmp_path / "mnt", tmp_path / "cache"
    mountpoint.mkdir()
    try:
        _mount(tools, f"{source}@v2.0", mountpoint, cache, tmp_path / "first.log", tmp_path / "cli1")
        snapshot(mountpoint)  # reads everything into the cache
        _cleanup(tools, mountpoint, tmp_path / "cli2")

        source.rename(tmp_path / "registry-gone")
        log = tmp_path / "second.log"
        _mount(tools, f"{source}@v2.0", mountpoint, cache, log, tmp_path / "cli3")
        assert_same_tree(snapshot(mountpoint), oracle.tree(basic.path, "v2.0"), "served from the mirror")
        assert "serving the mirror as fetched at" in log.read_text()
        listing = regfs_cli("ls", f"{source}@v2.0", "--cache-dir", cache)
        assert listing.returncode == 0 and "big.bin" in listing.stdout.split()
    finally:
        _cleanup(tools, mountpoint, tmp_path / "cli4")

    never_fetched = regfs_cli("ls", tmp_path / "no-such-registry", "--cache-dir", cache)
    assert never_fetched.returncode != 0 and never_fetched.error_lines()
