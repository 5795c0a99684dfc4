//! Published ports as users write them (`--publish`, `--publish-rm`) and as tables show them
//! (Docker's `*:9200->80/tcp`), and the rules they obey, alone and against every other service's.
//!
//! Pure: [`admit`] is what the registry applies, and what a daemon checks against its copy of the
//! registry before it asks the nodes whether the ports are free.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::model::{
    Affinity, EGRESS_PORTS, ProxyProtocol, Publish, PublishMode, PublishProtocol, Service,
};

/// The forms `--publish` takes, for error messages.
const FORMS: &str = "use PUB:TARGET[/tcp|/udp], ADDR:PUB:TARGET[/proto] or \
                     published=PUB,target=TARGET[,protocol=udp][,mode=host]";

/// A port spec that is wrong on its own, or a change that breaks a rule. Nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0:?} is not a port spec: {FORMS}")]
    Form(String),
    #[error("{which} port {text:?} is not a number: use a port from 1 to 65535")]
    Port { which: &'static str, text: String },
    #[error("{which} port {port} is out of range: use a port from 1 to 65535")]
    Range { which: &'static str, port: u64 },
    #[error("{0:?} is not an IPv4 address: give a node's address, or leave ADDR out")]
    Addr(String),
    #[error("unknown option {0:?}: use published=, target=, protocol=, mode=, affinity= or proxy=")]
    Key(String),
    #[error("{key}={value} is not allowed: use {key}={allowed}")]
    Value {
        key: &'static str,
        value: String,
        allowed: &'static str,
    },
    #[error("{0}= is given twice")]
    KeyTwice(String),
    #[error("published= and target= are both needed: {FORMS}")]
    Missing,
    #[error("proxy=v2 needs TCP: port {0} cannot carry a PROXY header")]
    ProxyNeedsTcp(String),
    #[error(
        "port {0}: ADDR binds one node's address and mode=host binds the nodes running a task: use one of them"
    )]
    HostWithAddr(String),
    #[error(
        "port {port} is one of the ports containers reach the outside from ({first}-{last}): publish a lower port",
        port = .0,
        first = EGRESS_PORTS.start(),
        last = EGRESS_PORTS.end()
    )]
    EgressPort(String),
    #[error("port {0} is given twice in this request: give it once")]
    Twice(String),
    #[error(
        "port {port} is already published by service {service}: pick another port, or free it with `overlayd service update {service} --publish-rm {port}`"
    )]
    Taken { port: String, service: String },
    #[error("service {service} does not publish {port}: `overlayd service ls` shows its ports")]
    NotPublished { port: String, service: String },
}

impl fmt::Display for PublishProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PublishProtocol::Tcp => "tcp",
            PublishProtocol::Udp => "udp",
        })
    }
}

/// As `service ls` and `service ps` show it, like Docker's PORTS column: `*:9200->80/tcp` on
/// every node's addresses, `198.18.0.1:8080->80/tcp` on one address, and `(host)` after a port
/// that only the nodes running a task answer on.
impl fmt::Display for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            Some(addr) => write!(f, "{addr}:")?,
            None => f.write_str("*:")?,
        }
        write!(f, "{}->{}/{}", self.published, self.target, self.protocol)?;
        if self.mode == PublishMode::Host {
            f.write_str(" (host)")?;
        }
        Ok(())
    }
}

impl Publish {
    /// The rules a publish obeys on its own, wherever it comes from (the CLI, a peer's proposal).
    pub fn check(&self) -> Result<(), Refusal> {
        for (which, port) in [("published", self.published), ("target", self.target)] {
            if port == 0 {
                return Err(Refusal::Range { which, port: 0 });
            }
        }
        if EGRESS_PORTS.contains(&self.published) {
            return Err(Refusal::EgressPort(self.port()));
        }
        if self.proxy.is_some() && self.protocol != PublishProtocol::Tcp {
            return Err(Refusal::ProxyNeedsTcp(self.port()));
        }
        if self.addr.is_some() && self.mode == PublishMode::Host {
            return Err(Refusal::HostWithAddr(self.port()));
        }
        Ok(())
    }

    /// The port as messages name it, and as `--publish-rm` takes it: `9200/tcp`, or
    /// `198.18.0.1:9200/tcp` when bound to one address.
    pub fn port(&self) -> String {
        port_name(self.addr, self.published, self.protocol)
    }

