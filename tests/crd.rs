//! The DropboxElementInstance CRD on a real kube-apiserver: installation,
//! round-trips, admission-time validation, `kubectl explain`/`get`, and garbage
//! collection by the real kube-controller-manager.

mod support;

use std::time::Duration;

use anyhow::Result;
use dropbox_operator::api::DropboxElementInstance;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Resource;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};

/// A manifest with every spec field set.
fn full_manifest(name: &str) -> Value {
    json!({
        "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
        "kind": "DropboxElementInstance",
        "metadata": {"name": name},
        "spec": {
            "element": {"key": "dropbox"},
            "name": "Marketing Dropbox",
            "tags": ["marketing", "prod"],
            "authentication": {
                "type": "oauth2",
                "appSecretRef": {"name": "dropbox-app", "clientIdKey": "oauth.api.key", "clientSecretKey": "oauth.api.secret"},
                "codeSecretRef": {"name": "marketing-code", "key": "code"},
                "callbackUrl": "https://www.mycoolapp.com/auth",
                "apiKeySecretRef": {"name": "marketing-token", "key": "apiKey"}
            },
            "events": {
                "enabled": true,
                "callbackUrl": "https://app.example.com/dropbox-events",
                "signatureKeySecretRef": {"name": "events-key", "key": "event.notification.signature.key"},
                "format": "elements"
            }
        }
    })
}

fn apply(ns: &str, manifest: &Value) -> (bool, String, String) {
    support::kubectl_stdin(&["apply", "-n", ns, "-f", "-"], &manifest.to_string())
}

#[tokio::test]
async fn crd_installs_and_becomes_established() -> Result<()> {
    let client = support::client().await;
    support::install_crd(&client).await?;
    let (ok, out, err) =
        support::kubectl(&["api-resources", "--api-group=elements.dropbox-operator.dev"]);
    assert!(ok, "kubectl api-resources failed: {err}");
    assert!(
        out.contains("dropboxelementinstances") && out.contains("dbxi"),
        "{out}"
    );
    Ok(())
}

#[tokio::test]
async fn full_manifest_round_trips_unchanged() -> Result<()> {
    let client = support::client().await;
    support::install_crd(&client).await?;
    let ns = support::namespace(&client, "round-trip").await;
    let manifest = full_manifest("marketing");
    let (ok, _, err) = apply(&ns, &manifest);
    assert!(ok, "valid manifest refused: {err}");

    let api: Api<DropboxElementInstance> = Api::namespaced(client, &ns);
    let stored = api.get("marketing").await?;
    let stored_spec = serde_json::to_value(&stored.spec)?;
    assert_eq!(
        stored_spec, manifest["spec"],
        "spec changed on the way through the API server"
    );

    // The raw object too (not only what our types can represent).
    let (ok, raw, err) = support::kubectl(&["get", "dbxi", "marketing", "-n", &ns, "-o", "json"]);
    assert!(ok, "{err}");
    let raw: Value = serde_json::from_str(&raw)?;
    assert_eq!(raw["spec"], manifest["spec"]);
    Ok(())
}

#[tokio::test]
async fn defaults_are_applied_by_the_api_server() -> Result<()> {
    let client = support::client().await;
    support::install_crd(&client).await?;
    let ns = support::namespace(&client, "defaults").await;
    let manifest = json!({
        "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
        "kind": "DropboxElementInstance",
        "metadata": {"name": "minimal"},
        "spec": {
            "element": {"key": "dropbox"},
            "authentication": {
                "type": "oauth2",
                "appSecretRef": {"name": "dropbox-app"},
                "codeSecretRef": {"name": "code"},
                "callbackUrl": "http://localhost:8080/auth"
            },
            "events": {"enabled": true, "callbackUrl": "https://app.example.com/events",
                       "signatureKeySecretRef": {"name": "key"}}
        }
    });
    let (ok, _, err) = apply(&ns, &manifest);
    assert!(ok, "{err}");
    let stored = Api::<DropboxElementInstance>::namespaced(client, &ns)
        .get("minimal")
        .await?;
    let auth = &stored.spec.authentication;
    let app = auth.app_secret_ref.as_ref().expect("appSecretRef");
    assert_eq!(app.client_id_key, "oauth.api.key");
    assert_eq!(app.client_secret_key, "oauth.api.secret");
    assert_eq!(
        auth.code_secret_ref.as_ref().expect("codeSecretRef").key,
        "code"
    );
    let events = stored.spec.events.expect("events");
    assert_eq!(events.format, dropbox_operator::api::EventFormat::Elements);
    assert_eq!(events.source, dropbox_operator::api::EventSource::Webhook);
    assert_eq!(
        events
            .signature_key_secret_ref
            .expect("signatureKeySecretRef")
            .key,
        "event.notification.signature.key"
    );
    Ok(())
}

