//! `space-node`: the server that will hold entries and serve the space over the network.
//!
//! Not built yet: the in-process space (`space-client`'s `Space`) is what exists today.
//! This binary says so instead of pretending to serve.

fn main() {
    eprintln!(
        "space-node: the network server is not built yet; use the in-process Space \
         (see README.md: cargo run --release -p space-client --example worker_pool)"
    );
    std::process::exit(2);
}
