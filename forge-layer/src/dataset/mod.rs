//! The dataset builder: golden traces streamed into validated OpenAI fine-tuning JSONL.
//!
//! Traces are read one at a time from a store snapshot, so memory stays flat however many
//! there are. Each golden trace becomes one line ([`line::to_line`]), checked against the
//! OpenAI rules ([`rules::check`]); a line that fails is skipped and its reason counted.
//! Duplicates (by content hash) are dropped, and the train/validation split is decided by the
//! same hash, so copies of one example can never land on both sides. One client key may
//! contribute at most `max_key_share` of the lines written (against poisoning), under a cap that
//! a first walk of the same snapshot works out. A manifest records the SHA-256 of every file and the counts;
//! `provenance.jsonl` names the trace behind every line.
//!
//! A dataset reads the traces after the previous one's cut, and also the traces behind that cut
//! which feedback made golden since the previous dataset was built (a person's approval can come
//! days after the exchange), so that no approval is left out of every dataset.

pub mod line;
pub mod rules;
mod seen;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::grade::GoldenPolicy;
use crate::store::{Evaluation, Feedback, GradedScan, Store, StoreError};
use crate::trace::{Trace, TraceId};
use seen::Seen;

/// What to build.
#[derive(Debug, Clone)]
pub struct DatasetSpec {
    /// The route alias whose teacher traffic is used.
    pub route: String,
    /// Only this tenant's traces, when set.
    pub tenant: Option<String>,
    /// Only traces after this one (the previous cut), and those up to it that feedback made
    /// golden since the builds in `earlier`.
    pub after: Option<TraceId>,
    /// The route's earlier builds that count (oldest first): a trace up to `after` joins this
    /// dataset if feedback after the last one's mark made it golden and no build in the list
    /// took it. Empty: no trace up to `after` does.
    pub earlier: Vec<EarlierBuild>,
    /// Only traces up to this one, when set: as far as the judge has got and the grading window
    /// allows, so that a trace still to be scored is left for a later dataset instead of falling
    /// behind this one's cut.
    pub until: Option<TraceId>,
    /// What makes a trace golden.
    pub policy: GoldenPolicy,
    /// Share of lines held out for validation, in percent.
    pub validation_percent: f64,
    /// The most of the dataset one client key may contribute (0–1). Applied only when traces
    /// come from at least two keys; traces with no key count as one key.
    pub max_key_share: f64,
    /// The longest example, in estimated tokens.
    pub max_tokens: usize,
    /// The largest file the provider takes, in bytes, when it has a limit. The build stops
    /// before a line that would take the training or validation file past it; its cut is then
    /// the last trace read before that line, so the route's next dataset goes on from there.
    /// Late traces (behind the previous cut) come first; a build stopped among them reads no
    /// new trace, and the next dataset goes on from the late trace it stopped at.
    pub max_file_bytes: Option<u64>,
}

impl DatasetSpec {
    /// Defaults for a route: 10% validation, at most half from one key, 65,536 tokens.
    pub fn new(route: impl Into<String>) -> Self {
        Self {
            route: route.into(),
            tenant: None,
            after: None,
            earlier: Vec::new(),
            until: None,
            policy: GoldenPolicy::default(),
            validation_percent: 10.0,
            max_key_share: 0.5,
            max_tokens: rules::DEFAULT_MAX_TOKENS,
            max_file_bytes: None,
        }
    }

    fn selects(&self, trace: &Trace) -> bool {
        trace.alias == self.route
            && self
                .tenant
                .as_ref()
                .is_none_or(|t| trace.tenant.as_ref() == Some(t))
    }
}

/// What a dataset built earlier read: see [`DatasetSpec::earlier`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EarlierBuild {
    /// Its cut.
    pub cut: TraceId,
    /// Its [`Manifest::feedback_mark`].
    pub feedback_mark: TraceId,
    /// Its [`Manifest::late_stop`].
    pub late_stop: Option<TraceId>,
}

impl EarlierBuild {
    /// Where the next build's look behind the cut starts: after this build's mark, or, when it
    /// stopped among its late traces, at the one it stopped at.
    fn late_since(&self) -> TraceId {
        self.late_stop.map_or(self.feedback_mark, |stop| {
            TraceId::from_u128(stop.as_u128().saturating_sub(1))
        })
    }
}

