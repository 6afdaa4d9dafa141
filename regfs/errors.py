"""The one exception tree of regfs.

Core modules raise these; each knows the errno a filesystem caller should see, so the FUSE
adapter maps them by table and the CLI prints `str(error)` as its one line.
"""

import errno


class RegfsError(Exception):
    """Base of every error regfs reports on purpose."""

    errno = errno.EIO


class UsageError(RegfsError):
    """The user asked for something malformed (bad option, bad mountpoint)."""

    errno = errno.EINVAL


class SourceError(RegfsError):
    """The registry URL cannot be fetched or is not a Git repository."""


class RevisionNotFound(RegfsError):
    """A branch, tag or sha that the registry does not have."""

    errno = errno.ENOENT


class PathNotFound(RegfsError):
    """No such file or directory inside a revision's tree."""

    errno = errno.ENOENT


class NotADirectory(RegfsError):
    errno = errno.ENOTDIR


class IsADirectory(RegfsError):
    errno = errno.EISDIR


class ReadOnly(RegfsError):
    errno = errno.EROFS


class MetafileError(RegfsError):
    """A `.dvc`, `dvc.yaml`, `dvc.lock` or `.dir` manifest that cannot be trusted or parsed."""


class ConfigError(RegfsError):
    """A DVC config (in the commit, the user's, or from the command line) that cannot be used."""


class RemoteError(RegfsError):
    """A remote that cannot be reached or refuses a request."""


class ObjectMissing(RemoteError):
    """An object that is on no remote it should be on."""


class CacheError(RegfsError):
    """The local cache cannot store an object (no space left, quota, permissions)."""


class IntegrityError(RegfsError):
    """Downloaded bytes whose hash is not the one the metafile recorded."""
