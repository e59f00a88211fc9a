//! Brings a whole local fleet up and down: an sshd per host, the demo JVM on every app host,
//! nginx on the load-balancer host, plus the inventory that points roller at all of it.
//!
//! Every host is a loopback address (127.a.b.x) with its own directory as filesystem root, so
//! several fleets (parallel tests, a developer's demo) coexist on one machine as long as each
//! uses its own `a.b`. Everything started is recorded by PID in `state.json`, so a fleet left
//! running by `cargo xtask fleet up` can be inspected and stopped by a later process.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
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

pub const LB_NAME: &str = "lb";
pub const APP_DIR: &str = "shop";
pub const JAR_NAME: &str = "app.jar";
pub const RESTART: &str = "bin/restart";
pub const HEALTH_PATH: &str = "/actuator/health";
/// The release `up` puts live by hand, before roller ever runs.
pub const INITIAL_RELEASE: &str = "v1";

/// Generous because up to a dozen JVMs start at once on a 2-core CI machine.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(120);
const RESTART_SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
const APP_STOP_GRACE: Duration = Duration::from_secs(15);

/// Where a fleet lives and which loopback addresses and ports it uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetSpec {
    pub root: PathBuf,
    /// App hosts `web-1..web-N`; the load-balancer host comes on top.
    pub hosts: usize,
    /// Hosts live at `127.net[0].net[1].x`: the LB at .10, web-1 at .11 and so on.
    pub net: [u8; 2],
    pub ssh_port: u16,
    pub app_port: u16,
    pub lb_port: u16,
}

