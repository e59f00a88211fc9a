//! Blue-green and canary releases end to end on a real local fleet, with steady load through
//! nginx.

mod e2e;

use std::collections::BTreeMap;
use std::time::Duration;

use e2e::*;
use roller_fleet::{Behaviour, Fleet, FleetSpec, JarSpec, Load, LoadReport, Mode};

fn blue_green(test: &str, hosts: usize) -> Fleet {
    Fleet::up(FleetSpec::for_test(test, hosts).with_mode(Mode::BlueGreen)).unwrap()
}

fn slot_pids(fleet: &Fleet, slot: &str) -> Vec<Option<u32>> {
    fleet
        .host_names()
        .iter()
        .map(|h| fleet.slot_pid(h, slot))
        .collect()
}

/// With the fleet's default `keep_old` (10 minutes): the release returns as soon as traffic
/// moved, the old slots keep serving the old release, and `roller switch-back` right after is
/// one reload with nothing lost. The timer must detach from the SSH session even where the
/// login shell is bash; a timer that held the channel would keep the release waiting.
#[test]
fn a_blue_green_release_moves_all_traffic_at_once_and_switch_back_is_one_reload() {
    let fleet = blue_green("bg", 2);
    let inv = fleet.inventory_path();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let blue_before = slot_pids(&fleet, "blue");
    let load = start_load(&fleet);

    let run = rollout(&inv, &v2, "v2", "1");
    let traffic = load.stop();

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_no_failed_requests(&traffic);
    assert_eq!(fleet.live_slot().as_deref(), Some("green"));
    // One pool change per load balancer: all hosts moved together.
    assert_eq!(run.touched("switch-traffic").len(), 1);
    assert_fleet_on(&fleet, "v2", "v2");
    // Scheduling the stop of the old slots returned at once on every host. A timer that held
    // the SSH session would hold it for the whole keep_old (10 minutes here), so a bound of
    // seconds tells the two apart even on a loaded machine.
    let keep_old: Vec<&serde_json::Value> = run
        .lines
        .iter()
        .filter(|l| l["step"]["phase"] == "keep-old" && l["step"]["state"] == "succeeded")
        .collect();
    assert_eq!(keep_old.len(), 2, "{:#?}", run.lines);
    for step in keep_old {
        assert!(
            step["step"]["elapsed_ms"].as_u64().unwrap() < 10_000,
            "keep-old held its SSH session: {step}"
        );
    }
    // The old slots still run, untouched, for an instant switch-back.
    assert_eq!(slot_pids(&fleet, "blue"), blue_before);
    for host in fleet.host_names() {
        assert_eq!(fleet.slot_version(&host, "blue").as_deref(), Some("v1"));
    }

    let reloads = fleet.nginx_reloads();
    let load = start_load(&fleet);
    let back = admin("switch-back", &inv, &[]);
    let after_switch = fleet.access_log_len();
    // Judged from nginx's log, not the client's count: a response can reach the client before
    // nginx has written its log line.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while fleet.served_since(after_switch).len() < 50 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let traffic = load.stop();

    assert_eq!(back.code, Some(0), "{}", back.stderr);
    assert_no_failed_requests(&traffic);
    assert_eq!(fleet.live_slot().as_deref(), Some("blue"));
    assert_eq!(
        fleet.nginx_reloads(),
        reloads + 1,
        "one reload, by nginx's own log"
    );
    // nginx itself sends everything to the blue slots now.
    let blue = format!(":{}", fleet.slot_port("blue"));
    let served = fleet.served_since(after_switch);
    assert!(served.len() >= 50, "{served:?}");
    for (upstream, status) in &served {
        assert!(
            upstream.ends_with(&blue) && *status == 200,
            "{upstream} {status}"
        );
    }
    // The reload is the whole switch: no slot was started or restarted. How long it takes is
    // a speed target for `cargo xtask bench`, not something a loaded test machine can judge.
    assert!(back.touched("start-slot").is_empty());
    assert_eq!(slot_pids(&fleet, "blue"), blue_before, "blue was restarted");
    assert_fleet_on(&fleet, "v1", "v1");
}

#[test]
fn a_new_slot_that_never_turns_healthy_never_gets_traffic() {
    let fleet = blue_green("bg-unhealthy", 2);
    let inv = inventory_with(&fleet, &[("health", "timeout", "4s".into())]);
    let bad = fleet
        .jar(&JarSpec::healthy("v2").with_behaviour(Behaviour::NeverHealthy))
        .unwrap();
    let upstream_before = fleet.upstream_text();
    let load = start_load(&fleet);

    let run = rollout(&inv, &bad, "v2", "1");
    let traffic = load.stop();

    assert_eq!(run.code, Some(4), "{}", run.stderr);
    assert_eq!(run.report()["failure"]["step"], "health-check");
    assert!(run.touched("switch-traffic").is_empty());
    assert_eq!(fleet.upstream_text(), upstream_before);
    assert_eq!(fleet.live_slot().as_deref(), Some("blue"));
    assert_eq!(
        slot_pids(&fleet, "green"),
        vec![None, None],
        "green slots stopped"
    );
    assert_no_failed_requests(&traffic);
    assert_fleet_on(&fleet, "v1", "v1");
}

