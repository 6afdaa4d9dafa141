"""Pure parsers for DVC metafiles: `.dvc` files, `dvc.yaml` + `dvc.lock`, and `.dir` manifests.

Everything here takes text or bytes and returns small frozen dataclasses; no I/O. Metafiles are
untrusted input: a malformed output is reported in `Parsed.skipped` with its reason and the
other outputs of the file still parse. Paths that would leave the registry's tree, object ids
that are not hex digests, and manifest entries that would leave their directory are rejected here,
so no later layer ever builds a filesystem path from them.
"""

import json
import posixpath
import re
from dataclasses import dataclass, field

import yaml

from regfs.errors import MetafileError

HASH_MD5 = "md5"  # DVC 3: plain md5 of the bytes (`hash: md5` in the output)
HASH_LEGACY = "md5-dos2unix"  # DVC 2: CRLF-normalised md5 of text files (no `hash` field)

_MD5 = re.compile(r"^[0-9a-f]{32}$")
_DIR_MD5 = re.compile(r"^[0-9a-f]{32}\.dir$")


@dataclass(frozen=True)
class ImportSource:
    """Where a `dvc import` output really comes from (its `deps[0].repo`)."""

    url: str
    path: str
    rev: str | None = None
    rev_lock: str | None = None
    remote: str | dict | None = None
    config: dict | None = None


@dataclass(frozen=True)
class Output:
    path: str  # workspace path, POSIX, relative to the registry root, normalised
    object_id: str | None  # md5 hex digest, with `.dir` for a directory
    hash_name: str
    metafile: str
    size: int | None = None
    is_exec: bool = False
    cache: bool = True
    remote: str | None = None
    import_source: ImportSource | None = None

    @property
    def is_dir(self) -> bool:
        return bool(self.object_id and self.object_id.endswith(".dir"))


@dataclass(frozen=True)
class DirEntry:
    relpath: str
    object_id: str
    is_exec: bool = False
    size: int | None = None


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


def parse_pipeline(yaml_text: str | bytes | None, lock_text: str | bytes, lockfile: str) -> Parsed:
    """Outputs of a `dvc.lock` (schema 2.0 or 1.0), joined with its `dvc.yaml` for `wdir` and flags."""
    lock = _load_yaml(lock_text, lockfile)
    stages_spec = {}
    if yaml_text is not None:
        spec = _load_yaml(yaml_text, posixpath.join(posixpath.dirname(lockfile), "dvc.yaml"))
        if isinstance(spec, dict) and isinstance(spec.get("stages"), dict):
            stages_spec = spec["stages"]
    if not isinstance(lock, dict):
        raise MetafileError(f"{lockfile}: expected a mapping at the top level")
    if "schema" in lock:
        if str(lock["schema"]) != "2.0":
            raise MetafileError(f"{lockfile}: unknown dvc.lock schema {lock['schema']!r}")
        stages = lock.get("stages") or {}
    else:
        stages = lock  # dvc.lock 1.0 maps stage names straight to their entries
    if not isinstance(stages, dict):
        raise MetafileError(f"{lockfile}: 'stages' is not a mapping")
    parsed = Parsed()
    base = posixpath.dirname(lockfile)
    for name, stage in stages.items():
        if not isinstance(stage, dict):
            parsed.skipped.append((f"{lockfile}:{name}", "stage entry is not a mapping"))
            continue
        stage_spec = stages_spec.get(str(name).split("@", 1)[0])
        stage_spec = stage_spec if isinstance(stage_spec, dict) else {}
        wdir = stage_spec.get("wdir") or "."
        if not isinstance(wdir, str) or "${" in wdir:
            parsed.skipped.append((f"{lockfile}:{name}", f"unsupported wdir {wdir!r}"))
            continue
        flags = _output_flags(stage_spec)
        outs = stage.get("outs") or []
        if not isinstance(outs, list):
            parsed.skipped.append((f"{lockfile}:{name}", "'outs' is not a list"))
            continue
        for raw in outs:
            _add_output(parsed, raw, lockfile, base, wdir, flags, None)
    return parsed


