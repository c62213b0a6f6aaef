//! Budgets, reservations and rate windows, as routing and settling use them.

use super::*;

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn hold(loose: Option<Arc<Loose>>) -> Hold<'static> {
    Hold { request_id: "req", loose, floor: NanoUsd::ZERO }
}

/// Runs a future of the in-process book, which never waits.
fn now_or_never<T>(f: impl std::future::Future<Output = T>) -> T {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(f).poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("the in-process book waited"),
    }
}

fn team(limit: i64, downgrade_at: Option<f64>) -> Applicable {
    Applicable {
        scope: Scope::Team("t".into()),
        spec: BudgetSpec { limit: Some(NanoUsd(limit)), downgrade_at, ..Default::default() },
    }
}

#[test]
fn periods_start_and_reset_at_utc_boundaries() {
    let now = at("2026-11-28T19:00:00Z"); // a Saturday
    assert_eq!(Period::Daily.start(now), at("2026-11-28T00:00:00Z").timestamp_millis());
    assert_eq!(Period::Weekly.start(now), at("2026-11-23T00:00:00Z").timestamp_millis());
    assert_eq!(Period::Monthly.start(now), at("2026-11-01T00:00:00Z").timestamp_millis());
    assert_eq!(Period::Monthly.reset(now), Some(at("2026-12-01T00:00:00Z").timestamp_millis()));
    assert_eq!(Period::Weekly.reset(now), Some(at("2026-11-30T00:00:00Z").timestamp_millis()));
    assert_eq!(Period::Monthly.reset(at("2026-12-15T00:00:00Z")), Some(at("2027-01-01T00:00:00Z").timestamp_millis()));
    assert_eq!(Period::Total.reset(now), None);
}

#[test]
fn reservations_never_pass_the_limit() {
    let book = BudgetBook::default();
    let now = at("2026-11-28T19:00:00Z");
    let budgets = [team(100, None)];
    let r1 = book.reserve_now(&budgets, NanoUsd(60), now, hold(None)).unwrap();
    assert!(book.reserve_now(&budgets, NanoUsd(50), now, hold(None)).is_err());
    book.settle(r1, NanoUsd(10));
    let _r2 = book.reserve_now(&budgets, NanoUsd(90), now, hold(None)).unwrap();
    assert!(book.reserve_now(&budgets, NanoUsd(1), now, hold(None)).is_err());
}

#[test]
fn spend_resets_with_the_period_and_late_settles_stay_in_their_period() {
    let book = BudgetBook::default();
    let budgets = [Applicable {
        scope: Scope::Team("t".into()),
        spec: BudgetSpec { limit: Some(NanoUsd(100)), period: Period::Daily, ..Default::default() },
    }];
    let r = book.reserve_now(&budgets, NanoUsd(100), at("2026-11-28T23:59:59Z"), hold(None)).unwrap();
    let next_day = at("2026-11-29T00:00:01Z");
    assert!(book.reserve_now(&budgets, NanoUsd(1), next_day, hold(None)).is_err(), "in-flight reservation still held");
    book.settle(r, NanoUsd(100));
    let s = book.status_now(&budgets[0], next_day);
    assert_eq!(s.spent, NanoUsd(0));
    assert_eq!(s.remaining, Some(NanoUsd(100)));
}

#[test]
fn a_refusal_past_the_limit_reports_nothing_remaining() {
    let book = BudgetBook::default();
    let now = at("2026-11-28T19:00:00Z");
    let budgets = [team(100, None)];
    let r = book.reserve_now(&budgets, NanoUsd(90), now, hold(None)).unwrap();
    // The request cost more than its reservation: the period's spend passes the limit.
    book.settle(r, NanoUsd(109));
    let refusal = book.reserve_now(&budgets, NanoUsd(1), now, hold(None)).unwrap_err();
    assert_eq!(refusal.remaining, NanoUsd::ZERO);
    assert_eq!(book.status_now(&budgets[0], now).remaining, Some(NanoUsd::ZERO));
}

#[test]
fn threshold_counts_reserved_money() {
    let book = BudgetBook::default();
    let now = at("2026-11-28T19:00:00Z");
    let budgets = [team(100, Some(0.8))];
    let _r = book.reserve_now(&budgets, NanoUsd(79), now, hold(None)).unwrap();
    assert!(!now_or_never(book.past_threshold(&budgets, now)).unwrap());
    let _r2 = book.reserve_now(&budgets, NanoUsd(1), now, hold(None)).unwrap();
    assert!(now_or_never(book.past_threshold(&budgets, now)).unwrap());
}

#[test]
fn loose_reservations_are_tightened_when_room_is_needed() {
    let book = BudgetBook::default();
    let now = at("2026-11-28T19:00:00Z");
    let budgets = [team(100, None)];
    let loose = Loose::new(NanoUsd(60), || NanoUsd(40));
    let r1 = book.reserve_now(&budgets, NanoUsd(60), now, hold(Some(loose))).unwrap();
    assert!(book.reserve_now(&budgets, NanoUsd(60), now, hold(None)).is_err());
    let pending = book.loose_on(&budgets);
    assert_eq!(pending.len(), 1);
    book.tighten(&pending);
    assert!(book.loose_on(&budgets).is_empty());
    let r2 = book.reserve_now(&budgets, NanoUsd(60), now, hold(None)).unwrap();
    book.settle(r1, NanoUsd(30));
    book.settle(r2, NanoUsd(60));
    let s = book.status_now(&budgets[0], now);
    assert_eq!((s.spent, s.reserved), (NanoUsd(90), NanoUsd(0)));
}

#[test]
fn rpm_counts_a_trailing_minute() {
    let rl = RateLimiter::default();
    let budgets =
        [Applicable { scope: Scope::Key("k".into()), spec: BudgetSpec { rpm: Some(2), ..Default::default() } }];
    rl.admit(&budgets, 1, 1_000).unwrap();
    // A check takes no slot.
    rl.check(&budgets, 1, 1_500).unwrap();
    rl.check(&budgets, 1, 1_500).unwrap();
    rl.admit(&budgets, 1, 2_000).unwrap();
    assert_eq!(rl.check(&budgets, 1, 3_000).unwrap_err().retry_after_s, 58);
    let refused = rl.admit(&budgets, 1, 3_000).unwrap_err();
    assert_eq!(refused.retry_after_s, 58);
    rl.admit(&budgets, 1, 61_001).unwrap();
}

#[test]
fn tpm_uses_corrected_counts() {
    let rl = RateLimiter::default();
    let budgets =
        [Applicable { scope: Scope::Key("k".into()), spec: BudgetSpec { tpm: Some(100), ..Default::default() } }];
    let t = rl.admit(&budgets, 10, 1_000).unwrap();
    rl.correct(t, 100);
    assert!(rl.admit(&budgets, 10, 2_000).is_err());
    rl.admit(&budgets, 10, 61_001).unwrap();
}
