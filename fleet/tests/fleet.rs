//! Tests the test harness: if the local fleet is wrong, every roller test built on it proves
//! nothing, so its promises (real sshd per host, v1 live, nginx balancing, clean shutdown) are
//! checked here on their own.

use std::process::Command;
use std::time::Duration;

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
        let out = Command::new("ssh")
            .arg("-i")
            .arg(fleet.identity_path())
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                fleet.known_hosts_path().display()
            ))
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
            .args(["-o", "ConnectTimeout=10", "-p", "2222"])
            .arg(format!("{}@{}", fleet.user(), fleet.host_address(host)))
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
