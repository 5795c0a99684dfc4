# shellcheck shell=bash disable=SC2034 # (variables here are used by the scripts that source it)
# Shared by scripts/test.sh, demo.sh and bench.sh: root and tool checks, network-namespace
# building blocks, the overlayd daemon and CLI, bounded waits, cleanup. Source it; it defines
# functions and a few variables, and runs nothing.
#
# Addresses come only from 198.18.0.0/15 (underlay 198.18.x.x, overlays 198.19.x.x).
# Every namespace a script makes is recorded and deleted by ov_cleanup, every daemon killed.

OV_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OV_NAMESPACES=()   # made by ov_ns_add, deleted (in reverse) by ov_cleanup
OV_PIDS=()         # started by ov_daemon / ov_bg, killed by ov_cleanup
OV_WORK=""         # temp dir (logs, state dirs, sockets), removed by ov_cleanup
OVERLAYD=${OVERLAYD:-}

ov_die() { echo "error: $*" >&2; exit 1; }
ov_log() { echo "== $*" >&2; }

ov_need_root() {
  [ "$(id -u)" = 0 ] || ov_die "must run as root: it builds network namespaces (try: sudo $0)"
}

# Installs the Debian packages the scripts and tests use, if any of their commands is missing.
ov_install_deps() {
  local missing=() cmd
  for cmd in ip bridge iperf3 ping curl python3 ps ethtool; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || ov_die "missing ${missing[*]} and no apt-get to install them"
  ov_log "installing packages for: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq iproute2 iperf3 iputils-ping curl python3 procps ethtool >/dev/null
  for cmd in "${missing[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || ov_die "$cmd still missing after apt-get install"
  done
}

# Makes cargo reachable (rustup puts it in ~/.cargo/bin, which non-login shells may lack).
ov_need_cargo() {
  if ! command -v cargo >/dev/null 2>&1 && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
    PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
  fi
  command -v cargo >/dev/null 2>&1 ||
    ov_die "cargo not found: install a Rust toolchain (https://rustup.rs) or put cargo on PATH"
}

# Builds the release binary and sets OVERLAYD to it.
ov_build_release() {
  ov_need_cargo
  ov_log "building overlayd (release)"
  (cd "$OV_REPO" && cargo build --release --bin overlayd)
  OVERLAYD="$OV_REPO/target/release/overlayd"
  [ -x "$OVERLAYD" ] || ov_die "no binary at $OVERLAYD after the build"
}

# ov_wait SECONDS WHAT CMD...: runs CMD every 0.2 s until it succeeds; dies after SECONDS.
ov_wait() {
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || ov_die "timed out after ${secs}s waiting for $what"
    sleep 0.2
  done
}

# Deletes namespaces left by killed runs: names carry the pid of their maker, and those whose
# maker is gone are removed (with their processes). Patterns: ovt-<test>-<pid>-* (cargo tests),
# ovd<pid>-* (demo), ovb<pid>[kno]* (bench); also the tests' temp dirs $TMPDIR/ovt-<test>-<pid>.
ov_reap_stale() {
  local ns pid
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}'); do
    if [[ $ns =~ ^ovt-[a-z0-9]+-([0-9]+)- || $ns =~ ^ovd([0-9]+)- || $ns =~ ^ovb([0-9]+)[kno] ]]; then
      pid=${BASH_REMATCH[1]}
      kill -0 "$pid" 2>/dev/null && continue
      ov_ns_kill_del "$ns"
    fi
  done
  local d
  for d in "${TMPDIR:-/tmp}"/ovt-*-[0-9]*; do
    [[ -d $d && $d =~ -([0-9]+)$ ]] || continue
    kill -0 "${BASH_REMATCH[1]}" 2>/dev/null || rm -rf "$d"
  done
}

