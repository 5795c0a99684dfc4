//! The reconcile loop: every [`RECONCILE_EVERY`], and at once when a member dies or comes
//! back or the registry changes, it derives the [`View`] from gossip and the
//! registry and makes this node match it. It steers the routing mesh's published ports into
//! overlayd (tc hooks, port reservations), makes and removes bridges, TAPs and their egress
//! rules, keeps containers from the members' ports, puts restored
//! endpoints back, unplugs those whose address the registry took back, publishes the data
//! plane's tables, saves the members to rejoin through, and logs gossip entries that stay
//! refused.
//!
//! Level-triggered: whatever fails is logged and tried again next round, and one network that
//! cannot be made does not hold up the others. Containers are plugged in elsewhere (see
//! [`super::endpoints`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{debug, error, warn};

use super::Daemon;
use super::plumbing::{self, Plumbing};
use crate::cluster::View;
use crate::events::Events;
use crate::model::{Network, NodeState, key};
use crate::{egress, host, mesh_hooks, services, state_dir};

const RECONCILE_EVERY: Duration = Duration::from_millis(250);
/// Rounds a gossip entry stays refused before it is logged and counted. An endpoint announced
/// just before this node's registry applies its address is refused for a round or two.
const REFUSED_ROUNDS: u32 = 8;

/// What the reconcile loop remembers between rounds.
#[derive(Default)]
struct Seen {
    published: overlay::Tables,
    /// What the cluster's events were last compared with.
    events: Events,
    /// Other members' gossip addresses, as last saved to the state dir.
    peers: Vec<SocketAddr>,
    /// Refused gossip entries and for how many rounds in a row.
    refused: BTreeMap<String, u32>,
    /// The services and tasks last given to the balancer.
    services: Vec<ingress::service::Spec>,
    /// The members' ports last kept from containers (see [`egress::member_ports`]).
    member_ports: BTreeSet<egress::MemberPort>,
    /// Leaving members whose tasks this node's balancer was last confirmed to drain.
    drained: BTreeSet<String>,
    /// Nodes out of the cluster, as last given to gossip.
    departed: BTreeSet<String>,
    /// The join token last written to the state dir.
    join_token: String,
}

