//! Inventory validation: every problem at once, each named by its key path, and no panic.

use roller::inventory::Inventory;

#[test]
fn the_example_inventory_is_valid_and_means_what_its_comments_say() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/inventory.example.toml"
    ))
    .unwrap();
    let inv = Inventory::parse(&text).unwrap();
    assert_eq!(inv.ssh.user.as_deref(), Some("ec2-user"));
    assert_eq!(inv.ssh.port, Some(22));
    assert!(inv.ssh.identity.unwrap().ends_with(".ssh/deploy_ed25519"));
    assert_eq!(inv.app.dir, "/opt/shop");
    assert_eq!(inv.app.keep_releases, 5);
    assert_eq!(inv.health.interval, std::time::Duration::from_millis(500));
    assert_eq!(inv.health.timeout, std::time::Duration::from_secs(60));
    assert_eq!(inv.balancer.hosts, vec!["10.0.0.5"]);
    assert_eq!(
        inv.balancer.drain_timeout,
        std::time::Duration::from_secs(30)
    );
    assert_eq!(inv.hosts.len(), 2);
    assert_eq!(inv.hosts[1].name, "web-2");
    assert_eq!(inv.hosts[0].user, None, "ssh.user applies");
    assert_eq!(inv.hosts[1].user.as_deref(), Some("ubuntu"));
}

fn problems(text: &str) -> Vec<String> {
    Inventory::parse(text)
        .unwrap_err()
        .into_iter()
        .map(|p| p.to_string())
        .collect()
}

const MINIMAL: &str = r#"
[ssh]
user = "deploy"
[app]
name = "shop"
dir = "/opt/shop"
restart = "systemctl restart shop"
port = 8080
[balancer]
hosts = ["10.0.0.5"]
upstream_file = "/etc/nginx/conf.d/shop.conf"
[[hosts]]
name = "web-1"
address = "10.0.1.11"
"#;

#[test]
fn defaults_fill_what_the_minimal_inventory_leaves_out() {
    let inv = Inventory::parse(MINIMAL).unwrap();
    assert_eq!(inv.app.jar_name, "app.jar");
    assert_eq!(inv.balancer.upstream, "shop");
    assert_eq!(inv.balancer.reload, "nginx -t && nginx -s reload");
    assert_eq!(inv.health.path, "/actuator/health");
    assert_eq!(inv.ssh.identity, None);
    assert_eq!(
        inv.balancer.drain_quiet,
        std::time::Duration::from_millis(100)
    );
}

#[test]
fn a_drain_quiet_window_must_fit_in_the_drain_timeout() {
    let text = MINIMAL.replace(
        "[balancer]\n",
        "[balancer]\ndrain_timeout = \"2s\"\ndrain_quiet = \"2s\"\n",
    );
    assert_eq!(
        problems(&text),
        vec!["balancer.drain_quiet: must be shorter than balancer.drain_timeout"]
    );
}

#[test]
fn every_problem_is_reported_at_once_with_its_key_path() {
    let text = r#"
[ssh]
user = "deploy"
port = 70000
conect_timeout = "5s"
[app]
name = "shop"
dir = "/opt/shop"
restart = "systemctl restart shop"
port = "8080"
keep_releases = 1
[health]
interval = "soon"
path = "actuator/health"
[balancer]
hosts = []
upstream_file = "/etc/nginx/conf.d/shop.conf"
[[hosts]]
name = "web-1"
address = "10.0.1.11"
[[hosts]]
name = "web-1"
address = "10.0.1.11"
[[hosts]]
name = "web 3"
user = "ec2 user"
"#;
    assert_eq!(
        problems(text),
        vec![
            "ssh.conect_timeout: unknown key (expected one of: user, port, identity, identity_passphrase_env, known_hosts, connect_timeout, allow_sha1_rsa, proxy_jump, proxy_command, max_concurrent_connects, config)",
            "ssh.port: must be between 1 and 65535, got 70000",
            "app.port: must be an integer, got string",
            "app.keep_releases: must be between 2 and 1000, got 1",
            "health.interval: \"soon\" is not a duration like \"500ms\", \"10s\" or \"2m\"",
            "health.path: must start with \"/\" and contain no spaces, got \"actuator/health\"",
            "balancer.hosts: must name at least one load-balancer host",
            "hosts[1].name: duplicate \"web-1\" (also hosts[0].name)",
            "hosts[1].address: duplicate \"10.0.1.11\" (also hosts[0].address)",
            "hosts[2].name: \"web 3\" may only contain letters, digits, '.', '_' and '-'",
            "hosts[2].user: \"ec2 user\" may only contain letters, digits, '.', '_' and '-'",
            "hosts[2].address: missing",
        ]
    );
}

