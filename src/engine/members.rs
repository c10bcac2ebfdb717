//! A channel's members, on its owner: joins and leaves, and the list on
//! every node.

use super::moderation::{banned_message, moderation_event, once_id};
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

impl<O: Outbound> Engine<O> {
    pub(super) fn on_join(&mut self, j: Join, now: u64, tx: &mut impl MeshTx) {
        let Join {
            channel,
            from,
            member,
            ack,
            since,
        } = j;
        if let Some(ban) = self.bans.channel(&member.user, &channel, now) {
            let refused = Some((ErrorCode::Forbidden, banned_message(ban)));
            let joined = MeshMsg::Joined(Box::new(Joined {
                channel,
                conn: from.conn,
                member,
                ack,
                offset: 0,
                epoch: "".into(),
                members: 0,
                recovered: None,
                replay: Vec::new(),
                refused,
            }));
            return self.route(from.shard, joined, now, tx);
        }
        self.ensure_owned(&channel, now, tx);
        if let Some(Link::Attaching(waiting)) = self.owned.get_mut(&channel).map(|o| &mut o.link) {
            // Answered once the cluster's state of the channel is here.
            waiting.push(Join {
                channel,
                from,
                member,
                ack,
                since,
            });
            return;
        }
        let event = ev(ServerEvent::MemberJoined(MemberEvent {
            channel_id: channel.to_string(),
            user_id: member.user.to_string(),
            session_id: member.session.to_string(),
        }));
        // Existing members hear of the join before the joiner's first delivery.
        self.fan_out(&channel, &event, None, now, tx);
        let owned = self.owned.get_mut(&channel).expect("owned above");
        owned.per_shard[from.shard as usize][proto_index(member.protocol)] += 1;
        owned.count_user(&member.user, 1);
        self.members_changed(&channel, now, tx);
        let owned = self.owned.get_mut(&channel).expect("owned above");
        let (recovered, replay) = match &since {
            None => (None, Vec::new()),
            Some(s) => match owned.replay(s, member.protocol) {
                Some(frames) => (Some(true), frames),
                None => (Some(false), Vec::new()),
            },
        };
        let joined = MeshMsg::Joined(Box::new(Joined {
            channel,
            conn: from.conn,
            member,
            ack,
            offset: owned.offset,
            epoch: owned.epoch.clone(),
            members: owned.cluster_total(),
            recovered,
            replay,
            refused: None,
        }));
        self.route(from.shard, joined, now, tx);
    }

    pub(super) fn on_leave(&mut self, l: Leave, now: u64, tx: &mut impl MeshTx) {
        let Leave {
            channel,
            from,
            member,
            moderation,
        } = l;
        let Some(owned) = self.owned.get_mut(&channel) else {
            return;
        };
        let count = &mut owned.per_shard[from.shard as usize][proto_index(member.protocol)];
        *count = count.saturating_sub(1);
        owned.count_user(&member.user, -1);
        let gone = !owned.users.contains_key(&member.user);
        self.members_changed(&channel, now, tx);
        if let (Some(m), true) = (moderation, gone) {
            // A server-wide kick or ban: each channel the user was in hears
            // of it once, when the user's last connection there leaves (on
            // any node: each may relay it, every node delivers it once).
            let event = moderation_event(&m, Some(&channel), true);
            self.fan_out_once(&channel, &event, None, once_id(&m), now, tx);
        }
        let Some(owned) = self.owned.get_mut(&channel) else {
            return;
        };
        let was_typing = owned
            .typing
            .iter()
            .position(|t| t.conn == from)
            .map(|i| owned.typing.remove(i));
        // Without members here, only other nodes' members could hear of it.
        let last = owned.total() == 0;
        if last && !owned.clustered() {
            return self.channel_gc(&channel, now, tx);
        }
        if let Some(t) = was_typing {
            self.typing_event(&channel, &t.user, false, now, tx);
        }
        let event = ev(ServerEvent::MemberLeft(MemberEvent {
            channel_id: channel.to_string(),
            user_id: member.user.to_string(),
            session_id: member.session.to_string(),
        }));
        self.fan_out(&channel, &event, None, now, tx);
        if last {
            self.channel_gc(&channel, now, tx);
        }
    }
}