/// One output file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Its path.
    pub path: PathBuf,
    /// Lines written.
    pub lines: u64,
    /// SHA-256 of its bytes, hex.
    pub sha256: String,
}

/// What was built: the manifest, also written as `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The dataset id (the distillation job's id).
    pub id: String,
    /// The route alias.
    pub route: String,
    /// The tenant filter, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Traces read for this route and tenant: after the previous cut, and behind it those that
    /// feedback made golden since (`late`).
    pub considered: u64,
    /// Of those, golden.
    pub golden: u64,
    /// Of the golden, traces behind the previous cut that feedback made golden since the
    /// previous dataset was built.
    #[serde(default)]
    pub late: u64,
    /// Golden traces left out as duplicates of an earlier line.
    pub duplicates: u64,
    /// Golden traces left out by the per-key share cap.
    pub capped: u64,
    /// Golden traces whose line broke a rule, by reason.
    pub skipped: BTreeMap<String, u64>,
    /// The training file.
    pub train: FileDigest,
    /// The validation file.
    pub validation: FileDigest,
    /// One line per written line: split, line number, trace id, key id.
    pub provenance: FileDigest,
    /// The newest trace read (the previous cut, when none was new): the next dataset starts
    /// after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<TraceId>,
    /// The newest feedback this build saw (the id 0 when there was none): the next dataset looks
    /// for traces behind its cut that feedback after this made golden. `None` only in manifests
    /// of builds before this was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback_mark: Option<TraceId>,
    /// The build stopped at [`DatasetSpec::max_file_bytes`]: the traces after `cut` are left
    /// for the next dataset.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full: bool,
    /// When the build stopped among its late traces (so it read no new one): the latest
    /// feedback of the late trace it stopped at. It read the late traces whose latest feedback
    /// up to `feedback_mark` came before this one, and none of the others, which the next
    /// dataset reads late.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_stop: Option<TraceId>,
}

impl Manifest {
    /// Lines written in both files.
    pub fn examples(&self) -> u64 {
        self.train.lines + self.validation.lines
    }
}

/// Why a dataset could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatasetError {
    /// Reading traces failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing files failed.
    #[error("dataset file: {0}")]
    Io(#[from] std::io::Error),
    /// Under the file size limit, no build keeps every client key within its share: one line
    /// a key takes more room than the file has. Nothing is written and the cut stays.
    #[error(
        "a {max_bytes}-byte dataset file holds too few lines to keep each client key within max_key_share = {share}"
    )]
    NoRoomForKeyShare {
        /// The share asked for.
        share: f64,
        /// The file size limit.
        max_bytes: u64,
    },
}

/// A file being written, hashed as it goes.
struct HashedFile {
    path: PathBuf,
    out: BufWriter<File>,
    hash: Sha256,
    lines: u64,
    bytes: u64,
}

impl HashedFile {
    fn create(path: PathBuf) -> std::io::Result<Self> {
        Ok(Self {
            out: BufWriter::new(File::create(&path)?),
            path,
            hash: Sha256::new(),
            lines: 0,
            bytes: 0,
        })
    }

    fn write_line(&mut self, bytes: &[u8]) -> std::io::Result<u64> {
        self.out.write_all(bytes)?;
        self.out.write_all(b"\n")?;
        self.hash.update(bytes);
        self.hash.update(b"\n");
        self.lines += 1;
        self.bytes += bytes.len() as u64 + 1;
        Ok(self.lines)
    }

    /// Whether `line` (and its newline) would take the file past `max` bytes.
    fn would_pass(&self, line: &[u8], max: Option<u64>) -> bool {
        max.is_some_and(|max| self.bytes + line.len() as u64 + 1 > max)
    }

    fn finish(mut self) -> std::io::Result<FileDigest> {
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        Ok(FileDigest {
            path: self.path,
            lines: self.lines,
            sha256: hex::encode(self.hash.finalize()),
        })
    }
}

