//! A channel's owner shard: the routing table of what members ask of a
//! channel (each request's handler is in its feature's file), sequencing
//! and fan-out, and the channel's life (made when first needed, dropped
//! when nothing is left in it).

use std::sync::Arc;

use super::moderation::banned_message;
use super::*;
use crate::protocol::socketio::Seq;

/// Why a message is refused while the cluster is out of reach.
pub(super) const FULL_ALONE: &str = "the cluster's Redis is out of reach and this channel holds as many messages as it can hand to the other nodes when it is back (history_size): try again later";

impl<O: Outbound> Engine<O> {
    /// Whether the cluster sequences an owned channel (a single node does
    /// not look the channel up for it).
    fn clustered(&self, channel: &str) -> bool {
        self.cluster.is_some() && self.owned.get(channel).is_some_and(|o| o.clustered())
    }

    /// Sends an unsequenced event to every shard with members of an owned
    /// channel, and to the other nodes' members when the cluster follows it.
    pub(super) fn fan_out(
        &mut self,
        channel: &Arc<str>,
        msg: &ServerMessage,
        except: Option<&Arc<str>>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.relay_and_deliver(channel, msg, except, None, now, tx);
    }

    /// `fan_out` for an event that several nodes may send (a moderation
    /// event: each node that acts on it does): every member gets it once.
    pub(super) fn fan_out_once(
        &mut self,
        channel: &Arc<str>,
        msg: &ServerMessage,
        except: Option<&Arc<str>>,
        once: u64,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if self
            .owned
            .get_mut(channel)
            .is_some_and(|o| o.first_time(once))
        {
            self.relay_and_deliver(channel, msg, except, Some(once), now, tx);
        }
    }

    fn relay_and_deliver(
        &mut self,
        channel: &Arc<str>,
        msg: &ServerMessage,
        except: Option<&Arc<str>>,
        once: Option<u64>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if self.clustered(channel) {
            let out = Outgoing {
                channel: channel.clone(),
                msg: msg.clone(),
                except: except.cloned(),
                reply: None,
                duplicate: false,
                epoch: None,
                handed_over: None,
                once,
            };
            self.send_bridge(ToBridge::Relay(Box::new(out)), now, tx);
        }
        self.fan_out_local(channel, msg, 0, except, now, tx);
    }

    /// Sends one event to every shard of this node with members of an
    /// owned channel; returns its frames (none: the channel is not owned).
    pub(super) fn fan_out_local(
        &mut self,
        channel: &Arc<str>,
        msg: &ServerMessage,
        offset: u64,
        except: Option<&Arc<str>>,
        now: u64,
        tx: &mut impl MeshTx,
    ) -> Option<Arc<Frames>> {
        let owned = self.owned.get(channel)?;
        // Socket.IO frames of a sequenced event carry its recovery offset.
        let at = (offset > 0).then(|| Seq {
            channel,
            offset,
            epoch: &owned.epoch,
        });
        let frames = Arc::new(Frames::encode_at(msg, owned.protocols(), at));
        for shard in owned.member_shards() {
            let d = match except {
                None => MeshMsg::Deliver {
                    channel: channel.clone(),
                    frames: frames.clone(),
                    offset,
                },
                Some(u) => MeshMsg::DeliverExcept(Box::new(DeliverExcept {
                    channel: channel.clone(),
                    frames: frames.clone(),
                    except: u.clone(),
                })),
            };
            self.route(shard, d, now, tx);
        }
        Some(frames)
    }

    /// Sequences an event of an owned channel: answers its sender
    /// (`reply`), fans it out and logs it. When the cluster follows the
    /// channel, Redis orders it instead, and it is applied here when it
    /// comes back (see `cluster`).
    pub(super) fn sequence(
        &mut self,
        channel: &Arc<str>,
        offset: u64,
        msg: ServerMessage,
        reply: Option<Reply>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if self.clustered(channel) {
            let out = Outgoing {
                channel: channel.clone(),
                msg,
                except: None,
                reply,
                duplicate: false,
                epoch: None,
                handed_over: None,
                once: None,
            };
            return self.send_bridge(ToBridge::Sequence(Box::new(out)), now, tx);
        }
        if let Some(r) = reply {
            if let Some(ack) = cluster::ack_for(&msg, r.id, false) {
                self.send_to(r.to, r.protocol, &ack, now, tx);
            }
        }
        if self.cluster.is_some() && matches!(msg.event, ServerEvent::MessageNew(_)) {
            // Handed over to the other nodes once the cluster is back.
            if let Some(o) = self.owned.get_mut(channel) {
                o.sequenced_alone();
            }
        }
        let frames = self.fan_out_local(channel, &msg, offset, None, now, tx);
        let json = frames.as_ref().and_then(|f| f.json.clone());
        self.keep_history(channel, offset, &msg, json.as_deref(), now, tx);
        let s = &self.s;
        if let (Some(o), Some(frames)) = (self.owned.get_mut(channel), frames) {
            o.apply(&msg, now, s);
            o.log(offset, now, msg, &frames, s);
        }
    }

    /// Creates the owned state of a channel (a new epoch) if this shard
    /// does not hold it.
    pub(super) fn ensure_owned(&mut self, channel: &Arc<str>, now: u64, tx: &mut impl MeshTx) {
        if !self.owned.contains_key(channel) {
            let epoch = self.next_epoch();
            self.owned
                .insert(channel.clone(), Owned::new(epoch, self.shards as usize));
            self.metrics.channels.set(self.owned.len() as u64);
            self.attach(channel, now, tx);
        }
    }

