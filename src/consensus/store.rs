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

    /// The index of the last entry this node's registry applied, from Raft or from a voter.
    pub fn applied_index(&self) -> Option<u64> {
        self.lock().applied.map(|id| id.index)
    }

    /// What a member whose registry applied up to `after` lacks: the applied entries after it
    /// while this node's log still holds them (at most [`CATCHUP_ENTRIES`]), else the whole
    /// registry. Never an entry that is not applied here, so never one that is not committed.
    pub fn catchup(&self, after: Option<u64>) -> Catchup {
        let disk = self.lock();
        let Some(applied) = disk.applied else {
            return Catchup::Entries(Vec::new());
        };
        let next = after.map_or(0, |index| index + 1);
        if next > applied.index {
            return Catchup::Entries(Vec::new());
        }
        if disk.log.contains_key(&next) {
            return Catchup::Entries(
                disk.log
                    .range(next..=applied.index)
                    .take(CATCHUP_ENTRIES)
                    .map(|(_, entry)| entry.clone())
                    .collect(),
            );
        }
        Catchup::Whole {
            applied,
            registry: disk.registry.clone(),
        }
    }

    /// The whole registry as applied here: what a joiner that is no voter starts from.
    pub fn whole(&self) -> Catchup {
        let disk = self.lock();
        match disk.applied {
            Some(applied) => Catchup::Whole {
                applied,
                registry: disk.registry.clone(),
            },
            None => Catchup::Entries(Vec::new()),
        }
    }

    /// Applies what a voter sent ([`Store::catchup`]) to this node's registry, which Raft does
    /// not replicate to (it is no voter), and saves it. Entries already applied are skipped, and
    /// one that does not follow the last applied ends it. Returns whether the registry moved.
    #[allow(clippy::result_large_err)]
    pub fn follow(&self, catchup: Catchup) -> Result<bool, StorageError<NodeId>> {
        let propagation = self.propagation.clone();
        let moved = self.change(|disk| {
            let before = disk.applied;
            match catchup {
                Catchup::Entries(entries) => {
                    for entry in entries {
                        let next = disk.applied.map_or(0, |id| id.index + 1);
                        if entry.log_id.index < next {
                            continue;
                        }
                        if entry.log_id.index > next {
                            break;
                        }
                        if let EntryPayload::Normal(proposal) = entry.payload {
                            propagation.applied(proposal.proposed_ms, unix_ms());
                            // The outcome was the leader's to give; a refusal is part of the
                            // log all the same.
                            let _ = disk.registry.apply_once(proposal);
                        }
                        disk.applied = Some(entry.log_id);
                    }
                }
                Catchup::Whole { applied, registry } => {
                    if disk.applied < Some(applied) {
                        disk.registry = registry;
                        disk.applied = Some(applied);
                    }
                }
            }
            // As if a snapshot held what was copied: should this node restart or become a
            // voter, Raft reads its log as going on from there.
            if disk.applied > disk.last_purged && disk.log.is_empty() {
                disk.last_purged = disk.applied;
            }
            (disk.applied != before).then(|| disk.registry.clone())
        })?;
        Ok(match moved {
            Some(registry) => {
                self.publish(&registry);
                true
            }
            None => false,
        })
    }
}

/// Entries sent in one [`Catchup`]: well under the peer protocol's reply limit.
const CATCHUP_ENTRIES: usize = 64;

/// What a member that is not in Raft copies from a voter to catch its registry up.
#[derive(Debug, Serialize, Deserialize)]
pub enum Catchup {
    /// The applied entries after the asker's last, in order; none when it is up to date.
    Entries(Vec<Entry<TypeConfig>>),
    /// The whole registry as applied at `applied`: the entries the asker lacks are compacted
    /// into a snapshot here.
    Whole {
        applied: LogId<NodeId>,
        registry: Registry,
    },
}

