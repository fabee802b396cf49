//! Table-driven tests of the retention policy: every case names its input and
//! pins the full decision list (one `Decision::explain` line per snapshot,
//! newest first), so any change of behaviour shows up as a reviewed diff.
//! Then parser tests and property tests of the rules' independence.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Datelike, NaiveDate, TimeDelta, Utc, Weekday};
use proptest::prelude::*;

use super::calendar::{resolve_zone, Period, PeriodKey, ZoneFallback};
use super::*;

const BERLIN: &str = "Europe/Berlin";
const NEW_YORK: &str = "America/New_York";
const UTC: &str = "UTC";

/// An RFC 3339 instant (local time with its offset, or `Z`).
fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s}: {e}"))
        .with_timezone(&Utc)
}

/// A snapshot of host `h1`, source `home`, no tags.
fn s(id: &str, time: &str, tz: &str) -> SnapshotInfo {
    SnapshotInfo {
        id: id.to_string(),
        time: t(time),
        time_zone: tz.to_string(),
        tags: Vec::new(),
        source: "home".to_string(),
        hostname: "h1".to_string(),
        paths: vec!["/home".to_string()],
    }
}

fn tagged(mut snap: SnapshotInfo, tags: &[&str]) -> SnapshotInfo {
    snap.tags = tags.iter().map(|t| t.to_string()).collect();
    snap
}

fn on(mut snap: SnapshotInfo, host: &str, source: &str) -> SnapshotInfo {
    snap.hostname = host.to_string();
    snap.source = source.to_string();
    snap
}

/// A policy from CLI-style options (exercising `set_option` too).
fn policy(options: &[(&str, &str)]) -> Policy {
    let mut p = Policy::default();
    for (name, value) in options {
        p.set_option(name, value)
            .unwrap_or_else(|e| panic!("{name} {value}: {e}"));
    }
    p
}

struct Case {
    name: &'static str,
    policy: Policy,
    now: &'static str,
    snapshots: Vec<SnapshotInfo>,
    /// `--group-by` value.
    group_by: &'static str,
    /// With one group: its explain lines. With `grouped`: `[key]` headers
    /// before each group's lines.
    expect: &'static [&'static str],
}

impl Default for Case {
    fn default() -> Self {
        Case {
            name: "",
            policy: Policy::default(),
            now: "2026-12-31T12:00:00Z",
            snapshots: Vec::new(),
            group_by: "host,source",
            expect: &[],
        }
    }
}

fn render(groups: &[Group], headers: bool) -> Vec<String> {
    let mut out = Vec::new();
    for g in groups {
        if headers {
            out.push(format!("[{}]", g.key));
        }
        out.extend(g.decisions.iter().map(Decision::explain));
    }
    out
}

fn check(cases: Vec<Case>, headers: bool) {
    let mut failures = String::new();
    for c in &cases {
        let group_by = GroupBy::parse_list(c.group_by).unwrap();
        let groups = match apply(&c.policy, &c.snapshots, t(c.now), &group_by) {
            Ok(g) => g,
            Err(e) => {
                failures += &format!("case {:?}: {e}\n", c.name);
                continue;
            }
        };
        if !headers && groups.len() != 1 {
            failures += &format!("case {:?}: {} groups, want 1\n", c.name, groups.len());
            continue;
        }
        let got = render(&groups, headers);
        if got != c.expect {
            failures += &format!(
                "case {:?}\n  want:\n    {}\n  got:\n    {}\n",
                c.name,
                c.expect.join("\n    "),
                got.join("\n    ")
            );
        }
    }
    assert!(failures.is_empty(), "\n{failures}");
}

#[test]
fn dst_europe_berlin() {
    check(
        vec![
            Case {
                name: "spring forward, daily: the 23-hour day 2026-03-29 is one day, \
                       local dates not UTC dates",
                policy: policy(&[("keep-daily", "10")]),
                now: "2026-03-31T12:00:00Z",
                snapshots: vec![
                    s("a", "2026-03-28T23:30:00+01:00", BERLIN),
                    s("b", "2026-03-29T00:10:00+01:00", BERLIN), // UTC date 03-28
                    s("c", "2026-03-29T01:50:00+01:00", BERLIN),
                    s("d", "2026-03-29T03:10:00+02:00", BERLIN), // just after the jump
                    s("e", "2026-03-29T23:50:00+02:00", BERLIN),
                    s("f", "2026-03-30T00:05:00+02:00", BERLIN), // UTC date 03-29
                ],
                expect: &[
                    "keep f: daily 2026-03-30",
                    "keep e: daily 2026-03-29",
                    "remove d: not matched by any rule",
                    "remove c: not matched by any rule",
                    "remove b: not matched by any rule",
                    "keep a: daily 2026-03-28",
                ],
                ..Case::default()
            },
            Case {
                name: "spring forward, hourly: 01:xx and 03:xx are consecutive hours",
                policy: policy(&[("keep-hourly", "10")]),
                now: "2026-03-29T12:00:00Z",
                snapshots: vec![
                    s("z", "2026-03-29T00:30:00+01:00", BERLIN),
                    s("a", "2026-03-29T01:20:00+01:00", BERLIN),
                    s("b", "2026-03-29T01:59:00+01:00", BERLIN),
                    s("c", "2026-03-29T03:00:00+02:00", BERLIN), // one minute after b
                    s("d", "2026-03-29T03:40:00+02:00", BERLIN),
                ],
                expect: &[
                    "keep d: hourly 2026-03-29T03+02:00",
                    "remove c: not matched by any rule",
                    "keep b: hourly 2026-03-29T01+01:00",
                    "remove a: not matched by any rule",
                    "keep z: hourly 2026-03-29T00+01:00",
                ],
                ..Case::default()
            },
            Case {
                name: "fall back, hourly: the repeated 02:00-03:00 is two hours",
                policy: policy(&[("keep-hourly", "10")]),
                now: "2026-10-25T12:00:00Z",
                snapshots: vec![
                    s("a", "2026-10-25T01:30:00+02:00", BERLIN),
                    s("b", "2026-10-25T02:10:00+02:00", BERLIN),
                    s("c", "2026-10-25T02:40:00+02:00", BERLIN),
                    s("d", "2026-10-25T02:10:00+01:00", BERLIN),
                    s("e", "2026-10-25T02:40:00+01:00", BERLIN),
                    s("f", "2026-10-25T03:20:00+01:00", BERLIN),
                ],
                expect: &[
                    "keep f: hourly 2026-10-25T03+01:00",
                    "keep e: hourly 2026-10-25T02+01:00",
                    "remove d: not matched by any rule",
                    "keep c: hourly 2026-10-25T02+02:00",
                    "remove b: not matched by any rule",
                    "keep a: hourly 2026-10-25T01+02:00",
                ],
                ..Case::default()
            },
            Case {
                name: "fall back, hourly: each repeated hour takes a slot",
                policy: policy(&[("keep-hourly", "3")]),
                now: "2026-10-25T12:00:00Z",
                snapshots: vec![
                    s("a", "2026-10-25T01:30:00+02:00", BERLIN),
                    s("c", "2026-10-25T02:40:00+02:00", BERLIN),
                    s("e", "2026-10-25T02:40:00+01:00", BERLIN),
                    s("f", "2026-10-25T03:20:00+01:00", BERLIN),
                ],
                expect: &[
                    "keep f: hourly 2026-10-25T03+01:00",
                    "keep e: hourly 2026-10-25T02+01:00",
                    "keep c: hourly 2026-10-25T02+02:00",
                    "remove a: not matched by any rule",
                ],
                ..Case::default()
            },
            Case {
                name: "fall back, daily: the 25-hour day 2026-10-25 is one day",
                policy: policy(&[("keep-daily", "10")]),
                now: "2026-10-27T12:00:00Z",
                snapshots: vec![
                    s("d", "2026-10-24T23:55:00+02:00", BERLIN),
                    s("a", "2026-10-25T00:05:00+02:00", BERLIN),
                    s("b", "2026-10-25T12:00:00+01:00", BERLIN),
                    s("c", "2026-10-25T23:55:00+01:00", BERLIN), // 24h50m after a
                    s("e", "2026-10-26T00:05:00+01:00", BERLIN),
                ],
                expect: &[
                    "keep e: daily 2026-10-26",
                    "keep c: daily 2026-10-25",
                    "remove b: not matched by any rule",
                    "remove a: not matched by any rule",
                    "keep d: daily 2026-10-24",
                ],
                ..Case::default()
            },
        ],
        false,
    );
}

