//! Event delivery end to end: the controller (managing the ingress objects and
//! cursors) and the ingress (run as local processes of the same binary, as the
//! Deployment would run them) on a real control plane, with the Dropbox emulator
//! and a callback receiver that verifies both signature schemes.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use dropbox_operator::api::DropboxElementInstance;
use dropbox_operator::contract;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use support::condition;
use support::dropbox::Emulator;
use support::operator::{OperatorProcess, Process};
use support::receiver::{Receiver, wait_events};

const APP_KEY: &str = "app-key-ingress";
const APP_SECRET: &str = "APP-SECRET-1ngr3ss";
const ACCOUNT: &str = "dbid:AAB-ingress-account-0001";
const OTHER_ACCOUNT: &str = "dbid:AAB-ingress-account-0002";
const SIGNING_KEY: &str = "my-callback-signing-key";
const REDIRECT: &str = "https://www.mycoolapp.com/auth";

struct Fixture {
    client: Client,
    ns: String,
    emu: Emulator,
    instances: Api<DropboxElementInstance>,
    _controller: Process,
}

/// The controller as every test here runs it.
fn controller_process(ns: &str, emu: &Emulator) -> OperatorProcess {
    OperatorProcess::new(ns, &emu.url)
        .env(
            "INGRESS_IMAGE",
            "registry.example.com/dropbox-operator:test",
        )
        .env("INGRESS_REPLICAS", "3")
        .env("INGRESS_SERVICE_ACCOUNT", "webhook-sa")
        .env(
            "INGRESS_RESOURCES",
            r#"{"requests":{"cpu":"50m","memory":"64Mi"}}"#,
        )
        .env("ALLOWED_CALLBACK_CIDRS", "127.0.0.0/8")
}

async fn fixture(test: &str) -> Fixture {
    let (client, ns, emu) = support::fixture::emulated_namespace(test, APP_KEY, APP_SECRET).await;
    emu.add_account(ACCOUNT, "ada@example.com", "Ada Lovelace");
    emu.add_account(OTHER_ACCOUNT, "alan@example.com", "Alan Turing");
    let controller = controller_process(&ns, &emu).start().await;
    let f = Fixture {
        instances: Api::namespaced(client.clone(), &ns),
        client,
        ns,
        emu,
        _controller: controller,
    };
    f.put_secret(
        "dropbox-app",
        &[("oauth.api.key", APP_KEY), ("oauth.api.secret", APP_SECRET)],
    )
    .await;
    f.put_secret(
        "events-key",
        &[("event.notification.signature.key", SIGNING_KEY)],
    )
    .await;
    f
}

impl Fixture {
    fn ingress(&self) -> OperatorProcess {
        support::fixture::quick_ingress(&self.ns, &self.emu)
    }

    async fn put_secret(&self, name: &str, data: &[(&str, &str)]) {
        support::put_secret(&Api::namespaced(self.client.clone(), &self.ns), name, data)
            .await
            .expect("apply secret");
    }

    /// An oauth2 instance of `account` with events to `callback`.
    async fn instance(&self, name: &str, account: &str, callback: &str, format: &str) {
        self.instance_with(name, account, callback, format, json!({}))
            .await;
    }

    /// [`Fixture::instance`] with more `spec.events` fields.
    async fn instance_with(
        &self,
        name: &str,
        account: &str,
        callback: &str,
        format: &str,
        events: Value,
    ) {
        let code = self.emu.issue_code(APP_KEY, account, Some(REDIRECT));
        self.put_secret(&format!("{name}-code"), &[("code", &code)])
            .await;
        let instance: DropboxElementInstance = serde_json::from_value(json!({
            "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
            "kind": "DropboxElementInstance",
            "metadata": {"name": name},
            "spec": {
                "element": {"key": "dropbox"},
                "name": format!("{name} display"),
                "tags": ["t1", "t2"],
                "authentication": {
                    "type": "oauth2",
                    "appSecretRef": {"name": "dropbox-app"},
                    "codeSecretRef": {"name": format!("{name}-code")},
                    "callbackUrl": REDIRECT
                },
                "events": {
                    "enabled": true,
                    "callbackUrl": callback,
                    "signatureKeySecretRef": {"name": "events-key"},
                    "format": format
                }
            }
        }))
        .expect("instance manifest");
        let mut instance = serde_json::to_value(instance).expect("instance as JSON");
        for (k, v) in events.as_object().into_iter().flatten() {
            instance["spec"]["events"][k] = v.clone();
        }
        let instance: DropboxElementInstance =
            serde_json::from_value(instance).expect("instance manifest");
        self.instances
            .create(&PostParams::default(), &instance)
            .await
            .expect("create instance");
    }

    async fn wait_condition(
        &self,
        name: &str,
        type_: &str,
        status: &str,
        reason: Option<&str>,
    ) -> Result<DropboxElementInstance> {
        support::wait_condition(
            &self.instances,
            name,
            type_,
            status,
            reason,
            Duration::from_secs(60),
        )
        .await
    }

    async fn uid(&self, name: &str) -> String {
        self.instances
            .get(name)
            .await
            .expect("get instance")
            .uid()
            .expect("uid")
    }

    /// The committed cursor, from the instance's cursor ConfigMap in the
    /// operator namespace (the test namespace: POD_NAMESPACE).
    async fn cursor(&self, name: &str) -> Option<String> {
        let uid = self.uid(name).await;
        Api::<ConfigMap>::namespaced(self.client.clone(), &self.ns)
            .get_opt(&contract::cursor_configmap_name(&uid))
            .await
            .ok()
            .flatten()
            .and_then(|cm| cm.data)
            .and_then(|d| d.get("cursor").cloned())
    }

    async fn webhook(&self, ingress: &Process, accounts: &[&str]) -> reqwest::Response {
        self.emu
            .send_webhook(
                &format!("{}/webhooks/dropbox/{APP_KEY}", ingress.url()),
                APP_KEY,
                accounts,
            )
            .await
    }
}

