//! Grandfather-father-son snapshot retention (`forget --keep-*`) as a pure
//! function: snapshots, policy, the current time and a grouping in; one
//! keep-or-remove [`Decision`] per snapshot, with the reasons, out. Nothing
//! here reads a clock, a repository or the local time zone.
//!
//! # Semantics
//!
//! Snapshots are first partitioned into groups by [`GroupBy`] keys (default:
//! host and source; [`GroupBy::parse_list`] reads `--group-by source,tags`),
//! and the policy applies to each group alone. Within a group, snapshots are
//! ordered newest first by time; snapshots with the *same* time are ordered by
//! id, ascending (the smaller id counts as the newer), so the result never
//! depends on input order.
//!
//! A snapshot is kept when at least one rule keeps it (rules are ORed); every
//! rule that keeps it is listed in [`Decision::reasons`], always in this
//! order: future-dated, last, hourly, daily, weekly, monthly, yearly, within,
//! hourly/daily/.../yearly within, then tags in policy order (the agent
//! appends `hold <name>` reasons after these, for legal holds).
//!
//! - `keep_last N`: the N newest snapshots.
//! - `keep_hourly/daily/weekly/monthly/yearly N`: going newest first, the
//!   newest snapshot of each period is kept, for the N most recent periods
//!   *that have a snapshot* (empty periods are not counted). Periods are the
//!   calendar periods of [`calendar`], computed in **each snapshot's own
//!   recorded IANA time zone**. As in restic, if a rule still has unused slots
//!   when it reaches the group's oldest snapshot, that snapshot is kept too
//!   and takes a slot (reason `daily 2024-02-28 (oldest)`), so a young
//!   repository keeps its earliest history.
//! - `keep_within D`: every snapshot with `time >= now - D` (boundary
//!   included). `D` is a [`CalendarDuration`] such as `30d` or `2y6m`.
//! - `keep_within_hourly/.../yearly D`: the newest snapshot of each period,
//!   among the snapshots with `time >= now - D`.
//! - `keep_tags`: every snapshot carrying one of the tags.
//! - Future-dated snapshots (`time > now + future_tolerance`, default 5
//!   minutes) are always kept with the reason `future-dated: review`, and are
//!   invisible to every counting rule (last, periodic, oldest, within,
//!   within-periodic): they take no slot and mark no period as used. They may
//!   still get `tag` reasons.
//!
//! A policy that keeps nothing ([`Policy::is_empty`]: no rule, or only counts
//! of 0) is refused with [`RetentionError::Empty`] by [`Policy::validate`] and
//! by [`apply`]: forgetting every snapshot is never the result of a missing
//! flag. A valid policy can still keep nothing of a group (say `keep_within
//! 30d` after backups stopped two months ago); [`Group::keeps_nothing`] lets
//! the caller refuse or ask in that case.
//!
//! # Differences from restic, and why
//!
//! restic buckets snapshots by calendar period, keeps the newest snapshot of
//! each of the N most recent periods that have a snapshot (plus the oldest
//! while slots are left), ORs the rules, and measures `--keep-within` back
//! from the newest snapshot (recent versions: the newest one not in the future
//! of the clock running `forget`). custos differs:
//!
//! 1. **Time zone.** restic reads the wall clock of the UTC offset stored in
//!    each snapshot's timestamp, i.e. the backing-up machine's offset at that
//!    instant. custos stores UTC plus the source's IANA zone (configured per
//!    source) and buckets in that zone, so "daily" is the source's local day
//!    even when the agent's machine runs in UTC. For days, weeks, months and
//!    years this agrees with restic whenever the zones agree. An empty or
//!    unknown zone falls back to UTC, reported in [`Decision::zone_fallback`]
//!    and by [`Decision::explain`].
//! 2. **DST.** A 23-hour and a 25-hour day are each one day (the key is the
//!    local date), as in restic. restic's hourly key (local date and hour)
//!    merges the two wall-clock hours that share a number when clocks go back;
//!    custos puts the UTC offset into the hourly key, so `02:30+02:00` and
//!    `02:30+01:00` on the Berlin fall-back night are two hours, two periods,
//!    two kept snapshots: one period per elapsed hour is what hourly retention
//!    is for. (Each of the two takes a `keep_hourly` slot.)
//! 3. **Within is relative to `now`.** A window anchored at the newest
//!    snapshot lets whoever can write one snapshot decide the window: dated in
//!    2099, it pushes every real snapshot out (restic now skips future
//!    snapshots when looking for the anchor, but the anchor is still data).
//!    custos measures from the `now` passed in, so the window does not depend
//!    on snapshot contents at all. The price: when backups stop, the window
//!    moves on and old snapshots leave it; combine `keep_within` with
//!    `keep_last` (or check [`Group::keeps_nothing`]) to keep the last good
//!    backups of a dead source. The boundary is inclusive (restic: strict).
//! 4. **Future-dated snapshots** take no slot: in restic a 2099 snapshot would
//!    be "last 1", "daily 2099-01-01", "yearly 2099", evicting a real one
//!    from each rule. They are kept and flagged for review rather than
//!    deleted, since deciding they are bogus is a human's call.
//! 5. **Ties** are broken by id, so the decision is deterministic (restic's
//!    order for equal times depends on its input order).
//! 6. **Months in durations** subtract calendar months and clamp to the end of
//!    the month (2026-03-31 minus `1m` is 2026-02-28), where Go's `AddDate`
//!    normalises (it would give 2026-03-03). Days are 24 hours and the
//!    arithmetic is in UTC.
//! 7. **Periods already seen** are tracked as a set, not as "different from
//!    the previous kept snapshot's period", so a group whose snapshots come
//!    from several time zones (a host that moved) still counts each label
//!    once. The same label in two zones (`daily 2026-11-21` in Berlin and in
//!    New York) is the same period.
//! 8. `--keep-tag x` matches one tag; restic's `--keep-tag a,b` (all of a
//!    list) is not supported: give the flag once per tag.
//! 9. **An empty policy** is an error; restic keeps everything and says so.
//!
//! # CLI-style values
//!
//! [`Policy::set_option`] takes restic-like option names and string values:
//! counts are whole numbers, or `unlimited` / `-1` ([`UNLIMITED`]);
//! durations are [`CalendarDuration`]s (`y` years, `m` **months**, `w` weeks,
//! `d` days, `h` hours: `30d`, `2y6m`, `1w3d12h`; each unit at most once, no
//! minutes); `future-tolerance` is a humantime duration (`5min`, `90s`; there
//! `m` is minutes as in humantime), at most one day.

