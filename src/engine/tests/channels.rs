//! Channels across shards: one order for every member, frames encoded once,
//! joins and leaves, closes, typed errors.

use super::*;

#[test]
fn members_on_every_shard_see_one_order() {
    let mut sim = Sim::new(3);
    let ch = channel_owned_by(2, 3);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Binary);
    let (c, rc) = sim.connect(2, "carol", Protocol::Json);
    for x in [a, b, c] {
        sim.join(x, &ch);
    }
    ra.take();
    rb.take();
    rc.take();
    // Publishers on three shards interleave; every member sees one order.
    for i in 0..30 {
        let from = [a, b, c][i % 3];
        sim.publish(from, &ch, &format!("m{i}"));
    }
    let (ma, mb, mc) = (ra.take(), rb.take(), rc.take());
    let want: Vec<(u64, String)> = (0..30).map(|i| (i as u64 + 1, format!("m{i}"))).collect();
    assert_eq!(contents(&ma), want);
    assert_eq!(contents(&mb), want);
    assert_eq!(contents(&mc), want);
    // Each publisher got an ack with the offset that was assigned to it.
    let acks: Vec<u64> = ma
        .iter()
        .filter_map(|m| match &m.event {
            ServerEvent::Ack(AckBody::Send(s)) => Some(s.offset),
            _ => None,
        })
        .collect();
    assert_eq!(
        acks,
        (1..=30).step_by(3).map(|o| o as u64).collect::<Vec<_>>()
    );
}

#[test]
fn frames_are_encoded_once_per_protocol_and_shared() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(0, 2);
    let recs: Vec<(ConnRef, Recorder)> = (0..6)
        .map(|i| sim.connect(i % 2, &format!("u{i}"), Protocol::Json))
        .collect();
    for (c, _) in &recs {
        sim.join(*c, &ch);
    }
    for (_, r) in &recs {
        r.frames.borrow_mut().clear();
    }
    sim.publish(recs[0].0, &ch, "hello");
    let mut ptrs: Vec<*const u8> = recs
        .iter()
        .map(|(_, r)| {
            let f = r.frames.borrow();
            f.iter()
                .find(|b| b.windows(11).any(|w| w == b"message:new"))
                .unwrap()
                .as_ptr()
        })
        .collect();
    ptrs.dedup();
    assert_eq!(ptrs.len(), 1, "every recipient holds the same buffer");
    let delivered: u64 = sim.shards.iter().map(|s| s.metrics.deliveries.get()).sum();
    assert!(delivered >= 6);
}

#[test]
fn join_and_leave_are_announced_to_others() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(1, 2);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    sim.join(a, &ch);
    let first = ra.take();
    assert!(
        matches!(&first[..], [ServerMessage { id: Some(1), event: ServerEvent::Ack(AckBody::Join(j)) }] if j.members == 1 && j.offset == 0)
    );
    sim.join(b, &ch);
    let to_a = ra.take();
    assert!(
        matches!(&to_a[..], [ServerMessage { event: ServerEvent::MemberJoined(m), .. }] if m.user_id == "bob")
    );
    let to_b = rb.take();
    assert!(
        matches!(&to_b[..], [ServerMessage { event: ServerEvent::Ack(AckBody::Join(j)), .. }] if j.members == 2)
    );
    sim.send(
        b,
        Some(5),
        ClientEvent::ChannelLeave(ChannelRef {
            channel_id: ch.clone(),
        }),
    );
    assert!(matches!(
        &rb.take()[..],
        [ServerMessage {
            id: Some(5),
            event: ServerEvent::Ack(AckBody::Empty(_))
        }]
    ));
    assert!(
        matches!(&ra.take()[..], [ServerMessage { event: ServerEvent::MemberLeft(m), .. }] if m.user_id == "bob")
    );
    // After leaving, bob no longer receives the channel's messages.
    sim.publish(a, &ch, "after");
    assert!(contents(&rb.take()).is_empty());
    assert_eq!(contents(&ra.take()), vec![(1, "after".into())]);
}

#[test]
fn close_leaves_every_channel_and_the_owner_forgets_empty_channels() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(0, 2);
    let (a, ra) = sim.connect(1, "alice", Protocol::Json);
    let (b, _rb) = sim.connect(1, "bob", Protocol::Json);
    sim.join(a, &ch);
    sim.join(b, &ch);
    ra.take();
    sim.close(b);
    assert!(matches!(
        &ra.take()[..],
        [ServerMessage {
            event: ServerEvent::MemberLeft(_),
            ..
        }]
    ));
    sim.close(a);
    assert!(sim.shards[0].owned.is_empty());
    assert!(sim.shards[1].local.is_empty());
    assert_eq!(sim.shards[1].connections(), 0);
}

#[test]
fn close_while_join_in_flight_is_undone() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(0, 2);
    let (a, _ra) = sim.connect(1, "alice", Protocol::Json);
    sim.shards[1].handle(
        a.conn,
        ClientMessage {
            id: None,
            event: ClientEvent::ChannelJoin(ChannelJoin {
                channel_id: ch.clone(),
                since: None,
                token: None,
            }),
        },
        0,
        &mut sim.mesh,
    );
    sim.shards[1].close(a.conn, 0, &mut sim.mesh);
    sim.settle();
    assert!(
        sim.shards[0].owned.is_empty(),
        "the owner's count went back to zero"
    );
    assert!(sim.shards[1].local.is_empty());
}

