//! Never strand a host: the deploy lock, interruption, a killed controller, failure policies and
//! the capacity guard, end to end on a real local fleet. Each test ends by checking that every
//! host is on a known release, healthy and in the pool (unless the policy says otherwise).

mod e2e;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use e2e::*;
use roller_fleet::{Behaviour, Fleet, FleetSpec, JarSpec};

fn lock_file(fleet: &Fleet) -> PathBuf {
    fleet
        .upstream_file()
        .parent()
        .unwrap()
        .join(".roller/shop.lock")
}

/// A release that takes a while to turn healthy, so a test can act while it does.
fn slow(fleet: &Fleet, version: &str, delay_ms: u64) -> PathBuf {
    fleet
        .jar(&JarSpec::healthy(version).with_startup_delay(Duration::from_millis(delay_ms)))
        .unwrap()
}

#[test]
fn a_second_rollout_is_refused_while_the_first_runs_and_lock_wait_queues_behind_it() {
    let fleet = Fleet::up(FleetSpec::for_test("lock", 2)).unwrap();
    let inv = fleet.inventory_path();
    let v2 = slow(&fleet, "v2", 3000);
    let v3 = fleet.jar(&JarSpec::healthy("v3")).unwrap();

    let mut first = Running::start(&rollout_args(&inv, &v2, "v2", "1", &[]));
    first.wait_for_step("preflight", "web-1", "started");

    let asked = Instant::now();
    let second = roller(&rollout_args(&inv, &v3, "v3", "1", &[]));
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(second.code, Some(7), "{}", second.stderr);
    let message = second.error()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains(&format!("pid {}", first.pid())),
        "{message}"
    );
    assert!(message.contains("rolling out v2"), "{message}");

    let third = Running::start(&rollout_args(&inv, &v3, "v3", "1", &["--lock-wait", "4m"]));
    let first = first.finish();
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    let third = third.finish();
    assert_eq!(third.code, Some(0), "{}", third.stderr);
    assert_fleet_on(&fleet, "v3", "v3");
    assert!(!lock_file(&fleet).exists());
}

#[test]
fn an_expired_lease_is_taken_over_and_said_so() {
    let fleet = Fleet::up(FleetSpec::for_test("expired", 2)).unwrap();
    let lock = lock_file(&fleet);
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    std::fs::write(
        &lock,
        "token=0123456789abcdef0123456789abcdef\nowner=ghost@gone\npid=4242\nrelease=v0\nstarted=1000\nlease_until=1060\n",
    )
    .unwrap();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();

    let run = rollout(&fleet.inventory_path(), &v2, "v2", "1");

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("took over an expired deploy lock from ghost@gone"),
        "{}",
        run.stderr
    );
    assert!(!lock.exists());
    let takeovers =
        std::fs::read_to_string(journal_dir(&fleet.inventory_path()).join("shop/locks.jsonl"))
            .unwrap();
    assert!(takeovers.contains("ghost@gone"), "{takeovers}");
    assert_fleet_on(&fleet, "v2", "v2");
}

#[test]
fn sigint_during_a_health_check_rolls_the_batch_back_and_releases_the_lock() {
    let fleet = Fleet::up(FleetSpec::for_test("sigint", 3)).unwrap();
    let inv = inventory_with(&fleet, &[("health", "timeout", "60s".into())]);
    let v2 = slow(&fleet, "v2", 5000);
    let load = start_load(&fleet);

    let mut running = Running::start(&rollout_args(&inv, &v2, "v2", "1", &[]));
    running.wait_for_step("health-check", "web-1", "started");
    running.signal(libc::SIGINT);
    let run = running.finish();
    let traffic = load.stop();

    assert_eq!(run.code, Some(130), "{}", run.stderr);
    let report = run.report();
    assert_eq!(report["outcome"], "interrupted");
    assert!(
        report["notes"][0].as_str().unwrap().contains("rolled back"),
        "{report}"
    );
    assert_no_failed_requests(&traffic);
    assert_fleet_on(&fleet, "v1", "v1");
    assert!(!lock_file(&fleet).exists());

    // Nothing is left in the way of the next rollout.
    let v2b = fleet.jar(&JarSpec::healthy("v2b")).unwrap();
    let again = rollout(&inv, &v2b, "v2b", "1");
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    assert_fleet_on(&fleet, "v2b", "v2b");
}

