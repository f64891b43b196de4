//! A callback receiver, as an application would run one: records every delivery
//! and verifies both signature schemes (Elements-Webhook-Signature and Standard
//! Webhooks). It can fail or stall on demand.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use dropbox_operator::ingress::payload::{verify_elements_signature, verify_standard_webhooks};
use serde_json::Value;

/// One delivery as received.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub event_id: String,
    /// Request headers (names lower-cased).
    pub headers: Vec<(String, String)>,
    pub content_type: String,
    pub body: Value,
    pub raw: Vec<u8>,
    /// Both signatures verified with the key (None when no key was expected).
    pub elements_signature_ok: Option<bool>,
    pub standard_webhooks_ok: Option<bool>,
    pub status: u16,
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
}

#[derive(Default)]
struct Behaviour {
    fail_status: Option<u16>,
    fail_until: Option<Instant>,
    stall: Option<Duration>,
}

#[derive(Clone)]
struct Shared {
    key: Option<Vec<u8>>,
    received: Arc<Mutex<Vec<Delivery>>>,
    behaviour: Arc<Mutex<Behaviour>>,
}

pub struct Receiver {
    pub url: String,
    shared: Shared,
    server: tokio::task::AbortHandle,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Receiver {
    /// Starts a receiver on 127.0.0.1 that expects deliveries signed with `key`.
    pub async fn start(key: Option<&[u8]>) -> Receiver {
        let shared = Shared {
            key: key.map(<[u8]>::to_vec),
            received: Arc::default(),
            behaviour: Arc::default(),
        };
        let app = Router::new()
            .route("/events", post(receive))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let url = format!(
            "http://{}/events",
            listener.local_addr().expect("receiver address")
        );
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })
        .abort_handle();
        Receiver {
            url,
            shared,
            server,
        }
    }

    /// Answer `status` to every delivery for `duration`.
    pub fn fail_for(&self, status: u16, duration: Duration) {
        let mut b = self.shared.behaviour.lock().expect("behaviour lock");
        b.fail_status = Some(status);
        b.fail_until = Some(Instant::now() + duration);
    }

    /// Hold every delivery this long before answering.
    pub fn stall(&self, duration: Option<Duration>) {
        self.shared.behaviour.lock().expect("behaviour lock").stall = duration;
    }

    /// Every request received, including refused ones.
    pub fn all(&self) -> Vec<Delivery> {
        self.shared.received.lock().expect("received lock").clone()
    }

    /// Deliveries answered 2xx.
    pub fn accepted(&self) -> Vec<Delivery> {
        self.all().into_iter().filter(|d| d.status < 300).collect()
    }

    /// How many events were accepted so far (cheap: nothing is copied).
    pub fn accepted_event_count(&self) -> usize {
        let received = self.shared.received.lock().expect("received lock");
        received
            .iter()
            .filter(|d| d.status < 300)
            .map(|d| d.event_array().map_or(0, Vec::len))
            .sum()
    }

    /// Events of accepted deliveries, in arrival order.
    pub fn accepted_events(&self) -> Vec<Value> {
        self.accepted().iter().flat_map(Delivery::events).collect()
    }
}

async fn receive(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let stall = shared.behaviour.lock().expect("behaviour lock").stall;
    if let Some(stall) = stall {
        tokio::time::sleep(stall).await;
    }
    let status = {
        let b = shared.behaviour.lock().expect("behaviour lock");
        match (b.fail_status, b.fail_until) {
            (Some(s), Some(until)) if Instant::now() < until => s,
            _ => 200,
        }
    };
    let event_id = header("elements-webhook-id").unwrap_or_default();
    let (elements_ok, standard_ok) = match &shared.key {
        Some(key) => (
            Some(
                header("elements-webhook-signature")
                    .is_some_and(|sig| verify_elements_signature(key, &body, &sig)),
            ),
            Some(
                match (
                    header("webhook-id"),
                    header("webhook-timestamp"),
                    header("webhook-signature"),
                ) {
                    (Some(id), Some(ts), Some(sig)) => {
                        id == event_id && verify_standard_webhooks(key, &id, &ts, &body, &sig)
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
    shared
        .received
        .lock()
        .expect("received lock")
        .push(Delivery {
            event_id,
            headers: all_headers,
            content_type: header("content-type").unwrap_or_default(),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            raw: body.to_vec(),
            elements_signature_ok: elements_ok,
            standard_webhooks_ok: standard_ok,
            status,
            at: Instant::now(),
        });
    StatusCode::from_u16(status).unwrap_or(StatusCode::OK)
}
