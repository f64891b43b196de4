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
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State as AxumState};
use axum::http::{HeaderMap, StatusCode, header};
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
        .layer(DefaultBodyLimit::max(MAX_BODY))
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
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(rejection) => {
            let status = rejection.status();
            count(
                &state.metrics,
                if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "too_large"
                } else {
                    "malformed"
                },
            );
            return (status, "request body rejected").into_response();
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
    let mut refs: BTreeSet<(String, String, String)> = BTreeSet::new();
    for i in candidates {
        if let Some(r) = &i.spec.authentication.app_secret_ref {
            refs.insert((
                i.namespace().unwrap_or_default(),
                r.name.clone(),
                r.client_secret_key.clone(),
            ));
        }
    }
    for force in [false, true] {
        for (ns, name, key) in &refs {
            match state.syncer.secrets.get(ns, name, key, force).await {
                Ok(Some(secret)) if verify_dropbox_signature(&secret, body, signature) => {
                    return true;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, secret = %name, "could not read an app secret")
                }
            }
        }
    }
    false
}
