//! The command line: the verbs users type, and how replies are printed (tables, or `--json`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};
use ipnetwork::Ipv4Network;

use crate::api::{self, Attachment, NetworkInfo, ServiceInfo, Task};
use crate::model::{Check, Health, Mode, Node, Publish};
use crate::publish::Unpublish;

#[derive(Parser)]
#[command(
    name = "overlayd",
    version,
    about = "Overlay networks and a routing mesh for container clusters, one daemon per node"
)]
pub struct Cli {
    /// The local daemon's API socket.
    #[arg(
        long,
        global = true,
        env = "OVERLAYD_API",
        default_value = api::DEFAULT_SOCKET
    )]
    pub api: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Start the first node of a new cluster (runs in the foreground) and print its join token.
    Init(DaemonArgs),
    /// Start a node that joins the cluster through PEER, any member (runs in the foreground).
    Join {
        /// Address of any member (its --advertise-addr), optionally with the gossip port.
        peer: String,
        /// The cluster's join token (`overlayd join-token` on a member prints it).
        #[arg(long, env = "OVERLAYD_TOKEN")]
        token: String,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Restart a node from its state dir (after a crash or a reboot): same id, same cluster,
    /// rejoining through the members it last knew; its containers keep their addresses.
    Run {
        #[arg(long, default_value = "/var/lib/overlayd")]
        state_dir: PathBuf,
        #[command(flatten)]
        data_path: DataPathArgs,
        #[command(flatten)]
        plugins: PluginArgs,
        #[command(flatten)]
        observe: ObserveArgs,
    },
    /// Print the token other nodes join with.
    JoinToken {
        /// Make a new token first: the old one no longer joins; members carry on.
        #[arg(long)]
        rotate: bool,
        #[arg(long)]
        json: bool,
    },
    /// Cluster members.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Overlay networks.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Services: a VIP (or DNS name) balanced over the containers attached as its tasks.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Plug a network namespace (a container) into a network as its next ethN.
    Attach {
        /// Name of the network namespace, as `ip netns list` shows it.
        netns: String,
        #[arg(long)]
        network: String,
        /// A specific address in the network's subnet (default: the lowest free one).
        #[arg(long)]
        ip: Option<Ipv4Addr>,
        /// Make the container a task of this service (on the same network).
        #[arg(long)]
        service: Option<String>,
        /// Another name the container resolves by on this network, besides its netns name
        /// (repeatable), like a Docker network alias.
        #[arg(long = "alias", value_name = "NAME")]
        aliases: Vec<String>,
        /// The container's interface name (default: its first free ethN).
        #[arg(long, value_name = "NAME")]
        ifname: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Unplug a network namespace from a network and return its address to the pool.
    Detach {
        netns: String,
        #[arg(long)]
        network: String,
    },
    /// This node and its data-plane counters (drops by reason).
    Status {
        #[arg(long)]
        json: bool,
    },
    /// What this node's data plane would do with a packet, and why: the MAC table's entry,
    /// the task a VIP or published port would choose and the hash that chose it, the VTEP it
    /// goes to, or why it is dropped. Nothing is sent and no flow is tracked.
    Trace {
        /// The network the packet is on.
        network: String,
        /// The sender, ADDR[:PORT] (port 40000 by default): an address in the network is a
        /// container on this node, one outside it a client of a port published here.
        #[arg(value_parser = parse_addr_port)]
        src: (Ipv4Addr, Option<u16>),
        /// The destination, ADDR[:PORT]; TCP and UDP need the port.
        #[arg(value_parser = parse_addr_port)]
        dst: (Ipv4Addr, Option<u16>),
        #[arg(long, value_enum, default_value_t = crate::trace::Proto::Tcp)]
        proto: crate::trace::Proto,
        #[arg(long)]
        json: bool,
    },
    /// The whole state of a network, a service or a node as this node sees it (JSON).
    #[command(subcommand)]
    Inspect(InspectCommand),
}

#[derive(Subcommand)]
pub enum InspectCommand {
    /// A network: its settings, endpoints, the members that made it, its services, and this
    /// node's traffic counters for it.
    Network {
        name: String,
        /// JSON (the only form inspect prints).
        #[arg(long)]
        json: bool,
    },
    /// A service: its settings, its tasks and their state, and this node's balancing of them.
    Service {
        name: String,
        /// JSON (the only form inspect prints).
        #[arg(long)]
        json: bool,
    },
    /// A node (by id or address): its state, networks, endpoints and tasks.
    Node {
        name: String,
        /// JSON (the only form inspect prints).
        #[arg(long)]
        json: bool,
    },
}

/// `ADDR` or `ADDR:PORT`.
fn parse_addr_port(spec: &str) -> Result<(Ipv4Addr, Option<u16>), String> {
    if let Ok(ip) = spec.parse() {
        return Ok((ip, None));
    }
    spec.parse::<std::net::SocketAddrV4>()
        .map(|a| (*a.ip(), Some(a.port())))
        .map_err(|_| format!("{spec:?} is not an IPv4 address, optionally with :PORT"))
}

#[derive(Args)]
pub struct DaemonArgs {
    /// This node's underlay address: peers reach its VXLAN and gossip ports there.
    #[arg(long)]
    pub advertise_addr: Ipv4Addr,
    #[arg(long, default_value = "/var/lib/overlayd")]
    pub state_dir: PathBuf,
    /// UDP port for VXLAN (RFC 7348's 4789 by default; every node must use the same one).
    #[arg(long, default_value_t = 4789)]
    pub vxlan_port: u16,
    /// UDP (gossip) and TCP (peer requests) port.
    #[arg(long, default_value_t = 7946)]
    pub gossip_port: u16,
    #[command(flatten)]
    pub data_path: DataPathArgs,
    #[command(flatten)]
    pub plugins: PluginArgs,
    #[command(flatten)]
    pub observe: ObserveArgs,
}

/// How a running daemon shows itself: metrics and logs.
#[derive(Args)]
pub struct ObserveArgs {
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// Log lines as plain text or as one JSON object each.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args)]
pub struct PluginArgs {
    /// Serve Docker as network and IPAM driver `overlayd` on /run/docker/plugins/overlayd.sock
    /// (`docker network create --driver overlayd --ipam-driver overlayd --subnet CIDR NAME`).
    /// One daemon per host.
    #[arg(long)]
    pub docker_plugin: bool,
}

#[derive(Args)]
pub struct DataPathArgs {
    /// Data-path threads, one per TAP queue (default: one per core). With one per core they are
    /// pinned to their core and packets steered to them while the load is light.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Turn TAP and UDP offloads (TSO, GSO, GRO) off: the fallback for kernels that refuse them.
    #[arg(long, env = "OVERLAYD_NO_OFFLOADS", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_offloads: bool,
    /// Seconds an established TCP flow through a VIP or published port may stay idle before
    /// its connection-table entry expires (default 5 days, like Linux). Keepalives count.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub conntrack_tcp_idle: Option<u64>,
}

#[derive(Subcommand)]
pub enum NodeCommand {
    /// List members with their address and state (ready / down / leaving), and the nodes that
    /// left or were removed.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove a dead or lost node for good: its containers' addresses, tasks and keys leave
    /// every node, and it cannot come back under its id.
    Rm {
        /// The node's id, as `node ls` shows it.
        id: String,
        /// Remove it even while it is ready (its containers lose the network).
        #[arg(long)]
        force: bool,
    },
    /// Leave the cluster: this node's tasks get no new flows on any node first, then it
    /// leaves and its daemon stops.
    Leave,
}

#[derive(Subcommand)]
pub enum NetworkCommand {
    /// Create a network on every node.
    Create {
        name: String,
        /// IPv4 subnet, e.g. 198.19.0.0/24; its first address is the gateway.
        #[arg(long)]
        subnet: Ipv4Network,
        /// VXLAN network identifier (default: the lowest free one from 4096).
        #[arg(long)]
        vni: Option<u32>,
        /// Container MTU (default: the underlay MTU minus 50 bytes of VXLAN).
        #[arg(long)]
        mtu: Option<u32>,
        /// External VTEP that carries this network without being a member (e.g. a kernel vxlan device); repeatable.
        #[arg(long = "vtep")]
        vteps: Vec<Ipv4Addr>,
        /// No egress: containers reach their network and their own node (gateway, DNS),
        /// nothing else (Docker's --internal).
        #[arg(long)]
        internal: bool,
        /// Seal every frame between nodes with ChaCha20-Poly1305 under keys per node pair,
        /// derived from the cluster secret; nothing is sent or taken in the clear. Costs 24
        /// bytes of MTU.
        #[arg(long)]
        encrypted: bool,
        #[arg(long)]
        json: bool,
    },
    /// Advance an encrypted network's key epoch: every node derives new keys, traffic goes on
    /// (the previous epoch is still taken for 30 s).
    RotateKey {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// List networks.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove a network from every node (refused while containers are attached).
    Rm { name: String },
}

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// Create a service on a network; in vip mode it gets a VIP from the network's subnet.
    Create {
        name: String,
        #[arg(long)]
        network: String,
        #[arg(long, value_enum, default_value_t = Mode::Vip)]
        mode: Mode,
        /// Health check: a TCP connection to this port of each task.
        #[arg(long, value_name = "PORT", group = "health", value_parser = clap::value_parser!(u16).range(1..))]
        health_tcp: Option<u16>,
        /// Health check: `GET PATH` on this port of each task answers 2xx or 3xx.
        #[arg(long, value_name = "PORT/PATH", value_parser = parse_http_check, group = "health")]
        health_http: Option<(u16, String)>,
        /// Time between health checks, e.g. 500ms, 2s (default 1s).
        #[arg(long, value_name = "DUR", value_parser = parse_duration_ms, requires = "health")]
        health_interval: Option<u64>,
        /// Publish a port on every node (repeatable): PUB:TARGET[/tcp|/udp], ADDR:PUB:TARGET
        /// (one node's address only) or published=PUB,target=TARGET[,protocol=udp][,mode=host];
        /// append ,affinity=client-ip and/or ,proxy=v2 (TCP) to any form.
        #[arg(long, value_name = "SPEC", value_parser = parse_publish)]
        publish: Vec<Publish>,
        #[arg(long)]
        json: bool,
    },
    /// Change the ports a service publishes: removals first, then additions.
    #[command(group(ArgGroup::new("change").args(["publish_add", "publish_rm"]).required(true).multiple(true)))]
    Update {
        name: String,
        /// Publish another port (repeatable); takes what `service create --publish` takes.
        #[arg(long, value_name = "SPEC", value_parser = parse_publish)]
        publish_add: Vec<Publish>,
        /// Stop publishing a port (repeatable): PUB[/tcp|/udp], ADDR:PUB[/proto], or a full SPEC.
        #[arg(long, value_name = "PORT", value_parser = parse_unpublish)]
        publish_rm: Vec<Unpublish>,
        #[arg(long)]
        json: bool,
    },
    /// List services: name, mode, network, VIP, tasks healthy/total, published ports.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// List a service's tasks: container, address, node, state, published ports.
    Ps {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a service (refused while it has tasks, unless --force, which detaches them).
    Rm {
        name: String,
        #[arg(long)]
        force: bool,
    },
}

/// Default time between health checks.
const HEALTH_INTERVAL_MS: u64 = 1000;

/// `PORT/PATH` of `--health-http`.
fn parse_http_check(spec: &str) -> Result<(u16, String), String> {
    let (port, path) = spec
        .split_once('/')
        .ok_or_else(|| format!("{spec:?} is not PORT/PATH, e.g. 80/healthz"))?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{port:?} is not a port (1-65535)"))?;
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("path {path:?} has spaces or control characters"));
    }
    Ok((port, format!("/{path}")))
}

/// `SPEC` of `--publish` and `--publish-add` (see [`crate::publish`]).
fn parse_publish(spec: &str) -> Result<Publish, crate::publish::Refusal> {
    spec.parse()
}

/// `PORT` of `--publish-rm`.
fn parse_unpublish(spec: &str) -> Result<Unpublish, crate::publish::Refusal> {
    spec.parse()
}

/// `DUR` of `--health-interval`: a number with `ms` or `s`, between 100ms and 1h.
fn parse_duration_ms(spec: &str) -> Result<u64, String> {
    let parsed = if let Some(ms) = spec.strip_suffix("ms") {
        ms.parse::<u64>().ok()
    } else if let Some(s) = spec.strip_suffix('s') {
        s.parse::<u64>().ok().and_then(|s| s.checked_mul(1000))
    } else {
        None
    };
    parsed
        .filter(|ms| (100..=3_600_000).contains(ms))
        .ok_or_else(|| {
            format!("{spec:?} is not a duration between 100ms and 3600s, e.g. 500ms or 2s")
        })
}

impl Command {
    /// How the daemon verbs log; client verbs log as text.
    pub fn log_format(&self) -> LogFormat {
        match self {
            Command::Init(args) | Command::Join { daemon: args, .. } => args.observe.log_format,
            Command::Run { observe, .. } => observe.log_format,
            _ => LogFormat::Text,
        }
    }

    /// The API request for a client verb, and whether to print JSON.
    pub fn request(self) -> Option<(api::Request, Render)> {
        use api::Request as R;
        Some(match self {
            Command::Init(_) | Command::Join { .. } | Command::Run { .. } => return None,
            Command::JoinToken { rotate, json } => {
                (R::JoinToken { rotate }, Render::Token.or_json(json))
            }
            Command::Node(NodeCommand::Ls { json }) => (R::NodeLs, Render::Nodes.or_json(json)),
            Command::Node(NodeCommand::Rm { id, force }) => {
                (R::NodeRm { id, force }, Render::Plain)
            }
            Command::Node(NodeCommand::Leave) => (R::NodeLeave, Render::Plain),
            Command::Network(NetworkCommand::Create {
                name,
                subnet,
                vni,
                mtu,
                vteps,
                internal,
                encrypted,
                json,
            }) => (
                R::NetworkCreate {
                    name,
                    subnet,
                    vni,
                    mtu,
                    vteps,
                    internal,
                    encrypted,
                },
                Render::Network.or_json(json),
            ),
            Command::Network(NetworkCommand::RotateKey { name, json }) => {
                (R::NetworkRotateKey { name }, Render::Network.or_json(json))
            }
            Command::Network(NetworkCommand::Ls { json }) => {
                (R::NetworkLs, Render::Networks.or_json(json))
            }
            Command::Network(NetworkCommand::Rm { name }) => (R::NetworkRm { name }, Render::Plain),
            Command::Attach {
                netns,
                network,
                ip,
                service,
                aliases,
                ifname,
                json,
            } => (
                R::Attach {
                    netns,
                    network,
                    ip,
                    service,
                    aliases,
                    ifname,
                },
                Render::Attachment.or_json(json),
            ),
            Command::Service(ServiceCommand::Create {
                name,
                network,
                mode,
                health_tcp,
                health_http,
                health_interval,
                publish,
                json,
            }) => {
                let check = match (health_tcp, health_http) {
                    (Some(port), _) => Some(Check::Tcp { port }),
                    (None, Some((port, path))) => Some(Check::Http { port, path }),
                    (None, None) => None,
                };
                let health = check.map(|check| Health {
                    check,
                    interval_ms: health_interval.unwrap_or(HEALTH_INTERVAL_MS),
                });
                (
                    R::ServiceCreate {
                        name,
                        network,
                        mode,
                        health,
                        publish,
                    },
                    Render::Services.or_json(json),
                )
            }
            Command::Service(ServiceCommand::Update {
                name,
                publish_add,
                publish_rm,
                json,
            }) => (
                R::ServiceUpdate {
                    name,
                    add: publish_add,
                    remove: publish_rm,
                },
                Render::Services.or_json(json),
            ),
            Command::Service(ServiceCommand::Ls { json }) => {
                (R::ServiceLs, Render::Services.or_json(json))
            }
            Command::Service(ServiceCommand::Ps { name, json }) => {
                (R::ServicePs { name }, Render::Tasks.or_json(json))
            }
            Command::Service(ServiceCommand::Rm { name, force }) => {
                (R::ServiceRm { name, force }, Render::Plain)
            }
            Command::Detach { netns, network } => (
                R::Detach {
                    netns,
                    network,
                    missing_ok: false,
                },
                Render::Plain,
            ),
            Command::Status { json } => (R::Status, Render::Json.or_json(json)),
            Command::Trace {
                network,
                src,
                dst,
                proto,
                json,
            } => (
                R::Trace {
                    network,
                    proto,
                    src,
                    dst,
                },
                Render::Trace.or_json(json),
            ),
            Command::Inspect(what) => {
                let (kind, name, json) = match what {
                    InspectCommand::Network { name, json } => (api::Inspect::Network, name, json),
                    InspectCommand::Service { name, json } => (api::Inspect::Service, name, json),
                    InspectCommand::Node { name, json } => (api::Inspect::Node, name, json),
                };
                (R::Inspect { kind, name }, Render::Json.or_json(json))
            }
        })
    }
}

/// How a reply is shown.
#[derive(Clone, Copy)]
pub enum Render {
    Json,
    Plain,
    Token,
    Nodes,
    Network,
    Networks,
    Attachment,
    Services,
    Tasks,
    Trace,
}

impl Render {
    fn or_json(self, json: bool) -> Render {
        if json { Render::Json } else { self }
    }

    pub fn show(self, value: serde_json::Value) -> anyhow::Result<String> {
        Ok(match self {
            Render::Json => serde_json::to_string_pretty(&value)?,
            Render::Plain => value
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| value.to_string()),
            Render::Token => serde_json::from_value::<api::JoinToken>(value)?.token,
            Render::Trace => {
                let t: crate::trace::Trace = serde_json::from_value(value)?;
                let mut lines = vec![
                    format!("network:  {}", t.network),
                    format!("packet:   {}", t.packet),
                    format!("mac:      {} ({})", t.mac, t.mac_entry),
                ];
                if let Some(b) = t.balancer {
                    let mut line = format!("balancer: {}", b.kind);
                    if let Some(service) = b.service {
                        line += &format!(" of service {service}");
                    }
                    if let Some(hash) = b.hash {
                        line += &format!(", hash {hash}");
                    }
                    line += &match (b.task, b.task_node) {
                        (Some(task), Some(node)) => format!(", task {task} on node {node}"),
                        (Some(task), None) => format!(", task {task}"),
                        _ => ", no task can take it".to_owned(),
                    };
                    if let Some(state) = b.state {
                        line += &format!(" ({state})");
                    }
                    lines.push(line);
                }
                lines.push(format!("verdict:  {}", t.verdict));
                lines.join("\n")
            }
            Render::Nodes => {
                let nodes: Vec<Node> = serde_json::from_value(value)?;
                table(
                    &["ID", "ADDRESS", "STATE", "RAFT"],
                    nodes.iter().map(|n| {
                        let id = if n.is_self {
                            format!("{} *", n.id)
                        } else {
                            n.id.clone()
                        };
                        let raft = n.raft.map(|r| r.to_string()).unwrap_or_default();
                        vec![id, n.address.to_string(), n.state.to_string(), raft]
                    }),
                )
            }
            Render::Network => {
                let net: NetworkInfo = serde_json::from_value(value)?;
                let internal = if net.internal { ", internal" } else { "" };
                let encrypted = if net.encrypted {
                    format!(", encrypted, key epoch {}", net.key_epoch)
                } else {
                    String::new()
                };
                format!(
                    "{} (vni {}, subnet {}, gateway {}, mtu {}{internal}{encrypted})",
                    net.name, net.vni, net.subnet, net.gateway, net.mtu
                )
            }
            Render::Networks => {
                let nets: Vec<NetworkInfo> = serde_json::from_value(value)?;
                table(
                    &[
                        "NAME",
                        "SUBNET",
                        "GATEWAY",
                        "VNI",
                        "MTU",
                        "INTERNAL",
                        "ENCRYPTED",
                        "ENDPOINTS",
                    ],
                    nets.iter().map(|n| {
                        vec![
                            n.name.clone(),
                            n.subnet.to_string(),
                            n.gateway.to_string(),
                            n.vni.to_string(),
                            n.mtu.to_string(),
                            if n.internal { "yes" } else { "no" }.to_string(),
                            if n.encrypted {
                                format!("yes (epoch {})", n.key_epoch)
                            } else {
                                "no".to_string()
                            },
                            n.endpoints.to_string(),
                        ]
                    }),
                )
            }
            Render::Services => {
                // `service create` answers with one service, `service ls` with a list.
                let services: Vec<ServiceInfo> = if value.is_array() {
                    serde_json::from_value(value)?
                } else {
                    vec![serde_json::from_value(value)?]
                };
                table(
                    &["NAME", "MODE", "NETWORK", "VIP", "TASKS", "PORTS"],
                    services.iter().map(|s| {
                        vec![
                            s.name.clone(),
                            s.mode.to_string(),
                            s.network.clone(),
                            s.vip.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
                            format!("{}/{}", s.tasks_healthy, s.tasks_total),
                            ports(&s.publish),
                        ]
                    }),
                )
            }
            Render::Tasks => {
                let tasks: Vec<Task> = serde_json::from_value(value)?;
                table(
                    &[
                        "CONTAINER",
                        "ADDRESS",
                        "NODE",
                        "NODE ADDRESS",
                        "STATE",
                        "PORTS",
                    ],
                    tasks.iter().map(|t| {
                        vec![
                            t.netns.clone(),
                            t.ip.to_string(),
                            t.node.clone(),
                            t.node_address.map(|a| a.to_string()).unwrap_or_default(),
                            t.state.to_string(),
                            ports(&t.publish),
                        ]
                    }),
                )
            }
            Render::Attachment => {
                let a: Attachment = serde_json::from_value(value)?;
                format!(
                    "{} attached to {} as {}: {} ({})",
                    a.netns, a.network, a.ifname, a.ip, a.mac
                )
            }
        })
    }
}

