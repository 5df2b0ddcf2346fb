#!/usr/bin/env bash
# Mutation testing: each module's mutants against the tests that pin it; see bench/mutation.py.
#   bash bench/mutation.sh [MODULE ...]      e.g. bash bench/mutation.sh pipeline/metrics.py
set -euo pipefail
cd "$(dirname "$0")/.."
exec python bench/mutation.py "$@"
