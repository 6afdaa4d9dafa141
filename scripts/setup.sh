#!/usr/bin/env bash
# Install regfs and what it needs on a Debian/Ubuntu machine (or the Vagrant VM). Idempotent.
#
# Usage: bash scripts/setup.sh [--test] [--demo] [--bench]
#
#   always   Debian packages fuse3 (fusermount3, libfuse3), git, python3-venv when missing
#            (apt-get, through sudo when not root); checks that /dev/fuse is usable;
#            .venv at the repo root with `pip install -c constraints.txt -e .`
#   --test   the test extra (pytest, dvc with its s3/ssh/azure/gs plugins, moto[server],
#            gcp-storage-emulator) into .venv, and .venv-dvc2 with the legacy DVC 2 the test suite
#            uses to build fixtures (pinned by constraints-dvc2.txt; in the background while .venv
#            installs); the test servers: Debian's
#            openssh-server (for its sshd; where systemd runs, Debian also enables its service on
#            port 22: `systemctl disable --now ssh` if unwanted) and Azurite from npm into
#            tests/node/node_modules (`npm ci`, pinned by tests/node/package-lock.json, in the
#            background while pip runs; needs node and npm, installed from Debian if missing)
#   --demo   the demo extra (dvc) into .venv
#   --bench  what scripts/bench.py needs: everything --test installs, and Debian nginx and curl
#
# Environment: PYTHON (interpreter for new venvs, default python3),
#              REGFS_SETUP_FORCE=1 (reinstall even if nothing changed since the last run).
# Pins come from constraints.txt / constraints-dvc2.txt; regenerate them with scripts/lock.sh.
set -euo pipefail

# Legacy DVC for test fixtures. Keep in sync with DVC2_REQS in scripts/lock.sh.
DVC2_REQS=(dvc==2.58.2 pathspec==0.11.2 dulwich==0.21.7)
DVC2_VERSION=2.58.2

log() { printf '[setup] %s\n' "$*"; }
warn() { printf '[setup] WARNING: %s\n' "$*" >&2; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

want_test=0
want_demo=0
want_bench=0
for arg in "$@"; do
    case $arg in
        --test) want_test=1 ;;
        --bench) want_test=1 want_bench=1 ;;
        --demo) want_demo=1 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $arg" ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
SECONDS=0

[ "$(uname -s)" = Linux ] ||
    die "regfs needs Linux and FUSE; on macOS or Windows use the Vagrant VM (see Vagrantfile)"

# --- root access for apt-get ------------------------------------------------------------------
SUDO=()
root_ok=
get_root() { # WHY COMMAND
    [ -n "$root_ok" ] && return 0
    if [ "$(id -u)" -eq 0 ]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    elif command -v sudo >/dev/null 2>&1 && [ -t 0 ]; then
        log "sudo is needed to $1"
        SUDO=(sudo)
    else
        die "root is needed to $1, but this is $(id -un) and sudo is not available without a password:" \
            "run '$2' as root, then run this script again"
    fi
    root_ok=1
}

apt_updated=
apt_install() { # PACKAGE...
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found (this script knows Debian/Ubuntu only): install $* yourself, then run it again"
    get_root "install the Debian package(s) $*" "apt-get install $*"
    if [ -z "$apt_updated" ]; then
        log "apt-get update"
        "${SUDO[@]}" apt-get update -qq || die "apt-get update failed"
        apt_updated=1
    fi
    log "apt-get install $*"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" </dev/null || die "apt-get install $* failed"
}

# --- system packages --------------------------------------------------------------------------
have_libfuse3() {
    local ldconfig
    ldconfig=$(PATH="$PATH:/sbin:/usr/sbin" command -v ldconfig) || return 1
    "$ldconfig" -p | grep -q 'libfuse3\.so\.3 '
}

if command -v fusermount3 >/dev/null 2>&1; then
    log "fuse3: $(command -v fusermount3) present"
