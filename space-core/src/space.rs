//! The typed, user-facing handle: [`Space`] (async) and [`BlockingSpace`] (threads), over
//! either the in-process [`Engine`] or a node reached through a [`RemoteBackend`].
//!
//! Every operation is written once: it turns the entry into a document (or the result back
//! into `T`) and produces a [`Call`], which is finished either by blocking the thread or by
//! awaiting. In-process calls run straight on the engine; remote ones become one request
//! to a node.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use space_query::{Fields, Query, from_fields, to_fields};

use crate::document::{ClaimTicket, ClaimedDocument, Document, Receipt};
use crate::engine::{Engine, EngineConfig, Pending, Stats};
use crate::entry::{Entry, Key, NodeId};
use crate::error::{Result, SpaceError};
use crate::lease::Lease;
use crate::notify::{EventKinds, Subscription, SubscriptionPosition};
use crate::wire::{Request, Response, Target};

/// A node reached over the network, as `Space` sees it. Implemented by `space-client`.
pub trait RemoteBackend: Send + Sync + 'static {
    /// The node's id.
    fn node(&self) -> NodeId;
    /// Sends one request (retrying on a lost connection with the same request id) and
    /// returns the node's answer.
    fn call(&self, request: Request) -> BoxFuture<'static, Result<Response>>;
    /// Runs one request in the background, not waiting for its answer (failures are
    /// logged): for giving back entries and claims the caller cannot use.
    fn send(&self, request: Request);
    /// Registers a subscription whose events the node pushes to this client.
    fn subscribe(
        &self,
        query: Query,
        kinds: EventKinds,
        lease: Lease,
    ) -> BoxFuture<'static, Result<Subscription>>;
    /// Picks up a detached subscription after `last_seq`.
    fn resume(&self, id: u64, last_seq: u64) -> BoxFuture<'static, Result<Subscription>>;
    /// Picks up a detached subscription where `position` says it stands on each node.
    fn resume_at(&self, position: SubscriptionPosition)
    -> BoxFuture<'static, Result<Subscription>>;
    /// Sends now the acknowledgements of answers that wait for a next call (see
    /// [`Space::send_acknowledgements`]). By default there are none.
    fn send_acknowledgements(&self) -> BoxFuture<'static, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    /// Sends the waiting acknowledgements and waits until what this client gives back in
    /// the background is done (see [`Space::settle`]). By default there is nothing to do.
    fn settle(&self) -> BoxFuture<'static, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

#[derive(Clone)]
enum Backend {
    Local(Engine),
    Remote(Arc<dyn RemoteBackend>),
}

/// A handle to a space: `Clone + Send + Sync`, cheap to clone, all clones share one space.
///
/// The methods here are `async`; for plain threads use [`Space::blocking`], which has the
/// same methods as blocking calls. In-process calls that wait (`read`, `take`, `take_all`,
/// `claim` with a non-zero timeout) need a tokio runtime with the time driver in the async
/// form. A `Space` from `space_client::connect` has exactly the same methods and meaning.
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
    backend: Backend,
}

impl std::fmt::Debug for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.backend {
            Backend::Local(_) => f.debug_struct("Space").field("in_process", &true).finish(),
            Backend::Remote(remote) => f
                .debug_struct("Space")
                .field("in_process", &false)
                .field("node", &remote.node())
                .finish(),
        }
    }
}

/// A claimed entry: hidden from everyone else until [`Space::commit`] removes it or
/// [`Space::release`] (or the claim's lease running out) puts it back.
#[derive(Clone, Debug, PartialEq)]
#[must_use = "a claim left alone hides its entry until its lease runs out: commit or release it"]
pub struct Claim<T> {
    /// The claimed entry.
    pub entry: T,
    /// Its key.
    pub key: Key,
    /// When the claim runs out unless renewed or committed.
    pub expires: SystemTime,
    /// How many times the entry has been claimed, this claim included: 1 the first
    /// time, more when earlier claims were released or lapsed (a worker's attempt count).
    pub claims: u32,
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

/// An operation in flight: done, waiting in the engine, or waiting for a node; on a
/// durable engine, a change is finished only once the log holds it durably.
enum Call<T> {
    Done(Result<T>),
    Local(Pending<Result<T>>),
    Remote(BoxFuture<'static, Result<T>>),
    Durable(Box<Call<T>>, Engine),
}

impl<T: Send + 'static> Call<T> {
    /// Blocks the thread until the result is there. A remote call is driven by the
    /// client's runtime; this thread only waits for its answer.
    fn wait(self) -> Result<T> {
        match self {
            Call::Done(r) => r,
            Call::Local(p) => p.wait(),
            Call::Remote(f) => futures::executor::block_on(f),
            Call::Durable(call, engine) => {
                let r = call.wait();
                engine.flush_blocking()?;
                r
            }
        }
    }

    fn wait_async(self) -> BoxFuture<'static, Result<T>> {
        Box::pin(async move {
            match self {
                Call::Done(r) => r,
                Call::Local(p) => p.wait_async().await,
                Call::Remote(f) => f.await,
                Call::Durable(call, engine) => {
                    let r = call.wait_async().await;
                    engine.flush().await?;
                    r
                }
            }
        })
    }

