//! A real Kubernetes control plane on loopback: etcd, kube-apiserver and
//! kube-controller-manager, built from the Kubernetes Go modules by
//! `tests/controlplane/build.sh`.
//!
//! Used by the integration tests (one control plane per test binary) and by
//! `make dev` (through the `dev-cluster` example). Blocking code on purpose: it runs
//! before any async runtime exists and from plain threads.
//!
//! Cleanup: every child process gets `PR_SET_PDEATHSIG(SIGKILL)` and is spawned from
//! a thread that lives as long as the process, so the whole control plane dies with
//! the process that started it, whether its tests passed, failed or panicked. Data
//! directories of processes that are gone are removed on the next start.

use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// Token of the `admin` user (group `system:masters`) in the static token file.
const ADMIN_USER: &str = "admin";
/// Further admins, one per process a test wants to tell apart in the audit
/// log (`user.username` is what the API server authenticated, whatever the
/// process says about itself).
pub const PROCESS_USERS: [&str; 4] = ["process-1", "process-2", "process-3", "process-4"];

/// `--service-cluster-ip-range`.
pub const SERVICE_CIDR: &str = "10.96.0.0/24";
/// The first address of [`SERVICE_CIDR`]: the `kubernetes` Service.
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";

/// How a control plane starts. The default is the tests' one: everything on
/// loopback, no node. [`Options::for_node`] makes one pods can use
/// (`tests/support/node.rs`).
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// A non-loopback address of this network namespace: the API server binds
    /// every address and advertises this one, so the `kubernetes` Service's
    /// endpoint is `<address>:<port>` and pods reach it through kube-proxy.
    pub advertise: Option<std::net::Ipv4Addr>,
    /// Further users of the static token file: (user, groups). Their tokens are
    /// in [`ControlPlane::tokens`].
    pub users: Vec<(String, String)>,
    /// kube-controller-manager controllers beyond the tests' seven.
    pub controllers: Vec<&'static str>,
    /// The API server's audit log (see [`ControlPlane::audit_log`]).
    pub audit: bool,
}

impl Options {
    /// A control plane for a node named `node` at `address`: the Node authorizer
    /// and NodeRestriction for its kubelet, users for the kubelet, kube-proxy and
    /// the scheduler, and the controllers pods need (node lifecycle removes the
    /// not-ready taint, the root-CA publisher makes `kube-root-ca.crt` for token
    /// volumes, endpoint slices feed kube-proxy; disruption, among the tests'
    /// seven, computes PDBs).
    pub fn for_node(address: std::net::Ipv4Addr, node: &str) -> Options {
        Options {
            advertise: Some(address),
            users: vec![
                (format!("system:node:{node}"), "system:nodes".into()),
                ("system:kube-proxy".into(), String::new()),
                ("system:kube-scheduler".into(), String::new()),
            ],
            controllers: vec![
                "node-lifecycle-controller",
                "root-ca-certificate-publisher-controller",
                "endpointslice-controller",
                "pod-garbage-collector-controller",
                "taint-eviction-controller",
            ],
            audit: false,
        }
    }
}

/// A running control plane. Its processes stop when the process that started it exits.
pub struct ControlPlane {
    /// Working directory: certificates, kubeconfig, etcd data and one log per process.
    pub dir: PathBuf,
    /// Where the control-plane binaries (and kubectl and helm) are.
    pub bin_dir: PathBuf,
    /// Admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    /// PEM of the CA that signed the serving certificate.
    pub ca_pem: String,
    /// Bearer token of the admin user.
    pub admin_token: String,
    /// Bearer tokens of [`PROCESS_USERS`], in that order.
    process_tokens: Vec<String>,
    /// (user, token) of [`Options::users`].
    pub tokens: Vec<(String, String)>,
    /// `http://127.0.0.1:<port>`: etcd's client URL.
    etcd_url: String,
    /// The API server's audit log (JSON lines), when auditing is on.
    pub audit_log: Option<PathBuf>,
    children: Mutex<Vec<Managed>>,
}

/// A control-plane process and how it was started, so it can be started again
/// the same way (same flags, ports, certificates and data).
struct Managed {
    /// `etcd`, `kube-apiserver`, `kube-controller-manager` (also its log's name).
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    child: Child,
}

