//! The heartbeat: each replica renews its entry in the heartbeats ConfigMap of
//! the data namespace (a JSON merge patch of its own key, so replicas never
//! overwrite each other), advertising its view and peer address, and watches
//! the ConfigMap to learn at once when another replica comes, goes or moves
//! (docs/architecture.md, "One syncer per instance"). The controller reads the
//! same ConfigMap for EventsReady.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::cursors::API_TIMEOUT;
use super::membership::Membership;
use crate::contract::{HEARTBEATS_CONFIGMAP, Heartbeat};

/// Entries that expired this long ago are removed (replicas that died without
/// removing theirs, e.g. a killed pod).
const FORGET_AFTER: jiff::SignedDuration = jiff::SignedDuration::from_secs(600);
/// Writes of one replica are at least this far apart, whatever wakes it.
const MIN_GAP: Duration = Duration::from_millis(100);

/// Renews this replica's entry every `interval` (and at once when the view to
/// advertise changes) until `draining`; then stops delivering, waits for the
/// POSTs in flight and removes the entry, so the other replicas take over at
/// once.
pub async fn run(
    api: Api<ConfigMap>,
    membership: Arc<Membership>,
    interval: Duration,
    wake: Arc<Notify>,
    draining: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    let mut known: BTreeMap<String, String> = BTreeMap::new();
    let mut last_write: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = wake.notified() => {}
            _ = draining.cancelled() => break,
        }
        if let Some(gap) = last_write.map(|t| MIN_GAP.saturating_sub(t.elapsed())) {
            tokio::time::sleep(gap).await;
        }
        let (view, busy) = membership.prepare();
        if busy {
            // POSTs for instances this view gives away end first.
            tokio::select! {
                _ = membership.drained_for(&view) => {}
                _ = draining.cancelled() => break,
            }
        }
        let value = membership.entry(&view).to_value();
        let mut data = serde_json::Map::new();
        data.insert(membership.key().to_owned(), Value::String(value.clone()));
        let now = jiff::Timestamp::now();
        for (key, entry) in &known {
            let stale = Heartbeat::parse(entry)
                .is_some_and(|h| h.expires.checked_add(FORGET_AFTER).is_ok_and(|t| t < now));
            if stale && key != membership.key() {
                data.insert(key.clone(), Value::Null);
            }
        }
        let sent = Instant::now();
        last_write = Some(sent);
        let patched = tokio::time::timeout(
            API_TIMEOUT,
            api.patch(
                HEARTBEATS_CONFIGMAP,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "data": data })),
            ),
        )
        .await
        .unwrap_or_else(|_| Err(kube::Error::Service("no answer in time".into())));
        match patched {
            Ok(cm) => {
                warned = false;
                known = cm.data.unwrap_or_default();
                membership.renewed(sent, value, view.clone(), &known);
                // The first write claims nothing; a changed view is advertised
                // at once, not at the next tick.
                let (next, _) = membership.prepare();
                if next != view {
                    wake.notify_one();
                }
            }
            // The controller creates it with the Deployment; until then, wait.
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(error = %e, "could not renew the ingress heartbeat; retrying");
            }
            Err(e) => tracing::debug!(error = %e, "could not renew the ingress heartbeat"),
        }
    }
    // Draining: deliver nothing more, let the POSTs in flight end, then leave.
    membership.release();
    if tokio::time::timeout(
        membership.config().post_bound + Duration::from_secs(1),
        membership.drained(),
    )
    .await
    .is_err()
    {
        tracing::warn!("POSTs still in flight after the delivery timeout");
    }
    let patch = json!({"data": {membership.key(): null}});
    let removed = tokio::time::timeout(
        API_TIMEOUT,
        api.patch(
            HEARTBEATS_CONFIGMAP,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        ),
    )
    .await
    .unwrap_or_else(|_| Err(kube::Error::Service("no answer in time".into())));
    match removed {
        Ok(_) => tracing::info!("ingress heartbeat removed"),
        Err(e) => tracing::warn!(error = %e, "could not remove the ingress heartbeat"),
    }
}

/// Watches the heartbeats ConfigMap and hands every state to `membership`;
/// wakes the heartbeat when the view to advertise changed.
pub async fn watch(
    api: Api<ConfigMap>,
    membership: Arc<Membership>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    // A consistent list, not "any": after an API server restart a list
    // served from its cache can be older than the watch window (see the
    // controller's delivery-state watch).
    let config =
        crate::store::watch_config().fields(&format!("metadata.name={HEARTBEATS_CONFIGMAP}"));
    let mut events = std::pin::pin!(watcher(api, config).backoff(crate::store::watch_backoff()));
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = stop.cancelled() => return,
        };
        match event {
            Some(Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm))) => {
                if membership.observe(&cm.data.unwrap_or_default()) {
                    wake.notify_one();
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => tracing::debug!(error = %e, "watching the heartbeats failed; retrying"),
            None => return,
        }
    }
}
