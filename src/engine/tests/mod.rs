//! The engine of several shards driven in memory: a mesh of queues, a
//! recording outbound queue per connection, and a clock that is a number.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use super::*;
use crate::protocol::json;

#[derive(Clone, Default)]
struct Recorder {
    frames: Rc<RefCell<Vec<Bytes>>>,
    refuse: Rc<std::cell::Cell<bool>>,
    /// The close code, once the engine closed the connection.
    closed: Rc<std::cell::Cell<Option<u16>>>,
    /// The user's home shard took the connection.
    admitted: Rc<std::cell::Cell<bool>>,
}

impl Outbound for Recorder {
    fn push(&self, frame: &Bytes) -> bool {
        if self.refuse.get() {
            return false;
        }
        self.frames.borrow_mut().push(frame.clone());
        true
    }

    fn close(&self, code: u16, _reason: &str) {
        self.closed.set(Some(code));
    }

    fn admitted(&self) {
        self.admitted.set(true);
    }

    fn refused(&self, _reason: &str) {
        self.closed.set(Some(crate::ws::close::POLICY_VIOLATION));
    }
}

impl Recorder {
    fn take(&self) -> Vec<ServerMessage> {
        self.frames
            .borrow_mut()
            .drain(..)
            .map(|f| {
                let h = crate::ws::frame::parse_header(&f).unwrap().unwrap();
                let payload = &f[h.header_len..];
                if h.opcode == crate::ws::OpCode::Text {
                    json::decode_server(payload).unwrap()
                } else {
                    crate::protocol::binary::decode_server(payload).unwrap()
                }
            })
            .collect()
    }
}

/// The default settings without rate limits (the tests of limits and the
/// random sequences keep them).
fn unlimited() -> Settings {
    let mut rate_limits = limits::RateLimits::default();
    rate_limits.set("*", None).unwrap();
    Settings {
        rate_limits,
        ..Settings::default()
    }
}

#[derive(Default)]
struct Queues(Vec<VecDeque<MeshMsg>>);

impl MeshTx for Queues {
    fn send(&mut self, to: ShardId, msg: MeshMsg) {
        self.0[to as usize].push_back(msg);
    }
}

struct Sim {
    shards: Vec<Engine<Recorder>>,
    mesh: Queues,
    now: u64,
}

impl Sim {
    fn new(n: u16) -> Sim {
        Self::with(n, unlimited())
    }

    fn with(n: u16, settings: Settings) -> Sim {
        Sim {
            shards: (0..n)
                .map(|i| {
                    let mut e = Engine::new(
                        i,
                        n,
                        settings.clone(),
                        Arc::new(ShardMetrics::default()),
                        7 + i as u64,
                    );
                    // A subscription token here is `sub:<user>:<channel>`.
                    e.set_subscription_check(Box::new(|token, user, channel| {
                        if token == format!("sub:{user}:{channel}") {
                            Ok(())
                        } else {
                            Err(format!("bad subscription token `{token}`"))
                        }
                    }));
                    e
                })
                .collect(),
            // The shards, then the extra endpoints (server API, bridge, ban
            // store).
            mesh: Queues((0..n + 3).map(|_| VecDeque::new()).collect()),
            now: 1_000,
        }
    }

    fn connect(&mut self, shard: u16, user: &str, protocol: Protocol) -> (ConnRef, Recorder) {
        self.connect_device(shard, user, protocol, DeviceKind::Web)
    }

    fn connect_device(
        &mut self,
        shard: u16,
        user: &str,
        protocol: Protocol,
        device: DeviceKind,
    ) -> (ConnRef, Recorder) {
        self.connect_with(shard, user, protocol, device, Access::default())
    }

    /// A JSON web connection with these roles and grants.
    fn connect_as(&mut self, shard: u16, user: &str, access: Access) -> (ConnRef, Recorder) {
        self.connect_with(shard, user, Protocol::Json, DeviceKind::Web, access)
    }

    fn connect_with(
        &mut self,
        shard: u16,
        user: &str,
        protocol: Protocol,
        device: DeviceKind,
        access: Access,
    ) -> (ConnRef, Recorder) {
        let rec = Recorder::default();
        let member = Member {
            user: user.into(),
            session: SessionId(
                shard as u64,
                user.bytes()
                    .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)),
            ),
            protocol,
        };
        let conn = self.shards[shard as usize].open(
            rec.clone(),
            member,
            device,
            access,
            self.now,
            &mut self.mesh,
        );
        self.settle();
        (ConnRef { shard, conn }, rec)
    }

    /// Delivers mesh messages until every queue is empty.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            for s in 0..self.shards.len() {
                while let Some(m) = self.mesh.0[s].pop_front() {
                    self.shards[s].handle_mesh(m, self.now, &mut self.mesh);
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn send(&mut self, c: ConnRef, id: Option<u64>, event: ClientEvent) {
        self.shards[c.shard as usize].handle(
            c.conn,
            ClientMessage { id, event },
            self.now,
            &mut self.mesh,
        );
        self.settle();
    }

    /// Sends a frame's payload as the shell does (`text`: a text frame).
    fn send_frame(&mut self, c: ConnRef, text: bool, payload: &[u8]) {
        let mut buf = payload.to_vec();
        self.shards[c.shard as usize].handle_frame(
            c.conn,
            text,
            &mut buf,
            &mut json::Scratch::default(),
            self.now,
            &mut self.mesh,
        );
        self.settle();
    }

    fn join(&mut self, c: ConnRef, channel: &str) {
        self.send(
            c,
            Some(1),
            ClientEvent::ChannelJoin(ChannelJoin {
                channel_id: channel.into(),
                since: None,
                token: None,
            }),
        );
    }

    fn publish(&mut self, c: ConnRef, channel: &str, content: &str) {
        let m = MessageSend {
            channel_id: channel.into(),
            content: content.into(),
            reply_to: None,
            thread_id: None,
            mentions: Vec::new(),
            nonce: None,
        };
        self.send(c, Some(2), ClientEvent::MessageSend(m));
    }

    fn close(&mut self, c: ConnRef) {
        self.shards[c.shard as usize].close(c.conn, self.now, &mut self.mesh);
        self.settle();
    }

    /// Moves the clock on and runs every shard's due deadlines.
    fn advance(&mut self, ms: u64) {
        self.now += ms;
        for s in 0..self.shards.len() {
            self.shards[s].tick(self.now, &mut self.mesh);
        }
        self.settle();
    }
}

fn names(msgs: &[ServerMessage]) -> Vec<&'static str> {
    msgs.iter().map(|m| m.event.name()).collect()
}

