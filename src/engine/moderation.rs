//! Kicks and bans: checked on the moderator's shard, made durable there,
//! then carried out by the shard in charge (the user's home for the whole
//! server, the channel's owner for a channel). Every shard keeps the table
//! of bans, so that authentication and joins are refused where they happen.

use std::sync::Arc;

use super::bans::until;
use super::*;

/// Longest `reason`, in characters.
pub const MAX_REASON_CHARS: usize = 500;
/// Longest ban: ten years.
pub const MAX_BAN_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// What a user refused because of `ban` is told.
pub(super) fn banned_message(ban: &Moderation) -> String {
    let scope = match &ban.channel {
        Some(c) => format!("banned from channel `{c}`"),
        None => "banned from this server".to_string(),
    };
    let until = match until(ban) {
        u64::MAX => "until lifted".to_string(),
        t => format!("until {t} (ms since the epoch)"),
    };
    match &ban.reason {
        Some(r) => format!("{scope} {until}: {r}"),
        None => format!("{scope} {until}"),
    }
}

/// The event for the user (`to_channel` false: `moderation:kicked`,
/// `moderation:banned`) or for a channel's members (`moderation:user_*`).
pub(super) fn moderation_event(
    m: &Moderation,
    channel: Option<&Arc<str>>,
    to_channel: bool,
) -> ServerMessage {
    let until = match m.kind {
        ModKind::Ban { until } => until,
        _ => None,
    };
    let body = ModerationEvent {
        user_id: m.user.to_string(),
        channel_id: channel.map(|c| c.to_string()),
        reason: m.reason.clone(),
        by: m.by.clone(),
        until,
    };
    let banned = matches!(m.kind, ModKind::Ban { .. });
    ev(match (banned, to_channel) {
        (true, false) => ServerEvent::ModerationBanned(body),
        (true, true) => ServerEvent::ModerationUserBanned(body),
        (false, false) => ServerEvent::ModerationKicked(body),
        (false, true) => ServerEvent::ModerationUserKicked(body),
    })
}

