//! The errors of space operations.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use space_query::{DocumentError, QueryError, ValueKind};
use thiserror::Error;

use crate::entry::Key;

/// What went wrong with a space operation. Every variant says what was wrong; none of them
/// means that an entry was lost. The same type travels over the wire, so a node's refusal
/// reaches the caller as the variant the node chose.
#[derive(Clone, Debug, Error, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SpaceError {
    /// The query is malformed, or compares a field with a literal of the wrong kind.
    #[error("invalid query: {0}")]
    Query(QueryError),
    /// The entry could not be turned into a document (or a document back into the type).
    #[error("entry of type {entry_type:?}: {problem}")]
    Document {
        /// The entry type.
        entry_type: String,
        /// What the document layer said.
        problem: DocumentError,
    },
    /// An entry type name that is empty, too long or has control characters.
    #[error("invalid entry type {entry_type:?}: {reason}")]
    InvalidEntryType {
        /// The name as given.
        entry_type: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A field holds a different kind of value than earlier entries of the same type.
    #[error(
        "entry of type {entry_type:?}: field {field:?} holds a {found}, but entries of this type store a {expected} there"
    )]
    FieldType {
        /// The entry type.
        entry_type: String,
        /// The field.
        field: String,
        /// The kind the type's schema has for the field.
        expected: ValueKind,
        /// The kind this entry has.
        found: ValueKind,
    },
    /// The query is for another entry type than the one asked for.
    #[error("the query is for entry type {query_type:?}, but the call asks for {requested:?}")]
    TypeMismatch {
        /// The query's entry type.
        query_type: String,
        /// The entry type of the Rust type used in the call.
        requested: String,
    },
    /// A lease that is zero, too long, or otherwise unusable.
    #[error("invalid lease: {reason}")]
    InvalidLease {
        /// Why.
        reason: String,
    },
    /// An entry with this user-supplied key is already in the space.
    #[error("an entry of type {entry_type:?} with key {key} is already in the space")]
    KeyExists {
        /// The entry type.
        entry_type: String,
        /// The key.
        key: Key,
    },
    /// No visible entry has this key (it was taken, expired, or never written).
    #[error("no entry of type {entry_type:?} with key {key}")]
    NotFound {
        /// The entry type.
        entry_type: String,
        /// The key.
        key: Key,
    },
    /// The claim's lease ran out (or it was released) before this commit, release or
    /// renewal; the entry went back to the space and may have been taken by someone else.
    #[error(
        "the claim on entry {key} of type {entry_type:?} is no longer held: its lease ran out or it was released"
    )]
    ClaimLost {
        /// The entry type.
        entry_type: String,
        /// The claimed entry's key.
        key: Key,
    },
    /// The subscription was cancelled or its lease ran out.
    #[error("subscription {id} is closed (cancelled or expired)")]
    SubscriptionClosed {
        /// The subscription id.
        id: u64,
    },
    /// `take_all` was asked for zero entries.
    #[error("take_all needs max >= 1")]
    ZeroMax,
    /// The entry is larger than the node accepts.
    #[error("entry of type {entry_type:?} is {size} bytes, over the node's limit of {limit} bytes")]
    TooLarge {
        /// The entry type.
        entry_type: String,
        /// The entry's size, roughly as stored.
        size: u64,
        /// The node's limit.
        limit: u64,
    },
    /// A request that would not fit in one frame of the connection: write fewer entries
    /// at once (checked by the client before sending).
    #[error("the request is {size} bytes, over the connection's frame limit of {limit} bytes")]
    RequestTooLarge {
        /// The request's encoded size.
        size: u64,
        /// The frame limit.
        limit: u64,
    },
    /// The node is at one of its limits on concurrent work (connections, requests in
    /// flight, blocked calls, subscriptions, entry types); the call did not run. Try again
    /// later, or spread the work.
    #[error("node {node} is busy: {reason}")]
    Busy {
        /// The node's address (empty when the node itself reports it).
        node: String,
        /// Which limit was reached.
        reason: String,
    },
    /// The node holds as many entries or bytes as it is allowed to.
    #[error("the node is full: {reason}")]
    Full {
        /// Which limit was reached.
        reason: String,
    },
    /// The node could not be reached and the call was not sent: nothing happened (unlike
    /// [`SpaceError::Unreachable`], where a call may have been done without its answer
    /// coming back). A cluster client passes over such a node while it stays down.
    #[error("node {node} is down: {reason}; the call was not sent")]
    Down {
        /// The node's address.
        node: String,
        /// What failed.
        reason: String,
    },
    /// No connection to the node could be made or kept.
    #[error("node {node} is unreachable: {reason}")]
    Unreachable {
        /// The node's address.
        node: String,
        /// What failed.
        reason: String,
    },
    /// The node did not answer in time.
    #[error("no answer from node {node} within {after:?}")]
    TimedOut {
        /// The node's address.
        node: String,
        /// How long the call waited.
        after: Duration,
    },
    /// The node refused the connection (wrong token, protocol mismatch).
    #[error("rejected by node {node}: {reason}")]
    Rejected {
        /// The node's address.
        node: String,
        /// Why.
        reason: String,
    },
    /// The node does not own the key's range (any more): refresh the topology (at least
    /// `epoch`) and ask the owner.
    #[error("wrong node for this key: the cluster is at epoch {epoch}{}", owner.as_ref().map(|o| format!(" and the owner is {o}")).unwrap_or_default())]
    WrongNode {
        /// The epoch of the node's topology.
        epoch: u64,
        /// The owner's address, if the node knows it.
        owner: Option<String>,
    },
    /// The data directory or one of its files cannot be used: in use by another process,
    /// a foreign or corrupt file, or an I/O failure (the path says which file).
    #[error("storage {path}: {reason}")]
    Storage {
        /// The file or directory.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The request was given up (a revoke) and did nothing: by its caller before it ran,
    /// or by the node for a caller whose connection closed before the answer went out
    /// (what it took or claimed went back). The client sends a take, claim or commit
    /// given up by its node again, with a new id.
    #[error("the request was revoked and did nothing")]
    Revoked,
    /// The request was answered before, and its caller acknowledged the answer: sent
    /// again with the same id, it is not run again (and what its answer carried is no
    /// longer kept to be sent twice).
    #[error(
        "the request was answered before and its caller acknowledged the answer; it is not run again"
    )]
    Acknowledged,
    /// The node cannot serve this now (a replicated shard without a leader here, or a
    /// call a replicated node does not serve yet); another node, or a later try, may.
    #[error("unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
    /// The node could not connect to the endpoint a subscription's events were to be
    /// pushed to (a client behind NAT, or advertising an address the node cannot reach):
    /// subscribe with events carried over the client's own connection instead.
    #[error("the node cannot reach the subscriber endpoint {endpoint}: {reason}")]
    EndpointUnreachable {
        /// The endpoint's address.
        endpoint: String,
        /// What connecting to it said.
        reason: String,
    },
    /// The peer sent something this side does not understand.
    #[error("protocol error: {reason}")]
    Protocol {
        /// What was wrong.
        reason: String,
    },
}

