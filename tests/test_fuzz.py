"""Property tests of the pure parsers and the hasher, fed hostile input by hypothesis.

Metafiles, `.dir` manifests, DVC configs and `URL@REV` addresses come from registries and users
regfs does not control. Whatever they hold, a parser either returns or raises regfs's own error
(`RegfsError`; `ValueError` for an address), never anything else, and what it accepts is safe to
build a filesystem path from: normalised, relative, inside the tree, an md5 digest for an object
id, unique manifest entries. Messages about rejected input stay short even when the input is a
YAML alias bomb. No mounts here; the acceptance tests cover what the mount then shows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import posixpath
import re
import signal
import tracemalloc

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from regfs.address import parse_address
from regfs.dvcconfig import Config, RemoteSpec, parse_config, parse_override
from regfs.dvcmeta import (
    HASH_LEGACY,
    HASH_MD5,
    Output,
    Parsed,
    is_safe_relpath,
    parse_dvc_file,
    parse_pipeline,
)
from regfs.errors import ConfigError, RegfsError
from regfs.hashing import CHUNK, StreamHasher, is_text
from regfs.manifest import DirEntry, parse_manifest

# Modest counts (the suite shares 2 cores with CI); no example database in the work tree.
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

OBJECT_ID = re.compile(r"[0-9a-f]{32}(\.dir)?")
MD5 = "d41d8cd98f00b204e9800998ecf8427e"
DIR_MD5 = "0123456789abcdef0123456789abcdef.dir"
MAX_SIZE = 2**63 - 1  # st_size is a signed 64-bit integer
# A rejection message names what it rejects, shortened: never the whole of a hostile value.
MAX_MESSAGE = 2000
BOMB_MEMORY = 2_000_000  # bytes; formatting a 10**6-scalar alias bomb takes over 5 MB


# -- hostile values ----------------------------------------------------------------------------

PATH_PARTS = ["a", "b", "data", "é t", "", ".", "..", ".git", ".dvc", ".hg", "x\x00y", "~", "-",
              "a\nb", " ", "\\", "C:", "..a", "...", "\ud800", "\udcff", "*", "@", "${x}"]
path_strings = st.one_of(
    st.lists(st.sampled_from(PATH_PARTS), min_size=0, max_size=5).map("/".join),
    st.lists(st.sampled_from(PATH_PARTS), min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts)),
    st.sampled_from(["s3://bucket/x", "http://host/x", "file:///etc", "remote://store/x", "//x", "./a",
                     "a/./b", "a//b", "a/", "../" * 40 + "etc/passwd", "a/" * 300 + "x"]),
    st.text(max_size=30),
)
md5_strings = st.one_of(
    st.sampled_from([MD5, DIR_MD5, MD5.upper(), MD5[:-1], MD5 + "0", MD5 + "\n", DIR_MD5 + "\n",
                     MD5 + ".dir.dir", MD5 + ".DIR", MD5 + "/..", "../../etc/passwd", ".dir", "",
                     "\n" + MD5, MD5 + "\x00", " " + MD5, MD5 + ".dir/../x", "ab/cdef"]),
    st.text(alphabet="0123456789abcdefABCDEF./\n", max_size=40),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=10**30, max_value=10**40),
                    st.floats(), st.text(max_size=20), st.binary(max_size=8))


junk = st.one_of(scalars, st.lists(scalars, max_size=3),
                 st.dictionaries(st.text(max_size=5), scalars, max_size=3))


def mostly(sane: st.SearchStrategy, hostile_values: st.SearchStrategy) -> st.SearchStrategy:
    """`sane` four times in five, else `hostile_values` or a value of the wrong type: each field
    of a document is attacked alone often enough for the rest to be accepted and checked."""
    bad = st.one_of(hostile_values, junk)
    return st.integers(0, 4).flatmap(lambda pick: bad if pick == 0 else sane)  # one_of would dedupe `sane`


safe_parts = st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="/\x00"),
                     min_size=1, max_size=8).filter(lambda part: part not in (".", "..", ".git", ".dvc"))
safe_paths = st.lists(safe_parts, min_size=1, max_size=4).map("/".join)
object_ids = st.sampled_from([MD5, DIR_MD5, "0" * 32, "f" * 32 + ".dir"])

outputs = mostly(
    st.fixed_dictionaries(
        {"path": mostly(safe_paths, path_strings)},
        optional={
            "md5": mostly(object_ids, md5_strings),
            "hash": mostly(st.just("md5"), st.sampled_from(["md5-dos2unix", "sha256", "", "MD5"])),
            "size": mostly(st.integers(0, MAX_SIZE), st.integers(min_value=-2, max_value=2**70)),
            "nfiles": mostly(st.integers(0, 100), st.integers()),
            "isexec": mostly(st.booleans(), st.sampled_from(["true", "yes", 1])),
            "cache": mostly(st.booleans(), st.sampled_from(["false", 0])),
            "push": mostly(st.booleans(), st.just("no")),
            "remote": mostly(st.sampled_from(["store", "Other"]), st.sampled_from(["", "a/b", "x" * 2000])),
            "etag": scalars,
        },
    ),
    st.lists(scalars, max_size=2),
)
wdirs = mostly(st.one_of(st.just("."), safe_paths), st.one_of(path_strings, st.just("${item}")))
import_deps = st.lists(
    st.fixed_dictionaries(
        {"path": mostly(safe_paths, path_strings)},
        optional={"repo": mostly(st.fixed_dictionaries(
            {"url": mostly(st.sampled_from(["../other", "https://host/r"]), st.just(""))},
            optional={"rev": mostly(st.text(max_size=10), st.dates()),
                      "rev_lock": mostly(st.just("a" * 40), st.integers()),
                      "remote": mostly(st.sampled_from(["store", {"url": "/tmp/x", "region": None}]),
                                       st.just({"url": {"nested": [1, {"a": 2}]}})),
                      "config": mostly(st.just({"core": {"remote": "x"}}), st.just({"core": [1, 2]}))}),
            st.just({}))},
    ),
    max_size=2,
)
dvc_documents = st.fixed_dictionaries(
    {"outs": mostly(st.lists(outputs, max_size=5), st.just([]))},
    optional={"wdir": wdirs, "deps": import_deps, "md5": mostly(object_ids, md5_strings),
              "frozen": scalars, "meta": scalars},
)
metafile_dirs = st.lists(st.sampled_from(["a", "b", "sub dir", "é"]), max_size=3).map("/".join)


def metafile_path(directory: str, name: str) -> str:
    return posixpath.join(directory, name) if directory else name


# Text that PyYAML parses into something other than plain data, or fails on in its constructors.
YAML_SNIPPETS = [
    "2001-02-30", "!!timestamp 2001-13-45", "2001-12-14t21:59:43.10+99:00", "!!int 0x", "!!int abc",
    "1" * 5000, "!!float x", "!!binary '%%%'", "!!binary '////'", "!!python/object:os.system ls",
    "!!set {a: 1}", "!!omap [a]", "!!str [a]", "&a [*a]", "*undefined", "{[a]: 1}", "{<<: 5}",
    "[" * 300 + "]" * 300, "{a: " * 200 + "1" + "}" * 200, "!!null x", "!!bool maybe", ".nan", "-.inf",
    "!<tag:yaml.org,2002:int> 12", "? [a]\n: b", "'unterminated", "\t- tab", "\x00", "\ufeffouts: []",
    "!!timestamp abc", "!!float ''", "!!int _", "!!int 0o9", "!!timestamp 2001-01-01 99:99:99", "!!bool [a]",
]
yaml_snippet = st.sampled_from(YAML_SNIPPETS)


@st.composite
def yaml_texts(draw, documents: st.SearchStrategy) -> str | bytes:
    """A dumped document, or one with a hostile snippet spliced in, or arbitrary text/bytes."""
    kind = draw(st.sampled_from(["dump", "splice", "value", "text", "bytes"]))
    if kind in ("dump", "splice"):
        text = yaml.safe_dump(draw(documents), allow_unicode=draw(st.booleans()))
        if kind == "splice":
            lines = text.splitlines()
            index = draw(st.integers(0, len(lines)))
            lines.insert(index, draw(st.sampled_from(["", "  ", "- "])) + draw(yaml_snippet))
            text = "\n".join(lines)
        return text
    if kind == "value":
        key = draw(st.sampled_from(["md5", "path", "size", "wdir", "hash", "remote", "outs"]))
        return f"outs:\n- path: data\n  {key}: {draw(yaml_snippet)}\nwdir: {draw(yaml_snippet)}\n"
    if kind == "text":
        return draw(st.text(max_size=200))
    return draw(st.binary(max_size=200))


# -- what every accepted result satisfies ------------------------------------------------------


def parsed_or_error(parse, *args):
    """The parser's result, or None if it raised a RegfsError. Any other exception fails the test."""
    try:
        return parse(*args)
    except RegfsError as error:
        assert 0 < len(str(error)) <= MAX_MESSAGE, f"error message of {len(str(error))} chars"
        return None


