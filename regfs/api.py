"""The Python face of regfs: `dvc.api`-shaped functions and an fsspec filesystem.

    with regfs.api.open("data/a.csv", repo=URL, rev="v1.0") as f: ...
    regfs.api.read(path, repo=URL, rev=..., mode="rb")
    regfs.api.get_url(path, repo=URL, rev=...)          # the object's URL on its remote
    fsspec.filesystem("regfs", repo=URL, rev="v1.0")     # RegistryFileSystem (entry point)

This module only translates: trees, reads and copies come from the core (`namespace`, `copy`), so
the API reads exactly what the mount shows, through the same cache, each object verified before
use. `repo=None` is the Git repository around the current directory; `rev=None` its HEAD (the
default branch); uncommitted changes are never seen. Core errors become the natural Python ones
(`FileNotFoundError`, `IsADirectoryError`, `NotADirectoryError`, which are also `RegfsError`s);
other `RegfsError`s (unknown revision, unreachable remote, corrupt object) pass unchanged.

Invariants:
- Process-level state (the `Context`: cache, sqlite size index, remotes and their s3fs clients;
  registries and their pygit2 mirrors) lives in one holder per process. A child process (a fork,
  as PyTorch DataLoader workers are) builds its own on first use; what it inherited is kept
  referenced and never used, so that no sqlite connection of the parent is closed in the child.
- In one process a revision name means one commit: each registry is fetched once per process,
  before its first branch or tag name is resolved, and the answer is kept.
- A `RegistryFileSystem` is pinned to the commit its `rev` named when it was created, and pickles
  with that commit, so workers of any start method read the same commit as their parent.
"""

import contextlib
import errno
import io
import os
import re
import threading
from collections.abc import Iterator
from datetime import datetime, timezone

from fsspec import AbstractFileSystem
from fsspec.callbacks import DEFAULT_CALLBACK
from fsspec.spec import make_instance
from fsspec.utils import isfilelike

from regfs import copy
from regfs.dvcconfig import Config, parse_config
from regfs.errors import ConfigError, IsADirectory, NotADirectory, PathNotFound, UsageError
from regfs.namespace import MountView
from regfs.registry import Context, Registry
from regfs.tree import ImportedFileNode, ObjectNode, OutputDirNode

__all__ = ["RegistryFileSystem", "get_url", "open", "read"]

_FULL_SHA = re.compile(r"^[0-9a-f]{40}$")


class RegistryFileNotFoundError(PathNotFound, FileNotFoundError):
    pass


class RegistryIsADirectoryError(IsADirectory, IsADirectoryError):
    pass


class RegistryNotADirectoryError(NotADirectory, NotADirectoryError):
    pass


_OS_ERRORS = {PathNotFound: RegistryFileNotFoundError, IsADirectory: RegistryIsADirectoryError,
              NotADirectory: RegistryNotADirectoryError}


@contextlib.contextmanager
def _translated(path: str, where: str) -> Iterator[None]:
    try:
        yield
    except tuple(_OS_ERRORS) as exc:
        if isinstance(exc, OSError):
            raise  # translated already
        mapped = next(mapped for core, mapped in _OS_ERRORS.items() if isinstance(exc, core))
        generic = os.strerror(exc.errno)
        reason = generic if str(exc).lower().startswith(generic.lower()) else str(exc)
        raise mapped(exc.errno, f"{reason} in {where}", path) from exc


# -- process-level state -----------------------------------------------------------------------


class _ProcessState:
    """Contexts, fetched registries and resolved revisions of one process."""

    def __init__(self):
        self.pid = os.getpid()
        self._lock = threading.RLock()
        self._contexts: dict = {}
        self._fetched: set[tuple[str, str]] = set()
        self._commits: dict[tuple, str] = {}
        self._default_remotes: dict[tuple, str | None] = {}

    def registry(self, url: str, cache_dir: str, overrides: Config) -> Registry:
        with self._lock:
            if cache_dir not in self._contexts:
                self._contexts[cache_dir] = Context(cache_dir)
            return self._contexts[cache_dir].registry(url, overrides)

    def commit(self, registry: Registry, revision: str) -> str:
        key = (registry.context.cache.directory, registry.url, revision)
        with self._lock:
            if key not in self._commits:
                self._commits[key] = self._resolve(registry, revision)
            return self._commits[key]

    def _resolve(self, registry: Registry, revision: str) -> str:
        if _FULL_SHA.match(revision):
            return registry.resolve(revision)  # immutable: fetched only if the mirror lacks it
        fetched_key = (registry.context.cache.directory, registry.url)
        if fetched_key not in self._fetched:
            registry.update()
            self._fetched.add(fetched_key)
        return registry.mirror.resolve(revision)

    def default_remote(self, registry: Registry, commit_sha: str) -> str | None:
        """`core.remote` of the commit's `.dvc/config` over the user's levels."""
        key = (registry.context.cache.directory, registry.url, commit_sha)
        with self._lock:
            if key not in self._default_remotes:
                config = registry.context.user_config
                for item in registry.mirror.walk(commit_sha):
                    if item.path == ".dvc/config" and item.kind == "file":
                        text = registry.mirror.read_blob(item.blob_id).decode("utf-8", "replace")
                        with contextlib.suppress(ConfigError):  # the tree skips it as well
                            config = config.merged(parse_config(text))
                self._default_remotes[key] = config.core.get("remote")
            return self._default_remotes[key]


