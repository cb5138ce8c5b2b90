//! Every environment variable Forge reads, in one place.

/// The config file for `forge serve`, when `--config` is not given.
pub const ENV_FORGE_CONFIG: &str = "FORGE_CONFIG";

/// Log filter, in `tracing-subscriber` `EnvFilter` syntax (default `info`).
pub const ENV_FORGE_LOG: &str = "FORGE_LOG";

/// The admin API's bearer token. Without it the admin listener does not start.
pub const ENV_FORGE_ADMIN_TOKEN: &str = "FORGE_ADMIN_TOKEN";

/// The secret in environment variable `var`, without surrounding whitespace, or `None` when it
/// is unset or blank. A key written from a file keeps the file's last newline (as
/// `kubectl create secret --from-file` does), and a presented key is trimmed too, so an untrimmed
/// one could never match. The distiller's provider keys are read the same way.
pub fn secret(var: &str) -> Option<String> {
    std::env::var(var)
        .ok()
        .map(|value| value.trim().to_string())
        .filter(|value| !value.is_empty())
}
