//! The endpoints Dropbox calls, on the public port (docs/architecture.md,
//! "Hostile traffic"):
//!
//! - `GET /webhooks/dropbox/{appKey}?challenge=X`: the verification request,
//!   answered with `X` as text/plain (and nosniff, since the body is caller-chosen).
//! - `POST /webhooks/dropbox/{appKey}`: a notification, checked cheapest first:
//!   1. an app key no events-enabled instance uses: 404, body not read;
//!   2. a missing or malformed `X-Dropbox-Signature`: 403, body not read;
//!   3. a declared length over 1 MiB: 413; too many webhooks in flight, or
//!      a body the process-wide body budget cannot cover (`super::budget`):
//!      503 with `Retry-After`; the body not read;
//!   4. the body (at most 1 MiB, within a deadline): 413 / 408 / 400;
//!   5. the signature (hex HMAC-SHA256 of the raw body, constant-time) under the
//!      app secret of each instance concerned, one HMAC pass per distinct secret.
//!
//!   Only instances whose OWN app secret verified the body are triggered, each
//!   with a copy of the notification that lists only its own account. A valid
//!   notification is answered 200 at once; the syncs run in the background.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State as AxumState};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use tokio::sync::Semaphore;

use super::budget::BodyBudget;
use super::payload::{dropbox_signature_matches, parse_dropbox_signature};
use super::sync::Syncer;
use crate::api::DropboxElementInstance;
use crate::metrics::{IngressMetrics, ResultLabels};

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

/// Largest notification body accepted (Dropbox's are tiny).
pub const MAX_BODY: usize = 1024 * 1024;
/// The header Dropbox signs notifications with.
pub const SIGNATURE_HEADER: &str = "x-dropbox-signature";
/// Instances whose secrets are tried for a notification that names none of the
/// app's accounts (it is answered 200 when one verifies it, so Dropbox keeps the
/// webhook enabled): bounded, so such requests cost little.
const UNLISTED_CANDIDATES: usize = 16;

#[derive(Clone)]
pub struct State {
    pub syncer: Arc<Syncer>,
    pub store: Store<DropboxElementInstance>,
    pub metrics: IngressMetrics,
    pub permits: Arc<Semaphore>,
    pub body_timeout: Duration,
    /// Bytes of bodies in flight across the process.
    pub budget: BodyBudget,
}

pub fn routes(state: State) -> Router {
    Router::new()
        .route(
            "/webhooks/dropbox/{app_key}",
            get(challenge).post(notification),
        )
        .with_state(state)
}

async fn challenge(Query(query): Query<HashMap<String, String>>) -> Response {
    match query.get("challenge") {
        Some(challenge) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "text/plain"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            challenge.clone(),
        )
            .into_response(),
        None => (StatusCode::BAD_REQUEST, "missing challenge parameter").into_response(),
    }
}

fn count(metrics: &IngressMetrics, result: &'static str) {
    metrics
        .webhooks
        .get_or_create(&ResultLabels { result })
        .inc();
}

/// A refusal. The connection is closed after it: most refusals come before
/// the body was read, and a client must not reuse a connection that still
/// carries its unread body (nor does a refused client deserve a kept-alive one).
fn refuse(
    metrics: &IngressMetrics,
    result: &'static str,
    status: StatusCode,
    why: &'static str,
) -> Response {
    count(metrics, result);
    (status, [(header::CONNECTION, "close")], why).into_response()
}

