//! The commands that select, inspect and check a fleet, end to end on a real local fleet:
//! `--hosts` / `--tag`, `roller status`, `roller history` and `roller check`.

mod e2e;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use e2e::*;
use roller_fleet::{Behaviour, Fleet, FleetSpec, JarSpec};
use serde_json::Value;

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_selection_rolls_out_only_the_selected_hosts() {
    let fleet = Fleet::up(FleetSpec::for_test("select", 3)).unwrap();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let inventory = fleet.inventory_path();

    let nothing = roller(&rollout_args(
        &inventory,
        &v2,
        "v2",
        "1",
        &["--tag", "az-z"],
    ));
    assert_eq!(nothing.code, Some(2), "{}", nothing.stderr);
    assert!(
        nothing.stderr.contains("--tag az-z selects no host"),
        "{}",
        nothing.stderr
    );

    let load = start_load(&fleet);
    let run = roller(&rollout_args(
        &inventory,
        &v2,
        "v2",
        "1",
        &["--hosts", "web-1,web-3"],
    ));
    let traffic = load.stop();

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        report_hosts(&run),
        [
            ("web-1".to_string(), "updated".to_string(), true),
            ("web-2".to_string(), "untouched".to_string(), true),
            ("web-3".to_string(), "updated".to_string(), true),
        ]
    );
    assert_eq!(run.touched("switch"), names(&["web-1", "web-3"]));
    assert_eq!(run.touched("restart"), names(&["web-1", "web-3"]));
    assert_eq!(run.touched("stage"), names(&["web-1", "web-3"]));
    assert_no_failed_requests(&traffic);
    assert_eq!(fleet.live_release("web-1").as_deref(), Some("v2"));
    assert_eq!(fleet.live_release("web-2").as_deref(), Some("v1"));
    assert_eq!(fleet.live_release("web-3").as_deref(), Some("v2"));
    assert!(!fleet.host_dir("web-2").join("shop/releases/v2").exists());
    assert_eq!(fleet.app_version("web-2").as_deref(), Some("v1"));
    assert_eq!(fleet.upstream_text().matches(" down").count(), 0);

    // Status shows what the selection did, and changes nothing.
    let before = fleet_files(&fleet);
    let status = roller(&["status", "--inventory", inventory.to_str().unwrap()]);
    assert_eq!(status.code, Some(0), "{}", status.stderr);
    let doc = &status.lines[0]["status"];
    let hosts: Vec<(&str, &str, Vec<&str>, bool)> = doc["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap(),
                h["live"].as_str().unwrap(),
                h["releases"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap())
                    .collect(),
                h["healthy"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        hosts,
        [
            ("web-1", "v2", vec!["v1", "v2"], true),
            ("web-2", "v1", vec!["v1"], true),
            ("web-3", "v2", vec!["v1", "v2"], true),
        ]
    );
    assert_eq!(
        doc["balancers"][0]["pool"],
        serde_json::json!({ "web-1": "in", "web-2": "in", "web-3": "in" })
    );
    assert_eq!(doc["lock"], Value::Null);
    assert_eq!(doc["unfinished"], Value::Null);
    insta::assert_json_snapshot!(
        "status_after_rollout",
        redacted(status.lines[0].clone(), &fleet)
    );
    let selected = roller(&[
        "status",
        "--inventory",
        inventory.to_str().unwrap(),
        "--hosts",
        "web-2",
    ]);
    let shown: Vec<&Value> = selected.lines[0]["status"]["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| &h["name"])
        .collect();
    assert_eq!(shown, ["web-2"]);
    assert_eq!(fleet_files(&fleet), before, "status changed something");

    // A failed rollout next; both are in the history, newest first.
    let bad = fleet
        .jar(&JarSpec::healthy("v3").with_behaviour(Behaviour::NeverHealthy))
        .unwrap();
    let short = inventory_with(&fleet, &[("health", "timeout", "4s".into())]);
    let failed = roller(&rollout_args(&short, &bad, "v3", "1", &[]));
    assert_eq!(failed.code, Some(4), "{}", failed.stderr);
    let history = roller(&["history", "--inventory", inventory.to_str().unwrap()]);
    assert_eq!(history.code, Some(0), "{}", history.stderr);
    let doc = &history.lines[0]["history"];
    let rollouts = doc["rollouts"].as_array().unwrap();
    let summary: Vec<(&str, &str, &str)> = rollouts
        .iter()
        .map(|r| {
            (
                r["release"].as_str().unwrap(),
                r["result"].as_str().unwrap(),
                r["command"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("v3", "rolled-back", "rollout"),
            ("v2", "succeeded", "rollout")
        ]
    );
    let who = rollouts[0]["who"].as_str().unwrap();
    assert!(who.contains('@'), "{who}");
    assert!(rollouts[0]["started"].as_u64() <= rollouts[0]["ended"].as_u64());
    assert!(rollouts[1]["ended"].as_u64() <= rollouts[0]["started"].as_u64());
    insta::assert_json_snapshot!(
        "history_two_rollouts",
        redacted(history.lines[0].clone(), &fleet)
    );

    // --hosts narrows it to those hosts' outcomes; -n to the newest.
    let one = roller(&[
        "history",
        "--inventory",
        inventory.to_str().unwrap(),
        "-n",
        "1",
        "--hosts",
        "web-2",
    ]);
    let rollouts = one.lines[0]["history"]["rollouts"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(rollouts.len(), 1);
    assert_eq!(
        rollouts[0]["hosts"],
        serde_json::json!([{ "name": "web-2", "outcome": "untouched", "release": "v1" }])
    );

    // A line someone else wrote is left out and named, never shown as a rollout.
    let file = fleet
        .upstream_file()
        .parent()
        .unwrap()
        .join(".roller/shop.history.jsonl");
    let mut text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    let forged = text
        .lines()
        .next()
        .unwrap()
        .replace("\"release\":\"v2\"", "\"release\":\"$(reboot)\"");
    text.push_str(&forged);
    text.push_str("\nnot json at all\n");
    std::fs::write(&file, text).unwrap();
    let history = roller(&["history", "--inventory", inventory.to_str().unwrap()]);
    assert_eq!(history.code, Some(0), "{}", history.stderr);
    let doc = &history.lines[0]["history"];
    assert_eq!(doc["rollouts"].as_array().unwrap().len(), 2);
    let rejected: Vec<u64> = doc["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(rejected, [3, 4]);
    let (code, text, _) = text_output(&["history", "--inventory", inventory.to_str().unwrap()]);
    assert_eq!(code, Some(0));
    assert!(
        text.contains("line 3 left out: release \"$(reboot)\" breaks the release rules"),
        "{text}"
    );
    assert!(
        text.contains(" rollout v3  rolling, batch 1 (3 batches)  rolled-back in "),
        "{text}"
    );
}

/// Every file, directory and link under the hosts' app directories and the load balancer's
/// state directory, with its size, mode, link target and modification time, and the upstream
/// file's text: a command that changes nothing leaves this exactly as it was.
fn fleet_files(fleet: &Fleet) -> Vec<String> {
    fn walk(path: &Path, out: &mut Vec<String>) {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return;
        };
        let link = std::fs::read_link(path).ok();
        out.push(format!(
            "{} {} {:o} {:?} {:?}",
            path.display(),
            meta.len(),
            meta.permissions().mode(),
            meta.modified().ok(),
            link
        ));
        if meta.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(path)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            entries.sort();
            for entry in entries {
                walk(&entry, out);
            }
        }
    }
    let mut out = Vec::new();
    for host in fleet.host_names() {
        walk(&fleet.host_dir(&host).join("shop"), &mut out);
    }
    walk(
        &fleet.upstream_file().parent().unwrap().join(".roller"),
        &mut out,
    );
    out.push(fleet.upstream_text());
    out
}

/// Values that differ from run to run (addresses, ports, times, ids) replaced by their kind.
fn redacted(mut value: Value, fleet: &Fleet) -> Value {
    let text = serde_json::to_string(&value).unwrap();
    let text = text.replace(&fleet.lb_address(), "[lb]");
    value = serde_json::from_str(&text).unwrap();
    fn walk(v: &mut Value) {
        match v {
            Value::Object(map) => {
                for (key, v) in map.iter_mut() {
                    match key.as_str() {
                        "id" | "token" => *v = Value::String("[id]".into()),
                        "file" => *v = Value::String("[lock host]:[path]".into()),
                        "started" | "ended" | "updated" | "lease_until" | "duration_ms" | "pid" => {
                            *v = Value::String(format!("[{key}]"))
                        }
                        "owner" | "controller" | "who" => {
                            *v = Value::String("[user@machine]".into())
                        }
                        _ => walk(v),
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut value);
    value
}

fn text_output(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_roller"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_passes_on_a_healthy_fleet_and_names_a_host_with_a_wrong_key_changing_nothing() {
    let fleet = Fleet::up(FleetSpec::for_test("check", 2)).unwrap();
    let inventory = fleet.inventory_path();
    let inv = inventory.to_str().unwrap();
    let before = fleet_files(&fleet);

    let run = roller(&["check", "--inventory", inv]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let check = &run.lines[0]["check"];
    assert_eq!(check["ready"], true, "{check}");
    insta::assert_json_snapshot!("check_ready", redacted(run.lines[0].clone(), &fleet));
    let (code, text, stderr) = text_output(&["check", "--inventory", inv]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("web-1 ") && l.ends_with("  ok       v1, healthy, in the pool")),
        "{text}"
    );
    assert!(text.ends_with("a rollout could start\n"), "{text}");
    assert_eq!(fleet_files(&fleet), before, "check changed something");

    give_host_the_lb_key(&fleet, "web-2");
    let run = roller(&["check", "--inventory", inv]);
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    let check = &run.lines[0]["check"];
    assert_eq!(check["ready"], false);
    let problems = check["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0]["host"], "web-2");
    assert_eq!(problems[0]["step"], "connect");
    assert!(
        problems[0]["message"]
            .as_str()
            .unwrap()
            .contains("does not match"),
        "{}",
        problems[0]
    );
    let ok: Vec<(&str, bool, bool)> = check["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap(),
                t["reached"].as_bool().unwrap(),
                t["ok"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ok,
        [
            ("web-1", true, true),
            ("web-2", false, false),
            (fleet.lb_address().as_str(), true, true)
        ]
    );
    let (code, text, _) = text_output(&["check", "--inventory", inv]);
    assert_eq!(code, Some(3));
    assert!(text.contains("  - web-2 [connect]: "), "{text}");
    assert_eq!(fleet_files(&fleet), before, "check changed something");
}

#[test]
fn status_shows_an_unfinished_rollout_and_the_command_that_finishes_it() {
    let fleet = Fleet::up(FleetSpec::for_test("status-kill", 2)).unwrap();
    let inventory = fleet.inventory_path();
    let inv = inventory.to_str().unwrap();
    let v2 = fleet
        .jar(&JarSpec::healthy("v2").with_startup_delay(std::time::Duration::from_millis(1500)))
        .unwrap();
    let mut running = Running::start(&rollout_args(&inventory, &v2, "v2", "1", &[]));
    running.wait_for_step("drain", &fleet.lb_address(), "succeeded");
    running.signal(libc::SIGKILL);
    assert_eq!(
        running.finish().code,
        None,
        "roller should have died by SIGKILL"
    );
    let before = fleet_files(&fleet);

    let status = roller(&["status", "--inventory", inv]);
    assert_eq!(status.code, Some(0), "{}", status.stderr);
    let doc = &status.lines[0]["status"];
    let unfinished = &doc["unfinished"];
    assert_eq!(unfinished["release"], "v2", "{doc}");
    assert_eq!(unfinished["status"], "running");
    assert_eq!(unfinished["partway"], serde_json::json!(["web-1"]));
    assert_eq!(
        unfinished["finish"],
        format!("roller resume --inventory {inv}")
    );
    assert_eq!(
        unfinished["undo"],
        format!("roller recover --inventory {inv}")
    );
    // The killed controller ran on this machine and its pid is gone: its lock is shown, and
    // would be taken over.
    assert_eq!(doc["lock"]["release"], "v2");
    assert_eq!(doc["lock"]["live"], false);
    assert_eq!(doc["balancers"][0]["pool"]["web-1"], "down");
    assert_eq!(doc["balancers"][0]["pool"]["web-2"], "in");
    let (code, text, _) = text_output(&["status", "--inventory", inv]);
    assert_eq!(code, Some(0));
    assert!(
        text.contains(&format!("  finish it: roller resume --inventory {inv}\n")),
        "{text}"
    );
    assert!(
        text.contains(&format!("OUT OF THE POOL on {}", fleet.lb_address())),
        "{text}"
    );

    // check refuses on it, naming the lock host and the same command.
    let check = roller(&["check", "--inventory", inv]);
    assert_eq!(check.code, Some(3), "{}", check.stderr);
    let problems = check.lines[0]["check"]["problems"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0]["host"], fleet.lb_address());
    assert_eq!(problems[0]["step"], "unfinished rollout");
    assert!(
        problems[0]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("finish it with `roller resume --inventory {inv}`")),
        "{}",
        problems[0]
    );
    assert_eq!(
        fleet_files(&fleet),
        before,
        "status or check changed something"
    );
}

#[test]
fn resume_finishes_a_selected_rollout_on_its_recorded_hosts_alone() {
    let fleet = Fleet::up(FleetSpec::for_test("select-resume", 3)).unwrap();
    let inventory = fleet.inventory_path();
    let v2 = fleet
        .jar(&JarSpec::healthy("v2").with_startup_delay(std::time::Duration::from_millis(1500)))
        .unwrap();
    let mut running = Running::start(&rollout_args(
        &inventory,
        &v2,
        "v2",
        "1",
        &["--hosts", "web-1,web-3"],
    ));
    running.wait_for_step("drain", &fleet.lb_address(), "succeeded");
    running.signal(libc::SIGKILL);
    assert_eq!(
        running.finish().code,
        None,
        "roller should have died by SIGKILL"
    );

    let refused = admin("resume", &inventory, &["--hosts", "web-2"]);
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);
    let run = admin("resume", &inventory, &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        report_hosts(&run),
        [
            ("web-1".to_string(), "updated".to_string(), true),
            ("web-2".to_string(), "untouched".to_string(), true),
            ("web-3".to_string(), "updated".to_string(), true),
        ]
    );
    assert_eq!(fleet.live_release("web-2").as_deref(), Some("v1"));
    assert!(!fleet.host_dir("web-2").join("shop/releases/v2").exists());
    assert_eq!(fleet.live_release("web-1").as_deref(), Some("v2"));
    assert_eq!(fleet.live_release("web-3").as_deref(), Some("v2"));
    assert_eq!(fleet.upstream_text().matches(" down").count(), 0);
    let history = roller(&["history", "--inventory", inventory.to_str().unwrap()]);
    let rollouts = history.lines[0]["history"]["rollouts"]
        .as_array()
        .unwrap()
        .clone();
    // The killed run recorded nothing; its resume records itself.
    assert_eq!(rollouts.len(), 1, "{rollouts:?}");
    assert_eq!(rollouts[0]["command"], "resume");
}

/// Where the lock host's files are root's alone (`sudo = true`), status and history read them
/// through sudo, as a rollout writes them.
#[test]
fn status_and_history_read_through_sudo_where_the_inventory_says_so() {
    use roller_fleet::users::{Login, is_root};
    if !is_root() {
        eprintln!("skipped: the fleet creates its deploy users only when run as root");
        return;
    }
    let fleet =
        Fleet::up(FleetSpec::for_test("status-sudo", 2).with_sudo_logins(Login::Sudo)).unwrap();
    let inventory = fleet.inventory_path();
    let inv = inventory.to_str().unwrap();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let run = roller(&rollout_args(&inventory, &v2, "v2", "1", &[]));
    assert_eq!(run.code, Some(0), "{}", run.stderr);

    let status = roller(&["status", "--inventory", inv]);
    assert_eq!(status.code, Some(0), "{}", status.stderr);
    let doc = &status.lines[0]["status"];
    assert_eq!(doc["problems"], serde_json::json!([]), "{doc}");
    for host in doc["hosts"].as_array().unwrap() {
        assert_eq!(host["live"], "v2", "{host}");
        assert_eq!(host["releases"], serde_json::json!(["v1", "v2"]), "{host}");
    }
    assert_eq!(doc["balancers"][0]["pool"]["web-1"], "in");
    assert_eq!(doc["unfinished"], Value::Null);
    let history = roller(&["history", "--inventory", inv]);
    assert_eq!(history.code, Some(0), "{}", history.stderr);
    let rollouts = history.lines[0]["history"]["rollouts"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(rollouts.len(), 1, "{}", history.stderr);
    assert_eq!(rollouts[0]["result"], "succeeded");
}
