//! The distillation loop: golden traces → dataset → fine-tuning job → registry → canary.

pub mod provider;
pub mod providers;

pub use provider::{
    BoxFuture, Deployed, Hyperparameters, Progress, ProviderError, ProviderState, Submitted, TrainingProvider,
    TrainingRequest, retry_after,
};
