//! Raft's durable state on one node: the vote, the log, and the [`Registry`] it is applied to,
//! kept in one JSON file in the state dir and rewritten atomically on every change.
//!
//! One file rather than a database: the registry changes only on `network create/rm`,
//! `attach` and `detach`, so the log stays small and a rewrite costs less than a dependency.
//! Raft's safety needs the vote and the log on disk before it answers a peer; every write here
//! is synced before it returns.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogState, RaftLogReader, RaftSnapshotBuilder, RaftStorage, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{NodeId, TypeConfig};
use crate::api::Reply;
use crate::gossip::unix_ms;
use crate::metrics::Propagation;
use crate::registry::Registry;
use crate::state_dir;

type Membership = StoredMembership<NodeId, openraft::BasicNode>;
type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

#[derive(Default, Serialize, Deserialize)]
struct Disk {
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    log: BTreeMap<u64, Entry<TypeConfig>>,
    last_purged: Option<LogId<NodeId>>,
    applied: Option<LogId<NodeId>>,
    membership: Membership,
    registry: Registry,
    snapshot: Option<(Meta, Registry)>,
}

/// Cheap to clone: every clone is the same store (openraft wants a log reader and a snapshot
/// builder beside the store itself).
#[derive(Clone)]
pub struct Store {
    dir: Arc<PathBuf>,
    disk: Arc<Mutex<Disk>>,
    /// The registry as last applied, for readers outside Raft.
    applied: Arc<watch::Sender<Arc<Registry>>>,
    /// How long proposals took to be applied here.
    propagation: Arc<Propagation>,
}

impl Store {
    /// Opens the store in `dir`; empty for a node that has never been part of a cluster.
    pub fn open(dir: PathBuf, propagation: Arc<Propagation>) -> anyhow::Result<Store> {
        let disk: Disk = state_dir::load_raft(&dir)?.unwrap_or_default();
        let (applied, _) = watch::channel(Arc::new(disk.registry.clone()));
        Ok(Store {
            dir: Arc::new(dir),
            disk: Arc::new(Mutex::new(disk)),
            applied: Arc::new(applied),
            propagation,
        })
    }

    pub fn registry(&self) -> watch::Receiver<Arc<Registry>> {
        self.applied.subscribe()
    }

    /// Whether this node has ever been part of a Raft group (has a vote or a log).
    pub fn is_initialised(&self) -> bool {
        let disk = self.lock();
        disk.vote.is_some() || !disk.log.is_empty() || disk.applied.is_some()
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        // A panic while holding the lock cannot leave the disk state half-written: every
        // change is made in memory and then saved whole, so the data is usable as it is.
        self.disk
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies `change` to the state and saves it before returning. The error is openraft's,
    /// large as it is: every trait method here returns it.
    #[allow(clippy::result_large_err)]
    fn change<T>(&self, change: impl FnOnce(&mut Disk) -> T) -> Result<T, StorageError<NodeId>> {
        let mut disk = self.lock();
        let out = change(&mut disk);
        state_dir::save_raft(&self.dir, &*disk)
            .map_err(|e| StorageIOError::write(&std::io::Error::other(format!("{e:#}"))))?;
        Ok(out)
    }

    fn publish(&self, registry: &Registry) {
        self.applied.send_replace(Arc::new(registry.clone()));
    }
}

impl RaftLogReader<TypeConfig> for Store {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        Ok(self
            .lock()
            .log
            .range(range)
            .map(|(_, entry)| entry.clone())
            .collect())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for Store {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let (meta, registry) = self.change(|disk| {
            let meta = Meta {
                last_log_id: disk.applied,
                last_membership: disk.membership.clone(),
                snapshot_id: disk
                    .applied
                    .map_or_else(|| "empty".to_string(), |id| id.to_string()),
            };
            disk.snapshot = Some((meta.clone(), disk.registry.clone()));
            (meta, disk.registry.clone())
        })?;
        Ok(snapshot(meta, &registry))
    }
}

fn snapshot(meta: Meta, registry: &Registry) -> Snapshot<TypeConfig> {
    Snapshot {
        meta,
        snapshot: Box::new(Cursor::new(
            serde_json::to_vec(registry).unwrap_or_default(),
        )),
    }
}

impl RaftStorage<TypeConfig> for Store {
    type LogReader = Store;
    type SnapshotBuilder = Store;

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.change(|disk| disk.vote = Some(*vote))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.change(|disk| disk.committed = committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().committed)
    }

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let disk = self.lock();
        let last = disk.log.values().next_back().map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id: disk.last_purged,
            last_log_id: last.or(disk.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Store {
        self.clone()
    }

    async fn append_to_log<I>(&mut self, entries: I) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        if entries.is_empty() {
            return Ok(());
        }
        self.change(|disk| {
            for entry in entries {
                disk.log.insert(entry.log_id.index, entry);
            }
        })
    }

    async fn delete_conflict_logs_since(
        &mut self,
        log_id: LogId<NodeId>,
    ) -> Result<(), StorageError<NodeId>> {
        self.change(|disk| {
            disk.log.split_off(&log_id.index);
        })
    }

    async fn purge_logs_upto(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.change(|disk| {
            disk.log = disk.log.split_off(&(log_id.index + 1));
            disk.last_purged = Some(log_id);
        })
    }

    async fn last_applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        let disk = self.lock();
        Ok((disk.applied, disk.membership.clone()))
    }

    async fn apply_to_state_machine(
        &mut self,
        entries: &[Entry<TypeConfig>],
    ) -> Result<Vec<Reply>, StorageError<NodeId>> {
        let propagation = self.propagation.clone();
        let (replies, registry) = self.change(|disk| {
            let replies: Vec<Reply> = entries
                .iter()
                .map(|entry| {
                    disk.applied = Some(entry.log_id);
                    match &entry.payload {
                        EntryPayload::Blank => Ok(serde_json::Value::Null),
                        EntryPayload::Normal(proposal) => {
                            propagation.applied(proposal.proposed_ms, unix_ms());
                            disk.registry.apply_once(proposal.clone())
                        }
                        EntryPayload::Membership(m) => {
                            disk.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                            Ok(serde_json::Value::Null)
                        }
                    }
                })
                .collect();
            (replies, disk.registry.clone())
        })?;
        self.publish(&registry);
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Store {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        // Read with the same checks as every other registry: a leader cannot install a
        // network that `network create` would refuse.
        let registry: Registry = serde_json::from_slice(snapshot.get_ref()).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), &std::io::Error::other(e))
        })?;
        self.change(|disk| {
            disk.registry = registry.clone();
            disk.applied = meta.last_log_id;
            disk.membership = meta.last_membership.clone();
            disk.snapshot = Some((meta.clone(), registry.clone()));
        })?;
        self.publish(&registry);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(self
            .lock()
            .snapshot
            .as_ref()
            .map(|(meta, registry)| snapshot(meta.clone(), registry)))
    }
}
