//! Where, as whom and through what each host is reached, decided once before any connection:
//! the inventory's own values over the ssh config file's over the defaults.
//!
//! Precedence, for every value: the host's entry (`[[hosts]]` `user`, `port`, `identity`,
//! `proxy_jump`) > `[ssh]` > the ssh config's `Host` blocks for the host's address (as `ssh
//! <address>` reads them) > the default (port 22, `$USER`, the ssh-agent, direct). `HostName`
//! has no inventory counterpart: the config's, when given, is where the connection goes, and
//! what known_hosts is checked against, as with `ssh`. Bastions named by `ProxyJump` (in either
//! file) are themselves looked up in the config, as `ssh -J` does.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::inventory::{HostReach, Inventory, SshConfig};
use crate::transport::Endpoint;
use crate::transport::ssh::{ConfigFile, Hop, HostEntry, expand_identity};

/// A bastion that names its own bastion may do so this many times: past it, a loop.
const MAX_JUMP_DEPTH: usize = 8;

/// Every host and load balancer to connect to, named as the plan names them, with everything
/// about reaching it settled. Reads the ssh config file when the inventory names one: a file
/// that is missing or does not parse fails here, before any connection.
pub fn endpoints(inv: &Inventory) -> Result<Vec<Endpoint>> {
    let config = match &inv.ssh.config {
        None => None,
        Some(file) => Some(
            ConfigFile::load(&file.path, file.default).map_err(|message| Error::SshConfig {
                file: file.path.clone(),
                message,
            })?,
        ),
    };
    let reach = Reach {
        ssh: &inv.ssh,
        config: config.as_ref(),
        local_user: local_user(),
    };
    let no_overrides = HostReach::default();
    let hosts = inv
        .hosts
        .iter()
        .map(|h| reach.endpoint(&h.name, &h.address, h.user.as_deref(), &h.reach));
    // An app host's address may already be its HostName (`Inventory::apply_host_names`);
    // `endpoint` then looks the config up by the alias the inventory gave.
    let balancers = inv
        .balancer
        .hosts
        .iter()
        .map(|lb| reach.endpoint(lb, lb, None, &no_overrides));
    hosts
        .chain(balancers)
        .collect::<std::result::Result<_, _>>()
        .map_err(|message| Error::SshConfig {
            file: config.map(|c| c.file).unwrap_or_default(),
            message,
        })
}

/// The login bastions use when neither their hop nor the config names one: `ssh.user`, else
/// the local user, as `ssh` would.
pub fn default_user(ssh: &SshConfig) -> String {
    ssh.user.clone().or_else(local_user).unwrap_or_default()
}

fn local_user() -> Option<String> {
    ["USER", "LOGNAME"]
        .into_iter()
        .find_map(|var| std::env::var(var).ok().filter(|v| !v.is_empty()))
}

/// The inventory's `[ssh]`, the config file it names, and the local user, for resolving hosts.
pub struct Reach<'a> {
    pub ssh: &'a SshConfig,
    pub config: Option<&'a ConfigFile>,
    pub local_user: Option<String>,
}

