"""DVC configuration: the configobj INI dialect, its levels, and remote settings.

Levels, lowest precedence first (../shared/dvc-format.md section 7): system, global, the
registry's `.dvc/config` as committed, then what the user gives on the command line (the role
`.dvc/config.local` plays for DVC). Section and key names are case-insensitive, and so are remote
names (DVC lower-cases them). Relative paths in a level resolve against that level's directory.
Parsing is pure; only `user_levels` reads files, and it takes time linear in the text: a
registry's `.dvc/config` is untrusted, so no regular expression here can backtrack over a line.
"""

import os
from dataclasses import dataclass, field

from regfs.errors import ConfigError

MAX_REQUESTS = 16  # requests to remotes in flight per process, by default (remotes.RequestSlots)
_PATH_OPTIONS = ("credentialpath", "configpath", "keyfile", "gdrive_user_credentials_file",
                 "gdrive_service_account_json_file_path")


@dataclass(frozen=True)
class RemoteSpec:
    name: str
    url: str
    options: dict = field(default_factory=dict, hash=False)

    @property
    def is_local(self) -> bool:
        return is_local_path(self.url)

    @property
    def is_versioned(self) -> bool:
        """A cloud-versioned remote (`version_aware` or `worktree`): it keeps each output's files
        at their path in the registry, in versions, not as content-addressed objects."""
        return any(bool_value(self.options.get(key, False)) for key in ("version_aware", "worktree"))


@dataclass
class Config:
    """Merged settings: `core` options, one dict of options per remote (with `url`), the `cache`
    section, and `default_options`: options for whichever remote ends up the default (what
    `dvc import --remote-config KEY=VALUE` records without a remote name)."""

    core: dict = field(default_factory=dict)
    remotes: dict[str, dict] = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    default_options: dict = field(default_factory=dict)

    def merged(self, other: "Config") -> "Config":
        remotes = {name: dict(options) for name, options in self.remotes.items()}
        for name, options in other.remotes.items():
            remotes.setdefault(name, {}).update(options)
        return Config({**self.core, **other.core}, remotes, {**self.cache, **other.cache},
                      {**self.default_options, **other.default_options})

    def remote(self, name: str | None) -> RemoteSpec:
        """The settings of remote `name`, or of the default remote (`core.remote`)."""
        default = str(self.core.get("remote") or "").lower()
        name = (name or default).lower()
        if not name:
            raise ConfigError("no remote: the registry has no default remote (core.remote); "
                              "give one with --remote NAME")
        options = dict(self.remotes.get(name) or {})
        if name == default:
            options.update(self.default_options)
        if not options.get("url"):
            raise ConfigError(f"remote '{name}' is not configured (known: {', '.join(sorted(self.remotes)) or 'none'})")
        return _resolve_remote_url(name, options, self)


def config_from_mapping(data: dict) -> Config:
    """A config level given as DVC's dict form (`{core: {...}, remote: {NAME: {...}}}`), as
    `dvc import --remote NAME --remote-config ...` records it in the `.dvc` file."""
    def lowered(section) -> dict:
        return {str(key).lower(): value for key, value in section.items()} if isinstance(section, dict) else {}

    remotes = data.get("remote") if isinstance(data.get("remote"), dict) else {}
    return Config(lowered(data.get("core")), {str(name).lower(): lowered(options) for name, options in remotes.items()},
                  lowered(data.get("cache")))


def parse_config(text: str, base_dir: str | None = None) -> Config:
    """Parse one config level; relative paths are made absolute against `base_dir` if given."""
    config, section = Config(), None
    for number, raw_line in enumerate(text.splitlines(), 1):
        line = raw_line.strip()
        if not line or line[0] in "#;":
            continue
        name = _section_name(line)
        if name is not None:
            section = _section(config, name.strip())
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ConfigError(f"config line {number}: expected 'key = value', got {line!r:.80}")
        if section is None:
            continue  # configobj allows keys before any section; DVC ignores them
        section[key.strip().lower()] = _value(value.strip(), number)
    if base_dir:
        absolutize(config, base_dir)
    return config


def parse_override(text: str) -> tuple[str, str, str]:
    """`NAME.KEY=VALUE` from --remote-config (the value may be a secret: never shown)."""
    target, sep, value = text.partition("=")
    name, dot, key = target.rpartition(".")
    if not sep or not dot or not name or not key:
        shown = f"{target}=..." if sep else target
        raise ConfigError(f"--remote-config expects NAME.KEY=VALUE, got {shown!r}")
    return name.lower(), key.lower(), value


def user_levels() -> list[Config]:
    """The system and global DVC config files of this machine, lowest precedence first."""
    system_dir = os.environ.get("DVC_SYSTEM_CONFIG_DIR") or os.path.join(
        (os.environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(":")[0], "dvc")
    global_dir = os.environ.get("DVC_GLOBAL_CONFIG_DIR") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "dvc")
    levels = []
    for directory in (system_dir, global_dir):
        path = os.path.join(directory, "config")
        try:
            with open(path, encoding="utf-8") as file:
                levels.append(parse_config(file.read(), directory))
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError, ConfigError) as exc:
            raise ConfigError(f"cannot read DVC config {path}: {exc}") from exc
    return levels


def bool_value(value) -> bool:
    """A boolean option as configobj and DVC read it (`true`, `1`, `yes`; any case)."""
    return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1", "yes")


