//! Presence across devices and shards, subscriptions and their bounds.

use super::*;

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
