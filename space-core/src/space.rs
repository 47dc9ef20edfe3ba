//! The typed, user-facing handle: [`Space`] (async) and [`BlockingSpace`] (threads).
//!
//! Both are thin: each operation turns the entry into a document (or the query's result
//! back into `T`) and calls the [`Engine`]. The two forms share every step except the
//! wait itself, which is a blocked thread in one and a suspended task in the other.

use std::time::{Duration, SystemTime};

use space_query::{Query, from_fields, to_fields};

use crate::engine::{
    ClaimTicket, ClaimedDocument, Document, Engine, EngineConfig, Pending, Receipt, Stats,
};
use crate::entry::{Entry, Key, NodeId};
use crate::error::{Result, SpaceError};
use crate::lease::Lease;
use crate::notify::{EventKinds, Subscription};

/// A handle to a space: `Clone + Send + Sync`, cheap to clone, all clones share one space.
///
/// The methods here are `async`; for plain threads use [`Space::blocking`], which has the
/// same methods as blocking calls. Calls that wait (`read`, `take`, `take_all`, `claim`
/// with a non-zero timeout) need a tokio runtime with the time driver in the async form.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use space_core::{Query, Space};
/// use std::time::Duration;
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// struct Task { id: u64, kind: String }
/// space_core::entry!(Task, "Task", index = [kind]);
///
/// let space = Space::new().blocking();
/// space.write(&Task { id: 1, kind: "resize".into() })?;
/// let q = Query::of::<Task>().eq("kind", "resize");
/// let task: Option<Task> = space.take(&q, Duration::from_millis(100))?;
/// assert_eq!(task, Some(Task { id: 1, kind: "resize".into() }));
/// # Ok::<(), space_core::SpaceError>(())
/// ```
#[derive(Clone)]
pub struct Space {
    engine: Engine,
}

/// A claimed entry: hidden from everyone else until [`Space::commit`] removes it or
/// [`Space::release`] (or the claim's lease running out) puts it back.
#[derive(Clone, Debug, PartialEq)]
pub struct Claim<T> {
    /// The claimed entry.
    pub entry: T,
    /// Its key.
    pub key: Key,
    /// When the claim runs out unless renewed or committed.
    pub expires: SystemTime,
    ticket: ClaimTicket,
}

impl<T> Claim<T> {
    /// The ticket that commits, releases or renews the claim.
    pub fn ticket(&self) -> &ClaimTicket {
        &self.ticket
    }
}

impl<T> AsRef<ClaimTicket> for Claim<T> {
    fn as_ref(&self) -> &ClaimTicket {
        &self.ticket
    }
}

impl Default for Space {
    fn default() -> Self {
        Space::new()
    }
}

fn check_type<T: Entry>(query: &Query) -> Result<()> {
    if query.entry_type() == T::ENTRY_TYPE {
        Ok(())
    } else {
        Err(SpaceError::TypeMismatch {
            query_type: query.entry_type().to_owned(),
            requested: T::ENTRY_TYPE.to_owned(),
        })
    }
}

fn encode<T: Entry>(entry: &T) -> Result<(space_query::Fields, Option<Key>)> {
    let fields = to_fields(entry).map_err(|source| SpaceError::Document {
        entry_type: T::ENTRY_TYPE.to_owned(),
        source,
    })?;
    Ok((fields, entry.key()))
}

impl Space {
    /// A new, empty in-memory space in this process (node id 0).
    pub fn new() -> Space {
        Space::with_config(EngineConfig::default())
    }

    /// A new in-memory space with the given settings.
    pub fn with_config(config: EngineConfig) -> Space {
        Space {
            engine: Engine::new(config),
        }
    }

    /// The blocking form of this handle, for plain threads.
    pub fn blocking(&self) -> BlockingSpace {
        BlockingSpace(self.clone())
    }

    /// The document-level engine behind this handle.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The node id stamped on receipts and events.
    pub fn node(&self) -> NodeId {
        self.engine.node()
    }

