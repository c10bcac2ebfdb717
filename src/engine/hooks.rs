//! Hooks: questions the engine asks the application backend, without
//! ever waiting for the answer. The publish hook: a client's
//! `message:send` to a channel that `hooks.publish_channels` names is
//! shown to the backend before it is sequenced, and the backend allows it,
//! rejects it (the client gets `forbidden` with the backend's reason) or
//! rewrites its content. RPC: a client's `rpc` goes to the backend, and
//! its answer comes back in the ack.
//!
//! The question goes to the hooks endpoint of the mesh (`crate::hooks`,
//! which makes the HTTP calls) and waits here in a bounded table; the
//! shard goes on serving every other connection meanwhile. The asking
//! connection's later events wait behind it (held, in order), so that its
//! acks and effects keep the order it sent them in.

use std::collections::VecDeque;

use serde::Deserialize;

use super::*;

/// Events one connection may have waiting behind a hook; past it the
/// connection is closed (1008).
pub const MAX_HELD: usize = 64;

/// A question for the backend, to the hooks endpoint.
#[derive(Debug)]
pub struct HookCall {
    /// The shard to answer.
    pub from: ShardId,
    pub token: u64,
    pub kind: HookKind,
    /// The request's JSON body.
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    Publish,
    Rpc,
    /// A connection before it opens (asked by the IO shell: see
    /// `connect_hook`).
    Connect,
}

/// The backend's answer: the body of a 2xx, or why there is none.
#[derive(Debug)]
pub struct HookAnswer {
    pub token: u64,
    pub result: Result<Vec<u8>, String>,
}

/// What the publish hook decided.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum Verdict {
    Allow,
    Reject {
        #[serde(default)]
        reason: Option<String>,
    },
    /// A new content, new metadata (a JSON object), or both.
    Rewrite {
        #[serde(default)]
        content: Option<String>,
        #[serde(default)]
        meta: Option<Json>,
    },
}

impl Verdict {
    pub fn parse(body: &[u8]) -> Result<Verdict, String> {
        serde_json::from_slice(body).map_err(|e| {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
            format!("the publish hook's answer `{text}` is not a verdict: {e}")
        })
    }
}

/// What the backend answered an `rpc`: `data` for the ack, or an error
/// for the client.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RpcReply {
    #[serde(default)]
    data: Option<Box<serde_json::value::RawValue>>,
    #[serde(default)]
    error: Option<RpcError>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RpcError {
    /// One of the protocol's error codes (`bad_request` otherwise).
    #[serde(default)]
    code: Option<String>,
    message: String,
}

/// The client's answer to an `rpc` from the backend's reply.
pub fn rpc_answer(ack: Option<u64>, body: &[u8]) -> Result<ServerMessage, String> {
    let reply: RpcReply = serde_json::from_slice(body).map_err(|e| {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
        format!("the rpc answer `{text}` is neither {{\"data\":…}} nor {{\"error\":…}}: {e}")
    })?;
    match reply {
        RpcReply {
            error: Some(e),
            data: None,
        } => {
            let code = e
                .code
                .and_then(|c| serde_json::from_value(serde_json::Value::String(c)).ok())
                .unwrap_or(ErrorCode::BadRequest);
            Ok(err(ack, code, e.message))
        }
        RpcReply { error: None, data } => {
            let data = Json(data.map_or_else(|| "null".to_owned(), |d| d.get().to_owned()));
            Ok(ack_of(ack, AckBody::Rpc(RpcAck { data })))
        }
        RpcReply { .. } => Err("an rpc answer with both data and an error".into()),
    }
}

/// The body of an `rpc`'s request.
pub fn rpc_body(user: &str, call: &RpcCall) -> Vec<u8> {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Body<'a> {
        user_id: &'a str,
        #[serde(flatten)]
        call: &'a RpcCall,
    }
    serde_json::to_vec(&Body {
        user_id: user,
        call,
    })
    .expect("plain data")
}

