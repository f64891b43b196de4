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

/// How long the API server may take to answer a request (or send the next part
/// of a watch) before the operator gives up on it and tries again. A request to
/// an API server that restarted can otherwise hang for minutes.
pub const API_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Watches are ended by the API server after this long (below
/// [`API_READ_TIMEOUT`], so an idle watch is never taken for a hung one) and
/// resumed from their resourceVersion.
pub const WATCH_TIMEOUT_SECS: u32 = 20;

/// A client for the cluster (in-cluster, or KUBECONFIG) with
/// [`API_READ_TIMEOUT`].
pub async fn client() -> Result<kube::Client, kube::Error> {
    let mut config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    config.read_timeout = Some(API_READ_TIMEOUT);
    config.reset_reader_on_write = true;
    kube::Client::try_from(config)
}

/// The watcher settings of the operator's watches (see [`WATCH_TIMEOUT_SECS`]).
pub fn watch_config() -> kube::runtime::watcher::Config {
    kube::runtime::watcher::Config::default().timeout(WATCH_TIMEOUT_SECS)
}

/// The backoff of the operator's watches: 250 ms doubling to at most 3 s, with
/// jitter. kube's default grows to 30 s: after an API server restart (a few
/// seconds of refused connections, then "too old resource version" once per
/// watch) a watch could stay blind for half a minute and more, and with it
/// everything that waits on it (tests/faults.rs, row 13). Reset by kube-runtime
/// after every event that is not an error.
pub fn watch_backoff() -> WatchBackoff {
    WatchBackoff { attempt: 0 }
}

/// See [`watch_backoff`].
pub struct WatchBackoff {
    attempt: u32,
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.attempt = self.attempt.saturating_add(1);
        Some(crate::retry::backoff_delay(
            Duration::from_millis(250),
            Duration::from_secs(3),
            self.attempt,
            None,
        ))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The shared backoff of a controller's merged trigger streams when each of them
/// already backs off on its own ([`watch_backoff`]): a short constant pause, so
/// one stream's error never holds the others back for long.
pub struct TriggerBackoff;

impl Iterator for TriggerBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(Duration::from_millis(50))
    }
}

impl kube::runtime::utils::Backoff for TriggerBackoff {
    fn reset(&mut self) {}
}

/// Drops from a cached instance what neither the controller nor the ingress
/// reads: field-management bookkeeping and kubectl's last-applied copy of the
/// spec, together most of a small instance's size. Caches hold every instance
/// for the process's lifetime (docs/performance.md).
pub fn slim_instance(instance: &mut crate::api::DropboxElementInstance) {
    instance.metadata.managed_fields = None;
    if let Some(annotations) = instance.metadata.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// The namespaces of a comma-separated `--namespace` value (`WATCH_NAMESPACE`);
/// empty: all namespaces.
pub fn split_namespaces(value: Option<&str>) -> Vec<String> {
    let mut namespaces: Vec<String> = value
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    namespaces.sort();
    namespaces.dedup();
    namespaces
}

/// One `Api` per watched namespace, or one for all namespaces when none is given.
pub fn apis<K>(client: &kube::Client, namespaces: &[String]) -> Vec<kube::Api<K>>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    if namespaces.is_empty() {
        vec![kube::Api::all(client.clone())]
    } else {
        namespaces
            .iter()
            .map(|ns| kube::Api::namespaced(client.clone(), ns))
            .collect()
    }
}

/// Watches `K` through several `Api`s (one per namespace) as one stream that a
/// single reflector store can consume.
///
/// Merging plain watchers would break the store: every watcher's `Init` resets
/// the store's buffer and its `InitDone` replaces the whole store with that one
/// namespace's objects. Here the first listing of all namespaces together is one
/// `Init` … `InitDone` (other events are held back until it is complete), and a
/// later relist of one namespace becomes `Apply` for what it lists and `Delete`
/// for what it no longer lists, leaving the other namespaces' objects alone.
/// With one `Api` this is the plain watcher.
pub fn namespaces_watcher<K>(
    apis: Vec<kube::Api<K>>,
    config: kube::runtime::watcher::Config,
) -> futures::stream::BoxStream<'static, Result<WatchEvent<K>, kube::runtime::watcher::Error>>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    if apis.len() == 1 {
        let api = apis.into_iter().next().expect("one Api");
        return watcher(api, config).boxed();
    }
    let count = apis.len();
    let streams = apis.into_iter().enumerate().map(|(index, api)| {
        watcher(api, config.clone())
            .backoff(watch_backoff())
            .map(move |event| (index, event))
            .boxed()
    });
    let merged = futures::stream::select_all(streams);
    let state = Merge::new(count);
    futures::stream::once(async { vec![Ok(WatchEvent::Init)] })
        .chain(merged.scan(state, |state, (index, event)| {
            let out = match event {
                Ok(event) => state.on_event(index, event).into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e)],
            };
            futures::future::ready(Some(out))
        }))
        .flat_map(futures::stream::iter)
        .boxed()
}

type WatchEvent<K> = kube::runtime::watcher::Event<K>;

