//! References, in a request body, to what the account behind Forge's upstream key has stored:
//! files, vector stores, containers and items, which may be another client's.

use std::borrow::Cow;

use serde_json::value::RawValue;

use crate::error::Error;

/// How deep a scan goes: serde_json's own parser stops at 128 levels too.
const MAX_DEPTH: usize = 128;

/// The keys whose values the checks look at; the values of others are not kept.
const KEYS: [&str; 8] = [
    "file_id",
    "file_ids",
    "vector_store_ids",
    "container",
    "type",
    "id",
    "role",
    "audio",
];

/// One object's entries under [`KEYS`]: the key, and its value as raw JSON text.
type Object<'a> = [(&'static str, &'a str)];

/// Where an object lies.
#[derive(Debug, Clone, Copy)]
struct Place {
    /// How many arrays and objects hold it.
    depth: usize,
    /// Whether it is an element of an `annotations` array.
    annotation: bool,
}

/// Looks at one object's entries and place, and names the reference it makes, if any.
type Check<'c> = &'c dyn Fn(&Object<'_>, Place) -> Option<&'static str>;

/// The reference to a stored object in a chat request's `messages`, by the field that makes
/// it: a file by id (a `file` content part's `file_id`; a file sent inline, `file_data`, is not
/// one), or an earlier audio answer by id (an assistant message's `"audio": {"id": …}`).
pub(crate) fn chat_reference(messages: &RawValue) -> Result<Option<&'static str>, Error> {
    let text = messages.get().as_bytes();
    // The keys are spelt plainly, or with escapes the upstream decodes (`file\u005fid`); a
    // body with none of them is not read again.
    let needles: [&[u8]; 3] = [b"file_id", b"audio", b"\\u"];
    if needles
        .iter()
        .all(|needle| memchr::memmem::find(text, needle).is_none())
    {
        return Ok(None);
    }
    find(messages, "messages", None, &|object, place| {
        if names_any(object, &["file_id", "file_ids"]) {
            Some("file_id")
        } else if place.depth == 1
            && object
                .iter()
                .any(|(key, value)| *key == "audio" && value.starts_with('{') && has_id(value))
        {
            Some("audio")
        } else {
            None
        }
    })
}

/// The reference to a stored object in a Responses API `field` (`input`, `tools`, `prompt`),
/// by the name of the field that makes it: a file (`file_id`, `file_ids`: an `input_file` or
/// `input_image` part, in a message or a tool's output, an image mask, a prompt's variable, a
/// code interpreter's files), a vector store (`vector_store_ids`), a container by id
/// (`"container": "cntr_…"`) or a stored item (`{"type": "item_reference"}`, or an `input`
/// item with an `id` and neither `type` nor `role`, which the API reads as one). The client's
/// own data in these fields are strings, never objects, except a function's `parameters`, a
/// JSON schema where a property may well be called `file_id`: in `tools`, those are not looked
/// into.
pub(crate) fn responses_reference(
    field: &'static str,
    value: &RawValue,
) -> Result<Option<&'static str>, Error> {
    let skip = (field == "tools").then_some("parameters");
    find(value, field, skip, &|object, place| {
        // Every `type` the object gives: parsers differ on which of two wins.
        let kinds: Vec<Cow<'_, str>> = object
            .iter()
            .filter(|(key, value)| *key == "type" && value.starts_with('"'))
            .map(|(_, value)| decode(value))
            .collect();
        // An annotation on an output the client replays cites a file; the API reads nothing
        // through it. Only in an `annotations` list: elsewhere such a `type` proves nothing.
        let annotation = place.annotation
            && !kinds.is_empty()
            && kinds.iter().all(|kind| {
                matches!(
                    kind.as_ref(),
                    "file_citation" | "container_file_citation" | "file_path"
                )
            });
        if annotation {
            None
        } else if names_any(object, &["file_id", "file_ids"]) {
            Some("file_id")
        } else if names_any(object, &["vector_store_ids"]) {
            Some("vector_store_ids")
        } else if object
            .iter()
            .any(|(key, value)| *key == "container" && value.starts_with('"'))
        {
            Some("container")
        } else if kinds.iter().any(|kind| kind == "item_reference")
            || (field == "input"
                && place.depth == 1
                && names_any(object, &["id"])
                && !names_any(object, &["type", "role"]))
        {
            Some("item_reference")
        } else {
            None
        }
    })
}

/// Whether `object`, an object's JSON text, has an `id` that is not `null`.
fn has_id(object: &str) -> bool {
    // Nested no deeper than the text it came from, which was scanned already.
    scan(object, None, &|object, place| {
        (place.depth == 0 && names_any(object, &["id"])).then_some("id")
    })
    .map_or(true, |found| found.is_some())
}

