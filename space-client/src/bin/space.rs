//! `space`: the command-line tool for a space node.
//!
//! ```text
//! space write Order '{"id": "o-1", "status": "ReadyToShip", "amount": 150}'
//! space read Order 'status:ReadyToShip AND amount:>100'
//! space take Order 'status:ReadyToShip' --timeout 5s
//! space claim Order 'status:New' --lease 1m
//! space commit Order o-1 42
//! echo '{"id": "o-2"}' | space write Order - --key-field id
//! space count Order
//! space contents Order --limit 10
//! space watch Order 'amount:>100' --kinds written,taken
//! space stats
//! space topology
//! ```
//!
//! `--node HOST:PORT` (default 127.0.0.1:7700, or `SPACE_NODE`), `--token` (or
//! `SPACE_AUTH_TOKEN`), and `--json` for machine-readable output: one JSON value per line,
//! errors included (`{"error": {"message": ..., "detail": ...}}`). Durations are written
//! `500ms`, `5s`, `1m`, `2h` (or `forever` where it means something).
//!
//! Exit codes: 0 when the command did what it was asked (a read, take, claim or listing
//! found something), 1 when it found nothing, 2 on an error (bad input, or what the node
//! said).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::json;
use space_client::wire::{MetaGroupInfo, Request, Response, ShardInfo, Target, Topology};
use space_client::{
    ClientConfig, Cluster, EventKind, EventKinds, Key, Lease, NodeId, Notification, Query,
    QueryError,
};
use space_query::Fields;

