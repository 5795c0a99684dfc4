#!/usr/bin/env bash
# The benchmark: overlayd against the anchors, in one run, on the anchors' topology.
#
#   node 1 ──(one veth, underlay 198.18.0.x/24, MTU 1500)── node 2
#   container 1 (MTU 1450) on node 1, container 2 on node 2, iperf3/ping/sockperf between them
#
# Runs ../../shared/anchors/netns-vxlan-baseline.sh (kernel VXLAN), netns-nebula-baseline.sh
# (installing Debian's nebula if missing), then overlayd on the same topology with the
# same iperf3/ping commands, and prints one table of ratios (issue 3). Ratios only mean something
# within one run, on an otherwise idle machine (CPU is measured system-wide).
#
# - Throughput per CPU-second, measured the same way for all three: busy CPU of the whole
#   machine (/proc/stat: user+nice+system+irq+softirq+steal, so iperf3, softirq and daemons all
#   count) during the single-stream TCP phase, Gbit moved (rate x DUR) per busy CPU-second. The
#   anchors are not edited: their stdout goes through a reader that snapshots /proc/stat at each
#   completed line, and the phase is the "c1->c2:" (kernel) / "n1->n2:" (Nebula) line minus the
#   line before it (iperf3 server start, 0.5 s sleep, the run). overlayd's phase is bracketed the
#   same way (server start, the run).
# - TCP request/response: `sockperf pp --tcp -t DUR` against `sockperf sr --tcp`. The anchor cannot
#   be extended, so the kernel's number comes from the identical topology built by
#   ov_kernel_vxlan_pair (lib.sh), torn down before overlayd is measured.
# - Services (a second table, overlayd only): service "web" on the bench network with one task,
#   container t2 on node 2. c1 runs the same iperf3 and sockperf against t2's own address
#   (direct) and against the VIP, which node 1's balancer NATs to t2: the same path plus the
#   balancer. Each twice (direct, VIP, VIP, direct), averaged. Then c1 sends one UDP datagram on each of ~100k (client port, VIP port) pairs, each
#   a flow node 1's balancer tracks for 30 s, and node 1's daemon RSS is read while they are.
# - Routing mesh (a third table, issue 10; scripts/bench-mesh.sh): a client on the underlay hits
#   node 1's published port, 3 nodes with an nginx task each, keep-alive and new-connection
#   requests/s (wrk) and bulk Gbit/s (iperf3, to a task on node 2). Runs
#   ../../shared/anchors/netns-ingress-baseline.sh (nftables DNAT and HAProxy on the kernel's VXLAN),
#   then overlayd on its topology with its wrk and iperf3 commands; installs nginx-light, haproxy,
#   wrk and nftables if missing.
#
#   DUR=5 scripts/bench.sh        # seconds per iperf3/sockperf/wrk run (default 5)
#   ONLY=mesh scripts/bench.sh    # only the routing-mesh rows
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=scripts/bench-mesh.sh
source "$(dirname "$0")/bench-mesh.sh"

DUR=${DUR:-5}
ONLY=${ONLY:-}
case $ONLY in
'' | mesh) ;;
*) echo "error: ONLY=$ONLY: the only part that runs alone is ONLY=mesh (or unset ONLY for the whole bench)" >&2; exit 64 ;;
esac
CMDLINE="DUR=$DUR${ONLY:+ ONLY=$ONLY} $0${*:+ $*}"
echo "== command: $CMDLINE"
ANCHORS="$(dirname "$0")/../../shared/anchors"
[ -f "$ANCHORS/netns-vxlan-baseline.sh" ] ||
  ov_die "anchor scripts not found in $ANCHORS (shared/ must sit beside the repository clone)"
ANCHORS=$(cd "$ANCHORS" && pwd)

