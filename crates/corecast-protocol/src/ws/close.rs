//! Close codes (RFC 6455 §7.4) and close payloads.

use bytes::Bytes;

pub const NORMAL: u16 = 1000;
/// Server shutting down or restarting: the client should reconnect.
pub const GOING_AWAY: u16 = 1001;
pub const PROTOCOL_ERROR: u16 = 1002;
pub const UNSUPPORTED_DATA: u16 = 1003;
pub const INVALID_PAYLOAD: u16 = 1007;
pub const POLICY_VIOLATION: u16 = 1008;
pub const MESSAGE_TOO_BIG: u16 = 1009;
pub const INTERNAL_ERROR: u16 = 1011;
/// Try again later: used for consumers too slow for their outbound bound.
pub const TRY_AGAIN_LATER: u16 = 1013;
/// Application range: authentication failed or did not arrive in time.
pub const UNAUTHORIZED: u16 = 4001;
/// The connection's token expired and no `auth:refresh` came in time: the
/// client reconnects with a new token (and may resume its session).
pub const TOKEN_EXPIRED: u16 = 4002;
/// A moderator (or the server API) kicked the user off the server.
pub const KICKED: u16 = 4003;
/// The user is banned from the server.
pub const BANNED: u16 = 4004;
/// Too many: upgrades per second from the address, connections from the
/// address, or connections of the user (an upgrade refused in a form a
/// browser can read; the reason names which).
pub const TOO_MANY: u16 = 4029;

/// Whether `code` may be sent in a close frame (RFC 6455 §7.4.1-2).
pub fn is_valid_wire_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Builds a close payload: the code in network order then the reason, cut to
/// fit the 125-byte control frame limit on a character boundary.
pub fn payload(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = Vec::with_capacity(2 + end);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&reason.as_bytes()[..end]);
    Bytes::from(out)
}

/// Reads a received close payload: the code, when there is one, and the
/// reason (lossily decoded; for reports, not validation).
pub fn parse(payload: &[u8]) -> (Option<u16>, String) {
    let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).into_owned();
    (code, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_payload_builds() {
        assert_eq!(parse(&payload(1013, "slow")), (Some(1013), "slow".into()));
        assert_eq!(parse(b""), (None, String::new()));
    }

    #[test]
    fn wire_codes() {
        for ok in [1000, 1001, 1002, 1003, 1007, 1011, 1013, 3000, 4999] {
            assert!(is_valid_wire_code(ok), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000] {
            assert!(!is_valid_wire_code(bad), "{bad}");
        }
    }

    #[test]
    fn payload_is_bounded_and_utf8() {
        let long = "é".repeat(100);
        let p = payload(1000, &long);
        assert!(p.len() <= 125);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
        assert_eq!(&p[..2], &1000u16.to_be_bytes());
    }
}
