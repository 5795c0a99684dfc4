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

use crate::model::{Affinity, ProxyProtocol, Publish, PublishMode, PublishProtocol, Service};

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
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn publish(published: u16, target: u16) -> Publish {
        Publish {
            published,
            target,
            protocol: PublishProtocol::Tcp,
            mode: PublishMode::Ingress,
            addr: None,
            affinity: Affinity::None,
            proxy: None,
        }
    }

    fn parse(spec: &str) -> Result<Publish, Refusal> {
        spec.parse()
    }

    #[test]
    fn every_form_parses() {
        assert_eq!(parse("9200:80"), Ok(publish(9200, 80)));
        assert_eq!(parse("9200:80/tcp"), Ok(publish(9200, 80)));
        let udp = Publish {
            protocol: PublishProtocol::Udp,
            ..publish(53, 5353)
        };
        assert_eq!(parse("53:5353/udp"), Ok(udp.clone()));
        assert_eq!(parse("published=53,target=5353,protocol=udp"), Ok(udp));
        let bound = Publish {
            addr: Some(Ipv4Addr::new(198, 18, 0, 1)),
            ..publish(8080, 80)
        };
        assert_eq!(parse("198.18.0.1:8080:80/tcp"), Ok(bound));
        assert_eq!(parse("0.0.0.0:8080:80"), Ok(publish(8080, 80)));
        let host = Publish {
            mode: PublishMode::Host,
            ..publish(8080, 80)
        };
        assert_eq!(parse("mode=host,published=8080,target=80"), Ok(host));
        let sticky = Publish {
            affinity: Affinity::ClientIp,
            proxy: Some(ProxyProtocol::V2),
            ..publish(9200, 80)
        };
        assert_eq!(
            parse("9200:80,affinity=client-ip,proxy=v2"),
            Ok(sticky.clone())
        );
        assert_eq!(
            parse("published=9200,target=80,proxy=v2,affinity=client-ip"),
            Ok(sticky)
        );
    }

    #[test]
    fn bad_specs_are_refused_naming_the_part() {
        for (spec, says) in [
            ("70000:80", "published port 70000 is out of range"),
            ("0:80", "published port 0 is out of range"),
            ("9200:0", "target port 0 is out of range"),
            (
                "99999999999999999999:1",
                "\"99999999999999999999\" is not a number",
            ),
            ("80", "\"80\" is not a port spec"),
            ("x:80", "\"x\""),
            ("8000-8010:80", "\"8000-8010\""),
            ("9200:80/sctp", "protocol=sctp"),
            ("1.2.3:80:80", "\"1.2.3\" is not an IPv4"),
            ("a:b:c:d", "not a port spec"),
            ("", "published port \"\""),
            ("9200:80,affinity=sticky", "affinity=sticky"),
            ("9200:80,color=red", "\"color\""),
            ("9200:80,proxy", "not a port spec"),
            ("9200:80/udp,proxy=v2", "9200/udp"),
            ("9200:80,protocol=udp", "protocol= is given twice"),
            (
                "published=1,published=2,target=3",
                "published= is given twice",
            ),
            ("published=9200", "target= are both needed"),
            ("published=9200,target=80,mode=local", "mode=local"),
            ("198.18.0.1:9200:80,mode=host", "198.18.0.1:9200/tcp"),
        ] {
            let refusal = parse(spec).expect_err(spec).to_string();
            assert!(refusal.contains(says), "{spec}: {refusal}");
            assert!(!refusal.contains('\n'), "{spec}: one line: {refusal}");
        }
    }

    #[test]
    fn removals_name_a_port_an_address_and_a_target() {
        let rm = |spec: &str| spec.parse::<Unpublish>();
        let bound: Publish = parse("198.18.0.1:8080:80").unwrap();
        let any: Publish = parse("8080:81").unwrap();
        let udp: Publish = parse("8080:80/udp").unwrap();
        for (spec, matches) in [
            ("8080", [true, true, false]),
            ("8080/udp", [false, false, true]),
            ("198.18.0.1:8080", [true, false, false]),
            ("198.18.0.1:8080:80", [true, false, false]),
            ("8080:81", [false, true, false]),
            (
                "published=8080,target=80,protocol=udp",
                [false, false, true],
            ),
        ] {
            let rm = rm(spec).unwrap();
            let got = [&bound, &any, &udp].map(|p| rm.matches(p));
            assert_eq!(got, matches, "{spec}");
        }
        assert!(rm("0").is_err());
        assert!(rm("8080/icmp").is_err());
        assert_eq!(rm("8080:81").unwrap().to_string(), "*:8080->81/tcp");
        assert_eq!(
            rm("198.18.0.1:8080").unwrap().to_string(),
            "198.18.0.1:8080/tcp"
        );
    }

    #[test]
    fn ports_show_as_docker_shows_them() {
        let show = |spec: &str| parse(spec).unwrap().to_string();
        assert_eq!(show("9200:80"), "*:9200->80/tcp");
        assert_eq!(show("198.18.0.1:8080:80/udp"), "198.18.0.1:8080->80/udp");
        assert_eq!(
            show("published=8080,target=80,mode=host"),
            "*:8080->80/tcp (host)"
        );
    }

    fn service(name: &str, specs: &[&str]) -> (String, Service) {
        let service = Service {
            name: name.into(),
            network_id: "net".into(),
            mode: crate::model::Mode::Vip,
            vip: None,
            health: None,
            publish: specs.iter().map(|s| parse(s).unwrap()).collect(),
        };
        (name.to_string(), service)
    }

    #[test]
    fn a_port_is_published_once_per_address_and_protocol() {
        let services: BTreeMap<String, Service> = [
            service("web", &["80:8080", "198.18.0.1:443:8443"]),
            service("dns", &["53:53/udp"]),
        ]
        .into();
        let add = |specs: &[&str]| {
            let add: Vec<Publish> = specs.iter().map(|s| parse(s).unwrap()).collect();
            admit(&services, "new", &[], &add, &[])
        };
        for (specs, why) in [
            (
                &["80:80"][..],
                "port 80/tcp is already published by service web",
            ),
            (
                &["198.18.0.2:80:80"],
                "80/tcp is already published by service web",
            ),
            (&["443:443"], "443/tcp is already published by service web"),
            (
                &["198.18.0.1:443:1"],
                "198.18.0.1:443/tcp is already published by service web",
            ),
            (
                &["mode=host,published=53,target=1,protocol=udp"],
                "by service dns",
            ),
            (&["9000:1", "9000:2"], "port 9000/tcp is given twice"),
            (&["9000:1", "198.18.0.3:9000:2"], "given twice"),
        ] {
            let refusal = add(specs).expect_err(why).to_string();
            assert!(refusal.contains(why), "{specs:?}: {refusal}");
        }
        for specs in [
            &["53:53"][..],
            &["80:80/udp"],
            &["198.18.0.2:443:443"],
            &["9000:1", "9000:1/udp", "9001:1"],
        ] {
            assert!(add(specs).is_ok(), "{specs:?}");
        }
    }

    #[test]
    fn an_update_removes_first_then_adds() {
        let (_, web) = service("web", &["80:8080", "81:8081"]);
        let services = BTreeMap::from([("web".to_string(), web.clone())]);
        let rm = |s: &str| s.parse::<Unpublish>().unwrap();
        let moved = admit(
            &services,
            "web",
            &web.publish,
            &[parse("80:9090").unwrap()],
            &[rm("80")],
        )
        .unwrap();
        assert_eq!(
            moved,
            [parse("81:8081").unwrap(), parse("80:9090").unwrap()]
        );
        for (add, remove, why) in [
            (vec!["80:1"], vec![], "already published by service web"),
            (vec![], vec!["82"], "service web does not publish 82/tcp"),
            (vec![], vec!["80/udp"], "does not publish 80/udp"),
            (vec![], vec!["80:1"], "does not publish *:80->1/tcp"),
            (vec![], vec!["80", "80"], "80/tcp is given twice"),
        ] {
            let add: Vec<Publish> = add.iter().map(|s| parse(s).unwrap()).collect();
            let remove: Vec<Unpublish> = remove.iter().map(|s| rm(s)).collect();
            let refusal = admit(&services, "web", &web.publish, &add, &remove)
                .expect_err(why)
                .to_string();
            assert!(refusal.contains(why), "{refusal}");
        }
    }

    /// The spec a user would type for `p`.
    fn spec(p: &Publish) -> String {
        let mut spec = match (p.mode, p.addr) {
            (PublishMode::Host, _) => format!(
                "mode=host,published={},target={},protocol={}",
                p.published, p.target, p.protocol
            ),
            (PublishMode::Ingress, addr) => format!(
                "{}{}:{}/{}",
                addr.map_or(String::new(), |a| format!("{a}:")),
                p.published,
                p.target,
                p.protocol
            ),
        };
        if p.affinity == Affinity::ClientIp {
            spec.push_str(",affinity=client-ip");
        }
        if p.proxy.is_some() {
            spec.push_str(",proxy=v2");
        }
        spec
    }

    fn any_publish() -> impl Strategy<Value = Publish> {
        (
            1u16..,
            1u16..,
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(1u32..u32::MAX),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(published, target, udp, host, addr, sticky, proxy)| {
                let protocol = if udp {
                    PublishProtocol::Udp
                } else {
                    PublishProtocol::Tcp
                };
                Publish {
                    published,
                    target,
                    protocol,
                    mode: if host {
                        PublishMode::Host
                    } else {
                        PublishMode::Ingress
                    },
                    addr: addr.filter(|_| !host).map(Ipv4Addr::from),
                    affinity: if sticky {
                        Affinity::ClientIp
                    } else {
                        Affinity::None
                    },
                    proxy: (proxy && !udp).then_some(ProxyProtocol::V2),
                }
            })
    }

    proptest! {
        /// Every publish the rules allow can be typed, and reads back as itself.
        #[test]
        fn specs_read_back(p in any_publish()) {
            prop_assert_eq!(parse(&spec(&p)), Ok(p.clone()));
            let rm: Unpublish = p.port().parse().unwrap();
            prop_assert!(rm.matches(&p));
        }

        /// Parsing never panics, and what it accepts obeys the rules.
        #[test]
        fn any_text_parses_or_is_refused(text in "[0-9a-z.:/,=-]{0,40}") {
            if let Ok(p) = parse(&text) {
                prop_assert!(p.check().is_ok());
            }
            let _ = text.parse::<Unpublish>();
        }

        /// Whatever is admitted leaves no two overlapping ports in the cluster.
        #[test]
        fn admitted_ports_never_overlap(
            held in proptest::collection::vec(any_publish(), 0..6),
            add in proptest::collection::vec(any_publish(), 0..4),
        ) {
            let held: Vec<Publish> = held
                .into_iter()
                .map(|p| Publish { published: p.published % 4 + 1, ..p })
                .collect();
            let add: Vec<Publish> = add
                .into_iter()
                .map(|p| Publish { published: p.published % 4 + 1, ..p })
                .collect();
            let mut services = BTreeMap::new();
            for (i, p) in held.into_iter().enumerate() {
                let (name, mut s) = service(&format!("s{i}"), &[]);
                if admit(&services, &name, &[], std::slice::from_ref(&p), &[]).is_ok() {
                    s.publish.push(p);
                    services.insert(name, s);
                }
            }
            if let Ok(got) = admit(&services, "new", &[], &add, &[]) {
                let (name, mut s) = service("new", &[]);
                s.publish = got;
                services.insert(name, s);
            }
            let all: Vec<&Publish> = services.values().flat_map(|s| &s.publish).collect();
            for (i, a) in all.iter().enumerate() {
                for b in &all[..i] {
                    prop_assert!(!a.overlaps(b), "{a} and {b}");
                }
            }
        }
    }
}