    /// The call with its result mapped by `f`.
    fn map<U: Send + 'static>(self, f: impl FnOnce(T) -> Result<U> + Send + 'static) -> Call<U> {
        match self {
            Call::Done(r) => Call::Done(r.and_then(f)),
            Call::Local(p) => Call::Local(p.map(|r| r.and_then(f))),
            Call::Remote(fut) => Call::Remote(Box::pin(async move { fut.await.and_then(f) })),
            Call::Durable(call, engine) => Call::Durable(Box::new(call.map(f)), engine),
        }
    }

    /// Makes a local change wait for durability on a durable engine.
    fn durable(self, engine: &Engine) -> Call<T> {
        if engine.is_durable() {
            Call::Durable(Box::new(self), engine.clone())
        } else {
            self
        }
    }
}

/// Checks a query for `T`'s entry type: the type matches, and the query is valid (which
/// bounds its nesting before anything copies or encodes it).
fn check_type<T: Entry>(query: &Query) -> Result<()> {
    if query.entry_type() != T::ENTRY_TYPE {
        return Err(SpaceError::TypeMismatch {
            query_type: query.entry_type().to_owned(),
            requested: T::ENTRY_TYPE.to_owned(),
        });
    }
    query.validate()?;
    crate::schema::check_query::<T>(query)
}

/// Checks a query of a call that names no Rust type: its form, and its fields against
/// the Rust type this process declared for its entry type (see `schema`).
fn check_untyped(query: &Query) -> Result<()> {
    query.validate()?;
    crate::schema::check_named(query)
}

fn encode<T: Entry>(entry: &T) -> Result<(Fields, Option<Key>)> {
    crate::schema::declare::<T>();
    let fields = to_fields(entry).map_err(|problem| SpaceError::Document {
        entry_type: T::ENTRY_TYPE.to_owned(),
        problem,
    })?;
    Ok((fields, entry.key()))
}

fn decode<T: Entry>(fields: Fields) -> Result<T> {
    from_fields(fields).map_err(|problem| SpaceError::Document {
        entry_type: T::ENTRY_TYPE.to_owned(),
        problem,
    })
}

fn unexpected(response: Response) -> SpaceError {
    SpaceError::Protocol {
        reason: format!("unexpected answer {response:?}"),
    }
}

/// What a remote answer must be.
macro_rules! expect {
    ($response:expr, $pattern:pat => $value:expr) => {
        match $response {
            $pattern => Ok($value),
            other => Err(unexpected(other)),
        }
    };
}

impl Space {
    /// A new, empty in-memory space in this process (node id 0).
    pub fn new() -> Space {
        Space::with_config(EngineConfig::default())
    }

    /// A new in-memory space with the given settings.
    pub fn with_config(config: EngineConfig) -> Space {
        Space::from_engine(Engine::new(config))
    }

    /// A durable space in this process, kept in the data directory `dir` (created if
    /// missing; what it holds is recovered). Every change is acknowledged only once it is
    /// durable. Blocks while it recovers.
    ///
    /// # Errors
    /// [`SpaceError::Storage`] naming the file, when the directory cannot be used.
    pub fn open(dir: impl AsRef<std::path::Path>) -> Result<Space> {
        Space::open_with(dir, EngineConfig::default())
    }

    /// [`open`](Self::open) with settings.
    ///
    /// # Errors
    ///
    /// `Storage` when the directory cannot be created or locked, or its log and snapshot
    /// cannot be read (a damaged or foreign file is named).
    pub fn open_with(dir: impl AsRef<std::path::Path>, config: EngineConfig) -> Result<Space> {
        Engine::open(dir, config).map(Space::from_engine)
    }

    /// A handle on an existing engine.
    pub fn from_engine(engine: Engine) -> Space {
        Space {
            backend: Backend::Local(engine),
        }
    }

    /// A handle on a node (for `space-client`).
    pub fn from_remote(remote: Arc<dyn RemoteBackend>) -> Space {
        Space {
            backend: Backend::Remote(remote),
        }
    }

    /// The blocking form of this handle, for plain threads.
    pub fn blocking(&self) -> BlockingSpace {
        BlockingSpace(self.clone())
    }

    /// Closes an in-process space now, whatever other clones of the handle exist: its
    /// threads stop, a durable space's log is written out and its data directory released
    /// before this returns, so it can be opened again at once. Dropping the last handle
    /// does the same. Nothing happens for a remote handle (close its connections by
    /// dropping it).
    pub fn close(&self) {
        if let Backend::Local(engine) = &self.backend {
            engine.close();
        }
    }

    /// The engine behind an in-process handle (`None` for a remote one).
    pub fn local_engine(&self) -> Option<&Engine> {
        match &self.backend {
            Backend::Local(e) => Some(e),
            Backend::Remote(_) => None,
        }
    }

    /// The node id stamped on receipts and events.
    pub fn node(&self) -> NodeId {
        match &self.backend {
            Backend::Local(e) => e.node(),
            Backend::Remote(r) => r.node(),
        }
    }

