#!/usr/bin/env bash
# THE test command (CI runs it through .ci/run): as root, installs the tools the tests drive if
# missing, builds everything, runs every test (unit, property, and the real-kernel netns tests
# in tests/), and removes namespaces (and Docker leftovers) of killed test runs.
#
# The netns integration tests (tests/*.rs) run twice: pass 1 with the data plane's offloads on
# (with everything else), pass 2 with them forced off (OVERLAYD_NO_OFFLOADS=true; the harness starts
# every daemon with --no-offloads), the fallback path for kernels that refuse them. Both passes
# always run. Pass 3 fuzzes (scripts/fuzz.sh: vxlan, switch, offload, seal, dns, nat, balancer,
# and the daemon's gossip, peer, api and spec parsers; 12 s each, FUZZ_SECS to change).
# The exit status is non-zero if any pass failed.
#
#   sudo scripts/test.sh              # debug build (fastest build; the tests are not benchmarks)
#   OVT_RELEASE=1 scripts/test.sh     # release build
#   scripts/test.sh -- TESTNAME       # extra args after -- go to the test binaries (both passes)
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

echo "== [pass 1/3] offloads ON: cargo test --workspace --no-fail-fast ${PROFILE[*]} $*"
pass1=ok
cargo test --workspace --no-fail-fast "${PROFILE[@]}" "$@" || pass1=FAILED

# The harness turns the variable into --no-offloads for every daemon it starts; the daemon's own
# flag reads it too (1/true/yes/on), for tests that run the binary directly.
echo "== [pass 2/3] offloads FORCED OFF: OVERLAYD_NO_OFFLOADS=true cargo test --no-fail-fast --test '*' ${PROFILE[*]} $*"
pass2=ok
OVERLAYD_NO_OFFLOADS=true cargo test --no-fail-fast --test '*' "${PROFILE[@]}" "$@" || pass2=FAILED

echo "== [pass 3/3] fuzzing: scripts/fuzz.sh (FUZZ_SECS=${FUZZ_SECS:-12} per target)"
pass3=ok
bash "$OV_REPO/scripts/fuzz.sh" || pass3=FAILED

echo "== pass 1 (unit, property, netns; offloads on): $pass1"
echo "== pass 2 (netns; offloads forced off):         $pass2"
echo "== pass 3 (fuzz targets):                       $pass3"
[ "$pass1" = ok ] && [ "$pass2" = ok ] && [ "$pass3" = ok ]
