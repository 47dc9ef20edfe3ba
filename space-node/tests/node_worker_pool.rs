//! The in-process worker-pool example runs unchanged against a node: the very binary of
//! `space-client/examples/worker_pool.rs`, given `--connect`.

mod common;

use std::process::Command;

use common::NodeProcess;
use space_tests::process::{Program, program};

#[test]
fn the_worker_pool_example_runs_against_a_node() {
    let node = NodeProcess::start(&[]);
    let out = Command::new(
        program("space-client", Program::Example("worker_pool")).expect("the worker_pool example"),
    )
    .args(["3", "400000", "--connect", &node.addr])
    .output()
    .expect("run the example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // π(400,000) = 33,860, computed by workers talking to the node.
    assert!(stdout.contains("33860 primes below 400000"), "{stdout}");
    assert!(
        stdout.contains(&format!("on node {}", node.addr)),
        "{stdout}"
    );
    assert!(
        stdout.contains("progress: 8/8 tasks done"),
        "notify progress came from the node:\n{stdout}"
    );
}
