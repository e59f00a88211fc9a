//! Blue-green and canary over the fake fleet: slots started, traffic moved in one change, a
//! canary's weight ladder and its judgement.

use super::*;

const BLUE_GREEN: &str = r#"
strategy = "blue-green"
[blue_green]
restart = "start-slot {slot}"
stop = "stop-slot {slot}"
"#;

/// Every host serves v1 from its blue slot; green never ran.
fn blue_world() -> Arc<Mutex<World>> {
    let world = world();
    {
        let mut w = world.lock().unwrap();
        for h in ["web-1", "web-2", "web-3"] {
            w.slots.insert(format!("{h}/blue"), "v1".into());
            w.slots_running.insert(format!("{h}/blue"), "v1".into());
        }
        let inv = Inventory::parse(&blue_green_inventory()).unwrap();
        let balancer = Nginx::new(&inv.balancer, &inv.app, &inv.hosts);
        w.upstream = balancer.render(&roller::balancer::Pool {
            port: Some(8081),
            ..Default::default()
        });
    }
    world
}

fn blue_green_inventory() -> String {
    format!("{BLUE_GREEN}{INVENTORY}")
}

fn leaked(text: String) -> &'static str {
    Box::leak(text.into_boxed_str())
}

#[tokio::test]
async fn blue_green_starts_every_idle_slot_then_moves_all_traffic_in_one_change() {
    let world = blue_world();
    let inventory = leaked(blue_green_inventory());
    let fleet = fleet_of(inventory, world.clone());
    let (result, _) = rollout_to(
        Target {
            inventory,
            ..Target::default()
        },
        &fleet,
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::Succeeded);
    let w = world.lock().unwrap();
    for h in ["web-1", "web-2", "web-3"] {
        assert_eq!(w.slots_running[&format!("{h}/green")], "v2", "{h}");
        // The old slot keeps running, for switch-back, until its timer stops it.
        assert_eq!(w.slots_running[&format!("{h}/blue")], "v1", "{h}");
    }
    assert_eq!(w.keeping_old, ["web-1", "web-2", "web-3"]);
    // One pool change, to the green port, with nobody out of the pool.
    assert_eq!(w.upstream_history.len(), 1, "{:#?}", w.upstream_history);
    assert!(w.upstream.contains("10.0.1.1:8082;"), "{}", w.upstream);
    assert!(!w.upstream.contains("down"), "{}", w.upstream);
    drop(w);
    // No host moved traffic before every green slot was healthy.
    let calls = fleet.calls();
    let switched_traffic = calls
        .iter()
        .position(|c| {
            matches!(c, Call::Exec { command, .. } if classify(inventory, command) == Some(Op::SetPool))
        })
        .unwrap();
    let last_probe = calls
        .iter()
        .rposition(|c| matches!(c, Call::HttpGet { port: 8082, .. }))
        .unwrap();
    assert!(last_probe < switched_traffic);
    let last = last_saved(&world);
    assert_eq!(last.status, Status::Succeeded);
    assert_eq!(progress(&last), [Progress::Done; 3]);
    let released: Vec<Option<&str>> = report.hosts.iter().map(|h| h.release.as_deref()).collect();
    assert_eq!(released, [Some("v2"); 3]);
}

#[tokio::test]
async fn a_green_slot_that_never_turns_healthy_never_gets_traffic_and_is_stopped() {
    let world = blue_world();
    world.lock().unwrap().sick_on_v2 = vec!["web-2".into()];
    let inventory = leaked(blue_green_inventory());
    let fleet = fleet_of(inventory, world.clone());
    let (result, _) = rollout_to(
        Target {
            inventory,
            ..Target::default()
        },
        &fleet,
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::RolledBack);
    assert_eq!(report.failure.as_ref().unwrap().failure.host, "web-2");
    let w = world.lock().unwrap();
    assert!(w.upstream_history.is_empty(), "{:#?}", w.upstream_history);
    for h in ["web-1", "web-2", "web-3"] {
        assert!(!w.slots_running.contains_key(&format!("{h}/green")), "{h}");
        assert_eq!(w.slots_running[&format!("{h}/blue")], "v1", "{h}");
    }
    drop(w);
    let released: Vec<Option<&str>> = report.hosts.iter().map(|h| h.release.as_deref()).collect();
    assert_eq!(released, [Some("v1"); 3]);
    let last = last_saved(&world);
    assert_eq!(last.status, Status::RolledBack);
    assert_eq!(progress(&last), [Progress::RolledBack; 3]);
    assert!(last.out_of_pool.is_empty(), "{last:?}");
}

