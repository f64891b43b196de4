//! A callback receiver, as an application would run one: records every delivery
//! and verifies both signature schemes (Elements-Webhook-Signature and Standard
//! Webhooks). It can fail, rate-limit, redirect, stall or go down on demand.
//!
//! [`Receiver::ledger`] is what an application would conclude from what it
//! accepted, checked against an independent record of the account (the
//! emulator's change log and final state): a repeated id always carried the
//! same body, per path the states arrived in the order they happened, and the
//! last event per path is the path's final state.
//!
//! The signatures are checked with this file's own HMAC code, written from the
//! docs/user-guide.md's rule ("Events": `sha256=` + base64(HMAC-SHA256(key, raw body)), and
//! `v1,` + base64(HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<body>"))),
//! not with the crate's verifiers: a mistake shared by the ingress's signer and
//! its verifier cannot make a test pass.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

type HmacSha256 = Hmac<sha2::Sha256>;

/// The path deliveries are expected on.
const EVENTS_PATH: &str = "/events";
/// Where a redirect answer points: a delivery arriving here means the ingress
/// followed a redirect (it must not).
const REDIRECTED_PATH: &str = "/redirected";

/// One delivery as received.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub event_id: String,
    /// The request path (`/events`, or `/redirected` for a followed redirect).
    pub path: String,
    /// Request headers (names lower-cased).
    pub headers: Vec<(String, String)>,
    pub content_type: String,
    pub body: Value,
    pub raw: Vec<u8>,
    /// Both signatures verified with the key (None when no key was expected).
    pub elements_signature_ok: Option<bool>,
    pub standard_webhooks_ok: Option<bool>,
    /// Events in the body (also kept when the parsed body is not, see
    /// [`Receiver::lean`]).
    pub event_count: usize,
    pub status: u16,
    /// When the request arrived (before any stall).
    pub arrived: Instant,
    /// When it was answered (after any stall).
    pub at: Instant,
}

impl Delivery {
    fn event_array(&self) -> Option<&Vec<Value>> {
        let message = if self.body.get("specversion").is_some() {
            &self.body["data"]["message"]
        } else {
            &self.body["message"]
        };
        message["events"].as_array()
    }

    /// The events of an `elements` (or CloudEvents-wrapped) body.
    pub fn events(&self) -> Vec<Value> {
        self.event_array().cloned().unwrap_or_default()
    }

    /// Whether the receiver took it (answered 2xx on the events path).
    pub fn is_accepted(&self) -> bool {
        (200..300).contains(&self.status) && self.path == EVENTS_PATH
    }
}

/// An injected failure of the events path.
#[derive(Clone, Copy, Default)]
struct Failure {
    status: u16,
    /// Until when (None: no time bound).
    until: Option<Instant>,
    /// How many more requests (None: no count bound).
    remaining: Option<usize>,
    /// `Retry-After` seconds to send with it.
    retry_after: Option<u64>,
    /// Send that `Retry-After` as an HTTP date (that many seconds from now).
    retry_after_as_date: bool,
    /// Send `Location: <receiver>/redirected` with it.
    redirect: bool,
}

#[derive(Default)]
struct Behaviour {
    failure: Option<Failure>,
    stall: Option<Duration>,
}

#[derive(Clone)]
struct Shared {
    key: Option<Vec<u8>>,
    base: String,
    received: Arc<Mutex<Vec<Delivery>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    /// Requests being handled right now (e.g. held by a stall).
    in_flight: Arc<AtomicUsize>,
    /// `Elements-Webhook-Id` of every request as it arrived, also of those
    /// whose sender went away before the answer (e.g. a killed ingress).
    arrivals: Arc<Mutex<Vec<String>>>,
    /// `Some(n)`: once `n` deliveries were accepted, hold every further request
    /// until this is set back to `None`.
    gate: Arc<tokio::sync::watch::Sender<Option<usize>>>,
    /// Keep only the raw body, not the parsed one (benchmarks: thousands of
    /// large deliveries).
    lean: Arc<std::sync::atomic::AtomicBool>,
}

