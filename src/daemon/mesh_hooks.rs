//! Makes this node's routing-mesh hooks (tc filters) and port reservations match the plan of
//! [`crate::mesh_hooks`], with `tc`, from the reconcile loop.
//!
//! Every filter overlayd adds has a `pref` in [`OURS`], one `pref` per filter, so exactly ours
//! are removed: on changes, at start (leftovers of a run that was killed), and when the daemon
//! stops. A port's hooks go in only once its socket is bound, and come out before it is closed,
//! so the port is never steered while another process could hold it.
//!
//! The `clsact` qdisc a hook needs is added if missing, and removed again only if this run added
//! it and no filter (ours or anyone's) is left on it. After a crash the sweep at start removes
//! our filters but leaves an empty `clsact`: it may be someone else's, and empty it does nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::RangeInclusive;

use anyhow::Context;
use socket2::{Domain, Socket, Type};
use tokio::sync::Mutex;
use tracing::{error, info, warn};

use super::mesh_proxy::{self, Proxy};
use crate::api;
use crate::host;
use crate::mesh_hooks::{Action, Direction, Hook, Plan, Reservation};
use crate::model::PublishProtocol;

/// The tc `pref`s that are overlayd's on any device.
pub const OURS: RangeInclusive<u16> = 0xC000..=0xCFFF;
/// Pass filters come first: a lower `pref` is evaluated earlier.
const PASS: RangeInclusive<u16> = 0xC000..=0xC00F;
const STEER: RangeInclusive<u16> = 0xC010..=0xCFFF;

pub struct MeshHooks {
    state: Mutex<State>,
    /// Listens on the `proxy=v2` ports instead of holding them with a bare socket.
    proxy: Proxy,
}

#[derive(Default)]
struct State {
    /// Set by [`MeshHooks::stop`]: nothing is installed or held any more.
    stopped: bool,
    installed: BTreeMap<Hook, Installed>,
    held: BTreeMap<Reservation, Held>,
    /// Ports this node should hold but cannot, with the service and why.
    refused: BTreeMap<Reservation, (String, String)>,
    /// Devices whose `clsact` qdisc this run added.
    qdiscs: BTreeSet<String>,
}

struct Installed {
    pref: u16,
    /// The TAP's ifindex when the filter went in: `mirred` holds the device itself, so a TAP
    /// made again under the same name gets nothing until the filter is made again.
    tap: Option<u32>,
}

struct Held {
    service: String,
    /// Its hooks as last planned: the port stays held while any of them is still installed.
    hooks: BTreeSet<Hook>,
    /// Closed on drop, which frees the port.
    hold: Hold,
}

/// What holds a port.
enum Hold {
    /// A bound socket that takes nothing: the hooks steer the port's packets past it.
    Socket { _bound: Socket },
    /// The `proxy=v2` proxy's listener.
    Proxy { _listener: mesh_proxy::Listener },
}

/// Who is asking, for messages that name the node.
pub struct Node<'a> {
    pub id: &'a str,
    pub address: Ipv4Addr,
}

impl MeshHooks {
    /// Removes our filters left by an earlier run on `lo`, `underlay` and the networks' bridges.
    pub async fn start(underlay: &str, proxy: Proxy) -> MeshHooks {
        let mut devs = vec!["lo".to_string(), underlay.to_string()];
        devs.extend(bridges());
        for dev in &devs {
            for direction in [Direction::Ingress, Direction::Egress] {
                match prefs(dev, direction).await {
                    Ok(prefs) => {
                        for pref in prefs.into_iter().filter(|p| OURS.contains(p)) {
                            info!(%dev, direction = direction.as_str(), pref, "removing a mesh hook left by an earlier run");
                            if let Err(err) = delete(dev, direction, pref).await {
                                warn!(err = %format!("{err:#}"), "could not remove a leftover mesh hook");
                            }
                        }
                    }
                    Err(err) => {
                        warn!(%dev, err = %format!("{err:#}"), "could not look for leftover mesh hooks")
                    }
                }
            }
        }
        MeshHooks {
            state: Mutex::default(),
            proxy,
        }
    }

    /// Makes the kernel match `plan`: binds the ports it wants, then adds their hooks and the
    /// reply hooks; removes the hooks it no longer wants, then frees their ports. Whatever fails
    /// is logged and tried again on the next call.
    pub async fn apply(&self, plan: &Plan, node: &Node<'_>) {
        let mut state = self.state.lock().await;
        if state.stopped {
            return;
        }
        state.reserve(plan, node, &self.proxy);
        let mut desired: BTreeSet<&Hook> = plan.replies.iter().collect();
        for (reservation, claim) in &plan.ports {
            if state.held.contains_key(reservation) {
                desired.extend(&claim.hooks);
            }
        }
        let stale: Vec<Hook> = state
            .installed
            .iter()
            .filter(|(hook, installed)| {
                !desired.contains(hook) || installed.tap != hook.tap().and_then(ifindex)
            })
            .map(|(hook, _)| hook.clone())
            .collect();
        for hook in stale {
            state.remove(&hook).await;
        }
        for hook in desired {
            if !state.installed.contains_key(hook)
                && let Err(err) = state.install(hook).await
            {
                warn!(%hook, err = %format!("{err:#}"), "mesh hook not installed; retrying");
            }
        }
        let State {
            held, installed, ..
        } = &mut *state;
        held.retain(|r, h| {
            plan.ports.contains_key(r) || h.hooks.iter().any(|h| installed.contains_key(h))
        });
        state.remove_unused_qdiscs().await;
    }

