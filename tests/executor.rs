//! The executor's decisions (order, rollback, reporting) over an in-memory fleet: what a real
//! server would add here is only latency.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use roller::balancer::Nginx;
use roller::error::Error;
use roller::executor::{self, Executor};
use roller::health::HttpOverSsh;
use roller::inventory::Inventory;
use roller::plan::{Artifact, BatchSize, Plan, PlanInput};
use roller::report::{Event, HostOutcome, Outcome, Reporter, RolloutReport, StepState};
use roller::transport::TransportError;
use roller::transport::memory::{Call, MemoryFleet, fail, ok};

const INVENTORY: &str = r#"
[ssh]
user = "deploy"
known_hosts = "/dev/null"
[app]
name = "shop"
dir = "/opt/shop"
restart = "restart-app"
port = 8080
[health]
interval = "1ms"
timeout = "20ms"
[balancer]
hosts = ["lb-1"]
upstream_file = "/etc/nginx/conf.d/shop.conf"
drain_timeout = "2s"
[[hosts]]
name = "web-1"
address = "10.0.1.1"
[[hosts]]
name = "web-2"
address = "10.0.1.2"
[[hosts]]
name = "web-3"
address = "10.0.1.3"
"#;

/// What the fake hosts know: the live release per host, the release each running process
/// serves, which releases answer their health check, the LB's upstream file.
#[derive(Default)]
struct World {
    current: HashMap<String, String>,
    running: HashMap<String, String>,
    healthy: Vec<String>,
    upstream: String,
    in_flight: Vec<u64>,
    lb_test_fails: bool,
    /// Every upstream file the LB was given, in order.
    upstream_history: Vec<String>,
}

fn fleet(world: Arc<Mutex<World>>) -> MemoryFleet {
    let w = world.clone();
    let exec = move |target: &str, cmd: &str, stdin: Option<&bytes::Bytes>| {
        let mut w = w.lock().unwrap();
        if cmd.contains("free_kb") {
            let cur = w.current.get(target).cloned().unwrap_or_default();
            return ok(&format!("free_kb=9999999\ncurrent=releases/{cur}\n"));
        }
        if cmd.contains("is not running") && !cmd.contains(".roller-new") {
            return if w.lb_test_fails {
                fail(1, "nginx: [emerg] unknown directive \"upstrem\"")
            } else {
                ok("")
            };
        }
        if cmd.contains(".roller-new") {
            let content = String::from_utf8(stdin.unwrap().to_vec()).unwrap();
            w.upstream = content.clone();
            w.upstream_history.push(content);
            return ok("");
        }
        if cmd.starts_with("ss -Htn") {
            let n = if w.in_flight.is_empty() {
                0
            } else {
                w.in_flight.remove(0)
            };
            return ok(&format!("{n}\n"));
        }
        if cmd.contains("echo present") {
            return ok("absent\n");
        }
        if cmd.contains(".app.jar.part") {
            return ok("");
        }
        if cmd.contains("mv -T .roller/current.new current") && cmd.contains("ln -sfn releases/v2")
        {
            let prev = w.current.insert(target.to_string(), "v2".into()).unwrap();
            w.current.insert(format!("{target}.previous"), prev);
            return ok("");
        }
        if cmd.contains("no previous release recorded") {
            let prev = w.current[&format!("{target}.previous")].clone();
            w.current.insert(target.to_string(), prev.clone());
            return ok(&format!("releases/{prev}\n"));
        }
        if cmd == "restart-app" {
            let live = w.current[target].clone();
            w.running.insert(target.to_string(), live);
            return ok("");
        }
        if cmd.contains("tail -n +") {
            return ok("");
        }
        panic!("unexpected command on {target}: {cmd}");
    };
    let w = world.clone();
    let http = move |target: &str, _addr: &str, _port: u16, _path: &str| {
        let w = w.lock().unwrap();
        match w.running.get(target) {
            Some(r) if w.healthy.contains(r) => Ok(200),
            Some(_) => Ok(503),
            None => Err(TransportError::Channel("connection refused".into())),
        }
    };
    MemoryFleet::new(exec, http)
}

