"""Pure-layer tests: metafile and manifest parsing, hashing, config and address parsing.

These take literals (style.md: pure parsers are tested with plain data); the end-to-end tests
compare whole mounts with what the real DVC produces.
"""

import hashlib
import json

import pytest

from regfs.address import parse_address
from regfs.dvcconfig import Config, parse_config, parse_override
from regfs.dvcmeta import HASH_LEGACY, HASH_MD5, parse_dir_manifest, parse_dvc_file, parse_pipeline
from regfs.errors import ConfigError, MetafileError
from regfs.hashing import CHUNK, StreamHasher, is_text


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
    (entry,) = parse_dir_manifest(data, "m")
    assert (entry.relpath, entry.is_exec, entry.size) == ("a/b c.txt", True, 0)


@pytest.mark.parametrize("relpath", ["../x", "/abs", "a//b", "a/./b", "a/", "", "a\0b", "a/../../b"])
def test_hostile_manifest_relpaths_are_rejected(relpath):
    data = json.dumps([{"md5": "d41d8cd98f00b204e9800998ecf8427e", "relpath": relpath}]).encode()
    with pytest.raises(MetafileError):
        parse_dir_manifest(data, "m")


@pytest.mark.parametrize("data", [b"{", b"{}", b'[{"relpath": "a"}]', b'["a"]',
                                  (b'[{"md5": "d41d8cd98f00b204e9800998ecf8427e", "relpath": "a"},'
                                  b' {"md5": "d41d8cd98f00b204e9800998ecf8427e", "relpath": "a/b"}]')])
def test_malformed_manifests_are_rejected(data):
    with pytest.raises(MetafileError):
        parse_dir_manifest(data, "m")


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