#[derive(Parser)]
#[command(
    version,
    about = "Talks to a space node: write, read, take, claim, commit, release, renew, cancel, count, contents, types, watch, stats, topology, ping.",
    after_help = "Exit codes: 0 done (found), 1 nothing found, 2 error."
)]
struct Cli {
    /// The node to talk to, or a cluster's nodes separated by commas (the first that
    /// answers is asked for the topology).
    #[arg(
        long,
        env = "SPACE_NODE",
        default_value = "127.0.0.1:7700",
        global = true
    )]
    node: String,
    /// The node's auth token (or SPACE_AUTH_TOKEN; its value is never printed).
    #[arg(long, env = "SPACE_AUTH_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Print JSON (one value per line) instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write an entry given as a JSON object, or `-`: one entry per line of stdin (JSON
    /// lines), written in batches of up to 256 entries and 4 MiB (each batch all or
    /// nothing).
    Write {
        /// The entry type.
        entry_type: String,
        /// The entry, a JSON object; `-` reads JSON lines from stdin.
        entry: String,
        /// A user key (default: the node mints a UUID v7). One entry only.
        #[arg(long, conflicts_with = "key_field")]
        key: Option<String>,
        /// The entry type's key field: each entry's key is the value of this field.
        #[arg(long)]
        key_field: Option<String>,
        /// How long the entry lives: `30s`, `5m`, ... or `forever`.
        #[arg(long, value_parser = parse_duration, default_value = "forever")]
        lease: Duration,
    },
    /// Read a copy of the oldest matching entry.
    Read {
        /// The entry type.
        entry_type: String,
        /// The query (text syntax); empty or `*` for any entry of the type.
        #[arg(default_value = "*")]
        query: String,
        /// How long to wait for a match: `0s` (default), `500ms`, `5s`, ... or `forever`.
        #[arg(long, value_parser = parse_duration, default_value = "0s")]
        timeout: Duration,
        /// The entry with this key instead of a match of the query (no wait).
        #[arg(long, conflicts_with_all = ["query", "timeout"])]
        key: Option<String>,
    },
    /// Take (remove) the oldest matching entries.
    Take {
        /// The entry type.
        entry_type: String,
        /// The query (text syntax).
        #[arg(default_value = "*")]
        query: String,
        /// How long to wait for a match: `0s` (default), `500ms`, `5s`, ... or `forever`.
        #[arg(long, value_parser = parse_duration, default_value = "0s")]
        timeout: Duration,
        /// Take up to this many.
        #[arg(long, default_value_t = 1)]
        max: u32,
        /// The entry with this key instead of matches of the query (no wait).
        #[arg(long, conflicts_with_all = ["query", "timeout", "max"])]
        key: Option<String>,
    },
    /// Claim the oldest matching entry for a while (a leased take); prints it with the
    /// claim's token, for `commit`, `release` or `renew --claim`.
    Claim {
        /// The entry type.
        entry_type: String,
        /// The query (text syntax).
        #[arg(default_value = "")]
        query: String,
        /// The claim's lease: `30s` (default), `5m`, ...
        #[arg(long, value_parser = parse_duration, default_value = "30s")]
        lease: Duration,
        /// How long to wait for a match: `0s` (default), `500ms`, `5s`, ... or `forever`.
        #[arg(long, value_parser = parse_duration, default_value = "0s")]
        timeout: Duration,
    },
    /// Remove a claimed entry for good.
    Commit {
        /// The entry type.
        entry_type: String,
        /// The entry's key.
        key: String,
        /// The claim's token, as `claim` printed it.
        claim_token: u64,
    },
    /// Put a claimed entry back.
    Release {
        /// The entry type.
        entry_type: String,
        /// The entry's key.
        key: String,
        /// The claim's token, as `claim` printed it.
        claim_token: u64,
    },
    /// Extend an entry's lease from now, or a claim's with `--claim`.
    Renew {
        /// The entry type.
        entry_type: String,
        /// The entry's key.
        key: String,
        /// The new lease from now: `30s`, `5m`, ... or `forever` (an entry's only).
        #[arg(long, value_parser = parse_duration)]
        lease: Duration,
        /// Renew the claim with this token (as `claim` printed it) instead of the
        /// entry's lease.
        #[arg(long, value_name = "CLAIM_TOKEN")]
        claim: Option<u64>,
    },
    /// Remove an entry by key at once (an `expired` event).
    Cancel {
        /// The entry type.
        entry_type: String,
        /// The entry's key.
        key: String,
    },
    /// List matching entries, oldest first (fetched from the nodes page by page).
    Contents {
        /// The entry type.
        entry_type: String,
        /// The query (text syntax).
        #[arg(default_value = "")]
        query: String,
        /// Print at most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Count matching entries.
    Count {
        /// The entry type.
        entry_type: String,
        /// The query (text syntax).
        #[arg(default_value = "*")]
        query: String,
    },
    /// Print every later change of matching entries, one line each, until interrupted;
    /// exits with an error (code 2) when the node goes away.
    Watch {
        /// The entry type.
        entry_type: String,
        /// The query (text syntax).
        #[arg(default_value = "*")]
        query: String,
        /// Kinds to report: written, taken, claimed, released, expired (comma separated).
        #[arg(long, value_delimiter = ',', default_value = "written")]
        kinds: Vec<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Pick up subscription ID of a standalone node (as a watch stopped with Ctrl-C
        /// printed it) instead of subscribing anew: its events after `--after` are
        /// delivered (or a gap for those the node no longer holds). The node keeps a
        /// stopped watch's subscription for its subscriber timeout (30 s by default).
        #[arg(long, value_name = "ID", conflicts_with = "resume_at")]
        resume: Option<u64>,
        /// With `--resume`: the last sequence number already seen.
        #[arg(long, value_name = "SEQ", default_value = "0", requires = "resume")]
        after: u64,
        /// Pick up a subscription of a replicated cluster where POSITION says it stood
        /// (the JSON a watch stopped with Ctrl-C printed: its last number on each shard)
        /// instead of subscribing anew. The shards keep a stopped watch's subscription
        /// for its lease (30 s by default).
        #[arg(long, value_name = "POSITION")]
        resume_at: Option<String>,
    },
    /// Entry types that hold entries, with their counts and bytes.
    Types,
    /// The node's counters (of the whole cluster when it has several nodes).
    Stats {
        /// Print them again at this interval (`1s`, `500ms`...) until interrupted, with
        /// the entries and operations per second since the last print.
        #[arg(long, value_parser = parse_duration, value_name = "EVERY", num_args = 0..=1, default_missing_value = "1s")]
        watch: Option<Duration>,
        /// With `--watch`: stop after this many prints.
        #[arg(long, requires = "watch")]
        count: Option<u64>,
    },
    /// Which node owns which ranges.
    Topology,
    /// Whether the node answers, and how fast.
    Ping,
}

impl Command {
    /// Whether Ctrl-C is how the command ends (a watch), rather than an interruption.
    fn ends_on_ctrl_c(&self) -> bool {
        matches!(
            self,
            Command::Watch { .. } | Command::Stats { watch: Some(_), .. }
        )
    }
}

/// A duration as `500ms`, `5s`, `1m`, `2h` ([`humantime`]'s syntax), or `forever`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.trim().eq_ignore_ascii_case("forever") {
        return Ok(Duration::MAX);
    }
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration such as 500ms, 5s or 1m ({e})"))
}