#[test]
fn the_single_instance_blue_green_setup_releases_without_failing_a_request() {
    // The fleet's single-instance inventory has the shape of the example: nginx and both slots
    // on one host, which is also the only load balancer.
    let example: toml::Table = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/inventory.blue-green-single.example.toml"
    ))
    .unwrap()
    .parse()
    .unwrap();
    let fleet =
        Fleet::up(FleetSpec::for_test("bg-single", 1).with_mode(Mode::BlueGreenSingle)).unwrap();
    let ours: toml::Table = std::fs::read_to_string(fleet.inventory_path())
        .unwrap()
        .parse()
        .unwrap();
    for doc in [&example, &ours] {
        assert_eq!(doc["strategy"].as_str(), Some("blue-green"));
        let hosts = doc["hosts"].as_array().unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0]["address"], doc["balancer"]["hosts"][0]);
    }
    let keys = |doc: &toml::Table| -> Vec<String> {
        doc["blue_green"]
            .as_table()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    assert_eq!(keys(&example), keys(&ours));

    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let load = start_load(&fleet);
    let run = rollout(&fleet.inventory_path(), &v2, "v2", "1");
    let traffic = load.stop();

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_no_failed_requests(&traffic);
    assert_eq!(fleet.live_slot().as_deref(), Some("green"));
    assert_fleet_on(&fleet, "v2", "v2");
}

fn versions_between(before: &LoadReport, after: &LoadReport) -> BTreeMap<String, u64> {
    after
        .versions
        .iter()
        .map(|(v, n)| (v.clone(), n - before.versions.get(v).copied().unwrap_or(0)))
        .collect()
}

#[test]
fn canary_weights_show_in_its_share_of_requests_and_a_good_canary_is_promoted() {
    let fleet = Fleet::up(FleetSpec::for_test("canary", 4)).unwrap();
    let inv = canary_inventory(
        &fleet,
        &[
            ("weights", toml::Value::Array(vec![25.into(), 100.into()])),
            ("hold", "6s".into()),
            ("min_requests", 10.into()),
        ],
    );
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let load = Load::start(&fleet.lb_url(), LOAD_CLIENTS);
    assert!(load.wait_for_requests(50, Duration::from_secs(30)));
    let lb = fleet.lb_address();

    let mut running = Running::start(&rollout_args(&inv, &v2, "v2", "1", &[]));
    running.wait_for_step("set-weight", &lb, "succeeded");
    let start = load.snapshot();
    running.wait_for_step("observe", &lb, "succeeded");
    let end = load.snapshot();
    let run = running.finish();
    let traffic = load.stop();

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    // One canary at 25% of its fair share among three hosts at 100%: 25 / 325 of requests.
    let during = versions_between(&start, &end);
    let total: u64 = during.values().sum();
    let share = during.get("v2").copied().unwrap_or(0) as f64 / total as f64;
    let expected = 25.0 / 325.0;
    assert!(total > 200, "too few requests in the hold: {during:?}");
    assert!(
        (share - expected).abs() < 0.04,
        "canary served {:.1}% of {total} requests, expected {:.1}% ± 4",
        share * 100.0,
        expected * 100.0
    );
    // Promoted: the rest of the fleet followed.
    assert_no_failed_requests(&traffic);
    let verdicts: Vec<&str> = run.report()["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .filter(|n| n.contains("observe"))
        .collect();
    assert_eq!(verdicts.len(), 2, "{verdicts:?}");
    assert_fleet_on(&fleet, "v2", "v2");
}

#[test]
fn a_canary_answering_5xx_is_caught_by_the_analysis_and_rolled_back() {
    let fleet = Fleet::up(FleetSpec::for_test("canary-bad", 3)).unwrap();
    let inv = canary_inventory(
        &fleet,
        &[
            ("weights", toml::Value::Array(vec![50.into(), 100.into()])),
            ("hold", "4s".into()),
            ("min_requests", 10.into()),
        ],
    );
    let bad = fleet
        .jar(&JarSpec::healthy("v2").with_behaviour(Behaviour::Errors { percent: 30 }))
        .unwrap();
    let load = start_load(&fleet);

    let run = rollout(&inv, &bad, "v2", "1");
    let traffic = load.stop();

    assert_eq!(run.code, Some(4), "{}", run.stderr);
    let failure = &run.report()["failure"];
    assert_eq!(failure["step"], "observe");
    assert!(
        failure["message"].as_str().unwrap().contains("5xx rate"),
        "{failure}"
    );
    // Only the first weight was reached, and only the canary was ever changed.
    assert_eq!(run.touched("switch").len(), 1);
    assert!(run.touched("return-to-pool").len() <= 1);
    // The failed requests are the canary's own 500s; none came from the rollout itself.
    assert!(traffic.failed > 0);
    assert!(
        traffic
            .failures
            .iter()
            .all(|f| f.contains("status 500") && f.contains("v2")),
        "{:#?}",
        traffic.failures
    );
    assert!(
        !fleet.upstream_text().contains("weight"),
        "{}",
        fleet.upstream_text()
    );
    assert_fleet_on(&fleet, "v1", "v1");
}

#[test]
fn pause_waits_for_roller_promote() {
    let fleet = Fleet::up(FleetSpec::for_test("canary-pause", 2)).unwrap();
    let inv = canary_inventory(
        &fleet,
        &[
            ("weights", toml::Value::Array(vec![100.into()])),
            ("hold", "2s".into()),
            ("min_requests", 5.into()),
        ],
    );
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let load = start_load(&fleet);

    let mut running = Running::start(&rollout_args(&inv, &v2, "v2", "1", &["--pause"]));
    running.wait_for_step("await-decision", &fleet.lb_address(), "started");
    assert_eq!(fleet.live_release("web-2").as_deref(), Some("v1"));
    let promoted = admin("promote", &inv, &[]);
    assert_eq!(promoted.code, Some(0), "{}", promoted.stderr);
    let run = running.finish();
    let traffic = load.stop();

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_no_failed_requests(&traffic);
    assert_fleet_on(&fleet, "v2", "v2");
}
