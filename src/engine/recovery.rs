//! Socket.IO's connection state recovery (`socket.recovered`), on top of
//! the sessions of `session:resume`.
//!
//! A Socket.IO client keeps one offset: the last argument of the last
//! sequenced event it received (`<offset>:<epoch>:<channel>`, written once
//! per event by the encoder). To know where it stands in its *other*
//! channels, a shard logs the order in which it queued sequenced events to
//! Socket.IO members ([`SentLog`]: one entry per event per shard, not per
//! recipient; a connection's own joins and replays are entries addressed
//! to it). When a Socket.IO connection drops, the part of that log that
//! concerns it goes with its session ([`ResumePoints::sent`]). When the
//! client reconnects with its session (`pid`) and offset, the event it
//! names is found there: whatever of each channel was queued after it is
//! what it missed ([`positions`]). The session then resumes as with
//! `session:resume`, and the CONNECT answer names the session again only
//! when every channel recovered (all or nothing, as Socket.IO's own).

use std::collections::VecDeque;
use std::sync::Arc;

use corecast_protocol::protocol::socketio;

use super::*;

/// Entries a shard keeps of what it queued to Socket.IO members.
pub const SENT_LOG: usize = 1024;
/// Entries a dropped session keeps of it: a client that missed more than
/// this many of its channels' events is not recovered (it joins again).
pub const SENT_TAIL: usize = 512;

#[derive(Debug, Clone)]
struct Entry {
    channel: Arc<str>,
    offset: u64,
    /// `None`: every local member of the channel; else one connection
    /// (its join, or an event replayed to it).
    to: Option<ConnId>,
    /// The connection joined here: its events of the channel are those
    /// after `offset`.
    joined: bool,
}

/// The order in which this shard queued sequenced events to its Socket.IO
/// members, the last [`SENT_LOG`] of them.
#[derive(Debug, Default)]
pub struct SentLog {
    entries: VecDeque<Entry>,
}

impl SentLog {
    fn push(&mut self, e: Entry) {
        if self.entries.len() == SENT_LOG {
            self.entries.pop_front();
        }
        self.entries.push_back(e);
    }

    /// A sequenced event queued to the channel's members here.
    pub fn delivered(&mut self, channel: &Arc<str>, offset: u64) {
        self.push(Entry {
            channel: channel.clone(),
            offset,
            to: None,
            joined: false,
        });
    }

    /// A connection joined `channel` after `offset`, and the events after
    /// it up to `last` were replayed to it.
    pub fn joined(&mut self, id: ConnId, channel: &Arc<str>, offset: u64, last: u64) {
        self.push(Entry {
            channel: channel.clone(),
            offset,
            to: Some(id),
            joined: true,
        });
        for o in offset + 1..=last {
            self.push(Entry {
                channel: channel.clone(),
                offset: o,
                to: Some(id),
                joined: false,
            });
        }
    }

    /// What was queued to connection `id` in `channels` (of its resume
    /// points), oldest first: for each channel, back to its join at most.
    pub fn tail(&self, id: ConnId, channels: &[(Arc<str>, u64, Arc<str>)]) -> Vec<Sent> {
        let mut joined = vec![false; channels.len()];
        let mut out = Vec::new();
        for e in self.entries.iter().rev() {
            if out.len() == SENT_TAIL {
                break;
            }
            if e.to.is_some_and(|to| to != id) {
                continue;
            }
            let Some(i) = channels
                .iter()
                .position(|(c, ..)| Arc::ptr_eq(c, &e.channel) || *c == e.channel)
            else {
                continue;
            };
            if joined[i] {
                continue;
            }
            joined[i] = e.joined;
            out.push((i as u16, e.offset, e.joined));
        }
        out.reverse();
        out
    }
}

