//! Controller-side hooks from `[hooks]` (`before_rollout`, `after_batch`, `after_rollout`,
//! `on_failure`): the operator's commands, run on the machine that runs roller, with what the
//! run is doing in the environment, so that a release job can notify, gate or record without
//! parsing roller's output. Only `before_rollout` can stop a run; the others are reported.

use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use crate::error::{Error, Result};
use crate::inventory::HooksConfig;
use crate::journal::{Journal, RunKind};
use crate::report::Outcome;

/// What a hook keeps of each of its output streams; the rest is read and dropped, so a chatty
/// hook neither blocks on a full pipe nor fills the controller's memory or the journal.
const OUTPUT_CAP: usize = 16 * 1024;

/// How one hook ended.
#[derive(Debug, Clone, Serialize)]
pub struct HookRun {
    pub hook: &'static str,
    /// `None` when it was killed at `hooks.timeout` or could not start.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Why it counts as failed, in words; `None` when it exited 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// The run the hooks are told about, and where their runs are recorded.
pub struct ControllerHooks<'a> {
    pub config: &'a HooksConfig,
    pub kind: RunKind,
    pub release: String,
    pub rollout_id: String,
    /// The hosts the run changes, in plan order.
    pub hosts: Vec<String>,
    pub journal: Option<&'a Journal>,
    /// Failures of hooks that do not stop the run, for the report's notes.
    warnings: Mutex<Vec<String>>,
}

impl<'a> ControllerHooks<'a> {
    pub fn new(
        config: &'a HooksConfig,
        kind: RunKind,
        release: String,
        rollout_id: String,
        hosts: Vec<String>,
        journal: Option<&'a Journal>,
    ) -> ControllerHooks<'a> {
        ControllerHooks {
            config,
            kind,
            release,
            rollout_id,
            hosts,
            journal,
            warnings: Mutex::new(Vec::new()),
        }
    }

    /// Before anything changes: a failure (or a timeout) stops the run.
    pub async fn before_rollout(&self) -> Result<()> {
        let Some(command) = &self.config.before_rollout else {
            return Ok(());
        };
        let run = self
            .run("before_rollout", command, None, &self.hosts, None)
            .await;
        match &run.failure {
            None => Ok(()),
            Some(failure) => Err(Error::Hook {
                hook: "before_rollout".into(),
                message: format!("{failure}{}", shown_stderr(&run)),
            }),
        }
    }

    /// After each batch that completed; a failure is a warning.
    pub async fn after_batch(&self, batch: usize, hosts: &[String]) {
        if let Some(command) = &self.config.after_batch {
            let run = self
                .run("after_batch", command, Some(batch), hosts, None)
                .await;
            self.warn_on_failure(&run);
        }
    }

    /// Once the run ended: `after_rollout` when it succeeded, else `on_failure`. A failure is
    /// a warning; the run's outcome stays what it was.
    pub async fn after_run(&self, outcome: Outcome) {
        let (hook, command) = match outcome {
            Outcome::Succeeded => ("after_rollout", &self.config.after_rollout),
            _ => ("on_failure", &self.config.on_failure),
        };
        if let Some(command) = command {
            let run = self
                .run(hook, command, None, &self.hosts, Some(outcome))
                .await;
            self.warn_on_failure(&run);
        }
    }

    /// The warnings so far, for the report's notes.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings.lock().expect("warnings lock").clone()
    }

    fn warn_on_failure(&self, run: &HookRun) {
        if let Some(failure) = &run.failure {
            let warning = format!(
                "hook {} failed ({failure}){}; the run's outcome is unchanged",
                run.hook,
                shown_stderr(run)
            );
            eprintln!("warning: {warning}");
            self.warnings.lock().expect("warnings lock").push(warning);
        }
    }

    async fn run(
        &self,
        hook: &'static str,
        command: &str,
        batch: Option<usize>,
        hosts: &[String],
        outcome: Option<Outcome>,
    ) -> HookRun {
        let mut env = vec![
            ("ROLLER_HOOK", hook.to_string()),
            ("ROLLER_KIND", kind_name(self.kind).to_string()),
            ("ROLLER_RELEASE", self.release.clone()),
            ("ROLLER_ROLLOUT_ID", self.rollout_id.clone()),
            ("ROLLER_HOSTS", hosts.join(",")),
        ];
        if let Some(batch) = batch {
            env.push(("ROLLER_BATCH", batch.to_string()));
        }
        if let Some(outcome) = outcome {
            env.push(("ROLLER_OUTCOME", outcome_name(outcome)));
        }
        let run = run_command(hook, command, &env, self.config.timeout).await;
        if let Some(journal) = self.journal {
            journal.record(
                "hook",
                serde_json::json!({ "run": &run, "batch": batch, "command": command }),
            );
        }
        run
    }
}

