//! `dropbox-operator import`: turns a Cloud Elements instance JSON (the body
//! POSTed to `/instances`, docs/user-guide.md "Coming from Cloud Elements") into the Secrets and the
//! `DropboxElementInstance` that `kubectl apply -f -` accepts.
//!
//! Secret values go into Secrets (`stringData`, type Opaque), never into the
//! custom resource; the custom resource references them by name:
//!
//! | instance JSON | output |
//! |---|---|
//! | `element.key` (must be `dropbox`) | `spec.element.key` |
//! | `name` | `spec.name`; also `metadata.name` unless `--name` is given |
//! | `tags` (array of strings, or one string) | `spec.tags` |
//! | `authentication.type` (`"authentication": {"type": ...}` or `configuration."authentication.type"`; default `oauth2`) | `spec.authentication.type` |
//! | `configuration."oauth.api.key"`, `configuration."oauth.api.secret"` | Secret `<name>-app`, same keys; `spec.authentication.appSecretRef` |
//! | `providerData.code` | Secret `<name>-code`, key `code`; `spec.authentication.codeSecretRef` |
//! | `configuration."oauth.callback.url"` | `spec.authentication.callbackUrl` |
//! | apiKey: `configuration."api.key"`, `configuration."oauth.user.token"` or `providerData.apiKey` | Secret `<name>-api-key`, key `apiKey`; `spec.authentication.apiKeySecretRef` |
//! | `configuration."event.notification.enabled"` (`true`/`false` or `"true"`/`"false"`) | `spec.events.enabled` |
//! | `configuration."event.notification.callback.url"` | `spec.events.callbackUrl` |
//! | `configuration."event.notification.signature.key"` | Secret `<name>-events-key`, key `event.notification.signature.key`; `spec.events.signatureKeySecretRef` |
//!
//! Cloud Elements documents no apiKey body for Dropbox; its apiKey elements put
//! `"authentication.type": "apiKey"` in `configuration` next to the token, so the
//! token is accepted from the three places above (they must agree when several
//! are given). `spec.events` is written only when events are enabled or a
//! callback URL is given. `null` and `""` count as absent, as they do in the
//! instances Cloud Elements returns. Fields without an equivalent are reported
//! as warnings (by name only: a warning never contains a value).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::process::ExitCode;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Map, Value};

use crate::api::{
    ApiKeySecretRef, AppSecretRef, AuthenticationSpec, AuthenticationType, CodeSecretRef,
    DropboxElementInstance, DropboxElementInstanceSpec, ElementKey, ElementRef, EventFormat,
    EventsSpec, SignatureKeySecretRef,
};
use crate::cli::ImportArgs;
use crate::yaml;

/// Secret key of the OAuth client id (the Dropbox app key); also the seed's name.
pub const CLIENT_ID_KEY: &str = "oauth.api.key";
/// Secret key of the OAuth client secret (the Dropbox app secret).
pub const CLIENT_SECRET_KEY: &str = "oauth.api.secret";
/// Secret key of the authorization code.
pub const CODE_KEY: &str = "code";
/// Secret key of the long-lived access token (apiKey).
pub const API_KEY_KEY: &str = "apiKey";
/// Secret key of the event signature key; also the seed's name.
pub const SIGNATURE_KEY_KEY: &str = "event.notification.signature.key";

const CALLBACK_URL: &str = "oauth.callback.url";
const AUTH_TYPE: &str = "authentication.type";
const EVENTS_ENABLED: &str = "event.notification.enabled";
const EVENTS_CALLBACK_URL: &str = "event.notification.callback.url";
/// Where an apiKey instance's access token may be, in order of preference.
const API_KEY_CONFIG_KEYS: [&str; 2] = ["api.key", "oauth.user.token"];

/// Limits of the CRD schema, checked here so that `kubectl apply` does not refuse
/// the output.
const MAX_NAME: usize = 63;
const MAX_DISPLAY_NAME: usize = 253;
const MAX_TAGS: usize = 64;
const MAX_URL: usize = 2048;

/// Choices the instance JSON does not carry.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `metadata.name` of the instance; default: derived from the JSON's `name`.
    pub name: Option<String>,
    /// Namespace written into every manifest.
    pub namespace: Option<String>,
    /// `spec.events.format`, when the instance has events.
    pub events_format: EventFormat,
}

/// The result of an import: Secrets first (so the controller finds them when the
/// instance arrives), then the instance.
#[derive(Debug, Clone)]
pub struct Imported {
    pub secrets: Vec<Secret>,
    pub instance: DropboxElementInstance,
    /// Fields of the input that have no equivalent (names only, never values).
    pub warnings: Vec<String>,
}

/// Why an instance JSON cannot be imported. Messages name the field and never
/// contain a secret value.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid JSON at line {line} column {column}: {message}")]
    Json {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{field} is required{condition}")]
    Required { field: String, condition: String },
    #[error("{field} must be {expected}, got {got}")]
    Invalid {
        field: String,
        expected: String,
        got: String,
    },
    #[error("{first} and {second} disagree: {detail}")]
    Conflict {
        first: String,
        second: String,
        detail: String,
    },
    #[error(
        "cannot derive metadata.name from name {name:?}: it has no letter or digit; pass --name"
    )]
    NoUsableName { name: String },
    #[error("cannot render YAML: {0}")]
    Yaml(#[from] yaml::Error),
}

impl ImportError {
    /// The field of the instance JSON (or the flag) the error is about, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Required { field, .. } | Self::Invalid { field, .. } => Some(field),
            Self::Conflict { first, .. } => Some(first),
            Self::NoUsableName { .. } => Some("name"),
            Self::Read { .. } | Self::Json { .. } | Self::Yaml(_) => None,
        }
    }
}

