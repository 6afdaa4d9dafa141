"""Pure-layer tests: metafile and manifest parsing, tree listings, hashing, config and address parsing.

These take literals (style.md: pure parsers are tested with plain data); the end-to-end tests
compare whole mounts with what the real DVC produces.
"""

import errno
import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from regfs import manifest as manifest_module
from regfs.address import parse_address
from regfs.backends import _environment_has_http_settings
from regfs.dvcconfig import Config, parse_config, parse_override
from regfs.dvcmeta import HASH_LEGACY, HASH_MD5, parse_dvc_file, parse_pipeline
from regfs.errors import ConfigError, MetafileError, RemoteError
from regfs.git import _server_timeout_ms
from regfs.hashing import CHUNK, StreamHasher, is_text
from regfs.manifest import DirEntry, parse_manifest
from regfs.readahead import ReadAhead
from regfs.tree import BlobNode, DirNode, LinkNode


def test_dvc_file_outputs_are_joined_with_wdir_and_flags():
    text = """
wdir: ../w
outs:
- md5: d41d8cd98f00b204e9800998ecf8427e
  size: 0
  hash: md5
  path: a/b.txt
  isexec: true
  remote: Other
- md5: 0123456789abcdef0123456789abcdef.dir
  path: legacy_dir
"""
    parsed = parse_dvc_file(text, "x/y/data.dvc")
    first, second = parsed.outputs
    assert (first.path, first.hash_name, first.is_exec, first.remote, first.size) == \
        ("x/w/a/b.txt", HASH_MD5, True, "other", 0)
    assert (second.path, second.hash_name, second.is_dir) == ("x/w/legacy_dir", HASH_LEGACY, True)


@pytest.mark.parametrize("path", ["../../outside", "/etc/passwd", "s3://bucket/x", ".dvc/cache", "."])
def test_outputs_leaving_the_tree_are_skipped_with_a_reason(path):
    parsed = parse_dvc_file(f"outs:\n- md5: d41d8cd98f00b204e9800998ecf8427e\n  path: '{path}'\n", "a.dvc")
    assert parsed.outputs == []
    assert len(parsed.skipped) == 1


@pytest.mark.parametrize("md5", ["../../etc", "abc", "d41d8cd98f00b204e9800998ecf8427e/../x"])
def test_object_ids_that_are_not_digests_are_rejected(md5):
    parsed = parse_dvc_file(f"outs:\n- md5: '{md5}'\n  path: x\n", "a.dvc")
    assert parsed.outputs == [] and parsed.skipped


@pytest.mark.parametrize("text", ["outs: [", "- just\n- a list", "outs: 3"])
def test_malformed_dvc_files_raise(text):
    with pytest.raises(MetafileError):
        parse_dvc_file(text, "bad.dvc")


def test_import_source_is_read_from_deps():
    text = """
deps:
- path: data/x
  repo:
    url: https://example.com/reg
    rev_lock: abcdef0
outs:
- md5: d41d8cd98f00b204e9800998ecf8427e
  path: x
"""
    (output,) = parse_dvc_file(text, "x.dvc").outputs
    assert output.import_source.url == "https://example.com/reg"
    assert output.import_source.path == "data/x"
    assert output.import_source.rev_lock == "abcdef0"


def test_lock_outputs_use_the_stage_wdir_and_dvc_yaml_flags():
    spec = """
stages:
  train:
    wdir: sub
    cmd: x
    outs:
    - model.bin
    - metrics.json:
        cache: false
    - big:
        remote: Cold
"""
    lock = """
schema: '2.0'
stages:
  train:
    cmd: x
    outs:
    - path: model.bin
      md5: d41d8cd98f00b204e9800998ecf8427e
      hash: md5
    - path: metrics.json
      md5: d41d8cd98f00b204e9800998ecf8427e
      hash: md5
    - path: big
      md5: 0123456789abcdef0123456789abcdef.dir
      hash: md5
"""
    outputs = {o.path: o for o in parse_pipeline(spec, lock, "p/dvc.lock").outputs}
    assert set(outputs) == {"p/sub/model.bin", "p/sub/metrics.json", "p/sub/big"}
    assert outputs["p/sub/metrics.json"].cache is False
    assert outputs["p/sub/big"].remote == "cold"


def test_lock_schema_1_and_unknown_schemas():
    lock_v1 = "build:\n  cmd: x\n  outs:\n  - path: out\n    md5: d41d8cd98f00b204e9800998ecf8427e\n"
    spec = "stages:\n  build:\n    cmd: x\n    outs: [out]\n"
    assert [o.path for o in parse_pipeline(spec, lock_v1, "dvc.lock").outputs] == ["out"]
    assert parse_pipeline(None, lock_v1, "dvc.lock").outputs == []  # no dvc.yaml: DVC ignores the lock
    with pytest.raises(MetafileError):
        parse_pipeline(None, "schema: '9.0'\nstages: {}\n", "dvc.lock")


def test_manifest_entries_and_optional_fields():
    data = json.dumps([{"md5": "d41d8cd98f00b204e9800998ecf8427e", "relpath": "a/b c.txt", "size": 0,
                        "isexec": True}]).encode()
    (entry,) = parse_manifest(data, "m")
    assert (entry.relpath, entry.is_exec, entry.size) == ("a/b c.txt", True, 0)


@pytest.mark.parametrize("relpath", ["../x", "/abs", "a//b", "a/./b", "a/", "", "a\0b", "a/../../b"])
def test_hostile_manifest_relpaths_are_rejected(relpath):
    data = json.dumps([{"md5": "d41d8cd98f00b204e9800998ecf8427e", "relpath": relpath}]).encode()
    with pytest.raises(MetafileError):
        parse_manifest(data, "m")


@pytest.mark.parametrize("data", [b"{", b"{}", b'[{"relpath": "a"}]', b'["a"]',
                                  (b'[{"md5": "d41d8cd98f00b204e9800998ecf8427e", "relpath": "a"},'
                                  b' {"md5": "d41d8cd98f00b204e9800998ecf8427e", "relpath": "a/b"}]')])
def test_malformed_manifests_are_rejected(data):
    with pytest.raises(MetafileError):
        parse_manifest(data, "m")