def parse_dir_manifest(data: bytes, what: str) -> list[DirEntry]:
    """Entries of a `.dir` object; raises MetafileError if any entry is malformed or escapes."""
    try:
        items = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MetafileError(f"{what}: manifest is not valid JSON ({exc})") from exc
    if not isinstance(items, list):
        raise MetafileError(f"{what}: manifest is not a JSON list")
    entries, seen = [], set()
    for item in items:
        if not isinstance(item, dict):
            raise MetafileError(f"{what}: manifest entry is not an object: {item!r:.80}")
        relpath, object_id = item.get("relpath"), item.get("md5")
        if not isinstance(relpath, str) or not is_safe_relpath(relpath):
            raise MetafileError(f"{what}: unsafe relpath {relpath!r:.200} in manifest")
        if not isinstance(object_id, str) or not _MD5.match(object_id):
            raise MetafileError(f"{what}: bad md5 {object_id!r:.80} for {relpath!r}")
        if relpath in seen:
            raise MetafileError(f"{what}: duplicate relpath {relpath!r} in manifest")
        seen.add(relpath)
        size = item.get("size")
        entries.append(DirEntry(relpath, object_id, item.get("isexec") is True,
                                size if isinstance(size, int) and size >= 0 else None))
    _check_no_file_is_a_parent(entries, what)
    return entries


def is_safe_relpath(relpath: str) -> bool:
    """A relative POSIX path with no empty, `.` or `..` component and no NUL."""
    if not relpath or "\0" in relpath or relpath.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in relpath.split("/"))


def _check_no_file_is_a_parent(entries: list[DirEntry], what: str) -> None:
    files = {entry.relpath for entry in entries}
    for entry in entries:
        parent = posixpath.dirname(entry.relpath)
        while parent:
            if parent in files:
                raise MetafileError(f"{what}: {parent!r} is both a file and a directory in manifest")
            parent = posixpath.dirname(parent)


def _load_yaml(text: str | bytes, what: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MetafileError(f"{what}: malformed YAML ({str(exc).splitlines()[0]})") from exc


def _output_flags(stage_spec: dict) -> dict[str, dict]:
    """Per-output flags from `dvc.yaml` (`- path` or `- path: {cache: false, remote: x}`)."""
    flags = {}
    for section in ("outs", "metrics", "plots"):
        items = stage_spec.get(section)
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict):
                for path, options in item.items():
                    flags[posixpath.normpath(str(path))] = options if isinstance(options, dict) else {}
    return flags


def _import_source(deps, base: str, wdir: str) -> ImportSource | None:
    if not isinstance(deps, list) or len(deps) != 1 or not isinstance(deps[0], dict):
        return None
    repo = deps[0].get("repo")
    if not isinstance(repo, dict) or not isinstance(repo.get("url"), str):
        return None
    path = deps[0].get("path")
    if not isinstance(path, str):
        return None
    return ImportSource(url=repo["url"], path=path, rev=_str_or_none(repo.get("rev")),
                        rev_lock=_str_or_none(repo.get("rev_lock")), remote=repo.get("remote"),
                        config=repo.get("config") if isinstance(repo.get("config"), dict) else None)


def _str_or_none(value) -> str | None:
    return str(value) if value is not None else None


def _add_output(parsed, raw, metafile, base, wdir, flags, import_source) -> None:
    try:
        parsed.outputs.append(_output(raw, metafile, base, wdir, flags, import_source))
    except MetafileError as exc:
        what = raw.get("path") if isinstance(raw, dict) else raw
        parsed.skipped.append((f"{metafile}:{what}", str(exc)))


def _output(raw, metafile, base, wdir, flags, import_source) -> Output:
    if not isinstance(raw, dict) or not isinstance(raw.get("path"), str):
        raise MetafileError("output has no 'path'")
    declared = raw["path"]
    if "://" in declared or declared.startswith("/"):
        raise MetafileError(f"external output {declared!r} is not part of the tree")
    if not isinstance(wdir, str):
        raise MetafileError(f"bad wdir {wdir!r}")
    path = posixpath.normpath(posixpath.join(base, wdir, declared))
    if path == "." or path == ".." or path.startswith(("../", "/")) or "\x00" in path:
        raise MetafileError(f"output path {declared!r} leaves the registry")
    if path.split("/")[0] in (".git", ".dvc"):
        raise MetafileError(f"output path {declared!r} is inside .git/ or .dvc/")
    options = {**flags.get(posixpath.normpath(declared), {}), **raw}
    object_id = raw.get("md5")
    if object_id is not None and not (isinstance(object_id, str)
                                      and (_MD5.match(object_id) or _DIR_MD5.match(object_id))):
        raise MetafileError(f"bad md5 {object_id!r:.80}")
    if "hash" in raw and raw["hash"] != HASH_MD5:
        raise MetafileError(f"unknown hash {raw['hash']!r}")
    size = raw.get("size")
    remote = options.get("remote")
    return Output(
        path=path,
        object_id=object_id,
        hash_name=HASH_MD5 if raw.get("hash") == HASH_MD5 else HASH_LEGACY,
        metafile=metafile,
        size=size if isinstance(size, int) and size >= 0 else None,
        is_exec=raw.get("isexec") is True,
        cache=options.get("cache", True) is not False,
        remote=str(remote).lower() if remote else None,
        import_source=import_source,
    )
