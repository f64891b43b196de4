//! The endpoints Dropbox calls, on the public port (docs/architecture.md,
//! "Hostile traffic"):
//!
//! - `GET /webhooks/dropbox/{appKey}?challenge=X`: the verification request,
//!   answered with `X` as text/plain (and nosniff, since the body is caller-chosen).
//! - `POST /webhooks/dropbox/{appKey}`: a notification, checked cheapest first:
//!   1. an app key no events-enabled instance uses: 404, body not read;
//!   2. a missing or malformed `X-Dropbox-Signature`: 403, body not read;
//!   3. a declared length over 1 MiB: 413; a body the process-wide body
//!      budget cannot cover (`super::budget`): 503 with `Retry-After`; the
//!      body not read;
//!   4. the body (at most 1 MiB, within a deadline): 413 / 408 / 400; then
//!      too many webhooks at work (`--max-concurrent-webhooks`): 503 with
//!      `Retry-After` (a client stalled in its body holds no such slot);
//!   5. the signature (hex HMAC-SHA256 of the raw body, constant-time) under the
//!      app secret of each instance concerned, one HMAC pass per distinct
//!      secret ([`super::verify`]).
//!
//!   Only instances whose OWN app secret verified the body are synced, each
//!   with a copy of the notification that lists only its own account, by the
//!   replica that delivers it ([`super::handoff`]). A valid notification is
//!   answered 200 at once; the syncs run in the background.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State as AxumState};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::sync::Semaphore;

use super::budget::BodyBudget;
use super::handoff::Handoff;
use super::payload::parse_dropbox_signature;
use super::projections::Projection;
use super::sync::Syncer;
use super::verify::{self, Verifier};
use crate::metrics::{IngressMetrics, ResultLabels};

/// Largest notification body accepted (Dropbox's are tiny).
pub const MAX_BODY: usize = 1024 * 1024;
/// The header Dropbox signs notifications with.
pub const SIGNATURE_HEADER: &str = super::payload::DROPBOX_SIGNATURE_HEADER;

#[derive(Clone)]
pub struct State {
    pub syncer: Arc<Syncer>,
    pub handoff: Arc<Handoff>,
    pub verifier: Arc<Verifier>,
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
    if !state.syncer.projections.knows_app_key(&app_key) {
        return refuse(m, "not_found", StatusCode::NOT_FOUND, "unknown app key");
    }
    let signature = parts
        .headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok());
    let Some(tag) = signature.and_then(parse_dropbox_signature) else {
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

    // A slot bounds the work on bodies (signature checks, hand-offs), taken
    // only once the body is here: a client stalled in its body holds no slot
    // (the connection cap, the body budget and the body deadline bound those),
    // so stalled uploads cannot keep genuine webhooks out.
    let Ok(_permit) = state.permits.try_acquire() else {
        count(m, "overloaded");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1"), (header::CONNECTION, "close")],
            "too many webhooks in flight",
        )
            .into_response();
    };

    // Only the account list decides where the work goes.
    let accounts = verify::accounts(&body);
    let candidates = state.syncer.projections.for_app_key(&app_key);
    let listed: Vec<Arc<Projection>> = candidates
        .iter()
        .filter(|p| {
            accounts
                .as_ref()
                .is_some_and(|a| a.contains(&p.instance.account_id))
        })
        .cloned()
        .collect();

    if !listed.is_empty() {
        let verified = state.verifier.verified(&app_key, &listed, &body, &tag);
        if verified.is_empty() {
            // Signed with no secret of an instance it names: forged, or signed
            // with another tenant's secret. Nobody is triggered.
            return refuse(m, "forbidden", StatusCode::FORBIDDEN, "invalid signature");
        }
        // Each sync forwards, as `raw`, a notification that lists only that
        // instance's own account: Dropbox batches many users' accounts into one.
        state.handoff.dispatch(
            &state.syncer,
            &app_key,
            body,
            signature.unwrap_or_default(),
            &verified,
        );
        count(m, "accepted");
        tracing::debug!(app_key = %app_key, triggered = verified.len(), "webhook accepted");
        return StatusCode::OK.into_response();
    }

    // Names none of our accounts (e.g. an instance deleted since): answer 200 to
    // a genuine one so Dropbox keeps the webhook enabled; nothing to do. Every
    // distinct secret claiming the app key is tried, so claims with wrong
    // secrets cannot get genuine notifications refused.
    if state
        .verifier
        .verified(&app_key, &candidates, &body, &tag)
        .is_empty()
    {
        return refuse(m, "forbidden", StatusCode::FORBIDDEN, "invalid signature");
    }
    if accounts.is_none() {
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
