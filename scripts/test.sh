#!/usr/bin/env bash
# THE test command: installs what the tests need (scripts/setup.sh --test), then runs pytest.
#
# Usage: bash scripts/test.sh [PYTEST ARGS...]      e.g.  bash scripts/test.sh -x -k mount
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh --test

# Legacy DVC 2 (own venv, see setup.sh) that the tests use to build old-format fixtures.
export REGFS_DVC2="$PWD/.venv-dvc2/bin/dvc"
# Four pytest workers (pytest-xdist), each taking whole test modules: the suite mostly waits on
# dvc, git, FUSE round trips and the retry and timeout budgets of fault tests, so four workers
# overlap those waits even on 2 cores. REGFS_TEST_WORKERS=0 runs it in one process.
exec .venv/bin/python -m pytest -n "${REGFS_TEST_WORKERS:-4}" --dist loadfile --durations=15 tests "$@"