impl Catchup {
    /// Whether it brings the asker up to what the sender had applied.
    pub fn complete(&self) -> bool {
        match self {
            Catchup::Entries(entries) => entries.len() < CATCHUP_ENTRIES,
            Catchup::Whole { .. } => true,
        }
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
                    // Applied already from a voter's copy, before this node was one.
                    let copied = disk
                        .applied
                        .is_some_and(|id| entry.log_id.index <= id.index);
                    if !copied {
                        disk.applied = Some(entry.log_id);
                    }
                    match &entry.payload {
                        EntryPayload::Blank => Ok(serde_json::Value::Null),
                        EntryPayload::Normal(_) if copied => Ok(serde_json::Value::Null),
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
        let newer = self.change(|disk| {
            disk.membership = meta.last_membership.clone();
            disk.snapshot = Some((meta.clone(), registry.clone()));
            // A registry copied from a voter may be ahead of the snapshot: keep it.
            let newer = disk.applied <= meta.last_log_id;
            if newer {
                disk.registry = registry.clone();
                disk.applied = meta.last_log_id;
            }
            newer
        })?;
        if newer {
            self.publish(&registry);
        }
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

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::registry::{Command, Proposal};

    fn store(name: &str) -> Store {
        let dir = std::env::temp_dir().join(format!("ovstore-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Store::open(dir, Arc::new(Propagation::new(0))).unwrap()
    }

    fn entry(index: u64, payload: EntryPayload<TypeConfig>) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload,
        }
    }

    /// Entry `index` adds member `<prefix><index>` to the registry.
    fn join(prefix: &str, index: u64) -> Entry<TypeConfig> {
        entry(
            index,
            EntryPayload::Normal(Proposal::new(Command::AddNode {
                node: format!("{prefix}{index}"),
                addr: "198.18.0.1:7946".parse().unwrap(),
            })),
        )
    }

    /// A voter's store that applied a blank entry and then `joins` members (entries 0 to
    /// `joins`).
    async fn voter(name: &str, joins: u64) -> Store {
        let mut voter = store(name);
        let mut entries = vec![entry(0, EntryPayload::Blank)];
        entries.extend((1..=joins).map(|index| join("n", index)));
        voter.append_to_log(entries.clone()).await.unwrap();
        voter.apply_to_state_machine(&entries).await.unwrap();
        voter
    }

    fn registry(store: &Store) -> Registry {
        Registry::clone(&store.registry().borrow())
    }

    #[tokio::test]
    async fn a_copy_applies_the_voters_entries_in_pages_and_then_is_up_to_date() {
        let voter = voter("pages", 101).await;
        let copy = store("pages-copy");
        let mut pages = 0;
        loop {
            let catchup = voter.catchup(copy.applied_index());
            let complete = catchup.complete();
            assert!(
                matches!(catchup, Catchup::Entries(_)),
                "the log still holds them"
            );
            copy.follow(catchup).unwrap();
            pages += 1;
            if complete {
                break;
            }
        }
        assert_eq!(pages, 2, "102 entries, 64 a page");
        assert_eq!(copy.applied_index(), Some(101));
        assert_eq!(registry(&copy), registry(&voter));
        assert!(
            !copy.follow(voter.catchup(copy.applied_index())).unwrap(),
            "nothing more to copy"
        );
    }

    #[tokio::test]
    async fn a_copy_behind_the_voters_log_gets_the_whole_registry() {
        let mut voter = voter("whole", 4).await;
        voter
            .purge_logs_upto(LogId::new(CommittedLeaderId::new(1, 1), 2))
            .await
            .unwrap();
        let copy = store("whole-copy");
        let catchup = voter.catchup(None);
        assert!(matches!(catchup, Catchup::Whole { .. }));
        assert!(copy.follow(catchup).unwrap());
        assert_eq!(registry(&copy), registry(&voter));
        assert_eq!(copy.applied_index(), Some(4));
    }

    #[tokio::test]
    async fn entries_out_of_order_are_not_applied_and_raft_does_not_apply_a_copied_one_again() {
        let voter = voter("order", 3).await;
        let mut copy = store("order-copy");
        let Catchup::Entries(entries) = voter.catchup(None) else {
            panic!("the log holds every entry");
        };
        // A gap: entry 2 without 0 and 1.
        assert!(
            !copy
                .follow(Catchup::Entries(entries[2..].to_vec()))
                .unwrap()
        );
        assert_eq!(copy.applied_index(), None);
        assert!(copy.follow(Catchup::Entries(entries.clone())).unwrap());
        let copied = registry(&copy);
        // Made a voter, this node gets entries 2 and 3 from Raft again. Here they add other
        // members, so were they applied, the registry would change.
        let fresh: Vec<Entry<TypeConfig>> = (2..4).map(|index| join("late", index)).collect();
        copy.apply_to_state_machine(&fresh).await.unwrap();
        assert_eq!(registry(&copy), copied);
        assert_eq!(copy.applied_index(), Some(3));
    }
}
