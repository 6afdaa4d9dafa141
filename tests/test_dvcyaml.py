"""`dvc.yaml` resolution (regfs.dvcyaml) against DVC's own resolver, `dvc.parsing.DataResolver`.

Each case is a `dvc.yaml` and the files beside it, written to a directory; DVC's resolver (the
code `dvc pull` runs, called in process) and regfs's resolve it, and must agree on the generated
stage names, each stage's `wdir` and its outputs with their flags, or both refuse the stage.
"""

from __future__ import annotations

import os
import posixpath
import types

import pytest

from regfs.dvcyaml import resolve_pipeline

FOREACH_FROM_PARAMS = ({"params.yaml": "models:\n  small: {size: 1}\n  big: {size: 2}\nflag: true\n"}, {
    "stages": {"m": {"foreach": "${models}", "do": {
        "wdir": "models/${key}", "cmd": "x",
        "outs": ["${key}-${item.size}.bin", {"flag-${flag}.json": {"cache": False, "remote": "r-${key}"}}]}}}})
FOREACH_LISTS = ({}, {
    "stages": {
        "plain": {"foreach": ["a", 1, 2.5, True], "do": {"cmd": "x", "outs": ["p-${item}"]}},
        "dicts": {"foreach": [{"n": "one"}, {"n": "two"}], "do": {"cmd": "x", "outs": ["${item.n}/"]}},
        "nested": {"foreach": [["a", "b"]], "do": {"cmd": "x", "outs": ["n-${item[1]}"]}}}})
MATRIX = ({"params.yaml": "levels: [1, 2]\n"}, {
    "stages": {"g": {"matrix": {"axis": ["x", "y"], "level": "${levels}", "conf": [{"a": 1}, {"a": 2}]},
                     "cmd": "x", "outs": ["out/${key}-${item.axis}${item.level}-${item.conf.a}.txt"]}}})
VARS = ({"params.yaml": "p: 1\n", "vars.yaml": "v: {deep: [d0, d1]}\nother: 2\n", "sub/v.json": '{"j": "J"}',
         "sub/w/stage.toml": "[t]\nname = 'T'\n"}, {
    "vars": [{"inline": "I"}, "vars.yaml:v", "sub/v.json", "params.yaml"],
    "stages": {
        "s": {"wdir": "sub/w", "vars": ["stage.toml:t", {"local": "L"}], "cmd": "x",
              "outs": ["${inline}-${v.deep[1]}-${j}-${t.name}-${local}-${p}", "\\${literal}"],
              "metrics": [{"m-${p}.json": {"cache": False}}], "plots": ["plot.csv"]}}})
FAILURES = ({"params.yaml": "p: 1\n", "other.yaml": "p: 2\n"}, {
    "stages": {
        "missing": {"cmd": "x", "outs": ["${nope}"]},
        "composite": {"cmd": "x", "outs": ["${items}"], "vars": [{"items": [1, 2]}]},
        "redefined": {"cmd": "x", "vars": ["other.yaml"], "outs": ["o"]},
        "reserved": {"foreach": [1], "do": {"cmd": "x", "vars": [{"item": 2}], "outs": ["o"]}},
        "fine": {"cmd": "x", "outs": ["o-${p}"]}}})


def dvc_resolution(directory, spec) -> dict:
    """Stage name -> (wdir, [(path, flags)]) or the string "error", by DVC's DataResolver."""
    from dvc.fs import LocalFileSystem
    from dvc.parsing import DataResolver

    repo = types.SimpleNamespace(fs=LocalFileSystem(), config={})
    resolver = DataResolver(repo, directory, spec)
    result = {}
    for name in resolver.get_keys():
        try:
            (stage,) = resolver.resolve_one(name).values()
        except Exception:  # noqa: BLE001 - any refusal of DVC's is the expected answer
            result[name] = "error"
            continue
        outputs = []
        for section in ("outs", "metrics", "plots"):
            for entry in stage.get(section) or []:
                outputs += list(entry.items()) if isinstance(entry, dict) else [(entry, {})]
        result[name] = (posixpath.normpath(stage.get("wdir") or "."), outputs)
    return result


def regfs_resolution(directory, spec) -> dict:
    def read_file(path):
        try:
            with open(os.path.join(directory, path), "rb") as file:
                return file.read()
        except FileNotFoundError:
            return None

    pipeline = resolve_pipeline(spec, "dvc.yaml", read_file)
    result = {stage.name: (stage.wdir, [(out.path, out.flags) for out in stage.outputs])
              for stage in pipeline.stages}
    for what, _why in pipeline.skipped:
        result[what.split(":", 1)[1]] = "error"
    return result


@pytest.mark.parametrize("case", [FOREACH_FROM_PARAMS, FOREACH_LISTS, MATRIX, VARS, FAILURES],
                         ids=["foreach-params", "foreach-lists", "matrix", "vars", "failures"])
def test_resolution_matches_dvc(case, tmp_path, monkeypatch):
    files, spec = case
    for relpath, text in files.items():
        (tmp_path / relpath).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relpath).write_text(text)
    monkeypatch.chdir(tmp_path)
    expected = dvc_resolution(".", spec)
    actual = regfs_resolution(".", spec)
    assert actual == expected, "regfs and DVC resolve the dvc.yaml differently"
    assert any(value != "error" for value in actual.values())


YAML_SCALARS = """\
stages:
  s:
    foreach: [yes, no, on, off, true, 010, 0o10, 0x1f, 1e3, 1.5, .5, -3, 1:20, 2001-02-03, ~, 1_000, '010']
    do: {cmd: x, outs: ['o-${item}']}
on: [.inf, -.inf, 0b11, +4, False, NULL]
"""


def test_yaml_scalars_as_dvc_reads_them():
    """DVC reads dvc.yaml with ruamel.yaml (YAML 1.2): `yes` is a string, `010` is ten."""
    import yaml
    from dvc.utils.serialize import parse_yaml

    from regfs.dvcyaml import Yaml12Loader

    assert yaml.load(YAML_SCALARS, Loader=Yaml12Loader) == parse_yaml(YAML_SCALARS, "dvc.yaml")