#[test]
fn typed_errors() {
    let mut sim = Sim::new(1);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let code = |msgs: Vec<ServerMessage>| match &msgs[..] {
        [ServerMessage {
            event: ServerEvent::Error(e),
            id,
        }] => (e.code, *id),
        other => panic!("{other:?}"),
    };
    sim.publish(a, "nowhere", "x");
    assert_eq!(code(ra.take()), (ErrorCode::Forbidden, Some(2)));
    sim.send(
        a,
        Some(3),
        ClientEvent::ChannelLeave(ChannelRef {
            channel_id: "nowhere".into(),
        }),
    );
    assert_eq!(code(ra.take()), (ErrorCode::NotFound, Some(3)));
    sim.join(a, "bad channel");
    assert_eq!(code(ra.take()), (ErrorCode::BadRequest, Some(1)));
    sim.send(a, Some(4), ClientEvent::Unsupported("dm:send".into()));
    assert_eq!(code(ra.take()), (ErrorCode::Unsupported, Some(4)));
    sim.join(a, "ok");
    ra.take();
    sim.join(a, "ok");
    assert_eq!(code(ra.take()), (ErrorCode::BadRequest, Some(1)));
    sim.publish(a, "ok", &"x".repeat(4001));
    assert_eq!(code(ra.take()), (ErrorCode::TooLarge, Some(2)));
    sim.send(a, Some(9), ClientEvent::Heartbeat);
    assert!(
        matches!(&ra.take()[..], [ServerMessage { id: Some(9), event: ServerEvent::HeartbeatAck(h) }] if h.timestamp == sim.now)
    );
}

#[test]
fn refused_frames_are_counted_and_do_not_stop_others() {
    let mut sim = Sim::new(1);
    let (a, ra) = sim.connect(0, "a", Protocol::Json);
    let (b, rb) = sim.connect(0, "b", Protocol::Json);
    sim.join(a, "c");
    sim.join(b, "c");
    ra.take();
    rb.take();
    rb.refuse.set(true);
    sim.publish(a, "c", "hi");
    assert_eq!(contents(&ra.take()), vec![(1, "hi".into())]);
    assert!(sim.shards[0].metrics.queue_drops.get() >= 1);
}

#[test]
fn leave_and_rejoin_while_the_first_join_is_in_flight() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(0, 2);
    let (a, ra) = sim.connect(1, "alice", Protocol::Json);
    let (b, rb) = sim.connect(0, "bob", Protocol::Json);
    sim.join(b, &ch);
    rb.take();
    let join = |id| ClientMessage {
        id: Some(id),
        event: ClientEvent::ChannelJoin(ChannelJoin {
            channel_id: ch.clone(),
            since: None,
            token: None,
        }),
    };
    let leave = ClientMessage {
        id: Some(2),
        event: ClientEvent::ChannelLeave(ChannelRef {
            channel_id: ch.clone(),
        }),
    };
    // Three events before the owner answers anything.
    for m in [join(1), leave, join(3)] {
        sim.shards[1].handle(a.conn, m, 0, &mut sim.mesh);
    }
    sim.settle();
    let ids: Vec<Option<u64>> = ra
        .take()
        .iter()
        .filter(|m| matches!(m.event, ServerEvent::Ack(_)))
        .map(|m| m.id)
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec![Some(1), Some(2), Some(3)],
        "every event answered once"
    );
    // Alice is a member exactly once: she gets each message once.
    sim.publish(b, &ch, "once");
    assert_eq!(contents(&ra.take()), vec![(1, "once".into())]);
    assert_eq!(sim.shards[0].owned[&*ch].total(), 2);
}

#[test]
fn a_large_channel_stops_broadcasting_joins_and_leaves() {
    let settings = Settings {
        large_channel_members: 3,
        ..unlimited()
    };
    let mut sim = Sim::with(2, settings);
    let ch = channel_owned_by(1, 2);
    let members = |msgs: &[ServerMessage]| -> Vec<(bool, String)> {
        picked(msgs, |e| match e {
            ServerEvent::MemberJoined(m) => Some((true, m.user_id.clone())),
            ServerEvent::MemberLeft(m) => Some((false, m.user_id.clone())),
            _ => None,
        })
    };
    let mut conns = Vec::new();
    for (i, u) in ["u1", "u2", "u3", "u4"].iter().enumerate() {
        let (c, r) = sim.connect((i % 2) as u16, u, Protocol::Json);
        sim.join(c, &ch);
        conns.push((c, r));
    }
    // u1 heard u2 and u3 join; u4 joined a channel of 3: no one heard.
    assert_eq!(
        members(&conns[0].1.take()),
        [(true, "u2".to_string()), (true, "u3".to_string())]
    );
    assert!(members(&conns[3].1.take()).is_empty());
    // The list still has everyone.
    sim.send(
        conns[0].0,
        Some(9),
        ClientEvent::ChannelGetMembers(ChannelRef {
            channel_id: ch.clone(),
        }),
    );
    match ack_body(&conns[0].1.take(), 9) {
        AckBody::Members(m) => assert_eq!(m.members.len(), 4),
        other => panic!("{other:?}"),
    }
    // u4 leaves a channel of 4: not heard; then u3 leaves a channel of 3:
    // not heard either; u2 leaves a channel of 2: heard.
    for i in [3, 2, 1] {
        sim.send(
            conns[i].0,
            Some(20),
            ClientEvent::ChannelLeave(ChannelRef {
                channel_id: ch.clone(),
            }),
        );
    }
    assert_eq!(members(&conns[0].1.take()), [(false, "u2".to_string())]);
}

/// What every membership costs the connection: its entry in the list of
/// channels (24 bytes), and, with its first channel, the 40 bytes of
/// `Links`. A regression here is memory on every member of every channel.
#[test]
fn a_membership_stays_small() {
    use crate::engine::{JoinState, Links};
    assert_eq!(std::mem::size_of::<JoinState>(), 8);
    assert_eq!(std::mem::size_of::<(Arc<str>, JoinState)>(), 24);
    assert_eq!(std::mem::size_of::<Links>(), 40);
}
