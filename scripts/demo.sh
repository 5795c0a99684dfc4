#!/usr/bin/env bash
# The demo: a 3-node overlayd cluster in network namespaces on one machine.
#
#   switch netns (bridge) ── node 1, 2, 3 (underlay 198.18.0.1-3/24, one overlayd each)
#   each node: 2 containers (netns) attached to overlay network "demo" (198.19.10.0/24)
#   service "search" published on port 9200 of every node (Swarm's routing mesh): one task per
#   node, a real HTTP server answering its own name and the client address it sees
#
# Builds overlayd (release), shows containers pinging across nodes, `node ls` and `network ls`,
# then Swarm's routing-mesh walkthrough: curl from a container on each node to the VIP and to the
# name `search` (answered by overlayd's DNS); `curl localhost:9200` on each node; curl from an
# outside client to each node's address, the answers rotating over the tasks of all nodes, each
# task seeing the client's own address; then `service ls` and `service ps search`.
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

ov_log "service search on $NET, published on port 9200 of every node (created on node 2)"
ov_cli "${OV_API[2]}" service create search --network "$NET" --publish 9200:80
VIP=$(ov_cli "${OV_API[2]}" service ls --json |
  python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["vip"])')
echo "  VIP $VIP"
ov_log "one task per node, each answering its own name and the client address it sees"
# A tiny HTTP server: "taskN on node N saw CLIENT".
WHO='
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80)); s.listen(64)
while True:
    c, peer = s.accept()
    c.recv(4096)
    c.sendall(("HTTP/1.0 200 OK\r\n\r\n%s saw %s\n" % (sys.argv[1], peer[0])).encode())
    c.close()
'
for i in 1 2 3; do
  t="task$i"
  ov_ns_add "${P}$t"
  echo "  $t on node $i: $(ov_attach "${OV_API[i]}" "${P}$t" "$NET" --service search)"
  ip netns exec "${P}$t" python3 -c "$WHO" "$t on node $i" </dev/null >/dev/null 2>&1 &
  OV_PIDS+=("$!")
done
three_healthy() {
  ov_cli "${OV_API[1]}" service ls --json |
    python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)[0]["tasks_healthy"] == 3 else 1)'
}
ov_wait 20 "3 healthy tasks" three_healthy
sleep 1 # every node's balancer takes the tasks at its next reconcile round
echo
ov_log "overlayd service ls (on node 3)"
ov_cli "${OV_API[3]}" service ls

fails=0
# curl_times NETNS URL N: N requests, each answer indented; failures counted.
curl_times() {
  for _ in $(seq "$3"); do
    if ! ip netns exec "$1" curl -sS --max-time 3 "$2" | sed 's/^/  /'; then
      fails=$((fails + 1))
    fi
  done
}
for i in 1 2 3; do
  for target in "$VIP" search; do
    echo
    ov_log "curl http://$target/ from container c${i}a (node $i): the VIP and the name, inside the overlay"
    curl_times "${P}c${i}a" "http://$target/" 3
  done
done
for i in 1 2 3; do
  echo
  ov_log "curl localhost:9200 on node $i itself (the routing mesh)"
  curl_times "${P}n$i" "http://localhost:9200/" 6
done
ov_log "an outside client on the underlay, 198.18.0.200"
ov_ns_add "${P}cl"
ov_plug "${P}sw" "cl" "${P}cl" "198.18.0.200/24"
for i in 1 2 3; do
  echo
  ov_log "curl 198.18.0.$i:9200 from the outside client: every task, and each saw the client's own address"
  curl_times "${P}cl" "http://198.18.0.$i:9200/" 9
done
echo
ov_log "overlayd service ps search (on node 1)"
ov_cli "${OV_API[1]}" service ps search
echo
if [ "$fails" -ne 0 ]; then
  ov_die "$fails requests to the service failed"
fi
ov_log "every request answered; cleaning up"