/// Applies `mutate(full_manifest)` and expects a refusal naming `field`.
fn assert_refused(ns: &str, case: &str, field: &str, mutate: impl FnOnce(&mut Value)) {
    let mut manifest = full_manifest(&format!("invalid-{case}"));
    mutate(&mut manifest);
    let (ok, out, err) = apply(ns, &manifest);
    assert!(!ok, "{case}: invalid manifest was accepted: {out}");
    assert!(
        err.contains(field),
        "{case}: the refusal does not name {field}:\n{err}"
    );
}

fn remove(v: &mut Value, pointer: &str) {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer has a parent");
    v.pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .expect("parent is an object")
        .remove(key);
}

fn set(v: &mut Value, pointer: &str, value: Value) {
    *v.pointer_mut(pointer).expect("pointer exists") = value;
}

#[tokio::test]
async fn invalid_manifests_are_refused_at_admission_naming_the_field() -> Result<()> {
    let client = support::client().await;
    support::install_crd(&client).await?;
    let ns = support::namespace(&client, "invalid").await;

    assert_refused(&ns, "element-key", "spec.element.key", |m| {
        set(m, "/spec/element/key", json!("box"))
    });
    assert_refused(&ns, "no-element", "spec.element", |m| {
        remove(m, "/spec/element")
    });
    assert_refused(
        &ns,
        "events-without-callback",
        "spec.events.callbackUrl",
        |m| remove(m, "/spec/events/callbackUrl"),
    );
    assert_refused(
        &ns,
        "oauth2-without-app-secret",
        "spec.authentication.appSecretRef",
        |m| remove(m, "/spec/authentication/appSecretRef"),
    );
    assert_refused(
        &ns,
        "oauth2-without-code-secret",
        "spec.authentication.codeSecretRef",
        |m| remove(m, "/spec/authentication/codeSecretRef"),
    );
    assert_refused(
        &ns,
        "oauth2-without-callback",
        "spec.authentication.callbackUrl",
        |m| remove(m, "/spec/authentication/callbackUrl"),
    );
    assert_refused(
        &ns,
        "apikey-without-secret",
        "spec.authentication.apiKeySecretRef",
        |m| {
            set(m, "/spec/authentication/type", json!("apiKey"));
            remove(m, "/spec/authentication/apiKeySecretRef");
        },
    );
    assert_refused(&ns, "relative-events-url", "spec.events.callbackUrl", |m| {
        set(m, "/spec/events/callbackUrl", json!("/dropbox-events"))
    });
    assert_refused(
        &ns,
        "ftp-auth-url",
        "spec.authentication.callbackUrl",
        |m| {
            set(
                m,
                "/spec/authentication/callbackUrl",
                json!("ftp://www.mycoolapp.com/auth"),
            )
        },
    );
    assert_refused(&ns, "not-a-url", "spec.events.callbackUrl", |m| {
        set(
            m,
            "/spec/events/callbackUrl",
            json!("app.example.com/events"),
        )
    });
    assert_refused(&ns, "unknown-auth-type", "spec.authentication.type", |m| {
        set(m, "/spec/authentication/type", json!("basic"))
    });
    assert_refused(&ns, "unknown-format", "spec.events.format", |m| {
        set(m, "/spec/events/format", json!("xml"))
    });
    assert_refused(&ns, "unknown-source", "spec.events.source", |m| {
        m["spec"]["events"]["source"] = json!("push")
    });
    assert_refused(
        &ns,
        "secret-ref-without-name",
        "spec.authentication.appSecretRef.name",
        |m| remove(m, "/spec/authentication/appSecretRef/name"),
    );
    assert_refused(&ns, "tags-not-a-list", "spec.tags", |m| {
        set(m, "/spec/tags", json!("marketing"))
    });

    // Nothing was stored.
    let (ok, out, err) = support::kubectl(&["get", "dbxi", "-n", &ns, "-o", "name"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "", "refused manifests must not be stored");
    Ok(())
}

#[tokio::test]
async fn kubectl_explain_teaches_the_resource() -> Result<()> {
    let client = support::client().await;
    support::install_crd(&client).await?;
    // explain reads the published OpenAPI; it can lag the CRD by a moment.
    let out = support::eventually(
        "kubectl explain dbxi.spec.events",
        Duration::from_secs(30),
        || async {
            let (ok, out, err) = support::kubectl(&["explain", "dbxi.spec.events"]);
            if ok { Ok(out) } else { anyhow::bail!(err) }
        },
        |out: &String| out.contains("callbackUrl"),
    )
    .await?;
    for expected in [
        "Delivery of standardized file-change events",
        "enabled",
        "event.notification.enabled",
        "callbackUrl",
        "signatureKeySecretRef",
        "format",
        "cloudevents",
        "source",
        "longpoll",
        "no webhook registration",
    ] {
        assert!(
            out.contains(expected),
            "`kubectl explain dbxi.spec.events` lacks {expected:?}:\n{out}"
        );
    }
    let (ok, out, err) = support::kubectl(&[
        "explain",
        "dbxi.spec.authentication.appSecretRef.clientIdKey",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("Key of the app key"), "{out}");
    Ok(())
}

#[tokio::test]
async fn kubectl_get_shows_the_printer_columns() -> Result<()> {
    let client = support::client().await;
    support::install_crd(&client).await?;
    let ns = support::namespace(&client, "columns").await;
    let (ok, _, err) = apply(&ns, &full_manifest("columns"));
    assert!(ok, "{err}");
    // Fill the status the way the controller would, so the columns have values.
    let api: Api<DropboxElementInstance> = Api::namespaced(client, &ns);
    let status = json!({"status": {
        "account": {"accountId": "dbid:AAH4f99", "email": "franz@example.com", "displayName": "Franz"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "TokenValid", "message": "ok",
                        "lastTransitionTime": "2026-11-28T10:00:00Z"}]
    }});
    api.patch_status(
        "columns",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&status),
    )
    .await?;
    let (ok, out, err) = support::kubectl(&["get", "dbxi", "-n", &ns]);
    assert!(ok, "{err}");
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "ACCOUNT", "READY", "REASON", "EVENTS", "AGE"],
        "{out}"
    );
    let row: Vec<&str> = out
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..5],
        ["columns", "franz@example.com", "True", "TokenValid", "true"],
        "{out}"
    );
    Ok(())
}

