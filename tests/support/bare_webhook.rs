//! Benchmark baseline: the barest axum handler that reads a webhook body, on the
//! same runtime setup as the ingress. Prints its address and serves until killed.
//! `cargo run --release --example bare-webhook`

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;

fn main() -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let app = Router::new().route(
            "/webhooks/dropbox/{app_key}",
            post(|body: Bytes| async move {
                std::hint::black_box(body.len());
                ""
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("{}", listener.local_addr()?);
        axum::serve(listener, app).await
    })
}
