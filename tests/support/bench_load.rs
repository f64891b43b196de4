//! Benchmark load generator (tests/bench.rs, `bench_ingress`): a process of its
//! own, so the benchmark can pin it to another CPU than the process it
//! measures, and so its own work is not folded into the measured process's.
//! One thread (a current-thread runtime).
//!
//! ```text
//! bench-load closed <url> <in-flight> <count>   requests back to back, <in-flight> at a time
//! bench-load open <url> <rate> <count>          request i due at start + i/rate (open loop)
//! ```
//!
//! Every request is a POST of the file `$BENCH_BODY` with header
//! `X-Dropbox-Signature: $BENCH_SIGNATURE`; anything but 200 counts as an error.
//! Prints one JSON line: requests, errors, seconds, rate, and latency
//! percentiles in ms. In the open loop latency counts from each request's
//! scheduled time (no coordinated omission), and `lateness` gives the
//! generator's own delay between the scheduled time and the moment it
//! actually started the request (what the generator adds by itself, also
//! waiting for one of its `BENCH_MAX_IN_FLIGHT` (256) connections).

use std::rc::Rc;
use std::time::Duration;

use tokio::time::Instant;

type Error = Box<dyn std::error::Error>;

fn percentiles(mut v: Vec<Duration>) -> serde_json::Value {
    v.sort();
    let at = |p: f64| {
        if v.is_empty() {
            return 0.0;
        }
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i.min(v.len() - 1)].as_secs_f64() * 1e3
    };
    serde_json::json!({
        "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "p999": at(0.999), "max": at(1.0),
        "samples": v.len(),
    })
}

struct Shot {
    latency: Duration,
    lateness: Duration,
    ok: bool,
    /// The status, or what went wrong.
    outcome: String,
}

async fn shoot(
    client: &reqwest::Client,
    url: &str,
    body: &axum::body::Bytes,
    signature: &str,
    due: Instant,
) -> Shot {
    let started = Instant::now();
    let outcome = match client
        .post(url)
        .header("Content-Type", "application/json")
        .header("X-Dropbox-Signature", signature)
        .body(body.clone())
        .send()
        .await
    {
        Ok(r) => r.status().as_u16().to_string(),
        Err(e) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text = format!("{text}: {s}");
                source = s.source();
            }
            text
        }
    };
    Shot {
        latency: due.elapsed(),
        lateness: started.saturating_duration_since(due),
        ok: outcome == "200",
        outcome,
    }
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, url, param, count] = args.as_slice() else {
        return Err("usage: bench-load closed|open <url> <in-flight|rate> <count>".into());
    };
    let count: usize = count.parse()?;
    let body = axum::body::Bytes::from(std::fs::read(
        std::env::var("BENCH_BODY").map_err(|_| "BENCH_BODY is not set")?,
    )?);
    let signature = std::env::var("BENCH_SIGNATURE").map_err(|_| "BENCH_SIGNATURE is not set")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The crate's TLS set-up (rustls with ring), as every client of it needs.
    dropbox_operator::tls::install_crypto_provider();
    let local = tokio::task::LocalSet::new();
    let shots = local.block_on(&runtime, async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(usize::MAX)
            .build()?;
        let shared = Rc::new((client, url.clone(), body, signature));
        let started = Instant::now();
        let mut shots = Vec::with_capacity(count);
        match mode.as_str() {
            "closed" => {
                let in_flight: usize = param.parse()?;
                let next = Rc::new(std::cell::Cell::new(0usize));
                let workers: Vec<_> = (0..in_flight)
                    .map(|_| {
                        let (shared, next) = (shared.clone(), next.clone());
                        tokio::task::spawn_local(async move {
                            let mut mine = Vec::new();
                            loop {
                                let i = next.get();
                                if i >= count {
                                    break;
                                }
                                next.set(i + 1);
                                let (client, url, body, sig) = &*shared;
                                mine.push(shoot(client, url, body, sig, Instant::now()).await);
                            }
                            mine
                        })
                    })
                    .collect();
                for w in workers {
                    shots.extend(w.await?);
                }
            }
            "open" => {
                let rate: f64 = param.parse()?;
                let start = Instant::now() + Duration::from_millis(20);
                // At most this many requests (connections) at once; a request
                // waiting for one counts as the generator's lateness.
                let slots = Rc::new(tokio::sync::Semaphore::new(
                    std::env::var("BENCH_MAX_IN_FLIGHT")
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(256),
                ));
                let mut handles = Vec::with_capacity(count);
                for i in 0..count {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    // Tokio's timer has a 1 ms resolution: sleep to just
                    // before the due time, then yield until it (the other
                    // requests run meanwhile; the CPU is the generator's own).
                    if let Some(early) = due.checked_sub(Duration::from_millis(2))
                        && early > Instant::now()
                    {
                        tokio::time::sleep_until(early).await;
                    }
                    while Instant::now() < due {
                        tokio::task::yield_now().await;
                    }
                    let (shared, slots) = (shared.clone(), slots.clone());
                    handles.push(tokio::task::spawn_local(async move {
                        let _slot = slots.acquire().await.expect("semaphore open");
                        let (client, url, body, sig) = &*shared;
                        shoot(client, url, body, sig, due).await
                    }));
                }
                for h in handles {
                    shots.push(h.await?);
                }
            }
            other => return Err(format!("unknown mode {other}").into()),
        }
        Ok::<_, Error>((shots, started.elapsed()))
    })?;
    let (shots, took) = shots;
    let errors = shots.iter().filter(|s| !s.ok).count();
    let mut outcomes = std::collections::BTreeMap::<&str, usize>::new();
    for s in &shots {
        *outcomes.entry(s.outcome.as_str()).or_default() += 1;
    }
    println!(
        "{}",
        serde_json::json!({
            "mode": mode,
            "requests": shots.len(),
            "errors": errors,
            "outcomes": outcomes,
            "seconds": took.as_secs_f64(),
            "rate": shots.len() as f64 / took.as_secs_f64(),
            "latency_ms": percentiles(shots.iter().map(|s| s.latency).collect()),
            "lateness_ms": percentiles(shots.iter().map(|s| s.lateness).collect()),
        })
    );
    Ok(())
}
