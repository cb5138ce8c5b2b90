//! The body of `POST /v1/fine_tuning/jobs`, validated: model, files, suffix, seed, metadata and hyperparameters.

use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

use crate::sim::error::ApiError;

/// A hyperparameter as requested: `"auto"` or a number.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Setting {
    Auto,
    Integer(u64),
    Decimal(f64),
}

impl Serialize for Setting {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match *self {
            Setting::Auto => serializer.serialize_str("auto"),
            Setting::Integer(value) => serializer.serialize_u64(value),
            Setting::Decimal(value) => serializer.serialize_f64(value),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(super) struct Hyperparameters {
    n_epochs: Setting,
    batch_size: Setting,
    learning_rate_multiplier: Setting,
}

impl Hyperparameters {
    pub(super) const AUTO: Self = Self {
        n_epochs: Setting::Auto,
        batch_size: Setting::Auto,
        learning_rate_multiplier: Setting::Auto,
    };

    fn parse(value: &Value, param: &str) -> Result<Self, ApiError> {
        let object = match value {
            Value::Null => return Ok(Self::AUTO),
            Value::Object(object) => object,
            other => return Err(ApiError::invalid_type(param.to_owned(), "an object", other)),
        };
        let mut parsed = Self::AUTO;
        for (key, value) in object {
            let param = format!("{param}.{key}");
            match key.as_str() {
                "n_epochs" => parsed.n_epochs = integer_setting(value, &param, 1, 50)?,
                "batch_size" => parsed.batch_size = integer_setting(value, &param, 1, 256)?,
                "learning_rate_multiplier" => {
                    parsed.learning_rate_multiplier = match value {
                        Value::String(auto) if auto == "auto" => Setting::Auto,
                        Value::Number(n) if n.as_f64().is_some_and(|n| n > 0.0) => {
                            Setting::Decimal(n.as_f64().unwrap_or(1.0))
                        }
                        _ => {
                            return Err(ApiError::invalid_value(
                                param,
                                "Invalid value: expected \"auto\" or a number greater than 0.",
                            ));
                        }
                    };
                }
                _ => {
                    return Err(ApiError::invalid_request(format!(
                        "Unrecognized hyperparameter: '{key}'."
                    ))
                    .with_param(param));
                }
            }
        }
        Ok(parsed)
    }

