//! Containers on this node: `attach` and `detach`, putting endpoints that survived a restart back
//! on their bridge, and the `endpoints.json` that `overlayd run` restores them from.
//!
//! The address comes from the registry (through Raft); the veth pair comes from [`host::plug`]; the endpoint is
//! announced in this node's gossip state. It does not make bridges or TAPs (see
//! [`super::reconcile`]).

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::Context;
use tracing::{info, warn};

use super::{Daemon, json};
use crate::api::{self, Attachment, Failure};
use crate::cluster::View;
use crate::consensus::Change;
use crate::host;
use crate::model::{Endpoint, Network, check_name, key};
use crate::registry::{Command, known};
use crate::state_dir;

/// Aliases one attach may give: each is gossiped with the endpoint to every node, and gossip
/// values must stay small.
const MAX_ALIASES: usize = 16;

impl Daemon {
    pub(super) async fn attach(
        &self,
        netns: String,
        network: String,
        ip: Option<Ipv4Addr>,
        service: Option<String>,
        mut aliases: Vec<String>,
    ) -> api::Reply {
        if let Some(bad) = aliases.iter().find(|a| check_name(a).is_err()) {
            return Err(Failure::usage(format!(
                "--alias {bad:?} is not allowed: an alias is named like a network (1 to 64 letters, digits, '-', '_' or '.', not starting with '-' or '.')"
            )));
        }
        if aliases.len() > MAX_ALIASES {
            return Err(Failure::usage(format!(
                "{} aliases: at most {MAX_ALIASES} per attach",
                aliases.len()
            )));
        }
        aliases.sort();
        aliases.dedup();
        let _plumbing = self.plumbing.lock().await;
        if !host::netns_exists(&netns) {
            return Err(Failure::usage(format!(
                "network namespace {netns} not found: create it with `ip netns add {netns}` (see `ip netns list`)"
            )));
        }
        let view = self.view().await;
        let net = known(&view.networks, &network)?.clone();
        // The reconcile loop may not have made the bridge yet for a network created just now.
        self.realise_network(&net).await?;
        if view
            .endpoints_on(&net)
            .any(|p| p.node == self.id && p.endpoint.netns == netns)
        {
            return Err(Failure::usage(format!(
                "{netns} is already attached to network {network}"
            )));
        }
        let reply = self
            .propose(Change::Registry(Command::Allocate {
                network: network.clone(),
                node: self.id.clone(),
                ip,
                service,
            }))
            .await?;
        let ip: Ipv4Addr = serde_json::from_value(reply)
            .map_err(|e| Failure::runtime(format!("leader's reply: {e}")))?;
        let mac = Endpoint::mac_for(ip);
        let host_if = format!("ovh{}", hex::encode(rand::random::<[u8; 4]>()));
        let plugged = host::plug(&host::Plug {
            net: &net,
            netns: &netns,
            host_if: &host_if,
            ip,
            mac: &mac,
        })
        .await;
        let ifname = match plugged {
            Ok(ifname) => ifname,
            Err(err) => {
                self.release(&net, ip).await;
                return Err(err.into());
            }
        };
        let endpoint = Endpoint {
            network_id: net.id.clone(),
            ip,
            mac: mac.clone(),
            netns: netns.clone(),
            host_if,
            aliases,
        };
        // The first network a container joins here answers its DNS.
        if !view
            .endpoints
            .iter()
            .any(|p| p.node == self.id && p.endpoint.netns == netns)
            && let Err(err) = host::container_resolver(&netns, Some(net.gateway()))
        {
            warn!(%netns, err = %format!("{err:#}"), "resolv.conf not written: the container does not use the network's DNS");
        }
        self.gossip
            .update(&[(key::endpoint(&net.id, ip), endpoint.to_gossip())], &[])
            .await;
        self.persist_endpoints().await;
        info!(%netns, %ifname, network = %net.name, %ip, %mac, "container attached");
        Ok(json(&Attachment {
            netns,
            network,
            ip,
            mac,
            node: self.id.clone(),
        }))
    }

