//! The rolling plan: batches of hosts leave the pool, drain, switch, restart, pass their health
//! check and return, one reload per batch boundary. A canary rollout is a rolling one whose
//! first batch is the canary (see `canary.rs`).

use std::collections::{BTreeMap, BTreeSet};

use super::HostAtPreflight;
use super::{
    Action, Batch, FLEET, HostReason, Phase, PhaseName, Plan, PlanInput, Role, Step, app_steps,
    canary, pool_steps, validate_release,
};
use crate::balancer::{Balancer, Pool};
use crate::error::{Error, Result};
use crate::health::HealthSpec;
use crate::inventory::{CanaryConfig, Host, Inventory, Strategy};
use crate::remote;

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

impl Plan {
    pub(super) fn build_rolling(input: PlanInput<'_>) -> Result<Plan> {
        let PlanInput {
            inventory: inv,
            balancer,
            release,
            artifact,
            batch,
            observed,
            unfinished,
            targets,
            selected,
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
        let target_of = |h: &Host| -> String {
            targets
                .and_then(|t| t.get(&h.name).cloned())
                .unwrap_or_else(|| release.clone())
        };
        let is_selected = |h: &Host| selected.is_none_or(|s| s.contains(&h.name));
        let work = Worklist::new(inv, observed, unfinished, selected, &target_of);
        let app = &inv.app;
        let stage = match &artifact {
            Some(a) => app_steps(work.todo.iter().copied(), &|h| Action::Upload {
                check: remote::artifact_present(app, &target_of(h), &a.sha256),
                upload: remote::upload(app, &target_of(h), &a.sha256),
            }),
            None => Vec::new(),
        };
        let targets: BTreeMap<String, String> = work
            .todo
            .iter()
            .map(|h| (h.name.clone(), target_of(h)))
            .collect();
        let batches = {
            let builder = Batches::new(
                inv,
                balancer,
                &work,
                per_batch,
                canary.zip(canary_size),
                pause,
                min_healthy,
                &targets,
            );
            (0..builder.groups.len())
                .map(|i| builder.batch(i))
                .collect()
        };
        Ok(Plan {
            skipped: work.skipped,
            first: work.first,
            targets,
            stage: Phase {
                name: PhaseName::Stage,
                steps: stage,
            },
            batches,
            finish: Phase {
                name: PhaseName::Prune,
                steps: app_steps(inv.hosts.iter().filter(|h| is_selected(h)), &|_| {
                    Action::Prune {
                        command: remote::prune(app),
                    }
                }),
            },
            artifact,
            ..Plan::base(inv, balancer, release, strategy)
        })
    }
}

/// Who needs work, in the order it gets it: hosts a previous run left partway, then hosts that
/// are unhealthy now (fixing them first restores capacity), then the rest. Hosts already on
/// their target and healthy are skipped.
struct Worklist<'a> {
    skipped: Vec<HostReason>,
    /// Hosts moved ahead of the others, and why.
    first: Vec<HostReason>,
    todo: Vec<&'a Host>,
    /// Hosts unhealthy at pre-flight: they stay out of the pool until their own batch.
    unhealthy: BTreeSet<String>,
}