pub mod calendar;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Months, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

pub use calendar::{Period, PeriodKey, ZoneFallback};

/// A count that keeps every period (`unlimited` or `-1` on the command line).
pub const UNLIMITED: u32 = u32::MAX;

/// Default [`Policy::future_tolerance`]: clock skew allowed before a snapshot
/// counts as future-dated.
pub const DEFAULT_FUTURE_TOLERANCE: StdDuration = StdDuration::from_secs(5 * 60);

/// Largest accepted [`Policy::future_tolerance`]: beyond a day a future-dated
/// snapshot could take real snapshots' slots.
pub const MAX_FUTURE_TOLERANCE: StdDuration = StdDuration::from_secs(24 * 60 * 60);

/// What the policy needs to know about one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Snapshot id (hex); unique within one [`apply`] call.
    pub id: String,
    /// When the backup started.
    pub time: DateTime<Utc>,
    /// IANA time zone of the source (`Europe/Berlin`); calendar periods are
    /// computed in it. Empty or unknown means UTC (reported).
    pub time_zone: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Source name.
    pub source: String,
    /// Host that made the snapshot.
    pub hostname: String,
    /// Backed-up paths (for [`GroupBy::Paths`]).
    pub paths: Vec<String>,
}

/// A calendar-aware duration for `keep_within*`: years, months, weeks, days
/// and hours, written `2y6m`, `30d`, `1w3d12h`.
///
/// Going back from `now`, years and months are subtracted as calendar months
/// (clamped to the month's last day), then weeks and days as 24-hour days,
/// then hours, all in UTC. Serialized as its string form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CalendarDuration {
    /// Years (`y`).
    pub years: u32,
    /// Months (`m`).
    pub months: u32,
    /// Weeks (`w`).
    pub weeks: u32,
    /// Days (`d`).
    pub days: u32,
    /// Hours (`h`).
    pub hours: u32,
}

impl CalendarDuration {
    /// Whether every part is zero (such a window keeps nothing).
    pub fn is_zero(&self) -> bool {
        *self == CalendarDuration::default()
    }

