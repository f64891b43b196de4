//! `dropbox-operator connect` end to end: the built binary as a subprocess, a
//! real control plane, the real controller process and the Dropbox emulator
//! (whose `/oauth2/authorize` plays the person who approves or denies). The test
//! is the browser: it reads the link connect prints, GETs it without following
//! the redirect, and GETs the Location on connect's loopback listener.

mod support;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use dropbox_operator::api::DropboxElementInstance;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use serde_json::json;
use support::controlplane::free_port;
use support::dropbox::{Approval, Emulator, http_client_builder};
use support::operator::{OperatorProcess, Process};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const APP_KEY: &str = "app-key-connect";
const APP_SECRET: &str = "APP-SECRET-c0ffee";
const ACCOUNT: &str = "dbid:AAConnect0000000000000000000000000000";
/// The instance's callbackUrl: the app's own (not loopback) redirect URI, so
/// connect uses its default loopback one and the code Secret must say so.
const APP_REDIRECT: &str = "https://www.mycoolapp.com/auth";

struct Fixture {
    ns: String,
    emu: Emulator,
    instances: Api<DropboxElementInstance>,
    secrets: Api<Secret>,
}

async fn fixture(test: &str) -> Fixture {
    let (client, ns, emu) = support::fixture::emulated_namespace(test, APP_KEY, APP_SECRET).await;
    emu.add_account(ACCOUNT, "ada@example.com", "Ada Lovelace");
    emu.add_redirect_uri(APP_KEY, APP_REDIRECT);
    emu.script_approval(
        APP_KEY,
        Approval::Approve {
            account_id: ACCOUNT.into(),
        },
    );
    let f = Fixture {
        instances: Api::namespaced(client.clone(), &ns),
        secrets: Api::namespaced(client.clone(), &ns),
        ns,
        emu,
    };
    support::put_secret(
        &f.secrets,
        "dropbox-app",
        &[("oauth.api.key", APP_KEY), ("oauth.api.secret", APP_SECRET)],
    )
    .await
    .expect("app secret");
    f
}

impl Fixture {
    async fn create_instance(&self, name: &str) {
        let instance: DropboxElementInstance = serde_json::from_value(json!({
            "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
            "kind": "DropboxElementInstance",
            "metadata": {"name": name},
            "spec": {
                "element": {"key": "dropbox"},
                "authentication": {
                    "type": "oauth2",
                    "appSecretRef": {"name": "dropbox-app"},
                    "codeSecretRef": {"name": format!("{name}-code")},
                    "callbackUrl": APP_REDIRECT
                }
            }
        }))
        .expect("instance manifest");
        self.instances
            .create(&PostParams::default(), &instance)
            .await
            .expect("create instance");
    }

    async fn start_controller(&self) -> Process {
        OperatorProcess::new(&self.ns, &self.emu.url).start().await
    }

    /// A free port whose `http://127.0.0.1:<port>/` is registered with the app.
    fn loopback_port(&self) -> u16 {
        let port = free_port();
        self.emu
            .add_redirect_uri(APP_KEY, &format!("http://127.0.0.1:{port}/"));
        port
    }

    /// Starts `dropbox-operator connect <name> -n <ns> --no-browser ...`.
    fn connect(&self, name: &str, extra: &[&str]) -> Connect {
        let mut cmd = tokio::process::Command::new(support::operator::binary());
        cmd.args(["connect", name, "-n", &self.ns, "--no-browser"])
            .args(["--dropbox-www-url", &self.emu.url])
            .args(extra)
            .env_remove("CONNECT_NAMESPACE");
        // The user's kubeconfig: $KUBECONFIG, or the flag when the test gives it.
        if extra.contains(&"--kubeconfig") {
            cmd.env_remove("KUBECONFIG");
        } else {
            cmd.env("KUBECONFIG", support::kubeconfig());
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("start connect");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        for (pipe, into) in [
            (
                Box::new(child.stdout.take().expect("stdout"))
                    as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                stdout.clone(),
            ),
            (
                Box::new(child.stderr.take().expect("stderr")),
                stderr.clone(),
            ),
        ] {
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    into.lock().unwrap().push_str(&format!("{line}\n"));
                }
            });
        }
        Connect {
            child,
            stdout,
            stderr,
        }
    }

    async fn code_secret(&self, name: &str) -> Option<Secret> {
        self.secrets
            .get_opt(&format!("{name}-code"))
            .await
            .expect("get code secret")
    }
}

