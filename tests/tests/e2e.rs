//! The end-to-end suite: the real `custos` binary (and, where no process
//! boundary is needed, the library) against the in-memory target, local
//! directories and a real S3 server (SeaweedFS, started by scripts/test.sh).
//!
//! Build the binary first: `cargo build -p custos-agent --bin custos`
//! (`CUSTOS_BIN` points elsewhere). S3 tests need `CUSTOS_TEST_S3_ENDPOINT`
//! (and credentials in `AWS_*`); without it they print a skip line, unless
//! `CUSTOS_REQUIRE_S3=1`, which makes them fail. The chat-source tests
//! likewise need `CUSTOS_TEST_MATRIX_URL` (Synapse) / `CUSTOS_TEST_MASTODON_URL`
//! (mastodon-mock), required with `CUSTOS_REQUIRE_MATRIX=1` /
//! `CUSTOS_REQUIRE_MASTODON=1`. Knobs: `CUSTOS_TEST_SEED`
//! (reproduce random data), `CUSTOS_TEST_CRASH_TRIALS` (default 12),
//! `CUSTOS_TEST_S3_CRASH_TRIALS` (default 2), `CUSTOS_TEST_CRASH_MB` (default 48),
//! `CUSTOS_TEST_API_KILL_TRIALS` (default 3), `CUSTOS_TEST_API_KILL_SIZE` (default 400).

#[path = "e2e/support.rs"]
mod support;

// The connectors' in-process HTTP mock server and their stateful API mocks,
// shared with the connectors' unit tests (these files name only
// `crate::http::mock` and external crates).
#[path = "../../connectors/src/http/mock.rs"]
mod mock_server;
mod http {
    pub(crate) use crate::mock_server as mock;
}
#[path = "../../connectors/src/hubspot/mock.rs"]
mod hubspot_mock;
#[path = "../../connectors/src/slack/mock.rs"]
mod slack_mock;
#[path = "../../connectors/src/x/mock.rs"]
mod x_mock;
#[path = "../../connectors/src/zendesk/mock.rs"]
mod zendesk_mock;

#[path = "e2e/conformance.rs"]
mod conformance;

#[path = "e2e/roundtrip.rs"]
mod roundtrip;

#[path = "e2e/cli.rs"]
mod cli;

#[path = "e2e/dedup.rs"]
mod dedup;

#[path = "e2e/tamper.rs"]
mod tamper;

#[path = "e2e/plaintext.rs"]
mod plaintext;

#[path = "e2e/exit_codes.rs"]
mod exit_codes;

#[path = "e2e/keys.rs"]
mod keys;

#[path = "e2e/roles.rs"]
mod roles;

#[path = "e2e/multi_target.rs"]
mod multi_target;

#[path = "e2e/concurrency.rs"]
mod concurrency;

#[path = "e2e/crash.rs"]
mod crash;

#[path = "e2e/forget.rs"]
mod forget;

#[path = "e2e/prune.rs"]
mod prune;

#[path = "e2e/records.rs"]
mod records;

#[path = "e2e/verify.rs"]
mod verify;

#[path = "e2e/retention.rs"]
mod retention;

#[path = "e2e/daemon.rs"]
mod daemon;

#[path = "e2e/immutable.rs"]
mod immutable;

#[path = "e2e/customer.rs"]
mod customer;

#[path = "e2e/audit.rs"]
mod audit;

#[path = "e2e/chat_sources.rs"]
mod chat_sources;

#[path = "e2e/api_kill.rs"]
mod api_kill;

#[path = "e2e/identities.rs"]
mod identities;

#[path = "e2e/faults.rs"]
mod faults;

#[path = "e2e/logs.rs"]
mod logs;
