//! Brings a whole local fleet up and down: an sshd per host, the demo JVM on every app host,
//! nginx on the load-balancer host, plus the inventory that points roller at all of it.
//!
//! Every host is a loopback address (127.a.b.x) with its own directory as filesystem root, so
//! several fleets (parallel tests, a developer's demo) coexist on one machine as long as each
//! uses its own `a.b`. Everything started is recorded by PID in `state.json`, so a fleet left
//! running by `cargo xtask fleet up` can be inspected and stopped by a later process.
//!
//! The app hosts are laid out for one of roller's strategies ([`Mode`]): one JVM per host for
//! rolling, or a blue and a green slot per host for blue-green, since a strategy can only be
//! tested against hosts prepared the way its operators would prepare them.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::jar::{self, JarSpec};
use crate::nginx::{self, Nginx};
use crate::proc::{self, shell_quote};
use crate::sshd::{self, Sshd, SshdSpec};
use crate::users::{self, Account};

pub const LB_NAME: &str = "lb";
pub const APP_DIR: &str = "shop";
pub const JAR_NAME: &str = "app.jar";
pub const RESTART: &str = "bin/restart";
/// Blue-green modes: `bin/restart-slot blue|green` (re)starts one slot of the app.
pub const RESTART_SLOT: &str = "bin/restart-slot";
/// Blue-green modes: `bin/stop-slot blue|green` stops one slot; fine when it is not running.
/// Rolling fleets have both slot scripts too, so that they can adopt blue-green.
pub const STOP_SLOT: &str = "bin/stop-slot";
/// Rolling mode: `bin/stop` stops the single JVM, as `blue_green.adopt_stop` does once a
/// first blue-green release has moved its traffic to the blue slots.
pub const STOP: &str = "bin/stop";
/// The two slots of an app host in blue-green modes; `up` starts the first one.
pub const SLOTS: [&str; 2] = ["blue", "green"];
/// The one app host of [`Mode::BlueGreenSingle`], which lives on the LB host.
pub const SINGLE_APP_NAME: &str = "app";
/// How long roller keeps old slots running after a switch, written as `blue_green.keep_old`.
pub const KEEP_OLD: &str = "10m";
pub const HEALTH_PATH: &str = "/actuator/health";
/// The release `up` puts live by hand, before roller ever runs.
pub const INITIAL_RELEASE: &str = "v1";

const ROLLING_PORT: u16 = 8080;
const BLUE_PORT: u16 = 8081;
const GREEN_PORT: u16 = 8082;

/// Generous because up to a dozen JVMs start at once on a 2-core CI machine.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(120);
const RESTART_SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
const APP_STOP_GRACE: Duration = Duration::from_secs(15);

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
    /// [`Mode::BlueGreen`] on one machine: a single app host, [`SINGLE_APP_NAME`], that is the
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
    /// (released by [`Fleet::down`]; a dead owner's claim is taken over). 127.0.0.x and
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

