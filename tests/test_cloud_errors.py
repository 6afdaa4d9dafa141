"""How the SSH, Azure and GCS backends classify their libraries' errors (no server needed): what
is worth a retry, what is permanent, what is a missing object; and the cloud-versioning fields of
metafiles, parsed from literals. The end-to-end tests (test_ssh, test_azure, test_gcs,
test_cloud_versioning) see the same failures from real servers.
"""

import asyncio

import asyncssh
import pytest
from azure.core import exceptions as azure
from gcsfs.retry import HttpError

from regfs import backends
from regfs.cloudbackends import open_backend
from regfs.dvcconfig import RemoteSpec
from regfs.dvcmeta import parse_dvc_file, parse_pipeline

TRANSIENT, PERMANENT, MISSING = "transient", "permanent", "missing"


def azure_status(status: int, code: str) -> azure.HttpResponseError:
    error = azure.HttpResponseError(message=f"status {status}")
    error.status_code, error.error_code = status, code
    return error


CASES = [
    ("ssh", asyncssh.ConnectionLost("connection lost"), TRANSIENT),
    ("ssh", asyncssh.DisconnectError(11, "bye"), TRANSIENT),
    ("ssh", ConnectionRefusedError(111, "Connect call failed"), TRANSIENT),
    ("ssh", asyncio.TimeoutError(), TRANSIENT),
    ("ssh", asyncssh.PermissionDenied("Permission denied"), PERMANENT),
    ("ssh", asyncssh.sftp.SFTPPermissionDenied("denied"), PERMANENT),
    ("ssh", asyncssh.sftp.SFTPNoSuchFile("no such file"), MISSING),
    ("azure", azure.ServiceRequestError("cannot connect"), TRANSIENT),
    ("azure", azure.ServiceResponseError("reset"), TRANSIENT),
    ("azure", azure_status(503, "ServerBusy"), TRANSIENT),
    ("azure", azure_status(403, "AuthorizationFailure"), PERMANENT),
    ("azure", azure.ClientAuthenticationError("bad token"), PERMANENT),
    ("azure", azure_status(400, "InvalidQueryParameterValue"), PERMANENT),
    ("azure", azure.ResourceNotFoundError("BlobNotFound"), MISSING),
    ("gs", HttpError({"code": 503, "message": "backend error"}), TRANSIENT),
    ("gs", HttpError({"code": 429, "message": "rate limit"}), TRANSIENT),
    ("gs", HttpError({"code": 401, "message": "Invalid Credentials"}), PERMANENT),
    ("gs", OSError("Forbidden: b/x/o/y\nno access"), PERMANENT),
]
URLS = {"ssh": "ssh://user@127.0.0.1:22/store", "azure": "azure://container/prefix",
        "gs": "gs://bucket/prefix"}
OPTIONS = {"azure": {"connection_string": "DefaultEndpointsProtocol=http;AccountName=a;AccountKey=a2V5;"
                                          "BlobEndpoint=http://127.0.0.1:9/a;"},
           "gs": {"allow_anonymous_login": "true"}}


@pytest.mark.parametrize("scheme, error, kind", CASES, ids=[f"{c[0]}-{type(c[1]).__name__}-{c[2]}" for c in CASES])
def test_library_errors_are_classified(scheme, error, kind):
    backend, _ = open_backend(scheme, RemoteSpec("r", URLS[scheme], OPTIONS.get(scheme, {})), 1.0, 1.0)
    translated = backend._translate(error)
    assert translated is not None, "left untranslated"
    if kind == MISSING:
        assert isinstance(translated, FileNotFoundError), translated
        return
    assert isinstance(translated, backends.Fault), translated
    assert backends.transient(translated) == (kind == TRANSIENT), backends.reason(translated)
    assert "\n" not in backends.reason(translated)


def test_connection_string_keys_count_as_secrets():
    options = {"connection_string": "AccountName=a;AccountKey=c2VjcmV0;SharedAccessSignature=sv=1&sig=abc",
               "account_key": "k2", "passphrase": "p"}
    secrets = backends.option_secrets(options)
    assert {"c2VjcmV0", "sv=1&sig=abc", "k2", "p", options["connection_string"]} <= set(secrets)


def test_cloud_versioned_outputs_in_both_forms():
    text = """
outs:
- path: data
  hash: md5
  files:
  - relpath: a.txt
    md5: 0123456789abcdef0123456789abcdef
    size: 3
    cloud:
      Versioned: {etag: x, version_id: v-a}
      other: {etag: x, version_id: v-b}
  - relpath: sub/b.txt
    md5: 1111111111111111111111111111111a
    size: 4
    version_id: 1700000000000000
    etag: y
- path: model.bin
  md5: 2222222222222222222222222222222b
  size: 5
  version_id: flat-v
"""
    directory, model = parse_dvc_file(text, "d.dvc").outputs
    assert directory.is_dir and directory.object_id is None
    assert [(e.relpath, e.size, e.versions) for e in directory.files] == [
        ("a.txt", 3, (("versioned", "v-a"), ("other", "v-b"))), ("sub/b.txt", 4, ((None, "1700000000000000"),))]
    assert model.versions == ((None, "flat-v"),) and not model.is_dir


def test_cloud_versioned_dvc_lock_outputs():
    lock = """
schema: '2.0'
stages:
  make:
    cmd: make
    outs:
    - path: made.txt
      hash: md5
      md5: 3333333333333333333333333333333c
      size: 5
      cloud: {r: {etag: e, version_id: v1}}
"""
    pipeline = "stages:\n  make:\n    cmd: make\n    outs:\n    - made.txt\n"
    (made,) = parse_pipeline(pipeline, lock, "dvc.lock").outputs
    assert made.versions == (("r", "v1"),)


@pytest.mark.parametrize("files", ["[{relpath: ../x, md5: 0123456789abcdef0123456789abcdef}]",
                                   "[{relpath: a, md5: nothex}]", "not-a-list",
                                   "[{relpath: a, md5: 0123456789abcdef0123456789abcdef, cloud: [1]}]",
                                   "[{relpath: a, md5: 0123456789abcdef0123456789abcdef, version_id: {x: 1}}]"])
def test_malformed_cloud_versioned_entries_skip_the_output(files):
    parsed = parse_dvc_file(f"outs:\n- path: data\n  files: {files}\n", "d.dvc")
    assert not parsed.outputs and len(parsed.skipped) == 1, parsed
