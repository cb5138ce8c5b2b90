//! Why a routing table was refused.

/// A routing table that failed validation. The table in force stays as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The alias is empty.
    #[error("a route has an empty alias")]
    EmptyAlias,
    /// Two routes share one alias.
    #[error("route `{0}` is defined twice")]
    DuplicateAlias(String),
    /// A target names a model that is empty.
    #[error("route `{alias}` has a target with an empty model name")]
    EmptyModel { alias: String },
    /// A target names an upstream that the config does not define.
    #[error("route `{alias}` names unknown upstream `{upstream}`")]
    UnknownUpstream { alias: String, upstream: String },
    /// A model appears twice among a route's teacher and students (on one upstream or two):
    /// the admin API, the guard's statistics and the registry tell arms apart by model name.
    #[error(
        "route `{alias}` names model `{model}` twice (the second time on upstream `{upstream}`); a route's teacher and students must be different models"
    )]
    DuplicateTarget {
        alias: String,
        upstream: String,
        model: String,
    },
    /// The student shares add up to more than the whole.
    #[error("route `{alias}`: student shares add up to {total_bp} basis points, more than 10000")]
    SharesOverflow { alias: String, total_bp: u32 },
    /// A share outside 0–100%.
    #[error("share {0} is outside 0–100 percent")]
    ShareOutOfRange(String),
    /// A share finer than the 0.01% steps shares go in.
    #[error("share {0} is not a multiple of 0.01 percent")]
    ShareNotInSteps(String),
    /// The alias is not in the table.
    #[error("no route for alias `{0}`")]
    UnknownAlias(String),
    /// Two students' key ranges overlap: raising one would take the other's users.
    #[error(
        "route `{alias}`: the range of `{first}` would reach into that of `{second}`, whose users would move; lower or roll back `{second}` first"
    )]
    RangesOverlap {
        alias: String,
        first: String,
        second: String,
    },
    /// A student's range starts outside the key space.
    #[error("route `{alias}`: student `{model}` starts at {start}, outside 0-9999")]
    StartOutOfRange {
        alias: String,
        model: String,
        start: u16,
    },
    /// More students than a trace can name: [`crate::Arm::Student`] holds the index in a byte.
    #[error("route `{alias}` has {count} students; at most {max} fit, so retire some first", max = crate::table::MAX_STUDENTS)]
    TooManyStudents { alias: String, count: usize },
}