/// Starts a rollout and SIGKILLs it once batch 1 has left the pool and drained.
fn killed_after_drain(fleet: &Fleet, jar: &std::path::Path) {
    let inv = fleet.inventory_path();
    let mut running = Running::start(&rollout_args(&inv, jar, "v2", "1", &[]));
    running.wait_for_step("drain", &fleet.lb_address(), "succeeded");
    running.signal(libc::SIGKILL);
    let run = running.finish();
    assert_eq!(run.code, None, "roller should have died by SIGKILL");
    // web-1 was stranded out of the pool: the situation resume and recover exist for.
    assert!(
        fleet.upstream_text().contains(" down"),
        "{}",
        fleet.upstream_text()
    );
}

#[test]
fn resume_finishes_a_rollout_whose_controller_was_killed_after_a_drain() {
    let fleet = Fleet::up(FleetSpec::for_test("resume", 3)).unwrap();
    let v2 = slow(&fleet, "v2", 1500);
    let load = start_load(&fleet);
    killed_after_drain(&fleet, &v2);

    let run = admin("resume", &fleet.inventory_path(), &[]);
    let traffic = load.stop();

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.report()["outcome"], "succeeded");
    assert_no_failed_requests(&traffic);
    assert_fleet_on(&fleet, "v2", "v2");
    assert!(!lock_file(&fleet).exists());
    // A second resume has nothing left to do.
    let again = admin("resume", &fleet.inventory_path(), &[]);
    assert_eq!(again.code, Some(3), "{}", again.stderr);
}

#[test]
fn recover_puts_every_host_back_on_the_release_from_before_a_killed_rollout() {
    let fleet = Fleet::up(FleetSpec::for_test("recover", 3)).unwrap();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let inv = fleet.inventory_path();
    let load = start_load(&fleet);
    // Kill it in batch 2, with web-1 already on v2 and web-2 out of the pool.
    let mut running = Running::start(&rollout_args(&inv, &v2, "v2", "1", &[]));
    running.wait_for_step("switch", "web-2", "succeeded");
    running.signal(libc::SIGKILL);
    assert_eq!(running.finish().code, None);
    assert_eq!(fleet.live_release("web-1").as_deref(), Some("v2"));

    let run = admin("recover", &inv, &[]);
    let traffic = load.stop();

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_no_failed_requests(&traffic);
    assert_fleet_on(&fleet, "v1", "v1");
    // The rollout is closed: there is nothing left to resume.
    assert_eq!(admin("resume", &inv, &[]).code, Some(3));
}

#[test]
fn rollback_all_takes_earlier_batches_back_too_without_failing_a_request() {
    let fleet = Fleet::up(FleetSpec::for_test("rollback-all", 3)).unwrap();
    let inv = inventory_with(&fleet, &[("health", "timeout", "5s".into())]);
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let load = start_load(&fleet);

    let mut running = Running::start(&rollout_args(
        &inv,
        &v2,
        "v2",
        "1",
        &["--on-failure", "rollback-all"],
    ));
    // Once web-1 is done, break web-2's copy of the release so batch 2 fails.
    running.wait_for_step("switch", "web-2", "started");
    let jar = fleet.host_dir("web-2").join("shop/releases/v2/app.jar");
    std::fs::write(&jar, b"not a jar any more").unwrap();
    let run = running.finish();
    let traffic = load.stop();

    assert_eq!(run.code, Some(4), "{}", run.stderr);
    assert_eq!(run.report()["failure"]["batch"], 2);
    assert_eq!(
        report_hosts(&run),
        [
            ("web-1".to_string(), "rolled-back".to_string(), true),
            ("web-2".to_string(), "rolled-back".to_string(), true),
            ("web-3".to_string(), "untouched".to_string(), true),
        ]
    );
    assert_no_failed_requests(&traffic);
    assert_fleet_on(&fleet, "v1", "v1");
}