/// Prints one notification of a watch: a line of JSON, or of text.
fn print_notification(n: &Notification, as_json: bool) {
    match n {
        Notification::Event(e) if as_json => println!(
            "{}",
            json!({"seq": e.seq, "shard": e.shard, "node": e.node.0, "entry_type": &*e.entry_type, "key": e.key.to_string(), "kind": format!("{:?}", e.kind), "version": e.version})
        ),
        Notification::Event(e) => match e.shard {
            Some(shard) => println!(
                "#{} of shard {shard} {:?} {} {} on {}",
                e.seq, e.kind, e.entry_type, e.key, e.node
            ),
            None => println!(
                "#{} {:?} {} {} on {}",
                e.seq, e.kind, e.entry_type, e.key, e.node
            ),
        },
        Notification::Gap {
            first_seq,
            last_seq,
        } if as_json => println!(
            "{}",
            json!({"gap": {"first_seq": first_seq, "last_seq": last_seq}})
        ),
        Notification::Gap {
            first_seq,
            last_seq,
        } => println!("gap: events #{first_seq}..#{last_seq} were dropped"),
        Notification::Missed { seq } if as_json => {
            println!("{}", json!({"missed": {"seq": seq}}));
        }
        Notification::Missed { .. } => {
            println!("gap: events may have been missed here (how many is not known)");
        }
    }
}

/// Ctrl-C, listened for from the moment [`CtrlC::listen`] returns until the program ends.
///
/// One pressed while the command is busy elsewhere (printing, or asking the node whether
/// it is there) is kept for [`CtrlC::pressed`]. A `tokio::signal::ctrl_c()` made afresh
/// for each wait would miss it, and, its handler having replaced the default, the program
/// would go on running.
struct CtrlC {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
    #[cfg(windows)]
    signal: tokio::signal::windows::CtrlC,
}

impl CtrlC {
    /// Starts listening for Ctrl-C (SIGINT on Unix).
    fn listen() -> Result<Self> {
        #[cfg(unix)]
        let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
        #[cfg(windows)]
        let signal = tokio::signal::windows::ctrl_c();
        Ok(CtrlC {
            signal: signal.context("listening for Ctrl-C")?,
        })
    }

    /// Waits for a Ctrl-C pressed since [`CtrlC::listen`] or the last call. Cancel-safe.
    async fn pressed(&mut self) {
        // `None` only once the runtime shuts down: then no Ctrl-C can come.
        if self.signal.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
    }
}

/// What a command found, for its exit code.
enum Found {
    /// It did what it was asked (exit code 0).
    Done,
    /// A read or take found nothing (exit code 1).
    Nothing,
}

fn parse_query(entry_type: &str, text: &str) -> Result<Query> {
    Query::parse(entry_type, text).map_err(|e| match &e {
        QueryError::Syntax { position, .. } => {
            anyhow::anyhow!("{e}\n  {text}\n  {}^", " ".repeat(*position))
        }
        _ => anyhow::anyhow!("{e}"),
    })
}

fn parse_kind(s: &str) -> Result<EventKind> {
    Ok(match s.trim().to_ascii_lowercase().as_str() {
        "written" => EventKind::Written,
        "taken" => EventKind::Taken,
        "claimed" => EventKind::Claimed,
        "released" => EventKind::Released,
        "expired" => EventKind::Expired,
        "all" => bail!("use the kinds by name, or list all five"),
        other => {
            bail!("unknown event kind {other:?}: use written, taken, claimed, released or expired")
        }
    })
}

fn document_json(doc: &space_client::wire::Document) -> serde_json::Value {
    json!({"key": doc.key.to_string(), "version": doc.version, "fields": doc.fields})
}

fn print_documents(docs: &[space_client::wire::Document], as_json: bool) -> Result<()> {
    for d in docs {
        if as_json {
            println!("{}", document_json(d));
        } else {
            println!(
                "{} (v{}) {}",
                d.key,
                d.version,
                serde_json::to_string(&d.fields)?
            );
        }
    }
    if docs.is_empty() && !as_json {
        println!("(nothing)");
    }
    Ok(())
}

