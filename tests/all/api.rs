//! The server API over real sockets: its key, each endpoint's effect on
//! connected clients, and its errors.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};

const KEY: &str = "api-key-for-the-tests-0123";

fn server() -> Server {
    server_with(&[])
}

/// Two shards and the server API, with `extra` flags.
fn server_with(extra: &[&str]) -> Server {
    let mut args = vec![
        "--shards",
        "2",
        "--api-listen",
        "127.0.0.1:0",
        "--api-key",
        KEY,
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// One request on its own connection: status, headers, JSON body.
fn call(
    api: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, String, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: api\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    raw_call(api, req.as_bytes())
}

fn raw_call(api: SocketAddr, req: &[u8]) -> (u16, String, Value) {
    let mut s = TcpStream::connect(api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(req).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    parse_response(&out)
}

fn parse_response(out: &str) -> (u16, String, Value) {
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((out, ""));
    let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let value = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, head.to_string(), value)
}

fn ok(api: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Value {
    let (status, _, v) = call(api, method, path, Some(KEY), body);
    assert_eq!(status, 200, "{method} {path}: {v}");
    v
}

#[test]
fn the_key_is_required_and_checked() {
    let s = server();
    let api = s.api_addr();
    for key in [None, Some("wrong-key-of-the-same-size!")] {
        let (status, head, v) = call(api, "GET", "/api/stats", key, None);
        assert_eq!(status, 401, "{key:?}");
        assert!(head.contains("WWW-Authenticate: Bearer"), "{head}");
        assert_eq!(v["error"]["code"], "unauthorized");
    }
    // Also as X-API-Key.
    let req = format!(
        "GET /api/stats HTTP/1.1\r\nHost: a\r\nX-API-Key: {KEY}\r\nConnection: close\r\n\r\n"
    );
    let (status, _, v) = raw_call(api, req.as_bytes());
    assert_eq!(status, 200);
    assert_eq!(v["shards"], 2);
    // Without keys the API does not run at all.
    let off = Server::start(&["--shards", "1", "--api-listen", "127.0.0.1:0"]);
    assert!(off.log().contains("server API off"), "{}", off.log());
}

#[tokio::test]
async fn publish_and_notify_reach_clients_and_are_kept() {
    let s = server();
    let api = s.api_addr();
    let mut alice = Peer::on(&s, "alice", 0, "").await;
    alice.ok("channel:join", json!({"channelId": "news"})).await;
    let a = ok(
        api,
        "POST",
        "/api/publish",
        Some(
            json!({"channelId": "news", "content": "release 2.0 is out", "userId": "bot", "nonce": "r-2"}),
        ),
    );
    assert_eq!(a["offset"], 1, "{a}");
    let m = alice.event("message:new").await;
    assert_eq!(
        (m["d"]["content"].as_str(), m["d"]["userId"].as_str()),
        (Some("release 2.0 is out"), Some("bot"))
    );
    assert_eq!(m["d"]["messageId"], a["messageId"]);
    assert!(m["d"].get("meta").is_none(), "{m}");
    // With the application's metadata: delivered and kept with it.
    let meta = json!({"release": {"version": "2.0", "notes": "https://example.com/2.0"}});
    ok(
        api,
        "POST",
        "/api/publish",
        Some(json!({"channelId": "news", "content": "notes", "userId": "bot", "meta": meta})),
    );
    let m = alice.event("message:new").await;
    assert_eq!(m["d"]["meta"], meta, "{m}");
    let h = alice
        .ok("channel:get_history", json!({"channelId": "news"}))
        .await;
    assert_eq!(h["messages"][1]["meta"], meta, "{h}");
    for (bad, code) in [
        (json!([1]), "bad_request"),
        (json!({"k": "x".repeat(4096)}), "too_large"),
    ] {
        let (status, _, body) = call(
            api,
            "POST",
            "/api/publish",
            Some(KEY),
            Some(json!({"channelId": "news", "content": "x", "meta": bad})),
        );
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some(code)),
            "{body}"
        );
    }
    // The same nonce again: answered as the first, not published twice.
    let again = ok(
        api,
        "POST",
        "/api/publish",
        Some(
            json!({"channelId": "news", "content": "release 2.0 is out", "userId": "bot", "nonce": "r-2"}),
        ),
    );
    assert_eq!(
        (again["messageId"].clone(), again["duplicate"].clone()),
        (a["messageId"].clone(), json!(true))
    );
    // Into a channel without members: kept in its history.
    ok(
        api,
        "POST",
        "/api/publish",
        Some(json!({"channelId": "archive", "content": "for later"})),
    );
    alice
        .ok("channel:join", json!({"channelId": "archive"}))
        .await;
    let h = alice
        .ok("channel:get_history", json!({"channelId": "archive"}))
        .await;
    assert_eq!(h["messages"][0]["content"], "for later");
    assert_eq!(h["messages"][0]["userId"], "server");
    // Notify: at once when online...
    let n = ok(
        api,
        "POST",
        "/api/notify",
        Some(json!({"userId": "alice", "kind": "invoice", "data": {"amount": 12}})),
    );
    let got = alice.event("notification:new").await;
    assert_eq!(got["d"]["notificationId"], n["notificationId"]);
    assert_eq!(got["d"]["data"]["amount"], 12);
    // ...and on connect when not.
    ok(
        api,
        "POST",
        "/api/notify",
        Some(json!({"userId": "bob", "kind": "welcome"})),
    );
    let mut bob = Peer::on(&s, "bob", 1, "").await;
    assert_eq!(bob.event("notification:new").await["d"]["kind"], "welcome");
    // Presence, members, stats.
    let p = ok(api, "GET", "/api/presence?userIds=bob,alice,nobody", None);
    let statuses: Vec<&str> = p["presences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["online", "online", "offline"]);
    let m = ok(api, "GET", "/api/channels/news/members", None);
    assert_eq!(m["members"][0]["userId"], "alice");
    assert_eq!(
        ok(api, "GET", "/api/channels/empty/members", None)["members"],
        json!([])
    );
    let st = ok(api, "GET", "/api/stats", None);
    assert_eq!(st["connections"], 2);
    assert!(st["messagesPublished"].as_u64().unwrap() >= 2);
}

#[tokio::test]
async fn kick_ban_and_unban_through_the_api() {
    let s = server();
    let api = s.api_addr();
    let mut bob = Peer::on(&s, "bob", 0, "").await;
    let mut troll = Peer::on(&s, "troll", 1, "").await;
    for p in [&mut bob, &mut troll] {
        p.ok("channel:join", json!({"channelId": "general"})).await;
    }
    ok(
        api,
        "POST",
        "/api/kick",
        Some(json!({"userId": "troll", "channelId": "general", "by": "support"})),
    );
    assert_eq!(troll.event("moderation:kicked").await["d"]["by"], "support");
    assert_eq!(
        bob.event("moderation:user_kicked").await["d"]["userId"],
        "troll"
    );
    // Kicking someone who is not there says so.
    let (status, _, v) = call(
        api,
        "POST",
        "/api/kick",
        Some(KEY),
        Some(json!({"userId": "ghost"})),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    ok(
        api,
        "POST",
        "/api/ban",
        Some(json!({"userId": "troll", "reason": "spam"})),
    );
    assert_eq!(
        troll.event("moderation:banned").await["d"]["reason"],
        "spam"
    );
    assert_eq!(recv_close(&mut troll.ws).await.map(u16::from), Some(4004));
    let (head, _) = http_head(
        s.addr,
        upgrade_request(&format!("/ws?token={}", token("troll", 600)), "").as_bytes(),
    );
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert_eq!(ok(api, "GET", "/api/stats", None)["bans"], 1);
    ok(api, "DELETE", "/api/ban/troll", None);
    let (head, _) = http_head(
        s.addr,
        upgrade_request(&format!("/ws?token={}", token("troll", 600)), "").as_bytes(),
    );
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // A channel ban, lifted with ?channelId=.
    ok(
        api,
        "POST",
        "/api/ban",
        Some(json!({"userId": "pest", "channelId": "general", "durationMs": 60000})),
    );
    let mut pest = Peer::on(&s, "pest", 0, "").await;
    assert_eq!(
        pest.refused("channel:join", json!({"channelId": "general"}))
            .await,
        "forbidden"
    );
    ok(api, "DELETE", "/api/ban/pest?channelId=general", None);
    pest.ok("channel:join", json!({"channelId": "general"}))
        .await;
}

#[test]
fn bad_requests_get_json_errors_and_the_connection_is_kept_alive() {
    let s = server();
    let api = s.api_addr();
    let cases: Vec<(&str, &str, Option<Value>, u16, &str)> = vec![
        (
            "POST",
            "/api/publish",
            Some(json!({"channelId": "c"})),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/api/publish",
            Some(json!({"channelId": "c", "content": "x", "extra": 1})),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/api/publish",
            Some(json!({"channelId": "has space", "content": "x"})),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/api/publish",
            Some(json!({"channelId": "c", "content": "x".repeat(4001)})),
            400,
            "too_large",
        ),
        (
            "POST",
            "/api/notify",
            Some(json!({"userId": "", "kind": "x"})),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/api/ban",
            Some(json!({"userId": "u", "durationMs": 0})),
            400,
            "bad_request",
        ),
        ("GET", "/api/presence", None, 400, "bad_request"),
        ("GET", "/api/nothing", None, 404, "not_found"),
        ("GET", "/api/publish", None, 405, "bad_request"),
    ];
    for (method, path, body, status, code) in cases {
        let (got, _, v) = call(api, method, path, Some(KEY), body.clone());
        assert_eq!(
            (got, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{method} {path} {body:?}: {v}"
        );
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    // Not JSON at all.
    let req = format!("POST /api/publish HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{{nope");
    assert_eq!(raw_call(api, req.as_bytes()).0, 400);
    // Too large a body, and a chunked one, are refused before reading it.
    let req = format!("POST /api/publish HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 999999\r\n\r\n");
    assert_eq!(raw_call(api, req.as_bytes()).0, 413, "a body past 64 KiB");
    let req = format!("POST /api/publish HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    assert_eq!(raw_call(api, req.as_bytes()).0, 411);
    // Two requests on one connection.
    let mut c = TcpStream::connect(api).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let one = format!("GET /api/stats HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {KEY}\r\n\r\n");
    let mut text = String::new();
    for _ in 0..2 {
        c.write_all(one.as_bytes()).unwrap();
        let mut buf = [0u8; 4096];
        let n = c.read(&mut buf).unwrap();
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
}

#[tokio::test]
async fn the_applications_own_events_pass_through_and_are_emitted() {
    let s = server_with(&["--custom-events", "game:*,cursor:move"]);
    let api = s.api_addr();
    let mut alice = Peer::on(&s, "alice", 0, "").await;
    let mut bob = Peer::on(&s, "bob", 1, "").await;
    for p in [&mut alice, &mut bob] {
        p.ok("channel:join", json!({"channelId": "table-1"})).await;
    }
    // A client's event, to every member (the sender included), not kept.
    let d = json!({"channelId": "table-1", "data": {"from": "e2", "to": "e4"}});
    assert_eq!(alice.ok("game:move", d).await, json!({}));
    for p in [&mut alice, &mut bob] {
        let got = p.event("game:move").await;
        assert_eq!(got["d"]["userId"], "alice", "{got}");
        assert_eq!(got["d"]["channelId"], "table-1", "{got}");
        assert_eq!(got["d"]["data"]["to"], "e4", "{got}");
    }
    let h = bob
        .ok("channel:get_history", json!({"channelId": "table-1"}))
        .await;
    assert_eq!(h["messages"], json!([]), "ephemeral: {h}");
    // A name the patterns do not allow.
    let d = json!({"channelId": "table-1", "data": 1});
    assert_eq!(bob.refused("chess:move", d).await, "unsupported");
    // The server API: to a channel, and to a user's devices.
    let body = json!({"event": "game:over", "channelId": "table-1", "data": {"winner": "bob"}});
    assert_eq!(
        ok(api, "POST", "/api/emit", Some(body)),
        json!({"ok": true})
    );
    for p in [&mut alice, &mut bob] {
        let got = p.event("game:over").await;
        assert_eq!(got["d"]["data"]["winner"], "bob", "{got}");
        assert!(got["d"].get("userId").is_none(), "{got}");
    }
    let body = json!({"event": "invite:new", "userId": "bob", "data": {"table": "table-2"}});
    ok(api, "POST", "/api/emit", Some(body));
    let got = bob.event("invite:new").await;
    assert_eq!(got["d"], json!({"data": {"table": "table-2"}}));
    // Its refusals.
    for (body, want) in [
        (
            json!({"event": "message:new", "channelId": "x"}),
            "bad_request",
        ),
        (json!({"event": "a b", "userId": "bob"}), "bad_request"),
        (json!({"event": "x:y"}), "bad_request"),
        (
            json!({"event": "x:y", "channelId": "x", "userId": null}),
            "bad_request",
        ),
        (
            json!({"event": "x:y", "userId": "bob", "channelId": "x"}),
            "bad_request",
        ),
        (
            json!({"event": "x:y", "userId": "bob", "data": "z".repeat(40_000)}),
            "too_large",
        ),
    ] {
        let (status, _, v) = call(api, "POST", "/api/emit", Some(KEY), Some(body));
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some(want)),
            "{v}"
        );
    }
}
