//! What the benchmarks (tests/bench.rs, tests/bench_peer.rs) share: figures
//! with their rounds, the section files `make bench` collects into
//! docs/benchmarks/results.json (each stamped with the source tree it was
//! measured on), process CPU and memory from /proc, kube-apiserver's request
//! counters, and CPU pinning (docs/performance.md has the method).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Rounds per figure: `BENCH_ROUNDS`, default 3 (the method's minimum).
pub fn rounds() -> usize {
    env_usize("BENCH_ROUNDS", 3).max(1)
}

pub fn bench_dir() -> PathBuf {
    let dir = super::controlplane::repo_root().join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// The load a latency was measured under (docs/performance.md's table has a column for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// One request at a time, nothing else running.
    None,
    /// A closed loop with this many requests in flight.
    InFlight(usize),
    /// An open loop at half the measured maximum rate.
    HalfMaxRate,
}

impl Load {
    pub fn label(self) -> String {
        match self {
            Load::None => "none (one at a time)".into(),
            Load::InFlight(n) => format!("{n} in flight"),
            Load::HalfMaxRate => "half the maximum rate".into(),
        }
    }
}

/// One measured figure, as docs/performance.md's table shows it: the median of its rounds,
/// with every round's value kept.
pub struct Figure {
    pub id: String,
    pub what: String,
    pub value: f64,
    pub unit: &'static str,
    /// `("<=" | ">=", bound)`, when the figure has a target.
    pub target: Option<(&'static str, f64)>,
    /// How it was obtained (sample counts, both sides' values).
    pub detail: String,
    /// The value of each round (the figure is their median, or the ratio of
    /// the two sides' medians for a ratio).
    pub rounds: Vec<f64>,
    /// For latencies: the load they were measured under.
    pub load: Option<Load>,
}

impl Figure {
    /// A figure whose value is the median of `rounds`.
    pub fn of_rounds(
        id: impl Into<String>,
        what: impl Into<String>,
        rounds: Vec<f64>,
        unit: &'static str,
    ) -> Self {
        let (median, _, _) = spread(&rounds);
        Figure {
            id: id.into(),
            what: what.into(),
            value: median,
            unit,
            target: None,
            detail: String::new(),
            rounds,
            load: None,
        }
    }

    /// A figure with its own value (e.g. a ratio of medians) and the per-round
    /// values it summarises.
    pub fn with_value(mut self, value: f64) -> Self {
        self.value = value;
        self
    }

    pub fn at_most(mut self, bound: f64) -> Self {
        self.target = Some(("<=", bound));
        self
    }

