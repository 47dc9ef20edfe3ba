use space_core::{Query, Space};
use space_tests::Item;
use std::time::{Duration, Instant};
fn item(id: u64) -> Item {
    Item {
        id,
        kind: (id % 2) as u32,
        payload: vec![1; 64],
    }
}
fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().unwrap())
        .unwrap_or(2_000_000);
    let space = Space::new().blocking();
    let prods: Vec<_> = (0..2)
        .map(|p| {
            let s = space.clone();
            std::thread::spawn(move || {
                for i in 0..n / 2 {
                    s.write(&item(p * n / 2 + i)).unwrap();
                }
            })
        })
        .collect();
    let t = Instant::now();
    let cons: Vec<_> = (0..2)
        .map(|_| {
            let s = space.clone();
            std::thread::spawn(move || {
                let q = Query::of::<Item>();
                let mut k = 0;
                while k < n / 2 {
                    if s.take::<Item>(&q, Duration::from_millis(50))
                        .unwrap()
                        .is_some()
                    {
                        k += 1;
                    }
                }
            })
        })
        .collect();
    for p in prods {
        p.join().unwrap();
    }
    for c in cons {
        c.join().unwrap();
    }
    println!("2x2: {:.0}/s", n as f64 / t.elapsed().as_secs_f64());
}
