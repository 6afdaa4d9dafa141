"""Big directory outputs listed through a real mount: the names, modes and sizes of `dvc pull`'s
workspace, served from the packed manifest with attributes in the readdir replies.

`flat/` holds 6,000 files (dozens of readdir replies), `nested/` names that sort differently by byte and
by path component (`a!`, `a-b/`, `a/`, `a0`), both written by hand as DVC 3 writes them (a `.dir`
manifest of `{md5, relpath}` on the remote, a `.dvc` file in Git): `dvc add` of 20,000 files would
take a minute. Entry sizes come from the cache, the size index or the remote.

The daemon runs with `--debug`, so libfuse logs each request: `ls -l` of `flat/` must cost a lookup
only for the entries whose attributes are not given with the listing (empty files, sizes not known
yet), and no extended attribute query per entry.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from regfs.cacheindex import SizeIndex
from regfs.manifest import parse_manifest
from tests.registry import Registry, random_bytes
from tests.trees import StatEntry, object_path, stat_tree

FLAT_ENTRIES = 6_000
CONTENTS = [b""] + [random_bytes(900 + seed, 1 + seed * 37) for seed in range(1, 64)]  # 64 objects
NESTED = ["a!", "a-b/x", "a b/y", "a/x", "a/y/z", "a0", "é/ü.txt", "sub/.hidden", "weird #1 (x).txt",
          *(f"sub/deep/k{index:04d}" for index in range(700))]
OPCODE = re.compile(r"opcode: ([A-Z_]+)")
LS_LINE = re.compile(r"([-dl][-rwx]{9})\s+\d+\s+\d+\s+\d+\s+(\d+)\s+\d+ (.*)")


@dataclass
class BigRegistry:
    registry: Registry
    store: Path
    flat_manifest: str  # the `.dir` object id of flat/
    nested_manifest: str
    workspace: Path  # `git clone && dvc pull` of main

    def expected(self, output: str) -> dict[str, tuple]:
        return shapes(stat_tree(self.workspace / output))


def put_object(store: Path, data: bytes, suffix: str = "") -> str:
    object_id = hashlib.md5(data).hexdigest() + suffix
    path = object_path(store, object_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return object_id


def write_dir_output(registry: Registry, store: Path, name: str, entries: list[dict]) -> str:
    """A directory output as DVC 3 writes it: the manifest (sorted by relpath) on the remote, the
    `.dvc` file in the registry; returns the manifest's object id."""
    manifest = json.dumps(sorted(entries, key=lambda entry: entry["relpath"]), sort_keys=True).encode()
    object_id = put_object(store, manifest, ".dir")
    registry.write(f"{name}.dvc", f"outs:\n- md5: {object_id}\n  nfiles: {len(entries)}\n  hash: md5\n  path: {name}\n")
    with open(registry.path / ".gitignore", "a") as gitignore:
        gitignore.write(f"/{name}\n")
    return object_id


@pytest.fixture(scope="module")
def big(tools, oracle, tmp_path_factory) -> BigRegistry:
    parent = tmp_path_factory.mktemp("listing")
    registry = Registry.create(tools, parent / "registry", remotes={"store": "../store"}, default_remote="store")
    store = parent / "store"
    ids = [put_object(store, data) for data in CONTENTS]
    flat = [{"md5": ids[index % len(ids)], "relpath": f"f{index:05d}.bin"} for index in range(FLAT_ENTRIES)]
    flat_manifest = write_dir_output(registry, store, "flat", flat)
    nested_manifest = write_dir_output(
        registry, store, "nested", [{"md5": ids[index % len(ids)], "relpath": relpath} for index, relpath in enumerate(NESTED)])
    registry.commit("big outputs")
    return BigRegistry(registry, store, flat_manifest, nested_manifest, oracle.clone(registry.path, "main"))


def shapes(entries: dict[str, StatEntry]) -> dict[str, tuple]:
    """What a mount must share with a pulled workspace: kind, exec bit, a file's size (modes
    differ: a workspace is writable)."""
    return {name: (entry.kind, bool(entry.mode & stat.S_IXUSR), entry.size if entry.kind == "file" else None)
            for name, entry in entries.items()}


