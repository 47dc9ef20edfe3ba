//! A replicated node's calls: each goes to the engine of the shard it concerns, served
//! here while this node leads that shard (docs/ARCHITECTURE.md section 9).
//!
//! Calls by key go to the key's shard (`WrongNode` naming its leader otherwise); keyless
//! writes go to the shards this node leads, in runs of [`KEYLESS_RUN`] entries or
//! [`KEYLESS_RUN_BYTES`] per shard, and mint keys inside them; reads,
//! takes and claims by query, counts, contents and stats cover the shards this node
//! leads (a client asks every node). A subscription is registered in the logs of the
//! shards this node leads, and their events pushed or polled from here (see
//! `replica::notify`).

use std::sync::atomic::Ordering;

use space_core::server::{Engine, Registered};
use space_core::wire::{Request, Response, Target, range_of};
use space_core::{Fields, Key, SpaceError, Stats};

use crate::dedupe::{Finished, Outcome};

/// An entry to write: its fields and its user key, if any.
type NewEntry = (Fields, Option<Key>);

/// Keyless entries a replicated node sends to one of the shards it leads before the next
/// shard's turn. Writes at the same time then go to the same shard, whose Raft log carries
/// them in one append and one replication message; with every write on a shard of its
/// own, each paid for a whole round of the log (three times less throughput with 64
/// shards than with 4, `space-bench replicated`). Over many runs every led shard gets
/// its share.
const KEYLESS_RUN: usize = 512;

/// Bytes of keyless entries that end a shard's turn as [`KEYLESS_RUN`] entries do, when
/// they come first: a stream of large entries then spreads over the led shards, instead
/// of one shard's log, snapshot and answer table taking hundreds of MB while the others
/// stay empty. (Each entry counts as at least one of the run's entries.)
const KEYLESS_RUN_BYTES: usize = 1 << 20;

/// How far keyless entries of `bytes` in all move the turn, in entries of
/// [`KEYLESS_RUN`]: their number, or their share of [`KEYLESS_RUN_BYTES`] if larger.
fn keyless_weight(entries: usize, bytes: usize) -> usize {
    entries.max(bytes.saturating_mul(KEYLESS_RUN) / KEYLESS_RUN_BYTES)
}

/// A contents cursor of a replicated node: the shard in the top 16 bits, the position
/// within the shard's engine below.
const SHARD_SHIFT: u32 = 48;
const POSITION: u64 = (1 << SHARD_SHIFT) - 1;
use crate::engines_used::{note_used, serving_for};
use crate::replica::{ShardSet, claim_across, read_across, take_across};
use crate::server::NodeState;

/// A page of contents gathered over the shards this node serves.
#[derive(Default)]
struct ShardedPage {
    documents: Vec<space_core::Document>,
    /// Where the next page starts (`None`: the listing is complete here).
    next: Option<u64>,
    /// The shards listed to their end.
    listed: Vec<u32>,
    /// The shards read from, whose leaderships must confirm the page.
    read_from: Vec<(u32, Engine)>,
}

