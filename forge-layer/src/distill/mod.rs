//! The distillation loop: golden traces → dataset → fine-tuning job → registry → canary.

mod dataset_token;
pub mod evaluate;
pub mod job;
pub mod judge;
pub mod provider;
pub mod providers;
mod service;
mod undeploy;

pub use dataset_token::{dataset_token, dataset_token_matches};
pub use evaluate::{ChatClient, ChatError, EvalMethod};
pub use job::{DistillationJob, JobStatus, ModelRecord, ModelStatus};
pub use service::{
    CancelError, Deployer, DistillError, DistillSettings, DistillationService, JudgeModel,
    RouteDistill, parse_schedule, policy,
};

pub use provider::{
    BoxFuture, Deployed, Hyperparameters, Progress, ProviderError, ProviderState, Submitted,
    TrainingProvider, TrainingRequest, retry_after,
};
