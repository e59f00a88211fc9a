//! `roller plan` as a person reads it before a release: the batches and their hosts, what
//! happens to each batch in words, how many hosts keep serving meanwhile, who is skipped or
//! taken first, what happens on failure, and how long it can take. One screen for ten batches:
//! batches that happen alike are told once, and long runs of them are cut to their ends with a
//! count. The exact commands are `--commands`; the plan as data is `--output json`.

use std::io::{self, Write};
use std::time::Duration;

use super::worst_case::{WorstCase, short};
use super::{Action, Batch, HostReason, Phase, PhaseName, Plan};
use crate::executor::FailurePolicy;
use crate::inventory::Strategy;
use crate::journal::RunKind;

/// Batches listed one per line in a run of batches that happen alike; longer runs show their
/// first and last few and a count.
const ROWS: usize = 10;
/// Hosts named on a batch's line, or among those skipped or taken first.
const NAMES: usize = 8;

/// The summary of `plan` with what the rollout is told besides it.
pub struct Summary<'a> {
    pub plan: &'a Plan,
    pub on_failure: FailurePolicy,
    pub max_failed_hosts: usize,
}

impl Summary<'_> {
    pub fn write(&self, to: &mut dyn Write) -> io::Result<()> {
        let plan = self.plan;
        self.head(to)?;
        if plan.batches.is_empty() {
            writeln!(to, "\nNothing to do: no batch.")?;
        }
        let groups = self.groups();
        for group in &groups {
            self.group(to, group)?;
        }
        if !plan.finish.steps.is_empty() && !plan.batches.is_empty() {
            writeln!(to, "Then old releases are pruned on every host.")?;
        }
        writeln!(to)?;
        self.failure(to)?;
        let reloads: usize = plan
            .batches
            .iter()
            .flat_map(|b| &b.phases)
            .filter(|p| changes_pool(p))
            .count();
        writeln!(to, "Worst case: {}.", WorstCase::of(plan).describe())?;
        writeln!(
            to,
            "nginx reloads: {reloads} on each load balancer.\nThe exact commands and upstream files: --commands. The plan as data: --output json."
        )
    }

    fn head(&self, to: &mut dyn Write) -> io::Result<()> {
        let plan = self.plan;
        let sizes: Vec<usize> = plan.batches.iter().map(|b| b.hosts.len()).collect();
        let (min, max) = (
            sizes.iter().min().copied().unwrap_or(0),
            sizes.iter().max().copied().unwrap_or(0),
        );
        let of = if min == max {
            format!("of {}", hosts(min))
        } else {
            format!("of {min} to {max} hosts")
        };
        let kind = match plan.kind {
            RunKind::Rollout => "release",
            RunKind::Rollback => "rollback to release",
        };
        writeln!(
            to,
            "Plan: {} {kind} {}, {}, {} in {} {of}, behind {} ({})",
            plan.app,
            plan.release,
            strategy(plan.strategy),
            hosts(plan.hosts.len()),
            count(plan.batches.len(), "batch", "batches"),
            count(plan.balancers.len(), "load balancer", "load balancers"),
            plan.balancers.join(", ")
        )?;
        match &plan.artifact {
            Some(a) => writeln!(
                to,
                "Artifact: {} ({} bytes, sha256 {})",
                a.path.display(),
                a.bytes,
                a.sha256
            )?,
            None if plan.kind == RunKind::Rollback => writeln!(
                to,
                "Artifact: none: a rollback goes back to a release already on the hosts"
            )?,
            None => writeln!(to, "Artifact: not given: staging is left out of this plan")?,
        }
        write!(
            to,
            "First, pre-flight checks every host and load balancer over SSH; nothing changes unless all pass."
        )?;
        if plan.artifact.is_some() {
            write!(
                to,
                " Then the jar goes to every host that lacks it, {} at a time, checksum-verified.",
                crate::executor::STAGE_PARALLELISM
            )?;
        }
        writeln!(to)?;
        if plan.skipped.is_empty() && plan.first.is_empty() && plan.strategy == Strategy::BlueGreen
        {
            return writeln!(
                to,
                "Skipped: none. (A rollout skips every host when all of them already serve the release from the live slot.)"
            );
        }
        if plan.skipped.is_empty() && plan.first.is_empty() {
            return writeln!(
                to,
                "Skipped: none. Taken first: none. (A rollout decides both from pre-flight: hosts already on the release and healthy are skipped; hosts an unfinished rollout left partway go first, then unhealthy hosts.)"
            );
        }
        writeln!(to, "Skipped: {}", reasons(&plan.skipped))?;
        writeln!(to, "Taken first: {}", reasons(&plan.first))
    }

    /// Consecutive batches that happen alike, with as many hosts staying in the pool.
    fn groups(&self) -> Vec<Group<'_>> {
        let mut groups: Vec<Group<'_>> = Vec::new();
        for batch in &self.plan.batches {
            let words = self.words(batch);
            let staying = self.staying(batch);
            let size = batch.hosts.len();
            match groups.last_mut() {
                Some(g) if g.words == words && g.staying == staying && g.size == size => {
                    g.batches.push(batch)
                }
                _ => groups.push(Group {
                    batches: vec![batch],
                    words,
                    staying,
                    size,
                }),
            }
        }
        groups
    }

    fn group(&self, to: &mut dyn Write, group: &Group<'_>) -> io::Result<()> {
        let total = self.plan.hosts.len();
        let keep = if group.staying == total {
            "every host stays in the pool".to_string()
        } else {
            format!("{} of {total} hosts stay in the pool", group.staying)
        };
        let first = group.batches[0];
        if group.batches.len() == 1 {
            writeln!(
                to,
                "\nBatch {}{}: {} ({keep})",
                first.number,
                self.label(first),
                batch_hosts(first)
            )?;
        } else {
            let last = group.batches[group.batches.len() - 1];
            writeln!(
                to,
                "\nBatches {} to {}, {} of {} each ({keep} during each):",
                first.number,
                last.number,
                group.batches.len(),
                hosts(group.size)
            )?;
            let shown = group.batches.len() <= ROWS;
            for (i, batch) in group.batches.iter().enumerate() {
                let from_end = group.batches.len() - i;
                if shown || i < 3 || from_end <= 2 {
                    writeln!(to, "  {}: {}", batch.number, batch_hosts(batch))?;
                } else if i == 3 {
                    writeln!(to, "  ... {} more batches ...", group.batches.len() - 5)?;
                }
            }
        }
        writeln!(to, "  {}", group.words)
    }

    fn label(&self, batch: &Batch) -> &'static str {
        if self.plan.strategy == Strategy::Canary && batch.number == 1 {
            " (the canary)"
        } else {
            ""
        }
    }

    /// Hosts that keep serving while the batch is out: all but the batch and the hosts held
    /// out with it. Blue-green takes no host out: traffic moves between slots.
    fn staying(&self, batch: &Batch) -> usize {
        let leaves = batch.taken_out
            || batch
                .phases
                .iter()
                .any(|p| p.name == PhaseName::RemoveFromPool);
        let total = self.plan.hosts.len();
        if leaves {
            total.saturating_sub(batch.hosts.len() + batch.held_out.len())
        } else {
            total
        }
    }

    /// What happens to the batch, phase by phase, in words that do not name the batch, so
    /// that batches going the same way read the same.
    fn words(&self, batch: &Batch) -> String {
        let mut parts: Vec<String> = Vec::new();
        let mut checked: Option<usize> = None;
        let mut next_checked = false;
        // A canary's weights, each held and judged: told as one step.
        let mut ladder: Vec<(Duration, u32)> = Vec::new();
        let mut phases = batch.phases.iter().peekable();
        while let Some(phase) = phases.next() {
            let Some(action) = phase.steps.first().map(|s| &s.action) else {
                continue;
            };
            let observed = |next: Option<&&Phase>| {
                next.and_then(|p| p.steps.first())
                    .and_then(|s| match &s.action {
                        Action::Observe { hold, weight, .. } => Some((*hold, *weight)),
                        _ => None,
                    })
            };
            let part = match (phase.name, action) {
                (_, Action::CapacityCheck { returning, min_healthy, .. }) => {
                    let leaves_next = phases
                        .peek()
                        .is_some_and(|p| p.name == PhaseName::RemoveFromPool);
                    match (returning.is_empty(), leaves_next) {
                        // Told with the pool change it guards.
                        (true, true) => checked = Some(*min_healthy),
                        // A hook runs between the check and the change.
                        (true, false) => parts.push(format!(
                            "checks that at least {min_healthy} of the hosts that stay answer healthy"
                        )),
                        (false, _) => next_checked = true,
                    }
                    continue;
                }
                (_, Action::SetPool { .. }) if observed(phases.peek()).is_some() => {
                    ladder.push(observed(phases.next().as_ref()).expect("peeked"));
                    continue;
                }
                (PhaseName::RemoveFromPool, _) => match checked.take() {
                    Some(n) => format!(
                        "leaves the pool once at least {n} of the hosts that stay answer healthy"
                    ),
                    None => "leaves the pool".into(),
                },
                (PhaseName::ReturnToPool, _) if next_checked => "returns to the pool in the reload that takes the next batch out, once that batch's capacity check passed".into(),
                (PhaseName::ReturnToPool, _) => "returns to the pool".into(),
                (_, Action::SetPool { pool }) => format!(
                    "every load balancer sends all traffic to port {} in one reload",
                    pool.port.map_or_else(|| "app.port".to_string(), |p| p.to_string())
                ),
                (_, Action::Drain { timeout, .. }) => {
                    format!("drains (at most {})", short(*timeout))
                }
                (_, Action::Switch { release, .. }) => match started_slot(batch) {
                    Some(slot) => format!("points its {slot} slot at {release}"),
                    None => format!("switches to {release}"),
                },
                (_, Action::Restart { .. }) => "restarts".into(),
                (_, Action::StartSlot { .. }) => "starts it".into(),
                (_, Action::StopSlot { slot, .. }) => format!("stops its {} slot", slot.as_str()),
                (_, Action::HealthCheck(spec)) => format!(
                    "passes its health check (GET :{}{}, at most {})",
                    spec.port,
                    spec.path,
                    short(spec.timeout)
                ),
                (_, Action::KeepOld { .. }) => {
                    "the old slot keeps running for blue_green.keep_old, for `roller switch-back`"
                        .into()
                }
                (name, Action::Hook { timeout, .. }) => format!(
                    "runs the {} hook (at most {})",
                    name.as_str().replace('-', "_"),
                    short(*timeout)
                ),
                (_, Action::AwaitDecision { .. }) => {
                    "waits for `roller promote` or `roller abort`".into()
                }
                (_, Action::Observe { hold, weight, .. }) => format!(
                    "is held {} at {weight}% of its share, judged from the access log",
                    short(*hold)
                ),
                (name, _) => name.as_str().into(),
            };
            parts.extend(weights(&mut ladder));
            parts.push(part);
        }
        parts.extend(weights(&mut ladder));
        let mut words = String::new();
        if batch.taken_out {
            words.push_str("Left the pool with the batch before; ");
        }
        words.push_str(&sentence(&parts));
        let mut chars = words.chars();
        match chars.next() {
            Some(c) => format!("{}{}.", c.to_uppercase(), chars.as_str()),
            None => words,
        }
    }

    fn failure(&self, to: &mut dyn Write) -> io::Result<()> {
        let plan = self.plan;
        if plan.strategy == Strategy::BlueGreen {
            return writeln!(
                to,
                "On failure: if a new slot fails its health check, traffic never moves and the new slots stop (exit 4). After the switch, `roller switch-back` sends traffic back while the old slots run."
            );
        }
        let policy = match self.on_failure {
            FailurePolicy::RollbackBatch => format!(
                "the failed batch switches back to its previous release, restarts, passes its health check and returns to the pool; earlier batches keep {} (exit 4)",
                plan.release
            ),
            FailurePolicy::RollbackAll => "the failed batch goes back to its previous release, then every earlier batch, one at a time and drained first (exit 4)".into(),
            FailurePolicy::Halt => "the failed batch stays out of the pool as it is, for inspection; `roller resume` or `roller recover` finishes (exit 6)".into(),
        };
        writeln!(
            to,
            "On failure (--on-failure {}): {policy}.",
            self.on_failure.as_str()
        )?;
        if plan.strategy == Strategy::Canary {
            writeln!(
                to,
                "A canary judged worse than the other hosts leaves the pool, drains and goes back to its previous release (exit 4)."
            )?;
        }
        match self.max_failed_hosts {
            0 => writeln!(
                to,
                "Any host failing fails its batch (--max-failed-hosts 0)."
            )?,
            n => writeln!(
                to,
                "Up to {} may fail, each rolled back alone, before a batch fails (--max-failed-hosts {n}).",
                hosts(n)
            )?,
        }
        writeln!(
            to,
            "On Ctrl-C or SIGTERM: the step in progress finishes, then the batch is rolled back (or completed, if only its return was left) and roller exits 130."
        )
    }
}

