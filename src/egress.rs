//! Egress: a container reaches addresses outside its overlay through its own node, source-NATed
//! to the node's address, as Swarm's `docker_gwbridge` and its masquerade give a task a way out.
//! A network created `--internal` gets none.
//!
//! The kernel does this, not the data plane. A container's default route is its network's
//! gateway, the address of the bridge `ovbr-<vni>` on its own node, so a packet for anything
//! outside the subnet enters this node's IP stack from the bridge, is forwarded like any routed
//! packet and leaves through whatever interface routes to its destination. nftables rewrites
//! its source there. Every rule lives in one table of ours, `ip overlayd`, so cleaning up is
//! deleting that table and never touches anyone else's. Per network, each rule carrying the
//! network's bridge name as its comment:
//! - forward: only replies enter the bridge from another interface. Turning forwarding on must
//!   not let containers of another network on this node, or an underlay host that routes the
//!   subnet to this node, reach the network's containers around overlayd.
//! - postrouting (not internal): packets from the subnet leaving through any other interface
//!   are masqueraded to the address of that interface, the node's own.
//! - forward (internal): nothing from the bridge leaves through another interface.
//!
//! One more rule, for every network: nothing from any bridge reaches a member's VTEP or peer
//! port (the set `cluster`, kept by the reconcile loop). Masqueraded, a container's packets
//! come from its node's address, which the other members trust in places: VXLAN is accepted by
//! the sender's address, so a container could put frames on any network as its node, and the
//! peer port admits few handshakes per address, so a container could crowd its node out.
//!
//! Traffic between the subnet and the node itself (the gateway, DNS on it, the node's other
//! addresses) is input and output, not forwarding, and no rule touches it. Frames bridged
//! between a container and the TAP pass these hooks too when `bridge-nf-call-iptables` is on
//! (the default wherever `br_netfilter` is loaded), but they enter and leave through the same
//! bridge, which no rule matches. The routing mesh's packets are redirected at tc before
//! netfilter sees them.
//!
//! What `nft` is told is built by pure functions ([`rules`], [`add_script`], [`tagged`]); the
//! `async` functions run it, like [`crate::host`] runs iproute2.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use anyhow::Context;
use tracing::{info, warn};

use crate::cluster::Member;
use crate::host;
use crate::model::{BRIDGE_PREFIX, EGRESS_PORTS, Network};

/// The table that holds every rule overlayd makes: family and name as `nft` spells them.
const TABLE: &str = "ip overlayd";

/// The Debian package with `nft`, named when it is missing.
const PACKAGE: &str = "nftables";

/// Per-namespace switch of IPv4 forwarding (see [`ensure_forwarding`]).
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// A base chain of [`TABLE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chain {
    Forward,
    Postrouting,
}

impl Chain {
    fn name(self) -> &'static str {
        match self {
            Chain::Forward => "forward",
            Chain::Postrouting => "postrouting",
        }
    }
}

/// A member's port that containers must not reach (see the module docs), as `nft` matches it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemberPort {
    pub addr: Ipv4Addr,
    /// `udp` or `tcp`.
    pub protocol: &'static str,
    pub port: u16,
}

/// The VTEPs (UDP) and gossip and peer ports (UDP and TCP) of `members`, down ones included:
/// a member that comes back trusts the same addresses.
pub fn member_ports(members: &[Member]) -> BTreeSet<MemberPort> {
    let mut ports = BTreeSet::new();
    for m in members {
        if let Some(vtep) = m.node.vtep {
            ports.insert(MemberPort {
                addr: *vtep.ip(),
                protocol: "udp",
                port: vtep.port(),
            });
        }
        if let std::net::SocketAddr::V4(gossip) = m.gossip {
            for protocol in ["udp", "tcp"] {
                ports.insert(MemberPort {
                    addr: *gossip.ip(),
                    protocol,
                    port: gossip.port(),
                });
            }
        }
    }
    ports
}

/// An nft transaction that makes the set `cluster` hold exactly `ports`.
fn member_ports_script(ports: &BTreeSet<MemberPort>) -> String {
    let mut script = format!("flush set {TABLE} cluster\n");
    if !ports.is_empty() {
        let elements: Vec<String> = ports
            .iter()
            .map(|p| format!("{} . {} . {}", p.addr, p.protocol, p.port))
            .collect();
        let _ = writeln!(
            script,
            "add element {TABLE} cluster {{ {} }}",
            elements.join(", ")
        );
    }
    script
}

/// A rule of [`TABLE`] as `nft -a` numbers it, for deleting it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Handle {
    chain: String,
    handle: u64,
}

/// The comment on every rule of `net`: its bridge, unique on a node, so a network re-made with
/// the same VNI finds (and replaces) whatever rules its bridge had.
fn tag(net: &Network) -> String {
    net.bridge_name()
}

