//! Rate limits on the connection's shard (see [`super::limits`]).

use std::sync::Arc;

use super::*;

impl<O: Outbound> Engine<O> {
    /// Takes a token for `event` from the user's bucket. Refused: the
    /// message to answer with, and the milliseconds until a token is back.
    pub(super) fn rate_check(
        &mut self,
        user: &Arc<str>,
        event: &ClientEvent,
        now: u64,
    ) -> Result<(), (String, u64)> {
        let index = event.index();
        let Some(limit) = self.s.rate_limits.get(index) else {
            return Ok(());
        };
        let share = self.limiter.share(user);
        let buckets = match self.limiter.buckets.get_mut(user) {
            Some(b) => b,
            None => {
                let at = now + self.s.rate_limits.longest_ms();
                self.timers.at(at, Timer::Buckets { user: user.clone() });
                self.limiter.buckets.entry(user.clone()).or_default()
            }
        };
        buckets.take(index, limit, share, now).map_err(|retry| {
            let scope = if share > 1 {
                format!(" (this server's share: 1/{share} of it)")
            } else {
                String::new()
            };
            (
                format!(
                    "rate limited: `{}` is limited to {limit} per user{scope}",
                    event.name()
                ),
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
        let max = self.s.rate_limit_strikes;
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        conn.strikes = conn.strikes.saturating_add(1);
        if max > 0 && conn.strikes as u32 > max {
            conn.out
                .close(crate::ws::close::POLICY_VIOLATION, "rate limit exceeded");
            self.metrics.rate_limit_closes.inc();
            self.close_conn(id, None, false, now, tx);
        }
    }

    /// An accepted event takes one strike away.
    pub(super) fn rate_accepted(&mut self, id: ConnId) {
        if let Some(c) = self.conn_mut(id) {
            c.strikes = c.strikes.saturating_sub(1);
        }
    }

    /// Drops a user's buckets once they have all refilled.
    pub(super) fn buckets_timer(&mut self, user: Arc<str>, now: u64) {
        let Some(b) = self.limiter.buckets.get(&user) else {
            return;
        };
        if b.idle(&self.s.rate_limits, now) {
            self.limiter.buckets.remove(&user);
        } else {
            let at = now + self.s.rate_limits.longest_ms();
            self.timers.at(at, Timer::Buckets { user });
        }
    }
}
