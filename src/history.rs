//! Past rollouts, for `roller history`: one record per run that reached the executor, appended
//! when it ends (success or not) to a file beside the rollout state on the lock host, so that
//! any controller reads the same history, not only the laptop that ran it.
//!
//! The file is one JSON record per line, `<balancer.state_dir>/<app>.history.jsonl`, cut to
//! the newest [`KEEP`] records at every append, written by the controller holding the deploy
//! lock. Whoever can write that file must not be able to mislead roller or its reader: each
//! line is parsed strictly and checked by the rules roller writes it by, and a line that fails
//! is left out and reported with its line number and why, never shown as a rollout.

use serde::{Deserialize, Serialize};

use crate::inventory::Strategy;
use crate::journal::is_id;
use crate::plan::is_release;
use crate::report::{HostOutcome, Outcome};

/// Records kept: the newest 100 rollouts (about 100 KiB for a fleet of 20 hosts).
pub const KEEP: usize = 100;

/// What one run did, as `roller history` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// The rollout's id (32 hex digits): a resume or recover shares its rollout's id.
    pub id: String,
    /// `rollout`, `resume`, `recover`, `switch-back` or `rollback`.
    pub command: String,
    /// `user@machine` of the controller.
    pub who: String,
    /// Unix seconds, the controller's clock.
    pub started: u64,
    pub ended: u64,
    pub release: String,
    pub strategy: Strategy,
    /// `--batch` as given (`"1"`, `"25%"`).
    pub batch: String,
    /// The number of batches the plan had.
    pub batches: usize,
    pub result: Outcome,
    pub duration_ms: u64,
    pub hosts: Vec<HostRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRecord {
    pub name: String,
    pub outcome: HostOutcome,
    /// The release `current` pointed to at the end, as last seen.
    pub release: Option<String>,
}

const COMMANDS: [&str; 5] = ["rollout", "resume", "recover", "switch-back", "rollback"];

impl Record {
    /// What is wrong with a record read back, by the rules roller writes it by.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let shown = |s: &str| format!("{:?}", s.chars().take(80).collect::<String>());
        if !is_id(&self.id) {
            problems.push(format!("id {} is not 32 hex digits", shown(&self.id)));
        }
        if !COMMANDS.contains(&self.command.as_str()) {
            problems.push(format!("command {} is not roller's", shown(&self.command)));
        }
        if self.who.is_empty() || self.who.len() > 256 || self.who.chars().any(char::is_control) {
            problems.push(format!("who {} is not a user@machine", shown(&self.who)));
        }
        // A switch-back names no release of its own.
        if !is_release(&self.release) && self.release != "switch-back" {
            problems.push(format!(
                "release {} breaks the release rules",
                shown(&self.release)
            ));
        }
        if self.batch.parse::<crate::plan::BatchSize>().is_err() {
            problems.push(format!("batch {} is not a batch size", shown(&self.batch)));
        }
        if self.ended < self.started {
            problems.push("ended before it started".into());
        }
        for h in &self.hosts {
            if !is_host_name(&h.name) {
                problems.push(format!("host {} is not a host name", shown(&h.name)));
            }
            if let Some(r) = &h.release
                && !is_release(r)
            {
                problems.push(format!(
                    "{}'s release {} breaks the release rules",
                    shown(&h.name),
                    shown(r)
                ));
            }
        }
        problems
    }

    /// One JSON line, as appended to the history file.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("a record serializes");
        line.push('\n');
        line
    }
}

/// Inventory host names and discovered ones: words of letters, digits, `.`, `-`, `_`.
fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
}

/// A line of the history file that is not a record roller wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejected {
    /// 1-based, in the file's order (oldest first).
    pub line: usize,
    pub reason: String,
}

/// The history file's records, newest first, and the lines that were left out.
pub fn parse(text: &str) -> (Vec<Record>, Vec<Rejected>) {
    let mut records = Vec::new();
    let mut rejected = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let reason = match serde_json::from_str::<Record>(line) {
            Ok(record) => {
                let problems = record.problems();
                if problems.is_empty() {
                    records.push(record);
                    continue;
                }
                problems.join("; ")
            }
            Err(e) => format!("not a record: {e}"),
        };
        rejected.push(Rejected {
            line: i + 1,
            reason,
        });
    }
    records.reverse();
    (records, rejected)
}

/// Where the history is kept on the lock host.
pub fn file(state_dir: &str, app: &str) -> String {
    format!("{state_dir}/{app}.history.jsonl")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, release: &str) -> Record {
        Record {
            id: id.into(),
            command: "rollout".into(),
            who: "deploy@ci-7".into(),
            started: 100,
            ended: 160,
            release: release.into(),
            strategy: Strategy::Rolling,
            batch: "1".into(),
            batches: 2,
            result: Outcome::Succeeded,
            duration_ms: 60_000,
            hosts: vec![HostRecord {
                name: "web-1".into(),
                outcome: HostOutcome::Updated,
                release: Some(release.into()),
            }],
        }
    }

    #[test]
    fn records_read_back_newest_first() {
        let a = record(&"a".repeat(32), "v1");
        let b = record(&"b".repeat(32), "v2");
        let text = a.to_line() + &b.to_line();
        let (records, rejected) = parse(&text);
        assert_eq!(records, [b, a]);
        assert!(rejected.is_empty());
    }

    #[test]
    fn a_tampered_line_is_left_out_and_named_never_shown() {
        let good = record(&"a".repeat(32), "v1");
        let mut bad_release = record(&"b".repeat(32), "v2");
        bad_release.release = "$(rm -rf /)".into();
        let mut bad_who = record(&"c".repeat(32), "v3");
        bad_who.who = "eve\u{1b}[2J".into();
        let extra = good.to_line().replacen('{', "{\"extra\":1,", 1);
        let text = [
            good.to_line(),
            "not json\n".into(),
            bad_release.to_line(),
            bad_who.to_line(),
            extra,
            good.to_line().replace("\"succeeded\"", "\"won\""),
        ]
        .concat();
        let (records, rejected) = parse(&text);
        assert_eq!(records, [good]);
        let lines: Vec<usize> = rejected.iter().map(|r| r.line).collect();
        assert_eq!(lines, [2, 3, 4, 5, 6]);
        assert!(rejected[1].reason.contains("release"), "{:?}", rejected[1]);
        assert!(rejected[2].reason.contains("who"), "{:?}", rejected[2]);
        assert!(
            rejected[3].reason.contains("unknown field"),
            "{:?}",
            rejected[3]
        );
    }
}
