//! The `roller` command line: parses flags, wires the library together, and is the only place
//! where outcomes become exit codes.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};

use roller::balancer::Nginx;
use roller::error::Error;
use roller::executor::{self, Executor};
use roller::health::HttpOverSsh;
use roller::inventory::Inventory;
use roller::plan::{Artifact, BatchSize, Plan, PlanInput};
use roller::report::{
    JsonReporter, Outcome, PlainReporter, ProgressReporter, Reporter, RolloutReport,
};
use roller::transport::ssh::{SshConnector, SshSettings};

/// Exit codes, documented in the README.
mod exit {
    pub const OK: u8 = 0;
    pub const INTERNAL: u8 = 1;
    pub const BAD_INPUT: u8 = 2;
    pub const PREFLIGHT: u8 = 3;
    pub const ROLLED_BACK: u8 = 4;
    pub const ROLLBACK_INCOMPLETE: u8 = 5;
}

#[derive(Parser)]
#[command(
    name = "roller",
    version,
    about = "Roll a new release of a JVM service across a fleet over SSH, without dropping a request"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print what a rollout would do, offline: no network, no SSH.
    Plan(RolloutArgs),
    /// Perform the rollout.
    Rollout(RolloutArgs),
}

#[derive(Args)]
struct RolloutArgs {
    /// Inventory file.
    #[arg(long, short = 'i', default_value = "roller.toml")]
    inventory: PathBuf,
    /// The jar to roll out. `plan` accepts its absence when --release is given.
    #[arg(long, short = 'a')]
    artifact: Option<PathBuf>,
    /// Release name; defaults to the jar's file name and the start of its SHA-256.
    #[arg(long, short = 'r')]
    release: Option<String>,
    /// Hosts per batch: a count (1) or a share of the fleet (25%).
    #[arg(long, short = 'b', default_value = "1")]
    batch: BatchSize,
    /// `text` for people; `json` for release jobs (one document, or one event per line).
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ROLLER_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let (args, rollout) = match &cli.command {
        Command::Plan(args) => (args, false),
        Command::Rollout(args) => (args, true),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    let result = if rollout {
        runtime.block_on(rollout_command(args))
    } else {
        plan_command(args)
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            report_error(&error, args.output);
            ExitCode::from(exit_code(&error))
        }
    }
}

fn exit_code(error: &Error) -> u8 {
    match error {
        Error::InventoryRead { .. }
        | Error::Inventory { .. }
        | Error::Usage { .. }
        | Error::Artifact { .. } => exit::BAD_INPUT,
        Error::Preflight { .. } => exit::PREFLIGHT,
    }
}

fn outcome_code(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Succeeded => exit::OK,
        Outcome::RolledBack => exit::ROLLED_BACK,
        Outcome::RollbackIncomplete => exit::ROLLBACK_INCOMPLETE,
    }
}

fn report_error(error: &Error, output: Output) {
    if output == Output::Json {
        let detail = match error {
            Error::Inventory { file, problems } => {
                serde_json::json!({ "kind": "inventory", "file": file, "problems": problems })
            }
            Error::Preflight { failures } => {
                serde_json::json!({ "kind": "preflight", "failures": failures })
            }
            Error::InventoryRead { file, .. } => {
                serde_json::json!({ "kind": "inventory", "file": file })
            }
            Error::Usage { flag, .. } => serde_json::json!({ "kind": "usage", "flag": flag }),
            Error::Artifact { path, .. } => serde_json::json!({ "kind": "artifact", "path": path }),
        };
        println!(
            "{}",
            serde_json::json!({ "event": "error", "message": error.to_string(), "error": detail })
        );
    }
    eprintln!("error: {error}");
}

struct Prepared {
    inventory: Inventory,
    plan: Plan,
    balancer: Nginx,
}

/// Everything that can be checked without touching a host, in the order a user fixes things.
fn prepare(args: &RolloutArgs, need_artifact: bool) -> Result<Prepared, Error> {
    let inventory = Inventory::load(&args.inventory)?;
    let artifact = match &args.artifact {
        Some(path) => Some(Artifact::load(path)?),
        None if need_artifact => {
            return Err(Error::Usage {
                flag: "--artifact".into(),
                message: "a rollout needs the jar to upload".into(),
            });
        }
        None => None,
    };
    let release = match (&args.release, &artifact) {
        (Some(r), _) => r.clone(),
        (None, Some(a)) => a.default_release(),
        (None, None) => {
            return Err(Error::Usage {
                flag: "--release".into(),
                message: "give --artifact, --release, or both".into(),
            });
        }
    };
    let balancer = Nginx::new(&inventory.balancer, &inventory.app, &inventory.hosts);
    let plan = Plan::build(PlanInput {
        inventory: &inventory,
        balancer: &balancer,
        release,
        artifact,
        batch: args.batch,
    })?;
    Ok(Prepared {
        inventory,
        plan,
        balancer,
    })
}

fn plan_command(args: &RolloutArgs) -> Result<u8, Error> {
    let Prepared { plan, .. } = prepare(args, false)?;
    match args.output {
        Output::Text => print!("{}", plan.render_text()),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&plan).expect("a plan always serializes")
        ),
    }
    Ok(exit::OK)
}

async fn rollout_command(args: &RolloutArgs) -> Result<u8, Error> {
    let Prepared {
        inventory,
        plan,
        balancer,
    } = prepare(args, true)?;
    let connector = SshConnector::new(SshSettings {
        user: inventory.ssh.user.clone(),
        identity: inventory.ssh.identity.clone(),
        known_hosts: inventory.ssh.known_hosts.clone(),
        connect_timeout: inventory.ssh.connect_timeout,
        max_channels_per_host: 8,
        max_concurrent_connects: 8,
    })
    .map_err(|e| Error::Preflight {
        failures: vec![roller::error::HostFailure {
            host: "(controller)".into(),
            step: "ssh setup".into(),
            message: e.to_string(),
        }],
    })?;
    let reporter: Arc<dyn Reporter> = match args.output {
        Output::Json => Arc::new(JsonReporter),
        Output::Text if std::io::stderr().is_terminal() => {
            let mut targets: Vec<String> = plan.hosts.iter().map(|h| h.name.clone()).collect();
            targets.extend(plan.balancers.iter().cloned());
            Arc::new(ProgressReporter::new(&targets))
        }
        Output::Text => Arc::new(PlainReporter),
    };
    let sessions = executor::connect(&plan, inventory.ssh.port, &connector).await?;
    let executor = Executor::new(&plan, &balancer, &HttpOverSsh, sessions, reporter.clone());
    let result = executor.run().await;
    executor.close().await;
    let report: RolloutReport = result?;
    reporter.finish(&report);
    if args.output == Output::Text {
        print!("{}", report.render_text());
    }
    Ok(outcome_code(report.outcome))
}
