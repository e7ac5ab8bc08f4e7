//! The loop's timing and resilience rules, on tokio's paused clock.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::*;
use crate::hub::client::{HttpError, TransportError, TransportKind};
use crate::hub::envelope::EnvelopeError;

/// What the scripted hub does with one report.
#[derive(Debug, Clone)]
enum Answer {
    Ok(ControlEnvelope),
    Status(u16),
    Garbage,
    Refused,
    /// Never answers.
    Hang,
    /// Answers after a while.
    Slow(Duration, ControlEnvelope),
}

#[derive(Debug, Default)]
struct HubLog {
    /// (time since start, report node, number of this report)
    sends: Vec<(Duration, String)>,
    accepted: Vec<u64>,
}

#[derive(Clone)]
struct ScriptedHub {
    name: &'static str,
    start: Instant,
    script: Arc<Mutex<VecDeque<Answer>>>,
    /// What to answer once the script is used up.
    then: Answer,
    log: Arc<Mutex<HubLog>>,
}

impl ScriptedHub {
    fn new(name: &'static str, script: Vec<Answer>, then: Answer, log: Arc<Mutex<HubLog>>) -> Self {
        ScriptedHub {
            name,
            start: Instant::now(),
            script: Arc::new(Mutex::new(script.into())),
            then,
            log,
        }
    }
}

impl Report for ScriptedHub {
    fn send(
        &self,
        report: &HostReport,
    ) -> impl Future<Output = Result<ControlEnvelope, HubClientError>> + Send {
        let answer = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| self.then.clone());
        self.log.lock().unwrap().sends.push((
            self.start.elapsed(),
            format!("{}:{}", self.name, report.node),
        ));
        async move {
            match answer {
                Answer::Ok(e) => Ok(e),
                Answer::Status(status) => Err(HttpError {
                    status,
                    message: "scripted".into(),
                }
                .into()),
                Answer::Garbage => Err(EnvelopeError::Invalid {
                    reason: "garbage".into(),
                }
                .into()),
                Answer::Refused => Err(TransportError {
                    kind: TransportKind::Connect,
                    message: "refused".into(),
                }
                .into()),
                Answer::Hang => std::future::pending().await,
                Answer::Slow(d, e) => {
                    tokio::time::sleep(d).await;
                    Ok(e)
                }
            }
        }
    }
}

/// Numbers its reports (in `node`) and records which were accepted.
struct CountingCollector {
    n: u64,
    log: Arc<Mutex<HubLog>>,
}

impl Collect for CountingCollector {
    fn collect(&mut self) -> impl Future<Output = HostReport> + Send {
        self.n += 1;
        let r = HostReport::new(
            &crate::ops::AgentId::new("0123456789abcdef0123456789abcdef").unwrap(),
            &format!("r{}", self.n),
        );
        async move { r }
    }

    fn accepted(&mut self, report: &HostReport) {
        let n = report.node.trim_start_matches('r').parse().unwrap();
        self.log.lock().unwrap().accepted.push(n);
    }
}

fn env(poll: Option<u64>) -> ControlEnvelope {
    ControlEnvelope {
        poll_interval_seconds: poll,
        ..ControlEnvelope::default()
    }
}

struct Running {
    log: Arc<Mutex<HubLog>>,
    commands: mpsc::Sender<Command<CountingCollector, ScriptedHub>>,
    shutdown: watch::Sender<bool>,
    envelope: watch::Receiver<Option<SavedEnvelope>>,
    stats: watch::Receiver<Stats>,
    task: tokio::task::JoinHandle<()>,
}

fn start(
    script: Vec<Answer>,
    then: Answer,
    floor: Duration,
    store: Option<EnvelopeStore>,
) -> Running {
    let log = Arc::new(Mutex::new(HubLog::default()));
    let hub = ScriptedHub::new("a", script, then, log.clone());
    let collector = CountingCollector {
        n: 0,
        log: log.clone(),
    };
    let hb = Heartbeat::new(collector, Some(hub), floor, store)
        .with_timeouts(Duration::from_secs(5), Duration::from_secs(120));
    let envelope = hb.subscribe();
    let stats = hb.stats();
    let (commands, rx) = mpsc::channel(4);
    let (shutdown, srx) = watch::channel(false);
    let task = tokio::spawn(hb.run(rx, srx));
    Running {
        log,
        commands,
        shutdown,
        envelope,
        stats,
        task,
    }
}

