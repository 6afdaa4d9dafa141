"""Remotes that misbehave, for real: a fault-injecting proxy (tests/faultproxy.py) between regfs
and the moto S3 server, or the HTTP remote server, answers 500, 503 or S3's SlowDown, resets the
connection mid-body, truncates the body, or stalls.

Each fault kind, on each remote type: a few failures (fewer than the retry budget) are retried
and the mount shows DVC's bytes; a remote that keeps failing gives EIO within a bounded time, one
clear ERROR line in the daemon log, nothing partial in the cache, and the same file reads
correctly once the fault is gone. The budget is made small on the command line
(`--remote-config NAME.retries=2 ...`) to keep the module quick.

One mount per remote type serves the whole module (a mount costs seconds); every test reads its
own files, so each read is a first read, and checks the log lines that name its files only.
"""

from __future__ import annotations

import errno
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from regfs.backends import CHUNK
from regfs.dvcconfig import RemoteSpec
from regfs.errors import ConfigError
from regfs.remotes import open_remote
from tests.faultproxy import BODY_KINDS, STATUS_KINDS, FaultProxy, registry_behind_proxy
from tests.httpserver import HTTPRemoteServer, self_signed_tls
from tests.mounting import Mount, Outcome, read_in_child
from tests.registry import Registry, random_bytes
from tests.trees import Snapshot, md5_hex, object_path

BUCKET = "remote-faults-bucket"
KINDS = STATUS_KINDS + BODY_KINDS
RETRIES, READ_TIMEOUT, CONNECT_TIMEOUT, RETRY_TIMEOUT = 2, 2, 2, 10
# What a permanent fault may cost at most (see regfs/remotes.py), with room for a loaded machine:
# a read that takes longer is a hang.
GIVE_UP_BOUND = RETRY_TIMEOUT + CONNECT_TIMEOUT + READ_TIMEOUT + 30


def _files() -> dict[str, bytes]:
    files, seed = {}, 300
    for kind in KINDS:
        for role in ("transient", "permanent"):
            seed += 1
            files[f"{kind}-{role}.bin"] = random_bytes(seed, 200_000 + seed)
    for kind in ("reset", "truncate"):
        seed += 1
        files[f"large-{kind}.bin"] = random_bytes(seed, CHUNK + (3 << 20) + seed)  # two parts
    files["dir/a.bin"] = random_bytes(401, 1000)
    files["dir/b.bin"] = random_bytes(402, 2000)
    files["missing.bin"] = random_bytes(403, 3000)
    return files


FILES = _files()


@dataclass
class Case:
    """One registry, mounted through a fault proxy in front of its default remote."""

    kind: str  # "s3" or "http"
    registry: Registry
    remote: str
    proxy: FaultProxy
    expected: Snapshot  # DVC's workspace of main
    mounted: Mount | None = None

    def __truediv__(self, relpath: str) -> Path:
        return self.mounted.path / relpath

    def data(self, relpath: str) -> bytes:
        kind, _, data = self.expected[relpath]
        assert kind == "file"
        return data

    def errors_about(self, relpath: str) -> list[str]:
        return [line for line in self.mounted.error_lines() if f"/{relpath}: " in line]

    def retry_warnings(self, object_id: str) -> list[str]:
        return [line for line in self.mounted.log_text().splitlines()
                if " WARNING " in line and "retry" in line and f"{object_id[:2]}/{object_id[2:]}" in line]


def _fill(registry: Registry) -> None:
    for relpath, data in FILES.items():
        registry.write(relpath, data)
    registry.add(*(relpath for relpath in FILES if not relpath.startswith("dir/")), "dir")


def _budget(remote: str) -> list[str]:
    options = {"retries": RETRIES, "read_timeout": READ_TIMEOUT, "connect_timeout": CONNECT_TIMEOUT,
               "retry_timeout": RETRY_TIMEOUT}
    return [arg for key, value in options.items() for arg in ("--remote-config", f"{remote}.{key}={value}")]


def _mounted(case: Case, tools, workdir: Path, *args: str):
    """A pinned mount of main for the whole module; any ERROR line must name a file some test
    failed on purpose (the tests check their own lines)."""
    workdir.mkdir(parents=True, exist_ok=True)
    mounted = Mount(source=f"{case.registry.path}@main", path=workdir / "mnt", cache_dir=workdir / "cache",
                    log_file=workdir / "regfs.log", env=tools.env, workdir=workdir / "cli",
                    extra_args=list(args), expect_errors=r"(getattr|read) /(\w+-permanent|dir/a|missing)\.bin: ")
    mounted.result = mounted.start()
    case.mounted = mounted
    try:
        assert mounted.result.returncode == 0 and mounted.mounted, f"{mounted.result}\n{mounted.log_tail()}"
        yield case
    finally:
        mounted.unmount()
        problems = mounted.problems + mounted.unexpected_errors()
        assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def s3_case(tools, oracle, s3_server, tmp_path_factory):
    parent = tmp_path_factory.mktemp("faults-s3")
    s3_server.create_bucket(BUCKET)
    registry = Registry.create(tools, parent / "registry", remotes={"s3store": f"s3://{BUCKET}/prefix"},
                               default_remote="s3store")
    registry.dvc("remote", "modify", "s3store", "endpointurl", s3_server.endpoint_url)
    _fill(registry)
    registry.push()
    registry.commit("data on S3")
    proxy = FaultProxy(s3_server.endpoint_url).start()
    try:
        case = Case("s3", registry, "s3store", proxy, oracle.tree(registry.path, "main"))
        yield from _mounted(case, tools, parent, "--remote-config", f"s3store.endpointurl={proxy.url}",
                            *_budget("s3store"))
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def http_case(tools, oracle, tmp_path_factory):
    """The objects are pushed to a local remote that an HTTP server serves; the committed config's
    default remote is that server's URL, so `dvc pull` (the oracle) reads over HTTP too."""
    parent = tmp_path_factory.mktemp("faults-http")
    with registry_behind_proxy(tools, parent, _fill) as (registry, proxy):
        case = Case("http", registry, "web", proxy, oracle.tree(registry.path, "main"))
        yield from _mounted(case, tools, parent, "--remote-config", f"web.url={proxy.url}/store",
                            *_budget("web"))


