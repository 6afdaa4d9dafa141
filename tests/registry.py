"""Build DVC registries with the real `git` and `dvc` CLIs, and compute what a mount must show.

The real DVC is the oracle: `Oracle.tree(source, rev)` clones the registry, checks out the
revision, runs `dvc pull` and snapshots the workspace without `.git/` and `.dvc/`. Tests compare a
mount's snapshot against it; no test writes an expected tree by hand, except for inputs DVC itself
rejects (see test_broken_inputs.py).

Every command runs with one clean environment (`Tools.env`): a private HOME, so neither the
user's git nor DVC global config leaks in, no analytics, a private DVC site cache, fixed git
identities and the fake AWS credentials that the moto server accepts.

A fixture whose steps do not depend on each other runs them at once (`run_concurrently`,
`Registry.dvc_concurrently`): a dvc command spends most of its time starting up and waiting on
files and sockets, so several overlap even on two cores.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.dvcfork import DvcForkServer
from tests.trees import Snapshot, snapshot

PROJECT_ROOT = Path(__file__).resolve().parent.parent

COMMAND_TIMEOUT = 300
# At most this many commands of one fixture at once: more only queue for the cores.
CONCURRENT_COMMANDS = 6


class CommandFailed(AssertionError):
    """A git or dvc command that exited non-zero; the message carries its output."""


def random_bytes(seed: int, size: int) -> bytes:
    """Deterministic incompressible test data."""
    return random.Random(seed).randbytes(size)


def run_concurrently(*steps: Callable[[], object]) -> list:
    """Call independent steps in threads; their results in order. The first failure is raised
    once every step has ended (no step is left running behind a failed fixture)."""
    with ThreadPoolExecutor(min(len(steps), CONCURRENT_COMMANDS)) as pool:
        futures = [pool.submit(step) for step in steps]
    return [future.result() for future in futures]


def find_dvc3() -> Path:
    """The `dvc` of the virtualenv running the tests (it has dvc-s3)."""
    candidate = Path(sys.executable).parent / "dvc"
    if not candidate.exists():
        pytest.fail(f"DVC 3 not found: expected {candidate} next to {sys.executable}", pytrace=False)
    return candidate


def find_dvc2() -> Path:
    """The legacy DVC 2.x executable: $REGFS_DVC2, else <repo>/.venv-dvc2/bin/dvc. Never skipped."""
    configured = os.environ.get("REGFS_DVC2")
    candidate = Path(configured) if configured else PROJECT_ROOT / ".venv-dvc2" / "bin" / "dvc"
    if not candidate.exists():
        pytest.fail(
            f"legacy DVC 2 not found at {candidate}: install dvc==2.58.2 into <repo>/.venv-dvc2 "
            "or point REGFS_DVC2 at its dvc executable",
            pytrace=False,
        )
    return candidate


def clean_env(home: Path, site_cache: Path) -> dict[str, str]:
    """os.environ without git/dvc/aws settings, plus the test suite's fixed ones."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("GIT_", "DVC_", "AWS_", "XDG_", "AZURE_", "GOOGLE_", "GCSFS_"))
    }
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CACHE_HOME=str(home / ".cache"),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="Registry Tester",
        GIT_AUTHOR_EMAIL="tester@example.invalid",
        GIT_COMMITTER_NAME="Registry Tester",
        GIT_COMMITTER_EMAIL="tester@example.invalid",
        GIT_TERMINAL_PROMPT="0",
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(site_cache),
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        # gcsfs's JSON API (which the GCS emulator speaks), not its gRPC client; and google-auth
        # never probes for a GCE metadata server.
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
        NO_GCE_CHECK="true",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONUTF8="1",
    )
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(proxy, None)
    return env