# apt_for WHAT PACKAGE:COMMAND...: installs (Debian) the packages whose command is missing. If
# that fails, says that WHAT will show n/a and returns 1.
apt_for() {
  local what=$1 pc pkgs=()
  shift
  for pc in "$@"; do
    command -v "${pc#*:}" >/dev/null 2>&1 || [[ " ${pkgs[*]} " == *" ${pc%%:*} "* ]] || pkgs+=("${pc%%:*}")
  done
  [ ${#pkgs[@]} -eq 0 ] && return 0
  ov_log "installing ${pkgs[*]} (Debian's packages) for $what"
  if command -v apt-get >/dev/null 2>&1 &&
    DEBIAN_FRONTEND=noninteractive timeout 300 apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq "${pkgs[@]}" >/dev/null; then
    return 0
  fi
  ov_log "installing ${pkgs[*]} failed: $what will be n/a"
  return 1
}

ov_need_root
ov_install_deps
[ -n "$ONLY" ] || apt_for "the Nebula column" nebula:nebula nebula:nebula-cert || true
MESH_TOOLS_OK=1
apt_for "the routing-mesh rows" "${MESH_TOOLS[@]}" || MESH_TOOLS_OK=
ov_reap_stale
ov_build_release
ov_workdir ovbench
trap ov_cleanup EXIT
# Ctrl-C stops the run: the tools it waits for (wrk, iperf3, the daemons) exit cleanly on SIGINT,
# and bash would go on with the next step.
trap 'exit 130' INT TERM
# + k (kernel anchor), n (nebula anchor), r (kernel sockperf), o (overlayd), i (ingress anchor),
# m (overlayd mesh); short: veth names use it
P="ovb$$"
if pgrep -x iperf3 >/dev/null || pgrep -x sockperf >/dev/null; then
  ov_log "WARNING: another iperf3/sockperf is running (another benchmark?): both runs' numbers are skewed"
fi

# --- /proc/stat snapshots ------------------------------------------------------------------------
# stamp FILE [RSS_NS RSS_OUT]: copies stdin to stdout line by line; when a line is complete,
# appends "<first line of /proc/stat><TAB><the line>" to FILE. With RSS_NS: at the first line
# containing "ping ok", writes the RSS (MB) of the processes in namespace RSS_NS to RSS_OUT.
stamp() {
  local out=$1 rss_ns=${2:-} rss_out=${3:-} line cpu
  while IFS= read -r line || [ -n "$line" ]; do
    read -r cpu </proc/stat
    printf '%s\t%s\n' "$cpu" "$line" >>"$out"
    printf '%s\n' "$line"
    if [ -n "$rss_ns" ] && [[ $line == *"ping ok"* ]] && [ ! -s "$rss_out" ]; then
      ns_rss_mb "$rss_ns" >"$rss_out" || true
    fi
  done
}

# ns_rss_mb NS: summed VmRSS (MB) of the processes in namespace NS ("n/a" if none).
ns_rss_mb() {
  local kb=0 p v
  for p in $(ip netns pids "$1" 2>/dev/null); do
    v=$(awk '/^VmRSS/{print $2}' "/proc/$p/status" 2>/dev/null) || continue
    kb=$((kb + ${v:-0}))
  done
  if [ "$kb" -gt 0 ]; then awk -v k="$kb" 'BEGIN{printf "%.1f", k/1024}'; else echo "n/a"; fi
}

# busy_cpu_s FILE REGEX: busy CPU-seconds (all CPUs) between the snapshot at the end of the line
# before the first line matching REGEX and the snapshot at the end of that line.
busy_cpu_s() {
  python3 - "$1" "$2" "$(getconf CLK_TCK)" <<'PY' 2>/dev/null || echo "n/a"
import re, sys
path, pat, hz = sys.argv[1], re.compile(sys.argv[2]), int(sys.argv[3])
def busy(cpu):  # cpu user nice system idle iowait irq softirq steal ...
    f = [int(x) for x in cpu.split()[1:9]]
    return f[0] + f[1] + f[2] + f[5] + f[6] + f[7]
prev = None
for row in open(path, errors="replace"):
    cpu, _, line = row.rstrip("\n").partition("\t")
    if pat.search(line) and prev is not None:
        print("%.2f" % ((busy(cpu) - busy(prev)) / hz))
        break
    prev = cpu
else:
    print("n/a")
PY
}

# snap: the first line of /proc/stat now. delta_cpu_s A B: busy CPU-seconds from snapshot A to B.
snap() { local cpu; read -r cpu </proc/stat; echo "$cpu"; }
delta_cpu_s() {
  local f
  f=$(mktemp "$OV_WORK/stamp.XXXXXX")
  printf '%s\tbefore\n%s\tafter\n' "$1" "$2" >"$f"
  busy_cpu_s "$f" '^after$'
}

# per_cpu GBITPS CPU_S: Gbit moved in the DUR-second run per busy CPU-second.
per_cpu() { awk -v g="$1" -v c="$2" -v d="$DUR" 'BEGIN { if (g ~ /^[0-9.]+$/ && c ~ /^[0-9.]+$/ && c > 0) printf "%.2f", g * d / c; else print "n/a" }'; }

# sockperf_rtt SERVER_NS CLIENT_NS IP [DIAL]: TCP ping-pong for DUR s against the server on IP,
# the client dialling DIAL (default IP; a VIP that leads to IP); prints the average round trip in
# microseconds (sockperf reports half of it as "Latency"), or n/a.
sockperf_rtt() {
  local sns=$1 cns=$2 ip=$3 dial=${4:-$3} spid lat
  ip netns exec "$sns" sockperf sr --tcp -i "$ip" -p 11111 >"$OV_WORK/sockperf-sr-$sns.log" 2>&1 &
  spid=$!
  OV_PIDS+=("$spid")
  ov_wait 10 "sockperf server in $sns" bash -c "ip netns exec '$sns' ss -Hltn 'sport = :11111' | grep -q ."
  lat=$(timeout $((DUR + 30)) ip netns exec "$cns" sockperf pp --tcp -i "$dial" -p 11111 -t "$DUR" 2>&1 |
    sed -n 's/.*Summary: Latency is \([0-9.]*\) usec.*/\1/p' | head -n1) || true
  kill "$spid" 2>/dev/null || true
  wait "$spid" 2>/dev/null || true
  if [[ $lat =~ ^[0-9.]+$ ]]; then awk -v l="$lat" 'BEGIN{printf "%.1f", 2 * l}'; else echo "n/a"; fi
}

# iperf FILE CLIENT_NS SERVER_NS DIAL ARGS...: one iperf3 run from CLIENT_NS to DIAL port 5201
# (one-off server in SERVER_NS, which DIAL reaches), JSON to FILE.
iperf() {
  local out=$1 cns=$2 sns=$3 dial=$4 spid
  shift 4
  ip netns exec "$sns" iperf3 -s -1 -p 5201 >/dev/null 2>&1 &
  spid=$!
  OV_PIDS+=("$spid")
  ov_wait 10 "iperf3 server in $sns" bash -c "ip netns exec '$sns' ss -Hltn 'sport = :5201' | grep -q ."
  timeout $((DUR + 30)) ip netns exec "$cns" iperf3 -c "$dial" -p 5201 -t "$DUR" -J "$@" >"$out" || true
  kill "$spid" 2>/dev/null || true
  wait "$spid" 2>/dev/null || true
}
gbps() { python3 -c 'import json,sys;d=json.load(open(sys.argv[1]));print("%.2f"%(d["end"]["sum_received"]["bits_per_second"]/1e9))' "$1" 2>/dev/null || echo "n/a"; }

# mean A B: their average, or n/a. ratio A B: A/B, or n/a.
mean() { awk -v a="$1" -v b="$2" 'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/) printf "%.2f", (a + b) / 2; else print "n/a" }'; }
ratio() { awk -v o="$1" -v k="$2" 'BEGIN { if (o ~ /^[0-9.]+$/ && k ~ /^[0-9.]+$/ && k > 0) printf "%.2f", o / k; else print "n/a" }'; }

# mesh_rows: the routing-mesh part, measured and printed; dies if overlayd's side got no number.
mesh_rows() {
  mesh_measure "$P"
  echo
  mesh_table
  [[ $MESH_O_KA != n/a ]] || ov_die "overlayd routing-mesh measurement failed (see above)"
}

# CPU is measured machine-wide, so say how busy the machine was before anything started.
I0=$(snap); sleep 1; I1=$(snap)
IDLE_BUSY=$(delta_cpu_s "$I0" "$I1")
echo "machine busy before the run: $IDLE_BUSY CPU-s in 1 s (of $(nproc)); more than ~0.1 skews the per-CPU row"
if [ "$ONLY" = mesh ]; then
  echo "DUR=${DUR}s, $(nproc) cores, kernel $(uname -r); ratios are from this one run"
  mesh_rows
  exit 0
fi

# --- anchors -------------------------------------------------------------------------------------
ov_log "kernel VXLAN anchor (DUR=$DUR)"
if ! P="${P}k" DUR=$DUR bash "$ANCHORS/netns-vxlan-baseline.sh" 2>&1 | stamp "$OV_WORK/kernel.stamped" | tee "$OV_WORK/kernel.txt"; then
  ov_log "kernel VXLAN anchor failed (its numbers show as n/a)"
fi
N_RSS="n/a"
if command -v nebula >/dev/null 2>&1 && command -v nebula-cert >/dev/null 2>&1; then
  ov_log "Nebula anchor (DUR=$DUR)"
  if ! P="${P}n" DUR=$DUR bash "$ANCHORS/netns-nebula-baseline.sh" 2>&1 |
    stamp "$OV_WORK/nebula.stamped" "${P}nn1" "$OV_WORK/nebula.rss" | tee "$OV_WORK/nebula.txt"; then
    ov_log "Nebula anchor failed (its numbers show as n/a)"
  fi
  N_RSS=$(cat "$OV_WORK/nebula.rss" 2>/dev/null || echo "n/a")
else
  ov_log "nebula not installed (apt-get install nebula): Nebula column is n/a"
fi

# field LABEL_REGEX FILE: the number right after "LABEL: " on the anchor's output line.
field() {
  local v
  v=$(grep -E "$1" "$2" 2>/dev/null | head -n1 | awk -F': ' '{print $2}' | awk '{print $1}') || true
  if [[ $v =~ ^[0-9.]+$ ]]; then echo "$v"; else echo "n/a"; fi
}
K_TCP1_RE='^kernel vxlan +c1->c2: '
N_TCP1_RE='^nebula .*n1->n2: '
K_TCP1=$(field "$K_TCP1_RE" "$OV_WORK/kernel.txt")
K_TCP4=$(field '^kernel vxlan 4 streams c1->c2: ' "$OV_WORK/kernel.txt")
K_RTT=$(field '^kernel vxlan RTT c1->c2: ' "$OV_WORK/kernel.txt")
K_PPS=$(field '^kernel vxlan 1-stream UDP 1350B c1->c2 \(pps\): ' "$OV_WORK/kernel.txt")
N_TCP1=$(field "$N_TCP1_RE" "$OV_WORK/nebula.txt")
K_CPU=$(busy_cpu_s "$OV_WORK/kernel.stamped" "$K_TCP1_RE")
N_CPU=$(busy_cpu_s "$OV_WORK/nebula.stamped" "$N_TCP1_RE")
K_PER_CPU=$(per_cpu "$K_TCP1" "$K_CPU")
N_PER_CPU=$(per_cpu "$N_TCP1" "$N_CPU")
echo "kernel vxlan TCP 1 stream phase: $K_CPU busy CPU-s; nebula: $N_CPU busy CPU-s"

# --- kernel VXLAN, TCP request/response (the anchor's topology, built by lib.sh) ------------------
ov_log "kernel VXLAN: sockperf TCP ping-pong (anchor topology from lib.sh)"
R="${P}r"
ov_kernel_vxlan_pair "$R"
K_RR=$(sockperf_rtt "${R}c2" "${R}c1" 198.19.0.2)
echo "kernel vxlan TCP req/resp c1->c2: $K_RR us avg RTT"
for n in c1 c2 n1 n2; do ov_ns_kill_del "${R}$n"; done

# --- overlayd on the same topology ---------------------------------------------------------------
ov_log "overlayd: 2 nodes on one veth, one container each"
O="${P}o"
ov_overlay_pair "$O"
C2_IP=$OV_C2_IP
DAEMONS=("${OV_NODE_PID[1]}" "${OV_NODE_PID[2]}")

sleep 2 # idle: cluster formed, containers attached, no traffic yet
O_RSS=$(awk '/^VmRSS/{printf "%.1f", $2/1024}' "/proc/${OV_NODE_PID[1]}/status")

ov_wait 20 "overlay ping c1 -> c2" ip netns exec "${O}c1" ping -c1 -W1 "$C2_IP"
echo "overlay ping ok"

cpu_ticks() { # total utime+stime of the overlayd daemons, in clock ticks
  local t=0 p
  for p in "${DAEMONS[@]}"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$t"
}

ov_log "overlayd TCP 1 stream"
T0=$(cpu_ticks)
S0=$(snap)
iperf "$OV_WORK/o-tcp1.json" "${O}c1" "${O}c2" "$C2_IP"
S1=$(snap)
T1=$(cpu_ticks)
O_TCP1=$(gbps "$OV_WORK/o-tcp1.json")
O_CPU=$(delta_cpu_s "$S0" "$S1")
O_PER_CPU=$(per_cpu "$O_TCP1" "$O_CPU")
echo "overlayd c1->c2: $O_TCP1 Gbit/s ($O_CPU busy CPU-s machine-wide; the daemons' own share $(((T1 - T0) * 1000 / $(getconf CLK_TCK))) ms)"

ov_log "overlayd TCP 4 streams"
iperf "$OV_WORK/o-tcp4.json" "${O}c1" "${O}c2" "$C2_IP" -P 4
O_TCP4=$(gbps "$OV_WORK/o-tcp4.json")
echo "overlayd 4 streams c1->c2: $O_TCP4 Gbit/s"

ov_log "overlayd RTT"
# RTT at rest, as the kernel's is: after load, the governor keeps the workers spread for half a
# second before it pins them again (overlay/src/governor.rs).
sleep 1
layout() { ov_cli "${OV_API[1]}" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["dataplane"]["layout"])' 2>/dev/null || echo "n/a"; }
O_LAYOUT=$(layout)
O_RTT=$(ip netns exec "${O}c1" ping -q -c 500 -i 0.002 "$C2_IP" | awk -F/ '/rtt/{print $5}') || true
[[ $O_RTT =~ ^[0-9.]+$ ]] || O_RTT="n/a"
echo "overlayd RTT c1->c2: $O_RTT ms avg (node 1's data-path layout before: $O_LAYOUT, after: $(layout))"

ov_log "overlayd TCP request/response (sockperf)"
O_RR=$(sockperf_rtt "${O}c2" "${O}c1" "$C2_IP")
echo "overlayd TCP req/resp c1->c2: $O_RR us avg RTT"

ov_log "overlayd UDP 1350 B"
iperf "$OV_WORK/o-udp.json" "${O}c1" "${O}c2" "$C2_IP" -u -b 0 -l 1350
O_UDP=$(python3 -c 'import json,sys;s=json.load(open(sys.argv[1]))["end"]["sum"];print("%.0f pps recv, loss %.1f%%"%(s["packets"]*(1-s["lost_percent"]/100)/s["seconds"], s["lost_percent"]))' "$OV_WORK/o-udp.json" 2>/dev/null || echo "n/a")
echo "overlayd 1-stream UDP 1350B c1->c2 (pps): $O_UDP"
O_PPS=${O_UDP%% *}

# --- overlayd encrypted network: the same 2 nodes, a sealed network beside the plain one ---------
ov_log "overlayd encrypted network: e1 on node 1, e2 on node 2 (network sealed, --encrypted)"
ov_cli "${OV_API[1]}" network create sealed --subnet 198.19.9.0/24 --encrypted >/dev/null
ov_wait 20 "network sealed on node 2" bash -c "OVERLAYD_API='${OV_API[2]}' '$OVERLAYD' network ls --json | grep -q '\"sealed\"'"
ov_ns_add "${O}e1"
ov_ns_add "${O}e2"
ov_attach "${OV_API[1]}" "${O}e1" sealed >/dev/null
E2_IP=$(ov_attach "${OV_API[2]}" "${O}e2" sealed)
ov_wait 20 "sealed ping e1 -> e2" ip netns exec "${O}e1" ping -c1 -W1 "$E2_IP"
# Plain, sealed, sealed, plain, averaged, as the VIP rows below: the rate drifts within a minute.
E_TCP=()
for side in plain sealed sealed plain; do
  if [ "$side" = plain ]; then
    iperf "$OV_WORK/e-tcp.json" "${O}c1" "${O}c2" "$C2_IP"
  else
    iperf "$OV_WORK/e-tcp.json" "${O}e1" "${O}e2" "$E2_IP"
  fi
  E_TCP+=("$(gbps "$OV_WORK/e-tcp.json")")
done
E_TCP_PLAIN=$(mean "${E_TCP[0]}" "${E_TCP[3]}")
E_TCP_SEALED=$(mean "${E_TCP[1]}" "${E_TCP[2]}")
echo "overlayd TCP 1 stream (Gbit/s): plain ${E_TCP[0]} ${E_TCP[3]}, encrypted ${E_TCP[1]} ${E_TCP[2]}"

# --- overlayd services: via a VIP against the same task directly --------------------------------
ov_log "overlayd services: service web on bench, task t2 on node 2"
VIP=$(ov_cli "${OV_API[2]}" service create web --network bench --json |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["vip"])')
ov_ns_add "${O}t2"
T2_IP=$(ov_attach "${OV_API[2]}" "${O}t2" bench --service web)
echo "service web: VIP $VIP, task t2 $T2_IP on node 2"
# Ready when a request through node 1's balancer gets an answer from t2 (any HTTP status will do).
mkdir -p "$OV_WORK/www-t2"
ip netns exec "${O}t2" busybox httpd -f -p 80 -h "$OV_WORK/www-t2" </dev/null >/dev/null 2>&1 &
OV_PIDS+=("$!")
ov_wait 20 "c1 -> VIP $VIP reaching t2" ip netns exec "${O}c1" curl -s -o /dev/null --max-time 1 "http://$VIP/"

# Each measured twice, in the order direct, VIP, VIP, direct, and averaged: on a shared machine the
# rate drifts by tens of percent within a minute, and a fixed order would charge it to one side.

ov_log "overlayd TCP 1 stream: c1 -> t2 directly and via the VIP (direct, VIP, VIP, direct)"
S_TCP=()
for dial in "$T2_IP" "$VIP" "$VIP" "$T2_IP"; do
  iperf "$OV_WORK/s-tcp.json" "${O}c1" "${O}t2" "$dial"
  S_TCP+=("$(gbps "$OV_WORK/s-tcp.json")")
done
S_TCP_DIRECT=$(mean "${S_TCP[0]}" "${S_TCP[3]}")
S_TCP_VIP=$(mean "${S_TCP[1]}" "${S_TCP[2]}")
echo "overlayd TCP 1 stream c1->t2 (Gbit/s): directly ${S_TCP[0]} ${S_TCP[3]}, via the VIP ${S_TCP[1]} ${S_TCP[2]}"

ov_log "overlayd TCP request/response (sockperf): c1 -> t2 directly and via the VIP (direct, VIP, VIP, direct)"
S_RR=()
for dial in "$T2_IP" "$VIP" "$VIP" "$T2_IP"; do
  S_RR+=("$(sockperf_rtt "${O}t2" "${O}c1" "$T2_IP" "$dial")")
done
S_RR_DIRECT=$(mean "${S_RR[0]}" "${S_RR[3]}")
S_RR_VIP=$(mean "${S_RR[1]}" "${S_RR[2]}")
echo "overlayd TCP req/resp c1->t2 (us avg RTT): directly ${S_RR[0]} ${S_RR[3]}, via the VIP ${S_RR[1]} ${S_RR[2]}"

# UDP flows from c1 to the VIP, one datagram each: 1024 client ports x 98 VIP ports = 100352.
# The balancer shards its table by client port (port % 64, 2048 flows per shard), so consecutive
# client ports put 16 x 98 = 1568 flows in every shard. Nothing listens on those ports: t2 answers
# port unreachable (rate-limited by its kernel), which leaves the flows unreplied (tracked 30 s).
# A pass re-sending every datagram refills whatever a queue dropped; at most 3 passes.
ov_log "overlayd: 100k UDP flows c1 -> VIP, node 1's balancer tracking them"
balancer_tracked() {
  ov_cli "${OV_API[1]}" status --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["dataplane"]["balancer"]["tracked"])' 2>/dev/null ||
    echo "n/a"
}
udp_flows() {
  timeout 60 ip netns exec "${O}c1" python3 - "$VIP" <<'PY'
import socket, sys, time
vip, errors = sys.argv[1], 0
for sport in range(40000, 41024):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", sport))
    for dport in range(20000, 20098):
        try:
            s.sendto(b"x", (vip, dport))
        except OSError:
            errors += 1
    s.close()
    time.sleep(0.002)  # ~50k datagrams/s: short of what fills the queues to the daemon
if errors:
    print("udp flows: %d sends failed" % errors, file=sys.stderr)
PY
}
S_TRACKED="n/a"
F0=$SECONDS
for pass in 1 2 3; do
  udp_flows || ov_log "the flow generator failed (pass $pass)"
  S_TRACKED=$(balancer_tracked)
  echo "pass $pass: node 1's balancer tracks $S_TRACKED flows ($((SECONDS - F0)) s since the first datagram)"
  [[ $S_TRACKED =~ ^[0-9]+$ && $S_TRACKED -ge 100000 ]] && break
done
S_RSS=$(awk '/^VmRSS/{printf "%.1f", $2/1024}' "/proc/${OV_NODE_PID[1]}/status")
echo "node 1's daemon: VmRSS $S_RSS MB with $S_TRACKED tracked flows (idle: $O_RSS MB)"
[[ $S_TRACKED =~ ^[0-9]+$ && $S_TRACKED -ge 100000 ]] ||
  ov_log "WARNING: fewer than 100000 flows tracked: the RSS row is for $S_TRACKED flows"

# --- the table -----------------------------------------------------------------------------------
row() { printf '%-40s | %-12s | %-12s | %-12s | %-15s | %s\n' "$1" "$2" "$3" "$4" "$5" "$6"; }
echo
echo "overlayd benchmark: $CMDLINE"
echo "DUR=${DUR}s, $(nproc) cores, kernel $(uname -r); ratios are from this one run; busy before: $IDLE_BUSY CPU-s/s"
row "metric" "kernel vxlan" "nebula" "overlayd" "overlayd/kernel" "overlayd/nebula"
row "----------------------------------------" "------------" "------------" "------------" "---------------" "---------------"
row "TCP 1 stream (Gbit/s)" "$K_TCP1" "$N_TCP1" "$O_TCP1" "$(ratio "$O_TCP1" "$K_TCP1")" "$(ratio "$O_TCP1" "$N_TCP1")"
row "TCP 4 streams (Gbit/s)" "$K_TCP4" "n/a" "$O_TCP4" "$(ratio "$O_TCP4" "$K_TCP4")" "n/a"
row "TCP 1 stream Gbit per busy CPU-s" "$K_PER_CPU" "$N_PER_CPU" "$O_PER_CPU" "$(ratio "$O_PER_CPU" "$K_PER_CPU")" "$(ratio "$O_PER_CPU" "$N_PER_CPU")"
row "ping RTT avg (ms, lower is better)" "$K_RTT" "n/a" "$O_RTT" "$(ratio "$O_RTT" "$K_RTT")" "n/a"
row "TCP req/resp RTT (us, sockperf, lower)" "$K_RR" "n/a" "$O_RR" "$(ratio "$O_RR" "$K_RR")" "n/a"
row "UDP 1350 B (pps received)" "$K_PPS" "n/a" "$O_PPS" "$(ratio "$O_PPS" "$K_PPS")" "n/a"
row "idle RSS, one daemon (MB)" "n/a (kernel)" "$N_RSS" "$O_RSS" "n/a" "$(ratio "$O_RSS" "$N_RSS")"
echo
echo "services (overlayd only): c1 on node 1 -> task t2 on node 2, directly and via service web's VIP"
srow() { printf '%-50s | %-12s | %-12s | %-12s | %s\n' "$1" "$2" "$3" "$4" "$5"; }
srow "metric" "direct" "via VIP" "VIP/direct" "target"
srow "--------------------------------------------------" "------------" "------------" "------------" "------------"
srow "TCP 1 stream via VIP / direct (Gbit/s)" "$S_TCP_DIRECT" "$S_TCP_VIP" "$(ratio "$S_TCP_VIP" "$S_TCP_DIRECT")" ">= 0.9x"
srow "sockperf TCP req/resp via VIP / direct (us, lower)" "$S_RR_DIRECT" "$S_RR_VIP" "$(ratio "$S_RR_VIP" "$S_RR_DIRECT")" "<= 1.1x"
srow "RSS with 100k tracked flows (MB)" "-" "$S_RSS" "-" "<= 64 MiB"
srow "  flows tracked then (node 1 status)" "-" "$S_TRACKED" "-" ">= 100000"
echo
echo "encrypted network (overlayd only): e1 on node 1 -> e2 on node 2, against c1 -> c2 on the plain network"
srow "metric" "plain" "encrypted" "enc/plain" "target"
srow "--------------------------------------------------" "------------" "------------" "------------" "------------"
srow "TCP 1 stream (Gbit/s)" "$E_TCP_PLAIN" "$E_TCP_SEALED" "$(ratio "$E_TCP_SEALED" "$E_TCP_PLAIN")" "-"

[[ $O_TCP1 != n/a ]] || ov_die "overlayd TCP measurement failed (see above)"

# --- the routing mesh (last: it makes its own cluster, and a failure there keeps the tables above) --
echo
ov_cluster_down pair 2 "${O}c1" "${O}c2" "${O}e1" "${O}e2" "${O}t2" "${O}n1" "${O}n2"
mesh_rows
