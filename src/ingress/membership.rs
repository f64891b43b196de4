//! Who delivers which instance: one replica per instance, and a fence that
//! keeps two replicas from ever delivering the same instance at the same time
//! (docs/architecture.md, "One syncer per instance").
//!
//! Every replica renews its entry in the heartbeats ConfigMap ([`Heartbeat`]):
//! an expiry (its lease), its *view* (the replicas it counts as live) and its
//! peer address. The replica responsible for an instance under a view is the
//! rendezvous-hashing winner among the view's members, so when a replica comes
//! or goes only its share of instances moves.
//!
//! The fence, checked before a page is listed and again before every POST
//! ([`Membership::enter`]), lets replica R deliver instance I only while
//!
//! 1. R is responsible for I under the view it has *advertised* (written with
//!    a successful heartbeat) and under the view it is about to advertise;
//! 2. R's own lease lasts at least one delivery timeout (plus a margin) longer:
//!    a POST started now ends before R could be taken for dead;
//! 3. no other replica whose entry has not expired (plus a clock-skew margin)
//!    advertises a view under which *it* is responsible for I.
//!
//! A replica advertises a new view only after its POSTs for the instances that
//! view takes away have ended. R's decisions use a state of the ConfigMap that
//! contains R's latest write, and so does every other replica's; of two
//! replicas that both advertise being responsible for I, the one that wrote
//! last sees the other's entry and waits. A replica that dies stops
//! advertising when its entry expires, and every POST it started ended before
//! that. Pages carry the [`Membership::epoch`] they were listed in: when it
//! changes (a view advertised, a lease that lapsed) a half-delivered page is
//! dropped and listed again from the committed cursor.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::contract::{self, Heartbeat};

/// Timings of the fence.
#[derive(Clone, Debug)]
pub struct FenceConfig {
    /// How long an entry is valid after it was written (the lease).
    pub validity: Duration,
    /// How far apart the replicas' clocks may be.
    pub skew: Duration,
    /// The longest a POST may take (the delivery timeout).
    pub post_bound: Duration,
    /// Slack between a fence check and the start of a POST.
    pub margin: Duration,
}

impl FenceConfig {
    /// The timings for a heartbeat interval and a delivery timeout: an entry
    /// outlives three missed renewals and one whole POST.
    pub fn new(heartbeat_interval: Duration, delivery_timeout: Duration) -> Self {
        FenceConfig {
            validity: (heartbeat_interval * 3 + delivery_timeout).max(Duration::from_secs(3)),
            skew: Duration::from_secs(2),
            post_bound: delivery_timeout,
            margin: Duration::from_secs(1),
        }
    }
}

/// What the fence says about one instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// This replica may list and deliver it; pages carry this epoch.
    Deliver { epoch: u64 },
    /// This replica is responsible for it but may not deliver yet (its view is
    /// not advertised, its lease is short, another replica still claims it).
    Wait,
    /// Another replica is responsible for it.
    NotMine,
}

/// Where a webhook for an instance has to go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// This replica.
    Me,
    /// Another replica, at its peer address.
    Peer { id: String, addr: String },
}

/// Another replica's entry as last seen.
#[derive(Clone, Debug)]
struct Peer {
    id: String,
    expires: jiff::Timestamp,
    view: Vec<String>,
    addr: Option<String>,
}

#[derive(Default)]
struct State {
    /// The view of this replica's last successful heartbeat write.
    advertised: Vec<String>,
    /// The view it is moving to: the live replicas as last seen (itself
    /// included); empty until the first heartbeat answered, or when draining.
    target: Vec<String>,
    epoch: u64,
    /// When the lease of the last successful renewal ends (monotonic clock).
    lease_until: Option<Instant>,
    /// The other replicas' entries, from a ConfigMap state that contains this
    /// replica's latest write.
    peers: Vec<Peer>,
    /// This replica's latest written entry.
    written: Option<String>,
    /// POSTs in flight, by instance.
    inflight: HashMap<String, usize>,
    /// Set on SIGTERM: nothing is delivered any more.
    released: bool,
}

