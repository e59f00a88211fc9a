//! Shared by the end-to-end tests: running the `roller` binary (to completion, or streaming
//! its JSON events so a test can act mid-rollout) and checking the state of a local fleet.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use roller_fleet::{Fleet, Load, LoadReport};
use serde_json::Value;

/// A whole rollout, JVM restarts included, stays well inside this on a 2-core machine.
pub const ROLLOUT_DEADLINE: Duration = Duration::from_secs(240);
pub const LOAD_CLIENTS: usize = 4;

pub struct Run {
    pub code: Option<i32>,
    /// Every JSON line roller printed.
    pub lines: Vec<Value>,
    pub stderr: String,
}

impl Run {
    pub fn report(&self) -> &Value {
        self.lines
            .iter()
            .rev()
            .find(|l| l["event"] == "report")
            .map(|l| &l["report"])
            .unwrap_or_else(|| panic!("no report in {:?}\n{}", self.lines, self.stderr))
    }

    pub fn error(&self) -> &Value {
        self.lines
            .iter()
            .find(|l| l["event"] == "error")
            .unwrap_or_else(|| panic!("no error in {:?}\n{}", self.lines, self.stderr))
    }

    /// Targets that had a step of `phase` started.
    pub fn touched(&self, phase: &str) -> BTreeSet<String> {
        self.lines
            .iter()
            .filter(|l| l["event"] == "step")
            .filter(|l| l["step"]["phase"] == phase && l["step"]["state"] == "started")
            .map(|l| l["step"]["target"].as_str().unwrap().to_string())
            .collect()
    }
}

/// Runs roller to the end and returns everything it printed.
pub fn roller<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    Running::start(args).finish()
}

pub fn rollout(inventory: &Path, jar: &Path, release: &str, batch: &str) -> Run {
    roller(&rollout_args(inventory, jar, release, batch, &[]))
}

