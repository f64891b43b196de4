//! The signature-verification snippets in docs/user-guide.md ("Verifying a
//! delivery", by hand) work: each is run against a
//! body signed by the ingress's own signing code, and must accept it and reject
//! a tampered body.

use std::process::Command;

use dropbox_operator::ingress::payload::signature_headers;

const GUIDE: &str = include_str!("../docs/user-guide.md");

/// The first fenced block of `lang` after the line `label`.
fn snippet(label: &str, lang: &str) -> String {
    let start = GUIDE
        .find(label)
        .unwrap_or_else(|| panic!("docs/user-guide.md has no {label:?}"));
    let fence = format!("```{lang}\n");
    let body = &GUIDE[start..];
    let open = body.find(&fence).expect("code block") + fence.len();
    let close = body[open..].find("```").expect("closing fence");
    body[open..open + close].to_owned()
}

fn signed(body: &str, key: &str) -> Vec<(String, String)> {
    signature_headers(
        Some(key.as_bytes()),
        "evt-123",
        1_795_890_920,
        body.as_bytes(),
    )
    .into_iter()
    .map(|(k, v)| (k.to_ascii_lowercase(), v))
    .collect()
}

fn run(program: &str, args: &[&str], source: &str) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .arg(source)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn headers_literal(headers: &[(String, String)], quote: impl Fn(&str) -> String) -> String {
    headers
        .iter()
        .map(|(k, v)| format!("{}: {}", quote(k), quote(v)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn python_snippet_verifies_both_schemes() {
    let body = r#"{"message":{"eventId":"evt-123","events":[]}}"#;
    let headers = signed(body, "my-key");
    let q = |s: &str| format!("{s:?}");
    let program = format!(
        "{}\nheaders = {{{}}}\nbody = {}.encode()\nassert verify(b'my-key', body, headers)\nassert not verify(b'my-key', body + b' ', headers)\nassert not verify(b'other-key', body, headers)\nprint('ok')\n",
        snippet("Python:", "python"),
        headers_literal(&headers, q),
        q(body)
    );
    let (ok, out) = run("python3", &["-c"], &program);
    assert!(ok && out.trim() == "ok", "{out}");
}

#[test]
fn node_snippet_verifies_both_schemes() {
    let body = r#"{"message":{"eventId":"evt-123","events":[]}}"#;
    let headers = signed(body, "my-key");
    let q = |s: &str| format!("{s:?}");
    let program = format!(
        "{}\nconst headers = {{{}}};\nconst body = Buffer.from({});\nif (!verify('my-key', body, headers)) throw new Error('rejected a good delivery');\nif (verify('my-key', Buffer.concat([body, Buffer.from(' ')]), headers)) throw new Error('accepted a tampered body');\nif (verify('other-key', body, headers)) throw new Error('accepted another key');\nconsole.log('ok');\n",
        snippet("Node:", "js"),
        headers_literal(&headers, q),
        q(body)
    );
    let (ok, out) = run("node", &["-e"], &program);
    assert!(ok && out.trim() == "ok", "{out}");
}

/// The guide's Rust snippet, verbatim (a test below keeps the two identical).
#[rustfmt::skip]
mod guide_rust {
    use base64::{Engine, engine::general_purpose::STANDARD};
    use hmac::{Hmac, KeyInit, Mac};
    type HmacSha256 = Hmac<sha2::Sha256>;

    pub fn verify(key: &[u8], body: &[u8], elements_sig: &str, id: &str, ts: &str, webhook_sig: &str) -> bool {
        let check = |data: &[&[u8]], b64: &str| {
            let mut mac = HmacSha256::new_from_slice(key).expect("any key length");
            data.iter().for_each(|d| mac.update(d));
            STANDARD.decode(b64).is_ok_and(|sig| mac.verify_slice(&sig).is_ok())
        };
        let elements = elements_sig.strip_prefix("sha256=").is_some_and(|s| check(&[body], s));
        let standard = webhook_sig.split(' ').filter_map(|s| s.strip_prefix("v1,"))
            .any(|s| check(&[id.as_bytes(), b".", ts.as_bytes(), b".", body], s));
        elements && standard
    }
}

#[test]
fn rust_snippet_is_the_guide_text_and_verifies_both_schemes() {
    let source = include_str!("readme_snippets.rs");
    let start = source.find("mod guide_rust {\n").expect("module") + "mod guide_rust {\n".len();
    let end = source[start..].find("\n}\n").expect("module end") + start + 1;
    let ours: String = source[start..end]
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        ours.trim(),
        snippet("Rust (`hmac`, `sha2`, `base64`):", "rust").trim(),
        "docs/user-guide.md's Rust snippet changed"
    );

    let body = r#"{"message":{"eventId":"evt-123","events":[]}}"#;
    let headers = signed(body, "my-key");
    let h = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .expect(name)
    };
    let (sig, id, ts, wh) = (
        h("elements-webhook-signature"),
        h("webhook-id"),
        h("webhook-timestamp"),
        h("webhook-signature"),
    );
    assert!(guide_rust::verify(
        b"my-key",
        body.as_bytes(),
        &sig,
        &id,
        &ts,
        &wh
    ));
    assert!(!guide_rust::verify(
        b"my-key",
        b"tampered",
        &sig,
        &id,
        &ts,
        &wh
    ));
    assert!(!guide_rust::verify(
        b"other",
        body.as_bytes(),
        &sig,
        &id,
        &ts,
        &wh
    ));
}
