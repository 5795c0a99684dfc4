//! Docker's remote network driver and IPAM driver protocols (libnetwork `docs/remote.md` and
//! `docs/ipam.md`), as pure functions: a request's method and JSON body become either an
//! answer at once or an [`Action`] the daemon carries out (`src/daemon/docker_plugin.rs`), and
//! an answer becomes the JSON Docker expects. No sockets here.
//!
//! How Docker's objects map to overlayd's:
//! - A Docker network of driver `overlayd` must use IPAM driver `overlayd` too: the registry
//!   hands out every address, so Docker's own IPAM would collide with it. Its one IPv4 pool is
//!   the overlayd network's subnet; the pool id is the subnet itself.
//! - The gateway Docker asks for is overlayd's anycast gateway (the subnet's first address).
//! - A container's address is allocated in the registry when Docker asks for it
//!   (`RequestAddress`), before Docker says anything about the container; the endpoint's
//!   driver option `overlayd.service` then makes it a task of that service (`CreateEndpoint`).
//! - `Join` makes the veth pair; Docker moves the container end into the container.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::model::{self, Endpoint};

/// The driver's name, and the name of its socket under `/run/docker/plugins`.
pub const DRIVER: &str = "overlayd";
/// The address space of every pool (Docker shows it in `docker network inspect`).
pub const ADDRESS_SPACE: &str = "overlayd";
/// Endpoint driver option: the endpoint's container becomes a task of this service.
pub const SERVICE_OPTION: &str = "overlayd.service";
/// Network driver option: the overlayd network's name, when one is created.
pub const NETWORK_OPTION: &str = "overlayd.network";
/// Network driver option (as Docker's own overlay driver spells it): an encrypted network.
pub const ENCRYPTED_OPTION: &str = "encrypted";
/// How libnetwork passes `docker network create -o KEY=VALUE`.
const GENERIC: &str = "com.docker.network.generic";
const INTERNAL: &str = "com.docker.network.internal";
const IPV6: &str = "com.docker.network.enable_ipv6";
/// `RequestAddress` option that marks the request for the network's gateway.
const ADDRESS_TYPE: &str = "RequestAddressType";
const GATEWAY_TYPE: &str = "com.docker.network.gateway";

/// Which of the plugin's protocols a method belongs to: they spell errors differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// `Plugin.*` and `NetworkDriver.*`: errors are `{"Err": ...}`.
    Network,
    /// `IpamDriver.*`: errors are `{"Error": ...}`.
    Ipam,
}

impl Protocol {
    /// The protocol of `method` (the URL path without its `/`), known or not.
    pub fn of(method: &str) -> Protocol {
        if method.starts_with("IpamDriver.") {
            Protocol::Ipam
        } else {
            Protocol::Network
        }
    }
}

/// Why a request got no answer.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No such method: HTTP 404, which Docker takes for "not implemented".
    #[error("unknown method {0}")]
    Unknown(String),
    /// The body is not the request the method takes: HTTP 400.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// Understood, but overlayd will not do it; the message says what to change.
    #[error("{0}")]
    Refused(String),
}

/// A request that needs the daemon: the cluster's state, the registry or the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A container's address in the network of `subnet`: `ip`, or the lowest free one.
    Allocate {
        subnet: Ipv4Network,
        ip: Option<Ipv4Addr>,
    },
    /// Gives a container's address back.
    Release {
        subnet: Ipv4Network,
        ip: Ipv4Addr,
    },
    CreateNetwork(NetworkSpec),
    DeleteNetwork {
        docker_network: String,
    },
    CreateEndpoint(EndpointSpec),
    /// Makes the endpoint's veth pair and announces it to the cluster.
    Join(EndpointRef),
    /// Takes the endpoint out of the cluster and removes its veth pair.
    Leave(EndpointRef),
    DeleteEndpoint(EndpointRef),
}

/// A Docker network to map to an overlayd network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkSpec {
    pub docker_network: String,
    pub subnet: Ipv4Network,
    /// The name for a network overlayd makes (`-o overlayd.network=NAME`).
    pub name: Option<String>,
    pub internal: bool,
    pub encrypted: bool,
}

