//! The contract between the controller and the webhook ingress: the names,
//! labels, keys and paths of the objects one writes and the other reads.
//!
//! Both sides import this module and nothing of each other (docs/architecture.md,
//! "Who reads and writes what"). Everything the ingress needs about an instance
//! besides the instance itself lives in the operator's namespace, in objects named
//! by the instance's uid:
//!
//! | object (operator namespace)              | written by               | read by  |
//! |------------------------------------------|--------------------------|----------|
//! | Secret `dropbox-instance-<uid>`          | controller               | ingress (get by name) |
//! | ConfigMap `dropbox-cursor-<uid>`         | controller (first cursor), ingress (commits, resourceVersion precondition) | both |
//! | ConfigMap `dropbox-webhook-ingress-heartbeats` | controller (creates), ingress (patches its own key) | controller |

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

/// `app.kubernetes.io/managed-by` on every object the operator creates.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const MANAGED_BY: &str = "dropbox-operator";
/// Name of the instance an object belongs to (shortened to a label value).
pub const INSTANCE_LABEL: &str = "elements.dropbox-operator.dev/instance";
/// Namespace of the instance an object in the operator namespace belongs to.
pub const INSTANCE_NAMESPACE_LABEL: &str = "elements.dropbox-operator.dev/instance-namespace";
/// uid of the instance an object in the operator namespace belongs to.
pub const INSTANCE_UID_LABEL: &str = "elements.dropbox-operator.dev/instance-uid";

/// Field manager of everything the controller writes.
pub const CONTROLLER_FIELD_MANAGER: &str = "dropbox-operator";
/// Field manager of everything the ingress writes.
pub const INGRESS_FIELD_MANAGER: &str = "dropbox-operator-ingress";

/// Name of the ingress Deployment and Service.
pub const INGRESS_NAME: &str = "dropbox-webhook-ingress";
/// `app.kubernetes.io/component` of everything that belongs to the ingress.
pub const INGRESS_COMPONENT: &str = "webhook-ingress";
/// Port of the public webhook server inside the ingress pod.
pub const INGRESS_PORT: i32 = 8080;
/// Port of `/metrics`, `/healthz` and `/readyz` inside the ingress pod (never public).
pub const INGRESS_METRICS_PORT: i32 = 8081;

/// The ConfigMap in which every ingress replica renews its own key; the
/// controller reads it for EventsReady. It is the only object the ingress may
/// patch (RBAC `resourceNames`), so liveness needs no right on Leases.
pub const HEARTBEATS_CONFIGMAP: &str = "dropbox-webhook-ingress-heartbeats";

/// Projected Secret of an instance: what the ingress needs, copied by the
/// controller from the instance's namespace into the operator's.
pub fn instance_secret_name(uid: &str) -> String {
    format!("dropbox-instance-{uid}")
}
/// Key of the app secret (verifies Dropbox's webhook signatures).
pub const APP_SECRET_KEY: &str = "app-secret";
/// Key of the current access token (lists the changes).
pub const ACCESS_TOKEN_KEY: &str = "access-token";
/// Key of the signature key (signs deliveries); absent when none is configured.
pub const SIGNATURE_KEY_KEY: &str = "signature-key";

/// Cursor ConfigMap of an instance, in the operator namespace.
pub fn cursor_configmap_name(uid: &str) -> String {
    format!("dropbox-cursor-{uid}")
}
/// Key of the committed cursor.
pub const CURSOR_KEY: &str = "cursor";
/// Key of the account the cursor belongs to.
pub const ACCOUNT_KEY: &str = "accountId";
/// Key of the folder the cursor lists (`""`: the whole account).
pub const PATH_KEY: &str = "path";
/// Key set by the controller when it re-baselined the cursor (the folder
/// changed): the ingress delivers one `UNKNOWN` event, then removes it with
/// its next commit.
pub const RESET_PENDING_KEY: &str = "resetPending";
/// Key of the time the cursor was committed (RFC 3339): the eventDate of the
/// folder and deletion events listed from it (docs/architecture.md, "Delivery").
pub const COMMITTED_AT_KEY: &str = "committedAt";

/// Key of the PKCE code verifier in an instance's code Secret, next to the
/// code: written by `dropbox-operator connect`, sent by the controller with the
/// code (README, "Connect an account in one command").
pub const CODE_VERIFIER_KEY: &str = "code_verifier";
/// Key of the redirect URI a code was obtained with, in the code Secret (written
/// by `connect`). When present, the controller sends exactly it when it
/// exchanges the code, instead of `spec.authentication.callbackUrl`; an empty
/// value means the code was obtained without one (`connect --no-redirect`), so
/// none is sent.
pub const CODE_REDIRECT_URI_KEY: &str = "redirect_uri";

