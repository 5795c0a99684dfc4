# shellcheck shell=bash
# The routing-mesh rows of scripts/bench.sh (issue 10). Sourced by bench.sh after lib.sh; defines
# functions and runs nothing. They use bench.sh's apt_for, iperf, gbps, mean and ratio, and its
# ANCHORS, DUR and MESH_TOOLS_OK (set when MESH_TOOLS are installed).
#
# A client outside the cluster, on the underlay, hits node 1's published port; the tasks are nginx
# on all three nodes, the bulk task an iperf3 server on node 2.
#   - Kernel side: ../shared/anchors/netns-ingress-baseline.sh, run unmodified: nftables
#     DNAT+masquerade and HAProxy (TCP mode) on node 1 over the kernel's VXLAN, plus a direct
#     (routed) hit on the task on node 2.
#   - overlayd side: the anchor's underlay (a switch; nodes 198.18.2.1-3/24, client
#     198.18.2.100, MTU 1500), a 3-node cluster with network "mesh" (198.19.2.0/24, MTU 1450),
#     service web publishing 8080:80 with one nginx task per node (the anchor's nginx.conf),
#     service bulk publishing 5201:5201 with one iperf3 task on node 2. Measured with the
#     anchor's own wrk and iperf3 commands (mesh_rps, iperf).
# The rate drifts by tens of percent within a minute on a shared machine, so the order is anchor,
# overlayd, overlayd, anchor, and each side's two runs are averaged (as bench.sh's services rows do).

MESH_WEB=8080  # web's published port; the anchor's nft DNAT listens on the same one
MESH_BULK=5201 # bulk's published port = its target port, as in the anchor's nft rule
MESH_NODE1=198.18.2.1

# What the anchor and the overlayd side run, as apt_for's PACKAGE:COMMAND.
MESH_TOOLS=(nginx-light:nginx haproxy:haproxy wrk:wrk nftables:nft)

# mesh_anchor P RUN: runs the ingress anchor with namespace prefix P, its output to
# $OV_WORK/ingress-RUN.txt (and the terminal).
mesh_anchor() {
  ov_log "ingress anchor, run $2: nftables DNAT and HAProxy on the kernel's VXLAN (DUR=$DUR)"
  if ! P="$1" DUR=$DUR bash "$ANCHORS/netns-ingress-baseline.sh" 2>&1 | tee "$OV_WORK/ingress-$2.txt"; then
    ov_log "ingress anchor run $2 failed (its numbers show as n/a)"
  fi
}

# anchor_value RUN LINE_REGEX NAME: the number after the word NAME on the line matching
# LINE_REGEX in anchor run RUN's output (its lines read "keepalive req/s : direct(routed) N  nft-dnat N ...").
anchor_value() {
  local v
  v=$(grep -E "$2" "$OV_WORK/ingress-$1.txt" 2>/dev/null | head -n1 |
    awk -v k="$3" '{ for (i = 1; i < NF; i++) if ($i == k) print $(i + 1) }') || true
  if [[ $v =~ ^[0-9.]+$ ]]; then echo "$v"; else echo "n/a"; fi
}

# anchor_mean LINE_REGEX NAME: anchor_value's average over the two anchor runs.
anchor_mean() { mean "$(anchor_value 1 "$1" "$2")" "$(anchor_value 2 "$1" "$2")"; }

# mesh_rps CLIENT_NS URL [WRK_ARGS...]: requests/s of the anchor's wrk run (2 threads, 64
# connections, DUR s) from CLIENT_NS, or n/a. wrk's error counts, if any, go to stderr.
mesh_rps() {
  local ns=$1 url=$2 out rate
  shift 2
  out=$(timeout $((DUR + 30)) ip netns exec "$ns" wrk -t2 -c64 -d"${DUR}s" "$@" "$url" 2>&1) || true
  grep -E 'Socket errors|Non-2xx' <<<"$out" | sed "s|^ *|  wrk $url: |" >&2 || true
  rate=$(awk '/Requests\/sec/{print $2}' <<<"$out")
  if [[ $rate =~ ^[0-9.]+$ ]]; then echo "$rate"; else echo "n/a"; fi
}