    /// The oldest instant inside the window ending at `now`; the far past if
    /// the subtraction leaves chrono's range.
    pub fn window_start(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let months = u64::from(self.years) * 12 + u64::from(self.months);
        let days = i64::from(self.weeks) * 7 + i64::from(self.days);
        let start = u32::try_from(months)
            .ok()
            .and_then(|m| now.checked_sub_months(Months::new(m)))
            .and_then(|t| t.checked_sub_signed(TimeDelta::try_days(days)?))
            .and_then(|t| t.checked_sub_signed(TimeDelta::try_hours(i64::from(self.hours))?));
        start.unwrap_or(DateTime::<Utc>::MIN_UTC)
    }
}

impl fmt::Display for CalendarDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_zero() {
            return f.write_str("0h");
        }
        for (n, unit) in [
            (self.years, 'y'),
            (self.months, 'm'),
            (self.weeks, 'w'),
            (self.days, 'd'),
            (self.hours, 'h'),
        ] {
            if n > 0 {
                write!(f, "{n}{unit}")?;
            }
        }
        Ok(())
    }
}

impl FromStr for CalendarDuration {
    type Err = RetentionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| RetentionError::InvalidDuration {
            value: s.to_string(),
            why,
        };
        let text = s.trim();
        if text.is_empty() {
            return Err(bad("empty".into()));
        }
        let mut d = CalendarDuration::default();
        let mut seen = HashSet::new();
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            let (number, after) = rest.split_at(digits);
            let letters = after.len() - after.trim_start_matches(|c: char| c.is_alphabetic()).len();
            let (unit, after) = after.split_at(letters);
            if number.is_empty() {
                return Err(bad(match after.chars().next() {
                    Some(c) if unit.is_empty() => format!("unexpected {c:?}"),
                    _ => format!("a number must come before {unit:?}"),
                }));
            }
            let n: u32 = number
                .parse()
                .map_err(|_| bad(format!("{number} is too large")))?;
            let slot = match unit {
                "y" => &mut d.years,
                "m" => &mut d.months,
                "w" => &mut d.weeks,
                "d" => &mut d.days,
                "h" => &mut d.hours,
                "" => return Err(bad(format!("{number} has no unit"))),
                _ => return Err(bad(format!("unknown unit {unit:?}"))),
            };
            if !seen.insert(unit) {
                return Err(bad(format!("unit {unit:?} given twice")));
            }
            *slot = n;
            rest = after;
        }
        if d.is_zero() {
            return Err(bad("must be longer than zero".into()));
        }
        Ok(d)
    }
}

impl TryFrom<String> for CalendarDuration {
    type Error = RetentionError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<CalendarDuration> for String {
    fn from(d: CalendarDuration) -> String {
        d.to_string()
    }
}

/// Parse a CLI-style count: a whole number, or `unlimited` / `-1` for
/// [`UNLIMITED`].
pub fn parse_count(value: &str) -> Result<u32, RetentionError> {
    match value.trim() {
        "unlimited" | "-1" => Ok(UNLIMITED),
        v => v.parse::<u32>().map_err(|_| RetentionError::InvalidCount {
            value: value.to_string(),
        }),
    }
}

/// Parse a CLI-style future tolerance with humantime (`5min`, `90s`, `1h`);
/// at most [`MAX_FUTURE_TOLERANCE`].
pub fn parse_future_tolerance(value: &str) -> Result<StdDuration, RetentionError> {
    let d =
        humantime::parse_duration(value.trim()).map_err(|e| RetentionError::InvalidTolerance {
            value: value.to_string(),
            why: e.to_string(),
        })?;
    check_tolerance(d)?;
    Ok(d)
}

fn check_tolerance(d: StdDuration) -> Result<(), RetentionError> {
    if d > MAX_FUTURE_TOLERANCE {
        return Err(RetentionError::InvalidTolerance {
            value: humantime::format_duration(d).to_string(),
            why: "at most 1 day is allowed".into(),
        });
    }
    Ok(())
}

/// A retention policy. Build it with struct update syntax over
/// [`Policy::default`], from CLI-style values with [`Policy::set_option`], or
/// deserialize it from a config table (field names as below; counts are
/// numbers, `-1` or `"unlimited"`, durations strings like `"30d"`, the
/// tolerance a humantime string like `"5min"`); check it with
/// [`Policy::validate`] (which [`apply`] also does).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Keep the N newest snapshots.
    #[serde(with = "count_serde", skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the N newest hours that have one.
    #[serde(with = "count_serde", skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest snapshot of each of the N newest days that have one.
    #[serde(with = "count_serde", skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the N newest ISO weeks that have one.
    #[serde(with = "count_serde", skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest snapshot of each of the N newest months that have one.
    #[serde(with = "count_serde", skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
    /// Keep the newest snapshot of each of the N newest years that have one.
    #[serde(with = "count_serde", skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<u32>,
    /// Keep every snapshot taken at or after `now - keep_within`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_within: Option<CalendarDuration>,
    /// Keep the newest snapshot of each hour within this window of `now`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_within_hourly: Option<CalendarDuration>,
    /// Keep the newest snapshot of each day within this window of `now`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_within_daily: Option<CalendarDuration>,
    /// Keep the newest snapshot of each ISO week within this window of `now`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_within_weekly: Option<CalendarDuration>,
    /// Keep the newest snapshot of each month within this window of `now`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_within_monthly: Option<CalendarDuration>,
    /// Keep the newest snapshot of each year within this window of `now`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_within_yearly: Option<CalendarDuration>,
    /// Keep every snapshot carrying any of these tags.
    pub keep_tags: Vec<String>,
    /// Snapshots later than `now` plus this are future-dated (see the module
    /// docs). Default [`DEFAULT_FUTURE_TOLERANCE`], at most
    /// [`MAX_FUTURE_TOLERANCE`]; serialized as a humantime string.
    #[serde(with = "tolerance_serde")]
    pub future_tolerance: StdDuration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            keep_last: None,
            keep_hourly: None,
            keep_daily: None,
            keep_weekly: None,
            keep_monthly: None,
            keep_yearly: None,
            keep_within: None,
            keep_within_hourly: None,
            keep_within_daily: None,
            keep_within_weekly: None,
            keep_within_monthly: None,
            keep_within_yearly: None,
            keep_tags: Vec::new(),
            future_tolerance: DEFAULT_FUTURE_TOLERANCE,
        }
    }
}

