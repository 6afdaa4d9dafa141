"""Real servers on 127.0.0.1 for the SSH, Azure Blob and GCS remotes of the suite.

- `SSHServer`: Debian's OpenSSH sshd in the foreground on a free port, with its own host key,
  sshd_config and authorized_keys in a temporary directory, key authentication only, logging in
  the user running the tests (`scripts/setup.sh --test` installs openssh-server).
- `Azurite`: the Azure storage emulator's blob service from npm, installed by `scripts/setup.sh
  --test` into tests/node/node_modules (pinned by tests/node/package-lock.json), in memory.
- `GCSServer`: gcp-storage-emulator (PyPI) in this process, in memory.

Each is started once per test session (fixtures in conftest.py) and stopped by PID or by its own
shutdown call; a server that does not come up fails the test with its log.
"""

from __future__ import annotations

import errno
import getpass
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.registry import PROJECT_ROOT, Registry, Tools, random_bytes

START_TIMEOUT = 60
AZURITE = PROJECT_ROOT / "tests" / "node" / "node_modules" / ".bin" / "azurite-blob"
# Azurite's well-known development account (public, the same in every Azurite).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def sample_registry(tools: Tools, path: Path, remote: str, url: str, options: list[tuple[str | Path, ...]],
                    seed: int, where: str) -> Registry:
    """A registry whose default remote `remote` at `url`, configured with `options` (the
    arguments of `dvc remote modify REMOTE`, such as `("--local", KEY, VALUE)`), holds what each
    remote type's registry holds, pushed and committed: a text file, an executable, a directory
    with nested and non-ASCII names, a directory of 20 small files (enough that a remote with paged
    listings lists the store for their sizes, see `Remote.sizes`), and an object of more than one
    ranged read."""
    registry = Registry.create(tools, path)
    registry.dvc("remote", "add", "-d", remote, url)
    for option in options:
        flags, (key, value) = option[:-2], option[-2:]
        registry.dvc("remote", "modify", *flags, remote, key, value)
    registry.write("plain.txt", f"stored {where}\n")
    registry.write("tool.sh", f"#!/bin/sh\necho {where}\n", executable=True)
    registry.write("blobs/one.bin", random_bytes(seed, 70_000))
    registry.write("blobs/nested/ééé.txt", "accents\n")
    for index in range(20):
        registry.write(f"many/{index:02d}.txt", f"{where}: file {index}\n" * (index + 1))
    registry.write("big.bin", random_bytes(seed + 1, 9 * 1024 * 1024 + seed))
    registry.add("plain.txt", "tool.sh", "blobs", "many", "big.bin")
    registry.push()
    registry.commit(f"data {where}")
    return registry


def read_fails_with_eio(mounted, relpath: str, remote: str) -> str:
    """Reading `relpath` through the mount gives EIO, and the daemon logs one line about it
    naming `remote`; that line."""
    with pytest.raises(OSError) as failed:
        (mounted / relpath).read_bytes()
    assert failed.value.errno == errno.EIO, failed.value
    (line,) = [line for line in mounted.error_lines() if f"read /{relpath}: " in line]
    assert f"remote '{remote}'" in line, line
    return line


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen | None, log: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    text = log.read_text(errors="replace") if log.exists() else ""
    pytest.fail(f"{what} did not start on 127.0.0.1:{port}:\n{text}", pytrace=False)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class SSHServer:
    """`sshd -D -e` for `user` with the key pair `keyfile` (and a second key it refuses)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.user = getpass.getuser()
        self.port = free_port()
        self.keyfile = workdir / "user_key"
        self.wrong_keyfile = workdir / "other_key"
        self.log = workdir / "sshd.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> SSHServer:
        sshd = shutil.which("sshd", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
        if sshd is None:
            pytest.fail("sshd not found: install Debian's openssh-server (scripts/setup.sh --test)", pytrace=False)
        for key in ("host_key", self.keyfile.name, self.wrong_keyfile.name):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.workdir / key], check=True)
        (self.workdir / "authorized_keys").write_text((self.workdir / "user_key.pub").read_text())
        config = self.workdir / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.workdir / 'host_key'}",
            f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}", "PubkeyAuthentication yes",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "PermitRootLogin prohibit-password", "StrictModes no", "PidFile none",
            "Subsystem sftp internal-sftp", "",
        ]))
        if os.geteuid() == 0:
            # sshd started by root wants its privilege separation directory, which Debian's
            # service unit would create (RuntimeDirectory=sshd).
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sshd, "-D", "-e", "-f", config], stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log)
        wait_for_port(self.port, self.process, self.log, "sshd")
        return self

    def url(self, path: Path) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


class Azurite:
    """The blob service of Azurite, in memory, answering any API version."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.log = workdir / "azurite.log"
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"

    def connection_string(self, key: str = AZURITE_KEY, endpoint: str | None = None) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};"
                f"BlobEndpoint={endpoint or self.endpoint};")

    def start(self) -> Azurite:
        if not AZURITE.exists():
            pytest.fail(f"{AZURITE} not found: run scripts/setup.sh --test (npm ci in tests/node)", pytrace=False)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [AZURITE, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--inMemoryPersistence",
                 "--skipApiVersionCheck", "--disableProductStyleUrl", "--silent"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        wait_for_port(self.port, self.process, self.log, "Azurite")
        return self

    def create_container(self, name: str) -> None:
        from azure.storage.blob import BlobServiceClient

        with BlobServiceClient.from_connection_string(self.connection_string()) as client:
            client.create_container(name)

    def delete_blob(self, container: str, name: str) -> None:
        from azure.storage.blob import BlobServiceClient

        with BlobServiceClient.from_connection_string(self.connection_string()) as client:
            client.get_blob_client(container, name).delete_blob()

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


class GCSServer:
    """gcp-storage-emulator's HTTP server in a thread of this process."""

    def __init__(self):
        from gcp_storage_emulator.server import create_server

        self.port = free_port()
        self._server = create_server("127.0.0.1", self.port, in_memory=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GCSServer:
        self._server.start()
        return self

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(f"{self.endpoint}/storage/v1/b?project=test", method="POST",
                                         data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200, response.status

    def stop(self) -> None:
        self._server.stop()
