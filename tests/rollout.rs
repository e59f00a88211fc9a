//! Rolling rollouts end to end on a real local fleet: the `roller` binary against real sshd,
//! nginx and JVM processes on loopback, with steady GET and POST traffic through nginx.

mod e2e;

use std::collections::BTreeSet;

use e2e::*;
use roller_fleet::{Behaviour, Fleet, FleetSpec, JarSpec};

fn rolls_v2_under_load(test: &str, hosts: usize, batch: &str, batches: usize) {
    let fleet = Fleet::up(FleetSpec::for_test(test, hosts)).unwrap();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let load = start_load(&fleet);

    let run = rollout(&fleet.inventory_path(), &v2, "v2", batch);
    let traffic = load.stop();

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let report = run.report();
    assert_eq!(report["outcome"], "succeeded");
    for host in report["hosts"].as_array().unwrap() {
        assert_eq!(host["outcome"], "updated");
        assert_eq!(host["in_pool"], true);
        assert_eq!(host["release"], "v2");
    }
    let batch_numbers: BTreeSet<u64> = run
        .lines
        .iter()
        .filter_map(|l| l["step"]["batch"].as_u64())
        .collect();
    assert_eq!(batch_numbers.len(), batches);
    assert_no_failed_requests(&traffic);
    // Both versions served during the rollout: traffic really flowed through it.
    assert!(traffic.versions.contains_key("v1") && traffic.versions.contains_key("v2"));
    assert_fleet_on(&fleet, "v2", "v2");
}

#[test]
fn rolls_v1_to_v2_one_host_at_a_time_without_failing_a_request() {
    rolls_v2_under_load("batch1", 3, "1", 3);
}

#[test]
fn rolls_v1_to_v2_two_hosts_at_a_time_without_failing_a_request() {
    rolls_v2_under_load("batch2", 4, "2", 2);
}

fn a_bad_release_is_rolled_back(test: &str, behaviour: Behaviour) {
    let fleet = Fleet::up(FleetSpec::for_test(test, 3)).unwrap();
    let bad = fleet
        .jar(&JarSpec::healthy("v2-bad").with_behaviour(behaviour))
        .unwrap();
    let inventory = inventory_with(&fleet, &[("health", "timeout", "4s".into())]);
    let load = start_load(&fleet);

    let run = rollout(&inventory, &bad, "v2", "1");
    let traffic = load.stop();

    assert_eq!(run.code, Some(4), "{}", run.stderr);
    let report = run.report();
    assert_eq!(report["outcome"], "rolled-back");
    assert_eq!(report["failure"]["batch"], 1);
    assert_eq!(report["failure"]["host"], "web-1");
    assert_eq!(report["failure"]["step"], "health-check");
    let outcomes: Vec<(&str, &str, bool)> = report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap(),
                h["outcome"].as_str().unwrap(),
                h["in_pool"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("web-1", "rolled-back", true),
            ("web-2", "untouched", true),
            ("web-3", "untouched", true)
        ]
    );
    // Later batches were never switched or restarted.
    assert_eq!(run.touched("switch"), BTreeSet::from(["web-1".to_string()]));
    assert_eq!(
        run.touched("restart"),
        BTreeSet::from(["web-1".to_string()])
    );
    assert_no_failed_requests(&traffic);
    assert_fleet_on(&fleet, "v1", "v1");
}

#[test]
fn a_release_that_never_turns_healthy_is_rolled_back_without_failing_a_request() {
    a_bad_release_is_rolled_back("never-healthy", Behaviour::NeverHealthy);
}

#[test]
fn a_release_that_crashes_at_start_is_rolled_back_without_failing_a_request() {
    a_bad_release_is_rolled_back("crash", Behaviour::CrashOnStart);
}