    /// What "auto" means for a file of `examples` examples.
    pub(super) fn resolve(self, examples: usize) -> Resolved {
        let examples = examples as u64;
        let n_epochs = match self.n_epochs {
            Setting::Integer(n) => n,
            _ => 3,
        };
        let batch_size = match self.batch_size {
            Setting::Integer(n) => n,
            _ => examples.div_ceil(100).clamp(1, 256),
        };
        let learning_rate_multiplier = match self.learning_rate_multiplier {
            Setting::Decimal(value) => value,
            Setting::Integer(value) => value as f64,
            Setting::Auto => 1.8,
        };
        let steps_per_epoch = examples.div_ceil(batch_size).max(1);
        Resolved {
            n_epochs,
            batch_size,
            learning_rate_multiplier,
            steps_per_epoch,
            total_steps: steps_per_epoch * n_epochs,
        }
    }
}

fn integer_setting(value: &Value, param: &str, min: u64, max: u64) -> Result<Setting, ApiError> {
    match value {
        Value::String(auto) if auto == "auto" => Ok(Setting::Auto),
        Value::Number(n) if n.as_u64().is_some_and(|n| (min..=max).contains(&n)) => {
            Ok(Setting::Integer(n.as_u64().unwrap_or(min)))
        }
        _ => Err(ApiError::invalid_value(
            param.to_owned(),
            format!("Invalid value: expected \"auto\" or an integer from {min} to {max}."),
        )),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Resolved {
    pub(super) n_epochs: u64,
    batch_size: u64,
    learning_rate_multiplier: f64,
    pub(super) steps_per_epoch: u64,
    pub(super) total_steps: u64,
}

impl Resolved {
    pub(super) fn as_hyperparameters(&self) -> Hyperparameters {
        Hyperparameters {
            n_epochs: Setting::Integer(self.n_epochs),
            batch_size: Setting::Integer(self.batch_size),
            learning_rate_multiplier: Setting::Decimal(self.learning_rate_multiplier),
        }
    }
}

/// A validated `POST /fine_tuning/jobs` body.
pub(super) struct JobRequest {
    pub(super) model: String,
    pub(super) training_file: String,
    pub(super) validation_file: Option<String>,
    pub(super) suffix: Option<String>,
    pub(super) seed: Option<u64>,
    pub(super) metadata: Option<Value>,
    pub(super) integrations: Option<Value>,
    pub(super) hyperparameters: Hyperparameters,
}

impl JobRequest {
    pub(super) fn parse(request: &Map<String, Value>) -> Result<Self, ApiError> {
        const KNOWN: &[&str] = &[
            "model",
            "training_file",
            "validation_file",
            "suffix",
            "seed",
            "metadata",
            "integrations",
            "method",
            "hyperparameters",
        ];
        if let Some(key) = request.keys().find(|key| !KNOWN.contains(&key.as_str())) {
            return Err(ApiError::invalid_request(format!(
                "Unrecognized request argument supplied: {key}"
            )));
        }
        let model = required_string(request, "model")?;
        let training_file = required_string(request, "training_file")?;
        let validation_file = optional_string(request, "validation_file")?;
        let suffix = optional_string(request, "suffix")?;
        if let Some(suffix) = &suffix {
            if suffix.chars().count() > 64 {
                return Err(ApiError::invalid_value(
                    "suffix",
                    "Invalid 'suffix': string too long. Expected a string with maximum length 64.",
                ));
            }
            // A colon would make the model name ambiguous to parse.
            if suffix.contains(':') || suffix.chars().any(char::is_whitespace) {
                return Err(ApiError::invalid_value(
                    "suffix",
                    "Invalid 'suffix': it may not contain ':' or whitespace.",
                ));
            }
        }
        let seed = match request.get("seed") {
            None | Some(Value::Null) => None,
            Some(value) => match value.as_u64() {
                Some(seed) if seed <= 2_147_483_647 => Some(seed),
                _ => {
                    return Err(ApiError::invalid_value(
                        "seed",
                        "Invalid 'seed': expected an integer from 0 to 2147483647.",
                    ));
                }
            },
        };
        let metadata = match request.get("metadata") {
            None | Some(Value::Null) => None,
            Some(value) => Some(check_metadata(value)?),
        };
        let integrations = match request.get("integrations") {
            None | Some(Value::Null) => None,
            Some(value @ Value::Array(_)) => Some(value.clone()),
            Some(other) => return Err(ApiError::invalid_type("integrations", "an array", other)),
        };
        let hyperparameters = Self::hyperparameters(request)?;
        Ok(Self {
            model,
            training_file,
            validation_file,
            suffix,
            seed,
            metadata,
            integrations,
            hyperparameters,
        })
    }

    /// From `method.supervised.hyperparameters`, or the deprecated top-level `hyperparameters`.
    fn hyperparameters(request: &Map<String, Value>) -> Result<Hyperparameters, ApiError> {
        let top_level = request
            .get("hyperparameters")
            .filter(|value| !value.is_null());
        let method = match request.get("method") {
            None | Some(Value::Null) => None,
            Some(Value::Object(method)) => Some(method),
            Some(other) => return Err(ApiError::invalid_type("method", "an object", other)),
        };
        let Some(method) = method else {
            return match top_level {
                Some(value) => Hyperparameters::parse(value, "hyperparameters"),
                None => Ok(Hyperparameters::AUTO),
            };
        };
        match method.get("type").and_then(Value::as_str) {
            Some("supervised") => {}
            Some(kind @ ("dpo" | "reinforcement")) => {
                return Err(ApiError::invalid_value(
                    "method.type",
                    format!(
                        "The simulated upstream trains only with method type 'supervised', not \
                         '{kind}'."
                    ),
                ));
            }
            Some(other) => {
                return Err(ApiError::invalid_value(
                    "method.type",
                    format!(
                        "Invalid value: '{other}'. Supported values are: 'supervised', 'dpo', and \
                         'reinforcement'."
                    ),
                ));
            }
            None => return Err(ApiError::missing_parameter("method.type")),
        }
        let nested = method
            .get("supervised")
            .and_then(|supervised| supervised.get("hyperparameters"))
            .filter(|value| !value.is_null());
        match (nested, top_level) {
            (Some(_), Some(_)) => Err(ApiError::invalid_request(
                "Specify hyperparameters either in 'method' or in the deprecated top-level \
                 'hyperparameters', not both.",
            )
            .with_param("hyperparameters")),
            (Some(value), None) => {
                Hyperparameters::parse(value, "method.supervised.hyperparameters")
            }
            (None, Some(value)) => Hyperparameters::parse(value, "hyperparameters"),
            (None, None) => Ok(Hyperparameters::AUTO),
        }
    }
}

fn required_string(request: &Map<String, Value>, key: &'static str) -> Result<String, ApiError> {
    match request.get(key) {
        Some(Value::String(value)) if !value.is_empty() => Ok(value.clone()),
        None | Some(Value::Null) => Err(ApiError::missing_parameter(key)),
        Some(Value::String(_)) => Err(ApiError::invalid_value(
            key,
            format!("Invalid '{key}': empty string."),
        )),
        Some(other) => Err(ApiError::invalid_type(key, "a string", other)),
    }
}

fn optional_string(
    request: &Map<String, Value>,
    key: &'static str,
) -> Result<Option<String>, ApiError> {
    match request.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(value)) => Ok(Some(value.clone())),
        Some(other) => Err(ApiError::invalid_type(key, "a string", other)),
    }
}

/// OpenAI's metadata limits: at most 16 string pairs, keys up to 64 and values up to 512 chars.
fn check_metadata(value: &Value) -> Result<Value, ApiError> {
    let Some(map) = value.as_object() else {
        return Err(ApiError::invalid_type("metadata", "an object", value));
    };
    if map.len() > 16 {
        return Err(ApiError::invalid_value(
            "metadata",
            "Invalid 'metadata': too many properties. Expected an object with at most 16 properties.",
        ));
    }
    for (key, value) in map {
        let fits = key.chars().count() <= 64
            && value
                .as_str()
                .is_some_and(|value| value.chars().count() <= 512);
        if !fits {
            return Err(ApiError::invalid_value(
                format!("metadata.{key}"),
                "Invalid 'metadata': keys must be strings of at most 64 characters and values \
                 strings of at most 512 characters.",
            ));
        }
    }
    Ok(value.clone())
}