impl NetworkSpec {
    /// The name of the overlayd network made for this Docker network: the one asked for, else
    /// `docker-` and the first 12 digits of the Docker network's id (what `docker network ls`
    /// shows). Docker does not tell a driver the network's own name.
    pub fn overlayd_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("docker-{}", short(&self.docker_network)))
    }
}

/// A Docker endpoint: a container's place on a network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointRef {
    pub docker_network: String,
    pub endpoint: String,
}

impl EndpointRef {
    /// The name overlayd knows the container by (its DNS name, `service ps`'s container):
    /// `docker-` and the first 12 digits of the endpoint id. Docker tells a driver neither the
    /// container's name nor its id; `docker network inspect` lists the endpoint ids.
    pub fn container_name(&self) -> String {
        format!("docker-{}", short(&self.endpoint))
    }
}

/// A new endpoint: its address (from [`Action::Allocate`]) and the service it is a task of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub at: EndpointRef,
    pub ip: Ipv4Addr,
    pub service: Option<String>,
    /// Whether Docker left the MAC to the driver (it then takes the one answered).
    pub mac_wanted: bool,
}

/// What the plugin answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// `{}`.
    Empty,
    Manifest,
    Capabilities,
    IpamCapabilities,
    AddressSpaces,
    Pool(Ipv4Network),
    /// An address with its network's prefix length.
    Address(Ipv4Network),
    /// `CreateEndpoint`: the MAC overlayd derives from the address, if Docker left it open.
    Interface {
        mac: Option<String>,
    },
    OperInfo,
    /// `Join`: the interface Docker moves into the container, and its gateway.
    Join {
        src: String,
        gateway: Ipv4Addr,
    },
}

/// What to do with a request: answer at once, or have the daemon act.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Done(Answer),
    Act(Action),
}

/// Parses `method` (the URL path without its `/`) and its JSON body.
pub fn parse(method: &str, body: &[u8]) -> Result<Step, Refusal> {
    let step = match method {
        "Plugin.Activate" => Step::Done(Answer::Manifest),
        "NetworkDriver.GetCapabilities" => Step::Done(Answer::Capabilities),
        "IpamDriver.GetCapabilities" => Step::Done(Answer::IpamCapabilities),
        "IpamDriver.GetDefaultAddressSpaces" => Step::Done(Answer::AddressSpaces),
        "IpamDriver.RequestPool" => request_pool(decode(body)?)?,
        "IpamDriver.ReleasePool" => Step::Done(Answer::Empty),
        "IpamDriver.RequestAddress" => request_address(decode(body)?)?,
        "IpamDriver.ReleaseAddress" => release_address(decode(body)?)?,
        "NetworkDriver.CreateNetwork" => create_network(decode(body)?)?,
        "NetworkDriver.DeleteNetwork" => {
            let r: NetworkRequest = decode(body)?;
            Step::Act(Action::DeleteNetwork {
                docker_network: r.network_id,
            })
        }
        "NetworkDriver.CreateEndpoint" => create_endpoint(decode(body)?)?,
        "NetworkDriver.Join" => Step::Act(Action::Join(endpoint(body)?)),
        "NetworkDriver.Leave" => Step::Act(Action::Leave(endpoint(body)?)),
        "NetworkDriver.DeleteEndpoint" => Step::Act(Action::DeleteEndpoint(endpoint(body)?)),
        "NetworkDriver.EndpointOperInfo" => Step::Done(Answer::OperInfo),
        // Nothing to do: overlayd learns its members from its own gossip, and containers reach
        // outside through their node's egress rules, not through per-endpoint programming.
        "NetworkDriver.DiscoverNew"
        | "NetworkDriver.DiscoverDelete"
        | "NetworkDriver.ProgramExternalConnectivity"
        | "NetworkDriver.RevokeExternalConnectivity" => Step::Done(Answer::Empty),
        other => return Err(Refusal::Unknown(other.to_string())),
    };
    Ok(step)
}

/// The HTTP status and JSON body of an answer, or of the reason there is none.
pub fn respond(protocol: Protocol, result: Result<Answer, Refusal>) -> (u16, Value) {
    match result {
        Ok(answer) => (200, answer_json(answer)),
        Err(refusal) => {
            let status = match refusal {
                Refusal::Unknown(_) => 404,
                Refusal::Malformed(_) => 400,
                Refusal::Refused(_) => 200,
            };
            let key = match protocol {
                Protocol::Ipam => "Error",
                Protocol::Network => "Err",
            };
            (status, json!({ key: refusal.to_string() }))
        }
    }
}

