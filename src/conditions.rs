//! Condition types and the fixed list of reasons (docs/reference.md, "Conditions and reasons"), and the helpers
//! that keep `lastTransitionTime` stable and decide whether status changed.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{DropboxElementInstanceStatus, Phase};

/// Credentials were read and a valid token was obtained (written by the controller).
pub const AUTHORIZED: &str = "Authorized";
/// The ingress runs and the instance's webhook route and cursor are set up
/// (controller; only when events are enabled).
pub const EVENTS_READY: &str = "EventsReady";
/// The last delivery to the callback URL succeeded (reported by the ingress,
/// mirrored into status by the controller).
pub const EVENTS_DELIVERING: &str = "EventsDelivering";
/// Every condition above that applies is True (controller).
pub const READY: &str = "Ready";

/// Every reason a condition can carry. The condition table of docs/reference.md is this list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Authorized=True: the access token works.
    TokenValid,
    /// A referenced Secret does not exist in the instance's namespace.
    SecretNotFound,
    /// A referenced Secret lacks the referenced key (or it is empty).
    SecretKeyMissing,
    /// Dropbox refused the authorization code (used, expired, wrong redirect URI).
    CodeExchangeFailed,
    /// The code in the Secret was already exchanged, by this or another instance.
    CodeAlreadyUsed,
    /// The refresh token no longer works: a person has to approve the app again.
    ReauthorizationRequired,
    /// Dropbox refused the app key or app secret.
    InvalidClient,
    /// Dropbox refused the long-lived access token (apiKey).
    InvalidApiKey,
    /// Dropbox answered 5xx or could not be reached; retried with backoff.
    DropboxUnavailable,
    /// Dropbox answered 429; retried after `Retry-After`.
    RateLimited,
    /// EventsReady=True: the ingress is running and the cursor is set.
    IngressReady,
    /// EventsReady=False: the ingress Deployment is not available yet.
    IngressUnavailable,
    /// EventsReady=False: waiting for Authorized before events can be set up.
    AwaitingAuthorization,
    /// EventsDelivering=True: the last delivery succeeded.
    Delivered,
    /// EventsDelivering=False: the callback answered 4xx (other than 429).
    CallbackRejected,
    /// EventsDelivering=False: the callback could not be reached, timed out or answered 5xx/429.
    CallbackUnreachable,
    /// EventsDelivering=False: the callback address is not allowed (loopback, private, ...).
    CallbackForbidden,
    /// EventsDelivering=False: Dropbox refused to list the changes (other than a
    /// cursor `reset`), e.g. `path/not_found` after the watched folder was removed.
    DropboxRejected,
    /// EventsDelivering=False: the instance's committed cursor is missing; the
    /// controller makes a new one and an `UNKNOWN` event says changes may be missing.
    CursorMissing,
    /// EventsDelivering=False: the API server refused to commit the cursor again
    /// and again; delivered events are delivered again (same ids) until it works.
    CursorCommitFailed,
    /// Ready=True.
    Ready,
    /// A Secret or ConfigMap the operator would write already exists and was not
    /// made by it (no managed-by label, or another instance's): nothing is
    /// overwritten or adopted.
    ResourceConflict,
    /// Authorized/EventsReady=False: the Dropbox app lacks a permission (scope).
    MissingScope,
    /// Authorized=False: the code was sent to Dropbox but its tokens could not be
    /// stored; codes are single-use, so a person has to approve again.
    TokensNotStored,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TokenValid => "TokenValid",
            Reason::SecretNotFound => "SecretNotFound",
            Reason::SecretKeyMissing => "SecretKeyMissing",
            Reason::CodeExchangeFailed => "CodeExchangeFailed",
            Reason::CodeAlreadyUsed => "CodeAlreadyUsed",
            Reason::ReauthorizationRequired => "ReauthorizationRequired",
            Reason::InvalidClient => "InvalidClient",
            Reason::InvalidApiKey => "InvalidApiKey",
            Reason::DropboxUnavailable => "DropboxUnavailable",
            Reason::RateLimited => "RateLimited",
            Reason::IngressReady => "IngressReady",
            Reason::IngressUnavailable => "IngressUnavailable",
            Reason::AwaitingAuthorization => "AwaitingAuthorization",
            Reason::Delivered => "Delivered",
            Reason::CallbackRejected => "CallbackRejected",
            Reason::CallbackUnreachable => "CallbackUnreachable",
            Reason::CallbackForbidden => "CallbackForbidden",
            Reason::DropboxRejected => "DropboxRejected",
            Reason::CursorMissing => "CursorMissing",
            Reason::CursorCommitFailed => "CursorCommitFailed",
            Reason::Ready => "Ready",
            Reason::ResourceConflict => "ResourceConflict",
            Reason::MissingScope => "MissingScope",
            Reason::TokensNotStored => "TokensNotStored",
        }
    }

    /// The reason named `name`, if it is one of the list.
    pub fn parse(name: &str) -> Option<Reason> {
        ALL_REASONS.iter().copied().find(|r| r.as_str() == name)
    }

    /// Reasons that need a person (a new code, a fixed Secret) rather than time.
    pub fn needs_authorization(self) -> bool {
        matches!(
            self,
            Reason::CodeExchangeFailed
                | Reason::CodeAlreadyUsed
                | Reason::ReauthorizationRequired
                | Reason::TokensNotStored
                | Reason::AwaitingAuthorization
        )
    }

    /// Configuration errors: nothing changes until the spec or a Secret does.
    pub fn is_configuration_error(self) -> bool {
        matches!(
            self,
            Reason::SecretNotFound
                | Reason::SecretKeyMissing
                | Reason::InvalidClient
                | Reason::InvalidApiKey
                | Reason::ResourceConflict
                | Reason::MissingScope
        )
    }
}

