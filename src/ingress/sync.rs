//! Syncs: from a trigger (a webhook, a long-poll, a resync) to delivered events
//! and a committed cursor, one worker per instance (docs/architecture.md,
//! "Delivery").
//!
//! A worker serializes and coalesces the syncs of its instance. It syncs only
//! while the fence lets this replica deliver the instance
//! ([`super::membership`]); a trigger for an instance another replica delivers
//! waits until the replicas agree on who that is and is then dropped (that
//! replica got it too). A sync lists a batch of changes from the committed
//! cursor ([`Deliverer::list`]), delivers its notifications in order, each POST
//! fenced again, and only then commits the cursor after it, with the
//! resourceVersion of the cursor it listed from as precondition.
//!
//! Broken callbacks isolate themselves: a sync holds one of
//! `--max-concurrent-syncs` slots only while it works, never while it waits
//! to retry; an instance whose deliveries are failing retries with slots of
//! its own, smaller pool, so failing instances never queue in front of healthy
//! ones; and slots are shared round-robin between tenants (namespaces), so one
//! tenant's many stalling callbacks queue behind each other, not in front of
//! another tenant's instance.
//! A failure that retrying cannot fix, or failures for longer than
//! `--delivery-park-after`, park the instance: its cursor stays, and a change of
//! its spec or its resume annotation starts it again. Every failure is reported
//! (EventsDelivering=False with the reason) at once, and the next success
//! reports True.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::cursors::{Commit, Committed, CursorError, Cursors};
use super::delivery::{Batch, CallbackFailure, Deliverer, ListError, Page};
use super::membership::{Decision, Membership};
use super::projections::{Projection, Projections};
use super::reports::Reports;
use super::slots::FairSlots;
use crate::conditions::Reason;
use crate::dropbox::DropboxError;
use crate::metrics::{IngressMetrics, ReasonLabels, ResultLabels};
use crate::retry::backoff_delay;

/// Batches one sync works through before it yields to other instances (the
/// rest follows in the next sync at once).
const MAX_BATCHES_PER_SYNC: usize = 50;
/// Refused commits in a row before the instance reports CursorCommitFailed.
const COMMIT_REFUSALS_REPORTED: u32 = 2;

/// Settings of deliveries.
#[derive(Clone, Debug)]
pub struct DeliveryConfig {
    pub timeout: Duration,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// An instance whose callback keeps failing for this long is parked.
    pub park_after: Duration,
}

/// Shared state of the ingress's sync machinery.
pub struct Syncer {
    pub deliverer: Deliverer,
    pub projections: Arc<Projections>,
    pub membership: Arc<Membership>,
    pub cursors: Cursors,
    pub reports: Arc<Reports>,
    pub metrics: IngressMetrics,
    pub config: DeliveryConfig,
    workers: Mutex<HashMap<String, Arc<Worker>>>,
    /// Syncs at work at once, of instances whose deliveries succeed.
    permits: Arc<FairSlots>,
    /// Syncs at work at once, of instances whose deliveries are failing.
    retry_permits: Arc<FairSlots>,
    /// Worker tasks, so a shutdown can wait for them.
    tasks: tokio_util::task::TaskTracker,
    /// Cancelled on SIGTERM: no new sync starts, no new POST.
    draining: CancellationToken,
    /// Cancelled when the drain time is up: everything stops at once.
    stop: CancellationToken,
}

/// The pending work of one instance.
struct Worker {
    wake: Notify,
    /// When the oldest trigger not yet synced arrived.
    pending: Mutex<Option<Instant>>,
    /// True while no sync is queued or running (changed under `pending`'s lock):
    /// what a long-poll waits for before it polls from the committed cursor.
    idle: tokio::sync::watch::Sender<bool>,
    /// Whether its task runs (a worker may exist before its first trigger).
    started: std::sync::atomic::AtomicBool,
}

