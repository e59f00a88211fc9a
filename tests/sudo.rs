//! Hosts that take roller only as a non-root deploy user with sudo, as cloud images ship them:
//! on the load balancer nginx's files, its state directory and its master are root's, and on
//! the app hosts the releases and links are, so a rollout that succeeds there went through
//! `sudo = true` on both sides; without it the same rollout is refused before anything changes.
//! A sudo that asks for a password is found before the deploy lock is taken, naming each host
//! and the rule that would let roller in.
//!
//! The deploy users exist only when the fleet runs as root (as CI does); elsewhere these tests
//! say so and pass without a fleet.

mod e2e;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use e2e::*;
use roller_fleet::users::{Login, is_root};
use roller_fleet::{Fleet, FleetSpec, JarSpec, Mode};

fn fleet_of_deploy_users(test: &str, hosts: usize, login: Login) -> Option<Fleet> {
    fleet_of_deploy_users_in(test, hosts, login, Mode::Rolling)
}

fn fleet_of_deploy_users_in(test: &str, hosts: usize, login: Login, mode: Mode) -> Option<Fleet> {
    if !is_root() {
        eprintln!("skipped: the fleet creates its deploy users only when run as root");
        return None;
    }
    let spec = FleetSpec::for_test(test, hosts)
        .with_mode(mode)
        .with_sudo_logins(login);
    let fleet = Fleet::up(spec).unwrap();
    assert_eq!(fleet.user(), login.user(), "the load balancer's login");
    for host in fleet.host_names() {
        assert_eq!(fleet.host_user(&host), login.user());
    }
    Some(fleet)
}

/// Runs `command` on the load balancer over SSH as its login, the deploy user; its stdout.
fn ssh_to_lb(fleet: &Fleet, command: &str) -> String {
    let out = Command::new("ssh")
        .arg("-i")
        .arg(fleet.identity_path())
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            fleet.known_hosts_path().display()
        ))
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
        .arg("-p")
        .arg(fleet.spec().ssh_port.to_string())
        .arg(format!("{}@{}", fleet.user(), fleet.lb_address()))
        .arg(command)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn owner(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .uid()
}

/// Where the deploy lock and the rollout state live on the load balancer (the default
/// `balancer.state_dir`).
fn state_dir(fleet: &Fleet) -> std::path::PathBuf {
    fleet.upstream_file().parent().unwrap().join(".roller")
}

fn current_links(fleet: &Fleet) -> Vec<Option<String>> {
    fleet
        .host_names()
        .iter()
        .map(|h| fleet.live_release(h))
        .collect()
}

#[test]
fn a_rollout_as_a_non_root_deploy_user_goes_through_sudo_under_load() {
    let Some(fleet) = fleet_of_deploy_users("sudo_rollout", 3, Login::Sudo) else {
        return;
    };
    let inventory = fleet.inventory_path();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let upstream = fleet.upstream_text();
    assert_eq!(owner(&fleet.upstream_file()), 0);

    // `roller plan --commands` prints every command of both sides as it is sent: through sudo.
    let plan = Command::new(env!("CARGO_BIN_EXE_roller"))
        .args(["plan", "--inventory", inventory.to_str().unwrap()])
        .args(["--release", "v2", "--batch", "1", "--commands"])
        .output()
        .unwrap();
    assert!(plan.status.success(), "{plan:?}");
    let plan = String::from_utf8(plan.stdout).unwrap();
    let commands: Vec<&str> = plan
        .lines()
        .filter_map(|l| l.strip_prefix("      $ "))
        .collect();
    assert!(commands.len() > 10, "{plan}");
    assert!(
        commands
            .iter()
            .all(|c| c.starts_with("sudo -n /bin/sh -c ")),
        "{plan}"
    );

    // The deploy user itself can neither write nginx's files nor signal its master.
    let upstream_file = fleet.upstream_file();
    let by_hand = ssh_to_lb(
        &fleet,
        &format!(
            "id -u; echo >> {f} || echo cannot write; kill -HUP $(cat {pid}) || echo cannot signal",
            f = upstream_file.display(),
            pid = upstream_file
                .parent()
                .unwrap()
                .parent()
                .unwrap()
                .join("nginx.pid")
                .display(),
        ),
    );
    assert!(
        !by_hand.starts_with("0\n"),
        "the deploy user is root: {by_hand}"
    );
    assert!(by_hand.contains("cannot write\n"), "{by_hand}");
    assert!(by_hand.ends_with("cannot signal\n"), "{by_hand}");
    assert_eq!(fleet.upstream_text(), upstream);

    // `roller check` asks sudo and runs pre-flight through it, as a rollout will.
    let check = roller(&["check", "--inventory", inventory.to_str().unwrap()]);
    assert_eq!(check.code, Some(0), "{:?} {}", check.lines, check.stderr);
    assert_eq!(check.lines[0]["check"]["ready"], true);

    // Without sudo on the load balancer, the deploy user cannot even take the lock in nginx's
    // directory: refused before anything changes.
    let run = rollout(
        &inventory_with(&fleet, &[("balancer", "sudo", false.into())]),
        &v2,
        "v2",
        "1",
    );
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    let dir = state_dir(&fleet);
    assert!(
        run.stderr.contains(&format!(
            "{} cannot be created or is not writable",
            dir.display()
        )),
        "{}",
        run.stderr
    );
    // Without it on the app hosts, pre-flight finds root's releases directory on each.
    let run = rollout(
        &inventory_with(&fleet, &[("app", "sudo", false.into())]),
        &v2,
        "v2",
        "1",
    );
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    for host in fleet.host_names() {
        assert!(
            run.stderr
                .lines()
                .any(|l| l.contains(&format!("- {host} [preflight]"))
                    && l.ends_with("shop/releases is not writable")),
            "{host}: {}",
            run.stderr
        );
    }
    assert_eq!(fleet.upstream_text(), upstream);
    assert_eq!(current_links(&fleet), vec![Some("v1".to_string()); 3]);

    let from = fleet.access_log_len();
    let load = start_load(&fleet);
    let run = rollout(&inventory, &v2, "v2", "1");
    let traffic = load.stop();

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.report()["outcome"], "succeeded");
    assert_no_failed_requests(&traffic);
    assert!(traffic.versions.contains_key("v1") && traffic.versions.contains_key("v2"));
    // nginx's own log, independently of the load client: every request it took was answered.
    let served = fleet.served_since(from);
    assert!(
        served.len() > 100,
        "{} requests in nginx's log",
        served.len()
    );
    let errors: Vec<_> = served.iter().filter(|(_, status)| *status >= 500).collect();
    assert!(errors.is_empty(), "nginx answered {errors:?}");
    assert_fleet_on(&fleet, "v2", "v2");

    // What roller wrote, it wrote as root: the upstream file (rewritten in root's directory),
    // the lock's state directory and the rollout state, each host's release and link.
    assert_eq!(owner(&fleet.upstream_file()), 0);
    assert_eq!(owner(&dir), 0);
    assert_eq!(owner(&dir.join("shop.rollout.json")), 0);
    for host in fleet.host_names() {
        let app = fleet.host_dir(&host).join("shop");
        assert_eq!(owner(&app.join("releases/v2/app.jar")), 0, "{host}");
        assert_eq!(owner(&app.join("current")), 0, "{host}");
    }
}

