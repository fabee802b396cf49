//! Cron job specs for `custos daemon`, as pure functions with the clock passed in.
//!
//! # Accepted forms
//!
//! - 5 fields, standard cron: `minute hour day-of-month month day-of-week`
//!   (`0 2 * * *`: every day at 02:00). It runs at second 0 of each matching
//!   minute.
//! - 6 fields, with seconds first: `second minute hour day-of-month month
//!   day-of-week` (`*/1 * * * * *`: every second; `30 0 2 * * *`: 02:00:30).
//!
//! Fields take `*`, numbers, ranges `a-b`, lists `a,b`, steps `*/n` and `a-b/n`,
//! month names `JAN`–`DEC` and day names `SUN`–`SAT` (0 and 7 are Sunday), plus
//! croner's `L` (last), `W` (nearest weekday) and `#` (nth weekday). Anything
//! else — 4 or 7 fields, `@daily`-style nicknames, out-of-range values — is
//! refused at start-up with the reason ([`CronSpecError`]).
//!
//! Two points differ from Vixie cron, because they are how `tokio-cron-scheduler`
//! (the scheduler the daemon runs on, through the same `croner` parser) reads a
//! spec, and [`CronSpec`] must agree with it:
//!
//! - Schedules are evaluated in **UTC**, so there are no daylight-saving gaps or
//!   repeats: `0 2 * * *` fires exactly every 24 hours.
//! - When both day-of-month and day-of-week are restricted, **both** must match
//!   (`0 0 13 * FRI` is Friday the 13th), where Vixie cron fires when either does.
//!
//! A 5-field spec is normalized to 6 fields by prefixing second `0`
//! ([`CronSpec::normalized`]); that 6-field string is what the scheduler gets.
//!
//! # Catch-up and overlap
//!
//! [`CronSpec::missed`] decides whether a run was due between the last
//! successful run and now (a run missed while the daemon was down);
//! [`Overlap`] is the bookkeeping that keeps two runs of one job from
//! overlapping and counts the runs skipped because of it.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, DurationRound, TimeZone, Utc};
use croner::parser::{CronParser, Seconds};
use croner::Cron;

/// Why a cron spec was refused (the spec is quoted; the caller adds the job name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronSpecError {
    /// Not 5 or 6 whitespace-separated fields.
    #[error("schedule {spec:?} has {fields} field(s); give 5 (minute hour day month weekday) or 6 (second minute hour day month weekday)")]
    Fields {
        /// The spec as written.
        spec: String,
        /// How many fields it has.
        fields: usize,
    },
    /// The parser refused a field.
    #[error("schedule {spec:?}: {reason}")]
    Invalid {
        /// The spec as written.
        spec: String,
        /// The parser's reason.
        reason: String,
    },
    /// It parses but matches no time (`0 0 31 4 *`: April has 30 days).
    #[error("schedule {spec:?} never fires")]
    Never {
        /// The spec as written.
        spec: String,
    },
}

/// The parser configuration `tokio-cron-scheduler` 0.15 uses for its cron jobs:
/// seconds required, day-of-month AND day-of-week.
pub fn scheduler_parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Required)
        .dom_and_dow(true)
        .build()
}

/// A validated cron spec.
#[derive(Debug, Clone)]
pub struct CronSpec {
    text: String,
    normalized: String,
    cron: Cron,
}

impl PartialEq for CronSpec {
    fn eq(&self, other: &Self) -> bool {
        self.normalized == other.normalized
    }
}

impl CronSpec {
    /// Parse and validate a 5- or 6-field spec.
    pub fn parse(spec: &str) -> Result<CronSpec, CronSpecError> {
        let fields: Vec<&str> = spec.split_whitespace().collect();
        let normalized = match fields.len() {
            5 => format!("0 {}", fields.join(" ")),
            6 => fields.join(" "),
            n => {
                return Err(CronSpecError::Fields {
                    spec: spec.to_string(),
                    fields: n,
                })
            }
        };
        let cron = scheduler_parser()
            .parse(&normalized)
            .map_err(|e| CronSpecError::Invalid {
                spec: spec.to_string(),
                reason: e.to_string(),
            })?;
        let parsed = CronSpec {
            text: spec.trim().to_string(),
            normalized,
            cron,
        };
        // Some valid-looking specs match nothing (April 31st); refuse them now,
        // not the first time the scheduler looks for the next run.
        let epoch = Utc.timestamp_opt(0, 0).single().expect("epoch");
        if parsed.next_after(epoch).is_none() {
            return Err(CronSpecError::Never {
                spec: spec.to_string(),
            });
        }
        Ok(parsed)
    }