#[tokio::test]
async fn controller_runs_the_ingress_objects_and_reports_events_ready() -> Result<()> {
    let f = fixture("ingress-objects").await;
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    f.instance("objects", ACCOUNT, &receiver.url, "elements")
        .await;

    // Authorized, but no ingress replica is running yet.
    let waiting = f
        .wait_condition(
            "objects",
            "EventsReady",
            "False",
            Some("IngressUnavailable"),
        )
        .await?;
    let status = waiting.status.clone().context("status")?;
    assert_eq!(
        status.events.and_then(|e| e.webhook_path).as_deref(),
        Some("/webhooks/dropbox/app-key-ingress")
    );
    assert!(
        f.cursor("objects").await.is_some(),
        "the first cursor is set"
    );
    // The cursor and the projected Secret live in the operator namespace, named
    // and labelled by the instance's uid.
    let uid = waiting.uid().unwrap_or_default();
    let cm = Api::<ConfigMap>::namespaced(f.client.clone(), &f.ns)
        .get(&contract::cursor_configmap_name(&uid))
        .await?;
    assert_eq!(cm.labels().get(contract::INSTANCE_UID_LABEL), Some(&uid));
    assert!(contract::is_managed(cm.metadata.labels.as_ref()));
    let projected = Api::<Secret>::namespaced(f.client.clone(), &f.ns)
        .get(&contract::instance_secret_name(&uid))
        .await?;
    let data = projected.data.clone().unwrap_or_default();
    assert_eq!(
        data.get(contract::APP_SECRET_KEY).map(|v| v.0.as_slice()),
        Some(APP_SECRET.as_bytes())
    );
    assert_eq!(
        data.get(contract::SIGNATURE_KEY_KEY)
            .map(|v| v.0.as_slice()),
        Some(SIGNING_KEY.as_bytes())
    );
    assert!(data.contains_key(contract::ACCESS_TOKEN_KEY));
    assert_eq!(
        projected.labels().get(contract::INSTANCE_UID_LABEL),
        Some(&uid)
    );

    // The Deployment and Service, as objects (no kubelet runs pods here).
    let deployments: Api<Deployment> = Api::namespaced(f.client.clone(), &f.ns);
    let services: Api<Service> = Api::namespaced(f.client.clone(), &f.ns);
    let deployment = support::eventually(
        "the ingress Deployment",
        Duration::from_secs(30),
        || support::get_opt(&deployments, "dropbox-webhook-ingress"),
        Option::is_some,
    )
    .await?
    .context("deployment")?;
    let spec = deployment.spec.clone();
    assert_eq!(spec.replicas, Some(3));
    let pod = spec.template.spec.context("pod spec")?;
    assert_eq!(pod.service_account_name.as_deref(), Some("webhook-sa"));
    let container = &pod.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("registry.example.com/dropbox-operator:test")
    );
    assert_eq!(container.args.as_deref(), Some(&["ingress".to_owned()][..]));
    assert_eq!(
        container
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.as_deref()),
        Some("/readyz")
    );
    assert_eq!(
        container
            .liveness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.as_deref()),
        Some("/healthz")
    );
    let env: BTreeMap<String, String> = container
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| e.value.map(|v| (e.name, v)))
        .collect();
    assert_eq!(
        env.get("ALLOWED_CALLBACK_CIDRS").map(String::as_str),
        Some("127.0.0.0/8")
    );
    assert_eq!(
        env.get("DROPBOX_API_URL").map(|u| u.trim_end_matches('/')),
        Some(f.emu.url.as_str())
    );
    let requests = container
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .context("requests")?;
    assert_eq!(requests.get("cpu").map(|q| q.0.as_str()), Some("50m"));
    assert_eq!(
        deployment
            .labels()
            .get("app.kubernetes.io/component")
            .map(String::as_str),
        Some("webhook-ingress")
    );
    let service = services.get("dropbox-webhook-ingress").await?;
    let service_spec = service.spec.context("service spec")?;
    assert_eq!(service_spec.selector, spec.selector.match_labels);

    // An ingress replica comes up: EventsReady and Ready.
    let _ingress = f.ingress().start().await;
    f.wait_condition("objects", "EventsReady", "True", Some("IngressReady"))
        .await?;
    f.wait_condition("objects", "Ready", "True", None).await?;

    // No instance wants events any more: the ingress objects go away.
    f.instances
        .patch(
            "objects",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"events": {"enabled": false}}})),
        )
        .await?;
    support::eventually(
        "the ingress Deployment to be removed",
        Duration::from_secs(30),
        || support::get_opt(&deployments, "dropbox-webhook-ingress"),
        Option::is_none,
    )
    .await?;
    assert!(services.get_opt("dropbox-webhook-ingress").await?.is_none());
    let instance = f.wait_condition("objects", "Ready", "True", None).await?;
    assert!(condition(&instance, "EventsReady").is_none());
    let secrets: Api<Secret> = Api::namespaced(f.client.clone(), &f.ns);
    let projected_name = contract::instance_secret_name(&uid);
    support::eventually(
        "the projected Secret to be removed",
        Duration::from_secs(30),
        || support::get_opt(&secrets, &projected_name),
        Option::is_none,
    )
    .await?;
    assert!(f.cursor("objects").await.is_none(), "the cursor is removed");
    Ok(())
}

