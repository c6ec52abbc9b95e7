//! A fuzzer over whole agent frames and sequences of patches, on the stable toolchain:
//! generated statuses, patches (every op, paths real and made up, deep and long values,
//! copies and moves of whole subtrees) and other frames go through the interactor's
//! `receive` as an agent's would. Whatever arrives: no panic, the status stays within its
//! budgets, its size as kept equals its size measured afresh, and no frame takes long.
//!
//! The test command runs 256 cases; run longer with
//! `PROPTEST_CASES=20000 cargo test --release -p km-appliance --test hostile_frames`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use km::interactor::receive;
use km_config::{Settings, Values};
use km_core::app::AppState;
use km_ingest::budget;
use proptest::prelude::*;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Longest a frame may take here (debug builds, a loaded machine); a frame within the
/// budgets takes a few milliseconds at most.
const FRAME_TIME_LIMIT: Duration = Duration::from_secs(2);

struct Harness {
    runtime: tokio::runtime::Runtime,
    app: AppState,
    _dir: tempfile::TempDir,
}

static HARNESS: LazyLock<Harness> = LazyLock::new(|| {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let dir = tempfile::tempdir().expect("a temp dir");
    let settings =
        Settings::from_values(&Values::with_data_dir(dir.path())).expect("default settings");
    let (app, _writer) = runtime
        .block_on(km::server::build_app(
            settings,
            "http://127.0.0.1:8080".into(),
            km_tls::Tls::off(),
            CancellationToken::new(),
        ))
        .expect("the app");
    Harness {
        runtime,
        app,
        _dir: dir,
    }
});

fn captured_status() -> Value {
    include_str!("../../tests/fixtures/agent-status-sequence.jsonl")
        .lines()
        .next()
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .map(|l| l["frame"]["payload"].clone())
        .unwrap_or_default()
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "data", "process", "server", "axm_monitor", "value", "cpu", "memory", "name",
            "pm_id", "0", "1", "2", "-", "x", "a~1b", "~0", "",
        ])
        .prop_map(str::to_string),
        1 => "[a-z0-9~]{1,3}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just(String::new()),
        6 => prop::collection::vec(token(), 1..8).prop_map(|t| format!("/{}", t.join("/"))),
        3 => prop::sample::select(vec![
            "/data", "/data/process", "/data/process/0", "/data/process/-",
            "/data/process/0/axm_monitor", "/data/process/0/axm_monitor/Heap Size/value",
            "/data/process/1/cpu", "/data/server/loadavg/0", "/internal_ip",
        ])
        .prop_map(str::to_string),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[a-z ]{0,12}".prop_map(Value::from),
        (1usize..200_000).prop_map(|n| Value::from("x".repeat(n))),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A value nested `n` deep.
fn deep(n: usize) -> Value {
    (0..n).fold(json!(1), |v, _| json!({ "n": v }))
}

fn op() -> impl Strategy<Value = Value> {
    let value = prop_oneof![
        6 => json_value(),
        1 => (1usize..80).prop_map(deep),
    ];
    prop_oneof![
        3 => (path(), value.clone()).prop_map(|(p, v)| json!({"op": "add", "path": p, "value": v})),
        3 => (path(), value.clone()).prop_map(|(p, v)| json!({"op": "replace", "path": p, "value": v})),
        2 => path().prop_map(|p| json!({"op": "remove", "path": p})),
        3 => (path(), path()).prop_map(|(f, p)| json!({"op": "copy", "from": f, "path": p})),
        2 => (path(), path()).prop_map(|(f, p)| json!({"op": "move", "from": f, "path": p})),
        1 => (path(), value).prop_map(|(p, v)| json!({"op": "test", "path": p, "value": v})),
        1 => (path(), "[a-z]{1,8}").prop_map(|(p, o)| json!({"op": o, "path": p})),
    ]
}

/// A Zipkin span as pm2 sends it, each field real, made up or of the wrong type.
fn span() -> impl Strategy<Value = Value> {
    let id = prop_oneof![
        "[0-9a-f]{1,32}".prop_map(Value::from),
        "\\PC{0,40}".prop_map(Value::from),
        json_value(),
    ];
    let time = prop_oneof![
        (0i64..4_000_000_000_000_000).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        json_value(),
    ];
    (
        id.clone(),
        id.clone(),
        id,
        time.clone(),
        time,
        json_value(),
        json_value(),
        "[A-Z]{0,9}",
    )
        .prop_map(
            |(trace, id, parent, timestamp, duration, tags, name, kind)| {
                json!({"traceId": trace, "id": id, "parentId": parent, "timestamp": timestamp,
                   "duration": duration, "tags": tags, "name": name, "kind": kind})
            },
        )
}

