//! What the ingress knows of the instances: the Secrets `dropbox-instance-<uid>`
//! the controller projects into the data namespace (docs/architecture.md, "Who
//! reads and writes what"), kept current by a watch.
//!
//! The data namespace holds nothing but the ingress's own material, so the
//! ingress may list and watch there; it reads no DropboxElementInstance and no
//! other namespace. A projection carries the instance's settings
//! ([`ProjectedInstance`]: callback URL, format, folder, source, account,
//! app key, identity, generation) and its secrets (app secret, access token,
//! signature key). A rotated secret or a refreshed token reaches the ingress
//! with the watch event of the controller's write.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::EventSource;
use crate::contract::{
    self, ACCESS_TOKEN_KEY, APP_SECRET_KEY, INSTANCE_KEY, INSTANCE_UID_LABEL, ProjectedInstance,
    ROLE_PROJECTION, SIGNATURE_KEY_KEY,
};

/// One instance as the controller projected it. Debug output hides the secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct Projection {
    pub instance: ProjectedInstance,
    /// Verifies Dropbox's webhook signatures (absent for long-polled instances).
    pub app_secret: Option<Vec<u8>>,
    /// Lists the changes.
    pub access_token: Option<String>,
    /// Signs deliveries (absent: deliveries are not signed).
    pub signature_key: Option<Vec<u8>>,
}

impl Projection {
    pub fn uid(&self) -> &str {
        &self.instance.uid
    }

    /// Whether Dropbox's webhooks concern it (long-polled instances take none).
    pub fn takes_webhooks(&self) -> bool {
        self.instance.source == EventSource::Webhook && self.app_secret.is_some()
    }

    /// `namespace/name`, for logs.
    pub fn key(&self) -> String {
        format!("{}/{}", self.instance.namespace, self.instance.name)
    }
}

impl fmt::Debug for Projection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |present: bool| if present { "<redacted>" } else { "<none>" };
        f.debug_struct("Projection")
            .field("instance", &self.instance)
            .field("app_secret", &hidden(self.app_secret.is_some()))
            .field("access_token", &hidden(self.access_token.is_some()))
            .field("signature_key", &hidden(self.signature_key.is_some()))
            .finish()
    }
}

#[derive(Default)]
struct Index {
    by_uid: HashMap<String, Arc<Projection>>,
    /// uids of the instances that take webhooks, by app key.
    by_app_key: HashMap<String, Vec<String>>,
}

impl Index {
    fn insert(&mut self, p: Arc<Projection>) -> Option<Arc<Projection>> {
        let old = self.remove(p.uid());
        if p.takes_webhooks() {
            self.by_app_key
                .entry(p.instance.app_key.clone())
                .or_default()
                .push(p.instance.uid.clone());
        }
        self.by_uid.insert(p.instance.uid.clone(), p);
        old
    }

    fn remove(&mut self, uid: &str) -> Option<Arc<Projection>> {
        let old = self.by_uid.remove(uid)?;
        if let Some(uids) = self.by_app_key.get_mut(&old.instance.app_key) {
            uids.retain(|u| u != uid);
            if uids.is_empty() {
                self.by_app_key.remove(&old.instance.app_key);
            }
        }
        Some(old)
    }
}

/// A change the sync machinery acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new projection, or one that changed; `resync`: its generation, resume
    /// annotation, account or folder changed (a parked delivery resumes, a
    /// re-baselined cursor has an `UNKNOWN` event to deliver), or it is new.
    Updated { uid: String, resync: bool },
    /// The projection is gone (events turned off, instance deleted).
    Removed(String),
}

/// The projections of every events-enabled instance, by uid and by app key.
pub struct Projections {
    index: RwLock<Index>,
    ready: tokio::sync::watch::Sender<bool>,
    /// Counts changes (any instance); the long-poll manager watches it.
    version: tokio::sync::watch::Sender<u64>,
    changes: mpsc::UnboundedSender<Change>,
}