_state: _ProcessState | None = None
_state_lock = threading.Lock()
_inherited: list[_ProcessState] = []  # parents' state, kept alive so that it is never closed here


def _after_fork_in_child() -> None:
    global _state_lock
    _state_lock = threading.Lock()  # another thread of the parent may have held it


os.register_at_fork(after_in_child=_after_fork_in_child)


def _process_state() -> _ProcessState:
    global _state
    with _state_lock:
        if _state is None or _state.pid != os.getpid():
            if _state is not None:
                _inherited.append(_state)
            _state = _ProcessState()
        return _state


# -- locating a revision -----------------------------------------------------------------------


def _repo_url(repo) -> str:
    """The registry URL; `None` is the Git repository around the current directory."""
    if repo is not None:
        return os.fspath(repo)
    directory = os.getcwd()
    while not os.path.exists(os.path.join(directory, ".git")):
        parent = os.path.dirname(directory)
        if parent == directory:
            raise UsageError(f"{os.getcwd()} is not inside a Git repository: give repo=URL")
        directory = parent
    return directory


def _overrides(remote: str | None, remote_config: dict | None, remote_name: str | None) -> Config:
    """The level `--remote` and `--remote-config` make on the command line, from keyword args."""
    config = Config()
    if remote:
        config.core["remote"] = remote.lower()
    if remote_config:
        config.remotes[remote_name.lower()] = {str(key).lower(): value for key, value in remote_config.items()}
    return config


class _Revision:
    """Where the API reads: a registry URL, its commit for `rev`, the remote settings, the cache."""

    def __init__(self, repo=None, rev=None, remote=None, remote_config=None, cache_dir=None):
        from regfs.cli import default_cache_dir  # the one place the default is decided

        self.url = _repo_url(repo)
        self.rev = rev or "HEAD"
        self.remote = remote
        self.remote_config = dict(remote_config or {})
        self.cache_dir = os.path.abspath(os.fspath(cache_dir or default_cache_dir()))
        state = _process_state()
        self.commit_sha = state.commit(self._base(state), self.rev)

    def _base(self, state: _ProcessState) -> Registry:
        return state.registry(self.url, self.cache_dir, _overrides(self.remote, None, None))

    def _registry(self, state: _ProcessState) -> Registry:
        base = self._base(state)
        if not self.remote_config:
            return base
        # dvc.api applies remote_config to the remote named, else to the default remote.
        name = self.remote or state.default_remote(base, self.commit_sha)
        if not name:
            raise ConfigError(f"remote_config needs a remote: {self} names no default remote "
                              "(core.remote); give remote=NAME")
        return state.registry(self.url, self.cache_dir, _overrides(self.remote, self.remote_config, name))

    def view(self) -> MountView:
        """A view of the pinned commit, from this process's state (so, fork-safe)."""
        state = _process_state()
        registry = self._registry(state)
        state.commit(registry, self.commit_sha)  # a new process may need to fetch it (spawn elsewhere)
        return MountView(registry, self.commit_sha)

    def __str__(self) -> str:
        return f"{self.url}@{self.rev}"


# -- dvc.api-shaped functions ------------------------------------------------------------------


@contextlib.contextmanager
def open(path, repo=None, rev=None, remote=None, mode: str = "r", encoding: str | None = None,
         remote_config: dict | None = None, cache_dir=None) -> Iterator[io.IOBase]:
    """Open a file of a registry revision for reading, as `dvc.api.open`: a context manager
    giving a binary (`mode="rb"`) or text (`mode="r"`, UTF-8 unless `encoding`) file object."""
    if mode not in ("r", "rb", "rt"):
        raise ValueError(f"regfs.api.open: mode {mode!r} is not supported (the registry is read-only: "
                         "use 'r' or 'rb')")
    revision = _Revision(repo, rev, remote, remote_config, cache_dir)
    path = copy.clean_path(path)
    with _translated(path, str(revision)):
        file = copy.open_file(revision.view(), path)
    if mode != "rb":
        file = io.TextIOWrapper(file, encoding=encoding or "utf-8")
    with file:
        yield file


def read(path, repo=None, rev=None, remote=None, mode: str = "r", encoding: str | None = None,
         remote_config: dict | None = None, cache_dir=None) -> str | bytes:
    """The whole content of a file of a registry revision, as `dvc.api.read`."""
    with open(path, repo, rev, remote, mode, encoding, remote_config, cache_dir) as file:
        return file.read()


