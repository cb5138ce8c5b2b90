//! Removes secrets and, as configured, personal data from text before it is stored.
//!
//! Secrets (API keys, bearer tokens, JWTs) are always redacted. Each match is replaced with
//! `[REDACTED:kind]`. Candidates for cards and IBANs are checked (Luhn, ISO 7064 mod 97) so
//! that ordinary long numbers are left alone.

use std::cell::RefCell;
use std::sync::OnceLock;

use regex::Regex;
use regex_automata::{Input, MatchKind, PatternSet, meta, nfa::thompson::WhichCaptures};
use serde_json::Value;
use serde_json::value::RawValue;

/// A kind of sensitive string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `sk-ant-…`
    AnthropicKey,
    /// `sk-…`, `sk-proj-…`
    OpenaiKey,
    /// `AKIA…`/`ASIA…` access key ids and `aws_secret_access_key = …`.
    AwsKey,
    /// `ghp_…`, `github_pat_…`
    GithubToken,
    /// `eyJ….eyJ….…`
    Jwt,
    /// `Bearer …`
    BearerToken,
    /// `Authorization: Basic …` (or a `Basic` token with digits or padding).
    BasicAuth,
    /// Google API keys, `AIza…`.
    GoogleKey,
    /// Slack tokens, `xoxb-…` and the like.
    SlackToken,
    /// A labelled secret: `api-key: …`, `password=…`, `client_secret: …` (an Azure key is 32
    /// bare hex digits; only its label gives it away). The value must hold a digit.
    Credential,
    /// Email addresses.
    Email,
    /// Phone numbers.
    Phone,
    /// Payment card numbers that pass the Luhn check.
    Card,
    /// IBANs that pass the mod-97 check.
    Iban,
    /// IPv4 and IPv6 addresses.
    Ip,
}

impl Kind {
    /// Every kind, secrets first: a secret inside a longer match is caught before PII rules run.
    pub const ALL: [Kind; 15] = [
        Kind::AnthropicKey,
        Kind::OpenaiKey,
        Kind::AwsKey,
        Kind::GithubToken,
        Kind::Jwt,
        Kind::BearerToken,
        Kind::BasicAuth,
        Kind::GoogleKey,
        Kind::SlackToken,
        Kind::Credential,
        Kind::Email,
        // An IBAN's digits can pass Luhn, so IBANs are matched before cards.
        Kind::Iban,
        Kind::Card,
        Kind::Ip,
        Kind::Phone,
    ];

    /// The PII kinds, which config may switch off.
    pub const PII: [Kind; 5] = [Kind::Email, Kind::Phone, Kind::Card, Kind::Iban, Kind::Ip];

    /// The name used in `[REDACTED:…]` and in config.
    pub fn name(self) -> &'static str {
        match self {
            Kind::AnthropicKey => "anthropic_key",
            Kind::OpenaiKey => "openai_key",
            Kind::AwsKey => "aws_key",
            Kind::GithubToken => "github_token",
            Kind::Jwt => "jwt",
            Kind::BearerToken => "bearer_token",
            Kind::BasicAuth => "basic_auth",
            Kind::GoogleKey => "google_key",
            Kind::SlackToken => "slack_token",
            Kind::Credential => "credential",
            Kind::Email => "email",
            Kind::Phone => "phone",
            Kind::Card => "card",
            Kind::Iban => "iban",
            Kind::Ip => "ip",
        }
    }

    /// Parses a config name.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    fn pattern(self) -> &'static str {
        match self {
            // After a word boundary or an underscore (`OPENAI_KEY_sk-…`), not inside a word
            // (`risk-management-…`).
            Kind::AnthropicKey => r"(?:\b|_)sk-ant-[A-Za-z0-9_-]{20,}",
            Kind::OpenaiKey => r"(?:\b|_)sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}",
            Kind::AwsKey => {
                r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|(?i:aws_secret_access_key)[\x22']?\s*[:=]\s*[\x22']?[A-Za-z0-9/+=]{40}"
            }
            Kind::GithubToken => {
                r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})"
            }
            Kind::Jwt => r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}",
            Kind::BearerToken => r"(?i:\bbearer)\s+[A-Za-z0-9._~+/=-]{16,}",
            Kind::BasicAuth => {
                r"(?i:\bauthorization[\x22']?\s*[:=]\s*[\x22']?)?(?i:\bbasic)\s+[A-Za-z0-9+/]{8,}={0,2}"
            }
            Kind::GoogleKey => r"\bAIza[0-9A-Za-z_-]{35}",
            Kind::SlackToken => r"\bxox[abposr]-[A-Za-z0-9-]{10,}",
            Kind::Credential => {
                // After an underscore too: `AZURE_OPENAI_API_KEY=…`, `DB_PASSWORD=…`.
                r"(?i:(?:\b|_)(?:api[-_ ]?key|x-api-key|secret[-_ ]?(?:access[-_ ]?)?key|client[-_ ]?secret|access[-_ ]?token|auth[-_ ]?token|password|passwd))[\x22']?\s*[:=]\s*[\x22']?[A-Za-z0-9._~+/=-]{8,}"
            }
            Kind::Email => r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
            // International (+CC …), US with a bracketed area code, or US with - or . separators;
            // bare digit groups with spaces are too often other numbers.
            Kind::Phone => {
                r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)|\d{1,4})(?:[ .-]?\d{2,4}){2,4}\b|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}\b|\b\d{3}[.-]\d{3}[.-]\d{4}\b"
            }
            Kind::Card => r"\b\d(?:[ -]?\d){12,18}\b",
            Kind::Iban => r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b",
            Kind::Ip => {
                r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b|\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b|\b(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:){0,5}[0-9A-Fa-f]{1,4}\b"
            }
        }
    }

    /// The part of a match to redact: all of it, or for a card whose match ran on into other
    /// digit groups (an expiry date, a CVV, a reference before it: `4111 1111 1111 1111 12/26`),
    /// the longest run of whole groups that passes the Luhn check. `None` to leave it.
    fn accepted_span(self, candidate: &str) -> Option<std::ops::Range<usize>> {
        if self.accepts(candidate) {
            return Some(0..candidate.len());
        }
        if self != Kind::Card {
            return None;
        }
        let seps: Vec<usize> = candidate
            .char_indices()
            .filter(|&(_, c)| c == ' ' || c == '-')
            .map(|(i, _)| i)
            .collect();
        let starts = std::iter::once(0).chain(seps.iter().map(|&i| i + 1));
        let ends: Vec<usize> = seps.iter().copied().chain([candidate.len()]).collect();
        starts
            .flat_map(|start| ends.iter().map(move |&end| start..end))
            .filter(|span| span.start < span.end && luhn_valid(&candidate[span.clone()]))
            .max_by_key(|span| (span.len(), std::cmp::Reverse(span.start)))
    }

    /// Extra checks that a regex cannot express.
    fn accepts(self, candidate: &str) -> bool {
        match self {
            Kind::Card => luhn_valid(candidate),
            Kind::Iban => iban_valid(candidate),
            Kind::Phone => {
                (7..=15).contains(&candidate.chars().filter(char::is_ascii_digit).count())
            }
            // "basic understanding" is prose: a bare token counts when it has a digit or
            // base64 padding or symbols; after `Authorization:` any token does.
            Kind::BasicAuth => {
                candidate.to_ascii_lowercase().starts_with("authorization")
                    || candidate.split_whitespace().last().is_some_and(|token| {
                        token.contains(|c: char| c.is_ascii_digit() || "=+/".contains(c))
                    })
            }
            // "password: remember to rotate it" is prose; secrets hold digits.
            Kind::Credential => candidate
                .split([':', '='])
                .skip(1)
                .any(|value| value.contains(|c: char| c.is_ascii_digit())),
            _ => true,
        }
    }
}

struct Compiled {
    /// Every pattern in one automaton that reports all the patterns that match.
    set: Option<meta::Regex>,
    each: Vec<(Kind, Regex)>,
}

fn compiled() -> &'static Compiled {
    static COMPILED: OnceLock<Compiled> = OnceLock::new();
    COMPILED.get_or_init(|| {
        // ASCII-only `\b`, `\d` and `\s`: every pattern describes ASCII tokens, and Unicode word
        // boundaries push the regex engine off its DFA for any non-ASCII text (measured: 2.5 µs
        // vs 340 µs for 1.6 KB with a few accented letters). A non-ASCII letter next to a match
        // now counts as a boundary, which can only redact more, never less.
        let ascii = |k: Kind| format!("(?-u){}", k.pattern());
        let each: Vec<(Kind, Regex)> = Kind::ALL
            .iter()
            .filter_map(|&k| Regex::new(&ascii(k)).ok().map(|r| (k, r)))
            .collect();
        // Built as `regex::RegexSet` builds its own. The patterns are constants tested below;
        // without a set nothing would be redacted.
        let patterns: Vec<String> = each.iter().map(|&(k, _)| ascii(k)).collect();
        let set = meta::Builder::new()
            .configure(
                meta::Config::new()
                    .match_kind(MatchKind::All)
                    .which_captures(WhichCaptures::None),
            )
            .build_many(&patterns)
            .ok();
        Compiled { set, each }
    })
}

