//! A [`Transport`] that re-establishes a lost connection, so a network blip or an sshd restart
//! in the middle of a rollout does not fail a step that could simply be sent again.
//!
//! Retrying is sound only because every command roller sends is idempotent (uploads go to a
//! `.part` file then rename, switches and pool changes are atomic rewrites, restarts and health
//! checks are safe to repeat). What is never retried: host-key and authentication refusals
//! (policy, not faults: a host whose key changed between two connections stays refused) and a
//! call's own timeout (the command may still be running; the caller decides).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use super::{Connector, Endpoint, ExecOutput, Transport, TransportError};

/// How hard to try to get a lost connection back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Connect attempts per reconnect; a call waits for at most one reconnect.
    pub attempts: u32,
    /// Pause before the second attempt (the first is immediate: the server may be fine and
    /// only our connection gone); doubled per attempt up to `max_backoff`, with jitter.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// One host's session, replaced by a new connection when the old one is lost.
///
/// A call takes at most: one reconnect (`attempts` × (the connector's connect timeout +
/// backoff)) plus its own deadline, which the try before and the try after the reconnect share.
pub struct Reconnecting {
    connector: Arc<dyn Connector>,
    endpoint: Endpoint,
    policy: RetryPolicy,
    slot: Mutex<Slot>,
    /// Held for the whole of a reconnect, so that callers who found the same session dead wait
    /// for its outcome instead of each opening a connection of their own.
    gate: tokio::sync::Mutex<()>,
    reconnects: AtomicU32,
}

struct Slot {
    /// Bumped by every reconnect, success or failure: a caller that saw generation `g` fail
    /// and finds a newer one knows someone else already reconnected for it.
    generation: u64,
    state: State,
}

#[derive(Clone)]
enum State {
    Up(Arc<dyn Transport>),
    /// Lost and not re-established; the next call tries again.
    Down(TransportError),
    /// Refused by policy; every later call fails the same way without connecting.
    Refused(TransportError),
    Closed,
}

impl Reconnecting {
    /// Connects once (errors are returned as is: pre-flight reports them).
    pub async fn connect(
        connector: Arc<dyn Connector>,
        endpoint: Endpoint,
        policy: RetryPolicy,
    ) -> Result<Arc<Reconnecting>, TransportError> {
        let session = connector.connect(&endpoint).await?;
        Ok(Arc::new(Reconnecting {
            connector,
            endpoint,
            policy,
            slot: Mutex::new(Slot {
                generation: 0,
                state: State::Up(session),
            }),
            gate: tokio::sync::Mutex::new(()),
            reconnects: AtomicU32::new(0),
        }))
    }

    /// How many times the connection was re-established, for the report.
    pub fn reconnects(&self) -> u32 {
        self.reconnects.load(Ordering::Relaxed)
    }

