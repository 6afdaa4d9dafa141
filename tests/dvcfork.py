"""A fork server for the DVC command line: `dvc` commands without DVC's start-up cost.

A `dvc` process spends most of its CPU importing DVC, its plugins and their dependencies (about
0.7 s of the 1-1.5 s a small command costs), and the suite runs hundreds of them. This server,
`python tests/dvcfork.py SOCKET` run by the python of DVC's virtualenv in the suite's clean
environment, imports them once; for each command it forks a child that runs the real entry
point of the `dvc` script, `dvc.cli.main(argv)`, in the requested directory with stdin on
/dev/null and stdout and stderr written to the files the client names, and answers the child's
exit status. The child is a fresh single-threaded process: the server starts no threads and
opens no repository, so nothing but imported modules is shared between commands.

The server ends at the end of its standard input: when the client closes it, or dies.

Protocol, one command per connection: the client sends one JSON line {"argv", "cwd", "stdout",
"stderr"}; the server answers one line with the child's pid, then one with its exit status.

`DvcForkServer` is the client side: it starts the server and runs commands through it.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# What `dvc add`, `push`, `pull`, `import`, `remote` ... import on their first use (DVC 2 and 3).
PRELOAD = ("dvc.cli", "dvc.cli.parser", "dvc.repo", "dvc.repo.add", "dvc.repo.push", "dvc.repo.pull",
           "dvc.repo.fetch", "dvc.repo.imp", "dvc.repo.imp_url", "dvc.repo.checkout", "dvc.dependency",
           "dvc.output", "dvc.stage", "dvc.config", "dvc_data.index", "dvc_objects.fs", "scmrepo.git")
# The remote plugins the suite's registries use, where installed (the DVC 2 virtualenv has none).
PLUGINS = ("dvc_s3", "s3fs", "dvc_ssh", "dvc_azure", "dvc_gs", "dvc_http")


def _run_child(connection: socket.socket, request: dict) -> None:
    """In the forked child: become the `dvc` process of `request` and exit with its status."""
    status = 255
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        connection.sendall(f"{os.getpid()}\n".encode())
        os.chdir(request["cwd"])
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for source, target in ((null, 0), (out, 1), (err, 2)):
            os.dup2(source, target)
            os.close(source)
        sys.argv = ["dvc", *request["argv"]]
        from dvc.cli import main

        status = main(request["argv"])
    except SystemExit as exit_:
        status = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 - what Python does with an uncaught one: traceback, exit 1
        import traceback

        traceback.print_exc()
        status = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        try:
            connection.sendall(f"{status & 0xFF}\n".encode())
        finally:
            os._exit(status & 0xFF)


def _reap(*_) -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def serve(socket_path: str) -> None:
    import importlib.util

    for name in PRELOAD:
        importlib.import_module(name)
    for name in PLUGINS:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    import threading

    assert threading.active_count() == 1, "the fork server must not start threads"
    # Children are reaped as they end (so their CPU time is counted as the server's, like a
    # subprocess's); each child restores SIGCHLD for the commands it runs.
    signal.signal(signal.SIGCHLD, _reap)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(64)
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [])
        if sys.stdin in ready:  # end of input: the client closed it, or died (no server outlives it)
            return
        connection, _ = listener.accept()
        with connection.makefile("rb") as lines:
            request = json.loads(lines.readline())
        if os.fork() == 0:
            listener.close()
            _run_child(connection, request)
        connection.close()


class DvcForkServer:
    """Client of a fork server run by `interpreter` (the `python` of the `dvc` script's
    virtualenv) with `env` (the suite's clean environment)."""

    def __init__(self, interpreter: Path, workdir: Path, env: dict[str, str]):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.socket_path = str(workdir / "dvc.sock")
        self._numbers = itertools.count()
        self._process = subprocess.Popen([interpreter, __file__, self.socket_path], env=env,
                                         cwd=workdir, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        with self._process.stdout as ready:
            if ready.readline() != b"ready\n":
                raise RuntimeError(f"the dvc fork server did not start (exit {self._process.wait()})")

    def run(self, argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        number = next(self._numbers)
        out, err = self.workdir / f"{number}.out", self.workdir / f"{number}.err"
        request = {"argv": argv[1:], "cwd": os.fspath(cwd), "stdout": str(out), "stderr": str(err)}
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(self.socket_path)
            client.sendall(json.dumps(request).encode() + b"\n")
            with client.makefile("rb") as answers:
                pid = int(answers.readline())
                client.settimeout(max(deadline - time.monotonic(), 0.001))
                try:
                    line = answers.readline()
                except TimeoutError:
                    os.kill(pid, signal.SIGKILL)
                    raise subprocess.TimeoutExpired(argv, timeout) from None
        returncode = int(line) if line else -signal.SIGKILL
        completed = subprocess.CompletedProcess(argv, returncode, out.read_bytes(), err.read_bytes())
        out.unlink()
        err.unlink()
        return completed

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait(timeout=30)
        os.unlink(self.socket_path)


if __name__ == "__main__":
    serve(sys.argv[1])
