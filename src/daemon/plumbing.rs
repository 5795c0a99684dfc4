//! What the reconcile loop does to this host and to the data plane for each network, behind
//! [`Plumbing`], so that the simulator (`crate::sim`) runs the same code over a recording fake.
//!
//! Behind the seam: making and removing a network's bridge, TAP, egress rules and DNS server
//! ([`Host`] does it with iproute2, nftables and the data plane), and publishing the data
//! plane's tables. The decisions ([`realise`]: which networks to make or remove, and the
//! `realised/<id>` gossip key each made network is announced with, which `network create`
//! waits for on every member) are the same for both.
//!
//! Not behind it (the daemon only): the routing mesh's tc hooks, the member-port guard, DNS
//! records, restoring and unplugging endpoints, the balancer and health checks, the state dir,
//! and attach and detach.

use std::collections::BTreeMap;

use anyhow::Context;
use tracing::{info, warn};

use super::{dns, vni};
use crate::cluster::View;
use crate::gossip::Gossip;
use crate::model::{Network, key};
use crate::{egress, host};

#[async_trait::async_trait]
pub(crate) trait Plumbing: Sync {
    /// Makes `net` on this host; on failure nothing of it is left, so a retry starts afresh.
    async fn add_network(&self, net: &Network) -> anyhow::Result<()>;
    /// Removes what [`Plumbing::add_network`] made; logs rather than fails.
    async fn remove_network(&self, net: &Network);
    /// Gives the data plane new tables.
    fn publish(&self, tables: overlay::Tables);
}

/// Makes the view's networks that are not in `realised` (unless `stopping`) and removes those
/// the view no longer has, keeping `realised` and this node's `realised/<id>` gossip keys equal
/// to what is made. One network that cannot be made does not hold up the others.
pub(crate) async fn realise(
    view: &View,
    realised: &mut BTreeMap<String, Network>,
    plumbing: &impl Plumbing,
    gossip: &Gossip,
    stopping: bool,
) {
    let gone: Vec<String> = realised
        .keys()
        .filter(|id| !view.networks.values().any(|n| n.id == **id))
        .cloned()
        .collect();
    for id in gone {
        unmake_network(realised, &id, plumbing, gossip).await;
    }
    if stopping {
        return;
    }
    for net in view.networks.values() {
        if let Err(err) = make_network(realised, net, plumbing, gossip).await {
            warn!(network = %net.name, err = %format!("{err:#}"), "network not made on this node; retrying");
        }
    }
}

/// Makes `net` unless it is in `realised`, then records and announces it. A network made
/// here with the same VNI was removed from the registry (which gave its VNI to `net`), though
/// no round has removed it from this node yet: it goes first.
pub(crate) async fn make_network(
    realised: &mut BTreeMap<String, Network>,
    net: &Network,
    plumbing: &impl Plumbing,
    gossip: &Gossip,
) -> anyhow::Result<()> {
    if realised.contains_key(&net.id) {
        return Ok(());
    }
    let replaced: Vec<String> = realised
        .values()
        .filter(|made| made.vni == net.vni)
        .map(|made| made.id.clone())
        .collect();
    for id in replaced {
        unmake_network(realised, &id, plumbing, gossip).await;
    }
    plumbing
        .add_network(net)
        .await
        .with_context(|| format!("making network {} on this node", net.name))?;
    info!(network = %net.name, vni = net.vni, subnet = %net.subnet, mtu = net.mtu, "network ready on this node");
    gossip
        .update(&[(key::realised(&net.id), String::new())], &[])
        .await;
    realised.insert(net.id.clone(), net.clone());
    Ok(())
}

/// Removes network `id` from this node, from `realised` and from its gossip keys.
async fn unmake_network(
    realised: &mut BTreeMap<String, Network>,
    id: &str,
    plumbing: &impl Plumbing,
    gossip: &Gossip,
) {
    let Some(net) = realised.remove(id) else {
        return;
    };
    plumbing.remove_network(&net).await;
    gossip.update(&[], &[key::realised(id)]).await;
    info!(network = %net.name, vni = net.vni, "network removed from this node");
}

/// This host and its data plane.
pub(crate) struct Host<'a> {
    pub(super) dataplane: &'a overlay::DataPlane,
    pub(super) dns: &'a dns::Dns,
}

#[async_trait::async_trait]
impl Plumbing for Host<'_> {
    async fn add_network(&self, net: &Network) -> anyhow::Result<()> {
        let made_bridge = host::ensure_bridge(net).await?;
        let tap = net.tap_name();
        let made = async {
            self.dataplane
                .add_network(vni(net), &tap)
                .with_context(|| format!("creating TAP {tap}"))?;
            // Egress last: `egress::add` leaves no rule when it fails, so there is nothing of
            // it to undo here.
            let plugged = async {
                host::enslave(&tap, net).await?;
                egress::add(net).await
            };
            if let Err(err) = plugged.await {
                self.dataplane.remove_network(vni(net));
                return Err(err);
            }
            Ok(())
        }
        .await;
        if let Err(err) = made {
            if made_bridge {
                host::remove_link(&net.bridge_name()).await;
            }
            return Err(err);
        }
        self.dns.start(net);
        Ok(())
    }

    async fn remove_network(&self, net: &Network) {
        self.dataplane.remove_network(vni(net));
        self.dns.stop(&net.id);
        egress::remove(net).await;
        host::remove_link(&net.bridge_name()).await;
    }

    fn publish(&self, tables: overlay::Tables) {
        self.dataplane.publish(tables);
    }
}
