//! Hand-off: a webhook received by one replica goes to the replica that
//! delivers each instance it concerns (docs/architecture.md, "One syncer per
//! instance").
//!
//! The receiving replica verifies the webhook, then forwards the webhook itself
//! (body and `X-Dropbox-Signature`, unchanged) to the peer endpoint of the
//! responsible replica, naming the instances it routes there. That replica
//! verifies the signature again with each named instance's own app secret and
//! syncs only the instances it verified: the peer endpoint needs no key of its
//! own, and whoever reaches it can make a replica do no more than a genuine
//! webhook to the public port would. It listens on its own port, which the
//! public Service does not expose, and never forwards again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State as AxumState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::{BodyExt, Limited};
use tokio::sync::Semaphore;

use super::membership::Route;
use super::payload::{DROPBOX_SIGNATURE_HEADER, parse_dropbox_signature};
use super::projections::Projection;
use super::sync::Syncer;
use super::verify::{self, Verifier};
use crate::metrics::ResultLabels;

/// The header naming the instances (uids, comma-separated) a forwarded webhook
/// is for.
pub const INSTANCES_HEADER: &str = "x-dropbox-operator-instances";
/// Path prefix of the peer endpoint.
pub const PEER_PREFIX: &str = "/peer/webhooks/dropbox/";
/// Largest forwarded body (as on the public port).
const MAX_BODY: usize = 1024 * 1024;
/// Instances one forwarded webhook may name.
const MAX_INSTANCES: usize = 1000;
/// Forwards in flight at once (more are synced where they arrived).
const FORWARDS: usize = 64;
/// Forwarded webhooks handled at once by the peer endpoint.
const RECEIVED: usize = 64;
/// Time a forward (and the peer endpoint's body read) may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Forwards webhooks to the replicas responsible for their instances.
pub struct Handoff {
    client: reqwest::Client,
    forwards: Arc<Semaphore>,
}

impl Handoff {
    pub fn new() -> Result<Arc<Self>, reqwest::Error> {
        Ok(Arc::new(Handoff {
            client: reqwest::Client::builder()
                .timeout(TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .build()?,
            forwards: Arc::new(Semaphore::new(FORWARDS)),
        }))
    }

    /// Syncs each of `verified` (instances `body` was verified for) where it is
    /// delivered: here, or at the replicas [`super::membership::Membership::route`]
    /// names. A forward that fails is synced here instead: the worker waits
    /// until the replicas agree on who delivers it.
    pub fn dispatch(
        self: &Arc<Self>,
        syncer: &Arc<Syncer>,
        app_key: &str,
        body: Bytes,
        signature: &str,
        verified: &[Arc<Projection>],
    ) {
        let mut peers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for p in verified {
            for route in syncer.membership.route(p.uid()) {
                match route {
                    Route::Me => syncer.trigger(p.uid()),
                    Route::Peer { addr, .. } => {
                        peers.entry(addr).or_default().push(p.uid().to_owned())
                    }
                }
            }
        }
        for (addr, uids) in peers {
            for chunk in uids.chunks(MAX_INSTANCES) {
                let uids = chunk.to_vec();
                let Ok(permit) = self.forwards.clone().try_acquire_owned() else {
                    count(syncer, "local");
                    uids.iter().for_each(|uid| syncer.trigger(uid));
                    continue;
                };
                let request = self
                    .client
                    .post(format!("http://{addr}{PEER_PREFIX}{app_key}"))
                    .header(DROPBOX_SIGNATURE_HEADER, signature)
                    .header(INSTANCES_HEADER, uids.join(","))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone());
                let syncer = syncer.clone();
                let addr = addr.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match request.send().await {
                        Ok(r) if r.status().is_success() => count(&syncer, "forwarded"),
                        outcome => {
                            let status = outcome.as_ref().ok().map(|r| r.status().as_u16());
                            tracing::warn!(
                                peer = %addr, ?status, instances = uids.len(),
                                "handing a webhook to the replica that delivers its instances failed; syncing here"
                            );
                            count(&syncer, "failed");
                            uids.iter().for_each(|uid| syncer.trigger(uid));
                        }
                    }
                });
            }
        }
    }
}

fn count(syncer: &Syncer, result: &'static str) {
    syncer
        .metrics
        .handoffs
        .get_or_create(&ResultLabels { result })
        .inc();
}

/// State of the peer endpoint.
#[derive(Clone)]
pub struct PeerState {
    pub syncer: Arc<Syncer>,
    pub verifier: Arc<Verifier>,
    pub permits: Arc<Semaphore>,
}

impl PeerState {
    pub fn new(syncer: Arc<Syncer>, verifier: Arc<Verifier>) -> Self {
        PeerState {
            syncer,
            verifier,
            permits: Arc::new(Semaphore::new(RECEIVED)),
        }
    }
}

/// The peer endpoint: `POST /peer/webhooks/dropbox/{appKey}`.
pub fn routes(state: PeerState) -> Router {
    Router::new()
        .route("/peer/webhooks/dropbox/{app_key}", post(receive))
        .with_state(state)
}

async fn receive(
    AxumState(state): AxumState<PeerState>,
    Path(app_key): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let Ok(_permit) = state.permits.try_acquire() else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let Some(tag) = headers
        .get(DROPBOX_SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_dropbox_signature)
    else {
        return StatusCode::FORBIDDEN.into_response();
    };
    let uids: Vec<&str> = headers
        .get(INSTANCES_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(',').filter(|u| !u.is_empty()).collect())
        .unwrap_or_default();
    if uids.is_empty() || uids.len() > MAX_INSTANCES {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let body = match tokio::time::timeout(TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        _ => return StatusCode::BAD_REQUEST.into_response(),
    };
    let Some(accounts) = verify::accounts(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    // Only instances of this app key whose account the notification names.
    let named: Vec<Arc<Projection>> = uids
        .iter()
        .filter_map(|uid| state.syncer.projections.get(uid))
        .filter(|p| p.takes_webhooks() && p.instance.app_key == app_key)
        .filter(|p| accounts.contains(&p.instance.account_id))
        .collect();
    let verified = state.verifier.verified(&app_key, &named, &body, &tag);
    if verified.is_empty() {
        count(&state.syncer, "refused");
        return StatusCode::FORBIDDEN.into_response();
    }
    for p in &verified {
        state.syncer.trigger(p.uid());
    }
    count(&state.syncer, "received");
    StatusCode::OK.into_response()
}
