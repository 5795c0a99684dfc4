//! The node's own network configuration, made with iproute2: bridges, veth pairs, container
//! interfaces. Only `attach`, `detach` and network changes come here, never the packet path.
//!
//! iproute2 rather than a netlink crate: its error messages are the ones operators know, and the
//! test hosts need it anyway.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::Command;
use tracing::warn;

use crate::model::Network;

/// Longest one command of a host tool may take; it is killed after that. It bounds a hung
/// tool, not a slow one: the kernel takes link changes one at a time for all namespaces (the
/// RTNL lock), and with 100 containers attached at once on two cores, `ip link` commands that
/// take milliseconds alone took over 10 s (6 of 100 attaches failed on that in one run).
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the iproute2 tool `tool` (`ip`, `bridge`, `tc`) with ARGS (see [`run_tool`]).
async fn iproute2(tool: &str, args: &[&str]) -> anyhow::Result<String> {
    run_tool(tool, "iproute2", args).await
}

/// Runs the host tool `tool` with ARGS, returning stdout, or an error that carries the tool's
/// own complaint. `package` is the Debian package that has the tool, named in the error when
/// the tool is not installed.
pub async fn run_tool(tool: &str, package: &str, args: &[&str]) -> anyhow::Result<String> {
    let run = Command::new(tool).args(args).kill_on_drop(true).output();
    let out = match tokio::time::timeout(TOOL_TIMEOUT, run).await {
        Err(_) => bail!(
            "`{tool} {}` did not finish within {TOOL_TIMEOUT:?}",
            args.join(" ")
        ),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "`{tool}` is not installed: install the {package} package (`apt-get install {package}`)"
        ),
        Ok(run) => run.with_context(|| format!("running `{tool}`"))?,
    };
    if !out.status.success() {
        bail!(
            "`{tool} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn ip(args: &[&str]) -> anyhow::Result<String> {
    iproute2("ip", args).await
}

/// `ip -j addr show`: every link with its addresses.
async fn links_with_addresses() -> anyhow::Result<Vec<serde_json::Value>> {
    let json = ip(&["-j", "addr", "show"]).await?;
    serde_json::from_str(&json).context("parsing `ip -j addr show`")
}

/// The IPv4 addresses of `link` (an entry of [`links_with_addresses`]).
fn ipv4_addresses(link: &serde_json::Value) -> impl Iterator<Item = Ipv4Addr> + '_ {
    link["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["local"].as_str()?.parse().ok())
}

/// The interface that holds `addr`, the node's underlay address: its name and MTU.
pub async fn underlay(addr: Ipv4Addr) -> anyhow::Result<(String, u32)> {
    links_with_addresses()
        .await?
        .iter()
        .find(|link| ipv4_addresses(link).any(|a| a == addr))
        .and_then(|link| Some((link["ifname"].as_str()?.to_string(), link["mtu"].as_u64()? as u32)))
        .with_context(|| format!("no interface in this network namespace holds {addr}: pass an --advertise-addr this node owns"))
}

/// This network namespace's IPv4 addresses and the interface holding each.
pub async fn addresses() -> anyhow::Result<BTreeMap<Ipv4Addr, String>> {
    let mut found = BTreeMap::new();
    for link in links_with_addresses().await? {
        if let Some(name) = link["ifname"].as_str() {
            found.extend(ipv4_addresses(&link).map(|a| (a, name.to_string())));
        }
    }
    Ok(found)
}

/// The names of this network namespace's links.
pub async fn link_names() -> anyhow::Result<Vec<String>> {
    let links = links_with_addresses().await?;
    Ok(links
        .iter()
        .filter_map(|l| Some(l["ifname"].as_str()?.to_string()))
        .collect())
}

/// Runs `tc ARGS`, returning stdout.
pub async fn tc(args: &[&str]) -> anyhow::Result<String> {
    iproute2("tc", args).await
}

/// Whether `name` is a namespace `ip netns add` made (a plain name under /run/netns).
pub fn netns_exists(name: &str) -> bool {
    !matches!(name, "" | "." | "..")
        && !name.contains('/')
        && Path::new("/run/netns").join(name).exists()
}

/// Whether process `pid` lives in another network namespace than this process (false if it
/// cannot be told).
pub fn other_netns(pid: u32) -> bool {
    let ours = std::fs::read_link("/proc/self/ns/net");
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net"));
    matches!((ours, theirs), (Ok(a), Ok(b)) if a != b)
}

/// Whether this network namespace has a link called `name`.
pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Creates the network's bridge (anycast gateway address and MAC) unless it exists; returns
/// whether it made it.
pub async fn ensure_bridge(net: &Network) -> anyhow::Result<bool> {
    let br = net.bridge_name();
    if link_exists(&br) {
        return Ok(false);
    }
    ip(&["link", "add", &br, "type", "bridge"]).await?;
    let mac = mac_string(net.gateway_mac());
    let mtu = net.mtu.to_string();
    let gw = format!("{}/{}", net.gateway(), net.subnet.prefix());
    let configured = async {
        ip(&["link", "set", &br, "address", &mac, "mtu", &mtu]).await?;
        // The same gateway MAC on every node would make IPv6 DAD fail across the overlay.
        tokio::fs::write(format!("/proc/sys/net/ipv6/conf/{br}/disable_ipv6"), "1")
            .await
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .with_context(|| format!("disabling IPv6 on {br}"))?;
        ip(&["addr", "add", &gw, "dev", &br]).await?;
        ip(&["link", "set", &br, "up"]).await.map(drop)
    };
    if let Err(err) = configured.await {
        remove_link(&br).await;
        return Err(err.context(format!("configuring bridge {br}")));
    }
    Ok(true)
}

/// Puts the data plane's TAP on the network's bridge, with the network's MTU, and brings it up.
///
/// The bridge learns nothing on it (see [`join_bridge`]), so it floods unicast to any MAC that
/// is not a local container's here, and overlayd switches it.
pub async fn enslave(link: &str, net: &Network) -> anyhow::Result<()> {
    join_bridge(link, net, Port::Tap).await?;
    ip(&["link", "set", link, "up"]).await.map(drop)
}

/// A container's host-side veth and the only addresses the container may send from.
pub struct ContainerPort<'a> {
    pub host_if: &'a str,
    pub mac: overlay::Mac,
    pub ip: Ipv4Addr,
}