/// Whether the object sets one of `keys` to anything but `null`. A key given twice counts if
/// either is set: parsers differ on which one wins.
fn names_any(object: &Object<'_>, keys: &[&str]) -> bool {
    object
        .iter()
        .any(|(key, value)| keys.contains(key) && *value != "null")
}

/// What `check` finds first in the objects of `value`, JSON text already validated, read in
/// one pass: `check` sees each object's entries under [`KEYS`] (keys decoded, as the upstream
/// decodes them) once the object ends, but not in the values under the key `skip`. Strings
/// other than keys are not decoded, so any valid text (an unpaired surrogate escape included)
/// is read. A 400 naming `field` past [`MAX_DEPTH`] levels.
fn find(
    value: &RawValue,
    field: &'static str,
    skip: Option<&str>,
    check: Check<'_>,
) -> Result<Option<&'static str>, Error> {
    scan(value.get(), skip, check).map_err(|()| {
        Error::invalid(
            format!("`{field}` is nested more than {MAX_DEPTH} levels deep."),
            Some(field),
        )
    })
}

/// What an object's next value is to its scan.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Key {
    /// One of [`KEYS`]: kept.
    Kept(&'static str),
    /// The key not looked into.
    Skip,
    /// `annotations`, whose list holds citations.
    Annotations,
    /// Any other key, or none yet.
    Other,
}

/// An open object or array.
#[derive(Debug)]
struct Frame<'a> {
    /// Where it starts in the text.
    start: usize,
    /// For an object, its entries under [`KEYS`] so far; `None` for an array.
    entries: Option<Vec<(&'static str, &'a str)>>,
    /// The key of the value that comes next, in an object.
    key: Key,
    /// Whether the next string in it is a key.
    expect_key: bool,
    /// Whether it lies in a value not looked into.
    skipped: bool,
    /// For an array, whether it is an `annotations` list; for an object, whether it is an
    /// element of one.
    annotations: bool,
}

fn scan<'a>(
    text: &'a str,
    skip: Option<&str>,
    check: Check<'_>,
) -> Result<Option<&'static str>, ()> {
    let bytes = text.as_bytes();
    let mut stack: Vec<Frame<'a>> = Vec::new();
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        match byte {
            b' ' | b'\t' | b'\n' | b'\r' | b':' => at += 1,
            b',' => {
                if let Some(frame) = stack.last_mut() {
                    frame.expect_key = frame.entries.is_some();
                }
                at += 1;
            }
            b'{' | b'[' => {
                if stack.len() >= MAX_DEPTH {
                    return Err(());
                }
                let parent = stack.last();
                let skipped = parent.is_some_and(|frame| frame.skipped || frame.key == Key::Skip);
                let annotations = parent.is_some_and(|frame| match byte {
                    b'[' => frame.key == Key::Annotations,
                    _ => frame.entries.is_none() && frame.annotations,
                });
                stack.push(Frame {
                    start: at,
                    entries: (byte == b'{').then(Vec::new),
                    key: Key::Other,
                    expect_key: byte == b'{',
                    skipped,
                    annotations,
                });
                at += 1;
            }
            b'}' | b']' => {
                at += 1;
                let Some(frame) = stack.pop() else {
                    return Ok(None);
                };
                if let (Some(entries), false) = (&frame.entries, frame.skipped)
                    && let Some(found) = check(
                        entries,
                        Place {
                            depth: stack.len(),
                            annotation: frame.annotations,
                        },
                    )
                {
                    return Ok(Some(found));
                }
                value_ends(&mut stack, text.get(frame.start..at).unwrap_or_default());
            }
            b'"' => {
                let end = string_end(bytes, at);
                let string = text.get(at..end).unwrap_or_default();
                match stack.last_mut() {
                    Some(frame) if frame.expect_key => {
                        let key = decode(string);
                        frame.key = match KEYS.iter().find(|k| **k == key) {
                            Some(kept) => Key::Kept(kept),
                            None if skip == Some(&*key) => Key::Skip,
                            None if key == "annotations" => Key::Annotations,
                            None => Key::Other,
                        };
                        frame.expect_key = false;
                    }
                    _ => value_ends(&mut stack, string),
                }
                at = end;
            }
            // A number, `true`, `false` or `null`: up to the next delimiter.
            _ => {
                let end = bytes[at..]
                    .iter()
                    .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                    .map_or(bytes.len(), |len| at + len);
                value_ends(&mut stack, text.get(at..end).unwrap_or_default());
                at = end;
            }
        }
    }
    Ok(None)
}

