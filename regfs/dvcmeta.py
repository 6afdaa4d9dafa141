"""Pure parsers for DVC metafiles: `.dvc` files and `dvc.yaml` + `dvc.lock` (manifests: manifest.py).

Everything here takes text or bytes and returns small frozen dataclasses; no I/O. Metafiles are
untrusted input: a malformed output is reported in `Parsed.skipped` with its reason and the
other outputs of the file still parse. Paths that would leave the registry's tree and object ids
that are not hex digests are rejected here, so no later layer ever builds a filesystem path from them. Whatever the input, a parser returns or
raises `MetafileError`, and what it returns holds plain, bounded values: a YAML alias can make a
few bytes stand for millions of items, so rejected values are only ever shown shortened.
"""

import datetime
import posixpath
import re
import reprlib
from dataclasses import dataclass, field

import yaml

from regfs.dvcyaml import ReadFile, Yaml12Loader, resolve_pipeline
from regfs.errors import MetafileError

HASH_MD5 = "md5"  # DVC 3: plain md5 of the bytes (`hash: md5` in the output)
HASH_LEGACY = "md5-dos2unix"  # DVC 2: CRLF-normalised md5 of text files (no `hash` field)

# Used with fullmatch: `$` would also accept a trailing newline.
_MD5 = re.compile(r"[0-9a-f]{32}")
_DIR_MD5 = re.compile(r"[0-9a-f]{32}\.dir")
MAX_SIZE = 2**63 - 1  # st_size is a signed 64-bit integer: a larger size is no size
# Output paths never lie in these directories: DVC ignores them at any depth (its default
# .dvcignore patterns), and Git refuses a `.git` component anywhere in a tree.
_RESERVED_DIRS = (".git", ".dvc")
# Budget of values walked when checking an import's `remote`/`config` mappings.
_MAX_PLAIN_VALUES = 1000
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 80, 80


@dataclass(frozen=True)
class ImportSource:
    """Where a `dvc import` output really comes from (its `deps[0].repo`)."""

    url: str
    path: str
    rev: str | None = None
    rev_lock: str | None = None
    remote: str | dict | None = None  # a remote name, or options for the source's default remote
    config: dict | str | None = None  # a config level, or the path of a config file


@dataclass(frozen=True)
class CloudEntry:
    """A file of a cloud-versioned directory output, listed in its metafile (`files:`), not in a
    `.dir` object (those are manifest.py's)."""

    relpath: str
    object_id: str
    is_exec: bool = False
    size: int | None = None
    versions: tuple[tuple[str | None, str], ...] = ()  # cloud versioning: (remote or None, version_id)


@dataclass(frozen=True)
class Output:
    path: str  # workspace path, POSIX, relative to the registry root, normalised
    object_id: str | None  # md5 hex digest, with `.dir` for a directory
    hash_name: str
    metafile: str
    size: int | None = None
    is_exec: bool = False
    cache: bool = True
    nfiles: int | None = None  # a directory output's file count, as its metafile says
    remote: str | None = None
    import_source: ImportSource | None = None
    # Cloud versioning (../shared/dvc-format.md section 8): the version ids of a file output, per
    # remote (None: the older flat form names none), and the entries of a directory output.
    versions: tuple[tuple[str | None, str], ...] = ()
    files: tuple[CloudEntry, ...] | None = None

    @property
    def is_dir(self) -> bool:
        return self.files is not None or bool(self.object_id and self.object_id.endswith(".dir"))


@dataclass
class Parsed:
    outputs: list[Output] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (what, why)


def parse_dvc_file(text: str | bytes, metafile: str) -> Parsed:
    """Outputs of one `.dvc` file at `metafile` (its path in the registry)."""
    data = _load_yaml(text, metafile)
    parsed = Parsed()
    if not isinstance(data, dict):
        raise MetafileError(f"{metafile}: expected a mapping at the top level")
    outs = data.get("outs") or []
    if not isinstance(outs, list):
        raise MetafileError(f"{metafile}: 'outs' is not a list")
    wdir = data.get("wdir") or "."
    base = posixpath.dirname(metafile)
    import_source = _import_source(data.get("deps"), base, wdir)
    for raw in outs:
        _add_output(parsed, raw, metafile, base, wdir, {}, import_source)
    return parsed


