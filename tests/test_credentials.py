"""Credentials never leak: an S3 secret key and session token, an HTTP basic-auth password (given
as options, as `config.local` would hold them, or as `user:password@` in the URL) appear in no
daemon log (also with --debug), no CLI output (also after an auth failure or with an unreachable
remote, also with --debug), not in `regfs stats --json`, `regfs status --json`, nor any xattr.

Each secret is looked for as written, percent-encoded, and inside a basic-auth header (base64).
"""

from __future__ import annotations

import base64
import errno
import json
import os
from pathlib import Path
from urllib.parse import quote

import pytest

from regfs.address import public_url
from tests.httpserver import HTTPRemoteServer
from tests.registry import Registry, random_bytes
from tests.trees import assert_same_tree, snapshot

BUCKET = "credentials-bucket"
S3_KEY_ID = "AKIAREGFSTESTKEY"
S3_SECRET = "s3-secret-Zq8x1fW2"
S3_TOKEN = "s3-session-token-Hk4m9"
HTTP_USER = "reader"
HTTP_PASSWORD = "pw-T0p!sec/ret:@x"  # characters that a URL must percent-encode
WRONG_PASSWORD = "pw-wrong-Vb7n3"
DEAD_ENDPOINT = "http://127.0.0.1:9"  # the discard port: connections are refused


def forms(secret: str) -> list[str]:
    return [secret, quote(secret, safe=""),
            base64.b64encode(f"{HTTP_USER}:{secret}".encode()).decode()]


def assert_no_secret(texts: dict[str, str], *secrets: str) -> None:
    leaks = [f"{form!r} in {where}" for where, text in texts.items()
             for secret in secrets for form in forms(secret) if form in text]
    assert not leaks, "credentials leaked: " + "; ".join(leaks)


def exposed(mounted, regfs_cli) -> dict[str, str]:
    """Everything a user or an admin can see of a mount: its CLI output and log, stats, status,
    and every xattr of every entry."""
    texts = {"mount output": str(mounted.result), "daemon log": mounted.log_text()}
    status = regfs_cli("status", "--json")
    (pid,) = [record["pid"] for record in json.loads(status.stdout) if record["mountpoint"] == str(mounted.path)]
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:  # what `ps` shows every user
        texts["daemon command line"] = cmdline.read().replace(b"\0", b" ").decode()
    assert str(mounted.path) in texts["daemon command line"]
    stats = regfs_cli("stats", mounted.path, "--json")
    assert stats.returncode == 0, stats
    texts["regfs stats --json"] = str(stats)
    texts["regfs status --json"] = str(regfs_cli("status", "--json"))
    for directory, dirnames, filenames in os.walk(mounted.path):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(directory, name)
            for attribute in os.listxattr(path, follow_symlinks=False):
                texts[f"xattr {attribute} of {path}"] = os.getxattr(path, attribute, follow_symlinks=False).decode()
    assert any("user.regfs.url" in where for where in texts), "no xattr was read"
    return texts


# -- S3 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_registry(tools, s3_server, tmp_path_factory) -> Registry:
    s3_server.create_bucket(BUCKET)
    registry = Registry.create(tools, tmp_path_factory.mktemp("credentials-s3") / "registry",
                               remotes={"s3store": f"s3://{BUCKET}/prefix"}, default_remote="s3store")
    registry.dvc("remote", "modify", "s3store", "endpointurl", s3_server.endpoint_url)
    registry.write("data.bin", random_bytes(501, 50_000))
    registry.write("dir/a.txt", "a\n")
    registry.add("data.bin", "dir")
    registry.push()
    registry.commit("data on S3")
    return registry


S3_OPTIONS = ["--remote-config", f"s3store.access_key_id={S3_KEY_ID}",
              "--remote-config", f"s3store.secret_access_key={S3_SECRET}",
              "--remote-config", f"s3store.session_token={S3_TOKEN}"]