/// The PORTS cell: `*:9200->80/tcp, *:53->53/udp`, as Docker lists them.
fn ports(publish: &[Publish]) -> String {
    publish
        .iter()
        .map(Publish::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = std::iter::once(headers.iter().map(|h| h.to_string()).collect())
        .chain(rows)
        .collect();
    let widths: Vec<usize> = (0..headers.len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            cells.join("   ").trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `PEER` as given to `join`: an address, with the gossip port unless one is given.
pub fn peer_addr(peer: &str, default_port: u16) -> Result<SocketAddr, String> {
    peer.parse::<SocketAddr>()
        .or_else(|_| {
            peer.parse::<Ipv4Addr>()
                .map(|ip| SocketAddr::from((ip, default_port)))
        })
        .map_err(|_| {
            format!(
                "PEER {peer:?} is not an address: give a member's --advertise-addr, e.g. 198.18.0.1"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let out = table(
            &["A", "LONGER"],
            [vec!["xxxx".into(), "y".into()]].into_iter(),
        );
        assert_eq!(out, "A      LONGER\nxxxx   y");
    }

    #[test]
    fn peer_takes_an_address_with_or_without_port() {
        assert_eq!(
            peer_addr("198.18.0.1", 7946),
            Ok("198.18.0.1:7946".parse().unwrap())
        );
        assert_eq!(
            peer_addr("198.18.0.1:8000", 7946),
            Ok("198.18.0.1:8000".parse().unwrap())
        );
        assert!(peer_addr("node1", 7946).is_err());
    }

    #[test]
    fn health_specs_are_parsed_or_refused_with_the_form() {
        assert_eq!(parse_http_check("80/healthz"), Ok((80, "/healthz".into())));
        assert_eq!(parse_http_check("8080/"), Ok((8080, "/".into())));
        for bad in ["80", "0/x", "x/y", "70000/a", "80/a b"] {
            assert!(parse_http_check(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("2s"), Ok(2000));
        for bad in ["2", "10ms", "2h", "s", "-1s"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }

    fn parse(args: &[&str]) -> Result<(api::Request, Render), clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("overlayd").chain(args.iter().copied()))?;
        Ok(cli.command.request().expect("a client verb"))
    }

    #[test]
    fn publish_flags_become_the_request() {
        let (request, _) = parse(&[
            "service",
            "create",
            "search",
            "--network",
            "app",
            "--publish",
            "9200:80",
            "--publish",
            "53:53/udp,affinity=client-ip",
        ])
        .unwrap();
        let api::Request::ServiceCreate { publish, .. } = request else {
            panic!("{request:?}")
        };
        let shown: Vec<String> = publish.iter().map(Publish::to_string).collect();
        assert_eq!(shown, ["*:9200->80/tcp", "*:53->53/udp"]);
        let (request, _) = parse(&[
            "service",
            "update",
            "search",
            "--publish-rm",
            "9200",
            "--publish-add",
            "9300:80",
            "--publish-rm",
            "198.18.0.1:53/udp",
        ])
        .unwrap();
        let api::Request::ServiceUpdate { name, add, remove } = request else {
            panic!("{request:?}")
        };
        assert_eq!(name, "search");
        assert_eq!(add, ["9300:80".parse::<Publish>().unwrap()]);
        let removed: Vec<String> = remove.iter().map(Unpublish::to_string).collect();
        assert_eq!(removed, ["9200/tcp", "198.18.0.1:53/udp"]);
    }

    #[test]
    fn bad_publish_flags_are_usage_errors_naming_the_spec() {
        for (args, says) in [
            ("create s --network n --publish 70000:80", "'70000:80'"),
            (
                "create s --network n --publish 53:53/udp,proxy=v2",
                "needs TCP",
            ),
            ("update s --publish-add 80", "'80'"),
            ("update s --publish-rm 0/tcp", "'0/tcp'"),
            ("update s", "--publish-add"),
        ] {
            let args: Vec<&str> = ["service"].into_iter().chain(args.split(' ')).collect();
            let err = parse(&args)
                .err()
                .unwrap_or_else(|| panic!("{args:?} parsed"));
            assert!(err.use_stderr(), "{args:?}");
            let text = err.to_string();
            assert!(text.contains(says), "{args:?}: {text}");
        }
    }

    #[test]
    fn tables_show_published_ports() {
        let service = serde_json::json!({
            "name": "search", "mode": "vip", "network": "app", "vip": "198.19.0.2",
            "health": null, "tasks_healthy": 3, "tasks_total": 3,
            "publish": [
                {"published": 9200, "target": 80, "protocol": "tcp"},
                {"published": 8080, "target": 80, "protocol": "udp", "addr": "198.18.0.1"},
                {"published": 81, "target": 80, "protocol": "tcp", "mode": "host"},
            ],
        });
        let out = Render::Services.show(serde_json::json!([service])).unwrap();
        assert_eq!(
            out,
            "NAME     MODE   NETWORK   VIP          TASKS   PORTS\n\
             search   vip    app       198.19.0.2   3/3     \
             *:9200->80/tcp, 198.18.0.1:8080->80/udp, *:81->80/tcp (host)"
        );
        let task = serde_json::json!({
            "netns": "t1", "ip": "198.19.0.3", "node": "n1", "node_address": "198.18.0.1",
            "state": "healthy", "publish": [{"published": 9200, "target": 80, "protocol": "tcp"}],
        });
        let out = Render::Tasks.show(serde_json::json!([task])).unwrap();
        assert_eq!(
            out,
            "CONTAINER   ADDRESS      NODE   NODE ADDRESS   STATE     PORTS\n\
             t1          198.19.0.3   n1     198.18.0.1     healthy   *:9200->80/tcp"
        );
    }

    #[test]
    fn every_verb_has_help() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        fn check(command: &clap::Command, path: &str) {
            for verb in command.get_subcommands() {
                let name = format!("{path} {}", verb.get_name());
                assert!(verb.get_about().is_some(), "{name} has no help");
                check(verb, &name);
            }
        }
        check(&Cli::command(), "overlayd");
    }
}
