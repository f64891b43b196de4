//! Which instances a Dropbox notification concerns, and which of them its
//! signature proves it for (docs/architecture.md, "Tenant isolation").
//!
//! Any tenant can create instances that claim another tenant's app key with a
//! wrong app secret, so a notification is checked against every distinct secret
//! of the instances concerned, not a sample of them: a claim cannot crowd out
//! the genuine secret. The secret that verified the app's last genuine
//! notification is tried first (one HMAC pass for a genuine notification,
//! however many claims there are), and the HMAC work of one request is bounded,
//! so claims cannot turn a flood of forged notifications into a flood of work.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::payload::dropbox_signature_matches;
use super::projections::Projection;

/// HMAC work one notification may cost, in bytes hashed (at least
/// [`MIN_SECRETS`] secrets are tried whatever the body's size).
const HMAC_BUDGET: usize = 16 * 1024 * 1024;
/// Distinct secrets tried even for the largest bodies.
const MIN_SECRETS: usize = 16;
/// App keys whose last verified secret is remembered.
const REMEMBERED_APPS: usize = 10_000;

/// The part of a notification that routes it: `{"list_folder": {"accounts": [...]}}`.
#[derive(serde::Deserialize)]
struct Notice<'a> {
    #[serde(borrow, default)]
    list_folder: Option<ListFolder<'a>>,
}

#[derive(serde::Deserialize)]
struct ListFolder<'a> {
    #[serde(borrow, default)]
    accounts: Vec<std::borrow::Cow<'a, str>>,
}

/// The accounts a notification names; None when the body is not one.
pub fn accounts(body: &[u8]) -> Option<BTreeSet<String>> {
    let notice = serde_json::from_slice::<Notice>(body).ok()?;
    Some(
        notice
            .list_folder
            .iter()
            .flat_map(|l| l.accounts.iter().map(|a| a.to_string()))
            .collect(),
    )
}

/// Remembers, per app key, the digest of the secret that verified its last
/// genuine notification.
#[derive(Default)]
pub struct Verifier {
    trusted: Mutex<HashMap<String, [u8; 32]>>,
}

fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

impl Verifier {
    /// The instances among `candidates` (all of app `app_key`) whose own app
    /// secret signed `body` (`tag`: the signature).
    pub fn verified(
        &self,
        app_key: &str,
        candidates: &[Arc<Projection>],
        body: &[u8],
        tag: &[u8; 32],
    ) -> Vec<Arc<Projection>> {
        // The distinct secrets, the trusted one first.
        let trusted = self
            .trusted
            .lock()
            .expect("verifier lock")
            .get(app_key)
            .copied();
        let mut secrets: Vec<(&[u8], [u8; 32])> = Vec::new();
        for p in candidates {
            if let Some(s) = p.app_secret.as_deref() {
                let d = digest(s);
                if !secrets.iter().any(|(_, seen)| *seen == d) {
                    secrets.push((s, d));
                }
            }
        }
        if let Some(t) = trusted
            && let Some(i) = secrets.iter().position(|(_, d)| *d == t)
        {
            secrets.swap(0, i);
        }
        let affordable = (HMAC_BUDGET / body.len().max(1)).max(MIN_SECRETS);
        if secrets.len() > affordable {
            tracing::warn!(
                app_key,
                secrets = secrets.len(),
                tried = affordable,
                "more distinct app secrets claim this app key than one notification may cost; trying the first"
            );
        }
        let verified: Vec<[u8; 32]> = secrets
            .iter()
            .take(affordable)
            .filter(|(s, _)| dropbox_signature_matches(s, body, tag))
            .map(|(_, d)| *d)
            .collect();
        if let Some(first) = verified.first() {
            let mut trusted = self.trusted.lock().expect("verifier lock");
            if trusted.len() >= REMEMBERED_APPS && !trusted.contains_key(app_key) {
                trusted.clear();
            }
            trusted.insert(app_key.to_owned(), *first);
        }
        candidates
            .iter()
            .filter(|p| {
                p.app_secret
                    .as_deref()
                    .is_some_and(|s| verified.contains(&digest(s)))
            })
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingress::projections::tests::projection;

    fn sign(secret: &str, body: &[u8]) -> [u8; 32] {
        use hmac::{Hmac, KeyInit, Mac};
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(body);
        mac.finalize().into_bytes().into()
    }

    #[test]
    fn a_genuine_notification_verifies_whatever_the_claims() {
        let body = br#"{"list_folder": {"accounts": ["dbid:victim"]}}"#;
        let mut candidates: Vec<Arc<Projection>> = (0..100)
            .map(|i| {
                Arc::new(projection(
                    &format!("claim-{i}"),
                    "k",
                    "dbid:victim",
                    &format!("wrong-{i}"),
                ))
            })
            .collect();
        candidates.push(Arc::new(projection("victim", "k", "dbid:victim", "right")));
        let v = Verifier::default();
        let ok = v.verified("k", &candidates, body, &sign("right", body));
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].uid(), "victim");
        assert!(
            v.verified("k", &candidates, body, &sign("nobody", body))
                .is_empty()
        );
        assert_eq!(accounts(body).unwrap().len(), 1);
        assert!(accounts(b"not json").is_none());
    }
}
