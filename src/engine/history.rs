//! History that survives a restart of a single node: the owner shard sends
//! each sequenced event of a channel it sequences itself to the node's
//! store (`MeshMsg::KeepHistory`, written by `crate::history_store` and, with
//! the event stream on, `crate::event_outbox`), and
//! loads what the store kept when the node starts. In a cluster, Redis
//! keeps the history and nothing is sent.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::*;

/// One line of the history file and of the event stream's outbox: a
/// sequenced event of a channel. (Files written before the long names read
/// back through the aliases.)
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Line {
    /// The channel.
    #[serde(alias = "c")]
    pub channel: String,
    /// Its epoch.
    #[serde(alias = "e")]
    pub epoch: String,
    /// The event's offset.
    #[serde(alias = "o")]
    pub offset: u64,
    /// When it was sequenced (ms).
    pub at: u64,
    /// The event, as the native protocol sends it (`{"t":…,"d":…}`).
    #[serde(alias = "m")]
    pub event: Box<serde_json::value::RawValue>,
}

impl Line {
    /// The event it holds (`None`: not one this server reads).
    pub fn record(self) -> Option<Record> {
        let msg = json::decode_server(self.event.get().as_bytes()).ok()?;
        Some(Record {
            channel: self.channel,
            epoch: self.epoch,
            offset: self.offset,
            at: self.at,
            msg,
        })
    }
}

/// A sequenced event read back from the history file.
#[derive(Debug, Clone)]
pub struct Record {
    pub channel: String,
    pub epoch: String,
    pub offset: u64,
    pub at: u64,
    pub msg: ServerMessage,
}

/// The line of a sequenced event, newline included. `json` is the event's
/// native JSON (the payload of its `corecast.json` frame), when it was
/// encoded already.
pub fn line(
    channel: &str,
    epoch: &str,
    offset: u64,
    at: u64,
    msg: &ServerMessage,
    json_frame: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::new();
    line_into(&mut out, channel, epoch, offset, at, msg, json_frame);
    out
}

/// [`line`], appended to `out`.
pub fn line_into(
    out: &mut Vec<u8>,
    channel: &str,
    epoch: &str,
    offset: u64,
    at: u64,
    msg: &ServerMessage,
    json_frame: Option<&[u8]>,
) {
    out.reserve(64 + channel.len() + json_frame.map_or(256, <[u8]>::len));
    head_into(out, channel, epoch, offset, at);
    let payload = json_frame.and_then(|f| {
        let h = crate::ws::frame::parse_header(f).ok()??;
        f.get(h.header_len..)
    });
    match payload {
        Some(p) => out.extend_from_slice(p),
        None => json::encode_server(msg, out),
    }
    out.extend_from_slice(b"}\n");
}

/// The buffers of the lines one shard sends the store, handed back by the
/// store once it wrote them: a line then costs no allocation, and the
/// allocator no fresh page (freed by another thread, line buffers would
/// otherwise keep going back to the system and coming back zeroed).
/// Bounded: past `capacity` buffers, or one grown past
/// [`LinePool::MAX_BYTES`], a buffer is simply freed.
#[derive(Debug)]
pub struct LinePool {
    /// Boxed as the mesh carries them (a mesh slot holds one pointer).
    #[allow(clippy::box_collection)]
    free: crossbeam_queue::ArrayQueue<Box<Vec<u8>>>,
}

impl LinePool {
    /// A buffer larger than this is not kept.
    pub const MAX_BYTES: usize = 16 << 10;

    pub fn new(capacity: usize) -> LinePool {
        LinePool {
            free: crossbeam_queue::ArrayQueue::new(capacity.max(1)),
        }
    }

    /// An empty buffer: a kept one, or a new one.
    pub fn take(&self) -> Box<Vec<u8>> {
        self.free.pop().unwrap_or_default()
    }

    /// Hands a written buffer back.
    pub fn give(&self, mut buf: Box<Vec<u8>>) {
        if buf.capacity() <= Self::MAX_BYTES {
            buf.clear();
            let _ = self.free.push(buf);
        }
    }

    /// Buffers waiting to be taken.
    pub fn len(&self) -> usize {
        self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.free.is_empty()
    }
}

/// A sequenced event's line for a cluster's events stream, made before
/// Redis gives it its offset (and a new message its id): the event's JSON
/// with the offset (and the id) left blank, and where they go. The
/// `sequence` script fills them in; [`StreamLine::complete`] does the same
/// here (the tests compare both with [`line`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLine {
    /// The event's JSON (`{"t":…,"d":…}`) with `"offset":0` and, for a new
    /// message, `"messageId":""`.
    pub json: Vec<u8>,
    /// Where the message id goes (before the closing quote), 0: none.
    pub id_at: usize,
    /// Where the offset's `0` is.
    pub offset_at: usize,
    /// When the event was made (its own time: `timestamp`, `editedAt`).
    pub at: u64,
}

