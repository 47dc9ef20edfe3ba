//! Stress: 8 writer threads and 8 taker threads move 1,000,000 entries through one entry
//! type; every entry is taken exactly once and none is left.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use space_core::{Query, Space};
use space_tests::Item;

const WRITERS: u64 = 8;
const TAKERS: usize = 8;
const ENTRIES: u64 = 1_000_000;

#[test]
fn every_entry_is_taken_exactly_once() {
    let space = Space::new().blocking();
    let seen: Arc<Vec<AtomicU8>> = Arc::new((0..ENTRIES).map(|_| AtomicU8::new(0)).collect());
    let taken = Arc::new(AtomicU64::new(0));
    let per_writer = ENTRIES / WRITERS;

    let takers: Vec<_> = (0..TAKERS)
        .map(|_| {
            let (space, seen, taken) = (space.clone(), seen.clone(), taken.clone());
            std::thread::spawn(move || {
                let q = Query::of::<Item>();
                let mut mine = 0u64;
                while taken.load(Ordering::Relaxed) < ENTRIES {
                    if let Some(item) = space.take::<Item>(&q, Duration::from_millis(50)).unwrap() {
                        seen[item.id as usize].fetch_add(1, Ordering::Relaxed);
                        taken.fetch_add(1, Ordering::Relaxed);
                        mine += 1;
                    }
                }
                mine
            })
        })
        .collect();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let space = space.clone();
            std::thread::spawn(move || {
                for i in 0..per_writer {
                    let id = w * per_writer + i;
                    space
                        .write(&Item {
                            id,
                            kind: (id % 4) as u32,
                            payload: vec![7; 64],
                        })
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let per_taker: Vec<u64> = takers.into_iter().map(|t| t.join().unwrap()).collect();

    assert_eq!(per_taker.iter().sum::<u64>(), ENTRIES);
    let never = seen
        .iter()
        .filter(|c| c.load(Ordering::Relaxed) == 0)
        .count();
    let twice = seen
        .iter()
        .filter(|c| c.load(Ordering::Relaxed) > 1)
        .count();
    assert_eq!((never, twice), (0, 0), "lost {never}, duplicated {twice}");
    assert_eq!(space.count(&Query::of::<Item>()).unwrap(), 0);
    assert_eq!(space.stats().unwrap().entries, 0);
}