struct Group<'a> {
    batches: Vec<&'a Batch>,
    words: String,
    staying: usize,
    size: usize,
}

/// The blue-green slot a batch starts, if it starts one.
fn started_slot(batch: &Batch) -> Option<&'static str> {
    batch
        .phases
        .iter()
        .flat_map(|p| p.steps.first())
        .find_map(|s| match &s.action {
            Action::StartSlot { slot, .. } => Some(slot.as_str()),
            _ => None,
        })
}

fn changes_pool(phase: &Phase) -> bool {
    phase
        .steps
        .iter()
        .any(|s| matches!(s.action, Action::SetPool { .. }))
}

fn strategy(s: Strategy) -> &'static str {
    match s {
        Strategy::Rolling => "rolling",
        Strategy::BlueGreen => "blue-green",
        Strategy::Canary => "canary",
    }
}

fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn hosts(n: usize) -> String {
    count(n, "host", "hosts")
}

/// The first names, then how many more.
fn names<'a>(all: impl ExactSizeIterator<Item = &'a str>) -> String {
    let total = all.len();
    let shown: Vec<&str> = all.take(NAMES).collect();
    match total.saturating_sub(NAMES) {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

fn batch_hosts(batch: &Batch) -> String {
    let mut text = names(batch.hosts.iter().map(String::as_str));
    if !batch.held_out.is_empty() {
        text.push_str(&format!(
            "; held out with it, unhealthy: {}",
            names(batch.held_out.iter().map(String::as_str))
        ));
    }
    text
}

fn reasons(hosts: &[HostReason]) -> String {
    if hosts.is_empty() {
        return "none".into();
    }
    let text: Vec<String> = hosts
        .iter()
        .take(NAMES)
        .map(|h| format!("{} ({})", h.host, h.reason))
        .collect();
    match hosts.len().saturating_sub(NAMES) {
        0 => text.join(", "),
        more => format!("{} and {more} more", text.join(", ")),
    }
}

/// A canary's ladder in words, emptied: `returns at 10%, 50% and 100% of its share, ...`.
fn weights(ladder: &mut Vec<(Duration, u32)>) -> Option<String> {
    let (hold, _) = *ladder.first()?;
    let shares: Vec<String> = ladder.drain(..).map(|(_, w)| format!("{w}%")).collect();
    Some(format!(
        "returns to the pool at {} of its share, each held {} and judged from the access log against the other hosts",
        sentence(&shares),
        short(hold)
    ))
}

/// `a, b and c`.
fn sentence(parts: &[String]) -> String {
    match parts {
        [] => String::new(),
        [one] => one.clone(),
        [one, two] => format!("{one} and {two}"),
        [init @ .., last] => format!("{}, and {last}", init.join(", ")),
    }
}
