//! Power loss at any point of a write: the store reopens to a state its acknowledgements promised.
//!
//! The store runs on a simulated disk (a redb storage backend). Until a sync, a write is only in
//! the disk's cache; at the power cut, any subset of the unsynced 512-byte sectors may have
//! reached the platter, and every later call fails. For each of many seeds a workload of trace
//! batches (as the writer commits them) and feedback runs until the power is cut at a random
//! write or sync, the disk is rebuilt from what a crash could leave (half the time after a
//! second cut during recovery), and the store is reopened on it.
//! It must open, hold every acknowledged trace and feedback byte for byte, hold the batch that
//! was being committed wholly or not at all, hold nothing else, and take new writes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use forge_layer::reassemble::FinalResponse;
use forge_layer::store::{Feedback, Store};
use forge_layer::trace::{Outcome, Trace, TraceId};
use forge_router::Arm;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redb::StorageBackend;

/// The plan asks for 1,000 power cuts.
const SEEDS: u64 = 1_000;
/// Steps of one workload: each a batch of traces or one feedback.
const STEPS: usize = 10;
const SECTOR: usize = 512;
const CACHE_BYTES: usize = 4 << 20;

/// One change to the disk not yet synced.
#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

impl Op {
    fn apply(&self, image: &mut Vec<u8>) {
        match self {
            Op::Write { offset, data } => {
                let start = usize::try_from(*offset).unwrap();
                if image.len() < start + data.len() {
                    image.resize(start + data.len(), 0);
                }
                image[start..start + data.len()].copy_from_slice(data);
            }
            Op::SetLen(len) => image.resize(usize::try_from(*len).unwrap(), 0),
        }
    }
}

#[derive(Debug)]
struct Disk {
    /// What reads see: every change so far.
    current: Vec<u8>,
    /// What a power cut cannot take away: the state at the last sync.
    synced: Vec<u8>,
    /// Changes since the last sync, in order.
    unsynced: Vec<Op>,
    /// Changes (writes, length changes, syncs) still allowed before the power fails.
    changes_left: u64,
    /// Changes made: to size the next run's power cut.
    changes: u64,
    /// The numbers of the changes that were syncs (the first change is 1).
    syncs: Vec<u64>,
    powered: bool,
}

/// A simulated disk with a volatile cache; clones share it.
#[derive(Debug, Clone)]
struct CrashDisk(Arc<Mutex<Disk>>);

