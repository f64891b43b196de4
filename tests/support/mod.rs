//! Test support shared by the integration-test binaries: one real control plane per
//! binary, a namespace per test, the CRD installed once, and small wait helpers.
#![allow(dead_code)] // each test binary uses a different subset

pub mod argocd;
pub mod bench;
pub mod chart;
pub mod controlplane;
pub mod dropbox;
pub mod fixture;
pub mod image;
pub mod netns;
pub mod node;
pub mod operator;
pub mod proxy;
pub mod receiver;
pub mod tls;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use controlplane::ControlPlane;
use dropbox_operator::api::DropboxElementInstance;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config, CustomResourceExt, Resource};
use serde::de::DeserializeOwned;

/// The control plane of this test binary, started on first use.
pub fn cluster() -> &'static ControlPlane {
    static CLUSTER: OnceLock<ControlPlane> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let label = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .and_then(|s| s.split('-').next().map(str::to_owned))
            .unwrap_or_else(|| "tests".into());
        // Started from a plain thread: the async test that asks first must not block
        // its runtime's only worker for the whole start-up.
        // The credential fault table attributes writes to processes by the
        // API server's audit log.
        let options = controlplane::Options {
            audit: label == "credentials",
            ..Default::default()
        };
        std::thread::spawn(move || {
            ControlPlane::start_with(
                &controlplane::repo_root().join("target/test-clusters"),
                &label,
                &options,
            )
        })
        .join()
        .expect("control-plane start thread panicked")
        .unwrap_or_else(|e| panic!("could not start the test control plane: {e}"))
    })
}

/// A client for the test control plane with admin rights. kube clients are bound to
/// the runtime that created them, so every test makes its own.
pub async fn client() -> Client {
    let kubeconfig = cluster().kubeconfig.clone();
    let config = Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&kubeconfig).expect("read test kubeconfig"),
        &KubeConfigOptions::default(),
    )
    .await
    .expect("load test kubeconfig");
    Client::try_from(config).expect("build kube client")
}

/// Path of the admin kubeconfig.
pub fn kubeconfig() -> PathBuf {
    cluster().kubeconfig.clone()
}

/// Creates a fresh namespace named after the test, with a random suffix.
pub async fn namespace(client: &Client, test: &str) -> String {
    let suffix: u32 = rand::random::<u32>() % 100_000;
    let name = format!(
        "{}-{suffix:05}",
        test.replace('_', "-").chars().take(40).collect::<String>()
    );
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"dropbox-operator.dev/test": "true"}}
    }))
    .expect("namespace manifest");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create test namespace");
    name
}

/// Installs the CRD (server-side apply, as `kubectl apply --server-side` would) and
/// waits until it is Established. Idempotent.
pub async fn install_crd(client: &Client) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = DropboxElementInstance::crd();
    let name = crd.meta().name.clone().context("CRD has a name")?;
    crds.patch(
        &name,
        &PatchParams::apply("dropbox-operator-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .context("apply CRD")?;
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(crds, &name, conditions::is_crd_established()),
    )
    .await
    .context("CRD not Established within 30s")??;
    Ok(())
}

/// Runs kubectl against the test control plane and returns (success, stdout, stderr).
pub fn kubectl(args: &[&str]) -> (bool, String, String) {
    let out = cluster()
        .kubectl()
        .args(args)
        .output()
        .expect("run kubectl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs kubectl with `stdin` piped in.
pub fn kubectl_stdin(args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cluster()
        .kubectl()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child
        .stdin
        .take()
        .expect("kubectl stdin")
        .write_all(stdin.as_bytes())
        .expect("write kubectl stdin");
    let out = child.wait_with_output().expect("wait for kubectl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a long, table-printing test body on a multi-thread runtime of its own
/// (one `#[test]` that runs its rows in sequence), failing with the error chain.
pub fn run_blocking(body: impl Future<Output = Result<()>>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = runtime.block_on(body) {
        panic!("{e:#}");
    }
}

/// Polls `get` until `pred` holds, or fails after `timeout` with the last value seen.
pub async fn eventually<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut get: F,
    pred: impl Fn(&T) -> bool,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
    T: std::fmt::Debug,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let seen = match get().await {
            Ok(v) if pred(&v) => return Ok(v),
            Ok(v) => format!("{v:?}"),
            Err(e) => format!("error: {e:#}"),
        };
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last seen: {seen}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Gets an object, `None` when it does not exist.
pub async fn get_opt<K>(api: &Api<K>, name: &str) -> Result<Option<K>>
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    Ok(api.get_opt(name).await?)
}

/// The condition of `type_` in an instance's status.
pub fn condition<'a>(
    instance: &'a DropboxElementInstance,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    instance
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Whether condition `type_` has `status` (and `reason`, when given).
pub fn condition_is(
    instance: &DropboxElementInstance,
    type_: &str,
    status: &str,
    reason: Option<&str>,
) -> bool {
    condition(instance, type_)
        .is_some_and(|c| c.status == status && reason.is_none_or(|r| c.reason == r))
}

/// Waits until instance `name` has condition `type_` with `status` (and `reason`).
pub async fn wait_condition(
    api: &Api<DropboxElementInstance>,
    name: &str,
    type_: &str,
    status: &str,
    reason: Option<&str>,
    timeout: Duration,
) -> Result<DropboxElementInstance> {
    eventually(
        &format!("{name}: {type_}={status} {reason:?}"),
        timeout,
        || {
            let api = api.clone();
            async move { Ok(api.get(name).await?) }
        },
        |i: &DropboxElementInstance| condition_is(i, type_, status, reason),
    )
    .await
}

/// Creates or updates Secret `name` with string data (server-side apply).
pub async fn put_secret(
    api: &Api<k8s_openapi::api::core::v1::Secret>,
    name: &str,
    data: &[(&str, &str)],
) -> Result<()> {
    let string_data: serde_json::Map<String, serde_json::Value> = data
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::json!(v)))
        .collect();
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name}, "stringData": string_data
    }))?;
    api.patch(
        name,
        &PatchParams::apply("tests").force(),
        &Patch::Apply(&secret),
    )
    .await?;
    Ok(())
}
