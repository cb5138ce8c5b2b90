//! Forge's engine: everything between the proxy and the store that does not speak HTTP itself.
