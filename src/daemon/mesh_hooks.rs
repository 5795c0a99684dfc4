//! Makes this node's routing-mesh hooks (tc filters) and port reservations match the plan of
//! [`crate::mesh_hooks`], with `tc`, from the reconcile loop.
//!
//! Every filter overlayd adds has a `pref` in [`OURS`], one `pref` per filter, so exactly ours
//! are removed: on changes, after start (leftovers of a run that was killed or stopped with
//! SIGTERM), and when the daemon stops for good. A port's hooks go in only once its socket is
//! bound, and come out before it is closed, so the port is never steered while another process
//! could hold it.
//!
//! A leftover steers to the TAP of the run before, which is gone, so it drops what it steers.
//! It stays until this run's hooks are all in: in between, a connection to a published port
//! loses packets (TCP sends them again) but never reaches the node's stack, which would reset
//! it.
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
    /// Hooks that failed to go in or out, with the last error logged.
    failing: BTreeMap<Hook, String>,
    /// Our filters an earlier run left, by device, direction and `pref`: removed once this
    /// run's hooks are in (see the module's docs).
    leftovers: BTreeSet<(String, Direction, u16)>,
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
        match host::link_names().await {
            // A killed run leaves its networks' bridges.
            Ok(links) => devs.extend(links.into_iter().filter(|l| l.starts_with("ovbr-"))),
            Err(err) => warn!(err = %format!("{err:#}"), "could not list bridges to sweep"),
        }
        let mut leftovers = BTreeSet::new();
        for dev in devs {
            for direction in [Direction::Ingress, Direction::Egress] {
                match prefs(&dev, direction).await {
                    Ok(prefs) => leftovers.extend(
                        prefs
                            .into_iter()
                            .filter(|p| OURS.contains(p))
                            .map(|pref| (dev.clone(), direction, pref)),
                    ),
                    Err(err) => {
                        warn!(%dev, err = %format!("{err:#}"), "could not look for leftover mesh hooks")
                    }
                }
            }
        }
        MeshHooks {
            state: Mutex::new(State {
                leftovers,
                ..State::default()
            }),
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
        let taps: BTreeMap<&str, Option<u32>> = desired
            .iter()
            .filter_map(|h| h.tap())
            .map(|tap| (tap, ifindex(tap)))
            .collect();
        let stale: Vec<Hook> = state
            .installed
            .iter()
            .filter(|(hook, installed)| {
                !desired.contains(hook)
                    || hook
                        .tap()
                        .is_some_and(|tap| taps.get(tap).copied().flatten() != installed.tap)
            })
            .map(|(hook, _)| hook.clone())
            .collect();
        for hook in stale {
            state.remove(&hook).await;
        }
        for &hook in &desired {
            if !state.installed.contains_key(hook) {
                let installed = state.install(hook).await;
                state.note(hook, installed, "mesh hook not installed; retrying");
            }
        }
        if desired.iter().all(|h| state.installed.contains_key(*h)) {
            state.remove_leftovers().await;
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
        state.remove_leftovers().await;
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
        let leftover = self
            .leftovers
            .iter()
            .filter(|(dev, d, _)| *dev == hook.dev && *d == dir)
            .map(|(_, _, pref)| *pref);
        let used: BTreeSet<u16> = self
            .installed
            .iter()
            .filter(|(h, _)| h.dev == hook.dev && h.direction == dir)
            .map(|(_, i)| i.pref)
            .chain(leftover)
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

    /// Removes the filters an earlier run left; one whose device is gone went with it.
    async fn remove_leftovers(&mut self) {
        for (dev, direction, pref) in std::mem::take(&mut self.leftovers) {
            info!(%dev, direction = direction.as_str(), pref, "removing a mesh hook left by an earlier run");
            if let Err(err) = delete(&dev, direction, pref).await
                && ifindex(&dev).is_some()
            {
                warn!(err = %format!("{err:#}"), "could not remove a leftover mesh hook");
            }
        }
    }

    /// Removes `hook`; one whose device is gone went with it.
    async fn remove(&mut self, hook: &Hook) {
        let Some(installed) = self.installed.get(hook) else {
            return;
        };
        let removed = match delete(&hook.dev, hook.direction, installed.pref).await {
            Ok(()) => {
                info!(%hook, "mesh hook removed");
                Ok(())
            }
            Err(_) if ifindex(&hook.dev).is_none() => Ok(()),
            Err(err) => Err(err),
        };
        if removed.is_ok() {
            self.installed.remove(hook);
        }
        self.note(hook, removed, "mesh hook not removed; retrying");
    }

    /// Logs a failure to install or remove `hook` when it is new or its cause changed, not every
    /// round it is retried.
    fn note(&mut self, hook: &Hook, result: anyhow::Result<()>, what: &str) {
        match result {
            Ok(()) => {
                self.failing.remove(hook);
            }
            Err(err) => {
                let err = format!("{err:#}");
                if self.failing.get(hook) != Some(&err) {
                    warn!(%hook, %err, "{what}");
                    self.failing.insert(hook.clone(), err);
                }
            }
        }
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
            if ifindex(&dev).is_none() {
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

/// `dev`'s ifindex in this network namespace, asked of the kernel (SIOCGIFINDEX): `/sys` shows
/// the namespace it was mounted in, which need not be ours.
fn ifindex(dev: &str) -> Option<u32> {
    use rustix::net::{AddressFamily, SocketType, netdevice, socket};
    let probe = socket(AddressFamily::INET, SocketType::DGRAM, None).ok()?;
    netdevice::name_to_index(&probe, dev).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{TaskRef, View};
    use crate::mesh_hooks::tests::{network, publish};
    use crate::mesh_hooks::{Host, plan};
    use crate::model::{Mode, Service};
    use std::process::Command;

    const NS_TAG: &str = "meshhk";
    const TAP: &str = "ovtap-4242";

    /// Runs `tc LINE` in the calling thread's namespace; panics unless it succeeds.
    fn tc(line: &str) -> String {
        sh(&format!("tc {line}"))
    }

    fn sh(line: &str) -> String {
        let args: Vec<&str> = line.split_whitespace().collect();
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(out.status.success(), "{line}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The filters on `dev` at `dir`: (pref, the device it redirects to, if any).
    fn filters(dev: &str, dir: &str) -> Vec<(u16, Option<String>)> {
        let json: serde_json::Value =
            serde_json::from_str(&tc(&format!("-j filter show dev {dev} {dir}"))).unwrap();
        let mut found: Vec<(u16, Option<String>)> = json
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| {
                f["options"]["fh"]
                    .as_str()
                    .is_some_and(|h| !h.ends_with(':'))
            })
            .map(|f| {
                let to = f["options"]["actions"][0]["to_dev"]
                    .as_str()
                    .map(String::from);
                (f["pref"].as_u64().unwrap() as u16, to)
            })
            .collect();
        found.sort();
        found
    }

    fn has_clsact(dev: &str) -> bool {
        tc(&format!("qdisc show dev {dev}")).contains("clsact")
    }

    /// Network `net-m` (vni 4242) with service `search` (a task on this node) publishing
    /// 9200->80/tcp and 9300->53/udp.
    fn view() -> View {
        let mut view = View::default();
        let net = network("m", 4242, "198.19.42.0/24");
        view.networks.insert(net.name.clone(), net);
        let service = Service {
            name: "search".into(),
            network_id: "m".into(),
            mode: Mode::Vip,
            vip: None,
            health: None,
            publish: vec![
                publish(9200, 80, PublishProtocol::Tcp),
                publish(9300, 53, PublishProtocol::Udp),
            ],
        };
        view.services.insert(service.name.clone(), service);
        view.tasks.push(TaskRef {
            service: "search".into(),
            network_id: "m".into(),
            ip: "198.19.42.2".parse().unwrap(),
            node: "me".into(),
        });
        view
    }

    /// Needs root (CI runs it as root). In a namespace of its own: a leftover of ours is swept
    /// at start and someone else's filter is kept; the hooks of a held port appear on the
    /// underlay, `lo` and the bridge, a port held by someone else gets none and is reported; a
    /// TAP made again gets its hooks made again; an empty plan and `stop` remove every hook of
    /// ours and free the ports, and only the qdisc this run added goes.
    #[test]
    fn hooks_follow_the_plan_and_the_ports_they_steer_are_held() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(
            status.lines().any(|l| l.starts_with("Uid:\t0\t")),
            "needs root (CI runs these tests as root)"
        );
        let ns = format!("ovt-{NS_TAG}-{}-ns", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        sh(&format!("ip netns add {ns}"));
        struct Remove(String);
        impl Drop for Remove {
            fn drop(&mut self) {
                let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
            }
        }
        let _remove = Remove(ns.clone());
        for cmd in [
            "link set lo up",
            "link add eth0 type veth peer name eth1",
            "addr add 198.18.60.1/24 dev eth0",
            "link set eth0 up",
            "link set eth1 up",
            "link add ovbr-4242 type bridge",
            &format!("tuntap add {TAP} mode tap"),
        ] {
            sh(&format!("ip -n {ns} {cmd}"));
        }
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&file),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .expect("setns");
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(inside());
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        });
    }

    async fn inside() {
        // Someone else's clsact and filter on the underlay, and a leftover of ours on `lo`.
        tc("qdisc add dev eth0 clsact");
        tc(
            "filter add dev eth0 ingress pref 100 protocol ip u32 match ip dst 198.18.60.9/32 classid 1:1",
        );
        tc("qdisc add dev lo clsact");
        tc(
            "filter add dev lo egress pref 49999 protocol ip u32 match ip dst 198.18.60.9/32 classid 1:1",
        );
        tc("qdisc add dev ovbr-4242 clsact");
        tc(
            "filter add dev ovbr-4242 ingress pref 49153 protocol ip u32 match ip sport 80 0xffff classid 1:1",
        );
        let node_addr = "198.18.60.1".parse().unwrap();
        let balancer = std::sync::Arc::new(crate::services::balancer(node_addr, None).unwrap());
        let hooks = MeshHooks::start("eth0", Proxy::new(balancer, node_addr)).await;
        assert_eq!(
            filters("lo", "egress"),
            [(49999, None)],
            "a leftover stays until this run's hooks are in"
        );
        let me = Node {
            id: "me",
            address: node_addr,
        };
        hooks.apply(&Plan::default(), &me).await;
        assert_eq!(filters("lo", "egress"), [], "the leftover is swept");
        assert_eq!(filters("ovbr-4242", "ingress"), [], "on bridges too");
        assert_eq!(filters("eth0", "ingress"), [(100, None)], "not ours: kept");
        for dev in ["lo", "ovbr-4242"] {
            tc(&format!("qdisc del dev {dev} clsact"));
        }

        let view = view();
        let (addresses, realised) = (BTreeMap::new(), BTreeSet::from(["m".to_string()]));
        let host = Host {
            id: "me",
            address: "198.18.60.1".parse().unwrap(),
            underlay: "eth0",
            addresses: &addresses,
            realised: &realised,
        };
        let plan = plan(&view, &host);
        let node = Node {
            id: "me",
            address: host.address,
        };
        let taken = std::net::UdpSocket::bind("0.0.0.0:9300").unwrap();
        hooks.apply(&plan, &node).await;
        let tap = Some(TAP.to_string());
        assert_eq!(
            filters("eth0", "ingress"),
            [(100, None), (0xC010, tap.clone())]
        );
        assert_eq!(
            filters("lo", "egress"),
            [(0xC010, tap.clone())],
            "only 9200/tcp"
        );
        assert_eq!(
            filters("ovbr-4242", "ingress"),
            [(0xC000, None), (0xC010, tap.clone()), (0xC011, tap.clone())],
            "the subnet passes first, then replies from 80/tcp and 53/udp"
        );
        let err = std::net::TcpListener::bind("0.0.0.0:9200").expect_err("9200 is held");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        let status = hooks.status().await;
        assert_eq!(status.hooks, 5);
        let refused: Vec<&str> = status
            .ports
            .iter()
            .filter_map(|p| p.error.as_deref())
            .collect();
        assert_eq!(refused.len(), 1, "{:?}", status.ports);
        assert!(
            refused[0].starts_with(
                "port 9300/udp on node me (198.18.60.1) cannot be held for service search"
            ),
            "{}",
            refused[0]
        );

        // The TAP made again: the hooks that pointed at the old one follow the new one.
        sh(&format!("ip link del {TAP}"));
        sh(&format!("ip tuntap add {TAP} mode tap"));
        drop(taken);
        hooks.apply(&plan, &node).await;
        assert_eq!(
            filters("lo", "egress"),
            [(0xC010, tap.clone()), (0xC011, tap.clone())],
            "9300/udp too, now that it is free"
        );
        assert_eq!(hooks.status().await.hooks, 7);
        assert!(std::net::UdpSocket::bind("0.0.0.0:9300").is_err());

        hooks.apply(&Plan::default(), &node).await;
        assert_eq!(filters("lo", "egress"), []);
        assert_eq!(filters("eth0", "ingress"), [(100, None)]);
        assert_eq!(filters("ovbr-4242", "ingress"), []);
        assert!(!has_clsact("lo") && !has_clsact("ovbr-4242"), "ours go");
        assert!(has_clsact("eth0"), "someone else's stays");
        std::net::TcpListener::bind("0.0.0.0:9200").expect("9200 freed");
        assert!(hooks.status().await.ports.is_empty());

        hooks.apply(&plan, &node).await;
        assert_eq!(hooks.status().await.hooks, 7);
        hooks.stop().await;
        hooks.apply(&plan, &node).await;
        assert_eq!(filters("lo", "egress"), [], "nothing comes back after stop");
        assert_eq!(filters("eth0", "ingress"), [(100, None)]);
        assert_eq!(filters("ovbr-4242", "ingress"), []);
        std::net::UdpSocket::bind("0.0.0.0:9300").expect("9300 freed");
    }
}
