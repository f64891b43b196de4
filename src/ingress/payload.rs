//! What the ingress sends to a callback (docs/user-guide.md, "Events"):
//! Dropbox `files/list_folder/continue` entries become standardized events,
//! the events are cut into notifications of at most
//! [`MAX_EVENTS_PER_NOTIFICATION`], each notification gets a JSON body
//! (Elements or CloudEvents format) and signature headers.
//!
//! Everything here is pure: no I/O and no clock. Callers pass the times in, so
//! the same sync produces the same event ids after a crash and tests are exact.
//!
//! # Verifying a delivery (for receivers)
//!
//! With a signature key set, every request carries two equivalent signatures,
//! both HMAC-SHA256 with the key bytes used directly as the HMAC key:
//!
//! - `Elements-Webhook-Signature: sha256=<base64 HMAC(key, raw body)>`
//!   (see [`verify_elements_signature`]);
//! - the Standard Webhooks trio `webhook-id`, `webhook-timestamp` and
//!   `webhook-signature: v1,<base64 HMAC(key, "<id>.<timestamp>.<raw body>")>`
//!   (see [`verify_standard_webhooks`]). Also check that `webhook-timestamp`
//!   is close to your clock (the spec suggests 5 minutes) to refuse replays.
//!
//! `Elements-Webhook-Id` (equal to `webhook-id`) stays the same when a
//! notification is redelivered: use it to drop duplicates.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use jiff::Timestamp;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// docs/user-guide.md, "Events": "at most 20 events per request".
pub const MAX_EVENTS_PER_NOTIFICATION: usize = 20;

/// The header Dropbox signs its webhook notifications with.
pub const DROPBOX_SIGNATURE_HEADER: &str = "x-dropbox-signature";

/// `message.elementKey` of every notification (the CR's `spec.element.key`).
pub const ELEMENT_KEY: &str = "dropbox";

/// CloudEvents `type` of every notification. Reverse-DNS of the API group
/// `elements.dropbox-operator.dev`, then element and kind, as the CloudEvents
/// spec recommends; one type because a notification batches mixed events.
pub const CLOUDEVENTS_TYPE: &str = "dev.dropbox-operator.elements.dropbox.events";

/// Wire format of a notification body (`spec.events.format` of the CR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The Cloud Elements `{"message": {...}}` body.
    Elements,
    /// A CloudEvents 1.0 structured-mode JSON whose `data` is the Elements body.
    CloudEvents,
}

impl Format {
    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Elements => "application/json",
            Format::CloudEvents => "application/cloudevents+json",
        }
    }
}

/// Identity of the instance the events belong to.
#[derive(Clone, Debug)]
pub struct InstanceInfo {
    /// `metadata.uid`: unlike namespace/name, never reused by a re-created instance.
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// `spec.name`, or `metadata.name` when unset.
    pub display_name: String,
    pub tags: Vec<String>,
    /// `status.account.accountId` (`dbid:...`).
    pub account_id: String,
}

/// One standardized event.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StandardEvent {
    /// Names this event's content (see [`standardize`]); the same change
    /// delivered again carries the same id.
    pub event_id: String,
    /// `UPDATED`, `DELETED` or `UNKNOWN`.
    pub event_type: String,
    /// `files` or `folders`.
    pub object_type: String,
    pub object_id: String,
    /// RFC 3339.
    pub event_date: String,
    /// The Dropbox entry, unchanged.
    pub data: Value,
}

/// Where a page of changes was listed from: the instance, the committed cursor
/// and when that cursor was committed. Everything a page's events contain is
/// a function of this and of Dropbox's answer, so whichever replica lists the
/// same page, before or after a crash, builds the same events.
#[derive(Clone, Copy, Debug)]
pub struct PageOrigin<'a> {
    pub instance_uid: &'a str,
    pub cursor: &'a str,
    pub committed_at: Timestamp,
}

