//! A rollout computed in full before it starts: batches of phases of steps, each step an exact
//! remote command. `roller plan` prints this object and `roller rollout` executes it, so what
//! an operator reviews is what runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::balancer::{Balancer, Pool};
use crate::error::{Error, Result};
use crate::health::HealthSpec;
use crate::inventory::{Host, Inventory, Slot, Strategy, human, is_word};
use crate::remote;

/// The jar to roll out, read once: its bytes are uploaded to every host from memory.
#[derive(Debug, Clone, Serialize)]
pub struct Artifact {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    #[serde(skip)]
    pub content: bytes::Bytes,
}

impl Artifact {
    /// Reads and checks the jar: a regular, non-empty file that is a zip archive, as every jar is.
    pub fn load(path: &Path) -> Result<Artifact> {
        let fail = |message: String| Error::Artifact {
            path: path.to_path_buf(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        if !meta.is_file() {
            return Err(fail("is not a regular file".into()));
        }
        let content = std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        if content.is_empty() {
            return Err(fail("is empty".into()));
        }
        if !content.starts_with(b"PK\x03\x04") {
            return Err(fail("is not a jar (no zip header)".into()));
        }
        let sha256 = hex::encode(Sha256::digest(&content));
        Ok(Artifact {
            path: path.to_path_buf(),
            sha256,
            bytes: content.len() as u64,
            content: content.into(),
        })
    }

    /// A release name that changes whenever the jar does: `<file stem>-<first 12 of sha256>`.
    pub fn default_release(&self) -> String {
        let stem: String = self
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '-'
                }
            })
            .take(40)
            .collect();
        let stem = stem.trim_start_matches('.');
        let stem = if stem.is_empty() { "release" } else { stem };
        format!("{stem}-{}", &self.sha256[..12])
    }
}

/// The release rules: a release becomes a directory name on every host, so 1 to 64 letters,
/// digits, `.`, `_` or `-`, not starting with `.`.
pub fn is_release(release: &str) -> bool {
    is_word(release) && !release.starts_with('.') && release.len() <= 64
}

/// Checks a release name given with `--release`: it becomes a directory name on every host.
pub fn validate_release(release: &str) -> Result<()> {
    if !is_release(release) {
        return Err(Error::Usage {
            flag: "--release".into(),
            message: format!(
                "{release:?} must be 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
            ),
        });
    }
    Ok(())
}

/// `--batch`: how many hosts leave the pool at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    Hosts(usize),
    Percent(u8),
}

impl std::str::FromStr for BatchSize {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a host count (2) or a percentage (25%)");
        if let Some(p) = s.strip_suffix('%') {
            let p: u8 = p.trim().parse().map_err(|_| bad())?;
            if p == 0 || p > 100 {
                return Err(format!("{s:?}: a percentage must be between 1% and 100%"));
            }
            Ok(BatchSize::Percent(p))
        } else {
            let n: usize = s.trim().parse().map_err(|_| bad())?;
            if n == 0 {
                return Err("a batch needs at least one host".into());
            }
            Ok(BatchSize::Hosts(n))
        }
    }
}

