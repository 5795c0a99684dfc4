//! The Docker plugin (`--docker-plugin`): Docker's network and IPAM driver protocols over HTTP/1.1
//! on [`SOCKET`], as [`crate::docker`] parses and answers them, carried out with the same
//! registry proposals and the same plug path as `attach` and `detach`.
//!
//! Docker sends every request of one container in order and waits for each answer; the
//! daemon's `plumbing` lock serialises plugging with `attach` and `detach`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use super::{Daemon, NetworkFlags, accept_unix};
use crate::api::Failure;
use crate::consensus::Change;
use crate::docker::{self, Action, Answer, EndpointRef, EndpointSpec, NetworkSpec, Refusal, Step};
use crate::model::Network;
use crate::registry::Command;
use crate::{host, http, state_dir};

/// Where Docker looks for the plugin named [`docker::DRIVER`].
pub const SOCKET: &str = "/run/docker/plugins/overlayd.sock";
/// Largest request body read: Docker's are a few hundred bytes.
const BODY_LIMIT: usize = 64 << 10;

/// What the plugin keeps between requests.
#[derive(Default)]
pub(super) struct Plugin {
    /// Docker network id -> the overlayd network it maps to; saved in the state dir.
    networks: Mutex<BTreeMap<String, Mapped>>,
    /// Endpoints created and not yet joined: Docker endpoint id -> address.
    pending: Mutex<BTreeMap<String, Ipv4Addr>>,
}

/// The overlayd network behind a Docker network.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Mapped {
    network_id: String,
    /// Whether the plugin made it (then `docker network rm` removes it), or found it.
    created: bool,
}

impl Plugin {
    pub(super) fn load(state_dir: &Path) -> Result<Plugin, Failure> {
        let networks = state_dir::load_docker(state_dir)?;
        Ok(Plugin {
            networks: Mutex::new(networks),
            pending: Mutex::default(),
        })
    }
}

impl Daemon {
    /// Serves Docker on `listener` until the process stops.
    pub(super) async fn serve_docker(self: Arc<Daemon>, listener: Arc<UnixListener>) {
        loop {
            let stream = accept_unix(&listener, "Docker plugin").await;
            // The interfaces Join makes go to the caller's (dockerd's) network namespace.
            let caller = stream.peer_cred().ok().and_then(|c| c.pid());
            let runtime = caller
                .and_then(|pid| u32::try_from(pid).ok())
                .filter(|&pid| host::other_netns(pid));
            let daemon = self.clone();
            tokio::spawn(http::serve_connection(
                stream,
                "Docker plugin",
                move |request| {
                    let daemon = daemon.clone();
                    async move { daemon.docker_request(request, runtime).await }
                },
            ));
        }
    }

    /// One request: parsed and answered by [`docker`], carried out here.
    async fn docker_request(
        &self,
        request: Request<Incoming>,
        runtime: Option<u32>,
    ) -> Response<Full<Bytes>> {
        let method = request.uri().path().trim_start_matches('/').to_string();
        let body = Limited::new(request.into_body(), BODY_LIMIT)
            .collect()
            .await;
        let protocol = docker::Protocol::of(&method);
        let result = match body {
            Err(err) => Err(Refusal::Malformed(format!("reading the body: {err}"))),
            Ok(body) => match docker::parse(&method, &body.to_bytes()) {
                Err(refusal) => Err(refusal),
                Ok(Step::Done(answer)) => Ok(answer),
                Ok(Step::Act(action)) => {
                    let what = format!("{action:?}");
                    let result = self.docker_act(action, runtime).await;
                    match &result {
                        Ok(_) => debug!(%method, action = %what, "Docker request done"),
                        Err(err) => warn!(%method, action = %what, %err, "Docker request refused"),
                    }
                    result
                }
            },
        };
        let (status, json) = docker::respond(protocol, result);
        Response::builder()
            .status(status)
            .header(
                hyper::header::CONTENT_TYPE,
                "application/vnd.docker.plugins.v1+json",
            )
            .body(Full::new(Bytes::from(json.to_string())))
            .expect("a valid status and header")
    }

