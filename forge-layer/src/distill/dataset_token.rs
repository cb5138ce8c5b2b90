//! Tokens that let a remote trainer fetch one job's dataset and nothing else.
//!
//! A Kubernetes Job's spec is readable by anyone who may read Jobs in its namespace, so the
//! token it carries must not be the admin token (which steers routes). It is an HMAC of the job
//! id under the admin token: the admin API checks it without storing anything, and it opens
//! only `GET /admin/datasets/{job}.jsonl`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// What the HMAC covers besides the job id, so these tokens sign nothing else.
const PURPOSE: &[u8] = b"forge dataset download\n";

/// The token for job `job_id`'s dataset, signed with `admin_token`.
pub fn dataset_token(admin_token: &str, job_id: &str) -> String {
    hex::encode(mac(admin_token, job_id).finalize().into_bytes())
}

/// Whether `presented` is the dataset token of `job_id` (compared in constant time).
pub fn dataset_token_matches(admin_token: &str, job_id: &str, presented: &str) -> bool {
    match hex::decode(presented) {
        Ok(bytes) => mac(admin_token, job_id).verify_slice(&bytes).is_ok(),
        Err(_) => false,
    }
}

fn mac(admin_token: &str, job_id: &str) -> Hmac<Sha256> {
    // HMAC takes a key of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(admin_token.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
    mac.update(PURPOSE);
    mac.update(job_id.as_bytes());
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_opens_its_own_job_only_and_is_not_the_admin_token() {
        let token = dataset_token("admin-secret", "dj_A");
        assert!(!token.contains("admin-secret"));
        assert!(dataset_token_matches("admin-secret", "dj_A", &token));
        assert!(!dataset_token_matches("admin-secret", "dj_B", &token));
        assert!(!dataset_token_matches("other-admin", "dj_A", &token));
        assert!(!dataset_token_matches("admin-secret", "dj_A", "not hex"));
        assert!(!dataset_token_matches("admin-secret", "dj_A", &token[..10]));
    }
}
