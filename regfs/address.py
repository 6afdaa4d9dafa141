"""Parsing of what a user names on the command line: `URL[@REVISION]`.

An `@` separates the revision, Git-URL style: `https://host/org/reg@v1.0`,
`git@host:org/reg@main`, `/srv/reg@feature/x`, `file:///srv/reg@3f2a9c1`. For remote URLs the
first `@` in the path part starts the revision (a revision may itself contain `/`). A local path
may contain `@` in its directories, so there the split is the last `@` whose left side exists.
"""

import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_SCP_LIKE = re.compile(r"^(?:[^@/:]+@)?[^/:]+:(?!//)")


@dataclass(frozen=True)
class Address:
    url: str
    revision: str | None

    @property
    def is_local(self) -> bool:
        return is_local_url(self.url)

    def __str__(self) -> str:
        return self.url if self.revision is None else f"{self.url}@{self.revision}"

    @property
    def public(self) -> str:
        """For display: without `user:password@` (see `public_url`)."""
        return str(Address(public_url(self.url), self.revision))


def public_url(url: str) -> str:
    """`url` without `user:password@`: what may be shown in logs, errors, stats and xattrs."""
    if "://" not in url:
        return url  # a path, or scp-like `git@host:path`, whose user is no secret
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def is_local_url(url: str) -> bool:
    return url.startswith("file://") or not (_SCHEME.match(url) or _SCP_LIKE.match(url))


def local_path(url: str) -> str:
    """The filesystem path of a local URL (a plain path or `file://`)."""
    path = url.removeprefix("file://")
    return os.path.abspath(os.path.expanduser(path))


def parse_address(text: str) -> Address:
    if not text:
        raise ValueError("empty registry URL")
    if is_local_url(text):
        return _split_local(text)
    scheme = _SCHEME.match(text)
    if scheme:
        host_end = text.find("/", scheme.end())
        path_start = len(text) if host_end < 0 else host_end
    else:
        path_start = _SCP_LIKE.match(text).end()
    at = text.find("@", path_start)
    if at < 0:
        return Address(text, None)
    return _address(text[:at], text[at + 1:])


def _split_local(text: str) -> Address:
    if os.path.exists(local_path(text)) or "@" not in text:
        return Address(text, None)
    positions = [i for i, char in enumerate(text) if char == "@"]
    for at in reversed(positions):
        if os.path.isdir(local_path(text[:at])):
            return _address(text[:at], text[at + 1:])
    last_component = text.rfind("/") + 1
    at = text.find("@", last_component)
    if at < 0:
        return Address(text, None)
    return _address(text[:at], text[at + 1:])


def _address(url: str, revision: str) -> Address:
    if not url:
        raise ValueError("missing registry URL before '@'")
    if not revision:
        raise ValueError(f"empty revision after '@' in {url}@")
    return Address(url, revision)
