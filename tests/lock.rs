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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_eight_concurrent_acquires_exactly_one_wins() {
    let host = start_host(7);
    let spec = spec("state", Duration::from_secs(60));
    let mut controllers = Vec::new();
    for i in 0..8 {
        controllers.push((host.connect().await, LockInfo::new_for(&format!("v{i}"))));
    }
    let start = Arc::new(tokio::sync::Barrier::new(controllers.len()));
    let attempts = controllers.into_iter().map(|(t, me)| {
        let (spec, start) = (spec.clone(), start.clone());
        tokio::spawn(async move {
            start.wait().await;
            lock::acquire(&*t, &spec, &me, None).await
        })
    });
    let results: Vec<_> = bounded(futures::future::join_all(attempts))
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();

    let winners: Vec<&LockInfo> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|(info, _)| info))
        .collect();
    assert_eq!(winners.len(), 1, "{results:#?}");
    let winner = winners[0];
    for result in &results {
        match result {
            Ok((info, how)) => assert_eq!((info, how), (winner, &Acquired::Fresh)),
            Err(LockError::Held { holder, .. }) => assert_eq!(**holder, *winner),
            Err(e) => panic!("unexpected error {e}: {results:#?}"),
        }
    }
    let t = host.connect().await;
    assert_eq!(
        bounded(lock::read(&*t, &spec)).await.unwrap().as_ref(),
        Some(winner)
    );
}

/// Whether some process is blocked waiting for a flock on the file with inode `ino`
/// (`/proc/locks` lists waiters with a `->` marker, and files as `major:minor:inode`).
fn someone_waits_for_lock_on(ino: u64) -> bool {
    let needle = format!(":{ino} ");
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|line| line.contains("->") && line.contains(&needle))
}

