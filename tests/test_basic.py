"""A DVC 3 registry with a relative local remote, mounted unpinned and pinned.

Every tree is compared with what `git clone` + `git checkout` + `dvc pull` produce.
"""

from __future__ import annotations

import errno
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.trees import assert_same_tree, cache_objects, missing_from_cache, snapshot, stat_tree, tree_diff

REFS = ["main", "v1.0", "v2.0", "release", "feature/x"]


def test_root_lists_refs_as_symlinks_to_commits(basic, mount):
    mounted = mount(basic.path)
    assert sorted(os.listdir(mounted.path)) == sorted(["HEAD", "main", "v1.0", "v2.0", "release", "feature"])
    for name in ["main", "v1.0", "v2.0", "release"]:
        assert os.path.islink(mounted / name), name
        assert os.readlink(mounted / name) == "@" + basic.refs[name], name
    assert os.readlink(mounted / "HEAD") == "@" + basic.refs["main"]
    assert os.path.isdir(mounted / "feature") and not os.path.islink(mounted / "feature")
    assert os.listdir(mounted / "feature") == ["x"]
    assert os.readlink(mounted / "feature/x") == "../@" + basic.refs["feature/x"]


def test_each_ref_equals_the_oracle(basic, mount, oracle):
    mounted = mount(basic.path)
    failures = []
    for ref in [*REFS, "HEAD"]:
        expected = oracle.tree(basic.path, ref)
        differences = tree_diff(snapshot(mounted / ref), expected)
        if differences:
            failures.append(f"[{ref}]\n" + "\n".join(differences))
    assert not failures, "refs differ from the DVC oracle:\n" + "\n".join(failures)


def test_commit_by_full_and_short_sha(basic, mount, oracle):
    mounted = mount(basic.path)
    sha = basic.refs["v1.0"]
    expected = oracle.tree(basic.path, "v1.0")
    assert_same_tree(snapshot(mounted / f"@{sha[:7]}"), expected, "@<7-digit sha of v1.0>")
    assert_same_tree(snapshot(mounted / f"@{sha}"), expected, "@<full sha of v1.0>")
    assert not [name for name in os.listdir(mounted.path) if name.startswith("@")], \
        "@<sha> entries are resolved on lookup, never listed"


def unused_prefix(shas) -> str:
    for number in range(16**7):
        prefix = f"{number:07x}"
        if not any(sha.startswith(prefix) for sha in shas):
            return prefix
    raise AssertionError("no unused prefix")


def test_unknown_commit_is_enoent(basic, mount):
    mounted = mount(basic.path)
    all_commits = basic.registry.git("rev-list", "--all").split()
    prefix = unused_prefix(all_commits)
    blob = basic.registry.git("rev-parse", "v1.0:README.txt").strip()
    tree = basic.registry.git("rev-parse", "v1.0^{tree}").strip()
    names = [f"@{prefix}", f"@{prefix}{'0' * 33}", "@not-hex", "@", "no-such-branch",
             f"@{blob}", f"@{tree}", f"@{basic.refs['v1.0'][:6]}"]
    for name in names:
        with pytest.raises(OSError) as caught:
            os.stat(mounted / name)
        assert caught.value.errno == errno.ENOENT, f"{name}: {caught.value!r}"


def test_pinned_tag_is_the_root(basic, mount, oracle):
    mounted = mount(f"{basic.path}@v1.0")
    assert_same_tree(snapshot(mounted.path), oracle.tree(basic.path, "v1.0"), "pinned @v1.0")


def test_readahead_is_raised_where_the_daemon_may(basic, mount):
    """As root the daemon raises the mount's readahead to 1 MiB (sysfs knob and INIT); otherwise
    the kernel's default stays."""
    mounted = mount(f"{basic.path}@v1.0")
    device = f"{os.major(os.stat(mounted.path).st_dev)}:{os.minor(os.stat(mounted.path).st_dev)}"
    with open(f"/sys/class/bdi/{device}/read_ahead_kb") as knob:
        readahead = int(knob.read())
    assert readahead == (1024 if os.geteuid() == 0 else 128), mounted.log_tail()


def test_pinned_branch_with_slash(basic, mount, oracle):
    mounted = mount(f"{basic.path}@feature/x")
    assert_same_tree(snapshot(mounted.path), oracle.tree(basic.path, "feature/x"), "pinned @feature/x")


