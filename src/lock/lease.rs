//! Holding the deploy lock through a rollout: the lease renewed in the background, and the
//! fence that stops a controller which can no longer prove it holds the lock from changing
//! anything more, on the controller and on the lock host.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use super::{LockError, LockSpec, RENEW_RETRY, renew_within};
use crate::remote;
use crate::transport::{ExecOutput, Transport, TransportError};

/// Keeps a held lock's lease alive for the length of a rollout: renews every `lease / 3` in a
/// tokio task, and reports through [`LeaseKeeper::lost`] when the lock is lost, so the rollout
/// can stop before it changes anything more.
///
/// A failed renewal (transport or remote error) is retried; the lock counts as lost only when
/// another token holds it, it was removed, or no renewal succeeded before the lease ran out (a
/// rollout that went on past that point could overlap another). Start it right after
/// [`acquire`]: it takes the lease as running from its own start.
pub struct LeaseKeeper {
    lost: watch::Receiver<Option<String>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl LeaseKeeper {
    pub fn start(t: Arc<dyn Transport>, spec: LockSpec, token: String) -> LeaseKeeper {
        let fence = Arc::new(Fence::new(spec, token, Instant::now()));
        LeaseKeeper::start_fenced(t, fence)
    }

    /// Renews the lease that `fence` describes, and moves the fence forward with every renewal
    /// the load balancer confirms.
    pub fn start_fenced(t: Arc<dyn Transport>, fence: Arc<Fence>) -> LeaseKeeper {
        let (lost_tx, lost) = watch::channel(None);
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(keep(t, fence, lost_tx, stop_rx));
        LeaseKeeper {
            lost,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// `Some(reason)` once the lock is lost; it never goes back to `None`.
    pub fn lost(&self) -> watch::Receiver<Option<String>> {
        self.lost.clone()
    }

    /// Stops renewing and waits for an in-flight renewal to be abandoned. Does not release the
    /// lock: call [`release`] for that.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn keep(
    t: Arc<dyn Transport>,
    fence: Arc<Fence>,
    lost: watch::Sender<Option<String>>,
    mut stop: oneshot::Receiver<()>,
) {
    let (spec, token) = (&fence.spec, &fence.token);
    let lease = Duration::from_secs(spec.lease_secs());
    let period = lease / 3;
    // The load balancer computes `lease_until` from its clock when the command runs, which is
    // after we sent it, and the lease holds through that whole second: `sent + lease` is when
    // it ends at the earliest, measured on our monotonic clock.
    let mut expires = fence.valid_until();
    let mut next = Instant::now();
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = sleep_until(next) => {}
        }
        let sent = Instant::now();
        if sent >= expires {
            let _ = lost.send(Some(
                "deploy lock lost: the lease ran out before it could be renewed".to_string(),
            ));
            return;
        }
        let outcome = tokio::select! {
            _ = &mut stop => return,
            outcome = renew_within(&*t, spec, token, expires - sent) => outcome,
        };
        match outcome {
            Ok(until) if Instant::now() < expires => {
                tracing::debug!(lease_until = until, took = ?sent.elapsed(), "deploy lock renewed");
                expires = sent + lease;
                fence.confirmed(sent);
                next = sent + period;
            }
            Ok(_) => {
                // The renewal may have landed after the lease ran out, when another controller
                // could have taken and given back the lock; we cannot tell, so we assume it.
                let _ = lost.send(Some(
                    "deploy lock lost: the renewal answered only after the lease had run out"
                        .to_string(),
                ));
                return;
            }
            Err(e @ LockError::Lost { .. }) => {
                let _ = lost.send(Some(e.to_string()));
                return;
            }
            Err(e) => {
                if Instant::now() >= expires {
                    let _ = lost.send(Some(format!(
                        "deploy lock lost: the lease ran out before it could be renewed (last error: {e})"
                    )));
                    return;
                }
                tracing::warn!(error = %e, "deploy lock renewal failed, retrying");
                next = Instant::now() + RENEW_RETRY.min(period);
            }
        }
    }
}

/// What keeps a controller that lost its lease from changing anything: a process paused past
/// its lease (SIGSTOP, a VM pause) wakes up believing it still holds the lock, while another
/// controller may already have taken over.
///
/// Two checks, both made for every command sent through a [`Fenced`] session:
/// - on the controller, the lease must be provably ours for a while yet: the last renewal the
///   load balancer confirmed was *sent* less than `lease - margin` ago on our monotonic clock;
/// - on the lock host, the command first takes the lock's mutex and checks that the lock file
///   still names our token with an unexpired lease, and keeps the mutex until it ends, so no
///   take-over can slip in between the check and the change.
pub struct Fence {
    spec: LockSpec,
    token: String,
    /// Our monotonic clock: the lease is provably ours until then.
    valid_until: std::sync::Mutex<Instant>,
}

/// Exit status of a command the lock host refused because we no longer hold the lock.
pub const FENCED_OUT: u32 = 75;

impl Fence {
    /// `sent`: when the command that took (or last renewed) the lock was sent.
    pub fn new(spec: LockSpec, token: String, sent: Instant) -> Fence {
        let lease = Duration::from_secs(spec.lease_secs());
        Fence {
            spec,
            token,
            valid_until: std::sync::Mutex::new(sent + lease),
        }
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    fn valid_until(&self) -> Instant {
        *self.valid_until.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn confirmed(&self, sent: Instant) {
        let lease = Duration::from_secs(self.spec.lease_secs());
        let mut until = self.valid_until.lock().unwrap_or_else(|e| e.into_inner());
        *until = (*until).max(sent + lease);
    }

    /// A command sent now must still find the lease ours when it lands and runs; a third of the
    /// lease leaves room for one failed renewal before commands stop.
    fn margin(&self) -> Duration {
        Duration::from_secs(self.spec.lease_secs()) / 3
    }

    /// `Err` with the reason once the lease is no longer provably ours.
    pub fn check(&self) -> Result<(), String> {
        if Instant::now() + self.margin() < self.valid_until() {
            Ok(())
        } else {
            Err(
                "fenced out: the deploy lock's lease is no longer provably held (no renewal confirmed in time); \
                 another controller may have taken over, so this one changes nothing more"
                    .to_string(),
            )
        }
    }

    /// Wraps a command for the lock host: it runs only while the lock's mutex is held and the
    /// lock file still names our token with a live lease; otherwise it exits [`FENCED_OUT`]. The
    /// command itself does not inherit the mutex's descriptor, so nothing it leaves running can
    /// hold the lock.
    pub fn guard(&self, command: &str) -> String {
        remote::lock::guard(&self.spec, &self.token, command)
    }
}

/// A session whose every command is fenced ([`Fence`]); on the lock host, the load balancer
/// checks the lock too.
pub struct Fenced {
    inner: Arc<dyn Transport>,
    fence: Arc<Fence>,
    lock_host: bool,
}

impl Fenced {
    pub fn new(inner: Arc<dyn Transport>, fence: Arc<Fence>, lock_host: bool) -> Fenced {
        Fenced {
            inner,
            fence,
            lock_host,
        }
    }
}

#[async_trait::async_trait]
impl Transport for Fenced {
    async fn exec(
        &self,
        command: &str,
        stdin: Option<bytes::Bytes>,
        deadline: Duration,
    ) -> Result<ExecOutput, TransportError> {
        self.fence.check().map_err(TransportError::Fenced)?;
        if self.lock_host {
            self.inner
                .exec(&self.fence.guard(command), stdin, deadline)
                .await
        } else {
            self.inner.exec(command, stdin, deadline).await
        }
    }

    async fn http_get(
        &self,
        address: &str,
        port: u16,
        path: &str,
        deadline: Duration,
    ) -> Result<u16, TransportError> {
        // Reads nothing but a status code and changes nothing: no fence needed.
        self.inner.http_get(address, port, path, deadline).await
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}