/// One thread's search state for the pattern set. Every string of every trace goes through the
/// set, on whichever threads encode traces. `regex::RegexSet` lends its state from a pool whose
/// fast path only its first thread gets; any other thread takes a lock for it, and checking a
/// request and a 2 KB completion there took 10.3–11.3 µs against 7.5–7.7 µs with this cache
/// (the first thread's fast path: 7.8–8.2 µs). A cache per thread costs one thread-local lookup.
struct SetScratch {
    cache: Option<meta::Cache>,
    hits: PatternSet,
}

impl SetScratch {
    fn new() -> Self {
        let set = compiled().set.as_ref();
        Self {
            cache: set.map(meta::Regex::create_cache),
            hits: PatternSet::new(set.map_or(0, meta::Regex::pattern_len)),
        }
    }

    /// Which patterns match somewhere in `text`, as a bit per index into `Compiled::each`.
    fn matching(&mut self, text: &str) -> u64 {
        let (Some(set), Some(cache)) = (&compiled().set, &mut self.cache) else {
            return 0;
        };
        self.hits.clear();
        set.which_overlapping_matches_with(cache, &Input::new(text), &mut self.hits);
        self.hits
            .iter()
            .fold(0, |bits, pattern| bits | 1 << pattern.as_usize())
    }
}

// One bit per pattern in `SetScratch::matching`'s answer.
const _: () = assert!(Kind::ALL.len() <= 64);

/// Which patterns match somewhere in `text` (see [`SetScratch::matching`]).
fn matching_patterns(text: &str) -> u64 {
    thread_local! {
        static SCRATCH: RefCell<SetScratch> = RefCell::new(SetScratch::new());
    }
    // Neither fails in practice (the search calls nothing that redacts, so the cell is never
    // borrowed twice; and the thread is not exiting); if either did, a fresh state does.
    SCRATCH
        .try_with(|scratch| {
            scratch
                .try_borrow_mut()
                .map(|mut scratch| scratch.matching(text))
                .ok()
        })
        .ok()
        .flatten()
        .unwrap_or_else(|| SetScratch::new().matching(text))
}

/// What to redact.
#[derive(Debug, Clone)]
pub struct Redactor {
    /// The kinds to redact, a bit each as in [`possible_kinds`].
    enabled: u64,
}

impl Default for Redactor {
    /// Secrets and every PII kind.
    fn default() -> Self {
        Self::with_pii(&Kind::PII)
    }
}

/// The most passes after the first. A pass changes something only where a marker uncovers a
/// new match, which takes a contrived text; the bound keeps even that finite.
const MAX_PASSES: usize = 8;

impl Redactor {
    /// Secrets always, plus the PII kinds listed.
    pub fn with_pii(pii: &[Kind]) -> Self {
        let enabled = Kind::ALL
            .into_iter()
            .filter(|kind| !Kind::PII.contains(kind) || pii.contains(kind))
            .fold(0, |bits, kind| bits | bit(kind));
        Self { enabled }
    }

    /// Redacts one string; returns `None` when it holds nothing to redact (the common case,
    /// decided in a single pass).
    pub fn redact_str(&self, text: &str) -> Option<String> {
        let mut out = self.redact_pass(text)?;
        // A replacement can uncover a match that the original text hid: an address that ran
        // straight into a key (`a@b.io_sk-…`) only ends where the key's marker begins. So
        // passes repeat until one changes nothing, in practice one more.
        for _ in 0..MAX_PASSES {
            match self.redact_pass(&out) {
                Some(again) => out = again,
                None => break,
            }
        }
        Some(out)
    }

    /// One pass of every enabled pattern; `None` when it changes nothing.
    fn redact_pass(&self, text: &str) -> Option<String> {
        if too_plain_to_match(text) || possible_kinds(text) & self.enabled == 0 {
            return None;
        }
        self.search_pass(text)
    }

    /// One pass of the pattern set, without the rule-outs before it.
    fn search_pass(&self, text: &str) -> Option<String> {
        let hits = matching_patterns(&unescaped_view(text));
        if hits == 0 {
            return None;
        }
        let mut out: Option<String> = None;
        for (i, (kind, regex)) in compiled().each.iter().enumerate() {
            if self.enabled & hits & 1 << i == 0 {
                continue;
            }
            let current = out.as_deref().unwrap_or(text);
            if let Some(replaced) = replace_kind(*kind, regex, current) {
                out = Some(replaced);
            }
        }
        out.filter(|s| s != text)
    }

    /// Redacts a key's beginning left at the very end of `text` by an answer that was cut (at
    /// `max_tokens`, by a client that left, by a broken stream or the capture cap): the
    /// patterns need a whole key, and a GitHub token one character short, or a Google key, is
    /// as good as whole to whoever guesses the rest. `None` when the end holds none: a key
    /// prefix followed by at least [`CUT_KEY_MIN`] of its kind's characters, at a word's start,
    /// running to the end; or such a run of a labelled secret's characters after its label
    /// (`Bearer`, `aws_secret_access_key =`). Read, as the patterns are, in
    /// [`unescaped_view`]: text can hold JSON of its own. For the text of an answer that was
    /// cut, after [`Redactor::redact_str`].
    pub fn redact_cut_key(&self, text: &str) -> Option<String> {
        // Only the end is read: a key longer than this would have matched whole.
        let mut floor = text.len().saturating_sub(CUT_KEY_SCAN);
        while !text.is_char_boundary(floor) {
            floor += 1;
        }
        let (kind, at) = cut_key_at(&unescaped_view(&text[floor..]))?;
        Some(format!("{}[REDACTED:{}]", &text[..floor + at], kind.name()))
    }

    /// Redacts every string in a JSON tree, in place: values, and object keys too (a key can
    /// be a secret, in `metadata` say).
    pub fn redact_json(&self, value: &mut Value) {
        match value {
            Value::String(s) => {
                if let Some(clean) = self.redact_str(s) {
                    *s = clean;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.redact_json(v)),
            Value::Object(map) => {
                // A field named for a secret labels its value, which may match no pattern (an
                // Azure key is 32 hex digits).
                for (key, value) in map.iter_mut() {
                    if let Value::String(text) = value
                        && is_secret_label(key)
                        && labelled_secret(text)
                    {
                        *text = format!("[REDACTED:{}]", Kind::Credential.name());
                    }
                }
                // Nothing shorter than an address like `a@b.io` can match.
                let dirty: Vec<(String, String)> = map
                    .keys()
                    .filter(|key| key.len() >= 6)
                    .filter_map(|key| self.redact_str(key).map(|clean| (key.clone(), clean)))
                    .collect();
                for (key, clean) in dirty {
                    if let Some(v) = map.remove(&key) {
                        map.insert(clean, v);
                    }
                }
                map.values_mut().for_each(|v| self.redact_json(v));
            }
            _ => {}
        }
    }
}

impl Redactor {
    /// Whether [`Redactor::redact_json`] would change nothing in `json`: every string, object
    /// keys included, checked as `redact_json` checks it, without building the tree.
    pub fn json_is_clean(&self, json: &RawValue) -> bool {
        let text = json.get();
        if memchr::memchr(b'\\', text.as_bytes()).is_some() {
            return self.json_walk_is_clean(text);
        }
        // In JSON without escapes a quote only opens or closes a string, so the quotes pair up
        // in order, and what each pair holds is a string exactly as it decodes: no parse is
        // needed to find them (measured: the parse was most of the check's cost).
        let bytes = text.as_bytes();
        let mut quotes = memchr::memchr_iter(b'"', bytes);
        // Where the value of a field named for a secret opens, if it is a string.
        let mut labelled_at = None;
        while let (Some(open), Some(close)) = (quotes.next(), quotes.next()) {
            let string = &text[open + 1..close];
            if self.redact_pass(string).is_some()
                || (labelled_at == Some(open) && labelled_secret(string))
            {
                return false;
            }
            labelled_at = None;
            if is_secret_label(string) {
                // A key is followed by `:`, and its value opens after it.
                let after =
                    |from: usize| (from..bytes.len()).find(|&i| !bytes[i].is_ascii_whitespace());
                if let Some(colon) = after(close + 1).filter(|&i| bytes[i] == b':') {
                    labelled_at = after(colon + 1);
                }
            }
        }
        true
    }

    /// [`Redactor::json_is_clean`] by walking the parsed text, escapes decoded: for JSON with
    /// escapes. Text that is not one JSON value is not clean.
    fn json_walk_is_clean(&self, json: &str) -> bool {
        let mut de = serde_json::Deserializer::from_str(json);
        let walk = CleanJson {
            redactor: self,
            labelled: false,
        };
        serde::de::DeserializeSeed::deserialize(walk, &mut de).is_ok() && de.end().is_ok()
    }
}

/// Walks a JSON value and fails at the first string that redaction would change.
#[derive(Clone, Copy)]
struct CleanJson<'r> {
    redactor: &'r Redactor,
    /// The value of a field named for a secret: a string there is one.
    labelled: bool,
}

