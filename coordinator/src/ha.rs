//! Several coordinators on one grid: what each knows of the others ([`Cluster`]), and, on etcd, the
//! election that makes one of them the leader ([`run_etcd`]).
//!
//! With the embedded store a coordinator is alone and always the leader, at term 0. On etcd every member
//! campaigns on `PREFIX/election` with a lease of `store.etcd.lease_ttl_secs` and registers itself under
//! `PREFIX/members/NAME` with the same lease. Until it wins, a member is a follower: it keeps its view
//! current by watching the store, serves reads, and refuses writes naming the leader. Once it wins, its term
//! is the election key's creation revision; it fences the store with that key (a commit applies only while
//! the key exists with that revision), reloads its view from the store, and only then starts the leader's
//! work (resuming the operations in flight, the poller, the purge). Every agent job it sends carries the
//! term. A leader whose lease cannot be renewed within its TTL stops leading: it exits (status 1), so that
//! its supervisor restarts it as a follower, and nothing of it acts again.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions};
use gridforge_proto::v1::{CoordinatorMember, CoordinatorStatusResponse};
use serde::{Deserialize, Serialize};

use crate::ops::Engine;
use crate::store::{EtcdStore, Fence, StoreError, etcd_error};

/// gRPC metadata naming the leader's address on a refused write (gridctl sends the call there).
pub const LEADER_HEADER: &str = "x-gridforge-leader";
/// gRPC metadata on answers served from a view that may be out of date.
pub const STALE_HEADER: &str = "x-gridforge-stale";

/// A member's name and the address gridctl reaches it at, as stored in its keys.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub address: String,
}

#[derive(Debug, Default)]
struct State {
    leader: Option<Member>,
    /// The leader's term as observed (this member's own once it leads).
    leader_term: u64,
    members: Vec<Member>,
    applied_revision: i64,
    stale: Option<String>,
}

/// This coordinator's view of the coordinators sharing its grid.
pub struct Cluster {
    backend: &'static str,
    me: Member,
    /// The store whose revision the status reports (etcd only).
    store: Option<std::sync::Arc<EtcdStore>>,
    leading: AtomicBool,
    term: AtomicU64,
    state: Mutex<State>,
}

impl Cluster {
    /// The only coordinator of its grid: the leader, at term 0.
    pub fn embedded(me: Member) -> Cluster {
        let state = State { leader: Some(me.clone()), members: vec![me.clone()], ..Default::default() };
        Cluster {
            backend: "embedded",
            me,
            store: None,
            leading: AtomicBool::new(true),
            term: AtomicU64::new(0),
            state: Mutex::new(state),
        }
    }

