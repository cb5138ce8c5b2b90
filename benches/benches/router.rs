//! Criterion: the routing table's pick, the per-request `ArcSwap` load with it, and hot-swap latency.
//!
//! `cargo bench -p forge-benches --bench router`. The table has 8 aliases; the one picked has a
//! teacher and a student at 10%, so every pick hashes the key and walks the shares.
//! - `pick/*`: `RoutingTable::pick` on a table already in hand, with a sticky key (hashed) and
//!   with a random point (not hashed).
//! - `load+pick/*`: `Router::load()` then `pick`, what each request does: alone; with a second
//!   thread doing the same in a loop (the two share the table's reference count); and with a
//!   second thread swapping the table in a loop.
//! - `swap/*`: `Router::update` changing the student's share (in memory, no store): the call
//!   alone; and until a thread spinning on `load()` has seen the new version.
//!
//! The second thread is a plain OS thread; on a 2-core machine it and the bench thread have a
//! core each only if nothing else runs.

// A bench binary: a failed setup should stop it at once, with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};
use forge_benches::recorder::{Recorder, human_ns};
use forge_router::{Arm, CanaryShare, Route, RouteError, Router, StickyKey, Student, Target};

const ALIAS: &str = "gpt-4o";
const KEY: &[u8] = b"user-4242";
const MAX_PICK_NS: f64 = 100.0;

fn router() -> Router {
    let mut routes = vec![
        Route::new(ALIAS, Target::new("openai", "gpt-4o")).with_student(Student::new(
            Target::new("openai", "ft:gpt-4o-mini:acme::1"),
            CanaryShare::from_percent(10.0).unwrap(),
        )),
    ];
    for i in 1..8 {
        routes.push(Route::new(
            format!("alias-{i}"),
            Target::new("anthropic", format!("model-{i}")),
        ));
    }
    Router::new(routes, ["openai", "anthropic"]).unwrap()
}

/// Sets the student's share of the bench alias.
fn set_share(routes: &mut [Route], share: CanaryShare) -> Result<(), RouteError> {
    let route = routes.iter_mut().find(|r| r.alias == ALIAS);
    route.expect("the bench alias is in the table").students[0].share = share;
    Ok(())
}

/// A swap between two valid shares, so any number of them keeps the table valid.
fn swap(router: &Router, n: u64) -> u64 {
    let share =
        CanaryShare::from_basis_points(if n.is_multiple_of(2) { 500 } else { 1000 }).unwrap();
    router
        .update(|routes| set_share(routes, share))
        .unwrap()
        .version()
}

/// Runs `f` `iters` times and returns the time it took.
fn timed(iters: u64, mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    start.elapsed()
}

fn load_and_pick(router: &Router) -> u64 {
    let table = router.load();
    let decision = table.pick(black_box(ALIAS), StickyKey::Key(black_box(KEY)));
    decision.map_or(0, |d| d.version)
}

fn bench_pick(c: &mut Criterion, router: &Router, recorder: &Recorder) {
    let table = router.load();
    let mut group = c.benchmark_group("pick");
    group.bench_function("sticky_key", |b| {
        b.iter_custom(|iters| {
            let elapsed = timed(iters, || {
                black_box(table.pick(black_box(ALIAS), StickyKey::Key(black_box(KEY))));
            });
            recorder.record("pick/sticky_key", iters, elapsed)
        })
    });
    group.bench_function("random_point", |b| {
        b.iter_custom(|iters| {
            let elapsed = timed(iters, || {
                black_box(table.pick(black_box(ALIAS), StickyKey::Point(black_box(421))));
            });
            recorder.record("pick/random_point", iters, elapsed)
        })
    });
    group.finish();
}

fn bench_load_pick(c: &mut Criterion, router: &Router, recorder: &Recorder) {
    let mut group = c.benchmark_group("load+pick");
    let measure = |group: &mut BenchmarkGroup<'_, WallTime>, name: &str| {
        let id = format!("load+pick/{name}");
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let elapsed = timed(iters, || {
                    black_box(load_and_pick(router));
                });
                recorder.record(&id, iters, elapsed)
            })
        });
    };
    measure(&mut group, "1_thread");

    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                black_box(load_and_pick(router));
            }
        });
        measure(&mut group, "2_threads_both_loading");
        stop.store(true, Ordering::Relaxed);
    });

    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                swap(router, n);
                n += 1;
            }
        });
        measure(&mut group, "while_another_thread_swaps");
        stop.store(true, Ordering::Relaxed);
    });
    group.finish();
}

