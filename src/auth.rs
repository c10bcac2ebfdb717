//! JWT verification with a pinned algorithm, and token minting for
//! development and tests.

#![forbid(unsafe_code)]

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use std::path::PathBuf;

use crate::access::{Access, Identity};

/// The secret used when no key is configured. It is public: development mode
/// exists so that `corecast serve` runs out of the box, never in production.
pub const DEV_SECRET: &str = "corecast-development-secret-do-not-use-in-production";

/// JWT verification. With neither `secret` nor `public_key_file` set the
/// server runs in development mode with a well-known secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `HS256`, `RS256` or `ES256`; tokens signed otherwise are refused.
    pub algorithm: String,
    /// Shared secret for HS256.
    pub secret: Option<String>,
    /// PEM public key for RS256 or ES256.
    pub public_key_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_s: u64,
    /// `grants`: a connection may join the channels its token's `channels`
    /// claim grants, and those a subscription token grants. `open`: a token
    /// without a `channels` claim may join any channel.
    pub channel_access: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            algorithm: "HS256".into(),
            secret: None,
            public_key_file: None,
            issuer: None,
            audience: None,
            leeway_s: 30,
            channel_access: "grants".into(),
        }
    }
}

/// An authentication configuration that cannot be used, with the reason.
#[derive(Debug)]
pub struct AuthConfigError(pub String);

impl std::fmt::Display for AuthConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AuthConfigError {}

/// The claims corecast reads. `sub` is the user id.
///
/// A connection token may carry `channels` (names or `*` patterns of the
/// channels it may join), `users` (the users it may message or call
/// directly) and `roles` (`moderator`, `admin`). A subscription token
/// carries `channel` instead: the one channel it grants to `sub`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
}

impl Claims {
    /// A connection token's claims for `user`, expiring at `exp` (seconds).
    pub fn new(user: impl Into<String>, exp: u64) -> Claims {
        Claims {
            sub: user.into(),
            exp,
            ..Claims::default()
        }
    }

    pub fn channels<S: Into<String>>(mut self, c: impl IntoIterator<Item = S>) -> Claims {
        self.channels = Some(c.into_iter().map(Into::into).collect());
        self
    }

    pub fn users<S: Into<String>>(mut self, u: impl IntoIterator<Item = S>) -> Claims {
        self.users = Some(u.into_iter().map(Into::into).collect());
        self
    }

    pub fn roles<S: Into<String>>(mut self, r: impl IntoIterator<Item = S>) -> Claims {
        self.roles = r.into_iter().map(Into::into).collect();
        self
    }

