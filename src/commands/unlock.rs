//! `roller unlock`: removes the deploy lock whoever holds it, for the operator who knows its
//! holder is gone; the removal is recorded beside the lock take-overs.

use crate::error::{Error, Result, StateError};
use crate::inventory::Inventory;
use crate::journal::Journal;
use crate::lock::{self, LockInfo};
use crate::session;

/// Removes the lock and returns who held it, `None` when nobody did.
pub async fn unlock(inventory: &Inventory) -> Result<Option<LockInfo>> {
    let lb = session::connect_lock_host(inventory).await?;
    let removed = lock::unlock(lb.as_ref(), &session::lock_spec(inventory))
        .await
        .map_err(|e| Error::from(StateError::Lock(e)));
    lb.close().await;
    let removed = removed?;
    session::record_lock_event(
        &Journal::default_dir(),
        &inventory.app.name,
        "unlock",
        serde_json::json!({ "removed": removed }),
    );
    Ok(removed)
}
