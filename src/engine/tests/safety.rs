//! Authorization, roles, moderation and rate limits, driven in memory.

use super::*;
use crate::access::{Access, Grants, Patterns, Roles};

fn granted(channels: &[&str], users: Option<&[&str]>) -> Access {
    let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    Access {
        roles: Roles::NONE,
        grants: Some(Arc::new(Grants {
            channels: Some(Patterns::new("channels", &list(channels)).unwrap()),
            users: users.map(|u| Patterns::new("users", &list(u)).unwrap()),
        })),
        expires: 0,
    }
}

fn join_with(sim: &mut Sim, c: ConnRef, id: u64, channel: &str, token: Option<&str>) {
    sim.send(
        c,
        Some(id),
        ClientEvent::ChannelJoin(ChannelJoin {
            channel_id: channel.into(),
            since: None,
            token: token.map(Into::into),
        }),
    );
}

#[test]
fn channels_need_a_grant_or_a_subscription_token() {
    let mut sim = Sim::new(2);
    let (a, ra) = sim.connect_as(0, "alice", granted(&["team-1:*", "lobby"], None));
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    for (i, ch) in ["lobby", "team-1:random", "team-2:secret"]
        .iter()
        .enumerate()
    {
        join_with(&mut sim, b, i as u64 + 1, ch, None);
    }
    rb.take();
    join_with(&mut sim, a, 1, "lobby", None);
    join_with(&mut sim, a, 2, "team-1:random", None);
    join_with(&mut sim, a, 3, "team-2:secret", None);
    join_with(
        &mut sim,
        a,
        4,
        "team-2:secret",
        Some("sub:mallory:team-2:secret"),
    );
    join_with(
        &mut sim,
        a,
        5,
        "team-2:secret",
        Some("sub:alice:team-2:other"),
    );
    let got = ra.take();
    assert!(matches!(ack_body(&got, 1), AckBody::Join(_)));
    assert!(matches!(ack_body(&got, 2), AckBody::Join(_)));
    for id in [3, 4, 5] {
        assert_eq!(error_code(&got, id), ErrorCode::Forbidden, "request {id}");
    }
    // Nothing it sends reaches the channel it was refused.
    sim.publish(a, "team-2:secret", "let me in");
    sim.send(
        a,
        Some(6),
        ClientEvent::TypingStart(ChannelRef {
            channel_id: "team-2:secret".into(),
        }),
    );
    sim.send(
        a,
        Some(7),
        ClientEvent::VoiceJoin(ChannelRef {
            channel_id: "team-2:secret".into(),
        }),
    );
    sim.send(
        a,
        Some(8),
        ClientEvent::VoiceGetParticipants(ChannelRef {
            channel_id: "team-2:secret".into(),
        }),
    );
    let got = ra.take();
    for id in [2, 6, 7, 8] {
        assert_eq!(error_code(&got, id), ErrorCode::Forbidden, "request {id}");
    }
    let seen = rb.take();
    assert!(
        !seen.iter().any(|m| matches!(
            &m.event,
            ServerEvent::MessageNew(_)
                | ServerEvent::TypingUserStart(_)
                | ServerEvent::VoiceUserJoined(_)
        ) || matches!(&m.event, ServerEvent::MemberJoined(j) if j.channel_id == "team-2:secret")),
        "{seen:?}"
    );
    // A subscription token for this user and channel lets it in.
    join_with(
        &mut sim,
        a,
        9,
        "team-2:secret",
        Some("sub:alice:team-2:secret"),
    );
    assert!(matches!(ack_body(&ra.take(), 9), AckBody::Join(_)));
    sim.publish(a, "team-2:secret", "hello");
    assert_eq!(contents(&rb.take()), [(1, "hello".to_string())]);
}

#[test]
fn direct_messages_and_calls_need_the_user_granted() {
    let mut sim = Sim::new(2);
    let (a, ra) = sim.connect_as(0, "alice", granted(&[], Some(&["support-*"])));
    let (_b, rb) = sim.connect(1, "bob", Protocol::Json);
    let (_s, rs) = sim.connect(1, "support-1", Protocol::Json);
    let dm = |to: &str| {
        ClientEvent::DmSend(DmSend {
            to_user_id: to.into(),
            content: "hi".into(),
            nonce: None,
        })
    };
    sim.send(a, Some(1), dm("bob"));
    sim.send(
        a,
        Some(2),
        ClientEvent::CallInitiate(CallInitiate {
            to_user_id: "bob".into(),
            call_type: CallType::Audio,
            sdp: None,
        }),
    );
    sim.send(a, Some(3), dm("support-1"));
    let got = ra.take();
    assert_eq!(error_code(&got, 1), ErrorCode::Forbidden);
    assert_eq!(error_code(&got, 2), ErrorCode::Forbidden);
    assert!(matches!(ack_body(&got, 3), AckBody::Dm(_)));
    let bob = rb.take();
    assert!(
        !bob.iter().any(|m| matches!(
            m.event,
            ServerEvent::DmNew(_) | ServerEvent::CallIncoming(_)
        )),
        "{bob:?}"
    );
    assert!(names(&rs.take()).iter().any(|n| n == "dm:new"));
}