fn shown_stderr(run: &HookRun) -> String {
    let stderr = run.stderr.trim();
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {}", stderr.escape_debug())
    }
}

fn kind_name(kind: RunKind) -> &'static str {
    match kind {
        RunKind::Rollout => "rollout",
        RunKind::Rollback => "rollback",
    }
}

/// The report's outcome as the JSON report spells it.
fn outcome_name(outcome: Outcome) -> String {
    serde_json::to_value(outcome)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// Runs `command` under `sh -c` in a process group of its own, so that a timeout stops
/// whatever it started too, not only the shell.
async fn run_command(
    hook: &'static str,
    command: &str,
    env: &[(&str, String)],
    timeout: Duration,
) -> HookRun {
    let ended = |exit_code, stdout, stderr, failure| HookRun {
        hook,
        exit_code,
        stdout,
        stderr,
        failure,
    };
    let mut child = match Command::new("sh")
        .arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            return ended(
                None,
                String::new(),
                String::new(),
                Some(format!("could not start sh: {e}")),
            );
        }
    };
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let finished = tokio::time::timeout(timeout, async {
        let (out, err, status) = tokio::join!(capped(stdout), capped(stderr), child.wait());
        (out, err, status)
    })
    .await;
    match finished {
        Ok((out, err, Ok(status))) => {
            let failure = (!status.success()).then(|| match status.code() {
                Some(code) => format!("exit code {code}"),
                None => "killed by a signal".to_string(),
            });
            ended(status.code(), out, err, failure)
        }
        Ok((out, err, Err(e))) => ended(None, out, err, Some(format!("could not wait: {e}"))),
        Err(_) => {
            if let Some(pid) = pid {
                // The whole group: the shell and anything it started.
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .status();
            }
            ended(
                None,
                String::new(),
                String::new(),
                Some(format!(
                    "still running after hooks.timeout ({}), killed",
                    humantime::format_duration(timeout)
                )),
            )
        }
    }
}

/// Reads a stream to its end, keeping its first [`OUTPUT_CAP`] bytes.
async fn capped(mut stream: impl AsyncRead + Unpin) -> String {
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = OUTPUT_CAP.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hook_sees_its_environment_and_its_output_is_capped() {
        let env = [
            ("ROLLER_RELEASE", "v2".to_string()),
            ("ROLLER_BATCH", "3".to_string()),
        ];
        let run = run_command(
            "after_batch",
            "echo \"$ROLLER_RELEASE/$ROLLER_BATCH\"; head -c 100000 /dev/zero >&2; exit 5",
            &env,
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(run.stdout, "v2/3\n");
        assert_eq!(run.stderr.len(), OUTPUT_CAP);
        assert_eq!(run.exit_code, Some(5));
        assert_eq!(run.failure.as_deref(), Some("exit code 5"));
    }

    #[tokio::test]
    async fn a_hook_past_its_timeout_is_killed_with_what_it_started() {
        let dir = tempfile_dir();
        let pid_file = dir.join("background.pid");
        let command = format!(
            "sh -c 'echo $$ > {}; exec sleep 30' & sleep 30",
            crate::remote::quote(pid_file.to_str().unwrap())
        );
        let run = run_command("before_rollout", &command, &[], Duration::from_millis(300)).await;
        assert!(run.failure.unwrap().contains("hooks.timeout"));
        // The background job was in the hook's group: it is gone too.
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let proc = std::path::Path::new("/proc").join(pid.trim());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while proc.exists() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!proc.exists(), "a process the hook started outlived it");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("roller-hooks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
