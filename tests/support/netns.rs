//! Runs a test in a network namespace of its own, where only loopback exists.
//!
//! The attack suite points callbacks at private, link-local and other internal
//! addresses to prove they are refused. Should the ingress ever let one through,
//! its connection must go nowhere: inside a fresh network namespace every
//! non-loopback address is unreachable at once. The test binary re-runs the
//! test inside `unshare --net` (the whole control plane then lives on that
//! namespace's loopback), and the outer run passes or fails with it.

use std::process::Command;

const INSIDE: &str = "DROPBOX_OPERATOR_TEST_NETNS";

/// Whether this process runs inside the isolated namespace.
pub fn inside() -> bool {
    std::env::var_os(INSIDE).is_some()
}

/// Re-runs test `name` of this binary inside a new network namespace with only
/// loopback up, with its output going straight to this process's output, and
/// panics when it fails.
pub fn rerun_isolated(name: &str) {
    let exe = std::env::current_exe().expect("test binary path");
    let status = Command::new("unshare")
        .args([
            "--net",
            "--",
            "sh",
            "-c",
            "ip link set lo up && exec \"$@\"",
            "sh",
        ])
        .arg(&exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(INSIDE, "1")
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run `unshare --net` (util-linux, root or user namespaces needed): {e}")
        });
    assert!(
        status.success(),
        "{name} failed inside its network namespace ({status}); its output is above"
    );
}
