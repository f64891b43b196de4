//! Real deliveries, checked with the libraries receivers really use: the official
//! Standard Webhooks libraries and CloudEvents SDKs in Rust, Python and Node.
//!
//! One end-to-end run (control plane, controller, ingress, Dropbox emulator)
//! captures an `elements` and a `cloudevents` delivery signed with a key. Each
//! library then gets the captured raw body and headers, keyed the way docs/user-guide.md tells
//! a receiver to (`whsec_` + base64 of the key): every delivery must be accepted,
//! a tampered body, a wrong key and a timestamp outside the tolerance refused, and
//! the CloudEvents delivery must parse to the attributes docs/user-guide.md documents, with
//! the Standard Webhooks `webhook-id` as its id.
//!
//! The Python and Node packages are pinned in `tests/interop/requirements.txt` and
//! `tests/interop/package-lock.json` and installed by `.ci/run`; nothing is
//! downloaded here, and a missing install fails with the command that fixes it.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use dropbox_operator::api::DropboxElementInstance;
use dropbox_operator::ingress::payload::{CLOUDEVENTS_TYPE, signature_headers};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use support::controlplane::repo_root;
use support::dropbox::Emulator;
use support::operator::OperatorProcess;
use support::receiver::{Delivery, Receiver};

const APP_KEY: &str = "app-key-interop";
const APP_SECRET: &str = "APP-SECRET-1nter0p";
const ACCOUNT: &str = "dbid:AAB-interop-account-0001";
const REDIRECT: &str = "https://www.mycoolapp.com/auth";
/// Not base64, not ASCII, with the characters base64 uses: a library (or a
/// docs/user-guide.md line) that took the key for anything but raw bytes would fail.
const SIGNING_KEY: &str = "interop key: ü/+= not base64!";
const WRONG_KEY: &str = "interop key: ü/+= not base64?";
const GUIDE: &str = include_str!("../docs/user-guide.md");

/// What one library made of one case.
#[derive(Debug, serde::Deserialize)]
struct Outcome {
    accepted: bool,
    error: Option<String>,
    /// The CloudEvent the SDK parsed (CloudEvents cases it accepted).
    event: Option<Value>,
}

/// One input for the libraries: a body, its headers and the key to check with.
#[derive(Debug, serde::Serialize)]
struct Case {
    name: String,
    format: &'static str,
    key: &'static str,
    body_b64: String,
    headers: BTreeMap<String, String>,
}

#[tokio::test]
async fn official_libraries_accept_real_deliveries_and_refuse_forgeries() -> Result<()> {
    // Fail first, and fast, when the pinned packages are not installed.
    let python = python();
    let node_modules = node_modules();

    let (elements, cloudevents, ns) = capture_deliveries().await?;
    let source = format!(
        "/apis/elements.dropbox-operator.dev/v1alpha1/namespaces/{ns}/dropboxelementinstances/ce"
    );
    let cases = [("elements", &elements), ("cloudevents", &cloudevents)]
        .into_iter()
        .flat_map(|(format, d)| cases(format, d))
        .collect::<Vec<_>>();
    let dir = tempfile::tempdir()?;
    let cases_file = dir.path().join("cases.json");
    std::fs::write(&cases_file, serde_json::to_vec(&cases)?)?;

    let results = [
        ("rust", rust_outcomes(&cases)),
        (
            "python",
            script(
                Command::new(&python).arg(repo_root().join("tests/interop/verify.py")),
                &cases_file,
            ),
        ),
        (
            "node",
            script(
                Command::new("node")
                    .arg(repo_root().join("tests/interop/verify.js"))
                    .env("NODE_PATH", &node_modules),
                &cases_file,
            ),
        ),
    ];
    for (language, outcomes) in &results {
        for case in &cases {
            let outcome = outcomes
                .get(&case.name)
                .unwrap_or_else(|| panic!("{language}: no outcome for {}", case.name));
            eprintln!(
                "{language:>6} {:<28} {}",
                case.name,
                match (&outcome.error, &outcome.event) {
                    (Some(error), _) => format!("refused: {error}"),
                    (None, Some(_)) => "accepted, CloudEvent parsed".to_owned(),
                    (None, None) => "accepted".to_owned(),
                }
            );
            judge(language, case, outcome, &cloudevents, &source);
        }
    }
    Ok(())
}