/// Turns `list_folder/continue` entries into events, in order.
///
/// `file` and `folder` entries are `UPDATED` (objectType `files` / `folders`);
/// `deleted` entries are `DELETED` with objectType `files`, because Dropbox's
/// DeletedMetadata does not say whether a file or a folder went away.
/// objectId is the entry's `id`, or its `path_lower` when it has none (deleted
/// entries never do). eventDate is `server_modified` when present (files),
/// else the time the cursor the page was listed from was committed (Dropbox
/// gives no time for folders and deletions; this one is the same for everyone
/// who lists that page). Entries with an unknown or missing `.tag` are skipped.
///
/// eventId: a UUIDv8 from SHA-256 over the instance uid and the event. A file
/// entry names one version (`rev`), so its id depends on nothing else: a change
/// listed twice, from any cursor, has one id. Folders and deletions have no
/// version, so their id also covers the cursor the page was listed from: one
/// deletion listed from two cursors gets two ids (deleting twice is harmless),
/// and two deletions of one path never share an id.
pub fn standardize(entries: &[Value], origin: &PageOrigin) -> Vec<StandardEvent> {
    entries
        .iter()
        .filter_map(|entry| standardize_entry(entry, origin))
        .collect()
}

fn standardize_entry(entry: &Value, origin: &PageOrigin) -> Option<StandardEvent> {
    let tag = entry.get(".tag").and_then(Value::as_str);
    let (event_type, object_type) = match tag {
        Some("file") => ("UPDATED", "files"),
        Some("folder") => ("UPDATED", "folders"),
        Some("deleted") => ("DELETED", "files"),
        // A kind Dropbox adds later: skipping beats sending an event whose
        // meaning we would have to guess.
        _ => {
            tracing::debug!(?tag, "skipping Dropbox entry of unknown kind");
            return None;
        }
    };
    let text = |key: &str| entry.get(key).and_then(Value::as_str);
    let object_id = text("id")
        .or_else(|| text("path_lower"))
        .unwrap_or_default();
    // Dropbox already sends RFC 3339 ("2015-05-12T15:50:38Z"); parsing it
    // keeps that promise even if a value ever comes malformed.
    let server_date = text("server_modified").and_then(|date| date.parse::<Timestamp>().ok());
    let versioned = server_date.is_some() && text("rev").is_some();
    let mut event = StandardEvent {
        event_id: String::new(),
        event_type: event_type.to_owned(),
        object_type: object_type.to_owned(),
        object_id: object_id.to_owned(),
        event_date: server_date.unwrap_or(origin.committed_at).to_string(),
        data: entry.clone(),
    };
    event.event_id = event_id(origin, &event, !versioned);
    Some(event)
}

/// The single event sent after Dropbox answered `reset` and the cursor was
/// re-baselined: changes since the last delivery may be missing, so the
/// receiver has to re-read what it cares about.
pub fn reset_event(origin: &PageOrigin) -> StandardEvent {
    let mut event = StandardEvent {
        event_id: String::new(),
        event_type: "UNKNOWN".to_owned(),
        object_type: "files".to_owned(),
        object_id: String::new(),
        event_date: origin.committed_at.to_string(),
        data: json!({
            "reason": "reset",
            "message": "Dropbox reset the change cursor; changes made before this event \
                        may not have been reported. Re-read the folders you track.",
        }),
    };
    event.event_id = event_id(origin, &event, true);
    event
}

/// SHA-256 over length-prefixed fields, as a UUIDv8 (RFC 9562 §5.8, the
/// version for custom, e.g. hash-based, layouts). It reveals nothing of its
/// inputs (a cursor is a credential-like handle to the account's changes) and
/// contains no `.`, which the Standard Webhooks spec requires of a message id
/// because `.` separates the signed fields.
fn hashed_uuid(label: &[u8], fields: &[&[u8]]) -> String {
    // The label versions the scheme; length prefixes keep ("ab", "c") and
    // ("a", "bc") apart.
    let mut hash = Sha256::new();
    hash.update(label);
    for field in fields {
        hash.update((field.len() as u64).to_be_bytes());
        hash.update(field);
    }
    let digest = hash.finalize();
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&digest[..16]);
    uuid[6] = (uuid[6] & 0x0f) | 0x80; // version 8
    uuid[8] = (uuid[8] & 0x3f) | 0x80; // RFC 9562 variant (0b10)
    let hex = hex::encode(uuid);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// An event's id: its content (serialized with sorted keys) and the instance,
