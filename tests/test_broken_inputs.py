"""Broken and hostile input: a corrupt object on the remote, `.dir` manifests whose relpaths try to
leave their directory, a `.dvc` file that is not valid YAML.

DVC itself refuses these commits, so the expected tree is the DVC oracle of the sane commit they
were derived from, minus the outputs made unreadable, plus the Git files of the broken commit
(read from Git, not written here).
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.registry import Registry, random_bytes
from tests.trees import Snapshot, assert_same_tree, md5_hex, mentions_object, object_path, snapshot, without

# Directory outputs whose manifests get one hostile entry each, and that entry's relpath.
HOSTILE_RELPATHS = {
    "hostile-dotdot": "../escaped-dotdot.txt",
    "hostile-absolute": "/escaped-absolute.txt",
    "hostile-empty-part": "sub//escaped-empty.txt",
    "hostile-deep-dotdot": "sub/../../escaped-deep.txt",
}
MALFORMED_METAFILE = "malformed.txt.dvc"
MALFORMED_YAML = "outs:\n- md5: [d41d8cd98f00b204e9800998ecf8427e\n  path: malformed.txt\n  size: {\n"
CORRUPT_DATA = random_bytes(31, 6000)


@dataclass
class BrokenRegistry:
    registry: Registry
    store: Path
    corrupt_tree: Snapshot  # the oracle of branch `corrupt`, taken before the corruption
    corrupt_object_id: str


def rewrite_manifest(registry: Registry, store: Path, output: str, hostile_relpath: str) -> None:
    """Store a manifest with one extra hostile entry in the remote and point `output.dvc` at it."""
    metafile = registry.path / f"{output}.dvc"
    text = metafile.read_text()
    old_id = re.search(r"md5: ([0-9a-f]{32}\.dir)", text)[1]
    entries = json.loads(object_path(store, old_id).read_bytes())
    entries.append({"md5": entries[0]["md5"], "relpath": hostile_relpath})
    entries.sort(key=lambda entry: entry["relpath"])
    manifest = json.dumps(entries).encode()
    new_id = md5_hex(manifest) + ".dir"
    target = object_path(store, new_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(manifest)
    text = text.replace(old_id, new_id)
    text = re.sub(r"nfiles: \d+", f"nfiles: {len(entries)}", text)
    metafile.write_text(text)


@pytest.fixture(scope="module")
def broken(tools, oracle, tmp_path_factory) -> BrokenRegistry:
    """main (tag `sane`): ordinary outputs. Branch `corrupt`: adds an output whose object is then
    overwritten on the remote. Branch `hostile`: rewritten manifests and a malformed `.dvc`."""
    parent = tmp_path_factory.mktemp("broken")
    store = parent / "store"
    registry = Registry.create(tools, parent / "registry", remotes={"store": "../store"},
                               default_remote="store")
    registry.write("git-file.txt", "tracked by Git\n")
    registry.write("ok.txt", "an ordinary output\n")
    for number, output in enumerate(HOSTILE_RELPATHS):
        registry.write(f"{output}/a.txt", f"a of {output}\n")
        registry.write(f"{output}/sub/b.txt", f"b of {output}\n")
        registry.write(f"{output}/sub/c.bin", random_bytes(40 + number, 300))
    registry.add("ok.txt", *HOSTILE_RELPATHS)
    registry.push()
    registry.commit("sane")
    registry.tag("sane")

    registry.checkout("corrupt", new_branch=True)
    registry.write("corrupt.bin", CORRUPT_DATA)
    registry.write("fine.bin", random_bytes(32, 6000))
    registry.add("corrupt.bin", "fine.bin")
    registry.push()
    registry.commit("an output whose object will be corrupted on the remote")
    corrupt_tree = oracle.tree(registry.path, "corrupt")
    corrupt_id = md5_hex(CORRUPT_DATA)
    stored = object_path(store, corrupt_id)
    stored.chmod(0o644)
    stored.write_bytes(bytes(byte ^ 0x5A for byte in CORRUPT_DATA))  # same size, other bytes

    registry.checkout("sane")
    registry.checkout("hostile", new_branch=True)
    for output, relpath in HOSTILE_RELPATHS.items():
        rewrite_manifest(registry, store, output, relpath)
    registry.write(MALFORMED_METAFILE, MALFORMED_YAML)
    registry.commit("hostile manifests and a malformed .dvc file")
    registry.checkout("main")
    return BrokenRegistry(registry, store, corrupt_tree, corrupt_id)


def test_corrupt_object_is_eio_and_never_cached(broken, mount):
    source = broken.registry.path
    object_id = broken.corrupt_object_id
    mounted = mount(f"{source}@corrupt", expect_errors=rf"corrupt\.bin|{object_id}|{object_id[2:]}")
    assert os.stat(mounted / "corrupt.bin").st_size == len(CORRUPT_DATA)

    with open(mounted / "corrupt.bin", "rb") as handle, pytest.raises(OSError) as caught:
        handle.read(10)  # even a short read must not return unverified bytes
    assert caught.value.errno == errno.EIO, caught.value
    with pytest.raises(OSError) as caught:
        (mounted / "corrupt.bin").read_bytes()
    assert caught.value.errno == errno.EIO, caught.value

    for layout in (False, True):
        cached = object_path(mounted.cache_dir, object_id, legacy=layout)
        assert not cached.exists(), f"the corrupt object was cached at {cached}"
    errors = mounted.error_lines()
    assert any(mentions_object(line, object_id) for line in errors), \
        f"no ERROR line names object {object_id}:\n{mounted.log_tail()}"
    assert any("corrupt.bin" in line for line in errors), \
        f"no ERROR line names the path corrupt.bin:\n{mounted.log_tail()}"
    assert any("store" in line for line in errors if mentions_object(line, object_id)), \
        f"no ERROR line names the remote:\n{mounted.log_tail()}"

    expected = without(broken.corrupt_tree, "corrupt.bin")
    assert_same_tree(snapshot(mounted.path, skip=["corrupt.bin"]), expected, "@corrupt, other files")


def expected_hostile_tree(broken: BrokenRegistry, oracle) -> Snapshot:
    sane = oracle.tree(broken.registry.path, "sane")
    expected = without(sane, *HOSTILE_RELPATHS)
    expected.update(broken.registry.git_files("hostile"))
    return expected


def test_hostile_manifests_fail_alone(broken, mount, oracle):
    source = broken.registry.path
    names = "|".join(re.escape(name) for name in [*HOSTILE_RELPATHS, MALFORMED_METAFILE])
    mounted = mount(f"{source}@hostile", expect_errors=names)

    for output in HOSTILE_RELPATHS:
        with pytest.raises(OSError) as caught:
            os.listdir(mounted / output)
        assert caught.value.errno == errno.EIO, f"listing {output}: {caught.value!r}"
        with pytest.raises(OSError) as caught:
            (mounted / output / "a.txt").read_bytes()
        assert caught.value.errno == errno.EIO, f"reading {output}/a.txt: {caught.value!r}"
    for escaped in ["escaped-dotdot.txt", "escaped-absolute.txt", "escaped-deep.txt", "sub"]:
        assert not os.path.lexists(mounted / escaped), escaped
        assert not os.path.lexists(mounted.path.parent / escaped), escaped

    actual = snapshot(mounted.path, skip=HOSTILE_RELPATHS)
    assert_same_tree(actual, expected_hostile_tree(broken, oracle), "@hostile, but the hostile outputs")

    log = mounted.log_text().splitlines()
    for output in HOSTILE_RELPATHS:
        assert any(output in line and re.search(r"\b(ERROR|WARNING)\b", line) for line in log), \
            f"no ERROR/WARNING log line names the output {output}:\n{mounted.log_tail()}"


def test_malformed_metafile_hides_only_its_output(broken, mount, oracle):
    """The malformed `.dvc` file itself is a Git file and is shown; its output is not."""
    source = broken.registry.path
    names = "|".join(re.escape(name) for name in [*HOSTILE_RELPATHS, MALFORMED_METAFILE])
    mounted = mount(f"{source}@hostile", expect_errors=names)
    assert (mounted / MALFORMED_METAFILE).read_bytes() == MALFORMED_YAML.encode()
    assert not os.path.lexists(mounted / "malformed.txt")
    assert (mounted / "ok.txt").read_bytes() == b"an ordinary output\n"
