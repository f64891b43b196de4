//! `make demo`: the whole story offline, on a fresh machine — no Dropbox account,
//! no cluster. A local control plane, the operator's controller and webhook
//! ingress (local processes of the real binary, since no kubelet runs pods here),
//! the Dropbox emulator (playing Dropbox and the user who approves the app) and a
//! callback receiver (playing the application).

#[path = "mod.rs"]
mod support;

use std::time::{Duration, Instant};

use dropbox_operator::api::DropboxElementInstance;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use support::dropbox::Emulator;
use support::operator::OperatorProcess;
use support::receiver::Receiver;

const APP_KEY: &str = "demo-app-key";
const APP_SECRET: &str = "demo-app-secret";
const ACCOUNT: &str = "dbid:AADemoAccount-0001";
const SIGNING_KEY: &str = "demo-signing-key";
const REDIRECT: &str = "https://www.mycoolapp.com/auth";

fn step(text: &str) {
    println!("\n\x1b[1m==> {text}\x1b[0m");
}

fn kubectl(args: &[&str]) {
    println!("$ kubectl {}", args.join(" "));
    let (_, out, err) = support::kubectl(args);
    print!("{out}{err}");
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[tokio::main]
async fn main() -> Result<()> {
    let keep = std::env::args().any(|a| a == "--keep");
    step("Starting a local control plane (etcd, kube-apiserver, kube-controller-manager)");
    let cluster = support::cluster();
    let client = support::client().await;
    support::install_crd(&client).await?;
    let ns = "demo";
    let _ = support::kubectl(&["create", "namespace", ns]);

    step("Starting the Dropbox emulator and the application's callback receiver");
    let emu = Emulator::start().await;
    emu.add_app(APP_KEY, APP_SECRET);
    emu.add_account(ACCOUNT, "ada@example.com", "Ada Lovelace");
    let receiver = Receiver::start(Some(SIGNING_KEY.as_bytes())).await;
    println!(
        "Dropbox emulator: {}\ncallback receiver: {}",
        emu.url, receiver.url
    );

    step("Starting dropbox-operator controller and ingress");
    let _controller = OperatorProcess::new(ns, &emu.url)
        .env("LOG_LEVEL", "warn")
        .start()
        .await;
    let ingress = OperatorProcess::ingress(ns, &emu.url)
        .env("LOG_LEVEL", "warn")
        .env("ALLOWED_CALLBACK_CIDRS", "127.0.0.0/8")
        .env("HEARTBEAT_INTERVAL", "1s")
        .start()
        .await;
    println!(
        "controller log: {}\ningress log:    {}",
        _controller.log.display(),
        ingress.log.display()
    );

    step("Ada approves the app in Dropbox; the redirect hands the app an authorization code");
    let code = emu.issue_code(APP_KEY, ACCOUNT, Some(REDIRECT));
    println!("authorization code: {}…", &code[..8.min(code.len())]);

    step("Applying the Secrets and the DropboxElementInstance");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for (name, data) in [
        (
            "dropbox-app",
            json!({"oauth.api.key": APP_KEY, "oauth.api.secret": APP_SECRET}),
        ),
        ("marketing-code", json!({"code": code})),
        (
            "events-key",
            json!({"event.notification.signature.key": SIGNING_KEY}),
        ),
    ] {
        let s: Secret = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name}, "stringData": data}))?;
        secrets
            .patch(name, &PatchParams::apply("demo").force(), &Patch::Apply(&s))
            .await?;
    }
    let manifest = format!(
        "apiVersion: elements.dropbox-operator.dev/v1alpha1\nkind: DropboxElementInstance\nmetadata:\n  name: marketing\n\
         spec:\n  element: {{key: dropbox}}\n  name: Marketing Dropbox\n  tags: [marketing, demo]\n  authentication:\n    \
         type: oauth2\n    appSecretRef: {{name: dropbox-app}}\n    codeSecretRef: {{name: marketing-code}}\n    \
         callbackUrl: {REDIRECT}\n  events:\n    enabled: true\n    callbackUrl: {}\n    \
         signatureKeySecretRef: {{name: events-key}}\n",
        receiver.url
    );
    println!("{manifest}");
    let (ok, out, err) = support::kubectl_stdin(&["apply", "-n", ns, "-f", "-"], &manifest);
    print!("{out}{err}");
    if !ok {
        return Err("kubectl apply failed".into());
    }

    step("Waiting for the instance to become Ready");
    let api: Api<DropboxElementInstance> = Api::namespaced(client.clone(), ns);
    let started = Instant::now();
    loop {
        let i = api.get("marketing").await?;
        let ready = i.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if ready {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            kubectl(&["get", "dbxi", "-n", ns, "-o", "yaml"]);
            return Err("the instance did not become Ready".into());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    kubectl(&["get", "dbxi", "-n", ns]);
    kubectl(&[
        "get",
        "dbxi",
        "marketing",
        "-n",
        ns,
        "-o",
        "jsonpath={.status.conditions}{\"\\n\"}",
    ]);

    step("Ada saves a file in her Dropbox; Dropbox notifies the webhook ingress");
    emu.upload(ACCOUNT, "/Reports/Q3 results.pdf", b"%PDF-1.7 demo");
    let response = emu
        .send_webhook(
            &format!("{}/webhooks/dropbox/{APP_KEY}", ingress.url()),
            APP_KEY,
            &[ACCOUNT],
        )
        .await;
    println!("ingress answered {}", response.status());

    step("The application receives the standardized, signed event");
    let started = Instant::now();
    while receiver.accepted().is_empty() {
        if started.elapsed() > Duration::from_secs(30) {
            return Err("no event arrived".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delivery = &receiver.accepted()[0];
    for (name, value) in &delivery.headers {
        if name.starts_with("elements-") || name.starts_with("webhook-") || name == "content-type" {
            println!("{name}: {value}");
        }
    }
    println!("{}", serde_json::to_string_pretty(&delivery.body)?);
    println!(
        "\nsignature check with key {SIGNING_KEY:?}: Elements-Webhook-Signature {}, Standard Webhooks {}",
        if delivery.elements_signature_ok == Some(true) {
            "VALID"
        } else {
            "INVALID"
        },
        if delivery.standard_webhooks_ok == Some(true) {
            "VALID"
        } else {
            "INVALID"
        },
    );
    let valid =
        delivery.elements_signature_ok == Some(true) && delivery.standard_webhooks_ok == Some(true);

    if keep {
        step("Everything keeps running; press Ctrl-C to stop");
        println!("export KUBECONFIG={}", cluster.kubeconfig.display());
        tokio::signal::ctrl_c().await?;
    }
    step(if valid {
        "Demo complete"
    } else {
        "Demo FAILED: a signature did not verify"
    });
    if !valid {
        return Err("signature check failed".into());
    }
    Ok(())
}
