//! Reaching hosts through a bastion, as OpenSSH's `ProxyJump` does: one authenticated
//! connection per bastion, and each host's SSH connection carried inside a `direct-tcpip`
//! channel on it.
//!
//! One connection carries every host because a bastion as shipped drops concurrent
//! unauthenticated connections past `MaxStartups` (10 by default), while its `MaxSessions`
//! counts session channels only: forwards through one connection are not limited by it. The
//! bastion's key is checked against known_hosts like any host's, and so is every host's key
//! through the tunnel: the bastion only moves bytes.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use russh::client::{self, Handle, Msg};
use russh::{ChannelOpenFailure, ChannelStream};

use super::host_key::HostKeyPolicy;
use super::{Attempt, SshConnector};
use crate::transport::{Endpoint, TransportError};

/// One hop of a `proxy_jump` chain: `[user@]host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Hop {
    pub user: Option<String>,
    pub address: String,
    /// `None` until the ssh config (if any) had its say; then 22.
    pub port: Option<u16>,
    /// The bastion's own key (from its `IdentityFile` in the ssh config), when it is not the
    /// connector's.
    pub identity: Option<PathBuf>,
}

impl Hop {
    pub fn new(user: Option<&str>, address: &str, port: impl Into<Option<u16>>) -> Hop {
        Hop {
            user: user.map(str::to_string),
            address: address.to_string(),
            port: port.into(),
            identity: None,
        }
    }

    pub fn port(&self) -> u16 {
        self.port.unwrap_or(22)
    }
}

impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        if self.address.contains(':') {
            write!(f, "[{}]", self.address)?;
        } else {
            write!(f, "{}", self.address)?;
        }
        if let Some(port) = self.port.filter(|p| *p != 22) {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

/// Parses OpenSSH's `ProxyJump` syntax: hops separated by commas, each `[user@]host[:port]`
/// or `ssh://[user@]host[:port]`, IPv6 addresses in brackets when a port follows; `none`
/// means no bastion. The first hop is the one the controller connects to.
pub fn parse_proxy_jump(spec: &str) -> Result<Vec<Hop>, String> {
    let spec = spec.trim();
    if spec.is_empty() || spec == "none" {
        return Ok(Vec::new());
    }
    spec.split(',').map(|hop| parse_hop(hop.trim())).collect()
}

fn parse_hop(text: &str) -> Result<Hop, String> {
    let bad = |why: &str| format!("{text:?} is not [user@]host[:port]: {why}");
    let rest = text.strip_prefix("ssh://").unwrap_or(text);
    let (user, host_port) = match rest.rsplit_once('@') {
        Some((user, host_port)) if !user.is_empty() => (Some(user.to_string()), host_port),
        Some(_) => return Err(bad("the user before @ is empty")),
        None => (None, rest),
    };
    let (address, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
        let (address, after) = bracketed
            .split_once(']')
            .ok_or_else(|| bad("no closing ]"))?;
        match after {
            "" => (address, None),
            _ => (
                address,
                Some(after.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?),
            ),
        }
    } else if host_port.matches(':').count() == 1 {
        let (address, port) = host_port.split_once(':').unwrap_or((host_port, ""));
        (address, Some(port))
    } else {
        // No colon, or a bare IPv6 address, which cannot carry a port without brackets.
        (host_port, None)
    };
    if address.is_empty() {
        return Err(bad("the host is empty"));
    }
    if address
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '/' || c == '@')
    {
        return Err(bad("the host has characters no host name has"));
    }
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?,
        ),
    };
    Ok(Hop {
        user,
        address: address.to_string(),
        port,
        identity: None,
    })
}

/// Authenticated bastion connections, one per chain of hops, shared by every host behind it.
#[derive(Default)]
pub(super) struct Bastions {
    /// Held while a chain is being connected, so hosts that start together wait for one
    /// connection instead of each opening their own (which is what trips `MaxStartups`).
    open: tokio::sync::Mutex<HashMap<Vec<Hop>, Arc<Handle<HostKeyPolicy>>>>,
}

impl SshConnector {
    /// A byte stream to `address:port` as seen from the last hop of `hops`.
    pub(super) async fn tunnel(
        &self,
        hops: &[Hop],
        endpoint: &Endpoint,
    ) -> Result<ChannelStream<Msg>, Attempt> {
        let bastion = self.bastion(hops).await?;
        let last = hops.last().map(Hop::to_string).unwrap_or_default();
        forward(&bastion, &last, &endpoint.address, endpoint.port)
            .await
            .map_err(|refusal| match refusal {
                Forward::Prohibited => Attempt::Fatal(TransportError::Connect(format!(
                    "{}: bastion {last} refused to forward to {}:{} (administratively \
                     prohibited): its sshd must allow TCP forwarding for this user \
                     (AllowTcpForwarding yes, and PermitOpen/PermitListen if set must \
                     include the host)",
                    endpoint.name, endpoint.address, endpoint.port
                ))),
                Forward::Failed(why) => Attempt::Transient(format!(
                    "{}: bastion {last} could not connect to {}:{}: {why}",
                    endpoint.name, endpoint.address, endpoint.port
                )),
            })
    }

