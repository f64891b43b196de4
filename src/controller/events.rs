//! The controller's side of event delivery:
//!
//! - keeps the `dropbox-webhook-ingress` Deployment and Service in the operator's
//!   namespace while at least one instance has events enabled, and removes them
//!   when none has ([`IngressManager`]);
//! - knows whether an ingress replica is alive, from the heartbeat Leases every
//!   ingress process renews (this also covers ingress processes run outside the
//!   Deployment, e.g. in tests or during local development);
//! - sets each instance's first cursor (`get_latest_cursor`) in its
//!   `<name>-dropbox-events` ConfigMap and reports EventsReady.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, ResourceRequirements, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::api::DropboxElementInstance;
use crate::conditions::{Desired, EVENTS_READY, Reason};
use crate::dropbox::{DropboxClient, DropboxError};

/// Name of the ingress Deployment and Service.
pub const INGRESS_NAME: &str = "dropbox-webhook-ingress";
/// `app.kubernetes.io/component` of everything that belongs to the ingress,
/// including its heartbeat Leases.
pub const INGRESS_COMPONENT: &str = "webhook-ingress";
/// Port the ingress listens on inside its pod.
pub const INGRESS_PORT: i32 = 8080;
/// Key of the committed cursor in the events ConfigMap.
pub const CURSOR_KEY: &str = "cursor";
/// Key of the account the cursor belongs to.
pub const ACCOUNT_KEY: &str = "accountId";

/// Name of the events ConfigMap of instance `name`.
pub fn events_configmap_name(instance: &str) -> String {
    format!("{instance}-dropbox-events")
}

/// Webhook path of an app: Dropbox is configured to call
/// `https://<ingress address>/webhooks/dropbox/<appKey>`.
pub fn webhook_path(app_key: &str) -> String {
    format!("/webhooks/dropbox/{app_key}")
}

/// How the controller runs the ingress (from its command line / Helm values).
#[derive(Clone, Debug)]
pub struct IngressSettings {
    /// The operator's namespace, where the Deployment, Service and heartbeats live.
    pub namespace: String,
    pub image: String,
    pub image_pull_policy: String,
    pub replicas: i32,
    pub service_account: String,
    pub resources: Option<ResourceRequirements>,
    /// Callback CIDRs the ingress may deliver to although they are private.
    pub allowed_callback_cidrs: String,
    /// Passed through so the ingress talks to the same Dropbox.
    pub dropbox_api_url: String,
    /// Instances' namespace, when the operator watches only one.
    pub watch_namespace: Option<String>,
    pub log_format: String,
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "dropbox-operator".to_owned(),
        ),
        (
            "app.kubernetes.io/component".to_owned(),
            INGRESS_COMPONENT.to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "dropbox-operator".to_owned(),
        ),
    ])
}

fn selector() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "dropbox-operator".to_owned(),
        ),
        (
            "app.kubernetes.io/component".to_owned(),
            INGRESS_COMPONENT.to_owned(),
        ),
    ])
}

/// The desired ingress Deployment (pure).
pub fn ingress_deployment(s: &IngressSettings) -> Deployment {
    let mut env = vec![
        json!({"name": "LISTEN_ADDR", "value": format!("0.0.0.0:{INGRESS_PORT}")}),
        json!({"name": "DROPBOX_API_URL", "value": s.dropbox_api_url}),
        json!({"name": "ALLOWED_CALLBACK_CIDRS", "value": s.allowed_callback_cidrs}),
        json!({"name": "LOG_FORMAT", "value": s.log_format}),
        json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
    ];
    if let Some(ns) = &s.watch_namespace {
        env.push(json!({"name": "WATCH_NAMESPACE", "value": ns}));
    }
    let probe = |path: &str| json!({"httpGet": {"path": path, "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3});
    let value = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": INGRESS_NAME, "namespace": s.namespace, "labels": labels()},
        "spec": {
            "replicas": s.replicas,
            "selector": {"matchLabels": selector()},
            "template": {
                "metadata": {"labels": labels()},
                "spec": {
                    "serviceAccountName": s.service_account,
                    "automountServiceAccountToken": true,
                    "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": "ingress",
                        "image": s.image,
                        "imagePullPolicy": s.image_pull_policy,
                        "args": ["ingress"],
                        "env": env,
                        "ports": [{"name": "http", "containerPort": INGRESS_PORT, "protocol": "TCP"}],
                        "readinessProbe": probe("/readyz"),
                        "livenessProbe": probe("/healthz"),
                        "resources": s.resources.clone().unwrap_or_default(),
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "runAsNonRoot": true,
                            "capabilities": {"drop": ["ALL"]}
                        }
                    }]
                }
            }
        }
    });
    // The literal above matches the Deployment schema; a mismatch is a bug here.
    serde_json::from_value(value).expect("ingress Deployment manifest is valid")
}

