//! Long-polls: how instances with `spec.events.source: longpoll` learn of their
//! changes without any webhook (docs/user-guide.md, "Behind a firewall").
//!
//! The replica responsible for an instance (the same rendezvous hashing over
//! the live replicas that decides who delivers it, [`super::membership`]) holds one
//! `files/list_folder/longpoll` open with the instance's committed cursor. When
//! Dropbox answers `changes: true`, the instance is synced exactly as a webhook
//! would have it synced ([`Syncer::sync_now`]: list, deliver, commit), and the
//! next long-poll starts from the cursor that sync committed. So a long-poll
//! never runs ahead of delivery: whatever happened after the committed cursor,
//! also while no replica was polling (a restart, a crash, a hand-over), makes
//! the next long-poll answer `changes: true` at once.
//!
//! - `backoff` in an answer is honoured before the next long-poll;
//! - `reset` (the cursor was invalidated) runs the same sync, whose
//!   `list_folder/continue` meets the reset and re-baselines with one `UNKNOWN`
//!   event, as for webhooks;
//! - other failures are retried with bounded exponential backoff;
//! - a sync started by anyone else (the resync on start, on the interval, on a
//!   membership change) ends the long-poll in flight; it polls again from the
//!   cursor that sync committed;
//! - when the live replicas change, each replica starts and stops long-polls
//!   so that every instance is polled by its responsible replica; on SIGTERM
//!   every long-poll stops at once (they hold nothing that needs draining).
//!
//! A long-poll costs one task and one pending request on the shared Dropbox
//! client (HTTP/2 multiplexes them on one connection where Dropbox offers it);
//! the cursor is read from the API server only after a sync moved it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::membership::Membership;
use super::projections::{Projection, Projections};
use super::sync::Syncer;
use crate::api::EventSource;
use crate::metrics::ResultLabels;
use crate::retry::backoff_delay;

/// Settings of the long-polls.
#[derive(Clone, Debug)]
pub struct LongPollConfig {
    /// How long one long-poll waits for changes (Dropbox: 30–480 s).
    pub timeout: Duration,
    /// First delay after a failed long-poll (doubles, with jitter).
    pub base_backoff: Duration,
    /// Upper bound of the delay between failed long-polls.
    pub max_backoff: Duration,
}

/// How often the set of long-polls is checked even when nothing woke it.
const RECHECK: Duration = Duration::from_secs(30);
/// Cursor reads from the API server running at once.
const CURSOR_READS: usize = 32;

/// Whether `instance` wants its changes long-polled.
pub fn wants_longpoll(p: &Projection) -> bool {
    p.instance.source == EventSource::LongPoll
}

/// Keeps one long-poll running for every long-polled instance this replica is
/// responsible for, until `draining`.
pub async fn run(
    syncer: Arc<Syncer>,
    projections: Arc<Projections>,
    membership: Arc<Membership>,
    config: LongPollConfig,
    draining: CancellationToken,
) {
    tokio::select! {
        _ = projections.wait_ready() => {}
        _ = draining.cancelled() => return,
    }
    let mut instances_changed = projections.subscribe();
    // Wait (briefly) for the live set, so replicas that start together do not
    // each poll everything for a moment.
    let mut members = membership.subscribe();
    tokio::select! {
        _ = tokio::time::timeout(Duration::from_secs(5), members.wait_for(|v| *v > 0)) => {}
        _ = draining.cancelled() => return,
    }
    let mut polls: HashMap<String, CancellationToken> = HashMap::new();
    // Bounds the cursor reads of many long-polls starting at once.
    let reads = Arc::new(Semaphore::new(CURSOR_READS));
    loop {
        let wanted: HashSet<String> = projections
            .all()
            .iter()
            .filter(|p| wants_longpoll(p))
            .map(|p| p.uid().to_owned())
            .filter(|uid| membership.owns(uid))
            .collect();
        polls.retain(|uid, stop| {
            let keep = wanted.contains(uid) && !stop.is_cancelled();
            if !keep {
                stop.cancel();
            }
            keep
        });
        let mut started = 0;
        for uid in wanted {
            if polls.contains_key(&uid) {
                continue;
            }
            let stop = draining.child_token();
            polls.insert(uid.clone(), stop.clone());
            tokio::spawn(poll(
                syncer.clone(),
                uid,
                config.clone(),
                reads.clone(),
                stop,
            ));
            started += 1;
        }
        syncer.metrics.longpolls.set(polls.len() as i64);
        if started > 0 {
            tracing::debug!(started, total = polls.len(), "long-polls started");
        }
        tokio::select! {
            _ = instances_changed.changed() => {}
            _ = members.changed() => {}
            _ = tokio::time::sleep(RECHECK) => {}
            _ = draining.cancelled() => break,
        }
    }
    // Every long-poll's token is a child of `draining`: they are stopping.
    syncer.metrics.longpolls.set(0);
    tracing::info!(
        stopped = polls.len(),
        "long-polls stopped (the next replica resumes from the committed cursors)"
    );
}

fn count(syncer: &Syncer, result: &'static str) {
    syncer
        .metrics
        .longpoll_results
        .get_or_create(&ResultLabels { result })
        .inc();
}

