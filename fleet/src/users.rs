//! Local users whose login shells are those of production hosts, so the fleet's app hosts meet
//! roller's commands the way real ones do: sshd hands every command to the user's login shell,
//! with its rc files.
//!
//! Only when running as root (as CI does): the users are created once per machine, kept
//! between runs, and shared by every fleet. Otherwise every host logs in as the current user.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::proc;

/// A login of an app host: a user and the shell it logs in with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Login {
    /// bash with a `.bashrc` that initialises slowly and prints nothing, like a host set up by
    /// hand (bash also reads `.bashrc` for commands sent over SSH).
    BashHeavy,
    Zsh,
    Dash,
    /// bash with no rc files of its own.
    Bash,
}

/// What app hosts get in turn: web-1 bash with a heavy `.bashrc`, web-2 zsh, web-3 dash,
/// web-4 plain bash, and again. Two-host fleets thus mix bash and zsh.
pub const MIX: [Login; 4] = [Login::BashHeavy, Login::Zsh, Login::Dash, Login::Bash];

impl Login {
    pub fn user(self) -> &'static str {
        match self {
            Login::BashHeavy => "roller-bashrc",
            Login::Zsh => "roller-zsh",
            Login::Dash => "roller-dash",
            Login::Bash => "roller-bash",
        }
    }

    fn shell(self) -> &'static str {
        match self {
            Login::BashHeavy | Login::Bash => "bash",
            Login::Zsh => "zsh",
            Login::Dash => "dash",
        }
    }

    /// rc files written into the user's home, file name and content.
    fn rc_files(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Login::BashHeavy => &[(
                ".bashrc",
                "# Like a host set up by hand: tool initialisation on every shell, slow and silent.\n\
                 for d in /usr/lib/jvm/*; do [ -x \"$d/bin/java\" ] && export JAVA_HOME=\"$d\"; done\n\
                 sleep 0.2\n\
                 export HISTCONTROL=ignoreboth\n",
            )],
            Login::Zsh => &[(
                ".zshenv",
                "# zsh reads this for every command, interactive or not.\nexport LANG=C.UTF-8\n",
            )],
            Login::Dash | Login::Bash => &[],
        }
    }
}

/// Who logs in on an app host, with what uid and gid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
}

/// Creates (or corrects) the user of `login` with its shell, home and rc files, idempotently,
/// and returns its account. Several fleets may do this at once: a user another process just
/// created is taken as it is.
pub fn ensure(login: Login) -> anyhow::Result<Account> {
    std::fs::create_dir_all(homes_dir())
        .with_context(|| format!("creating {}", homes_dir().display()))?;
    // Tests bring fleets up in parallel threads and processes; useradd gives up when another
    // one holds /etc/passwd, so they take turns.
    let _turn = Turn::take(&homes_dir().join(".lock"), Duration::from_secs(120))?;
    let user = login.user();
    let shell = proc::find_program(login.shell()).with_context(|| {
        format!(
            "the local fleet has a host whose user logs in with {}; install it (.ci/run does)",
            login.shell()
        )
    })?;
    let home = homes_dir().join(user);
    match entry(user)? {
        None => {
            // '*' rather than useradd's locked '!': without PAM, sshd refuses locked accounts
            // even for key logins.
            let created = proc::run(
                Command::new("useradd")
                    .args(["--create-home", "--home-dir"])
                    .arg(&home)
                    .arg("--shell")
                    .arg(&shell)
                    .args(["--password", "*", "--user-group", user]),
                Duration::from_secs(60),
            )?;
            if !created.status.success() && entry(user)?.is_none() {
                bail!("useradd {user} failed: {}", created.stderr.trim());
            }
        }
        Some(found) if found.shell != shell || found.home != home => {
            proc::run(
                Command::new("usermod")
                    .arg("--shell")
                    .arg(&shell)
                    .arg("--home")
                    .arg(&home)
                    .arg(user),
                Duration::from_secs(60),
            )?
            .check(&format!("usermod {user}"))?;
        }
        Some(_) => {}
    }
    let found = entry(user)?.with_context(|| format!("{user} is not in the passwd database"))?;
    std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
    for (name, text) in login.rc_files() {
        let path = home.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(*text) {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    chown_tree(&home, found.uid, found.gid)?;
    Ok(Account {
        user: user.to_string(),
        uid: found.uid,
        gid: found.gid,
    })
}

/// Hands `dir` and everything in it to `uid:gid`, symlinks themselves included.
pub fn chown_tree(dir: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", dir.display()))?;
    if std::fs::symlink_metadata(dir)?.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// An exclusive `flock` on a file, held until dropped (closing the file releases it).
struct Turn {
    _file: std::fs::File,
}

impl Turn {
    fn take(path: &Path, timeout: Duration) -> anyhow::Result<Turn> {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            // SAFETY: flock on a descriptor this function owns; no memory is involved.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Turn { _file: file });
            }
            if std::time::Instant::now() >= deadline {
                bail!("{} stayed locked for {timeout:?}", path.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Homes of the fleet's users: outside any one fleet's root, since fleets share the users.
fn homes_dir() -> PathBuf {
    PathBuf::from("/var/lib/roller-fleet/home")
}

struct Entry {
    uid: u32,
    gid: u32,
    home: PathBuf,
    shell: PathBuf,
}

/// The user's passwd line, via `getent` so that it agrees with what sshd sees.
fn entry(user: &str) -> anyhow::Result<Option<Entry>> {
    let out = proc::run(
        Command::new("getent").args(["passwd", user]),
        Duration::from_secs(10),
    )?;
    if !out.status.success() {
        return Ok(None);
    }
    let fields: Vec<&str> = out.stdout.trim().split(':').collect();
    let [_, _, uid, gid, _, home, shell] = fields[..] else {
        bail!("unexpected passwd line for {user}: {}", out.stdout.trim());
    };
    Ok(Some(Entry {
        uid: uid.parse().context("uid")?,
        gid: gid.parse().context("gid")?,
        home: PathBuf::from(home),
        shell: PathBuf::from(shell),
    }))
}