def parse_pipeline(yaml_text: str | bytes | None, lock_text: str | bytes, lockfile: str,
                   read_file: ReadFile | None = None) -> Parsed:
    """Outputs of the `dvc.yaml` beside `lockfile`, with the hashes its `dvc.lock` (schema 2.0 or
    1.0) records, as DVC loads a pipeline: the stages and their outputs, `wdir` and flags come from
    the `dvc.yaml` (resolved through `read_file`, see dvcyaml), the lock is looked up by stage name
    and declared path. Without a `dvc.yaml` DVC ignores the lock, and so does this."""
    stages = _lock_stages(_load_yaml(lock_text, lockfile), lockfile)
    parsed = Parsed()
    if yaml_text is None:
        return parsed
    yaml_path = posixpath.join(posixpath.dirname(lockfile), "dvc.yaml")
    spec = _load_yaml(yaml_text, yaml_path, Yaml12Loader)
    pipeline = resolve_pipeline(spec, yaml_path, read_file or _no_file)
    parsed.skipped.extend(pipeline.skipped)
    base = posixpath.dirname(lockfile)
    for stage in pipeline.stages:
        entry = stages.get(stage.name)
        locked = entry.get("outs") if isinstance(entry, dict) else None
        by_path = {posixpath.normpath(out["path"]): out for out in locked if _has_path(out)} \
            if isinstance(locked, list) else {}
        for declared in stage.outputs:
            raw = by_path.get(posixpath.normpath(declared.path))
            if raw is None:
                parsed.skipped.append((f"{lockfile}:{stage.name}:{_short(declared.path)}",
                                       "not in dvc.lock (the stage never ran), so there is nothing to pull"))
                continue
            flags = {posixpath.normpath(raw["path"]): declared.flags}
            _add_output(parsed, raw, lockfile, base, stage.wdir, flags, None)
    return parsed


def _lock_stages(lock, lockfile: str) -> dict:
    if not isinstance(lock, dict):
        raise MetafileError(f"{lockfile}: expected a mapping at the top level")
    if "schema" in lock:
        schema = lock["schema"]
        if not (isinstance(schema, (str, float)) and str(schema) == "2.0"):
            raise MetafileError(f"{lockfile}: unknown dvc.lock schema {_short(schema)}")
        stages = lock.get("stages") or {}
    else:
        stages = lock  # dvc.lock 1.0 (DVC 1.x, read by DVC 2): stage names straight at the top
    if not isinstance(stages, dict):
        raise MetafileError(f"{lockfile}: 'stages' is not a mapping")
    return {str(name): stage for name, stage in stages.items()}


def _has_path(out) -> bool:
    return isinstance(out, dict) and isinstance(out.get("path"), str) and bool(out["path"])


def _no_file(_path: str) -> None:
    return None


def _dir_entries(items: list, what: str) -> list[CloudEntry]:
    """Entries of a cloud-versioned output's `files`; `items` is consumed."""
    entries, seen = [], set()
    items.reverse()
    while items:  # popped, so the decoded list and its entries are not all held at once
        item = items.pop()
        check_entry(item, what)
        relpath, object_id = item["relpath"], item["md5"]
        if relpath in seen:
            raise MetafileError(f"{what}: duplicate relpath {relpath!r} in manifest")
        seen.add(relpath)
        entries.append(CloudEntry(relpath, object_id, item.get("isexec") is True, _size(item.get("size")),
                                _versions(item, f"{what}: {relpath!r}")))
    _check_no_file_is_a_parent(seen, what)
    return entries


def check_entry(item, what: str) -> None:
    """Raise MetafileError unless `item` is a manifest entry (a `.dir` object's, or a cloud-versioned
    output's `files`) with a safe relpath and an md5 of 32 lowercase hex digits."""
    if not isinstance(item, dict):
        raise MetafileError(f"{what}: manifest entry is not an object: {_short(item)}")
    relpath, object_id = item.get("relpath"), item.get("md5")
    if not isinstance(relpath, str) or not is_safe_relpath(relpath):
        raise MetafileError(f"{what}: unsafe relpath {_short(relpath)} in manifest")
    if not isinstance(object_id, str) or not _MD5.fullmatch(object_id):
        raise MetafileError(f"{what}: bad md5 {_short(object_id)} for {relpath!r}")


