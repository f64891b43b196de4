//! Upgrading the CRD of a Helm release, the documented way (docs/operations.md "Upgrade
//! notes", chart README "CRDs"), with the real helm and kubectl on a real API
//! server. Its own test binary: here helm must be the one that creates the CRD
//! (the other test binaries install it themselves).

mod support;

use std::path::Path;

use anyhow::{Context as _, Result, ensure};
use support::chart::{chart_dir, run};

const CRD_NAME: &str = "dropboxelementinstances.elements.dropbox-operator.dev";
const CRD_FILE: &str = "dropboxelementinstances.elements.dropbox-operator.dev.yaml";

/// Copies the chart (files only, recursively) to `to`.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn crd_json() -> Result<serde_json::Value> {
    let (ok, out, err) = support::kubectl(&[
        "get",
        "crd",
        CRD_NAME,
        "-o",
        "json",
        "--show-managed-fields",
    ]);
    ensure!(ok, "{err}");
    Ok(serde_json::from_str(&out)?)
}

/// helm installs crds/ once and never upgrades it; the CRD of a new chart
/// version is applied with `kubectl apply --server-side --force-conflicts`
/// (without --force-conflicts, the fields helm created are a conflict), and the
/// release upgrades afterwards.
#[tokio::test]
async fn a_changed_crd_is_upgraded_with_the_documented_command() -> Result<()> {
    let admin = support::client().await;
    let ns = support::namespace(&admin, "crd-upgrade").await;
    let cluster = support::cluster();
    let chart = cluster.dir.join("chart-copy");
    copy_dir(&chart_dir(), &chart)?;
    let chart_arg = chart.display().to_string();
    let image = [
        "--set",
        "image.repository=registry.example.com/dropbox-operator",
    ];

    let mut cmd = cluster.helm();
    cmd.args(["install", &ns, &chart_arg, "--namespace", &ns])
        .args(image);
    let (ok, out, err) = run(cmd);
    ensure!(ok, "helm install: {out}\n{err}");
    let crd = crd_json()?;
    let managers: Vec<&str> = crd["metadata"]["managedFields"]
        .as_array()
        .context("managedFields")?
        .iter()
        .filter_map(|m| m["manager"].as_str())
        .collect();
    ensure!(
        managers.contains(&"helm"),
        "helm created the CRD: {managers:?}"
    );

    // The next chart version's CRD: a changed description and a new column.
    let crd_path = chart.join("crds").join(CRD_FILE);
    let original = std::fs::read_to_string(&crd_path)?;
    let changed = original
        .replacen(
            "description: Email of the connected Dropbox account\n",
            "description: Email address of the connected Dropbox account\n",
            1,
        )
        .replacen(
            "    - jsonPath: .metadata.creationTimestamp\n",
            "    - description: Phase of the instance\n      jsonPath: .status.phase\n      name: Phase\n      type: string\n    - jsonPath: .metadata.creationTimestamp\n",
            1,
        );
    ensure!(changed != original, "the test's CRD edit no longer applies");
    std::fs::write(&crd_path, &changed)?;
    let crds_dir = chart.join("crds").display().to_string();

    // Helm's own upgrade leaves the CRD alone.
    let mut cmd = cluster.helm();
    cmd.args(["upgrade", &ns, &chart_arg, "--namespace", &ns])
        .args(image);
    let (ok, out, err) = run(cmd);
    ensure!(ok, "helm upgrade: {out}\n{err}");
    let columns = |crd: &serde_json::Value| {
        crd["spec"]["versions"][0]["additionalPrinterColumns"].to_string()
    };
    ensure!(
        !columns(&crd_json()?).contains("Phase"),
        "helm upgraded crds/"
    );

    // `kubectl apply --server-side` alone: a conflict with helm's manager.
    let (ok, out, err) = support::kubectl(&["apply", "--server-side", "-f", &crds_dir]);
    ensure!(
        !ok && err.contains("conflict"),
        "expected a field-manager conflict, got: {out}\n{err}"
    );
    // The documented command.
    let (ok, out, err) = support::kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        &crds_dir,
    ]);
    ensure!(
        ok,
        "kubectl apply --server-side --force-conflicts: {out}\n{err}"
    );
    let crd = crd_json()?;
    let cols = columns(&crd);
    ensure!(
        cols.contains("Phase") && cols.contains("Email address of the connected"),
        "{cols}"
    );
    let (ok, _, err) = support::kubectl(&[
        "wait",
        "--for=condition=Established",
        &format!("crd/{CRD_NAME}"),
        "--timeout=30s",
    ]);
    ensure!(ok, "{err}");
    // Applying it again (the next upgrade) is no conflict any more.
    let (ok, out, err) = support::kubectl(&["apply", "--server-side", "-f", &crds_dir]);
    ensure!(ok, "second apply: {out}\n{err}");
    // The new column is served.
    let (ok, out, err) = support::kubectl(&["get", "dbxi", "-n", &ns]);
    ensure!(ok, "{err}");
    let _ = out;
    let (ok, out, err) = support::kubectl(&[
        "get",
        "crd",
        CRD_NAME,
        "-o",
        "jsonpath={.status.acceptedNames.kind}",
    ]);
    ensure!(ok && out == "DropboxElementInstance", "{out} {err}");
    Ok(())
}