#[test]
fn missing_sections_and_syntax_errors_are_named_not_panicked_on() {
    assert_eq!(
        problems("[ssh]\nuser = \"x\"\n"),
        vec![
            "app: missing section",
            "balancer: missing section",
            "hosts: missing: add at least one [[hosts]] entry",
        ]
    );
    let syntax = problems("[ssh\nuser = 1");
    assert_eq!(syntax.len(), 1);
    assert!(syntax[0].starts_with("(syntax): "), "{syntax:?}");
    assert_eq!(
        problems(
            "ssh = 3\napp = []\n[balancer]\nhosts = \"lb\"\nupstream_file = \"/x\"\n[[hosts]]\nname = \"a\"\naddress = \"$(reboot)\"\n"
        ),
        vec![
            "ssh: must be a table, got integer",
            "app: must be a table, got array",
            "balancer.hosts: must be a list of addresses, got string",
            "hosts[0].address: \"$(reboot)\" is not a host name or IP address",
        ]
    );
}

#[test]
fn a_missing_inventory_file_is_named() {
    let err = Inventory::load(std::path::Path::new("/nonexistent/roller.toml")).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("/nonexistent/roller.toml"), "{text}");
}

#[test]
fn the_lock_host_is_the_same_whatever_the_order_of_the_load_balancers() {
    let with = |hosts: &str, extra: &str| {
        MINIMAL.replace(
            "hosts = [\"10.0.0.5\"]",
            &format!("hosts = {hosts}\n{extra}"),
        )
    };
    let forward = Inventory::parse(&with(r#"["10.0.0.7", "10.0.0.5", "10.0.0.6"]"#, "")).unwrap();
    let reverse = Inventory::parse(&with(r#"["10.0.0.6", "10.0.0.5", "10.0.0.7"]"#, "")).unwrap();
    assert_eq!(forward.balancer.lock_host, "10.0.0.5");
    assert_eq!(reverse.balancer.lock_host, "10.0.0.5");
    assert_eq!(
        forward.balancer.lock_lease,
        std::time::Duration::from_secs(60)
    );

    let chosen = Inventory::parse(&with(
        r#"["10.0.0.7", "10.0.0.5"]"#,
        "lock_host = \"10.0.0.7\"\nlock_lease = \"20s\"",
    ))
    .unwrap();
    assert_eq!(chosen.balancer.lock_host, "10.0.0.7");
    assert_eq!(
        chosen.balancer.lock_lease,
        std::time::Duration::from_secs(20)
    );

    assert_eq!(
        problems(&with(
            r#"["10.0.0.5"]"#,
            "lock_host = \"10.0.0.9\"\nlock_lease = \"1s\""
        )),
        [
            "balancer.lock_lease: must be at least 3s: it is renewed every third of it",
            "balancer.lock_host: \"10.0.0.9\" is not one of balancer.hosts",
        ]
    );
}

#[test]
fn adopting_blue_green_needs_app_port_apart_from_both_slots() {
    let text = format!(
        "strategy = \"blue-green\"\n{MINIMAL}\n[blue_green]\nblue_port = 8080\nrestart = \"r {{slot}}\"\nstop = \"s {{slot}}\"\nadopt_stop = \"systemctl stop shop\"\n"
    );
    assert_eq!(
        problems(&text),
        vec![
            "blue_green.adopt_stop: adopting needs app.port (8080) to differ from both slots' ports, which the old process would still hold"
        ]
    );
    let fine = text.replace("blue_port = 8080", "blue_port = 8081");
    let inv = Inventory::parse(&fine).unwrap();
    assert_eq!(
        inv.blue_green.unwrap().adopt_stop.as_deref(),
        Some("systemctl stop shop")
    );
}

#[test]
fn the_upstream_block_and_server_parameters_are_checked_key_by_key() {
    let text = MINIMAL.replace(
        "[[hosts]]\n",
        "[balancer.upstream_block]\nzone = \"lots\"\nbalance = \"hash $remote_addr; evil\"\nkeepalive = 0\nkeepalive_timeout = \"soon\"\nkeepalive_requets = 5\n[[hosts]]\nmax_fails = \"3\"\nfail_timeout = \"10 s\"\nmax_conns = -1\nbackup = \"yes\"\n",
    );
    assert_eq!(
        problems(&text),
        vec![
            "balancer.upstream_block.keepalive_requets: unknown key (expected one of: zone, balance, keepalive, keepalive_timeout, keepalive_requests)",
            "balancer.upstream_block.zone: \"lots\" is not a size like \"64k\" or \"1m\"",
            "balancer.upstream_block.balance: \"hash $remote_addr; evil\" is not one of least_conn, ip_hash, random, random two [least_conn], hash <key> [consistent]",
            "balancer.upstream_block.keepalive: must be between 1 and 1000000, got 0",
            "balancer.upstream_block.keepalive_timeout: \"soon\" is not an nginx time like \"500ms\", \"10s\" or \"1m\"",
            "hosts[0].max_fails: must be an integer, got string",
            "hosts[0].fail_timeout: \"10 s\" is not an nginx time like \"500ms\", \"10s\" or \"1m\"",
            "hosts[0].max_conns: must be between 0 and 1000000, got -1",
            "hosts[0].backup: must be true or false, got string",
        ]
    );
    let hashed = MINIMAL.replace(
        "[[hosts]]\n",
        "[balancer.upstream_block]\nbalance = \"hash $request_uri consistent\"\n[[hosts]]\nbackup = true\n",
    );
    assert_eq!(
        problems(&hashed),
        vec![
            "hosts[0].backup: nginx does not allow backup servers with balancer.upstream_block.balance = \"hash $request_uri consistent\""
        ]
    );
    let good = MINIMAL.replace(
        "[[hosts]]\n",
        "[balancer.upstream_block]\nzone = \"64k\"\nbalance = \"least_conn\"\nkeepalive = 8\n[[hosts]]\nmax_fails = 2\nbackup = true\n",
    );
    let inv = Inventory::parse(&good).unwrap();
    assert_eq!(inv.balancer.upstream_block.keepalive, Some(8));
    assert_eq!(inv.hosts[0].server.max_fails, Some(2));
    assert!(inv.hosts[0].server.backup);
}

/// `MINIMAL` with its `[[hosts]]` swapped for `discovery`.
fn discovering(discovery: &str) -> String {
    let head = MINIMAL.split("[[hosts]]").next().unwrap();
    format!("{head}{discovery}")
}

#[test]
fn hosts_can_come_from_ec2_and_are_found_only_when_a_command_needs_them() {
    use roller::discovery::{AddressKind, Discovery};
    let inv = Inventory::parse(&discovering(
        r#"
[discovery.ec2]
region = "eu-west-1"
filters = { "tag:Role" = "shop", "tag:Env" = ["prod", "staging"] }
address = "public-dns"
user = "ec2-user"
"#,
    ))
    .unwrap();
    assert!(inv.hosts.is_empty(), "parsing asks no API");
    let Some(Discovery::Ec2(ec2)) = &inv.discovery else {
        panic!("no discovery: {:?}", inv.discovery)
    };
    assert_eq!(ec2.region.as_deref(), Some("eu-west-1"));
    assert_eq!(ec2.address, AddressKind::PublicDns);
    assert_eq!(ec2.name_tag, "Name", "the default");
    assert_eq!(ec2.filters["tag:Env"], ["prod", "staging"]);
    assert_eq!(ec2.user.as_deref(), Some("ec2-user"));
}

#[test]
fn ec2_discovery_is_checked_key_by_key() {
    assert_eq!(
        problems(&discovering(
            r#"
[discovery.ec2]
region = "Europe West"
filters = { "tag:Role" = 3, "tag:Env" = [] }
address = "elastic-ip"
zone = "a"
"#
        )),
        [
            "discovery.ec2.zone: unknown key (expected one of: region, filters, address, name_tag, user)",
            "discovery.ec2.region: \"Europe West\" is not a region name like \"eu-west-1\"",
            "discovery.ec2.address: \"elastic-ip\" is not one of \"private-ip\", \"public-ip\", \"private-dns\", \"public-dns\"",
            "discovery.ec2.filters.\"tag:Env\": must be a non-empty string or a list of them, under a filter name",
            "discovery.ec2.filters.\"tag:Role\": must be a non-empty string or a list of them, under a filter name",
        ]
    );
    // No filter would match every instance of the account.
    let p = problems(&discovering("[discovery.ec2]\nregion = \"eu-west-1\"\n"));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].starts_with("discovery.ec2.filters: missing"), "{p:?}");
    assert_eq!(
        problems(&discovering("[discovery]\n")),
        ["discovery: names no source: add [discovery.ec2]"]
    );
}

#[test]
fn listed_hosts_and_discovery_exclude_each_other() {
    let text = format!("{MINIMAL}\n[discovery.ec2]\nfilters = {{ \"tag:Role\" = \"shop\" }}\n");
    assert_eq!(
        problems(&text),
        ["hosts: [[hosts]] and [discovery] exclude each other: list the hosts, or find them"]
    );
}
