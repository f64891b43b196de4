//! The long-poll event source (`spec.events.source: longpoll`) end to end: the
//! real controller and ingress processes on a real control plane, the Dropbox
//! emulator (which serves the notify host's `list_folder/longpoll` too) and a
//! callback receiver. No test here ever sends a webhook.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use dropbox_operator::api::DropboxElementInstance;
use dropbox_operator::contract;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use support::dropbox::Emulator;
use support::operator::{OperatorProcess, Process};
use support::receiver::{Receiver, wait_events};

const APP_KEY: &str = "app-key-longpoll";
const APP_SECRET: &str = "APP-SECRET-l0ngp0ll";
const ACCOUNT: &str = "dbid:AAB-longpoll-account-0001";
const SIGNING_KEY: &str = "longpoll-signing-key";
const LONGPOLL_ROUTE: &str = "/2/files/list_folder/longpoll";

struct Fixture {
    client: Client,
    ns: String,
    emu: Emulator,
    instances: Api<DropboxElementInstance>,
    _controller: Process,
}

async fn fixture(test: &str) -> Fixture {
    let (client, ns, emu) = support::fixture::emulated_namespace(test, APP_KEY, APP_SECRET).await;
    emu.add_account(ACCOUNT, "grace@example.com", "Grace Hopper");
    let controller = OperatorProcess::new(&ns, &emu.url)
        .env("INGRESS_LONGPOLL_TIMEOUT", "30s")
        .start()
        .await;
    let f = Fixture {
        instances: Api::namespaced(client.clone(), &ns),
        client,
        ns,
        emu,
        _controller: controller,
    };
    support::put_secret(
        &Api::namespaced(f.client.clone(), &f.ns),
        "events-key",
        &[("event.notification.signature.key", SIGNING_KEY)],
    )
    .await
    .expect("signature key Secret");
    f
}

impl Fixture {
    fn ingress(&self) -> OperatorProcess {
        support::fixture::quick_ingress(&self.ns, &self.emu)
            .env("LONGPOLL_TIMEOUT", "30s")
            .env("LONGPOLL_MAX_BACKOFF", "4s")
            // Nothing here may be delivered by the periodic resync.
            .env("RESYNC_INTERVAL", "1h")
    }

