//! The deploy lock against a real OpenSSH sshd and a real `sh`/`flock`, because what makes the
//! lock safe (atomic check-and-set under flock(1), the host's clock, quoting) lives on the host.
//!
//! Every test runs its own sshd on its own loopback address (127.80.<n>.1) with a session
//! directory in a tempdir, so relative state directories land in the tempdir and the test can
//! look at the files directly. Every wait is bounded.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[path = "../support/mod.rs"]
mod support;

use async_trait::async_trait;
use bytes::Bytes;
use roller::lock::{self, Acquired, LeaseKeeper, LockError, LockInfo, LockSpec};
use roller::transport::{ExecOutput, Transport, TransportError};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout};

use support::Host;

/// Upper bound for anything a test waits for; a hang fails the test instead of the CI job.
const BOUND: Duration = Duration::from_secs(20);

/// A load-balancer host of its own: an sshd on `127.80.<n>.1` whose sessions start in a
/// directory of their own.
fn start_host(n: u8) -> Host {
    support::start_host(&format!("127.80.{n}.1"), true)
}

fn spec(state_dir: &str, lease: Duration) -> LockSpec {
    LockSpec {
        state_dir: state_dir.into(),
        app: "shop".into(),
        lease,
    }
}

async fn bounded<F: Future>(f: F) -> F::Output {
    timeout(BOUND, f).await.expect("timed out")
}

