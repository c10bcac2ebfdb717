//! Every claim the configuration names is required, on both token paths
//! (the upgrade, the `auth` message) and for subscription tokens.

use corecast::ws::OpCode;
use serde_json::json;

use crate::common::*;

/// Signs any claims with the test secret.
fn sign(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[test]
fn a_token_without_a_configured_claim_is_refused_on_every_path() {
    let s = Server::start(&["--auth-issuer", "app", "--auth-audience", "chat"]);
    let exp = exp_in(600);
    let full = json!({"sub": "bob", "exp": exp, "iss": "app", "aud": "chat", "channels": ["*"]});
    let without = |claim: &str| {
        let mut c = full.clone();
        c.as_object_mut().unwrap().remove(claim);
        sign(c)
    };
    // The upgrade: refused with 401 and the reason.
    for claim in ["iss", "aud", "exp"] {
        let t = without(claim);
        let (head, _) = http_head(
            s.addr,
            upgrade_request(&format!("/ws?token={t}"), "").as_bytes(),
        );
        assert!(head.starts_with("HTTP/1.1 401"), "{claim}: {head}");
        assert!(
            head.contains("invalid token") && head.contains(claim),
            "{claim}: {head}"
        );
    }
    // The `auth` message: unauthorized, then close 4001.
    for claim in ["iss", "aud"] {
        let mut raw = Raw::connect(s.addr, "/ws", "");
        raw.json(json!({"t": "auth", "id": 1, "d": {"token": without(claim)}}));
        let answer = raw.recv_json();
        assert_eq!(answer["d"]["code"], "unauthorized", "{claim}: {answer}");
        assert_eq!(raw.recv_close(), Some(4001));
    }
    // The full token is accepted on both paths.
    let mut raw = Raw::connect(s.addr, &format!("/ws?token={}", sign(full.clone())), "");
    assert_eq!(raw.recv_json()["t"], "ready");
    // A subscription token must carry them too.
    let bare = json!({"sub": "carol", "exp": exp, "iss": "app", "aud": "chat"});
    let mut raw = Raw::connect(s.addr, "/ws", "");
    raw.json(json!({"t": "auth", "id": 1, "d": {"token": sign(bare)}}));
    assert_eq!(raw.recv_json()["t"], "ack");
    let sub = |drop: Option<&str>| {
        let mut c =
            json!({"sub": "carol", "exp": exp, "iss": "app", "aud": "chat", "channel": "vip"});
        if let Some(d) = drop {
            c.as_object_mut().unwrap().remove(d);
        }
        sign(c)
    };
    for (id, claim) in [(2, "iss"), (3, "aud")] {
        raw.json(json!({"t": "channel:join", "id": id, "d": {"channelId": "vip", "token": sub(Some(claim))}}));
        let answer = loop {
            let v = raw.recv_json();
            if v["id"] == id {
                break v;
            }
        };
        assert_eq!(answer["d"]["code"], "forbidden", "{claim}: {answer}");
    }
    raw.json(json!({"t": "channel:join", "id": 4, "d": {"channelId": "vip", "token": sub(None)}}));
    let answer = loop {
        let v = raw.recv_json();
        if v["id"] == 4 {
            break v;
        }
    };
    assert_eq!(answer["t"], "ack", "{answer}");
    raw.send(true, OpCode::Close, &[]);
}
