//! A real OpenSSH `sshd` per simulated host, so roller's tests exercise the same server (and the
//! same limits: MaxSessions, MaxStartups) that production hosts run.
//!
//! Processes are tracked by PID and stopped by PID: several fleets may run side by side on one
//! machine, so nothing here may ever match processes by name.

use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long `start` waits for a new sshd to accept connections before giving up.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `stop` gives sshd to honour SIGTERM before it is killed outright.
const STOP_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(10);

const HOST_KEY: &str = "ssh_host_ed25519_key";

/// sshd refuses to start without an absolute path to itself (it re-executes itself per connection).
pub const SSHD_PATH: &str = "/usr/sbin/sshd";

/// A client keypair that a test or demo authenticates with.
#[derive(Debug, Clone)]
pub struct ClientKey {
    pub private_key: PathBuf,
    /// The `.pub` file's content, one line without the trailing newline: ready for authorized_keys.
    pub public_key_line: String,
}

/// Generates an unencrypted ed25519 keypair at `path` (and `path.pub`) with `ssh-keygen`.
/// An existing pair at that path is replaced.
pub fn generate_client_key(path: &Path) -> anyhow::Result<ClientKey> {
    let public_key_line = keygen(path, "roller-fleet-client")?;
    Ok(ClientKey {
        private_key: path.to_path_buf(),
        public_key_line,
    })
}

/// Runs `ssh-keygen` for a fresh ed25519 key and returns the public key line.
fn keygen(path: &Path, comment: &str) -> anyhow::Result<String> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let public = pub_path(path);
    // ssh-keygen asks interactively before overwriting; there is nobody to answer.
    for stale in [path, public.as_path()] {
        match fs::remove_file(stale) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", stale.display())),
        }
    }
    let output = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .context("running ssh-keygen (is openssh-client installed?)")?;
    if !output.status.success() {
        bail!(
            "ssh-keygen for {} failed ({}): {}",
            path.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    read_public_line(&public)
}

fn pub_path(private: &Path) -> PathBuf {
    let mut name = private.as_os_str().to_os_string();
    name.push(".pub");
    PathBuf::from(name)
}

fn read_public_line(path: &Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let line = text.lines().next().unwrap_or("").trim().to_string();
    if line.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(line)
}

/// What one sshd should look like.
#[derive(Debug, Clone)]
pub struct SshdSpec {
    /// Where this sshd keeps its config, host key, pid file and log.
    pub dir: PathBuf,
    /// A loopback address; all of 127.0.0.0/8 is loopback on Linux, so every host gets its own.
    pub address: String,
    pub port: u16,
    /// File with the client's public key line(s).
    pub authorized_keys: PathBuf,
    /// When set, every exec session starts in this directory, so that several "hosts" on one
    /// machine each see their own filesystem root for relative paths.
    pub session_dir: Option<PathBuf>,
    /// How this host differs from a plain one, as hosts in a private network do.
    pub options: SshdOptions,
}

/// What sets an sshd apart from the default one: all off by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SshdOptions {
    /// Logins only from this source address (`AllowUsers *@<address>`), as from the bastion
    /// when a security group admits nothing else; anyone else fails authentication.
    pub allow_only_from: Option<String>,
    /// The connections this sshd opens for its clients' forwards (`ssh -J`) leave from this
    /// address rather than 127.0.0.1, so hosts can tell the bastion's forwards apart. Needs a
    /// C compiler: a small preloaded library binds them (see `fleet/shim/forward_from.c`).
    pub forward_from: Option<String>,
    /// `AllowTcpForwarding no`, as on hardened hosts: no port forwarding through this host,
    /// so nothing reaches a port behind it the way roller's health checks do by default.
    pub refuse_forwarding: bool,
    /// `TrustedUserCAKeys`: a user certificate signed by one of these keys logs in (as the
    /// principals it names), whether or not `authorized_keys` lists the key.
    pub trusted_user_ca_keys: Option<PathBuf>,
}

/// A running sshd, stopped on drop unless detached.
#[derive(Debug)]
pub struct Sshd {
    pid: u32,
    /// Kept so that a stopped sshd is reaped instead of lingering as a zombie.
    child: Option<Child>,
    spec: SshdSpec,
    host_public_key_line: String,
    stopped: bool,
}

