"""A registry whose remote is Azure Blob storage: Azurite (the Azure storage emulator) on 127.0.0.1.

The registry is built with the real `dvc push` (dvc-azure), the remote `azure://registry/prefix`
with the account's `connection_string` given as config.local would hold it. The mount equals
`dvc pull`, and the key appears nowhere a user can see. Failures (a wrong key, a missing
container, missing objects, nothing listening) each give one error line naming the remote, and
EIO through the mount.
"""

from __future__ import annotations

import pytest

from tests.registry import Registry
from tests.servers import AZURITE_KEY, free_port, read_fails_with_eio, sample_registry
from tests.test_credentials import assert_no_secret, exposed
from tests.trees import assert_same_tree, snapshot

CONTAINER = "registry"
WRONG_KEY = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXk="


@pytest.fixture(scope="module")
def azure_registry(tools, azurite, tmp_path_factory) -> Registry:
    azurite.create_container(CONTAINER)
    return sample_registry(tools, tmp_path_factory.mktemp("azure") / "registry", "azstore",
                           f"azure://{CONTAINER}/prefix", [("--local", "connection_string", azurite.connection_string())],
                           41, "in a blob container")


def connection(azurite, **kwargs) -> list[str]:
    return ["--remote-config", f"azstore.connection_string={azurite.connection_string(**kwargs)}"]


def test_azure_registry_equals_the_oracle_and_hides_the_key(azure_registry, azurite, mount, oracle, regfs_cli):
    mounted = mount(f"{azure_registry.path}@main", *connection(azurite), "--debug")
    expected = oracle.tree(azure_registry.path, "main",
                           local_config=[("azstore", "connection_string", azurite.connection_string())])
    assert_same_tree(snapshot(mounted.path), expected, "Azure registry @main")
    assert_no_secret(exposed(mounted, regfs_cli), AZURITE_KEY)


def test_a_wrong_key_is_eio_through_the_mount(azure_registry, azurite, mount, regfs_cli):
    mounted = mount(f"{azure_registry.path}@main", *connection(azurite, key=WRONG_KEY),
                    "--remote-config", "azstore.retries=0", expect_errors=r"authentication failed")
    line = read_fails_with_eio(mounted, "plain.txt", "azstore")
    assert "HTTP 403" in line, line
    assert_no_secret({"daemon log": mounted.log_text()}, WRONG_KEY)
    assert "http_logging_policy" not in mounted.log_text(), "azure-core's request log is in the daemon's"


@pytest.mark.parametrize("case", ["missing container", "missing object", "nothing listens"])
def test_each_failure_is_one_clear_line(azure_registry, azurite, regfs_cli, tmp_path, case):
    """(A wrong key: test_a_wrong_key_is_eio_through_the_mount.)"""
    options = connection(azurite)
    if case == "missing container":
        options += ["--remote-config", "azstore.url=azure://no-such-container/prefix"]
        expected = "container 'no-such-container' does not exist"
    elif case == "missing object":
        options += ["--remote-config", f"azstore.url=azure://{CONTAINER}/empty-prefix"]
        expected = "is missing on remote 'azstore'"
    else:
        options = connection(azurite, endpoint=f"http://127.0.0.1:{free_port()}/devstoreaccount1")
        expected = "ServiceRequestError"
    result = regfs_cli("cat", f"{azure_registry.path}@main", "blobs/one.bin", "--cache-dir", tmp_path / "cache",
                       *options, "--remote-config", "azstore.retries=0")
    assert result.returncode != 0
    (line,) = result.error_lines()
    assert expected in line and "remote 'azstore'" in line, line
    assert_no_secret({"regfs cat output": str(result)}, AZURITE_KEY, WRONG_KEY)
