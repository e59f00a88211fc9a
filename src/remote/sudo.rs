//! Running a side's commands as root (`app.sudo`, `balancer.sudo`): every command roller built
//! for a host goes to it as `sudo -n /bin/sh -c '<command>'`, one wrapper for the whole command,
//! so a step is never half root and half not. Also the probe that asks sudo once, before
//! anything changes, and how to read what sudo says when it refuses.
//!
//! `/bin/sh` by its absolute path, so the sudoers rule that allows it names exactly what runs
//! (`deploy ALL=(root) NOPASSWD: /bin/sh`); `-n` so that sudo fails at once where it would ask
//! for a password, instead of waiting for one that never comes over a channel without a tty.

use serde::Serialize;

use super::{Sh, q, sh};

/// The program sudo is asked to run: a sudoers rule must allow it, as root, without a password.
pub const SHELL: &str = "/bin/sh";

/// `command` run as root through sudo, never asking for a password.
pub fn wrap(command: &str) -> String {
    wrapped(command).into_string()
}

fn wrapped(command: &str) -> Sh {
    sh!["sudo -n ", SHELL, " -c ", q(command)]
}

/// What [`probe`] prints on stdout when sudo ran it as root.
pub const PROBE_ROOT: &str = "0";

/// Asks sudo, through the very wrapper every command goes through, to print the uid it runs
/// as. Sent as the SSH user (not through a wrapper of its own), with sudo's messages in the C
/// locale, so that a refusal reads the same on every host: the uid on stdout is what decides,
/// the message only says why.
pub fn probe() -> String {
    sh!["LC_ALL=C ", wrapped("id -u")].into_string()
}

/// Why sudo did not run a command as root, read from what it printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Refusal {
    /// "a password is required": sudo wants the user's password, or the user has no rule for
    /// [`SHELL`] at all (with `-n`, sudo answers both the same way, before it would tell).
    PasswordRequired,
    /// `Defaults requiretty`: sudo runs nothing for this user without a terminal.
    TerminalRequired,
    /// The user may run sudo, but no rule allows [`SHELL`] as root.
    NotAllowed,
    /// No `sudo` on the host's `PATH`.
    NotInstalled,
    /// sudo ran the command, but not as root (a `runas_default` other than root).
    NotRoot,
    /// Anything else: sudo's own words are in the message.
    Other,
}

impl Refusal {
    /// Reads sudo's refusal from its exit status and stderr (in the C locale, as [`probe`]
    /// asks for it).
    pub fn read(status: Option<u32>, stderr: &str) -> Refusal {
        let said = |words: &[&str]| words.iter().any(|w| stderr.contains(w));
        if said(&["you must have a tty", "no tty present"]) {
            Refusal::TerminalRequired
        } else if said(&["a password is required", "a terminal is required"]) {
            Refusal::PasswordRequired
        } else if said(&[
            "is not allowed to execute",
            "is not in the sudoers file",
            "may not run sudo",
        ]) {
            Refusal::NotAllowed
        } else if status == Some(127) || said(&["sudo: not found", "sudo: command not found"]) {
            Refusal::NotInstalled
        } else {
            Refusal::Other
        }
    }

    /// What the refusal means for `user`, for the operator.
    pub fn describe(self, user: &str) -> String {
        match self {
            Refusal::PasswordRequired => format!(
                "sudo wants a password from {user}, or no sudoers rule lets {user} run {SHELL} as root (sudo -n answers both alike)"
            ),
            Refusal::TerminalRequired => {
                format!("sudo requires a terminal for {user} (Defaults requiretty)")
            }
            Refusal::NotAllowed => format!("no sudoers rule lets {user} run {SHELL} as root"),
            Refusal::NotInstalled => format!("sudo is not installed, or not on {user}'s PATH"),
            Refusal::NotRoot => format!("sudo ran a command for {user}, but not as root"),
            Refusal::Other => format!("sudo refused {user}"),
        }
    }

