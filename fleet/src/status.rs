//! What `cargo xtask fleet status` shows: per host, whether its sshd and app (or nginx) run,
//! which release is live and whether it answers.

use std::time::Duration;

use crate::fleet::{Fleet, SLOTS};
use crate::proc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Balancer,
    App,
    /// Only an sshd: no app, no release, no health.
    Bastion,
}

/// One row of `cargo xtask fleet status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostStatus {
    pub name: String,
    pub address: String,
    pub role: Role,
    pub sshd_pid: Option<u32>,
    pub sshd_alive: bool,
    /// The JVM on an app host, the nginx master on the balancer.
    pub app_pid: Option<u32>,
    pub app_alive: bool,
    pub live_release: Option<String>,
    /// `/actuator/health` on an app host, `GET /` through nginx on the balancer.
    pub health: Option<u16>,
    /// Both slots of an app host in blue-green modes, blue first; empty otherwise. `app_pid`,
    /// `live_release` and `health` above then describe the slot nginx sends the host's
    /// traffic to.
    pub slots: Vec<SlotStatus>,
}

/// One slot of an app host in blue-green modes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotStatus {
    /// "blue" or "green".
    pub slot: String,
    pub port: u16,
    /// Whether the upstream file sends this host's traffic to this slot.
    pub live: bool,
    /// The slot's JVM, when it runs.
    pub pid: Option<u32>,
    /// Where `current-<slot>` points.
    pub release: Option<String>,
    pub health: Option<u16>,
}

impl Fleet {
    /// The balancer first, then every app host, then the bastion if there is one.
    pub fn status(&self) -> Vec<HostStatus> {
        let lb = &self.state.lb;
        let nginx_pid = self.nginx_pid();
        let mut rows = vec![HostStatus {
            name: lb.name.clone(),
            address: lb.address.clone(),
            role: Role::Balancer,
            sshd_pid: lb.sshd_pid,
            sshd_alive: lb
                .sshd_pid
                .is_some_and(|p| proc::belongs_to(p, &lb.sshd_dir())),
            app_pid: nginx_pid,
            app_alive: nginx_pid.is_some(),
            live_release: None,
            health: crate::http::get(&self.lb_authority(), "/", Duration::from_secs(3))
                .ok()
                .map(|r| r.status),
            slots: Vec::new(),
        }];
        for host in &self.state.hosts {
            let app_pid = self.app_pid(&host.name);
            let live = self.app_slot(host);
            let slots = if self.state.spec.mode.is_blue_green() {
                SLOTS
                    .iter()
                    .map(|&slot| SlotStatus {
                        slot: slot.to_string(),
                        port: self.slot_port(slot),
                        live: live == Some(slot),
                        pid: self.slot_pid(&host.name, slot),
                        release: self.slot_release(&host.name, slot),
                        health: self.slot_health(&host.name, slot),
                    })
                    .collect()
            } else {
                Vec::new()
            };
            rows.push(HostStatus {
                name: host.name.clone(),
                address: host.address.clone(),
                role: Role::App,
                sshd_pid: host.sshd_pid,
                sshd_alive: host
                    .sshd_pid
                    .is_some_and(|p| proc::belongs_to(p, &host.sshd_dir())),
                app_pid,
                app_alive: app_pid.is_some(),
                live_release: self.live_release(&host.name),
                health: self.app_health(&host.name),
                slots,
            });
        }
        if let Some(bastion) = &self.state.bastion {
            rows.push(HostStatus {
                name: bastion.name.clone(),
                address: bastion.address.clone(),
                role: Role::Bastion,
                sshd_pid: bastion.sshd_pid,
                sshd_alive: bastion
                    .sshd_pid
                    .is_some_and(|p| proc::belongs_to(p, &bastion.sshd_dir())),
                app_pid: None,
                app_alive: false,
                live_release: None,
                health: None,
                slots: Vec::new(),
            });
        }
        rows
    }
}