@dataclass
class Tools:
    """The git and dvc executables and the environment every command of the suite runs with.

    DVC commands run in the clean environment go through a fork server (tests/dvcfork.py) of
    their `dvc` script's virtualenv, started on the first one and ended by `close`: the same
    `dvc` entry point, without the second of CPU each new `dvc` process spends importing DVC."""

    workdir: Path
    env: dict[str, str] = field(init=False)
    dvc3: Path = field(init=False)
    _dvc_servers: dict[str, DvcForkServer] = field(init=False, default_factory=dict)
    _dvc_servers_lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        home = self.workdir / "home"
        site_cache = self.workdir / "dvc-site-cache"
        home.mkdir(parents=True, exist_ok=True)
        site_cache.mkdir(parents=True, exist_ok=True)
        self.env = clean_env(home, site_cache)
        self.dvc3 = find_dvc3()
        # DVC's global config in the private HOME: no update checks (DVC 2 would try the network).
        dvc_global = home / ".config" / "dvc" / "config"
        dvc_global.parent.mkdir(parents=True, exist_ok=True)
        dvc_global.write_text("[core]\n    check_update = false\n    analytics = false\n")
        self.run(["git", "config", "--global", "advice.detachedHead", "false"], cwd=self.workdir)
        self.run(["git", "config", "--global", "init.defaultBranch", "main"], cwd=self.workdir)

    @property
    def dvc2(self) -> Path:
        return find_dvc2()

    def run(
        self,
        argv: list[str | os.PathLike],
        cwd: Path,
        *,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> subprocess.CompletedProcess:
        argv = [os.fspath(arg) for arg in argv]
        server = self._dvc_fork_server(argv[0]) if env is None or env == self.env else None
        if server is not None:
            completed = server.run(argv, cwd, timeout)
        else:
            completed = subprocess.run(
                argv,
                cwd=cwd,
                env=dict(env) if env is not None else self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        if check and completed.returncode != 0:
            raise CommandFailed(
                f"command failed with exit {completed.returncode} in {cwd}: {' '.join(argv)}\n"
                f"--- stdout\n{completed.stdout.decode(errors='replace')}\n"
                f"--- stderr\n{completed.stderr.decode(errors='replace')}"
            )
        return completed

    def _dvc_fork_server(self, executable: str) -> DvcForkServer | None:
        """The fork server for a `dvc` script of a virtualenv (run by the `python` beside it)."""
        interpreter = Path(executable).with_name("python")
        if Path(executable).name != "dvc" or not interpreter.exists():
            return None
        with self._dvc_servers_lock:
            if executable not in self._dvc_servers:
                workdir = self.workdir / f"dvc-fork-server-{len(self._dvc_servers)}"
                self._dvc_servers[executable] = DvcForkServer(interpreter, workdir, self.env)
            return self._dvc_servers[executable]

    def close(self) -> None:
        for server in self._dvc_servers.values():
            server.close()


@dataclass
class Registry:
    """A Git repository with DVC initialised in it, driven through the real CLIs."""

    tools: Tools
    path: Path
    dvc_executable: Path

    @classmethod
    def create(
        cls,
        tools: Tools,
        path: Path,
        *,
        remotes: Mapping[str, str] | None = None,
        default_remote: str | None = None,
        dvc_executable: Path | None = None,
    ) -> Registry:
        """`git init` + `dvc init` + `dvc remote add` (run from the repo root, so relative URLs
        are given the way a user types them) + a first commit."""
        path.mkdir(parents=True)
        registry = cls(tools, path, dvc_executable or tools.dvc3)
        registry.git("init", "-q", "-b", "main")
        registry.dvc("init")
        for name, url in (remotes or {}).items():
            flags = ["-d"] if name == default_remote else []
            registry.dvc("remote", "add", *flags, name, url)
        registry.commit("Initialise DVC")
        return registry

    # -- commands -------------------------------------------------------------------------------

    def git(self, *args: str | os.PathLike) -> str:
        return self.tools.run(["git", *args], cwd=self.path).stdout.decode()

    def dvc(self, *args: str | os.PathLike, dvc_executable: Path | None = None) -> str:
        """Run dvc quietly; fails the test with dvc's output if it exits non-zero."""
        executable = dvc_executable or self.dvc_executable
        return self.tools.run([executable, *args, "-q"], cwd=self.path).stdout.decode()

    def dvc_concurrently(self, *commands: Sequence[str | os.PathLike]) -> None:
        """Several dvc commands in this (DVC 3) registry at once. Each waits for the repository
        lock (`dvc --wait-for-lock`, which DVC 2 lacks), so they overlap DVC's start-up and what a
        command does before locking, and change the workspace one at a time, in no fixed order."""
        run_concurrently(*(lambda command=command: self.dvc("--wait-for-lock", *command) for command in commands))

    def add(self, *paths: str) -> None:
        self.dvc("add", *paths)

    def push(self, *args: str) -> None:
        self.dvc("push", *args)

    def commit(self, message: str) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.rev_parse("HEAD")

    def tag(self, name: str, rev: str = "HEAD") -> None:
        self.git("tag", name, rev)

    def checkout(self, rev: str, *, new_branch: bool = False) -> None:
        if new_branch:
            self.git("checkout", "-q", "-b", rev)
        else:
            self.git("checkout", "-q", rev)

    def rev_parse(self, rev: str) -> str:
        return self.git("rev-parse", "--verify", "-q", f"{rev}^{{commit}}").strip()

    def refs(self) -> dict[str, str]:
        """Short branch and tag names -> commit sha."""
        lines = self.git("for-each-ref", "--format=%(refname:short) %(objectname) %(*objectname)",
                         "refs/heads", "refs/tags").splitlines()
        result = {}
        for line in lines:
            name, sha, *peeled = line.split(" ")
            result[name] = peeled[0] if peeled and peeled[0] else sha
        return result

    # -- workspace ------------------------------------------------------------------------------

    def write(self, relpath: str, data: bytes | str, *, executable: bool = False) -> Path:
        target = self.path / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.encode() if isinstance(data, str) else data)
        target.chmod(0o755 if executable else 0o644)
        return target

    def remove(self, relpath: str) -> None:
        target = self.path / relpath
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()

    def symlink(self, relpath: str, target: str) -> None:
        link = self.path / relpath
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)

    def git_files(self, rev: str) -> Snapshot:
        """What Git stores in `rev` as a snapshot (no DVC data), `.dvc/` left out like `snapshot`."""
        listing = self.git("ls-tree", "-r", "-z", rev).split("\0")
        result: Snapshot = {}
        for record in filter(None, listing):
            meta, relpath = record.split("\t", 1)
            mode, kind, object_id = meta.split(" ")
            if kind != "blob" or relpath.startswith(".dvc/"):
                continue
            parts = relpath.split("/")
            for depth in range(1, len(parts)):
                result["/".join(parts[:depth])] = ("dir",)
            data = self.tools.run(["git", "cat-file", "blob", object_id], cwd=self.path).stdout
            if mode == "120000":
                result[relpath] = ("link", data.decode())
            else:
                result[relpath] = ("file", mode == "100755", data)
        return result