impl CleanJson<'_> {
    /// Whether redaction leaves string `s` as it is.
    fn is_clean(self, s: &str) -> bool {
        self.redactor.redact_pass(s).is_none() && !(self.labelled && labelled_secret(s))
    }

    /// The walk of values inside this one.
    fn inner(self) -> Self {
        Self {
            labelled: false,
            ..self
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for CleanJson<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for CleanJson<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON with nothing to redact")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    // Escaped or not, a string arrives here decoded: the text redaction would see.
    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<(), E> {
        if self.is_clean(s) {
            Ok(())
        } else {
            Err(E::custom("holds something to redact"))
        }
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(self.inner())?.is_some() {}
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let walk = self.inner();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if !walk.is_clean(&key) {
                return Err(serde::de::Error::custom("holds something to redact"));
            }
            map.next_value_seed(CleanJson {
                labelled: is_secret_label(&key),
                ..walk
            })?;
        }
        Ok(())
    }
}

/// The names of fields that hold a secret, compared without case at the end of a key, after
/// `_` or `-` (`AZURE_OPENAI_API_KEY`, `x-api-key`, `db_password`) or as the whole key.
const SECRET_LABELS: [&str; 24] = [
    "apikey",
    "api_key",
    "api-key",
    "secretkey",
    "secret_key",
    "secret-key",
    "secret_access_key",
    "secretaccesskey",
    "secret-access-key",
    "clientsecret",
    "client_secret",
    "client-secret",
    "accesstoken",
    "access_token",
    "access-token",
    "authtoken",
    "auth_token",
    "auth-token",
    "refreshtoken",
    "refresh_token",
    "refresh-token",
    "password",
    "passwd",
    "authorization",
];

/// Whether `key` names a field that holds a secret (see [`SECRET_LABELS`]).
fn is_secret_label(key: &str) -> bool {
    let key = key.as_bytes();
    // Every label ends in one of these: most strings are out after one look.
    if !(6..=64).contains(&key.len())
        || !matches!(
            key[key.len() - 1].to_ascii_lowercase(),
            b'y' | b'd' | b'n' | b't'
        )
    {
        return false;
    }
    SECRET_LABELS.iter().any(|label| {
        let label = label.as_bytes();
        key.len() >= label.len() && {
            let (before, end) = key.split_at(key.len() - label.len());
            end.eq_ignore_ascii_case(label)
                && before.last().is_none_or(|b| matches!(b, b'_' | b'-'))
        }
    })
}

/// Whether `value`, in a field named for a secret, is one: long enough to be a key or a
/// password (not `string`, or empty), and not redacted already.
fn labelled_secret(value: &str) -> bool {
    value.len() >= 8 && !value.starts_with("[REDACTED:")
}

/// The length from which a text of only plain bytes (see [`is_plain`]) can hold a match: `xoxb-`
/// and ten more is the shortest token whose marker is plain (`sk-…` needs 23 bytes, `ghp_…` 40).
const PLAIN_MATCH_MIN: usize = 15;

/// Lowercase ASCII letters, `_`, `.` and `-`: every pattern needs a byte outside these (a digit,
/// a capital, whitespace, `@`, `:`, `=`, `+`, `(`) or is a token of [`PLAIN_MATCH_MIN`] bytes
/// or more.
fn is_plain(b: u8) -> bool {
    b.is_ascii_lowercase() || matches!(b, b'_' | b'.' | b'-')
}

/// Whether `text` is too short and plain for any pattern to match in it. Most strings of a chat
/// exchange are such (`role`, `finish_reason`, `assistant`, every object key), and a search costs
/// about 0.1 µs however short the text, most of what redaction spends on a request.
fn too_plain_to_match(text: &str) -> bool {
    text.len() < PLAIN_MATCH_MIN && text.bytes().all(is_plain)
}

/// The bit of `kind` in masks indexed like [`Kind::ALL`].
fn bit(kind: Kind) -> u64 {
    Kind::ALL
        .iter()
        .position(|&k| k == kind)
        .map_or(0, |i| 1 << i)
}

/// The kinds that may have a match in `text`, as a bit per index into [`Kind::ALL`]: a kind is
/// left out only when `text` lacks something every match of it needs (tested against each
/// kind's search below). Each need is a byte that prose seldom holds, a literal found from such
/// a byte, or a shape of digits checked only where there are digits, so prose is passed over at
/// the speed of a vectorised byte search, where the pattern set's automaton steps through every
/// byte (`benches/ROUNDS.md`). Prose keeps `:`, `_` and numbers of its own (`Note: in 2023`,
/// `completion_tokens`) without going on to the search. Text that has what some kind needs
/// does, as code, logs and tables of numbers often do: for them the screen saves nothing.
///
/// - `-` after `sk` (OpenAI, Anthropic), or two bytes after `xox` (Slack's `xoxb-`);
/// - `AKIA`, `ASIA` or `aws_secret_access_key` in any case (AWS), `gh` and one of `pousr`
///   before `_`, or `github_pat_` (GitHub), `eyJ` (JWT), `AIza` (Google);
/// - `bearer` or `basic` in any case;
/// - `:` or `=`, a digit, and `key`, `secret`, `token` or `passw` in any case (a labelled
///   credential's separator, the digit its value must hold, and a piece of every label);
/// - `@` (email);
/// - a digit, `.`, digits, `.` and a digit (IPv4), or a `:` after a hex digit or a `:` and
///   before a hex digit (IPv6: `1:2` in the full form, `::1` in the short one);
/// - seven digits (a phone number has 7 to 15) and `+` or `(` before a digit, or the whole
///   US form with `.` or `-` (`555-867-5309`), which dates (`gpt-4o-2024-08-06`) lack;
/// - thirteen digits in a row, with at most one ` `, `-` or `\` between two (a card has 13
///   to 19);
/// - two capitals and two digits in a row (an IBAN's start).
///
/// Each is made of bytes other than spaces, so it holds for the text when it holds for the
/// view the patterns run on (see [`unescaped_view`]), which only blanks bytes to spaces.
fn possible_kinds(text: &str) -> u64 {
    use memchr::{memchr, memchr_iter, memchr2};
    let bytes = text.as_bytes();
    let present = NeedBytes::of(bytes);
    let at = |i: usize, literal: &[u8]| bytes.get(i..i + literal.len()) == Some(literal);
    let mut kinds = 0;
    let mut add = |kind: Kind, present: bool| {
        if present {
            kinds |= bit(kind);
        }
    };
    let digits = if present.has(NeedBytes::DIGIT) {
        DigitFacts::of(bytes)
    } else {
        DigitFacts::default()
    };
    if present.has(NeedBytes::DASH) {
        for dash in memchr_iter(b'-', bytes) {
            let sk = dash >= 2 && at(dash - 2, b"sk");
            add(Kind::OpenaiKey, sk);
            add(Kind::AnthropicKey, sk);
            add(Kind::SlackToken, dash >= 4 && at(dash - 4, b"xox"));
        }
    }
    if present.has(NeedBytes::CAPITAL_A) {
        for a in memchr_iter(b'A', bytes) {
            add(Kind::AwsKey, at(a, b"AKIA") || at(a, b"ASIA"));
            add(Kind::GoogleKey, at(a, b"AIza"));
        }
    }
    if present.has(NeedBytes::UNDERSCORE) {
        // One search for `_` serves both kinds whose needs hold one.
        for u in memchr_iter(b'_', bytes) {
            add(
                Kind::AwsKey,
                u >= 3 && holds_at_ignoring_case(bytes, u - 3, b"aws_secret_access_key"),
            );
            add(
                Kind::GithubToken,
                (u >= 3 && at(u - 3, b"gh") && b"pousr".contains(&bytes[u - 1]))
                    || (u >= 6 && at(u - 6, b"github_pat_")),
            );
        }
    }
    if present.has(NeedBytes::CAPITAL_J) {
        for j in memchr_iter(b'J', bytes) {
            add(Kind::Jwt, j >= 2 && at(j - 2, b"ey"));
        }
    }
    if present.has(NeedBytes::LETTER_B) {
        add(
            Kind::BearerToken,
            contains_ignoring_case(bytes, b"bearer", 0),
        );
        add(Kind::BasicAuth, contains_ignoring_case(bytes, b"basic", 0));
    }
    add(
        Kind::Credential,
        digits.count > 0
            && present.has(NeedBytes::COLON | NeedBytes::EQUALS)
            && memchr2(b':', b'=', bytes).is_some()
            && [
                (&b"key"[..], 0),
                (b"token", 2),
                (b"secret", 2),
                (b"passw", 4),
            ]
            .into_iter()
            .any(|(stem, rare)| contains_ignoring_case(bytes, stem, rare)),
    );
    add(
        Kind::Email,
        present.has(NeedBytes::AT) && memchr(b'@', bytes).is_some(),
    );
    add(Kind::Phone, digits.count >= 7 && digits.phone_shape);
    add(Kind::Card, digits.card_run);
    add(Kind::Iban, digits.iban_start);
    let hex = |i: usize| bytes.get(i).is_some_and(u8::is_ascii_hexdigit);
    let ipv6 = || {
        present.has(NeedBytes::COLON)
            && memchr_iter(b':', bytes)
                .any(|c| c >= 1 && (hex(c - 1) || bytes[c - 1] == b':') && hex(c + 1))
    };
    add(Kind::Ip, digits.ipv4 || ipv6());
    kinds
}

