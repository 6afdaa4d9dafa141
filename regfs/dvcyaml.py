"""The stages of a `dvc.yaml` as DVC resolves them: `foreach`/`matrix` groups and `${}` variables.

DVC drives a pipeline from its `dvc.yaml`: each stage, and each stage that a `foreach` or `matrix`
group generates (`name@key`), declares its outputs (`outs`, `metrics`, `plots`) and their flags
(`cache`, `push`, `remote`) there; `dvc.lock` only records their hashes, keyed by the same stage
name and declared path. So a reader resolves the `dvc.yaml` as far as names, `wdir` and output
paths need it, mirroring `dvc/parsing` (DVC 3): variables come from `params.yaml` beside the
`dvc.yaml` (if there is one), then the top-level `vars` (inline mappings and `FILE[:KEY,...]`
files, relative to the `dvc.yaml`), then a stage's own `vars` (relative to its `wdir`); `${a.b}`,
`${a[0]}` select from them, `\\${` is a literal. `cmd` is never resolved.

Pure: files are read through the `read_file` callable given (path relative to the commit root ->
bytes, or None if absent). A stage that DVC would fail to resolve is reported with its reason in
`Pipeline.skipped`; the other stages still resolve.
"""

import json
import posixpath
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import product
from typing import ClassVar

import yaml

from regfs.errors import MetafileError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: TOML vars files are refused with a clear error
    tomllib = None

ReadFile = Callable[[str], bytes | None]

# DVC's KEYCRE with `[^}\n]` for `.*?`: the same first `}`, and no rescan of a long line.
_INTERPOLATION = re.compile(r"(?<!\\)\$\{(?P<inner>[^}\n]*)\}")
_MAX_TEMPLATE = 4096  # longer strings are not resolved (no DVC pipeline needs them)
_MAX_GENERATED = 10_000  # stages one foreach/matrix group may generate
_OUTPUT_SECTIONS = ("outs", "metrics", "plots")
_MAX_VALUES = 100_000  # values one `${}` resolution of foreach/matrix data may walk (YAML aliases)
_PRIMITIVES = (str, int, float, bool)
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 80, 80


@dataclass(frozen=True)
class StageOutput:
    path: str  # as declared (resolved), relative to the stage's wdir; the key into dvc.lock
    flags: dict  # cache, push, remote, ... as written in dvc.yaml


@dataclass(frozen=True)
class Stage:
    name: str  # `name`, or `group@key` for generated stages
    wdir: str  # relative to the directory of the dvc.yaml, normalised ("." for itself)
    outputs: tuple[StageOutput, ...]