    async fn docker_act(&self, action: Action, runtime: Option<u32>) -> Result<Answer, Refusal> {
        let refused = |f: Failure| Refusal::Refused(f.message);
        match action {
            Action::Allocate { subnet, ip } => {
                let net = self.network_with_subnet(subnet).await?;
                let reply = self
                    .propose(Change::registry(Command::Allocate {
                        network: net.name.clone(),
                        node: self.id.clone(),
                        ip,
                        service: None,
                    }))
                    .await
                    .map_err(refused)?;
                let ip: Ipv4Addr = serde_json::from_value(reply)
                    .map_err(|e| Refusal::Refused(format!("leader's reply: {e}")))?;
                Ok(Answer::Address(docker::with_prefix(ip, subnet)))
            }
            Action::Release { subnet, ip } => {
                // Its network may be gone already, and with it every address.
                if let Ok(net) = self.network_with_subnet(subnet).await {
                    self.release(&net, ip).await;
                }
                Ok(Answer::Empty)
            }
            Action::CreateNetwork(spec) => self.docker_network_create(spec).await,
            Action::DeleteNetwork { docker_network } => {
                self.docker_network_rm(&docker_network).await
            }
            Action::CreateEndpoint(spec) => self.docker_endpoint_create(spec).await,
            Action::Join(at) => self.docker_join(&at, runtime).await,
            Action::Leave(at) => {
                let net = self.mapped_network(&at.docker_network).await?;
                let _plumbing = self.plumbing.lock().await;
                let name = at.container_name();
                let view = self.view().await;
                let placed = view
                    .endpoints_on(&net)
                    .find(|p| p.node == self.id && p.endpoint.netns == name)
                    .ok_or_else(|| unknown_endpoint(&at))?;
                self.unplug_endpoint(&placed.endpoint).await;
                info!(container = %name, network = %net.name, ip = %placed.endpoint.ip, "Docker container left");
                Ok(Answer::Empty)
            }
            Action::DeleteEndpoint(at) => {
                self.docker.pending.lock().await.remove(&at.endpoint);
                Ok(Answer::Empty)
            }
        }
    }

    /// Maps a new Docker network to the overlayd network with its subnet, or makes one.
    async fn docker_network_create(&self, spec: NetworkSpec) -> Result<Answer, Refusal> {
        let view = self.view().await;
        let found = view.networks.values().find(|n| n.subnet == spec.subnet);
        let mapped = match found {
            Some(net) => {
                if spec.name.as_ref().is_some_and(|name| *name != net.name) {
                    return Err(Refusal::Refused(format!(
                        "subnet {} is overlayd network {}'s: leave -o {}= out, or name it {}",
                        spec.subnet,
                        net.name,
                        docker::NETWORK_OPTION,
                        net.name
                    )));
                }
                info!(docker = %spec.docker_network, network = %net.name, "Docker network uses an existing overlayd network");
                Mapped {
                    network_id: net.id.clone(),
                    created: false,
                }
            }
            None => {
                let name = spec.overlayd_name();
                let flags = NetworkFlags {
                    internal: spec.internal,
                    encrypted: spec.encrypted,
                };
                self.network_create(name.clone(), spec.subnet, None, None, vec![], flags)
                    .await
                    .map_err(|f| Refusal::Refused(f.message))?;
                let view = self.view().await;
                let net = view
                    .networks
                    .get(&name)
                    .ok_or_else(|| Refusal::Refused(format!("network {name} vanished")))?;
                info!(docker = %spec.docker_network, network = %name, "overlayd network made for a Docker network");
                Mapped {
                    network_id: net.id.clone(),
                    created: true,
                }
            }
        };
        let mut networks = self.docker.networks.lock().await;
        networks.insert(spec.docker_network, mapped);
        self.save_docker_networks(&networks);
        Ok(Answer::Empty)
    }

    /// Forgets a Docker network; removes its overlayd network if the plugin made it and
    /// nothing else uses it.
    async fn docker_network_rm(&self, docker_network: &str) -> Result<Answer, Refusal> {
        let mut networks = self.docker.networks.lock().await;
        let mapped = networks.remove(docker_network).ok_or_else(|| {
            Refusal::Refused(format!(
                "Docker network {docker_network} is not one of this node's overlayd networks"
            ))
        })?;
        self.save_docker_networks(&networks);
        drop(networks);
        let view = self.view().await;
        let made = view
            .networks
            .values()
            .find(|n| mapped.created && n.id == mapped.network_id);
        if let Some(net) = made {
            let name = net.name.clone();
            let removed = self
                .propose(Change::registry(Command::RemoveNetwork {
                    name: name.clone(),
                }))
                .await;
            match removed {
                Ok(_) => {
                    info!(network = %name, "overlayd network of a removed Docker network removed")
                }
                // Containers of other nodes (or a service) are still on it: it stays theirs.
                Err(failure) => {
                    warn!(network = %name, why = %failure, "Docker network removed; its overlayd network stays")
                }
            }
        }
        Ok(Answer::Empty)
    }