    /// An apiKey instance (no app secret at all) whose changes are long-polled.
    async fn instance(&self, name: &str, callback: &str) {
        let token = self.emu.issue_long_lived_token(APP_KEY, ACCOUNT);
        support::put_secret(
            &Api::namespaced(self.client.clone(), &self.ns),
            &format!("{name}-token"),
            &[("apiKey", &token)],
        )
        .await
        .expect("token Secret");
        let instance: DropboxElementInstance = serde_json::from_value(json!({
            "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
            "kind": "DropboxElementInstance",
            "metadata": {"name": name},
            "spec": {
                "element": {"key": "dropbox"},
                "authentication": {
                    "type": "apiKey",
                    "apiKeySecretRef": {"name": format!("{name}-token")}
                },
                "events": {
                    "enabled": true,
                    "source": "longpoll",
                    "callbackUrl": callback,
                    "signatureKeySecretRef": {"name": "events-key"}
                }
            }
        }))
        .expect("instance manifest");
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

    async fn cursor(&self, uid: &str) -> Option<String> {
        Api::<ConfigMap>::namespaced(self.client.clone(), &self.ns)
            .get_opt(&contract::cursor_configmap_name(uid))
            .await
            .ok()
            .flatten()
            .and_then(|cm| cm.data)
            .and_then(|d| d.get(contract::CURSOR_KEY).cloned())
    }

    /// Waits until at least `n` long-polls are held open against the emulator.
    async fn wait_longpolls(&self, n: usize) -> Result<()> {
        support::eventually(
            &format!("{n} long-polls held"),
            Duration::from_secs(60),
            || async { Ok(self.emu.longpolls_waiting()) },
            |held: &usize| *held >= n,
        )
        .await
        .map(|_| ())
    }
}

#[tokio::test]
async fn longpolled_changes_arrive_with_no_webhook_and_no_app_secret() -> Result<()> {
    let f = fixture("longpoll-basic").await;
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    f.instance("quiet", &receiver.url).await;

    // The controller runs the ingress with the notify host and the timeout.
    let deployments: Api<Deployment> = Api::namespaced(f.client.clone(), &f.ns);
    let deployment = support::eventually(
        "the ingress Deployment",
        Duration::from_secs(30),
        || support::get_opt(&deployments, "dropbox-webhook-ingress"),
        Option::is_some,
    )
    .await?
    .context("deployment")?;
    let env: Vec<(String, String)> = deployment
        .spec
        .template
        .spec
        .map(|p| p.containers[0].env.clone().unwrap_or_default())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| Some((e.name, e.value?)))
        .collect();
    let env_of = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.trim_end_matches('/').to_owned())
    };
    assert_eq!(env_of("DROPBOX_NOTIFY_URL"), Some(f.emu.url.clone()));
    assert_eq!(env_of("LONGPOLL_TIMEOUT").as_deref(), Some("30s"));

    let ingress = f.ingress().start().await;
    let instance = f
        .wait_condition("quiet", "EventsReady", "True", Some("IngressReady"))
        .await?;
    let ready = support::condition(&instance, "EventsReady").context("EventsReady")?;
    assert!(ready.message.contains("long-polls"), "{}", ready.message);
    f.wait_condition("quiet", "Ready", "True", None).await?;
    // No webhook to register, and no app secret projected.
    let instance = f.instances.get("quiet").await?;
    assert_eq!(
        instance
            .status
            .as_ref()
            .and_then(|s| s.events.as_ref())
            .and_then(|e| e.webhook_path.clone()),
        None
    );
    let uid = instance.uid().context("uid")?;
    let projected = Api::<Secret>::namespaced(f.client.clone(), &f.ns)
        .get(&contract::instance_secret_name(&uid))
        .await?;
    let data = projected.data.unwrap_or_default();
    assert!(data.contains_key(contract::ACCESS_TOKEN_KEY));
    assert!(!data.contains_key(contract::APP_SECRET_KEY));

    // A long-poll is held.
    f.wait_longpolls(1).await?;
    let committed = f.cursor(&uid).await.context("cursor")?;

    // Changes arrive, signed, with no webhook; each change once.
    let started = Instant::now();
    f.emu.upload(ACCOUNT, "/Reports/q1.txt", b"one");
    let events = wait_events(&receiver, 2, Duration::from_secs(20)).await?;
    let latency = started.elapsed();
    // The long-poll that announced them (calls are recorded when answered)
    // came from the committed cursor, without a token.
    let polls = f.emu.calls_to(LONGPOLL_ROUTE);
    let poll = polls
        .iter()
        .find(|c| c.status == 200)
        .context("an answered long-poll")?;
    assert!(poll.header("authorization").is_none(), "noauth route");
    let body: Value = serde_json::from_str(&poll.body)?;
    assert_eq!(body, json!({"cursor": committed, "timeout": 30}));
    let names: Vec<&str> = events
        .iter()
        .filter_map(|e| e["data"]["name"].as_str())
        .collect();
    assert_eq!(names, ["Reports", "q1.txt"], "{events:?}");
    assert!(
        receiver
            .accepted()
            .iter()
            .all(|d| d.elements_signature_ok == Some(true) && d.standard_webhooks_ok == Some(true))
    );
    f.emu.upload(ACCOUNT, "/Reports/q2.txt", b"two");
    f.emu.delete(ACCOUNT, "/Reports/q1.txt");
    let events = wait_events(&receiver, 4, Duration::from_secs(20)).await?;
    let tail: Vec<(&str, &str)> = events[2..]
        .iter()
        .map(|e| {
            (
                e["eventType"].as_str().unwrap_or_default(),
                e["data"]["name"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        tail == [("UPDATED", "q2.txt"), ("DELETED", "q1.txt")],
        "{tail:?}"
    );
    println!("change to delivery via long-poll: {latency:?}");
    assert!(latency < Duration::from_secs(5), "{latency:?}");
    // The webhook endpoint never saw a request, and the committed cursor moved.
    assert_eq!(
        ingress
            .metric_sum("dropbox_ingress_webhooks_total", "")
            .await,
        0.0
    );
    assert!(
        ingress
            .metric_sum("dropbox_ingress_longpoll_results_total", "changes")
            .await
            >= 1.0
    );
    assert_eq!(
        ingress.metric_sum("dropbox_ingress_longpolls", "").await,
        1.0
    );
    assert_ne!(f.cursor(&uid).await, Some(committed));
    Ok(())
}

#[tokio::test]
async fn a_restarted_ingress_resumes_long_polls_and_delivers_what_changed_meanwhile() -> Result<()>
{
    let f = fixture("longpoll-restart").await;
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    f.instance("steady", &receiver.url).await;
    let mut ingress = f.ingress().start().await;
    f.wait_condition("steady", "Ready", "True", None).await?;
    f.wait_longpolls(1).await?;
    f.emu.upload(ACCOUNT, "/a/before.txt", b"x");
    wait_events(&receiver, 2, Duration::from_secs(20)).await?;
    // The next long-poll starts only once that sync committed: nothing is in
    // flight when the process dies.
    f.wait_longpolls(1).await?;

    // Killed (no drain): its long-poll dies with it.
    ingress.kill();
    support::eventually(
        "the long-poll to end",
        Duration::from_secs(10),
        || async { Ok(f.emu.longpolls_waiting()) },
        |n: &usize| *n == 0,
    )
    .await?;
    for i in 0..5 {
        f.emu
            .upload(ACCOUNT, &format!("/a/while-down-{i}.txt"), b"x");
    }
    // Nothing is delivered while no replica runs.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.accepted_events().len(), 2);

    let _ingress = f.ingress().start().await;
    let events = wait_events(&receiver, 7, Duration::from_secs(30)).await?;
    f.wait_longpolls(1).await?;
    // And the long-poll is back: a later change arrives at once (the periodic
    // resync is an hour away).
    let started = Instant::now();
    f.emu.upload(ACCOUNT, "/a/after.txt", b"x");
    let events_after = wait_events(&receiver, 8, Duration::from_secs(10)).await?;
    println!(
        "change to delivery after the restart: {:?}",
        started.elapsed()
    );

    let names: BTreeSet<String> = events_after
        .iter()
        .filter_map(|e| e["data"]["name"].as_str().map(str::to_owned))
        .collect();
    for i in 0..5 {
        assert!(names.contains(&format!("while-down-{i}.txt")), "{names:?}");
    }
    assert!(names.contains("after.txt") && names.contains("before.txt"));
    // Every change once per event id (at least once; here nothing was in
    // flight at the kill, so nothing came twice).
    let ids: BTreeSet<&str> = events_after
        .iter()
        .filter_map(|e| e["eventId"].as_str())
        .collect();
    assert_eq!(ids.len(), events_after.len(), "{events:?}");
    assert_eq!(events_after.len(), 8, "{events_after:?}");
    Ok(())
}

#[tokio::test]
async fn a_reset_cursor_re_baselines_with_one_unknown_event() -> Result<()> {
    let f = fixture("longpoll-reset").await;
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    f.instance("renewed", &receiver.url).await;
    let _ingress = f.ingress().start().await;
    f.wait_condition("renewed", "Ready", "True", None).await?;
    f.wait_longpolls(1).await?;

    f.emu.reset_cursors(ACCOUNT);
    let events = wait_events(&receiver, 1, Duration::from_secs(20)).await?;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["eventType"], json!("UNKNOWN"));
    // The long-poll itself was told `reset` (a route error, as on continue).
    let reset = f
        .emu
        .calls_to(LONGPOLL_ROUTE)
        .into_iter()
        .find(|c| c.status == 409)
        .context("a long-poll answered reset")?;
    assert!(reset.header("authorization").is_none());

    f.wait_longpolls(1).await?;
    f.emu.upload(ACCOUNT, "/after-reset.txt", b"x");
    let events = wait_events(&receiver, 2, Duration::from_secs(20)).await?;
    assert_eq!(events[1]["eventType"], json!("UPDATED"));
    assert_eq!(events[1]["data"]["name"], json!("after-reset.txt"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.accepted_events().len(), 2, "exactly one UNKNOWN");
    Ok(())
}

/// Gaps between the arrivals of consecutive long-polls from `from` on.
fn gaps(emu: &Emulator, from: Instant) -> Vec<Duration> {
    let at: Vec<Instant> = emu
        .calls_to(LONGPOLL_ROUTE)
        .into_iter()
        .map(|c| c.at)
        .filter(|at| *at >= from)
        .collect();
    at.windows(2).map(|w| w[1] - w[0]).collect()
}

#[tokio::test]
async fn dropbox_backoff_and_failures_space_the_long_polls() -> Result<()> {
    let f = fixture("longpoll-backoff").await;
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    f.instance("patient", &receiver.url).await;
    let _ingress = f.ingress().start().await;
    f.wait_condition("patient", "Ready", "True", None).await?;
    f.wait_longpolls(1).await?;

    // Long-polls that time out after 300 ms follow each other at once...
    f.emu
        .set_longpoll_max_wait(Some(Duration::from_millis(300)));
    f.emu.upload(ACCOUNT, "/wake.txt", b"x"); // ends the long-poll in flight
    wait_events(&receiver, 1, Duration::from_secs(20)).await?;
    let from = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let quick = gaps(&f.emu, from);
    assert!(quick.len() >= 4, "{quick:?}");
    assert!(
        quick.iter().all(|g| *g < Duration::from_secs(1)),
        "{quick:?}"
    );

    // ...and with `backoff: 2` each next one waits at least 2 s.
    f.emu.set_longpoll_backoff(Some(2));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let from = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let spaced = gaps(&f.emu, from);
    println!("gaps with backoff 2: {spaced:?}");
    assert!(spaced.len() >= 2, "{spaced:?}");
    assert!(
        spaced.iter().all(|g| *g >= Duration::from_secs(2)),
        "{spaced:?}"
    );
    f.emu.set_longpoll_backoff(None);

    // Dropbox failing: retried with exponential backoff, not hammered, and
    // events flow again once it recovers.
    f.emu.fail_for(LONGPOLL_ROUTE, Duration::from_secs(6), 503);
    let from = Instant::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let failed = f
        .emu
        .calls_to(LONGPOLL_ROUTE)
        .into_iter()
        .filter(|c| c.at >= from && c.status == 503)
        .count();
    println!("failed long-polls in 6 s of 503s: {failed}");
    assert!((1..=6).contains(&failed), "{failed}");
    f.emu.upload(ACCOUNT, "/recovered.txt", b"x");
    let events = wait_events(&receiver, 2, Duration::from_secs(20)).await?;
    assert_eq!(events[1]["data"]["name"], json!("recovered.txt"));
    Ok(())
}

#[tokio::test]
async fn each_instance_is_long_polled_by_one_replica_and_a_survivor_takes_over() -> Result<()> {
    let f = fixture("longpoll-replicas").await;
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    // The replicas are named, so which one is responsible for an instance
    // (rendezvous hashing over the two, by uid) is known here. Six instances
    // whose uids all fall to one replica (1 run in 32) would prove no split:
    // instances are added until each replica is responsible for at least one.
    let replicas =
        ["ingress-a", "ingress-b"].map(|n| contract::replica_id(&contract::heartbeat_key(n)));
    let mut names: Vec<String> = Vec::new();
    let mut shares = [0usize; 2];
    while names.len() < 6 || shares.contains(&0) {
        let name = format!("shared-{}", names.len());
        f.instance(&name, &receiver.url).await;
        let uid = f
            .instances
            .get(&name)
            .await?
            .metadata
            .uid
            .context("instance uid")?;
        let owner = dropbox_operator::ingress::membership::owner(&replicas, &uid);
        shares[usize::from(owner == Some(replicas[1].as_str()))] += 1;
        names.push(name);
    }
    let total = names.len() as f64;
    let mut a = f
        .ingress()
        .name("ingress-a")
        .env("POD_NAME", "ingress-a")
        .start()
        .await;
    let b = f
        .ingress()
        .name("ingress-b")
        .env("POD_NAME", "ingress-b")
        .start()
        .await;
    for name in &names {
        f.wait_condition(name, "Ready", "True", None).await?;
    }
    // Once both know each other, every instance is polled exactly once, by the
    // replica responsible for it.
    let expected = (shares[0] as f64, shares[1] as f64);
    let (x, y) = support::eventually(
        "the instances split between the replicas",
        Duration::from_secs(30),
        || async {
            Ok((
                a.metric_sum("dropbox_ingress_longpolls", "").await,
                b.metric_sum("dropbox_ingress_longpolls", "").await,
            ))
        },
        |seen: &(f64, f64)| *seen == expected,
    )
    .await?;
    println!("long-polls per replica: {x} / {y}");
    support::eventually(
        "every instance's long-poll held",
        Duration::from_secs(30),
        || async { Ok(f.emu.longpolls_waiting()) },
        |n: &usize| *n == names.len(),
    )
    .await?;

    // One replica dies: the other takes its instances over once its heartbeat
    // expires, and every instance's changes still arrive.
    a.kill();
    support::eventually(
        "the survivor polls every instance",
        Duration::from_secs(30),
        || async { Ok(b.metric_sum("dropbox_ingress_longpolls", "").await) },
        |n: &f64| *n == total,
    )
    .await?;
    f.wait_longpolls(names.len()).await?;
    f.emu.upload(ACCOUNT, "/shared.txt", b"x");
    // One account, every instance: each gets the change.
    let events = wait_events(&receiver, names.len(), Duration::from_secs(30)).await?;
    let instances: BTreeSet<String> = receiver
        .accepted()
        .iter()
        .filter_map(|d| d.body["message"]["instanceId"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(instances.len(), names.len(), "{events:?}");
    Ok(())
}