/// plus the cursor the page came from when the event names no version.
fn event_id(origin: &PageOrigin, event: &StandardEvent, with_cursor: bool) -> String {
    let content = serde_json::to_vec(event).unwrap_or_default();
    let cursor = if with_cursor {
        origin.cursor.as_bytes()
    } else {
        b""
    };
    hashed_uuid(
        b"dropbox-operator event v2",
        &[origin.instance_uid.as_bytes(), &content, cursor],
    )
}

/// A notification's id (`message.eventId`, `Elements-Webhook-Id`, `webhook-id`,
/// CloudEvents `id`): everything its body says, i.e. the instance as shown, the
/// format, `raw` and its events' ids. Same id, same body; another body, another id.
pub fn notification_id(
    instance: &InstanceInfo,
    format: Format,
    raw: &Value,
    events: &[StandardEvent],
) -> String {
    let raw = raw.to_string();
    let tags = instance.tags.join("\n");
    let mut fields: Vec<&[u8]> = vec![
        instance.uid.as_bytes(),
        instance.namespace.as_bytes(),
        instance.name.as_bytes(),
        instance.display_name.as_bytes(),
        tags.as_bytes(),
        instance.account_id.as_bytes(),
        format.content_type().as_bytes(),
        raw.as_bytes(),
    ];
    fields.extend(events.iter().map(|e| e.event_id.as_bytes()));
    hashed_uuid(b"dropbox-operator notification v2", &fields)
}

/// A ready-to-send notification.
#[derive(Clone, Debug)]
pub struct Notification {
    /// `message.eventId`, the CloudEvents `id`, and the webhook id headers.
    pub event_id: String,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub event_count: usize,
}

/// Cuts `events` into notifications of at most [`MAX_EVENTS_PER_NOTIFICATION`],
/// in order, and builds each body. No events give no notifications.
///
/// Elements format (`application/json`):
/// `{"message": {"eventId", "elementKey": "dropbox", "instanceId":
/// "<namespace>/<name>", "instanceName", "instanceTags", "accountId",
/// "events": [...], "raw": <the Dropbox webhook body>}}`.
///
/// CloudEvents format (`application/cloudevents+json`): one structured-mode
/// CloudEvents 1.0 object, built and serialized by the official
/// `cloudevents-sdk`, with `specversion` "1.0", `id` = eventId, `source` = the
/// instance's API path, `type` = [`CLOUDEVENTS_TYPE`], `subject` = accountId,
/// `time` = the latest eventDate of its events in whole milliseconds,
/// `datacontenttype` "application/json" and `data` = the Elements body above,
/// so one parser serves both formats.
///
/// Every notification's id is [`notification_id`] of its events; nothing in a
/// body depends on when it is sent.
pub fn notifications(
    instance: &InstanceInfo,
    events: &[StandardEvent],
    raw: &Value,
    format: Format,
) -> Vec<Notification> {
    events
        .chunks(MAX_EVENTS_PER_NOTIFICATION)
        .map(|batch| {
            let id = notification_id(instance, format, raw, batch);
            let message = elements_body(instance, &id, batch, raw);
            // Compact JSON; signatures are computed over exactly these bytes.
            let body = match format {
                Format::Elements => message.to_string().into_bytes(),
                Format::CloudEvents => {
                    let time = batch
                        .iter()
                        .filter_map(|e| e.event_date.parse::<Timestamp>().ok())
                        .max()
                        .unwrap_or(Timestamp::UNIX_EPOCH);
                    cloud_event(instance, &id, time, message)
                }
            };
            Notification {
                event_id: id,
                content_type: format.content_type(),
                body,
                event_count: batch.len(),
            }
        })
        .collect()
}

fn elements_body(
    instance: &InstanceInfo,
    id: &str,
    events: &[StandardEvent],
    raw: &Value,
) -> Value {
    json!({
        "message": {
            "eventId": id,
            "elementKey": ELEMENT_KEY,
            "instanceId": format!("{}/{}", instance.namespace, instance.name),
            "instanceName": instance.display_name,
            "instanceTags": instance.tags,
            "accountId": instance.account_id,
            "events": events,
            "raw": raw,
        }
    })
}