def is_local_path(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _section_name(line: str) -> str | None:
    """The name of a `[name]` line (stripped of one pair of quotes), or None for another line.

    The name ends at the first `]` followed by nothing but spaces and an optional `#`/`;`
    comment, or at a later one if that makes a quoted name. A scan, not a regular expression:
    one with optional spaces around a lazy name backtracks cubically on a long line of spaces.
    """
    if not line.startswith("["):
        return None
    ends, rest_ok = [], True  # rest_ok: what follows position i is spaces, then maybe a comment
    for index in range(len(line) - 1, 0, -1):
        char = line[index]
        if char == "]" and rest_ok:
            ends.append(index)
        if char in "#;":
            rest_ok = True
        elif not char.isspace():
            rest_ok = False
    if not ends:
        return None
    ends.reverse()
    start = len(line) - len(line[1:].lstrip())  # the name's first character
    quote = line[start] if line[start:start + 1] in ("'", '"') else None
    for end in ends if quote else ():
        last = end - 1
        while last > start and line[last].isspace():  # runs before each `]` are disjoint: linear
            last -= 1
        if last > start and line[last] == quote:
            return line[start + 1:last]
    return line[1:ends[0]]


def _section(config: Config, name: str) -> dict:
    # DVC lower-cases section names, then reads `remote "NAME"` (dvc/config.py _parse_named:
    # `^\s*remote\s*"(.*)"\s*$`, double quotes only).
    name = name.lower().strip()
    rest = name.removeprefix("remote").lstrip()
    if name.startswith("remote") and len(rest) >= 2 and rest[0] == rest[-1] == '"':
        return config.remotes.setdefault(rest[1:-1], {})
    if name == "core":
        return config.core
    if name == "cache":
        return config.cache
    return {}  # state, feature...: nothing regfs reads


def _value(text: str, number: int):
    """A configobj value: a string, or a list if it has an unquoted comma (`a, b`, `a,`);
    quotes (`"..."`, `'...'`, `'''...'''`) are removed, and an unquoted `#` starts a comment
    (so `url = http://h/p#x` is `http://h/p`, as DVC reads it). A scan: linear in the line."""
    for triple in ('"""', "'''"):
        if text.startswith(triple):
            end = text.find(triple, 3)
            if end < 0:
                raise ConfigError(f"config line {number}: multi-line values are not supported")
            _check_rest(text[end + 3:], number)
            return text[3:end]
    if text.partition("#")[0].strip() == ",":
        return []  # configobj's empty list
    items, position, is_list = [], 0, False
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position == len(text) or text[position] == "#":
            break  # a trailing comma (`a,`), or an empty value
        if text[position] in "'\"":
            end = text.find(text[position], position + 1)
            if end < 0:
                raise ConfigError(f"config line {number}: unbalanced quote")
            items.append(text[position + 1:end])
            position = end + 1
        else:
            end = position
            while end < len(text) and text[end] not in ",#":
                end += 1
            items.append(text[position:end].strip())
            position = end
        while position < len(text) and text[position].isspace():
            position += 1
        if position < len(text) and text[position] == ",":
            is_list, position = True, position + 1
            continue
        break
    _check_rest(text[position:], number)
    if is_list:
        return items
    return items[0] if items else ""


def _check_rest(rest: str, number: int) -> None:
    if rest.strip() and not rest.lstrip().startswith("#"):
        raise ConfigError(f"config line {number}: unexpected text after a quoted value")


def absolutize(config: Config, base_dir: str) -> None:
    """Make the relative paths of `config` (remote URLs, key files, the cache dir) absolute."""
    if isinstance(config.cache.get("dir"), str):
        config.cache["dir"] = os.path.normpath(os.path.join(base_dir, os.path.expanduser(config.cache["dir"])))
    for options in [*config.remotes.values(), config.default_options]:
        url = options.get("url")
        if isinstance(url, str) and is_local_path(url) and not url.startswith("remote://"):
            path = url.removeprefix("file://")
            options["url"] = os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))
        for key in _PATH_OPTIONS:
            if isinstance(options.get(key), str):
                options[key] = os.path.normpath(os.path.join(base_dir, os.path.expanduser(options[key])))


def _resolve_remote_url(name: str, options: dict, config: Config, depth: int = 0) -> RemoteSpec:
    url = options.pop("url")
    if not isinstance(url, str):
        raise ConfigError(f"remote '{name}': url must be a string")
    if url.startswith("remote://"):
        if depth > 8:
            raise ConfigError(f"remote '{name}': remote:// chain too deep")
        base_name, _, sub = url[len("remote://"):].partition("/")
        base = config.remotes.get(base_name.lower())
        if not base or not base.get("url"):
            raise ConfigError(f"remote '{name}' refers to unknown remote '{base_name}'")
        base_spec = _resolve_remote_url(base_name.lower(), dict(base), config, depth + 1)
        url = base_spec.url.rstrip("/") + ("/" + sub if sub else "")
        options = {**base_spec.options, **options}
    elif is_local_path(url) and not os.path.isabs(url.removeprefix("file://")):
        raise ConfigError(f"remote '{name}': relative path {url!r} cannot be resolved for a registry "
                          f"that is not a local directory; give --remote-config {name}.url=PATH")
    return RemoteSpec(name, url.removeprefix("file://"), options)