impl Managed {
    fn command(&self, dir: &Path, append: bool) -> io::Result<Command> {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdout(log_stdio(dir, self.name, append)?)
            .stderr(log_stdio(dir, self.name, true)?);
        Ok(cmd)
    }
}

/// Starts `program` with `args` (logs to `<dir>/<name>.log`), owned by this process.
fn start_managed(
    dir: &Path,
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
) -> io::Result<Managed> {
    let mut cmd = Command::new(&program);
    cmd.args(&args)
        .stdout(log_stdio(dir, name, false)?)
        .stderr(log_stdio(dir, name, true)?);
    Ok(Managed {
        name,
        program,
        args,
        child: spawn_owned(cmd)?,
    })
}

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Directory of the control-plane binaries: `$CONTROLPLANE_BIN`, or
/// `target/controlplane/bin` of the repository.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("CONTROLPLANE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/controlplane/bin"))
}

const BINARIES: [&str; 5] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kubectl",
    "helm",
];

/// Builds the control-plane binaries when any is missing (a cold build takes a
/// while; `make test` does this before the tests start).
pub fn ensure_binaries() -> io::Result<PathBuf> {
    let dir = bin_dir();
    if BINARIES.iter().all(|b| dir.join(b).is_file()) {
        return Ok(dir);
    }
    eprintln!(
        "control-plane binaries missing in {}: building them (this takes a while)",
        dir.display()
    );
    let status = Command::new("bash")
        .arg(repo_root().join("tests/controlplane/build.sh"))
        .env("CONTROLPLANE_BIN", &dir)
        .status()?;
    if !status.success() {
        return Err(io::Error::other(format!(
            "tests/controlplane/build.sh failed: {status}"
        )));
    }
    Ok(dir)
}

