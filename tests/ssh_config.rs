//! Hosts named the way operators name them for `ssh`: the inventory lists only aliases, and an
//! OpenSSH client configuration (`ssh.config`) says where each one is, as whom and with which
//! key to log in, and that the fleet, which admits SSH only from its bastion, is reached through
//! it (`ProxyJump` to an alias of the bastion, itself resolved through the same file).

mod e2e;

use std::path::{Path, PathBuf};

use e2e::*;
use roller_fleet::{Bastion, Fleet, FleetSpec, JarSpec};

/// The fleet's inventory with every reach setting taken out of `[ssh]` and every address
/// replaced by an alias, and an ssh config file that maps the aliases back.
fn aliased_inventory(fleet: &Fleet) -> PathBuf {
    let bastion = fleet.bastion().expect("the fleet has a bastion");
    let port = fleet.spec().ssh_port;
    let key = fleet.identity_path();
    let mut config = format!(
        "# Written by tests/ssh_config.rs\n\
         Host jump\n  HostName {}\n  User {}\n  Port {}\n\n",
        bastion.address, bastion.user, bastion.port
    );
    for name in fleet.host_names() {
        config.push_str(&format!(
            "Host {name}\n  HostName {}\n  User {}\n\n",
            fleet.host_address(&name),
            fleet.host_user(&name)
        ));
    }
    config.push_str(&format!(
        "Host shop-lb\n  HostName {}\n  User {}\n\n\
         Host web-* shop-lb jump\n  Port {port}\n  IdentityFile {}\n\n\
         Host * !jump\n  ProxyJump jump\n",
        fleet.lb_address(),
        fleet.user(),
        key.display()
    ));
    let config_path = fleet.root().join("ssh_config");
    std::fs::write(&config_path, config).unwrap();

    let text = std::fs::read_to_string(fleet.inventory_path()).unwrap();
    let mut doc: toml::Table = text.parse().unwrap();
    let ssh = doc["ssh"].as_table_mut().unwrap();
    for key in ["user", "port", "identity", "proxy_jump"] {
        assert!(
            ssh.remove(key).is_some(),
            "the fleet's inventory sets ssh.{key}"
        );
    }
    ssh.insert("config".into(), config_path.to_str().unwrap().into());
    let balancer = doc["balancer"].as_table_mut().unwrap();
    balancer.insert("hosts".into(), toml::Value::Array(vec!["shop-lb".into()]));
    for host in doc["hosts"].as_array_mut().unwrap() {
        let host = host.as_table_mut().unwrap();
        let name = host["name"].clone();
        host.insert("address".into(), name);
        host.remove("user");
    }
    let path = fleet.root().join("inventory-aliases.toml");
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    path
}

#[test]
fn a_fleet_known_only_by_ssh_config_aliases_is_rolled_out_through_the_bastion() {
    let fleet =
        Fleet::up(FleetSpec::for_test("ssh_config", 2).with_bastion(Bastion::Only)).unwrap();
    let inventory = aliased_inventory(&fleet);
    let text = std::fs::read_to_string(&inventory).unwrap();
    for name in fleet.host_names() {
        assert!(
            !text.contains(&fleet.host_address(&name)),
            "{name}'s address in the inventory:\n{text}"
        );
    }

    // The plan reads the file but contacts nothing, and the upstream gets real addresses.
    let plan = plan_text(&inventory);
    assert_eq!(plan.status.code(), Some(0), "{plan:?}");
    let rendered = String::from_utf8_lossy(&plan.stdout);
    assert!(
        rendered.contains(&format!("server {}:", fleet.host_address("web-1"))),
        "the upstream must name web-1's HostName:\n{rendered}"
    );

    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let before = bastion_logins(&fleet);
    let load = start_load(&fleet);
    let run = rollout(&inventory, &v2, "v2", "1");
    let traffic = load.stop();

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.report()["outcome"], "succeeded");
    assert_no_failed_requests(&traffic);
    assert_fleet_on(&fleet, "v2", "v2");
    // The hosts admit only the bastion: every connection went through it.
    assert!(bastion_logins(&fleet) > before, "no login on the bastion");
}

#[test]
fn a_config_file_that_does_not_parse_is_bad_input_naming_it_before_any_connection() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ssh_config");
    std::fs::write(&config, "Host web-1\n  Port twenty-two\n").unwrap();
    let inventory = write_inventory(dir.path(), &config);
    let run = roller(&[
        "rollout",
        "--inventory",
        inventory.to_str().unwrap(),
        "--artifact",
        inventory.to_str().unwrap(),
        "--release",
        "v2",
    ]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    let error = run.error();
    assert_eq!(error["error"]["kind"], "ssh-config", "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains(config.to_str().unwrap()) && message.contains("line 2 does not parse"),
        "{message}"
    );

    // A path that is not there is named too; `true` would take a missing ~/.ssh/config as empty.
    let missing = dir.path().join("absent");
    let inventory = write_inventory(dir.path(), &missing);
    let plan = plan_text(&inventory);
    let stderr = String::from_utf8_lossy(&plan.stderr);
    assert_eq!(plan.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(missing.to_str().unwrap()) && stderr.contains("cannot read"),
        "{stderr}"
    );
}

/// `roller plan --commands`, which shows the upstream files.
fn plan_text(inventory: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_roller"))
        .args(["plan", "--inventory", inventory.to_str().unwrap()])
        .args(["--release", "v2", "--batch", "1", "--commands"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn write_inventory(dir: &Path, config: &Path) -> PathBuf {
    let path = dir.join("inventory.toml");
    std::fs::write(
        &path,
        format!(
            "[ssh]\nconfig = {:?}\n\
             [app]\nname = \"shop\"\ndir = \"/opt/shop\"\nrestart = \"true\"\nport = 8080\n\
             [balancer]\nhosts = [\"shop-lb\"]\nupstream_file = \"/etc/nginx/conf.d/shop.conf\"\n\
             [[hosts]]\nname = \"web-1\"\naddress = \"web-1\"\n",
            config.to_str().unwrap()
        ),
    )
    .unwrap();
    path
}