/// Puts a container's host-side veth on the network's bridge so that the container can neither
/// send as another nor take another's place in the bridge's table, and brings it up.
///
/// - Before the port is up, [`overlay::port_filter`]'s program goes on its ingress (tc clsact,
///   direct action): frames with another source MAC, ARP, IPv4 or IPv6 source are dropped
///   before the bridge sees them (`tc -s qdisc show dev HOST_IF` counts them).
/// - The bridge learns nothing on the port; a static entry puts the container's MAC there.
/// - Unknown unicast is not flooded to it: only the TAP gets that.
/// - The port is isolated: it exchanges frames with the TAP (and the bridge's own address, the
///   gateway) only, never directly with another container. So overlayd sees same-node traffic
///   too, and with it both directions of a same-node flow to a service.
///
/// Idempotent, so after a restart it puts back whatever is missing.
pub async fn enslave_container(port: &ContainerPort<'_>, net: &Network) -> anyhow::Result<()> {
    let dev = port.host_if;
    let program = overlay::port_filter::program(port.mac, port.ip);
    let bytecode = overlay::port_filter::tc_bytecode(&program);
    tc(&["qdisc", "replace", "dev", dev, "clsact"]).await?;
    tc(&[
        "filter", "replace", "dev", dev, "ingress", "prio", "1", "handle", "1", "bpf", "da",
        "bytecode", &bytecode,
    ])
    .await?;
    join_bridge(dev, net, Port::Container).await?;
    let mac = port.mac.to_string();
    iproute2(
        "bridge",
        &["fdb", "replace", &mac, "dev", dev, "master", "static"],
    )
    .await?;
    ip(&["link", "set", dev, "up"]).await.map(drop)
}

/// What a bridge port is for.
#[derive(Clone, Copy)]
enum Port {
    /// The data plane's TAP: gets unicast to MACs the bridge has no entry for.
    Tap,
    /// A container: gets no unknown unicast, and reaches only the TAP (isolated).
    Container,
}

