//! The controller on a real control plane, with the Dropbox emulator standing in
//! for Dropbox: one test per behaviour of the OAuth lifecycle, status, deletion,
//! scale and leader election.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use dropbox_operator::api::{DropboxElementInstance, Phase};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use support::condition;
use support::dropbox::Emulator;
use support::operator::{OperatorProcess, Process};

const APP_KEY: &str = "app-key-controller";
const APP_SECRET: &str = "APP-SECRET-f00d";
const ACCOUNT: &str = "dbid:AAH4f99T0taONIb-OurWxbNQ6ywGRopQngc";
const REDIRECT: &str = "https://www.mycoolapp.com/auth";

struct Fixture {
    client: Client,
    ns: String,
    emu: Emulator,
    instances: Api<DropboxElementInstance>,
    secrets: Api<Secret>,
}

async fn fixture(test: &str) -> Fixture {
    let (client, ns, emu) = support::fixture::emulated_namespace(test, APP_KEY, APP_SECRET).await;
    emu.add_account(ACCOUNT, "franz@example.com", "Franz Ferdinand");
    let f = Fixture {
        instances: Api::namespaced(client.clone(), &ns),
        secrets: Api::namespaced(client.clone(), &ns),
        client,
        ns,
        emu,
    };
    f.put_secret(
        "dropbox-app",
        &[("oauth.api.key", APP_KEY), ("oauth.api.secret", APP_SECRET)],
    )
    .await;
    f
}

impl Fixture {
    fn controller(&self) -> OperatorProcess {
        OperatorProcess::new(&self.ns, &self.emu.url)
    }

    async fn start_controller(&self) -> Process {
        self.controller().start().await
    }

    async fn put_secret(&self, name: &str, data: &[(&str, &str)]) {
        support::put_secret(&self.secrets, name, data)
            .await
            .expect("apply secret");
    }

    /// A fresh code for the test account, stored in Secret `name`.
    async fn code_secret(&self, name: &str) -> String {
        let code = self.emu.issue_code(APP_KEY, ACCOUNT, Some(REDIRECT));
        self.put_secret(name, &[("code", &code)]).await;
        code
    }

    async fn create_oauth_instance(&self, name: &str, code_secret: &str) -> DropboxElementInstance {
        let instance: DropboxElementInstance = serde_json::from_value(json!({
            "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
            "kind": "DropboxElementInstance",
            "metadata": {"name": name},
            "spec": {
                "element": {"key": "dropbox"},
                "name": format!("{name} Dropbox"),
                "tags": ["test"],
                "authentication": {
                    "type": "oauth2",
                    "appSecretRef": {"name": "dropbox-app"},
                    "codeSecretRef": {"name": code_secret},
                    "callbackUrl": REDIRECT
                }
            }
        }))
        .expect("instance manifest");
        self.instances
            .create(&PostParams::default(), &instance)
            .await
            .expect("create instance")
    }

    /// Waits until condition `type_` has `status` (and `reason`, when given).
    async fn wait_condition(
        &self,
        name: &str,
        type_: &str,
        status: &str,
        reason: Option<&str>,
        timeout: Duration,
    ) -> Result<DropboxElementInstance> {
        support::wait_condition(&self.instances, name, type_, status, reason, timeout).await
    }

    async fn wait_ready(&self, name: &str) -> Result<DropboxElementInstance> {
        self.wait_condition(name, "Ready", "True", None, Duration::from_secs(60))
            .await
    }

    async fn events_for(&self, name: &str) -> Vec<Event> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        events
            .list(&ListParams::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect()
    }

