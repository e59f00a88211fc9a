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
//! tested against hosts prepared the way its operators would prepare them. What runs on the
//! app hosts is in `app` (and its scripts in `scripts`), the balancer's side in `lb`, and the
//! inventory roller reads in `inventory`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::app::{app_process, install_host, run_script};
use crate::bastion::bastion_layout;
use crate::jar::{self, JarSpec};
use crate::proc;
use crate::spec::{FleetSpec, Mode, release_net};
use crate::sshd::{self, Sshd};
use crate::users::{self, Account};

pub const LB_NAME: &str = "lb";
/// The bastion host of a fleet that has one (see [`crate::Bastion`]).
pub const BASTION_NAME: &str = "bastion";
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

/// Generous because up to a dozen JVMs start at once on a 2-core CI machine.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(120);
const APP_STOP_GRACE: Duration = Duration::from_secs(15);

/// What `state.json` records: enough to find and stop everything from another process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct State {
    pub(crate) spec: FleetSpec,
    pub(crate) user: String,
    pub(crate) java: PathBuf,
    pub(crate) nginx: PathBuf,
    pub(crate) lb: HostState,
    pub(crate) nginx_pid: Option<u32>,
    pub(crate) hosts: Vec<HostState>,
    /// The bastion host, when the spec asks for one: an sshd and nothing else.
    #[serde(default)]
    pub(crate) bastion: Option<HostState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HostState {
    pub(crate) name: String,
    pub(crate) address: String,
    /// The host's filesystem root: its sshd's session directory.
    pub(crate) dir: PathBuf,
    pub(crate) sshd_pid: Option<u32>,
    /// Who logs in on this host, when not the current user: see [`users`].
    #[serde(default)]
    pub(crate) login: Option<Account>,
}

impl HostState {
    pub(crate) fn sshd_dir(&self) -> PathBuf {
        self.dir.join("sshd")
    }
}

/// A running local fleet. Stopped on drop when this process started it, unless detached.
pub struct Fleet {
    pub(crate) state: State,
    /// Handles for sshds this process started, so they are reaped when stopped.
    pub(crate) sshds: Vec<Sshd>,
    /// Whether drop stops the fleet: true for `up`, false once detached or when attached.
    pub(crate) owned: bool,
    pub(crate) stopped: bool,
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
        // nginx runs as the current user; a lean LB login is the same uid under another name,
        // a sudo login another user.
        let lb_login = spec
            .lb_login
            .or(spec.lean_lb.then_some(users::Login::RootLean));
        let user = match lb_login {
            Some(login) if users::is_root() && spec.mode != Mode::BlueGreenSingle => {
                users::ensure(login)?.user
            }
            _ => current_user()?,
        };
        let (lb, mut hosts) = layout(&spec);
        let bastion = bastion_layout(&spec);
        // The LB (and a single-machine app host, which is the LB) keeps the current user, who
        // owns nginx; app hosts log in as production hosts do, with a mix of login shells
        // unless the spec names their logins.
        if let Some(login) = spec.app_logins.first()
            && (!users::is_root() || spec.mode == Mode::BlueGreenSingle)
        {
            bail!(
                "app hosts log in as {} only in a fleet with app hosts of their own, run as root",
                login.user()
            );
        }
        if users::is_root() && spec.mode != Mode::BlueGreenSingle {
            for (i, host) in hosts.iter_mut().enumerate() {
                let login = match spec.app_logins.get(i).or(spec.app_logins.last()) {
                    Some(login) => *login,
                    None => users::MIX[i % users::MIX.len()],
                };
                host.login = Some(users::ensure(login)?);
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
                bastion,
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
                if fleet.state.spec.app_logins.iter().any(|l| l.has_sudo()) {
                    // Releases and links are root's, as under /opt on a production host:
                    // the deploy user changes them only through sudo.
                    users::chown_tree(&host.dir.join(APP_DIR), 0, 0)?;
                }
            }
        }

        let mut known_hosts = String::new();
        // The bastion first, as hosts that admit only the bastion are of no use without it.
        let all_hosts: Vec<HostState> = fleet.ssh_hosts().cloned().collect();
        for (i, host) in all_hosts.iter().enumerate() {
            // One machine, one sshd: the single-machine app host shares the LB's.
            if all_hosts[..i].iter().any(|h| h.address == host.address) {
                continue;
            }
            std::fs::create_dir_all(&host.dir)?;
            let sshd = Sshd::start(fleet.sshd_spec(host))
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
        for host in self.ssh_hosts() {
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
        let sshd = Sshd::start(self.sshd_spec(&state))
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
    pub(crate) fn record_sshd_pid(&mut self, address: &str, pid: u32) {
        let state = &mut self.state;
        let all = state.bastion.iter_mut().chain([&mut state.lb]);
        for host in all.chain(&mut state.hosts) {
            if host.address == address {
                host.sshd_pid = Some(pid);
            }
        }
    }

    pub(crate) fn host(&self, name: &str) -> &HostState {
        if name == LB_NAME {
            return &self.state.lb;
        }
        if name == BASTION_NAME
            && let Some(bastion) = &self.state.bastion
        {
            return bastion;
        }
        self.state
            .hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name:?} in the fleet at {}", self.root().display()))
    }

    pub(crate) fn save_state(&self) -> anyhow::Result<()> {
        let path = self.root().join("state.json");
        let partial = self.root().join("state.json.partial");
        std::fs::write(&partial, serde_json::to_string_pretty(&self.state)?)?;
        std::fs::rename(&partial, &path).with_context(|| format!("writing {}", path.display()))
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
pub(crate) fn layout(spec: &FleetSpec) -> (HostState, Vec<HostState>) {
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
        "bastion",
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

fn current_user() -> anyhow::Result<String> {
    let out = proc::run(Command::new("id").arg("-un"), Duration::from_secs(10))?.check("id -un")?;
    let user = out.stdout.trim().to_string();
    if user.is_empty() {
        bail!("id -un printed nothing");
    }
    Ok(user)
}

/// A fleet's state without anything started: enough for the inventory and for reading an
/// upstream file.
#[cfg(test)]
pub(crate) fn fake(spec: FleetSpec) -> Fleet {
    let (lb, hosts) = layout(&spec);
    let bastion = crate::bastion::bastion_layout(&spec);
    Fleet {
        state: State {
            spec,
            user: "dev".to_string(),
            java: PathBuf::from("/usr/bin/java"),
            nginx: PathBuf::from("/usr/sbin/nginx"),
            lb,
            nginx_pid: None,
            hosts,
            bastion,
        },
        sshds: Vec::new(),
        owned: false,
        // Nothing to stop; `down` must not release a net this test never claimed.
        stopped: true,
    }
}
