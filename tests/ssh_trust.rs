//! Whom the SSH transport trusts and how it proves who it is, against a real OpenSSH sshd:
//! host keys as OpenSSH reads known_hosts (unknown, changed, `@revoked`, `@cert-authority`),
//! a client key the host does not accept, a key held by ssh-agent, and a user certificate
//! signed by a CA the host trusts.
//!
//! Every test runs its own sshd on its own loopback address (127.79.<n>.1, numbered apart from
//! `ssh_transport.rs`'s) in a tempdir; the `Sshd` guard stops it by PID when the test ends.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use roller::transport::ssh::{SshConnector, SshSettings};
use roller::transport::{Connector, Endpoint, TransportError};
use roller_fleet::sshd::{ClientKey, Sshd, SshdOptions, SshdSpec, generate_client_key};
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

/// `ssh-keygen` at test time only: a user CA, and certificates it signs.
fn ssh_keygen(args: &[&str]) {
    let out = std::process::Command::new("ssh-keygen")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("ssh-keygen (openssh-client) on PATH");
    assert!(
        out.status.success(),
        "ssh-keygen {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client key in `dir/<name>` whose certificate (`<name>-cert.pub`, beside it, where roller
/// and OpenSSH look) the CA at `ca` signed for `principal`.
fn certified_key(dir: &Path, name: &str, ca: &Path, principal: &str) -> ClientKey {
    let key = generate_client_key(&dir.join(name)).unwrap();
    let public = format!("{}.pub", key.private_key.display());
    let ca = ca.to_str().unwrap();
    ssh_keygen(&[
        "-q",
        "-s",
        ca,
        "-I",
        "roller-test",
        "-n",
        principal,
        "-V",
        "-5m:+1h",
        &public,
    ]);
    assert!(dir.join(format!("{name}-cert.pub")).exists());
    key
}

/// A host that trusts a user CA and lists no client key at all: only a certificate the CA
/// signed, for the login's principal, gets in, as in fleets that hand out short-lived
/// certificates instead of managing authorized_keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_a_trusted_user_ca_logs_in_and_the_bare_key_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("user_ca");
    ssh_keygen(&[
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        "user-ca",
        "-f",
        ca.to_str().unwrap(),
    ]);
    let authorized_keys = dir.path().join("authorized_keys");
    std::fs::write(&authorized_keys, "").unwrap();
    let address = "127.79.22.1";
    let sshd = Sshd::start(SshdSpec {
        dir: dir.path().join("sshd"),
        address: address.into(),
        port: support::free_port(address),
        authorized_keys,
        session_dir: None,
        options: SshdOptions {
            trusted_user_ca_keys: Some(dir.path().join("user_ca.pub")),
            ..SshdOptions::default()
        },
    })
    .unwrap();
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, format!("{}\n", sshd.known_hosts_line())).unwrap();
    let endpoint = Endpoint {
        name: "certified".into(),
        address: address.into(),
        port: sshd.port(),
        ..Endpoint::default()
    };
    let connect = |key: &ClientKey| {
        let mut settings = SshSettings::new(
            current_user(),
            Some(key.private_key.clone()),
            known_hosts.clone(),
        );
        settings.connect_timeout = Duration::from_secs(10);
        let endpoint = endpoint.clone();
        async move { SshConnector::new(settings)?.connect(&endpoint).await }
    };
    let log = || std::fs::read_to_string(dir.path().join("sshd/sshd.log")).unwrap_or_default();

    let key = certified_key(dir.path(), "id_ed25519", &ca, &current_user());
    let session = connect(&key)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", log()));
    let out = session.exec("id -un", None, DEADLINE).await.unwrap();
    assert_eq!(out.stdout_text(), current_user());
    session.close().await;
    assert!(
        log().contains("ED25519-CERT"),
        "not the certificate: {}",
        log()
    );

    // The same key without its certificate: sshd knows no such key.
    let bare = dir.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(&key.private_key, bare.join("id_ed25519")).unwrap();
    let bare_key = ClientKey {
        private_key: bare.join("id_ed25519"),
        public_key_line: key.public_key_line.clone(),
    };
    match connect(&bare_key).await {
        Err(TransportError::Auth { detail, .. }) => {
            assert!(detail.contains("server rejected key"), "{detail}");
            assert!(!detail.contains("certificate"), "{detail}");
        }
        Err(other) => panic!("expected Auth, got {other:?}"),
        Ok(_) => panic!("logged in without the certificate"),
    }

    // A certificate for another principal is refused too, and the error says a certificate
    // was offered.
    let other = certified_key(dir.path(), "other_ed25519", &ca, "someone-else");
    match connect(&other).await {
        Err(TransportError::Auth { detail, .. }) => {
            assert!(detail.contains("and its certificate"), "{detail}");
        }
        Err(other) => panic!("expected Auth, got {other:?}"),
        Ok(_) => panic!("logged in with another principal's certificate"),
    }
}