else
    apt_install fuse3
    command -v fusermount3 >/dev/null 2>&1 || die "fusermount3 still missing after installing fuse3"
fi
if ! have_libfuse3; then
    apt_install libfuse3-3
    have_libfuse3 || die "libfuse3.so.3 not found by ldconfig even after installing libfuse3-3"
fi
if [ "$(id -u)" -ne 0 ] && [ ! -u "$(command -v fusermount3)" ]; then
    warn "$(command -v fusermount3) is not setuid root: mounting as $(id -un) will fail"
fi

if ! command -v git >/dev/null 2>&1; then
    apt_install git
fi
if [ "$want_bench" = 1 ]; then
    # the benchmark's HTTP remote (nginx on 127.0.0.1) and its plain-GET baseline
    PATH="$PATH:/usr/sbin:/sbin" command -v nginx >/dev/null 2>&1 || apt_install nginx
    command -v curl >/dev/null 2>&1 || apt_install curl
fi

if [ "$want_test" = 1 ]; then
    # the SSH remote of the tests: sshd started by a fixture on a loopback port (tests/servers.py)
    PATH="$PATH:/usr/sbin:/sbin" command -v sshd >/dev/null 2>&1 || apt_install openssh-server
    command -v npm >/dev/null 2>&1 || apt_install nodejs npm
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    [ "$PYTHON" = python3 ] || die "PYTHON=$PYTHON not found"
    apt_install python3
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    die "$PYTHON is $("$PYTHON" --version 2>&1); regfs needs Python >= 3.10"
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    # Debian/Ubuntu ship venv's ensurepip separately.
    apt_install "python$pyver-venv"
fi

# --- /dev/fuse --------------------------------------------------------------------------------
if [ ! -e /dev/fuse ]; then
    log "/dev/fuse is missing; trying to load the fuse kernel module"
    if [ "$(id -u)" -eq 0 ]; then
        modprobe fuse 2>/dev/null || true
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n modprobe fuse 2>/dev/null || true
    fi
fi
[ -c /dev/fuse ] ||
    die "/dev/fuse does not exist, so nothing can be mounted (and the mount tests cannot run)." \
        "Load the module (sudo modprobe fuse); in a container, start it with --device /dev/fuse" \
        "--cap-add SYS_ADMIN (docker/podman); on macOS or Windows use the Vagrant VM."
if [ ! -r /dev/fuse ] || [ ! -w /dev/fuse ]; then
    die "/dev/fuse exists but $(id -un) cannot read and write it ($(stat -c "%A %U:%G" /dev/fuse));" \
        "on Debian it is crw-rw-rw- (sudo chmod 0666 /dev/fuse)"
fi
log "/dev/fuse: usable ($(stat -c "%A %U:%G" /dev/fuse))"

# --- virtualenvs ------------------------------------------------------------------------------
make_venv() { # DIR
    local dir=$1
    if [ -x "$dir/bin/python" ] && "$dir/bin/python" -m pip --version >/dev/null 2>&1; then
        log "$dir: reusing ($("$dir/bin/python" --version))"
        return
    fi
    if [ -e "$dir" ]; then
        log "$dir: broken or made elsewhere, recreating"
        rm -rf "$dir"
    fi
    log "$dir: creating with $PYTHON ($("$PYTHON" --version))"
    "$PYTHON" -m venv "$dir" || die "'$PYTHON -m venv $dir' failed (is python$pyver-venv installed?)"
}

# pip install, through a filter for the harmless notes of this machine kind's local package indexes.
# --no-compile: byte-compiling every module of botocore, moto, sympy, ... at install time costs ~40 s;
# Python compiles (and caches) only what is imported.
pip_install() { # VENV ARG...
    local venv=$1
    shift
    "$venv/bin/python" -m pip install --disable-pip-version-check --no-input --progress-bar off -q \
        --no-compile "$@" 2>&1 |
        { grep -v "^WARNING: Location 'file://.*' is ignored" || true; }
}

