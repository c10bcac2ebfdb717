//! The connect hook: before a connection opens, the application backend
//! decides who it is. With `hooks.connect_auth = jwt` the token was
//! verified first and the backend sees its user (and may refuse it, or
//! change its roles and grants); with `backend` the token is not verified
//! here: the backend reads it and names the user. Either way the backend
//! may list channels the connection joins at once (server-side
//! subscriptions, each heard as `channel:joined`).
//!
//! This module decides (the request's body, what an answer means); the
//! IO shell holds the connection meanwhile and opens or refuses it.

use serde::{Deserialize, Serialize};

use super::*;
use crate::access::Identity;

/// Channels an answer may ask a connection to join at once.
pub const MAX_SUBSCRIBE: usize = 100;

/// What the connect hook answered.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum ConnectVerdict {
    Allow {
        /// The user (required with `connect_auth = backend`; with `jwt`,
        /// the token's user when absent).
        #[serde(default, rename = "userId")]
        user_id: Option<String>,
        /// Replace the token's: roles, and the channels and users the
        /// connection may reach (the claims of a token, same meaning).
        #[serde(default)]
        roles: Option<Vec<String>>,
        #[serde(default)]
        channels: Option<Vec<String>>,
        #[serde(default)]
        users: Option<Vec<String>>,
        /// When the connection's grant ends (seconds since the epoch), as a
        /// token's `exp`: `auth:expiring` ahead of it, closed without
        /// `auth:refresh`.
        #[serde(default, rename = "expiresAt")]
        expires_at: Option<u64>,
        /// Channels the connection joins at once (grants do not apply).
        #[serde(default)]
        subscribe: Vec<String>,
    },
    Reject {
        #[serde(default)]
        reason: Option<String>,
        /// `unauthorized` (the default: the client may come back with
        /// another token) or `forbidden`.
        #[serde(default)]
        code: Option<ErrorCode>,
    },
}

/// What the shell does with the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Open {
        identity: Identity,
        subscribe: Vec<String>,
    },
    Refuse {
        code: ErrorCode,
        reason: String,
    },
}

/// The body of the connect hook's request for a connection that came with
/// `asked` (its token's user, or only its token).
pub fn connect_body(asked: &Identity, protocol: Protocol, device: DeviceKind) -> Vec<u8> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Body<'a> {
        /// The verified token's user (`null` with `connect_auth = backend`).
        user_id: Option<&'a str>,
        token: Option<&'a str>,
        protocol: &'a str,
        device: DeviceKind,
    }
    let protocol = match protocol {
        Protocol::Json => "json",
        Protocol::Binary => "binary",
        Protocol::SocketIo | Protocol::SocketIoMsgpack => "socketio",
    };
    serde_json::to_vec(&Body {
        user_id: (!asked.user.is_empty()).then_some(asked.user.as_str()),
        token: asked.token.as_deref(),
        protocol,
        device,
    })
    .expect("plain data")
}

/// The backend's answer (`Err`: it did not give one) made a decision.
/// `asked` is what the connection came with: a verified user, or (an empty
/// user) only a token. When the backend fails, `failure_allows` opens a
/// verified user as its token says; a bare token is always refused.
/// `open_channels` is `auth.channel_access = open`.
pub fn admit(
    asked: Identity,
    answer: Result<Vec<u8>, String>,
    failure_allows: bool,
    open_channels: bool,
) -> Admission {
    let verdict = answer.and_then(|body| {
        serde_json::from_slice::<ConnectVerdict>(&body).map_err(|e| {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
            format!("the connect hook's answer `{text}` is not a verdict: {e}")
        })
    });
    let failed = |asked: Identity, why: String| {
        if failure_allows && !asked.user.is_empty() {
            return Admission::Open {
                identity: asked,
                subscribe: Vec::new(),
            };
        }
        Admission::Refuse {
            code: ErrorCode::Unavailable,
            reason: format!("the application backend could not check the connection: {why}"),
        }
    };
    match verdict {
        Err(why) => failed(asked, why),
        Ok(ConnectVerdict::Reject { reason, code }) => Admission::Refuse {
            code: match code {
                Some(ErrorCode::Forbidden) => ErrorCode::Forbidden,
                _ => ErrorCode::Unauthorized,
            },
            reason: reason.unwrap_or_else(|| "refused by the application backend".into()),
        },
        Ok(ConnectVerdict::Allow {
            user_id,
            roles,
            channels,
            users,
            expires_at,
            subscribe,
        }) => {
            let Some(user) = user_id.or_else(|| Some(asked.user.clone()).filter(|u| !u.is_empty()))
            else {
                return failed(asked, "it allowed a connection without a `userId`".into());
            };
            if let Err(e) = check_id("userId", &user) {
                return failed(asked, e);
            }
            if subscribe.len() > MAX_SUBSCRIBE {
                let e = format!("`subscribe` names more than {MAX_SUBSCRIBE} channels");
                return failed(asked, e);
            }
            // What the answer does not say, the token does (none with a
            // bare token: no roles, channels as `channel_access` says).
            let mut access = if asked.user.is_empty() {
                Access::from_claims(&[], None, None, 0, open_channels)
                    .expect("no patterns to refuse")
            } else {
                asked.access.clone()
            };
            if let Some(r) = &roles {
                access.roles = Roles::from_names(r.iter().map(String::as_str));
            }
            if channels.is_some() || users.is_some() {
                let grants = Access::from_claims(
                    &[],
                    channels.as_deref(),
                    users.as_deref(),
                    0,
                    open_channels,
                );
                match grants {
                    Ok(a) => access.grants = a.grants,
                    Err(e) => return failed(asked, e),
                }
            }
            if let Some(exp) = expires_at {
                access.expires = u32::try_from(exp).unwrap_or(u32::MAX);
            }
            Admission::Open {
                identity: Identity {
                    user,
                    access,
                    token: None,
                },
                subscribe,
            }
        }
    }
}

