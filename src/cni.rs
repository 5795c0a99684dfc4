//! The plugin's side of the Container Network Interface (CNI spec 1.0, and GC and STATUS of
//! 1.1): what a runtime passes in the environment and on stdin, and the results and errors it
//! reads back. Pure: the `overlayd-cni` binary (`src/bin/overlayd-cni.rs`) reads the input,
//! names the namespace, asks the daemon and prints what this module builds.
//!
//! CNI names an attachment by its network, container id and interface. Here each attachment is
//! also a network namespace *name* under /run/netns, derived from those three
//! ([`netns_name`]) and bound to the runtime's namespace while the attachment lives. The daemon
//! attaches names, so a runtime's container is attached, detached, restored after a restart and
//! named in DNS like any other, and a DEL finds its attachment without the runtime's namespace
//! (which may be gone by then).

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::api::{self, Attachment};
use crate::model::{check_ifname, check_name};

/// The spec versions whose configuration this plugin reads and whose results it writes.
pub const VERSIONS: [&str; 2] = ["1.0.0", "1.1.0"];

/// CNI's error codes (the spec's "Error" section), and this plugin's own (100 and up).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const UNDECODABLE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot attach now (no daemon answers).
    pub const NOT_AVAILABLE: u32 = 50;
    /// CHECK: the container's interface is not as ADD left it.
    pub const NOT_AS_ATTACHED: u32 = 100;
}

/// A CNI error: printed as JSON on stdout, and the plugin exits non-zero.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct Error {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl Error {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Error {
        Error {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error as the runtime reads it, in the format of spec `version`.
    pub fn to_json(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// One attachment of a network: CNI's container id and interface name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub container_id: String,
    pub ifname: String,
}

/// ADD and CHECK: the attachment, and the runtime's network namespace (a path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    pub target: Target,
    pub netns: String,
    /// The container's name (`K8S_POD_NAME` in `CNI_ARGS`, which podman sets), if it is one
    /// the cluster's DNS can answer for: it becomes the container's alias.
    pub container_name: Option<String>,
}

/// What the runtime asks (`CNI_COMMAND`), with what that command needs from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Add(Sandbox),
    Check(Sandbox),
    /// The runtime's namespace is not needed, and may be gone.
    Del(Target),
    Gc,
    Status,
    Version,
}

impl Command {
    /// Reads the command from the environment through `var` (an unset or empty variable is
    /// `None`).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Command, Error> {
        let required = |name: &str| {
            var(name).filter(|v| !v.is_empty()).ok_or_else(|| {
                Error::new(
                    code::INVALID_ENVIRONMENT,
                    format!("{name} is not set"),
                    "the runtime must set it for this command (CNI spec: Parameters)",
                )
            })
        };
        let target = || -> Result<Target, Error> {
            let ifname = required("CNI_IFNAME")?;
            check_ifname(&ifname).map_err(|why| {
                Error::new(code::INVALID_ENVIRONMENT, "CNI_IFNAME is invalid", why)
            })?;
            Ok(Target {
                container_id: required("CNI_CONTAINERID")?,
                ifname,
            })
        };
        let sandbox = || -> Result<Sandbox, Error> {
            Ok(Sandbox {
                target: target()?,
                netns: required("CNI_NETNS")?,
                container_name: container_name(&var("CNI_ARGS").unwrap_or_default())?,
            })
        };
        match required("CNI_COMMAND")?.as_str() {
            "ADD" => Ok(Command::Add(sandbox()?)),
            "CHECK" => Ok(Command::Check(sandbox()?)),
            "DEL" => Ok(Command::Del(target()?)),
            "GC" => Ok(Command::Gc),
            "STATUS" => Ok(Command::Status),
            "VERSION" => Ok(Command::Version),
            other => Err(Error::new(
                code::INVALID_ENVIRONMENT,
                format!("CNI_COMMAND {other:?} is not a CNI command"),
                "this plugin knows ADD, DEL, CHECK, GC, STATUS and VERSION",
            )),
        }
    }
}

