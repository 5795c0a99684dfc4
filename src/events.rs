//! Cluster events as log lines: one line each, with the same fields every time, as this node
//! learns of them. Never one per packet.
//!
//! The reconcile loop hands every view to [`Events::update`], which compares it with the last
//! one (pure) and returns what happened in between; [`Event::log`] writes it as an `info`
//! line whose `event` field names it (`member_joined`, `member_suspected`, `member_left`,
//! `member_state`, `network_created`, `network_removed`, `task_added`, `task_removed`,
//! `task_unhealthy`, `task_healthy`). With `--log-format json` each is one JSON object.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use tracing::info;

use crate::api::TaskState;
use crate::cluster::View;
use crate::model::NodeState;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A member first seen ready.
    MemberJoined {
        node: String,
        address: Ipv4Addr,
    },
    /// The failure detector calls it down.
    MemberSuspected {
        node: String,
        address: Ipv4Addr,
    },
    /// Out of the cluster for good: it left (`node leave`) or was removed (`node rm`).
    MemberLeft {
        node: String,
        address: Option<Ipv4Addr>,
        left: bool,
    },
    /// Any other change of a member's state (back up, leaving).
    MemberState {
        node: String,
        address: Ipv4Addr,
        state: NodeState,
    },
    NetworkCreated {
        network: String,
        subnet: Ipv4Network,
        vni: u32,
    },
    NetworkRemoved {
        network: String,
    },
    TaskAdded {
        service: String,
        task: Ipv4Addr,
        node: String,
    },
    TaskRemoved {
        service: String,
        task: Ipv4Addr,
        node: String,
    },
    /// Its health check fails: no new flows.
    TaskUnhealthy {
        service: String,
        task: Ipv4Addr,
        node: String,
    },
    /// Its health check passes again.
    TaskHealthy {
        service: String,
        task: Ipv4Addr,
        node: String,
    },
}

impl Event {
    /// Writes the event's one log line.
    pub fn log(&self) {
        match self {
            Event::MemberJoined { node, address } => {
                info!(event = "member_joined", %node, %address, "member joined")
            }
            Event::MemberSuspected { node, address } => {
                info!(event = "member_suspected", %node, %address, "member suspected down")
            }
            Event::MemberLeft {
                node,
                address,
                left,
            } => {
                let how = if *left { "left" } else { "removed" };
                let address = address.map(|a| a.to_string()).unwrap_or_default();
                info!(event = "member_left", %node, %address, how, "member out of the cluster")
            }
            Event::MemberState {
                node,
                address,
                state,
            } => info!(event = "member_state", %node, %address, %state, "member state changed"),
            Event::NetworkCreated {
                network,
                subnet,
                vni,
            } => info!(event = "network_created", %network, %subnet, vni, "network created"),
            Event::NetworkRemoved { network } => {
                info!(event = "network_removed", %network, "network removed")
            }
            Event::TaskAdded {
                service,
                task,
                node,
            } => info!(event = "task_added", %service, %task, %node, "task added"),
            Event::TaskRemoved {
                service,
                task,
                node,
            } => info!(event = "task_removed", %service, %task, %node, "task removed"),
            Event::TaskUnhealthy {
                service,
                task,
                node,
            } => info!(event = "task_unhealthy", %service, %task, %node, "task unhealthy"),
            Event::TaskHealthy {
                service,
                task,
                node,
            } => info!(event = "task_healthy", %service, %task, %node, "task healthy"),
        }
    }
}

/// What the last view held, as far as events go.
#[derive(Debug, Default)]
pub struct Events {
    members: BTreeMap<String, NodeState>,
    departed: BTreeSet<String>,
    networks: BTreeSet<String>,
    /// (service, task) -> (node, whether its check fails).
    tasks: BTreeMap<(String, Ipv4Addr), (String, bool)>,
}