#[tokio::test]
async fn file_changes_are_delivered_standardized_signed_and_batched() -> Result<()> {
    let f = fixture("end-to-end").await;
    let ingress = f.ingress().start().await;
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    f.instance("docs", ACCOUNT, &receiver.url, "elements").await;
    f.wait_condition("docs", "Ready", "True", None).await?;

    // Create, modify, delete.
    f.emu.upload(ACCOUNT, "/Reports/q1.txt", b"first");
    f.emu.upload(ACCOUNT, "/Reports/q1.txt", b"second");
    f.emu.delete(ACCOUNT, "/Reports/q1.txt");
    let started = Instant::now();
    let response = f.webhook(&ingress, &[ACCOUNT]).await;
    assert_eq!(response.status(), 200);
    let ack = started.elapsed();
    let events = wait_events(&receiver, 1, Duration::from_secs(30)).await?;
    eprintln!(
        "webhook acknowledged in {ack:?}; delivered after {:?}",
        started.elapsed()
    );
    let types: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["eventType"].as_str().unwrap_or(""),
                e["objectType"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(types.contains(&("DELETED", "files")), "{types:?}");
    assert!(
        types.contains(&("UPDATED", "folders")),
        "the implicit folder: {types:?}"
    );
    let delivery = &receiver.accepted()[0];
    assert_eq!(delivery.elements_signature_ok, Some(true));
    assert_eq!(delivery.standard_webhooks_ok, Some(true));
    assert_eq!(delivery.content_type, "application/json");
    let message = &delivery.body["message"];
    assert_eq!(message["eventId"], json!(delivery.event_id));
    assert_eq!(message["elementKey"], json!("dropbox"));
    assert_eq!(message["instanceId"], json!(format!("{}/docs", f.ns)));
    assert_eq!(message["instanceName"], json!("docs display"));
    assert_eq!(message["instanceTags"], json!(["t1", "t2"]));
    assert_eq!(message["accountId"], json!(ACCOUNT));
    assert_eq!(message["raw"]["list_folder"]["accounts"], json!([ACCOUNT]));
    for e in &events {
        assert!(
            e["objectId"].is_string() && e["eventDate"].is_string() && e["data"].is_object(),
            "{e}"
        );
    }

    // 45 changes: notifications of 20, 20 and 5, in order, with distinct ids.
    let before = receiver.accepted().len();
    for i in 0..45 {
        f.emu.upload(
            ACCOUNT,
            &format!("/batch/file-{i:02}.txt"),
            format!("{i}").as_bytes(),
        );
    }
    // The folder /batch is an entry of its own: 46 entries.
    let response = f.webhook(&ingress, &[ACCOUNT]).await;
    assert_eq!(response.status(), 200);
    let cursor_before = f.cursor("docs").await;
    wait_events(&receiver, events.len() + 46, Duration::from_secs(30)).await?;
    let batch: Vec<_> = receiver.accepted().into_iter().skip(before).collect();
    let sizes: Vec<usize> = batch.iter().map(|d| d.events().len()).collect();
    assert_eq!(sizes, vec![20, 20, 6], "batches of at most 20, in order");
    let ids: BTreeSet<_> = batch.iter().map(|d| d.event_id.clone()).collect();
    assert_eq!(ids.len(), 3, "distinct event ids");
    let names: Vec<String> = batch
        .iter()
        .flat_map(|d| d.events())
        .filter(|e| e["objectType"] == "files")
        .map(|e| e["data"]["name"].as_str().unwrap_or("").to_owned())
        .collect();
    let expected: Vec<String> = (0..45).map(|i| format!("file-{i:02}.txt")).collect();
    assert_eq!(names, expected, "events in order");
    assert!(
        batch
            .iter()
            .all(|d| d.elements_signature_ok == Some(true) && d.standard_webhooks_ok == Some(true))
    );
    // The cursor moved after delivery.
    support::eventually(
        "the cursor to be committed",
        Duration::from_secs(10),
        || async { Ok(f.cursor("docs").await) },
        |c: &Option<String>| *c != cursor_before,
    )
    .await?;
    let instance = f.instances.get("docs").await?;
    assert!(
        condition(&instance, "EventsDelivering")
            .is_some_and(|c| c.status == "True" && c.reason == "Delivered")
    );
    assert!(
        instance
            .status
            .and_then(|s| s.events)
            .and_then(|e| e.last_delivery_time)
            .is_some()
    );
    Ok(())
}

#[tokio::test]
async fn cloudevents_format_is_structured_mode_with_the_same_signatures() -> Result<()> {
    let f = fixture("cloudevents").await;
    let ingress = f.ingress().start().await;
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    f.instance("ce", ACCOUNT, &receiver.url, "cloudevents")
        .await;
    f.wait_condition("ce", "Ready", "True", None).await?;
    f.emu.upload(ACCOUNT, "/a.txt", b"a");
    f.webhook(&ingress, &[ACCOUNT]).await;
    wait_events(&receiver, 1, Duration::from_secs(30)).await?;
    let d = &receiver.accepted()[0];
    assert_eq!(d.content_type, "application/cloudevents+json");
    assert_eq!(d.body["specversion"], json!("1.0"));
    assert_eq!(d.body["id"], json!(d.event_id));
    assert!(
        d.body["source"].as_str().is_some_and(
            |s| s.ends_with(&format!("/namespaces/{}/dropboxelementinstances/ce", f.ns))
        )
    );
    assert!(d.body["type"].is_string() && d.body["time"].is_string());
    assert_eq!(d.events()[0]["eventType"], json!("UPDATED"));
    assert_eq!(
        (d.elements_signature_ok, d.standard_webhooks_ok),
        (Some(true), Some(true))
    );
    Ok(())
}

#[tokio::test]
async fn instances_on_the_same_account_both_receive_and_others_none() -> Result<()> {
    let f = fixture("fan-out").await;
    let ingress = f.ingress().start().await;
    let (a, b, other) = (
        Receiver::start(Some(SIGNING_KEY.as_bytes())).await,
        Receiver::start(Some(SIGNING_KEY.as_bytes())).await,
        Receiver::start(Some(SIGNING_KEY.as_bytes())).await,
    );
    f.instance("first", ACCOUNT, &a.url, "elements").await;
    f.instance("second", ACCOUNT, &b.url, "elements").await;
    f.instance("elsewhere", OTHER_ACCOUNT, &other.url, "elements")
        .await;
    for name in ["first", "second", "elsewhere"] {
        f.wait_condition(name, "Ready", "True", None).await?;
    }
    f.emu.upload(ACCOUNT, "/shared.txt", b"x");
    f.webhook(&ingress, &[ACCOUNT]).await;
    wait_events(&a, 1, Duration::from_secs(30)).await?;
    wait_events(&b, 1, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        other.all().is_empty(),
        "an instance on another account received events"
    );
    // Each instance has its own ids.
    assert_ne!(a.accepted()[0].event_id, b.accepted()[0].event_id);
    Ok(())
}

#[tokio::test]
async fn webhook_endpoint_verifies_signatures_limits_and_echoes_challenges() -> Result<()> {
    let f = fixture("webhook-http").await;
    let ingress = f.ingress().start().await;
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    f.instance("guarded", ACCOUNT, &receiver.url, "elements")
        .await;
    f.wait_condition("guarded", "Ready", "True", None).await?;
    // The ingress's own first sync (it starts one for every instance) is over:
    // from here on only a webhook could start one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fetched_before = f.emu.calls_to("/2/files/list_folder/continue").len();
    let http = support::dropbox::http_client();
    let url = format!("{}/webhooks/dropbox/{APP_KEY}", ingress.url());

    // Challenge.
    let r = http
        .get(format!("{url}?challenge=abc123XYZ"))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/plain");
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    assert_eq!(r.text().await?, "abc123XYZ");

    f.emu.upload(ACCOUNT, "/secret-plans.txt", b"x");
    let (body, good_signature) = f.emu.webhook_body(APP_KEY, &[ACCOUNT]);
    // Wrong signature, missing signature: 403, nothing happens.
    let bad = http
        .post(&url)
        .header("X-Dropbox-Signature", "00".repeat(32))
        .body(body.clone())
        .send()
        .await?;
    assert_eq!(bad.status(), 403);
    let missing = http.post(&url).body(body.clone()).send().await?;
    assert_eq!(missing.status(), 403);
    // Too large.
    let big = vec![b' '; 1024 * 1024 + 1];
    // Refused before the body is read and the connection closed: a client still
    // writing its megabyte may see the reset instead of the 413. Either way the
    // ingress counted it as too large and accepted nothing.
    let large = http
        .post(&url)
        .header("X-Dropbox-Signature", &good_signature)
        .body(big)
        .send()
        .await;
    if let Ok(r) = &large {
        assert_eq!(r.status(), 413);
    }
    assert_eq!(
        ingress
            .metric_sum("dropbox_ingress_webhooks_total", "too_large")
            .await,
        1.0
    );
    // Malformed JSON behind a valid signature.
    let junk = b"{not json".to_vec();
    let junk_signature = hex::encode(support::dropbox::hmac_sha256(APP_SECRET.as_bytes(), &junk));
    let malformed = http
        .post(&url)
        .header("X-Dropbox-Signature", junk_signature)
        .body(junk)
        .send()
        .await?;
    assert_eq!(malformed.status(), 400);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        receiver.all().is_empty(),
        "nothing may be delivered for refused webhooks"
    );
    assert_eq!(
        f.emu.calls_to("/2/files/list_folder/continue").len(),
        fetched_before,
        "nothing may be fetched for refused webhooks"
    );

    // The genuine one is accepted and delivered.
    let ok = http
        .post(&url)
        .header("X-Dropbox-Signature", good_signature)
        .body(body)
        .send()
        .await?;
    assert_eq!(ok.status(), 200);
    wait_events(&receiver, 1, Duration::from_secs(30)).await?;
    assert!(
        ingress
            .metric_sum("dropbox_ingress_webhooks_total", "forbidden")
            .await
            >= 2.0
    );
    Ok(())
}

