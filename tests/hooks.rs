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

/// A controller-side hook that appends its name and environment to `log`, one line a run.
fn recording(log: &std::path::Path) -> String {
    format!(
        r#"printf '%s|%s|%s|%s|%s|%s|%s\n' "$ROLLER_HOOK" "$ROLLER_KIND" "$ROLLER_RELEASE" "$ROLLER_ROLLOUT_ID" "${{ROLLER_BATCH-}}" "$ROLLER_HOSTS" "${{ROLLER_OUTCOME-}}" >> '{}'"#,
        log.display()
    )
}

/// The recorded lines as fields, with the rollout id checked and left out.
fn recorded(log: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let ids: std::collections::BTreeSet<String> = text
        .lines()
        .map(|l| l.split('|').nth(3).unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1, "one rollout id per run: {text}");
    let id = ids.into_iter().next().unwrap();
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id:?}"
    );
    text.lines()
        .map(|l| l.replace(&format!("|{id}|"), "|"))
        .collect()
}

#[test]
fn controller_hooks_run_in_order_with_the_run_in_their_environment() {
    let fleet = Fleet::up(FleetSpec::for_test("hooks-controller", 3)).unwrap();
    let log = fleet.root().join("controller-hooks.log");
    let record = recording(&log);
    let inventory = inventory_with_hooks(
        &fleet,
        &[
            ("before_rollout", &record),
            ("after_batch", &record),
            ("after_rollout", &record),
            ("on_failure", &record),
            (
                "after_healthy",
                r#"test "$ROLLER_RELEASE" != v3 || { echo "warm-up of $ROLLER_RELEASE failed" >&2; exit 1; }"#,
            ),
        ],
    );
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let run = rollout(&inventory, &v2, "v2", "1");
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        recorded(&log),
        [
            "before_rollout|rollout|v2||web-1,web-2,web-3|",
            "after_batch|rollout|v2|1|web-1|",
            "after_batch|rollout|v2|2|web-2|",
            "after_batch|rollout|v2|3|web-3|",
            "after_rollout|rollout|v2||web-1,web-2,web-3|succeeded",
        ]
    );

    // A failed batch: no after_batch for it, then on_failure with the report's outcome.
    std::fs::remove_file(&log).unwrap();
    let v3 = fleet.jar(&JarSpec::healthy("v3")).unwrap();
    let run = rollout(&inventory, &v3, "v3", "1");
    assert_eq!(run.code, Some(4), "{}", run.stderr);
    assert_eq!(
        recorded(&log),
        [
            "before_rollout|rollout|v3||web-1,web-2,web-3|",
            "on_failure|rollout|v3||web-1,web-2,web-3|rolled-back",
        ]
    );

    // A rollback is told as one. web-1's record of its previous release went with the
    // failed batch, so the release is named.
    std::fs::remove_file(&log).unwrap();
    let run = admin("rollback", &inventory, &["--batch", "2", "--to", "v1"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        recorded(&log),
        [
            "before_rollout|rollback|v1||web-1,web-2,web-3|",
            "after_batch|rollback|v1|1|web-1,web-2|",
            "after_batch|rollback|v1|2|web-3|",
            "after_rollout|rollback|v1||web-1,web-2,web-3|succeeded",
        ]
    );
}

#[test]
fn a_failing_before_rollout_changes_nothing_and_other_hooks_only_warn() {
    let fleet = Fleet::up(FleetSpec::for_test("hooks-gate", 2)).unwrap();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let gate = inventory_with_hooks(
        &fleet,
        &[("before_rollout", "echo 'change freeze' >&2; exit 9")],
    );
    let reloads = fleet.nginx_reloads();

    let run = rollout(&gate, &v2, "v2", "1");

    assert_eq!(run.code, Some(3), "{}", run.stderr);
    assert_eq!(run.error()["error"]["kind"], "hook");
    assert!(run.stderr.contains("change freeze"), "{}", run.stderr);
    assert!(run.touched("stage").is_empty() && run.touched("remove-from-pool").is_empty());
    assert_eq!(fleet.nginx_reloads(), reloads, "the pool changed");
    for host in fleet.host_names() {
        assert!(
            !fleet.host_dir(&host).join("shop/releases/v2").exists(),
            "{host} got the jar"
        );
    }
    assert_fleet_on(&fleet, "v1", "v1");

    // Failures of the hooks that follow the run are warnings: the rollout still succeeds.
    let warn = inventory_with_hooks(
        &fleet,
        &[("after_batch", "exit 1"), ("after_rollout", "exit 2")],
    );
    let run = rollout(&warn, &v2, "v2", "1");
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let notes = run.report()["notes"].to_string();
    assert!(
        notes.contains("hook after_batch failed (exit code 1)"),
        "{notes}"
    );
    assert!(
        notes.contains("hook after_rollout failed (exit code 2)"),
        "{notes}"
    );
    assert_fleet_on(&fleet, "v2", "v2");
}
