//! The project's image without a registry, and the check that it does not
//! drift from the Dockerfile.
//!
//! `hack/verify-runtime-image.sh` assembles the runtime image's root filesystem
//! (target/runtime-image/rootfs) and configuration (target/runtime-image/config.json);
//! `hack/image-archive.sh` packs them into an OCI archive that the e2e node
//! imports. The Dockerfile cannot be built here (no container engine), so
//! [`compare`] reads what the Dockerfile declares (its final stage's USER,
//! ENTRYPOINT, CMD, EXPOSE, LABEL and COPY destinations, plus what its base
//! image provides) and what the archive holds (the image configuration and the
//! layer's files, read back from the archive), and lists every difference.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// The base image of the Dockerfile's runtime stage, and what it brings that the
/// archive must have too (gcr.io/distroless/cc-debian12:nonroot).
pub const BASE_IMAGE: &str = "gcr.io/distroless/cc-debian12:nonroot";
const BASE_ENV: [&str; 2] = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
];
const BASE_WORKDIR: &str = "/home/nonroot";
/// (path, file type and mode, owner): what the base provides and a process may use.
const BASE_FILES: [(&str, &str, &str); 6] = [
    ("etc/passwd", "-rw-r--r--", "0/0"),
    ("etc/group", "-rw-r--r--", "0/0"),
    ("etc/ssl/certs/ca-certificates.crt", "-rw-r--r--", "0/0"),
    ("tmp", "drwxrwxrwt", "0/0"),
    ("home/nonroot", "drwx------", "65532/65532"),
    ("root", "drwx------", "0/0"),
];

/// What the Dockerfile's final stage declares.
#[derive(Debug, Default)]
pub struct Declared {
    pub base: String,
    pub user: String,
    pub entrypoint: Value,
    pub cmd: Value,
    pub exposed: BTreeSet<String>,
    pub labels: BTreeMap<String, String>,
    /// Destinations of `COPY --from=...` into the final stage.
    pub copies: Vec<String>,
}

/// Reads the final stage of `dockerfile`.
pub fn declared(dockerfile: &Path) -> Result<Declared> {
    let text = std::fs::read_to_string(dockerfile)
        .with_context(|| format!("read {}", dockerfile.display()))?;
    // Instructions: continuation lines joined, comments dropped.
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            if !current.trim().is_empty() {
                instructions.push(current.trim().to_owned());
            }
            current.clear();
        }
    }
    let last_from = instructions
        .iter()
        .rposition(|i| i.to_ascii_uppercase().starts_with("FROM "))
        .context("the Dockerfile has no FROM")?;
    let mut d = Declared::default();
    for instruction in &instructions[last_from..] {
        let (keyword, rest) = instruction
            .split_once(char::is_whitespace)
            .unwrap_or((instruction, ""));
        let rest = rest.trim();
        match keyword.to_ascii_uppercase().as_str() {
            "FROM" => d.base = rest.split_whitespace().next().unwrap_or("").to_owned(),
            "USER" => d.user = rest.to_owned(),
            "ENTRYPOINT" => {
                d.entrypoint = serde_json::from_str(rest).context("ENTRYPOINT in JSON form")?
            }
            "CMD" => d.cmd = serde_json::from_str(rest).context("CMD in JSON form")?,
            "EXPOSE" => {
                for port in rest.split_whitespace() {
                    d.exposed.insert(if port.contains('/') {
                        port.to_owned()
                    } else {
                        format!("{port}/tcp")
                    });
                }
            }
            "LABEL" => d.labels.extend(labels(rest)?),
            "COPY" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                if let Some(dest) = words.last() {
                    d.copies.push(dest.trim_start_matches('/').to_owned());
                }
            }
            _ => {}
        }
    }
    Ok(d)
}

/// `key="value" key2=value2 ...` of a LABEL instruction.
fn labels(text: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = chars.by_ref().take_while(|c| !c.is_whitespace()).collect();
        }
        ensure!(!key.trim().is_empty(), "LABEL without a key in {text:?}");
        out.insert(key.trim().to_owned(), value);
    }
}

/// One entry of the archive's layer.
#[derive(Debug, Clone)]
pub struct Entry {
    /// `-rwxr-xr-x`, `drwxrwxrwt`, ...
    pub mode: String,
    /// `uid/gid`.
    pub owner: String,
    pub size: u64,
}

/// What an OCI archive made by hack/image-archive.sh holds.
#[derive(Debug)]
pub struct Archive {
    pub name: String,
    pub config: Value,
    /// Paths without a leading `./` or `/`.
    pub files: BTreeMap<String, Entry>,
}