impl Policy {
    /// The `keep_hourly` ... `keep_yearly` count for `period`.
    pub fn count(&self, period: Period) -> Option<u32> {
        match period {
            Period::Hour => self.keep_hourly,
            Period::Day => self.keep_daily,
            Period::Week => self.keep_weekly,
            Period::Month => self.keep_monthly,
            Period::Year => self.keep_yearly,
        }
    }

    /// The `keep_within_hourly` ... `keep_within_yearly` window for `period`.
    pub fn within(&self, period: Period) -> Option<CalendarDuration> {
        match period {
            Period::Hour => self.keep_within_hourly,
            Period::Day => self.keep_within_daily,
            Period::Week => self.keep_within_weekly,
            Period::Month => self.keep_within_monthly,
            Period::Year => self.keep_within_yearly,
        }
    }

    fn count_mut(&mut self, period: Period) -> &mut Option<u32> {
        match period {
            Period::Hour => &mut self.keep_hourly,
            Period::Day => &mut self.keep_daily,
            Period::Week => &mut self.keep_weekly,
            Period::Month => &mut self.keep_monthly,
            Period::Year => &mut self.keep_yearly,
        }
    }

    fn within_mut(&mut self, period: Period) -> &mut Option<CalendarDuration> {
        match period {
            Period::Hour => &mut self.keep_within_hourly,
            Period::Day => &mut self.keep_within_daily,
            Period::Week => &mut self.keep_within_weekly,
            Period::Month => &mut self.keep_within_monthly,
            Period::Year => &mut self.keep_within_yearly,
        }
    }

    /// True when no rule can keep a snapshot: no rule given, or only counts
    /// of 0 and zero windows. Such a policy would forget everything (except
    /// future-dated snapshots) and must be refused; see [`Policy::validate`].
    pub fn is_empty(&self) -> bool {
        let count = |c: Option<u32>| c.is_some_and(|n| n > 0);
        let window = |w: Option<CalendarDuration>| w.is_some_and(|d| !d.is_zero());
        !(count(self.keep_last)
            || Period::ALL.iter().any(|&p| count(self.count(p)))
            || window(self.keep_within)
            || Period::ALL.iter().any(|&p| window(self.within(p)))
            || !self.keep_tags.is_empty())
    }

    /// Whether any rule buckets snapshots by calendar period (and so needs
    /// their time zones).
    pub fn uses_periods(&self) -> bool {
        Period::ALL.iter().any(|&p| {
            self.count(p).is_some_and(|n| n > 0) || self.within(p).is_some_and(|d| !d.is_zero())
        })
    }

