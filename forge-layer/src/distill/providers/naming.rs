//! Names derived from Forge's job id for what providers create: Kubernetes Jobs, Azure deployments, vLLM adapters.

use sha2::{Digest, Sha256};

/// Hex digits of the id's hash appended when an id has to be cut, so cut names stay distinct.
const HASH_CHARS: usize = 8;

/// Lowercase alphanumerics, every other run of characters turned into one `-`, no `-` at the ends.
pub(super) fn slug(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// A DNS-1123 label of at most `max` characters: `prefix` then the slug of `id`. `prefix` must
/// start with a lowercase letter and hold only what a label allows. The same id always gives
/// the same name, which makes a resubmission after a crash find what the first attempt created.
pub(super) fn dns_label(prefix: &str, id: &str, max: usize) -> String {
    let slug = slug(id);
    let whole = format!("{prefix}{slug}");
    if !slug.is_empty() && whole.len() <= max {
        return whole;
    }
    let hash = hex::encode(Sha256::digest(id.as_bytes()));
    let hash = &hash[..HASH_CHARS];
    let room = max.saturating_sub(prefix.len() + 1 + HASH_CHARS);
    // The slug is ASCII, so any byte index is a character boundary.
    let kept = slug[..slug.len().min(room)].trim_end_matches('-');
    let name = if kept.is_empty() {
        format!("{prefix}{hash}")
    } else {
        format!("{prefix}{kept}-{hash}")
    };
    let mut name: String = name.chars().take(max).collect();
    while name.ends_with('-') {
        name.pop();
    }
    name
}

/// The last `n` characters of the id's slug: the part of a ULID that differs between jobs.
pub(super) fn short_id(id: &str, n: usize) -> String {
    let slug = slug(id);
    let start = slug.len().saturating_sub(n);
    slug[start..].trim_start_matches('-').to_owned()
}
