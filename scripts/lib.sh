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

# Installs the Debian packages the scripts and tests use, if any of their commands is missing:
# iproute2, iperf3, ping, curl, python3, ps, ethtool, sockperf (bench: TCP request/response),
# nftables (the daemon's egress rules; tests read them with `nft`), busybox-static
# (tests/docker.rs and tests/podman.rs build their container image from the static busybox), and
# podman with runc (tests/podman.rs runs it with its CNI backend and overlayd-cni).
ov_install_deps() {
  local missing=() cmd
  for cmd in ip bridge iperf3 ping curl python3 ps ethtool sockperf c++ nft tcpdump podman runc; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  ov_have_static_busybox || missing+=("busybox-static")
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || ov_die "missing ${missing[*]} and no apt-get to install them"
  ov_log "installing packages for: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq || ov_die "apt-get update failed (or took over 300 s)"
  timeout 600 apt-get install -y -qq iproute2 iperf3 iputils-ping curl python3 procps ethtool sockperf g++ \
    nftables busybox-static tcpdump podman runc >/dev/null || ov_die "apt-get install failed (or took over 600 s)"
  for cmd in "${missing[@]}"; do
    if [ "$cmd" = busybox-static ]; then
      ov_have_static_busybox || ov_die "no static busybox after apt-get install busybox-static"
    else
      command -v "$cmd" >/dev/null 2>&1 || ov_die "$cmd still missing after apt-get install"
    fi
  done
}