/// Runs the whole stack once and returns the first `elements` and `cloudevents`
/// deliveries (both of the same change), and the namespace.
async fn capture_deliveries() -> Result<(Delivery, Delivery, String)> {
    let client = support::client().await;
    support::install_crd(&client).await?;
    let ns = support::namespace(&client, "interop").await;
    let emu = Emulator::start().await;
    emu.add_app(APP_KEY, APP_SECRET);
    emu.add_account(ACCOUNT, "ada@example.com", "Ada Lovelace");
    let _controller = OperatorProcess::new(&ns, &emu.url)
        .env("ALLOWED_CALLBACK_CIDRS", "127.0.0.0/8")
        .start()
        .await;
    let ingress = OperatorProcess::ingress(&ns, &emu.url)
        .env("ALLOWED_CALLBACK_CIDRS", "127.0.0.0/8")
        .env("HEARTBEAT_INTERVAL", "1s")
        .start()
        .await;
    let secrets = Api::namespaced(client.clone(), &ns);
    support::put_secret(
        &secrets,
        "dropbox-app",
        &[("oauth.api.key", APP_KEY), ("oauth.api.secret", APP_SECRET)],
    )
    .await?;
    support::put_secret(
        &secrets,
        "events-key",
        &[("event.notification.signature.key", SIGNING_KEY)],
    )
    .await?;
    let instances: Api<DropboxElementInstance> = Api::namespaced(client.clone(), &ns);
    let el = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    let ce = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    for (name, receiver, format) in [("el", &el, "elements"), ("ce", &ce, "cloudevents")] {
        let code = emu.issue_code(APP_KEY, ACCOUNT, Some(REDIRECT));
        support::put_secret(&secrets, &format!("{name}-code"), &[("code", &code)]).await?;
        let instance: DropboxElementInstance = serde_json::from_value(json!({
            "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
            "kind": "DropboxElementInstance",
            "metadata": {"name": name},
            "spec": {
                "element": {"key": "dropbox"},
                "name": "Interop Dropbox",
                "tags": ["interop"],
                "authentication": {
                    "type": "oauth2",
                    "appSecretRef": {"name": "dropbox-app"},
                    "codeSecretRef": {"name": format!("{name}-code")},
                    "callbackUrl": REDIRECT
                },
                "events": {
                    "enabled": true,
                    "callbackUrl": receiver.url,
                    "signatureKeySecretRef": {"name": "events-key"},
                    "format": format
                }
            }
        }))?;
        instances.create(&PostParams::default(), &instance).await?;
    }
    for name in ["el", "ce"] {
        support::wait_condition(
            &instances,
            name,
            "Ready",
            "True",
            None,
            Duration::from_secs(60),
        )
        .await?;
    }
    emu.upload(ACCOUNT, "/Reports/Q3 results.pdf", b"numbers");
    let response = emu
        .send_webhook(
            &format!("{}/webhooks/dropbox/{APP_KEY}", ingress.url()),
            APP_KEY,
            &[ACCOUNT],
        )
        .await;
    anyhow::ensure!(response.status() == 200, "webhook: {}", response.status());
    let mut captured = Vec::new();
    for receiver in [&el, &ce] {
        let delivery = support::eventually(
            "a delivery",
            Duration::from_secs(30),
            || async { Ok(receiver.accepted().into_iter().next()) },
            Option::is_some,
        )
        .await?
        .context("delivery")?;
        // The test receiver (the crate's own verifier) agrees, as before.
        assert_eq!(
            (
                delivery.elements_signature_ok,
                delivery.standard_webhooks_ok
            ),
            (Some(true), Some(true))
        );
        captured.push(delivery);
    }
    let cloudevents = captured.pop().context("cloudevents delivery")?;
    let elements = captured.pop().context("elements delivery")?;
    Ok((elements, cloudevents, ns))
}

