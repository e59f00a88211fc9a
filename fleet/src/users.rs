//! Local users whose login shells are those of production hosts, so the fleet's app hosts meet
//! roller's commands the way real ones do: sshd hands every command to the user's login shell,
//! with its rc files.
//!
//! Only when running as root (as CI does): the users are created once per machine, kept
//! between runs, and shared by every fleet. Otherwise every host logs in as the current user.

use std::os::unix::fs::PermissionsExt;
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
    /// A deploy user as on a cloud image: not root, plain bash, and a sudoers rule that lets it
    /// run [`sudo_commands`] as root without a password.
    Sudo,
    /// Like [`Login::Sudo`], but sudo asks for its password ([`SUDO_PASSWORD`]) for anything:
    /// a host where roller must not count on passwordless sudo.
    SudoPassword,
    /// bash in a home of its own with nothing in it: no shell initialisation beyond the
    /// system's, so what a command costs on the host is the command (and sshd), not an rc file.
    Lean,
    /// Root (uid 0) under a name of its own, with a home like [`Login::Lean`]'s: the load
    /// balancer's login when its nginx runs as root but the machine's own root account has rc
    /// files that would be measured with every command.
    RootLean,
}

/// The password of [`Login::SudoPassword`], for a test that feeds it to `sudo -S`.
pub const SUDO_PASSWORD: &str = "roller-fleet-sudo";

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
            Login::Sudo => "roller-sudo",
            Login::SudoPassword => "roller-sudo-pw",
            Login::Lean => "roller-lean",
            Login::RootLean => "roller-root",
        }
    }

    fn shell(self) -> &'static str {
        match self {
            Login::BashHeavy
            | Login::Bash
            | Login::Sudo
            | Login::SudoPassword
            | Login::Lean
            | Login::RootLean => "bash",
            Login::Zsh => "zsh",
            Login::Dash => "dash",
        }
    }

    /// A deploy user whose commands need sudo to become root.
    pub fn has_sudo(self) -> bool {
        matches!(self, Login::Sudo | Login::SudoPassword)
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
            Login::Dash
            | Login::Bash
            | Login::Sudo
            | Login::SudoPassword
            | Login::Lean
            | Login::RootLean => &[],
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
            "the local fleet has a host whose user logs in with {}; install it (cargo xtask test does)",
            login.shell()
        )
    })?;
    let home = homes_dir().join(user);
    match entry(user)? {
        None => {
            // '*' rather than useradd's locked '!': without PAM, sshd refuses locked accounts
            // even for key logins.
            let mut useradd = Command::new("useradd");
            useradd
                .args(["--create-home", "--home-dir"])
                .arg(&home)
                .arg("--shell")
                .arg(&shell)
                .args(["--password", "*"]);
            if login == Login::RootLean {
                // A second name for uid 0, as some systems keep a `toor`.
                useradd.args(["--non-unique", "--uid", "0", "--gid", "0", user]);
            } else {
                useradd.args(["--user-group", user]);
            }
            let created = proc::run(&mut useradd, Duration::from_secs(60))?;
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
    if matches!(login, Login::Lean | Login::RootLean) {
        // useradd copies /etc/skel, whose .bashrc bash reads for commands over SSH too.
        for entry in std::fs::read_dir(&home)? {
            let path = entry?.path();
            if path.is_file() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }
    chown_tree(&home, found.uid, found.gid)?;
    match login {
        Login::Sudo => allow_sudo(user, "NOPASSWD: ", &sudo_commands()?)?,
        Login::SudoPassword => {
            set_password(user, SUDO_PASSWORD)?;
            allow_sudo(user, "", &["ALL".to_string()])?;
        }
        _ => {}
    }
    Ok(Account {
        user: user.to_string(),
        uid: found.uid,
        gid: found.gid,
    })
}

/// What [`Login::Sudo`] may run as root without a password: `/bin/sh`, which roller runs every
/// command with under `sudo = true` (and so root for anything), then what an operator's
/// inventory runs with sudo in its own commands when it does not (`systemctl` for the service,
/// nginx to test and reload), and the scripts in the `bin/` of any host of a fleet in this
/// target directory.
pub fn sudo_commands() -> anyhow::Result<Vec<String>> {
    let target = crate::target_dir();
    let target = target
        .to_str()
        .with_context(|| format!("{} is not UTF-8", target.display()))?;
    let mut commands = vec![
        "/bin/sh".to_string(),
        sudoers_escape(&proc::find_program("nginx")?.to_string_lossy()),
    ];
    if let Ok(systemctl) = proc::find_program("systemctl") {
        commands.push(sudoers_escape(&systemctl.to_string_lossy()));
    }
    // `*` matches within one path component, so each layout gets its own pattern: test
    // fleets under fleet-tests/<name>/, xtask's under fleet*/.
    for hosts in ["fleet-tests/*/hosts", "fleet*/hosts"] {
        commands.push(format!("{}/{hosts}/*/bin/*", sudoers_escape(target)));
    }
    Ok(commands)
}

/// One sudoers file per user and target directory, checked with `visudo` before it is put in
/// place: a broken file under /etc/sudoers.d would break sudo for everyone on the machine.
fn allow_sudo(user: &str, tag: &str, commands: &[String]) -> anyhow::Result<()> {
    let target = crate::target_dir();
    let key = crate::jar::fnv1a(&[user.as_bytes(), target.as_os_str().as_encoded_bytes()]);
    // sudo skips files in sudoers.d whose names contain a '.' or end in '~'.
    let path = PathBuf::from(format!("/etc/sudoers.d/roller-fleet-{user}-{key:016x}"));
    let text = format!(
        "# Written by roller-fleet for the fleets in {}: a deploy user whose commands need root.\n\
         {user} ALL=(root) {tag}{}\n",
        target.display(),
        commands.join(", ")
    );
    if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
        return Ok(());
    }
    let partial = PathBuf::from(format!("{}.partial-{}", path.display(), std::process::id()));
    std::fs::write(&partial, &text).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o440))?;
    let checked = proc::run(
        Command::new("visudo")
            .arg("-c")
            .arg("-q")
            .arg("-f")
            .arg(&partial),
        Duration::from_secs(30),
    );
    let checked = match checked {
        Ok(run) if run.status.success() => Ok(()),
        Ok(run) => Err(anyhow::anyhow!(
            "visudo refused the rule for {user}: {}{}",
            run.stdout.trim(),
            run.stderr.trim()
        )),
        Err(e) => {
            Err(e.context("running visudo (is sudo installed? cargo xtask test installs it)"))
        }
    };
    if let Err(e) = checked.and_then(|()| Ok(std::fs::rename(&partial, &path)?)) {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    Ok(())
}

/// Backslashes what sudoers reads as syntax in a command path.
fn sudoers_escape(path: &str) -> String {
    let mut escaped = String::new();
    for c in path.chars() {
        if " \\,:=()!#\"'".contains(c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

fn set_password(user: &str, password: &str) -> anyhow::Result<()> {
    let mut child = Command::new("chpasswd")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running chpasswd")?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().context("chpasswd's stdin")?;
        writeln!(stdin, "{user}:{password}")?;
    }
    let status = proc::wait_child(&mut child, Duration::from_secs(30))?;
    if !status.success() {
        bail!("chpasswd for {user} failed ({status})");
    }
    Ok(())
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
