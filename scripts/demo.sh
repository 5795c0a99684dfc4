#!/usr/bin/env bash
# The demo: a 3-node overlayd cluster in network namespaces on one machine.
#
#   switch netns (bridge) ── node 1, 2, 3 (underlay 198.18.0.1-3/24, one overlayd each)
#   each node: 2 containers (netns) attached to overlay network "demo" (198.19.10.0/24)
#   service "web": one task per node, a real HTTP server (busybox httpd) answering its own name
#
# Builds overlayd (release), shows containers pinging across nodes, `node ls` and `network ls`,
# then the service: curl from a container on each node to the VIP and to the name `web` (answered
# by overlayd's DNS), the answers rotating over the tasks of all nodes, and `service ps web`.
# Removes everything on exit (also on failure or Ctrl-C). Run as root: sudo scripts/demo.sh
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

ov_need_root
ov_install_deps
ov_reap_stale
ov_build_release

P="ovd$$-"          # every namespace of this run starts with this
NET=demo
SUBNET=198.19.10.0/24
ov_workdir ovdemo
trap ov_cleanup EXIT

ov_log "switch + 3 nodes (underlay 198.18.0.0/24)"
ov_switch "${P}sw"
for i in 1 2 3; do
  ov_ns_add "${P}n$i"
  ov_plug "${P}sw" "n$i" "${P}n$i" "198.18.0.$i/24"
done

ov_log "overlayd init on node 1, join on nodes 2 and 3"
ov_cluster "$P" 3 "198.18.0.%d"

ov_log "network $NET ($SUBNET), created on node 1"
ov_cli "${OV_API[1]}" network create "$NET" --subnet "$SUBNET"
for i in 2 3; do ov_wait 20 "network $NET on node $i" ov_network_known "${OV_API[i]}" "$NET"; done

ov_log "2 containers per node, attached to $NET"
declare -A IP NODE
CTRS=()
for i in 1 2 3; do
  for s in a b; do
    c="c$i$s"
    ov_ns_add "${P}$c"
    IP[$c]=$(ov_attach "${OV_API[i]}" "${P}$c" "$NET")
    NODE[$c]=$i
    CTRS+=("$c")
    echo "  $c on node $i: ${IP[$c]}"
  done
done

ov_log "pings between containers on different nodes"
fails=0
for from in "${CTRS[@]}"; do
  for to in "${CTRS[@]}"; do
    [ "${NODE[$from]}" != "${NODE[$to]}" ] || continue
    # The first packet may wait for ARP: up to 4 s (one echo a second) for one reply. The whole
    # output is read before picking the line (a pipe into grep -m1 could SIGPIPE ping).
    if out=$(ip netns exec "${P}$from" ping -c 1 -w 4 "${IP[$to]}" 2>&1) &&
      line=$(grep -m1 'bytes from' <<<"$out"); then
      printf '  %-4s (node %s) -> %-4s (node %s): %s\n' "$from" "${NODE[$from]}" "$to" "${NODE[$to]}" "$line"
    else
      printf '  %-4s (node %s) -> %-4s (node %s): NO REPLY\n' "$from" "${NODE[$from]}" "$to" "${NODE[$to]}"
      fails=$((fails + 1))
      # What a developer needs to see: the ARP state at both ends and both nodes' counters.
      echo "    neighbour in $from: $(ip -n "${P}$from" neigh show "${IP[$to]}")" >&2
      echo "    neighbour in $to: $(ip -n "${P}$to" neigh show "${IP[$from]}")" >&2
      for i in "${NODE[$from]}" "${NODE[$to]}"; do
        echo "    node $i dataplane: $(ov_cli "${OV_API[i]}" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin).get("dataplane"))' 2>&1)" >&2
      done
    fi
  done
done

echo
ov_log "overlayd node ls (on node 2)"
ov_cli "${OV_API[2]}" node ls
echo
ov_log "overlayd network ls (on node 3)"
ov_cli "${OV_API[3]}" network ls
echo
if [ "$fails" -ne 0 ]; then
  ov_die "$fails cross-node pings got no reply"
fi
ov_log "all cross-node pings answered"

ov_log "service web on $NET (created on node 2), one task per node serving its own name"
VIP=$(ov_cli "${OV_API[2]}" service create web --network "$NET" --json |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["vip"])')
echo "  VIP $VIP"
for i in 1 2 3; do
  t="task$i"
  ov_ns_add "${P}$t"
  mkdir -p "$OV_WORK/www-$t"
  echo "$t on node $i" >"$OV_WORK/www-$t/index.html"
  echo "  $t on node $i: $(ov_attach "${OV_API[i]}" "${P}$t" "$NET" --service web)"
  ip netns exec "${P}$t" busybox httpd -f -p 80 -h "$OV_WORK/www-$t" </dev/null >/dev/null 2>&1 &
  OV_PIDS+=("$!")
done
three_healthy() {
  ov_cli "${OV_API[1]}" service ls --json |
    python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)[0]["tasks_healthy"] == 3 else 1)'
}
ov_wait 20 "3 healthy tasks" three_healthy
echo
ov_log "overlayd service ls (on node 3)"
ov_cli "${OV_API[3]}" service ls

fails=0
for i in 1 2 3; do
  from="c${i}a"
  for target in "$VIP" web; do
    echo
    ov_log "curl http://$target/ six times from $from (node $i)"
    for _ in 1 2 3 4 5 6; do
      if ! ip netns exec "${P}$from" curl -sS --max-time 3 "http://$target/" | sed 's/^/  /'; then
        fails=$((fails + 1))
      fi
    done
  done
done
echo
ov_log "overlayd service ps web (on node 1)"
ov_cli "${OV_API[1]}" service ps web
echo
if [ "$fails" -ne 0 ]; then
  ov_die "$fails requests to the service failed"
fi
ov_log "every request answered; cleaning up"