impl SpaceError {
    /// The variant's name in snake case (`not_found`, `wrong_node`...): a short, fixed
    /// word for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            SpaceError::Query(_) => "query",
            SpaceError::Document { .. } => "document",
            SpaceError::InvalidEntryType { .. } => "invalid_entry_type",
            SpaceError::FieldType { .. } => "field_type",
            SpaceError::TypeMismatch { .. } => "type_mismatch",
            SpaceError::InvalidLease { .. } => "invalid_lease",
            SpaceError::KeyExists { .. } => "key_exists",
            SpaceError::NotFound { .. } => "not_found",
            SpaceError::ClaimLost { .. } => "claim_lost",
            SpaceError::SubscriptionClosed { .. } => "subscription_closed",
            SpaceError::ZeroMax => "zero_max",
            SpaceError::TooLarge { .. } => "too_large",
            SpaceError::RequestTooLarge { .. } => "request_too_large",
            SpaceError::Busy { .. } => "busy",
            SpaceError::Full { .. } => "full",
            SpaceError::Down { .. } => "down",
            SpaceError::Unreachable { .. } => "unreachable",
            SpaceError::TimedOut { .. } => "timed_out",
            SpaceError::Rejected { .. } => "rejected",
            SpaceError::WrongNode { .. } => "wrong_node",
            SpaceError::Storage { .. } => "storage",
            SpaceError::Revoked => "revoked",
            SpaceError::Acknowledged => "acknowledged",
            SpaceError::Unavailable { .. } => "unavailable",
            SpaceError::EndpointUnreachable { .. } => "endpoint_unreachable",
            SpaceError::Protocol { .. } => "protocol",
        }
    }

    /// Whether the error says a node could not be reached (`Down`, `Unreachable`,
    /// `TimedOut`), rather than that it refused the call: a caller may try it again, or
    /// another node.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            SpaceError::Down { .. } | SpaceError::Unreachable { .. } | SpaceError::TimedOut { .. }
        )
    }
}

impl From<QueryError> for SpaceError {
    fn from(e: QueryError) -> Self {
        SpaceError::Query(e)
    }
}

/// Result alias for space operations.
pub type Result<T, E = SpaceError> = std::result::Result<T, E>;