#[test]
fn a_failing_nginx_test_stops_the_rollout_before_anything_is_drained() {
    let fleet = Fleet::up(FleetSpec::for_test("nginx-t", 2)).unwrap();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let upstream_before = fleet.upstream_text();
    // A configuration error elsewhere in nginx's config: `nginx -t` fails, nginx keeps serving.
    let conf = fleet.root().join("lb/nginx/nginx.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("\nthis_is_not_a_directive on;\n");
    std::fs::write(&conf, text).unwrap();

    let run = rollout(&fleet.inventory_path(), &v2, "v2", "1");

    assert_eq!(run.code, Some(3), "{}", run.stderr);
    let error = run.error();
    assert_eq!(error["error"]["kind"], "preflight");
    let failure = &error["error"]["failures"][0];
    assert_eq!(failure["host"], fleet.lb_address());
    assert!(
        failure["message"]
            .as_str()
            .unwrap()
            .contains("this_is_not_a_directive"),
        "{failure}"
    );
    assert!(run.touched("remove-from-pool").is_empty());
    assert!(run.touched("stage").is_empty());
    assert_eq!(fleet.upstream_text(), upstream_before);
    for host in fleet.host_names() {
        assert_eq!(fleet.live_release(&host).as_deref(), Some("v1"));
    }
}

#[test]
fn a_host_whose_key_does_not_match_known_hosts_is_refused_before_anything_changes() {
    let fleet = Fleet::up(FleetSpec::for_test("hostkey", 2)).unwrap();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let upstream_before = fleet.upstream_text();
    give_host_the_lb_key(&fleet, "web-2");

    let run = rollout(&fleet.inventory_path(), &v2, "v2", "1");

    assert_eq!(run.code, Some(3), "{}", run.stderr);
    let failures = run.error()["error"]["failures"].as_array().unwrap().clone();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0]["host"], "web-2");
    assert_eq!(failures[0]["step"], "connect");
    assert!(
        failures[0]["message"]
            .as_str()
            .unwrap()
            .contains("does not match"),
        "{}",
        failures[0]
    );
    assert!(run.lines.iter().all(|l| l["event"] != "step"));
    assert_eq!(fleet.upstream_text(), upstream_before);
    for host in fleet.host_names() {
        assert_eq!(fleet.live_release(&host).as_deref(), Some("v1"));
        assert!(!fleet.host_dir(&host).join("shop/releases/v2").exists());
    }
}

#[test]
fn a_pid_file_or_a_reload_that_does_not_reach_nginx_is_refused_naming_the_load_balancer() {
    let fleet = Fleet::up(FleetSpec::for_test("not-nginx", 2)).unwrap();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let upstream_before = fleet.upstream_text();
    let nothing_changed = |run: &e2e::Run| {
        assert_eq!(fleet.upstream_text(), upstream_before, "{}", run.stderr);
        for host in fleet.host_names() {
            assert_eq!(fleet.live_release(&host).as_deref(), Some("v1"));
        }
        assert!(run.touched("switch").is_empty());
    };

    // A live process, but not nginx's master: web-1's sshd.
    let pid_file = fleet.root().join("not-nginx.pid");
    std::fs::write(&pid_file, format!("{}\n", fleet.sshd_pid("web-1"))).unwrap();
    let inv = inventory_with(
        &fleet,
        &[(
            "balancer",
            "pid_file",
            pid_file.to_string_lossy().into_owned().into(),
        )],
    );
    let run = rollout(&inv, &v2, "v2", "1");
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    let failure = &run.error()["error"]["failures"][0];
    assert_eq!(failure["host"], fleet.lb_address());
    assert!(
        failure["message"]
            .as_str()
            .unwrap()
            .contains("check balancer.pid_file"),
        "{failure}"
    );
    assert!(run.touched("remove-from-pool").is_empty());
    nothing_changed(&run);

    // A reload command that succeeds without signalling nginx: the first pool change notices
    // that the old workers still run, puts the old file back and stops there.
    let inv = inventory_with(&fleet, &[("balancer", "reload", "true".into())]);
    let run = rollout(&inv, &v2, "v2", "1");
    let failure = &run.report()["failure"];
    assert_eq!(failure["host"], fleet.lb_address(), "{}", run.stderr);
    assert_eq!(failure["step"], "remove-from-pool");
    assert!(
        failure["message"]
            .as_str()
            .unwrap()
            .contains("nginx did not reload"),
        "{failure}"
    );
    nothing_changed(&run);
    assert_eq!(run.code, Some(4), "{}", run.stderr);
    for host in run.report()["hosts"].as_array().unwrap() {
        assert_eq!(host["in_pool"], true, "{host}");
    }
}

/// The light stand-in that large local fleets run instead of a JVM keeps the same contract:
/// a rollout across it under load fails no request and leaves every host on the release.
#[test]
fn rolls_out_across_a_light_fleet_without_failing_a_request() {
    let fleet = Fleet::up(FleetSpec::for_test("light", 3).with_light_apps()).unwrap();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let load = start_load(&fleet);

    let run = rollout(&fleet.inventory_path(), &v2, "v2", "1");
    let traffic = load.stop();

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_no_failed_requests(&traffic);
    assert!(traffic.versions.contains_key("v1") && traffic.versions.contains_key("v2"));
    assert_fleet_on(&fleet, "v2", "v2");
    for host in fleet.host_names() {
        let pid = fleet.app_pid(&host).unwrap();
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(cmdline.contains("light-app.py"), "{host} runs {cmdline:?}");
    }
}
