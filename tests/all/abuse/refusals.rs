//! Refusals a browser can read: an upgrade that carries `Origin` (as every
//! browser's does) is accepted and closed at once with a 4xxx code and the
//! reason; other clients keep the HTTP status.

use serde_json::json;

use crate::common::*;

const ORIGIN: (&str, &str) = ("Origin", "https://chat.example");
const KEY: &str = "refusals-test-key-0123456789";

#[tokio::test]
async fn a_browser_reads_why_its_upgrade_was_refused() {
    let s = Server::start(&[
        "--shards",
        "2",
        "--max-connections-per-user",
        "1",
        "--api-listen",
        "127.0.0.1:0",
        "--api-key",
        KEY,
    ]);
    // A bad token and an expired one: 4001 with the reason, nothing before.
    for (t, why) in [
        ("not-a-token".to_string(), "invalid token"),
        (token("alice", -600), "ExpiredSignature"),
    ] {
        let mut ws = ws_connect_with(&s.url(&format!("/ws?token={t}")), &[ORIGIN]).await;
        let (close, before) = close_of(&mut ws).await;
        let (code, reason) = close.expect("a close frame");
        assert_eq!(code, 4001);
        assert!(reason.contains(why), "{reason}");
        assert!(before.is_empty(), "{before:?}");
    }
    // The same without Origin: HTTP 401 (the body says why).
    let (head, _) = http_head(
        s.addr,
        upgrade_request("/ws?token=not-a-token", "").as_bytes(),
    );
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    // Banned: 4004.
    let (status, _) = api_call(
        s.api_addr(),
        "POST",
        "/api/ban",
        KEY,
        Some(json!({"userId": "troll"})),
    );
    assert_eq!(status, 200);
    let mut ws = ws_connect_with(
        &s.url(&format!("/ws?token={}", token("troll", 600))),
        &[ORIGIN],
    )
    .await;
    let (close, _) = close_of(&mut ws).await;
    assert_eq!(close.map(|c| c.0), Some(4004));
    // Past the per-user cap (1): the second is accepted, then closed with
    // 4029 before `ready`, wherever the two landed.
    let (_first, _) = ws_user(&s, "bob").await;
    let mut ws = ws_connect_with(
        &s.url(&format!("/ws?token={}", token("bob", 600))),
        &[ORIGIN],
    )
    .await;
    let (close, before) = close_of(&mut ws).await;
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 4029, "{reason}");
    assert!(before.iter().all(|m| m["t"] != "ready"), "{before:?}");
}

#[tokio::test]
async fn a_browser_reads_a_refusal_by_the_handshake_rate() {
    let s = Server::start_raw(
        &one_shard_args(&["--max-handshakes-per-ip", "3"]),
        &[("CORECAST_MAX_HANDSHAKES_PER_IP", "3")],
    );
    // Within one second, the fourth upgrade (and later) from the address
    // is refused: as 4029 `too_many_handshakes` for a browser.
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let (mut accepted, mut refused) = (Vec::new(), Vec::new());
    for i in 0..10 {
        let url = s.url(&format!("/ws?token={}", token(&format!("u{i}"), 600)));
        let mut ws = ws_connect_with(&url, &[ORIGIN]).await;
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                assert!(t.contains("\"ready\""), "{t}");
                accepted.push(ws);
            }
            Some(Ok(Message::Close(Some(c)))) => {
                assert_eq!(c.reason.as_str(), "too_many_handshakes");
                refused.push(u16::from(c.code));
            }
            other => panic!("{other:?}"),
        }
    }
    // However the attempts fell over second boundaries, at least four of
    // the ten were past the rate of three a second.
    assert!(refused.len() >= 4, "{refused:?}");
    assert!(refused.iter().all(|c| *c == 4029), "{refused:?}");
}
