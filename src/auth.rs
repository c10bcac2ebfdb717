//! JWT verification with a pinned algorithm, and token minting for
//! development and tests.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, ConfigError};

/// The secret used when no key is configured. It is public: development mode
/// exists so that `corecast serve` runs out of the box, never in production.
pub const DEV_SECRET: &str = "corecast-development-secret-do-not-use-in-production";

/// The claims corecast reads. `sub` is the user id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
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
}

pub fn parse_algorithm(name: &str) -> Result<Algorithm, ConfigError> {
    match name {
        "HS256" => Ok(Algorithm::HS256),
        "RS256" => Ok(Algorithm::RS256),
        "ES256" => Ok(Algorithm::ES256),
        other => Err(ConfigError(format!(
            "auth.algorithm must be HS256, RS256 or ES256, not `{other}`"
        ))),
    }
}

impl Verifier {
    pub fn from_config(cfg: &AuthConfig) -> Result<Verifier, ConfigError> {
        let alg = parse_algorithm(&cfg.algorithm)?;
        let (key, dev_mode) = match (alg, &cfg.secret, &cfg.public_key_file) {
            (Algorithm::HS256, Some(secret), _) => {
                if secret.len() < 16 {
                    return Err(ConfigError("auth.secret must be at least 16 bytes".into()));
                }
                (DecodingKey::from_secret(secret.as_bytes()), false)
            }
            (Algorithm::HS256, None, None) => {
                (DecodingKey::from_secret(DEV_SECRET.as_bytes()), true)
            }
            (Algorithm::HS256, None, Some(_)) => {
                return Err(ConfigError(
                    "HS256 takes auth.secret, not a public key".into(),
                ))
            }
            (_, _, Some(path)) => {
                let pem = std::fs::read(path).map_err(|e| {
                    ConfigError(format!(
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
                    ConfigError(format!("auth.public_key_file {}: {e}", path.display()))
                })?;
                (key, false)
            }
            (_, _, None) => {
                return Err(ConfigError(format!(
                    "{} needs auth.public_key_file (a PEM public key)",
                    cfg.algorithm
                )))
            }
        };
        let mut validation = Validation::new(alg);
        validation.leeway = cfg.leeway_s;
        validation.validate_nbf = true;
        validation.validate_exp = true;
        match &cfg.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &cfg.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Verifier {
            key,
            validation,
            dev_mode,
        })
    }

    /// Verifies a token and returns the user id.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        let data = decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthError(format!("invalid token: {e}")))?;
        if data.claims.sub.is_empty() || data.claims.sub.len() > 256 {
            return Err(AuthError(
                "invalid token: `sub` must be 1 to 256 bytes".into(),
            ));
        }
        Ok(data.claims.sub)
    }
}

/// Mints a token. HS256 signs with `secret` (or [`DEV_SECRET`]); RS256 and
/// ES256 need a PEM private key.
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

pub fn mint(
    cfg: &AuthConfig,
    user: &str,
    ttl_s: i64,
    private_key_pem: Option<&[u8]>,
    now_s: u64,
) -> Result<String, ConfigError> {
    let alg = parse_algorithm(&cfg.algorithm)?;
    let key = match alg {
        Algorithm::HS256 => {
            EncodingKey::from_secret(cfg.secret.as_deref().unwrap_or(DEV_SECRET).as_bytes())
        }
        _ => {
            let pem = private_key_pem.ok_or_else(|| {
                ConfigError(format!("{} tokens need --private-key", cfg.algorithm))
            })?;
            let k = if alg == Algorithm::RS256 {
                EncodingKey::from_rsa_pem(pem)
            } else {
                EncodingKey::from_ec_pem(pem)
            };
            k.map_err(|e| ConfigError(format!("private key: {e}")))?
        }
    };
    let claims = Claims {
        sub: user.to_owned(),
        exp: (now_s as i64 + ttl_s).max(0) as u64,
        nbf: None,
        iss: cfg.issuer.clone(),
        aud: cfg.audience.clone(),
    };
    encode(&Header::new(alg), &claims, &key).map_err(|e| ConfigError(format!("cannot sign: {e}")))
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