# mesh_nginx NS NAME: the anchor's nginx "task" in NS (one worker, keep-alive, answers "task NAME").
mesh_nginx() {
  local dir="$OV_WORK/nginx-$1"
  mkdir -p "$dir"
  cat >"$dir/nginx.conf" <<N
daemon off; worker_processes 1; pid $dir/pid; error_log $dir/err;
events { worker_connections 4096; }
http { access_log off; server { listen 80 reuseport; location / { return 200 "task $2\n"; } } }
N
  ip netns exec "$1" nginx -c "$dir/nginx.conf" -p "$dir" </dev/null >/dev/null 2>&1 &
  OV_PIDS+=("$!")
}

# mesh_healthy API SERVICE N: whether the daemon on API lists N healthy tasks of SERVICE.
mesh_healthy() {
  ov_cli "$1" service ls --json |
    python3 -c 'import json,sys; sys.exit(0 if any(s["name"] == sys.argv[1] and s["tasks_healthy"] == int(sys.argv[2]) for s in json.load(sys.stdin)) else 1)' "$2" "$3"
}

# mesh_cluster M: the overlayd side's topology and services (see the top of this file), with
# namespace prefix M; waits until the client gets answers through node 1's published port.
mesh_cluster() {
  local m=$1 i
  ov_switch "${m}sw"
  for i in 1 2 3; do
    ov_ns_add "${m}n$i"
    ov_plug "${m}sw" "n$i" "${m}n$i" "198.18.2.$i/24"
  done
  ov_ns_add "${m}cl"
  ov_plug "${m}sw" cl "${m}cl" 198.18.2.100/24
  ov_cluster "$m" 3 "198.18.2.%d"
  ov_cli "${OV_API[1]}" network create mesh --subnet 198.19.2.0/24 --mtu 1450 >/dev/null
  for i in 2 3; do ov_wait 20 "network mesh on node $i" ov_network_known "${OV_API[i]}" mesh; done
  ov_cli "${OV_API[1]}" service create web --network mesh --publish "$MESH_WEB:80" >/dev/null
  ov_cli "${OV_API[1]}" service create bulk --network mesh --publish "$MESH_BULK:$MESH_BULK" >/dev/null
  for i in 1 2 3; do
    ov_ns_add "${m}t$i"
    ov_attach "${OV_API[i]}" "${m}t$i" mesh --service web >/dev/null
    mesh_nginx "${m}t$i" "$i"
  done
  ov_ns_add "${m}b2"
  ov_attach "${OV_API[2]}" "${m}b2" mesh --service bulk >/dev/null
  for i in 1 2 3; do
    ov_wait 20 "3 healthy web tasks on node $i" mesh_healthy "${OV_API[i]}" web 3
    ov_wait 20 "1 healthy bulk task on node $i" mesh_healthy "${OV_API[i]}" bulk 1
  done
  ov_wait 20 "the client reaching $MESH_NODE1:$MESH_WEB" \
    ip netns exec "${m}cl" curl -sf --max-time 1 "http://$MESH_NODE1:$MESH_WEB/"
  echo "overlayd: 12 requests from the client to $MESH_NODE1:$MESH_WEB answered by:" \
    "$(for _ in $(seq 12); do ip netns exec "${m}cl" curl -s --max-time 2 "http://$MESH_NODE1:$MESH_WEB/"; done |
      sort | uniq -c | awk '{ printf "%s%s %s x%d", sep, $2, $3, $1; sep = ", " }')"
}

# mesh_counters: each node's data-plane counters (frames, VXLAN, drops by reason, balancer),
# to tell a slow mesh from a lossy one.
mesh_counters() {
  local i
  for i in 1 2 3; do
    echo "node $i: $(ov_cli "${OV_API[i]}" status --json 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)["dataplane"]
print("rx_frames %d tx_vxlan %d rx_vxlan %d drops %s balancer %s" % (d["rx_frames"], d["tx_vxlan"],
      d["rx_vxlan"], json.dumps(d["drops"], sort_keys=True), json.dumps(d["balancer"], sort_keys=True)))' 2>/dev/null ||
      echo "no status (is its daemon running? see its log)")"
  done
}

