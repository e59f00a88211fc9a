//! How roller reaches hosts: the `[ssh]` section and what a `[[hosts]]` entry may override
//! (login, port, key, bastion), for fleets in private networks behind a bastion or a proxy.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use toml::{Table, Value};

use super::Inventory;
use super::reader::{Reader, join};
use crate::transport::ssh::{Hop, expand_proxy_command, parse_proxy_jump};
use crate::transport::{Endpoint, ssh::DEFAULT_MAX_CONCURRENT_CONNECTS};

/// `[ssh]`. Each reach value (`user`, `port`, `identity`, `proxy_jump`) is `None` when the
/// inventory leaves it to the ssh config file, or to the default without one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SshConfig {
    /// Required unless `config` is set (then `User` there, else `$USER`, as with `ssh`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Default 22.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Private key file; `None` means the ssh config's `IdentityFile`, else the ssh-agent.
    pub identity: Option<PathBuf>,
    /// The environment variable that holds the identity file's passphrase (the passphrase
    /// itself never sits in the inventory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_passphrase_env: Option<String>,
    pub known_hosts: PathBuf,
    #[serde(with = "super::human")]
    pub connect_timeout: Duration,
    /// Accept SHA-1 `ssh-rsa` host-key signatures (old servers only).
    pub allow_sha1_rsa: bool,
    /// Bastions every host is reached through, first hop first; `Some(vec![])` (`"none"`)
    /// connects directly.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "optional_hops"
    )]
    pub proxy_jump: Option<Vec<Hop>>,
    /// A local command that carries the connection (`%h`, `%p`, `%r`, `%n`); wins over
    /// `proxy_jump`, as in OpenSSH.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_command: Option<String>,
    /// New connections being set up at once: a bastion or host drops unauthenticated
    /// connections past its `MaxStartups` (10 by default in OpenSSH).
    pub max_concurrent_connects: usize,
    /// OpenSSH's client configuration, read for every host the inventory does not fully
    /// describe (`config = true` is `~/.ssh/config`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<SshConfigFile>,
}

/// Which ssh config file `ssh.config` names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SshConfigFile {
    pub path: PathBuf,
    /// `config = true`: `~/.ssh/config`, which may be absent, as `ssh` allows.
    pub default: bool,
}

/// What one `[[hosts]]` entry says about reaching it, where it differs from `[ssh]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HostReach {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<PathBuf>,
    /// `Some(vec![])` is `proxy_jump = "none"`: this host is reached directly.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "optional_hops"
    )]
    pub proxy_jump: Option<Vec<Hop>>,
    /// The address as the inventory wrote it, when the ssh config's `HostName` replaced it:
    /// the name the config's `Host` blocks are matched against.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
}

impl HostReach {
    pub fn is_default(&self) -> bool {
        *self == HostReach::default()
    }
}

impl SshConfig {
    /// The passphrase for the identity file, from the environment variable the inventory names.
    pub fn identity_passphrase(&self) -> Result<Option<String>, String> {
        let Some(var) = &self.identity_passphrase_env else {
            return Ok(None);
        };
        match std::env::var(var) {
            Ok(value) if !value.is_empty() => Ok(Some(value)),
            Ok(_) => Err(format!(
                "ssh.identity_passphrase_env: the environment variable {var} is empty"
            )),
            Err(_) => Err(format!(
                "ssh.identity_passphrase_env: the environment variable {var} is not set"
            )),
        }
    }
}

/// `~/x` is how people write key paths; the shell is not there to expand it for us.
fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

fn hops<S: serde::Serializer>(hops: &[Hop], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(hops.iter().map(Hop::to_string))
}

fn optional_hops<S: serde::Serializer>(hops: &Option<Vec<Hop>>, s: S) -> Result<S::Ok, S::Error> {
    match hops {
        Some(hops) => self::hops(hops, s),
        None => s.serialize_none(),
    }
}