impl FleetSpec {
    pub fn new(root: impl Into<PathBuf>, hosts: usize, net: [u8; 2]) -> Self {
        FleetSpec {
            root: root.into(),
            hosts,
            net,
            ssh_port: 2222,
            app_port: 8080,
            lb_port: 8000,
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

    /// `index` counts from 0: web-1 is index 0.
    pub fn host_address(&self, index: usize) -> String {
        format!("127.{}.{}.{}", self.net[0], self.net[1], 11 + index)
    }

    /// Every (address, port) the fleet will listen on.
    fn listen_addresses(&self) -> Vec<(String, u16)> {
        let mut all = vec![
            (self.lb_address(), self.ssh_port),
            (self.lb_address(), self.lb_port),
        ];
        for i in 0..self.hosts {
            all.push((self.host_address(i), self.ssh_port));
            all.push((self.host_address(i), self.app_port));
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
                    // crashed run may still hold the addresses.
                    if candidate
                        .listen_addresses()
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
        let lb = HostState {
            name: LB_NAME.to_string(),
            address: spec.lb_address(),
            dir: root.join("lb"),
            sshd_pid: None,
        };
        let hosts = (0..spec.hosts)
            .map(|i| HostState {
                name: format!("web-{}", i + 1),
                address: spec.host_address(i),
                dir: root.join("hosts").join(format!("web-{}", i + 1)),
                sshd_pid: None,
            })
            .collect();
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

        let v1 = fleet.jar(&JarSpec::healthy(INITIAL_RELEASE))?;
        for host in &fleet.state.hosts {
            install_host(host, &fleet.state, &v1)?;
        }
        std::fs::create_dir_all(&fleet.state.lb.dir)?;

        let mut known_hosts = String::new();
        let all_hosts: Vec<HostState> = std::iter::once(fleet.state.lb.clone())
            .chain(fleet.state.hosts.iter().cloned())
            .collect();
        for (i, host) in all_hosts.iter().enumerate() {
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
            let pid = Some(sshd.pid());
            fleet.sshds.push(sshd);
            if i == 0 {
                fleet.state.lb.sshd_pid = pid;
            } else {
                fleet.state.hosts[i - 1].sshd_pid = pid;
            }
            fleet.save_state()?;
        }
        std::fs::write(fleet.known_hosts_path(), known_hosts)?;

        // JVMs take the longest, so they start before nginx and are awaited last.
        for host in &fleet.state.hosts {
            run_restart(host)?;
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
            for host in &self.state.hosts {
                scope.spawn(move || {
                    if let Some(pid) = read_app_pid(&host.dir)
                        && proc::belongs_to(pid, &host.dir)
                    {
                        proc::terminate(pid, APP_STOP_GRACE);
                    }
                });
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

    /// The SSH login name: the current user, since every sshd runs as this user's machine.
    pub fn user(&self) -> &str {
        &self.state.user
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

    /// The release the `current` link points at, read from disk.
    pub fn live_release(&self, host: &str) -> Option<String> {
        let target = std::fs::read_link(self.host(host).dir.join(APP_DIR).join("current")).ok()?;
        Some(target.file_name()?.to_string_lossy().into_owned())
    }

    /// The PID in the host's `app.pid` if that process is alive and is this host's app.
    pub fn app_pid(&self, host: &str) -> Option<u32> {
        let dir = &self.host(host).dir;
        read_app_pid(dir).filter(|&pid| proc::belongs_to(pid, dir))
    }

    /// `GET /version` straight at the host, bypassing nginx.
    pub fn app_version(&self, host: &str) -> Option<String> {
        let authority = format!("{}:{}", self.host(host).address, self.state.spec.app_port);
        let response = crate::http::get(&authority, "/version", Duration::from_secs(3)).ok()?;
        (response.status == 200).then(|| response.text().trim().to_string())
    }

    /// Status of `GET /actuator/health` straight at the host; `None` if it does not answer.
    pub fn app_health(&self, host: &str) -> Option<u16> {
        let authority = format!("{}:{}", self.host(host).address, self.state.spec.app_port);
        crate::http::get(&authority, HEALTH_PATH, Duration::from_secs(3))
            .ok()
            .map(|r| r.status)
    }

    pub fn app_log_path(&self, host: &str) -> PathBuf {
        self.host(host).dir.join("app.log")
    }

    pub fn upstream_file(&self) -> PathBuf {
        self.nginx().upstream_file()
    }

    /// The LB's upstream file as it is on disk now.
    pub fn upstream_text(&self) -> String {
        std::fs::read_to_string(self.upstream_file()).unwrap_or_default()
    }

    /// nginx's access log (format `roller`: upstream, status, time, method, URI).
    pub fn access_log_path(&self) -> PathBuf {
        self.nginx().access_log()
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
        }];
        for host in &self.state.hosts {
            let app_pid = self.app_pid(&host.name);
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
        self.host_mut(host).sshd_pid = Some(pid);
        self.save_state()
    }

    /// Waits until every app host answers its health check with 200.
    pub fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut pending: Vec<&HostState> = self.state.hosts.iter().collect();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for host in pending {
                if self.app_health(&host.name) == Some(200) {
                    continue;
                }
                // Fail fast with the log instead of waiting out the deadline for a dead JVM.
                // The PID file appears right after the JVM is forked, so a missing PID is not
                // yet a failure.
                if let Some(pid) = read_app_pid(&host.dir)
                    && !proc::alive(pid)
                {
                    bail!(
                        "the app on {} (pid {pid}) exited before becoming healthy\n{}",
                        host.name,
                        nginx::tail(&host.dir.join("app.log"), 30)
                    );
                }
                still.push(host);
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                let names: Vec<&str> = pending.iter().map(|h| h.name.as_str()).collect();
                bail!(
                    "not healthy within {timeout:?}: {}\n{}",
                    names.join(", "),
                    nginx::tail(&pending[0].dir.join("app.log"), 30)
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

    fn host_mut(&mut self, name: &str) -> &mut HostState {
        if name == LB_NAME {
            return &mut self.state.lb;
        }
        let root = self.state.spec.root.clone();
        self.state
            .hosts
            .iter_mut()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name:?} in the fleet at {}", root.display()))
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
        let mut text = format!(
            "# Local fleet written by `cargo xtask fleet up`: real sshd per host, nginx on the LB host.\n\
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
            restart = q(RESTART),
            app_port = s.spec.app_port,
            health = q(HEALTH_PATH),
            lb = q(&s.lb.address),
            upstream_file = p(&nginx.upstream_file()),
            upstream = q(nginx::UPSTREAM),
            test = q(&nginx.test_command()),
            reload = q(&nginx.reload_command()),
            pid_file = p(&nginx.pid_file()),
        );
        for host in &s.hosts {
            text.push_str(&format!(
                "\n[[hosts]]\nname = {}\naddress = {}\n",
                q(&host.name),
                q(&host.address)
            ));
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

/// Lays out one app host by hand: restart script, release v1, `current` link.
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
    // Relative, as roller writes it, so the host directory can be inspected or moved.
    std::os::unix::fs::symlink(
        Path::new("releases").join(INITIAL_RELEASE),
        host.dir.join(APP_DIR).join("current"),
    )?;
    let script = host.dir.join(RESTART);
    std::fs::write(
        &script,
        restart_script(&state.java, &host.address, state.spec.app_port),
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn run_restart(host: &HostState) -> anyhow::Result<()> {
    proc::run(
        Command::new("/bin/sh").arg(RESTART).current_dir(&host.dir),
        RESTART_SCRIPT_TIMEOUT,
    )?
    .check(&format!("{RESTART} on {}", host.name))?;
    Ok(())
}

fn read_app_pid(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join("app.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
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
    -Dserver.address="$address" -Dserver.port="$port" \
    -jar "$here/shop/current/app.jar" </dev/null >>app.log 2>&1 &
echo $! >app.pid
echo "started pid $!"
"#,
        java = shell_quote(java),
        address = shell_quote(address),
    )
}
