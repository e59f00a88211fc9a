use std::path::{Path, PathBuf};

use super::*;
use crate::inventory::Inventory;

const REST: &str = r#"
[app]
name = "shop"
dir = "/opt/shop"
restart = "systemctl restart shop"
port = 8080
[balancer]
hosts = ["lb"]
upstream_file = "/etc/nginx/conf.d/shop.conf"
"#;

/// An ssh config with one alias per level of precedence to observe.
const CONFIG: &str = "\
Host bastion
  HostName 10.0.0.9
  User ops
  Port 2222
  IdentityFile /keys/bastion_%r

Host web-*
  HostName 10.0.1.%h
  User from-config
  Port 2200
  IdentityFile /keys/config_%n
  ProxyJump bastion

Host lb
  HostName 10.0.0.5
  User lb-admin
";

struct Case {
    _dir: tempfile::TempDir,
    inventory: Inventory,
}

fn case(ssh: &str, hosts: &str) -> Case {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::write(&config, CONFIG).unwrap();
    let text = format!(
        "[ssh]\nconfig = {:?}\n{ssh}\n{REST}\n{hosts}",
        config.display().to_string()
    );
    Case {
        inventory: Inventory::parse(&text).unwrap(),
        _dir: dir,
    }
}

fn host(name: &str, extra: &str) -> String {
    format!("[[hosts]]\nname = \"{name}\"\naddress = \"{name}\"\n{extra}\n")
}

fn resolved(case: &Case) -> Vec<Endpoint> {
    endpoints(&case.inventory).unwrap()
}

fn bastion() -> Hop {
    Hop {
        user: Some("ops".into()),
        address: "10.0.0.9".into(),
        port: Some(2222),
        identity: Some(PathBuf::from("/keys/bastion_ops")),
    }
}

#[test]
fn the_ssh_config_fills_in_what_the_inventory_leaves_out() {
    let c = case("", &host("web-1", ""));
    let [web, lb] = &resolved(&c)[..] else {
        panic!()
    };
    assert_eq!(
        *web,
        Endpoint {
            name: "web-1".into(),
            address: "10.0.1.web-1".into(),
            port: 2200,
            user: Some("from-config".into()),
            identity: Some(PathBuf::from("/keys/config_web-1")),
            proxy_jump: Some(vec![bastion()]),
        }
    );
    // No Host block but its HostName: defaults for the rest.
    assert_eq!(lb.address, "10.0.0.5");
    assert_eq!(lb.port, 22);
    assert_eq!(lb.identity, None, "the ssh-agent");
    assert_eq!(lb.proxy_jump, None, "directly");
}

#[test]
fn ssh_section_values_win_over_the_config_and_host_values_over_both() {
    let c = case(
        "user = \"from-ssh\"\nport = 2300\nidentity = \"/keys/ssh\"\nproxy_jump = \"jump@bastion:2022\"",
        &format!(
            "{}{}",
            host("web-1", ""),
            host(
                "web-2",
                "user = \"from-host\"\nport = 2400\nidentity = \"/keys/host\"\nproxy_jump = \"none\""
            )
        ),
    );
    let endpoints = resolved(&c);
    let (web1, web2) = (&endpoints[0], &endpoints[1]);
    assert_eq!(
        (web1.user.as_deref(), web1.port, web1.identity.as_deref()),
        (Some("from-ssh"), 2300, Some(Path::new("/keys/ssh")))
    );
    // The hop's own user and port win over the bastion's Host block; its HostName and key
    // still come from there.
    assert_eq!(
        web1.proxy_jump,
        Some(vec![Hop {
            user: Some("jump".into()),
            port: Some(2022),
            identity: Some(PathBuf::from("/keys/bastion_jump")),
            ..bastion()
        }])
    );
    assert_eq!(
        (web2.user.as_deref(), web2.port, web2.identity.as_deref()),
        (Some("from-host"), 2400, Some(Path::new("/keys/host")))
    );
    assert_eq!(web2.proxy_jump, Some(vec![]), "none: directly");
    // HostName has no inventory counterpart: the config's still applies.
    assert_eq!(web2.address, "10.0.1.web-2");
}

#[test]
fn a_proxy_command_in_the_inventory_wins_over_the_configs_proxy_jump() {
    let c = case(
        "proxy_command = \"nc %h %p\"",
        &format!(
            "{}{}",
            host("web-1", ""),
            host("web-2", "proxy_jump = \"bastion\"")
        ),
    );
    let endpoints = resolved(&c);
    assert_eq!(endpoints[0].proxy_jump, None, "left to the proxy command");
    assert_eq!(endpoints[1].proxy_jump, Some(vec![bastion()]));
}

