"""A registry whose remote is SSH/SFTP: Debian's sshd on 127.0.0.1, key authentication.

The registry is built with the real `dvc push` (dvc-ssh). Branch `main` names the remote as
`ssh://USER@127.0.0.1:PORT/PATH`; branch `options` as `ssh://127.0.0.1/PATH` with DVC's `user`
and `port` options. The key is the user's (`keyfile`, as config.local would hold it). Failures
(refused login, nothing listening, a server that never answers, missing objects) each give one
error line naming the remote, and EIO through the mount.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.registry import Registry
from tests.servers import SSHServer, free_port, read_fails_with_eio, sample_registry
from tests.trees import assert_same_tree, snapshot


@dataclass
class SSHRegistry:
    registry: Registry
    server: SSHServer
    store: Path

    def options(self, keyfile: Path | None = None) -> list[str]:
        return ["--remote-config", f"sshstore.keyfile={keyfile or self.server.keyfile}"]


@pytest.fixture(scope="module")
def ssh_registry(tools, ssh_server, tmp_path_factory) -> SSHRegistry:
    parent = tmp_path_factory.mktemp("ssh")
    store = parent / "store"
    store.mkdir()
    registry = sample_registry(tools, parent / "registry", "sshstore", ssh_server.url(store),
                               [("--local", "keyfile", ssh_server.keyfile)], 31, "over SFTP")

    registry.checkout("options", new_branch=True)
    registry.dvc("remote", "modify", "sshstore", "url", f"ssh://127.0.0.1{store}")
    registry.dvc("remote", "modify", "sshstore", "user", ssh_server.user)
    registry.dvc("remote", "modify", "sshstore", "port", str(ssh_server.port))
    registry.commit("user and port as options")
    registry.checkout("main")
    return SSHRegistry(registry, ssh_server, store)


def test_ssh_registry_equals_the_oracle(ssh_registry, mount, oracle):
    source = ssh_registry.registry.path
    mounted = mount(source, *ssh_registry.options())
    local = [("sshstore", "keyfile", str(ssh_registry.server.keyfile))]
    for ref, expected in oracle.trees(source, ("main", "options"), local_config=local).items():
        assert_same_tree(snapshot(mounted / ref), expected, f"SSH @{ref}")


def test_a_refused_login_is_eio_through_the_mount(ssh_registry, mount):
    mounted = mount(f"{ssh_registry.registry.path}@main", *ssh_registry.options(ssh_registry.server.wrong_keyfile),
                    "--remote-config", "sshstore.retries=0", expect_errors=r"SSH login refused")
    read_fails_with_eio(mounted, "plain.txt", "sshstore")


@pytest.fixture(scope="module")
def silent_port():
    """A port that accepts connections and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("case", ["nothing listens", "silent server", "missing object"])
def test_each_failure_is_one_clear_line(ssh_registry, regfs_cli, tmp_path, silent_port, case):
    """(A refused login: test_a_refused_login_is_eio_through_the_mount.)"""
    server, registry = ssh_registry.server, ssh_registry.registry
    options = ssh_registry.options()
    if case == "nothing listens":
        options += ["--remote-config", f"sshstore.port={free_port()}"]
        expected = "SSH connection failed"
    elif case == "silent server":
        options += ["--remote-config", f"sshstore.port={silent_port}", "--remote-config", "sshstore.connect_timeout=1"]
        expected = "SSH connection failed"
    else:
        (tmp_path / "empty").mkdir()
        options += ["--remote-config", f"sshstore.url={server.url(tmp_path / 'empty')}"]
        expected = "is missing on remote 'sshstore'"
    result = regfs_cli("cat", f"{registry.path}@options", "blobs/one.bin", "--cache-dir", tmp_path / "cache",
                       *options, "--remote-config", "sshstore.retries=0")
    assert result.returncode != 0
    (line,) = result.error_lines()
    assert expected in line and "remote 'sshstore'" in line, line
