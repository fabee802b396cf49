//! Calendar periods and their keys, computed in a snapshot's own time zone.
//!
//! A [`PeriodKey`] names one calendar period (an hour, a day, an ISO week,
//! a month, a year) as seen on the wall clock of the snapshot's recorded IANA
//! time zone. Two snapshots are in the same period exactly when their keys are
//! equal, so the key alone decides bucketing; its [`Display`](fmt::Display)
//! form is the label shown in reasons (`daily 2026-11-21`, `weekly 2026-W47`).
//!
//! Rules, all from the local (zoned) date and time:
//!
//! - **hour**: local date, local hour *and* the UTC offset in force. The
//!   offset tells apart the two wall-clock hours that share a number when the
//!   clocks go back (Europe/Berlin 2026-10-25 02:00–03:00 happens at +02:00
//!   and again at +01:00): they are two elapsed hours, so two periods. The
//!   hour skipped when clocks go forward simply never occurs.
//! - **day**: local calendar date. A 23-hour and a 25-hour day are each one
//!   day.
//! - **week**: ISO 8601 week of the local date, with its ISO week-year:
//!   2024-12-31 is `2025-W01`, 2021-01-03 is `2020-W53`; years with 53 ISO
//!   weeks (2020, 2026, 2032, ...) have a `W53`.
//! - **month**: local year and month (2024-02 holds the 29th).
//! - **year**: local calendar year (not the ISO week-year: 2024-12-31 is in
//!   yearly `2024` but weekly `2025-W01`).

use std::fmt;

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, Offset, Timelike, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize, Serializer};

/// A kind of calendar period used by the `keep_hourly` ... `keep_yearly` rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// A local wall-clock hour (with its UTC offset).
    Hour,
    /// A local calendar day.
    Day,
    /// An ISO 8601 week (Monday to Sunday) with its ISO week-year.
    Week,
    /// A local calendar month.
    Month,
    /// A local calendar year.
    Year,
}

impl Period {
    /// All periods, shortest first: the order in which their reasons are listed.
    pub const ALL: [Period; 5] = [
        Period::Hour,
        Period::Day,
        Period::Week,
        Period::Month,
        Period::Year,
    ];

    /// The rule's adjective: `hourly`, `daily`, `weekly`, `monthly`, `yearly`.
    pub fn adjective(self) -> &'static str {
        match self {
            Period::Hour => "hourly",
            Period::Day => "daily",
            Period::Week => "weekly",
            Period::Month => "monthly",
            Period::Year => "yearly",
        }
    }

    /// Position in [`Period::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.adjective())
    }
}

/// The identity of one calendar period; equal keys mean the same period.
///
/// Serialized as its display label (`2026-W47`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeriodKey {
    /// A wall-clock hour: local date, local hour (0-23) and the UTC offset
    /// in seconds east of UTC. Label `2026-10-25T02+01:00`.
    Hour {
        /// Local calendar date.
        date: NaiveDate,
        /// Local hour, 0-23.
        hour: u32,
        /// UTC offset in force, seconds east of UTC.
        utc_offset_seconds: i32,
    },
    /// A local calendar date. Label `2026-11-21`.
    Day(NaiveDate),
    /// An ISO week. Label `2026-W47`.
    Week {
        /// ISO week-year (may differ from the calendar year near New Year).
        year: i32,
        /// ISO week number, 1-53.
        week: u32,
    },
    /// A calendar month. Label `2026-02`.
    Month {
        /// Calendar year.
        year: i32,
        /// Month, 1-12.
        month: u32,
    },
    /// A calendar year. Label `2026`.
    Year(i32),
}

impl PeriodKey {
    /// The key of the `period` containing instant `time` on the wall clock of
    /// `zone`.
    pub fn of(period: Period, time: DateTime<Utc>, zone: Tz) -> PeriodKey {
        let local = time.with_timezone(&zone);
        match period {
            Period::Hour => PeriodKey::Hour {
                date: local.date_naive(),
                hour: local.hour(),
                utc_offset_seconds: local.offset().fix().local_minus_utc(),
            },
            Period::Day => PeriodKey::Day(local.date_naive()),
            Period::Week => {
                let w = local.iso_week();
                PeriodKey::Week {
                    year: w.year(),
                    week: w.week(),
                }
            }
            Period::Month => PeriodKey::Month {
                year: local.year(),
                month: local.month(),
            },
            Period::Year => PeriodKey::Year(local.year()),
        }
    }
}

impl fmt::Display for PeriodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeriodKey::Hour {
                date,
                hour,
                utc_offset_seconds,
            } => {
                write!(f, "{}T{hour:02}", date.format("%Y-%m-%d"))?;
                match FixedOffset::east_opt(*utc_offset_seconds) {
                    Some(o) => write!(f, "{o}"),
                    None => write!(f, "{utc_offset_seconds:+}s"),
                }
            }
            PeriodKey::Day(date) => write!(f, "{}", date.format("%Y-%m-%d")),
            PeriodKey::Week { year, week } => write!(f, "{year:04}-W{week:02}"),
            PeriodKey::Month { year, month } => write!(f, "{year:04}-{month:02}"),
            PeriodKey::Year(year) => write!(f, "{year:04}"),
        }
    }
}

impl Serialize for PeriodKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Why a snapshot's periods were not computed in its recorded time zone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "warning", rename_all = "kebab-case")]
pub enum ZoneFallback {
    /// The snapshot recorded no time zone; UTC was used.
    Empty,
    /// The snapshot's time zone is not a known IANA name; UTC was used.
    Unknown {
        /// The name as recorded.
        name: String,
    },
}

impl fmt::Display for ZoneFallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ZoneFallback::Empty => f.write_str("no time zone recorded, periods computed in UTC"),
            ZoneFallback::Unknown { name } => {
                write!(f, "unknown time zone {name:?}, periods computed in UTC")
            }
        }
    }
}

/// Resolve a recorded IANA time zone name; empty or unknown names fall back
/// to UTC and say so.
pub fn resolve_zone(name: &str) -> Result<Tz, ZoneFallback> {
    if name.trim().is_empty() {
        return Err(ZoneFallback::Empty);
    }
    name.trim()
        .parse::<Tz>()
        .map_err(|_| ZoneFallback::Unknown {
            name: name.to_string(),
        })
}
