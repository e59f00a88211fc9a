//! A rollout computed in full before it starts: batches of phases of steps, each step an exact
//! remote command, or the pool a pool change installs (its file rendered when it is applied,
//! so that the plan grows with hosts plus batches). `roller plan` prints this object and
//! `roller rollout` executes it, so what an operator reviews is what runs.
//!
//! The types are here; each strategy has its own builder (`rolling`, with `canary` for its
//! first batch, and `blue_green`); `summary` tells a plan in words, `worst_case` adds up its
//! bounds, and `render` lists its commands. A new strategy is a new builder that fills in a
//! [`Plan`] from [`Plan::base`], dispatched from [`Plan::build`].

mod artifact;
mod blue_green;
mod canary;
mod render;
mod rolling;
mod sudo;
mod summary;
#[cfg(test)]
mod tests;
mod worst_case;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;

pub use artifact::{Artifact, is_release, validate_release};
pub use rolling::BatchSize;
pub use sudo::Sudo;
pub use summary::Summary;
pub use worst_case::WorstCase;

use crate::balancer::{Balancer, Pool};
use crate::error::Result;
use crate::health::HealthSpec;
use crate::inventory::{Host, Inventory, Slot, Strategy, human};
use crate::journal::RunKind;
use crate::remote;

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// [`crate::report::SCHEMA_VERSION`], the version of every JSON document roller prints,
    /// first so that a reader can refuse a shape it does not know.
    pub schema_version: u32,
    pub app: String,
    pub release: String,
    /// A rollout ships `release`; a rollback returns to it, already on every host, with no
    /// stage.
    pub kind: RunKind,
    pub strategy: Strategy,
    /// Blue-green: the slot traffic moves away from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_slot: Option<Slot>,
    pub artifact: Option<Artifact>,
    pub hosts: Vec<Host>,
    /// `health.command`, for hosts whose sshd refuses port forwarding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_command: Option<String>,
    pub balancers: Vec<String>,
    /// Where the pool lives on each load balancer, and how to apply it by hand.
    pub upstream_file: String,
    pub reload: String,
    /// The sides whose commands run as root through sudo.
    #[serde(skip_serializing_if = "Sudo::is_off")]
    pub sudo: Sudo,
    /// What every pool change runs on each load balancer, with the upstream file rendered from
    /// the step's pool on stdin. Held once: the file is rendered when the change is applied, so
    /// the plan grows with hosts plus batches, not with their product.
    pub set_pool_command: String,
    /// Run on every host and load balancer before anything changes.
    pub preflight: Phase,
    /// Hosts left out of every batch, and why (already on the release and healthy).
    pub skipped: Vec<HostReason>,
    /// Hosts put in the first batches ahead of the inventory's order, and why (left partway by
    /// an unfinished rollout, unhealthy at pre-flight).
    pub first: Vec<HostReason>,
    /// The release each host in a batch is switched to.
    pub targets: BTreeMap<String, String>,
    /// Uploads to every host in parallel, before the first batch leaves the pool.
    pub stage: Phase,
    pub batches: Vec<Batch>,
    /// Housekeeping once every batch is done.
    pub finish: Phase,
}

/// A host singled out by the plan, and why.
#[derive(Debug, Clone, Serialize)]
pub struct HostReason {
    pub host: String,
    pub reason: String,
    /// Left out by `--hosts` / `--tag`: it keeps the release it has, whatever that is.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub not_selected: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Batch {
    pub number: usize,
    pub hosts: Vec<String>,
    /// Hosts outside this batch that stay out of the pool while it runs: unhealthy at
    /// pre-flight and waiting for a later batch to fix them.
    pub held_out: Vec<String>,
    pub phases: Vec<Phase>,
    /// Run instead of the remaining phases when one of them fails. Steps of a host that never
    /// reached `switch` are skipped: it is still on its previous release.
    pub rollback: Vec<Phase>,
    /// Takes this batch, once completed, back to its previous release (`--on-failure
    /// rollback-all`), with the same care as going forward.
    pub undo: Vec<Phase>,
    /// This batch left the pool in the previous batch's return, one reload for both, so its
    /// phases start with the drain.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub taken_out: bool,
    /// When this batch hands over to the next (its last phases check the next batch's capacity
    /// and swap the two in one pool change): the return of this batch alone, for when the next
    /// batch may not leave or the rollout is interrupted before the swap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub return_alone: Option<Phase>,
}

/// Steps that run concurrently; the next phase starts when all of them succeeded.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: PhaseName,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PhaseName {
    Preflight,
    Stage,
    CapacityCheck,
    RemoveFromPool,
    Drain,
    Switch,
    Restart,
    HealthCheck,
    ReturnToPool,
    SwitchBack,
    Prune,
    /// Blue-green: start the new release in the idle slot.
    StartSlot,
    /// Blue-green: every load balancer to the new slots, one reload each.
    SwitchTraffic,
    /// Blue-green: record the live slot and stop the old one once `keep_old` has passed.
    KeepOld,
    /// Blue-green: stop a slot that will not get traffic.
    StopSlot,
    /// Canary: the canary back in the pool at a share of its traffic.
    SetWeight,
    /// Canary: hold, then judge the canary from the access log.
    Observe,
    /// Canary with `--pause`: wait for `roller promote` or `roller abort`.
    AwaitDecision,
    /// `hooks.before_drain` on each host of the batch, before the pool change takes it out.
    BeforeDrain,
    /// `hooks.after_healthy` on each host of the batch, once healthy; failing fails the batch.
    AfterHealthy,
}

