"""The `regfs` command line: mount, umount, status, stats, ls, get, cat, prefetch, cache.

Prints one clear line per error (`regfs: error: ...`) and exits non-zero; a traceback only with
--debug. Logging goes to stderr (the daemon's stderr is its log file).
"""

import argparse
import json
import logging
import os
import sys

from regfs import __version__
from regfs.address import parse_address
from regfs.daemon import (
    DAEMON_ARGV,
    DAEMON_COMMAND,
    MountOptions,
    check_mountpoint,
    mount_type,
    overrides,
    running_mounts,
    serve,
    spawn,
    unmount,
    wait_for_exit,
)
from regfs.dvcconfig import MAX_REQUESTS
from regfs.errors import RegfsError, UsageError
from regfs.readahead import DEFAULT_FILES as DEFAULT_READAHEAD_FILES

logger = logging.getLogger("regfs")


def default_cache_dir() -> str:
    return os.environ.get("REGFS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "regfs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regfs", description="Mount revisions of a DVC data registry.")
    parser.add_argument("--version", action="version", version=f"regfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    mount = commands.add_parser("mount", help="mount a registry (every revision, or URL@REV)")
    mount.add_argument("source", metavar="URL[@REV]")
    mount.add_argument("mountpoint")
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    mount.add_argument("--refresh", type=float, default=60.0, metavar="SECONDS",
                       help="re-fetch the registry's refs this often (default 60; 0 = never)")
    mount.add_argument("--log-file", help="daemon log (default: <cache-dir>/regfs/logs/<mountpoint>.log)")
    mount.add_argument("--allow-other", action="store_true",
                       help="let other users read the mount (FUSE allow_other; modes still apply)")
    mount.add_argument("-o", dest="mount_options", action="append", default=[], metavar="OPTIONS",
                       help="mount(8)-style options: allow_other, cache_dir=DIR, refresh=SECONDS, remote=NAME, "
                            "remote_config=NAME.KEY=VALUE, log_file=PATH, shared=group, cache_size=SIZE, "
                            "max_requests=N, dir_readahead=N, stream, debug")
    mount.add_argument("--max-requests", type=int, default=MAX_REQUESTS, metavar="N",
                       help=f"requests to remotes in flight at once, at most (default {MAX_REQUESTS})")
    mount.add_argument("--dir-readahead", type=int, default=DEFAULT_READAHEAD_FILES, metavar="N",
                       help="files of a directory output fetched ahead of a reader going through them in "
                            f"order, at most (default {DEFAULT_READAHEAD_FILES}; 0 = only what reads ask for)")
    mount.add_argument("--stream", action="store_true",
                       help="serve a large object's bytes as they arrive, before its hash is checked at the "
                            "end (a reader may get bytes that then prove wrong; see README)")
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    _add_cache_size(mount)
    _add_common(mount)

    umount = commands.add_parser("umount", aliases=["unmount"],
                                 help="unmount and wait for the daemon to exit")
    umount.add_argument("mountpoint")
    umount.add_argument("--debug", action="store_true")

    status = commands.add_parser("status", help="list this user's running mounts")
    status.add_argument("--json", action="store_true")
    status.add_argument("--debug", action="store_true")

    stats = commands.add_parser("stats", help="a mount's counters: fetches, cache hits, bytes, errors")
    stats.add_argument("mountpoint")
    stats.add_argument("--json", action="store_true")
    stats.add_argument("--debug", action="store_true")

    ls = commands.add_parser("ls", help="list a revision's tree, like `dvc list`, without mounting")
    ls.add_argument("source", metavar="URL[@REV]")
    ls.add_argument("path", nargs="?", default="")
    ls.add_argument("-R", "--recursive", action="store_true", help="list files recursively")
    ls.add_argument("--dvc-only", action="store_true", help="list DVC outputs only")
    ls.add_argument("--json", action="store_true", help="print a JSON list of entries")
    ls.add_argument("--size", action="store_true", help="show sizes")
    ls.add_argument("--show-hash", action="store_true", help="show each output's hash")
    _add_common(ls)
    _add_copy_commands(commands)
    _add_cache_commands(commands)
    _add_prefetch_command(commands)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", default=None,
                        help="object cache, DVC layout (default $REGFS_CACHE_DIR or ~/.cache/regfs)")
    parser.add_argument("--remote", help="use this remote instead of the registry's default")
    parser.add_argument("--remote-config", action="append", default=[], metavar="NAME.KEY=VALUE",
                        help="set a remote option, as `dvc remote modify --local` would (repeatable)")
    parser.add_argument("--shared", choices=["group"],
                        help="share the cache with the group, as DVC's cache.shared=group (umask 002, setgid dirs)")
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [DAEMON_COMMAND] and DAEMON_ARGV in os.environ:  # a daemon `spawn` started
        argv = json.loads(os.environ.pop(DAEMON_ARGV))
    if argv and not argv[0].startswith("-") and argv[0] not in _COMMANDS:
        argv = ["mount", *argv]  # mount.fuse3(8) runs `regfs SOURCE MOUNTPOINT -o OPTIONS`
    args = build_parser().parse_args(argv)
    if args.command == "mount" and args.mount_options:
        try:
            args = build_parser().parse_args(expand_mount_options(argv))
        except UsageError as exc:
            print(f"regfs: error: {exc}", file=sys.stderr)
            return 1
    if getattr(args, "shared", None) == "group":
        os.umask(0o002)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "mount":
            return _mount(args, argv)
        if args.command in ("umount", "unmount"):
            return _umount(args.mountpoint)
        if args.command == "status":
            return _status(args.json)
        if args.command == "stats":
            return _stats(args.mountpoint, args.json)
        if args.command in ("get", "cat"):
            return _copy_command(args)
        if args.command == "cache":
            return _cache_command(args)
        if args.command == "prefetch":
            return _prefetch(args)
        return _ls(args)
    except (RegfsError, ValueError) as exc:
        if args.debug:
            logger.exception("failed")
        print(f"regfs: error: {exc}", file=sys.stderr)
        return 1


def _mount(args, argv: list[str]) -> int:
    cache_dir = os.path.abspath(args.cache_dir or default_cache_dir())
    options = MountOptions(address=parse_address(args.source), mountpoint=os.path.abspath(args.mountpoint),
                           cache_dir=cache_dir, refresh=args.refresh, remote=args.remote,
                           remote_config=args.remote_config, log_file=args.log_file, debug=args.debug,
                           allow_other=args.allow_other, shared_group=args.shared == "group",
                           cache_size=_cache_size(args), max_requests=args.max_requests, stream=args.stream,
                           dir_readahead=args.dir_readahead)
    if args.max_requests < 1:
        raise UsageError(f"--max-requests must be at least 1, not {args.max_requests}")
    if args.dir_readahead < 0:
        raise UsageError(f"--dir-readahead must be 0 or more, not {args.dir_readahead}")
    overrides(args.remote, args.remote_config)  # reject malformed options before daemonizing
    if args.foreground:
        if args.log_file and args.ready_fd is None:  # a spawned daemon's stderr is its log already
            _log_to(args.log_file)
        return serve(options, args.ready_fd)
    check_mountpoint(options.mountpoint)
    return spawn([*argv, "--cache-dir", cache_dir], options)


_COMMANDS = ("mount", "umount", "unmount", "ls", "status", "stats", "get", "cat", "prefetch", "cache")
# Generic mount(8) options that mean nothing more for a read-only FUSE mount (mount.fuse3(8)).
_GENERIC_MOUNT_OPTIONS = {"rw", "ro", "defaults", "auto", "noauto", "user", "users", "nouser", "_netdev",
                          "nofail", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
                          "relatime", "async", "sync", "default_permissions"}
_VALUED_MOUNT_OPTIONS = {"cache_dir", "refresh", "remote", "remote_config", "log_file", "shared",
                         "cache_size", "max_requests", "dir_readahead"}


def expand_mount_options(argv: list[str]) -> list[str]:
    """`-o a,b=c` (mount(8) style) rewritten as regfs's own options."""
    expanded, items = [], iter(argv)
    for arg in items:
        if arg == "-o" or (arg.startswith("-o") and len(arg) > 2):
            text = next(items, "") if arg == "-o" else arg[2:]
            expanded += _mount_option_args(text)
        else:
            expanded.append(arg)
    return expanded


def _mount_option_args(text: str) -> list[str]:
    args = []
    for item in filter(None, text.split(",")):
        key, has_value, value = item.partition("=")
        if key in _GENERIC_MOUNT_OPTIONS or key.startswith("x-") or key == "comment":
            continue
        if key == "allow_other" and not has_value:
            args.append("--allow-other")
        elif key in ("debug", "stream") and not has_value:
            args.append("--" + key)
        elif key in _VALUED_MOUNT_OPTIONS and has_value:
            args += ["--" + key.replace("_", "-"), value]
        else:
            raise UsageError(f"unknown mount option {item!r}")
    return args


def _status(as_json: bool) -> int:
    mounts = running_mounts()
    if as_json:
        print(json.dumps(mounts, indent=2))
        return 0
    for record in mounts:
        revision = f"@{record['revision']}" if record.get("revision") else ""
        print(f"{record['mountpoint']}\t{record['source']}{revision}\tpid {record['pid']}\t"
              f"cache {record['cache_dir']}")
    return 0


def _stats(mountpoint: str, as_json: bool) -> int:
    try:
        report = json.loads(os.getxattr(mountpoint, "user.regfs.stats"))
    except OSError as exc:
        raise UsageError(f"{mountpoint} is not a regfs mount ({exc.strerror})") from exc
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    for key, value in report.items():
        if key != "remotes":
            print(f"{key:18} {value}")
    for name, entry in report["remotes"].items():
        print(f"{name}: " + ", ".join(f"{key} {value}" for key, value in entry.items()))
    return 0


def _log_to(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.getLogger().handlers[0].formatter)
    logging.getLogger().addHandler(handler)


def _umount(mountpoint: str) -> int:
    mountpoint = os.path.abspath(mountpoint)
    if mount_type(mountpoint) is None:
        raise UsageError(f"{mountpoint} is not mounted")
    unmount(mountpoint)
    wait_for_exit(mountpoint)
    return 0


def _ls(args) -> int:
    from regfs.listing import format_table, list_entries

    address = parse_address(args.source)
    cache_dir = os.path.abspath(args.cache_dir or default_cache_dir())
    entries = list_entries(address, args.path, cache_dir, recursive=args.recursive, dvc_only=args.dvc_only,
                           config=overrides(args.remote, args.remote_config), shared_group=args.shared == "group")
    # Byte for byte what `dvc list` prints: compact ASCII JSON, a table, or one name per line.
    if args.json:
        print(json.dumps(entries))
    elif entries and (args.size or args.show_hash):
        print(format_table(entries, args.size, args.show_hash))
    elif entries:
        print("\n".join(entry["path"] for entry in entries))
    return 0


def _add_copy_commands(commands) -> None:
    get = commands.add_parser("get", help="copy a file or directory of a revision here, like `dvc get`")
    get.add_argument("source", metavar="URL[@REV]")
    get.add_argument("path")
    get.add_argument("-o", "--out", help="destination (default: the path's name, in the current directory)")
    get.add_argument("-f", "--force", action="store_true", help="replace an existing destination")
    _add_common(get)
    cat = commands.add_parser("cat", help="write a file of a revision to standard output")
    cat.add_argument("source", metavar="URL[@REV]")
    cat.add_argument("path")
    _add_common(cat)


def _copy_command(args) -> int:
    from regfs import copy

    # stderr is for the progress line and errors: the per-object INFO lines of a mount's log are noise
    logging.getLogger().setLevel(logging.DEBUG if args.debug else logging.WARNING)
    address, config = parse_address(args.source), overrides(args.remote, args.remote_config)
    cache_dir, shared_group = os.path.abspath(args.cache_dir or default_cache_dir()), args.shared == "group"
    if args.command == "get":
        target = copy.destination(args.path, args.out, args.force)  # refuse before fetching anything
        progress = copy.Progress(sys.stderr, live=sys.stderr.isatty(), label=f"regfs: {target}: ")
        copy.copy_out(copy.open_revision(address, cache_dir, config, shared_group), args.path, target, progress)
        return 0
    view = copy.open_revision(address, cache_dir, config, shared_group)
    try:
        copy.write_to(view, args.path, sys.stdout.buffer)
        sys.stdout.flush()
    except BrokenPipeError:  # `regfs cat ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _add_cache_size(mount: argparse.ArgumentParser) -> None:
    mount.add_argument("--cache-size", metavar="SIZE",
                       help="keep the cache's objects under SIZE (500M, 20G, 1.5T, bytes): evict the least "
                            "recently used")


def _cache_size(args) -> int | None:
    from regfs.cachectl import parse_size

    return None if args.cache_size is None else parse_size(args.cache_size)


def _add_cache_commands(commands) -> None:
    cache = commands.add_parser("cache", help="the object cache: status, gc, verify")
    actions = cache.add_subparsers(dest="cache_command", required=True)
    status = actions.add_parser("status", help="objects, bytes, temporary files, bytes per remote")
    status.add_argument("--json", action="store_true")
    gc = actions.add_parser("gc", help="evict least recently used objects down to SIZE (safe while mounts run)")
    gc.add_argument("--max-size", required=True, metavar="SIZE", help="500M, 20G, 1.5T, or bytes (0: all)")
    gc.add_argument("-v", "--verbose", action="store_true", help="print each evicted object")
    verify = actions.add_parser("verify", help="re-hash every object, drop corrupt ones (exit 1 if any)")
    verify.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="objects hashed at once (default: the number of CPUs)")
    for action in (status, gc, verify):
        action.add_argument("--cache-dir", default=None, help="the cache (default $REGFS_CACHE_DIR or ~/.cache/regfs)")
        action.add_argument("--shared", choices=["group"], help="a cache shared with the group (umask 002)")
        action.add_argument("--debug", action="store_true")