    /// Refuse a policy that keeps nothing ([`RetentionError::Empty`]), an
    /// empty tag, or a future tolerance above [`MAX_FUTURE_TOLERANCE`].
    pub fn validate(&self) -> Result<(), RetentionError> {
        if self.is_empty() {
            return Err(RetentionError::Empty);
        }
        if self.keep_tags.iter().any(|t| t.is_empty()) {
            return Err(RetentionError::EmptyTag);
        }
        check_tolerance(self.future_tolerance)
    }

    /// Set one option from a CLI-style name and value, as restic spells them
    /// (a leading `--` is accepted): `keep-last`, `keep-hourly`,
    /// `keep-daily`, `keep-weekly`, `keep-monthly`, `keep-yearly` (counts,
    /// see [`parse_count`]); `keep-within`, `keep-within-hourly` ...
    /// `keep-within-yearly` ([`CalendarDuration`]); `keep-tag` (one tag,
    /// adds to the list); `future-tolerance` ([`parse_future_tolerance`]).
    pub fn set_option(&mut self, name: &str, value: &str) -> Result<(), RetentionError> {
        let option = name.trim_start_matches("--");
        let wrap = |e: RetentionError| RetentionError::Option {
            option: option.to_string(),
            source: Box::new(e),
        };
        let period = |suffix: &str| Period::ALL.into_iter().find(|p| p.adjective() == suffix);
        if option == "keep-last" {
            self.keep_last = Some(parse_count(value).map_err(wrap)?);
        } else if option == "keep-within" {
            self.keep_within = Some(value.parse().map_err(wrap)?);
        } else if option == "keep-tag" {
            let tag = value.trim();
            if tag.is_empty() {
                return Err(wrap(RetentionError::EmptyTag));
            }
            if !self.keep_tags.iter().any(|t| t == tag) {
                self.keep_tags.push(tag.to_string());
            }
        } else if option == "future-tolerance" {
            self.future_tolerance = parse_future_tolerance(value).map_err(wrap)?;
        } else if let Some(p) = option.strip_prefix("keep-within-").and_then(period) {
            *self.within_mut(p) = Some(value.parse().map_err(wrap)?);
        } else if let Some(p) = option.strip_prefix("keep-").and_then(period) {
            *self.count_mut(p) = Some(parse_count(value).map_err(wrap)?);
        } else {
            return Err(RetentionError::UnknownOption(name.to_string()));
        }
        Ok(())
    }
}

/// A one-line summary: `last 3, daily 7, within 30d, daily within 1y, tag legal`.
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = |n: u32| {
            if n == UNLIMITED {
                "unlimited".to_string()
            } else {
                n.to_string()
            }
        };
        let mut parts = Vec::new();
        if let Some(n) = self.keep_last {
            parts.push(format!("last {}", count(n)));
        }
        for p in Period::ALL {
            if let Some(n) = self.count(p) {
                parts.push(format!("{p} {}", count(n)));
            }
        }
        if let Some(d) = self.keep_within {
            parts.push(format!("within {d}"));
        }
        for p in Period::ALL {
            if let Some(d) = self.within(p) {
                parts.push(format!("{p} within {d}"));
            }
        }
        for t in &self.keep_tags {
            parts.push(format!("tag {t}"));
        }
        if parts.is_empty() {
            f.write_str("nothing")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// Counts in config files: a whole number, `-1` or `"unlimited"`
/// ([`UNLIMITED`], written back as `"unlimited"`).
mod count_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::{parse_count, UNLIMITED};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(i64),
        Text(String),
    }

    pub fn serialize<S: Serializer>(count: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
        match count {
            None => s.serialize_none(),
            Some(UNLIMITED) => s.serialize_some("unlimited"),
            Some(n) => s.serialize_some(n),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        let count = match Option::<Raw>::deserialize(d)? {
            None => return Ok(None),
            Some(Raw::Number(n)) => parse_count(&n.to_string()),
            Some(Raw::Text(text)) => parse_count(&text),
        };
        count.map(Some).map_err(serde::de::Error::custom)
    }
}

mod tolerance_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_future_tolerance(&text).map_err(serde::de::Error::custom)
    }
}

/// A snapshot attribute that partitions snapshots into independent groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    /// The hostname.
    Host,
    /// The source name.
    Source,
    /// The set of tags (order and repeats ignored).
    Tags,
    /// The set of backed-up paths (order and repeats ignored).
    Paths,
}

impl GroupBy {
    /// The default grouping: host and source.
    pub const DEFAULT: &'static [GroupBy] = &[GroupBy::Host, GroupBy::Source];