impl NodeState {
    /// Runs one request of a replicated node on the shards it concerns.
    pub(crate) async fn handle_sharded(
        &self,
        shards: &ShardSet,
        request: Request,
        budget: usize,
    ) -> Finished {
        if let Request::WriteDirect {
            entry_type,
            indexes,
            ..
        } = &request
            && !indexes.is_empty()
        {
            shards.declare_indexes(entry_type, indexes)?;
        }
        if let Some(key) = request.routing_key() {
            let engine = serving_for(shards, key)?;
            return self.handle_on(&engine, request, budget).await;
        }
        // Watched from before the serving shards are listed, so no change is missed.
        let changed = shards.changes().next();
        let mut led = shards.serving().to_vec();
        // The shard that takes keyless writes now comes first: calls by query look there
        // first, where the newest entries are.
        if !led.is_empty() {
            let turn = self.keyless_written.load(Ordering::Relaxed) / KEYLESS_RUN;
            let len = led.len();
            led.rotate_left(turn % len);
        }
        // The engine at `i` of `serving` changed the space for this request.
        let used_at = |i: usize| {
            if let Some((shard, engine)) = led.get(i) {
                note_used(*shard, engine);
            }
        };
        let serving: Vec<Engine> = led.iter().map(|(_, e)| e.clone()).collect();
        let answer = match request {
            // Its indexes were declared on every led shard above.
            Request::WriteDirect {
                entry_type,
                entries,
                lease,
                labels,
                ..
            } => {
                self.check_labels(&labels)?;
                // Keyed entries go to their shard, keyless ones to the shard whose turn
                // it is (the first of `serving`).
                let keyless = if entries.iter().any(|(_, k)| k.is_none()) {
                    // The first led shard that has its quorum (one without could not
                    // commit them). A node that leads none (restarted, its shards led
                    // elsewhere until they move back) did nothing: another node takes
                    // the write.
                    let mut refusal = None;
                    let mut chosen = None;
                    for (i, (shard, _)) in led.iter().enumerate() {
                        match shards.check_quorum(*shard) {
                            Ok(()) => {
                                chosen = Some(i);
                                break;
                            }
                            Err(e) => refusal = Some(e),
                        }
                    }
                    let Some(i) = chosen else {
                        return Err(refusal.unwrap_or_else(|| SpaceError::WrongNode {
                            epoch: shards.epoch(),
                            owner: None,
                        }));
                    };
                    let (count, bytes) = entries
                        .iter()
                        .filter(|(_, key)| key.is_none())
                        .fold((0, 0), |(n, b), (f, _)| (n + 1, b + f.approx_size()));
                    self.keyless_written
                        .fetch_add(keyless_weight(count, bytes), Ordering::Relaxed);
                    used_at(i);
                    Some(serving[i].clone())
                } else {
                    None
                };
                let mut groups: Vec<(Engine, Vec<(usize, NewEntry)>)> = Vec::new();
                for (i, entry) in entries.into_iter().enumerate() {
                    let engine = match &entry.1 {
                        Some(key) => serving_for(shards, key)?,
                        None => keyless.clone().ok_or_else(|| SpaceError::Unavailable {
                            reason: "no shard for a keyless entry".into(),
                        })?,
                    };
                    match groups.iter_mut().find(|(e, _)| e.same_as(&engine)) {
                        Some((_, batch)) => batch.push((i, entry)),
                        None => groups.push((engine, vec![(i, entry)])),
                    }
                }
                let mut receipts = Vec::new();
                for (engine, batch) in groups {
                    let (positions, batch): (Vec<usize>, Vec<NewEntry>) = batch.into_iter().unzip();
                    let written = engine.write_all(&entry_type, &[], batch, lease)?;
                    receipts.extend(positions.into_iter().zip(written));
                }
                receipts.sort_by_key(|(i, _)| *i);
                Response::Receipts(receipts.into_iter().map(|(_, r)| r).collect())
            }
            Request::ReadDirect {
                target: Target::Query(q),
                timeout,
            } => {
                let found =
                    until_changed(shards, changed, read_across(&serving, &q, timeout)).await?;
                match found {
                    Some((i, document)) => {
                        used_at(i);
                        Response::Document(Some(document))
                    }
                    None => {
                        // "Nothing matches" is a read of every shard searched: each
                        // confirms it like a match (a leader cut off from its replicas
                        // must not deny a write a newer leader acknowledged). Those that
                        // do are named; the client asks the others' leaders of the
                        // moment, and again while a shard had none.
                        Response::NoneInShards {
                            searched: shards.confirmed(&led).await,
                            of: shards.shard_count(),
                        }
                    }
                }
            }
            Request::TakeDirect {
                target: Target::Query(q),
                max,
                timeout,
            } => {
                let taken = until_changed(
                    shards,
                    changed,
                    take_across(&serving, &q, max.max(1) as usize, budget, timeout),
                )
                .await?;
                return Ok(Outcome::Taken(
                    taken
                        .map(|(i, t)| {
                            used_at(i);
                            t
                        })
                        .unwrap_or_default(),
                ));
            }
            Request::Claim {
                query,
                lease,
                timeout,
            } => Response::Claimed(
                until_changed(
                    shards,
                    changed,
                    claim_across(&serving, &query, lease, timeout),
                )
                .await?
                .map(|(i, c)| {
                    used_at(i);
                    c
                }),
            ),
            Request::Count(q) => {
                let counted = led.clone();
                let counts = self
                    .scan_apart(move || {
                        counted
                            .iter()
                            .map(|(shard, engine)| Ok((*shard, engine.count(&q)?)))
                            .collect::<Result<Vec<_>, SpaceError>>()
                    })
                    .await??;
                // A count is a read: a shard's count is given only once its leadership
                // confirms it (see `ShardSet::confirm_read`); the others are left to
                // their leaders of the moment, which the client asks too.
                let confirmed = shards.confirmed(&led).await;
                Response::ShardCounts {
                    counts: counts
                        .into_iter()
                        .filter(|(shard, _)| confirmed.contains(shard))
                        .collect(),
                    of: shards.shard_count(),
                }
            }
            Request::Contents {
                query,
                after,
                limit,
            } => {
                // Shard by shard in shard order. The cursor holds the shard in its top
                // 16 bits and the position within the shard below.
                let limit = limit.clamp(1, 10_000) as usize;
                let (start, mut from) = match after {
                    Some(c) => ((c >> SHARD_SHIFT) as u32, Some(c & POSITION)),
                    None => (0, None),
                };
                let serving = shards.serving();
                let page = self
                    .scan_apart(move || -> Result<ShardedPage, SpaceError> {
                        let mut page = ShardedPage::default();
                        // Bytes of the page so far: the shards share one budget.
                        let mut bytes = 0usize;
                        for (shard, engine) in serving.iter().cloned() {
                            if shard < start {
                                continue;
                            }
                            if shard > start {
                                from = None;
                            }
                            let room = budget.saturating_sub(bytes);
                            let (found, more) = engine.contents_page_within(
                                &query,
                                from,
                                limit - page.documents.len(),
                                room,
                            )?;
                            let found_bytes: usize =
                                found.iter().map(|d| d.fields.approx_size()).sum();
                            if !page.documents.is_empty() && found_bytes > room {
                                // The shard's first entry alone passes what is left of the
                                // budget (a page's first entry goes whatever its size): it
                                // starts the next page.
                                page.next =
                                    Some(u64::from(shard) << SHARD_SHIFT | from.unwrap_or(0));
                                break;
                            }
                            bytes += found_bytes;
                            page.read_from.push((shard, engine));
                            page.documents.extend(found);
                            if let Some(more) = more {
                                page.next = Some(u64::from(shard) << SHARD_SHIFT | more);
                                break;
                            }
                            page.listed.push(shard);
                            if page.documents.len() >= limit {
                                page.next = Some(u64::from(shard + 1) << SHARD_SHIFT);
                                break;
                            }
                        }
                        Ok(page)
                    })
                    .await??;
                // A page is a read: given once the shards it read confirm it (see
                // `ShardSet::confirm_read`), or not at all (the listing fails, and may be
                // asked again).
                shards.confirm_read(&page.read_from).await?;
                Response::Page {
                    documents: page.documents,
                    next: page.next,
                    listed: page.listed,
                    of: shards.shard_count(),
                }
            }
            Request::FindFor(key) => {
                let topology = shards.topology();
                match topology.owner_of(&key) {
                    Some(node) => Response::Node(node.clone()),
                    None => {
                        return Err(SpaceError::Unavailable {
                            reason: "no leader is known for this key's shard".into(),
                        });
                    }
                }
            }
            Request::Topology => Response::Topology(self.members.labelled(shards.topology())),
            Request::FindPlaceFor { key, size, labels } => {
                // The key's shard's leader, or (keyless) one of the nodes leading a shard.
                let topology = shards.topology();
                let owner = key.map(|k| topology.owner_of_range(range_of(&k)).unwrap_or(0));
                let mut leaders: Vec<usize> = topology.owners.iter().map(|&o| o as usize).collect();
                leaders.sort_unstable();
                leaders.dedup();
                Response::Node(
                    self.members
                        .place(owner, &leaders, size, &labels, self.status())?,
                )
            }
            Request::Shards => Response::Shards(shards.shard_infos()),
            Request::MetaGroup => Response::MetaGroup(Some(shards.meta_group())),
            Request::Schema(entry_type) => {
                // What the shards led here learned; the first kind seen wins.
                let mut fields = std::collections::BTreeMap::new();
                for engine in &serving {
                    for (name, kind) in engine.schema(&entry_type) {
                        fields.entry(name).or_insert(kind);
                    }
                }
                Response::Schema(fields.into_iter().collect())
            }
            Request::Stats => {
                let mut total = Stats {
                    connections: self.connections() as u64,
                    operations: self.operations(),
                    ..Stats::default()
                };
                for engine in &serving {
                    total.add(&engine.stats());
                }
                Response::Stats(total)
            }
            Request::Revoke(id) => {
                // A wait still running here stops (what it was handed goes back). What
                // the request took or claimed, here or on an earlier leader, is given back
                // from each shard's answers by its leader of the moment: this node covers
                // the shards it leads, once the give-back is committed.
                self.stop_request(id).await;
                let mut covered = Vec::new();
                for (shard, engine) in &led {
                    engine.give_back(id);
                    if engine.flush().await.is_ok() {
                        covered.push(*shard);
                    }
                }
                Response::Revoked {
                    shards: covered,
                    of: shards.shard_count(),
                }
            }
            // Subscriptions of a replicated cluster are registered in its shards' logs.
            Request::Subscribe { .. }
            | Request::Resume { .. }
            | Request::Poll { .. }
            | Request::RenewSubscription { .. }
            | Request::CancelSubscription(_) => {
                return Err(SpaceError::Protocol {
                    reason: "this node is part of a replicated cluster: a subscription is registered in its shards' logs (SubscribeShards), by a client of this version".into(),
                });
            }
            Request::SubscribeShards {
                id,
                query,
                kinds,
                lease,
                endpoint,
                attachment,
                shards: asked,
            } => {
                let after: std::collections::HashMap<u32, u64> = asked.iter().copied().collect();
                let asked = asked_shards(shards, asked.into_iter().map(|(s, _)| s).collect())?;
                // An endpoint this node cannot reach is refused before anything is logged.
                if let Some(endpoint) = endpoint {
                    let link = self.pushers.link_for(endpoint);
                    let reached = self.pushers.reach(&link).await;
                    self.pushers.unlink(&link);
                    reached?;
                }
                let attachment = crate::replica::notify_attachment(endpoint.as_ref(), attachment);
                let max = self.pushers.config().max_per_endpoint;
                on_led_shards(&led, &asked, |shard, engine| {
                    let after = after.get(&shard).copied().unwrap_or(0);
                    if let Some(endpoint) = &endpoint
                        && !engine.holds_logged(query.entry_type(), id)
                    {
                        crate::replica::check_room(engine, endpoint, max)?;
                    }
                    let registered = engine.subscribe_logged(
                        id,
                        &query,
                        kinds,
                        lease,
                        attachment.clone(),
                        after,
                    )?;
                    Ok(match registered {
                        Registered::Added => OnShard::Added,
                        Registered::Attached => OnShard::Proposed,
                        // Registered by an earlier try.
                        Registered::Unchanged => OnShard::Done,
                    })
                })
                .await?
            }
            Request::RenewShards {
                id,
                entry_type,
                lease,
                shards: asked,
            } => {
                let asked = asked_shards(shards, asked)?;
                on_led_shards(&led, &asked, |_, engine| {
                    let renewed = engine.renew_logged(&entry_type, &[id], lease)?;
                    // Not held: the shard lost it (its lease ran out).
                    Ok(if renewed.is_empty() {
                        OnShard::Missing
                    } else {
                        OnShard::Proposed
                    })
                })
                .await?
            }
            Request::PollShards {
                id,
                entry_type,
                positions,
                wait,
            } => {
                check_named(shards, positions.iter().map(|(s, _)| *s))?;
                crate::replica::poll_shards(shards, id, &entry_type, positions, wait).await
            }
            Request::CancelShards {
                id,
                entry_type,
                shards: asked,
            } => {
                let asked = asked_shards(shards, asked)?;
                on_led_shards(&led, &asked, |_, engine| {
                    let ended = engine.unsubscribe_logged(&entry_type, id)?;
                    Ok(if ended {
                        OnShard::Proposed
                    } else {
                        OnShard::Done
                    })
                })
                .await?
            }
            // The rest concerns the node, not a shard.
            other => return self.handle_on(&self.engine, other, budget).await,
        };
        Ok(Outcome::Answer(answer))
    }
}

