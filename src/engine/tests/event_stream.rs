//! The event stream's side of the engine: each sequenced event of a
//! channel goes to the store as one line (channel, epoch, offset, the
//! event), and while the outbox is full new channel events are refused
//! with `unavailable` and nothing is sequenced.

use std::sync::Arc;

use super::*;
use crate::engine::event_stream::Backlog;
use crate::engine::history::{Line, LinePool};

/// Two shards whose sequenced events go to the store, behind `backlog`.
fn streaming() -> (Sim, Arc<Backlog>, ShardId) {
    streaming_with(Settings::default())
}

fn streaming_with(settings: Settings) -> (Sim, Arc<Backlog>, ShardId) {
    let mut sim = Sim::with(2, settings);
    let backlog = Arc::new(Backlog::default());
    let store = crate::mesh::store_endpoint(2);
    for e in &mut sim.shards {
        e.set_event_store(store, Arc::new(LinePool::new(8)));
        e.set_event_stream(backlog.clone());
    }
    (sim, backlog, store)
}

/// The lines the store received: (channel, offset, event name).
fn kept(sim: &mut Sim, store: ShardId) -> Vec<(String, u64, String)> {
    std::iter::from_fn(|| sim.mesh.0[store as usize].pop_front())
        .map(|m| match m {
            MeshMsg::KeepHistory(line) => {
                let l: Line = serde_json::from_slice(&line).unwrap();
                let r = l.record().unwrap();
                (r.channel, r.offset, r.msg.event.name().to_owned())
            }
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn sequenced_events_go_to_the_store_and_a_full_outbox_refuses_new_ones() {
    let (mut sim, backlog, store) = streaming();
    let c = channel_owned_by(1, 2);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    sim.join(a, &c);
    ra.take();
    let send = MessageSend {
        nonce: Some("n-1".into()),
        ..MessageSend::new(c.as_str(), "one")
    };
    sim.send(a, Some(11), ClientEvent::MessageSend(send.clone()));
    let AckBody::Send(first) = ack_body(&ra.take(), 11) else {
        panic!()
    };
    assert_eq!(
        kept(&mut sim, store),
        [(c.clone(), 1, "message:new".into())]
    );

    backlog.set_full(true);
    sim.send(
        a,
        Some(12),
        ClientEvent::MessageSend(MessageSend::new(c.as_str(), "two")),
    );
    let got = ra.take();
    assert_eq!(error_code(&got, 12), ErrorCode::Unavailable);
    let retry = picked(&got, |e| match e {
        ServerEvent::Error(b) => b.retry_after_ms,
        _ => None,
    });
    assert_eq!(retry, [1000]);
    let r = MessageReact {
        channel_id: c.clone(),
        message_id: first.message_id.clone(),
        emoji: "👍".into(),
        action: ReactAction::Add,
    };
    sim.send(a, Some(13), ClientEvent::MessageReact(r));
    assert_eq!(error_code(&ra.take(), 13), ErrorCode::Unavailable);
    // A resend of what was accepted is answered as the first time.
    sim.send(a, Some(14), ClientEvent::MessageSend(send));
    let AckBody::Send(again) = ack_body(&ra.take(), 14) else {
        panic!()
    };
    assert!(again.duplicate);
    assert_eq!(again.offset, 1);
    assert!(kept(&mut sim, store).is_empty(), "nothing sequenced");
    assert_eq!(backlog.refused(), 2);

    backlog.set_full(false);
    sim.send(
        a,
        Some(15),
        ClientEvent::MessageSend(MessageSend::new(c.as_str(), "three")),
    );
    let AckBody::Send(next) = ack_body(&ra.take(), 15) else {
        panic!()
    };
    assert_eq!(next.offset, 2, "no offset was taken by a refusal");
    assert_eq!(kept(&mut sim, store), [(c, 2, "message:new".into())]);
}

#[test]
fn a_stream_line_completed_with_its_offset_is_the_line_of_the_event() {
    use crate::engine::history::{line, StreamLine};
    // Content that looks like the fields it must not be taken for.
    let tricky = r#"{"messageId":"","offset":0,"x":"offset":0}"#;
    let new = |offset: u64, epoch: &str| {
        ServerMessage::event(ServerEvent::MessageNew(MessageNew {
            message_id: format!("{epoch}-{offset}"),
            channel_id: "c\"1".into(),
            user_id: "alice".into(),
            content: tricky.into(),
            reply_to: None,
            thread_id: None,
            mentions: vec!["bob".into()],
            nonce: Some("n".into()),
            offset,
            timestamp: 5,
            // The backend's metadata may hold anything, the fields the
            // stream fills in too.
            meta: Some(Json(r#"{"messageId":"","offset":0}"#.into())),
        }))
    };
    let edited = |offset: u64| {
        ServerMessage::event(ServerEvent::MessageEdited(MessageEdited {
            message_id: "e-1".into(),
            channel_id: "c\"1".into(),
            user_id: "alice".into(),
            content: tricky.into(),
            offset,
            edited_at: 6,
        }))
    };
    let deleted = |offset: u64| {
        ServerMessage::event(ServerEvent::MessageDeleted(MessageDeleted {
            message_id: "e-1".into(),
            channel_id: "c\"1".into(),
            user_id: "alice".into(),
            offset,
            timestamp: 7,
        }))
    };
    let reaction = |offset: u64| {
        ServerMessage::event(ServerEvent::MessageReaction(MessageReaction {
            message_id: "e-1".into(),
            channel_id: "c\"1".into(),
            user_id: "bob".into(),
            emoji: "👍".into(),
            action: ReactAction::Add,
            count: 1,
            offset,
            timestamp: 8,
        }))
    };
    let kinds: [&dyn Fn(u64) -> ServerMessage; 4] =
        [&|o| new(o, "ep0ch"), &edited, &deleted, &reaction];
    for (i, make) in kinds.iter().enumerate() {
        // Made before the offset is known (any offset stands in).
        let s = StreamLine::of(&make(3)).unwrap_or_else(|| panic!("kind {i}"));
        assert_eq!(s.at, [5, 6, 7, 8][i], "the event's own time");
        for offset in [1, 42, 123_456_789] {
            let mut want = line("c\"1", "ep0ch", offset, s.at, &make(offset), None);
            assert_eq!(want.pop(), Some(b'\n'));
            let got = s.complete("c\"1", "ep0ch", offset);
            assert_eq!(
                String::from_utf8(got).unwrap(),
                String::from_utf8(want).unwrap(),
                "kind {i}"
            );
        }
    }
    let typing = ServerMessage::event(ServerEvent::TypingUserStart(TypingEvent {
        channel_id: "c".into(),
        user_id: "u".into(),
    }));
    assert!(StreamLine::of(&typing).is_none());
}

/// What the store received, in order: a sequenced event as
/// `(channel, event name)`, an optional one as `(id, channel or "",
/// event name)` with its id.
#[derive(Debug, PartialEq)]
enum Kept {
    Sequenced(String, String),
    Extra(String, String, String),
}

fn kept_all(sim: &mut Sim, store: ShardId) -> Vec<Kept> {
    std::iter::from_fn(|| sim.mesh.0[store as usize].pop_front())
        .map(|m| match m {
            MeshMsg::KeepHistory(line) => {
                let l: Line = serde_json::from_slice(&line).unwrap();
                let r = l.record().unwrap();
                Kept::Sequenced(r.channel, r.msg.event.name().to_owned())
            }
            MeshMsg::KeepEvent(line) => {
                assert_eq!(line.last(), Some(&b'\n'), "one line each");
                let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
                assert!(v.get("offset").is_none(), "no offset: {v}");
                assert!(v["at"].as_u64().is_some());
                Kept::Extra(
                    v["id"].as_str().unwrap().to_owned(),
                    v["channel"].as_str().unwrap_or("").to_owned(),
                    v["event"]["t"].as_str().unwrap().to_owned(),
                )
            }
            other => panic!("{other:?}"),
        })
        .collect()
}

/// Alice and bob (on two shards) join a channel; alice's message there,
/// which bob marks read.
fn a_message_read(sim: &mut Sim) -> (String, (ConnRef, Recorder), (ConnRef, Recorder)) {
    let c = channel_owned_by(1, 2);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    sim.join(a, &c);
    sim.join(b, &c);
    sim.publish(a, &c, "hello");
    let AckBody::Send(sent) = ack_body(&ra.take(), 2) else {
        panic!()
    };
    sim.send(
        b,
        Some(10),
        ClientEvent::MessageMarkRead(message_ref(&c, &sent.message_id)),
    );
    (c, (a, ra), (b, rb))
}

#[test]
fn optional_kinds_go_to_the_store_in_their_places_with_ids_when_included() {
    let (mut sim, backlog, store) = streaming_with(Settings {
        stream_extras: crate::engine::event_stream::Extras {
            members: true,
            receipts: true,
            dms: true,
        },
        ..Settings::default()
    });
    let (c, (a, _ra), (b, rb)) = a_message_read(&mut sim);
    sim.send(
        a,
        Some(11),
        ClientEvent::DmSend(DmSend {
            to_user_id: "bob".into(),
            content: "psst".into(),
            nonce: Some("d1".into()),
        }),
    );
    // A resent direct message is not a new one.
    sim.send(
        a,
        Some(12),
        ClientEvent::DmSend(DmSend {
            to_user_id: "bob".into(),
            content: "psst".into(),
            nonce: Some("d1".into()),
        }),
    );
    sim.send(
        b,
        Some(13),
        ClientEvent::ChannelLeave(ChannelRef {
            channel_id: c.clone(),
        }),
    );
    rb.take();
    let got = kept_all(&mut sim, store);
    let shape: Vec<(&str, &str)> = got
        .iter()
        .map(|k| match k {
            Kept::Sequenced(c, t) | Kept::Extra(_, c, t) => (c.as_str(), t.as_str()),
        })
        .collect();
    assert_eq!(
        shape,
        [
            (c.as_str(), "channel:member_joined"),
            (c.as_str(), "channel:member_joined"),
            (c.as_str(), "message:new"),
            (c.as_str(), "message:read_receipt"),
            ("", "dm:new"),
            (c.as_str(), "channel:member_left"),
        ]
    );
    let ids: std::collections::HashSet<&str> = got
        .iter()
        .filter_map(|k| match k {
            Kept::Extra(id, ..) => Some(id.as_str()),
            Kept::Sequenced(..) => None,
        })
        .collect();
    assert_eq!(ids.len(), 5, "each optional event has an id of its own");

    // While the outbox is full they are skipped, and counted.
    backlog.set_full(true);
    sim.join(b, &c);
    assert!(kept_all(&mut sim, store).is_empty());
    assert_eq!(backlog.skipped(), 1);
    assert_eq!(backlog.refused(), 0, "a join is never refused");
}

#[test]
fn optional_kinds_stay_out_of_the_store_unless_included() {
    let (mut sim, _backlog, store) = streaming();
    let (c, _, (b, _rb)) = a_message_read(&mut sim);
    sim.send(
        b,
        Some(13),
        ClientEvent::ChannelLeave(ChannelRef {
            channel_id: c.clone(),
        }),
    );
    assert_eq!(kept(&mut sim, store), [(c, 1, "message:new".into())]);
}

#[test]
fn line_buffers_handed_back_are_taken_again_within_bounds() {
    let pool = LinePool::new(2);
    let mut a = pool.take();
    a.extend_from_slice(b"{\"a\":1}\n");
    let at = a.as_ptr();
    pool.give(a);
    let again = pool.take();
    assert!(again.is_empty());
    assert_eq!(again.as_ptr(), at, "the same buffer");
    // A buffer grown past the bound is not kept, nor more than `capacity`.
    let mut big = pool.take();
    big.reserve(LinePool::MAX_BYTES + 1);
    pool.give(big);
    assert!(pool.is_empty());
    for _ in 0..3 {
        let mut b = Box::<Vec<u8>>::default();
        b.reserve(64);
        pool.give(b);
    }
    assert_eq!(pool.len(), 2);
    drop(again);
}