/// The load balancer's clock, which is the one leases are measured by.
async fn lb_now(t: &dyn Transport) -> u64 {
    let out = t
        .exec("date +%s", None, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(out.success(), "{out:?}");
    out.stdout_text().parse().unwrap()
}

/// Waits (bounded) until the load balancer's clock is past `unix`.
async fn until_lb_clock_passes(t: &dyn Transport, unix: u64) {
    bounded(async {
        while lb_now(t).await <= unix {
            sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

/// Wraps a transport to count finished `exec` calls and to fail them on demand, so tests can
/// wait for "the other side has asked at least once" and simulate a flaky network.
struct Probe {
    inner: Arc<dyn Transport>,
    fail: AtomicBool,
    calls: watch::Sender<usize>,
    failures: watch::Sender<usize>,
}

impl Probe {
    fn new(inner: Arc<dyn Transport>) -> Arc<Probe> {
        Arc::new(Probe {
            inner,
            fail: AtomicBool::new(false),
            calls: watch::channel(0).0,
            failures: watch::channel(0).0,
        })
    }
}

#[async_trait]
impl Transport for Probe {
    async fn exec(
        &self,
        command: &str,
        stdin: Option<Bytes>,
        deadline: Duration,
    ) -> Result<ExecOutput, TransportError> {
        let result = if self.fail.load(Ordering::SeqCst) {
            self.failures.send_modify(|n| *n += 1);
            Err(TransportError::Disconnected(
                "probe: simulated outage".into(),
            ))
        } else {
            self.inner.exec(command, stdin, deadline).await
        };
        self.calls.send_modify(|n| *n += 1);
        result
    }

    async fn http_get(
        &self,
        address: &str,
        port: u16,
        path: &str,
        deadline: Duration,
    ) -> Result<u16, TransportError> {
        self.inner.http_get(address, port, path, deadline).await
    }

    async fn close(&self) {
        self.inner.close().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_lock_is_refused_at_once_and_free_again_after_release() {
    let host = start_host(1);
    let (a, b) = (host.connect().await, host.connect().await);
    let spec = spec("state", Duration::from_secs(60));
    let alice = LockInfo::new_for("v2");
    let bob = LockInfo::new_for("v3");

    let (held, how) = bounded(lock::acquire(&*a, &spec, &alice, None))
        .await
        .unwrap();
    assert_eq!(how, Acquired::Fresh);
    assert_eq!(held.token, alice.token);
    assert_eq!(held.release, "v2");
    assert_eq!(held.lease_until, held.started + 60);
    assert_eq!(
        bounded(lock::read(&*b, &spec)).await.unwrap(),
        Some(held.clone())
    );

    let began = Instant::now();
    let refused = bounded(lock::acquire(&*b, &spec, &bob, None)).await;
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    match &refused {
        Err(LockError::Held { holder, now }) => {
            assert_eq!(**holder, held);
            assert!(*now >= held.started && *now <= held.lease_until, "{now}");
        }
        other => panic!("expected Held, got {other:?}"),
    }
    let message = refused.unwrap_err().to_string();
    assert!(message.contains(&alice.owner), "{message}");
    assert!(message.contains(&format!("pid {}", alice.pid)), "{message}");
    assert!(message.contains("v2"), "{message}");
    assert!(message.contains("roller unlock"), "{message}");

    // A bounded wait gives up with Held once the wait is over, having asked more than once.
    let began = Instant::now();
    let refused = bounded(lock::acquire(
        &*b,
        &spec,
        &bob,
        Some(Duration::from_millis(1500)),
    ))
    .await;
    assert!(
        matches!(refused, Err(LockError::Held { .. })),
        "{refused:?}"
    );
    assert!(began.elapsed() >= Duration::from_millis(1500));

    // Releasing with someone else's token leaves the lock alone.
    let wrong = bounded(lock::release(&*b, &spec, &bob.token)).await;
    assert!(
        matches!(&wrong, Err(LockError::Lost { holder: Some(h) }) if h.token == alice.token),
        "{wrong:?}"
    );
    assert!(bounded(lock::read(&*b, &spec)).await.unwrap().is_some());

    bounded(lock::release(&*a, &spec, &alice.token))
        .await
        .unwrap();
    assert_eq!(bounded(lock::read(&*b, &spec)).await.unwrap(), None);
    // Releasing what is not there is not an error: a retried release must not fail a rollout.
    bounded(lock::release(&*a, &spec, &alice.token))
        .await
        .unwrap();

    let (taken, how) = bounded(lock::acquire(&*b, &spec, &bob, None))
        .await
        .unwrap();
    assert_eq!(how, Acquired::Fresh);
    assert_eq!(taken.token, bob.token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_acquire_gets_the_lock_once_the_holder_releases() {
    let host = start_host(2);
    let a = host.connect().await;
    let b = Probe::new(host.connect().await);
    let spec = spec("state", Duration::from_secs(60));
    let alice = LockInfo::new_for("v2");
    let bob = LockInfo::new_for("v3");
    bounded(lock::acquire(&*a, &spec, &alice, None))
        .await
        .unwrap();

    let waiter = {
        let (b, spec, bob) = (b.clone(), spec.clone(), bob.clone());
        tokio::spawn(
            async move { lock::acquire(&*b, &spec, &bob, Some(Duration::from_secs(15))).await },
        )
    };
    // Its first attempt has been answered (Held, since alice holds it) before we let go.
    bounded(b.calls.subscribe().wait_for(|n| *n >= 1))
        .await
        .unwrap();
    assert!(!waiter.is_finished());
    bounded(lock::release(&*a, &spec, &alice.token))
        .await
        .unwrap();

    let (taken, how) = bounded(waiter).await.unwrap().unwrap();
    assert_eq!(how, Acquired::Fresh);
    assert_eq!(taken.token, bob.token);
    assert!(*b.calls.borrow() >= 2, "it got the lock without waiting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_taken_over_and_the_same_token_resumes() {
    let host = start_host(3);
    let (a, b) = (host.connect().await, host.connect().await);
    let short = spec("state", Duration::from_secs(1));
    let alice = LockInfo::new_for("v2");
    let bob = LockInfo::new_for("v3");
    let (dead, _) = bounded(lock::acquire(&*a, &short, &alice, None))
        .await
        .unwrap();

    // Alice's controller "dies": nobody renews. Resuming with her token works while it lives
    // and keeps the original start.
    let (resumed, how) = bounded(lock::acquire(&*a, &short, &alice, None))
        .await
        .unwrap();
    assert_eq!(how, Acquired::Resumed);
    assert_eq!(resumed.started, dead.started);
    let dead = resumed;

    bounded(async {
        while lb_now(&*b).await <= dead.lease_until {
            assert_eq!(lock::read(&*b, &short).await.unwrap(), Some(dead.clone()));
            sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    let long = spec("state", Duration::from_secs(60));
    let (taken, how) = bounded(lock::acquire(&*b, &long, &bob, None))
        .await
        .unwrap();
    assert_eq!(how, Acquired::TookOver { expired: dead });
    assert_eq!(taken.token, bob.token);
    assert_eq!(bounded(lock::read(&*a, &long)).await.unwrap(), Some(taken));

    // Alice's renewals now say she lost it, to whom.
    let lost = bounded(lock::renew(&*a, &long, &alice.token)).await;
    assert!(
        matches!(&lost, Err(LockError::Lost { holder: Some(h) }) if h.token == bob.token),
        "{lost:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_extends_the_lease_and_a_wrong_token_is_lost() {
    let host = start_host(4);
    let t = host.connect().await;
    let spec = spec("state", Duration::from_secs(5));
    let me = LockInfo::new_for("v2");
    let (held, _) = bounded(lock::acquire(&*t, &spec, &me, None)).await.unwrap();

    until_lb_clock_passes(&*t, held.started).await;
    let lease_until = bounded(lock::renew(&*t, &spec, &me.token)).await.unwrap();
    assert!(lease_until > held.lease_until, "{lease_until} vs {held:?}");
    let now = bounded(lock::read(&*t, &spec)).await.unwrap().unwrap();
    assert_eq!(
        now,
        LockInfo {
            lease_until,
            ..held.clone()
        }
    );

    let wrong = bounded(lock::renew(&*t, &spec, "0123456789abcdef0123456789abcdef")).await;
    assert!(
        matches!(&wrong, Err(LockError::Lost { holder: Some(h) }) if *h == now),
        "{wrong:?}"
    );
    // The failed renewal changed nothing.
    assert_eq!(bounded(lock::read(&*t, &spec)).await.unwrap(), Some(now));

    let removed = bounded(lock::unlock(&*t, &spec)).await.unwrap();
    assert_eq!(removed.map(|l| l.token), Some(me.token.clone()));
    let gone = bounded(lock::renew(&*t, &spec, &me.token)).await;
    assert!(
        matches!(gone, Err(LockError::Lost { holder: None })),
        "{gone:?}"
    );
    assert_eq!(bounded(lock::unlock(&*t, &spec)).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keeper_outlives_a_short_lease_and_reports_an_unlock() {
    let host = start_host(5);
    let (t, other) = (host.connect().await, host.connect().await);
    // Short enough to outlive in a test, long enough that one slow round trip on a loaded
    // machine does not lose it.
    let spec = spec("state", Duration::from_secs(6));
    let me = LockInfo::new_for("v2");
    let (held, _) = bounded(lock::acquire(&*t, &spec, &me, None)).await.unwrap();
    let keeper = LeaseKeeper::start(t.clone(), spec.clone(), me.token.clone());
    let mut lost = keeper.lost();

    // Well past the original lease, the lock is still ours and still live.
    until_lb_clock_passes(&*other, held.lease_until + 1).await;
    let current = bounded(lock::read(&*other, &spec)).await.unwrap().unwrap();
    assert_eq!(current.token, me.token);
    assert!(current.lease_until > held.lease_until + 1, "{current:?}");
    assert_eq!(*lost.borrow(), None);
    // And nobody else can take it.
    let refused = bounded(lock::acquire(
        &*other,
        &spec,
        &LockInfo::new_for("v3"),
        None,
    ))
    .await;
    assert!(
        matches!(refused, Err(LockError::Held { .. })),
        "{refused:?}"
    );

    let removed = bounded(lock::unlock(&*other, &spec)).await.unwrap();
    assert_eq!(removed.map(|l| l.token), Some(me.token.clone()));
    let reason = bounded(lost.wait_for(|l| l.is_some()))
        .await
        .unwrap()
        .clone()
        .unwrap();
    assert!(reason.contains("lost"), "{reason}");
    bounded(keeper.stop()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keeper_rides_out_a_blip_but_not_an_outage_past_the_lease() {
    let host = start_host(6);
    let other = host.connect().await;
    let t = Probe::new(host.connect().await);
    let spec = spec("state", Duration::from_secs(8));
    let me = LockInfo::new_for("v2");
    bounded(lock::acquire(&*t, &spec, &me, None)).await.unwrap();
    let keeper = LeaseKeeper::start(t.clone(), spec.clone(), me.token.clone());
    let lost = keeper.lost();

    // A blip: one renewal fails, the next ones succeed, and the lease never lapses.
    let calls = *t.calls.borrow();
    bounded(t.calls.subscribe().wait_for(|n| *n > calls))
        .await
        .unwrap();
    t.fail.store(true, Ordering::SeqCst);
    bounded(t.failures.subscribe().wait_for(|n| *n >= 1))
        .await
        .unwrap();
    t.fail.store(false, Ordering::SeqCst);
    let during = bounded(lock::read(&*other, &spec)).await.unwrap().unwrap();
    until_lb_clock_passes(&*other, during.lease_until + 1).await;
    assert_eq!(*lost.borrow(), None);
    let after = bounded(lock::read(&*other, &spec)).await.unwrap().unwrap();
    assert_eq!(after.token, me.token);
    assert!(after.lease_until > during.lease_until, "{after:?}");

    // An outage longer than the lease: the keeper gives up, even though nobody took the lock,
    // because it can no longer know that.
    t.fail.store(true, Ordering::SeqCst);
    let began = Instant::now();
    let mut lost = lost;
    let reason = bounded(lost.wait_for(|l| l.is_some()))
        .await
        .unwrap()
        .clone()
        .unwrap();
    assert!(reason.contains("ran out"), "{reason}");
    assert!(
        began.elapsed() >= Duration::from_secs(1),
        "gave up after {:?}, before the lease could have run out",
        began.elapsed()
    );
    bounded(keeper.stop()).await;
}

mod safety;