impl Inventory {
    /// Replaces each app host's address by the ssh config's `HostName` for it, where the
    /// inventory names one (`ssh.config`): the upstream file and the health checks need the
    /// address the alias stands for, as SSH does. Hosts already resolved are left alone, so
    /// this runs again after discovery.
    pub fn apply_host_names(&mut self) -> crate::error::Result<()> {
        let Some(file) = &self.ssh.config else {
            return Ok(());
        };
        let failed = |message: String| crate::error::Error::SshConfig {
            file: file.path.clone(),
            message,
        };
        let config =
            crate::transport::ssh::ConfigFile::load(&file.path, file.default).map_err(failed)?;
        for host in self.hosts.iter_mut().filter(|h| h.reach.alias.is_none()) {
            let entry = config.host(&host.address).map_err(failed)?;
            match entry.host_name {
                Some(name) if name != host.address => {
                    if !super::is_address(&name) {
                        return Err(failed(format!(
                            "{}: HostName {name:?} is not a host name or IP address",
                            host.address
                        )));
                    }
                    host.reach.alias = Some(std::mem::replace(&mut host.address, name));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl Reader {
    pub(super) fn ssh(&mut self, t: &Table) -> SshConfig {
        let s = "ssh";
        self.unknown_keys(
            s,
            t,
            &[
                "user",
                "port",
                "identity",
                "identity_passphrase_env",
                "known_hosts",
                "connect_timeout",
                "allow_sha1_rsa",
                "proxy_jump",
                "proxy_command",
                "max_concurrent_connects",
                "config",
            ],
        );
        let config = self.config_file(t, s);
        let identity_passphrase_env = self.optional_string(t, s, "identity_passphrase_env");
        if let Some(var) = &identity_passphrase_env
            && (var.is_empty() || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            self.problem(
                join(s, "identity_passphrase_env"),
                format!("{var:?} is not an environment variable name"),
            );
        }
        let proxy_command = self.optional_string(t, s, "proxy_command");
        if let Some(command) = &proxy_command {
            // Placeholders are checked now, so a typo fails here and not at every host.
            if let Err(e) = expand_proxy_command(command, &Endpoint::default(), "user") {
                self.problem(join(s, "proxy_command"), e);
            }
        }
        SshConfig {
            // With an ssh config, the login may come from its `User` lines.
            user: (t.contains_key("user") || config.is_none())
                .then(|| self.word(t, s, "user", None)),
            port: t
                .contains_key("port")
                .then(|| self.port(t, s, "port", None)),
            identity: self
                .optional_string(t, s, "identity")
                .map(|p| expand_home(&p)),
            identity_passphrase_env,
            known_hosts: expand_home(&self.string(t, s, "known_hosts", Some("~/.ssh/known_hosts"))),
            connect_timeout: self.duration(t, s, "connect_timeout", Some("10s")),
            allow_sha1_rsa: self.flag(t, s, "allow_sha1_rsa"),
            proxy_jump: self.proxy_jump(t, s),
            proxy_command,
            max_concurrent_connects: self.integer(
                t,
                s,
                "max_concurrent_connects",
                Some(DEFAULT_MAX_CONCURRENT_CONNECTS as i64),
                1,
                64,
            ) as usize,
            config,
        }
    }

    /// `config = true` (`~/.ssh/config`), `false`, or a path. Only named here: the file is read
    /// when hosts are about to be reached, so `roller plan` needs nothing from it.
    fn config_file(&mut self, t: &Table, section: &str) -> Option<SshConfigFile> {
        match t.get("config")? {
            Value::Boolean(false) => None,
            Value::Boolean(true) => Some(SshConfigFile {
                path: expand_home("~/.ssh/config"),
                default: true,
            }),
            Value::String(_) => {
                self.optional_string(t, section, "config")
                    .map(|path| SshConfigFile {
                        path: expand_home(&path),
                        default: false,
                    })
            }
            other => {
                self.problem(
                    join(section, "config"),
                    format!("must be true, false or a path, got {}", other.type_str()),
                );
                None
            }
        }
    }

    /// The reach overrides of the `[[hosts]]` entry `t`, found at `section`.
    pub(super) fn host_reach(&mut self, t: &Table, section: &str) -> HostReach {
        HostReach {
            port: t
                .contains_key("port")
                .then(|| self.port(t, section, "port", None)),
            identity: self
                .optional_string(t, section, "identity")
                .map(|p| expand_home(&p)),
            proxy_jump: self.proxy_jump(t, section),
            alias: None,
        }
    }

    /// Labels a host carries (`tags = ["az-a"]`), kept with it in the plan.
    pub(super) fn tags(&mut self, t: &Table, section: &str) -> Vec<String> {
        let path = join(section, "tags");
        let Some(value) = t.get("tags") else {
            return Vec::new();
        };
        let Value::Array(items) = value else {
            self.problem(
                path,
                format!("must be a list of words, got {}", value.type_str()),
            );
            return Vec::new();
        };
        let mut tags = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item.as_str() {
                Some(tag) if super::is_word(tag) => {
                    if !tags.iter().any(|t| t == tag) {
                        tags.push(tag.to_string());
                    }
                }
                _ => self.problem(
                    format!("{path}[{i}]"),
                    format!("{item} is not a word (letters, digits, '.', '_', '-')"),
                ),
            }
        }
        tags
    }

    fn proxy_jump(&mut self, t: &Table, section: &str) -> Option<Vec<Hop>> {
        let spec = self.optional_string(t, section, "proxy_jump")?;
        match parse_proxy_jump(&spec) {
            Ok(hops) => Some(hops),
            Err(e) => {
                self.problem(join(section, "proxy_jump"), e);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::inventory::Inventory;
    use crate::transport::ssh::Hop;

    const BASE: &str = r#"
[app]
name = "shop"
dir = "/opt/shop"
restart = "systemctl restart shop"
port = 8080
[balancer]
hosts = ["10.0.0.5"]
upstream_file = "/etc/nginx/conf.d/shop.conf"
"#;

    #[test]
    fn a_fleet_behind_a_bastion_with_per_host_exceptions() {
        let text = format!(
            r#"
[ssh]
user = "ec2-user"
proxy_jump = "ops@bastion.example.com:2222"
identity = "/keys/deploy"
identity_passphrase_env = "DEPLOY_KEY_PASSPHRASE"
max_concurrent_connects = 4
{BASE}
[[hosts]]
name = "web-1"
address = "10.0.1.11"
tags = ["az-a", "canary"]
[[hosts]]
name = "web-2"
address = "10.0.2.12"
port = 2200
identity = "/keys/other"
proxy_jump = "none"
tags = ["az-b"]
"#
        );
        let inv = Inventory::parse(&text).unwrap();
        assert_eq!(
            inv.ssh.proxy_jump,
            Some(vec![Hop::new(Some("ops"), "bastion.example.com", 2222)])
        );
        assert_eq!(inv.ssh.max_concurrent_connects, 4);
        assert_eq!(
            inv.ssh.identity_passphrase_env.as_deref(),
            Some("DEPLOY_KEY_PASSPHRASE")
        );
        assert!(inv.hosts[0].reach.is_default());
        assert_eq!(inv.hosts[0].tags, ["az-a", "canary"]);
        assert_eq!(inv.hosts[1].reach.port, Some(2200));
        assert_eq!(
            inv.hosts[1].reach.identity.as_deref(),
            Some(std::path::Path::new("/keys/other"))
        );
        assert_eq!(inv.hosts[1].reach.proxy_jump, Some(vec![]), "none: direct");
    }

    #[test]
    fn every_reach_mistake_is_named_by_its_key_at_once() {
        let text = format!(
            r#"
[ssh]
user = "ec2-user"
proxy_jump = "bastion:0"
proxy_command = "nc %x %p"
identity_passphrase_env = "NOT-A-NAME"
max_concurrent_connects = 0
{BASE}
[[hosts]]
name = "web-1"
address = "10.0.1.11"
port = 70000
proxy_jump = "@b"
tags = ["ok", 7]
"#
        );
        let problems: Vec<String> = Inventory::parse(&text)
            .unwrap_err()
            .into_iter()
            .map(|p| p.to_string())
            .collect();
        for key in [
            "ssh.proxy_jump:",
            "ssh.proxy_command:",
            "ssh.identity_passphrase_env:",
            "ssh.max_concurrent_connects:",
            "hosts[0].port:",
            "hosts[0].proxy_jump:",
            "hosts[0].tags[1]:",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(key)),
                "{key} not in {problems:#?}"
            );
        }
    }

    #[test]
    fn the_passphrase_comes_from_the_variable_the_inventory_names() {
        let text = format!(
            "[ssh]\nuser = \"u\"\nidentity_passphrase_env = \"ROLLER_TEST_UNSET_PASSPHRASE\"\n{BASE}[[hosts]]\nname = \"w\"\naddress = \"10.0.0.1\"\n"
        );
        let inv = Inventory::parse(&text).unwrap();
        let err = inv.ssh.identity_passphrase().unwrap_err();
        assert!(
            err.contains("ROLLER_TEST_UNSET_PASSPHRASE is not set"),
            "{err}"
        );
    }
}
