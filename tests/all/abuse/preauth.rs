//! What a connection may do before it authenticates: small messages, a
//! share of a per-shard buffer budget, a few mistakes.

use corecast::ws::frame::encode_masked;
use corecast::ws::OpCode;
use serde_json::json;

use crate::common::*;

#[test]
fn before_auth_a_message_may_be_small_only() {
    for driver in ["io_uring", "epoll"] {
        let s = Server::start(&["--shards", "1", "--io-driver", driver]);
        // A header that announces 1 MiB is refused at once (1009), before
        // a byte of its payload.
        let mut raw = Raw::connect(s.addr, "/ws", "");
        let f = encode_masked(true, OpCode::Text, &vec![b' '; 1 << 20], [1, 2, 3, 4]);
        raw.send_bytes(&f[..14]);
        assert_eq!(raw.recv_close(), Some(1009), "{driver}");
        // So is an `auth` message past 16 KiB.
        let mut raw = Raw::connect(s.addr, "/ws", "");
        let big = json!({"t": "auth", "d": {"token": "x".repeat(20_000)}});
        raw.json(big);
        assert_eq!(raw.recv_close(), Some(1009), "{driver}");
        // An authenticated connection may send up to max_message_size.
        let mut raw = Raw::connect(s.addr, &format!("/ws?token={}", token("alice", 600)), "");
        assert_eq!(raw.recv_json()["t"], "ready");
        raw.json(json!({"t": "heartbeat", "id": 1, "d": {"pad": "x".repeat(100_000)}}));
        assert_eq!(raw.recv_json()["t"], "heartbeat:ack", "{driver}");
    }
}

#[test]
fn what_unauthenticated_connections_buffer_is_bounded_per_shard() {
    for driver in ["io_uring", "epoll"] {
        let budget: u64 = 64 << 10;
        let s = Server::start(&[
            "--shards",
            "1",
            "--io-driver",
            driver,
            "--max-preauth-bytes-per-shard",
            &budget.to_string(),
        ]);
        // Each holds an incomplete 12 KiB frame, 10 KiB of it sent: the
        // budget holds a few of them, and the others are closed (1013).
        let mut held = Vec::new();
        for _ in 0..30 {
            let mut raw = Raw::connect(s.addr, "/ws", "");
            let f = encode_masked(true, OpCode::Text, &vec![b' '; 12 << 10], [1, 2, 3, 4]);
            raw.send_bytes(&f[..10 << 10]);
            held.push(raw);
        }
        let mut refused = 0;
        for raw in held.iter_mut() {
            raw.s
                .set_read_timeout(Some(std::time::Duration::from_millis(300)))
                .unwrap();
            if let Some(f) = raw.recv() {
                if f.close_code() == Some(1013) {
                    refused += 1;
                }
            }
        }
        assert!(
            (20..30).contains(&refused),
            "{driver}: {refused} of 30 closed"
        );
        let buffered = s.metric("corecast_preauth_bytes");
        assert!(buffered <= budget, "{driver}: {buffered} bytes buffered");
        // Counted as each close completes, a moment after the 1013 is sent.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while s.metric("corecast_preauth_closes_total") < 20 {
            assert!(
                std::time::Instant::now() < deadline,
                "{driver}: {} pre-auth closes counted",
                s.metric("corecast_preauth_closes_total")
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Authenticated clients are not touched.
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut a = Peer::on(&s, "alice", 0, "").await;
            a.ok("channel:join", json!({"channelId": "general"})).await;
        });
        drop(held);
    }
}

#[test]
fn messages_other_than_auth_are_strikes() {
    let s = Server::start(&["--shards", "1"]);
    let mut raw = Raw::connect(s.addr, "/ws", "");
    for i in 0..11 {
        raw.json(json!({"t": "channel:join", "id": i, "d": {"channelId": "x"}}));
    }
    raw.send(true, OpCode::Text, b"{not json");
    let mut errors = 0;
    let code = loop {
        let f = raw.recv().expect("closed without a close frame");
        match f.opcode {
            OpCode::Text => errors += 1,
            OpCode::Close => break f.close_code(),
            _ => {}
        }
    };
    assert_eq!(code, Some(1008));
    assert_eq!(errors, 11, "each answered until the strike that closed it");
}