/// Every reason, in the order of docs/reference.md's table.
pub const ALL_REASONS: [Reason; 24] = [
    Reason::TokenValid,
    Reason::SecretNotFound,
    Reason::SecretKeyMissing,
    Reason::CodeExchangeFailed,
    Reason::CodeAlreadyUsed,
    Reason::ReauthorizationRequired,
    Reason::InvalidClient,
    Reason::InvalidApiKey,
    Reason::DropboxUnavailable,
    Reason::RateLimited,
    Reason::IngressReady,
    Reason::IngressUnavailable,
    Reason::AwaitingAuthorization,
    Reason::Delivered,
    Reason::CallbackRejected,
    Reason::CallbackUnreachable,
    Reason::CallbackForbidden,
    Reason::DropboxRejected,
    Reason::CursorMissing,
    Reason::CursorCommitFailed,
    Reason::Ready,
    Reason::ResourceConflict,
    Reason::MissingScope,
    Reason::TokensNotStored,
];

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The desired state of one condition, before timestamps.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub type_: &'static str,
    pub status: Option<bool>,
    pub reason: Reason,
    pub message: String,
}

impl Desired {
    pub fn new(
        type_: &'static str,
        status: Option<bool>,
        reason: Reason,
        message: impl Into<String>,
    ) -> Self {
        Desired {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }

    pub fn is_true(&self) -> bool {
        self.status == Some(true)
    }

    fn status_str(&self) -> &'static str {
        match self.status {
            Some(true) => "True",
            Some(false) => "False",
            None => "Unknown",
        }
    }

    /// The metav1.Condition, keeping `lastTransitionTime` of `existing` unless the
    /// status flips.
    pub fn to_condition(
        &self,
        existing: &[Condition],
        generation: Option<i64>,
        now: &Time,
    ) -> Condition {
        let previous = find(existing, self.type_);
        let last_transition_time = match previous {
            Some(p) if p.status == self.status_str() => p.last_transition_time.clone(),
            _ => now.clone(),
        };
        Condition {
            type_: self.type_.to_owned(),
            status: self.status_str().to_owned(),
            reason: self.reason.as_str().to_owned(),
            message: self.message.clone(),
            observed_generation: generation,
            last_transition_time,
        }
    }
}

/// The condition of `type_`, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// True when the condition of `type_` is present with status "True".
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

/// The summary phase for a set of desired conditions.
pub fn phase(authorized: &Desired, ready: &Desired) -> Phase {
    if ready.is_true() {
        Phase::Ready
    } else if authorized.is_true() {
        Phase::Degraded
    } else if authorized.reason.needs_authorization() {
        Phase::AwaitingAuthorization
    } else if authorized.reason.is_configuration_error() {
        Phase::Failed
    } else {
        Phase::Pending
    }
}

/// Status equality for "should we write?": the same content, with conditions
/// compared as a set keyed by type.
pub fn status_differs(
    current: Option<&DropboxElementInstanceStatus>,
    desired: &DropboxElementInstanceStatus,
) -> bool {
    let Some(current) = current else { return true };
    let mut a = current.clone();
    let mut b = desired.clone();
    a.conditions.sort_by(|x, y| x.type_.cmp(&y.type_));
    b.conditions.sort_by(|x, y| x.type_.cmp(&y.type_));
    a != b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_documents_every_reason() {
        let readme = include_str!("../docs/reference.md");
        for reason in ALL_REASONS {
            assert_eq!(Reason::parse(reason.as_str()), Some(reason));
            assert!(
                readme.contains(&format!("| `{reason}` |")),
                "docs/reference.md's condition table lacks {reason}"
            );
        }
    }

    fn time(s: &str) -> Time {
        Time(s.parse().expect("timestamp"))
    }

    #[test]
    fn transition_time_is_kept_while_status_holds() {
        let t0 = time("2026-01-01T00:00:00Z");
        let t1 = time("2026-01-02T00:00:00Z");
        let first = Desired::new(AUTHORIZED, Some(false), Reason::DropboxUnavailable, "503")
            .to_condition(&[], Some(1), &t0);
        assert_eq!(first.last_transition_time, t0);
        // Same status, other reason: the time stays.
        let second = Desired::new(AUTHORIZED, Some(false), Reason::RateLimited, "429")
            .to_condition(std::slice::from_ref(&first), Some(1), &t1);
        assert_eq!(second.last_transition_time, t0);
        // Flip: the time moves.
        let third = Desired::new(AUTHORIZED, Some(true), Reason::TokenValid, "ok").to_condition(
            &[second],
            Some(2),
            &t1,
        );
        assert_eq!(third.last_transition_time, t1);
        assert_eq!(third.observed_generation, Some(2));
    }

    #[test]
    fn phases() {
        let ok = Desired::new(AUTHORIZED, Some(true), Reason::TokenValid, "");
        let ready = Desired::new(READY, Some(true), Reason::Ready, "");
        let not_ready = Desired::new(READY, Some(false), Reason::IngressUnavailable, "");
        assert_eq!(phase(&ok, &ready), Phase::Ready);
        assert_eq!(phase(&ok, &not_ready), Phase::Degraded);
        let reauth = Desired::new(AUTHORIZED, Some(false), Reason::ReauthorizationRequired, "");
        assert_eq!(phase(&reauth, &not_ready), Phase::AwaitingAuthorization);
        let missing = Desired::new(AUTHORIZED, Some(false), Reason::SecretNotFound, "");
        assert_eq!(phase(&missing, &not_ready), Phase::Failed);
        let down = Desired::new(AUTHORIZED, Some(false), Reason::DropboxUnavailable, "");
        assert_eq!(phase(&down, &not_ready), Phase::Pending);
    }
}
