//! The reconnecting transport against a real OpenSSH sshd whose connections, listener and host
//! key are taken away under it, because what a dead connection looks like from the client is
//! up to the server and the kernel, not to a fake.
//!
//! Every test runs its own sshd on its own loopback address (127.81.<n>.1) in a tempdir.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use roller::transport::reconnect::{Reconnecting, RetryPolicy};
use roller::transport::ssh::{SshConnector, SshSettings};
use roller::transport::{Connector, Endpoint, Transport, TransportError};
use roller_fleet::sshd::{Sshd, kill_with_connections};
use roller_fleet::{Fleet, FleetSpec, proc};
use support::{Host, children_of};

const DEADLINE: Duration = Duration::from_secs(30);

/// Short, so that a host that stays down fails its call in well under a second.
const POLICY: RetryPolicy = RetryPolicy {
    attempts: 3,
    first_backoff: Duration::from_millis(100),
    max_backoff: Duration::from_millis(400),
};

fn start_host(n: u8) -> Host {
    support::start_host(&format!("127.81.{n}.1"), false)
}

/// Counts connects, so tests can tell one shared reconnect from several, and a refusal that
/// was not retried from one that was.
struct Counting {
    inner: SshConnector,
    connects: AtomicU32,
}

impl Counting {
    fn new(settings: SshSettings) -> Arc<Counting> {
        Arc::new(Counting {
            inner: SshConnector::new(settings).unwrap(),
            connects: AtomicU32::new(0),
        })
    }

    fn connects(&self) -> u32 {
        self.connects.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Connector for Counting {
    async fn connect(&self, endpoint: &Endpoint) -> Result<Arc<dyn Transport>, TransportError> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        self.inner.connect(endpoint).await
    }
}

async fn connect(host: &Host) -> (Arc<Counting>, Arc<Reconnecting>) {
    let mut settings = host.settings();
    settings.connect_timeout = Duration::from_secs(3);
    let connector = Counting::new(settings);
    let session = Reconnecting::connect(connector.clone(), host.endpoint(), POLICY)
        .await
        .unwrap();
    (connector, session)
}

/// Kills the server side of every open connection (sshd forks a process per connection),
/// leaving the listener up: the host is fine, only our connection is gone.
fn kill_connections(host: &Host) {
    let connections = children_of(host.sshd.pid());
    assert!(!connections.is_empty(), "no connection to kill");
    for pid in connections {
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
    }
}

/// Takes the whole sshd away, listener and connections, as when a host's sshd crashes.
fn kill_sshd(host: &Host) {
    assert!(kill_with_connections(host.sshd.pid()));
}

/// Starts sshd again on the same address and port, with the same host key unless `new_key`.
fn restart_sshd(host: &mut Host, new_key: bool) {
    let spec = host.sshd.spec().clone();
    if new_key {
        for name in ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"] {
            std::fs::remove_file(spec.dir.join(name)).unwrap();
        }
    }
    // Replacing the handle reaps the old listener.
    host.sshd = Sshd::start(spec).unwrap();
}

async fn echo(session: &Reconnecting, text: &str) -> Result<String, TransportError> {
    let out = session
        .exec(&format!("echo {text}"), None, DEADLINE)
        .await?;
    assert!(out.success(), "{out:?}");
    Ok(out.stdout_text())
}

fn logins(host: &Host) -> usize {
    host.sshd_log().matches("Accepted publickey").count()
}