impl Sshd {
    /// Generates a host key in `spec.dir` (keeping an existing one, so a restarted host keeps its
    /// identity), writes `sshd_config`, starts sshd in its own session and waits until it
    /// accepts TCP connections.
    pub fn start(spec: SshdSpec) -> anyhow::Result<Sshd> {
        let dir = absolute(&spec.dir)?;
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let spec = SshdSpec {
            dir: dir.clone(),
            authorized_keys: absolute(&spec.authorized_keys)?,
            session_dir: spec.session_dir.as_deref().map(absolute).transpose()?,
            ..spec
        };

        let host_key = dir.join(HOST_KEY);
        let host_public_key_line = if host_key.exists() && pub_path(&host_key).exists() {
            read_public_line(&pub_path(&host_key))?
        } else {
            keygen(&host_key, "roller-fleet-host")?
        };

        if is_root() {
            // sshd's privilege separation chroots into this directory and refuses to start without it.
            fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;
        }

        let force_command = match &spec.session_dir {
            Some(session_dir) => Some(enter_command(session_dir)?),
            None => None,
        };
        let config = dir.join("sshd_config");
        let pid_file = dir.join("sshd.pid");
        fs::write(
            &config,
            sshd_config(&spec, &host_key, &pid_file, force_command.as_deref()),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        // A stale pid file from an earlier run would make readiness look immediate.
        let _ = fs::remove_file(&pid_file);

        let preload = match &spec.options.forward_from {
            Some(_) => Some(forward_from_library()?),
            None => None,
        };
        let log_path = dir.join("sshd.log");
        let log = fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut command = Command::new(SSHD_PATH);
        command
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let (Some(library), Some(from)) = (&preload, &spec.options.forward_from) {
            // sshd re-executes itself per connection with its own environment, so the forward
            // that a connection's process opens is bound too.
            command
                .env("LD_PRELOAD", library)
                .env("ROLLER_FLEET_FORWARD_FROM", from);
        }
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent. A session of
        // its own keeps sshd alive when the terminal that ran `cargo xtask fleet up` goes away and
        // keeps Ctrl-C in that terminal from reaching it.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {SSHD_PATH}"))?;
        let mut sshd = Sshd {
            pid: child.id(),
            child: Some(child),
            spec,
            host_public_key_line,
            stopped: false,
        };
        if let Err(e) = sshd.wait_ready(&pid_file, &log_path) {
            sshd.stop();
            return Err(e);
        }
        Ok(sshd)
    }

    /// Waits for the pid file (sshd writes it only after binding its listen socket) and then
    /// for a TCP connect to succeed, failing early with sshd's log if sshd exits.
    fn wait_ready(&mut self, pid_file: &Path, log_path: &Path) -> anyhow::Result<()> {
        let target: SocketAddr = (self.spec.address.as_str(), self.spec.port)
            .to_socket_addrs()
            .with_context(|| format!("resolving {}", self.spec.address))?
            .next()
            .with_context(|| format!("{} resolves to nothing", self.spec.address))?;
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().context("waiting for sshd")?
            {
                self.stopped = true;
                bail!(
                    "sshd on {}:{} exited during startup ({status}); log {}:\n{}",
                    self.spec.address,
                    self.spec.port,
                    log_path.display(),
                    read_log(log_path)
                );
            }
            // Probing before the pid file exists would only add connections that sshd logs
            // as dropped before authentication.
            if pid_file.exists()
                && TcpStream::connect_timeout(&target, Duration::from_millis(500)).is_ok()
            {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                bail!(
                    "sshd on {}:{} did not accept connections within {START_TIMEOUT:?}; log {}:\n{}",
                    self.spec.address,
                    self.spec.port,
                    log_path.display(),
                    read_log(log_path)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn address(&self) -> &str {
        &self.spec.address
    }

    pub fn port(&self) -> u16 {
        self.spec.port
    }

    pub fn spec(&self) -> &SshdSpec {
        &self.spec
    }

    /// The host's public key as in a `.pub` file: `ssh-ed25519 AAAA... comment`.
    pub fn host_public_key_line(&self) -> &str {
        &self.host_public_key_line
    }

    /// The known_hosts line for this server: `[addr]:port ssh-ed25519 AAAA...` (plain `addr` on
    /// port 22, as OpenSSH writes it).
    pub fn known_hosts_line(&self) -> String {
        known_hosts_line(
            &self.spec.address,
            self.spec.port,
            &self.host_public_key_line,
        )
    }

    /// SIGTERM by PID, wait (bounded) for the exit, SIGKILL if it does not come. Idempotent.
    /// Sessions already running keep their own processes; only the listener is stopped, as on a
    /// real host whose sshd is restarted.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        signal(self.pid, libc::SIGTERM);
        let started = Instant::now();
        while started.elapsed() < STOP_GRACE {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(POLL),
            }
        }
        signal(self.pid, libc::SIGKILL);
        let _ = child.wait();
    }

    /// Forgets the process without stopping it, for `cargo xtask fleet up`, which leaves the
    /// fleet running. Returns the PID to stop it by later.
    pub fn detach(mut self) -> u32 {
        self.stopped = true;
        self.child = None;
        self.pid
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The known_hosts line for a server at `address:port` whose host key is `public_key_line`
/// (a `.pub` file's line).
pub fn known_hosts_line(address: &str, port: u16, public_key_line: &str) -> String {
    let mut fields = public_key_line.split_whitespace();
    let algorithm = fields.next().unwrap_or_default();
    let key = fields.next().unwrap_or_default();
    let host = if port == 22 {
        address.to_string()
    } else {
        format!("[{address}]:{port}")
    };
    format!("{host} {algorithm} {key}")
}

/// Where an sshd started with `dir` as its directory keeps its host's public key.
pub fn host_public_key_path(dir: &Path) -> PathBuf {
    pub_path(&dir.join(HOST_KEY))
}

/// Sends `sig` to `pid` only: never to a process group, so sessions of other tests are untouched.
fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 0 {
        return;
    }
    // SAFETY: kill has no memory-safety preconditions; a positive pid addresses one process.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Stops a detached sshd by PID (e.g. `cargo xtask fleet down`), waiting up to the same grace
/// period as [`Sshd::stop`] before SIGKILL. Returns whether the process is gone.
pub fn stop_pid(pid: u32) -> bool {
    // Not kill(pid, 0): that succeeds on a zombie, and an orphaned sshd may stay one for as long
    // as init takes to reap it, which would turn every stop into a full timeout.
    let alive = crate::proc::alive;
    if !alive(pid) {
        return true;
    }
    signal(pid, libc::SIGTERM);
    let started = Instant::now();
    while started.elapsed() < STOP_GRACE {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(POLL);
    }
    signal(pid, libc::SIGKILL);
    let started = Instant::now();
    while started.elapsed() < STOP_GRACE {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(POLL);
    }
    false
}

/// Kills the sshd listening as `listener` and every sshd process serving a connection it
/// accepted, so that every SSH connection to the host drops at once, as when a host's sshd
/// crashes or the network cuts it off. Stopping the listener alone would not do: each
/// connection has processes of its own that outlive it. Commands those connections were
/// running are left alone, as a crash would leave them. Returns whether all of them are gone,
/// after bounded waits.
pub fn kill_with_connections(listener: u32) -> bool {
    use crate::proc;
    if !proc::alive(listener) {
        return true;
    }
    // Frozen first, and only then searched: a listener that dies is no longer anyone's parent,
    // and a running one could fork a connection between the search and the kill.
    proc::signal(listener, libc::SIGSTOP);
    let frozen = Instant::now();
    while !is_stopped(listener) && proc::alive(listener) && frozen.elapsed() < STOP_GRACE {
        std::thread::sleep(POLL);
    }
    let mut doomed = vec![listener];
    let mut next = 0;
    while next < doomed.len() {
        let parent = doomed[next];
        next += 1;
        // Per connection: a privileged monitor and its unprivileged child, both sshd.
        let connections: Vec<u32> = proc::children(parent)
            .into_iter()
            .filter(|&pid| is_sshd(pid))
            .collect();
        doomed.extend(connections);
    }
    for &pid in &doomed {
        proc::signal(pid, libc::SIGKILL);
    }
    doomed.iter().all(|&pid| proc::wait_gone(pid, STOP_GRACE))
}

/// Stopped by a signal (`T`), per /proc.
fn is_stopped(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(") ")
            .is_some_and(|i| stat[i + 2..].starts_with('T'))
    })
}

/// By executable rather than command line: sshd retitles its processes (`sshd: user@notty`),
/// and the commands sessions run are not sshd. Matches `sshd-session` and
/// `sshd-auth` of newer OpenSSH too.
fn is_sshd(pid: u32) -> bool {
    fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
        exe.file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with("sshd"))
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("making {} absolute", path.display()))
}

