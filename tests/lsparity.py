"""`regfs ls` against the real `dvc list`, for the test modules that build registries.

For a revision, both commands run on the same registry (`dvc list URL --rev REV`, `regfs ls
URL@REV`) and must print the same bytes (the `--size --show-hash` table, and the other forms where
the caller asks); `-R --json` must agree entry by entry. Where `dvc list` knows less than the mount
shows, the pulled workspace is the judge instead: the size of a file inside a directory output
(`dvc list` gives none: DVC 3 manifests do not record it), the hash of a file inside an imported
directory (none, or the importer's where regfs gives the source's) and the executable bit of an
output (`dvc list` always says false). Outputs of stages that never ran are named by `dvc list` only.
`-R` into sub-repositories needs a workspace pulled in them too.

`dvc list` runs in one long-lived Python process per test process (`DvcLister`): the entry point
of the `dvc` script, `dvc.cli.main(["list", ...])`, called once per listing with its standard
output and error sent to files, which saves importing DVC for each of the suite's listings.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import select
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from tests.registry import COMMAND_TIMEOUT, CommandFailed, Tools
from tests.trees import md5_hex

# Each `dvc list` costs a second or more: the table (its last column is the plain listing) and
# `-R --json` by default; callers add the others where they matter.
TEXT_FLAGS = (("--size", "--show-hash"),)
ALL_TEXT_FLAGS = ((), ("--size", "--show-hash"), ("--dvc-only", "-R"), ("--dvc-only", "--size", "--show-hash"))
# Inside a directory output `dvc list --size` leaves the sizes out (see above): no size column.
TEXT_FLAGS_INSIDE_OUTPUTS = (("--show-hash",),)


_WORKER = r"""
import json, os, sys
from dvc.cli import main
control = os.fdopen(os.dup(1), "w")
for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(request["out"], "wb") as out, open(request["err"], "wb") as err:
        os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
        try:
            os.chdir(request["cwd"])
            code = main(request["argv"])
        except SystemExit as exc:
            code = exc.code
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
    control.write(json.dumps(code) + "\n")
    control.flush()
"""


class DvcLister:
    """One Python process running `dvc list` commands on request, stopped at exit."""

    _instance: DvcLister | None = None

    def __init__(self, tools: Tools):
        self.tools = tools
        self.directory = Path(tempfile.mkdtemp(prefix="dvc-list-", dir=tools.workdir))
        self.numbers = itertools.count()
        self.process = subprocess.Popen([sys.executable, "-c", _WORKER], cwd=tools.workdir, env=tools.env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        atexit.register(self.stop)

    @classmethod
    def of(cls, tools: Tools) -> DvcLister:
        if cls._instance is None or cls._instance.tools is not tools or cls._instance.process.poll() is not None:
            cls._instance = cls(tools)
        return cls._instance

    def run(self, argv: list[str]) -> str:
        number = next(self.numbers)
        out, err = self.directory / f"{number}.out", self.directory / f"{number}.err"
        self.process.stdin.write(json.dumps({"argv": argv, "cwd": str(self.tools.workdir),
                                             "out": str(out), "err": str(err)}) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], COMMAND_TIMEOUT)
        if not ready:
            self.stop()
            raise CommandFailed(f"dvc {' '.join(argv)} did not finish within {COMMAND_TIMEOUT} s")
        code = json.loads(self.process.stdout.readline() or "null")
        if code != 0:
            raise CommandFailed(f"dvc {' '.join(argv)} exited {code}:\n{err.read_text(errors='replace')}")
        return out.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def dvc_list(tools: Tools, source: Path, rev: str, path: str | None, *flags: str) -> str:
    argv = ["list", str(source), *([path] if path else []), "--rev", rev, *flags]
    return DvcLister.of(tools).run(argv)


def regfs_ls(regfs_cli: Callable, source: Path, rev: str, path: str | None, cache_dir: Path, *flags: str) -> str:
    result = regfs_cli("ls", f"{source}@{rev}", *([path] if path else []), *flags, "--cache-dir", cache_dir)
    assert result.returncode == 0, result
    return result.stdout


def assert_ls_matches_dvc_list(tools: Tools, regfs_cli: Callable, source: Path, rev: str, workspace: Path,
                               cache_dir: Path, paths: Iterable[str | None] = (None,),
                               text_flags: Iterable[tuple[str, ...]] = TEXT_FLAGS) -> None:
    """`workspace`: the revision pulled (`Oracle.clone`), for what `dvc list` does not know."""
    for path in paths:
        where = f"{source.name}@{rev}:{path or '.'}"
        base = workspace / path if path else workspace
        expected_entries = json.loads(dvc_list(tools, source, rev, path, "-R", "--json"))
        # Outputs of a stage that never ran: `dvc list` names them (no hash, no size), but neither
        # `dvc pull` nor a mount can produce them.
        unpullable = {entry["path"] for entry in expected_entries
                      if entry["isout"] and entry["md5"] is None and not (base / entry["path"]).exists()}
        for flags in text_flags:
            expected = "".join(line for line in dvc_list(tools, source, rev, path, *flags).splitlines(True)
                               if line.split("  ")[-1].strip() not in unpullable)
            actual = regfs_ls(regfs_cli, source, rev, path, cache_dir, *flags)
            assert actual == expected, \
                f"regfs ls {' '.join(flags)} differs from dvc list at {where}:\n{actual}\n--- dvc list:\n{expected}"
        expected_entries = [entry for entry in expected_entries if entry["path"] not in unpullable]
        actual_entries = json.loads(regfs_ls(regfs_cli, source, rev, path, cache_dir, "-R", "--json"))
        assert [entry["path"] for entry in actual_entries] == [entry["path"] for entry in expected_entries], where
        for mine, theirs in zip(actual_entries, expected_entries):
            _assert_same_entry(mine, theirs, base, f"{where}: {mine} vs dvc list {theirs}")


def _assert_same_entry(mine: dict, theirs: dict, base: Path, what: str) -> None:
    assert list(mine) == list(theirs), what
    for key in ("isout", "isdir"):
        assert mine[key] == theirs[key], what
    on_disk = base / mine["path"]
    if mine["md5"] != theirs["md5"]:
        # Inside an imported directory `dvc list` gives no hash, or the importer's (which has its
        # own manifest in its cache) where regfs gives the source's (DVC 2's hash for a DVC 2
        # source): the bytes are the judge.
        data = on_disk.read_bytes()
        hashes = (md5_hex(data), md5_hex(data.replace(b"\r\n", b"\n")))
        assert mine["isout"] and mine["md5"] in hashes and theirs["md5"] in (None, *hashes), what
    if theirs["size"] is not None or mine["size"] is None:
        assert mine["size"] == theirs["size"], what
    else:
        assert mine["isout"] and mine["size"] == on_disk.stat().st_size, what
    is_exec = on_disk.is_file() and not on_disk.is_symlink() and os.access(on_disk, os.X_OK)
    assert mine["isexec"] is is_exec and (is_exec or not theirs["isexec"]), what
