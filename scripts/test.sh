#!/usr/bin/env bash
# Lint, type-check and run every test suite. Called by ./dev test (after set-up).
set -uo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
status=0
echo "== ruff"; $py -m ruff check orchestrator helpers tests benchmarks lab || status=1
echo "== mypy --strict orchestrator/"; $py -m mypy --strict orchestrator || status=1
# the layering contract (pyproject.toml [tool.importlinter]): no import runs upward
echo "== import-linter"; .venv/bin/lint-imports --no-cache || status=1
echo "== pytest"
$py -m pytest -q -rs "$@"
rc=$?
# pytest's 5 means "collected no tests": that is a failure of the suite, not a pass
if [ $rc -eq 5 ]; then echo "pytest collected no tests" >&2; rc=1; fi
[ $rc -ne 0 ] && status=$rc
exit $status
