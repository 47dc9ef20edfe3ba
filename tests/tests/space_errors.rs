//! Bad input gets a typed error that says what is wrong; nothing panics and nothing is
//! lost.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use space_core::{Lease, Query, QueryError, Space, SpaceError};
use space_tests::{Job, Order};

#[test]
fn malformed_text_queries_name_the_position_and_problem() {
    let err = Query::parse("Order", "status:Ready AND amount:>").unwrap_err();
    assert_eq!(
        err.to_string(),
        "syntax error at position 25: expected a value, found the end of the query"
    );
    let err = Query::parse("Order", "status:Ready amount:5").unwrap_err();
    assert!(
        matches!(err, QueryError::Syntax { position: 13, .. }),
        "{err}"
    );
}

#[test]
fn fields_of_the_wrong_type_are_refused() {
    let space = Space::new().blocking();
    space
        .write(&Order {
            number: "1".into(),
            status: "New".into(),
            amount: 10.0,
            note: None,
        })
        .unwrap();
    // A query comparing the numeric field with a string.
    let q = Query::parse("Order", "amount:>lots").unwrap();
    let err = space.count(&q).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid query: field \"amount\" holds number values, but the query compares it with a string"
    );
    let err = space.take::<Order>(&q, Duration::from_secs(5)).unwrap_err();
    assert!(matches!(
        err,
        SpaceError::Query(QueryError::WrongType { .. })
    ));
    // An entry of the same type whose field holds another kind of value.
    #[derive(Serialize, Deserialize)]
    struct BadOrder {
        number: String,
        status: u32,
    }
    space_core::entry!(BadOrder, "Order", key = number);
    let err = space
        .write(&BadOrder {
            number: "2".into(),
            status: 3,
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "entry of type \"Order\": field \"status\" holds a number, but entries of this type store a string there"
    );
    assert_eq!(space.count(&Query::of::<Order>()).unwrap(), 1);
}

#[test]
fn absurd_leases_get_clear_errors() {
    let space = Space::new().blocking();
    let job = Job {
        id: 1,
        kind: "a".into(),
        size: 1,
    };
    for lease in [
        Lease::For(Duration::ZERO),
        Lease::For(Duration::MAX),
        Lease::secs(u64::MAX),
    ] {
        let err = space.write_with_lease(&job, lease).unwrap_err();
        assert!(matches!(err, SpaceError::InvalidLease { .. }), "{err}");
    }
    assert_eq!(space.stats().unwrap().entries, 0);
    // Absurd timeouts are fine: "wait as long as it takes" for a value that is there.
    space.write(&job).unwrap();
    assert!(
        space
            .take::<Job>(&Query::of::<Job>(), Duration::MAX)
            .unwrap()
            .is_some()
    );
}

/// Before anything of the type was ever written, a query naming a field the Rust type
/// lacks, or comparing a field with a literal of another kind, fails at once: a worker that
/// starts first is told, instead of waiting for matches that can never come.
#[test]
fn a_typo_or_a_kind_mismatch_fails_at_once_before_any_write() {
    let space = Space::new().blocking();
    let typo = Query::of::<Order>().eq("stauts", "New");
    let err = space
        .take::<Order>(&typo, Duration::from_secs(30))
        .unwrap_err();
    assert!(
        matches!(&err, SpaceError::Query(QueryError::UnknownField { field, known, .. })
            if field == "stauts" && known.contains(&"status".to_owned())),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "invalid query: entry type \"Order\" has no field \"stauts\"; its fields are [\"amount\", \"note\", \"number\", \"status\"]"
    );
    let mismatch = Query::of::<Order>().gt("amount", "100");
    let err = space
        .claim::<Order>(&mismatch, Lease::secs(30), Duration::from_secs(30))
        .unwrap_err();
    assert!(
        matches!(&err, SpaceError::Query(QueryError::WrongType { field, .. }) if field == "amount"),
        "{err:?}"
    );
    // Calls that name no Rust type know the fields once the process used the type.
    assert!(matches!(
        space.count(&typo),
        Err(SpaceError::Query(QueryError::UnknownField { .. }))
    ));
    assert!(matches!(
        space.notify(&mismatch, space_core::EventKinds::WRITTEN),
        Err(SpaceError::Query(QueryError::WrongType { .. }))
    ));
    // Fields that exist, literals that fit: fine, and nothing was written by the errors.
    let fine = Query::of::<Order>().eq("status", "New").gt("amount", 100);
    assert_eq!(space.count(&fine).unwrap(), 0);
    assert_eq!(space.count(&Query::for_type("Order")).unwrap(), 0);
}

#[test]
fn invalid_queries_and_type_mismatches_are_refused() {
    let space = Space::new().blocking();
    let err = space
        .read::<Job>(&Query::of::<Job>().gt("size", f64::NAN), Duration::ZERO)
        .unwrap_err();
    assert!(err.to_string().contains("NaN"), "{err}");
    let err = space
        .read::<Job>(&Query::of::<Order>(), Duration::ZERO)
        .unwrap_err();
    assert!(matches!(err, SpaceError::TypeMismatch { .. }), "{err}");
}

#[test]
fn an_entry_that_does_not_decode_is_put_back() {
    let space = Space::new().blocking();
    space
        .write(&Job {
            id: 1,
            kind: "a".into(),
            size: 1,
        })
        .unwrap();
    // Another Rust type claiming the same entry type, with a field Job does not have.
    #[derive(Debug, Serialize, Deserialize)]
    struct Stricter {
        id: u64,
        owner: String,
    }
    space_core::entry!(Stricter, "Job");
    let err = space
        .take::<Stricter>(&Query::of::<Stricter>(), Duration::ZERO)
        .unwrap_err();
    assert!(matches!(err, SpaceError::Document { .. }), "{err}");
    assert!(err.to_string().contains("owner"), "{err}");
    // Nothing was lost.
    assert_eq!(space.count(&Query::of::<Job>()).unwrap(), 1);
    let err = space
        .take_all::<Stricter>(&Query::of::<Stricter>(), 5, Duration::ZERO)
        .unwrap_err();
    assert!(matches!(err, SpaceError::Document { .. }));
    assert_eq!(space.count(&Query::of::<Job>()).unwrap(), 1);
    let err = space
        .claim::<Stricter>(&Query::of::<Stricter>(), Lease::secs(5), Duration::ZERO)
        .unwrap_err();
    assert!(matches!(err, SpaceError::Document { .. }));
    assert_eq!(
        space.count(&Query::of::<Job>()).unwrap(),
        1,
        "the claim was released"
    );
}

#[test]
fn non_struct_entries_are_refused() {
    #[derive(Serialize, Deserialize)]
    struct Wrapper(u32);
    space_core::entry!(Wrapper, "Wrapper");
    let err = Space::new().blocking().write(&Wrapper(3)).unwrap_err();
    assert!(err.to_string().contains("must be a struct"), "{err}");
}
