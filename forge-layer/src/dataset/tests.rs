//! The builder on a real store: selection, rules, duplicates, the split, the key cap, provenance.

use forge_router::Arm;
use serde_json::{Value, json};

use super::*;
use crate::reassemble::{AssistantMessage, FinalResponse, FunctionCall, ToolCall};
use crate::store::Feedback;
use crate::trace::Outcome;

fn trace(alias: &str, arm: Arm, key: Option<&str>, tenant: Option<&str>, prompt: &str) -> Trace {
    Trace {
        arm,
        key_id: key.map(str::to_string),
        tenant: tenant.map(str::to_string),
        ..Trace::sample(alias, prompt)
    }
}

fn store_with(traces: &[Trace], approve: impl Fn(&Trace) -> bool) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let encoded: Vec<_> = traces
        .iter()
        .map(|t| (t.id, serde_json::to_vec(t).unwrap()))
        .collect();
    store
        .insert_encoded(encoded.iter().map(|(id, b)| (*id, b.as_slice())))
        .unwrap();
    for t in traces.iter().filter(|t| approve(t)) {
        store
            .add_feedback(&Feedback {
                trace_id: t.id,
                score: Some(95.0),
                approved: None,
                comment: None,
                time_ms: 0,
            })
            .unwrap();
    }
    (dir, store)
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn only_golden_teacher_traces_of_the_route_and_tenant_become_valid_lines() {
    let mut traces = Vec::new();
    for i in 0..30 {
        traces.push(trace(
            "chat",
            Arm::Teacher,
            Some("k1"),
            Some("A"),
            &format!("q{i}"),
        ));
        traces.push(trace(
            "chat",
            Arm::Teacher,
            Some("k2"),
            Some("A"),
            &format!("r{i}"),
        ));
    }
    traces.push(trace(
        "chat",
        Arm::Student(0),
        Some("k1"),
        Some("A"),
        "student",
    ));
    traces.push(trace(
        "other",
        Arm::Teacher,
        Some("k1"),
        Some("A"),
        "other route",
    ));
    traces.push(trace(
        "chat",
        Arm::Teacher,
        Some("k3"),
        Some("B"),
        "tenant B",
    ));
    let ungraded = trace("chat", Arm::Teacher, Some("k1"), Some("A"), "not graded");
    traces.push(ungraded.clone());
    let (dir, store) = store_with(&traces, |t| t.id != ungraded.id);
    let mut spec = DatasetSpec::new("chat");
    spec.tenant = Some("A".into());
    let out = dir.path().join("datasets");
    let m = build(&store, &spec, &out, "ds1", |_| {}).unwrap();

    assert_eq!((m.considered, m.golden, m.examples()), (62, 60, 60));
    let all: Vec<Value> = lines(&m.train.path)
        .into_iter()
        .chain(lines(&m.validation.path))
        .collect();
    for line in &all {
        assert_eq!(rules::check(line, rules::DEFAULT_MAX_TOKENS), Ok(()));
        assert_eq!(
            line["messages"][0]["role"], "system",
            "developer becomes system"
        );
        let text = line.to_string();
        assert!(
            !text.contains("student")
                && !text.contains("other route")
                && !text.contains("tenant B")
                && !text.contains("not graded")
        );
    }
    // Provenance names the trace behind every line, and the manifest's hashes verify.
    let prov = lines(&m.provenance.path);
    assert_eq!(prov.len() as u64, m.examples());
    for f in [&m.train, &m.validation, &m.provenance] {
        assert_eq!(sha256_file(&f.path).unwrap(), f.sha256);
    }
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(out.join("ds1/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest, m);
    assert!(
        m.validation.lines > 0 && m.train.lines > m.validation.lines,
        "about 10% held out: {m:?}"
    );
}

#[test]
fn duplicates_are_dropped_the_split_is_deterministic_and_the_cut_moves_on() {
    let mut traces: Vec<Trace> = (0..40)
        .map(|i| trace("chat", Arm::Teacher, None, None, &format!("q{}", i % 20)))
        .collect();
    let (dir, store) = store_with(&traces, |_| true);
    let spec = DatasetSpec::new("chat");
    let a = build(&store, &spec, dir.path(), "a", |_| {}).unwrap();
    let b = build(&store, &spec, dir.path(), "b", |_| {}).unwrap();
    assert_eq!((a.examples(), a.duplicates), (20, 20));
    assert_eq!(
        (a.train.sha256.clone(), a.validation.sha256.clone()),
        (b.train.sha256, b.validation.sha256)
    );

    // New traces only, after the cut.
    let newer = trace("chat", Arm::Teacher, None, None, "brand new");
    store
        .insert_encoded([(newer.id, serde_json::to_vec(&newer).unwrap().as_slice())])
        .unwrap();
    store
        .add_feedback(&Feedback {
            trace_id: newer.id,
            score: None,
            approved: Some(true),
            comment: None,
            time_ms: 0,
        })
        .unwrap();
    let next = DatasetSpec {
        earlier: vec![built(&a)],
        after: a.cut,
        ..spec
    };
    let c = build(&store, &next, dir.path(), "c", |_| {}).unwrap();
    assert_eq!((c.considered, c.examples()), (1, 1));
    traces.push(newer);
}

/// Builds from `keys` (a key and the prompts it sent) with `share`; each key's lines written.
fn written_per_key(
    keys: &[(&str, Vec<String>)],
    share: f64,
) -> (Manifest, BTreeMap<String, usize>) {
    let traces: Vec<Trace> = keys
        .iter()
        .flat_map(|(key, prompts)| {
            prompts
                .iter()
                .map(|p| trace("chat", Arm::Teacher, Some(key), None, p))
        })
        .collect();
    let (dir, store) = store_with(&traces, |_| true);
    let mut spec = DatasetSpec::new("chat");
    spec.max_key_share = share;
    let ready = lines_ready(&store, &spec).unwrap();
    let m = build(&store, &spec, dir.path(), "d", |_| {}).unwrap();
    assert_eq!(
        ready, m.provenance.lines,
        "what a trigger counts is what is written"
    );
    let mut per_key = BTreeMap::new();
    for p in lines(&m.provenance.path) {
        *per_key
            .entry(p["key_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    // No key over its share of what was written, whatever the mix.
    for (key, n) in &per_key {
        assert!(
            *n as f64 <= share * m.provenance.lines as f64,
            "{key}: {n} of {} lines",
            m.provenance.lines
        );
    }
    (m, per_key)
}

fn prompts(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[test]
fn one_key_cannot_dominate_the_dataset() {
    let (m, per_key) = written_per_key(
        &[("loud", prompts("l", 80)), ("quiet", prompts("q", 20))],
        0.5,
    );
    assert_eq!(per_key["loud"], 20, "{per_key:?}");
    assert_eq!(per_key["quiet"], 20);
    assert_eq!(m.capped, 60);

    // With a third key the loud one may write as many lines as the other two together.
    let (_, per_key) = written_per_key(
        &[
            ("loud", prompts("l", 80)),
            ("mid", prompts("m", 30)),
            ("quiet", prompts("q", 10)),
        ],
        0.5,
    );
    assert_eq!(
        (per_key["loud"], per_key["mid"], per_key["quiet"]),
        (40, 30, 10)
    );

    // Duplicates never count towards a key's allowance: 80 traces but 40 distinct lines.
    let repeats: Vec<String> = (0..80).map(|i| format!("l{}", i % 40)).collect();
    let (m, per_key) = written_per_key(&[("loud", repeats), ("quiet", prompts("q", 30))], 0.5);
    assert_eq!((per_key["loud"], per_key["quiet"]), (30, 30));
    assert_eq!(m.duplicates, 40);

    // Two keys cannot keep a share under a half: nothing is written rather than too much.
    let (m, per_key) = written_per_key(&[("a", prompts("a", 10)), ("b", prompts("b", 10))], 0.4);
    assert!(per_key.is_empty(), "{per_key:?}");
    assert_eq!(m.capped, 20);
}

#[test]
fn the_share_cap_is_the_largest_that_keeps_every_key_within_its_share() {
    assert_eq!(share_cap(vec![80, 20], 0.5), 20);
    assert_eq!(share_cap(vec![80, 30, 10], 0.5), 40);
    assert_eq!(share_cap(vec![5, 5, 5, 5], 0.25), 5);
    assert_eq!(share_cap(vec![100, 1, 1, 1], 0.25), 1);
    assert_eq!(share_cap(vec![10, 10], 0.4), 0);
    assert_eq!(share_cap(vec![], 0.5), 0);
    // Against the definition, over many mixes and shares.
    for seed in 0..200u64 {
        let lines: Vec<u64> = (0..2 + seed % 5)
            .map(|k| (seed * 7 + k * 13) % 50)
            .collect();
        let share = 0.2 + (seed % 7) as f64 / 10.0;
        let cap = share_cap(lines.clone(), share);
        let holds =
            |c: u64| c as f64 <= share * lines.iter().map(|&n| n.min(c)).sum::<u64>() as f64;
        assert!(cap == 0 || holds(cap), "{lines:?} {share} {cap}");
        let max = lines.iter().copied().max().unwrap_or(0);
        assert!(
            (cap + 1..=max).all(|c| !holds(c)),
            "{lines:?} {share}: {cap} is not the largest"
        );
    }
}

/// Builds the `chat` route's dataset with every line in the train file.
fn train_only(store: &Store, dir: &Path) -> Manifest {
    let spec = DatasetSpec {
        validation_percent: 0.0,
        ..DatasetSpec::new("chat")
    };
    build(store, &spec, dir, "t", |_| {}).unwrap()
}

#[test]
fn tool_use_traces_become_valid_tool_lines() {
    let mut t = trace("chat", Arm::Teacher, None, None, "weather in Paris?");
    t.request = json!({"model": "chat", "messages": [
        {"role": "user", "content": "weather in Paris?"},
        // As a client that rebuilt the turn from a stream sends it: with the fragments' `index`.
        {"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
        // Some servers send an empty content beside a call.
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "log_visit", "arguments": "{}"}}]},
        // A function that returns nothing.
        {"role": "tool", "tool_call_id": "call_0", "content": ""}
    ], "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}], "parallel_tool_calls": true});
    let mut calling = trace("chat", Arm::Teacher, None, None, "and in Rome?");
    calling.response.choices[0].message = AssistantMessage {
        content: Some(String::new()),
        refusal: None,
        tool_calls: vec![ToolCall {
            id: "call_2".into(),
            kind: "function".into(),
            function: FunctionCall {
                name: "get_weather".into(),
                arguments: "{\"city\":\"Rome\"}".into(),
            },
        }],
        function_call: None,
    };
    calling.response.choices[0].finish_reason = Some("tool_calls".into());
    calling.request["tools"] = t.request["tools"].clone();
    // Only custom tools, which a line cannot hold: `parallel_tool_calls` has nothing to be about.
    let mut custom = trace("chat", Arm::Teacher, None, None, "grep the logs");
    custom.request["tools"] =
        json!([{"type": "custom", "custom": {"name": "grep", "description": "Searches logs"}}]);
    custom.request["parallel_tool_calls"] = json!(false);
    let (dir, store) = store_with(&[t, calling, custom], |_| true);
    let m = train_only(&store, dir.path());
    assert_eq!((m.examples(), m.skipped.len()), (3, 0), "{m:?}");
    let all = lines(&m.train.path);
    let first = &all[0];
    assert_eq!(
        first["messages"][1]["weight"], 0,
        "earlier assistant turns are not trained on"
    );
    assert_eq!(first["messages"][2]["role"], "tool");
    assert_eq!(
        first["messages"][1]["tool_calls"][0],
        json!({"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}),
        "only the keys fine-tuning accepts"
    );
    assert_eq!(first["messages"][4]["content"], "");
    assert_eq!(
        first["messages"][5]["content"],
        "answer to weather in Paris?"
    );
    assert_eq!(first["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(
        all[1]["messages"][2]["tool_calls"][0]["function"]["arguments"],
        "{\"city\":\"Rome\"}"
    );
    // An empty content beside calls is left out, in earlier turns and in the answer.
    assert!(first["messages"][3].get("content").is_none(), "{first}");
    assert!(all[1]["messages"][2].get("content").is_none(), "{}", all[1]);
    assert!(first.get("parallel_tool_calls").is_some());
    assert!(all[2].get("tools").is_none() && all[2].get("parallel_tool_calls").is_none());
}

#[test]
fn traces_of_the_deprecated_functions_api_are_left_out_by_name() {
    let call = FunctionCall {
        name: "get_weather".into(),
        arguments: "{\"city\":\"Rome\"}".into(),
    };
    // The answer is a legacy call; the request defines `functions`; an earlier turn called one.
    let mut answer = trace("chat", Arm::Teacher, None, None, "weather in Rome?");
    answer.response.choices[0].message = AssistantMessage {
        content: None,
        function_call: Some(call),
        ..Default::default()
    };
    answer.response.choices[0].finish_reason = Some("function_call".into());
    let mut defined = trace("chat", Arm::Teacher, None, None, "what can you call?");
    defined.request["functions"] =
        json!([{"name": "get_weather", "parameters": {"type": "object"}}]);
    let mut earlier = trace("chat", Arm::Teacher, None, None, "and then?");
    earlier.request["messages"] = json!([
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": null, "function_call": {"name": "get_weather", "arguments": "{}"}},
        {"role": "function", "name": "get_weather", "content": "3C"},
        {"role": "user", "content": "and then?"}
    ]);
    let plain = trace("chat", Arm::Teacher, None, None, "hello");
    let (dir, store) = store_with(&[answer, defined, earlier, plain], |_| true);
    let m = train_only(&store, dir.path());
    assert_eq!(m.examples(), 1, "{m:?}");
    assert_eq!(m.skipped.get("legacy_function_call"), Some(&3), "{m:?}");
}

fn feedback(trace: &Trace, score: Option<f64>, approved: Option<bool>) -> Feedback {
    Feedback {
        trace_id: trace.id,
        score,
        approved,
        comment: Some("late".into()),
        time_ms: 0,
    }
}

fn built(m: &Manifest) -> EarlierBuild {
    EarlierBuild {
        cut: m.cut.unwrap(),
        feedback_mark: m.feedback_mark.unwrap(),
        late_stop: m.late_stop,
    }
}

/// The dataset after `builds`, as the distiller would specify it.
fn after(builds: &[&Manifest]) -> DatasetSpec {
    DatasetSpec {
        earlier: builds.iter().map(|m| built(m)).collect(),
        after: builds.last().unwrap().cut,
        ..DatasetSpec::new("chat")
    }
}

#[test]
fn feedback_that_comes_after_the_cut_brings_its_trace_into_the_next_dataset_once() {
    let approved_late = trace("chat", Arm::Teacher, Some("k"), None, "approved late");
    let scored_late = trace("chat", Arm::Teacher, Some("k"), None, "scored late");
    let golden_early = trace("chat", Arm::Teacher, Some("k"), None, "golden early");
    let other_route = trace("other", Arm::Teacher, Some("k"), None, "other route");
    let rejected = trace("chat", Arm::Teacher, Some("k"), None, "rejected late");
    let traces = [
        approved_late.clone(),
        scored_late.clone(),
        golden_early.clone(),
        other_route.clone(),
        rejected.clone(),
    ];
    let (dir, store) = store_with(&traces, |t| t.id == golden_early.id || t.id == rejected.id);
    let first = build(&store, &DatasetSpec::new("chat"), dir.path(), "a", |_| {}).unwrap();
    assert_eq!((first.examples(), first.late), (2, 0));
    assert_eq!(first.cut, Some(rejected.id));

    // After the cut: an approval, a high score, more feedback on a trace already golden, feedback
    // on another route's trace, and a rejection of a trace a dataset already holds.
    for f in [
        feedback(&approved_late, None, Some(true)),
        feedback(&scored_late, Some(99.0), None),
        feedback(&golden_early, Some(97.0), Some(true)),
        feedback(&other_route, None, Some(true)),
        feedback(&rejected, None, Some(false)),
    ] {
        store.add_feedback(&f).unwrap();
    }
    let newer = trace("chat", Arm::Teacher, Some("k"), None, "newer");
    store
        .insert_encoded([(newer.id, serde_json::to_vec(&newer).unwrap().as_slice())])
        .unwrap();
    store
        .add_feedback(&feedback(&newer, Some(95.0), None))
        .unwrap();

    let spec = after(&[&first]);
    assert_eq!(
        lines_ready(&store, &spec).unwrap(),
        3,
        "two late and one new"
    );
    let second = build(&store, &spec, dir.path(), "b", |_| {}).unwrap();
    assert_eq!((second.examples(), second.late), (3, 2));
    assert_eq!(second.cut, Some(newer.id));
    let provenance: Vec<String> = lines(&second.provenance.path)
        .iter()
        .map(|l| l["trace_id"].as_str().unwrap().to_string())
        .collect();
    let id = |t: &Trace| {
        serde_json::to_value(t.id)
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        provenance.iter().collect::<std::collections::BTreeSet<_>>(),
        [id(&approved_late), id(&scored_late), id(&newer)]
            .iter()
            .collect(),
        "each late trace once, and no trace an earlier dataset holds"
    );

    // Nothing new since: the next dataset reads neither the late traces again nor anything else,
    // and keeps the cut where it was.
    let third = build(&store, &after(&[&first, &second]), dir.path(), "c", |_| {}).unwrap();
    assert_eq!(
        (third.examples(), third.late, third.cut),
        (0, 0, second.cut)
    );
}

#[test]
fn a_trace_rejected_and_approved_again_is_not_taken_a_second_time() {
    let flip = trace(
        "chat",
        Arm::Teacher,
        Some("k"),
        None,
        "approved, rejected, approved",
    );
    let (dir, store) = store_with(std::slice::from_ref(&flip), |_| true);
    let first = build(&store, &DatasetSpec::new("chat"), dir.path(), "a", |_| {}).unwrap();
    assert_eq!(first.examples(), 1);
    store
        .add_feedback(&feedback(&flip, None, Some(false)))
        .unwrap();
    let second = build(&store, &after(&[&first]), dir.path(), "b", |_| {}).unwrap();
    assert_eq!((second.examples(), second.late), (0, 0));
    // Golden again, and not golden at the last build's mark: but the first build took it.
    store
        .add_feedback(&feedback(&flip, None, Some(true)))
        .unwrap();
    let spec = after(&[&first, &second]);
    assert_eq!(lines_ready(&store, &spec).unwrap(), 0);
    let third = build(&store, &spec, dir.path(), "c", |_| {}).unwrap();
    assert_eq!((third.examples(), third.late), (0, 0));
}

#[test]
fn a_trace_golden_by_the_judge_alone_is_not_taken_again_when_feedback_comes() {
    let judged = trace("chat", Arm::Teacher, Some("k"), None, "judged golden");
    let (dir, store) = store_with(std::slice::from_ref(&judged), |_| false);
    store
        .add_evaluation(&crate::store::Evaluation {
            trace_id: judged.id,
            score: 95.0,
            source: "judge:test".into(),
            time_ms: 0,
        })
        .unwrap();
    let first = build(&store, &DatasetSpec::new("chat"), dir.path(), "a", |_| {}).unwrap();
    assert_eq!(first.examples(), 1, "golden by its evaluation");
    // Feedback after the cut makes the next build look at the trace again, late: golden at the
    // first build's mark, by the evaluation that build saw, it is not taken a second time.
    store
        .add_feedback(&feedback(&judged, None, Some(true)))
        .unwrap();
    let spec = after(&[&first]);
    assert_eq!(lines_ready(&store, &spec).unwrap(), 0);
    let second = build(&store, &spec, dir.path(), "b", |_| {}).unwrap();
    assert_eq!((second.examples(), second.late), (0, 0));
}

/// Builds route `chat`'s datasets under a file limit of `limit` bytes, each after `earlier` and
/// the parts before it, until one is not full (ten at most). Checks each part's files against
/// the limit and calls `each` on it; returns the parts and the trace ids they wrote.
fn build_in_parts(
    store: &Store,
    dir: &Path,
    earlier: &[Manifest],
    limit: u64,
    mut each: impl FnMut(&Manifest),
) -> (Vec<Manifest>, Vec<Value>) {
    let mut builds = earlier.to_vec();
    let mut written = Vec::new();
    for n in 0..10 {
        let mut spec = match builds.last() {
            Some(_) => after(&builds.iter().collect::<Vec<_>>()),
            None => DatasetSpec::new("chat"),
        };
        spec.max_file_bytes = Some(limit);
        let m = build(store, &spec, dir, &format!("part{n}"), |_| {}).unwrap();
        for f in [&m.train, &m.validation] {
            assert!(std::fs::metadata(&f.path).unwrap().len() <= limit, "{m:?}");
        }
        written.extend(
            lines(&m.provenance.path)
                .into_iter()
                .map(|p| p["trace_id"].clone()),
        );
        each(&m);
        let done = !m.full;
        builds.push(m);
        if done {
            break;
        }
    }
    (builds.split_off(earlier.len()), written)
}

#[test]
fn a_build_stops_at_the_file_limit_and_the_next_goes_on_from_its_cut() {
    let traces: Vec<Trace> = (0..60)
        .map(|i| trace("chat", Arm::Teacher, None, None, &format!("question {i}")))
        .collect();
    let (dir, store) = store_with(&traces, |_| true);
    let whole = build(
        &store,
        &DatasetSpec::new("chat"),
        dir.path(),
        "whole",
        |_| {},
    )
    .unwrap();
    assert!(!whole.full);
    let line_bytes = std::fs::metadata(&whole.train.path).unwrap().len() / whole.train.lines;
    // Room for about a third of the lines in each file.
    let limit = line_bytes * 20;
    let (builds, written) = build_in_parts(&store, dir.path(), &[], limit, |m| {
        assert_eq!(m.examples(), m.golden, "{m:?}");
    });
    assert!(builds.len() >= 3, "the limit split the traces: {builds:?}");
    assert!(builds[..builds.len() - 1].iter().all(|m| m.full));
    // Every trace once, in order, across the parts: none lost at a stop, none taken twice.
    let every: Vec<Value> = traces.iter().map(|t| json!(t.id)).collect();
    let mut sorted = written.clone();
    sorted.sort_by_key(|v| v.as_str().unwrap().to_string());
    assert_eq!(sorted, every);
    assert_eq!(builds.last().unwrap().cut, whole.cut);
}

/// Builds from 40 traces of a loud key, then 20 of a quiet one, under a file limit with room
/// for `room` lines, and checks that neither key passes half of what was written. Returns each
/// key's lines written, or the build's error.
fn built_under_a_limit_loud_key_first(room: u64) -> Result<BTreeMap<String, u64>, DatasetError> {
    let mut traces: Vec<Trace> = (0..40)
        .map(|i| {
            trace(
                "chat",
                Arm::Teacher,
                Some("loud"),
                None,
                &format!("loud {i}"),
            )
        })
        .collect();
    traces.extend((0..20).map(|i| {
        trace(
            "chat",
            Arm::Teacher,
            Some("quiet"),
            None,
            &format!("quiet {i}"),
        )
    }));
    let (dir, store) = store_with(&traces, |_| true);
    let mut spec = DatasetSpec::new("chat");
    spec.validation_percent = 0.0;
    let whole = build(&store, &spec, dir.path(), "whole", |_| {}).unwrap();
    assert_eq!(whole.examples(), 40, "20 a key: {whole:?}");
    let line_bytes = std::fs::metadata(&whole.train.path).unwrap().len() / 40;
    spec.max_file_bytes = Some(line_bytes * room);
    let part = build(&store, &spec, dir.path(), "part", |_| {})?;
    let mut per_key: BTreeMap<String, u64> = BTreeMap::new();
    for p in lines(&part.provenance.path) {
        *per_key
            .entry(p["key_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let written: u64 = per_key.values().sum();
    for (key, n) in &per_key {
        assert!(
            *n as f64 <= 0.5 * written as f64,
            "{key}: {n} of {written} lines"
        );
    }
    Ok(per_key)
}

#[test]
fn a_build_stopped_by_the_file_limit_keeps_every_key_within_its_share() {
    // Capped over everything (20 a key), the loud key's 20 and then 10 of the quiet key's
    // would fit, two thirds from one key.
    let per_key = built_under_a_limit_loud_key_first(30).unwrap();
    assert!(per_key.values().sum::<u64>() >= 10, "{per_key:?}");
}

#[test]
fn a_file_one_key_would_fill_alone_takes_the_other_keys_too() {
    let per_key = |room| built_under_a_limit_loud_key_first(room).unwrap();
    let both = |n| BTreeMap::from([("loud".to_string(), n), ("quiet".to_string(), n)]);
    // Capped over everything (20 a key), the loud key's first 15 fill the file alone. At 7 a
    // key, both keys' 7 fit; at 8, the quiet key's eighth line does not.
    assert_eq!(per_key(15), both(7));
    // The loud key's 20 fill it exactly, and the quiet key's first line is the one that does
    // not fit. At 10 a key, both keys' 10 fit.
    assert_eq!(per_key(20), both(10));
}

#[test]
fn a_file_too_small_to_keep_the_key_share_fails_the_build() {
    // Room for one line: whatever the cap, one key writes all of what is written.
    let err = built_under_a_limit_loud_key_first(1).unwrap_err();
    assert!(
        matches!(err, DatasetError::NoRoomForKeyShare { .. }),
        "{err}"
    );
}

#[test]
fn late_traces_past_the_file_limit_go_on_in_the_next_build_each_once() {
    // Two keys, so the key cap is worked out too; none golden when the first build cuts.
    let traces: Vec<Trace> = (0..60)
        .map(|i| {
            let key = if i % 2 == 0 { "even" } else { "odd" };
            trace("chat", Arm::Teacher, Some(key), None, &format!("q {i}"))
        })
        .collect();
    let (dir, store) = store_with(&traces, |_| false);
    let first = build(&store, &DatasetSpec::new("chat"), dir.path(), "a", |_| {}).unwrap();
    assert_eq!((first.examples(), first.cut), (0, Some(traces[59].id)));
    // Approved afterwards, newest first, then each again oldest first: a stop at any of them
    // leaves traces with feedback both before and after it. And one rejected at the very end.
    for t in traces.iter().rev().chain(&traces) {
        store.add_feedback(&feedback(t, None, Some(true))).unwrap();
    }
    store
        .add_feedback(&feedback(&traces[3], None, Some(false)))
        .unwrap();
    let newer = trace("chat", Arm::Teacher, Some("odd"), None, "newer");
    store
        .insert_encoded([(newer.id, serde_json::to_vec(&newer).unwrap().as_slice())])
        .unwrap();
    store
        .add_feedback(&feedback(&newer, None, Some(true)))
        .unwrap();
    let line_bytes = {
        let all = after(&[&first]);
        let whole = build(&store, &all, dir.path(), "whole", |_| {}).unwrap();
        assert_eq!((whole.examples(), whole.late), (60, 59), "{whole:?}");
        (std::fs::metadata(&whole.train.path).unwrap().len()
            + std::fs::metadata(&whole.validation.path).unwrap().len())
            / 60
    };
    // Room for about a third of the late lines in each file.
    let limit = line_bytes * 20;
    let (parts, written) = build_in_parts(
        &store,
        dir.path(),
        std::slice::from_ref(&first),
        limit,
        |m| {
            if m.full {
                assert_eq!(m.cut, first.cut, "no new trace read: {m:?}");
            }
        },
    );
    let builds: Vec<Manifest> = [first].into_iter().chain(parts).collect();
    assert!(
        builds.len() >= 4,
        "the limit split the late traces: {builds:?}"
    );
    // Every golden trace once across the parts, written or left out by the key cap: none lost
    // at a stop, none taken twice.
    let every: std::collections::BTreeSet<String> = traces
        .iter()
        .filter(|t| t.id != traces[3].id)
        .chain([&newer])
        .map(|t| t.id.to_string())
        .collect();
    let unique: std::collections::BTreeSet<String> = written
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(unique.len(), written.len(), "none twice");
    assert!(unique.is_subset(&every));
    let capped: u64 = builds.iter().map(|m| m.capped).sum();
    assert_eq!(
        written.len() as u64 + capped,
        every.len() as u64,
        "{builds:?}"
    );
    assert_eq!(builds.last().unwrap().cut, Some(newer.id));
    // And nothing more after that.
    let spec = after(&builds.iter().collect::<Vec<_>>());
    assert_eq!(lines_ready(&store, &spec).unwrap(), 0);
}

#[test]
fn requests_the_chat_api_takes_but_a_training_file_may_not_hold_are_skipped() {
    // The chat API answers these; one such line would make the fine-tuning API refuse the file.
    let mut null_parameters = trace("chat", Arm::Teacher, None, None, "call nothing");
    null_parameters.request["tools"] =
        json!([{"type": "function", "function": {"name": "f", "parameters": null}}]);
    let mut numeric_name = trace("chat", Arm::Teacher, None, None, "who am I?");
    numeric_name.request["messages"][0]["name"] = json!(42);
    let plain = trace("chat", Arm::Teacher, None, None, "hello");
    let (dir, store) = store_with(&[null_parameters, numeric_name, plain], |_| true);
    let m = train_only(&store, dir.path());
    assert_eq!(m.examples(), 1, "{m:?}");
    assert_eq!(m.skipped.get("bad_tools"), Some(&1), "{m:?}");
    assert_eq!(m.skipped.get("bad_name"), Some(&1), "{m:?}");
}

#[test]
fn an_upstream_error_nested_past_what_serde_reads_back_fails_no_build() {
    // Such a body parses when it arrives; a trace holding it as a tree would not.
    let depth = 126;
    let body = format!(r#"{{"error":{}{}}}"#, "[".repeat(depth), "]".repeat(depth));
    let mut errored = trace("other-route", Arm::Teacher, None, None, "boom");
    errored.response = FinalResponse::from_json(body.as_bytes());
    errored.status = 500;
    errored.outcome = Outcome::Errored;
    let fine = trace("chat", Arm::Teacher, None, None, "fine");
    let (dir, store) = store_with(&[errored, fine], |_| true);
    let m = train_only(&store, dir.path());
    assert_eq!(m.examples(), 1, "{m:?}");
}
