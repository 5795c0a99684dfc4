#!/usr/bin/env bash
# The benchmark: overlayd against the anchors, in one run, on the anchors' topology.
#
#   node 1 ──(one veth, underlay 198.18.0.x/24, MTU 1500)── node 2
#   container 1 (MTU 1450) on node 1, container 2 on node 2, iperf3 and ping between them
#
# Runs ../../shared/anchors/netns-vxlan-baseline.sh (kernel VXLAN), netns-nebula-baseline.sh
# (if `nebula` is installed: apt-get install nebula), then overlayd on the same topology with the
# same iperf3/ping commands, and prints one table. Ratios only mean something within one run.
#
#   DUR=5 scripts/bench.sh        # seconds per iperf3 run (default 5)
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

DUR=${DUR:-5}
ANCHORS="$(dirname "$0")/../../shared/anchors"
[ -f "$ANCHORS/netns-vxlan-baseline.sh" ] ||
  ov_die "anchor scripts not found in $ANCHORS (shared/ must sit beside the repository clone)"
ANCHORS=$(cd "$ANCHORS" && pwd)

ov_need_root
ov_install_deps
ov_reap_stale
ov_build_release
ov_workdir ovbench
trap ov_cleanup EXIT
P="ovb$$"   # + k (kernel anchor), n (nebula anchor), o (overlayd); short: the anchors name veths with it

# --- anchors -------------------------------------------------------------------------------------
ov_log "kernel VXLAN anchor (DUR=$DUR)"
if ! P="${P}k" DUR=$DUR bash "$ANCHORS/netns-vxlan-baseline.sh" 2>&1 | tee "$OV_WORK/kernel.txt"; then
  ov_log "kernel VXLAN anchor failed (its numbers show as n/a)"
fi
if command -v nebula >/dev/null 2>&1 && command -v nebula-cert >/dev/null 2>&1; then
  ov_log "Nebula anchor (DUR=$DUR)"
  if ! P="${P}n" DUR=$DUR bash "$ANCHORS/netns-nebula-baseline.sh" 2>&1 | tee "$OV_WORK/nebula.txt"; then
    ov_log "Nebula anchor failed (its numbers show as n/a)"
  fi
else
  ov_log "nebula not installed (apt-get install nebula): Nebula column is n/a"
fi

# field LABEL_REGEX FILE: the number right after "LABEL: " on the anchor's output line.
field() {
  local v
  v=$(grep -E "$1" "$2" 2>/dev/null | head -n1 | awk -F': ' '{print $2}' | awk '{print $1}') || true
  if [[ $v =~ ^[0-9.]+$ ]]; then echo "$v"; else echo "n/a"; fi
}
K_TCP1=$(field '^kernel vxlan +c1->c2: ' "$OV_WORK/kernel.txt")
K_TCP4=$(field '^kernel vxlan 4 streams c1->c2: ' "$OV_WORK/kernel.txt")
K_RTT=$(field '^kernel vxlan RTT c1->c2: ' "$OV_WORK/kernel.txt")
K_PPS=$(field '^kernel vxlan 1-stream UDP 1350B c1->c2 \(pps\): ' "$OV_WORK/kernel.txt")
N_TCP1=$(field '^nebula .*n1->n2: ' "$OV_WORK/nebula.txt")

# --- overlayd on the same topology ---------------------------------------------------------------
ov_log "overlayd: 2 nodes on one veth, one container each"
O="${P}o"
ov_ns_add "${O}n1"
ov_ns_add "${O}n2"
ov_wire "${O}n1" 198.18.0.1/24 "${O}n2" 198.18.0.2/24
ov_cluster "$O" 2 "198.18.0.%d"
ov_cli "${OV_API[1]}" network create bench --subnet 198.19.0.0/24 --mtu 1450
ov_wait 20 "network bench on node 2" ov_network_known "${OV_API[2]}" bench
ov_ns_add "${O}c1"
ov_ns_add "${O}c2"
ov_attach "${OV_API[1]}" "${O}c1" bench >/dev/null
C2_IP=$(ov_attach "${OV_API[2]}" "${O}c2" bench)
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