/// Counts a request as in flight until it is answered or dropped (the client
/// went away).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(counter: &Arc<AtomicUsize>) -> InFlight {
        counter.fetch_add(1, Ordering::SeqCst);
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Server {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub struct Receiver {
    pub url: String,
    addr: SocketAddr,
    shared: Shared,
    server: Mutex<Server>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let server = self.server.get_mut().expect("server lock");
        server.stop.cancel();
        if let Some(task) = server.task.take() {
            task.abort();
        }
    }
}

fn serve(listener: tokio::net::TcpListener, shared: Shared) -> Server {
    let app = Router::new()
        .route(EVENTS_PATH, post(receive))
        .route(REDIRECTED_PATH, post(receive))
        .with_state(shared);
    let stop = CancellationToken::new();
    let signal = stop.clone();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { signal.cancelled().await })
            .await;
    });
    Server {
        stop,
        task: Some(task),
    }
}

impl Receiver {
    /// Starts a receiver on 127.0.0.1 that expects deliveries signed with `key`.
    pub async fn start(key: Option<&[u8]>) -> Receiver {
        Receiver::start_on(std::net::Ipv4Addr::LOCALHOST.into(), key).await
    }

    /// Like [`Receiver::start`], on `ip` (the e2e node's address, which pods reach).
    pub async fn start_on(ip: std::net::IpAddr, key: Option<&[u8]>) -> Receiver {
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("receiver address");
        let shared = Shared {
            key: key.map(<[u8]>::to_vec),
            base: format!("http://{addr}"),
            received: Arc::default(),
            behaviour: Arc::default(),
            in_flight: Arc::default(),
            arrivals: Arc::default(),
            gate: Arc::new(tokio::sync::watch::Sender::new(None)),
            lean: Arc::default(),
        };
        let server = serve(listener, shared.clone());
        Receiver {
            url: format!("http://{addr}{EVENTS_PATH}"),
            addr,
            shared,
            server: Mutex::new(server),
        }
    }

    fn set_failure(&self, failure: Failure) {
        self.shared
            .behaviour
            .lock()
            .expect("behaviour lock")
            .failure = Some(failure);
    }

    /// Answer `status` to every delivery for `duration`.
    pub fn fail_for(&self, status: u16, duration: Duration) {
        self.set_failure(Failure {
            status,
            until: Some(Instant::now() + duration),
            ..Failure::default()
        });
    }

    /// Answer `status` to the next `count` deliveries.
    pub fn fail_next(&self, status: u16, count: usize) {
        self.set_failure(Failure {
            status,
            remaining: Some(count),
            ..Failure::default()
        });
    }

    /// Answer `status` to the next `count` deliveries, with `Retry-After` as
    /// an HTTP date `retry_after_secs` from the answer (RFC 9110 §10.2.3).
    pub fn fail_next_until_date(&self, status: u16, count: usize, retry_after_secs: u64) {
        self.set_failure(Failure {
            status,
            remaining: Some(count),
            retry_after: Some(retry_after_secs),
            retry_after_as_date: true,
            ..Failure::default()
        });
    }

    /// Answer `429` with `Retry-After: retry_after_secs` for `duration`.
    pub fn rate_limit_for(&self, duration: Duration, retry_after_secs: u64) {
        self.set_failure(Failure {
            status: 429,
            until: Some(Instant::now() + duration),
            retry_after: Some(retry_after_secs),
            ..Failure::default()
        });
    }

    /// Answer redirect `status` (3xx) with a `Location` on this receiver for
    /// `duration`; a delivery that follows it shows up with path `/redirected`.
    pub fn redirect_for(&self, status: u16, duration: Duration) {
        self.set_failure(Failure {
            status,
            until: Some(Instant::now() + duration),
            redirect: true,
            ..Failure::default()
        });
    }

    /// Stops failing.
    pub fn heal(&self) {
        self.shared
            .behaviour
            .lock()
            .expect("behaviour lock")
            .failure = None;
    }

    /// Hold every delivery this long before answering.
    pub fn stall(&self, duration: Option<Duration>) {
        self.shared.behaviour.lock().expect("behaviour lock").stall = duration;
    }