#[test]
fn halt_leaves_the_failed_batch_out_of_the_pool_until_recover() {
    let fleet = Fleet::up(FleetSpec::for_test("halt", 2)).unwrap();
    let inv = inventory_with(&fleet, &[("health", "timeout", "4s".into())]);
    let bad = fleet
        .jar(&JarSpec::healthy("v2").with_behaviour(Behaviour::NeverHealthy))
        .unwrap();
    let load = start_load(&fleet);

    let run = roller(&rollout_args(
        &inv,
        &bad,
        "v2",
        "1",
        &["--on-failure", "halt"],
    ));

    assert_eq!(run.code, Some(6), "{}", run.stderr);
    assert_eq!(run.report()["outcome"], "halted");
    assert_eq!(
        report_hosts(&run),
        [
            ("web-1".to_string(), "halted".to_string(), false),
            ("web-2".to_string(), "untouched".to_string(), true),
        ]
    );
    let recovery = run.report()["recovery"][0].as_str().unwrap().to_string();
    assert!(recovery.contains("roller recover"), "{recovery}");
    assert!(fleet.upstream_text().contains(" down"));
    assert_eq!(fleet.live_release("web-1").as_deref(), Some("v2"));

    let recovered = admin("recover", &inv, &[]);
    let traffic = load.stop();
    assert_eq!(recovered.code, Some(0), "{}", recovered.stderr);
    assert_no_failed_requests(&traffic);
    assert_fleet_on(&fleet, "v1", "v1");
}

#[test]
fn the_capacity_guard_refuses_a_batch_that_would_leave_too_few_healthy_hosts() {
    let fleet = Fleet::up(FleetSpec::for_test("capacity", 3)).unwrap();
    let inv = inventory_with(&fleet, &[("balancer", "min_healthy", 2.into())]);
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let upstream_before = fleet.upstream_text();
    for host in ["web-2", "web-3"] {
        stop_app(&fleet, host);
    }

    let run = rollout(&inv, &v2, "v2", "1");

    assert_eq!(run.code, Some(4), "{}", run.stderr);
    let failure = &run.report()["failure"];
    assert_eq!(failure["step"], "capacity-check");
    assert!(
        failure["message"]
            .as_str()
            .unwrap()
            .contains("below balancer.min_healthy = 2"),
        "{failure}"
    );
    assert!(run.touched("switch").is_empty());
    assert_eq!(fleet.upstream_text(), upstream_before);
    for host in fleet.host_names() {
        assert_eq!(fleet.live_release(&host).as_deref(), Some("v1"));
    }
}

#[test]
fn an_unhealthy_host_is_deployed_first_and_the_rollout_heals_it() {
    let fleet = Fleet::up(FleetSpec::for_test("unhealthy-first", 3)).unwrap();
    let inv = inventory_with(&fleet, &[("balancer", "min_healthy", 2.into())]);
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    stop_app(&fleet, "web-3");

    let run = rollout(&inv, &v2, "v2", "1");

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let first_switch = run
        .lines
        .iter()
        .find(|l| l["step"]["phase"] == "switch" && l["step"]["state"] == "started")
        .unwrap();
    assert_eq!(first_switch["step"]["target"], "web-3");
    assert_fleet_on(&fleet, "v2", "v2");
}

/// Stops a host's JVM by PID, as a crash would, and waits until it is gone.
fn stop_app(fleet: &Fleet, host: &str) {
    let pid = fleet.app_pid(host).expect("app running");
    assert!(roller_fleet::proc::terminate(pid, Duration::from_secs(15)));
    assert_eq!(fleet.app_health(host), None, "{host} still answers");
}