impl Default for Worker {
    fn default() -> Self {
        Worker {
            wake: Notify::new(),
            pending: Mutex::new(None),
            idle: tokio::sync::watch::Sender::new(true),
            started: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Worker {
    /// Marks the worker idle unless a trigger is pending.
    fn settle(&self) {
        let pending = self.pending.lock().expect("pending lock");
        if pending.is_none() {
            self.idle.send_replace(true);
        }
    }

    /// Drops the pending trigger.
    fn drop_pending(&self) {
        *self.pending.lock().expect("pending lock") = None;
        self.settle();
    }
}

/// A failing instance's state between attempts.
#[derive(Default)]
struct Streak {
    failures: u32,
    since: Option<Instant>,
    /// The batch being delivered when the callback failed: retried as it is.
    held: Option<Batch>,
    /// A page listed after the last batch, the first of the next one.
    carried: Option<Page>,
    commit_refusals: u32,
}

/// How a sync ended early.
#[derive(Debug)]
enum Failure {
    /// Shutting down.
    Stopped,
    /// The fence closed (another replica delivers the instance now, or this
    /// one's lease is short): wait, then list again from the committed cursor.
    Fenced,
    /// Not for long (the controller is moving the cursor): retried quietly.
    NotReady(String),
    Callback(CallbackFailure),
    Dropbox(DropboxError),
    Cursor(CursorError),
    Commit(String),
}

impl Failure {
    /// EventsDelivering's reason and message, when the failure is reported.
    fn report(&self, commit_refusals: u32) -> Option<(Reason, String)> {
        match self {
            Failure::Stopped | Failure::Fenced | Failure::NotReady(_) => None,
            Failure::Callback(f) => Some((f.reason, f.message.clone())),
            Failure::Dropbox(e) => {
                let reason = match e {
                    DropboxError::RateLimited { .. } => Reason::RateLimited,
                    DropboxError::MissingScope { .. } => Reason::MissingScope,
                    DropboxError::Unavailable { .. }
                    | DropboxError::Transport(_)
                    | DropboxError::NotSent(_)
                    | DropboxError::Decode(_) => Reason::DropboxUnavailable,
                    _ => Reason::DropboxRejected,
                };
                Some((
                    reason,
                    format!("Listing the changes failed: {e}; retrying with backoff"),
                ))
            }
            Failure::Cursor(CursorError::Missing(_) | CursorError::Empty) => Some((
                Reason::CursorMissing,
                format!("{}; the controller makes a new one", self.message()),
            )),
            // The API server cannot be reached: nothing could be written either.
            Failure::Cursor(CursorError::Kube(_) | CursorError::Timeout) => None,
            Failure::Commit(m) => (commit_refusals >= COMMIT_REFUSALS_REPORTED).then(|| {
                (
                    Reason::CursorCommitFailed,
                    format!(
                        "Committing the cursor was refused again and again: {m}; \
                         the events are delivered again (same ids) until it works"
                    ),
                )
            }),
        }
    }

    fn message(&self) -> String {
        match self {
            Failure::Stopped => "stopped".into(),
            Failure::Fenced => "another replica delivers the instance now".into(),
            Failure::NotReady(m) | Failure::Commit(m) => m.clone(),
            Failure::Callback(f) => f.message.clone(),
            Failure::Dropbox(e) => e.to_string(),
            Failure::Cursor(e) => e.to_string(),
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::Callback(f) => f.retry_after,
            Failure::Dropbox(e) => e.retry_after(),
            _ => None,
        }
    }
}

/// What a sync did.
struct Outcome {
    /// Events were delivered.
    delivered: bool,
    /// More changes are waiting.
    more: bool,
}

impl Syncer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        deliverer: Deliverer,
        projections: Arc<Projections>,
        membership: Arc<Membership>,
        cursors: Cursors,
        reports: Arc<Reports>,
        metrics: IngressMetrics,
        config: DeliveryConfig,
        concurrent_syncs: usize,
        draining: CancellationToken,
        stop: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Syncer {
            deliverer,
            projections,
            membership,
            cursors,
            reports,
            metrics,
            config,
            workers: Mutex::default(),
            permits: FairSlots::new(concurrent_syncs),
            retry_permits: FairSlots::new((concurrent_syncs / 4).max(1)),
            tasks: tokio_util::task::TaskTracker::new(),
            draining,
            stop,
        })
    }

    /// Queues a sync of the instance with `uid` (never runs it inline).
    pub fn trigger(self: &Arc<Self>, uid: &str) {
        self.trigger_worker(uid);
    }

    /// Queues a sync of `uid` and waits until it (and any sync queued after it)
    /// has ended, so the instance's cursor is committed past every change known
    /// when it was called. A failing sync is retried by its worker with backoff;
    /// this keeps waiting meanwhile (callers select on cancellation).
    pub async fn sync_now(self: &Arc<Self>, uid: &str) {
        let Some(worker) = self.trigger_worker(uid) else {
            return;
        };
        let mut idle = worker.idle.subscribe();
        let _ = idle.wait_for(|idle| *idle).await;
    }

