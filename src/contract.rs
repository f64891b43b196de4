//! The contract between the controller and the webhook ingress: the names,
//! labels, keys and paths of the objects one writes and the other reads.
//!
//! Both sides import this module and nothing of each other (docs/architecture.md,
//! "Who reads and writes what"). Everything the ingress knows lives in one data
//! namespace that holds nothing else (the Helm chart creates it; the ingress has
//! no right anywhere else), in objects named by the instance's uid:
//!
//! | object (data namespace)                        | written by               | read by  |
//! |------------------------------------------------|--------------------------|----------|
//! | Secret `dropbox-instance-<uid>`                | controller               | ingress (watch) |
//! | ConfigMap `dropbox-cursor-<uid>`               | controller (first cursor, re-baseline), ingress (commits, resourceVersion precondition) | both |
//! | ConfigMap `dropbox-delivery-<uid>`             | ingress (the replica delivering the instance) | controller (mirrors it into status), ingress |
//! | ConfigMap `dropbox-webhook-ingress-heartbeats` | controller (creates), ingress (patches its own key) | both |

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

/// `app.kubernetes.io/managed-by` on every object the operator creates.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const MANAGED_BY: &str = "dropbox-operator";
/// Name of the instance an object belongs to (shortened to a label value).
pub const INSTANCE_LABEL: &str = "elements.dropbox-operator.dev/instance";
/// Namespace of the instance an object in the data namespace belongs to.
pub const INSTANCE_NAMESPACE_LABEL: &str = "elements.dropbox-operator.dev/instance-namespace";
/// uid of the instance an object in the data namespace belongs to.
pub const INSTANCE_UID_LABEL: &str = "elements.dropbox-operator.dev/instance-uid";
/// What an object in the data namespace is: [`ROLE_PROJECTION`], [`ROLE_CURSOR`],
/// [`ROLE_DELIVERY`] or [`ROLE_HEARTBEATS`]. Watches select on it.
pub const ROLE_LABEL: &str = "elements.dropbox-operator.dev/role";
/// The projected Secret of an instance.
pub const ROLE_PROJECTION: &str = "projection";
/// The cursor ConfigMap of an instance.
pub const ROLE_CURSOR: &str = "cursor";
/// The delivery-state ConfigMap of an instance.
pub const ROLE_DELIVERY: &str = "delivery";
/// The heartbeats ConfigMap.
pub const ROLE_HEARTBEATS: &str = "heartbeats";

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
/// Port on which ingress replicas hand webhooks to the replica responsible for
/// an instance (never behind the Service; docs/architecture.md, "One syncer per
/// instance").
pub const INGRESS_PEER_PORT: i32 = 8082;

/// Annotation on an instance whose delivery was parked (a callback that
/// failed permanently or for too long): setting it to a new value resumes
/// delivery from the committed cursor (docs/user-guide.md, "Delivery guarantees"). A change
/// of the spec resumes it too.
pub const RESUME_ANNOTATION: &str = "elements.dropbox-operator.dev/resume-delivery";

/// The ConfigMap in which every ingress replica renews its own key (see
/// [`Heartbeat`]); the controller reads it for EventsReady, the replicas for
/// who is live and who delivers which instance.
pub const HEARTBEATS_CONFIGMAP: &str = "dropbox-webhook-ingress-heartbeats";

/// Projected Secret of an instance: everything the ingress needs of it, copied
/// by the controller from the instance and its namespace into the data namespace.
pub fn instance_secret_name(uid: &str) -> String {
    format!("dropbox-instance-{uid}")
}
/// Key of the app secret (verifies Dropbox's webhook signatures; absent for
/// long-polled instances, which take no webhook).
pub const APP_SECRET_KEY: &str = "app-secret";
/// Key of the current access token (lists the changes).
pub const ACCESS_TOKEN_KEY: &str = "access-token";
/// Key of the signature key (signs deliveries); absent when none is configured.
pub const SIGNATURE_KEY_KEY: &str = "signature-key";
/// Key of the instance's settings, a JSON [`ProjectedInstance`].
pub const INSTANCE_KEY: &str = "instance.json";

