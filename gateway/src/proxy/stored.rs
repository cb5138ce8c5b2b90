//! References, in a request body, to what the account behind Forge's upstream key has stored:
//! files, vector stores, containers and items, which may be another client's.

use serde_json::value::RawValue;

use super::request::Entries;
use crate::error::Error;

/// How deep a walk goes: serde_json's own parser stops at 128 levels too.
const MAX_DEPTH: usize = 128;

/// How many times over a walk may read its text. Each level reads the text of the containers
/// in it again, so a walk reads about its depth times the text: a chat message or a Responses
/// item is a few levels deep, while a body nested 127 levels just to be read 127 times would
/// cost a worker a second or more at the body limit.
const READS_PER_BYTE: usize = 16;

/// Looks at one object's keys and raw values, and names the reference it makes, if any.
type Check<'c> = &'c dyn Fn(&[(String, &RawValue)]) -> Option<&'static str>;

/// A chat request's `messages` name a file by id (a `file` content part's `file_id`). A file
/// sent inline (`file_data`) is not one.
pub(crate) fn names_file(messages: &RawValue) -> Result<bool, Error> {
    let text = messages.get().as_bytes();
    // The key is spelt `file_id`, or with escapes the upstream decodes (`file\u005fid`); a body
    // with neither is not read again.
    if memchr::memmem::find(text, b"file_id").is_none()
        && memchr::memmem::find(text, b"\\u").is_none()
    {
        return Ok(false);
    }
    let found = find(messages, "messages", None, &|object| {
        names_any(object, &["file_id", "file_ids"]).then_some("file_id")
    })?;
    Ok(found.is_some())
}

/// The reference to a stored object in a Responses API `field` (`input`, `tools`, `prompt`),
/// by the name of the field that makes it: a file (`file_id`, `file_ids`: an `input_file` or
/// `input_image` part, in a message or a tool's output, an image mask, a prompt's variable, a
/// code interpreter's files), a vector store (`vector_store_ids`), a container by id
/// (`"container": "cntr_…"`) or a stored item (`{"type": "item_reference"}`). The client's own
/// data in these fields are strings, never objects, except a function's `parameters`, a JSON
/// schema where a property may well be called `file_id`: in `tools`, those are not looked into.
pub(crate) fn responses_reference(
    field: &'static str,
    value: &RawValue,
) -> Result<Option<&'static str>, Error> {
    let skip = (field == "tools").then_some("parameters");
    find(value, field, skip, &|object| {
        if names_any(object, &["file_id", "file_ids"]) {
            Some("file_id")
        } else if names_any(object, &["vector_store_ids"]) {
            Some("vector_store_ids")
        } else if object
            .iter()
            .any(|(key, value)| key == "container" && value.get().trim_start().starts_with('"'))
        {
            Some("container")
        } else if object.iter().any(|(key, value)| {
            key == "type"
                && serde_json::from_str::<String>(value.get()).is_ok_and(|t| t == "item_reference")
        }) {
            Some("item_reference")
        } else {
            None
        }
    })
}

/// Whether the object sets one of `keys` to anything but `null`. A key given twice counts if
/// either is set: parsers differ on which one wins.
fn names_any(object: &[(String, &RawValue)], keys: &[&str]) -> bool {
    object
        .iter()
        .any(|(key, value)| keys.contains(&key.as_str()) && value.get().trim() != "null")
}

/// What `check` finds first in the objects of `value`, JSON text already validated: it sees
/// each object's keys (decoded, as the upstream decodes them) and raw values, outermost first;
/// the walk then goes into the object's values, but not those under the key `skip`, and into
/// arrays. Strings are never decoded, so any valid text (an unpaired surrogate escape included)
/// can be walked. A 400 naming `field` past [`MAX_DEPTH`] levels, or past [`READS_PER_BYTE`]
/// readings of the text.
fn find(
    value: &RawValue,
    field: &'static str,
    skip: Option<&str>,
    check: Check<'_>,
) -> Result<Option<&'static str>, Error> {
    let mut budget = value.get().len().saturating_mul(READS_PER_BYTE);
    walk(value, 0, &mut budget, skip, check)
        .map_err(|why| Error::invalid(format!("`{field}` {why}."), Some(field)))
}