#[test]
fn a_host_whose_sshd_dies_mid_rollout_fails_its_batch_cleanly_without_hanging() {
    let mut fleet = Fleet::up(FleetSpec::for_test("sshd-killed", 3)).unwrap();
    let inv = fleet.inventory_path();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let load = start_load(&fleet);

    let mut running = Running::start(&rollout_args(&inv, &v2, "v2", "1", &[]));
    running.wait_for_step("health-check", "web-1", "started");
    fleet.kill_sshd("web-2");
    let killed = Instant::now();
    let run = running.finish();
    let traffic = load.stop();

    // Unreachable is detected, not waited out: connection refused fails each reconnect fast.
    assert!(
        killed.elapsed() < Duration::from_secs(60),
        "{:?}",
        killed.elapsed()
    );
    assert_eq!(run.code, Some(5), "{}", run.stderr);
    assert_eq!(run.report()["failure"]["batch"], 2);
    assert_eq!(run.report()["failure"]["host"], "web-2");
    assert_eq!(
        report_hosts(&run),
        [
            ("web-1".to_string(), "updated".to_string(), true),
            ("web-2".to_string(), "failed".to_string(), false),
            ("web-3".to_string(), "untouched".to_string(), true),
        ]
    );
    let recovery = run.report()["recovery"][0].as_str().unwrap().to_string();
    assert!(recovery.contains("web-2"), "{recovery}");
    assert_no_failed_requests(&traffic);
    // web-2 itself never changed: it still serves v1, it is only out of the pool.
    assert_eq!(fleet.live_release("web-2").as_deref(), Some("v1"));
    assert_eq!(fleet.app_version("web-2").as_deref(), Some("v1"));
    assert!(!lock_file(&fleet).exists());

    // Once the host is reachable again, resume finishes the rollout.
    fleet.restart_sshd("web-2").unwrap();
    let resumed = admin("resume", &inv, &[]);
    assert_eq!(resumed.code, Some(0), "{}", resumed.stderr);
    assert_fleet_on(&fleet, "v2", "v2");
}

#[test]
fn resume_and_recover_are_refused_while_the_rollout_runs_and_change_nothing() {
    let fleet = Fleet::up(FleetSpec::for_test("busy", 2)).unwrap();
    let inv = fleet.inventory_path();
    let v2 = slow(&fleet, "v2", 8000);
    let load = start_load(&fleet);
    let mut running = Running::start(&rollout_args(&inv, &v2, "v2", "1", &[]));
    // web-1 is out of the pool and starting v2: the moment an operator might think it hung.
    running.wait_for_step("health-check", "web-1", "started");
    let upstream = fleet.upstream_text();
    let lock = lock_holder(&fleet);

    for command in ["resume", "recover"] {
        let run = admin(command, &inv, &[]);
        assert_eq!(run.code, Some(7), "{command}: {}", run.stderr);
        let message = run.error()["message"].as_str().unwrap().to_string();
        assert!(
            message.contains(&format!("pid {}", running.pid())),
            "{command}: {message}"
        );
        assert!(
            !run.lines.iter().any(|l| l["event"] == "step"),
            "{command} ran steps: {:?}",
            run.lines
        );
    }
    // Nothing moved while the rollout waits for web-1's health.
    assert_eq!(fleet.upstream_text(), upstream);
    // Still the rollout's lock; its lease may have been renewed meanwhile, nothing else.
    assert_eq!(lock_holder(&fleet), lock);
    assert_eq!(fleet.live_release("web-2").as_deref(), Some("v1"));

    let run = running.finish();
    let traffic = load.stop();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_no_failed_requests(&traffic);
    assert_fleet_on(&fleet, "v2", "v2");
    assert!(!lock_file(&fleet).exists());
}

/// The lock file without its `lease_until`, which the holder's renewals move.
fn lock_holder(fleet: &Fleet) -> String {
    std::fs::read_to_string(lock_file(fleet))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("lease_until="))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The lock file's `lease_until`, in unix seconds of the load balancer (this machine).