#[test]
fn dst_america_new_york() {
    check(
        vec![
            Case {
                name: "spring forward, daily: 23-hour day, UTC dates would differ",
                policy: policy(&[("keep-daily", "10")]),
                now: "2026-03-10T12:00:00Z",
                snapshots: vec![
                    s("e", "2026-03-07T23:50:00-05:00", NEW_YORK), // UTC 03-08
                    s("a", "2026-03-08T00:10:00-05:00", NEW_YORK),
                    s("b", "2026-03-08T01:59:00-05:00", NEW_YORK),
                    s("c", "2026-03-08T03:01:00-04:00", NEW_YORK),
                    s("d", "2026-03-08T23:50:00-04:00", NEW_YORK), // UTC 03-09
                ],
                expect: &[
                    "keep d: daily 2026-03-08",
                    "remove c: not matched by any rule",
                    "remove b: not matched by any rule",
                    "remove a: not matched by any rule",
                    "keep e: daily 2026-03-07",
                ],
                ..Case::default()
            },
            Case {
                name: "spring forward, hourly: 02:xx does not exist",
                policy: policy(&[("keep-hourly", "10")]),
                now: "2026-03-08T12:00:00Z",
                snapshots: vec![
                    s("z", "2026-03-08T00:30:00-05:00", NEW_YORK),
                    s("a", "2026-03-08T01:10:00-05:00", NEW_YORK),
                    s("b", "2026-03-08T01:50:00-05:00", NEW_YORK),
                    s("c", "2026-03-08T03:10:00-04:00", NEW_YORK),
                    s("d", "2026-03-08T03:50:00-04:00", NEW_YORK),
                ],
                expect: &[
                    "keep d: hourly 2026-03-08T03-04:00",
                    "remove c: not matched by any rule",
                    "keep b: hourly 2026-03-08T01-05:00",
                    "remove a: not matched by any rule",
                    "keep z: hourly 2026-03-08T00-05:00",
                ],
                ..Case::default()
            },
            Case {
                name: "fall back, hourly: the repeated 01:00-02:00 is two hours",
                policy: policy(&[("keep-hourly", "10")]),
                now: "2026-11-01T12:00:00Z",
                snapshots: vec![
                    s("a", "2026-11-01T00:30:00-04:00", NEW_YORK),
                    s("b", "2026-11-01T01:15:00-04:00", NEW_YORK),
                    s("c", "2026-11-01T01:45:00-04:00", NEW_YORK),
                    s("d", "2026-11-01T01:15:00-05:00", NEW_YORK),
                    s("e", "2026-11-01T01:45:00-05:00", NEW_YORK),
                    s("f", "2026-11-01T02:30:00-05:00", NEW_YORK),
                ],
                expect: &[
                    "keep f: hourly 2026-11-01T02-05:00",
                    "keep e: hourly 2026-11-01T01-05:00",
                    "remove d: not matched by any rule",
                    "keep c: hourly 2026-11-01T01-04:00",
                    "remove b: not matched by any rule",
                    "keep a: hourly 2026-11-01T00-04:00",
                ],
                ..Case::default()
            },
            Case {
                name: "fall back, daily: the 25-hour day 2026-11-01 is one day",
                policy: policy(&[("keep-daily", "10")]),
                now: "2026-11-03T12:00:00Z",
                snapshots: vec![
                    s("c", "2026-10-31T23:55:00-04:00", NEW_YORK), // UTC 11-01
                    s("a", "2026-11-01T00:05:00-04:00", NEW_YORK),
                    s("b", "2026-11-01T23:55:00-05:00", NEW_YORK), // UTC 11-02
                    s("d", "2026-11-02T00:05:00-05:00", NEW_YORK),
                ],
                expect: &[
                    "keep d: daily 2026-11-02",
                    "keep b: daily 2026-11-01",
                    "remove a: not matched by any rule",
                    "keep c: daily 2026-10-31",
                ],
                ..Case::default()
            },
        ],
        false,
    );
}

#[test]
fn iso_weeks_across_year_boundaries() {
    check(
        vec![
            Case {
                name: "2020 has a W53 reaching into 2021; yearly uses the calendar year",
                policy: policy(&[("keep-weekly", "10"), ("keep-yearly", "10")]),
                now: "2021-01-10T12:00:00Z",
                snapshots: vec![
                    s("a", "2020-12-27T12:00:00Z", UTC), // Sunday
                    s("b", "2020-12-28T12:00:00Z", UTC), // Monday
                    s("c", "2020-12-31T12:00:00Z", UTC),
                    s("d", "2021-01-03T12:00:00Z", UTC), // Sunday
                    s("e", "2021-01-04T12:00:00Z", UTC), // Monday
                ],
                expect: &[
                    "keep e: weekly 2021-W01, yearly 2021",
                    "keep d: weekly 2020-W53",
                    "keep c: yearly 2020",
                    "remove b: not matched by any rule",
                    "keep a: weekly 2020-W52, yearly 2020 (oldest)",
                ],
                ..Case::default()
            },
            Case {
                name: "2024-12-30 and 2024-12-31 are in 2025-W01",
                policy: policy(&[("keep-weekly", "10"), ("keep-yearly", "10")]),
                now: "2025-01-10T12:00:00Z",
                snapshots: vec![
                    s("a", "2024-12-29T12:00:00Z", UTC), // Sunday
                    s("b", "2024-12-30T12:00:00Z", UTC),
                    s("c", "2024-12-31T12:00:00Z", UTC),
                    s("d", "2025-01-05T12:00:00Z", UTC), // Sunday
                    s("e", "2025-01-06T12:00:00Z", UTC), // Monday
                ],
                expect: &[
                    "keep e: weekly 2025-W02, yearly 2025",
                    "keep d: weekly 2025-W01",
                    "keep c: yearly 2024",
                    "remove b: not matched by any rule",
                    "keep a: weekly 2024-W52, yearly 2024 (oldest)",
                ],
                ..Case::default()
            },
            Case {
                name: "2026 has a W53; the week is taken in local time",
                policy: policy(&[("keep-weekly", "3")]),
                now: "2027-01-10T12:00:00Z",
                snapshots: vec![
                    s("a", "2026-12-27T12:00:00Z", UTC), // Sunday, W52
                    s("b", "2026-12-31T12:00:00Z", UTC),
                    s("c", "2027-01-03T12:00:00Z", UTC),
                    // Sunday 23:30 UTC is Monday 00:30 in Berlin: 2027-W01.
                    s("e", "2027-01-03T23:30:00Z", BERLIN),
                    s("d", "2027-01-04T12:00:00Z", UTC),
                ],
                expect: &[
                    "keep d: weekly 2027-W01",
                    "remove e: not matched by any rule",
                    "keep c: weekly 2026-W53",
                    "remove b: not matched by any rule",
                    "keep a: weekly 2026-W52",
                ],
                ..Case::default()
            },
        ],
        false,
    );
}