/// Where a resumed Socket.IO session takes up each of its channels, given
/// the recovery offset its client last received (`None`: it received no
/// sequenced event on that connection). `None` when that cannot be told
/// exactly: the offset is not among what was queued to the connection (it
/// missed more than [`SENT_TAIL`] events, or the offset is not its), or it
/// names none and the record does not reach back to every join.
pub fn positions(points: &ResumePoints, last: Option<socketio::Seq>) -> Option<Vec<Position>> {
    let sent = &points.sent;
    let received = match last {
        None => None,
        Some(at) => {
            let k = points
                .channels
                .iter()
                .position(|(c, ..)| **c == *at.channel)?;
            if *points.channels[k].2 != *at.epoch {
                return None;
            }
            let is = |joined: bool| {
                move |s: &&Sent| s.0 as usize == k && s.1 == at.offset && s.2 == joined
            };
            match sent.iter().rposition(|s| is(false)(&s)) {
                Some(i) => Some(i),
                // Nothing received on this connection since its join that
                // continued from this very offset (a resume).
                None if sent.iter().any(|s| is(true)(&s)) => None,
                None => return None,
            }
        }
    };
    let after = received.map_or(0, |i| i + 1);
    if received.is_none() {
        // Everything queued to the connection was missed: the record must
        // reach back to every channel's join.
        let all_joined =
            (0..points.channels.len()).all(|k| sent.iter().any(|s| s.0 as usize == k && s.2));
        if !all_joined {
            return None;
        }
    }
    let out = points
        .channels
        .iter()
        .enumerate()
        .map(|(k, (channel, dropped_at, epoch))| {
            let first = sent[after..].iter().find(|s| s.0 as usize == k);
            let offset = match first {
                // Joined after what the client received: all of it.
                Some(&(_, o, true)) => o,
                Some(&(_, o, false)) => o.saturating_sub(1),
                // Nothing of it queued since: it has everything.
                None => *dropped_at,
            };
            Position {
                channel_id: channel.to_string(),
                offset,
                epoch: epoch.to_string(),
            }
        })
        .collect();
    Some(out)
}

/// A Socket.IO reconnection asking for its session back, until it is
/// answered with `ready` (the CONNECT answer).
#[derive(Debug)]
pub struct Recovery {
    /// The client's recovery offset, as it sent it.
    pub(super) last: Option<String>,
    /// The `ready` of a new session, sent when recovery fails.
    pub(super) fresh: Ready,
    /// Channels rejoining (each must come back recovered), once known.
    pub(super) expected: usize,
}

impl Recovery {
    /// A reconnection that last received `last` and opened as `fresh`.
    pub fn new(last: Option<String>, fresh: Ready) -> Recovery {
        Recovery {
            last,
            fresh,
            expected: 0,
        }
    }
}

impl<O: Outbound> Engine<O> {
    /// A Socket.IO connection, just opened, that asks for `session` back
    /// (`pid`); its CONNECT answer (`ready`) waits for the outcome.
    pub fn recover(
        &mut self,
        id: ConnId,
        session: SessionId,
        recovery: Recovery,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let lookup = GatherKind::ResumeLookup {
            session,
            positions: Vec::new(),
            recovery: Some(Box::new(recovery)),
        };
        self.look_up_session(id, None, session, lookup, now, tx);
    }

    /// The session could not be recovered: the connection goes on as the
    /// new session it opened as, in no channel.
    pub(super) fn not_recovered(&mut self, id: ConnId, recovery: Recovery) {
        self.metrics.socketio_not_recovered.inc();
        let msg = ServerMessage::event(ServerEvent::Ready(recovery.fresh));
        self.reply(id, &msg);
    }

    /// Every channel of the session came back: the CONNECT answer names
    /// the session again (`socket.recovered`), or else the channels are
    /// left and the connection goes on as a new session.
    pub(super) fn finish_recovery(
        &mut self,
        id: ConnId,
        session: SessionId,
        channels: &[ResumedChannel],
        recovery: Recovery,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if channels.len() == recovery.expected && channels.iter().all(|c| c.recovered) {
            self.metrics.socketio_recovered.inc();
            let mut ready = recovery.fresh;
            ready.session_id = session.to_string();
            return self.reply(id, &ServerMessage::event(ServerEvent::Ready(ready)));
        }
        let fresh: Option<SessionId> = recovery.fresh.session_id.parse().ok();
        if let (Some(conn), Some(fresh)) = (self.conn_mut(id), fresh) {
            conn.member.session = fresh;
        }
        for c in channels {
            self.on_channel_leave(id, None, &c.channel_id, now, tx);
        }
        self.not_recovered(id, recovery);
    }

