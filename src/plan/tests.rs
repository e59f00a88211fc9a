//! Plan building without any host: who goes in which batch and in what order, what each pool
//! change leaves out, and what is refused before anything runs.

use std::collections::{BTreeMap, BTreeSet};

use super::{Action, Batch, BatchSize, HostAtPreflight, PhaseName, Plan, PlanInput};
use crate::balancer::Nginx;
use crate::error::Error;
use crate::inventory::{Inventory, Strategy};

const INVENTORY: &str = r#"
[ssh]
user = "deploy"
known_hosts = "/dev/null"
[app]
name = "shop"
dir = "/opt/shop"
restart = "restart-app"
port = 8080
[balancer]
hosts = ["lb-1"]
upstream_file = "/etc/nginx/conf.d/shop.conf"
[canary]
hosts = 1
weights = [10, 50]
access_log = "/var/log/nginx/shop-roller.log"
[[hosts]]
name = "web-1"
address = "10.0.1.1"
[[hosts]]
name = "web-2"
address = "10.0.1.2"
[[hosts]]
name = "web-3"
address = "10.0.1.3"
[[hosts]]
name = "web-4"
address = "10.0.1.4"
"#;

fn inventory(extra_balancer: &str) -> Inventory {
    let text = INVENTORY.replace("[balancer]\n", &format!("[balancer]\n{extra_balancer}\n"));
    Inventory::parse(&text).unwrap()
}

fn seen(release: &str, healthy: bool) -> HostAtPreflight {
    HostAtPreflight {
        release: Some(release.into()),
        healthy,
        in_pool: healthy,
        blue: None,
        green: None,
    }
}

fn build(
    inv: &Inventory,
    batch: BatchSize,
    strategy: Strategy,
    observed: Option<&BTreeMap<String, HostAtPreflight>>,
    unfinished: &BTreeSet<String>,
    pause: bool,
) -> Result<Plan, Error> {
    let balancer = Nginx::new(&inv.balancer, &inv.app, &inv.hosts);
    Plan::build(PlanInput {
        inventory: inv,
        balancer: &balancer,
        release: "v2".into(),
        artifact: None,
        batch,
        observed,
        unfinished,
        targets: None,
        selected: None,
        strategy,
        live_slot: None,
        pause,
        adopt: false,
    })
}

fn rolling(inv: &Inventory, observed: Option<&BTreeMap<String, HostAtPreflight>>) -> Plan {
    build(
        inv,
        BatchSize::Hosts(1),
        Strategy::Rolling,
        observed,
        &BTreeSet::new(),
        false,
    )
    .unwrap()
}

fn hosts_of(plan: &Plan) -> Vec<Vec<&str>> {
    plan.batches
        .iter()
        .map(|b| b.hosts.iter().map(String::as_str).collect())
        .collect()
}

fn phase_names(phases: &[super::Phase]) -> Vec<PhaseName> {
    phases.iter().map(|p| p.name).collect()
}

/// The hosts each pool change of the phase marks `down`.
fn downs(batch: &Batch, name: PhaseName) -> Vec<Vec<String>> {
    batch
        .phases
        .iter()
        .filter(|p| p.name == name)
        .flat_map(|p| &p.steps)
        .filter_map(|s| match &s.action {
            Action::SetPool { pool, .. } => Some(pool.down.iter().cloned().collect()),
            _ => None,
        })
        .collect()
}

#[test]
fn hosts_left_partway_go_first_then_unhealthy_ones_then_the_rest() {
    let inv = inventory("");
    let observed = BTreeMap::from([
        ("web-1".to_string(), seen("v1", true)),
        ("web-2".to_string(), seen("v1", true)),
        ("web-3".to_string(), seen("v1", false)),
        ("web-4".to_string(), seen("v1", true)),
    ]);
    let unfinished = BTreeSet::from(["web-4".to_string()]);
    let plan = build(
        &inv,
        BatchSize::Hosts(1),
        Strategy::Rolling,
        Some(&observed),
        &unfinished,
        false,
    )
    .unwrap();
    assert_eq!(
        hosts_of(&plan),
        [["web-4"], ["web-3"], ["web-1"], ["web-2"]]
    );
}

