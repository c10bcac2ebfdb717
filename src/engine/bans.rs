//! Bans in force: every shard keeps the whole table (bans are few and
//! rarely change), so that authentication and joins are checked where they
//! happen, without asking another shard.

use std::collections::HashMap;
use std::sync::Arc;

use super::{ModKind, Moderation};

#[derive(Default)]
pub struct Bans {
    /// Server-wide, by user.
    server: HashMap<Arc<str>, Arc<Moderation>>,
    /// By channel, then user.
    channels: HashMap<Arc<str>, HashMap<Arc<str>, Arc<Moderation>>>,
    /// Entries when expired ones were last dropped.
    after_prune: usize,
}

/// When a ban ends (`u64::MAX`: when lifted).
pub fn until(m: &Moderation) -> u64 {
    match m.kind {
        ModKind::Ban { until } => until.unwrap_or(u64::MAX),
        _ => 0,
    }
}

impl Bans {
    /// Applies a ban or an unban (kicks leave no trace).
    pub fn apply(&mut self, m: &Arc<Moderation>, now: u64) {
        match (&m.kind, &m.channel) {
            (ModKind::Ban { .. }, None) => {
                self.server.insert(m.user.clone(), m.clone());
            }
            (ModKind::Ban { .. }, Some(c)) => {
                self.channels
                    .entry(c.clone())
                    .or_default()
                    .insert(m.user.clone(), m.clone());
            }
            (ModKind::Unban, None) => {
                self.server.remove(&m.user);
            }
            (ModKind::Unban, Some(c)) => {
                if let Some(users) = self.channels.get_mut(c) {
                    users.remove(&m.user);
                    if users.is_empty() {
                        self.channels.remove(c);
                    }
                }
            }
            (ModKind::Kick, _) => {}
        }
        if self.len() > 2 * self.after_prune.max(512) {
            self.prune(now);
        }
    }

    /// The server-wide ban on `user`, if one is in force.
    pub fn server(&self, user: &str, now: u64) -> Option<&Arc<Moderation>> {
        self.server.get(user).filter(|m| until(m) > now)
    }

    /// The ban on `user` in `channel`, if one is in force.
    pub fn channel(&self, user: &str, channel: &str, now: u64) -> Option<&Arc<Moderation>> {
        self.channels
            .get(channel)?
            .get(user)
            .filter(|m| until(m) > now)
    }

    pub fn clear(&mut self) {
        self.server.clear();
        self.channels.clear();
    }

    pub fn len(&self) -> usize {
        self.server.len() + self.channels.values().map(HashMap::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops expired bans.
    pub fn prune(&mut self, now: u64) {
        self.server.retain(|_, m| until(m) > now);
        self.channels.retain(|_, users| {
            users.retain(|_, m| until(m) > now);
            !users.is_empty()
        });
        self.after_prune = self.len();
    }
}
