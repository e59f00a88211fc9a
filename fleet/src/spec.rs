//! What a fleet is before it runs: which strategy its hosts are laid out for ([`Mode`]), where
//! it lives, and which loopback addresses and ports it takes.
//!
//! Every host is a loopback address (127.a.b.x), so several fleets (parallel tests, a
//! developer's demo) coexist on one machine as long as each uses its own `a.b`; tests claim
//! theirs with lock files here.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::users::Login;
use crate::{jar, proc};

const ROLLING_PORT: u16 = 8080;
const BLUE_PORT: u16 = 8081;
const GREEN_PORT: u16 = 8082;

/// How the app runs on the fleet's hosts, matching the roller strategy it is meant for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// One JVM per app host on `app_port`, behind a `current` link and `bin/restart`.
    #[default]
    Rolling,
    /// Two slots per app host, blue on `app_port` and green on `green_port`, each behind its
    /// own `current-<slot>` link; nginx sends each host's traffic to one of them.
    BlueGreen,
    /// [`Mode::BlueGreen`] on one machine: a single app host, [`SINGLE_APP_NAME`](crate::SINGLE_APP_NAME), that is the
    /// LB host itself (same address, sshd and directory), running nginx and both slots.
    BlueGreenSingle,
}

impl Mode {
    pub fn is_blue_green(self) -> bool {
        matches!(self, Mode::BlueGreen | Mode::BlueGreenSingle)
    }
}

/// Where a fleet lives and which loopback addresses and ports it uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetSpec {
    pub root: PathBuf,
    /// App hosts `web-1..web-N`; the load-balancer host comes on top. Always 1 in
    /// [`Mode::BlueGreenSingle`], where that one app host is the LB host.
    pub hosts: usize,
    /// Hosts live at `127.net[0].net[1].x`: the LB at .10, web-1 at .11 and so on.
    pub net: [u8; 2],
    pub ssh_port: u16,
    /// The app's port when rolling; the blue slot's port in blue-green modes.
    pub app_port: u16,
    pub lb_port: u16,
    // Defaults, so that a `state.json` written before blue-green existed still attaches (and
    // its fleet can still be stopped).
    #[serde(default)]
    pub mode: Mode,
    /// The green slot's port in blue-green modes; unused when rolling.
    #[serde(default = "default_green_port")]
    pub green_port: u16,
    /// Whether a bastion host fronts the fleet; see [`Bastion`].
    #[serde(default)]
    pub bastion: Bastion,
    /// `AllowTcpForwarding no` on the LB and app hosts (never on the bastion, whose job it
    /// is), as on hosts hardened against port forwarding.
    #[serde(default)]
    pub refuse_forwarding: bool,
    /// Who the app hosts log in as: web-1 as the first, web-2 as the second and so on, the
    /// last for all the rest. Empty: the mix of login shells of [`users::MIX`](crate::users::MIX)
    /// in turn. Either way only when the fleet runs as root.
    #[serde(default)]
    pub app_logins: Vec<Login>,
    /// The load balancer (and so the SSH user of the inventory's `[ssh]`) logs in as
    /// [`Login::RootLean`] instead of the current user, when the fleet runs as root.
    #[serde(default)]
    pub lean_lb: bool,
    /// Rolling app hosts run the light stand-in (`fleet/light/light-app.py`, python3) instead
    /// of a JVM: a hundred of them fit on one machine.
    #[serde(default)]
    pub light_apps: bool,
    /// Who the load balancer (and so the inventory's `ssh.user`) logs in as, when the fleet
    /// runs as root and it is not the current user, who runs nginx: a deploy user with sudo,
    /// who can change nothing of nginx's without it.
    #[serde(default)]
    pub lb_login: Option<Login>,
}

/// A bastion host in front of the fleet, as in a cloud VPC where the hosts have private
/// addresses and only the bastion takes SSH from outside.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bastion {
    /// No bastion: every host takes SSH directly.
    #[default]
    None,
    /// A bastion at `.9`; the hosts still take SSH directly too.
    Open,
    /// A bastion at `.9`, and the LB and app hosts accept logins only from it: a direct login
    /// fails authentication, as a security group would have refused it.
    Only,
}

fn default_green_port() -> u16 {
    GREEN_PORT
}

impl FleetSpec {
    /// A rolling fleet; see [`FleetSpec::with_mode`] for blue-green.
    pub fn new(root: impl Into<PathBuf>, hosts: usize, net: [u8; 2]) -> Self {
        FleetSpec {
            root: root.into(),
            hosts,
            net,
            ssh_port: 2222,
            app_port: ROLLING_PORT,
            lb_port: 8000,
            mode: Mode::Rolling,
            green_port: GREEN_PORT,
            bastion: Bastion::None,
            refuse_forwarding: false,
            app_logins: Vec::new(),
            lean_lb: false,
            light_apps: false,
            lb_login: None,
        }
    }