#[test]
fn leap_days_and_month_ends() {
    check(
        vec![
            Case {
                name: "29 Feb with keep-monthly and keep-yearly",
                policy: policy(&[("keep-monthly", "24"), ("keep-yearly", "10")]),
                now: "2025-03-15T12:00:00Z",
                snapshots: vec![
                    s("a", "2024-02-28T12:00:00Z", UTC),
                    s("b", "2024-02-29T12:00:00Z", UTC),
                    s("c", "2024-03-01T12:00:00Z", UTC),
                    s("d", "2024-12-31T12:00:00Z", UTC),
                    s("e", "2025-02-28T12:00:00Z", UTC),
                    s("f", "2025-03-01T12:00:00Z", UTC),
                ],
                expect: &[
                    "keep f: monthly 2025-03, yearly 2025",
                    "keep e: monthly 2025-02",
                    "keep d: monthly 2024-12, yearly 2024",
                    "keep c: monthly 2024-03",
                    "keep b: monthly 2024-02",
                    // Slots are left: the oldest snapshot is kept too (as restic).
                    "keep a: monthly 2024-02 (oldest), yearly 2024 (oldest)",
                ],
                ..Case::default()
            },
            Case {
                name: "29 Feb 23:30 UTC is 1 March in Berlin",
                policy: policy(&[("keep-monthly", "24")]),
                now: "2024-03-15T12:00:00Z",
                snapshots: vec![
                    s("a", "2024-02-28T12:00:00Z", BERLIN),
                    s("b", "2024-02-29T23:30:00Z", BERLIN),
                    s("c", "2024-03-01T12:00:00Z", BERLIN),
                ],
                expect: &[
                    "keep c: monthly 2024-03",
                    "remove b: not matched by any rule",
                    "keep a: monthly 2024-02",
                ],
                ..Case::default()
            },
            Case {
                name: "keep-within 1y from 29 Feb 2028 reaches back to 28 Feb 2027 (inclusive)",
                policy: policy(&[("keep-within", "1y")]),
                now: "2028-02-29T12:00:00Z",
                snapshots: vec![
                    s("a", "2027-02-28T11:59:59Z", UTC),
                    s("b", "2027-02-28T12:00:00Z", UTC),
                    s("c", "2027-03-01T00:00:00Z", UTC),
                ],
                expect: &[
                    "keep c: within 1y",
                    "keep b: within 1y",
                    "remove a: not matched by any rule",
                ],
                ..Case::default()
            },
            Case {
                name: "keep-within 1y from 28 Feb 2025 keeps 29 Feb 2024",
                policy: policy(&[("keep-within", "1y")]),
                now: "2025-02-28T12:00:00Z",
                snapshots: vec![
                    s("a", "2024-02-28T11:00:00Z", UTC),
                    s("b", "2024-02-29T00:00:00Z", UTC),
                ],
                expect: &["keep b: within 1y", "remove a: not matched by any rule"],
                ..Case::default()
            },
            Case {
                name: "month ends in local time: Jan 31 vs Feb 1 vs Feb 28 vs Mar 1",
                policy: policy(&[("keep-monthly", "10")]),
                now: "2026-03-15T12:00:00Z",
                snapshots: vec![
                    s("a", "2026-01-31T23:30:00+01:00", BERLIN),
                    s("b", "2026-02-01T00:30:00+01:00", BERLIN), // UTC Jan 31
                    s("c", "2026-02-28T23:59:00+01:00", BERLIN),
                    s("d", "2026-03-01T00:01:00+01:00", BERLIN), // UTC Feb 28
                ],
                expect: &[
                    "keep d: monthly 2026-03",
                    "keep c: monthly 2026-02",
                    "remove b: not matched by any rule",
                    "keep a: monthly 2026-01",
                ],
                ..Case::default()
            },
            Case {
                name: "keep-within 1m from 31 March clamps to 28 Feb",
                policy: policy(&[("keep-within", "1m")]),
                now: "2026-03-31T12:00:00Z",
                snapshots: vec![
                    s("a", "2026-02-28T11:59:00Z", UTC),
                    s("b", "2026-02-28T12:00:00Z", UTC),
                    s("c", "2026-03-03T00:00:00Z", UTC),
                ],
                expect: &[
                    "keep c: within 1m",
                    "keep b: within 1m",
                    "remove a: not matched by any rule",
                ],
                ..Case::default()
            },
        ],
        false,
    );
}

#[test]
fn future_dated_and_injected_snapshots() {
    check(
        vec![
            Case {
                name: "future-dated snapshots are kept, flagged, and take no slot",
                policy: policy(&[("keep-last", "2"), ("keep-daily", "2")]),
                now: "2026-06-01T12:00:00Z",
                snapshots: vec![
                    s("u", "2026-05-30T08:00:00Z", UTC),
                    s("v", "2026-05-31T08:00:00Z", UTC),
                    s("w", "2026-06-01T08:00:00Z", UTC),
                    // Exactly now + tolerance: not future-dated.
                    s("x", "2026-06-01T12:05:00Z", UTC),
                    s("y", "2026-06-01T12:05:01Z", UTC),
                    s("z", "2099-01-01T00:00:00Z", UTC),
                ],
                expect: &[
                    "keep z: future-dated: review",
                    "keep y: future-dated: review",
                    "keep x: last 1 of 2, daily 2026-06-01",
                    "keep w: last 2 of 2",
                    "keep v: daily 2026-05-31",
                    "remove u: not matched by any rule",
                ],
                ..Case::default()
            },
            Case {
                name: "a larger future tolerance treats near-future snapshots as current",
                policy: policy(&[("keep-last", "1"), ("future-tolerance", "1h")]),
                now: "2026-06-01T12:00:00Z",
                snapshots: vec![
                    s("w", "2026-06-01T08:00:00Z", UTC),
                    s("y", "2026-06-01T12:30:00Z", UTC),
                    s("z", "2026-06-01T13:00:01Z", UTC),
                ],
                expect: &[
                    "keep z: future-dated: review",
                    "keep y: last 1 of 1",
                    "remove w: not matched by any rule",
                ],
                ..Case::default()
            },
            Case {
                name: "injected 2099 snapshot: keep-within counts from now, so real \
                       snapshots stay (a window anchored at the newest snapshot \
                       would keep only the 2099 one)",
                policy: policy(&[("keep-last", "1"), ("keep-within", "30d")]),
                now: "2026-06-10T12:00:00Z",
                snapshots: vec![
                    s("d", "2026-04-01T00:00:00Z", UTC),
                    s("c", "2026-05-20T00:00:00Z", UTC),
                    s("b", "2026-06-05T00:00:00Z", UTC),
                    s("a", "2026-06-09T00:00:00Z", UTC),
                    tagged(s("evil", "2099-12-31T00:00:00Z", UTC), &["legal"]),
                ],
                expect: &[
                    "keep evil: future-dated: review",
                    "keep a: last 1 of 1, within 30d",
                    "keep b: within 30d",
                    "keep c: within 30d",
                    "remove d: not matched by any rule",
                ],
                ..Case::default()
            },
            Case {
                name: "injected snapshot cannot take a daily/yearly slot either",
                policy: policy(&[
                    ("keep-daily", "1"),
                    ("keep-yearly", "1"),
                    ("keep-tag", "legal"),
                ]),
                now: "2026-06-10T12:00:00Z",
                snapshots: vec![
                    s("a", "2026-06-09T00:00:00Z", UTC),
                    tagged(s("evil", "2099-12-31T00:00:00Z", UTC), &["legal"]),
                ],
                expect: &[
                    "keep evil: future-dated: review, tag legal",
                    "keep a: daily 2026-06-09, yearly 2026",
                ],
                ..Case::default()
            },
        ],
        false,
    );
}

