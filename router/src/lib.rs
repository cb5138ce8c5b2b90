//! Forge's routing table: which upstream model serves each alias, and how much traffic each arm gets.
//!
//! The table is immutable once built. [`Router`] keeps the current one behind a single
//! [`arc_swap::ArcSwap`]; a request loads it once and uses that snapshot both to route and to
//! record the decision, so a concurrent swap never splits one request across two versions.
//!
//! ```
//! use forge_router::{CanaryShare, Route, Router, StickyKey, Student, Target, Arm};
//!
//! let route = Route::new("gpt-4o", Target::new("openai", "gpt-4o"))
//!     .with_student(Student::new(Target::new("openai", "ft:gpt-4o-mini:acme::1"), CanaryShare::from_percent(25.0).unwrap()));
//! let router = Router::new(vec![route], ["openai"]).unwrap();
//!
//! let table = router.load();
//! let decision = table.pick("gpt-4o", StickyKey::Key(b"user-42")).unwrap();
//! // The same key always lands on the same arm of the same table.
//! assert_eq!(decision.arm, table.pick("gpt-4o", StickyKey::Key(b"user-42")).unwrap().arm);
//! assert!(matches!(decision.arm, Arm::Teacher | Arm::Student(0)));
//! ```

mod error;
mod handle;
mod share;
mod spec;
mod table;

pub use error::RouteError;
pub use handle::Router;
pub use share::{CanaryShare, StickyKey};
pub use spec::{RouteSpec, StudentSpec};
pub use table::{Arm, Decision, MAX_STUDENTS, Route, RoutingTable, Student, Target};
