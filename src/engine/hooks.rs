//! Hooks: questions the engine asks the application backend before it
//! acts, without ever waiting for the answer. Today the publish hook: a
//! client's `message:send` to a channel that `hooks.publish_channels`
//! names is shown to the backend before it is sequenced, and the backend
//! allows it, rejects it (the client gets `forbidden` with the backend's
//! reason) or rewrites its content.
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
    Rewrite {
        content: String,
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

/// A message waiting for the publish hook.
#[derive(Debug)]
struct Waiting {
    conn: ConnId,
    ack: Option<u64>,
    channel: Arc<str>,
    send: MessageSend,
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
        let Some(endpoint) = self.hooks.endpoint else {
            return;
        };
        if self.hooks.waiting.len() >= self.s.max_hook_waiting {
            self.metrics.hook_refused.inc();
            return self.reply(id, &super::event_stream::unavailable(ack));
        }
        self.hooks.next += 1;
        let token = self.hooks.next;
        let body = publish_body(user, &send);
        self.hooks.waiting.insert(
            token,
            Waiting {
                conn: id,
                ack,
                channel,
                send,
            },
        );
        self.hooks.held.entry(id).or_default();
        self.metrics.hook_calls.inc();
        let call = HookCall {
            from: self.shard,
            token,
            kind: HookKind::Publish,
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
            channel,
            send,
        } = w;
        if self.conn(id).is_none() {
            self.hooks.held.remove(&id);
            return;
        }
        let verdict = a.result.and_then(|body| Verdict::parse(&body));
        if self.joined(id, &channel).is_none() {
            // It left the channel while the backend thought.
            let e = format!("join `{channel}` before sending to it");
            self.error(id, ack, ErrorCode::Forbidden, e);
        } else {
            self.apply_verdict(id, ack, channel, send, verdict, now, tx);
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
            Ok(Verdict::Allow) => self.publish_to_owner(id, ack, channel, send, now, tx),
            Ok(Verdict::Rewrite { content }) => match self.check_content("content", &content) {
                Ok(()) => {
                    send.content = content;
                    self.publish_to_owner(id, ack, channel, send, now, tx)
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
                    self.publish_to_owner(id, ack, channel, send, now, tx)
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
