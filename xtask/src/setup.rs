//! Installs what the local fleet runs on (sshd, nginx, a JDK, the login shells, the local EC2
//! API), so that `cargo xtask demo` and `cargo xtask test` work on a fresh Debian or Ubuntu
//! machine with only Rust on it, and otherwise stop naming exactly what to install.
//!
//! Nothing here asks a question: packages are installed only where that can happen without one
//! (root, or `sudo -n`), and a machine where it cannot gets the command to run instead.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// What a task needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// The fleet the demo brings up.
    Fleet,
    /// Everything the test suite starts, the local EC2 API included.
    Tests,
}

/// One thing the fleet runs, how to tell the machine has it, and the Debian package with it.
struct Requirement {
    present: fn() -> bool,
    package: &'static str,
    tests_only: bool,
}

const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        present: || Path::new("/usr/sbin/sshd").is_file(),
        package: "openssh-server",
        tests_only: false,
    },
    Requirement {
        present: || Path::new("/usr/sbin/nginx").is_file(),
        package: "nginx",
        tests_only: false,
    },
    Requirement {
        present: || on_path("javac"),
        package: "default-jdk-headless",
        tests_only: false,
    },
    Requirement {
        present: || on_path("ss"),
        package: "iproute2",
        tests_only: false,
    },
    Requirement {
        present: || on_path("ps"),
        package: "procps",
        tests_only: false,
    },
    Requirement {
        present: || on_path("flock"),
        package: "util-linux",
        tests_only: false,
    },
    // The app hosts log in with bash, zsh and dash, as production hosts do.
    Requirement {
        present: || on_path("zsh"),
        package: "zsh",
        tests_only: false,
    },
    Requirement {
        present: || on_path("dash"),
        package: "dash",
        tests_only: false,
    },
    Requirement {
        present: || on_path("useradd"),
        package: "passwd",
        tests_only: false,
    },
    // The fleet's deploy users with sudo rules (one passwordless, one asked for its password).
    Requirement {
        present: || on_path("visudo"),
        package: "sudo",
        tests_only: false,
    },
    // The bastion's forward-binding shim is compiled on first use.
    Requirement {
        present: || on_path("cc"),
        package: "gcc",
        tests_only: false,
    },
    // Not POSIX, but roller's commands must mean the same under them too.
    Requirement {
        present: || on_path("fish"),
        package: "fish",
        tests_only: true,
    },
    Requirement {
        present: || on_path("tcsh"),
        package: "tcsh",
        tests_only: true,
    },
    Requirement {
        present: || python3_has_pip(),
        package: "python3-pip",
        tests_only: true,
    },
];

/// The EC2 discovery tests ask a local EC2 API (`moto_server`) through the `aws` CLI, as roller
/// asks AWS; neither is a Debian package of a usable version, so they come from PyPI.
const PYTHON_TOOLS: &[(&str, &str)] = &[("moto_server", "moto[server]"), ("aws", "awscli")];

/// Makes sure the machine has what `needs` asks for, installing it where that needs no
/// question. Returns the `PATH` the fleet's tasks should run with (pip may install its
/// scripts outside the current one).
pub fn ensure(needs: Needs) -> anyhow::Result<OsString> {
    let missing: Vec<&str> = REQUIREMENTS
        .iter()
        .filter(|r| needs == Needs::Tests || !r.tests_only)
        .filter(|r| !(r.present)())
        .map(|r| r.package)
        .collect();
    if !missing.is_empty() {
        apt_install(&missing)?;
        // Installing nginx or openssh-server may start their system services; the fleet
        // starts its own, on loopback only.
        stop_service("nginx");
        stop_service("ssh");
    }
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    if needs == Needs::Tests {
        path = ensure_python_tools(path)?;
    }
    Ok(path)
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let list = packages.join(" ");
    let by_hand = format!("sudo apt-get install -y --no-install-recommends {list}");
    if !on_path("apt-get") {
        bail!(
            "this machine lacks {list} (Debian package names) and has no apt-get; install them, then run this again"
        );
    }
    let Some(elevate) = elevation() else {
        bail!(
            "missing packages: {list}\n\
             not root and sudo wants a password, so nothing was installed; run:\n  {by_hand}"
        );
    };
    println!("==> installing {list}");
    let apt = |args: &[&str]| -> anyhow::Result<bool> {
        let mut cmd = match elevate {
            Some(sudo) => {
                let mut c = Command::new(sudo);
                c.args(["-n", "apt-get"]);
                c
            }
            None => Command::new("apt-get"),
        };
        let status = cmd
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .context("running apt-get")?;
        Ok(status.success())
    };
    let installed = apt(&["update", "-qq"])?
        && apt(&[
            &["install", "-y", "-qq", "--no-install-recommends"][..],
            packages,
        ]
        .concat())?;
    if !installed {
        bail!("apt-get could not install {list}; its output is above. By hand:\n  {by_hand}");
    }
    Ok(())
}

