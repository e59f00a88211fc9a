//! What cron, CI release jobs and shells rely on: `--quiet`, a `schema_version` on every JSON
//! line, colour only on a terminal and never with `NO_COLOR`, completion scripts, and an
//! example in every command's `--help`.

mod e2e;

use std::process::{Command, Output, Stdio};

use e2e::*;
use roller_fleet::{Fleet, FleetSpec, JarSpec};

fn roller_cmd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_roller"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run roller")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The subcommands `roller --help` lists, `help` aside.
fn subcommands() -> Vec<String> {
    let help = text(&roller_cmd(&["--help"]).stdout);
    let listed = help
        .split("Commands:\n")
        .nth(1)
        .expect("a Commands section")
        .split("\n\n")
        .next()
        .unwrap();
    listed
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn every_command_help_shows_an_example() {
    let commands = subcommands();
    assert!(commands.len() >= 9, "{commands:?}");
    for command in &commands {
        let out = roller_cmd(&[command, "--help"]);
        assert!(out.status.success(), "{command}: {}", text(&out.stderr));
        let help = text(&out.stdout);
        assert!(
            help.contains("\nExample") && help.contains(&format!("roller {command}")),
            "`roller {command} --help` shows no example:\n{help}"
        );
        insta::assert_snapshot!(format!("help_{command}"), help);
    }
}

#[test]
fn completion_scripts_parse_in_their_shell_and_know_every_command() {
    let commands = subcommands();
    for (shell, check) in [("bash", "bash"), ("zsh", "zsh"), ("fish", "fish")] {
        let out = roller_cmd(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        for command in &commands {
            assert!(script.contains(command.as_str()), "{shell} lacks {command}");
        }
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &script).unwrap();
        let syntax = Command::new(check)
            .arg("-n")
            .arg(file.path())
            .output()
            .unwrap_or_else(|e| panic!("{check}: {e}"));
        assert!(
            syntax.status.success(),
            "{shell} rejects the script: {}",
            text(&syntax.stderr)
        );
    }
}

/// `roller --help` on a pseudo-terminal (util-linux `script`), where colour is allowed.
fn help_on_a_terminal(no_color: bool) -> String {
    let mut cmd = Command::new("script");
    cmd.args([
        "-qec",
        &format!("{} --help", env!("CARGO_BIN_EXE_roller")),
        "/dev/null",
    ])
    .env("TERM", "xterm-256color")
    .env_remove("NO_COLOR")
    .env_remove("CLICOLOR_FORCE")
    .stdin(Stdio::null());
    if no_color {
        cmd.env("NO_COLOR", "1");
    }
    let out = cmd.output().expect("script (util-linux)");
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    assert!(
        help_on_a_terminal(false).contains('\x1b'),
        "a terminal gets styled help; if not, this test proves nothing"
    );
    assert!(!help_on_a_terminal(true).contains('\x1b'));
    assert!(!text(&roller_cmd(&["--help"]).stdout).contains('\x1b'));
}

#[test]
fn json_errors_carry_the_schema_version() {
    let out = roller_cmd(&[
        "rollout",
        "-i",
        "/nonexistent/roller.toml",
        "-a",
        "/nonexistent/shop.jar",
        "--output",
        "json",
        "--quiet",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["schema_version"], 1);
    assert_eq!(doc["event"], "error");
    // Errors are never silenced.
    assert!(text(&out.stderr).contains("/nonexistent/roller.toml"));
}

#[test]
fn quiet_rollouts_print_nothing_on_success_and_json_lines_carry_the_schema_version() {
    let fleet = Fleet::up(FleetSpec::for_test("quiet", 2)).unwrap();
    let inventory = fleet.inventory_path();

    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let args = rollout_args(&inventory, &v2, "v2", "1", &["--quiet"]);
    let out = Command::new(env!("CARGO_BIN_EXE_roller"))
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "");
    assert_eq!(text(&out.stderr), "");
    assert_fleet_on(&fleet, "v2", "v2");

    let v3 = fleet.jar(&JarSpec::healthy("v3")).unwrap();
    let run = roller(&rollout_args(&inventory, &v3, "v3", "1", &["--quiet"]));
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.lines.len(), 1, "{:?}", run.lines);
    assert_eq!(run.lines[0]["event"], "report");
    assert_eq!(run.lines[0]["schema_version"], 1);
    assert_eq!(run.report()["outcome"], "succeeded");
    assert_fleet_on(&fleet, "v3", "v3");

    // Without --quiet, every step event carries the version too.
    let v4 = fleet.jar(&JarSpec::healthy("v4")).unwrap();
    let run = rollout(&inventory, &v4, "v4", "1");
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.lines.iter().filter(|l| l["event"] == "step").count() > 4);
    for line in &run.lines {
        assert_eq!(line["schema_version"], 1, "{line}");
    }
    // The shapes release jobs parse: every field a step event or the report carried, with
    // its type, pinned so that a change to them is seen and the version raised if needed.
    let steps = run
        .lines
        .iter()
        .filter(|l| l["event"] == "step")
        .fold(serde_json::Value::Null, |all, l| merge(all, shape(l)));
    let report = run
        .lines
        .iter()
        .filter(|l| l["event"] == "report")
        .fold(serde_json::Value::Null, |all, l| merge(all, shape(l)));
    insta::assert_json_snapshot!("json_step_event_shape", steps);
    insta::assert_json_snapshot!("json_report_shape", report);
}

/// A JSON value with every leaf replaced by its type's name; arrays keep one merged element.
fn shape(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Null => "null".into(),
        Value::Bool(_) => "bool".into(),
        Value::Number(_) => "number".into(),
        Value::String(_) => "string".into(),
        Value::Array(items) => {
            Value::Array(items.iter().map(shape).reduce(merge).into_iter().collect())
        }
        Value::Object(fields) => {
            Value::Object(fields.iter().map(|(k, v)| (k.clone(), shape(v))).collect())
        }
    }
}

/// Two shapes as one: objects take the union of their fields, differing leaves read `a|b`.
fn merge(a: serde_json::Value, b: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match (a, b) {
        (Value::Null, b) => b,
        (Value::Object(mut a), Value::Object(b)) => {
            for (k, v) in b {
                let merged = match a.remove(&k) {
                    Some(old) => merge(old, v),
                    None => v,
                };
                a.insert(k, merged);
            }
            Value::Object(a)
        }
        (Value::Array(a), Value::Array(b)) => {
            Value::Array(a.into_iter().chain(b).reduce(merge).into_iter().collect())
        }
        (Value::String(a), Value::String(b)) if a == b => Value::String(a),
        (a, b) => {
            let mut names: Vec<String> = [a, b]
                .iter()
                .flat_map(|v| match v {
                    Value::String(s) => s.split('|').map(str::to_string).collect(),
                    other => vec![other.to_string()],
                })
                .collect();
            names.sort();
            names.dedup();
            Value::String(names.join("|"))
        }
    }
}