def is_safe_relpath(relpath: str) -> bool:
    """A relative POSIX path with no empty, `.` or `..` component and no NUL, that can be a file
    name (no lone surrogate, which a JSON or YAML `\\ud800` escape can produce)."""
    if not relpath or "\0" in relpath:
        return False
    padded = f"/{relpath}/"  # every component is then between two slashes
    if "//" in padded or "/./" in padded or "/../" in padded:
        return False
    return _is_file_name(relpath)


def _is_file_name(path: str) -> bool:
    try:
        path.encode("utf-8", "surrogateescape")  # os.fsencode on Linux
    except UnicodeEncodeError:
        return False
    return True


def _check_no_file_is_a_parent(files: set[str], what: str) -> None:
    directories: set[str] = set()
    for relpath in files:
        end = relpath.rfind("/")
        while end > 0 and relpath[:end] not in directories:  # an ancestor seen before: so were its own
            directories.add(relpath[:end])
            end = relpath.rfind("/", 0, end)
    both = files & directories
    if both:
        raise MetafileError(f"{what}: {min(both)!r} is both a file and a directory in manifest")


def _load_yaml(text: str | bytes, what: str, loader: type = yaml.SafeLoader):
    try:
        return yaml.load(text, Loader=loader)  # SafeLoader or Yaml12Loader: both safe
    except yaml.YAMLError as exc:
        raise MetafileError(f"{what}: malformed YAML ({_first_line(exc)})") from exc
    except (ValueError, LookupError, AttributeError, TypeError, OverflowError, RecursionError) as exc:
        # PyYAML's constructors let these out for well-formed text naming an impossible value
        # (the date 2001-02-30, an int of more than 4300 digits, `!!bool maybe`, `!!int ''`,
        # `!!timestamp abc`), and its composer recurses once per level of nesting.
        raise MetafileError(f"{what}: unreadable YAML ({type(exc).__name__}: {_first_line(exc)})") from exc


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _short(value) -> str:
    """A repr of untrusted data, shortened without ever formatting all of it."""
    return _SHORT.repr(value)


def _size(value) -> int | None:
    return value if type(value) is int and 0 <= value <= MAX_SIZE else None  # bool is no size


def _import_source(deps, base: str, wdir: str) -> ImportSource | None:
    if not isinstance(deps, list) or len(deps) != 1 or not isinstance(deps[0], dict):
        return None
    repo = deps[0].get("repo")
    if not isinstance(repo, dict) or not isinstance(repo.get("url"), str):
        return None
    path = deps[0].get("path")
    if not isinstance(path, str):
        return None
    remote, config = repo.get("remote"), repo.get("config")
    if not (remote is None or isinstance(remote, str) or (isinstance(remote, dict) and _is_plain(remote))):
        raise MetafileError(f"import of {path!r}: bad remote {_short(remote)}")
    return ImportSource(url=repo["url"], path=path, rev=_revision(repo.get("rev"), path),
                        rev_lock=_revision(repo.get("rev_lock"), path), remote=remote,
                        config=config if isinstance(config, str) or (isinstance(config, dict) and _is_plain(config))
                        else None)


def _revision(value, path: str) -> str | None:
    # YAML 1.1 reads some revisions DVC wrote unquoted as numbers or dates (a tag `2024-01-31`).
    if value is None or isinstance(value, (str, int, float, datetime.date)):
        return None if value is None else str(value)
    raise MetafileError(f"import of {path!r}: bad revision {_short(value)}")


def _is_plain(value) -> bool:
    """Nested mappings and lists of scalars, of at most _MAX_PLAIN_VALUES values in all (as
    DVC's config options are); aliases may repeat a value, and each repetition counts."""
    budget, pending = _MAX_PLAIN_VALUES, [value]
    while pending:
        budget -= 1
        if budget < 0:
            return False
        item = pending.pop()
        if isinstance(item, dict):
            if not all(isinstance(key, (str, int, float, bool)) for key in item):
                return False
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif not (item is None or isinstance(item, (str, int, float, bool))):
            return False
    return True


