//! Delivery state: what the replica delivering an instance reports about it,
//! in `dropbox-delivery-<uid>` in the data namespace. The controller mirrors it
//! into the instance's status (EventsDelivering, `events.lastDeliveryTime`);
//! the ingress writes no instance.
//!
//! A state is written only when it changes, and `lastDeliveryTime` moves on
//! only when older than [`LAST_DELIVERY_RESOLUTION`], so steady deliveries make
//! no write here. Every replica watches these ConfigMaps: one that takes an
//! instance over knows its state (a parked delivery stays parked).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::conditions::Reason;
use crate::contract::{
    self, DeliveryState, INGRESS_FIELD_MANAGER, INSTANCE_UID_LABEL, LAST_DELIVERY_RESOLUTION,
    Parked, ProjectedInstance, ROLE_DELIVERY,
};

/// The delivery states of every instance, as last written or seen.
pub struct Reports {
    api: Api<ConfigMap>,
    known: Mutex<HashMap<String, DeliveryState>>,
    ready: tokio::sync::watch::Sender<bool>,
}

impl Reports {
    pub fn new(api: Api<ConfigMap>) -> Arc<Self> {
        Arc::new(Reports {
            api,
            known: Mutex::default(),
            ready: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Waits until the states of every instance were listed once.
    pub async fn wait_ready(&self) {
        let mut ready = self.ready.subscribe();
        let _ = ready.wait_for(|r| *r).await;
    }

    pub fn current(&self, uid: &str) -> Option<DeliveryState> {
        self.known.lock().expect("reports lock").get(uid).cloned()
    }

    /// Whether delivery of `instance` is parked and nothing resumed it.
    pub fn parked(&self, instance: &ProjectedInstance) -> bool {
        self.current(&instance.uid)
            .and_then(|s| s.parked)
            .is_some_and(|p| p.generation == instance.generation && p.resume == instance.resume)
    }

    /// Reports a delivery (or, with `delivered` false, a sync that went
    /// through with nothing to deliver) after `instance`'s events flowed.
    pub async fn succeeded(&self, instance: &ProjectedInstance, delivered: bool) {
        let current = self.current(&instance.uid);
        let now = jiff::Timestamp::now();
        let last = current.as_ref().and_then(|s| s.last_delivery_time);
        let stale =
            last.is_none_or(|t| now.duration_since(t).unsigned_abs() >= LAST_DELIVERY_RESOLUTION);
        let desired = DeliveryState {
            delivering: true,
            reason: Reason::Delivered.as_str().to_owned(),
            message: "The last delivery succeeded".to_owned(),
            last_delivery_time: if delivered && stale { Some(now) } else { last },
            parked: None,
        };
        if current.is_none() && !delivered {
            // Nothing to say yet: the first delivery writes the first state.
            return;
        }
        self.write(instance, desired).await;
    }

    /// Reports a failure; `park` parks delivery until the instance changes.
    pub async fn failed(
        &self,
        instance: &ProjectedInstance,
        reason: Reason,
        message: String,
        park: bool,
    ) {
        let desired = DeliveryState {
            delivering: false,
            reason: reason.as_str().to_owned(),
            message,
            last_delivery_time: self
                .current(&instance.uid)
                .and_then(|s| s.last_delivery_time),
            parked: park.then(|| Parked {
                generation: instance.generation,
                resume: instance.resume.clone(),
            }),
        };
        self.write(instance, desired).await;
    }

    async fn write(&self, instance: &ProjectedInstance, desired: DeliveryState) {
        if self.current(&instance.uid).as_ref() == Some(&desired) {
            return;
        }
        let name = contract::delivery_configmap_name(&instance.uid);
        let patch = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "labels": contract::instance_labels(
                    &instance.namespace,
                    &instance.name,
                    &instance.uid,
                    ROLE_DELIVERY,
                ),
            },
            "data": desired.to_data(),
        });
        let written = tokio::time::timeout(
            super::cursors::API_TIMEOUT,
            self.api.patch(
                &name,
                &PatchParams::apply(INGRESS_FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            ),
        )
        .await
        .unwrap_or_else(|_| Err(kube::Error::Service("no answer in time".into())));
        match written {
            Ok(_) => {
                self.known
                    .lock()
                    .expect("reports lock")
                    .insert(instance.uid.clone(), desired);
            }
            Err(e) => tracing::warn!(
                instance = %format!("{}/{}", instance.namespace, instance.name),
                error = %e,
                "could not write the delivery state"
            ),
        }
    }

    pub fn forget(&self, uid: &str) {
        self.known.lock().expect("reports lock").remove(uid);
    }

    /// Keeps [`Reports::current`] in line with the delivery-state ConfigMaps
    /// until `stop` (written by any replica, or removed by the controller).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        // A consistent list, not "any": after an API server restart a list
        // served from its cache can be older than the watch window (see the
        // controller's delivery-state watch).
        let config = crate::store::watch_config().labels(&contract::role_selector(ROLE_DELIVERY));
        let mut events = std::pin::pin!(
            watcher(self.api.clone(), config).backoff(crate::store::watch_backoff())
        );
        let mut listing: Option<HashMap<String, DeliveryState>> = None;
        let uid_and_state = |cm: &ConfigMap| {
            let uid = cm
                .metadata
                .labels
                .as_ref()?
                .get(INSTANCE_UID_LABEL)?
                .clone();
            let state = DeliveryState::from_data(cm.data.as_ref()?)?;
            Some((uid, state))
        };
        loop {
            let event = tokio::select! {
                event = events.next() => event,
                _ = stop.cancelled() => return,
            };
            match event {
                Some(Ok(watcher::Event::Init)) => listing = Some(HashMap::new()),
                Some(Ok(watcher::Event::InitApply(cm))) => {
                    if let (Some(list), Some((uid, state))) = (listing.as_mut(), uid_and_state(&cm))
                    {
                        list.insert(uid, state);
                    }
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    *self.known.lock().expect("reports lock") = listing.take().unwrap_or_default();
                    self.ready.send_replace(true);
                }
                Some(Ok(watcher::Event::Apply(cm))) => {
                    if let Some((uid, state)) = uid_and_state(&cm) {
                        self.known.lock().expect("reports lock").insert(uid, state);
                    }
                }
                Some(Ok(watcher::Event::Delete(cm))) => {
                    if let Some(uid) = cm
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(INSTANCE_UID_LABEL))
                    {
                        self.forget(uid);
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "watching the delivery states failed; retrying")
                }
                None => return,
            }
        }
    }
}
