//! The endpoints Dropbox calls:
//!
//! - `GET /webhooks/dropbox/{appKey}?challenge=X`: the verification request,
//!   answered with `X` as text/plain (and nosniff, since the body is caller-chosen).
//! - `POST /webhooks/dropbox/{appKey}`: a notification. The body (at most 1 MiB)
//!   must carry a valid `X-Dropbox-Signature` (hex HMAC-SHA256 of the raw body with
//!   the app secret, compared in constant time); otherwise 403 and nothing is
//!   done. A valid one is answered 200 at once: the syncs it triggers run in the
//!   background.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State as AxumState};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use serde_json::Value;

use super::payload::verify_dropbox_signature;
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

#[derive(Clone)]
pub struct State {
    pub syncer: Arc<Syncer>,
    pub store: Store<DropboxElementInstance>,
    pub metrics: IngressMetrics,
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

async fn notification(
    AxumState(state): AxumState<State>,
    Path(app_key): Path<String>,
    request: axum::extract::Request,
) -> Response {
    // The request is taken apart rather than extracted piecewise, so the headers
    // are not copied for every webhook.
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            // The only failure of a local body read is the length limit.
            count(&state.metrics, "too_large");
            return (StatusCode::PAYLOAD_TOO_LARGE, "request body over 1 MiB").into_response();
        }
    };
    let Some(signature) = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok()) else {
        count(&state.metrics, "forbidden");
        return (StatusCode::FORBIDDEN, "missing X-Dropbox-Signature").into_response();
    };
    let candidates = super::instances_for(&state.store, &app_key, None);
    if !verified(&state, &candidates, &body, signature).await {
        count(&state.metrics, "forbidden");
        return (StatusCode::FORBIDDEN, "invalid signature").into_response();
    }
    // Only the account list decides where the work goes; the full body (sent along
    // as `raw`) is only built when an instance is concerned.
    let Ok(notice) = serde_json::from_slice::<Notice>(&body) else {
        count(&state.metrics, "malformed");
        return (
            StatusCode::BAD_REQUEST,
            "body is not a Dropbox notification",
        )
            .into_response();
    };
    let accounts: BTreeSet<&str> = notice
        .list_folder
        .iter()
        .flat_map(|l| l.accounts.iter().map(|a| a.as_ref()))
        .collect();
    let concerned: Vec<_> = candidates
        .iter()
        .filter(|i| {
            i.status
                .as_ref()
                .and_then(|s| s.account.as_ref())
                .and_then(|a| a.account_id.as_deref())
                .is_some_and(|a| accounts.contains(a))
        })
        .collect();
    let mut triggered = 0;
    if !concerned.is_empty() {
        let raw: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        for instance in concerned {
            if let Some(uid) = instance.uid() {
                state.syncer.trigger(&uid, &raw);
                triggered += 1;
            }
        }
    }
    count(&state.metrics, "accepted");
    tracing::debug!(app_key = %app_key, accounts = accounts.len(), triggered, "webhook accepted");
    StatusCode::OK.into_response()
}

/// Whether `signature` matches the body under the app secret of any instance of
/// this app. On a mismatch the secrets are re-read once (rate-limited), in case
/// the app secret was rotated.
async fn verified(
    state: &State,
    candidates: &[Arc<DropboxElementInstance>],
    body: &[u8],
    signature: &str,
) -> bool {
    for force in [false, true] {
        // Instances of one app usually share one app Secret: check each once.
        let mut seen: Vec<(&str, &str, &str)> = Vec::with_capacity(1);
        for instance in candidates {
            let Some(r) = &instance.spec.authentication.app_secret_ref else {
                continue;
            };
            let ns = instance.metadata.namespace.as_deref().unwrap_or_default();
            let id = (ns, r.name.as_str(), r.client_secret_key.as_str());
            if seen.contains(&id) {
                continue;
            }
            seen.push(id);
            match state
                .syncer
                .secrets
                .get(ns, &r.name, &r.client_secret_key, force)
                .await
            {
                Ok(Some(secret)) if verify_dropbox_signature(&secret, body, signature) => {
                    return true;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, secret = %r.name, "could not read an app secret")
                }
            }
        }
    }
    false
}