/// The delivery as captured, plus the forgeries every library must refuse.
fn cases(format: &'static str, d: &Delivery) -> Vec<Case> {
    let headers: BTreeMap<String, String> = d.headers.iter().cloned().collect();
    let case = |suffix: &str, key, body: &[u8], headers: &BTreeMap<String, String>| Case {
        name: format!("{format}{suffix}"),
        format,
        key,
        body_b64: STANDARD.encode(body),
        headers: headers.clone(),
    };
    let body = String::from_utf8(d.raw.clone()).expect("UTF-8 body");
    let tampered = body.replacen(r#""eventType":"UPDATED""#, r#""eventType":"DELETED""#, 1);
    assert_ne!(
        tampered, body,
        "the body has an UPDATED event to tamper with"
    );
    // Correctly signed, but at a time outside the 5 minutes the libraries allow.
    let resigned = |offset: i64| {
        let mut headers = headers.clone();
        let timestamp = jiff::Timestamp::now().as_second() + offset;
        for (name, value) in
            signature_headers(Some(SIGNING_KEY.as_bytes()), &d.event_id, timestamp, &d.raw)
        {
            headers.insert(name.to_ascii_lowercase(), value);
        }
        headers
    };
    vec![
        case("", SIGNING_KEY, &d.raw, &headers),
        case("/tampered-body", SIGNING_KEY, tampered.as_bytes(), &headers),
        case("/wrong-key", WRONG_KEY, &d.raw, &headers),
        case("/stale", SIGNING_KEY, &d.raw, &resigned(-6 * 60)),
        case("/future", SIGNING_KEY, &d.raw, &resigned(6 * 60)),
    ]
}

/// Whether `outcome` is what every library must make of `case`.
fn judge(language: &str, case: &Case, outcome: &Outcome, cloudevents: &Delivery, source: &str) {
    let what = format!("{language}, {}: {outcome:?}", case.name);
    // Error texts differ by library ("Message timestamp too old",
    // TimestampTooOldError): compare letters only.
    let error = outcome
        .error
        .as_deref()
        .unwrap_or_default()
        .to_lowercase()
        .replace(|c: char| !c.is_ascii_alphanumeric(), "");
    let suffix = case.name.split_once('/').map_or("", |(_, s)| s);
    match suffix {
        "" => assert!(
            outcome.accepted && outcome.error.is_none(),
            "refused a real delivery: {what}"
        ),
        "tampered-body" | "wrong-key" => {
            assert!(
                !outcome.accepted && error.contains("signature") && !error.contains("timestamp"),
                "{what}"
            )
        }
        "stale" => assert!(!outcome.accepted && error.contains("tooold"), "{what}"),
        "future" => assert!(
            !outcome.accepted && (error.contains("toonew") || error.contains("future")),
            "{what}"
        ),
        other => panic!("unknown case {other}"),
    }
    if case.name != "cloudevents" {
        assert!(outcome.event.is_none(), "{what}");
        return;
    }
    // The CloudEvent, attribute by attribute, as docs/user-guide.md documents it.
    let event = outcome
        .event
        .as_ref()
        .unwrap_or_else(|| panic!("no event: {what}"));
    let header = |name: &str| {
        case.headers
            .get(name)
            .map(String::as_str)
            .unwrap_or_default()
    };
    assert_eq!(event["specversion"], "1.0", "{what}");
    assert_eq!(event["type"], CLOUDEVENTS_TYPE, "{what}");
    assert_eq!(
        event["type"], "dev.dropbox-operator.elements.dropbox.events",
        "{what}"
    );
    assert_eq!(event["source"], source, "{what}");
    assert_eq!(event["subject"], ACCOUNT, "{what}");
    assert_eq!(
        event["id"],
        header("webhook-id"),
        "the Standard Webhooks id: {what}"
    );
    assert_eq!(event["id"], header("elements-webhook-id"), "{what}");
    assert_eq!(event["datacontenttype"], "application/json", "{what}");
    assert_eq!(header("content-type"), "application/cloudevents+json");
    // `time`: when the notification was made, in any RFC 3339 spelling.
    let time: jiff::Timestamp = event["time"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("time is RFC 3339: {what}"));
    let sent: jiff::Timestamp = cloudevents.body["time"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .expect("body time");
    assert_eq!(time, sent, "{what}");
    let signed_at: i64 = header("webhook-timestamp")
        .parse()
        .expect("webhook-timestamp");
    assert!(
        (time.as_second() - signed_at).abs() <= 60,
        "time is the send time: {what}"
    );
    // `data`: the Elements body, whole.
    assert_eq!(event["data"], cloudevents.body["data"], "{what}");
    let message = &event["data"]["message"];
    assert_eq!(message["eventId"], event["id"], "{what}");
    assert_eq!(message["elementKey"], "dropbox", "{what}");
    assert_eq!(message["accountId"], ACCOUNT, "{what}");
    assert_eq!(message["instanceName"], "Interop Dropbox", "{what}");
    let names: Vec<&str> = message["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter_map(|e| e["data"]["name"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert!(names.contains(&"Q3 results.pdf"), "{what}");
}

// --- Rust: the `standardwebhooks` and `cloudevents-sdk` crates, in process ---

fn rust_outcomes(cases: &[Case]) -> BTreeMap<String, Outcome> {
    cases
        .iter()
        .map(|case| {
            let key = case.key.as_bytes();
            let body = STANDARD.decode(&case.body_b64).expect("base64 body");
            let headers: HeaderMap = case
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        HeaderName::try_from(k.as_str()).expect("header name"),
                        HeaderValue::try_from(v.as_str()).expect("header value"),
                    )
                })
                .collect();
            let outcome = match official_rust(key, body, headers, case.format) {
                Err(e) => Outcome {
                    accepted: false,
                    error: Some(format!("{e:#}")),
                    event: None,
                },
                Ok(event) => Outcome {
                    accepted: true,
                    error: None,
                    event: event.map(attributes),
                },
            };
            (case.name.clone(), outcome)
        })
        .collect()
}