def manifest_of(relpaths: list[str], **fields) -> bytes:
    return json.dumps([{"md5": f"{number:032x}", "relpath": relpath, **fields.get(relpath, {})}
                       for number, relpath in enumerate(relpaths)]).encode()


def test_manifest_directories_are_ranges_in_byte_order():
    """Entries sort by relpath bytes, so a directory's entries are contiguous and come between the
    names that sort before and after `name/` (`a b/` < `a!` < `a-b/` < `a/` < `a0`)."""
    relpaths = ["é/ü", "a0", "a/y/z", "a/x", "a-b/x", "a!", "a b/y", "b"]  # not in order: sorted here
    manifest = parse_manifest(manifest_of(relpaths, **{"a!": {"size": 5, "isexec": True}, "b": {"size": True}}),
                              "m")
    assert [entry.relpath for entry in manifest] == sorted(relpaths, key=str.encode)
    root = manifest.root()
    rows = list(root.rows())
    assert rows == [("a b", "dir", 0, False), ("a!", "file", 5, True), ("a-b", "dir", 0, False),
                    ("a", "dir", 0, False), ("a0", "file", None, False), ("b", "file", None, False),
                    ("é", "dir", 0, False)]
    assert all(list(root.rows(start)) == rows[start:] for start in range(len(rows) + 1))
    assert len(root) == 7 and list(root.names()) == [row[0] for row in rows]
    directory = root.lookup("a")
    assert list(directory.rows()) == [("x", "file", None, False), ("y", "dir", 0, False)]
    assert list(directory.lookup("y").rows()) == [("z", "file", None, False)]
    index = root.lookup("a!")
    assert manifest.entry(index) == DirEntry("a!", f"{relpaths.index('a!'):032x}", True, 5)
    for missing in ["a/x", "", "c", "a!!", "\udcff", "\ud800", "é/ü"]:
        assert root.lookup(missing) is None, missing
    assert directory.lookup("x/") is None and directory.lookup("z") is None


def test_manifest_key_search_is_a_bisection_of_the_keys():
    """`_Keys.search` (a bisection of a sample of the keys, then of a stride) finds what a plain
    bisection does, for every key present, keys between and around them, and any bounds."""
    import random
    from bisect import bisect_left

    rng = random.Random(7)
    for count in (0, 1, 31, 32, 33, 64, 200):
        relpaths = sorted({f"{rng.choice('abc')}/{rng.randrange(10_000):04}" for _ in range(count)})
        keys = parse_manifest(manifest_of(relpaths), "m").keys
        probes = [key for relpath in relpaths for key in (relpath.encode(), relpath.encode() + b"0",
                                                           relpath.encode()[:-1])]
        probes += [b"", b"a", b"a/", b"a0", b"b/5", b"c0", b"zz"]
        for key in probes:
            low = rng.randrange(len(keys) + 1)
            for bounds in ((0, len(keys)), (low, rng.randrange(low, len(keys) + 1))):
                assert keys.search(key, *bounds) == bisect_left(keys, key, *bounds), (count, key, bounds)


