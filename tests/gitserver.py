"""A Git server on 127.0.0.1 that tests can stop, restart and turn into a black hole.

`publish` makes a registry reachable as users reach one: a bare repository that a working clone
pushes to, served over git://. `GitServer` runs the real `git daemon` (the git:// protocol) over
one base directory on a fixed port; `stop()` makes the URL refuse connections, `blackhole()` puts
a listener on the port that accepts connections and never answers (a hung server, or a firewall
that lets the handshake through), and `start()` brings the real daemon back. `close()` ends every
process and socket.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.registry import Registry


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class GitServer:
    def __init__(self, base: Path, env: dict[str, str]):
        self.base, self._env = base, env
        self.port = free_port()
        self._daemon: subprocess.Popen | None = None
        self._hole: socket.socket | None = None

    def url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.port}/{name}"

    def start(self) -> None:
        self._close_hole()
        self._daemon = subprocess.Popen(
            ["git", "daemon", "--reuseaddr", "--export-all", "--listen=127.0.0.1", f"--port={self.port}",
             f"--base-path={self.base}", str(self.base)],
            env=self._env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self._daemon.poll() is not None:
                    raise RuntimeError(f"git daemon exited with {self._daemon.returncode}") from None
                time.sleep(0.05)
        raise RuntimeError(f"git daemon did not listen on port {self.port} within 30 s")

    def stop(self) -> None:
        """Nothing listens on the port any more: connections are refused."""
        self._close_hole()
        if self._daemon is not None:
            self._daemon.terminate()
            self._daemon.wait(timeout=30)
            self._daemon = None

    def blackhole(self) -> None:
        """A listener that completes TCP handshakes (the backlog) but never reads or answers."""
        self.stop()
        hole = socket.socket()
        hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hole.bind(("127.0.0.1", self.port))
        hole.listen(64)
        self._hole = hole

    def _close_hole(self) -> None:
        if self._hole is not None:
            self._hole.close()
            self._hole = None

    def close(self) -> None:
        self.stop()


@dataclass
class Published:
    """A working clone (`work`) that pushes to a bare repository (`bare`) served by `server`."""

    work: Registry
    bare: Path
    server: GitServer

    @property
    def url(self) -> str:
        return self.server.url(self.bare.name)

    def commit_and_push(self, message: str, files: dict[str, bytes], *, force: bool = False) -> str:
        """Write and `dvc add` the files, `dvc push`, commit, and push the branch to the bare repo."""
        for relpath, data in files.items():
            self.work.write(relpath, data)
        self.work.add(*files)
        self.work.push()
        commit_sha = self.work.commit(message)
        branch = self.work.git("rev-parse", "--abbrev-ref", "HEAD").strip()
        self.work.git("push", "-q", *(["--force"] if force else []), "origin", branch)
        return commit_sha


def publish(work: Registry, served: Path) -> Published:
    """A bare `served/registry.git` with `work`'s main branch, served over git:// (started)."""
    served.mkdir()
    bare = served / "registry.git"
    work.tools.run(["git", "init", "-q", "--bare", "-b", "main", bare], cwd=served)
    work.git("remote", "add", "origin", bare)
    work.git("push", "-q", "origin", "main")
    server = GitServer(served, work.tools.env)
    server.start()
    return Published(work, bare, server)
