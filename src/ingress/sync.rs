//! Syncs: from a Dropbox notification to delivered events and a committed cursor.
//!
//! One worker per instance serializes its syncs; triggers that arrive while a
//! sync runs are coalesced into one more sync, and at most `--max-concurrent-syncs`
//! syncs run at once in a replica. A sync reads the committed cursor from the
//! instance's cursor ConfigMap in the operator namespace, then page by page: lists
//! the changes (`list_folder/continue`), turns them into events, delivers them in
//! notifications of at most 20 (retrying until the callback takes them), and only
//! then commits the page's new cursor with a resourceVersion precondition, so two
//! replicas never both commit and a cursor only moves forward. One page is held
//! in memory at a time (docs/architecture.md, "Delivery").

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::payload::{self, Format, InstanceInfo, Notification};
use super::secrets::InstanceSecrets;
use super::ssrf::{self, AddressPolicy};
use crate::api::{DropboxElementInstance, EventFormat};
use crate::conditions::{self, Desired, EVENTS_DELIVERING, Reason};
use crate::contract::{self, COMMITTED_AT_KEY, CURSOR_KEY, PATH_KEY, RESET_PENDING_KEY};
use crate::dropbox::{DropboxClient, DropboxError};
use crate::metrics::IngressMetrics;
use crate::retry::{backoff_delay, error_chain};

/// How stale `status.events.lastDeliveryTime` may get while deliveries flow.
pub const LAST_DELIVERY_RESOLUTION: std::time::Duration = std::time::Duration::from_secs(30);

/// Field manager of everything the ingress writes.
pub const FIELD_MANAGER: &str = contract::INGRESS_FIELD_MANAGER;
/// Pages one sync works through before it yields to other instances (the rest
/// follows in the next sync at once).
const MAX_PAGES_PER_SYNC: usize = 50;

