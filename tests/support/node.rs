//! A one-node Kubernetes cluster inside a network namespace of its own, for
//! `make e2e` (tests/e2e.rs): the test control plane (`controlplane.rs`) plus
//! kube-scheduler, containerd with runc, the CNI bridge, the kubelet and
//! kube-proxy, all built by `tests/controlplane/build.sh node`.
//!
//! Confinement. The test binary re-runs itself under `unshare --net --mount
//! --pid --fork --mount-proc` ([`run_confined`]):
//! - network: the node's address (a veth pair, since this kernel has no dummy
//!   interfaces), the CNI bridge, pod and Service addresses, the API server,
//!   the Dropbox emulator and the callback receiver exist only in the new
//!   namespace, which has no route out: nothing but loopback and the run's own
//!   addresses is reachable. The outer run compares the root namespace's
//!   interfaces, addresses and routes before and after, and the inner run
//!   samples them during the run through a descriptor of the root namespace;
//! - mounts: `/run` and `/var/log` (containerd's sockets and shim sockets, pod
//!   network namespaces, pod logs) are tmpfs of the run, and the kubelet's
//!   volume mounts live in the run's mount namespace, so nothing is left
//!   mounted when it ends;
//! - processes: the test is the first process of a PID namespace; when it
//!   exits, the kernel kills every process of the run (containerd, shims,
//!   containers), whether it passed, failed or panicked;
//! - cgroups: pods go under `/<cgroup>/kubepods` (the kubelet's `cgroupRoot`),
//!   which the outer run removes afterwards;
//! - kernel settings: the kubelet sets `vm.overcommit_memory`, `kernel.panic`
//!   and `kernel.panic_on_oops` (not namespaced) unless they already have the
//!   values it wants; the run shows it those values through read-only bind
//!   mounts in its mount namespace, so the machine's kernel keeps its own.
//!
//! State lives under `target/e2e/<pid>/` (removed after a passing run unless
//! `DROPBOX_OPERATOR_E2E_KEEP` is set, kept with every process's log and the
//! pods' logs after a failing one).

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::controlplane::{self, ControlPlane, Options};

/// The node's name (also its hostname for the kubelet and kube-proxy).
pub const NODE_NAME: &str = "e2e-node";
/// The node's address: on one end of a veth pair inside the run's namespace.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// The pods' range (the CNI bridge's host-local range).
pub const POD_CIDR: &str = "10.244.0.0/24";
/// The sandbox ("pause") image: Kubernetes' own pause.c at the pinned
/// version, imported from an archive (nothing is pulled).
pub const PAUSE_IMAGE: &str = "localhost/dropbox-operator-e2e/pause:3.10.2";
/// containerd's socket (on the run's own `/run`).
const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// Where Debian's containernetworking-plugins installs bridge, host-local, loopback.
const CNI_BIN_DIR: &str = "/usr/lib/cni";

const INSIDE: &str = "DROPBOX_OPERATOR_E2E_INSIDE";
const ROOT_NETNS_FD: &str = "DROPBOX_OPERATOR_E2E_ROOT_NETNS_FD";
const RUN_ID: &str = "DROPBOX_OPERATOR_E2E_RUN";

/// Whether this process is the confined run.
pub fn inside() -> bool {
    std::env::var_os(INSIDE).is_some()
}

/// The directory of runs: `target/e2e`.
fn runs_dir() -> PathBuf {
    controlplane::repo_root().join("target/e2e")
}

/// The cgroup (under every hierarchy's root) the run's pods go into.
fn cgroup_name(run: &str) -> String {
    format!("dropbox-operator-e2e-{run}")
}

/// The cgroup v1 hierarchies (and the v2 one, when mounted on its own).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect()
}

/// Removes the cgroup tree `name` in every hierarchy, deepest first (the
/// processes in it are gone: the PID namespace died with the run).
fn remove_cgroups(name: &str) -> Vec<String> {
    fn remove(dir: &Path, left: &mut Vec<String>) {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove(&e.path(), left);
                }
            }
        }
        if let Err(e) = fs::remove_dir(dir) {
            left.push(format!("{}: {e}", dir.display()));
        }
    }
    let mut left = Vec::new();
    for h in cgroup_hierarchies() {
        let dir = h.join(name);
        if dir.exists() {
            remove(&dir, &mut left);
        }
    }
    left
}

