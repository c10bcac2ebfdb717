//! The application's own events: allowed names pass through to a channel's
//! members, on every shard, without being kept; the server API sends them
//! to a channel or to a user's devices.

use super::*;

fn custom(msgs: &[ServerMessage]) -> Vec<(String, CustomEvent)> {
    picked(msgs, |e| match e {
        ServerEvent::Custom(name, c) => Some((name.clone(), c.clone())),
        _ => None,
    })
}

fn game() -> Settings {
    Settings {
        custom_events: Some(
            crate::access::Patterns::new("custom_events", &["game:*".into()]).unwrap(),
        ),
        max_custom_event_bytes: 64,
        ..unlimited()
    }
}

fn send(channel: &str, data: Option<&str>) -> CustomSend {
    CustomSend {
        channel_id: channel.into(),
        data: data.map(|d| Json(d.into())),
    }
}

#[test]
fn an_allowed_event_reaches_every_member_and_is_not_kept() {
    let mut sim = Sim::with(3, game());
    let c = channel_owned_by(2, 3);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::SocketIo);
    let (_, rn) = sim.connect(1, "nick", Protocol::Json);
    sim.join(a, &c);
    sim.join(b, &c);
    ra.take();
    rb.take();
    let e = ClientEvent::Custom("game:move".into(), send(&c, Some(r#"{"x":1}"#)));
    sim.send(a, Some(7), e);
    let got_a = ra.take();
    assert!(matches!(ack_body(&got_a, 7), AckBody::Empty(_)));
    let want = (
        "game:move".to_string(),
        CustomEvent {
            channel_id: Some(c.clone()),
            user_id: Some("alice".into()),
            data: Some(Json(r#"{"x":1}"#.into())),
        },
    );
    assert_eq!(
        custom(&got_a),
        std::slice::from_ref(&want),
        "the sender's devices too"
    );
    assert_eq!(custom(&rb.take()), [want]);
    assert!(custom(&rn.take()).is_empty(), "not a member");
    // Not kept: the history has no trace of it.
    sim.send(
        a,
        Some(8),
        ClientEvent::ChannelGetHistory(GetHistory {
            channel_id: c.clone(),
            before: None,
            limit: None,
        }),
    );
    match ack_body(&ra.take(), 8) {
        AckBody::History(h) => assert!(h.messages.is_empty()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn other_names_strangers_and_large_data_are_refused() {
    let mut sim = Sim::with(2, game());
    let c = channel_owned_by(1, 2);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    sim.join(a, &c);
    ra.take();
    let cases = [
        ("chess:move", send(&c, None), a, ErrorCode::Unsupported),
        ("game:move", send(&c, None), b, ErrorCode::Forbidden),
        (
            "game:move",
            send(&c, Some(&format!("\"{}\"", "x".repeat(64)))),
            a,
            ErrorCode::TooLarge,
        ),
    ];
    for (i, (name, s, who, code)) in cases.into_iter().enumerate() {
        let rec = if who == a { &ra } else { &rb };
        sim.send(who, Some(i as u64), ClientEvent::Custom(name.into(), s));
        assert_eq!(error_code(&rec.take(), i as u64), code, "{name}");
    }
    // Without `custom_events`, no name is allowed.
    let mut plain = Sim::new(1);
    let (p, rp) = plain.connect(0, "pat", Protocol::Json);
    plain.join(p, "room");
    rp.take();
    plain.send(
        p,
        Some(1),
        ClientEvent::Custom("game:move".into(), send("room", None)),
    );
    assert_eq!(error_code(&rp.take(), 1), ErrorCode::Unsupported);
}

#[test]
fn the_applications_events_have_a_rate_limit_of_their_own() {
    let mut settings = game();
    let two = limits::Limit {
        count: 2,
        per_ms: 60_000,
    };
    settings.rate_limits.set("custom", Some(two)).unwrap();
    settings.rate_limits.set("default", Some(two)).unwrap();
    let mut sim = Sim::with(1, settings);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    sim.join(a, "table");
    ra.take();
    for i in 0..3 {
        sim.send(
            a,
            Some(i),
            ClientEvent::Custom("game:move".into(), send("table", None)),
        );
    }
    let got = ra.take();
    assert!(matches!(ack_body(&got, 1), AckBody::Empty(_)));
    assert_eq!(error_code(&got, 2), ErrorCode::RateLimited, "the third");
    // Read from JSON text, the envelope is charged to the same bucket.
    sim.send_frame(
        a,
        true,
        br#"{"t":"game:move","id":3,"d":{"channelId":"table"}}"#,
    );
    assert_eq!(error_code(&ra.take(), 3), ErrorCode::RateLimited);
    // The default bucket is another one: a name the patterns do not allow
    // is still answered (unsupported), not refused by the custom limit.
    sim.send(
        a,
        Some(9),
        ClientEvent::Custom("chess:move".into(), send("table", None)),
    );
    assert_eq!(error_code(&ra.take(), 9), ErrorCode::Unsupported);
}
