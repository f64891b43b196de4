//! What the controller remembers between reconciles, in memory: its own writes
//! (so their echoes wake nothing), codes being exchanged (so no code is sent
//! twice, not even by two instances at once) and per-instance backoff.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::runtime::reflector::Store;

use crate::api::DropboxElementInstance;

/// Versions of the token Secrets this controller wrote. The watch echoes each
/// write back; that echo carries nothing new, so it wakes no instance.
#[derive(Default)]
pub struct OwnSecretWrites {
    versions: Mutex<HashMap<(String, String), String>>,
}

impl OwnSecretWrites {
    pub fn record(&self, secret: &Secret) {
        if let Some(rv) = secret.resource_version() {
            self.versions.lock().expect("own writes lock").insert(
                (secret.namespace().unwrap_or_default(), secret.name_any()),
                rv,
            );
        }
    }

    pub fn forget(&self, namespace: &str, name: &str) {
        self.versions
            .lock()
            .expect("own writes lock")
            .remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// True when this (namespace, name, resourceVersion) is our own write. The
    /// echo comes once: the entry goes with it, so settled instances cost no
    /// memory here (a relist's repeat of it wakes the instance, which then finds
    /// nothing to do).
    pub fn is_echo(&self, namespace: &str, name: &str, resource_version: Option<&str>) -> bool {
        let mut versions = self.versions.lock().expect("own writes lock");
        let key = (namespace.to_owned(), name.to_owned());
        let echo =
            resource_version.is_some_and(|rv| versions.get(&key).map(String::as_str) == Some(rv));
        if echo {
            versions.remove(&key);
        }
        echo
    }
}

/// The resourceVersions each of our status writes superseded. Reconciles read
/// instances from the watch cache, which can lag behind our own writes (a Secret
/// event may wake an instance before its status update arrives); reconciling such
/// a stale copy would compute from a status that no longer exists and write it
/// again. Superseded are the version the reconcile read and the versions our own
/// metadata writes (finalizer, code marker) produced before the status write:
/// seeing one of them means "wait for the watch to catch up".
#[derive(Default)]
pub struct WrittenStatus {
    over: Mutex<HashMap<String, Vec<String>>>,
    /// Versions our metadata writes produced since the last status write.
    pending: Mutex<HashMap<String, Vec<String>>>,
}

impl WrittenStatus {
    fn key(instance: &DropboxElementInstance) -> String {
        instance.uid().unwrap_or_default()
    }

    /// Notes a metadata write of ours that produced `written`: superseded too
    /// once a status write follows.
    pub fn note_metadata_write(&self, written: &DropboxElementInstance) {
        if let Some(rv) = written.resource_version() {
            let mut pending = self.pending.lock().expect("written status lock");
            let versions = pending.entry(Self::key(written)).or_default();
            versions.push(rv);
            // Bounded: a reconcile makes at most a couple of these.
            if versions.len() > 4 {
                versions.remove(0);
            }
        }
    }

    /// Records a status write made over `read` that produced `written`.
    pub fn record(&self, read: &DropboxElementInstance, written: &DropboxElementInstance) {
        let key = Self::key(read);
        let own = self
            .pending
            .lock()
            .expect("written status lock")
            .remove(&key)
            .unwrap_or_default();
        let mut over = self.over.lock().expect("written status lock");
        let latest = written.resource_version();
        let superseded: Vec<String> = read
            .resource_version()
            .into_iter()
            .chain(own)
            // A write the server found to be a no-op leaves the version as it
            // was: that version is current, not superseded.
            .filter(|rv| Some(rv) != latest.as_ref())
            .collect();
        if superseded.is_empty() {
            over.remove(&key);
        } else {
            over.insert(key, superseded);
        }
    }

    /// True when `instance` is a version our last status write superseded.
    pub fn is_stale(&self, instance: &DropboxElementInstance) -> bool {
        let over = self.over.lock().expect("written status lock");
        instance.resource_version().is_some_and(|rv| {
            over.get(&Self::key(instance))
                .is_some_and(|versions| versions.contains(&rv))
        })
    }

    pub fn forget(&self, instance: &DropboxElementInstance) {
        let key = Self::key(instance);
        self.over.lock().expect("written status lock").remove(&key);
        self.pending
            .lock()
            .expect("written status lock")
            .remove(&key);
    }
}

/// Authorization codes this process has sent or is sending, by fingerprint, so a
/// code is never sent twice, not even by two instances at the same moment.
#[derive(Default)]
pub struct CodeRegistry {
    claimed: Mutex<HashMap<String, String>>,
}

impl CodeRegistry {
    /// Claims `fingerprint` for instance `uid`. Fails with the holder's name when
    /// another instance sent the code (its durable record of the codes it sent,
    /// or its status, says so; also after a restart) or is sending it.
    pub fn claim(
        &self,
        fingerprint: &str,
        uid: &str,
        store: &Store<DropboxElementInstance>,
    ) -> Result<(), String> {
        let mut claimed = self.claimed.lock().expect("code registry lock");
        if let Some(holder) = claimed.get(fingerprint)
            && holder != uid
        {
            let name = store
                .state()
                .iter()
                .find(|i| i.uid().as_deref() == Some(holder.as_str()))
                .map(|i| format!("{}/{}", i.namespace().unwrap_or_default(), i.name_any()))
                .unwrap_or_else(|| "(deleted)".into());
            return Err(name);
        }
        // Once per exchange: a lookup under the cache's lock.
        let other = store.find(|i| {
            let in_status = i
                .status
                .as_ref()
                .and_then(|s| s.code_fingerprint.as_deref())
                == Some(fingerprint);
            let recorded = i
                .annotations()
                .get(super::token::CODE_SENT_ANNOTATION)
                .is_some_and(|codes| codes.split(',').any(|fp| fp.trim() == fingerprint));
            (in_status || recorded) && i.metadata.uid.as_deref() != Some(uid)
        });
        if let Some(other) = other {
            return Err(format!(
                "{}/{}",
                other.namespace().unwrap_or_default(),
                other.name_any()
            ));
        }
        claimed.insert(fingerprint.to_owned(), uid.to_owned());
        Ok(())
    }