#[tokio::test]
async fn a_failing_callback_is_retried_and_the_cursor_waits() -> Result<()> {
    let f = fixture("retry").await;
    let ingress = f.ingress().start().await;
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    f.instance("patient", ACCOUNT, &receiver.url, "elements")
        .await;
    f.wait_condition("patient", "Ready", "True", None).await?;
    let cursor_before = f.cursor("patient").await;

    receiver.fail_for(503, Duration::from_secs(6));
    for name in ["one", "two", "three"] {
        f.emu
            .upload(ACCOUNT, &format!("/{name}.txt"), name.as_bytes());
    }
    f.webhook(&ingress, &[ACCOUNT]).await;
    let failing = f
        .wait_condition(
            "patient",
            "EventsDelivering",
            "False",
            Some("CallbackUnreachable"),
        )
        .await?;
    assert!(condition(&failing, "Ready").is_some_and(|c| c.status == "False"));
    assert_eq!(
        f.cursor("patient").await,
        cursor_before,
        "the cursor must not move while delivery fails"
    );

    let events = wait_events(&receiver, 3, Duration::from_secs(30)).await?;
    let names: Vec<&str> = events
        .iter()
        .filter_map(|e| e["data"]["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["one.txt", "two.txt", "three.txt"],
        "exactly the pending events, in order"
    );
    let refused = receiver.all().iter().filter(|d| d.status == 503).count();
    assert!(refused >= 2, "retried: {refused} refused attempts");
    // Every attempt carried the same id.
    let ids: BTreeSet<_> = receiver.all().iter().map(|d| d.event_id.clone()).collect();
    assert_eq!(ids.len(), 1);
    f.wait_condition("patient", "EventsDelivering", "True", Some("Delivered"))
        .await?;
    f.wait_condition("patient", "Ready", "True", None).await?;
    assert_ne!(f.cursor("patient").await, cursor_before);
    assert!(
        ingress
            .metric_sum("dropbox_ingress_delivery_retries_total", "")
            .await
            >= 2.0
    );
    Ok(())
}

/// `Retry-After` as an HTTP date, from the callback and from Dropbox: the
/// retry waits until that date, not the (much shorter) backoff. The dates have
/// whole seconds, so "4 s from now" means 3 to 4 s; the backoff is 200 ms.
#[tokio::test]
async fn a_retry_after_date_from_the_callback_or_dropbox_is_waited_for() -> Result<()> {
    const CONTINUE: &str = "/2/files/list_folder/continue";
    let f = fixture("retry-date").await;
    let ingress = f.ingress().env("DELIVERY_MAX_BACKOFF", "20s").start().await;
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    f.instance("dated", ACCOUNT, &receiver.url, "elements")
        .await;
    f.wait_condition("dated", "Ready", "True", None).await?;

    // The callback answers 503 once, asking to come back at a date.
    receiver.fail_next_until_date(503, 1, 4);
    f.emu.upload(ACCOUNT, "/one.txt", b"one");
    f.webhook(&ingress, &[ACCOUNT]).await;
    wait_events(&receiver, 1, Duration::from_secs(30)).await?;
    let attempts = receiver.all();
    let refused = attempts
        .iter()
        .find(|d| d.status == 503)
        .context("the 503")?;
    let retried = attempts
        .iter()
        .find(|d| d.is_accepted())
        .context("the retry")?;
    let gap = retried.at.duration_since(refused.at);
    assert!(
        gap >= Duration::from_millis(2900),
        "the callback's Retry-After date was not waited for: retried after {gap:?}"
    );

    // Dropbox answers 429 once with Retry-After as a date.
    let calls_before = f.emu.calls_to(CONTINUE).len();
    f.emu.rate_limit_next_with_date(CONTINUE, 1, 4);
    f.emu.upload(ACCOUNT, "/two.txt", b"two");
    f.webhook(&ingress, &[ACCOUNT]).await;
    wait_events(&receiver, 2, Duration::from_secs(30)).await?;
    let calls = f.emu.calls_to(CONTINUE);
    let limited = calls[calls_before..]
        .iter()
        .position(|c| c.status == 429)
        .map(|i| calls_before + i)
        .context("the 429")?;
    let next = calls
        .get(limited + 1)
        .context("the retry of list_folder/continue")?;
    let gap = next.at.duration_since(calls[limited].at);
    assert!(
        gap >= Duration::from_millis(2900),
        "Dropbox's Retry-After date was not waited for: retried after {gap:?}"
    );
    Ok(())
}

/// Killed mid-delivery and restarted with NO new webhook: the restarted ingress
/// resumes from the committed cursor by itself, and what it redelivers carries
/// the same ids with the same content.
#[tokio::test]
async fn a_killed_ingress_resumes_without_a_webhook_with_the_same_event_ids() -> Result<()> {
    let f = fixture("crash").await;
    let mut ingress = f.ingress().start().await;
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    f.instance("sturdy", ACCOUNT, &receiver.url, "elements")
        .await;
    f.wait_condition("sturdy", "Ready", "True", None).await?;

    // The callback is slow: the ingress is killed while a delivery is in flight.
    receiver.stall(Some(Duration::from_secs(3)));
    for i in 0..25 {
        f.emu.upload(ACCOUNT, &format!("/c/{i:02}.txt"), b"x");
    }
    f.webhook(&ingress, &[ACCOUNT]).await;
    support::eventually(
        "a delivery in flight",
        Duration::from_secs(20),
        || async { Ok(receiver.in_flight()) },
        |n: &usize| *n >= 1,
    )
    .await?;
    ingress.kill();
    receiver.stall(None);

    // Restarted, and told nothing: it syncs every instance once its cache is in.
    let _ingress = f.ingress().start().await;
    let events = wait_events(&receiver, 26, Duration::from_secs(30)).await?;
    let names: BTreeSet<&str> = events
        .iter()
        .filter_map(|e| e["data"]["name"].as_str())
        .collect();
    for i in 0..25 {
        assert!(
            names.contains(format!("{i:02}.txt").as_str()),
            "change {i} lost"
        );
    }
    // Duplicates carry the same id: the same id always carried the same body,
    // and every event id the same event.
    let mut by_id: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let mut events_by_id: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for d in receiver.all() {
        by_id
            .entry(d.event_id.clone())
            .or_default()
            .push(d.raw.clone());
        for e in d.events() {
            let id = e["eventId"].as_str().unwrap_or_default().to_owned();
            events_by_id.entry(id).or_default().push(e);
        }
    }
    for (id, bodies) in &by_id {
        assert!(
            bodies.windows(2).all(|w| w[0] == w[1]),
            "id {id} carried different bodies"
        );
    }
    for (id, events) in &events_by_id {
        assert!(!id.is_empty(), "an event without eventId");
        assert!(
            events.windows(2).all(|w| w[0] == w[1]),
            "event id {id} named different events"
        );
    }
    // 25 files and their folder `/c`: one event id per change.
    assert_eq!(events_by_id.len(), 26, "one event id per change");
    // The notification cut off by the kill came again, under the same id.
    let interrupted = receiver.arrived_ids()[0].clone();
    assert!(
        by_id.contains_key(&interrupted),
        "the interrupted notification {interrupted} was redelivered with its id"
    );
    Ok(())
}

#[tokio::test]
async fn two_ingress_replicas_lose_nothing_and_never_commit_a_cursor_twice() -> Result<()> {
    let f = fixture("replicas").await;
    let a = f.ingress().name("ingress-a").start().await;
    let b = f.ingress().name("ingress-b").start().await;
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    f.instance("shared", ACCOUNT, &receiver.url, "elements")
        .await;
    f.wait_condition("shared", "Ready", "True", None).await?;

    // Record every committed cursor (of the cursor ConfigMap in the operator
    // namespace, named by the instance's uid).
    let configmaps: Api<ConfigMap> = Api::namespaced(f.client.clone(), &f.ns);
    let cursor_cm = contract::cursor_configmap_name(&f.uid("shared").await);
    let commits = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let recorder = {
        let commits = commits.clone();
        let stream = watcher(
            configmaps,
            watcher::Config::default().fields(&format!("metadata.name={cursor_cm}")),
        )
        .applied_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(cm)) = stream.next().await {
                if let Some(c) = cm.data.and_then(|d| d.get("cursor").cloned()) {
                    let mut commits = commits.lock().expect("commits lock");
                    if commits.last() != Some(&c) {
                        commits.push(c);
                    }
                }
            }
        })
    };

    let mut expected = BTreeSet::new();
    for round in 0..6 {
        for i in 0..3 {
            let name = format!("r{round}-{i}.txt");
            f.emu.upload(ACCOUNT, &format!("/{name}"), b"x");
            expected.insert(name);
        }
        // Both replicas are told at once, as a load balancer might.
        let (ra, rb) = tokio::join!(f.webhook(&a, &[ACCOUNT]), f.webhook(&b, &[ACCOUNT]));
        assert_eq!((ra.status().as_u16(), rb.status().as_u16()), (200, 200));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let all = support::eventually(
        "every change delivered",
        Duration::from_secs(40),
        || async { Ok(receiver.accepted_events()) },
        |events: &Vec<Value>| {
            let names: BTreeSet<String> = events
                .iter()
                .filter_map(|e| e["data"]["name"].as_str().map(str::to_owned))
                .collect();
            expected.is_subset(&names)
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    recorder.abort();
    let commits = commits.lock().expect("commits lock").clone();
    assert!(commits.len() > 1, "commits were recorded: {commits:?}");
    let distinct: BTreeSet<_> = commits.iter().collect();
    assert_eq!(
        distinct.len(),
        commits.len(),
        "a cursor was committed twice: {commits:?}"
    );
    // Duplicates (both replicas syncing the same range) share ids.
    let mut by_id: BTreeMap<String, String> = BTreeMap::new();
    for d in receiver.accepted() {
        let events = d.body["message"]["events"].to_string();
        if let Some(previous) = by_id.insert(d.event_id.clone(), events.clone()) {
            assert_eq!(previous, events, "one id, different events");
        }
    }
    eprintln!(
        "{} events received for {} changes; {} commits; conflicts a={} b={}",
        all.len(),
        expected.len(),
        commits.len(),
        a.metric_sum("dropbox_ingress_cursor_conflicts_total", "")
            .await,
        b.metric_sum("dropbox_ingress_cursor_conflicts_total", "")
            .await
    );
    Ok(())
}

#[tokio::test]
async fn a_cursor_reset_sends_one_unknown_event_then_normal_flow() -> Result<()> {
    let f = fixture("reset").await;
    let ingress = f.ingress().start().await;
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    f.instance("again", ACCOUNT, &receiver.url, "elements")
        .await;
    f.wait_condition("again", "Ready", "True", None).await?;

    f.emu.upload(ACCOUNT, "/before-reset.txt", b"x");
    f.emu.reset_cursors(ACCOUNT);
    f.webhook(&ingress, &[ACCOUNT]).await;
    let events = wait_events(&receiver, 1, Duration::from_secs(30)).await?;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["eventType"], json!("UNKNOWN"));

    f.emu.upload(ACCOUNT, "/after-reset.txt", b"x");
    f.webhook(&ingress, &[ACCOUNT]).await;
    let events = wait_events(&receiver, 2, Duration::from_secs(30)).await?;
    assert_eq!(events[1]["eventType"], json!("UPDATED"));
    assert_eq!(events[1]["data"]["name"], json!("after-reset.txt"));
    assert_eq!(events.len(), 2);
    Ok(())
}

#[tokio::test]
async fn callbacks_to_internal_addresses_are_refused_unless_allowed() -> Result<()> {
    let f = fixture("ssrf").await;
    // This ingress allows nothing: the defaults a production install has.
    let ingress = OperatorProcess::ingress(&f.ns, &f.emu.url)
        .env("DELIVERY_BASE_BACKOFF", "200ms")
        .env("DELIVERY_MAX_BACKOFF", "2s")
        .env("HEARTBEAT_INTERVAL", "1s")
        .start()
        .await;
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    let port = receiver
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .unwrap_or("80")
        .to_owned();
    // Nothing is ever sent to these: the check happens before connecting.
    let targets = [
        ("loopback", format!("http://127.0.0.1:{port}/events")),
        ("ipv6-loopback", format!("http://[::1]:{port}/events")),
        (
            "metadata",
            "http://169.254.169.254/latest/meta-data".to_owned(),
        ),
        ("ten", "http://10.1.2.3/hook".to_owned()),
        ("one-seven-two", "http://172.16.5.4/hook".to_owned()),
        ("one-nine-two", "http://192.168.1.20/hook".to_owned()),
        ("cgnat", "http://100.64.0.7/hook".to_owned()),
        ("link-local-v6", "http://[fe80::1]/hook".to_owned()),
        ("unique-local-v6", "http://[fd00::1]/hook".to_owned()),
        ("unspecified", format!("http://0.0.0.0:{port}/events")),
        ("localhost-name", format!("http://localhost:{port}/events")),
    ];
    for (name, url) in &targets {
        f.instance(name, ACCOUNT, url, "elements").await;
    }
    for (name, _) in &targets {
        f.wait_condition(name, "EventsReady", "True", None).await?;
    }
    f.emu.upload(ACCOUNT, "/ssrf.txt", b"x");
    f.webhook(&ingress, &[ACCOUNT]).await;
    for (name, url) in &targets {
        let refused = f
            .wait_condition(name, "EventsDelivering", "False", Some("CallbackForbidden"))
            .await
            .with_context(|| format!("{name} ({url})"))?;
        let message = &condition(&refused, "EventsDelivering")
            .context("condition")?
            .message;
        assert!(message.contains("not allowed"), "{name}: {message}");
    }
    assert!(receiver.all().is_empty(), "a forbidden callback was called");
    Ok(())
}

/// A Secret or ConfigMap the operator would write but did not make is never
/// overwritten or adopted: the condition names it, and no code is spent.
#[tokio::test]
async fn objects_the_operator_did_not_make_are_never_taken_over() -> Result<()> {
    let f = fixture("takeover").await;
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    let secrets: Api<Secret> = Api::namespaced(f.client.clone(), &f.ns);

    // Someone else's Secret where the token Secret would go.
    f.put_secret("squatter-dropbox-token", &[("mine", "keep-me")])
        .await;
    f.instance("squatter", ACCOUNT, &receiver.url, "elements")
        .await;
    let refused = f
        .wait_condition("squatter", "Authorized", "False", Some("ResourceConflict"))
        .await?;
    let message = condition(&refused, "Authorized")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("squatter-dropbox-token"), "{message}");
    assert!(
        f.emu.calls_to("/oauth2/token").is_empty(),
        "no code may be sent while its tokens could not be stored"
    );
    let kept = secrets.get("squatter-dropbox-token").await?;
    assert_eq!(
        kept.data
            .unwrap_or_default()
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        ["mine"]
    );
    // Once it is gone, the same code works: it was never burned.
    secrets
        .delete("squatter-dropbox-token", &Default::default())
        .await?;
    let _ingress = f.ingress().start().await;
    f.wait_condition("squatter", "Ready", "True", None).await?;

    // Someone else's Secret where the projection goes: left alone, EventsReady says so.
    let uid = f.uid("squatter").await;
    let projected = contract::instance_secret_name(&uid);
    secrets.delete(&projected, &Default::default()).await?;
    f.put_secret(&projected, &[("foreign", "data")]).await;
    // A rotated signature key makes the controller write the projection again.
    f.put_secret(
        "events-key",
        &[("event.notification.signature.key", "rotated-signing-key")],
    )
    .await;
    let conflicted = f
        .wait_condition("squatter", "EventsReady", "False", Some("ResourceConflict"))
        .await?;
    let message = condition(&conflicted, "EventsReady")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains(&projected), "{message}");
    let untouched = secrets.get(&projected).await?;
    assert_eq!(
        untouched
            .data
            .unwrap_or_default()
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        ["foreign"]
    );
    Ok(())
}

