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

/// The optional kinds of events the stream also carries, beside the
/// sequenced channel events (`events_include`). They have no channel
/// offset: each line carries an `id` of its own to de-duplicate on. They
/// are never refused: while the backlog is full (or, in a cluster, Redis
/// is out of reach) they are skipped and counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extras {
    /// `channel:member_joined` and `channel:member_left`.
    pub members: bool,
    /// `message:read_receipt`.
    pub receipts: bool,
    /// `dm:new`, once per message, from the sender's node.
    pub dms: bool,
}

/// One of the optional kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extra {
    Members,
    Receipts,
    Dms,
}

impl Extras {
    pub const NAMES: [&'static str; 3] = ["members", "receipts", "dms"];

    pub fn parse(names: &[String]) -> Result<Extras, String> {
        let mut e = Extras::default();
        for n in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
            match n {
                "members" => e.members = true,
                "receipts" => e.receipts = true,
                "dms" => e.dms = true,
                other => {
                    return Err(format!(
                        "unknown kind `{other}` (known: {})",
                        Extras::NAMES.join(", ")
                    ))
                }
            }
        }
        Ok(e)
    }

    pub fn any(self) -> bool {
        self.members || self.receipts || self.dms
    }

    pub fn has(self, kind: Extra) -> bool {
        match kind {
            Extra::Members => self.members,
            Extra::Receipts => self.receipts,
            Extra::Dms => self.dms,
        }
    }
}

/// An optional event's line: `{"id":…,"channel":…,"at":…,"event":…}`
/// (no `channel` for a direct message), without the newline.
pub fn extra_line(id: &str, channel: Option<&str>, at: u64, msg: &ServerMessage) -> Vec<u8> {
    let mut out = Vec::with_capacity(192);
    extra_line_into(&mut out, id, channel, at, msg);
    out
}

/// [`extra_line`], appended to `out`.
fn extra_line_into(
    out: &mut Vec<u8>,
    id: &str,
    channel: Option<&str>,
    at: u64,
    msg: &ServerMessage,
) {
    use std::io::Write as _;
    out.extend_from_slice(b"{\"id\":");
    serde_json::to_writer(&mut *out, id).expect("writing to a Vec cannot fail");
    if let Some(c) = channel {
        out.extend_from_slice(b",\"channel\":");
        serde_json::to_writer(&mut *out, c).expect("writing to a Vec cannot fail");
    }
    write!(out, ",\"at\":{at},\"event\":").expect("writing to a Vec cannot fail");
    json::encode_server(msg, out);
    out.push(b'}');
}

/// How long a refused client is told to wait.
pub const RETRY_AFTER_MS: u64 = 1000;

/// The gate the outbox shuts when it is full.
#[derive(Debug, Default)]
pub struct Backlog {
    full: AtomicBool,
    /// Events refused while it was shut.
    refused: AtomicU64,
    /// Optional events skipped while it was shut.
    skipped: AtomicU64,
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

    /// Optional events skipped while the gate was shut.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Relaxed)
    }
}

impl<O: Outbound> Engine<O> {
    /// New channel events are refused while `backlog` is full (the
    /// outbox's gate; the events go to the store set by
    /// `set_event_store`).
    pub fn set_event_stream(&mut self, backlog: Arc<Backlog>) {
        self.backlog = Some(backlog);
    }

    /// Sends an optional event to the event stream when its kind is
    /// included: on a single node to the store (which appends it to the
    /// outbox, in order with the channel's sequenced events from this
    /// shard), in a cluster to the bridge (which adds it to the events
    /// stream). Skipped, and counted, while the outbox is full.
    pub(super) fn stream_extra(
        &mut self,
        kind: Extra,
        channel: Option<&str>,
        msg: &ServerMessage,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if !self.s.stream_extras.has(kind) {
            return;
        }
        // A single node's outbox, else a cluster's events stream.
        let to_store = match (&self.backlog, &self.event_store) {
            (Some(b), Some(_)) if b.full() => {
                b.skipped.fetch_add(1, Relaxed);
                return;
            }
            (Some(_), Some(_)) => true,
            _ => false,
        };
        if !to_store && self.cluster.is_none() {
            return;
        }
        let id = self.mint_id("ev");
        if let (true, Some((store, pool))) = (to_store, &self.event_store) {
            let mut line = pool.take();
            extra_line_into(&mut line, &id, channel, now, msg);
            line.push(b'\n');
            tx.send(*store, MeshMsg::KeepEvent(line));
        } else {
            let line = extra_line(&id, channel, now, msg);
            let channel = channel.map(Arc::from);
            self.send_bridge(ToBridge::StreamExtra { channel, line }, now, tx);
        }
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
