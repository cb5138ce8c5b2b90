//! Forge's engine: everything between the proxy and the store that does not speak HTTP itself.

pub mod capture;
pub mod dataset;
pub mod distill;
pub mod grade;
pub mod guard;
pub mod reassemble;
pub mod redact;
pub mod sse;
pub mod store;
pub mod trace;
