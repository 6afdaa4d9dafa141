"""Faults regfs must survive: a daemon killed with SIGKILL (mid-download too), a registry that
cannot be fetched when a mount starts, a machine gone offline (registry and remote both
unreachable) that mounts again from its cache, and two daemons and `dvc pull` filling one cache
directory at once.

The SIGKILL and unreachable-registry tests drive `regfs mount`/`umount` by hand (not the `mount`
fixture), because they kill daemons on purpose and mount twice on one mountpoint; every mount is
removed in `finally`. Git faults of refreshing mounts are in test_git_faults.py, a full disk in
test_disk_faults.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import S3Server
from tests.faultproxy import FaultProxy
from tests.gitserver import publish
from tests.httpserver import HTTPRemoteServer
from tests.mounting import is_mounted, run_cli
from tests.registry import Registry, random_bytes
from tests.trees import (
    assert_same_tree,
    cache_objects,
    md5_hex,
    mentions_object,
    missing_from_cache,
    object_path,
    snapshot,
)


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


def test_sigkill_mid_download_leaves_no_partial_object(tools, oracle, tmp_path):
    """The daemon dies while an object streams in over HTTP (the fault proxy holds the download
    mid-body): nothing partial is ever visible in the cache, the next daemon removes the dead
    download's temporary file and fetches it whole."""
    server = HTTPRemoteServer(tmp_path).start()
    proxy = FaultProxy(server.url).start()
    registry = Registry.create(tools, tmp_path / "registry", remotes={"store": "../store"})
    registry.dvc("remote", "add", "-d", "web", f"{proxy.url}/store")
    data = random_bytes(77, 3 * 1024 * 1024)
    registry.write("huge.bin", data)
    registry.add("huge.bin")
    registry.push("-r", "store")
    registry.commit("huge")
    digest = hashlib.md5(data).hexdigest()
    final = tmp_path / "cache" / "files" / "md5" / digest[:2] / digest[2:]
    tmp_dir = tmp_path / "cache" / "regfs" / "tmp"

    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    proxy.inject("stall")
    try:
        _mount(tools, f"{registry.path}@main", mountpoint, tmp_path / "cache", tmp_path / "first.log",
               tmp_path / "cli1")
        pid = _daemon_pid(tools, mountpoint, tmp_path / "cli2")
        reader = threading.Thread(target=lambda: subprocess.run(["cat", str(mountpoint / "huge.bin")],
                                                                capture_output=True, check=False))
        reader.start()
        deadline = time.monotonic() + 60
        while not (proxy.faulted("stall") and any(tmp_dir.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.faulted("stall") and any(tmp_dir.iterdir()), "the download never started"
        assert not final.exists(), "the download finished before it could be interrupted"
        _kill(pid)
        reader.join(timeout=60)
        assert not final.exists()  # the partial bytes stayed in regfs/tmp, never at the object's path

        _cleanup(tools, mountpoint, tmp_path / "cli3")
        proxy.clear()
        log = tmp_path / "second.log"
        _mount(tools, f"{registry.path}@main", mountpoint, tmp_path / "cache", log, tmp_path / "cli4")
        assert "removed 1 temporary files of interrupted downloads" in log.read_text()
        assert hashlib.md5((mountpoint / "huge.bin").read_bytes()).hexdigest() == digest
        assert hashlib.md5(final.read_bytes()).hexdigest() == digest
        assert not list(tmp_dir.iterdir())
    finally:
        _cleanup(tools, mountpoint, tmp_path / "cli5")
        proxy.stop()
        server.stop()


def test_an_unreachable_registry_is_served_from_its_mirror(basic, tools, oracle, tmp_path, regfs_cli):
    """The registry cannot be fetched when a mount starts: the mirror and cache from earlier
    serve it, and the log says so."""
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


# -- offline: neither the registry nor its remote can be reached --------------------------------

# Never read before going offline (so never cached); everything else of `main` is read first.
PARTLY_BUCKET = "partly-pulled-bucket"
DEAD_ENDPOINT = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused
UNCACHED = ["big.bin", "data/sub/deeper/x.bin"]


def check_offline_mount(mount, source: str, cache: Path, oracle_tree: dict, go_offline, *offline_args: str,
                        offline_env: dict[str, str] | None = None) -> None:
    """Mount `source` and read all of `main` but UNCACHED into `cache`; unmount; `go_offline()`;
    then a new mount on the same cache (given `offline_args` and `offline_env`) must start from
    the mirror, saying so, show the same refs, read every cached file right, and fail each
    uncached one with EIO and a log line naming it, without hanging."""
    expected = {path: entry for path, entry in oracle_tree.items() if path not in UNCACHED}
    first = mount(source, "--refresh", "0", "--dir-readahead", "0", cache_dir=cache)  # UNCACHED stay so
    refs = snapshot(first.path)  # the ref symlinks, and directories for names with /
    assert_same_tree(snapshot(first / "main", skip=UNCACHED), expected, "main, online")
    first.unmount()

    go_offline()
    uncached_ids = [md5_hex(oracle_tree[path][2]) for path in UNCACHED]
    started = time.monotonic()
    second = mount(source, "--refresh", "0", *offline_args, cache_dir=cache, env=offline_env,
                   expect_errors="|".join(uncached_ids))
    assert time.monotonic() - started < 120, "starting offline took longer than the Git timeouts allow"
    assert "serving the mirror as fetched at" in second.log_text(), second.log_tail()
    assert snapshot(second.path) == refs
    assert_same_tree(snapshot(second / "main", skip=UNCACHED), expected, "main, offline")
    for path, object_id in zip(UNCACHED, uncached_ids):
        assert os.stat(second / "main" / path).st_size == len(oracle_tree[path][2])
        started = time.monotonic()
        with pytest.raises(OSError) as caught:
            (second / "main" / path).read_bytes()
        assert caught.value.errno == errno.EIO, f"{path}: {caught.value!r}"
        assert time.monotonic() - started < 60, f"{path}: EIO only after {time.monotonic() - started:.0f} s"
        assert any(mentions_object(line, object_id) and "remote" in line for line in second.error_lines()), \
            f"no ERROR line names object {object_id} and its remote:\n{second.log_tail()}"


def test_offline_local_registry_and_remote_gone(basic, mount, oracle, tmp_path):
    """The registry directory and the local remote are moved away (an unplugged disk)."""
    source, store = tmp_path / "registry", tmp_path / "store"
    shutil.copytree(basic.path, source, symlinks=True)
    shutil.copytree(basic.store, store, symlinks=True)

    def go_offline() -> None:
        source.rename(tmp_path / "registry-gone")
        store.rename(tmp_path / "store-gone")

    check_offline_mount(mount, os.fspath(source), tmp_path / "cache", oracle.tree(basic.path, "main"),
                        go_offline)


def test_offline_git_server_hung_and_s3_gone(tools, mount, oracle, tmp_path):
    """The registry is served over git:// and its remote is S3. Offline, the Git server's address
    accepts connections but never answers (a hung server), and nothing listens at the S3
    endpoint any more. The offline mount gives the Git server 3 s of silence ($REGFS_GIT_TIMEOUT,
    not 30 s) and the S3 remote 2 retries (not 5): what is checked is that both are given up and
    the mirror and cache serve, not the default budgets (test_remote_faults.py checks retrying)."""
    from moto.server import ThreadedMotoServer

    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, port = s3.get_host_and_port()
    s3_running = True
    published = None
    try:
        S3Server(f"http://{host}:{port}").create_bucket("offline-bucket")
        work = Registry.create(tools, tmp_path / "work", remotes={"s3": "s3://offline-bucket/r"},
                               default_remote="s3")
        work.dvc("remote", "modify", "s3", "endpointurl", f"http://{host}:{port}")
        work.write("README.txt", "served over git://\n")
        work.commit("readme")
        published = publish(work, tmp_path / "served")
        files = {"big.bin": random_bytes(41, 3_000_000), "small.txt": b"small\n",
                 "data/sub/deeper/x.bin": random_bytes(42, 70_000), "data/y.txt": b"y\n"}
        commit_sha = published.commit_and_push("data on S3", files)
        oracle_tree = oracle.tree(published.bare, commit_sha)

        def go_offline() -> None:
            nonlocal s3_running
            published.server.blackhole()
            s3.stop()
            s3_running = False

        check_offline_mount(mount, published.url, tmp_path / "cache", oracle_tree, go_offline,
                            "--remote-config", "s3.retries=2", offline_env={"REGFS_GIT_TIMEOUT": "3"})
    finally:
        if published is not None:
            published.server.close()
        if s3_running:
            s3.stop()



def test_offline_a_partly_pulled_directory_lists_and_reads_what_is_cached(tools, s3_server, mount, oracle,
                                                                           tmp_path):
    """DVC, sharing the cache, pulled one file of a directory output (and its manifest); then the
    S3 remote became unreachable (the mount is given an endpoint nothing listens on). The
    directory still lists, the pulled file reads, and only the others fail (EIO), although the
    sizes of the entries could never be asked of the remote."""
    s3_server.create_bucket(PARTLY_BUCKET)
    registry = Registry.create(tools, tmp_path / "registry", remotes={"s3": f"s3://{PARTLY_BUCKET}/r"},
                               default_remote="s3")
    registry.dvc("remote", "modify", "s3", "endpointurl", s3_server.endpoint_url)
    registry.write("images/a.bin", random_bytes(51, 30_000))
    registry.write("images/b.bin", random_bytes(52, 40_000))
    registry.write("images/c/d.txt", "d\n")
    registry.add("images")
    registry.push()
    registry.commit("images")
    expected = oracle.tree(registry.path, "main")
    cache, clone = tmp_path / "cache", tmp_path / "clone"
    tools.run(["git", "clone", "-q", registry.path, clone], cwd=tmp_path)
    tools.run([tools.dvc3, "config", "--local", "cache.dir", cache], cwd=clone)
    tools.run([tools.dvc3, "pull", "-q", "images/a.bin"], cwd=clone)
    ids = {path: md5_hex(expected[path][2]) for path in ("images/a.bin", "images/b.bin", "images/c/d.txt")}
    assert [object_path(cache, object_id).exists() for object_id in ids.values()] == [True, False, False]

    mounted = mount(f"{registry.path}@main", "--remote-config", f"s3.endpointurl={DEAD_ENDPOINT}",
                    "--remote-config", "s3.retries=0", cache_dir=cache,
                    expect_errors="|".join(f"{ids[path][:2]}/?{ids[path][2:]}"
                                           for path in ("images/b.bin", "images/c/d.txt")))
    assert sorted(os.listdir(mounted / "images")) == ["a.bin", "b.bin", "c"]
    assert os.stat(mounted / "images" / "a.bin").st_size == len(expected["images/a.bin"][2])
    assert (mounted / "images" / "a.bin").read_bytes() == expected["images/a.bin"][2]
    for path in ("images/b.bin", "images/c/d.txt"):
        with pytest.raises(OSError) as caught:
            (mounted / path).read_bytes()
        assert caught.value.errno == errno.EIO, f"{path}: {caught.value!r}"
    assert "sizes of the entries of images" in mounted.log_text(), mounted.log_tail()


# -- one cache directory, written by two daemons and DVC at once --------------------------------

SHARED_BUCKET = "shared-cache-bucket"
FETCHED = re.compile(r" INFO regfs\.fetch: fetched (\S+) ")


def read_all(root: Path, relpaths: list[str]) -> dict[str, str]:
    return {relpath: md5_hex((root / relpath).read_bytes()) for relpath in relpaths}


def test_two_daemons_and_dvc_pull_fill_one_cache_at_once(tools, s3_server, oracle, mount, tmp_path):
    """Two mounts on one --cache-dir, each read by two threads (in opposite orders), while
    `dvc pull` in a clone uses that directory as its `cache.dir`: every byte read is right, dvc
    pull succeeds, every object in the cache hashes to its name and none is missing, and no daemon
    downloads an object twice."""
    s3_server.create_bucket(SHARED_BUCKET)
    registry = Registry.create(tools, tmp_path / "registry", remotes={"s3": f"s3://{SHARED_BUCKET}/r"},
                               default_remote="s3")
    registry.dvc("remote", "modify", "s3", "endpointurl", s3_server.endpoint_url)
    for number in range(40):
        registry.write(f"many/{number:02}.bin", random_bytes(100 + number, 20_000 * (number % 7 + 1)))
    for number in range(6):
        registry.write(f"big/{number}.bin", random_bytes(200 + number, 6 * 1024 * 1024 + number))
    registry.write("single.bin", random_bytes(300, 5 * 1024 * 1024))
    registry.add("many", "big", "single.bin")
    registry.push()
    registry.commit("objects for a shared cache")
    expected = oracle.tree(registry.path, "main")
    files = sorted(relpath for relpath, entry in expected.items() if entry[0] == "file")
    wanted = {relpath: md5_hex(expected[relpath][2]) for relpath in files}

    cache = tmp_path / "cache"
    clone = tmp_path / "clone"
    tools.run(["git", "clone", "-q", registry.path, clone], cwd=tmp_path)
    tools.run([tools.dvc3, "config", "--local", "cache.dir", cache], cwd=clone)
    mounts = [mount(f"{registry.path}@main", cache_dir=cache) for _ in range(2)]

    for mounted in mounts:  # opens each daemon's S3 remote (and caches the two manifests)
        assert sorted(os.listdir(mounted / "big")) == [f"{number}.bin" for number in range(6)]
    warm = set((cache / "files").rglob("*"))
    with open(tmp_path / "pull.log", "wb") as pull_log:
        # One job: DVC downloads one object at a time, so the daemons get their share.
        pull = subprocess.Popen([tools.dvc3, "pull", "-q", "--jobs", "1"], cwd=clone, env=tools.env,
                                stdin=subprocess.DEVNULL, stdout=pull_log, stderr=pull_log)
    try:
        # The readers start as soon as DVC writes its first file into the cache, mid-pull.
        deadline = time.monotonic() + 120
        while not set((cache / "files").rglob("*")) - warm and pull.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.005)
        assert pull.poll() is None, "dvc pull ended before the daemons could read with it"
        with ThreadPoolExecutor(max_workers=4) as pool:
            reads = [pool.submit(read_all, mounted.path, order) for mounted in mounts
                     for order in (files, files[::-1])]
            results = [read.result(timeout=600) for read in reads]
        assert pull.wait(timeout=600) == 0, (tmp_path / "pull.log").read_text()
    finally:
        if pull.poll() is None:
            pull.kill()
            pull.wait()
    for result in results:
        assert result == wanted
    assert_same_tree(snapshot(clone), expected, "the workspace dvc pull checked out")

    objects = cache_objects(cache, manifests=True)
    corrupt = [relpath for relpath in objects if md5_hex((cache / relpath).read_bytes())
               != "".join(relpath.split("/")[-2:]).removesuffix(".dir")]
    assert not corrupt, f"cache objects whose bytes do not hash to their name: {corrupt}"
    strays = [str(path.relative_to(cache)) for path in (cache / "files").rglob("*")
              if path.is_file() and str(path.relative_to(cache)) not in objects]
    assert not strays, f"files in the cache that are no objects (temporary files left?): {strays}"
    assert not missing_from_cache(cache, oracle.clone(registry.path, "main"))
    assert not list((cache / "regfs" / "tmp").iterdir())
    for mounted in mounts:
        fetched = Counter(FETCHED.findall(mounted.log_text()))
        twice = {object_id: count for object_id, count in fetched.items() if count > 1}
        assert not twice, f"{mounted.path} downloaded objects more than once: {twice}"