struct Connect {
    child: tokio::process::Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Connect {
    /// The authorize link connect printed.
    async fn link(&self) -> Result<reqwest::Url> {
        for _ in 0..300 {
            let out = self.stdout.lock().unwrap().clone();
            if let Some(word) = out
                .split_whitespace()
                .find(|w| w.contains("/oauth2/authorize?"))
            {
                return Ok(reqwest::Url::parse(word)?);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "connect printed no link; stdout:\n{}\nstderr:\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    /// Waits for the exit; returns (success, stdout, stderr).
    async fn finish(&mut self, timeout: Duration) -> Result<(bool, String, String)> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| {
                format!(
                    "connect still running after {timeout:?}; stdout:\n{}\nstderr:\n{}",
                    self.stdout.lock().unwrap(),
                    self.stderr.lock().unwrap()
                )
            })??;
        // Let the readers drain the pipes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok((
            status.success(),
            self.stdout.lock().unwrap().clone(),
            self.stderr.lock().unwrap().clone(),
        ))
    }
}

fn no_redirects() -> reqwest::Client {
    http_client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

fn query(url: &reqwest::Url) -> HashMap<String, String> {
    url.query_pairs().into_owned().collect()
}

/// The browser on Dropbox's page: GET the link, return the redirect's Location.
async fn approve(link: &reqwest::Url) -> Result<reqwest::Url> {
    let r = no_redirects().get(link.clone()).send().await?;
    ensure!(
        r.status() == 302,
        "authorize answered {}: {}",
        r.status(),
        r.text().await?
    );
    let location = r.headers().get("location").context("Location")?.to_str()?;
    Ok(reqwest::Url::parse(location)?)
}

/// The browser following the redirect to connect's listener: (status, page).
async fn follow(location: &reqwest::Url) -> Result<(u16, String)> {
    let r = no_redirects().get(location.clone()).send().await?;
    Ok((r.status().as_u16(), r.text().await?))
}

fn secret_text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

#[tokio::test]
async fn connect_with_a_loopback_redirect_reaches_ready() -> Result<()> {
    let f = fixture("connect-loopback").await;
    let _controller = f.start_controller().await;
    f.create_instance("marketing").await;
    let port = f.loopback_port();
    let redirect = format!("http://127.0.0.1:{port}/");
    let mut connect = f.connect(
        "marketing",
        &["--port", &port.to_string(), "--wait-timeout", "90s"],
    );

    let link = connect.link().await?;
    let params = query(&link);
    assert_eq!(params["client_id"], APP_KEY);
    assert_eq!(params["response_type"], "code");
    assert_eq!(params["token_access_type"], "offline");
    assert_eq!(params["code_challenge_method"], "S256");
    assert_eq!(params["redirect_uri"], redirect);
    assert!(params["state"].len() >= 32, "state is random: {params:?}");
    let location = approve(&link).await?;
    assert!(location.as_str().starts_with(&redirect), "{location}");
    let (status, page) = follow(&location).await?;
    assert_eq!(status, 200, "{page}");

    let (ok, stdout, stderr) = connect.finish(Duration::from_secs(120)).await?;
    assert!(ok, "connect failed; stdout:\n{stdout}\nstderr:\n{stderr}");
    println!("connect printed:\n{stdout}");
    assert!(stdout.contains("Connected: marketing is Ready"), "{stdout}");
    assert!(stdout.contains("phase"), "progress is shown: {stdout}");

    // The code Secret holds the code, the verifier and the redirect URI, and
    // the exchange sent exactly those.
    let secret = f.code_secret("marketing").await.context("code Secret")?;
    let code = secret_text(&secret, "code").context("code")?;
    let verifier = secret_text(&secret, "code_verifier").context("verifier")?;
    assert_eq!(
        secret_text(&secret, "redirect_uri").as_deref(),
        Some(redirect.as_str())
    );
    assert_eq!(
        dropbox_operator::connect::s256(&verifier),
        params["code_challenge"]
    );
    let exchanges: Vec<_> = f
        .emu
        .calls_to("/oauth2/token")
        .into_iter()
        .filter(|c| c.form.get("grant_type").map(String::as_str) == Some("authorization_code"))
        .collect();
    assert_eq!(exchanges.len(), 1);
    assert_eq!(exchanges[0].status, 200);
    assert_eq!(exchanges[0].form.get("code_verifier"), Some(&verifier));
    assert_eq!(exchanges[0].form.get("redirect_uri"), Some(&redirect));
    let instance = f.instances.get("marketing").await?;
    assert!(support::condition_is(&instance, "Ready", "True", None));
    assert_eq!(
        instance
            .status
            .as_ref()
            .and_then(|s| s.account.as_ref())
            .and_then(|a| a.account_id.as_deref()),
        Some(ACCOUNT)
    );
    // Nothing secret on the terminal.
    for s in [&code, &verifier] {
        assert!(!stdout.contains(s.as_str()) && !stderr.contains(s.as_str()));
    }
    Ok(())
}

#[tokio::test]
async fn a_redirect_with_another_state_is_refused_and_nothing_is_written() -> Result<()> {
    let f = fixture("connect-state").await;
    f.create_instance("sales").await;
    // An earlier (spent) code is in the Secret: it must stay exactly as it is.
    support::put_secret(&f.secrets, "sales-code", &[("code", "OLD-CODE")]).await?;
    let before = f.code_secret("sales").await.context("code Secret")?;
    let port = f.loopback_port();
    let mut connect = f.connect("sales", &["--port", &port.to_string()]);
    let link = connect.link().await?;
    let mut location = approve(&link).await?;
    // The attacker's redirect: a real code, but not this run's state.
    let forged: Vec<(String, String)> = query(&location)
        .into_iter()
        .map(|(k, v)| {
            if k == "state" {
                (k, "forged".into())
            } else {
                (k, v)
            }
        })
        .collect();
    location.query_pairs_mut().clear().extend_pairs(forged);
    let (status, page) = follow(&location).await?;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("state"), "{page}");

    let (ok, _, stderr) = connect.finish(Duration::from_secs(30)).await?;
    assert!(!ok, "connect must fail");
    assert!(stderr.contains("state does not match"), "{stderr}");
    assert!(stderr.contains("nothing was written"), "{stderr}");
    let after = f.code_secret("sales").await.context("code Secret")?;
    assert_eq!(after.resource_version(), before.resource_version());
    assert_eq!(secret_text(&after, "code").as_deref(), Some("OLD-CODE"));
    Ok(())
}

