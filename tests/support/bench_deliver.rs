//! Benchmark baseline for delivery (tests/bench.rs, `bench_ingress`): a plain
//! program doing exactly the delivering side of the ingress's work, in a
//! process of its own. It POSTs the notifications the ingress delivered in the
//! same round (the same bodies, in the same order per instance, each instance's
//! one after the other and the instances side by side, as the ingress's syncs
//! do) to the same verifying receiver, signing each the ingress's way (both
//! signatures, a fresh timestamp), with a client built like the ingress's
//! (`ssrf::callback_client`, the callback URL checked before each POST), on
//! the same runtime and allocator.
//!
//! `bench-deliver <receiver-url> <notifications.jsonl>`: each line
//! `{"instance": ..., "event_id": ..., "content_type": ..., "body": <base64>}`;
//! the signature key comes from `BENCH_SIGNATURE_KEY`. Prints one JSON line:
//! `{"sent": n, "seconds": wall time, "cpu_seconds": its own CPU time}`; exits non-zero on any refusal.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use dropbox_operator::ingress::payload::signature_headers;
use dropbox_operator::ingress::ssrf::{AddressPolicy, callback_client, check_url};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Notification {
    event_id: String,
    content_type: String,
    /// As the ingress holds it: bytes cloned into each request.
    body: Vec<u8>,
}

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(file)) = (args.next(), args.next()) else {
        return Err("usage: bench-deliver <receiver-url> <notifications.jsonl>".into());
    };
    let key = std::env::var("BENCH_SIGNATURE_KEY").map_err(|_| "BENCH_SIGNATURE_KEY is not set")?;
    // Per instance, in order.
    let mut streams: BTreeMap<String, Vec<Notification>> = BTreeMap::new();
    for line in std::fs::read_to_string(&file)?.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let field = |name: &str| v[name].as_str().unwrap_or_default().to_owned();
        streams
            .entry(field("instance"))
            .or_default()
            .push(Notification {
                event_id: field("event_id"),
                content_type: field("content_type"),
                body: BASE64.decode(field("body"))?,
            });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let policy = AddressPolicy::parse("127.0.0.0/8", "")?;
        let client = callback_client(policy.clone(), Duration::from_secs(10))?;
        let sent: usize = streams.values().map(Vec::len).sum();
        let started = Instant::now();
        let tasks: Vec<_> = streams
            .into_values()
            .map(|stream| {
                let (client, policy, url, key) =
                    (client.clone(), policy.clone(), url.clone(), key.clone());
                tokio::spawn(async move {
                    for n in stream {
                        let parsed = url::Url::parse(&url)?;
                        check_url(&policy, &parsed)?;
                        let timestamp = jiff::Timestamp::now().as_second();
                        let mut request = client
                            .post(parsed)
                            .header(reqwest::header::CONTENT_TYPE, n.content_type.as_str())
                            .body(n.body.clone());
                        for (name, value) in
                            signature_headers(Some(key.as_bytes()), &n.event_id, timestamp, &n.body)
                        {
                            request = request.header(name, value);
                        }
                        let status = request.send().await?.status();
                        if !status.is_success() {
                            return Err::<(), Error>(
                                format!("the receiver answered {status}").into(),
                            );
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        let seconds = started.elapsed().as_secs_f64();
        // SAFETY: getrusage only writes the struct it is given.
        let cpu_seconds = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut usage);
            let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
            t(usage.ru_utime) + t(usage.ru_stime)
        };
        println!(
            "{}",
            serde_json::json!({"sent": sent, "seconds": seconds, "cpu_seconds": cpu_seconds})
        );
        Ok::<(), Error>(())
    })
}