#[test]
fn keep_last_tags_ties_and_combinations() {
    check(
        vec![
            Case {
                name: "keep-last 5 with only 3 snapshots keeps all 3",
                policy: policy(&[("keep-last", "5")]),
                snapshots: vec![
                    s("a", "2026-01-01T00:00:00Z", UTC),
                    s("b", "2026-01-02T00:00:00Z", UTC),
                    s("c", "2026-01-03T00:00:00Z", UTC),
                ],
                expect: &[
                    "keep c: last 1 of 5",
                    "keep b: last 2 of 5",
                    "keep a: last 3 of 5",
                ],
                ..Case::default()
            },
            Case {
                name: "keep-last unlimited",
                policy: policy(&[("keep-last", "unlimited")]),
                snapshots: vec![
                    s("a", "2026-01-01T00:00:00Z", UTC),
                    s("b", "2026-01-02T00:00:00Z", UTC),
                ],
                expect: &["keep b: last 1", "keep a: last 2"],
                ..Case::default()
            },
            Case {
                name: "keep-tag: exact, case-sensitive; reasons in policy tag order",
                policy: policy(&[
                    ("keep-last", "1"),
                    ("keep-tag", "legal"),
                    ("keep-tag", "audit"),
                ]),
                snapshots: vec![
                    tagged(s("f", "2026-01-01T00:00:00Z", UTC), &["audit", "legal"]),
                    tagged(s("e", "2026-01-02T00:00:00Z", UTC), &["x"]),
                    tagged(s("d", "2026-01-03T00:00:00Z", UTC), &["Legal"]),
                    tagged(s("c", "2026-01-04T00:00:00Z", UTC), &["daily", "legal"]),
                    tagged(s("b", "2026-01-05T00:00:00Z", UTC), &["legal"]),
                    s("a", "2026-01-06T00:00:00Z", UTC),
                ],
                expect: &[
                    "keep a: last 1 of 1",
                    "keep b: tag legal",
                    "keep c: tag legal",
                    "remove d: not matched by any rule",
                    "remove e: not matched by any rule",
                    "keep f: tag legal, tag audit",
                ],
                ..Case::default()
            },
            Case {
                name: "ties: identical times are ordered by id, the smaller id first",
                policy: policy(&[("keep-last", "1"), ("keep-daily", "2")]),
                snapshots: vec![
                    s("bbbb", "2026-05-01T10:00:00Z", UTC),
                    s("cccc", "2026-04-30T10:00:00Z", UTC),
                    s("aaaa", "2026-05-01T10:00:00Z", UTC),
                    s("0000", "2026-04-30T10:00:00Z", UTC),
                ],
                expect: &[
                    "keep aaaa: last 1 of 1, daily 2026-05-01",
                    "remove bbbb: not matched by any rule",
                    "keep 0000: daily 2026-04-30",
                    "remove cccc: not matched by any rule",
                ],
                ..Case::default()
            },
            Case {
                name: "all rules ORed, reasons in the documented order",
                policy: policy(&[
                    ("keep-tag", "x"),
                    ("--keep-within-daily", "1w"),
                    ("keep-within", "1d"),
                    ("keep-yearly", "1"),
                    ("keep-monthly", "1"),
                    ("keep-weekly", "1"),
                    ("keep-daily", "1"),
                    ("keep-hourly", "1"),
                    ("--keep-last", "1"),
                ]),
                now: "2026-11-21T12:00:00Z",
                snapshots: vec![
                    tagged(s("1a2b3c4d5e6f", "2026-11-21T10:15:00Z", BERLIN), &["x"]),
                    s("9f8e7d6c5b4a", "2026-11-20T10:00:00Z", BERLIN),
                    s("77777777", "2026-11-01T10:00:00Z", BERLIN),
                ],
                expect: &[
                    "keep 1a2b3c4d: last 1 of 1, hourly 2026-11-21T11+01:00, \
                     daily 2026-11-21, weekly 2026-W47, monthly 2026-11, yearly 2026, \
                     within 1d, daily 2026-11-21 within 1w, tag x",
                    "keep 9f8e7d6c: daily 2026-11-20 within 1w",
                    "remove 77777777: not matched by any rule",
                ],
                ..Case::default()
            },
            Case {
                name: "slots left: the oldest snapshot is kept too (restic's rule), \
                       taking a slot",
                policy: policy(&[("keep-daily", "3")]),
                now: "2026-05-03T12:00:00Z",
                snapshots: vec![
                    s("a", "2026-05-01T08:00:00Z", UTC),
                    s("b", "2026-05-01T09:00:00Z", UTC),
                    s("c", "2026-05-01T10:00:00Z", UTC),
                    s("d", "2026-05-02T10:00:00Z", UTC),
                ],
                expect: &[
                    "keep d: daily 2026-05-02",
                    "keep c: daily 2026-05-01",
                    "remove b: not matched by any rule",
                    "keep a: daily 2026-05-01 (oldest)",
                ],
                ..Case::default()
            },
            Case {
                name: "no slots left: the oldest goes",
                policy: policy(&[("keep-daily", "2")]),
                now: "2026-05-03T12:00:00Z",
                snapshots: vec![
                    s("a", "2026-05-01T08:00:00Z", UTC),
                    s("c", "2026-05-01T10:00:00Z", UTC),
                    s("d", "2026-05-02T10:00:00Z", UTC),
                ],
                expect: &[
                    "keep d: daily 2026-05-02",
                    "keep c: daily 2026-05-01",
                    "remove a: not matched by any rule",
                ],
                ..Case::default()
            },
            Case {
                name: "keep-within-weekly: newest of each ISO week inside the window",
                policy: policy(&[("keep-within-weekly", "3w")]),
                now: "2026-11-21T12:00:00Z", // Saturday of W47
                snapshots: vec![
                    s("a", "2026-10-30T12:00:00Z", UTC), // W44, before the window
                    s("b", "2026-11-01T12:00:00Z", UTC), // W44, inside
                    s("c", "2026-11-02T12:00:00Z", UTC), // W45
                    s("d", "2026-11-06T12:00:00Z", UTC), // W45
                    s("e", "2026-11-21T11:00:00Z", UTC), // W47
                ],
                expect: &[
                    "keep e: weekly 2026-W47 within 3w",
                    "keep d: weekly 2026-W45 within 3w",
                    "remove c: not matched by any rule",
                    "keep b: weekly 2026-W44 within 3w",
                    "remove a: not matched by any rule",
                ],
                ..Case::default()
            },
        ],
        false,
    );
}