def get_url(path, repo=None, rev=None, remote=None, remote_config: dict | None = None,
            cache_dir=None) -> str:
    """The URL of an output's object on its remote, as `dvc.api.get_url`: the remote's URL (a path
    for a local remote) joined with the object's path; for a directory output, its `.dir` object.
    Nothing is downloaded and the object's presence is not checked."""
    revision = _Revision(repo, rev, remote, remote_config, cache_dir)
    path = copy.clean_path(path)
    with _translated(path, str(revision)):
        view = revision.view()
        node, _ = view.resolve(copy.follow_links(view, path, follow_last=False))
    if isinstance(node, ImportedFileNode):
        node = node.target()
    if not isinstance(node, (ObjectNode, OutputDirNode)):
        raise UsageError(f"{path} is not a DVC output in {revision} (it is "
                         f"{'tracked by Git' if node.kind != 'dir' else 'a directory of Git or an import'})"
                         ": it has no remote URL")
    return node.store.url(node.ref)


# -- fsspec ------------------------------------------------------------------------------------


class RegistryFileSystem(AbstractFileSystem):
    """One revision of a registry as a read-only fsspec filesystem; paths are relative to its root.

        fs = fsspec.filesystem("regfs", repo=URL, rev="v1.0", cache_dir=..., remote=...,
                               remote_config={...})
        pandas.read_csv("regfs://data/a.csv", storage_options={"repo": URL, "rev": "v1.0"})

    Entries are `file`, `directory` or `link` (a symlink, not followed by `ls`/`info`/`find`, so
    `find` lists what a checkout holds); `open` follows symlinks inside the revision.
    """

    protocol = "regfs"
    root_marker = ""

    def __init__(self, repo=None, rev=None, remote=None, remote_config=None, cache_dir=None, **kwargs):
        super().__init__(repo=repo, rev=rev, remote=remote, remote_config=remote_config,
                         cache_dir=cache_dir, **kwargs)
        self.revision = _Revision(repo, rev, remote, remote_config, cache_dir)

    @property
    def commit_sha(self) -> str:
        return self.revision.commit_sha

    def __reduce__(self):
        # The pinned commit and absolute URL, not `rev`: a worker must read what its parent read.
        options = {**self.storage_options, "repo": self.revision.url, "rev": self.commit_sha,
                   "cache_dir": self.revision.cache_dir}
        return make_instance, (type(self), self.storage_args, options)

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(item) for item in path]
        path = os.fspath(path)
        path = path.removeprefix("regfs://")
        return path.strip("/")

    @contextlib.contextmanager
    def _view(self, path: str) -> Iterator[MountView]:
        with _translated(path, str(self.revision)):
            yield self.revision.view()

    def _entry(self, view: MountView, path: str) -> dict:
        attr = view.attr(path)
        entry = {"name": path, "size": attr.size, "type": "directory" if attr.kind == "dir" else attr.kind,
                 "mtime": attr.mtime, "islink": attr.kind == "link", "isexec": attr.is_exec}
        if attr.kind == "link":
            entry["destination"] = view.readlink(path)
        return entry

    def info(self, path, **kwargs) -> dict:
        path = self._strip_protocol(path)
        with self._view(path) as view:
            return self._entry(view, copy.follow_links(view, path, follow_last=False))

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        with self._view(path) as view:
            real_path = copy.follow_links(view, path, follow_last=False)
            if view.attr(real_path).kind != "dir":
                entries = [{**self._entry(view, real_path), "name": path}]
            else:
                entries = [{**self._entry(view, f"{real_path}/{name}" if real_path else name),
                            "name": f"{path}/{name}" if path else name} for name in view.listdir(real_path)]
        return entries if detail else [entry["name"] for entry in entries]

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        path = self._strip_protocol(path)
        if mode != "rb":
            raise OSError(errno.EROFS, f"{self.revision} is read-only", path)
        with self._view(path) as view:
            return copy.open_file(view, path)

    def get_file(self, rpath, lpath, callback=DEFAULT_CALLBACK, outfile=None, **kwargs) -> None:
        """Copy one entry to a local path: a file with its executable bit, a symlink as a
        symlink, a directory as a directory (fsspec's `get` then copies what is below it)."""
        if outfile is not None or isfilelike(lpath):
            return super().get_file(rpath, lpath, callback=callback, outfile=outfile, **kwargs)
        path, lpath = self._strip_protocol(rpath), os.fspath(lpath)
        with self._view(path) as view:
            attr = view.attr(copy.follow_links(view, path, follow_last=False))
            if attr.kind == "dir":
                os.makedirs(lpath, exist_ok=True)
                return None
            callback.set_size(attr.size)
            copy.copy_out(view, path, lpath)
            callback.relative_update(attr.size)
        return None

    def modified(self, path) -> datetime:
        return datetime.fromtimestamp(self.info(path)["mtime"], tz=timezone.utc)

    def ukey(self, path) -> str:
        info = self.info(path)
        return f"{self.commit_sha}:{info['name']}"

