//! The attack suite: hostile traffic against the real ingress process, on a
//! real control plane, with two tenants sharing one Dropbox app key
//! (docs/architecture.md, "Hostile traffic" and "Tenant isolation").
//!
//! Everything runs in a network namespace of its own (see support::netns), so a
//! callback the ingress wrongly let through to an internal address goes nowhere.
//! At the end a table is printed: attack | tries | refused | let through. Every
//! "let through" must be 0; a control delivery at the end proves the victim's
//! receiver would have seen anything that got through.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use dropbox_operator::api::DropboxElementInstance;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::dropbox::{Emulator, hmac_sha256};
use support::operator::{OperatorProcess, Process};
use support::receiver::Receiver;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP_KEY: &str = "shared-app-key";
const APP_SECRET: &str = "VICTIM-APP-SECRET-7f3a";
const ATTACKER_SECRET: &str = "ATTACKER-APP-SECRET-91cc";
const OTHER_APP: &str = "other-app-key";
const OTHER_SECRET: &str = "OTHER-APP-SECRET-55ab";
const VICTIM: &str = "dbid:AAV-victim-000000000001";
const ATTACKER: &str = "dbid:AAA-attacker-0000000002";
const SSRF_ACCOUNT: &str = "dbid:AAS-ssrf-000000000003";
const SIGNING_KEY: &str = "victim-callback-signing-key";
const REDIRECT: &str = "https://www.mycoolapp.com/auth";
const USERINFO_SECRET: &str = "hunter2-userinfo-pass";
const CAPABILITY: &str = "capability-token-4b1d";

#[derive(Debug)]
struct Row {
    attack: String,
    tries: usize,
    refused: usize,
    let_through: usize,
}

#[test]
fn attacks_on_the_ingress_are_refused() {
    if !support::netns::inside() {
        support::netns::rerun_isolated("attacks_on_the_ingress_are_refused");
        return;
    }
    support::run_blocking(run());
}

struct World {
    client: Client,
    emu: Emulator,
    /// The operator's namespace.
    ops: String,
    attacker_ns: String,
    controller: Process,
    /// Allows loopback callbacks (the tenants' receivers).
    ingress: Process,
    /// Allows nothing extra and denies 93.184.216.0/24: the SSRF target.
    strict: Process,
    victim_rx: Receiver,
    attacker_rx: Receiver,
    other_rx: Receiver,
    /// The victim instance's uid (the peer endpoint is told instance uids).
    victim_uid: String,
}

async fn secret(client: &Client, ns: &str, name: &str, data: &[(&str, &str)]) -> Result<()> {
    support::put_secret(&Api::namespaced(client.clone(), ns), name, data).await
}

async fn create(client: &Client, ns: &str, manifest: Value) -> Result<()> {
    let instance: DropboxElementInstance = serde_json::from_value(manifest)?;
    Api::<DropboxElementInstance>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &instance)
        .await?;
    Ok(())
}

/// An apiKey instance of `app_secret_name`'s app with events to `callback`.
fn api_key_instance(
    name: &str,
    app_secret_name: &str,
    token_secret: &str,
    callback: &str,
) -> Value {
    json!({
        "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
        "kind": "DropboxElementInstance",
        "metadata": {"name": name},
        "spec": {
            "element": {"key": "dropbox"},
            "authentication": {
                "type": "apiKey",
                "apiKeySecretRef": {"name": token_secret},
                "appSecretRef": {"name": app_secret_name}
            },
            "events": {"enabled": true, "callbackUrl": callback}
        }
    })
}

async fn setup() -> Result<World> {
    let client = support::client().await;
    support::install_crd(&client).await?;
    let ops = support::namespace(&client, "attack-ops").await;
    let victim_ns = support::namespace(&client, "victim").await;
    let attacker_ns = support::namespace(&client, "attacker").await;
    let emu = Emulator::start().await;
    emu.add_app(APP_KEY, APP_SECRET);
    emu.add_app(OTHER_APP, OTHER_SECRET);
    emu.add_account(VICTIM, "victim@example.com", "Victim");
    emu.add_account(ATTACKER, "mallory@example.com", "Mallory");
    emu.add_account(SSRF_ACCOUNT, "ssrf@example.com", "SSRF");

    // One operator for every namespace; its objects live in `ops`.
    let controller = OperatorProcess::new(&ops, &emu.url)
        .env_remove("WATCH_NAMESPACE")
        .start()
        .await;
    let ingress_base = |name: &str| {
        OperatorProcess::ingress(&ops, &emu.url)
            .env_remove("WATCH_NAMESPACE")
            .env("HEARTBEAT_INTERVAL", "1s")
            .env("DELIVERY_BASE_BACKOFF", "100ms")
            .env("DELIVERY_MAX_BACKOFF", "400ms")
            .env("WEBHOOK_BODY_TIMEOUT", "1s")
            // Only webhooks start syncs during the attacks (the start-up and
            // membership syncs are over before they begin).
            .env("RESYNC_INTERVAL", "1h")
            .name(name)
    };

    let victim_rx = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    let attacker_rx = Receiver::start(None).await;
    let other_rx = Receiver::start(None).await;

    // The victim: oauth2 with the app's real secret.
    secret(
        &client,
        &victim_ns,
        "dropbox-app",
        &[("oauth.api.key", APP_KEY), ("oauth.api.secret", APP_SECRET)],
    )
    .await?;
    secret(
        &client,
        &victim_ns,
        "events-key",
        &[("event.notification.signature.key", SIGNING_KEY)],
    )
    .await?;
    let code = emu.issue_code(APP_KEY, VICTIM, Some(REDIRECT));
    secret(&client, &victim_ns, "victim-code", &[("code", &code)]).await?;
    create(
        &client,
        &victim_ns,
        json!({
            "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
            "kind": "DropboxElementInstance",
            "metadata": {"name": "victim"},
            "spec": {
                "element": {"key": "dropbox"},
                "authentication": {
                    "type": "oauth2",
                    "appSecretRef": {"name": "dropbox-app"},
                    "codeSecretRef": {"name": "victim-code"},
                    "callbackUrl": REDIRECT
                },
                "events": {"enabled": true, "callbackUrl": victim_rx.url,
                           "signatureKeySecretRef": {"name": "events-key"}}
            }
        }),
    )
    .await?;

    // The attacker: the same app key with a secret of its own choosing (apiKey
    // instances need no working app secret to be authorized).
    secret(
        &client,
        &attacker_ns,
        "fake-app",
        &[
            ("oauth.api.key", APP_KEY),
            ("oauth.api.secret", ATTACKER_SECRET),
        ],
    )
    .await?;
    let token = emu.issue_long_lived_token(APP_KEY, ATTACKER);
    secret(
        &client,
        &attacker_ns,
        "attacker-token",
        &[("apiKey", &token)],
    )
    .await?;
    create(
        &client,
        &attacker_ns,
        api_key_instance("attacker", "fake-app", "attacker-token", &attacker_rx.url),
    )
    .await?;
    // Another app, to replay the victim's notifications against.
    secret(
        &client,
        &attacker_ns,
        "other-app",
        &[
            ("oauth.api.key", OTHER_APP),
            ("oauth.api.secret", OTHER_SECRET),
        ],
    )
    .await?;
    let token = emu.issue_long_lived_token(OTHER_APP, ATTACKER);
    secret(&client, &attacker_ns, "other-token", &[("apiKey", &token)]).await?;
    create(
        &client,
        &attacker_ns,
        api_key_instance("other", "other-app", "other-token", &other_rx.url),
    )
    .await?;
    // The SSRF instance: its callback URL is what the attacks change.
    let token = emu.issue_long_lived_token(APP_KEY, SSRF_ACCOUNT);
    secret(&client, &attacker_ns, "ssrf-token", &[("apiKey", &token)]).await?;
    create(
        &client,
        &attacker_ns,
        api_key_instance("ssrf", "fake-app", "ssrf-token", &attacker_rx.url),
    )
    .await?;

    // One replica delivers each instance (rendezvous hashing over the live
    // replicas' ids): pod names for which the permissive ingress delivers the
    // tenants' instances and the strict one the SSRF instance (row 10). Hand-offs
    // route every webhook to the owner, whichever replica it reaches.
    let mut uids = Vec::new();
    for (ns, name) in [
        (&victim_ns, "victim"),
        (&attacker_ns, "attacker"),
        (&attacker_ns, "other"),
        (&attacker_ns, "ssrf"),
    ] {
        let instance = Api::<DropboxElementInstance>::namespaced(client.clone(), ns)
            .get(name)
            .await?;
        uids.push((name, instance.metadata.uid.context("uid")?));
    }
    let id = |pod: &str| {
        dropbox_operator::contract::replica_id(&dropbox_operator::contract::heartbeat_key(pod))
    };
    let (ingress_pod, strict_pod) = (0..100_000)
        .map(|k| {
            (
                format!("attacks-ingress-{k}"),
                format!("attacks-strict-{k}"),
            )
        })
        .find(|(permissive, strict)| {
            let view = [id(permissive), id(strict)];
            uids.iter().all(|(name, uid)| {
                let wanted = if *name == "ssrf" { strict } else { permissive };
                dropbox_operator::ingress::membership::owner(&view, uid)
                    == Some(id(wanted).as_str())
            })
        })
        .context("no pod names with the wanted owners")?;
    let victim_uid = uids[0].1.clone();
    let ingress = ingress_base("ingress")
        .env("POD_NAME", &ingress_pod)
        .env("ALLOWED_CALLBACK_CIDRS", "127.0.0.0/8,::1/128")
        .start()
        .await;
    let strict = ingress_base("strict")
        .env("POD_NAME", &strict_pod)
        .env("ALLOWED_CALLBACK_CIDRS", "")
        .env("DENIED_CALLBACK_CIDRS", "93.184.216.0/24")
        .start()
        .await;

    for (ns, name) in [
        (&victim_ns, "victim"),
        (&attacker_ns, "attacker"),
        (&attacker_ns, "other"),
        (&attacker_ns, "ssrf"),
    ] {
        support::wait_condition(
            &Api::namespaced(client.clone(), ns),
            name,
            "Ready",
            "True",
            None,
            Duration::from_secs(90),
        )
        .await?;
    }
    Ok(World {
        client,
        emu,
        ops,
        attacker_ns,
        controller,
        ingress,
        strict,
        victim_rx,
        attacker_rx,
        other_rx,
        victim_uid,
    })
}

