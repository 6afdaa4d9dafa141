"""The `regfs` command line: mount, umount, ls.

Prints one clear line per error (`regfs: error: ...`) and exits non-zero; a traceback only with
--debug. Logging goes to stderr (the daemon's stderr is its log file).
"""

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys

from regfs import __version__
from regfs.address import parse_address
from regfs.daemon import MountOptions, check_mountpoint, overrides, serve, spawn, wait_for_exit
from regfs.errors import RegfsError, UsageError

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
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    _add_common(mount)

    umount = commands.add_parser("umount", help="unmount and wait for the daemon to exit")
    umount.add_argument("mountpoint")
    umount.add_argument("--debug", action="store_true")

    ls = commands.add_parser("ls", help="list a revision's tree, like `dvc list`, without mounting")
    ls.add_argument("source", metavar="URL[@REV]")
    ls.add_argument("path", nargs="?", default="")
    ls.add_argument("-R", "--recursive", action="store_true", help="list files recursively")
    ls.add_argument("--json", action="store_true", help="print a JSON list of entries")
    _add_common(ls)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", default=None,
                        help="object cache, DVC layout (default $REGFS_CACHE_DIR or ~/.cache/regfs)")
    parser.add_argument("--remote", help="use this remote instead of the registry's default")
    parser.add_argument("--remote-config", action="append", default=[], metavar="NAME.KEY=VALUE",
                        help="set a remote option, as `dvc remote modify --local` would (repeatable)")
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "mount":
            return _mount(args, argv)
        if args.command == "umount":
            return _umount(args.mountpoint)
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
                           remote_config=args.remote_config, log_file=args.log_file, debug=args.debug)
    overrides(args.remote, args.remote_config)  # reject malformed options before daemonizing
    if args.foreground:
        if args.log_file and args.ready_fd is None:  # a spawned daemon's stderr is its log already
            _log_to(args.log_file)
        return serve(options, args.ready_fd)
    check_mountpoint(options.mountpoint)
    return spawn([*argv, "--cache-dir", cache_dir], options)


def _log_to(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.getLogger().handlers[0].formatter)
    logging.getLogger().addHandler(handler)


def _umount(mountpoint: str) -> int:
    mountpoint = os.path.abspath(mountpoint)
    if not _is_mounted(mountpoint):
        raise UsageError(f"{mountpoint} is not mounted")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    command = [tool, "-u", mountpoint] if tool else ["umount", mountpoint]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["unknown reason"])[-1]
        raise RegfsError(f"cannot unmount {mountpoint}: {reason}")
    wait_for_exit(mountpoint)
    return 0


def _is_mounted(mountpoint: str) -> bool:
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        return any(line.split()[1].encode().decode("unicode_escape") == mountpoint for line in mounts)


def _ls(args) -> int:
    from regfs.listing import list_entries

    address = parse_address(args.source)
    cache_dir = os.path.abspath(args.cache_dir or default_cache_dir())
    entries = list_entries(address, args.path, cache_dir, recursive=args.recursive,
                           config=overrides(args.remote, args.remote_config))
    if args.json:
        print(json.dumps(entries, indent=2, ensure_ascii=False))
    else:
        for entry in entries:
            print(entry["path"])
    return 0