# Kills every process inside namespace $1, then deletes it.
ov_ns_kill_del() {
  local p
  for p in $(ip netns pids "$1" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  ip netns del "$1" 2>/dev/null || true
}

# ov_ns_add NAME: a fresh namespace with lo up, deleted by ov_cleanup.
ov_ns_add() {
  ip netns del "$1" 2>/dev/null || true
  ip netns add "$1"
  OV_NAMESPACES+=("$1")
  ip -n "$1" link set lo up
}

# ov_switch NS: a namespace holding bridge br0, the switch nodes plug into.
ov_switch() {
  ov_ns_add "$1"
  ip -n "$1" link add br0 type bridge
  ip -n "$1" link set br0 up
}

# ov_plug SWITCH PORT NS ADDR/LEN: veth from the switch bridge (port PORT) to eth0 in NS, MTU 1500.
ov_plug() {
  ip -n "$1" link add "$2" type veth peer name eth0 netns "$3"
  ip -n "$1" link set "$2" master br0 up
  ip -n "$3" addr add "$4" dev eth0
  ip -n "$3" link set eth0 mtu 1500 up
}

# ov_wire NS1 ADDR1/LEN NS2 ADDR2/LEN: one veth joining two namespaces directly, eth0 on both ends.
ov_wire() {
  ip -n "$1" link add eth0 type veth peer name eth0 netns "$3"
  ip -n "$1" addr add "$2" dev eth0
  ip -n "$3" addr add "$4" dev eth0
  ip -n "$1" link set eth0 mtu 1500 up
  ip -n "$3" link set eth0 mtu 1500 up
}

# ov_daemon NS LOG ARGS...: starts `overlayd ARGS` in NS in the background, output to LOG.
# Sets OV_LAST_PID (ip netns exec execs, so it is overlayd's own pid).
ov_daemon() {
  local ns=$1 log=$2; shift 2
  RUST_BACKTRACE=1 NO_COLOR=1 ip netns exec "$ns" "$OVERLAYD" "$@" </dev/null >>"$log" 2>&1 &
  OV_LAST_PID=$!
  OV_PIDS+=("$OV_LAST_PID")
}

# ov_cli API ARGS...: the overlayd CLI against the daemon listening on API.
ov_cli() {
  local api=$1; shift
  OVERLAYD_API=$api "$OVERLAYD" "$@"
}

# ov_token STATE_DIR LOG PID: waits (20 s) for the join token: STATE_DIR/join-token, else the
# `--token TOKEN` line in LOG. Dies with the log if the daemon exits first.
ov_token() {
  local dir=$1 log=$2 pid=$3 deadline=$((SECONDS + 20)) t
  while :; do
    if [ -s "$dir/join-token" ]; then tr -d '[:space:]' <"$dir/join-token"; return; fi
    t=$(sed -n 's/.*--token[= ]\+\([^ "'\''`]\+\).*/\1/p' "$log" | head -n1)
    if [ -n "$t" ]; then echo "$t"; return; fi
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; ov_die "overlayd init exited before handing out a token"; }
    [ "$SECONDS" -lt "$deadline" ] || { cat "$log" >&2; ov_die "no join token after 20s"; }
    sleep 0.2
  done
}

# ov_ready_count API: how many nodes `node ls --json` shows ready (0 if the daemon is not up).
ov_ready_count() {
  ov_cli "$1" node ls --json 2>/dev/null |
    python3 -c 'import json,sys; print(sum(n.get("state") == "ready" for n in json.load(sys.stdin)))' 2>/dev/null ||
    echo 0
}

ov_has_ready() { [ "$(ov_ready_count "$1")" -ge "$2" ]; }

# ov_network_known API NAME: whether `network ls --json` lists NAME.
ov_network_known() {
  ov_cli "$1" network ls --json 2>/dev/null |
    python3 -c 'import json,sys; sys.exit(0 if any(n["name"] == sys.argv[1] for n in json.load(sys.stdin)) else 1)' "$2"
}

# ov_attach API NETNS NETWORK: attaches and prints the container's address (no prefix length).
ov_attach() {
  ov_cli "$1" attach "$2" --network "$3" --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["ip"].split("/")[0])'
}

# ov_cluster PREFIX N ADDR_FMT: starts overlayd on namespaces ${PREFIX}n1..nN whose underlay
# address is printf ADDR_FMT i (e.g. 198.18.0.%d): init on n1, join on the rest, waits (30 s)
# until node 1 shows N ready. Per node i: state dir, API socket and log in $OV_WORK as
# n<i>-state, n<i>.sock, n<i>.log; pids in OV_NODE_PID[i]; API path in OV_API[i].

declare -a OV_NODE_PID=() OV_API=()
ov_cluster() {
  local prefix=$1 n=$2 fmt=$3 i addr first token
  # shellcheck disable=SC2059 # the format is the point
  first=$(printf "$fmt" 1)
  for ((i = 1; i <= n; i++)); do
    # shellcheck disable=SC2059
    addr=$(printf "$fmt" "$i")
    OV_API[i]="$OV_WORK/n$i.sock"
    if [ "$i" = 1 ]; then
      ov_daemon "${prefix}n$i" "$OV_WORK/n$i.log" init --advertise-addr "$addr" \
        --state-dir "$OV_WORK/n$i-state" --api "${OV_API[i]}"
      OV_NODE_PID[i]=$OV_LAST_PID
      token=$(ov_token "$OV_WORK/n1-state" "$OV_WORK/n1.log" "$OV_LAST_PID")
    else
      ov_daemon "${prefix}n$i" "$OV_WORK/n$i.log" join "$first" --token "$token" --advertise-addr "$addr" \
        --state-dir "$OV_WORK/n$i-state" --api "${OV_API[i]}"
      OV_NODE_PID[i]=$OV_LAST_PID
    fi
  done
  ov_wait 30 "$n nodes ready" ov_has_ready "${OV_API[1]}" "$n"
}

# ov_dump_logs: prints the daemons' logs (for failures).
ov_dump_logs() {
  local f
  for f in "$OV_WORK"/*.log; do
    [ -f "$f" ] || continue
    echo "----- $f -----" >&2
    tail -n 100 "$f" >&2
  done
}

# ov_cleanup: kills what ov_daemon/ov_bg started, deletes the namespaces, removes OV_WORK.
# Install with: trap ov_cleanup EXIT
ov_cleanup() {
  local rc=$? i p
  for p in "${OV_PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${OV_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  for ((i = ${#OV_NAMESPACES[@]} - 1; i >= 0; i--)); do ov_ns_kill_del "${OV_NAMESPACES[i]}"; done
  if [ -n "$OV_WORK" ] && [ -d "$OV_WORK" ]; then
    [ "$rc" -ne 0 ] && ov_dump_logs
    rm -rf "$OV_WORK"
  fi
  return "$rc"
}

ov_workdir() { OV_WORK=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX"); }