#[test]
fn a_proxy_command_in_the_config_is_refused_only_where_it_would_be_used() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config");
    std::fs::write(&file, "Host *\n  ProxyCommand nc %h %p\n").unwrap();
    let config = ConfigFile::load(&file, false).unwrap();
    let ssh = Inventory::parse(&format!("[ssh]\nuser = \"u\"\n{REST}{}", host("w", "")))
        .unwrap()
        .ssh;
    let reach = Reach {
        ssh: &ssh,
        config: Some(&config),
        local_user: None,
    };
    let err = reach
        .endpoint("w", "w", None, &HostReach::default())
        .unwrap_err();
    assert!(
        err.contains("ProxyCommand") && err.contains("nc %h %p"),
        "{err}"
    );
    let direct = HostReach {
        proxy_jump: Some(vec![]),
        ..HostReach::default()
    };
    assert_eq!(
        reach.endpoint("w", "w", None, &direct).unwrap().proxy_jump,
        Some(vec![])
    );
}

#[test]
fn a_bastion_reached_through_another_comes_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config");
    std::fs::write(
        &file,
        "Host inner\n  HostName 10.1.0.9\n  ProxyJump outer\nHost outer\n  HostName 192.0.2.1\n\
         Host loop-a\n  ProxyJump loop-b\nHost loop-b\n  ProxyJump loop-a\n",
    )
    .unwrap();
    let config = ConfigFile::load(&file, false).unwrap();
    let ssh = Inventory::parse(&format!("[ssh]\nuser = \"u\"\n{REST}{}", host("w", "")))
        .unwrap()
        .ssh;
    let reach = Reach {
        ssh: &ssh,
        config: Some(&config),
        local_user: None,
    };
    let through = |jump: &str| {
        let overrides = HostReach {
            proxy_jump: Some(crate::transport::ssh::parse_proxy_jump(jump).unwrap()),
            ..HostReach::default()
        };
        reach.endpoint("w", "w", None, &overrides)
    };
    let hops = through("inner").unwrap().proxy_jump.unwrap();
    let addresses: Vec<&str> = hops.iter().map(|h| h.address.as_str()).collect();
    assert_eq!(addresses, ["192.0.2.1", "10.1.0.9"]);
    let err = through("loop-a").unwrap_err();
    assert!(err.contains("loop"), "{err}");
}

#[test]
fn without_a_config_hosts_are_reached_as_the_inventory_says() {
    let inv = Inventory::parse(&format!(
        "[ssh]\nuser = \"deploy\"\n{REST}{}",
        host("web-1", "port = 2200")
    ))
    .unwrap();
    let endpoints = endpoints(&inv).unwrap();
    assert_eq!(
        endpoints[0],
        Endpoint {
            name: "web-1".into(),
            address: "web-1".into(),
            port: 2200,
            user: Some("deploy".into()),
            ..Endpoint::default()
        }
    );
    assert_eq!(endpoints[1].port, 22);
}

#[test]
fn a_missing_config_file_is_an_error_naming_it_before_any_connection() {
    let inv = Inventory::parse(&format!(
        "[ssh]\nconfig = \"/nonexistent/roller/ssh_config\"\n{REST}{}",
        host("web-1", "")
    ))
    .unwrap();
    let err = endpoints(&inv).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("/nonexistent/roller/ssh_config"), "{text}");
    assert!(text.contains("cannot read"), "{text}");
    assert!(matches!(err, Error::SshConfig { .. }));
}

#[test]
fn the_upstream_gets_the_address_an_alias_stands_for_and_ssh_the_same_reach() {
    let mut c = case("", &host("web-1", ""));
    let before = resolved(&c);
    c.inventory.apply_host_names().unwrap();
    let web = &c.inventory.hosts[0];
    assert_eq!(web.address, "10.0.1.web-1");
    assert_eq!(web.reach.alias.as_deref(), Some("web-1"));
    assert_eq!(
        resolved(&c),
        before,
        "the Host blocks still match the alias"
    );
    // Once more, after discovery: nothing changes twice.
    c.inventory.apply_host_names().unwrap();
    assert_eq!(c.inventory.hosts[0].address, "10.0.1.web-1");
}