/// The body of a publish hook's request.
pub fn publish_body(user: &str, send: &MessageSend) -> Vec<u8> {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Body<'a> {
        user_id: &'a str,
        #[serde(flatten)]
        send: &'a MessageSend,
    }
    serde_json::to_vec(&Body {
        user_id: user,
        send,
    })
    .expect("plain data")
}

/// A question waiting for its answer.
#[derive(Debug)]
struct Waiting {
    conn: ConnId,
    ack: Option<u64>,
    what: Asked,
}

#[derive(Debug)]
enum Asked {
    /// A message, for the publish hook.
    Publish {
        channel: Arc<str>,
        send: MessageSend,
    },
    Rpc,
}

/// The hooks' state on a shard.
#[derive(Debug, Default)]
pub struct Hooks {
    /// Where questions go (none: no hook is on).
    endpoint: Option<ShardId>,
    waiting: HashMap<u64, Waiting>,
    /// Connections with a question out, and the events they sent since.
    held: HashMap<ConnId, VecDeque<ClientMessage>>,
    next: u64,
}

impl Hooks {
    /// Questions waiting for an answer.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

impl<O: Outbound> Engine<O> {
    /// Questions go to mesh endpoint `endpoint`.
    pub fn set_hooks(&mut self, endpoint: ShardId) {
        self.hooks.endpoint = Some(endpoint);
    }

    /// Holds `msg` if its connection waits for a hook: it is handled when
    /// the answer came. `None`: held (or the connection was closed for
    /// holding too many).
    pub(super) fn hold(
        &mut self,
        id: ConnId,
        msg: ClientMessage,
        now: u64,
        tx: &mut impl MeshTx,
    ) -> Option<ClientMessage> {
        // Nothing held anywhere (always, without hooks): no lookup.
        if self.hooks.held.is_empty() {
            return Some(msg);
        }
        let Some(q) = self.hooks.held.get_mut(&id) else {
            return Some(msg);
        };
        if q.len() >= MAX_HELD {
            self.hooks.held.remove(&id);
            let why = "too many events waiting for the application backend";
            if let Some(conn) = self.conn_mut(id) {
                conn.out.close(crate::ws::close::POLICY_VIOLATION, why);
            }
            self.close_conn(id, None, false, now, tx);
            return None;
        }
        q.push_back(msg);
        None
    }

    /// Whether the publish hook asks about messages to `channel`.
    pub(super) fn publish_hooked(&self, channel: &str) -> bool {
        self.hooks.endpoint.is_some()
            && self
                .s
                .publish_hook
                .as_ref()
                .is_some_and(|p| p.matches(channel))
    }

    /// Asks the publish hook about a message; its connection's next
    /// events wait behind it.
    pub(super) fn ask_publish_hook(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        channel: Arc<str>,
        user: &str,
        send: MessageSend,
        tx: &mut impl MeshTx,
    ) {
        let body = publish_body(user, &send);
        let what = Asked::Publish { channel, send };
        self.ask(id, ack, HookKind::Publish, body, what, tx);
    }

    /// `rpc`: a call to the backend, answered in the ack.
    pub(super) fn on_rpc(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        call: RpcCall,
        tx: &mut impl MeshTx,
    ) {
        if !self.s.rpc_hook || self.hooks.endpoint.is_none() {
            let e = "rpc: this server has no application backend to call (hooks.rpc_url)";
            return self.error(id, ack, ErrorCode::Unsupported, e);
        }
        let Some(user) = self.conn(id).map(|c| c.member.user.clone()) else {
            return;
        };
        let body = rpc_body(&user, &call);
        self.ask(id, ack, HookKind::Rpc, body, Asked::Rpc, tx);
    }

