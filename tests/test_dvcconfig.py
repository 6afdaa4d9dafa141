"""`.dvc/config` parsing (regfs.dvcconfig) against DVC's own loader (`dvc.config.Config.load_file`,
configobj underneath), called in process on the configobj quirks users write by hand: comments
(whole-line and inline, also right after a value), quotes, lists, mixed-case section and remote
names, a `remote://` URL, unknown sections."""

from __future__ import annotations

from regfs.dvcconfig import parse_config

QUIRKY_CONFIG = """\
# written by hand
[core]
    remote = MixedCase  # the default, in another case than its section
    autostage = true
['remote "MixedCase"']
    url = "../../store"  # quoted, then a comment
    endpointurl = http://127.0.0.1:9/p#fragment-is-a-comment
    ssl_verify = 'false'
    listed = one, two, 'three, four'
    single = one,
    empty = ""
    nothing =
    triple = '''tq'''
[ 'remote "base"' ]
    url = /abs/base
['Remote "Derived"']
    url = remote://Base/sub
["remote 'single-quoted'"]
    url = /not/a/remote/for/dvc
[cache]
    dir = /somewhere
"""


def test_config_matches_dvc(tmp_path):
    from dvc.config import Config as DvcConfig

    path = tmp_path / "config"
    path.write_text(QUIRKY_CONFIG)
    expected = DvcConfig.load_file(str(path))
    actual = parse_config(QUIRKY_CONFIG)
    assert actual.core == expected["core"]
    assert actual.remotes == expected["remote"]
    resolved = parse_config(QUIRKY_CONFIG, "/r/registry/.dvc")  # relative to the config's directory
    assert resolved.remote(None).url == "/r/store"
    derived = resolved.remote("Derived")
    assert (derived.url, derived.options) == ("/abs/base/sub", {})