/// An nft transaction that leaves [`TABLE`] holding its two base chains, an empty set
/// `cluster` and the one rule that keeps bridges from it, whether or not the table existed:
/// declaring a table is a no-op when it exists, so it can always be deleted.
fn reset_script() -> String {
    format!(
        "table {TABLE}\n\
         delete table {TABLE}\n\
         table {TABLE} {{\n\
         \tset cluster {{ type ipv4_addr . inet_proto . inet_service; }}\n\
         \tchain {} {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{BRIDGE_PREFIX}*\" ip daddr . meta l4proto . th dport @cluster counter drop comment \"cluster ports\"\n\
         \t}}\n\
         \tchain {} {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         }}\n",
        Chain::Forward.name(),
        Chain::Postrouting.name(),
    )
}

/// An nft transaction that deletes [`TABLE`] if it exists.
fn delete_script() -> String {
    format!("table {TABLE}\ndelete table {TABLE}\n")
}

/// `net`'s rules, in the order they are added (see the module docs for what each is for).
fn rules(net: &Network) -> Vec<(Chain, String)> {
    let br = net.bridge_name();
    let tag = tag(net);
    let subnet = format!("{}/{}", net.subnet.network(), net.subnet.prefix());
    let mut rules = vec![(
        Chain::Forward,
        format!(
            "oifname \"{br}\" iifname != \"{br}\" ct state != {{ established, related }} counter drop comment \"{tag}\""
        ),
    )];
    if net.internal {
        rules.push((
            Chain::Forward,
            format!("iifname \"{br}\" oifname != \"{br}\" counter drop comment \"{tag}\""),
        ));
    } else {
        // TCP and UDP to the egress ports (nft maps ports only after a transport match), the
        // rest (ICMP) as it comes.
        let leaving = format!("ip saddr {subnet} oifname != \"{br}\"");
        rules.push((
            Chain::Postrouting,
            format!(
                "{leaving} meta l4proto {{ tcp, udp }} counter masquerade to :{}-{} comment \"{tag}\"",
                EGRESS_PORTS.start(),
                EGRESS_PORTS.end()
            ),
        ));
        rules.push((
            Chain::Postrouting,
            format!("{leaving} counter masquerade comment \"{tag}\""),
        ));
    }
    rules
}

/// One nft transaction that deletes the rules `stale` and adds `net`'s: applied whole or not
/// at all, so a network never has half its rules, nor its old ones next to its new ones.
fn add_script(net: &Network, stale: &[Handle]) -> String {
    let mut script = delete_rules_script(stale);
    for (chain, rule) in rules(net) {
        let _ = writeln!(script, "add rule {TABLE} {} {rule}", chain.name());
    }
    script
}

fn delete_rules_script(rules: &[Handle]) -> String {
    let mut script = String::new();
    for Handle { chain, handle } in rules {
        let _ = writeln!(script, "delete rule {TABLE} {chain} handle {handle}");
    }
    script
}

/// The rules commented `tag` in `listing`, the output of `nft -j -a list table ip overlayd`.
fn tagged(listing: &str, tag: &str) -> anyhow::Result<Vec<Handle>> {
    let listing: serde_json::Value =
        serde_json::from_str(listing).context("parsing `nft -j -a list table`")?;
    let items = listing["nftables"]
        .as_array()
        .context("`nft -j` printed no \"nftables\" list")?;
    Ok(items
        .iter()
        .filter_map(|item| item.get("rule"))
        .filter(|rule| rule["comment"].as_str() == Some(tag))
        .filter_map(|rule| {
            Some(Handle {
                chain: rule["chain"].as_str()?.to_string(),
                handle: rule["handle"].as_u64()?,
            })
        })
        .collect())
}

async fn nft(args: &[&str]) -> anyhow::Result<String> {
    host::run_tool("nft", PACKAGE, args).await
}

/// Makes [`TABLE`] hold no network's rule and no member, replacing what a run that could not
/// clean up (killed) left. Run at start, before any network: it also proves that `nft` is
/// installed and works.
pub async fn reset() -> anyhow::Result<()> {
    nft(&[&reset_script()])
        .await
        .context("setting up nftables table `ip overlayd` for egress")
        .map(drop)
}

/// Puts `net`'s rules in place of any its bridge had, and turns IPv4 forwarding on unless the
/// network is internal. Rules first: forwarding never runs without their guard. On error the
/// network has no rules.
pub async fn add(net: &Network) -> anyhow::Result<()> {
    let stale = rules_of(net).await?;
    nft(&[&add_script(net, &stale)])
        .await
        .with_context(|| format!("adding the egress rules of network {}", net.name))?;
    if !net.internal
        && let Err(err) = ensure_forwarding().await
    {
        remove(net).await;
        return Err(err);
    }
    Ok(())
}