impl CrashDisk {
    fn new(image: Vec<u8>, changes_left: u64) -> Self {
        Self(Arc::new(Mutex::new(Disk {
            current: image.clone(),
            synced: image,
            unsynced: Vec::new(),
            changes_left,
            changes: 0,
            syncs: Vec::new(),
            powered: true,
        })))
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one change; fails once the power is out.
    fn change(disk: &mut Disk) -> Result<(), std::io::Error> {
        if disk.changes_left == 0 {
            disk.powered = false;
        }
        if !disk.powered {
            return Err(std::io::Error::other("power lost"));
        }
        disk.changes_left -= 1;
        disk.changes += 1;
        Ok(())
    }

    /// What the platter holds after the power cut: the synced state, plus any subset of the
    /// unsynced sectors (each change's sectors kept or lost one by one, in order).
    fn after_power_cut(&self, rng: &mut StdRng) -> Vec<u8> {
        let disk = self.disk();
        let mut image = disk.synced.clone();
        for op in &disk.unsynced {
            match op {
                Op::SetLen(_) => {
                    if rng.random_bool(0.5) {
                        op.apply(&mut image);
                    }
                }
                Op::Write { offset, data } => {
                    // Piece by piece along the disk's own sector boundaries.
                    let mut done = 0;
                    while done < data.len() {
                        let at = offset + done as u64;
                        let room = SECTOR - usize::try_from(at % SECTOR as u64).unwrap();
                        let piece = &data[done..data.len().min(done + room)];
                        if rng.random_bool(0.5) {
                            Op::Write {
                                offset: at,
                                data: piece.to_vec(),
                            }
                            .apply(&mut image);
                        }
                        done += piece.len();
                    }
                }
            }
        }
        image
    }
}

impl StorageBackend for CrashDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        let disk = self.disk();
        if !disk.powered {
            return Err(std::io::Error::other("power lost"));
        }
        Ok(disk.current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let disk = self.disk();
        if !disk.powered {
            return Err(std::io::Error::other("power lost"));
        }
        let start = usize::try_from(offset).unwrap();
        let bytes = disk
            .current
            .get(start..start + out.len())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut disk = self.disk();
        Self::change(&mut disk)?;
        let op = Op::SetLen(len);
        op.apply(&mut disk.current);
        disk.unsynced.push(op);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut disk = self.disk();
        Self::change(&mut disk)?;
        let n = disk.changes;
        disk.syncs.push(n);
        let Disk {
            synced, unsynced, ..
        } = &mut *disk;
        for op in unsynced.drain(..) {
            op.apply(synced);
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut disk = self.disk();
        Self::change(&mut disk)?;
        let op = Op::Write {
            offset,
            data: data.to_vec(),
        };
        op.apply(&mut disk.current);
        disk.unsynced.push(op);
        Ok(())
    }
}

fn trace(id: u128, rng: &mut StdRng) -> Trace {
    // Sizes from a few hundred bytes to several pages, so batches span leaves and branches.
    let words = rng.random_range(1..600);
    Trace {
        id: TraceId::from_u128(id),
        time_ms: 1_700_000_000_000,
        tenant: rng.random_bool(0.5).then(|| "acme".to_string()),
        key_id: None,
        alias: "gpt-4o".into(),
        upstream: "openai".into(),
        model: "gpt-4o".into(),
        arm: Arm::Teacher,
        route_version: 1,
        stream: rng.random_bool(0.5),
        request: serde_json::json!({"messages": [{"role": "user", "content": format!("question {id}")}]}),
        response: FinalResponse {
            model: Some(format!("answer {id}: {}", "word ".repeat(words))),
            complete: true,
            ..FinalResponse::default()
        },
        status: 200,
        latency_us: rng.random_range(1..1_000_000),
        ttfb_us: 1,
        outcome: Outcome::Completed,
    }
}

/// What the store acknowledged, and what it was writing when the power went.
#[derive(Debug, Default)]
struct Model {
    traces: BTreeMap<u128, Trace>,
    feedback: Vec<Feedback>,
    in_doubt_traces: Vec<Trace>,
    in_doubt_feedback: Option<Feedback>,
    /// Disk changes made by the time the store was open.
    created_after: u64,
}

/// Runs the seed's workload on `disk` until it ends or a write fails.
fn workload(seed: u64, disk: &CrashDisk) -> Model {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = Model::default();
    // The file as the store makes it: whole before it takes its name (`store/open.rs`), so a
    // cut can only come later.
    drop(
        redb::Database::builder()
            .create_with_backend(disk.clone())
            .expect("create"),
    );
    model.created_after = disk.disk().changes;
    let Ok(store) = Store::open_backend(Path::new("crash-disk"), disk.clone(), CACHE_BYTES) else {
        return model;
    };
    let mut next_id = TraceId::earliest_at(1_700_000_000_000).as_u128();
    for _ in 0..STEPS {
        if model.traces.is_empty() || rng.random_bool(0.75) {
            let batch: Vec<Trace> = (0..rng.random_range(1..=8))
                .map(|_| {
                    next_id += 1;
                    trace(next_id, &mut rng)
                })
                .collect();
            let encoded: Vec<Vec<u8>> = batch
                .iter()
                .map(|t| serde_json::to_vec(t).unwrap())
                .collect();
            let insert = batch
                .iter()
                .zip(&encoded)
                .map(|(t, bytes)| (t.id, bytes.as_slice()));
            match store.insert_encoded(insert) {
                Ok(()) => model
                    .traces
                    .extend(batch.into_iter().map(|t| (t.id.as_u128(), t))),
                Err(e) => {
                    assert!(e.is_transient(), "seed {seed}: not an I/O error: {e}");
                    model.in_doubt_traces = batch;
                    return model;
                }
            }
        } else {
            let ids: Vec<u128> = model.traces.keys().copied().collect();
            let feedback = Feedback {
                trace_id: TraceId::from_u128(ids[rng.random_range(0..ids.len())]),
                score: Some(f64::from(rng.random_range(0..=100u8))),
                approved: None,
                comment: Some(format!("seed {seed}")),
                time_ms: 1_700_000_000_000 + model.feedback.len() as u64,
            };
            match store.add_feedback(&feedback) {
                Ok(_first_score) => model.feedback.push(feedback),
                Err(e) => {
                    assert!(e.is_transient(), "seed {seed}: not an I/O error: {e}");
                    model.in_doubt_feedback = Some(feedback);
                    return model;
                }
            }
        }
    }
    model
}

/// The store reopened on what the power cut left must be what `model` allows. Returns whether
/// the batch being committed at the cut survived (whole).
fn check(seed: u64, store: &Store, model: &Model) -> Result<bool, String> {
    let mut stored = BTreeMap::new();
    store
        .for_each_trace(|t| {
            stored.insert(t.id.as_u128(), t);
            true
        })
        .map_err(|e| format!("scan: {e}"))?;
    for (id, trace) in &model.traces {
        match stored.remove(id) {
            Some(found) if &found == trace => {}
            Some(_) => return Err(format!("acknowledged trace {id} changed")),
            None => return Err(format!("acknowledged trace {id} lost")),
        }
    }
    // Left over: the batch being committed, whole, or nothing.
    let survived = !stored.is_empty();
    if survived {
        let in_doubt: BTreeMap<u128, Trace> = model
            .in_doubt_traces
            .iter()
            .map(|t| (t.id.as_u128(), t.clone()))
            .collect();
        if stored != in_doubt {
            return Err(format!(
                "seed {seed}: {} traces neither acknowledged nor a whole unacknowledged batch (of {})",
                stored.len(),
                in_doubt.len()
            ));
        }
    }
    let mut by_trace: BTreeMap<u128, Vec<Feedback>> = BTreeMap::new();
    for f in &model.feedback {
        by_trace
            .entry(f.trace_id.as_u128())
            .or_default()
            .push(f.clone());
    }
    for &id in model.traces.keys() {
        let acknowledged = by_trace.remove(&id).unwrap_or_default();
        let mut found = store
            .feedback(TraceId::from_u128(id))
            .map_err(|e| format!("feedback: {e}"))?;
        if let Some(extra) = &model.in_doubt_feedback
            && extra.trace_id.as_u128() == id
        {
            found.retain(|f| f != extra);
        }
        if found != acknowledged {
            return Err(format!(
                "feedback on {id}: {} stored, {} acknowledged",
                found.len(),
                acknowledged.len()
            ));
        }
    }
    Ok(survived)
}

/// Where the seed's workload can be cut: how many disk changes it makes when nothing fails,
/// and which of them are syncs.
struct Run {
    /// Changes made by the time the file exists.
    created: u64,
    total: u64,
    syncs: Vec<u64>,
}

impl Run {
    fn without_a_cut(seed: u64) -> Self {
        let disk = CrashDisk::new(Vec::new(), u64::MAX);
        let model = workload(seed, &disk);
        assert!(model.in_doubt_traces.is_empty() && model.in_doubt_feedback.is_none());
        let disk = disk.disk();
        Run {
            created: model.created_after,
            total: disk.changes,
            syncs: disk.syncs.clone(),
        }
    }