    fn decode<T: Entry>(&self, doc: Document) -> Result<T> {
        from_fields(doc.fields.clone()).map_err(|source| {
            // The entry was removed for this caller; it must not be lost.
            if let Err(e) = self.engine.put_back(T::ENTRY_TYPE, doc) {
                tracing::error!(error = %e, "could not put back an entry that failed to decode");
            }
            SpaceError::Document {
                entry_type: T::ENTRY_TYPE.to_owned(),
                source,
            }
        })
    }

    /// Decodes a copy (nothing to put back on failure).
    fn decode_copy<T: Entry>(doc: Document) -> Result<T> {
        from_fields(doc.fields).map_err(|source| SpaceError::Document {
            entry_type: T::ENTRY_TYPE.to_owned(),
            source,
        })
    }

    fn decode_claim<T: Entry>(&self, c: ClaimedDocument) -> Result<Claim<T>> {
        match from_fields(c.document.fields) {
            Ok(entry) => Ok(Claim {
                entry,
                key: c.ticket.key.clone(),
                expires: c.expires,
                ticket: c.ticket,
            }),
            Err(source) => {
                let _ = self.engine.release(&c.ticket);
                Err(SpaceError::Document {
                    entry_type: T::ENTRY_TYPE.to_owned(),
                    source,
                })
            }
        }
    }

    fn write_now<T: Entry>(&self, entry: &T, lease: Lease) -> Result<Receipt> {
        let (fields, key) = encode(entry)?;
        self.engine
            .write_indexed(T::ENTRY_TYPE, T::INDEXES, fields, key, lease)
    }

    fn write_all_now<T: Entry>(&self, entries: &[T], lease: Lease) -> Result<Vec<Receipt>> {
        let docs = entries.iter().map(encode).collect::<Result<Vec<_>>>()?;
        self.engine
            .write_all(T::ENTRY_TYPE, T::INDEXES, docs, lease)
    }

    fn begin_read<T: Entry>(
        &self,
        query: &Query,
        timeout: Duration,
    ) -> Result<Pending<Result<Option<T>>>> {
        check_type::<T>(query)?;
        Ok(self
            .engine
            .read(query, timeout)?
            .map(|d| d.map(Self::decode_copy).transpose()))
    }

    fn begin_take<T: Entry>(
        &self,
        query: &Query,
        timeout: Duration,
    ) -> Result<Pending<Result<Option<T>>>> {
        check_type::<T>(query)?;
        let this = self.clone();
        Ok(self
            .engine
            .take(query, timeout)?
            .map(move |d| d.map(|d| this.decode(d)).transpose()))
    }

    fn begin_take_all<T: Entry>(
        &self,
        query: &Query,
        max: usize,
        timeout: Duration,
    ) -> Result<Pending<Result<Vec<T>>>> {
        check_type::<T>(query)?;
        let this = self.clone();
        Ok(self
            .engine
            .take_all(query, max, timeout)?
            .map(move |docs| this.decode_all(docs)))
    }

    /// Decodes all taken documents, or puts every one of them back and fails.
    fn decode_all<T: Entry>(&self, docs: Vec<Document>) -> Result<Vec<T>> {
        let mut out = Vec::with_capacity(docs.len());
        let mut failure = None;
        for doc in &docs {
            match from_fields(doc.fields.clone()) {
                Ok(v) => out.push(v),
                Err(source) => {
                    failure = Some(source);
                    break;
                }
            }
        }
        match failure {
            None => Ok(out),
            Some(source) => {
                for doc in docs {
                    if let Err(e) = self.engine.put_back(T::ENTRY_TYPE, doc) {
                        tracing::error!(error = %e, "could not put back an entry that failed to decode");
                    }
                }
                Err(SpaceError::Document {
                    entry_type: T::ENTRY_TYPE.to_owned(),
                    source,
                })
            }
        }
    }

    fn begin_claim<T: Entry>(
        &self,
        query: &Query,
        lease: Lease,
        timeout: Duration,
    ) -> Result<Pending<Result<Option<Claim<T>>>>> {
        check_type::<T>(query)?;
        let this = self.clone();
        Ok(self
            .engine
            .claim(query, lease, timeout)?
            .map(move |c| c.map(|c| this.decode_claim(c)).transpose()))
    }