#[test]
fn hosts_already_healthy_on_the_release_are_skipped_unless_left_partway() {
    let inv = inventory("");
    let observed = BTreeMap::from([
        ("web-1".to_string(), seen("v2", true)),
        ("web-2".to_string(), seen("v2", true)),
        ("web-3".to_string(), seen("v2", false)),
        ("web-4".to_string(), seen("v1", true)),
    ]);
    let unfinished = BTreeSet::from(["web-2".to_string()]);
    let plan = build(
        &inv,
        BatchSize::Hosts(1),
        Strategy::Rolling,
        Some(&observed),
        &unfinished,
        false,
    )
    .unwrap();
    let skipped: Vec<&str> = plan.skipped.iter().map(|s| s.host.as_str()).collect();
    assert_eq!(skipped, ["web-1"]);
    assert_eq!(hosts_of(&plan), [["web-2"], ["web-3"], ["web-4"]]);
    assert!(!plan.targets.contains_key("web-1"));
}

#[test]
fn unhealthy_hosts_stay_out_of_the_pool_until_their_own_batch() {
    let inv = inventory("");
    let observed = BTreeMap::from([
        ("web-1".to_string(), seen("v1", false)),
        ("web-2".to_string(), seen("v1", false)),
        ("web-3".to_string(), seen("v1", true)),
        ("web-4".to_string(), seen("v1", true)),
    ]);
    let plan = rolling(&inv, Some(&observed));
    assert_eq!(
        hosts_of(&plan),
        [["web-1"], ["web-2"], ["web-3"], ["web-4"]]
    );
    let first = &plan.batches[0];
    assert_eq!(first.held_out, ["web-2"]);
    assert_eq!(
        downs(first, PhaseName::RemoveFromPool),
        [["web-1", "web-2"]]
    );
    // Its return takes the next batch out in the same rewrite: web-2, no longer held.
    assert_eq!(downs(first, PhaseName::ReturnToPool), [["web-2"]]);
    // Returning alone, or after a rollback, it leaves web-2 out: web-2 is still to be fixed.
    let alone = first.return_alone.as_ref().unwrap();
    assert!(alone.steps.iter().all(|s| matches!(
        &s.action,
        Action::SetPool { pool, .. } if pool.down.iter().eq(["web-2"].iter())
    )));
    assert_eq!(
        downs(
            &Batch {
                phases: first.rollback.clone(),
                ..first.clone()
            },
            PhaseName::ReturnToPool
        ),
        [["web-2"]]
    );
    assert!(plan.batches[1..].iter().all(|b| b.held_out.is_empty()));
}

#[test]
fn batches_after_the_first_are_taken_out_by_the_previous_return() {
    let inv = inventory("");
    let plan = rolling(&inv, None);
    let first = &plan.batches[0];
    assert!(!first.taken_out);
    assert_eq!(
        phase_names(&first.phases),
        [
            PhaseName::CapacityCheck,
            PhaseName::RemoveFromPool,
            PhaseName::Drain,
            PhaseName::Switch,
            PhaseName::Restart,
            PhaseName::HealthCheck,
            PhaseName::CapacityCheck,
            PhaseName::ReturnToPool,
        ]
    );
    for batch in &plan.batches[1..] {
        assert!(batch.taken_out, "batch {}", batch.number);
        assert_eq!(batch.phases[0].name, PhaseName::Drain);
    }
    let last = plan.batches.last().unwrap();
    assert!(last.return_alone.is_none());
    assert_eq!(downs(last, PhaseName::ReturnToPool), [Vec::<String>::new()]);
}