fn frame() -> impl Strategy<Value = String> {
    let envelope =
        |channel: &str, payload: Value| json!({"channel": channel, "payload": payload}).to_string();
    prop_oneof![
        1 => Just(envelope("status", captured_status())),
        1 => json_value().prop_map(move |v| envelope("status", json!({"data": {"process": [v], "server": {}}}))),
        8 => prop::collection::vec(op(), 1..24).prop_map(move |ops| envelope("status:patch", Value::Array(ops))),
        1 => (1usize..64).prop_map(move |n| {
            // Each copy doubles what the previous ones built.
            let ops: Vec<Value> = (0..n)
                .map(|i| json!({"op": "copy", "from": if i == 0 { "/data".to_string() } else { format!("/c{}", i - 1) }, "path": format!("/c{i}")}))
                .collect();
            envelope("status:patch", Value::Array(ops))
        }),
        1 => json_value().prop_map(move |v| envelope("logs", v)),
        2 => span().prop_map(move |s| envelope("trace-span", json!({"data": s, "process": {"name": "fuzz-app", "pm_id": 0}}))),
        1 => json_value().prop_map(move |v| envelope("trace-span", v)),
        1 => "\\PC{0,40}",
    ]
}

static SERVERS: AtomicU64 = AtomicU64::new(0);

/// Runs `frames` as one new server's agent, checking the invariants after each.
fn run(frames: &[String]) -> Result<(), TestCaseError> {
    let harness = &*HARNESS;
    let _guard = harness.runtime.enter();
    let app = &harness.app;
    let (tx, _rx) = tokio::sync::mpsc::channel(1024);
    let name = format!("fuzz-{}", SERVERS.fetch_add(1, Ordering::Relaxed));
    let (session, socket) = app.sessions.attach("fuzz", &name, tx.clone(), 0);
    for (i, frame) in frames.iter().enumerate() {
        let start = Instant::now();
        receive(app, &session, socket, &tx, frame);
        let took = start.elapsed();
        prop_assert!(took < FRAME_TIME_LIMIT, "frame {i} took {took:?}");
        let Some(text) = session.status_text() else {
            continue;
        };
        let status: Value =
            serde_json::from_str(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let measured = budget::check_status(&status);
        prop_assert!(
            measured.is_ok(),
            "frame {i}: status over budget: {measured:?}"
        );
        prop_assert_eq!(
            Ok(session.status_size()),
            measured,
            "frame {}: size kept",
            i
        );
    }
    Ok(())
}

proptest! {
    // 256 cases unless PROPTEST_CASES says otherwise.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// What the span intakes are posted (OTLP protobuf or JSON, Zipkin spans): refused or
    /// stored, never a panic.
    #[test]
    fn hostile_span_bodies_are_refused_or_stored(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        otlp in json_value(),
        zipkin in span(),
    ) {
        use km_ingest::spans::{SpanOrigin, decode_otlp, from_zipkin, zipkin_of_otlp};
        let origin = SpanOrigin { bucket_id: "b", server_name: "s", app_name: "a", pm_id: Value::Null, now: 1_796_658_079_052 };
        let text = json!({"resourceSpans": [{"scopeSpans": [{"spans": [otlp]}]}]}).to_string();
        for request in [decode_otlp(&bytes, false), decode_otlp(&bytes, true), decode_otlp(text.as_bytes(), true)].into_iter().flatten() {
            for (_, _, span) in zipkin_of_otlp(request) {
                let _ = from_zipkin(&origin, span);
            }
        }
        if let Ok(stored) = from_zipkin(&origin, zipkin) {
            let facts = stored.span.expect("a span's facts");
            prop_assert!(facts.duration_us >= 0 && facts.route.chars().count() <= 200);
            prop_assert!(stored.at.abs_diff(origin.now) <= budget::SPAN_CLOCK_SKEW_MS.unsigned_abs());
        }
    }

    #[test]
    fn hostile_frames_keep_the_status_within_budgets(frames in prop::collection::vec(frame(), 1..12)) {
        // The captured status first, so most patches meet a real document.
        let status = json!({"channel": "status", "payload": captured_status()}).to_string();
        let mut all = vec![status];
        all.extend(frames);
        run(&all)?;
    }
}

#[test]
fn the_captured_status_is_within_its_budgets() {
    let status = json!({"channel": "status", "payload": captured_status()}).to_string();
    run(&[status]).expect("the captured status applies");
    let session = HARNESS.app.sessions.of_bucket("fuzz", None);
    assert!(session.iter().any(|s| s.status_size().nodes > 300));
}