@dataclass
class Pipeline:
    stages: list[Stage] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (stage, why)


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's core schema for scalars, as DVC reads `dvc.yaml` and
    params files (ruamel.yaml): only `true`/`false` are booleans (`yes`, `no`, `on`, `off` are
    strings, and so stage names), `010` is ten, `1e3` is a float, `1:20` is a string."""

    yaml_implicit_resolvers: ClassVar[dict] = {
        first: [(tag, regex) for tag, regex in resolvers
                if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node).replace("_", "")
        sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text.removeprefix("+"))
        base = {"0o": 8, "0x": 16, "0b": 2}.get(digits[:2], 10)
        return sign * int(digits[2:] if base != 10 else digits, base)


Yaml12Loader.add_constructor("tag:yaml.org,2002:int", Yaml12Loader.construct_yaml_int)
for _tag, _pattern, _firsts in (
        ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+|0b[01_]+)$", "-+0123456789"),
        ("tag:yaml.org,2002:float", (r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                                     r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), "-+.0123456789")):
    Yaml12Loader.add_implicit_resolver(_tag, re.compile(_pattern), list(_firsts))


class ResolveError(MetafileError):
    """A `${}` expression, `foreach`/`matrix` or `vars` entry that DVC could not resolve either."""


def resolve_pipeline(spec, yaml_path: str, read_file: ReadFile) -> Pipeline:
    """The stages of the parsed `dvc.yaml` `spec` found at `yaml_path` (relative to the commit)."""
    pipeline = Pipeline()
    if not isinstance(spec, dict):
        raise MetafileError(f"{yaml_path}: expected a mapping at the top level")
    stages = spec.get("stages") or {}
    if not isinstance(stages, dict):
        raise MetafileError(f"{yaml_path}: 'stages' is not a mapping")
    base = posixpath.dirname(yaml_path)
    context = Variables(read_file)
    top_vars = spec.get("vars") or []
    if not isinstance(top_vars, list):
        raise MetafileError(f"{yaml_path}: 'vars' is not a list")
    try:
        if read_file(posixpath.join(base, "params.yaml")) is not None:
            context.load("params.yaml", base)
        for item in top_vars:
            context.load(item, base)
    except MetafileError as exc:
        raise MetafileError(f"{yaml_path}: vars: {exc}") from exc
    for group, definition in stages.items():
        try:
            generated = _generate(str(group), definition, context)
        except MetafileError as exc:
            pipeline.skipped.append((f"{yaml_path}:{group}", str(exc)))
            continue
        for name, template, scoped in generated:
            try:
                pipeline.stages.append(_stage(name, template, scoped, base))
            except MetafileError as exc:
                pipeline.skipped.append((f"{yaml_path}:{name}", str(exc)))
    return pipeline


def _generate(name: str, definition, context: "Variables") -> list[tuple[str, dict, "Variables"]]:
    """(stage name, definition, variables) of each stage a definition stands for."""
    if not isinstance(definition, dict):
        raise MetafileError("stage definition is not a mapping")
    if "matrix" in definition:
        template = {key: value for key, value in definition.items() if key != "matrix"}
        return [(f"{name}@{key}", template, context.scoped({"key": key, "item": item}))
                for key, item in _matrix_items(definition["matrix"], context.values)]
    if "foreach" in definition:
        template = definition.get("do")
        if not isinstance(template, dict):
            raise MetafileError("'foreach' without a 'do' mapping")
        return [(f"{name}@{key}", template, context.scoped(scope))
                for key, scope in _foreach_items(definition["foreach"], context.values)]
    return [(name, definition, context)]


def _foreach_items(data, values: dict) -> list[tuple[str, dict]]:
    """(key, {item, key?}) per generated stage, as ForeachDefinition.normalized_iterable."""
    iterable = resolve(data, values, allow_composite=True)
    if isinstance(iterable, dict):
        items = [(to_str(key), {"item": value, "key": to_str(key)}) for key, value in iterable.items()]
    elif isinstance(iterable, list):
        if any(isinstance(value, (dict, list)) for value in iterable):
            items = [(str(index), {"item": value}) for index, value in enumerate(iterable)]
        else:
            items = [(to_str(value), {"item": value}) for value in iterable]
    else:
        raise ResolveError(f"foreach expects a list or a mapping, got {type(iterable).__name__}")
    if len(items) > _MAX_GENERATED:
        raise ResolveError(f"foreach generates more than {_MAX_GENERATED} stages")
    return items


def _matrix_items(data, values: dict) -> list[tuple[str, dict]]:
    """(key, item) per generated stage, as MatrixDefinition.normalized_iterable."""
    matrix = resolve(data, values, allow_composite=True)
    if not isinstance(matrix, dict) or not all(isinstance(axis, list) for axis in matrix.values()):
        raise ResolveError("matrix expects a mapping of lists")
    count = 1
    for axis in matrix.values():
        count *= len(axis)
    if count > _MAX_GENERATED:
        raise ResolveError(f"matrix generates more than {_MAX_GENERATED} stages")
    items = []
    for combination in product(*(list(enumerate(axis)) for axis in matrix.values())):
        item, fragments = {}, []
        for name, (index, value) in zip(matrix, combination):
            item[name] = value
            fragments.append(f"{name}{index}" if isinstance(value, (dict, list)) else to_str(value))
        items.append(("-".join(fragments), item))
    return items


def _stage(name: str, definition: dict, context: "Variables", base: str) -> Stage:
    wdir = definition.get("wdir")
    wdir = "." if wdir is None else _path(wdir, context.values, "wdir")
    stage_vars = definition.get("vars") or []
    if not isinstance(stage_vars, list):
        raise MetafileError("'vars' is not a list")
    if stage_vars:
        context = context.scoped({})
        for item in stage_vars:
            context.load(item, posixpath.join(base, wdir), reserved=("item", "key"))
    outputs = []
    for section in _OUTPUT_SECTIONS:
        entries = definition.get(section) or []
        if not isinstance(entries, list):
            raise MetafileError(f"'{section}' is not a list")
        outputs.extend(_stage_output(entry, context.values) for entry in entries)
    return Stage(name, posixpath.normpath(wdir), tuple(outputs))


def _stage_output(entry, values: dict) -> StageOutput:
    flags = {}
    if isinstance(entry, dict) and len(entry) == 1:
        (entry, options), = entry.items()
        if isinstance(options, dict):  # flags are scalars: resolve no deeper
            flags = {key: _resolve_str(value, values, False) if isinstance(value, str) else value
                     for key, value in options.items()}
    return StageOutput(_path(entry, values, "output path"), flags)


def _path(template, values: dict, what: str) -> str:
    value = _resolve_str(template, values, False) if isinstance(template, str) else template
    if not isinstance(value, str) or not value:
        raise ResolveError(f"{what} {short(value)} is not a path")
    return value


def short(value) -> str:
    """A repr of untrusted data, shortened without ever formatting all of it."""
    return _SHORT.repr(value)


def resolve(value, values: dict, allow_composite: bool = False):
    """`value` with every `${}` in its strings (and mapping keys) resolved, as Context.resolve.

    Walks at most _MAX_VALUES values: YAML aliases can make a few bytes stand for millions."""
    budget = [_MAX_VALUES]

    def walk(item):
        budget[0] -= 1
        if budget[0] < 0:
            raise ResolveError(f"more than {_MAX_VALUES} values to resolve")
        if isinstance(item, dict):
            return {walk(key): walk(child) for key, child in item.items()}
        if isinstance(item, list):
            return [walk(child) for child in item]
        return _resolve_str(item, values, allow_composite) if isinstance(item, str) else item

    return walk(value)


def _resolve_str(value: str, values: dict, allow_composite: bool):
    if len(value) > _MAX_TEMPLATE:
        raise ResolveError(f"template of {len(value)} characters is too long to resolve")
    matches = list(_INTERPOLATION.finditer(value))
    if len(matches) == 1 and matches[0].group(0) == value:  # `${x}` alone keeps x's type
        return _checked(_select(matches[0]["inner"], values), allow_composite)
    parts, index = [], 0
    for match in matches:
        parts += [value[index:match.start()], to_str(_checked(_select(match["inner"], values), False))]
        index = match.end()
    parts.append(value[index:])
    return "".join(parts).replace("\\${", "${")


def to_str(value) -> str:
    """DVC's to_str for primitives: booleans are `true`/`false`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _checked(value, allow_composite: bool):
    if value is None or isinstance(value, _PRIMITIVES) or allow_composite:
        return value
    raise ResolveError(f"cannot interpolate data of type '{type(value).__name__}'")