def ls_l(directory: Path) -> dict[str, tuple]:
    """GNU `ls -l` of a directory (it stats each entry as it reads them, and asks for its SELinux
    label and ACLs), parsed like `shapes`."""
    output = subprocess.run(["ls", "-ln", "--quoting-style=literal", "--time-style=+%s", directory],
                            capture_output=True, text=True, check=True).stdout
    kinds = {"-": "file", "d": "dir", "l": "link"}
    listed = {}
    for line in output.splitlines()[1:]:  # after "total N"
        match = LS_LINE.fullmatch(line)
        assert match, line
        mode, size, name = match.groups()
        kind = kinds[mode[0]]
        listed[name] = (kind, mode[3] == "x", int(size) if kind == "file" else None)
    return listed


def requests(log: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for opcode in OPCODE.findall(log):
        counts[opcode] = counts.get(opcode, 0) + 1
    return counts


def scandir_stat(directory: Path, prefix: str = "") -> dict[str, StatEntry]:
    """Each entry stat'ed while the directory is read (as `find` or `ls -lR` do), recursively."""
    found = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            status = entry.stat(follow_symlinks=False)
            kind = "dir" if stat.S_ISDIR(status.st_mode) else "file"
            found[prefix + entry.name] = StatEntry(kind, stat.S_IMODE(status.st_mode), status.st_size)
            if kind == "dir":
                found.update(scandir_stat(Path(entry.path), prefix + entry.name + "/"))
    return found


def test_big_outputs_list_as_dvc_pull_makes_them(big, mount):
    mounted = mount(f"{big.registry.path}@main", "--debug")
    before = requests(mounted.log_text())
    assert ls_l(mounted / "flat") == big.expected("flat")
    used = {opcode: count - before.get(opcode, 0) for opcode, count in requests(mounted.log_text()).items()}
    empty = sum(1 for index in range(FLAT_ENTRIES) if index % len(CONTENTS) == 0)
    # A lookup for `flat` itself and one per empty file (a lookup caches the empty object); the
    # others came with the listing, in replies of many entries each.
    assert used.get("LOOKUP", 0) <= empty + 2, used
    # flat/ has many entries (regfs.tree.MANY_ENTRIES), so it reports 1 MiB blocks: `ls` reads it
    # with a 1 MiB buffer, and the kernel asks for that much at a time (a 32 KiB one took 30).
    assert os.stat(mounted / "flat").st_blksize == 1 << 20
    assert os.stat(mounted / "nested").st_blksize == os.stat(mounted.path).st_blksize == 4096
    assert used.get("READDIRPLUS", 0) <= 3, used
    assert used.get("GETXATTR", 0) <= 4, used  # `ls` learns once that there are no labels or ACLs

    assert shapes(scandir_stat(mounted / "nested")) == big.expected("nested")
    assert sorted(os.listdir(mounted / "nested")) == sorted(os.listdir(big.workspace / "nested"))
    for relpath in ["flat/f00001.bin", f"flat/f{FLAT_ENTRIES - 1:05d}.bin", "nested/a!", "nested/sub/deep/k0699", "nested/é/ü.txt"]:
        assert (mounted / relpath).read_bytes() == (big.workspace / relpath).read_bytes(), relpath
    for missing in [f"flat/f{FLAT_ENTRIES:05d}.bin", "nested/a/x/y", "nested/sub/deep/k0700", "nested/a/y/z/w"]:
        assert not os.path.lexists(mounted / missing), missing

    object_id = os.getxattr(mounted / "flat" / "f00003.bin", "user.regfs.hash").decode()
    assert object_id == "md5:" + hashlib.md5(CONTENTS[3]).hexdigest()
    for name in ["security.selinux", "system.posix_acl_access"]:
        with pytest.raises(OSError) as caught:
            os.getxattr(mounted / "flat" / "f00003.bin", name)
        assert caught.value.errno == errno.EOPNOTSUPP, (name, caught.value)
    with pytest.raises(OSError) as caught:
        os.getxattr(mounted / "flat" / "f00003.bin", "user.other")
    assert caught.value.errno == errno.ENODATA


def test_sizes_not_known_when_listed_are_looked_up(big, mount, tmp_path):
    """Most objects are not on the remote yet when `flat/` is first listed: entries whose object is
    not in the cache either come without attributes, and `ls -l` looks them up once the objects are
    there; the others need no lookup."""
    cache = tmp_path / "cache"
    cached = set(range(8, len(CONTENTS)))  # contents in the cache before the mount
    for object_id in [big.flat_manifest] + [hashlib.md5(CONTENTS[index]).hexdigest() for index in cached]:
        target = object_path(cache, object_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(object_path(big.store, object_id), target)
    away = {object_path(big.store, hashlib.md5(data).hexdigest()): tmp_path / f"away{index}"
            for index, data in enumerate(CONTENTS) if index not in cached}
    for source, target in away.items():
        source.rename(target)
    try:
        mounted = mount(f"{big.registry.path}@main", "--debug", cache_dir=cache)
        assert len(os.listdir(mounted / "flat")) == FLAT_ENTRIES
    finally:
        for source, target in away.items():
            target.rename(source)
    before = requests(mounted.log_text())
    assert ls_l(mounted / "flat") == big.expected("flat")
    lookups = requests(mounted.log_text()).get("LOOKUP", 0) - before.get("LOOKUP", 0)
    unknown = sum(1 for index in range(FLAT_ENTRIES) if index % len(CONTENTS) not in cached)
    assert unknown <= lookups <= unknown + 10, (unknown, lookups)


def manifest_records(cache: Path) -> dict[str, bytes]:
    """The records of manifest sizes in a cache's size index, by manifest object id."""
    with sqlite3.connect(cache / "regfs" / "sizes.sqlite") as connection:
        rows = connection.execute("SELECT manifest, record FROM manifest_sizes").fetchall()
    connection.close()
    return {manifest.removeprefix("files/md5/").replace("/", "", 1): record for manifest, record in rows}


def test_fresh_mounts_take_the_sizes_of_a_manifest_from_its_record(big, mount, tmp_path):
    """Once every entry's size is known, the size index keeps them as one record per manifest: a
    record that is not exactly its manifest's (another's, truncated) is ignored and rebuilt, and a
    fresh mount lists with the record alone (index rows and remote objects gone). Likewise the
    packed copy of a parsed manifest of 1,000 entries or more (`regfs/manifests/`, flat/'s, not
    nested/'s): another manifest's is ignored and written again, and a fresh mount lists from the
    copy alone (flat/'s `.dir` object gone too)."""
    cache, identities, records = tmp_path / "cache", {}, {}
    sizes = {hashlib.md5(data).hexdigest(): len(data) for data in CONTENTS}
    for object_id in (big.flat_manifest, big.nested_manifest):
        target = object_path(cache, object_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(object_path(big.store, object_id), target)
        identities[object_id] = f"files/md5/{object_id[:2]}/{object_id[2:]}"
        manifest = parse_manifest(target.read_bytes(), object_id)
        manifest.fill_sizes(lambda object_ids: {object_id: sizes[object_id] for object_id in object_ids})
        records[object_id] = manifest.sizes_record(identities[object_id])
    # flat/'s record: of the right length and digest, but another manifest's and with wrong sizes;
    # nested/'s truncated.
    flat = parse_manifest(object_path(big.store, big.flat_manifest).read_bytes(), "flat")
    flat.fill_sizes(lambda object_ids: dict.fromkeys(object_ids, 7))
    (cache / "regfs").mkdir()
    index = SizeIndex(str(cache / "regfs" / "sizes.sqlite"))
    index.put_manifest_sizes(identities[big.flat_manifest], flat.sizes_record(identities[big.nested_manifest]))
    index.put_manifest_sizes(identities[big.nested_manifest], records[big.nested_manifest][:-9])
    assert set(manifest_records(cache)) == set(records)
    copy = cache / "regfs" / "manifests" / f"{big.flat_manifest}-md5"
    copy.parent.mkdir()
    copy.write_bytes(parse_manifest(object_path(big.store, big.nested_manifest).read_bytes(),
                                    "nested").packed_record(identities[big.nested_manifest]))
    first = mount(f"{big.registry.path}@main", cache_dir=cache)
    assert ls_l(first / "flat") == big.expected("flat")
    assert shapes(scandir_stat(first / "nested")) == big.expected("nested")
    assert first.log_text().count("ignoring the recorded sizes") == 2, first.log_tail()
    assert first.log_text().count("ignoring the packed copy of manifest") == 1, first.log_tail()
    assert manifest_records(cache) == records  # rebuilt by the mount
    flat_manifest = parse_manifest(object_path(big.store, big.flat_manifest).read_bytes(), "flat")
    assert copy.read_bytes() == flat_manifest.packed_record(identities[big.flat_manifest])  # written again
    assert [path.name for path in copy.parent.iterdir()] == [copy.name]  # none for nested/'s 10 entries

    with sqlite3.connect(cache / "regfs" / "sizes.sqlite") as connection:
        connection.execute("DELETE FROM sizes")
    connection.close()
    away = {object_path(big.store, object_id): tmp_path / f"away{number}" for number, object_id in enumerate(sizes)}
    away[object_path(big.store, big.flat_manifest)] = tmp_path / "away-manifest"
    object_path(cache, big.flat_manifest).unlink()
    for source, target in away.items():
        source.rename(target)
    try:
        second = mount(f"{big.registry.path}@main", cache_dir=cache)
        assert ls_l(second / "flat") == big.expected("flat")
        assert shapes(scandir_stat(second / "nested")) == big.expected("nested")
    finally:
        for source, target in away.items():
            target.rename(source)


def recounted(record: bytes, count: int, new_count: int) -> bytes:
    """A record whose entry count (the 8 bytes before the sizes) says `new_count`, with a digest
    that matches."""
    at = len(record) - 16 - 8 * count - 8
    body = record[:at] + new_count.to_bytes(8, "little") + record[at + 8:-16]
    return body + hashlib.blake2b(body, digest_size=16).digest()


def test_a_sizes_record_is_taken_only_whole_and_for_its_own_manifest(tmp_path):
    text = json.dumps([{"md5": "0" * 31 + str(digit), "relpath": f"f{digit}"} for digit in range(3)]).encode()
    known = parse_manifest(text, "known")
    known.fill_sizes(lambda object_ids: {object_id: 10 + int(object_id[-1]) for object_id in object_ids})
    record = known.sizes_record("files/md5/ab/c.dir")
    loaded = parse_manifest(text, "loaded")
    loaded.load_sizes(record, "files/md5/ab/c.dir")
    assert [entry.size for entry in loaded] == [10, 11, 12]

    flipped = bytearray(record)
    flipped[-20] ^= 1  # a byte of the last size
    partly = json.dumps([{"md5": "0" * 31 + str(digit), "relpath": f"f{digit}", "size": 5} if digit == 1 else
                         {"md5": "0" * 31 + str(digit), "relpath": f"f{digit}"} for digit in range(3)]).encode()
    refused = [
        (text, record[:-1], "bytes instead of"),
        (text, record + b"\0", "bytes instead of"),
        (text, bytes(flipped), "digest"),
        (text, b"", "not a record"),
        (text, known.sizes_record("files/md5/ab/d.dir"), "another manifest"),  # another's, else valid
        (text, recounted(record, 3, 2), "another number of entries"),  # digest made again
        (partly, known.sizes_record("files/md5/ab/c.dir"), "differ"),  # says 11 where the manifest says 5
    ]
    for manifest_text, bad, reason in refused:
        manifest = parse_manifest(manifest_text, "manifest")
        before = [entry.size for entry in manifest]
        with pytest.raises(ValueError, match=reason):
            manifest.load_sizes(bad, "files/md5/ab/c.dir")
        assert [entry.size for entry in manifest] == before

    index = SizeIndex(str(tmp_path / "sizes.sqlite"))
    index.put_manifest_sizes("files/md5/ab/c.dir", record)
    assert index.manifest_sizes("files/md5/ab/c.dir") == record
    index.forget(["files/md5/00/1"])  # a size learned from a corrupt copy may be in any record
    assert index.manifest_sizes("files/md5/ab/c.dir") is None
