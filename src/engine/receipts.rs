//! Delivery and read receipts: on the channel's owner, which knows who
//! read what, and on the author's home, whose devices hear of it.
//!
//! Handlers are named after their event: `on_<event>` on the member's
//! connection's shard (checks, then the request goes on), and after the
//! event again on the shard that carries it out.

use super::event_stream::Extra;
use super::*;

impl<O: Outbound> Engine<O> {
    /// A message of this user was delivered: its author's devices hear it,
    /// on every node.
    pub(super) fn delivery_to_author(
        &mut self,
        r: UserReq,
        d: MessageDelivery,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (user, _, _) = r.parts();
        self.tell_other_nodes(&user, ServerEvent::MessageDelivery(d.clone()), now, tx);
        self.send_devices(&user, ServerEvent::MessageDelivery(d), None, now, tx);
    }

    /// `message:delivered`, on the channel's owner: the author's home hears
    /// it.
    pub(super) fn message_delivered(
        &mut self,
        req: ChanReq,
        message_id: String,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (channel, from, member, ack) = req.parts();
        let reply = Reply::to(from, member.protocol, ack);
        let Some(owned) = self.owned.get_mut(&channel) else {
            return;
        };
        let Some(m) = owned.find(&message_id) else {
            return self.send_reply(reply, not_in_history(ack, &message_id), now, tx);
        };
        let author: Arc<str> = m.msg.user_id.as_str().into();
        if author != member.user {
            let d = MessageDelivery {
                message_id,
                channel_id: channel.to_string(),
                user_id: member.user.to_string(),
                timestamp: now,
            };
            self.send_user_op(author, None, None, UserCmd::Delivery(d), now, tx);
        }
        self.send_reply(reply, empty_ack(ack), now, tx);
    }

    /// `message:mark_read`, on the channel's owner: the member's read
    /// marker moves forward, and the channel hears it.
    pub(super) fn message_mark_read(
        &mut self,
        req: ChanReq,
        message_id: String,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (channel, from, member, ack) = req.parts();
        let reply = Reply::to(from, member.protocol, ack);
        let Some(owned) = self.owned.get_mut(&channel) else {
            return;
        };
        let Some(offset) = owned.sequenced(&message_id) else {
            return self.send_reply(reply, not_in_history(ack, &message_id), now, tx);
        };
        if owned.mark_read(&member.user, offset, now) {
            let event = ev(ServerEvent::MessageReadReceipt(ReadReceipt {
                channel_id: channel.to_string(),
                user_id: member.user.to_string(),
                message_id,
                offset,
                timestamp: now,
            }));
            self.stream_extra(Extra::Receipts, Some(&channel), &event, now, tx);
            self.fan_out(&channel, &event, None, now, tx);
        }
        self.send_reply(reply, empty_ack(ack), now, tx);
    }

    /// `message:get_read_receipts`: who read a message, on every node.
    pub(super) fn message_read_receipts(
        &mut self,
        req: ChanReq,
        message_id: String,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (channel, from, member, ack) = req.parts();
        let reply = Reply::to(from, member.protocol, ack);
        let Some(owned) = self.owned.get_mut(&channel) else {
            return;
        };
        let Some(offset) = owned.sequenced(&message_id) else {
            return self.send_reply(reply, not_in_history(ack, &message_id), now, tx);
        };
        // Readers connected to other nodes are read there.
        let part = ChannelPart::Readers {
            epoch: owned.epoch.to_string(),
            offset,
            readers: owned.readers(offset),
        };
        self.channel_answer(&channel, part, reply, now, tx);
    }

    /// `message:delivered` from a member, to the channel's owner.
    pub(super) fn on_message_delivered(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        m: MessageRef,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.channel_op(
            id,
            ack,
            &m.channel_id,
            ChanCmd::Delivered {
                message_id: m.message_id,
            },
            now,
            tx,
        )
    }

    /// `message:mark_read` from a member, to the channel's owner.
    pub(super) fn on_message_mark_read(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        m: MessageRef,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.channel_op(
            id,
            ack,
            &m.channel_id,
            ChanCmd::MarkRead {
                message_id: m.message_id,
            },
            now,
            tx,
        )
    }

    /// `message:get_read_receipts` from a member, to the channel's owner.
    pub(super) fn on_message_get_read_receipts(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        m: MessageRef,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.channel_op(
            id,
            ack,
            &m.channel_id,
            ChanCmd::ReadReceipts {
                message_id: m.message_id,
            },
            now,
            tx,
        )
    }
}
