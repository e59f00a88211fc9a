//! Hosts found through the EC2 API, end to end: a local EC2 API (`moto_server`, from the
//! Python package `moto[server]`) holds one running instance per host of a local fleet, at the
//! host's own loopback address (moto takes a VPC and subnet in 127.0.0.0/8 and a chosen
//! `PrivateIpAddress` per instance), plus a stopped instance and one with other tags. roller
//! asks the API through the `aws` CLI with `AWS_ENDPOINT_URL`, exactly as it asks AWS. The
//! same fleet in a private network, reachable only through its bastion, is found and rolled
//! out the same way.

mod e2e;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::*;
use roller_fleet::users::Login;
use roller_fleet::{Bastion, Behaviour, Fleet, FleetSpec, JarSpec};
use serde_json::Value;

const REGION: &str = "eu-west-1";

/// A `moto_server` on a loopback port of its own, stopped by PID when dropped.
struct Ec2Api {
    child: Child,
    endpoint: String,
    /// The `Env` tag of this fleet's instances, part of every filter the tests use.
    env_tag: String,
    dir: PathBuf,
}

impl Drop for Ec2Api {
    fn drop(&mut self) {
        roller_fleet::proc::terminate(self.child.id(), Duration::from_secs(5));
        let _ = self.child.wait();
    }
}

