//! A channel's members: the list, on every node.

use super::*;

impl<O: Outbound> Engine<O> {
    /// `channel:get_members`: every member, on every node.
    pub(super) fn channel_members(&mut self, req: ChanReq, now: u64, tx: &mut impl MeshTx) {
        let ChanReq {
            channel,
            from,
            member,
            ack,
        } = req;
        let reply = Reply {
            to: from,
            protocol: member.protocol,
            id: ack,
        };
        let part = self.local_part(&channel, ChannelPart::Members(Vec::new()));
        self.channel_answer(&channel, part, reply, now, tx);
    }
}
