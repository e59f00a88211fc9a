//! Developer tasks: `cargo xtask fleet|demo|test|bench|bench plan|ci`.
//!
//! Lives in the workspace (not in shell scripts) so the demo and the bench use exactly the
//! fleet code that roller's integration tests use, and work wherever cargo does. Speeds are
//! measured here and reported, not asserted in tests: on a machine shared with other builds a
//! speed floor fails for reasons that are not roller's.

mod bench;
mod bench_plan;
mod floor;
mod measure;
mod scale;
mod setup;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use roller_fleet::{
    Bastion, Fleet, FleetSpec, HostStatus, JarSpec, Load, LoadOptions, Mode, Role, SlotStatus, proc,
};

/// `cargo xtask fleet up` lives at 127.77.0.x and the demo at 127.77.1.x, so both can run at
/// once; test fleets never use 127.77.x.x.
const FLEET_NET: [u8; 2] = [77, 0];
const DEMO_NET: [u8; 2] = [77, 1];
const BENCH_NET: [u8; 2] = [77, 2];
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(15 * 60);
const CI_STEP_TIMEOUT: Duration = Duration::from_secs(60 * 60);

#[derive(Parser)]
#[command(name = "cargo xtask", about = "roller's developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// A local fleet (sshd per host, nginx, JVM apps on loopback) that stays up between commands.
    Fleet {
        #[command(subcommand)]
        action: FleetAction,
    },
    /// Fleet up, roll v2 out with roller under client load, report dropped requests.
    Demo {
        #[arg(long, default_value_t = 4)]
        hosts: usize,
        /// Leave the fleet running afterwards (stop it with `cargo xtask fleet down --root ...`).
        #[arg(long)]
        keep: bool,
        /// Defaults to target/fleet-demo.
        #[arg(long)]
        root: Option<PathBuf>,
        /// Concurrent load-generator clients.
        #[arg(long, default_value_t = 4)]
        clients: usize,
    },
    /// Every test of the workspace, after installing what the local fleet needs (apt-get and
    /// pip, as root or with passwordless sudo; otherwise it stops naming the packages).
    /// Arguments after `--` go to `cargo test`.
    Test {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// What CI runs: fmt check, clippy with warnings denied, then `test`.
    Ci,
    /// Roller against the floor on a local fleet: each rollout in turn with a plain OpenSSH
    /// ControlMaster script doing the same steps; prints roller/floor wall time and roller's
    /// own time per batch beyond the app's restart-to-healthy (targets: <= 0.9 and < 150 ms).
    /// Also reports the SSH transport's upload speed for a 100 MiB jar. From 50 hosts on
    /// (light apps): pre-flight time and roller's peak memory in a rollout at batch 10%.
    Bench {
        #[command(subcommand)]
        what: Option<BenchWhat>,
        #[arg(long, default_value_t = 8)]
        hosts: usize,
        /// Batch sizes to measure, each in its own rounds [default: 1,2; 10% from 50 hosts].
        #[arg(long, value_delimiter = ',')]
        batch: Option<Vec<String>>,
        /// Rollouts of each kind per batch size (the median is reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Defaults to target/fleet-bench.
        #[arg(long)]
        root: Option<PathBuf>,
        /// Measure this roller binary instead of building this checkout's, e.g. an earlier
        /// commit's, to compare two versions on the same fleet.
        #[arg(long)]
        roller: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// `roller plan`, `--output json` and `--commands` of a generated inventory, offline:
    /// wall time, peak RSS and output size against the targets (release build).
    Plan {
        #[arg(long, default_value_t = 1000)]
        hosts: usize,
        #[arg(long, default_value = "1")]
        batch: String,
        /// Measure this roller binary instead of building this checkout's.
        #[arg(long)]
        roller: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum FleetAction {
    /// Start a fleet with v1 live and leave it running.
    Up {
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        /// Defaults to target/fleet.
        #[arg(long)]
        root: Option<PathBuf>,
        /// Two slots per app host (blue on 8081 with v1 live, green on 8082 stopped) and an
        /// inventory with `strategy = "blue-green"`.
        #[arg(long, conflicts_with = "blue_green_single")]
        blue_green: bool,
        /// Blue-green on one machine: nginx and both slots of the one app host on the LB host.
        #[arg(long, conflicts_with = "hosts")]
        blue_green_single: bool,
        /// A bastion host at .9 in front of the fleet.
        #[arg(long)]
        bastion: bool,
        /// A bastion, and LB and app hosts that admit logins only from it.
        #[arg(long, conflicts_with = "bastion")]
        bastion_only: bool,
        /// LB and app hosts whose sshd refuses port forwarding.
        #[arg(long)]
        refuse_forwarding: bool,
        /// App hosts run a light python3 stand-in for the JVM (same endpoints and contract),
        /// so that a hundred hosts fit on one machine.
        #[arg(long, conflicts_with_all = ["blue_green", "blue_green_single"])]
        light: bool,
        /// As root only: every host, the LB included, logs in as the non-root deploy user
        /// `roller-sudo`, and the inventory says `sudo = true` for both sides.
        #[arg(long, conflicts_with = "blue_green_single")]
        sudo: bool,
    },
    /// Stop the fleet's processes (by the PIDs it recorded).
    Down {
        #[arg(long)]
        root: Option<PathBuf>,
    },
    /// One line per host: sshd, app, live release, health.
    Status {
        #[arg(long)]
        root: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Fleet { action } => fleet(action),
        Task::Demo {
            hosts,
            keep,
            root,
            clients,
        } => demo(hosts, keep, root, clients),
        Task::Test { args } => test(&args),
        Task::Ci => ci(),
        Task::Bench {
            what:
                Some(BenchWhat::Plan {
                    hosts,
                    batch,
                    roller,
                }),
            ..
        } => bench_plan::bench_plan(hosts, &batch, roller),
        Task::Bench {
            what: None,
            hosts,
            batch,
            rounds,
            root,
            roller,
        } => bench::bench(hosts, root, roller, batch, rounds),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn fleet(action: FleetAction) -> anyhow::Result<bool> {
    let default_root = || roller_fleet::target_dir().join("fleet");
    match action {
        FleetAction::Up {
            hosts,
            root,
            blue_green,
            blue_green_single,
            bastion,
            bastion_only,
            refuse_forwarding,
            light,
            sudo,
        } => {
            let root = root.unwrap_or_else(default_root);
            let mode = match (blue_green, blue_green_single) {
                (_, true) => Mode::BlueGreenSingle,
                (true, false) => Mode::BlueGreen,
                (false, false) => Mode::Rolling,
            };
            let mut spec = FleetSpec::new(&root, hosts, FLEET_NET)
                .with_mode(mode)
                .with_bastion(match (bastion, bastion_only) {
                    (_, true) => Bastion::Only,
                    (true, false) => Bastion::Open,
                    (false, false) => Bastion::None,
                });
            if refuse_forwarding {
                spec = spec.with_forwarding_refused();
            }
            if light {
                spec = spec.with_light_apps();
            }
            if sudo {
                if !roller_fleet::users::is_root() {
                    anyhow::bail!("--sudo needs root: the fleet creates its deploy user then");
                }
                spec = spec.with_sudo_logins(roller_fleet::users::Login::Sudo);
            }
            match mode {
                Mode::Rolling => println!(
                    "starting {hosts} app hosts and a load balancer in {}",
                    root.display()
                ),
                Mode::BlueGreen => println!(
                    "starting {hosts} blue-green app hosts and a load balancer in {}",
                    root.display()
                ),
                Mode::BlueGreenSingle => println!(
                    "starting one machine with nginx and a blue-green app in {}",
                    root.display()
                ),
            }
            let fleet = Fleet::up(spec)?;
            let v2 = fleet.jar(&JarSpec::healthy("v2"))?;
            print_status(&fleet.status());
            println!();
            println!("inventory:     {}", fleet.inventory_path().display());
            println!("load balancer: {}", fleet.lb_url());
            if let Some(bastion) = fleet.bastion() {
                println!(
                    "bastion:       {}@{}:{}",
                    bastion.user, bastion.address, bastion.port
                );
            }
            println!("v2 jar:        {}", v2.display());
            println!();
            println!("next:");
            // The inventory names the strategy; batches only mean something when rolling.
            let batch = if mode.is_blue_green() {
                ""
            } else {
                " --batch 1"
            };
            println!(
                "  cargo run --bin roller -- rollout --inventory {} --artifact {} --release v2{batch}",
                fleet.inventory_path().display(),
                v2.display()
            );
            println!(
                "  cargo xtask fleet status{}",
                root_flag(&root, &default_root())
            );
            println!(
                "  cargo xtask fleet down{}",
                root_flag(&root, &default_root())
            );
            fleet.detach();
            Ok(true)
        }
        FleetAction::Down { root } => {
            let root = root.unwrap_or_else(default_root);
            if !root.join("state.json").exists() {
                println!("no fleet recorded in {}", root.display());
                return Ok(true);
            }
            let mut fleet = Fleet::attach(&root)?;
            fleet.down();
            let survivors: Vec<HostStatus> = fleet
                .status()
                .into_iter()
                .filter(|s| s.sshd_alive || s.app_alive || s.slots.iter().any(|x| x.pid.is_some()))
                .collect();
            if survivors.is_empty() {
                println!("fleet in {} is down", root.display());
                Ok(true)
            } else {
                print_status(&survivors);
                bail!("some processes survived; see above")
            }
        }
        FleetAction::Status { root } => {
            let root = root.unwrap_or_else(default_root);
            let fleet = Fleet::attach(&root)?;
            print_status(&fleet.status());
            println!();
            println!("load balancer {} upstream file:", fleet.lb_url());
            print!("{}", fleet.upstream_text());
            Ok(true)
        }
    }
}

fn root_flag(root: &Path, default: &Path) -> String {
    if root == default {
        String::new()
    } else {
        format!(" --root {}", root.display())
    }
}

fn print_status(rows: &[HostStatus]) {
    println!(
        "{:<8} {:<16} {:<14} {:<16} {:<9} HEALTH",
        "HOST", "ADDRESS", "SSHD", "APP", "RELEASE"
    );
    for row in rows {
        let process = |alive: bool, pid: Option<u32>, what: &str| match (alive, pid) {
            (true, Some(pid)) => format!("{what} {pid}"),
            _ => "down".to_string(),
        };
        let app = match row.role {
            Role::Balancer => process(row.app_alive, row.app_pid, "nginx"),
            Role::App => process(row.app_alive, row.app_pid, "java"),
            Role::Bastion => "-".to_string(),
        };
        println!(
            "{:<8} {:<16} {:<14} {:<16} {:<9} {}",
            row.name,
            row.address,
            process(row.sshd_alive, row.sshd_pid, "up"),
            app,
            row.live_release.as_deref().unwrap_or("-"),
            row.health.map_or("-".to_string(), |s| s.to_string()),
        );
        for slot in &row.slots {
            print_slot(slot);
        }
    }
}

/// A blue-green host's slot, under the host's line; `*` marks the one nginx sends traffic to.
fn print_slot(slot: &SlotStatus) {
    let name = format!("  {}{}", slot.slot, if slot.live { "*" } else { "" });
    let app = slot
        .pid
        .map_or("down".to_string(), |pid| format!("java {pid}"));
    println!(
        "{:<8} {:<16} {:<14} {:<16} {:<9} {}",
        name,
        format!(":{}", slot.port),
        "",
        app,
        slot.release.as_deref().unwrap_or("-"),
        slot.health.map_or("-".to_string(), |s| s.to_string()),
    );
}

fn demo(hosts: usize, keep: bool, root: Option<PathBuf>, clients: usize) -> anyhow::Result<bool> {
    let root = root.unwrap_or_else(|| roller_fleet::target_dir().join("fleet-demo"));
    // The demo's fleet needs no tool from pip, so the PATH stays as it is.
    setup::ensure(setup::Needs::Fleet)?;
    // Compile roller before the fleet is up, so the rollout is not timed against a build.
    println!("building roller...");
    let built = proc::wait_child(
        &mut Command::new(cargo())
            .args(["build", "--quiet", "--bin", "roller"])
            .current_dir(workspace_root())
            .spawn()
            .context("running cargo build")?,
        CI_STEP_TIMEOUT,
    )?;
    if !built.success() {
        bail!("cargo build --bin roller failed ({built})");
    }

    println!(
        "starting {hosts} app hosts and a load balancer in {}",
        root.display()
    );
    let mut fleet = Fleet::up(FleetSpec::new(&root, hosts, DEMO_NET))?;
    let v2 = fleet.jar(&JarSpec::healthy("v2"))?;
    print_status(&fleet.status());

    let load = Load::start_with(&fleet.lb_url(), LoadOptions::new(clients));
    if !load.wait_for_requests(50, Duration::from_secs(30)) {
        bail!(
            "load generator got no traffic through {}: {:?}",
            fleet.lb_url(),
            load.snapshot()
        );
    }
    println!(
        "\n{clients} clients are sending requests to {}; rolling out v2...\n",
        fleet.lb_url()
    );

    let mut rollout = Command::new(cargo());
    rollout
        .args([
            "run",
            "--quiet",
            "--bin",
            "roller",
            "--",
            "rollout",
            "--inventory",
        ])
        .arg(fleet.inventory_path())
        .arg("--artifact")
        .arg(&v2)
        .args(["--release", "v2", "--batch", "1"])
        .current_dir(workspace_root());
    let status = proc::wait_child(
        &mut rollout.spawn().context("running roller")?,
        ROLLOUT_TIMEOUT,
    );

    // A little traffic after the rollout shows what the fleet serves now.
    let after = load.snapshot().ok + 50;
    load.wait_for_requests(after, Duration::from_secs(30));
    let report = load.stop();

    println!();
    print_status(&fleet.status());
    println!();
    let mut ok = true;
    match &status {
        Ok(s) if s.success() => println!("rollout: succeeded"),
        Ok(s) => {
            println!("rollout: FAILED ({s})");
            ok = false;
        }
        Err(e) => {
            println!("rollout: FAILED ({e:#})");
            ok = false;
        }
    }
    for host in fleet.host_names() {
        let release = fleet.live_release(&host);
        let version = fleet.app_version(&host);
        println!(
            "  {host}: live release {}, serving {}",
            release.as_deref().unwrap_or("-"),
            version.as_deref().unwrap_or("nothing")
        );
        if matches!(&status, Ok(s) if s.success()) && version.as_deref() != Some("v2") {
            ok = false;
        }
    }
    println!(
        "requests: {} ok, {} failed in {:.1}s",
        report.ok,
        report.failed,
        report.elapsed.as_secs_f64()
    );
    for (version, count) in &report.versions {
        println!("  served by {version}: {count}");
    }
    for failure in &report.failures {
        println!("  failed: {failure}");
    }
    if report.failed > 0 {
        ok = false;
    }

    if keep {
        println!(
            "\nfleet left running; stop it with: cargo xtask fleet down --root {}",
            root.display()
        );
        fleet.detach();
    } else {
        fleet.down();
    }
    println!("\ndemo {}", if ok { "passed" } else { "FAILED" });
    Ok(ok)
}

fn test(args: &[String]) -> anyhow::Result<bool> {
    let path = setup::ensure(setup::Needs::Tests)?;
    println!("==> cargo test --workspace {}", args.join(" "));
    let status = proc::wait_child(
        &mut Command::new(cargo())
            .args(["test", "--workspace"])
            .args(args)
            .env("PATH", path)
            .current_dir(workspace_root())
            .spawn()
            .context("running cargo test")?,
        CI_STEP_TIMEOUT,
    )?;
    Ok(status.success())
}

fn ci() -> anyhow::Result<bool> {
    let steps: [&[&str]; 2] = [
        &["fmt", "--all", "--", "--check"],
        &[
            "clippy",
            "--all-targets",
            "--workspace",
            "--",
            "-D",
            "warnings",
        ],
    ];
    for args in steps {
        println!("==> cargo {}", args.join(" "));
        let status = proc::wait_child(
            &mut Command::new(cargo())
                .args(args)
                .current_dir(workspace_root())
                .spawn()
                .context("running cargo")?,
            CI_STEP_TIMEOUT,
        )?;
        if !status.success() {
            println!("==> cargo {} failed ({status})", args.join(" "));
            return Ok(false);
        }
    }
    if !test(&[])? {
        println!("==> tests failed");
        return Ok(false);
    }
    println!("==> all green");
    Ok(true)
}