/// Removes `net`'s rules; logs rather than fails, since it only ever cleans up.
pub async fn remove(net: &Network) {
    let removed = async {
        let rules = rules_of(net).await?;
        if !rules.is_empty() {
            nft(&[&delete_rules_script(&rules)]).await?;
        }
        anyhow::Ok(())
    };
    if let Err(err) = removed.await {
        warn!(network = %net.name, err = %format!("{err:#}"), "could not remove egress rules");
    }
}

/// Makes the set `cluster` hold exactly `ports` (see [`member_ports`]).
pub async fn guard_member_ports(ports: &BTreeSet<MemberPort>) -> anyhow::Result<()> {
    nft(&[&member_ports_script(ports)])
        .await
        .context("updating the members' ports that containers may not reach")
        .map(drop)
}

/// Deletes [`TABLE`] and every rule in it; logs rather than fails (it runs at stop).
pub async fn clear() {
    if let Err(err) = nft(&[&delete_script()]).await {
        warn!(err = %format!("{err:#}"), "could not delete nftables table `ip overlayd`");
    }
}

async fn rules_of(net: &Network) -> anyhow::Result<Vec<Handle>> {
    let mut args = vec!["-j", "-a", "list", "table"];
    args.extend(TABLE.split(' '));
    let listing = nft(&args).await?;
    tagged(&listing, &tag(net))
}