fn walk(
    value: &RawValue,
    depth: usize,
    budget: &mut usize,
    skip: Option<&str>,
    check: Check<'_>,
) -> Result<Option<&'static str>, String> {
    let text = value.get().trim_start();
    let nested = matches!(text.as_bytes().first(), Some(b'{' | b'['));
    if nested && depth >= MAX_DEPTH {
        return Err(format!("is nested more than {MAX_DEPTH} levels deep"));
    }
    if nested {
        *budget = budget.checked_sub(text.len()).ok_or_else(|| {
            format!("is nested too deeply to be checked (more than {READS_PER_BYTE} readings of its text)")
        })?;
    }
    let inner: Vec<&RawValue> = match text.as_bytes().first() {
        Some(b'{') => {
            let Entries(object) = serde_json::from_str(text)
                .map_err(|e| format!("holds a key that cannot be read ({e})"))?;
            if let Some(found) = check(&object) {
                return Ok(Some(found));
            }
            object
                .into_iter()
                .filter(|(key, _)| skip != Some(key.as_str()))
                .map(|(_, value)| value)
                .collect()
        }
        Some(b'[') => serde_json::from_str(text).map_err(|e| format!("cannot be read ({e})"))?,
        _ => return Ok(None),
    };
    for value in inner {
        if let Some(found) = walk(value, depth + 1, budget, skip, check)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).unwrap()
    }

    #[test]
    fn text_that_serde_would_not_decode_is_walked_and_passes() {
        // An unpaired surrogate escape is valid JSON text; clients that cut a string mid-pair
        // send it, and it was forwarded before this check existed.
        let messages = raw(r#"[{"role":"user","content":"hi \ud800 there, a file_id"}]"#);
        assert!(!names_file(&messages).unwrap());
        let input = raw(r#"[{"role":"user","content":[{"type":"input_text","text":"\udc00"}]}]"#);
        assert_eq!(responses_reference("input", &input).unwrap(), None);
    }

    #[test]
    fn a_key_given_twice_counts_if_either_is_set() {
        let messages =
            raw(r#"[{"content":[{"type":"file","file":{"file_id":"file-x","file_id":null}}]}]"#);
        assert!(names_file(&messages).unwrap());
        let messages =
            raw(r#"[{"content":[{"type":"file","file":{"file_id":null,"file_id":"file-x"}}]}]"#);
        assert!(names_file(&messages).unwrap());
    }

    #[test]
    fn each_kind_of_reference_is_named_and_a_schema_is_not_looked_into() {
        let cases = [
            (
                "input",
                r#"[{"type":"item\u005freference","id":"msg_x"}]"#,
                Some("item_reference"),
            ),
            (
                "tools",
                r#"[{"type":"code_interpreter","container":"cntr_x"}]"#,
                Some("container"),
            ),
            // A container the call creates is no reference.
            (
                "tools",
                r#"[{"type":"code_interpreter","container":{"type":"auto"}}]"#,
                None,
            ),
            (
                "tools",
                r#"[{"type":"file_search","vector_store_ids":["vs_x"]}]"#,
                Some("vector_store_ids"),
            ),
            (
                "tools",
                r#"[{"type":"function","name":"f","parameters":{"properties":{"file_id":{"type":"string"}}}}]"#,
                None,
            ),
            (
                "prompt",
                r#"{"id":"p","variables":{"d":{"type":"input_file","file_id":"file-x"}}}"#,
                Some("file_id"),
            ),
            (
                "input",
                r#"[{"type":"input_file","file_data":"data:x"}]"#,
                None,
            ),
        ];
        for (field, text, expected) in cases {
            assert_eq!(
                responses_reference(field, &raw(text)).unwrap(),
                expected,
                "{text}"
            );
        }
    }

    #[test]
    fn nesting_past_the_limit_is_a_400_naming_the_field() {
        let deep = format!(r#"{}{{"file_id":"x"}}{}"#, "[".repeat(200), "]".repeat(200));
        let error = names_file(&raw(&deep)).unwrap_err();
        assert_eq!(error.status(), http::StatusCode::BAD_REQUEST);
        assert!(error.to_string().contains("`messages`"), "{error}");
        // Within it, found at any depth the readings allow: each level reads the text again.
        let deep = format!(r#"{}{{"file_id":"x"}}{}"#, "[".repeat(10), "]".repeat(10));
        assert!(names_file(&raw(&deep)).unwrap());
        // A body nested only to be read many times over is refused before it is.
        let padding = "0,".repeat(100_000);
        let deep = format!(
            "{}{padding}{{\"file_id\":\"x\"}}{}",
            "[".repeat(100),
            "]".repeat(100)
        );
        let error = names_file(&raw(&deep)).unwrap_err();
        assert!(error.to_string().contains("readings"), "{error}");
    }
}