    /// A remote call whose answer `finish` turns into the result.
    fn remote<T: Send + 'static>(
        remote: &Arc<dyn RemoteBackend>,
        request: Request,
        finish: impl FnOnce(Response) -> Result<T> + Send + 'static,
    ) -> Call<T> {
        let answer = remote.call(request);
        Call::Remote(Box::pin(async move { finish(answer.await?) }))
    }

    /// Decodes taken documents; if one does not decode, every document goes back into the
    /// space (it was removed for this caller and must not be lost) and the call fails.
    fn decode_taken<T: Entry>(
        docs: Vec<Document>,
        put_back: impl FnOnce(Vec<Document>),
    ) -> Result<Vec<T>> {
        let mut out = Vec::with_capacity(docs.len());
        for doc in &docs {
            match decode(doc.fields.clone()) {
                Ok(v) => out.push(v),
                Err(e) => {
                    put_back(docs);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    fn put_back_local(engine: &Engine, entry_type: &str, docs: Vec<Document>) {
        for doc in docs {
            if let Err(e) = engine.put_back(entry_type, doc) {
                tracing::error!(error = %e, "could not put back an entry that failed to decode");
            }
        }
    }

    fn put_back_remote(remote: &Arc<dyn RemoteBackend>, entry_type: &str, docs: Vec<Document>) {
        for doc in docs {
            remote.send(Request::WriteDirect {
                entry_type: entry_type.to_owned(),
                indexes: Vec::new(),
                entries: vec![(doc.fields, Some(doc.key))],
                lease: Lease::Forever,
                labels: Vec::new(),
            });
        }
    }

    /// Decodes a claimed entry; if it does not decode, the claim is handed to `give_back`
    /// (the caller cannot use it, and must not hold it until its lease runs out).
    fn claim_of<T: Entry>(
        c: ClaimedDocument,
        give_back: impl FnOnce(ClaimTicket),
    ) -> Result<Claim<T>> {
        match decode(c.document.fields) {
            Ok(entry) => Ok(Claim {
                entry,
                key: c.ticket.key.clone(),
                expires: c.expires,
                claims: c.claims,
                ticket: c.ticket,
            }),
            Err(e) => {
                give_back(c.ticket);
                Err(e)
            }
        }
    }

    fn op_write<T: Entry>(
        &self,
        entries: &[&T],
        lease: Lease,
        labels: &[(&str, &str)],
    ) -> Call<Vec<Receipt>> {
        let docs = match entries
            .iter()
            .map(|e| encode(*e))
            .collect::<Result<Vec<_>>>()
        {
            Ok(d) => d,
            Err(e) => return Call::Done(Err(e)),
        };
        match &self.backend {
            Backend::Local(engine) => Call::Done(if let [(fields, key)] = &docs[..] {
                engine
                    .write_indexed(
                        T::ENTRY_TYPE,
                        T::INDEXES,
                        fields.clone(),
                        key.clone(),
                        lease,
                    )
                    .map(|r| vec![r])
            } else {
                engine.write_all(T::ENTRY_TYPE, T::INDEXES, docs, lease)
            }),
            Backend::Remote(r) => Self::remote(
                r,
                Request::WriteDirect {
                    entry_type: T::ENTRY_TYPE.to_owned(),
                    indexes: T::INDEXES.iter().map(|s| (*s).to_owned()).collect(),
                    entries: docs,
                    lease,
                    labels: labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                },
                |resp| expect!(resp, Response::Receipts(r) => r),
            ),
        }
    }

    fn op_write_one<T: Entry>(
        &self,
        entry: &T,
        lease: Lease,
        labels: &[(&str, &str)],
    ) -> Call<Receipt> {
        match &self.backend {
            Backend::Local(engine) => Call::Done(encode(entry).and_then(|(fields, key)| {
                engine.write_indexed(T::ENTRY_TYPE, T::INDEXES, fields, key, lease)
            })),
            Backend::Remote(_) => self.op_write(&[entry], lease, labels).map(|mut v| {
                v.pop().ok_or_else(|| SpaceError::Protocol {
                    reason: "a write was answered without a receipt".into(),
                })
            }),
        }
    }

    fn op_read<T: Entry>(&self, query: &Query, timeout: Duration) -> Call<Option<T>> {
        if let Err(e) = check_type::<T>(query) {
            return Call::Done(Err(e));
        }
        match &self.backend {
            Backend::Local(engine) => match engine.read(query, timeout) {
                Ok(p) => Call::Local(p.map(|d| d.map(|d| decode(d.fields)).transpose())),
                Err(e) => Call::Done(Err(e)),
            },
            Backend::Remote(r) => Self::remote(
                r,
                Request::ReadDirect {
                    target: Target::Query(query.clone()),
                    timeout,
                },
                |resp| {
                    expect!(resp, Response::Document(d) => d)?
                        .map(|d| decode(d.fields))
                        .transpose()
                },
            ),
        }
    }

    /// A remote take of up to `max` entries.
    fn remote_take<T: Entry>(
        r: &Arc<dyn RemoteBackend>,
        target: Target,
        max: usize,
        timeout: Duration,
    ) -> Call<Vec<T>> {
        let remote = r.clone();
        Self::remote(
            r,
            Request::TakeDirect {
                target,
                max: u32::try_from(max).unwrap_or(u32::MAX),
                timeout,
            },
            move |resp| {
                let docs = expect!(resp, Response::Documents(d) => d)?;
                Self::decode_taken(docs, |docs| {
                    Self::put_back_remote(&remote, T::ENTRY_TYPE, docs)
                })
            },
        )
    }

    /// Decodes one taken document, putting it back if it does not decode.
    fn decode_one_taken<T: Entry>(engine: &Engine, doc: Option<Document>) -> Result<Option<T>> {
        let Some(doc) = doc else {
            return Ok(None);
        };
        match decode(doc.fields.clone()) {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                Self::put_back_local(engine, T::ENTRY_TYPE, vec![doc]);
                Err(e)
            }
        }
    }

    fn op_take<T: Entry>(&self, query: &Query, timeout: Duration) -> Call<Option<T>> {
        if let Err(e) = check_type::<T>(query) {
            return Call::Done(Err(e));
        }
        match &self.backend {
            Backend::Local(engine) => match engine.take(query, timeout) {
                Ok(p) => {
                    let engine = engine.clone();
                    Call::Local(p.map(move |doc| Self::decode_one_taken(&engine, doc)))
                }
                Err(e) => Call::Done(Err(e)),
            },
            Backend::Remote(r) => Self::first(Self::remote_take(
                r,
                Target::Query(query.clone()),
                1,
                timeout,
            )),
        }
    }

    fn op_take_all<T: Entry>(&self, query: &Query, max: usize, timeout: Duration) -> Call<Vec<T>> {
        if let Err(e) = check_type::<T>(query) {
            return Call::Done(Err(e));
        }
        match &self.backend {
            Backend::Local(engine) => match engine.take_all(query, max, timeout) {
                Ok(p) => {
                    let engine = engine.clone();
                    Call::Local(p.map(move |docs| {
                        Self::decode_taken(docs, |docs| {
                            Self::put_back_local(&engine, T::ENTRY_TYPE, docs)
                        })
                    }))
                }
                Err(e) => Call::Done(Err(e)),
            },
            Backend::Remote(r) => Self::remote_take(r, Target::Query(query.clone()), max, timeout),
        }
    }

    fn op_take_key<T: Entry>(&self, key: &Key) -> Call<Option<T>> {
        match &self.backend {
            Backend::Local(engine) => Call::Done(Self::decode_one_taken(
                engine,
                engine.take_key(T::ENTRY_TYPE, key),
            )),
            Backend::Remote(r) => Self::first(Self::remote_take(
                r,
                Target::Key {
                    entry_type: T::ENTRY_TYPE.to_owned(),
                    key: key.clone(),
                },
                1,
                Duration::ZERO,
            )),
        }
    }

    fn op_claim<T: Entry>(
        &self,
        query: &Query,
        lease: Lease,
        timeout: Duration,
    ) -> Call<Option<Claim<T>>> {
        if let Err(e) = check_type::<T>(query) {
            return Call::Done(Err(e));
        }
        match &self.backend {
            Backend::Local(engine) => match engine.claim(query, lease, timeout) {
                Ok(p) => {
                    let engine = engine.clone();
                    Call::Local(p.map(move |c| {
                        c.map(|c| {
                            Self::claim_of(c, |ticket| {
                                let _ = engine.release(&ticket);
                            })
                        })
                        .transpose()
                    }))
                }
                Err(e) => Call::Done(Err(e)),
            },
            Backend::Remote(r) => {
                let remote = r.clone();
                Self::remote(
                    r,
                    Request::Claim {
                        query: query.clone(),
                        lease,
                        timeout,
                    },
                    move |resp| {
                        let claimed = expect!(resp, Response::Claimed(c) => c)?;
                        claimed
                            .map(|c| {
                                Self::claim_of(c, |ticket| remote.send(Request::Release(ticket)))
                            })
                            .transpose()
                    },
                )
            }
        }
    }

    fn op_ticket(&self, request: Request) -> Call<Option<SystemTime>> {
        match (&self.backend, request) {
            (Backend::Local(e), Request::Commit(t)) => Call::Done(e.commit(&t).map(|()| None)),
            (Backend::Local(e), Request::Release(t)) => Call::Done(e.release(&t).map(|()| None)),
            (Backend::Local(e), Request::RenewClaim(t, lease)) => {
                Call::Done(e.renew_claim(&t, lease).map(Some))
            }
            (
                Backend::Local(e),
                Request::Renew {
                    entry_type,
                    key,
                    lease,
                },
            ) => Call::Done(e.renew(&entry_type, &key, lease)),
            (Backend::Local(e), Request::Cancel { entry_type, key }) => {
                Call::Done(e.cancel(&entry_type, &key).map(|()| None))
            }
            (Backend::Local(_), other) => Call::Done(Err(SpaceError::Protocol {
                reason: format!("{other:?} is not a lease or claim operation"),
            })),
            (Backend::Remote(r), request) => Self::remote(r, request, |resp| match resp {
                Response::Done => Ok(None),
                Response::Expires(t) => Ok(t),
                other => Err(unexpected(other)),
            }),
        }
    }

    fn op_read_key<T: Entry>(&self, key: &Key) -> Call<Option<T>> {
        match &self.backend {
            Backend::Local(engine) => Call::Done(
                engine
                    .read_key(T::ENTRY_TYPE, key)
                    .map(|d| decode(d.fields))
                    .transpose(),
            ),
            Backend::Remote(r) => Self::remote(
                r,
                Request::ReadDirect {
                    target: Target::Key {
                        entry_type: T::ENTRY_TYPE.to_owned(),
                        key: key.clone(),
                    },
                    timeout: Duration::ZERO,
                },
                |resp| {
                    expect!(resp, Response::Document(d) => d)?
                        .map(|d| decode(d.fields))
                        .transpose()
                },
            ),
        }
    }

    fn op_contents<T: Entry>(&self, query: &Query) -> Call<Vec<T>> {
        if let Err(e) = check_type::<T>(query) {
            return Call::Done(Err(e));
        }
        match &self.backend {
            Backend::Local(engine) => Call::Done(
                engine
                    .contents(query)
                    .and_then(|docs| docs.into_iter().map(|d| decode(d.fields)).collect()),
            ),
            Backend::Remote(r) => {
                let remote = r.clone();
                let query = query.clone();
                Call::Remote(Box::pin(async move {
                    let mut out = Vec::new();
                    let mut after = None;
                    loop {
                        let resp = remote
                            .call(Request::Contents {
                                query: query.clone(),
                                after,
                                limit: 1000,
                            })
                            .await?;
                        let (documents, next) = expect!(resp, Response::Page { documents, next, .. } => (documents, next))?;
                        for d in documents {
                            out.push(decode(d.fields)?);
                        }
                        match next {
                            Some(n) => after = Some(n),
                            None => return Ok(out),
                        }
                    }
                }))
            }
        }
    }

    fn op_send_acknowledgements(&self) -> Call<()> {
        match &self.backend {
            Backend::Local(_) => Call::Done(Ok(())),
            Backend::Remote(r) => Call::Remote(r.send_acknowledgements()),
        }
    }

    fn op_settle(&self) -> Call<()> {
        match &self.backend {
            Backend::Local(_) => Call::Done(Ok(())),
            Backend::Remote(r) => Call::Remote(r.settle()),
        }
    }

    fn op_count(&self, query: &Query) -> Call<u64> {
        if let Err(e) = check_untyped(query) {
            return Call::Done(Err(e));
        }
        match &self.backend {
            Backend::Local(engine) => Call::Done(engine.count(query)),
            Backend::Remote(r) => Self::remote(
                r,
                Request::Count(query.clone()),
                |resp| expect!(resp, Response::Count(n) => n),
            ),
        }
    }

    fn op_notify(&self, query: &Query, kinds: EventKinds, lease: Lease) -> Call<Subscription> {
        if let Err(e) = check_untyped(query) {
            return Call::Done(Err(e));
        }
        match &self.backend {
            Backend::Local(engine) => Call::Done(engine.subscribe(query, kinds, lease)),
            Backend::Remote(r) => Call::Remote(r.subscribe(query.clone(), kinds, lease)),
        }
    }

    fn op_resume(&self, id: u64, last_seq: u64) -> Call<Subscription> {
        match &self.backend {
            Backend::Local(engine) => Call::Done(engine.resume(id, last_seq)),
            Backend::Remote(r) => Call::Remote(r.resume(id, last_seq)),
        }
    }

    fn op_resume_at(&self, position: &SubscriptionPosition) -> Call<Subscription> {
        match &self.backend {
            Backend::Local(engine) => Call::Done(match position.parts[..] {
                [part] => engine.resume(part.id, part.last_seq),
                _ => Err(SpaceError::Protocol {
                    reason: format!(
                        "a position on {} nodes cannot be resumed in-process, where a subscription has one part",
                        position.parts.len()
                    ),
                }),
            }),
            Backend::Remote(r) => Call::Remote(r.resume_at(position.clone())),
        }
    }

    fn op_stats(&self) -> Call<Stats> {
        match &self.backend {
            Backend::Local(engine) => Call::Done(Ok(engine.stats())),
            Backend::Remote(r) => Self::remote(
                r,
                Request::Stats,
                |resp| expect!(resp, Response::Stats(s) => s),
            ),
        }
    }

    /// On a durable engine, a change finishes once it is durable.
    fn changes<T: Send + 'static>(&self, call: Call<T>) -> Call<T> {
        match &self.backend {
            Backend::Local(engine) => call.durable(engine),
            Backend::Remote(_) => call,
        }
    }

    fn first<T: Send + 'static>(call: Call<Vec<T>>) -> Call<Option<T>> {
        call.map(|v| Ok(v.into_iter().next()))
    }

    fn unit(call: Call<Option<SystemTime>>) -> Call<()> {
        call.map(|_| Ok(()))
    }

    fn renew_claim_call(&self, ticket: &ClaimTicket, lease: Lease) -> Call<SystemTime> {
        self.op_ticket(Request::RenewClaim(ticket.clone(), lease))
            .map(|t| Ok(t.unwrap_or_else(SystemTime::now)))
    }

    fn entry_request<T: Entry>(key: &Key, lease: Option<Lease>) -> Request {
        match lease {
            Some(lease) => Request::Renew {
                entry_type: T::ENTRY_TYPE.to_owned(),
                key: key.clone(),
                lease,
            },
            None => Request::Cancel {
                entry_type: T::ENTRY_TYPE.to_owned(),
                key: key.clone(),
            },
        }
    }
}