impl<O: Outbound> Engine<O> {
    /// Joins a connection the connect hook opened to the channels its
    /// answer named, as server-side subscriptions (each answered with
    /// `channel:joined`, or an error event for a channel that cannot be
    /// joined).
    pub fn subscribe_at_connect(
        &mut self,
        id: ConnId,
        channels: Vec<String>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        for channel in channels {
            if let Err(why) = self.check_channel_id(&channel) {
                self.reply(id, &err(None, ErrorCode::BadRequest, why));
                continue;
            }
            let join = subscribe::ServerJoin {
                conn: id,
                channel: channel.into(),
                join: true,
            };
            self.on_server_join(join, now, tx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(user: &str) -> Identity {
        Identity {
            user: user.into(),
            access: Access {
                roles: Roles::NONE,
                grants: None,
                expires: 1_000,
            },
            token: Some("t0k".into()),
        }
    }

    fn bare(token: &str) -> Identity {
        Identity {
            user: String::new(),
            access: Access::default(),
            token: Some(token.into()),
        }
    }

    fn answer(json: &str) -> Result<Vec<u8>, String> {
        Ok(json.as_bytes().to_vec())
    }

    #[test]
    fn the_body_names_the_verified_user_or_only_the_token() {
        let b = connect_body(&jwt("alice"), Protocol::SocketIo, DeviceKind::Mobile);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"userId": "alice", "token": "t0k", "protocol": "socketio", "device": "mobile"})
        );
        let b = connect_body(&bare("opaque"), Protocol::Json, DeviceKind::Web);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["userId"], serde_json::Value::Null);
        assert_eq!(v["token"], "opaque");
    }

    #[test]
    fn an_allow_keeps_what_it_does_not_replace() {
        let a = admit(jwt("alice"), answer(r#"{"result":"allow"}"#), false, false);
        assert_eq!(
            a,
            Admission::Open {
                identity: Identity {
                    token: None,
                    ..jwt("alice")
                },
                subscribe: vec![]
            }
        );
        let a = admit(
            jwt("alice"),
            answer(
                r#"{"result":"allow","userId":"al","roles":["moderator"],"channels":["team-*"],"expiresAt":77,"subscribe":["team-1"]}"#,
            ),
            false,
            false,
        );
        let Admission::Open {
            identity,
            subscribe,
        } = a
        else {
            panic!("refused: {a:?}");
        };
        assert_eq!(identity.user, "al");
        assert_eq!(identity.access.roles, Roles::MODERATOR);
        assert!(identity.access.channel("team-9"));
        assert!(!identity.access.channel("general"));
        assert_eq!(identity.access.expires, 77);
        assert_eq!(subscribe, ["team-1"]);
    }

    #[test]
    fn a_bare_token_needs_the_backend_to_name_its_user() {
        let a = admit(
            bare("x"),
            answer(r#"{"result":"allow","userId":"bob"}"#),
            false,
            false,
        );
        let Admission::Open { identity, .. } = a else {
            panic!("refused: {a:?}");
        };
        assert_eq!(identity.user, "bob");
        // No channels claimed and `channel_access = grants`: none granted.
        assert!(!identity.access.channel("general"));
        assert_eq!(identity.access.expires, 0);
        let open = admit(
            bare("x"),
            answer(r#"{"result":"allow","userId":"bob"}"#),
            false,
            true,
        );
        assert!(
            matches!(open, Admission::Open { identity, .. } if identity.access.channel("general"))
        );
        for failing in [
            answer(r#"{"result":"allow"}"#),
            answer(r#"{"result":"allow","userId":""}"#),
            Err("connection refused".to_owned()),
        ] {
            // Allowing on failure cannot open a connection nobody named.
            let a = admit(bare("x"), failing, true, false);
            assert!(
                matches!(
                    &a,
                    Admission::Refuse {
                        code: ErrorCode::Unavailable,
                        ..
                    }
                ),
                "{a:?}"
            );
        }
    }

    #[test]
    fn refusals_and_failures_say_why() {
        let a = admit(
            jwt("alice"),
            answer(r#"{"result":"reject","reason":"suspended"}"#),
            true,
            false,
        );
        assert_eq!(
            a,
            Admission::Refuse {
                code: ErrorCode::Unauthorized,
                reason: "suspended".into()
            }
        );
        let a = admit(
            jwt("alice"),
            answer(r#"{"result":"reject","code":"forbidden"}"#),
            false,
            false,
        );
        assert!(matches!(
            a,
            Admission::Refuse {
                code: ErrorCode::Forbidden,
                ..
            }
        ));
        for bad in [
            answer("not json"),
            answer(r#"{"result":"maybe"}"#),
            answer(r#"{"result":"allow","extra":1}"#),
            answer(r#"{"result":"allow","channels":[""]}"#),
            Err("timed out".to_owned()),
        ] {
            let a = admit(jwt("alice"), bad.clone(), false, false);
            assert!(
                matches!(&a, Admission::Refuse { code: ErrorCode::Unavailable, reason } if reason.contains("could not check")),
                "{bad:?}: {a:?}"
            );
            // `on_failure = allow`: the verified user as its token says.
            let a = admit(jwt("alice"), bad, true, false);
            assert!(matches!(a, Admission::Open { identity, .. } if identity.user == "alice"));
        }
    }
}