/// The container's name from `CNI_ARGS` (`K1=V1;K2=V2`), if it can be a DNS name. Arguments
/// the plugin does not know are refused unless `IgnoreUnknown` is set, as CNI's conventions ask.
fn container_name(args: &str) -> Result<Option<String>, Error> {
    let (mut ignore_unknown, mut name, mut unknown) = (false, None, Vec::new());
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(|| {
            Error::new(
                code::INVALID_ENVIRONMENT,
                "CNI_ARGS is malformed",
                format!("{pair:?} is not KEY=VALUE"),
            )
        })?;
        match key {
            "IgnoreUnknown" => {
                ignore_unknown = matches!(value.to_ascii_lowercase().as_str(), "1" | "true")
            }
            "K8S_POD_NAME" => name = Some(value.to_string()),
            _ => unknown.push(key),
        }
    }
    if !ignore_unknown && !unknown.is_empty() {
        return Err(Error::new(
            code::INVALID_ENVIRONMENT,
            "CNI_ARGS has arguments this plugin does not know",
            format!(
                "{}: add IgnoreUnknown=1 to pass them anyway",
                unknown.join(", ")
            ),
        ));
    }
    Ok(name.filter(|n| check_name(n).is_ok()))
}

/// The plugin's entry in the network configuration (stdin), with what the runtime added.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The spec version of the configuration, and of what the plugin answers.
    pub version: String,
    /// The runtime's name for the network (the configuration's `name`).
    pub name: String,
    /// The overlayd network to attach to (`network`).
    pub network: String,
    /// Attach as a task of this service (`service`, optional).
    pub service: Option<String>,
    /// The daemon's API socket (`socket`, optional).
    pub socket: PathBuf,
    /// ADD's result, which CHECK compares with what it finds (`prevResult`).
    pub prev_result: Option<Value>,
    /// GC: the attachments the runtime still uses (`cni.dev/valid-attachments`); every other
    /// one of this network goes.
    pub valid_attachments: Vec<Target>,
}

impl Config {
    /// Parses the configuration the runtime passed on stdin.
    pub fn parse(stdin: &[u8]) -> Result<Config, Error> {
        let v: Value = serde_json::from_slice(stdin).map_err(|e| {
            Error::new(
                code::UNDECODABLE,
                "the network configuration on stdin is not JSON",
                e.to_string(),
            )
        })?;
        let version = string(&v, "cniVersion")?.ok_or_else(|| missing("cniVersion"))?;
        if !VERSIONS.contains(&version.as_str()) {
            return Err(Error::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {version} is not supported"),
                format!("overlayd-cni speaks {}", VERSIONS.join(", ")),
            ));
        }
        if let Some(ipam) = v.get("ipam") {
            return Err(Error::new(
                code::UNSUPPORTED_FIELD,
                format!("unsupported field \"ipam\": {ipam}"),
                "overlayd's registry chooses every address: remove the ipam section",
            ));
        }
        Ok(Config {
            name: string(&v, "name")?.ok_or_else(|| missing("name"))?,
            network: string(&v, "network")?.ok_or_else(|| missing("network"))?,
            service: string(&v, "service")?,
            socket: string(&v, "socket")?
                .unwrap_or_else(|| api::DEFAULT_SOCKET.to_string())
                .into(),
            prev_result: v.get("prevResult").cloned(),
            valid_attachments: valid_attachments(&v)?,
            version,
        })
    }
}

/// `key` of the configuration, if it is there; an error if it is there but not a string.
fn string(v: &Value, key: &str) -> Result<Option<String>, Error> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(other) => Err(Error::new(
            code::INVALID_CONFIG,
            format!("\"{key}\" must be a non-empty string"),
            format!("it is {other}"),
        )),
    }
}

fn missing(key: &str) -> Error {
    Error::new(
        code::INVALID_CONFIG,
        format!("the network configuration has no \"{key}\""),
        "overlayd-cni needs \"cniVersion\", \"name\" and \"network\" (the overlayd network); \"service\" and \"socket\" are optional",
    )
}

