//! One controller's hold on the fleet, around whatever a command does to it: connect to every
//! host and load balancer, take the deploy lock, keep its lease, turn Ctrl-C, SIGTERM or a lost
//! lease into an interrupt, and release the lock and the connections afterwards, whatever
//! happened in between.
//!
//! Commands see only [`Held`]: sessions that are already fenced by the lease, so no command can
//! reach a host once this controller is not provably the one holding the lock.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::{Error, HostFailure, Locked, Result, StateError};
use crate::executor::{self, Interrupt, Sessions};
use crate::inventory::Inventory;
use crate::journal::Journal;
use crate::lock::{self, Acquired, LeaseKeeper, LockError, LockInfo, LockSpec};
use crate::transport::reach;
use crate::transport::ssh::{SshConnector, SshSettings};
use crate::transport::{Connector, Transport};

/// What a command may use while the deploy lock is held.
pub struct Held {
    /// One session per app host and load balancer, each fenced by the lease.
    pub sessions: Sessions,
    /// The lock host, unfenced: for reading what an earlier rollout left there, which changes
    /// nothing.
    pub lock_host: Arc<dyn Transport>,
    /// This controller as the lock records it.
    pub me: LockInfo,
    pub acquired: Acquired,
    /// Fires on the first Ctrl-C or SIGTERM, or when the lease is lost.
    pub interrupt: Interrupt,
}

/// How to take the lock and what to tell the operator if it is lost.
pub struct Hold<'a> {
    pub inventory: &'a Inventory,
    /// The release the lock names, for whoever finds it held.
    pub release: &'a str,
    /// Wait this long for another holder instead of failing at once.
    pub lock_wait: Option<Duration>,
    /// Where take-overs of a dead holder's lock are recorded (`<dir>/<app>/locks.jsonl`).
    pub journal_dir: &'a Path,
    /// The command that finishes the rollout, named when this controller is fenced out.
    pub resume_hint: &'a str,
}

/// Connects, takes the lock, runs `body` while keeping the lease, then releases the lock and
/// closes every connection. A lease lost while `body` ran wins over `body`'s own result: the
/// rollout did not end the way the report would say, another controller now owns it.
pub async fn hold<T>(hold: Hold<'_>, body: impl AsyncFnOnce(&Held) -> Result<T>) -> Result<T> {
    let (interrupt_tx, interrupt) = watch::channel(None);
    watch_signals(interrupt_tx.clone());
    let inv = hold.inventory;
    let connector: Arc<dyn Connector> = Arc::new(connector(inv)?);
    // A host that accepts TCP and never speaks SSH holds this for connect_timeout and its
    // retries; nothing has changed yet, so a Ctrl-C here stops at once.
    let sessions = unless_interrupted(&interrupt, executor::connect(inv, connector)).await?;
    let result = locked(&hold, &sessions, interrupt, interrupt_tx, body).await;
    for session in sessions.values() {
        session.close().await;
    }
    result
}

async fn locked<T>(
    hold: &Hold<'_>,
    sessions: &Sessions,
    interrupt: Interrupt,
    interrupt_tx: watch::Sender<Option<String>>,
    body: impl AsyncFnOnce(&Held) -> Result<T>,
) -> Result<T> {
    let inv = hold.inventory;
    let lb = sessions[&inv.balancer.lock_host].clone();
    let spec = lock_spec(inv);
    // The token is this process's alone: a resume or recover must never pass for the
    // controller it takes over from, or two could drive the fleet at once.
    let me = LockInfo {
        balancers: balancer_set(inv).join(","),
        ..LockInfo::new_for(hold.release)
    };
    let acquired = match lock::acquire_sent(lb.as_ref(), &spec, &me, None).await {
        Err(LockError::Held { holder, .. }) if lock::holder_is_gone(&holder) => {
            let sent = tokio::time::Instant::now();
            lock::take_over_gone(lb.as_ref(), &spec, &me, &holder)
                .await
                .map(|(info, how)| (info, how, sent))
        }
        Err(LockError::Held { .. }) if hold.lock_wait.is_some() => {
            lock::acquire_sent(lb.as_ref(), &spec, &me, hold.lock_wait).await
        }
        other => other,
    };
    let (acquired, sent) = match acquired {
        Ok((_, acquired, sent)) => (acquired, sent),
        Err(e @ (LockError::Held { .. } | LockError::OtherBalancers { .. })) => {
            return Err(Error::from(Locked::Held(e)));
        }
        Err(e) => return Err(Error::from(StateError::Lock(e))),
    };
    if let Acquired::TookOver { expired } = &acquired {
        eprintln!("warning: took over an expired deploy lock from {expired}");
        record_lock_event(
            hold.journal_dir,
            &inv.app.name,
            "took-over",
            serde_json::json!({ "expired": expired, "by": me }),
        );
    }
    // The lease runs from no earlier than when the request that took it was sent.
    let fence = Arc::new(lock::Fence::new(spec.clone(), me.token.clone(), sent));
    let keeper = LeaseKeeper::start_fenced(lb.clone(), fence.clone());
    let mut lost = keeper.lost();
    let lost_reason = keeper.lost();
    tokio::spawn(async move {
        while lost.changed().await.is_ok() {
            if let Some(reason) = lost.borrow().clone() {
                let _ = interrupt_tx.send(Some(reason));
                return;
            }
        }
    });
    // Every command from here on is fenced: once the lease is not provably ours, nothing more
    // reaches a host or a load balancer.
    let fenced: Sessions = sessions
        .iter()
        .map(|(name, session)| {
            let session: Arc<dyn Transport> = Arc::new(lock::Fenced::new(
                session.clone(),
                fence.clone(),
                *name == inv.balancer.lock_host,
            ));
            (name.clone(), session)
        })
        .collect();
    let held = Held {
        sessions: fenced,
        lock_host: lb.clone(),
        me,
        acquired,
        interrupt,
    };
    let result = body(&held).await;
    keeper.stop().await;
    if let Some(reason) = lost_reason.borrow().clone() {
        return Err(Error::from(Locked::Lost {
            reason,
            resume_hint: hold.resume_hint.to_string(),
        }));
    }
    if let Err(e) = lock::release(lb.as_ref(), &spec, &held.me.token).await {
        eprintln!("warning: could not release the deploy lock: {e}");
    }
    result
}

