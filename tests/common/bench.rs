//! Reading the JSON reports of `streamline-bench` (and `bench/churn.sh`,
//! which wraps it).

use serde_json::Value;

/// The whole number `key` of a report; panics (showing the report) if absent.
pub fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

/// Nothing lost: `streams` streams opened, everything planned was published,
/// every counter in `zero` is 0 and every expected delivery arrived.
pub fn assert_delivered_in_full(r: &Value, streams: u64, zero: &[&str]) {
    assert_eq!(n(r, "published"), n(r, "planned"), "{r}");
    assert_counts(r, streams, zero);
}

/// `streams` streams opened, every counter in `zero` is 0 and every
/// expected delivery (of what was published) arrived.
pub fn assert_counts(r: &Value, streams: u64, zero: &[&str]) {
    assert_eq!(n(r, "streams_open"), streams, "{r}");
    for key in zero {
        assert_eq!(n(r, key), 0, "{key}: {r}");
    }
    assert_eq!(n(r, "delivered"), n(r, "expected_deliveries"), "{r}");
}