/// What [`namespaces_watcher`] knows of each namespace's stream.
struct Merge<K> {
    /// Streams whose first listing is not complete yet.
    pending: std::collections::HashSet<usize>,
    /// Events of streams that finished listing, held until all have.
    held: Vec<WatchEvent<K>>,
    /// The objects each stream last reported, by name.
    known: Vec<std::collections::HashMap<String, K>>,
    /// During a relist of a stream: the names listed so far.
    relisting: Vec<Option<std::collections::HashSet<String>>>,
}

impl<K: kube::Resource + Clone> Merge<K> {
    fn new(streams: usize) -> Self {
        Merge {
            pending: (0..streams).collect(),
            held: Vec::new(),
            known: (0..streams).map(|_| Default::default()).collect(),
            relisting: (0..streams).map(|_| None).collect(),
        }
    }

    fn name(object: &K) -> String {
        object.meta().name.clone().unwrap_or_default()
    }

    fn on_event(&mut self, index: usize, event: WatchEvent<K>) -> Vec<WatchEvent<K>> {
        if self.pending.contains(&index) {
            // Part of the first, common listing.
            return match event {
                WatchEvent::Init => Vec::new(),
                WatchEvent::InitApply(o) | WatchEvent::Apply(o) => {
                    self.known[index].insert(Self::name(&o), o.clone());
                    vec![WatchEvent::InitApply(o)]
                }
                WatchEvent::Delete(o) => {
                    self.known[index].remove(&Self::name(&o));
                    Vec::new()
                }
                WatchEvent::InitDone => {
                    self.pending.remove(&index);
                    if self.pending.is_empty() {
                        let mut out = vec![WatchEvent::InitDone];
                        out.append(&mut self.held);
                        out
                    } else {
                        Vec::new()
                    }
                }
            };
        }
        let out = match event {
            WatchEvent::Init => {
                self.relisting[index] = Some(Default::default());
                Vec::new()
            }
            WatchEvent::InitApply(o) | WatchEvent::Apply(o) => {
                let name = Self::name(&o);
                if let Some(seen) = self.relisting[index].as_mut() {
                    seen.insert(name.clone());
                }
                self.known[index].insert(name, o.clone());
                vec![WatchEvent::Apply(o)]
            }
            WatchEvent::Delete(o) => {
                self.known[index].remove(&Self::name(&o));
                vec![WatchEvent::Delete(o)]
            }
            WatchEvent::InitDone => {
                let seen = self.relisting[index].take().unwrap_or_default();
                let gone: Vec<String> = self.known[index]
                    .keys()
                    .filter(|name| !seen.contains(*name))
                    .cloned()
                    .collect();
                gone.into_iter()
                    .filter_map(|name| self.known[index].remove(&name))
                    .map(WatchEvent::Delete)
                    .collect()
            }
        };
        if self.pending.is_empty() {
            out
        } else {
            self.held.extend(out);
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn cm(name: &str) -> ConfigMap {
        ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn names(events: &[WatchEvent<ConfigMap>]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                WatchEvent::Init => "init".to_owned(),
                WatchEvent::InitDone => "done".to_owned(),
                WatchEvent::InitApply(o) => format!("init-apply {}", Merge::name(o)),
                WatchEvent::Apply(o) => format!("apply {}", Merge::name(o)),
                WatchEvent::Delete(o) => format!("delete {}", Merge::name(o)),
            })
            .collect()
    }

    #[test]
    fn namespaces_are_listed_as_one_and_relisted_alone() {
        let mut m = Merge::new(2);
        let mut out = Vec::new();
        out.extend(m.on_event(0, WatchEvent::Init));
        out.extend(m.on_event(0, WatchEvent::InitApply(cm("a"))));
        out.extend(m.on_event(0, WatchEvent::InitApply(cm("b"))));
        out.extend(m.on_event(0, WatchEvent::InitDone));
        // Held until namespace 1 is listed too.
        out.extend(m.on_event(0, WatchEvent::Apply(cm("c"))));
        out.extend(m.on_event(1, WatchEvent::Init));
        out.extend(m.on_event(1, WatchEvent::InitApply(cm("x"))));
        assert_eq!(
            names(&out),
            ["init-apply a", "init-apply b", "init-apply x"]
        );
        out = m.on_event(1, WatchEvent::InitDone);
        assert_eq!(names(&out), ["done", "apply c"]);
        // A relist of namespace 0 that no longer lists `a`.
        out = m.on_event(0, WatchEvent::Init);
        out.extend(m.on_event(0, WatchEvent::InitApply(cm("b"))));
        out.extend(m.on_event(0, WatchEvent::InitApply(cm("c"))));
        out.extend(m.on_event(0, WatchEvent::InitDone));
        assert_eq!(names(&out), ["apply b", "apply c", "delete a"]);
        out = m.on_event(1, WatchEvent::Delete(cm("x")));
        assert_eq!(names(&out), ["delete x"]);
    }

    #[test]
    fn namespaces_are_split_on_commas() {
        assert!(split_namespaces(None).is_empty());
        assert!(split_namespaces(Some("")).is_empty());
        assert_eq!(split_namespaces(Some("b, a,,b")), ["a", "b"]);
    }
}
