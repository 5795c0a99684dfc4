//! What the daemon shows of itself besides the API's lists: the sample a metrics scrape
//! reports ([`crate::metrics`]), `trace` ([`crate::trace`]) and `inspect`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Daemon, json, network_info, service_infos, tasks_of};
use crate::api::{self, Failure, Inspect};
use crate::metrics::{self, BalancerSample, NetworkSample, Sample, TaskSample};
use crate::trace::{self, Probe, Proto};

impl Daemon {
    /// The counters and the view as they are now. Reads atomics and takes the view; holds
    /// nothing the data path waits for.
    pub(super) async fn sample(&self) -> Sample {
        let view = self.view().await;
        let mut members = BTreeMap::new();
        for m in &view.members {
            *members.entry(m.node.state.to_string()).or_default() += 1;
        }
        let traffic = self.dataplane.network_traffic();
        let networks = view
            .networks
            .values()
            .filter_map(|net| {
                let t = traffic.get(&super::vni(net))?;
                Some(NetworkSample {
                    name: net.name.clone(),
                    in_frames: t.in_frames,
                    in_bytes: t.in_bytes,
                    out_frames: t.out_frames,
                    out_bytes: t.out_bytes,
                    drops: t.drops.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                })
            })
            .collect();
        let chosen = self.balancer.chosen();
        let flows = self.balancer.flows_by_task();
        let tasks = view
            .services
            .keys()
            .flat_map(|service| {
                tasks_of(&view, service).into_iter().map(|t| TaskSample {
                    service: service.clone(),
                    task: t.ip,
                    node: t.node,
                    state: t.state.to_string(),
                    connections: chosen.get(&t.ip).copied().unwrap_or(0),
                    flows: flows.get(&t.ip).copied().unwrap_or(0),
                })
            })
            .collect();
        let stats = self.dataplane.stats();
        let (tracked, _) = self.balancer.flows();
        let b = &self.balancer.stats;
        Sample {
            members,
            gossip_rounds: self.gossip.syns_sent(),
            networks,
            drops: stats
                .drops
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            tasks,
            balancer: BalancerSample {
                flows: b.flows.load(Ordering::Relaxed),
                tracked: tracked as u64,
                rejected: b.rejected.load(Ordering::Relaxed),
                dropped: b.dropped.load(Ordering::Relaxed),
            },
            peers: self
                .dataplane
                .peer_traffic()
                .into_iter()
                .map(|(vtep, traffic)| metrics::peer_sample(vtep, traffic))
                .collect(),
        }
    }
}

impl Daemon {
    /// `overlayd trace`: `src` to `dst` on `network` through this node's data path, explained.
    pub(super) async fn trace(
        &self,
        network: String,
        proto: Proto,
        src: (Ipv4Addr, Option<u16>),
        dst: (Ipv4Addr, Option<u16>),
    ) -> api::Reply {
        let view = self.view().await;
        let net = crate::registry::known(&view.networks, &network)?;
        let probe = Probe::new(proto, src, dst).map_err(Failure::usage)?;
        let index = self.dataplane.index();
        let switched = index.network(super::vni(net)).ok_or_else(|| {
            Failure::runtime(format!("network {network} is not made on this node yet"))
        })?;
        let traced = trace::trace(
            &network,
            net.subnet,
            switched,
            &self.balancer,
            &probe,
            Instant::now(),
        );
        Ok(json(&traced))
    }

    /// `overlayd inspect`: everything this node knows of one network, service or node.
    pub(super) async fn inspect(&self, kind: Inspect, name: String) -> api::Reply {
        let view = self.view().await;
        let endpoint = |p: &crate::cluster::Placed| serde_json::json!({ "node": p.node, "endpoint": p.endpoint });
        Ok(match kind {
            Inspect::Network => {
                let net = crate::registry::known(&view.networks, &name)?;
                let traffic = self.dataplane.network_traffic();
                let traffic = traffic.get(&super::vni(net));
                serde_json::json!({
                    "network": net,
                    "info": network_info(net, &view),
                    "endpoints": view.endpoints_on(net).map(endpoint).collect::<Vec<_>>(),
                    "made_on": view.members.iter()
                        .filter(|m| m.realised.contains(&net.id))
                        .map(|m| &m.node.id).collect::<Vec<_>>(),
                    "services": view.services.values()
                        .filter(|s| s.network_id == net.id)
                        .map(|s| &s.name).collect::<Vec<_>>(),
                    "traffic_here": traffic.map(|t| serde_json::json!({
                        "in_frames": t.in_frames, "in_bytes": t.in_bytes,
                        "out_frames": t.out_frames, "out_bytes": t.out_bytes,
                        "drops": t.drops,
                    })),
                })
            }
            Inspect::Service => {
                let service = crate::registry::known_service(&view.services, &name)?;
                let (chosen, flows) = (self.balancer.chosen(), self.balancer.flows_by_task());
                let tasks: Vec<_> = tasks_of(&view, &name)
                    .into_iter()
                    .map(|t| {
                        serde_json::json!({
                            "task": t,
                            "connections_here": chosen.get(&t.ip).copied().unwrap_or(0),
                            "flows_here": flows.get(&t.ip).copied().unwrap_or(0),
                        })
                    })
                    .collect();
                serde_json::json!({
                    "service": service,
                    "info": service_infos(&view).into_iter().find(|s| s.name == name),
                    "tasks": tasks,
                })
            }
            Inspect::Node => {
                let member = view
                    .members
                    .iter()
                    .find(|m| m.node.id == name || m.node.address.to_string() == name)
                    .ok_or_else(|| {
                        Failure::usage(format!(
                            "node {name} not found: give an id or address from `overlayd node ls`"
                        ))
                    })?;
                let id = &member.node.id;
                serde_json::json!({
                    "node": member.node,
                    "gossip": member.gossip,
                    "networks": view.networks.values()
                        .filter(|n| member.realised.contains(&n.id))
                        .map(|n| &n.name).collect::<Vec<_>>(),
                    "endpoints": view.endpoints.iter()
                        .filter(|p| &p.node == id).map(endpoint).collect::<Vec<_>>(),
                    "tasks": view.services.keys()
                        .flat_map(|s| tasks_of(&view, s))
                        .filter(|t| &t.node == id).collect::<Vec<_>>(),
                    "drained": member.drained,
                })
            }
        })
    }
}