/// What docs/user-guide.md shows a Rust receiver doing, line for line (a test checks).
#[rustfmt::skip]
fn official_rust(key: &[u8], body: Vec<u8>, headers: HeaderMap, format: &str) -> Result<Option<cloudevents::Event>> {
    let webhook = standardwebhooks::Webhook::new(&format!("whsec_{}", STANDARD.encode(key)))?;
    webhook.verify(&body, &headers)?; // refuses a bad signature or timestamp
    if format != "cloudevents" {
        return Ok(None);
    }
    let event = cloudevents::binding::http::to_event(&headers, body)?; // format: cloudevents
    Ok(Some(event))
}

fn attributes(event: cloudevents::Event) -> Value {
    use cloudevents::AttributesReader as _;
    let data = match event.data() {
        Some(cloudevents::Data::Json(json)) => json.clone(),
        other => panic!("data is not JSON: {other:?}"),
    };
    json!({
        "specversion": event.specversion().to_string(),
        "type": event.ty(),
        "source": event.source(),
        "subject": event.subject(),
        "id": event.id(),
        "time": event.time().map(|t| t.to_rfc3339()),
        "datacontenttype": event.datacontenttype(),
        "data": data,
    })
}

// --- Python and Node: tests/interop/verify.{py,js} over the pinned packages ---

/// The interpreter of the venv `.ci/run` installs the pinned packages into
/// (`$INTEROP_PYTHON` overrides it).
fn python() -> PathBuf {
    let python = std::env::var_os("INTEROP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/interop/venv/bin/python"));
    let probe = Command::new(&python)
        .args([
            "-c",
            "import standardwebhooks, cloudevents.core.bindings.http",
        ])
        .output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "the pinned Python packages are not installed at {}; install them (as .ci/run does):\n  \
         python3 -m venv target/interop/venv && target/interop/venv/bin/pip install -r tests/interop/requirements.txt\n{probe:?}",
        python.display()
    );
    python
}

fn node_modules() -> PathBuf {
    let dir = repo_root().join("tests/interop/node_modules");
    assert!(
        ["standardwebhooks", "cloudevents"]
            .iter()
            .all(|p| dir.join(p).join("package.json").is_file()),
        "the pinned Node packages are not installed in {}; install them (as .ci/run does):\n  \
         npm ci --prefix tests/interop",
        dir.display()
    );
    dir
}

/// Runs a checker script on the cases file and reads its JSON outcomes.
fn script(command: &mut Command, cases: &std::path::Path) -> BTreeMap<String, Outcome> {
    let out = command.arg(cases).output().expect("run the checker script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{command:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{command:?} printed {stdout}: {e}"))
}

// --- docs/user-guide.md shows exactly the lines used here ---

/// The first fenced block of `lang` after the line `label` in docs/user-guide.md.
fn readme_snippet(label: &str, lang: &str) -> &'static str {
    let start = GUIDE
        .find(label)
        .unwrap_or_else(|| panic!("docs/user-guide.md has no {label:?}"));
    let fence = format!("```{lang}\n");
    let body = &GUIDE[start..];
    let open = body.find(&fence).expect("code block") + fence.len();
    let close = body[open..].find("```").expect("closing fence");
    &body[open..open + close]
}

#[test]
fn user_guide_shows_the_official_library_lines_these_tests_run() {
    for (label, lang, source) in [
        (
            "Python, official libraries",
            "python",
            include_str!("interop/verify.py"),
        ),
        (
            "Node, official libraries",
            "js",
            include_str!("interop/verify.js"),
        ),
        (
            "Rust, official libraries",
            "rust",
            include_str!("interop.rs"),
        ),
    ] {
        let snippet = readme_snippet(label, lang);
        for line in snippet.lines().map(str::trim).filter(|l| !l.is_empty()) {
            assert!(
                source.lines().any(|l| l.trim() == line),
                "docs/user-guide.md's {label:?} line is not what the test runs: {line}"
            );
        }
    }
}
