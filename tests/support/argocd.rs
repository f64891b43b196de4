//! Argo CD's health assessment as the chart tests run it: `tests/argocd-health`,
//! a small Go program over gitops-engine's `pkg/health` (the code Argo CD itself
//! runs), built into `target/argocd-health/` on first use and again when its
//! sources change.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};
use serde::Deserialize;

use super::controlplane::repo_root;

/// One object's health as Argo CD sees it.
#[derive(Debug, Clone, Deserialize)]
pub struct Health {
    pub kind: String,
    #[serde(default)]
    pub namespace: String,
    pub name: String,
    /// `Healthy`, `Progressing`, `Degraded`, ...; empty when Argo CD has no
    /// health check for the kind (it then leaves the object out).
    pub status: String,
    #[serde(default)]
    pub message: String,
}

/// The health program, built when missing or older than its sources.
pub fn binary() -> Result<PathBuf> {
    let src = repo_root().join("tests/argocd-health");
    let out = repo_root().join("target/argocd-health/argocd-health");
    let modified = |p: PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let built = modified(out.clone());
    let fresh = built.is_some()
        && ["main.go", "go.mod", "go.sum"]
            .iter()
            .all(|f| modified(src.join(f)) <= built);
    if !fresh {
        eprintln!("building {} (gitops-engine's pkg/health)", out.display());
        let status = Command::new("go")
            .args(["build", "-trimpath", "-ldflags=-s -w", "-o"])
            .arg(&out)
            .arg(".")
            .current_dir(&src)
            .env("CGO_ENABLED", "0")
            .env("GOFLAGS", "-mod=mod")
            .status()
            .context("run go build (is Go installed?)")?;
        ensure!(status.success(), "go build of tests/argocd-health failed");
    }
    Ok(out)
}

/// The health of every object in `json` (one object, a List, or a stream).
pub fn assess(json: &str) -> Result<Vec<Health>> {
    let mut child = Command::new(binary()?)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start argocd-health")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(json.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "argocd-health failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("argocd-health printed {l}")))
        .collect()
}