def assert_safe_tree_path(path) -> None:
    assert isinstance(path, str), repr(path)
    assert path and path != "." and path == posixpath.normpath(path), f"not normalised: {path!r}"
    assert not path.startswith("/"), f"absolute: {path!r}"
    assert "\x00" not in path, f"NUL in {path!r}"
    parts = path.split("/")
    assert ".." not in parts, f"leaves the tree: {path!r}"
    assert ".git" not in parts and ".dvc" not in parts, f"inside .git/ or .dvc/: {path!r}"
    os.fsencode(path)  # it can be a file name (no lone surrogate)


def assert_size(size) -> None:
    assert size is None or (type(size) is int and 0 <= size <= MAX_SIZE), repr(size)


def assert_sane_parsed(parsed: Parsed, metafile: str) -> None:
    assert isinstance(parsed, Parsed)
    for output in parsed.outputs:
        assert isinstance(output, Output)
        assert_safe_tree_path(output.path)
        assert output.object_id is None or OBJECT_ID.fullmatch(output.object_id), repr(output.object_id)
        assert output.hash_name in (HASH_MD5, HASH_LEGACY)
        assert output.metafile == metafile
        assert_size(output.size)
        assert type(output.is_exec) is bool and type(output.cache) is bool
        assert output.remote is None or isinstance(output.remote, str)
        source = output.import_source
        if source is not None:
            assert isinstance(source.url, str) and isinstance(source.path, str)
            for value in (source.rev, source.rev_lock):
                assert value is None or (isinstance(value, str) and len(value) < 1000), repr(value)[:100]
            assert len(repr(source)) < 10_000, "import source holds a huge value"
    for what, why in parsed.skipped:
        assert isinstance(what, str) and isinstance(why, str)
        assert len(what) <= MAX_MESSAGE and len(why) <= MAX_MESSAGE, (what[:200], why[:200])


