//! The training providers: OpenAI (and the simulated upstream), Azure OpenAI, Kubernetes LoRA + vLLM.
//!
//! Each implements [`TrainingProvider`](crate::distill::provider::TrainingProvider). A route's
//! config names one with [`ProviderConfig`], and [`ProviderConfig::build`] checks the settings
//! and makes the provider. Every provider maps errors the same way: a 429 (or a 503 with
//! `retry-after`) is [`ProviderError::RateLimited`](crate::distill::provider::ProviderError)
//! with the provider's wait, another error status is `Http` with the provider's message, a
//! connection that could not be made (so nothing was sent) is `NotSent`, and a connection that
//! failed later, or an unreadable answer, is `Transport`. No provider follows redirects, and
//! credentials travel only in headers marked sensitive.

mod azure;
mod client;
mod config;
mod fine_tuning;
mod kubernetes;
mod metrics;
mod naming;
mod openai;
#[cfg(test)]
mod tests;

pub use azure::AzureProvider;
pub use config::{
    AzureConfig, AzureDeploymentConfig, KubernetesConfig, OpenAiConfig, ProviderConfig,
    ProviderSetupError, SecretString,
};
pub use kubernetes::{
    KubernetesProvider, SERVICE_ACCOUNT_DIR, TRAINER_ENV_BASE_MODEL, TRAINER_ENV_BATCH_SIZE,
    TRAINER_ENV_DATASET_TOKEN, TRAINER_ENV_DATASET_URL, TRAINER_ENV_JOB_ID,
    TRAINER_ENV_LEARNING_RATE_MULTIPLIER, TRAINER_ENV_N_EPOCHS, TRAINER_ENV_OUTPUT_DIR,
};
pub use openai::OpenAiProvider;