    /// Removes every hook, frees every port (closing the proxy's listeners and connections),
    /// and removes the qdiscs this run added.
    pub async fn stop(&self) {
        let mut state = self.state.lock().await;
        state.stopped = true;
        let hooks: Vec<Hook> = state.installed.keys().cloned().collect();
        for hook in hooks {
            state.remove(&hook).await;
        }
        state.held.clear();
        state.refused.clear();
        state.remove_unused_qdiscs().await;
    }

    /// The published ports this node holds or cannot hold, for `overlayd status`.
    pub async fn status(&self) -> api::Mesh {
        let state = self.state.lock().await;
        let held = state
            .held
            .iter()
            .map(|(r, held)| port_status(r, &held.service, None));
        let refused = state
            .refused
            .iter()
            .map(|(r, (service, why))| port_status(r, service, Some(why.clone())));
        api::Mesh {
            hooks: state.installed.len(),
            ports: held.chain(refused).collect(),
            proxy: self.proxy.status(),
        }
    }
}

impl State {
    /// Binds the ports `plan` wants that are not held yet (or held the other way: a bare
    /// socket for a port now proxied, or the reverse), and records (and logs once) those that
    /// cannot be.
    fn reserve(&mut self, plan: &Plan, node: &Node, proxy: &Proxy) {
        let mut refused = BTreeMap::new();
        for (service, reservation) in &plan.conflicts {
            let holder = plan
                .ports
                .get(reservation)
                .map_or("another service", |c| c.service.as_str());
            let why = format!(
                "port {reservation} on node {} ({}) is published by service {holder} too; remove one of the two publishes",
                node.id, node.address
            );
            refused.insert(*reservation, (service.clone(), why));
        }
        for (reservation, claim) in &plan.ports {
            if let Some(held) = self.held.get_mut(reservation) {
                if matches!(held.hold, Hold::Proxy { .. }) == claim.proxy {
                    held.service.clone_from(&claim.service);
                    held.hooks.clone_from(&claim.hooks);
                    continue;
                }
                // Its hooks (if any) come out in this round, before the port is free again;
                // a listener's socket closes as its task ends, so binding may wait a round.
                self.held.remove(reservation);
            }
            let hold = if claim.proxy {
                let at = SocketAddrV4::new(reservation.addr, reservation.port);
                proxy.listen(at).map(|_listener| Hold::Proxy { _listener })
            } else {
                bind(reservation).map(|_bound| Hold::Socket { _bound })
            };
            match hold {
                Ok(hold) => {
                    if self.refused.contains_key(reservation) {
                        info!(port = %reservation, service = %claim.service, "published port now held");
                    }
                    let held = Held {
                        service: claim.service.clone(),
                        hooks: claim.hooks.clone(),
                        hold,
                    };
                    self.held.insert(*reservation, held);
                }
                Err(err) => {
                    let why = format!(
                        "port {reservation} on node {} ({}) cannot be held for service {}: {err}; free it on that node (`ss -tulpn` shows who has it) or publish another port",
                        node.id, node.address, claim.service
                    );
                    refused.insert(*reservation, (claim.service.clone(), why));
                }
            }
        }
        for (reservation, (service, why)) in &refused {
            if self.refused.get(reservation).map(|(_, w)| w) != Some(why) {
                error!(port = %reservation, %service, "{why}");
            }
        }
        self.refused = refused;
    }

    async fn install(&mut self, hook: &Hook) -> anyhow::Result<()> {
        let dir = hook.direction;
        if !self.qdiscs.contains(&hook.dev) && !has_clsact(&hook.dev).await? {
            host::tc(&["qdisc", "add", "dev", &hook.dev, "clsact"]).await?;
            self.qdiscs.insert(hook.dev.clone());
        }
        let range = match hook.action {
            Action::Pass => PASS,
            Action::Steer { .. } => STEER,
        };
        let used: BTreeSet<u16> = self
            .installed
            .iter()
            .filter(|(h, _)| h.dev == hook.dev && h.direction == dir)
            .map(|(_, i)| i.pref)
            .collect();
        let pref = range
            .clone()
            .find(|p| !used.contains(p))
            .with_context(|| format!("no free tc pref on {} {}", hook.dev, dir.as_str()))?;
        let tap = hook.tap().and_then(ifindex);
        let pref_text = pref.to_string();
        let mut args = vec![
            "filter",
            "add",
            "dev",
            &hook.dev,
            dir.as_str(),
            "pref",
            &pref_text,
        ];
        let selector = hook.tc_args();
        args.extend(selector.iter().map(String::as_str));
        host::tc(&args).await?;
        info!(%hook, pref, "mesh hook installed");
        self.installed.insert(hook.clone(), Installed { pref, tap });
        Ok(())
    }