#[test]
fn time_zone_fallbacks_and_mixed_zones() {
    check(
        vec![
            Case {
                name: "empty and unknown zones fall back to UTC and say so",
                policy: policy(&[("keep-daily", "5")]),
                now: "2026-11-22T12:00:00Z",
                snapshots: vec![
                    s("a", "2026-11-21T23:30:00Z", ""),
                    s("b", "2026-11-20T23:30:00Z", "Mars/Base"),
                    s("c", "2026-11-19T12:00:00Z", BERLIN),
                ],
                expect: &[
                    "keep a: daily 2026-11-21 (no time zone recorded, periods computed in UTC)",
                    "keep b: daily 2026-11-20 (unknown time zone \"Mars/Base\", periods computed in UTC)",
                    "keep c: daily 2026-11-19",
                ],
                ..Case::default()
            },
            Case {
                name: "no fallback note when no rule uses calendar periods",
                policy: policy(&[("keep-last", "1")]),
                snapshots: vec![s("a", "2026-11-21T23:30:00Z", "")],
                expect: &["keep a: last 1 of 1"],
                ..Case::default()
            },
            Case {
                name: "a host that moved zones: one label is one period, whatever the zone",
                policy: policy(&[("keep-daily", "5")]),
                now: "2026-11-22T12:00:00Z",
                snapshots: vec![
                    // 2026-11-20 18:45 in New York.
                    s("ny", "2026-11-20T23:45:00Z", NEW_YORK),
                    // 2026-11-21 00:30 in Berlin.
                    s("berlin1", "2026-11-20T23:30:00Z", BERLIN),
                    // 2026-11-20 12:00 in Berlin.
                    s("berlin2", "2026-11-20T11:00:00Z", BERLIN),
                    s("berlin3", "2026-11-18T11:00:00Z", BERLIN),
                ],
                expect: &[
                    "keep ny: daily 2026-11-20",
                    "keep berlin1: daily 2026-11-21",
                    "remove berlin2: not matched by any rule",
                    "keep berlin3: daily 2026-11-18",
                ],
                ..Case::default()
            },
        ],
        false,
    );
}

#[test]
fn grouping() {
    let mixed = || {
        vec![
            on(s("a1", "2026-01-01T00:00:00Z", UTC), "h1", "home"),
            on(s("a2", "2026-01-02T00:00:00Z", UTC), "h1", "home"),
            on(
                tagged(s("b1", "2026-01-03T00:00:00Z", UTC), &["b", "a"]),
                "h1",
                "mail",
            ),
            on(
                tagged(s("b2", "2026-01-01T00:00:00Z", UTC), &["a", "b", "a"]),
                "h2",
                "home",
            ),
            on(s("c1", "2026-01-04T00:00:00Z", UTC), "h2", "home"),
        ]
    };
    check(
        vec![
            Case {
                name: "default: host and source",
                policy: policy(&[("keep-last", "1")]),
                snapshots: mixed(),
                group_by: "host,source",
                expect: &[
                    "[host h1, source home]",
                    "keep a2: last 1 of 1",
                    "remove a1: not matched by any rule",
                    "[host h1, source mail]",
                    "keep b1: last 1 of 1",
                    "[host h2, source home]",
                    "keep c1: last 1 of 1",
                    "remove b2: not matched by any rule",
                ],
                ..Case::default()
            },
            Case {
                name: "by source only",
                policy: policy(&[("keep-last", "1")]),
                snapshots: mixed(),
                group_by: "source",
                expect: &[
                    "[source home]",
                    "keep c1: last 1 of 1",
                    "remove a2: not matched by any rule",
                    "remove a1: not matched by any rule",
                    "remove b2: not matched by any rule",
                    "[source mail]",
                    "keep b1: last 1 of 1",
                ],
                ..Case::default()
            },
            Case {
                name: "by source and tags: tag order and repeats do not matter",
                policy: policy(&[("keep-last", "1")]),
                snapshots: mixed(),
                group_by: "tags,source",
                expect: &[
                    "[source home, tags []]",
                    "keep c1: last 1 of 1",
                    "remove a2: not matched by any rule",
                    "remove a1: not matched by any rule",
                    "[source home, tags [a, b]]",
                    "keep b2: last 1 of 1",
                    "[source mail, tags [a, b]]",
                    "keep b1: last 1 of 1",
                ],
                ..Case::default()
            },
            Case {
                name: "by tags",
                policy: policy(&[("keep-last", "1")]),
                snapshots: mixed(),
                group_by: "tags",
                expect: &[
                    "[tags []]",
                    "keep c1: last 1 of 1",
                    "remove a2: not matched by any rule",
                    "remove a1: not matched by any rule",
                    "[tags [a, b]]",
                    "keep b1: last 1 of 1",
                    "remove b2: not matched by any rule",
                ],
                ..Case::default()
            },
            Case {
                name: "no grouping",
                policy: policy(&[("keep-last", "2")]),
                snapshots: mixed(),
                group_by: "",
                expect: &[
                    "[all snapshots]",
                    "keep c1: last 1 of 2",
                    "keep b1: last 2 of 2",
                    "remove a2: not matched by any rule",
                    "remove a1: not matched by any rule",
                    "remove b2: not matched by any rule",
                ],
                ..Case::default()
            },
        ],
        true,
    );
}

#[test]
fn empty_policy_is_refused() {
    let now = t("2026-01-01T00:00:00Z");
    let snaps = vec![s("a", "2025-12-31T00:00:00Z", UTC)];
    let empties: Vec<(&str, Policy)> = vec![
        ("default", Policy::default()),
        (
            "all zero counts",
            policy(&[
                ("keep-last", "0"),
                ("keep-daily", "0"),
                ("keep-yearly", "0"),
            ]),
        ),
        (
            "only a future tolerance",
            policy(&[("future-tolerance", "10min")]),
        ),
        (
            "zero windows (built directly)",
            Policy {
                keep_within: Some(CalendarDuration::default()),
                keep_within_daily: Some(CalendarDuration::default()),
                ..Policy::default()
            },
        ),
    ];
    for (name, p) in empties {
        assert!(p.is_empty(), "{name}");
        assert_eq!(p.validate(), Err(RetentionError::Empty), "{name}");
        assert_eq!(
            apply(&p, &snaps, now, GroupBy::DEFAULT),
            Err(RetentionError::Empty),
            "{name}"
        );
        assert_eq!(
            apply(&p, &[], now, GroupBy::DEFAULT),
            Err(RetentionError::Empty),
            "{name}"
        );
    }
    assert!(RetentionError::Empty
        .to_string()
        .starts_with("refusing to forget"));

    for (name, p) in [
        ("keep-last 1", policy(&[("keep-last", "1")])),
        ("keep-tag only", policy(&[("keep-tag", "legal")])),
        (
            "keep-within-yearly",
            policy(&[("keep-within-yearly", "10y")]),
        ),
    ] {
        assert!(!p.is_empty(), "{name}");
        assert_eq!(p.validate(), Ok(()), "{name}");
    }
}

#[test]
fn a_group_that_keeps_nothing_is_reported() {
    // Backups stopped two months ago; keep-within 30d alone keeps nothing.
    let p = policy(&[("keep-within", "30d")]);
    let snaps = vec![
        s("a", "2026-03-01T00:00:00Z", UTC),
        on(s("b", "2026-04-30T00:00:00Z", UTC), "h2", "home"),
    ];
    let groups = apply(&p, &snaps, t("2026-05-15T00:00:00Z"), GroupBy::DEFAULT).unwrap();
    let flags: Vec<(String, bool)> = groups
        .iter()
        .map(|g| (g.key.to_string(), g.keeps_nothing()))
        .collect();
    assert_eq!(
        flags,
        vec![
            ("host h1, source home".to_string(), true),
            ("host h2, source home".to_string(), false),
        ]
    );
    assert_eq!(groups[0].removed().count(), 1);
    assert_eq!(groups[1].kept().count(), 1);
}

