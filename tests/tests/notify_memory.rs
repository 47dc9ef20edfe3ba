//! 100,000 subscriptions register and unregister without leaking memory: the bytes held
//! are counted by a wrapping global allocator before, during and after.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use rand::SeedableRng;
use space_core::{EventKinds, Space};
use space_tests::workload;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const SUBSCRIPTIONS: u64 = 100_000;

#[test]
fn a_hundred_thousand_subscriptions_come_and_go_without_leaking() {
    let space = Space::new().blocking();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // One entry written first, so the entry type's store exists before we measure.
    space.write(&workload::activity(&mut rng)).unwrap();
    let before = LIVE.load(Ordering::Relaxed);
    let mut peak = 0;
    for round in 0..3 {
        let subs: Vec<_> = (0..SUBSCRIPTIONS)
            .map(|i| {
                space
                    .notify(&workload::subscription(i, &mut rng), EventKinds::WRITTEN)
                    .unwrap()
            })
            .collect();
        assert_eq!(space.stats().unwrap().subscriptions, SUBSCRIPTIONS);
        let during = LIVE.load(Ordering::Relaxed) - before;
        peak = peak.max(during);
        drop(subs);
        let after = LIVE.load(Ordering::Relaxed) - before;
        println!(
            "round {round}: {during} bytes with {SUBSCRIPTIONS} subscriptions, {after} bytes after"
        );
        assert_eq!(space.stats().unwrap().subscriptions, 0);
        assert!(
            during > SUBSCRIPTIONS as isize * 100,
            "subscriptions take memory while they live"
        );
        assert!(
            after < 256 * 1024,
            "round {round}: {after} bytes still held after unsubscribing"
        );
    }
    assert!(
        peak < SUBSCRIPTIONS as isize * 4096,
        "{peak} bytes for {SUBSCRIPTIONS} subscriptions"
    );
}