/// A value has ended: kept in its object if its key is one of [`KEYS`].
fn value_ends<'a>(stack: &mut [Frame<'a>], value: &'a str) {
    if let Some(frame) = stack.last_mut() {
        if let (Some(entries), Key::Kept(key)) = (&mut frame.entries, frame.key) {
            entries.push((key, value));
        }
        frame.key = Key::Other;
    }
}

/// Where the string that opens at `open` ends: just past its closing quote.
fn string_end(bytes: &[u8], open: usize) -> usize {
    let mut at = open + 1;
    loop {
        match bytes
            .get(at..)
            .and_then(|rest| memchr::memchr2(b'"', b'\\', rest))
        {
            Some(len) if bytes[at + len] == b'\\' => at += len + 2,
            Some(len) => return at + len + 1,
            None => return bytes.len(),
        }
    }
}

/// A JSON string (with its quotes) decoded, as the upstream decodes it. An unpaired surrogate
/// escape, which no key Forge looks for holds, becomes U+FFFD.
fn decode(quoted: &str) -> Cow<'_, str> {
    let inner = quoted
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(quoted);
    if !inner.contains('\\') {
        return Cow::Borrowed(inner);
    }
    let mut out = String::with_capacity(inner.len());
    let mut units: Vec<u16> = Vec::new();
    let mut rest = inner;
    while !rest.is_empty() {
        if let Some(hex) = rest.strip_prefix("\\u")
            && let Some(unit) = hex.get(..4).and_then(|h| u16::from_str_radix(h, 16).ok())
        {
            units.push(unit);
            rest = &hex[4..];
            continue;
        }
        out.extend(char::decode_utf16(units.drain(..)).map(|c| c.unwrap_or('\u{FFFD}')));
        let mut chars = rest.chars();
        match chars.next() {
            Some('\\') => {
                out.push(match chars.next() {
                    Some('n') => '\n',
                    Some('t') => '\t',
                    Some('r') => '\r',
                    Some('b') => '\u{8}',
                    Some('f') => '\u{c}',
                    Some(other) => other,
                    None => '\\',
                });
            }
            Some(c) => out.push(c),
            None => {}
        }
        rest = chars.as_str();
    }
    out.extend(char::decode_utf16(units).map(|c| c.unwrap_or('\u{FFFD}')));
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).unwrap()
    }

    /// Whether chat `messages` make any reference.
    fn names_file(messages: &RawValue) -> Result<bool, Error> {
        chat_reference(messages).map(|found| found.is_some())
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
    fn an_earlier_audio_answer_by_id_is_a_reference_and_audio_sent_inline_is_not() {
        let by_id = raw(
            r#"[{"role":"user","content":"hi"},{"role":"assistant","audio":{"id":"audio_x"}}]"#,
        );
        assert_eq!(chat_reference(&by_id).unwrap(), Some("audio"));
        let inline = raw(
            r#"[{"role":"user","content":[{"type":"input_audio","input_audio":{"data":"UklG","format":"wav"}}]}]"#,
        );
        assert_eq!(chat_reference(&inline).unwrap(), None);
        let no_audio = raw(r#"[{"role":"assistant","content":"hi","audio":null}]"#);
        assert_eq!(chat_reference(&no_audio).unwrap(), None);
        for no_id in [r#"{}"#, r#"{"id":null}"#, r#"{"data":{"id":"x"}}"#] {
            let audio = raw(&format!(r#"[{{"role":"assistant","audio":{no_id}}}]"#));
            assert_eq!(chat_reference(&audio).unwrap(), None, "{no_id}");
        }
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
            // An item by id alone, or with a null type, is a reference; a message with an id
            // is the client's own.
            ("input", r#"[{"id":"msg_x"}]"#, Some("item_reference")),
            (
                "input",
                r#"["hi", {"type":null,"id":"msg_x"}]"#,
                Some("item_reference"),
            ),
            (
                "input",
                r#"[{"role":"user","id":"msg_1","content":"hi"}]"#,
                None,
            ),
            (
                "input",
                r#"[{"type":"message","role":"user","id":"m","content":[]}]"#,
                None,
            ),
            ("prompt", r#"{"id":"pmpt_x","variables":{"a":"b"}}"#, None),
            // Below an item, an object with an id alone is the item's own data.
            (
                "input",
                r#"[{"type":"computer_call_output","call_id":"c","output":{"type":"computer_screenshot","image_url":"data:x"},"acknowledged_safety_checks":[{"id":"cu_sc_1","code":"c","message":"m"}]}]"#,
                None,
            ),
            // An output replayed with its citations: the files they name are not read.
            (
                "input",
                r#"[{"type":"message","role":"assistant","content":[{"type":"output_text","text":"t","annotations":[{"type":"container_file_citation","container_id":"cntr_1","file_id":"cfile_1"},{"type":"file_citation","file_id":"file-1","index":0}]}]}]"#,
                None,
            ),
            // Outside an `annotations` list, a citation's `type` exempts nothing.
            (
                "tools",
                r#"[{"type":"image_generation","input_image_mask":{"type":"file_citation","file_id":"file-x"}}]"#,
                Some("file_id"),
            ),
            // A second `type` does not make a file part an annotation.
            (
                "input",
                r#"[{"role":"user","content":[{"type":"input_file","type":"file_citation","file_id":"file-x"}]}]"#,
                Some("file_id"),
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
        // Within it, found at any depth, past any amount of other values.
        let padding = "0,".repeat(100_000);
        let deep = format!(
            "{}{padding}{{\"file_id\":\"x\"}}{}",
            "[".repeat(127),
            "]".repeat(127)
        );
        assert!(names_file(&raw(&deep)).unwrap());
    }

    #[test]
    fn keys_are_decoded_as_the_upstream_decodes_them() {
        for key in [
            r#""file_id""#,
            r#""file\u005fid""#,
            r#""fil\u0065_id""#,
            r#""file\u005Fids""#,
        ] {
            let messages = raw(&format!(r#"[{{"content":[{{"file":{{{key}:"f"}}}}]}}]"#));
            assert!(names_file(&messages).unwrap(), "{key}");
        }
        // Keys that only look alike, and one holding an unpaired surrogate, are no reference,
        // nor an error.
        for key in [
            r#""file_id ""#,
            r#""File_id""#,
            r#""\ud800""#,
            r#""file_id\ud800""#,
        ] {
            let messages = raw(&format!(r#"[{{"role":"user",{key}:"f"}}]"#));
            assert!(!names_file(&messages).unwrap(), "{key}");
        }
        // Escaped quotes and backslashes inside strings do not end them early.
        let messages = raw(r#"[{"content":"a \" \\","x":{"file_id":"f"}}]"#);
        assert!(names_file(&messages).unwrap());
        let messages = raw(r#"[{"content":"{\"file_id\":\"f\"}"}]"#);
        assert!(!names_file(&messages).unwrap());
    }

    mod against_a_tree {
        use proptest::prelude::*;
        use serde_json::Value;

        use super::{names_file, raw};

        /// JSON whose objects use a few keys, the ones looked for among them, and strings that
        /// hold the same words.
        fn json() -> impl Strategy<Value = Value> {
            let words = prop_oneof![
                Just("file_id"),
                Just("file_ids"),
                Just("type"),
                Just("item_reference"),
                Just("parameters"),
                Just("a"),
                Just("\u{e9}\"\\"),
            ];
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i32>().prop_map(Value::from),
                words.clone().prop_map(Value::from),
            ];
            leaf.prop_recursive(6, 48, 5, move |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                    prop::collection::btree_map(words.clone(), inner, 0..5).prop_map(|m| {
                        Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
                    }),
                ]
            })
        }

        /// The same question, asked of a parsed tree.
        fn tree_names_file(value: &Value) -> bool {
            match value {
                Value::Object(object) => {
                    ["file_id", "file_ids"]
                        .iter()
                        .any(|k| object.get(*k).is_some_and(|v| !v.is_null()))
                        || object.values().any(tree_names_file)
                }
                Value::Array(items) => items.iter().any(tree_names_file),
                _ => false,
            }
        }

        /// `value` as JSON text, with every key's letters escaped as `\uXXXX` when `escape`.
        fn write(value: &Value, escape: bool, out: &mut String) {
            match value {
                Value::Object(object) => {
                    out.push('{');
                    for (i, (key, value)) in object.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        if escape {
                            out.push('"');
                            for unit in key.encode_utf16() {
                                out.push_str(&format!("\\u{unit:04x}"));
                            }
                            out.push('"');
                        } else {
                            out.push_str(&Value::from(key.as_str()).to_string());
                        }
                        out.push_str(" : ");
                        write(value, escape, out);
                    }
                    out.push('}');
                }
                Value::Array(items) => {
                    out.push_str("[ ");
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push_str(" ,\n");
                        }
                        write(item, escape, out);
                    }
                    out.push(']');
                }
                other => out.push_str(&other.to_string()),
            }
        }

        proptest! {
            #[test]
            fn the_scan_answers_as_a_parsed_tree_does(value in json(), escape in any::<bool>()) {
                let mut text = String::new();
                write(&value, escape, &mut text);
                let wrapped = format!("[{text}]");
                prop_assert_eq!(
                    names_file(&raw(&wrapped)).unwrap(),
                    tree_names_file(&value),
                    "{}",
                    wrapped
                );
            }
        }
    }
}