@pytest.fixture(params=["s3", "http"])
def case(request) -> Case:
    chosen = request.getfixturevalue(f"{request.param}_case")
    chosen.proxy.clear()
    chosen.proxy.requests.clear()
    yield chosen
    chosen.proxy.clear()


def read(path: Path, timeout: float = GIVE_UP_BOUND) -> Outcome:
    return read_in_child(path, timeout)


def read_recovered(path: Path, within: float = 10.0) -> Outcome:
    deadline = time.monotonic() + within
    while (outcome := read(path)).data is None and time.monotonic() < deadline:
        time.sleep(0.25)
    return outcome


def assert_nothing_partial(cache_dir: Path, object_id: str) -> None:
    leftovers = list((cache_dir / "regfs" / "tmp").iterdir())
    assert not leftovers, f"temporary files left after a failed download: {leftovers}"
    assert not object_path(cache_dir, object_id).exists(), "a failed download left an object in the cache"


# The reason each status fault gives in the log line (body faults: in the library's own words).
REASONS = {
    ("s3", "500"): "500: ", ("s3", "503"): "503: ", ("s3", "slowdown"): "SlowDown: ",
    ("http", "500"): "HTTP 500", ("http", "503"): "HTTP 503", ("http", "slowdown"): "HTTP 503",
}


@pytest.mark.parametrize("fault", KINDS)
def test_transient_faults_are_retried_and_permanent_ones_give_eio(case, fault, oracle):
    transient, permanent = f"{fault}-transient.bin", f"{fault}-permanent.bin"
    transient_id, permanent_id = md5_hex(FILES[transient]), md5_hex(FILES[permanent])

    # Transient: two failures of the three attempts the budget allows.
    case.proxy.inject(fault, times=RETRIES, methods=("GET",))
    assert read(case / transient).data == case.data(transient)
    assert len(case.proxy.faulted(fault)) == RETRIES, "the fault was not injected"
    assert len(case.retry_warnings(transient_id)) == RETRIES
    assert not case.errors_about(transient)

    # Permanent: every attempt fails.
    case.proxy.inject(fault, methods=("GET",))
    started = time.monotonic()
    outcome = read(case / permanent)
    assert outcome.errno == errno.EIO, f"expected EIO, got {outcome}"
    assert time.monotonic() - started < GIVE_UP_BOUND
    assert len(case.proxy.faulted(fault)) == RETRIES + RETRIES + 1
    (line,) = case.errors_about(permanent)
    assert permanent_id in line and f"remote '{case.remote}'" in line, line
    assert f"gave up after {RETRIES + 1} failed attempts" in line, line
    assert REASONS.get((case.kind, fault), "") in line, line
    assert "corrupt" not in line, line
    assert_nothing_partial(case.mounted.cache_dir, permanent_id)

    # The fault is gone: the same file reads again (once the daemon's one-second memory of the
    # failure, which keeps the kernel's immediate retry from downloading again, has passed).
    case.proxy.clear()
    assert read_recovered(case / permanent).data == case.data(permanent)
    assert object_path(case.mounted.cache_dir, permanent_id).exists()


@pytest.mark.parametrize("fault", ["reset", "truncate"])
def test_a_broken_range_is_resumed_from_the_bytes_delivered(case, fault):
    """The second part of a two-part object breaks after half its bytes: the retry asks for the
    rest of that part (over HTTP, whose bodies are streamed, from past the bytes already
    written), never for the first part again, and the bytes are DVC's."""
    relpath = f"large-{fault}.bin"
    object_id = md5_hex(FILES[relpath])
    case.proxy.inject(fault, times=1, match=lambda request: (request.range_start or 0) > 0)
    assert read(case / relpath).data == case.data(relpath)
    gets = [(request.range_start, request.fault) for request in case.proxy.requests
            if request.method == "GET" and request.path.endswith(f"{object_id[:2]}/{object_id[2:]}")]
    broken = [start for start, kind in gets if kind == fault]
    clean = sorted(start for start, kind in gets if kind is None)
    assert broken == [CHUNK] and len(clean) == 2 and clean[0] == 0, gets
    retried = clean[1]
    assert CHUNK <= retried < len(FILES[relpath]), gets
    if case.kind == "http" and fault == "truncate":
        assert retried > CHUNK, f"the retry asked again for bytes delivered before: {gets}"
    assert len(case.retry_warnings(object_id)) == 1