def test_s3_secrets_stay_out_of_logs_stats_status_and_xattrs(s3_registry, mount, oracle, regfs_cli):
    mounted = mount(f"{s3_registry.path}@main", *S3_OPTIONS, "--debug")
    assert_same_tree(snapshot(mounted.path), oracle.tree(s3_registry.path, "main"), "S3 with credentials")
    texts = exposed(mounted, regfs_cli)
    assert " DEBUG " in texts["daemon log"], "the daemon did not log at DEBUG level"
    assert texts[_xattr_key(texts, "data.bin")].startswith(f"s3://{BUCKET}/prefix/files/md5/")
    assert_no_secret(texts, S3_SECRET, S3_TOKEN)


@pytest.mark.parametrize("debug", [False, True])
def test_s3_secrets_stay_out_of_cli_errors(s3_registry, regfs_cli, tmp_path, debug):
    """An unreachable endpoint: `regfs cat` fails with one error line naming the remote."""
    result = regfs_cli("cat", f"{s3_registry.path}@main", "data.bin", "--cache-dir", tmp_path / "cache",
                       *S3_OPTIONS, "--remote-config", f"s3store.endpointurl={DEAD_ENDPOINT}",
                       "--remote-config", "s3store.retries=0", *(["--debug"] if debug else []))
    assert result.returncode != 0
    (line,) = result.error_lines()
    assert "remote 's3store'" in line, line
    assert_no_secret({"regfs cat output": str(result)}, S3_SECRET, S3_TOKEN)


# -- HTTP --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http_registry(tools, tmp_path_factory):
    """Objects behind an HTTP server that wants basic auth; the committed config names the server
    and no credentials (they are the user's, in config.local for DVC)."""
    parent = tmp_path_factory.mktemp("credentials-http")
    server = HTTPRemoteServer(parent, credentials=(HTTP_USER, HTTP_PASSWORD)).start()
    try:
        registry = Registry.create(tools, parent / "registry", remotes={"store": "../store"})
        registry.dvc("remote", "add", "-d", "web", f"{server.url}/store")
        registry.write("data.bin", random_bytes(502, 40_000))
        registry.write("dir/b.txt", "b\n")
        registry.add("data.bin", "dir")
        registry.push("-r", "store")
        registry.commit("data behind HTTP with basic auth")
        yield registry, server
    finally:
        server.stop()


def _basic(password: str) -> list[str]:
    return ["--remote-config", "web.auth=basic", "--remote-config", f"web.user={HTTP_USER}",
            "--remote-config", f"web.password={password}"]


def _in_url(server: HTTPRemoteServer, password: str) -> list[str]:
    authority = f"{quote(HTTP_USER, safe='')}:{quote(password, safe='')}@"
    return ["--remote-config", f"web.url={server.url.replace('http://', 'http://' + authority)}/store"]


@pytest.mark.parametrize("given", ["options", "url"])
def test_http_password_stays_out_of_logs_stats_status_and_xattrs(http_registry, given, mount, oracle, regfs_cli):
    registry, server = http_registry
    expected = oracle.tree(registry.path, "main", local_config=[
        ("web", "auth", "basic"), ("web", "user", HTTP_USER), ("web", "password", HTTP_PASSWORD)])
    credentials = _basic(HTTP_PASSWORD) if given == "options" else _in_url(server, HTTP_PASSWORD)
    mounted = mount(f"{registry.path}@main", *credentials, "--debug")
    assert_same_tree(snapshot(mounted.path), expected, f"HTTP with basic auth given as {given}")
    texts = exposed(mounted, regfs_cli)
    assert " DEBUG " in texts["daemon log"], "the daemon did not log at DEBUG level"
    assert texts[_xattr_key(texts, "data.bin")].startswith(f"{server.url}/store/files/md5/")
    assert_no_secret(texts, HTTP_PASSWORD)
    assert f"{HTTP_USER}@" not in "".join(texts.values())