    /// The instance's Events once one of `type_` with `reason` is among them
    /// (waiting up to 10 s: the controller publishes it right after the status
    /// write that a test usually waits for, so it can arrive a moment later).
    async fn wait_event(&self, name: &str, type_: &str, reason: &str) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let events = self.events_for(name).await;
            let found = events
                .iter()
                .any(|e| e.type_.as_deref() == Some(type_) && e.reason.as_deref() == Some(reason));
            if found || tokio::time::Instant::now() > deadline {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn calls(&self, route: &str) -> usize {
        self.emu.calls_to(route).len()
    }

    fn token_calls_with(&self, grant_type: &str) -> usize {
        self.emu
            .calls_to("/oauth2/token")
            .iter()
            .filter(|c| c.form.get("grant_type").map(String::as_str) == Some(grant_type))
            .count()
    }
}

fn secret_text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

/// Fails when any of `secrets` appears in the controller's log.
fn assert_no_secrets_in(text: &str, what: &str, secrets: &[String]) {
    for s in secrets.iter().filter(|s| s.len() >= 6) {
        assert!(
            !text.contains(s.as_str()),
            "a secret value appears in {what}"
        );
    }
}

#[tokio::test]
async fn happy_path_reaches_ready_with_account_and_owned_token_secret() -> Result<()> {
    let f = fixture("happy-path").await;
    let _controller = f.start_controller().await;
    let code = f.code_secret("marketing-code").await;
    let created = f.create_oauth_instance("marketing", "marketing-code").await;

    let ready = f.wait_ready("marketing").await?;
    let status = ready.status.clone().context("status")?;
    assert_eq!(status.phase, Some(Phase::Ready));
    assert_eq!(status.observed_generation, ready.metadata.generation);
    let account = status.account.context("status.account")?;
    assert_eq!(account.account_id.as_deref(), Some(ACCOUNT));
    assert_eq!(account.email.as_deref(), Some("franz@example.com"));
    assert_eq!(account.display_name.as_deref(), Some("Franz Ferdinand"));
    let authorized = condition(&ready, "Authorized").context("Authorized")?;
    assert_eq!(
        (authorized.status.as_str(), authorized.reason.as_str()),
        ("True", "TokenValid")
    );
    assert_eq!(authorized.observed_generation, ready.metadata.generation);
    assert!(
        status
            .code_fingerprint
            .as_deref()
            .is_some_and(|f| f.starts_with("sha256:"))
    );
    assert!(status.authorize_url.is_none());
    let token_status = status.token.context("status.token")?;
    assert_eq!(
        token_status.secret_name.as_deref(),
        Some("marketing-dropbox-token")
    );
    assert!(token_status.expires_at.is_some() && token_status.last_refresh_time.is_some());

    // The token Secret is owned by the instance and holds the documented keys.
    let secret = f.secrets.get("marketing-dropbox-token").await?;
    let owner = secret
        .owner_references()
        .first()
        .context("ownerReference")?;
    assert_eq!(Some(&owner.uid), created.meta().uid.as_ref());
    assert_eq!(owner.controller, Some(true));
    for key in [
        "access_token",
        "refresh_token",
        "expires_at",
        "account_id",
        "scope",
    ] {
        assert!(
            secret_text(&secret, key).is_some_and(|v| !v.is_empty()),
            "token Secret lacks {key}"
        );
    }
    let access = secret_text(&secret, "access_token").unwrap_or_default();
    assert!(f.emu.is_access_token_valid(&access));

    // Exactly one exchange, with what Dropbox needs.
    let exchanges: Vec<_> = f
        .emu
        .calls_to("/oauth2/token")
        .into_iter()
        .filter(|c| c.form.get("grant_type").map(String::as_str) == Some("authorization_code"))
        .collect();
    assert_eq!(exchanges.len(), 1);
    assert_eq!(exchanges[0].form.get("code"), Some(&code));
    assert_eq!(
        exchanges[0].form.get("redirect_uri").map(String::as_str),
        Some(REDIRECT)
    );

    // The first success needs no Event (status says it): no Warning either.
    let events = f.events_for("marketing").await;
    assert!(
        events.iter().all(|e| e.type_.as_deref() != Some("Warning")),
        "{events:?}"
    );
    Ok(())
}

#[tokio::test]
async fn api_key_instance_is_verified_and_reports_the_account() -> Result<()> {
    let f = fixture("api-key").await;
    let _controller = f.start_controller().await;
    let token = f.emu.issue_long_lived_token(APP_KEY, ACCOUNT);
    f.put_secret("marketing-token", &[("apiKey", &token)]).await;
    let instance: DropboxElementInstance = serde_json::from_value(json!({
        "apiVersion": "elements.dropbox-operator.dev/v1alpha1", "kind": "DropboxElementInstance",
        "metadata": {"name": "by-key"},
        "spec": {"element": {"key": "dropbox"},
                 "authentication": {"type": "apiKey", "apiKeySecretRef": {"name": "marketing-token"}}}
    }))?;
    f.instances
        .create(&PostParams::default(), &instance)
        .await?;
    let ready = f.wait_ready("by-key").await?;
    let account = ready.status.and_then(|s| s.account).context("account")?;
    assert_eq!(account.account_id.as_deref(), Some(ACCOUNT));
    assert_eq!(
        f.calls("/oauth2/token"),
        0,
        "apiKey never uses the token endpoint"
    );

    // A token Dropbox refuses is a permanent condition.
    f.put_secret("marketing-token", &[("apiKey", "not-a-real-token")])
        .await;
    f.wait_condition(
        "by-key",
        "Authorized",
        "False",
        Some("InvalidApiKey"),
        Duration::from_secs(30),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn missing_secret_is_a_condition_and_creating_it_later_makes_the_instance_ready() -> Result<()>
{
    let f = fixture("missing-secret").await;
    let controller = f.start_controller().await;
    f.create_oauth_instance("late", "late-code").await;
    // No code yet: the instance waits for a person, with the link to approve.
    let waiting = f
        .wait_condition(
            "late",
            "Authorized",
            "False",
            Some("AwaitingAuthorization"),
            Duration::from_secs(30),
        )
        .await?;
    let message = &condition(&waiting, "Authorized")
        .context("Authorized")?
        .message;
    assert!(
        message.contains("late-code") && message.contains("\"code\""),
        "the message names the Secret and key: {message}"
    );
    assert_eq!(
        waiting.status.as_ref().and_then(|s| s.phase),
        Some(Phase::AwaitingAuthorization)
    );
    assert!(
        waiting
            .status
            .as_ref()
            .and_then(|s| s.authorize_url.as_deref())
            .is_some_and(|u| u.contains("token_access_type=offline")),
        "authorizeUrl is set"
    );

    // A Secret without the key: still waiting, naming the key.
    f.put_secret("late-code", &[("wrong-key", "x")]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let waiting = f
        .wait_condition(
            "late",
            "Authorized",
            "False",
            Some("AwaitingAuthorization"),
            Duration::from_secs(30),
        )
        .await?;
    assert!(condition(&waiting, "Authorized").is_some_and(|c| c.message.contains("\"code\"")));

    // The right Secret arrives: Ready, no restart.
    let started = Instant::now();
    f.code_secret("late-code").await;
    f.wait_ready("late").await?;
    eprintln!("Ready {:?} after the Secret was fixed", started.elapsed());
    assert!(!controller.log_text().contains("panicked"));
    Ok(())
}

#[tokio::test]
async fn rotated_secrets_are_picked_up_within_seconds() -> Result<()> {
    let f = fixture("rotation").await;
    let _controller = f.start_controller().await;
    f.code_secret("rot-code").await;
    f.create_oauth_instance("rot", "rot-code").await;
    let first = f.wait_ready("rot").await?;
    let first_fp = first
        .status
        .as_ref()
        .and_then(|s| s.code_fingerprint.clone());
    let first_token = secret_text(&f.secrets.get("rot-dropbox-token").await?, "access_token");

    // Rotate the code (re-authorization): a new exchange, new tokens, within seconds.
    let started = Instant::now();
    let new_code = f.code_secret("rot-code").await;
    let api = f.instances.clone();
    support::eventually(
        "a new code fingerprint",
        Duration::from_secs(20),
        || {
            let api = api.clone();
            async move { Ok(api.get("rot").await?) }
        },
        |i: &DropboxElementInstance| {
            i.status.as_ref().and_then(|s| s.code_fingerprint.clone()) != first_fp
                && condition(i, "Ready").is_some_and(|c| c.status == "True")
        },
    )
    .await?;
    eprintln!("rotated code picked up after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(20));
    let second_token = secret_text(&f.secrets.get("rot-dropbox-token").await?, "access_token");
    assert_ne!(first_token, second_token, "new tokens were stored");
    let codes: Vec<String> = f
        .emu
        .calls_to("/oauth2/token")
        .iter()
        .filter_map(|c| c.form.get("code").cloned())
        .collect();
    assert_eq!(codes.len(), 2);
    assert_eq!(codes[1], new_code);

    // Rotate the app secret to a wrong value, then a new code: Dropbox refuses
    // the app credentials at check/app, before the code is sent, so the code
    // is kept.
    f.put_secret(
        "dropbox-app",
        &[
            ("oauth.api.key", APP_KEY),
            ("oauth.api.secret", "rotated-wrong"),
        ],
    )
    .await;
    let newer_code = f.code_secret("rot-code").await;
    f.wait_condition(
        "rot",
        "Authorized",
        "False",
        Some("InvalidClient"),
        Duration::from_secs(20),
    )
    .await?;
    // Fixing it makes the same (unsent) code work; it was never sent with the
    // wrong secret.
    f.put_secret(
        "dropbox-app",
        &[("oauth.api.key", APP_KEY), ("oauth.api.secret", APP_SECRET)],
    )
    .await;
    f.wait_ready("rot").await?;
    let last = f.emu.calls_to("/oauth2/token");
    assert_eq!(
        last.last().and_then(|c| c.form.get("code")),
        Some(&newer_code)
    );
    let sent = last
        .iter()
        .filter(|c| c.form.get("code") == Some(&newer_code))
        .count();
    assert_eq!(sent, 1, "the code was sent once, with the fixed secret");
    Ok(())
}

#[tokio::test]
async fn a_code_is_never_sent_twice_by_this_or_another_instance() -> Result<()> {
    let f = fixture("code-reuse").await;
    let _controller = f.start_controller().await;
    f.code_secret("shared-code").await;
    f.create_oauth_instance("first", "shared-code").await;
    f.wait_ready("first").await?;
    assert_eq!(f.token_calls_with("authorization_code"), 1);

    // Another instance pointing at the same (spent) code.
    f.create_oauth_instance("second", "shared-code").await;
    let second = f
        .wait_condition(
            "second",
            "Authorized",
            "False",
            Some("CodeAlreadyUsed"),
            Duration::from_secs(30),
        )
        .await?;
    let message = &condition(&second, "Authorized")
        .context("Authorized")?
        .message;
    assert!(
        message.contains("first"),
        "names the instance that used it: {message}"
    );
    assert!(
        second
            .status
            .as_ref()
            .and_then(|s| s.authorize_url.as_ref())
            .is_some()
    );

    // The same instance losing its tokens: the code is not sent again either.
    f.secrets
        .delete("first-dropbox-token", &DeleteParams::default())
        .await?;
    f.wait_condition(
        "first",
        "Authorized",
        "False",
        Some("CodeAlreadyUsed"),
        Duration::from_secs(30),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        f.token_calls_with("authorization_code"),
        1,
        "the code was sent once in total"
    );
    Ok(())
}

#[tokio::test]
async fn a_code_dropbox_rejects_is_code_exchange_failed_with_dropbox_description() -> Result<()> {
    let f = fixture("bad-code").await;
    let _controller = f.start_controller().await;
    f.put_secret("bad-code", &[("code", "this-code-was-never-issued")])
        .await;
    f.create_oauth_instance("bad", "bad-code").await;
    let failed = f
        .wait_condition(
            "bad",
            "Authorized",
            "False",
            Some("CodeExchangeFailed"),
            Duration::from_secs(30),
        )
        .await?;
    let message = condition(&failed, "Authorized")
        .context("Authorized")?
        .message
        .clone();
    // The emulator answers an unknown code as Dropbox does.
    let dropbox_description = "code doesn't exist or has expired";
    assert!(
        message.contains(dropbox_description),
        "message carries Dropbox's description {dropbox_description:?}: {message}"
    );
    let status = failed.status.context("status")?;
    assert_eq!(status.phase, Some(Phase::AwaitingAuthorization));
    assert!(
        status
            .authorize_url
            .as_deref()
            .is_some_and(|u| u.contains("token_access_type=offline"))
    );
    // Permanent: no retries.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(f.token_calls_with("authorization_code"), 1);
    let events = f.events_for("bad").await;
    assert!(
        events.iter().any(|e| e.type_.as_deref() == Some("Warning")
            && e.reason.as_deref() == Some("CodeExchangeFailed")),
        "{events:?}"
    );
    Ok(())
}

#[tokio::test]
async fn tokens_are_refreshed_before_they_expire() -> Result<()> {
    let f = fixture("refresh").await;
    f.emu.set_access_token_ttl(Duration::from_secs(8));
    let controller = f.start_controller().await;
    f.code_secret("refresh-code").await;
    f.create_oauth_instance("fresh", "refresh-code").await;
    f.wait_ready("fresh").await?;

    // Over ~3 lifetimes, the token in the Secret must always be valid.
    let deadline = Instant::now() + Duration::from_secs(22);
    let mut seen = std::collections::BTreeSet::new();
    while Instant::now() < deadline {
        let secret = f.secrets.get("fresh-dropbox-token").await?;
        let access = secret_text(&secret, "access_token").context("access_token")?;
        assert!(
            f.emu.is_access_token_valid(&access),
            "the stored access token expired"
        );
        seen.insert(access);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let refreshes = f.token_calls_with("refresh_token");
    assert!(refreshes >= 2, "expected refreshes, saw {refreshes}");
    assert!(
        refreshes <= 8,
        "refreshes must be scheduled, not polled: {refreshes}"
    );
    assert!(seen.len() >= 3, "tokens rotated: {}", seen.len());
    let ready = f.instances.get("fresh").await?;
    assert!(condition(&ready, "Ready").is_some_and(|c| c.status == "True"));
    assert!(
        controller
            .metric_sum("dropbox_operator_token_refreshes_total", "success")
            .await
            >= 2.0
    );
    let expiry = controller
        .metric_sum("dropbox_operator_token_expiry_seconds", "name=\"fresh\"")
        .await;
    assert!(
        expiry > 0.0 && expiry <= 8.0,
        "seconds until expiry: {expiry}"
    );
    Ok(())
}

#[tokio::test]
async fn refresh_invalid_grant_requires_reauthorization_with_url_and_warning() -> Result<()> {
    let f = fixture("reauth").await;
    f.emu.set_access_token_ttl(Duration::from_secs(6));
    let _controller = f.start_controller().await;
    f.code_secret("reauth-code").await;
    f.create_oauth_instance("gone", "reauth-code").await;
    f.wait_ready("gone").await?;

    f.emu.revoke_account_tokens(ACCOUNT);
    let waiting = f
        .wait_condition(
            "gone",
            "Authorized",
            "False",
            Some("ReauthorizationRequired"),
            Duration::from_secs(30),
        )
        .await?;
    let status = waiting.status.clone().context("status")?;
    assert_eq!(status.phase, Some(Phase::AwaitingAuthorization));
    let url = status.authorize_url.context("authorizeUrl")?;
    for part in [
        "https://www.dropbox.com/oauth2/authorize?",
        &format!("client_id={APP_KEY}"),
        "response_type=code",
        "token_access_type=offline",
        "redirect_uri=https%3A%2F%2Fwww.mycoolapp.com%2Fauth",
        "state=",
    ] {
        assert!(url.contains(part), "{url} lacks {part}");
    }
    let events = f
        .wait_event("gone", "Warning", "ReauthorizationRequired")
        .await;
    assert!(
        events.iter().any(|e| e.type_.as_deref() == Some("Warning")
            && e.reason.as_deref() == Some("ReauthorizationRequired")),
        "{events:?}"
    );
    // No hammering of Dropbox while waiting for a person.
    let refreshes = f.token_calls_with("refresh_token");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(f.token_calls_with("refresh_token"), refreshes);

    // A person approves again: a new code makes it Ready.
    f.code_secret("reauth-code").await;
    let ready = f.wait_ready("gone").await?;
    assert!(ready.status.and_then(|s| s.authorize_url).is_none());
    Ok(())
}

#[tokio::test]
async fn dropbox_503_is_retried_with_bounded_backoff_then_ready() -> Result<()> {
    let f = fixture("unavailable").await;
    f.emu.fail_for("/oauth2/token", Duration::from_secs(7), 503);
    let _controller = f.start_controller().await;
    f.code_secret("flaky-code").await;
    f.create_oauth_instance("flaky", "flaky-code").await;
    let pending = f
        .wait_condition(
            "flaky",
            "Authorized",
            "False",
            Some("DropboxUnavailable"),
            Duration::from_secs(20),
        )
        .await?;
    assert_eq!(pending.status.and_then(|s| s.phase), Some(Phase::Pending));
    f.wait_ready("flaky").await?;
    let attempts = f.calls("/oauth2/token");
    // 1 s base, doubling with jitter: about 4-6 attempts over 7 s, never a tight loop.
    assert!(
        (2..=7).contains(&attempts),
        "token endpoint called {attempts} times"
    );
    Ok(())
}

#[tokio::test]
async fn rate_limit_honours_retry_after() -> Result<()> {
    let f = fixture("rate-limit").await;
    f.emu.rate_limit_next("/oauth2/token", 1, 4);
    let _controller = f.start_controller().await;
    f.code_secret("limited-code").await;
    f.create_oauth_instance("limited", "limited-code").await;
    f.wait_condition(
        "limited",
        "Authorized",
        "False",
        Some("RateLimited"),
        Duration::from_secs(20),
    )
    .await?;
    f.wait_ready("limited").await?;
    let calls = f.emu.calls_to("/oauth2/token");
    assert_eq!(calls.len(), 2, "one 429, then one successful retry");
    let gap = calls[1].at.duration_since(calls[0].at);
    assert!(
        gap >= Duration::from_secs(4),
        "retried after {gap:?}, before Retry-After"
    );
    Ok(())
}

#[tokio::test]
async fn deleting_revokes_the_token_once_and_the_token_secret_is_collected() -> Result<()> {
    let f = fixture("delete").await;
    let _controller = f.start_controller().await;
    f.code_secret("del-code").await;
    f.create_oauth_instance("bye", "del-code").await;
    f.wait_ready("bye").await?;
    let access =
        secret_text(&f.secrets.get("bye-dropbox-token").await?, "access_token").context("token")?;

    f.instances.delete("bye", &DeleteParams::default()).await?;
    let instances = f.instances.clone();
    support::eventually(
        "the instance to be deleted",
        Duration::from_secs(30),
        || support::get_opt(&instances, "bye"),
        Option::is_none,
    )
    .await?;
    assert_eq!(f.calls("/2/auth/token/revoke"), 1, "revoked exactly once");
    assert!(!f.emu.is_access_token_valid(&access));
    let secrets = f.secrets.clone();
    support::eventually(
        "the token Secret to be garbage-collected",
        Duration::from_secs(90),
        || support::get_opt(&secrets, "bye-dropbox-token"),
        Option::is_none,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(f.calls("/2/auth/token/revoke"), 1);
    Ok(())
}

#[tokio::test]
async fn deleting_while_dropbox_hangs_finishes_within_the_revoke_bound() -> Result<()> {
    let f = fixture("delete-down").await;
    let _controller = f
        .controller()
        .env("DROPBOX_TIMEOUT", "60s")
        .env("REVOKE_TIMEOUT", "4s")
        .start()
        .await;
    f.code_secret("down-code").await;
    f.create_oauth_instance("stuck", "down-code").await;
    f.wait_ready("stuck").await?;

    f.emu.set_latency("*", Duration::from_secs(120));
    let started = Instant::now();
    f.instances
        .delete("stuck", &DeleteParams::default())
        .await?;
    let instances = f.instances.clone();
    support::eventually(
        "the instance to be deleted",
        Duration::from_secs(30),
        || support::get_opt(&instances, "stuck"),
        Option::is_none,
    )
    .await?;
    let took = started.elapsed();
    eprintln!("deletion with Dropbox hanging took {took:?}");
    assert!(
        took < Duration::from_secs(9),
        "deletion took {took:?}, bound is 4 s"
    );
    assert!(
        took >= Duration::from_secs(3),
        "the revoke was attempted and waited for: {took:?}"
    );
    let events = f.events_for("stuck").await;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("RevokeFailed")),
        "{events:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_no_op_resync_makes_zero_writes() -> Result<()> {
    let f = fixture("no-churn").await;
    let mut controller = f.start_controller().await;
    f.code_secret("calm-code").await;
    f.create_oauth_instance("calm", "calm-code").await;
    f.wait_ready("calm").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = f.instances.get("calm").await?.resource_version();
    let secret_before = f
        .secrets
        .get("calm-dropbox-token")
        .await?
        .resource_version();
    let dropbox_calls = f.emu.calls().len();

    // A restarted controller reconciles everything again from scratch.
    // SIGTERM: a clean exit that releases the leader lease.
    let stopped = Instant::now();
    assert!(
        controller.terminate(Duration::from_secs(10)),
        "the controller did not exit on SIGTERM"
    );
    assert!(
        controller.log_text().contains("released the leader lease"),
        "the lease was not released on shutdown"
    );
    eprintln!("graceful shutdown took {:?}", stopped.elapsed());
    let controller = f.start_controller().await;
    support::eventually(
        "the new controller to reconcile",
        Duration::from_secs(30),
        || async {
            Ok(controller
                .metric_sum("dropbox_operator_reconciles_total", "success")
                .await)
        },
        |n: &f64| *n >= 1.0,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        f.instances.get("calm").await?.resource_version(),
        before,
        "instance written"
    );
    assert_eq!(
        f.secrets
            .get("calm-dropbox-token")
            .await?
            .resource_version(),
        secret_before,
        "token Secret written"
    );
    assert_eq!(
        f.emu.calls().len(),
        dropbox_calls,
        "no Dropbox calls for a valid token"
    );
    Ok(())
}

#[tokio::test]
async fn a_hundred_instances_reach_ready() -> Result<()> {
    let f = fixture("hundred").await;
    let controller = f.start_controller().await;
    let started = Instant::now();
    for i in 0..100 {
        f.code_secret(&format!("code-{i}")).await;
        f.create_oauth_instance(&format!("inst-{i}"), &format!("code-{i}"))
            .await;
    }
    let api = f.instances.clone();
    support::eventually(
        "100 instances Ready",
        Duration::from_secs(180),
        || {
            let api = api.clone();
            async move { Ok(api.list(&ListParams::default()).await?.items) }
        },
        |items: &Vec<DropboxElementInstance>| {
            items.len() == 100
                && items
                    .iter()
                    .all(|i| condition(i, "Ready").is_some_and(|c| c.status == "True"))
        },
    )
    .await?;
    eprintln!("100 instances Ready in {:?}", started.elapsed());
    assert_eq!(f.token_calls_with("authorization_code"), 100);
    assert!(!controller.log_text().contains("panicked"));
    Ok(())
}

#[tokio::test]
async fn two_controller_replicas_never_both_reconcile_and_fail_over() -> Result<()> {
    let f = fixture("leader").await;
    let mut a = f
        .controller()
        .name("replica-a")
        .env("LEASE_DURATION", "6s")
        .env("LEASE_RENEW_GRACE", "2s")
        .start()
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut b = f
        .controller()
        .name("replica-b")
        .env("LEASE_DURATION", "6s")
        .env("LEASE_RENEW_GRACE", "2s")
        .start()
        .await;
    for i in 0..5 {
        f.code_secret(&format!("lc-{i}")).await;
        f.create_oauth_instance(&format!("l-{i}"), &format!("lc-{i}"))
            .await;
    }
    for i in 0..5 {
        f.wait_ready(&format!("l-{i}")).await?;
    }
    let leader_a = a.metric_sum("dropbox_operator_leader", "").await;
    let leader_b = b.metric_sum("dropbox_operator_leader", "").await;
    let rec_a = a.metric_sum("dropbox_operator_reconciles_total", "").await;
    let rec_b = b.metric_sum("dropbox_operator_reconciles_total", "").await;
    assert_eq!(leader_a + leader_b, 1.0, "exactly one leader");
    assert!(
        (rec_a > 0.0) != (rec_b > 0.0),
        "exactly one replica reconciles: a={rec_a} b={rec_b}"
    );
    assert_eq!(
        f.token_calls_with("authorization_code"),
        5,
        "no code sent twice"
    );

    // Crash the leader: the standby takes over within the lease duration.
    let (leader, standby) = if leader_a == 1.0 {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    leader.kill();
    let killed = Instant::now();
    support::eventually(
        "the standby to take the lease",
        Duration::from_secs(20),
        || async { Ok(standby.metric_sum("dropbox_operator_leader", "").await) },
        |v: &f64| *v == 1.0,
    )
    .await?;
    let failover = killed.elapsed();
    eprintln!("failover after a crash took {failover:?} (lease 6 s)");
    assert!(
        failover <= Duration::from_secs(6 + 3),
        "failover took {failover:?}"
    );
    f.code_secret("after-failover").await;
    f.create_oauth_instance("after", "after-failover").await;
    f.wait_ready("after").await?;
    Ok(())
}

#[tokio::test]
async fn no_secret_value_appears_in_logs_status_or_events() -> Result<()> {
    let f = fixture("no-leaks").await;
    f.emu.set_access_token_ttl(Duration::from_secs(6));
    let controller = f.controller().env("LOG_LEVEL", "trace").start().await;
    let code = f.code_secret("leak-code").await;
    f.create_oauth_instance("leak", "leak-code").await;
    f.wait_ready("leak").await?;
    // Exercise refresh, reauthorization and a bad code too.
    tokio::time::sleep(Duration::from_secs(5)).await;
    f.emu.revoke_account_tokens(ACCOUNT);
    f.wait_condition(
        "leak",
        "Authorized",
        "False",
        Some("ReauthorizationRequired"),
        Duration::from_secs(30),
    )
    .await?;
    f.put_secret("leak-code", &[("code", "bogus-code-value-1234")])
        .await;
    f.wait_condition(
        "leak",
        "Authorized",
        "False",
        Some("CodeExchangeFailed"),
        Duration::from_secs(30),
    )
    .await?;

    let mut secrets = vec![
        APP_SECRET.to_owned(),
        code,
        "bogus-code-value-1234".to_owned(),
    ];
    for call in f.emu.calls() {
        for key in ["code", "client_secret", "refresh_token"] {
            secrets.extend(call.form.get(key).cloned());
        }
        for (name, value) in &call.headers {
            if name.eq_ignore_ascii_case("authorization") {
                secrets.extend(value.strip_prefix("Bearer ").map(str::to_owned));
            }
        }
    }
    assert!(secrets.len() > 4, "tokens were captured from the emulator");
    assert_no_secrets_in(&controller.log_text(), "the controller log", &secrets);
    let instance = f.instances.get("leak").await?;
    assert_no_secrets_in(
        &serde_json::to_string(&instance.status)?,
        "status",
        &secrets,
    );
    let events = serde_json::to_string(&f.events_for("leak").await)?;
    assert_no_secrets_in(&events, "events", &secrets);
    assert_no_secrets_in(&controller.metrics().await, "metrics", &secrets);
    Ok(())
}