/// The shards a subscription request names, checked: no more than the cluster has, each
/// one of its shards.
///
/// # Errors
/// [`SpaceError::Protocol`] for a shard the cluster does not have.
fn asked_shards(shards: &ShardSet, asked: Vec<u32>) -> Result<Vec<u32>, SpaceError> {
    check_named(shards, asked.iter().copied())?;
    let mut asked = asked;
    asked.sort_unstable();
    asked.dedup();
    Ok(asked)
}

/// Checks the shards a subscription request names, before anything walks them: no more
/// than the cluster has (a shard named twice is named in vain), each one of its shards.
///
/// # Errors
/// [`SpaceError::Protocol`] otherwise.
fn check_named(
    shards: &ShardSet,
    named: impl ExactSizeIterator<Item = u32>,
) -> Result<(), SpaceError> {
    let count = shards.shard_count();
    if named.len() > count as usize {
        return Err(SpaceError::Protocol {
            reason: format!(
                "the request names {} shards; the cluster has {count}",
                named.len()
            ),
        });
    }
    let mut named = named;
    if let Some(bad) = named.find(|s| *s >= count) {
        return Err(SpaceError::Protocol {
            reason: format!("the cluster has {count} shards; there is no shard {bad}"),
        });
    }
    Ok(())
}