/// A golden trace as the dataset sees it.
enum Candidate {
    /// Its line, as JSON bytes, and their SHA-256.
    Line { bytes: Vec<u8>, hash: [u8; 32] },
    /// It breaks a fine-tuning rule (the reason), or could not be serialised.
    Skipped(String),
    /// An earlier trace made the same line.
    Duplicate,
}

/// Turns a golden trace into its line, unless a rule or `seen` leaves it out.
fn candidate(trace: &Trace, spec: &DatasetSpec, seen: &mut Seen) -> Candidate {
    let line =
        match line::to_line(trace).and_then(|l| rules::check(&l, spec.max_tokens).map(|()| l)) {
            Ok(line) => line,
            Err(reason) => return Candidate::Skipped(reason.to_string()),
        };
    let Ok(bytes) = serde_json::to_vec(&line) else {
        return Candidate::Skipped("unserialisable".into());
    };
    let hash: [u8; 32] = Sha256::digest(&bytes).into();
    if seen.insert(&hash) {
        return Candidate::Duplicate;
    }
    Candidate::Line { bytes, hash }
}

/// Walks the traces a build of `spec` reads, with the feedback in force and the latest
/// evaluation: first those up to the previous cut that feedback after the previous build made
/// golden, and that no earlier build took (late: with the id of the trace's latest feedback, in
/// that order), then every trace after the cut (`None`). `f` returns `false` to stop.
fn walk(
    scan: &GradedScan,
    spec: &DatasetSpec,
    mut f: impl FnMut(Trace, Option<Feedback>, Option<Evaluation>, Option<TraceId>) -> bool,
) -> Result<(), StoreError> {
    let mut go_on = true;
    if let (Some(cut), Some(previous)) = (spec.after, spec.earlier.last()) {
        let mut failed = None;
        scan.late(previous.late_since(), cut, |trace, fb, ev, feedback_id| {
            if !spec.selects(&trace) || !spec.policy.is_golden(&trace, fb.as_ref(), ev.as_ref()) {
                return true;
            }
            match taken_before(scan, spec, &trace) {
                Ok(true) => {}
                Ok(false) => go_on = f(trace, fb, ev, Some(feedback_id)),
                Err(e) => {
                    failed = Some(e);
                    go_on = false;
                }
            }
            go_on
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
    }
    if go_on {
        scan.for_each(spec.after, spec.until, |trace, fb, ev| {
            f(trace, fb, ev, None)
        })?;
    }
    Ok(())
}

/// Whether an earlier build took `trace`: one whose cut had reached it, at whose feedback mark
/// it was golden (the build that first read it, or a later one that found it late). Golden
/// then is golden under the feedback and evaluation of that moment, exactly: a rejection and a
/// new approval in between do not bring it back a second time. A build that stopped among its
/// late traces did not read those from the one it stopped at on.
fn taken_before(scan: &GradedScan, spec: &DatasetSpec, trace: &Trace) -> Result<bool, StoreError> {
    for build in spec.earlier.iter().filter(|b| b.cut >= trace.id) {
        if let Some(stop) = build.late_stop
            && scan
                .latest_feedback(trace.id, build.feedback_mark)?
                .is_some_and(|latest| latest >= stop)
        {
            continue;
        }
        let (fb, ev) = scan.graded_at(trace.id, build.feedback_mark)?;
        if spec.policy.is_golden(trace, fb.as_ref(), ev.as_ref()) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Each key's lines, after the rules and duplicates (which would otherwise count towards a
/// key's allowance and leave it more than its share of what is written), as a walk writing at
/// most `cap` lines a key sees them. With `max_bytes`, the walk stops at the first trace whose
/// line, written, would take its file past that size (returned as `stop`), and counts only the
/// lines before it.
fn lines_per_key(
    scan: &GradedScan,
    spec: &DatasetSpec,
    cap: Option<u64>,
    max_bytes: Option<u64>,
) -> Result<LinesPerKey, StoreError> {
    let mut counted = LinesPerKey::default();
    let mut seen = Seen::default();
    let mut bytes = [0u64; 2];
    let validation_bp = validation_basis_points(spec);
    walk(scan, spec, |trace, fb, ev, _| {
        if !spec.selects(&trace) || !spec.policy.is_golden(&trace, fb.as_ref(), ev.as_ref()) {
            return true;
        }
        let Candidate::Line { bytes: line, hash } = candidate(&trace, spec, &mut seen) else {
            return true;
        };
        let so_far = counted.per_key.get(&trace.key_id).copied().unwrap_or(0);
        if cap.is_none_or(|c| so_far < c) {
            let file = &mut bytes[usize::from(is_validation(&hash, validation_bp))];
            let after = *file + line.len() as u64 + 1;
            if max_bytes.is_some_and(|max| after > max) {
                // Not counted: a key whose first line is the one that does not fit wrote none.
                counted.stop = Some(trace.id);
                return false;
            }
            *file = after;
        }
        counted.per_key.insert(trace.key_id, so_far + 1);
        true
    })?;
    Ok(counted)
}

/// What [`lines_per_key`] counts.
#[derive(Default)]
struct LinesPerKey {
    per_key: BTreeMap<Option<String>, u64>,
    stop: Option<TraceId>,
}

/// How a build of `spec` is bounded: the most lines one key may write, and the new trace it
/// stops at under a file size limit.
struct Plan {
    cap: Option<u64>,
    stop: Option<TraceId>,
}

/// Works out `spec`'s [`Plan`]; `None` when no cap keeps the share under the file size limit.
/// The cap is the largest that keeps every key within its share of the lines written. Under a
/// file size limit, what is written is a prefix: the build capped over all the lines stops at
/// some trace, and the cap over the lines before it may be smaller. The smaller of the two
/// keeps the share over what is written, and since it only leaves more lines out, the build
/// still fits. When no cap over that prefix keeps the share (one key's lines fill it alone),
/// the cap is searched for ([`searched_cap`]).
fn plan(scan: &GradedScan, spec: &DatasetSpec) -> Result<Option<Plan>, StoreError> {
    if spec.max_key_share >= 1.0 {
        // No cap: the build's own size check is all it takes.
        return Ok(Some(Plan {
            cap: None,
            stop: None,
        }));
    }
    let all = key_cap(
        &lines_per_key(scan, spec, None, None)?.per_key,
        spec.max_key_share,
    );
    let Some(max) = spec.max_file_bytes else {
        return Ok(Some(Plan {
            cap: all,
            stop: None,
        }));
    };
    let prefix = lines_per_key(scan, spec, all, Some(max))?;
    let (Some(all), Some(_)) = (all, prefix.stop) else {
        // No cap (lines from one key alone), or no stop: the prefix is all there is.
        return Ok(Some(Plan {
            cap: all,
            stop: prefix.stop,
        }));
    };
    match key_cap(&prefix.per_key, spec.max_key_share) {
        Some(cap) if cap > 0 => Ok(Some(Plan {
            cap: Some(all.min(cap)),
            stop: prefix.stop,
        })),
        _ => searched_cap(scan, spec, all, max),
    }
}

/// The plan when no cap over the prefix the build capped at `most` writes keeps the share. A
/// smaller cap leaves room for other keys' lines, so the largest cap at most `most` under which
/// the build, stopping where its file fills, keeps every key within its share, found by
/// bisection: a walk of the snapshot a step, so about log2(`most`) walks, which only a store
/// whose one key's golden lines in a row fill a whole file (512 MB at OpenAI) pays. A cap found
/// keeps the share for certain, since each step checks what the build would write. `None` when
/// not even one line a key does: the file holds too few lines.
fn searched_cap(
    scan: &GradedScan,
    spec: &DatasetSpec,
    most: u64,
    max: u64,
) -> Result<Option<Plan>, StoreError> {
    // `lo` keeps the share (0 writes nothing, so it always does); `hi` does not.
    let (mut lo, mut hi) = (0u64, most);
    let mut stop = None;
    while hi - lo > 1 {
        let cap = lo + (hi - lo) / 2;
        let walk = lines_per_key(scan, spec, Some(cap), Some(max))?;
        let written = walk.per_key.values().map(|&n| n.min(cap));
        let (total, largest) = written.fold((0, 0), |(t, l), n| (t + n, l.max(n)));
        if largest as f64 <= spec.max_key_share * total as f64 {
            (lo, stop) = (cap, walk.stop);
        } else {
            hi = cap;
        }
    }
    Ok((lo > 0).then_some(Plan {
        cap: Some(lo),
        stop,
    }))
}

/// `spec`'s validation share in basis points.
fn validation_basis_points(spec: &DatasetSpec) -> u64 {
    (spec.validation_percent.clamp(0.0, 100.0) * 100.0) as u64
}

/// Whether the line whose SHA-256 is `hash` is held out for validation: decided by the hash,
/// so copies never straddle the split and a rebuild splits the same way.
fn is_validation(hash: &[u8; 32], validation_bp: u64) -> bool {
    let tail: [u8; 8] = hash[24..].try_into().unwrap_or_default();
    u64::from_le_bytes(tail) % 10_000 < validation_bp
}

/// The most lines one key may write: `None` for no cap (a share of 1, or lines from fewer than
/// two keys).
fn key_cap(per_key: &BTreeMap<Option<String>, u64>, share: f64) -> Option<u64> {
    (share < 1.0 && per_key.len() >= 2)
        .then(|| share_cap(per_key.values().copied().collect(), share))
}

/// How many lines a build of `spec` would write now: after the rules, duplicates and the key
/// cap. What a distillation trigger counts, so that a job it starts has those lines. A file
/// size limit is not counted: a build it stops holds hundreds of megabytes of lines, far more
/// than any threshold, and the rest are the next job's.
pub fn lines_ready(store: &Store, spec: &DatasetSpec) -> Result<u64, StoreError> {
    store.with_graded_snapshot(|scan| {
        let per_key = lines_per_key(scan, spec, None, None)?.per_key;
        let cap = key_cap(&per_key, spec.max_key_share);
        Ok(per_key.values().map(|&n| cap.map_or(n, |c| n.min(c))).sum())
    })
}

/// The largest cap `c` under which no key writes more than `share` of the lines written, with
/// key `k` writing `min(lines[k], c)`: the largest `c <= share * sum(min(lines[k], c))`. That
/// condition holds from 0 up to some `c` and never again (each step up adds `share` per key
/// still above `c`, and fewer keys are, while `c` grows by 1), so the scan stops at the first
/// `c` that fails it. 0 when no dataset can keep the share (it is below 1 / the number of keys).
fn share_cap(mut lines: Vec<u64>, share: f64) -> u64 {
    lines.sort_unstable();
    let mut below = 0u64; // lines of the keys with at most `c` lines
    let mut i = 0;
    let mut cap = 0u64;
    for c in 1..=lines.last().copied().unwrap_or(0) {
        while i < lines.len() && lines[i] < c {
            below += lines[i];
            i += 1;
        }
        let written = below + c * (lines.len() - i) as u64;
        if c as f64 > share * written as f64 {
            break;
        }
        cap = c;
    }
    cap
}

/// Builds the dataset `id` into `dir/id/`, calling `progress(traces_read)` now and then.
pub fn build(
    store: &Store,
    spec: &DatasetSpec,
    dir: &Path,
    id: &str,
    mut progress: impl FnMut(u64),
) -> Result<Manifest, DatasetError> {
    let out = dir.join(id);
    std::fs::create_dir_all(&out)?;
    let mut train = HashedFile::create(out.join("train.jsonl"))?;
    let mut validation = HashedFile::create(out.join("validation.jsonl"))?;
    let mut provenance = HashedFile::create(out.join("provenance.jsonl"))?;
    let mut seen = Seen::default();
    let mut per_key: BTreeMap<Option<String>, u64> = BTreeMap::new();
    let mut manifest = Manifest {
        id: id.to_string(),
        route: spec.route.clone(),
        tenant: spec.tenant.clone(),
        considered: 0,
        golden: 0,
        late: 0,
        duplicates: 0,
        capped: 0,
        skipped: BTreeMap::new(),
        train: FileDigest {
            path: PathBuf::new(),
            lines: 0,
            sha256: String::new(),
        },
        validation: FileDigest {
            path: PathBuf::new(),
            lines: 0,
            sha256: String::new(),
        },
        provenance: FileDigest {
            path: PathBuf::new(),
            lines: 0,
            sha256: String::new(),
        },
        // Where the next dataset starts, should this one read no new trace.
        cut: spec.after,
        feedback_mark: None,
        full: false,
        late_stop: None,
    };
    let validation_bp = validation_basis_points(spec);
    let mut read = 0u64;
    let mut failure = None;
    // Both walks in one snapshot: the cap is worked out from exactly the lines then written.
    let mut no_room = false;
    store.with_graded_snapshot(|scan| {
        let Some(Plan { cap, stop }) = plan(scan, spec)? else {
            no_room = true;
            return Ok(());
        };
        manifest.feedback_mark = Some(scan.feedback_mark()?);
        walk(scan, spec, |trace, fb, ev, late| {
            read += 1;
            if read.is_multiple_of(10_000) {
                progress(read);
            }
            // Whether the walk goes on; the cut moves past a trace only once it is dealt with.
            let go_on = 'trace: {
                if stop == Some(trace.id) {
                    stop_at(&mut manifest, late);
                    break 'trace false;
                }
                if !spec.selects(&trace) {
                    break 'trace true;
                }
                manifest.considered += 1;
                if !spec.policy.is_golden(&trace, fb.as_ref(), ev.as_ref()) {
                    break 'trace true;
                }
                manifest.golden += 1;
                manifest.late += u64::from(late.is_some());
                let (bytes, hash) = match candidate(&trace, spec, &mut seen) {
                    Candidate::Line { bytes, hash } => (bytes, hash),
                    Candidate::Skipped(reason) => {
                        *manifest.skipped.entry(reason).or_default() += 1;
                        break 'trace true;
                    }
                    Candidate::Duplicate => {
                        manifest.duplicates += 1;
                        break 'trace true;
                    }
                };
                let contributed = per_key.entry(trace.key_id.clone()).or_default();
                if cap.is_some_and(|c| *contributed >= c) {
                    manifest.capped += 1;
                    break 'trace true;
                }
                let (split, file) = if is_validation(&hash, validation_bp) {
                    ("validation", &mut validation)
                } else {
                    ("train", &mut train)
                };
                if file.would_pass(&bytes, spec.max_file_bytes) {
                    // Not read after all: the next dataset starts with it.
                    manifest.considered -= 1;
                    manifest.golden -= 1;
                    manifest.late -= u64::from(late.is_some());
                    stop_at(&mut manifest, late);
                    break 'trace false;
                }
                *contributed += 1;
                let written = file.write_line(&bytes).and_then(|n| {
                    let record = serde_json::json!({
                        "split": split, "line": n, "trace_id": trace.id, "key_id": trace.key_id,
                    });
                    provenance.write_line(record.to_string().as_bytes())
                });
                if let Err(e) = written {
                    failure = Some(e);
                    break 'trace false;
                }
                true
            };
            if go_on && late.is_none() {
                manifest.cut = Some(trace.id);
            }
            go_on
        })
    })?;
    if no_room {
        return Err(DatasetError::NoRoomForKeyShare {
            share: spec.max_key_share,
            max_bytes: spec.max_file_bytes.unwrap_or_default(),
        });
    }
    if let Some(e) = failure {
        return Err(e.into());
    }
    progress(read);
    manifest.train = train.finish()?;
    manifest.validation = validation.finish()?;
    manifest.provenance = provenance.finish()?;
    let file = File::create(out.join("manifest.json"))?;
    serde_json::to_writer_pretty(BufWriter::new(file), &manifest).map_err(std::io::Error::other)?;
    Ok(manifest)
}

/// Ends a build short of a file size limit, before a trace: a new one (`late` is `None`) is
/// where the next dataset's cut starts; a late one, with the late traces after it, is found
/// late again by the next dataset ([`Manifest::late_stop`]).
fn stop_at(manifest: &mut Manifest, late: Option<TraceId>) {
    manifest.full = true;
    manifest.late_stop = late;
}

/// Recomputes a file's SHA-256, to verify a manifest.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hash = Sha256::new();
    std::io::copy(&mut file, &mut hash)?;
    Ok(hex::encode(hash.finalize()))
}

#[cfg(test)]
mod tests;
