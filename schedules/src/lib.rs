//! custos schedules: cron job specs, grandfather-father-son and record
//! retention policies as pure functions with the clock passed in.
//!
//! Layout:
//!
//! - [`retention`]: snapshot retention (`forget --keep-*`). `retention/mod.rs`
//!   holds the public API ([`retention::Policy`], [`retention::apply`],
//!   [`retention::Decision`]) and the documented semantics, including where
//!   they differ from restic; `retention/calendar.rs` computes calendar period
//!   keys (hour, day, ISO week, month, year) in each snapshot's own time zone;
//!   `retention/tests.rs` holds the table-driven and property tests.
//! - [`cron`]: cron job specs of `custos daemon` (5 or 6 fields, UTC), next
//!   fire times, the catch-up decision and the no-overlap bookkeeping.
//! - [`record_retention`]: record retention (`[record_retention]`, `custos
//!   retention apply`): rules by kind, source, collection, jurisdiction and
//!   tag, the most specific matching rule wins, age counted from the record's
//!   own time against a `now` passed in; legal holds are applied by the agent.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cron;
pub mod record_retention;
pub mod retention;