    /// Stops listening: new connections are refused and idle keep-alive
    /// connections are closed (requests in flight are answered first).
    pub async fn go_down(&self) {
        let task = {
            let mut server = self.server.lock().expect("server lock");
            server.stop.cancel();
            server.task.take()
        };
        if let Some(task) = task {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    /// Listens again on the same port after [`Receiver::go_down`].
    pub async fn come_up(&self) {
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("rebind receiver on {}: {e}", self.addr),
            }
        };
        *self.server.lock().expect("server lock") = serve(listener, self.shared.clone());
    }

    /// Once `accepted` deliveries were accepted, hold every further request
    /// (before any stall or failure) until [`Receiver::release`]: a test can then
    /// inject a fault at a known point of a stream of deliveries.
    pub fn hold_after(&self, accepted: usize) {
        self.shared.gate.send_replace(Some(accepted));
    }

    /// Lets held requests go on.
    pub fn release(&self) {
        self.shared.gate.send_replace(None);
    }

    /// Requests being handled right now (arrived, not yet answered).
    /// The ids of every request as it arrived, answered or not.
    pub fn arrived_ids(&self) -> Vec<String> {
        self.shared.arrivals.lock().expect("arrivals lock").clone()
    }

    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Keep only the raw body of each delivery, not the parsed one (it is
    /// still parsed, to count its events); for benchmarks.
    pub fn lean(&self, lean: bool) {
        self.shared.lean.store(lean, Ordering::SeqCst);
    }

    /// Every request received so far, which are then forgotten.
    pub fn take_all(&self) -> Vec<Delivery> {
        std::mem::take(&mut *self.shared.received.lock().expect("received lock"))
    }

    /// Every request received, including refused ones.
    pub fn all(&self) -> Vec<Delivery> {
        self.shared.received.lock().expect("received lock").clone()
    }

    /// Deliveries answered 2xx.
    pub fn accepted(&self) -> Vec<Delivery> {
        self.all()
            .into_iter()
            .filter(Delivery::is_accepted)
            .collect()
    }

    /// How many events were accepted so far (cheap: nothing is copied).
    pub fn accepted_event_count(&self) -> usize {
        let received = self.shared.received.lock().expect("received lock");
        received
            .iter()
            .filter(|d| d.is_accepted())
            .map(|d| d.event_count)
            .sum()
    }

    /// Events of accepted deliveries, in arrival order.
    pub fn accepted_events(&self) -> Vec<Value> {
        self.accepted().iter().flat_map(Delivery::events).collect()
    }

    /// Requests that arrived on the redirect target (a followed redirect).
    pub fn redirected(&self) -> Vec<Delivery> {
        self.all()
            .into_iter()
            .filter(|d| d.path == REDIRECTED_PATH)
            .collect()
    }
}

/// HMAC-SHA256 of the concatenated `parts`, checked in constant time against
/// the base64 `signature`.
fn hmac_matches(key: &[u8], parts: &[&[u8]], signature_b64: &str) -> bool {
    let Ok(signature) = BASE64.decode(signature_b64.trim()) else {
        return false;
    };
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes any key");
    for part in parts {
        mac.update(part);
    }
    mac.verify_slice(&signature).is_ok()
}

/// `Elements-Webhook-Signature: sha256=<base64 HMAC(key, body)>`.
fn elements_signature_ok(key: &[u8], body: &[u8], header: &str) -> bool {
    header
        .strip_prefix("sha256=")
        .is_some_and(|sig| hmac_matches(key, &[body], sig))
}

/// Standard Webhooks: any of the space-separated `v1,<base64>` signatures over
/// `"<id>.<timestamp>.<body>"`.
fn standard_webhooks_ok(key: &[u8], id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    header
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .any(|sig| {
            hmac_matches(
                key,
                &[id.as_bytes(), b".", timestamp.as_bytes(), b".", body],
                sig,
            )
        })
}

async fn receive(
    State(shared): State<Shared>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let arrived = Instant::now();
    let _in_flight = InFlight::enter(&shared.in_flight);
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let path = uri.path().to_owned();
    if path == EVENTS_PATH {
        shared
            .arrivals
            .lock()
            .expect("arrivals lock")
            .push(header("elements-webhook-id").unwrap_or_default());
    }
    let mut gate = shared.gate.subscribe();
    loop {
        let hold = *gate.borrow_and_update();
        let accepted = || {
            shared
                .received
                .lock()
                .expect("received lock")
                .iter()
                .filter(|d| d.is_accepted())
                .count()
        };
        match hold {
            Some(n) if path == EVENTS_PATH && accepted() >= n => {
                if gate.changed().await.is_err() {
                    break;
                }
            }
            _ => break,
        }
    }
    let stall = shared.behaviour.lock().expect("behaviour lock").stall;
    if let Some(stall) = stall
        && path == EVENTS_PATH
    {
        tokio::time::sleep(stall).await;
    }
    // The failure in force, if any (a counted one uses up one request).
    let failure = if path == EVENTS_PATH {
        let mut b = shared.behaviour.lock().expect("behaviour lock");
        let now = Instant::now();
        match b.failure.as_mut() {
            Some(f) if f.until.is_none_or(|t| now < t) && f.remaining.is_none_or(|n| n > 0) => {
                if let Some(n) = f.remaining.as_mut() {
                    *n -= 1;
                }
                Some(*f)
            }
            _ => None,
        }
    } else {
        None
    };
    let status = failure.map_or(200, |f| f.status);
    let event_id = header("elements-webhook-id").unwrap_or_default();
    let (elements_ok, standard_ok) = match &shared.key {
        Some(key) => (
            Some(
                header("elements-webhook-signature")
                    .is_some_and(|sig| elements_signature_ok(key, &body, &sig)),
            ),
            Some(
                match (
                    header("webhook-id"),
                    header("webhook-timestamp"),
                    header("webhook-signature"),
                ) {
                    (Some(id), Some(ts), Some(sig)) => {
                        id == event_id && standard_webhooks_ok(key, &id, &ts, &body, &sig)
                    }
                    _ => false,
                },
            ),
        ),
        None => (None, None),
    };
    let all_headers = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut delivery = Delivery {
        event_id,
        path,
        headers: all_headers,
        content_type: header("content-type").unwrap_or_default(),
        body: parsed,
        raw: body.to_vec(),
        elements_signature_ok: elements_ok,
        standard_webhooks_ok: standard_ok,
        event_count: 0,
        status,
        arrived,
        at: Instant::now(),
    };
    delivery.event_count = delivery.event_array().map_or(0, Vec::len);
    if shared.lean.load(Ordering::SeqCst) {
        delivery.body = Value::Null;
    }
    shared
        .received
        .lock()
        .expect("received lock")
        .push(delivery);
    let mut response = StatusCode::from_u16(status)
        .unwrap_or(StatusCode::OK)
        .into_response();
    if let Some(f) = failure {
        let retry_after = f.retry_after.map(|secs| {
            if f.retry_after_as_date {
                httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(secs))
            } else {
                secs.to_string()
            }
        });
        if let Some(value) = retry_after
            && let Ok(v) = HeaderValue::from_str(&value)
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if f.redirect
            && let Ok(v) = HeaderValue::from_str(&format!("{}{REDIRECTED_PATH}", shared.base))
        {
            response.headers_mut().insert(header::LOCATION, v);
        }
    }
    response
}

