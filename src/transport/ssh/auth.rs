//! Proving who we are to a host: a key file, or each key an ssh-agent holds.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use russh::client;
use russh::keys::agent::AgentIdentity;
use russh::keys::agent::client::AgentClient;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};

use super::host_key::HostKeyPolicy;
use super::{Attempt, classify_connect_error};
use crate::transport::{Endpoint, TransportError};

#[derive(Clone)]
pub(super) enum Credentials {
    Key { path: PathBuf, key: Arc<PrivateKey> },
    Agent,
}

/// Authenticates `user` on an established connection, with the key file or each key the
/// ssh-agent holds in turn.
pub(super) async fn authenticate(
    handle: &mut client::Handle<HostKeyPolicy>,
    credentials: &Credentials,
    user: &str,
    endpoint: &Endpoint,
) -> Result<(), Attempt> {
    let user = user.to_string();
    let auth_error = |detail: String| {
        Attempt::Fatal(TransportError::Auth {
            user: user.clone(),
            detail: format!("{}: {detail}", endpoint.name),
        })
    };
    match credentials {
        Credentials::Key { path, key } => {
            let hash = if key.algorithm().is_rsa() {
                rsa_hash(handle).await
            } else {
                None
            };
            let result = handle
                .authenticate_publickey(user.clone(), PrivateKeyWithHashAlg::new(key.clone(), hash))
                .await
                .map_err(|e| classify_connect_error(endpoint, e))?;
            if result.success() {
                Ok(())
            } else {
                Err(auth_error(format!(
                    "server rejected key {} ({})",
                    path.display(),
                    key.public_key().fingerprint(HashAlg::Sha256)
                )))
            }
        }
        Credentials::Agent => {
            let mut agent = AgentClient::connect_env()
                .await
                .map_err(|e| auth_error(format!("cannot reach ssh-agent: {e}")))?;
            if let Some(binding) = handle.agent_session_binding() {
                // Only needed for destination-constrained keys; older agents reject it.
                let _ = agent.bind_session(binding, false).await;
            }
            let identities = agent
                .request_identities()
                .await
                .map_err(|e| auth_error(format!("ssh-agent: {e}")))?;
            if identities.is_empty() {
                return Err(auth_error("ssh-agent holds no identities".into()));
            }
            let mut tried = Vec::new();
            for identity in identities {
                let key: PublicKey = match &identity {
                    AgentIdentity::PublicKey { key, .. } => key.clone(),
                    AgentIdentity::Certificate { .. } => continue,
                };
                let hash = if key.algorithm().is_rsa() {
                    rsa_hash(handle).await
                } else {
                    None
                };
                tried.push(key.fingerprint(HashAlg::Sha256).to_string());
                match handle
                    .authenticate_publickey_with(user.clone(), key, hash, &mut agent)
                    .await
                {
                    Ok(result) if result.success() => return Ok(()),
                    Ok(_) => {}
                    Err(russh::AgentAuthError::Send(_)) => {
                        return Err(Attempt::Transient(format!(
                            "connection to {} lost during authentication",
                            endpoint.name
                        )));
                    }
                    // The agent declined this key; the next one may still work.
                    Err(russh::AgentAuthError::Key(_)) => {}
                }
            }
            Err(auth_error(format!(
                "server rejected every ssh-agent key ({})",
                tried.join(", ")
            )))
        }
    }
}

/// RSA keys sign with whichever hash the server advertises, best first; ssh-rsa (SHA-1) only
/// when the server says nothing else.
async fn rsa_hash(handle: &client::Handle<HostKeyPolicy>) -> Option<HashAlg> {
    match handle.best_supported_rsa_hash().await {
        Ok(Some(hash)) => hash,
        // No server-sig-algs extension: modern servers all accept SHA-256.
        Ok(None) | Err(_) => Some(HashAlg::Sha256),
    }
}

pub(super) fn load_identity(user: &str, path: &Path) -> Result<PrivateKey, TransportError> {
    let fail = |detail: String| TransportError::Auth {
        user: user.to_string(),
        detail: format!("identity file {}: {detail}", path.display()),
    };
    // Read first so that a missing file says so, instead of a generic key-parsing error.
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
    russh::keys::decode_secret_key(&text, None).map_err(|e| match e {
        russh::keys::Error::KeyIsEncrypted => fail(
            "the key is passphrase-protected; load it into ssh-agent and leave identity unset"
                .into(),
        ),
        other => fail(format!("not a usable private key: {other}")),
    })
}
