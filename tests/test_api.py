"""The Python API (`regfs.api`), the fsspec filesystem and `regfs get`/`regfs cat`, against DVC.

The oracles: the workspace `git checkout && dvc pull` produces (tests/registry.py), and
`dvc.api` itself, run in a subprocess with the suite's clean environment. The same reads run
through pandas and through PyTorch DataLoaders whose workers are forked after the parent used the
registry (its sqlite, pygit2 and s3fs state must not leak into the children).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import multiprocessing
import os
import pickle
import pty
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from regfs import api
from regfs.errors import RegfsError, RevisionNotFound
from tests.registry import PROJECT_ROOT, Registry, Tools, random_bytes
from tests.trees import assert_same_tree, snapshot

# -- helpers -----------------------------------------------------------------------------------

_DVC_API = """
import base64, json, sys
import dvc.api
answers = []
for call, kwargs in json.loads(sys.argv[1]):
    if call == "read":
        answers.append(base64.b64encode(dvc.api.read(mode="rb", **kwargs)).decode())
    else:
        answers.append(dvc.api.get_url(**kwargs))
print(json.dumps(answers))
"""


def dvc_api(tools: Tools, calls: list[tuple[str, dict]]) -> list:
    """Answers of `dvc.api.read` (bytes) and `dvc.api.get_url` (str), in one DVC process."""
    result = tools.run([sys.executable, "-c", _DVC_API, json.dumps(calls)], cwd=tools.workdir)
    answers = json.loads(result.stdout.decode().strip().splitlines()[-1])
    return [base64.b64decode(answer) if call == "read" else answer
            for (call, _), answer in zip(calls, answers)]


def files_of(tree: dict, prefix: str = "") -> dict[str, tuple]:
    """The non-directory entries of an oracle snapshot below `prefix`, relative to it."""
    start = f"{prefix}/" if prefix else ""
    return {path[len(start):]: entry for path, entry in tree.items()
            if path.startswith(start) and entry[0] != "dir"}


def subtree(tree: dict, prefix: str) -> dict[str, tuple]:
    return {path[len(prefix) + 1:]: entry for path, entry in tree.items() if path.startswith(prefix + "/")}


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "api-cache"


@pytest.fixture
def regfs_fs(basic, cache):
    def make(rev: str, **options) -> api.RegistryFileSystem:
        return fsspec.filesystem("regfs", repo=str(basic.path), rev=rev, cache_dir=str(cache),
                                 skip_instance_cache=True, **options)

    return make


# -- regfs.api.read / open / get_url -----------------------------------------------------------

READS = [
    ("v1.0", "big.bin"),  # a DVC file output
    ("v1.0", "README.txt"),  # a Git file
    ("feature/x", "README.txt"),
    ("v2.0", "data/a.txt"),  # a file inside a directory output
    ("v1.0", "data/sub/deeper/x.bin"),
    ("v1.0", "data/sub/ünï côdé.txt"),
    ("v1.0", "empty.bin"),
    ("v1.0", "links/data-link/sub/tool.sh"),  # through a symlink to a directory output
]


def test_read_equals_dvc_api_and_the_pulled_workspace(basic, tools, oracle, cache):
    workspace = oracle.clone(basic.path, "main")
    expected = dvc_api(tools, [("read", {"path": path.replace("links/data-link", "data"),
                                         "repo": str(workspace), "rev": rev}) for rev, path in READS])
    for (rev, path), dvc_bytes in zip(READS, expected):
        data = api.read(path, repo=basic.path, rev=rev, mode="rb", cache_dir=cache)
        assert data == dvc_bytes, f"{path}@{rev}: regfs.api.read differs from dvc.api.read"
        real_path = path.replace("links/data-link", "data")
        assert data == oracle.tree(basic.path, rev)[real_path][2], f"{path}@{rev} vs the workspace"


def test_text_mode_and_open_as_a_context_manager(basic, oracle, cache):
    expected = oracle.tree(basic.path, "v1.0")["données/été 1.txt"][2]
    text = api.read("données/été 1.txt", repo=str(basic.path), rev="v1.0", cache_dir=cache)
    assert text == expected.decode("utf-8") == "bonjour l'été\n"
    with api.open("/données/./été 1.txt", repo=basic.path, rev="v1.0", cache_dir=cache) as file:
        assert file.readline() == "bonjour l'été\n"
    with api.open("big.bin", repo=basic.path, rev="v1.0", mode="rb", cache_dir=cache) as file:
        big = oracle.tree(basic.path, "v1.0")["big.bin"][2]
        assert file.seek(-17, os.SEEK_END) == len(big) - 17
        assert file.read() == big[-17:]
        file.seek(1_000_000)
        assert file.read(5000) == big[1_000_000:1_005_000]
    with pytest.raises(ValueError, match="read-only"), api.open("README.txt", repo=basic.path, mode="w"):
        pass


def test_reads_verify_and_fill_the_shared_cache(basic, cache):
    data = api.read("models/v1/weights.bin", repo=basic.path, rev="v1.0", mode="rb", cache_dir=cache)
    object_id = hashlib.md5(data).hexdigest()
    cached = cache / "files" / "md5" / object_id[:2] / object_id[2:]
    assert cached.read_bytes() == data
    assert cached.stat().st_mode & 0o777 == 0o444


def test_repo_none_is_the_git_repository_of_the_current_directory(basic, oracle, cache, monkeypatch):
    monkeypatch.chdir(basic.path / "data")
    assert api.read("later.txt", cache_dir=cache) == oracle.tree(basic.path, "main")["later.txt"][2].decode()
    assert api.read("data/a.txt", rev="v1.0", cache_dir=cache) == "a version 1\n"


def test_errors_are_the_natural_python_ones(basic, cache, tmp_path, monkeypatch):
    def read(path, **options):
        return api.read(path, repo=basic.path, rev="v1.0", mode="rb", cache_dir=cache, **options)

    with pytest.raises(FileNotFoundError) as missing:
        read("data/no-such-file")
    assert isinstance(missing.value, RegfsError) and missing.value.errno == errno.ENOENT
    assert "no-such-file" in str(missing.value) and "v1.0" in str(missing.value)
    with pytest.raises(IsADirectoryError):
        read("data/sub")
    with pytest.raises(NotADirectoryError):
        read("README.txt/x")
    with pytest.raises(FileNotFoundError, match="leaves the revision"):
        read("links/absolute")
    with pytest.raises(RevisionNotFound, match="no-such-rev"):
        api.read("README.txt", repo=basic.path, rev="no-such-rev", cache_dir=cache)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RegfsError, match="not inside a Git repository"):
        api.read("README.txt", cache_dir=cache)


GET_URLS = [("v1.0", "big.bin"), ("v2.0", "data/a.txt"), ("v1.0", "data/sub/deeper/x.bin"), ("v1.0", "data"),
            ("v2.0", "data"), ("v2.0", "run.sh"), ("feature/x", "feature.txt")]


def test_get_url_equals_dvc_api_get_url(basic, tools, oracle, cache):
    workspace = oracle.clone(basic.path, "main")
    expected = dvc_api(tools, [("get_url", {"path": path, "repo": str(workspace), "rev": rev})
                               for rev, path in GET_URLS])
    for (rev, path), dvc_url in zip(GET_URLS, expected):
        assert api.get_url(path, repo=basic.path, rev=rev, cache_dir=cache) == dvc_url, f"{path}@{rev}"
    assert expected[3].startswith(str(basic.store)) and expected[3].endswith(".dir")
    with pytest.raises(RegfsError, match="tracked by Git"):
        api.get_url("README.txt", repo=basic.path, rev="v1.0", cache_dir=cache)


# -- the fsspec filesystem ---------------------------------------------------------------------


def test_fsspec_find_ls_info_match_the_oracle(basic, oracle, regfs_fs):
    fs = regfs_fs("v1.0")
    assert fs.commit_sha == basic.refs["v1.0"]
    expected = files_of(oracle.tree(basic.path, "v1.0"))
    assert sorted(fs.find("")) == sorted(expected)
    assert sorted(fs.find("regfs://data")) == sorted(f"data/{path}" for path in files_of(
        oracle.tree(basic.path, "v1.0"), "data"))
    for path, entry in expected.items():
        info = fs.info(path)
        if entry[0] == "link":
            assert (info["type"], info["destination"]) == ("link", entry[1]), path
        else:
            assert (info["type"], info["size"], info["isexec"]) == ("file", len(entry[2]), entry[1]), path
    listing = {entry["name"]: entry["type"] for entry in fs.ls("data", detail=True)}
    assert listing == {"data/a.txt": "file", "data/empty-in-dir.txt": "file", "data/sub": "directory",
                       "data/with space": "directory"}
    assert fs.ls("/data/sub/", detail=False) == ["data/sub/deeper", "data/sub/tool.sh", "data/sub/ünï côdé.txt"]
    assert fs.isdir("données") and fs.isfile("données/été 1.txt") and not fs.exists("nope")
    with pytest.raises(FileNotFoundError):
        fs.info("data/nope")


def test_fsspec_ranged_reads(basic, oracle, regfs_fs):
    fs = regfs_fs("v1.0")
    big = oracle.tree(basic.path, "v1.0")["big.bin"][2]
    for start, end in [(0, 10), (1_048_570, 1_048_600), (len(big) - 5, len(big)), (100, 3_000_000)]:
        assert fs.cat_file("big.bin", start=start, end=end) == big[start:end], (start, end)
    assert fs.cat_file("big.bin", start=-100) == big[-100:]
    assert fs.read_block("big.bin", 2_000_000, 1000) == big[2_000_000:2_001_000]
    with fs.open("big.bin", "rb") as file:
        assert file.size == len(big)
        file.seek(3_000_000)
        assert file.read(10) == big[3_000_000:3_000_010]
        assert file.tell() == 3_000_010
    with fsspec.open("regfs://données/été 1.txt", "rt", encoding="utf-8", **fs.storage_options) as file:
        assert file.read() == "bonjour l'été\n"
    with pytest.raises(OSError) as read_only:
        fs.open("new.txt", "wb")
    assert read_only.value.errno == errno.EROFS


@pytest.mark.parametrize("prefix", ["data", "links", "tools"])
def test_fsspec_get_of_a_directory_equals_the_oracle_subtree(basic, oracle, regfs_fs, tmp_path, prefix):
    fs = regfs_fs("v1.0")
    fs.get(prefix, str(tmp_path / "out"), recursive=True)
    assert_same_tree(snapshot(tmp_path / "out"), subtree(oracle.tree(basic.path, "v1.0"), prefix),
                     f"fs.get({prefix!r})")


def _read_in_child(fs: api.RegistryFileSystem, path: str) -> tuple[str, bytes]:
    return fs.commit_sha, fs.cat_file(path)


def test_fsspec_pickles_pinned_to_its_commit(basic, oracle, regfs_fs):
    fs = regfs_fs("main")
    copy = pickle.loads(pickle.dumps(fs))
    assert copy.commit_sha == fs.commit_sha == basic.refs["main"]
    assert copy.storage_options["rev"] == basic.refs["main"]
    expected = oracle.tree(basic.path, "main")["later.txt"][2]
    assert copy.cat_file("later.txt") == expected
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh interpreter, not a fork
        assert pool.apply(_read_in_child, (fs, "later.txt")) == (basic.refs["main"], expected)


def test_pandas_read_csv_through_fsspec(basic, oracle, cache):
    import pandas as pd

    workspace = oracle.clone(basic.path, "v1.0")
    expected = pd.read_csv(workspace / "data/with space/f.csv")
    options = {"repo": str(basic.path), "rev": "v1.0", "cache_dir": str(cache)}
    frame = pd.read_csv("regfs://data/with space/f.csv", storage_options=options)
    pd.testing.assert_frame_equal(frame, expected)
    assert frame.to_dict("list") == {"x": [1], "y": [2]}


# -- PyTorch DataLoaders with forked workers ---------------------------------------------------


class BytesDataset:
    """(path, bytes, worker pid) of each file; reads through `opener(path)`."""

    def __init__(self, paths: list[str], opener):
        self.paths, self.opener = paths, opener

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with self.opener(self.paths[index]) as file:
            return self.paths[index], file.read(), os.getpid()


def load_all(dataset) -> dict[str, tuple[bytes, int]]:
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork",
                        persistent_workers=False)
    return {path: (data, pid) for path, data, pid in loader}


def check_loaded(loaded: dict, expected: dict[str, bytes]) -> None:
    assert set(loaded) == set(expected)
    for path, (data, _) in loaded.items():
        assert data == expected[path], f"{path}: {len(data)} bytes, wrong content"
    pids = {pid for _, pid in loaded.values()}
    assert len(pids) == 2 and os.getpid() not in pids, f"not read by two forked workers: {pids}"


def test_torch_dataloader_over_the_mount(basic, oracle, mount):
    mounted = mount(f"{basic.path}@v1.0")
    expected = {path: entry[2] for path, entry in files_of(oracle.tree(basic.path, "v1.0")).items()
                if entry[0] == "file"}
    paths = sorted(expected) * 2
    check_loaded(load_all(BytesDataset(paths, lambda path: (mounted / path).open("rb"))), expected)


def test_torch_dataloader_over_fsspec_with_forked_workers(basic, oracle, regfs_fs):
    fs = regfs_fs("v1.0")
    expected = {path: entry[2] for path, entry in files_of(oracle.tree(basic.path, "v1.0")).items()
                if entry[0] == "file"}
    # The parent uses the registry first: its mirror, sqlite index and cache are open when forking.
    assert fs.cat_file("README.txt") == expected["README.txt"]
    paths = sorted(expected) * 2
    check_loaded(load_all(BytesDataset(paths, lambda path: fs.open(path, "rb"))), expected)
    assert fs.cat_file("data/a.txt") == expected["data/a.txt"]  # the parent's state still works


S3_BUCKET = "api-bucket"


@pytest.fixture(scope="module")
def s3_registry(tools, s3_server, tmp_path_factory) -> Registry:
    s3_server.create_bucket(S3_BUCKET)
    registry = Registry.create(tools, tmp_path_factory.mktemp("api-s3") / "registry",
                               remotes={"s3store": f"s3://{S3_BUCKET}/prefix"}, default_remote="s3store")
    registry.dvc("remote", "modify", "s3store", "endpointurl", s3_server.endpoint_url)
    for number in range(12):
        registry.write(f"shards/part-{number:02}.bin", random_bytes(200 + number, 50_000 + number))
    registry.write("labels.csv", "name,label\n" + "".join(f"part-{n:02},{n % 3}\n" for n in range(12)))
    registry.add("shards", "labels.csv")
    registry.push()
    registry.commit("shards on S3")
    return registry


S3_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}


def test_torch_dataloader_over_fsspec_on_s3(s3_registry, oracle, tmp_path, monkeypatch):
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    fs = fsspec.filesystem("regfs", repo=str(s3_registry.path), remote_config=S3_CREDENTIALS,
                           cache_dir=str(tmp_path / "cache"))
    expected = {path: entry[2] for path, entry in files_of(oracle.tree(s3_registry.path, "main")).items()
                if entry[0] == "file" and not path.endswith((".dvc", ".gitignore"))}
    # The parent downloads one object (its s3fs client and event loop thread are up) before forking.
    assert fs.cat_file("labels.csv") == expected["labels.csv"]
    check_loaded(load_all(BytesDataset(sorted(expected), lambda path: fs.open(path, "rb"))), expected)

    url = api.get_url("shards/part-03.bin", repo=s3_registry.path, cache_dir=tmp_path / "cache")
    object_id = hashlib.md5(expected["shards/part-03.bin"]).hexdigest()
    assert url == f"s3://{S3_BUCKET}/prefix/files/md5/{object_id[:2]}/{object_id[2:]}"


# -- regfs get / regfs cat ---------------------------------------------------------------------


def test_regfs_get_a_directory_and_a_file(basic, oracle, regfs_cli, tmp_path):
    def get(*args):
        return regfs_cli("get", *args, "--cache-dir", tmp_path / "cache")

    expected = oracle.tree(basic.path, "v1.0")
    out = tmp_path / "got-data"
    result = get(f"{basic.path}@v1.0", "data", "-o", out)
    assert result.returncode == 0, result
    assert_same_tree(snapshot(out), subtree(expected, "data"), "regfs get data")
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result
    assert f"{len(files_of(expected, 'data'))} files" in result.stderr, result  # the summary line

    # An existing directory receives the copy under the path's name, as with `dvc get`.
    into = tmp_path / "into"
    into.mkdir()
    assert get(f"{basic.path}@v2.0", "run.sh", "-o", into).returncode == 0
    assert get(f"{basic.path}@v2.0", "data", "-o", into).returncode == 0
    assert_same_tree(snapshot(into), {"run.sh": oracle.tree(basic.path, "v2.0")["run.sh"], "data": ("dir",),
                                      **{f"data/{path}": entry for path, entry in
                                         subtree(oracle.tree(basic.path, "v2.0"), "data").items()}},
                     "regfs get into a directory")

    for path in ("run.sh", "data"):  # into/run.sh and into/data exist now
        again = get(f"{basic.path}@v1.0", path, "-o", into)
        assert again.returncode == 1 and again.error_lines() == again.stderr.strip().splitlines(), again
        assert "already exists" in again.error_lines()[0] and "--force" in again.error_lines()[0]
    assert snapshot(into)["run.sh"] == oracle.tree(basic.path, "v2.0")["run.sh"], "replaced without --force"
    for path in ("run.sh", "data"):
        forced = get(f"{basic.path}@v1.0", path, "-o", into, "--force")
        assert forced.returncode == 0, forced
    assert_same_tree(snapshot(into), {"run.sh": expected["run.sh"], "data": ("dir",),
                                      **{f"data/{path}": entry for path, entry in subtree(expected, "data").items()}},
                     "regfs get --force")
    assert not [name for name in os.listdir(tmp_path) if ".regfs-" in name], "staging left behind"

    missing = get(f"{basic.path}@v1.0", "data/nope", "-o", tmp_path / "nope")
    assert missing.returncode == 1 and len(missing.error_lines()) == 1, missing
    assert not (tmp_path / "nope").exists()


def test_regfs_get_draws_progress_on_a_terminal(basic, tools, tmp_path):
    controller, terminal = pty.openpty()
    with open(tmp_path / "out.txt", "wb") as stdout:
        completed = subprocess.run(
            [sys.executable, "-m", "regfs", "get", f"{basic.path}@v1.0", "big.bin", "-o", tmp_path / "big",
             "--cache-dir", tmp_path / "cache"],
            cwd=PROJECT_ROOT, env=tools.env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=terminal,
            timeout=120, check=False)
    os.close(terminal)
    shown = os.read(controller, 65536).decode(errors="replace")
    os.close(controller)
    assert completed.returncode == 0, shown
    assert shown.startswith("\r") and shown.endswith("\x1b[K\r\n"), repr(shown)  # a live line
    assert "1 file, 3.1 MB in " in shown and "/s)" in shown, repr(shown)
    assert (tmp_path / "big").read_bytes() == random_bytes(1, 3 * 1024 * 1024 + 17)


def test_regfs_cat(basic, oracle, regfs_cli, tmp_path):
    for rev, path in [("v2.0", "data/a.txt"), ("v1.0", "README.txt"), ("feature/x", "feature.txt")]:
        result = regfs_cli("cat", f"{basic.path}@{rev}", path, "--cache-dir", tmp_path / "cache")
        assert result.returncode == 0, result
        assert result.stdout.encode() == oracle.tree(basic.path, rev)[path][2], (rev, path)
    for path, reason in [("data/nope.txt", "no such file"), ("data", "directory")]:
        failed = regfs_cli("cat", f"{basic.path}@v1.0", path, "--cache-dir", tmp_path / "cache")
        assert failed.returncode == 1 and failed.stdout == "", failed
        assert len(failed.error_lines()) == 1 and reason in failed.error_lines()[0].lower(), failed