/// A moderation action's id, the same on every node (they all read it
/// from Redis): by it a channel's member gets its event once however many
/// nodes act on it.
pub(super) fn once_id(m: &Moderation) -> u64 {
    // FNV-1a: stable across processes, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let kind: &[u8] = match m.kind {
        ModKind::Kick => b"k",
        ModKind::Ban { .. } => b"b",
        ModKind::Unban => b"u",
    };
    for part in [
        kind,
        m.user.as_bytes(),
        m.by.as_bytes(),
        &m.at.to_le_bytes(),
    ] {
        for b in part.iter().chain(b"\0") {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The shard that carries out a moderation action on a node of `shards`
/// shards: the channel's owner, or the user's home for the whole server.
pub fn in_charge(m: &Moderation, shards: u16) -> ShardId {
    match &m.channel {
        None => home_of(&m.user, shards),
        Some(c) => owner_of(c, shards),
    }
}

impl<O: Outbound> Engine<O> {
    /// Sets the mesh endpoint that makes bans and unbans durable (the ban
    /// store's thread). Without it they last as long as the process.
    pub fn set_ban_store(&mut self, endpoint: ShardId) {
        self.ban_store = Some(endpoint);
    }

    /// Loads the bans in force at start-up (already durable).
    pub fn load_bans(&mut self, bans: impl IntoIterator<Item = Moderation>, now: u64) {
        for b in bans {
            self.apply_ban(&Arc::new(b), now);
        }
    }

    /// Updates the table; a timed ban leaves it when it ends.
    fn apply_ban(&mut self, m: &Arc<Moderation>, now: u64) {
        self.bans.apply(m, now);
        self.metrics.bans.set(self.bans.len() as u64);
        if let ModKind::Ban { until: Some(t) } = m.kind {
            self.timers.at(t, Timer::Bans);
        }
    }

    /// Why `user` may not connect, if it is banned from the server.
    pub fn server_ban(&self, user: &str, now: u64) -> Option<String> {
        self.bans.server(user, now).map(|b| banned_message(b))
    }

    /// Bans in force on this shard's copy of the table.
    pub fn ban_count(&self) -> usize {
        self.bans.len()
    }

    /// Checks a client's `moderation:kick_user` or `moderation:ban_user`
    /// and carries it out.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn client_moderation(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        kind: ModKind,
        user: String,
        channel: Option<String>,
        reason: Option<String>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(conn) = self.conn(id) else { return };
        let (roles, me, protocol) = (conn.roles, conn.member.user.clone(), conn.member.protocol);
        let check = || -> Result<(), (ErrorCode, String)> {
            let bad = |e: String| (ErrorCode::BadRequest, e);
            check_id("userId", &user).map_err(bad)?;
            if let Some(c) = &channel {
                self.check_channel_id(c).map_err(bad)?;
            }
            if reason
                .as_ref()
                .is_some_and(|r| r.chars().count() > MAX_REASON_CHARS)
            {
                return Err((
                    ErrorCode::TooLarge,
                    format!("`reason` is longer than {MAX_REASON_CHARS} characters"),
                ));
            }
            if *user == *me {
                return Err(bad("cannot moderate yourself".into()));
            }
            let forbidden = |e: String| Err((ErrorCode::Forbidden, e));
            match &channel {
                None if !roles.administers() => {
                    forbidden("server-wide kicks and bans need the `admin` role".into())
                }
                Some(_) if !roles.moderates() => {
                    forbidden("kicks and bans need the `moderator` or `admin` role".into())
                }
                Some(c)
                    if !self.conn(id).is_some_and(|x| x.granted(c))
                        && self.joined(id, c).is_none() =>
                {
                    forbidden(format!("channel `{c}` is not granted to this connection"))
                }
                _ => Ok(()),
            }
        };
        if let Err((code, e)) = check() {
            return self.error(id, ack, code, e);
        }
        let m = Moderation {
            kind,
            user: user.into(),
            channel: channel.map(Into::into),
            reason,
            by: me.to_string(),
            at: now,
            from: Some((self.here(id), protocol)),
            ack,
        };
        self.moderate(m, now, tx);
    }

    /// Carries out a moderation action that has been allowed. A kick goes
    /// to the shard in charge, which answers `m.from`. A ban or unban is
    /// made durable, then goes round every shard's table starting with the
    /// shard in charge (which acts on it); the last shard of the round
    /// answers, so an answer means every shard enforces it.
    pub fn moderate(&mut self, m: Moderation, now: u64, tx: &mut impl MeshTx) {
        if let Some(c) = &self.cluster {
            // Every node carries it out when Redis publishes it.
            if c.up {
                return self.send_bridge(ToBridge::Moderate(Box::new(m)), now, tx);
            }
            if !matches!(m.kind, ModKind::Kick) {
                let msg = err(
                    m.ack,
                    ErrorCode::Internal,
                    "bans are kept in the cluster's Redis, which is unreachable: try again",
                );
                return self.answer(m.from, &msg, now, tx);
            }
        }
        let to = self.in_charge_of(&m);
        if matches!(m.kind, ModKind::Kick) {
            return self.route(to, MeshMsg::Moderate(Arc::new(m)), now, tx);
        }
        if let Some(store) = self.ban_store {
            // Applied once the store says it is on disk.
            let msg = MeshMsg::StoreBan {
                from: self.shard,
                moderation: Box::new(m),
            };
            return self.route(store, msg, now, tx);
        }
        self.route(to, MeshMsg::Moderate(Arc::new(m)), now, tx);
    }

    /// The ban store's answer: the ban goes round every shard's table, or
    /// its sender hears why it could not be stored.
    pub(super) fn ban_stored(
        &mut self,
        m: Moderation,
        error: Option<String>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        match error {
            None => {
                let to = self.in_charge_of(&m);
                self.route(to, MeshMsg::Moderate(Arc::new(m)), now, tx);
            }
            Some(e) => {
                tracing::error!(error = %e, "cannot store a ban");
                let msg = err(
                    m.ack,
                    ErrorCode::Internal,
                    format!("cannot store the ban: {e}"),
                );
                self.answer(m.from, &msg, now, tx);
            }
        }
    }

    pub(super) fn in_charge_of(&self, m: &Moderation) -> ShardId {
        in_charge(m, self.shards)
    }

    pub(super) fn on_moderate(&mut self, m: Arc<Moderation>, now: u64, tx: &mut impl MeshTx) {
        self.apply_ban(&m, now);
        let in_charge = self.in_charge_of(&m);
        let kick = matches!(m.kind, ModKind::Kick);
        let answer = match (&m.kind, &m.channel) {
            _ if in_charge != self.shard => Ok(()),
            (ModKind::Unban, _) => Ok(()),
            (_, None) => {
                let devices: Vec<ConnRef> = self
                    .users
                    .get(&m.user)
                    .map(|st| st.devices.iter().map(|d| d.conn).collect())
                    .unwrap_or_default();
                for d in &devices {
                    let msg = MeshMsg::Disconnect {
                        conn: d.conn,
                        moderation: m.clone(),
                    };
                    self.route(d.shard, msg, now, tx);
                }
                // In a cluster the user may be connected to another node.
                match devices.is_empty() && kick && self.cluster.is_none() {
                    true => Err(format!("user `{}` is not connected", m.user)),
                    false => Ok(()),
                }
            }
            (_, Some(channel)) => {
                let member = self
                    .owned
                    .get(channel)
                    .is_some_and(|o| o.users.contains_key(&m.user));
                if member || !kick {
                    // The others hear of it (of a ban even when the user is
                    // not in the channel); the user's connections get their
                    // own event as they are taken out.
                    // Each node that acts on it sends it; a member gets it
                    // once.
                    let event = moderation_event(&m, Some(channel), true);
                    self.fan_out_once(channel, &event, Some(&m.user), once_id(&m), now, tx);
                }
                if member {
                    for s in self.owned[channel].member_shards() {
                        self.route(s, MeshMsg::Evict(m.clone()), now, tx);
                    }
                }
                let in_voice = self.leave_voice_room(channel, &m.user, now, tx);
                match !member && !in_voice && kick && self.cluster.is_none() {
                    true => Err(format!("user `{}` is not in channel `{channel}`", m.user)),
                    false => Ok(()),
                }
            }
        };
        let next = (self.shard + 1) % self.shards;
        if !kick && next != in_charge {
            return self.route(next, MeshMsg::Moderate(m), now, tx);
        }
        let msg = match answer {
            Ok(()) => empty_ack(m.ack),
            Err(e) => err(m.ack, ErrorCode::NotFound, e),
        };
        self.answer(m.from, &msg, now, tx);
    }

    /// Takes a user out of a channel's voice room (owner side). Returns
    /// whether it was there.
    fn leave_voice_room(
        &mut self,
        channel: &Arc<str>,
        user: &Arc<str>,
        now: u64,
        tx: &mut impl MeshTx,
    ) -> bool {
        let Some(owned) = self.owned.get_mut(channel) else {
            return false;
        };
        let Some(i) = owned.voice.iter().position(|p| p.user == *user) else {
            return false;
        };
        let seq = owned.voice.remove(i).seq;
        let event = ev(ServerEvent::VoiceUserLeft(VoiceEvent {
            channel_id: channel.to_string(),
            user_id: user.to_string(),
            state: None,
        }));
        self.fan_out(channel, &event, None, now, tx);
        let gone = UserCmd::VoiceGone {
            channel: channel.clone(),
            seq,
        };
        self.send_user_op(user.clone(), None, None, gone, now, tx);
        if self.owned.get(channel).is_some_and(|o| o.total() == 0) {
            self.channel_gc(channel, now, tx);
        }
        true
    }

    /// Takes the user's local connections out of the channel (conn side).
    pub(super) fn on_evict(&mut self, m: &Arc<Moderation>, now: u64, tx: &mut impl MeshTx) {
        let Some(channel) = &m.channel else { return };
        let Some(local) = self.local.get(channel) else {
            return;
        };
        let targets: Vec<ConnId> = local
            .members
            .iter()
            .filter(|lm| self.conn(lm.conn).is_some_and(|c| c.member.user == m.user))
            .map(|lm| lm.conn)
            .collect();
        let msg = moderation_event(m, Some(channel), false);
        for id in targets {
            self.reply(id, &msg);
            self.remove_local(channel, id);
            let Some(conn) = self.conn_mut(id) else {
                continue;
            };
            if let Some(links) = conn.links.as_mut() {
                links.channels.retain(|(c, _)| c != channel);
            }
            let member = conn.member.clone();
            self.tell_owner_left(id, channel.clone(), member, None, now, tx);
        }
    }

    /// Closes a local connection of a kicked or banned user (conn side).
    pub(super) fn disconnect(
        &mut self,
        id: ConnId,
        m: &Arc<Moderation>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(conn) = self.conn(id) else { return };
        if conn.member.user != m.user {
            return;
        }
        self.reply(id, &moderation_event(m, None, false));
        let (code, reason) = match m.kind {
            ModKind::Ban { .. } => (crate::ws::close::BANNED, "banned"),
            _ => (crate::ws::close::KICKED, "kicked"),
        };
        if let Some(conn) = self.conn(id) {
            conn.out.close(code, reason);
        }
        self.close_conn(id, Some(m), false, now, tx);
    }

    /// `moderation:kick_user` from a moderator.
    pub(super) fn on_moderation_kick_user(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        k: KickUser,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.client_moderation(
            id,
            ack,
            ModKind::Kick,
            k.user_id,
            k.channel_id,
            k.reason,
            now,
            tx,
        )
    }

    /// `moderation:ban_user` from a moderator: the duration checked here.
    pub(super) fn on_moderation_ban_user(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        b: BanUser,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let until = match b.duration_ms {
            None => None,
            Some(d) if (1..=moderation::MAX_BAN_MS).contains(&d) => Some(now + d),
            Some(_) => {
                return self.error(
                    id,
                    ack,
                    ErrorCode::BadRequest,
                    format!(
                        "`durationMs` must be 1 to {} (ten years)",
                        moderation::MAX_BAN_MS
                    ),
                )
            }
        };
        self.client_moderation(
            id,
            ack,
            ModKind::Ban { until },
            b.user_id,
            b.channel_id,
            b.reason,
            now,
            tx,
        )
    }
}