async fn notification(
    AxumState(state): AxumState<State>,
    Path(app_key): Path<String>,
    request: axum::extract::Request,
) -> Response {
    let m = &state.metrics;
    // The request is taken apart rather than extracted piecewise, so the headers
    // are not copied for every webhook.
    let (parts, body) = request.into_parts();
    let candidates = super::instances_for(&state.store, &app_key, None);
    if candidates.is_empty() {
        return refuse(m, "not_found", StatusCode::NOT_FOUND, "unknown app key");
    }
    let Some(tag) = parts
        .headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_dropbox_signature)
    else {
        return refuse(
            m,
            "forbidden",
            StatusCode::FORBIDDEN,
            "missing or malformed X-Dropbox-Signature",
        );
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY as u64) {
        return refuse(
            m,
            "too_large",
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body over 1 MiB",
        );
    }
    let Ok(_permit) = state.permits.try_acquire() else {
        count(m, "overloaded");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1"), (header::CONNECTION, "close")],
            "too many webhooks in flight",
        )
            .into_response();
    };
    // Charged by the declared length; without one (chunked), the largest body.
    let Some(_charge) = state.budget.charge(declared.unwrap_or(MAX_BODY as u64)) else {
        count(m, "over_budget");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1"), (header::CONNECTION, "close")],
            "too many webhook bodies in flight",
        )
            .into_response();
    };
    let body = match tokio::time::timeout(
        state.body_timeout,
        Limited::new(body, MAX_BODY).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<LengthLimitError>() => {
            return refuse(
                m,
                "too_large",
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body over 1 MiB",
            );
        }
        Ok(Err(_)) => {
            return refuse(
                m,
                "malformed",
                StatusCode::BAD_REQUEST,
                "the request body could not be read",
            );
        }
        Err(_) => {
            return refuse(
                m,
                "timeout",
                StatusCode::REQUEST_TIMEOUT,
                "the request body was not sent in time",
            );
        }
    };

    // Only the account list decides where the work goes.
    let notice = serde_json::from_slice::<Notice>(&body).ok();
    let accounts: BTreeSet<&str> = notice
        .iter()
        .flat_map(|n| n.list_folder.iter())
        .flat_map(|l| l.accounts.iter().map(|a| a.as_ref()))
        .collect();
    let listed: Vec<&Arc<DropboxElementInstance>> = candidates
        .iter()
        .filter(|i| account_of(i).is_some_and(|a| accounts.contains(a)))
        .collect();

    if !listed.is_empty() {
        let verified = verified(&state, &listed, &body, &tag).await;
        if verified.is_empty() {
            // Signed with no secret of an instance it names: forged, or signed
            // with another tenant's secret. Nobody is triggered.
            return refuse(m, "forbidden", StatusCode::FORBIDDEN, "invalid signature");
        }
        // Each sync forwards, as `raw`, a notification that lists only that
        // instance's own account: Dropbox batches many users' accounts into one.
        for uid in verified.iter().filter_map(|i| i.uid()) {
            state.syncer.trigger(&uid);
        }
        count(m, "accepted");
        tracing::debug!(app_key = %app_key, accounts = accounts.len(), triggered = verified.len(), "webhook accepted");
        return StatusCode::OK.into_response();
    }

    // Names none of our accounts (e.g. an instance deleted since): answer 200 to
    // a genuine one so Dropbox keeps the webhook enabled; nothing to do.
    let some: Vec<&Arc<DropboxElementInstance>> =
        candidates.iter().take(UNLISTED_CANDIDATES).collect();
    if verified(&state, &some, &body, &tag).await.is_empty() {
        return refuse(m, "forbidden", StatusCode::FORBIDDEN, "invalid signature");
    }
    if notice.is_none() {
        return refuse(
            m,
            "malformed",
            StatusCode::BAD_REQUEST,
            "body is not a Dropbox notification",
        );
    }
    count(m, "accepted");
    StatusCode::OK.into_response()
}

fn account_of(instance: &DropboxElementInstance) -> Option<&str> {
    instance
        .status
        .as_ref()
        .and_then(|s| s.account.as_ref())
        .and_then(|a| a.account_id.as_deref())
}

/// The instances among `instances` whose own app secret signed `body`. Each
/// distinct secret costs one HMAC pass; when none verifies, the secrets are read
/// again (single-flight, rate-limited, in case one was rotated) and only the
/// secrets that changed are tried again.
async fn verified<'a>(
    state: &State,
    instances: &[&'a Arc<DropboxElementInstance>],
    body: &[u8],
    tag: &[u8; 32],
) -> Vec<&'a Arc<DropboxElementInstance>> {
    let mut tried: Vec<(Vec<u8>, bool)> = Vec::with_capacity(1);
    for force in [false, true] {
        let mut matched = Vec::new();
        for instance in instances {
            let Some(uid) = instance.uid() else { continue };
            let secret = match state.syncer.secrets.get(&uid, force).await {
                Ok(Some(p)) => p.app_secret.clone(),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(error = %e, instance_uid = %uid, "could not read an instance's projected Secret");
                    None
                }
            };
            let Some(secret) = secret else { continue };
            let ok = match tried.iter().find(|(s, _)| *s == secret) {
                Some((_, ok)) => *ok,
                None => {
                    let ok = dropbox_signature_matches(&secret, body, tag);
                    tried.push((secret, ok));
                    ok
                }
            };
            if ok {
                matched.push(*instance);
            }
        }
        if !matched.is_empty() || force {
            return matched;
        }
    }
    Vec::new()
}