    /// Sends a question to the hooks' endpoint; the connection's next
    /// events wait behind it.
    fn ask(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        kind: HookKind,
        body: Vec<u8>,
        what: Asked,
        tx: &mut impl MeshTx,
    ) {
        let Some(endpoint) = self.hooks.endpoint else {
            return;
        };
        if self.hooks.waiting.len() >= self.s.max_hook_waiting {
            self.metrics.hook_refused.inc();
            return self.reply(id, &super::event_stream::unavailable(ack));
        }
        self.hooks.next += 1;
        let token = self.hooks.next;
        self.hooks.waiting.insert(
            token,
            Waiting {
                conn: id,
                ack,
                what,
            },
        );
        self.hooks.held.entry(id).or_default();
        self.metrics.hook_calls.inc();
        let call = HookCall {
            from: self.shard,
            token,
            kind,
            body,
        };
        tx.send(endpoint, MeshMsg::HookCall(Box::new(call)));
    }

    /// The backend answered (or could not): the message goes on, is
    /// refused or rewritten; then the connection's held events are
    /// handled, in order.
    pub(super) fn on_hook_answer(&mut self, a: HookAnswer, now: u64, tx: &mut impl MeshTx) {
        let Some(w) = self.hooks.waiting.remove(&a.token) else {
            return;
        };
        let Waiting {
            conn: id,
            ack,
            what,
        } = w;
        if self.conn(id).is_none() {
            self.hooks.held.remove(&id);
            return;
        }
        match what {
            Asked::Publish { channel, send } => {
                let verdict = a.result.and_then(|body| Verdict::parse(&body));
                if self.joined(id, &channel).is_none() {
                    // It left the channel while the backend thought.
                    let e = format!("join `{channel}` before sending to it");
                    self.error(id, ack, ErrorCode::Forbidden, e);
                } else {
                    self.apply_verdict(id, ack, channel, send, verdict, now, tx);
                }
            }
            Asked::Rpc => match a.result.and_then(|body| rpc_answer(ack, &body)) {
                Ok(msg) => {
                    if matches!(msg.event, ServerEvent::Error(_)) {
                        self.metrics.hook_rejected.inc();
                    }
                    self.reply(id, &msg)
                }
                Err(why) => {
                    self.metrics.hook_failures.inc();
                    tracing::debug!(%why, "rpc failed");
                    self.reply(id, &super::event_stream::unavailable(ack));
                }
            },
        }
        // The events the connection sent meanwhile, in order, until one
        // waits for a hook again.
        let Some(mut held) = self.hooks.held.remove(&id) else {
            return;
        };
        while let Some(msg) = held.pop_front() {
            if let Some(q) = self.hooks.held.get_mut(&id) {
                q.push_back(msg);
                q.extend(held.drain(..));
                return;
            }
            self.handle_checked(id, msg, now, tx);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_verdict(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        channel: Arc<str>,
        mut send: MessageSend,
        verdict: Result<Verdict, String>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        match verdict {
            Ok(Verdict::Allow) => self.publish_to_owner(id, ack, channel, send, None, now, tx),
            Ok(Verdict::Rewrite { content, meta }) => match content
                .as_ref()
                .map_or(Ok(()), |c| self.check_content("content", c))
                .and_then(|_| super::api::check_meta(meta.as_ref()))
            {
                Ok(()) => {
                    if let Some(c) = content {
                        send.content = c;
                    }
                    self.publish_to_owner(id, ack, channel, send, meta, now, tx)
                }
                Err((code, e)) => {
                    self.metrics.hook_failures.inc();
                    let e = format!("the application backend rewrote the message badly: {e}");
                    self.error(id, ack, code, e)
                }
            },
            Ok(Verdict::Reject { reason }) => {
                self.metrics.hook_rejected.inc();
                let why = reason.unwrap_or_else(|| "rejected by the application backend".into());
                self.error(id, ack, ErrorCode::Forbidden, why)
            }
            Err(why) => {
                self.metrics.hook_failures.inc();
                if self.s.hook_failure_allows {
                    self.publish_to_owner(id, ack, channel, send, None, now, tx)
                } else {
                    tracing::debug!(%why, "publish hook failed");
                    self.reply(id, &super::event_stream::unavailable(ack));
                }
            }
        }
    }

    /// Forgets what a closed connection waited for.
    pub(super) fn hooks_closed(&mut self, id: ConnId) {
        self.hooks.held.remove(&id);
    }
}
