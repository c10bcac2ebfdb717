//! Resumable sessions: a dropped connection's channels kept on the user's
//! home for `resume_window_ms` (in a cluster, in Redis too), taken back by
//! `session:resume` on any shard.
//!
//! Handlers are named after their event: `on_<event>` on the member's
//! connection's shard (checks, then the request goes on), and after the
//! event again on the shard that carries it out.

use super::*;

impl<O: Outbound> Engine<O> {
    /// `session:resume`, on the user's home: the dropped session's channels
    /// (in a cluster, taken from Redis by whichever node kept them).
    pub(super) fn session_resume(
        &mut self,
        r: UserReq,
        session: SessionId,
        gather: u64,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (user, from, _) = r.parts();
        let Some((conn, _)) = from else { return };
        let here = self.users.get_mut(&user).and_then(|st| {
            let i = st
                .more()
                .detached
                .iter()
                .position(|d| d.session == session && d.until > now)?;
            Some(st.more().detached.remove(i))
        });
        let kept = here.as_ref().is_none_or(|d| d.kept);
        if self.cluster_up() && kept {
            // Kept in Redis for any node: whoever takes it there
            // resumes it (once, whichever node held it).
            let take = ToBridge::TakeSession {
                user: user.clone(),
                session,
                asker: Some((conn, gather)),
            };
            self.send_bridge(take, now, tx);
            self.maintain_user(&user, now, tx);
            return;
        }
        let channels = here.map(|d| d.channels);
        let g = Gathered {
            gather,
            part: GatherPart::Resume(channels),
        };
        self.route(conn.shard, MeshMsg::Gathered(Box::new(g)), now, tx);
    }

    /// A dropped connection that may be resumed: its channels are kept for
    /// `resume_window_ms` (in a cluster, in Redis too, for any node).
    pub(super) fn detach_session(
        &mut self,
        user: &Arc<str>,
        session: SessionId,
        channels: ResumePoints,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let window = self.s.resume_window_ms;
        let kept = self.cluster_up();
        if kept {
            let keep = ToBridge::KeepSession {
                user: user.clone(),
                session,
                points: channels.clone(),
                ttl_ms: window,
            };
            self.send_bridge(keep, now, tx);
        }
        self.user(user).more().detached.push(Detached {
            session,
            channels,
            until: now + window,
            kept,
        });
        self.wake_user(user, now + window);
    }

    pub(super) fn on_session_resume(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        r: SessionResume,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Ok(session) = r.session_id.parse::<SessionId>() else {
            return self.error(
                id,
                ack,
                ErrorCode::BadRequest,
                "`sessionId` must be 32 hex digits",
            );
        };
        let lookup = GatherKind::ResumeLookup {
            session,
            positions: r.positions,
            recovery: None,
        };
        self.look_up_session(id, ack, session, lookup, now, tx);
    }

    /// Asks the user's home for a dropped session's channels; the answer
    /// comes back to gather `lookup` (see `gather`).
    pub(super) fn look_up_session(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        session: SessionId,
        lookup: GatherKind,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(member) = self.conn(id).map(|c| c.member.clone()) else {
            return;
        };
        let gather = self.next_id();
        let g = Gather {
            conn: id,
            ack,
            waiting: 1,
            kind: lookup,
        };
        self.gathers.insert(gather, g);
        let from = Some((self.here(id), member.protocol));
        let cmd = UserCmd::Resume { session, gather };
        self.send_user_op(member.user, from, None, cmd, now, tx);
    }
}
