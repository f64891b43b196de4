//! `make dev`: a local control plane with the CRD installed and the operator
//! running against it — the controller and the webhook ingress as local processes
//! of the binary, and the Dropbox emulator standing in for Dropbox (this machine
//! cannot reach it). The emulator accepts the placeholder credentials of
//! examples/secrets.yaml, so `kubectl apply -f examples/` gives a Ready instance.
//! Stays up until Ctrl-C (or SIGTERM), then stops everything it started.

#[path = "mod.rs"]
mod support;

use support::dropbox::Emulator;
use support::operator::OperatorProcess;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[tokio::main]
async fn main() -> Result<()> {
    let root = support::controlplane::repo_root();
    let cluster = support::cluster();
    let client = support::client().await;
    support::install_crd(&client).await?;

    // A stable path for the kubeconfig, so it can be exported once per shell.
    let stable = root.join("target/dev-cluster/kubeconfig");
    std::fs::create_dir_all(stable.parent().ok_or("no parent")?)?;
    std::fs::copy(&cluster.kubeconfig, &stable)?;

    let emu = Emulator::start().await;
    emu.set_code_ttl(std::time::Duration::from_secs(24 * 3600));
    emu.add_app("<CLIENT_ID>", "<CLIENT_SECRET>");
    emu.add_account("dbid:AADevAccount-0001", "dev@example.com", "Dev User");
    emu.issue_code_value(
        "<CLIENT_ID>",
        "dbid:AADevAccount-0001",
        Some("https://www.mycoolapp.com/auth"),
        "<AUTHORIZATION_GRANT_CODE>",
    );
    // `dropbox-operator connect` works here too: the emulator's approval page
    // approves at once, as the dev account, and redirects to connect's default URI.
    emu.add_redirect_uri("<CLIENT_ID>", "http://127.0.0.1:53682/");
    emu.script_approval(
        "<CLIENT_ID>",
        support::dropbox::Approval::Approve {
            account_id: "dbid:AADevAccount-0001".into(),
        },
    );

    // The operator watches every namespace here, as a cluster-wide install would.
    let controller = OperatorProcess::new("default", &emu.url)
        .env_remove("WATCH_NAMESPACE")
        .env("LOG_LEVEL", "info")
        .name("dev-controller")
        .start()
        .await;
    let ingress = OperatorProcess::ingress("default", &emu.url)
        .env_remove("WATCH_NAMESPACE")
        .env("ALLOWED_CALLBACK_CIDRS", "127.0.0.0/8,::1/128")
        .env("LOG_LEVEL", "info")
        .name("dev-ingress")
        .start()
        .await;

    println!();
    println!("Local control plane is up: {}", cluster.server);
    println!("  export KUBECONFIG={}", stable.display());
    println!("  kubectl apply -f examples/");
    println!("  kubectl get dbxi -w");
    println!(
        "  target/debug/dropbox-operator connect marketing --dropbox-www-url {}   # approve again, with PKCE",
        emu.url
    );
    println!(
        "Dropbox emulator (accepts examples/secrets.yaml's placeholders): {}",
        emu.url
    );
    println!(
        "Webhook ingress: {}/webhooks/dropbox/<CLIENT_ID>",
        ingress.url()
    );
    println!(
        "Logs: controller {}, ingress {}",
        controller.log.display(),
        ingress.log.display()
    );
    println!(
        "      etcd, kube-apiserver, kube-controller-manager in {}",
        cluster.dir.display()
    );
    println!("Press Ctrl-C to stop.");
    tokio::signal::ctrl_c().await?;
    println!("stopping");
    Ok(())
}
