//! Persistence of what agents send: statuses applied to sessions with their metrics
//! sampled per minute, and events handed to the batched writer.

pub mod metrics;
pub mod writer;

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde_json::Value;

pub use metrics::MetricSampler;
pub use writer::EventWriter;

use crate::interactor::Session;
use crate::interactor::session::PatchOp;
use crate::stores::EventRecord;

/// Counters of the ingest path, shown in `/healthz`.
#[derive(Debug, Default, Serialize)]
pub struct IngestCounters {
    pub statuses: AtomicU64,
    pub patches: AtomicU64,
    pub patches_failed: AtomicU64,
    pub events: AtomicU64,
    pub malformed_frames: AtomicU64,
}

pub struct Ingest {
    pub writer: EventWriter,
    pub counters: IngestCounters,
}

impl Ingest {
    pub fn new(writer: EventWriter) -> Self {
        Ingest {
            writer,
            counters: IngestCounters::default(),
        }
    }

    /// A full status; false when the payload is not a status object.
    pub fn apply_status(&self, session: &Session, payload: &str, now: i64) -> bool {
        let status = match serde_json::from_str::<Value>(payload) {
            Ok(status @ Value::Object(_)) => status,
            _ => return false,
        };
        let mut points = Vec::new();
        session.apply_status(status, now, &mut points);
        self.writer.metrics(points);
        self.counters.statuses.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// A status patch; false when it does not apply (the agent must resend).
    pub fn apply_patch(&self, session: &Session, payload: &str, now: i64) -> bool {
        self.counters.patches.fetch_add(1, Ordering::Relaxed);
        let applied = serde_json::from_str::<Vec<PatchOp>>(payload)
            .ok()
            .and_then(|patch| {
                let mut points = Vec::new();
                session.apply_patch(patch, now, &mut points).ok()?;
                self.writer.metrics(points);
                Some(())
            })
            .is_some();
        if !applied {
            self.counters.patches_failed.fetch_add(1, Ordering::Relaxed);
        }
        applied
    }

    pub fn event(&self, event: EventRecord) {
        self.counters.events.fetch_add(1, Ordering::Relaxed);
        self.writer.event(event);
    }

    pub fn count_malformed(&self) {
        self.counters
            .malformed_frames
            .fetch_add(1, Ordering::Relaxed);
    }
}