def test_pinned_short_sha(basic, mount, oracle):
    mounted = mount(f"{basic.path}@{basic.refs['v2.0'][:8]}")
    assert_same_tree(snapshot(mounted.path), oracle.tree(basic.path, "v2.0"), "pinned @<sha prefix>")


def test_stat_is_lazy_then_reads_fill_a_dvc_layout_cache(basic, mount, oracle):
    """`ls -lR` downloads no object; modes are 0444/0555; sizes match; reading everything leaves
    each object where DVC's own cache would have it."""
    mounted = mount(f"{basic.path}@v1.0")
    listing = stat_tree(mounted.path)
    # The empty object is cached when an empty file is seen (the kernel never reads it), from
    # nothing: it is the one object stat may leave in the cache.
    empty_object = "files/md5/d4/1d8cd98f00b204e9800998ecf8427e"
    assert cache_objects(mounted.cache_dir) - {empty_object} == set(), \
        "objects were downloaded by stat/readdir alone"

    expected = oracle.tree(basic.path, "v1.0")
    problems = []
    for relpath, entry in expected.items():
        seen = listing.get(relpath)
        if seen is None:
            problems.append(f"missing: {relpath}")
        elif entry[0] == "file":
            wanted_mode = 0o555 if entry[1] else 0o444
            if (seen.kind, seen.mode, seen.size) != ("file", wanted_mode, len(entry[2])):
                problems.append(f"{relpath}: {seen} != file mode {wanted_mode:o} size {len(entry[2])}")
        elif entry[0] == "dir" and (seen.kind, seen.mode) != ("dir", 0o555):
            problems.append(f"{relpath}: {seen} != dir mode 555")
        elif entry[0] == "link" and seen.kind != "link":
            problems.append(f"{relpath}: {seen} is not a symlink")
    problems += [f"extra: {relpath}" for relpath in set(listing) - set(expected)]
    assert not problems, "stat of the mount disagrees with the oracle:\n" + "\n".join(problems)
    assert os.stat(mounted.path).st_mode & 0o777 == 0o555

    assert_same_tree(snapshot(mounted.path), expected, "pinned @v1.0 after stat")
    missing = missing_from_cache(mounted.cache_dir, oracle.clone(basic.path, "v1.0"))
    assert not missing, f"objects `dvc pull` caches that are not in regfs's cache dir: {sorted(missing)}"


def test_concurrent_and_random_access_reads(basic, mount, oracle):
    """Many readers of one uncached object at once, and reads that start in the middle, end past
    the end or start there, of objects and of a file whose bytes come from Git."""
    mounted = mount(f"{basic.path}@v1.0")
    expected = oracle.tree(basic.path, "v1.0")
    big = expected["big.bin"][2]
    x_bin = expected["data/sub/deeper/x.bin"][2]
    readme = expected["README.txt"][2]  # a Git blob, served from memory, not from the cache

    for relpath, data, reads in (("data/sub/deeper/x.bin", x_bin, [(1000, 50_000), (10, len(x_bin) + 5),
                                                                    (100, len(x_bin) - 10)]),
                                 ("README.txt", readme, [(7, 3), (4096, len(readme) - 1), (10, len(readme) + 5)])):
        descriptor = os.open(mounted / relpath, os.O_RDONLY)
        try:  # first access to the object is a read at an offset, then one past the end
            for size, offset in reads:
                assert os.pread(descriptor, size, offset) == data[offset:offset + size], (relpath, size, offset)
        finally:
            os.close(descriptor)

    def read_big(number: int) -> bytes:
        if number % 2:
            return (mounted / "big.bin").read_bytes()
        with open(mounted / "big.bin", "rb", buffering=0) as handle:
            handle.seek(len(big) // 2 + number)
            return handle.read(4096)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(read_big, range(8)))
    for number, data in enumerate(results):
        wanted = big if number % 2 else big[len(big) // 2 + number:][:4096]
        assert data == wanted, f"reader {number} got {len(data)} wrong bytes"
    descriptor = os.open(mounted / "big.bin", os.O_RDONLY)
    try:  # odd sizes across the daemon's 1 MiB requests, and up to the end
        for size, offset in ((5, (1 << 20) - 2), ((1 << 20) + 3, 12_345), ((2 << 20) + 1, len(big) - 7)):
            assert os.pread(descriptor, size, offset) == big[offset:offset + size], (size, offset)
    finally:
        os.close(descriptor)
