//! Authentication, channels, fan-out across shards, the binary protocol,
//! slow consumers and graceful shutdown, over real sockets.

use std::time::Duration;

use crate::common::*;
use corecast::protocol::{
    self, binary, AckBody, ChannelJoin, ClientEvent, ClientMessage, MessageSend, ServerEvent,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn authentication_paths() {
    let s = Server::start(&["--shards", "1", "--auth-timeout-ms", "300"]);
    // Query parameter.
    let (_ws, ready) = ws_user(&s, "alice").await;
    assert_eq!(ready["d"]["userId"], "alice");
    assert_eq!(ready["d"]["shard"], 0);
    assert_eq!(ready["d"]["heartbeatIntervalMs"], 25000);
    assert_eq!(ready["d"]["sessionId"].as_str().unwrap().len(), 32);
    // Authorization header.
    let mut raw = Raw::connect(
        s.addr,
        "/ws",
        &format!("Authorization: Bearer {}\r\n", token("bob", 600)),
    );
    assert_eq!(raw.recv_json()["d"]["userId"], "bob");
    // `auth` message, after a refused event.
    let mut ws = ws_connect(&s.url("/ws"), None).await;
    send(
        &mut ws,
        json!({"t": "channel:join", "id": 1, "d": {"channelId": "x"}}),
    )
    .await;
    let e = recv(&mut ws).await;
    assert_eq!(
        (e["t"].as_str(), e["id"].as_u64(), e["d"]["code"].as_str()),
        (Some("error"), Some(1), Some("unauthorized"))
    );
    send(
        &mut ws,
        json!({"t": "auth", "id": 2, "d": {"token": token("carol", 600)}}),
    )
    .await;
    assert_eq!(recv(&mut ws).await, json!({"t": "ack", "id": 2, "d": {}}));
    assert_eq!(recv(&mut ws).await["d"]["userId"], "carol");
    // Expired and forged tokens are refused before the upgrade.
    for bad in [
        token("dave", -3600),
        token("dave", 600).replace('.', ".x"),
        "not-a-jwt".to_string(),
    ] {
        let resp = http_raw(
            s.addr,
            upgrade_request(&format!("/ws?token={bad}"), "").as_bytes(),
        );
        assert!(resp.starts_with("HTTP/1.1 401 "), "{resp}");
    }
    // A bad `auth` message: typed error, then close 4001.
    let mut ws = ws_connect(&s.url("/ws"), None).await;
    send(
        &mut ws,
        json!({"t": "auth", "id": 3, "d": {"token": token("eve", -3600)}}),
    )
    .await;
    let e = recv(&mut ws).await;
    assert_eq!(e["d"]["code"], "unauthorized");
    assert_eq!(recv_close(&mut ws).await, Some(CloseCode::from(4001)));
    // No `auth` in time: close 4001.
    let mut ws = ws_connect(&s.url("/ws"), None).await;
    assert_eq!(recv(&mut ws).await["d"]["code"], "unauthorized");
    assert_eq!(recv_close(&mut ws).await, Some(CloseCode::from(4001)));
    assert!(s.metric("corecast_auth_failures_total") >= 5);
}

#[tokio::test]
async fn bad_input_gets_typed_errors_and_the_connection_stays_open() {
    let s = Server::start(&["--shards", "1"]);
    let (mut ws, _) = ws_user(&s, "alice").await;
    let cases = [
        ("{not json", None, "bad_request"),
        (
            r#"{"t":"channel:join","id":4,"d":{"channelId":7}}"#,
            Some(4),
            "bad_request",
        ),
        (
            r#"{"t":"message:send","id":5,"d":{"channelId":"c"}}"#,
            Some(5),
            "bad_request",
        ),
        (
            r#"{"t":"server:dance","id":6,"d":{}}"#,
            Some(6),
            "unsupported",
        ),
        (
            r#"{"t":"message:send","id":7,"d":{"channelId":"c","content":"x"}}"#,
            Some(7),
            "forbidden",
        ),
        (
            r#"{"t":"channel:leave","id":8,"d":{"channelId":"c"}}"#,
            Some(8),
            "not_found",
        ),
    ];
    for (input, id, code) in cases {
        ws.send(Message::Text(input.into())).await.unwrap();
        let e = recv(&mut ws).await;
        assert_eq!(e["t"], "error", "{input}");
        assert_eq!(e["d"]["code"], code, "{input}: {e}");
        assert_eq!(e["id"].as_u64(), id, "{input}");
        assert!(!e["d"]["message"].as_str().unwrap().is_empty());
    }
    // Binary frames on the JSON protocol are refused the same way.
    ws.send(Message::Binary(vec![1u8, 2].into())).await.unwrap();
    assert_eq!(recv(&mut ws).await["d"]["code"], "bad_request");
    send(&mut ws, json!({"t": "heartbeat", "id": 9})).await;
    let hb = recv(&mut ws).await;
    assert_eq!(
        (hb["t"].as_str(), hb["id"].as_u64()),
        (Some("heartbeat:ack"), Some(9))
    );
    assert!(hb["d"]["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
}

/// Opens connections as `user` until one lands on `shard` (the kernel
/// spreads connections over the shards' listeners).
async fn user_on_shard(s: &Server, user: &str, shard: u64) -> Ws {
    for _ in 0..200 {
        let (ws, ready) = ws_user(s, user).await;
        if ready["d"]["shard"] == shard {
            return ws;
        }
    }
    panic!("no connection landed on shard {shard}");
}

async fn members_on_two_shards_see_one_order(driver: &str) {
    let s = Server::start(&["--shards", "2", "--io-driver", driver]);
    assert!(
        s.metrics().contains(&format!("io_driver=\"{driver}\"")),
        "{}",
        s.metrics()
    );
    let mut a = user_on_shard(&s, "alice", 0).await;
    let mut b = user_on_shard(&s, "bob", 1).await;
    let ja = join(&mut a, "general", 1).await;
    assert_eq!(ja["d"]["members"], 1);
    assert_eq!(ja["d"]["offset"], 0);
    let jb = join(&mut b, "general", 1).await;
    assert_eq!(jb["d"]["members"], 2);
    assert_eq!(jb["d"]["epoch"], ja["d"]["epoch"]);
    let joined = recv_event(&mut a, "channel:member_joined").await;
    assert_eq!(
        joined["d"],
        json!({"channelId": "general", "userId": "bob", "sessionId": joined["d"]["sessionId"]})
    );
    // Both publish, interleaved, without waiting for acks.
    const N: usize = 100;
    for i in 0..N {
        let (ws, who) = if i % 2 == 0 {
            (&mut a, "alice")
        } else {
            (&mut b, "bob")
        };
        send(ws, json!({"t": "message:send", "id": 100 + i, "d": {"channelId": "general", "content": format!("{who} {i}")}})).await;
    }
    let mut seen = [Vec::new(), Vec::new()];
    let mut acks = [0, 0];
    for (k, ws) in [&mut a, &mut b].into_iter().enumerate() {
        while seen[k].len() < N {
            let v = recv(ws).await;
            match v["t"].as_str().unwrap() {
                "message:new" => {
                    let d = &v["d"];
                    assert_eq!(d["channelId"], "general");
                    assert!(d["messageId"]
                        .as_str()
                        .unwrap()
                        .starts_with(ja["d"]["epoch"].as_str().unwrap()));
                    assert!(d["timestamp"].as_u64().unwrap() > 0);
                    seen[k].push((
                        d["offset"].as_u64().unwrap(),
                        d["content"].as_str().unwrap().to_string(),
                        d["userId"].as_str().unwrap().to_string(),
                    ));
                }
                "ack" => {
                    assert!(v["d"]["offset"].as_u64().unwrap() >= 1);
                    acks[k] += 1;
                }
                other => panic!("unexpected {other}: {v}"),
            }
        }
    }
    assert_eq!(seen[0], seen[1], "both members see one order");
    let offsets: Vec<u64> = seen[0].iter().map(|m| m.0).collect();
    assert_eq!(offsets, (1..=N as u64).collect::<Vec<_>>());
    // Each sender's own messages keep their sending order.
    let alice: Vec<&String> = seen[0]
        .iter()
        .filter(|m| m.2 == "alice")
        .map(|m| &m.1)
        .collect();
    assert_eq!(
        alice,
        (0..N)
            .step_by(2)
            .map(|i| format!("alice {i}"))
            .collect::<Vec<_>>()
            .iter()
            .collect::<Vec<_>>()
    );
    // Leaving is announced and stops delivery.
    send(
        &mut b,
        json!({"t": "channel:leave", "id": 7, "d": {"channelId": "general"}}),
    )
    .await;
    loop {
        let v = recv(&mut b).await;
        if v["t"] == "ack" && v["id"] == 7 {
            break;
        }
    }
    let left = recv_event(&mut a, "channel:member_left").await;
    assert_eq!(left["d"]["userId"], "bob");
    assert!(s.metric("corecast_deliveries_total") >= 2 * N as u64);
}

#[tokio::test]
async fn members_on_two_shards_see_one_order_io_uring() {
    members_on_two_shards_see_one_order("io_uring").await;
}

#[tokio::test]
async fn members_on_two_shards_see_one_order_epoll() {
    members_on_two_shards_see_one_order("epoll").await;
}

#[tokio::test]
async fn binary_protocol_speaks_the_same_events() {
    let s = Server::start(&["--shards", "2"]);
    let url = s.url(&format!("/ws?token={}", token("bin", 600)));
    let mut b = ws_connect(&url, Some("corecast.bin")).await;
    let next_bin = async |ws: &mut Ws| loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Binary(bytes) => return binary::decode_server(&bytes).unwrap(),
            Message::Text(t) => panic!("text frame on corecast.bin: {t}"),
            _ => continue,
        }
    };
    let ready = next_bin(&mut b).await;
    assert!(matches!(&ready.event, ServerEvent::Ready(r) if r.user_id == "bin"));
    let (mut j, _) = ws_user(&s, "json").await;
    join(&mut j, "mixed", 1).await;
    let join_msg = ClientMessage {
        id: Some(1),
        event: ClientEvent::ChannelJoin(ChannelJoin::new("mixed")),
    };
    b.send(Message::Binary(binary::encode_client(&join_msg).into()))
        .await
        .unwrap();
    let ack = next_bin(&mut b).await;
    assert!(
        matches!(&ack.event, ServerEvent::Ack(AckBody::Join(a)) if a.members == 2),
        "{ack:?}"
    );
    let send_msg = ClientMessage {
        id: Some(2),
        event: ClientEvent::MessageSend(MessageSend {
            channel_id: "mixed".into(),
            content: "from binary ✓".into(),
            reply_to: Some("m-1".into()),
            ..MessageSend::new("", "")
        }),
    };
    b.send(Message::Binary(binary::encode_client(&send_msg).into()))
        .await
        .unwrap();
    // The JSON member gets JSON, the binary member gets rkyv: same event.
    let as_json = recv_event(&mut j, "message:new").await;
    assert_eq!(as_json["d"]["content"], "from binary ✓");
    assert_eq!(as_json["d"]["replyTo"], "m-1");
    let mut got_new = None;
    for _ in 0..3 {
        let m = next_bin(&mut b).await;
        if let ServerEvent::MessageNew(n) = m.event {
            got_new = Some(n);
            break;
        }
    }
    let n = got_new.expect("message:new on the binary connection");
    assert_eq!(serde_json::to_value(&n).unwrap(), as_json["d"]);
    // Garbage on the binary protocol is a typed error, not a disconnect.
    b.send(Message::Binary(vec![0xFF; 7].into())).await.unwrap();
    let e = next_bin(&mut b).await;
    assert!(
        matches!(&e.event, ServerEvent::Error(err) if err.code == protocol::ErrorCode::BadRequest)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn slow_consumer_is_closed_and_others_get_everything() {
    let s = Server::start(&["--shards", "2", "--outbound-queue-frames", "256"]);
    // The slow consumer: a tiny receive buffer, and it never reads.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&s.addr.into()).unwrap();
    let mut slow = Raw::connect_with(
        sock.into(),
        &format!("/ws?token={}", token("slow", 600)),
        "",
    );
    assert_eq!(slow.recv_json()["t"], "ready");
    slow.json(json!({"t": "channel:join", "id": 1, "d": {"channelId": "busy"}}));
    assert_eq!(slow.recv_json()["t"], "ack");
    let (mut fast, _) = ws_user(&s, "fast").await;
    join(&mut fast, "busy", 1).await;
    let (mut publisher, _) = ws_user(&s, "pub").await;
    join(&mut publisher, "busy", 1).await;
    // About 12 MB: more than the slow socket's kernel buffers can absorb.
    const N: usize = 3000;
    let body = "x".repeat(3900);
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = progress.clone();
    let reader = tokio::spawn(async move {
        let mut offsets = Vec::new();
        while offsets.len() < N {
            let v = recv(&mut fast).await;
            if v["t"] == "message:new" {
                offsets.push(v["d"]["offset"].as_u64().unwrap());
                seen.store(offsets.len(), std::sync::atomic::Ordering::SeqCst);
            }
        }
        offsets
    });
    let (mut sink, mut stream) = publisher.split();
    // The publisher reads its acks (and its own messages) as it goes.
    let acks = tokio::spawn(async move {
        let mut acks = 0;
        while acks < N {
            match stream.next().await {
                Some(Ok(Message::Text(t))) if t.contains("\"t\":\"ack\"") => acks += 1,
                Some(Ok(_)) => {}
                other => panic!("publisher stream ended: {other:?}"),
            }
        }
        acks
    });
    // Batches well under the bound, each read by the fast member before the
    // next: only the member that never reads falls behind.
    for i in 0..N {
        let m = json!({"t": "message:send", "id": i, "d": {"channelId": "busy", "content": body}});
        sink.send(Message::Text(m.to_string().into()))
            .await
            .unwrap();
        if (i + 1) % 50 == 0 {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while progress.load(std::sync::atomic::Ordering::SeqCst) < i + 1 {
                assert!(std::time::Instant::now() < deadline, "fast member stalled");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(60), acks)
            .await
            .unwrap()
            .unwrap(),
        N
    );
    let offsets = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        offsets,
        (1..=N as u64).collect::<Vec<_>>(),
        "the fast member lost nothing"
    );
    assert_eq!(s.metric("corecast_slow_consumer_closes_total"), 1);
    // The slow one, reading at last, finds close 1013 after what fit.
    tokio::task::spawn_blocking(move || assert_eq!(slow.recv_close(), Some(1013)))
        .await
        .unwrap();
}

#[tokio::test]
async fn sigterm_sends_1001_to_everyone_and_exits_zero() {
    let mut s = Server::start(&["--shards", "2", "--close-timeout-ms", "1500"]);
    let mut clients = Vec::new();
    for i in 0..6 {
        let (mut ws, _) = ws_user(&s, &format!("u{i}")).await;
        join(&mut ws, "room", 1).await;
        clients.push(ws);
    }
    // One client that never answers the close keeps the node draining.
    let mut stubborn = Raw::connect(s.addr, &format!("/ws?token={}", token("stubborn", 600)), "");
    assert_eq!(stubborn.recv_json()["t"], "ready");
    s.sigterm();
    for ws in clients.iter_mut() {
        assert_eq!(recv_close(ws).await, Some(CloseCode::Away));
    }
    let (status, body) = http_get(s.addr, "/ready");
    assert_eq!((status, body.trim()), (503, "draining"));
    let upgrade = http_raw(
        s.addr,
        upgrade_request(&format!("/ws?token={}", token("late", 600)), "").as_bytes(),
    );
    assert!(upgrade.starts_with("HTTP/1.1 503 "), "{upgrade}");
    assert_eq!(stubborn.recv_close(), Some(1001));
    assert_eq!(s.wait_exit(Duration::from_secs(15)), Some(0), "{}", s.log());
}

#[test]
fn token_and_check_config_commands() {
    let bin = env!("CARGO_BIN_EXE_corecast");
    let out = std::process::Command::new(bin)
        .args(["token", "--user", "alice"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let t = String::from_utf8(out.stdout).unwrap();
    let v = corecast::auth::Verifier::from_config(&Default::default()).unwrap();
    assert_eq!(v.verify(t.trim()).unwrap(), "alice");
    let ok = std::process::Command::new(bin)
        .args(["check-config", "--shards", "3"])
        .output()
        .unwrap();
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("shards = 3"));
    assert!(String::from_utf8_lossy(&ok.stderr).contains("development mode"));
    let bad = std::process::Command::new(bin)
        .args(["check-config", "--io-driver", "kqueue"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("io_driver"));
    // Secrets are never printed.
    let shown = std::process::Command::new(bin)
        .args([
            "check-config",
            "--auth-secret",
            "auth-secret-0123456789",
            "--livekit-url",
            "wss://lk.example",
            "--livekit-api-key",
            "key",
            "--livekit-api-secret",
            "livekit-secret-0123456789",
            "--webhook-url",
            "http://127.0.0.1:9/events",
            "--webhook-secret",
            "webhook-secret-0123456789",
        ])
        .output()
        .unwrap();
    assert!(shown.status.success(), "{shown:?}");
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("wss://lk.example"), "{text}");
    assert!(text.contains("http://127.0.0.1:9/events"), "{text}");
    assert!(
        !text.contains("auth-secret-0123456789")
            && !text.contains("livekit-secret-0123456789")
            && !text.contains("webhook-secret-0123456789"),
        "{text}"
    );
    // The event stream: a plain http URL and a key of 16 bytes or more.
    for (args, says) in [
        (
            [
                "--webhook-url",
                "https://x/e",
                "--webhook-secret",
                "webhook-secret-0123456789",
            ],
            "https",
        ),
        (
            ["--webhook-url", "http://x/e", "--webhook-secret", "short"],
            "16 bytes",
        ),
        (
            [
                "--webhook-url",
                "http://x/e",
                "--webhook-outbox-max-bytes",
                "1000",
            ],
            "secret",
        ),
    ] {
        let bad = std::process::Command::new(bin)
            .arg("check-config")
            .args(args)
            .output()
            .unwrap();
        assert_eq!(bad.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&bad.stderr).contains(says),
            "{args:?}: {bad:?}"
        );
    }
    // LiveKit settings come as a set.
    let partial = std::process::Command::new(bin)
        .args(["check-config", "--livekit-url", "wss://lk.example"])
        .output()
        .unwrap();
    assert_eq!(partial.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&partial.stderr).contains("go together"));
}

#[test]
fn doctor_reports_what_the_host_lacks() {
    let bin = env!("CARGO_BIN_EXE_corecast");
    let small = std::process::Command::new(bin)
        .args(["doctor", "--connections", "10"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&small.stdout);
    for what in [
        "nofile",
        "nr_open",
        "somaxconn",
        "io_uring",
        "memory",
        "cpus",
    ] {
        assert!(text.contains(what), "{what} missing:\n{text}");
    }
    // No host holds a billion connections: it fails, naming the fixes.
    let huge = std::process::Command::new(bin)
        .args(["doctor", "--connections", "1000000000"])
        .output()
        .unwrap();
    assert_eq!(huge.status.code(), Some(1));
    let text = String::from_utf8_lossy(&huge.stdout);
    assert!(
        text.contains("[FAIL] nofile") && text.contains("LimitNOFILE=1000001024"),
        "{text}"
    );
    assert!(text.contains("not ready"), "{text}");
}

#[tokio::test]
async fn dev_mode_runs_out_of_the_box() {
    let s = Server::start_raw(&["serve", "--listen", "127.0.0.1:0", "--shards", "1"], &[]);
    assert!(s.log().contains("DEVELOPMENT MODE"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_corecast"))
        .args(["token", "--user", "newcomer"])
        .output()
        .unwrap();
    let t = String::from_utf8(out.stdout).unwrap();
    let mut ws = ws_connect(&s.url(&format!("/ws?token={}", t.trim())), None).await;
    assert_eq!(
        recv_event(&mut ws, "ready").await["d"]["userId"],
        "newcomer"
    );
    let (status, body) = http_get(s.addr, "/health");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
}

/// With `--write-delay-ms`, frames that reach a connection within the delay
/// leave in one send: `/metrics` counts far fewer writes than frames, where
/// without the delay each spaced-out message is a send of its own. Nothing
/// is lost or reordered.
async fn write_delay_coalesces_sends(driver: &str) {
    async fn run(driver: &str, delay: &str) -> (u64, u64) {
        let s = Server::start(&[
            "--shards",
            "1",
            "--io-driver",
            driver,
            "--write-delay-ms",
            delay,
        ]);
        let (mut member, _) = ws_user(&s, "member").await;
        let (mut publisher, _) = ws_user(&s, "publisher").await;
        join(&mut member, "feed", 1).await;
        join(&mut publisher, "feed", 1).await;
        recv_event(&mut member, "channel:member_joined").await;
        let (writes, frames) = (
            s.metric("corecast_writes_total"),
            s.metric("corecast_frames_out_total"),
        );
        const N: usize = 10;
        for i in 0..N {
            send(
                &mut publisher,
                json!({"t": "message:send", "d": {"channelId": "feed", "content": format!("m{i}")}}),
            )
            .await;
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        for ws in [&mut member, &mut publisher] {
            for i in 0..N {
                let m = recv_event(ws, "message:new").await;
                assert_eq!(m["d"]["content"], format!("m{i}"), "in order, none lost");
            }
        }
        (
            s.metric("corecast_writes_total") - writes,
            s.metric("corecast_frames_out_total") - frames,
        )
    }
    // 2 x 10 messages over about 100 ms: with a 400 ms delay each
    // connection's ten frames share one send.
    let (writes, frames) = run(driver, "400").await;
    assert!(frames >= 20, "{frames} frames");
    assert!(
        writes <= 6,
        "{writes} writes for {frames} frames with the delay"
    );
    let (writes, frames) = run(driver, "0").await;
    assert!(
        writes * 2 >= frames,
        "{writes} writes for {frames} frames without the delay"
    );
}

#[tokio::test]
async fn write_delay_coalesces_sends_io_uring() {
    write_delay_coalesces_sends("io_uring").await;
}

#[tokio::test]
async fn write_delay_coalesces_sends_epoll() {
    write_delay_coalesces_sends("epoll").await;
}

/// After a join storm (thousands of member events in a sweep or two) the
/// shard gives the memory it freed back to the system on its first few
/// quiet sweeps, and then stops: an idle shard does not keep asking.
#[tokio::test]
async fn a_join_storm_is_followed_by_memory_given_back_a_few_times() {
    let s = Server::start_raw(
        &one_shard_args(&[]),
        &[
            ("CORECAST_MAX_CONNECTIONS_PER_IP", "0"),
            ("CORECAST_MAX_HANDSHAKES_PER_IP", "0"),
        ],
    );
    assert_eq!(s.metric("corecast_memory_returns_total"), 0, "no burst yet");
    // 100 members: 4,950 member events while the room fills.
    let mut members = Vec::new();
    for i in 0..100 {
        let (mut ws, _) = ws_user(&s, &format!("member-{i}")).await;
        let ack = join(&mut ws, "storm", 1).await;
        assert_eq!(ack["d"]["members"], i + 1);
        members.push(ws);
    }
    assert!(s.metric("corecast_frames_out_total") >= 4_950);
    let mut returns = 0;
    for _ in 0..150 {
        returns = s.metric("corecast_memory_returns_total");
        if returns > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(returns > 0, "no memory given back after the storm");
    // A few quiet sweeps give back (four after a burst), then none.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let settled = s.metric("corecast_memory_returns_total");
    assert!((1..=8).contains(&settled), "{settled} returns");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        s.metric("corecast_memory_returns_total"),
        settled,
        "an idle shard keeps giving memory back"
    );
    // The members are all still there.
    let mut last = members.pop().unwrap();
    send(
        &mut last,
        json!({"t": "channel:get_members", "id": 2, "d": {"channelId": "storm"}}),
    )
    .await;
    let got = recv_event(&mut last, "ack").await;
    assert_eq!(
        got["d"]["members"].as_array().map(Vec::len),
        Some(100),
        "{got}"
    );
}