    /// Removes `hook`; one whose device is gone went with it.
    async fn remove(&mut self, hook: &Hook) {
        let Some(installed) = self.installed.get(hook) else {
            return;
        };
        match delete(&hook.dev, hook.direction, installed.pref).await {
            Ok(()) => info!(%hook, "mesh hook removed"),
            Err(_) if !host::link_exists(&hook.dev) => {}
            Err(err) => {
                warn!(%hook, err = %format!("{err:#}"), "mesh hook not removed; retrying");
                return;
            }
        }
        self.installed.remove(hook);
    }

    /// Removes the `clsact` qdiscs this run added where none of our hooks is left and no
    /// filter of anyone else is on them.
    async fn remove_unused_qdiscs(&mut self) {
        let unused: Vec<String> = self
            .qdiscs
            .iter()
            .filter(|dev| !self.installed.keys().any(|h| h.dev == **dev))
            .cloned()
            .collect();
        for dev in unused {
            if !host::link_exists(&dev) {
                self.qdiscs.remove(&dev);
                continue;
            }
            let empty = async {
                let ingress = prefs(&dev, Direction::Ingress).await?;
                let egress = prefs(&dev, Direction::Egress).await?;
                anyhow::Ok(ingress.is_empty() && egress.is_empty())
            };
            match empty.await {
                Ok(true) => match host::tc(&["qdisc", "del", "dev", &dev, "clsact"]).await {
                    Ok(_) => {
                        self.qdiscs.remove(&dev);
                    }
                    Err(err) => warn!(%dev, err = %format!("{err:#}"), "clsact not removed"),
                },
                // Someone else's filters use it now: it is theirs to remove.
                Ok(false) => {
                    self.qdiscs.remove(&dev);
                }
                Err(err) => warn!(%dev, err = %format!("{err:#}"), "clsact not removed"),
            }
        }
    }
}

/// A socket bound on the reserved port: TCP bound but not listening (so it accepts nothing),
/// UDP bound. Without `SO_REUSEADDR`, so that no other socket can bind the port next to it.
fn bind(r: &Reservation) -> std::io::Result<Socket> {
    let socket = match r.protocol {
        PublishProtocol::Tcp => Socket::new(Domain::IPV4, Type::STREAM, None)?,
        PublishProtocol::Udp => Socket::new(Domain::IPV4, Type::DGRAM, None)?,
    };
    socket.bind(&SocketAddrV4::new(r.addr, r.port).into())?;
    Ok(socket)
}

fn port_status(r: &Reservation, service: &str, error: Option<String>) -> api::PublishedPort {
    api::PublishedPort {
        port: r.port,
        protocol: r.protocol,
        addr: (!r.addr.is_unspecified()).then_some(r.addr),
        service: service.to_string(),
        error,
    }
}

/// The `pref`s of the filters on `dev` at `direction` (none when it has no `clsact`).
async fn prefs(dev: &str, direction: Direction) -> anyhow::Result<BTreeSet<u16>> {
    let json = host::tc(&["-j", "filter", "show", "dev", dev, direction.as_str()]).await?;
    let filters: serde_json::Value =
        serde_json::from_str(if json.trim().is_empty() { "[]" } else { &json })
            .context("parsing `tc -j filter show`")?;
    Ok(filters
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| u16::try_from(f["pref"].as_u64()?).ok())
        .collect())
}

async fn delete(dev: &str, direction: Direction, pref: u16) -> anyhow::Result<()> {
    let pref = pref.to_string();
    host::tc(&[
        "filter",
        "del",
        "dev",
        dev,
        direction.as_str(),
        "pref",
        &pref,
    ])
    .await
    .map(drop)
}

async fn has_clsact(dev: &str) -> anyhow::Result<bool> {
    let json = host::tc(&["-j", "qdisc", "show", "dev", dev]).await?;
    let qdiscs: serde_json::Value =
        serde_json::from_str(&json).context("parsing `tc -j qdisc show`")?;
    Ok(qdiscs
        .as_array()
        .into_iter()
        .flatten()
        .any(|q| q["kind"] == "clsact"))
}

/// The networks' bridges present in this namespace (a killed run leaves them).
fn bridges() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("ovbr-"))
        .collect()
}

fn ifindex(dev: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{dev}/ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}
