//! A local fleet on loopback: real `sshd` per host, a real `nginx` in front, a real JVM app.
//!
//! roller's integration tests and `cargo xtask fleet`/`demo` share this code so that what the
//! tests prove is what a developer sees on their own machine.

mod app;
mod bastion;
mod fleet;
pub mod http;
mod inventory;
pub mod jar;
mod lb;
pub mod load;
pub mod nginx;
pub mod proc;
mod scripts;
mod spec;
pub mod sshd;
mod status;
pub mod users;

use std::path::PathBuf;

pub use bastion::BastionEndpoint;
pub use fleet::{
    APP_DIR, BASTION_NAME, Fleet, HEALTH_PATH, JAR_NAME, RESTART, RESTART_SLOT, SINGLE_APP_NAME,
    SLOTS, STOP, STOP_SLOT,
};
pub use jar::{Behaviour, JarSpec, build_jar};
pub use load::{Load, LoadOptions, LoadReport};
pub use spec::{Bastion, FleetSpec, Mode};
pub use status::{HostStatus, Role, SlotStatus};

/// Cargo's target directory, where fleets, jars and compiled classes are kept: `cargo clean`
/// removes them and git ignores them.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return std::path::absolute(PathBuf::from(dir)).unwrap_or_default();
    }
    // Test binaries live in target/<profile>/deps, xtask in target/<profile>; Cargo marks the
    // target directory itself with CACHEDIR.TAG.
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.ancestors().find(|d| d.join("CACHEDIR.TAG").is_file())
    {
        return dir.to_path_buf();
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
}