    /// Whether both want the same port of some address: the same number and protocol, and
    /// the same address or one of them on every address.
    pub fn overlaps(&self, other: &Publish) -> bool {
        self.published == other.published
            && self.protocol == other.protocol
            && (self.addr.is_none() || other.addr.is_none() || self.addr == other.addr)
    }
}

/// A port as messages name it: `9200/tcp`, or `198.18.0.1:9200/tcp` on one address.
pub fn port_name(addr: Option<Ipv4Addr>, published: u16, protocol: PublishProtocol) -> String {
    match addr {
        Some(addr) => format!("{addr}:{published}/{protocol}"),
        None => format!("{published}/{protocol}"),
    }
}

impl FromStr for Publish {
    type Err = Refusal;

    /// `[ADDR:]PUB:TARGET[/proto][,key=value]...` or `published=PUB,target=TARGET[,key=value]...`,
    /// with `protocol=tcp|udp`, `mode=ingress|host`, `affinity=none|client-ip`, `proxy=v2`.
    fn from_str(spec: &str) -> Result<Publish, Refusal> {
        let mut parts = spec.split(',');
        let head = parts.next().unwrap_or_default();
        let mut publish = Publish {
            published: 0,
            target: 0,
            protocol: PublishProtocol::Tcp,
            mode: PublishMode::Ingress,
            addr: None,
            affinity: Affinity::None,
            proxy: None,
        };
        let mut seen: Vec<&str> = Vec::new();
        let options = if head.contains('=') {
            spec.split(',')
        } else {
            let short = short_form(spec, head)?;
            (publish.addr, publish.published, publish.protocol) =
                (short.addr, short.published, short.protocol);
            publish.target = short
                .target
                .ok_or_else(|| Refusal::Form(spec.to_string()))?;
            // The short form has said these; `,protocol=` after it would say them twice.
            seen.extend(["published", "target", "protocol"]);
            parts
        };
        for option in options {
            let (key, value) = option
                .split_once('=')
                .ok_or_else(|| Refusal::Form(spec.to_string()))?;
            if seen.contains(&key) {
                return Err(Refusal::KeyTwice(key.to_string()));
            }
            seen.push(key);
            set(&mut publish, key, value)?;
        }
        if publish.published == 0 || publish.target == 0 {
            return Err(Refusal::Missing);
        }
        publish.check()?;
        Ok(publish)
    }
}

/// One `key=value` of a spec.
fn set(publish: &mut Publish, key: &str, value: &str) -> Result<(), Refusal> {
    let bad = |key: &'static str, allowed: &'static str| Refusal::Value {
        key,
        value: value.to_string(),
        allowed,
    };
    match key {
        "published" => publish.published = port("published", value)?,
        "target" => publish.target = port("target", value)?,
        "protocol" => publish.protocol = protocol(value).ok_or(bad("protocol", "tcp|udp"))?,
        "mode" => {
            publish.mode = match value {
                "ingress" => PublishMode::Ingress,
                "host" => PublishMode::Host,
                _ => return Err(bad("mode", "ingress|host")),
            }
        }
        "affinity" => {
            publish.affinity = match value {
                "none" => Affinity::None,
                "client-ip" => Affinity::ClientIp,
                _ => return Err(bad("affinity", "none|client-ip")),
            }
        }
        "proxy" => {
            publish.proxy = match value {
                "v2" => Some(ProxyProtocol::V2),
                _ => return Err(bad("proxy", "v2")),
            }
        }
        other => return Err(Refusal::Key(other.to_string())),
    }
    Ok(())
}

/// The head of a short spec: `[ADDR:]PUB[:TARGET][/proto]`. One colon is `ADDR:PUB` when what
/// precedes it is an address, `PUB:TARGET` otherwise.
struct Short {
    addr: Option<Ipv4Addr>,
    published: u16,
    target: Option<u16>,
    protocol: PublishProtocol,
}

fn short_form(spec: &str, head: &str) -> Result<Short, Refusal> {
    let (ports, proto) = match head.rsplit_once('/') {
        Some((ports, proto)) => (
            ports,
            protocol(proto).ok_or_else(|| Refusal::Value {
                key: "protocol",
                value: proto.to_string(),
                allowed: "tcp|udp",
            })?,
        ),
        None => (head, PublishProtocol::Tcp),
    };
    let fields: Vec<&str> = ports.split(':').collect();
    let (addr, published, target) = match fields[..] {
        [published] => (None, published, None),
        [first, second] if first.contains('.') => (Some(first), second, None),
        [published, target] => (None, published, Some(target)),
        [addr, published, target] => (Some(addr), published, Some(target)),
        _ => return Err(Refusal::Form(spec.to_string())),
    };
    let addr = match addr {
        None => None,
        Some(text) => {
            let addr: Ipv4Addr = text.parse().map_err(|_| Refusal::Addr(text.to_string()))?;
            // Docker's 0.0.0.0:PUB:TARGET: every address, as without one.
            (!addr.is_unspecified()).then_some(addr)
        }
    };
    Ok(Short {
        addr,
        published: port("published", published)?,
        target: target.map(|t| port("target", t)).transpose()?,
        protocol: proto,
    })
}

