//! `make demo` keeps working: runs the demo program end to end (its own control
//! plane, operator, ingress, emulator and receiver) and checks what it prints.

use std::process::Command;

#[test]
fn the_offline_demo_tells_the_whole_story() {
    let root = env!("CARGO_MANIFEST_DIR");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--bins", "--example", "demo"])
        .current_dir(root)
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building the demo failed");
    let out = Command::new(format!("{root}/target/debug/examples/demo"))
        .current_dir(root)
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "Applying the Secrets and the DropboxElementInstance",
        "dropboxelementinstance.elements.dropbox-operator.dev/marketing created",
        "ada@example.com",
        "\"eventType\": \"UPDATED\"",
        "\"name\": \"Q3 results.pdf\"",
        "elements-webhook-signature: sha256=",
        "webhook-signature: v1,",
        "Elements-Webhook-Signature VALID, Standard Webhooks VALID",
        "Demo complete",
    ] {
        assert!(
            stdout.contains(expected),
            "demo output lacks {expected:?}:\n{stdout}"
        );
    }
}