/// The CloudEvents document, built and serialized by the official SDK
/// (`cloudevents-sdk`): the bytes it writes are the bytes signed and sent.
fn cloud_event(instance: &InstanceInfo, id: &str, time: Timestamp, data: Value) -> Vec<u8> {
    use cloudevents::{EventBuilder as _, EventBuilderV10};
    let event = EventBuilderV10::new()
        .id(id)
        // The instance's own API path: (source, id) is unique per notification,
        // as CloudEvents requires.
        .source(format!(
            "/apis/elements.dropbox-operator.dev/v1alpha1/namespaces/{}/dropboxelementinstances/{}",
            instance.namespace, instance.name
        ))
        .ty(CLOUDEVENTS_TYPE)
        .subject(instance.account_id.as_str())
        // Whole milliseconds, which every SDK keeps exactly (JavaScript's Date
        // has no finer unit, Python's datetime stops at microseconds). jiff
        // writes RFC 3339, which is what the SDK parses.
        .time(
            Timestamp::from_millisecond(time.as_millisecond())
                .unwrap_or(time)
                .to_string(),
        )
        .data("application/json", data)
        .build()
        // id, source and type are set and the time is RFC 3339: nothing to refuse.
        .expect("a complete CloudEvent");
    serde_json::to_vec(&event).expect("a CloudEvent serializes to JSON")
}

/// Signature headers for one delivery of `body`.
///
/// Always `Elements-Webhook-Id: <event_id>`. With a key, also
/// `Elements-Webhook-Signature: sha256=<base64 HMAC-SHA256(key, body)>` and the
/// Standard Webhooks headers `webhook-id`, `webhook-timestamp` (unix seconds)
/// and `webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`.
///
/// The Standard Webhooks format follows spec 1.0.0
/// (<https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md>,
/// "Signature scheme" and "Webhook headers"). One deviation: the spec presents
/// secrets as `whsec_<base64>` and HMACs with the decoded bytes; here `key` is
/// the user's raw key bytes, used directly as the HMAC key (docs/user-guide.md, "Verifying a delivery"), so a
/// receiver using a Standard Webhooks library must hand it
/// `"whsec_" + base64(key)`.
///
/// Header names are spelled as in docs/user-guide.md; HTTP header names are
/// case-insensitive, but `http::HeaderName::from_static` only takes lowercase,
/// so convert with `HeaderName::try_from`.
pub fn signature_headers(
    key: Option<&[u8]>,
    event_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Vec<(&'static str, String)> {
    let mut headers = vec![("Elements-Webhook-Id", event_id.to_owned())];
    if let Some(key) = key {
        let timestamp = timestamp.to_string();
        let elements = mac(key, &[body]).finalize().into_bytes();
        let standard = mac(key, &standard_webhooks_content(event_id, &timestamp, body))
            .finalize()
            .into_bytes();
        headers.push((
            "Elements-Webhook-Signature",
            format!("sha256={}", BASE64.encode(elements)),
        ));
        headers.push(("webhook-id", event_id.to_owned()));
        headers.push(("webhook-timestamp", timestamp));
        headers.push((
            "webhook-signature",
            format!("v1,{}", BASE64.encode(standard)),
        ));
    }
    headers
}

/// Checks `Elements-Webhook-Signature` (`sha256=<base64>`) in constant time.
pub fn verify_elements_signature(key: &[u8], body: &[u8], header: &str) -> bool {
    let Some(encoded) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(tag) = BASE64.decode(encoded) else {
        return false;
    };
    mac(key, &[body]).verify_slice(&tag).is_ok()
}

/// Checks a Standard Webhooks `webhook-signature` header in constant time.
/// The header may list several space-separated signatures (key rotation); one
/// valid `v1,` entry is enough, other versions are ignored.
///
/// This does not judge the timestamp's age (it has no clock): receivers must
/// also refuse timestamps far from now.
pub fn verify_standard_webhooks(
    key: &[u8],
    id: &str,
    timestamp: &str,
    body: &[u8],
    header: &str,
) -> bool {
    // The spec's timestamp is integer unix seconds; refusing anything else also
    // keeps "<id>.<timestamp>.<body>" from being split more than one way.
    if timestamp.parse::<i64>().is_err() {
        return false;
    }
    let content = standard_webhooks_content(id, timestamp, body);
    header
        .split_whitespace()
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|encoded| BASE64.decode(encoded).ok())
        .any(|tag| mac(key, &content).verify_slice(&tag).is_ok())
}