/// What a network namespace holds that a run could leave behind: interfaces,
/// addresses and routes (IPv4 and IPv6, every table), one line each.
pub fn network_state(enter: Option<&str>) -> io::Result<Vec<String>> {
    let mut lines = Vec::new();
    for args in [
        &["-o", "link", "show"][..],
        &["-o", "addr", "show"],
        &["route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
    ] {
        let mut cmd = match enter {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={ns}")).arg("--").arg("ip");
                c
            }
            None => Command::new("ip"),
        };
        let out = cmd.args(args).stderr(Stdio::inherit()).output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!("ip {args:?} failed")));
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            lines.push(stable_line(args[args.len() - 2], line));
        }
    }
    lines.sort();
    lines.dedup();
    Ok(lines)
}

/// A line of `ip` output without what changes by itself (counters, lifetimes,
/// link states of existing interfaces).
fn stable_line(kind: &str, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    match kind {
        // `2: eth0: <...> mtu ...`: the interface's name is what a run could add.
        "link" => format!("link {}", words.get(1).copied().unwrap_or("")),
        "addr" => format!(
            "addr {} {}",
            words.get(1).copied().unwrap_or(""),
            words.get(3).copied().unwrap_or("")
        ),
        _ => {
            let mut out = Vec::new();
            let mut skip = false;
            for w in words {
                if skip {
                    skip = false;
                    continue;
                }
                if matches!(w, "expires" | "metric" | "pref") {
                    skip = true;
                    continue;
                }
                if w == "linkdown" {
                    continue;
                }
                out.push(w);
            }
            format!("route {}", out.join(" "))
        }
    }
}

/// Lines of `after` that are not in `before`, and the other way round.
pub fn network_diff(before: &[String], after: &[String]) -> (Vec<String>, Vec<String>) {
    let gained = after
        .iter()
        .filter(|l| !before.contains(l))
        .cloned()
        .collect();
    let lost = before
        .iter()
        .filter(|l| !after.contains(l))
        .cloned()
        .collect();
    (gained, lost)
}

/// The root network namespace as the confined run can see it: a path for
/// `nsenter --net=` (a descriptor the outer run passed down), if any.
pub fn root_netns() -> Option<String> {
    std::env::var(ROOT_NETNS_FD)
        .ok()
        .map(|fd| format!("/proc/self/fd/{fd}"))
}

/// Mount points of this mount namespace.
fn mount_points() -> Vec<String> {
    let mut points: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .collect();
    points.sort();
    points
}