fn tar_extract(archive: &Path, member: &str) -> Result<Vec<u8>> {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg(member)
        .output()?;
    ensure!(
        out.status.success(),
        "tar -xOf {} {member}: {}",
        archive.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

fn blob(archive: &Path, digest: &str) -> Result<Vec<u8>> {
    let hex = digest.strip_prefix("sha256:").context("sha256 digest")?;
    tar_extract(archive, &format!("blobs/sha256/{hex}"))
}

/// Reads the archive back: index, manifest, configuration, the layer's listing.
pub fn read_archive(archive: &Path) -> Result<Archive> {
    let index: Value = serde_json::from_slice(&tar_extract(archive, "index.json")?)?;
    let manifest_desc = &index["manifests"][0];
    let name = manifest_desc["annotations"]["io.containerd.image.name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let manifest: Value = serde_json::from_slice(&blob(
        archive,
        manifest_desc["digest"].as_str().unwrap_or_default(),
    )?)?;
    let config: Value = serde_json::from_slice(&blob(
        archive,
        manifest["config"]["digest"].as_str().unwrap_or_default(),
    )?)?;
    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    ensure!(
        layers.len() == 1,
        "expected one layer, found {}",
        layers.len()
    );
    let layer = blob(archive, layers[0]["digest"].as_str().unwrap_or_default())?;
    let mut tar = Command::new("tar")
        .args(["--numeric-owner", "-tvf", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = tar.stdin.take().context("tar stdin")?;
    let writer = std::thread::spawn(move || stdin.write_all(&layer));
    let out = tar.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("tar writer panicked"))??;
    ensure!(out.status.success(), "tar -tv of the layer failed");
    let mut files = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // -rwxr-xr-x 0/0 123 1970-01-01 00:00 ./path
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 {
            continue;
        }
        let path = f[5..].join(" ");
        let path = path.trim_start_matches("./").trim_end_matches('/');
        if path.is_empty() || path == "." {
            continue;
        }
        let path = path.split(" -> ").next().unwrap_or(path).to_owned();
        files.insert(
            path,
            Entry {
                mode: f[0].to_owned(),
                owner: f[1].to_owned(),
                size: f[2].parse().unwrap_or(0),
            },
        );
    }
    Ok(Archive {
        name,
        config,
        files,
    })
}

/// Every difference between what the Dockerfile's image holds (`declared`,
/// plus its base's contributions) and what `archive` holds; `binary` is the
/// file the Dockerfile copies in (the release build).
pub fn compare(declared: &Declared, archive: &Archive, binary: &Path) -> Vec<String> {
    let mut diffs = Vec::new();
    let config = &archive.config["config"];
    let mut check = |what: &str, dockerfile: Value, image: &Value| {
        if &dockerfile != image {
            diffs.push(format!("{what}: Dockerfile {dockerfile}, image {image}"));
        }
    };
    check(
        "FROM",
        Value::from(BASE_IMAGE),
        &Value::from(declared.base.clone()),
    );
    check("USER", Value::from(declared.user.clone()), &config["User"]);
    check(
        "ENTRYPOINT",
        declared.entrypoint.clone(),
        &config["Entrypoint"],
    );
    check("CMD", declared.cmd.clone(), &config["Cmd"]);
    let exposed: BTreeSet<String> = config["ExposedPorts"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    check(
        "EXPOSE",
        serde_json::json!(declared.exposed),
        &serde_json::json!(exposed),
    );
    check(
        "LABEL",
        serde_json::json!(declared.labels),
        &config["Labels"].clone(),
    );
    check("Env (base)", serde_json::json!(BASE_ENV), &config["Env"]);
    check(
        "WorkingDir (base)",
        Value::from(BASE_WORKDIR),
        &config["WorkingDir"],
    );
    let binary_size = std::fs::metadata(binary).map(|m| m.len()).unwrap_or(0);
    for dest in &declared.copies {
        match archive.files.get(dest) {
            None => diffs.push(format!("COPY {dest}: not in the image")),
            Some(e) if !e.mode.starts_with("-rwx") || e.owner != "0/0" => {
                diffs.push(format!("COPY {dest}: {} {} in the image", e.mode, e.owner))
            }
            Some(e) if e.size != binary_size => diffs.push(format!(
                "COPY {dest}: {} bytes in the image, {binary_size} built",
                e.size
            )),
            Some(_) => {}
        }
    }
    for (path, mode, owner) in BASE_FILES {
        match archive.files.get(path) {
            None => diffs.push(format!("base {path}: not in the image")),
            Some(e) if e.mode != mode || e.owner != owner => diffs.push(format!(
                "base {path}: {} {} in the image, {mode} {owner} in {BASE_IMAGE}",
                e.mode, e.owner
            )),
            Some(_) => {}
        }
    }
    // Nothing else but directories and the shared libraries the base provides.
    for (path, e) in &archive.files {
        let known = declared.copies.contains(path)
            || BASE_FILES.iter().any(|(p, _, _)| p == path)
            || e.mode.starts_with('d')
            || path.starts_with("lib")
            || path.starts_with("usr/lib");
        if !known {
            diffs.push(format!(
                "{path}: in the image, neither copied by the Dockerfile nor from its base"
            ));
        }
    }
    diffs
}

/// The runtime's name for an image reference as the kubelet resolves it:
/// `dropbox-operator:0.1.0` is `docker.io/library/dropbox-operator:0.1.0`.
pub fn normalized(reference: &str) -> String {
    let (first, _) = reference.split_once('/').unwrap_or(("", reference));
    if !reference.contains('/') {
        format!("docker.io/library/{reference}")
    } else if first.contains('.') || first.contains(':') || first == "localhost" {
        reference.to_owned()
    } else {
        format!("docker.io/{reference}")
    }
}

/// Fails unless hack/verify-runtime-image.sh has assembled the image.
pub fn ensure_assembled(rootfs: &Path, config: &Path) -> Result<()> {
    if !rootfs.join("dropbox-operator").is_file() || !config.is_file() {
        bail!(
            "{} or {} missing: run hack/verify-runtime-image.sh (make image) first",
            rootfs.display(),
            config.display()
        );
    }
    Ok(())
}
