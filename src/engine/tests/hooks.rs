//! The publish hook, sans IO: a message to a hooked channel waits for the
//! backend's verdict without holding up anyone else; its connection's
//! later events wait behind it, in order; the verdict lets it through,
//! rewrites it or refuses it; a failure refuses it (`unavailable`).

use super::*;
use crate::engine::hooks::{HookAnswer, HookCall, HookKind, MAX_HELD};

const N: u16 = 2;

fn hooked() -> (Sim, ShardId) {
    let settings = Settings {
        publish_hook: Some(crate::access::Patterns::new("hooks", &["mod-*".into()]).unwrap()),
        max_hook_waiting: 3,
        ..unlimited()
    };
    let mut sim = Sim::with(N, settings);
    let endpoint = crate::mesh::hooks_endpoint(N as usize);
    for e in &mut sim.shards {
        e.set_hooks(endpoint);
    }
    (sim, endpoint)
}

/// The questions the hooks endpoint received.
fn calls(sim: &mut Sim, endpoint: ShardId) -> Vec<HookCall> {
    std::iter::from_fn(|| sim.mesh.0[endpoint as usize].pop_front())
        .map(|m| match m {
            MeshMsg::HookCall(c) => *c,
            other => panic!("{other:?}"),
        })
        .collect()
}

fn answer(sim: &mut Sim, call: &HookCall, result: Result<&str, &str>) {
    let a = HookAnswer {
        token: call.token,
        result: result.map(|b| b.as_bytes().to_vec()).map_err(str::to_owned),
    };
    let shard = call.from as usize;
    let now = sim.now;
    sim.shards[shard].handle_mesh(MeshMsg::HookAnswer(Box::new(a)), now, &mut sim.mesh);
    sim.settle();
}

fn send(sim: &mut Sim, c: ConnRef, id: u64, channel: &str, content: &str) {
    sim.send(
        c,
        Some(id),
        ClientEvent::MessageSend(MessageSend::new(channel, content)),
    );
}

