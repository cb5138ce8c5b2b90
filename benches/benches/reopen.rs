//! The reliability plan's R3 at scale: reopening a 1 GiB store after `kill -9` mid-write.
//!
//! `cargo bench -p forge-benches --bench reopen`. A child process commits batches of 2 KB traces
//! (2,048 per transaction, as the writer's largest) to a store until the traces it has committed
//! reach the size asked for, goes on writing, and is killed with SIGKILL at a random moment a
//! little later, so the kill lands anywhere in a commit. The store is then opened as the gateway opens it, and
//! the time taken is set against a full repair of a copy of the same file (redb's integrity check
//! on open), which is what an open would cost without the allocator state each commit saves.
//!
//! The file is in the OS page cache after the kill, as after any process crash. With
//! `FORGE_BENCH_DROP_CACHES=1` (root only) the bench also drops the page cache before each open,
//! as a reboot after a power cut would leave it; that empties the cache of the whole machine.
//! `FORGE_BENCH_REOPEN_MIB` sets the size (default 1024).
// A bench binary: a failed step should stop it with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use forge_benches::fixtures::{MAX_EVENT_BYTES, chat_request, completion_json, exchange_meta};
use forge_layer::redact::Redactor;
use forge_layer::store::{DEFAULT_CACHE_BYTES, STORE_FILE, Store};
use forge_layer::trace::TraceId;

/// Traces per transaction: the writer's default `batch_max`.
const BATCH: usize = 2048;
/// How long the child may take to grow the file before the bench calls it stuck.
const FILL_DEADLINE: Duration = Duration::from_secs(600);

/// The child: commits batches of traces to the store in `dir` until killed, and after each
/// commit prints how many bytes of traces, and how many traces, it has committed in all.
fn write_forever(dir: &Path) -> ! {
    let store = Store::open_dir(dir).unwrap();
    let mut trace = forge_benches::fixtures::pending_trace(
        &exchange_meta(false),
        &chat_request(false),
        false,
        &[completion_json(2048)],
    )
    .into_trace(&Redactor::default(), MAX_EVENT_BYTES);
    let (mut committed, mut traces) = (0, 0);
    let mut out = std::io::stdout();
    loop {
        let batch: Vec<(TraceId, Vec<u8>)> = (0..BATCH)
            .map(|_| {
                trace.id = TraceId::generate();
                (trace.id, serde_json::to_vec(&trace).unwrap())
            })
            .collect();
        store
            .insert_encoded(batch.iter().map(|(id, b)| (*id, b.as_slice())))
            .unwrap();
        committed += batch.iter().map(|(_, b)| b.len()).sum::<usize>();
        traces += batch.len();
        writeln!(out, "{committed} {traces}").unwrap();
    }
}

/// Writes dirty pages out, so that an open does not compete with the kernel writing back the
/// files just made; then empties the OS page cache, if asked to and allowed. Returns whether it
/// was emptied.
fn settle_caches(drop: bool) -> bool {
    let synced = Command::new("sync").status().is_ok_and(|s| s.success());
    assert!(synced, "sync failed");
    drop && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn copy_through_page_cache(from: &Path, to: &Path) {
    use std::io::Read;
    let mut from = std::fs::File::open(from).unwrap();
    let mut to = std::fs::File::create(to).unwrap();
    let mut buffer = vec![0; 1 << 20];
    loop {
        let n = from.read(&mut buffer).unwrap();
        if n == 0 {
            break;
        }
        to.write_all(&buffer[..n]).unwrap();
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("write") {
        write_forever(Path::new(&args[2]));
    }
    // `cargo test --benches` runs this without `--bench`: a small smoke run.
    let measuring = args.iter().any(|a| a == "--bench");
    let target_mib: u64 = match std::env::var("FORGE_BENCH_REOPEN_MIB") {
        Ok(v) => v
            .trim()
            .parse()
            .expect("FORGE_BENCH_REOPEN_MIB: a number of MiB"),
        Err(_) if measuring => 1024,
        Err(_) => 16,
    };
    let cold = std::env::var("FORGE_BENCH_DROP_CACHES").is_ok_and(|v| v == "1");

    // Under the target directory, not $TMPDIR: a tmpfs there would make syncs free and
    // dropping the page cache a no-op.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = dir.path().join("data");
    let file = data.join(STORE_FILE);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["write", data.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut progress =
        BufReader::new(child.stdout.take().unwrap())
            .lines()
            .map(|line| -> (u64, u64) {
                let line = line.unwrap();
                let (bytes, traces) = line.split_once(' ').unwrap();
                (bytes.parse().unwrap(), traces.parse().unwrap())
            });
    let reached = loop {
        let (bytes, traces) = progress.next().expect("the writing process ended");
        if bytes >= target_mib << 20 {
            break traces;
        }
        assert!(
            started.elapsed() < FILL_DEADLINE,
            "the store did not reach {target_mib} MiB of traces"
        );
    };
    // The pipe must not fill and stall the writer before the kill; the last line is the number
    // of traces whose commit had returned.
    let drain = std::thread::spawn(move || progress.last().map_or(reached, |(_, traces)| traces));
    // Anywhere in the next commit or two: a batch takes some tens of milliseconds.
    std::thread::sleep(Duration::from_millis(rand::random_range(0..200)));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let acknowledged = drain.join().unwrap();
    let bytes = std::fs::metadata(&file).unwrap().len();
    eprintln!(
        "wrote {target_mib} MiB of traces in {:.1} s, killed",
        started.elapsed().as_secs_f64()
    );

    // The same file as the kill left it, for the full repair. Copied through the page cache, as
    // the original was written: `fs::copy` may share the blocks instead (reflinks), and the
    // copy would then start cold.
    let copy = dir.path().join("copy.redb");
    copy_through_page_cache(&file, &copy);

    let dropped = settle_caches(cold);
    let opening = Instant::now();
    let store = Store::open_dir(&data).expect("the store reopens after kill -9");
    let quick = opening.elapsed();
    assert_eq!(
        store.full_repairs(),
        0,
        "the reopen repaired the whole file: quick repair did not hold"
    );
    let traces = store.trace_count().unwrap();
    assert!(
        traces >= acknowledged,
        "{acknowledged} traces were committed, {traces} reopened"
    );
    drop(store);

    settle_caches(cold);
    let opening = Instant::now();
    let repaired = redb::Database::builder()
        .set_cache_size(DEFAULT_CACHE_BYTES)
        .set_check_integrity_on_open(true)
        .create(&copy)
        .expect("the full repair succeeds");
    let full = opening.elapsed();
    drop(repaired);

    let cache = if dropped {
        "dropped before each open"
    } else {
        "warm (as after a process crash)"
    };
    println!(
        "| store file | traces of 2.4 KB: committed / reopened | page cache | reopen after kill -9 | full repair of the same file |"
    );
    println!("|--:|--:|---|--:|--:|");
    println!(
        "| {:.0} MiB | {acknowledged} / {traces} | {cache} | {:.3} s | {:.3} s |",
        mib(bytes),
        quick.as_secs_f64(),
        full.as_secs_f64()
    );
    println!(
        "\nCommand: cargo bench -p forge-benches --bench reopen (target: reopen <= 5 s on 1 GiB with quick repair; FORGE_BENCH_REOPEN_MIB={target_mib}{})",
        if cold {
            ", FORGE_BENCH_DROP_CACHES=1"
        } else {
            ""
        }
    );
}