/// The settings of an instance the ingress works from (the projected Secret's
/// [`INSTANCE_KEY`]). The ingress reads no instance: what it needs is here.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectedInstance {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `metadata.generation`: a new one resumes a parked delivery.
    pub generation: i64,
    /// `spec.name`, or `metadata.name` when unset.
    pub display_name: String,
    pub tags: Vec<String>,
    /// `status.account.accountId`.
    pub account_id: String,
    /// The app key (client id): webhooks for it arrive at `/webhooks/dropbox/<appKey>`.
    pub app_key: String,
    pub source: crate::api::EventSource,
    pub format: crate::api::EventFormat,
    /// `spec.events.path` (`""`: the whole account).
    pub folder: String,
    /// `spec.events.callbackUrl`: a capability URL, kept out of Debug output.
    pub callback_url: String,
    /// The value of [`RESUME_ANNOTATION`], when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
}

impl std::fmt::Debug for ProjectedInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectedInstance")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("uid", &self.uid)
            .field("generation", &self.generation)
            .field("account_id", &self.account_id)
            .field("app_key", &self.app_key)
            .field("source", &self.source)
            .field("callback_url", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Cursor ConfigMap of an instance, in the data namespace.
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
/// changed, or the cursor had to be made again): the ingress delivers one
/// `UNKNOWN` event, then removes it with its next commit.
pub const RESET_PENDING_KEY: &str = "resetPending";
/// Key of the time the cursor was committed (RFC 3339): the eventDate of the
/// folder and deletion events listed from it (docs/architecture.md, "Delivery").
pub const COMMITTED_AT_KEY: &str = "committedAt";

/// Delivery-state ConfigMap of an instance, in the data namespace: written by
/// the ingress replica that delivers the instance, mirrored by the controller
/// into the instance's status (EventsDelivering, `events.lastDeliveryTime`).
pub fn delivery_configmap_name(uid: &str) -> String {
    format!("dropbox-delivery-{uid}")
}

/// What the ingress reports about the deliveries of one instance.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliveryState {
    /// EventsDelivering's status.
    pub delivering: bool,
    /// EventsDelivering's reason (one of `conditions::Reason`).
    pub reason: String,
    pub message: String,
    /// When events were last delivered; moved on only when older than
    /// [`LAST_DELIVERY_RESOLUTION`], so steady deliveries cost no write.
    pub last_delivery_time: Option<jiff::Timestamp>,
    /// Set while delivery is parked (a callback that failed permanently or for
    /// too long): the instance's generation and resume annotation at that time.
    /// Another generation or annotation value resumes it.
    pub parked: Option<Parked>,
}

/// Where a parked delivery waits for a change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parked {
    pub generation: i64,
    pub resume: Option<String>,
}

/// How stale `events.lastDeliveryTime` may get while deliveries flow.
pub const LAST_DELIVERY_RESOLUTION: std::time::Duration = std::time::Duration::from_secs(30);

const DELIVERING_KEY: &str = "delivering";
const REASON_KEY: &str = "reason";
const MESSAGE_KEY: &str = "message";
const LAST_DELIVERY_KEY: &str = "lastDeliveryTime";
const PARKED_GENERATION_KEY: &str = "parkedGeneration";
const PARKED_RESUME_KEY: &str = "parkedResume";

impl DeliveryState {
    /// The ConfigMap data this state is written as.
    pub fn to_data(&self) -> BTreeMap<String, String> {
        let mut data = BTreeMap::from([
            (DELIVERING_KEY.to_owned(), self.delivering.to_string()),
            (REASON_KEY.to_owned(), self.reason.clone()),
            (MESSAGE_KEY.to_owned(), self.message.clone()),
        ]);
        if let Some(t) = self.last_delivery_time {
            data.insert(LAST_DELIVERY_KEY.to_owned(), t.to_string());
        }
        if let Some(p) = &self.parked {
            data.insert(PARKED_GENERATION_KEY.to_owned(), p.generation.to_string());
            if let Some(r) = &p.resume {
                data.insert(PARKED_RESUME_KEY.to_owned(), r.clone());
            }
        }
        data
    }