fn hook(ingress: &Process, app_key: &str) -> String {
    format!("{}/webhooks/dropbox/{app_key}", ingress.url())
}

fn notification(accounts: &[&str]) -> String {
    json!({"list_folder": {"accounts": accounts}, "delta": {"users": [1, 2, 3]}}).to_string()
}

fn sign(secret: &str, body: &str) -> String {
    hex::encode(hmac_sha256(secret.as_bytes(), body.as_bytes()))
}

/// POSTs `body` with `signature` to `url` `tries` times (16 in flight); returns
/// how many answers had status `expected`.
async fn post_many(
    url: &str,
    body: &str,
    signature: Option<&str>,
    tries: usize,
    expected: u16,
) -> usize {
    post_many_with(url, body, signature, &[], tries, expected).await
}

/// [`post_many`] with extra request headers.
async fn post_many_with(
    url: &str,
    body: &str,
    signature: Option<&str>,
    headers: &[(&'static str, String)],
    tries: usize,
    expected: u16,
) -> usize {
    let http = support::dropbox::http_client();
    let ok = Arc::new(AtomicUsize::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::with_capacity(tries);
    for _ in 0..tries {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let (http, ok, url, body) = (http.clone(), ok.clone(), url.to_owned(), body.to_owned());
        let signature = signature.map(str::to_owned);
        let headers = headers.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut req = http.post(&url).body(body);
            if let Some(s) = signature {
                req = req.header("X-Dropbox-Signature", s);
            }
            for (name, value) in headers {
                req = req.header(name, value);
            }
            if let Ok(r) = req.send().await
                && r.status().as_u16() == expected
            {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    ok.load(Ordering::Relaxed)
}

/// Sends raw bytes on a fresh connection and returns the status code of the
/// answer (None when none came within `wait`) and how long it took.
async fn raw_request(addr: &str, request: &[u8], wait: Duration) -> (Option<u16>, Duration) {
    let start = Instant::now();
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return (None, start.elapsed());
    };
    if stream.write_all(request).await.is_err() {
        return (None, start.elapsed());
    }
    let mut buf = vec![0u8; 1024];
    let read = tokio::time::timeout(wait, stream.read(&mut buf)).await;
    let status = match read {
        Ok(Ok(n)) if n > 12 => std::str::from_utf8(&buf[9..12])
            .ok()
            .and_then(|s| s.parse().ok()),
        _ => None,
    };
    (status, start.elapsed())
}

fn addr_of(process: &Process) -> String {
    format!("127.0.0.1:{}", process.listen_port)
}

async fn metric(process: &Process, name: &str, labels: &str) -> usize {
    process.metric_sum(name, labels).await as usize
}

async fn run() -> Result<()> {
    let mut w = setup().await?;
    let mut rows: Vec<Row> = Vec::new();
    // The ingresses' own syncs (at start, when the second replica appeared) are
    // done: from here on only a webhook can start one.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let victim_calls = || w.emu.calls_to("/2/files/list_folder/continue").len();
    let calls_before = victim_calls();
    let delivered_before = w.victim_rx.all().len();
    // Something to deliver: anything that triggers the victim shows up at its receiver.
    w.emu.upload(VICTIM, "/payroll.xlsx", b"private");
    let victim_url = hook(&w.ingress, APP_KEY);

    // 1. Forged signatures.
    let body = notification(&[VICTIM]);
    let tries = 50;
    let forged = hex::encode(rand::random::<[u8; 32]>());
    let refused = post_many(&victim_url, &body, Some(&forged), tries, 403).await;
    rows.push(Row {
        attack: "forged signature (random HMAC), victim's account".into(),
        tries,
        refused,
        let_through: tries - refused,
    });

    // 2. Signed with another tenant's app secret, listing the victim's account.
    let refused = post_many(
        &victim_url,
        &body,
        Some(&sign(ATTACKER_SECRET, &body)),
        tries,
        403,
    )
    .await;
    rows.push(Row {
        attack: "signature of another tenant (same app key), victim's account".into(),
        tries,
        refused,
        let_through: tries - refused,
    });

    // 3. A genuine notification replayed against another app key / an unknown one.
    // The replayed body names an account that an instance of the other app
    // has (the attacker's, which both apps are connected to), with something
    // to deliver: only the signature check stands between the replay and a
    // delivery to that instance's receiver.
    let genuine = sign(APP_SECRET, &body);
    let tries = 20;
    w.emu.upload(ATTACKER, "/replayed.txt", b"r");
    let replay = notification(&[ATTACKER]);
    let other_before = w.other_rx.all().len();
    let refused = post_many(
        &hook(&w.ingress, OTHER_APP),
        &replay,
        Some(&sign(APP_SECRET, &replay)),
        tries,
        403,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let delivered = w.other_rx.all().len() - other_before;
    rows.push(Row {
        attack: "genuine body replayed with another app key (an account it has)".into(),
        tries,
        refused,
        let_through: tries - refused + delivered,
    });
    let refused = post_many(
        &hook(&w.ingress, "no-such-app"),
        &body,
        Some(&genuine),
        tries,
        404,
    )
    .await;
    rows.push(Row {
        attack: "genuine body replayed with an unknown app key".into(),
        tries,
        refused,
        let_through: tries - refused,
    });

    // 4. Missing or malformed signatures are refused before the body is read: the
    // answer comes although the body never does.
    let tries = 10;
    let mut refused = 0;
    for header in [
        "",
        "X-Dropbox-Signature: not-hex\r\n",
        "X-Dropbox-Signature: abcd\r\n",
    ] {
        for _ in 0..tries {
            let req = format!(
                "POST /webhooks/dropbox/{APP_KEY} HTTP/1.1\r\nHost: x\r\n{header}Content-Length: 5000\r\n\r\n"
            );
            let (status, took) =
                raw_request(&addr_of(&w.ingress), req.as_bytes(), Duration::from_secs(5)).await;
            if status == Some(403) && took < Duration::from_millis(900) {
                refused += 1;
            }
        }
    }
    rows.push(Row {
        attack: "missing/malformed signature (answered before the body)".into(),
        tries: 3 * tries,
        refused,
        let_through: 3 * tries - refused,
    });

    // 5. Bodies over 1 MiB, declared and chunked.
    let big = " ".repeat(1024 * 1024 + 1);
    let tries = 5;
    // Refused before the body is read, and the connection closed: a client still
    // writing its megabyte may see the reset rather than the 413. What counts is
    // that the ingress refused each one (its too_large count) and answered none 2xx.
    let too_large = || metric(&w.ingress, "dropbox_ingress_webhooks_total", "too_large");
    let before = too_large().await;
    let answered_413 = post_many(&victim_url, &big, Some(&genuine), tries, 413).await;
    let refused = too_large().await - before;
    rows.push(Row {
        attack: format!(
            "body over 1 MiB (Content-Length; {answered_413} saw the 413 before the reset)"
        ),
        tries,
        refused,
        let_through: tries.saturating_sub(refused),
    });
    let mut refused = 0;
    for _ in 0..tries {
        let mut req = format!(
            "POST /webhooks/dropbox/{APP_KEY} HTTP/1.1\r\nHost: x\r\nX-Dropbox-Signature: {genuine}\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .into_bytes();
        for _ in 0..17 {
            req.extend_from_slice(format!("{:x}\r\n", 65536).as_bytes());
            req.extend(std::iter::repeat_n(b' ', 65536));
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"0\r\n\r\n");
        let (status, _) = raw_request(&addr_of(&w.ingress), &req, Duration::from_secs(5)).await;
        if status == Some(413) {
            refused += 1;
        }
    }
    rows.push(Row {
        attack: "body over 1 MiB (chunked, no length)".into(),
        tries,
        refused,
        let_through: tries - refused,
    });

    // 6. Stalled uploads: cut off at the body deadline (1 s here).
    let tries = 8;
    let stalled: Vec<_> = (0..tries)
        .map(|_| {
            let addr = addr_of(&w.ingress);
            let req = format!(
                "POST /webhooks/dropbox/{APP_KEY} HTTP/1.1\r\nHost: x\r\nX-Dropbox-Signature: {genuine}\r\nContent-Length: 4096\r\n\r\n{{\"list"
            );
            tokio::spawn(async move { raw_request(&addr, req.as_bytes(), Duration::from_secs(6)).await })
        })
        .collect();
    let mut refused = 0;
    for t in stalled {
        if let Ok((Some(408), took)) = t.await
            && took < Duration::from_secs(4)
        {
            refused += 1;
        }
    }
    rows.push(Row {
        attack: "stalled body (cut off at the body deadline)".into(),
        tries,
        refused,
        let_through: tries - refused,
    });

    // 7. Ten thousand app keys nobody uses: 404 without reading a body or a Secret.
    let reads_before = metric(&w.ingress, "dropbox_ingress_secret_reads_total", "").await;
    let http = support::dropbox::http_client();
    let tries = 10_000;
    let not_found = Arc::new(AtomicUsize::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::new();
    for i in 0..tries {
        let permit = sem.clone().acquire_owned().await?;
        let (http, not_found) = (http.clone(), not_found.clone());
        let url = hook(&w.ingress, &format!("bogus-app-{i}"));
        let (body, sig) = (body.clone(), genuine.clone());
        tasks.push(tokio::spawn(async move {
            if let Ok(r) = http
                .post(url)
                .header("X-Dropbox-Signature", sig)
                .body(body)
                .send()
                .await
                && r.status() == 404
            {
                not_found.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let refused = not_found.load(Ordering::Relaxed);
    let reads = metric(&w.ingress, "dropbox_ingress_secret_reads_total", "").await - reads_before;
    rows.push(Row {
        attack: "10,000 bogus app keys (404, no Secret read)".into(),
        tries,
        refused,
        let_through: tries - refused + reads,
    });

    // 8. A flood of badly signed webhooks for a real account: forced Secret
    // re-reads are single-flight and at most one per 5 s per Secret.
    let reads_before = metric(&w.ingress, "dropbox_ingress_secret_reads_total", "").await;
    let tries = 300;
    let started = Instant::now();
    let refused = post_many(&victim_url, &body, Some(&forged), tries, 403).await;
    let allowed_reads = 1 + (started.elapsed().as_secs() / 5) as usize;
    let reads = metric(&w.ingress, "dropbox_ingress_secret_reads_total", "").await - reads_before;
    rows.push(Row {
        attack: format!(
            "flood of bad signatures ({reads} Secret re-reads, at most {allowed_reads} allowed)"
        ),
        tries,
        refused,
        let_through: tries - refused + reads.saturating_sub(allowed_reads),
    });

    // 8b. The peer endpoint (hand-offs between replicas; not behind the public
    // Service) reached directly, naming the victim's instance: it verifies the
    // signature with that instance's own app secret, as the public port does.
    let peer_url = format!(
        "http://127.0.0.1:{}{}{APP_KEY}",
        w.ingress.peer_port,
        dropbox_operator::ingress::handoff::PEER_PREFIX
    );
    let named = [(
        dropbox_operator::ingress::handoff::INSTANCES_HEADER,
        w.victim_uid.clone(),
    )];
    let tries = 20;
    for (attack, signature) in [
        (
            "peer endpoint: forged signature, victim's instance named",
            forged.clone(),
        ),
        (
            "peer endpoint: another tenant's signature, victim's instance named",
            sign(ATTACKER_SECRET, &body),
        ),
    ] {
        let refused = post_many_with(&peer_url, &body, Some(&signature), &named, tries, 403).await;
        rows.push(Row {
            attack: attack.into(),
            tries,
            refused,
            let_through: tries - refused,
        });
    }

    // Nothing of the above reached the victim.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leaked = (w.victim_rx.all().len() - delivered_before) + (victim_calls() - calls_before);
    rows.push(Row {
        attack: "victim deliveries or Dropbox calls caused by rows 1-8b".into(),
        tries: 1,
        refused: usize::from(leaked == 0),
        let_through: leaked,
    });

    // 9. A genuine notification listing the victim's and the attacker's accounts:
    // the victim receives it with only its own account in `raw`; the attacker's
    // instance (whose secret did not sign it) is not triggered.
    let attacker_calls_before = w.attacker_rx.all().len();
    w.emu.upload(ATTACKER, "/mallory.txt", b"x");
    let both = notification(&[VICTIM, ATTACKER]);
    let r = http
        .post(&victim_url)
        .header("X-Dropbox-Signature", sign(APP_SECRET, &both))
        .body(both)
        .send()
        .await?;
    ensure!(
        r.status() == 200,
        "a genuine notification was refused: {}",
        r.status()
    );
    let delivered = support::eventually(
        "the control delivery to the victim",
        Duration::from_secs(30),
        || async { Ok(w.victim_rx.accepted()) },
        |d: &Vec<_>| d.len() > delivered_before,
    )
    .await?;
    let raw = &delivered[delivered.len() - 1].body["message"]["raw"];
    let foreign = usize::from(raw != &json!({"list_folder": {"accounts": [VICTIM]}}));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let attacker_triggered = w.attacker_rx.all().len() - attacker_calls_before;
    rows.push(Row {
        attack: "another tenant's account in a forwarded notification".into(),
        tries: 1,
        refused: 1 - foreign,
        let_through: foreign,
    });
    rows.push(Row {
        attack: "instance triggered by a notification its own secret did not sign".into(),
        tries: 1,
        refused: usize::from(attacker_triggered == 0),
        let_through: attacker_triggered,
    });

    // 10. SSRF: callback URLs pointing inside, refused by the strict ingress at
    // connection time. A leak would hit the loopback listener or fail as
    // unreachable (nothing but loopback exists in this namespace).
    let hits = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let v6listener = tokio::net::TcpListener::bind("[::1]:0").await.ok();
    let v6port = v6listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.port())
        .unwrap_or(port);
    for l in std::iter::once(listener).chain(v6listener) {
        let hits = hits.clone();
        tokio::spawn(async move {
            while let Ok((_s, _)) = l.accept().await {
                hits.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    // Each case with the kind of range the refusal must report (our own
    // reading of the address registries, not the ingress's table).
    let cases: Vec<(String, &str, &str)> = vec![
        (
            format!("http://127.0.0.1:{port}/"),
            "loopback (IPv4)",
            "loopback",
        ),
        (
            format!("http://[::1]:{v6port}/"),
            "loopback (IPv6)",
            "loopback",
        ),
        (
            format!("http://localhost:{port}/"),
            "DNS name resolving to loopback",
            "loopback",
        ),
        (
            format!("http://2130706433:{port}/"),
            "decimal IPv4 spelling of 127.0.0.1",
            "loopback",
        ),
        (
            format!("http://0x7f000001:{port}/"),
            "hex IPv4 spelling of 127.0.0.1",
            "loopback",
        ),
        (
            format!("http://0177.0.0.1:{port}/"),
            "octal IPv4 spelling of 127.0.0.1",
            "loopback",
        ),
        (
            format!("http://127.1:{port}/"),
            "short IPv4 spelling of 127.0.0.1",
            "loopback",
        ),
        (
            format!("http://[::ffff:127.0.0.1]:{port}/"),
            "IPv4-mapped IPv6 loopback",
            "loopback",
        ),
        (
            "http://[::ffff:169.254.169.254]/".into(),
            "IPv4-mapped metadata address",
            "link-local",
        ),
        (
            "http://[64:ff9b::a9fe:a9fe]/".into(),
            "NAT64 of 169.254.169.254",
            "link-local",
        ),
        (
            format!("http://[64:ff9b::7f00:1]:{port}/"),
            "NAT64 of 127.0.0.1",
            "loopback",
        ),
        (
            "http://[2002:a9fe:a9fe::1]/".into(),
            "6to4 of 169.254.169.254",
            "link-local",
        ),
        (
            format!("http://[2002:7f00:1::1]:{port}/"),
            "6to4 of 127.0.0.1",
            "loopback",
        ),
        (
            "http://169.254.169.254/latest/meta-data/".into(),
            "link-local (cloud metadata)",
            "link-local",
        ),
        (
            "http://[fe80::1]/".into(),
            "link-local (IPv6)",
            "link-local",
        ),
        ("http://10.0.0.1/".into(), "private 10/8", "private"),
        ("http://172.16.0.1/".into(), "private 172.16/12", "private"),
        (
            "http://192.168.1.1/".into(),
            "private 192.168/16",
            "private",
        ),
        (
            "http://[fd00::1]/".into(),
            "unique local (IPv6)",
            "unique local",
        ),
        (
            "http://100.64.0.1/".into(),
            "CGNAT 100.64/10",
            "shared address space (CGNAT)",
        ),
        (
            format!("http://0.0.0.0:{port}/"),
            "unspecified (IPv4)",
            "unspecified",
        ),
        (
            format!("http://[::]:{v6port}/"),
            "unspecified (IPv6)",
            "unspecified",
        ),
        ("http://224.0.0.1/".into(), "multicast (IPv4)", "multicast"),
        ("http://[ff02::1]/".into(), "multicast (IPv6)", "multicast"),
        ("http://240.0.0.1/".into(), "reserved 240/4", "reserved"),
        ("http://255.255.255.255/".into(), "broadcast", "broadcast"),
        (
            "http://192.88.99.1/".into(),
            "6to4 relay anycast 192.88.99/24",
            "6to4 relay anycast (deprecated)",
        ),
        (
            "http://[2001::1]/".into(),
            "Teredo / IETF 2001::/23",
            "IETF protocol assignments (incl. Teredo)",
        ),
        (
            "http://[2001:db8::1]/".into(),
            "documentation (IPv6)",
            "documentation",
        ),
        (
            "http://198.18.0.1/".into(),
            "benchmarking 198.18/15",
            "benchmarking",
        ),
        (
            "http://93.184.216.34/".into(),
            "public, but in deniedCallbackCIDRs",
            "denied by the operator's configuration",
        ),
    ];
    let instances: Api<DropboxElementInstance> = Api::namespaced(w.client.clone(), &w.attacker_ns);
    let set_callback = |url: String| {
        let instances = instances.clone();
        async move {
            instances
                .patch(
                    "ssrf",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"events": {"callbackUrl": url}}})),
                )
                .await
        }
    };
    let unreachable = || {
        metric(
            &w.strict,
            "dropbox_ingress_delivery_failures_total",
            "CallbackUnreachable",
        )
    };
    // The message of the EventsDelivering refusal reported now, if any.
    let refusal = || {
        let instances = instances.clone();
        async move {
            let ssrf = instances.get("ssrf").await?;
            Ok(support::condition(&ssrf, "EventsDelivering")
                .filter(|c| c.status == "False" && c.reason == "CallbackForbidden")
                .map(|c| c.message.clone())
                .unwrap_or_default())
        }
    };
    // Start a delivery on the strict ingress; it retries with whatever URL the
    // instance has at each attempt.
    set_callback(cases[0].0.clone()).await?;
    w.emu.upload(SSRF_ACCOUNT, "/ssrf.txt", b"x");
    let ssrf_body = notification(&[SSRF_ACCOUNT]);
    let r = http
        .post(hook(&w.strict, APP_KEY))
        .header("X-Dropbox-Signature", sign(ATTACKER_SECRET, &ssrf_body))
        .body(ssrf_body.clone())
        .send()
        .await?;
    ensure!(
        r.status() == 200,
        "the SSRF instance's webhook was refused: {}",
        r.status()
    );
    // A refusal counts for a case only when it reports the case's own range,
    // and the case before reported another one: so it was made with this URL,
    // not the previous one. Between two cases of the same range, another
    // denied public address (a refusal of its own) separates them.
    let mut steps: Vec<(String, String, &str)> = Vec::new();
    let mut separators = 35..;
    for (url, what, range) in &cases {
        if steps.last().is_some_and(|(_, _, last)| last == range) {
            let n = separators.next().unwrap_or(99);
            steps.push((
                format!("http://93.184.216.{n}/"),
                format!(
                    "public, but in deniedCallbackCIDRs (93.184.216.{n}, between two {range} cases)"
                ),
                "denied by the operator's configuration",
            ));
        }
        steps.push((url.clone(), (*what).to_owned(), range));
    }
    for (url, what, range) in &steps {
        let (hits_before, unreachable_before) = (hits.load(Ordering::Relaxed), unreachable().await);
        set_callback(url.clone()).await?;
        let wanted = format!("({range} range)");
        let reported = support::eventually(
            &format!("the strict ingress to refuse {what} as {range}"),
            Duration::from_secs(20),
            || async { refusal().await },
            |m: &String| m.contains(&wanted),
        )
        .await
        .is_ok();
        let leaked =
            hits.load(Ordering::Relaxed) - hits_before + unreachable().await - unreachable_before;
        rows.push(Row {
            attack: format!("SSRF: {what}"),
            tries: 1,
            refused: usize::from(reported && leaked == 0),
            let_through: leaked,
        });
    }
    // The condition names the kind of range, never the resolved address.
    let ssrf = instances.get("ssrf").await?;
    let message = support::condition(&ssrf, "EventsDelivering")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    let echoed = usize::from(message.contains("93.184") || !message.contains("not allowed"));
    rows.push(Row {
        attack: "CallbackForbidden echoing the resolved address".into(),
        tries: 1,
        refused: 1 - echoed,
        let_through: echoed,
    });

    // The permissive ingress takes the SSRF instance over once the strict one
    // is gone (rows 11 and 12 need loopback callbacks): proven by a delivery.
    ensure!(
        w.strict.terminate(Duration::from_secs(10)),
        "the strict ingress did not stop"
    );
    set_callback(w.attacker_rx.url.clone()).await?;
    let handed_over = w.attacker_rx.accepted().len();
    w.emu.upload(SSRF_ACCOUNT, "/handed-over.txt", b"h");
    support::eventually(
        "the permissive ingress to deliver the SSRF instance",
        Duration::from_secs(60),
        || async {
            let _ = http
                .post(hook(&w.ingress, APP_KEY))
                .header("X-Dropbox-Signature", sign(ATTACKER_SECRET, &ssrf_body))
                .body(ssrf_body.clone())
                .send()
                .await;
            Ok(w.attacker_rx.accepted().len())
        },
        |n: &usize| *n > handed_over,
    )
    .await?;

    // 11. A callback that redirects to an internal address: never followed.
    let followed = Arc::new(AtomicUsize::new(0));
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let target_port = target.local_addr()?.port();
    {
        let followed = followed.clone();
        tokio::spawn(async move {
            while let Ok((_s, _)) = target.accept().await {
                followed.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let redirector = axum::Router::new().fallback(move || async move {
        (
            axum::http::StatusCode::FOUND,
            [(
                axum::http::header::LOCATION,
                format!("http://127.0.0.1:{target_port}/internal"),
            )],
        )
    });
    let redirect_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let redirect_port = redirect_listener.local_addr()?.port();
    tokio::spawn(async move { axum::serve(redirect_listener, redirector).await });
    set_callback(format!("http://127.0.0.1:{redirect_port}/hook")).await?;
    let rejected = || {
        metric(
            &w.ingress,
            "dropbox_ingress_delivery_failures_total",
            "CallbackRejected",
        )
    };
    let rejected_before = rejected().await;
    // Something to deliver (the hand-over above delivered everything before).
    w.emu.upload(SSRF_ACCOUNT, "/redirected.txt", b"r");
    http.post(hook(&w.ingress, APP_KEY))
        .header("X-Dropbox-Signature", sign(ATTACKER_SECRET, &ssrf_body))
        .body(ssrf_body.clone())
        .send()
        .await?;
    let answered_3xx = support::eventually(
        "the redirect to be refused",
        Duration::from_secs(20),
        || async { Ok(rejected().await) },
        |n: &usize| *n >= rejected_before + 2,
    )
    .await
    .is_ok();
    let leaked = followed.load(Ordering::Relaxed);
    rows.push(Row {
        attack: "callback redirecting to an internal address".into(),
        tries: 1,
        refused: usize::from(answered_3xx && leaked == 0),
        let_through: leaked,
    });

    // 12. A capability URL (credentials, token in the query): delivered, and
    // neither appears in status or any log.
    let with_creds =
        w.attacker_rx
            .url
            .replacen("http://", &format!("http://user:{USERINFO_SECRET}@"), 1)
            + &format!("?token={CAPABILITY}");
    set_callback(with_creds).await?;
    let attacker_before = w.attacker_rx.accepted().len();
    w.emu.upload(SSRF_ACCOUNT, "/again.txt", b"y");
    http.post(hook(&w.ingress, APP_KEY))
        .header("X-Dropbox-Signature", sign(ATTACKER_SECRET, &ssrf_body))
        .body(ssrf_body)
        .send()
        .await?;
    support::eventually(
        "the delivery to the capability URL",
        Duration::from_secs(30),
        || async { Ok(w.attacker_rx.accepted().len()) },
        |n: &usize| *n > attacker_before,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = serde_json::to_string(&instances.get("ssrf").await?.status)?;
    let mut texts = vec![
        status,
        w.controller.log_text(),
        w.ingress.log_text(),
        w.strict.log_text(),
    ];
    let events = support::kubectl(&["get", "events", "-A", "-o", "json"]).1;
    texts.push(events);
    let exposures: usize = texts
        .iter()
        .map(|t| t.matches(USERINFO_SECRET).count() + t.matches(CAPABILITY).count())
        .sum();
    rows.push(Row {
        attack: "callback URL credentials/query in status, Events or logs".into(),
        tries: 1,
        refused: usize::from(exposures == 0),
        let_through: exposures,
    });

    // 13. No secret of any tenant in any log.
    let secrets = [APP_SECRET, ATTACKER_SECRET, OTHER_SECRET, SIGNING_KEY];
    let leaks: usize = [&w.controller, &w.ingress, &w.strict]
        .iter()
        .map(|p| {
            let log = p.log_text();
            secrets
                .iter()
                .map(|s| log.matches(s).count())
                .sum::<usize>()
        })
        .sum();
    rows.push(Row {
        attack: "tenant secrets in logs".into(),
        tries: 1,
        refused: usize::from(leaks == 0),
        let_through: leaks,
    });
    // The other app's instance never saw the victim's replayed notifications.
    let other = w.other_rx.all().len();
    rows.push(Row {
        attack: "replayed notifications delivered to the other app's instance".into(),
        tries: 1,
        refused: usize::from(other == 0),
        let_through: other,
    });

    // 14. Stalled clients do not hold a shutting-down ingress: an upload
    // stalled mid-body (its body timeout, 60 s, is far beyond the drain
    // timeout), a request head stalled half-way and an idle kept-alive
    // connection. SIGTERM must end the process within the drain timeout (2 s).
    let drain = Duration::from_secs(2);
    let mut ingress = OperatorProcess::ingress(&w.ops, &w.emu.url)
        .env_remove("WATCH_NAMESPACE")
        .env("HEARTBEAT_INTERVAL", "1s")
        .name("sigterm")
        .env("WEBHOOK_BODY_TIMEOUT", "60s")
        .env("DRAIN_TIMEOUT", "2s")
        .start()
        .await;
    let addr = addr_of(&ingress);
    let mut stalled = Vec::new();
    let upload = format!(
        "POST /webhooks/dropbox/{APP_KEY} HTTP/1.1\r\nHost: x\r\nX-Dropbox-Signature: {}\r\nContent-Length: 4096\r\n\r\n{{",
        "0".repeat(64)
    );
    for request in [
        upload.into_bytes(),
        format!("POST /webhooks/dropbox/{APP_KEY} HTTP/1.1\r\nHost: x\r\n").into_bytes(),
    ] {
        let mut s = tokio::net::TcpStream::connect(&addr).await?;
        s.write_all(&request).await?;
        stalled.push(s);
    }
    let mut idle = tokio::net::TcpStream::connect(&addr).await?;
    idle.write_all(
        format!("GET /webhooks/dropbox/{APP_KEY}?challenge=c HTTP/1.1\r\nHost: x\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut buf = [0u8; 256];
    let n = idle.read(&mut buf).await?;
    ensure!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "the challenge was not answered"
    );
    stalled.push(idle);
    // The upload's handler is waiting for its body.
    let in_flight = support::eventually(
        "the stalled upload to be in flight",
        Duration::from_secs(5),
        || async { Ok(metric(&ingress, "dropbox_ingress_open_connections", "").await) },
        |n: &usize| *n >= 3,
    )
    .await
    .is_ok();
    let started = Instant::now();
    let clean =
        tokio::task::spawn_blocking(move || ingress.terminate(drain + Duration::from_secs(3)))
            .await?;
    let took = started.elapsed();
    drop(stalled);
    let held = !clean || took > drain + Duration::from_millis(1500);
    rows.push(Row {
        attack: format!(
            "stalled upload, head and idle connection during SIGTERM (exited in {:.1} s)",
            took.as_secs_f64()
        ),
        tries: 1,
        refused: usize::from(in_flight && !held),
        let_through: usize::from(held),
    });

    print_table(&rows);
    let bad: Vec<&Row> = rows
        .iter()
        .filter(|r| r.let_through > 0 || r.refused < r.tries)
        .collect();
    ensure!(
        bad.is_empty(),
        "attacks let through or not refused: {bad:#?}"
    );
    Ok(())
}

fn print_table(rows: &[Row]) {
    let width = rows
        .iter()
        .map(|r| r.attack.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!("\nattack table (ingress, real control plane, isolated network namespace)");
    println!(
        "| {:width$} | {:>6} | {:>7} | {:>11} |",
        "attack", "tries", "refused", "let through"
    );
    println!(
        "|{}|--------|---------|-------------|",
        "-".repeat(width + 2)
    );
    for r in rows {
        println!(
            "| {:width$} | {:>6} | {:>7} | {:>11} |",
            r.attack, r.tries, r.refused, r.let_through
        );
    }
    println!();
}

// ---- Connection floods: memory, latency of genuine webhooks, shutdown ----

#[test]
fn connection_floods_stay_within_memory_and_genuine_webhooks_pass() {
    if !support::netns::inside() {
        support::netns::rerun_isolated(
            "connection_floods_stay_within_memory_and_genuine_webhooks_pass",
        );
        return;
    }
    support::run_blocking(floods());
}

/// The bound every flood row must hold: the chart's ingress memory limit is
/// 128 Mi; this leaves a quarter for what the rows do not exercise.
const RSS_BOUND_MIB: f64 = 96.0;
/// p99 of genuine webhooks answered during a flood.
const P99_BOUND: Duration = Duration::from_millis(50);
/// The flood ingress's drain timeout; SIGTERM must end it within this (plus
/// the time to remove its heartbeat and exit).
const FLOOD_DRAIN: Duration = Duration::from_secs(3);
const EXIT_SLACK: Duration = Duration::from_millis(1500);
const FLOOD: usize = 1_000;
/// A declared body just under the 1 MiB limit.
const NEAR_MIB: usize = 1_040_000;

struct FloodRow {
    attack: String,
    tries: usize,
    refused: usize,
    peak_rss_mib: f64,
    genuine: usize,
    genuine_ok: usize,
    p99: Duration,
    exit: Duration,
    exited_clean: bool,
}

impl FloodRow {
    fn holds(&self) -> bool {
        self.refused == self.tries
            && self.peak_rss_mib <= RSS_BOUND_MIB
            && self.genuine > 0
            && self.genuine_ok == self.genuine
            && self.p99 <= P99_BOUND
            && self.exited_clean
            && self.exit <= FLOOD_DRAIN + EXIT_SLACK
    }
}

/// The resident memory of process `pid` (VmRSS), in MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Samples `pid`'s RSS every 10 ms until `stop`; returns the peak.
fn sample_peak_rss(
    pid: u32,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<f64> {
    tokio::spawn(async move {
        let mut peak: f64 = 0.0;
        loop {
            if let Some(rss) = rss_mib(pid) {
                peak = peak.max(rss);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = stop.cancelled() => return peak,
            }
        }
    })
}

/// Sends genuine signed webhooks, each on a new connection, one every 20 ms
/// until `stop`; returns each answer's (status, latency).
fn genuine_stream(
    url: String,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<Vec<(u16, Duration, Instant)>> {
    tokio::spawn(async move {
        let http = support::dropbox::http_client_builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let body = notification(&[VICTIM]);
        let signature = sign(APP_SECRET, &body);
        let mut answers = Vec::new();
        let t0 = Instant::now();
        while !stop.is_cancelled() {
            let started = Instant::now();
            let status = match http
                .post(&url)
                .header("X-Dropbox-Signature", &signature)
                .body(body.clone())
                .send()
                .await
            {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            };
            let took = started.elapsed();
            if took > Duration::from_millis(20) {
                println!(
                    "slow genuine webhook: {:.1} ms at {:.2} s",
                    took.as_secs_f64() * 1000.0,
                    t0.elapsed().as_secs_f64()
                );
            }
            answers.push((status, took, started));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        answers
    })
}

fn p99(answers: &[(u16, Duration)]) -> Duration {
    let mut latencies: Vec<Duration> = answers.iter().map(|(_, d)| *d).collect();
    latencies.sort();
    latencies
        .get((latencies.len() * 99).div_ceil(100).saturating_sub(1))
        .copied()
        .unwrap_or_default()
}

/// Raises this test's open-files soft limit to the hard limit (the ingress it
/// starts inherits it) and checks that it leaves room for the floods.
fn ensure_open_files(needed: u64) -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        ensure!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0,
            "getrlimit"
        );
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    ensure!(
        limit.rlim_cur >= needed,
        "the open-files limit is {} (ulimit -n); the floods need {needed}: raise the hard limit",
        limit.rlim_cur
    );
    Ok(())
}

/// The victim alone (oauth2, the app's real secret) and the controller.
struct FloodWorld {
    emu: Emulator,
    ops: String,
    _controller: Process,
    _victim_rx: Receiver,
}

async fn flood_setup() -> Result<FloodWorld> {
    let client = support::client().await;
    support::install_crd(&client).await?;
    let ops = support::namespace(&client, "flood-ops").await;
    let victim_ns = support::namespace(&client, "flood-victim").await;
    let emu = Emulator::start().await;
    emu.add_app(APP_KEY, APP_SECRET);
    emu.add_account(VICTIM, "victim@example.com", "Victim");
    let controller = OperatorProcess::new(&ops, &emu.url)
        .env_remove("WATCH_NAMESPACE")
        .start()
        .await;
    let victim_rx = Receiver::start(None).await;
    secret(
        &client,
        &victim_ns,
        "dropbox-app",
        &[("oauth.api.key", APP_KEY), ("oauth.api.secret", APP_SECRET)],
    )
    .await?;
    let code = emu.issue_code(APP_KEY, VICTIM, Some(REDIRECT));
    secret(&client, &victim_ns, "victim-code", &[("code", &code)]).await?;
    create(
        &client,
        &victim_ns,
        json!({
            "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
            "kind": "DropboxElementInstance",
            "metadata": {"name": "victim"},
            "spec": {
                "element": {"key": "dropbox"},
                "authentication": {
                    "type": "oauth2",
                    "appSecretRef": {"name": "dropbox-app"},
                    "codeSecretRef": {"name": "victim-code"},
                    "callbackUrl": REDIRECT
                },
                "events": {"enabled": true, "callbackUrl": victim_rx.url}
            }
        }),
    )
    .await?;
    // Ready needs a live ingress; each row starts its own (flood_ingress waits
    // until it accepts the victim's webhooks).
    support::wait_condition(
        &Api::namespaced(client.clone(), &victim_ns),
        "victim",
        "Authorized",
        "True",
        None,
        Duration::from_secs(90),
    )
    .await?;
    Ok(FloodWorld {
        emu,
        ops,
        _controller: controller,
        _victim_rx: victim_rx,
    })
}

/// An ingress with the production listener settings (connection cap, header
/// and idle timeouts, body budget at their defaults), ready: it answers a
/// genuine webhook 200.
async fn flood_ingress(w: &FloodWorld, name: &str) -> Result<Process> {
    let ingress = OperatorProcess::ingress(&w.ops, &w.emu.url)
        .env_remove("WATCH_NAMESPACE")
        .env("ALLOWED_CALLBACK_CIDRS", "127.0.0.0/8")
        .env("HEARTBEAT_INTERVAL", "1s")
        .env("DRAIN_TIMEOUT", &format!("{}s", FLOOD_DRAIN.as_secs()))
        // Longer than a row: SIGTERM, not the body timeout, ends the stalled
        // uploads, so the exit time shows the drain bound.
        .env("WEBHOOK_BODY_TIMEOUT", "30s")
        // Per-webhook debug lines would only slow the process under a flood.
        .env("LOG_LEVEL", "info")
        .name(name)
        .start()
        .await;
    let body = notification(&[VICTIM]);
    let http = support::dropbox::http_client();
    support::eventually(
        "the flood ingress to accept a genuine webhook",
        Duration::from_secs(30),
        || async {
            Ok(http
                .post(hook(&ingress, APP_KEY))
                .header("X-Dropbox-Signature", sign(APP_SECRET, &body))
                .body(body.clone())
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0))
        },
        |s: &u16| *s == 200,
    )
    .await?;
    Ok(ingress)
}

/// SIGTERM; how long the process took to exit, and whether it did on its own
/// (within the drain timeout and some slack, then it is killed).
async fn sigterm(mut ingress: Process) -> Result<(Duration, bool)> {
    let started = Instant::now();
    let clean = tokio::task::spawn_blocking(move || {
        ingress.terminate(FLOOD_DRAIN + EXIT_SLACK + Duration::from_secs(2))
    })
    .await?;
    Ok((started.elapsed(), clean))
}

/// What became of one flood connection. (Whether a refusal came before the
/// body was read cannot be told from here: on loopback the kernel takes a whole
/// megabyte into its buffers at once. The peak RSS is the evidence.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// An answer with this status.
    Answered { status: u16 },
    /// Closed by the server without an answer, at this time.
    Closed(Instant),
    /// Still open, no answer, when the client gave up.
    Open,
    /// Could not connect.
    Refused,
}

/// Opens a connection, sends `head` then `body_len` bytes of body (a write
/// error ends the sending), and waits for an answer or a close until `stop`.
async fn flood_connection(
    addr: String,
    head: Arc<Vec<u8>>,
    body_len: usize,
    stop: tokio_util::sync::CancellationToken,
    settled: Arc<AtomicUsize>,
) -> Fate {
    static CHUNK: [u8; 16 * 1024] = [b' '; 16 * 1024];
    let Ok(stream) = tokio::net::TcpStream::connect(&addr).await else {
        settled.fetch_add(1, Ordering::AcqRel);
        return Fate::Refused;
    };
    let (mut reader, mut writer) = stream.into_split();
    // Counts this connection as settled once it has sent all it will send.
    let sending = tokio::spawn(async move {
        let send = async {
            writer.write_all(&head).await?;
            let mut left = body_len;
            while left > 0 {
                let n = left.min(CHUNK.len());
                writer.write_all(&CHUNK[..n]).await?;
                left -= n;
            }
            std::io::Result::Ok(())
        };
        let _ = send.await;
        settled.fetch_add(1, Ordering::AcqRel);
        // Stalls: keeps the connection open, sends nothing more.
        std::future::pending::<()>().await;
        drop(writer);
    });
    let mut buf = [0u8; 512];
    let fate = tokio::select! {
        read = reader.read(&mut buf) => match read {
            Ok(n) if n >= 12 => {
                let status = std::str::from_utf8(&buf[9..12]).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
                Fate::Answered { status }
            }
            _ => Fate::Closed(Instant::now()),
        },
        _ = stop.cancelled() => Fate::Open,
    };
    // The write half is dropped with the task's result (or aborted).
    sending.abort();
    fate
}

async fn floods() -> Result<()> {
    ensure_open_files(3 * FLOOD as u64 + 1024)?;
    let w = flood_setup().await?;
    let mut rows: Vec<FloodRow> = Vec::new();

    // (a) Near-1 MiB uploads with a wrong signature to a known app key, each
    // stalled just before its end. The budget (32 MiB) admits ~32 of them;
    // the others are answered 503 before their body is read. SIGTERM comes
    // while the admitted ones are still stalled (the body timeout is 10 s).
    let ingress = flood_ingress(&w, "flood-uploads").await?;
    let wrong = hex::encode(rand::random::<[u8; 32]>());
    let head = Arc::new(
        format!(
            "POST /webhooks/dropbox/{APP_KEY} HTTP/1.1\r\nHost: x\r\nX-Dropbox-Signature: {wrong}\r\nContent-Length: {NEAR_MIB}\r\n\r\n"
        )
        .into_bytes(),
    );
    let r = flood_row(
        ingress,
        head,
        NEAR_MIB - 1024,
        Duration::from_secs(6),
        false,
    )
    .await?;
    let answered_503 = r.count(|f| matches!(f, Fate::Answered { status: 503 }));
    // Held within the budget until SIGTERM closed them.
    let held = r.count(|f| matches!(f, Fate::Closed(_) | Fate::Open));
    rows.push(r.row(
        format!("{FLOOD} stalled ~1 MiB uploads, wrong signature ({answered_503} answered 503, {held} held in the budget)"),
        answered_503 + held,
    ));

    // (b) Connections stalled in their request head, each holding 15 KiB of it
    // (the head limit is 16 KiB): all closed at the header timeout (10 s).
    // Then as many again, stopped with SIGTERM while they are open.
    let ingress = flood_ingress(&w, "flood-heads").await?;
    let head = Arc::new(
        format!(
            "POST /webhooks/dropbox/{APP_KEY} HTTP/1.1\r\nHost: x\r\nX-Padding: {}",
            "a".repeat(15 * 1024)
        )
        .into_bytes(),
    );
    let r = flood_row(ingress, head, 0, Duration::from_secs(12), true).await?;
    // Closed by the ingress before the SIGTERM (which closes the rest).
    let closed = r.count(|f| matches!(f, Fate::Closed(at) if *at < r.sigterm_at));
    rows.push(r.row(
        format!(
            "{FLOOD} connections stalled in their head ({closed} closed at the header timeout)"
        ),
        closed,
    ));

    // (c) Small uploads (8 KiB declared, under the budget's uncharged size),
    // wrong signature, each stalled half-way: they cost the budget nothing, and
    // must not hold the webhook slots (`--max-concurrent-webhooks`, 256) that
    // genuine webhooks need while they wait for their body timeout.
    let ingress = flood_ingress(&w, "flood-small").await?;
    let head = Arc::new(
        format!(
            "POST /webhooks/dropbox/{APP_KEY} HTTP/1.1\r\nHost: x\r\nX-Dropbox-Signature: {wrong}\r\nContent-Length: 8192\r\n\r\n"
        )
        .into_bytes(),
    );
    let r = flood_row(ingress, head, 4096, Duration::from_secs(6), false).await?;
    // Held (no answer) until SIGTERM closed them, or refused with an error.
    let held = r.count(|f| {
        matches!(f, Fate::Closed(_) | Fate::Open)
            || matches!(f, Fate::Answered { status } if *status >= 400)
    });
    rows.push(r.row(
        format!("{FLOOD} stalled 8 KiB uploads, wrong signature ({held} held or refused)"),
        held,
    ));

    print_flood_table(&rows);
    let bad: Vec<&str> = rows
        .iter()
        .filter(|r| !r.holds())
        .map(|r| r.attack.as_str())
        .collect();
    ensure!(bad.is_empty(), "flood rows that did not hold: {bad:#?}");
    Ok(())
}

fn tally(fates: &[Fate]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for f in fates {
        let name = match f {
            Fate::Closed(_) => "Closed".to_owned(),
            other => format!("{other:?}"),
        };
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

/// What a flood row saw.
struct FloodRun {
    fates: Vec<Fate>,
    peak_rss_mib: f64,
    genuine: Vec<(u16, Duration)>,
    exit: Duration,
    exited_clean: bool,
    sigterm_at: Instant,
}

impl FloodRun {
    fn count(&self, which: impl Fn(&Fate) -> bool) -> usize {
        self.fates.iter().filter(|f| which(f)).count()
    }

    /// The row; `refused`: the flood connections that got nowhere (any 2xx
    /// answer makes the row fail).
    fn row(&self, attack: String, refused: usize) -> FloodRow {
        let let_through =
            self.count(|f| matches!(f, Fate::Answered { status } if (200..300).contains(status)));
        println!("{attack}: fates {:?}", tally(&self.fates));
        FloodRow {
            attack,
            tries: FLOOD,
            refused: if let_through == 0 { refused } else { 0 },
            peak_rss_mib: self.peak_rss_mib,
            genuine: self.genuine.len(),
            genuine_ok: self.genuine.iter().filter(|(s, _)| *s == 200).count(),
            p99: p99(&self.genuine),
            exit: self.exit,
            exited_clean: self.exited_clean,
        }
    }
}

/// Runs `FLOOD` flood connections against `ingress` for `hold` while genuine
/// webhooks stream in and the ingress's RSS is sampled, then SIGTERMs the
/// ingress while the flood is still open (with `second_wave`, while another
/// `FLOOD` connections opened 2 s before are). The fates are those of the
/// first wave.
async fn flood_row(
    ingress: Process,
    head: Arc<Vec<u8>>,
    body_len: usize,
    hold: Duration,
    second_wave: bool,
) -> Result<FloodRun> {
    let pid = ingress.pid().context("ingress pid")?;
    println!(
        "{}: idle RSS {:.1} MiB",
        ingress.name,
        rss_mib(pid).unwrap_or_default()
    );
    let started = Instant::now();
    let measuring = tokio_util::sync::CancellationToken::new();
    let sampler = sample_peak_rss(pid, measuring.clone());
    let genuine = genuine_stream(hook(&ingress, APP_KEY), measuring.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let wave = |settled: &Arc<AtomicUsize>| -> Vec<_> {
        (0..FLOOD)
            .map(|_| {
                tokio::spawn(flood_connection(
                    addr_of(&ingress),
                    head.clone(),
                    body_len,
                    stop.clone(),
                    settled.clone(),
                ))
            })
            .collect()
    };
    let settled = Arc::new(AtomicUsize::new(0));
    let first = wave(&settled);
    let ramp = wait_settled(&settled).await;
    tokio::time::sleep_until((started + hold).into()).await;
    measuring.cancel();
    let peak_rss_mib = sampler.await.unwrap_or_default();
    let genuine = genuine.await.unwrap_or_default();
    let mut second = Vec::new();
    if second_wave {
        let settled = Arc::new(AtomicUsize::new(0));
        second = wave(&settled);
        wait_settled(&settled).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let sigterm_at = Instant::now();
    let (exit, exited_clean) = sigterm(ingress).await?;
    stop.cancel();
    let mut fates = Vec::with_capacity(FLOOD);
    for t in first {
        fates.push(t.await.unwrap_or(Fate::Refused));
    }
    for t in second {
        let _ = t.await;
    }
    // The latency bound holds for the webhooks sent while the flood stalls;
    // those sent while its 1,000 connections were still being opened queue
    // behind them (printed, not bounded).
    let ramp_end = started + ramp;
    let (during_ramp, stalled): (Vec<_>, Vec<_>) =
        genuine.into_iter().partition(|(_, _, at)| *at < ramp_end);
    let ramp_max = during_ramp
        .iter()
        .map(|(_, d, _)| *d)
        .max()
        .unwrap_or_default();
    println!(
        "{:.2} s to open the flood; {} genuine webhooks meanwhile (slowest {:.1} ms)",
        ramp.as_secs_f64(),
        during_ramp.len(),
        ramp_max.as_secs_f64() * 1000.0
    );
    Ok(FloodRun {
        fates,
        peak_rss_mib,
        genuine: stalled.into_iter().map(|(s, d, _)| (s, d)).collect(),
        exit,
        exited_clean,
        sigterm_at,
    })
}

/// Waits until all `FLOOD` connections of a wave have sent what they send
/// (at most 20 s); returns how long that took.
async fn wait_settled(settled: &AtomicUsize) -> Duration {
    let started = Instant::now();
    while settled.load(Ordering::Acquire) < FLOOD && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

fn print_flood_table(rows: &[FloodRow]) {
    let width = rows
        .iter()
        .map(|r| r.attack.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!("\nflood table (ingress with default listener settings, real control plane)");
    println!(
        "| {:width$} | {:>5} | {:>7} | {:>13} | {:>16} | {:>11} | {:>12} |",
        "attack",
        "tries",
        "refused",
        "peak RSS MiB",
        "genuine 200/all",
        "genuine p99",
        "SIGTERM exit"
    );
    println!(
        "|{}|-------|---------|---------------|------------------|-------------|--------------|",
        "-".repeat(width + 2)
    );
    for r in rows {
        println!(
            "| {:width$} | {:>5} | {:>7} | {:>13.1} | {:>16} | {:>8.1} ms | {:>10.1} s{} |",
            r.attack,
            r.tries,
            r.refused,
            r.peak_rss_mib,
            format!("{}/{}", r.genuine_ok, r.genuine),
            r.p99.as_secs_f64() * 1000.0,
            r.exit.as_secs_f64(),
            if r.exited_clean { "" } else { "!" },
        );
    }
    println!(
        "bounds: peak RSS <= {RSS_BOUND_MIB} MiB, genuine p99 <= {} ms, exit <= {:.1} s\n",
        P99_BOUND.as_millis(),
        (FLOOD_DRAIN + EXIT_SLACK).as_secs_f64()
    );
}
