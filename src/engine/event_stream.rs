//! The event stream to the application backend, as the engine sees it.
//! On a single node, sequenced channel events go to the node's store with
//! the history (see `history.rs`), which appends them to the outbox the
//! webhook thread delivers from (`crate::event_outbox`, `crate::webhook`);
//! the engine only minds the gate: while the outbox is full, new channel
//! events (messages, edits, deletions, reactions) are refused with
//! `unavailable`, so that nothing is accepted that could not be kept. In a
//! cluster, the script that orders a channel writes the events stream, and
//! refuses when it is full (`FromBridge::StreamFull`, answered with
//! `unavailable`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::*;

/// How long a refused client is told to wait.
pub const RETRY_AFTER_MS: u64 = 1000;

/// The gate the outbox shuts when it is full.
#[derive(Debug, Default)]
pub struct Backlog {
    full: AtomicBool,
    /// Events refused while it was shut.
    refused: AtomicU64,
}

impl Backlog {
    pub fn full(&self) -> bool {
        self.full.load(Relaxed)
    }

    pub fn set_full(&self, full: bool) {
        if self.full.load(Relaxed) != full {
            self.full.store(full, Relaxed);
        }
    }

    pub fn refused(&self) -> u64 {
        self.refused.load(Relaxed)
    }
}

impl<O: Outbound> Engine<O> {
    /// New channel events are refused while `backlog` is full (the
    /// outbox's gate; the events go to the store set by
    /// `set_event_store`).
    pub fn set_event_stream(&mut self, backlog: Arc<Backlog>) {
        self.backlog = Some(backlog);
    }

    /// The refusal of a new channel event while the outbox is full.
    pub(super) fn backlog_refusal(&self, ack: Option<u64>) -> Option<ServerMessage> {
        let b = self.backlog.as_ref().filter(|b| b.full())?;
        b.refused.fetch_add(1, Relaxed);
        Some(unavailable(ack))
    }
}

/// `unavailable`: the backlog to the application backend (a single node's
/// outbox, a cluster's events stream) is full.
pub(super) fn unavailable(ack: Option<u64>) -> ServerMessage {
    let mut e = err(
        ack,
        ErrorCode::Unavailable,
        "the server's backlog to the application backend is full: try again later",
    );
    if let ServerEvent::Error(body) = &mut e.event {
        body.retry_after_ms = Some(RETRY_AFTER_MS);
    }
    e
}