    /// The state a ConfigMap's data holds; None when it holds none.
    pub fn from_data(data: &BTreeMap<String, String>) -> Option<DeliveryState> {
        let delivering = data.get(DELIVERING_KEY)?.parse().ok()?;
        Some(DeliveryState {
            delivering,
            reason: data.get(REASON_KEY).cloned().unwrap_or_default(),
            message: data.get(MESSAGE_KEY).cloned().unwrap_or_default(),
            last_delivery_time: data.get(LAST_DELIVERY_KEY).and_then(|t| t.parse().ok()),
            parked: data
                .get(PARKED_GENERATION_KEY)
                .and_then(|g| g.parse().ok())
                .map(|generation| Parked {
                    generation,
                    resume: data.get(PARKED_RESUME_KEY).cloned(),
                }),
        })
    }
}

/// Key of the PKCE code verifier in an instance's code Secret, next to the
/// code: written by `dropbox-operator connect`, sent by the controller with the
/// code (docs/user-guide.md, "Connect an account in one command").
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

/// Labels of an object in the data namespace that belongs to an instance, with
/// its [`ROLE_LABEL`].
pub fn instance_labels(
    namespace: &str,
    name: &str,
    uid: &str,
    role: &str,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
        (INSTANCE_LABEL.to_owned(), label_value(name)),
        (INSTANCE_NAMESPACE_LABEL.to_owned(), namespace.to_owned()),
        (INSTANCE_UID_LABEL.to_owned(), uid.to_owned()),
        (ROLE_LABEL.to_owned(), role.to_owned()),
    ])
}

/// The label selector of the objects of `role` in the data namespace.
pub fn role_selector(role: &str) -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY},{ROLE_LABEL}={role}")
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

/// One replica's entry in [`HEARTBEATS_CONFIGMAP`] (JSON): until when it is
/// alive, which replicas it counts as live (its *view*, which decides which
/// instances it delivers; docs/architecture.md, "One syncer per instance") and
/// where other replicas hand it webhooks.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Heartbeat {
    /// RFC 3339: the replica is alive until then unless it renews.
    pub expires: jiff::Timestamp,
    /// Short ids ([`replica_id`]) of the replicas it counts as live, sorted; it
    /// delivers exactly the instances it is responsible for among them.
    #[serde(default)]
    pub view: Vec<String>,
    /// `host:port` of its peer endpoint ([`INGRESS_PEER_PORT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
}

impl Heartbeat {
    /// Parses an entry; None for anything else.
    pub fn parse(value: &str) -> Option<Heartbeat> {
        serde_json::from_str(value).ok()
    }

    /// The entry as stored.
    pub fn to_value(&self) -> String {
        serde_json::to_string(self).expect("a heartbeat serializes")
    }
}

/// A replica's short id: 16 hex digits of SHA-256 of its heartbeat key. Views
/// list these, so an entry stays small however long pod names are.
pub fn replica_id(heartbeat_key: &str) -> String {
    hex::encode(&Sha256::digest(heartbeat_key.as_bytes())[..8])
}

/// The replicas whose heartbeat is still in the future.
pub fn live_replicas(data: &BTreeMap<String, String>, now: jiff::Timestamp) -> Vec<String> {
    data.iter()
        .filter(|(_, value)| Heartbeat::parse(value).is_some_and(|h| h.expires > now))
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
        let entry = |expires: &str| {
            Heartbeat {
                expires: expires.parse().unwrap(),
                view: vec![],
                addr: None,
            }
            .to_value()
        };
        let data = BTreeMap::from([
            ("a".to_owned(), entry("2026-01-01T00:00:10Z")),
            ("b".to_owned(), entry("2025-12-31T23:59:59Z")),
            ("c".to_owned(), "2026-01-01T00:00:10Z".to_owned()),
        ]);
        assert_eq!(live_replicas(&data, now), vec!["a".to_owned()]);
        assert_eq!(heartbeat_key("pod/1 x"), "pod-1-x");
        assert_eq!(replica_id("a").len(), 16);
    }

    #[test]
    fn delivery_state_round_trips() {
        let state = DeliveryState {
            delivering: false,
            reason: "CallbackRejected".into(),
            message: "the callback answered HTTP 410".into(),
            last_delivery_time: Some("2026-01-01T00:00:00Z".parse().unwrap()),
            parked: Some(Parked {
                generation: 3,
                resume: Some("now".into()),
            }),
        };
        assert_eq!(DeliveryState::from_data(&state.to_data()), Some(state));
        assert_eq!(DeliveryState::from_data(&BTreeMap::new()), None);
    }
}