    /// The connection to the last hop of `hops`, opening (or reopening, when it died) every
    /// hop on the way.
    async fn bastion(&self, hops: &[Hop]) -> Result<Arc<Handle<HostKeyPolicy>>, Attempt> {
        let mut open = self.bastions.open.lock().await;
        let mut through: Option<Arc<Handle<HostKeyPolicy>>> = None;
        for depth in 1..=hops.len() {
            let chain = &hops[..depth];
            if let Some(handle) = open.get(chain).filter(|h| !h.is_closed()) {
                through = Some(handle.clone());
                continue;
            }
            let hop = &hops[depth - 1];
            let endpoint = Endpoint {
                name: format!("bastion {hop}"),
                address: hop.address.clone(),
                port: hop.port(),
                user: hop.user.clone(),
                identity: hop.identity.clone(),
                ..Endpoint::default()
            };
            let (policy, verdict) = self.host_key_policy(&endpoint);
            let connected = match &through {
                None => {
                    client::connect(
                        self.config.clone(),
                        (hop.address.as_str(), hop.port()),
                        policy,
                    )
                    .await
                }
                Some(previous) => {
                    let before = hops[depth - 2].to_string();
                    let stream = forward(previous, &before, &hop.address, hop.port())
                        .await
                        .map_err(|refusal| {
                            Attempt::Fatal(TransportError::Connect(format!(
                                "bastion {before} cannot reach the next bastion {hop}: {}",
                                match refusal {
                                    Forward::Prohibited =>
                                        "forwarding is administratively prohibited there"
                                            .to_string(),
                                    Forward::Failed(why) => why,
                                }
                            )))
                        })?;
                    client::connect_stream(self.config.clone(), stream, policy).await
                }
            };
            let handle = self.handshaken(connected, &verdict, &endpoint).await?;
            tracing::debug!(bastion = %hop, "bastion connected");
            let handle = Arc::new(handle);
            open.insert(chain.to_vec(), handle.clone());
            through = Some(handle);
        }
        through.ok_or_else(|| Attempt::Fatal(TransportError::Connect("no bastion given".into())))
    }
}

/// Why a bastion did not open a forward.
enum Forward {
    /// `AllowTcpForwarding no`, `PermitOpen`, or a forced command: policy, not a fault.
    Prohibited,
    Failed(String),
}

async fn forward(
    bastion: &Handle<HostKeyPolicy>,
    label: &str,
    address: &str,
    port: u16,
) -> Result<ChannelStream<Msg>, Forward> {
    match bastion
        .channel_open_direct_tcpip(address, u32::from(port), "127.0.0.1", 0)
        .await
    {
        Ok(channel) => Ok(channel.into_stream()),
        Err(russh::Error::ChannelOpenFailure(ChannelOpenFailure::AdministrativelyProhibited)) => {
            Err(Forward::Prohibited)
        }
        Err(russh::Error::ChannelOpenFailure(reason)) => Err(Forward::Failed(format!(
            "{reason:?} (nothing listens there, or the bastion cannot route to it)"
        ))),
        Err(e) => Err(Forward::Failed(format!(
            "the connection to bastion {label} failed: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_jump_reads_as_openssh_writes_it() {
        assert_eq!(
            parse_proxy_jump("ec2-user@bastion.example.com:2200").unwrap(),
            vec![Hop::new(Some("ec2-user"), "bastion.example.com", 2200)]
        );
        assert_eq!(
            parse_proxy_jump("jump1, ops@[fd00::1]:22,ssh://10.0.0.5").unwrap(),
            vec![
                Hop::new(None, "jump1", None),
                Hop::new(Some("ops"), "fd00::1", 22),
                Hop::new(None, "10.0.0.5", None)
            ]
        );
        assert_eq!(
            parse_proxy_jump("fd00::7").unwrap(),
            vec![Hop::new(None, "fd00::7", None)]
        );
        assert_eq!(parse_proxy_jump("none").unwrap(), vec![]);
        assert_eq!(
            Hop::new(Some("ops"), "fd00::1", 2200).to_string(),
            "ops@[fd00::1]:2200"
        );
        assert_eq!(Hop::new(None, "b", 22).to_string(), "b");
    }

    #[test]
    fn bad_proxy_jump_says_which_hop_and_why() {
        for (spec, why) in [
            ("bastion:0", "port"),
            ("bastion:ssh", "port"),
            ("@bastion", "user"),
            ("[fd00::1", "]"),
            ("a,,b", "host is empty"),
            ("bad host", "characters"),
        ] {
            let err = parse_proxy_jump(spec).unwrap_err();
            assert!(err.contains(why), "{spec}: {err}");
        }
    }
}