def _select(expression: str, context: dict):
    """`a.b[0]` in `context`: DVC normalises `[i]` to `.i` and strips each key of spaces."""
    keys = expression.replace("[", ".").replace("]", "").split(".")
    if not expression.strip() or any(not key.strip() for key in keys):
        raise ResolveError(f"malformed expression ${{{expression}}}")
    value = context
    for key in keys:
        key = key.strip()
        try:
            value = value[int(key)] if isinstance(value, list) else value[key]
        except (KeyError, IndexError, ValueError, TypeError):
            raise ResolveError(f"could not find '{expression.strip()}'") from None
    return value


class Variables:
    """What `${}` may select: values merged from vars files and mappings, as dvc/parsing/context.py
    does it (a file loaded whole may be named again; a value may not be redefined)."""

    def __init__(self, read_file: ReadFile):
        self.read_file = read_file
        self.values: dict = {}
        self.imports: dict[str, list | None] = {}  # file -> keys loaded from it (None: all)

    def scoped(self, scope: dict) -> "Variables":
        """A copy with `scope` (a generated stage's `item` and `key`) set over the values."""
        copy = Variables(self.read_file)
        copy.values = {**self.values, **scope}  # shallow: _merge copies what it changes
        copy.imports = {path: None if keys is None else list(keys) for path, keys in self.imports.items()}
        return copy

    def load(self, item, base: str, reserved: tuple[str, ...] = ()) -> None:
        """Merge one `vars` entry: a mapping, or `FILE[:KEY,...]` relative to `base`."""
        if isinstance(item, dict):
            self._merge({str(key): value for key, value in item.items()}, reserved)
            return
        if not isinstance(item, str):
            raise ResolveError(f"vars entry {short(item)} is neither a file nor a mapping")
        if _INTERPOLATION.search(item):
            raise ResolveError("vars may not be interpolated")
        name, _, keys_text = item.partition(":")
        path = posixpath.normpath(posixpath.join(base, name))
        keys = [key for key in keys_text.split(",") if key] or None
        if path in self.imports:
            loaded = self.imports[path]
            if keys is None and loaded is None:
                return  # the same whole file again: DVC allows it
            if keys is None or loaded is None or set(keys) & set(loaded):
                raise ResolveError(f"cannot load '{item}': it is (partially) loaded already")
        data = _load_vars_file(path, self.read_file)
        if keys is not None:
            missing = [key for key in keys if key not in data]
            if missing:
                raise ResolveError(f"could not find '{missing[0]}' in '{path}'")
            data = {key: data[key] for key in keys}
        self._merge(data, reserved)
        self.imports[path] = None if keys is None else [*(self.imports.get(path) or []), *keys]

    def _merge(self, data: dict, reserved: tuple[str, ...]) -> None:
        clash = set(reserved) & data.keys()
        if clash:
            raise ResolveError(f"vars may not redefine {', '.join(sorted(clash))}")
        _merge(self.values, data)


