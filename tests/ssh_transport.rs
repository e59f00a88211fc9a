//! The SSH transport against a real OpenSSH sshd, because the behaviour that matters
//! (MaxSessions, MaxStartups, commands that stop reading stdin, direct-tcpip, dropped
//! connections) is the server's. Host keys and authentication are `ssh_trust.rs`'s.
//!
//! Every test runs its own sshd on its own loopback address (127.79.<n>.1) in a tempdir; the
//! `Sshd` guard stops it by PID when the test ends, pass or fail.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use roller::transport::ssh::SshConnector;
use roller::transport::{Connector, TransportError};
use sha2::{Digest, Sha256};
use support::{Host, children_of, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(30);

fn start_host(n: u8, with_session_dir: bool) -> Host {
    support::start_host(&format!("127.79.{n}.1"), with_session_dir)
}

/// Deterministic, incompressible-looking bytes (xorshift), so corruption cannot hide in runs.
fn payload(len: usize) -> Bytes {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate(len);
    Bytes::from(data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_returns_stdout_stderr_and_exit_status() {
    let host = start_host(1, false);
    let ssh = host.connect().await;

    let out = ssh
        .exec("echo out; echo err >&2; exit 7", None, DEADLINE)
        .await
        .unwrap();
    assert_eq!(out.status, Some(7));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");

    let out = ssh
        .exec("printf '%s' \"$((6 * 7))\"", None, DEADLINE)
        .await
        .unwrap();
    assert!(out.success());
    assert_eq!(out.stdout_text(), "42");
    assert!(out.stderr.is_empty());

    // stdin gets EOF even when none is given, so a reading command does not hang.
    let out = ssh.exec("wc -c", None, DEADLINE).await.unwrap();
    assert_eq!(out.stdout_text().trim(), "0");

    ssh.close().await;
    match ssh.exec("true", None, DEADLINE).await {
        Err(TransportError::Disconnected(_)) => {}
        other => panic!("exec after close: expected Disconnected, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_arrives_byte_exact() {
    let host = start_host(2, false);
    let ssh = host.connect().await;
    let data = payload(5 * 1024 * 1024 + 17);
    let expected = hex::encode(Sha256::digest(&data));

    let out = ssh
        .exec("sha256sum -b; wc -c >&2", Some(data.clone()), DEADLINE)
        .await
        .unwrap();
    assert!(out.success(), "{out:?}");
    let remote = out.stdout_text();
    assert_eq!(remote.split_whitespace().next(), Some(expected.as_str()));

    // Large stdout comes back intact too (more than the channel window).
    let out = ssh.exec("cat", Some(data.clone()), DEADLINE).await.unwrap();
    assert!(out.success());
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data[..], "echoed bytes differ");
}

/// Prints the upload speed on a line `cargo xtask bench` reads and reports: how fast is a
/// question for that bench, on a quiet machine, not for a test sharing two cores with others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_jar_uploads_whole() {
    let host = start_host(3, false);
    let ssh = host.connect().await;
    let data = Bytes::from(vec![0x5a; 100 * 1024 * 1024]);

    let started = Instant::now();
    let out = ssh
        .exec("wc -c", Some(data.clone()), DEADLINE)
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout_text(), data.len().to_string());
    let mb_per_s = data.len() as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64();
    eprintln!("uploaded 100 MiB in {elapsed:?}: {mb_per_s:.0} MiB/s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_into_a_command_that_exits_returns_promptly() {
    let host = start_host(4, false);
    let ssh = host.connect().await;
    // Far more than the channel window, so the writer is certainly blocked when the command ends.
    let data = Bytes::from(vec![0u8; 64 * 1024 * 1024]);

    let started = Instant::now();
    let out = ssh.exec("exit 3", Some(data), DEADLINE).await.unwrap();
    assert_eq!(out.status, Some(3));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );

    // The connection is still good afterwards.
    let out = ssh.exec("echo still here", None, DEADLINE).await.unwrap();
    assert_eq!(out.stdout_text(), "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_bounds_a_command_that_never_finishes() {
    let host = start_host(5, false);
    let ssh = host.connect().await;

    let started = Instant::now();
    let result = ssh
        .exec(
            "sleep 20",
            Some(Bytes::from(vec![0u8; 8 * 1024 * 1024])),
            Duration::from_millis(700),
        )
        .await;
    assert_eq!(
        result,
        Err(TransportError::Timeout(Duration::from_millis(700)))
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );

    // A timed-out channel is closed, so once its command ends its MaxSessions slot is free
    // again. (OpenSSH keeps the session of a still-running command, and refuses the signal that
    // could end it for root logins, so the command here is one that ends when its stdin is
    // closed: an upload cut off by the deadline.) After more abandoned uploads than MaxSessions
    // 10, a normal command must still get a channel: if closing leaked sessions, every slot
    // would stay taken and it would be refused until its deadline.
    let stdin = Bytes::from(vec![0u8; 256 * 1024 * 1024]);
    for i in 0..12 {
        let result = ssh
            .exec(
                "cat > /dev/null",
                Some(stdin.clone()),
                Duration::from_millis(150),
            )
            .await;
        match result {
            Err(TransportError::Timeout(_)) => {}
            // On a loaded machine the server may not have reaped the previous ones yet.
            Err(TransportError::Channel(_)) if i > 0 => {}
            other => panic!(
                "abandoned upload {i}: {other:?}\nsshd log:\n{}",
                host.sshd_log()
            ),
        }
    }
    let out = ssh.exec("echo alive", None, DEADLINE).await.unwrap();
    assert_eq!(out.stdout_text(), "alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_execs_share_one_connection() {
    let host = start_host(9, false);
    let settings = host.settings();
    let in_flight = settings.max_channels_per_host;
    assert!(
        (2..=20).contains(&in_flight),
        "the transport's channel cap is {in_flight}; this test needs 2 to 20"
    );
    let ssh = host.connect().await;
    let arrived = host.dir.path().join("arrived");
    std::fs::create_dir(&arrived).unwrap();

    // A rendezvous on the host: each command marks its arrival, then waits until as many
    // commands as the transport runs at once have arrived. Run one after another, the first
    // would wait alone and give up after 10 s, so passing proves the calls overlapped in time.
    let runs = (0..20).map(|i| {
        let ssh = ssh.clone();
        let command = format!(
            "cd '{dir}' && touch {i} && waited=0 && \
             while [ \"$(ls | wc -l)\" -lt {in_flight} ]; do \
                 [ $waited -ge 1000 ] && echo \"alone after 10s\" >&2 && exit 9; \
                 sleep 0.01; waited=$((waited + 1)); \
             done && echo {i}",
            dir = arrived.display(),
        );
        async move {
            let out = ssh
                .exec(&command, None, DEADLINE)
                .await
                .unwrap_or_else(|e| panic!("exec {i}: {e}"));
            assert!(out.success(), "exec {i}: {out:?}");
            assert_eq!(out.stdout_text(), i.to_string());
        }
    });
    futures::future::join_all(runs).await;
    assert_eq!(std::fs::read_dir(&arrived).unwrap().count(), 20);

    // One connection: sshd logged exactly one login.
    assert_eq!(
        host.sshd_log().matches("Accepted publickey").count(),
        1,
        "{}",
        host.sshd_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_cap_above_max_sessions_still_succeeds_by_retrying() {
    let host = start_host(10, false);
    let mut settings = host.settings();
    // Past OpenSSH's MaxSessions 10: the server refuses some opens and the transport must wait.
    settings.max_channels_per_host = 16;
    let ssh = SshConnector::new(settings)
        .unwrap()
        .connect(&host.endpoint())
        .await
        .unwrap();

    let runs = (0..16).map(|i| {
        let ssh = ssh.clone();
        async move {
            let out = ssh
                .exec(&format!("sleep 0.3; echo {i}"), None, DEADLINE)
                .await
                .unwrap_or_else(|e| panic!("exec {i}: {e}"));
            assert_eq!(out.stdout_text(), i.to_string());
        }
    });
    futures::future::join_all(runs).await;
}

/// A one-shot HTTP server on loopback answering every request with `status`.
async fn tiny_http_server(address: &str, status: &'static str) -> u16 {
    let listener = tokio::net::TcpListener::bind((address, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&request);
                // Answer 400 unless the request looks like what roller is meant to send.
                let status = if text.starts_with("GET /health HTTP/1.1\r\n")
                    && text.contains("\r\nConnection: close\r\n")
                {
                    status
                } else {
                    "400 Bad Request"
                };
                let response = format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nok");
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_get_through_the_host() {
    let host = start_host(11, false);
    let ssh = host.connect().await;
    let address = host.sshd.address().to_string();

    let healthy = tiny_http_server(&address, "200 OK").await;
    let sick = tiny_http_server(&address, "503 Service Unavailable").await;
    assert_eq!(
        ssh.http_get(&address, healthy, "/health", DEADLINE).await,
        Ok(200)
    );
    assert_eq!(
        ssh.http_get(&address, sick, "/health", DEADLINE).await,
        Ok(503)
    );

    // Nothing listening: the host's connect is refused and that must come back at once.
    let closed = free_port(&address);
    let started = Instant::now();
    let result = ssh.http_get(&address, closed, "/health", DEADLINE).await;
    assert!(
        matches!(result, Err(TransportError::Channel(_))),
        "expected a Channel error, got {result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );

    // Many checks in a row neither leak channels nor wedge the connection.
    for _ in 0..30 {
        assert_eq!(
            ssh.http_get(&address, healthy, "/health", DEADLINE).await,
            Ok(200)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_dir_is_the_working_directory() {
    let host = start_host(12, true);
    let ssh = host.connect().await;
    let root: &Path = host.session_dir.as_deref().unwrap();

    let out = ssh.exec("pwd", None, DEADLINE).await.unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(
        PathBuf::from(out.stdout_text()),
        root.canonicalize().unwrap()
    );

    // Relative paths land under the host's own root.
    let out = ssh
        .exec(
            "mkdir -p app && cat > app/marker",
            Some(Bytes::from_static(b"hello")),
            DEADLINE,
        )
        .await
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(std::fs::read(root.join("app/marker")).unwrap(), b"hello");

    // The command line still reaches the shell intact, quoting and all.
    let out = ssh
        .exec("printf '%s|' 'a b' \"c\" && exit 4", None, DEADLINE)
        .await
        .unwrap();
    assert_eq!(out.status, Some(4));
    assert_eq!(out.stdout_text(), "a b|c|");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_is_reported_as_disconnected() {
    let host = start_host(13, false);
    let ssh = host.connect().await;
    let connections = children_of(host.sshd.pid());
    assert_eq!(connections.len(), 1, "one connection, one sshd child");

    let running = tokio::spawn({
        let ssh = ssh.clone();
        async move { ssh.exec("sleep 10", None, DEADLINE).await }
    });
    // The server side of the connection dies, as when a host reboots mid-command.
    for pid in connections {
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
    }
    let started = Instant::now();
    let result = running.await.unwrap();
    assert!(
        matches!(result, Err(TransportError::Disconnected(_))),
        "expected Disconnected, got {result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let again = ssh.exec("true", None, DEADLINE).await;
    assert!(
        matches!(again, Err(TransportError::Disconnected(_))),
        "expected Disconnected, got {again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_storm_past_max_startups_is_retried() {
    let host = start_host(14, false);
    let mut settings = host.settings();
    // Far past MaxStartups 10:30:100, so sshd drops some handshakes and the connector must retry.
    settings.max_concurrent_connects = 40;
    settings.connect_timeout = Duration::from_secs(20);
    let connector = Arc::new(SshConnector::new(settings).unwrap());

    let connects = (0..40).map(|i| {
        let connector = connector.clone();
        let endpoint = host.endpoint();
        async move {
            let ssh = connector
                .connect(&endpoint)
                .await
                .unwrap_or_else(|e| panic!("connect {i}: {e}"));
            let out = ssh.exec("echo ok", None, DEADLINE).await.unwrap();
            assert_eq!(out.stdout_text(), "ok");
            ssh
        }
    });
    let sessions = futures::future::join_all(connects).await;
    assert_eq!(sessions.len(), 40);
    let log = host.sshd_log();
    assert_eq!(log.matches("Accepted publickey").count(), 40, "{log}");
    // Whether sshd throttled depends on timing, so it is reported rather than asserted.
    let throttled: Vec<&str> = log.lines().filter(|l| l.contains("MaxStartups")).collect();
    eprintln!("sshd MaxStartups: {throttled:?}");
}

/// Peak resident memory of this process, from /proc.
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_printing_a_gigabyte_fails_with_the_memory_bounded() {
    let host = start_host(22, false);
    let session = host.connect().await;
    let before = peak_rss_bytes();
    let started = Instant::now();
    let result = session
        .exec(
            "head -c 1000000000 /dev/zero",
            None,
            Duration::from_secs(120),
        )
        .await;
    match &result {
        Err(TransportError::Channel(message)) => {
            assert!(message.contains("printed more than"), "{message}")
        }
        other => panic!("expected the output cap, got {other:?}"),
    }
    // Without the cap it would hold the whole gigabyte; the margin leaves room for other
    // tests of this binary running at the same time (one uploads 100 MB).
    let grown = peak_rss_bytes().saturating_sub(before);
    assert!(
        grown < 512 << 20,
        "the controller grew by {} MiB",
        grown >> 20
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    // The session is still usable after the cap cut the command off.
    let out = session.exec("echo ok", None, DEADLINE).await.unwrap();
    assert_eq!(out.stdout_text(), "ok");
    session.close().await;
}