    /// A receiver that sees `false` whenever a sync of `uid` is queued or
    /// running, whoever asked for it (a webhook, a resync, a long-poll).
    pub fn watch_idle(&self, uid: &str) -> tokio::sync::watch::Receiver<bool> {
        let mut workers = self.workers.lock().expect("workers lock");
        workers
            .entry(uid.to_owned())
            .or_insert_with(|| Arc::new(Worker::default()))
            .idle
            .subscribe()
    }

    fn trigger_worker(self: &Arc<Self>, uid: &str) -> Option<Arc<Worker>> {
        if self.draining.is_cancelled() {
            return None;
        }
        let worker = self
            .workers
            .lock()
            .expect("workers lock")
            .entry(uid.to_owned())
            .or_insert_with(|| Arc::new(Worker::default()))
            .clone();
        let new = !worker
            .started
            .swap(true, std::sync::atomic::Ordering::AcqRel);
        {
            let mut pending = worker.pending.lock().expect("pending lock");
            pending.get_or_insert_with(Instant::now);
            worker.idle.send_replace(false);
        }
        worker.wake.notify_one();
        if new {
            self.tasks
                .spawn(self.clone().run_worker(uid.to_owned(), worker.clone()));
        }
        self.update_queue_depth();
        Some(worker)
    }

    /// Waits until every worker has finished (after `draining` was cancelled).
    pub async fn drained(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn update_queue_depth(&self) {
        let workers = self.workers.lock().expect("workers lock");
        let depth = workers
            .values()
            .filter(|w| w.pending.lock().expect("pending lock").is_some())
            .count();
        self.metrics.queue_depth.set(depth as i64);
    }

    /// The committed cursor of instance `uid` (as this replica last saw it, else
    /// read) and whether the controller asked for a re-baseline; None while the
    /// controller has not set the first cursor.
    pub async fn committed_cursor(&self, uid: &str) -> Result<Option<(String, bool)>, kube::Error> {
        if let Some(c) = self.cursors.last_known(uid) {
            return Ok(Some((c.cursor, c.reset_pending)));
        }
        match self.cursors.read(uid, self.membership.epoch()).await {
            Ok(c) => Ok(Some((c.cursor, c.reset_pending))),
            Err(CursorError::Missing(_) | CursorError::Empty) => Ok(None),
            Err(CursorError::Kube(e)) => Err(e),
            Err(CursorError::Timeout) => Err(kube::Error::Service("no answer in time".into())),
        }
    }

    /// Waits for the fence to change (at most a second: a lease also runs out).
    /// False when draining.
    async fn wait_fence(&self, fences: &mut tokio::sync::watch::Receiver<u64>) -> bool {
        tokio::select! {
            _ = fences.changed() => true,
            _ = tokio::time::sleep(Duration::from_secs(1)) => true,
            _ = self.draining.cancelled() => false,
        }
    }

    async fn run_worker(self: Arc<Self>, uid: String, worker: Arc<Worker>) {
        let mut streak = Streak::default();
        let mut fences = self.membership.subscribe();
        loop {
            let pending = *worker.pending.lock().expect("pending lock");
            let Some(since) = pending else {
                tokio::select! {
                    _ = worker.wake.notified() => continue,
                    _ = self.draining.cancelled() => return,
                }
            };
            // A replica that just started knows which deliveries are parked first.
            tokio::select! {
                _ = self.reports.wait_ready() => {}
                _ = self.draining.cancelled() => return,
            }
            let Some(projection) = self.projections.get(&uid) else {
                // The instance is gone (or events are off): so is its worker (a
                // later trigger makes a new one).
                self.workers.lock().expect("workers lock").remove(&uid);
                self.cursors.forget(&uid);
                worker.drop_pending();
                self.update_queue_depth();
                return;
            };
            if self.reports.parked(&projection.instance) {
                // Nothing happens until the instance changes (see Reports::parked).
                streak = Streak::default();
                worker.drop_pending();
                self.update_queue_depth();
                continue;
            }
            let epoch = match self.membership.decide(&uid) {
                Decision::Deliver { epoch } => epoch,
                Decision::Wait => {
                    if !self.wait_fence(&mut fences).await {
                        return;
                    }
                    continue;
                }
                Decision::NotMine => {
                    if self.membership.settled() {
                        // The replica responsible for it got the trigger too.
                        streak = Streak::default();
                        worker.drop_pending();
                        self.update_queue_depth();
                    } else if !self.wait_fence(&mut fences).await {
                        return;
                    }
                    continue;
                }
            };
            let pool = if streak.failures == 0 {
                &self.permits
            } else {
                &self.retry_permits
            };
            let permit = tokio::select! {
                permit = pool.acquire(&projection.instance.namespace) => permit,
                _ = self.draining.cancelled() => return,
            };
            // Taken now: triggers from here on are a new sync.
            *worker.pending.lock().expect("pending lock") = None;
            self.update_queue_depth();
            let result = tokio::select! {
                result = self.sync(&uid, &projection, epoch, since, &mut streak) => result,
                _ = self.stop.cancelled() => Err(Failure::Stopped),
            };
            drop(permit);
            match result {
                Ok(outcome) => {
                    // A failure or a parked delivery said False: the next
                    // sync that goes through says True again.
                    let recovered = streak.failures > 0
                        || self.reports.current(&uid).is_some_and(|s| !s.delivering);
                    streak = Streak::default();
                    self.count_sync("success");
                    if outcome.delivered || recovered {
                        self.reports
                            .succeeded(&projection.instance, outcome.delivered)
                            .await;
                    }
                    if outcome.more {
                        self.requeue(&worker, since);
                    } else {
                        worker.settle();
                    }
                }
                Err(Failure::Stopped) => return,
                Err(Failure::Fenced) => {
                    // Listed again from the committed cursor once the fence opens.
                    streak.held = None;
                    streak.carried = None;
                    self.requeue(&worker, since);
                }
                Err(failure) => {
                    self.count_sync("error");
                    streak.failures = streak.failures.saturating_add(1);
                    let failing_for = streak.since.get_or_insert_with(Instant::now).elapsed();
                    let park = match &failure {
                        Failure::Callback(f) => {
                            f.permanent || failing_for >= self.config.park_after
                        }
                        _ => false,
                    };
                    if let Some((reason, message)) = failure.report(streak.commit_refusals) {
                        let message = if park {
                            park_message(&projection, &message, failing_for, self.config.park_after)
                        } else {
                            message
                        };
                        self.reports
                            .failed(&projection.instance, reason, message, park)
                            .await;
                    }
                    if park {
                        tracing::warn!(
                            instance = %projection.key(), error = %failure.message(),
                            "delivery parked until the instance changes"
                        );
                        streak = Streak::default();
                        worker.drop_pending();
                        continue;
                    }
                    let delay = backoff_delay(
                        self.config.base_backoff,
                        self.config.max_backoff,
                        streak.failures,
                        failure.retry_after(),
                    );
                    tracing::warn!(
                        instance = %projection.key(), error = %failure.message(), retry_in = ?delay,
                        "sync failed; retrying"
                    );
                    // No permit is held while waiting.
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.draining.cancelled() => return,
                    }
                    self.requeue(&worker, since);
                }
            }
        }
    }

