//! OpenSSH's client configuration (`~/.ssh/config`, `ssh.config`), read with the `ssh2-config`
//! crate so that an inventory can name hosts by the aliases operators already use with `ssh`.
//!
//! Only what says where and as whom a host is reached is taken: `HostName`, `User`, `Port`,
//! `IdentityFile` and `ProxyJump`. A file that relies on what roller cannot honour (`Match`
//! blocks, a `ProxyCommand` for a host it reaches) is refused rather than half-followed: a
//! connection that silently goes elsewhere than `ssh` would is worse than an error.

use std::io::BufReader;
use std::path::{Path, PathBuf};

use ssh2_config::{ParseRule, SshConfig};

use super::jump::{Hop, parse_proxy_jump};

/// A parsed client configuration, and the file it came from (for every message about it).
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub file: PathBuf,
    parsed: SshConfig,
}

/// What the configuration says about one host alias, first obtained value first, as in `ssh`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostEntry {
    pub host_name: Option<String>,
    pub user: Option<String>,
    pub port: Option<u16>,
    /// Every `IdentityFile` that applies, in order, `~` expanded, `%` tokens not yet.
    pub identity_files: Vec<PathBuf>,
    /// `Some(vec![])` is `ProxyJump none`.
    pub proxy_jump: Option<Vec<Hop>>,
    /// A `ProxyCommand` (other than `none`): roller does not run it, so a host that would be
    /// reached through it is refused unless the inventory says how to reach it.
    pub proxy_command: Option<String>,
}

impl ConfigFile {
    /// Reads `file`. A missing file is an error unless `missing_is_empty` (the default
    /// `~/.ssh/config`, which `ssh` also does without).
    pub fn load(file: &Path, missing_is_empty: bool) -> Result<ConfigFile, String> {
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) if missing_is_empty && e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("cannot read it: {e}")),
        };
        let parsed = parse(&text).map_err(|e| match failing_line(&text) {
            Some(line) => format!("line {line} does not parse: {e}"),
            None => format!("does not parse: {e}"),
        })?;
        // The parser does not know `Match`: the lines under it would count for the Host block
        // above it instead.
        if parsed.get_hosts().iter().any(|h| {
            h.params
                .ignored_fields
                .keys()
                .any(|k| k.eq_ignore_ascii_case("match"))
        }) {
            return Err(
                "uses Match blocks, which roller cannot evaluate; use Host blocks, or set the \
                 host's reach in the inventory"
                    .into(),
            );
        }
        Ok(ConfigFile {
            file: file.to_path_buf(),
            parsed,
        })
    }

    /// What applies to `alias`, the name as written in the inventory (as `ssh alias` would).
    pub fn host(&self, alias: &str) -> Result<HostEntry, String> {
        let params = self.parsed.query(alias);
        let proxy_command = params
            .unsupported_fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("proxycommand"))
            .map(|(_, args)| args.join(" "))
            .filter(|command| !command.eq_ignore_ascii_case("none"));
        let proxy_jump = match &params.proxy_jump {
            None => None,
            Some(spec) => Some(
                parse_proxy_jump(&spec.join(",")).map_err(|e| format!("{alias}: ProxyJump {e}"))?,
            ),
        };
        Ok(HostEntry {
            host_name: params
                .host_name
                .map(|name| expand_host_name(&name, alias))
                .transpose()?,
            user: params.user,
            port: params.port,
            identity_files: params.identity_file.unwrap_or_default(),
            proxy_jump,
            proxy_command,
        })
    }
}

fn parse(text: &str) -> Result<SshConfig, ssh2_config::SshParserError> {
    SshConfig::default().parse(
        &mut BufReader::new(text.as_bytes()),
        // Options roller does not use are left alone, as `ssh` leaves alone what it does not
        // need for a given host.
        ParseRule::ALLOW_UNKNOWN_FIELDS | ParseRule::ALLOW_UNSUPPORTED_FIELDS,
    )
}

/// The parser does not say where it failed. Every line of an ssh config stands on its own, so
/// the first line whose prefix of the file fails is the one (for an `Include`, its line).
fn failing_line(text: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    (1..=lines.len()).find(|&n| parse(&lines[..n].join("\n")).is_err())
}

/// `HostName` may say `%h` (the alias) and `%%`, as in `ssh`.
fn expand_host_name(name: &str, alias: &str) -> Result<String, String> {
    expand(name, &[('h', alias)]).map_err(|e| format!("{alias}: HostName {name:?}: {e}"))
}