/// Runs `work`, which must change nothing on any host, unless Ctrl-C, SIGTERM or a lost lease
/// comes first: then `work` is dropped where it waits and the command stops at once.
pub async fn unless_interrupted<T>(
    interrupt: &Interrupt,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    let mut interrupt = interrupt.clone();
    tokio::select! {
        biased;
        reason = executor::wait_for_interrupt(&mut interrupt) => Err(Error::Interrupted { reason }),
        done = work => done,
    }
}

/// The inventory's load balancers, sorted: what the lock and the rollout state record, so that
/// another inventory for the same app with another set is noticed.
pub fn balancer_set(inv: &Inventory) -> Vec<String> {
    let mut set = inv.balancer.hosts.clone();
    set.sort();
    set.dedup();
    set
}

pub fn lock_spec(inv: &Inventory) -> LockSpec {
    LockSpec {
        state_dir: inv.balancer.state_dir.clone(),
        app: inv.app.name.clone(),
        lease: inv.balancer.lock_lease,
    }
}

fn connector(inv: &Inventory) -> Result<SshConnector> {
    let setup_failed = |message: String| Error::Preflight {
        failures: vec![HostFailure {
            host: "(controller)".into(),
            step: "ssh setup".into(),
            message,
        }],
    };
    SshConnector::new(SshSettings {
        user: reach::default_user(&inv.ssh),
        identity: inv.ssh.identity.clone(),
        identity_passphrase: inv.ssh.identity_passphrase().map_err(setup_failed)?,
        known_hosts: inv.ssh.known_hosts.clone(),
        connect_timeout: inv.ssh.connect_timeout,
        max_channels_per_host: 8,
        max_concurrent_connects: inv.ssh.max_concurrent_connects,
        allow_sha1_rsa: inv.ssh.allow_sha1_rsa,
        // Every endpoint carries its own bastions, resolved through the ssh config.
        proxy_jump: Vec::new(),
        proxy_command: inv.ssh.proxy_command.clone(),
        keys_per_host: inv.ssh.config.is_some(),
    })
    .map_err(|e| setup_failed(e.to_string()))
}

/// One connection to the lock host alone, without taking the lock: for the commands that only
/// read or leave word there (`unlock`, `promote`, `abort`, reading a state to resume).
pub async fn connect_lock_host(inv: &Inventory) -> Result<Arc<dyn Transport>> {
    let connector = connector(inv)?;
    let endpoint = executor::endpoints(inv)?
        .into_iter()
        .find(|e| e.name == inv.balancer.lock_host)
        .expect("the lock host is an endpoint");
    let name = endpoint.name.clone();
    let session = connector
        .connect(&endpoint)
        .await
        .map_err(|e| Error::Preflight {
            failures: vec![HostFailure {
                host: endpoint.name,
                step: "connect".into(),
                message: e.to_string(),
            }],
        })?;
    // Through sudo when `balancer.sudo` says so, asked first like every session of a rollout.
    let mut sessions =
        executor::run_as_configured(inv, Sessions::from([(name.clone(), session)])).await?;
    Ok(sessions.remove(&name).expect("the lock host's session"))
}

/// One connection to every app host and load balancer of `inv`, without the lock, for the
/// commands that only look (`check`, `status`): a host that cannot be reached is a problem
/// naming it, not the end of the command, so it does not hide what the others show.
pub async fn connect_each(inv: &Inventory) -> Result<(Sessions, Vec<HostFailure>)> {
    let connector = connector(inv)?;
    let endpoints = executor::endpoints(inv)?;
    let connected = futures::future::join_all(endpoints.iter().map(|e| connector.connect(e))).await;
    Ok(crate::transport::sessions::pair_up(endpoints, connected))
}

/// Appends to `<dir>/<app>/locks.jsonl`, the record of who took the lock from whom; failing to
/// write it only warns, since the lock itself is already settled.
pub fn record_lock_event(dir: &Path, app: &str, kind: &str, body: serde_json::Value) {
    match Journal::create(dir, app, "locks") {
        Ok(j) => j.record(kind, body),
        Err(e) => tracing::warn!("cannot record {kind} in {}: {e}", dir.display()),
    }
}

/// Turns Ctrl-C and SIGTERM into an interrupt; a second one only warns, because stopping in
/// the middle of a rollback is what would strand hosts.
fn watch_signals(tx: watch::Sender<Option<String>>) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("cannot watch SIGTERM: {e}");
                    return;
                }
            };
        let mut count = 0;
        loop {
            let name = tokio::select! {
                r = tokio::signal::ctrl_c() => { if r.is_err() { return; } "SIGINT" }
                _ = term.recv() => "SIGTERM",
            };
            count += 1;
            if count == 1 {
                eprintln!(
                    "roller: {name} received: stopping; a step in progress finishes first, and hosts out of the pool go back in"
                );
                let _ = tx.send(Some(format!("{name} received")));
            } else {
                eprintln!(
                    "roller: {name} again: still restoring the fleet, and stopping now would leave hosts out of the pool; roller exits as soon as it is done (kill -9 leaves a journal for `roller resume` or `roller recover`)"
                );
            }
        }
    });
}
