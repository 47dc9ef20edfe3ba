//! `space-node`: holds entries and serves the space over the network.
//!
//! A node is an [`Engine`](space_core::server::Engine) behind the one RPC service of
//! [`space_core::wire`]: each connection starts with a handshake (protocol and token), then
//! carries tarpc requests, each in its own task. Mutating requests carry a request id and a
//! retried id gets the first answer (`dedupe` module docs). Subscriptions registered by
//! clients are pushed to the client's endpoint by a pusher task each.
//!
//! Run it with the binary (`cargo run --release -p space-node -- --help`) or embed it with
//! [`Node::bind`] and [`Node::serve`].

mod admin;
mod dedupe;
mod engines_used;
mod handshake;
mod members;
mod observed;
mod picture;
mod push;
pub mod replica;
mod server;
mod sharded;
mod stall;

pub use server::{Node, NodeConfig, NodeError};