fn tests_dir() -> PathBuf {
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
                    // caller picks a mode, so the addresses of every mode must be free.
                    let wanted: Vec<(String, u16)> =
                        [Mode::Rolling, Mode::BlueGreen, Mode::BlueGreenSingle]
                            .into_iter()
                            .flat_map(|mode| candidate.clone().with_mode(mode).listen_addresses())
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

fn release_net(net: [u8; 2]) {
    let claim = nets_dir().join(format!("{}.{}", net[0], net[1]));
    let mine =
        std::fs::read_to_string(&claim).is_ok_and(|s| s.trim() == std::process::id().to_string());
    if mine {
        let _ = std::fs::remove_file(claim);
    }
}

/// What `state.json` records: enough to find and stop everything from another process.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    spec: FleetSpec,
    user: String,
    java: PathBuf,
    nginx: PathBuf,
    lb: HostState,
    nginx_pid: Option<u32>,
    hosts: Vec<HostState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct HostState {
    name: String,
    address: String,
    /// The host's filesystem root: its sshd's session directory.
    dir: PathBuf,
    sshd_pid: Option<u32>,
    /// Who logs in on this host, when not the current user: see [`users`].
    #[serde(default)]
    login: Option<Account>,
}

impl HostState {
    fn sshd_dir(&self) -> PathBuf {
        self.dir.join("sshd")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Balancer,
    App,
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

/// A running local fleet. Stopped on drop when this process started it, unless detached.
pub struct Fleet {
    state: State,
    /// Handles for sshds this process started, so they are reaped when stopped.
    sshds: Vec<Sshd>,
    /// Whether drop stops the fleet: true for `up`, false once detached or when attached.
    owned: bool,
    stopped: bool,
}

impl Fleet {
    /// Starts everything and returns once release v1 is live and healthy on every host and the
    /// load balancer serves it. A leftover fleet in the same root is stopped first. On error,
    /// whatever was started is stopped again.
    pub fn up(spec: FleetSpec) -> anyhow::Result<Fleet> {
        if spec.hosts == 0 || spec.hosts > 240 {
            bail!("a fleet has 1 to 240 app hosts, not {}", spec.hosts);
        }
        if spec.mode == Mode::BlueGreenSingle && spec.hosts != 1 {
            bail!(
                "a single-machine blue-green fleet has exactly 1 app host, not {}",
                spec.hosts
            );
        }
        if spec.mode.is_blue_green() && spec.app_port == spec.green_port {
            bail!(
                "the blue and green slots need different ports, not both {}",
                spec.app_port
            );
        }
        prepare_root(&std::path::absolute(&spec.root)?)?;
        // Canonical, because processes are recognised later by their working directory and
        // command line, which the kernel and `pwd -P` report without symlinks or `..`.
        let root = spec.root.canonicalize()?;
        let spec = FleetSpec {
            root: root.clone(),
            ..spec
        };

        let java = proc::find_jdk_tool("java")?;
        let nginx_bin = proc::find_program("nginx")?;
        let user = current_user()?;
        let (lb, mut hosts) = layout(&spec);
        // The LB (and a single-machine app host, which is the LB) keeps the current user, who
        // owns nginx; app hosts log in as production hosts do, with a mix of login shells.
        if users::is_root() && spec.mode != Mode::BlueGreenSingle {
            for (host, login) in hosts.iter_mut().zip(users::MIX.iter().cycle()) {
                host.login = Some(users::ensure(*login)?);
            }
        }
        // From here on an error drops `fleet`, which stops whatever was already started.
        let mut fleet = Fleet {
            state: State {
                spec,
                user,
                java,
                nginx: nginx_bin,
                lb,
                nginx_pid: None,
                hosts,
            },
            sshds: Vec::new(),
            owned: true,
            stopped: false,
        };
        fleet.save_state()?;

        let key = sshd::generate_client_key(&fleet.identity_path())?;
        let authorized_keys = root.join("keys").join("authorized_keys");
        std::fs::write(&authorized_keys, format!("{}\n", key.public_key_line))?;
        // sshd reads it as the user logging in.
        std::fs::set_permissions(&authorized_keys, std::fs::Permissions::from_mode(0o644))?;

        let v1 = fleet.jar(&JarSpec::healthy(INITIAL_RELEASE))?;
        std::fs::create_dir_all(&fleet.state.lb.dir)?;
        for host in &fleet.state.hosts {
            install_host(host, &fleet.state, &v1)?;
            if let Some(login) = &host.login {
                users::chown_tree(&host.dir, login.uid, login.gid)?;
            }
        }

        let mut known_hosts = String::new();
        let all_hosts: Vec<HostState> = std::iter::once(fleet.state.lb.clone())
            .chain(fleet.state.hosts.iter().cloned())
            .collect();
        for (i, host) in all_hosts.iter().enumerate() {
            // One machine, one sshd: the single-machine app host shares the LB's.
            if all_hosts[..i].iter().any(|h| h.address == host.address) {
                continue;
            }
            let sshd = Sshd::start(SshdSpec {
                dir: host.sshd_dir(),
                address: host.address.clone(),
                port: fleet.state.spec.ssh_port,
                authorized_keys: authorized_keys.clone(),
                session_dir: Some(host.dir.clone()),
            })
            .with_context(|| format!("starting sshd for {}", host.name))?;
            known_hosts.push_str(&sshd.known_hosts_line());
            known_hosts.push('\n');
            let pid = sshd.pid();
            fleet.sshds.push(sshd);
            fleet.record_sshd_pid(&host.address, pid);
            fleet.save_state()?;
        }
        std::fs::write(fleet.known_hosts_path(), known_hosts)?;

        // JVMs take the longest, so they start before nginx and are awaited last.
        for host in &fleet.state.hosts {
            if fleet.state.spec.mode.is_blue_green() {
                run_script(host, &[RESTART_SLOT, SLOTS[0]])?;
            } else {
                run_script(host, &[RESTART])?;
            }
        }

        let nginx = fleet.nginx();
        let servers: Vec<String> = fleet
            .state
            .hosts
            .iter()
            .map(|h| format!("{}:{}", h.address, fleet.state.spec.app_port))
            .collect();
        nginx.write_config(&fleet.lb_authority(), &servers)?;
        fleet.state.nginx_pid = Some(nginx.start(&fleet.lb_authority())?);
        fleet.save_state()?;

        std::fs::write(fleet.inventory_path(), fleet.inventory_text())?;

        fleet.wait_healthy(HEALTHY_TIMEOUT)?;
        fleet.wait_lb_serving(Duration::from_secs(30))?;
        Ok(fleet)
    }

    /// A fleet recorded in `root/state.json` by an earlier `up`, possibly in another process.
    /// It is not stopped on drop: call [`Fleet::down`] to stop it.
    pub fn attach(root: &Path) -> anyhow::Result<Fleet> {
        let path = root.join("state.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {} (is a fleet up there?)", path.display()))?;
        let state: State =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Fleet {
            state,
            sshds: Vec::new(),
            owned: false,
            stopped: false,
        })
    }

    /// Stops the apps, nginx and every sshd by PID, each with a bounded wait and SIGKILL as the
    /// last resort. PIDs are checked to still belong to this fleet before any signal.
    /// Idempotent.
    pub fn down(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        std::thread::scope(|scope| {
            // Every kind of JVM on every host, whatever the mode: roller may have started
            // either slot, and stopping what is not running costs nothing.
            for host in &self.state.hosts {
                for slot in [None, Some(SLOTS[0]), Some(SLOTS[1])] {
                    scope.spawn(move || {
                        if let Some(pid) = app_process(&host.dir, slot) {
                            proc::terminate(pid, APP_STOP_GRACE);
                        }
                    });
                }
            }
        });
        self.nginx().stop(self.state.nginx_pid);
        for mut sshd in self.sshds.drain(..) {
            sshd.stop();
        }
        for host in std::iter::once(&self.state.lb).chain(&self.state.hosts) {
            if let Some(pid) = host.sshd_pid
                && proc::belongs_to(pid, &host.sshd_dir())
            {
                proc::terminate(pid, Duration::from_secs(5));
            }
        }
        // Last, whatever SSH sessions left running on the hosts: roller schedules detached
        // work there (blue-green stops old slots after keep_old), and a test stops all it
        // caused to start.
        for pid in proc::running_in(&self.state.spec.root) {
            proc::terminate(pid, Duration::from_secs(5));
        }
        release_net(self.state.spec.net);
    }

    /// Leaves everything running (for `cargo xtask fleet up`); stop it later via
    /// [`Fleet::attach`] and [`Fleet::down`].
    pub fn detach(mut self) {
        for sshd in self.sshds.drain(..) {
            sshd.detach();
        }
        self.owned = false;
    }

    pub fn root(&self) -> &Path {
        &self.state.spec.root
    }

    pub fn spec(&self) -> &FleetSpec {
        &self.state.spec
    }

    pub fn inventory_path(&self) -> PathBuf {
        self.root().join("inventory.toml")
    }

    pub fn known_hosts_path(&self) -> PathBuf {
        self.root().join("known_hosts")
    }

    pub fn identity_path(&self) -> PathBuf {
        self.root().join("keys").join("id_ed25519")
    }

    /// The SSH login name of the load balancer: the current user, who runs nginx.
    pub fn user(&self) -> &str {
        &self.state.user
    }

    /// The SSH login name of an app host (or [`LB_NAME`]): a user with one of the login shells
    /// of [`users::MIX`] when the fleet runs as root, else the current user.
    pub fn host_user(&self, host: &str) -> String {
        self.host(host)
            .login
            .as_ref()
            .map_or_else(|| self.state.user.clone(), |l| l.user.clone())
    }

    /// App hosts only (`web-1`, ...); the load-balancer host is [`LB_NAME`].
    pub fn host_names(&self) -> Vec<String> {
        self.state.hosts.iter().map(|h| h.name.clone()).collect()
    }

    /// Address of an app host or of [`LB_NAME`]. Panics on an unknown name.
    pub fn host_address(&self, name: &str) -> String {
        self.host(name).address.clone()
    }

    /// The host's filesystem root (its SSH login directory). Panics on an unknown name.
    pub fn host_dir(&self, name: &str) -> PathBuf {
        self.host(name).dir.clone()
    }

    pub fn lb_address(&self) -> String {
        self.state.lb.address.clone()
    }

    pub fn lb_url(&self) -> String {
        format!("http://{}", self.lb_authority())
    }

    fn lb_authority(&self) -> String {
        format!("{}:{}", self.state.lb.address, self.state.spec.lb_port)
    }

    /// The release the `current` link points at, read from disk. In blue-green modes, where
    /// the `current-<slot>` link of the host's live slot points (see [`Fleet::app_pid`]).
    pub fn live_release(&self, host: &str) -> Option<String> {
        let host = self.host(host);
        read_release(&host.dir, self.app_slot(host))
    }

    /// The PID in the host's `app.pid` if that process is alive and is this host's app. In
    /// blue-green modes, the JVM of the slot nginx sends this host's traffic to, per the
    /// upstream file (blue when the file does not name the host); so do `app_version`,
    /// `app_health` and `app_log_path`.
    pub fn app_pid(&self, host: &str) -> Option<u32> {
        let host = self.host(host);
        app_process(&host.dir, self.app_slot(host))
    }

    /// `GET /version` straight at the host, bypassing nginx.
    pub fn app_version(&self, host: &str) -> Option<String> {
        let host = self.host(host);
        self.version_on(host, self.app_slot(host))
    }

    /// Status of `GET /actuator/health` straight at the host; `None` if it does not answer.
    pub fn app_health(&self, host: &str) -> Option<u16> {
        let host = self.host(host);
        self.health_on(host, self.app_slot(host))
    }

    pub fn app_log_path(&self, host: &str) -> PathBuf {
        let host = self.host(host);
        host.dir.join(log_file(self.app_slot(host)))
    }

    /// The port of `slot` ("blue" or "green"). Panics on any other name.
    pub fn slot_port(&self, slot: &str) -> u16 {
        self.state.spec.slot_port(slot)
    }

    /// Which slot the upstream file sends traffic to: `Some("blue")` or `Some("green")` when
    /// every `server` line is a fleet host on that slot's port, `None` when they disagree,
    /// name something else, there are none, or the fleet is rolling.
    pub fn live_slot(&self) -> Option<String> {
        if !self.state.spec.mode.is_blue_green() {
            return None;
        }
        let mut live = None;
        for (address, port) in upstream_servers(&self.upstream_text()) {
            if !self.state.hosts.iter().any(|h| h.address == address) {
                return None;
            }
            let slot = self.slot_of_port(port)?;
            if live.is_some_and(|l| l != slot) {
                return None;
            }
            live = Some(slot);
        }
        live.map(str::to_string)
    }

    /// The release `current-<slot>` points at on `host`, read from disk.
    pub fn slot_release(&self, host: &str, slot: &str) -> Option<String> {
        read_release(&self.host(host).dir, Some(slot_name(slot)))
    }

    /// The PID in `app-<slot>.pid` if that process is alive and is this slot's JVM.
    pub fn slot_pid(&self, host: &str, slot: &str) -> Option<u32> {
        app_process(&self.host(host).dir, Some(slot_name(slot)))
    }

    /// `GET /version` straight at the slot's port, bypassing nginx.
    pub fn slot_version(&self, host: &str, slot: &str) -> Option<String> {
        self.version_on(self.host(host), Some(slot_name(slot)))
    }

    /// Status of `GET /actuator/health` straight at the slot's port.
    pub fn slot_health(&self, host: &str, slot: &str) -> Option<u16> {
        self.health_on(self.host(host), Some(slot_name(slot)))
    }

    /// `app-<slot>.log` in the host's directory.
    pub fn slot_log_path(&self, host: &str, slot: &str) -> PathBuf {
        self.host(host).dir.join(log_file(Some(slot_name(slot))))
    }

    /// Waits until `slot` on `host` answers its health check with 200, failing early (with
    /// the slot's log) when its JVM exits.
    pub fn wait_slot_healthy(
        &self,
        host: &str,
        slot: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        self.wait_apps_healthy(&[(self.host(host), Some(slot_name(slot)))], timeout)
    }

    /// The slot whose JVM serves `host`'s traffic; `None` for a rolling fleet's single JVM.
    fn app_slot(&self, host: &HostState) -> Option<&'static str> {
        if !self.state.spec.mode.is_blue_green() {
            return None;
        }
        let mut ports = upstream_servers(&self.upstream_text())
            .into_iter()
            .filter(|(address, _)| *address == host.address)
            .map(|(_, port)| port);
        let live = match (ports.next(), ports.next()) {
            (Some(port), None) => self.slot_of_port(port),
            _ => None,
        };
        // Before nginx is configured, and while roller rewrites the file, blue is what `up`
        // started.
        Some(live.unwrap_or(SLOTS[0]))
    }

    fn slot_of_port(&self, port: u16) -> Option<&'static str> {
        SLOTS.into_iter().find(|slot| self.slot_port(slot) == port)
    }

    fn port_of(&self, slot: Option<&str>) -> u16 {
        slot.map_or(self.state.spec.app_port, |slot| self.slot_port(slot))
    }

    fn version_on(&self, host: &HostState, slot: Option<&str>) -> Option<String> {
        let authority = format!("{}:{}", host.address, self.port_of(slot));
        let response = crate::http::get(&authority, "/version", Duration::from_secs(3)).ok()?;
        (response.status == 200).then(|| response.text().trim().to_string())
    }

    fn health_on(&self, host: &HostState, slot: Option<&str>) -> Option<u16> {
        let authority = format!("{}:{}", host.address, self.port_of(slot));
        crate::http::get(&authority, HEALTH_PATH, Duration::from_secs(3))
            .ok()
            .map(|r| r.status)
    }

    pub fn upstream_file(&self) -> PathBuf {
        self.nginx().upstream_file()
    }

    /// The LB's upstream file as it is on disk now.
    pub fn upstream_text(&self) -> String {
        std::fs::read_to_string(self.upstream_file()).unwrap_or_default()
    }

    /// nginx's access log (format `roller`: upstream, status, upstream time, method, URI,
    /// `$msec`, `$request_time`).
    pub fn access_log_path(&self) -> PathBuf {
        self.nginx().access_log()
    }

    /// How many times the nginx master was told to reload, from its error log (`notice`
    /// level logs each SIGHUP it receives).
    pub fn nginx_reloads(&self) -> usize {
        std::fs::read_to_string(self.nginx().error_log())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("(SIGHUP) received"))
            .count()
    }

    /// The upstream address (`address:port`) of every access-log line from byte `from` on,
    /// with the line's status: who nginx really sent each request to.
    pub fn served_since(&self, from: u64) -> Vec<(String, u16)> {
        let text = std::fs::read(self.access_log_path()).unwrap_or_default();
        let from = usize::try_from(from).unwrap_or(usize::MAX).min(text.len());
        String::from_utf8_lossy(&text[from..])
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let upstream = fields.next()?.to_string();
                let status = fields.next()?.parse().ok()?;
                Some((upstream, status))
            })
            .collect()
    }

    /// The access log's length now, to read what comes after with [`Fleet::served_since`].
    pub fn access_log_len(&self) -> u64 {
        std::fs::metadata(self.access_log_path()).map_or(0, |m| m.len())
    }

    /// The nginx master, from its pid file.
    pub fn nginx_pid(&self) -> Option<u32> {
        self.nginx()
            .master_pid()
            .filter(|&pid| proc::belongs_to(pid, &self.nginx().prefix))
    }

    /// Builds (or reuses) a demo jar and returns its path in this fleet's `jars/`.
    pub fn jar(&self, spec: &JarSpec) -> anyhow::Result<PathBuf> {
        // Built once per machine and linked into each fleet: every test fleet needs v1 and
        // most need v2, and each `jar` run costs a JVM start.
        let shared = jar::build_jar(&crate::target_dir().join("roller-fleet").join("jars"), spec)?;
        let local = self.root().join("jars").join(spec.file_name());
        if !local.is_file() {
            std::fs::create_dir_all(self.root().join("jars"))?;
            match std::fs::hard_link(&shared, &local) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                // Another filesystem: fall back to a copy, published atomically.
                Err(_) => {
                    let partial = local.with_extension(format!("partial-{}", std::process::id()));
                    std::fs::copy(&shared, &partial)?;
                    std::fs::rename(&partial, &local)?;
                }
            }
        }
        Ok(local)
    }

    /// The balancer first, then every app host.
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
        rows
    }

    /// The PID of a host's sshd (app host or [`LB_NAME`]). Panics on an unknown name or a host
    /// whose sshd never started.
    pub fn sshd_pid(&self, host: &str) -> u32 {
        self.host(host)
            .sshd_pid
            .unwrap_or_else(|| panic!("{host} has no sshd"))
    }

    /// Kills the sshd of an app host or of [`LB_NAME`] together with the processes serving its
    /// connections, so every SSH connection to that host drops and new ones are refused, as
    /// when a host's sshd crashes. The app and nginx keep serving. By PID, with bounded waits;
    /// a no-op when that sshd is already gone. The PID stays recorded, so `status` shows it dead
    /// and [`Fleet::restart_sshd`] brings it back.
    pub fn kill_sshd(&self, host: &str) {
        let host = self.host(host);
        if let Some(pid) = host.sshd_pid
            && proc::belongs_to(pid, &host.sshd_dir())
            && !sshd::kill_with_connections(pid)
        {
            eprintln!("roller-fleet: sshd {pid} of {} survived SIGKILL", host.name);
        }
    }

    /// Starts a host's sshd again on the same address and port with the same host key and
    /// config (stopping it first if it still runs), and records the new PID in `state.json` so
    /// that `down`, and a later process attaching to the fleet, stop this one.
    pub fn restart_sshd(&mut self, host: &str) -> anyhow::Result<()> {
        self.kill_sshd(host);
        let state = self.host(host).clone();
        // Reaps the killed listener if this process started it.
        if let Some(old) = state.sshd_pid
            && let Some(i) = self.sshds.iter().position(|s| s.pid() == old)
        {
            self.sshds.remove(i).stop();
        }
        let sshd = Sshd::start(SshdSpec {
            dir: state.sshd_dir(),
            address: state.address.clone(),
            port: self.state.spec.ssh_port,
            authorized_keys: self.root().join("keys").join("authorized_keys"),
            session_dir: Some(state.dir.clone()),
        })
        .with_context(|| format!("restarting sshd for {}", state.name))?;
        let pid = sshd.pid();
        if self.owned {
            self.sshds.push(sshd);
        } else {
            // An attached fleet is not stopped on drop; neither is what it restarts.
            sshd.detach();
        }
        self.record_sshd_pid(&state.address, pid);
        self.save_state()
    }

    /// Records `pid` as the sshd of every host at `address`: a single-machine fleet's app host
    /// and LB share one.
    fn record_sshd_pid(&mut self, address: &str, pid: u32) {
        for host in std::iter::once(&mut self.state.lb).chain(&mut self.state.hosts) {
            if host.address == address {
                host.sshd_pid = Some(pid);
            }
        }
    }

    /// Waits until every app host answers its health check with 200 (in blue-green modes, on
    /// the slot nginx sends its traffic to).
    pub fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let apps: Vec<(&HostState, Option<&str>)> = self
            .state
            .hosts
            .iter()
            .map(|h| (h, self.app_slot(h)))
            .collect();
        self.wait_apps_healthy(&apps, timeout)
    }

    fn wait_apps_healthy(
        &self,
        apps: &[(&HostState, Option<&str>)],
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut pending: Vec<(&HostState, Option<&str>)> = apps.to_vec();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for (host, slot) in pending {
                if self.health_on(host, slot) == Some(200) {
                    continue;
                }
                // Fail fast with the log instead of waiting out the deadline for a dead JVM.
                // The PID file appears right after the JVM is forked, so a missing PID is not
                // yet a failure.
                if let Some(pid) = read_pid(&host.dir, slot)
                    && !proc::alive(pid)
                {
                    bail!(
                        "the app on {}{} (pid {pid}) exited before becoming healthy\n{}",
                        host.name,
                        slot.map(|s| format!(" ({s} slot)")).unwrap_or_default(),
                        nginx::tail(&host.dir.join(log_file(slot)), 30)
                    );
                }
                still.push((host, slot));
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                let names: Vec<String> = pending
                    .iter()
                    .map(|(h, slot)| match slot {
                        Some(slot) => format!("{} ({slot})", h.name),
                        None => h.name.clone(),
                    })
                    .collect();
                let (first, slot) = pending[0];
                bail!(
                    "not healthy within {timeout:?}: {}\n{}",
                    names.join(", "),
                    nginx::tail(&first.dir.join(log_file(slot)), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn wait_lb_serving(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = crate::http::get(&self.lb_authority(), "/", Duration::from_secs(3));
            if matches!(&last, Ok(r) if r.status == 200) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "nginx at {} did not serve 200 within {timeout:?} (last: {:?})\n{}",
                    self.lb_url(),
                    last.map(|r| r.status),
                    nginx::tail(&self.nginx().error_log(), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn host(&self, name: &str) -> &HostState {
        if name == LB_NAME {
            return &self.state.lb;
        }
        self.state
            .hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name:?} in the fleet at {}", self.root().display()))
    }

    fn nginx(&self) -> Nginx {
        Nginx {
            binary: self.state.nginx.clone(),
            prefix: self.state.lb.dir.join("nginx"),
        }
    }

    fn save_state(&self) -> anyhow::Result<()> {
        let path = self.root().join("state.json");
        let partial = self.root().join("state.json.partial");
        std::fs::write(&partial, serde_json::to_string_pretty(&self.state)?)?;
        std::fs::rename(&partial, &path).with_context(|| format!("writing {}", path.display()))
    }

    fn inventory_text(&self) -> String {
        let s = &self.state;
        let q = |v: &str| toml::Value::String(v.to_string()).to_string();
        let p = |v: &Path| q(&v.to_string_lossy());
        let nginx = self.nginx();
        let blue_green = s.spec.mode.is_blue_green();
        // A top-level key must come before the first table, or TOML puts it in that table.
        let strategy = if blue_green {
            "strategy = \"blue-green\"\n\n"
        } else {
            ""
        };
        let restart = if blue_green {
            format!("{RESTART_SLOT} {}", SLOTS[0])
        } else {
            RESTART.to_string()
        };
        let mut text = format!(
            "# Local fleet written by `cargo xtask fleet up`: real sshd per host, nginx on the LB host.\n\
             {strategy}\
             [ssh]\n\
             user = {user}\n\
             port = {ssh_port}\n\
             identity = {identity}\n\
             known_hosts = {known_hosts}\n\
             connect_timeout = \"5s\"\n\
             \n\
             [app]\n\
             name = {name}\n\
             dir = {dir}              # relative to the login directory: each local host's sshd starts sessions in its own directory\n\
             jar_name = {jar_name}\n\
             restart = {restart}\n\
             port = {app_port}\n\
             keep_releases = 5\n\
             \n\
             [health]\n\
             path = {health}\n\
             expect_status = 200\n\
             interval = \"100ms\"\n\
             timeout = \"20s\"\n\
             successes = 1\n\
             \n\
             [balancer]\n\
             hosts = [{lb}]\n\
             upstream_file = {upstream_file}\n\
             upstream = {upstream}\n\
             test = {test}\n\
             reload = {reload}\n\
             pid_file = {pid_file}\n\
             drain_timeout = \"10s\"\n",
            user = q(&s.user),
            ssh_port = s.spec.ssh_port,
            identity = p(&self.identity_path()),
            known_hosts = p(&self.known_hosts_path()),
            name = q(nginx::UPSTREAM),
            dir = q(APP_DIR),
            jar_name = q(JAR_NAME),
            restart = q(&restart),
            app_port = s.spec.app_port,
            health = q(HEALTH_PATH),
            lb = q(&s.lb.address),
            upstream_file = p(&nginx.upstream_file()),
            upstream = q(nginx::UPSTREAM),
            test = q(&nginx.test_command()),
            reload = q(&nginx.reload_command()),
            pid_file = p(&nginx.pid_file()),
        );
        if blue_green {
            // app.port and app.restart above stay for tools that only know rolling fleets;
            // they name the blue slot, which is what `up` starts.
            text.push_str(&format!(
                "\n[blue_green]\n\
                 blue_port = {blue}\n\
                 green_port = {green}\n\
                 restart = {restart}   # {{slot}} is blue or green; {{port}} its port\n\
                 stop = {stop}\n\
                 keep_old = {keep_old}                      # how long old slots keep running for an instant `roller switch-back`\n",
                blue = s.spec.app_port,
                green = s.spec.green_port,
                restart = q(&format!("{RESTART_SLOT} {{slot}}")),
                stop = q(&format!("{STOP_SLOT} {{slot}}")),
                keep_old = q(KEEP_OLD),
            ));
        }
        for host in &s.hosts {
            text.push_str(&format!(
                "\n[[hosts]]\nname = {}\naddress = {}\n",
                q(&host.name),
                q(&host.address)
            ));
            if let Some(login) = &host.login {
                text.push_str(&format!("user = {}\n", q(&login.user)));
            }
        }
        text
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if self.owned {
            self.down();
        }
    }
}

/// The LB host and the app hosts of `spec`: names, addresses and directories.
fn layout(spec: &FleetSpec) -> (HostState, Vec<HostState>) {
    let root = &spec.root;
    let lb = HostState {
        name: LB_NAME.to_string(),
        address: spec.lb_address(),
        dir: root.join("lb"),
        sshd_pid: None,
        login: None,
    };
    let hosts = if spec.mode == Mode::BlueGreenSingle {
        // The same machine as the LB: roller reaches it through the LB's sshd and finds
        // `bin/` and `shop/` next to nginx's files.
        vec![HostState {
            name: SINGLE_APP_NAME.to_string(),
            ..lb.clone()
        }]
    } else {
        (0..spec.hosts)
            .map(|i| HostState {
                name: format!("web-{}", i + 1),
                address: spec.host_address(i),
                dir: root.join("hosts").join(format!("web-{}", i + 1)),
                sshd_pid: None,
                login: None,
            })
            .collect()
    };
    (lb, hosts)
}

/// Makes `root` ready for a new fleet: stops a fleet still recorded there and clears what it
/// left, but refuses to wipe a directory that does not look like a fleet root.
fn prepare_root(root: &Path) -> anyhow::Result<()> {
    const OURS: &[&str] = &[
        "keys",
        "hosts",
        "lb",
        "jars",
        "known_hosts",
        "inventory.toml",
        "state.json",
        "state.json.partial",
    ];
    if root.join("state.json").is_file()
        && let Ok(mut old) = Fleet::attach(root)
    {
        old.down();
    }
    if root.exists() {
        for entry in std::fs::read_dir(root)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !OURS.contains(&name.as_str()) {
                bail!(
                    "{} contains {name:?}, so it does not look like a fleet root; refusing to reuse it",
                    root.display()
                );
            }
        }
        // Jars are content-addressed and stay valid; everything else describes the old fleet.
        for name in OURS.iter().filter(|n| **n != "jars") {
            let path = root.join(name);
            if path.is_dir() {
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            } else if path.exists() {
                std::fs::remove_file(&path)?;
            }
        }
    }
    for dir in ["keys", "hosts", "lb", "jars"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    Ok(())
}

/// Lays out one app host by hand: release v1, then either the `current` link and
/// `bin/restart`, or (blue-green) the `current-blue` link and the slot scripts. Green gets no
/// link: nothing was ever deployed to it.
fn install_host(host: &HostState, state: &State, v1: &Path) -> anyhow::Result<()> {
    let release = host
        .dir
        .join(APP_DIR)
        .join("releases")
        .join(INITIAL_RELEASE);
    std::fs::create_dir_all(&release)?;
    std::fs::create_dir_all(host.dir.join("bin"))?;
    std::fs::copy(v1, release.join(JAR_NAME))
        .with_context(|| format!("copying {} to {}", v1.display(), release.display()))?;
    let spec = &state.spec;
    let (link, scripts) = if spec.mode.is_blue_green() {
        let ports = (spec.app_port, spec.green_port);
        (
            format!("current-{}", SLOTS[0]),
            vec![
                (
                    RESTART_SLOT,
                    restart_slot_script(&state.java, &host.address, ports),
                ),
                (STOP_SLOT, stop_slot_script(ports)),
            ],
        )
    } else {
        let ports = (spec.slot_port(SLOTS[0]), spec.slot_port(SLOTS[1]));
        (
            "current".to_string(),
            vec![
                (
                    RESTART,
                    restart_script(&state.java, &host.address, spec.app_port),
                ),
                (STOP, stop_script()),
                (
                    RESTART_SLOT,
                    restart_slot_script(&state.java, &host.address, ports),
                ),
                (STOP_SLOT, stop_slot_script(ports)),
            ],
        )
    };
    // Relative, as roller writes it, so the host directory can be inspected or moved.
    std::os::unix::fs::symlink(
        Path::new("releases").join(INITIAL_RELEASE),
        host.dir.join(APP_DIR).join(link),
    )?;
    for (name, text) in scripts {
        let script = host.dir.join(name);
        std::fs::write(&script, text)?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// Runs a host script (`args[0]`, relative to the host's directory) as roller would, from the
/// host's directory.
fn run_script(host: &HostState, args: &[&str]) -> anyhow::Result<()> {
    let mut command = Command::new("/bin/sh");
    command.args(args).current_dir(&host.dir);
    // As the host's user, who must be able to stop and restart what this starts.
    if let Some(login) = &host.login {
        command.uid(login.uid).gid(login.gid);
    }
    proc::run(&mut command, RESTART_SCRIPT_TIMEOUT)?.check(&format!(
        "{} on {}",
        args.join(" "),
        host.name
    ))?;
    Ok(())
}

/// Panics on anything but "blue" or "green", like an unknown host name: a typo in a test
/// should not read as "slot not running".
fn slot_name(slot: &str) -> &'static str {
    SLOTS
        .into_iter()
        .find(|s| *s == slot)
        .unwrap_or_else(|| panic!("no slot {slot:?}: slots are blue and green"))
}

/// `app.pid` for a rolling host's JVM, `app-<slot>.pid` for a slot's.
fn pid_file(slot: Option<&str>) -> String {
    slot.map_or("app.pid".to_string(), |slot| format!("app-{slot}.pid"))
}

fn log_file(slot: Option<&str>) -> String {
    slot.map_or("app.log".to_string(), |slot| format!("app-{slot}.log"))
}

/// The PID recorded in the pid file, alive or not.
fn read_pid(dir: &Path, slot: Option<&str>) -> Option<u32> {
    std::fs::read_to_string(dir.join(pid_file(slot)))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The recorded PID if it is alive and still the JVM that wrote it. Both slots share a
/// working directory (and in a single-machine fleet, so do nginx and sshd sessions), so a
/// slot's JVM is recognised by the jar path on its command line.
fn app_process(dir: &Path, slot: Option<&str>) -> Option<u32> {
    let pid = read_pid(dir, slot)?;
    let ours = match slot {
        None => proc::belongs_to(pid, dir),
        Some(slot) => {
            let jar = dir
                .join(APP_DIR)
                .join(format!("current-{slot}"))
                .join(JAR_NAME);
            proc::alive(pid)
                && proc::cmdline(pid).is_some_and(|c| c.contains(jar.to_string_lossy().as_ref()))
        }
    };
    ours.then_some(pid)
}

/// The release `current` (or `current-<slot>`) points at.
fn read_release(dir: &Path, slot: Option<&str>) -> Option<String> {
    let link = slot.map_or("current".to_string(), |slot| format!("current-{slot}"));
    let target = std::fs::read_link(dir.join(APP_DIR).join(link)).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// The (address, port) of every `server` line, in the format roller writes
/// (`server 10.0.1.11:8081 weight=10 down;  # web-1`); a port that does not parse is 0.
fn upstream_servers(text: &str) -> Vec<(String, u16)> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("server "))
        .filter_map(|l| l.split(';').next()?.split_whitespace().next())
        .filter_map(|socket| {
            let (address, port) = socket.rsplit_once(':')?;
            let address = address.trim_start_matches('[').trim_end_matches(']');
            Some((address.to_string(), port.parse().unwrap_or(0)))
        })
        .collect()
}

fn current_user() -> anyhow::Result<String> {
    let out = proc::run(Command::new("id").arg("-un"), Duration::from_secs(10))?.check("id -un")?;
    let user = out.stdout.trim().to_string();
    if user.is_empty() {
        bail!("id -un printed nothing");
    }
    Ok(user)
}

/// The host's `bin/restart`, run by roller over SSH from the host's directory.
fn restart_script(java: &Path, address: &str, port: u16) -> String {
    format!(
        r#"#!/bin/sh
# Restarts the demo service on this local fleet host. roller runs it over SSH from the host's
# directory, and it must return at once: the JVM is detached from the SSH channel (own session,
# no inherited stdin/stdout), or the channel would stay open for as long as the JVM runs.
set -u
cd "$(dirname "$0")/.." || exit 1
here=$(pwd -P)
java={java}
address={address}
port={port}

# app.pid may be stale and its PID reused: only a live, non-zombie process whose working
# directory is this host counts as our app.
ours() {{
    [ -r "/proc/$1/stat" ] || return 1
    state=$(sed -e 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)
    case "$state" in ''|Z|X) return 1 ;; esac
    [ "$(readlink "/proc/$1/cwd" 2>/dev/null)" = "$here" ]
}}

if [ -s app.pid ]; then
    old=$(cat app.pid)
    if ours "$old"; then
        echo "$(date -u +%FT%TZ) [restart] stopping pid $old" >>app.log
        kill -TERM "$old" 2>/dev/null
        # The app drains in-flight requests on SIGTERM (up to 10 s); 30 s is the hard limit.
        waited=0
        while ours "$old"; do
            if [ "$waited" -ge 300 ]; then
                echo "$(date -u +%FT%TZ) [restart] pid $old ignored SIGTERM for 30s, killing" >>app.log
                kill -KILL "$old" 2>/dev/null
                killed=0
                while ours "$old" && [ "$killed" -lt 50 ]; do sleep 0.1; killed=$((killed + 1)); done
                break
            fi
            sleep 0.1
            waited=$((waited + 1))
        done
    fi
fi

echo "$(date -u +%FT%TZ) [restart] starting $(readlink shop/current)" >>app.log
setsid nohup "$java" -Xmx64m -Xss512k -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:-UsePerfData \
    -Dserver.address="$address" -Dserver.port="$port" -Dsun.net.httpserver.nodelay=true \
    -jar "$here/shop/current/app.jar" </dev/null >>app.log 2>&1 &
echo $! >app.pid
echo "started pid $!"
"#,
        java = shell_quote(java),
        address = shell_quote(address),
    )
}

/// The host's `bin/stop` in rolling mode: stops the single JVM, draining as a restart does;
/// fine when it is not running.
fn stop_script() -> String {
    r#"#!/bin/sh
# Stops the demo service's single JVM on this local fleet host (the one bin/restart starts).
set -u
cd "$(dirname "$0")/.." || exit 1
here=$(pwd -P)

ours() {
    [ -r "/proc/$1/stat" ] || return 1
    state=$(sed -e 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)
    case "$state" in ''|Z|X) return 1 ;; esac
    [ "$(readlink "/proc/$1/cwd" 2>/dev/null)" = "$here" ]
}

[ -s app.pid ] || exit 0
old=$(cat app.pid)
if ours "$old"; then
    echo "$(date -u +%FT%TZ) [stop] stopping pid $old" >>app.log
    kill -TERM "$old" 2>/dev/null
    waited=0
    while ours "$old" && [ "$waited" -lt 300 ]; do sleep 0.1; waited=$((waited + 1)); done
    ours "$old" && kill -KILL "$old" 2>/dev/null
fi
rm -f app.pid
"#
    .to_string()
}

/// What `bin/restart-slot` and `bin/stop-slot` share: argument check, paths, and stopping the
/// slot's JVM. Both are run by roller over SSH from the host's directory.
fn slot_script_prelude(what: &str, (blue, green): (u16, u16)) -> String {
    format!(
        r#"#!/bin/sh
# {what}
set -u
cd "$(dirname "$0")/.." || exit 1
here=$(pwd -P)
slot=${{1:-}}
case "$slot" in
    blue) port={blue} ;;
    green) port={green} ;;
    *) echo "usage: $0 blue|green (got '$slot')" >&2; exit 2 ;;
esac
pidfile="app-$slot.pid"
log="app-$slot.log"
jar="$here/shop/current-$slot/app.jar"

# The pid file may be stale and its PID reused, and both slots share this working directory:
# only a live, non-zombie process started with this slot's jar path counts as the slot's JVM.
ours() {{
    [ -r "/proc/$1/stat" ] || return 1
    state=$(sed -e 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)
    case "$state" in ''|Z|X) return 1 ;; esac
    tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | grep -qxF -- "$jar"
}}

# Returns 0 once the slot's JVM is gone (or was not running), 1 if it survived SIGKILL.
stop_slot() {{
    [ -s "$pidfile" ] || return 0
    old=$(cat "$pidfile")
    if ours "$old"; then
        echo "$(date -u +%FT%TZ) [$slot] stopping pid $old" >>"$log"
        kill -TERM "$old" 2>/dev/null
        # The app drains in-flight requests on SIGTERM (up to 10 s); 30 s is the hard limit.
        waited=0
        while ours "$old"; do
            if [ "$waited" -ge 300 ]; then
                echo "$(date -u +%FT%TZ) [$slot] pid $old ignored SIGTERM for 30s, killing" >>"$log"
                kill -KILL "$old" 2>/dev/null
                killed=0
                while ours "$old" && [ "$killed" -lt 50 ]; do sleep 0.1; killed=$((killed + 1)); done
                break
            fi
            sleep 0.1
            waited=$((waited + 1))
        done
        if ours "$old"; then
            echo "$slot: pid $old survived SIGKILL" >&2
            return 1
        fi
        echo "stopped $slot pid $old"
    fi
    rm -f "$pidfile"
}}
"#
    )
}

