#!/usr/bin/env bash
# Runs the fuzz targets in overlay/fuzz (vxlan, switch, offload, seal), ingress/fuzz (dns, nat,
# balancer) and fuzz/ (the daemon's own parsers: gossip, peer, api, spec) with libFuzzer for a
# bounded time each; exits non-zero if any target crashes (a panic, an assertion, an
# out-of-bounds). A target with seeds (CRATE/seeds/TARGET: well-formed inputs, so that JSON and
# signed envelopes are reached at once) starts from them.
# scripts/test.sh runs it as its last pass, so CI fuzzes every change.
#
# No nightly toolchain and no cargo-fuzz: libfuzzer-sys builds libFuzzer with the C++
# compiler, and the coverage instrumentation cargo-fuzz would ask for is passed as stable
# codegen flags (sancov). Without AddressSanitizer, which needs nightly, memory errors are
# caught only where Rust checks them; the crate's unsafe is not on these paths.
#
#   scripts/fuzz.sh                 # 12 s per target (10 targets: about 2 minutes)
#   FUZZ_SECS=300 scripts/fuzz.sh   # longer
#   scripts/fuzz.sh switch          # one target
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

ov_need_cargo
SECS=${FUZZ_SECS:-12}
# Each target and the fuzz crate (its own workspace) that holds it.
declare -A CRATE=([vxlan]=overlay/fuzz [switch]=overlay/fuzz [offload]=overlay/fuzz [seal]=overlay/fuzz
  [dns]=ingress/fuzz [nat]=ingress/fuzz [balancer]=ingress/fuzz [gossip]=fuzz [peer]=fuzz [api]=fuzz [spec]=fuzz)
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(vxlan switch offload seal dns nat balancer gossip peer api spec)
for t in "${TARGETS[@]}"; do
  [ -n "${CRATE[$t]:-}" ] || ov_die "unknown fuzz target $t (known: ${!CRATE[*]})"
done
command -v c++ >/dev/null 2>&1 || ov_die "libFuzzer needs a C++ compiler (scripts/test.sh installs it): apt-get install -y g++"

TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
for crate in $(for t in "${TARGETS[@]}"; do echo "${CRATE[$t]}"; done | sort -u); do
  bins=()
  for t in "${TARGETS[@]}"; do
    if [ "${CRATE[$t]}" = "$crate" ]; then bins+=("--bin=$t"); fi
  done
  echo "== building fuzz targets in $crate (${bins[*]#--bin=}) for $TRIPLE with sancov instrumentation"
  (cd "$OV_REPO/$crate" && RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks --cfg fuzzing" \
    cargo build --release --target "$TRIPLE" "${bins[@]}")
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ovfuzz.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
failed=()
for t in "${TARGETS[@]}"; do
  corpus="$WORK/$t"
  mkdir -p "$corpus"
  # libFuzzer writes new inputs to the first directory only: the seeds stay as they are.
  seeds=()
  [ -d "$OV_REPO/${CRATE[$t]}/seeds/$t" ] && seeds=("$OV_REPO/${CRATE[$t]}/seeds/$t")
  echo "== fuzzing $t for ${SECS}s"
  # -timeout: one input taking over 10 s is a hang; -rss_limit_mb bounds memory.
  if ! "$OV_REPO/${CRATE[$t]}/target/$TRIPLE/release/$t" "$corpus" "${seeds[@]}" -max_total_time="$SECS" -timeout=10 \
    -rss_limit_mb=2048 -artifact_prefix="$WORK/$t-" -print_final_stats=1 2>"$WORK/$t.log"; then
    tail -n 40 "$WORK/$t.log" >&2
    for a in "$WORK/$t"-*; do
      [ -e "$a" ] && { echo "crashing input ($a), hex:" >&2; od -An -tx1 "$a" | head -n 20 >&2; }
    done
    failed+=("$t")
  else
    grep -E "^stat::number_of_executed_units|^stat::new_units_added" "$WORK/$t.log" | sed "s/^/   $t /"
  fi
done
[ ${#failed[@]} -eq 0 ] || ov_die "fuzz targets crashed: ${failed[*]}"
echo "== fuzz: ${TARGETS[*]} ran ${SECS}s each without a crash"
