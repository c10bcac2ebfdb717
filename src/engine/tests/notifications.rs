//! Mentions notify users outside the channel; stored notifications expire.

use super::*;

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
