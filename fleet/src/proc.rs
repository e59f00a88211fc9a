//! Process bookkeeping by PID, because fleet processes outlive the process that started them.
//!
//! `cargo xtask fleet up` exits while its JVMs, nginx and sshds keep running, and a later
//! `fleet down` must stop exactly those processes and nothing else: other fleets (other tests,
//! other developers) run side by side on the same machine, so nothing here matches by name.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub(crate) const POLL: Duration = Duration::from_millis(10);

/// Whether `pid` is a running process. A zombie counts as gone: orphans are reparented to an
/// init that may never reap them, yet they hold no sockets and do no work.
pub fn alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The command name in parentheses may itself contain ") ", so split at the last one.
        Ok(stat) => match stat.rfind(") ") {
            Some(i) => !matches!(stat[i + 2..].chars().next(), Some('Z' | 'X') | None),
            None => false,
        },
        Err(_) => false,
    }
}

/// The parent PID, from /proc.
pub fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(") ")? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Live processes whose parent is `pid`: nginx workers, which must not outlive a killed master.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| parent(child) == Some(pid) && alive(child))
        .collect()
}

/// The command line, arguments joined by spaces.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let parts: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    Some(parts.join(" "))
}

/// Live processes whose working directory is under `dir`: whatever sessions on a fleet host
/// left running (a detached timer a rollout scheduled there, say).
pub fn running_in(dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id() && alive(pid))
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir))
        })
        .collect()
}

/// Whether a live `pid` still is the process we recorded, not a stranger that reused the PID:
/// its working directory is under `marker` or its command line mentions `marker`.
pub fn belongs_to(pid: u32, marker: &Path) -> bool {
    if !alive(pid) {
        return false;
    }
    if let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd"))
        && cwd.starts_with(marker)
    {
        return true;
    }
    let marker = marker.to_string_lossy();
    cmdline(pid).is_some_and(|c| c.contains(marker.as_ref()))
}

/// Sends `sig` to this one PID (never a group).
pub fn signal(pid: u32, sig: libc::c_int) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill has no memory-safety preconditions; a positive pid addresses one process.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// Polls until `pid` is gone or `timeout` passes; returns whether it is gone.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// SIGTERM, up to `grace` for a clean exit, then SIGKILL and a short bounded wait.
/// Returns whether the process is gone.
pub fn terminate(pid: u32, grace: Duration) -> bool {
    if !alive(pid) {
        return true;
    }
    signal(pid, libc::SIGTERM);
    if wait_gone(pid, grace) {
        return true;
    }
    signal(pid, libc::SIGKILL);
    wait_gone(pid, Duration::from_secs(5))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Finds `name` on PATH and returns its absolute path: commands run over SSH get a minimal
/// PATH, so every binary the fleet writes into a script or inventory must be absolute.
pub fn find_program(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]) {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return std::path::absolute(&candidate).context("making path absolute");
        }
    }
    bail!("{name} not found on PATH (nor in /usr/sbin)")
}

/// A JDK tool: from `$JAVA_HOME/bin` when set, so all three tools come from one JDK.
pub fn find_jdk_tool(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(home) = std::env::var_os("JAVA_HOME") {
        let candidate = Path::new(&home).join("bin").join(name);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    find_program(name).with_context(|| format!("{name} is part of the JDK; install JDK 17+"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What a bounded command run left behind.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn check(self, what: &str) -> anyhow::Result<Finished> {
        if self.status.success() {
            return Ok(self);
        }
        bail!(
            "{what} failed ({}):\n{}{}",
            self.status,
            self.stdout,
            self.stderr
        )
    }
}

/// Runs `command` to completion, killing it past `timeout`. Output is collected on threads so
/// that a chatty child cannot block on a full pipe while we wait.
pub fn run(command: &mut Command, timeout: Duration) -> anyhow::Result<Finished> {
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let out = collect(child.stdout.take());
    let err = collect(child.stderr.take());
    let status = wait_child(&mut child, timeout).with_context(|| format!("running {program}"))?;
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok(Finished {
        status,
        stdout,
        stderr,
    })
}

fn collect<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Waits for a child with a deadline; kills and reaps it when the deadline passes.
pub fn wait_child(child: &mut Child, timeout: Duration) -> anyhow::Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("still running after {timeout:?}; killed");
        }
        std::thread::sleep(POLL);
    }
}

/// Single-quotes `s` for /bin/sh unless it is plainly safe, so the inventory's commands stay
/// readable for the common case.
pub fn shell_quote(s: impl AsRef<OsStr>) -> String {
    let s = s.as_ref().to_string_lossy();
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c));
    if safe {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_reaped_child_is_not() {
        assert!(alive(std::process::id()));
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!alive(pid));
    }

    #[test]
    fn zombie_counts_as_gone() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not reaped yet: a zombie until wait().
        assert!(wait_gone(pid, Duration::from_secs(10)));
        child.wait().unwrap();
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/usr/sbin/nginx"), "/usr/sbin/nginx");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