impl BatchSize {
    pub fn hosts_per_batch(self, total: usize) -> usize {
        match self {
            BatchSize::Hosts(n) => n.min(total),
            BatchSize::Percent(p) => (total * p as usize).div_ceil(100).max(1),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub app: String,
    pub release: String,
    pub strategy: Strategy,
    /// Blue-green: the slot traffic moves away from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_slot: Option<Slot>,
    pub artifact: Option<Artifact>,
    pub hosts: Vec<Host>,
    pub balancers: Vec<String>,
    /// Where the pool lives on each load balancer, and how to apply it by hand.
    pub upstream_file: String,
    pub reload: String,
    /// Run on every host and load balancer before anything changes.
    pub preflight: Phase,
    /// Hosts left out of every batch, and why (already on the release and healthy).
    pub skipped: Vec<Skipped>,
    /// The release each host in a batch is switched to.
    pub targets: BTreeMap<String, String>,
    /// Uploads to every host in parallel, before the first batch leaves the pool.
    pub stage: Phase,
    pub batches: Vec<Batch>,
    /// Housekeeping once every batch is done.
    pub finish: Phase,
}

#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub host: String,
    pub reason: String,
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
    /// Must exit 0. Output is kept for the report (pre-flight facts, pruned releases).
    Run { command: String },
    /// `check` prints `present` when the host already holds the jar; otherwise the jar is
    /// streamed to `upload` on stdin.
    Upload { check: String, upload: String },
    /// `content` goes to `command` on stdin; `pool` is what it encodes.
    SetPool {
        pool: Pool,
        content: String,
        command: String,
    },
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
    },
    /// Polls `file` until it holds `promote <rollout>` or `abort <rollout>`.
    AwaitDecision { file: String },
    /// Probes every host that stays in the pool once; fails when fewer than `min_healthy`
    /// answer healthy.
    CapacityCheck {
        staying: Vec<String>,
        /// Hosts among `staying` out of the pool now that count as in it: the same pool change
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
pub struct Observed {
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
    pub observed: Option<&'a BTreeMap<String, Observed>>,
    /// Hosts a previous run left partway: never skipped, and deployed first.
    pub unfinished: &'a BTreeSet<String>,
    /// Per-host releases for `recover`; `None` means `release` everywhere.
    pub targets: Option<&'a BTreeMap<String, String>>,
    pub strategy: Strategy,
    /// The blue-green slot the load balancers send traffic to, as pre-flight read it; `None`
    /// offline, where blue is assumed.
    pub live_slot: Option<Slot>,
    /// Canary: wait for `roller promote` or `roller abort` after the last hold.
    pub pause: bool,
    /// Blue-green: traffic goes to `app.port`, a single-port deployment that this release
    /// adopts (see [`crate::executor::Observation::adopting`]).
    pub adopt: bool,
}

impl Plan {
    /// What every plan of this inventory shares; the builders fill in the rest.
    fn base(inv: &Inventory, balancer: &dyn Balancer, release: String, strategy: Strategy) -> Plan {
        let empty = |name| Phase {
            name,
            steps: Vec::new(),
        };
        Plan {
            app: inv.app.name.clone(),
            release,
            strategy,
            live_slot: None,
            artifact: None,
            hosts: inv.hosts.clone(),
            balancers: inv.balancer.hosts.clone(),
            upstream_file: inv.balancer.upstream_file.clone(),
            reload: inv.balancer.reload.clone(),
            preflight: Plan::preflight(inv, balancer),
            skipped: Vec::new(),
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
                action: Action::Run {
                    command: remote::preflight(&inv.app),
                },
            })
            .collect();
        steps.extend(inv.balancer.hosts.iter().map(|lb| Step {
            target: lb.clone(),
            role: Role::Balancer,
            action: Action::Run {
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

    fn build_rolling(input: PlanInput<'_>) -> Result<Plan> {
        let PlanInput {
            inventory: inv,
            balancer,
            release,
            artifact,
            batch,
            observed,
            unfinished,
            targets,
            strategy,
            live_slot: _,
            pause,
            adopt: _,
        } = input;
        validate_release(&release)?;
        let total = inv.hosts.len();
        let per_batch = batch.hosts_per_batch(total);
        if per_batch >= total {
            return Err(Error::Usage {
                flag: "--batch".into(),
                message: format!(
                    "a batch of {per_batch} takes all {total} host(s) out of the pool at once, which drops traffic; use a smaller batch"
                ),
            });
        }
        let min_healthy = inv.balancer.min_healthy.hosts(total);
        if total - per_batch < min_healthy {
            return Err(Error::Usage {
                flag: "--batch".into(),
                message: format!(
                    "a batch of {per_batch} leaves {} host(s) in the pool, below balancer.min_healthy ({min_healthy})",
                    total - per_batch
                ),
            });
        }
        let app = &inv.app;
        let target_of = |h: &Host| -> String {
            targets
                .and_then(|t| t.get(&h.name).cloned())
                .unwrap_or_else(|| release.clone())
        };
        let seen = |h: &Host| observed.and_then(|o| o.get(&h.name));

        // Who needs work, in the order it gets it: hosts a previous run left partway, then
        // hosts that are unhealthy now (fixing them first restores capacity), then the rest.
        let mut skipped = Vec::new();
        let mut todo: Vec<&Host> = Vec::new();
        for h in &inv.hosts {
            match seen(h) {
                Some(o)
                    if o.healthy
                        && o.release.as_deref() == Some(target_of(h).as_str())
                        && !unfinished.contains(&h.name) =>
                {
                    skipped.push(Skipped {
                        host: h.name.clone(),
                        reason: format!("already runs {} and is healthy", target_of(h)),
                    })
                }
                _ => todo.push(h),
            }
        }
        let rank = |h: &Host| {
            if unfinished.contains(&h.name) {
                0
            } else if seen(h).is_some_and(|o| !o.healthy) {
                1
            } else {
                2
            }
        };
        todo.sort_by_key(|h| rank(h));
        let unhealthy: BTreeSet<String> = todo
            .iter()
            .filter(|h| seen(h).is_some_and(|o| !o.healthy))
            .map(|h| h.name.clone())
            .collect();

        let lb_step = |address: &String, action: Action| Step {
            target: address.clone(),
            role: Role::Balancer,
            action,
        };
        let set_pool =
            |down: &[String]| -> Vec<Step> { pool_steps(inv, balancer, Pool::with_down(down)) };
        let per_host = |hosts: &[&Host], action: &dyn Fn(&Host) -> Action| {
            app_steps(hosts.iter().copied(), action)
        };
        let health = |h: &Host| Action::HealthCheck(HealthSpec::wait(&h.address, app.port, inv));
        let restart = |_: &Host| Action::Run {
            command: app.restart.clone(),
        };
        let switch_back = |_: &Host| Action::Run {
            command: remote::switch_back(app),
        };
        let phase = |name, steps| Phase { name, steps };

        let stage = match &artifact {
            Some(a) => per_host(&todo, &|h| Action::Upload {
                check: remote::artifact_present(app, &target_of(h), &a.sha256),
                upload: remote::upload(app, &target_of(h), &a.sha256),
            }),
            None => Vec::new(),
        };

        let canary = match (strategy, &inv.canary) {
            (Strategy::Canary, Some(c)) => Some(c),
            (Strategy::Canary, None) => {
                return Err(Error::Usage {
                    flag: "--strategy".into(),
                    message: "canary needs a [canary] section in the inventory".into(),
                });
            }
            _ => None,
        };
        let canary_size = canary.map(|c| c.hosts.hosts(total).max(1));
        if let Some(n) = canary_size
            && n >= total
        {
            return Err(Error::Usage {
                flag: "canary.hosts".into(),
                message: format!(
                    "a canary of {n} host(s) out of {total} leaves no hosts to compare it with"
                ),
            });
        }
        // The canary is the first batch, whatever --batch says; the rest follow in --batch.
        let mut groups: Vec<&[&Host]> = Vec::new();
        let rest = match canary_size {
            Some(n) if !todo.is_empty() => {
                let n = n.min(todo.len());
                groups.push(&todo[..n]);
                &todo[n..]
            }
            _ => &todo[..],
        };
        groups.extend(rest.chunks(per_batch));
        let first_of_group: Vec<usize> = groups
            .iter()
            .scan(0, |start, g| {
                let s = *start;
                *start += g.len();
                Some(s)
            })
            .collect();
        // Per group: the hosts it takes out of the pool (itself and hosts held out for later
        // groups) and those that stay in.
        let outs: Vec<(Vec<String>, Vec<String>)> = groups
            .iter()
            .enumerate()
            .map(|(i, hosts)| {
                let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
                let later: BTreeSet<&String> = todo
                    .iter()
                    .skip(first_of_group[i] + hosts.len())
                    .map(|h| &h.name)
                    .collect();
                let held_out: Vec<String> = unhealthy
                    .iter()
                    .filter(|h| later.contains(h))
                    .cloned()
                    .collect();
                let out: Vec<String> = names.iter().chain(&held_out).cloned().collect();
                (out, held_out)
            })
            .collect();
        let staying_of = |i: usize| -> Vec<String> {
            inv.hosts
                .iter()
                .map(|h| h.name.clone())
                .filter(|h| !outs[i].0.contains(h))
                .collect()
        };
        let capacity_of = |i: usize, returning: Vec<String>| {
            phase(
                PhaseName::CapacityCheck,
                vec![Step {
                    target: FLEET.into(),
                    role: Role::Fleet,
                    action: Action::CapacityCheck {
                        staying: staying_of(i),
                        returning,
                        min_healthy,
                        path: inv.health.path.clone(),
                        port: app.port,
                        expect_status: inv.health.expect_status,
                    },
                }],
            )
        };
        // One reload per batch boundary: a rolling batch that is healthy returns to the pool
        // in the same rewrite that takes the next batch out, once the next batch's capacity
        // check passed (counting this batch as back). A canary returns on its own terms.
        let hands_over = |i: usize| i + 1 < groups.len() && !(canary.is_some() && i == 0);
        let batches = groups
            .iter()
            .copied()
            .enumerate()
            .map(|(i, hosts)| {
                let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
                let (out, held_out) = outs[i].clone();
                let taken_out = i > 0 && hands_over(i - 1);
                let drain = || -> Vec<Step> {
                    inv.balancer
                        .hosts
                        .iter()
                        .map(|lb| {
                            lb_step(
                                lb,
                                Action::Drain {
                                    command: balancer.in_flight_command(hosts),
                                    quiet: inv.balancer.drain_quiet,
                                    timeout: inv.balancer.drain_timeout,
                                },
                            )
                        })
                        .collect()
                };
                let capacity = capacity_of(i, Vec::new());
                let mut phases = Vec::new();
                if !taken_out {
                    phases.push(capacity.clone());
                    phases.push(phase(PhaseName::RemoveFromPool, set_pool(&out)));
                }
                phases.extend([
                    phase(PhaseName::Drain, drain()),
                    phase(
                        PhaseName::Switch,
                        per_host(hosts, &|h| Action::Run {
                            command: remote::switch(app, &target_of(h)),
                        }),
                    ),
                    phase(PhaseName::Restart, per_host(hosts, &restart)),
                    phase(PhaseName::HealthCheck, per_host(hosts, &health)),
                ]);
                let mut return_alone = None;
                // A canary serves traffic when it is judged: rolling it back starts by taking
                // it out of the pool again and draining it.
                let mut rollback = Vec::new();
                match canary.filter(|_| i == 0) {
                    Some(c) => {
                        let servers: Vec<String> =
                            hosts.iter().map(|h| balancer.server(h)).collect();
                        for &weight in &c.weights {
                            let mut pool = Pool::with_down(&held_out);
                            if weight < 100 {
                                pool.weights = names.iter().map(|n| (n.clone(), weight)).collect();
                            }
                            let name = if weight < 100 {
                                PhaseName::SetWeight
                            } else {
                                PhaseName::ReturnToPool
                            };
                            phases.push(phase(name, pool_steps(inv, balancer, pool)));
                            phases.push(phase(
                                PhaseName::Observe,
                                inv.balancer
                                    .hosts
                                    .iter()
                                    .map(|lb| {
                                        lb_step(
                                            lb,
                                            Action::Observe {
                                                access_log: c.access_log.clone(),
                                                hold: c.hold,
                                                canary: servers.clone(),
                                                weight,
                                                judgement: Judgement {
                                                    max_error_rate_increase: c
                                                        .max_error_rate_increase,
                                                    max_latency_ratio: c.max_latency_ratio,
                                                    min_requests: c.min_requests,
                                                },
                                            },
                                        )
                                    })
                                    .collect(),
                            ));
                        }
                        if c.weights.last() != Some(&100) {
                            phases.push(phase(PhaseName::ReturnToPool, set_pool(&held_out)));
                        }
                        if pause {
                            phases.push(phase(
                                PhaseName::AwaitDecision,
                                vec![lb_step(
                                    &inv.balancer.lock_host,
                                    Action::AwaitDecision {
                                        file: decision_file(inv),
                                    },
                                )],
                            ));
                        }
                        rollback.push(phase(PhaseName::RemoveFromPool, set_pool(&out)));
                        rollback.push(phase(PhaseName::Drain, drain()));
                    }
                    None if hands_over(i) => {
                        phases.push(capacity_of(i + 1, names.clone()));
                        phases.push(phase(PhaseName::ReturnToPool, set_pool(&outs[i + 1].0)));
                        return_alone = Some(phase(PhaseName::ReturnToPool, set_pool(&held_out)));
                    }
                    None => phases.push(phase(PhaseName::ReturnToPool, set_pool(&held_out))),
                }
                rollback.extend([
                    phase(PhaseName::SwitchBack, per_host(hosts, &switch_back)),
                    phase(PhaseName::Restart, per_host(hosts, &restart)),
                    phase(PhaseName::HealthCheck, per_host(hosts, &health)),
                    phase(PhaseName::ReturnToPool, set_pool(&held_out)),
                ]);
                Batch {
                    number: i + 1,
                    hosts: names.clone(),
                    held_out: held_out.clone(),
                    phases,
                    rollback,
                    undo: vec![
                        capacity,
                        phase(PhaseName::RemoveFromPool, set_pool(&names)),
                        phase(PhaseName::Drain, drain()),
                        phase(PhaseName::SwitchBack, per_host(hosts, &switch_back)),
                        phase(PhaseName::Restart, per_host(hosts, &restart)),
                        phase(PhaseName::HealthCheck, per_host(hosts, &health)),
                        phase(PhaseName::ReturnToPool, set_pool(&[])),
                    ],
                    taken_out,
                    return_alone,
                }
            })
            .collect();

        let all: Vec<&Host> = inv.hosts.iter().collect();
        let targets = todo
            .iter()
            .map(|h| (h.name.clone(), target_of(h)))
            .collect();
        Ok(Plan {
            skipped,
            targets,
            stage: phase(PhaseName::Stage, stage),
            batches,
            finish: phase(
                PhaseName::Prune,
                per_host(&all, &|_| Action::Run {
                    command: remote::prune(app),
                }),
            ),
            artifact,
            ..Plan::base(inv, balancer, release, strategy)
        })
    }

    /// Blue-green: start the release in every host's idle slot, check them all, then move every
    /// load balancer to the new slots at once. Nothing leaves the pool; the old slots keep
    /// running for `keep_old` so that `roller switch-back` is one reload.
    fn build_blue_green(input: PlanInput<'_>) -> Result<Plan> {
        let PlanInput {
            inventory: inv,
            balancer,
            release,
            artifact,
            observed,
            live_slot,
            adopt,
            ..
        } = input;
        validate_release(&release)?;
        let bg = inv.blue_green.as_ref().ok_or_else(|| Error::Usage {
            flag: "--strategy".into(),
            message: "blue-green needs a [blue_green] section in the inventory".into(),
        })?;
        let app = &inv.app;
        let live = live_slot.unwrap_or(Slot::Blue);
        // Adopting a single-port deployment: blue is the first slot, and what it replaces is
        // the process on app.port, stopped by adopt_stop.
        let idle = if adopt { Slot::Blue } else { live.other() };
        let stop_old = match (adopt, &bg.adopt_stop) {
            (false, _) => bg.command(&bg.stop, live),
            (true, Some(stop)) => stop.clone(),
            (true, None) => {
                return Err(Error::Usage {
                    flag: "blue_green.adopt_stop".into(),
                    message: "traffic goes to app.port: set it to the command that stops that process to adopt blue-green".into(),
                });
            }
        };
        let link = format!("current-{}", idle.as_str());
        let all: Vec<&Host> = inv.hosts.iter().collect();
        let per_host = |action: &dyn Fn(&Host) -> Action| app_steps(all.iter().copied(), action);
        let phase = |name, steps| Phase { name, steps };
        let done_everywhere = !adopt
            && observed.is_some_and(|o| {
                all.iter().all(|h| {
                    o.get(&h.name).is_some_and(|o| {
                        o.healthy && o.release.as_deref() == Some(release.as_str())
                    })
                })
            });
        let skipped: Vec<Skipped> = if done_everywhere {
            all.iter()
                .map(|h| Skipped {
                    host: h.name.clone(),
                    reason: format!("already serves {release} from its {} slot", live.as_str()),
                })
                .collect()
        } else {
            Vec::new()
        };
        let stage = match (&artifact, done_everywhere) {
            (Some(a), false) => per_host(&|_| Action::Upload {
                check: remote::artifact_present(app, &release, &a.sha256),
                upload: remote::upload(app, &release, &a.sha256),
            }),
            _ => Vec::new(),
        };
        let traffic_to = |slot: Slot| Pool {
            port: Some(bg.port(slot)),
            ..Pool::default()
        };
        let batches = if done_everywhere {
            Vec::new()
        } else {
            vec![Batch {
                number: 1,
                hosts: all.iter().map(|h| h.name.clone()).collect(),
                held_out: Vec::new(),
                phases: vec![
                    phase(
                        PhaseName::Switch,
                        per_host(&|_| Action::Run {
                            command: remote::switch_link(app, &link, &release),
                        }),
                    ),
                    phase(
                        PhaseName::StartSlot,
                        per_host(&|_| Action::Run {
                            command: bg.command(&bg.restart, idle),
                        }),
                    ),
                    phase(
                        PhaseName::HealthCheck,
                        per_host(&|h| {
                            Action::HealthCheck(HealthSpec::wait(&h.address, bg.port(idle), inv))
                        }),
                    ),
                    phase(
                        PhaseName::SwitchTraffic,
                        pool_steps(inv, balancer, traffic_to(idle)),
                    ),
                    phase(
                        PhaseName::KeepOld,
                        per_host(&|_| Action::Run {
                            command: remote::keep_old(app, idle.as_str(), &stop_old, bg.keep_old),
                        }),
                    ),
                ],
                // Traffic never reached the new slots unless the switch began: then it goes
                // back; either way the new slots stop.
                rollback: vec![
                    phase(
                        PhaseName::SwitchTraffic,
                        pool_steps(
                            inv,
                            balancer,
                            if adopt {
                                Pool {
                                    port: Some(app.port),
                                    ..Pool::default()
                                }
                            } else {
                                traffic_to(live)
                            },
                        ),
                    ),
                    phase(
                        PhaseName::StopSlot,
                        per_host(&|_| Action::Run {
                            command: bg.command(&bg.stop, idle),
                        }),
                    ),
                ],
                undo: Vec::new(),
                taken_out: false,
                return_alone: None,
            }]
        };
        let targets = if done_everywhere {
            BTreeMap::new()
        } else {
            all.iter()
                .map(|h| (h.name.clone(), release.clone()))
                .collect()
        };
        let finish = if done_everywhere {
            Vec::new()
        } else {
            per_host(&|_| Action::Run {
                command: remote::prune_slots(app),
            })
        };
        Ok(Plan {
            live_slot: (!adopt).then_some(live),
            artifact,
            skipped,
            targets,
            stage: phase(PhaseName::Stage, stage),
            finish: phase(PhaseName::Prune, finish),
            batches,
            ..Plan::base(inv, balancer, release, Strategy::BlueGreen)
        })
    }

    /// `roller switch-back`: traffic to the other slot, which must still be running and
    /// healthy. One reload per load balancer, no restart.
    pub fn switch_back(inv: &Inventory, balancer: &dyn Balancer, live: Slot) -> Result<Plan> {
        let bg = inv.blue_green.as_ref().ok_or_else(|| Error::Usage {
            flag: "switch-back".into(),
            message: "needs a [blue_green] section in the inventory".into(),
        })?;
        let back = live.other();
        let phase = |name, steps| Phase { name, steps };
        let per_host = |action: &dyn Fn(&Host) -> Action| app_steps(inv.hosts.iter(), action);
        let traffic_to = |slot: Slot| Pool {
            port: Some(bg.port(slot)),
            ..Pool::default()
        };
        Ok(Plan {
            live_slot: Some(live),
            batches: vec![Batch {
                number: 1,
                hosts: inv.hosts.iter().map(|h| h.name.clone()).collect(),
                held_out: Vec::new(),
                phases: vec![
                    // One probe each: the old slot is either still running or it is not.
                    phase(
                        PhaseName::HealthCheck,
                        per_host(&|h| {
                            Action::HealthCheck(HealthSpec {
                                timeout: inv.health.interval.max(Duration::from_secs(2)),
                                successes: 1,
                                ..HealthSpec::wait(&h.address, bg.port(back), inv)
                            })
                        }),
                    ),
                    phase(
                        PhaseName::SwitchTraffic,
                        pool_steps(inv, balancer, traffic_to(back)),
                    ),
                    // The slot traffic left is an old slot now, stopped after keep_old like
                    // any other.
                    phase(
                        PhaseName::KeepOld,
                        per_host(&|_| Action::Run {
                            command: remote::keep_old(
                                &inv.app,
                                back.as_str(),
                                &bg.command(&bg.stop, live),
                                bg.keep_old,
                            ),
                        }),
                    ),
                ],
                rollback: vec![phase(
                    PhaseName::SwitchTraffic,
                    pool_steps(inv, balancer, traffic_to(live)),
                )],
                undo: Vec::new(),
                taken_out: false,
                return_alone: None,
            }],
            ..Plan::base(
                inv,
                balancer,
                format!("{}-slot", back.as_str()),
                Strategy::BlueGreen,
            )
        })
    }

    /// The plan as an operator reads it: every command exactly as it will run.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let artifact = match &self.artifact {
            Some(a) => format!(
                "{} ({} bytes, sha256 {})",
                a.path.display(),
                a.bytes,
                a.sha256
            ),
            None => "not given: staging is left out of this plan".into(),
        };
        out.push_str(&format!(
            "Plan: {} release {} ({} strategy), {} host(s) in {} batch(es), {} load balancer(s)\nArtifact: {artifact}\n",
            self.app,
            self.release,
            serde_json::to_value(self.strategy).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
            self.hosts.len(),
            self.batches.len(),
            self.balancers.len(),
        ));
        out.push_str(
            "Each command runs on its host as `exec sh -c '<command>'`, whatever the SSH user's login shell.\n",
        );
        render_phase(
            &mut out,
            "Pre-flight, before anything changes",
            &self.preflight,
        );
        for s in &self.skipped {
            out.push_str(&format!("\nSkipped: {} ({})", s.host, s.reason));
        }
        if !self.skipped.is_empty() {
            out.push('\n');
        }
        render_phase(
            &mut out,
            "Stage, in parallel, skipped where the jar is already present",
            &self.stage,
        );
        for batch in &self.batches {
            out.push_str(&format!(
                "\nBatch {} of {}: {}\n",
                batch.number,
                self.batches.len(),
                batch.hosts.join(", ")
            ));
            if !batch.held_out.is_empty() {
                out.push_str(&format!(
                    "  Held out of the pool until their own batch (unhealthy at pre-flight): {}\n",
                    batch.held_out.join(", ")
                ));
            }
            if batch.taken_out {
                out.push_str(&format!(
                    "  Left the pool with batch {}'s return, in the same reload\n",
                    batch.number - 1
                ));
            }
            for (i, phase) in batch.phases.iter().enumerate() {
                render_steps(&mut out, &format!("{}. {}", i + 1, phase.name), phase);
            }
            if let Some(alone) = &batch.return_alone {
                out.push_str(
                    "  If the next batch may not leave the pool, or on interrupt before that, instead of the last two:\n",
                );
                render_steps(&mut out, "return-to-pool", alone);
            }
            out.push_str("  On failure, roll this batch back:\n");
            for (i, phase) in batch.rollback.iter().enumerate() {
                render_steps(&mut out, &format!("R{}. {}", i + 1, phase.name), phase);
            }
            if !batch.undo.is_empty() {
                out.push_str(
                    "  With --on-failure rollback-all, after a later batch fails, undo this batch:\n",
                );
            }
            for (i, phase) in batch.undo.iter().enumerate() {
                render_steps(&mut out, &format!("U{}. {}", i + 1, phase.name), phase);
            }
        }
        render_phase(&mut out, "Finish", &self.finish);
        out
    }
}

/// One step per app host, each with its own action.
fn app_steps<'h>(
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
pub fn pool_steps(inv: &Inventory, balancer: &dyn Balancer, pool: Pool) -> Vec<Step> {
    let content = balancer.render(&pool);
    inv.balancer
        .hosts
        .iter()
        .map(|lb| Step {
            target: lb.clone(),
            role: Role::Balancer,
            action: Action::SetPool {
                pool: pool.clone(),
                content: content.clone(),
                command: balancer.apply_command(),
            },
        })
        .collect()
}

fn render_phase(out: &mut String, title: &str, phase: &Phase) {
    out.push_str(&format!("\n{title}\n"));
    render_steps(out, phase.name.as_str(), phase);
}

fn render_steps(out: &mut String, label: &str, phase: &Phase) {
    if phase.steps.is_empty() {
        out.push_str(&format!("  {label}: nothing to do\n"));
    }
    for step in &phase.steps {
        let who = match step.role {
            Role::App | Role::Fleet => step.target.clone(),
            Role::Balancer => format!("lb {}", step.target),
        };
        match &step.action {
            Action::Run { command } => {
                out.push_str(&format!("  {label} {who}\n      $ {command}\n"));
            }
            Action::Upload { check, upload } => out.push_str(&format!(
                "  {label} {who}\n      $ {check}\n      unless present, the jar on stdin to:\n      $ {upload}\n"
            )),
            Action::SetPool {
                pool,
                content,
                command,
            } => {
                let mut down = if pool.down.is_empty() {
                    "every host in the pool".to_string()
                } else {
                    format!("down: {}", pool.down.iter().cloned().collect::<Vec<_>>().join(", "))
                };
                if let Some(port) = pool.port {
                    down.push_str(&format!(", traffic to port {port}"));
                }
                for (host, weight) in &pool.weights {
                    down.push_str(&format!(", {host} at {weight}% of its share"));
                }
                out.push_str(&format!("  {label} {who} ({down}), upstream file:\n"));
                for line in content.lines() {
                    out.push_str(&format!("      | {line}\n"));
                }
                out.push_str(&format!("      $ {command}\n"));
            }
            Action::Drain {
                command,
                quiet,
                timeout,
            } => out.push_str(&format!(
                "  {label} {who}: until it prints 0 for {} in a row, at most {}\n      $ {command}\n",
                humantime::format_duration(*quiet),
                humantime::format_duration(*timeout)
            )),
            Action::HealthCheck(HealthSpec {
                address,
                port,
                path,
                expect_status,
                interval,
                timeout,
                successes,
            }) => out.push_str(&format!(
                "  {label} {who}: GET http://{address}:{port}{path} from the host, expect {expect_status} {successes} time(s) in a row, every {}, at most {}\n",
                humantime::format_duration(*interval),
                humantime::format_duration(*timeout)
            )),
            Action::Observe {
                access_log,
                hold,
                canary,
                weight,
                judgement,
            } => out.push_str(&format!(
                "  {label} {who}: hold {} at {weight}% of the canary's share, then judge {} from {access_log}: abort above +{:.1} points of 5xx or {}x the others' mean upstream time, or below {} canary requests\n",
                humantime::format_duration(*hold),
                canary.join(", "),
                judgement.max_error_rate_increase * 100.0,
                judgement.max_latency_ratio,
                judgement.min_requests,
            )),
            Action::AwaitDecision { file } => out.push_str(&format!(
                "  {label} {who}: wait for `roller promote` or `roller abort` (they write {file})\n"
            )),
            Action::CapacityCheck {
                staying,
                returning,
                min_healthy,
                path,
                port,
                expect_status,
            } => out.push_str(&format!(
                "  {label}: at least {min_healthy} of {} healthy (GET :{port}{path} = {expect_status}) while the {} is out{}\n",
                if staying.is_empty() { "(none)".to_string() } else { staying.join(", ") },
                if returning.is_empty() { "batch" } else { "next batch" },
                if returning.is_empty() {
                    String::new()
                } else {
                    format!(", {} counted as back in the pool", returning.join(", "))
                }
            )),
        }
    }
}