    fn count_sync(&self, result: &'static str) {
        self.metrics
            .syncs
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    fn requeue(&self, worker: &Worker, since: Instant) {
        worker
            .pending
            .lock()
            .expect("pending lock")
            .get_or_insert(since);
        worker.wake.notify_one();
    }

    /// The committed cursor to list from in `epoch`: held since the epoch began,
    /// else read (another replica may have committed meanwhile).
    async fn committed(&self, uid: &str, p: &Projection, epoch: u64) -> Result<Committed, Failure> {
        let fits =
            |c: &Committed| c.account == p.instance.account_id && c.folder == p.instance.folder;
        if let Some(c) = self.cursors.cached(uid, epoch).filter(fits) {
            return Ok(c);
        }
        let c = self
            .cursors
            .read(uid, epoch)
            .await
            .map_err(Failure::Cursor)?;
        if !fits(&c) {
            return Err(Failure::NotReady(
                "the controller has not set the cursor for the instance's account and folder yet"
                    .into(),
            ));
        }
        Ok(c)
    }

    /// One sync: batches of changes listed, delivered and committed, until none
    /// is waiting or the budget is spent.
    async fn sync(
        &self,
        uid: &str,
        p: &Projection,
        epoch: u64,
        since: Instant,
        streak: &mut Streak,
    ) -> Result<Outcome, Failure> {
        let mut delivered = false;
        for _ in 0..MAX_BATCHES_PER_SYNC {
            if self.draining.is_cancelled() {
                // Shutting down: what is committed stays; the rest is the next replica's.
                return Err(Failure::Stopped);
            }
            let committed = self.committed(uid, p, epoch).await?;
            let mut batch = match streak.held.take() {
                Some(mut b) if b.epoch == epoch && b.from == committed.cursor => {
                    // Listed before this sync's trigger: list again after it.
                    b.fresh = false;
                    b
                }
                _ => {
                    let (batch, carry) = self
                        .deliverer
                        .list(
                            p,
                            epoch,
                            &committed.cursor,
                            committed.committed_at,
                            committed.reset_pending,
                            streak.carried.take(),
                            || {
                                self.projections
                                    .get(uid)
                                    .and_then(|p| p.access_token.clone())
                            },
                        )
                        .await
                        .map_err(|e| match e {
                            ListError::Dropbox(e) => Failure::Dropbox(e),
                            ListError::NoToken => Failure::NotReady(
                                "the controller has not projected an access token".into(),
                            ),
                        })?;
                    streak.carried = carry;
                    batch
                }
            };
            tracing::debug!(
                notifications = batch.notifications.len(),
                took = ?since.elapsed(),
                "changes fetched and standardized"
            );
            while batch.next < batch.notifications.len() {
                if self.draining.is_cancelled() {
                    return Err(Failure::Stopped);
                }
                // Fenced: a POST starts only while this replica delivers the
                // instance in the epoch the batch was listed in.
                let Some(_post) = self.membership.enter(uid, epoch) else {
                    return Err(Failure::Fenced);
                };
                let n = &batch.notifications[batch.next];
                match self.deliverer.attempt(p, n).await {
                    Ok(()) => {
                        self.metrics.events_delivered.inc_by(n.event_count as u64);
                        self.metrics.notifications_delivered.inc();
                        batch.next += 1;
                        delivered = true;
                    }
                    Err(failure) => {
                        self.metrics
                            .delivery_failures
                            .get_or_create(&ReasonLabels {
                                reason: failure.reason.as_str(),
                            })
                            .inc();
                        if !failure.permanent {
                            self.metrics.delivery_retries.inc();
                        }
                        streak.held = Some(batch);
                        return Err(Failure::Callback(failure));
                    }
                }
            }
            if !batch.notifications.is_empty() {
                self.metrics
                    .delivery_latency
                    .observe(since.elapsed().as_secs_f64());
            }
            // Commit only after delivery, and only over the cursor the batch was listed from.
            if batch.cursor != committed.cursor || committed.reset_pending {
                match self.cursors.commit(uid, &committed, &batch.cursor).await {
                    Ok(Commit::Done) => streak.commit_refusals = 0,
                    Ok(Commit::Conflict) => {
                        // Written meanwhile (the controller re-baselined it): what
                        // was sent is sent again if still due, with the same ids.
                        self.metrics.cursor_conflicts.inc();
                        streak.commit_refusals += 1;
                        if streak.commit_refusals >= COMMIT_REFUSALS_REPORTED {
                            return Err(Failure::Commit(
                                "the cursor ConfigMap keeps changing under the commit".into(),
                            ));
                        }
                        return Ok(Outcome {
                            delivered,
                            more: true,
                        });
                    }
                    Err(CursorError::Missing(name)) => {
                        return Err(Failure::Cursor(CursorError::Missing(name)));
                    }
                    Err(e) => {
                        // Delivered: the retry only commits.
                        streak.commit_refusals += 1;
                        streak.held = Some(batch);
                        let why = match e {
                            CursorError::Kube(kube::Error::Api(status)) => {
                                format!(
                                    "the API server answered {}: {}",
                                    status.code, status.message
                                )
                            }
                            other => other.to_string(),
                        };
                        return Err(Failure::Commit(why));
                    }
                }
            }
            if !batch.has_more && batch.fresh {
                tracing::debug!(took = ?since.elapsed(), "delivered and committed");
                return Ok(Outcome {
                    delivered,
                    more: false,
                });
            }
        }
        Ok(Outcome {
            delivered,
            more: true,
        })
    }
}

/// The message of a parked delivery: why, and how to resume it.
fn park_message(
    p: &Projection,
    message: &str,
    failing_for: Duration,
    park_after: Duration,
) -> String {
    let why = if failing_for >= park_after {
        format!(
            "Delivery is parked after failing for {}s: {message}.",
            failing_for.as_secs()
        )
    } else {
        format!("Delivery is parked: {message}; retrying cannot help.")
    };
    format!(
        "{why} Nothing is lost (the cursor waits). Fix the callback, then resume with any change \
         of the spec or `kubectl annotate dbxi {} -n {} {}=$(date +%s) --overwrite`",
        p.instance.name,
        p.instance.namespace,
        crate::contract::RESUME_ANNOTATION
    )
}