@pytest.mark.parametrize("given", ["options", "url"])
def test_a_wrong_password_gives_eio_and_stays_out_of_the_log(http_registry, given, mount, regfs_cli):
    registry, server = http_registry
    credentials = _basic(WRONG_PASSWORD) if given == "options" else _in_url(server, WRONG_PASSWORD)
    mounted = mount(f"{registry.path}@main", *credentials, "--debug", expect_errors=r"HTTP 401 Unauthorized")
    with pytest.raises(OSError) as failed:
        (mounted / "data.bin").read_bytes()
    assert failed.value.errno == errno.EIO
    assert len([line for line in mounted.error_lines() if "read /data.bin: " in line]) == 1
    assert_no_secret(exposed(mounted, regfs_cli), WRONG_PASSWORD)  # listing dir/ fails too: more lines


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("given", ["options", "url"])
def test_http_password_stays_out_of_cli_errors(http_registry, regfs_cli, tmp_path, given, debug):
    registry, server = http_registry
    credentials = _basic(WRONG_PASSWORD) if given == "options" else _in_url(server, WRONG_PASSWORD)
    result = regfs_cli("cat", f"{registry.path}@main", "data.bin", "--cache-dir", tmp_path / "cache",
                       *credentials, *(["--debug"] if debug else []))
    assert result.returncode != 0
    (line,) = result.error_lines()
    assert "HTTP 401" in line and "remote 'web'" in line, line
    assert_no_secret({"regfs cat output": str(result)}, WRONG_PASSWORD)


def _xattr_key(texts: dict[str, str], relpath: str) -> str:
    (key,) = [key for key in texts if key.startswith("xattr user.regfs.url of ") and key.endswith("/" + relpath)]
    return key


def test_unsupported_http_auth_is_a_clear_config_error(http_registry, regfs_cli, tmp_path):
    registry, _ = http_registry
    result = regfs_cli("cat", f"{registry.path}@main", "data.bin", "--cache-dir", tmp_path / "cache",
                       "--remote-config", "web.auth=digest", "--remote-config", f"web.user={HTTP_USER}",
                       "--remote-config", f"web.password={HTTP_PASSWORD}")
    assert result.returncode != 0
    (line,) = result.error_lines()
    assert "auth = digest is not supported" in line, line
    assert_no_secret({"regfs cat output": str(result)}, HTTP_PASSWORD)


def test_a_malformed_remote_config_does_not_echo_its_value(s3_registry, regfs_cli, tmp_path: Path):
    """A mistyped `--remote-config` (no remote name) is refused without printing the secret."""
    result = regfs_cli("cat", f"{s3_registry.path}@main", "data.bin", "--cache-dir", tmp_path / "cache",
                       "--remote-config", f"secret_access_key={S3_SECRET}")
    assert result.returncode != 0
    (line,) = result.error_lines()
    assert "NAME.KEY=VALUE" in line, line
    assert_no_secret({"regfs cat output": str(result)}, S3_SECRET)


@pytest.mark.parametrize("url, shown", [
    ("https://reader:pw%40x@data.example.com:8443/dvc", "https://data.example.com:8443/dvc"),
    ("https://token@data.example.com/dvc", "https://data.example.com/dvc"),
    ("s3://bucket/prefix", "s3://bucket/prefix"),
    ("/srv/store", "/srv/store"),
])
def test_remote_urls_are_shown_without_credentials(url, shown):
    assert public_url(url) == shown


# -- the registry's own URL ----------------------------------------------------------------------

GIT_SECRET = "gitT0ken-never-shown"


def test_a_registry_url_with_a_token_is_shown_without_it(tools, mount, oracle, regfs_cli, tmp_path):
    """`git://reader:TOKEN@host/...` (as `https://TOKEN@github.com/...` would be): the mirror is
    fetched with it, and it appears nowhere: not in the log, stats, status, xattrs, nor in the
    mount table every user can read."""
    from tests.gitserver import publish

    work = Registry.create(tools, tmp_path / "work", remotes={"store": str(tmp_path / "store")},
                           default_remote="store")
    work.write("data.bin", random_bytes(90, 5000))
    work.add("data.bin")
    work.push()
    work.commit("data")
    published = publish(work, tmp_path / "served")
    try:
        url = published.url.replace("git://", f"git://reader:{GIT_SECRET}@")
        mounted = mount(f"{url}@main", "--debug")
        assert_same_tree(snapshot(mounted.path), oracle.tree(work.path, "main"), "mount over git:// with a token")
        texts = exposed(mounted, regfs_cli)
        with open("/proc/self/mountinfo") as mountinfo:
            texts["/proc/self/mountinfo"] = mountinfo.read()
        assert published.url.removeprefix("git://") in texts["regfs stats --json"]
        assert_no_secret(texts, GIT_SECRET)
    finally:
        published.server.close()
