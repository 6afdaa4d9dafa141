"""`regfs ls`: a revision's entries as `dvc list` shows them (DVC 3's dvc/repo/ls.py), unmounted.

An entry is `{"isout", "isdir", "isexec", "size", "md5", "path"}`, in that order, sorted by path:
Git files and directories (Git's sizes: a directory's is its tree object's, as DVC's Git
filesystem reports it), DVC outputs with their recorded hash and size, and what lies inside
directory outputs. Like `dvc list`, it leaves out what `.dvcignore` excludes, `.dvc/` directories,
and sub-repositories inside the one listed (they are listed when named as PATH); `-R` lists files
only, `--dvc-only` only outputs and the directories leading to them.

Where `dvc list` knows less than the mount shows, this tells what the mount shows: the size of a
file inside a directory output (DVC 3's `.dir` manifests do not record it, so `dvc list` leaves it
empty) and the executable bit of an output (always false in `dvc list`).
"""

import posixpath
import unicodedata

from regfs.address import Address
from regfs.dvcconfig import Config
from regfs.registry import Context, Registry, Snapshot
from regfs.tree import DirNode, Node, lookup


def list_entries(address: Address, path: str, cache_dir: str, recursive: bool = False, dvc_only: bool = False,
                 config: Config | None = None, shared_group: bool = False) -> list[dict]:
    registry = Registry(address.url, Context(cache_dir, shared_group), config)
    registry.update_or_reuse()
    commit_sha = registry.mirror.resolve(address.revision or "HEAD")
    lister = _Lister(registry, registry.tree(commit_sha), dvc_only)
    path = posixpath.normpath(path.strip("/")) if path.strip("/") else ""
    node = lookup(lister.snapshot.root, path)
    if not isinstance(node, DirNode):
        return [lister.entry(path, node, posixpath.basename(path))]
    entries: list[dict] = []
    lister.collect(path, node, "", recursive, entries)
    return sorted(entries, key=lambda entry: entry["path"])


class _Lister:
    def __init__(self, registry: Registry, snapshot: Snapshot, dvc_only: bool):
        self.registry, self.snapshot, self.dvc_only = registry, snapshot, dvc_only
        self._tree_ids = {item.path: item.blob_id for item in registry.mirror.walk(snapshot.commit_sha)
                          if item.kind == "dir"}
        self._holds_outputs: dict[str, bool] = {}

    def collect(self, path: str, directory: DirNode, prefix: str, recursive: bool, entries: list[dict]) -> None:
        for name, node in sorted(directory.children().items()):
            child = posixpath.join(path, name) if path else name
            if not self._shown(child, node):
                continue
            if recursive and isinstance(node, DirNode):
                self.collect(child, node, f"{prefix}{name}/", recursive, entries)
            else:
                entries.append(self.entry(child, node, prefix + name))

    def _shown(self, path: str, node: Node) -> bool:
        if self._output_of(path) is not None:
            return True
        if self.snapshot.dvcignore.is_ignored(path, isinstance(node, DirNode)):
            return False
        return not self.dvc_only or (isinstance(node, DirNode) and self._holds_output(path, node))

    def _holds_output(self, path: str, directory: DirNode) -> bool:
        """Whether a Git directory leads to an output (`dvc list --dvc-only` shows it then)."""
        if path not in self._holds_outputs:
            self._holds_outputs[path] = any(
                f"{path}/{name}" in self.snapshot.outputs
                or (type(node) is DirNode and self._holds_output(f"{path}/{name}", node))
                for name, node in directory.children().items())
        return self._holds_outputs[path]

    def _output_of(self, path: str) -> str | None:
        """The path of the output that `path` is or lies in, if any."""
        while path:
            if path in self.snapshot.outputs:
                return path
            path = posixpath.dirname(path)
        return None

    def entry(self, path: str, node: Node, shown_as: str) -> dict:
        output_path = self._output_of(path)
        output = self.snapshot.outputs.get(path)
        is_dir = isinstance(node, DirNode)
        if output is not None:  # as recorded in its metafile (none for `dvc import --no-download`)
            size, md5 = output.size, output.object_id
        elif output_path is not None:  # inside a directory output: from its manifest
            ref = getattr(node, "ref", None)
            size, md5 = (None, None) if is_dir else (node.size, ref.object_id if ref else None)
        elif is_dir:  # Git's, or none with --dvc-only (DVC's index has no size for it)
            tree_id = self._tree_ids.get(path)
            size = None if self.dvc_only or tree_id is None else self.registry.mirror.object_size(tree_id)
            md5 = None
        else:
            size, md5 = node.size, None
        return {"isout": output_path is not None, "isdir": is_dir, "isexec": bool(node.is_exec) and not is_dir,
                "size": size, "md5": md5, "path": shown_as or "."}


def format_table(entries: list[dict], with_size: bool, with_hash: bool) -> str:
    """The table `dvc list --size/--show-hash` prints (tabulate's plain format: columns two
    spaces apart, the size column aligned right, cells stripped, no trailing spaces)."""
    rows = []
    for entry in entries:
        row = []
        if with_size:
            size = entry["size"]
            row.append("" if size is None or (size <= 0 and entry["isdir"]) else natural_size(size))
        if with_hash:
            row.append(entry["md5"] or "-")
        row.append(entry["path"].strip())
        rows.append([cell.strip() for cell in row])
    widths = [max(_width(row[column]) for row in rows) for column in range(len(rows[0]))] if rows else []
    lines = []
    for row in rows:
        cells = [" " * (widths[0] - _width(cell)) + cell if with_size and column == 0
                 else cell + " " * (widths[column] - _width(cell))
                 for column, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def natural_size(size: int) -> str:
    """DVC's naturalsize: bytes below 1024, else tqdm.format_sizeof with powers of 1024."""
    if size < 1024:
        return f"{size:.0f}"
    value = float(size)
    for unit in ("", "k", "M", "G", "T", "P", "E", "Z"):
        if abs(value) < 999.5:
            if abs(value) < 99.95:
                return f"{value:1.2f}{unit}" if abs(value) < 9.995 else f"{value:2.1f}{unit}"
            return f"{value:3.0f}{unit}"
        value /= 1024
    return f"{value:3.1f}Y"


def _width(text: str) -> int:
    """Terminal columns of `text`, as tabulate counts them with wcwidth."""
    return sum(0 if unicodedata.combining(char) else 2 if unicodedata.east_asian_width(char) in "WF" else 1
               for char in text)