#[tokio::test]
async fn owned_configmap_is_garbage_collected_with_its_instance() -> Result<()> {
    let client = support::client().await;
    support::install_crd(&client).await?;
    let ns = support::namespace(&client, "gc").await;
    let (ok, _, err) = apply(&ns, &full_manifest("owner"));
    assert!(ok, "{err}");
    let instances: Api<DropboxElementInstance> = Api::namespaced(client.clone(), &ns);
    let owner = instances.get("owner").await?;
    let owner_ref = owner.controller_owner_ref(&()).expect("instance has a uid");

    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("owner-dropbox-events".into());
    cm.metadata.owner_references = Some(vec![owner_ref]);
    configmaps.create(&PostParams::default(), &cm).await?;

    instances.delete("owner", &DeleteParams::default()).await?;
    support::eventually(
        "the owned ConfigMap to be garbage-collected",
        Duration::from_secs(60),
        || support::get_opt(&configmaps, "owner-dropbox-events"),
        Option::is_none,
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn imported_cloud_elements_instance_is_accepted_by_the_api_server() -> Result<()> {
    let client = support::client().await;
    support::install_crd(&client).await?;
    let ns = support::namespace(&client, "import").await;
    // The instance JSON as Cloud Elements documents it (docs/user-guide.md, "Coming from Cloud Elements"), with values.
    let json = r#"{
      "element": { "key": "dropbox" },
      "providerData": { "code": "Xo0C2mBkUiAAAAAAAAAAFm3pQwz9Lr7Tn5VhY1cD8sK" },
      "configuration": {
        "oauth.api.key": "7q3kz1m9xw2b5vd",
        "oauth.api.secret": "hq04ptz8c1n6yre",
        "oauth.callback.url": "https://www.mycoolapp.com/auth",
        "event.notification.enabled": "true",
        "event.notification.callback.url": "https://app.example.com/dropbox-events",
        "event.notification.signature.key": "evt-sig-3b9d0c71f2a8"
      },
      "tags": ["marketing"],
      "name": "Marketing Dropbox"
    }"#;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dropbox-operator"))
        .args(["import", "-", "--namespace", &ns])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), json.as_bytes())?;
    let out = child.wait_with_output()?;
    assert!(out.status.success(), "import failed");
    let yaml = String::from_utf8(out.stdout)?;
    let (ok, stdout, err) =
        support::kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &yaml);
    assert!(ok, "the API server refused the imported manifests: {err}");
    assert!(stdout.contains("dropboxelementinstance.elements.dropbox-operator.dev/marketing-dropbox created (server dry run)"), "{stdout}");
    assert_eq!(stdout.matches("secret/").count(), 3, "{stdout}");
    Ok(())
}