/// Which of the bytes that [`possible_kinds`] starts its searches from a text holds, a bit each,
/// so that a search whose byte is absent is skipped. A chat exchange is mostly short strings
/// (object keys, roles, model names), where the dozen searches' fixed costs, not their scans,
/// were most of the screen's time; a short text is read once to find which are worth making.
#[derive(Clone, Copy)]
struct NeedBytes(u16);

impl NeedBytes {
    const DASH: u16 = 1;
    const CAPITAL_A: u16 = 1 << 1;
    const UNDERSCORE: u16 = 1 << 2;
    const CAPITAL_J: u16 = 1 << 3;
    /// `b` or `B`.
    const LETTER_B: u16 = 1 << 4;
    const DIGIT: u16 = 1 << 5;
    const COLON: u16 = 1 << 6;
    const EQUALS: u16 = 1 << 7;
    const AT: u16 = 1 << 8;

    /// Texts longer than this are not read ahead: each search is a vectorised scan that costs
    /// about what reading the text byte by byte would, so every search is made.
    const READ_AHEAD_MAX: usize = 64;

    /// The bit of each byte.
    const OF_BYTE: [u16; 256] = {
        let mut table = [0; 256];
        table[b'-' as usize] = Self::DASH;
        table[b'A' as usize] = Self::CAPITAL_A;
        table[b'_' as usize] = Self::UNDERSCORE;
        table[b'J' as usize] = Self::CAPITAL_J;
        table[b'b' as usize] = Self::LETTER_B;
        table[b'B' as usize] = Self::LETTER_B;
        let mut digit = b'0';
        while digit <= b'9' {
            table[digit as usize] = Self::DIGIT;
            digit += 1;
        }
        table[b':' as usize] = Self::COLON;
        table[b'=' as usize] = Self::EQUALS;
        table[b'@' as usize] = Self::AT;
        table
    };

    fn of(bytes: &[u8]) -> Self {
        if bytes.len() > Self::READ_AHEAD_MAX {
            return Self(u16::MAX);
        }
        Self(
            bytes
                .iter()
                .fold(0, |bits, &b| bits | Self::OF_BYTE[usize::from(b)]),
        )
    }

    /// Whether any of `bits` is present.
    fn has(self, bits: u16) -> bool {
        self.0 & bits != 0
    }
}

/// Whether `bytes` holds `word` (lowercase ASCII) in any case. It looks for the byte of `word`
/// at `rare`, which should be a letter prose seldom holds, so that few places are checked.
fn contains_ignoring_case(bytes: &[u8], word: &[u8], rare: usize) -> bool {
    let letter = word[rare];
    memchr::memchr2_iter(letter, letter.to_ascii_uppercase(), bytes).any(|i| {
        i.checked_sub(rare)
            .is_some_and(|start| holds_at_ignoring_case(bytes, start, word))
    })
}

/// Whether `bytes` holds `word` (lowercase ASCII) at `start`, in any case.
fn holds_at_ignoring_case(bytes: &[u8], start: usize, word: &[u8]) -> bool {
    bytes
        .get(start..start + word.len())
        .is_some_and(|w| w.eq_ignore_ascii_case(word))
}

/// What [`possible_kinds`] needs to know of a text's digits.
#[derive(Debug, Default)]
struct DigitFacts {
    /// How many, counted until every other fact is known.
    count: usize,
    /// Thirteen digits in a row, each right after the last or after one ` `, `-` or `\`
    /// (which the view blanks to a space when it stands alone): a card's shape.
    card_run: bool,
    /// Two capitals and two digits in a row, an IBAN's start.
    iban_start: bool,
    /// A digit, `.`, digits, `.` and a digit, a piece of an IPv4 address.
    ipv4: bool,
    /// `+` or `(` before a digit, how the two other forms of phone number start, or the
    /// whole US form.
    phone_shape: bool,
}

impl DigitFacts {
    /// Digits in a row that a card has at least.
    const CARD_DIGITS: usize = 13;

    /// Looks at each digit of `bytes`, and at the bytes around it, until all is known.
    fn of(bytes: &[u8]) -> Self {
        let mut facts = Self::default();
        let is_digit = |i: usize| bytes.get(i).is_some_and(u8::is_ascii_digit);
        // The digits in a row so far, and where the last one was.
        let (mut run, mut last) = (0, None);
        // Eight bytes at a time, visiting only the digits: prose has few.
        let words = bytes.chunks_exact(8);
        let mut tail = [0; 8];
        tail[..words.remainder().len()].copy_from_slice(words.remainder());
        let words = words.map(|w| w.try_into().unwrap_or([0; 8]));
        for (n, word) in words.chain([tail]).enumerate() {
            let mut digits = digit_flags(u64::from_le_bytes(word));
            while digits != 0 {
                let i = n * 8 + digits.trailing_zeros() as usize / 8;
                digits &= digits - 1;
                facts.count += 1;
                run = match last {
                    Some(l)
                        if i == l + 1
                            || (i == l + 2 && matches!(bytes[l + 1], b' ' | b'-' | b'\\')) =>
                    {
                        run + 1
                    }
                    _ => 1,
                };
                last = Some(i);
                facts.card_run |= run >= Self::CARD_DIGITS;
                // Each shape is looked for only until it is seen.
                let before = |back: usize| i.checked_sub(back).map(|j| bytes[j]);
                let upper = |back: usize| before(back).is_some_and(|b| b.is_ascii_uppercase());
                facts.iban_start = facts.iban_start || (upper(2) && upper(1) && is_digit(i + 1));
                if !facts.ipv4 && before(1) == Some(b'.') && i >= 2 && is_digit(i - 2) {
                    let after = i + bytes[i..].iter().take_while(|b| b.is_ascii_digit()).count();
                    facts.ipv4 = bytes.get(after) == Some(&b'.') && is_digit(after + 1);
                }
                facts.phone_shape = facts.phone_shape
                    || matches!(before(1), Some(b'+' | b'('))
                    || us_phone_at(bytes, i);
                // A card's run has more digits than a phone number needs.
                if facts.card_run && facts.iban_start && facts.ipv4 && facts.phone_shape {
                    return facts;
                }
            }
        }
        facts
    }
}

/// Whether a phone number in the US form, `555-867-5309` or with dots, starts at `i`: every
/// match of that form holds these twelve bytes.
fn us_phone_at(bytes: &[u8], i: usize) -> bool {
    bytes.get(i..i + 12).is_some_and(|number| {
        number.iter().enumerate().all(|(j, b)| match j {
            3 | 7 => matches!(b, b'.' | b'-'),
            _ => b.is_ascii_digit(),
        })
    })
}

/// The top bit of each byte of `word` that is an ASCII digit, and no other bit. Each byte is
/// worked out apart from the others: no sum carries or borrows into the next byte.
fn digit_flags(word: u64) -> u64 {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const LOW_BITS: u64 = ONES * 0x7f;
    const TOP_BITS: u64 = ONES * 0x80;
    // Per byte, with the top bit cleared: the top bit is set in `0x7f + ('9' + 1) - low` while
    // the byte is at most `9`, and in `low + (0x80 - '0')` once it is at least `0`; `!word`
    // rules out bytes of 0x80 and above.
    let low = word & LOW_BITS;
    let not_above_nine = ONES * (0x7f + u64::from(b'9') + 1) - low;
    let from_zero = low + ONES * (0x80 - u64::from(b'0'));
    not_above_nine & !word & from_zero & TOP_BITS
}

/// `text` with every JSON escape (`\n`, `\"`, `\u00e9`…) blanked to spaces of the same length.
/// Text can hold JSON of its own (tool-call arguments, a pasted config), where `\nsk-…` puts a
/// word character before a key and `\"` comes between a label and its value; the patterns run on
/// this view, and since each escape keeps its length, a match covers the same bytes of `text`.
fn unescaped_view(text: &str) -> std::borrow::Cow<'_, str> {
    let bytes = text.as_bytes();
    let Some(first) = memchr::memchr(b'\\', bytes) else {
        return std::borrow::Cow::Borrowed(text);
    };
    let mut view = bytes.to_vec();
    let mut i = first;
    while i + 1 < view.len() {
        if bytes[i] != b'\\' {
            i += 1;
            continue;
        }
        let len = match bytes[i + 1] {
            b'n' | b'r' | b't' | b'b' | b'f' | b'"' | b'/' | b'\\' => 2,
            b'u' if bytes
                .get(i + 2..i + 6)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) =>
            {
                6
            }
            _ => 1,
        };
        view[i..i + len].fill(b' ');
        i += len;
    }
    // Only ASCII bytes were replaced, by ASCII spaces: still UTF-8, with the same boundaries.
    std::borrow::Cow::Owned(String::from_utf8(view).unwrap_or_else(|_| text.to_owned()))
}