impl StreamLine {
    /// The line of a sequenced event (`None`: not a sequenced kind).
    pub fn of(msg: &ServerMessage) -> Option<StreamLine> {
        const ID: &[u8] = br#""messageId":""#;
        const OFFSET: &[u8] = br#""offset":0"#;
        let mut m = msg.clone();
        let at = match &mut m.event {
            ServerEvent::MessageNew(e) => {
                e.offset = 0;
                e.message_id.clear();
                e.timestamp
            }
            ServerEvent::MessageEdited(e) => {
                e.offset = 0;
                e.edited_at
            }
            ServerEvent::MessageDeleted(e) => {
                e.offset = 0;
                e.timestamp
            }
            ServerEvent::MessageReaction(e) => {
                e.offset = 0;
                e.timestamp
            }
            _ => return None,
        };
        let mut json = Vec::with_capacity(256);
        json::encode_server(&m, &mut json);
        // Quotes inside strings are escaped: these can only be the fields.
        let id_at = match m.event {
            ServerEvent::MessageNew(_) => memchr::memmem::find(&json, ID)? + ID.len(),
            _ => 0,
        };
        let offset_at = memchr::memmem::find_iter(&json, OFFSET)
            .find(|&i| matches!(json.get(i + OFFSET.len()), Some(b',' | b'}')))?
            + OFFSET.len()
            - 1;
        Some(StreamLine {
            json,
            id_at,
            offset_at,
            at,
        })
    }

    /// The complete line, as [`line`] makes it (without its newline), once
    /// the channel's epoch and the event's offset are known.
    pub fn complete(&self, channel: &str, epoch: &str, offset: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + channel.len() + self.json.len());
        head_into(&mut out, channel, epoch, offset, self.at);
        let j = &self.json;
        let offset = offset.to_string();
        if self.id_at > 0 {
            out.extend_from_slice(&j[..self.id_at]);
            out.extend_from_slice(format!("{epoch}-{offset}").as_bytes());
            out.extend_from_slice(&j[self.id_at..self.offset_at]);
        } else {
            out.extend_from_slice(&j[..self.offset_at]);
        }
        out.extend_from_slice(offset.as_bytes());
        out.extend_from_slice(&j[self.offset_at + 1..]);
        out.push(b'}');
        out
    }
}

/// Appends a line up to its event:
/// `{"channel":…,"epoch":…,"offset":…,"at":…,"event":`.
fn head_into(out: &mut Vec<u8>, channel: &str, epoch: &str, offset: u64, at: u64) {
    use std::io::Write as _;
    out.extend_from_slice(b"{\"channel\":");
    serde_json::to_writer(&mut *out, channel).expect("writing to a Vec cannot fail");
    out.extend_from_slice(b",\"epoch\":");
    serde_json::to_writer(&mut *out, epoch).expect("writing to a Vec cannot fail");
    write!(out, ",\"offset\":{offset},\"at\":{at},\"event\":")
        .expect("writing to a Vec cannot fail");
}

impl<O: Outbound> Engine<O> {
    /// Where sequenced events are kept (the store's mesh endpoint): the
    /// history file, the event stream's outbox, or both; `pool`: the
    /// buffers of this shard's lines, which the store hands back.
    pub fn set_event_store(&mut self, store: ShardId, pool: Arc<LinePool>) {
        self.event_store = Some((store, pool));
    }

    /// Sends a sequenced event of a channel this shard sequenced to the
    /// store.
    pub(super) fn keep_history(
        &mut self,
        channel: &str,
        offset: u64,
        msg: &ServerMessage,
        json_frame: Option<&[u8]>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (Some((store, pool)), Some(o)) = (&self.event_store, self.owned.get(channel)) else {
            return;
        };
        let mut l = pool.take();
        line_into(&mut l, channel, &o.epoch, offset, now, msg, json_frame);
        let store = *store;
        tx.send(store, MeshMsg::KeepHistory(l));
    }

    /// Restores the channels this shard owns from what the store kept
    /// (oldest first): their epochs, offsets, messages and the events
    /// recovery replays. Each leaves when its history runs out, as any
    /// channel without members.
    pub fn load_history<'a>(&mut self, records: impl IntoIterator<Item = &'a Record>, now: u64) {
        let shards = self.shards;
        for r in records {
            if owner_of(&r.channel, shards) != self.shard {
                continue;
            }
            let channel: Arc<str> = r.channel.as_str().into();
            let s = &self.s;
            let o = self
                .owned
                .entry(channel)
                .or_insert_with(|| Owned::new(r.epoch.as_str().into(), shards as usize));
            if *o.epoch != *r.epoch {
                *o = Owned::new(r.epoch.as_str().into(), shards as usize);
            }
            o.offset = o.offset.max(r.offset);
            o.apply(&r.msg, r.at, s);
            o.log(r.offset, r.at, r.msg.clone(), &Frames::default(), s);
        }
        let s = &self.s;
        let mut gc = Vec::new();
        for (channel, o) in self.owned.iter_mut() {
            o.trim(now, s);
            if let Some(at) = o.history_expires(s) {
                gc.push((channel.clone(), at));
            }
        }
        for (channel, at) in gc {
            self.timers.at(at + 1, Timer::ChannelGc { channel });
        }
        self.metrics.channels.set(self.owned.len() as u64);
    }
}
