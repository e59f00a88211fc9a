//! Rolling rollouts end to end on a real local fleet: the `roller` binary against real sshd,
//! nginx and JVM processes on loopback, with steady GET and POST traffic through nginx.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use roller_fleet::{Behaviour, Fleet, FleetSpec, JarSpec, Load, LoadReport};
use serde_json::Value;

/// A whole rollout, JVM restarts included, stays well inside this on a 2-core machine.
const ROLLOUT_DEADLINE: Duration = Duration::from_secs(240);
const LOAD_CLIENTS: usize = 4;

struct Run {
    code: Option<i32>,
    /// Every JSON line roller printed.
    lines: Vec<Value>,
    stderr: String,
}

impl Run {
    fn report(&self) -> &Value {
        self.lines
            .iter()
            .rev()
            .find(|l| l["event"] == "report")
            .map(|l| &l["report"])
            .unwrap_or_else(|| panic!("no report in {:?}\n{}", self.lines, self.stderr))
    }

    fn error(&self) -> &Value {
        self.lines
            .iter()
            .find(|l| l["event"] == "error")
            .unwrap_or_else(|| panic!("no error in {:?}\n{}", self.lines, self.stderr))
    }

    /// Targets that had a step of `phase` started.
    fn touched(&self, phase: &str) -> BTreeSet<String> {
        self.lines
            .iter()
            .filter(|l| l["event"] == "step")
            .filter(|l| l["step"]["phase"] == phase && l["step"]["state"] == "started")
            .map(|l| l["step"]["target"].as_str().unwrap().to_string())
            .collect()
    }
}

fn roller(args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_roller"))
        .args(args)
        .args(["--output", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start roller");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let err = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let status = roller_fleet::proc::wait_child(&mut child, ROLLOUT_DEADLINE);
    if status.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stdout = out.join().unwrap();
    let stderr = err.join().unwrap();
    let status = status.unwrap_or_else(|e| panic!("roller did not finish: {e}\n{stderr}"));
    let lines = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    Run {
        code: status.code(),
        lines,
        stderr,
    }
}

fn rollout(inventory: &Path, jar: &Path, release: &str, batch: &str) -> Run {
    roller(&[
        "rollout",
        "--inventory",
        inventory.to_str().unwrap(),
        "--artifact",
        jar.to_str().unwrap(),
        "--release",
        release,
        "--batch",
        batch,
    ])
}

/// The fleet's inventory with some keys replaced, written beside it.
fn inventory_with(fleet: &Fleet, edits: &[(&str, &str, toml::Value)]) -> PathBuf {
    let text = std::fs::read_to_string(fleet.inventory_path()).unwrap();
    let mut doc: toml::Table = text.parse().unwrap();
    for (section, key, value) in edits {
        doc[*section]
            .as_table_mut()
            .unwrap()
            .insert(key.to_string(), value.clone());
    }
    let path = fleet.root().join("inventory-edited.toml");
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    path
}

fn start_load(fleet: &Fleet) -> Load {
    let load = Load::start(&fleet.lb_url(), LOAD_CLIENTS);
    assert!(
        load.wait_for_requests(50, Duration::from_secs(30)),
        "traffic through nginx never got going"
    );
    load
}

fn assert_no_failed_requests(report: &LoadReport) {
    assert!(
        report.ok > 100,
        "too little traffic to prove anything: {report:?}"
    );
    assert_eq!(report.failed, 0, "failed requests: {:#?}", report.failures);
}

/// Every host is on `release`, serves `version`, is healthy and in the pool, and nginx
/// serves only `version`.
fn assert_fleet_on(fleet: &Fleet, release: &str, version: &str) {
    for host in fleet.host_names() {
        assert_eq!(
            fleet.live_release(&host).as_deref(),
            Some(release),
            "{host} live release"
        );
        assert_eq!(
            fleet.app_version(&host).as_deref(),
            Some(version),
            "{host} runs"
        );
        assert_eq!(fleet.app_health(&host), Some(200), "{host} health");
    }
    assert_eq!(
        fleet.upstream_text().matches(" down").count(),
        0,
        "{}",
        fleet.upstream_text()
    );
    let served = Load::start(&fleet.lb_url(), 2);
    assert!(served.wait_for_requests(40, Duration::from_secs(30)));
    let served = served.stop();
    assert_eq!(served.failed, 0, "{:?}", served.failures);
    assert_eq!(
        served.versions.keys().cloned().collect::<Vec<_>>(),
        vec![version.to_string()],
        "nginx serves {:?}",
        served.versions
    );
}

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
    // Give web-2's entry the load balancer's key: a different, valid key for that address.
    let known_hosts = std::fs::read_to_string(fleet.known_hosts_path()).unwrap();
    let web2 = fleet.host_address("web-2");
    let lb_key = known_hosts
        .lines()
        .find(|l| l.starts_with(&format!("[{}]", fleet.lb_address())))
        .and_then(|l| l.split_once(' '))
        .map(|(_, key)| key.to_string())
        .unwrap();
    let tampered: Vec<String> = known_hosts
        .lines()
        .map(|l| match l.split_once(' ') {
            Some((host, _)) if host.starts_with(&format!("[{web2}]")) => format!("{host} {lb_key}"),
            _ => l.to_string(),
        })
        .collect();
    std::fs::write(fleet.known_hosts_path(), tampered.join("\n") + "\n").unwrap();

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
