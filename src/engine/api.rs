//! Requests of the server API (the application backend), carried out on
//! the shard in charge and answered like a client's requests.

use std::sync::Arc;

use super::moderation::MAX_REASON_CHARS;
use super::*;

/// Longest notification `data`, in bytes of JSON.
pub const MAX_NOTIFICATION_DATA: usize = 32 * 1024;

impl<O: Outbound> Engine<O> {
    /// A request of the server API, on the shard in charge of it.
    pub(super) fn on_api(&mut self, call: ApiCall, now: u64, tx: &mut impl MeshTx) {
        let ApiCall { from, id, op } = call;
        let ack = Some(id);
        match op {
            ApiOp::Publish { user, send, meta } => {
                self.api_publish(from, ack, user, send, meta, now, tx)
            }
            ApiOp::Notify { user, kind, data } => {
                self.api_notify(from, ack, user, kind, data, now, tx)
            }
            ApiOp::Moderate(m) => self.api_moderate(from, ack, m, now, tx),
            ApiOp::Members { channel } => self.api_members(from, ack, channel, now, tx),
            ApiOp::Emit { name, to, data } => self.api_emit(from, ack, name, to, data, now, tx),
            ApiOp::Subscribe {
                user,
                channel,
                join,
            } => self.api_subscribe(from, ack, user, channel, join, now, tx),
        }
    }

    /// `POST /api/publish`: a message from `user`, checked as a client's,
    /// sequenced and kept like any other, with the backend's `meta`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn api_publish(
        &mut self,
        from: ConnRef,
        ack: Option<u64>,
        user: String,
        send: MessageSend,
        meta: Option<Json>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let answer = |e: &mut Self, msg: ServerMessage, tx: &mut _| {
            e.send_to(from, Protocol::Json, &msg, now, tx)
        };
        let bad = |e: String| (ErrorCode::BadRequest, e);
        let refuse = |e: &mut Self, (code, m): (ErrorCode, String), tx: &mut _| {
            answer(e, err(ack, code, m), tx)
        };
        let checked = check_id("userId", &user)
            .and_then(|_| self.check_channel_id(&send.channel_id))
            .map_err(bad)
            .and_then(|_| self.check_content("content", &send.content))
            .and_then(|_| check_send_ids(&send))
            .and_then(|_| check_meta(meta.as_ref()));
        if let Err(e) = checked {
            return refuse(self, e, tx);
        }
        let channel: Arc<str> = send.channel_id.as_str().into();
        self.ensure_owned(&channel, now, tx);
        let p = Publish {
            channel: channel.clone(),
            from,
            member: Member {
                user: user.into(),
                session: SessionId(0, 0),
                protocol: Protocol::Json,
            },
            ack,
            send,
            meta,
        };
        self.message_send(p, now, tx);
        // Without members the channel still keeps the message for
        // as long as its history lasts.
        self.channel_gc(&channel, now, tx);
    }

    /// `POST /api/notify`: a notification, delivered now or kept.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn api_notify(
        &mut self,
        from: ConnRef,
        ack: Option<u64>,
        user: String,
        kind: String,
        data: Option<Json>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let answer = |e: &mut Self, msg: ServerMessage, tx: &mut _| {
            e.send_to(from, Protocol::Json, &msg, now, tx)
        };
        let bad = |e: String| (ErrorCode::BadRequest, e);
        let too_large = |e: String| (ErrorCode::TooLarge, e);
        let refuse = |e: &mut Self, (code, m): (ErrorCode, String), tx: &mut _| {
            answer(e, err(ack, code, m), tx)
        };
        let checked = check_id("userId", &user)
            .and_then(|_| check_id("kind", &kind))
            .map_err(bad)
            .and_then(|_| match &data {
                Some(d) if d.0.len() > MAX_NOTIFICATION_DATA => Err(too_large(format!(
                    "`data` is larger than {MAX_NOTIFICATION_DATA} bytes"
                ))),
                _ => Ok(()),
            });
        if let Err(e) = checked {
            return refuse(self, e, tx);
        }
        match self.notify(&user.into(), kind, data, None, now, tx) {
            Ok(n) => {
                let body = AckBody::Notifications(NotificationsAck {
                    notifications: vec![n],
                });
                answer(self, ack_of(ack, body), tx);
            }
            Err(_) => {
                let e = (
                        ErrorCode::RateLimited,
                        "the node keeps as many notifications as max_stored_notifications allows: delivered to devices online, not kept".to_string(),
                    );
                refuse(self, e, tx);
            }
        }
    }

    /// `POST /api/kick`, `/api/ban`, `/api/unban`.
    pub(super) fn api_moderate(
        &mut self,
        from: ConnRef,
        ack: Option<u64>,
        mut m: Moderation,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let answer = |e: &mut Self, msg: ServerMessage, tx: &mut _| {
            e.send_to(from, Protocol::Json, &msg, now, tx)
        };
        let bad = |e: String| (ErrorCode::BadRequest, e);
        let too_large = |e: String| (ErrorCode::TooLarge, e);
        let refuse = |e: &mut Self, (code, m): (ErrorCode, String), tx: &mut _| {
            answer(e, err(ack, code, m), tx)
        };
        let checked = check_id("userId", &m.user)
            .and_then(|_| match &m.channel {
                Some(c) => self.check_channel_id(c),
                None => Ok(()),
            })
            .and_then(|_| check_id("by", &m.by))
            .map_err(bad)
            .and_then(|_| match &m.reason {
                Some(r) if r.chars().count() > MAX_REASON_CHARS => Err(too_large(format!(
                    "`reason` is longer than {MAX_REASON_CHARS} characters"
                ))),
                _ => Ok(()),
            });
        if let Err(e) = checked {
            return refuse(self, e, tx);
        }
        m.from = Some((from, Protocol::Json));
        m.ack = ack;
        m.at = now;
        self.moderate(m, now, tx);
    }

    /// `GET /api/channels/{id}/members`.
    pub(super) fn api_members(
        &mut self,
        from: ConnRef,
        ack: Option<u64>,
        channel: String,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let answer = |e: &mut Self, msg: ServerMessage, tx: &mut _| {
            e.send_to(from, Protocol::Json, &msg, now, tx)
        };
        let bad = |e: String| (ErrorCode::BadRequest, e);
        let refuse = |e: &mut Self, (code, m): (ErrorCode, String), tx: &mut _| {
            answer(e, err(ack, code, m), tx)
        };
        if let Err(e) = self.check_channel_id(&channel) {
            return refuse(self, bad(e), tx);
        }
        if !self.owned.contains_key(channel.as_str()) && self.cluster_up() {
            // None here; other nodes may have some.
            let reply = Reply {
                to: from,
                protocol: Protocol::Json,
                id: ack,
            };
            let part = ChannelPart::Members(Vec::new());
            return self.channel_answer(&channel.as_str().into(), part, reply, now, tx);
        }
        if !self.owned.contains_key(channel.as_str()) {
            // A channel nobody is in has no members.
            let body = AckBody::Members(MembersAck {
                channel_id: channel,
                members: Vec::new(),
            });
            return answer(self, ack_of(ack, body), tx);
        }
        let op = ChannelOp {
            channel: channel.as_str().into(),
            from,
            member: Member {
                user: "".into(),
                session: SessionId(0, 0),
                protocol: Protocol::Json,
            },
            ack,
            op: ChanCmd::Members,
        };
        self.on_channel_op(op, now, tx);
    }
}