impl Projections {
    /// An empty cache and the receiver of its changes.
    pub fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<Change>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Projections {
                index: RwLock::default(),
                ready: tokio::sync::watch::Sender::new(false),
                version: tokio::sync::watch::Sender::new(0),
                changes: tx,
            }),
            rx,
        )
    }

    pub fn get(&self, uid: &str) -> Option<Arc<Projection>> {
        self.index
            .read()
            .expect("projections lock")
            .by_uid
            .get(uid)
            .cloned()
    }

    /// The instances of app `app_key` that take webhooks.
    pub fn for_app_key(&self, app_key: &str) -> Vec<Arc<Projection>> {
        let index = self.index.read().expect("projections lock");
        index
            .by_app_key
            .get(app_key)
            .into_iter()
            .flatten()
            .filter_map(|uid| index.by_uid.get(uid).cloned())
            .collect()
    }

    /// Whether some instance takes webhooks of app `app_key` (cheap: no copy).
    pub fn knows_app_key(&self, app_key: &str) -> bool {
        self.index
            .read()
            .expect("projections lock")
            .by_app_key
            .contains_key(app_key)
    }

    /// Every projection.
    pub fn all(&self) -> Vec<Arc<Projection>> {
        self.index
            .read()
            .expect("projections lock")
            .by_uid
            .values()
            .cloned()
            .collect()
    }

    /// Sees every change (the value counts them).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Waits until the first listing is in.
    pub async fn wait_ready(&self) {
        let mut ready = self.ready.subscribe();
        let _ = ready.wait_for(|r| *r).await;
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Replaces everything (a test, or a relist).
    pub fn replace_all(&self, projections: Vec<Projection>) {
        let mut fresh = Index::default();
        for p in projections {
            fresh.insert(Arc::new(p));
        }
        let old = std::mem::replace(&mut *self.index.write().expect("projections lock"), fresh);
        let index = self.index.read().expect("projections lock");
        for (uid, p) in &index.by_uid {
            let previous = old.by_uid.get(uid);
            if previous.is_none_or(|o| o != p) {
                let _ = self.changes.send(Change::Updated {
                    uid: uid.clone(),
                    resync: previous.is_none_or(|o| resync(o, p)),
                });
            }
        }
        for uid in old.by_uid.keys() {
            if !index.by_uid.contains_key(uid) {
                let _ = self.changes.send(Change::Removed(uid.clone()));
            }
        }
        drop(index);
        self.ready.send_replace(true);
        self.version.send_modify(|v| *v += 1);
    }

    /// Adds or replaces one projection.
    pub fn put(&self, p: Projection) {
        let uid = p.instance.uid.clone();
        let p = Arc::new(p);
        let old = self
            .index
            .write()
            .expect("projections lock")
            .insert(p.clone());
        if old.as_ref().is_none_or(|o| *o != p) {
            let _ = self.changes.send(Change::Updated {
                uid,
                resync: old.is_none_or(|o| resync(&o, &p)),
            });
            self.version.send_modify(|v| *v += 1);
        }
    }

    /// Removes one projection.
    pub fn remove(&self, uid: &str) {
        if self
            .index
            .write()
            .expect("projections lock")
            .remove(uid)
            .is_some()
        {
            let _ = self.changes.send(Change::Removed(uid.to_owned()));
            self.version.send_modify(|v| *v += 1);
        }
    }

    /// Keeps the cache in line with the projected Secrets of the data namespace
    /// until `stop`. `relists` counts the (re)lists.
    pub async fn run(
        self: Arc<Self>,
        api: Api<Secret>,
        relists: prometheus_client::metrics::counter::Counter,
        stop: CancellationToken,
    ) {
        // A consistent list, not "any": after an API server restart a list
        // served from its cache can be older than the watch window (see the
        // controller's delivery-state watch).
        let config = crate::store::watch_config().labels(&contract::role_selector(ROLE_PROJECTION));
        let mut listing: Option<Vec<Projection>> = None;
        let mut events =
            std::pin::pin!(watcher(api, config).backoff(crate::store::watch_backoff()));
        loop {
            let event = tokio::select! {
                event = events.next() => event,
                _ = stop.cancelled() => return,
            };
            match event {
                Some(Ok(watcher::Event::Init)) => {
                    relists.inc();
                    listing = Some(Vec::new());
                }
                Some(Ok(watcher::Event::InitApply(secret))) => {
                    if let (Some(list), Some(p)) = (listing.as_mut(), parse(secret)) {
                        list.push(p);
                    }
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    self.replace_all(listing.take().unwrap_or_default());
                }
                Some(Ok(watcher::Event::Apply(secret))) => {
                    let uid = uid_of(&secret);
                    match parse(secret) {
                        Some(p) => self.put(p),
                        None => {
                            if let Some(uid) = uid {
                                self.remove(&uid);
                            }
                        }
                    }
                }
                Some(Ok(watcher::Event::Delete(secret))) => {
                    if let Some(uid) = uid_of(&secret) {
                        self.remove(&uid);
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching the projected Secrets failed; retrying")
                }
                None => return,
            }
        }
    }
}

/// Whether a change of a projection calls for a sync (see [`Change::Updated`]).
fn resync(old: &Projection, new: &Projection) -> bool {
    let (a, b) = (&old.instance, &new.instance);
    a.generation != b.generation
        || a.resume != b.resume
        || a.account_id != b.account_id
        || a.folder != b.folder
}

fn uid_of(secret: &Secret) -> Option<String> {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(INSTANCE_UID_LABEL))
        .cloned()
}