/// The ack of request `id`.
fn ack_body(msgs: &[ServerMessage], id: u64) -> AckBody {
    msgs.iter()
        .find_map(|m| match &m.event {
            ServerEvent::Ack(a) if m.id == Some(id) => Some(a.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no ack {id} in {msgs:?}"))
}

/// The error code that answered request `id`.
fn error_code(msgs: &[ServerMessage], id: u64) -> ErrorCode {
    msgs.iter()
        .find_map(|m| match &m.event {
            ServerEvent::Error(e) if m.id == Some(id) => Some(e.code),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no error {id} in {msgs:?}"))
}

/// Every event `pick` recognises, in order.
fn picked<T>(msgs: &[ServerMessage], pick: impl Fn(&ServerEvent) -> Option<T>) -> Vec<T> {
    msgs.iter().filter_map(|m| pick(&m.event)).collect()
}

fn contents(msgs: &[ServerMessage]) -> Vec<(u64, String)> {
    msgs.iter()
        .filter_map(|m| match &m.event {
            ServerEvent::MessageNew(n) => Some((n.offset, n.content.clone())),
            _ => None,
        })
        .collect()
}

/// A channel whose owner is `owner` among `n` shards.
fn channel_owned_by(owner: u16, n: u16) -> String {
    (0..)
        .map(|i| format!("room-{i}"))
        .find(|c| owner_of(c, n) == owner)
        .unwrap()
}

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

fn join_since(channel: &str, offset: u64, epoch: &str) -> ClientEvent {
    ClientEvent::ChannelJoin(ChannelJoin {
        channel_id: channel.into(),
        since: Some(Since {
            offset,
            epoch: epoch.into(),
        }),
        token: None,
    })
}

fn message_ref(channel: &str, id: &str) -> MessageRef {
    MessageRef {
        channel_id: channel.into(),
        message_id: id.into(),
    }
}

/// The epoch of a channel, as the owner numbers it.
fn epoch_of(sim: &Sim, channel: &str) -> String {
    let owner = owner_of(channel, sim.shards.len() as u16) as usize;
    sim.shards[owner].owned[channel].epoch.to_string()
}

#[test]
fn recovery_replays_exactly_what_was_missed_or_says_it_cannot() {
    let settings = Settings {
        history_size: 4,
        ..unlimited()
    };
    let mut sim = Sim::with(3, settings);
    let ch = channel_owned_by(2, 3);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    sim.join(a, &ch);
    for i in 1..=5 {
        sim.publish(a, &ch, &format!("m{i}"));
    }
    ra.take();
    let epoch = epoch_of(&sim, &ch);
    // A client that saw offset 2 comes back on another shard, in binary.
    let (b, rb) = sim.connect(1, "bob", Protocol::Binary);
    sim.send(b, Some(7), join_since(&ch, 2, &epoch));
    let got = rb.take();
    match ack_body(&got, 7) {
        AckBody::Join(j) => assert_eq!((j.recovered, j.offset), (Some(true), 5)),
        other => panic!("{other:?}"),
    }
    assert_eq!(names(&got)[0], "ack", "the answer comes before the replay");
    assert_eq!(
        contents(&got),
        vec![(3, "m3".into()), (4, "m4".into()), (5, "m5".into())]
    );
    // Live messages follow the replay, once.
    sim.publish(a, &ch, "m6");
    assert_eq!(contents(&rb.take()), vec![(6, "m6".into())]);
    // The history keeps 4 events: offset 1 is too old to recover from.
    let (c, rc) = sim.connect(2, "carol", Protocol::Json);
    sim.send(c, Some(8), join_since(&ch, 1, &epoch));
    let got = rc.take();
    match ack_body(&got, 8) {
        AckBody::Join(j) => assert_eq!(j.recovered, Some(false)),
        other => panic!("{other:?}"),
    }
    assert!(contents(&got).is_empty(), "nothing is papered over");
    // Another epoch (the channel restarted) cannot be recovered either.
    let (d, rd) = sim.connect(0, "dave", Protocol::Json);
    sim.send(d, Some(9), join_since(&ch, 5, "0000000000000000"));
    match ack_body(&rd.take(), 9) {
        AckBody::Join(j) => assert_eq!(j.recovered, Some(false)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn history_pages_through_what_the_channel_keeps() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(1, 2);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    sim.join(a, &ch);
    for i in 1..=7 {
        sim.publish(a, &ch, &format!("m{i}"));
    }
    ra.take();
    let page = |sim: &mut Sim, id: u64, limit: u32, before: Option<u64>| {
        sim.send(
            a,
            Some(id),
            ClientEvent::ChannelGetHistory(GetHistory {
                channel_id: ch.clone(),
                limit: Some(limit),
                before,
            }),
        );
        match ack_body(&ra.take(), id) {
            AckBody::History(h) => (
                h.messages
                    .iter()
                    .map(|m| m.message.content.clone())
                    .collect::<Vec<_>>(),
                h.has_more,
            ),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(
        page(&mut sim, 10, 3, None),
        (vec!["m5".into(), "m6".into(), "m7".into()], true)
    );
    assert_eq!(
        page(&mut sim, 11, 3, Some(5)),
        (vec!["m2".into(), "m3".into(), "m4".into()], true)
    );
    assert_eq!(page(&mut sim, 12, 3, Some(2)), (vec!["m1".into()], false));
    // Only members read a channel's history.
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    sim.send(
        b,
        Some(13),
        ClientEvent::ChannelGetHistory(GetHistory {
            channel_id: ch.clone(),
            limit: None,
            before: None,
        }),
    );
    assert_eq!(error_code(&rb.take(), 13), ErrorCode::Forbidden);
}

#[test]
fn edits_deletes_and_reactions_are_sequenced_and_recoverable() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(0, 2);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Binary);
    sim.join(a, &ch);
    sim.join(b, &ch);
    sim.publish(a, &ch, "hello");
    let id = match ack_body(&ra.take(), 2) {
        AckBody::Send(s) => s.message_id,
        other => panic!("{other:?}"),
    };
    rb.take();
    let edit = |content: &str| {
        ClientEvent::MessageEdit(MessageEdit {
            channel_id: ch.clone(),
            message_id: id.clone(),
            content: content.into(),
        })
    };
    let react = |emoji: &str, action| {
        ClientEvent::MessageReact(MessageReact {
            channel_id: ch.clone(),
            message_id: id.clone(),
            emoji: emoji.into(),
            action,
        })
    };
    // Only the author edits.
    sim.send(b, Some(20), edit("hacked"));
    assert_eq!(error_code(&rb.take(), 20), ErrorCode::Forbidden);
    sim.send(a, Some(21), edit("hello, world"));
    match ack_body(&ra.take(), 21) {
        AckBody::Event(e) => assert_eq!(e.offset, 2),
        other => panic!("{other:?}"),
    }
    let edited = picked(&rb.take(), |e| match e {
        ServerEvent::MessageEdited(m) => Some((m.offset, m.content.clone())),
        _ => None,
    });
    assert_eq!(edited, vec![(2, "hello, world".to_string())]);
    // One reaction per user per emoji; counts per emoji.
    sim.send(b, Some(22), react("👍", ReactAction::Add));
    sim.send(b, Some(23), react("👍", ReactAction::Add));
    sim.send(a, Some(24), react("👍", ReactAction::Add));
    sim.send(b, Some(25), react("👍", ReactAction::Remove));
    sim.send(b, Some(26), react("🎉", ReactAction::Remove));
    let reactions = picked(&ra.take(), |e| match e {
        ServerEvent::MessageReaction(r) => Some((r.user_id.clone(), r.action, r.count, r.offset)),
        _ => None,
    });
    assert_eq!(
        reactions,
        vec![
            ("bob".to_string(), ReactAction::Add, 1, 3),
            ("alice".to_string(), ReactAction::Add, 2, 4),
            ("bob".to_string(), ReactAction::Remove, 1, 5),
        ],
        "a repeated add and a remove of nothing change nothing"
    );
    let bob_acks = rb.take();
    for id in [22, 23, 25, 26] {
        assert!(matches!(ack_body(&bob_acks, id), AckBody::Event(_)));
    }
    // History shows the message as it stands.
    sim.send(
        a,
        Some(27),
        ClientEvent::ChannelGetHistory(GetHistory {
            channel_id: ch.clone(),
            limit: None,
            before: None,
        }),
    );
    match ack_body(&ra.take(), 27) {
        AckBody::History(h) => {
            let m = &h.messages[0];
            assert_eq!(m.message.content, "hello, world");
            assert_eq!(m.edited_at, Some(sim.now));
            assert_eq!(m.reactions.len(), 1);
            assert_eq!(
                (m.reactions[0].count, m.reactions[0].user_ids.clone()),
                (1, vec!["alice".to_string()])
            );
        }
        other => panic!("{other:?}"),
    }
    // Only the author deletes; then the message is gone.
    sim.send(
        b,
        Some(28),
        ClientEvent::MessageDelete(message_ref(&ch, &id)),
    );
    assert_eq!(error_code(&rb.take(), 28), ErrorCode::Forbidden);
    sim.send(
        a,
        Some(29),
        ClientEvent::MessageDelete(message_ref(&ch, &id)),
    );
    assert_eq!(names(&rb.take()), ["message:deleted"]);
    sim.send(a, Some(30), edit("again"));
    assert_eq!(error_code(&ra.take(), 30), ErrorCode::NotFound);
    // A client that saw only the message gets every later event, in order.
    let epoch = epoch_of(&sim, &ch);
    let (c, rc) = sim.connect(1, "carol", Protocol::Json);
    sim.send(c, Some(31), join_since(&ch, 1, &epoch));
    let replayed: Vec<&str> = names(&rc.take()).into_iter().skip(1).collect();
    assert_eq!(
        replayed,
        [
            "message:edited",
            "message:reaction",
            "message:reaction",
            "message:reaction",
            "message:deleted"
        ]
    );
}

#[test]
fn a_resent_nonce_is_answered_but_not_published_twice() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(1, 2);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    sim.join(a, &ch);
    sim.join(b, &ch);
    ra.take();
    rb.take();
    let send = MessageSend {
        nonce: Some("n-1".into()),
        ..MessageSend::new(ch.as_str(), "once")
    };
    sim.send(a, Some(40), ClientEvent::MessageSend(send.clone()));
    sim.send(a, Some(41), ClientEvent::MessageSend(send));
    let got = ra.take();
    let (first, second) = match (ack_body(&got, 40), ack_body(&got, 41)) {
        (AckBody::Send(x), AckBody::Send(y)) => (x, y),
        other => panic!("{other:?}"),
    };
    assert!(!first.duplicate && second.duplicate);
    assert_eq!(first.message_id, second.message_id);
    assert_eq!(second.nonce.as_deref(), Some("n-1"));
    let news = picked(&rb.take(), |e| match e {
        ServerEvent::MessageNew(m) => Some(m.nonce.clone()),
        _ => None,
    });
    assert_eq!(
        news,
        vec![Some("n-1".to_string())],
        "published once, nonce echoed"
    );
}

fn notifications(msgs: &[ServerMessage]) -> Vec<Notification> {
    picked(msgs, |e| match e {
        ServerEvent::NotificationNew(n) => Some(n.clone()),
        _ => None,
    })
}

#[test]
fn mentions_notify_users_outside_the_channel_now_or_when_they_connect() {
    let mut sim = Sim::new(3);
    let ch = channel_owned_by(0, 3);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    let (_c, rc) = sim.connect(2, "carol", Protocol::Binary);
    sim.join(a, &ch);
    sim.join(b, &ch);
    ra.take();
    rb.take();
    let send = MessageSend {
        mentions: vec![
            "bob".into(),
            "carol".into(),
            "dave".into(),
            "alice".into(),
            "carol".into(),
        ],
        ..MessageSend::new(ch.as_str(), "hey all")
    };
    sim.send(a, Some(50), ClientEvent::MessageSend(send));
    let to_bob = rb.take();
    let mentions = picked(&to_bob, |e| match e {
        ServerEvent::MessageNew(m) => Some(m.mentions.clone()),
        _ => None,
    });
    assert_eq!(
        mentions,
        vec![vec![
            "bob".to_string(),
            "carol".into(),
            "dave".into(),
            "alice".into()
        ]]
    );
    assert!(notifications(&to_bob).is_empty(), "bob is in the channel");
    assert!(
        notifications(&ra.take()).is_empty(),
        "no notification for mentioning oneself"
    );
    let to_carol = notifications(&rc.take());
    assert_eq!(to_carol.len(), 1, "one notification despite two mentions");
    assert_eq!(to_carol[0].kind, "mention");
    let data: serde_json::Value =
        serde_json::from_str(&to_carol[0].data.as_ref().unwrap().0).unwrap();
    assert_eq!(
        (data["channelId"].as_str(), data["fromUserId"].as_str()),
        (Some(ch.as_str()), Some("alice"))
    );
    // Dave was offline: his notification waits for him.
    sim.advance(1000);
    let (d, rd) = sim.connect(1, "dave", Protocol::Json);
    let on_connect = notifications(&rd.take());
    assert_eq!(on_connect.len(), 1);
    let nid = on_connect[0].notification_id.clone();
    sim.send(d, Some(51), ClientEvent::NotificationGetPending);
    match ack_body(&rd.take(), 51) {
        AckBody::Notifications(n) => {
            assert_eq!(n.notifications.len(), 1);
            assert!(!n.notifications[0].read);
        }
        other => panic!("{other:?}"),
    }
    sim.send(
        d,
        Some(52),
        ClientEvent::NotificationRead(NotificationIds {
            notification_ids: vec![nid.clone()],
        }),
    );
    sim.send(d, Some(53), ClientEvent::NotificationGetPending);
    match ack_body(&rd.take(), 53) {
        AckBody::Notifications(n) => assert!(n.notifications[0].read),
        other => panic!("{other:?}"),
    }
    sim.send(
        d,
        Some(54),
        ClientEvent::NotificationClear(NotificationRef {
            notification_id: nid.clone(),
        }),
    );
    sim.send(
        d,
        Some(55),
        ClientEvent::NotificationClear(NotificationRef {
            notification_id: nid,
        }),
    );
    let got = rd.take();
    assert!(matches!(ack_body(&got, 54), AckBody::Empty(_)));
    assert_eq!(error_code(&got, 55), ErrorCode::NotFound);
}

#[test]
fn notifications_expire() {
    let settings = Settings {
        notification_ttl_ms: 10_000,
        ..unlimited()
    };
    let mut sim = Sim::with(2, settings);
    let ch = channel_owned_by(0, 2);
    let (a, _ra) = sim.connect(0, "alice", Protocol::Json);
    sim.join(a, &ch);
    let send = MessageSend {
        mentions: vec!["zed".into()],
        ..MessageSend::new(ch.as_str(), "ping")
    };
    sim.send(a, Some(1), ClientEvent::MessageSend(send));
    sim.advance(10_001);
    let (_z, rz) = sim.connect(1, "zed", Protocol::Json);
    assert!(
        notifications(&rz.take()).is_empty(),
        "expired before zed came"
    );
    let home = home_of("zed", 2) as usize;
    assert!(sim.shards[home]
        .users
        .get("zed")
        .is_none_or(|u| u.extra().is_none_or(|m| m.notifications.is_empty())));
}

#[test]
fn typing_is_announced_once_expires_and_stops_with_a_message_or_a_drop() {
    let settings = Settings {
        typing_timeout_ms: 8000,
        ..unlimited()
    };
    let mut sim = Sim::with(2, settings);
    let ch = channel_owned_by(1, 2);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    sim.join(a, &ch);
    sim.join(b, &ch);
    ra.take();
    rb.take();
    let typing = |start| {
        let c = ChannelRef {
            channel_id: ch.clone(),
        };
        if start {
            ClientEvent::TypingStart(c)
        } else {
            ClientEvent::TypingStop(c)
        }
    };
    sim.send(a, Some(60), typing(true));
    assert_eq!(names(&rb.take()), ["typing:user_start"]);
    assert_eq!(
        names(&ra.take()),
        ["ack"],
        "the typist does not hear itself"
    );
    sim.advance(3000);
    sim.send(a, Some(61), typing(true));
    assert!(
        rb.take().is_empty(),
        "a repeated start is not broadcast again"
    );
    sim.send(
        b,
        Some(62),
        ClientEvent::TypingGetActive(ChannelRef {
            channel_id: ch.clone(),
        }),
    );
    match ack_body(&rb.take(), 62) {
        AckBody::Typing(t) => assert_eq!(t.user_ids, ["alice"]),
        other => panic!("{other:?}"),
    }
    // The refresh moved the expiry: 8 s after the first start it still runs.
    sim.advance(5500);
    assert!(rb.take().is_empty());
    sim.advance(3000);
    assert_eq!(names(&rb.take()), ["typing:user_stop"]);
    // A message stops typing, before it arrives.
    sim.send(a, Some(63), typing(true));
    rb.take();
    sim.publish(a, &ch, "done");
    assert_eq!(names(&rb.take()), ["typing:user_stop", "message:new"]);
    // So does dropping the connection.
    sim.send(a, Some(64), typing(true));
    rb.take();
    sim.close(a);
    assert_eq!(
        names(&rb.take()),
        ["typing:user_stop", "channel:member_left"]
    );
    sim.advance(10_000);
    assert!(rb.take().is_empty(), "nothing left to expire");
}

fn presence_changes(msgs: &[ServerMessage]) -> Vec<(String, Status, Vec<DeviceKind>)> {
    picked(msgs, |e| match e {
        ServerEvent::PresenceChanged(p) => Some((p.user_id.clone(), p.status, p.devices.clone())),
        _ => None,
    })
}

fn presence_update(status: Option<Status>, custom: Option<Option<&str>>) -> ClientEvent {
    ClientEvent::PresenceUpdate(PresenceUpdate {
        status,
        custom_status: custom.map(|c| c.map(Into::into)),
        activity: None,
        device: None,
    })
}

#[test]
fn presence_aggregates_devices_announces_only_changes_and_waits_out_the_grace() {
    let settings = Settings {
        presence_grace_ms: 5000,
        ..unlimited()
    };
    let mut sim = Sim::with(3, settings);
    let (w, rw) = sim.connect(0, "watcher", Protocol::Json);
    sim.send(
        w,
        Some(1),
        ClientEvent::PresenceSubscribe(UserIds {
            user_ids: vec!["alice".into()],
        }),
    );
    match ack_body(&rw.take(), 1) {
        AckBody::Presences(p) => assert_eq!(p.presences[0].status, Status::Offline),
        other => panic!("{other:?}"),
    }
    use DeviceKind::{Mobile, Web};
    let (a1, ra1) = sim.connect_device(1, "alice", Protocol::Json, Web);
    assert_eq!(
        presence_changes(&rw.take()),
        [("alice".into(), Status::Online, vec![Web])]
    );
    let (a2, ra2) = sim.connect_device(2, "alice", Protocol::Binary, Mobile);
    assert_eq!(
        presence_changes(&rw.take()),
        [("alice".into(), Status::Online, vec![Mobile, Web])]
    );
    // The most available device wins: dnd on one, online on the other.
    sim.send(a1, Some(2), presence_update(Some(Status::Dnd), None));
    assert!(
        presence_changes(&rw.take()).is_empty(),
        "still online thanks to the phone"
    );
    sim.send(a2, Some(3), presence_update(Some(Status::Idle), None));
    assert_eq!(
        presence_changes(&rw.take()),
        [("alice".into(), Status::Idle, vec![Mobile, Web])]
    );
    // An invisible device disappears from what others see.
    sim.send(a2, Some(4), presence_update(Some(Status::Invisible), None));
    assert_eq!(
        presence_changes(&rw.take()),
        [("alice".into(), Status::Dnd, vec![Web])]
    );
    sim.send(
        a1,
        Some(5),
        presence_update(None, Some(Some("in a meeting"))),
    );
    sim.send(
        a1,
        Some(6),
        presence_update(None, Some(Some("in a meeting"))),
    );
    let custom = picked(&rw.take(), |e| match e {
        ServerEvent::PresenceChanged(p) => Some(p.custom_status.clone()),
        _ => None,
    });
    assert_eq!(
        custom,
        vec![Some("in a meeting".to_string())],
        "the same update twice is announced once"
    );
    sim.send(a1, Some(7), presence_update(Some(Status::Offline), None));
    assert_eq!(error_code(&ra1.take(), 7), ErrorCode::BadRequest);
    ra2.take();
    // A quick reconnect within the grace period does not flap.
    sim.close(a2);
    sim.close(a1);
    sim.advance(2000);
    assert!(presence_changes(&rw.take()).is_empty());
    let (a3, _ra3) = sim.connect_device(1, "alice", Protocol::Json, Web);
    sim.advance(10_000);
    let seen = presence_changes(&rw.take());
    assert_eq!(
        seen,
        [("alice".into(), Status::Online, vec![Web])],
        "back online: her statuses were per device"
    );
    // Gone for good: offline once the grace period is over, not before.
    sim.close(a3);
    sim.advance(4000);
    assert!(presence_changes(&rw.take()).is_empty());
    sim.advance(1001);
    assert_eq!(
        presence_changes(&rw.take()),
        [("alice".into(), Status::Offline, vec![])]
    );
    // Bulk queries keep the order asked; unknown users are offline.
    sim.send(
        w,
        Some(8),
        ClientEvent::PresenceGetBulk(UserIds {
            user_ids: vec!["nobody".into(), "alice".into(), "watcher".into()],
        }),
    );
    match ack_body(&rw.take(), 8) {
        AckBody::Presences(p) => {
            let got: Vec<(&str, Status)> = p
                .presences
                .iter()
                .map(|v| (v.user_id.as_str(), v.status))
                .collect();
            assert_eq!(
                got,
                [
                    ("nobody", Status::Offline),
                    ("alice", Status::Offline),
                    ("watcher", Status::Online)
                ]
            );
            assert!(p.presences[1].last_seen > 0);
        }
        other => panic!("{other:?}"),
    }
    // After unsubscribing, nothing more arrives.
    sim.send(
        w,
        Some(9),
        ClientEvent::PresenceUnsubscribe(UserIds {
            user_ids: vec!["alice".into()],
        }),
    );
    rw.take();
    sim.connect(2, "alice", Protocol::Json);
    assert!(presence_changes(&rw.take()).is_empty());
}

#[test]
fn presence_subscriptions_are_bounded_and_dropped_with_the_connection() {
    let settings = Settings {
        max_subscriptions: 3,
        ..unlimited()
    };
    let mut sim = Sim::with(2, settings);
    let (w, rw) = sim.connect(0, "watcher", Protocol::Json);
    let users = |n: usize| UserIds {
        user_ids: (0..n).map(|i| format!("u{i}")).collect(),
    };
    sim.send(w, Some(1), ClientEvent::PresenceSubscribe(users(4)));
    assert_eq!(error_code(&rw.take(), 1), ErrorCode::TooLarge);
    sim.send(w, Some(2), ClientEvent::PresenceSubscribe(users(3)));
    assert!(matches!(ack_body(&rw.take(), 2), AckBody::Presences(p) if p.presences.len() == 3));
    let subscribers = |sim: &Sim| -> usize {
        sim.shards
            .iter()
            .flat_map(|s| s.users.values())
            .map(|u| u.extra().map_or(0, |m| m.subscribers.len()))
            .sum()
    };
    assert_eq!(subscribers(&sim), 3);
    sim.close(w);
    assert_eq!(
        subscribers(&sim),
        0,
        "closing a connection removes its subscriptions everywhere"
    );
}

#[test]
fn direct_messages_reach_every_device_of_both_users() {
    let mut sim = Sim::new(3);
    let (a1, ra1) = sim.connect(0, "alice", Protocol::Json);
    let (_a2, ra2) = sim.connect(1, "alice", Protocol::Binary);
    let (b1, rb1) = sim.connect(1, "bob", Protocol::Json);
    let (_b2, rb2) = sim.connect(2, "bob", Protocol::Json);
    let dm = |text: &str, nonce: &str| {
        ClientEvent::DmSend(DmSend {
            to_user_id: "bob".into(),
            content: text.into(),
            nonce: Some(nonce.into()),
        })
    };
    sim.send(a1, Some(1), dm("hi bob", "n1"));
    let got = ra1.take();
    let id = match ack_body(&got, 1) {
        AckBody::Dm(d) => {
            assert!(!d.duplicate);
            d.message_id
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(
        names(&got),
        ["ack"],
        "the sending device gets the ack, not dm:sent"
    );
    let sent = picked(&ra2.take(), |e| match e {
        ServerEvent::DmSent(m) => Some(m.message_id.clone()),
        _ => None,
    });
    assert_eq!(sent, vec![id.clone()]);
    for r in [&rb1, &rb2] {
        let new = picked(&r.take(), |e| match e {
            ServerEvent::DmNew(m) => Some((
                m.message_id.clone(),
                m.from_user_id.clone(),
                m.content.clone(),
            )),
            _ => None,
        });
        assert_eq!(
            new,
            vec![(id.clone(), "alice".to_string(), "hi bob".to_string())]
        );
    }
    // A resend is recognised.
    sim.send(a1, Some(2), dm("hi bob", "n1"));
    assert!(
        matches!(ack_body(&ra1.take(), 2), AckBody::Dm(d) if d.duplicate && d.message_id == id)
    );
    assert!(rb1.take().is_empty() && rb2.take().is_empty());
    // Conversations: bob has one unread from alice; alice's is read.
    sim.send(
        b1,
        Some(3),
        ClientEvent::DmGetConversations(Limit { limit: None }),
    );
    match ack_body(&rb1.take(), 3) {
        AckBody::Conversations(c) => {
            assert_eq!(c.conversations.len(), 1);
            assert_eq!(
                (
                    c.conversations[0].user_id.as_str(),
                    c.conversations[0].unread
                ),
                ("alice", 1)
            );
            assert_eq!(c.conversations[0].last_message.content, "hi bob");
        }
        other => panic!("{other:?}"),
    }
    sim.send(
        a1,
        Some(4),
        ClientEvent::DmGetConversations(Limit { limit: None }),
    );
    match ack_body(&ra1.take(), 4) {
        AckBody::Conversations(c) => assert_eq!(
            (
                c.conversations[0].user_id.as_str(),
                c.conversations[0].unread
            ),
            ("bob", 0)
        ),
        other => panic!("{other:?}"),
    }
    // Bad input is refused with the field named.
    sim.send(
        a1,
        Some(5),
        ClientEvent::DmSend(DmSend {
            to_user_id: String::new(),
            content: "x".into(),
            nonce: None,
        }),
    );
    assert_eq!(error_code(&ra1.take(), 5), ErrorCode::BadRequest);
}

#[test]
fn delivery_and_read_receipts() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(1, 2);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (a2, ra2) = sim.connect(1, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    sim.join(a, &ch);
    sim.join(b, &ch);
    sim.publish(a, &ch, "read me");
    let id = match ack_body(&ra.take(), 2) {
        AckBody::Send(s) => s.message_id,
        other => panic!("{other:?}"),
    };
    rb.take();
    sim.send(
        b,
        Some(10),
        ClientEvent::MessageDelivered(message_ref(&ch, &id)),
    );
    // The author hears of it on every device, even one not in the channel.
    for r in [&ra, &ra2] {
        let d = picked(&r.take(), |e| match e {
            ServerEvent::MessageDelivery(d) => Some((d.message_id.clone(), d.user_id.clone())),
            _ => None,
        });
        assert_eq!(d, vec![(id.clone(), "bob".to_string())]);
    }
    let _ = a2;
    sim.send(
        b,
        Some(11),
        ClientEvent::MessageMarkRead(message_ref(&ch, &id)),
    );
    sim.send(
        b,
        Some(12),
        ClientEvent::MessageMarkRead(message_ref(&ch, &id)),
    );
    let receipts = picked(&ra.take(), |e| match e {
        ServerEvent::MessageReadReceipt(r) => Some((r.user_id.clone(), r.offset)),
        _ => None,
    });
    assert_eq!(
        receipts,
        vec![("bob".to_string(), 1)],
        "marking again changes nothing"
    );
    sim.send(
        a,
        Some(13),
        ClientEvent::MessageGetReadReceipts(message_ref(&ch, &id)),
    );
    match ack_body(&ra.take(), 13) {
        AckBody::ReadReceipts(r) => assert_eq!(
            r.readers
                .iter()
                .map(|r| r.user_id.as_str())
                .collect::<Vec<_>>(),
            ["bob"]
        ),
        other => panic!("{other:?}"),
    }
    sim.send(
        b,
        Some(14),
        ClientEvent::MessageMarkRead(message_ref(&ch, "nope-1")),
    );
    assert_eq!(error_code(&rb.take(), 14), ErrorCode::NotFound);
}

#[test]
fn voice_keeps_one_channel_per_user_broadcasts_state_and_mints_tokens() {
    let lk = crate::livekit::LiveKit {
        url: "wss://livekit.example".into(),
        api_key: "APIkey".into(),
        api_secret: "a-livekit-secret-of-some-length".into(),
        token_ttl_s: 600,
    };
    let settings = Settings {
        livekit: Some(lk.clone()),
        ..unlimited()
    };
    let mut sim = Sim::with(3, settings);
    let (v1, v2) = (channel_owned_by(1, 3), channel_owned_by(2, 3));
    let (a1, ra1) = sim.connect(0, "alice", Protocol::Json);
    let (a2, ra2) = sim.connect(2, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    sim.join(b, &v1);
    sim.join(b, &v2);
    rb.take();
    let join = |c: &str| {
        ClientEvent::VoiceJoin(ChannelRef {
            channel_id: c.into(),
        })
    };
    sim.send(a1, Some(1), join(&v1));
    let token = match ack_body(&ra1.take(), 1) {
        AckBody::Voice(v) => {
            assert_eq!(v.participants.len(), 1);
            assert_eq!(v.server_url.as_deref(), Some("wss://livekit.example"));
            v.token.expect("a token")
        }
        other => panic!("{other:?}"),
    };
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_issuer(&["APIkey"]);
    validation.validate_nbf = true;
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(lk.api_secret.as_bytes()),
        &validation,
    );
    // The clock of the simulation is 1970; check the claims, not the time.
    let claims = match claims {
        Ok(c) => c.claims,
        Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
            let mut v = validation.clone();
            v.validate_exp = false;
            v.validate_nbf = false;
            jsonwebtoken::decode::<serde_json::Value>(
                &token,
                &jsonwebtoken::DecodingKey::from_secret(lk.api_secret.as_bytes()),
                &v,
            )
            .unwrap()
            .claims
        }
        Err(e) => panic!("{e}"),
    };
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["video"]["room"], v1.as_str());
    assert_eq!(claims["video"]["roomJoin"], true);
    assert_eq!(claims["video"]["canPublish"], true);
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["nbf"].as_u64().unwrap(),
        600
    );
    assert_eq!(names(&rb.take()), ["voice:user_joined"]);
    // State changes are broadcast, no-ops are not.
    let mute = ClientEvent::VoiceUpdate(VoiceUpdate {
        muted: Some(true),
        ..VoiceUpdate::default()
    });
    sim.send(a1, Some(2), mute.clone());
    sim.send(a1, Some(3), mute);
    let states = picked(&rb.take(), |e| match e {
        ServerEvent::VoiceStateUpdate(v) => v.state.map(|s| s.muted),
        _ => None,
    });
    assert_eq!(states, vec![true]);
    // Alice joins another voice channel from her other device: she leaves the first.
    sim.send(a2, Some(4), join(&v2));
    let got = rb.take();
    let voice: Vec<(&str, String)> = got
        .iter()
        .filter_map(|m| match &m.event {
            ServerEvent::VoiceUserLeft(v) => Some(("left", v.channel_id.clone())),
            ServerEvent::VoiceUserJoined(v) => Some(("joined", v.channel_id.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(voice, [("left", v1.clone()), ("joined", v2.clone())]);
    ra2.take();
    sim.send(
        a1,
        Some(5),
        ClientEvent::VoiceUpdate(VoiceUpdate::default()),
    );
    assert_eq!(
        error_code(&ra1.take(), 5),
        ErrorCode::NotFound,
        "the first device is no longer in voice"
    );
    // Dropping the connection leaves voice.
    sim.close(a2);
    assert_eq!(names(&rb.take()), ["voice:user_left"]);
    sim.send(
        b,
        Some(6),
        ClientEvent::VoiceGetParticipants(ChannelRef {
            channel_id: v2.clone(),
        }),
    );
    assert!(
        matches!(ack_body(&rb.take(), 6), AckBody::Voice(v) if v.participants.is_empty() && v.token.is_none())
    );
}

fn call_events(msgs: &[ServerMessage]) -> Vec<(&'static str, Option<String>)> {
    msgs.iter()
        .filter_map(|m| match &m.event {
            ServerEvent::CallIncoming(c) => Some(("incoming", c.sdp.clone())),
            ServerEvent::CallAnswered(c) => Some(("answered", c.sdp.clone())),
            ServerEvent::CallRejected(c) => Some(("rejected", c.reason.clone())),
            ServerEvent::CallEnded(c) => Some(("ended", c.reason.clone())),
            ServerEvent::CallMissed(c) => Some(("missed", c.reason.clone())),
            ServerEvent::CallIceCandidate(c) => Some(("ice", Some(c.candidate.0.clone()))),
            _ => None,
        })
        .collect()
}

fn initiate(to: &str) -> ClientEvent {
    ClientEvent::CallInitiate(CallInitiate {
        to_user_id: to.into(),
        call_type: CallType::Video,
        sdp: Some("offer".into()),
    })
}

fn call_id(msgs: &[ServerMessage], id: u64) -> String {
    match ack_body(msgs, id) {
        AckBody::Call(c) => c.call_id,
        other => panic!("{other:?}"),
    }
}

#[test]
fn calls_ring_every_device_and_the_first_answer_wins() {
    let mut sim = Sim::new(3);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b1, rb1) = sim.connect(1, "bob", Protocol::Json);
    let (b2, rb2) = sim.connect(2, "bob", Protocol::Binary);
    let (c, rc) = sim.connect(2, "carol", Protocol::Json);
    sim.send(a, Some(1), initiate("bob"));
    let call = call_id(&ra.take(), 1);
    for r in [&rb1, &rb2] {
        assert_eq!(call_events(&r.take()), [("incoming", Some("offer".into()))]);
    }
    let ice = |call: &str, text: &str| {
        ClientEvent::CallIceCandidate(CallIce {
            call_id: call.into(),
            candidate: Json(format!("{{\"candidate\":\"{text}\"}}")),
        })
    };
    // Before an answer, the caller's candidates reach every ringing device.
    sim.send(a, Some(2), ice(&call, "c1"));
    assert_eq!(call_events(&rb1.take()).len(), 1);
    assert_eq!(call_events(&rb2.take()).len(), 1);
    sim.send(
        b2,
        Some(3),
        ClientEvent::CallAnswer(CallAnswer {
            call_id: call.clone(),
            sdp: Some("answer".into()),
        }),
    );
    assert_eq!(
        call_events(&ra.take()),
        [("answered", Some("answer".into()))]
    );
    assert_eq!(
        call_events(&rb1.take()),
        [("ended", Some("answered_elsewhere".into()))]
    );
    rb2.take();
    sim.send(
        b1,
        Some(4),
        ClientEvent::CallAnswer(CallAnswer {
            call_id: call.clone(),
            sdp: None,
        }),
    );
    assert_eq!(
        error_code(&rb1.take(), 4),
        ErrorCode::BadRequest,
        "the second answer loses"
    );
    // Now candidates go only between the two parties.
    sim.send(a, Some(5), ice(&call, "c2"));
    assert!(call_events(&rb1.take()).is_empty());
    assert_eq!(
        call_events(&rb2.take()),
        [("ice", Some("{\"candidate\":\"c2\"}".into()))]
    );
    sim.send(b2, Some(6), ice(&call, "c3"));
    assert_eq!(
        call_events(&ra.take()),
        [("ice", Some("{\"candidate\":\"c3\"}".into()))]
    );
    sim.send(c, Some(7), ice(&call, "evil"));
    assert_eq!(error_code(&rc.take(), 7), ErrorCode::Forbidden);
    sim.send(c, Some(8), ice("00ff000000000001", "evil"));
    assert_eq!(error_code(&rc.take(), 8), ErrorCode::NotFound);
    sim.send(
        a,
        Some(9),
        ClientEvent::CallEnd(CallRef {
            call_id: call.clone(),
        }),
    );
    assert_eq!(call_events(&rb2.take()), [("ended", Some("ended".into()))]);
    assert!(call_events(&rb1.take()).is_empty());
    let placed: usize = sim
        .shards
        .iter()
        .flat_map(|s| s.users.values())
        .map(|u| u.extra().map_or(0, |m| m.calls.len()))
        .sum();
    assert_eq!(placed, 0, "the caller's home forgot the call");
    assert!(sim.shards.iter().all(|s| s.calls.is_empty()));
}

#[test]
fn unanswered_rejected_and_dropped_calls() {
    let settings = Settings {
        call_ring_timeout_ms: 30_000,
        ..unlimited()
    };
    let mut sim = Sim::with(2, settings);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    // Nobody answers: missed, and bob is told.
    sim.send(a, Some(1), initiate("bob"));
    ra.take();
    rb.take();
    sim.advance(29_000);
    assert!(call_events(&ra.take()).is_empty());
    sim.advance(1_000);
    assert_eq!(
        call_events(&ra.take()),
        [("missed", Some("no_answer".into()))]
    );
    let got = rb.take();
    assert_eq!(call_events(&got), [("ended", Some("missed".into()))]);
    assert_eq!(notifications(&got)[0].kind, "missed_call");
    // Rejected.
    sim.send(a, Some(2), initiate("bob"));
    let call = call_id(&ra.take(), 2);
    rb.take();
    sim.send(
        b,
        Some(3),
        ClientEvent::CallReject(CallReject {
            call_id: call,
            reason: Some("busy".into()),
        }),
    );
    assert_eq!(call_events(&ra.take()), [("rejected", Some("busy".into()))]);
    // Calling someone offline: missed at once, noted for later.
    sim.send(a, Some(4), initiate("dave"));
    let got = ra.take();
    assert!(matches!(ack_body(&got, 4), AckBody::Call(_)));
    assert_eq!(call_events(&got), [("missed", Some("offline".into()))]);
    let (_d, rd) = sim.connect(1, "dave", Protocol::Json);
    assert_eq!(notifications(&rd.take())[0].kind, "missed_call");
    // The caller drops while ringing: bob stops ringing.
    sim.send(a, Some(5), initiate("bob"));
    ra.take();
    rb.take();
    sim.close(a);
    assert_eq!(
        call_events(&rb.take()),
        [("ended", Some("disconnected".into()))]
    );
    // The answering device drops: the caller is told.
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    sim.send(a, Some(6), initiate("bob"));
    let call = call_id(&ra.take(), 6);
    sim.send(
        b,
        Some(7),
        ClientEvent::CallAnswer(CallAnswer {
            call_id: call,
            sdp: None,
        }),
    );
    ra.take();
    sim.close(b);
    assert_eq!(
        call_events(&ra.take()),
        [("ended", Some("disconnected".into()))]
    );
    assert!(sim.shards.iter().all(|s| s.calls.is_empty()));
    sim.advance(60_000);
    assert!(
        call_events(&ra.take()).is_empty(),
        "nothing rings out later"
    );
}

#[test]
fn a_dropped_session_resumes_on_another_shard_with_exactly_what_it_missed() {
    let settings = Settings {
        resume_window_ms: 60_000,
        ..unlimited()
    };
    let mut sim = Sim::with(3, settings);
    let (c1, c2) = (channel_owned_by(1, 3), channel_owned_by(2, 3));
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(2, "bob", Protocol::Json);
    for c in [&c1, &c2] {
        sim.join(a, c);
        sim.join(b, c);
    }
    sim.publish(b, &c1, "m1");
    assert_eq!(contents(&ra.take()), vec![(1, "m1".into())]);
    let session = sim.shards[0]
        .conn(a.conn)
        .unwrap()
        .member
        .session
        .to_string();
    sim.close(a);
    sim.publish(b, &c1, "m2");
    sim.publish(b, &c1, "m3");
    sim.publish(b, &c2, "n1");
    rb.take();
    // Alice comes back elsewhere and takes her session over.
    let (a2, ra2) = sim.connect(1, "alice", Protocol::Json);
    sim.send(
        a2,
        Some(9),
        ClientEvent::SessionResume(SessionResume {
            session_id: session.clone(),
            positions: vec![],
        }),
    );
    let got = ra2.take();
    match ack_body(&got, 9) {
        AckBody::Resume(r) => {
            assert_eq!(r.session_id, session);
            let mut chans: Vec<(String, bool, u64)> = r
                .channels
                .iter()
                .map(|c| (c.channel_id.clone(), c.recovered, c.offset))
                .collect();
            chans.sort();
            let mut want = vec![(c1.clone(), true, 3), (c2.clone(), true, 1)];
            want.sort();
            assert_eq!(chans, want);
        }
        other => panic!("{other:?}"),
    }
    let mut missed: Vec<String> = picked(&got, |e| match e {
        ServerEvent::MessageNew(m) => Some(m.content.clone()),
        _ => None,
    });
    missed.sort();
    assert_eq!(
        missed,
        ["m2", "m3", "n1"],
        "each missed message once, m1 not again"
    );
    assert_eq!(
        sim.shards[1]
            .conn(a2.conn)
            .unwrap()
            .member
            .session
            .to_string(),
        session
    );
    // Live delivery continues on the new connection.
    sim.publish(b, &c1, "m4");
    assert_eq!(contents(&ra2.take()), vec![(4, "m4".into())]);
    // A session resumes once.
    let (a3, ra3) = sim.connect(2, "alice", Protocol::Json);
    sim.send(
        a3,
        Some(10),
        ClientEvent::SessionResume(SessionResume {
            session_id: session.clone(),
            positions: vec![],
        }),
    );
    assert_eq!(error_code(&ra3.take(), 10), ErrorCode::NotFound);
    // The client's own positions win over the server's record.
    let s3 = sim.shards[2]
        .conn(a3.conn)
        .unwrap()
        .member
        .session
        .to_string();
    sim.send(
        a3,
        Some(11),
        ClientEvent::ChannelJoin(ChannelJoin::new(c1.as_str())),
    );
    ra3.take();
    sim.close(a3);
    let (a4, ra4) = sim.connect(0, "alice", Protocol::Json);
    let positions = vec![Position {
        channel_id: c1.clone(),
        offset: 2,
        epoch: epoch_of(&sim, &c1),
    }];
    sim.send(
        a4,
        Some(12),
        ClientEvent::SessionResume(SessionResume {
            session_id: s3.clone(),
            positions,
        }),
    );
    assert_eq!(
        contents(&ra4.take()),
        vec![(3, "m3".into()), (4, "m4".into())]
    );
    // After the window, nothing to resume.
    sim.close(a4);
    sim.advance(60_001);
    let (a5, ra5) = sim.connect(0, "alice", Protocol::Json);
    sim.send(
        a5,
        Some(13),
        ClientEvent::SessionResume(SessionResume {
            session_id: s3,
            positions: vec![],
        }),
    );
    assert_eq!(error_code(&ra5.take(), 13), ErrorCode::NotFound);
    sim.send(
        a5,
        Some(14),
        ClientEvent::SessionResume(SessionResume {
            session_id: "nope".into(),
            positions: vec![],
        }),
    );
    assert_eq!(error_code(&ra5.take(), 14), ErrorCode::BadRequest);
}

#[test]
fn an_emptied_channel_keeps_its_history_for_recovery_then_goes() {
    let settings = Settings {
        history_ttl_ms: 10_000,
        ..unlimited()
    };
    let mut sim = Sim::with(2, settings);
    let ch = channel_owned_by(1, 2);
    let (a, _ra) = sim.connect(0, "alice", Protocol::Json);
    sim.join(a, &ch);
    sim.publish(a, &ch, "kept");
    let epoch = epoch_of(&sim, &ch);
    sim.close(a);
    sim.advance(5000);
    let (b, rb) = sim.connect(0, "alice", Protocol::Json);
    sim.send(b, Some(1), join_since(&ch, 0, &epoch));
    let got = rb.take();
    assert!(
        matches!(ack_body(&got, 1), AckBody::Join(j) if j.recovered == Some(true) && j.epoch == epoch)
    );
    assert_eq!(contents(&got), vec![(1, "kept".into())]);
    sim.close(b);
    sim.advance(10_001);
    assert!(
        sim.shards[1].owned.is_empty(),
        "gone once its history expired"
    );
}

mod sequences {
    //! Random operation sequences against three shards, with mesh messages
    //! delivered in random partial batches; then invariants.

    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Connect {
            shard: u16,
            binary: bool,
        },
        Join {
            conn: usize,
            ch: u8,
        },
        Leave {
            conn: usize,
            ch: u8,
        },
        Publish {
            conn: usize,
            ch: u8,
        },
        Close {
            conn: usize,
        },
        /// Handle up to `n` queued mesh messages of one shard.
        Step {
            shard: u16,
            n: u8,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u16..3, any::<bool>()).prop_map(|(shard, binary)| Op::Connect { shard, binary }),
            (0usize..12, 0u8..3).prop_map(|(conn, ch)| Op::Join { conn, ch }),
            (0usize..12, 0u8..3).prop_map(|(conn, ch)| Op::Leave { conn, ch }),
            (0usize..12, 0u8..3).prop_map(|(conn, ch)| Op::Publish { conn, ch }),
            (0usize..12, 0u8..3).prop_map(|(conn, ch)| Op::Publish { conn, ch }),
            (0usize..12).prop_map(|conn| Op::Close { conn }),
            (0u16..3, 1u8..8).prop_map(|(shard, n)| Op::Step { shard, n }),
            (0u16..3, 1u8..8).prop_map(|(shard, n)| Op::Step { shard, n }),
        ]
    }

    struct Client {
        at: ConnRef,
        rec: Recorder,
        open: bool,
        sent_ids: Vec<u64>,
        got: Vec<ServerMessage>,
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn invariants_hold(ops in proptest::collection::vec(op(), 1..120)) {
            let mut sim = Sim::new(3);
            let mut clients: Vec<Client> = Vec::new();
            let mut next_id = 1u64;
            let channel = |c: u8| format!("ch-{c}");
            for op in ops {
                match op {
                    Op::Connect { shard, binary } => {
                        let p = if binary { Protocol::Binary } else { Protocol::Json };
                        let (at, rec) = sim.connect(shard, &format!("u{}", clients.len()), p);
                        clients.push(Client { at, rec, open: true, sent_ids: vec![], got: vec![] });
                    }
                    Op::Join { conn, ch } | Op::Leave { conn, ch } | Op::Publish { conn, ch } => {
                        let Some(c) = clients.get_mut(conn).filter(|c| c.open) else { continue };
                        let channel_id = channel(ch);
                        let event = match op {
                            Op::Join { .. } => ClientEvent::ChannelJoin(ChannelJoin::new(channel_id)),
                            Op::Leave { .. } => ClientEvent::ChannelLeave(ChannelRef { channel_id }),
                            _ => ClientEvent::MessageSend(MessageSend { channel_id, content: format!("m{next_id}"), reply_to: None, thread_id: None, mentions: Vec::new(), nonce: None }),
                        };
                        c.sent_ids.push(next_id);
                        let msg = ClientMessage { id: Some(next_id), event };
                        next_id += 1;
                        sim.shards[c.at.shard as usize].handle(c.at.conn, msg, 0, &mut sim.mesh);
                    }
                    Op::Close { conn } => {
                        let Some(c) = clients.get_mut(conn).filter(|c| c.open) else { continue };
                        c.open = false;
                        sim.shards[c.at.shard as usize].close(c.at.conn, 0, &mut sim.mesh);
                    }
                    Op::Step { shard, n } => {
                        for _ in 0..n {
                            let Some(m) = sim.mesh.0[shard as usize].pop_front() else { break };
                            sim.shards[shard as usize].handle_mesh(m, 0, &mut sim.mesh);
                        }
                    }
                }
                for c in clients.iter_mut() {
                    c.got.extend(c.rec.take());
                }
            }
            sim.settle();
            for c in clients.iter_mut() {
                c.got.extend(c.rec.take());
            }

            // Every event of a connection still open got exactly one answer.
            for c in clients.iter().filter(|c| c.open) {
                let mut answered: Vec<u64> = c.got.iter().filter(|m| matches!(m.event, ServerEvent::Ack(_) | ServerEvent::Error(_))).filter_map(|m| m.id).collect();
                answered.sort();
                prop_assert_eq!(&answered, &c.sent_ids);
            }
            // Each connection sees each channel's messages once, in offset order.
            for c in &clients {
                for ch in 0..3u8 {
                    let offsets: Vec<u64> = c.got.iter().filter_map(|m| match &m.event {
                        ServerEvent::MessageNew(n) if n.channel_id == channel(ch) => Some(n.offset),
                        _ => None,
                    }).collect();
                    prop_assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{:?}", offsets);
                }
            }
            // The owners' member counts match the shards' member lists.
            for ch in 0..3u8 {
                let name = channel(ch);
                let owner = owner_of(&name, 3) as usize;
                let counted: Vec<[u32; 2]> = sim.shards[owner].owned.get(&*name).map(|o| o.per_shard.clone()).unwrap_or_else(|| vec![[0, 0]; 3]);
                for (s, engine) in sim.shards.iter().enumerate() {
                    let mut actual = [0u32; 2];
                    for m in engine.local.get(&*name).into_iter().flat_map(|l| l.members.iter()) {
                        actual[proto_index(m.protocol)] += 1;
                    }
                    prop_assert_eq!(counted[s], actual, "channel {} shard {}", name, s);
                }
            }
            // And a message published now reaches every member exactly once.
            for ch in 0..3u8 {
                let name = channel(ch);
                let members: Vec<usize> = clients.iter().enumerate().filter(|(_, c)| {
                    c.open && sim.shards[c.at.shard as usize].local.get(&*name).is_some_and(|l| l.members.iter().any(|m| m.conn == c.at.conn))
                }).map(|(i, _)| i).collect();
                let Some(&first) = members.first() else { continue };
                sim.publish(clients[first].at, &name, "final");
                for (i, c) in clients.iter().enumerate() {
                    let finals = contents(&c.rec.take()).into_iter().filter(|(_, t)| t == "final").count();
                    prop_assert_eq!(finals, usize::from(members.contains(&i)), "client {} channel {}", i, name);
                }
            }
        }
    }
}

mod chat_sequences {
    //! Random sequences of every kind of client event against three shards,
    //! with mesh messages delivered in random partial batches and the clock
    //! jumping: nothing panics, every request of a connection still open
    //! is answered exactly once, and once everyone has gone and every
    //! window has passed, no state is left behind.

    use super::*;
    use proptest::prelude::*;

    const USERS: usize = 4;
    const CHANNELS: u8 = 3;

    #[derive(Debug, Clone)]
    enum Op {
        Connect {
            shard: u16,
            user: usize,
            binary: bool,
        },
        Close {
            conn: usize,
        },
        Event {
            conn: usize,
            what: What,
        },
        Step {
            shard: u16,
            n: u8,
        },
        Advance {
            ms: u32,
        },
        /// Cluster mode: one round of every bridge, taking up to `n` of
        /// its shards' messages.
        Bridge {
            n: u8,
        },
        /// Cluster mode: Redis becomes reachable, or not.
        Redis {
            up: bool,
        },
        /// Cluster mode: one node cut off from Redis, or back.
        Cut {
            node: usize,
            up: bool,
        },
        /// Cluster mode: one node dies (once per run).
        Die {
            node: usize,
        },
        /// Cluster mode: Redis is at its memory limit (it refuses writes,
        /// but answers), or no longer.
        Full {
            on: bool,
        },
        /// Every queue, the bridge's included, until nothing moves.
        Settle,
    }

    #[derive(Debug, Clone)]
    enum What {
        Join {
            ch: u8,
            since: Option<u8>,
        },
        Leave {
            ch: u8,
        },
        Send {
            ch: u8,
            nonce: Option<u8>,
            mention: Option<usize>,
        },
        Edit {
            ch: u8,
            offset: u8,
        },
        Delete {
            ch: u8,
            offset: u8,
        },
        React {
            ch: u8,
            offset: u8,
            emoji: u8,
            add: bool,
        },
        History {
            ch: u8,
        },
        Members {
            ch: u8,
        },
        Typing {
            ch: u8,
            start: bool,
        },
        TypingActive {
            ch: u8,
        },
        Delivered {
            ch: u8,
            offset: u8,
        },
        MarkRead {
            ch: u8,
            offset: u8,
        },
        Receipts {
            ch: u8,
            offset: u8,
        },
        Dm {
            to: usize,
            nonce: Option<u8>,
        },
        Conversations,
        Presence {
            status: u8,
            custom: bool,
        },
        Subscribe {
            users: Vec<usize>,
        },
        Unsubscribe {
            users: Vec<usize>,
        },
        Bulk {
            users: Vec<usize>,
        },
        PresenceHeartbeat,
        VoiceJoin {
            ch: u8,
        },
        VoiceLeave,
        VoiceUpdate {
            muted: bool,
        },
        VoiceParticipants {
            ch: u8,
        },
        Call {
            to: usize,
        },
        Answer {
            call: usize,
        },
        Reject {
            call: usize,
        },
        End {
            call: usize,
        },
        Ice {
            call: usize,
        },
        Notifications {
            op: u8,
        },
        Resume {
            of: usize,
        },
        /// Only `u0` holds the roles; from anyone else it is refused.
        Kick {
            to: usize,
            ch: Option<u8>,
        },
        Ban {
            to: usize,
            ch: Option<u8>,
            ms: u16,
        },
    }

    fn what() -> impl Strategy<Value = What> {
        let ch = || 0..CHANNELS;
        let off = || 0u8..8;
        let user = || 0..USERS;
        let users = || proptest::collection::vec(0..USERS, 0..4);
        let a = prop_oneof![
            (ch(), proptest::option::of(off())).prop_map(|(ch, since)| What::Join { ch, since }),
            ch().prop_map(|ch| What::Leave { ch }),
            (
                ch(),
                proptest::option::of(0u8..3),
                proptest::option::of(user())
            )
                .prop_map(|(ch, nonce, mention)| What::Send { ch, nonce, mention }),
            (ch(), off()).prop_map(|(ch, offset)| What::Edit { ch, offset }),
            (ch(), off()).prop_map(|(ch, offset)| What::Delete { ch, offset }),
            (ch(), off(), 0u8..2, any::<bool>()).prop_map(|(ch, offset, emoji, add)| What::React {
                ch,
                offset,
                emoji,
                add
            }),
            ch().prop_map(|ch| What::History { ch }),
            ch().prop_map(|ch| What::Members { ch }),
            (ch(), any::<bool>()).prop_map(|(ch, start)| What::Typing { ch, start }),
            ch().prop_map(|ch| What::TypingActive { ch }),
            (ch(), off()).prop_map(|(ch, offset)| What::Delivered { ch, offset }),
            (ch(), off()).prop_map(|(ch, offset)| What::MarkRead { ch, offset }),
            (ch(), off()).prop_map(|(ch, offset)| What::Receipts { ch, offset }),
        ];
        let b = prop_oneof![
            (user(), proptest::option::of(0u8..3)).prop_map(|(to, nonce)| What::Dm { to, nonce }),
            Just(What::Conversations),
            (0u8..5, any::<bool>()).prop_map(|(status, custom)| What::Presence { status, custom }),
            users().prop_map(|users| What::Subscribe { users }),
            users().prop_map(|users| What::Unsubscribe { users }),
            users().prop_map(|users| What::Bulk { users }),
            Just(What::PresenceHeartbeat),
            ch().prop_map(|ch| What::VoiceJoin { ch }),
            Just(What::VoiceLeave),
            any::<bool>().prop_map(|muted| What::VoiceUpdate { muted }),
            ch().prop_map(|ch| What::VoiceParticipants { ch }),
        ];
        let c =
            prop_oneof![
                user().prop_map(|to| What::Call { to }),
                (0usize..6).prop_map(|call| What::Answer { call }),
                (0usize..6).prop_map(|call| What::Reject { call }),
                (0usize..6).prop_map(|call| What::End { call }),
                (0usize..6).prop_map(|call| What::Ice { call }),
                (0u8..4).prop_map(|op| What::Notifications { op }),
                (0usize..16).prop_map(|of| What::Resume { of }),
                (user(), proptest::option::of(ch())).prop_map(|(to, ch)| What::Kick { to, ch }),
                (user(), proptest::option::of(ch()), 1u16..30_000)
                    .prop_map(|(to, ch, ms)| What::Ban { to, ch, ms }),
            ];
        prop_oneof![4 => a, 3 => b, 2 => c]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => (0u16..3, 0..USERS, any::<bool>())
                .prop_map(|(shard, user, binary)| Op::Connect { shard, user, binary }),
            1 => (0usize..16).prop_map(|conn| Op::Close { conn }),
            10 => ((0usize..16), what()).prop_map(|(conn, what)| Op::Event { conn, what }),
            3 => (0u16..3, 1u8..10).prop_map(|(shard, n)| Op::Step { shard, n }),
            1 => (0u32..40_000).prop_map(|ms| Op::Advance { ms }),
        ]
    }

    /// Fewer connections and more joins and messages than `op`, so that
    /// channels get followed and events sequenced through the cluster.
    fn cluster_op() -> impl Strategy<Value = Op> {
        let ch = || 0..CHANNELS;
        let busy = prop_oneof![
            3 => (ch(), proptest::option::of(0u8..8)).prop_map(|(ch, since)| What::Join { ch, since }),
            4 => (ch(), proptest::option::of(0u8..3), proptest::option::of(0..USERS))
                .prop_map(|(ch, nonce, mention)| What::Send { ch, nonce, mention }),
            6 => what(),
        ];
        prop_oneof![
            2 => (0u16..4, 0..USERS, any::<bool>())
                .prop_map(|(shard, user, binary)| Op::Connect { shard, user, binary }),
            1 => (0usize..6).prop_map(|conn| Op::Close { conn }),
            10 => ((0usize..6), busy).prop_map(|(conn, what)| Op::Event { conn, what }),
            3 => (0u16..4, 1u8..10).prop_map(|(shard, n)| Op::Step { shard, n }),
            1 => (0u32..40_000).prop_map(|ms| Op::Advance { ms }),
            3 => (1u8..20).prop_map(|n| Op::Bridge { n }),
            2 => Just(Op::Settle),
            1 => any::<bool>().prop_map(|up| Op::Redis { up }),
            1 => (0usize..2, any::<bool>()).prop_map(|(node, up)| Op::Cut { node, up }),
            1 => (0usize..2).prop_map(|node| Op::Die { node }),
            1 => any::<bool>().prop_map(|on| Op::Full { on }),
        ]
    }

    /// The nodes of a run: one node of three shards, or two nodes of two
    /// shards each with their bridge cores over the in-memory Redis of the
    /// cluster tests.
    struct World {
        sims: Vec<Sim>,
        cluster: Option<super::cluster::Cluster>,
        /// A node that died: its connections are gone with it.
        dead: Option<usize>,
    }

    impl World {
        fn new(settings: Settings, cluster: bool) -> World {
            if !cluster {
                let sims = vec![Sim::with(3, settings)];
                return World {
                    sims,
                    cluster: None,
                    dead: None,
                };
            }
            let (sims, c) = super::cluster::nodes_with(2, settings);
            World {
                sims,
                cluster: Some(c),
                dead: None,
            }
        }

        /// The node and shard a random shard number stands for.
        fn place(&self, shard: u16) -> (usize, u16) {
            let nodes = self.sims.len() as u16;
            let n = (shard % nodes) as usize;
            (n, (shard / nodes) % self.sims[n].shards.len() as u16)
        }

        fn alive(&self, n: usize) -> bool {
            self.dead != Some(n)
        }

        /// Every shard of every node, and the bridges, until nothing moves.
        fn pump(&mut self) {
            match &mut self.cluster {
                Some(c) => super::cluster::pump(&mut self.sims, c),
                None => self.sims[0].settle(),
            }
        }

        fn advance(&mut self, ms: u64) {
            for sim in &mut self.sims {
                sim.now += ms;
                for s in 0..sim.shards.len() {
                    sim.shards[s].tick(sim.now, &mut sim.mesh);
                }
            }
            if let Some(c) = &mut self.cluster {
                c.clock += ms;
            }
        }
    }

    struct Client {
        node: usize,
        at: ConnRef,
        rec: Recorder,
        open: bool,
        session: String,
        sent: Vec<u64>,
        answers: Vec<u64>,
    }

    fn epoch(sim: &Sim, ch: &str) -> String {
        let owner = owner_of(ch, sim.shards.len() as u16) as usize;
        sim.shards[owner]
            .owned
            .get(ch)
            .map_or("0000000000000000".to_string(), |o| o.epoch.to_string())
    }

    fn event(sim: &Sim, what: &What, calls: &[String], clients: &[Client]) -> ClientEvent {
        use ClientEvent as E;
        let chan = |ch: u8| format!("ch-{ch}");
        let mid = |ch: u8, offset: u8| format!("{}-{offset}", epoch(sim, &chan(ch)));
        let user = |u: usize| format!("u{u}");
        let call = |i: usize| {
            calls
                .get(i)
                .cloned()
                .unwrap_or_else(|| "00000000000000ff".into())
        };
        let users = |us: &Vec<usize>| UserIds {
            user_ids: us.iter().map(|u| user(*u)).collect(),
        };
        match what.clone() {
            What::Join { ch, since } => E::ChannelJoin(ChannelJoin {
                channel_id: chan(ch),
                since: since.map(|o| Since {
                    offset: o as u64,
                    epoch: epoch(sim, &chan(ch)),
                }),
                token: None,
            }),
            What::Leave { ch } => E::ChannelLeave(ChannelRef {
                channel_id: chan(ch),
            }),
            What::Send { ch, nonce, mention } => E::MessageSend(MessageSend {
                nonce: nonce.map(|n| format!("n{n}")),
                mentions: mention.map(|u| vec![user(u)]).unwrap_or_default(),
                ..MessageSend::new(chan(ch), "x")
            }),
            What::Edit { ch, offset } => E::MessageEdit(MessageEdit {
                channel_id: chan(ch),
                message_id: mid(ch, offset),
                content: "y".into(),
            }),
            What::Delete { ch, offset } => {
                E::MessageDelete(message_ref(&chan(ch), &mid(ch, offset)))
            }
            What::React {
                ch,
                offset,
                emoji,
                add,
            } => E::MessageReact(MessageReact {
                channel_id: chan(ch),
                message_id: mid(ch, offset),
                emoji: ["👍", "🎉"][emoji as usize].into(),
                action: if add {
                    ReactAction::Add
                } else {
                    ReactAction::Remove
                },
            }),
            What::History { ch } => E::ChannelGetHistory(GetHistory {
                channel_id: chan(ch),
                limit: Some(3),
                before: None,
            }),
            What::Members { ch } => E::ChannelGetMembers(ChannelRef {
                channel_id: chan(ch),
            }),
            What::Typing { ch, start } => {
                let c = ChannelRef {
                    channel_id: chan(ch),
                };
                if start {
                    E::TypingStart(c)
                } else {
                    E::TypingStop(c)
                }
            }
            What::TypingActive { ch } => E::TypingGetActive(ChannelRef {
                channel_id: chan(ch),
            }),
            What::Delivered { ch, offset } => {
                E::MessageDelivered(message_ref(&chan(ch), &mid(ch, offset)))
            }
            What::MarkRead { ch, offset } => {
                E::MessageMarkRead(message_ref(&chan(ch), &mid(ch, offset)))
            }
            What::Receipts { ch, offset } => {
                E::MessageGetReadReceipts(message_ref(&chan(ch), &mid(ch, offset)))
            }
            What::Dm { to, nonce } => E::DmSend(DmSend {
                to_user_id: user(to),
                content: "dm".into(),
                nonce: nonce.map(|n| format!("d{n}")),
            }),
            What::Conversations => E::DmGetConversations(Limit { limit: Some(5) }),
            What::Presence { status, custom } => E::PresenceUpdate(PresenceUpdate {
                status: Some(Status::ALL[status as usize]),
                custom_status: Some(custom.then(|| "busy".to_string())),
                activity: None,
                device: None,
            }),
            What::Subscribe { users: u } => E::PresenceSubscribe(users(&u)),
            What::Unsubscribe { users: u } => E::PresenceUnsubscribe(users(&u)),
            What::Bulk { users: u } => E::PresenceGetBulk(users(&u)),
            What::PresenceHeartbeat => E::PresenceHeartbeat,
            What::VoiceJoin { ch } => E::VoiceJoin(ChannelRef {
                channel_id: chan(ch),
            }),
            What::VoiceLeave => E::VoiceLeave,
            What::VoiceUpdate { muted } => E::VoiceUpdate(VoiceUpdate {
                muted: Some(muted),
                ..VoiceUpdate::default()
            }),
            What::VoiceParticipants { ch } => E::VoiceGetParticipants(ChannelRef {
                channel_id: chan(ch),
            }),
            What::Call { to } => E::CallInitiate(CallInitiate {
                to_user_id: user(to),
                call_type: CallType::Audio,
                sdp: None,
            }),
            What::Answer { call: c } => E::CallAnswer(CallAnswer {
                call_id: call(c),
                sdp: None,
            }),
            What::Reject { call: c } => E::CallReject(CallReject {
                call_id: call(c),
                reason: None,
            }),
            What::End { call: c } => E::CallEnd(CallRef { call_id: call(c) }),
            What::Ice { call: c } => E::CallIceCandidate(CallIce {
                call_id: call(c),
                candidate: Json("{}".into()),
            }),
            What::Notifications { op } => match op {
                0 => E::NotificationGetPending,
                1 => E::NotificationRead(NotificationIds {
                    notification_ids: vec!["x".into()],
                }),
                2 => E::NotificationClear(NotificationRef {
                    notification_id: "x".into(),
                }),
                _ => E::NotificationClearAll,
            },
            What::Resume { of } => E::SessionResume(SessionResume {
                session_id: clients
                    .get(of)
                    .map_or("00000000000000000000000000000000".into(), |c| {
                        c.session.clone()
                    }),
                positions: vec![],
            }),
            What::Kick { to, ch } => E::ModerationKickUser(KickUser {
                user_id: user(to),
                channel_id: ch.map(chan),
                reason: None,
            }),
            What::Ban { to, ch, ms } => E::ModerationBanUser(BanUser {
                user_id: user(to),
                channel_id: ch.map(chan),
                duration_ms: Some(ms as u64),
                reason: None,
            }),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn every_request_is_answered_once_and_nothing_is_left_behind(
            ops in proptest::collection::vec(op(), 1..150)
        ) {
            run(ops, false)?;
        }

        /// The same on two nodes of a cluster, with Redis coming and going,
        /// a node cut off and back, or dying.
        #[test]
        fn in_a_cluster_too(
            ops in proptest::collection::vec(cluster_op(), 1..150),
        ) {
            run(ops, true)?;
        }
    }

    /// Runs `ops`, on one node or on two nodes of a cluster.
    fn run(ops: Vec<Op>, cluster: bool) -> Result<(), TestCaseError> {
        {
            let settings = Settings {
                max_channels_per_connection: 2,
                history_size: 5,
                history_ttl_ms: 20_000,
                typing_timeout_ms: 1_000,
                presence_grace_ms: 500,
                resume_window_ms: 5_000,
                call_ring_timeout_ms: 3_000,
                notification_ttl_ms: 30_000,
                max_subscriptions: 3,
                ..Settings::default()
            };
            let mut w = World::new(settings, cluster);
            let mut clients: Vec<Client> = Vec::new();
            let mut calls: Vec<String> = Vec::new();
            let mut next_id = 1u64;
            let collect = |clients: &mut Vec<Client>, calls: &mut Vec<String>| {
                for c in clients.iter_mut() {
                    // Kicked or banned: the engine closed it.
                    if c.rec.closed.get().is_some() {
                        c.open = false;
                    }
                    for m in c.rec.take() {
                        if let ServerEvent::Ack(AckBody::Call(a)) = &m.event {
                            calls.push(a.call_id.clone());
                        }
                        if let ServerEvent::CallIncoming(i) = &m.event {
                            calls.push(i.call_id.clone());
                        }
                        let answer = matches!(
                            m.event,
                            ServerEvent::Ack(_)
                                | ServerEvent::Error(_)
                                | ServerEvent::HeartbeatAck(_)
                        );
                        if let (true, Some(id)) = (answer, m.id) {
                            c.answers.push(id);
                        }
                    }
                }
            };
            for op in ops {
                match op {
                    Op::Connect {
                        shard,
                        user,
                        binary,
                    } => {
                        let (node, shard) = w.place(shard);
                        if !w.alive(node) {
                            continue;
                        }
                        let p = if binary {
                            Protocol::Binary
                        } else {
                            Protocol::Json
                        };
                        let roles = if user == 0 { Roles::ADMIN } else { Roles::NONE };
                        let access = Access {
                            roles,
                            grants: None,
                        };
                        let sim = &mut w.sims[node];
                        let (at, rec) = sim.connect_with(
                            shard,
                            &format!("u{user}"),
                            p,
                            DeviceKind::Web,
                            access,
                        );
                        // A banned user's connection is closed at once.
                        let session = sim.shards[shard as usize]
                            .conn(at.conn)
                            .map_or(String::new(), |c| c.member.session.to_string());
                        clients.push(Client {
                            node,
                            at,
                            rec,
                            open: true,
                            session,
                            sent: vec![],
                            answers: vec![],
                        });
                    }
                    Op::Close { conn } => {
                        let Some(c) = clients.get_mut(conn).filter(|c| c.open) else {
                            continue;
                        };
                        c.open = false;
                        let sim = &mut w.sims[c.node];
                        sim.shards[c.at.shard as usize].close(c.at.conn, sim.now, &mut sim.mesh);
                    }
                    Op::Event { conn, what } => {
                        if !clients.get(conn).is_some_and(|c| c.open) {
                            continue;
                        }
                        let event = event(&w.sims[clients[conn].node], &what, &calls, &clients);
                        let c = &mut clients[conn];
                        c.sent.push(next_id);
                        let msg = ClientMessage {
                            id: Some(next_id),
                            event,
                        };
                        next_id += 1;
                        let sim = &mut w.sims[c.node];
                        sim.shards[c.at.shard as usize].handle(
                            c.at.conn,
                            msg,
                            sim.now,
                            &mut sim.mesh,
                        );
                    }
                    Op::Step { shard, n } => {
                        let (node, shard) = w.place(shard);
                        if !w.alive(node) {
                            continue;
                        }
                        let sim = &mut w.sims[node];
                        for _ in 0..n {
                            let Some(m) = sim.mesh.0[shard as usize].pop_front() else {
                                break;
                            };
                            sim.shards[shard as usize].handle_mesh(m, sim.now, &mut sim.mesh);
                        }
                    }
                    Op::Advance { ms } => w.advance(ms as u64),
                    Op::Bridge { n } => {
                        if let Some(c) = &mut w.cluster {
                            super::cluster::bridge_round(&mut w.sims, c, n as usize);
                        }
                    }
                    Op::Redis { up } => {
                        if let Some(c) = &mut w.cluster {
                            if up != c.redis.up {
                                super::cluster::set_up(&mut w.sims, c, up);
                            }
                        }
                    }
                    Op::Cut { node, up } => {
                        let Some(c) = &mut w.cluster else { continue };
                        if w.dead != Some(node) && up == c.redis.cut.contains(&node) {
                            super::cluster::set_node(&mut w.sims, c, node, up);
                        }
                    }
                    Op::Die { node } => {
                        let Some(c) = &mut w.cluster else { continue };
                        if w.dead.is_some() {
                            continue;
                        }
                        w.dead = Some(node);
                        for cl in clients.iter_mut().filter(|cl| cl.node == node) {
                            cl.open = false;
                        }
                        super::cluster::node_dies(&mut w.sims, c, node);
                    }
                    Op::Full { on } => {
                        if let Some(c) = &mut w.cluster {
                            c.redis.full = on;
                        }
                    }
                    Op::Settle => w.pump(),
                }
                collect(&mut clients, &mut calls);
            }
            // The cluster comes back whole: Redis up with room, no node cut
            // off.
            if let Some(c) = &mut w.cluster {
                c.redis.full = false;
                if !c.redis.up {
                    super::cluster::set_up(&mut w.sims, c, true);
                }
                for n in 0..2 {
                    if w.dead != Some(n) && c.redis.cut.contains(&n) {
                        super::cluster::set_node(&mut w.sims, c, n, true);
                    }
                }
            }
            w.pump();
            // What the cluster refused is asked again within a second.
            w.advance(1_000);
            w.pump();
            collect(&mut clients, &mut calls);
            for c in clients.iter().filter(|c| c.open) {
                let mut answers = c.answers.clone();
                answers.sort();
                prop_assert_eq!(&answers, &c.sent, "every request answered exactly once");
            }
            // Everyone leaves and every window passes: nothing is left.
            for c in clients.iter_mut().filter(|c| c.open) {
                c.open = false;
                let sim = &mut w.sims[c.node];
                sim.shards[c.at.shard as usize].close(c.at.conn, sim.now, &mut sim.mesh);
            }
            w.pump();
            for _ in 0..3 {
                w.advance(100_000);
                w.pump();
            }
            for (n, sim) in w.sims.iter().enumerate() {
                if !w.alive(n) {
                    continue;
                }
                for (i, s) in sim.shards.iter().enumerate() {
                    prop_assert_eq!(s.connections(), 0, "node {} shard {}", n, i);
                    prop_assert!(
                        s.local.is_empty(),
                        "node {} shard {} local {:?}",
                        n,
                        i,
                        s.local.keys().collect::<Vec<_>>()
                    );
                    prop_assert!(
                        s.owned.is_empty(),
                        "node {} shard {} owned {:?}",
                        n,
                        i,
                        s.owned.keys().collect::<Vec<_>>()
                    );
                    prop_assert!(
                        s.users.is_empty(),
                        "node {} shard {} users {:?}",
                        n,
                        i,
                        s.users.keys().collect::<Vec<_>>()
                    );
                    prop_assert!(s.calls.is_empty(), "node {} shard {} calls", n, i);
                    prop_assert!(s.gathers.is_empty(), "node {} shard {} gathers", n, i);
                    prop_assert!(
                        s.timers.is_empty(),
                        "node {} shard {} timers {}",
                        n,
                        i,
                        s.timers.len()
                    );
                    // In a cluster, bans are kept in Redis until they end.
                    if w.cluster.is_none() {
                        prop_assert!(s.bans.is_empty(), "shard {} bans {}", i, s.bans.len());
                    }
                    prop_assert_eq!(s.stats().online_users, 0, "node {} shard {}", n, i);
                    prop_assert!(
                        s.limiter.buckets.is_empty() && s.limiter.spread.is_empty(),
                        "node {} shard {} limiter",
                        n,
                        i
                    );
                }
            }
            if let Some(c) = &w.cluster {
                for n in (0..2).filter(|n| w.alive(*n)) {
                    prop_assert!(c.cores[n].is_idle(), "node {} bridge busy", n);
                    prop_assert!(
                        c.followed(n).is_empty(),
                        "node {} follows {:?}",
                        n,
                        c.followed(n)
                    );
                    prop_assert!(c.users(n).is_empty(), "node {} follows {:?}", n, c.users(n));
                }
                for (user, fields) in &c.redis.presence {
                    prop_assert!(
                        fields.is_empty(),
                        "presence of {} left: {:?}",
                        user,
                        fields.keys()
                    );
                }
                for (channel, m) in &c.redis.members {
                    prop_assert!(m.is_empty(), "members of {} left: {:?}", channel, m);
                }
            }
        }
        Ok(())
    }
}

mod cluster;
mod safety;
