//! A host that stops answering (its network gone, the machine frozen) must fail the step that
//! waits on it within about `connect_timeout` for noticing, plus the reconnect attempts, each
//! bounded by `connect_timeout` too: never after the step's own, much longer deadline.

mod support;

use std::sync::Arc;
use std::time::Duration;

use roller::transport::reconnect::{Reconnecting, RetryPolicy};
use roller::transport::ssh::SshConnector;
use roller::transport::{Transport, TransportError};
use tokio::time::Instant;

use support::{children_of, start_host};

/// The sshd and everything it forked: the connection's processes and the command they run.
fn process_tree(root: u32) -> Vec<u32> {
    let mut all = vec![root];
    let mut i = 0;
    while i < all.len() {
        all.extend(children_of(all[i]));
        i += 1;
    }
    all
}

fn signal(pids: &[u32], signal: i32) {
    for pid in pids {
        // SAFETY: plain kill(2) on PIDs this test's own sshd owns.
        unsafe { libc::kill(*pid as i32, signal) };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_stops_answering_fails_its_step_long_before_the_step_deadline() {
    let host = start_host("127.0.93.1", false);
    let mut settings = host.settings();
    let connect_timeout = Duration::from_secs(2);
    settings.connect_timeout = connect_timeout;
    let policy = RetryPolicy {
        attempts: 2,
        first_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(200),
    };
    let connector = Arc::new(SshConnector::new(settings).unwrap());
    let session = Reconnecting::connect(connector, host.endpoint(), policy)
        .await
        .unwrap();
    assert!(
        session
            .exec("true", None, Duration::from_secs(10))
            .await
            .unwrap()
            .success()
    );

    // A step with a long deadline that prints nothing, as a restart waiting on a slow app does.
    let step_deadline = Duration::from_secs(120);
    let running = tokio::spawn({
        let session = Arc::new(session);
        async move {
            let started = Instant::now();
            let result = session.exec("sleep 600", None, step_deadline).await;
            (result, started.elapsed())
        }
    });
    // The command runs once the shell has forked it; then the whole host freezes: the
    // connection stays open in the kernel, but nothing on the host answers any more.
    let frozen = loop {
        let tree = process_tree(host.sshd.pid());
        if tree.len() >= 4 {
            signal(&tree, libc::SIGSTOP);
            break tree;
        }
        tokio::task::yield_now().await;
    };
    let (result, waited) = tokio::time::timeout(step_deadline, running)
        .await
        .expect("the step ended by its own deadline, not by noticing the host")
        .unwrap();
    signal(&process_tree(host.sshd.pid()), libc::SIGCONT);
    signal(&frozen, libc::SIGCONT);

    assert!(
        matches!(
            result,
            Err(TransportError::Connect(_) | TransportError::Disconnected(_))
        ),
        "{result:?}"
    );
    // Noticing takes about connect_timeout; each of the two reconnects is bounded by it too
    // (the frozen sshd accepts TCP but never speaks), with their backoff in between. Twice
    // that leaves room for a loaded machine and is still far below the step's deadline.
    let bound = connect_timeout * (1 + policy.attempts) + policy.max_backoff * policy.attempts;
    assert!(
        waited < bound * 2,
        "gave up after {waited:?}; expected about {bound:?}"
    );
}