#[test]
fn invalid_inputs_are_refused() {
    let now = t("2026-01-01T00:00:00Z");
    let p = policy(&[("keep-last", "1")]);
    let dup = vec![
        s("a", "2025-12-31T00:00:00Z", UTC),
        s("a", "2025-12-30T00:00:00Z", UTC),
    ];
    assert_eq!(
        apply(&p, &dup, now, &[]),
        Err(RetentionError::DuplicateId("a".into()))
    );

    let empty_tag = Policy {
        keep_tags: vec![String::new()],
        ..Policy::default()
    };
    assert_eq!(empty_tag.validate(), Err(RetentionError::EmptyTag));
    let wide = Policy {
        future_tolerance: StdDuration::from_secs(2 * 86_400),
        ..p.clone()
    };
    assert!(matches!(
        wide.validate(),
        Err(RetentionError::InvalidTolerance { .. })
    ));
}

#[test]
fn calendar_duration_parsing() {
    let ok = [
        ("30d", "30d", (0, 0, 0, 30, 0)),
        ("2y6m", "2y6m", (2, 6, 0, 0, 0)),
        ("6m2y", "2y6m", (2, 6, 0, 0, 0)),
        ("1w3d12h", "1w3d12h", (0, 0, 1, 3, 12)),
        (" 36h ", "36h", (0, 0, 0, 0, 36)),
        ("0y1d", "1d", (0, 0, 0, 1, 0)),
    ];
    for (text, shown, (years, months, weeks, days, hours)) in ok {
        let d: CalendarDuration = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(
            d,
            CalendarDuration {
                years,
                months,
                weeks,
                days,
                hours
            },
            "{text}"
        );
        assert_eq!(d.to_string(), shown, "{text}");
    }
    let bad = [
        ("", "empty"),
        ("30", "30 has no unit"),
        ("30 d", "30 has no unit"),
        ("d", "a number must come before \"d\""),
        ("5min", "unknown unit \"min\""),
        ("1M", "unknown unit \"M\""),
        ("1s", "unknown unit \"s\""),
        ("1d1d", "unit \"d\" given twice"),
        ("0d", "must be longer than zero"),
        ("-1d", "unexpected '-'"),
        ("1.5d", "1 has no unit"),
        ("99999999999d", "99999999999 is too large"),
    ];
    for (text, why) in bad {
        match text.parse::<CalendarDuration>() {
            Err(RetentionError::InvalidDuration { why: got, .. }) => assert_eq!(got, why, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
    // Windows: calendar months clamp, days are 24 h, huge windows saturate.
    let now = t("2026-03-31T12:00:00Z");
    let start = |d: &str| d.parse::<CalendarDuration>().unwrap().window_start(now);
    assert_eq!(start("1m"), t("2026-02-28T12:00:00Z"));
    assert_eq!(start("1y1m"), t("2025-02-28T12:00:00Z"));
    assert_eq!(start("1w1d1h"), t("2026-03-23T11:00:00Z"));
    assert_eq!(start("4000000000y"), DateTime::<Utc>::MIN_UTC);
}

#[test]
fn option_and_count_parsing() {
    assert_eq!(parse_count("7"), Ok(7));
    assert_eq!(parse_count("0"), Ok(0));
    assert_eq!(parse_count("unlimited"), Ok(UNLIMITED));
    assert_eq!(parse_count("-1"), Ok(UNLIMITED));
    for bad in ["-2", "x", "", "1.5"] {
        assert!(parse_count(bad).is_err(), "{bad}");
    }
    assert_eq!(
        parse_future_tolerance("5min"),
        Ok(StdDuration::from_secs(300))
    );
    assert!(parse_future_tolerance("2days").is_err());
    assert!(parse_future_tolerance("soon").is_err());

    let mut p = Policy::default();
    assert_eq!(
        p.set_option("keep-fortnightly", "1"),
        Err(RetentionError::UnknownOption("keep-fortnightly".into()))
    );
    assert_eq!(
        p.set_option("--keep-daily", "seven")
            .unwrap_err()
            .to_string(),
        "--keep-daily: \"seven\" is not a count (give a whole number, or `unlimited`)"
    );
    assert_eq!(
        p.set_option("keep-within", "6x").unwrap_err().to_string(),
        "--keep-within: \"6x\" is not a duration: unknown unit \"x\" \
         (use y, m, w, d, h as in 30d or 2y6m; m means months)"
    );
    assert!(p.set_option("keep-tag", " ").is_err());
    p.set_option("keep-tag", "legal").unwrap();
    p.set_option("keep-tag", "legal").unwrap();
    assert_eq!(p.keep_tags, vec!["legal".to_string()]);

    let full = policy(&[
        ("keep-last", "3"),
        ("keep-hourly", "24"),
        ("keep-daily", "7"),
        ("keep-weekly", "4"),
        ("keep-monthly", "12"),
        ("keep-yearly", "unlimited"),
        ("keep-within", "30d"),
        ("keep-within-hourly", "2d"),
        ("keep-within-daily", "1m"),
        ("keep-within-weekly", "6m"),
        ("keep-within-monthly", "2y"),
        ("keep-within-yearly", "10y"),
        ("keep-tag", "legal"),
        ("future-tolerance", "10min"),
    ]);
    assert_eq!(
        full.to_string(),
        "last 3, hourly 24, daily 7, weekly 4, monthly 12, yearly unlimited, within 30d, \
         hourly within 2d, daily within 1m, weekly within 6m, monthly within 2y, \
         yearly within 10y, tag legal"
    );
    assert_eq!(Policy::default().to_string(), "nothing");

    // Serde: the policy round-trips, durations as strings.
    let json = serde_json::to_value(&full).unwrap();
    assert_eq!(json["keep_within"], "30d");
    assert_eq!(json["future_tolerance"], "10m");
    let back: Policy = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(back, full);
    let partial: Policy = serde_json::from_str(r#"{"keep_daily": 7}"#).unwrap();
    assert_eq!(partial.keep_daily, Some(7));
    assert_eq!(partial.future_tolerance, DEFAULT_FUTURE_TOLERANCE);
    assert!(serde_json::from_str::<Policy>(r#"{"keep_dayly": 7}"#).is_err());
    assert_eq!(json["keep_yearly"], "unlimited");
    assert_eq!(json["keep_daily"], 7);
    let counts: Policy = serde_json::from_str(
        r#"{"keep_yearly": "unlimited", "keep_monthly": -1, "keep_last": null}"#,
    )
    .unwrap();
    assert_eq!(counts.keep_yearly, Some(UNLIMITED));
    assert_eq!(counts.keep_monthly, Some(UNLIMITED));
    assert_eq!(counts.keep_last, None);
    assert!(serde_json::from_str::<Policy>(r#"{"keep_daily": -2}"#).is_err());
    assert!(serde_json::from_str::<Policy>(r#"{"keep_daily": "many"}"#).is_err());
    let sparse = serde_json::to_value(&partial).unwrap();
    assert_eq!(
        sparse,
        serde_json::json!({"keep_daily": 7, "keep_tags": [], "future_tolerance": "5m"})
    );
    assert!(serde_json::from_str::<Policy>(r#"{"keep_within": "5min"}"#).is_err());
}

#[test]
fn group_by_parsing() {
    use GroupBy::*;
    let ok: [(&str, &[GroupBy]); 5] = [
        ("host,source", &[Host, Source]),
        ("source, tags", &[Source, Tags]),
        ("hostname,paths", &[Host, Paths]),
        ("tags", &[Tags]),
        ("", &[]),
    ];
    for (text, want) in ok {
        assert_eq!(GroupBy::parse_list(text).as_deref(), Ok(want), "{text}");
    }
    assert_eq!(
        GroupBy::parse_list("source,bogus"),
        Err(RetentionError::UnknownGroupBy("bogus".into()))
    );
    assert_eq!(
        GroupBy::parse_list("host,hostname"),
        Err(RetentionError::DuplicateGroupBy("hostname".into()))
    );
    assert_eq!(GroupBy::DEFAULT, &[Host, Source]);

    let snap = tagged(s("a", "2026-01-01T00:00:00Z", UTC), &["z", "a", "z"]);
    let key = GroupKey::of(&snap, &[Paths, Tags]);
    assert_eq!(key.to_string(), "tags [a, z], paths [/home]");
}

#[test]
fn decisions_serialize_for_json_output() {
    let p = policy(&[("keep-daily", "1"), ("keep-tag", "legal")]);
    let snaps = vec![tagged(
        s("a", "2026-11-21T10:00:00Z", "Mars/Base"),
        &["legal"],
    )];
    let groups = apply(&p, &snaps, t("2026-11-22T00:00:00Z"), GroupBy::DEFAULT).unwrap();
    let json = serde_json::to_value(&groups).unwrap();
    assert_eq!(
        json,
        serde_json::json!([{
            "key": {"host": "h1", "source": "home", "tags": null, "paths": null},
            "decisions": [{
                "id": "a",
                "time": "2026-11-21T10:00:00Z",
                "keep": true,
                "reasons": [
                    {"rule": "period", "period": "day", "key": "2026-11-21", "oldest": false},
                    {"rule": "tag", "tag": "legal"}
                ],
                "zone_fallback": {"warning": "unknown", "name": "Mars/Base"}
            }]
        }])
    );
}

/// Calendar facts the cases above rely on, checked against chrono.
#[test]
fn calendar_facts() {
    let weeks_in = |y: i32| {
        NaiveDate::from_ymd_opt(y, 12, 28)
            .unwrap()
            .iso_week()
            .week()
    };
    assert_eq!(weeks_in(2020), 53);
    assert_eq!(weeks_in(2024), 52);
    assert_eq!(weeks_in(2025), 52);
    assert_eq!(weeks_in(2026), 53);
    assert_eq!(weeks_in(2032), 53);
    let week = |d: &str| {
        let key = PeriodKey::of(Period::Week, t(d), chrono_tz::UTC);
        key.to_string()
    };
    assert_eq!(week("2024-12-31T00:00:00Z"), "2025-W01");
    assert_eq!(week("2021-01-03T00:00:00Z"), "2020-W53");
    assert_eq!(week("2027-01-03T00:00:00Z"), "2026-W53");
    assert_eq!(week("2026-11-21T00:00:00Z"), "2026-W47");
    assert_eq!(
        NaiveDate::from_ymd_opt(2026, 11, 21).unwrap().weekday(),
        Weekday::Sat
    );

    // DST transitions used above (UTC instants of the switch).
    let berlin: chrono_tz::Tz = BERLIN.parse().unwrap();
    let ny: chrono_tz::Tz = NEW_YORK.parse().unwrap();
    let offset = |tz: chrono_tz::Tz, at: &str| match PeriodKey::of(Period::Hour, t(at), tz) {
        PeriodKey::Hour {
            utc_offset_seconds, ..
        } => utc_offset_seconds / 3600,
        _ => unreachable!(),
    };
    assert_eq!(offset(berlin, "2026-03-29T00:59:59Z"), 1);
    assert_eq!(offset(berlin, "2026-03-29T01:00:00Z"), 2);
    assert_eq!(offset(berlin, "2026-10-25T00:59:59Z"), 2);
    assert_eq!(offset(berlin, "2026-10-25T01:00:00Z"), 1);
    assert_eq!(offset(ny, "2026-03-08T06:59:59Z"), -5);
    assert_eq!(offset(ny, "2026-03-08T07:00:00Z"), -4);
    assert_eq!(offset(ny, "2026-11-01T05:59:59Z"), -4);
    assert_eq!(offset(ny, "2026-11-01T06:00:00Z"), -5);

    // Half-hour offsets label the local hour, not the UTC hour.
    let kolkata: chrono_tz::Tz = "Asia/Kolkata".parse().unwrap();
    assert_eq!(
        PeriodKey::of(Period::Hour, t("2026-01-01T00:45:00Z"), kolkata).to_string(),
        "2026-01-01T06+05:30"
    );
    assert_eq!(resolve_zone(""), Err(ZoneFallback::Empty));
    assert!(resolve_zone("Europe/Berlin").is_ok());
}

// ---------------------------------------------------------------------------
// Properties

const ZONES: [&str; 6] = [UTC, BERLIN, NEW_YORK, "Asia/Kolkata", "", "Mars/Base"];
const TAGS: [&str; 3] = ["legal", "audit", "x"];

fn prop_now() -> DateTime<Utc> {
    t("2026-11-21T12:00:00Z")
}

/// Up to 60 snapshots over ~4 years before `prop_now` and two days after it,
/// many on whole hours (so ties and shared periods are common).
fn snapshots_strategy() -> impl Strategy<Value = Vec<SnapshotInfo>> {
    let one = (
        -2_000_000i64..3_000,
        any::<bool>(),
        0..ZONES.len(),
        prop::collection::vec(0..TAGS.len(), 0..3),
        0..2usize,
    );
    prop::collection::vec(one, 0..60).prop_map(|items| {
        items
            .into_iter()
            .enumerate()
            .map(|(i, (minutes, round, zone, tags, host))| {
                let minutes = if round {
                    minutes - minutes.rem_euclid(60)
                } else {
                    minutes
                };
                SnapshotInfo {
                    id: format!("{i:04x}"),
                    time: prop_now() + TimeDelta::minutes(minutes),
                    time_zone: ZONES[zone].to_string(),
                    tags: tags.into_iter().map(|t| TAGS[t].to_string()).collect(),
                    source: "home".into(),
                    hostname: format!("h{host}"),
                    paths: Vec::new(),
                }
            })
            .collect()
    })
}

fn duration_strategy() -> impl Strategy<Value = Option<CalendarDuration>> {
    prop::option::of((0u32..3, 0u32..14, 0u32..400, 0u32..48).prop_map(
        |(years, months, days, hours)| CalendarDuration {
            years,
            months,
            weeks: 0,
            days,
            hours,
        },
    ))
}

fn policy_strategy() -> impl Strategy<Value = Policy> {
    let count = || prop::option::of(0u32..8);
    (
        (count(), count(), count(), count(), count(), count()),
        (
            duration_strategy(),
            duration_strategy(),
            duration_strategy(),
        ),
        prop::collection::vec(0..TAGS.len(), 0..3),
    )
        .prop_map(
            |((last, hourly, daily, weekly, monthly, yearly), (within, wd, wm), tags)| {
                let mut keep_tags: Vec<String> = Vec::new();
                for t in tags {
                    if !keep_tags.iter().any(|k| k == TAGS[t]) {
                        keep_tags.push(TAGS[t].to_string());
                    }
                }
                Policy {
                    keep_last: last,
                    keep_hourly: hourly,
                    keep_daily: daily,
                    keep_weekly: weekly,
                    keep_monthly: monthly,
                    keep_yearly: yearly,
                    keep_within: within,
                    keep_within_daily: wd,
                    keep_within_monthly: wm,
                    keep_tags,
                    ..Policy::default()
                }
            },
        )
}

/// Each rule of `p` alone.
fn single_rules(p: &Policy) -> Vec<Policy> {
    let base = Policy {
        future_tolerance: p.future_tolerance,
        ..Policy::default()
    };
    let mut out = vec![
        Policy {
            keep_last: p.keep_last,
            ..base.clone()
        },
        Policy {
            keep_within: p.keep_within,
            ..base.clone()
        },
    ];
    for period in Period::ALL {
        let mut q = base.clone();
        *q.count_mut(period) = p.count(period);
        out.push(q);
        let mut q = base.clone();
        *q.within_mut(period) = p.within(period);
        out.push(q);
    }
    for tag in &p.keep_tags {
        out.push(Policy {
            keep_tags: vec![tag.clone()],
            ..base.clone()
        });
    }
    out.retain(|q| !q.is_empty());
    out
}

fn by_id(groups: &[Group]) -> HashMap<String, Decision> {
    groups
        .iter()
        .flat_map(|g| g.decisions.iter().cloned())
        .map(|d| (d.id.clone(), d))
        .collect()
}

fn is_future(p: &Policy, s: &SnapshotInfo) -> bool {
    s.time > prop_now() + TimeDelta::from_std(p.future_tolerance).unwrap()
}

proptest! {
    /// Rules are ORed and independent: a snapshot's reasons under the full
    /// policy are exactly the union of its reasons under each rule alone,
    /// so everything a single rule keeps, the combination keeps.
    #[test]
    fn combination_is_the_union_of_single_rules(
        snaps in snapshots_strategy(),
        p in policy_strategy(),
    ) {
        prop_assume!(!p.is_empty());
        for group_by in [GroupBy::DEFAULT, &[][..]] {
            let all = by_id(&apply(&p, &snaps, prop_now(), group_by).unwrap());
            let mut union: HashMap<String, BTreeSet<String>> = HashMap::new();
            for q in single_rules(&p) {
                for (id, d) in by_id(&apply(&q, &snaps, prop_now(), group_by).unwrap()) {
                    if d.keep {
                        prop_assert!(all[&id].keep, "{id} kept by {q} alone, not by {p}");
                    }
                    union.entry(id).or_default().extend(d.reasons.iter().map(ToString::to_string));
                }
            }
            for (id, d) in &all {
                let got: BTreeSet<String> = d.reasons.iter().map(ToString::to_string).collect();
                prop_assert_eq!(&got, &union[id], "{}", id);
                prop_assert_eq!(d.keep, !d.reasons.is_empty());
            }
        }
    }

    /// keep-last N keeps exactly min(N, non-future) snapshots by that rule,
    /// the newest ones, plus every future-dated one.
    #[test]
    fn keep_last_keeps_min_n_count(snaps in snapshots_strategy(), n in 1u32..70) {
        let p = Policy { keep_last: Some(n), ..Policy::default() };
        let groups = apply(&p, &snaps, prop_now(), &[]).unwrap();
        let decisions = &groups.first().map(|g| g.decisions.clone()).unwrap_or_default();
        let future = snaps.iter().filter(|s| is_future(&p, s)).count();
        let current = snaps.len() - future;
        let by_last: Vec<&Decision> = decisions
            .iter()
            .filter(|d| d.reasons.iter().any(|r| matches!(r, Reason::Last { .. })))
            .collect();
        prop_assert_eq!(by_last.len(), current.min(n as usize));
        prop_assert_eq!(decisions.iter().filter(|d| d.keep).count(), current.min(n as usize) + future);
        // The kept ones are the newest non-future ones.
        let oldest_kept = by_last.iter().map(|d| d.time).min();
        for d in decisions.iter().filter(|d| !d.keep) {
            prop_assert!(oldest_kept.is_some_and(|t| d.time <= t));
        }
    }

    /// Periodic rules against a brute-force oracle: the newest non-future
    /// snapshot of each of the N most recent labels that have one.
    #[test]
    fn periodic_rules_match_oracle(snaps in snapshots_strategy(), n in 1u32..10, pi in 0..5usize) {
        let period = Period::ALL[pi];
        let mut p = Policy::default();
        *p.count_mut(period) = Some(n);
        let got: BTreeSet<String> = apply(&p, &snaps, prop_now(), &[])
            .unwrap()
            .iter()
            .flat_map(|g| g.decisions.iter())
            .filter(|d| d.reasons.iter().any(|r| matches!(r, Reason::Period { .. })))
            .map(|d| d.id.clone())
            .collect();
        let mut current: Vec<&SnapshotInfo> = snaps.iter().filter(|s| !is_future(&p, s)).collect();
        current.sort_by(|a, b| b.time.cmp(&a.time).then(a.id.cmp(&b.id)));
        let mut labels: Vec<String> = Vec::new();
        let mut want = BTreeSet::new();
        let oldest = current.last().map(|s| s.id.clone());
        for s in current {
            let zone = resolve_zone(&s.time_zone).unwrap_or(chrono_tz::UTC);
            let label = PeriodKey::of(period, s.time, zone).to_string();
            if !labels.contains(&label) {
                labels.push(label);
                if labels.len() <= n as usize {
                    want.insert(s.id.clone());
                }
            }
        }
        // Slots left: the oldest is kept too.
        if labels.len() < n as usize {
            want.extend(oldest);
        }
        prop_assert_eq!(got, want);
    }

    /// Adding future-dated snapshots (an attacker's or a broken clock's)
    /// changes no decision about the others, and the input order changes
    /// nothing at all.
    #[test]
    fn future_snapshots_evict_nothing_and_order_is_irrelevant(
        snaps in snapshots_strategy(),
        p in policy_strategy(),
        injected in prop::collection::vec((1i64..100_000_000, 0..TAGS.len()), 1..5),
    ) {
        prop_assume!(!p.is_empty());
        let base = apply(&p, &snaps, prop_now(), GroupBy::DEFAULT).unwrap();
        let mut more = snaps.clone();
        for (i, (minutes, tag)) in injected.into_iter().enumerate() {
            let mut snap = snaps.first().cloned().unwrap_or_else(|| s("x", "2026-01-01T00:00:00Z", UTC));
            snap.id = format!("future{i}");
            snap.time = prop_now() + TimeDelta::minutes(10 + minutes);
            snap.tags = vec![TAGS[tag].to_string()];
            more.push(snap);
        }
        let with = by_id(&apply(&p, &more, prop_now(), GroupBy::DEFAULT).unwrap());
        for (id, d) in by_id(&base) {
            prop_assert_eq!(&with[&id], &d);
        }
        for (id, d) in &with {
            if id.starts_with("future") {
                prop_assert!(d.keep);
                prop_assert_eq!(&d.reasons[0], &Reason::FutureDated);
            }
        }
        let mut shuffled = snaps.clone();
        shuffled.reverse();
        let half = shuffled.len() / 2;
        shuffled.rotate_left(half);
        prop_assert_eq!(apply(&p, &shuffled, prop_now(), GroupBy::DEFAULT).unwrap(), base);
    }
}