impl Reach<'_> {
    /// `name`'s endpoint, for the inventory `address` (an ssh config alias, or a real address)
    /// with the host's own `user` and overrides.
    pub fn endpoint(
        &self,
        name: &str,
        address: &str,
        user: Option<&str>,
        overrides: &HostReach,
    ) -> std::result::Result<Endpoint, String> {
        let alias = overrides.alias.as_deref().unwrap_or(address);
        let entry = self.entry(alias)?;
        let host = match &overrides.alias {
            Some(_) => address.to_string(),
            None => entry
                .host_name
                .clone()
                .unwrap_or_else(|| address.to_string()),
        };
        let port = overrides
            .port
            .or(self.ssh.port)
            .or(entry.port)
            .unwrap_or(22);
        let user = user
            .map(str::to_string)
            .or_else(|| self.ssh.user.clone())
            .or_else(|| entry.user.clone())
            .or_else(|| self.local_user.clone())
            .ok_or_else(|| {
                format!("{name}: no login: set ssh.user, or User for {alias} in the ssh config")
            })?;
        let identity = match overrides.identity.as_ref().or(self.ssh.identity.as_ref()) {
            Some(path) => Some(path.clone()),
            None => config_identity(&entry, &host, alias, port, &user)?,
        };
        // A host's own bastions win over [ssh]'s proxy command, which wins over its bastions;
        // `None` leaves the choice to the connector (the proxy command, or directly).
        let proxy_jump = if let Some(hops) = &overrides.proxy_jump {
            Some(self.hops(hops, 0)?)
        } else if self.ssh.proxy_command.is_some() {
            None
        } else if let Some(hops) = &self.ssh.proxy_jump {
            Some(self.hops(hops, 0)?)
        } else if let Some(command) = &entry.proxy_command {
            return Err(format!(
                "{name}: the ProxyCommand for {alias} ({command}) is not run by roller; set \
                 ssh.proxy_command, or proxy_jump, in the inventory"
            ));
        } else if let Some(hops) = &entry.proxy_jump {
            Some(self.hops(hops, 0)?)
        } else {
            None
        };
        Ok(Endpoint {
            name: name.to_string(),
            address: host,
            port,
            user: Some(user),
            identity,
            proxy_jump,
        })
    }

    fn entry(&self, alias: &str) -> std::result::Result<HostEntry, String> {
        match self.config {
            Some(config) => config.host(alias),
            None => Ok(HostEntry::default()),
        }
    }

    /// Each hop as the config describes its alias: what the hop spells out (`user@`, `:port`)
    /// wins. The first bastion's own `ProxyJump` comes before it, as `ssh -J` reaches it.
    fn hops(&self, hops: &[Hop], depth: usize) -> std::result::Result<Vec<Hop>, String> {
        if depth > MAX_JUMP_DEPTH {
            return Err(format!(
                "ProxyJump through {} leads to more than {MAX_JUMP_DEPTH} bastions in a row: a loop?",
                hops.first().map(|h| h.address.as_str()).unwrap_or_default()
            ));
        }
        let mut resolved = Vec::new();
        for (i, hop) in hops.iter().enumerate() {
            let entry = self.entry(&hop.address)?;
            if let (0, Some(command), None) = (i, &entry.proxy_command, &entry.proxy_jump) {
                return Err(format!(
                    "bastion {}: its ProxyCommand ({command}) is not run by roller",
                    hop.address
                ));
            }
            if i == 0
                && let Some(before) = entry.proxy_jump.as_ref().filter(|h| !h.is_empty())
            {
                resolved.extend(self.hops(before, depth + 1)?);
            }
            let address = entry
                .host_name
                .clone()
                .unwrap_or_else(|| hop.address.clone());
            let port = hop.port.or(entry.port).unwrap_or(22);
            let user = hop.user.clone().or_else(|| entry.user.clone());
            let login = user.clone().unwrap_or_else(|| default_user(self.ssh));
            let identity = match &hop.identity {
                Some(path) => Some(path.clone()),
                None => config_identity(&entry, &address, &hop.address, port, &login)?,
            };
            resolved.push(Hop {
                user,
                address,
                port: Some(port),
                identity,
            });
        }
        Ok(resolved)
    }
}

/// The config's key for a host: the first `IdentityFile` that exists, since `ssh` skips the
/// missing ones; else the first, so the error at connect names it.
fn config_identity(
    entry: &HostEntry,
    host: &str,
    alias: &str,
    port: u16,
    user: &str,
) -> std::result::Result<Option<PathBuf>, String> {
    let candidates = entry
        .identity_files
        .iter()
        .map(|path| expand_identity(path, host, alias, port, user))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(candidates
        .iter()
        .find(|p| p.exists())
        .or(candidates.first())
        .cloned())
}

#[cfg(test)]
#[path = "reach_tests.rs"]
mod tests;
