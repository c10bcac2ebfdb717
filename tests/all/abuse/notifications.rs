//! A mention is a message to a user and obeys the same grants; a stored
//! mention holds a reference and an excerpt, and stored notifications are
//! bounded per sender.

use corecast::auth::Claims;
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn a_mention_reaches_only_granted_users_and_keeps_an_excerpt() {
    let s = Server::start(&["--shards", "2", "--max-notifications-per-sender", "4"]);
    let only_bob = token_with(
        &Claims::new("alice", exp_in(600))
            .channels(["*"])
            .users(["bob"]),
    );
    let mut alice = Peer::with_token(&s, &only_bob, 0, "").await;
    alice
        .ok("channel:join", json!({"channelId": "general"}))
        .await;
    let long = "z".repeat(4000);
    // Carol is not granted: as for a direct message, `forbidden`.
    let code = alice
        .refused("dm:send", json!({"toUserId": "carol", "content": "hi"}))
        .await;
    assert_eq!(code, "forbidden");
    let code = alice
        .refused(
            "message:send",
            json!({"channelId": "general", "content": long, "mentions": ["carol"]}),
        )
        .await;
    assert_eq!(code, "forbidden");
    // Bob is, and is away: his notification holds a reference and an
    // excerpt, not the 4,000 characters.
    alice
        .ok(
            "message:send",
            json!({"channelId": "general", "content": long, "mentions": ["bob"]}),
        )
        .await;
    let mut carol = Peer::on(&s, "carol", 1, "").await;
    let pending = carol.ok("notification:get_pending", json!({})).await;
    assert_eq!(pending["notifications"].as_array().unwrap().len(), 0);
    let mut bob = Peer::on(&s, "bob", 1, "").await;
    let n = bob.event("notification:new").await;
    let data = &n["d"]["data"];
    assert_eq!(data["fromUserId"], "alice");
    assert_eq!(data["channelId"], "general");
    assert_eq!(data["excerpt"].as_str().unwrap().chars().count(), 101);
    assert!(data.get("content").is_none(), "{n}");
}

#[tokio::test]
async fn one_sender_keeps_a_bounded_number_of_notifications_waiting() {
    // Two shards: each home shard takes half of the sender's 4.
    let s = Server::start(&["--shards", "2", "--max-notifications-per-sender", "4"]);
    let mut alice = Peer::on(&s, "alice", 0, "").await;
    alice
        .ok("channel:join", json!({"channelId": "general"}))
        .await;
    let away: Vec<String> = (0..60).map(|i| format!("away-{i}")).collect();
    alice
        .ok(
            "message:send",
            json!({"channelId": "general", "content": "hi all", "mentions": &away[..50]}),
        )
        .await;
    // Ask after a barrier through both homes: a presence query of them.
    alice
        .ok("presence:get_bulk", json!({"userIds": &away[..50]}))
        .await;
    assert_eq!(s.metric("corecast_notifications_stored"), 4);
    assert_eq!(s.metric("corecast_notifications_dropped_total"), 46);
}
