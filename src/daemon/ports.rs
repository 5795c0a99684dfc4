//! Ports before they are published: a `service create` or `service update` that adds ports is
//! checked against this node's copy of the registry (the rules of [`crate::publish`]), its bind
//! addresses against the members' addresses, and every member is asked whether it can bind each
//! new port. A port some process already holds on a node is refused before anything is
//! proposed. The registry checks the rules again when it applies the change, so a stale copy
//! here cannot let a conflict through.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::task::JoinSet;
use tracing::{info, warn};

use super::Daemon;
use crate::api::{self, Failure};
use crate::cluster::View;
use crate::consensus::Change;
use crate::model::{NodeState, Publish, PublishProtocol, Service};
use crate::peer::{self, Bind};
use crate::publish::{self, Unpublish};
use crate::registry::{Command, known_service};

/// How long a member has to say whether it can bind the ports. One that does not answer in time
/// is passed over (logged), as Swarm publishes without its down nodes.
const ASK_WITHIN: Duration = Duration::from_secs(3);

impl Daemon {
    /// `service update NAME --publish-add ... --publish-rm ...`.
    pub(super) async fn service_update(
        &self,
        name: String,
        add: Vec<Publish>,
        remove: Vec<Unpublish>,
    ) -> api::Reply {
        let view = self.view().await;
        let current = known_service(&view.services, &name)?.publish.clone();
        self.check_publish(&view, &name, &current, &add, &remove)
            .await?;
        let reply = self
            .propose(Change::registry(Command::UpdateService {
                name: name.clone(),
                add,
                remove,
            }))
            .await?;
        let updated: Service = serde_json::from_value(reply)
            .map_err(|e| Failure::runtime(format!("leader's reply: {e}")))?;
        let view = self
            .converge(&format!("updating service {name}"), |v| {
                v.services.get(&name) == Some(&updated)
            })
            .await?;
        super::service_reply(&view, &name)
    }

    /// Refuses adding `add` to (and taking `remove` from) the ports `current` of service `name`
    /// unless the rules allow it, every bind address is a member's, and every member that
    /// answers can bind every port new to the service.
    pub(super) async fn check_publish(
        &self,
        view: &View,
        name: &str,
        current: &[Publish],
        add: &[Publish],
        remove: &[Unpublish],
    ) -> Result<(), Failure> {
        publish::admit(&view.services, name, current, add, remove)?;
        // A port the service publishes already may be held by its own data path.
        let new = add
            .iter()
            .filter(|p| !current.iter().any(|held| held.overlaps(p)));
        let mut asks: Vec<Vec<Bind>> = vec![Vec::new(); view.members.len()];
        for p in new {
            let on = |addr| Bind {
                addr,
                port: p.published,
                protocol: p.protocol,
            };
            match p.addr {
                None => asks
                    .iter_mut()
                    .for_each(|a| a.push(on(Ipv4Addr::UNSPECIFIED))),
                Some(addr) => {
                    let owner = view
                        .members
                        .iter()
                        .position(|m| m.node.address == addr)
                        .ok_or_else(|| {
                            Failure::usage(format!(
                                "bind address {addr} of port {} is not the address of any node: use one that `overlayd node ls` shows, or leave ADDR out to publish on every node",
                                p.port()
                            ))
                        })?;
                    asks[owner].push(on(addr));
                }
            }
        }
        let mut answers = JoinSet::new();
        for (i, (member, ports)) in view.members.iter().zip(asks).enumerate() {
            if ports.is_empty() {
                continue;
            }
            let node = &member.node;
            if node.is_self {
                bindable(&self.id, self.config.advertise, &ports)?;
            } else if node.state == NodeState::Down {
                info!(node = %node.id, address = %node.address, "node down: publishing without asking it whether the ports are free");
            } else {
                let (to, credential) = (member.gossip, self.credential.clone());
                answers.spawn(async move {
                    let request = peer::Request::Bindable { ports };
                    let asked = peer::call(to, &credential, &request);
                    (i, tokio::time::timeout(ASK_WITHIN, asked).await)
                });
            }
        }
        let mut refusals = Vec::new();
        while let Some(answer) = answers.join_next().await {
            let Ok((i, answer)) = answer else { continue };
            let node = &view.members[i].node;
            match answer {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(refusal))) => refusals.push((i, refusal)),
                Ok(Err(err)) => {
                    warn!(node = %node.id, address = %node.address, err = %format!("{err:#}"), "could not ask a node whether the ports are free; publishing without it")
                }
                Err(_) => {
                    warn!(node = %node.id, address = %node.address, "a node did not say within {ASK_WITHIN:?} whether the ports are free; publishing without it")
                }
            }
        }
        // The first member's refusal, whatever order the answers came in.
        match refusals.into_iter().min_by_key(|(i, _)| *i) {
            Some((_, refusal)) => Err(refusal),
            None => Ok(()),
        }
    }
}

/// Whether this node (`id` at `address`) can bind every one of `ports` now; the refusal names
/// the first it cannot. TCP ports are bound as a listener binds them (`SO_REUSEADDR`, so
/// connections lingering in TIME_WAIT do not count) but not listened on; UDP ports are bound.
/// Nothing stays bound.
pub(super) fn bindable(id: &str, address: Ipv4Addr, ports: &[Bind]) -> Result<(), Failure> {
    for bind in ports {
        let at = SocketAddr::from((bind.addr, bind.port));
        let bound = match bind.protocol {
            PublishProtocol::Tcp => tokio::net::TcpSocket::new_v4()
                .and_then(|s| s.set_reuseaddr(true).map(|()| s))
                .and_then(|s| s.bind(at)),
            PublishProtocol::Udp => std::net::UdpSocket::bind(at).map(drop),
        };
        if let Err(err) = bound {
            let addr = (!bind.addr.is_unspecified()).then_some(bind.addr);
            let port = publish::port_name(addr, bind.port, bind.protocol);
            return Err(Failure::usage(
                if err.kind() == std::io::ErrorKind::AddrInUse {
                    format!(
                        "port {port} is in use on node {id} ({address}): free it or publish another port"
                    )
                } else {
                    format!(
                        "port {port} cannot be bound on node {id} ({address}): {err}: free it or publish another port"
                    )
                },
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(port: u16, protocol: PublishProtocol) -> Bind {
        Bind {
            addr: Ipv4Addr::UNSPECIFIED,
            port,
            protocol,
        }
    }

    #[tokio::test]
    async fn a_port_held_by_a_listener_is_refused_naming_node_and_port() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let me = Ipv4Addr::new(198, 18, 0, 1);
        let refusal = bindable("n1", me, &[bind(port, PublishProtocol::Tcp)]).unwrap_err();
        assert!(refusal.usage, "{refusal}");
        assert_eq!(
            refusal.message,
            format!(
                "port {port}/tcp is in use on node n1 (198.18.0.1): free it or publish another port"
            )
        );
        drop(held);
        bindable("n1", me, &[bind(port, PublishProtocol::Tcp)]).unwrap();
        bindable("n1", me, &[bind(port, PublishProtocol::Tcp)]).unwrap();
    }

    #[tokio::test]
    async fn udp_ports_are_checked_apart_from_tcp() {
        let held = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let me = Ipv4Addr::new(198, 18, 0, 1);
        let refusal = bindable("n1", me, &[bind(port, PublishProtocol::Udp)]).unwrap_err();
        assert!(
            refusal
                .message
                .contains(&format!("port {port}/udp is in use")),
            "{refusal}"
        );
        bindable("n1", me, &[bind(port, PublishProtocol::Tcp)]).unwrap();
    }
}