    /// Logs what `deliver` queued, when its frames are Socket.IO's too.
    pub(super) fn log_sent(&mut self, channel: &Arc<str>, frames: &Frames, offset: u64) {
        let sio = frames.socketio.is_some() || frames.socketio_msgpack.is_some();
        if offset > 0 && sio {
            self.sent.delivered(channel, offset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(slot: u32) -> ConnId {
        ConnId { slot, gen: 0 }
    }

    fn seq<'a>(channel: &'a str, offset: u64) -> Option<socketio::Seq<'a>> {
        Some(socketio::Seq {
            channel,
            offset,
            epoch: "e",
        })
    }

    fn offsets(p: &[Position]) -> Vec<(&str, u64)> {
        p.iter().map(|p| (&*p.channel_id, p.offset)).collect()
    }

    /// Channels `a` and `b` joined by connection 1 at offsets 10 and 20,
    /// then events a11, b21, a12, b22, with connection 2's own events
    /// in between (not 1's).
    fn dropped() -> ResumePoints {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut log = SentLog::default();
        log.delivered(&a, 9);
        log.joined(id(1), &a, 10, 10);
        log.joined(id(2), &b, 18, 20);
        log.joined(id(1), &b, 20, 20);
        log.delivered(&a, 11);
        log.delivered(&b, 21);
        log.delivered(&a, 12);
        log.delivered(&b, 22);
        let channels = vec![(a, 12, "e".into()), (b, 22, "e".into())];
        let sent = log.tail(id(1), &channels);
        ResumePoints { channels, sent }
    }

    #[test]
    fn the_log_keeps_what_each_connection_was_sent_since_its_joins() {
        let p = dropped();
        assert_eq!(
            p.sent,
            [
                (0, 10, true),
                (1, 20, true),
                (0, 11, false),
                (1, 21, false),
                (0, 12, false),
                (1, 22, false)
            ]
        );
    }

    #[test]
    fn what_came_after_the_last_event_received_is_replayed() {
        let p = dropped();
        let cases = [
            (seq("a", 11), [("a", 11), ("b", 20)]),
            (seq("b", 21), [("a", 11), ("b", 21)]),
            (seq("a", 12), [("a", 12), ("b", 21)]),
            (seq("b", 22), [("a", 12), ("b", 22)]),
            (None, [("a", 10), ("b", 20)]),
        ];
        for (last, want) in cases {
            let got = positions(&p, last).expect("recoverable");
            assert_eq!(offsets(&got), want, "{last:?}");
        }
    }

    #[test]
    fn what_cannot_be_told_exactly_is_not_recovered() {
        let p = dropped();
        // Not among what was queued to it, another epoch, another channel.
        assert!(positions(&p, seq("a", 9)).is_none());
        let other_epoch = socketio::Seq {
            channel: "a",
            offset: 11,
            epoch: "x",
        };
        assert!(positions(&p, Some(other_epoch)).is_none());
        assert!(positions(&p, seq("c", 11)).is_none());
        // Nothing received and the joins no longer recorded.
        let mut short = p.clone();
        short.sent.drain(..2);
        assert!(positions(&short, None).is_none());
        assert_eq!(
            offsets(&positions(&short, seq("a", 11)).unwrap()),
            [("a", 11), ("b", 20)]
        );
    }

    #[test]
    fn a_resumed_connection_recovers_from_the_offset_it_resumed_at() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut log = SentLog::default();
        // Resumed: a from 11 with 12 replayed, b from 22 with nothing.
        log.joined(id(3), &a, 11, 12);
        log.joined(id(3), &b, 22, 22);
        let channels = vec![(a, 12, "e".into()), (b, 22, "e".into())];
        let p = ResumePoints {
            sent: log.tail(id(3), &channels),
            channels,
        };
        // The client still holds the offset of the connection before.
        assert_eq!(
            offsets(&positions(&p, seq("b", 22)).unwrap()),
            [("a", 11), ("b", 22)]
        );
        assert_eq!(
            offsets(&positions(&p, seq("a", 12)).unwrap()),
            [("a", 12), ("b", 22)]
        );
    }

    #[test]
    fn the_log_and_what_a_session_keeps_are_bounded() {
        let a: Arc<str> = "a".into();
        let mut log = SentLog::default();
        log.joined(id(1), &a, 0, 0);
        for o in 1..=3 * SENT_LOG as u64 {
            log.delivered(&a, o);
        }
        assert_eq!(log.entries.len(), SENT_LOG);
        let channels = vec![(a, 3 * SENT_LOG as u64, "e".into())];
        assert_eq!(log.tail(id(1), &channels).len(), SENT_TAIL);
    }
}
