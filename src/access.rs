//! Who may do what, from a token's claims: the channels a connection may
//! join, the users it may message or call directly, and its roles. Plain
//! data, no IO.

#![forbid(unsafe_code)]

use std::sync::Arc;

/// Longest pattern in a `channels` or `users` claim.
pub const MAX_PATTERN_BYTES: usize = 256;
/// Most patterns in one claim.
pub const MAX_PATTERNS: usize = 1000;

/// A connection's roles, from the token's `roles` claim.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Roles(u8);

impl Roles {
    pub const NONE: Roles = Roles(0);
    pub const MODERATOR: Roles = Roles(1);
    pub const ADMIN: Roles = Roles(2);

    /// Reads the `roles` claim. Names other than `moderator` and `admin`
    /// are the application's own and carry no power here.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Roles {
        let mut r = Roles::NONE;
        for n in names {
            match n {
                "moderator" => r.0 |= Roles::MODERATOR.0,
                "admin" => r.0 |= Roles::ADMIN.0,
                _ => {}
            }
        }
        r
    }

    pub fn names(self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.0 & Roles::MODERATOR.0 != 0 {
            v.push("moderator");
        }
        if self.0 & Roles::ADMIN.0 != 0 {
            v.push("admin");
        }
        v
    }

    /// May moderate a channel: delete others' messages, kick or ban from
    /// a channel.
    pub fn moderates(self) -> bool {
        self.0 & (Roles::MODERATOR.0 | Roles::ADMIN.0) != 0
    }

    /// May kick or ban from the whole server.
    pub fn administers(self) -> bool {
        self.0 & Roles::ADMIN.0 != 0
    }
}

/// A list of names and glob patterns (`*` matches any run of characters,
/// including none; everything else matches itself).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Patterns(Box<[Box<str>]>);

impl Patterns {
    /// Checks and keeps a claim's patterns; `claim` names it in errors.
    pub fn new(claim: &str, list: &[String]) -> Result<Patterns, String> {
        if list.len() > MAX_PATTERNS {
            return Err(format!(
                "`{claim}` has {} entries, at most {MAX_PATTERNS} are allowed",
                list.len()
            ));
        }
        for p in list {
            if p.is_empty() || p.len() > MAX_PATTERN_BYTES || p.chars().any(char::is_control) {
                return Err(format!(
                    "`{claim}` entries must be 1 to {MAX_PATTERN_BYTES} bytes without control characters"
                ));
            }
        }
        Ok(Patterns(list.iter().map(|p| p.as_str().into()).collect()))
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| glob(p, name))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of bytes.
/// Linear in practice: on a mismatch it retries only from the last star.
pub fn glob(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut i, mut j) = (0, 0);
    // Where the last star was, and the name position it was tried at.
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && p[i] == n[j] {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            // Let the star swallow one more byte.
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == b'*')
}

/// What a connection may reach. `None` means unrestricted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Grants {
    /// Channels it may join (and whose voice room it may enter).
    pub channels: Option<Patterns>,
    /// Users it may send direct messages to or call.
    pub users: Option<Patterns>,
}

impl Grants {
    pub fn channel(grants: Option<&Grants>, channel: &str) -> bool {
        grants
            .and_then(|g| g.channels.as_ref())
            .is_none_or(|p| p.matches(channel))
    }

    pub fn user(grants: Option<&Grants>, user: &str) -> bool {
        grants
            .and_then(|g| g.users.as_ref())
            .is_none_or(|p| p.matches(user))
    }
}

/// What a connection may do: its roles, and what it may reach (`None`:
/// everything).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    pub roles: Roles,
    pub grants: Option<Arc<Grants>>,
    /// When the token expires (seconds since the epoch; 0: never).
    pub expires: u32,
}

