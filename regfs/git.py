"""Read-only access to a registry's Git history, through a bare mirror (the only pygit2 user).

The mirror lives under the cache directory, one per URL, and is fetched with `+refs/heads/*` and
`+refs/tags/*` refspecs (pruning refs the URL no longer has, never objects, so an old commit stays
readable by sha); no working tree is ever checked out. A fetch gives up on a server that does not
connect within 10 s or stays silent for 30 s ($REGFS_GIT_TIMEOUT changes the 30 s). Fetches of
one mirror by several processes are serialised by a lock file beside it. Commits and blobs are
immutable, so everything read by sha can be cached forever by callers.
"""

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pygit2

from regfs.address import public_url
from regfs.errors import RevisionNotFound, SourceError

logger = logging.getLogger(__name__)

# git's `safe.directory` ownership check guards against running another user's hooks and
# filters in a checkout. regfs never checks out, runs no hook, and reads mirrors that, in a
# group-shared cache, belong to whichever member created them: the check would only lock the
# group out.
pygit2.option(pygit2.enums.Option.SET_OWNER_VALIDATION, 0)
# libgit2 waits forever by default on a server that accepts a connection and never answers, which
# would hang a mount's start (and hold the mirror's lock against every other daemon). git servers
# send a keep-alive at least every 5 s while they prepare a pack (`uploadpack.keepAlive`), so 30 s
# of silence means the server is gone. Both values are milliseconds; $REGFS_GIT_TIMEOUT (seconds)
# replaces the 30 s, for a server known to answer slowly or a test that waits on a hung one.
CONNECT_TIMEOUT_MS = 10_000


def _server_timeout_ms(text: str | None, default: float = 30) -> int:
    try:
        seconds = float(text) if text else default
    except ValueError:
        seconds = -1
    if not 0 < seconds < 2**31 / 1000:
        logger.warning("ignoring REGFS_GIT_TIMEOUT=%r: not a number of seconds above 0; using %g s",
                       text, default)
        seconds = default
    return round(seconds * 1000)


SERVER_TIMEOUT_MS = _server_timeout_ms(os.environ.get("REGFS_GIT_TIMEOUT"))
pygit2.option(pygit2.enums.Option.SET_SERVER_CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)
pygit2.option(pygit2.enums.Option.SET_SERVER_TIMEOUT, SERVER_TIMEOUT_MS)

_REFSPECS = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"]
_HEX = re.compile(r"^[0-9a-fA-F]{7,40}$")
_FULL_HEX = re.compile(r"[0-9a-fA-F]{40}")
MODE_EXEC = 0o100755
MODE_LINK = 0o120000
MODE_GITLINK = 0o160000


@dataclass(frozen=True)
class TreeItem:
    path: str  # POSIX, relative to the commit root
    kind: str  # "file", "link", "dir" (a tree or a submodule, which checks out as an empty dir)
    blob_id: str | None  # the blob, or the tree of a directory (None for a submodule)
    is_exec: bool = False