# -- .dvc files and dvc.lock -------------------------------------------------------------------


@FUZZ
@given(text=yaml_texts(dvc_documents), directory=metafile_dirs)
def test_dvc_files_parse_safely_or_raise_metafile_errors(text, directory):
    metafile = metafile_path(directory, "data.dvc")
    parsed = parsed_or_error(parse_dvc_file, text, metafile)
    if parsed is not None:
        assert_sane_parsed(parsed, metafile)


@FUZZ
@given(document=dvc_documents, directory=metafile_dirs)
def test_dvc_documents_parse_safely(document, directory):
    """Structured documents reach deeper than text: every field of every output is hostile."""
    metafile = metafile_path(directory, "x.dvc")
    parsed = parsed_or_error(parse_dvc_file, yaml.safe_dump(document), metafile)
    if parsed is not None:
        assert_sane_parsed(parsed, metafile)


spec_flags = st.fixed_dictionaries({}, optional={
    "cache": mostly(st.booleans(), st.just("false")),
    "remote": mostly(st.sampled_from(["store", "Other"]), st.just("")),
    "push": st.booleans()})
spec_outputs = mostly(st.one_of(safe_paths, st.dictionaries(safe_paths, spec_flags, min_size=1, max_size=1)),
                      st.one_of(path_strings, st.dictionaries(path_strings, junk, max_size=1)))