/// Checks Dropbox's `X-Dropbox-Signature` (hex HMAC-SHA256 of the raw body
/// with the app secret) in constant time; bad hex is a mismatch.
pub fn verify_dropbox_signature(app_secret: &[u8], body: &[u8], header: &str) -> bool {
    parse_dropbox_signature(header)
        .is_some_and(|tag| dropbox_signature_matches(app_secret, body, &tag))
}

/// The 32 bytes of an `X-Dropbox-Signature` header (64 hex digits), or None
/// when it cannot be a signature at all (checked before the body is read).
pub fn parse_dropbox_signature(header: &str) -> Option<[u8; 32]> {
    let mut tag = [0u8; 32];
    hex::decode_to_slice(header.trim(), &mut tag).ok()?;
    Some(tag)
}

/// Whether `tag` is HMAC-SHA256(app secret, body), compared in constant time.
pub fn dropbox_signature_matches(app_secret: &[u8], body: &[u8], tag: &[u8; 32]) -> bool {
    mac(app_secret, &[body]).verify_slice(tag).is_ok()
}

/// The Standard Webhooks signed content `<id>.<timestamp>.<body>`, as parts
/// so the body is not copied.
fn standard_webhooks_content<'a>(id: &'a str, timestamp: &'a str, body: &'a [u8]) -> [&'a [u8]; 5] {
    [id.as_bytes(), b".", timestamp.as_bytes(), b".", body]
}

