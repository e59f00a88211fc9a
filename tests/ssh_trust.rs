//! Whom the SSH transport trusts and how it proves who it is, against a real OpenSSH sshd:
//! host keys as OpenSSH reads known_hosts (unknown, changed, `@revoked`, `@cert-authority`),
//! a client key the host does not accept, and a key held by ssh-agent.
//!
//! Every test runs its own sshd on its own loopback address (127.79.<n>.1, numbered apart from
//! `ssh_transport.rs`'s) in a tempdir; the `Sshd` guard stops it by PID when the test ends.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use roller::transport::ssh::{SshConnector, SshSettings};
use roller::transport::{Connector, Endpoint, TransportError};
use roller_fleet::sshd::{ClientKey, generate_client_key};
use support::{Host, current_user};

const DEADLINE: Duration = Duration::from_secs(30);

fn start_host(n: u8, with_session_dir: bool) -> Host {
    support::start_host(&format!("127.79.{n}.1"), with_session_dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_key_is_refused_without_retry_or_login() {
    let host = start_host(6, false);
    std::fs::write(&host.known_hosts, "# nothing known yet\n").unwrap();

    let started = Instant::now();
    let result = SshConnector::new(host.settings())
        .unwrap()
        .connect(&host.endpoint())
        .await;
    let expected_host = format!("[{}]:{}", host.sshd.address(), host.sshd.port());
    match result {
        Err(TransportError::HostKeyUnknown {
            host: h,
            fingerprint,
            known_hosts,
        }) => {
            assert_eq!(h, expected_host);
            assert!(fingerprint.starts_with("SHA256:"), "{fingerprint}");
            assert_eq!(known_hosts, host.known_hosts.display().to_string());
        }
        Err(other) => panic!("expected HostKeyUnknown, got {other:?}"),
        Ok(_) => panic!("expected HostKeyUnknown, got a session"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(!host.sshd_log().contains("Accepted"), "{}", host.sshd_log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_host_key_is_refused_with_the_line() {
    let host = start_host(7, false);
    let other = generate_client_key(&host.dir.path().join("impostor")).unwrap();
    let other_key = other.public_key_line.split_whitespace().nth(1).unwrap();
    std::fs::write(
        &host.known_hosts,
        format!(
            "# recorded earlier\n[{}]:{} ssh-ed25519 {other_key}\n",
            host.sshd.address(),
            host.sshd.port()
        ),
    )
    .unwrap();

    let started = Instant::now();
    let result = SshConnector::new(host.settings())
        .unwrap()
        .connect(&host.endpoint())
        .await;
    match result {
        Err(TransportError::HostKeyChanged {
            host: h,
            line,
            fingerprint,
            ..
        }) => {
            assert_eq!(h, format!("[{}]:{}", host.sshd.address(), host.sshd.port()));
            assert_eq!(line, 2);
            assert!(fingerprint.starts_with("SHA256:"), "{fingerprint}");
        }
        Err(other) => panic!("expected HostKeyChanged, got {other:?}"),
        Ok(_) => panic!("expected HostKeyChanged, got a session"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(!host.sshd_log().contains("Accepted"), "{}", host.sshd_log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_not_authorized_is_an_auth_error() {
    let host = start_host(8, false);
    let stranger = generate_client_key(&host.dir.path().join("stranger")).unwrap();
    let mut settings = host.settings();
    settings.identity = Some(stranger.private_key.clone());

    let result = SshConnector::new(settings)
        .unwrap()
        .connect(&host.endpoint())
        .await;
    match result {
        Err(TransportError::Auth { user, detail }) => {
            assert_eq!(user, current_user());
            assert!(detail.contains("stranger"), "{detail}");
        }
        Err(other) => panic!("expected Auth, got {other:?}"),
        Ok(_) => panic!("expected Auth, got a session"),
    }
}

/// A private ssh-agent holding `key`, killed by PID when dropped.
struct Agent {
    child: std::process::Child,
    socket: PathBuf,
}

impl Agent {
    fn start(dir: &Path, key: &ClientKey) -> Agent {
        let socket = dir.join("agent.sock");
        let child = std::process::Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut agent = Agent { child, socket };
        let started = Instant::now();
        while !agent.socket.exists() {
            assert!(
                agent.child.try_wait().unwrap().is_none(),
                "ssh-agent exited"
            );
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no agent socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let added = std::process::Command::new("ssh-add")
            .arg("-q")
            .arg(&key.private_key)
            .env("SSH_AUTH_SOCK", &agent.socket)
            .output()
            .unwrap();
        assert!(added.status.success(), "ssh-add: {added:?}");
        agent
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SshConnector finds the agent through SSH_AUTH_SOCK, and changing the environment of this
/// multi-threaded test process would race with the other tests; so the agent half runs in a
/// child process of this same test binary that starts with the variable set.
#[test]
fn authenticates_through_ssh_agent() {
    let host = start_host(15, false);
    let agent = Agent::start(host.dir.path(), &host.key);
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "agent_child", "--ignored", "--nocapture"])
        .env("SSH_AUTH_SOCK", &agent.socket)
        .env("ROLLER_TEST_AGENT_HOST", host.sshd.address())
        .env("ROLLER_TEST_AGENT_PORT", host.sshd.port().to_string())
        .env("ROLLER_TEST_AGENT_KNOWN_HOSTS", &host.known_hosts)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && text.contains("1 passed"),
        "agent child failed:\n{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        host.sshd_log().contains("Accepted publickey"),
        "{}",
        host.sshd_log()
    );
}

#[tokio::test]
#[ignore = "run by authenticates_through_ssh_agent in a child process"]
async fn agent_child() {
    let Ok(address) = std::env::var("ROLLER_TEST_AGENT_HOST") else {
        panic!("only meaningful when started by authenticates_through_ssh_agent");
    };
    let port: u16 = std::env::var("ROLLER_TEST_AGENT_PORT")
        .unwrap()
        .parse()
        .unwrap();
    let known_hosts = PathBuf::from(std::env::var("ROLLER_TEST_AGENT_KNOWN_HOSTS").unwrap());
    let settings = SshSettings::new(current_user(), None, known_hosts);
    let ssh = SshConnector::new(settings)
        .unwrap()
        .connect(&Endpoint {
            name: "agent-host".into(),
            address,
            port,
            user: None,
            ..Endpoint::default()
        })
        .await
        .unwrap();
    let out = ssh.exec("echo via agent", None, DEADLINE).await.unwrap();
    assert_eq!(out.stdout_text(), "via agent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_host_key_is_refused_even_when_a_plain_line_lists_it() {
    let host = start_host(20, false);
    let recorded = std::fs::read_to_string(&host.known_hosts).unwrap();
    let plain = recorded.lines().next().unwrap().to_string();
    // `@revoked <hosts> <type> <key>`: the same key, revoked for every host.
    let mut fields = plain.split_whitespace().skip(1);
    let (kind, key) = (fields.next().unwrap(), fields.next().unwrap());
    std::fs::write(
        &host.known_hosts,
        format!("{plain}\n# compromised\n@revoked * {kind} {key}\n"),
    )
    .unwrap();

    let result = SshConnector::new(host.settings())
        .unwrap()
        .connect(&host.endpoint())
        .await;
    match result {
        Err(TransportError::HostKeyRevoked { line, .. }) => assert_eq!(line, 3),
        Err(other) => panic!("expected HostKeyRevoked, got {other:?}"),
        Ok(_) => panic!("expected HostKeyRevoked, got a session"),
    }
    assert!(!host.sshd_log().contains("Accepted"), "{}", host.sshd_log());

    // Without the @revoked line the same file is accepted: the refusal is the marker's doing.
    std::fs::write(&host.known_hosts, format!("{plain}\n")).unwrap();
    let session = SshConnector::new(host.settings())
        .unwrap()
        .connect(&host.endpoint())
        .await
        .unwrap();
    session.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_key_known_only_through_a_cert_authority_is_refused_clearly() {
    let host = start_host(21, false);
    let ca = generate_client_key(&host.dir.path().join("ca")).unwrap();
    std::fs::write(
        &host.known_hosts,
        format!("@cert-authority * {}\n", ca.public_key_line),
    )
    .unwrap();
    let result = SshConnector::new(host.settings())
        .unwrap()
        .connect(&host.endpoint())
        .await;
    match result {
        Err(e) => assert!(
            e.to_string().contains("does not accept host certificates"),
            "{e}"
        ),
        Ok(_) => panic!("expected a refusal, got a session"),
    }
}
