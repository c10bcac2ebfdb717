//! LiveKit access tokens for voice channels: the engine signs one for each
//! member who joins a channel's voice room (pure computation, no IO).

#![forbid(unsafe_code)]

use jsonwebtoken::{Algorithm, EncodingKey};

/// LiveKit settings: the server URL clients connect to, and the API key and
/// secret that sign access tokens.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveKit {
    pub url: String,
    pub api_key: String,
    pub api_secret: String,
    /// Lifetime of a token, in seconds (long enough to join with it).
    #[serde(default = "LiveKit::default_ttl")]
    pub token_ttl_s: u64,
}

impl LiveKit {
    fn default_ttl() -> u64 {
        600
    }
}

/// A LiveKit access token for `user` to join room `room`: HS256 with the
/// API secret, the API key as issuer, the user as identity, and a video
/// grant to join, publish and subscribe in that room.
pub fn livekit_token(lk: &LiveKit, room: &str, user: &str, now_s: u64) -> String {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Grant<'a> {
        room: &'a str,
        room_join: bool,
        can_publish: bool,
        can_subscribe: bool,
    }
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        iss: &'a str,
        sub: &'a str,
        name: &'a str,
        nbf: u64,
        exp: u64,
        video: Grant<'a>,
    }
    let claims = Claims {
        iss: &lk.api_key,
        sub: user,
        name: user,
        nbf: now_s,
        exp: now_s + lk.token_ttl_s,
        video: Grant {
            room,
            room_join: true,
            can_publish: true,
            can_subscribe: true,
        },
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(lk.api_secret.as_bytes()),
    )
    .expect("HS256 signing of plain claims cannot fail")
}
