//! Answers assembled from several shards: presence of many users, and a
//! resumed session's joins.

use std::sync::Arc;

use crate::protocol::socketio;

use super::*;

impl<O: Outbound> Engine<O> {
    pub(super) fn on_gathered(&mut self, g: Gathered, now: u64, tx: &mut impl MeshTx) {
        let Some(mut gather) = self.gathers.remove(&g.gather) else {
            return;
        };
        match (&mut gather.kind, g.part) {
            (GatherKind::Presences { got, .. }, GatherPart::Presences(views)) => {
                got.extend(views);
                gather.waiting -= 1;
                if gather.waiting > 0 {
                    self.gathers.insert(g.gather, gather);
                    return;
                }
                let GatherKind::Presences { order, mut got } = gather.kind else {
                    unreachable!("matched above")
                };
                got.sort_by_key(|v| order.iter().position(|o| **o == *v.user_id));
                let body = AckBody::Presences(PresencesAck { presences: got });
                self.reply(gather.conn, &ack_of(gather.ack, body));
            }
            (
                GatherKind::ResumeLookup {
                    session,
                    positions,
                    recovery,
                },
                GatherPart::Resume(found),
            ) => {
                let (session, mut positions) = (*session, std::mem::take(positions));
                let recovery = recovery.take();
                let id = gather.conn;
                let Some(points) = found else {
                    if let Some(r) = recovery {
                        return self.not_recovered(id, *r);
                    }
                    return self.error(
                        id,
                        gather.ack,
                        ErrorCode::NotFound,
                        format!("session `{session}` cannot be resumed (unknown, expired or already resumed)"),
                    );
                };
                // A Socket.IO reconnection: its positions from its offset.
                let recovery = match recovery {
                    None => None,
                    Some(r) => {
                        let found = match r.last.as_deref() {
                            None => recovery::positions(&points, None),
                            Some(last) => socketio::recovery_offset(last)
                                .and_then(|at| recovery::positions(&points, Some(at))),
                        };
                        let Some(p) = found else {
                            return self.not_recovered(id, *r);
                        };
                        positions = p;
                        Some(r)
                    }
                };
                let max = self.s.max_channels_per_connection;
                let Some(conn) = self.conn_mut(id) else {
                    return;
                };
                let kept = points.channels.len();
                // Channels the new connection's token does not grant are
                // left out (a subscription token is needed again).
                let joins: Vec<(Arc<str>, Since)> = points
                    .channels
                    .into_iter()
                    .filter(|(c, ..)| !conn.channels().iter().any(|(j, _)| j == c))
                    .filter(|(c, ..)| conn.granted(c))
                    .take(max.saturating_sub(conn.channels().len()))
                    .map(|(channel, offset, epoch)| {
                        let since = match positions.iter().find(|p| *p.channel_id == *channel) {
                            Some(p) => Since {
                                offset: p.offset,
                                epoch: p.epoch.clone(),
                            },
                            None => Since {
                                offset,
                                epoch: epoch.to_string(),
                            },
                        };
                        (channel, since)
                    })
                    .collect();
                let recovery = match recovery {
                    // Socket.IO's recovery is of the whole session or none.
                    Some(r) if joins.len() < kept => return self.not_recovered(id, *r),
                    Some(mut r) => {
                        r.expected = joins.len();
                        Some(r)
                    }
                    None => None,
                };
                // The connection takes over the session.
                if let Some(conn) = self.conn_mut(id) {
                    conn.member.session = session;
                }
                gather.waiting = joins.len();
                gather.kind = GatherKind::ResumeJoins {
                    session,
                    channels: Vec::new(),
                    recovery,
                };
                let done = joins.is_empty();
                self.gathers.insert(g.gather, gather);
                if done {
                    return self.finish_resume(g.gather, now, tx);
                }
                for (channel, since) in joins {
                    let j = ChannelJoin {
                        channel_id: channel.to_string(),
                        since: Some(since),
                        token: None,
                    };
                    let sent = self.on_channel_join(id, None, j, Some(g.gather), now, tx);
                    if !sent {
                        self.resumed_join_gone(g.gather, now, tx);
                    }
                }
            }
            _ => {}
        }
    }

    pub(super) fn resumed_join(
        &mut self,
        gather: u64,
        joined: JoinAck,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(g) = self.gathers.get_mut(&gather) else {
            return;
        };
        if let GatherKind::ResumeJoins { channels, .. } = &mut g.kind {
            channels.push(ResumedChannel {
                channel_id: joined.channel_id,
                recovered: joined.recovered.unwrap_or(false),
                offset: joined.offset,
                epoch: joined.epoch,
            });
        }
        self.resumed_join_gone(gather, now, tx);
    }

    /// One answer less to wait for: a rejoined channel's came back, or the
    /// channel was left before it did.
    pub(super) fn resumed_join_gone(&mut self, gather: u64, now: u64, tx: &mut impl MeshTx) {
        let Some(g) = self.gathers.get_mut(&gather) else {
            return;
        };
        g.waiting = g.waiting.saturating_sub(1);
        if g.waiting == 0 {
            self.finish_resume(gather, now, tx);
        }
    }

    pub(super) fn finish_resume(&mut self, gather: u64, now: u64, tx: &mut impl MeshTx) {
        let Some(g) = self.gathers.remove(&gather) else {
            return;
        };
        if let GatherKind::ResumeJoins {
            session,
            channels,
            recovery: Some(r),
        } = g.kind
        {
            return self.finish_recovery(g.conn, session, &channels, *r, now, tx);
        }
        if let GatherKind::ResumeJoins {
            session, channels, ..
        } = g.kind
        {
            let body = AckBody::Resume(ResumeAck {
                session_id: session.to_string(),
                channels,
            });
            self.reply(g.conn, &ack_of(g.ack, body));
        }
    }

    /// Every node's part of a channel query (members, typing, voice,
    /// readers, mentions).
    pub(super) fn on_channel_answer(
        &mut self,
        channel: Arc<str>,
        parts: Vec<ChannelPart>,
        then: QueryThen,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(all) = ChannelPart::merge(parts) else {
            return;
        };
        match then {
            QueryThen::Reply(reply) => {
                let msg = ack_of(reply.id, all.into_body(&channel));
                self.send_to(reply.to, reply.protocol, &msg, now, tx);
            }
            QueryThen::Mentions(m) => {
                let ChannelPart::Members(members) = all else {
                    return;
                };
                let absent = m
                    .mentions
                    .iter()
                    .filter(|u| **u != m.user_id && !members.iter().any(|x| x.user_id == **u))
                    .map(|u| Arc::from(u.as_str()))
                    .collect();
                self.notify_absent(&channel, &m, absent, now, tx);
            }
        }
    }

    /// Another node asks this node's part of a channel query.
    pub(super) fn on_part_wanted(
        &mut self,
        channel: Arc<str>,
        like: ChannelPart,
        origin: u64,
        token: u64,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let part = self.local_part(&channel, like);
        let msg = ToBridge::ChannelPart {
            channel,
            part,
            origin,
            token,
        };
        self.send_bridge(msg, now, tx);
    }

    /// A query of a channel's state on every node (`like` says which part:
    /// members, typing, voice): this shard's part, then the other nodes'.
    pub(super) fn channel_query(
        &mut self,
        req: ChanReq,
        like: ChannelPart,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (channel, from, member, ack) = req.parts();
        let reply = Reply::to(from, member.protocol, ack);
        let part = self.local_part(&channel, like);
        self.channel_answer(&channel, part, reply, now, tx);
    }
}