    /// How many changes to allow before the power goes: anywhere from the store's first commit
    /// (its tables) to the workload's last sync, or, half the time, exactly at a sync, where a
    /// commit is decided (the batch then survives whole or not at all).
    fn cut_at(&self, rng: &mut StdRng) -> u64 {
        let syncs: Vec<u64> = self
            .syncs
            .iter()
            .copied()
            .filter(|&n| n > self.created)
            .collect();
        if !syncs.is_empty() && rng.random_bool(0.5) {
            syncs[rng.random_range(0..syncs.len())] - 1
        } else {
            rng.random_range(self.created..self.total)
        }
    }
}

#[test]
fn every_power_cut_reopens_to_what_was_acknowledged() {
    let mut cut_mid_commit = 0;
    let mut survived_whole = 0;
    for seed in 0..SEEDS {
        let run = Run::without_a_cut(seed);
        let total = run.total;
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        let cut_at = run.cut_at(&mut rng);
        let disk = CrashDisk::new(Vec::new(), cut_at);
        let model = workload(seed, &disk);
        if !model.in_doubt_traces.is_empty() || model.in_doubt_feedback.is_some() {
            cut_mid_commit += 1;
        }
        let mut image = disk.after_power_cut(&mut rng);
        // Half the time the power goes again while the store recovers.
        if rng.random_bool(0.5) {
            let recovering = CrashDisk::new(image, rng.random_range(0..64));
            drop(Store::open_backend(
                Path::new("crash-disk"),
                recovering.clone(),
                CACHE_BYTES,
            ));
            image = recovering.after_power_cut(&mut rng);
        }
        let reopened = CrashDisk::new(image, u64::MAX);
        let store = Store::open_backend(Path::new("crash-disk"), reopened, CACHE_BYTES)
            .unwrap_or_else(|e| {
                panic!("seed {seed} (power cut at change {cut_at} of {total}): reopen: {e}")
            });
        match check(seed, &store, &model) {
            Ok(true) => survived_whole += 1,
            Ok(false) => {}
            Err(e) => panic!("seed {seed} (power cut at change {cut_at} of {total}): {e}"),
        }
        // Every commit saved the allocator state, so no reopen had to walk the whole file: on a
        // large store that walk is what makes a restart slow.
        assert_eq!(
            store.full_repairs(),
            0,
            "seed {seed} (power cut at change {cut_at} of {total}): the reopen repaired in full"
        );
        // And it takes new writes, which read back.
        let fresh = trace(u128::MAX - 1, &mut rng);
        let bytes = serde_json::to_vec(&fresh).unwrap();
        store
            .insert_encoded([(fresh.id, bytes.as_slice())])
            .unwrap_or_else(|e| panic!("seed {seed}: write after reopen: {e}"));
        assert_eq!(store.trace(fresh.id).unwrap().as_ref(), Some(&fresh));
    }
    // Most cuts fall inside a commit (the workload is mostly commits); make sure the test did
    // exercise them, not just cuts between workloads.
    println!(
        "{cut_mid_commit} of {SEEDS} cuts interrupted a commit; {survived_whole} of those batches survived whole"
    );
    assert!(
        cut_mid_commit > SEEDS / 2,
        "only {cut_mid_commit} of {SEEDS} cuts interrupted a write"
    );
    // Both outcomes of an interrupted commit were seen.
    assert!(survived_whole > 0 && survived_whole < cut_mid_commit);
}

#[test]
fn a_file_last_written_without_quick_repair_is_repaired_in_full_and_counted() {
    let mut rng = StdRng::seed_from_u64(7);
    let disk = CrashDisk::new(Vec::new(), u64::MAX);
    let kept = trace(1, &mut rng);
    let store = Store::open_backend(Path::new("crash-disk"), disk.clone(), CACHE_BYTES).unwrap();
    let bytes = serde_json::to_vec(&kept).unwrap();
    store.insert_encoded([(kept.id, bytes.as_slice())]).unwrap();
    assert_eq!(store.full_repairs(), 0);
    drop(store);
    // Another program commits to the file without saving the allocator state, and the power
    // goes before it closes the file.
    let other = redb::Database::builder()
        .create_with_backend(disk.clone())
        .unwrap();
    let mut txn = other.begin_write().unwrap();
    txn.set_quick_repair(false);
    txn.open_table(redb::TableDefinition::<u64, u64>::new("other"))
        .unwrap()
        .insert(1, 2)
        .unwrap();
    txn.commit().unwrap();
    let image = disk.after_power_cut(&mut rng);
    drop(other);

    let store = Store::open_backend(
        Path::new("crash-disk"),
        CrashDisk::new(image, u64::MAX),
        CACHE_BYTES,
    )
    .unwrap();
    assert_eq!(store.full_repairs(), 1);
    assert_eq!(store.trace(kept.id).unwrap().as_ref(), Some(&kept));
}

#[test]
fn the_simulated_disk_loses_only_what_was_not_synced() {
    let disk = CrashDisk::new(Vec::new(), u64::MAX);
    disk.write(0, &[1; 2 * SECTOR]).unwrap();
    disk.sync_data().unwrap();
    disk.write(0, &[2; 2 * SECTOR]).unwrap();
    disk.set_len(4 * SECTOR as u64).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..64 {
        let image = disk.after_power_cut(&mut StdRng::seed_from_u64(seed));
        assert!(image.len() == 2 * SECTOR || image.len() == 4 * SECTOR);
        // Each sector is old or new, never a mix within it.
        let sectors: Vec<u8> = image[..2 * SECTOR]
            .chunks(SECTOR)
            .map(|s| {
                assert!(s.iter().all(|&b| b == s[0]));
                s[0]
            })
            .collect();
        seen.insert(sectors);
    }
    // Every combination of the two sectors turns up.
    assert_eq!(seen.len(), 4);
    // Reads see the unsynced state; after the power goes, nothing works.
    let mut out = [0; 4];
    disk.read(0, &mut out).unwrap();
    assert_eq!(out, [2; 4]);
    let cut = CrashDisk::new(Vec::new(), 1);
    cut.write(0, &[1]).unwrap();
    assert!(cut.write(1, &[1]).is_err());
    assert!(cut.read(0, &mut [0; 1]).is_err());
}
