//! The jar a rollout ships and the names releases take on hosts: both become paths there, so
//! they are checked here, once, before any plan is built from them.

use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::inventory::is_word;

/// The jar to roll out, read once: its bytes are uploaded to every host from memory.
#[derive(Debug, Clone, Serialize)]
pub struct Artifact {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    #[serde(skip)]
    pub content: bytes::Bytes,
}

impl Artifact {
    /// Reads and checks the jar: a regular, non-empty file that is a zip archive, as every jar is.
    pub fn load(path: &Path) -> Result<Artifact> {
        let fail = |message: String| Error::Artifact {
            path: path.to_path_buf(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        if !meta.is_file() {
            return Err(fail("is not a regular file".into()));
        }
        let content = std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        if content.is_empty() {
            return Err(fail("is empty".into()));
        }
        if !content.starts_with(b"PK\x03\x04") {
            return Err(fail("is not a jar (no zip header)".into()));
        }
        let sha256 = hex::encode(Sha256::digest(&content));
        Ok(Artifact {
            path: path.to_path_buf(),
            sha256,
            bytes: content.len() as u64,
            content: content.into(),
        })
    }

    /// A release name that changes whenever the jar does: `<file stem>-<first 12 of sha256>`.
    pub fn default_release(&self) -> String {
        let stem: String = self
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '-'
                }
            })
            .take(40)
            .collect();
        let stem = stem.trim_start_matches('.');
        let stem = if stem.is_empty() { "release" } else { stem };
        format!("{stem}-{}", &self.sha256[..12])
    }
}

/// The release rules: a release becomes a directory name on every host, so 1 to 64 letters,
/// digits, `.`, `_` or `-`, not starting with `.`.
pub fn is_release(release: &str) -> bool {
    is_word(release) && !release.starts_with('.') && release.len() <= 64
}

/// Checks a release name given with `--release`: it becomes a directory name on every host.
pub fn validate_release(release: &str) -> Result<()> {
    if !is_release(release) {
        return Err(Error::Usage {
            flag: "--release".into(),
            message: format!(
                "{release:?} must be 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
            ),
        });
    }
    Ok(())
}
