//! What every file of the controller shares, and nothing else: the error that
//! ends a reconcile, when to look at an instance again, the clock, the field
//! manager and an instance's key. A leaf: it imports no other file of the
//! controller, so the others never import each other in a circle
//! (docs/architecture.md, "The credential state machine").

use std::time::Duration;

use kube::ResourceExt;

use crate::api::DropboxElementInstance;

/// Field manager of everything the controller applies.
pub const FIELD_MANAGER: &str = crate::contract::CONTROLLER_FIELD_MANAGER;

/// Errors that end a reconcile early; they are retried with backoff. Dropbox
/// trouble is not among them: it becomes a condition and a scheduled retry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("the instance has no namespace")]
    NotNamespaced,
    #[error("the reconcile panicked: {0}")]
    Panicked(String),
    /// A fenced write found the object changed since the decision read it: the
    /// decision is made again from a fresh copy.
    #[error("{0} changed since it was read; deciding again from a fresh copy")]
    Conflict(String),
    /// The leader lease was not renewed in time: this replica no longer acts.
    #[error("not acting: {0}")]
    NotLeader(String),
    /// The API server refused a write the decision needs (an admission policy,
    /// a webhook); retried with backoff, a Warning Event names the refusal.
    #[error("the API server refused to {what}: {message}")]
    Refused { what: String, message: String },
    /// A step of the state machine that does not lead anywhere (a bug, reported
    /// instead of looping).
    #[error("the credential state machine did not settle: {0}")]
    Unsettled(String),
}

impl Error {
    /// Low-cardinality label for metrics.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesAPI",
            Error::NotNamespaced => "NotNamespaced",
            Error::Panicked(_) => "Panicked",
            Error::Conflict(_) => "Conflict",
            Error::NotLeader(_) => "NotLeader",
            Error::Refused { .. } => "Refused",
            Error::Unsettled(_) => "Unsettled",
        }
    }
}

/// When to look at the instance again.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Next {
    /// Healthy: come back after this long (e.g. when the token is due for refresh).
    After(Duration),
    /// Transient trouble: retry with exponential backoff, not sooner than `at_least`.
    Backoff { at_least: Option<Duration> },
    /// Only a change (spec, Secret) can help.
    WaitForChange,
}

/// Now, in whole seconds: metav1.Time is serialized with second precision, so
/// anything finer would make the stored status look different on every reconcile.
pub fn now() -> jiff::Timestamp {
    jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())
        .unwrap_or_else(|_| jiff::Timestamp::now())
}

/// `namespace/name` of an instance, for logs and messages.
pub fn object_key(instance: &DropboxElementInstance) -> String {
    format!(
        "{}/{}",
        instance.namespace().unwrap_or_default(),
        instance.name_any()
    )
}

/// Whether a Kubernetes error is a failed precondition (409: the object changed,
/// or one of that name was created meanwhile).
pub fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(e) if e.code == 409)
}