fn send_times(log: &Arc<Mutex<HubLog>>) -> Vec<u64> {
    log.lock()
        .unwrap()
        .sends
        .iter()
        .map(|(t, _)| t.as_secs())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn first_report_at_once_then_the_hubs_interval_clamped() {
    let r = start(
        vec![
            Answer::Ok(env(None)),         // default 300
            Answer::Ok(env(Some(120))),    // adopted
            Answer::Ok(env(Some(5))),      // below the floor: 60
            Answer::Ok(env(Some(99_999))), // above the ceiling: 3600
        ],
        Answer::Ok(env(Some(3600))),
        MIN_POLL,
        None,
    );
    tokio::time::sleep(Duration::from_secs(300 + 120 + 60 + 3600 + 1)).await;
    assert_eq!(send_times(&r.log), [0, 300, 420, 480, 4080]);
    assert_eq!(r.log.lock().unwrap().accepted, [1, 2, 3, 4, 5]);
    assert_eq!(
        r.envelope
            .borrow()
            .as_ref()
            .unwrap()
            .envelope
            .poll_interval_seconds,
        Some(3600)
    );
    r.shutdown.send(true).unwrap();
    r.task.await.unwrap();
}

const MIN_POLL: Duration = Duration::from_secs(60);

#[tokio::test(start_paused = true)]
async fn the_loop_survives_500_garbage_hang_refusal_and_reports_each_time() {
    let r = start(
        vec![
            Answer::Status(500),
            Answer::Garbage,
            Answer::Hang,
            Answer::Refused,
            Answer::Ok(env(Some(60))),
        ],
        Answer::Ok(env(Some(60))),
        MIN_POLL,
        None,
    );
    // generous: 4 backoffs ≤ 60 s each, one hang abandoned at the cycle deadline (120 s)
    tokio::time::sleep(Duration::from_secs(4 * 60 + 120 + 1)).await;
    {
        let log = r.log.lock().unwrap();
        assert!(log.sends.len() >= 5, "{:?}", log.sends);
        // only the report the hub accepted moves the cursor
        assert_eq!(log.accepted.first(), Some(&5));
    }
    let stats = r.stats.borrow().clone();
    assert_eq!(stats.failed, 4);
    assert_eq!(stats.consecutive_failures, 0);
    r.shutdown.send(true).unwrap();
    r.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_with_jitter_but_never_past_the_interval() {
    // the hub asked for 60 s once, then fails
    let r = start(
        vec![Answer::Ok(env(Some(60)))],
        Answer::Status(503),
        MIN_POLL,
        None,
    );
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let times = send_times(&r.log);
    assert_eq!(times[1], 60);
    let gaps: Vec<u64> = times[1..].windows(2).map(|w| w[1] - w[0]).collect();
    // 5 s, 10 s, 20 s, 40 s bases (each from its upper half), then capped at 60 s
    for (i, g) in gaps.iter().enumerate() {
        let base = (5u64 << i.min(4)).min(60);
        assert!(
            *g >= base / 2 && *g <= base,
            "gap {i} = {g} s, base {base} s: {gaps:?}"
        );
    }
    assert!(gaps.len() > 50, "{gaps:?}");
    assert_eq!(r.log.lock().unwrap().accepted, [1]);
    r.shutdown.send(true).unwrap();
    r.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn without_an_envelope_the_backoff_is_bounded_by_the_default_interval() {
    let r = start(vec![], Answer::Status(503), MIN_POLL, None);
    tokio::time::sleep(Duration::from_secs(7200)).await;
    let times = send_times(&r.log);
    let gaps: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|g| *g <= 300), "{gaps:?}");
    assert!(gaps[6..].iter().all(|g| *g >= 150), "{gaps:?}");
    r.shutdown.send(true).unwrap();
    r.task.await.unwrap();
}

#[test]
fn backoff_is_bounded_by_the_interval_for_any_failure_count() {
    for failures in [1, 2, 3, 10, 31, 32, 1000, u32::MAX] {
        for interval in [1, 2, 60, 300, 3600] {
            let interval = Duration::from_secs(interval);
            let b = backoff(failures, interval);
            assert!(b <= interval, "{failures} {interval:?} {b:?}");
            assert!(
                b >= interval.min(BACKOFF_BASE * 2u32.pow(failures.saturating_sub(1).min(16))) / 2
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_while_waiting_ends_the_loop_at_once() {
    let r = start(vec![], Answer::Ok(env(Some(600))), MIN_POLL, None);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let t0 = Instant::now();
    r.shutdown.send(true).unwrap();
    r.task.await.unwrap();
    assert!(t0.elapsed() < Duration::from_millis(10));
    assert_eq!(send_times(&r.log), [0]);
}

#[tokio::test(start_paused = true)]
async fn a_hanging_post_is_abandoned_after_the_grace() {
    let r = start(vec![Answer::Hang], Answer::Hang, MIN_POLL, None);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = Instant::now();
    r.shutdown.send(true).unwrap();
    r.task.await.unwrap();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(6),
        "{took:?}"
    );
    assert!(r.log.lock().unwrap().accepted.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_post_that_finishes_within_the_grace_still_counts() {
    let r = start(
        vec![Answer::Slow(Duration::from_secs(3), env(Some(90)))],
        Answer::Ok(env(None)),
        MIN_POLL,
        None,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    r.shutdown.send(true).unwrap();
    r.task.await.unwrap();
    assert_eq!(r.log.lock().unwrap().accepted, [1]);
    assert_eq!(
        r.envelope
            .borrow()
            .as_ref()
            .unwrap()
            .envelope
            .poll_interval_seconds,
        Some(90)
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_shutdown_sender_stops_the_loop() {
    let r = start(vec![], Answer::Ok(env(None)), MIN_POLL, None);
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(r.shutdown);
    tokio::time::timeout(Duration::from_secs(1), r.task)
        .await
        .expect("loop ended")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn reload_swaps_the_reporter_and_report_now_skips_the_wait() {
    let r = start(vec![], Answer::Ok(env(Some(600))), MIN_POLL, None);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let hub_b = ScriptedHub::new("b", vec![], Answer::Ok(env(Some(120))), r.log.clone());
    r.commands
        .send(Command::Reload {
            collector: CountingCollector {
                n: 100,
                log: r.log.clone(),
            },
            reporter: Some(hub_b),
            floor: MIN_POLL,
        })
        .await
        .unwrap();
    // the reload itself does not report; the next cycle (at 600 s) goes to the new hub
    tokio::time::sleep(Duration::from_secs(600)).await;
    r.commands.send(Command::ReportNow).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sends: Vec<(u64, String)> = r
        .log
        .lock()
        .unwrap()
        .sends
        .iter()
        .map(|(t, n)| (t.as_secs(), n.clone()))
        .collect();
    // hub b's clock started at the reload (10 s)
    assert_eq!(
        sends,
        [
            (0, "a:r1".into()),
            (590, "b:r101".into()),
            (600, "b:r102".into())
        ]
    );
    // reporting off, then on again: the first report goes at once
    r.commands
        .send(Command::Reload {
            collector: CountingCollector {
                n: 200,
                log: r.log.clone(),
            },
            reporter: None,
            floor: MIN_POLL,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1000)).await;
    assert_eq!(r.log.lock().unwrap().sends.len(), 3);
    let hub_c = ScriptedHub::new("c", vec![], Answer::Ok(env(None)), r.log.clone());
    r.commands
        .send(Command::Reload {
            collector: CountingCollector {
                n: 300,
                log: r.log.clone(),
            },
            reporter: Some(hub_c),
            floor: MIN_POLL,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(r.log.lock().unwrap().sends.last().unwrap().1, "c:r301");
    r.shutdown.send(true).unwrap();
    r.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_test_floor_allows_short_intervals() {
    let r = start(
        vec![],
        Answer::Ok(env(Some(1))),
        crate::hub::envelope::poll_floor(Some(1)),
        None,
    );
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(send_times(&r.log), [0, 1, 2, 3]);
    r.shutdown.send(true).unwrap();
    r.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_envelope_is_saved_and_a_restart_starts_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = EnvelopeStore::new(dir.path());
    let blocked = ControlEnvelope {
        poll_interval_seconds: Some(900),
        blocked: true,
        desired_generation: 12,
        has_signed_ops: true,
    };
    let r = start(
        vec![Answer::Ok(blocked.clone())],
        Answer::Hang,
        MIN_POLL,
        Some(store.clone()),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    r.shutdown.send(true).unwrap();
    r.task.await.unwrap();
    assert_eq!(store.load().unwrap().unwrap().envelope, blocked);

    // a new loop sees it before any report, and waits its interval after a failure-free start
    let log = Arc::new(Mutex::new(HubLog::default()));
    let hub = ScriptedHub::new("a", vec![], Answer::Hang, log.clone());
    let hb = Heartbeat::new(
        CountingCollector {
            n: 0,
            log: log.clone(),
        },
        Some(hub),
        MIN_POLL,
        Some(store),
    );
    assert_eq!(hb.subscribe().borrow().as_ref().unwrap().envelope, blocked);
    assert_eq!(hb.interval(), Duration::from_secs(900));
}

#[tokio::test(start_paused = true)]
async fn a_reload_that_shortens_the_interval_cuts_the_running_wait_short() {
    // The hub asks for 5 s; the production floor makes that 60 s.
    let r = start(vec![], Answer::Ok(env(Some(5))), MIN_POLL, None);
    // Created now so its clock (the log's times) starts with the loop's.
    let hub_b = ScriptedHub::new("b", vec![], Answer::Ok(env(Some(5))), r.log.clone());
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(send_times(&r.log), [0]);
    // A reload lowers the floor to 1 s while the loop waits out 60 s: the next report is
    // due at the last one (0 s) + 5 s, already past, so it goes at once, then every 5 s.
    r.commands
        .send(Command::Reload {
            collector: CountingCollector {
                n: 100,
                log: r.log.clone(),
            },
            reporter: Some(hub_b),
            floor: crate::hub::envelope::poll_floor(Some(1)),
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(send_times(&r.log), [0, 12, 17]);
    r.shutdown.send(true).unwrap();
    r.task.await.unwrap();
}