# mesh_overlayd M: builds the overlayd side (prefix M), measures it twice, averaged into
# MESH_O_KA, MESH_O_NC, MESH_O_BULK, prints the nodes' counters, and removes it again (daemons,
# namespaces, state dirs; the logs stay in $OV_WORK as mesh-n<i>.log), so that a later
# ov_cluster starts afresh.
mesh_overlayd() {
  local m=$1 url="http://$MESH_NODE1:$MESH_WEB/" run ka=() nc=() bulk=()
  ov_log "overlayd: 3 nodes, service web ($MESH_WEB:80, nginx on each node), bulk ($MESH_BULK, iperf3 on node 2)"
  mesh_cluster "$m"
  for run in 1 2; do
    ov_log "overlayd, run $run: keep-alive, new connections, bulk through $MESH_NODE1"
    ka+=("$(mesh_rps "${m}cl" "$url")")
    nc+=("$(mesh_rps "${m}cl" "$url" -H 'Connection: close')")
    iperf "$OV_WORK/mesh-bulk.json" "${m}cl" "${m}b2" "$MESH_NODE1"
    bulk+=("$(gbps "$OV_WORK/mesh-bulk.json")")
    echo "overlayd mesh via $MESH_NODE1: keepalive req/s ${ka[-1]}  new-conn req/s ${nc[-1]}  bulk Gbit/s ${bulk[-1]}"
  done
  MESH_O_KA=$(mean "${ka[@]}")
  MESH_O_NC=$(mean "${nc[@]}")
  MESH_O_BULK=$(mean "${bulk[@]}")
  mesh_counters
  ov_cluster_down mesh 3 "${m}b2" "${m}t1" "${m}t2" "${m}t3" "${m}cl" "${m}n1" "${m}n2" "${m}n3" "${m}sw"
}

# mesh_measure PREFIX: the anchor (namespaces PREFIXi*), overlayd twice (PREFIXm*), the anchor
# again; sets the MESH_* averages mesh_table prints.
mesh_measure() {
  if [ -n "$MESH_TOOLS_OK" ]; then
    mesh_anchor "${1}i" 1
    mesh_overlayd "${1}m"
    mesh_anchor "${1}i" 2
  else
    MESH_O_KA=n/a MESH_O_NC=n/a MESH_O_BULK=n/a
  fi
  MESH_K_KA=$(anchor_mean '^keepalive req/s' 'direct(routed)')
  MESH_K_NC=$(anchor_mean '^new-conn req/s' 'direct(routed)')
  MESH_N_KA=$(anchor_mean '^keepalive req/s' nft-dnat)
  MESH_N_NC=$(anchor_mean '^new-conn req/s' nft-dnat)
  MESH_N_BULK=$(anchor_mean '^bulk Gbit/s' nft-dnat)
  MESH_H_KA=$(anchor_mean '^keepalive req/s' haproxy)
  MESH_H_NC=$(anchor_mean '^new-conn req/s' haproxy)
  MESH_H_BULK=$(anchor_mean '^bulk Gbit/s' haproxy)
}

# mesh_table: the routing-mesh rows, as values and as ratios overlayd/HAProxy and overlayd/nft.
mesh_table() {
  local r='%-40s | %-15s | %-10s | %-10s | %-10s | %-27s | %s\n'
  echo "routing mesh: a client on the underlay -> node 1's published port (tasks on 3 nodes; bulk: the task on node 2);"
  echo "each value the mean of two runs (anchor, overlayd, overlayd, anchor); direct: the task on node 2 alone, routed"
  # shellcheck disable=SC2059 # the format is the point
  {
    printf "$r" "metric" "direct, 1 task" "nft DNAT" "HAProxy" "overlayd" "overlayd/HAProxy (>= 1.0x)" "overlayd/nft (goal >= 0.8x)"
    printf "$r" "----------------------------------------" "---------------" "----------" "----------" "----------" "---------------------------" "---------------------------"
    printf "$r" "keep-alive req/s (wrk -c64)" "$MESH_K_KA" "$MESH_N_KA" "$MESH_H_KA" "$MESH_O_KA" \
      "$(ratio "$MESH_O_KA" "$MESH_H_KA")" "$(ratio "$MESH_O_KA" "$MESH_N_KA")"
    printf "$r" "new-connection req/s (Connection: close)" "$MESH_K_NC" "$MESH_N_NC" "$MESH_H_NC" "$MESH_O_NC" \
      "$(ratio "$MESH_O_NC" "$MESH_H_NC")" "$(ratio "$MESH_O_NC" "$MESH_N_NC")"
    printf "$r" "bulk Gbit/s (iperf3, 1 stream)" "n/a" "$MESH_N_BULK" "$MESH_H_BULK" "$MESH_O_BULK" \
      "$(ratio "$MESH_O_BULK" "$MESH_H_BULK")" "$(ratio "$MESH_O_BULK" "$MESH_N_BULK")"
  }
}
