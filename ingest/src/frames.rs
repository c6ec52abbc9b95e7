//! The agent's frames: `{"channel": "...", "payload": ...}` text, both ways. Inbound
//! frames are split by channel; everything but status is turned into a stored event.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::spans::{self, SpanOrigin, SpanRefusal};
use km_stores::{EventKind, EventRecord};

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    channel: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
}

/// A decoded inbound frame.
pub enum Inbound<'a> {
    /// A full status (payload not yet parsed).
    Status(&'a str),
    /// An RFC 6902 patch against the previous status (payload not yet parsed).
    StatusPatch(&'a str),
    /// Any other channel, with its payload.
    Other { channel: String, payload: &'a str },
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame is not a JSON object with channel and payload: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("frame on channel {0:?} has no payload")]
    NoPayload(String),
}

pub fn decode(text: &str) -> Result<Inbound<'_>, FrameError> {
    let envelope: Envelope = serde_json::from_str(text)?;
    let payload = envelope
        .payload
        .ok_or_else(|| FrameError::NoPayload(envelope.channel.to_string()))?
        .get();
    Ok(match envelope.channel.as_ref() {
        "status" => Inbound::Status(payload),
        "status:patch" => Inbound::StatusPatch(payload),
        other => Inbound::Other {
            channel: other.to_string(),
            payload,
        },
    })
}

/// The outbound frame asking the agent for a full status.
pub const STATUS_RESEND: &str = r#"{"channel":"status:resend","payload":{}}"#;

/// An outbound frame.
pub fn encode(channel: &str, payload: &Value) -> String {
    json!({ "channel": channel, "payload": payload }).to_string()
}

/// Where an event came from, as the stores file it.
pub struct Origin<'a> {
    pub bucket_id: &'a str,
    pub server_name: &'a str,
    pub now: i64,
}

/// Turns a non-status frame into the event stored for it. Unknown channels are kept as
/// events of their own type; a payload that is not JSON is kept as a string.
pub fn to_event(origin: &Origin, channel: &str, payload: &str) -> EventRecord {
    let payload: Value =
        serde_json::from_str(payload).unwrap_or_else(|_| Value::String(payload.to_string()));
    let at = payload
        .get("at")
        .and_then(Value::as_f64)
        .map_or(origin.now, |at| at as i64);
    let process = payload.get("process");
    let (app_name, pm_id) = process_of(channel, &payload);

    let mut doc = Map::new();
    doc.insert("at".into(), at.into());
    doc.insert("server_name".into(), origin.server_name.into());
    doc.insert(
        "app_name".into(),
        app_name.clone().map_or(Value::Null, Value::String),
    );
    doc.insert("pm_id".into(), pm_id);
    let field = |name: &str| payload.get(name).cloned().unwrap_or(Value::Null);
    let (kind, event_type) = match channel {
        "logs" => {
            doc.insert("data".into(), field("data"));
            doc.insert("log_type".into(), field("log_type"));
            (
                EventKind::Log,
                field("log_type").as_str().unwrap_or("out").to_string(),
            )
        }
        "process:event" => {
            doc.insert("event".into(), field("event"));
            doc.insert("manually".into(), field("manually"));
            let event = field("event").as_str().unwrap_or("unknown").to_string();
            (EventKind::ProcessEvent, event)
        }
        "process:exception" => {
            let data = field("data");
            let issue = issue_id(app_name.as_deref(), &data);
            doc.insert("issue".into(), issue.clone().into());
            doc.insert("data".into(), data);
            (EventKind::Exception, channel.to_string())
        }
        "axm:transaction" => {
            doc.insert("data".into(), field("data"));
            (EventKind::Transaction, channel.to_string())
        }
        "profilings" | "profiling" => {
            let data = if channel == "profilings" {
                field("data")
            } else {
                payload.clone()
            };
            doc.insert(
                "type".into(),
                data.get("type").cloned().unwrap_or(Value::Null),
            );
            doc.insert(
                "uuid".into(),
                data.get("uuid").cloned().unwrap_or(Value::Null),
            );
            doc.insert("data".into(), data);
            (EventKind::Profile, channel.to_string())
        }
        _ => {
            doc.insert("type".into(), channel.into());
            if channel == "human:event" {
                doc.insert("name".into(), field("name"));
            }
            // Command results carry no `data`: keep the whole payload.
            let data = match payload.get("data") {
                Some(d) if process.is_some() => d.clone(),
                _ => payload.clone(),
            };
            doc.insert("data".into(), data);
            (EventKind::Event, channel.to_string())
        }
    };
    EventRecord {
        id: km_stores::ids::new_object_id(),
        kind,
        bucket_id: origin.bucket_id.to_string(),
        server_name: origin.server_name.to_string(),
        app_name,
        event_type,
        name: match kind {
            // Log lines are found by instance, exceptions by issue, profiles by uuid,
            // custom events by name.
            EventKind::Log => doc
                .get("pm_id")
                .filter(|id| !id.is_null())
                .map(Value::to_string),
            EventKind::Exception => doc.get("issue").and_then(Value::as_str).map(str::to_string),
            EventKind::Profile => doc.get("uuid").and_then(Value::as_str).map(str::to_string),
            _ if channel == "human:event" => payload
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        },
        at,
        doc: Value::Object(doc).to_string(),
        span: None,
    }
}