/// Turns IPv4 forwarding on in this network namespace unless it is on (a fresh namespace
/// inherits the host's setting, which may be off). Forwarding is decided by the interface a
/// packet comes in on: the bridge for a container's packets, but for the replies whichever
/// interface routes to the outside host, so it is turned on for all of them, as Docker does.
/// It stays on when the daemon stops: other software may rely on it by then.
///
/// `rp_filter` is left as it is: strict mode passes both directions, since a container's
/// address is on its bridge's connected subnet and a reply comes in through the interface
/// that routes back to its sender (its destination is rewritten before the check).
async fn ensure_forwarding() -> anyhow::Result<()> {
    let now = tokio::fs::read_to_string(IP_FORWARD)
        .await
        .with_context(|| format!("reading {IP_FORWARD}"))?;
    if now.trim() == "1" {
        return Ok(());
    }
    tokio::fs::write(IP_FORWARD, "1")
        .await
        .with_context(|| format!("turning IPv4 forwarding on ({IP_FORWARD}) for egress"))?;
    info!("IPv4 forwarding turned on in this network namespace, for egress");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(vni: u32, subnet: &str, internal: bool) -> Network {
        Network {
            id: format!("id{vni}"),
            name: format!("net{vni}"),
            subnet: subnet.parse().unwrap(),
            vni,
            mtu: 1450,
            vteps: vec![],
            internal,
            encrypted: false,
            key_epoch: 0,
        }
    }

    #[test]
    fn a_network_masquerades_its_subnet_leaving_through_any_other_interface() {
        let rules = rules(&net(4096, "198.19.1.0/24", false));
        assert_eq!(
            rules,
            vec![
                (
                    Chain::Forward,
                    "oifname \"ovbr-4096\" iifname != \"ovbr-4096\" ct state != { established, related } counter drop comment \"ovbr-4096\"".to_string()
                ),
                (
                    Chain::Postrouting,
                    "ip saddr 198.19.1.0/24 oifname != \"ovbr-4096\" meta l4proto { tcp, udp } counter masquerade to :61000-65535 comment \"ovbr-4096\"".to_string()
                ),
                (
                    Chain::Postrouting,
                    "ip saddr 198.19.1.0/24 oifname != \"ovbr-4096\" counter masquerade comment \"ovbr-4096\"".to_string()
                ),
            ]
        );
    }

    #[test]
    fn an_internal_network_drops_what_leaves_and_masquerades_nothing() {
        let rules = rules(&net(4097, "198.19.2.0/24", true));
        assert!(rules.iter().all(|(chain, _)| *chain == Chain::Forward));
        assert!(!rules.iter().any(|(_, r)| r.contains("masquerade")));
        assert!(rules.iter().any(|(_, r)| {
            r.starts_with("iifname \"ovbr-4097\" oifname != \"ovbr-4097\" counter drop")
        }));
    }

    #[test]
    fn every_rule_names_its_bridge_and_carries_its_tag() {
        for internal in [false, true] {
            let n = net(5000, "198.19.3.0/24", internal);
            for (_, rule) in rules(&n) {
                assert!(rule.contains("\"ovbr-5000\""), "{rule}");
                assert!(rule.ends_with(" comment \"ovbr-5000\""), "{rule}");
            }
        }
    }

    #[test]
    fn the_subnet_is_written_in_canonical_form() {
        let (_, rule) = rules(&net(4096, "198.19.1.7/24", false)).remove(1);
        assert!(rule.starts_with("ip saddr 198.19.1.0/24 "), "{rule}");
    }

    #[test]
    fn adding_replaces_the_stale_rules_in_the_same_transaction() {
        let stale = [
            Handle {
                chain: "forward".into(),
                handle: 7,
            },
            Handle {
                chain: "postrouting".into(),
                handle: 9,
            },
        ];
        let script = add_script(&net(4096, "198.19.1.0/24", false), &stale);
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(lines.len(), 5, "{script}");
        assert_eq!(lines[0], "delete rule ip overlayd forward handle 7");
        assert_eq!(lines[1], "delete rule ip overlayd postrouting handle 9");
        assert!(lines[2].starts_with("add rule ip overlayd forward oifname \"ovbr-4096\""));
        assert!(lines[3].starts_with("add rule ip overlayd postrouting ip saddr 198.19.1.0/24"));
        assert!(lines[4].starts_with("add rule ip overlayd postrouting ip saddr 198.19.1.0/24"));
    }

    #[test]
    fn reset_and_delete_work_whether_or_not_the_table_exists() {
        let reset = reset_script();
        assert!(reset.starts_with("table ip overlayd\ndelete table ip overlayd\n"));
        assert!(reset.contains("type filter hook forward priority filter; policy accept;"));
        assert!(reset.contains(
            "iifname \"ovbr-*\" ip daddr . meta l4proto . th dport @cluster counter drop"
        ));
        assert!(reset.contains("type nat hook postrouting priority srcnat; policy accept;"));
        assert_eq!(
            delete_script(),
            "table ip overlayd\ndelete table ip overlayd\n"
        );
    }

    fn member(addr: &str, vtep_port: Option<u16>, gossip_port: u16) -> Member {
        let ip: Ipv4Addr = addr.parse().unwrap();
        Member {
            node: crate::model::Node {
                id: addr.into(),
                address: ip,
                vtep: vtep_port.map(|p| std::net::SocketAddrV4::new(ip, p)),
                state: crate::model::NodeState::Down,
                is_self: false,
                raft: None,
            },
            gossip: (ip, gossip_port).into(),
            realised: BTreeSet::new(),
            drained: BTreeSet::new(),
            raft: None,
        }
    }

    #[test]
    fn containers_are_kept_from_every_members_vtep_and_peer_ports() {
        let members = [
            member("198.18.0.1", Some(4789), 7946),
            member("198.18.0.2", Some(4790), 7947),
            member("198.18.0.3", None, 7946),
        ];
        let ports = member_ports(&members);
        let script = member_ports_script(&ports);
        assert_eq!(
            script,
            "flush set ip overlayd cluster\n\
             add element ip overlayd cluster { \
             198.18.0.1 . tcp . 7946, 198.18.0.1 . udp . 4789, 198.18.0.1 . udp . 7946, \
             198.18.0.2 . tcp . 7947, 198.18.0.2 . udp . 4790, 198.18.0.2 . udp . 7947, \
             198.18.0.3 . tcp . 7946, 198.18.0.3 . udp . 7946 }\n"
        );
        assert_eq!(
            member_ports_script(&BTreeSet::new()),
            "flush set ip overlayd cluster\n",
            "no members, an empty set (nft refuses an empty element list)"
        );
    }

    /// Trimmed from `nft -j -a list table ip overlayd` (nftables 1.0.6).
    const LISTING: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "ip", "name": "overlayd", "handle": 1}},
        {"chain": {"family": "ip", "table": "overlayd", "name": "forward", "handle": 1}},
        {"rule": {"family": "ip", "table": "overlayd", "chain": "forward", "handle": 5, "comment": "ovbr-4096", "expr": []}},
        {"rule": {"family": "ip", "table": "overlayd", "chain": "forward", "handle": 6, "comment": "ovbr-40960", "expr": []}},
        {"rule": {"family": "ip", "table": "overlayd", "chain": "forward", "handle": 8, "expr": []}},
        {"rule": {"family": "ip", "table": "overlayd", "chain": "postrouting", "handle": 3, "comment": "ovbr-4096", "expr": []}}]}"#;

    #[test]
    fn only_the_rules_with_exactly_the_tag_are_found() {
        let found = tagged(LISTING, "ovbr-4096").unwrap();
        assert_eq!(
            found,
            vec![
                Handle {
                    chain: "forward".into(),
                    handle: 5
                },
                Handle {
                    chain: "postrouting".into(),
                    handle: 3
                },
            ]
        );
        assert!(tagged(LISTING, "ovbr-4097").unwrap().is_empty());
        assert!(tagged("not json", "ovbr-4096").is_err());
        assert!(tagged("{}", "ovbr-4096").is_err());
    }
}