    /// A subscription token's claims: `user` may join `channel`.
    pub fn subscription(user: impl Into<String>, channel: impl Into<String>, exp: u64) -> Claims {
        Claims {
            sub: user.into(),
            exp,
            channel: Some(channel.into()),
            ..Claims::default()
        }
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthError(pub String);

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    /// True when running with [`DEV_SECRET`].
    pub dev_mode: bool,
    /// Without a `channels` claim, may a connection join any channel?
    open_channels: bool,
}

pub fn parse_algorithm(name: &str) -> Result<Algorithm, AuthConfigError> {
    match name {
        "HS256" => Ok(Algorithm::HS256),
        "RS256" => Ok(Algorithm::RS256),
        "ES256" => Ok(Algorithm::ES256),
        other => Err(AuthConfigError(format!(
            "auth.algorithm must be HS256, RS256 or ES256, not `{other}`"
        ))),
    }
}

impl Verifier {
    pub fn from_config(cfg: &AuthConfig) -> Result<Verifier, AuthConfigError> {
        let alg = parse_algorithm(&cfg.algorithm)?;
        let (key, dev_mode) = match (alg, &cfg.secret, &cfg.public_key_file) {
            (Algorithm::HS256, Some(secret), _) => {
                if secret.len() < 16 {
                    return Err(AuthConfigError(
                        "auth.secret must be at least 16 bytes".into(),
                    ));
                }
                (DecodingKey::from_secret(secret.as_bytes()), false)
            }
            (Algorithm::HS256, None, None) => {
                (DecodingKey::from_secret(DEV_SECRET.as_bytes()), true)
            }
            (Algorithm::HS256, None, Some(_)) => {
                return Err(AuthConfigError(
                    "HS256 takes auth.secret, not a public key".into(),
                ))
            }
            (_, _, Some(path)) => {
                let pem = std::fs::read(path).map_err(|e| {
                    AuthConfigError(format!(
                        "cannot read auth.public_key_file {}: {e}",
                        path.display()
                    ))
                })?;
                let key = if alg == Algorithm::RS256 {
                    DecodingKey::from_rsa_pem(&pem)
                } else {
                    DecodingKey::from_ec_pem(&pem)
                };
                let key = key.map_err(|e| {
                    AuthConfigError(format!("auth.public_key_file {}: {e}", path.display()))
                })?;
                (key, false)
            }
            (_, _, None) => {
                return Err(AuthConfigError(format!(
                    "{} needs auth.public_key_file (a PEM public key)",
                    cfg.algorithm
                )))
            }
        };
        let mut validation = Validation::new(alg);
        validation.leeway = cfg.leeway_s;
        validation.validate_nbf = true;
        validation.validate_exp = true;
        // Every claim the configuration names is required: a token without
        // `iss` is refused when an issuer is configured, as one with another
        // issuer is. `nbf` is checked when present.
        let mut required = vec!["exp", "sub"];
        match &cfg.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &cfg.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let open_channels = match cfg.channel_access.as_str() {
            "grants" => false,
            "open" => true,
            other => {
                return Err(AuthConfigError(format!(
                    "auth.channel_access must be `grants` or `open`, not `{other}`"
                )))
            }
        };
        Ok(Verifier {
            key,
            validation,
            dev_mode,
            open_channels,
        })
    }

    fn claims(&self, token: &str) -> Result<Claims, AuthError> {
        let data = decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthError(format!("invalid token: {e}")))?;
        if data.claims.sub.is_empty() || data.claims.sub.chars().count() > 128 {
            return Err(AuthError(
                "invalid token: `sub` must be 1 to 128 characters".into(),
            ));
        }
        if data.claims.sub.chars().any(char::is_control) {
            return Err(AuthError(
                "invalid token: `sub` has control characters".into(),
            ));
        }
        Ok(data.claims)
    }

    /// Verifies a connection token: the user, its roles and what it may
    /// reach.
    pub fn identify(&self, token: &str) -> Result<Identity, AuthError> {
        let c = self.claims(token)?;
        if c.channel.is_some() {
            return Err(AuthError(
                "invalid token: a subscription token (with `channel`) cannot authenticate a connection".into(),
            ));
        }
        let access = Access::from_claims(
            &c.roles,
            c.channels.as_deref(),
            c.users.as_deref(),
            c.exp,
            self.open_channels,
        )
        .map_err(|e| AuthError(format!("invalid token: {e}")))?;
        Ok(Identity {
            access,
            user: c.sub,
            token: None,
        })
    }

    /// Verifies a subscription token: signed like connection tokens, for
    /// this user and this channel.
    pub fn check_subscription(&self, token: &str, user: &str, channel: &str) -> Result<(), String> {
        let c = self.claims(token).map_err(|e| e.0)?;
        match c.channel.as_deref() {
            None => Err("`token` is not a subscription token (it has no `channel` claim)".into()),
            Some(_) if c.sub != user => Err("`token` was issued to another user".into()),
            Some(ch) if ch != channel => Err(format!("`token` grants `{ch}`, not `{channel}`")),
            Some(_) => Ok(()),
        }
    }

    /// Verifies a connection token and returns the user id.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        self.identify(token).map(|i| i.user)
    }
}