fn answer_json(answer: Answer) -> Value {
    match answer {
        Answer::Empty => json!({}),
        Answer::Manifest => json!({"Implements": ["NetworkDriver", "IpamDriver"]}),
        // Each node's daemon serves its own engine: Docker keeps a network's record per engine
        // ("local"), while its containers reach every node ("global" connectivity). Scope
        // "global" would need Docker's swarm-mode store, which overlayd replaces.
        Answer::Capabilities => json!({"Scope": "local", "ConnectivityScope": "global"}),
        Answer::IpamCapabilities => {
            json!({"RequiresMACAddress": false, "RequiresRequestReplay": false})
        }
        Answer::AddressSpaces => json!({
            "LocalDefaultAddressSpace": ADDRESS_SPACE,
            "GlobalDefaultAddressSpace": ADDRESS_SPACE,
        }),
        Answer::Pool(subnet) => {
            json!({"PoolID": subnet.to_string(), "Pool": subnet.to_string(), "Data": {}})
        }
        Answer::Address(addr) => json!({"Address": addr.to_string(), "Data": {}}),
        Answer::Interface { mac: Some(mac) } => json!({"Interface": {"MacAddress": mac}}),
        Answer::Interface { mac: None } => json!({}),
        Answer::OperInfo => json!({"Value": {}}),
        Answer::Join { src, gateway } => json!({
            "InterfaceName": {"SrcName": src, "DstPrefix": "eth"},
            "Gateway": gateway.to_string(),
        }),
    }
}

fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| Refusal::Malformed(e.to_string()))
}

fn refused(message: impl Into<String>) -> Refusal {
    Refusal::Refused(message.into())
}

/// The first 12 characters of a Docker id (ids are 64 hex digits; shorter ones are kept whole).
fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PoolRequest {
    #[serde(default)]
    pool: String,
    #[serde(default)]
    sub_pool: String,
    #[serde(default, rename = "V6")]
    v6: bool,
}

fn request_pool(r: PoolRequest) -> Result<Step, Refusal> {
    if r.v6 {
        return Err(refused(
            "overlayd networks are IPv4 only: leave --ipv6 out of `docker network create`",
        ));
    }
    if r.pool.is_empty() {
        return Err(refused(
            "overlayd needs the network's subnet: pass --subnet to `docker network create`",
        ));
    }
    if !r.sub_pool.is_empty() {
        return Err(refused(
            "overlayd hands out addresses from the whole subnet: leave --ip-range out",
        ));
    }
    Ok(Step::Done(Answer::Pool(pool(&r.pool)?)))
}