def _add_output(parsed, raw, metafile, base, wdir, flags, import_source) -> None:
    try:
        parsed.outputs.append(_output(raw, metafile, base, wdir, flags, import_source))
    except MetafileError as exc:
        what = raw.get("path") if isinstance(raw, dict) else raw
        parsed.skipped.append((f"{metafile}:{what if isinstance(what, str) else _short(what)}", str(exc)))


def _output(raw, metafile, base, wdir, flags, import_source) -> Output:
    if not isinstance(raw, dict) or not isinstance(raw.get("path"), str):
        raise MetafileError("output has no 'path'")
    declared = raw["path"]
    if "://" in declared or declared.startswith("/"):
        raise MetafileError(f"external output {declared!r} is not part of the tree")
    if not isinstance(wdir, str):
        raise MetafileError(f"bad wdir {_short(wdir)}")
    if not declared:
        raise MetafileError("output path is empty")
    path = posixpath.normpath(posixpath.join(base, wdir, declared))
    if path == "." or path == ".." or path.startswith(("../", "/")) or "\x00" in path:
        raise MetafileError(f"output path {declared!r} leaves the registry")
    if any(part in _RESERVED_DIRS for part in path.split("/")):
        raise MetafileError(f"output path {declared!r} is inside .git/ or .dvc/")
    if not _is_file_name(path):
        raise MetafileError(f"output path {declared!r} cannot be a file name")
    options = {**flags.get(posixpath.normpath(declared), {}), **raw}
    object_id = raw.get("md5")
    if object_id is not None and not (isinstance(object_id, str)
                                      and (_MD5.fullmatch(object_id) or _DIR_MD5.fullmatch(object_id))):
        raise MetafileError(f"bad md5 {_short(object_id)}")
    if "hash" in raw and raw["hash"] != HASH_MD5:
        raise MetafileError(f"unknown hash {_short(raw['hash'])}")
    remote = options.get("remote")
    if remote is not None and (isinstance(remote, bool) or not isinstance(remote, (str, int, float))):
        raise MetafileError(f"bad remote {_short(remote)}")
    files = raw.get("files")
    if files is not None and not isinstance(files, list):
        raise MetafileError(f"'files' is not a list: {_short(files)}")
    return Output(
        path=path,
        object_id=object_id,
        hash_name=HASH_MD5 if raw.get("hash") == HASH_MD5 else HASH_LEGACY,
        metafile=metafile,
        size=_size(raw.get("size")),
        nfiles=_size(raw.get("nfiles")),
        is_exec=raw.get("isexec") is True,
        cache=options.get("cache", True) is not False,
        remote=str(remote).lower() if remote else None,
        import_source=import_source,
        versions=_versions(raw, "output"),
        files=None if files is None else tuple(_dir_entries(list(files), f"{metafile}: {declared!r} files")),
    )


def _versions(item: dict, what: str) -> tuple[tuple[str | None, str], ...]:
    """The version ids of a cloud-versioned file: `cloud: {REMOTE: {version_id, etag}}`, or
    `version_id` on the entry itself (DVC before 2.43)."""
    cloud = item.get("cloud")
    if cloud is None:
        flat = item.get("version_id")
        return () if flat is None else ((None, _version_id(flat, what)),)
    if not isinstance(cloud, dict):
        raise MetafileError(f"{what}: 'cloud' is not a mapping: {_short(cloud)}")
    versions = []
    for remote, meta in cloud.items():
        version = meta.get("version_id") if isinstance(meta, dict) else None
        if version is not None:
            versions.append((str(remote).lower(), _version_id(version, what)))
    return tuple(versions)


def _version_id(value, what: str) -> str:
    # S3 and Azure version ids are strings; GCS generations are numbers, which YAML may read as ints.
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value) or len(str(value)) > 1024:
        raise MetafileError(f"{what}: bad version_id {_short(value)}")
    return str(value)