fn world() -> Arc<Mutex<World>> {
    let mut w = World::default();
    for h in ["web-1", "web-2", "web-3"] {
        w.current.insert(h.into(), "v1".into());
        w.running.insert(h.into(), "v1".into());
    }
    w.healthy = vec!["v1".into(), "v2".into()];
    Arc::new(Mutex::new(w))
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Event>>);

impl Reporter for Recorder {
    fn event(&self, event: &Event) {
        self.0.lock().unwrap().push(event.clone());
    }
}

fn artifact() -> Artifact {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shop.jar");
    std::fs::write(&path, b"PK\x03\x04 not really a jar").unwrap();
    Artifact::load(&path).unwrap()
}

async fn rollout(
    fleet: &MemoryFleet,
    batch: BatchSize,
) -> (Result<RolloutReport, Error>, Arc<Recorder>) {
    let inventory = Inventory::parse(INVENTORY).unwrap();
    let balancer = Nginx::new(&inventory.balancer, &inventory.app, &inventory.hosts);
    let plan = Plan::build(PlanInput {
        inventory: &inventory,
        balancer: &balancer,
        release: "v2".into(),
        artifact: Some(artifact()),
        batch,
    })
    .unwrap();
    let recorder = Arc::new(Recorder::default());
    let sessions = match executor::connect(&plan, 22, fleet).await {
        Ok(s) => s,
        Err(e) => return (Err(e), recorder),
    };
    let exec = Executor::new(&plan, &balancer, &HttpOverSsh, sessions, recorder.clone());
    (exec.run().await, recorder)
}

fn releases(world: &Arc<Mutex<World>>) -> Vec<(String, String)> {
    let w = world.lock().unwrap();
    ["web-1", "web-2", "web-3"]
        .iter()
        .map(|h| (w.current[*h].clone(), w.running[*h].clone()))
        .collect()
}

#[tokio::test]
async fn a_good_release_reaches_every_host_one_batch_at_a_time() {
    let world = world();
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    let report = result.unwrap();

    assert_eq!(report.outcome, Outcome::Succeeded);
    assert!(
        report
            .hosts
            .iter()
            .all(|h| h.outcome == HostOutcome::Updated && h.in_pool)
    );
    assert_eq!(releases(&world), vec![("v2".into(), "v2".into()); 3]);
    let w = world.lock().unwrap();
    // Out and back in once per batch, one host down at a time, ending with all in.
    assert_eq!(w.upstream_history.len(), 6);
    for (i, content) in w.upstream_history.iter().enumerate() {
        let downs = content.matches(" down;").count();
        assert_eq!(downs, if i % 2 == 0 { 1 } else { 0 }, "{content}");
    }
    assert!(w.upstream_history[2].contains("10.0.1.2:8080 down;"));
    assert!(!w.upstream.contains("down"));
}

#[tokio::test]
async fn within_a_batch_the_host_changes_only_after_it_left_the_pool_and_drained() {
    let world = world();
    world.lock().unwrap().in_flight = vec![3, 1, 0];
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    assert_eq!(result.unwrap().outcome, Outcome::Succeeded);

    let calls = fleet.calls();
    let position = |pred: &dyn Fn(&Call) -> bool| calls.iter().position(pred).unwrap();
    let exec_on = |target: &'static str, marker: &'static str| move |c: &Call| matches!(c, Call::Exec { target: t, command, .. } if t == target && command.contains(marker));
    let removed = position(&exec_on("lb-1", ".roller-new"));
    let drained_polls = calls
        .iter()
        .filter(|c| matches!(c, Call::Exec { command, .. } if command.starts_with("ss -Htn")))
        .count();
    let last_poll_of_batch_1 = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| matches!(c, Call::Exec { command, .. } if command.starts_with("ss -Htn")))
        .map(|(i, _)| i)
        .nth(2)
        .unwrap();
    let switched = position(&exec_on("web-1", "mv -T"));
    let restarted = position(
        &|c: &Call| matches!(c, Call::Exec { target, command, .. } if target == "web-1" && command == "restart-app"),
    );
    let checked =
        position(&|c: &Call| matches!(c, Call::HttpGet { target, .. } if target == "web-1"));
    assert!(removed < last_poll_of_batch_1 && last_poll_of_batch_1 < switched);
    assert!(switched < restarted && restarted < checked);
    // 3 polls for batch 1 (3, 1, 0), then 1 each for the other batches.
    assert_eq!(drained_polls, 5);
}

