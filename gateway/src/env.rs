//! Every environment variable Forge reads, in one place.

/// The config file for `forge serve`, when `--config` is not given.
pub const ENV_FORGE_CONFIG: &str = "FORGE_CONFIG";

/// Log filter, in `tracing-subscriber` `EnvFilter` syntax (default `info`).
pub const ENV_FORGE_LOG: &str = "FORGE_LOG";

/// The admin API's bearer token. Without it the admin listener does not start.
pub const ENV_FORGE_ADMIN_TOKEN: &str = "FORGE_ADMIN_TOKEN";