#[test]
fn a_batch_that_leaves_fewer_than_min_healthy_is_refused() {
    let inv = inventory("min_healthy = 3");
    let refused = build(
        &inv,
        BatchSize::Hosts(2),
        Strategy::Rolling,
        None,
        &BTreeSet::new(),
        false,
    );
    match refused {
        Err(Error::Usage { flag, message }) => {
            assert_eq!(flag, "--batch");
            assert!(
                message.contains("leaves 2 host(s) in the pool, below balancer.min_healthy (3)"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        build(
            &inv,
            BatchSize::Hosts(1),
            Strategy::Rolling,
            None,
            &BTreeSet::new(),
            false
        )
        .is_ok()
    );
}

#[test]
fn a_batch_of_every_host_is_refused() {
    let inv = inventory("");
    let refused = build(
        &inv,
        BatchSize::Percent(100),
        Strategy::Rolling,
        None,
        &BTreeSet::new(),
        false,
    );
    assert!(
        matches!(&refused, Err(Error::Usage { message, .. }) if message.contains("takes all 4 host(s) out")),
        "{refused:?}"
    );
}

#[test]
fn the_canary_climbs_its_weights_then_returns_in_full_and_waits_when_paused() {
    let inv = inventory("");
    let plan = build(
        &inv,
        BatchSize::Hosts(2),
        Strategy::Canary,
        None,
        &BTreeSet::new(),
        true,
    )
    .unwrap();
    assert_eq!(
        hosts_of(&plan),
        [vec!["web-1"], vec!["web-2", "web-3"], vec!["web-4"]]
    );
    let canary = &plan.batches[0];
    let after_health = canary
        .phases
        .iter()
        .position(|p| p.name == PhaseName::HealthCheck)
        .unwrap()
        + 1;
    assert_eq!(
        phase_names(&canary.phases[after_health..]),
        [
            PhaseName::SetWeight,
            PhaseName::Observe,
            PhaseName::SetWeight,
            PhaseName::Observe,
            PhaseName::ReturnToPool,
            PhaseName::AwaitDecision,
        ]
    );
    let ladder: Vec<(u32, u32)> = canary
        .phases
        .iter()
        .filter(|p| p.name == PhaseName::SetWeight)
        .zip(
            canary
                .phases
                .iter()
                .filter(|p| p.name == PhaseName::Observe),
        )
        .map(|(set, observe)| {
            let Action::SetPool { pool, .. } = &set.steps[0].action else {
                panic!("set-weight sets the pool")
            };
            let Action::Observe { weight, .. } = &observe.steps[0].action else {
                panic!("observe observes")
            };
            (pool.weights["web-1"], *weight)
        })
        .collect();
    assert_eq!(ladder, [(10, 10), (50, 50)]);
    // The canary returns on its own: the next batch leaves the pool in its own change.
    assert!(canary.return_alone.is_none());
    assert!(!plan.batches[1].taken_out);
    // Rolling it back starts by taking it out of the pool again.
    assert_eq!(
        phase_names(&canary.rollback[..2]),
        [PhaseName::RemoveFromPool, PhaseName::Drain]
    );
}

#[test]
fn a_canary_ladder_ending_at_full_weight_needs_no_extra_return() {
    let mut inv = inventory("");
    inv.canary.as_mut().unwrap().weights = vec![25, 100];
    let plan = build(
        &inv,
        BatchSize::Hosts(1),
        Strategy::Canary,
        None,
        &BTreeSet::new(),
        false,
    )
    .unwrap();
    let names = phase_names(&plan.batches[0].phases);
    assert_eq!(
        &names[names.len() - 4..],
        [
            PhaseName::SetWeight,
            PhaseName::Observe,
            PhaseName::ReturnToPool,
            PhaseName::Observe,
        ]
    );
}

#[test]
fn a_canary_as_large_as_the_fleet_is_refused() {
    let mut inv = inventory("");
    inv.canary.as_mut().unwrap().hosts = crate::inventory::MinHealthy::Hosts(4);
    let refused = build(
        &inv,
        BatchSize::Hosts(1),
        Strategy::Canary,
        None,
        &BTreeSet::new(),
        false,
    );
    assert!(
        matches!(&refused, Err(Error::Usage { flag, .. }) if flag == "canary.hosts"),
        "{refused:?}"
    );
}