/// The node ids of `nodes` as text: `1,2,3`.
fn ids(nodes: &[NodeId]) -> String {
    nodes
        .iter()
        .map(|n| n.0.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The meta group as one line: `meta group: leader 1, term 2, voters 1,2,3, learners 4,
/// layout version 1`.
fn meta_line(m: &MetaGroupInfo) -> String {
    let leader = m
        .leader
        .map_or_else(|| "unknown".to_owned(), |n| n.0.to_string());
    let layout = match m.layout_version {
        0 => "no layout applied yet".to_owned(),
        v => format!("layout version {v} ({:016x})", m.layout_fingerprint),
    };
    let learners = if m.learners.is_empty() {
        String::new()
    } else {
        format!(", learners {}", ids(&m.learners))
    };
    format!(
        "meta group: leader {leader}, term {}, voters {}{learners}, {layout}",
        m.term,
        ids(&m.voters)
    )
}

fn print_topology(t: &Topology, shards: &[ShardInfo], meta: Option<&MetaGroupInfo>, as_json: bool) {
    // Ranges as runs: first..=last owned by one node.
    let mut runs: Vec<(usize, usize, u32)> = Vec::new();
    for (range, &owner) in t.owners.iter().enumerate() {
        match runs.last_mut() {
            Some((_, last, o)) if *o == owner && *last + 1 == range => *last = range,
            _ => runs.push((range, range, owner)),
        }
    }
    if as_json {
        let nodes: Vec<_> = t
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let ranges: Vec<_> = runs.iter().filter(|r| r.2 as usize == i).map(|r| json!([r.0, r.1])).collect();
                json!({"node": n.node.0, "address": n.address, "labels": n.labels, "ranges": ranges})
            })
            .collect();
        let shards: Vec<_> = shards
            .iter()
            .map(|s| {
                json!({
                    "shard": s.shard,
                    "ranges": [s.first_range, s.last_range],
                    "replicas": s.replicas.iter().map(|n| n.0).collect::<Vec<_>>(),
                    "leader": s.leader.map(|n| n.0),
                    "term": s.term,
                })
            })
            .collect();
        let meta = meta.map(|m| {
            json!({
                "leader": m.leader.map(|n| n.0),
                "term": m.term,
                "voters": m.voters.iter().map(|n| n.0).collect::<Vec<_>>(),
                "learners": m.learners.iter().map(|n| n.0).collect::<Vec<_>>(),
                "layout_version": m.layout_version,
                "layout_fingerprint": format!("{:016x}", m.layout_fingerprint),
            })
        });
        println!(
            "{}",
            json!({"epoch": t.epoch, "nodes": nodes, "shards": shards, "meta_group": meta})
        );
        return;
    }
    println!("epoch {}", t.epoch);
    if let Some(m) = meta {
        println!("{}", meta_line(m));
    }
    for (i, n) in t.nodes.iter().enumerate() {
        let owned: Vec<String> = runs
            .iter()
            .filter(|r| r.2 as usize == i)
            .map(|r| format!("{}-{}", r.0, r.1))
            .collect();
        let count: usize = runs
            .iter()
            .filter(|r| r.2 as usize == i)
            .map(|r| r.1 - r.0 + 1)
            .sum();
        println!(
            "{} at {}: {count} ranges [{}]",
            n.node,
            n.address,
            owned.join(", ")
        );
    }
    for s in shards {
        let leader = s
            .leader
            .map_or_else(|| "unknown".to_owned(), |n| n.0.to_string());
        println!(
            "shard {}: ranges {}-{}, leader {leader}, term {}, replicas {}",
            s.shard,
            s.first_range,
            s.last_range,
            s.term,
            ids(&s.replicas)
        );
    }
}

async fn run(cli: Cli) -> Result<Found> {
    let config = ClientConfig {
        token: cli.token.clone(),
        retry_for: Duration::from_secs(2),
        ..ClientConfig::default()
    };
    let conn = Cluster::open(&space_client::seeds(&cli.node), config).await?;
    let (done, ctrl_c) = if cli.command.ends_on_ctrl_c() {
        (command(conn.clone(), cli).await, None)
    } else {
        // Ctrl-C gives the call up as a failure would, rather than kill the process: a
        // take whose answer was on its way would keep its entry for good.
        let mut ctrl_c = CtrlC::listen()?;
        let done = tokio::select! {
            done = command(conn.clone(), cli) => done,
            () = ctrl_c.pressed() => Err(Interrupted.into()),
        };
        (done, Some(ctrl_c))
    };
    // A take or claim given up (its node stopped answering, or Ctrl-C) is revoked in the
    // background, which puts back what it took: exiting first would keep those entries
    // taken for good.
    if done.is_err() && conn.giving_back() > 0 {
        eprintln!(
            "giving back what the call may have taken before exiting (until the nodes answer, at most a minute; Ctrl-C again to exit at once)"
        );
    }
    // The nodes may also drop what they kept for a retry now rather than in a minute.
    // A Ctrl-C meanwhile (a second one, after a command it interrupted) exits at once.
    let mut ctrl_c = match ctrl_c {
        Some(ctrl_c) => ctrl_c,
        None => CtrlC::listen()?,
    };
    tokio::select! {
        () = conn.settle() => {}
        () = ctrl_c.pressed() => return Err(Interrupted.into()),
    }
    done
}

/// The command was interrupted with Ctrl-C (exit code 130, as a shell reports SIGINT).
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
struct Interrupted;