def _cache_command(args) -> int:
    from regfs import cachectl

    cache = cachectl.open_cache(os.path.abspath(args.cache_dir or default_cache_dir()), args.shared == "group")
    if args.cache_command == "status":
        return _cache_status(cachectl.status(cache), args.json)
    if args.cache_command == "gc":
        return _cache_gc(cachectl.evict(cache, cachectl.parse_size(args.max_size)), args.verbose)
    bad = checked = 0
    for outcome in cachectl.verify(cache, args.jobs):
        checked += 1
        if not outcome.ok:
            bad += 1
            print(f"{'dropped ' if outcome.dropped else ''}{outcome.item.ref.relpath}: {outcome.problem}")
    print(f"verified {checked} objects: {bad} bad", file=sys.stderr)
    return 1 if bad else 0


def _cache_status(report: dict, as_json: bool) -> int:
    from regfs.cachectl import format_size

    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"cache            {report['cache_dir']}")
    print(f"objects          {report['objects']}, {format_size(report['bytes'])} ({report['bytes']} bytes)")
    print(f"temporary files  {report['temporary_files']}, {format_size(report['temporary_bytes'])}")
    print(f"regfs state      {format_size(report['state_bytes'])} (indexes, Git mirrors, packed manifests, logs)")
    for origin, entry in [*report["remotes"].items(), ("unknown origin", report["unknown_origin"])]:
        print(f"  {origin}: {entry['objects']} objects, {format_size(entry['bytes'])}")
    return 0


