//! The webhook ingress as the controller runs it (docs/architecture.md):
//!
//! - keeps the `dropbox-webhook-ingress` Deployment (with its Service unless
//!   that is someone else's, and its HPA when configured, see
//!   [`super::autoscaler`]) in the operator's namespace, and the heartbeats
//!   ConfigMap in the data namespace, while at least one instance has events
//!   enabled, and removes them when none has;
//! - knows whether an ingress replica is alive from the heartbeats ConfigMap, in
//!   which every ingress process renews its own key (this also covers ingress
//!   processes run outside the Deployment, e.g. in tests or local development);
//! - removes projected objects (see `projection.rs`) whose instance is gone.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ResourceRequirements, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::api::DropboxElementInstance;
use crate::contract::{
    self, CONTROLLER_FIELD_MANAGER, HEARTBEATS_CONFIGMAP, INGRESS_COMPONENT, INGRESS_METRICS_PORT,
    INGRESS_NAME, INGRESS_PEER_PORT, INGRESS_PORT, INSTANCE_NAMESPACE_LABEL, INSTANCE_UID_LABEL,
    MANAGED_BY, MANAGED_BY_LABEL, ROLE_HEARTBEATS, ROLE_LABEL,
};

/// How the controller runs the ingress (from its command line / Helm values).
#[derive(Clone, Debug)]
pub struct IngressSettings {
    /// The operator's namespace, where the Deployment and Service live.
    pub namespace: String,
    /// The ingress's data namespace: projected objects, cursors, delivery
    /// states and heartbeats; the ingress has rights nowhere else.
    pub data_namespace: String,
    pub image: String,
    pub image_pull_policy: String,
    pub replicas: i32,
    pub service_account: String,
    pub resources: Option<ResourceRequirements>,
    /// Callback CIDRs the ingress may deliver to although they are private.
    pub allowed_callback_cidrs: String,
    /// Callback CIDRs the ingress never delivers to although they are public.
    pub denied_callback_cidrs: String,
    /// Passed through so the ingress talks to the same Dropbox.
    pub dropbox_api_url: String,
    /// Dropbox's notify host (long-polls), passed through like the API URL.
    pub dropbox_notify_url: String,
    /// How long one long-poll of the ingress waits for changes.
    pub longpoll_timeout: Duration,
    /// Instances' namespaces (comma-separated), when the operator does not
    /// watch all namespaces (the sweep leaves other namespaces' objects alone).
    pub watch_namespace: Option<String>,
    pub log_format: String,
    /// A pod template (`PodTemplateSpec` as JSON) merged into the one the
    /// controller builds; see [`merge_pod_template`].
    pub pod_template: Option<Value>,
    /// The replicas are someone else's (an HorizontalPodAutoscaler, `kubectl
    /// scale`): `spec.replicas` is left out of what the controller applies.
    pub autoscaling: bool,
    /// The spec of an HPA to run with the Deployment (`--ingress-autoscaler`).
    pub autoscaler: Option<Value>,
    /// Whether the controller creates and removes the Service (false: the Helm
    /// chart renders it).
    pub manage_service: bool,
    /// A Deployment in the operator namespace (the controller's own, made by
    /// the Helm chart) that owns the ingress objects, so that the garbage
    /// collector removes them with it (`helm uninstall`).
    pub owner_deployment: Option<String>,
}