/// Both servers listen dual-stack on `[::]` (the Deployment's setting), so
/// IPv6-only and IPv4 clusters work; metrics stay off the webhook port.
#[tokio::test]
async fn the_ingress_listens_on_ipv4_and_ipv6_with_metrics_on_their_own_port() -> Result<()> {
    let f = fixture("dual-stack").await;
    let ingress = f.ingress().dual_stack().start().await;
    let (webhooks, metrics) = (ingress.listen_port, ingress.metrics_port);
    let http = support::dropbox::http_client();
    for host in ["127.0.0.1", "[::1]"] {
        let challenge = http
            .get(format!(
                "http://{host}:{webhooks}/webhooks/dropbox/{APP_KEY}?challenge=v"
            ))
            .send()
            .await?;
        // No instance uses the app key yet: the challenge is still answered.
        assert_eq!(challenge.status(), 200, "{host}");
        let scraped = http
            .get(format!("http://{host}:{metrics}/metrics"))
            .send()
            .await?;
        assert_eq!(scraped.status(), 200, "{host}");
        assert!(
            scraped
                .text()
                .await?
                .contains("dropbox_ingress_queue_depth")
        );
        // Not on the public port.
        let hidden = http
            .get(format!("http://{host}:{webhooks}/metrics"))
            .send()
            .await?;
        assert_eq!(hidden.status(), 404, "{host}: metrics on the webhook port");
    }
    Ok(())
}