# Whether /bin/busybox is the statically linked one (Debian busybox-static): a container image of
# busybox alone needs it.
ov_have_static_busybox() {
  [ -x /bin/busybox ] || return 1
  if command -v dpkg-query >/dev/null 2>&1; then
    dpkg-query -W -f '${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'
  else
    ! ldd /bin/busybox >/dev/null 2>&1 # ldd fails on a static binary
  fi
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
# ovd<pid>-* (demo), ovb<pid>[knorim]* (bench); also their /etc/netns entries, the tests' temp
# dirs $TMPDIR/ovt-<test>-<pid> (after the podman containers kept there), the tests' Docker
# containers and images, and the namespace names overlayd-cni made (ovc-*) that no process uses.
ov_reap_stale() {
  local ns pid
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}'); do
    if [[ $ns =~ ^ovt-[a-z0-9]+-([0-9]+)- || $ns =~ ^ovd([0-9]+)- || $ns =~ ^ovb([0-9]+)[knorim] ||
      $ns =~ ^ovs([0-9]+)- ]]; then
      pid=${BASH_REMATCH[1]}
      kill -0 "$pid" 2>/dev/null && continue
      ov_ns_kill_del "$ns"
    fi
  done
  ov_reap_stale_podman
  local d
  for d in /etc/netns/ovt-* /etc/netns/ovd* /etc/netns/ovb*; do
    [[ -d $d && ${d##*/} =~ ^ovt-[a-z0-9]+-([0-9]+)-|^ovd([0-9]+)-|^ovb([0-9]+)[knorim] ]] || continue
    pid=${BASH_REMATCH[1]}${BASH_REMATCH[2]}${BASH_REMATCH[3]}
    kill -0 "$pid" 2>/dev/null || rm -rf "$d"
  done
  for d in "${TMPDIR:-/tmp}"/ovt-*-[0-9]*; do
    [[ -d $d && $d =~ -([0-9]+)$ ]] || continue
    kill -0 "${BASH_REMATCH[1]}" 2>/dev/null || rm -rf "$d"
  done
  ov_reap_stale_docker
}

# Podman containers of killed test runs: each run keeps podman's config and storage in
# $TMPDIR/ovt-<test>-<pid>/podman (tests/podman.rs). Then the names overlayd-cni gave runtimes'
# namespaces (/run/netns/ovc-*) that no process is in: their DEL never came, or failed.
ov_reap_stale_podman() {
  local d ns
  for d in "${TMPDIR:-/tmp}"/ovt-*-[0-9]*/podman; do
    [[ -f $d/containers.conf && $d =~ -([0-9]+)/podman$ ]] || continue
    kill -0 "${BASH_REMATCH[1]}" 2>/dev/null && continue
    CONTAINERS_CONF=$d/containers.conf timeout 60 podman --root "$d/root" --runroot "$d/runroot" \
      --tmpdir "$d/tmp" --storage-driver vfs rm -af -t 0 >/dev/null 2>&1 || true
  done
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}'); do
    [[ $ns == ovc-* && -z $(ip netns pids "$ns" 2>/dev/null) ]] && ip netns del "$ns" 2>/dev/null
  done
  return 0
}

# Docker containers and networks (ovt-<test>-<pid>-*) and images (ovt-<test>-<pid>:*) of killed
# test runs. Every docker call is bounded; nothing happens when no Docker daemon answers. (A
# network of driver overlayd goes only while a daemon serves the plugin; Docker waits for it
# first, hence the short timeout.)
ov_reap_stale_docker() {
  command -v docker >/dev/null 2>&1 || return 0
  timeout 10 docker version >/dev/null 2>&1 || return 0
  local name
  for name in $(timeout 10 docker ps -a --format '{{.Names}}' 2>/dev/null); do
    [[ $name =~ ^ovt-[a-z0-9]+-([0-9]+)- ]] || continue
    kill -0 "${BASH_REMATCH[1]}" 2>/dev/null || timeout 30 docker rm -f -v "$name" >/dev/null 2>&1 || true
  done
  for name in $(timeout 10 docker network ls --format '{{.Name}}' 2>/dev/null); do
    [[ $name =~ ^ovt-[a-z0-9]+-([0-9]+)- ]] || continue
    kill -0 "${BASH_REMATCH[1]}" 2>/dev/null || timeout 10 docker network rm "$name" >/dev/null 2>&1 || true
  done
  for name in $(timeout 10 docker images --format '{{.Repository}}:{{.Tag}}' 2>/dev/null); do
    [[ $name =~ ^ovt-[a-z0-9]+-([0-9]+): ]] || continue
    kill -0 "${BASH_REMATCH[1]}" 2>/dev/null || timeout 30 docker rmi -f "$name" >/dev/null 2>&1 || true
  done
}

# Kills every process inside namespace $1, then deletes it.
ov_ns_kill_del() {
  local p
  for p in $(ip netns pids "$1" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  ip netns del "$1" 2>/dev/null || true
  rm -rf "/etc/netns/$1" # the resolv.conf `overlayd attach` wrote; `ip netns del` leaves it
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

# ov_kernel_vxlan_pair P: the topology of ../shared/anchors/netns-vxlan-baseline.sh, built with
# its commands (links are made directly in their namespaces, so nothing is left in the root
# namespace if the script dies): nodes ${P}n1, ${P}n2 joined by one veth (${P}u1/${P}u2,
# underlay 198.18.0.1-2/24, MTU 1500); on each node bridge br0 with vx0 (VXLAN id 42, dstport
# 4789, remote = the other node) and a veth ${P}h<i> to container ${P}c<i> (eth0 198.19.0.<i>/24,
# MTU 1450). Waits (10 s) until c1 pings c2.
ov_kernel_vxlan_pair() {
  local P=$1 i o
  for i in n1 n2 c1 c2; do ov_ns_add "${P}$i"; done
  ip -n "${P}n1" link add "${P}u1" type veth peer name "${P}u2" netns "${P}n2"
  ip -n "${P}n1" addr add 198.18.0.1/24 dev "${P}u1"; ip -n "${P}n1" link set "${P}u1" up
  ip -n "${P}n2" addr add 198.18.0.2/24 dev "${P}u2"; ip -n "${P}n2" link set "${P}u2" up
  for i in 1 2; do
    o=$((3 - i))
    ip -n "${P}n$i" link add br0 type bridge; ip -n "${P}n$i" link set br0 up
    ip -n "${P}n$i" link add vx0 type vxlan id 42 dstport 4789 local "198.18.0.$i" remote "198.18.0.$o" dev "${P}u$i"
    ip -n "${P}n$i" link set vx0 master br0 up
    ip -n "${P}n$i" link add "${P}h$i" type veth peer name eth0 netns "${P}c$i"
    ip -n "${P}n$i" link set "${P}h$i" master br0 up
    ip -n "${P}c$i" addr add "198.19.0.$i/24" dev eth0; ip -n "${P}c$i" link set eth0 mtu 1450 up
  done
  ov_wait 10 "kernel VXLAN ping ${P}c1 -> 198.19.0.2" ip netns exec "${P}c1" ping -c1 -W1 198.19.0.2
}

# ov_daemon NS LOG ARGS...: starts `overlayd ARGS` in NS in the background, output to LOG.
# Sets OV_LAST_PID (ip netns exec execs, so it is overlayd's own pid).
ov_daemon() {
  local ns=$1 log=$2; shift 2
  RUST_BACKTRACE=1 NO_COLOR=1 ip netns exec "$ns" "$OVERLAYD" "$@" </dev/null >>"$log" 2>&1 &
  OV_LAST_PID=$!
  OV_PIDS+=("$OV_LAST_PID")
}

# ov_cli API ARGS...: the overlayd CLI against the daemon listening on API; killed after 60 s
# (the daemon bounds its own waits well below that).
ov_cli() {
  local api=$1; shift
  OVERLAYD_API=$api timeout 60 "$OVERLAYD" "$@"
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

# ov_attach API NETNS NETWORK [ARGS...]: attaches (with extra attach ARGS, e.g. --service S) and
# prints the container's address (no prefix length).
ov_attach() {
  ov_cli "$1" attach "$2" --network "$3" "${@:4}" --json |
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

# ov_cluster_down TAG N NS...: undoes ov_cluster of N nodes and what hangs off it, so that the next
# ov_cluster starts afresh: deletes the namespaces NS (give containers before nodes; their
# processes, the daemons included, are killed) and the nodes' state dirs and API sockets. The
# logs stay in $OV_WORK as TAG-n<i>.log.
ov_cluster_down() {
  local tag=$1 n=$2 ns p i
  shift 2
  for ns in "$@"; do
    # This shell's own children first, each waited for at once: bash then does not report them
    # as "Killed" later.
    for p in $(ip netns pids "$ns" 2>/dev/null); do
      [[ " ${OV_PIDS[*]} " == *" $p "* ]] || continue
      kill -9 "$p" 2>/dev/null || true
      wait "$p" 2>/dev/null || true
    done
    ov_ns_kill_del "$ns"
  done
  for ((i = 1; i <= n; i++)); do
    rm -rf "$OV_WORK/n$i-state" "$OV_WORK/n$i.sock"
    mv "$OV_WORK/n$i.log" "$OV_WORK/$tag-n$i.log" 2>/dev/null || true
  done
}

# ov_overlay_pair PREFIX: the benchmark topology run by overlayd: nodes PREFIXn1 and PREFIXn2 on
# one veth (198.18.0.1-2/24, MTU 1500) in a cluster, network "bench" (198.19.0.0/24, MTU 1450),
# container PREFIXc1 attached on node 1 and PREFIXc2 on node 2. Sets OV_C2_IP to c2's address.
ov_overlay_pair() {
  local p=$1
  ov_ns_add "${p}n1"
  ov_ns_add "${p}n2"
  ov_wire "${p}n1" 198.18.0.1/24 "${p}n2" 198.18.0.2/24
  ov_cluster "$p" 2 "198.18.0.%d"
  ov_cli "${OV_API[1]}" network create bench --subnet 198.19.0.0/24 --mtu 1450 >/dev/null
  ov_wait 20 "network bench on node 2" ov_network_known "${OV_API[2]}" bench
  ov_ns_add "${p}c1"
  ov_ns_add "${p}c2"
  ov_attach "${OV_API[1]}" "${p}c1" bench >/dev/null
  OV_C2_IP=$(ov_attach "${OV_API[2]}" "${p}c2" bench)
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

# ov_cleanup [RC]: kills what ov_daemon/ov_bg started, deletes the namespaces, removes OV_WORK
# (printing the logs first when RC, by default the exit status, is not 0).
# Install with: trap ov_cleanup EXIT
ov_cleanup() {
  local rc=${1:-$?} i p
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