impl IngressSettings {
    /// The settings the controller's command line gives, for the ingress in
    /// `namespace` (the operator's) logging in `log_format`.
    pub fn from_args(
        args: &crate::cli::ControllerArgs,
        namespace: String,
        log_format: &str,
    ) -> Self {
        IngressSettings {
            data_namespace: args
                .data_namespace
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| namespace.clone()),
            namespace,
            image: args.ingress.ingress_image.clone(),
            image_pull_policy: args.ingress.ingress_image_pull_policy.clone(),
            replicas: args.ingress.ingress_replicas,
            service_account: args.ingress.ingress_service_account.clone(),
            resources: args.ingress.ingress_resources.clone(),
            allowed_callback_cidrs: args.ingress.allowed_callback_cidrs.clone(),
            denied_callback_cidrs: args.ingress.denied_callback_cidrs.clone(),
            dropbox_api_url: args.dropbox.dropbox_api_url.to_string(),
            dropbox_notify_url: args.dropbox.dropbox_notify_url.to_string(),
            longpoll_timeout: args.ingress.ingress_longpoll_timeout,
            watch_namespace: args.namespace.clone(),
            log_format: log_format.into(),
            pod_template: args.ingress.ingress_pod_template.clone(),
            autoscaling: args.ingress.ingress_autoscaling
                || args.ingress.ingress_autoscaler.is_some(),
            autoscaler: args.ingress.ingress_autoscaler.clone(),
            manage_service: args.ingress.ingress_manage_service,
            owner_deployment: args
                .ingress
                .ingress_owner_deployment
                .clone()
                .filter(|n| !n.is_empty()),
        }
    }

    /// Checks that the pod template merges into a valid Deployment.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(spec) = &self.autoscaler {
            super::autoscaler::autoscaler(spec, &self.namespace, None)
                .map_err(|e| format!("the ingress autoscaler spec is not valid: {e}"))?;
        }
        serde_json::from_value::<Deployment>(deployment_value(self))
            .map(|_| ())
            .map_err(|e| format!("the ingress pod template does not make a valid Deployment: {e}"))
    }
}

/// Environment variables of the ingress container that the controller sets and
/// a pod template cannot change: addresses, scope, where Dropbox is, the
/// callback address policy.
pub const ESSENTIAL_ENV: [&str; 10] = [
    "LISTEN_ADDR",
    "METRICS_ADDR",
    "PEER_LISTEN_ADDR",
    "DROPBOX_API_URL",
    "ALLOWED_CALLBACK_CIDRS",
    "DENIED_CALLBACK_CIDRS",
    "POD_NAMESPACE",
    "POD_NAME",
    "POD_IP",
    "DATA_NAMESPACE",
];

/// Fields of the ingress container the controller owns: the pod template's
/// values for them are ignored.
const ESSENTIAL_CONTAINER_FIELDS: [&str; 8] = [
    "name",
    "image",
    "imagePullPolicy",
    "command",
    "args",
    "ports",
    "readinessProbe",
    "livenessProbe",
];

/// Name of the ingress container.
pub const INGRESS_CONTAINER: &str = "ingress";