fn read_log(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = fs::File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    text
}

fn sshd_config(
    spec: &SshdSpec,
    host_key: &Path,
    pid_file: &Path,
    force_command: Option<&str>,
) -> String {
    // IPv6 literals need brackets in ListenAddress when a port is attached.
    let listen = if spec.address.contains(':') {
        format!("[{}]:{}", spec.address, spec.port)
    } else {
        format!("{}:{}", spec.address, spec.port)
    };
    let mut config = format!(
        "# Written by roller-fleet; regenerated on every start.\n\
         ListenAddress {listen}\n\
         HostKey {host_key}\n\
         PidFile {pid_file}\n\
         AuthorizedKeysFile {authorized_keys}\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         UsePAM no\n\
         StrictModes no\n\
         PermitRootLogin prohibit-password\n\
         AllowTcpForwarding {forwarding}\n\
         PrintMotd no\n\
         UseDNS no\n\
         LogLevel INFO\n\
         # OpenSSH's defaults, written out: roller must live within them on every host.\n\
         MaxStartups 10:30:100\n\
         MaxSessions 10\n",
        host_key = host_key.display(),
        pid_file = pid_file.display(),
        authorized_keys = spec.authorized_keys.display(),
        forwarding = if spec.options.refuse_forwarding {
            "no"
        } else {
            "yes"
        },
    );
    if let Some(address) = &spec.options.allow_only_from {
        // With UseDNS no, the host part is matched against the client's address.
        config.push_str(&format!("AllowUsers *@{address}\n"));
    }
    if let Some(ca_keys) = &spec.options.trusted_user_ca_keys {
        config.push_str(&format!("TrustedUserCAKeys {}\n", ca_keys.display()));
    }
    if let Some(enter) = force_command {
        config.push_str(&format!("ForceCommand {enter}\n"));
    }
    config
}

