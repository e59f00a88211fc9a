//! A real sshd per test, shared by the test files that talk SSH, so that they all set hosts up
//! (client key, authorized_keys, strict known_hosts) the same way.
//!
//! Each test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::net::TcpListener as StdTcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use roller::transport::ssh::{SshConnector, SshSettings};
use roller::transport::{Connector, Endpoint, Transport};
use roller_fleet::sshd::{ClientKey, Sshd, SshdOptions, SshdSpec, generate_client_key};
use tempfile::TempDir;

pub struct Host {
    pub sshd: Sshd,
    pub key: ClientKey,
    pub known_hosts: PathBuf,
    pub session_dir: Option<PathBuf>,
    pub dir: TempDir,
}

/// sshd can only log in as the user running it unless that user is root.
pub fn current_user() -> String {
    let out = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A port that was free on `address` a moment ago; a fixed port could collide with an sshd left
/// behind by an earlier, killed test run.
pub fn free_port(address: &str) -> u16 {
    StdTcpListener::bind((address, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts an sshd on `address` (a loopback address no other test uses) in a tempdir, with a
/// client key it accepts and a known_hosts file that holds its host key.
pub fn start_host(address: &str, with_session_dir: bool) -> Host {
    let dir = tempfile::tempdir().unwrap();
    let key = generate_client_key(&dir.path().join("client/id_ed25519")).unwrap();
    let authorized_keys = dir.path().join("authorized_keys");
    std::fs::write(&authorized_keys, format!("{}\n", key.public_key_line)).unwrap();
    let session_dir = with_session_dir.then(|| {
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        root
    });
    let port = free_port(address);
    let sshd = Sshd::start(SshdSpec {
        dir: dir.path().join("sshd"),
        address: address.to_string(),
        port,
        authorized_keys,
        session_dir: session_dir.clone(),
        options: SshdOptions::default(),
    })
    .unwrap();
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, format!("{}\n", sshd.known_hosts_line())).unwrap();
    Host {
        sshd,
        key,
        known_hosts,
        session_dir,
        dir,
    }
}

impl Host {
    pub fn settings(&self) -> SshSettings {
        let mut settings = SshSettings::new(
            current_user(),
            Some(self.key.private_key.clone()),
            self.known_hosts.clone(),
        );
        settings.connect_timeout = Duration::from_secs(10);
        settings
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            name: format!("host-{}", self.sshd.address()),
            address: self.sshd.address().to_string(),
            port: self.sshd.port(),
            user: None,
            ..Endpoint::default()
        }
    }

    pub async fn connect(&self) -> Arc<dyn Transport> {
        SshConnector::new(self.settings())
            .unwrap()
            .connect(&self.endpoint())
            .await
            .unwrap()
    }

    pub fn sshd_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd/sshd.log")).unwrap_or_default()
    }
}

/// PIDs of the processes whose parent is `pid`: sshd forks one per connection.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state, ppid, ...
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let ppid: u32 = after_name.split(' ').nth(1).unwrap().parse().unwrap();
        if ppid == pid {
            children.push(child);
        }
    }
    children
}
