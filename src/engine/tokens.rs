//! Token lifetime: a connection lives as long as its token. Ahead of the
//! token's expiry (`token_refresh_ahead_ms`) the client is sent
//! `auth:expiring`; `auth:refresh` with a new token of the same user moves
//! the expiry and takes the new token's roles and grants; a connection
//! still on an expired token is closed (4002, `token expired`) once
//! `token_expiry_grace_ms` has passed.
//!
//! The expiry is a field of the connection (in its slot's padding), and
//! the shard looks at its connections once a second while any has one:
//! no entry per connection anywhere else. Warnings and closes come within
//! a second of their time.

use super::*;

/// How often the shard looks at its connections' tokens.
pub const TOKEN_SCAN_MS: u64 = 1_000;

/// What is due for a connection whose token expires at `expires` (s), at
/// `now` (ms): nothing yet, the warning, or the close.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenDue {
    Later,
    Warn,
    Close,
}

pub fn token_due(expires: u32, now: u64, s: &Settings) -> TokenDue {
    let expires_ms = u64::from(expires) * 1000;
    if now >= expires_ms.saturating_add(s.token_expiry_grace_ms) {
        TokenDue::Close
    } else if now >= expires_ms.saturating_sub(s.token_refresh_ahead_ms) {
        TokenDue::Warn
    } else {
        TokenDue::Later
    }
}

impl<O: Outbound> Engine<O> {
    /// A connection with a token that expires (`expires` s; 0: never): the
    /// scan runs while there is one.
    pub(super) fn watch_token(&mut self, expires: u32, now: u64) {
        if expires != 0 && !self.token_scan {
            self.token_scan = true;
            self.timers.at(now, Timer::Tokens);
        }
    }

    /// Warns the connections whose tokens expire soon, once, and closes
    /// those whose tokens expired; looks again in a second while any
    /// connection has an expiry.
    pub(super) fn tokens_timer(&mut self, now: u64, tx: &mut impl MeshTx) {
        let mut warn = Vec::new();
        let mut close = Vec::new();
        let mut any = false;
        for (slot, s) in self.slots.iter_mut().enumerate() {
            let gen = s.gen;
            let Some(c) = s.conn.as_mut().filter(|c| c.expires != 0) else {
                continue;
            };
            any = true;
            let id = ConnId {
                slot: slot as u32,
                gen,
            };
            match token_due(c.expires, now, &self.s) {
                TokenDue::Later => {}
                TokenDue::Warn if !c.warned => {
                    c.warned = true;
                    warn.push((id, c.expires));
                }
                TokenDue::Warn => {}
                TokenDue::Close => close.push(id),
            }
        }
        for (id, expires) in warn {
            let msg = ServerMessage::event(ServerEvent::AuthExpiring(AuthExpiring {
                expires_at: u64::from(expires) * 1000,
            }));
            self.reply(id, &msg);
        }
        for id in close {
            self.metrics.token_expiries.inc();
            if let Some(conn) = self.conn(id) {
                conn.out
                    .close(crate::ws::close::TOKEN_EXPIRED, "token expired");
            }
            // A new connection with a fresh token may resume it.
            self.close_conn(id, None, true, now, tx);
        }
        self.token_scan = any;
        if any {
            self.timers.at(now + TOKEN_SCAN_MS, Timer::Tokens);
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
        conn.warned = false;
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
        self.watch_token(expires, now);
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
        assert_eq!(token_due(exp, 939_999, &s), TokenDue::Later);
        assert_eq!(token_due(exp, 940_000, &s), TokenDue::Warn);
        assert_eq!(token_due(exp, 1_004_999, &s), TokenDue::Warn);
        assert_eq!(token_due(exp, 1_005_000, &s), TokenDue::Close);
    }
}