#[tokio::test]
async fn an_unhealthy_release_is_rolled_back_in_its_batch_and_goes_no_further() {
    let world = world();
    world.lock().unwrap().healthy = vec!["v1".into()];
    let fleet = fleet(world.clone());
    let (result, events) = rollout(&fleet, BatchSize::Hosts(1)).await;
    let report = result.unwrap();

    assert_eq!(report.outcome, Outcome::RolledBack);
    let failure = report.failure.as_ref().unwrap();
    assert_eq!((failure.batch, failure.failure.host.as_str()), (1, "web-1"));
    assert_eq!(failure.failure.step, "health-check");
    assert!(failure.failure.message.contains("HTTP 503"), "{failure:?}");
    let outcomes: Vec<_> = report
        .hosts
        .iter()
        .map(|h| (h.outcome, h.in_pool))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (HostOutcome::RolledBack, true),
            (HostOutcome::Untouched, true),
            (HostOutcome::Untouched, true)
        ]
    );
    assert_eq!(report.hosts[0].release.as_deref(), Some("v1"));
    assert_eq!(releases(&world), vec![("v1".into(), "v1".into()); 3]);
    assert!(!world.lock().unwrap().upstream.contains("down"));
    // Later batches were never touched beyond pre-flight and staging.
    for host in ["web-2", "web-3"] {
        assert!(
            fleet
                .commands(host)
                .iter()
                .all(|c| !c.contains("mv -T") && c != "restart-app"),
            "{host} was changed"
        );
    }
    assert!(
        events
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.state == StepState::Failed)
    );
}

#[tokio::test]
async fn a_host_that_cannot_be_restored_stays_out_of_the_pool_and_is_reported() {
    let world = world();
    world.lock().unwrap().healthy = vec![];
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    let report = result.unwrap();

    assert_eq!(report.outcome, Outcome::RollbackIncomplete);
    assert_eq!(report.hosts[0].outcome, HostOutcome::Failed);
    assert!(!report.hosts[0].in_pool);
    assert!(
        world
            .lock()
            .unwrap()
            .upstream
            .contains("10.0.1.1:8080 down;")
    );
    assert_eq!(report.recovery.len(), 1);
    assert!(
        report.recovery[0].contains("web-1"),
        "{:?}",
        report.recovery
    );
    assert!(report.recovery[0].contains("/etc/nginx/conf.d/shop.conf"));
}

#[tokio::test]
async fn a_changed_host_key_stops_everything_before_any_command() {
    let world = world();
    let fleet = fleet(world.clone()).refuse(
        "web-2",
        TransportError::HostKeyChanged {
            host: "10.0.1.2".into(),
            fingerprint: "SHA256:abc".into(),
            known_hosts: "/dev/null".into(),
            line: 3,
        },
    );
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    match result {
        Err(Error::Preflight { failures }) => {
            assert_eq!(failures.len(), 1);
            assert_eq!(failures[0].host, "web-2");
            assert!(failures[0].message.contains("does not match"));
        }
        other => panic!("expected a pre-flight failure, got {other:?}"),
    }
    assert!(fleet.calls().is_empty());
}

#[tokio::test]
async fn a_failing_nginx_test_stops_everything_before_a_host_leaves_the_pool() {
    let world = world();
    world.lock().unwrap().lb_test_fails = true;
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    match result {
        Err(Error::Preflight { failures }) => {
            assert_eq!(failures[0].host, "lb-1");
            assert!(failures[0].message.contains("unknown directive"));
        }
        other => panic!("expected a pre-flight failure, got {other:?}"),
    }
    assert!(world.lock().unwrap().upstream_history.is_empty());
    assert!(fleet.commands("web-1").iter().all(|c| !c.contains(".part")));
}

#[tokio::test]
async fn a_drain_that_never_ends_fails_the_batch_without_touching_the_host() {
    let world = world();
    world.lock().unwrap().in_flight = vec![1; 1000];
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(2)).await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::RolledBack);
    assert_eq!(report.failure.as_ref().unwrap().failure.step, "drain");
    assert!(fleet.commands("web-1").iter().all(|c| c != "restart-app"));
    assert!(!world.lock().unwrap().upstream.contains("down"));
    assert_eq!(releases(&world), vec![("v1".into(), "v1".into()); 3]);
}