/// Runs the command `cli` names on the cluster `conn`.
async fn command(conn: std::sync::Arc<Cluster>, cli: Cli) -> Result<Found> {
    match cli.command {
        Command::Write {
            entry_type,
            entry,
            key,
            key_field,
            lease,
        } => {
            let lease = lease_of(lease);
            let key: Option<Key> = key.map(|k| k.parse().unwrap_or_else(|never| match never {}));
            if entry == "-" {
                if key.is_some() {
                    bail!("--key names one entry's key: with entries from stdin, use --key-field");
                }
                let mut batch = Vec::new();
                let mut batch_bytes = 0;
                for (n, line) in std::io::stdin().lines().enumerate() {
                    let line = line.context("reading stdin")?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let fields: Fields = serde_json::from_str(&line).with_context(|| {
                        format!("line {}: an entry must be a JSON object", n + 1)
                    })?;
                    let key = key_of(&fields, key_field.as_deref())
                        .with_context(|| format!("line {}", n + 1))?;
                    let size = fields.approx_size();
                    if !batch.is_empty()
                        && (batch.len() == WRITE_BATCH || batch_bytes + size > WRITE_BATCH_BYTES)
                    {
                        write(
                            &conn,
                            &entry_type,
                            std::mem::take(&mut batch),
                            lease,
                            cli.json,
                        )
                        .await?;
                        batch_bytes = 0;
                    }
                    batch.push((fields, key));
                    batch_bytes += size;
                }
                if !batch.is_empty() {
                    write(&conn, &entry_type, batch, lease, cli.json).await?;
                }
            } else {
                let fields: Fields =
                    serde_json::from_str(&entry).context("the entry must be a JSON object")?;
                let key = match key {
                    Some(key) => Some(key),
                    None => key_of(&fields, key_field.as_deref())?,
                };
                write(&conn, &entry_type, vec![(fields, key)], lease, cli.json).await?;
            }
        }
        Command::Read {
            entry_type,
            query,
            timeout,
            key,
        } => {
            let target = target_of(entry_type, &query, key)?;
            if let Target::Query(q) = &target {
                note_unseen_fields(&conn, q).await;
            }
            let answer = conn.call(Request::ReadDirect { target, timeout }).await?;
            let Response::Document(doc) = answer else {
                bail!("unexpected answer")
            };
            let docs: Vec<_> = doc.into_iter().collect();
            print_documents(&docs, cli.json)?;
            return Ok(found(&docs));
        }
        Command::Take {
            entry_type,
            query,
            timeout,
            max,
            key,
        } => {
            let target = target_of(entry_type, &query, key)?;
            if let Target::Query(q) = &target {
                note_unseen_fields(&conn, q).await;
            }
            let answer = conn
                .call(Request::TakeDirect {
                    target,
                    max: max.max(1),
                    timeout,
                })
                .await?;
            let Response::Documents(docs) = answer else {
                bail!("unexpected answer")
            };
            print_documents(&docs, cli.json)?;
            return Ok(found(&docs));
        }
        Command::Claim {
            entry_type,
            query,
            lease,
            timeout,
        } => {
            let query = parse_query(&entry_type, &query)?;
            note_unseen_fields(&conn, &query).await;
            let answer = conn
                .call(Request::Claim {
                    query,
                    lease: Lease::For(lease),
                    timeout,
                })
                .await?;
            let Response::Claimed(claimed) = answer else {
                bail!("unexpected answer")
            };
            let Some(c) = claimed else {
                if !cli.json {
                    println!("(nothing)");
                }
                return Ok(Found::Nothing);
            };
            let expires = humantime::format_rfc3339_millis(c.expires);
            if cli.json {
                let mut doc = document_json(&c.document);
                doc["token"] = json!(c.ticket.token);
                doc["claims"] = json!(c.claims);
                doc["expires"] = json!(expires.to_string());
                println!("{doc}");
            } else {
                println!(
                    "{} (v{}) {}\nclaimed with token {} until {expires} (claim #{})",
                    c.document.key,
                    c.document.version,
                    serde_json::to_string(&c.document.fields)?,
                    c.ticket.token,
                    c.claims
                );
            }
        }
        Command::Commit {
            entry_type,
            key,
            claim_token,
        } => {
            let ticket = ticket(entry_type, &key, claim_token);
            conn.call(Request::Commit(ticket)).await?;
            done(cli.json, "committed", &key);
        }
        Command::Release {
            entry_type,
            key,
            claim_token,
        } => {
            let ticket = ticket(entry_type, &key, claim_token);
            conn.call(Request::Release(ticket)).await?;
            done(cli.json, "released", &key);
        }
        Command::Renew {
            entry_type,
            key,
            lease,
            claim,
        } => {
            let request = match claim {
                Some(token) => {
                    if lease == Duration::MAX {
                        bail!("a claim's lease is finite: give one such as 30s");
                    }
                    Request::RenewClaim(ticket(entry_type, &key, token), Lease::For(lease))
                }
                None => Request::Renew {
                    entry_type,
                    key: parse_key(&key),
                    lease: lease_of(lease),
                },
            };
            let expires = match conn.call(request).await? {
                Response::Expires(at) => at,
                other => bail!("unexpected answer: {other:?}"),
            };
            let until = expires.map_or_else(
                || "forever".to_owned(),
                |at| humantime::format_rfc3339_millis(at).to_string(),
            );
            if cli.json {
                println!("{}", json!({"renewed": key, "expires": until}));
            } else {
                println!("renewed {key} until {until}");
            }
        }
        Command::Cancel { entry_type, key } => {
            conn.call(Request::Cancel {
                entry_type,
                key: parse_key(&key),
            })
            .await?;
            done(cli.json, "cancelled", &key);
        }
        Command::Contents {
            entry_type,
            query,
            limit,
        } => {
            let query = parse_query(&entry_type, &query)?;
            note_unseen_fields(&conn, &query).await;
            // The client lists every node page by page and answers with the whole list.
            let Response::Page {
                documents: mut docs,
                ..
            } = conn
                .call(Request::Contents {
                    query,
                    after: None,
                    limit: u32::MAX,
                })
                .await?
            else {
                bail!("unexpected answer")
            };
            if let Some(limit) = limit {
                docs.truncate(limit);
            }
            print_documents(&docs, cli.json)?;
            return Ok(found(&docs));
        }
        Command::Count { entry_type, query } => {
            let query = parse_query(&entry_type, &query)?;
            note_unseen_fields(&conn, &query).await;
            let Response::Count(n) = conn.call(Request::Count(query)).await? else {
                bail!("unexpected answer")
            };
            if cli.json {
                println!("{}", json!({"count": n}));
            } else {
                println!("{n}");
            }
        }
        Command::Watch {
            entry_type,
            query,
            kinds,
            count,
            resume,
            after,
            resume_at,
        } => {
            let query = parse_query(&entry_type, &query)?;
            note_unseen_fields(&conn, &query).await;
            let kinds = kinds
                .iter()
                .map(|k| parse_kind(k))
                .collect::<Result<Vec<_>>>()?;
            let sub = match (resume, resume_at) {
                (Some(id), _) => conn.resume(id, after).await?,
                (None, Some(position)) => {
                    let position: space_client::SubscriptionPosition =
                        serde_json::from_str(&position).context(
                            "--resume-at takes the position a watch stopped with Ctrl-C printed",
                        )?;
                    conn.resume_at(position).await?
                }
                (None, None) => {
                    conn.subscribe(query, EventKinds::of(&kinds), Lease::Forever)
                        .await?
                }
            };
            let id = sub.id();
            // A replicated cluster's subscription is numbered per shard: it is picked up
            // from its position.
            let replicated = conn.topology().shards > 0;
            // Listening before the line that invites Ctrl-C, so that none is missed.
            let mut ctrl_c = CtrlC::listen()?;
            if replicated {
                eprintln!(
                    "watching as subscription {id}: Ctrl-C prints the position --resume-at picks it up from"
                );
            } else {
                eprintln!(
                    "watching as subscription {id}: after Ctrl-C, --resume {id} --after <the last seq seen> picks it up"
                );
            }
            // The node is asked every two seconds whether it is there: one that went away
            // ends the watch with an error, rather than a wait in silence for events that
            // cannot come.
            let mut look = tokio::time::interval(Duration::from_secs(2));
            let watching = async {
                let mut seen = 0;
                while count.is_none_or(|c| seen < c) {
                    let next = tokio::select! {
                        n = sub.recv_async() => n,
                        _ = look.tick() => {
                            if let Err(e) = conn.call(Request::NodeStatus).await
                                && e.is_unreachable()
                            {
                                bail!("the node {} went away: {e}", cli.node);
                            }
                            continue;
                        }
                    };
                    let Some(n) = next else {
                        bail!("the subscription ended");
                    };
                    seen += 1;
                    print_notification(&n, cli.json);
                }
                Ok(())
            };
            // Ctrl-C ends the watch whatever it was doing, and leaves the subscription on
            // the node for a resume rather than cancel it.
            let interrupted = tokio::select! {
                done = watching => {
                    done?;
                    false
                }
                () = ctrl_c.pressed() => true,
            };
            if interrupted && replicated {
                let position = serde_json::to_string(&sub.detach_at())?;
                eprintln!("stopped: --resume-at '{position}' picks it up");
            } else if interrupted {
                sub.detach();
            }
        }
        Command::Types => {
            let Response::Stats(s) = conn.call(Request::Stats).await? else {
                bail!("unexpected answer")
            };
            for t in &s.types {
                if cli.json {
                    println!(
                        "{}",
                        json!({"entry_type": t.entry_type, "entries": t.entries, "bytes": t.bytes})
                    );
                } else {
                    println!("{} {} entries, {} bytes", t.entry_type, t.entries, t.bytes);
                }
            }
            if s.types.is_empty() {
                if !cli.json {
                    println!("(nothing)");
                }
                return Ok(Found::Nothing);
            }
        }
        Command::Stats { watch, count } => {
            let Some(every) = watch else {
                let Response::Stats(s) = conn.call(Request::Stats).await? else {
                    bail!("unexpected answer")
                };
                if cli.json {
                    println!("{}", serde_json::to_string(&s)?);
                } else {
                    println!(
                        "entries {}\nbytes {}\nentry types {}\nwaiters {}\nsubscriptions {}\ntimers {}",
                        s.entries, s.bytes, s.entry_types, s.waiters, s.subscriptions, s.timers
                    );
                }
                return Ok(Found::Done);
            };
            if every.is_zero() || every == Duration::MAX {
                bail!("--watch needs an interval such as 1s");
            }
            // A line per interval: the counters, and how the entries moved since the last.
            let mut ticks = tokio::time::interval(every);
            let mut ctrl_c = CtrlC::listen()?;
            let watching = async {
                let mut last: Option<(space_client::Stats, std::time::Instant)> = None;
                let mut printed = 0;
                while count.is_none_or(|c| printed < c) {
                    ticks.tick().await;
                    let Response::Stats(s) = conn.call(Request::Stats).await? else {
                        bail!("unexpected answer")
                    };
                    let now = std::time::Instant::now();
                    // Entries and requests per second since the last print.
                    let (change, ops) = last.as_ref().map_or((0.0, 0.0), |(before, at)| {
                        let secs = now.duration_since(*at).as_secs_f64().max(1e-3);
                        (
                            (s.entries as f64 - before.entries as f64) / secs,
                            s.operations.saturating_sub(before.operations) as f64 / secs,
                        )
                    });
                    if cli.json {
                        println!(
                            "{}",
                            json!({"entries": s.entries, "bytes": s.bytes, "entry_types": s.entry_types, "waiters": s.waiters, "subscriptions": s.subscriptions, "subscriber_lag": s.subscriber_lag, "connections": s.connections, "entries_per_s": change.round(), "operations_per_s": ops.round(), "unreachable": s.unreachable})
                        );
                    } else {
                        println!(
                            "{} entries ({:+.0}/s), {:.0} ops/s, {} bytes, {} types, {} waiters, {} subscriptions (lag {}), {} connections{}",
                            s.entries,
                            change,
                            ops,
                            s.bytes,
                            s.entry_types,
                            s.waiters,
                            s.subscriptions,
                            s.subscriber_lag,
                            s.connections,
                            if s.unreachable.is_empty() {
                                String::new()
                            } else {
                                format!(", unreachable: {}", s.unreachable.join(", "))
                            }
                        );
                    }
                    printed += 1;
                    last = Some((s, now));
                }
                Ok(())
            };
            tokio::select! {
                done = watching => done?,
                () = ctrl_c.pressed() => {}
            }
        }
        Command::Topology => {
            let Response::Topology(t) = conn.call(Request::Topology).await? else {
                bail!("unexpected answer")
            };
            // A replicated cluster's shards, as the node asked sees them.
            let Response::Shards(shards) = conn.call(Request::Shards).await? else {
                bail!("unexpected answer")
            };
            let Response::MetaGroup(meta) = conn.call(Request::MetaGroup).await? else {
                bail!("unexpected answer")
            };
            print_topology(&t, &shards, meta.as_ref(), cli.json);
        }
        Command::Ping => {
            let started = std::time::Instant::now();
            let Response::NodeStatus(status) = conn.call(Request::NodeStatus).await? else {
                bail!("unexpected answer")
            };
            let round_trip = started.elapsed().as_secs_f64() * 1e3;
            if cli.json {
                println!(
                    "{}",
                    json!({"node": status.info.node.0, "address": status.info.address, "round_trip_ms": round_trip})
                );
            } else {
                println!(
                    "{} at {} answered in {round_trip:.1} ms",
                    status.info.node, status.info.address
                );
            }
        }
    }
    Ok(Found::Done)
}

