//! Calls: ringing every device, the first answer wins, and every way a call ends.

use super::*;

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