/// Mints a token with `claims` (`iss` and `aud` default to the
/// configured ones). HS256 signs with the secret (or [`DEV_SECRET`]); RS256
/// and ES256 need a PEM private key.
pub fn mint_claims(
    cfg: &AuthConfig,
    claims: &Claims,
    private_key_pem: Option<&[u8]>,
) -> Result<String, AuthConfigError> {
    let alg = parse_algorithm(&cfg.algorithm)?;
    let key = match alg {
        Algorithm::HS256 => {
            EncodingKey::from_secret(cfg.secret.as_deref().unwrap_or(DEV_SECRET).as_bytes())
        }
        _ => {
            let pem = private_key_pem.ok_or_else(|| {
                AuthConfigError(format!("{} tokens need --private-key", cfg.algorithm))
            })?;
            let k = if alg == Algorithm::RS256 {
                EncodingKey::from_rsa_pem(pem)
            } else {
                EncodingKey::from_ec_pem(pem)
            };
            k.map_err(|e| AuthConfigError(format!("private key: {e}")))?
        }
    };
    let mut claims = claims.clone();
    claims.iss = claims.iss.or_else(|| cfg.issuer.clone());
    claims.aud = claims.aud.or_else(|| cfg.audience.clone());
    encode(&Header::new(alg), &claims, &key)
        .map_err(|e| AuthConfigError(format!("cannot sign: {e}")))
}