/// Merges `overlay` (a `PodTemplateSpec`) into the pod template the controller
/// built (docs/architecture.md, "The ingress pod template"):
///
/// - everything but the containers is a JSON merge patch (RFC 7386): objects
///   (labels, annotations, nodeSelector, securityContext, ...) are merged key by
///   key, lists (tolerations, volumes, topologySpreadConstraints, ...) replace
///   the controller's, and `null` removes a key (e.g. `securityContext.runAsUser`);
/// - the container named `ingress` is merged into the controller's the same way,
///   except that `env` is merged by variable name (the template's win, except
///   for [`ESSENTIAL_ENV`]) and `volumeMounts`/`envFrom` are appended; other
///   containers are added after it;
/// - then the controller's essentials are set again: its labels (the
///   Deployment's selector), the ServiceAccount and its token, and the ingress
///   container's name, image, pull policy, args, ports and probes.
pub fn merge_pod_template(base: &mut Value, overlay: &Value) {
    let essentials = base.clone();
    let mut overlay = overlay.clone();
    let overlay_containers = overlay
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .and_then(|spec| spec.remove("containers"))
        .and_then(|c| match c {
            Value::Array(items) => Some(items),
            _ => None,
        })
        .unwrap_or_default();
    json_patch::merge(base, &overlay);

    let mut extra = Vec::new();
    let containers = base["spec"]["containers"]
        .as_array_mut()
        .expect("the base template has containers");
    for container in overlay_containers {
        if container["name"] != INGRESS_CONTAINER {
            extra.push(container);
            continue;
        }
        let ours = &mut containers[0];
        let mut patch = container.clone();
        let object = patch.as_object_mut().expect("a container is an object");
        let env = object.remove("env");
        let mounts = object.remove("volumeMounts");
        let env_from = object.remove("envFrom");
        json_patch::merge(ours, &patch);
        for item in env.as_ref().and_then(Value::as_array).into_iter().flatten() {
            let name = item["name"].as_str().unwrap_or_default();
            if ESSENTIAL_ENV.contains(&name) {
                continue;
            }
            let list = ours["env"].as_array_mut().expect("env");
            match list.iter_mut().find(|e| e["name"] == name) {
                Some(existing) => *existing = item.clone(),
                None => list.push(item.clone()),
            }
        }
        for (key, items) in [("volumeMounts", mounts), ("envFrom", env_from)] {
            if let Some(Value::Array(items)) = items {
                match ours.get_mut(key).and_then(Value::as_array_mut) {
                    Some(list) => list.extend(items),
                    None => ours[key] = Value::Array(items),
                }
            }
        }
    }
    containers.extend(extra);

    // The controller's essentials win.
    if !base["metadata"]["labels"].is_object() {
        base["metadata"]["labels"] = json!({});
    }
    let labels = base["metadata"]["labels"]
        .as_object_mut()
        .expect("labels are an object");
    for (k, v) in essentials["metadata"]["labels"]
        .as_object()
        .expect("base labels")
    {
        labels.insert(k.clone(), v.clone());
    }
    for key in ["serviceAccountName", "automountServiceAccountToken"] {
        base["spec"][key] = essentials["spec"][key].clone();
    }
    let ours = &mut base["spec"]["containers"][0];
    for key in ESSENTIAL_CONTAINER_FIELDS {
        match essentials["spec"]["containers"][0].get(key) {
            Some(v) => ours[key] = v.clone(),
            None => {
                if let Some(o) = ours.as_object_mut() {
                    o.remove(key);
                }
            }
        }
    }
}

fn labels() -> BTreeMap<String, String> {
    let mut labels = selector();
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
    labels
}

fn heartbeat_labels() -> BTreeMap<String, String> {
    let mut labels = labels();
    labels.insert(ROLE_LABEL.to_owned(), ROLE_HEARTBEATS.to_owned());
    labels
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
    // Checked at start-up (`IngressSettings::validate`); a mismatch is a bug here.
    serde_json::from_value(deployment_value(s)).expect("ingress Deployment manifest is valid")
}

