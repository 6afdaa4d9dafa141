#!/usr/bin/env bash
# The regfs demo: builds a small DVC data registry with the real dvc CLI under ./demo/, pushes its
# data to a local remote, drops the registry's own DVC cache, then mounts every revision with
# regfs and looks around. Re-runnable: it starts from scratch (rm -rf demo/) each time.
#
# Usage: bash scripts/demo.sh        (installs what it needs first: scripts/setup.sh --demo)
#
#   demo/registry   the Git + DVC repository (tags v1.0 and v2.0, branch main)
#   demo/remote     its default DVC remote (a local directory)
#   demo/cache      regfs's object cache (--cache-dir)
#   demo/mnt        the mountpoint, unmounted again when the script exits, even on errors
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

if [ -t 1 ]; then bold=$'\e[1m' dim=$'\e[2m' off=$'\e[0m'; else bold='' dim='' off=''; fi
say() { printf '\n%s== %s%s\n' "$bold" "$*" "$off"; }
show() { printf '%s$ %s%s\n' "$dim" "$*" "$off"; "$@"; }
die() { printf 'demo: ERROR: %s\n' "$*" >&2; exit 1; }

bash scripts/setup.sh --demo

# regfs, dvc and python from .venv (by name, so the commands shown read as you would type them)
export PATH="$ROOT/.venv/bin:$PATH"
for tool in regfs dvc python; do
    [ "$(command -v "$tool")" = "$ROOT/.venv/bin/$tool" ] || die ".venv/bin/$tool is missing (did setup.sh fail?)"
done

DEMO=demo
MNT=$DEMO/mnt
REG=$DEMO/registry

is_mounted() { mountpoint -q "$1" 2>/dev/null; }
unmount() { # MOUNTPOINT: regfs umount, else fusermount3 directly; fails if still mounted
    is_mounted "$1" || return 0
    regfs umount "$1" || fusermount3 -u "$1" || fusermount3 -uz "$1" || true
    ! is_mounted "$1"
}

# --- a clean slate ----------------------------------------------------------------------------
# Never rm -rf through a live mount.
if is_mounted "$MNT"; then
    echo "demo: unmounting $MNT, left mounted by an earlier run"
    unmount "$MNT" || die "$MNT is still mounted from an earlier run and will not unmount"
fi
rm -rf "$DEMO"
mkdir -p "$REG" "$MNT" "$DEMO/cache" "$DEMO/remote"

# Self-contained Git identity and no DVC analytics (nothing leaves the machine).
export GIT_AUTHOR_NAME="regfs demo" GIT_AUTHOR_EMAIL="demo@regfs.invalid"
export GIT_COMMITTER_NAME="regfs demo" GIT_COMMITTER_EMAIL="demo@regfs.invalid"
export DVC_NO_ANALYTICS=1

# --- the data ---------------------------------------------------------------------------------
# A CSV, a directory of small PNG images, a nested directory of JSON annotations.
# `make_data.py v2` appends 100 rows, redoes img_003, drops img_000, adds img_008/009 and a q3.
cat >"$DEMO/make_data.py" <<'PYTHON'
import csv, json, os, random, shutil, struct, sys, zlib

version = sys.argv[1]
rng = random.Random(42)


def png(path, width, height, rgb):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(
        b"\0" + bytes(c for x in range(width) for c in ((rgb[0] + 8 * x) % 256, (rgb[1] + 8 * y) % 256, rgb[2]))
        for y in range(height))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


shutil.rmtree("data/images", ignore_errors=True)
shutil.rmtree("data/annotations", ignore_errors=True)
os.makedirs("data/images")

with open("data/measurements.csv", "w", newline="") as f:
    out = csv.writer(f)
    out.writerow(["id", "sensor", "temperature_c", "humidity_pct"])
    for i in range(200 if version == "v1" else 300):
        out.writerow([i, f"s{i % 7}", round(rng.uniform(-5, 35), 2), round(rng.uniform(10, 90), 1)])

images = range(8) if version == "v1" else range(1, 10)
for i in images:
    color = (0, 0, 0) if (version, i) == ("v2", 3) else (i * 30 % 256, 255 - i * 20, 128)
    png(f"data/images/img_{i:03d}.png", 32, 32, color)