    /// Parse a comma-separated list (`source,tags`); names are `host`
    /// (or `hostname`), `source`, `tags`, `paths`. An empty string means no
    /// grouping: the policy applies to all snapshots together. A name given
    /// twice is an error.
    pub fn parse_list(value: &str) -> Result<Vec<GroupBy>, RetentionError> {
        let mut out = Vec::new();
        if value.trim().is_empty() {
            return Ok(out);
        }
        for name in value.split(',').map(str::trim) {
            let g = match name {
                "host" | "hostname" => GroupBy::Host,
                "source" => GroupBy::Source,
                "tags" => GroupBy::Tags,
                "paths" => GroupBy::Paths,
                _ => return Err(RetentionError::UnknownGroupBy(name.to_string())),
            };
            if out.contains(&g) {
                return Err(RetentionError::DuplicateGroupBy(name.to_string()));
            }
            out.push(g);
        }
        Ok(out)
    }
}

/// The values of the grouped-by attributes shared by a group's snapshots;
/// `None` for attributes not grouped by. Tags and paths are sorted and
/// deduplicated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct GroupKey {
    /// Hostname, when grouping by host.
    pub host: Option<String>,
    /// Source name, when grouping by source.
    pub source: Option<String>,
    /// Tags, when grouping by tags.
    pub tags: Option<Vec<String>>,
    /// Paths, when grouping by paths.
    pub paths: Option<Vec<String>>,
}

impl GroupKey {
    /// The key of `snapshot` under `group_by`.
    pub fn of(snapshot: &SnapshotInfo, group_by: &[GroupBy]) -> GroupKey {
        let set = |v: &[String]| {
            let mut v = v.to_vec();
            v.sort();
            v.dedup();
            v
        };
        let mut key = GroupKey::default();
        for g in group_by {
            match g {
                GroupBy::Host => key.host = Some(snapshot.hostname.clone()),
                GroupBy::Source => key.source = Some(snapshot.source.clone()),
                GroupBy::Tags => key.tags = Some(set(&snapshot.tags)),
                GroupBy::Paths => key.paths = Some(set(&snapshot.paths)),
            }
        }
        key
    }
}

/// `host h1, source home, tags [a, b]`, or `all snapshots` with no grouping.
impl fmt::Display for GroupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(h) = &self.host {
            parts.push(format!("host {h}"));
        }
        if let Some(s) = &self.source {
            parts.push(format!("source {s}"));
        }
        if let Some(t) = &self.tags {
            parts.push(format!("tags [{}]", t.join(", ")));
        }
        if let Some(p) = &self.paths {
            parts.push(format!("paths [{}]", p.join(", ")));
        }
        if parts.is_empty() {
            f.write_str("all snapshots")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// Why a snapshot is kept. Displayed as in [`Decision::explain`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "rule", rename_all = "kebab-case")]
pub enum Reason {
    /// Later than `now + future_tolerance`: kept, takes no slot; a human
    /// should look at it. `future-dated: review`.
    FutureDated,
    /// Among the `of` newest snapshots, at position `rank` (1 = newest).
    /// `last 2 of 3` (`last 2` when unlimited).
    Last {
        /// 1-based position, newest first.
        rank: u32,
        /// The `keep_last` count.
        of: u32,
    },
    /// Newest snapshot of a counted period (`daily 2026-11-21`), or, with
    /// `oldest`, the group's oldest snapshot kept because the rule had slots
    /// left (`daily 2026-11-21 (oldest)`).
    Period {
        /// The kind of period.
        period: Period,
        /// Which one.
        key: PeriodKey,
        /// Kept as the oldest snapshot while the rule had unused slots,
        /// not as its period's newest.
        oldest: bool,
    },
    /// Inside the `keep_within` window. `within 30d`.
    Within {
        /// The window.
        window: CalendarDuration,
    },
    /// Newest snapshot of a period inside a `keep_within_*` window.
    /// `daily 2026-11-21 within 1y`.
    WithinPeriod {
        /// The kind of period.
        period: Period,
        /// Which one.
        key: PeriodKey,
        /// The window.
        window: CalendarDuration,
    },
    /// Carries a kept tag. `tag legal`.
    Tag {
        /// The tag.
        tag: String,
    },
    /// A legal hold covers a record in the snapshot. Never produced by
    /// [`apply`] (holds live in the repository); the agent adds it after the
    /// policy, last. `hold case-17`.
    Hold {
        /// The hold's name.
        name: String,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::FutureDated => f.write_str("future-dated: review"),
            Reason::Last { rank, of } if *of == UNLIMITED => write!(f, "last {rank}"),
            Reason::Last { rank, of } => write!(f, "last {rank} of {of}"),
            Reason::Period {
                period,
                key,
                oldest: false,
            } => write!(f, "{period} {key}"),
            Reason::Period {
                period,
                key,
                oldest: true,
            } => write!(f, "{period} {key} (oldest)"),
            Reason::Within { window } => write!(f, "within {window}"),
            Reason::WithinPeriod {
                period,
                key,
                window,
            } => write!(f, "{period} {key} within {window}"),
            Reason::Tag { tag } => write!(f, "tag {tag}"),
            Reason::Hold { name } => write!(f, "hold {name}"),
        }
    }
}

