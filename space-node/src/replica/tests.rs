//! The log store and state machine against openraft's own storage suite, on a real data
//! directory (real files, real fsync).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};
use space_core::EngineConfig;
use space_core::server::LogHost;

use super::{LogStore, Shard, StateMachine};

/// A fresh data directory, removed when dropped.
pub(super) struct Dir(pub(super) PathBuf);

impl Dir {
    pub(super) fn new(name: &str) -> Dir {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "space-replica-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temporary directory");
        Dir(path)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What keeps a built store's directory and host alive.
struct Guard {
    _host: Arc<LogHost>,
    _dir: Dir,
}

struct OnDisk;

impl StoreBuilder<Shard, LogStore, StateMachine, Guard> for OnDisk {
    async fn build(&self) -> Result<(Guard, LogStore, StateMachine), StorageError<Shard>> {
        let dir = Dir::new("suite");
        let host = LogHost::open(&dir.0, &EngineConfig::default()).expect("host");
        let (log, image) = host.open_log(7).expect("log");
        let store = LogStore::open(log, image).expect("store");
        let machine =
            StateMachine::open(7, Some(&dir.0), EngineConfig::default()).expect("state machine");
        Ok((
            Guard {
                _host: host,
                _dir: dir,
            },
            store,
            machine,
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_store_and_state_machine_pass_openrafts_storage_suite() {
    Suite::test_all(OnDisk).await.expect("storage suite");
}
