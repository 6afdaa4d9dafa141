"""`regfs ls`: a revision's entries as `dvc list` shows them, without mounting anything."""

from regfs.address import Address
from regfs.dvcconfig import Config
from regfs.namespace import MountView, attr_of
from regfs.registry import Context, Registry
from regfs.tree import BlobNode, DirNode, LazyDirNode, LinkNode, Node


def list_entries(address: Address, path: str, cache_dir: str, recursive: bool = False,
                 config: Config | None = None, shared_group: bool = False) -> list[dict]:
    registry = Registry(address.url, Context(cache_dir, shared_group), config)
    registry.update_or_reuse()
    commit_sha = registry.mirror.resolve(address.revision or "HEAD")
    view = MountView(registry, commit_sha)
    path = path.strip("/")
    node, mtime = view.resolve(path)
    if not isinstance(node, DirNode):
        return [_entry(path.rsplit("/", 1)[-1], node, mtime, is_output=not _is_git(node))]
    entries: list[dict] = []
    _collect(node, "", mtime, recursive, entries, in_output=isinstance(node, LazyDirNode))
    return sorted(entries, key=lambda entry: entry["path"])  # whole-path order, as `dvc list -R`


def _collect(directory: DirNode, prefix: str, mtime: int, recursive: bool, entries: list[dict],
             in_output: bool) -> None:
    for name, node in sorted(directory.children().items()):
        is_output = in_output or not _is_git(node)
        if recursive and isinstance(node, DirNode):
            _collect(node, f"{prefix}{name}/", mtime, recursive, entries,
                     in_output or isinstance(node, LazyDirNode))
        else:
            entries.append(_entry(prefix + name, node, mtime, is_output))


def _is_git(node: Node) -> bool:
    return isinstance(node, (BlobNode, LinkNode)) or type(node) is DirNode


def _entry(path: str, node: Node, mtime: int, is_output: bool) -> dict:
    attr = attr_of(node, mtime)
    entry = {"path": path, "isout": is_output, "isdir": attr.kind == "dir", "isexec": attr.is_exec}
    if attr.kind != "dir":
        entry["size"] = attr.size
    return entry