def test_sizes_of_a_directory_output_are_retried(case):
    """`stat` in a directory output fetches its manifest, then asks the remote for the sizes of the
    entries (HEAD requests for a few S3 objects; for HTTP, GETs of their first bytes, as the
    entries are small, then a HEAD for the entry stat'ed). A remote that keeps answering 503 to
    those gives EIO; once it recovers, a single 503 is retried."""
    def entries(request) -> bool:
        return not request.path.endswith(".dir")

    methods = ("HEAD", "GET") if case.kind == "http" else ("HEAD",)
    case.proxy.inject("503", methods=methods, match=entries)
    with pytest.raises(OSError) as failed:
        (case / "dir" / "a.bin").stat()
    assert failed.value.errno == errno.EIO
    (line,) = case.errors_about("dir/a.bin")
    assert "503" in line and f"remote '{case.remote}'" in line and "gave up" in line, line
    object_id = md5_hex(FILES["dir/a.bin"])
    assert f"{object_id[:2]}/{object_id[2:]}" in line, f"not about the entry's size: {line}"
    # Asked twice with the full budget each: for the directory's entries at once, then for this
    # entry when its stat needs the size (sizes unknown at listing are asked again per entry).
    refused = [r for r in case.proxy.faulted("503") if r.path.endswith(object_id[2:])]
    assert len(refused) in (RETRIES + 1, 2 * (RETRIES + 1)), refused

    case.proxy.clear()
    case.proxy.inject("503", times=1, methods=methods, match=entries)
    before = len(case.proxy.faulted("503"))
    assert (case / "dir" / "a.bin").stat().st_size == len(FILES["dir/a.bin"])
    assert len(case.proxy.faulted("503")) == before + 1
    assert read(case / "dir" / "b.bin").data == case.data("dir/b.bin")


def test_a_missing_object_is_not_retried(case, tmp_path):
    """404 / NoSuchKey: one GET (the size is in the .dvc file: no HEAD), EIO naming the object as
    missing, no retry."""
    object_id = md5_hex(FILES["missing.bin"])
    put_back = _hide_object(case, object_id, tmp_path)
    try:
        outcome = read(case / "missing.bin")
    finally:
        put_back()
    assert outcome.errno == errno.EIO
    (line,) = case.errors_about("missing.bin")
    assert "missing" in line and object_id in line, line
    assert not case.retry_warnings(object_id)
    asked = [request.method for request in case.proxy.requests
             if re.search(f"{object_id[:2]}/{object_id[2:]}$", request.path)]
    assert asked == ["GET"]


def _hide_object(case: Case, object_id: str, tmp_path: Path):
    """Remove an object from the remote, behind the proxy's back; returns what puts it back."""
    if case.kind == "http":
        path = object_path(case.registry.path.parent / "store", object_id)
        path.rename(tmp_path / "hidden")
        return lambda: (tmp_path / "hidden").rename(path)
    import boto3

    host, port = case.proxy.upstream
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    key = f"prefix/files/md5/{object_id[:2]}/{object_id[2:]}"
    client.delete_object(Bucket=BUCKET, Key=key)
    return lambda: client.put_object(Bucket=BUCKET, Key=key, Body=FILES["missing.bin"])


def test_https_with_a_ca_bundle_and_a_refused_certificate(http_case, mount, tmp_path):
    """The same objects over HTTPS, with a self-signed certificate: `ssl_verify = <its path>` reads
    them; without it the certificate is refused at once (no retry) and the read gives EIO."""
    tls, certificate = self_signed_tls(tmp_path)
    server = HTTPRemoteServer(http_case.registry.path.parent, tls=tls).start()
    source, remote_url = f"{http_case.registry.path}@main", f"web.url={server.url}/store"
    try:
        trusted = mount(source, "--remote-config", remote_url, "--remote-config", f"web.ssl_verify={certificate}")
        assert read(trusted / "dir" / "b.bin").data == http_case.data("dir/b.bin")
        refused = mount(source, "--remote-config", remote_url, expect_errors=r"read /500-transient\.bin: ")
        assert read(refused / "500-transient.bin").errno == errno.EIO
        (line,) = refused.error_lines()
        assert "certificate" in line.lower() and "gave up" not in line, line
        assert " WARNING " not in refused.log_text()
    finally:
        server.stop()


@pytest.mark.parametrize("option, value, message", [
    ("retries", "two", "retries must be a whole number, not 'two'"),
    ("read_timeout", "soon", "read_timeout must be a number of seconds, not 'soon'"),
    ("retry_timeout", "-1", "retry_timeout cannot be negative"),
])
def test_retry_options_are_checked(option, value, message):
    with pytest.raises(ConfigError, match=message):
        open_remote(RemoteSpec("store", "/srv/store", {option: value}))