/// Generates the async methods of [`Space`] and the blocking ones of [`BlockingSpace`]
/// from one list, so the two forms cannot drift apart.
macro_rules! both_forms {
    ($(
        $(#[$doc:meta])*
        fn $name:ident $(<$T:ident>)? (&self $(, $arg:ident : $ty:ty)*) -> $ret:ty = |$s:ident| $body:expr;
    )*) => {
        impl Space {
            $(
                $(#[$doc])*
                pub async fn $name $(<$T: Entry>)? (&self $(, $arg: $ty)*) -> $ret {
                    let $s = self;
                    $body.wait_async().await
                }
            )*
        }
        impl BlockingSpace {
            $(
                $(#[$doc])*
                pub fn $name $(<$T: Entry>)? (&self $(, $arg: $ty)*) -> $ret {
                    let $s = &self.0;
                    $body.wait()
                }
            )*
        }
    };
}

both_forms! {
    /// Stores a copy of `entry` with no time limit; returns its receipt (node, key,
    /// version). Never waits for other operations beyond a brief lock (in-process) or one
    /// round trip (remote).
    ///
    /// # Errors
    ///
    /// The entry does not encode as a document, or holds a field of another kind than
    /// earlier entries of its type (`Document`, `FieldType`); its key exists (`KeyExists`);
    /// the space is full (`Full`, `TooLarge`); the node could not be reached (`Down`: not
    /// written; `Unreachable`/`TimedOut`: unknown).
    fn write<T>(&self, entry: &T) -> Result<Receipt> = |s| s.changes(s.op_write_one(entry, Lease::Forever, &[]));

    /// Stores a copy of `entry` that expires after `lease`.
    ///
    /// # Errors
    ///
    /// As [`write`](Self::write); also `InvalidLease` for a zero or absurd lease.
    fn write_with_lease<T>(&self, entry: &T, lease: Lease) -> Result<Receipt> = |s| s.changes(s.op_write_one(entry, lease, &[]));

    /// Stores a copy of a keyless `entry` on a node that carries all of `labels`
    /// (`[("zone", "a")]`), as FindPlaceFor chooses; fails with [`SpaceError::Full`] when
    /// no node carries them or has room. An in-process space is one place: labels do not
    /// apply there.
    ///
    /// # Errors
    ///
    /// As [`write`](Self::write); `Full` when no node carries the labels or has room.
    fn write_labelled<T>(&self, entry: &T, labels: &[(&str, &str)]) -> Result<Receipt> = |s| s.changes(s.op_write_one(entry, Lease::Forever, labels));

    /// Stores all of `entries`, or none of them if any is refused. On a durable node the
    /// batch is one record of the log (on a replicated cluster, one entry of each
    /// shard's log it touches), so a crash keeps all of it or none; a batch that spans
    /// shards is all or nothing per shard.
    ///
    /// # Errors
    ///
    /// As [`write`](Self::write), for any of the entries (then none is stored).
    fn write_all<T>(&self, entries: &[T]) -> Result<Vec<Receipt>> = |s| s.changes(s.op_write(&entries.iter().collect::<Vec<_>>(), Lease::Forever, &[]));

    /// Stores all of `entries` with one lease, or none of them.
    ///
    /// # Errors
    ///
    /// As [`write_all`](Self::write_all); also `InvalidLease`.
    fn write_all_with_lease<T>(&self, entries: &[T], lease: Lease) -> Result<Vec<Receipt>> = |s| s.changes(s.op_write(&entries.iter().collect::<Vec<_>>(), lease, &[]));

    /// A copy of the oldest matching entry, waiting up to `timeout` for one to be written;
    /// `Ok(None)` on timeout. A zero timeout does not wait.
    ///
    /// Blocking/cancel: waits at most `timeout`; dropping the async form gives up the wait.
    ///
    /// # Errors
    ///
    /// A query that is malformed, names a field the type lacks or compares one with a
    /// literal of another kind (`Query`), or is for another entry type (`TypeMismatch`); a
    /// matching entry that does not decode as `T` (`Document`); too many waiters (`Busy`);
    /// the node could not be reached.
    fn read<T>(&self, query: &Query, timeout: Duration) -> Result<Option<T>> = |s| s.op_read(query, timeout);

    /// A copy of the oldest matching entry if there is one now; never waits.
    ///
    /// # Errors
    ///
    /// As [`read`](Self::read).
    fn read_if_exists<T>(&self, query: &Query) -> Result<Option<T>> = |s| s.op_read(query, Duration::ZERO);

    /// Removes and returns the oldest matching entry, waiting up to `timeout`. Each entry
    /// goes to exactly one taker; among waiting takers, the one that waited longest wins.
    ///
    /// Blocking/cancel: waits at most `timeout`. Dropping the async form gives up the
    /// wait; an entry handed to it meanwhile goes back into the space.
    ///
    /// # Errors
    ///
    /// As [`read`](Self::read); when the outcome is unknown (`Unreachable`, `TimedOut`) a
    /// taken entry is given back.
    fn take<T>(&self, query: &Query, timeout: Duration) -> Result<Option<T>> = |s| s.changes(s.op_take(query, timeout));

    /// Removes and returns the oldest matching entry if there is one now; never waits.
    ///
    /// # Errors
    ///
    /// As [`take`](Self::take).
    fn take_if_exists<T>(&self, query: &Query) -> Result<Option<T>> = |s| s.changes(s.op_take(query, Duration::ZERO));

    /// Removes at least one (waiting up to `timeout` for it) and at most `max` matching
    /// entries, oldest first. Empty on timeout. What a node takes at once is one record of
    /// its log (on a replicated cluster, one entry per shard it takes from), all or
    /// nothing across a crash.
    ///
    /// # Errors
    ///
    /// As [`take`](Self::take); `ZeroMax` when `max` is zero.
    fn take_all<T>(&self, query: &Query, max: usize, timeout: Duration) -> Result<Vec<T>> = |s| if max == 0 { Call::Done(Err(SpaceError::ZeroMax)) } else { s.changes(s.op_take_all(query, max, timeout)) };

    /// Claims the oldest matching entry for `lease` (a leased take), waiting up to
    /// `timeout`. Commit removes it; release or the lease running out puts it back.
    ///
    /// Blocking/cancel: as [`take`](Self::take); a claim handed to a dropped future is
    /// released.
    ///
    /// # Errors
    ///
    /// As [`take`](Self::take); `InvalidLease` for a lease that is not finite and positive.
    fn claim<T>(&self, query: &Query, lease: Lease, timeout: Duration) -> Result<Option<Claim<T>>> = |s| s.changes(s.op_claim(query, lease, timeout));

    /// Removes a claimed entry for good. Fails with [`SpaceError::ClaimLost`] when the
    /// claim's lease ran out first.
    ///
    /// # Errors
    ///
    /// `ClaimLost` when the claim's lease ran out first (the entry is back in the space, or
    /// claimed by someone else); the node could not be reached.
    fn commit(&self, claim: &impl AsRef<ClaimTicket>) -> Result<()> = |s| s.changes(Space::unit(s.op_ticket(Request::Commit(claim.as_ref().clone()))));

    /// Puts a claimed entry back into the space.
    ///
    /// # Errors
    ///
    /// As [`commit`](Self::commit).
    fn release(&self, claim: &impl AsRef<ClaimTicket>) -> Result<()> = |s| s.changes(Space::unit(s.op_ticket(Request::Release(claim.as_ref().clone()))));

    /// Extends a claim's lease from now; returns the new expiry.
    ///
    /// # Errors
    ///
    /// As [`commit`](Self::commit); also `InvalidLease`.
    fn renew_claim(&self, claim: &impl AsRef<ClaimTicket>, lease: Lease) -> Result<SystemTime> = |s| s.changes(s.renew_claim_call(claim.as_ref(), lease));

    /// A copy of the entry with this key, if it is visible.
    ///
    /// # Errors
    ///
    /// `Document` when the entry does not decode as `T`; the node could not be reached.
    fn read_key<T>(&self, key: &Key) -> Result<Option<T>> = |s| s.op_read_key(key);

    /// Removes and returns the entry with this key, if it is visible.
    ///
    /// # Errors
    ///
    /// As [`read_key`](Self::read_key).
    fn take_key<T>(&self, key: &Key) -> Result<Option<T>> = |s| s.changes(s.op_take_key(key));

    /// Copies of every matching entry, oldest first: a snapshot, not a live view (fetched
    /// page by page from a node).
    ///
    /// # Errors
    ///
    /// As [`read`](Self::read); `Unavailable` when a cluster's listing could not cover
    /// every shard.
    fn contents<T>(&self, query: &Query) -> Result<Vec<T>> = |s| s.op_contents(query);

    /// Tells the nodes now which answers of takes, claims and commits this handle has
    /// received. A node keeps what a take took with its answer, for a retry or a revoke,
    /// until the client acknowledges it with its next call to that node (large answers
    /// are then dropped on every replica), for a minute otherwise: a client about to stop
    /// after taking large entries calls this last. Nothing to do in-process.
    ///
    /// # Errors
    ///
    /// None: a node that cannot be reached keeps those answers for their minute.
    fn send_acknowledgements(&self) -> Result<()> = |s| s.op_send_acknowledgements();

    /// What a process calls before it exits: sends the acknowledgements that wait (as
    /// [`send_acknowledgements`](Self::send_acknowledgements)) and waits until the calls
    /// this process sends in the background to give entries back are done. Those are the
    /// revokes of takes and claims given up (dropped, timed out, or failed without an
    /// answer, as when a node stops answering), which put back what they took, and the
    /// releases of claims the caller could not use. They run on the client's runtime, and
    /// a process that exits first drops them: a take it gave up keeps its entry for good,
    /// an abandoned claim hides its entry until its lease lapses. Each ends by itself once
    /// its nodes answered, or after trying for a minute, so this returns within about a
    /// minute when nodes cannot be reached; at once when nothing was given up. Nothing to
    /// do in-process.
    ///
    /// # Errors
    ///
    /// None: what cannot be given back in time stays as the nodes have it.
    ///
    /// # Cancel safety
    ///
    /// It only waits (and sends acknowledgements): dropped, the calls go on while the
    /// runtime lives.
    fn settle(&self) -> Result<()> = |s| s.op_settle();

    /// The number of visible matching entries.
    ///
    /// # Errors
    ///
    /// A malformed query, or one that names a field the type lacks (`Query`); `Unavailable`
    /// as for [`contents`](Self::contents); the node could not be reached.
    fn count(&self, query: &Query) -> Result<u64> = |s| s.op_count(query);

    /// Subscribes to the changes of matching entries whose kind is in `kinds`, from now
    /// on, for as long as the returned [`Subscription`] lives.
    ///
    /// # Errors
    ///
    /// A malformed query (`Query`), an unusable lease; too many subscriptions (`Busy`);
    /// `EndpointUnreachable` when a node cannot reach this client's subscriber endpoint and
    /// the client pushes only (`Delivery::Push`); the node could not be reached.
    fn notify(&self, query: &Query, kinds: EventKinds) -> Result<Subscription> = |s| s.op_notify(query, kinds, Lease::Forever);

    /// As [`notify`](Self::notify), with a lease after which the subscription ends.
    ///
    /// # Errors
    ///
    /// As [`notify`](Self::notify).
    fn notify_with_lease(&self, query: &Query, kinds: EventKinds, lease: Lease) -> Result<Subscription> = |s| s.op_notify(query, kinds, lease);

    /// Picks up a detached subscription after `last_seq`; see [`Engine::resume`].
    ///
    /// # Errors
    ///
    /// `SubscriptionClosed` when the subscription is gone (its lease ended, or it was not
    /// resumed in time).
    fn resume(&self, id: u64, last_seq: u64) -> Result<Subscription> = |s| s.op_resume(id, last_seq);

    /// Picks up a subscription detached with
    /// [`Subscription::detach_at`](crate::Subscription::detach_at) where `position` says
    /// it stands: on each node, the events after the last one handed out (those no longer
    /// kept come as a gap). A node that lost the subscription (its lease ran out, or the
    /// node restarted) gets it anew, and a gap says something may be missing from it.
    ///
    /// # Errors
    ///
    /// `SubscriptionClosed` when no node has it any more; a node's refusal; the nodes
    /// could not be reached.
    fn resume_at(&self, position: &SubscriptionPosition) -> Result<Subscription> = |s| s.op_resume_at(position);

    /// Extends an entry's lease from now; returns the new expiry (`None`: forever).
    ///
    /// # Errors
    ///
    /// `NotFound` when no visible entry has the key; `InvalidLease`; the node could not be
    /// reached.
    fn renew<T>(&self, key: &Key, lease: Lease) -> Result<Option<SystemTime>> = |s| s.changes(s.op_ticket(Space::entry_request::<T>(key, Some(lease))));

    /// Cancels an entry's lease: the entry is removed at once (an `Expired` event).
    ///
    /// # Errors
    ///
    /// As [`renew`](Self::renew).
    fn cancel<T>(&self, key: &Key) -> Result<()> = |s| s.changes(Space::unit(s.op_ticket(Space::entry_request::<T>(key, None))));

    /// Counters: entries, bytes, waiters, subscriptions.
    ///
    /// # Errors
    ///
    /// The node could not be reached.
    fn stats(&self) -> Result<Stats> = |s| s.op_stats();
}

/// The blocking form of [`Space`]: the same operations, each blocking the calling thread
/// for at most its timeout. Get one with [`Space::blocking`]; `Clone + Send + Sync`.
///
/// Do not call it from inside an async task (it would block the task's thread); use the
/// async form there.
#[derive(Clone, Debug)]
pub struct BlockingSpace(Space);

impl BlockingSpace {
    /// The async form of this handle.
    pub fn to_async(&self) -> Space {
        self.0.clone()
    }

    /// Closes an in-process space now; see [`Space::close`].
    pub fn close(&self) {
        self.0.close();
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

    #[test]
    fn handles_say_what_they_are_in_debug_output() {
        let space = Space::new();
        assert_eq!(format!("{space:?}"), "Space { in_process: true }");
        assert_eq!(
            format!("{:?}", space.blocking()),
            "BlockingSpace(Space { in_process: true })"
        );
    }
}
