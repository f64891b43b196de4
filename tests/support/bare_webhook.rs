//! Benchmark baseline: the barest axum handler that reads a webhook body (and,
//! with BARE_APP_SECRET, checks its signature), on the same runtime setup as
//! the ingress. Prints its address and serves until killed.
//! `cargo run --release --example bare-webhook`

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use dropbox_operator::ingress::payload::{dropbox_signature_matches, parse_dropbox_signature};

fn main() -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // With BARE_APP_SECRET it also checks X-Dropbox-Signature with the
        // ingress's own functions: the benchmark's measure of what the HMAC costs.
        let secret = std::env::var("BARE_APP_SECRET").ok();
        let app = Router::new().route(
            "/webhooks/dropbox/{app_key}",
            post(move |headers: HeaderMap, body: Bytes| async move {
                std::hint::black_box(body.len());
                if let Some(secret) = &secret {
                    let signed = headers
                        .get("x-dropbox-signature")
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_dropbox_signature)
                        .is_some_and(|tag| {
                            dropbox_signature_matches(secret.as_bytes(), &body, &tag)
                        });
                    if !signed {
                        return (StatusCode::FORBIDDEN, "invalid signature");
                    }
                }
                (StatusCode::OK, "")
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("{}", listener.local_addr()?);
        axum::serve(listener, app).await
    })
}