/// Replaces each accepted match of `kind` in `text`; `None` if there is none. Matches are found
/// in [`unescaped_view`] and cut from `text` at the same offsets.
fn replace_kind(kind: Kind, regex: &Regex, text: &str) -> Option<String> {
    let view = unescaped_view(text);
    let mut out = String::new();
    let mut copied = 0;
    let mut changed = false;
    for m in regex.find_iter(&view) {
        let Some(span) = kind.accepted_span(m.as_str()) else {
            continue;
        };
        out.push_str(&text[copied..m.start() + span.start]);
        out.push_str("[REDACTED:");
        out.push_str(kind.name());
        out.push(']');
        copied = m.start() + span.end;
        changed = true;
    }
    if !changed {
        return None;
    }
    out.push_str(&text[copied..]);
    Some(out)
}

/// Where the run of bytes `text` ends with, each passing `part`, begins.
fn token_start(text: &str, part: impl Fn(u8) -> bool) -> usize {
    text.as_bytes()
        .iter()
        .rposition(|&b| !part(b))
        .map_or(0, |i| i + 1)
}

/// The kind and start (a byte offset) of a key cut off at the end of `view`, if any: see
/// [`Redactor::redact_cut_key`].
fn cut_key_at(view: &str) -> Option<(Kind, usize)> {
    let key_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.');
    let start = token_start(view, key_char);
    if let Some((kind, at)) = cut_key_in(&view.as_bytes()[start..]) {
        return Some((kind, start + at));
    }
    // A labelled secret: redacted from its label on, as a whole match is.
    let token_char = |b: u8| key_char(b) || matches!(b, b'~' | b'+' | b'/' | b'=');
    let start = token_start(view, token_char);
    let token = &view.as_bytes()[start..];
    if token.len() < CUT_KEY_MIN {
        return None;
    }
    let before = &view[..start];
    let spaced = before.trim_end_matches([' ', '\t']);
    // A token is random: a digit, or a capital past its first letter (`Bearer Authentication`
    // is prose).
    let random =
        token.iter().any(u8::is_ascii_digit) || token.iter().skip(1).any(u8::is_ascii_uppercase);
    if spaced.len() < before.len()
        && random
        && let Some(at) = ends_with_word(spaced, "bearer")
    {
        return Some((Kind::BearerToken, at));
    }
    // The label before the token (`aws_secret_access_key = "…`), or in it (`KEY=…`: `=` is
    // one of a token's characters).
    let in_token = token
        .iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'=')
        .map(|(i, _)| start + i + 1);
    std::iter::once(start)
        .chain(in_token)
        .find_map(|value| aws_secret_from(view, value))
        .map(|at| (Kind::AwsKey, at))
}

/// Where the `aws_secret_access_key` label begins, if the text before `value` (a byte offset in
/// `view`) ends with it and a `:` or `=`, with spaces and quotes around them, and what follows
/// is at least [`CUT_KEY_MIN`] of a secret key's base64 characters to the end.
fn aws_secret_from(view: &str, value: usize) -> Option<usize> {
    let quoted = |c: char| matches!(c, ' ' | '\t' | '"' | '\'');
    // The label first: it rules out almost every candidate without reading the rest (a token
    // of thousands of `=` would otherwise be read once for each).
    let label = view[..value]
        .trim_end_matches(quoted)
        .strip_suffix([':', '='])?;
    let at = ends_with_word(label.trim_end_matches(quoted), "aws_secret_access_key")?;
    let secret = &view.as_bytes()[value..];
    let base64 = secret.len() >= CUT_KEY_MIN
        && secret
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'+' | b'='));
    base64.then_some(at)
}

/// Where `word` (any case) begins, if `text` ends with it at a word's start.
fn ends_with_word(text: &str, word: &str) -> Option<usize> {
    let at = text.len().checked_sub(word.len())?;
    let whole = text.is_char_boundary(at)
        && text[at..].eq_ignore_ascii_case(word)
        && !text[..at].ends_with(|c: char| c.is_ascii_alphanumeric());
    whole.then_some(at)
}

/// The fewest characters after a key's prefix that [`Redactor::redact_cut_key`] takes for a
/// key's beginning: fewer tell a guesser little (and `sk-learn` stays prose).
const CUT_KEY_MIN: usize = 8;

/// How far back from a text's end [`Redactor::redact_cut_key`] looks.
const CUT_KEY_SCAN: usize = 4096;