impl PhaseName {
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseName::Preflight => "preflight",
            PhaseName::Stage => "stage",
            PhaseName::CapacityCheck => "capacity-check",
            PhaseName::RemoveFromPool => "remove-from-pool",
            PhaseName::Drain => "drain",
            PhaseName::Switch => "switch",
            PhaseName::Restart => "restart",
            PhaseName::HealthCheck => "health-check",
            PhaseName::ReturnToPool => "return-to-pool",
            PhaseName::SwitchBack => "switch-back",
            PhaseName::Prune => "prune",
            PhaseName::StartSlot => "start-slot",
            PhaseName::SwitchTraffic => "switch-traffic",
            PhaseName::KeepOld => "keep-old",
            PhaseName::StopSlot => "stop-slot",
            PhaseName::SetWeight => "set-weight",
            PhaseName::Observe => "observe",
            PhaseName::AwaitDecision => "await-decision",
            PhaseName::BeforeDrain => "before-drain",
            PhaseName::AfterHealthy => "after-healthy",
        }
    }
}

impl std::fmt::Display for PhaseName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One action on one machine: an app host (by inventory name) or a load balancer (by address).
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub target: String,
    pub role: Role,
    pub action: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    App,
    Balancer,
    /// A check across hosts, run by the controller over their sessions.
    Fleet,
}

/// The fleet-wide capacity guard's target name in events and reports.
pub const FLEET: &str = "fleet";

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Action {
    /// Pre-flight's look at a host or a load balancer: must exit 0, and its output is what
    /// pre-flight reads (a host's facts as `key=value` lines, a load balancer's upstream file).
    Check { command: String },
    /// Points `current`, or a blue-green slot's link, at `release`.
    Switch { release: String, command: String },
    /// Points `current` back at the release the last switch replaced, and prints it.
    SwitchBack { command: String },
    /// `app.restart`: the service starts again on the release `current` points at.
    Restart { command: String },
    /// Blue-green: starts `slot` on its own port.
    StartSlot { slot: Slot, command: String },
    /// Blue-green: stops `slot`, which will not get traffic.
    StopSlot { slot: Slot, command: String },
    /// Blue-green: records the live slot and stops the old one once `keep_old` has passed.
    KeepOld { command: String },
    /// A host-side hook from `[hooks]`, the operator's command as written, on the host as the
    /// SSH user; it must exit 0 within `timeout`.
    Hook {
        command: String,
        #[serde(with = "human")]
        timeout: Duration,
    },
    /// Removes old releases and prints those it removed.
    Prune { command: String },
    /// `check` prints `present` when the host already holds the jar; otherwise the jar is
    /// streamed to `upload` on stdin.
    Upload { check: String, upload: String },
    /// Installs `pool`: the load balancer's configuration rendered from it goes to the plan's
    /// `set_pool_command` on stdin.
    SetPool { pool: Pool },
    /// Polls `command` until it has printed 0 (connections open to the batch) for `quiet`
    /// without a break, for at most `timeout`.
    Drain {
        command: String,
        #[serde(with = "human")]
        quiet: Duration,
        #[serde(with = "human")]
        timeout: Duration,
    },
    /// Polls `GET path` on the host, made from the host itself through the SSH connection.
    HealthCheck(HealthSpec),
    /// Reads the access log's size, holds, then judges the canary servers from the lines
    /// written meanwhile.
    Observe {
        access_log: String,
        #[serde(with = "human")]
        hold: Duration,
        /// `address:port` as the log names them.
        canary: Vec<String>,
        /// The canary's share of its fair traffic during this hold, in percent.
        weight: u32,
        judgement: Judgement,
        /// Prints the access log's size before the hold.
        measure: String,
        /// Prints what the log gained since the offset it reads on stdin, capped.
        read: String,
    },
    /// Polls `file` with `command` until it holds `promote <rollout>` or `abort <rollout>`.
    AwaitDecision { file: String, command: String },
    /// Probes every host of the plan but `leaving` once; fails when fewer than `min_healthy`
    /// answer healthy.
    CapacityCheck {
        /// What the pool change this check guards takes out: the batch and the hosts held out
        /// with it. Every other host stays, so the staying hosts are not listed batch by batch.
        leaving: Vec<String>,
        /// Hosts that stay, out of the pool now, that count as in it: the same pool change
        /// that takes the batch out returns them.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        returning: Vec<String>,
        min_healthy: usize,
        path: String,
        port: u16,
        expect_status: u16,
    },
}