/// Settings of deliveries.
#[derive(Clone, Debug)]
pub struct DeliveryConfig {
    pub timeout: Duration,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

/// Shared state of the ingress's sync machinery.
pub struct Syncer {
    pub client: Client,
    pub dropbox: DropboxClient,
    pub secrets: InstanceSecrets,
    /// The operator namespace (projected Secrets, cursors).
    pub namespace: String,
    pub policy: AddressPolicy,
    pub callbacks: reqwest::Client,
    pub metrics: IngressMetrics,
    pub config: DeliveryConfig,
    pub instances: kube::runtime::reflector::Store<DropboxElementInstance>,
    workers: Mutex<HashMap<String, Arc<Worker>>>,
    /// Bounds the syncs running at once in this replica.
    sync_permits: tokio::sync::Semaphore,
    /// Worker tasks, so a shutdown can wait for them.
    tasks: tokio_util::task::TaskTracker,
    /// Cancelled on SIGTERM: no new sync starts, a failing delivery stops
    /// retrying, a sync that is delivering finishes its page and commits.
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
}

/// Why a sync stopped early; it is retried when the next trigger arrives or,
/// for `Retry`, after a backoff.
#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("Dropbox: {0}")]
    Dropbox(#[from] DropboxError),
    #[error("{0}")]
    NotReady(String),
    #[error("stopped")]
    Stopped,
}

/// When the cursor in `cm` was committed: its `committedAt`, else (a cursor
/// from before that key existed) when the ConfigMap was created.
fn committed_at(cm: &ConfigMap) -> jiff::Timestamp {
    cm.data
        .as_ref()
        .and_then(|d| d.get(COMMITTED_AT_KEY))
        .and_then(|t| t.parse().ok())
        .or_else(|| cm.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

impl Syncer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        namespace: &str,
        dropbox: DropboxClient,
        policy: AddressPolicy,
        callbacks: reqwest::Client,
        metrics: IngressMetrics,
        config: DeliveryConfig,
        instances: kube::runtime::reflector::Store<DropboxElementInstance>,
        concurrent_syncs: usize,
        draining: CancellationToken,
        stop: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Syncer {
            secrets: InstanceSecrets::new(client.clone(), namespace, metrics.secret_reads.clone()),
            namespace: namespace.to_owned(),
            client,
            dropbox,
            policy,
            callbacks,
            metrics,
            config,
            instances,
            workers: Mutex::default(),
            sync_permits: tokio::sync::Semaphore::new(concurrent_syncs),
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
    /// has succeeded, so the instance's cursor is committed past every change
    /// known when it was called. A failing sync is retried by its worker with
    /// backoff; this keeps waiting meanwhile (callers select on cancellation).
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

    async fn run_worker(self: Arc<Self>, uid: String, worker: Arc<Worker>) {
        let mut failures: u32 = 0;
        loop {
            tokio::select! {
                _ = worker.wake.notified() => {}
                _ = self.draining.cancelled() => return,
            }
            let Some(since) = *worker.pending.lock().expect("pending lock") else {
                continue;
            };
            if self.instance(&uid).is_none() {
                // The instance is gone: so is its worker (a later trigger makes a new one).
                self.workers.lock().expect("workers lock").remove(&uid);
                self.secrets.forget(&uid);
                self.update_queue_depth();
                *worker.pending.lock().expect("pending lock") = None;
                worker.settle();
                return;
            }
            let permit = tokio::select! {
                permit = self.sync_permits.acquire() => permit,
                _ = self.draining.cancelled() => return,
            };
            // Taken now: triggers from here on are a new sync.
            *worker.pending.lock().expect("pending lock") = None;
            self.update_queue_depth();
            let result = tokio::select! {
                result = self.sync(&uid, since) => result,
                _ = self.stop.cancelled() => Err(SyncError::Stopped),
            };
            drop(permit);
            match result {
                Ok(more) => {
                    failures = 0;
                    self.metrics
                        .syncs
                        .get_or_create(&crate::metrics::ResultLabels { result: "success" })
                        .inc();
                    if more {
                        self.requeue(&worker, since);
                    } else {
                        worker.settle();
                    }
                }
                Err(SyncError::Stopped) => return,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    self.metrics
                        .syncs
                        .get_or_create(&crate::metrics::ResultLabels { result: "error" })
                        .inc();
                    let retry_after = match &e {
                        SyncError::Dropbox(d) => d.retry_after(),
                        _ => None,
                    };
                    let delay = backoff_delay(
                        self.config.base_backoff,
                        self.config.max_backoff,
                        failures,
                        retry_after,
                    );
                    tracing::warn!(instance_uid = %uid, error = %e, retry_in = ?delay, "sync failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.draining.cancelled() => return,
                    }
                    self.requeue(&worker, since);
                }
            }
        }
    }

    fn requeue(&self, worker: &Worker, since: Instant) {
        worker
            .pending
            .lock()
            .expect("pending lock")
            .get_or_insert(since);
        worker.wake.notify_one();
    }

    fn instance(&self, uid: &str) -> Option<Arc<DropboxElementInstance>> {
        self.instances
            .state()
            .into_iter()
            .find(|i| i.uid().as_deref() == Some(uid))
    }

    /// The committed cursor of instance `uid` and whether the controller asked
    /// for a re-baseline (`resetPending`); None while the controller has not set
    /// the first cursor (or the ConfigMap is not the operator's).
    pub async fn committed_cursor(&self, uid: &str) -> Result<Option<(String, bool)>, kube::Error> {
        let configmaps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let Some(cm) = configmaps
            .get_opt(&contract::cursor_configmap_name(uid))
            .await?
            .filter(|cm| contract::is_managed(cm.metadata.labels.as_ref()))
        else {
            return Ok(None);
        };
        let data = cm.data.unwrap_or_default();
        let reset_pending = data.get(RESET_PENDING_KEY).is_some_and(|v| v == "true");
        Ok(data
            .get(CURSOR_KEY)
            .filter(|c| !c.is_empty())
            .map(|c| (c.clone(), reset_pending)))
    }

    /// The access token of an instance, from its projected Secret (`force`
    /// re-reads it, e.g. after the controller refreshed it).
    async fn access_token(&self, uid: &str, force: bool) -> Result<String, SyncError> {
        self.secrets
            .get(uid, force)
            .await?
            .and_then(|p| p.access_token.clone())
            .ok_or_else(|| {
                SyncError::NotReady(
                    "the controller has not projected the instance's access token yet".into(),
                )
            })
    }

    /// One sync. Returns whether more changes are waiting (another replica
    /// committed first, or the page budget ran out).
    async fn sync(&self, uid: &str, since: Instant) -> Result<bool, SyncError> {
        let Some(instance) = self.instance(uid) else {
            return Ok(false);
        };
        let Some(events) = instance.spec.events.clone().filter(|e| e.enabled) else {
            return Ok(false);
        };
        let ns = instance.namespace().unwrap_or_default();
        let configmaps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let cm_name = contract::cursor_configmap_name(uid);
        let not_set = || SyncError::NotReady("the first cursor is not set yet".into());
        let mut cm = configmaps.get_opt(&cm_name).await?.ok_or_else(not_set)?;
        if !contract::is_managed(cm.metadata.labels.as_ref()) {
            return Err(SyncError::NotReady(format!(
                "ConfigMap {cm_name} was not made by dropbox-operator"
            )));
        }
        let info = InstanceInfo {
            uid: uid.to_owned(),
            namespace: ns.clone(),
            name: instance.name_any(),
            display_name: instance
                .spec
                .name
                .clone()
                .unwrap_or_else(|| instance.name_any()),
            tags: instance.spec.tags.clone().unwrap_or_default(),
            account_id: instance
                .status
                .as_ref()
                .and_then(|s| s.account.as_ref())
                .and_then(|a| a.account_id.clone())
                .unwrap_or_default(),
        };
        let format = match events.format {
            EventFormat::Elements => Format::Elements,
            EventFormat::CloudEvents => Format::CloudEvents,
        };
        // The notification as this instance may see it: its own account only,
        // the same whatever triggered the sync (a webhook, a restart, a resync).
        let raw = json!({"list_folder": {"accounts": [info.account_id]}});

        let mut token = self.access_token(uid, false).await?;
        let mut refreshed_token = false;
        let mut delivered = false;
        let mut pages = 0;
        loop {
            if self.draining.is_cancelled() {
                // Shutting down: what is committed stays; the rest is for the next replica.
                return Err(SyncError::Stopped);
            }
            let committed_at = committed_at(&cm);
            let cursor_before = cm
                .data
                .as_ref()
                .and_then(|d| d.get(CURSOR_KEY))
                .cloned()
                .filter(|c| !c.is_empty())
                .ok_or_else(not_set)?;
            let data = cm.data.clone().unwrap_or_default();
            let folder = data.get(PATH_KEY).cloned().unwrap_or_default();
            let reset_pending = data.get(RESET_PENDING_KEY).is_some_and(|v| v == "true");
            // One page of changes since the committed cursor (or, after the
            // controller re-baselined the cursor for a new folder, the one
            // UNKNOWN event that says so, then the changes).
            let listed = if reset_pending {
                Ok(crate::dropbox::ListFolderResult {
                    entries: Vec::new(),
                    cursor: cursor_before.clone(),
                    has_more: true,
                })
            } else {
                self.dropbox
                    .list_folder_continue(&token, &cursor_before)
                    .await
            };
            let (entries, cursor, has_more, reset) = match listed {
                Ok(page) => (page.entries, page.cursor, page.has_more, reset_pending),
                Err(e) if e.tag() == Some("reset") => {
                    // The cursor is no longer valid: start again from now and
                    // tell the receiver that it has to re-read what it tracks.
                    tracing::info!(instance = %format!("{ns}/{}", instance.name_any()), "cursor reset by Dropbox; re-baselining");
                    (
                        Vec::new(),
                        self.dropbox.latest_cursor(&token, &folder).await?,
                        false,
                        true,
                    )
                }
                Err(DropboxError::Unauthorized { .. }) if !refreshed_token => {
                    // The controller may have refreshed the token meanwhile.
                    refreshed_token = true;
                    token = self.access_token(uid, true).await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let origin = payload::PageOrigin {
                instance_uid: uid,
                cursor: &cursor_before,
                committed_at,
            };
            let standardized = if reset {
                vec![payload::reset_event(&origin)]
            } else {
                payload::standardize(&entries, &origin)
            };
            drop(entries);
            let notifications = payload::notifications(&info, &standardized, &raw, format);
            tracing::debug!(
                events = standardized.len(),
                notifications = notifications.len(),
                took = ?since.elapsed(),
                "changes fetched and standardized"
            );
            for notification in &notifications {
                self.deliver(uid, notification).await?;
                self.metrics
                    .events_delivered
                    .inc_by(notification.event_count as u64);
                self.metrics.notifications_delivered.inc();
            }
            if !notifications.is_empty() {
                delivered = true;
                self.metrics
                    .delivery_latency
                    .observe(since.elapsed().as_secs_f64());
            }

            // Commit only after delivery, and only over the cursor this page started from.
            if cursor != cursor_before || reset_pending {
                let mut updated = cm.clone();
                let data = updated.data.get_or_insert_with(Default::default);
                data.remove(RESET_PENDING_KEY);
                data.insert(CURSOR_KEY.to_owned(), cursor);
                data.insert(
                    COMMITTED_AT_KEY.to_owned(),
                    jiff::Timestamp::now().to_string(),
                );
                match configmaps
                    .replace(&cm_name, &PostParams::default(), &updated)
                    .await
                {
                    Ok(committed) => cm = committed,
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        // Another replica committed first; what we sent carried the same
                        // event ids as what it sent. Look again from its cursor.
                        self.metrics.cursor_conflicts.inc();
                        return Ok(true);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            pages += 1;
            if !has_more {
                break;
            }
            if pages >= MAX_PAGES_PER_SYNC {
                self.finish(uid, delivered).await;
                return Ok(true);
            }
        }
        tracing::debug!(took = ?since.elapsed(), "delivered and committed");
        self.finish(uid, delivered).await;
        Ok(false)
    }

    /// Reports a successful delivery (EventsDelivering=True, lastDeliveryTime).
    async fn finish(&self, uid: &str, delivered: bool) {
        if delivered {
            self.report(
                uid,
                Desired::new(
                    EVENTS_DELIVERING,
                    Some(true),
                    Reason::Delivered,
                    "The last delivery succeeded",
                ),
                true,
            )
            .await;
        }
    }

    /// Delivers one notification, retrying until the callback accepts it. The
    /// instance is re-read before every attempt so a fixed callback URL or key is
    /// used at once.
    async fn deliver(&self, uid: &str, notification: &Notification) -> Result<(), SyncError> {
        let mut attempt: u32 = 0;
        loop {
            let Some(instance) = self.instance(uid) else {
                return Err(SyncError::NotReady("the instance is gone".into()));
            };
            let Some(events) = instance.spec.events.clone().filter(|e| e.enabled) else {
                return Err(SyncError::NotReady("events were disabled".into()));
            };
            let outcome = self.attempt(&instance, &events, notification).await;
            let (reason, message, retry_after) = match outcome {
                Ok(()) => return Ok(()),
                Err(failure) => failure,
            };
            attempt = attempt.saturating_add(1);
            self.metrics
                .delivery_failures
                .get_or_create(&crate::metrics::ReasonLabels {
                    reason: reason.as_str(),
                })
                .inc();
            self.report(
                uid,
                Desired::new(EVENTS_DELIVERING, Some(false), reason, message.clone()),
                false,
            )
            .await;
            let delay = backoff_delay(
                self.config.base_backoff,
                self.config.max_backoff,
                attempt,
                retry_after,
            );
            tracing::warn!(
                instance = %format!("{}/{}", instance.namespace().unwrap_or_default(), instance.name_any()),
                event_id = %notification.event_id, %reason, %message, retry_in = ?delay,
                "delivery failed; retrying"
            );
            self.metrics.delivery_retries.inc();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                // Not worth waiting for while shutting down: the next replica redelivers.
                _ = self.draining.cancelled() => return Err(SyncError::Stopped),
            }
        }
    }

    /// One POST to the callback URL.
    async fn attempt(
        &self,
        instance: &DropboxElementInstance,
        events: &crate::api::EventsSpec,
        n: &Notification,
    ) -> Result<(), (Reason, String, Option<Duration>)> {
        let url = events
            .callback_url
            .as_deref()
            .and_then(|u| url::Url::parse(u).ok())
            .ok_or_else(|| {
                (
                    Reason::CallbackRejected,
                    "events.callbackUrl is not a valid URL".to_owned(),
                    None,
                )
            })?;
        ssrf::check_url(&self.policy, &url)
            .map_err(|e| (Reason::CallbackForbidden, e.to_string(), None))?;
        let key = match &events.signature_key_secret_ref {
            Some(_) => match self
                .secrets
                .get(&instance.uid().unwrap_or_default(), false)
                .await
            {
                Ok(Some(p)) if p.signature_key.is_some() => p.signature_key.clone(),
                Ok(_) => {
                    return Err((
                        Reason::CallbackRejected,
                        "the signature key is not available yet (see EventsReady)".to_owned(),
                        None,
                    ));
                }
                Err(e) => {
                    return Err((
                        Reason::CallbackUnreachable,
                        format!("reading the signature key: {e}"),
                        None,
                    ));
                }
            },
            None => None,
        };
        let timestamp = jiff::Timestamp::now().as_second();
        let mut request = self
            .callbacks
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, n.content_type)
            .body(n.body.clone());
        for (name, value) in
            payload::signature_headers(key.as_deref(), &n.event_id, timestamp, &n.body)
        {
            request = request.header(name, value);
        }
        let response = request.send().await.map_err(|e| {
            if let Some(forbidden) = ssrf::forbidden_in(&e) {
                (Reason::CallbackForbidden, forbidden.to_string(), None)
            } else {
                let what = if e.is_timeout() {
                    "timed out"
                } else {
                    "could not connect"
                };
                (
                    Reason::CallbackUnreachable,
                    // without_url: callback URLs are capability URLs, never shown.
                    format!("the callback {what}: {}", error_chain(&e.without_url())),
                    None,
                )
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::retry::retry_after);
        let reason = if status.as_u16() == 429 || status.is_server_error() {
            Reason::CallbackUnreachable
        } else {
            Reason::CallbackRejected
        };
        Err((
            reason,
            format!("the callback answered HTTP {}", status.as_u16()),
            retry_after,
        ))
    }

    /// Writes EventsDelivering (and lastDeliveryTime after a delivery) with the
    /// ingress's field manager, only when something changes.
    async fn report(&self, uid: &str, desired: Desired, delivered: bool) {
        let Some(instance) = self.instance(uid) else {
            return;
        };
        let status = instance.status.clone().unwrap_or_default();
        let current = conditions::find(&status.conditions, EVENTS_DELIVERING);
        let same = current.is_some_and(|c| {
            c.status == if desired.is_true() { "True" } else { "False" }
                && c.reason == desired.reason.as_str()
                && c.message == desired.message
        });
        if same && !delivered {
            return;
        }
        let now = Time(jiff::Timestamp::now());
        // lastDeliveryTime says deliveries are flowing; moving it on every
        // delivery would cost an API write (and a watch event in every replica
        // and the controller) per webhook. It moves when it is older than
        // LAST_DELIVERY_RESOLUTION (README, "Resource reference").
        let recent = status
            .events
            .as_ref()
            .and_then(|e| e.last_delivery_time.as_ref())
            .is_some_and(|t| now.0.duration_since(t.0).unsigned_abs() < LAST_DELIVERY_RESOLUTION);
        if same && delivered && recent {
            return;
        }
        let condition: Condition =
            desired.to_condition(&status.conditions, instance.metadata.generation, &now);
        let last_delivery = if delivered {
            Some(now.clone())
        } else {
            status
                .events
                .as_ref()
                .and_then(|e| e.last_delivery_time.clone())
        };
        let mut events = json!({});
        if let Some(t) = last_delivery {
            events["lastDeliveryTime"] = serde_json::to_value(t).unwrap_or(Value::Null);
        }
        let patch = json!({
            "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
            "kind": "DropboxElementInstance",
            "status": {"conditions": [condition], "events": events},
        });
        let api: Api<DropboxElementInstance> = Api::namespaced(
            self.client.clone(),
            &instance.namespace().unwrap_or_default(),
        );
        if let Err(e) = api
            .patch_status(
                &instance.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            tracing::warn!(error = %e, "could not write EventsDelivering");
        }
    }
}