/// The host's `bin/restart-slot` in blue-green modes: (re)starts one slot from its
/// `current-<slot>` link and returns at once; readiness is the health check's business.
fn restart_slot_script(java: &Path, address: &str, ports: (u16, u16)) -> String {
    let mut script = slot_script_prelude(
        "Restarts one slot (blue or green) of the demo service on this local fleet host from its\n\
         # current-<slot> link, on the slot's port. It must return at once: the JVM is detached\n\
         # from the SSH channel (own session, no inherited stdin/stdout), or the channel would\n\
         # stay open for as long as the JVM runs.",
        ports,
    );
    script.push_str(&format!(
        r#"java={java}
address={address}

# Refused before the running slot is touched: nothing was ever deployed to this slot.
if [ ! -f "$jar" ]; then
    echo "$jar does not exist: point shop/current-$slot at a release first" >&2
    exit 1
fi
stop_slot || exit 1

echo "$(date -u +%FT%TZ) [$slot] starting $(readlink "shop/current-$slot") on port $port" >>"$log"
setsid nohup "$java" -Xmx64m -Xss512k -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:-UsePerfData \
    -Dserver.address="$address" -Dserver.port="$port" -Dsun.net.httpserver.nodelay=true \
    -jar "$jar" </dev/null >>"$log" 2>&1 &
echo $! >"$pidfile"
echo "started $slot pid $!"
"#,
        java = shell_quote(java),
        address = shell_quote(address),
    ));
    script
}