fn valid_attachments(v: &Value) -> Result<Vec<Target>, Error> {
    let Some(list) = v.get("cni.dev/valid-attachments") else {
        return Ok(Vec::new());
    };
    let bad = || {
        Error::new(
            code::INVALID_CONFIG,
            "\"cni.dev/valid-attachments\" is malformed",
            format!("want a list of {{\"containerID\": ..., \"ifname\": ...}}, got {list}"),
        )
    };
    list.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|a| {
            Ok(Target {
                container_id: a["containerID"].as_str().ok_or_else(bad)?.to_string(),
                ifname: a["ifname"].as_str().ok_or_else(bad)?.to_string(),
            })
        })
        .collect()
}

/// The spec version to answer in: the configuration's, if this plugin speaks it (also in an
/// error about the rest of it), else the oldest it speaks.
pub fn answer_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
        .filter(|v| VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| VERSIONS[0].to_string())
}

/// VERSION's answer.
pub fn version_info(version: &str) -> Value {
    json!({"cniVersion": version, "supportedVersions": VERSIONS})
}

/// Namespace names of the attachments of network `network` (the runtime's name) start with
/// this: GC takes only its own network's.
pub fn netns_prefix(network: &str) -> String {
    format!("ovc-{}-", &digest(&[network])[..6])
}

/// The network namespace name of an attachment: short (it is also the container's DNS name),
/// the same for every command about the attachment, and distinct across networks, containers
/// and interfaces.
pub fn netns_name(network: &str, target: &Target) -> String {
    let attachment = digest(&[network, &target.container_id, &target.ifname]);
    format!("{}{}", netns_prefix(network), &attachment[..10])
}

fn digest(parts: &[&str]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    hex::encode(hash.finalize())
}

/// GC: of the namespace names `present` (under /run/netns), those of network `network` that
/// no valid attachment has.
pub fn stale(network: &str, valid: &[Target], present: &[String]) -> Vec<String> {
    let prefix = netns_prefix(network);
    let keep: BTreeSet<String> = valid.iter().map(|t| netns_name(network, t)).collect();
    present
        .iter()
        .filter(|name| name.starts_with(&prefix) && !keep.contains(*name))
        .cloned()
        .collect()
}

/// ADD's result: the container's interface with its MAC, its address with the gateway, the
/// default route if the attach made it, and the gateway as DNS server (each node answers DNS
/// on its networks' gateway).
pub fn add_result(version: &str, sandbox: &str, a: &Attachment) -> Value {
    let gateway = a.gateway.to_string();
    let routes: Vec<Value> = if a.default_route {
        vec![json!({"dst": "0.0.0.0/0", "gw": gateway})]
    } else {
        Vec::new()
    };
    json!({
        "cniVersion": version,
        "interfaces": [{"name": a.ifname, "mac": a.mac, "sandbox": sandbox}],
        "ips": [{
            "address": format!("{}/{}", a.ip, a.subnet.prefix()),
            "gateway": gateway,
            "interface": 0,
        }],
        "routes": routes,
        "dns": {"nameservers": [gateway]},
    })
}

/// What CHECK expects of the container's interface, taken from ADD's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub mac: String,
    /// `ADDRESS/PREFIX`, as ADD reported them.
    pub addresses: Vec<String>,
}

/// The interface `ifname` of `prev_result` (ADD's result) and the addresses on it.
pub fn expected(prev_result: Option<&Value>, ifname: &str) -> Result<Expected, Error> {
    let bad = |why: String| Error::new(code::INVALID_CONFIG, "prevResult is unusable", why);
    let prev = prev_result.ok_or_else(|| bad("CHECK needs ADD's result as prevResult".into()))?;
    let interfaces = prev["interfaces"].as_array().cloned().unwrap_or_default();
    let index = interfaces
        .iter()
        .position(|i| i["name"] == ifname && i["sandbox"].is_string())
        .ok_or_else(|| bad(format!("it lists no interface {ifname} in a sandbox")))?;
    let mac = interfaces[index]["mac"]
        .as_str()
        .ok_or_else(|| bad(format!("interface {ifname} has no mac")))?
        .to_ascii_lowercase();
    let addresses = prev["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|ip| ip["interface"].as_u64() == Some(index as u64))
        .filter_map(|ip| ip["address"].as_str().map(str::to_string))
        .collect();
    Ok(Expected { mac, addresses })
}

/// CHECK: whether the container's interface, as `ip -j addr show dev IFNAME` printed it in the
/// container's namespace, has the MAC and every address ADD gave it.
pub fn check_link(expected: &Expected, ip_json: &Value) -> Result<(), Error> {
    let differs = |why: String| {
        Error::new(
            code::NOT_AS_ATTACHED,
            "the container's interface is not as ADD left it",
            why,
        )
    };
    let link = &ip_json[0];
    let mac = link["address"].as_str().unwrap_or_default();
    if !mac.eq_ignore_ascii_case(&expected.mac) {
        return Err(differs(format!("its MAC is {mac:?}, not {}", expected.mac)));
    }
    let present: BTreeSet<String> = link["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| {
            Some(format!(
                "{}/{}",
                a["local"].as_str()?,
                a["prefixlen"].as_u64()?
            ))
        })
        .collect();
    match expected.addresses.iter().find(|a| !present.contains(*a)) {
        Some(gone) => Err(differs(format!("it lacks {gone}"))),
        None => Ok(()),
    }
}

