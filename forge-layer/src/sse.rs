//! A server-sent-events parser that yields the same events however the bytes are split.
//!
//! It follows the WHATWG event-stream rules that matter for chat streams: lines end in LF, CRLF or
//! CR (a CRLF split across two chunks is still one line end), `data:` lines of one event are
//! joined with `\n`, a blank line dispatches the event, comments and other fields are ignored,
//! and an event left incomplete at the end of the stream is dropped. Bytes are buffered until a
//! line is complete, so a UTF-8 character cut between chunks is decoded whole.

/// Whether `bytes` end with a chat stream's last event, `data: [DONE]` (its blank line and the
/// space after the colon optional), on a line of its own: `data: say [DONE]` is not it.
pub fn ends_with_done(bytes: &[u8]) -> bool {
    let end = bytes
        .iter()
        .rposition(|b| !matches!(b, b'\r' | b'\n'))
        .map_or(0, |i| i + 1);
    let Some(line) = bytes[..end].strip_suffix(b"[DONE]") else {
        return false;
    };
    let field = line
        .strip_suffix(b" ")
        .unwrap_or(line)
        .strip_suffix(b"data:");
    field.is_some_and(|before| {
        before.is_empty() || before.ends_with(b"\n") || before.ends_with(b"\r")
    })
}

/// The last few bytes of a stream, enough to tell whether it ends with `data: [DONE]` however
/// its chunks were cut: a chunk alone can hold the last half of `[DONE]`, or `data: [DONE]`
/// that is the middle of a JSON string cut where an event would begin.
#[derive(Debug, Default)]
pub struct DoneTail {
    bytes: Vec<u8>,
}

impl DoneTail {
    /// Enough for `data: [DONE]`, its line ends and the line end before it.
    const KEEP: usize = 24;

    /// Adds the stream's next chunk.
    pub fn push(&mut self, chunk: &[u8]) {
        let from = chunk.len().saturating_sub(Self::KEEP);
        self.bytes.extend_from_slice(&chunk[from..]);
        let excess = self.bytes.len().saturating_sub(Self::KEEP);
        self.bytes.drain(..excess);
    }

    /// Whether the stream so far ends with the `data: [DONE]` event (its blank line aside).
    pub fn is_done(&self) -> bool {
        ends_with_done(&self.bytes)
    }
}

/// UTF-8's byte order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Incremental SSE parser. Feed it chunks; it calls back once per complete event.
#[derive(Debug)]
pub struct SseParser {
    line: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    /// The previous chunk ended in CR, so a leading LF in the next one is its other half.
    after_cr: bool,
    max_event_bytes: usize,
    /// The current line passed the cap: it is dropped, and so is the event it belongs to.
    line_dropped: bool,
    event_dropped: bool,
    overflowed: bool,
    /// No line has ended yet: the first may begin with a byte order mark, which the rules say
    /// to skip.
    first_line: bool,
}

