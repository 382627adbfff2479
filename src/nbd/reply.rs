//! A reply buffer that remembers how much of its memory it has already
//! initialised, so that reading data into it costs no zeroing.
//!
//! A `Vec<u8>` that is cleared and reused must be zero-filled again before a
//! `pread` may write into it (safe Rust cannot hand out uninitialised memory).
//! For 1 MiB reads that memset was a fifth of the server's CPU (perf, 1 MiB
//! sequential reads at QD32). [`ReplyBuf`] keeps the bytes of earlier replies
//! past its logical length instead: [`ReplyBuf::append`] hands them out to be
//! overwritten, and only memory never used before is zeroed.
//!
//! The stale bytes are never sent: only `[0, len)` is visible
//! ([`ReplyBuf::as_slice`]), and every caller of `append` fills all of what it
//! got or truncates back on error.

/// Bytes of replies, appended in order; see the module docs.
#[derive(Default)]
pub struct ReplyBuf {
    /// Initialised memory; `buf.len()` may exceed `len`.
    buf: Vec<u8>,
    /// The reply bytes: `buf[..len]`.
    len: usize,
}

impl ReplyBuf {
    /// An empty buffer.
    pub fn new() -> ReplyBuf {
        ReplyBuf::default()
    }

    /// Bytes of replies held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No reply bytes held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Memory held (what a spare buffer costs).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The reply bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The reply bytes, to overwrite in place.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }

    /// Append `bytes`.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.append(bytes.len()).copy_from_slice(bytes);
    }

    /// Append `n` bytes and return them to be filled: their content is
    /// unspecified (bytes of earlier replies, or zeros), so the caller overwrites
    /// every one of them or truncates back to where it started.
    pub fn append(&mut self, n: usize) -> &mut [u8] {
        let at = self.len;
        let end = at + n;
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        self.len = end;
        &mut self.buf[at..end]
    }

    /// Keep only the first `n` reply bytes (the memory stays initialised).
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// Drop every reply byte (the memory stays, for the next replies).
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_appended_bytes_are_visible_and_memory_is_reused() {
        let mut b = ReplyBuf::new();
        b.extend_from_slice(b"hello");
        b.append(3).copy_from_slice(b"abc");
        assert_eq!(b.as_slice(), b"helloabc");
        b.truncate(5);
        assert_eq!(b.as_slice(), b"hello");
        let cap = b.capacity();
        b.clear();
        assert!(b.is_empty());
        // Reused memory: the stale bytes come back only through `append`.
        let got = b.append(8);
        assert_eq!(got.len(), 8);
        got.copy_from_slice(b"12345678");
        assert_eq!(b.as_slice(), b"12345678");
        assert_eq!(b.capacity(), cap);
        b.truncate(100);
        assert_eq!(b.len(), 8);
    }
}
