//! Token lifetime over real sockets: `auth:expiring` ahead of a token's
//! expiry, `auth:refresh` keeping the connection (with the new token's
//! roles), and the close (4002) of a connection that did not refresh; the
//! session of a connection closed so can be resumed with a new token.

use crate::common::*;
use serde_json::json;

#[tokio::test]
async fn a_refreshed_token_keeps_its_connection_and_an_expired_one_is_closed() {
    // Warned 2 s ahead; closed at the expiry.
    let s = Server::start(&[
        "--shards",
        "2",
        "--token-refresh-ahead-ms",
        "2000",
        "--token-expiry-grace-ms",
        "0",
    ]);
    let exp = exp_in(3);
    let short = |user: &str| token_with(&corecast::auth::Claims::new(user, exp).channels(["*"]));
    let mut alice = Peer::with_token(&s, &short("alice"), 0, "").await;
    let mut bob = Peer::with_token(&s, &short("bob"), 1, "").await;
    for p in [&mut alice, &mut bob] {
        p.ok("channel:join", json!({"channelId": "room"})).await;
    }
    let kick = json!({"userId": "carol", "channelId": "room"});
    let before = alice.request("moderation:kick_user", kick.clone()).await;
    assert_eq!(before["d"]["code"], "forbidden", "{before}");
    let expiring = alice.event("auth:expiring").await;
    assert_eq!(expiring["d"]["expiresAt"], exp * 1000, "{expiring}");
    bob.event("auth:expiring").await;

    // Another user's token, or none that verifies, is refused; the
    // connection goes on.
    let theirs = token_with(&corecast::auth::Claims::new("mallory", exp_in(60)));
    assert_eq!(
        alice
            .refused("auth:refresh", json!({"token": theirs}))
            .await,
        "forbidden"
    );
    assert_eq!(
        alice
            .refused("auth:refresh", json!({"token": "x.y.z"}))
            .await,
        "unauthorized"
    );
    let later = exp_in(60);
    let fresh = token_with(
        &corecast::auth::Claims::new("alice", later)
            .channels(["*"])
            .roles(["moderator"]),
    );
    let ack = alice.ok("auth:refresh", json!({"token": fresh})).await;
    assert_eq!(ack["expiresAt"], later * 1000, "{ack}");

    // Bob did not refresh: closed at the expiry, with its reason.
    let session = bob.session();
    assert_eq!(recv_close(&mut bob.ws).await.map(u16::from), Some(4002));
    // Alice is still there, and moderates now (the new token's role).
    let after = alice.request("moderation:kick_user", kick).await;
    assert_ne!(after["d"]["code"], "forbidden", "{after}");
    assert_eq!(s.metric("corecast_token_expiries_total"), 1);

    // Bob comes back with a new token and resumes his session.
    let mut bob2 = Peer::on(&s, "bob", 0, "").await;
    let resumed = bob2
        .ok("session:resume", json!({"sessionId": session}))
        .await;
    assert_eq!(resumed["channels"][0]["channelId"], "room", "{resumed}");
}
