//! A chat request parsed just enough to route it, and re-emitted with only `model` changed.

use bytes::Bytes;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::Error;

/// The top level of a chat completions body: each key with its value as raw JSON text.
///
/// Values are borrowed, not parsed into a tree, so every value except `model` is forwarded
/// byte for byte (numbers keep their spelling, `arguments` strings are never re-serialised), and
/// parsing costs one validating pass over the body.
#[derive(Debug)]
pub struct ChatRequest<'a> {
    entries: Vec<(String, &'a RawValue)>,
    model: String,
    stream: bool,
}

impl<'a> ChatRequest<'a> {
    /// Parses and checks the fields the gateway relies on. Errors are 400s naming the field.
    pub fn parse(body: &'a [u8]) -> Result<Self, Error> {
        let entries = top_level(body)?;
        let mut model = None;
        let mut messages = false;
        let mut stream = false;
        for (key, value) in &entries {
            match key.as_str() {
                "model" => {
                    let name: String = serde_json::from_str(value.get())
                        .map_err(|_| Error::invalid("`model` must be a string.", Some("model")))?;
                    model = Some(name);
                }
                "messages" => {
                    // The value is already validated JSON: its first character says whether it is
                    // an array, and the next one whether it is empty. No second parse of the
                    // largest field of the body.
                    let mut text = value.get().trim_start().chars();
                    if text.next() != Some('[') {
                        return Err(Error::invalid(
                            "`messages` must be an array.",
                            Some("messages"),
                        ));
                    }
                    if text.as_str().trim_start().starts_with(']') {
                        return Err(Error::invalid(
                            "`messages` must contain at least one message.",
                            Some("messages"),
                        ));
                    }
                    messages = true;
                }
                "stream" => {
                    let flag: Option<bool> = serde_json::from_str(value.get()).map_err(|_| {
                        Error::invalid("`stream` must be a boolean.", Some("stream"))
                    })?;
                    stream = flag.unwrap_or(false);
                }
                _ => {}
            }
        }
        let model = match model {
            Some(m) if !m.is_empty() => m,
            _ => {
                return Err(Error::invalid(
                    "you must provide a model parameter",
                    Some("model"),
                ));
            }
        };
        if !messages {
            return Err(Error::invalid(
                "Missing required parameter: 'messages'.",
                Some("messages"),
            ));
        }
        Ok(Self {
            entries,
            model,
            stream,
        })
    }

    /// The model the client asked for: a route alias.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Whether the client asked for a stream.
    pub fn is_stream(&self) -> bool {
        self.stream
    }

    /// A top-level string field, such as `user` or `safety_identifier`.
    pub fn string_field(&self, key: &str) -> Option<String> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| serde_json::from_str::<String>(v.get()).ok())
    }

    /// The field by which a message names something stored on the account behind Forge's
    /// upstream key, which may be another client's: a file by id (another client's upload, or a
    /// training file holding every client's traces), or an earlier audio answer by id.
    pub fn stored_reference(&self) -> Result<Option<&'static str>, Error> {
        let Some((_, messages)) = self.entries.iter().find(|(key, _)| key == "messages") else {
            return Ok(None);
        };
        super::stored::chat_reference(messages)
    }

    /// The body to send upstream: the same keys and values, with `model` replaced.
    pub fn with_model(&self, model: &str) -> Bytes {
        let extra = model.len() + 2;
        let size = self
            .entries
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum::<usize>()
            + extra;
        let mut out = Vec::with_capacity(size);
        out.push(b'{');
        for (i, (key, value)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_json_string(&mut out, key);
            out.push(b':');
            if key == "model" {
                write_json_string(&mut out, model);
            } else {
                out.extend_from_slice(value.get().as_bytes());
            }
        }
        out.push(b'}');
        Bytes::from(out)
    }
}

/// A JSON object body's keys, each with its value as raw JSON text. A 400 when the body is not a
/// JSON object, or repeats a key: two parsers may pick different duplicates, so Forge refuses
/// rather than guess which one the upstream will honour.
pub(crate) fn top_level(body: &[u8]) -> Result<Vec<(String, &RawValue)>, Error> {
    let Entries(entries) = serde_json::from_slice(body).map_err(|e| {
        Error::invalid(
            format!("We could not parse the JSON body of your request: {e}."),
            None,
        )
    })?;
    if let Some(key) = first_duplicate(&entries) {
        return Err(Error::invalid(
            format!("Duplicate key `{key}` in the request body."),
            None,
        ));
    }
    Ok(entries)
}

/// The first key that appears twice. Pairwise for the few keys a real request has; hashed past
/// that, so that a body of many thousands of keys costs linear time, not minutes of a worker.
fn first_duplicate<'e>(entries: &'e [(String, &RawValue)]) -> Option<&'e str> {
    const PAIRWISE_MAX: usize = 32;
    if entries.len() <= PAIRWISE_MAX {
        return entries
            .iter()
            .enumerate()
            .find(|(i, (key, _))| entries[..*i].iter().any(|(k, _)| k == key))
            .map(|(_, (key, _))| key.as_str());
    }
    let mut seen = std::collections::HashSet::with_capacity(entries.len());
    entries
        .iter()
        .map(|(key, _)| key.as_str())
        .find(|key| !seen.insert(*key))
}