fn bench_swap(c: &mut Criterion, router: &Router, recorder: &Recorder) {
    let mut group = c.benchmark_group("swap");
    let mut n = 0;
    group.bench_function("update", |b| {
        b.iter_custom(|iters| {
            let elapsed = timed(iters, || {
                black_box(swap(router, n));
                n += 1;
            });
            recorder.record("swap/update", iters, elapsed)
        })
    });

    let seen = AtomicU64::new(router.load().version());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                seen.fetch_max(router.load().version(), Ordering::Release);
            }
        });
        group.bench_function("update_until_seen_by_another_thread", |b| {
            b.iter_custom(|iters| {
                let elapsed = timed(iters, || {
                    let version = swap(router, n);
                    n += 1;
                    while seen.load(Ordering::Acquire) < version {
                        std::hint::spin_loop();
                    }
                });
                recorder.record("swap/update_until_seen_by_another_thread", iters, elapsed)
            })
        });
        stop.store(true, Ordering::Relaxed);
    });
    group.finish();
}

/// The target "a swap is visible to the next request", checked once, outside any clock.
fn assert_swap_visible_to_next_load(router: &Router) {
    let before = router.load();
    assert_eq!(
        before.pick(ALIAS, StickyKey::Point(9_999)).unwrap().arm,
        Arm::Teacher
    );
    let next = router
        .update(|routes| set_share(routes, CanaryShare::FULL))
        .unwrap();
    let after = router.load();
    assert_eq!(after.version(), next.version());
    assert_eq!(after.version(), before.version() + 1);
    let decision = after.pick(ALIAS, StickyKey::Point(9_999)).unwrap();
    assert_eq!(
        (decision.arm, decision.version),
        (Arm::Student(0), next.version())
    );
    router
        .update(|routes| set_share(routes, CanaryShare::from_percent(10.0).unwrap()))
        .unwrap();
}

fn print_summary(recorder: &Recorder) {
    let per_op = |name: &str| recorder.median_ns(name);
    println!();
    println!("Routing, per call (median over criterion's samples of 1 ms or more):");
    println!();
    println!("| bench | time per call |");
    println!("|---|--:|");
    for name in [
        "pick/sticky_key",
        "pick/random_point",
        "load+pick/1_thread",
        "load+pick/2_threads_both_loading",
        "load+pick/while_another_thread_swaps",
        "swap/update",
        "swap/update_until_seen_by_another_thread",
    ] {
        let time = per_op(name).map_or_else(|| "n/a".into(), human_ns);
        println!("| `{name}` | {time} |");
    }
    println!();
    println!("Targets");
    for name in ["pick/sticky_key", "pick/random_point"] {
        let ns = per_op(name);
        let verdict = match ns {
            Some(ns) if ns < MAX_PICK_NS => "PASS",
            Some(_) => "MISS",
            None => "n/a ",
        };
        println!(
            "  {verdict}  {name} under {MAX_PICK_NS} ns ({})",
            ns.map_or_else(|| "n/a".into(), |ns| format!("{ns:.1} ns"))
        );
    }
    println!("  PASS  a swap is visible to the next load() (asserted before the benches)");
    println!();
    println!("Command: cargo bench -p forge-benches --bench router");
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and criterion then
    // runs each bench once as a test.
    let measuring =
        std::env::args().any(|a| a == "--bench") && !std::env::args().any(|a| a == "--test");
    let router = router();
    assert_swap_visible_to_next_load(&router);
    let recorder = Recorder::default();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
        .configure_from_args();
    bench_pick(&mut c, &router, &recorder);
    bench_load_pick(&mut c, &router, &recorder);
    bench_swap(&mut c, &router, &recorder);
    c.final_summary();
    if measuring {
        print_summary(&recorder);
    }
}
