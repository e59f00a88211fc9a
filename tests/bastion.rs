//! Hosts in a private network, reached the way production reaches them: through a bastion
//! whose sshd has OpenSSH's default limits, or through a local proxy command. The hosts'
//! sshds admit logins only from the bastion's address, so nothing can pass around it.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use roller::transport::ssh::{SshConnector, SshSettings, parse_proxy_jump};
use roller::transport::{Connector, Endpoint, Transport, TransportError};
use roller_fleet::sshd::{ClientKey, Sshd, SshdOptions, SshdSpec, generate_client_key};
use tempfile::TempDir;

use support::{current_user, free_port};

const DEADLINE: Duration = Duration::from_secs(30);

/// A bastion and hosts that share one client key and one known_hosts file.
struct Network {
    bastion: Sshd,
    hosts: Vec<Sshd>,
    key: ClientKey,
    known_hosts: PathBuf,
    dir: TempDir,
}

fn sshd(
    dir: &Path,
    name: &str,
    address: &str,
    authorized_keys: &Path,
    options: SshdOptions,
) -> Sshd {
    Sshd::start(SshdSpec {
        dir: dir.join(name),
        address: address.to_string(),
        port: free_port(address),
        authorized_keys: authorized_keys.to_path_buf(),
        session_dir: None,
        options,
    })
    .unwrap()
}

/// `net` keeps each test's addresses apart: 127.0.<net>.1 is the bastion, .10 on the hosts.
fn network(net: u8, hosts: usize, bastion_options: SshdOptions) -> Network {
    let dir = tempfile::tempdir().unwrap();
    let key = generate_client_key(&dir.path().join("client/id_ed25519")).unwrap();
    let authorized_keys = dir.path().join("authorized_keys");
    std::fs::write(&authorized_keys, format!("{}\n", key.public_key_line)).unwrap();
    let bastion_address = format!("127.0.{net}.1");
    let bastion = sshd(
        dir.path(),
        "bastion",
        &bastion_address,
        &authorized_keys,
        SshdOptions {
            // On loopback every connection would come from 127.0.0.1: the bastion's forwards
            // leave from its own address, which is the one the hosts admit.
            forward_from: Some(bastion_address.clone()),
            ..bastion_options
        },
    );
    let hosts: Vec<Sshd> = (0..hosts)
        .map(|i| {
            sshd(
                dir.path(),
                &format!("web-{i}"),
                &format!("127.0.{net}.{}", 10 + i),
                &authorized_keys,
                SshdOptions {
                    allow_only_from: Some(bastion_address.clone()),
                    ..SshdOptions::default()
                },
            )
        })
        .collect();
    let known_hosts = dir.path().join("known_hosts");
    let lines: Vec<String> = std::iter::once(&bastion)
        .chain(&hosts)
        .map(Sshd::known_hosts_line)
        .collect();
    std::fs::write(&known_hosts, lines.join("\n") + "\n").unwrap();
    Network {
        bastion,
        hosts,
        key,
        known_hosts,
        dir,
    }
}

impl Network {
    fn settings(&self) -> SshSettings {
        let mut settings = SshSettings::new(
            current_user(),
            Some(self.key.private_key.clone()),
            self.known_hosts.clone(),
        );
        settings.connect_timeout = Duration::from_secs(10);
        settings
    }

    fn through_bastion(&self) -> SshSettings {
        let mut settings = self.settings();
        settings.proxy_jump = parse_proxy_jump(&format!(
            "{}@{}:{}",
            current_user(),
            self.bastion.address(),
            self.bastion.port()
        ))
        .unwrap();
        settings
    }

    fn endpoint(&self, i: usize) -> Endpoint {
        Endpoint {
            name: format!("web-{i}"),
            address: self.hosts[i].address().to_string(),
            port: self.hosts[i].port(),
            ..Endpoint::default()
        }
    }