    /// The spec as written (trimmed).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The 6-field form (seconds first) handed to the scheduler.
    pub fn normalized(&self) -> &str {
        &self.normalized
    }

    /// Whether the spec as written had a seconds field.
    pub fn has_seconds(&self) -> bool {
        self.text.split_whitespace().count() == 6
    }

    /// The first fire time strictly after `after` (UTC, whole seconds), or
    /// `None` if the spec never fires again.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let whole = after
            .duration_trunc(chrono::Duration::seconds(1))
            .unwrap_or(after);
        self.cron.find_next_occurrence(&whole, false).ok()
    }

    /// Was a run due in `(last_success, now]`? That is, would the schedule have
    /// fired after the last successful run finished and before now.
    pub fn missed(&self, last_success: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        self.next_after(last_success).is_some_and(|t| t <= now)
    }
}

/// The catch-up decision at daemon start: run once now when catch-up is on, a
/// previous success is known, and a fire time passed since it. Without a known
/// success there is nothing to catch up on (the job runs on its schedule).
pub fn catch_up_due(
    spec: &CronSpec,
    catch_up: bool,
    last_success: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> bool {
    catch_up && last_success.is_some_and(|last| spec.missed(last, now))
}

/// No-overlap bookkeeping: at most one run per job name at a time; a run that
/// comes due while the previous one still runs is refused and counted.
#[derive(Debug, Default, Clone)]
pub struct Overlap {
    running: BTreeSet<String>,
    skipped: BTreeMap<String, u64>,
}

impl Overlap {
    /// Start a run of `job`: `true` if none was running (it now is); `false`
    /// if one still runs (the new run is skipped and counted).
    pub fn try_start(&mut self, job: &str) -> bool {
        if self.running.contains(job) {
            *self.skipped.entry(job.to_string()).or_default() += 1;
            false
        } else {
            self.running.insert(job.to_string());
            true
        }
    }

    /// The run of `job` ended (whatever its outcome).
    pub fn finish(&mut self, job: &str) {
        self.running.remove(job);
    }

    /// Whether a run of `job` is in progress.
    pub fn is_running(&self, job: &str) -> bool {
        self.running.contains(job)
    }

    /// How many runs are in progress, over all jobs.
    pub fn running_count(&self) -> usize {
        self.running.len()
    }

    /// Runs of `job` skipped because the previous one still ran.
    pub fn skipped(&self, job: &str) -> u64 {
        self.skipped.get(job).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn five_and_six_field_specs_give_the_expected_next_times() {
        // (spec, after, expected next)
        let cases = [
            // 6 fields, every second; sub-second instants round to the next whole second.
            (
                "*/1 * * * * *",
                "2026-01-05T12:00:00Z",
                "2026-01-05T12:00:01Z",
            ),
            (
                "*/1 * * * * *",
                "2026-01-05T12:00:00.500Z",
                "2026-01-05T12:00:01Z",
            ),
            (
                "30 0 2 * * *",
                "2026-01-05T02:00:30Z",
                "2026-01-06T02:00:30Z",
            ),
            (
                "*/15 * * * * *",
                "2026-01-05T12:00:44Z",
                "2026-01-05T12:00:45Z",
            ),
            // 5 fields fire at second 0.
            ("0 2 * * *", "2026-01-05T01:59:59Z", "2026-01-05T02:00:00Z"),
            ("0 2 * * *", "2026-01-05T02:00:00Z", "2026-01-06T02:00:00Z"),
            (
                "*/15 * * * *",
                "2026-01-05T12:00:00Z",
                "2026-01-05T12:15:00Z",
            ),
            (
                "0 3 * * SUN",
                "2026-01-05T00:00:00Z",
                "2026-01-11T03:00:00Z",
            ),
            (
                "0 0 1 JAN *",
                "2026-01-05T00:00:00Z",
                "2027-01-01T00:00:00Z",
            ),
            ("0 0 29 2 *", "2026-03-01T00:00:00Z", "2028-02-29T00:00:00Z"),
            // Day-of-month AND day-of-week, as tokio-cron-scheduler reads it.
            (
                "0 0 13 * FRI",
                "2026-01-01T00:00:00Z",
                "2026-02-13T00:00:00Z",
            ),
            // Surrounding whitespace is fine.
            (
                "  0 2 * * *  ",
                "2026-01-05T01:00:00Z",
                "2026-01-05T02:00:00Z",
            ),
        ];
        for (spec, after, want) in cases {
            let c = CronSpec::parse(spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
            assert_eq!(
                c.next_after(t(after)),
                Some(t(want)),
                "{spec} after {after}"
            );
        }
        let five = CronSpec::parse("0 2 * * *").unwrap();
        assert_eq!(five.normalized(), "0 0 2 * * *");
        assert!(!five.has_seconds());
        let six = CronSpec::parse("*/1 * * * * *").unwrap();
        assert_eq!(six.normalized(), "*/1 * * * * *");
        assert!(six.has_seconds());
        assert_eq!(five.as_str(), "0 2 * * *");
    }

    #[test]
    fn next_times_are_in_utc_and_ignore_daylight_saving() {
        // 2026-03-29 (Europe) and 2026-03-08 (US) spring forward; 2026-10-25 and
        // 2026-11-01 fall back. Evaluated in UTC, a daily spec stays 24 h apart
        // and an hourly one 1 h apart across all of them.
        let daily = CronSpec::parse("30 1 * * *").unwrap();
        let mut at = t("2026-03-01T00:00:00Z");
        let mut prev: Option<DateTime<Utc>> = None;
        for _ in 0..300 {
            let next = daily.next_after(at).unwrap();
            assert_eq!(next.format("%H:%M:%S").to_string(), "01:30:00");
            if let Some(p) = prev {
                assert_eq!(next - p, chrono::Duration::hours(24), "after {p}");
            }
            prev = Some(next);
            at = next;
        }
        let hourly = CronSpec::parse("0 * * * *").unwrap();
        let mut at = t("2026-10-24T22:00:00Z");
        for _ in 0..10 {
            let next = hourly.next_after(at).unwrap();
            assert_eq!(next - at, chrono::Duration::hours(1));
            at = next;
        }
    }

    #[test]
    fn invalid_specs_are_refused_with_the_reason() {
        // (spec, a word the error must contain)
        let cases = [
            ("", "0 field"),
            ("* * * *", "4 field"),
            ("0 0 0 * * * 2030", "7 field"),
            ("@daily", "1 field"),
            ("61 * * * *", "61"),
            ("* 25 * * *", "25"),
            ("0 0 32 * *", "32"),
            ("0 0 * 13 *", "13"),
            ("0 0 * * MOON", "MOON"),
            ("every day", "2 field"),
            ("0 0 31 4 *", "never fires"),
            ("a b c d e", "a b c d e"),
        ];
        for (spec, needle) in cases {
            let e = CronSpec::parse(spec).expect_err(spec).to_string();
            assert!(
                e.to_lowercase().contains(&needle.to_lowercase()),
                "{spec:?}: {e}"
            );
            assert!(e.contains(&format!("{spec:?}")), "spec quoted: {e}");
        }
    }

    #[test]
    fn the_normalized_spec_is_what_the_scheduler_parser_accepts() {
        for spec in ["0 2 * * *", "*/1 * * * * *", "0 0 13 * FRI", "0 3 * * SUN"] {
            let c = CronSpec::parse(spec).unwrap();
            assert!(scheduler_parser().parse(c.normalized()).is_ok(), "{spec}");
        }
        // And the scheduler parser alone refuses 5-field specs: hence the normalization.
        assert!(scheduler_parser().parse("0 2 * * *").is_err());
    }

    #[test]
    fn catch_up_runs_only_when_a_fire_time_passed_since_the_last_success() {
        // (spec, catch_up, last success, now, expected)
        let cases = [
            // Daily at 02:00: down over 02:00 → missed.
            (
                "0 2 * * *",
                true,
                Some("2026-01-05T02:10:00Z"),
                "2026-01-06T03:00:00Z",
                true,
            ),
            // Restarted before the next fire time → nothing missed.
            (
                "0 2 * * *",
                true,
                Some("2026-01-05T02:10:00Z"),
                "2026-01-06T01:59:59Z",
                false,
            ),
            // Exactly at the fire time counts (the scheduler would have fired).
            (
                "0 2 * * *",
                true,
                Some("2026-01-05T02:10:00Z"),
                "2026-01-06T02:00:00Z",
                true,
            ),
            // catch_up = false never runs at start.
            (
                "0 2 * * *",
                false,
                Some("2026-01-01T02:10:00Z"),
                "2026-01-06T03:00:00Z",
                false,
            ),
            // No known success: nothing to catch up on.
            ("0 2 * * *", true, None, "2026-01-06T03:00:00Z", false),
            // Every second: a two-second outage misses runs.
            (
                "*/1 * * * * *",
                true,
                Some("2026-01-05T12:00:00.300Z"),
                "2026-01-05T12:00:02Z",
                true,
            ),
            (
                "*/1 * * * * *",
                true,
                Some("2026-01-05T12:00:00.300Z"),
                "2026-01-05T12:00:00.900Z",
                false,
            ),
            // Weekly on Sunday: restarted on Saturday after a Monday success.
            (
                "0 3 * * SUN",
                true,
                Some("2026-01-05T03:00:00Z"),
                "2026-01-10T12:00:00Z",
                false,
            ),
            (
                "0 3 * * SUN",
                true,
                Some("2026-01-05T03:00:00Z"),
                "2026-01-11T12:00:00Z",
                true,
            ),
        ];
        for (spec, on, last, now, want) in cases {
            let c = CronSpec::parse(spec).unwrap();
            assert_eq!(
                catch_up_due(&c, on, last.map(t), t(now)),
                want,
                "{spec} catch_up={on} last={last:?} now={now}"
            );
        }
    }

    #[test]
    fn overlapping_runs_are_refused_and_counted_per_job() {
        let mut o = Overlap::default();
        assert!(o.try_start("nightly"));
        assert!(o.is_running("nightly"));
        assert!(!o.try_start("nightly"));
        assert!(!o.try_start("nightly"));
        // Another job is independent.
        assert!(o.try_start("sync"));
        assert_eq!(o.running_count(), 2);
        assert_eq!(o.skipped("nightly"), 2);
        assert_eq!(o.skipped("sync"), 0);
        o.finish("nightly");
        assert!(!o.is_running("nightly"));
        assert!(o.try_start("nightly"));
        assert_eq!(o.skipped("nightly"), 2);
        o.finish("nightly");
        o.finish("sync");
        assert_eq!(o.running_count(), 0);
        // Finishing a job that is not running is harmless.
        o.finish("unknown");
        assert_eq!(o.skipped("unknown"), 0);
    }

    #[test]
    fn a_fake_clock_drives_a_schedule_with_skips() {
        // A job every 10 s whose runs take 25 s: simulate the scheduler loop.
        let spec = CronSpec::parse("*/10 * * * * *").unwrap();
        let mut o = Overlap::default();
        let mut now = t("2026-01-05T12:00:00Z");
        let mut finishes_at: Option<DateTime<Utc>> = None;
        let mut started = 0;
        for _ in 0..12 {
            let next = spec.next_after(now).unwrap();
            if finishes_at.is_some_and(|f| f <= next) {
                o.finish("slow");
                finishes_at = None;
            }
            now = next;
            if o.try_start("slow") {
                started += 1;
                finishes_at = Some(now + chrono::Duration::seconds(25));
            }
        }
        // Fires at :10 … 2:00; each run covers three fire times (starts one, skips two).
        assert_eq!(started, 4);
        assert_eq!(o.skipped("slow"), 8);
    }
}