    /// A member of a grid on etcd: a follower until it wins the election.
    pub fn etcd(me: Member, store: std::sync::Arc<EtcdStore>) -> Cluster {
        Cluster {
            backend: "etcd",
            me,
            store: Some(store),
            leading: AtomicBool::new(false),
            term: AtomicU64::new(0),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// The term every agent job carries: the election revision this coordinator won with (0: embedded).
    pub fn term(&self) -> u64 {
        self.term.load(Ordering::SeqCst)
    }

    pub fn me(&self) -> &Member {
        &self.me
    }

    /// The current leader, as last observed.
    pub fn leader(&self) -> Option<Member> {
        self.state().leader.clone()
    }

    /// Why this member refuses a write, naming the leader when one is known.
    pub fn not_leader(&self) -> String {
        match self.leader() {
            Some(l) => format!(
                "coordinator {} is not the leader: {} at {} leads; send writes there (gridctl does)",
                self.me.name, l.name, l.address
            ),
            None => match self.stale() {
                Some(why) => format!(
                    "coordinator {} is not the leader, and no leader can be elected while the grid store (etcd) \
                     does not answer ({why}); nothing was changed",
                    self.me.name
                ),
                None => format!(
                    "coordinator {} is not the leader, and no leader is elected yet: try again in a few seconds",
                    self.me.name
                ),
            },
        }
    }

    /// The reason the view may be out of date, if it may be.
    pub fn stale(&self) -> Option<String> {
        self.state().stale.clone()
    }

    pub fn set_stale(&self, reason: Option<String>) {
        let mut s = self.state();
        if s.stale.is_none()
            && let Some(r) = &reason
        {
            tracing::warn!("the grid view may be stale: {r}");
        } else if s.stale.is_some() && reason.is_none() {
            tracing::info!("the grid store answers again");
        }
        s.stale = reason;
    }

    fn set_leader(&self, leader: Option<Member>, term: u64) {
        let mut s = self.state();
        s.leader = leader;
        s.leader_term = term;
    }

    fn set_members(&self, members: Vec<Member>) {
        self.state().members = members;
    }

    pub fn set_applied(&self, revision: i64) {
        let mut s = self.state();
        s.applied_revision = s.applied_revision.max(revision);
    }

    fn become_leader(&self, term: u64) {
        self.term.store(term, Ordering::SeqCst);
        self.set_leader(Some(self.me.clone()), term);
        self.leading.store(true, Ordering::SeqCst);
    }

    /// The answer of `gridctl coordinator status`.
    pub fn status(&self) -> CoordinatorStatusResponse {
        let store_revision = self.store.as_ref().map_or(0, |s| s.revision());
        let s = self.state();
        let leader = s.leader.clone().unwrap_or_default();
        // The leader's view moves by its own commits: it is at the store's revision.
        let applied = if self.is_leader() { store_revision } else { s.applied_revision };
        CoordinatorStatusResponse {
            store: self.backend.to_string(),
            member: self.me.name.clone(),
            members: s
                .members
                .iter()
                .map(|m| CoordinatorMember {
                    name: m.name.clone(),
                    address: m.address.clone(),
                    leader: m.name == leader.name,
                })
                .collect(),
            leader: leader.name.clone(),
            leader_address: leader.address.clone(),
            term: if self.is_leader() { self.term() } else { s.leader_term },
            store_revision,
            applied_revision: applied,
            lag: (store_revision - applied).max(0),
            stale: s.stale.is_some(),
            stale_reason: s.stale.clone().unwrap_or_default(),
        }
    }
}

/// What the daemon starts once this coordinator leads (resume, poller, purge), called once.
pub type OnLeading = Box<dyn FnOnce() + Send>;

/// The follower's and leader's work on etcd: follow the store into `view` and campaign until elected (a
/// follower whose lease expires, etcd being out of reach, takes a new one and campaigns again), then lead.
/// Returns, with the reason, only once this coordinator led and lost its lease: the daemon then exits.
pub async fn run_etcd(
    store: std::sync::Arc<EtcdStore>,
    engine: Engine,
    ttl: Duration,
    loaded_at: i64,
    on_leading: OnLeading,
) -> String {
    let prefix = store.prefix().to_string();
    let election = format!("{prefix}/election");
    let cluster = engine.cluster().clone();
    let me = cluster.me().clone();
    let value = serde_json::to_string(&me).unwrap_or_default();
    let mut client = store.client();
    cluster.set_applied(loaded_at);
    let watching = tokio::spawn(follow_store(store.clone(), engine.clone(), loaded_at));
    tokio::spawn(follow_members(client.clone(), prefix.clone(), election.clone(), cluster.clone()));
    let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(10);

    let (key, mut lost_rx) = loop {
        // The lease every key of this member hangs on.
        let lease = match client.lease_grant(ttl_secs, None).await {
            Ok(l) => l.id(),
            Err(e) => {
                cluster.set_stale(Some(format!("cannot reach etcd for a lease: {}", etcd_error(&e))));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let (lost_tx, mut lost_rx) = tokio::sync::mpsc::channel::<String>(1);
        let keeper = tokio::spawn(keep_alive(client.clone(), lease, ttl, lost_tx));
        let member_key = format!("{prefix}/members/{}", me.name);
        if let Err(e) = client.put(member_key, value.clone(), Some(PutOptions::new().with_lease(lease))).await
        {
            tracing::warn!("cannot register as a member: {e}");
        }
        let mut campaigner = client.clone();
        let campaign = async {
            loop {
                match campaigner.campaign(election.clone(), value.clone(), lease).await {
                    Ok(mut resp) => match resp.take_leader() {
                        Some(key) => return key,
                        None => tracing::warn!("the election answered without a leader key"),
                    },
                    Err(e) => {
                        tracing::warn!("campaigning failed: {e}; trying again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        };
        tokio::select! {
            key = campaign => break (key, lost_rx),
            reason = lost_rx.recv() => {
                tracing::warn!("follower's lease lost ({}); taking a new one", reason.unwrap_or_default());
                keeper.abort();
            }
        }
    };
    let term = u64::try_from(key.rev()).unwrap_or(0);
    tracing::info!(term, member = %me.name, "elected leader");
    // Stop following, fence the store with the election key and read it whole: only then does this member
    // lead (accept writes, resume, poll), so nothing it decides is lost to the reload.
    watching.abort();
    let _ = watching.await;
    store.set_fence(Some(Fence { key: key.key().to_vec(), revision: key.rev() }));
    let reloaded = {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || engine.view().reload_from_store()).await
    };
    match reloaded {
        Ok(Ok(revision)) => {
            cluster.set_applied(revision);
            tracing::info!(revision, "grid view reloaded for the new term");
        }
        Ok(Err(e)) => return format!("cannot reload the grid view as the new leader: {e}"),
        Err(e) => return format!("cannot reload the grid view as the new leader: {e}"),
    }
    cluster.become_leader(term);
    on_leading();
    lost_rx.recv().await.unwrap_or_else(|| "the lease keeper stopped".into())
}

/// Renew `lease` every third of `ttl`; report on `lost` once it cannot be renewed before it expires.
async fn keep_alive(mut client: Client, lease: i64, ttl: Duration, lost: tokio::sync::mpsc::Sender<String>) {
    let every = ttl / 3;
    let mut renewed = tokio::time::Instant::now();
    loop {
        let attempt = async {
            let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            Ok::<_, etcd_client::Error>(stream.message().await?.map(|r| r.ttl()))
        };
        match tokio::time::timeout(every.max(Duration::from_millis(500)), attempt).await {
            Ok(Ok(Some(left))) if left > 0 => renewed = tokio::time::Instant::now(),
            Ok(Ok(_)) => {
                let _ = lost.send(format!("the lease {lease:x} expired: etcd no longer knows it")).await;
                return;
            }
            Ok(Err(e)) => tracing::warn!("cannot renew the lease: {}", etcd_error(&e)),
            Err(_) => tracing::warn!("renewing the lease took longer than {} ms", every.as_millis()),
        }
        if renewed.elapsed() >= ttl {
            let _ =
                lost.send(format!("the lease could not be renewed for {} s (its TTL)", ttl.as_secs())).await;
            return;
        }
        tokio::time::sleep_until(renewed + every).await;
    }
}

/// Keep `view` current from the store's watch, from revision `from` on; mark the view stale while the
/// watch is down. Ends when aborted (the member became the leader).
async fn follow_store(store: std::sync::Arc<EtcdStore>, engine: Engine, from: i64) {
    let cluster = engine.cluster().clone();
    let mut applied = from;
    loop {
        let result = store
            .watch(applied, |changes, revision| {
                if !changes.is_empty() {
                    engine.view().apply_external(&changes);
                }
                applied = applied.max(revision);
                cluster.set_applied(revision);
                cluster.set_stale(None);
                true
            })
            .await;
        if let Err(e) = result {
            cluster.set_stale(Some(format!("following the store failed: {e}")));
            if matches!(&e, StoreError::Unavailable(m) if m.contains("compacted")) {
                // History this member missed is gone: read everything again.
                let e = engine.clone();
                if let Ok(Ok(revision)) =
                    tokio::task::spawn_blocking(move || e.view().reload_from_store()).await
                {
                    applied = revision;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Keep the cluster's member list and leader current (every second: both change rarely).
async fn follow_members(
    mut client: Client,
    prefix: String,
    election: String,
    cluster: std::sync::Arc<Cluster>,
) {
    let members_prefix = format!("{prefix}/members/");
    // Calls that fail in a row: one failure is a dead member answering first, not a lost store.
    let mut failures = 0u32;
    loop {
        let listed = client.get(members_prefix.clone(), Some(GetOptions::new().with_prefix())).await;
        match &listed {
            Ok(resp) => {
                let mut members: Vec<Member> =
                    resp.kvs().iter().filter_map(|kv| serde_json::from_slice(kv.value()).ok()).collect();
                members.sort_by(|a, b| a.name.cmp(&b.name));
                cluster.set_members(members);
            }
            Err(e) => tracing::debug!("listing the members: {}", etcd_error(e)),
        }
        if !cluster.is_leader() {
            match client.leader(election.clone()).await {
                Ok(resp) => {
                    let kv = resp.kv();
                    let leader = kv.and_then(|kv| serde_json::from_slice::<Member>(kv.value()).ok());
                    let term = kv.map_or(0, |kv| u64::try_from(kv.create_revision()).unwrap_or(0));
                    cluster.set_leader(leader, term);
                }
                Err(e) if e.to_string().contains("no leader") => cluster.set_leader(None, 0),
                Err(_) => {}
            }
        }
        failures = if listed.is_ok() { 0 } else { failures + 1 };
        // The leader's view is its own: it is stale only while the store does not answer. A follower's
        // staleness is its watch's.
        if cluster.is_leader() {
            match &listed {
                Ok(_) => cluster.set_stale(None),
                Err(e) if failures >= 3 => {
                    cluster.set_stale(Some(format!("etcd does not answer: {}", etcd_error(e))))
                }
                Err(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