/// The race the eight-way test above can only hope to hit, made deterministic: we hold the
/// host's mutex ourselves, let an acquire queue behind it, write another holder's lock inside
/// "our" critical section, and let go. Checking before taking the mutex, or not taking it at
/// all, would hand out a second lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_and_the_write_happen_under_the_hosts_mutex() {
    use std::os::unix::fs::MetadataExt;

    let host = start_host(10);
    let t = host.connect().await;
    let spec = spec("state", Duration::from_secs(60));
    let state = host.session_dir.clone().unwrap().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mutex = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.join("shop.lock.mutex"))
        .unwrap();
    mutex.lock().unwrap();
    let ino = mutex.metadata().unwrap().ino();

    let bob = LockInfo::new_for("v3");
    let attempt = {
        let (t, spec, bob) = (t.clone(), spec.clone(), bob.clone());
        tokio::spawn(async move { lock::acquire(&*t, &spec, &bob, None).await })
    };
    bounded(async {
        while !someone_waits_for_lock_on(ino) {
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(!attempt.is_finished());

    let alice = LockInfo {
        started: 1_000,
        lease_until: u64::from(u32::MAX),
        ..LockInfo::new_for("v2")
    };
    std::fs::write(
        state.join("shop.lock"),
        format!(
            "token={}\nowner={}\npid={}\nrelease={}\nstarted={}\nlease_until={}\n",
            alice.token, alice.owner, alice.pid, alice.release, alice.started, alice.lease_until
        ),
    )
    .unwrap();
    mutex.unlock().unwrap();

    match bounded(attempt).await.unwrap() {
        Err(LockError::Held { holder, .. }) => assert_eq!(*holder, alice),
        other => panic!("expected Held by the lock written under the mutex, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_state_dir_stays_one_quoted_path() {
    let host = start_host(8);
    let t = host.connect().await;
    let state_dir = "state dir/$(touch pwned1)/`touch pwned2`;touch pwned3/it's \"here\"";
    let spec = spec(state_dir, Duration::from_secs(60));
    let me = LockInfo::new_for("v2");
    let (held, _) = bounded(lock::acquire(&*t, &spec, &me, None)).await.unwrap();

    let lock_file = host
        .session_dir
        .clone()
        .unwrap()
        .join(state_dir)
        .join("shop.lock");
    let text = std::fs::read_to_string(&lock_file).unwrap();
    assert_eq!(
        text,
        format!(
            "token={}\nowner={}\npid={}\nrelease=v2\nbalancers=\nstarted={}\nlease_until={}\n",
            me.token, me.owner, me.pid, held.started, held.lease_until
        )
    );
    assert_eq!(bounded(lock::read(&*t, &spec)).await.unwrap(), Some(held));
    bounded(lock::release(&*t, &spec, &me.token)).await.unwrap();
    assert!(!lock_file.exists());

    let mut stray = Vec::new();
    let mut dirs = vec![host.session_dir.clone().unwrap().clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pwned")
            {
                stray.push(path.clone());
            }
            if path.is_dir() {
                dirs.push(path);
            }
        }
    }
    assert!(stray.is_empty(), "the shell ran a substitution: {stray:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_state_dir_is_a_clear_error_and_an_absolute_one_works() {
    let host = start_host(9);
    let t = host.connect().await;
    // Root may write anywhere, so "not writable" is made with a file where a directory belongs.
    std::fs::write(host.session_dir.clone().unwrap().join("not-a-dir"), "").unwrap();
    let bad = spec("not-a-dir/state", Duration::from_secs(60));
    let me = LockInfo::new_for("v2");
    match bounded(lock::acquire(&*t, &bad, &me, None)).await {
        Err(LockError::Remote(message)) => {
            assert!(message.contains("not-a-dir/state"), "{message}")
        }
        other => panic!("expected a Remote error, got {other:?}"),
    }
    // Nothing to read, release or unlock there, and asking is not an error.
    assert_eq!(bounded(lock::read(&*t, &bad)).await.unwrap(), None);
    bounded(lock::release(&*t, &bad, &me.token)).await.unwrap();

    let absolute = host
        .session_dir
        .clone()
        .unwrap()
        .join("abs/state")
        .to_str()
        .unwrap()
        .to_string();
    let good = spec(&absolute, Duration::from_secs(60));
    bounded(lock::acquire(&*t, &good, &me, None)).await.unwrap();
    assert!(
        host.session_dir
            .clone()
            .unwrap()
            .join("abs/state/shop.lock")
            .is_file()
    );
    assert!(
        host.session_dir
            .clone()
            .unwrap()
            .join("abs/state/shop.lock.mutex")
            .is_file()
    );
    assert!(
        !host
            .session_dir
            .clone()
            .unwrap()
            .join("abs/state/shop.lock.new")
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_commands_run_only_while_the_lease_is_ours() {
    let host = start_host(20);
    let (a, b) = (host.connect().await, host.connect().await);
    // Long enough that two commands fit in the lease's provable part on a loaded machine.
    let short = spec("state", Duration::from_secs(10));
    let alice = LockInfo::new_for("v2");
    let bob = LockInfo::new_for("v3");
    let sent = Instant::now();
    let (held, _) = bounded(lock::acquire(&*a, &short, &alice, None))
        .await
        .unwrap();
    let fence = Arc::new(lock::Fence::new(short.clone(), alice.token.clone(), sent));
    let on_lock_host = lock::Fenced::new(a.clone(), fence.clone(), true);
    let elsewhere = lock::Fenced::new(b.clone(), fence.clone(), false);

    // While the lease is fresh, both run the command, and the command does not inherit the
    // mutex's descriptor (nothing it leaves behind can hold the lock).
    let out = bounded(on_lock_host.exec("echo changed > marker; ls /proc/self/fd", None, BOUND))
        .await
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert!(!out.stdout_text().lines().any(|fd| fd == "9"), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(host.session_dir.as_ref().unwrap().join("marker")).unwrap(),
        "changed\n"
    );
    assert!(
        bounded(elsewhere.exec("true", None, BOUND))
            .await
            .unwrap()
            .success()
    );

    // Another controller takes over once the lease ran out (nobody renewed: a paused
    // controller). The lock host refuses the command under the mutex, and the controller's
    // own clock already refuses it before it is sent.
    until_lb_clock_passes(&*b, held.lease_until).await;
    let (_, how) = bounded(lock::acquire(&*b, &short, &bob, None))
        .await
        .unwrap();
    assert!(matches!(how, Acquired::TookOver { .. }), "{how:?}");
    let refused = bounded(on_lock_host.exec("echo stale > marker", None, BOUND)).await;
    assert!(
        matches!(&refused, Err(TransportError::Fenced(_))),
        "{refused:?}"
    );
    let refused = bounded(elsewhere.exec("echo stale > marker", None, BOUND)).await;
    assert!(
        matches!(&refused, Err(TransportError::Fenced(_))),
        "{refused:?}"
    );
    // Even a command that got past the controller's clock is refused by the lock host.
    let out = bounded(a.exec(&fence.guard("echo stale > marker"), None, BOUND))
        .await
        .unwrap();
    assert_eq!(out.status, Some(lock::FENCED_OUT), "{out:?}");
    assert!(out.stderr_text().contains("fenced out"), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(host.session_dir.as_ref().unwrap().join("marker")).unwrap(),
        "changed\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_lease_whose_holder_is_provably_gone_is_taken_over() {
    let host = start_host(21);
    let (a, b) = (host.connect().await, host.connect().await);
    let spec = spec("state", Duration::from_secs(60));
    let mut ghost = LockInfo::new_for("v2");
    // A process of this machine that has exited: its pid is free.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    ghost.pid = child.id();
    bounded(lock::acquire(&*a, &spec, &ghost, None))
        .await
        .unwrap();
    let me = LockInfo::new_for("v3");
    let held = match bounded(lock::acquire(&*b, &spec, &me, None)).await {
        Err(LockError::Held { holder, .. }) => holder,
        other => panic!("expected Held, got {other:?}"),
    };
    assert!(lock::holder_is_gone(&held));
    // A live process of this machine, or a process elsewhere, is never taken for gone.
    let mut alive = held.clone();
    alive.pid = 1;
    assert!(!lock::holder_is_gone(&alive));
    let mut elsewhere = held.clone();
    elsewhere.owner = "ops@another-machine".into();
    assert!(!lock::holder_is_gone(&elsewhere));
    // Nor is a lock whose token roller never made.
    let mut forged = held.clone();
    forged.token = "$(reboot)".into();
    assert!(!lock::holder_is_gone(&forged));

    let (taken, how) = bounded(lock::take_over_gone(&*b, &spec, &me, &held))
        .await
        .unwrap();
    assert!(matches!(how, Acquired::TookOver { expired } if expired.token == ghost.token));
    assert_eq!(taken.token, me.token);
    // Taking over "the gone holder" when the lock changed hands meanwhile is refused.
    let third = LockInfo::new_for("v4");
    let refused = bounded(lock::take_over_gone(&*a, &spec, &third, &held)).await;
    assert!(
        matches!(refused, Err(LockError::Held { .. })),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_and_state_files_are_for_the_ssh_user_only() {
    use std::os::unix::fs::PermissionsExt;
    let host = start_host(22);
    let t = host.connect().await;
    // A directory someone made world-readable before roller ever ran.
    let state = host.session_dir.as_ref().unwrap().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let spec = spec("state", Duration::from_secs(60));
    bounded(lock::acquire(&*t, &spec, &LockInfo::new_for("v2"), None))
        .await
        .unwrap();
    let write = roller::journal::write_state_command("state", "shop");
    let out = bounded(t.exec(&write, Some(Bytes::from_static(b"{}")), BOUND))
        .await
        .unwrap();
    assert!(out.success(), "{out:?}");
    let mode = |name: &str| {
        std::fs::metadata(state.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(""), 0o700);
    for file in ["shop.lock", "shop.lock.mutex", "shop.rollout.json"] {
        assert_eq!(mode(file), 0o600, "{file}");
    }
    // Nothing but those three: the state's temporary file was renamed, not left behind.
    let mut names: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["shop.lock", "shop.lock.mutex", "shop.rollout.json"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_waited_for_past_our_lease_is_fenced_from_when_it_was_taken() {
    let host = start_host(23);
    let (a, b) = (host.connect().await, host.connect().await);
    let long = spec("state", Duration::from_secs(60));
    let short = spec("state", Duration::from_secs(3));
    let alice = LockInfo::new_for("v2");
    let bob = LockInfo::new_for("v3");
    bounded(lock::acquire(&*a, &long, &alice, None))
        .await
        .unwrap();
    let releaser = tokio::spawn({
        let (a, long, token) = (a.clone(), long.clone(), alice.token.clone());
        async move {
            // Longer than bob's whole lease.
            sleep(Duration::from_secs(5)).await;
            lock::release(&*a, &long, &token).await.unwrap();
        }
    });
    let began = Instant::now();
    let (_, how, sent) = bounded(lock::acquire_sent(
        &*b,
        &short,
        &bob,
        Some(Duration::from_secs(15)),
    ))
    .await
    .unwrap();
    releaser.await.unwrap();
    assert_eq!(how, Acquired::Fresh);
    assert!(began.elapsed() >= Duration::from_secs(5));
    assert!(sent >= began + Duration::from_secs(4), "{:?}", sent - began);
    let fence = lock::Fence::new(short, bob.token.clone(), sent);
    fence.check().unwrap();
}