/// The live replicas, this replica's place among them, and the fence.
pub struct Membership {
    /// Key of this replica in the heartbeats ConfigMap.
    key: String,
    /// Its short id in views.
    id: String,
    addr: Option<String>,
    config: FenceConfig,
    state: Mutex<State>,
    /// Counts changes that may open or close fences or move instances.
    changes: tokio::sync::watch::Sender<u64>,
    /// Woken when a POST ends.
    posts_ended: tokio::sync::Notify,
}

/// Rendezvous score of replica `id` for instance `uid`.
fn score(id: &str, uid: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(id.as_bytes())
        .chain_update([0u8])
        .chain_update(uid.as_bytes())
        .finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// The member of `view` responsible for `uid`.
pub fn owner<'a>(view: &'a [String], uid: &str) -> Option<&'a str> {
    view.iter()
        .max_by_key(|id| (score(id, uid), id.as_str()))
        .map(String::as_str)
}

impl State {
    fn decide(
        &self,
        me: &str,
        uid: &str,
        config: &FenceConfig,
        now: (Instant, jiff::Timestamp),
    ) -> Decision {
        if self.released || owner(&self.target, uid) != Some(me) {
            return Decision::NotMine;
        }
        if owner(&self.advertised, uid) != Some(me) {
            return Decision::Wait;
        }
        let needed = config.post_bound + config.margin;
        if self.lease_until.is_none_or(|until| until < now.0 + needed) {
            return Decision::Wait;
        }
        let skew = jiff::SignedDuration::try_from(config.skew).unwrap_or_default();
        let claimed = self.peers.iter().any(|p| {
            p.expires.checked_add(skew).is_ok_and(|t| now.1 < t)
                && owner(&p.view, uid) == Some(p.id.as_str())
        });
        if claimed {
            return Decision::Wait;
        }
        Decision::Deliver { epoch: self.epoch }
    }

    /// The live replicas of the known entries, `me` included, sorted.
    fn live(&self, me: &str, now: jiff::Timestamp) -> Vec<String> {
        let mut live: Vec<String> = self
            .peers
            .iter()
            .filter(|p| p.expires > now)
            .map(|p| p.id.clone())
            .chain(std::iter::once(me.to_owned()))
            .collect();
        live.sort();
        live.dedup();
        live
    }
}

/// Keeps a POST counted as in flight until dropped.
pub struct InFlight<'a> {
    membership: &'a Membership,
    uid: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut state = self.membership.state.lock().expect("membership lock");
        if let Some(n) = state.inflight.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                state.inflight.remove(&self.uid);
            }
        }
        drop(state);
        self.membership.posts_ended.notify_waiters();
    }
}

impl Membership {
    /// `identity` names this replica (the pod name); `addr` is its peer address.
    pub fn new(identity: &str, addr: Option<String>, config: FenceConfig) -> Self {
        let key = contract::heartbeat_key(identity);
        Membership {
            id: contract::replica_id(&key),
            key,
            addr,
            config,
            state: Mutex::default(),
            changes: tokio::sync::watch::Sender::new(0),
            posts_ended: tokio::sync::Notify::new(),
        }
    }

