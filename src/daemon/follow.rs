//! The registry beyond the Raft voters. A voter gossips its status ([`key::RAFT`]: role, term,
//! last applied index); a member that is no voter copies what its registry lacks from the voter
//! furthest ahead, as soon as gossip shows one ahead; and the leader gives a departed voter's
//! place to a live member.
//!
//! Copying on demand rather than replicating to every member as a Raft learner keeps the
//! leader's work independent of the cluster's size: at 150 nodes on two cores a leader that
//! replicated to 145 learners sent its heartbeats too late to keep its term.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use super::Daemon;
use crate::cluster::View;
use crate::consensus::Catchup;
use crate::model::{NodeState, RaftRole, RaftStatus, key};
use crate::peer;

/// How often a member compares its registry with the voters' (and the leader its voters with
/// the live members), besides whenever its own registry changes.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);
/// Catchups asked for in one go; each brings up to 64 entries, or the whole registry.
const PAGES: usize = 16;

impl Daemon {
    pub(super) async fn follow_forever(self: Arc<Daemon>) {
        let mut ticker = tokio::time::interval(FOLLOW_EVERY);
        let mut applied = self.consensus.registry_changes();
        let mut published: Option<RaftStatus> = None;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = applied.changed() => {}
            }
            let status = self.consensus.status();
            if status != published {
                match status {
                    Some(s) => {
                        self.gossip
                            .update(&[(key::RAFT.to_string(), s.to_string())], &[])
                            .await
                    }
                    None => self.gossip.update(&[], &[key::RAFT.to_string()]).await,
                }
                published = status;
            }
            match status.map(|s| s.role) {
                Some(RaftRole::Leader) => {
                    let view = self.view().await;
                    self.consensus.keep_voters(&live_members(&view)).await;
                }
                // Raft replicates to a voter.
                Some(_) => {}
                None => {
                    let view = self.view().await;
                    if let Some((voter, _)) =
                        view.registry_ahead(self.consensus.applied_index(), &self.id)
                    {
                        self.copy_registry(voter).await;
                    }
                }
            }
        }
    }

    /// Copies what this node's registry lacks from `voter`, unless this node is in the Raft
    /// group (which replicates to it). What fails is logged; the next round asks again.
    pub(super) async fn copy_registry(&self, voter: SocketAddr) {
        for _ in 0..PAGES {
            if self.consensus.in_group(&self.id) {
                return;
            }
            let request = peer::Request::Registry {
                after: self.consensus.applied_index(),
            };
            let catchup = match peer::call(voter, &self.credential, &request).await {
                Ok(Ok(answer)) => serde_json::from_value::<Catchup>(answer)
                    .map_err(|e| format!("unreadable answer: {e}")),
                Ok(Err(failure)) => Err(failure.message),
                Err(err) => Err(format!("{err:#}")),
            };
            let catchup = match catchup {
                Ok(catchup) => catchup,
                Err(why) => {
                    debug!(%voter, %why, "could not copy the registry; asking again");
                    return;
                }
            };
            let complete = catchup.complete();
            match self.consensus.follow(catchup) {
                Ok(_) if complete => return,
                Ok(_) => {}
                Err(err) => {
                    warn!(%voter, err = %format!("{err:#}"), "could not apply the registry copied from a voter");
                    return;
                }
            }
        }
    }
}

/// The members a departed voter's place may go to: up, and members in the registry.
fn live_members(view: &View) -> Vec<(String, SocketAddr)> {
    view.members
        .iter()
        .filter(|m| m.node.state == NodeState::Ready && m.node.raft.is_some())
        .map(|m| (m.node.id.clone(), m.gossip))
        .collect()
}