stage_names = st.one_of(  # mapping keys: hashable
    st.sampled_from(["train", "prep@1", "prep@a/b"]), st.sampled_from(["s@", "@", "", "a.b"]),
    st.none(), st.integers(), st.booleans(), st.floats(allow_nan=False))
spec_stages = st.fixed_dictionaries({}, optional={
    "wdir": wdirs, "cmd": scalars,
    "outs": mostly(st.lists(spec_outputs, max_size=3), junk),
    "metrics": mostly(st.lists(spec_outputs, max_size=2), junk),
    "plots": mostly(st.lists(spec_outputs, max_size=2), junk)})
spec_documents = st.fixed_dictionaries(
    {"stages": mostly(st.dictionaries(stage_names, spec_stages, max_size=3), junk)})
lock_stages = st.dictionaries(stage_names, mostly(st.fixed_dictionaries(
    {"outs": mostly(st.lists(outputs, max_size=4), junk)}, optional={"cmd": scalars, "deps": scalars}), junk),
    min_size=1, max_size=3)
lock_documents = mostly(
    st.one_of(
        st.fixed_dictionaries({
            "schema": mostly(st.sampled_from(["2.0", 2.0]), st.sampled_from(["1.0", "3.0", 2])),
            "stages": mostly(lock_stages, junk)}),
        lock_stages,  # dvc.lock 1.0: stage names at the top level
    ),
    scalars,
)


@FUZZ
@given(lock=yaml_texts(lock_documents), spec=st.one_of(st.none(), yaml_texts(spec_documents)),
       directory=metafile_dirs)
def test_pipelines_parse_safely_or_raise_metafile_errors(lock, spec, directory):
    lockfile = metafile_path(directory, "dvc.lock")
    parsed = parsed_or_error(parse_pipeline, spec, lock, lockfile)
    if parsed is not None:
        assert_sane_parsed(parsed, lockfile)


@FUZZ
@given(lock=lock_documents, spec=spec_documents, directory=metafile_dirs)
def test_pipeline_documents_parse_safely(lock, spec, directory):
    lockfile = metafile_path(directory, "dvc.lock")
    parsed = parsed_or_error(parse_pipeline, yaml.safe_dump(spec), yaml.safe_dump(lock), lockfile)
    if parsed is not None:
        assert_sane_parsed(parsed, lockfile)


@FUZZ
@given(path=safe_paths, wdir=st.one_of(st.just("."), safe_paths), directory=metafile_dirs,
       object_id=st.sampled_from([MD5, DIR_MD5]), size=st.integers(0, MAX_SIZE))
def test_sane_outputs_are_kept_at_their_workspace_path(path, wdir, directory, object_id, size):
    """The other half of the contract: rejecting everything would satisfy the properties above."""
    document = {"wdir": wdir, "outs": [{"path": path, "md5": object_id, "size": size, "hash": "md5"}]}
    parsed = parse_dvc_file(yaml.safe_dump(document), metafile_path(directory, "x.dvc"))
    assert parsed.skipped == []
    [output] = parsed.outputs
    assert output.path == posixpath.normpath(posixpath.join(directory, wdir, path))
    assert (output.object_id, output.size, output.hash_name) == (object_id, size, HASH_MD5)


