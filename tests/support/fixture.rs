//! Set-up that the end-to-end fixtures of several test binaries share; what
//! differs between them (accounts, secrets, the processes' settings) stays in
//! each test file.

use kube::Client;

use super::dropbox::Emulator;
use super::operator::OperatorProcess;

/// An admin client with the CRD installed, a fresh namespace named after `test`,
/// and a started Dropbox emulator that knows app `app_key`.
pub async fn emulated_namespace(
    test: &str,
    app_key: &str,
    app_secret: &str,
) -> (Client, String, Emulator) {
    let client = super::client().await;
    super::install_crd(&client).await.expect("install CRD");
    let ns = super::namespace(&client, test).await;
    let emu = Emulator::start().await;
    emu.add_app(app_key, app_secret);
    (client, ns, emu)
}

/// An ingress process in `ns` that accepts loopback callbacks and retries and
/// heartbeats quickly (a test does not wait for the production timings).
pub fn quick_ingress(ns: &str, emu: &Emulator) -> OperatorProcess {
    OperatorProcess::ingress(ns, &emu.url)
        .env("ALLOWED_CALLBACK_CIDRS", "127.0.0.0/8,::1/128")
        .env("DELIVERY_BASE_BACKOFF", "200ms")
        .env("DELIVERY_MAX_BACKOFF", "2s")
        .env("HEARTBEAT_INTERVAL", "1s")
}