/// The desired ingress Service (pure).
pub fn ingress_service(s: &IngressSettings) -> Service {
    let value = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": INGRESS_NAME, "namespace": s.namespace, "labels": labels()},
        "spec": {
            "type": "ClusterIP",
            "selector": selector(),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
        }
    });
    serde_json::from_value(value).expect("ingress Service manifest is valid")
}

/// Keeps the ingress objects in line with "does any instance want events?" and
/// tracks whether an ingress replica is alive.
pub struct IngressManager {
    pub settings: IngressSettings,
    alive: AtomicBool,
    wake: Notify,
}

impl IngressManager {
    pub fn new(settings: IngressSettings) -> Arc<Self> {
        Arc::new(IngressManager {
            settings,
            alive: AtomicBool::new(false),
            wake: Notify::new(),
        })
    }

    /// Whether at least one ingress replica renewed its heartbeat recently.
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Asks the manager to look at the instances again (cheap; coalesced).
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// Runs until `stop`: applies/removes the ingress objects when needed, and
    /// calls `on_liveness_change` when ingress liveness flips so instances are
    /// reconciled again.
    pub async fn run(
        self: Arc<Self>,
        client: Client,
        store: Store<DropboxElementInstance>,
        on_liveness_change: impl Fn() + Send + 'static,
        stop: CancellationToken,
    ) {
        tokio::select! {
            _ = wait_until_ready(&store) => {}
            _ = stop.cancelled() => return,
        }
        let mut applied: Option<bool> = None;
        let mut drift_check = tokio::time::interval(Duration::from_secs(300));
        let mut heartbeat_check = tokio::time::interval(Duration::from_secs(3));
        loop {
            let needed = store.state().iter().any(|i| {
                i.meta().deletion_timestamp.is_none()
                    && i.spec.events.as_ref().is_some_and(|e| e.enabled)
            });
            if applied != Some(needed) {
                match self.apply(&client, needed).await {
                    Ok(()) => applied = Some(needed),
                    Err(e) => {
                        tracing::warn!(error = %e, "updating the webhook ingress failed; retrying")
                    }
                }
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = drift_check.tick() => applied = None,
                _ = heartbeat_check.tick() => {
                    let alive = self.any_heartbeat(&client).await;
                    if self.alive.swap(alive, Ordering::AcqRel) != alive {
                        tracing::info!(alive, "webhook ingress liveness changed");
                        on_liveness_change();
                    }
                }
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn apply(&self, client: &Client, needed: bool) -> Result<(), kube::Error> {
        let ns = &self.settings.namespace;
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
        let services: Api<Service> = Api::namespaced(client.clone(), ns);
        if needed {
            let pp = PatchParams::apply(super::reconcile::FIELD_MANAGER).force();
            deployments
                .patch(
                    INGRESS_NAME,
                    &pp,
                    &Patch::Apply(&ingress_deployment(&self.settings)),
                )
                .await?;
            services
                .patch(
                    INGRESS_NAME,
                    &pp,
                    &Patch::Apply(&ingress_service(&self.settings)),
                )
                .await?;
            tracing::info!(namespace = %ns, "webhook ingress Deployment and Service applied");
        } else {
            // Delete only what exists and is ours (a Deployment of the same name made
            // by someone else stays), so an operator without events makes no writes.
            let ours = |labels: Option<&BTreeMap<String, String>>| {
                labels
                    .and_then(|l| l.get("app.kubernetes.io/managed-by"))
                    .map(String::as_str)
                    == Some("dropbox-operator")
            };
            if let Some(d) = deployments.get_opt(INGRESS_NAME).await?
                && ours(d.metadata.labels.as_ref())
            {
                deployments
                    .delete(INGRESS_NAME, &DeleteParams::background())
                    .await?;
                tracing::info!(namespace = %ns, "no instance has events enabled: webhook ingress Deployment removed");
            }
            if let Some(s) = services.get_opt(INGRESS_NAME).await?
                && ours(s.metadata.labels.as_ref())
            {
                services
                    .delete(INGRESS_NAME, &DeleteParams::background())
                    .await?;
            }
        }
        Ok(())
    }

    async fn any_heartbeat(&self, client: &Client) -> bool {
        let leases: Api<Lease> = Api::namespaced(client.clone(), &self.settings.namespace);
        let lp = ListParams::default()
            .labels(&format!("app.kubernetes.io/component={INGRESS_COMPONENT}"));
        let Ok(list) = leases.list(&lp).await else {
            return self.alive();
        };
        let now = jiff::Timestamp::now();
        list.items.iter().any(|lease| {
            let Some(spec) = &lease.spec else {
                return false;
            };
            let (Some(renewed), Some(duration)) = (&spec.renew_time, spec.lease_duration_seconds)
            else {
                return false;
            };
            renewed.0 + jiff::SignedDuration::from_secs(i64::from(duration)) > now
        })
    }
}

/// Waits until the store has its first full list. `Store::wait_until_ready` keeps
/// only the waker of the last task that polled it (kube-runtime 5.0 polls one
/// oneshot receiver from every waiter), so with the controller's own runner also
/// waiting, a second waiter may never be woken; polling it again in short slices
/// sidesteps that.
pub async fn wait_until_ready<K>(store: &Store<K>)
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        if let Ok(result) =
            tokio::time::timeout(Duration::from_millis(250), store.wait_until_ready()).await
        {
            if result.is_err() {
                tracing::warn!("the instance cache was dropped before it was filled");
            }
            return;
        }
    }
}

/// The outcome of the events step of a reconcile.
#[derive(Clone, Debug)]
pub struct EventsStep {
    pub ready: Desired,
    pub webhook_path: Option<String>,
}

/// Makes sure the instance has its first cursor, and reports EventsReady.
/// `access_token` is None while the instance is not authorized.
pub async fn ensure_cursor(
    client: &Client,
    dropbox: &DropboxClient,
    instance: &DropboxElementInstance,
    app_key: Option<&str>,
    account_id: Option<&str>,
    access_token: Option<&str>,
    ingress_alive: bool,
) -> Result<EventsStep, kube::Error> {
    let webhook = app_key.map(webhook_path);
    let step = |status: bool, reason: Reason, message: String| EventsStep {
        ready: Desired::new(EVENTS_READY, Some(status), reason, message),
        webhook_path: webhook.clone(),
    };
    if app_key.is_none() {
        return Ok(step(
            false,
            Reason::SecretNotFound,
            "Events need spec.authentication.appSecretRef: the app secret verifies Dropbox's webhook signatures"
                .into(),
        ));
    };
    let (Some(access_token), Some(account_id)) = (access_token, account_id) else {
        return Ok(step(
            false,
            Reason::AwaitingAuthorization,
            "Events start once the instance is authorized".into(),
        ));
    };
    let namespace = instance.namespace().unwrap_or_default();
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let name = events_configmap_name(&instance.name_any());
    let existing = configmaps.get_opt(&name).await?;
    let has_cursor = existing.as_ref().is_some_and(|cm| {
        let data = cm.data.as_ref();
        data.and_then(|d| d.get(CURSOR_KEY))
            .is_some_and(|c| !c.is_empty())
            && data.and_then(|d| d.get(ACCOUNT_KEY)).map(String::as_str) == Some(account_id)
    });
    if !has_cursor {
        let cursor = match dropbox.latest_cursor(access_token).await {
            Ok(c) => c,
            Err(e) => {
                let reason = match &e {
                    DropboxError::RateLimited { .. } => Reason::RateLimited,
                    _ => Reason::DropboxUnavailable,
                };
                return Ok(step(
                    false,
                    reason,
                    format!("Reading the first cursor failed: {e}"),
                ));
            }
        };
        let mut cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                labels: Some(BTreeMap::from([
                    (
                        "app.kubernetes.io/managed-by".to_owned(),
                        "dropbox-operator".to_owned(),
                    ),
                    (super::token::INSTANCE_LABEL.to_owned(), instance.name_any()),
                ])),
                owner_references: instance.controller_owner_ref(&()).map(|r| vec![r]),
                ..Default::default()
            },
            data: Some(BTreeMap::from([
                (CURSOR_KEY.to_owned(), cursor),
                (ACCOUNT_KEY.to_owned(), account_id.to_owned()),
            ])),
            ..Default::default()
        };
        match existing {
            // Replace with a precondition: never overwrite a cursor the ingress moved meanwhile.
            Some(old) => {
                cm.metadata.resource_version = old.metadata.resource_version.clone();
                configmaps
                    .replace(&name, &PostParams::default(), &cm)
                    .await?;
            }
            None => {
                configmaps.create(&PostParams::default(), &cm).await?;
            }
        }
        tracing::info!(instance = %format!("{namespace}/{}", instance.name_any()), "first events cursor set");
    }
    if !ingress_alive {
        return Ok(step(
            false,
            Reason::IngressUnavailable,
            format!(
                "No webhook ingress replica is running (Deployment {INGRESS_NAME} in the operator's namespace)"
            ),
        ));
    }
    Ok(step(
        true,
        Reason::IngressReady,
        "The webhook ingress is running and the instance's cursor is set".into(),
    ))
}

