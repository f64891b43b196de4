//! The webhook ingress's HorizontalPodAutoscaler (docs/architecture.md, "The
//! ingress autoscaler"): built from `--ingress-autoscaler` (the Helm chart's
//! `webhookIngress.autoscaling`), applied with the ingress Deployment and
//! removed with it.
//!
//! The controller makes it, not the chart: an HPA whose Deployment does not
//! exist yet reports `AbleToScale=False/FailedGetScale`, which Argo CD shows as
//! Degraded for as long as no instance has events enabled.

use std::collections::BTreeMap;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};

use crate::contract::{self, CONTROLLER_FIELD_MANAGER, INGRESS_NAME};

/// The HPA of the ingress Deployment in `namespace`: `spec` (an HPA spec
/// without `scaleTargetRef`) pointed at the Deployment. Fails, saying why, when
/// `spec` does not make an HPA the API server would take (checked at start-up,
/// see `cli`).
pub fn autoscaler(
    spec: &Value,
    namespace: &str,
    labels: Option<&BTreeMap<String, String>>,
) -> Result<HorizontalPodAutoscaler, String> {
    let bound = |key: &str| spec.get(key).map(|v| v.as_i64().filter(|n| *n >= 1));
    let max = match bound("maxReplicas") {
        Some(Some(max)) => max,
        _ => return Err("maxReplicas must be a whole number of at least 1".into()),
    };
    match bound("minReplicas") {
        Some(None) => return Err("minReplicas must be a whole number of at least 1".into()),
        Some(Some(min)) if min > max => {
            return Err(format!("minReplicas ({min}) is above maxReplicas ({max})"));
        }
        _ => {}
    }
    let mut spec = spec.clone();
    if let Some(fields) = spec.as_object_mut() {
        fields.insert(
            "scaleTargetRef".into(),
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": INGRESS_NAME}),
        );
    }
    serde_json::from_value(json!({
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": INGRESS_NAME, "namespace": namespace, "labels": labels},
        "spec": spec,
    }))
    .map_err(|e| e.to_string())
}

/// Applies the HPA (server-side apply, the controller's field manager), owned
/// like the Deployment it scales.
pub async fn apply(
    client: &Client,
    mut hpa: HorizontalPodAutoscaler,
    owners: Option<Vec<OwnerReference>>,
) -> Result<(), kube::Error> {
    let namespace = hpa.metadata.namespace.clone().unwrap_or_default();
    hpa.metadata.owner_references = owners;
    let api: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &namespace);
    let pp = PatchParams::apply(CONTROLLER_FIELD_MANAGER).force();
    api.patch(INGRESS_NAME, &pp, &Patch::Apply(&hpa)).await?;
    Ok(())
}

/// Deletes the HPA when it exists and is the operator's (an HPA of the same name
/// made by someone else stays).
pub async fn remove(client: &Client, namespace: &str) -> Result<(), kube::Error> {
    let api: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), namespace);
    if let Some(hpa) = api.get_opt(INGRESS_NAME).await?
        && contract::is_managed(hpa.metadata.labels.as_ref())
    {
        api.delete(INGRESS_NAME, &DeleteParams::background())
            .await?;
        tracing::info!(%namespace, "webhook ingress HorizontalPodAutoscaler removed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_autoscaler_scales_the_ingress_deployment() {
        let spec = json!({
            "minReplicas": 2,
            "maxReplicas": 5,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]
        });
        let hpa = autoscaler(&spec, "ops", None).expect("valid");
        let spec = hpa.spec;
        assert_eq!(spec.scale_target_ref.kind, "Deployment");
        assert_eq!(spec.scale_target_ref.name, INGRESS_NAME);
        assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 5));
        assert_eq!(hpa.metadata.namespace.as_deref(), Some("ops"));
        for bad in [
            json!({"minReplicas": 2}),
            json!({"minReplicas": 5, "maxReplicas": 3}),
            json!({"minReplicas": 0, "maxReplicas": 3}),
            json!({"maxReplicas": 3, "metrics": "cpu"}),
        ] {
            assert!(autoscaler(&bad, "ops", None).is_err(), "{bad}");
        }
    }
}
