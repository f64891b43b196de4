//! One TLS stack for the whole binary: rustls with the ring provider (the one kube
//! uses), installed once as the process default so reqwest can use it too.

use std::sync::Once;

/// Installs ring as rustls' process-wide crypto provider (idempotent).
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means another provider is already installed, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