impl Access {
    /// From a token's claims (or the connect hook's answer): `roles`, the
    /// `channels` and `users` it may reach (a list holding `*` grants
    /// everything, and costs the connection nothing), and its expiry
    /// (seconds). Without `channels`, `open_channels` decides: every
    /// channel, or none.
    pub fn from_claims(
        roles: &[String],
        channels: Option<&[String]>,
        users: Option<&[String]>,
        expires: u64,
        open_channels: bool,
    ) -> Result<Access, String> {
        let restrict = |claim: &str, list: &[String]| match Patterns::new(claim, list) {
            Ok(_) if list.iter().any(|p| p == "*") => Ok(None),
            Ok(p) => Ok(Some(p)),
            Err(e) => Err(e),
        };
        let channels = match channels {
            Some(list) => restrict("channels", list)?,
            None if open_channels => None,
            None => Some(Patterns::new("channels", &[]).expect("empty is valid")),
        };
        let users = match users {
            Some(list) => restrict("users", list)?,
            None => None,
        };
        let grants =
            (channels.is_some() || users.is_some()).then(|| Arc::new(Grants { channels, users }));
        Ok(Access {
            roles: Roles::from_names(roles.iter().map(String::as_str)),
            grants,
            expires: u32::try_from(expires).unwrap_or(u32::MAX),
        })
    }

    pub fn channel(&self, channel: &str) -> bool {
        Grants::channel(self.grants.as_deref(), channel)
    }

    pub fn user(&self, user: &str) -> bool {
        Grants::user(self.grants.as_deref(), user)
    }
}

/// An authenticated client: its user id and access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub access: Access,
    /// The token it came with, kept for the connect hook (which sees it);
    /// with `hooks.connect_auth = backend`, the token is all there is (the
    /// user is empty until the backend names it).
    pub token: Option<Box<str>>,
}

impl Identity {
    /// A user with no roles and no restrictions.
    pub fn unrestricted(user: impl Into<String>) -> Identity {
        Identity {
            user: user.into(),
            access: Access::default(),
            token: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn globs() {
        for (p, n, want) in [
            ("*", "", true),
            ("*", "anything", true),
            ("general", "general", true),
            ("general", "general2", false),
            ("team-42:*", "team-42:random", true),
            ("team-42:*", "team-42:", true),
            ("team-42:*", "team-4:x", false),
            ("*:public", "a:b:public", true),
            ("*:public", "a:b:private", false),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("a*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false),
            ("", "", true),
            ("", "x", false),
        ] {
            assert_eq!(glob(p, n), want, "{p:?} ~ {n:?}");
        }
    }

    /// The same as a slow, obviously right matcher.
    fn reference(p: &[u8], n: &[u8]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some((b'*', rest)) => (0..=n.len()).any(|k| reference(rest, &n[k..])),
            Some((c, rest)) => n.first() == Some(c) && reference(rest, &n[1..]),
        }
    }

    proptest! {
        #[test]
        fn glob_agrees_with_the_reference(p in "[ab*]{0,8}", n in "[ab]{0,10}") {
            prop_assert_eq!(glob(&p, &n), reference(p.as_bytes(), n.as_bytes()));
        }
    }

    #[test]
    fn claims_are_bounded() {
        assert!(Patterns::new("channels", &["".into()]).is_err());
        assert!(Patterns::new("channels", &["x".repeat(MAX_PATTERN_BYTES + 1)]).is_err());
        assert!(Patterns::new("channels", &vec!["a".to_string(); MAX_PATTERNS + 1]).is_err());
        let p = Patterns::new("channels", &["a".into(), "b:*".into()]).unwrap();
        assert!(p.matches("a") && p.matches("b:1") && !p.matches("c"));
        let none = Patterns::new("channels", &[]).unwrap();
        assert!(none.is_empty() && !none.matches("a"));
    }

    #[test]
    fn grants_and_roles() {
        assert!(Grants::channel(None, "x") && Grants::user(None, "y"));
        let g = Grants {
            channels: Some(Patterns::new("channels", &["room-*".into()]).unwrap()),
            users: None,
        };
        assert!(Grants::channel(Some(&g), "room-1"));
        assert!(!Grants::channel(Some(&g), "other"));
        assert!(Grants::user(Some(&g), "anyone"));
        let r = Roles::from_names(["moderator", "owner"]);
        assert!(r.moderates() && !r.administers());
        assert_eq!(r.names(), ["moderator"]);
        let a = Roles::from_names(["admin"]);
        assert!(a.moderates() && a.administers());
        assert!(!Roles::NONE.moderates());
    }
}
