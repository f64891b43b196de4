//! Secret values the ingress needs (app secrets, access tokens, signature keys),
//! read with `get` by name only.
//!
//! RBAC trade-off: the ingress may `get` Secrets but not `list` or `watch` them,
//! so it can never enumerate the Secrets of a namespace; it reads only the names
//! the instances it watches refer to. The price is that it learns about a rotated
//! Secret on use rather than from a watch: a cached value is re-read after a short
//! TTL, and at once (rate-limited) when Dropbox refuses a token or a webhook
//! signature does not match.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;

/// How long a read value is used before it is read again.
const TTL: Duration = Duration::from_secs(60);
/// At most one forced re-read per Secret this often (a flood of badly signed
/// webhooks must not turn into a flood of API requests).
const FORCED_REFRESH_INTERVAL: Duration = Duration::from_secs(5);

struct Entry {
    data: Option<BTreeMap<String, Vec<u8>>>,
    fetched: Instant,
}

/// A small read-through cache of Secret data keyed by (namespace, name).
pub struct SecretCache {
    client: Client,
    entries: Mutex<HashMap<(String, String), Entry>>,
}

impl SecretCache {
    pub fn new(client: Client) -> Self {
        SecretCache {
            client,
            entries: Mutex::default(),
        }
    }

    /// The value of `key` in Secret `namespace/name`, `None` when the Secret or the
    /// key is missing. `force` re-reads it (at most every few seconds).
    pub async fn get(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
        force: bool,
    ) -> Result<Option<Vec<u8>>, kube::Error> {
        let id = (namespace.to_owned(), name.to_owned());
        {
            let entries = self.entries.lock().expect("secret cache lock");
            if let Some(e) = entries.get(&id) {
                let age = e.fetched.elapsed();
                let fresh = if force {
                    age < FORCED_REFRESH_INTERVAL
                } else {
                    age < TTL
                };
                if fresh {
                    return Ok(e.data.as_ref().and_then(|d| d.get(key).cloned()));
                }
            }
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let data = api.get_opt(name).await?.map(|s| {
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, trim(v.0)))
                .collect::<BTreeMap<_, _>>()
        });
        let value = data.as_ref().and_then(|d| d.get(key).cloned());
        self.entries.lock().expect("secret cache lock").insert(
            id,
            Entry {
                data,
                fetched: Instant::now(),
            },
        );
        Ok(value.filter(|v| !v.is_empty()))
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
    #[test]
    fn trims_surrounding_whitespace() {
        assert_eq!(super::trim(b"  key\n".to_vec()), b"key");
        assert_eq!(super::trim(b"\n".to_vec()), b"");
    }
}
