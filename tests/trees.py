"""Snapshots of directory trees, their comparison, and DVC's object layout on disk.

`snapshot(root)` reads a tree the way a test sees it through a mount or in a pulled workspace:
`{relpath: ("file", is_executable, bytes) | ("dir",) | ("link", target)}`, not following symlinks,
without `.git/` and `.dvc/` at the top. `assert_same_tree` fails with a readable diff.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

# What a snapshot maps each relative path to.
#   ("file", is_executable, content_bytes) | ("dir",) | ("link", target)
Entry = tuple
Snapshot = dict[str, Entry]


def object_path(base: Path, object_id: str, *, legacy: bool = False) -> Path:
    """Where DVC keeps an object under a cache or local remote directory."""
    prefix = base if legacy else base / "files" / "md5"
    return prefix / object_id[:2] / object_id[2:]


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# -- snapshots ---------------------------------------------------------------------------------


def snapshot(root: Path | str, *, skip: Iterable[str] = ()) -> Snapshot:
    """Walk `root` without following symlinks (except `root` itself) and read every file.

    `.git` and `.dvc` at the top are left out, as are the subtrees named in `skip`.
    """
    skipped = set(skip)
    result: Snapshot = {}

    def walk(directory: str, prefix: str) -> None:
        with os.scandir(directory) as iterator:
            entries = sorted(iterator, key=lambda entry: entry.name)
        for entry in entries:
            if not prefix and entry.name in (".git", ".dvc"):
                continue
            relpath = prefix + entry.name
            if relpath in skipped:
                continue
            if entry.is_symlink():
                result[relpath] = ("link", os.readlink(entry.path))
            elif entry.is_dir(follow_symlinks=False):
                result[relpath] = ("dir",)
                walk(entry.path, relpath + "/")
            else:
                mode = entry.stat(follow_symlinks=False).st_mode
                with open(entry.path, "rb") as handle:
                    data = handle.read()
                result[relpath] = ("file", bool(mode & stat.S_IXUSR), data)

    walk(os.fspath(root), "")
    return result


@dataclass(frozen=True)
class StatEntry:
    kind: str  # "file", "dir" or "link"
    mode: int  # permission bits only
    size: int


def stat_tree(root: Path | str) -> dict[str, StatEntry]:
    """`ls -lR` of a tree: lstat of every entry and readlink of links, reading no file."""
    result: dict[str, StatEntry] = {}

    def walk(directory: str, prefix: str) -> None:
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            status = os.lstat(path)
            relpath = prefix + name
            if stat.S_ISLNK(status.st_mode):
                os.readlink(path)
                kind = "link"
            elif stat.S_ISDIR(status.st_mode):
                kind = "dir"
            elif stat.S_ISREG(status.st_mode):
                kind = "file"
            else:
                kind = f"other:{stat.S_IFMT(status.st_mode):o}"
            result[relpath] = StatEntry(kind, stat.S_IMODE(status.st_mode), status.st_size)
            if kind == "dir":
                walk(path, relpath + "/")

    walk(os.fspath(root), "")
    return result


def describe(entry: Entry | None) -> str:
    if entry is None:
        return "absent"
    if entry[0] == "file":
        data = entry[2]
        shown = repr(data[:40]) + ("..." if len(data) > 40 else "")
        return f"file exec={entry[1]} size={len(data)} md5={md5_hex(data)} {shown}"
    if entry[0] == "link":
        return f"symlink -> {entry[1]!r}"
    return "directory"


def tree_diff(actual: Snapshot, expected: Snapshot, limit: int = 40) -> list[str]:
    """Human-readable differences, empty when the trees are equal."""
    lines = []
    for relpath in sorted(set(actual) | set(expected)):
        mine, theirs = actual.get(relpath), expected.get(relpath)
        if mine == theirs:
            continue
        if mine is None:
            lines.append(f"missing from mount: {relpath!r} (expected {describe(theirs)})")
        elif theirs is None:
            lines.append(f"extra in mount:     {relpath!r} ({describe(mine)})")
        else:
            lines.append(f"different:          {relpath!r}\n    mount:    {describe(mine)}\n"
                         f"    expected: {describe(theirs)}")
    if len(lines) > limit:
        lines = [*lines[:limit], f"... and {len(lines) - limit} more differences"]
    return lines


def assert_same_tree(actual: Snapshot, expected: Snapshot, what: str) -> None:
    differences = tree_diff(actual, expected)
    if differences:
        pytest.fail(f"{what}: the mount differs from the DVC oracle\n" + "\n".join(differences),
                    pytrace=False)


def without(tree: Snapshot, *prefixes: str) -> Snapshot:
    """`tree` minus the given paths and everything below them."""
    return {
        relpath: entry
        for relpath, entry in tree.items()
        if not any(relpath == prefix or relpath.startswith(prefix + "/") for prefix in prefixes)
    }


# -- caches and remotes -----------------------------------------------------------------------


_OBJECT_PATH = re.compile(r"^(files/md5/)?([0-9a-f]{2})/([0-9a-f]{30})(\.dir)?$")


def cache_objects(cache_dir: Path, *, manifests: bool = False) -> set[str]:
    """Object paths (relative, e.g. `files/md5/ab/cdef...`) found under a cache directory in DVC's
    layout; `.dir` manifests only with `manifests`. Other files (regfs's own state, locks) are
    not objects and are ignored."""
    found = set()
    if not cache_dir.exists():
        return found
    for dirpath, _dirnames, filenames in os.walk(cache_dir):
        for name in filenames:
            relpath = os.path.relpath(os.path.join(dirpath, name), cache_dir)
            match = _OBJECT_PATH.match(relpath)
            if match and (manifests or not match[4]):
                found.add(relpath)
    return found


def mentions_object(text: str, object_id: str) -> bool:
    """Whether a log line names an object, by id or by its layout path (`ab/cdef...`)."""
    return object_id in text or f"{object_id[:2]}/{object_id[2:]}" in text


EMPTY_OBJECTS = {"files/md5/d4/1d8cd98f00b204e9800998ecf8427e", "d4/1d8cd98f00b204e9800998ecf8427e"}


def missing_from_cache(cache_dir: Path, dvc_workspace: Path) -> set[str]:
    """Objects (manifests included) that `dvc pull` left in `dvc_workspace/.dvc/cache` and that
    are not at the same place under `cache_dir`. The empty object is not required: a reader may
    serve an empty file without storing it."""
    wanted = cache_objects(dvc_workspace / ".dvc" / "cache", manifests=True) - EMPTY_OBJECTS
    return wanted - cache_objects(cache_dir, manifests=True)