    /// Key of this replica in the heartbeats ConfigMap.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Short id of this replica in views.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn config(&self) -> &FenceConfig {
        &self.config
    }

    /// Sees every change that may open or close fences (the value counts them;
    /// 0: nothing known yet).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    fn now() -> (Instant, jiff::Timestamp) {
        (Instant::now(), jiff::Timestamp::now())
    }

    /// What the fence says about instance `uid` now.
    pub fn decide(&self, uid: &str) -> Decision {
        let state = self.state.lock().expect("membership lock");
        state.decide(&self.id, uid, &self.config, Self::now())
    }

    /// Whether this replica is (or is becoming) responsible for `uid`: the
    /// instances it long-polls and resyncs.
    pub fn owns(&self, uid: &str) -> bool {
        let state = self.state.lock().expect("membership lock");
        !state.released && owner(&state.target, uid) == Some(self.id.as_str())
    }

    /// The current epoch (see [`Decision::Deliver`]).
    pub fn epoch(&self) -> u64 {
        self.state.lock().expect("membership lock").epoch
    }

    /// Counts a POST for `uid` as in flight when the fence allows delivering it
    /// in `epoch`; None when it does not (the page must be dropped).
    pub fn enter(&self, uid: &str, epoch: u64) -> Option<InFlight<'_>> {
        let mut state = self.state.lock().expect("membership lock");
        if state.decide(&self.id, uid, &self.config, Self::now()) != (Decision::Deliver { epoch }) {
            return None;
        }
        *state.inflight.entry(uid.to_owned()).or_default() += 1;
        Some(InFlight {
            membership: self,
            uid: uid.to_owned(),
        })
    }

    /// Whether every live replica advertises the view this replica is moving to
    /// and has advertised it itself: then an instance another replica is
    /// responsible for will be delivered by that replica.
    pub fn settled(&self) -> bool {
        let state = self.state.lock().expect("membership lock");
        let now = jiff::Timestamp::now();
        !state.target.is_empty()
            && state.advertised == state.target
            && state
                .peers
                .iter()
                .filter(|p| p.expires > now)
                .all(|p| p.view == state.target)
    }

    /// Where a webhook for `uid` has to go: the replica responsible for it
    /// under this replica's view and under every live replica's advertised
    /// view (one replica once the views agree; several while they move).
    pub fn route(&self, uid: &str) -> Vec<Route> {
        let state = self.state.lock().expect("membership lock");
        let now = jiff::Timestamp::now();
        let mut owners: Vec<&str> = Vec::new();
        let views = std::iter::once(&state.target).chain(
            state
                .peers
                .iter()
                .filter(|p| p.expires > now)
                .map(|p| &p.view),
        );
        for view in views {
            if let Some(o) = owner(view, uid)
                && !owners.contains(&o)
            {
                owners.push(o);
            }
        }
        let mut routes = Vec::new();
        for o in owners {
            if o == self.id {
                routes.push(Route::Me);
            } else if let Some(addr) = state
                .peers
                .iter()
                .find(|p| p.id == o)
                .and_then(|p| p.addr.clone())
            {
                routes.push(Route::Peer {
                    id: o.to_owned(),
                    addr,
                });
            }
        }
        if routes.is_empty() {
            // Nothing known yet (or no address): keep it here; the worker
            // waits until it knows who delivers.
            routes.push(Route::Me);
        }
        routes
    }

    /// The view the next heartbeat advertises (the replicas as last seen), and
    /// the instances it takes away whose POSTs are still in flight.
    pub fn prepare(&self) -> (Vec<String>, bool) {
        let mut state = self.state.lock().expect("membership lock");
        if state.written.is_none() {
            // The first write claims nothing: this replica knows no one yet.
            return (Vec::new(), false);
        }
        let target = if state.released {
            Vec::new()
        } else {
            state.live(&self.id, jiff::Timestamp::now())
        };
        if state.target != target {
            state.target = target.clone();
            drop(state);
            self.changed();
            state = self.state.lock().expect("membership lock");
        }
        let busy = state.inflight.keys().any(|uid| {
            owner(&state.advertised, uid) == Some(self.id.as_str())
                && owner(&target, uid) != Some(self.id.as_str())
        });
        (target, busy)
    }

    /// Waits until no POST is in flight for an instance `view` takes away from
    /// this replica (they end within the delivery timeout).
    pub async fn drained_for(&self, view: &[String]) {
        loop {
            let ended = self.posts_ended.notified();
            let busy = {
                let state = self.state.lock().expect("membership lock");
                state.inflight.keys().any(|uid| {
                    owner(&state.advertised, uid) == Some(self.id.as_str())
                        && owner(view, uid) != Some(self.id.as_str())
                })
            };
            if !busy {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), ended).await;
        }
    }

    /// Waits until no POST is in flight at all.
    pub async fn drained(&self) {
        loop {
            let ended = self.posts_ended.notified();
            if self
                .state
                .lock()
                .expect("membership lock")
                .inflight
                .is_empty()
            {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), ended).await;
        }
    }

    /// The entry to write for `view`, with its expiry from now.
    pub fn entry(&self, view: &[String]) -> Heartbeat {
        let validity = jiff::SignedDuration::try_from(self.config.validity)
            .unwrap_or(jiff::SignedDuration::from_secs(15));
        Heartbeat {
            expires: jiff::Timestamp::now()
                .checked_add(validity)
                .unwrap_or(jiff::Timestamp::MAX),
            view: view.to_vec(),
            addr: self.addr.clone(),
        }
    }

    /// A heartbeat write of `value` advertising `view`, sent at `sent`,
    /// succeeded; `data` is the ConfigMap it answered with.
    pub fn renewed(
        &self,
        sent: Instant,
        value: String,
        view: Vec<String>,
        data: &BTreeMap<String, String>,
    ) {
        let mut state = self.state.lock().expect("membership lock");
        if state.lease_until.is_some_and(|until| until <= sent) {
            // The lease ran out before this renewal: others may have delivered
            // this replica's instances meanwhile.
            state.epoch += 1;
        }
        if state.advertised != view {
            state.epoch += 1;
            state.advertised = view;
        }
        state.lease_until = Some(sent + self.config.validity);
        state.written = Some(value);
        self.take_peers(&mut state, data);
        drop(state);
        self.changed();
    }

    /// A state of the ConfigMap seen by the watch: used when it contains this
    /// replica's latest write (an older one could hide a claim made since).
    /// Returns whether the view to advertise changed.
    pub fn observe(&self, data: &BTreeMap<String, String>) -> bool {
        let mut state = self.state.lock().expect("membership lock");
        if state.written.is_none() || data.get(&self.key) != state.written.as_ref() {
            return false;
        }
        self.take_peers(&mut state, data);
        let target = if state.released {
            Vec::new()
        } else {
            state.live(&self.id, jiff::Timestamp::now())
        };
        let moved = target != state.advertised;
        drop(state);
        self.changed();
        moved
    }

    fn take_peers(&self, state: &mut State, data: &BTreeMap<String, String>) {
        state.peers = data
            .iter()
            .filter(|(key, _)| **key != self.key)
            .filter_map(|(key, value)| {
                let h = Heartbeat::parse(value)?;
                Some(Peer {
                    id: contract::replica_id(key),
                    expires: h.expires,
                    view: h.view,
                    addr: h.addr,
                })
            })
            .collect();
        if state.target.is_empty() && !state.released {
            state.target = state.live(&self.id, jiff::Timestamp::now());
        }
    }

    /// SIGTERM: deliver nothing more (POSTs in flight end on their own).
    pub fn release(&self) {
        let mut state = self.state.lock().expect("membership lock");
        state.released = true;
        state.target.clear();
        drop(state);
        self.changed();
    }

    /// Whether the lease lasts for less than a POST: woken fences re-check.
    pub fn lease_short(&self) -> bool {
        let state = self.state.lock().expect("membership lock");
        state.lease_until.is_none_or(|until| {
            until < Instant::now() + self.config.post_bound + self.config.margin
        })
    }

    /// The instance uids among `uids` this replica is responsible for.
    pub fn owned<'a>(&self, uids: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let state = self.state.lock().expect("membership lock");
        if state.released {
            return Vec::new();
        }
        uids.into_iter()
            .filter(|uid| owner(&state.target, uid) == Some(self.id.as_str()))
            .map(str::to_owned)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> FenceConfig {
        FenceConfig {
            validity: Duration::from_secs(10),
            skew: Duration::from_secs(2),
            post_bound: Duration::from_secs(2),
            margin: Duration::from_millis(100),
        }
    }

    /// The heartbeats ConfigMap, as the replicas write it.
    #[derive(Default)]
    struct Board(BTreeMap<String, String>);

    impl Board {
        /// Replica `m` renews: prepare, (drain,) write, read the answer.
        fn beat(&mut self, m: &Membership) {
            let (view, busy) = m.prepare();
            assert!(!busy, "{} has POSTs in flight", m.key());
            let value = m.entry(&view).to_value();
            self.0.insert(m.key().to_owned(), value.clone());
            m.renewed(Instant::now(), value, view, &self.0);
        }
    }

    /// Every replica renews until all views agree.
    fn converge(board: &mut Board, ms: &[&Membership]) {
        for _ in 0..4 {
            for m in ms {
                board.beat(m);
            }
        }
    }

    fn replica(name: &str) -> Membership {
        Membership::new(name, Some(format!("{name}:8082")), config())
    }

    fn deliverers(ms: &[&Membership], uid: &str) -> Vec<String> {
        ms.iter()
            .filter(|m| matches!(m.decide(uid), Decision::Deliver { .. }))
            .map(|m| m.key().to_owned())
            .collect()
    }

    #[test]
    fn every_instance_has_exactly_one_deliverer_once_views_settle() {
        let (a, b, c) = (
            replica("ingress-a"),
            replica("ingress-b"),
            replica("ingress-c"),
        );
        let mut board = Board::default();
        converge(&mut board, &[&a, &b, &c]);
        assert!(a.settled() && b.settled() && c.settled());
        let mut per_replica: HashMap<String, usize> = HashMap::new();
        for i in 0..300 {
            let uid = format!("uid-{i}");
            let d = deliverers(&[&a, &b, &c], &uid);
            assert_eq!(d.len(), 1, "{uid}: {d:?}");
            *per_replica.entry(d[0].clone()).or_default() += 1;
            assert_eq!(a.route(&uid).len(), 1);
        }
        assert!(per_replica.values().all(|&n| n > 50), "{per_replica:?}");
    }

    #[test]
    fn a_joining_replica_waits_until_the_old_one_lets_go() {
        let a = replica("ingress-a");
        let mut board = Board::default();
        board.beat(&a);
        board.beat(&a);
        // An instance that moves to b once b is live.
        let b = replica("ingress-b");
        let ids = vec![a.id().to_owned(), b.id().to_owned()];
        let uid = (0..100)
            .map(|i| format!("uid-{i}"))
            .find(|u| owner(&ids, u) == Some(b.id()))
            .unwrap();
        assert_eq!(deliverers(&[&a, &b], &uid), ["ingress-a"]);
        // a is delivering it (a POST in flight).
        let epoch = a.epoch();
        let post = a.enter(&uid, epoch).expect("a may deliver");
        board.beat(&b); // claims nothing
        board.beat(&b); // advertises {a, b}: responsible for uid, but a claims it
        assert_eq!(b.decide(&uid), Decision::Wait);
        assert_eq!(
            a.decide(&uid),
            Decision::Deliver { epoch },
            "a has not seen b yet"
        );
        // a sees b: it stops delivering uid at once, advertises only once its POST ended.
        assert!(a.observe(&board.0));
        assert_eq!(a.decide(&uid), Decision::Wait);
        let (_, busy) = a.prepare();
        assert!(busy);
        assert_eq!(a.decide(&uid), Decision::NotMine);
        assert!(a.enter(&uid, epoch).is_none(), "no new POST");
        assert_eq!(deliverers(&[&a, &b], &uid), Vec::<String>::new());
        drop(post);
        board.beat(&a);
        assert_ne!(a.epoch(), epoch, "a's half-delivered pages are dropped");
        b.observe(&board.0);
        assert_eq!(deliverers(&[&a, &b], &uid), ["ingress-b"]);
    }

    #[test]
    fn two_replicas_never_both_deliver_whatever_the_order_of_writes() {
        // Replicas join and leave in every order; after each write, at most one
        // may deliver each instance.
        let names = ["ingress-a", "ingress-b", "ingress-c", "ingress-d"];
        let ms: Vec<Membership> = names.iter().map(|n| replica(n)).collect();
        let mut board = Board::default();
        let uids: Vec<String> = (0..64).map(|i| format!("uid-{i}")).collect();
        let check = |ms: &[&Membership]| {
            for uid in &uids {
                let d = deliverers(ms, uid);
                assert!(d.len() <= 1, "{uid}: {d:?}");
            }
        };
        let order = [0, 1, 0, 2, 1, 3, 0, 2, 3, 1, 0, 1, 2, 3, 3, 2, 1, 0];
        for (step, &i) in order.iter().enumerate() {
            let m = &ms[i];
            let (view, busy) = m.prepare();
            if !busy {
                let value = m.entry(&view).to_value();
                board.0.insert(m.key().to_owned(), value.clone());
                m.renewed(Instant::now(), value, view, &board.0);
            }
            // Some replicas see the change through the watch, some do not.
            if step % 3 == 0 {
                for other in &ms {
                    other.observe(&board.0);
                }
            }
            check(&ms.iter().collect::<Vec<_>>());
        }
        converge(&mut board, &ms.iter().collect::<Vec<_>>());
        for uid in &uids {
            assert_eq!(deliverers(&ms.iter().collect::<Vec<_>>(), uid).len(), 1);
        }
    }

    #[test]
    fn a_dead_replica_is_taken_over_after_its_lease() {
        let a = replica("ingress-a");
        let b = replica("ingress-b");
        let mut board = Board::default();
        converge(&mut board, &[&a, &b]);
        let ids = vec![a.id().to_owned(), b.id().to_owned()];
        let uid = (0..100)
            .map(|i| format!("uid-{i}"))
            .find(|u| owner(&ids, u) == Some(b.id()))
            .unwrap();
        assert_eq!(deliverers(&[&a, &b], &uid), ["ingress-b"]);
        // b's entry expired long ago (it died): a takes uid over.
        let mut dead = Heartbeat::parse(&board.0[b.key()]).unwrap();
        dead.expires = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(60);
        board.0.insert(b.key().to_owned(), dead.to_value());
        board.beat(&a);
        board.beat(&a);
        assert!(matches!(a.decide(&uid), Decision::Deliver { .. }));
        // Expired, but within the clock skew: not yet.
        dead.expires = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(1);
        board.0.insert(b.key().to_owned(), dead.to_value());
        board.beat(&a);
        assert_eq!(a.decide(&uid), Decision::Wait);
    }

    #[test]
    fn a_released_replica_delivers_nothing() {
        let a = replica("ingress-a");
        let mut board = Board::default();
        board.beat(&a);
        board.beat(&a);
        assert!(matches!(a.decide("uid-1"), Decision::Deliver { .. }));
        a.release();
        assert_eq!(a.decide("uid-1"), Decision::NotMine);
        assert!(a.owned(["uid-1"]).is_empty());
    }

    #[test]
    fn a_lapsed_lease_starts_a_new_epoch() {
        let a = replica("ingress-a");
        let mut board = Board::default();
        board.beat(&a);
        board.beat(&a);
        let epoch = a.epoch();
        let (view, _) = a.prepare();
        let value = a.entry(&view).to_value();
        board.0.insert(a.key().to_owned(), value.clone());
        a.renewed(
            Instant::now() + Duration::from_secs(60),
            value,
            view,
            &board.0,
        );
        assert_ne!(a.epoch(), epoch);
    }
}