fn port(which: &'static str, text: &str) -> Result<u16, Refusal> {
    let number: u64 = text.parse().map_err(|_| Refusal::Port {
        which,
        text: text.to_string(),
    })?;
    u16::try_from(number)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(Refusal::Range {
            which,
            port: number,
        })
}

fn protocol(text: &str) -> Option<PublishProtocol> {
    match text {
        "tcp" => Some(PublishProtocol::Tcp),
        "udp" => Some(PublishProtocol::Udp),
        _ => None,
    }
}

/// What `--publish-rm` names: a port, with its address and target when given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unpublish {
    pub published: u16,
    pub protocol: PublishProtocol,
    /// Only the publish on this address; on any address when none.
    pub addr: Option<Ipv4Addr>,
    /// Only the publish to this target; to any when none.
    pub target: Option<u16>,
}

impl Unpublish {
    pub fn matches(&self, publish: &Publish) -> bool {
        self.published == publish.published
            && self.protocol == publish.protocol
            && self.addr.is_none_or(|a| publish.addr == Some(a))
            && self.target.is_none_or(|t| publish.target == t)
    }
}

impl fmt::Display for Unpublish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.target {
            Some(target) => write!(
                f,
                "{}:{}->{target}/{}",
                self.addr.map_or("*".to_string(), |a| a.to_string()),
                self.published,
                self.protocol
            ),
            None => f.write_str(&port_name(self.addr, self.published, self.protocol)),
        }
    }
}

impl FromStr for Unpublish {
    type Err = Refusal;

    /// `PUB[/proto]`, `ADDR:PUB[/proto]`, or anything `--publish` takes.
    fn from_str(spec: &str) -> Result<Unpublish, Refusal> {
        if spec.contains(['=', ',']) {
            let publish: Publish = spec.parse()?;
            return Ok(Unpublish {
                published: publish.published,
                protocol: publish.protocol,
                addr: publish.addr,
                target: Some(publish.target),
            });
        }
        let short = short_form(spec, spec)?;
        Ok(Unpublish {
            published: short.published,
            protocol: short.protocol,
            addr: short.addr,
            target: short.target,
        })
    }
}

/// The ports service `name` publishes once `remove` is taken from `current` and `add` put in,
/// or why not: a bad publish, a port given twice, one it does not publish, or one that another
/// service (or it already) publishes. `services` are all services, `name`'s included or not.
pub fn admit(
    services: &BTreeMap<String, Service>,
    name: &str,
    current: &[Publish],
    add: &[Publish],
    remove: &[Unpublish],
) -> Result<Vec<Publish>, Refusal> {
    for (i, publish) in add.iter().enumerate() {
        publish.check()?;
        if add[..i].iter().any(|earlier| earlier.overlaps(publish)) {
            return Err(Refusal::Twice(publish.port()));
        }
    }
    for (i, rm) in remove.iter().enumerate() {
        if remove[..i].contains(rm) {
            return Err(Refusal::Twice(rm.to_string()));
        }
        if !current.iter().any(|p| rm.matches(p)) {
            return Err(Refusal::NotPublished {
                port: rm.to_string(),
                service: name.to_string(),
            });
        }
    }
    let mut kept: Vec<Publish> = current
        .iter()
        .filter(|p| !remove.iter().any(|rm| rm.matches(p)))
        .cloned()
        .collect();
    let others = services
        .values()
        .filter(|s| s.name != name)
        .flat_map(|s| s.publish.iter().map(move |p| (s.name.as_str(), p)));
    let everyone = kept.iter().map(|p| (name, p)).chain(others);
    for (owner, held) in everyone {
        if let Some(publish) = add.iter().find(|p| p.overlaps(held)) {
            return Err(Refusal::Taken {
                port: publish.port(),
                service: owner.to_string(),
            });
        }
    }
    kept.extend(add.iter().cloned());
    Ok(kept)
}

#[cfg(test)]
mod tests;
