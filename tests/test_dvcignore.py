"""`.dvcignore` rules (regfs.dvcignore) against DVC's own `DvcIgnoreFilter`, called in process.

A tree of directories, `.dvcignore` files (nested, with negations, anchored and `**` patterns, an
ignored `.dvcignore`, a file inside an ignored directory re-included in vain) and a
sub-repository is written to disk; for every path in it, regfs and DVC must agree on whether it
is ignored.
"""

from __future__ import annotations

import os

from regfs.dvcignore import DvcIgnore

DVCIGNORE_FILES = {
    "": "# comment\n*.tmp\n/top-only.txt\nlogs/\n!keep.tmp\nsub/deep/*.csv\n",
    "data/": "*.bin\n!important.bin\n/local.txt\nnested/\n**/cache\n\\#hash.txt\n",
    "data/raw/": "!*.bin\n*.txt\n!/keep.txt\n",
    "logs/": "!*\n",  # inside an ignored directory: never read
    "quiet/": ".dvcignore\n*.txt\n",  # ignores itself: not read either
    "subrepo/": "*.csv\n",
}
FILES = [
    "a.tmp", "keep.tmp", "top-only.txt", "x/top-only.txt", "logs/a.txt", "x/logs/b.txt",
    "sub/deep/t.csv", "x/sub/deep/t.csv", "data/a.bin", "data/important.bin", "data/local.txt",
    "data/x/local.txt", "data/nested/f", "data/x/cache/f", "data/cache", "data/#hash.txt",
    "data/raw/r.bin", "data/raw/r.txt", "data/raw/keep.txt", "data/raw/sub/keep.txt", "data/raw/a.tmp",
    "quiet/q.txt", "plain.txt", "subrepo/s.csv", "subrepo/s.tmp", "subrepo/data/a.bin",
]
SUBREPO = "subrepo/"


def test_ignore_rules_match_dvc(tmp_path):
    from dvc.fs import LocalFileSystem
    from dvc.ignore import DvcIgnoreFilter

    for directory, text in DVCIGNORE_FILES.items():
        (tmp_path / directory).mkdir(parents=True, exist_ok=True)
        (tmp_path / directory / ".dvcignore").write_text(text)
    for relpath in FILES:
        (tmp_path / relpath).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relpath).write_text("x")
    (tmp_path / SUBREPO / ".dvc").mkdir()

    regfs_rules = DvcIgnore({directory: text.encode() for directory, text in DVCIGNORE_FILES.items()},
                            ["", SUBREPO])
    dvc_filters = {root: DvcIgnoreFilter(LocalFileSystem(), os.path.join(tmp_path, root).rstrip("/"))
                   for root in ("", SUBREPO)}
    directories = {os.path.dirname(relpath) for relpath in FILES} - {""}
    disagreements = []
    for relpath, is_dir in [(path, False) for path in FILES] + [(path, True) for path in sorted(directories)]:
        root = SUBREPO if relpath.startswith(SUBREPO) else ""
        check = dvc_filters[root].is_ignored_dir if is_dir else dvc_filters[root].is_ignored_file
        expected = check(os.path.join(tmp_path, relpath))
        if regfs_rules.is_ignored(relpath, is_dir) != expected:
            disagreements.append(f"{relpath}{'/' if is_dir else ''}: DVC says ignored={expected}")
    assert not disagreements, disagreements
    assert regfs_rules.repo_root("subrepo/data/a.bin") == SUBREPO
    assert sum(regfs_rules.is_ignored(path) for path in FILES) >= 10  # the rules do exclude things
