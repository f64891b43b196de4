//! Runs the real `dropbox-operator` binary as a local process against the test
//! control plane, the way a Deployment would run it, with its logs captured to a
//! file (so tests can search them for secrets).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::controlplane::{free_port, spawn_owned};

/// The operator binary: `$DROPBOX_OPERATOR_BIN` when set (e.g. a build of the
/// code before a change, to see a new test row fail against it), else cargo's
/// for integration tests, else target/debug (the demo and dev examples run
/// after `cargo build`).
pub fn binary() -> PathBuf {
    std::env::var_os("DROPBOX_OPERATOR_BIN")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_BIN_EXE_dropbox-operator").map(PathBuf::from))
        .unwrap_or_else(|| super::controlplane::repo_root().join("target/debug/dropbox-operator"))
}

/// A running `dropbox-operator <subcommand>` process.
pub struct Process {
    child: Option<Child>,
    pub log: PathBuf,
    pub metrics_port: u16,
    /// The ingress's public webhook port (unused by the controller).
    pub listen_port: u16,
    /// The ingress's peer port (hand-offs between replicas).
    pub peer_port: u16,
    pub name: String,
}

/// Builder for a `dropbox-operator controller` or `ingress` process scoped to
/// one test namespace.
pub struct OperatorProcess {
    pub subcommand: &'static str,
    pub namespace: String,
    pub dropbox_api_url: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Variables removed from the process's environment (after `env`).
    pub unset: Vec<String>,
    pub name: String,
    /// Address the servers bind: `127.0.0.1`, or `[::]` (dual-stack).
    pub bind: &'static str,
    /// A program the binary runs under (e.g. `valgrind --tool=callgrind`).
    pub wrapper: Vec<String>,
    /// How long the process may take to answer /healthz.
    pub health_timeout: Duration,
}

impl OperatorProcess {
    pub fn new(namespace: &str, dropbox_api_url: &str) -> Self {
        OperatorProcess {
            subcommand: "controller",
            namespace: namespace.to_owned(),
            dropbox_api_url: dropbox_api_url.to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            unset: Vec::new(),
            name: "controller".into(),
            bind: "127.0.0.1",
            wrapper: Vec::new(),
            health_timeout: Duration::from_secs(15),
        }
    }

    /// The same, for `dropbox-operator ingress` (listening on the process's port).
    pub fn ingress(namespace: &str, dropbox_api_url: &str) -> Self {
        OperatorProcess {
            subcommand: "ingress",
            name: "ingress".into(),
            ..OperatorProcess::new(namespace, dropbox_api_url)
        }
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Removes `key` from the environment, e.g. `WATCH_NAMESPACE` to watch all namespaces.
    pub fn env_remove(mut self, key: &str) -> Self {
        self.unset.push(key.to_owned());
        self
    }

    /// Binds the servers on `[::]` (IPv6 and IPv4), as the Deployment does.
    pub fn dual_stack(mut self) -> Self {
        self.bind = "[::]";
        self
    }

    /// Runs the binary under `program args...` (a benchmark's instruction counter).
    pub fn wrapped(mut self, wrapper: &[&str], health_timeout: Duration) -> Self {
        self.wrapper = wrapper.iter().map(|s| (*s).to_owned()).collect();
        self.health_timeout = health_timeout;
        self
    }

    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    /// Starts the process and waits until its metrics endpoint answers.
    pub async fn start(self) -> Process {
        // Ports are picked free and released before the process binds them, so
        // another process can take one in between: then pick again.
        for attempt in 1..=3 {
            let mut process = self.spawn();
            if process.wait_healthy(self.health_timeout).await {
                return process;
            }
            let raced = process.log_text().contains("Address already in use");
            process.kill();
            if !raced || attempt == 3 {
                panic!(
                    "{} did not become healthy; log:\n{}",
                    process.name,
                    process.log_text()
                );
            }
        }
        unreachable!("the loop returns or panics")
    }

    fn spawn(&self) -> Process {
        let port = free_port();
        let listen_port = std::iter::repeat_with(free_port)
            .find(|p| *p != port)
            .expect("a second free port");
        let peer_port = std::iter::repeat_with(free_port)
            .find(|p| *p != port && *p != listen_port)
            .expect("a third free port");
        let cluster = super::cluster();
        let log = cluster
            .dir
            .join(format!("{}-{}-{port}.log", self.namespace, self.name));
        let file = std::fs::File::create(&log).expect("create controller log");
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(binary());
                cmd
            }
            None => Command::new(binary()),
        };
        cmd.arg(self.subcommand)
            .args(&self.args)
            .env("KUBECONFIG", &cluster.kubeconfig)
            .env("DROPBOX_API_URL", &self.dropbox_api_url)
            // The emulator serves the notify host's long-poll route too.
            .env("DROPBOX_NOTIFY_URL", &self.dropbox_api_url)
            .env("DROPBOX_WWW_URL", "https://www.dropbox.com")
            .env("WATCH_NAMESPACE", &self.namespace)
            .env("POD_NAMESPACE", &self.namespace)
            .env("METRICS_ADDR", format!("{}:{port}", self.bind))
            .env("LISTEN_ADDR", format!("{}:{listen_port}", self.bind))
            .env("PEER_LISTEN_ADDR", format!("{}:{peer_port}", self.bind))
            .env("LOG_LEVEL", "info,dropbox_operator=debug")
            .env("DROPBOX_TIMEOUT", "3s")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::from(file.try_clone().expect("clone log handle")))
            .stderr(Stdio::from(file));
        for key in &self.unset {
            cmd.env_remove(key);
        }
        let child = spawn_owned(cmd).expect("start dropbox-operator");
        Process {
            child: Some(child),
            log,
            metrics_port: port,
            listen_port,
            peer_port,
            name: self.name.clone(),
        }
    }
}

impl Process {
    /// Whether /healthz answers within `timeout` (false also when the process died).
    async fn wait_healthy(&mut self, timeout: Duration) -> bool {
        let client = super::dropbox::http_client();
        for _ in 0..timeout.as_millis().div_ceil(100) {
            if self.exited() {
                return false;
            }
            if let Ok(r) = client
                .get(format!("http://127.0.0.1:{}/healthz", self.metrics_port))
                .send()
                .await
                && r.status().is_success()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// `http://127.0.0.1:<port>`: the ingress's public webhook address.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.listen_port)
    }

    /// The Prometheus text of /metrics.
    pub async fn metrics(&self) -> String {
        super::dropbox::http_client()
            .get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// The sum of every sample of `metric` whose labels contain `label_filter`.
    pub async fn metric_sum(&self, metric: &str, label_filter: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
            .filter(|l| l.contains(label_filter))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, then wait up to `grace` for a clean exit; returns whether it exited
    /// on its own.
    pub fn terminate(&mut self, grace: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// SIGKILL (a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(Some(_))),
            None => true,
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