impl Ec2Api {
    fn start(dir: &Path, env_tag: &str) -> Ec2Api {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.join("moto.log")).unwrap();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("moto_server on PATH (pip install 'moto[server]')");
        let api = Ec2Api {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            env_tag: env_tag.to_string(),
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen within 60 s: {}",
                std::fs::read_to_string(dir.join("moto.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        api
    }

    /// What roller and the aws CLI need to reach this API and nothing else: no profile or
    /// credentials of the machine's user leak in.
    fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_DEFAULT_REGION", REGION),
            ("AWS_CONFIG_FILE", "/nonexistent/aws-config"),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/aws-credentials",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn aws(&self, args: &[&str]) -> Value {
        let out = Command::new("aws")
            .args(args)
            .args(["--output", "json"])
            .envs(self.env())
            .stdin(Stdio::null())
            .output()
            .expect("aws CLI on PATH (pip install awscli)");
        assert!(
            out.status.success(),
            "aws {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("moto.log")).unwrap_or_default()
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// A subnet holding `address`'s /24, in a VPC of its /16.
    fn subnet_for(&self, address: &str) -> String {
        let o: Vec<&str> = address.split('.').collect();
        let vpc = self.aws(&[
            "ec2",
            "create-vpc",
            "--cidr-block",
            &format!("{}.{}.0.0/16", o[0], o[1]),
        ]);
        let subnet = self.aws(&[
            "ec2",
            "create-subnet",
            "--vpc-id",
            vpc["Vpc"]["VpcId"].as_str().unwrap(),
            "--cidr-block",
            &format!("{}.{}.{}.0/24", o[0], o[1], o[2]),
        ]);
        subnet["Subnet"]["SubnetId"].as_str().unwrap().to_string()
    }

    /// One instance at `address` with these tags; returns its id.
    fn run_instance(&self, subnet: &str, address: &str, tags: &[(&str, &str)]) -> String {
        let tags = tags
            .iter()
            .map(|(k, v)| format!("{{Key={k},Value={v}}}"))
            .collect::<Vec<_>>()
            .join(",");
        let out = self.aws(&[
            "ec2",
            "run-instances",
            "--image-id",
            "ami-12c6146b",
            "--count",
            "1",
            "--subnet-id",
            subnet,
            "--private-ip-address",
            address,
            "--tag-specifications",
            &format!("ResourceType=instance,Tags=[{tags}]"),
        ]);
        let instance = &out["Instances"][0];
        assert_eq!(instance["PrivateIpAddress"], address, "{out}");
        instance["InstanceId"].as_str().unwrap().to_string()
    }
}

/// The fleet's inventory with `[discovery.ec2]` for `filters` instead of its `[[hosts]]`.
fn discovering_inventory(fleet: &Fleet, filters: &[(&str, &str)], name: &str) -> PathBuf {
    let text = std::fs::read_to_string(fleet.inventory_path()).unwrap();
    let mut doc: toml::Table = text.parse().unwrap();
    doc["health"]
        .as_table_mut()
        .unwrap()
        .insert("timeout".into(), "4s".into());
    doc.remove("hosts").expect("the fleet lists its hosts");
    let mut ec2 = toml::Table::new();
    ec2.insert("region".into(), REGION.into());
    ec2.insert(
        "filters".into(),
        toml::Value::Table(
            filters
                .iter()
                .map(|(k, v)| (k.to_string(), toml::Value::from(*v)))
                .collect(),
        ),
    );
    ec2.insert("address".into(), "private-ip".into());
    ec2.insert("name_tag".into(), "Name".into());
    // Every app host logs in as one user (`with_app_login`), the load balancer as another.
    ec2.insert("user".into(), fleet.host_user("web-1").into());
    let mut discovery = toml::Table::new();
    discovery.insert("ec2".into(), toml::Value::Table(ec2));
    doc.insert("discovery".into(), toml::Value::Table(discovery));
    let path = fleet.root().join(name);
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    path
}

fn with_api(api: &Ec2Api, args: &[String]) -> Run {
    Running::start_with_env(args, &api.env()).finish()
}

/// Runs `roller plan` in text mode, as a person would.
fn plan_text(api: &Ec2Api, inventory: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_roller"))
        .args(["plan", "--inventory", inventory.to_str().unwrap()])
        .args(["--release", "v2", "--batch", "1"])
        .envs(api.env())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fleet of `hosts` (behind `bastion`), and an API holding an instance for each (tagged
/// Role=shop and this fleet's Env), a stopped one and one of another role at addresses of the
/// fleet's net no host uses.
fn fleet_in_ec2(test: &str, hosts: usize, bastion: Bastion) -> (Fleet, Ec2Api) {
    let fleet = Fleet::up(
        FleetSpec::for_test(test, hosts)
            .with_app_login(Login::Bash)
            .with_bastion(bastion),
    )
    .unwrap();
    let env_tag = format!("{test}-{}", std::process::id());
    let api = Ec2Api::start(fleet.root(), &env_tag);
    let subnet = api.subnet_for(&fleet.host_address("web-1"));
    let ours = [("Role", "shop"), ("Env", env_tag.as_str())];
    for name in fleet.host_names() {
        let address = fleet.host_address(&name);
        api.run_instance(&subnet, &address, &[ours[0], ours[1], ("Name", &name)]);
    }
    let net = fleet.host_address("web-1");
    let net = net.rsplit_once('.').unwrap().0;
    let stopped = api.run_instance(
        &subnet,
        &format!("{net}.200"),
        &[ours[0], ours[1], ("Name", "web-stopped")],
    );
    api.aws(&["ec2", "stop-instances", "--instance-ids", &stopped]);
    api.run_instance(
        &subnet,
        &format!("{net}.201"),
        &[("Role", "search"), ours[1], ("Name", "search-1")],
    );
    (fleet, api)
}

#[test]
fn the_fleet_found_through_the_ec2_api_is_planned_and_rolled_out() {
    let (fleet, api) = fleet_in_ec2("ec2", 3, Bastion::None);
    let inventory = discovering_inventory(
        &fleet,
        &[("tag:Role", "shop"), ("tag:Env", &api.env_tag)],
        "inventory-ec2.toml",
    );
    let expected: Vec<(String, String)> = fleet
        .host_names()
        .into_iter()
        .map(|n| (fleet.host_address(&n), n))
        .map(|(a, n)| (n, a))
        .collect();

    let (code, stdout, stderr) = plan_text(&api, &inventory);
    assert_eq!(code, Some(0), "{stderr}");
    let found = stderr
        .lines()
        .find(|l| l.starts_with("found "))
        .unwrap_or_else(|| panic!("plan printed no hosts found: {stderr}"));
    let listed: Vec<String> = expected.iter().map(|(n, a)| format!("{n} ({a})")).collect();
    assert_eq!(
        found,
        format!(
            "found 3 hosts (EC2 instances in {REGION} with tag:Env={}, tag:Role=shop): {}",
            api.env_tag,
            listed.join(", ")
        )
    );
    for (name, _) in &expected {
        assert!(
            stdout.contains(name.as_str()),
            "{name} not in the plan:\n{stdout}"
        );
    }
    // The instances left out: by name, and by address (the fleet's net is drawn at random, so
    // a bare ".200" could be part of it).
    let net = fleet.host_address("web-1");
    let net = net.rsplit_once('.').unwrap().0;
    let (stopped, other) = (format!("{net}.200"), format!("{net}.201"));
    for left_out in ["web-stopped", "search-1", &stopped, &other] {
        assert!(
            !mentions(&stdout, left_out),
            "{left_out} in the plan:\n{stdout}"
        );
        assert!(!mentions(&stderr, left_out), "{left_out} found:\n{stderr}");
    }

    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let load = start_load(&fleet);
    let run = with_api(&api, &rollout_args(&inventory, &v2, "v2", "1", &[]));
    let traffic = load.stop();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let rolled: Vec<(String, String, bool)> = report_hosts(&run);
    assert_eq!(
        rolled,
        expected
            .iter()
            .map(|(n, _)| (n.clone(), "updated".to_string(), true))
            .collect::<Vec<_>>()
    );
    assert_no_failed_requests(&traffic);
    assert_fleet_on(&fleet, "v2", "v2");
    // The journal's rollout state records what was found, for resume and recover.
    let state = last_state(&inventory);
    let recorded: Vec<(String, String)> = state["found"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap().to_string(),
                h["address"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(recorded, expected);
}

/// The fleet of `through_bastion.rs` (twelve hosts and the load balancer admitting SSH only
/// from the bastion), found through the API instead of listed: the found addresses are
/// reached with `ssh.proxy_jump` and `ssh.port` like listed ones.
#[test]
fn the_fleet_found_through_the_ec2_api_is_rolled_out_through_the_bastion() {
    let (fleet, api) = fleet_in_ec2("ec2-bastion", 12, Bastion::Only);
    let inventory = discovering_inventory(
        &fleet,
        &[("tag:Role", "shop"), ("tag:Env", &api.env_tag)],
        "inventory-ec2-bastion.toml",
    );
    let doc: toml::Table = std::fs::read_to_string(&inventory)
        .unwrap()
        .parse()
        .unwrap();
    assert!(doc["ssh"].get("proxy_jump").is_some(), "{doc}");
    assert!(doc.get("hosts").is_none(), "{doc}");
    let mut expected: Vec<(String, String)> = fleet
        .host_names()
        .into_iter()
        .map(|n| (n.clone(), fleet.host_address(&n)))
        .collect();
    expected.sort();

    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let logins = bastion_logins(&fleet);
    let load = start_load(&fleet);
    let run = with_api(&api, &rollout_args(&inventory, &v2, "v2", "25%", &[]));
    let traffic = load.stop();

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.report()["outcome"], "succeeded");
    assert_no_failed_requests(&traffic);
    assert_fleet_on(&fleet, "v2", "v2");
    let mut rolled: Vec<String> = report_hosts(&run)
        .into_iter()
        .map(|(name, outcome, in_pool)| {
            assert_eq!((outcome.as_str(), in_pool), ("updated", true), "{name}");
            name
        })
        .collect();
    rolled.sort();
    let names: Vec<String> = expected.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(rolled, names);
    // One bastion connection carries the found hosts too.
    let logins = bastion_logins(&fleet) - logins;
    assert!((1..=2).contains(&logins), "{logins} logins on the bastion");
    // The stopped instance and the one with other tags were never a target of anything.
    let net = fleet.host_address("web-1");
    let net = net.rsplit_once('.').unwrap().0;
    let events: String = run.lines.iter().map(|l| format!("{l}\n")).collect();
    for left_out in [
        "web-stopped",
        "search-1",
        &format!("{net}.200"),
        &format!("{net}.201"),
    ] {
        assert!(!mentions(&events, left_out), "{left_out} in the events");
        assert!(
            !mentions(&run.stderr, left_out),
            "{left_out}: {}",
            run.stderr
        );
    }
    // The rollout state records the hosts found, for resume and recover.
    let mut recorded: Vec<(String, String)> = last_state(&inventory)["found"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap().to_string(),
                h["address"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    recorded.sort();
    assert_eq!(recorded, expected);
}

#[test]
fn no_matching_instance_is_bad_input_naming_the_filters() {
    let (fleet, api) = fleet_in_ec2("ec2-none", 1, Bastion::None);
    let inventory = discovering_inventory(
        &fleet,
        &[("tag:Role", "checkout"), ("tag:Env", &api.env_tag)],
        "inventory-none.toml",
    );
    let (code, stdout, stderr) = plan_text(&api, &inventory);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert_eq!(
        stderr.trim(),
        format!(
            "error: host discovery: no running host found: EC2 instances in {REGION} with tag:Env={}, tag:Role=checkout",
            api.env_tag
        )
    );
    // The same for a rollout, before anything is contacted over SSH.
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let run = with_api(&api, &rollout_args(&inventory, &v2, "v2", "1", &[]));
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert_eq!(run.error()["error"]["kind"], "discovery");
    assert_eq!(fleet.live_release("web-1").as_deref(), Some("v1"));
}

#[test]
fn recover_acts_on_the_hosts_the_rollout_found_even_after_the_group_changed() {
    let (fleet, api) = fleet_in_ec2("ec2-recover", 2, Bastion::None);
    let inventory = discovering_inventory(
        &fleet,
        &[("tag:Role", "shop"), ("tag:Env", &api.env_tag)],
        "inventory-ec2.toml",
    );
    let bad = fleet
        .jar(&JarSpec::healthy("v2").with_behaviour(Behaviour::NeverHealthy))
        .unwrap();
    let run = with_api(
        &api,
        &rollout_args(&inventory, &bad, "v2", "1", &["--on-failure", "halt"]),
    );
    assert_eq!(run.code, Some(6), "{}", run.stderr);
    assert_eq!(fleet.live_release("web-1").as_deref(), Some("v2"));

    // The group scales in: web-1's instance is gone from the API.
    let instances = api.aws(&[
        "ec2",
        "describe-instances",
        "--filters",
        "Name=tag:Name,Values=web-1",
    ]);
    let id = instances["Reservations"][0]["Instances"][0]["InstanceId"]
        .as_str()
        .unwrap()
        .to_string();
    api.aws(&["ec2", "terminate-instances", "--instance-ids", &id]);

    let recovered = with_api(&api, &admin_args("recover", &inventory, &[]));
    assert_eq!(recovered.code, Some(0), "{}", recovered.stderr);
    let hosts: Vec<String> = report_hosts(&recovered)
        .into_iter()
        .map(|(name, _, in_pool)| {
            assert!(in_pool, "{name} left out of the pool");
            name
        })
        .collect();
    assert_eq!(hosts, ["web-1", "web-2"]);
    assert_fleet_on(&fleet, "v1", "v1");
}

/// Whether `text` has `word` not followed by another digit (`127.1.2.20` is not `127.1.2.201`).
fn mentions(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        !text[i + word.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// The last rollout state in the inventory's journal directory.
fn last_state(inventory: &Path) -> Value {
    let dir = journal_dir(inventory).join("shop");
    let journal = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .unwrap_or_else(|| panic!("no journal in {}", dir.display()));
    std::fs::read_to_string(&journal)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["kind"] == "state")
        .map(|l| l["body"].clone())
        .next_back()
        .unwrap_or_else(|| panic!("no state in {}", journal.display()))
}