/// Makes `link` a port of the network's bridge with the network's MTU, learning off: the bridge
/// knows local containers from their static entries and learns nothing from frames, so no frame
/// can move a container's MAC to another port, and no flood of source MACs can fill it.
async fn join_bridge(link: &str, net: &Network, port: Port) -> anyhow::Result<()> {
    let mtu = net.mtu.to_string();
    ip(&[
        "link",
        "set",
        link,
        "master",
        &net.bridge_name(),
        "mtu",
        &mtu,
    ])
    .await?;
    let (flood, isolated) = match port {
        Port::Tap => ("on", "off"),
        Port::Container => ("off", "on"),
    };
    ip(&[
        "link",
        "set",
        link,
        "type",
        "bridge_slave",
        "learning",
        "off",
        "flood",
        flood,
        "isolated",
        isolated,
    ])
    .await
    .map(drop)
}

/// Deletes a link; logs rather than fails, since it only ever cleans up.
pub async fn remove_link(name: &str) {
    if let Err(err) = ip(&["link", "del", name]).await {
        warn!(link = name, %err, "could not remove link");
    }
}

pub fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What `plug` needs to give a container its interface on `net`.
pub struct Plug<'a> {
    pub net: &'a Network,
    pub host_if: &'a str,
    pub ip: Ipv4Addr,
    pub mac: &'a str,
}

/// Where the container end of a veth pair goes.
pub enum Target<'a> {
    /// Into namespace `ip netns` calls `netns`, as `ifname` (checked:
    /// [`crate::model::check_ifname`], and not used in the namespace) or else its first free
    /// `ethN`, with the address and (if it has none yet) a default route via the gateway.
    Netns {
        netns: &'a str,
        ifname: Option<&'a str>,
    },
    /// To a runtime that moves it into the container and configures it there (Docker). It
    /// goes to the network namespace of process `pid`, the runtime's, if given; else it stays
    /// in this one.
    Runtime { pid: Option<u32> },
}

/// What `plug` made for the container.
pub struct Plugged {
    /// The container end's name: in the container, or where the runtime finds it.
    pub ifname: String,
    /// Whether it added the default route via the gateway (the container had none).
    pub default_route: bool,
}

/// Creates a veth pair whose container end has the container's MAC and the network's MTU,
/// hands that end to `target`, and puts the other end on the bridge, held to those addresses
/// ([`enslave_container`]). On any failure the pair is deleted again: nothing is left half-made.
pub async fn plug(p: &Plug<'_>, target: &Target<'_>) -> anyhow::Result<Plugged> {
    let peer = format!("{}c", p.host_if);
    ip(&[
        "link", "add", p.host_if, "type", "veth", "peer", "name", &peer,
    ])
    .await?;
    let result = async {
        let mtu = p.net.mtu.to_string();
        // Super-frames no larger than one UDP_SEGMENT send: one send and one TAP write each.
        let segs = overlay::udp::segments_per_send(p.net.mtu).to_string();
        ip(&[
            "link",
            "set",
            &peer,
            "address",
            p.mac,
            "mtu",
            &mtu,
            "gso_max_segs",
            &segs,
        ])
        .await?;
        let plugged = match *target {
            Target::Netns { netns, ifname } => into_netns(p, &peer, netns, ifname).await?,
            Target::Runtime { pid } => {
                if let Some(pid) = pid {
                    ip(&["link", "set", &peer, "netns", &pid.to_string()]).await?;
                }
                Plugged {
                    ifname: peer.clone(),
                    default_route: false,
                }
            }
        };
        let mac = p
            .mac
            .parse()
            .with_context(|| format!("container MAC {}", p.mac))?;
        let port = ContainerPort {
            host_if: p.host_if,
            mac,
            ip: p.ip,
        };
        enslave_container(&port, p.net).await?;
        Ok::<_, anyhow::Error>(plugged)
    }
    .await;
    if result.is_err() {
        remove_link(p.host_if).await;
    }
    result.with_context(|| format!("plugging {} into network {}", p.ip, p.net.name))
}

/// Moves `peer` into `netns` as `ifname` (or its first free `ethN`) and configures it there.
async fn into_netns(
    p: &Plug<'_>,
    peer: &str,
    netns: &str,
    ifname: Option<&str>,
) -> anyhow::Result<Plugged> {
    let ifname = match ifname {
        Some(name) => name.to_string(),
        None => free_ifname(netns).await?,
    };
    let addr = format!("{}/{}", p.ip, p.net.subnet.prefix());
    ip(&["link", "set", peer, "netns", netns]).await?;
    ip(&["-n", netns, "link", "set", peer, "name", &ifname]).await?;
    ip(&["-n", netns, "addr", "add", &addr, "dev", &ifname]).await?;
    ip(&["-n", netns, "link", "set", &ifname, "up"]).await?;
    ip(&["-n", netns, "link", "set", "lo", "up"]).await?;
    let routes = ip(&["-n", netns, "route", "show", "default"]).await?;
    let default_route = routes.trim().is_empty();
    if default_route {
        let gw = p.net.gateway().to_string();
        ip(&[
            "-n", netns, "route", "add", "default", "via", &gw, "dev", &ifname,
        ])
        .await?;
    }
    Ok(Plugged {
        ifname,
        default_route,
    })
}

