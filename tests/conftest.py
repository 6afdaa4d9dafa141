"""Fixtures of the acceptance suite: tools, the DVC oracle, a moto S3 server, sshd, Azurite and a
GCS emulator, FUSE mounts and the basic registry that several modules share.

Registries are built once per session with the real git and dvc CLIs (each dvc call costs about
a second), the basic registry once per run (pytest-xdist workers share it), and never modified
after their fixture returns; a test that needs to change a registry builds or copies its own.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mounting import STARTED, CliResult, Mount, run_cli
from tests.registry import Oracle, Registry, Tools, random_bytes
from tests.servers import Azurite, GCSServer, SSHServer


def pytest_sessionstart(session: pytest.Session) -> None:
    """The suite needs real FUSE: fail loudly instead of skipping everything."""
    problems = []
    try:
        if not stat.S_ISCHR(os.stat("/dev/fuse").st_mode):
            problems.append("/dev/fuse is not a character device")
    except OSError as error:
        problems.append(f"/dev/fuse is unusable: {error}")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 is not on PATH (install the fuse3 package)")
    if problems:
        pytest.exit("regfs acceptance tests need FUSE: " + "; ".join(problems), returncode=1)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Safety net for interrupted runs: no mount of this session outlives it."""
    for mounted in STARTED:
        mounted.unmount()


# -- tools, oracle, S3 -------------------------------------------------------------------------


# Modules that take a minute or more run first, longest first (as measured with 4 workers on 2
# cores): pytest-xdist hands whole modules (--dist loadfile) to its workers in this order, and one
# of these started last would run alone at the end. Of the first four only two need the basic
# registry (one worker builds it, see `basic`).
_SLOW_MODULES = ("test_git_faults", "test_faults", "test_imports", "test_cache_mgmt", "test_remote_faults",
                 "test_api", "test_hostile_names", "test_layouts", "test_prefetch", "test_credentials",
                 "test_fuzz", "test_pipeline", "test_read_engine", "test_cache", "test_legacy", "test_ls",
                 "test_gcs", "test_cloud_versioning", "test_ssh", "test_soak", "test_s3", "test_basic")


def pytest_configure(config: pytest.Config) -> None:
    """pytest-xdist 3 hands out the modules with the most tests first, whatever their order, unless
    told `--no-loadscope-reorder`: the order of `_SLOW_MODULES` holds only with that."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: index for index, name in enumerate(_SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rpartition(".")[2], len(rank)))


@pytest.fixture(scope="session")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tools]:
    tools = Tools(tmp_path_factory.mktemp("tools"))
    try:
        yield tools
    finally:
        tools.close()


@pytest.fixture(scope="session")
def oracle(tools: Tools) -> Oracle:
    return Oracle(tools)


@dataclass
class S3Server:
    endpoint_url: str

    def create_bucket(self, name: str) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=name)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 and a free port, for the whole session (state kept)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()


def _running(server: SSHServer | Azurite | GCSServer) -> Iterator:
    """The body of a session fixture of a tests/servers.py server: started, stopped at the end."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ssh_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """OpenSSH's sshd on 127.0.0.1 and a free port, key authentication (tests/servers.py)."""
    yield from _running(SSHServer(tmp_path_factory.mktemp("sshd")))


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """Azurite's blob service on 127.0.0.1 and a free port, in memory (tests/servers.py)."""
    yield from _running(Azurite(tmp_path_factory.mktemp("azurite")))


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GCSServer]:
    """gcp-storage-emulator on 127.0.0.1 and a free port, in memory (tests/servers.py)."""
    yield from _running(GCSServer())


# -- mounts ------------------------------------------------------------------------------------


MountFactory = Callable[..., Mount]


