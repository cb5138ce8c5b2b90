//! The guard's decisions on a real routing table, with the clock paused.

use std::collections::HashSet;
use std::time::Duration;

use forge_router::{CanaryShare, Route, RoutingTable, Student, Target};

use super::*;
use crate::trace::now_ms;

fn table(percent: f64) -> RoutingTable {
    let route = Route::new("a", Target::new("up", "teacher")).with_student(Student::new(
        Target::new("up", "student"),
        CanaryShare::from_percent(percent).unwrap(),
    ));
    RoutingTable::new(1, vec![route], &HashSet::from(["up".to_string()])).unwrap()
}

fn config() -> GuardConfig {
    GuardConfig {
        interval: Duration::from_secs(10),
        min_requests: 50,
        ..GuardConfig::default()
    }
}

fn traffic(guard: &Guard, student_errors_every: Option<u64>) {
    for i in 0..100 {
        guard.record("a", "teacher", ResponseKind::Json, 1000, false);
        let failed = student_errors_every.is_some_and(|n| i % n == 0);
        guard.record("a", "student", ResponseKind::Json, 1000, failed);
    }
}

/// One check of a student after 100 exchanges on each arm (answered in 1 ms), of which the
/// teacher's and the student's clients gave up on `teacher_gone` and `student_gone` before any
/// answer.
async fn judged_with_unanswered(teacher_gone: u64, student_gone: u64) -> GuardEvent {
    let guard = Guard::new(config());
    assert!(guard.check(&table(10.0), 0).is_empty());
    tokio::time::advance(Duration::from_secs(11)).await;
    for i in 0..100 {
        for (model, gone) in [("teacher", teacher_gone), ("student", student_gone)] {
            if i < gone {
                guard.record_unanswered("a", model);
            } else {
                guard.record("a", model, ResponseKind::Json, 1000, false);
            }
        }
    }
    guard.check(&table(10.0), 0);
    guard.events().pop().unwrap()
}