    /// The sudoers line that lets `user` run roller's commands, and what else to fix.
    pub fn fix(self, user: &str) -> String {
        let rule = rule(user);
        match self {
            Refusal::TerminalRequired => format!(
                "add `Defaults:{user} !requiretty` and `{rule}` to a file under /etc/sudoers.d/ (with visudo)"
            ),
            Refusal::NotInstalled => {
                format!(
                    "install sudo, then add `{rule}` to a file under /etc/sudoers.d/ (with visudo)"
                )
            }
            _ => format!("add `{rule}` to a file under /etc/sudoers.d/ (with visudo)"),
        }
    }
}

/// The sudoers rule `sudo = true` needs: `user` may run [`SHELL`] as root, with any arguments,
/// without a password. That is root for any command: roller's steps are shell scripts.
pub fn rule(user: &str) -> String {
    format!("{user} ALL=(root) NOPASSWD: {SHELL}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_command_runs_under_one_sudo_quoted_as_one_word() {
        assert_eq!(
            wrap("cd /opt/shop && mv -T .roller/current.new current"),
            "sudo -n /bin/sh -c 'cd /opt/shop && mv -T .roller/current.new current'"
        );
        assert_eq!(probe(), "LC_ALL=C sudo -n /bin/sh -c 'id -u'");
    }

    /// Under a real sh: what the wrapper hands to the inner shell is the command, byte for byte.
    #[test]
    fn the_inner_shell_gets_the_command_unchanged() {
        let command = "printf '%s|' \"a b\" '$HOME' \"it's\"\n{ echo; } 9>&-";
        let through = wrap(command).replacen("sudo -n /bin/sh", "/bin/sh", 1);
        let direct = std::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .output()
            .unwrap();
        let wrapped = std::process::Command::new("sh")
            .arg("-c")
            .arg(&through)
            .output()
            .unwrap();
        assert!(wrapped.status.success(), "{wrapped:?}");
        assert_eq!(wrapped.stdout, direct.stdout);
        assert_eq!(
            String::from_utf8_lossy(&wrapped.stdout),
            "a b|$HOME|it's|\n"
        );
    }

    #[test]
    fn sudo_s_refusals_are_told_apart_by_what_it_prints() {
        let cases = [
            (
                "sudo: a password is required\n",
                Some(1),
                Refusal::PasswordRequired,
            ),
            (
                "sudo: a terminal is required to read the password; either use the -S option to read from standard input or configure an askpass helper\n",
                Some(1),
                Refusal::PasswordRequired,
            ),
            (
                "sudo: sorry, you must have a tty to run sudo\n",
                Some(1),
                Refusal::TerminalRequired,
            ),
            (
                "Sorry, user deploy is not allowed to execute '/bin/sh -c id -u' as root on web-1.\n",
                Some(1),
                Refusal::NotAllowed,
            ),
            (
                "deploy is not in the sudoers file.\n",
                Some(1),
                Refusal::NotAllowed,
            ),
            ("sh: 1: sudo: not found\n", Some(127), Refusal::NotInstalled),
            (
                "bash: line 1: sudo: command not found\n",
                Some(127),
                Refusal::NotInstalled,
            ),
            (
                "sudo: unable to open /etc/sudoers: Permission denied\n",
                Some(1),
                Refusal::Other,
            ),
        ];
        for (stderr, status, expected) in cases {
            assert_eq!(Refusal::read(status, stderr), expected, "{stderr}");
        }
    }

    #[test]
    fn the_fix_names_the_rule_for_the_user() {
        assert_eq!(rule("deploy"), "deploy ALL=(root) NOPASSWD: /bin/sh");
        assert!(
            Refusal::PasswordRequired
                .fix("deploy")
                .contains("`deploy ALL=(root) NOPASSWD: /bin/sh`")
        );
        assert!(
            Refusal::TerminalRequired
                .fix("deploy")
                .contains("Defaults:deploy !requiretty")
        );
    }
}
