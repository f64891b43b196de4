//! `dropbox-operator connect` end to end: the built binary as a subprocess, a
//! real control plane, the real controller process and the Dropbox emulator
//! (whose `/oauth2/authorize` plays the person who approves or denies). Most
//! rows are their own browser: they read the link connect prints, GET it
//! without following the redirect, and GET the Location on connect's loopback
//! listener. `a_real_browser_*` drives Debian's headless Chromium
//! (tests/browser/connect.mjs) through the emulator's approval page instead,
//! and takes the screenshots in docs/images.

mod support;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use dropbox_operator::api::DropboxElementInstance;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
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

    /// What the controller publishes once it read the app Secret: the app key
    /// in status (for rows that run connect without a controller).
    async fn publish_app_key(&self, name: &str) {
        self.instances
            .patch_status(
                name,
                &PatchParams::apply("test-controller").force(),
                &Patch::Apply(json!({
                    "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
                    "kind": "DropboxElementInstance",
                    "status": {"appKey": APP_KEY, "observedGeneration": 1}
                })),
            )
            .await
            .expect("publish status.appKey");
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
        self.connect_env(name, extra, &[])
    }

    /// [`Fixture::connect`] with extra environment variables.
    fn connect_env(&self, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Connect {
        let mut cmd = tokio::process::Command::new(support::operator::binary());
        cmd.envs(env.iter().copied());
        cmd.args(["connect", name, "-n", &self.ns, "--no-browser"])
            .args(["--dropbox-www-url", &self.emu.url])
            .args(extra)
            .env_remove("CONNECT_NAMESPACE")
            .env_remove("CONNECT_OUTPUT")
            .env_remove("CONNECT_LOG_LEVEL");
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
    /// The authorize link connect printed (as a sentence, or in `-o json`'s
    /// `link` line).
    async fn link(&self) -> Result<reqwest::Url> {
        for _ in 0..300 {
            let out = self.stdout.lock().unwrap().clone();
            let from_json = out
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["event"] == "link")
                .and_then(|v| v["url"].as_str().map(str::to_owned));
            if let Some(url) = from_json {
                return Ok(reqwest::Url::parse(&url)?);
            }
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

    /// Waits for the exit; returns (exit code, stdout, stderr).
    async fn finish(&mut self, timeout: Duration) -> Result<(i32, String, String)> {
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
            status.code().unwrap_or(-1),
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

    let (code, stdout, stderr) = connect.finish(Duration::from_secs(120)).await?;
    assert_eq!(
        code, 0,
        "connect failed; stdout:\n{stdout}\nstderr:\n{stderr}"
    );
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
    f.publish_app_key("sales").await;
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

    let (code, _, stderr) = connect.finish(Duration::from_secs(30)).await?;
    assert_eq!(code, 7, "connect must fail as `redirect`: {stderr}");
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
    f.publish_app_key("legal").await;
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

    let (code, _, stderr) = connect.finish(Duration::from_secs(30)).await?;
    assert_eq!(code, 6, "connect must fail as `denied`: {stderr}");
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
    f.publish_app_key("ops").await;
    let port = f.loopback_port();
    let mut connect = f.connect("ops", &["--port", &port.to_string(), "--timeout", "2s"]);
    connect.link().await?;
    let (code, _, stderr) = connect.finish(Duration::from_secs(30)).await?;
    assert_eq!(code, 8, "approval-timeout: {stderr}");
    assert!(stderr.contains("no approval within 2s"), "{stderr}");
    assert!(f.code_secret("ops").await.is_none());
    Ok(())
}

#[tokio::test]
async fn a_verifier_that_does_not_match_leaves_the_instance_not_ready() -> Result<()> {
    let f = fixture("connect-verifier").await;
    f.create_instance("finance").await;
    f.publish_app_key("finance").await;
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

    let (code, stdout, stderr) = connect.finish(Duration::from_secs(120)).await?;
    assert_eq!(
        code, 9,
        "connect must fail as `not-ready`; stdout:\n{stdout}"
    );
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

    let (exit, stdout, stderr) = connect.finish(Duration::from_secs(120)).await?;
    assert_eq!(
        exit, 0,
        "connect failed; stdout:\n{stdout}\nstderr:\n{stderr}"
    );
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
    assert!(help.contains("10  ready-timeout"), "exit codes: {help}");

    // The plugin lists what a person runs, not the operator's own subcommands,
    // which `dropbox-operator --help` still lists.
    let subcommands = |help: &str| -> Vec<String> {
        help.split("Commands:")
            .nth(1)
            .and_then(|rest| rest.split("\n\n").next())
            .unwrap_or_default()
            .lines()
            // A name starts each entry (two spaces in); wrapped text is further in.
            .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    };
    let out = std::process::Command::new(&plugin)
        .arg("--help")
        .output()
        .expect("run kubectl-dropbox --help");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    assert_eq!(
        subcommands(&help),
        [
            "import",
            "connect",
            "release-finalizers",
            "completion",
            "help"
        ],
        "{help}"
    );
    let out = std::process::Command::new(support::operator::binary())
        .arg("--help")
        .output()
        .expect("run dropbox-operator --help");
    let help = String::from_utf8_lossy(&out.stdout);
    for internal in ["crd", "controller", "ingress", "connect"] {
        assert!(subcommands(&help).iter().any(|s| s == internal), "{help}");
    }

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
    // The generic LOG_LEVEL/LOG_FORMAT of the user's shell are not connect's:
    // at `trace` the Kubernetes client would log every request, as JSON.
    let mut missing = f.connect_env(
        "nope",
        &[],
        &[("LOG_LEVEL", "trace"), ("LOG_FORMAT", "json")],
    );
    let (code, _, stderr) = missing.finish(Duration::from_secs(30)).await?;
    assert_eq!(code, 4, "instance: {stderr}");
    assert_eq!(
        stderr.trim(),
        format!("error: DropboxElementInstance {}/nope not found", f.ns),
        "only the error, no log lines"
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
    let (code, _, stderr) = wrong_type.finish(Duration::from_secs(30)).await?;
    assert_eq!(code, 4, "instance: {stderr}");
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
    // Nobody has looked at the instance yet: connect waits for the operator,
    // and says so when it does not come.
    let mut unseen = f.connect("nokey", &["--wait-timeout", "2s"]);
    let (code, stdout, stderr) = unseen.finish(Duration::from_secs(30)).await?;
    assert_eq!(code, 4, "instance: {stderr}");
    assert!(
        stdout.contains("Waiting up to 2s for the operator"),
        "{stdout}"
    );
    assert!(stderr.contains("did not publish status.appKey"), "{stderr}");
    // The controller reads the app Secret and finds no key: connect repeats why.
    let _controller = f.start_controller().await;
    let mut no_key = f.connect("nokey", &[]);
    let (code, stdout, stderr) = no_key.finish(Duration::from_secs(60)).await?;
    assert_eq!(code, 4, "instance: {stderr}");
    assert!(!stdout.contains("/oauth2/authorize"), "{stdout}");
    assert!(stderr.contains("no status.appKey"), "{stderr}");
    assert!(stderr.contains("\"oauth.api.key\""), "{stderr}");
    Ok(())
}

/// `completion bash` is a script bash itself accepts and that completes the
/// subcommands; `completion zsh` is zsh's format; the plugin's completes
/// `kubectl-dropbox` with its own subcommands only.
#[test]
fn completion_scripts_complete_in_bash() {
    let script = |argv0: &std::path::Path, shell: &str| -> String {
        let out = std::process::Command::new(argv0)
            .args(["completion", shell])
            .env("LOG_LEVEL", "trace")
            .output()
            .expect("run completion");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let plugin = dir.path().join("kubectl-dropbox");
    std::os::unix::fs::symlink(support::operator::binary(), &plugin).expect("symlink");
    let binary = support::operator::binary();

    assert!(script(&binary, "zsh").starts_with("#compdef dropbox-operator"));
    assert!(script(&plugin, "zsh").starts_with("#compdef kubectl-dropbox"));
    assert!(script(&binary, "fish").contains("complete -c dropbox-operator"));

    // What bash offers after `<command> ` and after `<command> connect --no-`.
    let complete = |command: &str, script: &str, words: &[&str]| -> Vec<String> {
        let file = dir.path().join(format!("{command}.bash"));
        std::fs::write(&file, script).expect("write script");
        let function = format!("_{}", command.replace('-', "__"));
        let program = format!(
            "source {file}; COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE=\"${{COMP_WORDS[*]}}\"; \
             COMP_POINT=${{#COMP_LINE}}; {function} {command} \"${{COMP_WORDS[-1]}}\" \"${{COMP_WORDS[-2]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            file = file.display(),
            words = words
                .iter()
                .map(|w| format!("'{w}'"))
                .collect::<Vec<_>>()
                .join(" "),
            cword = words.len() - 1,
        );
        let out = std::process::Command::new("bash")
            .args(["-c", &program])
            .output()
            .expect("run bash");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let top = complete(
        "dropbox-operator",
        &script(&binary, "bash"),
        &["dropbox-operator", ""],
    );
    for s in ["connect", "controller", "import", "completion"] {
        assert!(top.iter().any(|w| w == s), "{top:?}");
    }
    let plugin_top = complete(
        "kubectl-dropbox",
        &script(&plugin, "bash"),
        &["kubectl-dropbox", ""],
    );
    assert!(plugin_top.iter().any(|w| w == "connect"), "{plugin_top:?}");
    assert!(
        !plugin_top
            .iter()
            .any(|w| w == "controller" || w == "ingress"),
        "{plugin_top:?}"
    );
    let flags = complete(
        "kubectl-dropbox",
        &script(&plugin, "bash"),
        &["kubectl-dropbox", "connect", "--no-"],
    );
    assert!(flags.iter().any(|w| w == "--no-redirect"), "{flags:?}");
    assert!(flags.iter().any(|w| w == "--no-browser"), "{flags:?}");
}

// ---- a real browser -------------------------------------------------------------

/// Where the browser rows put their screenshots; with DOCS_SCREENSHOTS=1 they
/// also replace docs/images/connect-*.png (docs/user-guide.md, "Connect an account").
fn screenshot_path(name: &str) -> std::path::PathBuf {
    let dir = support::controlplane::repo_root().join("target/screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir.join(format!("connect-{name}.png"))
}

fn publish_screenshot(name: &str) {
    if std::env::var("DOCS_SCREENSHOTS").as_deref() == Ok("1") {
        let docs = support::controlplane::repo_root().join("docs/images");
        std::fs::create_dir_all(&docs).expect("docs/images");
        std::fs::copy(
            screenshot_path(name),
            docs.join(format!("connect-{name}.png")),
        )
        .expect("copy screenshot");
    }
}

/// Debian's headless Chromium (tests/browser/connect.mjs, playwright-core) opens
/// `url`, clicks `click` (`allow`, `deny` or `none`) on the emulator's approval
/// page, follows the redirect to connect's loopback page and waits there for a
/// final outcome. Returns what the page shows.
async fn browser(url: &str, click: &str, screenshot: &str) -> Result<serde_json::Value> {
    let script = support::controlplane::repo_root().join("tests/browser/connect.mjs");
    ensure!(
        std::path::Path::new("/usr/bin/chromium").exists()
            && script
                .with_file_name("node_modules/playwright-core")
                .exists(),
        "Chromium or playwright-core is missing: run `make testdeps`"
    );
    let out = tokio::time::timeout(
        Duration::from_secs(150),
        tokio::process::Command::new("node")
            .arg(&script)
            .args([url, click])
            .arg(screenshot_path(screenshot))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the browser did not finish within 150s")??;
    ensure!(
        out.status.success(),
        "the browser failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    publish_screenshot(screenshot);
    let page: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    println!("{screenshot}: {page}");
    Ok(page)
}

/// The JSON lines of `-o json`: every line of standard output is one.
fn json_lines(stdout: &str) -> Result<Vec<serde_json::Value>> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON line: {l}")))
        .collect()
}

/// A user who may do what connect needs and nothing more (docs/user-guide.md, "Connect an
/// account in one command": the Role there): read instances, create Secrets and
/// patch the one code Secret. No `get` on any Secret, so not on the app Secret.
fn connect_user(ns: &str, code_secret: &str) -> Result<std::path::PathBuf> {
    let manifests = format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: connect-user, namespace: {ns}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: dropbox-connect, namespace: {ns}}}
rules:
  - apiGroups: [elements.dropbox-operator.dev]
    resources: [dropboxelementinstances]
    verbs: [get, list, watch]
  - apiGroups: [""]
    resources: [secrets]
    verbs: [create]
  - apiGroups: [""]
    resources: [secrets]
    resourceNames: [{code_secret}]
    verbs: [patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: dropbox-connect, namespace: {ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: dropbox-connect}}
subjects: [{{kind: ServiceAccount, name: connect-user, namespace: {ns}}}]
"#
    );
    let (ok, _, err) = support::kubectl_stdin(&["apply", "-f", "-"], &manifests);
    ensure!(ok, "kubectl apply: {err}");
    let (ok, out, _) = support::kubectl(&[
        "auth",
        "can-i",
        "get",
        "secret/dropbox-app",
        "-n",
        ns,
        &format!("--as=system:serviceaccount:{ns}:connect-user"),
    ]);
    ensure!(
        !ok && out.trim() == "no",
        "the connect user must not read the app Secret"
    );
    support::chart::kubeconfig_for(ns, "connect-user")
}

#[tokio::test]
async fn a_real_browser_connects_and_lands_on_the_outcome() -> Result<()> {
    let f = fixture("connect-browser").await;
    f.emu.script_approval(
        APP_KEY,
        Approval::Ask {
            account_id: ACCOUNT.into(),
        },
    );
    let _controller = f.start_controller().await;
    f.create_instance("design").await;
    let kubeconfig = connect_user(&f.ns, "design-code")?;
    let port = f.loopback_port();
    let mut connect = f.connect(
        "design",
        &[
            "--port",
            &port.to_string(),
            "--wait-timeout",
            "90s",
            "-o",
            "json",
            "--kubeconfig",
            kubeconfig.to_str().context("kubeconfig path")?,
        ],
    );
    let link = connect.link().await?;
    let page = browser(link.as_str(), "allow", "success").await?;

    let (code, stdout, stderr) = connect.finish(Duration::from_secs(120)).await?;
    assert_eq!(
        code, 0,
        "connect failed; stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_eq!(page["outcome"], "connected", "{page}");
    assert!(
        page["url"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&format!("http://127.0.0.1:{port}/?code=")),
        "{page}"
    );
    assert_eq!(page["title"], "Connected: design is Ready", "{page}");
    assert!(
        page["message"]
            .as_str()
            .unwrap_or_default()
            .contains("ada@example.com"),
        "{page}"
    );
    assert!(
        page["next"]
            .as_str()
            .unwrap_or_default()
            .contains("close this tab"),
        "{page}"
    );
    assert_eq!(
        page["command"],
        format!("kubectl get dbxi design -n {}", f.ns),
        "{page}"
    );
    // -o json: only JSON lines; the last is the result.
    let lines = json_lines(&stdout)?;
    assert_eq!(lines[0]["event"], "link", "{stdout}");
    let result = lines.last().context("no output")?;
    assert_eq!(result["event"], "result");
    assert_eq!(result["ok"], true);
    assert_eq!(result["exitCode"], 0);
    assert_eq!(result["class"], "connected");
    assert_eq!(result["account"]["accountId"], ACCOUNT);
    assert!(lines.iter().any(|l| l["event"] == "stored"), "{stdout}");
    assert!(stderr.is_empty(), "{stderr}");

    // The emulator's record: one exchange of the code the browser carried, with
    // the verifier of the link's challenge; the instance is Ready with it.
    let exchanges: Vec<_> = f
        .emu
        .calls_to("/oauth2/token")
        .into_iter()
        .filter(|c| c.form.get("grant_type").map(String::as_str) == Some("authorization_code"))
        .collect();
    assert_eq!(exchanges.len(), 1);
    assert_eq!(exchanges[0].status, 200);
    let verifier = exchanges[0].form.get("code_verifier").context("verifier")?;
    assert_eq!(
        dropbox_operator::connect::s256(verifier),
        query(&link)["code_challenge"]
    );
    let instance = f.instances.get("design").await?;
    assert!(support::condition_is(&instance, "Ready", "True", None));
    assert_eq!(
        instance.status.as_ref().and_then(|s| s.app_key.as_deref()),
        Some(APP_KEY),
        "the controller publishes the app key"
    );
    Ok(())
}

#[tokio::test]
async fn a_real_browser_lands_on_what_went_wrong() -> Result<()> {
    let f = fixture("connect-browser-failures").await;
    f.emu.script_approval(
        APP_KEY,
        Approval::Ask {
            account_id: ACCOUNT.into(),
        },
    );
    // No controller: status.appKey as it would publish it.
    let rerun = |name: &str| format!("kubectl dropbox connect {name} -n {}", f.ns);

    // Cancel on Dropbox's page.
    f.create_instance("legal").await;
    f.publish_app_key("legal").await;
    let port = f.loopback_port();
    let mut connect = f.connect("legal", &["--port", &port.to_string(), "-o", "json"]);
    let page = browser(connect.link().await?.as_str(), "deny", "denied").await?;
    let (code, stdout, _) = connect.finish(Duration::from_secs(30)).await?;
    assert_eq!(code, 6, "{stdout}");
    assert_eq!(
        json_lines(&stdout)?.last().context("result")?["class"],
        "denied"
    );
    assert_eq!(page["outcome"], "denied", "{page}");
    assert_eq!(
        page["title"], "Not connected: the approval was denied",
        "{page}"
    );
    assert!(
        page["message"]
            .as_str()
            .unwrap_or_default()
            .contains("access_denied"),
        "{page}"
    );
    assert_eq!(page["command"], rerun("legal"), "{page}");
    assert!(f.code_secret("legal").await.is_none(), "nothing written");

    // A redirect this run did not start (another state).
    f.create_instance("sales").await;
    f.publish_app_key("sales").await;
    let port = f.loopback_port();
    let mut connect = f.connect("sales", &["--port", &port.to_string(), "-o", "json"]);
    connect.link().await?;
    let forged = format!("http://127.0.0.1:{port}/?code=FORGED&state=forged");
    let page = browser(&forged, "none", "state-mismatch").await?;
    let (code, stdout, _) = connect.finish(Duration::from_secs(30)).await?;
    assert_eq!(code, 7, "{stdout}");
    assert_eq!(page["outcome"], "redirect", "{page}");
    assert_eq!(page["status"], 400, "{page}");
    assert!(
        page["message"]
            .as_str()
            .unwrap_or_default()
            .contains("state does not match"),
        "{page}"
    );
    assert!(f.code_secret("sales").await.is_none(), "nothing written");

    // Approved, but the instance is not Ready in time (nobody exchanges the
    // code): the page says the code is stored and how to follow it.
    f.create_instance("ops").await;
    f.publish_app_key("ops").await;
    let port = f.loopback_port();
    let mut connect = f.connect(
        "ops",
        &[
            "--port",
            &port.to_string(),
            "-o",
            "json",
            "--wait-timeout",
            "3s",
        ],
    );
    let page = browser(connect.link().await?.as_str(), "allow", "ready-timeout").await?;
    let (code, stdout, _) = connect.finish(Duration::from_secs(30)).await?;
    assert_eq!(code, 10, "{stdout}");
    assert_eq!(page["outcome"], "ready-timeout", "{page}");
    assert_eq!(
        page["title"], "Still waiting: ops is not Ready yet",
        "{page}"
    );
    assert!(
        page["message"]
            .as_str()
            .unwrap_or_default()
            .contains("within 3s"),
        "{page}"
    );
    assert_eq!(
        page["command"],
        format!("kubectl get dbxi ops -n {}", f.ns),
        "{page}"
    );
    assert!(f.code_secret("ops").await.is_some(), "the code is stored");
    Ok(())
}