/// The ForceCommand that gives each simulated host its own working directory. sshd runs it
/// with the user's login shell (`$SHELL -c`), which then runs the requested command itself,
/// so that every command meets the login shell exactly as on a real host: same parser, same
/// rc files. Plain `cd` and `eval`, which bash, dash, zsh and fish all read alike.
fn enter_command(session_dir: &Path) -> anyhow::Result<String> {
    let session_dir = session_dir
        .to_str()
        .with_context(|| format!("{} is not UTF-8", session_dir.display()))?;
    Ok(format!(
        "cd {} && eval \"$SSH_ORIGINAL_COMMAND\"",
        shell_quote(session_dir)
    ))
}

/// `fleet/shim/forward_from.c`, compiled once per source text into the target directory.
fn forward_from_library() -> anyhow::Result<PathBuf> {
    const SOURCE: &str = include_str!("../shim/forward_from.c");
    // One compiler at a time in this process; other processes are handled by the rename below.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let key = crate::jar::fnv1a(&[SOURCE.as_bytes()]);
    let dir = crate::target_dir().join("roller-fleet");
    let library = dir.join(format!("forward-from-{key:016x}.so"));
    if library.is_file() {
        return Ok(library);
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Concurrent fleets each build their own copy and publish it with an atomic rename.
    let scratch = dir.join(format!(".forward-from-{}-{key:016x}", std::process::id()));
    fs::create_dir_all(&scratch)?;
    let result = (|| {
        let source = scratch.join("forward_from.c");
        fs::write(&source, SOURCE)?;
        let partial = scratch.join("forward_from.so");
        crate::proc::run(
            Command::new("cc")
                .args(["-shared", "-fPIC", "-O2", "-o"])
                .arg(&partial)
                .arg(&source)
                .arg("-ldl"),
            Duration::from_secs(120),
        )
        .context("running cc (a bastion's forwards need a C compiler)")?
        .check("cc forward_from.c")?;
        fs::rename(&partial, &library).with_context(|| format!("publishing {}", library.display()))
    })();
    let _ = fs::remove_dir_all(&scratch);
    result?;
    Ok(library)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