#[test]
fn a_sudo_that_asks_for_a_password_is_refused_before_anything_changes() {
    let Some(fleet) = fleet_of_deploy_users("sudo_password", 2, Login::SudoPassword) else {
        return;
    };
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let upstream = std::fs::read(fleet.upstream_file()).unwrap();

    let run = rollout(&fleet.inventory_path(), &v2, "v2", "1");

    assert_eq!(run.code, Some(3), "{}", run.stderr);
    let error = &run.error()["error"];
    assert_eq!(error["kind"], "sudo", "{error}");
    let lb = fleet.lb_address();
    let refused: Vec<(&str, &str, &str)> = error["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["host"].as_str().unwrap(),
                r["key"].as_str().unwrap(),
                r["refusal"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        refused,
        [
            (lb.as_str(), "balancer.sudo", "password-required"),
            ("web-1", "app.sudo", "password-required"),
            ("web-2", "app.sudo", "password-required"),
        ]
    );
    // The message names each host, what sudo said, and the rule that lets roller in.
    let rule = "roller-sudo-pw ALL=(root) NOPASSWD: /bin/sh";
    for host in [lb.as_str(), "web-1", "web-2"] {
        let line = run
            .stderr
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("- {host} [sudo]")))
            .unwrap_or_else(|| panic!("{host} not named: {}", run.stderr));
        assert!(line.contains("sudo: a password is required"), "{line}");
        assert!(line.contains(rule), "{line}");
    }

    // `roller check` finds the same, each host a problem of its own.
    let check = roller(&[
        "check",
        "--inventory",
        fleet.inventory_path().to_str().unwrap(),
    ]);
    assert_eq!(check.code, Some(3), "{}", check.stderr);
    let problems: Vec<(&str, &str)> = check.lines[0]["check"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["host"].as_str().unwrap(), p["step"].as_str().unwrap()))
        .collect();
    assert_eq!(
        problems,
        [(lb.as_str(), "sudo"), ("web-1", "sudo"), ("web-2", "sudo")]
    );
    let message = check.lines[0]["check"]["problems"][1]["message"]
        .as_str()
        .unwrap();
    assert!(message.contains(rule), "{message}");

    // Nothing changed anywhere: not even the deploy lock was taken.
    assert_eq!(std::fs::read(fleet.upstream_file()).unwrap(), upstream);
    assert!(!state_dir(&fleet).exists(), "the lock's directory was made");
    assert_eq!(current_links(&fleet), vec![Some("v1".to_string()); 2]);
    for host in fleet.host_names() {
        let releases = fleet.host_dir(&host).join("shop/releases");
        assert!(!releases.join("v2").exists(), "{host} got v2");
    }
}

/// Blue-green as the deploy user: the idle slots start as root, traffic moves in one reload,
/// and the keep-old timer, started through sudo too, stops the old slots as root.
#[test]
fn a_blue_green_release_and_its_keep_old_timer_run_through_sudo() {
    let Some(fleet) = fleet_of_deploy_users_in("sudo_bg", 2, Login::Sudo, Mode::BlueGreen) else {
        return;
    };
    let inventory = inventory_with(&fleet, &[("blue_green", "keep_old", "3s".into())]);
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    for host in fleet.host_names() {
        assert!(fleet.slot_pid(&host, "blue").is_some(), "{host}: blue runs");
    }
    let load = start_load(&fleet);

    let run = rollout(&inventory, &v2, "v2", "1");
    let traffic = load.stop();

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_no_failed_requests(&traffic);
    assert_eq!(fleet.live_slot().as_deref(), Some("green"));
    for host in fleet.host_names() {
        assert_eq!(fleet.slot_release(&host, "green").as_deref(), Some("v2"));
        assert_eq!(fleet.slot_version(&host, "green").as_deref(), Some("v2"));
        let link = fleet.host_dir(&host).join("shop/current-green");
        assert_eq!(owner(&link), 0, "{host}");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while fleet
        .host_names()
        .iter()
        .any(|h| fleet.slot_pid(h, "blue").is_some())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the old blue slots still run a minute after keep_old"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