/// Spawns `cmd` from a thread that lives as long as the process, with
/// `PR_SET_PDEATHSIG(SIGKILL)`: the child dies when this process exits, however it
/// exits (the signal fires when the spawning *thread* ends, hence the keeper thread).
pub fn spawn_owned(cmd: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static KEEPER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        thread::Builder::new()
            .name("child-keeper".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
                    unsafe {
                        cmd.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
                // The sender lives in a static, so this loop never ends and the thread
                // (the children's parent for PDEATHSIG) lives until the process exits.
            })
            .expect("spawn child-keeper thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    keeper
        .lock()
        .expect("keeper lock")
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("child-keeper thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("child-keeper thread is gone"))?
}

/// A free TCP port on 127.0.0.1 (bound, then released for the child to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port on 127.0.0.1")
}

fn write(path: &Path, contents: impl AsRef<[u8]>) -> io::Result<()> {
    fs::write(path, contents)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// The log of process `name`: truncated on first start (`append` false), appended
/// to on a restart and by the second handle (stderr) of the same start.
fn log_stdio(dir: &Path, name: &str, append: bool) -> io::Result<Stdio> {
    let path = dir.join(format!("{name}.log"));
    let file = if append {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?
    } else {
        fs::File::create(path)?
    };
    Ok(Stdio::from(file))
}

/// Removes control-plane directories under `parent` whose owning process is gone.
fn remove_stale_dirs(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

struct Pki {
    ca_pem: String,
    server_cert_pem: String,
    server_key_pem: String,
    sa_private_pem: String,
    sa_public_pem: String,
}

fn generate_pki(extra_sans: &[String]) -> Result<Pki, rcgen::Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "dropbox-operator test CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate()?;
    let mut sans = vec![
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        "kubernetes.default.svc".to_string(),
    ];
    sans.extend_from_slice(extra_sans);
    let mut server_params = CertificateParams::new(sans)?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    let server_cert = server_params.signed_by(&server_key, &issuer)?;

    let sa_key = KeyPair::generate()?;
    Ok(Pki {
        ca_pem: ca_cert.pem(),
        server_cert_pem: server_cert.pem(),
        server_key_pem: server_key.serialize_pem(),
        sa_private_pem: sa_key.serialize_pem(),
        sa_public_pem: sa_key.public_key_pem(),
    })
}

/// A kubeconfig for `server` with bearer `token`.
pub fn kubeconfig_yaml(server: &str, ca_pem: &str, user: &str, token: &str) -> String {
    use base64::Engine;
    use std::fmt::Write;
    let ca_b64 = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let mut out = String::new();
    let _ = write!(
        out,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca_b64}\nusers:\n- name: {user}\n  user:\n    token: {token}\n\
         contexts:\n- name: local\n  context:\n    cluster: local\n    user: {user}\ncurrent-context: local\n"
    );
    out
}

fn random_token() -> String {
    let bytes: [u8; 24] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the API server records in its audit log: every create, update,
/// patch and delete of Secrets and DropboxElementInstances (with its status),
/// and every read (get) of a Secret, at the Metadata level (who, what, when,
/// the answer; never a body).
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  verbs: ["create", "update", "patch", "delete"]
  resources:
  - group: ""
    resources: ["secrets"]
  - group: "elements.dropbox-operator.dev"
    resources: ["dropboxelementinstances", "dropboxelementinstances/status"]
- level: Metadata
  verbs: ["get"]
  resources:
  - group: ""
    resources: ["secrets"]
- level: None
"#;

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager in a fresh directory
    /// under `parent` and waits until the API server is ready and the
    /// controller-manager is working.
    pub fn start(parent: &Path, label: &str) -> io::Result<ControlPlane> {
        ControlPlane::start_with(parent, label, &Options::default())
    }

    /// [`ControlPlane::start`] with `options` (the audit log with `options.audit`:
    /// an independent record of which process wrote what; the credential fault
    /// table counts writes of a stale leader with it).
    pub fn start_with(parent: &Path, label: &str, options: &Options) -> io::Result<ControlPlane> {
        let started = Instant::now();
        let bin_dir = ensure_binaries()?;
        fs::create_dir_all(parent)?;
        remove_stale_dirs(parent);
        let dir = parent.join(format!("{label}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;

        let extra_sans: Vec<String> = match options.advertise {
            Some(address) => vec![
                address.to_string(),
                KUBERNETES_SERVICE_IP.to_string(),
                "kubernetes".to_string(),
                "kubernetes.default".to_string(),
                "kubernetes.default.svc.cluster.local".to_string(),
            ],
            None => Vec::new(),
        };
        let pki = generate_pki(&extra_sans).map_err(io::Error::other)?;
        write(&dir.join("ca.crt"), &pki.ca_pem)?;
        write(&dir.join("apiserver.crt"), &pki.server_cert_pem)?;
        write(&dir.join("apiserver.key"), &pki.server_key_pem)?;
        write(&dir.join("sa.key"), &pki.sa_private_pem)?;
        write(&dir.join("sa.pub"), &pki.sa_public_pem)?;
        let admin_token = random_token();
        let kcm_token = random_token();
        let process_tokens: Vec<String> = PROCESS_USERS.iter().map(|_| random_token()).collect();
        let mut token_file = format!(
            "{admin_token},{ADMIN_USER},admin-uid,\"system:masters\"\n\
             {kcm_token},system:kube-controller-manager,kcm-uid\n"
        );
        for (user, token) in PROCESS_USERS.iter().zip(&process_tokens) {
            token_file += &format!("{token},{user},{user}-uid,\"system:masters\"\n");
        }
        let tokens: Vec<(String, String)> = options
            .users
            .iter()
            .map(|(user, _)| (user.clone(), random_token()))
            .collect();
        for (i, ((user, token), (_, groups))) in tokens.iter().zip(&options.users).enumerate() {
            token_file.push_str(&format!("{token},{user},user-{i},\"{groups}\"\n"));
        }
        write(&dir.join("tokens.csv"), token_file)?;

        let mut children = Vec::new();
        let etcd_port = free_port();
        let peer_port = free_port();
        let etcd_args = [
            "--name=controlplane",
            &format!("--data-dir={}", dir.join("etcd").display()),
            &format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
            &format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
            &format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
            &format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
            &format!("--initial-cluster=controlplane=http://127.0.0.1:{peer_port}"),
            // Test data is disposable: skipping fsync makes every write much cheaper.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ];
        children.push(start_managed(
            &dir,
            "etcd",
            bin_dir.join("etcd"),
            etcd_args.iter().map(|a| (*a).to_owned()).collect(),
        )?);

        let api_port = free_port();
        let server = format!("https://127.0.0.1:{api_port}");
        let audit_log = options.audit.then(|| dir.join("audit.log"));
        let mut audit_args = Vec::new();
        if let Some(log) = &audit_log {
            write(&dir.join("audit-policy.yaml"), AUDIT_POLICY)?;
            audit_args = vec![
                format!(
                    "--audit-policy-file={}",
                    dir.join("audit-policy.yaml").display()
                ),
                format!("--audit-log-path={}", log.display()),
                "--audit-log-format=json".to_owned(),
            ];
        }
        let (bind, advertise) = match options.advertise {
            Some(address) => ("0.0.0.0".to_string(), address.to_string()),
            None => ("127.0.0.1".to_string(), "127.0.0.1".to_string()),
        };
        let mut apiserver_args = vec![
            format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            format!("--bind-address={bind}"),
            format!("--advertise-address={advertise}"),
        ];
        if options.advertise.is_some() {
            // The kubelet's identity is checked as a real cluster checks it.
            apiserver_args.extend([
                "--authorization-mode=Node,RBAC".to_string(),
                "--enable-admission-plugins=NodeRestriction".to_string(),
            ]);
        } else {
            apiserver_args.extend([
                // No kubelet or Service routing here: the `kubernetes` Service endpoints
                // (which may not be loopback) are not needed.
                "--endpoint-reconciler-type=none".to_string(),
                "--authorization-mode=RBAC".to_string(),
            ]);
        }
        apiserver_args.extend([
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", dir.join("certs").display()),
            format!("--tls-cert-file={}", dir.join("apiserver.crt").display()),
            format!(
                "--tls-private-key-file={}",
                dir.join("apiserver.key").display()
            ),
            format!("--client-ca-file={}", dir.join("ca.crt").display()),
            format!("--token-auth-file={}", dir.join("tokens.csv").display()),
            "--service-account-issuer=https://kubernetes.default.svc".to_string(),
            format!(
                "--service-account-key-file={}",
                dir.join("sa.pub").display()
            ),
            format!(
                "--service-account-signing-key-file={}",
                dir.join("sa.key").display()
            ),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--enable-priority-and-fairness=false".to_string(),
            "--profiling=false".to_string(),
            "--v=1".to_string(),
        ]);
        children.push(start_managed(
            &dir,
            "kube-apiserver",
            bin_dir.join("kube-apiserver"),
            apiserver_args.into_iter().chain(audit_args).collect(),
        )?);

        let kubeconfig = dir.join("kubeconfig");
        write(
            &kubeconfig,
            kubeconfig_yaml(&server, &pki.ca_pem, ADMIN_USER, &admin_token),
        )?;
        let kcm_kubeconfig = dir.join("kcm.kubeconfig");
        write(
            &kcm_kubeconfig,
            kubeconfig_yaml(
                &server,
                &pki.ca_pem,
                "system:kube-controller-manager",
                &kcm_token,
            ),
        )?;

        let cp = ControlPlane {
            dir: dir.clone(),
            bin_dir: bin_dir.clone(),
            kubeconfig,
            server,
            ca_pem: pki.ca_pem.clone(),
            admin_token,
            process_tokens,
            tokens,
            etcd_url: format!("http://127.0.0.1:{etcd_port}"),
            audit_log,
            children: Mutex::new(children),
        };
        cp.wait_until(Duration::from_secs(120), "kube-apiserver /readyz", || {
            cp.kubectl_quiet(&["get", "--raw=/readyz"])
                .is_some_and(|out| out.trim() == "ok")
        })?;

        let controllers = [
            "garbage-collector-controller",
            "namespace-controller",
            "deployment-controller",
            "replicaset-controller",
            "serviceaccount-controller",
            // The HPA and disruption controllers write the status Argo CD's health
            // checks read (tests/chart_argocd.rs).
            "horizontal-pod-autoscaler-controller",
            "disruption-controller",
        ]
        .iter()
        .chain(&options.controllers)
        .copied()
        .collect::<Vec<_>>()
        .join(",");
        let kcm_args = [
            &format!("--kubeconfig={}", kcm_kubeconfig.display()),
            &format!("--authentication-kubeconfig={}", kcm_kubeconfig.display()),
            &format!("--authorization-kubeconfig={}", kcm_kubeconfig.display()),
            "--bind-address=127.0.0.1",
            &format!("--secure-port={}", free_port()),
            &format!("--cert-dir={}", dir.join("kcm-certs").display()),
            "--leader-elect=false",
            // Each controller runs as its own ServiceAccount (tokens from TokenRequest), as
            // in a real cluster: the garbage collector gets its wide read rights that way.
            "--use-service-account-credentials=true",
            &format!("--controllers={controllers}"),
            "--horizontal-pod-autoscaler-sync-period=2s",
            // What the root-CA publisher puts into `kube-root-ca.crt` of every namespace.
            &format!("--root-ca-file={}", dir.join("ca.crt").display()),
            // Short resync of discovery so the garbage collector sees new CRDs quickly.
            "--concurrent-gc-syncs=5",
            "--v=1",
        ];
        let kcm = start_managed(
            &dir,
            "kube-controller-manager",
            bin_dir.join("kube-controller-manager"),
            kcm_args.iter().map(|a| (*a).to_owned()).collect(),
        )?;
        cp.children.lock().expect("children lock").push(kcm);

        // The serviceaccount controller creates `default` in every namespace: seeing it
        // proves the controller-manager is connected and running controllers.
        cp.wait_until(
            Duration::from_secs(120),
            "kube-controller-manager (default ServiceAccount)",
            || {
                cp.kubectl_quiet(&[
                    "get",
                    "serviceaccount",
                    "default",
                    "-n",
                    "default",
                    "-o",
                    "name",
                ])
                .is_some_and(|out| out.trim() == "serviceaccount/default")
            },
        )?;
        eprintln!(
            "control plane ready in {:.1}s: {} (kubeconfig {})",
            started.elapsed().as_secs_f64(),
            cp.server,
            cp.kubeconfig.display()
        );
        Ok(cp)
    }

    /// Starts `program` with `args` as a process of this control plane (log
    /// `<dir>/<name>.log`): it dies with it, and waits fail when it exits.
    pub fn start_process(
        &self,
        name: &'static str,
        program: PathBuf,
        args: Vec<String>,
    ) -> io::Result<()> {
        let managed = start_managed(&self.dir, name, program, args)?;
        self.children.lock().expect("children lock").push(managed);
        Ok(())
    }

    /// A kubeconfig (written to `<dir>/<file>`) for user `user` of [`Options::users`].
    pub fn kubeconfig_of(&self, user: &str, file: &str) -> io::Result<PathBuf> {
        let token = self
            .tokens
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| io::Error::other(format!("no token for user {user}")))?;
        let path = self.dir.join(file);
        write(
            &path,
            kubeconfig_yaml(&self.server, &self.ca_pem, user, &token),
        )?;
        Ok(path)
    }

    /// Polls `ready` every 200 ms until it holds; fails when `timeout` passes or
    /// a process of this control plane exits.
    pub fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        mut ready: impl FnMut() -> bool,
    ) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready() {
                return Ok(());
            }
            if let Some(exited) = self.exited_child() {
                return Err(io::Error::other(format!(
                    "{exited} while waiting for {what}; logs in {}",
                    self.dir.display()
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "timed out after {timeout:?} waiting for {what}; logs in {}",
                    self.dir.display()
                )));
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// A message naming a process of this control plane that exited, if any.
    pub fn exited_child(&self) -> Option<String> {
        let mut children = self.children.lock().expect("children lock");
        children.iter_mut().find_map(|c| match c.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "control-plane process {} ({}) exited with {status}",
                c.child.id(),
                c.name
            )),
            _ => None,
        })
    }

    /// Stops process `name` (SIGTERM, SIGKILL after 5 s) and starts it again with
    /// the same flags; its log is appended to.
    fn restart(&self, name: &str) -> io::Result<()> {
        let mut children = self.children.lock().expect("children lock");
        let managed = children
            .iter_mut()
            .find(|c| c.name == name)
            .ok_or_else(|| io::Error::other(format!("no control-plane process {name}")))?;
        // SAFETY: signalling our own child process.
        unsafe {
            libc::kill(managed.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while managed.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = managed.child.kill();
                managed.child.wait()?;
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let cmd = managed.command(&self.dir, true)?;
        managed.child = spawn_owned(cmd)?;
        Ok(())
    }

    fn wait_apiserver_ready(&self) -> io::Result<()> {
        self.wait_until(Duration::from_secs(120), "kube-apiserver /readyz", || {
            self.kubectl_quiet(&["get", "--raw=/readyz"])
                .is_some_and(|out| out.trim() == "ok")
        })
    }

    /// Whether etcd answers `GET /health` with `"health":"true"`.
    fn etcd_healthy(&self) -> bool {
        use std::io::{Read, Write};
        let Some(addr) = self.etcd_url.strip_prefix("http://") else {
            return false;
        };
        let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let request = format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer.starts_with("HTTP/1.0 200") && answer.contains(r#""health":"true""#)
    }

    /// Restarts kube-apiserver (same flags, port, certificates and etcd) and
    /// waits until its /readyz is ok. Blocking; clients see connection errors
    /// meanwhile.
    pub fn restart_apiserver(&self) -> io::Result<()> {
        self.restart("kube-apiserver")?;
        self.wait_apiserver_ready()
    }

    /// Restarts etcd (same flags and port; its data is kept) and waits until it
    /// is healthy and kube-apiserver's /readyz is ok again. Blocking.
    pub fn restart_etcd(&self) -> io::Result<()> {
        self.restart("etcd")?;
        self.wait_until(Duration::from_secs(60), "etcd /health", || {
            self.etcd_healthy()
        })?;
        self.wait_apiserver_ready()
    }

    /// A kubeconfig for admin user `user` (one of [`PROCESS_USERS`]) that
    /// reaches the API server at `server` (e.g. a proxy in front of it; the
    /// serving certificate is for 127.0.0.1, any port).
    pub fn kubeconfig_for_user(&self, user: &str, server: &str) -> io::Result<PathBuf> {
        let token = PROCESS_USERS
            .iter()
            .position(|u| *u == user)
            .and_then(|i| self.process_tokens.get(i))
            .ok_or_else(|| io::Error::other(format!("no process user {user}")))?;
        let path = self.dir.join(format!(
            "{user}-{}.kubeconfig",
            server.replace([':', '/'], "_")
        ));
        write(&path, kubeconfig_yaml(server, &self.ca_pem, user, token))?;
        Ok(path)
    }

    /// `127.0.0.1:<port>` of the API server.
    pub fn apiserver_addr(&self) -> std::net::SocketAddr {
        self.server
            .trim_start_matches("https://")
            .parse()
            .expect("the API server listens on 127.0.0.1:<port>")
    }

    /// The process id of control-plane process `name` (`etcd`,
    /// `kube-apiserver`, `kube-controller-manager`): benchmarks read its CPU
    /// time from /proc.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children
            .lock()
            .expect("children lock")
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.child.id())
    }

    /// A kubectl command for this control plane (admin credentials).
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("kubectl"));
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// A helm command for this control plane (admin credentials).
    pub fn helm(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("helm"));
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"));
        cmd
    }

    fn kubectl_quiet(&self, args: &[&str]) -> Option<String> {
        let out = self
            .kubectl()
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops every process (SIGKILL) now instead of at process exit.
    pub fn stop(&self) {
        let mut children = self.children.lock().expect("children lock");
        for managed in children.iter_mut().rev() {
            let _ = managed.child.kill();
            let _ = managed.child.wait();
        }
        children.clear();
    }

    /// Stops kube-apiserver (SIGKILL, as a crash or a node loss would), leaves it
    /// down for `down`, starts it again with the same arguments (same port,
    /// certificates and etcd) and waits until /readyz answers. Returns how long
    /// it was away.
    pub fn restart_kube_apiserver(&self, down: Duration) -> io::Result<Duration> {
        let started = Instant::now();
        let find = |children: &[Managed]| -> io::Result<usize> {
            children
                .iter()
                .position(|c| c.name == "kube-apiserver")
                .ok_or_else(|| io::Error::other("no control-plane process kube-apiserver"))
        };
        {
            let mut children = self.children.lock().expect("children lock");
            let i = find(&children)?;
            children[i].child.kill()?;
            children[i].child.wait()?;
        }
        thread::sleep(down);
        {
            let mut children = self.children.lock().expect("children lock");
            let i = find(&children)?;
            let cmd = children[i].command(&self.dir, true)?;
            children[i].child = spawn_owned(cmd)?;
        }
        self.wait_apiserver_ready()?;
        Ok(started.elapsed())
    }
}
