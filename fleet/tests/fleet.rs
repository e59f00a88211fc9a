//! Tests the test harness: if the local fleet is wrong, every roller test built on it proves
//! nothing, so its promises (real sshd per host, v1 live, nginx balancing, clean shutdown) are
//! checked here on their own.

use std::net::TcpStream;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use roller_fleet::{Fleet, FleetSpec, Load, LoadOptions, Role, proc};

#[test]
fn two_host_fleet_comes_up_serves_v1_and_goes_down_cleanly() {
    let mut fleet = Fleet::up(FleetSpec::for_test("fleet_up_down", 2)).expect("fleet up");
    let hosts = fleet.host_names();
    assert_eq!(hosts, ["web-1", "web-2"]);

    let mut pids = Vec::new();
    for host in &hosts {
        assert_eq!(fleet.live_release(host).as_deref(), Some("v1"), "{host}");
        assert_eq!(fleet.app_version(host).as_deref(), Some("v1"), "{host}");
        let app = fleet.app_pid(host).expect("app pid");
        assert!(proc::alive(app));
        assert!(proc::alive(fleet.sshd_pid(host)));
        pids.push(app);
        pids.push(fleet.sshd_pid(host));
    }
    pids.push(fleet.sshd_pid("lb"));
    let nginx = fleet.nginx_pid().expect("nginx master pid");
    let workers = proc::children(nginx);
    assert!(!workers.is_empty(), "nginx has workers");
    pids.push(nginx);
    pids.extend(workers);

    let status = fleet.status();
    assert_eq!(status.len(), 3);
    assert_eq!(status[0].role, Role::Balancer);
    assert!(
        status.iter().all(|s| s.sshd_alive && s.app_alive),
        "{status:#?}"
    );
    assert!(status.iter().all(|s| s.health == Some(200)), "{status:#?}");

    let upstream = fleet.upstream_text();
    assert!(
        upstream.starts_with("# Managed by roller\nupstream shop {\n"),
        "{upstream}"
    );
    for host in &hosts {
        assert!(upstream.contains(&format!("    server {}:8080;\n", fleet.host_address(host))));
    }

    // Both backends serve through nginx, and nothing fails.
    let mut options = LoadOptions::new(2);
    options.pause = Duration::ZERO;
    let load = Load::start_with(&fleet.lb_url(), options);
    assert!(
        load.wait_for_requests(60, Duration::from_secs(30)),
        "traffic flows"
    );
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:#?}", report.failures);
    assert_eq!(report.versions.keys().collect::<Vec<_>>(), ["v1"]);
    let access_log = std::fs::read_to_string(fleet.access_log_path()).unwrap();
    for host in &hosts {
        let upstream = format!("{}:8080 200 ", fleet.host_address(host));
        assert!(access_log.contains(&upstream), "nginx used {host}");
    }

    // The real OpenSSH client, with strict host key checking, lands in each host's directory.
    for host in hosts.iter().map(String::as_str).chain(["lb"]) {
        assert_ssh_lands_in_host_dir(&fleet, host);
    }

    // A host's sshd dies with its connections; the app behind it does not notice.
    let old_sshd = fleet.sshd_pid("web-1");
    let marker = fleet.host_dir("web-1").join("session-started");
    let session = Command::new("ssh")
        .args(ssh_args(&fleet, "web-1"))
        .arg("echo $$ > session-started.partial && mv session-started.partial session-started && exec sleep 60")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut session = KillOnDrop(session);
    wait_for(|| marker.exists(), "the ssh session to start");
    let command: u32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let connections = proc::children(old_sshd);
    assert_eq!(connections.len(), 1, "one connection, one sshd child");
    fleet.kill_sshd("web-1");
    assert!(!proc::alive(old_sshd), "listener survived kill_sshd");
    assert!(
        !proc::alive(connections[0]),
        "connection survived kill_sshd"
    );
    // The client sees its connection drop rather than waiting out the remote `sleep 60`,
    // which, as after a crash of sshd, is left running.
    let ended = proc::wait_child(&mut session.0, Duration::from_secs(10)).unwrap();
    assert!(!ended.success(), "ssh ended with {ended}");
    assert!(proc::alive(command));
    assert!(proc::terminate(command, Duration::from_secs(5)));
    let refused = TcpStream::connect_timeout(
        &format!("{}:2222", fleet.host_address("web-1"))
            .parse()
            .unwrap(),
        Duration::from_secs(3),
    );
    assert_eq!(
        refused.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionRefused)
    );
    assert_eq!(fleet.app_health("web-1"), Some(200));
    assert!(fleet.status()[1].app_alive && !fleet.status()[1].sshd_alive);
    assert_ssh_lands_in_host_dir(&fleet, "web-2");

    // Back with the same key (the strict client accepts it) and a recorded new PID.
    fleet.restart_sshd("web-1").unwrap();
    let new_sshd = fleet.sshd_pid("web-1");
    assert_ne!(new_sshd, old_sshd);
    assert!(proc::alive(new_sshd));
    assert_ssh_lands_in_host_dir(&fleet, "web-1");
    let recorded = Fleet::attach(fleet.root()).unwrap();
    assert_eq!(recorded.sshd_pid("web-1"), new_sshd);
    pids.push(new_sshd);

    let inventory = std::fs::read_to_string(fleet.inventory_path()).unwrap();
    assert!(inventory.contains("dir = \"shop\""), "{inventory}");
    assert!(inventory.contains(&format!("hosts = [\"{}\"]", fleet.host_address("lb"))));
    let parsed: toml::Table = inventory.parse().expect("inventory is valid TOML");
    assert_eq!(parsed["hosts"].as_array().unwrap().len(), 2);

    fleet.down();
    for pid in pids {
        assert!(!proc::alive(pid), "pid {pid} survived down");
    }
    fleet.down(); // idempotent
}

/// `ssh` options for a strict, non-interactive login to `host` of `fleet`.
fn ssh_args(fleet: &Fleet, host: &str) -> Vec<String> {
    vec![
        "-i".into(),
        fleet.identity_path().display().to_string(),
        "-o".into(),
        format!("UserKnownHostsFile={}", fleet.known_hosts_path().display()),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "ConnectTimeout=10".into(),
        "-p".into(),
        "2222".into(),
        format!("{}@{}", fleet.user(), fleet.host_address(host)),
    ]
}

fn assert_ssh_lands_in_host_dir(fleet: &Fleet, host: &str) {
    let out = Command::new("ssh")
        .args(ssh_args(fleet, host))
        .arg("pwd")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ssh {host}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = fleet.host_dir(host).canonicalize().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        dir.to_str().unwrap()
    );
}

/// Polls `condition` for up to 10 s.
fn wait_for(condition: impl Fn() -> bool, what: &str) {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A client process that must not outlive a failed assertion.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
