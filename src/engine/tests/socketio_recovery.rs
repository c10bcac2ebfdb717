//! Socket.IO's connection state recovery in the engine: a reconnection
//! that names its session and the last event it received gets every
//! channel back with exactly what it missed, or, when that cannot be told
//! or given, a new session in no channel.

use super::*;

fn ready_session(msgs: &[ServerMessage]) -> Option<String> {
    picked(msgs, |e| match e {
        ServerEvent::Ready(r) => Some(r.session_id.clone()),
        _ => None,
    })
    .pop()
}

/// Alice (Socket.IO, shard 0) in two channels with Bob; she receives
/// a1 and b1, drops, and misses a2, b2.
fn dropped(settings: Settings) -> (Sim, ConnRef, [String; 2], String, String) {
    let mut sim = Sim::with(3, settings);
    let chans = [channel_owned_by(1, 3), channel_owned_by(2, 3)];
    let (a, ra) = sim.connect(0, "alice", Protocol::SocketIo);
    let (b, _rb) = sim.connect(1, "bob", Protocol::Json);
    for c in &chans {
        sim.join(a, c);
        sim.join(b, c);
    }
    sim.publish(b, &chans[0], "a1");
    sim.publish(b, &chans[1], "b1");
    assert_eq!(contents(&ra.take()).len(), 2);
    let session = sim.shards[0]
        .conn(a.conn)
        .unwrap()
        .member
        .session
        .to_string();
    let token = format!("1:{}:{}", epoch_of(&sim, &chans[1]), chans[1]);
    sim.close(a);
    sim.publish(b, &chans[0], "a2");
    sim.publish(b, &chans[1], "b2");
    (sim, b, chans, session, token)
}

fn reconnect(sim: &mut Sim, session: &str, last: Option<String>) -> (ConnRef, Recorder) {
    let (a2, ra2) = sim.connect(2, "alice", Protocol::SocketIo);
    ra2.take();
    let fresh = sim.shards[2].conn(a2.conn).unwrap().member.session;
    let ready = Ready {
        user_id: "alice".into(),
        session_id: fresh.to_string(),
        shard: 2,
        heartbeat_interval_ms: 25_000,
    };
    let recovery = Recovery::new(last, ready);
    let now = sim.now;
    sim.shards[2].recover(
        a2.conn,
        session.parse().unwrap(),
        recovery,
        now,
        &mut sim.mesh,
    );
    sim.settle();
    (a2, ra2)
}

#[test]
fn every_channel_comes_back_with_what_was_missed() {
    let (mut sim, b, chans, session, token) = dropped(unlimited());
    let (a2, ra2) = reconnect(&mut sim, &session, Some(token));
    let got = ra2.take();
    assert_eq!(ready_session(&got), Some(session), "the same session");
    let mut missed = contents(&got);
    missed.sort();
    assert_eq!(missed, [(2, "a2".to_string()), (2, "b2".to_string())]);
    // A member again, of both.
    sim.publish(b, &chans[0], "a3");
    assert_eq!(contents(&ra2.take()), [(3, "a3".to_string())]);
    let _ = a2;
    let recovered: u64 = sim
        .shards
        .iter()
        .map(|s| s.metrics.socketio_recovered.get())
        .sum();
    assert_eq!(recovered, 1);
}

#[test]
fn a_gap_older_than_a_history_gives_a_new_session_in_no_channel() {
    let settings = Settings {
        history_size: 1,
        ..unlimited()
    };
    let (mut sim, b, chans, session, _) = dropped(settings);
    // a3 pushes a2 out of the first channel's history.
    sim.publish(b, &chans[0], "a3");
    // She last received a1: a2 cannot be replayed.
    let token = format!("1:{}:{}", epoch_of(&sim, &chans[0]), chans[0]);
    let (a2, ra2) = reconnect(&mut sim, &session, Some(token));
    let got = ra2.take();
    let new = ready_session(&got).expect("ready");
    assert_ne!(new, session, "a new session");
    sim.send(
        a2,
        Some(5),
        ClientEvent::MessageSend(MessageSend {
            channel_id: chans[1].clone(),
            content: "x".into(),
            reply_to: None,
            thread_id: None,
            mentions: vec![],
            nonce: None,
        }),
    );
    assert_eq!(
        error_code(&ra2.take(), 5),
        ErrorCode::Forbidden,
        "in no channel"
    );
    let not: u64 = sim
        .shards
        .iter()
        .map(|s| s.metrics.socketio_not_recovered.get())
        .sum();
    assert_eq!(not, 1);
}

#[test]
fn an_unknown_session_or_offset_gives_a_new_session() {
    let (mut sim, _, chans, session, _) = dropped(unlimited());
    let bogus = format!("9:{}:{}", epoch_of(&sim, &chans[0]), chans[0]);
    let (_, ra2) = reconnect(&mut sim, &session, Some(bogus));
    assert_ne!(ready_session(&ra2.take()), Some(session.clone()));
    // Taken once: the session is gone now, whatever the offset.
    let (_, ra3) = reconnect(&mut sim, &session, None);
    assert_ne!(ready_session(&ra3.take()), Some(session));
}