def _load_vars_file(path: str, read_file: ReadFile) -> dict:
    data = read_file(path) if not path.startswith("../") else None
    if data is None:
        raise ResolveError(f"'{path}' does not exist")
    extension = posixpath.splitext(path)[1].lower()
    try:
        if extension in (".yaml", ".yml"):
            values = yaml.load(data, Loader=Yaml12Loader)  # a SafeLoader
        elif extension == ".json":
            values = json.loads(data)
        elif extension == ".toml" and tomllib is not None:
            values = tomllib.loads(data.decode("utf-8"))
        else:
            raise ResolveError(f"cannot read variables from '{path}' (only YAML, JSON and TOML files)")
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # TOMLDecodeError, UnicodeError: ValueError
        raise ResolveError(f"cannot parse '{path}': {str(exc).splitlines()[0][:200]}") from exc
    if not isinstance(values, dict):
        raise ResolveError(f"expected a mapping in '{path}'")
    return values


def _merge(into: dict, other: Mapping) -> None:
    """Merge like Context.merge_update: mappings recursively, a value may not be redefined."""
    for key, value in other.items():
        if key in into and isinstance(into[key], dict) and isinstance(value, dict):
            into[key] = dict(into[key])  # copy on write: the original may be shared
            _merge(into[key], value)
        elif key in into:
            raise ResolveError(f"cannot redefine '{key}'")
        else:
            into[key] = value