    /// Drops an owned channel without members once nothing is left to ask
    /// of it, or files a check for when its history runs out.
    pub(super) fn channel_gc(&mut self, channel: &Arc<str>, now: u64, tx: &mut impl MeshTx) {
        let s = &self.s;
        let Some(owned) = self.owned.get_mut(channel) else {
            return;
        };
        if owned.total() > 0 {
            return;
        }
        owned.trim(now, s);
        owned.typing.clear();
        match &owned.link {
            Link::Attaching(waiting) if !waiting.is_empty() => return,
            Link::Local => {}
            // The cluster keeps the history: without members here, the
            // channel is no longer followed (once what it sequenced alone
            // is handed over).
            _ if owned.voice.is_empty() && owned.handover.is_empty() => {
                self.owned.remove(channel);
                self.metrics.channels.set(self.owned.len() as u64);
                let channel = channel.clone();
                return self.send_bridge(ToBridge::Detach { channel }, now, tx);
            }
            _ => return,
        }
        if owned.is_idle() {
            self.owned.remove(channel);
            self.metrics.channels.set(self.owned.len() as u64);
        } else if let Some(at) = owned.history_expires(s) {
            self.timers.at(
                at + 1,
                Timer::ChannelGc {
                    channel: channel.clone(),
                },
            );
        }
    }

    /// What a channel's owner does, by request: each has its handler in
    /// the feature's file.
    pub(super) fn on_channel_op(&mut self, op: ChannelOp, now: u64, tx: &mut impl MeshTx) {
        let ChannelOp {
            channel,
            from,
            member,
            ack,
            op,
        } = op;
        let reply_to = |e: &mut Self, msg: ServerMessage, tx: &mut _| {
            e.send_to(from, member.protocol, &msg, now, tx)
        };
        // Voice works without text membership; everything else needs the
        // channel (the member's shard checked that it joined).
        if let ChanCmd::VoiceJoin { seq } = op {
            if let Some(ban) = self.bans.channel(&member.user, &channel, now) {
                let e = err(ack, ErrorCode::Forbidden, banned_message(ban));
                let gone = UserCmd::VoiceGone {
                    channel: channel.clone(),
                    seq,
                };
                self.send_user_op(member.user.clone(), None, None, gone, now, tx);
                return reply_to(self, e, tx);
            }
            self.ensure_owned(&channel, now, tx);
        }
        if !self.owned.contains_key(&channel) {
            let msg = match op {
                ChanCmd::VoiceParticipants if self.cluster_up() => {
                    // None here; other nodes may have some.
                    let reply = Reply::to(from, member.protocol, ack);
                    let part = ChannelPart::Voice(Vec::new());
                    return self.channel_answer(&channel, part, reply, now, tx);
                }
                ChanCmd::VoiceParticipants => ack_of(
                    ack,
                    AckBody::Voice(VoiceAck {
                        channel_id: channel.to_string(),
                        participants: vec![],
                        token: None,
                        server_url: None,
                    }),
                ),
                ChanCmd::VoiceLeave => empty_ack(ack),
                _ => err(ack, ErrorCode::NotFound, format!("no channel `{channel}`")),
            };
            return reply_to(self, msg, tx);
        }
        let req = ChanReq {
            channel,
            from,
            member,
            ack,
        };
        match op {
            ChanCmd::Edit {
                message_id,
                content,
            } => self.message_edit(req, message_id, content, now, tx),
            ChanCmd::Delete {
                message_id,
                moderator,
            } => self.message_delete(req, message_id, moderator, now, tx),
            ChanCmd::React(r) => self.message_react(req, r, now, tx),
            ChanCmd::History(h) => self.message_history(req, h, now, tx),
            ChanCmd::Members => self.channel_members(req, now, tx),
            ChanCmd::TypingStart => self.typing_start(req, now, tx),
            ChanCmd::Custom { name, data } => self.custom_event(req, name, data, now, tx),
            ChanCmd::TypingStop => self.typing_stop(req, now, tx),
            ChanCmd::TypingActive => self.typing_active(req, now, tx),
            ChanCmd::Delivered { message_id } => self.message_delivered(req, message_id, now, tx),
            ChanCmd::MarkRead { message_id } => self.message_mark_read(req, message_id, now, tx),
            ChanCmd::ReadReceipts { message_id } => {
                self.message_read_receipts(req, message_id, now, tx)
            }
            ChanCmd::VoiceJoin { seq } => self.voice_join_owner(req, seq, now, tx),
            ChanCmd::VoiceLeave => self.voice_leave_owner(req, now, tx),
            ChanCmd::VoiceUpdate(u) => self.voice_update_owner(req, u, now, tx),
            ChanCmd::VoiceParticipants => self.voice_participants(req, now, tx),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn event_ack(
        &mut self,
        channel: &Arc<str>,
        from: ConnRef,
        member: &Member,
        ack: Option<u64>,
        message_id: &str,
        offset: u64,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let body = AckBody::Event(EventAck {
            channel_id: channel.to_string(),
            message_id: message_id.to_string(),
            offset,
        });
        self.send_to(from, member.protocol, &ack_of(ack, body), now, tx);
    }
}