/// Largest `meta` of a message, in bytes of compact JSON.
pub const MAX_META_BYTES: usize = 4096;

/// A message's `meta`, from the application backend: a JSON object of at
/// most [`MAX_META_BYTES`].
pub(super) fn check_meta(meta: Option<&Json>) -> Result<(), (ErrorCode, String)> {
    let Some(m) = meta else {
        return Ok(());
    };
    if !m.0.starts_with('{') {
        return Err((ErrorCode::BadRequest, "`meta` must be a JSON object".into()));
    }
    if m.0.len() > MAX_META_BYTES {
        return Err((
            ErrorCode::TooLarge,
            format!("`meta` is larger than {MAX_META_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// The ids and mentions of a message, checked as for a client.
pub(super) fn check_send_ids(m: &MessageSend) -> Result<(), (ErrorCode, String)> {
    let ids = [
        ("replyTo", m.reply_to.as_deref()),
        ("threadId", m.thread_id.as_deref()),
        ("nonce", m.nonce.as_deref()),
    ];
    for (field, v) in ids {
        if let Some(Err(e)) = v.map(|v| check_id(field, v)) {
            return Err((ErrorCode::BadRequest, e));
        }
    }
    if m.mentions.len() > MAX_MENTIONS {
        return Err((
            ErrorCode::TooLarge,
            format!("at most {MAX_MENTIONS} `mentions`"),
        ));
    }
    m.mentions
        .iter()
        .try_for_each(|u| check_id("mentions", u))
        .map_err(|e| (ErrorCode::BadRequest, e))
}