#[tokio::test]
async fn a_denied_approval_writes_nothing() -> Result<()> {
    let f = fixture("connect-denied").await;
    f.create_instance("legal").await;
    f.emu.script_approval(APP_KEY, Approval::Deny);
    let port = f.loopback_port();
    let kubeconfig = support::kubeconfig();
    let mut connect = f.connect(
        "legal",
        &[
            "--port",
            &port.to_string(),
            "--kubeconfig",
            kubeconfig.to_str().context("kubeconfig path")?,
        ],
    );
    let location = approve(&connect.link().await?).await?;
    assert_eq!(query(&location)["error"], "access_denied");
    let (status, page) = follow(&location).await?;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("denied"), "{page}");

    let (ok, _, stderr) = connect.finish(Duration::from_secs(30)).await?;
    assert!(!ok, "connect must fail");
    assert!(
        stderr.contains("denied in Dropbox (access_denied"),
        "{stderr}"
    );
    assert!(
        f.code_secret("legal").await.is_none(),
        "no code Secret was created"
    );
    Ok(())
}

#[tokio::test]
async fn no_approval_in_time_writes_nothing() -> Result<()> {
    let f = fixture("connect-timeout").await;
    f.create_instance("ops").await;
    let port = f.loopback_port();
    let mut connect = f.connect("ops", &["--port", &port.to_string(), "--timeout", "2s"]);
    connect.link().await?;
    let (ok, _, stderr) = connect.finish(Duration::from_secs(30)).await?;
    assert!(!ok);
    assert!(stderr.contains("no approval within 2s"), "{stderr}");
    assert!(f.code_secret("ops").await.is_none());
    Ok(())
}

#[tokio::test]
async fn a_verifier_that_does_not_match_leaves_the_instance_not_ready() -> Result<()> {
    let f = fixture("connect-verifier").await;
    f.create_instance("finance").await;
    let port = f.loopback_port();
    // No controller yet: the verifier is swapped before anyone exchanges the code.
    let mut connect = f.connect(
        "finance",
        &["--port", &port.to_string(), "--wait-timeout", "90s"],
    );
    let location = approve(&connect.link().await?).await?;
    assert_eq!(follow(&location).await?.0, 200);
    let secret = support::eventually(
        "the code Secret",
        Duration::from_secs(30),
        || async { Ok(f.code_secret("finance").await) },
        |s: &Option<Secret>| s.is_some(),
    )
    .await?
    .context("code Secret")?;
    let code = secret_text(&secret, "code").context("code")?;
    let redirect = secret_text(&secret, "redirect_uri").context("redirect_uri")?;
    let other = dropbox_operator::connect::Pkce::new().verifier;
    support::put_secret(
        &f.secrets,
        "finance-code",
        &[
            ("code", &code),
            ("code_verifier", &other),
            ("redirect_uri", &redirect),
        ],
    )
    .await?;
    let _controller = f.start_controller().await;

    let (ok, stdout, stderr) = connect.finish(Duration::from_secs(120)).await?;
    assert!(!ok, "connect must fail; stdout:\n{stdout}");
    assert!(stderr.contains("CodeExchangeFailed"), "{stderr}");
    assert!(stderr.contains("invalid code verifier"), "{stderr}");
    let instance = f.instances.get("finance").await?;
    assert!(support::condition_is(
        &instance,
        "Authorized",
        "False",
        Some("CodeExchangeFailed")
    ));
    assert!(!support::condition_is(&instance, "Ready", "True", None));
    let exchange = f.emu.calls_to("/oauth2/token");
    assert_eq!(exchange.len(), 1);
    assert_eq!(exchange[0].form.get("code_verifier"), Some(&other));
    assert_eq!(exchange[0].status, 400);
    Ok(())
}