/// The state a Dropbox entry describes, as far as order goes: a file version,
/// a folder, or a deletion.
pub fn state_of(entry: &Value) -> String {
    match entry[".tag"].as_str() {
        Some("file") => format!("file {}", entry["rev"].as_str().unwrap_or_default()),
        Some("folder") => format!("folder {}", entry["id"].as_str().unwrap_or_default()),
        Some("deleted") => "deleted".to_owned(),
        other => format!("unknown {other:?}"),
    }
}

/// What the accepted events add up to, against the account's record.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Distinct event ids accepted (UNKNOWN events not counted).
    pub distinct: usize,
    /// Accepted events whose id was accepted before.
    pub duplicates: usize,
    /// Distinct UNKNOWN events.
    pub unknown: usize,
    /// Paths changed whose final state never arrived.
    pub lost: Vec<String>,
    /// Paths whose states arrived out of the order they happened in, or whose
    /// last event is not their final state although that arrived.
    pub out_of_order: Vec<String>,
    /// Events for paths the record never changed.
    pub unexpected: Vec<String>,
    /// Ids (notification or event) seen with different bodies.
    pub id_conflicts: Vec<String>,
}

/// Whether `delivered` (states of one path, in arrival order) could have come
/// from `journal` (the path's states in the order they happened): each one at
/// or after the one before it (a repeat is a duplicate; skipped states were
/// folded by Dropbox).
fn in_order(journal: &[String], delivered: &[String]) -> bool {
    let mut at = 0;
    for d in delivered {
        match journal[at..].iter().position(|j| j == d) {
            Some(i) => at += i,
            None => return false,
        }
    }
    true
}

