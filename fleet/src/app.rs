//! The demo app on the fleet's app hosts, seen as their operators would: laid out by hand
//! (release v1, the `current` links, the `bin/` scripts), started, and found again by its pid
//! files and links to answer what runs where.
//!
//! In blue-green modes an app host runs two slots; the fleet's `app_*` accessors follow the one
//! nginx sends the host's traffic to, its `slot_*` accessors name a slot.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::fleet::{
    APP_DIR, Fleet, HEALTH_PATH, HostState, INITIAL_RELEASE, JAR_NAME, RESTART, RESTART_SLOT,
    SLOTS, STOP, STOP_SLOT, State,
};
use crate::lb::upstream_servers;
use crate::{nginx, proc, scripts};

const RESTART_SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

impl Fleet {
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

    pub(crate) fn wait_apps_healthy(
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

    /// The slot whose JVM serves `host`'s traffic; `None` for a rolling fleet's single JVM.
    pub(crate) fn app_slot(&self, host: &HostState) -> Option<&'static str> {
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

    pub(crate) fn slot_of_port(&self, port: u16) -> Option<&'static str> {
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
}

/// Lays out one app host by hand: release v1, then either the `current` link and
/// `bin/restart`, or (blue-green) the `current-blue` link and the slot scripts. Green gets no
/// link: nothing was ever deployed to it.
pub(crate) fn install_host(host: &HostState, state: &State, v1: &Path) -> anyhow::Result<()> {
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
    let runtime = runtime(state)?;
    let (link, scripts) = if spec.mode.is_blue_green() {
        let ports = (spec.app_port, spec.green_port);
        (
            format!("current-{}", SLOTS[0]),
            vec![
                (
                    RESTART_SLOT,
                    scripts::restart_slot(&state.java, &host.address, ports),
                ),
                (STOP_SLOT, scripts::stop_slot(ports)),
            ],
        )
    } else {
        let ports = (spec.slot_port(SLOTS[0]), spec.slot_port(SLOTS[1]));
        (
            "current".to_string(),
            vec![
                (
                    RESTART,
                    scripts::restart(runtime, &host.address, spec.app_port),
                ),
                (STOP, scripts::stop()),
                (
                    RESTART_SLOT,
                    scripts::restart_slot(&state.java, &host.address, ports),
                ),
                (STOP_SLOT, scripts::stop_slot(ports)),
            ],
        )
    };
    // Relative, as roller writes it, so the host directory can be inspected or moved.
    std::os::unix::fs::symlink(
        Path::new("releases").join(INITIAL_RELEASE),
        host.dir.join(APP_DIR).join(link),
    )?;
    if spec.light_apps {
        let app = host.dir.join("bin").join("light-app.py");
        std::fs::write(&app, scripts::LIGHT_APP)?;
        std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755))?;
    }
    for (name, text) in scripts {
        let script = host.dir.join(name);
        std::fs::write(&script, text)?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// What `bin/restart` starts on this fleet's hosts.
fn runtime(state: &State) -> anyhow::Result<scripts::Runtime<'_>> {
    if !state.spec.light_apps {
        return Ok(scripts::Runtime::Jvm(&state.java));
    }
    if state.spec.mode.is_blue_green() {
        anyhow::bail!("light apps stand in for rolling hosts only");
    }
    // The system's python3, not a per-user shim (pyenv): the hosts' users must run it too.
    let python = Path::new(LIGHT_PYTHON);
    if !python.is_file() {
        anyhow::bail!("light apps need {LIGHT_PYTHON} (Debian package python3)");
    }
    Ok(scripts::Runtime::Light(python))
}

const LIGHT_PYTHON: &str = "/usr/bin/python3";

/// Runs a host script (`args[0]`, relative to the host's directory) as roller would, from the
/// host's directory.
pub(crate) fn run_script(host: &HostState, args: &[&str]) -> anyhow::Result<()> {
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

pub(crate) fn log_file(slot: Option<&str>) -> String {
    slot.map_or("app.log".to_string(), |slot| format!("app-{slot}.log"))
}

/// The PID recorded in the pid file, alive or not.
pub(crate) fn read_pid(dir: &Path, slot: Option<&str>) -> Option<u32> {
    std::fs::read_to_string(dir.join(pid_file(slot)))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The recorded PID if it is alive and still the JVM that wrote it. Both slots share a
/// working directory (and in a single-machine fleet, so do nginx and sshd sessions), so a
/// slot's JVM is recognised by the jar path on its command line.
pub(crate) fn app_process(dir: &Path, slot: Option<&str>) -> Option<u32> {
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

#[cfg(test)]
mod tests {
    use crate::fleet::fake;
    use crate::spec::tests_dir;
    use crate::{FleetSpec, Mode, nginx};

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
}