impl<'a> Worklist<'a> {
    fn new(
        inv: &'a Inventory,
        observed: Option<&BTreeMap<String, HostAtPreflight>>,
        unfinished: &BTreeSet<String>,
        selected: Option<&BTreeSet<String>>,
        target_of: &dyn Fn(&Host) -> String,
    ) -> Worklist<'a> {
        let seen = |h: &Host| observed.and_then(|o| o.get(&h.name));
        let mut skipped = Vec::new();
        let mut todo: Vec<&Host> = Vec::new();
        for h in &inv.hosts {
            if selected.is_some_and(|s| !s.contains(&h.name)) {
                skipped.push(HostReason {
                    host: h.name.clone(),
                    reason: "not selected (--hosts, --tag)".into(),
                    not_selected: true,
                });
                continue;
            }
            match seen(h) {
                Some(o)
                    if o.healthy
                        && o.release.as_deref() == Some(target_of(h).as_str())
                        && !unfinished.contains(&h.name) =>
                {
                    skipped.push(HostReason {
                        host: h.name.clone(),
                        reason: format!("already runs {} and is healthy", target_of(h)),
                        not_selected: false,
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
        let first = todo
            .iter()
            .filter_map(|h| {
                let reason = match rank(h) {
                    0 => "left partway by an unfinished rollout",
                    1 => "unhealthy at pre-flight: out of the pool until its batch",
                    _ => return None,
                };
                Some(HostReason {
                    host: h.name.clone(),
                    reason: reason.into(),
                    not_selected: false,
                })
            })
            .collect();
        let unhealthy = todo
            .iter()
            .filter(|h| seen(h).is_some_and(|o| !o.healthy))
            .map(|h| h.name.clone())
            .collect();
        Worklist {
            skipped,
            first,
            todo,
            unhealthy,
        }
    }
}

/// The hosts one batch updates, and what its pool changes take out.
pub(super) struct Group<'a> {
    pub hosts: &'a [&'a Host],
    pub names: Vec<String>,
    /// Hosts of later batches, unhealthy at pre-flight, that stay out while this one runs.
    pub held_out: Vec<String>,
    /// What this batch's pool change takes out: itself and its held-out hosts.
    pub out: Vec<String>,
}

/// Builds a rolling plan's batches one at a time: the phases going forward, the rollback, the
/// undo of `rollback-all`, and the handover to the next batch.
pub(super) struct Batches<'a> {
    pub inv: &'a Inventory,
    pub balancer: &'a dyn Balancer,
    pub groups: Vec<Group<'a>>,
    canary: Option<&'a CanaryConfig>,
    pub pause: bool,
    min_healthy: usize,
    targets: &'a BTreeMap<String, String>,
}

impl<'a> Batches<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        inv: &'a Inventory,
        balancer: &'a dyn Balancer,
        work: &'a Worklist<'a>,
        per_batch: usize,
        canary: Option<(&'a CanaryConfig, usize)>,
        pause: bool,
        min_healthy: usize,
        targets: &'a BTreeMap<String, String>,
    ) -> Batches<'a> {
        let todo = &work.todo[..];
        // The canary is the first batch, whatever --batch says; the rest follow in --batch.
        let mut slices: Vec<&[&Host]> = Vec::new();
        let rest = match canary {
            Some((_, n)) if !todo.is_empty() => {
                let n = n.min(todo.len());
                slices.push(&todo[..n]);
                &todo[n..]
            }
            _ => todo,
        };
        slices.extend(rest.chunks(per_batch));
        // Where each unhealthy host's own batch starts in `todo`: it is held out of every batch
        // before that. Looked up once, so that a batch costs its own hosts, not the fleet.
        let unhealthy_at: Vec<(usize, &String)> = todo
            .iter()
            .enumerate()
            .filter(|(_, h)| work.unhealthy.contains(&h.name))
            .map(|(i, h)| (i, &h.name))
            .collect();
        let mut first = 0;
        let groups = slices
            .into_iter()
            .map(|hosts| {
                first += hosts.len();
                let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
                let mut held_out: Vec<String> = unhealthy_at
                    .iter()
                    .filter(|(i, _)| *i >= first)
                    .map(|(_, h)| (*h).clone())
                    .collect();
                held_out.sort();
                let out = names.iter().chain(&held_out).cloned().collect();
                Group {
                    hosts,
                    names,
                    held_out,
                    out,
                }
            })
            .collect();
        Batches {
            inv,
            balancer,
            groups,
            canary: canary.map(|(c, _)| c),
            pause,
            min_healthy,
            targets,
        }
    }

    /// One reload per batch boundary: a rolling batch that is healthy returns to the pool in
    /// the same rewrite that takes the next batch out, once the next batch's capacity check
    /// passed (counting this batch as back). A canary returns on its own terms.
    /// With `hooks.before_drain`, every batch leaves the pool in its own change, after its own
    /// hook: the hook runs before the batch is taken out, and never as part of another batch.
    fn hands_over(&self, i: usize) -> bool {
        i + 1 < self.groups.len()
            && !(self.canary.is_some() && i == 0)
            && self.inv.hooks.before_drain.is_none()
    }

    /// The `[hooks]` command for `name` on each of `hosts`, if one is configured.
    fn hook(&self, name: PhaseName, hosts: &[&Host]) -> Option<Phase> {
        let hooks = &self.inv.hooks;
        let command = match name {
            PhaseName::BeforeDrain => hooks.before_drain.as_ref(),
            PhaseName::AfterHealthy => hooks.after_healthy.as_ref(),
            _ => None,
        }?;
        Some(Phase {
            name,
            steps: app_steps(hosts.iter().copied(), &|h| Action::Hook {
                command: remote::hook(&self.inv.app, &self.targets[&h.name], &h.name, command),
                timeout: hooks.timeout,
            }),
        })
    }

    fn batch(&self, i: usize) -> Batch {
        let group = &self.groups[i];
        let hosts = group.hosts;
        let taken_out = i > 0 && self.hands_over(i - 1);
        let phase = |name, steps| Phase { name, steps };
        let mut phases = Vec::new();
        if !taken_out {
            phases.push(self.capacity(i, Vec::new()));
            phases.extend(self.hook(PhaseName::BeforeDrain, hosts));
            phases.push(phase(PhaseName::RemoveFromPool, self.set_pool(&group.out)));
        }
        phases.extend([
            phase(PhaseName::Drain, self.drain(hosts)),
            phase(
                PhaseName::Switch,
                app_steps(hosts.iter().copied(), &|h| Action::Switch {
                    release: self.targets[&h.name].clone(),
                    command: remote::switch(&self.inv.app, &self.targets[&h.name]),
                }),
            ),
            phase(PhaseName::Restart, self.restart(hosts)),
            phase(PhaseName::HealthCheck, self.health(hosts)),
        ]);
        phases.extend(self.hook(PhaseName::AfterHealthy, hosts));
        let mut return_alone = None;
        let mut rollback = Vec::new();
        match self.canary.filter(|_| i == 0) {
            Some(c) => {
                let (judged, back_out) = canary::ladder(self, group, c);
                phases.extend(judged);
                rollback.extend(back_out);
            }
            None if self.hands_over(i) => {
                phases.push(self.capacity(i + 1, group.names.clone()));
                phases.push(phase(
                    PhaseName::ReturnToPool,
                    self.set_pool(&self.groups[i + 1].out),
                ));
                return_alone = Some(phase(
                    PhaseName::ReturnToPool,
                    self.set_pool(&group.held_out),
                ));
            }
            None => phases.push(phase(
                PhaseName::ReturnToPool,
                self.set_pool(&group.held_out),
            )),
        }
        rollback.extend(self.switch_back(group, &group.held_out));
        let mut undo = vec![
            self.capacity(i, Vec::new()),
            phase(PhaseName::RemoveFromPool, self.set_pool(&group.names)),
            phase(PhaseName::Drain, self.drain(hosts)),
        ];
        undo.extend(self.switch_back(group, &[]));
        Batch {
            number: i + 1,
            hosts: group.names.clone(),
            held_out: group.held_out.clone(),
            phases,
            rollback,
            undo,
            taken_out,
            return_alone,
        }
    }

    /// Back to the previous release, healthy, and into a pool with `down` left out.
    fn switch_back(&self, group: &Group<'_>, down: &[String]) -> [Phase; 4] {
        let hosts = group.hosts;
        [
            Phase {
                name: PhaseName::SwitchBack,
                steps: app_steps(hosts.iter().copied(), &|_| Action::SwitchBack {
                    command: remote::switch_back(&self.inv.app),
                }),
            },
            Phase {
                name: PhaseName::Restart,
                steps: self.restart(hosts),
            },
            Phase {
                name: PhaseName::HealthCheck,
                steps: self.health(hosts),
            },
            Phase {
                name: PhaseName::ReturnToPool,
                steps: self.set_pool(down),
            },
        ]
    }

    /// Every host outside batch `i`'s pool change must leave at least `min_healthy` healthy;
    /// `returning` hosts count as back in the pool.
    fn capacity(&self, i: usize, returning: Vec<String>) -> Phase {
        Phase {
            name: PhaseName::CapacityCheck,
            steps: vec![Step {
                target: FLEET.into(),
                role: Role::Fleet,
                action: Action::CapacityCheck {
                    leaving: self.groups[i].out.clone(),
                    returning,
                    min_healthy: self.min_healthy,
                    path: self.inv.health.path.clone(),
                    port: self.inv.app.port,
                    expect_status: self.inv.health.expect_status,
                },
            }],
        }
    }

    pub(super) fn set_pool(&self, down: &[String]) -> Vec<Step> {
        pool_steps(self.inv, Pool::with_down(down))
    }

    pub(super) fn drain(&self, hosts: &[&Host]) -> Vec<Step> {
        self.on_balancers(|| Action::Drain {
            command: self.balancer.in_flight_command(hosts),
            quiet: self.inv.balancer.drain_quiet,
            timeout: self.inv.balancer.drain_timeout,
        })
    }

    /// One step per load balancer, each with the same action.
    pub(super) fn on_balancers(&self, action: impl Fn() -> Action) -> Vec<Step> {
        self.inv
            .balancer
            .hosts
            .iter()
            .map(|lb| Step {
                target: lb.clone(),
                role: Role::Balancer,
                action: action(),
            })
            .collect()
    }

    fn restart(&self, hosts: &[&Host]) -> Vec<Step> {
        app_steps(hosts.iter().copied(), &|_| Action::Restart {
            command: self.inv.app.restart.clone(),
        })
    }

    fn health(&self, hosts: &[&Host]) -> Vec<Step> {
        app_steps(hosts.iter().copied(), &|h| {
            Action::HealthCheck(HealthSpec::wait(&h.address, self.inv.app.port, self.inv))
        })
    }
}