def test_a_packed_manifest_loads_as_parsed_and_only_whole_safe_and_its_own():
    """`Manifest.packed_record` / `load_packed`: the same entries as the parse (names that are not
    UTF-8, sizes known or not, exec bits, nested directories, none at all); a record damaged,
    truncated or of another manifest is refused, and so is one whose digest matches but whose
    content a parse would refuse (made here by packing a Manifest built with bad content)."""
    from array import array

    from regfs.manifest import Manifest, load_packed

    relpaths = ["a/b/c", "a/d", "x\udcff.bin", "é", "z"]
    fields = {"a/d": {"size": 5, "isexec": True}, "z": {"size": 0}}
    for text in (manifest_of(relpaths, **fields), b"[]"):
        parsed = parse_manifest(text, "m")
        loaded = load_packed(parsed.packed_record("files/md5/ab/c.dir"), "files/md5/ab/c.dir", "m")
        assert list(loaded) == list(parsed) and list(loaded.root().rows()) == list(parsed.root().rows())
    record = parse_manifest(manifest_of(relpaths, **fields), "m").packed_record("files/md5/ab/c.dir")
    flipped = bytearray(record)
    flipped[len(record) // 2] ^= 1
    for bad, reason in [(bytes(flipped), "digest"), (record[:-1], "digest"), (b"junk", "not a packed"),
                        (record, "another manifest")]:
        with pytest.raises(ValueError, match=reason):
            load_packed(bad, "files/md5/ab/c.dir" if reason != "another manifest" else "files/md5/ab/d.dir", "m")

    def packed(names: list[bytes], sizes: list[int]) -> bytes:
        paths = b"".join(name + b"\0" for name in names)
        bounds = array("Q", [0])
        for name in names:
            bounds.append(bounds[-1] + len(name) + 1)
        return Manifest(paths, bounds, bytes(16 * len(names)), array("q", sizes), bytes(len(names))) \
            .packed_record("i")

    for names, sizes, reason in [([b"a", b"../etc"], [1, 1], "unsafe"), ([b"a", b"a/b"], [1, 1], "both a file"),
                                 ([b"b", b"b"], [1, 1], "duplicate"), ([b"a"], [-2], "out of range"),
                                 ([b"a/"], [1], "unsafe")]:
        with pytest.raises(ValueError, match=reason):
            load_packed(packed(names, sizes), "i", "m")
    assert [entry.relpath for entry in load_packed(packed([b"b", b"a"], [1, 2]), "i", "m")] == ["a", "b"]


def test_manifest_sizes_are_filled_in_batches():
    relpaths = [f"d/{number}" for number in range(7)]
    manifest = parse_manifest(manifest_of(relpaths, **{"d/1": {"size": 11}}), "m")
    asked = []

    def sizes_of(object_ids):
        asked.append(object_ids)
        return {object_id: int(object_id, 16) * 100 for object_id in object_ids if object_id[-1] != "3"}

    manifest.fill_sizes(sizes_of, batch=3)
    assert asked == [[f"{number:032x}" for number in (0, 2)], [f"{number:032x}" for number in (3, 4, 5)],
                     [f"{6:032x}"]]
    assert [entry.size for entry in manifest] == [0, 11, 200, None, 400, 500, 600]


@pytest.mark.parametrize("relpaths", [["a", "b", "a"], ["a", "a"], ["b", "a", "a"], ["a/b", "a"], ["a", "a/b/c"],
                                      ["a", "a!", "a/b"], ["x/a", "x/a/b", "y"]])
def test_manifest_duplicates_and_files_that_are_directories_fail(relpaths):
    with pytest.raises(MetafileError, match="duplicate relpath|both a file and a directory"):
        parse_manifest(manifest_of(relpaths), "m")


def test_manifest_parses_the_same_in_any_chunks(monkeypatch):
    """The manifest is read a chunk at a time and each chunk parsed up to its last `},`: whatever
    the cut (inside a string, a nested value, between items), the result is the whole text's."""
    items = [{"md5": f"{number:032x}", "relpath": f"d{number % 3}/}},{{{number}\"]", "x": [{"y": "},"}]}
             for number in range(40)]
    data = json.dumps(items, indent=1).encode()
    whole = [(entry.relpath, entry.object_id) for entry in parse_manifest(data, "m")]
    assert len(whole) == 40
    for chunk in (1, 7, 64):
        monkeypatch.setattr(manifest_module, "_CHUNK", chunk)
        assert [(entry.relpath, entry.object_id) for entry in parse_manifest(data, "m")] == whole
        for broken in (data[:-1] + b",]", data[:-1], data + b"x", b"[" + data[1:].replace(b"{", b"[", 1)):
            with pytest.raises(MetafileError, match="not valid JSON"):
                parse_manifest(broken, "m")

def _hash(data: bytes, hash_name: str, step: int = 7919) -> str:
    hasher = StreamHasher(hash_name)
    for start in range(0, len(data), step):
        hasher.update(data[start:start + step])
    return hasher.hexdigest()


def test_md5_is_plain_md5():
    data = b"a\r\nb\r\n" * 1000
    assert _hash(data, HASH_MD5) == hashlib.md5(data).hexdigest()


def test_legacy_hash_normalises_crlf_in_text_only():
    text = b"a\r\nb\r\n"
    assert _hash(text, HASH_LEGACY) == hashlib.md5(b"a\nb\n").hexdigest()
    binary = b"\0\r\n" * 10
    assert _hash(binary, HASH_LEGACY) == hashlib.md5(binary).hexdigest()
    assert _hash(b"", HASH_LEGACY) == hashlib.md5(b"").hexdigest()


def test_legacy_hash_keeps_a_crlf_split_by_the_chunk_boundary():
    data = b"x" * (CHUNK - 1) + b"\r\n" + b"y\r\n"
    expected = hashlib.md5(b"x" * (CHUNK - 1) + b"\r" + b"\n" + b"y\n").hexdigest()
    assert _hash(data, HASH_LEGACY, step=4096) == expected


def test_text_detection_follows_dvc2():
    assert is_text(b"plain text\n")
    assert not is_text(b"has a \0 byte")
    assert not is_text(bytes(range(128, 256)) * 2)


def test_config_sections_quotes_lists_comments_and_relative_urls():
    text = """
[core]
    remote = MyStore  # the default
['remote "MyStore"']
    url = ../../store
    ENDPOINTURL = "http://127.0.0.1:9000"
[remote "s3"]
    url = s3://bucket/path
    tags = a, b
"""
    config = parse_config(text, "/srv/reg/.dvc")
    spec = config.remote(None)
    assert (spec.name, spec.url, spec.options["endpointurl"]) == ("mystore", "/srv/store", "http://127.0.0.1:9000")
    assert config.remote("S3").url == "s3://bucket/path"
    assert config.remotes["s3"]["tags"] == ["a", "b"]


def test_config_levels_merge_and_remote_urls():
    base = parse_config("[core]\nremote = a\n['remote \"a\"']\nurl = s3://x\nregion = eu\n")
    top = Config(remotes={"a": {"region": "us"}, "b": {"url": "remote://a/sub"}})
    merged = base.merged(top)
    assert merged.remote("a").options["region"] == "us"
    assert merged.remote("b").url == "s3://x/sub"
    with pytest.raises(ConfigError):
        merged.remote("missing")
    with pytest.raises(ConfigError):
        Config().remote(None)
    assert parse_override("Store.endpointurl=http://h:1") == ("store", "endpointurl", "http://h:1")


def test_relative_remote_of_a_non_local_registry_is_an_error():
    with pytest.raises(ConfigError):
        parse_config("['remote \"a\"']\nurl = ../store\n").remote("a")


@pytest.mark.parametrize("text, url, revision", [
    ("https://github.com/org/reg", "https://github.com/org/reg", None),
    ("https://github.com/org/reg@v1.0", "https://github.com/org/reg", "v1.0"),
    ("https://github.com/org/reg.git@feature/x", "https://github.com/org/reg.git", "feature/x"),
    ("git@github.com:org/reg@main", "git@github.com:org/reg", "main"),
    ("git@github.com:org/reg", "git@github.com:org/reg", None),
    ("ssh://git@host/org/reg@3f2a9c1", "ssh://git@host/org/reg", "3f2a9c1"),
    ("file:///srv/no-such-reg@v2", "file:///srv/no-such-reg", "v2"),
])
def test_addresses(text, url, revision):
    address = parse_address(text)
    assert (address.url, address.revision) == (url, revision)


def test_local_address_with_at_in_directories(tmp_path):
    registry = tmp_path / "me@corp" / "reg"
    registry.mkdir(parents=True)
    assert parse_address(str(registry)).revision is None
    address = parse_address(f"{registry}@feature/x")
    assert (address.url, address.revision) == (str(registry), "feature/x")


def test_listings_read_nothing():
    """A listing gives what is known without I/O: a Git file's size once something stat'ed it."""
    sized = []
    blob = BlobNode(lambda blob_id: b"abc", lambda blob_id: sized.append(blob_id) or 3, "b1", False)
    root = DirNode({"f": blob, "d": DirNode(), "l": LinkNode("xy")})
    assert list(root.listing()) == [("d", "dir", 0, False), ("f", "file", None, False), ("l", "link", 2, False)]
    assert sized == [] and blob.size == 3
    assert list(root.listing(1)) == [("f", "file", 3, False), ("l", "link", 2, False)] and sized == ["b1"]


@pytest.mark.parametrize("text, expected", [(None, 30_000), ("", 30_000), ("3", 3_000), ("2.5", 2_500),
                                            ("abc", 30_000), ("0", 30_000), ("-4", 30_000), ("1e12", 30_000)])
def test_git_timeout_from_the_environment(text, expected, caplog):
    """$REGFS_GIT_TIMEOUT: seconds above 0; anything else is said and ignored, never a crash."""
    assert _server_timeout_ms(text) == expected
    assert ("ignoring REGFS_GIT_TIMEOUT" in caplog.text) == (text not in (None, "", "3", "2.5"))


class _Entries:
    """Entries of a directory output, for ReadAhead: what it asks to fetch is recorded."""

    def __init__(self, count: int, size: int = 1000):
        self.count, self.entry_size, self.fetched = count, size, []
        self.done = threading.Semaphore(0)

    def __len__(self) -> int:
        return self.count

    def size(self, index: int) -> int:
        return self.entry_size

    def fetch_ahead(self, index: int) -> None:
        self.fetched.append(index)
        self.done.release()


def _fetched_ahead(readahead: ReadAhead, entries: _Entries, opens: list[tuple[int, bool]]) -> list[int]:
    for index, cached in opens:
        readahead.opened(entries, index, cached)
    expected = sum(1 for _ in iter(lambda: entries.done.acquire(timeout=0.5), False))
    assert expected == len(entries.fetched)
    return sorted(entries.fetched)


def test_read_ahead_windows():
    """In order and cold: 4 ahead after the 2nd file, then 8, 16, ... up to the cap in files and
    WINDOW_BYTES; cached files in order fetch nothing ahead until a cold one comes; backwards or
    strided, nothing; 0 files: off."""
    from regfs.readahead import WINDOW_BYTES

    assert _fetched_ahead(ReadAhead(64), _Entries(100), [(0, False), (1, False)]) == [2, 3, 4, 5]
    assert _fetched_ahead(ReadAhead(64), _Entries(100), [(0, False), (1, False), (2, False)]) == list(range(2, 11))
    assert _fetched_ahead(ReadAhead(6), _Entries(100), [(i, False) for i in range(6)]) == list(range(2, 12))
    big = _Entries(100, size=WINDOW_BYTES // 3)
    assert _fetched_ahead(ReadAhead(64), big, [(i, False) for i in range(5)]) == [2, 3, 4, 5, 6, 7]
    assert _fetched_ahead(ReadAhead(64), _Entries(100), [(i, True) for i in range(10)]) == []
    # Cached files in order count their steps: the first cold one after them gets the full window.
    assert _fetched_ahead(ReadAhead(64), _Entries(100), [(i, i < 5) for i in range(7)]) == list(range(6, 71))
    assert _fetched_ahead(ReadAhead(64), _Entries(100), [(9 - i, False) for i in range(10)]) == []
    assert _fetched_ahead(ReadAhead(64), _Entries(100), [(i * 9, False) for i in range(10)]) == []
    assert _fetched_ahead(ReadAhead(0), _Entries(100), [(i, False) for i in range(10)]) == []


@pytest.mark.parametrize("unknown", [0, 0.05])
def test_read_ahead_window_grows_by_the_sizes_it_has_not_seen(unknown):
    """The window of a reader in order is what it would be if summed anew at each open (entries
    after the one opened, within the files allowed and WINDOW_BYTES, up to one of unknown size),
    while sizes are asked for about twice per entry (as the window grows over it, as the reader
    passes it) and once per open (where the window stopped), not for the whole window at each open."""
    import random

    from regfs.readahead import GAP, START, WINDOW_BYTES

    rng = random.Random(7)
    sizes = [None if rng.random() < unknown else WINDOW_BYTES // rng.randint(2, 200) for _ in range(3000)]
    asked: list[int] = []

    class Sized(_Entries):
        def size(self, index: int) -> int | None:
            asked.append(index)
            return sizes[index]

        def fetch_ahead(self, index: int) -> None:
            pass

    readahead, entries = ReadAhead(64), Sized(len(sizes))
    index, ahead, steps = 0, 0, 0
    readahead.opened(entries, index)
    while index < len(sizes) - GAP:
        index, steps = index + rng.randint(1, 3), steps + 1
        readahead.opened(entries, index)
        files, end, budget = min(64, START << min(steps - 1, 16)), index + 1, WINDOW_BYTES
        while end < min(len(sizes), index + 1 + files) and sizes[end] is not None and sizes[end] <= budget:
            budget, end = budget - sizes[end], end + 1
        ahead = end - 1 if end - 1 > max(ahead, index) else ahead  # handed to the workers
        assert readahead._runs[entries].ahead == ahead, index
    assert len(asked) <= 2 * len(sizes) + steps + 1, (len(asked), steps)


def test_http_sessions_trust_the_environment_only_where_it_has_settings(monkeypatch, tmp_path):
    """aiohttp's trust_env (proxy variables, ~/.netrc) costs every request a netrc lookup in a
    thread: HTTP sessions turn it on only when there is a proxy variable or a netrc file."""
    for name in [name for name in os.environ if name.lower().endswith("_proxy")] + ["NETRC"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not _environment_has_http_settings()
    (tmp_path / ".netrc").write_text("machine example.org login user password secret\n")
    assert _environment_has_http_settings()
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("NETRC", str(tmp_path / "elsewhere"))
    assert not _environment_has_http_settings()
    (tmp_path / "elsewhere").write_text("default login user password secret\n")
    assert _environment_has_http_settings()
    monkeypatch.delenv("NETRC")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    assert _environment_has_http_settings()


def test_the_fd_table_closes_the_oldest_idle_descriptors_beyond_its_cap():
    """Past `max_open`, the oldest descriptors nobody reads are closed (their objects released),
    no more than the excess; one in use stays, however old."""
    from regfs.cache import ObjectRef
    from regfs.files import OpenFiles, _Descriptor

    class Cache:
        def __init__(self):
            self.released = []

        def release(self, ref) -> None:
            self.released.append(ref)

    files, cache = OpenFiles(max_open=2), Cache()
    refs = [ObjectRef(f"{number:032x}", "md5") for number in range(5)]
    descriptors = [_Descriptor(os.open(os.devnull, os.O_RDONLY), cache, ref) for ref in refs]
    descriptors[0].users = 1  # the oldest, being read
    try:
        for ref, descriptor in zip(refs, descriptors):
            files._open[ref] = descriptor
        files._trim()
        assert list(files._open) == [refs[0], refs[4]]
        assert cache.released == refs[1:4]
        assert [descriptor.dropped for descriptor in descriptors] == [False, True, True, True, False]
    finally:
        files.close_all()
        descriptors[0].users = 0
        descriptors[0].close()


@pytest.mark.parametrize("command", ["umount", "unmount"])
def test_umount_and_its_alias_refuse_a_path_that_is_not_mounted(command, tmp_path, capsys):
    """`regfs unmount X` is the umount command, not a mount of a source named "unmount" at X (the
    mount.fuse3 form `regfs SOURCE MOUNTPOINT` takes any other first word as a source)."""
    from regfs.cli import main

    assert main([command, str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == f"regfs: error: {tmp_path} is not mounted"


def test_object_locks_exclude_threads_and_spare_other_objects(tmp_path):
    """`ObjectCache.locked`: one holder per object (a thread of this process counts as another
    holder), other objects free; a temporary file is stale only while no one holds its object."""
    from regfs.cache import ObjectCache, ObjectRef

    cache = ObjectCache(str(tmp_path))
    ref, other = ObjectRef("a" * 32, "md5"), ObjectRef("b" * 32, "md5")
    stale, busy = (os.path.join(cache.tmp_dir, f"{ref.object_id}~x{n}") for n in (1, 2))
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with cache.locked(ref) as locked:
            assert locked
            taken.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert taken.wait(30)
        with cache.locked(ref, wait=False) as locked:
            assert not locked
        with cache.locked(other, wait=False) as locked:
            assert locked
        open(busy, "w").close()
        assert cache.remove_stale_downloads() == 0 and os.path.exists(busy)
    finally:
        release.set()
        holder.join()
    open(stale, "w").close()
    assert cache.remove_stale_downloads() == 2 and os.listdir(cache.tmp_dir) == []
    with cache.locked(ref, wait=False) as locked:
        assert locked



def test_concurrent_readdir_replies_never_share_a_stat_structure():
    """The listing loop reuses stat structures, setting each entry's size before the filler call
    that reads it. Replies filled at once (libfuse threads; the filler runs without the GIL) must
    each have their own: here the filler yields to the other threads before it reads the size,
    as a C filler copying the structure at that moment would see another thread's write."""
    from regfs.fuse import Operations

    rows = [(f"f{index:03d}", "file", 1000 + index, False) for index in range(300)]

    class View:
        stats = None

        def entries(self, path, start):
            return iter(rows[start:]), 1_700_000_000

    operations = Operations(View())
    wrong: list[tuple] = []

    def list_once(_):
        def filler(buf, name, status, offset, flags):
            time.sleep(0)  # other threads run here
            if flags and status.st_size != 1000 + int(name[1:]):
                wrong.append((name, status.st_size))
            return 0

        for _ in range(3):
            operations.readdir("/list", 0, None, filler, True)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(list_once, range(8)))
    assert not wrong, wrong[:5]


def test_writers_of_one_process_never_wait_on_sqlite(tmp_path, monkeypatch, caplog):
    """Threads recording downloads at once take turns in Python: none meets sqlite's write lock
    (which makes a second writer sleep 1 ms and more). With sqlite told to wait for nothing, a
    writer that met the lock would fail, and the index would log a warning."""
    from regfs import cacheindex
    from regfs.cache import ObjectRef

    connect = cacheindex.sqlite3.connect
    monkeypatch.setattr(cacheindex.sqlite3, "connect",
                        lambda path, timeout, **kwargs: connect(path, timeout=0, **kwargs))
    sizes = cacheindex.SizeIndex(str(tmp_path / "sizes.sqlite"))
    usage = cacheindex.UsageIndex(str(tmp_path / "usage.sqlite"))
    refs = [ObjectRef(f"{index:032x}", "md5") for index in range(160)]

    def record(start: int) -> None:
        for ref in refs[start::8]:
            sizes.put_installed(ref, 1000 + start, (1, 2, 3))
            usage.set_origin(ref.relpath, f"remote {start}")
            usage.flush()

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(record, range(8)))
    assert not [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(sizes.get_many(refs)) == len(refs)
    assert len(usage.origins()) == len(refs)


def test_a_small_download_is_recorded_in_memory_until_the_flush(tmp_path):
    """What a download records is found at once by its own process; by others (another index on
    the same file) once flushed, at once for a large object (which they would hash again)."""
    from regfs.cache import ObjectRef
    from regfs.cacheindex import WRITE_AT_ONCE, SizeIndex

    mine, other = (SizeIndex(str(tmp_path / "sizes.sqlite")) for _ in range(2))
    small, large = ObjectRef("a" * 32, "md5"), ObjectRef("b" * 32, "md5")
    mine.put_installed(small, 10, (1, 2, 3))
    assert (mine.get_many([small, large]), mine.verified(small.relpath)) == ({small: 10}, (1, 2, 3))
    assert (other.get_many([small]), other.verified(small.relpath)) == ({}, None)
    mine.mark_verified(small.relpath, (4, 5, 6))  # found again intact, with a new signature
    mine.put_installed(large, WRITE_AT_ONCE, (7, 8, 9))
    assert (other.get_many([large]), other.verified(large.relpath)) == ({large: WRITE_AT_ONCE}, (7, 8, 9))
    mine.flush()
    assert (other.get_many([small]), other.verified(small.relpath)) == ({small: 10}, (4, 5, 6))
    mine.forget([small.relpath])
    assert (mine.get_many([small]), mine.verified(small.relpath)) == ({}, None)


def test_sizes_asked_one_by_one_stop_at_the_first_refusal():
    """`Remote.sizes` asks objects one by one in batches, on a few threads: every size that exists
    comes back, a missing object is left out, and once one request is refused (not retried) the
    batches still running stop, instead of asking for the rest of thousands of objects."""
    from regfs import backends
    from regfs.dvcconfig import RemoteSpec
    from regfs.remotes import Remote, RequestSlots, RetryPolicy

    class Sizes(backends.Backend):
        def __init__(self, refuse: str | None, delay: float):
            self.asked: list[str] = []
            self._refuse, self._delay = refuse, delay

        def size(self, path):
            self.asked.append(path)
            name = path.rsplit("/", 1)[-1]
            if name == self._refuse:
                raise PermissionError(errno.EACCES, "forbidden")
            time.sleep(self._delay)
            return None if name.endswith("7") else int(name, 16)

    relpaths = [f"{index % 256:02x}/{index:030x}" for index in range(2000)]  # no prefix dir of 8
    backend = Sizes(refuse=None, delay=0.001)
    remote = Remote(RemoteSpec("store", "/srv/store"), backend, "/srv/store", RetryPolicy(), RequestSlots())
    assert remote.sizes(relpaths) == {relpath: int(relpath[3:], 16) for relpath in relpaths
                                      if not relpath.endswith("7")}
    assert sorted(backend.asked) == sorted(f"/srv/store/{relpath}" for relpath in relpaths)

    backend = Sizes(refuse=relpaths[0][3:], delay=0.005)  # the first of the first batch
    remote = Remote(RemoteSpec("store", "/srv/store"), backend, "/srv/store", RetryPolicy(), RequestSlots())
    with pytest.raises(RemoteError, match="forbidden"):
        remote.sizes(relpaths)
    time.sleep(0.5)  # what was running when the failure came has ended
    # Without the stop, 8 threads would finish their batches of 63: 504 requests at least.
    assert len(backend.asked) < 250, len(backend.asked)


class _Listable:
    """A paged store for `Remote.sizes`: `per_dir` objects in every prefix directory of `files/md5/`
    and of the remote's root (a DVC 2 store there), those of `relpaths` among them; records its
    requests."""

    def __new__(cls, relpaths: list[str], per_dir: int, page: int | None):
        from regfs import backends

        class Store(backends.Backend):
            can_list, list_page = True, page

            def __init__(self):
                self.asked: list[tuple[str, str]] = []
                self.sizes = {f"/r/{relpath}": index for index, relpath in enumerate(relpaths)}

            def _entries(self, directory: str) -> list[tuple[str, int]]:
                mine = [(name, size) for name, size in self.sizes.items() if name.rsplit("/", 1)[0] == directory]
                return mine + [(f"{directory}/filler{index}", 1) for index in range(per_dir - len(mine))]

            def size(self, path):
                self.asked.append(("size", path))
                return self.sizes.get(path)

            def list(self, path):
                self.asked.append(("list", path))
                return self._entries(path)

            def list_tree(self, path):
                self.asked.append(("tree", path))
                return [entry for prefix in range(256) for entry in self._entries(f"{path}/{prefix:02x}")]

        return Store()


@pytest.mark.parametrize("layout", ["files/md5/", ""])
def test_sizes_ask_what_the_fullness_of_the_store_makes_cheapest(layout):
    """With paged listings (S3), `Remote.sizes` lists the prefix directory with the most wanted
    objects first and judges the rest by how full it is: a store of a few objects per directory
    is listed whole (a DVC 3 tree; never the remote's root), a full one gets a listing for a
    directory with more wanted objects than pages and a HEAD for each other object. Without
    pages, a directory is listed when 8 of its objects are wanted. Every answer is the same."""
    from regfs.dvcconfig import RemoteSpec
    from regfs.remotes import Remote, RequestSlots, RetryPolicy

    dense = [f"{layout}00/{index:030x}" for index in range(20)]
    spread = [f"{layout}{prefix:02x}/{prefix:030x}" for prefix in range(1, 101)]
    missing = [f"{layout}ff/{'e' * 30}"]

    def sizes(per_dir: int, page: int | None):
        store = _Listable(dense + spread, per_dir, page)
        remote = Remote(RemoteSpec("store", "/r"), store, "/r", RetryPolicy(), RequestSlots())
        answer = remote.sizes(dense + spread + missing)
        assert answer == {relpath: index for index, relpath in enumerate(dense + spread)}
        return sorted(store.asked)

    asked = sizes(per_dir=20, page=1000)  # about 5,000 objects: two pages, for 100 HEADs
    if layout:
        assert asked == [("list", "/r/files/md5/00"), ("tree", "/r/files/md5")], asked
    else:
        assert asked == [("list", "/r/00")] + sorted(("size", f"/r/{p}") for p in spread + missing), asked
    asked = sizes(per_dir=3000, page=1000)  # 768k objects: 768 pages one after another
    assert asked == [("list", f"/r/{layout}00")] + sorted(("size", f"/r/{p}") for p in spread + missing), asked
    asked = sizes(per_dir=20, page=None)
    assert asked == [("list", f"/r/{layout}00")] + sorted(("size", f"/r/{p}") for p in spread + missing), asked


@pytest.mark.parametrize("page", [1000, None])
def test_sizes_from_a_remote_that_refuses_listings_come_one_by_one(page, caplog):
    """A key that may read objects but not list the bucket (or a directory without read
    permission): the refused listing is not an error, its objects are asked for one by one, and
    the remote is not asked for a listing again; one warning says so."""
    from regfs.dvcconfig import RemoteSpec
    from regfs.remotes import Remote, RequestSlots, RetryPolicy

    relpaths = [f"files/md5/{index % 4:02x}/{index:030x}" for index in range(40)]
    store = _Listable(relpaths, 20, page)

    def refuse(path):
        store.asked.append(("list", path))
        raise PermissionError(errno.EACCES, "AccessDenied")

    store.list = store.list_tree = refuse
    remote = Remote(RemoteSpec("store", "/r"), store, "/r", RetryPolicy(), RequestSlots())
    expected = {relpath: index for index, relpath in enumerate(relpaths)}
    with caplog.at_level("WARNING", logger="regfs.remotes"):
        assert remote.sizes(relpaths) == expected
        assert remote.sizes(relpaths) == expected
    listings = [asked for asked in store.asked if asked[0] == "list"]
    assert len(listings) == (1 if page else 4), listings  # the sample, or the 4 dense dirs at once
    assert sorted(asked for asked in store.asked if asked[0] == "size") == \
        sorted(("size", f"/r/{relpath}") for relpath in relpaths * 2)
    (warning,) = [record.getMessage() for record in caplog.records]
    assert "AccessDenied" in warning and "one object at a time" in warning, warning


@pytest.mark.parametrize("local", [True, False])
def test_downloads_ahead_from_a_local_remote_run_one_per_cpu(tmp_path, local):
    """A download from a local directory is CPU work: fetches ahead of readers (read-ahead) take
    one of the remote's `ahead_slots`, one per CPU, so no more run at once; on a remote whose
    downloads wait on the network (here S3), as many run as read-ahead asks for."""
    from regfs import backends
    from regfs.dvcconfig import RemoteSpec
    from regfs.fetch import ObjectStore
    from regfs.remotes import Remote, RequestSlots, RetryPolicy

    backend = backends.LocalBackend(None) if local else backends.S3Backend(None)
    remote = Remote(RemoteSpec("store", str(tmp_path)), backend, str(tmp_path), RetryPolicy(), RequestSlots())
    running, most, lock = [0], [0], threading.Lock()

    class Fetcher:
        class cache:
            find = staticmethod(lambda ref: None)

        def fetch(self, ref, remote, size, ahead=False):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.05)
            with lock:
                running[0] -= 1

    store = ObjectStore(Fetcher(), lambda: remote, "store")
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda index: store.fetch_ahead(f"ref{index}", 1), range(16)))
    assert most[0] == (os.cpu_count() or 1 if local else 8), most[0]


def test_sizes_over_http_are_asked_together(tmp_path):
    """An HTTP remote's sizes are HEADs run together in its event loop: every size right, a
    missing object left out, one HEAD per object. A server that refuses them (401) fails the call
    with the refusal after a few HEADs, not after one per object; so does one that fails them all
    (503), once the retry budget is spent, having sent fewer than 16 HEADs per attempt."""
    from regfs.dvcconfig import RemoteSpec
    from regfs.remotes import open_remote
    from tests.faultproxy import FaultProxy
    from tests.httpserver import HTTPRemoteServer

    relpaths = [f"{index % 256:02x}/{index:030x}" for index in range(300)]
    for index, relpath in enumerate(relpaths):
        (tmp_path / relpath).parent.mkdir(exist_ok=True)
        (tmp_path / relpath).write_bytes(b"x" * index)
    for credentials, expected in ((None, "sizes"), (("user", "secret"), "refused")):
        server = HTTPRemoteServer(tmp_path, credentials=credentials).start()
        try:
            remote = open_remote(RemoteSpec("web", server.url, {"retries": "0"}))
            if expected == "sizes":
                assert remote.sizes(relpaths + ["ff/" + "e" * 30]) == {relpath: index for index, relpath
                                                                       in enumerate(relpaths)}
                heads = sorted(path for method, path, _ in server.requests if method == "HEAD")
                assert heads == sorted(f"/{relpath}" for relpath in relpaths + ["ff/" + "e" * 30])
            else:
                with pytest.raises(RemoteError, match="401"):
                    remote.sizes(relpaths)
                assert len(server.requests) <= 16, len(server.requests)
        finally:
            server.stop()
    server = HTTPRemoteServer(tmp_path).start()
    proxy = FaultProxy(server.url).start()
    try:
        proxy.inject("503", methods=("HEAD",))
        remote = open_remote(RemoteSpec("web", proxy.url, {"retries": "1"}))
        with pytest.raises(RemoteError, match="503.*gave up after 2 failed attempts"):
            remote.sizes(relpaths)
        # Per attempt: 8 at once, and fewer than 8 more started as the first failures came back.
        assert len(proxy.requests) <= 2 * (2 * 8 - 1), len(proxy.requests)
    finally:
        proxy.stop()
        server.stop()


@pytest.mark.parametrize("ranges, cap", [(True, None), (False, None), (True, 4096)],
                         ids=["ranges", "no-ranges", "capped-ranges"])
def test_sizes_over_http_may_bring_small_objects_whole(tmp_path, ranges, cap):
    """Asked with `whole`, an HTTP remote's sizes are GETs of each object's first `whole` bytes: an
    object no bigger comes whole (handed to `keep`, exactly its bytes), a bigger one gives its
    size only, an empty one its size from a HEAD (a range of it is unsatisfiable: 416), a missing
    one nothing. A server that ignores Range answers with whole objects: the small ones are kept
    the same, an empty one too; one that sends less of a range than asked (4 KiB here) gives the
    sizes and the objects that fit. Objects that may come whole are asked a few hundred per call
    (their bytes are held until the call ends): 300 more cross that line."""
    from regfs.dvcconfig import RemoteSpec
    from regfs.remotes import open_remote
    from tests.httpserver import HTTPRemoteServer

    limit = 1 << 16
    sizes = {f"{index % 256:02x}/{index:030x}": size
             for index, size in enumerate([0, 1, 5000, limit, limit + 1, 3 << 20] + [10] * 300)}
    contents = {relpath: os.urandom(size) for relpath, size in sizes.items()}
    for relpath, data in contents.items():
        (tmp_path / relpath).parent.mkdir(exist_ok=True)
        (tmp_path / relpath).write_bytes(data)
    server = HTTPRemoteServer(tmp_path, ranges=ranges, range_cap=cap).start()
    try:
        remote = open_remote(RemoteSpec("web", server.url, {"retries": "0"}))
        kept: dict[str, bytes] = {}
        found = remote.sizes([*sizes, "ff/" + "e" * 30], limit, lambda relpath, body: kept.setdefault(relpath, body))
        assert found == sizes
        assert kept == {relpath: data for relpath, data in contents.items()
                        if len(data) <= min(limit, cap or limit) and (data or not ranges)}
        methods = sorted(method for method, _, _ in server.requests)
        assert methods == ["GET"] * (len(sizes) + 1) + ["HEAD"] * ranges, server.requests
    finally:
        server.stop()


def test_sizes_asked_together_are_retried_in_rounds():
    """Objects whose size request failed (transiently) are asked again together, each within its
    own retry budget; one that keeps failing ends the call once its budget is spent."""
    from regfs import backends
    from regfs.dvcconfig import RemoteSpec
    from regfs.remotes import Remote, RequestSlots, RetryPolicy

    class Flaky(backends.Backend):
        asks_together = True

        def __init__(self, failing: dict[str, int]):
            self.rounds: list[list[str]] = []
            self._failing = failing  # path -> failed answers before a good one

        def sizes(self, paths, at_once, whole=0):
            assert at_once == 8
            self.rounds.append(paths)
            answers = []
            for path in paths:
                if self._failing.get(path, 0) > 0:
                    self._failing[path] -= 1
                    answers.append(backends.HTTPStatus(503, "Service Unavailable"))
                else:
                    answers.append(int(path.rsplit("/", 1)[1], 16))
            return answers

    relpaths = [f"{index % 256:02x}/{index:030x}" for index in range(40)]
    policy = RetryPolicy(retries=2, first_delay=0.01, max_delay=0.02)
    flaky = Flaky({"/r/" + relpaths[3]: 2, "/r/" + relpaths[7]: 1})
    remote = Remote(RemoteSpec("store", "/r"), flaky, "/r", policy, RequestSlots())
    assert remote.sizes(relpaths) == {relpath: int(relpath[3:], 16) for relpath in relpaths}
    assert flaky.rounds[1:] == [["/r/" + relpaths[3], "/r/" + relpaths[7]], ["/r/" + relpaths[3]]]

    flaky = Flaky({"/r/" + relpaths[3]: 3})
    remote = Remote(RemoteSpec("store", "/r"), flaky, "/r", policy, RequestSlots())
    with pytest.raises(RemoteError, match="gave up after 3 failed attempts"):
        remote.sizes(relpaths)
    assert len(flaky.rounds) == 3


def test_sizes_asked_together_count_their_budget_from_the_request():
    """The retry timeout of an object asked together counts from the start of the round that
    asked it, not from when its failure was seen: a remote that takes 0.6 s to fail each round
    of requests gives up at the 2nd failure with a 1 s retry timeout, not at the 3rd."""
    from regfs import backends
    from regfs.dvcconfig import RemoteSpec
    from regfs.remotes import Remote, RequestSlots, RetryPolicy

    class Slow(backends.Backend):
        asks_together = True

        def sizes(self, paths, at_once, whole=0):
            time.sleep(0.6)
            return [backends.HTTPStatus(503, "Service Unavailable") for _ in paths]

    policy = RetryPolicy(retries=10, retry_timeout=1.0, first_delay=0.01, max_delay=0.02)
    remote = Remote(RemoteSpec("store", "/r"), Slow(), "/r", policy, RequestSlots())
    with pytest.raises(RemoteError, match="gave up after 2 failed attempts"):
        remote.sizes(["00/" + "0" * 30])


def test_getattr_into_writes_what_getattr_answers():
    """libfuse's stat structure filled from a kept copy per kind, exec bit and mtime, then the
    size: field for field what mfusepy makes of `getattr`'s dict, whatever came before it."""
    import mfusepy

    from regfs.fuse import Operations
    from regfs.namespace import Attr

    attrs = {"/a": Attr("file", 5000, False, 1_700_000_000), "/b": Attr("file", 0, True, 1_700_000_000),
             "/c": Attr("dir", 0, False, 1_700_000_000), "/d": Attr("link", 12, False, 1_600_000_000),
             "/e": Attr("file", 7, False, 1_600_000_000), "/f": Attr("file", 1 << 40, False, 1_700_000_000)}

    class View:
        stats = None

        def attr(self, path):
            return attrs[path]

    operations = Operations(View())
    for path in [*attrs, *reversed(attrs)]:
        expected, actual = mfusepy.c_stat(), mfusepy.c_stat()
        mfusepy.set_st_attrs(expected, operations.getattr(path), use_ns=True)
        operations.getattr_into(path, actual)
        assert bytes(actual) == bytes(expected), path


def test_a_forked_child_does_not_flush_its_parents_records_at_exit(tmp_path):
    """A forked child's copy of an index holds its parent's unwritten records (and sqlite
    connections it must not use): its exit handler writes nothing; the parent's writes them."""
    from regfs.cache import ObjectRef
    from regfs.cacheindex import SizeIndex

    index = SizeIndex(str(tmp_path / "sizes.sqlite"))
    ref = ObjectRef("c" * 32, "md5")
    index.put_installed(ref, 10, (1, 2, 3))
    pid = os.fork()
    if pid == 0:  # the child: what its exit would run for this index, then out (not pytest's exit)
        try:
            index._flusher._at_exit()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert SizeIndex(str(tmp_path / "sizes.sqlite")).get_many([ref]) == {}
    index._flusher._at_exit()
    assert SizeIndex(str(tmp_path / "sizes.sqlite")).get_many([ref]) == {ref: 10}


def test_forget_is_not_undone_by_a_flush_already_under_way(tmp_path):
    """A flush copies the records, then writes them: `forget` of one of them meanwhile (its cached
    copy found corrupt) must not see the flush write it back afterwards."""
    import contextlib

    from regfs.cache import ObjectRef
    from regfs.cacheindex import SizeIndex

    index = SizeIndex(str(tmp_path / "sizes.sqlite"))
    ref = ObjectRef("d" * 32, "md5")
    index.put_installed(ref, 10, (1, 2, 3))
    writing, entered, go = index._writing, threading.Event(), threading.Event()

    @contextlib.contextmanager
    def held_writing():
        entered.set()
        go.wait(10)
        with writing() as connection:
            yield connection

    index._writing = held_writing
    flush = threading.Thread(target=index.flush)
    flush.start()
    assert entered.wait(10)
    index._writing = writing
    forget = threading.Thread(target=index.forget, args=([ref.relpath],))
    forget.start()
    time.sleep(0.2)  # forget, if it does not wait for the flush, is done by now
    go.set()
    flush.join(10)
    forget.join(10)
    other = SizeIndex(str(tmp_path / "sizes.sqlite"))
    assert (other.get_many([ref]), other.verified(ref.relpath)) == ({}, None)
