//! Helpers for kube-runtime reflector stores, shared by the controller and the
//! ingress.

use std::time::Duration;

use kube::runtime::reflector::Store;

/// Waits until the store has its first full list. `Store::wait_until_ready` keeps
/// only the waker of the last task that polled it (kube-runtime 5.0 polls one
/// oneshot receiver from every waiter), so with another task also waiting, a
/// second waiter may never be woken; polling it again in short slices
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
                tracing::warn!("the cache was dropped before it was filled");
            }
            return;
        }
    }
}

/// Drops from a cached instance what neither the controller nor the ingress
/// reads: field-management bookkeeping and kubectl's last-applied copy of the
/// spec, together most of a small instance's size. Caches hold every instance
/// for the process's lifetime (README, "Performance").
pub fn slim_instance(instance: &mut crate::api::DropboxElementInstance) {
    instance.metadata.managed_fields = None;
    if let Some(annotations) = instance.metadata.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}