/// Says on stderr which fields of `query` no entry of its type ever had (the node's
/// learned schema): a typo there matches nothing, and the node cannot tell a typo from a
/// field no entry has had yet.
async fn note_unseen_fields(conn: &std::sync::Arc<Cluster>, query: &Query) {
    let entry_type = query.entry_type();
    let Ok(Response::Schema(seen)) = conn.call(Request::Schema(entry_type.to_owned())).await else {
        return;
    };
    let mut named = Vec::new();
    let _ = query.filter().visit_leaves(&mut |leaf| {
        if let Some(field) = leaf.field() {
            let top = field.split('.').next().unwrap_or(field);
            if !named.iter().any(|n| n == top) {
                named.push(top.to_owned());
            }
        }
        Ok(())
    });
    if named.is_empty() {
        return;
    }
    if seen.is_empty() {
        eprintln!(
            "note: no entry of type {entry_type:?} was written yet: its fields are not known"
        );
        return;
    }
    let known: Vec<&str> = seen.iter().map(|(name, _)| name.as_str()).collect();
    for field in named {
        if !known.contains(&field.as_str()) {
            eprintln!(
                "note: no entry of type {entry_type:?} has had a field {field:?} (fields seen: {})",
                known.join(", ")
            );
        }
    }
}

/// Entries written per request from stdin, at most.
const WRITE_BATCH: usize = 256;