    pub fn at_least(mut self, bound: f64) -> Self {
        self.target = Some((">=", bound));
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    pub fn load(mut self, load: Load) -> Self {
        self.load = Some(load);
        self
    }

    pub fn met(&self) -> Option<bool> {
        self.target.map(|(op, bound)| match op {
            "<=" => self.value <= bound,
            _ => self.value >= bound,
        })
    }

    pub fn json(&self) -> Value {
        let (_, min, max) = spread(&self.rounds);
        json!({
            "id": self.id, "what": self.what, "value": self.value, "unit": self.unit,
            "target": self.target.map(|(op, bound)| format!("{op} {bound}")),
            "met": self.met(), "detail": self.detail,
            "rounds": self.rounds, "min": min, "max": max,
            "load": self.load.map(Load::label),
        })
    }
}

/// Where and on what a section was measured: `hack/bench-results.py stamp`
/// (one implementation of the source digest, which `collect` compares).
pub fn provenance() -> Value {
    let root = super::controlplane::repo_root();
    let out = Command::new("python3")
        .arg(root.join("hack/bench-results.py"))
        .arg("stamp")
        .output();
    match out {
        Ok(o) if o.status.success() => {
            serde_json::from_slice(&o.stdout).unwrap_or_else(|e| json!({"error": e.to_string()}))
        }
        Ok(o) => json!({"error": String::from_utf8_lossy(&o.stderr)}),
        Err(e) => json!({"error": format!("python3: {e}")}),
    }
}

/// The 1-, 5- and 15-minute load averages: how busy the shared machine was.
pub fn loadavg() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// A benchmark section being measured: stamped when it starts (the source
/// tree is read then, so an edit during a long run cannot pass unnoticed:
/// `record` stamps again and keeps both).
pub struct Section {
    name: String,
    started: Value,
    load_start: Vec<f64>,
}

impl Section {
    pub fn start(name: impl Into<String>) -> Section {
        Section {
            name: name.into(),
            started: provenance(),
            load_start: loadavg(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Writes `target/bench/<name>.txt` (the report) and `<name>.json` (the
    /// figures, `data` for the plots, and where and when they were measured).
    pub fn record(&self, text: &str, figures: &[Figure], data: Value) {
        let dir = bench_dir();
        let mut text = text.to_owned();
        let _ = writeln!(text, "figures (median of the rounds, then min-max):");
        for f in figures {
            let verdict = match f.met() {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "-",
            };
            let target = f
                .target
                .map(|(op, b)| format!(" (target {op} {b})"))
                .unwrap_or_default();
            let (_, min, max) = spread(&f.rounds);
            let load = f
                .load
                .map(|l| format!(" [load: {}]", l.label()))
                .unwrap_or_default();
            let _ = writeln!(
                text,
                "  {:<34} {:>12.3} {:<6} ({min:.3}-{max:.3}, {} rounds){target} {verdict}{load}  {}",
                f.id,
                f.value,
                f.unit,
                f.rounds.len(),
                f.detail
            );
        }
        let finished = provenance();
        let mut provenance = self.started.clone();
        if let Some(p) = provenance.as_object_mut() {
            p.insert("finished_at".into(), finished["measured_at"].clone());
            p.insert("loadavg_start".into(), json!(self.load_start));
            p.insert("loadavg_end".into(), json!(loadavg()));
            p.insert(
                "cpus".into(),
                json!(std::thread::available_parallelism().map_or(0, |n| n.get())),
            );
            if finished["source_digest"] != self.started["source_digest"] {
                p.insert(
                    "source_changed_during_run".into(),
                    finished["source_digest"].clone(),
                );
            }
        }
        let _ = std::fs::write(dir.join(format!("{}.txt", self.name)), &text);
        let doc = json!({
            "bench": self.name,
            "provenance": provenance,
            "figures": figures.iter().map(Figure::json).collect::<Vec<_>>(),
            "data": data,
        });
        let _ = std::fs::write(
            dir.join(format!("{}.json", self.name)),
            serde_json::to_string_pretty(&doc).expect("figures serialize"),
        );
        println!("{text}");
    }
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// p50, p90, p99, p99.9 and max of `sorted`, in ms.
pub fn percentiles_ms(sorted: &[Duration]) -> Value {
    json!({
        "p50": ms(percentile(sorted, 0.5)),
        "p90": ms(percentile(sorted, 0.9)),
        "p99": ms(percentile(sorted, 0.99)),
        "p999": ms(percentile(sorted, 0.999)),
        "max": ms(percentile(sorted, 1.0)),
        "samples": sorted.len(),
    })
}

/// Median, minimum and maximum (zeros when empty).
pub fn spread(values: &[f64]) -> (f64, f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (median, v[0], v[v.len() - 1])
}

/// "median (min-max)" with `precision` decimals.
pub fn summary(values: &[f64], precision: usize) -> String {
    let (m, lo, hi) = spread(values);
    format!("{m:.precision$} ({lo:.precision$}-{hi:.precision$})")
}

pub fn list(values: &[f64], precision: usize) -> String {
    values
        .iter()
        .map(|v| format!("{v:.precision$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// utime + stime of a process (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of /proc/<pid>/stat (11, 12 after the comm).
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 }
}

/// CPU seconds of several processes, read at once.
#[derive(Clone, Debug, Default)]
pub struct CpuSnapshot(pub BTreeMap<String, f64>);

impl CpuSnapshot {
    pub fn take(pids: &[(&str, u32)]) -> CpuSnapshot {
        CpuSnapshot(
            pids.iter()
                .map(|(name, pid)| ((*name).to_owned(), cpu_seconds(*pid)))
                .collect(),
        )
    }

    /// CPU seconds each process used since `before`.
    pub fn since(&self, before: &CpuSnapshot) -> BTreeMap<String, f64> {
        self.0
            .iter()
            .map(|(k, v)| (k.clone(), v - before.0.get(k).copied().unwrap_or(0.0)))
            .collect()
    }
}

/// The control plane's processes whose CPU a webhook's API calls cost:
/// `("kube-apiserver", pid)`, `("etcd", pid)`.
pub fn control_plane_pids() -> Vec<(&'static str, u32)> {
    ["kube-apiserver", "etcd"]
        .into_iter()
        .filter_map(|name| super::cluster().pid(name).map(|pid| (name, pid)))
        .collect()
}

/// VmRSS and VmHWM of a process, KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// kube-apiserver requests by `VERB resource[/subresource][ (dry run)]`, from its
/// metrics. Watches are long-running and left out.
pub fn apiserver_requests() -> BTreeMap<String, f64> {
    let (ok, out, _) = super::kubectl(&["get", "--raw", "/metrics"]);
    assert!(ok, "read apiserver metrics");
    let label = |line: &str, name: &str| {
        line.split(&format!("{name}=\""))
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("")
            .to_owned()
    };
    let mut requests = BTreeMap::new();
    for line in out
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let verb = label(line, "verb");
        if verb == "WATCH" || verb == "CONNECT" {
            continue;
        }
        let (resource, sub) = (label(line, "resource"), label(line, "subresource"));
        let mut key = format!("{verb} {resource}");
        if !sub.is_empty() {
            key = format!("{key}/{sub}");
        }
        if !label(line, "dry_run").is_empty() {
            key.push_str(" (dry run)");
        }
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *requests.entry(key).or_insert(0.0) += value;
    }
    requests
}

/// `after - before`, only what grew.
pub fn diff(
    after: &BTreeMap<String, f64>,
    before: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

/// Requests made by the kube-apiserver's own readers (our metrics scrapes)
/// are in the counters too: `GET` of `/metrics` is a non-resource request
/// and has an empty resource; leave those out.
pub fn resource_requests(calls: &BTreeMap<String, f64>) -> f64 {
    calls
        .iter()
        .filter(|(k, _)| k.split(' ').nth(1).is_some_and(|r| !r.is_empty()))
        .map(|(_, v)| v)
        .sum()
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|c| libc::CPU_ISSET(*c, &set))
            .collect()
    }
}

/// Two different CPUs for the measured process and the load generator, when
/// the machine has two: `(server, generator)`. `BENCH_PIN=0` turns pinning off.
pub fn pin_pair() -> Option<(usize, usize)> {
    if std::env::var("BENCH_PIN").is_ok_and(|v| v == "0") {
        return None;
    }
    let cpus = allowed_cpus();
    match cpus.as_slice() {
        [a, b, ..] => Some((*a, *b)),
        _ => None,
    }
}

/// `taskset -c <cpu>`: a wrapper that pins a process (and every thread it
/// starts) to one CPU from its first instruction.
pub fn taskset(cpu: usize) -> Vec<String> {
    vec!["taskset".into(), "-c".into(), cpu.to_string()]
}

/// The CPUs a running process may use (from /proc/<pid>/status).
pub fn cpus_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or("?")
        .trim()
        .to_owned()
}

/// An example binary of this crate, built in the profile the test runs in.
pub fn example_binary(name: &str) -> PathBuf {
    super::controlplane::repo_root().join(format!(
        "target/{}/examples/{name}",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    ))
}