# iperf FILE ARGS...: one iperf3 run c1 -> c2 (one-off server in c2), JSON to FILE.
iperf() {
  local out=$1 spid; shift
  ip netns exec "${O}c2" iperf3 -s -1 -p 5201 >/dev/null 2>&1 &
  spid=$!
  OV_PIDS+=("$spid")
  ov_wait 10 "iperf3 server in c2" bash -c "ip netns exec '${O}c2' ss -Hltn 'sport = :5201' | grep -q ."
  timeout $((DUR + 30)) ip netns exec "${O}c1" iperf3 -c "$C2_IP" -p 5201 -t "$DUR" -J "$@" >"$out" || true
  kill "$spid" 2>/dev/null || true
  wait "$spid" 2>/dev/null || true
}
gbps() { python3 -c 'import json,sys;d=json.load(open(sys.argv[1]));print("%.2f"%(d["end"]["sum_received"]["bits_per_second"]/1e9))' "$1" 2>/dev/null || echo "n/a"; }

ov_log "overlayd TCP 1 stream"
T0=$(cpu_ticks)
iperf "$OV_WORK/o-tcp1.json"
T1=$(cpu_ticks)
O_TCP1=$(gbps "$OV_WORK/o-tcp1.json")
O_PER_CPU=$(python3 - "$OV_WORK/o-tcp1.json" "$((T1 - T0))" "$(getconf CLK_TCK)" <<'PY' 2>/dev/null || echo "n/a"
import json, sys
d = json.load(open(sys.argv[1]))
cpu = int(sys.argv[2]) / int(sys.argv[3])
print("%.2f" % (d["end"]["sum_received"]["bytes"] * 8 / 1e9 / cpu) if cpu > 0 else "n/a")
PY
)
echo "overlayd c1->c2: $O_TCP1 Gbit/s (daemons used $(((T1 - T0) * 1000 / $(getconf CLK_TCK))) ms CPU)"

ov_log "overlayd TCP 4 streams"
iperf "$OV_WORK/o-tcp4.json" -P 4
O_TCP4=$(gbps "$OV_WORK/o-tcp4.json")
echo "overlayd 4 streams c1->c2: $O_TCP4 Gbit/s"

ov_log "overlayd RTT"
O_RTT=$(ip netns exec "${O}c1" ping -q -c 500 -i 0.002 "$C2_IP" | awk -F/ '/rtt/{print $5}') || true
[[ $O_RTT =~ ^[0-9.]+$ ]] || O_RTT="n/a"
echo "overlayd RTT c1->c2: $O_RTT ms avg"

ov_log "overlayd UDP 1350 B"
iperf "$OV_WORK/o-udp.json" -u -b 0 -l 1350
O_UDP=$(python3 -c 'import json,sys;s=json.load(open(sys.argv[1]))["end"]["sum"];print("%.0f pps recv, loss %.1f%%"%(s["packets"]*(1-s["lost_percent"]/100)/s["seconds"], s["lost_percent"]))' "$OV_WORK/o-udp.json" 2>/dev/null || echo "n/a")
echo "overlayd 1-stream UDP 1350B c1->c2 (pps): $O_UDP"
O_PPS=${O_UDP%% *}

# --- the table -----------------------------------------------------------------------------------
ratio() { awk -v o="$1" -v k="$2" 'BEGIN { if (o ~ /^[0-9.]+$/ && k ~ /^[0-9.]+$/ && k > 0) printf "%.2f", o / k; else print "n/a" }'; }
row() { printf '%-34s | %-12s | %-12s | %-12s | %s\n' "$1" "$2" "$3" "$4" "$5"; }
echo
echo "overlayd benchmark, DUR=${DUR}s, $(nproc) cores, kernel $(uname -r)"
row "metric" "kernel vxlan" "nebula" "overlayd" "overlayd/kernel"
row "----------------------------------" "------------" "------------" "------------" "---------------"
row "TCP 1 stream (Gbit/s)" "$K_TCP1" "$N_TCP1" "$O_TCP1" "$(ratio "$O_TCP1" "$K_TCP1")"
row "TCP 4 streams (Gbit/s)" "$K_TCP4" "n/a" "$O_TCP4" "$(ratio "$O_TCP4" "$K_TCP4")"
row "ping RTT avg (ms, lower is better)" "$K_RTT" "n/a" "$O_RTT" "$(ratio "$O_RTT" "$K_RTT")"
row "UDP 1350 B (pps received)" "$K_PPS" "n/a" "$O_PPS" "$(ratio "$O_PPS" "$K_PPS")"
row "TCP Gbit per daemon CPU-second" "n/a (kernel)" "n/a" "$O_PER_CPU" "n/a"
row "idle RSS of overlayd (MB)" "n/a (kernel)" "n/a" "$O_RSS" "n/a"

[[ $O_TCP1 != n/a ]] || ov_die "overlayd TCP measurement failed (see above)"
