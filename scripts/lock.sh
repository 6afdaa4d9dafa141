#!/usr/bin/env bash
# Regenerate the pip constraint files by resolving once in scratch venvs:
#
#   constraints.txt       every package `pip install -e '.[test,demo]'` pulls in
#   constraints-dvc2.txt  every package of the legacy DVC venv (.venv-dvc2, test fixtures)
#
# Usage: bash scripts/lock.sh        (needs CPython 3.11, as on the project's machines; ~3 min)
#        PYTHON=/path/to/python3.11 bash scripts/lock.sh
#
# Run it after changing the dependencies in pyproject.toml (or DVC2_REQS below and in
# scripts/setup.sh), review `git diff constraints*.txt`, then run scripts/setup.sh again.
set -euo pipefail

# Legacy DVC for test fixtures. Keep in sync with DVC2_REQS in scripts/setup.sh.
DVC2_REQS=(dvc==2.58.2 pathspec==0.11.2 dulwich==0.21.7)

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

log() { printf '[lock] %s\n' "$*"; }
die() { printf '[lock] ERROR: %s\n' "$*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set PYTHON=...)"
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$pyver" = 3.11 ] || die "$PYTHON is Python $pyver; the pins are made for Python 3.11 (set PYTHON=...)"

# pip, without the harmless notes of this machine kind's local package indexes
pip() { # VENV ARG...
    local venv=$1
    shift
    "$venv/bin/python" -m pip --disable-pip-version-check --no-input "$@" 2>&1 |
        { grep -v "^WARNING: Location 'file://.*' is ignored" || true; }
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Resolve against a stub copy of the project: only pyproject.toml's dependencies matter here,
# and the stub builds even while regfs/ or README.md are in flux.
mkdir -p "$tmp/proj/regfs"
cp pyproject.toml "$tmp/proj/"
printf '# stub for scripts/lock.sh\n' >"$tmp/proj/README.md"
: >"$tmp/proj/regfs/__init__.py"

# freeze VENV OUTFILE DESCRIPTION
freeze() {
    local venv=$1 out=$2 what=$3
    {
        printf '# %s\n' "$what"
        printf '# Exact pins for CPython %s on Linux, resolved by scripts/lock.sh on %s.\n' \
            "$pyver" "$(date -u +%Y-%m-%d)"
        printf '# Do not edit by hand; regenerate with: bash scripts/lock.sh\n'
        {
            # pip itself too: scripts/setup.sh installs this pip first (the venv's bundled pip
            # can be much older, and slow on big index pages)
            "$venv/bin/python" -m pip --version | awk '{print "pip==" $2}'
            "$venv/bin/python" -m pip freeze --exclude-editable | grep -Ev '^regfs[= @]'
        } | LC_ALL=C sort -f
    } >"$out.tmp"
    mv "$out.tmp" "$out"
    log "wrote $out ($(grep -vc '^#' "$out") pins)"
}

log "resolving .[test,demo] with $("$PYTHON" --version) ..."
SECONDS=0
"$PYTHON" -m venv "$tmp/venv"
pip "$tmp/venv" install -q --upgrade pip
pip "$tmp/venv" install -q -e "$tmp/proj[test,demo]"
freeze "$tmp/venv" constraints.txt \
    "Constraints for: pip install -c constraints.txt -e '.[test,demo]' (any subset of the extras)."
log "  took ${SECONDS}s"

log "resolving ${DVC2_REQS[*]} ..."
SECONDS=0
"$PYTHON" -m venv "$tmp/venv-dvc2"
pip "$tmp/venv-dvc2" install -q --upgrade pip
pip "$tmp/venv-dvc2" install -q "${DVC2_REQS[@]}"
"$tmp/venv-dvc2/bin/dvc" --version >/dev/null || die "the resolved legacy dvc does not run"
freeze "$tmp/venv-dvc2" constraints-dvc2.txt \
    "Constraints for the legacy DVC venv .venv-dvc2: pip install -c constraints-dvc2.txt ${DVC2_REQS[*]}"
log "  took ${SECONDS}s"