class Mirror:
    """A bare mirror of one registry URL."""

    def __init__(self, url: str, directory: str, shared_group: bool = False):
        self._fetch_url = url
        self.url = public_url(url)  # for messages: never `user:password@`
        self._shared_group = shared_group
        self.path = os.path.join(directory, _mirror_name(url))
        self._lock_path = self.path + ".lock"
        self._repo: pygit2.Repository | None = None
        self._lock = threading.RLock()

    def fetch(self) -> None:
        """Create the mirror if needed and fetch every branch and tag from the URL."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self._lock_path, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                self._fetch_locked()
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _fetch_locked(self) -> None:
        callbacks = _Credentials()
        try:
            repo = self._open_or_init()
            remote = repo.remotes.create_anonymous(self._fetch_url)
            heads = remote.list_heads(callbacks=callbacks)
            remote.fetch(_REFSPECS, callbacks=callbacks, prune=pygit2.enums.FetchPrune.PRUNE)
        except (pygit2.GitError, KeyError, ValueError) as exc:
            reason = _first_line(exc).replace(self._fetch_url, self.url)  # libgit2 may quote the URL
            raise SourceError(f"cannot fetch {self.url}: {reason}") from exc
        head = next((h for h in heads if h.name == "HEAD"), None)
        target = getattr(head, "symref_target", None) if head else None
        if target and target in repo.references:
            repo.set_head(target)
        with self._lock:
            self._repo = None  # reopen so new packs are seen

    def last_fetch(self) -> float | None:
        """When the mirror last got refs from its URL, or None if it never did."""
        try:
            return os.stat(os.path.join(self.path, "FETCH_HEAD")).st_mtime
        except FileNotFoundError:
            return None

    def _open_or_init(self) -> pygit2.Repository:
        if os.path.isdir(self.path):
            return pygit2.Repository(self.path)
        repo = pygit2.init_repository(self.path, bare=True)
        if self._shared_group:  # git's own way to keep a repository writable by its group
            repo.config["core.sharedRepository"] = "group"
        return repo

    @property
    def repo(self) -> pygit2.Repository:
        with self._lock:
            return self.repo_unlocked()

    def repo_unlocked(self) -> pygit2.Repository:
        if self._repo is None:
            try:
                self._repo = pygit2.Repository(self.path)
            except pygit2.GitError as exc:
                raise SourceError(f"no mirror of {self.url} at {self.path}: {exc}") from exc
        return self._repo

    def refs(self) -> dict[str, str]:
        """Branch and tag names (without `refs/heads/`, `refs/tags/`) to commit shas."""
        with self._lock:
            repo, found = self.repo_unlocked(), {}
            for prefix in ("refs/heads/", "refs/tags/"):
                for name in repo.references:
                    if not name.startswith(prefix):
                        continue
                    commit = _peel_commit(repo, repo.references[name].target)
                    if commit is not None:
                        # Tags win over branches of the same name, as in `git rev-parse`.
                        found[name[len(prefix):]] = str(commit.id)
            return found

    def default_branch(self) -> str | None:
        with self._lock:
            try:
                target = self.repo_unlocked().references["HEAD"].target
            except (KeyError, pygit2.GitError):
                return None
            if isinstance(target, str) and target.startswith("refs/heads/"):
                return target[len("refs/heads/"):]
            return None

    def resolve(self, revision: str) -> str:
        """The commit sha a branch, tag, full sha or unique sha prefix (7+ hex digits) names.

        A full sha of a commit is that commit even where a branch has it as its name, as in
        `git rev-parse` and libgit2's revparse (which DVC uses); a shorter prefix loses to a ref.
        """
        with self._lock:
            repo = self.repo
            if _FULL_HEX.fullmatch(revision):
                with contextlib.suppress(RevisionNotFound):
                    return self.find_commit(revision)
            candidates = [f"refs/tags/{revision}", f"refs/heads/{revision}"]
            if revision == "HEAD":
                candidates.insert(0, "HEAD")
            for name in candidates:
                try:
                    commit = _peel_commit(repo, repo.references[name].resolve().target)
                except (KeyError, pygit2.GitError, ValueError):
                    continue
                if commit is not None:
                    return str(commit.id)
            if _HEX.match(revision):
                return self.find_commit(revision)
            raise RevisionNotFound(f"unknown revision '{revision}' in {self.url}")

    def find_commit(self, hex_prefix: str) -> str:
        """The commit a full sha or a unique prefix of 7+ hex digits names."""
        commit = None
        if _HEX.match(hex_prefix):
            with self._lock:
                repo = self.repo_unlocked()
                try:
                    # An object-database lookup by (short) id: revparse would try refs first, and a
                    # branch named with hex digits would then stand in for a commit.
                    obj = repo[hex_prefix.lower()]
                    commit = obj if isinstance(obj, pygit2.Commit) else None
                except (KeyError, pygit2.GitError, ValueError):
                    commit = None
        if commit is None:
            raise RevisionNotFound(f"unknown revision '{hex_prefix}' in {self.url}")
        return str(commit.id)

    def commit_time(self, commit_sha: str) -> int:
        with self._lock:
            return self.repo_unlocked()[commit_sha].commit_time

    def walk(self, commit_sha: str) -> list[TreeItem]:
        """Every entry of the commit's tree, parents before children."""
        with self._lock:
            return list(self._walk(self.repo_unlocked(), commit_sha))

    @staticmethod
    def _walk(repo: pygit2.Repository, commit_sha: str) -> Iterator[TreeItem]:
        stack = [("", repo[commit_sha].tree)]
        while stack:
            prefix, tree = stack.pop()
            for entry in tree:
                path = prefix + entry.name
                if entry.filemode == pygit2.enums.FileMode.TREE:
                    yield TreeItem(path, "dir", str(entry.id))
                    stack.append((path + "/", repo[entry.id]))
                elif entry.filemode == MODE_GITLINK:
                    yield TreeItem(path, "dir", None)
                elif entry.filemode == MODE_LINK:
                    yield TreeItem(path, "link", str(entry.id))
                else:
                    yield TreeItem(path, "file", str(entry.id), entry.filemode == MODE_EXEC)

    def read_blob(self, blob_id: str) -> bytes:
        # One libgit2 repository is not safe for concurrent use: FUSE threads take turns.
        with self._lock:
            return self.repo_unlocked()[blob_id].data

    def blob_size(self, blob_id: str) -> int:
        with self._lock:
            return self.repo_unlocked()[blob_id].size

    def object_size(self, object_id: str) -> int:
        """The size of any object, a tree too (what `dvc list` reports for a Git directory)."""
        with self._lock:
            return self.repo_unlocked().odb.read_header(object_id)[1]


class _Credentials(pygit2.RemoteCallbacks):
    """SSH through the user's agent, then their default key files; HTTPS anonymously."""

    def __init__(self):
        super().__init__()
        self._tried: set[str] = set()

    def credentials(self, url, username_from_url, allowed_types):
        user = username_from_url or "git"
        if allowed_types & pygit2.enums.CredentialType.SSH_KEY:
            if "agent" not in self._tried and os.environ.get("SSH_AUTH_SOCK"):
                self._tried.add("agent")
                return pygit2.KeypairFromAgent(user)
            for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
                key = os.path.expanduser(f"~/.ssh/{name}")
                if key not in self._tried and os.path.exists(key):
                    self._tried.add(key)
                    return pygit2.Keypair(user, key + ".pub", key, "")
        raise pygit2.GitError(f"no usable credentials for {url}")


def _peel_commit(repo, oid):
    try:
        obj = repo[oid]
        return obj.peel(pygit2.Commit)
    except (KeyError, ValueError, pygit2.GitError, pygit2.InvalidSpecError):
        return None


def _mirror_name(url: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", url.rstrip("/").rsplit("/", 1)[-1])[:40] or "registry"
    return f"{stem}-{hashlib.sha256(url.encode()).hexdigest()[:16]}.git"


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
