//! `[hooks]` end to end on a real local fleet: host-side hooks around the pool change and after
//! health, under steady GET and POST traffic.

mod e2e;

use std::path::PathBuf;

use e2e::*;
use roller_fleet::{Fleet, FleetSpec, JarSpec};

/// The fleet's inventory with a `[hooks]` section, written beside it.
fn inventory_with_hooks(fleet: &Fleet, hooks: &[(&str, &str)]) -> PathBuf {
    let text = std::fs::read_to_string(fleet.inventory_path()).unwrap();
    let mut doc: toml::Table = text.parse().unwrap();
    let mut table = toml::Table::new();
    for (key, value) in hooks {
        table.insert(key.to_string(), toml::Value::String(value.to_string()));
    }
    doc.insert("hooks".into(), toml::Value::Table(table));
    let path = fleet.root().join("inventory-hooks.toml");
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    path
}

fn app_file(fleet: &Fleet, host: &str, name: &str) -> Option<String> {
    std::fs::read_to_string(fleet.host_dir(host).join("shop").join(name)).ok()
}

/// Step events of `phase` in `state`, as (batch, target, unix_ms, down).
fn steps(run: &Run, phase: &str, state: &str) -> Vec<(u64, String, u64, Vec<String>)> {
    run.lines
        .iter()
        .filter(|l| l["event"] == "step")
        .map(|l| &l["step"])
        .filter(|s| s["phase"] == phase && s["state"] == state)
        .map(|s| {
            (
                s["batch"].as_u64().unwrap_or(0),
                s["target"].as_str().unwrap().to_string(),
                s["unix_ms"].as_u64().unwrap(),
                s["down"]
                    .as_array()
                    .map(|d| d.iter().map(|h| h.as_str().unwrap().to_string()).collect())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

#[test]
fn before_drain_runs_on_each_host_before_its_pool_change_and_after_healthy_after_health() {
    let fleet = Fleet::up(FleetSpec::for_test("hooks-order", 3)).unwrap();
    let inventory = inventory_with_hooks(
        &fleet,
        &[
            (
                "before_drain",
                r#"date +%s%3N > "before-drain-$ROLLER_HOST.ms""#,
            ),
            (
                "after_healthy",
                r#"printf '%s\n' "$ROLLER_RELEASE" > "after-healthy-$ROLLER_HOST""#,
            ),
        ],
    );
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let reloads = fleet.nginx_reloads();
    let load = start_load(&fleet);

    let run = rollout(&inventory, &v2, "v2", "1");
    let traffic = load.stop();

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_no_failed_requests(&traffic);
    assert_fleet_on(&fleet, "v2", "v2");
    let removals = steps(&run, "remove-from-pool", "started");
    let healthy = steps(&run, "health-check", "succeeded");
    for host in fleet.host_names() {
        let ran_at: u64 = app_file(&fleet, &host, &format!("before-drain-{host}.ms"))
            .unwrap_or_else(|| panic!("before_drain never ran on {host}"))
            .trim()
            .parse()
            .unwrap();
        // The hook ran before the pool change that took its host out, and every earlier pool
        // change (if any) still had the host in the pool.
        let taking_out = removals
            .iter()
            .find(|(_, _, _, down)| down.contains(&host))
            .unwrap_or_else(|| panic!("no pool change took {host} out: {removals:?}"));
        assert!(
            ran_at <= taking_out.2,
            "{host}: before_drain at {ran_at}, its pool change started at {}",
            taking_out.2
        );
        assert_eq!(
            app_file(&fleet, &host, &format!("after-healthy-{host}")).as_deref(),
            Some("v2\n"),
            "after_healthy on {host}"
        );
        let health_at = healthy.iter().find(|(_, t, _, _)| *t == host).unwrap().2;
        let hook_done = steps(&run, "after-healthy", "succeeded")
            .into_iter()
            .find(|(_, t, _, _)| *t == host)
            .unwrap()
            .2;
        assert!(
            health_at <= hook_done,
            "{host}: after_healthy before health"
        );
    }
    // Each batch left the pool in its own change after its own hook: 2 reloads per batch.
    assert_eq!(fleet.nginx_reloads() - reloads, 6);
}

#[test]
fn a_failing_after_healthy_fails_the_batch_like_a_health_check() {
    let fleet = Fleet::up(FleetSpec::for_test("hooks-fail", 3)).unwrap();
    let inventory = inventory_with_hooks(
        &fleet,
        &[(
            "after_healthy",
            r#"test "$ROLLER_RELEASE" != v2 || { echo "warm-up of $ROLLER_RELEASE failed" >&2; exit 1; }"#,
        )],
    );
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let load = start_load(&fleet);

    let run = rollout(&inventory, &v2, "v2", "1");
    let traffic = load.stop();

    assert_eq!(run.code, Some(4), "{}", run.stderr);
    let report = run.report();
    assert_eq!(report["outcome"], "rolled-back");
    assert_eq!(report["failure"]["batch"], 1);
    assert_eq!(report["failure"]["host"], "web-1");
    assert_eq!(report["failure"]["step"], "after-healthy");
    assert!(
        report["failure"]["message"]
            .as_str()
            .unwrap()
            .contains("warm-up of v2 failed"),
        "{report}"
    );
    assert_eq!(
        report_hosts(&run),
        [
            ("web-1".into(), "rolled-back".into(), true),
            ("web-2".into(), "untouched".into(), true),
            ("web-3".into(), "untouched".into(), true),
        ]
    );
    assert_no_failed_requests(&traffic);
    assert_fleet_on(&fleet, "v1", "v1");
}

#[test]
fn a_failing_before_drain_fails_the_batch_before_it_leaves_the_pool() {
    let fleet = Fleet::up(FleetSpec::for_test("hooks-drain", 2)).unwrap();
    let inventory = inventory_with_hooks(
        &fleet,
        &[(
            "before_drain",
            r#"echo "not now, $ROLLER_HOST" >&2; exit 3"#,
        )],
    );
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();

    let run = rollout(&inventory, &v2, "v2", "1");

    assert_eq!(run.code, Some(4), "{}", run.stderr);
    let report = run.report();
    assert_eq!(report["failure"]["step"], "before-drain");
    assert_eq!(report["failure"]["host"], "web-1");
    assert!(run.touched("switch").is_empty() && run.touched("drain").is_empty());
    assert!(
        steps(&run, "remove-from-pool", "started").is_empty(),
        "the batch left the pool"
    );
    assert_fleet_on(&fleet, "v1", "v1");
}