fn write_json_string(out: &mut Vec<u8>, s: &str) {
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// A JSON object's keys, decoded, each with its value as raw JSON text, in order and with any
/// repeats.
struct Entries<'a>(Vec<(String, &'a RawValue)>);

impl<'de> de::Deserialize<'de> for Entries<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn err(body: &str) -> String {
        let e = ChatRequest::parse(body.as_bytes()).unwrap_err();
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
        e.to_string()
    }

    #[test]
    fn rewrites_only_model_and_keeps_every_other_byte() {
        let body = r#"{"model":"alias","messages":[{"role":"user","content":"hi \u00e9"}],"temperature":1.50,"n":2,"stream":true,"tools":[{"type":"function","function":{"name":"f","parameters":{"a":1e3}}}]}"#;
        let req = ChatRequest::parse(body.as_bytes()).unwrap();
        assert_eq!(req.model(), "alias");
        assert!(req.is_stream());
        let out = req.with_model("gpt-\"4o\"");
        let expected = body.replace(r#""model":"alias""#, r#""model":"gpt-\"4o\"""#);
        assert_eq!(std::str::from_utf8(&out).unwrap(), expected);
    }

    #[test]
    fn malformed_bodies_are_400s_naming_the_field() {
        assert!(err("{not json").contains("parse"));
        assert!(err("[1,2]").contains("parse"));
        assert!(err(r#"{"messages":[{"role":"user","content":"x"}]}"#).contains("model"));
        assert!(err(r#"{"model":7,"messages":[]}"#).contains("model"));
        assert!(err(r#"{"model":"m"}"#).contains("messages"));
        assert!(err(r#"{"model":"m","messages":[]}"#).contains("at least one"));
        assert!(err(r#"{"model":"m","messages":{}}"#).contains("array"));
        assert!(err(r#"{"model":"m","messages":[{}],"stream":"yes"}"#).contains("stream"));
        assert!(err(r#"{"model":"a","model":"b","messages":[{}]}"#).contains("Duplicate"));
        // Past the pairwise check too: many keys, the duplicate last.
        let mut many: String = (0..5000).map(|i| format!(r#""k{i}":0,"#)).collect();
        many.push_str(r#""model":"a","messages":[{}],"k17":1"#);
        assert!(err(&format!("{{{many}}}")).contains("Duplicate key `k17`"));
        let unique: String = (0..5000).map(|i| format!(r#""k{i}":0,"#)).collect();
        let ok = format!(r#"{{{unique}"model":"a","messages":[{{}}]}}"#);
        assert!(ChatRequest::parse(ok.as_bytes()).is_ok());
        assert!(err("{\"model\":\"m\",\"messages\":[{}]} trailing").contains("parse"));
    }

    /// Any JSON value, a few levels deep.
    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("JSON has no NaN or infinities", |f| f.is_finite())
                .prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("\\PC{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        // The request normaliser is the first code to read untrusted bodies (the plan's F1):
        // whatever the body, it is refused with a 400 or forwarded with only `model` changed.
        #[test]
        fn any_body_is_refused_with_a_400_or_forwarded_with_only_model_changed(
            others in prop::collection::btree_map("[a-z_]{1,8}", json_value(), 0..6),
            // Mostly well-formed fields, so that about a fifth of the bodies are valid.
            alias in prop_oneof![
                3 => "\\PC{0,10}".prop_map(|m| Some(serde_json::Value::from(m))),
                1 => prop::option::of(json_value()),
            ],
            messages in prop_oneof![
                3 => prop::collection::vec(json_value(), 0..3)
                    .prop_map(|m| Some(serde_json::Value::Array(m))),
                1 => prop::option::of(json_value()),
            ],
            stream in prop_oneof![
                3 => prop::option::of(any::<bool>().prop_map(serde_json::Value::from)),
                1 => prop::option::of(json_value()),
            ],
            model in "\\PC{0,16}",
        ) {
            use serde_json::Value;
            let mut body: serde_json::Map<String, Value> = others.into_iter().collect();
            for (key, value) in [("model", alias), ("messages", messages), ("stream", stream)] {
                match value {
                    Some(v) => body.insert(key.to_string(), v),
                    None => body.remove(key),
                };
            }
            let bytes = serde_json::to_vec(&body).unwrap();
            let valid = matches!(body.get("model"), Some(Value::String(m)) if !m.is_empty())
                && matches!(body.get("messages"), Some(Value::Array(m)) if !m.is_empty())
                && matches!(body.get("stream"), None | Some(Value::Null | Value::Bool(_)));
            match ChatRequest::parse(&bytes) {
                Ok(req) => {
                    prop_assert!(valid, "accepted {body:?}");
                    prop_assert_eq!(req.is_stream(), body.get("stream") == Some(&Value::Bool(true)));
                    let out: Value = serde_json::from_slice(&req.with_model(&model)).unwrap();
                    // Parsed back the same way as the original, so numbers compare exactly.
                    let mut expected: serde_json::Map<String, Value> =
                        serde_json::from_slice(&bytes).unwrap();
                    expected.insert("model".into(), Value::from(model));
                    prop_assert_eq!(out, Value::Object(expected));
                }
                Err(e) => {
                    prop_assert!(!valid, "refused {body:?}: {e}");
                    prop_assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
                }
            }
        }

        // Two parsers may read a repeated key differently, so a body with one (however it
        // is spelled: `mod\u0065l` is `model`) is refused, and a body without any is judged
        // on its fields.
        #[test]
        fn a_repeated_key_is_refused_however_it_is_spelled(
            entries in prop::collection::vec(
                (prop::sample::select(vec!["model", "messages", "stream", "user", "n"]), any::<bool>()),
                1..7,
            ),
        ) {
            let written: Vec<String> = entries
                .iter()
                .map(|(key, escaped)| {
                    let name = if *escaped {
                        // The first letter as a JSON escape.
                        format!("\\u{:04x}{}", u32::from(key.as_bytes()[0]), &key[1..])
                    } else {
                        key.to_string()
                    };
                    let value = match *key {
                        "model" => r#""m""#,
                        "messages" => r#"[{"role":"user","content":"hi"}]"#,
                        "stream" => "true",
                        "user" => r#""u""#,
                        _ => "1",
                    };
                    format!("\"{name}\":{value}")
                })
                .collect();
            let body = format!("{{{}}}", written.join(","));
            let keys: Vec<&str> = entries.iter().map(|(key, _)| *key).collect();
            let repeated = keys.iter().enumerate().any(|(i, key)| keys[..i].contains(key));
            match ChatRequest::parse(body.as_bytes()) {
                Ok(req) => {
                    prop_assert!(!repeated, "accepted {body}");
                    prop_assert!(keys.contains(&"model") && keys.contains(&"messages"), "accepted {body}");
                    prop_assert_eq!(req.model(), "m");
                    prop_assert_eq!(req.is_stream(), keys.contains(&"stream"));
                }
                Err(e) => {
                    prop_assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
                    prop_assert!(
                        repeated || !(keys.contains(&"model") && keys.contains(&"messages")),
                        "refused {body}: {e}"
                    );
                    if repeated {
                        prop_assert!(e.to_string().contains("Duplicate"), "{body}: {e}");
                    }
                }
            }
        }

        #[test]
        fn arbitrary_bytes_are_refused_with_a_400_or_parsed(
            bytes in prop::collection::vec(any::<u8>(), 0..256),
            cut in any::<prop::sample::Index>(),
            flip in any::<(prop::sample::Index, u8)>(),
        ) {
            let valid = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
            let mut mutated = valid.to_vec();
            let at = flip.0.index(mutated.len());
            mutated[at] ^= flip.1;
            for body in [&bytes[..], &valid[..cut.index(valid.len())], &mutated[..]] {
                if let Err(e) = ChatRequest::parse(body) {
                    prop_assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
                }
            }
        }
    }

    #[test]
    fn user_field_is_readable() {
        let req = ChatRequest::parse(br#"{"model":"m","messages":[1],"user":"u-1","stream":null}"#)
            .unwrap();
        assert_eq!(req.string_field("user").as_deref(), Some("u-1"));
        assert!(!req.is_stream());
    }

    #[test]
    fn a_file_named_by_id_is_found_however_it_is_spelled() {
        let names = |messages: &str| {
            let body = format!(r#"{{"model":"m","messages":{messages}}}"#);
            ChatRequest::parse(body.as_bytes())
                .unwrap()
                .stored_reference()
                .unwrap()
                .is_some()
        };
        let part = r#"{"type":"file","file":{"file_id":"file-x"}}"#;
        assert!(names(&format!(r#"[{{"role":"user","content":[{part}]}}]"#)));
        assert!(names(
            r#"[{"role":"user","content":[{"type":"file","file":{"file\u005fid":"file-x"}}]}]"#
        ));
        assert!(names(
            r#"[{"role":"user","content":"hi"},{"role":"user","content":[{"type":"text","text":"\u00e9"},{"file":{"file_ids":["f"]}}]}]"#
        ));
        // Inline data, a null id, and the words in text are no reference.
        assert!(!names(
            r#"[{"role":"user","content":[{"type":"file","file":{"filename":"a.pdf","file_data":"data:application/pdf;base64,JVBE"}}]}]"#
        ));
        assert!(!names(
            r#"[{"role":"user","content":[{"type":"file","file":{"file_id":null,"file_data":"x"}}]}]"#
        ));
        assert!(!names(
            r#"[{"role":"user","content":"what is a file_id? \u00e9"}]"#
        ));
    }
}