fn wait_for(condition: impl Fn() -> bool, what: &str) {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_connection_is_replaced_and_the_call_sent_again() {
    let host = start_host(1);
    let (connector, session) = connect(&host).await;
    assert_eq!(echo(&session, "one").await.unwrap(), "one");

    // Idle connection lost: the next call reconnects and succeeds.
    kill_connections(&host);
    assert_eq!(echo(&session, "two").await.unwrap(), "two");
    assert_eq!(session.reconnects(), 1);
    assert_eq!(connector.connects(), 2);

    // Lost mid-command: the command runs again on the new connection.
    let marker = host.dir.path().join("started");
    let running = tokio::spawn({
        let session = session.clone();
        let command = format!("touch '{}'; sleep 1; echo done", marker.display());
        async move { session.exec(&command, None, DEADLINE).await }
    });
    tokio::task::block_in_place(|| wait_for(|| marker.exists(), "the command to start"));
    kill_connections(&host);
    let out = running.await.unwrap().unwrap();
    assert_eq!(out.stdout_text(), "done");
    assert_eq!(session.reconnects(), 2);
    assert_eq!(logins(&host), 3, "{}", host.sshd_log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_stays_down_fails_fast_and_recovers_when_sshd_is_back() {
    let mut host = start_host(2);
    let (connector, session) = connect(&host).await;
    assert_eq!(echo(&session, "up").await.unwrap(), "up");

    kill_sshd(&host);
    let started = Instant::now();
    let result = echo(&session, "down").await;
    let elapsed = started.elapsed();
    assert!(
        matches!(result, Err(TransportError::Connect(_))),
        "expected a Connect error, got {result:?}"
    );
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert_eq!(connector.connects(), 1 + POLICY.attempts);
    assert_eq!(session.reconnects(), 0);

    restart_sshd(&mut host, false);
    assert_eq!(echo(&session, "back").await.unwrap(), "back");
    assert_eq!(session.reconnects(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_host_key_on_reconnect_is_refused_and_not_retried() {
    let mut host = start_host(3);
    let (connector, session) = connect(&host).await;
    assert_eq!(echo(&session, "genuine").await.unwrap(), "genuine");

    kill_sshd(&host);
    restart_sshd(&mut host, true);
    let started = Instant::now();
    let result = echo(&session, "impostor").await;
    assert!(
        matches!(result, Err(TransportError::HostKeyChanged { .. })),
        "expected HostKeyChanged, got {result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(connector.connects(), 2, "the refusal was retried");

    // Refused for good: later calls do not try the host again.
    let again = echo(&session, "impostor").await;
    assert!(
        matches!(again, Err(TransportError::HostKeyChanged { .. })),
        "expected HostKeyChanged, got {again:?}"
    );
    assert_eq!(connector.connects(), 2);
    assert_eq!(session.reconnects(), 0);
    assert_eq!(logins(&host), 0, "{}", host.sshd_log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_on_a_dead_connection_share_one_reconnect() {
    let host = start_host(4);
    let (connector, session) = connect(&host).await;
    assert_eq!(echo(&session, "first").await.unwrap(), "first");

    kill_connections(&host);
    let calls = (0..10).map(|i| {
        let session = session.clone();
        async move {
            let text = echo(&session, &i.to_string())
                .await
                .unwrap_or_else(|e| panic!("exec {i}: {e}"));
            assert_eq!(text, i.to_string());
        }
    });
    futures::future::join_all(calls).await;
    assert_eq!(session.reconnects(), 1);
    assert_eq!(connector.connects(), 2);
    assert_eq!(logins(&host), 2, "{}", host.sshd_log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_times_out_is_not_retried() {
    let host = start_host(5);
    let (connector, session) = connect(&host).await;
    let deadline = Duration::from_millis(300);

    let result = session.exec("sleep 5", None, deadline).await;
    assert_eq!(result, Err(TransportError::Timeout(deadline)));
    assert_eq!(session.reconnects(), 0);
    assert_eq!(connector.connects(), 1);

    session.close().await;
    let closed = echo(&session, "closed").await;
    assert!(
        matches!(closed, Err(TransportError::Disconnected(_))),
        "expected Disconnected after close, got {closed:?}"
    );
    assert_eq!(connector.connects(), 1, "reconnected after close");
}

/// The fleet's sshd helpers as rollout tests use them: roller's own connector, strict
/// known_hosts, across a kill and a restart of a fleet host's sshd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_host_sshd_killed_and_restarted() {
    let mut fleet = tokio::task::block_in_place(|| {
        Fleet::up(FleetSpec::for_test("reconnect_fleet", 1)).expect("fleet up")
    });
    let mut settings = SshSettings::new(
        fleet.user(),
        Some(fleet.identity_path()),
        fleet.known_hosts_path(),
    );
    settings.connect_timeout = Duration::from_secs(3);
    let endpoint = Endpoint {
        name: "web-1".into(),
        address: fleet.host_address("web-1"),
        port: fleet.spec().ssh_port,
        user: Some(fleet.host_user("web-1")),
        ..Endpoint::default()
    };
    let connector = Counting::new(settings);
    let session = Reconnecting::connect(connector.clone(), endpoint, POLICY)
        .await
        .unwrap();
    let live = |out: roller::transport::ExecOutput| out.stdout_text();
    let readlink = "readlink shop/current";
    assert_eq!(
        live(session.exec(readlink, None, DEADLINE).await.unwrap()),
        "releases/v1"
    );

    let old_sshd = fleet.sshd_pid("web-1");
    tokio::task::block_in_place(|| fleet.kill_sshd("web-1"));
    let started = Instant::now();
    let result = session.exec(readlink, None, DEADLINE).await;
    assert!(
        matches!(result, Err(TransportError::Connect(_))),
        "expected a Connect error, got {result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(fleet.app_health("web-1"), Some(200), "the app kept serving");

    tokio::task::block_in_place(|| fleet.restart_sshd("web-1")).unwrap();
    let new_sshd = fleet.sshd_pid("web-1");
    assert_ne!(new_sshd, old_sshd);
    assert_eq!(
        live(session.exec(readlink, None, DEADLINE).await.unwrap()),
        "releases/v1"
    );
    assert_eq!(session.reconnects(), 1);

    session.close().await;
    let app = fleet.app_pid("web-1").expect("app pid");
    tokio::task::block_in_place(|| fleet.down());
    assert!(!proc::alive(new_sshd), "restarted sshd survived down");
    assert!(!proc::alive(app), "app survived down");
}