/// How the canary is judged after each hold (see `canary.rs`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Judgement {
    pub max_error_rate_increase: f64,
    pub max_latency_ratio: f64,
    pub min_requests: u64,
}

/// A host as pre-flight found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct HostAtPreflight {
    /// The release the host serves traffic from: `current`, or the live blue-green slot's link.
    pub release: Option<String>,
    pub healthy: bool,
    pub in_pool: bool,
    /// The blue-green slots' releases, where they have one.
    #[serde(default)]
    pub blue: Option<String>,
    #[serde(default)]
    pub green: Option<String>,
}

pub struct PlanInput<'a> {
    pub inventory: &'a Inventory,
    pub balancer: &'a dyn Balancer,
    pub release: String,
    pub artifact: Option<Artifact>,
    pub batch: BatchSize,
    /// What pre-flight found; `None` for `roller plan`, which touches no host.
    pub observed: Option<&'a BTreeMap<String, HostAtPreflight>>,
    /// Hosts a previous run left partway: never skipped, and deployed first.
    pub unfinished: &'a BTreeSet<String>,
    /// Per-host releases for `recover`; `None` means `release` everywhere.
    pub targets: Option<&'a BTreeMap<String, String>>,
    /// `--hosts` / `--tag`: only these hosts change; the others stay in the pool, as they
    /// are, and count for capacity. `None` is every host.
    pub selected: Option<&'a BTreeSet<String>>,
    pub strategy: Strategy,
    /// The blue-green slot the load balancers send traffic to, as pre-flight read it; `None`
    /// offline, where blue is assumed.
    pub live_slot: Option<Slot>,
    /// Canary: wait for `roller promote` or `roller abort` after the last hold.
    pub pause: bool,
    /// Blue-green: traffic goes to `app.port`, a single-port deployment that this release
    /// adopts (see [`crate::executor::FleetAtPreflight::adopting`]).
    pub adopt: bool,
}

impl Plan {
    /// What every plan of this inventory shares; the builders fill in the rest.
    pub(super) fn base(
        inv: &Inventory,
        balancer: &dyn Balancer,
        release: String,
        strategy: Strategy,
    ) -> Plan {
        let empty = |name| Phase {
            name,
            steps: Vec::new(),
        };
        Plan {
            schema_version: crate::report::SCHEMA_VERSION,
            app: inv.app.name.clone(),
            release,
            kind: RunKind::Rollout,
            strategy,
            live_slot: None,
            artifact: None,
            hosts: inv.hosts.clone(),
            health_command: inv.health.command.clone(),
            balancers: inv.balancer.hosts.clone(),
            upstream_file: inv.balancer.upstream_file.clone(),
            reload: inv.balancer.reload.clone(),
            sudo: Sudo::of(inv),
            set_pool_command: balancer.apply_command(),
            preflight: Plan::preflight(inv, balancer),
            skipped: Vec::new(),
            first: Vec::new(),
            targets: BTreeMap::new(),
            stage: empty(PhaseName::Stage),
            batches: Vec::new(),
            finish: empty(PhaseName::Prune),
        }
    }

    /// The checks run before anything changes; the same phase heads every plan.
    pub fn preflight(inv: &Inventory, balancer: &dyn Balancer) -> Phase {
        let mut steps: Vec<Step> = inv
            .hosts
            .iter()
            .map(|h| Step {
                target: h.name.clone(),
                role: Role::App,
                action: Action::Check {
                    command: remote::preflight(&inv.app),
                },
            })
            .collect();
        steps.extend(inv.balancer.hosts.iter().map(|lb| Step {
            target: lb.clone(),
            role: Role::Balancer,
            action: Action::Check {
                command: balancer.test_command(),
            },
        }));
        Phase {
            name: PhaseName::Preflight,
            steps,
        }
    }

    pub fn build(input: PlanInput<'_>) -> Result<Plan> {
        match input.strategy {
            Strategy::BlueGreen => Plan::build_blue_green(input),
            Strategy::Rolling | Strategy::Canary => Plan::build_rolling(input),
        }
    }
}

/// One step per app host, each with its own action.
pub(super) fn app_steps<'h>(
    hosts: impl Iterator<Item = &'h Host>,
    action: &dyn Fn(&Host) -> Action,
) -> Vec<Step> {
    hosts
        .map(|h| Step {
            target: h.name.clone(),
            role: Role::App,
            action: action(h),
        })
        .collect()
}

/// Where `roller promote` and `roller abort` leave their word for a paused canary.
pub fn decision_file(inv: &Inventory) -> String {
    format!("{}/{}.decision", inv.balancer.state_dir, inv.app.name)
}

/// One step per load balancer that installs `pool`.
pub fn pool_steps(inv: &Inventory, pool: Pool) -> Vec<Step> {
    inv.balancer
        .hosts
        .iter()
        .map(|lb| Step {
            target: lb.clone(),
            role: Role::Balancer,
            action: Action::SetPool { pool: pool.clone() },
        })
        .collect()
}