#[test]
fn only_authors_edit_and_moderators_may_delete_others_messages() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(1, 2);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    let moderator = Access {
        roles: Roles::MODERATOR,
        grants: None,
        expires: 0,
    };
    let (m, rm) = sim.connect_as(0, "mod", moderator);
    for c in [a, b, m] {
        sim.join(c, &ch);
    }
    sim.publish(a, &ch, "first");
    sim.publish(a, &ch, "second");
    let ids: Vec<String> = picked(&ra.take(), |e| match e {
        ServerEvent::MessageNew(n) => Some(n.message_id.clone()),
        _ => None,
    });
    rb.take();
    rm.take();
    let delete = |id: &str| {
        ClientEvent::MessageDelete(MessageRef {
            channel_id: ch.clone(),
            message_id: id.into(),
        })
    };
    sim.send(b, Some(1), delete(&ids[0]));
    sim.send(
        m,
        Some(2),
        ClientEvent::MessageEdit(MessageEdit {
            channel_id: ch.clone(),
            message_id: ids[0].clone(),
            content: "rewritten".into(),
        }),
    );
    assert_eq!(error_code(&rb.take(), 1), ErrorCode::Forbidden);
    assert_eq!(error_code(&rm.take(), 2), ErrorCode::Forbidden);
    sim.send(m, Some(3), delete(&ids[0]));
    assert!(matches!(ack_body(&rm.take(), 3), AckBody::Event(_)));
    let deleted = picked(&ra.take(), |e| match e {
        ServerEvent::MessageDeleted(d) => Some(d.message_id.clone()),
        _ => None,
    });
    assert_eq!(deleted, [ids[0].clone()]);
}

fn role(r: Roles) -> Access {
    Access {
        roles: r,
        grants: None,
        expires: 0,
    }
}

fn kick(user: &str, channel: Option<&str>) -> ClientEvent {
    ClientEvent::ModerationKickUser(KickUser {
        user_id: user.into(),
        channel_id: channel.map(Into::into),
        reason: Some("spam".into()),
    })
}

fn ban(user: &str, channel: Option<&str>, duration_ms: Option<u64>) -> ClientEvent {
    ClientEvent::ModerationBanUser(BanUser {
        user_id: user.into(),
        channel_id: channel.map(Into::into),
        duration_ms,
        reason: None,
    })
}