/// Bytes of entries (`Fields::approx_size`) written per request from stdin, at most
/// (an entry larger than that goes alone): a quarter of the default frame limit, so that
/// a stream of large entries goes in requests a node takes (the estimate is within a
/// factor of two of the encoded size), not in one over the limit.
const WRITE_BATCH_BYTES: usize = space_client::wire::DEFAULT_MAX_FRAME / 4;

/// A lease from a parsed duration (`forever` is `Duration::MAX`).
fn lease_of(d: Duration) -> Lease {
    if d == Duration::MAX {
        Lease::Forever
    } else {
        Lease::For(d)
    }
}

/// A key as typed: a UUID is a minted key, anything else a user key.
fn parse_key(key: &str) -> Key {
    key.parse().unwrap_or_else(|never| match never {})
}

/// The ticket of a claim named on the command line.
fn ticket(entry_type: String, key: &str, token: u64) -> space_client::ClaimTicket {
    space_client::ClaimTicket {
        entry_type,
        key: parse_key(key),
        token,
    }
}

/// An entry's key from its key field, when the type has one.
fn key_of(fields: &Fields, key_field: Option<&str>) -> Result<Option<Key>> {
    let Some(name) = key_field else {
        return Ok(None);
    };
    match fields.get(name) {
        // As the typed client keys them: a string, or an integer's digits.
        Some(space_query::Value::Str(s)) => Ok(Some(Key::Name(s.clone()))),
        Some(space_query::Value::I64(i)) => Ok(Some(Key::Name(i.to_string()))),
        Some(space_query::Value::U64(u)) => Ok(Some(Key::Name(u.to_string()))),
        Some(other) => {
            bail!("the key field {name:?} must be a string or an integer, not {other:?}")
        }
        None => bail!("the entry has no key field {name:?}"),
    }
}

