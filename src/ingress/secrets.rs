//! The projected Secret of each instance (`dropbox-instance-<uid>` in the
//! operator namespace: app secret, access token, signature key), read with `get`
//! by name only (docs/architecture.md).
//!
//! The ingress may not list or watch Secrets, even in its own namespace, so it
//! can never enumerate them; it reads exactly the names the instances it watches
//! imply. It learns about a rotated or refreshed value on use: a read value is
//! used for [`TTL`], and read again at once when Dropbox refuses a token or a
//! webhook signature does not match. Those forced re-reads are single-flight
//! (concurrent callers share one request) and happen at most once per
//! [`FORCED_REFRESH_INTERVAL`] per Secret, so a flood of badly signed webhooks
//! cannot turn into a flood of API requests.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;

use crate::contract::{self, ACCESS_TOKEN_KEY, APP_SECRET_KEY, SIGNATURE_KEY_KEY};

/// How long a read value is used before it is read again.
pub const TTL: Duration = Duration::from_secs(60);
/// At most one forced re-read per Secret this often.
pub const FORCED_REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// What the controller projected for one instance. Debug output hides it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Projected {
    pub app_secret: Option<Vec<u8>>,
    pub access_token: Option<String>,
    pub signature_key: Option<Vec<u8>>,
}

impl fmt::Debug for Projected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Projected")
            .field(
                "app_secret",
                &self.app_secret.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "access_token",
                &self.access_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "signature_key",
                &self.signature_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

struct Entry {
    value: Option<Arc<Projected>>,
    fetched: Instant,
}

/// A read-through cache of projected Secrets keyed by instance uid.
pub struct InstanceSecrets {
    api: Api<Secret>,
    entries: Mutex<HashMap<String, Entry>>,
    /// One gate per uid: whoever holds it is reading that Secret.
    gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    reads: prometheus_client::metrics::counter::Counter,
}

impl InstanceSecrets {
    /// Reads from `namespace`, the operator's, counting API reads in `reads`.
    pub fn new(
        client: Client,
        namespace: &str,
        reads: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        InstanceSecrets {
            api: Api::namespaced(client, namespace),
            entries: Mutex::default(),
            gates: Mutex::default(),
            reads,
        }
    }

    fn cached(&self, uid: &str, max_age: Duration) -> Option<Option<Arc<Projected>>> {
        let entries = self.entries.lock().expect("secret cache lock");
        entries
            .get(uid)
            .filter(|e| e.fetched.elapsed() < max_age)
            .map(|e| e.value.clone())
    }

    /// The projection of instance `uid`, None while the controller has not made
    /// it. `force` re-reads a value older than [`FORCED_REFRESH_INTERVAL`].
    pub async fn get(&self, uid: &str, force: bool) -> Result<Option<Arc<Projected>>, kube::Error> {
        let max_age = if force { FORCED_REFRESH_INTERVAL } else { TTL };
        if let Some(value) = self.cached(uid, max_age) {
            return Ok(value);
        }
        let gate = self
            .gates
            .lock()
            .expect("secret gates lock")
            .entry(uid.to_owned())
            .or_default()
            .clone();
        let _reading = gate.lock().await;
        // Whoever held the gate before us may have just read it.
        if let Some(value) = self.cached(uid, max_age) {
            return Ok(value);
        }
        self.reads.inc();
        let value = self
            .api
            .get_opt(&contract::instance_secret_name(uid))
            .await?
            .map(|s| Arc::new(parse(s)));
        self.entries.lock().expect("secret cache lock").insert(
            uid.to_owned(),
            Entry {
                value: value.clone(),
                fetched: Instant::now(),
            },
        );
        Ok(value)
    }

    /// Drops what is held for an instance that is gone.
    pub fn forget(&self, uid: &str) {
        self.entries.lock().expect("secret cache lock").remove(uid);
        self.gates.lock().expect("secret gates lock").remove(uid);
    }
}

fn parse(secret: Secret) -> Projected {
    let mut data = secret.data.unwrap_or_default();
    let mut take = |key: &str| {
        data.remove(key)
            .map(|v| trim(v.0))
            .filter(|v| !v.is_empty())
    };
    Projected {
        app_secret: take(APP_SECRET_KEY),
        access_token: take(ACCESS_TOKEN_KEY).map(|v| String::from_utf8_lossy(&v).into_owned()),
        signature_key: take(SIGNATURE_KEY_KEY),
    }
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
mod tests {
    use super::*;

    #[test]
    fn trims_surrounding_whitespace() {
        assert_eq!(trim(b"  key\n".to_vec()), b"key");
        assert_eq!(trim(b"\n".to_vec()), b"");
    }

    #[test]
    fn debug_hides_values() {
        let p = Projected {
            app_secret: Some(b"TOPSECRET".to_vec()),
            access_token: Some("TOKEN".into()),
            signature_key: None,
        };
        let shown = format!("{p:?}");
        assert!(
            !shown.contains("TOPSECRET") && !shown.contains("TOKEN"),
            "{shown}"
        );
    }
}
