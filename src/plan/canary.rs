//! The canary batch's ladder: back in the pool at each of `canary.weights` in turn, judged from
//! the access log after each hold, and, with `--pause`, a wait for `roller promote` or `roller
//! abort`. The rest of a canary rollout is the rolling plan.

use super::rolling::{Batches, Group};
use super::{Action, Judgement, Phase, PhaseName, Role, Step, decision_file, pool_steps};
use crate::balancer::Pool;
use crate::inventory::CanaryConfig;
use crate::remote;

/// The canary's phases after its health check, and the head of its rollback: a canary serves
/// traffic when it is judged, so rolling it back starts by taking it out of the pool again and
/// draining it.
pub(super) fn ladder(
    batches: &Batches<'_>,
    group: &Group<'_>,
    c: &CanaryConfig,
) -> (Vec<Phase>, [Phase; 2]) {
    let (inv, balancer) = (batches.inv, batches.balancer);
    let servers: Vec<String> = group.hosts.iter().map(|h| balancer.server(h)).collect();
    let mut phases = Vec::new();
    for &weight in &c.weights {
        let mut pool = Pool::with_down(&group.held_out);
        if weight < 100 {
            pool.weights = group.names.iter().map(|n| (n.clone(), weight)).collect();
        }
        let name = if weight < 100 {
            PhaseName::SetWeight
        } else {
            PhaseName::ReturnToPool
        };
        phases.push(Phase {
            name,
            steps: pool_steps(inv, pool),
        });
        phases.push(Phase {
            name: PhaseName::Observe,
            steps: batches.on_balancers(|| Action::Observe {
                access_log: c.access_log.clone(),
                hold: c.hold,
                canary: servers.clone(),
                weight,
                judgement: Judgement {
                    max_error_rate_increase: c.max_error_rate_increase,
                    max_latency_ratio: c.max_latency_ratio,
                    min_requests: c.min_requests,
                },
                measure: remote::log_size(&c.access_log),
                read: remote::log_since(&c.access_log),
            }),
        });
    }
    if c.weights.last() != Some(&100) {
        phases.push(Phase {
            name: PhaseName::ReturnToPool,
            steps: batches.set_pool(&group.held_out),
        });
    }
    if batches.pause {
        phases.push(Phase {
            name: PhaseName::AwaitDecision,
            steps: vec![Step {
                target: inv.balancer.lock_host.clone(),
                role: Role::Balancer,
                action: Action::AwaitDecision {
                    command: remote::read_decision(&decision_file(inv)),
                    file: decision_file(inv),
                },
            }],
        });
    }
    let back_out = [
        Phase {
            name: PhaseName::RemoveFromPool,
            steps: batches.set_pool(&group.out),
        },
        Phase {
            name: PhaseName::Drain,
            steps: batches.drain(group.hosts),
        },
    ];
    (phases, back_out)
}
