//! Token lifetime: a connection lives as long as its token. Ahead of the
//! token's expiry (`token_refresh_ahead_ms`) the client is sent
//! `auth:expiring`; `auth:refresh` with a new token of the same user moves
//! the expiry and takes the new token's roles and grants; a connection
//! still on an expired token is closed (4002, `token expired`) once
//! `token_expiry_grace_ms` has passed.
//!
//! Connections due in the same second share one bucket and one timer, so a
//! connection costs an entry of 12 bytes here, not a timer of its own. An
//! entry names the expiry it was filed for: a refreshed connection's old
//! entries find another expiry and are dropped.

use std::collections::BTreeMap;

use super::*;

/// Connections to look at in a given second (since the epoch), each with
/// the token expiry (seconds) it was filed for.
#[derive(Debug, Default)]
pub struct TokenClock {
    due: BTreeMap<u64, Vec<(ConnId, u32)>>,
}

impl TokenClock {
    /// Files `id` for second `at`; true when that second had no bucket yet
    /// (it needs a timer).
    fn file(&mut self, at: u64, id: ConnId, expires: u32) -> bool {
        let bucket = self.due.entry(at).or_default();
        bucket.push((id, expires));
        bucket.len() == 1
    }

    fn take(&mut self, at: u64) -> Vec<(ConnId, u32)> {
        self.due.remove(&at).unwrap_or_default()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.due.values().map(Vec::len).sum()
    }
}

/// What is due for a connection whose token expires at `expires` (s), at
/// `now` (ms): nothing yet (look again at the returned ms), the warning
/// (then look again at the returned ms), or the close.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenDue {
    Later(u64),
    Warn(u64),
    Close,
}

pub fn token_due(expires: u32, now: u64, s: &Settings) -> TokenDue {
    let expires_ms = u64::from(expires) * 1000;
    let close_at = expires_ms.saturating_add(s.token_expiry_grace_ms);
    let warn_at = expires_ms.saturating_sub(s.token_refresh_ahead_ms);
    if now >= close_at {
        TokenDue::Close
    } else if now >= warn_at {
        TokenDue::Warn(close_at)
    } else {
        TokenDue::Later(warn_at)
    }
}

impl<O: Outbound> Engine<O> {
    /// Watches connection `id`'s token, expiring at `expires` (s; 0:
    /// never).
    pub(super) fn watch_token(&mut self, id: ConnId, expires: u32, now: u64) {
        if expires == 0 {
            return;
        }
        let at = match token_due(expires, now, &self.s) {
            TokenDue::Later(at) => at,
            // Due already (a short-lived token): at the next tick.
            _ => now,
        };
        self.file_token(id, expires, at);
    }

    fn file_token(&mut self, id: ConnId, expires: u32, at_ms: u64) {
        let second = at_ms.div_ceil(1000);
        if self.tokens.file(second, id, expires) {
            self.timers.at(second * 1000, Timer::Tokens { second });
        }
    }

    /// The connections filed for `second`: warned, closed, or dropped
    /// when their token changed since.
    pub(super) fn tokens_timer(&mut self, second: u64, now: u64, tx: &mut impl MeshTx) {
        for (id, expires) in self.tokens.take(second) {
            if self.conn(id).map(|c| c.expires) != Some(expires) {
                continue;
            }
            match token_due(expires, now, &self.s) {
                TokenDue::Later(at) => self.file_token(id, expires, at),
                TokenDue::Warn(close_at) => {
                    let msg = ServerMessage::event(ServerEvent::AuthExpiring(AuthExpiring {
                        expires_at: u64::from(expires) * 1000,
                    }));
                    self.reply(id, &msg);
                    self.file_token(id, expires, close_at);
                }
                TokenDue::Close => {
                    self.metrics.token_expiries.inc();
                    if let Some(conn) = self.conn(id) {
                        conn.out
                            .close(crate::ws::close::TOKEN_EXPIRED, "token expired");
                    }
                    // A new connection with a fresh token may resume it.
                    self.close_conn(id, None, true, now, tx);
                }
            }
        }
    }

    /// `auth:refresh`: a new token of the same user; its roles, grants and
    /// expiry replace the old ones (channels already joined stay joined).
    pub(super) fn on_auth_refresh(&mut self, id: ConnId, ack: Option<u64>, token: &str, now: u64) {
        let Some(check) = &self.token_check else {
            return self.error(
                id,
                ack,
                ErrorCode::Unauthorized,
                "tokens cannot be checked here",
            );
        };
        let identity = match check(token) {
            Ok(i) => i,
            Err(why) => return self.error(id, ack, ErrorCode::Unauthorized, why),
        };
        let Some(user) = self.conn(id).map(|c| c.member.user.clone()) else {
            return;
        };
        if identity.user.as_str() != &*user {
            return self.error(
                id,
                ack,
                ErrorCode::Forbidden,
                "the token was issued to another user",
            );
        }
        if let Some(why) = self.server_ban(&user, now) {
            return self.error(id, ack, ErrorCode::Forbidden, why);
        }
        let Access {
            roles,
            grants,
            expires,
        } = identity.access;
        let grants = grants.map(|g| self.intern(g));
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        conn.roles = roles;
        conn.expires = expires;
        match (grants, conn.links.as_mut()) {
            (g, Some(links)) => links.grants = g,
            (Some(g), None) => {
                conn.links = Some(Box::new(Links {
                    grants: Some(g),
                    ..Links::default()
                }))
            }
            (None, None) => {}
        }
        self.watch_token(id, expires, now);
        let body = AckBody::Refresh(RefreshAck {
            expires_at: u64::from(expires) * 1000,
        });
        self.reply(id, &ack_of(ack, body));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_warned_of_then_closed() {
        let s = Settings {
            token_refresh_ahead_ms: 60_000,
            token_expiry_grace_ms: 5_000,
            ..Settings::default()
        };
        let exp = 1_000; // s
        assert_eq!(token_due(exp, 900_000, &s), TokenDue::Later(940_000));
        assert_eq!(token_due(exp, 940_000, &s), TokenDue::Warn(1_005_000));
        assert_eq!(token_due(exp, 1_004_999, &s), TokenDue::Warn(1_005_000));
        assert_eq!(token_due(exp, 1_005_000, &s), TokenDue::Close);
    }

    #[test]
    fn one_bucket_per_second() {
        let mut c = TokenClock::default();
        let id = |slot| ConnId { slot, gen: 0 };
        assert!(c.file(5, id(1), 9));
        assert!(!c.file(5, id(2), 9));
        assert!(c.file(6, id(3), 9));
        assert_eq!(c.len(), 3);
        assert_eq!(c.take(5), [(id(1), 9), (id(2), 9)]);
        assert!(c.take(5).is_empty());
        assert_eq!(c.len(), 1);
    }
}