# The pinned pip first (constraints.txt pins it): the venv's bundled pip may be years older and
# takes twice as long to go through the big index pages of botocore and friends.
pip_self_update() { # VENV CONSTRAINT-ARGS...
    local venv=$1
    shift
    [ $# -gt 0 ] || return 0
    pip_install "$venv" "$@" --upgrade pip || die "could not install the pinned pip into $venv"
}

# Skip pip when the same inputs were installed before (re-running setup costs ~1 s).
stamp_value() { # LABEL FILE...
    local label=$1
    shift
    { printf '%s\n' "$label"; cat "$@"; } | sha256sum | cut -d' ' -f1
}
up_to_date() { # STAMPFILE VALUE DIST...
    local stamp=$1 value=$2
    shift 2
    [ "${REGFS_SETUP_FORCE:-0}" = 1 ] && return 1
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$value" ] || return 1
    # ... and the key distributions are really there
    "${stamp%/*}/bin/python" - "$@" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
for name in sys.argv[1:]:
    version(name)
EOF
}

check_constraints() { # FILE
    if [ ! -f "$1" ]; then
        warn "$1 is missing: installing without pins (slow; run scripts/lock.sh)"
        return 1
    fi
    if [ "$pyver" != 3.11 ]; then
        warn "$1 pins packages for Python 3.11, this is $pyver; if pip fails, regenerate with scripts/lock.sh"
    fi
}

# The background jobs (npm, and the DVC 2 virtualenv below) are stopped if setup dies before
# waiting for them.
npm_pid=
dvc2_pid=
dvc2_log=
# shellcheck disable=SC2317  # run by the EXIT trap
stop_background() {
    local pid
    for pid in $npm_pid $dvc2_pid; do
        kill "$pid" 2>/dev/null || true
    done
    [ -z "$dvc2_log" ] || rm -f "$dvc2_log"
}
trap stop_background EXIT

# --- Azurite (npm), in the background while pip works ------------------------------------------
# Azurite 3.33.0 is the last release without Application Insights telemetry (its opentelemetry
# packages triple the install: 365 MB instead of 121 MB).
npm_log=tests/node/npm-ci.log
npm_stamp=tests/node/node_modules/.regfs-setup
if [ "$want_test" = 1 ]; then
    npm_value=$(stamp_value "$(node --version 2>/dev/null)" tests/node/package-lock.json)
    if [ "${REGFS_SETUP_FORCE:-0}" != 1 ] && [ -f "$npm_stamp" ] && [ "$(cat "$npm_stamp")" = "$npm_value" ] &&
        [ -x tests/node/node_modules/.bin/azurite-blob ]; then
        log "tests/node: azurite already installed (package-lock.json unchanged)"
    else
        log "tests/node: npm ci (azurite), in the background ..."
        npm_t0=$SECONDS
        (cd tests/node && npm ci --no-audit --no-fund --loglevel=error) >"$npm_log" 2>&1 &
        npm_pid=$!
    fi
fi

# --- .venv-dvc2: legacy DVC 2 for the test fixtures, in the background while .venv installs ------
# (its pip spends much of its time downloading and unpacking: the two overlap well on two cores)
setup_dvc2() {
    make_venv .venv-dvc2
    cons2=()
    check_constraints constraints-dvc2.txt && cons2=(-c constraints-dvc2.txt)
    stamp2=.venv-dvc2/.regfs-setup-dvc2
    inputs2=(/dev/null)
    [ -f constraints-dvc2.txt ] && inputs2+=(constraints-dvc2.txt)
    value2=$(stamp_value "${DVC2_REQS[*]} $PYTHON" "${inputs2[@]}")
    if up_to_date "$stamp2" "$value2" dvc; then
        log ".venv-dvc2: ${DVC2_REQS[*]} already installed"
    else
        log ".venv-dvc2: pip install ${cons2[*]} ${DVC2_REQS[*]} ..."
        t0=$SECONDS
        pip_self_update .venv-dvc2 "${cons2[@]}"
        pip_install .venv-dvc2 "${cons2[@]}" "${DVC2_REQS[@]}" || die "pip install into .venv-dvc2 failed (see above)"
        printf '%s\n' "$value2" >"$stamp2"
        log ".venv-dvc2: installed in $((SECONDS - t0))s"
    fi
    v=$(.venv-dvc2/bin/dvc --version 2>/dev/null) || die ".venv-dvc2/bin/dvc does not run"
    [ "$v" = "$DVC2_VERSION" ] || die ".venv-dvc2/bin/dvc is version $v, expected $DVC2_VERSION"
}
if [ "$want_test" = 1 ]; then
    log ".venv-dvc2: setting up in the background ..."
    dvc2_log=$(mktemp)
    setup_dvc2 >"$dvc2_log" 2>&1 &
    dvc2_pid=$!
fi

# .venv: regfs itself, editable, with the extras asked for
extras=()
dists=(regfs mfusepy pygit2)
[ "$want_test" = 1 ] && extras+=(test) && dists+=(pytest dvc moto)
[ "$want_demo" = 1 ] && extras+=(demo) && dists+=(dvc)
if [ ${#extras[@]} -gt 0 ]; then
    spec=".[$(IFS=,; echo "${extras[*]}")]"
else
    spec=.
fi

make_venv .venv
cons=()
check_constraints constraints.txt && cons=(-c constraints.txt)
stamp=.venv/.regfs-setup-$(IFS=-; echo "${extras[*]:-base}")
inputs=(pyproject.toml)
[ -f constraints.txt ] && inputs+=(constraints.txt)
value=$(stamp_value "$spec $PYTHON" "${inputs[@]}")
if up_to_date "$stamp" "$value" "${dists[@]}"; then
    log ".venv: $spec already installed (pyproject.toml and constraints.txt unchanged)"
else
    log ".venv: pip install ${cons[*]} -e '$spec' ..."
    t0=$SECONDS
    pip_self_update .venv "${cons[@]}"
    pip_install .venv "${cons[@]}" -e "$spec" || die "pip install into .venv failed (see above)"
    printf '%s\n' "$value" >"$stamp"
    log ".venv: installed in $((SECONDS - t0))s"
fi

if [ -n "$dvc2_pid" ]; then
    wait "$dvc2_pid" || { dvc2_pid=; cat "$dvc2_log" >&2; die ".venv-dvc2 setup failed (see above)"; }
    dvc2_pid=
    cat "$dvc2_log"
fi

if [ -n "$npm_pid" ]; then
    t0=$SECONDS
    wait "$npm_pid" || { npm_pid=; cat "$npm_log" >&2; die "npm ci in tests/node failed (see above)"; }
    npm_pid=
    printf '%s\n' "$npm_value" >"$npm_stamp"
    rm -f "$npm_log"
    log "tests/node: azurite installed in $((SECONDS - npm_t0))s ($((SECONDS - t0))s of it after pip)"
fi

# --- summary ----------------------------------------------------------------------------------
summary=$(.venv/bin/python - <<'EOF'
from importlib.metadata import version, PackageNotFoundError
out = []
for name in ("regfs", "mfusepy", "pygit2", "dvc", "moto", "pytest"):
    try:
        out.append(f"{name} {version(name)}")
    except PackageNotFoundError:
        pass
print(", ".join(out))
EOF
)
log "done in ${SECONDS}s: .venv ($(.venv/bin/python --version 2>&1)): $summary"
[ "$want_test" = 1 ] && log ".venv-dvc2: dvc $(.venv-dvc2/bin/dvc --version)"
[ -x .venv/bin/regfs ] && log "regfs CLI: $ROOT/.venv/bin/regfs"
exit 0