/// Removes the events ConfigMap when events are turned off, so turning them on
/// again reports only changes made after that.
pub async fn remove_cursor(
    client: &Client,
    instance: &DropboxElementInstance,
) -> Result<(), kube::Error> {
    let configmaps: Api<ConfigMap> =
        Api::namespaced(client.clone(), &instance.namespace().unwrap_or_default());
    match configmaps
        .delete(
            &events_configmap_name(&instance.name_any()),
            &DeleteParams::default(),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> IngressSettings {
        IngressSettings {
            namespace: "dropbox-system".into(),
            image: "ghcr.io/example/dropbox-operator:1.0".into(),
            image_pull_policy: "IfNotPresent".into(),
            replicas: 2,
            service_account: "dropbox-webhook-ingress".into(),
            resources: None,
            allowed_callback_cidrs: "".into(),
            dropbox_api_url: "https://api.dropboxapi.com".into(),
            watch_namespace: None,
            log_format: "json".into(),
        }
    }

    #[test]
    fn deployment_runs_the_ingress_subcommand_with_probes() {
        let d = ingress_deployment(&settings());
        let spec = d.spec;
        assert_eq!(spec.replicas, Some(2));
        let pod = spec.template.spec.expect("pod spec");
        assert_eq!(
            pod.service_account_name.as_deref(),
            Some("dropbox-webhook-ingress")
        );
        let c = &pod.containers[0];
        assert_eq!(c.args.as_deref(), Some(&["ingress".to_owned()][..]));
        assert!(c.readiness_probe.is_some() && c.liveness_probe.is_some());
        assert_eq!(
            spec.selector
                .match_labels
                .expect("selector")
                .get("app.kubernetes.io/component"),
            Some(&INGRESS_COMPONENT.to_owned())
        );
    }
}