fn lease_until(fleet: &Fleet) -> u64 {
    let text = std::fs::read_to_string(lock_file(fleet)).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("lease_until="))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn a_controller_paused_past_its_lease_changes_nothing_once_another_took_over() {
    let fleet = Fleet::up(FleetSpec::for_test("paused", 2)).unwrap();
    let inv = inventory_with(&fleet, &[("balancer", "lock_lease", "10s".into())]);
    let v2 = slow(&fleet, "v2", 3000);
    let load = start_load(&fleet);
    let mut first = Running::start(&rollout_args(&inv, &v2, "v2", "1", &[]));
    first.wait_for_step("health-check", "web-1", "started");
    first.signal(libc::SIGSTOP);

    // Its lease runs out while it is stopped, and another controller takes over and undoes
    // the rollout.
    // Read afresh each time: a renewal sent just before the stop may still land (it waits
    // for the lock's mutex while a pool change holds it).
    let waited = Instant::now();
    while roller::journal::now_secs() <= lease_until(&fleet) {
        assert!(
            waited.elapsed() < Duration::from_secs(40),
            "lease never ran out"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let recovered = admin("recover", &inv, &[]);
    assert_eq!(recovered.code, Some(0), "{}", recovered.stderr);
    assert!(
        recovered
            .stderr
            .contains("took over an expired deploy lock"),
        "{}",
        recovered.stderr
    );
    assert_fleet_on(&fleet, "v1", "v1");
    let upstream = fleet.upstream_text();
    let state_file = lock_file(&fleet).with_file_name("shop.rollout.json");
    let state = std::fs::read_to_string(&state_file).unwrap();
    let pids: Vec<Option<u32>> = fleet
        .host_names()
        .iter()
        .map(|h| fleet.app_pid(h))
        .collect();

    first.signal(libc::SIGCONT);
    let first = first.finish();
    let traffic = load.stop();

    assert_eq!(first.code, Some(7), "{}", first.stderr);
    let message = first.error()["message"].as_str().unwrap().to_string();
    assert!(message.contains("changed nothing more"), "{message}");
    // It woke up believing it held the lock; nothing it tried got through.
    assert_eq!(fleet.upstream_text(), upstream);
    assert_eq!(std::fs::read_to_string(&state_file).unwrap(), state);
    let after: Vec<Option<u32>> = fleet
        .host_names()
        .iter()
        .map(|h| fleet.app_pid(h))
        .collect();
    assert_eq!(after, pids, "an app was restarted");
    assert_no_failed_requests(&traffic);
    assert_fleet_on(&fleet, "v1", "v1");
}

#[test]
fn a_tampered_rollout_state_or_link_is_refused_naming_the_file_and_nothing_runs() {
    let fleet = Fleet::up(FleetSpec::for_test("tampered", 2)).unwrap();
    let inv = fleet.inventory_path();
    let state_file = lock_file(&fleet).with_file_name("shop.rollout.json");
    std::fs::create_dir_all(state_file.parent().unwrap()).unwrap();
    let marker = fleet.root().join("pwned");
    // Where an id of "../../escaped" would put the journal.
    let escaped = journal_dir(&inv).join("escaped.jsonl");
    let escaped_up = inv.parent().unwrap().join("escaped.jsonl");
    let foreign = fleet.root().join("foreign.jar");
    std::fs::write(&foreign, b"not for the hosts").unwrap();
    let untampered = serde_json::json!({
        "strategy": "rolling",
        "id": "0123456789abcdef0123456789abcdef",
        "app": "shop",
        "release": "v2",
        "artifact": "app-v2.jar",
        "artifact_sha256": "ab".repeat(32),
        "batch": "1",
        "on_failure": "rollback-batch",
        "max_failed_hosts": 0,
        "controller": "ops@ci",
        "started": 1,
        "updated": 1,
        "status": "running",
        "before": { "web-1": "v1", "web-2": "v1" },
        "hosts": { "web-1": "drained" },
        "out_of_pool": ["web-1"],
    });
    let upstream = fleet.upstream_text();
    let tampered = [
        (
            "before",
            serde_json::json!({ "web-1": "v1", "web-2": format!("$(touch {})", marker.display()) }),
        ),
        ("id", serde_json::json!("../../escaped")),
        ("artifact", serde_json::json!(foreign.to_str().unwrap())),
    ];
    for (key, value) in tampered {
        let mut state = untampered.clone();
        state[key] = value;
        std::fs::write(&state_file, serde_json::to_vec_pretty(&state).unwrap()).unwrap();
        for command in ["recover", "resume"] {
            let run = admin(command, &inv, &[]);
            assert_eq!(run.code, Some(3), "{command} with {key}: {}", run.stderr);
            let message = run.error()["message"].as_str().unwrap().to_string();
            assert!(
                message.contains(&state_file.display().to_string()),
                "{message}"
            );
            assert!(message.contains(&format!("- {key}")), "{message}");
            assert!(run.lines.iter().all(|l| l["event"] != "step"), "{command}");
        }
    }
    assert!(!marker.exists(), "the tampered release ran as a command");
    assert!(!escaped.exists() && !escaped_up.exists());
    assert!(!lock_file(&fleet).exists());
    assert_eq!(fleet.upstream_text(), upstream);

    // A `current` link on a host is read back too: one that names no release stops pre-flight.
    std::fs::remove_file(&state_file).unwrap();
    let link = fleet.host_dir("web-2").join("shop/current");
    std::fs::remove_file(&link).unwrap();
    let target = format!("releases/$(touch {})", marker.display());
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let run = rollout(&inv, &v2, "v2", "1");
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    let message = run.error()["message"].as_str().unwrap().to_string();
    assert!(message.contains("web-2"), "{message}");
    assert!(message.contains("shop/current points at"), "{message}");
    assert!(run.touched("switch").is_empty());
    assert!(!marker.exists());
    assert_eq!(fleet.upstream_text(), upstream);
    assert_eq!(fleet.live_release("web-1").as_deref(), Some("v1"));
}

/// The fleet's inventory with `balancer.hosts` and `balancer.state_dir` replaced, as `name`.
fn inventory_with_balancers(fleet: &Fleet, name: &str, hosts: &[&str]) -> PathBuf {
    let text = std::fs::read_to_string(fleet.inventory_path()).unwrap();
    let mut doc: toml::Table = text.parse().unwrap();
    let balancer = doc["balancer"].as_table_mut().unwrap();
    balancer.insert(
        "hosts".into(),
        toml::Value::Array(hosts.iter().map(|h| toml::Value::from(*h)).collect()),
    );
    // Relative: in each host's own session directory, so that two load balancers share a
    // lock only if both inventories pick the same one to hold it.
    balancer.insert("state_dir".into(), "roller-state".into());
    let path = fleet.root().join(name);
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    path
}

#[test]
fn inventories_naming_the_load_balancers_in_another_order_share_one_lock() {
    let fleet = Fleet::up(FleetSpec::for_test("lb-order", 2)).unwrap();
    // A second "load balancer": web-2's sshd, on this machine, drives the same nginx.
    let (lb, other) = (fleet.lb_address(), fleet.host_address("web-2"));
    let forward = inventory_with_balancers(&fleet, "forward.toml", &[&lb, &other]);
    let reverse = inventory_with_balancers(&fleet, "reverse.toml", &[&other, &lb]);
    let fewer = inventory_with_balancers(&fleet, "fewer.toml", &[&lb]);
    let v2 = slow(&fleet, "v2", 6000);
    let v3 = fleet.jar(&JarSpec::healthy("v3")).unwrap();
    // The upstream file is a symlink with a mode of its own: both survive the rollout.
    use std::os::unix::fs::PermissionsExt;
    let link = fleet.upstream_file();
    let real = link.with_file_name("upstream-real.conf");
    std::fs::rename(&link, &real).unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).unwrap();

    // The running rollout names one load balancer; the other inventories name two, in either
    // order. Both find its lock (on the first in sorted order, whatever their order), and are
    // refused showing both sets; with the lock on their first-listed host, the reverse one
    // would have taken a lock of its own.
    let mut first = Running::start(&rollout_args(&fewer, &v2, "v2", "1", &[]));
    first.wait_for_step("health-check", "web-1", "started");
    for inventory in [&reverse, &forward] {
        let refused = roller(&rollout_args(inventory, &v3, "v3", "1", &[]));
        assert_eq!(refused.code, Some(7), "{}", refused.stderr);
        let message = refused.error()["message"].as_str().unwrap().to_string();
        assert!(
            message.contains(&format!("pid {}", first.pid())),
            "{message}"
        );
        assert!(
            message.contains(&format!("[{lb},{other}]")) && message.contains(&format!("[{lb}]")),
            "{message}"
        );
        assert!(refused.touched("switch").is_empty());
    }

    let first = first.finish();
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    assert_fleet_on(&fleet, "v2", "v2");
    assert_eq!(std::fs::read_link(&link).unwrap(), real);
    let mode = std::fs::metadata(&real).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
    let leftovers: Vec<_> = std::fs::read_dir(real.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".roller-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