/// A projected Secret as the ingress uses it; None for anything that is not a
/// complete projection made by the operator.
pub fn parse(secret: Secret) -> Option<Projection> {
    if !contract::is_managed(secret.metadata.labels.as_ref()) {
        return None;
    }
    let uid = uid_of(&secret)?;
    if secret.metadata.name.as_deref() != Some(contract::instance_secret_name(&uid).as_str()) {
        return None;
    }
    let mut data = secret.data.unwrap_or_default();
    let mut take = |key: &str| {
        data.remove(key)
            .map(|v| trim(v.0))
            .filter(|v| !v.is_empty())
    };
    let instance: ProjectedInstance = serde_json::from_slice(&take(INSTANCE_KEY)?).ok()?;
    if instance.uid != uid {
        return None;
    }
    Some(Projection {
        app_secret: take(APP_SECRET_KEY),
        access_token: take(ACCESS_TOKEN_KEY).map(|v| String::from_utf8_lossy(&v).into_owned()),
        signature_key: take(SIGNATURE_KEY_KEY),
        instance,
    })
}

/// Secrets made with `echo` or `--from-file` often end in a newline.
fn trim(mut v: Vec<u8>) -> Vec<u8> {
    while v.last().is_some_and(|b| b.is_ascii_whitespace()) {
        v.pop();
    }
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    v.drain(..start);
    v
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::api::EventFormat;

    /// A projection for tests.
    pub fn projection(uid: &str, app_key: &str, account: &str, secret: &str) -> Projection {
        Projection {
            instance: ProjectedInstance {
                namespace: "team".into(),
                name: format!("i-{uid}"),
                uid: uid.into(),
                generation: 1,
                display_name: format!("i-{uid}"),
                tags: vec![],
                account_id: account.into(),
                app_key: app_key.into(),
                source: EventSource::Webhook,
                format: EventFormat::Elements,
                folder: String::new(),
                callback_url: "https://example.com/hook?token=CAPABILITY".into(),
                resume: None,
            },
            app_secret: Some(secret.as_bytes().to_vec()),
            access_token: Some("TOKEN".into()),
            signature_key: None,
        }
    }

    #[test]
    fn trims_surrounding_whitespace() {
        assert_eq!(trim(b"  key\n".to_vec()), b"key");
        assert_eq!(trim(b"\n".to_vec()), b"");
    }

    #[test]
    fn debug_hides_values() {
        let mut p = projection("u1", "k", "dbid:a", "TOPSECRET");
        p.signature_key = Some(b"SIGNINGKEY".to_vec());
        let shown = format!("{p:?}");
        for hidden in ["TOPSECRET", "TOKEN", "SIGNINGKEY", "CAPABILITY"] {
            assert!(!shown.contains(hidden), "{shown}");
        }
    }

    #[test]
    fn the_index_follows_puts_and_removes() {
        let (cache, mut changes) = Projections::new();
        cache.replace_all(vec![
            projection("u1", "k1", "dbid:a", "s"),
            projection("u2", "k1", "dbid:b", "s"),
        ]);
        assert_eq!(cache.for_app_key("k1").len(), 2);
        let mut longpolled = projection("u3", "k1", "dbid:c", "s");
        longpolled.instance.source = EventSource::LongPoll;
        longpolled.app_secret = None;
        cache.put(longpolled);
        assert_eq!(cache.for_app_key("k1").len(), 2, "long-polled: no webhook");
        cache.remove("u1");
        assert_eq!(cache.for_app_key("k1").len(), 1);
        assert!(cache.knows_app_key("k1") && !cache.knows_app_key("k2"));
        let mut seen = Vec::new();
        while let Ok(c) = changes.try_recv() {
            seen.push(c);
        }
        for expected in ["u1", "u2", "u3"] {
            let new = Change::Updated {
                uid: expected.into(),
                resync: true,
            };
            assert!(seen.contains(&new), "{seen:?}");
        }
        assert!(seen.contains(&Change::Removed("u1".into())));
    }

    #[test]
    fn only_complete_projections_of_the_operator_count() {
        let p = projection("u1", "k", "dbid:a", "s");
        let secret = |labels: serde_json::Value, name: &str| -> Secret {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "labels": labels},
                "stringData": {},
                "data": {
                    "instance.json": base64(&serde_json::to_vec(&p.instance).unwrap()),
                    "app-secret": base64(b"s\n"),
                    "access-token": base64(b"TOKEN"),
                }
            }))
            .unwrap()
        };
        fn base64(b: &[u8]) -> String {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(b)
        }
        let ours = serde_json::json!({
            "app.kubernetes.io/managed-by": "dropbox-operator",
            "elements.dropbox-operator.dev/instance-uid": "u1"
        });
        assert_eq!(
            parse(secret(ours.clone(), "dropbox-instance-u1")),
            Some(p.clone())
        );
        assert_eq!(parse(secret(ours, "dropbox-instance-u2")), None);
        let foreign = serde_json::json!({"elements.dropbox-operator.dev/instance-uid": "u1"});
        assert_eq!(parse(secret(foreign, "dropbox-instance-u1")), None);
    }
}