/// Mints a connection token for `user` that grants every channel.
pub fn mint(
    cfg: &AuthConfig,
    user: &str,
    ttl_s: i64,
    private_key_pem: Option<&[u8]>,
    now_s: u64,
) -> Result<String, AuthConfigError> {
    let exp = (now_s as i64 + ttl_s).max(0) as u64;
    mint_claims(
        cfg,
        &Claims::new(user, exp).channels(["*"]),
        private_key_pem,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    #[test]
    fn dev_mode_round_trip() {
        let cfg = AuthConfig::default();
        let v = Verifier::from_config(&cfg).unwrap();
        assert!(v.dev_mode);
        let t = mint(&cfg, "alice", 60, None, now()).unwrap();
        assert_eq!(v.verify(&t).unwrap(), "alice");
    }

    #[test]
    fn expired_wrong_key_and_claims_are_refused() {
        let cfg = AuthConfig {
            secret: Some("0123456789abcdef0123".into()),
            issuer: Some("app".into()),
            audience: Some("chat".into()),
            leeway_s: 0,
            ..AuthConfig::default()
        };
        let v = Verifier::from_config(&cfg).unwrap();
        assert!(!v.dev_mode);
        assert_eq!(
            v.verify(&mint(&cfg, "bob", 60, None, now()).unwrap())
                .unwrap(),
            "bob"
        );
        assert!(
            v.verify(&mint(&cfg, "bob", -120, None, now()).unwrap())
                .is_err(),
            "expired"
        );
        let other = AuthConfig {
            secret: Some("another-secret-of-length".into()),
            ..cfg.clone()
        };
        assert!(
            v.verify(&mint(&other, "bob", 60, None, now()).unwrap())
                .is_err(),
            "wrong key"
        );
        let wrong_iss = AuthConfig {
            issuer: Some("evil".into()),
            ..cfg.clone()
        };
        assert!(
            v.verify(&mint(&wrong_iss, "bob", 60, None, now()).unwrap())
                .is_err(),
            "issuer"
        );
        let wrong_aud = AuthConfig {
            audience: Some("other".into()),
            ..cfg.clone()
        };
        assert!(
            v.verify(&mint(&wrong_aud, "bob", 60, None, now()).unwrap())
                .is_err(),
            "audience"
        );
        // alg: none is refused.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJib2IiLCJleHAiOjk5OTk5OTk5OTl9.";
        assert!(v.verify(none).is_err());
    }

    /// Signs any claims with `alg` (the fixtures' keys for RS256 and ES256).
    fn sign(alg: &str, secret: &str, claims: &serde_json::Value) -> String {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let key = match alg {
            "HS256" => EncodingKey::from_secret(secret.as_bytes()),
            "RS256" => {
                EncodingKey::from_rsa_pem(&std::fs::read(fixtures.join("rs256.key.pem")).unwrap())
                    .unwrap()
            }
            _ => EncodingKey::from_ec_pem(&std::fs::read(fixtures.join("es256.key.pem")).unwrap())
                .unwrap(),
        };
        encode(&Header::new(parse_algorithm(alg).unwrap()), claims, &key).unwrap()
    }

    /// A configuration for `alg` that names an issuer and an audience.
    fn strict(alg: &str) -> AuthConfig {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let stem = alg.to_ascii_lowercase();
        AuthConfig {
            algorithm: alg.into(),
            secret: (alg == "HS256").then(|| "0123456789abcdef0123".into()),
            public_key_file: (alg != "HS256").then(|| fixtures.join(format!("{stem}.pub.pem"))),
            issuer: Some("app".into()),
            audience: Some("chat".into()),
            leeway_s: 0,
            ..AuthConfig::default()
        }
    }

    #[test]
    fn every_configured_claim_is_required_for_every_algorithm_and_token_kind() {
        let exp = now() + 60;
        for alg in ["HS256", "RS256", "ES256"] {
            let cfg = strict(alg);
            let v = Verifier::from_config(&cfg).unwrap();
            let secret = "0123456789abcdef0123";
            let full = serde_json::json!({"sub": "bob", "exp": exp, "iss": "app", "aud": "chat", "channels": ["*"]});
            let without = |claim: &str| {
                let mut c = full.clone();
                c.as_object_mut().unwrap().remove(claim);
                c
            };
            let with = |claim: &str, value: serde_json::Value| {
                let mut c = full.clone();
                c[claim] = value;
                c
            };
            assert_eq!(v.verify(&sign(alg, secret, &full)).unwrap(), "bob", "{alg}");
            for (case, claims) in [
                ("no iss", without("iss")),
                ("no aud", without("aud")),
                ("no exp", without("exp")),
                ("no sub", without("sub")),
                ("wrong iss", with("iss", "evil".into())),
                ("wrong aud", with("aud", "other".into())),
                ("expired", with("exp", (now() - 10).into())),
                ("not yet valid", with("nbf", (now() + 600).into())),
            ] {
                assert!(
                    v.verify(&sign(alg, secret, &claims)).is_err(),
                    "{alg}: a token with {case} was accepted"
                );
            }
            assert!(v
                .verify(&sign(alg, secret, &with("nbf", (now() - 10).into())))
                .is_ok());
            // Subscription tokens follow the same rules.
            let sub = serde_json::json!({"sub": "bob", "exp": exp, "iss": "app", "aud": "chat", "channel": "room"});
            assert_eq!(
                v.check_subscription(&sign(alg, secret, &sub), "bob", "room"),
                Ok(())
            );
            for claim in ["iss", "aud", "exp"] {
                let mut c = sub.clone();
                c.as_object_mut().unwrap().remove(claim);
                assert!(
                    v.check_subscription(&sign(alg, secret, &c), "bob", "room")
                        .is_err(),
                    "{alg}: a subscription token without {claim} was accepted"
                );
            }
            // Without an issuer or an audience configured, neither is needed.
            let lax = AuthConfig {
                issuer: None,
                audience: None,
                ..cfg
            };
            let v = Verifier::from_config(&lax).unwrap();
            let bare = serde_json::json!({"sub": "bob", "exp": exp});
            assert!(v.verify(&sign(alg, secret, &bare)).is_ok(), "{alg}");
        }
    }

    #[test]
    fn rs256_and_es256_keys_from_files() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for (alg, other) in [("RS256", "ES256"), ("ES256", "RS256")] {
            let stem = alg.to_ascii_lowercase();
            let cfg = AuthConfig {
                algorithm: alg.into(),
                public_key_file: Some(fixtures.join(format!("{stem}.pub.pem"))),
                ..AuthConfig::default()
            };
            let v = Verifier::from_config(&cfg).unwrap_or_else(|e| panic!("{alg}: {e}"));
            let key = std::fs::read(fixtures.join(format!("{stem}.key.pem"))).unwrap();
            let t = mint(&cfg, "alice", 60, Some(&key), now()).unwrap();
            assert_eq!(v.verify(&t).unwrap(), "alice", "{alg}");
            // A token of the other algorithm is refused: the algorithm is pinned.
            let other_stem = other.to_ascii_lowercase();
            let other_cfg = AuthConfig {
                algorithm: other.into(),
                ..cfg.clone()
            };
            let other_key = std::fs::read(fixtures.join(format!("{other_stem}.key.pem"))).unwrap();
            let t = mint(&other_cfg, "alice", 60, Some(&other_key), now()).unwrap();
            assert!(v.verify(&t).is_err(), "{alg} accepted an {other} token");
            // And so is an HS256 token signed with the public key as secret.
            let hs = AuthConfig {
                algorithm: "HS256".into(),
                secret: Some(
                    String::from_utf8(
                        std::fs::read(cfg.public_key_file.as_ref().unwrap()).unwrap(),
                    )
                    .unwrap(),
                ),
                public_key_file: None,
                ..AuthConfig::default()
            };
            assert!(v
                .verify(&mint(&hs, "alice", 60, None, now()).unwrap())
                .is_err());
        }
    }

    #[test]
    fn claims_become_grants_and_roles() {
        let cfg = AuthConfig::default();
        let v = Verifier::from_config(&cfg).unwrap();
        let exp = now() + 60;
        let t = mint_claims(
            &cfg,
            &Claims::new("alice", exp)
                .channels(["team-1:*"])
                .users(["bob"])
                .roles(["moderator", "owner"]),
            None,
        )
        .unwrap();
        let id = v.identify(&t).unwrap();
        assert_eq!(id.user, "alice");
        assert!(id.access.roles.moderates() && !id.access.roles.administers());
        assert!(id.access.channel("team-1:x") && !id.access.channel("team-2:x"));
        assert!(id.access.user("bob") && !id.access.user("carol"));
        // Without a `channels` claim: nothing in `grants` mode...
        let bare = mint_claims(&cfg, &Claims::new("alice", exp), None).unwrap();
        let id = v.identify(&bare).unwrap();
        assert!(!id.access.channel("general") && id.access.user("anyone"));
        // ...everything in `open` mode.
        let open = AuthConfig {
            channel_access: "open".into(),
            ..cfg.clone()
        };
        let id = Verifier::from_config(&open)
            .unwrap()
            .identify(&bare)
            .unwrap();
        assert!(id.access.channel("general") && id.access.grants.is_none());
        // A claim past its bounds refuses the token.
        let huge = Claims::new("alice", exp).channels(vec!["x"; crate::access::MAX_PATTERNS + 1]);
        let e = v
            .identify(&mint_claims(&cfg, &huge, None).unwrap())
            .unwrap_err();
        assert!(e.0.contains("channels"), "{e}");
        let bad = AuthConfig {
            channel_access: "sometimes".into(),
            ..cfg
        };
        assert!(Verifier::from_config(&bad).is_err());
    }

    #[test]
    fn subscription_tokens_grant_one_channel_to_one_user() {
        let cfg = AuthConfig::default();
        let v = Verifier::from_config(&cfg).unwrap();
        let exp = now() + 60;
        let sub = mint_claims(&cfg, &Claims::subscription("alice", "secret", exp), None).unwrap();
        assert_eq!(v.check_subscription(&sub, "alice", "secret"), Ok(()));
        assert!(v.check_subscription(&sub, "bob", "secret").is_err());
        assert!(v.check_subscription(&sub, "alice", "other").is_err());
        // It cannot stand in for a connection token, nor the reverse.
        assert!(v.identify(&sub).unwrap_err().0.contains("subscription"));
        let conn = mint(&cfg, "alice", 60, None, now()).unwrap();
        assert!(v.check_subscription(&conn, "alice", "secret").is_err());
        let expired = mint_claims(
            &cfg,
            &Claims::subscription("alice", "secret", now() - 120),
            None,
        )
        .unwrap();
        assert!(v.check_subscription(&expired, "alice", "secret").is_err());
    }

    #[test]
    fn bad_config() {
        let short = AuthConfig {
            secret: Some("short".into()),
            ..AuthConfig::default()
        };
        assert!(Verifier::from_config(&short).is_err());
        let rs = AuthConfig {
            algorithm: "RS256".into(),
            ..AuthConfig::default()
        };
        assert!(Verifier::from_config(&rs)
            .err()
            .unwrap()
            .0
            .contains("public_key_file"));
        let bad = AuthConfig {
            algorithm: "none".into(),
            ..AuthConfig::default()
        };
        assert!(Verifier::from_config(&bad).is_err());
    }
}