/// A pool id or pool: an IPv4 subnet overlayd accepts for a network.
fn pool(text: &str) -> Result<Ipv4Network, Refusal> {
    let subnet: Ipv4Network = text
        .parse()
        .map_err(|e| refused(format!("subnet {text:?}: {e}")))?;
    crate::ipam::check_subnet(subnet).map_err(|e| refused(e.to_string()))?;
    Ok(subnet)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AddressRequest {
    #[serde(rename = "PoolID")]
    pool_id: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    options: Option<BTreeMap<String, String>>,
}

fn request_address(r: AddressRequest) -> Result<Step, Refusal> {
    let subnet = pool(&r.pool_id)?;
    let want = address(&r.address)?;
    let gateway = model::gateway_of(subnet);
    let for_gateway = r
        .options
        .as_ref()
        .and_then(|o| o.get(ADDRESS_TYPE))
        .is_some_and(|t| t == GATEWAY_TYPE);
    if for_gateway {
        return match want {
            Some(ip) if ip != gateway => Err(refused(format!(
                "overlayd's gateway on {subnet} is {gateway}, the same on every node: leave --gateway out"
            ))),
            _ => Ok(Step::Done(Answer::Address(with_prefix(gateway, subnet)))),
        };
    }
    Ok(Step::Act(Action::Allocate { subnet, ip: want }))
}

fn release_address(r: AddressRequest) -> Result<Step, Refusal> {
    let subnet = pool(&r.pool_id)?;
    let ip = address(&r.address)?
        .ok_or_else(|| Refusal::Malformed("ReleaseAddress without an Address".into()))?;
    if ip == model::gateway_of(subnet) {
        return Ok(Step::Done(Answer::Empty));
    }
    Ok(Step::Act(Action::Release { subnet, ip }))
}

/// An address as Docker writes it: empty (none), bare, or with a prefix length.
fn address(text: &str) -> Result<Option<Ipv4Addr>, Refusal> {
    if text.is_empty() {
        return Ok(None);
    }
    let bare = text.split('/').next().unwrap_or(text);
    bare.parse()
        .map(Some)
        .map_err(|_| refused(format!("{text:?} is not an IPv4 address")))
}

/// `addr` in `subnet`, with the subnet's prefix length.
pub fn with_prefix(addr: Ipv4Addr, subnet: Ipv4Network) -> Ipv4Network {
    Ipv4Network::new(addr, subnet.prefix()).expect("the prefix of a valid subnet")
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NetworkRequest {
    #[serde(rename = "NetworkID")]
    network_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateNetworkRequest {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(default)]
    options: Option<BTreeMap<String, Value>>,
    #[serde(default, rename = "IPv4Data")]
    ipv4_data: Option<Vec<IpamData>>,
    #[serde(default, rename = "IPv6Data")]
    ipv6_data: Option<Vec<IpamData>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct IpamData {
    #[serde(default)]
    address_space: String,
    pool: String,
}

fn create_network(r: CreateNetworkRequest) -> Result<Step, Refusal> {
    let options = r.options.unwrap_or_default();
    if !r.ipv6_data.unwrap_or_default().is_empty() || options.get(IPV6) == Some(&Value::Bool(true))
    {
        return Err(refused(
            "overlayd networks are IPv4 only: leave --ipv6 out of `docker network create`",
        ));
    }
    let pools = r.ipv4_data.unwrap_or_default();
    let [data] = pools.as_slice() else {
        return Err(refused(format!(
            "an overlayd network has exactly one subnet, not {}: pass one --subnet",
            pools.len()
        )));
    };
    if data.address_space != ADDRESS_SPACE {
        return Err(refused(format!(
            "the network's addresses must come from overlayd: add `--ipam-driver {DRIVER}` to `docker network create`"
        )));
    }
    let subnet = pool(&data.pool)?;
    let generic = options.get(GENERIC).and_then(Value::as_object);
    let name = match generic.and_then(|g| g.get(NETWORK_OPTION)) {
        None => None,
        Some(Value::String(name)) => {
            model::check_name(name).map_err(|e| refused(e.to_string()))?;
            Some(name.clone())
        }
        Some(other) => {
            return Err(refused(format!(
                "-o {NETWORK_OPTION}={other} is not a name"
            )));
        }
    };
    Ok(Step::Act(Action::CreateNetwork(NetworkSpec {
        docker_network: r.network_id,
        subnet,
        name,
        internal: options.get(INTERNAL) == Some(&Value::Bool(true)),
        encrypted: generic.is_some_and(|g| g.contains_key(ENCRYPTED_OPTION)),
    })))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EndpointRequest {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(rename = "EndpointID")]
    endpoint_id: String,
}

fn endpoint(body: &[u8]) -> Result<EndpointRef, Refusal> {
    let r: EndpointRequest = decode(body)?;
    Ok(EndpointRef {
        docker_network: r.network_id,
        endpoint: r.endpoint_id,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateEndpointRequest {
    #[serde(flatten)]
    at: EndpointRequest,
    #[serde(default)]
    interface: Option<InterfaceRequest>,
    #[serde(default)]
    options: Option<BTreeMap<String, Value>>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InterfaceRequest {
    #[serde(default)]
    address: String,
    #[serde(default, rename = "AddressIPv6")]
    address_ipv6: String,
    #[serde(default)]
    mac_address: String,
}

fn create_endpoint(r: CreateEndpointRequest) -> Result<Step, Refusal> {
    let iface = r.interface.unwrap_or_default();
    if !iface.address_ipv6.is_empty() {
        return Err(refused("overlayd networks are IPv4 only"));
    }
    let ip = address(&iface.address)?.ok_or_else(|| {
        refused(format!(
            "the endpoint has no address: the network must use `--ipam-driver {DRIVER}`"
        ))
    })?;
    let mac = Endpoint::mac_for(ip);
    if !iface.mac_address.is_empty() && !iface.mac_address.eq_ignore_ascii_case(&mac) {
        return Err(refused(format!(
            "overlayd gives {ip} the MAC {mac} on every node: leave --mac-address out"
        )));
    }
    let service = match r.options.unwrap_or_default().remove(SERVICE_OPTION) {
        None => None,
        Some(Value::String(name)) => {
            model::check_name(&name).map_err(|e| refused(e.to_string()))?;
            Some(name)
        }
        Some(other) => {
            return Err(refused(format!(
                "--driver-opt {SERVICE_OPTION}={other} is not a service name"
            )));
        }
    };
    Ok(Step::Act(Action::CreateEndpoint(EndpointSpec {
        at: EndpointRef {
            docker_network: r.at.network_id,
            endpoint: r.at.endpoint_id,
        },
        ip,
        service,
        mac_wanted: iface.mac_address.is_empty(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET: &str = "4e9703ded6913994f48429e35e6aefd66da9cb7177a8dff2ed8bc4adf4e5a2ad";
    const EP: &str = "019ec028c3819dffdfa278e1140762df7b55f9a9378dcdc64fc929b575b0a1ae";

    fn step(method: &str, body: Value) -> Result<Step, Refusal> {
        parse(method, body.to_string().as_bytes())
    }

    fn subnet() -> Ipv4Network {
        "198.19.60.0/24".parse().unwrap()
    }

    fn at() -> EndpointRef {
        EndpointRef {
            docker_network: NET.into(),
            endpoint: EP.into(),
        }
    }

    fn refusal(result: Result<Step, Refusal>) -> String {
        match result {
            Err(Refusal::Refused(why)) => why,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn the_handshake_names_both_drivers_and_local_scope() {
        let method = "Plugin.Activate";
        let Ok(Step::Done(answer)) = parse(method, b"") else {
            panic!("no manifest");
        };
        assert_eq!(
            respond(Protocol::of(method), Ok(answer)),
            (200, json!({"Implements": ["NetworkDriver", "IpamDriver"]}))
        );
        let caps = answer_json(Answer::Capabilities);
        assert_eq!(caps["Scope"], "local");
        assert_eq!(
            answer_json(Answer::AddressSpaces)["LocalDefaultAddressSpace"],
            ADDRESS_SPACE
        );
    }

    // The bodies below are what Docker 20.10 sent, captured from a logging plugin.

    #[test]
    fn a_pool_is_its_subnet_and_the_gateway_is_overlayds() {
        let pool = json!({"AddressSpace": "overlayd", "Pool": "198.19.60.0/24", "SubPool": "", "Options": {}, "V6": false});
        assert_eq!(
            step("IpamDriver.RequestPool", pool),
            Ok(Step::Done(Answer::Pool(subnet())))
        );
        assert_eq!(
            answer_json(Answer::Pool(subnet())),
            json!({"PoolID": "198.19.60.0/24", "Pool": "198.19.60.0/24", "Data": {}})
        );
        let gateway = json!({"PoolID": "198.19.60.0/24", "Address": "", "Options": {"RequestAddressType": "com.docker.network.gateway"}});
        let answer = step("IpamDriver.RequestAddress", gateway).unwrap();
        assert_eq!(
            answer,
            Step::Done(Answer::Address("198.19.60.1/24".parse().unwrap()))
        );
        assert_eq!(
            answer_json(Answer::Address("198.19.60.1/24".parse().unwrap())),
            json!({"Address": "198.19.60.1/24", "Data": {}})
        );
        let other_gateway = json!({"PoolID": "198.19.60.0/24", "Address": "198.19.60.254", "Options": {"RequestAddressType": "com.docker.network.gateway"}});
        assert!(refusal(step("IpamDriver.RequestAddress", other_gateway)).contains("198.19.60.1"));
        let release_gateway = json!({"PoolID": "198.19.60.0/24", "Address": "198.19.60.1"});
        assert_eq!(
            step("IpamDriver.ReleaseAddress", release_gateway),
            Ok(Step::Done(Answer::Empty))
        );
    }

    #[test]
    fn pools_overlayd_cannot_serve_are_refused_with_what_to_change() {
        let pool = |p: &str, sub: &str, v6: bool| json!({"AddressSpace": "overlayd", "Pool": p, "SubPool": sub, "Options": null, "V6": v6});
        for (body, says) in [
            (pool("", "", false), "--subnet"),
            (
                pool("198.19.60.0/24", "198.19.60.128/25", false),
                "--ip-range",
            ),
            (pool("198.19.60.0/24", "", true), "IPv4 only"),
            (pool("198.19.60.5/24", "", false), "host bits"),
            (pool("198.19.60.0/30", "", false), "too small"),
            (pool("nonsense", "", false), "nonsense"),
        ] {
            let why = refusal(step("IpamDriver.RequestPool", body.clone()));
            assert!(why.contains(says), "{body}: {why}");
        }
    }

    #[test]
    fn a_container_address_is_the_registrys_to_allocate_and_release() {
        let any = json!({"PoolID": "198.19.60.0/24", "Address": "", "Options": null});
        assert_eq!(
            step("IpamDriver.RequestAddress", any),
            Ok(Step::Act(Action::Allocate {
                subnet: subnet(),
                ip: None
            }))
        );
        let given = json!({"PoolID": "198.19.60.0/24", "Address": "198.19.60.9"});
        assert_eq!(
            step("IpamDriver.RequestAddress", given),
            Ok(Step::Act(Action::Allocate {
                subnet: subnet(),
                ip: Some(Ipv4Addr::new(198, 19, 60, 9))
            }))
        );
        let release = json!({"PoolID": "198.19.60.0/24", "Address": "198.19.60.9"});
        assert_eq!(
            step("IpamDriver.ReleaseAddress", release),
            Ok(Step::Act(Action::Release {
                subnet: subnet(),
                ip: Ipv4Addr::new(198, 19, 60, 9)
            }))
        );
    }

    #[test]
    fn a_network_maps_its_pool_and_options() {
        let body = |space: &str, generic: Value, internal: bool| json!({"NetworkID": NET, "Options": {"com.docker.network.enable_ipv6": false, "com.docker.network.internal": internal, "com.docker.network.generic": generic}, "IPv4Data": [{"AddressSpace": space, "Gateway": "198.19.60.1/24", "Pool": "198.19.60.0/24"}], "IPv6Data": []});
        let spec = |name: Option<&str>, internal, encrypted| {
            Step::Act(Action::CreateNetwork(NetworkSpec {
                docker_network: NET.into(),
                subnet: subnet(),
                name: name.map(Into::into),
                internal,
                encrypted,
            }))
        };
        assert_eq!(
            step(
                "NetworkDriver.CreateNetwork",
                body("overlayd", json!({}), false)
            ),
            Ok(spec(None, false, false))
        );
        assert_eq!(
            step(
                "NetworkDriver.CreateNetwork",
                body(
                    "overlayd",
                    json!({"overlayd.network": "web", "encrypted": ""}),
                    true
                )
            ),
            Ok(spec(Some("web"), true, true))
        );
        let Ok(Step::Act(Action::CreateNetwork(unnamed))) = step(
            "NetworkDriver.CreateNetwork",
            body("overlayd", json!({}), false),
        ) else {
            panic!("not a network");
        };
        assert_eq!(unnamed.overlayd_name(), "docker-4e9703ded691");
        let why = refusal(step(
            "NetworkDriver.CreateNetwork",
            body("LocalDefault", json!({}), false),
        ));
        assert!(why.contains("--ipam-driver overlayd"), "{why}");
        let why = refusal(step(
            "NetworkDriver.CreateNetwork",
            body("overlayd", json!({"overlayd.network": "-bad"}), false),
        ));
        assert!(why.contains("not allowed"), "{why}");
    }

    #[test]
    fn an_endpoint_gets_overlayds_mac_and_its_service_from_the_driver_option() {
        let body = |mac: &str, options: Value| json!({"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": "198.19.60.2/24", "AddressIPv6": "", "MacAddress": mac}, "Options": options});
        let ip = Ipv4Addr::new(198, 19, 60, 2);
        assert_eq!(
            step(
                "NetworkDriver.CreateEndpoint",
                body(
                    "",
                    json!({"com.docker.network.endpoint.exposedports": [], "com.docker.network.portmap": [], "overlayd.service": "web"})
                )
            ),
            Ok(Step::Act(Action::CreateEndpoint(EndpointSpec {
                at: at(),
                ip,
                service: Some("web".into()),
                mac_wanted: true,
            })))
        );
        assert_eq!(
            answer_json(Answer::Interface {
                mac: Some(Endpoint::mac_for(ip))
            }),
            json!({"Interface": {"MacAddress": "02:42:c6:13:3c:02"}})
        );
        // Docker chose the MAC: the answer must leave the interface alone.
        let Ok(Step::Act(Action::CreateEndpoint(own_mac))) = step(
            "NetworkDriver.CreateEndpoint",
            body("02:42:c6:13:3c:02", Value::Null),
        ) else {
            panic!("not an endpoint");
        };
        assert!(!own_mac.mac_wanted && own_mac.service.is_none());
        assert_eq!(answer_json(Answer::Interface { mac: None }), json!({}));
        let why = refusal(step(
            "NetworkDriver.CreateEndpoint",
            body("02:00:00:00:00:01", Value::Null),
        ));
        assert!(why.contains("--mac-address"), "{why}");
        let why = refusal(step(
            "NetworkDriver.CreateEndpoint",
            json!({"NetworkID": NET, "EndpointID": EP, "Interface": {}, "Options": {}}),
        ));
        assert!(why.contains("--ipam-driver"), "{why}");
        assert_eq!(at().container_name(), "docker-019ec028c381");
    }

    #[test]
    fn join_answers_the_interface_to_move_and_the_gateway() {
        let body = json!({"NetworkID": NET, "EndpointID": EP, "SandboxKey": "/var/run/docker/netns/2f96159f193f", "Options": {}});
        assert_eq!(
            step("NetworkDriver.Join", body),
            Ok(Step::Act(Action::Join(at())))
        );
        let answer = Answer::Join {
            src: "ovh0a0b0c0dc".into(),
            gateway: Ipv4Addr::new(198, 19, 60, 1),
        };
        assert_eq!(
            answer_json(answer),
            json!({"InterfaceName": {"SrcName": "ovh0a0b0c0dc", "DstPrefix": "eth"}, "Gateway": "198.19.60.1"})
        );
        for method in ["NetworkDriver.Leave", "NetworkDriver.DeleteEndpoint"] {
            let body = json!({"NetworkID": NET, "EndpointID": EP});
            assert!(matches!(step(method, body), Ok(Step::Act(_))), "{method}");
        }
    }

    #[test]
    fn errors_are_spelled_per_protocol_and_bad_requests_are_not_crashes() {
        // What Docker sees of a refused pool: the IPAM protocol's error field.
        let method = "IpamDriver.RequestPool";
        let refusal = parse(method, br#"{"Pool": ""}"#).unwrap_err();
        let (status, body) = respond(Protocol::of(method), Err(refusal));
        assert_eq!(status, 200);
        assert!(
            body["Error"].as_str().unwrap().contains("--subnet"),
            "{body}"
        );
        assert_eq!(
            respond(Protocol::Network, Err(refused("no"))),
            (200, json!({"Err": "no"}))
        );
        assert_eq!(
            parse("NetworkDriver.Frobnicate", b"{}").unwrap_err(),
            Refusal::Unknown("NetworkDriver.Frobnicate".into())
        );
        assert_eq!(
            respond(
                Protocol::Network,
                Err(Refusal::Unknown("NetworkDriver.Frobnicate".into()))
            )
            .0,
            404
        );
        for method in [
            "NetworkDriver.Join",
            "NetworkDriver.CreateNetwork",
            "NetworkDriver.CreateEndpoint",
            "IpamDriver.RequestPool",
            "IpamDriver.RequestAddress",
            "IpamDriver.ReleaseAddress",
        ] {
            for body in [&b""[..], b"null", b"[]", b"{\"NetworkID\": 7}", b"\xff"] {
                assert!(
                    matches!(
                        parse(method, body),
                        Err(Refusal::Malformed(_) | Refusal::Refused(_))
                    ),
                    "{method} {body:?}"
                );
            }
        }
    }
}