/// `spec.events.path` limits events to a folder and below; changing it
/// re-baselines with exactly one UNKNOWN event, then reports the new folder.
#[tokio::test]
async fn events_can_be_limited_to_a_folder_and_a_new_folder_re_baselines() -> Result<()> {
    let f = fixture("folder-scope").await;
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    let ingress = f.ingress().start().await;
    f.emu.create_folder(ACCOUNT, "/Reports");
    f.emu.create_folder(ACCOUNT, "/Other");
    f.instance_with(
        "scoped",
        ACCOUNT,
        &receiver.url,
        "elements",
        json!({"path": "/Reports"}),
    )
    .await;
    f.wait_condition("scoped", "Ready", "True", None).await?;
    let uid = f.uid("scoped").await;
    let configmaps: Api<ConfigMap> = Api::namespaced(f.client.clone(), &f.ns);
    // Waits until the controller's cursor lists `folder`.
    let cursor_folder = |folder: &'static str| {
        support::eventually(
            folder,
            Duration::from_secs(30),
            || async {
                Ok(configmaps
                    .get_opt(&contract::cursor_configmap_name(&uid))
                    .await?
                    .and_then(|cm| cm.data)
                    .and_then(|d| d.get(contract::PATH_KEY).cloned()))
            },
            move |p: &Option<String>| p.as_deref() == Some(folder),
        )
    };
    cursor_folder("/Reports").await?;

    f.emu.upload(ACCOUNT, "/Other/not-this.txt", b"x");
    f.emu.upload(ACCOUNT, "/Reports/q4.pdf", b"x");
    f.webhook(&ingress, &[ACCOUNT]).await;
    wait_events(&receiver, 1, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let paths = |events: Vec<Value>| -> Vec<String> {
        events
            .iter()
            .map(|e| {
                e["data"]["path_display"]
                    .as_str()
                    .unwrap_or(e["eventType"].as_str().unwrap_or_default())
                    .to_owned()
            })
            .collect()
    };
    assert_eq!(paths(receiver.accepted_events()), ["/Reports/q4.pdf"]);

    // Another folder: one UNKNOWN event, then only what changes there.
    f.instances
        .patch(
            "scoped",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"events": {"path": "/Other"}}})),
        )
        .await?;
    cursor_folder("/Other").await?;
    f.emu.upload(ACCOUNT, "/Reports/ignored-now.pdf", b"x");
    f.emu.upload(ACCOUNT, "/Other/wanted.txt", b"x");
    f.webhook(&ingress, &[ACCOUNT]).await;
    wait_events(&receiver, 3, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        paths(receiver.accepted_events()),
        ["/Reports/q4.pdf", "UNKNOWN", "/Other/wanted.txt"]
    );
    // The folder is checked at admission: Dropbox paths start with a slash.
    let refused = f
        .instances
        .patch(
            "scoped",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"events": {"path": "Reports/"}}})),
        )
        .await;
    assert!(
        refused.is_err(),
        "an invalid folder is refused at admission"
    );
    Ok(())
}

