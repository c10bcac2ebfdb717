//! Rate limits on the connection's shard (see [`super::limits`]).

use std::sync::Arc;

use super::*;
use crate::protocol::DecodeError;

/// How often the rate-limit buckets that are full again are dropped.
const RATE_SWEEP_MS: u64 = 1_000;

impl<O: Outbound> Engine<O> {
    /// Takes a token from `user`'s bucket number `index` (the event's, or
    /// the default one past the known events). Refused: the message to
    /// answer with, and the milliseconds until a token is back.
    fn take_token(
        &mut self,
        user: &Arc<str>,
        index: usize,
        name: &str,
        now: u64,
    ) -> Result<(), (String, u64)> {
        let Some(limit) = self.s.rate_limits.get(index) else {
            return Ok(());
        };
        let share = self.limiter.share(user);
        if self.limiter.buckets.is_empty() {
            // The sweep runs while any bucket is kept.
            self.timers.at(now + RATE_SWEEP_MS, Timer::RateSweep);
        }
        let buckets = match self.limiter.buckets.get_mut(user) {
            Some(b) => b,
            None => self.limiter.buckets.entry(user.clone()).or_default(),
        };
        buckets.take(index, limit, share, now).map_err(|retry| {
            let scope = if share > 1 {
                format!(" (this server's share: 1/{share} of it)")
            } else {
                String::new()
            };
            (
                format!("rate limited: `{name}` is limited to {limit} per user{scope}"),
                retry,
            )
        })
    }

    /// Answers a refused event, and closes a connection that keeps on.
    pub(super) fn rate_refused(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        message: String,
        retry_after_ms: u64,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.metrics.rate_limited.inc();
        let msg = ServerMessage {
            id: ack,
            event: ServerEvent::Error(ErrorBody {
                code: ErrorCode::RateLimited,
                message,
                retry_after_ms: Some(retry_after_ms),
            }),
        };
        self.reply(id, &msg);
        self.strike(id, "rate limit exceeded", now, tx);
    }

    /// Counts a strike against a connection (a refusal by a rate limit,
    /// malformed input), and closes it with 1008 past
    /// `rate_limit_strikes`.
    fn strike(&mut self, id: ConnId, reason: &str, now: u64, tx: &mut impl MeshTx) {
        let max = self.s.rate_limit_strikes;
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        conn.strikes = conn.strikes.saturating_add(1);
        if max > 0 && conn.strikes as u32 > max {
            conn.out.close(crate::ws::close::POLICY_VIOLATION, reason);
            self.metrics.rate_limit_closes.inc();
            self.close_conn(id, None, false, now, tx);
        }
    }

    /// Takes a token from the bucket number `bucket` (an event's
    /// [`ClientEvent::index`], or the default bucket past the known events)
    /// of the connection's user. When the bucket is empty, answers
    /// `rate_limited`, counts a strike, and returns false.
    pub fn charge(
        &mut self,
        id: ConnId,
        bucket: usize,
        ack: Option<u64>,
        now: u64,
        tx: &mut impl MeshTx,
    ) -> bool {
        let Some(user) = self.conn(id).map(|c| c.member.user.clone()) else {
            return false;
        };
        let name = match bucket {
            limits::CUSTOM => "custom",
            b => crate::protocol::CLIENT_EVENT_NAMES
                .get(b)
                .copied()
                .unwrap_or("default"),
        };
        match self.take_token(&user, bucket, name, now) {
            Ok(()) => true,
            Err((why, retry)) => {
                self.rate_refused(id, ack, why, retry, now, tx);
                false
            }
        }
    }

    /// Answers input that is not a valid event (it could not be decoded,
    /// or a field is past its bound). It costs a token from the bucket of
    /// the event it names (the default bucket when it names none) and a
    /// strike, like a refusal by a rate limit: a flood of bad input meets
    /// the limits of good input, and a client that keeps sending it is
    /// closed.
    pub fn malformed(&mut self, id: ConnId, e: DecodeError, now: u64, tx: &mut impl MeshTx) {
        if self.charge(id, e.bucket(), e.id, now, tx) {
            self.malformed_charged(id, e, now, tx);
        }
    }

    /// [`Engine::malformed`] for input whose token was already taken.
    pub fn malformed_charged(
        &mut self,
        id: ConnId,
        e: DecodeError,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.metrics.malformed.inc();
        self.error(id, e.id, e.code, e.message);
        self.strike(id, "too many malformed or refused events", now, tx);
    }

    /// An accepted event takes one strike away.
    pub(super) fn rate_accepted(&mut self, id: ConnId) {
        if let Some(c) = self.conn_mut(id) {
            c.strikes = c.strikes.saturating_sub(1);
        }
    }

    /// Drops the buckets that are full again, and runs again while any
    /// are left.
    pub(super) fn rate_sweep(&mut self, now: u64) {
        if self.limiter.sweep(now) {
            self.timers.at(now + RATE_SWEEP_MS, Timer::RateSweep);
        }
    }
}
