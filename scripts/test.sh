#!/usr/bin/env bash
# THE test command (CI runs it through .ci/run): as root, installs the tools the tests drive if
# missing, builds everything, runs every test (unit, property, and the real-kernel netns tests
# in tests/), and removes namespaces left behind by killed test runs.
#
#   sudo scripts/test.sh              # debug build (fastest build; the tests are not benchmarks)
#   OVT_RELEASE=1 scripts/test.sh     # release build
#   scripts/test.sh -- TESTNAME       # extra args after -- go to the test binaries
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

ov_need_root
ov_install_deps
ov_need_cargo
cd "$OV_REPO"

PROFILE=()
[ "${OVT_RELEASE:-0}" = 1 ] && PROFILE=(--release)

# Namespaces of killed runs (their maker's pid is gone) are removed before and after.
ov_reap_stale
trap ov_reap_stale EXIT

echo "== cargo build --workspace --all-targets ${PROFILE[*]}"
cargo build --workspace --all-targets "${PROFILE[@]}"
echo "== cargo test --workspace --no-fail-fast ${PROFILE[*]}"
cargo test --workspace --no-fail-fast "${PROFILE[@]}" "$@"