impl Events {
    /// What happened between the last view and `view`.
    pub fn update(&mut self, view: &View) -> Vec<Event> {
        let mut events = Vec::new();
        for m in &view.members {
            let (node, address, state) = (m.node.id.clone(), m.node.address, m.node.state);
            match self.members.insert(node.clone(), state) {
                // A member is heard of before the failure detector has its heartbeats: it
                // counts as joined once it is first seen ready.
                None if state == NodeState::Down => {
                    self.members.remove(&node);
                }
                None => events.push(Event::MemberJoined { node, address }),
                Some(before) if before == state => {}
                Some(_) if state == NodeState::Down => {
                    events.push(Event::MemberSuspected { node, address })
                }
                Some(_) => events.push(Event::MemberState {
                    node,
                    address,
                    state,
                }),
            }
        }
        for (node, departed) in &view.departed {
            if self.departed.insert(node.clone()) {
                self.members.remove(node);
                events.push(Event::MemberLeft {
                    node: node.clone(),
                    address: departed.address,
                    left: departed.left,
                });
            }
        }
        for (name, net) in &view.networks {
            if self.networks.insert(name.clone()) {
                events.push(Event::NetworkCreated {
                    network: name.clone(),
                    subnet: net.subnet,
                    vni: net.vni,
                });
            }
        }
        self.networks.retain(|name| {
            let kept = view.networks.contains_key(name);
            if !kept {
                events.push(Event::NetworkRemoved {
                    network: name.clone(),
                });
            }
            kept
        });
        let tasks: BTreeMap<(String, Ipv4Addr), (String, bool)> = view
            .tasks
            .iter()
            .map(|t| {
                let failing = view.task_state(t) == TaskState::Unhealthy;
                ((t.service.clone(), t.ip), (t.node.clone(), failing))
            })
            .collect();
        for ((service, task), (node, failing)) in &tasks {
            let before = self.tasks.get(&(service.clone(), *task)).map(|t| t.1);
            let (service, task, node) = (service.clone(), *task, node.clone());
            if before.is_none() {
                events.push(Event::TaskAdded {
                    service: service.clone(),
                    task,
                    node: node.clone(),
                });
            }
            // A task added failing is reported as added, then as unhealthy.
            match (before.unwrap_or(false), *failing) {
                (false, true) => events.push(Event::TaskUnhealthy {
                    service,
                    task,
                    node,
                }),
                (true, false) => events.push(Event::TaskHealthy {
                    service,
                    task,
                    node,
                }),
                _ => {}
            }
        }
        for ((service, task), (node, _)) in &self.tasks {
            if !tasks.contains_key(&(service.clone(), *task)) {
                events.push(Event::TaskRemoved {
                    service: service.clone(),
                    task: *task,
                    node: node.clone(),
                });
            }
        }
        self.tasks = tasks;
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Member, Placed, TaskRef};
    use crate::model::{Check, Endpoint, Health, Mode, Node, Service};
    use crate::registry::Departed;

    const T: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);

    fn member(id: &str, last: u8, state: NodeState) -> Member {
        Member {
            node: Node {
                id: id.into(),
                address: Ipv4Addr::new(198, 18, 0, last),
                vtep: None,
                state,
                is_self: false,
                raft: None,
            },
            gossip: ([198, 18, 0, last], 7946).into(),
            realised: BTreeSet::new(),
            drained: BTreeSet::new(),
            raft: None,
        }
    }

    /// Members a (ready) and b (in `b`), service web (checked) with task T on b, passing or not.
    fn view(b: NodeState, task: Option<bool>) -> View {
        let mut v = View {
            members: vec![member("a", 1, NodeState::Ready), member("b", 2, b)],
            ..View::default()
        };
        let check = Health {
            check: Check::Tcp { port: 80 },
            interval_ms: 500,
        };
        v.services.insert(
            "web".into(),
            Service {
                name: "web".into(),
                network_id: "n1".into(),
                mode: Mode::Vip,
                vip: None,
                health: Some(check),
                publish: vec![],
            },
        );
        if let Some(passing) = task {
            v.tasks.push(TaskRef {
                service: "web".into(),
                network_id: "n1".into(),
                ip: T,
                node: "b".into(),
            });
            v.endpoints.push(Placed {
                node: "b".into(),
                endpoint: Endpoint {
                    network_id: "n1".into(),
                    ip: T,
                    mac: Endpoint::mac_for(T),
                    netns: "c".into(),
                    host_if: "h".into(),
                    aliases: vec![],
                },
            });
            v.health.insert(("n1".into(), T), passing);
        }
        v
    }

    fn names(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| {
                format!("{e:?}")
                    .split([' ', '{'])
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn each_change_is_one_event_and_an_unchanged_view_none() {
        let mut events = Events::default();
        let joined = events.update(&view(NodeState::Ready, None));
        assert_eq!(names(&joined), ["MemberJoined", "MemberJoined"]);
        assert!(events.update(&view(NodeState::Ready, None)).is_empty());
        let added = events.update(&view(NodeState::Ready, Some(true)));
        assert_eq!(
            added,
            [Event::TaskAdded {
                service: "web".into(),
                task: T,
                node: "b".into()
            }]
        );
        assert_eq!(
            names(&events.update(&view(NodeState::Ready, Some(false)))),
            ["TaskUnhealthy"]
        );
        assert!(
            events
                .update(&view(NodeState::Ready, Some(false)))
                .is_empty()
        );
        assert_eq!(
            names(&events.update(&view(NodeState::Ready, Some(true)))),
            ["TaskHealthy"]
        );
        assert_eq!(
            names(&events.update(&view(NodeState::Down, Some(true)))),
            ["MemberSuspected"]
        );
        assert_eq!(
            names(&events.update(&view(NodeState::Ready, None))),
            ["MemberState", "TaskRemoved"]
        );
        let mut gone = view(NodeState::Ready, None);
        gone.members.pop();
        gone.departed.insert(
            "b".into(),
            Departed {
                address: Some(Ipv4Addr::new(198, 18, 0, 2)),
                left: true,
            },
        );
        assert_eq!(names(&events.update(&gone)), ["MemberLeft"]);
        assert!(events.update(&gone).is_empty());
    }

    #[test]
    fn a_member_first_heard_of_as_down_joins_when_it_is_ready() {
        let mut events = Events::default();
        events.update(&view(NodeState::Down, None));
        assert_eq!(
            names(&events.update(&view(NodeState::Ready, None))),
            ["MemberJoined"]
        );
    }
}
