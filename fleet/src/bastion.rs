//! The fleet's SSH front door when it plays a cloud network: a bastion host that clients hop
//! through (`ssh -J`), and hosts that admit logins from the bastion only, so that a client
//! which connects directly is refused as it would be in production.
//!
//! On loopback every connection comes from 127.0.0.1, the bastion's forwards included; the
//! bastion's sshd therefore binds its forwards to its own address (see `SshdOptions`), which is
//! the one address the other hosts' sshds admit.

use std::path::PathBuf;

use crate::fleet::{BASTION_NAME, Fleet, HostState};
use crate::spec::{Bastion, FleetSpec};
use crate::sshd::{self, SshdOptions, SshdSpec};

/// How to reach a fleet's bastion and recognise it: what a client puts in its jump-host
/// settings and its known_hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BastionEndpoint {
    pub address: String,
    pub port: u16,
    /// Who logs in on the bastion: the user running the fleet, with the fleet's key.
    pub user: String,
    /// `[address]:port ssh-ed25519 AAAA...`, as in the fleet's known_hosts file.
    pub known_hosts_line: String,
}

/// The bastion's host entry when `spec` asks for one: its own address and directory.
pub(crate) fn bastion_layout(spec: &FleetSpec) -> Option<HostState> {
    (spec.bastion != Bastion::None).then(|| HostState {
        name: BASTION_NAME.to_string(),
        address: spec.bastion_address(),
        dir: spec.root.join(BASTION_NAME),
        sshd_pid: None,
        login: None,
    })
}

impl Fleet {
    /// The bastion's endpoint and host key, or `None` when the fleet has no bastion. Read from
    /// disk, so an attached fleet answers too.
    pub fn bastion(&self) -> Option<BastionEndpoint> {
        let host = self.state.bastion.as_ref()?;
        let port = self.state.spec.ssh_port;
        let key = std::fs::read_to_string(sshd::host_public_key_path(&host.sshd_dir())).ok()?;
        Some(BastionEndpoint {
            address: host.address.clone(),
            port,
            user: self.state.user.clone(),
            known_hosts_line: sshd::known_hosts_line(&host.address, port, key.trim()),
        })
    }

    /// Every host with an sshd of its own, the bastion first: a host that admits only the
    /// bastion is of no use before it.
    pub(crate) fn ssh_hosts(&self) -> impl Iterator<Item = &HostState> {
        let state = &self.state;
        state.bastion.iter().chain([&state.lb]).chain(&state.hosts)
    }

    /// How `host`'s sshd is set up: the same for every host but for the bastion's part.
    pub(crate) fn sshd_spec(&self, host: &HostState) -> SshdSpec {
        let spec = &self.state.spec;
        let is_bastion = self
            .state
            .bastion
            .as_ref()
            .is_some_and(|b| b.address == host.address);
        let options = SshdOptions {
            forward_from: is_bastion.then(|| host.address.clone()),
            allow_only_from: (spec.bastion == Bastion::Only && !is_bastion)
                .then(|| spec.bastion_address()),
            refuse_forwarding: spec.refuse_forwarding && !is_bastion,
            trusted_user_ca_keys: None,
        };
        SshdSpec {
            dir: host.sshd_dir(),
            address: host.address.clone(),
            port: spec.ssh_port,
            authorized_keys: self.authorized_keys_path(),
            session_dir: Some(host.dir.clone()),
            options,
        }
    }

    pub(crate) fn authorized_keys_path(&self) -> PathBuf {
        self.root().join("keys").join("authorized_keys")
    }
}
