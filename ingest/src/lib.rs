//! The agents' protocol below HTTP: frames decoded and mapped to events, each server's
//! session (its live status as a compact tree within its budgets, patching, metric values
//! sampled per minute), the node's in-flight byte budget, and the batched writer that
//! hands events and metric minutes to the events store.

pub mod budget;
pub mod frames;
pub mod meter;
pub mod metrics;
pub mod process;
pub mod session;
pub mod spans;
pub mod tree;
pub mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde_json::Value;

pub use metrics::MetricSampler;
pub use writer::EventWriter;

use crate::meter::InFlight;
use crate::session::{PatchFailure, PatchOp, Session};
use budget::Over;
use km_stores::EventRecord;

/// Counters of the ingest path, shown in `/healthz`.
#[derive(Debug, Default, Serialize)]
pub struct IngestCounters {
    pub statuses: AtomicU64,
    pub patches: AtomicU64,
    pub patches_failed: AtomicU64,
    pub events: AtomicU64,
    pub malformed_frames: AtomicU64,
    /// Full statuses over a budget (their socket is closed with 1008).
    pub statuses_refused: AtomicU64,
    /// Patches over a budget (the agent is asked for a full status).
    pub patches_refused: AtomicU64,
    /// Frames over `MAX_FRAME_BYTES` (their socket is closed with 1009).
    pub frames_too_large: AtomicU64,
    /// Frames that found the in-flight budget spent (their socket is closed with 1013).
    pub frames_refused_busy: AtomicU64,
    /// Spans stored (from agents and the intakes).
    pub spans: AtomicU64,
    /// Spans refused: no ids, over `MAX_SPAN_BYTES`, or a request over a span budget.
    pub spans_refused: AtomicU64,
}

/// Why a status frame was not applied.
#[derive(Debug, thiserror::Error)]
pub enum StatusRefusal {
    #[error("the status is not a JSON object")]
    Malformed,
    #[error(transparent)]
    Over(#[from] Over),
}

/// A status or patch frame's payload, unless it is over [`budget::MAX_STATUS_FRAME_BYTES`]
/// (checked before parsing: the parsed form takes several times the text).
fn status_frame(payload: &str) -> Result<&str, Over> {
    if payload.len() > budget::MAX_STATUS_FRAME_BYTES {
        return Err(Over::Frame(payload.len()));
    }
    Ok(payload)
}

pub struct Ingest {
    pub writer: EventWriter,
    pub counters: IngestCounters,
    /// Bytes of agent frames this node holds now (see [`budget::MAX_IN_FLIGHT_BYTES`]).
    pub in_flight: Arc<InFlight>,
}

impl Ingest {
    pub fn new(writer: EventWriter) -> Self {
        Ingest {
            writer,
            counters: IngestCounters::default(),
            in_flight: Arc::default(),
        }
    }

    /// A full status, applied unless it is malformed or over a budget.
    pub fn apply_status(
        &self,
        session: &Session,
        payload: &str,
        now: i64,
    ) -> Result<(), StatusRefusal> {
        let mut points = Vec::new();
        let applied = status_frame(payload)
            .map_err(StatusRefusal::from)
            .and_then(|payload| match serde_json::from_str::<Value>(payload) {
                Ok(status @ Value::Object(_)) => Ok(status),
                _ => Err(StatusRefusal::Malformed),
            })
            .and_then(|status| Ok(session.apply_status(status, now, &mut points)?));
        self.writer.metrics(points);
        let counter = match &applied {
            Ok(()) => &self.counters.statuses,
            Err(StatusRefusal::Over(_)) => &self.counters.statuses_refused,
            Err(StatusRefusal::Malformed) => &self.counters.malformed_frames,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        applied
    }

    /// A status patch; when it does not apply the agent must resend a full status.
    pub fn apply_patch(
        &self,
        session: &Session,
        payload: &str,
        now: i64,
    ) -> Result<(), PatchFailure> {
        self.counters.patches.fetch_add(1, Ordering::Relaxed);
        let mut points = Vec::new();
        let applied = status_frame(payload)
            .map_err(PatchFailure::from)
            .and_then(|payload| {
                serde_json::from_str::<Vec<PatchOp>>(payload).map_err(|e| PatchFailure::Invalid {
                    index: 0,
                    reason: format!("not a JSON Patch: {e}"),
                })
            })
            .and_then(|patch| session.apply_patch(patch, now, &mut points));
        self.writer.metrics(points);
        let counter = match &applied {
            Ok(()) => None,
            Err(PatchFailure::Over(_)) => Some(&self.counters.patches_refused),
            Err(_) => Some(&self.counters.patches_failed),
        };
        if let Some(counter) = counter {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        applied
    }

    pub fn event(&self, event: EventRecord) {
        self.counters.events.fetch_add(1, Ordering::Relaxed);
        self.writer.event(event);
    }

    /// A span, stored unless refused (counted either way).
    pub fn span(
        &self,
        span: Result<EventRecord, spans::SpanRefusal>,
    ) -> Result<(), spans::SpanRefusal> {
        match span {
            Ok(span) => {
                self.counters.spans.fetch_add(1, Ordering::Relaxed);
                self.writer.event(span);
                Ok(())
            }
            Err(refused) => {
                self.counters.spans_refused.fetch_add(1, Ordering::Relaxed);
                Err(refused)
            }
        }
    }

    pub fn count_malformed(&self) {
        self.counters
            .malformed_frames
            .fetch_add(1, Ordering::Relaxed);
    }
}