#[tokio::test(start_paused = true)]
async fn clients_that_give_up_count_against_a_student_only_beyond_the_teacher_s_share() {
    // A hung student: every client gives up first, and no request ever fails.
    let hung = judged_with_unanswered(0, 100).await;
    assert_eq!(hung.kind, EventKind::FailedCheck, "{hung:?}");
    assert!(
        hung.detail.contains("100.00% of its clients gave up"),
        "{hung:?}"
    );
    // Users who stop answers, and SDKs that time out, leave both arms alike: no reason to
    // roll the student back.
    let impatient = judged_with_unanswered(5, 6).await;
    assert_eq!(impatient.kind, EventKind::SteppedUp, "{impatient:?}");
    // None seen on the teacher's side in 100 is no proof that its clients never leave (and a
    // p99 of 100 would be the longest two waits, by chance on one arm).
    for gone in [2, 4] {
        let few = judged_with_unanswered(0, gone).await;
        assert_eq!(few.kind, EventKind::SteppedUp, "{few:?}");
    }
    // Well beyond the teacher's share, and beyond chance in 100 exchanges.
    let worse = judged_with_unanswered(1, 10).await;
    assert_eq!(worse.kind, EventKind::FailedCheck, "{worse:?}");
    assert!(
        worse.detail.contains("gave up before an answer"),
        "{worse:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn healthy_student_climbs_the_plan_to_promotion() {
    let guard = Guard::new(config());
    let mut share = 1.0;
    let mut seen = Vec::new();
    while share < 100.0 {
        assert!(
            guard.check(&table(share), 0).is_empty(),
            "judged before the interval"
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        traffic(&guard, None);
        let actions = guard.check(&table(share), 0);
        assert_eq!(actions.len(), 1, "at {share}%: {:?}", guard.events());
        share = actions[0].share.percent();
        seen.push((actions[0].kind, share));
    }
    assert_eq!(
        seen,
        vec![
            (EventKind::SteppedUp, 5.0),
            (EventKind::SteppedUp, 10.0),
            (EventKind::SteppedUp, 25.0),
            (EventKind::SteppedUp, 50.0),
            (EventKind::Promoted, 100.0)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn five_percent_errors_roll_back_on_the_second_check() {
    let guard = Guard::new(config());
    assert!(guard.check(&table(10.0), 0).is_empty());
    tokio::time::advance(Duration::from_secs(11)).await;
    traffic(&guard, Some(20));
    assert!(
        guard.check(&table(10.0), 0).is_empty(),
        "one failed check is not a rollback"
    );
    assert_eq!(guard.events().last().unwrap().kind, EventKind::FailedCheck);
    tokio::time::advance(Duration::from_secs(11)).await;
    traffic(&guard, Some(20));
    let actions = guard.check(&table(10.0), 0);
    assert_eq!(actions.len(), 1);
    assert_eq!(
        (actions[0].kind, actions[0].share),
        (EventKind::RolledBack, CanaryShare::ZERO)
    );
    assert!(
        guard
            .events()
            .last()
            .unwrap()
            .detail
            .contains("success 95.00%")
    );
}

#[tokio::test(start_paused = true)]
async fn no_traffic_is_unverified_not_passed() {
    let guard = Guard::new(config());
    guard.check(&table(5.0), 0);
    tokio::time::advance(Duration::from_secs(11)).await;
    for _ in 0..10 {
        guard.record("a", "student", ResponseKind::Json, 1000, false);
    }
    assert!(guard.check(&table(5.0), 0).is_empty());
    let last = guard.events().last().cloned().unwrap();
    assert_eq!(last.kind, EventKind::Unverified);
    assert!(last.detail.contains("10 student requests"));
    // The traffic keeps counting toward the same step; the teacher needs enough too. (A step
    // short of traffic is noted once an interval.)
    for _ in 0..40 {
        guard.record("a", "student", ResponseKind::Json, 1000, false);
    }
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(guard.check(&table(5.0), 0).is_empty());
    let last = guard.events().last().cloned().unwrap();
    assert_eq!(last.kind, EventKind::Unverified);
    assert!(
        last.detail.contains("0 teacher requests"),
        "{}",
        last.detail
    );
    for _ in 0..50 {
        guard.record("a", "teacher", ResponseKind::Json, 1000, false);
    }
    assert_eq!(guard.check(&table(5.0), 0)[0].kind, EventKind::SteppedUp);
}

#[tokio::test(start_paused = true)]
async fn two_students_in_canary_are_each_judged_on_their_own_traffic() {
    let route = Route::new("a", Target::new("up", "teacher"))
        .with_student(Student::new(
            Target::new("up", "s0"),
            CanaryShare::from_percent(5.0).unwrap(),
        ))
        .with_student(Student::new(
            Target::new("up", "s1"),
            CanaryShare::from_percent(5.0).unwrap(),
        ));
    let table = RoutingTable::new(1, vec![route], &HashSet::from(["up".to_string()])).unwrap();
    let guard = Guard::new(config());
    assert!(guard.check(&table, 0).is_empty());
    tokio::time::advance(Duration::from_secs(11)).await;
    for _ in 0..100 {
        guard.record("a", "teacher", ResponseKind::Json, 1000, false);
        guard.record("a", "s0", ResponseKind::Json, 1000, false);
        guard.record("a", "s1", ResponseKind::Json, 1000, false);
    }
    // Judging s0 must not wipe what s1 and the teacher did.
    let actions = guard.check(&table, 0);
    let stepped: Vec<(&str, EventKind)> =
        actions.iter().map(|a| (a.model.as_str(), a.kind)).collect();
    assert_eq!(
        stepped,
        vec![("s0", EventKind::SteppedUp), ("s1", EventKind::SteppedUp)],
        "{:?}",
        guard.events()
    );
}

#[tokio::test(start_paused = true)]
async fn slow_or_worse_rated_students_fail_their_gates() {
    let guard = Guard::new(GuardConfig {
        max_failed_checks: 1,
        ..config()
    });
    guard.check(&table(5.0), 0);
    tokio::time::advance(Duration::from_secs(11)).await;
    for _ in 0..100 {
        guard.record("a", "teacher", ResponseKind::Json, 100_000, false);
        guard.record("a", "student", ResponseKind::Json, 200_000, false);
    }
    let actions = guard.check(&table(5.0), 0);
    assert_eq!(actions[0].kind, EventKind::RolledBack);
    assert!(guard.events().last().unwrap().detail.contains("p99"));

    guard.check(&table(5.0), 0);
    tokio::time::advance(Duration::from_secs(11)).await;
    traffic(&guard, None);
    // One score each is one person's mood, not a verdict: the step passes.
    guard.record_feedback("a", "teacher", now_ms(), 95.0);
    guard.record_feedback("a", "student", now_ms(), 70.0);
    assert_eq!(guard.check(&table(5.0), 0)[0].kind, EventKind::SteppedUp);
    tokio::time::advance(Duration::from_secs(11)).await;
    traffic(&guard, None);
    for _ in 0..10 {
        guard.record_feedback("a", "teacher", now_ms(), 95.0);
        guard.record_feedback("a", "student", now_ms(), 70.0);
    }
    let actions = guard.check(&table(10.0), 0);
    assert_eq!(actions[0].kind, EventKind::RolledBack);
    assert!(guard.events().last().unwrap().detail.contains("feedback"));
}

#[tokio::test(start_paused = true)]
async fn manual_aliases_are_left_alone() {
    let guard = Guard::new(config());
    guard.set_manual("a", true);
    tokio::time::advance(Duration::from_secs(11)).await;
    traffic(&guard, Some(2));
    assert!(guard.check(&table(5.0), 0).is_empty());
    assert!(guard.events().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_step_is_judged_on_traffic_from_its_start_not_on_the_teacher_s_past() {
    let guard = Guard::new(config());
    // The student sits at 0% (rolled back) while the teacher serves the route for a long time.
    guard.check(&table(0.0), 0);
    for _ in 0..1000 {
        guard.record("a", "teacher", ResponseKind::Json, 1000, false);
    }
    tokio::time::advance(Duration::from_secs(3600)).await;
    // Back in canary: its step starts now, and the teacher's old traffic does not count.
    assert!(guard.check(&table(10.0), 0).is_empty());
    tokio::time::advance(Duration::from_secs(11)).await;
    for _ in 0..60 {
        guard.record("a", "student", ResponseKind::Json, 1000, false);
    }
    for _ in 0..10 {
        guard.record("a", "teacher", ResponseKind::Json, 1000, false);
    }
    assert!(guard.check(&table(10.0), 0).is_empty());
    let last = guard.events().last().cloned().unwrap();
    assert_eq!(last.kind, EventKind::Unverified);
    assert!(
        last.detail.contains("10 teacher requests"),
        "{}",
        last.detail
    );
}

#[tokio::test(start_paused = true)]
async fn a_student_back_in_canary_starts_its_step_afresh() {
    let guard = Guard::new(config());
    guard.check(&table(10.0), 0);
    tokio::time::advance(Duration::from_secs(11)).await;
    traffic(&guard, Some(20));
    assert!(guard.check(&table(10.0), 0).is_empty());
    assert_eq!(guard.events().last().unwrap().kind, EventKind::FailedCheck);
    // An operator rolls it back, then gives it a share again a while later.
    guard.check(&table(0.0), 0);
    tokio::time::advance(Duration::from_secs(600)).await;
    traffic(&guard, Some(20));
    assert!(
        guard.check(&table(10.0), 0).is_empty(),
        "not judged at once on its old clock"
    );
    tokio::time::advance(Duration::from_secs(11)).await;
    traffic(&guard, Some(20));
    assert!(
        guard.check(&table(10.0), 0).is_empty(),
        "its first failed check since its return: not a rollback"
    );
    assert_eq!(guard.events().last().unwrap().kind, EventKind::FailedCheck);
}

#[tokio::test(start_paused = true)]
async fn students_that_enter_canary_together_are_not_judged_on_the_teacher_s_past() {
    let two = |percent: f64| {
        let share = CanaryShare::from_percent(percent).unwrap();
        let route = Route::new("a", Target::new("up", "teacher"))
            .with_student(Student::new(Target::new("up", "s0"), share))
            .with_student(Student::new(Target::new("up", "s1"), share));
        RoutingTable::new(1, vec![route], &HashSet::from(["up".to_string()])).unwrap()
    };
    let guard = Guard::new(config());
    // Both sit at 0% while the teacher serves the route alone for a long time.
    guard.check(&two(0.0), 0);
    for _ in 0..1000 {
        guard.record("a", "teacher", ResponseKind::Json, 1000, false);
    }
    tokio::time::advance(Duration::from_secs(3600)).await;
    // Both enter canary in the same check: their steps start now, on fresh teacher traffic.
    assert!(guard.check(&two(5.0), 0).is_empty());
    tokio::time::advance(Duration::from_secs(11)).await;
    for _ in 0..60 {
        guard.record("a", "s0", ResponseKind::Json, 1000, false);
        guard.record("a", "s1", ResponseKind::Json, 1000, false);
    }
    for _ in 0..10 {
        guard.record("a", "teacher", ResponseKind::Json, 1000, false);
    }
    assert!(guard.check(&two(5.0), 0).is_empty(), "{:?}", guard.events());
    let events = guard.events();
    let last_two: Vec<(&str, EventKind)> = events[events.len() - 2..]
        .iter()
        .map(|e| (e.model.as_str(), e.kind))
        .collect();
    assert_eq!(
        last_two,
        vec![("s0", EventKind::Unverified), ("s1", EventKind::Unverified)]
    );
    assert!(
        events[events.len() - 1]
            .detail
            .contains("10 teacher requests")
    );

    // Judged together, both step up; their next steps are judged on fresh teacher traffic too.
    for _ in 0..100 {
        guard.record("a", "teacher", ResponseKind::Json, 1000, false);
    }
    assert_eq!(guard.check(&two(5.0), 0).len(), 2, "{:?}", guard.events());
    tokio::time::advance(Duration::from_secs(11)).await;
    for _ in 0..60 {
        guard.record("a", "s0", ResponseKind::Json, 1000, false);
        guard.record("a", "s1", ResponseKind::Json, 1000, false);
    }
    assert!(guard.check(&two(10.0), 0).is_empty());
    let events = guard.events();
    assert!(
        events[events.len() - 2..]
            .iter()
            .all(|e| e.kind == EventKind::Unverified && e.detail.contains("0 teacher requests")),
        "{events:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_rollback_that_could_not_be_applied_is_decided_again_at_the_next_failing_check() {
    let guard = Guard::new(config());
    guard.check(&table(10.0), 0);
    for _ in 0..2 {
        tokio::time::advance(Duration::from_secs(11)).await;
        traffic(&guard, Some(20));
        guard.check(&table(10.0), 0);
    }
    assert_eq!(guard.events().last().unwrap().kind, EventKind::RolledBack);
    // The route change failed: the student still has its 10%.
    guard.rollback_not_applied("a", "student");
    // The next failing traffic decides it at once, not two intervals later.
    traffic(&guard, Some(20));
    let actions = guard.check(&table(10.0), 0);
    assert_eq!(
        actions.iter().map(|a| a.kind).collect::<Vec<_>>(),
        vec![EventKind::RolledBack],
        "{:?}",
        guard.events()
    );
}

#[tokio::test(start_paused = true)]
async fn feedback_on_exchanges_from_before_a_step_does_not_judge_it() {
    let guard = Guard::new(config());
    let before = now_ms().saturating_sub(60_000);
    assert!(
        guard.check(&table(10.0), now_ms()).is_empty(),
        "the step starts"
    );
    tokio::time::advance(Duration::from_secs(11)).await;
    traffic(&guard, None);
    // Scores on old traces, as a team grading its backlog for datasets gives them.
    for _ in 0..20 {
        guard.record_feedback("a", "teacher", before, 100.0);
        guard.record_feedback("a", "student", before, 0.0);
    }
    let actions = guard.check(&table(10.0), now_ms());
    assert_eq!(actions.len(), 1, "{:?}", guard.events());
    assert_eq!(actions[0].kind, EventKind::SteppedUp);
    // The same scores on exchanges of the step do judge it.
    tokio::time::advance(Duration::from_secs(11)).await;
    traffic(&guard, None);
    for _ in 0..20 {
        guard.record_feedback("a", "teacher", now_ms(), 100.0);
        guard.record_feedback("a", "student", now_ms(), 0.0);
    }
    assert!(guard.check(&table(25.0), now_ms()).is_empty());
    let last = guard.events().last().cloned().unwrap();
    assert_eq!(last.kind, EventKind::FailedCheck);
    assert!(last.detail.contains("feedback"), "{}", last.detail);
}

#[tokio::test(start_paused = true)]
async fn a_step_short_of_traffic_says_so_once_an_interval() {
    let guard = Guard::new(config());
    guard.check(&table(10.0), now_ms());
    for _ in 0..2 {
        tokio::time::advance(Duration::from_secs(11)).await;
        traffic(&guard, Some(20));
        guard.check(&table(10.0), now_ms());
    }
    assert_eq!(guard.events().last().unwrap().kind, EventKind::RolledBack);
    // A quiet 1% canary: checks every 2.5 s for most of an hour, and no traffic.
    guard.check(&table(1.0), 0);
    tokio::time::advance(Duration::from_secs(11)).await;
    for _ in 0..1000 {
        guard.check(&table(1.0), 0);
        tokio::time::advance(Duration::from_millis(2500)).await;
    }
    let events = guard.events();
    let unverified = events
        .iter()
        .filter(|e| e.kind == EventKind::Unverified)
        .count();
    // 2,500 s at one note per 10 s interval.
    assert!((240..=260).contains(&unverified), "{unverified} notes");
    assert!(
        events.iter().any(|e| e.kind == EventKind::RolledBack),
        "the rollback is still in the log"
    );
}

#[tokio::test(start_paused = true)]
async fn a_step_is_judged_on_the_teachers_traffic_of_its_own_time() {
    // Two students whose steps start at different times.
    let two = |p0: f64, p1: f64| {
        let s = |p: f64| CanaryShare::from_percent(p).unwrap();
        let mut route = Route::new("a", Target::new("up", "teacher"))
            .with_student(Student::new(Target::new("up", "s0"), s(p0)))
            .with_student(Student::new(Target::new("up", "s1"), CanaryShare::ZERO));
        route.students[1].share = s(p1);
        route.students[1].start = 5000;
        RoutingTable::new(1, vec![route], &HashSet::from(["up".to_string()])).unwrap()
    };
    let guard = Guard::new(config());
    assert!(guard.check(&two(5.0, 0.0), 0).is_empty());
    // The teacher has a slow spell during s0's step, before s1's begins.
    for _ in 0..100 {
        guard.record("a", "teacher", ResponseKind::Json, 10_000_000, false);
        guard.record("a", "s0", ResponseKind::Json, 1_000, false);
    }
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(
        guard.check(&two(5.0, 5.0), 0).is_empty(),
        "s1's step starts"
    );
    tokio::time::advance(Duration::from_secs(6)).await;
    let judged = guard.check(&two(5.0, 5.0), 0);
    assert_eq!(judged.len(), 1);
    assert_eq!(
        (judged[0].model.as_str(), judged[0].kind),
        ("s0", EventKind::SteppedUp)
    );
    // Then the teacher is fast again, and s1 is slow.
    for _ in 0..100 {
        guard.record("a", "teacher", ResponseKind::Json, 1_000, false);
        guard.record("a", "s1", ResponseKind::Json, 2_000_000, false);
    }
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(guard.check(&two(10.0, 5.0), 0).is_empty());
    let last = guard.events().last().cloned().unwrap();
    assert_eq!(
        (last.model.as_str(), last.kind),
        ("s1", EventKind::FailedCheck),
        "{last:?}"
    );
    assert!(last.detail.contains("p99"), "{}", last.detail);
}

#[tokio::test(start_paused = true)]
async fn latency_is_compared_at_the_student_s_mix_of_streams() {
    // Each kind takes the same time on either arm (1 ms answers, 100 ms streams), but sticky
    // keys sent the student 10% streams and the teacher 1%. Over pooled samples the teacher's
    // p99 would be 1 ms and the student's 100 ms: a rollback of a student as fast as its teacher.
    let run = |student_stream_us: u64| {
        let guard = Guard::new(GuardConfig {
            max_failed_checks: 1,
            ..config()
        });
        guard.check(&table(5.0), 0);
        for i in 0..2000 {
            let (kind, latency) = if i % 100 == 0 {
                (ResponseKind::Stream, 100_000)
            } else {
                (ResponseKind::Json, 1_000)
            };
            guard.record("a", "teacher", kind, latency, false);
        }
        for i in 0..100 {
            let (kind, latency) = if i % 10 == 0 {
                (ResponseKind::Stream, student_stream_us)
            } else {
                (ResponseKind::Json, 1_000)
            };
            guard.record("a", "student", kind, latency, false);
        }
        guard
    };
    let same_speed = run(100_000);
    tokio::time::advance(Duration::from_secs(11)).await;
    let actions = same_speed.check(&table(5.0), 0);
    let detail = same_speed.events().last().unwrap().detail.clone();
    assert_eq!(actions[0].kind, EventKind::SteppedUp, "{detail}");
    assert!(
        detail.contains("p99 100.0 ms vs teacher 100.0 ms"),
        "{detail}"
    );

    // Streams twice as slow as the teacher's are still caught.
    let slower = run(200_000);
    tokio::time::advance(Duration::from_secs(11)).await;
    let actions = slower.check(&table(5.0), 0);
    assert_eq!(
        actions[0].kind,
        EventKind::RolledBack,
        "{:?}",
        slower.events()
    );
}