/// Writes one batch and prints its receipts.
async fn write(
    conn: &std::sync::Arc<Cluster>,
    entry_type: &str,
    entries: Vec<(Fields, Option<Key>)>,
    lease: Lease,
    as_json: bool,
) -> Result<()> {
    let Response::Receipts(receipts) = conn
        .call(Request::WriteDirect {
            entry_type: entry_type.to_owned(),
            indexes: Vec::new(),
            entries,
            lease,
            labels: Vec::new(),
        })
        .await?
    else {
        bail!("unexpected answer");
    };
    for r in receipts {
        if as_json {
            println!(
                "{}",
                json!({"node": r.node.0, "key": r.key.to_string(), "version": r.version})
            );
        } else {
            println!("written {} on {}", r.key, r.node);
        }
    }
    Ok(())
}

/// Prints what a command did to the entry of `key`.
fn done(as_json: bool, what: &str, key: &str) {
    if as_json {
        println!("{}", json!({ what: key }));
    } else {
        println!("{what} {key}");
    }
}

/// What a read or take is for: the entry of `key`, or the matches of `query`.
fn target_of(entry_type: String, query: &str, key: Option<String>) -> Result<Target> {
    Ok(match key {
        Some(key) => Target::Key {
            entry_type,
            key: parse_key(&key),
        },
        None => Target::Query(parse_query(&entry_type, query)?),
    })
}

/// Whether a read or take found something.
fn found<T>(docs: &[T]) -> Found {
    if docs.is_empty() {
        Found::Nothing
    } else {
        Found::Done
    }
}

#[tokio::main]
async fn main() {
    // Output piped into a program that stops reading (`space contents Job | head`) ends
    // the tool quietly, as it does other Unix tools, not in a panic at the next print.
    // SAFETY: it sets the process's disposition of SIGPIPE to the default; no handler of
    // the program's is replaced (Rust's runtime only ignores the signal).
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let as_json = cli.json;
    match run(cli).await {
        Ok(Found::Done) => {}
        Ok(Found::Nothing) => std::process::exit(1),
        Err(e) if e.is::<Interrupted>() => {
            if as_json {
                println!("{}", json!({"error": {"message": "interrupted"}}));
            } else {
                eprintln!("interrupted");
            }
            std::process::exit(130);
        }
        Err(e) => {
            if as_json {
                // The node's typed error, when it was one, as the wire carries it.
                let detail = e
                    .downcast_ref::<space_client::SpaceError>()
                    .and_then(|e| serde_json::to_value(e).ok());
                println!(
                    "{}",
                    json!({"error": {"message": format!("{e:#}"), "detail": detail}})
                );
            } else {
                eprintln!("error: {e:#}");
            }
            std::process::exit(2);
        }
    }
}
