//! How long a plan can take if every wait runs to its bound, added up from the plan itself and
//! the executor's deadlines, so that `roller plan` states the figure a release window needs
//! and it cannot drift from what the executor enforces.

use std::time::Duration;

use super::{Action, Phase, Plan};
use crate::executor::{COMMAND_DEADLINE, PROBE_DEADLINE, STAGE_PARALLELISM, upload_deadline};
use crate::remote::nginx::CONFIRM_WAIT_SECS;

/// The kinds of wait a rollout bounds, in the order the summary lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Wait {
    Upload,
    CapacityCheck,
    PoolChange,
    Drain,
    HealthCheck,
    Hook,
    Hold,
}

impl Wait {
    fn words(self, n: usize) -> String {
        let (one, many) = match self {
            Wait::Upload => ("upload round", "upload rounds"),
            Wait::CapacityCheck => ("capacity check", "capacity checks"),
            Wait::PoolChange => ("pool change", "pool changes"),
            Wait::Drain => ("drain", "drains"),
            Wait::HealthCheck => ("health check", "health checks"),
            Wait::Hook => ("hook", "hooks"),
            Wait::Hold => ("canary hold", "canary holds"),
        };
        format!("{n} {}", if n == 1 { one } else { many })
    }
}

/// Phases run one after another and the steps of a phase at once, so a phase takes its
/// slowest step and the plan the sum of its phases.
#[derive(Debug, Default)]
pub struct WorstCase {
    /// Per kind of wait: how many phases wait that way, and their bounds added up.
    pub waits: Vec<(Wait, usize, Duration)>,
    /// Phases that run a command and wait for nothing else (switch, restart, prune), each
    /// bounded by [`COMMAND_DEADLINE`].
    pub commands: usize,
    /// A paused canary waits for `roller promote` or `roller abort`, without a bound.
    pub awaits_decision: bool,
}

impl WorstCase {
    /// The run going forward: staging, every batch's phases, and the housekeeping after.
    /// Rollbacks are left out: they replace the phases a failed batch had left.
    pub fn of(plan: &Plan) -> WorstCase {
        let mut worst = WorstCase::default();
        if let Some(artifact) = &plan.artifact
            && !plan.stage.steps.is_empty()
        {
            let rounds = plan.stage.steps.len().div_ceil(STAGE_PARALLELISM);
            worst.add(
                Wait::Upload,
                rounds,
                upload_deadline(artifact.bytes) * rounds as u32,
            );
        }
        for batch in &plan.batches {
            for phase in &batch.phases {
                worst.phase(phase);
            }
        }
        if !plan.finish.steps.is_empty() {
            worst.commands += 1;
        }
        worst
    }

    fn phase(&mut self, phase: &Phase) {
        let Some(first) = phase.steps.first() else {
            return;
        };
        let bound = |action: &Action| -> Option<Duration> {
            Some(match action {
                Action::Drain { timeout, .. } => *timeout,
                Action::HealthCheck(spec) => spec.timeout,
                Action::Hook { timeout, .. } => *timeout,
                Action::Observe { hold, .. } => *hold,
                Action::SetPool { .. } => Duration::from_secs(CONFIRM_WAIT_SECS.into()),
                Action::CapacityCheck { .. } => PROBE_DEADLINE,
                _ => return None,
            })
        };
        let kind = match &first.action {
            Action::Drain { .. } => Wait::Drain,
            Action::HealthCheck(_) => Wait::HealthCheck,
            Action::Hook { .. } => Wait::Hook,
            Action::Observe { .. } => Wait::Hold,
            Action::SetPool { .. } => Wait::PoolChange,
            Action::CapacityCheck { .. } => Wait::CapacityCheck,
            Action::AwaitDecision { .. } => {
                self.awaits_decision = true;
                return;
            }
            _ => {
                self.commands += 1;
                return;
            }
        };
        let longest = phase
            .steps
            .iter()
            .filter_map(|s| bound(&s.action))
            .max()
            .unwrap_or_default();
        self.add(kind, 1, longest);
    }

    fn add(&mut self, kind: Wait, count: usize, total: Duration) {
        match self.waits.iter_mut().find(|(k, _, _)| *k == kind) {
            Some((_, n, sum)) => {
                *n += count;
                *sum += total;
            }
            None => {
                self.waits.push((kind, count, total));
                self.waits.sort_by_key(|(k, _, _)| *k);
            }
        }
    }

    /// Every wait at its bound.
    pub fn waiting(&self) -> Duration {
        self.waits.iter().map(|(_, _, d)| *d).sum()
    }

    /// Every wait and every command at its bound.
    pub fn total(&self) -> Duration {
        self.waiting() + COMMAND_DEADLINE * self.commands as u32
    }

    /// The figure in words, with what it is made of.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .waits
            .iter()
            .map(|(kind, n, total)| format!("{} for {}", short(*total), kind.words(*n)))
            .collect();
        let mut text = format!(
            "{} if every wait runs to its bound ({})",
            short(self.waiting()),
            if parts.is_empty() {
                "nothing waits".to_string()
            } else {
                parts.join(", ")
            }
        );
        if self.commands > 0 {
            text.push_str(&format!(
                "; the {} that run a command (switch, restart, prune...) come on top, each bounded at {}: {} at most in all",
                match self.commands {
                    1 => "1 phase".to_string(),
                    n => format!("{n} phases"),
                },
                short(COMMAND_DEADLINE),
                short(self.total())
            ));
        }
        if self.awaits_decision {
            text.push_str(", plus the wait for `roller promote` or `roller abort`");
        }
        text
    }
}

/// A duration as people write it: `1h 2m 5s`, whole seconds.
pub fn short(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}
