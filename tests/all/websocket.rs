//! RFC 6455 over real sockets: handshake refusals, control frames,
//! fragmentation, close codes, limits, keep-alive and deadlines.

use std::time::Duration;

use crate::common::*;
use corecast::ws::OpCode;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

#[test]
fn handshake_refusals_have_status_and_reason() {
    let s = Server::start(&[
        "--shards",
        "1",
        "--allowed-origins",
        "https://ok.example",
        "--max-header-bytes",
        "2048",
    ]);
    let origin = "Origin: https://ok.example\r\n";
    let cases: Vec<(String, &str, &str)> = vec![
        (
            upgrade_request("/ws", origin).replace("Version: 13", "Version: 8"),
            "426",
            "unsupported_version",
        ),
        (
            upgrade_request("/ws", origin)
                .replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
            "400",
            "missing_key",
        ),
        (
            upgrade_request("/ws", origin).replace("dGhlIHNhbXBsZSBub25jZQ==", "bm9wZQ=="),
            "400",
            "bad_key",
        ),
        (
            upgrade_request("/ws", origin).replace("Connection: Upgrade", "Connection: keep-alive"),
            "400",
            "bad_connection_header",
        ),
        (
            upgrade_request("/ws", origin).replace("GET", "POST"),
            "400",
            "bad_method",
        ),
        (
            upgrade_request("/ws", "Origin: https://evil.example\r\n"),
            "403",
            "origin_not_allowed",
        ),
        (
            upgrade_request("/ws", &format!("{origin}X-Big: {}\r\n", "a".repeat(4000))),
            "431",
            "header_too_large",
        ),
        (
            upgrade_request("/ws", &format!("{origin}Sec-WebSocket-Protocol: mqtt\r\n")),
            "400",
            "unsupported_subprotocol",
        ),
        (upgrade_request("/nowhere", origin), "404", "not_found"),
        ("NONSENSE\r\n\r\n".to_string(), "400", "malformed_request"),
    ];
    for (req, status, reason) in cases {
        let resp = http_raw(s.addr, req.as_bytes());
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {status} ")),
            "{reason}: {resp}"
        );
        assert!(resp.ends_with(reason), "{reason}: {resp}");
        if status == "426" {
            assert!(resp.contains("Sec-WebSocket-Version: 13\r\n"), "{resp}");
        }
    }
    let m = s.metrics();
    assert!(
        m.contains("corecast_handshake_failures_total{reason=\"unsupported_version\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("corecast_handshake_failures_total{reason=\"origin_not_allowed\"} 1"),
        "{m}"
    );
    // HEAD gets the headers without a body; other methods get 405.
    let head = http_raw(s.addr, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        head.starts_with("HTTP/1.1 200 ")
            && head.contains("Content-Length: 3\r\n")
            && head.ends_with("\r\n\r\n"),
        "{head}"
    );
    let post = http_raw(
        s.addr,
        b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    // The refusals did not disturb the server.
    let mut ok = Raw::connect(
        s.addr,
        "/ws",
        &format!("{origin}Authorization: Bearer {}\r\n", token("u", 600)),
    );
    assert_eq!(ok.recv_json()["t"], "ready");
}

#[test]
fn fragmented_text_with_interleaved_ping_is_reassembled() {
    let s = Server::start(&["--shards", "1", "--echo-endpoint"]);
    let mut c = Raw::connect(s.addr, "/echo", "");
    c.send(false, OpCode::Text, "héllo ".as_bytes());
    c.send(true, OpCode::Ping, b"are you there");
    c.send(false, OpCode::Continuation, &"wörld".as_bytes()[..2]);
    c.send(true, OpCode::Continuation, &"wörld".as_bytes()[2..]);
    let pong = c.recv().unwrap();
    assert_eq!(
        (pong.opcode, pong.payload.as_slice()),
        (OpCode::Pong, &b"are you there"[..])
    );
    let text = c.recv().unwrap();
    assert_eq!(text.opcode, OpCode::Text);
    assert!(text.fin);
    assert_eq!(String::from_utf8(text.payload).unwrap(), "héllo wörld");
}

#[test]
fn protocol_violations_get_their_close_codes() {
    let s = Server::start(&[
        "--shards",
        "1",
        "--echo-endpoint",
        "--max-message-size",
        "1000",
    ]);
    type Act = Box<dyn Fn(&mut Raw)>;
    let cases: Vec<(Act, u16)> = vec![
        (
            Box::new(|c| c.send(true, OpCode::Text, &[0xC3, 0x28])),
            1007,
        ),
        (
            Box::new(|c| {
                c.send(false, OpCode::Text, b"ok");
                c.send(true, OpCode::Continuation, &[0xFF])
            }),
            1007,
        ),
        (
            Box::new(|c| c.send(true, OpCode::Binary, &[0u8; 1001])),
            1009,
        ),
        (Box::new(|c| c.send(true, OpCode::Continuation, b"x")), 1002),
        (Box::new(|c| c.send_bytes(&[0x83, 0x80, 0, 0, 0, 0])), 1002),
        (Box::new(|c| c.send_bytes(&[0x81, 0x01, b'x'])), 1002),
        (Box::new(|c| c.send_bytes(&[0xC1, 0x80, 0, 0, 0, 0])), 1002),
        (
            Box::new(|c| c.send(true, OpCode::Close, &1005u16.to_be_bytes())),
            1002,
        ),
        (Box::new(|c| c.send(true, OpCode::Ping, &[0u8; 126])), 1002),
    ];
    for (i, (act, code)) in cases.into_iter().enumerate() {
        let mut c = Raw::connect(s.addr, "/echo", "");
        act(&mut c);
        assert_eq!(c.recv_close(), Some(code), "case {i}");
        assert!(c.is_eof(), "case {i}: the server closes the TCP connection");
    }
    assert!(s.metric("corecast_protocol_errors_total") >= 9);
}

#[test]
fn close_handshake_echoes_the_code() {
    let s = Server::start(&["--shards", "1", "--echo-endpoint"]);
    let mut c = Raw::connect(s.addr, "/echo", "");
    c.send(
        true,
        OpCode::Close,
        &corecast::ws::close::payload(4321, "done"),
    );
    assert_eq!(c.recv_close(), Some(4321));
    assert!(c.is_eof());
}

#[test]
fn quiet_connections_are_pinged_and_dead_ones_closed() {
    let s = Server::start(&[
        "--shards",
        "1",
        "--echo-endpoint",
        "--ping-interval-ms",
        "200",
        "--ping-timeout-ms",
        "300",
    ]);
    // A connection that answers pings stays open.
    let mut alive = Raw::connect(s.addr, "/echo", "");
    let mut dead = Raw::connect(s.addr, "/echo", "");
    let ping = alive.recv().unwrap();
    assert_eq!(ping.opcode, OpCode::Ping);
    alive.send(true, OpCode::Pong, &ping.payload);
    // The silent one gets a ping, then a close.
    assert_eq!(dead.recv().unwrap().opcode, OpCode::Ping);
    assert_eq!(dead.recv_close(), Some(1008));
    assert!(s.metric("corecast_keepalive_closes_total") >= 1);
    alive.send(true, OpCode::Text, b"still here");
    loop {
        let f = alive.recv().unwrap();
        match f.opcode {
            OpCode::Ping => alive.send(true, OpCode::Pong, &f.payload),
            OpCode::Text => {
                assert_eq!(f.payload, b"still here");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn slow_handshakes_are_cut_off() {
    let s = Server::start(&["--shards", "1", "--handshake-timeout-ms", "300"]);
    let mut c = std::net::TcpStream::connect(s.addr).unwrap();
    use std::io::{Read, Write};
    c.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 16];
    let n = c.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0, "closed without a response");
    assert_eq!(s.metric("corecast_handshake_timeouts_total"), 1);
}

#[tokio::test]
async fn echo_through_an_independent_client() {
    let s = Server::start(&["--shards", "2", "--echo-endpoint"]);
    let mut ws = ws_connect(&s.url("/echo"), None).await;
    for size in [0usize, 125, 126, 65535, 65536, 300_000] {
        let text: String = "x".repeat(size);
        ws.send(Message::Text(text.clone().into())).await.unwrap();
        let m = ws.next().await.unwrap().unwrap();
        assert_eq!(m, Message::Text(text.into()), "size {size}");
    }
    ws.send(Message::Binary(vec![1u8, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Binary(vec![1u8, 2, 3].into())
    );
    ws.send(Message::Ping(b"p".to_vec().into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Pong(b"p".to_vec().into())
    );
    let bye = tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    };
    ws.close(Some(bye)).await.unwrap();
    assert_eq!(recv_close(&mut ws).await, Some(CloseCode::Normal));
}

#[test]
fn port_already_served_is_refused() {
    let s = Server::start(&["--shards", "1"]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_corecast"))
        .args(["serve", "--listen", &s.addr.to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another server"), "{err}");
}

/// The receive ring offers 64 buffers while traffic is light, and more
/// once a round drains it: eight clients each sending 300 KB at once (about
/// 1,200 buffers' worth) get every byte echoed back, in order.
#[tokio::test]
async fn the_receive_ring_grows_under_a_burst_and_loses_nothing() {
    let s = Server::start(&["--shards", "1", "--echo-endpoint"]);
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(ws_connect(&s.url("/echo"), None).await);
    }
    assert_eq!(s.metric("corecast_receive_buffers"), 64);
    let texts: Vec<String> = (0..8u8)
        .map(|i| {
            (0..300_000)
                .map(|k| (b'a' + (i + (k / 2048) as u8) % 26) as char)
                .collect()
        })
        .collect();
    for (ws, text) in clients.iter_mut().zip(&texts) {
        ws.send(Message::Text(text.clone().into())).await.unwrap();
    }
    for (ws, text) in clients.iter_mut().zip(&texts) {
        let m = ws.next().await.unwrap().unwrap();
        assert!(m == Message::Text(text.clone().into()), "an echo differs");
    }
    let grown = s.metric("corecast_receive_buffers");
    assert!((128..=1024).contains(&grown), "{grown} buffers");
}
