//! Proving who we are to a host: a key file (passphrase-protected or not, with the OpenSSH
//! certificate beside it when there is one), or each key and certificate an ssh-agent holds.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use russh::client;
use russh::keys::agent::AgentIdentity;
use russh::keys::agent::client::AgentClient;
use russh::keys::{Certificate, HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};

use super::host_key::HostKeyPolicy;
use super::{Attempt, classify_connect_error};
use crate::transport::{Endpoint, TransportError};

#[derive(Clone)]
pub(super) enum Credentials {
    Key {
        path: PathBuf,
        key: Arc<PrivateKey>,
        /// `<identity>-cert.pub`, where OpenSSH looks for a key's certificate.
        certificate: Option<Box<Certificate>>,
    },
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
        Credentials::Key {
            path,
            key,
            certificate,
        } => {
            let hash = if key.algorithm().is_rsa() {
                rsa_hash(handle).await
            } else {
                None
            };
            // A host that trusts the certificate authority may not list the key itself, and
            // one that lists the key may not trust the authority: offer both, certificate first.
            if let Some(certificate) = certificate {
                let result = handle
                    .authenticate_openssh_cert(user.clone(), key.clone(), (**certificate).clone())
                    .await
                    .map_err(|e| classify_connect_error(endpoint, e))?;
                if result.success() {
                    return Ok(());
                }
            }
            let result = handle
                .authenticate_publickey(user.clone(), PrivateKeyWithHashAlg::new(key.clone(), hash))
                .await
                .map_err(|e| classify_connect_error(endpoint, e))?;
            if result.success() {
                Ok(())
            } else {
                Err(auth_error(format!(
                    "server rejected key {}{} ({})",
                    path.display(),
                    if certificate.is_some() {
                        " and its certificate"
                    } else {
                        ""
                    },
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
                    AgentIdentity::Certificate { certificate, .. } => {
                        let hash = if certificate.public_key().algorithm().is_rsa() {
                            rsa_hash(handle).await
                        } else {
                            None
                        };
                        tried.push(format!(
                            "certificate {}",
                            certificate.public_key().fingerprint(HashAlg::Sha256)
                        ));
                        match handle
                            .authenticate_certificate_with(
                                user.clone(),
                                certificate.clone(),
                                hash,
                                &mut agent,
                            )
                            .await
                        {
                            Ok(result) if result.success() => return Ok(()),
                            Ok(_) | Err(russh::AgentAuthError::Key(_)) => continue,
                            Err(russh::AgentAuthError::Send(_)) => {
                                return Err(Attempt::Transient(format!(
                                    "connection to {} lost during authentication",
                                    endpoint.name
                                )));
                            }
                        }
                    }
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

/// Reads the key file (decrypting it with `passphrase` when it is protected) and the
/// certificate OpenSSH would use with it.
pub(super) fn load_identity(
    user: &str,
    path: &Path,
    passphrase: Option<&str>,
) -> Result<(PrivateKey, Option<Certificate>), TransportError> {
    let fail = |detail: String| TransportError::Auth {
        user: user.to_string(),
        detail: format!("identity file {}: {detail}", path.display()),
    };
    // Read first so that a missing file says so, instead of a generic key-parsing error.
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
    let key = russh::keys::decode_secret_key(&text, passphrase).map_err(|e| match e {
        russh::keys::Error::KeyIsEncrypted if passphrase.is_none() => fail(
            "the key is passphrase-protected; load it into ssh-agent and leave identity unset, \
             or name an environment variable holding the passphrase in ssh.identity_passphrase_env"
                .into(),
        ),
        other if passphrase.is_some() => fail(format!(
            "cannot decrypt it (wrong passphrase?) or not a usable private key: {other}"
        )),
        other => fail(format!("not a usable private key: {other}")),
    })?;
    let mut cert_path = path.as_os_str().to_owned();
    cert_path.push("-cert.pub");
    let cert_path = PathBuf::from(cert_path);
    let certificate = match std::fs::read_to_string(&cert_path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(fail(format!("cannot read {}: {e}", cert_path.display()))),
        Ok(text) => {
            let certificate = Certificate::from_openssh(text.trim()).map_err(|e| {
                fail(format!(
                    "{} is not an OpenSSH certificate: {e}",
                    cert_path.display()
                ))
            })?;
            if certificate.public_key() != key.public_key().key_data() {
                return Err(fail(format!(
                    "{} certifies another key than this one",
                    cert_path.display()
                )));
            }
            Some(certificate)
        }
    };
    Ok((key, certificate))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ssh-keygen` makes the key files as users have them; roller itself never runs it.
    fn keygen(dir: &Path, passphrase: &str) -> PathBuf {
        let path = dir.join("id_ed25519");
        let status = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", passphrase, "-C", "test", "-f"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        path
    }

    fn sign(dir: &Path, key: &Path, principal: &str) {
        let ca = keygen(&dir.join("ca"), "");
        let status = std::process::Command::new("ssh-keygen")
            .args(["-q", "-s"])
            .arg(&ca)
            .args(["-I", "deploy", "-n", principal])
            .arg(key.with_extension("pub"))
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[test]
    fn a_protected_key_opens_with_its_passphrase_and_says_how_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = keygen(dir.path(), "correct horse");
        let (key, certificate) = load_identity("deploy", &path, Some("correct horse")).unwrap();
        assert!(certificate.is_none());
        assert_eq!(key.algorithm(), russh::keys::Algorithm::Ed25519);

        let missing = load_identity("deploy", &path, None)
            .unwrap_err()
            .to_string();
        assert!(missing.contains("ssh.identity_passphrase_env"), "{missing}");
        assert!(missing.contains(&path.display().to_string()), "{missing}");
        let wrong = load_identity("deploy", &path, Some("battery staple"))
            .unwrap_err()
            .to_string();
        assert!(wrong.contains("wrong passphrase"), "{wrong}");
    }

    #[test]
    fn the_certificate_beside_a_key_is_offered_with_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("ca")).unwrap();
        let path = keygen(dir.path(), "");
        sign(dir.path(), &path, "deploy");
        let (key, certificate) = load_identity("deploy", &path, None).unwrap();
        let certificate = certificate.expect("id_ed25519-cert.pub is read");
        assert_eq!(certificate.public_key(), key.public_key().key_data());
        assert_eq!(certificate.valid_principals(), ["deploy".to_string()]);
    }

    #[test]
    fn a_certificate_for_another_key_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("ca")).unwrap();
        std::fs::create_dir_all(dir.path().join("other")).unwrap();
        let path = keygen(dir.path(), "");
        let other = keygen(&dir.path().join("other"), "");
        sign(dir.path(), &other, "deploy");
        std::fs::copy(
            other.with_file_name("id_ed25519-cert.pub"),
            path.with_file_name("id_ed25519-cert.pub"),
        )
        .unwrap();
        let err = load_identity("deploy", &path, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("certifies another key"), "{err}");
        assert!(err.contains("id_ed25519-cert.pub"), "{err}");
    }
}