/// The host's `bin/stop-slot` in blue-green modes: stops one slot; a slot that is not running
/// is already stopped, so that is success too (roller may repeat the command).
fn stop_slot_script(ports: (u16, u16)) -> String {
    let mut script = slot_script_prelude(
        "Stops one slot (blue or green) of the demo service on this local fleet host. Exits 0\n\
         # when the slot was not running.",
        ports,
    );
    script.push_str(
        r#"if [ -s "$pidfile" ] && ours "$(cat "$pidfile")"; then
    stop_slot
else
    rm -f "$pidfile"
    echo "$slot was not running"
fi
"#,
    );
    script
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fleet's state without anything started: enough for the inventory and for reading an
    /// upstream file.
    fn fake(spec: FleetSpec) -> Fleet {
        let (lb, hosts) = layout(&spec);
        Fleet {
            state: State {
                spec,
                user: "dev".to_string(),
                java: PathBuf::from("/usr/bin/java"),
                nginx: PathBuf::from("/usr/sbin/nginx"),
                lb,
                nginx_pid: None,
                hosts,
            },
            sshds: Vec::new(),
            owned: false,
            // Nothing to stop; `down` must not release a net this test never claimed.
            stopped: true,
        }
    }

    #[test]
    fn rolling_inventory_is_unchanged() {
        let fleet = fake(FleetSpec::new("/f", 2, [77, 0]));
        let expected = "\
# Local fleet written by `cargo xtask fleet up`: real sshd per host, nginx on the LB host.
[ssh]
user = \"dev\"
port = 2222
identity = \"/f/keys/id_ed25519\"
known_hosts = \"/f/known_hosts\"
connect_timeout = \"5s\"

[app]
name = \"shop\"
dir = \"shop\"              # relative to the login directory: each local host's sshd starts sessions in its own directory
jar_name = \"app.jar\"
restart = \"bin/restart\"
port = 8080
keep_releases = 5

[health]
path = \"/actuator/health\"
expect_status = 200
interval = \"100ms\"
timeout = \"20s\"
successes = 1

[balancer]
hosts = [\"127.77.0.10\"]
upstream_file = \"/f/lb/nginx/conf.d/shop-upstream.conf\"
upstream = \"shop\"
test = \"/usr/sbin/nginx -p /f/lb/nginx -c nginx.conf -t -q\"
reload = \"/usr/sbin/nginx -p /f/lb/nginx -c nginx.conf -t -q && /usr/sbin/nginx -p /f/lb/nginx -c nginx.conf -s reload\"
pid_file = \"/f/lb/nginx/nginx.pid\"
drain_timeout = \"10s\"

[[hosts]]
name = \"web-1\"
address = \"127.77.0.11\"

[[hosts]]
name = \"web-2\"
address = \"127.77.0.12\"
";
        assert_eq!(fleet.inventory_text(), expected);
    }

    #[test]
    fn blue_green_inventory_adds_strategy_and_slots() {
        let fleet = fake(FleetSpec::new("/f", 2, [77, 0]).with_mode(Mode::BlueGreen));
        let text = fleet.inventory_text();
        let rolling = fake(FleetSpec::new("/f", 2, [77, 0])).inventory_text();
        let first_key = text.lines().find(|l| !l.starts_with('#') && !l.is_empty());
        assert_eq!(first_key, Some("strategy = \"blue-green\""), "{text}");
        assert!(
            text.contains(
                "\n[blue_green]\n\
                 blue_port = 8081\n\
                 green_port = 8082\n\
                 restart = \"bin/restart-slot {slot}\"   # {slot} is blue or green; {port} its port\n\
                 stop = \"bin/stop-slot {slot}\"\n\
                 keep_old = \"10m\""
            ),
            "{text}"
        );

        let parsed: toml::Table = text.parse().expect("valid TOML");
        let rolling: toml::Table = rolling.parse().unwrap();
        let mut keys: Vec<&String> = parsed.keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "app",
                "balancer",
                "blue_green",
                "health",
                "hosts",
                "ssh",
                "strategy"
            ]
        );
        assert_eq!(parsed["strategy"].as_str(), Some("blue-green"));
        let bg = parsed["blue_green"].as_table().unwrap();
        assert_eq!(bg["blue_port"].as_integer(), Some(8081));
        assert_eq!(bg["green_port"].as_integer(), Some(8082));
        assert_eq!(bg["keep_old"].as_str(), Some("10m"));
        assert_eq!(parsed["app"]["port"].as_integer(), Some(8081));
        assert_eq!(
            parsed["app"]["restart"].as_str(),
            Some("bin/restart-slot blue")
        );
        // Every other key is the rolling fleet's, with the same value.
        for section in ["ssh", "app", "health", "balancer"] {
            let (bg, rolling) = (parsed[section].as_table(), rolling[section].as_table());
            let (bg, rolling) = (bg.unwrap(), rolling.unwrap());
            assert_eq!(
                bg.keys().collect::<Vec<_>>(),
                rolling.keys().collect::<Vec<_>>()
            );
            for (key, value) in rolling {
                if !(section == "app" && (key == "port" || key == "restart")) {
                    assert_eq!(&bg[key], value, "{section}.{key}");
                }
            }
        }
        assert_eq!(parsed["hosts"], rolling["hosts"]);
    }

    #[test]
    fn single_machine_inventory_puts_the_app_on_the_lb() {
        let spec = FleetSpec::new("/f", 3, [77, 0]).with_mode(Mode::BlueGreenSingle);
        assert_eq!(spec.hosts, 1);
        let fleet = fake(spec);
        let parsed: toml::Table = fleet.inventory_text().parse().unwrap();
        assert_eq!(parsed["strategy"].as_str(), Some("blue-green"));
        let hosts = parsed["hosts"].as_array().unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0]["name"].as_str(), Some("app"));
        assert_eq!(hosts[0]["address"].as_str(), Some("127.77.0.10"));
        assert_eq!(
            parsed["balancer"]["hosts"].as_array().unwrap(),
            &[toml::Value::from("127.77.0.10")]
        );
        assert_eq!(fleet.host_dir("app"), fleet.host_dir("lb"));
    }

    #[test]
    fn upstream_servers_reads_roller_s_format() {
        let text = "# Managed by roller\nupstream shop {\n\
                    \x20   server 10.0.1.11:8081;  # web-1\n\
                    \x20   server [fd00::12]:8082 weight=10 down;  # web-2\n\
                    \x20   server 10.0.1.13:x;\n}\n";
        assert_eq!(
            upstream_servers(text),
            [
                ("10.0.1.11".to_string(), 8081),
                ("fd00::12".to_string(), 8082),
                ("10.0.1.13".to_string(), 0),
            ]
        );
    }

    #[test]
    fn live_slot_follows_the_upstream_file() {
        let root = tests_dir().join(format!("unit-live-slot-{}", std::process::id()));
        let fleet = fake(FleetSpec::new(&root, 2, [77, 0]).with_mode(Mode::BlueGreen));
        let file = fleet.upstream_file();
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        let write = |ports: [u16; 2]| {
            let servers: Vec<String> = ports
                .iter()
                .enumerate()
                .map(|(i, port)| format!("{}:{port}", fleet.state.spec.host_address(i)))
                .collect();
            std::fs::write(&file, nginx::upstream_text("shop", &servers)).unwrap();
        };
        assert_eq!(fleet.live_slot(), None, "no upstream file yet");
        write([8081, 8081]);
        assert_eq!(fleet.live_slot().as_deref(), Some("blue"));
        write([8082, 8082]);
        assert_eq!(fleet.live_slot().as_deref(), Some("green"));
        assert_eq!(fleet.app_slot(&fleet.state.hosts[0]), Some("green"));
        write([8081, 8082]);
        assert_eq!(fleet.live_slot(), None, "mixed");
        assert_eq!(fleet.app_slot(&fleet.state.hosts[1]), Some("green"));
        write([8081, 8080]);
        assert_eq!(fleet.live_slot(), None, "unknown port");
        std::fs::write(&file, "upstream shop {\n    server 127.1.1.1:8081;\n}\n").unwrap();
        assert_eq!(fleet.live_slot(), None, "not a fleet host");

        let rolling = fake(FleetSpec::new(&root, 2, [77, 0]));
        write([8080, 8080]);
        assert_eq!(rolling.live_slot(), None, "a rolling fleet has no slots");
        let _ = std::fs::remove_dir_all(&root);
    }

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
        assert_eq!(serde_json::from_value::<FleetSpec>(old).unwrap(), spec);
    }
}