/// What a subscription request did on one shard.
enum OnShard {
    /// A command was proposed: done once it commits.
    Proposed,
    /// A subscription was registered anew: done once it commits.
    Added,
    /// Nothing needed doing.
    Done,
    /// It could not be done: the shard does not hold the subscription.
    Missing,
}

/// Does `act` on the serving engine of each shard of `asked` this node leads (`led`),
/// then waits for what it proposed to commit: the shards led, and those where it was
/// done (committed).
///
/// # Errors
/// The first error `act` gives (a bad query, an unusable lease, `Busy`).
async fn on_led_shards(
    led: &[(u32, Engine)],
    asked: &[u32],
    act: impl Fn(u32, &Engine) -> Result<OnShard, SpaceError>,
) -> Result<Response, SpaceError> {
    let mut proposed = Vec::new();
    let mut led_asked = Vec::new();
    let mut done = Vec::new();
    let mut anew = Vec::new();
    let mut missing = Vec::new();
    for (shard, engine) in led {
        if asked.binary_search(shard).is_err() {
            continue;
        }
        led_asked.push(*shard);
        match act(*shard, engine)? {
            OnShard::Proposed => proposed.push((*shard, engine, false)),
            OnShard::Added => proposed.push((*shard, engine, true)),
            OnShard::Done => done.push(*shard),
            OnShard::Missing => missing.push(*shard),
        }
    }
    for (shard, engine, added) in proposed {
        if engine.flush().await.is_ok() {
            done.push(shard);
            if added {
                anew.push(shard);
            }
        }
    }
    led_asked.sort_unstable();
    done.sort_unstable();
    Ok(Response::OnShards {
        led: led_asked,
        done,
        anew,
        missing,
    })
}

/// Runs `call`, a wait across the shards this node served when it began, unless the
/// shards served here change first (`changed` resolves): a shard whose leader stepped
/// down can no longer answer, and one this node now leads is not waited on. The call is
/// then dropped, which gives back anything it was handed, and fails with
/// [`SpaceError::WrongNode`] (nothing done) so that its caller asks again.
async fn until_changed<T>(
    shards: &ShardSet,
    changed: impl Future<Output = ()>,
    call: impl Future<Output = Result<T, SpaceError>>,
) -> Result<T, SpaceError> {
    tokio::select! {
        biased;
        answer = call => answer,
        () = changed => Err(SpaceError::WrongNode {
            epoch: shards.epoch(),
            owner: None,
        }),
    }
}