/// HMAC-SHA256 keyed with `key` over the concatenation of `parts`.
fn mac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC takes keys of any length (long ones are hashed, short ones padded),
    // so this never fails; hmac itself relies on the same fact in `KeyInit::new`.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn file(n: usize) -> Value {
        json!({
            ".tag": "file",
            "name": format!("f{n}.txt"),
            "id": format!("id:file{n}"),
            "path_lower": format!("/docs/f{n}.txt"),
            "path_display": format!("/Docs/f{n}.txt"),
            "client_modified": "2015-05-12T15:50:38Z",
            "server_modified": "2015-05-12T15:50:38Z",
            "rev": "a1c10ce0dd78",
            "size": 7212,
            "content_hash": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        })
    }

    fn instance() -> InstanceInfo {
        InstanceInfo {
            uid: "8f2c1d2e-0000-4000-8000-000000000001".into(),
            namespace: "team-a".into(),
            name: "marketing".into(),
            display_name: "Marketing Dropbox".into(),
            tags: vec!["marketing".into(), "prod".into()],
            account_id: "dbid:AAH4f99T0taONIb-OurWxbNQ6ywGRopQngc".into(),
        }
    }

    fn origin() -> PageOrigin<'static> {
        PageOrigin {
            instance_uid: "8f2c1d2e-0000-4000-8000-000000000001",
            cursor: "AAGcursor",
            committed_at: at("2024-03-01T10:00:00Z"),
        }
    }

    #[test]
    fn standardize_maps_entries_in_order_and_skips_unknown_kinds() {
        let folder = json!({".tag": "folder", "name": "Docs", "id": "id:folder1",
                            "path_lower": "/docs", "path_display": "/Docs"});
        let deleted = json!({".tag": "deleted", "name": "old.txt",
                             "path_lower": "/docs/old.txt", "path_display": "/Docs/old.txt"});
        let unknown = json!({".tag": "shortcut", "id": "id:x"});
        let entries = [
            folder.clone(),
            unknown,
            file(1),
            deleted.clone(),
            json!({"no": "tag"}),
        ];

        let events = standardize(&entries, &origin());

        let shape: Vec<(&str, &str, &str, &str, &Value)> = events
            .iter()
            .map(|e| {
                (
                    e.event_type.as_str(),
                    e.object_type.as_str(),
                    e.object_id.as_str(),
                    e.event_date.as_str(),
                    &e.data,
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (
                    "UPDATED",
                    "folders",
                    "id:folder1",
                    "2024-03-01T10:00:00Z",
                    &folder
                ),
                (
                    "UPDATED",
                    "files",
                    "id:file1",
                    "2015-05-12T15:50:38Z",
                    &file(1)
                ),
                (
                    "DELETED",
                    "files",
                    "/docs/old.txt",
                    "2024-03-01T10:00:00Z",
                    &deleted
                ),
            ]
        );
        let ids: std::collections::HashSet<&str> =
            events.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids.len(), 3, "every event has its own id");
    }

    #[test]
    fn a_file_version_has_one_id_whatever_cursor_lists_it() {
        let later = PageOrigin {
            cursor: "AAGlater",
            committed_at: at("2024-03-02T00:00:00Z"),
            ..origin()
        };
        let first = &standardize(&[file(1)], &origin())[0];
        let again = &standardize(&[file(1)], &later)[0];
        assert_eq!(first, again, "same change, same id and same content");
        // Pinned, computed independently with Python's hashlib and json (sorted
        // keys, compact) from the documented layout: changing the scheme would
        // break duplicate detection across upgrades.
        assert_eq!(first.event_id, "cb156457-6ed0-8f22-98a5-0e75eafbe794");
        let mut changed = file(1);
        changed["rev"] = json!("b2");
        assert_ne!(
            standardize(&[changed], &origin())[0].event_id,
            first.event_id
        );
        let other_instance = PageOrigin {
            instance_uid: "another-uid",
            ..origin()
        };
        assert_ne!(
            standardize(&[file(1)], &other_instance)[0].event_id,
            first.event_id
        );
        assert!(!first.event_id.contains('.'));
    }

    #[test]
    fn deletions_are_told_apart_by_the_cursor_they_were_listed_from() {
        let deleted =
            json!({".tag": "deleted", "name": "a", "path_lower": "/a", "path_display": "/a"});
        let once = &standardize(std::slice::from_ref(&deleted), &origin())[0];
        let same_page = &standardize(std::slice::from_ref(&deleted), &origin())[0];
        assert_eq!(once, same_page, "the same page gives the same events");
        let later = PageOrigin {
            cursor: "AAGlater",
            ..origin()
        };
        let twice = &standardize(std::slice::from_ref(&deleted), &later)[0];
        assert_ne!(once.event_id, twice.event_id);
        assert!(!once.event_id.contains("AAG"));
    }

    #[test]
    fn reset_event_says_re_read() {
        let event = reset_event(&origin());
        assert_eq!(event.event_type, "UNKNOWN");
        assert_eq!(event.object_id, "");
        assert_eq!(event.event_date, "2024-03-01T10:00:00Z");
        assert_eq!(event.data["reason"], "reset");
        assert_eq!(event, reset_event(&origin()));
    }

    #[test]
    fn forty_five_events_make_three_elements_notifications() {
        let events = standardize(&(0..45).map(file).collect::<Vec<_>>(), &origin());
        let raw =
            json!({"list_folder": {"accounts": ["dbid:AAH4f99T0taONIb-OurWxbNQ6ywGRopQngc"]}});

        let sent = notifications(&instance(), &events, &raw, Format::Elements);

        assert_eq!(
            sent.iter().map(|n| n.event_count).collect::<Vec<_>>(),
            [20, 20, 5]
        );
        let mut next_event = 0;
        for notification in &sent {
            let body: Value = serde_json::from_slice(&notification.body).unwrap();
            let message = &body["message"];
            let batch = &events[next_event..next_event + notification.event_count];
            assert_eq!(
                notification.event_id,
                notification_id(&instance(), Format::Elements, &raw, batch)
            );
            assert_eq!(notification.content_type, "application/json");
            assert_eq!(body.as_object().unwrap().len(), 1);
            assert_eq!(message["eventId"], notification.event_id.as_str());
            assert_eq!(message["elementKey"], "dropbox");
            assert_eq!(message["instanceId"], "team-a/marketing");
            assert_eq!(message["instanceName"], "Marketing Dropbox");
            assert_eq!(message["instanceTags"], json!(["marketing", "prod"]));
            assert_eq!(
                message["accountId"],
                "dbid:AAH4f99T0taONIb-OurWxbNQ6ywGRopQngc"
            );
            assert_eq!(message["raw"], raw);
            // Events arrive in order, whole.
            for event in message["events"].as_array().unwrap() {
                assert_eq!(event, &serde_json::to_value(&events[next_event]).unwrap());
                next_event += 1;
            }
        }
        assert_eq!(next_event, 45);
        assert_ne!(sent[0].event_id, sent[1].event_id);
        assert_ne!(sent[1].event_id, sent[2].event_id);
        // Same events, same bodies: a redelivery is byte-for-byte the same.
        let again = notifications(&instance(), &events, &raw, Format::Elements);
        assert!(
            sent.iter()
                .zip(&again)
                .all(|(a, b)| a.body == b.body && a.event_id == b.event_id)
        );
        // Anything else in the body changes the id.
        let mut renamed = instance();
        renamed.display_name = "Renamed".into();
        assert_ne!(
            notifications(&renamed, &events, &raw, Format::Elements)[0].event_id,
            sent[0].event_id
        );
    }

    #[test]
    fn cloudevents_wrap_the_elements_body() {
        let events = standardize(&(0..45).map(file).collect::<Vec<_>>(), &origin());
        let raw = json!({"list_folder": {"accounts": []}});
        let elements = notifications(&instance(), &events, &raw, Format::Elements);

        let sent = notifications(&instance(), &events, &raw, Format::CloudEvents);

        assert_eq!(sent.len(), 3);
        for (notification, plain) in sent.iter().zip(&elements) {
            assert_eq!(notification.content_type, "application/cloudevents+json");
            let body: Value = serde_json::from_slice(&notification.body).unwrap();
            assert_eq!(body["specversion"], "1.0");
            assert_eq!(body["id"], notification.event_id.as_str());
            assert_eq!(
                body["data"]["message"]["eventId"],
                notification.event_id.as_str()
            );
            assert_eq!(
                body["source"],
                "/apis/elements.dropbox-operator.dev/v1alpha1/namespaces/team-a/dropboxelementinstances/marketing"
            );
            assert_eq!(body["type"], "dev.dropbox-operator.elements.dropbox.events");
            assert_eq!(body["subject"], "dbid:AAH4f99T0taONIb-OurWxbNQ6ywGRopQngc");
            // The time of the latest change in it, not of sending.
            assert_eq!(body["time"], "2015-05-12T15:50:38Z");
            assert_eq!(body["datacontenttype"], "application/json");
            let mut data = body["data"].clone();
            data["message"]["eventId"] = json!(plain.event_id);
            assert_eq!(data, serde_json::from_slice::<Value>(&plain.body).unwrap());
        }
    }

    #[test]
    fn cloudevents_time_is_whole_milliseconds() {
        let mut entry = file(0);
        entry["server_modified"] = json!("2024-03-01T10:00:05.123456789Z");
        let events = standardize(&[entry], &origin());
        let sent = notifications(&instance(), &events, &json!({}), Format::CloudEvents);
        let body: Value = serde_json::from_slice(&sent[0].body).unwrap();
        assert_eq!(body["time"], "2024-03-01T10:00:05.123Z");
    }

    #[test]
    fn no_events_no_notifications() {
        let sent = notifications(&instance(), &[], &json!({}), Format::Elements);
        assert!(sent.is_empty());
    }

    // Expected values computed independently with Python:
    //   import hmac, hashlib, base64
    //   k = b"test-signing-key"; b = b'{"message":{"eventId":"abc"}}'
    //   base64.b64encode(hmac.new(k, b, hashlib.sha256).digest())
    //   base64.b64encode(hmac.new(k, b"msg_1.1700000000." + b, hashlib.sha256).digest())
    const KEY: &[u8] = b"test-signing-key";
    const BODY: &[u8] = br#"{"message":{"eventId":"abc"}}"#;
    const ELEMENTS_SIGNATURE: &str = "sha256=cfD1PbUtYYEKkJDtY8AM5zfjX7PFjV0NvJwOlvE5/nk=";
    const STANDARD_SIGNATURE: &str = "v1,laf5+ze++j+cjZZOo7njTW2ODTeV+5A2Kt1DYJuPqL0=";

    #[test]
    fn signature_headers_match_known_vectors() {
        let headers = signature_headers(Some(KEY), "msg_1", 1_700_000_000, BODY);
        assert_eq!(
            headers,
            vec![
                ("Elements-Webhook-Id", "msg_1".to_owned()),
                ("Elements-Webhook-Signature", ELEMENTS_SIGNATURE.to_owned()),
                ("webhook-id", "msg_1".to_owned()),
                ("webhook-timestamp", "1700000000".to_owned()),
                ("webhook-signature", STANDARD_SIGNATURE.to_owned()),
            ]
        );
    }

    #[test]
    fn without_a_key_only_the_id_is_sent() {
        assert_eq!(
            signature_headers(None, "msg_1", 1_700_000_000, BODY),
            vec![("Elements-Webhook-Id", "msg_1".to_owned())]
        );
    }

    #[test]
    fn elements_signature_verification() {
        assert!(verify_elements_signature(KEY, BODY, ELEMENTS_SIGNATURE));
        assert!(!verify_elements_signature(
            KEY,
            br#"{"message":{"eventId":"abd"}}"#,
            ELEMENTS_SIGNATURE
        ));
        assert!(!verify_elements_signature(
            b"other-key",
            BODY,
            ELEMENTS_SIGNATURE
        ));
        assert!(!verify_elements_signature(KEY, BODY, "sha256=not*base64"));
        assert!(!verify_elements_signature(KEY, BODY, "sha256=cfD1PbUt"));
        assert!(!verify_elements_signature(
            KEY,
            BODY,
            ELEMENTS_SIGNATURE.trim_start_matches("sha256=")
        ));
        assert!(!verify_elements_signature(KEY, BODY, ""));
    }

    #[test]
    fn standard_webhooks_verification() {
        let ok = |id: &str, ts: &str, body: &[u8], header: &str| {
            verify_standard_webhooks(KEY, id, ts, body, header)
        };
        assert!(ok("msg_1", "1700000000", BODY, STANDARD_SIGNATURE));
        // Key rotation: any one valid v1 entry among several is enough.
        let rotated = format!("v1a,AAAA v1,c2lnbmF0dXJl {STANDARD_SIGNATURE}");
        assert!(ok("msg_1", "1700000000", BODY, &rotated));

        assert!(!ok(
            "msg_1",
            "1700000000",
            br#"{"message":{"eventId":"abd"}}"#,
            STANDARD_SIGNATURE
        ));
        assert!(!ok("msg_2", "1700000000", BODY, STANDARD_SIGNATURE));
        assert!(!ok("msg_1", "1700000001", BODY, STANDARD_SIGNATURE));
        assert!(!ok("msg_1", "not-a-number", BODY, STANDARD_SIGNATURE));
        assert!(!ok("msg_1", "1700000000", BODY, "v1,not*base64"));
        assert!(!ok(
            "msg_1",
            "1700000000",
            BODY,
            "v1a,laf5+ze++j+cjZZOo7njTW2ODTeV+5A2Kt1DYJuPqL0="
        ));
        assert!(!ok("msg_1", "1700000000", BODY, ""));
        assert!(!verify_standard_webhooks(
            b"other-key",
            "msg_1",
            "1700000000",
            BODY,
            STANDARD_SIGNATURE
        ));
    }

    #[test]
    fn signing_and_verifying_round_trip() {
        let headers = signature_headers(Some(KEY), "id-42", 1_710_000_000, BODY);
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
                .unwrap()
        };
        assert!(verify_elements_signature(
            KEY,
            BODY,
            get("Elements-Webhook-Signature")
        ));
        assert!(verify_standard_webhooks(
            KEY,
            get("webhook-id"),
            get("webhook-timestamp"),
            BODY,
            get("webhook-signature")
        ));
    }

    #[test]
    fn dropbox_signature_verification() {
        // python3: hmac.new(b"app-secret", body, hashlib.sha256).hexdigest()
        let body =
            br#"{"list_folder": {"accounts": ["dbid:AAH4f99T0taONIb-OurWxbNQ6ywGRopQngc"]}}"#;
        let good = "3e27677359d5a51c51464eff619eb474588e1f46a27cef15695685adadcc7fd3";
        assert!(verify_dropbox_signature(b"app-secret", body, good));
        assert!(verify_dropbox_signature(
            b"app-secret",
            body,
            &good.to_uppercase()
        ));
        assert!(!verify_dropbox_signature(b"other-secret", body, good));
        assert!(!verify_dropbox_signature(b"app-secret", &body[1..], good));
        assert!(!verify_dropbox_signature(b"app-secret", body, "zz27677359"));
        assert!(!verify_dropbox_signature(b"app-secret", body, &good[..62]));
        assert!(!verify_dropbox_signature(b"app-secret", body, ""));
    }
}