    fn log(&self, sshd: &Sshd) -> String {
        let name = std::path::Path::new(&sshd.spec().dir)
            .file_name()
            .unwrap()
            .to_owned();
        std::fs::read_to_string(self.dir.path().join(name).join("sshd.log")).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twelve_hosts_behind_a_bastion_share_one_connection_to_it() {
    let net = network(94, 12, SshdOptions::default());

    // Nothing passes around the bastion: a direct login is refused.
    let direct = SshConnector::new(net.settings())
        .unwrap()
        .connect(&net.endpoint(0))
        .await;
    match direct {
        Err(TransportError::Auth { .. }) => {}
        Err(other) => panic!("a direct login must be refused by authentication: {other}"),
        Ok(_) => panic!("a direct login must be refused"),
    }

    // All hosts at once, as a rollout's pre-flight does: with a connection to the bastion per
    // host, as `ssh -J` opens them, twelve unauthenticated connections would meet its
    // MaxStartups (10:30:100) and some would be dropped.
    let connector = Arc::new(SshConnector::new(net.through_bastion()).unwrap());
    let sessions: Vec<Arc<dyn Transport>> =
        futures::future::join_all((0..net.hosts.len()).map(|i| {
            let connector = connector.clone();
            let endpoint = net.endpoint(i);
            async move { connector.connect(&endpoint).await }
        }))
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    for (i, session) in sessions.iter().enumerate() {
        let out = session
            .exec("echo $SSH_CONNECTION", None, DEADLINE)
            .await
            .unwrap();
        let client = out.stdout_text();
        let client = client
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        // sshd says who connected: the bastion, for every host.
        assert_eq!(client, net.bastion.address(), "web-{i}: {out:?}");
    }
    let bastion_logins = net.log(&net.bastion).matches("Accepted publickey").count();
    assert_eq!(bastion_logins, 1, "{}", net.log(&net.bastion));
    for session in &sessions {
        session.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bastion_that_refuses_forwarding_is_named_with_the_setting() {
    let net = network(
        95,
        1,
        SshdOptions {
            refuse_forwarding: true,
            ..SshdOptions::default()
        },
    );
    let err = SshConnector::new(net.through_bastion())
        .unwrap()
        .connect(&net.endpoint(0))
        .await
        .err()
        .expect("no host is reachable through a bastion that forwards nothing");
    let message = err.to_string();
    assert!(message.contains("web-0"), "{message}");
    assert!(
        message.contains(&format!(
            "bastion {}@{}",
            current_user(),
            net.bastion.address()
        )),
        "{message}"
    );
    assert!(message.contains("AllowTcpForwarding"), "{message}");
}

/// A stand-in for `aws ssm start-session`: carries stdin/stdout to `host:port` with bash's
/// /dev/tcp, and notes the arguments it was given.
fn proxy_script(dir: &Path) -> PathBuf {
    let path = dir.join("proxy.sh");
    std::fs::write(
        &path,
        "#!/bin/bash\n\
         printf '%s\\n' \"$*\" >> \"$(dirname \"$0\")/proxy.log\"\n\
         if [ \"$1\" = fail ]; then echo 'TargetNotConnected: i-0abc is not connected' >&2; exit 254; fi\n\
         exec 3<>\"/dev/tcp/$1/$2\" || exit 1\n\
         cat <&3 &\n\
         exec cat >&3\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_command_carries_the_connection_and_explains_its_failure() {
    let host = support::start_host("127.0.96.1", false);
    let script = proxy_script(host.dir.path());
    let mut settings = host.settings();
    settings.proxy_command = Some(format!("{} %h %p", script.display()));
    let session = SshConnector::new(settings.clone())
        .unwrap()
        .connect(&host.endpoint())
        .await
        .unwrap();
    let out = session.exec("echo through", None, DEADLINE).await.unwrap();
    assert_eq!(out.stdout_text(), "through");
    session.close().await;
    let log = std::fs::read_to_string(host.dir.path().join("proxy.log")).unwrap();
    assert_eq!(
        log.lines().next(),
        Some(format!("127.0.96.1 {}", host.sshd.port()).as_str())
    );

    settings.proxy_command = Some(format!("{} fail %p", script.display()));
    settings.connect_timeout = Duration::from_secs(2);
    let err = SshConnector::new(settings)
        .unwrap()
        .connect(&host.endpoint())
        .await
        .err()
        .expect("a proxy command that exits carries nothing");
    assert!(
        err.to_string()
            .contains("TargetNotConnected: i-0abc is not connected"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_may_name_its_own_key_and_bastion() {
    let net = network(97, 0, SshdOptions::default());
    // A host outside the bastion's network rules, that accepts only a key of its own.
    let own = support::start_host("127.0.97.50", false);
    let known_hosts = net.dir.path().join("known_hosts_all");
    std::fs::write(
        &known_hosts,
        format!(
            "{}\n{}\n",
            net.bastion.known_hosts_line(),
            own.sshd.known_hosts_line()
        ),
    )
    .unwrap();
    let mut settings = net.through_bastion();
    settings.known_hosts = known_hosts;
    let connector = SshConnector::new(settings).unwrap();
    let client_of = |session: Arc<dyn Transport>| async move {
        let out = session
            .exec("echo $SSH_CONNECTION", None, DEADLINE)
            .await
            .unwrap();
        session.close().await;
        out.stdout_text()
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };

    let mut endpoint = own.endpoint();
    endpoint.identity = Some(own.key.private_key.clone());
    // Through [ssh]'s bastion, with the host's own key.
    let through = connector.connect(&endpoint).await.unwrap();
    assert_eq!(client_of(through).await, net.bastion.address());
    // `proxy_jump = "none"` on the host: straight to it.
    endpoint.proxy_jump = Some(vec![]);
    let direct = connector.connect(&endpoint).await.unwrap();
    assert_eq!(client_of(direct).await, "127.0.0.1");

    // Without its own key the connector's is offered, which this host does not accept.
    endpoint.identity = None;
    match connector.connect(&endpoint).await {
        Err(TransportError::Auth { .. }) => {}
        Err(other) => panic!("expected an authentication refusal, got {other}"),
        Ok(_) => panic!("the connector's key must not be accepted here"),
    }
}