    fn slot(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn snapshot(&self) -> (u64, State) {
        let slot = self.slot();
        (slot.generation, slot.state.clone())
    }

    /// Runs `op` on the current session, and once more on a new one if the connection was lost.
    async fn call<T, F, Fut>(&self, deadline: Duration, op: F) -> Result<T, TransportError>
    where
        F: Fn(Arc<dyn Transport>, Duration) -> Fut + Send + Sync,
        Fut: Future<Output = Result<T, TransportError>> + Send,
        T: Send,
    {
        let (mut generation, mut state) = self.snapshot();
        let mut reconnected = false;
        let mut left = deadline;
        loop {
            let session = match state {
                State::Up(session) => session,
                State::Down(cause) if !reconnected => {
                    reconnected = true;
                    (generation, state) = self.reconnect(generation, cause).await;
                    continue;
                }
                State::Down(e) | State::Refused(e) => return Err(e),
                State::Closed => {
                    return Err(TransportError::Disconnected(format!(
                        "{}: session closed",
                        self.endpoint.name
                    )));
                }
            };
            let started = Instant::now();
            // SshTransport reports every failure of a dead connection as `Disconnected`,
            // including a channel open on a session that is already closed, so that is the
            // one error that means "send it again elsewhere".
            match op(session, left).await {
                Err(TransportError::Disconnected(why)) => {
                    left = left.saturating_sub(started.elapsed());
                    if reconnected || left.is_zero() {
                        return Err(TransportError::Disconnected(why));
                    }
                    state = State::Down(TransportError::Disconnected(why));
                }
                // The retry ran on what was left of the deadline; the caller asked for all of it.
                Err(TransportError::Timeout(_)) => return Err(TransportError::Timeout(deadline)),
                other => return other,
            }
        }
    }

    /// Replaces the session of `seen` unless another caller already did, and returns the
    /// outcome either way.
    async fn reconnect(&self, seen: u64, cause: TransportError) -> (u64, State) {
        let _gate = self.gate.lock().await;
        {
            let mut slot = self.slot();
            if slot.generation != seen || matches!(slot.state, State::Refused(_) | State::Closed) {
                return (slot.generation, slot.state.clone());
            }
            // The dead session goes now, so callers arriving meanwhile queue on the gate.
            slot.state = State::Down(cause.clone());
        }
        tracing::warn!(host = %self.endpoint.name, error = %cause, "connection lost, reconnecting");
        let outcome = self.connect_with_backoff(&cause).await;
        let (generation, state) = {
            let mut slot = self.slot();
            if matches!(slot.state, State::Closed) {
                (slot.generation, State::Closed)
            } else {
                if matches!(outcome, State::Up(_)) {
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                slot.generation += 1;
                slot.state = outcome.clone();
                (slot.generation, outcome.clone())
            }
        };
        // Closed while connecting: the new connection has no owner left.
        if let (State::Closed, State::Up(orphan)) = (&state, outcome) {
            orphan.close().await;
        }
        (generation, state)
    }

    async fn connect_with_backoff(&self, cause: &TransportError) -> State {
        let name = &self.endpoint.name;
        let attempts = self.policy.attempts;
        let mut backoff = self.policy.first_backoff;
        let mut last = cause.clone();
        for attempt in 1..=attempts {
            if attempt > 1 {
                tokio::time::sleep(jittered(backoff)).await;
                backoff = (backoff * 2).min(self.policy.max_backoff);
            }
            match self.connector.connect(&self.endpoint).await {
                Ok(session) => {
                    tracing::warn!(host = %name, attempt, "reconnected");
                    return State::Up(session);
                }
                Err(
                    e @ (TransportError::HostKeyUnknown { .. }
                    | TransportError::HostKeyChanged { .. }
                    | TransportError::HostKeyRevoked { .. }
                    | TransportError::Auth { .. }),
                ) => {
                    tracing::warn!(host = %name, error = %e, "reconnect refused; not retrying");
                    return State::Refused(e);
                }
                Err(e) => {
                    tracing::warn!(host = %name, attempt, attempts, error = %e, "reconnect failed");
                    last = e;
                }
            }
        }
        State::Down(TransportError::Connect(format!(
            "{name}: connection lost and not re-established in {attempts} attempts; last error: {last}"
        )))
    }
}

/// Between half and all of `base`, so hosts that lost their connections together (a switch
/// rebooting) do not all reconnect in the same instant.
fn jittered(base: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded randomly per process and varies per instance: randomness enough
    // for spreading retries, without a dependency.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    base / 2 + base.mul_f64((random % 1000) as f64 / 2000.0)
}

#[async_trait]
impl Transport for Reconnecting {
    async fn exec(
        &self,
        command: &str,
        stdin: Option<Bytes>,
        deadline: Duration,
    ) -> Result<ExecOutput, TransportError> {
        self.call(deadline, |session, left| {
            let stdin = stdin.clone();
            async move { session.exec(command, stdin, left).await }
        })
        .await
    }

    async fn http_get(
        &self,
        address: &str,
        port: u16,
        path: &str,
        deadline: Duration,
    ) -> Result<u16, TransportError> {
        self.call(deadline, |session, left| async move {
            session.http_get(address, port, path, left).await
        })
        .await
    }

    /// Later calls fail with `Disconnected` and never reconnect.
    async fn close(&self) {
        let previous = std::mem::replace(&mut self.slot().state, State::Closed);
        if let State::Up(session) = previous {
            session.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_and_whole() {
        let base = Duration::from_millis(200);
        for _ in 0..100 {
            let pause = jittered(base);
            assert!(pause >= base / 2 && pause <= base, "{pause:?}");
        }
    }
}
