//! An incremental decoder of an upstream's `text/event-stream`, as the WHATWG HTML standard
//! (§9.2.6) reads one: lines end in CRLF, LF or CR; a blank line ends an event; the `data` fields
//! of an event are joined with `\n` (one leading space after the colon is dropped); comments and
//! other fields are ignored, because the relay needs only the data. An event cut off by the end of
//! the stream is not dispatched.
//!
//! Bytes arrive in whatever pieces the network gives; the decoder's output does not depend on
//! where they were cut (a property test checks it), a CR at the end of a piece waits for the next
//! byte to learn whether an LF follows, and a line longer than [`MAX_LINE`] is an error rather than
//! unbounded memory.

/// The longest line (and so the longest event payload) accepted from an upstream.
pub const MAX_LINE: usize = 16 * 1024 * 1024;

#[derive(Debug, Default)]
pub struct SseDecoder {
    /// The current line, not yet ended.
    line: Vec<u8>,
    /// The previous byte was a CR: an LF now is part of the same line ending.
    after_cr: bool,
    /// The data of the event being read, and whether it has any `data` field yet.
    data: Vec<u8>,
    has_data: bool,
}

/// An upstream line over [`MAX_LINE`] bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineTooLong;

impl SseDecoder {
    /// Feeds the next bytes; pushes the data of every event they complete onto `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<String>) -> Result<(), LineTooLong> {
        let mut rest = bytes;
        while !rest.is_empty() {
            if self.after_cr {
                self.after_cr = false;
                if rest[0] == b'\n' {
                    rest = &rest[1..];
                    continue;
                }
            }
            match rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
                Some(i) => {
                    self.extend_line(&rest[..i])?;
                    self.after_cr = rest[i] == b'\r';
                    rest = &rest[i + 1..];
                    self.end_line(out);
                }
                None => {
                    self.extend_line(rest)?;
                    rest = &[];
                }
            }
        }
        Ok(())
    }

    fn extend_line(&mut self, bytes: &[u8]) -> Result<(), LineTooLong> {
        if self.line.len() + bytes.len() > MAX_LINE || self.data.len() + bytes.len() > MAX_LINE {
            return Err(LineTooLong);
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn end_line(&mut self, out: &mut Vec<String>) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            if self.has_data {
                out.push(String::from_utf8_lossy(&self.data).into_owned());
            }
            self.data.clear();
            self.has_data = false;
            return;
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(0) => return, // a comment
            Some(i) => {
                let value = &line[i + 1..];
                (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (&line[..], &[][..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_in(pieces: &[&[u8]]) -> Result<Vec<String>, LineTooLong> {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        for p in pieces {
            d.push(p, &mut out)?;
        }
        Ok(out)
    }

    #[test]
    fn openai_style_events_with_each_line_ending() {
        for end in ["\n", "\r\n", "\r"] {
            let text = format!(
                "data: {{\"a\":1}}{end}{end}: keep-alive{end}{end}event: x{end}data: two{end}data:  lines{end}{end}data: [DONE]{end}{end}"
            );
            assert_eq!(
                decode_in(&[text.as_bytes()]).unwrap(),
                vec!["{\"a\":1}", "two\n lines", "[DONE]"],
                "{end:?}"
            );
        }
    }

    #[test]
    fn an_event_cut_off_by_the_end_of_the_stream_is_not_dispatched() {
        assert_eq!(decode_in(&[b"data: 1\n\ndata: 2\n"]).unwrap(), vec!["1"]);
    }

    #[test]
    fn a_line_without_end_is_bounded() {
        let mut d = SseDecoder::default();
        let chunk = vec![b'x'; 1024 * 1024];
        let mut out = Vec::new();
        let mut result = Ok(());
        for _ in 0..20 {
            result = d.push(&chunk, &mut out);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(LineTooLong));
    }

    /// One event as an upstream could write it: data lines, maybe a comment, one kind of line end.
    fn event() -> impl Strategy<Value = (Vec<String>, String)> {
        (
            prop::collection::vec("[a-zA-Z0-9{}\":, \\[\\]é]{0,30}", 1..4),
            prop::sample::select(vec!["\n", "\r\n", "\r"]),
            any::<bool>(),
        )
            .prop_map(|(lines, end, comment)| {
                let mut text = String::new();
                if comment {
                    text.push_str(&format!(": ping{end}"));
                }
                for l in &lines {
                    text.push_str(&format!("data: {l}{end}"));
                }
                text.push_str(end);
                (lines, text)
            })
    }

    proptest! {
        #[test]
        fn where_the_network_cuts_the_stream_changes_nothing(
            events in prop::collection::vec(event(), 0..12),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let text: String = events.iter().map(|(_, t)| t.as_str()).collect();
            let expected: Vec<String> = events.iter().map(|(lines, _)| lines.join("\n")).collect();
            let bytes = text.as_bytes();
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut pieces = Vec::new();
            let mut from = 0;
            for p in points {
                pieces.push(&bytes[from..p]);
                from = p;
            }
            pieces.push(&bytes[from..]);
            prop_assert_eq!(decode_in(&pieces).unwrap(), expected);
        }

        #[test]
        fn any_bytes_decode_without_panicking(
            pieces in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..16),
        ) {
            let pieces: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
            let _ = decode_in(&pieces);
        }
    }
}
