//! Shared state of one simulated upstream: behaviours, the API key, the request journal, files and jobs.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

use http::HeaderMap;

use super::config::{FineTuneTimings, ModelBehavior, Quality, SimConfig};
use super::error::ApiError;
use super::files::FileStore;
use super::fine_tuning::JobStore;
use super::journal::RequestJournal;

pub(crate) struct SimState {
    behaviors: RwLock<HashMap<String, ModelBehavior>>,
    default_behavior: ModelBehavior,
    pub(crate) fine_tune: FineTuneTimings,
    api_key: Option<String>,
    pub(crate) journal: RequestJournal,
    storage: Mutex<Storage>,
    /// Requests per model, for `fail_every`.
    served: Mutex<HashMap<String, u64>>,
}

/// Files and jobs live under one lock because a job that succeeds writes its result file.
#[derive(Default)]
pub(crate) struct Storage {
    pub(crate) files: FileStore,
    pub(crate) jobs: JobStore,
}

impl SimState {
    pub(crate) fn new(config: SimConfig) -> Self {
        Self {
            behaviors: RwLock::new(config.models),
            default_behavior: config.default_behavior,
            fine_tune: config.fine_tune,
            api_key: config.api_key,
            journal: RequestJournal::default(),
            storage: Mutex::new(Storage::default()),
            served: Mutex::new(HashMap::new()),
        }
    }

    /// Fine-tuned models answer well unless configured otherwise: they stand in for a student
    /// that learned from a good teacher.
    pub(crate) fn behavior(&self, model: &str) -> ModelBehavior {
        let behaviors = self
            .behaviors
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        match behaviors.get(model) {
            Some(behavior) => behavior.clone(),
            None if model.starts_with("ft:") => ModelBehavior {
                quality: Quality::Good,
                ..self.default_behavior.clone()
            },
            None => self.default_behavior.clone(),
        }
    }

    /// Whether this request to `model` is one that `fail_every` makes fail.
    pub(crate) fn fails_now(&self, model: &str, every: Option<u64>) -> bool {
        let every = every.unwrap_or(1).max(1);
        if every == 1 {
            return true;
        }
        let mut served = self.served.lock().unwrap_or_else(PoisonError::into_inner);
        let n = served.entry(model.to_owned()).or_insert(0);
        *n += 1;
        n.is_multiple_of(every)
    }

    pub(crate) fn set_behavior(&self, model: &str, behavior: ModelBehavior) {
        let mut behaviors = self
            .behaviors
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        behaviors.insert(model.to_owned(), behavior);
    }

    pub(crate) fn configured_models(&self) -> Vec<String> {
        let behaviors = self
            .behaviors
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut names: Vec<String> = behaviors.keys().cloned().collect();
        names.sort();
        names
    }

    pub(crate) fn storage(&self) -> MutexGuard<'_, Storage> {
        self.storage.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn check_api_key(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim);
        match presented {
            None | Some("") => Err(ApiError::missing_api_key()),
            Some(presented) if presented == key => Ok(()),
            Some(presented) => Err(ApiError::incorrect_api_key(presented)),
        }
    }
}