    /// Gives a claim back when Dropbox did not consume the code (transient error,
    /// invalid client).
    pub fn release(&self, fingerprint: &str, uid: &str) {
        let mut claimed = self.claimed.lock().expect("code registry lock");
        if claimed.get(fingerprint).map(String::as_str) == Some(uid) {
            claimed.remove(fingerprint);
        }
    }
}

/// Per-instance exponential backoff with jitter ("equal jitter": a random delay
/// between half and all of the exponential step), reset on success.
///
/// The controller's own status write wakes the instance up again at once; the
/// backoff remembers until when the instance should wait and for which inputs,
/// so that wake-up does not retry early, while a real change (a new code, a
/// fixed Secret, a new generation) is acted on immediately.
pub struct Backoff {
    state: Mutex<HashMap<String, BackoffState>>,
    base: Duration,
    max: Duration,
}

struct BackoffState {
    attempts: u32,
    not_before: tokio::time::Instant,
    inputs: u64,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            state: Mutex::default(),
            base,
            max,
        }
    }

    /// The delay before the next attempt for `key`, never below `at_least`
    /// (e.g. Dropbox's Retry-After). `inputs` identifies what the attempt used.
    pub fn next_delay(&self, key: &str, at_least: Option<Duration>, inputs: u64) -> Duration {
        let mut state = self.state.lock().expect("backoff lock");
        let entry = state.entry(key.to_owned()).or_insert(BackoffState {
            attempts: 0,
            not_before: tokio::time::Instant::now(),
            inputs,
        });
        entry.attempts = entry.attempts.saturating_add(1);
        let delay = crate::retry::backoff_delay(self.base, self.max, entry.attempts, at_least);
        entry.not_before = tokio::time::Instant::now() + delay;
        entry.inputs = inputs;
        delay
    }

    /// How long `key` still has to wait, when it is backing off for the same inputs.
    pub fn remaining(&self, key: &str, inputs: u64) -> Option<Duration> {
        let state = self.state.lock().expect("backoff lock");
        let entry = state.get(key).filter(|e| e.inputs == inputs)?;
        let now = tokio::time::Instant::now();
        (entry.not_before > now).then(|| entry.not_before - now)
    }

    pub fn reset(&self, key: &str) {
        self.state.lock().expect("backoff lock").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(rv: &str) -> DropboxElementInstance {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
            "kind": "DropboxElementInstance",
            "metadata": {"name": "i", "namespace": "ns", "uid": "u-1", "resourceVersion": rv},
            "spec": {"element": {"key": "dropbox"}, "authentication": {"type": "apiKey",
                     "apiKeySecretRef": {"name": "k"}}}
        }))
        .expect("an instance")
    }

    #[test]
    fn versions_before_our_status_write_are_stale_also_our_finalizer_write() {
        let written = WrittenStatus::default();
        // Read at 10, the finalizer write made 11, the status write made 12.
        written.note_metadata_write(&version("11"));
        written.record(&version("10"), &version("12"));
        assert!(written.is_stale(&version("10")));
        assert!(
            written.is_stale(&version("11")),
            "our finalizer write's echo"
        );
        assert!(!written.is_stale(&version("12")));
        // A later metadata write without a status write after it is current.
        written.note_metadata_write(&version("13"));
        assert!(!written.is_stale(&version("13")));
    }

    #[test]
    fn a_no_op_status_write_leaves_the_current_version_current() {
        let written = WrittenStatus::default();
        written.note_metadata_write(&version("11"));
        // The server found the status unchanged on 11: 11 stays current.
        written.record(&version("10"), &version("11"));
        assert!(written.is_stale(&version("10")));
        assert!(!written.is_stale(&version("11")));
        written.forget(&version("11"));
        assert!(!written.is_stale(&version("10")));
    }

    #[test]
    fn backoff_grows_with_jitter_and_honours_retry_after() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let d1 = b.next_delay("x", None, 1);
        assert!(
            d1 >= Duration::from_millis(500) && d1 <= Duration::from_secs(1),
            "{d1:?}"
        );
        let d2 = b.next_delay("x", None, 1);
        assert!(
            d2 >= Duration::from_secs(1) && d2 <= Duration::from_secs(2),
            "{d2:?}"
        );
        for _ in 0..20 {
            b.next_delay("x", None, 1);
        }
        assert!(b.next_delay("x", None, 1) <= Duration::from_secs(60));
        b.reset("x");
        assert!(b.next_delay("x", Some(Duration::from_secs(7)), 1) >= Duration::from_secs(7));
        // Waiting applies to the same inputs only.
        assert!(b.remaining("x", 1).is_some());
        assert!(b.remaining("x", 2).is_none());
    }
}
