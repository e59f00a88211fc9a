//! What the executor tells the world: a stream of step events while it runs, and a final report
//! that says where every host ended up and, when something is left for a human, how to finish.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::error::HostFailure;
use crate::journal::RunKind;
use crate::plan::PhaseName;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepState {
    Started,
    Succeeded,
    Skipped,
    Failed,
}

/// One step of one target changed state.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Milliseconds since the rollout started.
    pub at_ms: u64,
    /// Wall-clock time in milliseconds since the Unix epoch, so that an event can be lined up
    /// with the load balancer's own logs (`$msec`).
    pub unix_ms: u64,
    pub batch: Option<usize>,
    pub phase: PhaseName,
    pub target: String,
    pub state: StepState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// A pool change: the hosts it leaves out of the pool. Once it succeeded, the load
    /// balancer sends them no new request until the next pool change that puts them back
    /// starts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub down: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Every host runs the release and is in the pool.
    Succeeded,
    /// A batch failed and was rolled back; every host is on a known release and in the pool.
    RolledBack,
    /// A batch failed and some of it could not be restored: see `recovery`.
    RollbackIncomplete,
    /// A batch failed and was left out of the pool on purpose (`--on-failure halt`).
    Halted,
    /// Stopped by Ctrl-C, SIGTERM or a lost lock; every host is on a known release and in the
    /// pool.
    Interrupted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostOutcome {
    /// Runs the new release (this rollout put it there, or it already had it).
    Updated,
    /// Its batch failed; it is back on its previous release.
    RolledBack,
    /// Its batch was never reached.
    Untouched,
    /// Could not be restored: it is not known to be healthy, and is out of the pool.
    Failed,
    /// Left as it was when its batch failed, out of the pool (`--on-failure halt`).
    Halted,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub name: String,
    pub outcome: HostOutcome,
    /// The release `current` points to, as last seen.
    pub release: Option<String>,
    pub in_pool: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RolloutReport {
    pub release: String,
    /// `rollout`, or `rollback` for `roller rollback` (and a resumed rollback).
    pub kind: RunKind,
    pub outcome: Outcome,
    /// The failure that stopped the rollout.
    pub failure: Option<FailureAt>,
    /// Why the rollout was interrupted, when it was.
    pub interrupted: Option<String>,
    pub hosts: Vec<HostReport>,
    /// Decisions roller took on the way, and why.
    pub notes: Vec<String>,
    /// What an operator must do by hand, in order. Empty when nothing is left to do.
    pub recovery: Vec<String>,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailureAt {
    pub batch: usize,
    #[serde(flatten)]
    pub failure: HostFailure,
}

impl RolloutReport {
    pub fn headline(&self) -> String {
        let why = self
            .failure
            .as_ref()
            .map(|f| format!(" at batch {}: {}", f.batch, f.failure))
            .unwrap_or_default();
        let run = match self.kind {
            RunKind::Rollout => "rollout of",
            RunKind::Rollback => "rollback to",
        };
        match self.outcome {
            Outcome::Succeeded => {
                let left: Vec<&str> = self
                    .hosts
                    .iter()
                    .filter(|h| h.outcome == HostOutcome::Untouched)
                    .map(|h| h.name.as_str())
                    .collect();
                if left.is_empty() {
                    format!("release {} is live on every host", self.release)
                } else {
                    format!(
                        "release {} is live on every selected host; {} not selected, left as they were",
                        self.release,
                        left.join(", ")
                    )
                }
            }
            Outcome::RolledBack if self.failure.is_none() => {
                let back: Vec<&str> = self
                    .hosts
                    .iter()
                    .filter(|h| h.outcome == HostOutcome::RolledBack)
                    .map(|h| h.name.as_str())
                    .collect();
                format!(
                    "release {} is live on every host but {}, rolled back within --max-failed-hosts; every host is in the pool",
                    self.release,
                    back.join(", ")
                )
            }
            Outcome::RolledBack => format!(
                "{run} {} failed{why}; rolled back, and every host is in the pool",
                self.release
            ),
            Outcome::RollbackIncomplete => format!(
                "{run} {} failed{why}; the rollback did not complete: action needed",
                self.release
            ),
            Outcome::Halted => format!(
                "{run} {} failed{why}; halted with the failed batch out of the pool",
                self.release
            ),
            Outcome::Interrupted => format!(
                "{run} {} interrupted ({}); every host is on a known release and in the pool",
                self.release,
                self.interrupted.as_deref().unwrap_or("signal")
            ),
        }
    }

    pub fn render_text(&self) -> String {
        let mut out = format!("{}\n", self.headline());
        let width = self.hosts.iter().map(|h| h.name.len()).max().unwrap_or(4);
        for h in &self.hosts {
            let outcome = match h.outcome {
                HostOutcome::Updated => "updated",
                HostOutcome::RolledBack => "rolled back",
                HostOutcome::Untouched => "untouched",
                HostOutcome::Failed => "FAILED",
                HostOutcome::Halted => "HALTED",
            };
            out.push_str(&format!(
                "  {:width$}  {:11}  release {:20}  {}{}\n",
                h.name,
                outcome,
                h.release.as_deref().unwrap_or("(none)"),
                if h.in_pool { "in pool" } else { "OUT OF POOL" },
                h.note
                    .as_ref()
                    .map(|n| format!("  ({n})"))
                    .unwrap_or_default(),
            ));
        }
        for note in &self.notes {
            out.push_str(&format!("Note: {note}\n"));
        }
        if !self.recovery.is_empty() {
            out.push_str("To recover:\n");
            for (i, r) in self.recovery.iter().enumerate() {
                out.push_str(&format!("  {}. {r}\n", i + 1));
            }
        }
        out
    }
}

/// Receives events as they happen. Implementations must not block for long: they are called
/// from the executor's tasks.
pub trait Reporter: Send + Sync {
    fn event(&self, event: &Event);
    fn finish(&self, _report: &RolloutReport) {}
}

/// The version of every JSON document roller prints (events, reports, errors, plans): raised
/// when a field is removed or changes meaning, never for an added one.
pub const SCHEMA_VERSION: u32 = 1;

/// `{"schema_version": .., "event": event, ..fields}`: the shape of every JSON line roller
/// prints, so a release job can check the version before it reads anything else.
pub fn json_event(event: &str, fields: serde_json::Value) -> serde_json::Value {
    let mut doc = serde_json::json!({ "schema_version": SCHEMA_VERSION, "event": event });
    if let (Some(doc), serde_json::Value::Object(fields)) = (doc.as_object_mut(), fields) {
        doc.extend(fields);
    }
    doc
}

/// One JSON document per line on stdout, for release jobs; `quiet` leaves out the step events
/// and keeps the final report.
pub struct JsonReporter {
    pub quiet: bool,
}

impl Reporter for JsonReporter {
    fn event(&self, event: &Event) {
        if !self.quiet {
            json_line(&json_event("step", serde_json::json!({ "step": event })));
        }
    }

    fn finish(&self, report: &RolloutReport) {
        json_line(&json_event(
            "report",
            serde_json::json!({ "report": report }),
        ));
    }
}

/// Reports nothing while the rollout runs: `--quiet` on text output, where the final report is
/// printed only when something did not succeed.
pub struct QuietReporter;

impl Reporter for QuietReporter {
    fn event(&self, _event: &Event) {}
}

fn json_line(value: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout must not abort a rollout midway; the journal still has everything.
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// Plain lines on stderr, for logs and terminals that are not terminals.
pub struct PlainReporter;

impl Reporter for PlainReporter {
    fn event(&self, e: &Event) {
        if e.state == StepState::Started {
            return;
        }
        let batch = e.batch.map(|b| format!("batch {b} ")).unwrap_or_default();
        let elapsed = e
            .elapsed_ms
            .map(|ms| format!(" ({})", fmt_ms(ms)))
            .unwrap_or_default();
        let message = e
            .message
            .as_ref()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        let state = match e.state {
            StepState::Started => "started",
            StepState::Succeeded => "ok",
            StepState::Skipped => "skipped",
            StepState::Failed => "FAILED",
        };
        eprintln!(
            "[{:>8}] {batch}{} {} {state}{elapsed}{message}",
            fmt_ms(e.at_ms),
            e.target,
            e.phase
        );
    }
}

fn fmt_ms(ms: u64) -> String {
    format!("{:.2}s", Duration::from_millis(ms).as_secs_f64())
}

/// A live line per host on a terminal.
pub struct ProgressReporter {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl ProgressReporter {
    pub fn new(targets: &[String]) -> ProgressReporter {
        let multi = MultiProgress::new();
        let style = ProgressStyle::with_template("{spinner} {prefix:.bold} {wide_msg}")
            .expect("static template");
        let width = targets.iter().map(|t| t.len()).max().unwrap_or(8);
        let bars = targets
            .iter()
            .map(|t| {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(style.clone());
                bar.set_prefix(format!("{t:width$}"));
                bar.set_message("waiting");
                bar.enable_steady_tick(Duration::from_millis(120));
                (t.clone(), bar)
            })
            .collect();
        ProgressReporter {
            multi,
            bars: Mutex::new(bars),
        }
    }
}

impl Reporter for ProgressReporter {
    fn event(&self, e: &Event) {
        let bars = self.bars.lock().expect("progress lock");
        let Some(bar) = bars.get(&e.target) else {
            return;
        };
        let batch = e.batch.map(|b| format!("batch {b} · ")).unwrap_or_default();
        let message = match e.state {
            StepState::Started => format!("{batch}{}…", e.phase),
            StepState::Succeeded => format!("{batch}{} ✓", e.phase),
            StepState::Skipped => format!("{batch}{} skipped", e.phase),
            StepState::Failed => format!(
                "{batch}{} FAILED: {}",
                e.phase,
                e.message.as_deref().unwrap_or("")
            ),
        };
        bar.set_message(message);
    }

    fn finish(&self, _report: &RolloutReport) {
        for bar in self.bars.lock().expect("progress lock").values() {
            bar.finish();
        }
        let _ = self.multi.clear();
    }
}
