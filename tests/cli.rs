//! The `roller` binary as users and release jobs call it: output, exit codes, error messages.

use std::path::Path;
use std::process::{Command, Output};

fn roller(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_roller"))
        .args(args)
        .env("HOME", "/home/deploy")
        .output()
        .expect("run roller")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn example() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/inventory.example.toml").to_string()
}

/// A jar-shaped file with fixed content, so the release name and checksum are stable.
fn jar(dir: &Path) -> String {
    let path = dir.join("shop-2.4.0.jar");
    std::fs::write(&path, b"PK\x03\x04 a stable jar for snapshots").unwrap();
    path.to_string_lossy().into_owned()
}

/// The example inventory's settings with `hosts` hosts named web-1, web-2, ...
fn fleet_of(dir: &Path, hosts: usize) -> String {
    let example = std::fs::read_to_string(example()).unwrap();
    let head = example.split("[[hosts]]").next().unwrap();
    let mut inventory = head.to_string();
    for i in 0..hosts {
        inventory.push_str(&format!(
            "[[hosts]]\nname = \"web-{}\"\naddress = \"10.{}.{}.10\"\n\n",
            i + 1,
            i / 250,
            i % 250
        ));
    }
    let path = dir.join(format!("fleet-{hosts}.toml"));
    std::fs::write(&path, inventory).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn plan_summarises_a_rolling_rollout_batch_by_batch() {
    let out = roller(&[
        "plan",
        "--inventory",
        &example(),
        "--release",
        "2024-06-01.1",
        "--batch",
        "1",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    insta::assert_snapshot!(text(&out.stdout));
}

#[test]
fn plan_summarises_ten_batches_in_one_screen_and_a_thousand_alike() {
    let dir = tempfile::tempdir().unwrap();
    let ten = roller(&[
        "plan",
        "-i",
        &fleet_of(dir.path(), 10),
        "--release",
        "v2",
        "--on-failure",
        "rollback-all",
        "--max-failed-hosts",
        "1",
    ]);
    assert!(ten.status.success(), "{}", text(&ten.stderr));
    let summary = text(&ten.stdout);
    assert!(summary.lines().count() <= 40, "{summary}");
    for batch in 1..=10 {
        assert!(
            summary.contains(&format!("{batch}: web-{batch}\n"))
                || summary.contains(&format!("Batch {batch}: web-{batch} ")),
            "batch {batch} is not listed with its host:\n{summary}"
        );
    }
    insta::assert_snapshot!(summary);
    // A thousand batches that happen alike read as three groups, whatever their number.
    let thousand = roller(&["plan", "-i", &fleet_of(dir.path(), 1000), "--release", "v2"]);
    assert!(thousand.status.success(), "{}", text(&thousand.stderr));
    let summary = text(&thousand.stdout);
    assert!(summary.lines().count() <= 30, "{summary}");
    assert!(
        summary.contains("Batches 2 to 999, 998 of 1 host each"),
        "{summary}"
    );
    assert!(summary.contains("... 993 more batches ..."), "{summary}");
}

#[test]
fn plan_summarises_a_canary_and_a_paused_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = roller(&[
        "plan",
        "-i",
        &fleet_of(dir.path(), 6),
        "--release",
        "v2",
        "--strategy",
        "canary",
        "--batch",
        "2",
        "--pause",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    insta::assert_snapshot!(text(&out.stdout));
}

#[test]
fn plan_commands_print_every_command_and_upstream_file_offline() {
    let out = roller(&[
        "plan",
        "--inventory",
        &example(),
        "--release",
        "2024-06-01.1",
        "--batch",
        "1",
        "--commands",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listing = text(&out.stdout);
    // -v is the same listing.
    let short = roller(&[
        "plan",
        "--inventory",
        &example(),
        "--release",
        "2024-06-01.1",
        "-v",
    ]);
    assert_eq!(text(&short.stdout), listing);
    insta::assert_snapshot!(listing);
}

#[test]
fn plan_json_pins_its_schema() {
    let out = roller(&[
        "plan",
        "--inventory",
        &example(),
        "--release",
        "2024-06-01.1",
        "--batch",
        "1",
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["schema_version"], 1);
    insta::assert_snapshot!(text(&out.stdout));
}

/// The plan holds each pool change as data (hosts down, port, weights), not the upstream file
/// it renders to, and names the hosts that stay in the pool by those that leave: so it grows
/// with hosts plus batches, where it grew with their product.
#[test]
fn plan_output_grows_linearly_with_the_fleet_at_batch_1() {
    let dir = tempfile::tempdir().unwrap();
    let size = |hosts: usize, extra: &[&str]| {
        let inventory = fleet_of(dir.path(), hosts);
        let mut args = vec!["plan", "-i", &inventory, "--release", "v2", "--batch", "1"];
        args.extend(extra);
        let out = roller(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        out.stdout.len()
    };
    let (small, large) = (
        size(200, &["--output", "json"]),
        size(400, &["--output", "json"]),
    );
    assert!(
        large * 100 <= small * 205,
        "the JSON plan grew from {small} to {large} bytes when the fleet doubled"
    );
    let (small, large) = (size(200, &[]), size(400, &[]));
    assert!(
        large < small + 100,
        "the summary grew from {small} to {large} bytes: only its counts may"
    );
}

#[test]
fn plan_json_is_one_document_with_the_derived_release_and_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let jar = jar(dir.path());
    let out = roller(&[
        "plan",
        "-i",
        &example(),
        "--artifact",
        &jar,
        "--batch",
        "50%",
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sha = plan["artifact"]["sha256"].as_str().unwrap();
    assert_eq!(sha.len(), 64);
    assert_eq!(
        plan["release"].as_str().unwrap(),
        format!("shop-2.4.0-{}", &sha[..12])
    );
    assert_eq!(plan["batches"].as_array().unwrap().len(), 2);
    let phases: Vec<&str> = plan["batches"][0]["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    // Batch 1 hands over to batch 2: batch 2's capacity check, then one pool change that
    // puts batch 1 back and takes batch 2 out.
    assert_eq!(
        phases,
        [
            "capacity-check",
            "remove-from-pool",
            "drain",
            "switch",
            "restart",
            "health-check",
            "capacity-check",
            "return-to-pool"
        ]
    );
    let second = &plan["batches"][1];
    assert_eq!(second["taken_out"], true);
    assert_eq!(second["phases"][0]["name"], "drain");
    let last = second["phases"].as_array().unwrap().last().unwrap();
    assert_eq!(last["name"], "return-to-pool");
    let upload = plan["stage"]["steps"][0]["action"]["upload"]
        .as_str()
        .unwrap();
    assert!(upload.contains(sha), "{upload}");
}

#[test]
fn a_bad_inventory_exits_2_naming_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("roller.toml");
    std::fs::write(
        &inv,
        "[ssh]\nuser = \"x\"\nport = 0\n[app]\nname = \"shop\"\ndir = \"/opt\"\nrestart = \"r\"\nport = 1\n[balancer]\nhosts = [\"lb\"]\nupstream_file = \"/f\"\nreload = 5\n",
    )
    .unwrap();
    let out = roller(&["plan", "-i", inv.to_str().unwrap(), "--release", "v1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains(inv.to_str().unwrap()), "{err}");
    for key in [
        "ssh.port",
        "balancer.reload: must be a string",
        "hosts: missing",
    ] {
        assert!(err.contains(key), "{key} not in {err}");
    }
}

#[test]
fn bad_flags_and_artifacts_exit_2_before_any_connection() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_jar = dir.path().join("app.jar");
    std::fs::write(&not_a_jar, "#!/bin/sh\n").unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["--batch", "0"], "at least one host"),
        (&["--batch", "2"], "takes all 2 host(s) out of the pool"),
        (&["--release", "../etc"], "--release"),
        (&["--artifact", "/nonexistent.jar"], "/nonexistent.jar"),
        (&["--artifact", not_a_jar.to_str().unwrap()], "is not a jar"),
        (&["rollout"], "--artifact: a rollout needs the jar"),
    ];
    for (extra, expected) in cases {
        let inv = example();
        let command = if extra.contains(&"rollout") {
            "rollout"
        } else {
            "plan"
        };
        let extra: Vec<&str> = extra.iter().copied().filter(|a| *a != "rollout").collect();
        let mut args = vec![command, "-i", &inv];
        if !extra.contains(&"--release") && !extra.contains(&"--artifact") {
            args.extend(["--release", "v1"]);
        }
        args.extend(&extra);
        assert_bad_input(&args, expected);
    }
}

/// roller refuses `args` as bad input (exit 2), saying `expected` on stderr.
fn assert_bad_input(args: &[&str], expected: &str) {
    let out = roller(args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(stderr.contains(expected), "{args:?}: {stderr}");
}

#[test]
fn json_errors_are_machine_readable() {
    let out = roller(&[
        "plan",
        "-i",
        "/nonexistent/roller.toml",
        "--release",
        "v1",
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["event"], "error");
    assert_eq!(doc["error"]["kind"], "inventory");
}

#[test]
fn the_single_instance_blue_green_example_plans_a_slot_switch() {
    let inventory = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/inventory.blue-green-single.example.toml"
    );
    let out = roller(&[
        "plan",
        "-i",
        inventory,
        "--release",
        "v2",
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["strategy"], "blue-green");
    let batch = &plan["batches"][0];
    let phases: Vec<&str> = batch["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "switch",
            "start-slot",
            "health-check",
            "switch-traffic",
            "keep-old"
        ]
    );
    // Offline, blue is assumed live: green gets the release, then all traffic, in one file.
    let start = &batch["phases"][1]["steps"][0]["action"]["command"];
    assert_eq!(start, "sudo systemctl restart shop@green");
    let pool = &batch["phases"][3]["steps"][0]["action"]["pool"];
    assert_eq!(pool["port"], 8082, "{pool}");
    assert_eq!(batch["phases"][3]["steps"].as_array().unwrap().len(), 1);
    let rollback: Vec<&str> = batch["rollback"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(rollback, ["switch-traffic", "stop-slot"]);
    let text_plan = roller(&["plan", "-i", inventory, "--release", "v2"]);
    insta::assert_snapshot!(text(&text_plan.stdout));
    // The file that switch renders to, as --commands shows it.
    let listing = roller(&["plan", "-i", inventory, "--release", "v2", "--commands"]);
    assert!(
        text(&listing.stdout).contains("|     server 10.0.1.11:8082;  # app"),
        "{}",
        text(&listing.stdout)
    );
}

#[test]
fn a_host_selection_plans_only_the_selected_hosts() {
    let out = roller(&[
        "plan",
        "-i",
        &example(),
        "--release",
        "v2",
        "--tag",
        "az-b",
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        plan["skipped"],
        serde_json::json!([{ "host": "web-1", "reason": "not selected (--hosts, --tag)", "not_selected": true }])
    );
    let batched: Vec<&serde_json::Value> = plan["batches"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b["hosts"].as_array().unwrap())
        .collect();
    assert_eq!(batched, ["web-2"]);
    let prune: Vec<&serde_json::Value> = plan["finish"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["target"])
        .collect();
    assert_eq!(prune, ["web-2"]);
}

#[test]
fn a_selection_that_matches_nothing_or_cannot_apply_exits_2() {
    let inv = example();
    let cases: [(&[&str], &str); 4] = [
        (
            &["plan", "--release", "v2", "--tag", "az-z"],
            "--tag az-z selects no host of the inventory",
        ),
        (
            &["plan", "--release", "v2", "--hosts", "web-1,web-9"],
            "no host named web-9 in the inventory",
        ),
        (
            &["resume", "--hosts", "web-1"],
            "`roller resume` takes no host selection: it acts on the hosts its rollout recorded",
        ),
        (
            &["recover", "--tag", "az-b"],
            "`roller recover` takes no host selection",
        ),
    ];
    for (args, expected) in cases {
        let mut all = vec![args[0], "-i", &inv];
        all.extend(&args[1..]);
        assert_bad_input(&all, expected);
    }
}

/// `roller plan --rollback-to` shows what `roller rollback --to` runs: the same batches as a
/// rollout, marked as a rollback, with nothing staged.
#[test]
fn a_rollback_plan_stages_nothing_and_says_what_it_is() {
    let out = roller(&[
        "plan",
        "-i",
        &example(),
        "--rollback-to",
        "v1",
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let phases = |batch: &serde_json::Value, key: &str| -> Vec<String> {
        batch[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect()
    };
    let shape = serde_json::json!({
        "kind": plan["kind"],
        "release": plan["release"],
        "artifact": plan["artifact"],
        "stage": plan["stage"],
        "targets": plan["targets"],
        "batches": plan["batches"].as_array().unwrap().iter().map(|b| serde_json::json!({
            "hosts": b["hosts"],
            "phases": phases(b, "phases"),
            "rollback": phases(b, "rollback"),
        })).collect::<Vec<_>>(),
    });
    insta::assert_json_snapshot!(shape);
    let text_plan = roller(&["plan", "-i", &example(), "--rollback-to", "v1"]);
    assert!(
        text(&text_plan.stdout).starts_with("Plan: shop rollback to release v1"),
        "{}",
        text(&text_plan.stdout)
    );
    let refused = roller(&["plan", "-i", &example(), "--rollback-to", "../v1"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        text(&refused.stderr).contains("--rollback-to"),
        "{}",
        text(&refused.stderr)
    );
}

/// Host-side hooks are plan steps: where they run in a batch, and their exact command.
#[test]
fn host_hooks_appear_in_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let inventory = dir.path().join("roller.toml");
    let example = std::fs::read_to_string(example()).unwrap();
    std::fs::write(
        &inventory,
        format!(
            "{example}\n[hooks]\nbefore_drain = \"touch quiesced\"\nafter_healthy = \"curl -fsS localhost:8080/warm\"\ntimeout = \"30s\"\n"
        ),
    )
    .unwrap();
    let inventory = inventory.to_str().unwrap();
    let out = roller(&[
        "plan",
        "-i",
        inventory,
        "--release",
        "v2",
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let batches: Vec<serde_json::Value> = plan["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let phases: Vec<serde_json::Value> = b["phases"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| match p["name"].as_str().unwrap() {
                    "before-drain" | "after-healthy" => p.clone(),
                    name => name.into(),
                })
                .collect();
            serde_json::json!({ "hosts": b["hosts"], "phases": phases })
        })
        .collect();
    insta::assert_json_snapshot!(batches);
}

/// The summary tells the steps in the order they run: with a before_drain hook, the capacity
/// check comes before the hook, and the pool change after it.
#[test]
fn the_plan_summary_tells_hooks_where_they_run() {
    let dir = tempfile::tempdir().unwrap();
    let inventory = dir.path().join("roller.toml");
    let example = std::fs::read_to_string(example()).unwrap();
    std::fs::write(
        &inventory,
        format!(
            "{example}\n[hooks]\nbefore_drain = \"touch quiesced\"\nafter_healthy = \"true\"\n"
        ),
    )
    .unwrap();
    let out = roller(&["plan", "-i", inventory.to_str().unwrap(), "--release", "v2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary = text(&out.stdout);
    let words = summary
        .lines()
        .find(|l| l.contains("before_drain"))
        .unwrap_or_else(|| panic!("no hook in the summary:\n{summary}"));
    let at = |what: &str| {
        words
            .find(what)
            .unwrap_or_else(|| panic!("{what:?} not in {words}"))
    };
    assert!(at("Checks that at least 1") < at("runs the before_drain hook"));
    assert!(at("runs the before_drain hook") < at("leaves the pool"));
    assert!(at("passes its health check") < at("runs the after_healthy hook"));
    assert!(at("runs the after_healthy hook") < at("returns to the pool"));
}