fn moderation_of(msgs: &[ServerMessage]) -> Vec<(String, ModerationEvent)> {
    msgs.iter()
        .filter_map(|m| match &m.event {
            ServerEvent::ModerationKicked(e)
            | ServerEvent::ModerationBanned(e)
            | ServerEvent::ModerationUserKicked(e)
            | ServerEvent::ModerationUserBanned(e) => Some((m.event.name().to_owned(), e.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_kick_from_a_channel_reaches_every_connection_of_the_user_on_every_shard() {
    let mut sim = Sim::new(3);
    let ch = channel_owned_by(2, 3);
    let (m, rm) = sim.connect_as(0, "mod", role(Roles::MODERATOR));
    let (t1, rt1) = sim.connect(0, "troll", Protocol::Json);
    let (t2, rt2) = sim.connect(1, "troll", Protocol::Binary);
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    for c in [m, t1, t2, b] {
        sim.join(c, &ch);
    }
    for r in [&rm, &rt1, &rt2, &rb] {
        r.take();
    }
    sim.send(m, Some(1), kick("troll", Some(&ch)));
    assert!(matches!(ack_body(&rm.take(), 1), AckBody::Empty(_)));
    for r in [&rt1, &rt2] {
        let got = moderation_of(&r.take());
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, "moderation:kicked");
        assert_eq!(got[0].1.channel_id.as_deref(), Some(ch.as_str()));
        assert_eq!(
            (got[0].1.by.as_str(), got[0].1.reason.as_deref()),
            ("mod", Some("spam"))
        );
    }
    let seen = rb.take();
    let told = moderation_of(&seen);
    assert_eq!(
        told.len(),
        1,
        "one event for the channel, not one per connection"
    );
    assert_eq!(told[0].0, "moderation:user_kicked");
    assert_eq!(told[0].1.user_id, "troll");
    assert_eq!(
        names(&seen)
            .iter()
            .filter(|n| **n == "channel:member_left")
            .count(),
        2
    );
    // Out of the channel: it hears nothing more and cannot act in it.
    sim.publish(b, &ch, "after");
    sim.publish(t1, &ch, "still here?");
    assert!(contents(&rt2.take()).is_empty());
    assert_eq!(error_code(&rt1.take(), 2), ErrorCode::Forbidden);
    // A kick does not last: it may join again.
    sim.join(t1, &ch);
    assert!(matches!(ack_body(&rt1.take(), 1), AckBody::Join(_)));
    // Kicking someone who is not there is `not_found`.
    sim.send(m, Some(2), kick("nobody", Some(&ch)));
    assert_eq!(error_code(&rm.take(), 2), ErrorCode::NotFound);
}

#[test]
fn moderation_needs_its_role_and_a_reachable_channel() {
    let mut sim = Sim::new(2);
    let (u, ru) = sim.connect(0, "user", Protocol::Json);
    let (m, rm) = sim.connect_as(
        1,
        "mod",
        Access {
            roles: Roles::MODERATOR,
            ..granted(&["mine"], None)
        },
    );
    sim.send(u, Some(1), kick("mod", Some("mine")));
    sim.send(u, Some(2), ban("mod", None, None));
    let got = ru.take();
    assert_eq!(error_code(&got, 1), ErrorCode::Forbidden);
    assert_eq!(error_code(&got, 2), ErrorCode::Forbidden);
    sim.send(m, Some(3), ban("user", None, None));
    sim.send(m, Some(4), ban("user", Some("theirs"), None));
    sim.send(m, Some(5), ban("mod", Some("mine"), None));
    sim.send(m, Some(6), ban("user", Some("mine"), Some(0)));
    sim.send(m, Some(7), ban("", Some("mine"), None));
    let got = rm.take();
    assert_eq!(
        error_code(&got, 3),
        ErrorCode::Forbidden,
        "server-wide needs admin"
    );
    assert_eq!(
        error_code(&got, 4),
        ErrorCode::Forbidden,
        "channel not granted"
    );
    assert_eq!(error_code(&got, 5), ErrorCode::BadRequest, "oneself");
    assert_eq!(error_code(&got, 6), ErrorCode::BadRequest, "zero duration");
    assert_eq!(error_code(&got, 7), ErrorCode::BadRequest, "empty user id");
    assert!(sim.shards.iter().all(|s| s.ban_count() == 0));
    // The user's connection was never touched.
    assert_eq!(ru.closed.get(), None);
}

#[test]
fn a_channel_ban_keeps_the_user_out_until_it_expires() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(1, 2);
    let (m, rm) = sim.connect_as(0, "mod", role(Roles::MODERATOR));
    let (t, rt) = sim.connect(0, "troll", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    for c in [m, t, b] {
        sim.join(c, &ch);
    }
    // In the channel's voice room too.
    sim.send(
        t,
        Some(5),
        ClientEvent::VoiceJoin(ChannelRef {
            channel_id: ch.clone(),
        }),
    );
    for r in [&rm, &rt, &rb] {
        r.take();
    }
    sim.send(m, Some(1), ban("troll", Some(&ch), Some(60_000)));
    assert!(matches!(ack_body(&rm.take(), 1), AckBody::Empty(_)));
    let got = moderation_of(&rt.take());
    assert_eq!(got[0].0, "moderation:banned");
    assert_eq!(got[0].1.until, Some(sim.now + 60_000));
    let seen = rb.take();
    assert_eq!(moderation_of(&seen)[0].0, "moderation:user_banned");
    assert!(names(&seen).iter().any(|n| n == "voice:user_left"));
    // Its voice seat is gone too.
    sim.send(t, Some(2), ClientEvent::VoiceLeave);
    assert_eq!(error_code(&rt.take(), 2), ErrorCode::NotFound);
    // Refused on every shard while the ban lasts.
    let (t2, rt2) = sim.connect(1, "troll", Protocol::Json);
    sim.join(t, &ch);
    sim.join(t2, &ch);
    sim.send(
        t2,
        Some(3),
        ClientEvent::VoiceJoin(ChannelRef {
            channel_id: ch.clone(),
        }),
    );
    assert_eq!(error_code(&rt.take(), 1), ErrorCode::Forbidden);
    let got = rt2.take();
    assert_eq!(error_code(&got, 1), ErrorCode::Forbidden);
    assert_eq!(error_code(&got, 3), ErrorCode::Forbidden);
    // The owner checks too: a join that got past a shard's copy (a ban
    // still on its way) is refused there, and forgotten by the joiner.
    sim.shards[0].bans = bans::Bans::default();
    sim.join(t, &ch);
    assert_eq!(error_code(&rt.take(), 1), ErrorCode::Forbidden);
    assert!(sim.shards[0].joined(t.conn, &ch).is_none());
    sim.send(
        t,
        Some(4),
        ClientEvent::ChannelLeave(ChannelRef {
            channel_id: ch.clone(),
        }),
    );
    assert_eq!(
        error_code(&rt.take(), 4),
        ErrorCode::NotFound,
        "no pending join left"
    );
    // Other channels are unaffected, and once the ban ends it may return.
    let other = channel_owned_by(0, 2);
    sim.join(t, &other);
    assert!(matches!(ack_body(&rt.take(), 1), AckBody::Join(_)));
    sim.advance(60_001);
    sim.join(t2, &ch);
    assert!(matches!(ack_body(&rt2.take(), 1), AckBody::Join(_)));
}

fn session_of(sim: &Sim, c: ConnRef) -> String {
    sim.shards[c.shard as usize]
        .conn(c.conn)
        .unwrap()
        .member
        .session
        .to_string()
}

#[test]
fn a_server_ban_closes_every_session_refuses_reconnects_and_tells_each_channel_once() {
    let mut sim = Sim::new(3);
    let (c1, c2) = (channel_owned_by(0, 3), channel_owned_by(2, 3));
    let (admin, radmin) = sim.connect_as(1, "admin", role(Roles::ADMIN));
    let (t1, rt1) = sim.connect(0, "troll", Protocol::Json);
    let (t2, rt2) = sim.connect(2, "troll", Protocol::Binary);
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    for c in [t1, t2, b] {
        sim.join(c, &c1);
    }
    sim.join(t1, &c2);
    sim.join(b, &c2);
    let session = session_of(&sim, t1);
    for r in [&radmin, &rt1, &rt2, &rb] {
        r.take();
    }
    sim.send(admin, Some(1), ban("troll", None, None));
    assert!(matches!(ack_body(&radmin.take(), 1), AckBody::Empty(_)));
    for r in [&rt1, &rt2] {
        let got = moderation_of(&r.take());
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].0.as_str(), got[0].1.channel_id.as_ref()),
            ("moderation:banned", None)
        );
        assert_eq!(r.closed.get(), Some(crate::ws::close::BANNED));
    }
    let told = moderation_of(&rb.take());
    let mut channels: Vec<String> = told
        .iter()
        .map(|(name, e)| {
            assert_eq!(*name, "moderation:user_banned");
            e.channel_id.clone().unwrap()
        })
        .collect();
    channels.sort();
    let mut want = vec![c1.clone(), c2.clone()];
    want.sort();
    assert_eq!(
        channels, want,
        "each channel once, though two connections were in c1"
    );
    // Every shard refuses the user at authentication.
    for s in &sim.shards {
        assert!(s.server_ban("troll", sim.now).is_some());
        assert!(s.server_ban("bob", sim.now).is_none());
    }
    // A connection that got through before its shard heard of the ban is
    // closed by the user's home.
    let (t3, rt3) = sim.connect(1, "troll", Protocol::Json);
    assert_eq!(rt3.closed.get(), Some(crate::ws::close::BANNED));
    assert!(sim.shards[1].conn(t3.conn).is_none());
    // The banned session cannot be resumed, and nothing of it is left.
    sim.shards
        .iter_mut()
        .for_each(|s| s.bans = bans::Bans::default());
    let (t4, rt4) = sim.connect(0, "troll", Protocol::Json);
    sim.send(
        t4,
        Some(2),
        ClientEvent::SessionResume(SessionResume {
            session_id: session,
            positions: vec![],
        }),
    );
    assert_eq!(error_code(&rt4.take(), 2), ErrorCode::NotFound);
}

#[test]
fn a_server_kick_closes_sessions_but_does_not_last_and_unban_lifts_a_ban() {
    let mut sim = Sim::new(2);
    let (admin, radmin) = sim.connect_as(0, "admin", role(Roles::ADMIN));
    let (t, rt) = sim.connect(1, "troll", Protocol::Json);
    sim.send(admin, Some(1), kick("troll", None));
    assert!(matches!(ack_body(&radmin.take(), 1), AckBody::Empty(_)));
    assert_eq!(moderation_of(&rt.take())[0].0, "moderation:kicked");
    assert_eq!(rt.closed.get(), Some(crate::ws::close::KICKED));
    assert!(sim.shards[1].conn(t.conn).is_none());
    assert!(sim
        .shards
        .iter()
        .all(|s| s.server_ban("troll", sim.now).is_none()));
    // Kicking a user who is not connected is `not_found`.
    sim.send(admin, Some(2), kick("troll", None));
    assert_eq!(error_code(&radmin.take(), 2), ErrorCode::NotFound);
    // A timed ban ends by itself; an unban ends one early.
    sim.send(admin, Some(3), ban("troll", None, Some(1_000)));
    radmin.take();
    assert!(sim.shards[0].server_ban("troll", sim.now).is_some());
    sim.advance(1_001);
    assert!(sim.shards[0].server_ban("troll", sim.now).is_none());
    sim.send(admin, Some(4), ban("troll", None, None));
    radmin.take();
    let unban = Moderation {
        kind: ModKind::Unban,
        user: "troll".into(),
        channel: None,
        reason: None,
        by: "api".into(),
        at: sim.now,
        from: None,
        ack: None,
    };
    sim.shards[1].moderate(unban, sim.now, &mut sim.mesh);
    sim.settle();
    assert!(sim
        .shards
        .iter()
        .all(|s| s.server_ban("troll", sim.now).is_none()));
}

/// Delivers one mesh message at a time, from a queue picked by `pick`,
/// until `done` holds (checked after every message) or nothing is left.
fn step_until(
    sim: &mut Sim,
    mut pick: impl FnMut(usize) -> usize,
    mut done: impl FnMut(&Sim) -> bool,
) -> bool {
    loop {
        if done(sim) {
            return true;
        }
        let busy: Vec<usize> = (0..sim.shards.len())
            .filter(|&s| !sim.mesh.0[s].is_empty())
            .collect();
        if busy.is_empty() {
            return false;
        }
        let s = busy[pick(busy.len())];
        let m = sim.mesh.0[s].pop_front().unwrap();
        sim.shards[s].handle_mesh(m, sim.now, &mut sim.mesh);
    }
}

#[test]
fn a_ban_or_unban_is_answered_only_once_every_shard_enforces_it() {
    // Whatever order the shards run in, the answer comes after the last
    // shard's table has it: a client told "done" cannot still get in (or
    // still be kept out) through another shard.
    for seed in 0..40u64 {
        let mut sim = Sim::new(3);
        let (admin, radmin) = sim.connect_as(0, "admin", role(Roles::ADMIN));
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut pick = move |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        let (user, channel) = match seed % 2 {
            0 => ("troll", None),
            _ => ("pest", Some("general")),
        };
        let banned = |sim: &Sim| -> Vec<bool> {
            let now = sim.now;
            sim.shards
                .iter()
                .map(|s| match channel {
                    None => s.server_ban(user, now).is_some(),
                    Some(c) => s.bans.channel(user, c, now).is_some(),
                })
                .collect()
        };
        sim.shards[0].handle(
            admin.conn,
            ClientMessage {
                id: Some(1),
                event: ban(user, channel, None),
            },
            sim.now,
            &mut sim.mesh,
        );
        let mut acked = Vec::new();
        let answered = step_until(&mut sim, &mut pick, |_| {
            acked.extend(radmin.take());
            !acked.is_empty()
        });
        assert!(answered, "seed {seed}: the ban was never answered");
        assert!(matches!(ack_body(&acked, 1), AckBody::Empty(_)));
        assert_eq!(banned(&sim), [true; 3], "seed {seed}: answered early");
        sim.settle();
        let unban = Moderation {
            kind: ModKind::Unban,
            user: user.into(),
            channel: channel.map(Into::into),
            reason: None,
            by: "api".into(),
            at: sim.now,
            from: Some((admin, Protocol::Json)),
            ack: Some(2),
        };
        sim.shards[(seed % 3) as usize].moderate(unban, sim.now, &mut sim.mesh);
        let mut acked = Vec::new();
        let answered = step_until(&mut sim, &mut pick, |_| {
            acked.extend(radmin.take());
            !acked.is_empty()
        });
        assert!(answered, "seed {seed}: the unban was never answered");
        assert!(matches!(ack_body(&acked, 2), AckBody::Empty(_)));
        assert_eq!(banned(&sim), [false; 3], "seed {seed}: answered early");
    }
}

#[test]
fn a_ban_takes_effect_once_stored_and_not_at_all_if_it_cannot_be() {
    // The store is an endpoint of the mesh (its own thread in a node):
    // nothing is applied until it answers, and a ban it could not write is
    // refused.
    let mut sim = Sim::new(2);
    let store: ShardId = 2 + 2;
    for s in &mut sim.shards {
        s.set_ban_store(store);
    }
    let (admin, radmin) = sim.connect_as(0, "admin", role(Roles::ADMIN));
    sim.send(admin, Some(1), ban("full-disk", None, None));
    sim.send(admin, Some(2), ban("troll", None, Some(5_000)));
    sim.settle();
    assert!(radmin.take().is_empty(), "answered before it is stored");
    let banned = |sim: &Sim, user: &str| {
        sim.shards
            .iter()
            .filter(|s| s.server_ban(user, sim.now).is_some())
            .count()
    };
    assert_eq!(banned(&sim, "troll"), 0, "applied before it is stored");
    // The store writes what it was asked, in order, and answers each.
    let mut stored = Vec::new();
    while let Some(msg) = sim.mesh.0[store as usize].pop_front() {
        let MeshMsg::StoreBan { from, moderation } = msg else {
            panic!("the store got {msg:?}");
        };
        assert_eq!(from, 0, "asked by the admin's shard");
        let error = moderation
            .user
            .starts_with("full")
            .then(|| "disk full".to_string());
        if error.is_none() {
            stored.push((moderation.user.to_string(), moderation.kind));
        }
        sim.mesh.0[from as usize].push_back(MeshMsg::BanStored { moderation, error });
    }
    sim.settle();
    let got = radmin.take();
    assert_eq!(error_code(&got, 1), ErrorCode::Internal);
    assert!(matches!(ack_body(&got, 2), AckBody::Empty(_)));
    assert_eq!(banned(&sim, "full-disk"), 0);
    assert_eq!(banned(&sim, "troll"), 2, "every shard enforces it");
    assert_eq!(
        stored,
        [(
            "troll".to_string(),
            ModKind::Ban {
                until: Some(sim.now + 5_000)
            }
        )]
    );
}

fn limited(rules: &[(&str, &str)], strikes: u32) -> Settings {
    let mut rate_limits = limits::RateLimits::default();
    rate_limits.set("*", None).unwrap();
    for (event, spec) in rules {
        rate_limits
            .set(event, limits::Limit::parse(spec).unwrap())
            .unwrap();
    }
    Settings {
        rate_limits,
        rate_limit_strikes: strikes,
        ..Settings::default()
    }
}

/// The `retryAfterMs` of each `rate_limited` error, by request id.
fn retries(msgs: &[ServerMessage]) -> Vec<(u64, u64)> {
    msgs.iter()
        .filter_map(|m| match &m.event {
            ServerEvent::Error(e) if e.code == ErrorCode::RateLimited => {
                Some((m.id?, e.retry_after_ms?))
            }
            _ => None,
        })
        .collect()
}

fn send_msg(sim: &mut Sim, c: ConnRef, id: u64, ch: &str) {
    sim.send(
        c,
        Some(id),
        ClientEvent::MessageSend(MessageSend::new(ch, "x")),
    );
}

#[test]
fn a_rate_limit_holds_per_user_across_its_connections_and_refills() {
    let mut sim = Sim::with(2, limited(&[("message:send", "3/3s")], 0));
    let ch = channel_owned_by(1, 2);
    let (a1, ra1) = sim.connect(0, "alice", Protocol::Json);
    let (a2, ra2) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(0, "bob", Protocol::Json);
    for c in [a1, a2, b] {
        sim.join(c, &ch);
    }
    for (i, c) in [a1, a2, a1, a2, a1].into_iter().enumerate() {
        send_msg(&mut sim, c, 10 + i as u64, &ch);
    }
    let mut refused = retries(&ra1.take());
    refused.extend(retries(&ra2.take()));
    refused.sort();
    assert_eq!(
        refused,
        [(13, 1000), (14, 1000)],
        "3 of alice's 5 went through"
    );
    // Others have buckets of their own; joins and reads are not limited here.
    send_msg(&mut sim, b, 20, &ch);
    assert!(retries(&rb.take()).is_empty());
    sim.advance(1_000);
    send_msg(&mut sim, a1, 21, &ch);
    send_msg(&mut sim, a1, 22, &ch);
    assert_eq!(
        retries(&ra1.take()),
        [(22, 1000)],
        "one token back per second"
    );
    // The buckets of an idle user go within a second of being full again:
    // alice's last token comes back 3 s after her last send.
    sim.advance(2_900);
    assert!(sim.shards[0].limiter.buckets.contains_key("alice"));
    sim.advance(1_100);
    assert!(sim.shards[0].limiter.buckets.is_empty());
    assert_eq!(sim.shards[0].limiter.buckets.capacity(), 0);
}

#[test]
fn a_user_spread_over_shards_gets_a_share_on_each() {
    let mut sim = Sim::with(3, limited(&[("typing:start", "4/60s")], 0));
    let ch = channel_owned_by(2, 3);
    let (a0, ra0) = sim.connect(0, "alice", Protocol::Json);
    let (a1, ra1) = sim.connect(1, "alice", Protocol::Json);
    sim.join(a0, &ch);
    sim.join(a1, &ch);
    let typing = || {
        ClientEvent::TypingStart(ChannelRef {
            channel_id: "x".into(),
        })
    };
    for i in 0..4 {
        sim.send(a0, Some(100 + i), typing());
        sim.send(a1, Some(200 + i), typing());
    }
    let (r0, r1) = (retries(&ra0.take()), retries(&ra1.take()));
    assert_eq!(
        (r0.len(), r1.len()),
        (2, 2),
        "{r0:?} {r1:?}: 2 + 2 = the limit of 4"
    );
    // Once the user is on one shard again, that shard has the whole limit.
    sim.close(a1);
    assert_eq!(sim.shards[0].limiter.share("alice"), 1);
    sim.advance(60_000);
    for i in 0..5 {
        sim.send(a0, Some(300 + i), typing());
    }
    assert_eq!(retries(&ra0.take()).len(), 1);
}

#[test]
fn a_client_that_keeps_hammering_is_closed_and_others_are_served() {
    let mut sim = Sim::with(2, limited(&[("default", "2/10s")], 3));
    let ch = channel_owned_by(0, 2);
    let (f, rf) = sim.connect(0, "flooder", Protocol::Json);
    let (b, rb) = sim.connect(0, "bob", Protocol::Json);
    sim.join(f, &ch);
    sim.join(b, &ch);
    rb.take();
    for i in 0..10 {
        sim.send(f, Some(i), ClientEvent::Heartbeat);
    }
    let got = rf.take();
    // Two accepted (the join took the first token), then refusals until
    // the fourth strike closes it: nothing after that is answered.
    assert_eq!(retries(&got).len(), 4, "{got:?}");
    assert_eq!(rf.closed.get(), Some(crate::ws::close::POLICY_VIOLATION));
    assert!(sim.shards[0].conn(f.conn).is_none());
    assert_eq!(sim.shards[0].metrics.rate_limit_closes.get(), 1);
    // Bob, on the same shard, carries on; the flooder left the channel.
    sim.send(b, Some(1), ClientEvent::Heartbeat);
    let seen = rb.take();
    assert!(names(&seen).iter().any(|n| n == "channel:member_left"));
    assert!(names(&seen).iter().any(|n| n == "heartbeat:ack"));
}

#[test]
fn malformed_input_costs_a_token_and_a_strike() {
    // Unparseable frames come out of the default bucket and each is a
    // strike: the eleventh closes the connection (strikes 10), although
    // the bucket still had tokens.
    let mut sim = Sim::with(1, limited(&[("default", "100/60s")], 10));
    let (f, rf) = sim.connect(0, "flooder", Protocol::Json);
    let (b, rb) = sim.connect(0, "bob", Protocol::Json);
    for _ in 0..150 {
        sim.send_frame(f, true, b"{not json");
    }
    let got = rf.take();
    let bad = got
        .iter()
        .filter(|m| matches!(&m.event, ServerEvent::Error(e) if e.code == ErrorCode::BadRequest))
        .count();
    assert_eq!(bad, 11, "answered until the strike that closed it");
    assert_eq!(rf.closed.get(), Some(crate::ws::close::POLICY_VIOLATION));
    assert!(sim.shards[0].conn(f.conn).is_none());
    assert_eq!(sim.shards[0].metrics.malformed.get(), 11);
    // A frame of the wrong kind and an unknown event count the same way.
    let (g, rg) = sim.connect(0, "gremlin", Protocol::Json);
    sim.send_frame(g, false, b"\x00binary");
    sim.send_frame(g, true, br#"{"t":"no:such","id":5}"#);
    let got = rg.take();
    assert!(
        got.iter().all(|m| matches!(m.event, ServerEvent::Error(_))),
        "{got:?}"
    );
    assert_eq!(error_code(&got, 5), ErrorCode::Unsupported);
    // Bob, on the same shard, is served.
    sim.send_frame(b, true, br#"{"t":"heartbeat","id":1}"#);
    assert!(names(&rb.take()).iter().any(|n| n == "heartbeat:ack"));
}

#[test]
fn a_malformed_event_is_charged_to_the_bucket_it_names() {
    // 60 malformed joins against 50 per minute (strikes off): the last ten
    // are refused by the limit, and a valid join is refused too.
    let mut sim = Sim::with(1, limited(&[("channel:join", "50/60s")], 0));
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    for i in 0..60 {
        let bad = format!(r#"{{"t":"channel:join","id":{i},"d":{{"channelId":7}}}}"#);
        sim.send_frame(a, true, bad.as_bytes());
    }
    let got = ra.take();
    assert_eq!(retries(&got).len(), 10, "{got:?}");
    assert_eq!(error_code(&got, 0), ErrorCode::BadRequest);
    sim.send_frame(
        a,
        true,
        br#"{"t":"channel:join","id":99,"d":{"channelId":"general"}}"#,
    );
    assert_eq!(error_code(&ra.take(), 99), ErrorCode::RateLimited);
    // Other events have buckets of their own.
    sim.send_frame(a, true, br#"{"t":"heartbeat","id":100}"#);
    assert!(names(&ra.take()).iter().any(|n| n == "heartbeat:ack"));
    // The binary protocol's malformed archives come from the default bucket.
    let mut sim = Sim::with(1, limited(&[("default", "3/60s")], 0));
    let (b, rb) = sim.connect(0, "bob", Protocol::Binary);
    for _ in 0..5 {
        sim.send_frame(b, false, &[1, 2, 3]);
    }
    assert_eq!(retries(&rb.take()).len(), 0, "no ack ids to answer");
    assert_eq!(sim.shards[0].metrics.rate_limited.get(), 2);
}

#[test]
fn a_user_holds_at_most_its_connections_across_shards() {
    let settings = Settings {
        max_connections_per_user: 2,
        ..unlimited()
    };
    let mut sim = Sim::with(3, settings);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "alice", Protocol::Json);
    assert!(ra.admitted.get() && rb.admitted.get());
    // The third, on yet another shard, is refused by alice's home shard.
    let (c, rc) = sim.connect(2, "alice", Protocol::Json);
    assert!(!rc.admitted.get());
    assert_eq!(rc.closed.get(), Some(crate::ws::close::POLICY_VIOLATION));
    let got = rc.take();
    assert!(
        got.iter()
            .any(|m| matches!(&m.event, ServerEvent::Error(e) if e.code == ErrorCode::Forbidden)),
        "{got:?}"
    );
    assert!(sim.shards[2].conn(c.conn).is_none());
    assert_eq!(
        sim.shards[2].metrics.refused[crate::admission::Refusal::TooManyForUser.index()].get(),
        1
    );
    // Others are not affected; once one of alice's closes, she may again.
    let (_, rbob) = sim.connect(2, "bob", Protocol::Json);
    assert!(rbob.admitted.get());
    sim.close(a);
    let (_, rd) = sim.connect(2, "alice", Protocol::Json);
    assert!(rd.admitted.get() && rd.closed.get().is_none());
    let _ = b;
}

#[test]
fn lists_and_ids_are_bounded_whatever_decoded_them() {
    let mut sim = Sim::new(2);
    let (a, ra) = sim.connect(0, "alice", Protocol::Binary);
    let many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    sim.send(
        a,
        Some(1),
        ClientEvent::PresenceGetBulk(UserIds {
            user_ids: many.clone(),
        }),
    );
    sim.send(
        a,
        Some(2),
        ClientEvent::NotificationRead(NotificationIds {
            notification_ids: vec!["x".repeat(129)],
        }),
    );
    sim.send(
        a,
        Some(3),
        ClientEvent::CallEnd(CallRef {
            call_id: "\u{0}".into(),
        }),
    );
    sim.send(
        a,
        Some(4),
        ClientEvent::MessageDelete(MessageRef {
            channel_id: "general".into(),
            message_id: String::new(),
        }),
    );
    sim.send(
        a,
        Some(5),
        ClientEvent::CallReject(CallReject {
            call_id: "0000000000000001".into(),
            reason: Some("x".repeat(501)),
        }),
    );
    let got = ra.take();
    // A list past its bound is too large, as the error table says.
    assert_eq!(error_code(&got, 1), ErrorCode::TooLarge);
    for id in 2..=4 {
        assert_eq!(error_code(&got, id), ErrorCode::BadRequest, "request {id}");
    }
    assert_eq!(error_code(&got, 5), ErrorCode::TooLarge);
    // The connection is fine afterwards.
    sim.send(
        a,
        Some(6),
        ClientEvent::PresenceGetBulk(UserIds {
            user_ids: many[..3].to_vec(),
        }),
    );
    assert!(matches!(ack_body(&ra.take(), 6), AckBody::Presences(_)));
}

/// Sends a server API request to `shard` and returns the answers that
/// came back to the API's endpoint (the queue after the shards').
fn api(sim: &mut Sim, shard: u16, id: u64, op: ApiOp) -> Vec<ServerMessage> {
    let n = sim.shards.len();
    let from = ConnRef {
        shard: n as u16,
        conn: ConnId {
            slot: id as u32,
            gen: 0,
        },
    };
    let call = MeshMsg::Api(Box::new(ApiCall { from, id, op }));
    sim.shards[shard as usize].handle_mesh(call, sim.now, &mut sim.mesh);
    sim.settle();
    sim.mesh.0[n]
        .drain(..)
        .flat_map(|m| match m {
            MeshMsg::ToConn { frame, .. } => vec![frame],
            other => panic!("unexpected {other:?}"),
        })
        .map(|f| {
            let h = crate::ws::frame::parse_header(&f).unwrap().unwrap();
            json::decode_server(&f[h.header_len..]).unwrap()
        })
        .collect()
}

#[test]
fn the_server_api_publishes_notifies_moderates_and_lists_members() {
    let mut sim = Sim::new(3);
    let ch = channel_owned_by(2, 3);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    sim.join(a, &ch);
    ra.take();
    // Publish: sequenced, delivered and kept like any message.
    let got = api(
        &mut sim,
        2,
        7,
        ApiOp::Publish {
            user: "backend".into(),
            send: MessageSend::new(ch.as_str(), "maintenance at noon"),
            meta: None,
        },
    );
    match ack_body(&got, 7) {
        AckBody::Send(s) => assert_eq!(s.offset, 1),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        contents(&ra.take()),
        [(1, "maintenance at noon".to_string())]
    );
    // Into a channel nobody is in: kept for whoever joins and recovers.
    let empty = channel_owned_by(1, 3);
    let got = api(
        &mut sim,
        1,
        8,
        ApiOp::Publish {
            user: "backend".into(),
            send: MessageSend::new(empty.as_str(), "you missed this"),
            meta: None,
        },
    );
    assert!(matches!(ack_body(&got, 8), AckBody::Send(_)));
    sim.send(
        a,
        Some(3),
        ClientEvent::ChannelGetHistory(GetHistory {
            channel_id: empty.clone(),
            limit: None,
            before: None,
        }),
    );
    assert_eq!(
        error_code(&ra.take(), 3),
        ErrorCode::Forbidden,
        "join first"
    );
    sim.join(a, &empty);
    sim.send(
        a,
        Some(4),
        ClientEvent::ChannelGetHistory(GetHistory {
            channel_id: empty.clone(),
            limit: None,
            before: None,
        }),
    );
    match ack_body(&ra.take(), 4) {
        AckBody::History(h) => assert_eq!(h.messages[0].message.content, "you missed this"),
        other => panic!("{other:?}"),
    }
    // Bad input is answered with the field at fault.
    let got = api(
        &mut sim,
        2,
        9,
        ApiOp::Publish {
            user: "".into(),
            send: MessageSend::new(ch.as_str(), "x"),
            meta: None,
        },
    );
    assert_eq!(error_code(&got, 9), ErrorCode::BadRequest);
    // Metadata: a JSON object, bounded.
    for (meta, code) in [
        ("[1,2]".to_owned(), ErrorCode::BadRequest),
        (
            format!(
                r#"{{"k":"{}"}}"#,
                "x".repeat(crate::engine::api::MAX_META_BYTES)
            ),
            ErrorCode::TooLarge,
        ),
    ] {
        let got = api(
            &mut sim,
            2,
            9,
            ApiOp::Publish {
                user: "backend".into(),
                send: MessageSend::new(ch.as_str(), "x"),
                meta: Some(Json(meta)),
            },
        );
        assert_eq!(error_code(&got, 9), code);
    }
    // Notify: at once to an online user, kept for an offline one.
    let home = home_of("alice", 3);
    let got = api(
        &mut sim,
        home,
        10,
        ApiOp::Notify {
            user: "alice".into(),
            kind: "invoice".into(),
            data: Some(Json(r#"{"amount":3}"#.into())),
        },
    );
    assert!(
        matches!(ack_body(&got, 10), AckBody::Notifications(n) if n.notifications[0].kind == "invoice")
    );
    assert!(names(&ra.take()).iter().any(|n| n == "notification:new"));
    let home = home_of("bob", 3);
    api(
        &mut sim,
        home,
        11,
        ApiOp::Notify {
            user: "bob".into(),
            kind: "welcome".into(),
            data: None,
        },
    );
    let (_, rb) = sim.connect(1, "bob", Protocol::Json);
    assert!(names(&rb.take()).iter().any(|n| n == "notification:new"));
    // Members, from the owner.
    let got = api(
        &mut sim,
        2,
        12,
        ApiOp::Members {
            channel: ch.clone(),
        },
    );
    match ack_body(&got, 12) {
        AckBody::Members(m) => assert_eq!(m.members[0].user_id, "alice"),
        other => panic!("{other:?}"),
    }
    // Ban from anywhere: the user's connections are closed.
    let ban = Moderation {
        kind: ModKind::Ban { until: None },
        user: "alice".into(),
        channel: None,
        reason: Some("fraud".into()),
        by: "backend".into(),
        at: 0,
        from: None,
        ack: None,
    };
    let got = api(&mut sim, 0, 13, ApiOp::Moderate(ban));
    assert!(matches!(ack_body(&got, 13), AckBody::Empty(_)));
    assert_eq!(ra.closed.get(), Some(crate::ws::close::BANNED));
}

/// Sends `content` to `ch` from `c`, mentioning `mentions`.
fn mention(sim: &mut Sim, c: ConnRef, id: u64, ch: &str, content: &str, mentions: &[&str]) {
    let mut m = MessageSend::new(ch, content);
    m.mentions = mentions.iter().map(|u| u.to_string()).collect();
    sim.send(c, Some(id), ClientEvent::MessageSend(m));
}

/// The notifications `user` keeps on its home shard.
fn kept(sim: &Sim, user: &str) -> Vec<Notification> {
    let home = home_of(user, sim.shards.len() as u16) as usize;
    sim.shards[home]
        .users
        .get(user)
        .map(|st| st.notifications().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn a_mention_obeys_the_users_grant_and_keeps_an_excerpt() {
    let mut sim = Sim::new(2);
    let (a, ra) = sim.connect_as(0, "alice", granted(&["*"], Some(&["bob"])));
    sim.join(a, "general");
    ra.take();
    // Carol is not granted to alice: neither a direct message nor a
    // mention reaches her.
    let long = "y".repeat(4000);
    mention(&mut sim, a, 10, "general", &long, &["carol"]);
    assert_eq!(error_code(&ra.take(), 10), ErrorCode::Forbidden);
    assert!(kept(&sim, "carol").is_empty());
    // Bob is: he is not in the channel, so the mention is kept for him,
    // as a reference and an excerpt, not a copy of 4,000 characters.
    mention(&mut sim, a, 11, "general", &long, &["bob"]);
    assert!(matches!(ack_body(&ra.take(), 11), AckBody::Send(_)));
    let n = kept(&sim, "bob");
    assert_eq!(n.len(), 1);
    let data: serde_json::Value = serde_json::from_str(&n[0].data.as_ref().unwrap().0).unwrap();
    assert_eq!(data["channelId"], "general");
    assert_eq!(data["fromUserId"], "alice");
    assert!(data["messageId"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(data["excerpt"].as_str().unwrap().chars().count(), 101);
    assert!(data.get("content").is_none());
    assert!(n[0].data.as_ref().unwrap().0.len() < 300);
}

#[test]
fn stored_notifications_are_bounded_per_sender_and_per_node() {
    let settings = Settings {
        max_notifications_per_sender: 5,
        max_stored_notifications: 8,
        ..unlimited()
    };
    let mut sim = Sim::with(1, settings);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (z, rz) = sim.connect(0, "zed", Protocol::Json);
    sim.join(a, "general");
    sim.join(z, "general");
    // Alice mentions 20 users who are away: 5 are kept.
    let away: Vec<String> = (0..20).map(|i| format!("away-{i}")).collect();
    let names: Vec<&str> = away.iter().map(String::as_str).collect();
    mention(&mut sim, a, 1, "general", "hi", &names);
    ra.take();
    let total = |sim: &Sim| away.iter().map(|u| kept(sim, u).len()).sum::<usize>();
    assert_eq!(total(&sim), 5);
    assert_eq!(sim.shards[0].metrics.notifications_dropped.get(), 15);
    // Another sender has a share of its own, up to the node's total.
    mention(&mut sim, z, 2, "general", "hey", &names);
    rz.take();
    assert_eq!(total(&sim), 8);
    assert_eq!(sim.shards[0].metrics.notifications_stored.get(), 8);
    // Reading does not free room; clearing does, and expiry does.
    let first = kept(&sim, "away-0")[0].notification_id.clone();
    let (r, rr) = sim.connect(0, "away-0", Protocol::Json);
    rr.take();
    sim.send(
        r,
        Some(3),
        ClientEvent::NotificationClear(NotificationRef {
            notification_id: first,
        }),
    );
    assert_eq!(sim.shards[0].metrics.notifications_stored.get(), 7);
    sim.advance(Settings::default().notification_ttl_ms + 1);
    assert_eq!(total(&sim), 0);
    assert_eq!(sim.shards[0].metrics.notifications_stored.get(), 0);
    mention(&mut sim, a, 4, "general", "again", &names[..3]);
    assert_eq!(total(&sim), 3, "room again once they expired");
}