#[test]
fn a_hooked_message_waits_for_its_verdict_and_its_connection_keeps_its_order() {
    let (mut sim, endpoint) = hooked();
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    for c in ["mod-1", "free"] {
        sim.join(a, c);
        sim.join(b, c);
    }
    ra.take();
    rb.take();
    // Alice's message waits; what she sends next waits behind it, even to
    // a channel without the hook.
    send(&mut sim, a, 10, "mod-1", "first");
    send(&mut sim, a, 11, "free", "second");
    sim.send(
        a,
        Some(12),
        ClientEvent::TypingStart(ChannelRef {
            channel_id: "free".into(),
        }),
    );
    send(&mut sim, a, 13, "mod-1", "shout:third");
    let asked = calls(&mut sim, endpoint);
    assert_eq!(asked.len(), 1, "one question at a time per connection");
    assert_eq!(asked[0].kind, HookKind::Publish);
    let body: serde_json::Value = serde_json::from_slice(&asked[0].body).unwrap();
    assert_eq!(body["userId"], "alice");
    assert_eq!(body["channelId"], "mod-1");
    assert_eq!(body["content"], "first");
    assert!(ra.take().is_empty(), "nothing answered yet");
    // Bob is not held up: his message to the free channel goes at once.
    send(&mut sim, b, 20, "free", "bob's");
    assert!(matches!(ack_body(&rb.take(), 20), AckBody::Send(_)));
    assert_eq!(contents(&ra.take()), [(1, "bob's".to_string())]);
    // Allowed: alice's first, then her next events in order, until the
    // hooked one asks again.
    answer(&mut sim, &asked[0], Ok(r#"{"result":"allow"}"#));
    let got = ra.take();
    let acked: Vec<u64> = got
        .iter()
        .filter(|m| matches!(m.event, ServerEvent::Ack(_)))
        .filter_map(|m| m.id)
        .collect();
    assert_eq!(acked, [10, 11, 12]);
    assert_eq!(
        contents(&got),
        [(1, "first".to_string()), (2, "second".to_string())]
    );
    let asked = calls(&mut sim, endpoint);
    assert_eq!(asked.len(), 1);
    // Rewritten.
    answer(
        &mut sim,
        &asked[0],
        Ok(r#"{"result":"rewrite","content":"THIRD"}"#),
    );
    let got = ra.take();
    assert!(matches!(ack_body(&got, 13), AckBody::Send(_)));
    assert_eq!(contents(&got), [(2, "THIRD".to_string())]);
    assert_eq!(contents(&rb.take()).last().unwrap().1, "THIRD");
    // Metadata attached, the content kept; both see it.
    send(&mut sim, a, 17, "mod-1", "see https://example.com");
    let asked = calls(&mut sim, endpoint);
    answer(
        &mut sim,
        &asked[0],
        Ok(
            r#"{"result":"rewrite","meta":{"links":[{"url":"https://example.com","title":"Example"}]}}"#,
        ),
    );
    let metas = |got: &[ServerMessage]| {
        picked(got, |e| match e {
            ServerEvent::MessageNew(m) => Some((m.content.clone(), m.meta.clone())),
            _ => None,
        })
    };
    let want = vec![(
        "see https://example.com".to_string(),
        Some(Json(
            r#"{"links":[{"title":"Example","url":"https://example.com"}]}"#.into(),
        )),
    )];
    let got = ra.take();
    assert!(matches!(ack_body(&got, 17), AckBody::Send(_)));
    assert_eq!(metas(&got), want);
    assert_eq!(metas(&rb.take()), want);
    // Metadata that is not an object: the backend's fault, refused.
    send(&mut sim, a, 18, "mod-1", "x");
    let asked = calls(&mut sim, endpoint);
    answer(
        &mut sim,
        &asked[0],
        Ok(r#"{"result":"rewrite","meta":[1]}"#),
    );
    assert_eq!(error_code(&ra.take(), 18), ErrorCode::BadRequest);
    assert!(contents(&rb.take()).is_empty());
    // Rejected, with the backend's reason.
    send(&mut sim, a, 14, "mod-1", "no");
    let asked = calls(&mut sim, endpoint);
    answer(
        &mut sim,
        &asked[0],
        Ok(r#"{"result":"reject","reason":"not here"}"#),
    );
    let got = ra.take();
    assert_eq!(error_code(&got, 14), ErrorCode::Forbidden);
    assert!(format!("{got:?}").contains("not here"));
    // The backend failed, or answered nonsense: refused, `unavailable`.
    for (id, result) in [(15, Err("timed out")), (16, Ok(r#"{"ok":true}"#))] {
        send(&mut sim, a, id, "mod-1", "lost");
        let asked = calls(&mut sim, endpoint);
        answer(&mut sim, &asked[0], result);
        assert_eq!(error_code(&ra.take(), id), ErrorCode::Unavailable);
    }
    assert!(contents(&rb.take()).is_empty(), "nothing refused went out");
    let m = &sim.shards[0].metrics;
    assert_eq!(
        (
            m.hook_calls.get(),
            m.hook_rejected.get(),
            m.hook_failures.get()
        ),
        (7, 1, 3)
    );
}

#[test]
fn the_waiting_table_is_bounded_and_a_closed_connection_is_forgotten() {
    let (mut sim, endpoint) = hooked();
    let mut conns = Vec::new();
    for u in ["u1", "u2", "u3", "u4"] {
        let (c, r) = sim.connect(0, u, Protocol::Json);
        sim.join(c, "mod-1");
        r.take();
        conns.push((c, r));
    }
    for (i, (c, _)) in conns.iter().enumerate() {
        send(&mut sim, *c, 10, "mod-1", &format!("m{i}"));
    }
    // Three wait (max_hook_waiting); the fourth is refused at once.
    let asked = calls(&mut sim, endpoint);
    assert_eq!(asked.len(), 3);
    assert_eq!(error_code(&conns[3].1.take(), 10), ErrorCode::Unavailable);
    assert_eq!(sim.shards[0].metrics.hook_refused.get(), 1);
    // A connection that closed meanwhile: its answer is dropped.
    sim.close(conns[0].0);
    answer(&mut sim, &asked[0], Ok(r#"{"result":"allow"}"#));
    assert!(contents(&conns[1].1.take()).is_empty());
    // Too many events held behind a question: closed with 1008.
    let (c, r) = (conns[1].0, &conns[1].1);
    for i in 0..MAX_HELD as u64 {
        sim.send(c, Some(100 + i), ClientEvent::Heartbeat);
    }
    assert!(r.closed.get().is_none());
    sim.send(c, Some(999), ClientEvent::Heartbeat);
    assert_eq!(r.closed.get(), Some(crate::ws::close::POLICY_VIOLATION));
    answer(&mut sim, &asked[1], Ok(r#"{"result":"allow"}"#));
    answer(&mut sim, &asked[2], Ok(r#"{"result":"allow"}"#));
    assert_eq!(contents(&conns[2].1.take()), [(1, "m2".to_string())]);
    assert_eq!(sim.shards[0].hooks.waiting(), 0);
}

#[test]
fn an_rpc_goes_to_the_backend_and_its_answer_comes_back_in_the_ack() {
    let settings = Settings {
        rpc_hook: true,
        ..unlimited()
    };
    let mut sim = Sim::with(N, settings);
    let endpoint = crate::mesh::hooks_endpoint(N as usize);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    // Without the hooks' endpoint: unsupported.
    let call = |method: &str, data: Option<&str>| {
        ClientEvent::Rpc(RpcCall {
            method: method.into(),
            data: data.map(|d| Json(d.into())),
        })
    };
    sim.send(a, Some(1), call("echo", None));
    assert_eq!(error_code(&ra.take(), 1), ErrorCode::Unsupported);
    for e in &mut sim.shards {
        e.set_hooks(endpoint);
    }
    sim.send(a, Some(2), call("add", Some("[1,2]")));
    sim.send(a, Some(3), call("nope", None));
    sim.send(a, Some(4), call("broken", None));
    let asked = calls(&mut sim, endpoint);
    assert_eq!(asked.len(), 1, "the next wait behind the first");
    assert_eq!(asked[0].kind, HookKind::Rpc);
    let body: serde_json::Value = serde_json::from_slice(&asked[0].body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"userId": "alice", "method": "add", "data": [1, 2]})
    );
    answer(&mut sim, &asked[0], Ok(r#"{"data":{"sum":3}}"#));
    match ack_body(&ra.take(), 2) {
        AckBody::Rpc(r) => assert_eq!(r.data, Json(r#"{"sum":3}"#.into())),
        other => panic!("{other:?}"),
    }
    let asked = calls(&mut sim, endpoint);
    answer(
        &mut sim,
        &asked[0],
        Ok(r#"{"error":{"code":"not_found","message":"no method nope"}}"#),
    );
    let got = ra.take();
    assert_eq!(error_code(&got, 3), ErrorCode::NotFound);
    assert!(format!("{got:?}").contains("no method nope"));
    let asked = calls(&mut sim, endpoint);
    answer(
        &mut sim,
        &asked[0],
        Ok(r#"{"data":1,"error":{"message":"x"}}"#),
    );
    assert_eq!(error_code(&ra.take(), 4), ErrorCode::Unavailable);
    // An answer without data: null.
    sim.send(a, Some(5), call("ping", None));
    let asked = calls(&mut sim, endpoint);
    answer(&mut sim, &asked[0], Ok("{}"));
    match ack_body(&ra.take(), 5) {
        AckBody::Rpc(r) => assert_eq!(r.data, Json("null".into())),
        other => panic!("{other:?}"),
    }
}