fn deployment_value(s: &IngressSettings) -> Value {
    let env = vec![
        // Dual-stack: `[::]` also accepts IPv4 (IPV6_V6ONLY is off on Linux).
        json!({"name": "LISTEN_ADDR", "value": format!("[::]:{INGRESS_PORT}")}),
        json!({"name": "METRICS_ADDR", "value": format!("[::]:{INGRESS_METRICS_PORT}")}),
        json!({"name": "PEER_LISTEN_ADDR", "value": format!("[::]:{INGRESS_PEER_PORT}")}),
        json!({"name": "DROPBOX_API_URL", "value": s.dropbox_api_url}),
        json!({"name": "DROPBOX_NOTIFY_URL", "value": s.dropbox_notify_url}),
        json!({"name": "LONGPOLL_TIMEOUT", "value": format!("{}s", s.longpoll_timeout.as_secs())}),
        json!({"name": "ALLOWED_CALLBACK_CIDRS", "value": s.allowed_callback_cidrs}),
        json!({"name": "DENIED_CALLBACK_CIDRS", "value": s.denied_callback_cidrs}),
        json!({"name": "LOG_FORMAT", "value": s.log_format}),
        json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
        json!({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
        json!({"name": "DATA_NAMESPACE", "value": s.data_namespace}),
    ];
    let probe = |path: &str| json!({"httpGet": {"path": path, "port": "metrics"}, "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3});
    let mut value = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": INGRESS_NAME, "namespace": s.namespace, "labels": labels()},
        "spec": {
            "selector": {"matchLabels": selector()},
            "template": {
                "metadata": {"labels": labels()},
                "spec": {
                    "serviceAccountName": s.service_account,
                    "automountServiceAccountToken": true,
                    "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": INGRESS_CONTAINER,
                        "image": s.image,
                        "imagePullPolicy": s.image_pull_policy,
                        "args": ["ingress"],
                        "env": env,
                        "ports": [
                            {"name": "http", "containerPort": INGRESS_PORT, "protocol": "TCP"},
                            {"name": "metrics", "containerPort": INGRESS_METRICS_PORT, "protocol": "TCP"},
                            {"name": "peer", "containerPort": INGRESS_PEER_PORT, "protocol": "TCP"}
                        ],
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
    // Left out when autoscaled: an apply without the field leaves the value to
    // whoever sets it (HorizontalPodAutoscaler, `kubectl scale`).
    if !s.autoscaling {
        value["spec"]["replicas"] = json!(s.replicas);
    }
    if let Some(overlay) = &s.pod_template {
        merge_pod_template(&mut value["spec"]["template"], overlay);
    }
    value
}

/// The desired ingress Service (pure): the webhook port only. Metrics and probes
/// are on their own port, reachable by pod IP (PodMonitor), never through it.
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

/// Ingress liveness as last seen: unknown until the first look (a restarted
/// controller keeps EventsReady as it was until then, so nothing flaps).
const UNKNOWN: u8 = 0;
const ALIVE: u8 = 1;
const DEAD: u8 = 2;

/// Keeps the ingress objects in line with "does any instance want events?" and
/// tracks whether an ingress replica is alive.
pub struct IngressManager {
    pub settings: IngressSettings,
    alive: AtomicU8,
    wake: Notify,
}

impl IngressManager {
    pub fn new(settings: IngressSettings) -> Arc<Self> {
        Arc::new(IngressManager {
            settings,
            alive: AtomicU8::new(UNKNOWN),
            wake: Notify::new(),
        })
    }

    /// Whether at least one ingress replica renewed its heartbeat recently; None
    /// before the first look.
    pub fn alive(&self) -> Option<bool> {
        match self.alive.load(Ordering::Acquire) {
            ALIVE => Some(true),
            DEAD => Some(false),
            _ => None,
        }
    }

    /// Asks the manager to look at the instances again (cheap; coalesced).
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// Runs until `stop`: applies/removes the ingress objects when needed, sweeps
    /// orphaned projections, and calls `on_liveness_change` when ingress liveness
    /// flips so instances are reconciled again.
    pub async fn run(
        self: Arc<Self>,
        client: Client,
        store: Store<DropboxElementInstance>,
        on_liveness_change: impl Fn() + Send + 'static,
        stop: CancellationToken,
    ) {
        tokio::select! {
            _ = crate::store::wait_until_ready(&store) => {}
            _ = stop.cancelled() => return,
        }
        let mut applied: Option<bool> = None;
        let mut drift_check = tokio::time::interval(Duration::from_secs(300));
        let mut heartbeat_check = tokio::time::interval(Duration::from_secs(3));
        loop {
            // Runs after every reconcile: a lookup under the cache's lock, not a
            // copy of every instance.
            let needed = store
                .find(|i| {
                    i.meta().deletion_timestamp.is_none()
                        && i.spec.events.as_ref().is_some_and(|e| e.enabled)
                })
                .is_some();
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
                _ = drift_check.tick() => {
                    applied = None;
                    if let Err(e) = self.sweep(&client, &store).await {
                        tracing::warn!(error = %e, "removing orphaned projections failed; retrying later");
                    }
                }
                _ = heartbeat_check.tick() => {
                    let alive = if self.any_heartbeat(&client).await { ALIVE } else { DEAD };
                    if self.alive.swap(alive, Ordering::AcqRel) != alive {
                        tracing::info!(alive = alive == ALIVE, "webhook ingress liveness changed");
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
        let configmaps: Api<ConfigMap> =
            Api::namespaced(client.clone(), &self.settings.data_namespace);
        if needed {
            let owners = self.owner(&deployments).await?;
            let pp = PatchParams::apply(CONTROLLER_FIELD_MANAGER).force();
            let mut deployment = ingress_deployment(&self.settings);
            deployment.metadata.owner_references = owners.clone();
            deployments
                .patch(INGRESS_NAME, &pp, &Patch::Apply(&deployment))
                .await?;
            if self.settings.manage_service {
                let mut service = ingress_service(&self.settings);
                service.metadata.owner_references = owners.clone();
                services
                    .patch(INGRESS_NAME, &pp, &Patch::Apply(&service))
                    .await?;
            }
            match &self.settings.autoscaler {
                Some(spec) => {
                    // Checked at start-up (`--ingress-autoscaler`); a failure is a bug here.
                    let hpa = super::autoscaler::autoscaler(spec, ns, Some(&labels()))
                        .expect("the ingress autoscaler spec makes an HPA");
                    super::autoscaler::apply(client, hpa, owners.clone()).await?;
                }
                None => super::autoscaler::remove(client, ns).await?,
            }
            // Created, never applied: the data belongs to the replicas. It is in
            // the data namespace, where no ownerReference can reach the
            // controller's Deployment: removed below when no instance has events.
            let heartbeats = ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some(HEARTBEATS_CONFIGMAP.to_owned()),
                    labels: Some(heartbeat_labels()),
                    ..Default::default()
                },
                ..Default::default()
            };
            match configmaps.create(&PostParams::default(), &heartbeats).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e),
            }
            tracing::info!(namespace = %ns, "webhook ingress Deployment and Service applied");
        } else {
            // Delete only what exists and is ours (a Deployment of the same name made
            // by someone else stays), so an operator without events makes no writes.
            if let Some(d) = deployments.get_opt(INGRESS_NAME).await?
                && contract::is_managed(d.metadata.labels.as_ref())
            {
                deployments
                    .delete(INGRESS_NAME, &DeleteParams::background())
                    .await?;
                tracing::info!(namespace = %ns, "no instance has events enabled: webhook ingress Deployment removed");
            }
            super::autoscaler::remove(client, ns).await?;
            if self.settings.manage_service
                && let Some(s) = services.get_opt(INGRESS_NAME).await?
                && contract::is_managed(s.metadata.labels.as_ref())
            {
                services
                    .delete(INGRESS_NAME, &DeleteParams::background())
                    .await?;
            }
            if let Some(c) = configmaps.get_opt(HEARTBEATS_CONFIGMAP).await?
                && contract::is_managed(c.metadata.labels.as_ref())
            {
                configmaps
                    .delete(HEARTBEATS_CONFIGMAP, &DeleteParams::background())
                    .await?;
            }
        }
        Ok(())
    }

    /// The ownerReferences of the ingress objects: the owner Deployment, when
    /// one is configured. A missing owner is an error (the release is being
    /// removed; nothing is created that nobody would remove).
    async fn owner(
        &self,
        deployments: &Api<Deployment>,
    ) -> Result<Option<Vec<OwnerReference>>, kube::Error> {
        let Some(name) = &self.settings.owner_deployment else {
            return Ok(None);
        };
        let owner = deployments.get(name).await?;
        Ok(Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: name.clone(),
            uid: owner.metadata.uid.unwrap_or_default(),
            ..Default::default()
        }]))
    }

    /// Reads the heartbeats ConfigMap; a replica is alive while its expiry is in
    /// the future. A failed read keeps the last verdict.
    async fn any_heartbeat(&self, client: &Client) -> bool {
        let configmaps: Api<ConfigMap> =
            Api::namespaced(client.clone(), &self.settings.data_namespace);
        match configmaps.get_opt(HEARTBEATS_CONFIGMAP).await {
            Ok(Some(cm)) => {
                !contract::live_replicas(&cm.data.unwrap_or_default(), jiff::Timestamp::now())
                    .is_empty()
            }
            Ok(None) => false,
            Err(e) => {
                tracing::debug!(error = %e, "could not read the ingress heartbeats");
                self.alive() == Some(true)
            }
        }
    }

    /// Deletes projected Secrets, cursors and delivery states whose instance no
    /// longer exists or no longer has events (e.g. deleted while the controller
    /// was down).
    async fn sweep(
        &self,
        client: &Client,
        store: &Store<DropboxElementInstance>,
    ) -> Result<(), kube::Error> {
        let live: HashSet<String> = store
            .state()
            .iter()
            .filter(|i| i.spec.events.as_ref().is_some_and(|e| e.enabled))
            .filter_map(|i| i.uid())
            .collect();
        let lp = ListParams::default().labels(&format!(
            "{MANAGED_BY_LABEL}={MANAGED_BY},{INSTANCE_UID_LABEL}"
        ));
        let ns = &self.settings.data_namespace;
        let in_scope = |meta: &kube::api::ObjectMeta| {
            let labels = meta.labels.as_ref();
            let uid = labels.and_then(|l| l.get(INSTANCE_UID_LABEL));
            let instance_ns = labels.and_then(|l| l.get(INSTANCE_NAMESPACE_LABEL));
            let watched = match &self.settings.watch_namespace {
                Some(w) => w
                    .split(',')
                    .any(|n| instance_ns.map(String::as_str) == Some(n.trim())),
                None => true,
            };
            watched && uid.is_some_and(|u| !live.contains(u))
        };
        let secrets: Api<PartialObjectMeta<Secret>> = Api::namespaced(client.clone(), ns);
        for s in secrets.list_metadata(&lp).await?.items {
            if in_scope(&s.metadata) {
                delete_ignoring_missing(
                    &Api::<Secret>::namespaced(client.clone(), ns),
                    &s.name_any(),
                )
                .await?;
                tracing::info!(secret = %s.name_any(), "removed the projection of a deleted instance");
            }
        }
        let configmaps: Api<PartialObjectMeta<ConfigMap>> = Api::namespaced(client.clone(), ns);
        for c in configmaps.list_metadata(&lp).await?.items {
            if in_scope(&c.metadata) {
                delete_ignoring_missing(
                    &Api::<ConfigMap>::namespaced(client.clone(), ns),
                    &c.name_any(),
                )
                .await?;
                tracing::info!(configmap = %c.name_any(), "removed the cursor or delivery state of a deleted instance");
            }
        }
        Ok(())
    }
}

/// Deletes an object; one that is already gone is fine.
pub async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
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
            data_namespace: "dropbox-system-ingress-data".into(),
            image: "ghcr.io/example/dropbox-operator:1.0".into(),
            image_pull_policy: "IfNotPresent".into(),
            replicas: 2,
            service_account: "dropbox-webhook-ingress".into(),
            resources: None,
            allowed_callback_cidrs: "".into(),
            denied_callback_cidrs: "".into(),
            dropbox_api_url: "https://api.dropboxapi.com".into(),
            dropbox_notify_url: "https://notify.dropboxapi.com".into(),
            longpoll_timeout: Duration::from_secs(120),
            watch_namespace: None,
            log_format: "json".into(),
            pod_template: None,
            autoscaling: false,
            autoscaler: None,
            manage_service: true,
            owner_deployment: None,
        }
    }

    #[test]
    fn pod_template_merges_and_the_essentials_win() {
        let mut s = settings();
        s.autoscaling = true;
        s.pod_template = Some(json!({
            "metadata": {
                "labels": {"team": "a", "app.kubernetes.io/component": "mine"},
                "annotations": {"sidecar.istio.io/inject": "false"}
            },
            "spec": {
                "nodeSelector": {"pool": "edge"},
                "tolerations": [{"key": "edge", "operator": "Exists"}],
                "priorityClassName": "high",
                "serviceAccountName": "someone-else",
                "securityContext": {"runAsUser": 1000, "runAsNonRoot": null},
                "volumes": [{"name": "ca", "configMap": {"name": "ca"}}],
                "containers": [
                    {
                        "name": "ingress",
                        "image": "evil:1",
                        "args": ["sh"],
                        "env": [
                            {"name": "HTTPS_PROXY", "value": "http://proxy:3128"},
                            {"name": "LOG_FORMAT", "value": "text"},
                            {"name": "LISTEN_ADDR", "value": "0.0.0.0:1"}
                        ],
                        "volumeMounts": [{"name": "ca", "mountPath": "/etc/ca"}],
                        "securityContext": {"readOnlyRootFilesystem": false}
                    },
                    {"name": "sidecar", "image": "sidecar:1"}
                ]
            }
        }));
        s.validate().expect("valid");
        let d = ingress_deployment(&s);
        assert_eq!(d.spec.replicas, None, "autoscaled");
        let t = d.spec.template;
        let labels = t.metadata.as_ref().unwrap().labels.clone().unwrap();
        assert_eq!(labels["team"], "a");
        assert_eq!(labels["app.kubernetes.io/component"], INGRESS_COMPONENT);
        let pod = t.spec.unwrap();
        assert_eq!(
            pod.service_account_name.as_deref(),
            Some("dropbox-webhook-ingress")
        );
        assert_eq!(pod.priority_class_name.as_deref(), Some("high"));
        assert_eq!(pod.tolerations.unwrap().len(), 1);
        let sc = pod.security_context.unwrap();
        assert_eq!(sc.run_as_user, Some(1000));
        assert_eq!(sc.run_as_non_root, None, "null removes");
        assert!(
            sc.seccomp_profile.is_some(),
            "the rest of the default stays"
        );
        assert_eq!(pod.containers.len(), 2);
        let c = &pod.containers[0];
        assert_eq!(c.name, "ingress");
        assert_eq!(
            c.image.as_deref(),
            Some("ghcr.io/example/dropbox-operator:1.0")
        );
        assert_eq!(c.args.as_deref(), Some(&["ingress".to_owned()][..]));
        let env = |name: &str| {
            c.env
                .as_ref()
                .unwrap()
                .iter()
                .filter(|e| e.name == name)
                .map(|e| e.value.clone().unwrap_or_default())
                .collect::<Vec<_>>()
        };
        assert_eq!(env("HTTPS_PROXY"), ["http://proxy:3128"]);
        assert_eq!(env("LOG_FORMAT"), ["text"]);
        assert_eq!(env("LISTEN_ADDR"), [format!("[::]:{INGRESS_PORT}")]);
        assert_eq!(c.volume_mounts.as_ref().unwrap()[0].mount_path, "/etc/ca");
        let csc = c.security_context.as_ref().unwrap();
        assert_eq!(csc.read_only_root_filesystem, Some(false));
        assert_eq!(csc.allow_privilege_escalation, Some(false));
        assert_eq!(pod.containers[1].name, "sidecar");
    }

    #[test]
    fn deployment_runs_the_ingress_subcommand_with_probes_on_the_metrics_port() {
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
        let probe = c.readiness_probe.as_ref().expect("readiness");
        assert_eq!(
            serde_json::to_value(&probe.http_get.as_ref().expect("http").port).unwrap(),
            json!("metrics")
        );
        assert!(c.liveness_probe.is_some());
        assert_eq!(
            spec.selector
                .match_labels
                .expect("selector")
                .get("app.kubernetes.io/component"),
            Some(&INGRESS_COMPONENT.to_owned())
        );
    }

    #[test]
    fn service_exposes_only_the_webhook_port() {
        let s = ingress_service(&settings()).spec.expect("spec");
        let ports = s.ports.expect("ports");
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].name.as_deref(), Some("http"));
    }
}