/// Dropbox may answer with small pages (here three entries each); the events of
/// several pages are gathered into notifications of up to 20, and the cursor
/// committed is the one after the last page delivered.
#[tokio::test]
async fn small_pages_are_gathered_into_notifications_of_up_to_20_events() -> Result<()> {
    let f = fixture("small-pages").await;
    f.emu.set_list_limit(3);
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    let ingress = f.ingress().start().await;
    f.instance("small", ACCOUNT, &receiver.url, "elements")
        .await;
    f.wait_condition("small", "Ready", "True", None).await?;
    let made: Vec<String> = (0..45).map(|i| format!("/small-{i:02}.txt")).collect();
    for path in &made {
        f.emu.upload(ACCOUNT, path, path.as_bytes());
    }
    f.webhook(&ingress, &[ACCOUNT]).await;
    let events = wait_events(&receiver, made.len(), Duration::from_secs(30)).await?;
    let paths: Vec<&str> = events
        .iter()
        .filter_map(|e| e["data"]["path_display"].as_str())
        .collect();
    assert_eq!(paths, made, "every change once, in order");
    let sizes: Vec<usize> = receiver
        .accepted()
        .iter()
        .map(|d| d.events().len())
        .collect();
    // Fifteen pages of three: notifications of 18, 18 and 9 events, not fifteen of 3.
    assert_eq!(sizes, [18, 18, 9], "events per notification");
    // The cursor after the last page: nothing is left to list.
    let end = f.emu.change_log(ACCOUNT).len();
    support::eventually(
        "the committed cursor to be the one after the last page",
        Duration::from_secs(10),
        || async {
            Ok(f.cursor("small")
                .await
                .and_then(|c| f.emu.cursor_position(&c)))
        },
        |pos: &Option<usize>| *pos == Some(end),
    )
    .await?;
    Ok(())
}

/// Another tenant creates 100 instances that claim this app key with wrong app
/// secrets: genuine notifications are still accepted (every distinct secret is
/// tried, the one that verified last first), whether they name this tenant's
/// account or only accounts no instance has; forged ones are still refused.
#[tokio::test]
async fn claims_with_wrong_secrets_cannot_get_genuine_notifications_refused() -> Result<()> {
    let f = fixture("claims").await;
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    // The claims: apiKey instances (their own accounts) with this app key.
    let claimer = support::namespace(&f.client, "claims-tenant").await;
    // (WATCH_NAMESPACE: ignored by this ingress, which reads only its data
    // namespace; an ingress that watched instances would need both.)
    let ingress = f
        .ingress()
        .env("WATCH_NAMESPACE", &format!("{},{claimer}", f.ns))
        .start()
        .await;
    let secrets: Api<Secret> = Api::namespaced(f.client.clone(), &claimer);
    let claims: Api<DropboxElementInstance> = Api::namespaced(f.client.clone(), &claimer);
    const CLAIMS: usize = 100;
    for i in 0..CLAIMS {
        let account = format!("dbid:AAB-claimer-{i:03}");
        f.emu
            .add_account(&account, &format!("claimer{i}@example.com"), "Claimer");
        let token = f.emu.issue_long_lived_token(APP_KEY, &account);
        support::put_secret(
            &secrets,
            &format!("claim-{i}"),
            &[
                ("oauth.api.key", APP_KEY),
                ("oauth.api.secret", &format!("WRONG-SECRET-{i}")),
                ("apiKey", &token),
            ],
        )
        .await?;
        let instance: DropboxElementInstance = serde_json::from_value(json!({
            "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
            "kind": "DropboxElementInstance",
            "metadata": {"name": format!("claim-{i}")},
            "spec": {
                "element": {"key": "dropbox"},
                "authentication": {
                    "type": "apiKey",
                    "apiKeySecretRef": {"name": format!("claim-{i}")},
                    "appSecretRef": {"name": format!("claim-{i}")}
                },
                "events": {"enabled": true, "callbackUrl": "https://claims.example.com/hook"}
            }
        }))?;
        claims.create(&PostParams::default(), &instance).await?;
    }
    // The controller watches this namespace too.
    let _claims_controller = controller_process(&claimer, &f.emu)
        .env("DATA_NAMESPACE", &f.ns)
        .name("claims-controller")
        .start()
        .await;
    f.instance("genuine", ACCOUNT, &receiver.url, "elements")
        .await;
    f.wait_condition("genuine", "Ready", "True", None).await?;
    // Every claim is projected (so the ingress knows it) before the webhooks.
    let data: Api<Secret> = Api::namespaced(f.client.clone(), &f.ns);
    support::eventually(
        "the claims to be projected",
        Duration::from_secs(90),
        || async {
            Ok(data
                .list(
                    &kube::api::ListParams::default()
                        .labels(&contract::role_selector(contract::ROLE_PROJECTION)),
                )
                .await?
                .items
                .len())
        },
        |n: &usize| *n > CLAIMS,
    )
    .await?;
    let url = format!("{}/webhooks/dropbox/{APP_KEY}", ingress.url());
    let mut answers = BTreeMap::new();
    for round in 0..10 {
        f.emu
            .upload(ACCOUNT, &format!("/genuine-{round}.txt"), b"x");
        // Naming this tenant's account; naming only an account no instance has.
        for accounts in [&[ACCOUNT][..], &[OTHER_ACCOUNT][..]] {
            let status = f.emu.send_webhook(&url, APP_KEY, accounts).await.status();
            *answers
                .entry(format!("genuine {accounts:?}: {status}"))
                .or_insert(0) += 1;
        }
        let (body, _) = f.emu.webhook_body(APP_KEY, &[OTHER_ACCOUNT]);
        let forged = reqwest::Client::new()
            .post(&url)
            .header("X-Dropbox-Signature", "ab".repeat(32))
            .body(body)
            .send()
            .await?
            .status();
        *answers.entry(format!("forged: {forged}")).or_insert(0) += 1;
    }
    println!("claims: {answers:?}");
    let mut expected = vec![
        "forged: 403 Forbidden".to_owned(),
        format!("genuine [\"{OTHER_ACCOUNT}\"]: 200 OK"),
        format!("genuine [\"{ACCOUNT}\"]: 200 OK"),
    ];
    expected.sort();
    assert_eq!(
        answers.keys().cloned().collect::<Vec<_>>(),
        expected,
        "{answers:?}"
    );
    wait_events(&receiver, 10, Duration::from_secs(30)).await?;
    Ok(())
}