impl SseParser {
    /// A parser that holds at most `max_event_bytes` of one pending event; anything larger is
    /// skipped and reported by [`SseParser::overflowed`].
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            line: Vec::new(),
            data: Vec::new(),
            has_data: false,
            after_cr: false,
            max_event_bytes,
            line_dropped: false,
            event_dropped: false,
            overflowed: false,
            first_line: true,
        }
    }

    /// Whether an event was too large to keep.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Parses one more chunk, calling `on_event` with each event's data.
    pub fn feed(&mut self, mut bytes: &[u8], on_event: &mut impl FnMut(&str)) {
        if bytes.is_empty() {
            // An empty chunk says nothing, not even that a CR just before it ended its line
            // alone: an LF in the next chunk is still that CR's other half.
            return;
        }
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = bytes.strip_prefix(b"\n") {
                bytes = rest;
            }
        }
        while let Some(end) = memchr::memchr2(b'\n', b'\r', bytes) {
            self.push_line_bytes(&bytes[..end]);
            self.end_line(on_event);
            let was_cr = bytes[end] == b'\r';
            bytes = &bytes[end + 1..];
            if was_cr {
                match bytes.first() {
                    Some(b'\n') => bytes = &bytes[1..],
                    None => self.after_cr = true,
                    Some(_) => {}
                }
            }
        }
        self.push_line_bytes(bytes);
    }

    fn push_line_bytes(&mut self, bytes: &[u8]) {
        if self.line_dropped {
            return;
        }
        if self.line.len() + self.data.len() + bytes.len() > self.max_event_bytes {
            // Half an event is worse than none: its JSON would not parse. Drop it whole.
            self.overflowed = true;
            self.line_dropped = true;
            self.event_dropped = true;
            self.line.clear();
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    fn end_line(&mut self, on_event: &mut impl FnMut(&str)) {
        if std::mem::take(&mut self.line_dropped) {
            return;
        }
        if self.line.is_empty() {
            if self.has_data && !self.event_dropped {
                // The strict check first: it is much faster than the lossy one, and streams are
                // almost always valid UTF-8.
                match std::str::from_utf8(&self.data) {
                    Ok(text) => on_event(text),
                    Err(_) => on_event(&String::from_utf8_lossy(&self.data)),
                }
            }
            self.data.clear();
            self.has_data = false;
            self.event_dropped = false;
            return;
        }
        let mut line = std::mem::take(&mut self.line);
        if std::mem::take(&mut self.first_line) && line.starts_with(BOM) {
            line.drain(..BOM.len());
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(0) => (&line[..0], &line[..0]), // a comment
            Some(i) => {
                let value = &line[i + 1..];
                (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (&line[..], &line[..0]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
        // Reuse the allocation for the next line.
        self.line = line;
        self.line.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in(chunks: &[&[u8]]) -> Vec<String> {
        let mut parser = SseParser::new(1 << 20);
        let mut events = Vec::new();
        for chunk in chunks {
            parser.feed(chunk, &mut |e| events.push(e.to_string()));
        }
        events
    }

    #[test]
    fn line_endings_comments_and_multiline_data() {
        let stream = b": keep-alive\r\ndata: a\r\n\r\ndata:b\rdata: c\r\revent: x\nid: 1\ndata: {\"k\":1}\n\ndata: lost";
        assert_eq!(parse_in(&[stream]), vec!["a", "b\nc", "{\"k\":1}"]);
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        // Two of the events span two `data:` lines, one after a CRLF, one after a CR.
        let stream = "data: {\"c\":\"héllo ✓ 😀\"}\r\n\r\ndata: x\r\rdata: a\r\ndata: b\r\n\r\ndata: c\rdata: d\r\rdata: [DONE]\n\n".as_bytes();
        let whole = parse_in(&[stream]);
        assert_eq!(
            whole,
            ["{\"c\":\"héllo ✓ 😀\"}", "x", "a\nb", "c\nd", "[DONE]"]
        );
        for i in 0..=stream.len() {
            for j in i..=stream.len() {
                assert_eq!(
                    parse_in(&[&stream[..i], &stream[i..j], &stream[j..]]),
                    whole,
                    "split at {i},{j}"
                );
            }
        }
    }

    #[test]
    fn a_byte_order_mark_at_the_start_is_skipped_however_it_is_split() {
        let stream = b"\xEF\xBB\xBFdata: {\"first\":1}\n\ndata: b\n\n";
        for i in 0..=stream.len() {
            assert_eq!(
                parse_in(&[&stream[..i], &stream[i..]]),
                ["{\"first\":1}", "b"],
                "split at {i}"
            );
        }
        // Only at the start: elsewhere it is data.
        assert_eq!(parse_in(&[b"data: a\n\n\xEF\xBB\xBFdata: b\n\n"]), ["a"]);
    }

    #[test]
    fn oversized_event_is_capped_and_reported() {
        let mut parser = SseParser::new(16);
        let mut events = Vec::new();
        parser.feed(
            b"data: a\ndata: 0123456789abcdefghij\n\ndata: ok\n\n",
            &mut |e| events.push(e.to_string()),
        );
        assert!(parser.overflowed());
        // The oversized event is dropped whole, not dispatched as its first line.
        assert_eq!(events, vec!["ok"]);
    }
}
