//! Server-side subscriptions: the application backend joins a user's
//! connections to a channel, or takes them out of it (`POST
//! /api/subscribe`, `POST /api/unsubscribe`), on every node where the user
//! is connected. Each connection hears it as `channel:joined` (the join's
//! answer, as an event) or `channel:left`; the channel's members see the
//! usual member events. The backend decides: the token's grants do not
//! apply (bans do).
//!
//! The request goes to the user's home shard, which sends each of the
//! user's connections here a [`ServerJoin`] (and the other nodes, in a
//! cluster, the same request through the user's pub/sub channel); the
//! connection's shard then joins or leaves as for the client's own
//! `channel:join` and `channel:leave`.

use super::*;

/// The mark of a join the server made (where a resumed session's joins
/// carry their gather): its answer is `channel:joined`, not an ack. No
/// gather has this id.
pub(super) const SERVER_JOIN: u64 = u64::MAX;

/// To a connection's shard: join it to `channel`, or take it out.
#[derive(Debug)]
pub struct ServerJoin {
    pub conn: ConnId,
    pub channel: Arc<str>,
    pub join: bool,
}

impl<O: Outbound> Engine<O> {
    /// `POST /api/subscribe` (`join`) or `/api/unsubscribe`, on the user's
    /// home.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn api_subscribe(
        &mut self,
        from: ConnRef,
        ack: Option<u64>,
        user: String,
        channel: String,
        join: bool,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let checked = check_id("userId", &user).and_then(|_| self.check_channel_id(&channel));
        if let Err(why) = checked {
            let e = err(ack, ErrorCode::BadRequest, why);
            return self.send_to(from, Protocol::Json, &e, now, tx);
        }
        let user: Arc<str> = user.into();
        let channel: Arc<str> = channel.into();
        if self.cluster_up() {
            let (user, channel) = (user.clone(), channel.clone());
            self.send_bridge(
                ToBridge::Subscribe {
                    user,
                    channel,
                    join,
                },
                now,
                tx,
            );
        }
        self.subscribe_devices(&user, &channel, join, now, tx);
        let done = ack_of(ack, AckBody::Empty(Empty {}));
        self.send_to(from, Protocol::Json, &done, now, tx);
    }

    /// On the user's home: each of its connections here joins or leaves.
    pub(super) fn subscribe_devices(
        &mut self,
        user: &Arc<str>,
        channel: &Arc<str>,
        join: bool,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(st) = self.users.get(user) else {
            return;
        };
        let devices: Vec<ConnRef> = st.devices.iter().map(|d| d.conn).collect();
        for d in devices {
            let msg = ServerJoin {
                conn: d.conn,
                channel: channel.clone(),
                join,
            };
            self.route(d.shard, MeshMsg::ServerJoin(Box::new(msg)), now, tx);
        }
    }

    /// On the connection's shard: the join or the leave, unless it is
    /// already so.
    pub(super) fn on_server_join(&mut self, j: ServerJoin, now: u64, tx: &mut impl MeshTx) {
        let Some(conn) = self.conn(j.conn) else {
            return;
        };
        let in_it = conn.channels().iter().any(|(c, _)| **c == *j.channel);
        match (j.join, in_it) {
            (true, false) => {
                let join = ChannelJoin {
                    channel_id: j.channel.to_string(),
                    since: None,
                    token: None,
                };
                self.on_channel_join(j.conn, None, join, Some(SERVER_JOIN), now, tx);
            }
            (false, true) => {
                self.leave(j.conn, &j.channel, now, tx);
                let left = ServerEvent::ChannelLeft(ChannelRef {
                    channel_id: j.channel.to_string(),
                });
                self.reply(j.conn, &ev(left));
            }
            _ => {}
        }
    }
}
