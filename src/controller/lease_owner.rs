//! The leader Lease belongs to the release: the leader gives it an
//! ownerReference to the controller's own Deployment (the one the ingress
//! objects are owned by, `--ingress-owner-deployment`), so the garbage collector
//! removes it with the release. Without it, `helm uninstall` left the Lease
//! behind (found by `make e2e`, tests/e2e.rs "helm uninstall").

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

/// Sets the Lease's ownerReferences to Deployment `owner` (both in `namespace`).
/// A JSON merge patch of the metadata only: the lease manager's server-side
/// apply owns the spec, and a failure here costs nothing but the clean-up.
pub async fn own_lease(
    client: &Client,
    namespace: &str,
    lease: &str,
    owner: &str,
) -> Result<(), kube::Error> {
    let deployment = Api::<Deployment>::namespaced(client.clone(), namespace)
        .get(owner)
        .await?;
    let uid = deployment.metadata.uid.unwrap_or_default();
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let current = leases.get(lease).await?;
    let already = current
        .metadata
        .owner_references
        .unwrap_or_default()
        .iter()
        .any(|o| o.uid == uid);
    if !already {
        let patch = json!({"metadata": {"ownerReferences": [{
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": owner,
            "uid": uid,
        }]}});
        leases
            .patch(lease, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(())
}
