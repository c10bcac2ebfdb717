//! Typing indicators, on the channel's owner: who types, told once to
//! the others, stopped by itself after `typing_timeout_ms`.
//!
//! Handlers are named after their event: `on_<event>` on the member's
//! connection's shard (checks, then the request goes on), and after the
//! event again on the shard that carries it out.

use super::*;

impl<O: Outbound> Engine<O> {
    /// `typing:start`, on the channel's owner: the others hear it once,
    /// and it stops by itself after `typing_timeout_ms`.
    pub(super) fn typing_start(&mut self, req: ChanReq, now: u64, tx: &mut impl MeshTx) {
        let (channel, from, member, ack) = req.parts();
        let reply = Reply::to(from, member.protocol, ack);
        let Some(owned) = self.owned.get_mut(&channel) else {
            return;
        };
        let until = now + self.s.typing_timeout_ms;
        let new = match owned.typing.iter_mut().find(|t| t.user == member.user) {
            Some(t) => {
                // Still typing: a later expiry, no new broadcast.
                t.until = until;
                t.conn = from;
                false
            }
            None => {
                owned.typing.push(Typing {
                    user: member.user.clone(),
                    conn: from,
                    until,
                });
                true
            }
        };
        self.timers.at(
            until,
            Timer::Typing {
                channel: channel.clone(),
            },
        );
        if new {
            self.typing_event(&channel, &member.user, true, now, tx);
        }
        self.send_reply(reply, empty_ack(ack), now, tx);
    }

    /// `typing:stop`, on the channel's owner.
    pub(super) fn typing_stop(&mut self, req: ChanReq, now: u64, tx: &mut impl MeshTx) {
        let (channel, from, member, ack) = req.parts();
        let reply = Reply::to(from, member.protocol, ack);
        let Some(owned) = self.owned.get_mut(&channel) else {
            return;
        };
        let was = owned
            .typing
            .iter()
            .position(|t| t.user == member.user)
            .map(|i| owned.typing.remove(i));
        if was.is_some() {
            self.typing_event(&channel, &member.user, false, now, tx);
        }
        self.send_reply(reply, empty_ack(ack), now, tx);
    }

    /// `typing:get_active`: who types in the channel, on every node.
    pub(super) fn typing_active(&mut self, req: ChanReq, now: u64, tx: &mut impl MeshTx) {
        self.channel_query(req, ChannelPart::Typing(Vec::new()), now, tx);
    }

    pub(super) fn typing_event(
        &mut self,
        channel: &Arc<str>,
        user: &Arc<str>,
        start: bool,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let e = TypingEvent {
            channel_id: channel.to_string(),
            user_id: user.to_string(),
        };
        let event = ev(if start {
            ServerEvent::TypingUserStart(e)
        } else {
            ServerEvent::TypingUserStop(e)
        });
        self.fan_out(channel, &event, Some(user), now, tx);
    }

    pub(super) fn expire_typing(&mut self, channel: &Arc<str>, now: u64, tx: &mut impl MeshTx) {
        let Some(owned) = self.owned.get_mut(channel) else {
            return;
        };
        let mut expired = Vec::new();
        owned.typing.retain(|t| {
            if t.until <= now {
                expired.push(t.user.clone());
                false
            } else {
                true
            }
        });
        for user in expired {
            self.typing_event(channel, &user, false, now, tx);
        }
    }

    /// `typing:start` from a member, to the channel's owner.
    pub(super) fn on_typing_start(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        c: ChannelRef,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.channel_op(id, ack, &c.channel_id, ChanCmd::TypingStart, now, tx)
    }

    /// `typing:stop` from a member, to the channel's owner.
    pub(super) fn on_typing_stop(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        c: ChannelRef,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.channel_op(id, ack, &c.channel_id, ChanCmd::TypingStop, now, tx)
    }

    /// `typing:get_active` from a member, to the channel's owner.
    pub(super) fn on_typing_get_active(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        c: ChannelRef,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.channel_op(id, ack, &c.channel_id, ChanCmd::TypingActive, now, tx)
    }
}
