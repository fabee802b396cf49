//! custos end-to-end tests live in `tests/e2e.rs` (one test binary) with its
//! modules in `tests/e2e/`. This library is intentionally empty.
