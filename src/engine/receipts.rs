//! Delivery and read receipts: on the channel's owner, which knows who
//! read what, and on the author's home, whose devices hear of it.

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
        let UserReq { user, .. } = r;
        self.tell_other_nodes(&user, ServerEvent::MessageDelivery(d.clone()), now, tx);
        self.send_devices(&user, ServerEvent::MessageDelivery(d), None, now, tx);
    }
}
