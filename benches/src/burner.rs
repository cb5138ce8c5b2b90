//! Background work with no capture in it: a thread in the idle scheduling class that spins.
//!
//! `async` capture does its work on idle-class threads, which the kernel runs only while no
//! request wants the core. The load bench can switch this thread on while a twin of capture off
//! is measured, so that what such work costs requests shows with no capture at all.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use forge_layer::store::lower_to_idle_class;

/// How often the thread repeats its share of spinning, unless told.
pub const DEFAULT_PERIOD: Duration = Duration::from_millis(10);

/// The spinning thread; it ends when this is dropped.
#[derive(Debug)]
pub struct Burner {
    state: Arc<State>,
    /// Parked while off, so that it does not wake while the other targets are loaded.
    thread: std::thread::Thread,
}

#[derive(Debug, Default)]
struct State {
    on: AtomicBool,
    stopped: AtomicBool,
}

impl Burner {
    /// Starts the thread, switched off. While on, it spins for `percent` of each `period` and
    /// sleeps for the rest: the same share in shorter or longer bursts. Fails if the thread
    /// cannot be put in the idle class (on Linux; on other systems, the lowest priority an
    /// ordinary thread may have).
    pub fn start(percent: u8, period: Duration) -> Result<Self, String> {
        if !(1..=100).contains(&percent) {
            return Err(format!("{percent}%: a share of 1 to 100"));
        }
        if period.is_zero() {
            return Err("a period of 0".to_string());
        }
        let spin = period * u32::from(percent) / 100;
        let state = Arc::new(State::default());
        let theirs = Arc::clone(&state);
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("bench-burner".into())
            .spawn(move || {
                let lowered = lower_to_idle_class();
                let ok = lowered.is_ok();
                let _ = ready_tx.send(lowered);
                if ok {
                    burn(&theirs, spin, period);
                }
            })
            .map_err(|e| e.to_string())?
            .thread()
            .clone();
        match ready.recv() {
            Ok(Ok(())) => Ok(Self { state, thread }),
            Ok(Err(e)) => Err(format!("could not enter the idle scheduling class: {e}")),
            Err(_) => Err("the thread ended before it started".to_string()),
        }
    }

    /// Switches the spinning on or off.
    pub fn set(&self, on: bool) {
        self.state.on.store(on, Ordering::Release);
        self.thread.unpark();
    }
}

impl Drop for Burner {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

fn burn(state: &State, spin: Duration, period: Duration) {
    let mut x = 0u64;
    while !state.stopped.load(Ordering::Acquire) {
        if !state.on.load(Ordering::Acquire) {
            // Woken by `set` or the drop (or spuriously: the loop checks again).
            std::thread::park();
            continue;
        }
        let start = Instant::now();
        while start.elapsed() < spin {
            for i in 0..1000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        std::thread::sleep(period - spin);
    }
}