@pytest.fixture
def mount(tools: Tools, tmp_path: Path) -> Iterator[MountFactory]:
    """`mount(source, *cli_args, cache_dir=None, expect_errors=None, check=True, mountpoint=None,
    env=None)`.

    Returns a started `Mount`. Each mount gets its own new mountpoint and log file and, unless
    given, a fresh cache dir; `env` adds variables to the suite's environment for regfs. With
    `check`, a failed `regfs mount` fails the test. At teardown every mount is unmounted; the test
    fails if one could not be, if a daemon survived `regfs umount`, or if a daemon logged an ERROR
    line that `expect_errors` (True, or a regex every such line must match) did not allow.
    """
    mounts: list[Mount] = []
    numbers = itertools.count()

    def start(
        source: str | os.PathLike,
        *cli_args: str,
        cache_dir: Path | None = None,
        expect_errors: bool | str | None = None,
        check: bool = True,
        mountpoint: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Mount:
        number = next(numbers)
        mounted = Mount(
            source=os.fspath(source),
            path=mountpoint or tmp_path / f"mnt{number}",
            create_mountpoint=mountpoint is None,
            cache_dir=cache_dir or tmp_path / f"cache{number}",
            log_file=tmp_path / f"regfs{number}.log",
            env={**tools.env, **(env or {})},
            workdir=tmp_path / f"cli{number}",
            extra_args=list(cli_args),
            expect_errors=expect_errors,
        )
        mounts.append(mounted)
        mounted.result = mounted.start()
        if check and (mounted.result.returncode != 0 or not os.path.ismount(mounted.path)):
            pytest.fail(
                f"regfs mount {mounted.source} failed (mounted={os.path.ismount(mounted.path)}): "
                f"{mounted.result}\n--- daemon log\n{mounted.log_tail()}",
                pytrace=False,
            )
        return mounted

    yield start

    problems = []
    for mounted in reversed(mounts):
        mounted.unmount()
        problems += mounted.problems
        unexpected = mounted.unexpected_errors()
        if unexpected:
            problems.append(
                f"daemon of {mounted.source} logged unexpected errors:\n  " + "\n  ".join(unexpected[:20])
            )
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def regfs_cli(tools: Tools, tmp_path: Path) -> Callable[..., CliResult]:
    """Run `python -m regfs ARGS` (not daemonizing commands such as `ls`)."""
    numbers = itertools.count()

    def run(*args: str | os.PathLike) -> CliResult:
        return run_cli(list(args), tools.env, tmp_path / f"cli-run{next(numbers)}")

    return run


# -- the basic registry ------------------------------------------------------------------------


@dataclass
class BasicRegistry:
    registry: Registry
    store: Path
    refs: dict[str, str]  # branch/tag name -> commit sha

    @property
    def path(self) -> Path:
        return self.registry.path


def build_basic(tools: Tools, parent: Path) -> BasicRegistry:
    """A DVC 3 registry with a local remote given relative to the repo (`../store`).

    main:       v1.0 -> v2.0 (also the annotated tag `release`) -> one Git-only commit
    feature/x:  v1.0 -> one commit adding an output and changing a Git file
    """
    registry = Registry.create(tools, parent / "registry", remotes={"store": "../store"},
                               default_remote="store")
    # Git-tracked files: plain, executable, symlinks to a DVC file output and a DVC directory.
    registry.write("README.txt", "A small data registry.\n")
    registry.write("tools/check.sh", "#!/bin/sh\nexit 0\n", executable=True)
    registry.symlink("link-to-run", "run.sh")
    registry.symlink("links/data-link", "../data")
    registry.symlink("links/absolute", "/nonexistent/absolute/target")
    # DVC outputs.
    registry.write("données/été 1.txt", "bonjour l'été\n")
    registry.write("empty.bin", b"")
    registry.write("run.sh", "#!/bin/sh\necho run v1\n", executable=True)
    registry.write("big.bin", random_bytes(1, 3 * 1024 * 1024 + 17))
    registry.write("models/v1/weights.bin", random_bytes(2, 4096))
    registry.write("data/a.txt", "a version 1\n")
    registry.write("data/empty-in-dir.txt", b"")
    registry.write("data/sub/tool.sh", "#!/bin/sh\necho tool\n", executable=True)
    registry.write("data/sub/deeper/x.bin", random_bytes(3, 100_000))
    registry.write("data/sub/ünï côdé.txt", "unicode in a directory output\n")
    registry.write("data/with space/f.csv", "x,y\n1,2\n")
    registry.add("données/été 1.txt", "empty.bin", "run.sh", "big.bin", "models/v1/weights.bin", "data")
    registry.push()
    registry.commit("v1.0")
    registry.tag("v1.0")

    registry.write("data/a.txt", "a version 2\n")
    registry.write("data/new.txt", "new in v2\n")
    registry.write("run.sh", "#!/bin/sh\necho run v2\n", executable=True)
    registry.dvc("remove", "empty.bin.dvc")
    registry.remove("empty.bin")
    registry.add("data", "run.sh")
    registry.push()
    registry.commit("v2.0")
    registry.tag("v2.0")
    registry.git("tag", "-a", "-m", "an annotated tag", "release", "v2.0")

    registry.write("later.txt", "a Git-only change after v2.0\n")
    registry.commit("Git-only commit on main")

    registry.checkout("v1.0")
    registry.checkout("feature/x", new_branch=True)
    registry.write("README.txt", "A small data registry, feature branch.\n")
    registry.write("feature.txt", "only on feature/x\n")
    registry.add("feature.txt")
    registry.push()
    registry.commit("feature/x")
    registry.checkout("main")
    return BasicRegistry(registry, parent / "store", registry.refs())


@pytest.fixture(scope="session")
def basic(tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> BasicRegistry:
    """Built once per test run: under pytest-xdist the first worker to need it builds it in the
    run's base directory (each worker's is inside), holding a lock file that the others wait on,
    and every worker reads that one (the registry is never modified after it is built)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build_basic(tools, tmp_path_factory.mktemp("basic"))
    shared = tmp_path_factory.getbasetemp().parent / "basic"
    with open(shared.parent / "basic.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "built").exists():
            shutil.rmtree(shared, ignore_errors=True)  # left by a worker that failed building it
            shared.mkdir()
            build_basic(tools, shared)
            (shared / "built").touch()
    registry = Registry(tools, shared / "registry", tools.dvc3)
    return BasicRegistry(registry, shared / "store", registry.refs())