const CANARY: &str = r#"
strategy = "canary"
[canary]
hosts = 1
weights = [20, 100]
hold = "1ms"
access_log = "/var/log/nginx/shop-roller.log"
min_requests = 5
"#;

/// A hold's access log: `canary` requests to web-1 with `status`, 20 good ones to web-2.
fn hold(canary: usize, status: u16) -> String {
    let mut lines = format!("10.0.1.1:8080 {status} 0.010\n").repeat(canary);
    lines.push_str(&"10.0.1.2:8080 200 0.010\n".repeat(20));
    lines
}

#[tokio::test]
async fn a_canary_steps_through_its_weights_and_the_rest_follows_once_it_is_judged_good() {
    let world = world();
    world.lock().unwrap().holds = vec![hold(5, 200), hold(20, 200)];
    let inventory = leaked(format!("{CANARY}{INVENTORY}"));
    let fleet = fleet_of(inventory, world.clone());
    let (result, _) = rollout_to(
        Target {
            inventory,
            ..Target::default()
        },
        &fleet,
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::Succeeded, "{report:?}");
    assert!(
        report.notes.iter().any(|n| n.contains("at 20%")),
        "{:?}",
        report.notes
    );
    assert_eq!(releases(&world), vec![("v2".into(), "v2".into()); 3]);
    let w = world.lock().unwrap();
    // web-1 out; back at weight 20; back in full; then the others, one batch at a time.
    assert!(
        w.upstream_history[1].contains("10.0.1.1:8080 weight=20;"),
        "{:#?}",
        w.upstream_history
    );
    assert!(w.upstream_history[1].contains("10.0.1.2:8080 weight=100;"));
    assert!(
        !w.upstream_history[2].contains("weight"),
        "{}",
        w.upstream_history[2]
    );
    assert!(w.holds.is_empty());
    drop(w);
    assert_eq!(last_saved(&world).status, Status::Succeeded);
}

#[tokio::test]
async fn a_canary_answering_5xx_leaves_the_pool_drains_and_goes_back_to_its_release() {
    let world = world();
    world.lock().unwrap().holds = vec![hold(10, 502)];
    let inventory = leaked(format!("{CANARY}{INVENTORY}"));
    let fleet = fleet_of(inventory, world.clone());
    let (result, _) = rollout_to(
        Target {
            inventory,
            ..Target::default()
        },
        &fleet,
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::RolledBack);
    let failure = &report.failure.as_ref().unwrap().failure;
    assert_eq!(failure.step, "observe");
    assert!(failure.message.contains("5xx rate"), "{failure:?}");
    assert_eq!(releases(&world), vec![("v1".into(), "v1".into()); 3]);
    let w = world.lock().unwrap();
    // Out, back at 20%, out again for the rollback, back in full.
    let downs: Vec<bool> = w
        .upstream_history
        .iter()
        .map(|u| u.contains("10.0.1.1:8080 down;"))
        .collect();
    assert_eq!(
        downs,
        [true, false, true, false],
        "{:#?}",
        w.upstream_history
    );
    assert!(!w.upstream.contains("weight"), "{}", w.upstream);
    drop(w);
    let last = last_saved(&world);
    assert_eq!(last.status, Status::RolledBack);
    assert_eq!(
        progress(&last),
        [Progress::RolledBack, Progress::Pending, Progress::Pending]
    );
}