/// `configuration."<key>"`, the way errors and warnings name a configuration key.
fn conf(key: &str) -> String {
    format!("configuration.{key:?}")
}

/// What a JSON value is, for "must be a string, got a number" (never the value:
/// it may be a secret).
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn invalid(field: impl Into<String>, expected: &str, got: impl Into<String>) -> ImportError {
    ImportError::Invalid {
        field: field.into(),
        expected: expected.into(),
        got: got.into(),
    }
}

fn required(field: impl Into<String>, condition: &str) -> ImportError {
    ImportError::Required {
        field: field.into(),
        condition: condition.into(),
    }
}

/// An optional object; `null` counts as absent.
fn object<'a>(
    v: Option<&'a Value>,
    field: &str,
) -> Result<Option<&'a Map<String, Value>>, ImportError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(other) => Err(invalid(field, "an object", kind(other))),
    }
}

/// An optional string; `null` and `""` count as absent.
fn string<'a>(v: Option<&'a Value>, field: &str) -> Result<Option<&'a str>, ImportError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(field, "a string", kind(other))),
    }
}

/// An optional URL that the CRD accepts: absolute http(s) with a host.
fn url(v: Option<&Value>, field: &str) -> Result<Option<String>, ImportError> {
    let Some(s) = string(v, field)? else {
        return Ok(None);
    };
    let s = s.trim();
    let expected = "an absolute http(s) URL";
    if s.len() > MAX_URL {
        return Err(invalid(
            field,
            expected,
            format!("{} characters (at most {MAX_URL})", s.len()),
        ));
    }
    match url::Url::parse(s) {
        Ok(u)
            if matches!(u.scheme(), "http" | "https")
                && u.host_str().is_some_and(|h| !h.is_empty()) =>
        {
            Ok(Some(s.to_owned()))
        }
        _ => Err(invalid(field, expected, format!("{s:?}"))),
    }
}

/// `event.notification.enabled`: a boolean, or the strings `"true"`/`"false"` that
/// Cloud Elements also accepts.
fn flag(v: Option<&Value>, field: &str) -> Result<Option<bool>, ImportError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) if s.trim().eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(Value::String(s)) if s.trim().eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(other) => {
            let got = match other {
                Value::String(s) => format!("{s:?}"),
                other => kind(other).to_owned(),
            };
            Err(invalid(
                field,
                r#"true or false (a boolean or the string "true"/"false")"#,
                got,
            ))
        }
    }
}

/// A DNS-1123 label: what `metadata.name` of an instance (and the namespace) must
/// be, so that `<name>-dropbox-token` and the other derived names stay valid too.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

const DNS_LABEL: &str = "a DNS-1123 label (at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit)";

/// `metadata.name` from a display name: lower-cased, every run of other characters
/// turned into one '-', trimmed, at most 63 characters.
pub fn derive_name(display: &str) -> Option<String> {
    let mut out = String::new();
    for c in display.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.truncate(MAX_NAME);
    let out = out.trim_end_matches('-');
    (!out.is_empty()).then(|| out.to_owned())
}

/// The parts of the instance JSON, and which keys were used (for the warnings).
struct Input<'a> {
    root: &'a Map<String, Value>,
    configuration: Option<&'a Map<String, Value>>,
    provider_data: Option<&'a Map<String, Value>>,
    used_configuration: BTreeSet<&'static str>,
    used_provider_data: BTreeSet<&'static str>,
}

