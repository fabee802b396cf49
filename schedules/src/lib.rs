//! custos schedules: cron job specs, grandfather-father-son and record
//! retention policies as pure functions with the clock passed in.
//!
//! Empty for now; the retention and daemon issues add the policies here.
#![forbid(unsafe_code)]
