//! Containers on this node: `attach` and `detach`, putting endpoints that survived a restart back
//! on their bridge, unplugging those whose address the registry took back, and the
//! `endpoints.json` that `overlayd run` restores them from.
//!
//! The address comes from the registry (through Raft); the veth pair comes from [`host::plug`]; the endpoint is
//! announced in this node's gossip state. It does not make bridges or TAPs (see
//! [`super::reconcile`]).

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use tracing::{info, warn};

use super::{Daemon, json};
use crate::api::{self, Attachment, Failure};
use crate::consensus::Change;
use crate::host;
use crate::model::{Endpoint, Network, check_ifname, check_name, key};
use crate::registry::{Command, Holder, Registry, known};
use crate::state_dir;

/// How long an attach waits for this node's registry to show the address it was given.
const HELD_HERE_WITHIN: Duration = Duration::from_secs(5);

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
        ifname: Option<String>,
    ) -> api::Reply {
        if let Some(name) = &ifname {
            check_ifname(name).map_err(Failure::usage)?;
        }
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
        if let Some(name) = &ifname
            && host::netns_links(&netns).await?.contains(name)
        {
            return Err(Failure::usage(format!(
                "{netns} already has an interface named {name}: choose another --ifname"
            )));
        }
        let view = self.view_knowing(&network).await?;
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
            .propose(Change::registry(Command::Allocate {
                network: network.clone(),
                node: self.id.clone(),
                ip,
                service,
            }))
            .await?;
        let ip: Ipv4Addr = serde_json::from_value(reply)
            .map_err(|e| Failure::runtime(format!("leader's reply: {e}")))?;
        let target = host::Target::Netns {
            netns: &netns,
            ifname: ifname.as_deref(),
        };
        let plugged = self.plug_endpoint(&net, ip, &netns, aliases, &target).await;
        let (endpoint, plugged) = match plugged {
            Ok(plugged) => plugged,
            Err(failure) => {
                self.release(&net, ip).await;
                return Err(failure);
            }
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
        let mac = endpoint.mac;
        info!(%netns, ifname = %plugged.ifname, network = %net.name, %ip, %mac, "container attached");
        Ok(json(&Attachment {
            netns,
            network,
            ip,
            mac,
            node: self.id.clone(),
            ifname: plugged.ifname,
            subnet: net.subnet,
            gateway: net.gateway(),
            default_route: plugged.default_route,
        }))
    }

    /// Unplugs `netns` from `network`; with `missing_ok`, a container that is not attached there
    /// (or a network that is gone) is no error and the reply is `null`.
    pub(super) async fn detach(
        &self,
        netns: String,
        network: String,
        missing_ok: bool,
    ) -> api::Reply {
        let _plumbing = self.plumbing.lock().await;
        let view = self.view().await;
        let net = match known(&view.networks, &network) {
            Ok(net) => net,
            Err(_) if missing_ok => return Ok(serde_json::Value::Null),
            Err(failure) => return Err(failure),
        };
        let same_name: Vec<_> = view
            .endpoints_on(net)
            .filter(|p| p.endpoint.netns == netns)
            .collect();
        let Some(placed) = same_name.iter().find(|p| p.node == self.id) else {
            if missing_ok {
                return Ok(serde_json::Value::Null);
            }
            return Err(Failure::usage(match same_name.first() {
                Some(p) => format!(
                    "{netns} is attached to network {network} on node {}, not this one: run detach there",
                    p.node
                ),
                None => format!("{netns} is not attached to network {network}"),
            }));
        };
        let endpoint = &placed.endpoint;
        self.unplug_endpoint(endpoint).await;
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

    /// Gives container `name` its interface on `net` with address `ip` (which this node was
    /// given), through `target`, and announces it to the cluster: the one path of `attach` and
    /// of the Docker plugin's `Join`. Returns the endpoint and what was made for the container. On failure nothing is plugged or announced; the address stays held, for the
    /// caller to release. The caller holds `plumbing`.
    pub(super) async fn plug_endpoint(
        &self,
        net: &Network,
        ip: Ipv4Addr,
        name: &str,
        aliases: Vec<String>,
        target: &host::Target<'_>,
    ) -> Result<(Endpoint, host::Plugged), Failure> {
        self.held_here(net, ip).await?;
        let mac = Endpoint::mac_for(ip);
        let host_if = format!("ovh{}", hex::encode(rand::random::<[u8; 4]>()));
        let plug = host::Plug {
            net,
            host_if: &host_if,
            ip,
            mac: &mac,
        };
        let plugged = host::plug(&plug, target).await?;
        let endpoint = Endpoint {
            network_id: net.id.clone(),
            ip,
            mac,
            netns: name.to_string(),
            host_if,
            aliases,
        };
        self.gossip
            .update(&[(key::endpoint(&net.id, ip), endpoint.to_gossip())], &[])
            .await;
        self.persist_endpoints().await;
        Ok((endpoint, plugged))
    }

    /// Removes this node's `endpoint`: its veth pair goes, and it leaves the cluster. Its
    /// address stays held (see [`Daemon::release`]). The caller holds `plumbing`.
    pub(super) async fn unplug_endpoint(&self, endpoint: &Endpoint) {
        // Removed before its bridge came back after a restart: nothing is left to restore.
        self.restoring
            .lock()
            .await
            .retain(|e| e.host_if != endpoint.host_if);
        host::remove_link(&endpoint.host_if).await;
        self.gossip
            .update(&[], &[key::endpoint(&endpoint.network_id, endpoint.ip)])
            .await;
        self.persist_endpoints().await;
    }

    /// Waits until this node's copy of the registry gives `ip` to this node, bounded by
    /// [`HELD_HERE_WITHIN`]. The leader replies once a majority has the allocation, which may be
    /// before this node applied it; [`Daemon::unplug_released`] would take an endpoint announced
    /// before then for one whose address was taken back.
    async fn held_here(&self, net: &Network, ip: Ipv4Addr) -> Result<(), Failure> {
        let deadline = Instant::now() + HELD_HERE_WITHIN;
        while self.consensus.registry().container_node(&net.id, ip) != Some(self.id.as_str()) {
            if Instant::now() > deadline {
                return Err(Failure::runtime(format!(
                    "{ip} on network {} was allocated, but this node's registry did not show it within {HELD_HERE_WITHIN:?}: nothing was attached",
                    net.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Unplugs this node's containers whose address the registry no longer gives to this node:
    /// `service rm --force` took their addresses back, or their network went while this node
    /// was down. Level-triggered (the reconcile loop calls it every round); skipped while an
    /// attach or detach is under way, since those change the same endpoints.
    pub(super) async fn unplug_released(&self) {
        let Ok(_plumbing) = self.plumbing.try_lock() else {
            return;
        };
        // Own keys before the registry: an endpoint is announced only after this node's registry
        // gave it its address (`held_here`), so the registry read next shows that too.
        let own = self.gossip.own_keys().await;
        let registry = self.consensus.registry();
        let released: Vec<(Endpoint, String)> = own
            .iter()
            .filter(|(k, _)| k.starts_with(key::ENDPOINT_PREFIX))
            .filter_map(|(_, v)| serde_json::from_str::<Endpoint>(v).ok())
            .filter_map(|e| released_because(&registry, &self.id, &e).map(|why| (e, why)))
            .collect();
        if released.is_empty() {
            return;
        }
        let mut restoring = self.restoring.lock().await;
        let mut gone = Vec::new();
        for (endpoint, why) in released {
            restoring.retain(|e| e.host_if != endpoint.host_if);
            host::remove_link(&endpoint.host_if).await;
            gone.push(key::endpoint(&endpoint.network_id, endpoint.ip));
            info!(netns = %endpoint.netns, ip = %endpoint.ip, reason = %why, "container unplugged");
        }
        drop(restoring);
        self.gossip.update(&[], &gone).await;
        self.persist_endpoints().await;
    }

    /// Gives an address back to the registry. If no leader commits it, the address stays held
    /// by this node, unused (nothing frees it later yet): better than handing it out twice.
    pub(super) async fn release(&self, net: &Network, ip: Ipv4Addr) {
        let command = Command::Release {
            network_id: net.id.clone(),
            node: self.id.clone(),
            ip,
        };
        if let Err(failure) = self.propose(Change::registry(command)).await {
            warn!(%ip, network = %net.name, %failure, "address not released: it stays held by this node");
        }
    }

    /// Puts endpoints that survived a restart back on their bridge once it exists again.
    pub(super) async fn restore(&self) {
        let mut restoring = self.restoring.lock().await;
        if restoring.is_empty() {
            return;
        }
        let realised = self.realised.lock().await;
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
            } else {
                // Its network's bridge is not made yet, or the network is gone
                // ([`Daemon::unplug_released`] unplugs it then).
                pending.push(endpoint);
            }
        }
        *restoring = pending;
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

/// Why the registry no longer gives `endpoint`'s address to `node`, if it does not.
fn released_because(registry: &Registry, node: &str, endpoint: &Endpoint) -> Option<String> {
    let ip = endpoint.ip;
    match registry.holder(&endpoint.network_id, ip) {
        Some(Holder::Container { node: holder, .. }) if holder == node => None,
        Some(Holder::Container { node: holder, .. }) => {
            Some(format!("the registry gives {ip} to node {holder}"))
        }
        Some(Holder::Vip { service }) => Some(format!("{ip} is the VIP of service {service}")),
        None if !registry
            .networks()
            .values()
            .any(|n| n.id == endpoint.network_id) =>
        {
            Some("its network was removed".to_string())
        }
        None => Some(format!(
            "the registry took {ip} back (its service was removed with --force)"
        )),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_counts_as_released_unless_the_registry_gives_it_to_this_node() {
        // Network `w`: .2 the VIP of `api`, .3 a task on node a, .4 one on node b, .5 free.
        let registry: Registry = serde_json::from_value(serde_json::json!({
            "networks": {"web": {"id": "w", "name": "web", "subnet": "198.19.0.0/24", "vni": 4096, "mtu": 1450}},
            "addresses": {"w": {
                "198.19.0.2": {"vip": {"service": "api"}},
                "198.19.0.3": {"container": {"node": "a", "service": "api"}},
                "198.19.0.4": {"container": {"node": "b", "service": "api"}},
            }},
        }))
        .unwrap();
        let why = |network_id: &str, last: u8| {
            let ip = Ipv4Addr::new(198, 19, 0, last);
            let endpoint = Endpoint {
                network_id: network_id.into(),
                ip,
                mac: Endpoint::mac_for(ip),
                netns: "c".into(),
                host_if: "ovh1".into(),
                aliases: vec![],
            };
            released_because(&registry, "a", &endpoint)
        };
        assert_eq!(why("w", 3), None);
        assert!(why("w", 4).unwrap().contains("node b"));
        assert!(why("w", 2).unwrap().contains("VIP of service api"));
        assert!(why("w", 5).unwrap().contains("--force"));
        assert!(why("gone", 3).unwrap().contains("network was removed"));
    }
}