/// `Some(None)` as root, `Some(Some("sudo"))` where sudo needs no password, `None` otherwise.
fn elevation() -> Option<Option<&'static str>> {
    if roller_fleet::proc::is_root() {
        return Some(None);
    }
    let sudo_works = Command::new("sudo")
        .args(["-n", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    sudo_works.then_some(Some("sudo"))
}

fn ensure_python_tools(path: OsString) -> anyhow::Result<OsString> {
    let path = with_pip_script_dirs(path);
    let missing: Vec<&str> = PYTHON_TOOLS
        .iter()
        .filter(|(tool, _)| !on(&path, tool))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(path);
    }
    println!("==> installing {} with pip", missing.join(" "));
    let pip = |extra: &[&str]| {
        Command::new("python3")
            .args(["-m", "pip", "install", "-q"])
            .args(extra)
            .args(&missing)
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    // Debian's own Python refuses installs outside a virtualenv (PEP 668) unless told to.
    if !pip(&[]) && !pip(&["--break-system-packages"]) {
        bail!(
            "pip could not install {}; by hand: python3 -m pip install {}",
            missing.join(" "),
            missing
                .iter()
                .map(|p| format!("'{p}'"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    // pyenv's shims appear only after a rehash.
    if on(&path, "pyenv") {
        let _ = Command::new("pyenv").arg("rehash").status();
    }
    let path = with_pip_script_dirs(path);
    if let Some((tool, _)) = PYTHON_TOOLS.iter().find(|(tool, _)| !on(&path, tool)) {
        bail!(
            "pip installed its packages but `{tool}` is not on PATH; add pip's script directory to PATH"
        );
    }
    Ok(path)
}

/// `path` with the directories pip puts scripts in (system and user installs) appended.
fn with_pip_script_dirs(path: OsString) -> OsString {
    let python = |code: &str| -> Option<PathBuf> {
        let out = Command::new("python3")
            .args(["-c", code])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        let dir = text.trim();
        (out.status.success() && !dir.is_empty()).then(|| PathBuf::from(dir))
    };
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    let extra = [
        python("import sysconfig; print(sysconfig.get_path('scripts'))"),
        python("import site; print(site.getuserbase())").map(|base| base.join("bin")),
    ];
    for dir in extra.into_iter().flatten() {
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    std::env::join_paths(dirs).unwrap_or(path)
}

fn stop_service(name: &str) {
    if !on_path("service") {
        return;
    }
    let mut cmd = match elevation() {
        Some(Some(sudo)) => {
            let mut c = Command::new(sudo);
            c.args(["-n", "service"]);
            c
        }
        Some(None) => Command::new("service"),
        None => return,
    };
    let _ = cmd
        .args([name, "stop"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn python3_has_pip() -> bool {
    Command::new("python3")
        .args(["-m", "pip", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn on_path(program: &str) -> bool {
    on(&std::env::var_os("PATH").unwrap_or_default(), program)
}

fn on(path: &OsString, program: &str) -> bool {
    std::env::split_paths(path).any(|dir| is_executable(&dir.join(program)))
}

fn is_executable(file: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    file.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