/// The `%` tokens of `IdentityFile` that roller can know before connecting: `%h` the host
/// name, `%n` the alias, `%p` the port, `%r` the remote user, `%u` the local user, `%d` the
/// local home directory, `%%` a percent sign.
pub fn expand_identity(
    path: &Path,
    host: &str,
    alias: &str,
    port: u16,
    user: &str,
) -> Result<PathBuf, String> {
    let text = path.to_string_lossy();
    if !text.contains('%') {
        return Ok(path.to_path_buf());
    }
    let port = port.to_string();
    let local_user = std::env::var("USER").unwrap_or_default();
    let home = std::env::var("HOME").unwrap_or_default();
    let tokens = [
        ('h', host),
        ('n', alias),
        ('p', port.as_str()),
        ('r', user),
        ('u', local_user.as_str()),
        ('d', home.as_str()),
    ];
    expand(&text, &tokens)
        .map(PathBuf::from)
        .map_err(|e| format!("{alias}: IdentityFile {text:?}: {e}"))
}

fn expand(text: &str, tokens: &[(char, &str)]) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some(t) => match tokens.iter().find(|(k, _)| *k == t) {
                Some((_, value)) => out.push_str(value),
                None => return Err(format!("%{t} is not a token roller can expand here")),
            },
            None => return Err("ends with a lone %".into()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> ConfigFile {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config");
        std::fs::write(&file, text).unwrap();
        ConfigFile::load(&file, false).unwrap()
    }

    #[test]
    fn the_first_value_obtained_wins_across_wildcards_and_negations() {
        let c = config(
            "Host web-* !web-9\n  HostName 10.0.1.%h\n  User deploy\n  Port 2200\n\
             IdentityFile ~/.ssh/deploy_%r\n  ProxyJump bastion\n\
             Host web-1\n  User other\n  Port 22\n  HostName 10.9.9.9\n\
             Host *\n  User fallback\n  IdentityFile /keys/fallback\n",
        );
        let web1 = c.host("web-1").unwrap();
        assert_eq!(web1.host_name.as_deref(), Some("10.0.1.web-1"));
        assert_eq!(web1.user.as_deref(), Some("deploy"));
        assert_eq!(web1.port, Some(2200));
        assert_eq!(web1.proxy_jump, Some(vec![Hop::new(None, "bastion", None)]));
        // IdentityFile accumulates, in order, as ssh tries them.
        assert_eq!(web1.identity_files.len(), 2, "{:?}", web1.identity_files);
        assert!(web1.identity_files[0].ends_with(".ssh/deploy_%r"));
        assert_eq!(web1.identity_files[1], PathBuf::from("/keys/fallback"));
        // Negated: only Host * applies.
        let web9 = c.host("web-9").unwrap();
        assert_eq!(web9.user.as_deref(), Some("fallback"));
        assert_eq!(web9.host_name, None);
        assert_eq!(web9.port, None);
    }

    #[test]
    fn includes_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let included = dir.path().join("fleet.conf");
        std::fs::write(&included, "Host db-1\n  HostName 10.0.2.1\n  User pg\n").unwrap();
        let file = dir.path().join("config");
        std::fs::write(&file, format!("Include {}\n", included.display())).unwrap();
        let c = ConfigFile::load(&file, false).unwrap();
        assert_eq!(c.host("db-1").unwrap().user.as_deref(), Some("pg"));
    }

    #[test]
    fn what_roller_cannot_honour_is_refused_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config");
        std::fs::write(&file, "Match host web-*\n  User deploy\n").unwrap();
        let err = ConfigFile::load(&file, false).unwrap_err();
        assert!(err.contains("Match"), "{err}");

        std::fs::write(&file, "Host web-1\n  User deploy\n  Port twenty-two\n").unwrap();
        let err = ConfigFile::load(&file, false).unwrap_err();
        assert!(err.starts_with("line 3 does not parse"), "{err}");

        let missing = dir.path().join("absent");
        assert!(
            ConfigFile::load(&missing, false)
                .unwrap_err()
                .contains("cannot read")
        );
        let empty = ConfigFile::load(&missing, true).unwrap();
        assert_eq!(empty.host("web-1").unwrap(), HostEntry::default());

        let c = config("Host web-*\n  ProxyCommand nc %h %p\nHost db-*\n  ProxyCommand none\n");
        assert_eq!(
            c.host("web-1").unwrap().proxy_command.as_deref(),
            Some("nc %h %p")
        );
        assert_eq!(c.host("db-1").unwrap().proxy_command, None);
    }

    #[test]
    fn identity_tokens_are_expanded_as_ssh_does() {
        let path = expand_identity(
            Path::new("/keys/%r@%h:%p-%n-%%"),
            "10.0.1.1",
            "web-1",
            2200,
            "deploy",
        )
        .unwrap();
        assert_eq!(path, PathBuf::from("/keys/deploy@10.0.1.1:2200-web-1-%"));
        let err = expand_identity(Path::new("/keys/%C"), "h", "a", 22, "u").unwrap_err();
        assert!(err.contains("%C"), "{err}");
    }
}