impl Daemon {
    pub(super) async fn reconcile_forever(self: Arc<Daemon>) {
        let mut seen = Seen::default();
        let mut ticker = tokio::time::interval(RECONCILE_EVERY);
        // A dead member's tasks leave the balancer the moment gossip calls it down, and what the
        // registry applied is made at once.
        let mut liveness = self.gossip.liveness().await;
        let mut registry = self.consensus.registry_changes();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = liveness.changed() => {}
                _ = registry.changed() => {}
            }
            if let Err(err) = self.reconcile(&mut seen).await {
                warn!(err = %format!("{err:#}"), "reconcile failed; retrying");
            }
        }
    }

    async fn reconcile(&self, seen: &mut Seen) -> anyhow::Result<()> {
        let view = self.view().await;
        for event in seen.events.update(&view) {
            event.log();
        }
        self.note_refused(&view, &mut seen.refused);
        // Before `realise`: hooks of a network being removed go before its TAP does.
        self.steer_mesh(&view).await;
        self.realise(&view).await;
        self.guard_member_ports(&view, &mut seen.member_ports).await;
        self.dns.refresh(&view);
        self.restore().await;
        self.unplug_released().await;
        if self.balance(&view, &mut seen.services) {
            self.confirm_drained(&view, &mut seen.drained).await;
        }
        self.shun_departed(&view, &mut seen.departed);
        let tables = view.tables(&self.id, self.config.vxlan_port, &self.secret);
        if tables != seen.published {
            debug!(networks = tables.networks.len(), "publishing tables");
            self.host().publish(tables.clone());
            seen.published = tables;
        }
        // Last: a state dir that cannot be written must not hold up the host or the data plane.
        let peers: Vec<SocketAddr> = view
            .members
            .iter()
            .filter(|m| !m.node.is_self)
            .map(|m| m.gossip)
            .collect();
        if peers != seen.peers {
            state_dir::save_peers(&self.config.state_dir, &peers)?;
            seen.peers = peers;
        }
        let token = self.token();
        if token != seen.join_token {
            state_dir::save_join_token(&self.config.state_dir, &token)?;
            seen.join_token = token;
        }
        Ok(())
    }

    /// Gives the balancer the view's services and tasks when they changed, and expires its
    /// idle flows. Returns whether the balancer now has the view's.
    fn balance(&self, view: &View, seen: &mut Vec<ingress::service::Spec>) -> bool {
        let now = Instant::now();
        let specs = services::specs(view);
        let current = specs == *seen
            || match ingress::service::Table::build(
                ingress::maglev::DEFAULT_SIZE,
                specs.iter().cloned(),
            ) {
                Ok(table) => {
                    debug!(services = specs.len(), "publishing services");
                    self.balancer.publish(table, now);
                    *seen = specs;
                    true
                }
                Err(err) => {
                    warn!(%err, "services not given to the balancer; retrying");
                    false
                }
            };
        self.balancer.handle_timeout(now);
        current
    }

    /// Tells leaving members, through gossip, that this node's balancer (just given `view`)
    /// gives their tasks no new flows: what they wait for before they go.
    async fn confirm_drained(&self, view: &View, seen: &mut BTreeSet<String>) {
        let leaving: BTreeSet<String> = view
            .members
            .iter()
            .filter(|m| m.node.state == NodeState::Leaving && !m.node.is_self)
            .map(|m| m.node.id.clone())
            .collect();
        if leaving == *seen {
            return;
        }
        let set: Vec<(String, String)> = leaving
            .difference(seen)
            .map(|id| (key::drained(id), String::new()))
            .collect();
        let gone: Vec<String> = seen
            .difference(&leaving)
            .map(|id| key::drained(id))
            .collect();
        self.gossip.update(&set, &gone).await;
        *seen = leaving;
    }

    /// Stops taking gossip from nodes that are out of the cluster, and says so once if this
    /// node is one of them (removed with `--force` while it ran).
    fn shun_departed(&self, view: &View, seen: &mut BTreeSet<String>) {
        let departed: BTreeSet<String> = view.departed.keys().cloned().collect();
        if departed == *seen {
            return;
        }
        let removed = view.departed.get(&self.id).is_some_and(|d| !d.left);
        if removed && !seen.contains(&self.id) {
            error!(
                node = %self.id,
                "this node was removed from the cluster: members refuse its gossip, peer requests and VXLAN; stop it, remove its state dir and join again with a current token"
            );
        }
        self.gossip.set_departed(departed.iter().cloned().collect());
        *seen = departed;
    }

    /// Makes the routing mesh's hooks and port reservations match the view's published ports.
    async fn steer_mesh(&self, view: &View) {
        let realised: BTreeSet<String> = self.realised.lock().await.keys().cloned().collect();
        let named = mesh_hooks::named_addresses(view);
        let addresses = if named.is_empty() {
            BTreeMap::new()
        } else {
            match host::addresses().await {
                Ok(mut all) => {
                    all.retain(|a, _| named.contains(a));
                    all
                }
                Err(err) => {
                    warn!(err = %format!("{err:#}"), "this node's addresses unknown; publishes bound to one address wait");
                    BTreeMap::new()
                }
            }
        };
        let host = mesh_hooks::Host {
            id: &self.id,
            address: self.config.advertise,
            underlay: &self.underlay,
            addresses: &addresses,
            realised: &realised,
        };
        let plan = mesh_hooks::plan(view, &host);
        let node = super::mesh_hooks::Node {
            id: &self.id,
            address: self.config.advertise,
        };
        self.mesh.apply(&plan, &node).await;
    }

    /// Keeps containers from the members' VTEP and peer ports when the members change.
    async fn guard_member_ports(&self, view: &View, seen: &mut BTreeSet<egress::MemberPort>) {
        let ports = egress::member_ports(&view.members);
        // Stopping, the table is gone or going; it is not made again behind `stop`.
        if ports == *seen || self.stopping.load(Ordering::Relaxed) {
            return;
        }
        match egress::guard_member_ports(&ports).await {
            Ok(()) => *seen = ports,
            Err(err) => {
                warn!(err = %format!("{err:#}"), "members' ports not kept from containers; retrying")
            }
        }
    }

    /// Logs and counts gossip entries that stay refused: once each, not every round.
    fn note_refused(&self, view: &View, seen: &mut BTreeMap<String, u32>) {
        seen.retain(|entry, _| view.refused.contains(entry));
        for entry in &view.refused {
            let rounds = seen.entry(entry.clone()).or_default();
            *rounds += 1;
            if *rounds == REFUSED_ROUNDS {
                self.gossip_refused.fetch_add(1, Ordering::Relaxed);
                warn!(%entry, "gossip entry refused");
            }
        }
    }

    /// Makes this host's bridges and TAPs match the view's networks.
    async fn realise(&self, view: &View) {
        let mut realised = self.realised.lock().await;
        // Read under the `realised` lock, so `stop` cannot be overtaken by a network made here.
        let stopping = self.stopping.load(Ordering::Relaxed);
        plumbing::realise(view, &mut realised, &self.host(), &self.gossip, stopping).await;
    }

    /// Makes `net`'s bridge and TAP now unless they exist, for an attach that cannot wait for
    /// the next round.
    pub(super) async fn realise_network(&self, net: &Network) -> anyhow::Result<()> {
        let mut realised = self.realised.lock().await;
        if self.stopping.load(Ordering::Relaxed) {
            return Ok(());
        }
        plumbing::make_network(&mut realised, net, &self.host(), &self.gossip).await
    }

    /// This host and its data plane, as the reconcile loop changes them.
    fn host(&self) -> plumbing::Host<'_> {
        plumbing::Host {
            dataplane: &self.dataplane,
            dns: &self.dns,
        }
    }
}