    async fn docker_endpoint_create(&self, spec: EndpointSpec) -> Result<Answer, Refusal> {
        let net = self.mapped_network(&spec.at.docker_network).await?;
        let holder =
            self.consensus.registry().container_node(&net.id, spec.ip) == Some(self.id.as_str());
        if !holder {
            return Err(Refusal::Refused(format!(
                "{} on network {} was not allocated to this node by its IPAM driver: use `--ipam-driver {}`",
                spec.ip,
                net.name,
                docker::DRIVER
            )));
        }
        if let Some(service) = spec.service {
            self.propose(Change::registry(Command::Enlist {
                network: net.name.clone(),
                node: self.id.clone(),
                ip: spec.ip,
                service,
            }))
            .await
            .map_err(|f| Refusal::Refused(f.message))?;
        }
        self.docker
            .pending
            .lock()
            .await
            .insert(spec.at.endpoint.clone(), spec.ip);
        let mac = spec
            .mac_wanted
            .then(|| crate::model::Endpoint::mac_for(spec.ip));
        Ok(Answer::Interface { mac })
    }

    /// Plugs the endpoint in as `attach` would, handing the container end to Docker in the
    /// network namespace of `runtime` (dockerd), and announces it to the cluster.
    async fn docker_join(&self, at: &EndpointRef, runtime: Option<u32>) -> Result<Answer, Refusal> {
        let net = self.mapped_network(&at.docker_network).await?;
        let ip = self
            .docker
            .pending
            .lock()
            .await
            .get(&at.endpoint)
            .copied()
            .ok_or_else(|| unknown_endpoint(at))?;
        let _plumbing = self.plumbing.lock().await;
        // The reconcile loop may not have made the bridge yet for a network created just now.
        self.realise_network(&net)
            .await
            .map_err(|e| Refusal::Refused(format!("{e:#}")))?;
        let name = at.container_name();
        let target = host::Target::Runtime { pid: runtime };
        let (_, plugged) = self
            .plug_endpoint(&net, ip, &name, vec![], &target)
            .await
            .map_err(|f| Refusal::Refused(f.message))?;
        let src = plugged.ifname;
        info!(container = %name, network = %net.name, %ip, interface = %src, "Docker container joined");
        Ok(Answer::Join {
            src,
            gateway: net.gateway(),
        })
    }

    /// The overlayd network behind Docker network `docker_network`.
    async fn mapped_network(&self, docker_network: &str) -> Result<Network, Refusal> {
        let mapped = self
            .docker
            .networks
            .lock()
            .await
            .get(docker_network)
            .cloned();
        let mapped = mapped.ok_or_else(|| {
            Refusal::Refused(format!(
                "Docker network {docker_network} is not one of this node's overlayd networks"
            ))
        })?;
        let view = self.view().await;
        view.networks
            .values()
            .find(|n| n.id == mapped.network_id)
            .cloned()
            .ok_or_else(|| {
                Refusal::Refused(format!(
                    "the overlayd network of Docker network {docker_network} was removed: `docker network rm` it"
                ))
            })
    }

    async fn network_with_subnet(
        &self,
        subnet: ipnetwork::Ipv4Network,
    ) -> Result<Network, Refusal> {
        let view = self.view().await;
        view.networks
            .values()
            .find(|n| n.subnet == subnet)
            .cloned()
            .ok_or_else(|| {
                Refusal::Refused(format!(
                    "no overlayd network has subnet {subnet}: make the Docker network with `--driver {}`",
                    docker::DRIVER
                ))
            })
    }

    fn save_docker_networks(&self, networks: &BTreeMap<String, Mapped>) {
        if let Err(err) = state_dir::save_docker(&self.config.state_dir, networks) {
            warn!(err = %format!("{err:#}"), "Docker networks not saved: after a restart, Docker's requests on them are refused");
        }
    }
}

fn unknown_endpoint(at: &EndpointRef) -> Refusal {
    Refusal::Refused(format!(
        "endpoint {} is not on this node's overlayd network of Docker network {}",
        at.endpoint, at.docker_network
    ))
}
