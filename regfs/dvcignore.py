"""Which paths of a commit DVC ignores: `.dvcignore` files and sub-repositories, as dvc/ignore.py.

DVC collects no metafile from an ignored path and `dvc list` does not show one. Each repository
(the registry, or a sub-repository: a directory holding its own `.dvc/`) has its own rules: the
default patterns `.hg/ .git/ .git .dvc/`, then each `.dvcignore` (gitignore syntax) from its root
down, every file's patterns re-anchored at the repository root (dvc/pathspec_math.py) and appended
after those of the directories above it, so a deeper file may re-include (`!pattern`) what a
shallower one excludes. The last pattern that matches decides; a path is ignored as soon as one of
its parent directories is (nothing below an ignored directory can be re-included). A `.dvcignore`
that is itself ignored is not read. Pure: takes the files' bytes.
"""

import posixpath
import re
from collections.abc import Iterable

try:
    from pathspec.patterns.gitignore.spec import GitIgnoreSpecPattern as _Pattern
except ImportError:  # pathspec < 1
    from pathspec.patterns import GitWildMatchPattern as _Pattern

DEFAULT_PATTERNS = (".hg/", ".git/", ".git", ".dvc/")

# (compiled regex, excludes, applies to directories only), in file order
Rules = tuple[tuple[re.Pattern, bool, bool], ...]


class DvcIgnore:
    """The ignore rules of every repository of one commit.

    `files` maps a directory ("" or "a/b/", relative to the commit) to the bytes of its
    `.dvcignore`; `repo_roots` are the repositories' roots ("" and each "sub/repo/").
    """

    def __init__(self, files: dict[str, bytes], repo_roots: Iterable[str] = ("",)):
        self._files = files
        self._roots = sorted(set(repo_roots) | {""}, key=len, reverse=True)  # innermost first
        self._rules: dict[str, Rules] = {}  # directory -> rules in force there

    def repo_root(self, path: str) -> str:
        """The root ("" or "sub/") of the innermost repository holding `path`."""
        return next(root for root in self._roots if path.startswith(root))

    def is_ignored(self, path: str, is_dir: bool = False) -> bool:
        """Whether DVC ignores `path` (relative to the commit), or one of its parent directories.
        A sub-repository's root is ignored by the repository around it (DVC adds `/name/`)."""
        if is_dir and path + "/" in self._roots:
            return True
        root = self.repo_root(path)
        relative = path[len(root):]
        if not relative:
            return False
        rules = self._rules_of(root, posixpath.dirname(path))
        parts = relative.split("/")
        for index in range(1, len(parts) + 1):
            if _matches(rules, "/".join(parts[:index]), is_dir or index < len(parts)):
                return True
        return False

    def _rules_of(self, root: str, directory: str) -> Rules:
        """The rules in force for the entries of `directory` (a path relative to the commit)."""
        key = directory + "/" if directory else ""
        if key in self._rules:
            return self._rules[key]
        if key == root:
            rules = _compile(DEFAULT_PATTERNS)
        else:
            rules = self._rules_of(root, posixpath.dirname(directory))
        text = self._files.get(key)
        relative = key[len(root):].rstrip("/")
        if text is not None and not _matches(rules, posixpath.join(relative, ".dvcignore"), False):
            rules = rules + _compile(_rebased(line, relative) for line in _lines(text))
        self._rules[key] = rules
        return rules


def _lines(text: bytes) -> list[str]:
    stripped = (line.strip() for line in text.decode("utf-8", "replace").splitlines())
    return [line for line in stripped if line and not line.startswith("#")]


def _rebased(rule: str, relative: str) -> str:
    """A pattern of `relative/.dvcignore` re-anchored at the repository root (change_rule)."""
    if not relative:
        return rule
    negated = rule.startswith("!")
    rule = rule[1:] if negated else rule
    anchored = "/" in rule[:-1] and not rule.startswith("**/")
    rule = rule.removeprefix("/") if anchored else rule.removeprefix("**/")
    rule = rule.removeprefix("\\")  # an escaped first character
    rule = ("/" if anchored else "/**/") + rule
    return f"{'!' if negated else ''}/{relative}{rule}"


def _compile(patterns: Iterable[str]) -> Rules:
    rules = []
    for pattern in patterns:
        regex, include = _Pattern.pattern_to_regex(pattern)
        if regex is not None and include is not None:
            rules.append((re.compile(regex), include, pattern.endswith("/")))
    return tuple(rules)


def _matches(rules: Rules, path: str, is_dir: bool) -> bool:
    """The verdict of the last rule matching `path` (also as `path/` for a directory)."""
    candidates = (path, path + "/") if is_dir else (path,)
    for regex, excludes, dir_only in reversed(rules):
        if dir_only and not is_dir:
            continue
        if any(regex.match(candidate) for candidate in candidates):
            return excludes
    return False