for quarter in ("q1", "q2") if version == "v1" else ("q1", "q2", "q3"):
    os.makedirs(f"data/annotations/2024/{quarter}")
    labels = {f"img_{i:03d}.png": ("cat", "dog")[i % 2] for i in images}
    with open(f"data/annotations/2024/{quarter}/labels.json", "w") as f:
        json.dump({"quarter": quarter, "labels": labels}, f, indent=1, sort_keys=True)
PYTHON

# sha256sum list of the data files as committed, to check the mounted files against
checksums() { find data -type f ! -name '*.dvc' ! -name .gitignore | LC_ALL=C sort | xargs sha256sum; }

# --- build the registry with the real dvc CLI -------------------------------------------------
say "Building a sample DVC registry in $REG with dvc $(dvc --version)"
(
    cd "$REG"
    git init -q -b main
    dvc init -q
    dvc remote add -d storage "$ROOT/$DEMO/remote" >/dev/null
    printf '# Sample data registry\n\nBuilt by regfs scripts/demo.sh.\n' >README.md
    git add .dvc README.md
    git commit -qm "Initialize the registry"

    python ../make_data.py v1
    dvc add -q data/measurements.csv data/images data/annotations
    git add data
    git commit -qm "v1.0: 200 measurements, 8 images, annotations for q1-q2"
    git tag -a v1.0 -m "Release v1.0"
    dvc push -q
    checksums >../v1.0.sha256

    python ../make_data.py v2
    dvc add -q data/measurements.csv data/images data/annotations
    git add data
    git commit -qm "v2.0: 300 measurements, images 1-9 (img_003 redone), annotations for q3"
    git tag -a v2.0 -m "Release v2.0"
    dvc push -q
    checksums >../v2.0.sha256

    # From here on the data exists only in the remote (and in the workspace, which regfs ignores).
    rm -rf .dvc/cache
)
show git -C "$REG" log --oneline --decorate
show du -sh "$DEMO/remote"

# --- mount it ---------------------------------------------------------------------------------
on_exit() {
    local rc=$?
    if is_mounted "$MNT"; then
        echo "demo: unmounting $MNT"
        unmount "$MNT" || echo "demo: WARNING: could not unmount $MNT" >&2
    fi
    if [ "$rc" -ne 0 ] && [ -s "$DEMO/regfs.log" ]; then
        echo "demo: failed (exit $rc); the end of $DEMO/regfs.log:" >&2
        tail -n 20 "$DEMO/regfs.log" >&2
    fi
}
trap on_exit EXIT

say "Mounting every revision of the registry"
show regfs mount "$REG" "$MNT" --cache-dir "$DEMO/cache" --log-file "$DEMO/regfs.log"

say "One symlink per branch and tag, each to an @<sha> directory holding that commit's tree"
show ls -l "$MNT"

say "The tree of v1.0, DVC-tracked data included"
show ls -l "$MNT/v1.0/"
show ls -l "$MNT/v1.0/data/" "$MNT/v1.0/data/images/"
show find "$MNT/v1.0/data/annotations" -type f

say "Reading the CSV through main (downloaded from the remote on first read)"
show head -n 5 "$MNT/main/data/measurements.csv"
show wc -l "$MNT/v1.0/data/measurements.csv" "$MNT/v2.0/data/measurements.csv"

say "What changed between v1.0 and v2.0"
show diff -rq "$MNT/v1.0/data" "$MNT/v2.0/data" || true

say "Every data file of both releases, byte for byte as committed"
for rev in v1.0 v2.0; do
    (cd "$MNT/$rev" && sha256sum --quiet -c "$ROOT/$DEMO/$rev.sha256") ||
        die "the mounted $rev differs from what was committed"
    echo "$rev: $(wc -l <"$DEMO/$rev.sha256") files OK"
done
show du -sh "$DEMO/cache"

say "Listing a revision without mounting"
show regfs ls "$REG@v1.0" -R --cache-dir "$DEMO/cache"

say "Unmounting"
show regfs umount "$MNT"
if is_mounted "$MNT"; then die "$MNT is still mounted"; fi
say "Done. The registry, its remote and the cache stay in $DEMO/ (removed by the next run)."
