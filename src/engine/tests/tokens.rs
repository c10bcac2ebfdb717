//! Token lifetime: `auth:expiring` ahead of the expiry, `auth:refresh`
//! moving it, and the close of a connection that did not refresh.

use super::*;

fn expiring_at(msgs: &[ServerMessage]) -> Vec<u64> {
    picked(msgs, |e| match e {
        ServerEvent::AuthExpiring(x) => Some(x.expires_at),
        _ => None,
    })
}

fn refresh(token: &str) -> ClientEvent {
    ClientEvent::AuthRefresh(Auth {
        token: token.into(),
    })
}

/// A token expiring at `expires` (s).
fn expiring(expires: u32) -> Access {
    Access {
        expires,
        ..Access::default()
    }
}

#[test]
fn a_token_is_warned_of_refreshed_or_closed_at_its_expiry() {
    let settings = Settings {
        token_refresh_ahead_ms: 60_000,
        token_expiry_grace_ms: 5_000,
        ..unlimited()
    };
    let mut sim = Sim::with(2, settings);
    let (a, ra) = sim.connect_as(0, "alice", expiring(200));
    let (b, rb) = sim.connect_as(1, "bob", expiring(200));
    let (_, rn) = sim.connect(0, "nora", Protocol::Json);
    ra.take();
    rb.take();
    rn.take();
    // 139 s: not yet.
    sim.advance(138_000);
    assert!(expiring_at(&ra.take()).is_empty());
    // 140 s: a minute before the expiry.
    sim.advance(1_000);
    assert_eq!(expiring_at(&ra.take()), [200_000]);
    assert_eq!(expiring_at(&rb.take()), [200_000]);
    // Alice refreshes; Bob tries another user's token, then nothing.
    sim.send(a, Some(1), refresh("tok:alice:400:moderator"));
    match ack_body(&ra.take(), 1) {
        AckBody::Refresh(r) => assert_eq!(r.expires_at, 400_000),
        other => panic!("{other:?}"),
    }
    assert!(sim.shards[0].conn(a.conn).unwrap().roles.moderates());
    sim.send(b, Some(2), refresh("tok:mallory:400"));
    assert_eq!(error_code(&rb.take(), 2), ErrorCode::Forbidden);
    sim.send(b, Some(3), refresh("garbage"));
    assert_eq!(error_code(&rb.take(), 3), ErrorCode::Unauthorized);
    // 205 s: Bob's grace is over; Alice's token is another one now.
    sim.advance(64_999);
    assert_eq!(rb.closed.get(), None);
    // Closes come with the once-a-second look, within a second.
    sim.advance(1_000);
    assert_eq!(rb.closed.get(), Some(crate::ws::close::TOKEN_EXPIRED));
    assert_eq!(ra.closed.get(), None);
    assert!(expiring_at(&ra.take()).is_empty());
    // Alice's new token: warned at 340 s, closed at 405 s.
    sim.advance(135_000);
    assert_eq!(expiring_at(&ra.take()), [400_000]);
    sim.advance(65_000);
    assert_eq!(ra.closed.get(), Some(crate::ws::close::TOKEN_EXPIRED));
    // Tokens without an expiry live on.
    assert_eq!(rn.closed.get(), None);
    assert!(expiring_at(&rn.take()).is_empty());
    let expired: u64 = sim
        .shards
        .iter()
        .map(|s| s.metrics.token_expiries.get())
        .sum();
    assert_eq!(expired, 2);
}

#[test]
fn a_token_already_close_to_its_expiry_is_warned_at_once() {
    let settings = Settings {
        token_refresh_ahead_ms: 60_000,
        ..unlimited()
    };
    let mut sim = Sim::with(1, settings);
    // Expires 30 s after the sim's clock (1 s).
    let (_, rc) = sim.connect_as(0, "carl", expiring(31));
    sim.advance(1_000);
    assert_eq!(expiring_at(&rc.take()), [31_000]);
    sim.advance(29_000);
    assert_eq!(rc.closed.get(), Some(crate::ws::close::TOKEN_EXPIRED));
}
