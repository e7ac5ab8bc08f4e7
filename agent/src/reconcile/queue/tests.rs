//! Queue behaviour: order per vmid, overlap across vmids, fairness, bounds, idle-lane
//! cleanup, panics and shutdown. Ordering and overlap are property tests.

use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use tokio::sync::Barrier;

use super::*;

fn vmid(n: u32) -> Vmid {
    Vmid::new(u64::from(n)).expect("test vmid in range")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("test runtime")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ev {
    Start(usize),
    End(usize),
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Same-vmid operations run one at a time in submit order; the global limit holds.
    #[test]
    fn same_vmid_runs_in_submit_order(
        ops in proptest::collection::vec((0u32..6, 0u8..4), 1..80),
        max_running in 1usize..5,
    ) {
        let rt = rt();
        rt.block_on(async {
            let q = Queue::start(QueueConfig { max_running, max_queued: 1000 });
            let log = Arc::new(StdMutex::new(Vec::new()));
            let running = Arc::new(AtomicUsize::new(0));
            let peak = Arc::new(AtomicUsize::new(0));
            let mut handles = Vec::new();
            for (i, (v, yields)) in ops.iter().copied().enumerate() {
                let log = log.clone();
                let running = running.clone();
                let peak = peak.clone();
                let h = q.submit(vmid(100 + v), format!("op{i}"), move |p| {
                    Box::pin(async move {
                        assert_eq!(p.vmid(), vmid(100 + v));
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        log.lock().unwrap().push(Ev::Start(i));
                        for _ in 0..yields {
                            tokio::task::yield_now().await;
                        }
                        log.lock().unwrap().push(Ev::End(i));
                        running.fetch_sub(1, Ordering::SeqCst);
                        i
                    })
                }).expect("submit");
                handles.push(h);
            }
            for (i, h) in handles.into_iter().enumerate() {
                assert_eq!(h.await.expect("op ran"), i);
            }
            assert!(peak.load(Ordering::SeqCst) <= max_running);
            let log = log.lock().unwrap().clone();
            // Per vmid: Start(a) End(a) Start(b) End(b) ... with a < b (submit order).
            for v in 0..6u32 {
                let mine: Vec<Ev> = log
                    .iter()
                    .copied()
                    .filter(|e| {
                        let (Ev::Start(i) | Ev::End(i)) = *e;
                        ops[i].0 == v
                    })
                    .collect();
                let expected: Vec<Ev> = ops
                    .iter()
                    .enumerate()
                    .filter(|(_, (ov, _))| *ov == v)
                    .flat_map(|(i, _)| [Ev::Start(i), Ev::End(i)])
                    .collect();
                assert_eq!(mine, expected, "vmid {v}");
            }
            // A handle resolves just before its worker frees the lane; give it a moment.
            tokio::time::timeout(Duration::from_secs(5), async {
                while q.stats().lanes != 0 {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("idle lanes are freed");
            assert_eq!(q.stats().queued, 0);
        });
    }

    /// Operations of k different vmids (k <= max_running) all run at the same time: each
    /// waits on a barrier only all k together can pass.
    #[test]
    fn different_vmids_overlap(k in 2usize..6, extra in 0usize..3) {
        let rt = rt();
        rt.block_on(async {
            let q = Queue::start(QueueConfig { max_running: k + extra, max_queued: 100 });
            let barrier = Arc::new(Barrier::new(k));
            let handles: Vec<_> = (0..k)
                .map(|i| {
                    let b = barrier.clone();
                    q.submit(vmid(200 + i as u32), "wait", move |_p| {
                        Box::pin(async move {
                            b.wait().await;
                        })
                    })
                    .expect("submit")
                })
                .collect();
            let all = async {
                for h in handles {
                    h.await.expect("op ran");
                }
            };
            tokio::time::timeout(Duration::from_secs(10), all)
                .await
                .expect("operations of different vmids must overlap");
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_are_served_round_robin() {
    let q = Queue::start(QueueConfig {
        max_running: 1,
        max_queued: 1000,
    });
    let order = Arc::new(StdMutex::new(Vec::new()));
    let gate = Arc::new(Notify::new());
    // A blocker holds the only slot while the work is queued, so the order is decided
    // by the queue alone.
    let g = gate.clone();
    let blocker = q
        .submit(vmid(100), "blocker", move |_p| {
            Box::pin(async move { g.notified().await })
        })
        .unwrap();
    let mut handles = Vec::new();
    for i in 0..50 {
        let o = order.clone();
        handles.push(
            q.submit(vmid(101), format!("a{i}"), move |_p| {
                Box::pin(async move { o.lock().unwrap().push(format!("a{i}")) })
            })
            .unwrap(),
        );
    }
    let o = order.clone();
    handles.push(
        q.submit(vmid(102), "b", move |_p| {
            Box::pin(async move { o.lock().unwrap().push("b".to_string()) })
        })
        .unwrap(),
    );
    gate.notify_one();
    blocker.await.unwrap();
    for h in handles {
        h.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    let b_at = order.iter().position(|s| s == "b").unwrap();
    assert!(
        b_at <= 1,
        "guest 102's single op must not wait behind 50 ops of guest 101: ran at {b_at}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_fails_clearly_and_loses_nothing() {
    let q = Queue::start(QueueConfig {
        max_running: 1,
        max_queued: 2,
    });
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let running = q
        .submit(vmid(100), "hold", move |_p| {
            Box::pin(async move { g.notified().await })
        })
        .unwrap();
    // Wait until it runs so it no longer counts as queued.
    while q.stats().running == 0 {
        tokio::task::yield_now().await;
    }
    let a = q
        .submit(vmid(101), "a", |_p| Box::pin(async { 1 }))
        .unwrap();
    let b = q
        .submit(vmid(100), "b", |_p| Box::pin(async { 2 }))
        .unwrap();
    let err = q
        .submit(vmid(102), "c", |_p| Box::pin(async { 3 }))
        .unwrap_err();
    assert_eq!(
        err,
        QueueError::QueueFull {
            vmid: vmid(102),
            label: "c".into(),
            queued: 2,
            limit: 2
        }
    );
    assert!(err.to_string().contains("queue full"));
    gate.notify_one();
    running.await.unwrap();
    assert_eq!(a.await.unwrap(), 1);
    assert_eq!(b.await.unwrap(), 2);
    // Room again.
    let c = q
        .submit(vmid(102), "c", |_p| Box::pin(async { 3 }))
        .unwrap();
    assert_eq!(c.await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_shows_running_and_queued() {
    let q = Queue::start(QueueConfig {
        max_running: 2,
        max_queued: 10,
    });
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let h1 = q
        .submit(vmid(100), "start", move |_p| {
            Box::pin(async move { g.notified().await })
        })
        .unwrap();
    let h2 = q
        .submit(vmid(100), "set-config", |_p| Box::pin(async {}))
        .unwrap();
    while q.stats().running == 0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        q.stats(),
        QueueStats {
            queued: 1,
            running: 1,
            lanes: 1,
            closed: false
        }
    );
    assert_eq!(
        q.lanes(),
        vec![LaneView {
            vmid: vmid(100),
            running: Some("start".into()),
            queued: vec!["set-config".into()],
        }]
    );
    gate.notify_one();
    h1.await.unwrap();
    h2.await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while !q.lanes().is_empty() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("idle lane freed");
    assert_eq!(q.stats().lanes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_op_resolves_as_panicked_and_the_lane_goes_on() {
    let q = Queue::start(QueueConfig::default());
    let bad = q
        .submit(vmid(100), "bad", |_p| -> OpFuture<'_, ()> {
            Box::pin(async { panic!("boom (expected by this test)") })
        })
        .unwrap();
    let bad_sync = q
        .submit(vmid(100), "bad-sync", |_p| -> OpFuture<'_, ()> {
            panic!("boom before the future (expected by this test)")
        })
        .unwrap();
    let good = q
        .submit(vmid(100), "good", |_p| Box::pin(async { 7 }))
        .unwrap();
    assert!(matches!(bad.await, Err(QueueError::Panicked { .. })));
    assert!(matches!(bad_sync.await, Err(QueueError::Panicked { .. })));
    assert_eq!(good.await.unwrap(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_running_cancels_the_rest() {
    let q = Queue::start(QueueConfig {
        max_running: 2,
        max_queued: 100,
    });
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    // Finishes within the grace period once released.
    let quick = q
        .submit(vmid(100), "quick", move |_p| {
            Box::pin(async move {
                g.notified().await;
                "done"
            })
        })
        .unwrap();
    // Never finishes on its own.
    let stuck = q
        .submit(vmid(101), "stuck", |_p| {
            Box::pin(async { std::future::pending::<&str>().await })
        })
        .unwrap();
    let queued = q
        .submit(vmid(100), "queued", |_p| Box::pin(async { "ran" }))
        .unwrap();
    while q.stats().running < 2 {
        tokio::task::yield_now().await;
    }
    // `quick` is released once the shutdown has closed the queue (and so cancelled
    // `queued`), not after a guessed time: released earlier, `queued` would run. The
    // grace is what `stuck` makes the test wait, and what `quick` has to finish in.
    let release = async {
        while !q.stats().closed {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
    };
    let (report, ()) = tokio::join!(q.shutdown(Duration::from_secs(3)), release);
    assert_eq!(
        report,
        ShutdownReport {
            cancelled_queued: 1,
            cancelled_running: 1
        }
    );
    assert_eq!(quick.await.unwrap(), "done");
    assert!(matches!(stuck.await, Err(QueueError::Cancelled { .. })));
    assert!(matches!(queued.await, Err(QueueError::Cancelled { .. })));
    let late = q.submit(vmid(100), "late", |_p| Box::pin(async {}));
    assert!(matches!(late, Err(QueueError::ShuttingDown { .. })));
    assert!(q.stats().closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_of_an_idle_queue_returns_at_once() {
    let q = Queue::start(QueueConfig::default());
    let t = std::time::Instant::now();
    let report = q.shutdown(Duration::from_secs(30)).await;
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(
        report,
        ShutdownReport {
            cancelled_queued: 0,
            cancelled_running: 0
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_handle_still_runs_the_op() {
    let q = Queue::start(QueueConfig::default());
    let hit = Arc::new(AtomicUsize::new(0));
    let h = hit.clone();
    drop(
        q.submit(vmid(100), "fire", move |_p| {
            Box::pin(async move {
                h.fetch_add(1, Ordering::SeqCst);
            })
        })
        .unwrap(),
    );
    let after = q
        .submit(vmid(100), "after", |_p| Box::pin(async {}))
        .unwrap();
    after.await.unwrap();
    assert_eq!(hit.load(Ordering::SeqCst), 1);
}