    /// Switches to `mode` with that mode's ports: 8080 when rolling, blue 8081 and green 8082
    /// in blue-green modes (distinct from rolling's, so a blue-green inventory pointed at a
    /// rolling fleet, or the reverse, fails its health checks instead of passing them).
    /// [`Mode::BlueGreenSingle`] also sets `hosts` to 1. Use
    /// [`FleetSpec::with_slot_ports`] afterwards for other ports.
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        if mode.is_blue_green() {
            self.app_port = BLUE_PORT;
            self.green_port = GREEN_PORT;
        } else {
            self.app_port = ROLLING_PORT;
        }
        if mode == Mode::BlueGreenSingle {
            self.hosts = 1;
        }
        self
    }

    /// The blue (`app_port`) and green slots' ports.
    pub fn with_slot_ports(mut self, blue: u16, green: u16) -> Self {
        self.app_port = blue;
        self.green_port = green;
        self
    }

    /// The port of `slot` ("blue" or "green"). Panics on any other name.
    pub fn slot_port(&self, slot: &str) -> u16 {
        match slot {
            // A rolling fleet's app_port is the single port that blue-green adopts from.
            "blue" if !self.mode.is_blue_green() => BLUE_PORT,
            "blue" => self.app_port,
            "green" => self.green_port,
            other => panic!("no slot {other:?}: slots are blue and green"),
        }
    }

    /// A fresh root under the target directory and a loopback net no other live test holds.
    ///
    /// Tests run as threads of one binary and as parallel binaries, so uniqueness comes from
    /// the PID, a per-process counter and the test name, and nets are claimed with lock files
    /// (released by [`Fleet::down`](crate::Fleet::down); a dead owner's claim is taken over). 127.0.0.x and
    /// 127.77.x.x (the developer fleets of `cargo xtask`) are never handed out.
    pub fn for_test(test_name: &str, hosts: usize) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name: String = test_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let root = tests_dir().join(format!("{name}-{pid}-{n}"));
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let seed = jar::fnv1a(&[
            &pid.to_le_bytes(),
            &n.to_le_bytes(),
            test_name.as_bytes(),
            &nanos.to_le_bytes(),
        ]);
        let mut spec = FleetSpec::new(root, hosts, [0, 0]);
        spec.net = claim_net(seed, &spec).expect("claiming a loopback net for a test fleet");
        spec
    }

    /// Adds a bastion host (or takes it away with [`Bastion::None`]).
    pub fn with_bastion(mut self, bastion: Bastion) -> Self {
        self.bastion = bastion;
        self
    }

    /// Makes the LB's and app hosts' sshds refuse port forwarding.
    pub fn with_forwarding_refused(mut self) -> Self {
        self.refuse_forwarding = true;
        self
    }

    /// Has every app host log in as `login`, e.g. a deploy user with sudo.
    pub fn with_app_login(mut self, login: Login) -> Self {
        self.app_logins = vec![login];
        self
    }

    /// Every host, the load balancer included, logs in as `login`, a deploy user with sudo
    /// ([`Login::Sudo`], [`Login::SudoPassword`]): nginx's files and its master stay root's,
    /// and the app hosts' `shop/` directories too (as `/opt/<app>` on a production host), so
    /// only commands run through sudo can change either. The inventory then says
    /// `sudo = true` for both sides.
    pub fn with_sudo_logins(mut self, login: Login) -> Self {
        self.app_logins = vec![login];
        self.lb_login = Some(login);
        self
    }

    /// Every host, the load balancer included, logs in with no rc files of its own: what the
    /// benchmark needs, so that it measures roller rather than the hosts' shell start-up.
    pub fn with_lean_logins_everywhere(mut self) -> Self {
        self.app_logins = vec![Login::Lean];
        self.lean_lb = true;
        self
    }

    /// App hosts run the light stand-in for the JVM service (same endpoints, start-up and
    /// SIGTERM contract), so that a fleet of a hundred hosts fits on one machine. Rolling only.
    pub fn with_light_apps(mut self) -> Self {
        self.light_apps = true;
        self
    }

    /// Every app host logs in as [`Login::Lean`] but web-1, which keeps the heavy `.bashrc`
    /// of [`Login::BashHeavy`] so that a functional test still meets one.
    pub fn with_lean_logins(mut self) -> Self {
        self.app_logins = vec![Login::BashHeavy, Login::Lean];
        self
    }

    /// Where the bastion listens when there is one: beside the LB, below the app hosts.
    pub fn bastion_address(&self) -> String {
        format!("127.{}.{}.9", self.net[0], self.net[1])
    }

    pub fn lb_address(&self) -> String {
        format!("127.{}.{}.10", self.net[0], self.net[1])
    }

    /// `index` counts from 0: web-1 is index 0. In [`Mode::BlueGreenSingle`] the one app host
    /// is the LB host.
    pub fn host_address(&self, index: usize) -> String {
        if self.mode == Mode::BlueGreenSingle {
            return self.lb_address();
        }
        format!("127.{}.{}.{}", self.net[0], self.net[1], 11 + index)
    }

    /// Every (address, port) the fleet will listen on.
    fn listen_addresses(&self) -> Vec<(String, u16)> {
        let mut all = vec![
            (self.lb_address(), self.ssh_port),
            (self.lb_address(), self.lb_port),
        ];
        if self.bastion != Bastion::None {
            all.push((self.bastion_address(), self.ssh_port));
        }
        for i in 0..self.hosts {
            let address = self.host_address(i);
            if address != self.lb_address() {
                all.push((address.clone(), self.ssh_port));
            }
            all.push((address.clone(), self.app_port));
            if self.mode.is_blue_green() {
                all.push((address, self.green_port));
            }
        }
        all
    }
}