/// Webhook path of an app: Dropbox is configured to call
/// `https://<ingress address>/webhooks/dropbox/<appKey>`.
pub fn webhook_path(app_key: &str) -> String {
    format!("{WEBHOOK_PREFIX}{app_key}")
}
/// Everything public on the ingress lives below this path.
pub const WEBHOOK_PREFIX: &str = "/webhooks/dropbox/";

/// A value that fits a label (at most 63 characters): longer values keep a
/// prefix and end in a hash of the whole value, so distinct values stay distinct.
pub fn label_value(value: &str) -> String {
    shorten(value, 63)
}

/// `value` when it has at most `max` characters; else a prefix of it and a hash
/// of the whole value, `max` characters in all, so distinct values stay
/// distinct. The prefix ends alphanumeric, so the result stays a valid label
/// value, and a valid DNS subdomain name when `value` is one.
pub fn shorten(value: &str, max: usize) -> String {
    if value.len() <= max {
        return value.to_owned();
    }
    let hash = hex::encode(&Sha256::digest(value.as_bytes())[..5]);
    // Instance names are DNS subdomains (ASCII), so byte slicing is safe; the
    // prefix must end alphanumeric.
    let cut = max.saturating_sub(hash.len() + 1).min(value.len());
    let prefix = value
        .get(..cut)
        .unwrap_or_default()
        .trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    if prefix.is_empty() {
        return hash;
    }
    format!("{prefix}-{hash}")
}

/// Labels of an object in the operator namespace that belongs to an instance.
pub fn instance_labels(namespace: &str, name: &str, uid: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
        (INSTANCE_LABEL.to_owned(), label_value(name)),
        (INSTANCE_NAMESPACE_LABEL.to_owned(), namespace.to_owned()),
        (INSTANCE_UID_LABEL.to_owned(), uid.to_owned()),
    ])
}

/// Whether an object carries the operator's managed-by label. Objects without it
/// were made by someone else and are never overwritten or adopted.
pub fn is_managed(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY)
}

/// The key a replica renews in [`HEARTBEATS_CONFIGMAP`] (ConfigMap keys allow
/// `[-._a-zA-Z0-9]`, at most 253 characters).
pub fn heartbeat_key(identity: &str) -> String {
    let mut key: String = identity
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') {
                c
            } else {
                '-'
            }
        })
        .collect();
    key.truncate(253);
    key
}

/// The replicas whose heartbeat (an RFC 3339 expiry time) is still in the future.
pub fn live_replicas(data: &BTreeMap<String, String>, now: jiff::Timestamp) -> Vec<String> {
    data.iter()
        .filter(|(_, expires)| {
            expires
                .parse::<jiff::Timestamp>()
                .is_ok_and(|expires| expires > now)
        })
        .map(|(replica, _)| replica.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_label_values_are_shortened_and_stay_distinct() {
        let short = "marketing";
        assert_eq!(label_value(short), short);
        let a = "a".repeat(70);
        let b = format!("{}b", "a".repeat(69));
        let (la, lb) = (label_value(&a), label_value(&b));
        assert!(la.len() <= 63 && lb.len() <= 63, "{la} {lb}");
        assert_ne!(la, lb);
        let dashed = format!("{}-{}", "x".repeat(50), "y".repeat(20));
        let l = label_value(&dashed);
        assert!(l.len() <= 63 && !l.contains("--"), "{l}");
        let dotted = format!("{}.{}", "x".repeat(57), "y".repeat(20));
        let l = shorten(&dotted, 63);
        assert!(l.len() <= 63 && !l.contains(".-"), "{l}");
    }

    #[test]
    fn heartbeats_expire() {
        let now: jiff::Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let data = BTreeMap::from([
            ("a".to_owned(), "2026-01-01T00:00:10Z".to_owned()),
            ("b".to_owned(), "2025-12-31T23:59:59Z".to_owned()),
            ("c".to_owned(), "garbage".to_owned()),
        ]);
        assert_eq!(live_replicas(&data, now), vec!["a".to_owned()]);
        assert_eq!(heartbeat_key("pod/1 x"), "pod-1-x");
    }
}