    fn contents_now<T: Entry>(&self, query: &Query) -> Result<Vec<T>> {
        check_type::<T>(query)?;
        self.engine
            .contents(query)?
            .into_iter()
            .map(Self::decode_copy)
            .collect()
    }

    fn read_key_now<T: Entry>(&self, key: &Key) -> Result<Option<T>> {
        self.engine
            .read_key(T::ENTRY_TYPE, key)
            .map(Self::decode_copy)
            .transpose()
    }

    fn take_key_now<T: Entry>(&self, key: &Key) -> Result<Option<T>> {
        self.engine
            .take_key(T::ENTRY_TYPE, key)
            .map(|d| self.decode(d))
            .transpose()
    }
}

/// Generates the async methods of [`Space`] and the blocking ones of [`BlockingSpace`]
/// from one list, so the two forms cannot drift apart.
macro_rules! both_forms {
    ($(
        $(#[$doc:meta])*
        fn $name:ident $(<$T:ident>)? (&self $(, $arg:ident : $ty:ty)*) -> $ret:ty = $how:ident |$s:ident| $body:expr;
    )*) => {
        impl Space {
            $(
                $(#[$doc])*
                pub async fn $name $(<$T: Entry>)? (&self $(, $arg: $ty)*) -> $ret {
                    let $s = self;
                    both_forms!(@async $how $body)
                }
            )*
        }
        impl BlockingSpace {
            $(
                $(#[$doc])*
                pub fn $name $(<$T: Entry>)? (&self $(, $arg: $ty)*) -> $ret {
                    let $s = &self.0;
                    both_forms!(@blocking $how $body)
                }
            )*
        }
    };
    (@async now $body:expr) => { $body };
    (@blocking now $body:expr) => { $body };
    (@async wait $body:expr) => { $body?.wait_async().await };
    (@blocking wait $body:expr) => { $body?.wait() };
}

both_forms! {
    /// Stores a copy of `entry` with no time limit; returns its receipt (node, key,
    /// version). Never waits for other operations beyond a brief lock.
    fn write<T>(&self, entry: &T) -> Result<Receipt> = now |s| s.write_now(entry, Lease::Forever);

    /// Stores a copy of `entry` that expires after `lease`.
    fn write_with_lease<T>(&self, entry: &T, lease: Lease) -> Result<Receipt> = now |s| s.write_now(entry, lease);

    /// Stores all of `entries`, or none of them if any is refused.
    fn write_all<T>(&self, entries: &[T]) -> Result<Vec<Receipt>> = now |s| s.write_all_now(entries, Lease::Forever);

    /// Stores all of `entries` with one lease, or none of them.
    fn write_all_with_lease<T>(&self, entries: &[T], lease: Lease) -> Result<Vec<Receipt>> = now |s| s.write_all_now(entries, lease);

    /// A copy of the oldest matching entry, waiting up to `timeout` for one to be written;
    /// `Ok(None)` on timeout. A zero timeout does not wait.
    ///
    /// Blocking/cancel: waits at most `timeout`; dropping the async form gives up the wait.
    fn read<T>(&self, query: &Query, timeout: Duration) -> Result<Option<T>> = wait |s| s.begin_read(query, timeout);

    /// A copy of the oldest matching entry if there is one now; never waits.
    fn read_if_exists<T>(&self, query: &Query) -> Result<Option<T>> = wait |s| s.begin_read(query, Duration::ZERO);

    /// Removes and returns the oldest matching entry, waiting up to `timeout`. Each entry
    /// goes to exactly one taker; among waiting takers, the one that waited longest wins.
    ///
    /// Blocking/cancel: waits at most `timeout`. Dropping the async form gives up the
    /// wait; an entry handed to it meanwhile goes back into the space.
    fn take<T>(&self, query: &Query, timeout: Duration) -> Result<Option<T>> = wait |s| s.begin_take(query, timeout);

    /// Removes and returns the oldest matching entry if there is one now; never waits.
    fn take_if_exists<T>(&self, query: &Query) -> Result<Option<T>> = wait |s| s.begin_take(query, Duration::ZERO);

    /// Removes at least one (waiting up to `timeout` for it) and at most `max` matching
    /// entries, oldest first. Empty on timeout.
    fn take_all<T>(&self, query: &Query, max: usize, timeout: Duration) -> Result<Vec<T>> = wait |s| s.begin_take_all(query, max, timeout);

    /// Claims the oldest matching entry for `lease` (a leased take), waiting up to
    /// `timeout`. Commit removes it; release or the lease running out puts it back.
    ///
    /// Blocking/cancel: as [`take`](Self::take); a claim handed to a dropped future is
    /// released.
    fn claim<T>(&self, query: &Query, lease: Lease, timeout: Duration) -> Result<Option<Claim<T>>> = wait |s| s.begin_claim(query, lease, timeout);

    /// Removes a claimed entry for good. Fails with [`SpaceError::ClaimLost`] when the
    /// claim's lease ran out first.
    fn commit(&self, claim: &impl AsRef<ClaimTicket>) -> Result<()> = now |s| s.engine.commit(claim.as_ref());

    /// Puts a claimed entry back into the space.
    fn release(&self, claim: &impl AsRef<ClaimTicket>) -> Result<()> = now |s| s.engine.release(claim.as_ref());

    /// Extends a claim's lease from now; returns the new expiry.
    fn renew_claim(&self, claim: &impl AsRef<ClaimTicket>, lease: Lease) -> Result<SystemTime> = now |s| s.engine.renew_claim(claim.as_ref(), lease);

    /// A copy of the entry with this key, if it is visible.
    fn read_key<T>(&self, key: &Key) -> Result<Option<T>> = now |s| s.read_key_now(key);

    /// Removes and returns the entry with this key, if it is visible.
    fn take_key<T>(&self, key: &Key) -> Result<Option<T>> = now |s| s.take_key_now(key);

    /// Copies of every matching entry, oldest first: a snapshot, not a live view.
    fn contents<T>(&self, query: &Query) -> Result<Vec<T>> = now |s| s.contents_now(query);

    /// The number of visible matching entries.
    fn count(&self, query: &Query) -> Result<u64> = now |s| s.engine.count(query);

    /// Subscribes to the changes of matching entries whose kind is in `kinds`, from now
    /// on, for as long as the returned [`Subscription`] lives.
    fn notify(&self, query: &Query, kinds: EventKinds) -> Result<Subscription> = now |s| s.engine.subscribe(query, kinds, Lease::Forever);

    /// As [`notify`](Self::notify), with a lease after which the subscription ends.
    fn notify_with_lease(&self, query: &Query, kinds: EventKinds, lease: Lease) -> Result<Subscription> = now |s| s.engine.subscribe(query, kinds, lease);

    /// Picks up a detached subscription after `last_seq`; see [`Engine::resume`].
    fn resume(&self, id: u64, last_seq: u64) -> Result<Subscription> = now |s| s.engine.resume(id, last_seq);

    /// Extends an entry's lease from now; returns the new expiry (`None`: forever).
    fn renew<T>(&self, key: &Key, lease: Lease) -> Result<Option<SystemTime>> = now |s| s.engine.renew(T::ENTRY_TYPE, key, lease);

    /// Cancels an entry's lease: the entry is removed at once (an `Expired` event).
    fn cancel<T>(&self, key: &Key) -> Result<()> = now |s| s.engine.cancel(T::ENTRY_TYPE, key);

    /// Counters: entries, bytes, waiters, subscriptions.
    fn stats(&self) -> Stats = now |s| s.engine.stats();
}

/// The blocking form of [`Space`]: the same operations, each blocking the calling thread
/// for at most its timeout. Get one with [`Space::blocking`]; `Clone + Send + Sync`.
#[derive(Clone)]
pub struct BlockingSpace(Space);

impl BlockingSpace {
    /// The async form of this handle.
    pub fn to_async(&self) -> Space {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}

    #[test]
    fn handles_are_send_sync_clone() {
        assert_send_sync_clone::<Space>();
        assert_send_sync_clone::<BlockingSpace>();
    }
}