/// The verdict on one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Snapshot id.
    pub id: String,
    /// Snapshot time.
    pub time: DateTime<Utc>,
    /// Keep (true) or remove (false); true exactly when `reasons` is non-empty.
    pub keep: bool,
    /// Every rule that keeps it, in the stable order of the module docs;
    /// empty for a removal.
    pub reasons: Vec<Reason>,
    /// Set when the policy uses calendar periods and the snapshot's time zone
    /// was empty or unknown, so UTC was used.
    pub zone_fallback: Option<ZoneFallback>,
}

impl Decision {
    /// One line for a person: `keep 1a2b3c4d: daily 2026-11-21, weekly
    /// 2026-W47`, or `remove 1a2b3c4d: not matched by any rule`; a time zone
    /// fallback is appended in parentheses. Ids are shortened to 8
    /// characters.
    pub fn explain(&self) -> String {
        let short: String = self.id.chars().take(8).collect();
        let why = if self.reasons.is_empty() {
            "not matched by any rule".to_string()
        } else {
            self.reasons
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let verb = if self.keep { "keep" } else { "remove" };
        match &self.zone_fallback {
            Some(z) => format!("{verb} {short}: {why} ({z})"),
            None => format!("{verb} {short}: {why}"),
        }
    }
}

/// The decisions for one group, newest snapshot first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Group {
    /// What the group's snapshots share.
    pub key: GroupKey,
    /// One per snapshot of the group, newest first (ties by id).
    pub decisions: Vec<Decision>,
}

impl Group {
    /// Decisions to keep.
    pub fn kept(&self) -> impl Iterator<Item = &Decision> {
        self.decisions.iter().filter(|d| d.keep)
    }

    /// Decisions to remove.
    pub fn removed(&self) -> impl Iterator<Item = &Decision> {
        self.decisions.iter().filter(|d| !d.keep)
    }

    /// True when the group has snapshots and the policy keeps none of them:
    /// the caller should refuse (or ask) rather than forget a whole source.
    pub fn keeps_nothing(&self) -> bool {
        !self.decisions.is_empty() && self.decisions.iter().all(|d| !d.keep)
    }
}

