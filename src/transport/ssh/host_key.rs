//! Strict host-key checking against known_hosts, as OpenSSH does it: unknown hosts and changed
//! or revoked keys are refused with the file and line to look at; channels the server opens
//! are refused too, since roller never asks for any.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use russh::Channel;
use russh::client::{self, ChannelOpenHandle, Msg};
use russh::keys::{HashAlg, PublicKey, PublicKeyOrCertificate};

use crate::transport::TransportError;

/// The host-key algorithms offered, best first: russh's defaults, without SHA-1 `ssh-rsa`
/// unless the inventory allows it, as OpenSSH does since 8.8.
pub(super) fn host_key_algorithms(allow_sha1_rsa: bool) -> Vec<russh::keys::Algorithm> {
    russh::Preferred::DEFAULT
        .key
        .iter()
        .filter(|a| allow_sha1_rsa || **a != russh::keys::Algorithm::Rsa { hash: None })
        .cloned()
        .collect()
}

/// Strict known_hosts policy, run by russh during key exchange.
pub(super) struct HostKeyPolicy {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) known_hosts: PathBuf,
    /// Why the key was refused; russh only reports that it was.
    pub(super) verdict: Arc<Mutex<Option<TransportError>>>,
}

pub(super) fn take_verdict(verdict: &Mutex<Option<TransportError>>) -> Option<TransportError> {
    verdict.lock().unwrap_or_else(|e| e.into_inner()).take()
}

impl HostKeyPolicy {
    fn host_label(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("[{}]:{}", self.host, self.port)
        }
    }

    fn check(&self, key: &PublicKey) -> Result<(), TransportError> {
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let known_hosts = self.known_hosts.display().to_string();
        // russh skips lines with markers; OpenSSH refuses a revoked key whatever else lists
        // it, so they are read first.
        let markers = marker_lines(&self.known_hosts);
        if let Some(m) = markers
            .iter()
            .find(|m| m.marker == "@revoked" && m.key.as_ref() == Some(key.key_data()))
        {
            return Err(TransportError::HostKeyRevoked {
                host: self.host_label(),
                fingerprint,
                known_hosts,
                line: m.line,
            });
        }
        let recorded = russh::keys::known_hosts::known_host_keys_path(
            &self.host,
            self.port,
            &self.known_hosts,
        )
        .map_err(|e| {
            TransportError::Connect(format!(
                "cannot check host key of {}: {known_hosts}: {e}",
                self.host_label()
            ))
        })?;
        if recorded.iter().any(|(_, k)| k.key_data() == key.key_data()) {
            return Ok(());
        }
        // Like OpenSSH: a recorded key of another algorithm says nothing about this one, so the
        // host is merely unknown for it; a different key of the same algorithm is a change.
        if let Some((line, _)) = recorded
            .iter()
            .find(|(_, k)| k.algorithm() == key.algorithm())
        {
            return Err(TransportError::HostKeyChanged {
                host: self.host_label(),
                fingerprint,
                line: physical_line(&self.known_hosts, *line),
                known_hosts,
            });
        }
        if let Some(m) = markers.iter().find(|m| m.marker == "@cert-authority") {
            return Err(TransportError::Connect(format!(
                "host key for {} is not in {known_hosts} ({fingerprint}), and roller does not accept host certificates: \
                 the @cert-authority line {} is not used; list the host's own key instead",
                self.host_label(),
                m.line
            )));
        }
        Err(TransportError::HostKeyUnknown {
            host: self.host_label(),
            fingerprint,
            known_hosts,
        })
    }
}

/// A known_hosts line with a marker (`@revoked`, `@cert-authority`).
struct MarkerLine {
    /// 1-based, counting every line as editors do.
    line: usize,
    marker: String,
    /// `None` when the key does not parse: such a line can match no key.
    key: Option<russh::keys::ssh_key::public::KeyData>,
}

fn marker_lines(path: &Path) -> Vec<MarkerLine> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .enumerate()
        .filter_map(|(index, line)| {
            let mut fields = line.split_whitespace();
            let marker = fields.next().filter(|m| m.starts_with('@'))?;
            let _hosts = fields.next();
            let _algorithm = fields.next();
            let key = fields
                .next()
                .and_then(|k| russh::keys::parse_public_key_base64(k).ok())
                .map(|k| k.key_data().clone());
            Some(MarkerLine {
                line: index + 1,
                marker: marker.to_string(),
                key,
            })
        })
        .collect()
}

/// russh numbers known_hosts lines without counting `#` comments; editors and OpenSSH count them.
pub(super) fn physical_line(path: &Path, russh_line: usize) -> usize {
    let Ok(text) = std::fs::read_to_string(path) else {
        return russh_line;
    };
    let mut counted = 0;
    for (index, line) in text.lines().enumerate() {
        if !line.starts_with('#') {
            counted += 1;
            if counted == russh_line {
                return index + 1;
            }
        }
    }
    russh_line
}

impl client::Handler for HostKeyPolicy {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let outcome = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => self.check(key),
            // Host certificates are never requested, so one arriving is a misbehaving server.
            PublicKeyOrCertificate::Certificate(_) => Err(TransportError::Connect(format!(
                "{} offered a host certificate, which roller does not accept",
                self.host_label()
            ))),
        };
        match outcome {
            Ok(()) => Ok(true),
            Err(refusal) => {
                tracing::warn!(host = %self.host_label(), error = %refusal, "host key refused");
                *self.verdict.lock().unwrap_or_else(|e| e.into_inner()) = Some(refusal);
                Ok(false)
            }
        }
    }

    // roller opens every channel it uses; one the server opens (agent or X11 forwarding, a
    // forwarded port) is never wanted, and russh would accept it by default.

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _connected_address: &str,
        _connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel(reply, "forwarded-tcpip").await
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel(reply, "forwarded-streamlocal").await
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel(reply, "agent forwarding").await
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel(reply, "x11").await
    }

    async fn server_channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel(reply, "session").await
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel(reply, "direct-tcpip").await
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel(reply, "direct-streamlocal").await
    }
}

async fn refuse_channel(reply: ChannelOpenHandle, kind: &str) -> Result<(), russh::Error> {
    tracing::warn!(
        kind,
        "the server opened a channel roller never asked for; refused"
    );
    reply
        .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha1_rsa_host_keys_only_when_the_inventory_allows_them() {
        use russh::keys::Algorithm;
        let sha1 = Algorithm::Rsa { hash: None };
        let sha512 = Algorithm::Rsa {
            hash: Some(HashAlg::Sha512),
        };
        let strict = host_key_algorithms(false);
        assert!(!strict.contains(&sha1), "{strict:?}");
        assert!(strict.contains(&sha512) && strict.contains(&Algorithm::Ed25519));
        assert!(host_key_algorithms(true).contains(&sha1));
    }

    #[test]
    fn physical_line_skips_comments_like_openssh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        std::fs::write(&path, "# one\nhost-a k1 v\n# two\nhost-b k2 v\n").unwrap();
        assert_eq!(physical_line(&path, 1), 2);
        assert_eq!(physical_line(&path, 2), 4);
    }
}