/// Every stall is visible: a Dropbox failure (5xx), the watched folder removed
/// (`path/not_found`), the cursor ConfigMap deleted, and cursor commits refused
/// by the API server each turn EventsDelivering False with their own reason
/// within one retry, and the next delivery turns it True again.
#[tokio::test]
async fn every_stall_is_visible_and_the_next_delivery_clears_it() -> Result<()> {
    let f = fixture("stalls").await;
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    let ingress = f.ingress().start().await;
    f.emu.create_folder(ACCOUNT, "/Watched");
    f.instance_with(
        "stalls",
        ACCOUNT,
        &receiver.url,
        "elements",
        json!({"path": "/Watched"}),
    )
    .await;
    f.wait_condition("stalls", "Ready", "True", None).await?;
    let mut n = 0;
    let mut change = |emu: &Emulator| {
        n += 1;
        emu.upload(ACCOUNT, &format!("/Watched/file-{n}.txt"), b"x");
    };
    let mut table = Vec::new();
    let mut expect = async |what: &str, reason: &str| -> Result<()> {
        let t = Instant::now();
        let i = f
            .wait_condition("stalls", "EventsDelivering", "False", Some(reason))
            .await
            .with_context(|| format!("{what}: EventsDelivering=False/{reason}"))?;
        let message = condition(&i, "EventsDelivering")
            .map(|c| c.message.clone())
            .unwrap_or_default();
        table.push(format!(
            "| {what} | False/{reason} after {:.1}s | {message} |",
            t.elapsed().as_secs_f64()
        ));
        Ok(())
    };

    // Dropbox answers 503.
    f.emu
        .fail_for("/2/files/list_folder/continue", Duration::from_secs(4), 503);
    change(&f.emu);
    f.webhook(&ingress, &[ACCOUNT]).await;
    expect("Dropbox 503", "DropboxUnavailable").await?;
    f.wait_condition("stalls", "EventsDelivering", "True", Some("Delivered"))
        .await?;

    // The watched folder is removed.
    f.emu.delete(ACCOUNT, "/Watched");
    f.webhook(&ingress, &[ACCOUNT]).await;
    expect("events.path removed", "DropboxRejected").await?;
    f.emu.create_folder(ACCOUNT, "/Watched");
    change(&f.emu);
    f.webhook(&ingress, &[ACCOUNT]).await;
    f.wait_condition("stalls", "EventsDelivering", "True", Some("Delivered"))
        .await?;

    // The cursor ConfigMap is deleted: the controller makes a new one, and the
    // receiver is told (UNKNOWN) that it may have missed changes.
    let uid = f.uid("stalls").await;
    let cursor_name = contract::cursor_configmap_name(&uid);
    let configmaps: Api<ConfigMap> = Api::namespaced(f.client.clone(), &f.ns);
    // Deleted again whenever the controller makes it, until the stall was seen.
    let deleting = tokio::spawn({
        let (configmaps, cursor_name) = (configmaps.clone(), cursor_name.clone());
        async move {
            loop {
                let _ = configmaps
                    .delete(&cursor_name, &kube::api::DeleteParams::default())
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    change(&f.emu);
    f.webhook(&ingress, &[ACCOUNT]).await;
    let seen = expect("cursor ConfigMap deleted", "CursorMissing").await;
    deleting.abort();
    seen?;
    f.wait_condition("stalls", "EventsDelivering", "True", Some("Delivered"))
        .await?;
    support::eventually(
        "an UNKNOWN event after the new cursor",
        Duration::from_secs(20),
        || async { Ok(receiver.accepted_events()) },
        |events: &Vec<Value>| events.iter().any(|e| e["eventType"] == "UNKNOWN"),
    )
    .await?;

    // The API server refuses every commit of the cursor (an admission policy).
    let policy = format!("deny-cursor-{}", f.ns);
    let manifest = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
         "metadata": {"name": policy},
         "spec": {"failurePolicy": "Fail",
                  "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                      "resources": ["configmaps"], "operations": ["UPDATE"]}]},
                  "validations": [{"expression": format!("object.metadata.name != '{cursor_name}'"),
                                   "message": "cursor commits are refused (test)"}]}},
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
         "metadata": {"name": policy},
         "spec": {"policyName": policy, "validationActions": ["Deny"],
                  "matchResources": {"namespaceSelector": {"matchLabels":
                      {"kubernetes.io/metadata.name": f.ns}}}}}
    ]});
    let (ok, _, err) = support::kubectl_stdin(&["apply", "-f", "-"], &manifest.to_string());
    anyhow::ensure!(ok, "{err}");
    let mut refused = false;
    for _ in 0..20 {
        change(&f.emu);
        f.webhook(&ingress, &[ACCOUNT]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let i = f.instances.get("stalls").await?;
        if support::condition_is(&i, "EventsDelivering", "False", Some("CursorCommitFailed")) {
            refused = true;
            break;
        }
    }
    anyhow::ensure!(refused, "CursorCommitFailed not reported");
    expect("cursor commits refused", "CursorCommitFailed").await?;
    let (ok, _, err) = support::kubectl_stdin(&["delete", "-f", "-"], &manifest.to_string());
    anyhow::ensure!(ok, "{err}");
    f.wait_condition("stalls", "EventsDelivering", "True", Some("Delivered"))
        .await?;
    println!(
        "\nstall | reported | message\n|---|---|---|\n{}",
        table.join("\n")
    );
    Ok(())
}