/// Errors of policy parsing, validation and [`apply`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetentionError {
    /// The policy keeps nothing.
    #[error(
        "refusing to forget: the retention policy keeps nothing; give at least one of \
         --keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly, \
         --keep-yearly, --keep-within, --keep-within-<period> or --keep-tag \
         (a count of 0 keeps nothing)"
    )]
    Empty,
    /// A count that is not a whole number.
    #[error("{value:?} is not a count (give a whole number, or `unlimited`)")]
    InvalidCount {
        /// The value given.
        value: String,
    },
    /// A malformed [`CalendarDuration`].
    #[error(
        "{value:?} is not a duration: {why} (use y, m, w, d, h as in 30d or 2y6m; m means months)"
    )]
    InvalidDuration {
        /// The value given.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// A malformed or too large future tolerance.
    #[error("{value:?} is not a usable future tolerance: {why} (e.g. 5min)")]
    InvalidTolerance {
        /// The value given.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// An empty `keep-tag`.
    #[error("keep-tag: a tag must not be empty")]
    EmptyTag,
    /// An option name [`Policy::set_option`] does not know.
    #[error("unknown retention option {0:?}")]
    UnknownOption(String),
    /// A bad value for a known option.
    #[error("--{option}: {source}")]
    Option {
        /// The option name, without `--`.
        option: String,
        /// What is wrong with the value.
        source: Box<RetentionError>,
    },
    /// An unknown `--group-by` name.
    #[error("group-by: unknown key {0:?} (use host, source, tags, paths, comma-separated)")]
    UnknownGroupBy(String),
    /// A `--group-by` name given twice.
    #[error("group-by: {0:?} given twice")]
    DuplicateGroupBy(String),
    /// Two snapshots with one id.
    #[error("snapshot id {0} appears twice")]
    DuplicateId(String),
}

/// Apply `policy` to `snapshots` at time `now`, per group of `group_by`
/// (see [`GroupBy::DEFAULT`]). Groups are ordered by key, decisions newest
/// first; the result does not depend on the input order.
///
/// Fails if the policy does not [validate](Policy::validate) (notably an
/// empty policy) or if an id appears twice.
pub fn apply(
    policy: &Policy,
    snapshots: &[SnapshotInfo],
    now: DateTime<Utc>,
    group_by: &[GroupBy],
) -> Result<Vec<Group>, RetentionError> {
    policy.validate()?;
    let mut ids = HashSet::new();
    let mut groups: BTreeMap<GroupKey, Vec<&SnapshotInfo>> = BTreeMap::new();
    for s in snapshots {
        if !ids.insert(s.id.as_str()) {
            return Err(RetentionError::DuplicateId(s.id.clone()));
        }
        groups.entry(GroupKey::of(s, group_by)).or_default().push(s);
    }
    Ok(groups
        .into_iter()
        .map(|(key, members)| Group {
            key,
            decisions: decide(policy, members, now),
        })
        .collect())
}

/// The policy over one group.
fn decide(policy: &Policy, mut snaps: Vec<&SnapshotInfo>, now: DateTime<Utc>) -> Vec<Decision> {
    snaps.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| a.id.cmp(&b.id)));

    let future_after = TimeDelta::from_std(policy.future_tolerance)
        .ok()
        .and_then(|t| now.checked_add_signed(t))
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    let window =
        |d: Option<CalendarDuration>| d.filter(|d| !d.is_zero()).map(|d| (d, d.window_start(now)));
    let within_start = window(policy.keep_within);
    let within_period_start = Period::ALL.map(|p| window(policy.within(p)));
    let uses_periods = policy.uses_periods();

    let mut tags: Vec<&str> = Vec::new();
    for t in &policy.keep_tags {
        if !tags.contains(&t.as_str()) {
            tags.push(t);
        }
    }

    let mut last_taken = 0u32;
    let mut counted = [0u32; 5];
    let mut seen: [HashSet<PeriodKey>; 5] = Default::default();
    let mut seen_within: [HashSet<PeriodKey>; 5] = Default::default();

    // The oldest snapshot that is not future-dated.
    let oldest = snaps.iter().rposition(|s| s.time <= future_after);

    let mut out = Vec::with_capacity(snaps.len());
    for (index, s) in snaps.into_iter().enumerate() {
        let (zone, zone_fallback) = match calendar::resolve_zone(&s.time_zone) {
            Ok(z) => (z, None),
            Err(why) => (chrono_tz::UTC, uses_periods.then_some(why)),
        };
        let mut reasons = Vec::new();
        if s.time > future_after {
            reasons.push(Reason::FutureDated);
        } else {
            if let Some(n) = policy.keep_last {
                if last_taken < n {
                    last_taken += 1;
                    reasons.push(Reason::Last {
                        rank: last_taken,
                        of: n,
                    });
                }
            }
            for p in Period::ALL {
                let i = p.index();
                if let Some(n) = policy.count(p) {
                    if counted[i] < n {
                        let key = PeriodKey::of(p, s.time, zone);
                        let newest_of_period = seen[i].insert(key.clone());
                        if newest_of_period || oldest == Some(index) {
                            counted[i] += 1;
                            reasons.push(Reason::Period {
                                period: p,
                                key,
                                oldest: !newest_of_period,
                            });
                        }
                    }
                }
            }
            if let Some((window, start)) = within_start {
                if s.time >= start {
                    reasons.push(Reason::Within { window });
                }
            }
            for p in Period::ALL {
                let i = p.index();
                if let Some((window, start)) = within_period_start[i] {
                    if s.time >= start {
                        let key = PeriodKey::of(p, s.time, zone);
                        if seen_within[i].insert(key.clone()) {
                            reasons.push(Reason::WithinPeriod {
                                period: p,
                                key,
                                window,
                            });
                        }
                    }
                }
            }
        }
        for &t in &tags {
            if s.tags.iter().any(|x| x == t) {
                reasons.push(Reason::Tag { tag: t.to_string() });
            }
        }
        out.push(Decision {
            id: s.id.clone(),
            time: s.time,
            keep: !reasons.is_empty(),
            reasons,
            zone_fallback,
        });
    }
    out
}
