//! New trace ids stay above every id a store has held, even once all of its traces have expired.
//!
//! A test binary of its own: trace ids are made from one process-wide floor, and this test raises
//! it a day ahead, which would disturb tests that expect ids made now.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use forge_layer::store::Store;
use forge_layer::trace::{TraceId, now_ms};

#[test]
fn a_reopened_store_makes_ids_above_the_newest_it_deleted() {
    let dir = tempfile::tempdir().unwrap();
    // A trace from before the clock went back by a day: a cursor may already point at its id.
    let ahead = TraceId::earliest_at(now_ms() + 86_400_000);
    {
        let store = Store::open_dir(dir.path()).unwrap();
        store.insert_encoded([(ahead, &b"{}"[..])]).unwrap();
        let everything = TraceId::from_u128(u128::MAX);
        while store
            .expire_traces(everything, 1000, usize::MAX)
            .unwrap()
            .more
        {}
        assert_eq!(store.trace_count().unwrap(), 0);
    }
    assert!(TraceId::generate() < ahead, "the clock is behind the id");
    let _reopened = Store::open_dir(dir.path()).unwrap();
    assert!(
        TraceId::generate() > ahead,
        "new ids would sort below a cursor kept from before"
    );
}