/// Runs test `name` of this binary confined (see the module's comment) and
/// panics when it fails or when the root namespace gained or lost an
/// interface, address, route or mount.
pub fn run_confined(name: &str) {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "the e2e run needs root (network, mount and PID namespaces, cgroups)"
    );
    let run = std::process::id().to_string();
    // Runs whose process is gone leave their state for a look; the next run removes it.
    if let Ok(entries) = fs::read_dir(runs_dir()) {
        for e in entries.flatten() {
            let pid = e.file_name().to_string_lossy().into_owned();
            if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_dir_all(e.path());
                remove_cgroups(&cgroup_name(&pid));
            }
        }
    }
    let before = network_state(None).expect("read the root network namespace");
    let mounts_before = mount_points();
    let cgroup = cgroup_name(&run);
    for h in cgroup_hierarchies() {
        // The kubelet checks that its cgroupRoot exists in every hierarchy.
        fs::create_dir_all(h.join(&cgroup))
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", h.join(&cgroup).display()));
    }

    // A descriptor of the root network namespace, inherited by the run (not
    // close-on-exec), so that it can look at it while it runs.
    let root_ns = fs::File::open("/proc/self/ns/net").expect("open /proc/self/ns/net");
    let fd = root_ns.as_raw_fd();
    // SAFETY: clearing FD_CLOEXEC on a descriptor this function owns.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, 0);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let started = Instant::now();
    let status = Command::new("unshare")
        .args([
            "--net",
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--mount-proc",
            "--",
        ])
        .arg(&exe)
        .args([
            "--exact",
            name,
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(INSIDE, "1")
        .env(ROOT_NETNS_FD, fd.to_string())
        .env(RUN_ID, &run)
        .status()
        .unwrap_or_else(|e| panic!("cannot run unshare (util-linux): {e}"));
    drop(root_ns);

    let cgroups_left = remove_cgroups(&cgroup);
    let after = network_state(None).expect("read the root network namespace");
    let (gained, lost) = network_diff(&before, &after);
    let mounts_after = mount_points();
    let mounts_gained: Vec<&String> = mounts_after
        .iter()
        .filter(|m| !mounts_before.contains(m))
        .collect();
    eprintln!(
        "e2e: the confined run took {:.0}s; afterwards the root network namespace gained {} and lost {} \
         interfaces, addresses or routes, the root mount namespace gained {} mounts, {} cgroups were left",
        started.elapsed().as_secs_f64(),
        gained.len(),
        lost.len(),
        mounts_gained.len(),
        cgroups_left.len()
    );
    assert!(
        status.success(),
        "the e2e run failed ({status}); its table and output are above, its logs in {}",
        runs_dir().join(&run).display()
    );
    assert!(
        gained.is_empty() && lost.is_empty(),
        "the root network namespace changed: gained {gained:?}, lost {lost:?}"
    );
    assert!(
        mounts_gained.is_empty(),
        "mounts left in the root mount namespace: {mounts_gained:?}"
    );
    assert!(cgroups_left.is_empty(), "cgroups left: {cgroups_left:?}");
    if std::env::var_os("DROPBOX_OPERATOR_E2E_KEEP").is_none() {
        let _ = fs::remove_dir_all(runs_dir().join(&run));
    }
}

/// Runs `program args`, failing with its output when it fails.
pub fn sh(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> io::Result<String> {
    let program = program.as_ref();
    let out = Command::new(program).args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{} {}: {}{}",
            program.to_string_lossy(),
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The running node: its control plane and where its state is.
pub struct Node {
    pub cp: ControlPlane,
    /// `target/e2e/<run>/`.
    pub dir: PathBuf,
    bin: PathBuf,
}

impl Node {
    /// Sets up the confined run's namespaces (mounts, network) and starts the
    /// control plane, kube-scheduler, containerd, the kubelet and kube-proxy;
    /// returns when the node is Ready, untainted and kube-proxy serves.
    /// Only inside the confined run ([`run_confined`]).
    pub fn start() -> io::Result<Node> {
        assert!(inside(), "Node::start runs only inside run_confined");
        let run = std::env::var(RUN_ID).map_err(|_| io::Error::other("no run id"))?;
        let dir = runs_dir().join(&run);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let bin = controlplane::ensure_binaries()?;
        for b in [
            "kube-scheduler",
            "kubelet",
            "kube-proxy",
            "containerd",
            "containerd-shim-runc-v2",
            "ctr",
            "runc",
            "pause",
        ] {
            if !bin.join(b).is_file() {
                return Err(io::Error::other(format!(
                    "{} missing: run `make node` (tests/controlplane/build.sh node)",
                    bin.join(b).display()
                )));
            }
        }
        for plugin in ["bridge", "host-local", "loopback"] {
            if !Path::new(CNI_BIN_DIR).join(plugin).is_file() {
                return Err(io::Error::other(format!(
                    "CNI plugin {CNI_BIN_DIR}/{plugin} missing: run tests/controlplane/node-packages.sh"
                )));
            }
        }
        prepare_namespaces(&dir)?;

        let cp =
            ControlPlane::start_with(&dir, "controlplane", &Options::for_node(NODE_IP, NODE_NAME))?;
        let node = Node { cp, dir, bin };
        node.start_scheduler()?;
        node.start_containerd()?;
        node.import_pause_image()?;
        node.start_kubelet(&cgroup_name(&run))?;
        node.start_kube_proxy()?;
        node.wait_ready()?;
        Ok(node)
    }

    /// Copies the pods' logs (`/var/log/pods`, on the run's tmpfs; the kubelet
    /// removes a deleted pod's) to `<dir>/pod-logs` every 2 s while the run lasts.
    pub fn keep_pod_logs(&self) {
        let target = self.path("pod-logs");
        let _ = fs::create_dir_all(&target);
        std::thread::spawn(move || {
            loop {
                let _ = Command::new("cp")
                    .args(["-a", "-u", "/var/log/pods/."])
                    .arg(&target)
                    .stderr(Stdio::null())
                    .status();
                std::thread::sleep(Duration::from_secs(2));
            }
        });
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn start_scheduler(&self) -> io::Result<()> {
        let kubeconfig = self
            .cp
            .kubeconfig_of("system:kube-scheduler", "scheduler.kubeconfig")?;
        let k = kubeconfig.display();
        self.cp.start_process(
            "kube-scheduler",
            self.bin.join("kube-scheduler"),
            vec![
                format!("--kubeconfig={k}"),
                format!("--authentication-kubeconfig={k}"),
                format!("--authorization-kubeconfig={k}"),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", controlplane::free_port()),
                "--v=1".into(),
            ],
        )
    }

    fn start_containerd(&self) -> io::Result<()> {
        let cni_conf = self.path("cni/net.d");
        fs::create_dir_all(&cni_conf)?;
        fs::create_dir_all(self.path("cni/ipam"))?;
        // One bridge for the pods, the node's end the gateway; host-local
        // addresses (its state under the run). No masquerading: everything
        // the pods reach is in this namespace.
        fs::write(
            cni_conf.join("10-e2e.conflist"),
            serde_json::json!({
                "cniVersion": "1.0.0",
                "name": "e2e",
                "plugins": [{
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": self.path("cni/ipam"),
                    }
                }]
            })
            .to_string(),
        )?;
        let config = format!(
            r#"version = 3
root = "{root}"
state = "/run/containerd"
imports = []
# Plugins that would write outside the run (/opt/containerd, /var/run/nri) or
# are not used here.
disabled_plugins = [
  "io.containerd.nri.v1.nri",
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs",
  "io.containerd.differ.v1.erofs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{PAUSE_IMAGE}"

[plugins.'io.containerd.cri.v1.runtime']
  # The sandbox lacks CAP_SYS_RESOURCE: the kubelet's oom_score_adj for pod
  # sandboxes (-998) cannot be set, so keep every container's at least ours.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
    BinaryName = "{runc}"
    SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{CNI_BIN_DIR}"]
    conf_dir = "{conf}"
"#,
            root = self.path("containerd").display(),
            runc = self.bin.join("runc").display(),
            conf = cni_conf.display(),
        );
        fs::write(self.path("containerd.toml"), config)?;
        self.cp.start_process(
            "containerd",
            self.bin.join("containerd"),
            vec![
                "--config".into(),
                self.path("containerd.toml").display().to_string(),
                "--log-level=warn".into(),
            ],
        )?;
        self.cp
            .wait_until(Duration::from_secs(60), "containerd", || {
                self.ctr(&["version"]).is_ok()
            })
    }

    /// `ctr --address <socket> -n k8s.io ARGS` (the CRI's namespace).
    pub fn ctr(&self, args: &[&str]) -> io::Result<String> {
        let mut all = vec!["--address", CONTAINERD_SOCKET, "-n", "k8s.io"];
        all.extend_from_slice(args);
        sh(self.bin.join("ctr"), &all)
    }

    /// Packs `rootfs` with image configuration `config` (JSON) as image `name`
    /// (hack/image-archive.sh) and imports it into containerd.
    pub fn import_image(&self, rootfs: &Path, config: &Path, name: &str) -> io::Result<PathBuf> {
        let archive = self
            .dir
            .join(format!("{}.oci.tar", name.replace(['/', ':'], "_")));
        sh(
            controlplane::repo_root().join("hack/image-archive.sh"),
            &[
                &rootfs.display().to_string(),
                &config.display().to_string(),
                name,
                &archive.display().to_string(),
            ],
        )?;
        self.ctr(&["images", "import", &archive.display().to_string()])?;
        let listed = self.ctr(&["images", "ls", "-q"])?;
        if !listed.lines().any(|l| l == name) {
            return Err(io::Error::other(format!(
                "{name} not listed by containerd after the import: {listed}"
            )));
        }
        Ok(archive)
    }

    fn import_pause_image(&self) -> io::Result<()> {
        let rootfs = self.path("pause-rootfs");
        fs::create_dir_all(&rootfs)?;
        fs::copy(self.bin.join("pause"), rootfs.join("pause"))?;
        let config = self.path("pause-config.json");
        // As the upstream image: ENTRYPOINT /pause, USER 65535:65535.
        fs::write(
            &config,
            r#"{"User": "65535:65535", "Entrypoint": ["/pause"]}"#,
        )?;
        self.import_image(&rootfs, &config, PAUSE_IMAGE)?;
        Ok(())
    }

    fn start_kubelet(&self, cgroup: &str) -> io::Result<()> {
        let kubeconfig = self
            .cp
            .kubeconfig_of(&format!("system:node:{NODE_NAME}"), "kubelet.kubeconfig")?;
        let config = format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This kernel mounts cgroup v1 hierarchies.
failCgroupV1: false
cgroupDriver: cgroupfs
# Pods under /{cgroup}/kubepods (removed after the run); nothing reserved.
cgroupRoot: /{cgroup}
cgroupsPerQOS: true
enforceNodeAllocatable: []
failSwapOn: false
address: {NODE_IP}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://{CONTAINERD_SOCKET}
# No cluster DNS: nothing here resolves names (the chart's values are addresses).
resolvConf: ""
# Without CAP_SYS_RESOURCE the kubelet cannot lower its own OOM score.
oomScoreAdj: 0
# Nothing is evicted or garbage-collected for the shared disk's sake.
localStorageCapacityIsolation: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "0%"
  nodefs.available: "0%"
  imagefs.available: "0%"
serializeImagePulls: false
"#
        );
        fs::write(self.path("kubelet.yaml"), config)?;
        self.cp.start_process(
            "kubelet",
            self.bin.join("kubelet"),
            vec![
                format!("--config={}", self.path("kubelet.yaml").display()),
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--root-dir={}", self.path("kubelet").display()),
                format!("--node-ip={NODE_IP}"),
                format!("--hostname-override={NODE_NAME}"),
                "--v=1".into(),
            ],
        )
    }

    fn start_kube_proxy(&self) -> io::Result<()> {
        let kubeconfig = self
            .cp
            .kubeconfig_of("system:kube-proxy", "kube-proxy.kubeconfig")?;
        let config = format!(
            r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: {POD_CIDR}
hostnameOverride: {NODE_NAME}
bindAddress: {NODE_IP}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
oomScoreAdj: 0
# conntrack limits are not namespaced: leave the machine's alone.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
clientConnection:
  kubeconfig: {kubeconfig}
"#,
            kubeconfig = kubeconfig.display()
        );
        fs::write(self.path("kube-proxy.yaml"), config)?;
        self.cp.start_process(
            "kube-proxy",
            self.bin.join("kube-proxy"),
            vec![
                format!("--config={}", self.path("kube-proxy.yaml").display()),
                "--v=1".into(),
            ],
        )
    }

    fn wait_ready(&self) -> io::Result<()> {
        self.cp.wait_until(
            Duration::from_secs(120),
            "node Ready without taints",
            || {
                let out = self
                    .cp
                    .kubectl()
                    .args([
                        "get",
                        "node",
                        NODE_NAME,
                        "-o",
                        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status} {.spec.taints}",
                    ])
                    .stderr(Stdio::null())
                    .output();
                out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "True")
            },
        )?;
        self.cp
            .wait_until(Duration::from_secs(60), "kube-proxy /healthz", || {
                std::net::TcpStream::connect(("127.0.0.1", 10256)).is_ok()
            })?;
        // The `kubernetes` Service must lead to the API server from the node (as
        // from pods): kube-proxy has written its rules.
        self.cp.wait_until(
            Duration::from_secs(60),
            "the kubernetes Service reaches the API server",
            || {
                std::net::TcpStream::connect_timeout(
                    &(
                        controlplane::KUBERNETES_SERVICE_IP
                            .parse::<Ipv4Addr>()
                            .expect("ip"),
                        443,
                    )
                        .into(),
                    Duration::from_secs(1),
                )
                .is_ok()
            },
        )
    }
}

/// Inside the run's fresh namespaces: its own `/run` and `/var/log`, the kernel
/// settings the kubelet wants shown read-only, loopback up, the node's address
/// on a veth pair, forwarding on.
fn prepare_namespaces(dir: &Path) -> io::Result<()> {
    for target in ["/run", "/var/log"] {
        sh(
            "mount",
            &["-t", "tmpfs", "-o", "mode=0755", "tmpfs", target],
        )?;
    }
    let sysctl = dir.join("sysctl");
    fs::create_dir_all(&sysctl)?;
    for (key, value) in [
        ("vm/overcommit_memory", "1"),
        ("kernel/panic", "10"),
        ("kernel/panic_on_oops", "1"),
    ] {
        let file = sysctl.join(key.replace('/', "."));
        fs::write(&file, format!("{value}\n"))?;
        let target = format!("/proc/sys/{key}");
        sh("mount", &["--bind", &file.display().to_string(), &target])?;
        sh("mount", &["-o", "remount,bind,ro", &target])?;
    }
    sh("ip", &["link", "set", "lo", "up"])?;
    sh(
        "ip",
        &[
            "link", "add", "e2e-node", "type", "veth", "peer", "name", "e2e-peer",
        ],
    )?;
    sh(
        "ip",
        &["addr", "add", &format!("{NODE_IP}/24"), "dev", "e2e-node"],
    )?;
    sh("ip", &["link", "set", "e2e-node", "up"])?;
    sh("ip", &["link", "set", "e2e-peer", "up"])?;
    // A real node reaches Service addresses through its default route; this
    // namespace has none (nothing may leave it), so the Service range gets a
    // route of its own for kube-proxy's rules to rewrite.
    sh(
        "ip",
        &[
            "route",
            "add",
            controlplane::SERVICE_CIDR,
            "dev",
            "e2e-node",
            "src",
            &NODE_IP.to_string(),
        ],
    )?;
    fs::write("/proc/sys/net/ipv4/ip_forward", "1\n")?;
    Ok(())
}
