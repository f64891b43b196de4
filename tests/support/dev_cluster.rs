//! `make dev`: a local control plane with the CRD installed and the operator's
//! binary ready to run against it. Stays up until Ctrl-C (or SIGTERM), then stops
//! everything it started.

#[allow(dead_code)] // shared with the tests, which use more of it
#[path = "controlplane.rs"]
mod controlplane;

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = controlplane::repo_root();
    let parent = root.join("target/dev-cluster");
    let cp = controlplane::ControlPlane::start(&parent, "dev")?;

    // A stable path for the kubeconfig, so it can be exported once per shell.
    let stable = parent.join("kubeconfig");
    std::fs::copy(&cp.kubeconfig, &stable)?;

    let crd = root.join("crds");
    let status = cp
        .kubectl()
        .args(["apply", "--server-side", "-f"])
        .arg(&crd)
        .status()?;
    if !status.success() {
        return Err(format!("installing the CRD from {} failed", crd.display()).into());
    }
    let status = cp
        .kubectl()
        .args([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/dropboxelementinstances.elements.dropbox-operator.dev",
        ])
        .status()?;
    if !status.success() {
        return Err("the CRD did not become Established".into());
    }

    let examples = relative(&root.join("examples"), &root);
    println!();
    println!("Local control plane is up: {}", cp.server);
    println!("  export KUBECONFIG={}", stable.display());
    println!("  kubectl apply -f {examples}/");
    println!("  kubectl get dbxi");
    println!(
        "Logs of etcd, kube-apiserver and kube-controller-manager: {}",
        cp.dir.display()
    );
    println!("Press Ctrl-C to stop.");

    wait_for_signal();
    println!("stopping the control plane");
    cp.stop();
    Ok(())
}

fn relative(path: &Path, root: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Blocks until SIGINT or SIGTERM.
fn wait_for_signal() {
    // SAFETY: plain libc signal-mask calls on this thread; sigwait returns the signal.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
}