pub(crate) fn tests_dir() -> PathBuf {
    crate::target_dir().join("fleet-tests")
}

fn nets_dir() -> PathBuf {
    tests_dir().join(".nets")
}

fn claim_net(seed: u64, spec: &FleetSpec) -> anyhow::Result<[u8; 2]> {
    if spec.hosts == 0 || spec.hosts > 240 {
        bail!("a fleet has 1 to 240 app hosts, not {}", spec.hosts);
    }
    let dir = nets_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // a in 1..=254 (never 0: 127.0.0.x is everyone's loopback), b in 0..=255.
    const SPACE: u64 = 254 * 256;
    let me = std::process::id();
    for attempt in 0..SPACE {
        let index = (seed.wrapping_add(attempt)) % SPACE;
        let net = [(1 + index / 256) as u8, (index % 256) as u8];
        if net[0] == 77 {
            continue;
        }
        let claim = dir.join(format!("{}.{}", net[0], net[1]));
        for _ in 0..2 {
            match OpenOptions::new().write(true).create_new(true).open(&claim) {
                Ok(mut file) => {
                    file.write_all(me.to_string().as_bytes())?;
                    let candidate = FleetSpec {
                        net,
                        ..spec.clone()
                    };
                    // A claim only protects against other tests; a leftover process from a
                    // crashed run may still hold the addresses. `for_test` claims before the
                    // caller picks a mode or a bastion, so the addresses of every mode and the
                    // bastion's must be free.
                    let wanted: Vec<(String, u16)> =
                        [Mode::Rolling, Mode::BlueGreen, Mode::BlueGreenSingle]
                            .into_iter()
                            .flat_map(|mode| candidate.clone().with_mode(mode).listen_addresses())
                            .chain(
                                candidate
                                    .clone()
                                    .with_bastion(Bastion::Only)
                                    .listen_addresses(),
                            )
                            .chain(candidate.listen_addresses())
                            .collect();
                    if wanted
                        .iter()
                        .all(|(a, p)| TcpListener::bind((a.as_str(), *p)).is_ok())
                    {
                        return Ok(net);
                    }
                    let _ = std::fs::remove_file(&claim);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner: Option<u32> = std::fs::read_to_string(&claim)
                        .ok()
                        .and_then(|s| s.trim().parse().ok());
                    // An empty file may be a claim being written right now: leave it alone.
                    match owner {
                        Some(pid) if !proc::alive(pid) => {
                            let _ = std::fs::remove_file(&claim);
                        }
                        _ => break,
                    }
                }
                Err(e) => return Err(e).with_context(|| format!("claiming {}", claim.display())),
            }
        }
    }
    bail!("no free loopback net left in {}", dir.display())
}

pub(crate) fn release_net(net: [u8; 2]) {
    let claim = nets_dir().join(format!("{}.{}", net[0], net[1]));
    let mine =
        std::fs::read_to_string(&claim).is_ok_and(|s| s.trim() == std::process::id().to_string());
    if mine {
        let _ = std::fs::remove_file(claim);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_ports() {
        let spec = FleetSpec::new("/f", 2, [1, 2]);
        assert_eq!((spec.mode, spec.app_port), (Mode::Rolling, 8080));
        let bg = spec.clone().with_mode(Mode::BlueGreen);
        assert_eq!((bg.slot_port("blue"), bg.slot_port("green")), (8081, 8082));
        assert_eq!(bg.clone().with_mode(Mode::Rolling), spec);
        let custom = bg.with_slot_ports(9001, 9002);
        assert_eq!((custom.app_port, custom.green_port), (9001, 9002));
        // A state.json from before blue-green still reads as a rolling fleet.
        let mut old = serde_json::to_value(&spec).unwrap();
        let object = old.as_object_mut().unwrap();
        object.remove("mode");
        object.remove("green_port");
        object.remove("bastion");
        object.remove("refuse_forwarding");
        object.remove("app_logins");
        object.remove("light_apps");
        assert_eq!(serde_json::from_value::<FleetSpec>(old).unwrap(), spec);
    }
}