def _cache_gc(result, verbose: bool) -> int:
    from regfs.cachectl import format_size

    for item in result.removed if verbose else ():
        print(f"evicted {item.ref.relpath} ({item.size} bytes)")
    print(f"evicted {len(result.removed)} objects ({format_size(result.removed_bytes)}); the cache holds "
          f"{result.objects} objects, {format_size(result.bytes)}")
    for failure in result.failures:
        print(f"regfs: error: cannot evict {failure}", file=sys.stderr)
    return 1 if result.failures else 0


def _add_prefetch_command(commands) -> None:
    from regfs.prefetch import DEFAULT_JOBS

    prefetch = commands.add_parser(
        "prefetch", help="fetch files into the cache before they are read (paths in a mount, or URL@REV PATH...)",
        usage="%(prog)s [options] PATH...  |  URL@REV PATH...  |  --files-from FILE (PATH | URL@REV [PATH])")
    prefetch.add_argument("targets", nargs="+", metavar="TARGET",
                          help="files or directories inside a regfs mount; or URL@REV and paths in that revision")
    prefetch.add_argument("--files-from", metavar="FILE",
                          help="the files to fetch, one path a line relative to the one PATH (or to URL@REV), "
                               "fetched in this order; '-' reads standard input")
    prefetch.add_argument("-j", "--jobs", type=int, default=DEFAULT_JOBS,
                          help=f"files fetched at a time (default {DEFAULT_JOBS})")
    prefetch.add_argument("--progress-interval", type=float, default=10.0, metavar="SECONDS",
                          help="when stderr is not a terminal, a progress line at most this often "
                               "(default 10; 0: after every file)")
    _add_common(prefetch)


def _prefetch(args) -> int:
    from regfs import copy, prefetch

    logging.getLogger().setLevel(logging.DEBUG if args.debug else logging.WARNING)
    cache_dir, shared_group = os.path.abspath(args.cache_dir or default_cache_dir()), args.shared == "group"
    given = [option for option, value in (("--cache-dir", args.cache_dir), ("--remote", args.remote),
                                          ("--remote-config", args.remote_config), ("--shared", args.shared))
             if value]
    progress = copy.Progress(sys.stderr, live=sys.stderr.isatty(), label="regfs: prefetch: ", verb="fetched",
                             every=args.progress_interval)
    return prefetch.run(args.targets, args.files_from, args.jobs, progress,
                        lambda address: copy.open_revision(address, cache_dir,
                                                           overrides(args.remote, args.remote_config),
                                                           shared_group),
                        given)
