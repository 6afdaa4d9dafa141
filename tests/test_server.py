"""Life on a shared server: mount(8) and systemd integration, other users, provenance, stats, status.

Mounts are real. "Other users" are uids without accounts, reached with setpriv(1) as root (the
suite runs as root in CI): a mount made with allow_other is readable by them and never writable.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import is_mounted, run_cli
from tests.trees import assert_same_tree, snapshot

PROJECT = Path(__file__).resolve().parent.parent
OTHER_UID = 4242


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user can traverse (pytest's own tmp dirs are 0700 to root)."""
    path = Path(tempfile.mkdtemp(prefix="regfs-public-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_other_user(*argv: str, uid: int = OTHER_UID, gid: int = OTHER_UID) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv],
                          capture_output=True, check=False, timeout=60)


def test_mount_fuse3_helper_mounts_as_mount8_invokes_it(basic, tools, oracle, tmp_path):
    """fstab `SOURCE MNT fuse.regfs OPTIONS` makes mount(8) run mount.fuse3 with these arguments."""
    mountpoint, cache, log = tmp_path / "mnt", tmp_path / "cache", tmp_path / "daemon.log"
    mountpoint.mkdir()
    env = {**tools.env, "PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                                "/usr/bin:/sbin:/bin"}
    helper = shutil.which("mount.fuse3", path="/sbin:/usr/sbin") or "mount.fuse3"
    argv = [helper, f"{basic.path}@v2.0", str(mountpoint), "-t", "fuse.regfs",
            "-o", f"rw,allow_other,cache_dir={cache},log_file={log},refresh=0,noatime,dev,suid"]
    try:
        result = subprocess.run(argv, env=env, capture_output=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr.decode()
        assert is_mounted(mountpoint)
        assert_same_tree(snapshot(mountpoint), oracle.tree(basic.path, "v2.0"), "mount.fuse3 mount")
        assert (cache / "regfs" / "sizes.sqlite").exists(), "cache_dir= was not honoured"
    finally:
        if is_mounted(mountpoint):
            run_cli(["umount", mountpoint], tools.env, tmp_path / "umount")
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    assert not is_mounted(mountpoint)
    assert " ERROR " not in log.read_text()


def test_unknown_mount_option_is_one_clear_error(basic, regfs_cli, tmp_path):
    (tmp_path / "mnt").mkdir()
    result = regfs_cli(basic.path, tmp_path / "mnt", "-o", "cache_dir=/tmp/x,frobnicate")
    assert result.returncode != 0
    assert result.error_lines() == ["regfs: error: unknown mount option 'frobnicate'"]
    assert not is_mounted(tmp_path / "mnt")


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing (Debian package systemd): cannot check the unit file")
    unit = (PROJECT / "contrib" / "systemd" / "regfs@.service").read_text()
    # verify checks that ExecStart/ExecStop exist: point them at this checkout's regfs.
    instance = tmp_path / "regfs@mnt-data.service"
    instance.write_text(unit.replace("/usr/local/bin/regfs", str(Path(sys.executable).parent / "regfs")))
    result = subprocess.run([analyze, "verify", str(instance)], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_allow_other_lets_other_users_read_and_nothing_more(basic, public_dir, mount):
    for name in ("shared", "private"):
        (public_dir / name).mkdir()
    shared = mount(f"{basic.path}@v2.0", "--allow-other", mountpoint=public_dir / "shared")
    private = mount(f"{basic.path}@v2.0", mountpoint=public_dir / "private")
    relpath = "data/a.txt"

    read = as_other_user("cat", str(shared.path / relpath))
    assert read.returncode == 0, read.stderr
    assert read.stdout == (private.path / relpath).read_bytes()

    write = as_other_user("sh", "-c", f"echo x >> '{shared.path / relpath}'")
    assert write.returncode != 0
    assert b"Read-only file system" in write.stderr or b"Permission denied" in write.stderr

    denied = as_other_user("cat", str(private.path / relpath))
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr


def _xattrs(path: Path) -> dict[str, str]:
    return {name: os.getxattr(path, name).decode() for name in os.listxattr(path)}


def test_xattrs_tell_where_each_file_comes_from(basic, mount):
    mounted = mount(basic.path)
    commit = basic.refs["v2.0"]
    root = mounted.path / f"@{commit}"

    data = (root / "big.bin").read_bytes()
    dvc_file = _xattrs(root / "big.bin")
    digest = hashlib.md5(data).hexdigest()
    assert dvc_file["user.regfs.commit"] == commit
    assert dvc_file["user.regfs.hash"] == f"md5:{digest}"
    assert dvc_file["user.regfs.remote"] == "store"
    assert Path(dvc_file["user.regfs.url"]).read_bytes() == data  # the object on the local remote

    in_dir = _xattrs(root / "data" / "sub" / "deeper" / "x.bin")
    assert in_dir["user.regfs.hash"] == "md5:" + hashlib.md5((root / "data/sub/deeper/x.bin").read_bytes()).hexdigest()
    assert _xattrs(root / "data")["user.regfs.hash"].endswith(".dir")

    git_file = _xattrs(root / "README.txt")
    blob = basic.registry.git("rev-parse", f"{commit}:README.txt").strip()
    assert git_file["user.regfs.hash"] == f"git-blob:{blob}"
    assert git_file["user.regfs.remote"] == "git"

    with pytest.raises(OSError) as missing:
        os.getxattr(root / "big.bin", "user.regfs.nonexistent")
    assert missing.value.errno == errno.ENODATA
    with pytest.raises(OSError) as readonly:
        os.setxattr(root / "big.bin", "user.regfs.hash", b"forged")
    assert readonly.value.errno == errno.EROFS


def test_stats_count_fetches_hits_and_bytes_served(basic, mount, regfs_cli):
    mounted = mount(f"{basic.path}@v2.0")
    files = ["big.bin", "data/a.txt", "data/sub/deeper/x.bin"]
    served = sum(len((mounted / relpath).read_bytes()) for relpath in files)
    assert len((mounted / "big.bin").read_bytes()) > 0  # again: from the kernel's page cache, unseen
    with open(mounted / "big.bin", "rb") as again:  # pages dropped: the daemon serves it again
        os.posix_fadvise(again.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        served += len(again.read())

    result = regfs_cli("stats", mounted.path, "--json")
    assert result.returncode == 0, result
    report = json.loads(result.stdout)
    assert report["bytes_served"] == served
    assert report["cache_misses"] == len(files)
    assert report["cache_hits"] == 0  # the second read used the daemon's open cache file
    assert report["errors"] == 0
    # One .dir manifest, for data/; two of its files opened in order start read-ahead of the next.
    assert report["objects_fetched"] == 1 + len(files) + report["readahead_fetches"]
    (remote,) = report["remotes"].values()
    assert remote["fetches"] == report["objects_fetched"] and remote["errors"] == 0

    plain = regfs_cli("stats", mounted.path)
    assert plain.returncode == 0 and "bytes_served" in plain.stdout


def test_status_lists_running_mounts(basic, mount, regfs_cli):
    mounted = mount(f"{basic.path}@v1.0")
    records = json.loads(regfs_cli("status", "--json").stdout)
    (record,) = [r for r in records if r["mountpoint"] == str(mounted.path)]
    assert record["revision"] == "v1.0" and record["source"] == str(basic.path)
    os.kill(record["pid"], 0)  # alive
    mounted.unmount()
    records = json.loads(regfs_cli("status", "--json").stdout)
    assert all(r["mountpoint"] != str(mounted.path) for r in records)


def test_two_users_share_a_group_cache(tools, public_dir):
    """Two users of one group copy a directory through one `--shared group` cache, two processes
    each, at the same time: each gets DVC's bytes, each object is downloaded once, and the cache
    stays usable by both."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.registry import Registry, random_bytes

    group, users = 4300, (4301, 4302)
    registry = Registry.create(tools, public_dir / "registry", remotes={"store": "../store"},
                               default_remote="store")
    contents = {f"set/part-{i}.bin": random_bytes(500 + i, 300_000 + i) for i in range(8)}
    for relpath, data in contents.items():
        registry.write(relpath, data)
    registry.add("set")
    registry.commit("data")
    registry.push()
    cache = public_dir / "cache"
    cache.mkdir()
    os.chown(cache, 0, group)
    cache.chmod(0o2775)  # what the admin does once: install -d -m 2775 -g GROUP

    def regfs_as(uid: int, *args: str) -> subprocess.CompletedProcess:
        home = public_dir / f"home-{uid}"
        env = {**tools.env, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
               "XDG_CACHE_HOME": str(home / ".cache")}
        return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", f"--groups={group}",
                               sys.executable, "-m", "regfs", *args], env=env, cwd=public_dir,
                              capture_output=True, timeout=120, check=False)

    usable = regfs_as(users[0], "--version")
    assert usable.returncode == 0, f"another uid cannot run this interpreter: {usable.stderr.decode()}"

    def get(job: tuple[int, int]) -> tuple[Path, subprocess.CompletedProcess]:
        uid, copy = job
        out = public_dir / f"out-{uid}" / str(copy)
        return out, regfs_as(uid, "get", f"{registry.path}@main", "set", "-o", str(out), "--cache-dir", str(cache),
                             "--shared", "group")

    for uid in users:
        (public_dir / f"out-{uid}").mkdir()
        os.chown(public_dir / f"out-{uid}", uid, uid)
    jobs = [(uid, copy) for uid in users for copy in range(2)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        for out, result in pool.map(get, jobs):
            assert result.returncode == 0, result.stderr.decode()
            got = {f"set/{path.relative_to(out)}": path.read_bytes() for path in out.rglob("*") if path.is_file()}
            assert got == contents, f"{out}: {result.stderr.decode()}"

    objects = [path for path in (cache / "files").rglob("*") if path.is_file()]
    assert len(objects) == len(contents) + 1  # every part and the .dir manifest, once
    for path in objects:
        assert path.stat().st_mode & 0o777 == 0o444
        assert hashlib.md5(path.read_bytes()).hexdigest() == path.parent.name + path.name.removesuffix(".dir")
    for path in [cache, *(p for p in cache.rglob("*") if p.is_dir())]:
        mode = path.stat().st_mode
        assert path.stat().st_gid == group and mode & 0o2070 == 0o2070, f"{path}: {oct(mode)}"
    assert not list((cache / "regfs" / "tmp").iterdir())
