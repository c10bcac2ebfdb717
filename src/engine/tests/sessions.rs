//! Sessions resumed on another shard with exactly what they missed.

use super::*;

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
