//! The blue-green plans: a release into the idle slots with one traffic switch, and
//! `roller switch-back`. Nothing leaves the pool; traffic moves between slots.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{
    Action, Batch, HostReason, Phase, PhaseName, Plan, PlanInput, app_steps, pool_steps,
    validate_release,
};
use crate::balancer::{Balancer, Pool};
use crate::error::{Error, Result};
use crate::health::HealthSpec;
use crate::inventory::{Host, Inventory, Slot, Strategy};
use crate::remote;

impl Plan {
    /// Blue-green: start the release in every host's idle slot, check them all, then move every
    /// load balancer to the new slots at once. Nothing leaves the pool; the old slots keep
    /// running for `keep_old` so that `roller switch-back` is one reload.
    pub(super) fn build_blue_green(input: PlanInput<'_>) -> Result<Plan> {
        let PlanInput {
            inventory: inv,
            balancer,
            release,
            artifact,
            observed,
            live_slot,
            adopt,
            selected,
            ..
        } = input;
        validate_release(&release)?;
        if selected.is_some() {
            return Err(Error::Usage {
                flag: "--hosts".into(),
                message: "blue-green moves every host's traffic at once: it takes no host selection (--hosts, --tag)".into(),
            });
        }
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
        let skipped: Vec<HostReason> = if done_everywhere {
            all.iter()
                .map(|h| HostReason {
                    host: h.name.clone(),
                    reason: format!("already serves {release} from its {} slot", live.as_str()),
                    not_selected: false,
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
                        per_host(&|_| Action::Switch {
                            release: release.clone(),
                            command: remote::switch_link(app, &link, &release),
                        }),
                    ),
                    phase(
                        PhaseName::StartSlot,
                        per_host(&|_| Action::StartSlot {
                            slot: idle,
                            command: bg.command(&bg.restart, idle),
                        }),
                    ),
                    phase(
                        PhaseName::HealthCheck,
                        per_host(&|h| {
                            Action::HealthCheck(HealthSpec::wait(&h.address, bg.port(idle), inv))
                        }),
                    ),
                    phase(PhaseName::SwitchTraffic, pool_steps(inv, traffic_to(idle))),
                    phase(
                        PhaseName::KeepOld,
                        per_host(&|_| Action::KeepOld {
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
                        per_host(&|_| Action::StopSlot {
                            slot: idle,
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
            per_host(&|_| Action::Prune {
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
                    phase(PhaseName::SwitchTraffic, pool_steps(inv, traffic_to(back))),
                    // The slot traffic left is an old slot now, stopped after keep_old like
                    // any other.
                    phase(
                        PhaseName::KeepOld,
                        per_host(&|_| Action::KeepOld {
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
                    pool_steps(inv, traffic_to(live)),
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
}