impl<'a> Input<'a> {
    fn conf_string(&mut self, key: &'static str) -> Result<Option<&'a str>, ImportError> {
        self.used_configuration.insert(key);
        string(self.configuration.and_then(|c| c.get(key)), &conf(key))
    }

    fn conf_url(&mut self, key: &'static str) -> Result<Option<String>, ImportError> {
        self.used_configuration.insert(key);
        url(self.configuration.and_then(|c| c.get(key)), &conf(key))
    }

    fn provider_string(&mut self, key: &'static str) -> Result<Option<&'a str>, ImportError> {
        self.used_provider_data.insert(key);
        string(
            self.provider_data.and_then(|p| p.get(key)),
            &format!("providerData.{key}"),
        )
    }

    fn warnings(&self) -> Vec<String> {
        const TOP_LEVEL: [&str; 6] = [
            "element",
            "providerData",
            "configuration",
            "tags",
            "name",
            "authentication",
        ];
        fn ignored<'k>(what: &str, keys: impl Iterator<Item = &'k String>) -> Option<String> {
            let keys: Vec<&str> = keys.map(String::as_str).collect();
            (!keys.is_empty()).then(|| {
                format!(
                    "ignored {what} with no equivalent here: {}",
                    keys.join(", ")
                )
            })
        }
        let unused = |map: Option<&'a Map<String, Value>>, used: &BTreeSet<&str>| {
            map.into_iter()
                .flatten()
                .filter(|(k, v)| !used.contains(k.as_str()) && !is_empty(v))
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
        };
        [
            ignored(
                "fields",
                self.root
                    .keys()
                    .filter(|k| !TOP_LEVEL.contains(&k.as_str())),
            ),
            ignored(
                "configuration keys",
                unused(self.configuration, &self.used_configuration).into_iter(),
            ),
            ignored(
                "providerData keys",
                unused(self.provider_data, &self.used_provider_data).into_iter(),
            ),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

fn is_empty(v: &Value) -> bool {
    matches!(v, Value::Null) || v.as_str().is_some_and(str::is_empty)
}

fn parse_auth_type(s: &str, field: &str) -> Result<AuthenticationType, ImportError> {
    match s.trim() {
        t if t.eq_ignore_ascii_case("oauth2") => Ok(AuthenticationType::OAuth2),
        t if t.eq_ignore_ascii_case("apikey") => Ok(AuthenticationType::ApiKey),
        _ => Err(invalid(field, r#""oauth2" or "apiKey""#, format!("{s:?}"))),
    }
}

fn auth_type_name(t: AuthenticationType) -> &'static str {
    match t {
        AuthenticationType::OAuth2 => "oauth2",
        AuthenticationType::ApiKey => "apiKey",
    }
}

fn parse_json(text: &str) -> Result<Value, ImportError> {
    serde_json::from_str(text).map_err(|e| {
        let full = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        ImportError::Json {
            line: e.line(),
            column: e.column(),
            message: full.strip_suffix(&suffix).unwrap_or(&full).to_owned(),
        }
    })
}

fn secret(name: String, namespace: Option<&String>, data: BTreeMap<String, String>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: namespace.cloned(),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        string_data: Some(data),
        ..Secret::default()
    }
}

/// Converts an instance JSON into Secrets and a `DropboxElementInstance`.
pub fn convert(json: &str, options: &Options) -> Result<Imported, ImportError> {
    let value = parse_json(json)?;
    let root = match &value {
        Value::Object(root) => root,
        other => return Err(invalid("the instance JSON", "an object", kind(other))),
    };
    let mut input = Input {
        root,
        configuration: object(root.get("configuration"), "configuration")?,
        provider_data: object(root.get("providerData"), "providerData")?,
        used_configuration: BTreeSet::new(),
        used_provider_data: BTreeSet::new(),
    };

    // element.key
    let element = object(root.get("element"), "element")?;
    match string(element.and_then(|e| e.get("key")), "element.key")? {
        Some("dropbox") => {}
        Some(other) => return Err(invalid("element.key", r#""dropbox""#, format!("{other:?}"))),
        None => return Err(required("element.key", r#" (it must be "dropbox")"#)),
    }

    // name → spec.name and metadata.name
    let display_name = string(root.get("name"), "name")?;
    if let Some(n) = display_name
        && n.chars().count() > MAX_DISPLAY_NAME
    {
        return Err(invalid(
            "name",
            "at most 253 characters",
            format!("{} characters", n.chars().count()),
        ));
    }
    let name = match (&options.name, display_name) {
        (Some(name), _) if is_dns_label(name) => name.clone(),
        (Some(name), _) => return Err(invalid("--name", DNS_LABEL, format!("{name:?}"))),
        (None, Some(display)) => derive_name(display).ok_or_else(|| ImportError::NoUsableName {
            name: display.to_owned(),
        })?,
        (None, None) => {
            return Err(required(
                "name",
                " to derive metadata.name (or pass --name)",
            ));
        }
    };
    if let Some(ns) = &options.namespace
        && !is_dns_label(ns)
    {
        return Err(invalid("--namespace", DNS_LABEL, format!("{ns:?}")));
    }
    let namespace = options.namespace.as_ref();

    // tags
    let tags = match root.get("tags") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(vec![s.clone()]).filter(|_| !s.is_empty()),
        Some(Value::Array(items)) => {
            let mut tags = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                if let Some(tag) = string(Some(item), &format!("tags[{i}]"))? {
                    tags.push(tag.to_owned());
                }
            }
            if tags.len() > MAX_TAGS {
                return Err(invalid(
                    "tags",
                    "at most 64 tags",
                    format!("{}", tags.len()),
                ));
            }
            Some(tags).filter(|t| !t.is_empty())
        }
        Some(other) => return Err(invalid("tags", "an array of strings", kind(other))),
    };

    // authentication.type, in either place Cloud Elements puts it
    let top_level_auth = object(root.get("authentication"), "authentication")?;
    let top_level_type = string(
        top_level_auth.and_then(|a| a.get("type")),
        "authentication.type",
    )?
    .map(|s| parse_auth_type(s, "authentication.type"))
    .transpose()?;
    let conf_type = input
        .conf_string(AUTH_TYPE)?
        .map(|s| parse_auth_type(s, &conf(AUTH_TYPE)))
        .transpose()?;
    let auth_type = match (top_level_type, conf_type) {
        (Some(a), Some(b)) if a != b => {
            return Err(ImportError::Conflict {
                first: "authentication.type".into(),
                second: conf(AUTH_TYPE),
                detail: format!("{:?} vs {:?}", auth_type_name(a), auth_type_name(b)),
            });
        }
        (a, b) => a.or(b).unwrap_or(AuthenticationType::OAuth2),
    };

    let mut secrets = Vec::new();
    let authentication = match auth_type {
        AuthenticationType::OAuth2 => {
            let for_oauth2 = " for oauth2";
            let client_id = input
                .conf_string(CLIENT_ID_KEY)?
                .ok_or_else(|| required(conf(CLIENT_ID_KEY), for_oauth2))?;
            let client_secret = input
                .conf_string(CLIENT_SECRET_KEY)?
                .ok_or_else(|| required(conf(CLIENT_SECRET_KEY), for_oauth2))?;
            let code = input
                .provider_string("code")?
                .ok_or_else(|| required("providerData.code", for_oauth2))?;
            let callback_url = input
                .conf_url(CALLBACK_URL)?
                .ok_or_else(|| required(conf(CALLBACK_URL), for_oauth2))?;

            let app = format!("{name}-app");
            secrets.push(secret(
                app.clone(),
                namespace,
                BTreeMap::from([
                    (CLIENT_ID_KEY.to_owned(), client_id.to_owned()),
                    (CLIENT_SECRET_KEY.to_owned(), client_secret.to_owned()),
                ]),
            ));
            let code_secret = format!("{name}-code");
            secrets.push(secret(
                code_secret.clone(),
                namespace,
                BTreeMap::from([(CODE_KEY.to_owned(), code.to_owned())]),
            ));
            AuthenticationSpec {
                auth_type,
                app_secret_ref: Some(AppSecretRef {
                    name: app,
                    client_id_key: CLIENT_ID_KEY.into(),
                    client_secret_key: CLIENT_SECRET_KEY.into(),
                }),
                code_secret_ref: Some(CodeSecretRef {
                    name: code_secret,
                    key: CODE_KEY.into(),
                }),
                callback_url: Some(callback_url),
                api_key_secret_ref: None,
            }
        }
        AuthenticationType::ApiKey => {
            // Every place a token may be; several are fine when they agree.
            let mut found: Vec<(String, &str)> = Vec::new();
            for key in API_KEY_CONFIG_KEYS {
                if let Some(token) = input.conf_string(key)? {
                    found.push((conf(key), token));
                }
            }
            if let Some(token) = input.provider_string("apiKey")? {
                found.push(("providerData.apiKey".into(), token));
            }
            let Some((first, token)) = found.first() else {
                return Err(required(
                    conf(API_KEY_CONFIG_KEYS[0]),
                    r#" for apiKey (the Dropbox access token; configuration."oauth.user.token" or providerData.apiKey are accepted too)"#,
                ));
            };
            if let Some((second, _)) = found.iter().find(|(_, t)| t != token) {
                return Err(ImportError::Conflict {
                    first: first.clone(),
                    second: second.clone(),
                    detail: "they hold different access tokens; give the token once".into(),
                });
            }
            let api_key_secret = format!("{name}-api-key");
            secrets.push(secret(
                api_key_secret.clone(),
                namespace,
                BTreeMap::from([(API_KEY_KEY.to_owned(), (*token).to_owned())]),
            ));
            AuthenticationSpec {
                auth_type,
                app_secret_ref: None,
                code_secret_ref: None,
                callback_url: None,
                api_key_secret_ref: Some(ApiKeySecretRef {
                    name: api_key_secret,
                    key: API_KEY_KEY.into(),
                }),
            }
        }
    };

    // events
    input.used_configuration.insert(EVENTS_ENABLED);
    let enabled = flag(
        input.configuration.and_then(|c| c.get(EVENTS_ENABLED)),
        &conf(EVENTS_ENABLED),
    )?
    .unwrap_or(false);
    let events_callback = input.conf_url(EVENTS_CALLBACK_URL)?;
    let signature_key = input.conf_string(SIGNATURE_KEY_KEY)?;
    let mut warnings = Vec::new();
    let events = if enabled || events_callback.is_some() {
        if enabled && events_callback.is_none() {
            return Err(required(
                conf(EVENTS_CALLBACK_URL),
                &format!(" when {} is true", conf(EVENTS_ENABLED)),
            ));
        }
        let signature_key_secret_ref = signature_key.map(|key| {
            let events_key = format!("{name}-events-key");
            secrets.push(secret(
                events_key.clone(),
                namespace,
                BTreeMap::from([(SIGNATURE_KEY_KEY.to_owned(), key.to_owned())]),
            ));
            SignatureKeySecretRef {
                name: events_key,
                key: SIGNATURE_KEY_KEY.into(),
            }
        });
        Some(EventsSpec {
            enabled,
            callback_url: events_callback,
            signature_key_secret_ref,
            format: options.events_format,
            path: None,
            source: Default::default(),
        })
    } else {
        if signature_key.is_some() {
            warnings.push(format!(
                "ignored {}: events are not enabled and {} is not set",
                conf(SIGNATURE_KEY_KEY),
                conf(EVENTS_CALLBACK_URL)
            ));
        }
        None
    };

    let mut instance = DropboxElementInstance::new(
        &name,
        DropboxElementInstanceSpec {
            element: ElementRef {
                key: ElementKey::Dropbox,
            },
            name: display_name.map(str::to_owned),
            tags,
            authentication,
            events,
        },
    );
    instance.metadata.namespace = namespace.cloned();

    warnings.extend(input.warnings());
    Ok(Imported {
        secrets,
        instance,
        warnings,
    })
}

impl Imported {
    /// YAML documents separated by `---`, Secrets first, after a comment saying
    /// where they came from and that they hold secrets.
    pub fn to_yaml(&self) -> Result<String, ImportError> {
        let mut documents = Vec::with_capacity(self.secrets.len() + 1);
        for secret in &self.secrets {
            documents.push(yaml::Node::of(secret)?);
        }
        documents.push(yaml::Node::of(&self.instance)?);
        let mut out = String::from(concat!(
            "# Generated by `dropbox-operator import` ",
            env!("CARGO_PKG_VERSION"),
            " from a Cloud Elements instance JSON.\n",
            "# It contains secret values (the Secrets below): do not commit it unencrypted.\n",
        ));
        // kubectl reads YAML 1.1: quote what it would take for a boolean or number.
        out.push_str(&yaml::render(documents, yaml::Quote::Yaml11)?);
        Ok(out)
    }
}

/// Converts JSON text straight to the YAML that `import` prints.
pub fn import_to_yaml(json: &str, options: &Options) -> Result<(String, Vec<String>), ImportError> {
    let imported = convert(json, options)?;
    Ok((imported.to_yaml()?, imported.warnings))
}

fn read_input(path: &str) -> Result<String, ImportError> {
    let read = |path: &str, source| ImportError::Read {
        path: path.to_owned(),
        source,
    };
    if path == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| read("standard input", e))?;
        Ok(text)
    } else {
        std::fs::read_to_string(path).map_err(|e| read(path, e))
    }
}

/// The `import` subcommand: YAML on stdout; warnings and errors on stderr, and a
/// non-zero exit code on error (nothing is printed to stdout then).
pub fn run(args: &ImportArgs) -> ExitCode {
    let options = Options {
        name: args.name.clone(),
        namespace: args.namespace.clone(),
        events_format: args.events_format,
    };
    let result = read_input(&args.path).and_then(|json| import_to_yaml(&json, &options));
    match result {
        Ok((yaml, warnings)) => {
            for warning in warnings {
                eprintln!("warning: {warning}");
            }
            let mut stdout = std::io::stdout().lock();
            match stdout
                .write_all(yaml.as_bytes())
                .and_then(|()| stdout.flush())
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: cannot write the manifests: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CLIENT_ID: &str = "k3xq9v2mz8w1p0a";
    const CLIENT_SECRET: &str = "s7hd02kx9q4lm3z";
    const CODE: &str = "q1T9f0x_AAAAAAAAAAAJr8ZyN4mVc2Hs7kQ1pLwXbE";
    const SIGNING_KEY: &str = "wh-sign-8f1c2d7e";

    /// The documented Cloud Elements example with real-looking values.
    fn seed() -> Value {
        json!({
            "element": {"key": "dropbox"},
            "providerData": {"code": CODE},
            "configuration": {
                "oauth.api.key": CLIENT_ID,
                "oauth.api.secret": CLIENT_SECRET,
                "oauth.callback.url": "https://www.mycoolapp.com/auth",
                "event.notification.enabled": true,
                "event.notification.callback.url": "https://app.example.com/dropbox-events",
                "event.notification.signature.key": SIGNING_KEY
            },
            "tags": ["marketing", "prod"],
            "name": "Marketing Dropbox"
        })
    }

    fn import(v: &Value) -> Result<Imported, ImportError> {
        convert(&v.to_string(), &Options::default())
    }

    fn err(v: &Value) -> ImportError {
        import(v).expect_err("import should fail")
    }

    fn data(secret: &Secret) -> &BTreeMap<String, String> {
        secret.string_data.as_ref().expect("stringData")
    }

    fn secret_named<'a>(imported: &'a Imported, name: &str) -> &'a Secret {
        imported
            .secrets
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no Secret {name} in {:?}", imported.secrets))
    }

    #[test]
    fn every_seed_parameter_is_mapped() {
        let imported = import(&seed()).expect("import");
        let instance = &imported.instance;
        assert_eq!(instance.metadata.name.as_deref(), Some("marketing-dropbox"));
        let spec = &instance.spec;
        assert_eq!(spec.element.key, ElementKey::Dropbox);
        assert_eq!(spec.name.as_deref(), Some("Marketing Dropbox"));
        assert_eq!(spec.tags, Some(vec!["marketing".into(), "prod".into()]));

        let auth = &spec.authentication;
        assert_eq!(auth.auth_type, AuthenticationType::OAuth2);
        assert_eq!(
            auth.callback_url.as_deref(),
            Some("https://www.mycoolapp.com/auth")
        );
        assert_eq!(
            auth.app_secret_ref,
            Some(AppSecretRef {
                name: "marketing-dropbox-app".into(),
                client_id_key: "oauth.api.key".into(),
                client_secret_key: "oauth.api.secret".into(),
            })
        );
        assert_eq!(
            auth.code_secret_ref,
            Some(CodeSecretRef {
                name: "marketing-dropbox-code".into(),
                key: "code".into()
            })
        );
        assert_eq!(auth.api_key_secret_ref, None);

        let events = spec.events.as_ref().expect("events");
        assert!(events.enabled);
        assert_eq!(
            events.callback_url.as_deref(),
            Some("https://app.example.com/dropbox-events")
        );
        assert_eq!(events.format, EventFormat::Elements);
        assert_eq!(
            events.signature_key_secret_ref,
            Some(SignatureKeySecretRef {
                name: "marketing-dropbox-events-key".into(),
                key: "event.notification.signature.key".into(),
            })
        );

        assert_eq!(imported.secrets.len(), 3);
        for s in &imported.secrets {
            assert_eq!(s.type_.as_deref(), Some("Opaque"));
            assert_eq!(s.data, None, "values go to stringData");
        }
        let app = data(secret_named(&imported, "marketing-dropbox-app"));
        assert_eq!(
            app.get("oauth.api.key").map(String::as_str),
            Some(CLIENT_ID)
        );
        assert_eq!(
            app.get("oauth.api.secret").map(String::as_str),
            Some(CLIENT_SECRET)
        );
        assert_eq!(app.len(), 2);
        let code = data(secret_named(&imported, "marketing-dropbox-code"));
        assert_eq!(
            code,
            &BTreeMap::from([("code".to_owned(), CODE.to_owned())])
        );
        let key = data(secret_named(&imported, "marketing-dropbox-events-key"));
        assert_eq!(
            key,
            &BTreeMap::from([(
                "event.notification.signature.key".to_owned(),
                SIGNING_KEY.to_owned()
            )])
        );
        assert!(imported.warnings.is_empty(), "{:?}", imported.warnings);
    }

    #[test]
    fn no_secret_value_reaches_the_custom_resource() {
        let imported = import(&seed()).expect("import");
        let cr = serde_json::to_string(&imported.instance).expect("CR as JSON");
        for value in [CLIENT_ID, CLIENT_SECRET, CODE, SIGNING_KEY] {
            assert!(!cr.contains(value), "{value} leaked into the CR: {cr}");
        }
    }

    #[test]
    fn yaml_has_a_warning_comment_and_secrets_before_the_instance() {
        let imported = import(&seed()).expect("import");
        let yaml = imported.to_yaml().expect("yaml");
        assert!(
            yaml.starts_with("# Generated by `dropbox-operator import`"),
            "{yaml}"
        );
        assert!(
            yaml.lines()
                .take(2)
                .any(|l| l.starts_with('#') && l.contains("secret"))
        );
        let kinds: Vec<String> = serde_saphyr::from_multiple::<Value>(&yaml)
            .expect("documents")
            .iter()
            .map(|v| v["kind"].as_str().expect("kind").to_owned())
            .collect();
        assert_eq!(
            kinds,
            ["Secret", "Secret", "Secret", "DropboxElementInstance"]
        );
    }

    #[test]
    fn enabled_may_be_a_string() {
        for (value, expected) in [
            (json!("true"), true),
            (json!("false"), false),
            (json!("TRUE"), true),
        ] {
            let mut v = seed();
            v["configuration"]["event.notification.enabled"] = value;
            let events = import(&v)
                .expect("import")
                .instance
                .spec
                .events
                .expect("events");
            assert_eq!(events.enabled, expected);
        }
        let mut v = seed();
        v["configuration"]["event.notification.enabled"] = json!("yes");
        let e = err(&v);
        assert_eq!(
            e.field(),
            Some(r#"configuration."event.notification.enabled""#)
        );
        assert!(e.to_string().contains(r#"got "yes""#), "{e}");
    }

    #[test]
    fn events_are_written_only_when_enabled_or_given_a_callback() {
        // Neither: no events block, no signature-key Secret.
        let mut v = seed();
        let c = v["configuration"].as_object_mut().expect("configuration");
        c.remove("event.notification.enabled");
        c.remove("event.notification.callback.url");
        let imported = import(&v).expect("import");
        assert_eq!(imported.instance.spec.events, None);
        assert_eq!(imported.secrets.len(), 2);
        assert!(
            imported
                .warnings
                .iter()
                .any(|w| w.contains("event.notification.signature.key"))
        );
        assert!(!imported.warnings.iter().any(|w| w.contains(SIGNING_KEY)));

        // A callback without "enabled": kept, disabled.
        let mut v = seed();
        v["configuration"]["event.notification.enabled"] = json!(false);
        let events = import(&v)
            .expect("import")
            .instance
            .spec
            .events
            .expect("events");
        assert!(!events.enabled);
        assert_eq!(
            events.callback_url.as_deref(),
            Some("https://app.example.com/dropbox-events")
        );

        // Enabled without a callback: refused, like the CRD would.
        let mut v = seed();
        v["configuration"]["event.notification.callback.url"] = Value::Null;
        let e = err(&v);
        assert_eq!(
            e.field(),
            Some(r#"configuration."event.notification.callback.url""#)
        );
        assert!(e.to_string().contains("is required when"), "{e}");

        // No signature key: events without a signature Secret.
        let mut v = seed();
        v["configuration"]
            .as_object_mut()
            .expect("configuration")
            .remove("event.notification.signature.key");
        let imported = import(&v).expect("import");
        assert_eq!(
            imported
                .instance
                .spec
                .events
                .expect("events")
                .signature_key_secret_ref,
            None
        );
        assert_eq!(imported.secrets.len(), 2);
    }

    #[test]
    fn events_format_comes_from_the_options() {
        let options = Options {
            events_format: EventFormat::CloudEvents,
            ..Options::default()
        };
        let imported = convert(&seed().to_string(), &options).expect("import");
        assert_eq!(
            imported.instance.spec.events.expect("events").format,
            EventFormat::CloudEvents
        );
    }

    fn api_key_instance(token_place: &str) -> Value {
        let mut v = json!({
            "element": {"key": "dropbox"},
            "configuration": {"authentication.type": "apiKey"},
            "name": "Ops token"
        });
        match token_place {
            "providerData.apiKey" => v["providerData"] = json!({"apiKey": "sl.long-lived-token"}),
            key => v["configuration"][key] = json!("sl.long-lived-token"),
        }
        v
    }

    #[test]
    fn api_key_instances_keep_the_token_in_a_secret() {
        for place in ["api.key", "oauth.user.token", "providerData.apiKey"] {
            let imported =
                import(&api_key_instance(place)).unwrap_or_else(|e| panic!("{place}: {e}"));
            let auth = &imported.instance.spec.authentication;
            assert_eq!(auth.auth_type, AuthenticationType::ApiKey);
            assert_eq!(
                auth.api_key_secret_ref,
                Some(ApiKeySecretRef {
                    name: "ops-token-api-key".into(),
                    key: "apiKey".into()
                })
            );
            assert_eq!(
                (auth.app_secret_ref.as_ref(), auth.code_secret_ref.as_ref()),
                (None, None)
            );
            assert_eq!(auth.callback_url, None);
            assert_eq!(imported.secrets.len(), 1);
            assert_eq!(
                data(&imported.secrets[0]),
                &BTreeMap::from([("apiKey".to_owned(), "sl.long-lived-token".to_owned())])
            );
            assert!(
                imported.warnings.is_empty(),
                "{place}: {:?}",
                imported.warnings
            );
        }
    }

    #[test]
    fn authentication_type_may_be_top_level() {
        let mut v = api_key_instance("api.key");
        v["configuration"]
            .as_object_mut()
            .expect("configuration")
            .remove("authentication.type");
        v["authentication"] = json!({"type": "apiKey"});
        let imported = import(&v).expect("import");
        assert_eq!(
            imported.instance.spec.authentication.auth_type,
            AuthenticationType::ApiKey
        );

        // Both places, disagreeing.
        v["configuration"]["authentication.type"] = json!("oauth2");
        let e = err(&v);
        assert_eq!(e.field(), Some("authentication.type"));
        assert!(
            e.to_string()
                .contains(r#"configuration."authentication.type""#),
            "{e}"
        );

        // Unknown type.
        let mut v = seed();
        v["configuration"]["authentication.type"] = json!("basic");
        let e = err(&v);
        assert_eq!(
            e.to_string(),
            r#"configuration."authentication.type" must be "oauth2" or "apiKey", got "basic""#
        );
    }

    #[test]
    fn api_key_tokens_must_agree() {
        let mut v = api_key_instance("api.key");
        v["providerData"] = json!({"apiKey": "another-token"});
        let e = err(&v);
        assert_eq!(e.field(), Some(r#"configuration."api.key""#));
        assert!(e.to_string().contains("providerData.apiKey"), "{e}");
        assert!(!e.to_string().contains("token\""), "no value in {e}");

        let v = json!({"element": {"key": "dropbox"}, "authentication": {"type": "apiKey"}, "name": "x"});
        let e = err(&v);
        assert_eq!(e.field(), Some(r#"configuration."api.key""#));
        assert!(e.to_string().contains("required for apiKey"), "{e}");
    }

    #[test]
    fn oauth2_credentials_are_required() {
        for (remove, field) in [
            ("oauth.api.key", r#"configuration."oauth.api.key""#),
            ("oauth.api.secret", r#"configuration."oauth.api.secret""#),
            (
                "oauth.callback.url",
                r#"configuration."oauth.callback.url""#,
            ),
        ] {
            let mut v = seed();
            v["configuration"]
                .as_object_mut()
                .expect("configuration")
                .remove(remove);
            let e = err(&v);
            assert_eq!(e.field(), Some(field));
            assert_eq!(e.to_string(), format!("{field} is required for oauth2"));
        }
        let mut v = seed();
        v.as_object_mut().expect("root").remove("providerData");
        assert_eq!(
            err(&v).to_string(),
            "providerData.code is required for oauth2"
        );
        // An empty string is as good as missing.
        let mut v = seed();
        v["configuration"]["oauth.api.secret"] = json!("");
        assert_eq!(err(&v).field(), Some(r#"configuration."oauth.api.secret""#));
    }

    #[test]
    fn type_errors_name_the_field_but_not_the_value() {
        let mut v = seed();
        v["configuration"]["oauth.api.secret"] = json!(987654321);
        let e = err(&v);
        assert_eq!(
            e.to_string(),
            r#"configuration."oauth.api.secret" must be a string, got a number"#
        );

        let mut v = seed();
        v["tags"] = json!(["ok", 3]);
        assert_eq!(
            err(&v).to_string(),
            "tags[1] must be a string, got a number"
        );

        let mut v = seed();
        v["configuration"] = json!([]);
        assert_eq!(
            err(&v).to_string(),
            "configuration must be an object, got an array"
        );

        assert_eq!(
            convert("[1]", &Options::default())
                .expect_err("array")
                .to_string(),
            "the instance JSON must be an object, got an array"
        );
    }

    #[test]
    fn element_key_must_be_dropbox() {
        let mut v = seed();
        v["element"]["key"] = json!("box");
        assert_eq!(
            err(&v).to_string(),
            r#"element.key must be "dropbox", got "box""#
        );
        v.as_object_mut().expect("root").remove("element");
        assert_eq!(err(&v).field(), Some("element.key"));
    }

    #[test]
    fn urls_must_be_absolute_http() {
        let mut v = seed();
        v["configuration"]["event.notification.callback.url"] =
            json!("<INSERT_YOUR_APPS_CALLBACK_URL>");
        let e = err(&v);
        assert_eq!(
            e.to_string(),
            r#"configuration."event.notification.callback.url" must be an absolute http(s) URL, got "<INSERT_YOUR_APPS_CALLBACK_URL>""#
        );
        let mut v = seed();
        v["configuration"]["oauth.callback.url"] = json!("ftp://example.com/auth");
        assert_eq!(
            err(&v).field(),
            Some(r#"configuration."oauth.callback.url""#)
        );
    }

    #[test]
    fn invalid_json_says_where() {
        let e = convert(
            "{\n  \"element\": {\"key\": \"dropbox\"},\n    oops\n}",
            &Options::default(),
        )
        .expect_err("bad JSON");
        assert!(
            matches!(
                e,
                ImportError::Json {
                    line: 3,
                    column: 5,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with("invalid JSON at line 3 column 5: "),
            "{e}"
        );
        assert!(
            !e.to_string().ends_with("column 5"),
            "position said twice: {e}"
        );
    }

    #[test]
    fn names_are_derived_or_given() {
        assert_eq!(
            derive_name("Marketing Dropbox").as_deref(),
            Some("marketing-dropbox")
        );
        assert_eq!(
            derive_name("  ACME: Café / Prod #2!! ").as_deref(),
            Some("acme-caf-prod-2")
        );
        assert_eq!(derive_name("a.b_c").as_deref(), Some("a-b-c"));
        assert_eq!(derive_name("!!!"), None);
        let long = derive_name(&"x".repeat(100)).expect("name");
        assert_eq!(long.len(), 63);
        let cut = derive_name(&format!("{} tail", "y".repeat(62))).expect("name");
        assert_eq!(cut, "y".repeat(62), "no trailing '-' after truncation");

        let mut v = seed();
        v["name"] = json!("???");
        let e = err(&v);
        assert_eq!(e.field(), Some("name"));
        assert!(e.to_string().contains("--name"), "{e}");

        v.as_object_mut().expect("root").remove("name");
        let e = err(&v);
        assert_eq!(
            e.to_string(),
            "name is required to derive metadata.name (or pass --name)"
        );

        let options = Options {
            name: Some("team-files".into()),
            namespace: Some("apps".into()),
            ..Options::default()
        };
        let imported = convert(&v.to_string(), &options).expect("import with --name");
        assert_eq!(
            imported.instance.metadata.name.as_deref(),
            Some("team-files")
        );
        assert_eq!(imported.instance.spec.name, None);
        assert_eq!(
            imported.instance.metadata.namespace.as_deref(),
            Some("apps")
        );
        for s in &imported.secrets {
            assert_eq!(s.metadata.namespace.as_deref(), Some("apps"));
            assert!(
                s.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("team-files-"))
            );
        }

        let bad = Options {
            name: Some("Team Files".into()),
            ..Options::default()
        };
        assert_eq!(
            convert(&seed().to_string(), &bad)
                .expect_err("bad --name")
                .field(),
            Some("--name")
        );
        let bad = Options {
            namespace: Some("-apps".into()),
            ..Options::default()
        };
        assert_eq!(
            convert(&seed().to_string(), &bad)
                .expect_err("bad --namespace")
                .field(),
            Some("--namespace")
        );
    }

    #[test]
    fn tags_may_be_one_string() {
        let mut v = seed();
        v["tags"] = json!("finance");
        assert_eq!(
            import(&v).expect("import").instance.spec.tags,
            Some(vec!["finance".to_owned()])
        );
        v["tags"] = json!([]);
        assert_eq!(import(&v).expect("import").instance.spec.tags, None);
        v["tags"] = json!(vec!["t"; 65]);
        assert_eq!(err(&v).field(), Some("tags"));
    }

    #[test]
    fn unknown_fields_are_reported_by_name_only() {
        let mut v = seed();
        v["id"] = json!(12345);
        v["configuration"]["oauth.user.token"] = json!("leftover-token-value");
        v["configuration"]["filter.response.nulls"] = json!(true);
        v["configuration"]["base.url"] = Value::Null;
        let imported = import(&v).expect("import");
        assert_eq!(
            imported.warnings,
            [
                "ignored fields with no equivalent here: id",
                "ignored configuration keys with no equivalent here: filter.response.nulls, oauth.user.token",
            ]
        );
        assert_eq!(imported.secrets.len(), 3, "the stray token is not imported");
    }

    #[test]
    fn the_import_command_line_parses_and_has_env_twins() {
        use crate::cli::{Cli, Command};
        use clap::{CommandFactory, Parser};
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "dropbox-operator",
            "import",
            "-",
            "--name",
            "team",
            "--namespace",
            "apps",
            "--events-format",
            "cloudevents",
        ])
        .expect("parse");
        let Command::Import(args) = cli.command else {
            panic!("not the import command: {:?}", cli.command);
        };
        assert_eq!(args.path, "-");
        assert_eq!(args.name.as_deref(), Some("team"));
        assert_eq!(args.namespace.as_deref(), Some("apps"));
        assert_eq!(args.events_format, EventFormat::CloudEvents);
        let defaults =
            Cli::try_parse_from(["dropbox-operator", "import", "x.json"]).expect("parse");
        let Command::Import(args) = defaults.command else {
            panic!("not the import command");
        };
        assert_eq!(args.events_format, EventFormat::Elements);
        assert!(
            Cli::try_parse_from([
                "dropbox-operator",
                "import",
                "x.json",
                "--events-format",
                "xml"
            ])
            .is_err()
        );

        let cmd = Cli::command();
        let import = cmd.find_subcommand("import").expect("import subcommand");
        for arg in import.get_arguments().filter(|a| !a.is_positional()) {
            let id = arg.get_id().as_str();
            if !matches!(id, "help" | "version" | "log_format" | "log_level") {
                assert!(
                    arg.get_env().is_some(),
                    "--{id} has no environment variable"
                );
            }
        }
    }

    #[test]
    fn strings_yaml_1_1_would_misread_are_quoted() {
        let tricky = [
            "yes",
            "on",
            "N",
            "1_000",
            "0b101",
            "0x1F",
            "2001-12-14",
            "-1",
            ".inf",
            "it's",
            "1'2",
        ];
        let mut v = seed();
        v["tags"] = json!(tricky);
        v["configuration"]["event.notification.signature.key"] = json!("off");
        v["providerData"]["code"] = json!("0123'x");
        let yaml = import(&v).expect("import").to_yaml().expect("yaml");
        for t in [
            "'yes'",
            "'on'",
            "'N'",
            "'1_000'",
            "'0b101'",
            "'0x1F'",
            "'2001-12-14'",
            "'-1'",
            "'.inf'",
            "'1''2'",
        ] {
            assert!(
                yaml.contains(&format!("- {t}\n")),
                "{t} not quoted in:\n{yaml}"
            );
        }
        assert!(
            yaml.contains("event.notification.signature.key: 'off'\n"),
            "{yaml}"
        );
        assert!(yaml.contains("code: '0123''x'\n"), "{yaml}");
        assert!(!yaml.contains("dropbox-operator-quoted-"), "{yaml}");
        // And YAML 1.2 reads the same strings back.
        let docs: Vec<Value> = serde_saphyr::from_multiple(&yaml).expect("documents");
        let tags: Vec<&str> = docs[3]["spec"]["tags"]
            .as_array()
            .expect("tags")
            .iter()
            .map(|t| t.as_str().expect("string tag"))
            .collect();
        assert_eq!(tags, tricky);
        assert_eq!(docs[1]["stringData"]["code"].as_str(), Some("0123'x"));
    }
}