def alias_bomb(levels: int = 6) -> str:
    """A small YAML text whose alias `*bomb` is a list of 10**levels scalars (PyYAML builds
    each level once and shares it: formatting it is what costs, 10x more per level)."""
    lines = ["l1: &l1 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(2, levels + 1):
        name = "bomb" if level == levels else f"l{level}"
        lines.append(f"l{level}: &{name} [" + ", ".join([f"*l{level - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


IMPORT = "deps:\n- path: a\n  repo: {{url: ../r, {}}}\nouts:\n- path: a\n"
BOMBED_DVC_FILES = {
    "an output": "outs: [*bomb]\n",
    "md5": "outs:\n- path: a\n  md5: *bomb\n",
    "path": "outs:\n- path: *bomb\n",
    "hash": "outs:\n- path: a\n  hash: *bomb\n",
    "remote": "outs:\n- path: a\n  remote: *bomb\n",
    "size": "outs:\n- path: a\n  size: *bomb\n",
    "wdir": "wdir: *bomb\nouts:\n- path: a\n",
    "import rev": IMPORT.format("rev: *bomb"),
    "import rev_lock": IMPORT.format("rev_lock: *bomb"),
    "import remote": IMPORT.format("remote: {url: /x, opt: *bomb}"),
    "import config": IMPORT.format("config: {core: *bomb}"),
}


def parse_bomb(parse, *args):
    """Parse under tracemalloc: formatting the bomb's million scalars, even to cut the text
    short afterwards, allocates several MB; parsing the few hundred bytes takes far less."""
    tracemalloc.start()
    try:
        parsed = parsed_or_error(parse, *args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < BOMB_MEMORY, f"parsing took {peak} bytes: the alias bomb was expanded"
    return parsed


def test_alias_bombs_in_dvc_files_are_never_expanded():
    """A million-scalar value from a few hundred bytes never ends up in a message or an output,
    and is never formatted whole (that takes the daemon's memory and time, 10x per level)."""
    for what, text in BOMBED_DVC_FILES.items():
        try:
            parsed = parse_bomb(parse_dvc_file, alias_bomb() + text, "bomb.dvc")
            if parsed is not None:
                assert_sane_parsed(parsed, "bomb.dvc")
        except AssertionError as error:
            raise AssertionError(f"alias bomb in {what}: {str(error)[:300]}") from None


LOCK_OF_A = "schema: '2.0'\nstages:\n  s: {outs: [{path: a}]}\n"


def test_alias_bombs_in_pipelines_are_never_expanded():
    bomb = alias_bomb()
    cases = {
        "schema": (None, bomb + "schema: *bomb\n"),
        "a stage": (None, bomb + "schema: '2.0'\nstages:\n  s: *bomb\n"),
        "stage outs": (None, bomb + "schema: '2.0'\nstages:\n  s: {outs: *bomb}\n"),
        "an output": (None, bomb + "schema: '2.0'\nstages:\n  s: {outs: [*bomb]}\n"),
        "wdir": (bomb + "stages:\n  s: {wdir: *bomb}\n", LOCK_OF_A),
        "flags": (bomb + "stages:\n  s: {outs: [{a: {remote: *bomb}}]}\n", LOCK_OF_A),
    }
    for what, (spec, lock) in cases.items():
        try:
            parsed = parse_bomb(parse_pipeline, spec, lock, "dvc.lock")
            if parsed is not None:
                assert_sane_parsed(parsed, "dvc.lock")
        except AssertionError as error:
            raise AssertionError(f"alias bomb in {what}: {str(error)[:300]}") from None


@pytest.mark.parametrize("case", ["[" * 600 + "]" * 600, "{a: " * 3000 + "1" + "}" * 3000])
def test_deeply_nested_yaml_is_a_metafile_error(case):
    for text in (case, "outs: " + case):
        parsed = parsed_or_error(parse_dvc_file, text, "deep.dvc")
        assert parsed is None or parsed.outputs == []
        parsed = parsed_or_error(parse_pipeline, text, text, "dvc.lock")
        assert parsed is None or parsed.outputs == []


# -- .dir manifests ----------------------------------------------------------------------------

entry_fields = {"size": mostly(st.integers(0, MAX_SIZE), st.integers(min_value=-1, max_value=2**70)),
                "isexec": mostly(st.booleans(), scalars), "nfiles": scalars}
sane_entries = st.fixed_dictionaries(
    {"md5": st.sampled_from([MD5, "0" * 32, "f" * 32]), "relpath": safe_paths}, optional=entry_fields)
hostile_entries = st.one_of(
    st.fixed_dictionaries(
        {"md5": mostly(object_ids, md5_strings), "relpath": mostly(safe_paths, path_strings)},
        optional=entry_fields),
    st.fixed_dictionaries({}, optional={"md5": scalars, "relpath": scalars}),
    scalars,
)
manifests = mostly(
    st.one_of(
        st.lists(sane_entries, max_size=8),  # accepted unless relpaths collide
        st.lists(mostly(sane_entries, hostile_entries), max_size=8),
    ),
    hostile_entries,
)


@st.composite
def manifest_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["json", "json", "json", "json", "duplicates", "splice", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    value = draw(manifests)
    if kind == "duplicates" and isinstance(value, list) and value:
        value = value + [draw(st.sampled_from(value))]
    text = json.dumps(value, ensure_ascii=draw(st.booleans()), allow_nan=True,
                      default=lambda data: data.decode("latin-1"))  # JSON has no bytes: shown as text
    if kind == "splice":
        index = draw(st.integers(0, len(text)))
        text = text[:index] + draw(st.sampled_from(["[" * 5000, "\\ud800", "\x00", "NaN", "1" * 5000,
                                                    '"', ",", "]", "}"])) + text[index:]
    return text.encode("utf-8", "surrogatepass")


def assert_sane_manifest(manifest) -> None:
    entries = list(manifest)
    seen = set()
    for entry in entries:
        assert isinstance(entry, DirEntry)
        assert isinstance(entry.relpath, str) and is_safe_relpath(entry.relpath), repr(entry.relpath)
        assert posixpath.normpath(entry.relpath) == entry.relpath
        os.fsencode(entry.relpath)
        assert entry.relpath not in seen, f"duplicate {entry.relpath!r}"
        seen.add(entry.relpath)
        assert OBJECT_ID.fullmatch(entry.object_id) and not entry.object_id.endswith(".dir"), \
            repr(entry.object_id)
        assert type(entry.is_exec) is bool
        assert_size(entry.size)
    for relpath in seen:  # no entry is both a file and a directory
        parent = posixpath.dirname(relpath)
        while parent:
            assert parent not in seen, f"{parent!r} is a file and a directory"
            parent = posixpath.dirname(parent)


@FUZZ
@given(data=manifest_bytes())
def test_manifests_parse_safely_or_raise_metafile_errors(data):
    manifest = parsed_or_error(parse_manifest, data, "manifest")
    if manifest is not None:
        assert_sane_manifest(manifest)


@FUZZ
@given(relpaths=st.lists(safe_paths, min_size=1, max_size=6, unique=True))
def test_sane_manifests_are_kept_whole(relpaths):
    assume(not any(other.startswith(path + "/") for path in relpaths for other in relpaths))
    data = json.dumps([{"md5": MD5, "relpath": path} for path in sorted(relpaths)]).encode()
    assert [entry.relpath for entry in parse_manifest(data, "m")] == sorted(relpaths, key=os.fsencode)


@FUZZ
@given(relpath=safe_paths, hostile_relpath=path_strings)
def test_a_duplicate_or_unsafe_relpath_fails_the_whole_manifest(relpath, hostile_relpath):
    for second in (relpath, hostile_relpath):
        data = json.dumps([{"md5": MD5, "relpath": relpath}, {"md5": MD5, "relpath": second}],
                          ensure_ascii=False).encode("utf-8", "surrogatepass")
        entries = parsed_or_error(parse_manifest, data, "m")
        if second == relpath or not is_safe_relpath(second):
            assert entries is None, f"accepted {second!r}"


def test_a_million_entry_manifest_parses():
    """Big directory outputs exist (ImageNet-sized); parsing one is linear, with no blow-up, and
    its entries stay packed: tens of bytes each, not the hundreds of a dict per entry."""
    count = 1_000_000
    data = json.dumps([{"md5": f"{number:032x}", "relpath": f"d{number % 1000:03d}/{number:07d}.jpg"}
                       for number in sorted(range(count), key=lambda number: (number % 1000, number))]).encode()
    manifest = parse_manifest(data, "big manifest")
    assert len(manifest) == count
    assert (manifest.entry(0).relpath, manifest.entry(count - 1).relpath) == ("d000/0000000.jpg", "d999/0999999.jpg")
    assert manifest.entry(123_456).object_id == f"{456_123:032x}"  # the 457th entry of d123/
    assert manifest.nbytes < 64 * count  # its 17 bytes of relpath, 16 of md5, a size, a bound, a bit


# -- DVC config --------------------------------------------------------------------------------

config_lines = st.one_of(
    st.sampled_from(["[core]", "[ core ]", "['remote \"store\"']", "[remote \"Other\"]", "['remote \"\"']",
                     "[remote 'x]", "[cache]", "[", "]", "[]", "['']", "[remote \"a\"] # c", "# comment",
                     "; comment", "", "   ", "remote = store", "remote = Other", "url = ../store",
                     "url = /abs/store", "url = remote://store/sub", "url = remote://other",
                     "url = remote://missing/x", "url = s3://bucket/x", "url = a, b", "url = 'quoted'",
                     "url = \"a, b\"", "url = file:///x", "url = ~/x", "url =", "= x", "noequals",
                     "credentialpath = ../creds", "keyfile = ~/k", "url = x # inline", "url = x\x00y",
                     "URL = /Upper", "remote = \udcff"]),
    st.builds(lambda key, value: f"{key} = {value}", st.sampled_from(["url", "remote", "endpointurl", "x"]),
              st.text(max_size=20)),
    st.text(max_size=30),
)
config_texts = st.lists(config_lines, max_size=12).map("\n".join)


@FUZZ
@given(text=config_texts, base_dir=st.sampled_from([None, "/reg/.dvc", "relative/.dvc"]),
       remote_name=st.sampled_from([None, "store", "other", "STORE", "", "missing", "a"]))
def test_configs_parse_and_resolve_or_raise_config_errors(text, base_dir, remote_name):
    config = parsed_or_error(parse_config, text, base_dir)
    if config is None:
        return
    assert isinstance(config, Config)
    assert all(name == name.lower() for name in config.remotes)
    if base_dir is not None:
        for options in config.remotes.values():
            url = options.get("url")
            if isinstance(url, str) and "://" not in url and base_dir.startswith("/"):
                assert os.path.isabs(url), url
    for name in [remote_name, *config.remotes]:
        spec = parsed_or_error(config.remote, name)
        if spec is not None:
            assert isinstance(spec, RemoteSpec) and isinstance(spec.url, str)
            assert not spec.url.startswith(("remote://", "file://")), spec.url


LONG_CONFIG_LINES = {
    "spaces in a section": "[" + " " * 100_000 + "x",
    "tabs, bracket, spaces": "[" + "\t" * 50_000 + "]" + " " * 50_000 + "x",
    "quotes in a section": "['" + " '" * 50_000,
    "brackets in a comment": "[core] #" + " ]" * 50_000,
    "spaces in a value": "[core]\nremote = a" + " " * 100_000 + "b",
}


def test_long_config_lines_are_read_in_one_pass():
    """A committed `.dvc/config` is untrusted: a regular expression that backtracks over a long
    line (the old section pattern: a minute for 4,000 spaces, cubic beyond) would hang the tree.
    The alarm only turns such a hang into a failure; these lines take milliseconds."""
    def hung(*_args):
        raise TimeoutError("parse_config did not return within 60 s: a backtracking pattern?")

    previous = signal.signal(signal.SIGALRM, hung)
    try:
        for what, text in LONG_CONFIG_LINES.items():
            signal.alarm(60)
            try:
                config = parsed_or_error(parse_config, text)
            finally:
                signal.alarm(0)
            assert config is None or isinstance(config, Config), what
    finally:
        signal.signal(signal.SIGALRM, previous)


@FUZZ
@given(text=st.text(max_size=40))
def test_remote_config_overrides_parse_or_raise_config_errors(text):
    try:
        name, key, _value = parse_override(text)
    except ConfigError:
        return
    assert name and key and name == name.lower() and key == key.lower()


# -- addresses ---------------------------------------------------------------------------------


@FUZZ
@given(text=st.one_of(st.text(max_size=60), st.sampled_from(["@", "@@", "a@", "@a", "https://@", "git@h:",
                                                              "git@h:@", "file://@", "/@/@", "x:@y"])))
def test_addresses_parse_into_their_own_text_or_raise_value_error(text):
    try:
        address = parse_address(text)
    except ValueError:
        return
    assert address.url and (address.revision is None or address.revision)
    assert str(address) == text


revisions = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=30)
hosts = st.sampled_from(["github.com", "host", "10.0.0.1:8080", "[::1]"])
repo_paths = st.lists(st.sampled_from(["org", "reg", "a.git", "x y", "~u"]), min_size=1, max_size=3) \
    .map("/".join)


@FUZZ
@given(scheme=st.sampled_from(["https", "http", "ssh", "git+ssh", "s3"]),
       user=st.sampled_from(["", "git@", "u:p@"]), host=hosts, path=repo_paths,
       revision=st.one_of(st.none(), revisions))
def test_remote_urls_split_at_the_first_at_sign_after_the_host(scheme, user, host, path, revision):
    url = f"{scheme}://{user}{host}/{path}"
    text = url if revision is None else f"{url}@{revision}"
    assert (parse_address(text).url, parse_address(text).revision) == (url, revision)


@FUZZ
@given(user=st.sampled_from(["", "git@", "deploy@"]), host=st.sampled_from(["github.com", "host"]),
       path=repo_paths, revision=st.one_of(st.none(), revisions))
def test_scp_like_urls_keep_their_user(user, host, path, revision):
    url = f"{user}{host}:{path}"
    text = url if revision is None else f"{url}@{revision}"
    address = parse_address(text)
    assert (address.url, address.revision) == (url, revision)
    assert not address.is_local


# -- hashing -----------------------------------------------------------------------------------

hash_bytes = st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b"a", b"text ", b"\x00", b"\xff", b"\x01",
                                       b"\t", b"\xe9t\xe9"]), max_size=400).map(b"".join)


def reference_hash(data: bytes, hash_name: str) -> str:
    """DVC 2.x `file_md5`, written out plainly: 1 MiB reads, CRLF normalised inside each."""
    if hash_name == HASH_MD5 or not is_text(data[:512]):
        return hashlib.md5(data).hexdigest()
    md5 = hashlib.md5()
    for start in range(0, len(data), CHUNK):
        md5.update(data[start:start + CHUNK].replace(b"\r\n", b"\n"))
    return md5.hexdigest()


def hash_in_pieces(data: bytes, cuts: list[int], hash_name: str) -> str:
    hasher = StreamHasher(hash_name)
    bounds = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    for start, end in itertools.pairwise(bounds):
        hasher.update(data[start:end])  # empty pieces included
    return hasher.hexdigest()


@FUZZ
@given(data=st.one_of(hash_bytes, st.binary(max_size=2000)), cuts=st.lists(st.integers(0, 10**6), max_size=8),
       hash_name=st.sampled_from([HASH_MD5, HASH_LEGACY]))
def test_any_chunking_hashes_like_one_piece(data, cuts, hash_name):
    whole = StreamHasher(hash_name)
    whole.update(data)
    digest = whole.hexdigest()
    assert hash_in_pieces(data, cuts, hash_name) == digest
    assert digest == reference_hash(data, hash_name)
    if hash_name == HASH_MD5:
        assert digest == hashlib.md5(data).hexdigest()


@FEW
@given(shift=st.integers(-3, 3), tail=hash_bytes, cuts=st.lists(st.integers(0, 3 * CHUNK), max_size=6),
       chunks=st.sampled_from([1, 2]), hash_name=st.sampled_from([HASH_MD5, HASH_LEGACY]))
def test_chunking_across_the_one_mib_boundary(shift, tail, cuts, chunks, hash_name):
    """A CRLF at, before or after a 1 MiB boundary (shift 0: split by it), where DVC 2
    normalises each read separately, fed in pieces that do not line up with the boundaries."""
    head = (b"ab\r\n" * (chunks * CHUNK // 4 + 1))[:chunks * CHUNK - 1 + shift]
    data = head + b"\r\n" + tail
    assert hash_in_pieces(data, cuts, hash_name) == reference_hash(data, hash_name)
    if hash_name == HASH_LEGACY and shift == 0:  # the split CRLF stays: one more byte than a replace
        assert reference_hash(data, hash_name) != hashlib.md5(data.replace(b"\r\n", b"\n")).hexdigest()
