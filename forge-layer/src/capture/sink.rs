//! What receives finished exchanges: the store's writer, or anything else that implements it.

use std::future::Future;
use std::pin::Pin;

use super::PendingTrace;
use crate::store::Ticket;

/// The future a `durable` response end waits on: true once the trace is committed.
pub type DurableAck = Pin<Box<dyn Future<Output = bool> + Send>>;

/// Receives each finished exchange exactly once. Must not block.
pub trait TraceSink: Clone + Send + Sync + 'static {
    /// Takes the trace. Returning a future makes the response's end wait for it (durable
    /// capture); `None` lets the response end at once.
    fn submit(&self, trace: PendingTrace) -> Option<DurableAck>;

    /// The id for an exchange that is starting. A sink that stores traces tracks it until the
    /// trace is settled, so that scans with a cursor never pass it; the default just makes one.
    fn ticket(&self) -> Ticket {
        Ticket::untracked()
    }
}

impl TraceSink for crate::store::TraceWriter {
    fn submit(&self, trace: PendingTrace) -> Option<DurableAck> {
        crate::store::TraceWriter::submit(self, trace)
    }

    fn ticket(&self) -> Ticket {
        crate::store::TraceWriter::ticket(self)
    }
}