# -- the oracle ---------------------------------------------------------------------------------


class Oracle:
    """`git clone SOURCE && git checkout REV && dvc pull`, memoised per (source, commit, dvc).

    The clone is made beside the source (same parent directory) so that a remote URL relative
    to the registry (`../store`) names the same store from the clone, as it does for a user who
    clones the registry next to its store.
    """

    _counter = itertools.count()

    def __init__(self, tools: Tools) -> None:
        self.tools = tools
        self._clones: dict[tuple, Path] = {}
        self._trees: dict[Path, Snapshot] = {}

    def clone(
        self,
        source: Path,
        rev: str,
        *,
        dvc_executable: Path | None = None,
        local_config: Iterable[tuple[str, str, str]] = (),
        pull_args: Iterable[str] = (),
        pull_check: bool = True,
        subrepos: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> Path:
        """A pulled workspace of `rev`; `local_config` holds (remote, option, value) triples set
        with `dvc remote modify --local` before pulling (what a user keeps in config.local), and
        `pull_args` extra arguments of `dvc pull` (such as `-r REMOTE`). With `pull_check` false,
        a pull that fails for some outputs (DVC still checks out the others) is accepted: the test
        then asserts which outputs are missing. `subrepos` are directories (sub-repositories) where
        `dvc pull` runs too, after the root; `env` variables are set for every dvc command (such
        as DVC_GLOBAL_CONFIG_DIR)."""
        executable = dvc_executable or self.tools.dvc3
        local_config = tuple(local_config)
        pull_args = tuple(pull_args)
        subrepos = tuple(subrepos)
        extra_env = tuple(sorted((env or {}).items()))
        run_env = {**self.tools.env, **dict(extra_env)}
        commit = self._commit(source, rev)
        key = (str(source), commit, str(executable), local_config, pull_args, pull_check, subrepos, extra_env)
        if key not in self._clones:
            # The pid: pytest-xdist workers share the basic registry, and clone it side by side.
            workspace = source.parent / f".oracle-{source.name}-{commit[:10]}-{os.getpid()}-{next(self._counter)}"
            self.tools.run(["git", "clone", "-q", "--no-checkout", source, workspace], cwd=source.parent)
            self.tools.run(["git", "checkout", "-q", commit], cwd=workspace)
            for remote, option, value in local_config:
                self.tools.run([executable, "remote", "modify", "--local", remote, option, value],
                               cwd=workspace, env=run_env)
            for directory in ("", *subrepos):
                self.tools.run([executable, "pull", "-q", *pull_args], cwd=workspace / directory,
                               check=pull_check, env=run_env)
            self._clones[key] = workspace
        return self._clones[key]

    def trees(self, source: Path, revs: Iterable[str], **options) -> dict[str, Snapshot]:
        """`tree` of each revision, the pulls of different commits at once (`run_concurrently`);
        `options` as for `clone`."""
        by_commit = {self._commit(source, rev): rev for rev in revs}
        run_concurrently(*(lambda rev=rev: self.clone(source, rev, **options) for rev in by_commit.values()))
        return {rev: self.tree(source, rev, **options) for rev in revs}

    def _commit(self, source: Path, rev: str) -> str:
        return self.tools.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=source).stdout.decode().strip()

    def tree(
        self,
        source: Path,
        rev: str,
        *,
        dvc_executable: Path | None = None,
        local_config: Iterable[tuple[str, str, str]] = (),
        pull_args: Iterable[str] = (),
        pull_check: bool = True,
        subrepos: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> Snapshot:
        workspace = self.clone(source, rev, dvc_executable=dvc_executable, local_config=local_config,
                               pull_args=pull_args, pull_check=pull_check, subrepos=subrepos, env=env)
        if workspace not in self._trees:
            self._trees[workspace] = snapshot(workspace)
        return self._trees[workspace]