/// The names of the links in namespace `netns`.
pub async fn netns_links(netns: &str) -> anyhow::Result<Vec<String>> {
    let json = ip(&["-n", netns, "-j", "link", "show"]).await?;
    let links: serde_json::Value =
        serde_json::from_str(&json).context("parsing `ip -j link show`")?;
    Ok(links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| Some(l["ifname"].as_str()?.to_string()))
        .collect())
}

/// The first `ethN` not used in namespace `netns`.
async fn free_ifname(netns: &str) -> anyhow::Result<String> {
    let used = netns_links(netns).await?;
    (0..64)
        .map(|i| format!("eth{i}"))
        .find(|name| !used.contains(name))
        .context("the namespace has no free ethN name")
}

/// The first line of every resolv.conf overlayd writes: it replaces or removes only its own.
const RESOLV_CONF_MARK: &str = "# written by overlayd";

/// The resolv.conf `ip netns exec NETNS` mounts over /etc/resolv.conf for commands it runs.
fn container_resolv_conf(netns: &str) -> std::path::PathBuf {
    Path::new("/etc/netns").join(netns).join("resolv.conf")
}

/// Points container `netns` at the DNS server on `gateway`, or with `None` removes what this
/// sets. A resolv.conf overlayd did not write (the container's runtime made its own) is left as
/// it is. `netns` is a checked namespace name ([`netns_exists`]).
pub fn container_resolver(netns: &str, gateway: Option<Ipv4Addr>) -> anyhow::Result<()> {
    point_resolver(&container_resolv_conf(netns), gateway)
}

fn point_resolver(path: &Path, gateway: Option<Ipv4Addr>) -> anyhow::Result<()> {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.starts_with(RESOLV_CONF_MARK) => return Ok(()),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("reading {}", path.display()));
        }
        _ => {}
    }
    match gateway {
        Some(gateway) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let text = format!(
                "{RESOLV_CONF_MARK} for `overlayd attach`; removed by the last detach\nnameserver {gateway}\n"
            );
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
        }
        None => {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", path.display()));
                }
                _ => {}
            }
            // Only if empty: other files there are someone else's.
            if let Some(dir) = path.parent() {
                let _ = std::fs::remove_dir(dir);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_are_namespaces() {
        // "/run/netns/.." is /run, which exists on every host.
        for bad in ["", ".", "..", "../netns", "a/b"] {
            assert!(!netns_exists(bad), "{bad:?} taken for a namespace");
        }
    }

    #[test]
    fn only_overlayds_own_resolv_conf_is_replaced_or_removed() {
        let dir = std::env::temp_dir().join(format!("overlayd-resolv-{}", std::process::id()));
        let path = dir.join("c1").join("resolv.conf");
        let gw = |last| Some(Ipv4Addr::new(198, 19, 0, last));
        let read = || std::fs::read_to_string(&path).unwrap();

        point_resolver(&path, gw(1)).unwrap();
        assert!(read().ends_with("\nnameserver 198.19.0.1\n"), "{}", read());
        point_resolver(&path, gw(129)).unwrap();
        assert!(
            read().ends_with("\nnameserver 198.19.0.129\n"),
            "{}",
            read()
        );
        point_resolver(&path, None).unwrap();
        assert!(
            !path.exists() && !dir.join("c1").exists(),
            "ours removed with its dir"
        );
        point_resolver(&path, None).unwrap();

        std::fs::create_dir_all(dir.join("c1")).unwrap();
        std::fs::write(&path, "nameserver 198.18.0.53\n").unwrap();
        point_resolver(&path, gw(1)).unwrap();
        point_resolver(&path, None).unwrap();
        assert_eq!(
            read(),
            "nameserver 198.18.0.53\n",
            "the runtime's own file is kept"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