/// The daemon's answer to `doing`, or the CNI error it comes to: no daemon answering is worth
/// a retry (11); a refusal (the request was wrong: an unknown network or service, a name in
/// use) is the configuration's (7); any other failure is an I/O failure (5). Nothing was
/// changed in the last two.
pub fn daemon_reply(doing: &str, reply: anyhow::Result<api::Reply>) -> Result<Value, Error> {
    match reply {
        Err(err) => Err(Error::new(
            code::TRY_AGAIN_LATER,
            format!("{doing}: overlayd did not answer"),
            format!("{err:#}"),
        )),
        Ok(Err(failure)) => Err(Error::new(
            if failure.usage {
                code::INVALID_CONFIG
            } else {
                code::IO_FAILURE
            },
            format!("{doing}: overlayd refused"),
            failure.message,
        )),
        Ok(Ok(value)) => Ok(value),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    use super::*;
    use crate::api::Failure;

    fn env(pairs: &[(&str, &str)]) -> Result<Command, Error> {
        let vars: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Command::from_env(|name| vars.get(name).cloned())
    }

    const ADD: [(&str, &str); 5] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", "/run/netns/cni-1"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=web-1",
        ),
    ];

    fn target(container_id: &str, ifname: &str) -> Target {
        Target {
            container_id: container_id.into(),
            ifname: ifname.into(),
        }
    }

    #[test]
    fn add_takes_the_attachment_the_namespace_and_the_container_name() {
        assert_eq!(
            env(&ADD),
            Ok(Command::Add(Sandbox {
                target: target("c0ffee", "eth0"),
                netns: "/run/netns/cni-1".into(),
                container_name: Some("web-1".into()),
            }))
        );
    }

    #[test]
    fn a_missing_or_bad_variable_is_an_environment_error_naming_it() {
        for gone in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            let pairs: Vec<_> = ADD.into_iter().filter(|(k, _)| *k != gone).collect();
            let err = env(&pairs).unwrap_err();
            assert_eq!(err.code, code::INVALID_ENVIRONMENT, "{gone}");
            assert!(err.msg.contains(gone), "{gone}: {err}");
            // Set but empty is the same as unset.
            let mut pairs = ADD.to_vec();
            pairs.retain(|(k, _)| *k != gone);
            pairs.push((gone, ""));
            assert_eq!(env(&pairs).unwrap_err().code, code::INVALID_ENVIRONMENT);
        }
        let with = |key, value| {
            let mut pairs: Vec<_> = ADD.into_iter().filter(|(k, _)| *k != key).collect();
            pairs.push((key, value));
            env(&pairs).unwrap_err()
        };
        assert!(with("CNI_COMMAND", "ATTACH").msg.contains("ATTACH"));
        assert!(with("CNI_IFNAME", "eth0/1").msg.contains("CNI_IFNAME"));
        assert!(
            with("CNI_ARGS", "K8S_POD_NAME")
                .details
                .contains("KEY=VALUE")
        );
        let unknown = with("CNI_ARGS", "FOO=1;K8S_POD_NAME=a");
        assert_eq!(unknown.code, code::INVALID_ENVIRONMENT);
        assert!(unknown.details.contains("FOO"), "{unknown}");
    }

    #[test]
    fn del_needs_no_namespace_and_the_others_need_only_the_command() {
        let del = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c0ffee"),
            ("CNI_IFNAME", "eth0"),
        ];
        assert_eq!(env(&del), Ok(Command::Del(target("c0ffee", "eth0"))));
        for (command, want) in [
            ("GC", Command::Gc),
            ("STATUS", Command::Status),
            ("VERSION", Command::Version),
        ] {
            assert_eq!(env(&[("CNI_COMMAND", command)]), Ok(want));
        }
    }

    #[test]
    fn a_container_name_the_dns_cannot_carry_is_left_out() {
        assert_eq!(container_name("K8S_POD_NAME=-bad"), Ok(None));
        assert_eq!(container_name(""), Ok(None));
        assert_eq!(
            container_name("K8S_POD_NAME=a_b.c;IgnoreUnknown=true;X=1"),
            Ok(Some("a_b.c".into()))
        );
    }

    #[test]
    fn config_keys_are_read_with_defaults() {
        let c = Config::parse(
            br#"{"cniVersion": "1.0.0", "name": "pods", "type": "overlayd-cni", "network": "app"}"#,
        )
        .unwrap();
        assert_eq!(
            (c.name.as_str(), c.network.as_str(), c.service, c.socket),
            ("pods", "app", None, api::DEFAULT_SOCKET.into())
        );
        let c = Config::parse(
            br#"{"cniVersion": "1.1.0", "name": "pods", "network": "app", "service": "web",
                 "socket": "/tmp/o.sock", "cni.dev/valid-attachments":
                 [{"containerID": "a", "ifname": "eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(c.service.as_deref(), Some("web"));
        assert_eq!(c.socket, PathBuf::from("/tmp/o.sock"));
        assert_eq!(c.valid_attachments, [target("a", "eth0")]);
    }

    #[test]
    fn a_bad_config_gets_the_specs_code() {
        let code_of = |text: &str| Config::parse(text.as_bytes()).unwrap_err().code;
        assert_eq!(code_of("{"), code::UNDECODABLE);
        assert_eq!(
            code_of(r#"{"name": "p", "network": "a"}"#),
            code::INVALID_CONFIG
        );
        assert_eq!(
            code_of(r#"{"cniVersion": "0.4.0", "name": "p", "network": "a"}"#),
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(
            code_of(r#"{"cniVersion": "1.0.0", "name": "p"}"#),
            code::INVALID_CONFIG
        );
        assert_eq!(
            code_of(r#"{"cniVersion": "1.0.0", "name": "p", "network": 7}"#),
            code::INVALID_CONFIG
        );
        assert_eq!(
            code_of(r#"{"cniVersion": "1.0.0", "name": "p", "network": "a", "ipam": {}}"#),
            code::UNSUPPORTED_FIELD
        );
        assert_eq!(
            code_of(
                r#"{"cniVersion": "1.1.0", "name": "p", "network": "a", "cni.dev/valid-attachments": [{"ifname": "e"}]}"#
            ),
            code::INVALID_CONFIG
        );
    }

    #[test]
    fn answers_come_in_the_configurations_version_if_spoken() {
        assert_eq!(answer_version(br#"{"cniVersion": "1.1.0"}"#), "1.1.0");
        assert_eq!(answer_version(br#"{"cniVersion": "0.3.1"}"#), "1.0.0");
        assert_eq!(answer_version(b"not json"), "1.0.0");
        assert_eq!(
            version_info("1.0.0"),
            json!({"cniVersion": "1.0.0", "supportedVersions": ["1.0.0", "1.1.0"]})
        );
        let err = Error::new(code::INVALID_CONFIG, "m", "d");
        assert_eq!(
            err.to_json("1.0.0"),
            json!({"cniVersion": "1.0.0", "code": 7, "msg": "m", "details": "d"})
        );
    }

    #[test]
    fn every_attachment_has_its_own_short_name_under_its_networks_prefix() {
        let a = netns_name("pods", &target("c1", "eth0"));
        assert_eq!(a, netns_name("pods", &target("c1", "eth0")), "stable");
        assert!(a.starts_with(&netns_prefix("pods")) && a.len() == 21, "{a}");
        assert!(check_name(&a).is_ok(), "a DNS name: {a}");
        let others = [
            netns_name("pods", &target("c2", "eth0")),
            netns_name("pods", &target("c1", "eth1")),
            netns_name("other", &target("c1", "eth0")),
        ];
        assert!(!others.contains(&a), "{a} {others:?}");
        assert!(!others[2].starts_with(&netns_prefix("pods")));
    }

    #[test]
    fn gc_takes_only_its_own_networks_names_that_no_valid_attachment_has() {
        let valid = [target("c1", "eth0")];
        let present = [
            netns_name("pods", &target("c1", "eth0")),
            netns_name("pods", &target("c2", "eth0")),
            netns_name("other", &target("c3", "eth0")),
            "cni-1234".to_string(),
        ];
        assert_eq!(stale("pods", &valid, &present), [present[1].clone()]);
        assert_eq!(stale("pods", &[], &present), present[..2]);
    }

    fn attachment(default_route: bool) -> Attachment {
        Attachment {
            netns: "ovc-x".into(),
            network: "app".into(),
            ip: Ipv4Addr::new(198, 19, 7, 5),
            mac: "02:42:c6:13:07:05".into(),
            node: "n1".into(),
            ifname: "eth0".into(),
            subnet: "198.19.7.0/24".parse().unwrap(),
            gateway: Ipv4Addr::new(198, 19, 7, 1),
            default_route,
        }
    }

    #[test]
    fn the_result_has_the_interface_its_address_gateway_route_and_dns() {
        assert_eq!(
            add_result("1.0.0", "/run/netns/cni-1", &attachment(true)),
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "mac": "02:42:c6:13:07:05", "sandbox": "/run/netns/cni-1"}],
                "ips": [{"address": "198.19.7.5/24", "gateway": "198.19.7.1", "interface": 0}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "198.19.7.1"}],
                "dns": {"nameservers": ["198.19.7.1"]},
            })
        );
        let second_network = add_result("1.0.0", "/run/netns/cni-1", &attachment(false));
        assert_eq!(second_network["routes"], json!([]));
    }

    #[test]
    fn check_compares_the_interface_with_adds_result() {
        let prev = add_result("1.0.0", "/run/netns/cni-1", &attachment(true));
        let want = expected(Some(&prev), "eth0").unwrap();
        assert_eq!(
            want,
            Expected {
                mac: "02:42:c6:13:07:05".into(),
                addresses: vec!["198.19.7.5/24".into()],
            }
        );
        assert_eq!(
            expected(Some(&prev), "eth1").unwrap_err().code,
            code::INVALID_CONFIG
        );
        assert_eq!(
            expected(None, "eth0").unwrap_err().code,
            code::INVALID_CONFIG
        );

        let link = |mac: &str, local: &str| {
            json!([{"ifname": "eth0", "address": mac, "addr_info": [
                {"family": "inet", "local": local, "prefixlen": 24},
                {"family": "inet6", "local": "fe80::42:c6ff:fe13:705", "prefixlen": 64},
            ]}])
        };
        assert_eq!(
            check_link(&want, &link("02:42:C6:13:07:05", "198.19.7.5")),
            Ok(())
        );
        for (mac, local) in [
            ("02:42:c6:13:07:06", "198.19.7.5"),
            ("02:42:c6:13:07:05", "198.19.7.6"),
        ] {
            assert_eq!(
                check_link(&want, &link(mac, local)).unwrap_err().code,
                code::NOT_AS_ATTACHED
            );
        }
        assert!(check_link(&want, &json!([])).is_err(), "no such link");
    }

    #[test]
    fn daemon_failures_map_to_cni_codes() {
        let code_of = |reply| daemon_reply("attaching", reply).unwrap_err().code;
        assert_eq!(
            code_of(Err(anyhow::anyhow!("connection refused"))),
            code::TRY_AGAIN_LATER
        );
        assert_eq!(
            code_of(Ok(Err(Failure::usage("network x not found")))),
            code::INVALID_CONFIG
        );
        assert_eq!(
            code_of(Ok(Err(Failure::runtime("`ip` failed")))),
            code::IO_FAILURE
        );
        assert_eq!(daemon_reply("x", Ok(Ok(json!(1)))), Ok(json!(1)));
    }
}