/// The app and pm_id a frame's payload names (`null` pm_id when none).
fn process_of(channel: &str, payload: &Value) -> (Option<String>, Value) {
    let process = payload.get("process");
    let app_name = process
        .and_then(|p| p.get("name"))
        .or_else(|| payload.pointer("/meta/app_name"))
        .or_else(|| payload.get("name").filter(|_| channel == "profiling"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let pm_id = process
        .and_then(|p| p.get("pm_id"))
        .or_else(|| payload.get("pm_id").filter(|_| channel == "profiling"))
        .cloned()
        .unwrap_or(Value::Null);
    (app_name, pm_id)
}

/// A `trace-span` frame's span (`data`, Zipkin v2) as it is stored.
pub fn to_span(origin: &Origin, payload: &str) -> Result<EventRecord, SpanRefusal> {
    let mut payload: Value = serde_json::from_str(payload).map_err(|_| SpanRefusal::NoIds)?;
    let (app_name, pm_id) = process_of("trace-span", &payload);
    let span = payload.get_mut("data").map(Value::take).unwrap_or_default();
    // Spans posted by pm2 name their service; the process's name is the app.
    let service = span["localEndpoint"]["serviceName"]
        .as_str()
        .map(str::to_string);
    let app_name = app_name.or(service).unwrap_or_else(|| "unknown".into());
    let origin = SpanOrigin {
        bucket_id: origin.bucket_id,
        server_name: origin.server_name,
        app_name: &app_name,
        pm_id,
        now: origin.now,
    };
    spans::from_zipkin(&origin, span)
}

/// The issue an exception belongs to: the same app, message and callsite (the line that
/// threw) are the same issue however often it happens.
pub fn issue_id(app_name: Option<&str>, data: &Value) -> String {
    let text = |name: &str| data.get(name).and_then(Value::as_str).unwrap_or("");
    let message = match text("message") {
        "" => data.as_str().unwrap_or(""),
        message => message,
    };
    let key = format!(
        "{}\0{message}\0{}",
        app_name.unwrap_or(""),
        text("callsite")
    );
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_frames() -> Vec<String> {
        include_str!("../../tests/fixtures/agent-frames-by-channel.jsonl")
            .lines()
            .map(str::to_string)
            .collect()
    }

    const ORIGIN: Origin = Origin {
        bucket_id: "b1",
        server_name: "web-1",
        now: 42,
    };

    fn event_of(channel: &str) -> (EventRecord, Value) {
        let frames = fixture_frames();
        let frame = frames
            .iter()
            .find(|f| f.contains(&format!("\"channel\": \"{channel}\"")))
            .unwrap_or_else(|| panic!("no fixture for {channel}"));
        let Inbound::Other { channel, payload } = decode(frame).unwrap() else {
            panic!("{channel} decoded as status");
        };
        let event = to_event(&ORIGIN, &channel, payload);
        let doc = serde_json::from_str(&event.doc).unwrap();
        (event, doc)
    }

    #[test]
    fn every_captured_channel_decodes() {
        for frame in fixture_frames() {
            match decode(&frame).unwrap() {
                Inbound::Status(p) | Inbound::StatusPatch(p) => {
                    serde_json::from_str::<Value>(p).unwrap();
                }
                Inbound::Other { channel, payload } => {
                    let event = to_event(&ORIGIN, &channel, payload);
                    assert_eq!(event.server_name, "web-1");
                    serde_json::from_str::<Value>(&event.doc).unwrap();
                }
            }
        }
    }

    #[test]
    fn logs_keep_line_type_and_process() {
        let (event, doc) = event_of("logs");
        assert_eq!(event.kind, EventKind::Log);
        assert_eq!(doc["data"], "plain tick\n");
        assert_eq!(doc["log_type"], "out");
        assert_eq!(doc["app_name"], "p2");
        assert_eq!(doc["pm_id"], 0);
        assert_eq!(doc["at"], 1795314739236i64);
        assert_eq!(event.name.as_deref(), Some("0"), "found by instance");
    }

    #[test]
    fn exceptions_keep_stack_and_last_logs() {
        let (event, doc) = event_of("process:exception");
        assert_eq!(event.kind, EventKind::Exception);
        assert_eq!(doc["data"]["message"], "tx2 issue error");
        assert_eq!(doc["data"]["last_logs"].as_array().map(Vec::len), Some(8));
        // Found by issue: same app, message and callsite, whatever the stack or time.
        assert_eq!(event.name.as_deref(), doc["issue"].as_str());
        let same = json!({"message": "tx2 issue error", "callsite": "/srv/demo/apps/app-tx2.js:8", "stack": "other"});
        assert_eq!(issue_id(event.app_name.as_deref(), &same), doc["issue"]);
        assert_ne!(issue_id(Some("other-app"), &same), doc["issue"]);
    }

    #[test]
    fn process_events_keep_event_name() {
        let (event, doc) = event_of("process:event");
        assert_eq!(
            (event.kind, event.event_type.as_str()),
            (EventKind::ProcessEvent, "start")
        );
        assert_eq!(doc["manually"], true);
    }

    #[test]
    fn replies_results_and_unknown_channels_are_events() {
        let (event, doc) = event_of("axm:reply");
        assert_eq!(
            (event.kind, doc["data"]["return"]["done"].clone()),
            (EventKind::Event, json!(true))
        );
        let (event, doc) = event_of("trigger:pm2:result");
        assert_eq!(event.at, 42, "no `at`: the arrival time is used");
        assert_eq!(doc["data"]["meta"]["method_name"], "deepUpdate");
        let (event, doc) = event_of("my:custom");
        assert_eq!(
            (event.event_type.as_str(), doc["data"]["hello"].clone()),
            ("my:custom", json!("world"))
        );
        let (_, doc) = event_of("human:event");
        assert_eq!(doc["name"], "tx2 ev");
        let (_, doc) = event_of("axm:scoped_action:stream");
        assert_eq!(doc["data"]["uuid"], "11111111-2222-4333-8444-555555555555");
    }

    #[test]
    fn profiles_and_transactions_have_their_kinds() {
        let (event, doc) = event_of("profilings");
        assert_eq!(
            (event.kind, doc["type"].clone()),
            (EventKind::Profile, json!("heapprofile"))
        );
        // Found by uuid for download.
        assert_eq!(event.name.as_deref(), Some("0vo3zdowyrpe"));
        let (event, doc) = event_of("profiling");
        assert_eq!(
            (event.kind, event.app_name.as_deref()),
            (EventKind::Profile, Some("legacy"))
        );
        assert_eq!(doc["pm_id"], 2);
        let (event, _) = event_of("axm:transaction");
        assert_eq!(event.kind, EventKind::Transaction);
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        for bad in [
            "",
            "{",
            "[]",
            r#"{"channel":"logs"}"#,
            r#"{"payload":{}}"#,
            "\u{0}",
        ] {
            assert!(decode(bad).is_err(), "{bad:?} accepted");
        }
        let event = to_event(&ORIGIN, "weird", "not json");
        assert_eq!(event.event_type, "weird");
    }
}
