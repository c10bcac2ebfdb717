//! Server-side subscriptions end to end, in a cluster: the backend joins
//! every connection of a user (on both nodes) to a channel its token does
//! not grant, through either node's server API, and takes them out again.

use crate::common::redis::two_nodes_with;
use crate::common::*;
use serde_json::json;

const KEY: &str = "subscribe-test-api-key-0123";

#[tokio::test]
async fn the_backend_subscribes_a_users_connections_on_every_node() {
    let (_redis, a, b) = two_nodes_with(|r| {
        Server::start(&[
            "--shards",
            "2",
            "--redis",
            &r.url(),
            "--api-listen",
            "127.0.0.1:0",
            "--api-key",
            KEY,
        ])
    });
    // Alice's token grants the lobby only.
    let claims = corecast::auth::Claims {
        sub: "alice".into(),
        exp: exp_in(600),
        channels: Some(vec!["lobby".into()]),
        ..Default::default()
    };
    let t = token_with(&claims);
    let mut on_a = Peer::with_token(&a, &t, 0, "").await;
    let mut on_b = Peer::with_token(&b, &t, 1, "").await;
    let mut bob = Peer::on(&b, "bob", 0, "").await;
    bob.ok("channel:join", json!({"channelId": "vip"})).await;
    assert_eq!(
        on_a.refused("channel:join", json!({"channelId": "vip"}))
            .await,
        "forbidden"
    );
    let body = json!({"userId": "alice", "channelId": "vip"});
    let (status, answer) = api_call(
        a.api_addr(),
        "POST",
        "/api/subscribe",
        KEY,
        Some(body.clone()),
    );
    assert_eq!((status, &answer), (200, &json!({"ok": true})));
    for p in [&mut on_a, &mut on_b] {
        let j = p.event("channel:joined").await;
        assert_eq!(j["d"]["channelId"], "vip", "{j}");
        assert!(j["d"]["epoch"].is_string(), "{j}");
    }
    bob.ok(
        "message:send",
        json!({"channelId": "vip", "content": "welcome"}),
    )
    .await;
    for p in [&mut on_a, &mut on_b] {
        let m = p.event("message:new").await;
        assert_eq!(m["d"]["content"], "welcome", "{m}");
    }
    // She may send there now.
    on_a.ok(
        "message:send",
        json!({"channelId": "vip", "content": "thanks"}),
    )
    .await;
    // Out again, through the other node.
    let (status, _) = api_call(b.api_addr(), "POST", "/api/unsubscribe", KEY, Some(body));
    assert_eq!(status, 200);
    for p in [&mut on_a, &mut on_b] {
        let l = p.event("channel:left").await;
        assert_eq!(l["d"]["channelId"], "vip", "{l}");
    }
    assert_eq!(
        on_a.refused(
            "message:send",
            json!({"channelId": "vip", "content": "still?"}),
        )
        .await,
        "forbidden"
    );
    // Bad input is refused.
    let (status, e) = api_call(
        a.api_addr(),
        "POST",
        "/api/subscribe",
        KEY,
        Some(json!({"userId": "alice"})),
    );
    assert_eq!(status, 400, "{e}");
}