/// Sleeps for `delay`; false when `stop` came first.
async fn pause(delay: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = stop.cancelled() => false,
    }
}

/// Syncs `uid` now and waits for its commit; false when `stop` came first.
async fn sync(syncer: &Arc<Syncer>, uid: &str, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = syncer.sync_now(uid) => true,
        _ = stop.cancelled() => false,
    }
}

/// The committed cursor, read with one of `reads`' permits.
async fn read_cursor(
    syncer: &Syncer,
    uid: &str,
    reads: &Semaphore,
) -> Result<Option<(String, bool)>, kube::Error> {
    let _permit = reads
        .acquire()
        .await
        .expect("the semaphore is never closed");
    syncer.committed_cursor(uid).await
}

/// One instance's long-poll loop, until `stop`.
async fn poll(
    syncer: Arc<Syncer>,
    uid: String,
    config: LongPollConfig,
    reads: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let mut idle = syncer.watch_idle(&uid);
    let mut failures: u32 = 0;
    // The committed cursor as last read; None: read it again (a sync moved it).
    let mut cursor: Option<String> = None;
    loop {
        if stop.is_cancelled() {
            return;
        }
        // While a sync of the instance is queued or running, its cursor is about
        // to move: poll from where it ends.
        if !*idle.borrow_and_update() {
            let settled = tokio::select! {
                settled = idle.wait_for(|idle| *idle) => settled.is_ok(),
                _ = stop.cancelled() => return,
            };
            if !settled {
                // That worker is gone (its instance left the cache for a
                // moment): watch the one that replaces it.
                idle = syncer.watch_idle(&uid);
            }
            cursor = None;
        }
        let current = match cursor.clone() {
            Some(c) => c,
            None => match read_cursor(&syncer, &uid, &reads).await {
                Ok(Some((_, true))) => {
                    // The controller re-baselined the cursor (a new folder): the
                    // sync delivers the UNKNOWN event and commits.
                    if !sync(&syncer, &uid, &stop).await {
                        return;
                    }
                    continue;
                }
                Ok(Some((c, false))) => c,
                Ok(None) => {
                    // The controller sets the first cursor once the instance is
                    // authorized; look again soon.
                    failures = failures.saturating_add(1);
                    let delay = backoff_delay(
                        config.base_backoff,
                        config.max_backoff.min(Duration::from_secs(10)),
                        failures,
                        None,
                    );
                    tracing::debug!(instance_uid = %uid, retry_in = ?delay, "no cursor yet; long-poll waits");
                    if !pause(delay, &stop).await {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let delay =
                        backoff_delay(config.base_backoff, config.max_backoff, failures, None);
                    tracing::warn!(instance_uid = %uid, error = %e, retry_in = ?delay, "reading the cursor failed; long-poll retries");
                    if !pause(delay, &stop).await {
                        return;
                    }
                    continue;
                }
            },
        };
        let answer = tokio::select! {
            answer = syncer.deliverer.dropbox.list_folder_longpoll(&current, config.timeout) => Ok(answer),
            // Someone else started a sync: poll again from the cursor it commits.
            busy = idle.wait_for(|idle| !*idle) => Err(busy.is_ok()),
            _ = stop.cancelled() => return,
        };
        let answer = match answer {
            Ok(answer) => answer,
            Err(watching) => {
                if !watching {
                    idle = syncer.watch_idle(&uid);
                    // Not a busy loop should it keep failing.
                    if !pause(config.base_backoff, &stop).await {
                        return;
                    }
                }
                cursor = None;
                continue;
            }
        };
        match answer {
            Ok(result) => {
                failures = 0;
                cursor = Some(current);
                if result.changes {
                    count(&syncer, "changes");
                    tracing::debug!(instance_uid = %uid, "long-poll: changes");
                    if !sync(&syncer, &uid, &stop).await {
                        return;
                    }
                    cursor = None;
                } else {
                    count(&syncer, "timeout");
                }
                if let Some(secs) = result.backoff {
                    // Dropbox asks for a pause before the next long-poll (the
                    // changes were fetched already).
                    tracing::debug!(instance_uid = %uid, backoff_secs = secs, "long-poll: Dropbox asked for a backoff");
                    if !pause(Duration::from_secs(secs), &stop).await {
                        return;
                    }
                }
            }
            Err(e) if e.tag() == Some("reset") => {
                count(&syncer, "reset");
                tracing::info!(instance_uid = %uid, "long-poll: cursor reset by Dropbox; syncing to re-baseline");
                failures = 0;
                if !sync(&syncer, &uid, &stop).await {
                    return;
                }
                cursor = None;
            }
            Err(e) => {
                count(&syncer, "error");
                failures = failures.saturating_add(1);
                cursor = None;
                let delay = backoff_delay(
                    config.base_backoff,
                    config.max_backoff,
                    failures,
                    e.retry_after(),
                );
                tracing::warn!(instance_uid = %uid, error = %e, retry_in = ?delay, "long-poll failed; retrying");
                if !pause(delay, &stop).await {
                    return;
                }
            }
        }
    }
}