#[tokio::test]
async fn no_redirect_takes_the_code_from_standard_input() -> Result<()> {
    let f = fixture("connect-paste").await;
    let _controller = f.start_controller().await;
    f.create_instance("hr").await;
    let mut connect = f.connect("hr", &["--no-redirect", "--wait-timeout", "90s"]);
    let link = connect.link().await?;
    assert!(!query(&link).contains_key("redirect_uri"), "{link}");
    // Dropbox shows the code on its page; the person pastes it.
    let r = no_redirects().get(link).send().await?;
    assert_eq!(r.status(), 200);
    let page = r.text().await?;
    let code = page
        .split("value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .context("code on the page")?
        .to_owned();
    let mut stdin = connect.child.stdin.take().context("stdin")?;
    stdin.write_all(format!("{code}\n").as_bytes()).await?;
    stdin.flush().await?;

    let (ok, stdout, stderr) = connect.finish(Duration::from_secs(120)).await?;
    assert!(ok, "connect failed; stdout:\n{stdout}\nstderr:\n{stderr}");
    let secret = f.code_secret("hr").await.context("code Secret")?;
    assert_eq!(secret_text(&secret, "code").as_deref(), Some(code.as_str()));
    // Obtained without a redirect URI: none is sent, although callbackUrl is set.
    assert_eq!(secret_text(&secret, "redirect_uri").as_deref(), Some(""));
    let exchange = f.emu.calls_to("/oauth2/token");
    assert_eq!(exchange[0].form.get("redirect_uri"), None);
    assert_eq!(exchange[0].status, 200);
    Ok(())
}

/// `kubectl dropbox connect --help` through kubectl's real plugin lookup, and
/// `kubectl-dropbox connect --help` directly: the binary under the plugin name.
#[test]
fn the_binary_is_a_kubectl_plugin() {
    let dir = tempfile::tempdir().expect("temp dir");
    let plugin = dir.path().join("kubectl-dropbox");
    std::os::unix::fs::symlink(support::operator::binary(), &plugin).expect("symlink");

    let out = std::process::Command::new(&plugin)
        .args(["connect", "--help"])
        .output()
        .expect("run kubectl-dropbox");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    assert!(help.contains("Usage: kubectl dropbox connect"), "{help}");
    assert!(help.contains("--no-redirect"), "{help}");

    let kubectl = support::controlplane::bin_dir().join("kubectl");
    if !kubectl.exists() {
        panic!("kubectl missing in {}", kubectl.display());
    }
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new(&kubectl)
        .args(["dropbox", "connect", "--help"])
        .env("PATH", path)
        .output()
        .expect("run kubectl");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{help}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(help.contains("Usage: kubectl dropbox connect"), "{help}");
}

#[tokio::test]
async fn instances_connect_cannot_authorize_are_clear_errors() -> Result<()> {
    let f = fixture("connect-refusals").await;
    let mut missing = f.connect("nope", &[]);
    let (ok, _, stderr) = missing.finish(Duration::from_secs(30)).await?;
    assert!(!ok);
    assert!(
        stderr.contains(&format!("DropboxElementInstance {}/nope not found", f.ns)),
        "{stderr}"
    );

    let api_key: DropboxElementInstance = serde_json::from_value(json!({
        "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
        "kind": "DropboxElementInstance",
        "metadata": {"name": "longlived"},
        "spec": {
            "element": {"key": "dropbox"},
            "authentication": {"type": "apiKey", "apiKeySecretRef": {"name": "token"}}
        }
    }))?;
    f.instances.create(&PostParams::default(), &api_key).await?;
    let mut wrong_type = f.connect("longlived", &[]);
    let (ok, _, stderr) = wrong_type.finish(Duration::from_secs(30)).await?;
    assert!(!ok);
    assert!(stderr.contains("authorizes oauth2 instances"), "{stderr}");

    // The app Secret without the app key: said before any link is printed.
    f.create_instance("nokey").await;
    support::put_secret(
        &f.secrets,
        "dropbox-app",
        &[("oauth.api.secret", APP_SECRET)],
    )
    .await?;
    f.secrets
        .patch(
            "dropbox-app",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"data": {"oauth.api.key": null}})),
        )
        .await?;
    let mut no_key = f.connect("nokey", &[]);
    let (ok, stdout, stderr) = no_key.finish(Duration::from_secs(30)).await?;
    assert!(!ok);
    assert!(!stdout.contains("/oauth2/authorize"), "{stdout}");
    assert!(stderr.contains("\"oauth.api.key\""), "{stderr}");
    Ok(())
}