/// `roller rollout` flags, with the journal kept beside the inventory rather than in $HOME.
pub fn rollout_args(
    inventory: &Path,
    jar: &Path,
    release: &str,
    batch: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "rollout",
        "--inventory",
        inventory.to_str().unwrap(),
        "--artifact",
        jar.to_str().unwrap(),
        "--release",
        release,
        "--batch",
        batch,
        "--journal-dir",
        journal_dir(inventory).to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

pub fn journal_dir(inventory: &Path) -> PathBuf {
    inventory.parent().unwrap().join("journal")
}

/// `roller resume` / `recover` / `unlock` with the fleet's inventory and journal directory.
pub fn admin(command: &str, inventory: &Path, extra: &[&str]) -> Run {
    roller(&admin_args(command, inventory, extra))
}

/// The arguments [`admin`] runs roller with.
pub fn admin_args(command: &str, inventory: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        command.to_string(),
        "--inventory".into(),
        inventory.to_str().unwrap().into(),
    ];
    if !matches!(command, "unlock" | "promote" | "abort") {
        args.extend([
            "--journal-dir".into(),
            journal_dir(inventory).to_str().unwrap().into(),
        ]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The fleet's inventory with some keys replaced, written beside it.
pub fn inventory_with(fleet: &Fleet, edits: &[(&str, &str, toml::Value)]) -> PathBuf {
    let text = std::fs::read_to_string(fleet.inventory_path()).unwrap();
    let mut doc: toml::Table = text.parse().unwrap();
    for (section, key, value) in edits {
        doc[*section]
            .as_table_mut()
            .unwrap()
            .insert(key.to_string(), value.clone());
    }
    let path = fleet.root().join("inventory-edited.toml");
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    path
}

/// Logins the fleet's bastion accepted so far, from its sshd's log.
pub fn bastion_logins(fleet: &Fleet) -> usize {
    let log = fleet
        .host_dir(roller_fleet::BASTION_NAME)
        .join("sshd")
        .join("sshd.log");
    std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches("Accepted publickey")
        .count()
}

pub fn start_load(fleet: &Fleet) -> Load {
    let load = Load::start(&fleet.lb_url(), LOAD_CLIENTS);
    assert!(
        load.wait_for_requests(50, Duration::from_secs(30)),
        "traffic through nginx never got going"
    );
    load
}

pub fn assert_no_failed_requests(report: &LoadReport) {
    assert!(
        report.ok > 100,
        "too little traffic to prove anything: {report:?}"
    );
    assert_eq!(report.failed, 0, "failed requests: {:#?}", report.failures);
}

/// Every host is on `release`, serves `version`, is healthy and in the pool, and nginx
/// serves only `version`.
pub fn assert_fleet_on(fleet: &Fleet, release: &str, version: &str) {
    for host in fleet.host_names() {
        assert_eq!(
            fleet.live_release(&host).as_deref(),
            Some(release),
            "{host} live release"
        );
        assert_eq!(
            fleet.app_version(&host).as_deref(),
            Some(version),
            "{host} runs"
        );
        assert_eq!(fleet.app_health(&host), Some(200), "{host} health");
    }
    assert_eq!(
        fleet.upstream_text().matches(" down").count(),
        0,
        "{}",
        fleet.upstream_text()
    );
    let served = Load::start(&fleet.lb_url(), 2);
    assert!(served.wait_for_requests(40, Duration::from_secs(30)));
    let served = served.stop();
    assert_eq!(served.failed, 0, "{:?}", served.failures);
    assert_eq!(
        served.versions.keys().cloned().collect::<Vec<_>>(),
        vec![version.to_string()],
        "nginx serves {:?}",
        served.versions
    );
}

/// A roller process whose JSON events are read as they come.
pub struct Running {
    child: Child,
    events: mpsc::Receiver<Value>,
    seen: Vec<Value>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

/// A test that fails while roller runs must not leave it running: it would go on changing
/// hosts (restarting apps) after the fleet was stopped.
impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Running {
    pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Running {
        Running::start_with_env(args, &[])
    }

    /// With these variables added to roller's environment (an API endpoint, credentials).
    pub fn start_with_env<S: AsRef<std::ffi::OsStr>>(
        args: &[S],
        env: &[(String, String)],
    ) -> Running {
        let mut child = Command::new(env!("CARGO_BIN_EXE_roller"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(["--output", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start roller");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        let stderr =
            std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
        Running {
            child,
            events,
            seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for a step event with this phase, target and state.
    pub fn wait_for_step(&mut self, phase: &str, target: &str, state: &str) {
        let deadline = Instant::now() + ROLLOUT_DEADLINE;
        if self.seen.iter().any(|e| is_step(e, phase, target, state)) {
            return;
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) => {
                    let hit = is_step(&event, phase, target, state);
                    self.seen.push(event);
                    if hit {
                        return;
                    }
                }
                Err(_) => panic!(
                    "no {phase} {state} on {target} before roller stopped or the deadline; saw {:#?}",
                    self.seen
                ),
            }
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a child's PID; no memory is involved.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid());
    }

    /// Waits for the process to end and returns everything it printed.
    pub fn finish(mut self) -> Run {
        let status = roller_fleet::proc::wait_child(&mut self.child, ROLLOUT_DEADLINE)
            .unwrap_or_else(|e| {
                let _ = self.child.kill();
                panic!("roller did not finish: {e}")
            });
        while let Ok(event) = self.events.recv_timeout(Duration::from_secs(10)) {
            self.seen.push(event);
        }
        Run {
            code: status.code(),
            lines: std::mem::take(&mut self.seen),
            stderr: self
                .stderr
                .take()
                .map(|h| h.join().unwrap())
                .unwrap_or_default(),
        }
    }
}

fn is_step(event: &Value, phase: &str, target: &str, state: &str) -> bool {
    event["event"] == "step"
        && event["step"]["phase"] == phase
        && event["step"]["target"] == target
        && event["step"]["state"] == state
}

/// The fleet's rolling inventory turned into a canary one.
pub fn canary_inventory(fleet: &Fleet, canary: &[(&str, toml::Value)]) -> PathBuf {
    let text = std::fs::read_to_string(fleet.inventory_path()).unwrap();
    let mut doc: toml::Table = text.parse().unwrap();
    make_canary(fleet, &mut doc, canary);
    let path = fleet.root().join("inventory-canary.toml");
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    path
}

/// Turns an inventory document into a canary one reading the fleet's access log.
pub fn make_canary(fleet: &Fleet, doc: &mut toml::Table, canary: &[(&str, toml::Value)]) {
    doc.insert("strategy".into(), "canary".into());
    let mut section = toml::Table::new();
    section.insert(
        "access_log".into(),
        fleet
            .access_log_path()
            .to_string_lossy()
            .into_owned()
            .into(),
    );
    for (key, value) in canary {
        section.insert(key.to_string(), value.clone());
    }
    doc.insert("canary".into(), section.into());
}

/// Each host of the final report as (name, outcome, in pool).
pub fn report_hosts(run: &Run) -> Vec<(String, String, bool)> {
    run.report()["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap().to_string(),
                h["outcome"].as_str().unwrap().to_string(),
                h["in_pool"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Gives `host`'s known_hosts entry the load balancer's key: a different, valid key for that
/// address, as a host whose key changed (or a machine in its place) presents.
pub fn give_host_the_lb_key(fleet: &Fleet, host: &str) {
    let known_hosts = std::fs::read_to_string(fleet.known_hosts_path()).unwrap();
    let address = fleet.host_address(host);
    let lb_key = known_hosts
        .lines()
        .find(|l| l.starts_with(&format!("[{}]", fleet.lb_address())))
        .and_then(|l| l.split_once(' '))
        .map(|(_, key)| key.to_string())
        .unwrap();
    let tampered: Vec<String> = known_hosts
        .lines()
        .map(|l| match l.split_once(' ') {
            Some((h, _)) if h.starts_with(&format!("[{address}]")) => format!("{h} {lb_key}"),
            _ => l.to_string(),
        })
        .collect();
    std::fs::write(fleet.known_hosts_path(), tampered.join("\n") + "\n").unwrap();
}