impl Receiver {
    /// The states of each path (`path_lower`) accepted so far, in arrival
    /// order, each event id once.
    pub fn delivered_states(&self) -> HashMap<String, Vec<String>> {
        let mut seen = std::collections::HashSet::new();
        let mut states: HashMap<String, Vec<String>> = HashMap::new();
        for event in self.accepted_events() {
            if event["eventType"] == "UNKNOWN" {
                continue;
            }
            let id = event["eventId"].as_str().unwrap_or_default().to_owned();
            if !seen.insert(id) {
                continue;
            }
            let path = event["data"]["path_lower"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            states
                .entry(path)
                .or_default()
                .push(state_of(&event["data"]));
        }
        states
    }

    /// Checks what was accepted against the account's change log (`journal`,
    /// in commit order) and `finals` (what is at each path now, by
    /// `path_lower`), for the paths changed at or after journal index `since`.
    pub fn ledger(
        &self,
        journal: &[Value],
        finals: &BTreeMap<String, Value>,
        since: usize,
    ) -> Ledger {
        let mut ledger = Ledger::default();
        // Same id, same body: notifications and events.
        let mut bodies: BTreeMap<String, std::collections::HashSet<Vec<u8>>> = BTreeMap::new();
        for d in self.all() {
            bodies
                .entry(format!("notification {}", d.event_id))
                .or_default()
                .insert(d.raw.clone());
            for e in d.events() {
                if let Some(id) = e["eventId"].as_str() {
                    bodies
                        .entry(format!("event {id}"))
                        .or_default()
                        .insert(e.to_string().into_bytes());
                }
            }
        }
        ledger.id_conflicts = bodies
            .into_iter()
            .filter(|(_, b)| b.len() > 1)
            .map(|(id, _)| id)
            .collect();
        let mut seen = std::collections::HashSet::new();
        let mut unknown = std::collections::HashSet::new();
        for event in self.accepted_events() {
            let id = event["eventId"].as_str().unwrap_or_default().to_owned();
            if event["eventType"] == "UNKNOWN" {
                unknown.insert(id);
            } else if seen.insert(id) {
                ledger.distinct += 1;
            } else {
                ledger.duplicates += 1;
            }
        }
        ledger.unknown = unknown.len();
        let delivered = self.delivered_states();
        let mut history: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut in_scope = std::collections::BTreeSet::new();
        for (i, entry) in journal.iter().enumerate() {
            let path = entry["path_lower"].as_str().unwrap_or_default();
            history.entry(path).or_default().push(state_of(entry));
            if i >= since {
                in_scope.insert(path);
            }
        }
        for path in delivered.keys() {
            if !history.contains_key(path.as_str()) {
                ledger.unexpected.push(path.clone());
            }
        }
        for path in in_scope {
            let states = delivered.get(path).map(Vec::as_slice).unwrap_or_default();
            let final_state = finals.get(path).map(state_of).unwrap_or_default();
            if !in_order(&history[path], states) {
                ledger.out_of_order.push(path.to_owned());
            } else if states.last() != Some(&final_state) {
                if states.contains(&final_state) {
                    ledger.out_of_order.push(path.to_owned());
                } else {
                    ledger.lost.push(path.to_owned());
                }
            }
        }
        ledger
    }
}

/// Waits until `receiver` has accepted at least `count` events; all accepted so far.
pub async fn wait_events(
    receiver: &Receiver,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Value>> {
    super::eventually(
        &format!("{count} delivered events"),
        timeout,
        || async { Ok(receiver.accepted_events()) },
        |events: &Vec<Value>| events.len() >= count,
    )
    .await
}