/// Where a key begins in `token` (a run of `[A-Za-z0-9_.-]` that ends its text), and its kind:
/// a prefix at a word's start (or after `_`, as in `OPENAI_KEY_sk-…`) followed, to the end, by
/// at least [`CUT_KEY_MIN`] characters its kind's keys are made of.
fn cut_key_in(token: &[u8]) -> Option<(Kind, usize)> {
    fn key_body(b: u8) -> bool {
        b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-')
    }
    fn alnum(b: u8) -> bool {
        b.is_ascii_alphanumeric()
    }
    fn upper_alnum(b: u8) -> bool {
        b.is_ascii_uppercase() || b.is_ascii_digit()
    }
    fn slack_body(b: u8) -> bool {
        b.is_ascii_alphanumeric() || b == b'-'
    }
    fn jwt_body(b: u8) -> bool {
        key_body(b) || b == b'.'
    }
    /// A key's prefix, its kind, and the characters that may follow.
    type Prefix = (&'static [u8], Kind, fn(u8) -> bool);
    const PREFIXES: &[Prefix] = &[
        (b"sk-ant-", Kind::AnthropicKey, key_body),
        (b"sk-", Kind::OpenaiKey, key_body),
        (b"github_pat_", Kind::GithubToken, key_body),
        (b"ghp_", Kind::GithubToken, alnum),
        (b"gho_", Kind::GithubToken, alnum),
        (b"ghu_", Kind::GithubToken, alnum),
        (b"ghs_", Kind::GithubToken, alnum),
        (b"ghr_", Kind::GithubToken, alnum),
        (b"AKIA", Kind::AwsKey, upper_alnum),
        (b"ASIA", Kind::AwsKey, upper_alnum),
        (b"AIza", Kind::GoogleKey, key_body),
        (b"xoxa-", Kind::SlackToken, slack_body),
        (b"xoxb-", Kind::SlackToken, slack_body),
        (b"xoxp-", Kind::SlackToken, slack_body),
        (b"xoxo-", Kind::SlackToken, slack_body),
        (b"xoxs-", Kind::SlackToken, slack_body),
        (b"xoxr-", Kind::SlackToken, slack_body),
        // A JWT's header alone is no secret; its payload, or part of its signature, may be.
        (b"eyJ", Kind::Jwt, jwt_body),
    ];
    (0..token.len())
        .filter(|&at| at == 0 || !token[at - 1].is_ascii_alphanumeric())
        .find_map(|at| {
            let rest = &token[at..];
            PREFIXES.iter().find_map(|&(prefix, kind, body)| {
                let tail = rest.strip_prefix(prefix)?;
                let whole = tail.len() >= CUT_KEY_MIN && tail.iter().all(|&b| body(b));
                let shaped = match kind {
                    Kind::Jwt => tail.contains(&b'.'),
                    // Slack's tokens go on with a team id's digits (`xoxo-Sam…` is a letter's end).
                    Kind::SlackToken => tail.first().is_some_and(u8::is_ascii_digit),
                    _ => true,
                };
                (whole && shaped).then_some((kind, at))
            })
        })
}

fn luhn_valid(candidate: &str) -> bool {
    let digits: Vec<u32> = candidate.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                if d * 2 > 9 { d * 2 - 9 } else { d * 2 }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn iban_valid(candidate: &str) -> bool {
    let compact: Vec<char> = candidate.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let rearranged = compact[4..].iter().chain(&compact[..4]);
    let mut remainder: u64 = 0;
    for c in rearranged {
        let Some(v) = c.to_digit(36) else {
            return false;
        };
        remainder = if v >= 10 {
            (remainder * 100 + u64::from(v)) % 97
        } else {
            (remainder * 10 + u64::from(v)) % 97
        };
    }
    remainder == 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Text built from pieces of secrets and PII, so that near-misses and overlaps are common.
    fn secretish() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("sk-".to_string()),
            Just("sk-ant-".to_string()),
            Just("AKIA".to_string()),
            Just("ghp_".to_string()),
            Just("eyJ".to_string()),
            Just("Bearer ".to_string()),
            Just("@".to_string()),
            Just(".".to_string()),
            Just(" ".to_string()),
            Just("-".to_string()),
            Just("+".to_string()),
            Just("[REDACTED:email]".to_string()),
            Just("api_key=".to_string()),
            "[0-9]{1,19}",
            "[A-Za-z0-9_]{1,40}",
            "\\PC{1,6}",
        ];
        prop::collection::vec(piece, 0..24).prop_map(|p| p.concat())
    }

    fn plain_bytes() -> Vec<u8> {
        (0..=127u8).filter(|&b| is_plain(b)).collect()
    }

    /// Text of plain bytes and markers written with them, shorter than [`PLAIN_MATCH_MIN`].
    fn short_plain() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("sk-".to_string()),
            Just("sk-ant-".to_string()),
            Just("xoxb-".to_string()),
            Just("ghp_".to_string()),
            Just("github_pat_".to_string()),
            Just("bearer".to_string()),
            Just("basic".to_string()),
            Just("api_key".to_string()),
            Just("password".to_string()),
            Just("aws_secret_access_key".to_string()),
            // Drawn from what `is_plain` admits, so that widening it widens this test.
            prop::collection::vec(prop::sample::select(plain_bytes()), 1..14)
                .prop_map(|bytes| String::from_utf8(bytes).unwrap()),
        ];
        prop::collection::vec(piece, 1..5).prop_map(|p| {
            let mut text = p.concat();
            text.truncate(PLAIN_MATCH_MIN - 1);
            text
        })
    }

    #[test]
    fn a_plain_token_at_the_bound_is_still_searched() {
        // The shortest plain match: if a pattern ever accepts a shorter one, lower the bound.
        let slack = format!("xoxb-{}", "a".repeat(10));
        assert_eq!(slack.len(), PLAIN_MATCH_MIN);
        assert!(!too_plain_to_match(&slack));
        assert_eq!(redact(&slack), "[REDACTED:slack_token]");
        assert_ne!(matching_patterns(&slack), 0);
        // Each plain marker, run on to one byte short of the bound, still matches nothing.
        for marker in [
            "sk-",
            "sk-ant-",
            "xoxb-",
            "xoxp-",
            "ghp_",
            "github_pat_",
            "bearer",
        ] {
            let mut text = format!("{marker}{}", "a".repeat(PLAIN_MATCH_MIN));
            text.truncate(PLAIN_MATCH_MIN - 1);
            assert!(too_plain_to_match(&text));
            assert_eq!(matching_patterns(&text), 0, "{text}");
        }
        assert!(too_plain_to_match("finish_reason"));
        for searched in ["gpt-4o", "Bearer", "a b", "a@b", "a:b", "a=b", "a+b", "(a)"] {
            assert!(!too_plain_to_match(searched), "{searched}");
        }
    }

    #[test]
    fn no_pattern_matches_any_short_plain_text() {
        // Every text of up to four plain bytes: IPv6's `a::b` is four, were `:` plain.
        let plain = plain_bytes();
        let mut texts = vec![Vec::new()];
        for _ in 0..4 {
            texts = texts
                .iter()
                .flat_map(|t| plain.iter().map(move |&b| [t.as_slice(), &[b]].concat()))
                .collect();
            for text in &texts {
                let text = std::str::from_utf8(text).unwrap();
                assert!(too_plain_to_match(text));
                assert_eq!(matching_patterns(text), 0, "{text:?}");
            }
        }
    }

    #[test]
    fn a_match_uncovered_by_a_replacement_is_redacted_too() {
        // The address ends in `_`, a word character, until the key after it is replaced.
        let text = "sk-@eyJ.ghp_sk-___AAAAA0AA_A_a00AA_";
        let all = Redactor::with_pii(&Kind::PII);
        let once = all.redact_str(text).unwrap();
        assert_eq!(all.redact_str(&once), None, "{once}");
        assert!(!once.contains("@eyJ"), "{once}");
    }

    /// A match of each kind, in the order of [`Kind::ALL`].
    const EXAMPLES: [&str; 15] = [
        "sk-ant-api03-abcdefghijklmnopqrstuvwxyz",
        "sk-proj-abcdefghijklmnopqrstuvwxyz",
        "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "ghu_abcdefghijklmnopqrstuvwxyz0123456789",
        "eyJhbGciOi.eyJzdWIiOi.dozjgNryP4",
        "BEARER abcdefghijklmnopqrstu",
        "Basic dXNlcjpwYXNz0A==",
        "AIzaSyA1234567890abcdefghijklmnopqrstuv",
        "xoxr-abcdefghijkl",
        "PASSWD=hunter2hunter",
        "x@y.io",
        "DE89370400440532013000",
        "4111-1111-1111-1111",
        "10.0.0.1",
        "555-867-5309",
    ];

    /// More matches: at each kind's bounds (a phone number of seven digits, a card of
    /// thirteen, a credential with one digit, an IBAN with few digits), of each marker of
    /// [`possible_kinds`], IPv6, an IBAN with spaces, IPv6 in full, AWS's label in lowercase,
    /// each form of phone number, each stem of a credential's label, IPv4 with three-digit
    /// groups, cards with each separator (a lone `\` is blanked to a space before the search),
    /// and texts with a card, an IBAN's start, an IPv4 address and a phone number's start,
    /// each one last (the look at digits stops once it has seen all four).
    const BOUNDARY_EXAMPLES: [&str; 30] = [
        "4111 1111 1111 1111",
        "4111\\1111\\1111\\1111",
        "555.867.5309",
        "(555) 867 5309",
        "AB12, 1.2.3.4, +1 and 4111 1111 1111 1111",
        "4111 1111 1111 1111 at 1.2.3.4, +1, to DE89370400440532013000",
        "4111 1111 1111 1111, AB12, +1, from 10.0.0.1",
        "4111 1111 1111 1111, AB12, 1.2.3.4, call 555-867-5309",
        "access-Token = abc12345xyz",
        "Secret_Key: 9f8e7d6c5b",
        "X-API-KEY=abcdefgh1",
        "255.255.255.255",
        "+1 23 45 67",
        "4222222222222",
        "fe80::1",
        "2001:db8:85a3:0:0:8a2e:370:7334",
        "aws_secret_access_key : wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "GB82 WEST 1234 5698 7654 32",
        "(555) 867-5309",
        "auth_token: abcdefgh1",
        "ASIAIOSFODNN7EXAMPLE",
        "AKIAIOSFODNN7EXAMPLE",
        "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
        "gho_abcdefghijklmnopqrstuvwxyz0123456789",
        "ghs_abcdefghijklmnopqrstuvwxyz0123456789",
        "ghr_abcdefghijklmnopqrstuvwxyz0123456789",
        "github_pat_abcdefghijklmnopqrstuvwxyz",
        "client_secret=Zk3q-9Lm2Pq8",
        "api-key: 0123456789abcdef",
        "NL91 ABNA 0417 1643 00",
    ];

    /// Text built from matches of every kind, their markers and labels, digits and
    /// separators, cut and joined at random, so that each kind's matches and near-misses are
    /// common.
    fn screenish() -> impl Strategy<Value = String> {
        let examples: Vec<&str> = EXAMPLES.iter().chain(&BOUNDARY_EXAMPLES).copied().collect();
        let piece = prop_oneof![
            prop::sample::select(examples.clone()).prop_map(str::to_string),
            (prop::sample::select(examples), 1..40usize)
                .prop_map(|(example, cut)| { example[..cut.min(example.len())].to_string() }),
            prop::sample::select(vec![
                "sk-",
                "AKIA",
                "ASIA",
                "ghp_",
                "gho_",
                "ghs_",
                "github_pat_",
                "aws_Secret_access_KEY=",
                "eyJ",
                "bearer\\t",
                "basic ",
                "xoxb-",
                "api_key=",
                "API-KEY: ",
                "client_secret=\\\"",
                "auth_token = ",
                "password=",
                "passwd:",
                "SECRET key=",
                "access-Token: ",
                "+44 ",
                "(",
                ")",
                ".",
                "-",
                " ",
                "@",
                ":",
                "::",
                "=",
                "\\n",
                "\\u00e9",
            ])
            .prop_map(str::to_string),
            "[0-9]{1,19}",
            "[A-Z]{2}[0-9]{2}",
            "[0-9]{1,3}\\.[0-9]{1,3}",
            "[0-9A-Fa-f]{1,4}:",
            "[A-Za-z0-9_/+-]{1,40}",
            "\\PC{1,6}",
        ];
        // Few pieces as often as many: a kind's bound is tested only where nothing else in the
        // text passes it.
        prop_oneof![
            prop::collection::vec(piece.clone(), 0..3),
            prop::collection::vec(piece, 0..12),
        ]
        .prop_map(|p| p.concat())
    }

    /// The kinds whose search alone would redact something in `text`, a bit each as in
    /// [`possible_kinds`].
    fn kinds_redacted(text: &str) -> u64 {
        compiled()
            .each
            .iter()
            .enumerate()
            .filter(|(_, (kind, regex))| replace_kind(*kind, regex, text).is_some())
            .fold(0, |bits, (i, _)| bits | 1 << i)
    }

    #[test]
    fn the_screen_passes_each_kind_and_rules_out_prose() {
        for (kind, example) in Kind::ALL.into_iter().zip(EXAMPLES) {
            assert_ne!(possible_kinds(example) & bit(kind), 0, "{example}");
            assert!(
                redact(example).contains(&format!("[REDACTED:{}]", kind.name())),
                "{example}"
            );
        }
        // Alone, so that no other part of a text passes the screen for them, and after
        // prose of several lengths, so that they fall across the blocks digits are looked
        // for in.
        for example in EXAMPLES.iter().chain(&BOUNDARY_EXAMPLES) {
            for pad in [0, 1, 40, 63, 64, 100] {
                let text = format!("{}{example}", "a ".repeat(pad / 2) + &" ".repeat(pad % 2));
                let redacted = kinds_redacted(&text);
                assert_ne!(redacted, 0, "{text} matches no kind");
                assert_eq!(
                    redacted & !possible_kinds(&text),
                    0,
                    "screened out in {text}"
                );
            }
        }
        for prose in [
            "Explain what a closed-loop load generator measures and why p99 matters.",
            "Most of p99 comes from the queue, not from the 2 workers.",
            "A token service, version two.",
            "You asked: Tell me about load testing. Note: it is not a benchmark.",
            "completion_tokens",
            "snake_case and a_b_c_d",
            "In 2023, revenue grew 15% to 1.2 million (from 0.9 million).",
            "Step 1: open the file. Step 2: run it with -v 3.",
            "The main idea: v1.2 and version 10-2 are both fine.",
            "gpt-4o-mini-2024-07-18",
            "Released 2024-08-06, build 20240806-1234.",
        ] {
            assert_eq!(possible_kinds(prose), 0, "{prose}");
        }
        // Some needs alone, and what each lets through.
        for (text, kinds) in [
            ("secret = x", 0),
            ("secret = 4", bit(Kind::Credential)),
            ("value = 4", 0),
            ("1.2.3", bit(Kind::Ip)),
            ("12345 67 +8", bit(Kind::Phone)),
            ("1234567 (8", bit(Kind::Phone)),
            ("1555.867-5309", bit(Kind::Phone)),
            ("555-867-530 9", 0),
            ("1234 55-66 7.8", 0),
            ("xoxo-hugs", bit(Kind::SlackToken)),
            ("basics", bit(Kind::BasicAuth)),
            ("Aws_Secret_Access_Key", bit(Kind::AwsKey)),
            ("aws_secret_access_ke", 0),
            ("ghp_", bit(Kind::GithubToken)),
            ("ghx_ github_pa_", 0),
            ("github_pat_", bit(Kind::GithubToken)),
            ("at 10:30", bit(Kind::Ip)),
            ("a::b", bit(Kind::Ip)),
            ("a:: b: c :d", 0),
            ("risk-free", bit(Kind::OpenaiKey) | bit(Kind::AnthropicKey)),
        ] {
            assert_eq!(possible_kinds(text), kinds, "{text}");
        }
    }

    #[test]
    fn a_key_cut_at_the_end_of_a_text_is_redacted_and_prose_is_not() {
        let cut = |text: &str| Redactor::default().redact_cut_key(text);
        let github = "ghp_0123456789abcdefghijABCDEFGHIJ01234"; // 35 of its 36 characters
        assert!(redact(github).contains("ghp_"), "no full pattern takes it");
        for (text, kept, kind) in [
            (
                format!("Your token is {github}"),
                "Your token is ",
                "github_token",
            ),
            (
                "export OPENAI_KEY_sk-proj-AbCd1234".into(),
                "export OPENAI_KEY_",
                "openai_key",
            ),
            ("key: sk-ant-api03-Xy12".into(), "key: ", "anthropic_key"),
            ("AIzaSyA1b2C3d4E5f6G7h8I9".into(), "", "google_key"),
            ("id AKIAIOSFODNN7".into(), "id ", "aws_key"),
            ("slack xoxb-1234-5678".into(), "slack ", "slack_token"),
            (
                "{\"t\": \"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0".into(),
                "{\"t\": \"",
                "jwt",
            ),
            (
                "curl -H 'Authorization: Bearer abc/def+123".into(),
                "curl -H 'Authorization: ",
                "bearer_token",
            ),
            // Inside JSON of its own: an escape before the key is not a word character.
            (
                format!(r#"{{\"content\":\"old\n{github}"#),
                r#"{\"content\":\"old\n"#,
                "github_token",
            ),
            (
                r#"aws_secret_access_key = "wJalrXUtnFEMI/K7MDENG"#.into(),
                "",
                "aws_key",
            ),
            (
                "export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG".into(),
                "export ",
                "aws_key",
            ),
            (
                "docker run --env=AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG".into(),
                "docker run --env=",
                "aws_key",
            ),
            (
                r#"{\"AWS_SECRET_ACCESS_KEY\": \"wJalrXUtnFEMI/K7MDENG"#.into(),
                r#"{\""#,
                "aws_key",
            ),
        ] {
            assert_eq!(
                cut(&text),
                Some(format!("{kept}[REDACTED:{kind}]")),
                "{text}"
            );
        }
        // Not at the end, too short to tell a guesser anything, inside a word, or not a key.
        for text in [
            format!("{github} is cut here"),
            "pip install sk-learn".into(),
            "ask-questions-freely".into(),
            "ASIAN-FOOD-RECIPES".into(),
            "eyJhbGciOiJIUzI1NiJ9".into(),
            "a bearer of bad news".into(),
            "The API expects Bearer authentication.".into(),
            "with love, xoxo-Samantha".into(),
            "tokens start with xoxb-".into(),
            "see xoxp-".into(),
            "send Bearer Authentication.".into(),
            "aws_secret_access_key is the second half".into(),
            "mobearer 12345678abc".into(),
            "ends with [REDACTED:openai_key]".into(),
            "ünïcödé ghp_".into(),
            String::new(),
        ] {
            assert_eq!(cut(&text), None, "{text}");
        }
        // Non-ASCII text before the key: cut on a character boundary.
        assert_eq!(
            cut("clé: ghp_0123456789").as_deref(),
            Some("clé: [REDACTED:github_token]")
        );
    }

    #[test]
    fn digit_flags_mark_exactly_the_digits() {
        // Every byte at every place, among neighbours at and around the digits' bounds.
        for fill in [0x00, b'/', b'0', b'9', b':', 0x7f, 0x80, 0xff] {
            for place in 0..8 {
                for byte in 0..=u8::MAX {
                    let mut word = [fill; 8];
                    word[place] = byte;
                    let expected = word.iter().enumerate().fold(0, |flags, (k, b)| {
                        flags | u64::from(b.is_ascii_digit()) << (8 * k + 7)
                    });
                    assert_eq!(digit_flags(u64::from_le_bytes(word)), expected, "{word:?}");
                }
            }
        }
    }

    proptest! {
        // Whatever a kind's search would redact, the screen lets through to it.
        #[test]
        fn the_screen_passes_every_text_a_kind_would_redact(text in screenish()) {
            prop_assert_eq!(kinds_redacted(&text) & !possible_kinds(&text), 0, "screened out in {:?}", text);
        }

        // Reading a short text ahead skips only searches that would find nothing: the same
        // text padded past the read-ahead bound, where every search is made, gets the same kinds.
        #[test]
        fn reading_ahead_changes_no_answer_of_the_screen(text in screenish()) {
            prop_assume!(text.len() <= NeedBytes::READ_AHEAD_MAX);
            let padded = format!("{text}{}", " ".repeat(NeedBytes::READ_AHEAD_MAX + 1));
            prop_assert_eq!(possible_kinds(&text), possible_kinds(&padded), "{:?}", text);
        }

        // What the fast path passes, the full search would have passed too.
        #[test]
        fn no_pattern_matches_text_too_plain_to_match(text in short_plain()) {
            prop_assert!(too_plain_to_match(&text));
            prop_assert_eq!(matching_patterns(&text), 0, "{:?}", text);
        }

        // Never a panic, and what comes out has nothing left to redact.
        #[test]
        fn redaction_never_panics_and_leaves_nothing_to_redact(text in secretish()) {
            let all = Redactor::with_pii(&Kind::PII);
            if let Some(once) = all.redact_str(&text) {
                prop_assert_eq!(all.redact_str(&once), None, "from {:?}", text);
            }
        }

        // `json_is_clean` says yes exactly when `redact_json` would change nothing, for any
        // JSON (keys included, escaped or not, with or without PII kinds), and so does the walk
        // it falls back on, which also says no to text that is not JSON.
        #[test]
        fn json_is_clean_agrees_with_redact_json(value in any_json(), pii in any::<bool>(), cut in any::<prop::sample::Index>()) {
            let redactor = if pii { Redactor::default() } else { Redactor::with_pii(&[]) };
            let mut redacted = value.clone();
            redactor.redact_json(&mut redacted);
            let clean = redacted == value;
            let text = value.to_string();
            let pretty = serde_json::to_string_pretty(&value).unwrap();
            for json in [&text, &pretty] {
                prop_assert_eq!(redactor.json_is_clean(&RawValue::from_string(json.clone()).unwrap()), clean, "{}", json);
                prop_assert_eq!(redactor.json_walk_is_clean(json), clean, "{}", json);
            }
            // A cut JSON text is not clean, nor is one with something after it.
            let end = cut.index(text.len());
            if text.is_char_boundary(end) && serde_json::from_str::<Value>(&text[..end]).is_err() {
                prop_assert!(!redactor.json_walk_is_clean(&text[..end]));
            }
            let trailing = format!("{text} 1");
            prop_assert!(!redactor.json_walk_is_clean(&trailing));
        }
    }

    /// Object keys: [`secretish`], or a field named for a secret.
    fn json_key() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => secretish(),
            1 => prop::sample::select(vec!["api_key", "DB_PASSWORD", "x-api-key", "client_secret"])
                .prop_map(str::to_string),
        ]
    }

    /// JSON values whose strings and keys are [`secretish`].
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            secretish().prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                prop::collection::btree_map(json_key(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn redact(text: &str) -> String {
        Redactor::default()
            .redact_str(text)
            .unwrap_or_else(|| text.to_string())
    }

    #[test]
    fn secrets_are_replaced_by_kind() {
        let cases = [
            (
                "key sk-proj-abcdefghijklmnopqrstuvwxyz123456 here",
                "openai_key",
            ),
            ("sk-ant-api03-abcdefghijklmnopqrstuvwxyz", "anthropic_key"),
            ("id AKIAIOSFODNN7EXAMPLE ok", "aws_key"),
            (
                "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                "aws_key",
            ),
            ("ghp_abcdefghijklmnopqrstuvwxyz0123456789", "github_token"),
            (
                "Authorization: Bearer abc.def-ghi_jkl~mno+pqr",
                "bearer_token",
            ),
            (
                "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
                "jwt",
            ),
        ];
        for (text, kind) in cases {
            let out = redact(text);
            assert!(
                out.contains(&format!("[REDACTED:{kind}]")),
                "{text} -> {out}"
            );
        }
    }

    #[test]
    fn checksums_separate_cards_and_ibans_from_other_numbers() {
        assert_eq!(redact("card 4111 1111 1111 1111."), "card [REDACTED:card].");
        assert_eq!(
            redact("order 4111 1111 1111 1112"),
            "order 4111 1111 1111 1112"
        );
        assert_eq!(
            redact("IBAN GB82 WEST 1234 5698 7654 32"),
            "IBAN [REDACTED:iban]"
        );
        assert_eq!(
            redact("GB82 WEST 1234 5698 7654 33"),
            "GB82 WEST 1234 5698 7654 33"
        );
    }

    #[test]
    fn pii_can_be_switched_off_but_secrets_cannot() {
        let r = Redactor::with_pii(&[]);
        let text = "mail a@b.io key sk-abcdefghijklmnopqrstuvwxyz";
        assert_eq!(
            r.redact_str(text).unwrap(),
            "mail a@b.io key [REDACTED:openai_key]"
        );
    }

    #[test]
    fn keys_behind_json_escapes_are_redacted() {
        // Tool-call arguments and pasted configs are JSON text: a key after an escaped line
        // break or tab, or a labelled value behind escaped quotes, is still a key.
        for text in [
            r#"{"path":"keys.txt","content":"old\nsk-proj-abcdefghijklmnopqrstuvwxyz123456"}"#,
            r#"{"content":"token:\tghp_abcdefghijklmnopqrstuvwxyz0123456789"}"#,
            r#"{"content":"x\nAKIAIOSFODNN7EXAMPLE"}"#,
            r#"{"content":"x\r\nAuthorization: Bearer abcdefghijklmnopqrstuvwxyz"}"#,
            r#"{"cfg":"{\"api_key\": \"a1b2c3d4e5f6a7b8\"}"}"#,
            r#"line\u000asg\u00e9 sk-ant-api03-abcdefghijklmnopqrstuvwxyz"#,
        ] {
            let out = redact(text);
            assert!(out.contains("[REDACTED:"), "kept: {out}");
            for secret in ["abcdefghijklmnop", "IOSFODNN7", "a1b2c3d4"] {
                assert!(!out.contains(secret), "{secret} kept in {out}");
            }
        }
        // What is around the match, escapes included, is kept as it was.
        assert_eq!(
            redact(r#"a\nsk-proj-abcdefghijklmnopqrstuvwxyz\n\u00e9"#),
            r#"a\n[REDACTED:openai_key]\n\u00e9"#
        );
        assert_eq!(redact(r#"C:\new\temp\file"#), r#"C:\new\temp\file"#);
    }

    #[test]
    fn a_card_run_on_into_other_digits_is_still_found() {
        assert_eq!(
            redact("card 4111 1111 1111 1111 12/26"),
            "card [REDACTED:card] 12/26"
        );
        assert_eq!(
            redact("card 4111-1111-1111-1111-123 cvv"),
            "card [REDACTED:card]-123 cvv"
        );
        assert_eq!(
            redact("ref 12 4111 1111 1111 1111"),
            "ref 12 [REDACTED:card]"
        );
        // Digits that no run of whole groups makes a card are left alone.
        assert_eq!(
            redact("order 1234 5678 9012 3456 78"),
            "order 1234 5678 9012 3456 78"
        );
    }

    #[test]
    fn every_pattern_compiles() {
        assert_eq!(compiled().each.len(), Kind::ALL.len());
        assert_eq!(
            compiled().set.as_ref().map(meta::Regex::pattern_len),
            Some(Kind::ALL.len())
        );
    }

    #[test]
    fn non_ascii_text_around_matches_is_kept_and_matches_are_still_found() {
        assert_eq!(
            redact("Schlüssel: sk-abcdefghijklmnopqrstuvwxyz, Grüße"),
            "Schlüssel: [REDACTED:openai_key], Grüße"
        );
        assert_eq!(
            redact("電話は+44 20 7946 0958です。メールはjo@example.comへ"),
            "電話は[REDACTED:phone]です。メールは[REDACTED:email]へ"
        );
        assert_eq!(
            redact("carte 4111 1111 1111 1111 — numéro ÉTÉ"),
            "carte [REDACTED:card] — numéro ÉTÉ"
        );
        assert_eq!(redact("ünïcödé only, 42 ½"), "ünïcödé only, 42 ½");
    }

    #[test]
    fn json_strings_and_keys_are_redacted() {
        let mut v = serde_json::json!({
            "messages": [{"role": "user", "content": "reach me at jo@example.com"}],
            "metadata": {"sk-proj-abcdefghijklmnopqrstuvwxyz0123": "owner"},
            "n": 1,
        });
        Redactor::default().redact_json(&mut v);
        assert_eq!(v["messages"][0]["content"], "reach me at [REDACTED:email]");
        assert_eq!(v["messages"][0]["role"], "user");
        assert_eq!(
            v["metadata"],
            serde_json::json!({"[REDACTED:openai_key]": "owner"})
        );
        assert_eq!(v["n"], 1);
    }

    #[test]
    fn labelled_secrets_are_redacted_and_prose_is_not() {
        let cases = [
            ("api-key: 0123456789abcdef0123456789abcdef", "credential"),
            (
                "set OPENAI_KEY_sk-proj-abcdefghijklmnopqrstuvwx12 now",
                "openai_key",
            ),
            ("Authorization: Basic dXNlcjpwYXNzd29yZA", "basic_auth"),
            ("basic dXNlcjpwYXNz0A==", "basic_auth"),
            (
                "key AIzaSyA1234567890abcdefghijklmnopqrstuv ok",
                "google_key",
            ),
            ("xoxb-123456789012-abcdefghijkl", "slack_token"),
            ("client_secret=\"Zk3q-9Lm2Pq8\"", "credential"),
            // Environment variables: the label after an underscore.
            (
                "AZURE_OPENAI_API_KEY=0123456789abcdef0123456789abcdef",
                "credential",
            ),
            ("DB_PASSWORD=hunter2hunter2", "credential"),
            // The AWS secret, quoted as in a config file or JSON.
            (
                "aws_secret_access_key = \"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\"",
                "aws_key",
            ),
            (
                "{\"aws_secret_access_key\": \"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\"}",
                "aws_key",
            ),
        ];
        for (text, kind) in cases {
            let out = redact(text);
            assert!(
                out.contains(&format!("[REDACTED:{kind}]")),
                "{text} -> {out}"
            );
        }
        for prose in [
            "a basic understanding of distributed systems",
            "the password: remember to rotate it monthly",
            "the risk-management-framework-overview-document",
            "Use the key named `api_key` in the settings page.",
        ] {
            assert_eq!(redact(prose), prose);
        }
    }

    #[test]
    fn a_field_named_for_a_secret_loses_its_value() {
        let redactor = Redactor::default();
        let text = r#"{"api_key":"0123456789abcdef0123456789abcdef","extra_headers":{"x-api-key":"fedcba9876543210fedcba9876543210"},"AZURE_PASSWORD":"correcthorse","password":"short","max_tokens":5,"note":"api_key","schema":{"api_key":{"type":"string"}}}"#;
        let mut value: Value = serde_json::from_str(text).unwrap();
        redactor.redact_json(&mut value);
        let marker = "[REDACTED:credential]";
        assert_eq!(value["api_key"], marker);
        assert_eq!(value["extra_headers"]["x-api-key"], marker);
        assert_eq!(value["AZURE_PASSWORD"], marker);
        // Too short for a key, a label used as a value, and a label naming an object: kept.
        assert_eq!(value["password"], "short");
        assert_eq!(value["note"], "api_key");
        assert_eq!(value["schema"]["api_key"]["type"], "string");
        assert_eq!(value["max_tokens"], 5);
        // Neither fast check calls such JSON clean; without the secret, both do.
        let raw = RawValue::from_string(text.to_string()).unwrap();
        assert!(!redactor.json_is_clean(&raw));
        assert!(!redactor.json_walk_is_clean(text));
        let harmless =
            r#"{"password":"short","note":"api_key","schema":{"api_key":{"type":"string"}}}"#;
        let raw = RawValue::from_string(harmless.to_string()).unwrap();
        assert!(redactor.json_is_clean(&raw));
        assert!(redactor.json_walk_is_clean(harmless));
    }
}
