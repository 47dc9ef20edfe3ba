//! What the space hands out: documents, receipts, claim tickets; and the id that ties a
//! retried request to its first answer. Plain values, shared by the state, the engine,
//! the typed handles and the wire.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use space_query::Fields;

use crate::entry::{Key, NodeId};

/// Identifies one request across retries: a request that arrives again with the same id
/// (after a lost answer, or across a restart) gets the answer of its first run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId(pub u128);

impl RequestId {
    /// A fresh random id.
    pub fn new() -> RequestId {
        RequestId(uuid::Uuid::new_v4().as_u128())
    }
}

impl Default for RequestId {
    fn default() -> Self {
        RequestId::new()
    }
}

/// An entry as the engine hands it out: its key, version and fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Document {
    /// The entry's key.
    pub key: Key,
    /// The entry's version (1 when written, bumped by claims and releases).
    pub version: u64,
    /// The entry's fields.
    pub fields: Fields,
}

/// What a write returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The node that stored the entry.
    pub node: NodeId,
    /// The entry's key.
    pub key: Key,
    /// The entry's version.
    pub version: u64,
    /// When the entry's lease runs out (`None`: forever).
    pub expires: Option<SystemTime>,
}

/// Proof of a claim, needed to commit, release or renew it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClaimTicket {
    /// The claimed entry's type.
    pub entry_type: String,
    /// The claimed entry's key.
    pub key: Key,
    /// Identifies this claim: a later claim on the same entry has another token.
    pub token: u64,
}

impl AsRef<ClaimTicket> for ClaimTicket {
    fn as_ref(&self) -> &ClaimTicket {
        self
    }
}

/// A claimed entry: a copy of it, and the ticket to commit or release the claim.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClaimedDocument {
    /// The entry as claimed.
    pub document: Document,
    /// The claim.
    pub ticket: ClaimTicket,
    /// When the claim runs out unless renewed or committed.
    pub expires: SystemTime,
    /// How many times the entry has been claimed, this claim included (a claim that
    /// lapsed or was released counts): 1 the first time.
    pub claims: u32,
}