    pub(super) async fn detach(&self, netns: String, network: String) -> api::Reply {
        let _plumbing = self.plumbing.lock().await;
        let view = self.view().await;
        let net = known(&view.networks, &network)?;
        let same_name: Vec<_> = view
            .endpoints_on(net)
            .filter(|p| p.endpoint.netns == netns)
            .collect();
        let Some(placed) = same_name.iter().find(|p| p.node == self.id) else {
            return Err(Failure::usage(match same_name.first() {
                Some(p) => format!(
                    "{netns} is attached to network {network} on node {}, not this one: run detach there",
                    p.node
                ),
                None => format!("{netns} is not attached to network {network}"),
            }));
        };
        let endpoint = &placed.endpoint;
        // Detached before its bridge came back after a restart: nothing is left to restore.
        self.restoring
            .lock()
            .await
            .retain(|e| e.host_if != endpoint.host_if);
        host::remove_link(&endpoint.host_if).await;
        self.gossip
            .update(&[], &[key::endpoint(&net.id, endpoint.ip)])
            .await;
        self.persist_endpoints().await;
        let resolver = view
            .endpoints
            .iter()
            .filter(|p| p.node == self.id && p.endpoint.netns == netns)
            .find(|p| p.endpoint.network_id != net.id)
            .and_then(|p| {
                view.networks
                    .values()
                    .find(|n| n.id == p.endpoint.network_id)
            })
            .map(Network::gateway);
        if let Err(err) = host::container_resolver(&netns, resolver) {
            warn!(%netns, err = %format!("{err:#}"), "resolv.conf not updated after detach");
        }
        self.release(net, endpoint.ip).await;
        info!(%netns, network = %net.name, ip = %endpoint.ip, "container detached");
        Ok(json(&endpoint.ip))
    }

    /// Gives an address back to the registry. If no leader commits it, the address stays
    /// held (and unused) until this node detaches again: better than handing it out twice.
    async fn release(&self, net: &Network, ip: Ipv4Addr) {
        let command = Command::Release {
            network_id: net.id.clone(),
            node: self.id.clone(),
            ip,
        };
        if let Err(failure) = self.propose(Change::Registry(command)).await {
            warn!(%ip, network = %net.name, %failure, "address not released: it stays held by this node");
        }
    }

    /// Puts endpoints that survived a restart back on their bridge once it exists again; drops
    /// those whose network was removed meanwhile.
    pub(super) async fn restore(&self, view: &View) {
        let mut restoring = self.restoring.lock().await;
        if restoring.is_empty() {
            return;
        }
        let realised = self.realised.lock().await;
        let mut changed = false;
        let mut pending = Vec::new();
        for endpoint in restoring.drain(..) {
            if let Some(net) = realised.get(&endpoint.network_id) {
                match restore_port(&endpoint, net).await {
                    Ok(()) => {
                        info!(netns = %endpoint.netns, network = %net.name, ip = %endpoint.ip, "endpoint restored")
                    }
                    Err(err) => {
                        warn!(netns = %endpoint.netns, err = %format!("{err:#}"), "endpoint not restored; its container is cut off")
                    }
                }
            } else if !view.networks.values().any(|n| n.id == endpoint.network_id) {
                host::remove_link(&endpoint.host_if).await;
                let gone = key::endpoint(&endpoint.network_id, endpoint.ip);
                self.gossip.update(&[], &[gone]).await;
                changed = true;
                info!(netns = %endpoint.netns, ip = %endpoint.ip, "network removed while this node was down; endpoint unplugged");
            } else {
                pending.push(endpoint);
            }
        }
        *restoring = pending;
        drop(realised);
        if changed {
            self.persist_endpoints().await;
        }
    }

    /// Writes this node's endpoints to the state dir, for `overlayd run` after a restart.
    async fn persist_endpoints(&self) {
        let endpoints: Vec<Endpoint> = self
            .gossip
            .own_keys()
            .await
            .iter()
            .filter(|(k, _)| k.starts_with(key::ENDPOINT_PREFIX))
            .filter_map(|(_, v)| serde_json::from_str(v).ok())
            .collect();
        if let Err(err) = state_dir::save_endpoints(&self.config.state_dir, &endpoints) {
            warn!(err = %format!("{err:#}"), "endpoints not saved: a restart will not restore them");
        }
    }
}

/// Puts a restored endpoint's veth back on its bridge, with its filter, static entry and port
/// flags re-applied (they may be gone, say if the bridge was removed while overlayd was down).
async fn restore_port(endpoint: &Endpoint, net: &Network) -> anyhow::Result<()> {
    let mac = endpoint
        .mac
        .parse()
        .with_context(|| format!("container MAC {}", endpoint.mac))?;
    let port = host::ContainerPort {
        host_if: &endpoint.host_if,
        mac,
        ip: endpoint.ip,
    };
    host::enslave_container(&port, net).await
}

/// Endpoints saved before a restart whose host-side veth still exists; the others' containers
/// went away while overlayd was down.
pub(super) fn surviving_endpoints(dir: &Path) -> Result<Vec<Endpoint>, Failure> {
    let (alive, gone): (Vec<Endpoint>, Vec<Endpoint>) = state_dir::load_endpoints(dir)?
        .into_iter()
        .partition(|e| host::link_exists(&e.host_if));
    for e in &gone {
        info!(netns = %e.netns, ip = %e.ip, "container went away while this node was down; its address is free again");
        if let Err(err) = host::container_resolver(&e.netns, None) {
            warn!(netns = %e.netns, err = %format!("{err:#}"), "its resolv.conf is left behind");
        }
    }
    Ok(alive)
}
