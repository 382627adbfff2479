//! The replication stream's bytes: `thinctl send` writes them, `thinctl receive`
//! reads them. Pure encode/decode over `Write`/`Read`; nothing here knows pools.
//!
//! A stream is a header, then records in ascending byte order, then one end record,
//! then nothing. Every integer is little-endian. Every checksum is CRC32C
//! (Castagnoli, seed 0, as `crc32c::crc32c` computes it).
//!
//! **Header** (80 bytes):
//!
//! | offset | width | field |
//! |---|---|---|
//! | 0x00 | 8 B | magic `TPSTREAM` |
//! | 0x08 | u32 | version = 1 |
//! | 0x0C | u32 | flags: bit 0 = incremental; other bits 0 |
//! | 0x10 | u64 | block_bytes: the source pool's data block size (a multiple of 64 KiB, 64 KiB..1 GiB) |
//! | 0x18 | u64 | device_bytes: the device's virtual size (1..=2^63-1) |
//! | 0x20 | 16 B | source identity: the snapshot identity the stream reproduces (not all zero) |
//! | 0x30 | 16 B | base identity: the identity an incremental stream applies on top of (all zero in a full stream) |
//! | 0x40 | u64 | base_bytes: the base's virtual size (0 in a full stream) |
//! | 0x48 | u32 | reserved, 0 |
//! | 0x4C | u32 | CRC32C of bytes 0x00..0x4C |
//!
//! **Record header** (32 bytes), followed by `payload_len` bytes of payload:
//!
//! | offset | width | field |
//! |---|---|---|
//! | 0x00 | u32 | kind: 1 = DATA, 2 = ZERO, 3 = END |
//! | 0x04 | u32 | payload_len: DATA = length (at most [`MAX_RECORD_BYTES`]), ZERO = 0, END = 40 |
//! | 0x08 | u64 | offset in bytes (END: 0) |
//! | 0x10 | u64 | length in bytes, at least 1 (END: 0) |
//! | 0x18 | u32 | CRC32C of record-header bytes 0x00..0x18 followed by the payload |
//! | 0x1C | u32 | reserved, 0 |
//!
//! - **DATA**: the device's bytes `[offset, offset + length)` are the payload.
//! - **ZERO**: the device's bytes `[offset, offset + length)` read as zeros (the
//!   receiver unmaps whole blocks and zeroes partial ones): unmapped or all-zero
//!   blocks in a full stream, blocks unmapped since the base in an incremental one.
//! - Bytes no record covers are unchanged: zeros in a full stream (the receiver
//!   starts from an empty device), the base's bytes in an incremental one.
//! - DATA and ZERO records lie inside `[0, device_bytes)`, in ascending order and
//!   without overlap (a record starts at or after the end of the one before).
//!
//! **End payload** (40 bytes):
//!
//! | offset | width | field |
//! |---|---|---|
//! | 0x00 | u64 | number of DATA records |
//! | 0x08 | u64 | DATA bytes (sum of lengths) |
//! | 0x10 | u64 | number of ZERO records |
//! | 0x18 | u64 | ZERO bytes (sum of lengths) |
//! | 0x20 | u32 | CRC32C of every byte of the stream before the end record (header and records) |
//! | 0x24 | u32 | reserved, 0 |
//!
//! The end record proves the stream is complete: a stream cut anywhere, a dropped or
//! repeated record, or bytes after the end record are refused. The per-record CRC
//! names the damaged record; the whole-stream CRC catches what per-record checks
//! cannot (records swapped between two streams of the same device).
//!
//! Reading is safe on untrusted input: lengths are checked against their limits
//! before anything is allocated (at most one payload of [`MAX_RECORD_BYTES`] is held
//! at a time), every violation is a typed [`StreamError`] naming the record and its
//! byte offset, and nothing panics.

use std::io::{self, Read, Write};

use byteorder::{ByteOrder, LittleEndian as LE};

/// The first 8 bytes of every stream.
pub const MAGIC: [u8; 8] = *b"TPSTREAM";
/// The stream version this code writes and reads.
pub const VERSION: u32 = 1;
/// Header flag: the stream is incremental (applies on top of a base).
pub const FLAG_INCREMENTAL: u32 = 1;
/// Header size in bytes.
pub const HEADER_BYTES: usize = 80;
/// Record header size in bytes.
pub const RECORD_HEADER_BYTES: usize = 32;
/// End record payload size in bytes.
pub const END_PAYLOAD_BYTES: usize = 40;
/// Largest DATA payload: the most a reader allocates at once.
pub const MAX_RECORD_BYTES: u32 = 8 << 20;
/// Largest device size a stream may describe (what `pool.toml` allows).
pub const MAX_DEVICE_BYTES: u64 = i64::MAX as u64;

/// Record kind: bytes of the device.
pub const KIND_DATA: u32 = 1;
/// Record kind: a range that reads as zeros.
pub const KIND_ZERO: u32 = 2;
/// Record kind: the end, with totals.
pub const KIND_END: u32 = 3;

/// A 128-bit snapshot identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Identity(pub [u8; 16]);

impl Identity {
    /// A fresh random identity (from the kernel's random source).
    pub fn random() -> io::Result<Identity> {
        let mut b = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
        if b == [0; 16] {
            b[0] = 1;
        }
        Ok(Identity(b))
    }

    /// Is this the all-zero identity (none)?
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// 32 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parse 32 hex digits.
    pub fn from_hex(s: &str) -> Option<Identity> {
        if s.len() != 32 || !s.is_ascii() {
            return None;
        }
        let mut b = [0u8; 16];
        for (i, out) in b.iter_mut().enumerate() {
            *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Identity(b))
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// What a stream describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The source pool's data block size in bytes.
    pub block_bytes: u64,
    /// The device's virtual size in bytes.
    pub device_bytes: u64,
    /// The identity the received device will have.
    pub source: Identity,
    /// For an incremental stream: the base's identity and virtual size.
    pub base: Option<(Identity, u64)>,
}

/// Totals of a stream, as its end record states them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    /// DATA records.
    pub data_records: u64,
    /// DATA bytes.
    pub data_bytes: u64,
    /// ZERO records.
    pub zero_records: u64,
    /// ZERO bytes.
    pub zero_bytes: u64,
}

/// Why a stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Reading or writing the stream failed.
    #[error("stream I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The first bytes are not a replication stream.
    #[error("not a thinpool replication stream (the first 8 bytes are not \"TPSTREAM\")")]
    BadMagic,
    /// A stream version this build does not read.
    #[error("stream version {0} is not supported (this thinctl reads version {VERSION})")]
    UnsupportedVersion(u32),
    /// The header's checksum does not match.
    #[error("the stream header is damaged (checksum mismatch)")]
    HeaderChecksum,
    /// A header field is out of range.
    #[error("bad stream header: {0}")]
    BadHeader(String),
    /// The stream ended before its end record.
    #[error("the stream is truncated: it ends at byte {at}, inside {what}, before its end record")]
    Truncated {
        /// Bytes read in all.
        at: u64,
        /// What was being read.
        what: String,
    },
    /// A record's checksum does not match.
    #[error("record {index} at byte {at} is damaged (checksum mismatch)")]
    RecordChecksum {
        /// Record number, from 0.
        index: u64,
        /// Byte offset of its header in the stream.
        at: u64,
    },
    /// A record breaks a rule of the format.
    #[error("record {index} at byte {at} is invalid: {why}")]
    BadRecord {
        /// Record number, from 0.
        index: u64,
        /// Byte offset of its header in the stream.
        at: u64,
        /// The rule it breaks.
        why: String,
    },
    /// The end record's totals or stream checksum do not match what was read.
    #[error("the stream is inconsistent: {0}")]
    Inconsistent(String),
    /// Bytes follow the end record.
    #[error("unexpected bytes after the end record (at byte {0})")]
    TrailingData(u64),
    /// The writer was used against the format's rules (a bug in the sender).
    #[error("stream writer misuse: {0}")]
    Misuse(String),
}

fn check_header(h: &Header) -> Result<(), String> {
    let bs = h.block_bytes;
    if !(64 << 10..=1 << 30).contains(&bs) || bs % (64 << 10) != 0 {
        return Err(format!("block size {bs} bytes: it must be a multiple of 64 KiB from 64 KiB to 1 GiB"));
    }
    if h.device_bytes == 0 || h.device_bytes > MAX_DEVICE_BYTES {
        return Err(format!("device size {} bytes: it must be 1..={MAX_DEVICE_BYTES}", h.device_bytes));
    }
    if h.source.is_zero() {
        return Err("the source identity is all zero".into());
    }
    if let Some((base, base_bytes)) = h.base {
        if base.is_zero() {
            return Err("an incremental stream with an all-zero base identity".into());
        }
        if base == h.source {
            return Err("the base identity equals the source identity".into());
        }
        if base_bytes == 0 || base_bytes > MAX_DEVICE_BYTES {
            return Err(format!("base size {base_bytes} bytes: it must be 1..={MAX_DEVICE_BYTES}"));
        }
    }
    Ok(())
}

/// Encode a header (which must be valid).
pub fn encode_header(h: &Header) -> [u8; HEADER_BYTES] {
    let mut b = [0u8; HEADER_BYTES];
    b[0..8].copy_from_slice(&MAGIC);
    LE::write_u32(&mut b[0x08..], VERSION);
    LE::write_u32(&mut b[0x0C..], if h.base.is_some() { FLAG_INCREMENTAL } else { 0 });
    LE::write_u64(&mut b[0x10..], h.block_bytes);
    LE::write_u64(&mut b[0x18..], h.device_bytes);
    b[0x20..0x30].copy_from_slice(&h.source.0);
    if let Some((base, base_bytes)) = h.base {
        b[0x30..0x40].copy_from_slice(&base.0);
        LE::write_u64(&mut b[0x40..], base_bytes);
    }
    let crc = crc32c::crc32c(&b[..0x4C]);
    LE::write_u32(&mut b[0x4C..], crc);
    b
}

/// Decode and validate a header.
pub fn decode_header(b: &[u8; HEADER_BYTES]) -> Result<Header, StreamError> {
    if b[0..8] != MAGIC {
        return Err(StreamError::BadMagic);
    }
    let version = LE::read_u32(&b[0x08..]);
    if crc32c::crc32c(&b[..0x4C]) != LE::read_u32(&b[0x4C..]) {
        return Err(StreamError::HeaderChecksum);
    }
    if version != VERSION {
        return Err(StreamError::UnsupportedVersion(version));
    }
    let flags = LE::read_u32(&b[0x0C..]);
    if flags & !FLAG_INCREMENTAL != 0 {
        return Err(StreamError::BadHeader(format!("unknown flags {flags:#x}")));
    }
    if LE::read_u32(&b[0x48..]) != 0 {
        return Err(StreamError::BadHeader("reserved bytes are not zero".into()));
    }
    let mut source = [0u8; 16];
    source.copy_from_slice(&b[0x20..0x30]);
    let mut base = [0u8; 16];
    base.copy_from_slice(&b[0x30..0x40]);
    let base_bytes = LE::read_u64(&b[0x40..]);
    let incremental = flags & FLAG_INCREMENTAL != 0;
    if !incremental && (base != [0; 16] || base_bytes != 0) {
        return Err(StreamError::BadHeader("a full stream names a base".into()));
    }
    let h = Header {
        block_bytes: LE::read_u64(&b[0x10..]),
        device_bytes: LE::read_u64(&b[0x18..]),
        source: Identity(source),
        base: incremental.then_some((Identity(base), base_bytes)),
    };
    check_header(&h).map_err(StreamError::BadHeader)?;
    Ok(h)
}

fn record_header(kind: u32, payload_len: u32, offset: u64, length: u64) -> [u8; RECORD_HEADER_BYTES] {
    let mut b = [0u8; RECORD_HEADER_BYTES];
    LE::write_u32(&mut b[0x00..], kind);
    LE::write_u32(&mut b[0x04..], payload_len);
    LE::write_u64(&mut b[0x08..], offset);
    LE::write_u64(&mut b[0x10..], length);
    b
}

fn seal(b: &mut [u8; RECORD_HEADER_BYTES], payload: &[u8]) {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..0x18]), payload);
    LE::write_u32(&mut b[0x18..], crc);
}

/// Writes a stream: the header at [`StreamWriter::new`], records in ascending
/// order, the end record at [`StreamWriter::finish`]. Adjacent ZERO ranges are
/// merged; DATA is cut into records of at most [`MAX_RECORD_BYTES`].
pub struct StreamWriter<W: Write> {
    out: W,
    header: Header,
    crc: u32,
    pos: u64,
    totals: Totals,
    /// A ZERO range not written yet (merged with the next adjacent one).
    pending_zero: Option<(u64, u64)>,
    /// Bytes written so far.
    written: u64,
}

impl<W: Write> StreamWriter<W> {
    /// Start a stream: check and write the header.
    pub fn new(mut out: W, header: Header) -> Result<StreamWriter<W>, StreamError> {
        check_header(&header).map_err(StreamError::Misuse)?;
        let b = encode_header(&header);
        out.write_all(&b)?;
        Ok(StreamWriter {
            out,
            header,
            crc: crc32c::crc32c(&b),
            pos: 0,
            totals: Totals::default(),
            pending_zero: None,
            written: HEADER_BYTES as u64,
        })
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        self.out.write_all(bytes)?;
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), StreamError> {
        if len == 0 {
            return Err(StreamError::Misuse("an empty range".into()));
        }
        let end = offset.checked_add(len).ok_or_else(|| StreamError::Misuse("range overflows".into()))?;
        let floor = self.pending_zero.map_or(self.pos, |(o, l)| o + l);
        if offset < floor || end > self.header.device_bytes {
            return Err(StreamError::Misuse(format!(
                "range {offset}+{len} is out of order or past the device end ({} bytes)",
                self.header.device_bytes
            )));
        }
        Ok(())
    }

    fn flush_zero(&mut self) -> Result<(), StreamError> {
        if let Some((offset, len)) = self.pending_zero.take() {
            let mut h = record_header(KIND_ZERO, 0, offset, len);
            seal(&mut h, &[]);
            self.put(&h)?;
            self.totals.zero_records += 1;
            self.totals.zero_bytes += len;
            self.pos = offset + len;
        }
        Ok(())
    }

    /// The device's bytes at `offset`.
    pub fn data(&mut self, offset: u64, bytes: &[u8]) -> Result<(), StreamError> {
        self.check_range(offset, bytes.len() as u64)?;
        self.flush_zero()?;
        let mut at = offset;
        for chunk in bytes.chunks(MAX_RECORD_BYTES as usize) {
            let n = chunk.len() as u64;
            let mut h = record_header(KIND_DATA, chunk.len() as u32, at, n);
            seal(&mut h, chunk);
            self.put(&h)?;
            self.put(chunk)?;
            self.totals.data_records += 1;
            self.totals.data_bytes += n;
            at += n;
        }
        self.pos = at;
        Ok(())
    }

    /// `[offset, offset + len)` reads as zeros.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<(), StreamError> {
        self.check_range(offset, len)?;
        match &mut self.pending_zero {
            Some((o, l)) if *o + *l == offset => *l += len,
            _ => {
                self.flush_zero()?;
                self.pending_zero = Some((offset, len));
            }
        }
        Ok(())
    }

    /// Bytes written so far (header and records).
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Write the end record and flush; returns the totals and the writer.
    pub fn finish(mut self) -> Result<(Totals, W), StreamError> {
        self.flush_zero()?;
        let t = self.totals;
        let mut p = [0u8; END_PAYLOAD_BYTES];
        LE::write_u64(&mut p[0x00..], t.data_records);
        LE::write_u64(&mut p[0x08..], t.data_bytes);
        LE::write_u64(&mut p[0x10..], t.zero_records);
        LE::write_u64(&mut p[0x18..], t.zero_bytes);
        LE::write_u32(&mut p[0x20..], self.crc);
        let mut h = record_header(KIND_END, END_PAYLOAD_BYTES as u32, 0, 0);
        seal(&mut h, &p);
        self.put(&h)?;
        self.put(&p)?;
        self.out.flush()?;
        Ok((t, self.out))
    }
}

/// One record as read.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// The device's bytes at `offset`.
    Data {
        /// Byte offset in the device.
        offset: u64,
        /// The bytes.
        bytes: &'a [u8],
    },
    /// `[offset, offset + len)` reads as zeros.
    Zero {
        /// Byte offset in the device.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// Reads and checks a stream record by record (see the module documentation).
pub struct StreamReader<R: Read> {
    input: R,
    header: Header,
    /// Bytes read so far.
    at: u64,
    /// CRC of everything read before the current record.
    crc: u32,
    /// End of the last DATA/ZERO record.
    pos: u64,
    index: u64,
    totals: Totals,
    buf: Vec<u8>,
    done: bool,
}

/// Read exactly `buf.len()` bytes; a short read is `Truncated` naming `what`.
fn read_full<R: Read>(input: &mut R, buf: &mut [u8], at: u64, what: &dyn Fn() -> String) -> Result<(), StreamError> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => return Err(StreamError::Truncated { at: at + got as u64, what: what() }),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StreamError::Io(e)),
        }
    }
    Ok(())
}

impl<R: Read> StreamReader<R> {
    /// Read and check the header.
    pub fn new(mut input: R) -> Result<StreamReader<R>, StreamError> {
        let mut b = [0u8; HEADER_BYTES];
        read_full(&mut input, &mut b, 0, &|| "the header".into())?;
        let header = decode_header(&b)?;
        Ok(StreamReader {
            input,
            header,
            at: HEADER_BYTES as u64,
            crc: crc32c::crc32c(&b),
            pos: 0,
            index: 0,
            totals: Totals::default(),
            buf: Vec::new(),
            done: false,
        })
    }

    /// The stream's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.at
    }

    /// Totals of the records read so far (after the end: the stream's totals).
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// The next DATA or ZERO record; `None` once the end record has been read and
    /// checked and nothing follows it.
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>, StreamError> {
        if self.done {
            return Ok(None);
        }
        let (index, start) = (self.index, self.at);
        let bad = |why: String| StreamError::BadRecord { index, at: start, why };
        let mut h = [0u8; RECORD_HEADER_BYTES];
        read_full(&mut self.input, &mut h, self.at, &|| format!("the header of record {index}"))?;
        let kind = LE::read_u32(&h[0x00..]);
        let payload_len = LE::read_u32(&h[0x04..]);
        let offset = LE::read_u64(&h[0x08..]);
        let length = LE::read_u64(&h[0x10..]);
        // Lengths are checked before anything is allocated or read.
        let want = match kind {
            KIND_DATA => {
                if payload_len == 0 || payload_len > MAX_RECORD_BYTES {
                    return Err(bad(format!("DATA payload of {payload_len} bytes (1..={MAX_RECORD_BYTES})")));
                }
                if u64::from(payload_len) != length {
                    return Err(bad(format!("DATA length {length} differs from its payload of {payload_len} bytes")));
                }
                payload_len
            }
            KIND_ZERO => {
                if payload_len != 0 {
                    return Err(bad(format!("a ZERO record with a payload of {payload_len} bytes")));
                }
                if length == 0 {
                    return Err(bad("an empty ZERO record".into()));
                }
                0
            }
            KIND_END => {
                if payload_len as usize != END_PAYLOAD_BYTES || offset != 0 || length != 0 {
                    return Err(bad("malformed end record".into()));
                }
                payload_len
            }
            other => return Err(bad(format!("unknown record kind {other}"))),
        };
        self.buf.clear();
        self.buf.resize(want as usize, 0);
        read_full(&mut self.input, &mut self.buf, self.at + RECORD_HEADER_BYTES as u64, &|| {
            format!("the payload of record {index}")
        })?;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&h[..0x18]), &self.buf);
        if crc != LE::read_u32(&h[0x18..]) {
            return Err(StreamError::RecordChecksum { index, at: start });
        }
        // The meaning is checked after the checksum, so that damage reads as damage.
        if LE::read_u32(&h[0x1C..]) != 0 {
            return Err(bad("reserved bytes are not zero".into()));
        }
        if kind != KIND_END {
            let end = offset.checked_add(length).filter(|&e| e <= self.header.device_bytes);
            if end.is_none() {
                return Err(bad(format!(
                    "range {offset}+{length} goes past the device end ({} bytes)",
                    self.header.device_bytes
                )));
            }
            if offset < self.pos {
                return Err(bad(format!(
                    "range at byte {offset} overlaps or precedes the previous record (which ends at byte {})",
                    self.pos
                )));
            }
        }
        let stream_crc = self.crc;
        self.crc = crc32c::crc32c_append(crc32c::crc32c_append(self.crc, &h), &self.buf);
        self.at += (RECORD_HEADER_BYTES + want as usize) as u64;
        self.index += 1;
        match kind {
            KIND_DATA => {
                self.pos = offset + length;
                self.totals.data_records += 1;
                self.totals.data_bytes += length;
                Ok(Some(Record::Data { offset, bytes: &self.buf }))
            }
            KIND_ZERO => {
                self.pos = offset + length;
                self.totals.zero_records += 1;
                self.totals.zero_bytes += length;
                Ok(Some(Record::Zero { offset, len: length }))
            }
            _ => {
                let p = &self.buf;
                let stated = Totals {
                    data_records: LE::read_u64(&p[0x00..]),
                    data_bytes: LE::read_u64(&p[0x08..]),
                    zero_records: LE::read_u64(&p[0x10..]),
                    zero_bytes: LE::read_u64(&p[0x18..]),
                };
                if LE::read_u32(&p[0x24..]) != 0 {
                    return Err(bad("reserved bytes of the end record are not zero".into()));
                }
                if stated != self.totals {
                    return Err(StreamError::Inconsistent(format!(
                        "the end record states {} DATA records ({} bytes) and {} ZERO records ({} bytes) but the stream held {} ({} bytes) and {} ({} bytes)",
                        stated.data_records,
                        stated.data_bytes,
                        stated.zero_records,
                        stated.zero_bytes,
                        self.totals.data_records,
                        self.totals.data_bytes,
                        self.totals.zero_records,
                        self.totals.zero_bytes
                    )));
                }
                if LE::read_u32(&p[0x20..]) != stream_crc {
                    return Err(StreamError::Inconsistent("the whole-stream checksum does not match".into()));
                }
                let mut one = [0u8; 1];
                loop {
                    match self.input.read(&mut one) {
                        Ok(0) => break,
                        Ok(_) => return Err(StreamError::TrailingData(self.at)),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(StreamError::Io(e)),
                    }
                }
                self.done = true;
                Ok(None)
            }
        }
    }
}

/// A record as [`read_all`] returns it: offset, the bytes (DATA) or none (ZERO), length.
pub type OwnedRecord = (u64, Option<Vec<u8>>, u64);

/// Read a whole stream from bytes, checking everything (for tests and fuzzing):
/// the header, the records and the totals.
pub fn read_all(bytes: &[u8]) -> Result<(Header, Vec<OwnedRecord>, Totals), StreamError> {
    let mut r = StreamReader::new(bytes)?;
    let mut out = Vec::new();
    while let Some(rec) = r.next_record()? {
        match rec {
            Record::Data { offset, bytes } => out.push((offset, Some(bytes.to_vec()), bytes.len() as u64)),
            Record::Zero { offset, len } => out.push((offset, None, len)),
        }
    }
    Ok((*r.header(), out, r.totals()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(base: bool) -> Header {
        Header {
            block_bytes: 64 << 10,
            device_bytes: 1 << 24,
            source: Identity([7; 16]),
            base: base.then_some((Identity([9; 16]), 1 << 23)),
        }
    }

    fn sample(base: bool) -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new(), header(base)).expect("new");
        w.data(0, &[1u8; 100]).expect("data");
        w.zero(65536, 65536).expect("zero");
        w.zero(131072, 65536).expect("merged zero");
        w.data(1 << 20, &vec![2u8; 9 << 20]).expect("big data");
        w.finish().expect("finish").1
    }

    #[test]
    fn the_header_has_the_documented_layout() {
        let b = encode_header(&header(true));
        assert_eq!(&b[0..8], b"TPSTREAM");
        assert_eq!(LE::read_u32(&b[8..]), 1);
        assert_eq!(LE::read_u32(&b[12..]), FLAG_INCREMENTAL);
        assert_eq!(LE::read_u64(&b[16..]), 65536);
        assert_eq!(LE::read_u64(&b[24..]), 1 << 24);
        assert_eq!(&b[32..48], &[7; 16]);
        assert_eq!(&b[48..64], &[9; 16]);
        assert_eq!(LE::read_u64(&b[64..]), 1 << 23);
        assert_eq!(LE::read_u32(&b[76..]), crc32c::crc32c(&b[..76]));
        assert_eq!(decode_header(&b).expect("decode"), header(true));
        let full = encode_header(&header(false));
        assert_eq!(LE::read_u32(&full[12..]), 0);
        assert_eq!(&full[48..72], &[0; 24]);
    }

    #[test]
    fn a_stream_round_trips_with_merged_zeros_and_split_data() {
        let s = sample(false);
        let (h, recs, t) = read_all(&s).expect("read");
        assert_eq!(h, header(false));
        let shape: Vec<(u64, bool, u64)> = recs.iter().map(|(o, d, l)| (*o, d.is_some(), *l)).collect();
        assert_eq!(
            shape,
            vec![
                (0, true, 100),
                (65536, false, 131072),
                (1 << 20, true, 8 << 20),
                ((1 << 20) + (8 << 20), true, 1 << 20)
            ]
        );
        assert_eq!(t, Totals { data_records: 3, data_bytes: 100 + (9 << 20), zero_records: 1, zero_bytes: 131072 });
        // The first record's header sits right after the stream header.
        assert_eq!(LE::read_u32(&s[80..]), KIND_DATA);
        assert_eq!(LE::read_u32(&s[84..]), 100);
        assert_eq!(LE::read_u32(&s[80 + 24..]), crc32c::crc32c_append(crc32c::crc32c(&s[80..104]), &s[112..212]));
    }

    #[test]
    fn every_truncation_is_refused() {
        let s = sample(true);
        for cut in (0..s.len()).step_by(97).chain([s.len() - 1, s.len() - 40, HEADER_BYTES]) {
            match read_all(&s[..cut]) {
                Err(StreamError::Truncated { at, .. }) => assert_eq!(at, cut as u64),
                other => panic!("cut at {cut}: {:?}", other.map(|x| x.2)),
            }
        }
        let mut more = s.clone();
        more.push(0);
        assert!(matches!(read_all(&more), Err(StreamError::TrailingData(_))));
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let s = sample(true);
        let positions: Vec<usize> = (0..s.len()).step_by(4099).chain(0..HEADER_BYTES + 64).collect();
        for at in positions {
            let mut m = s.clone();
            m[at] ^= 0x40;
            assert!(read_all(&m).is_err(), "a flip at byte {at} went through");
        }
    }

    #[test]
    fn lengths_are_checked_before_allocating() {
        let mut s = sample(false);
        // Claim a 4 GiB payload: refused without reading (or allocating) it.
        LE::write_u32(&mut s[84..], u32::MAX);
        match read_all(&s) {
            Err(StreamError::BadRecord { index: 0, at: 80, why }) => assert!(why.contains("DATA payload"), "{why}"),
            other => panic!("{:?}", other.map(|x| x.2)),
        }
    }

    #[test]
    fn records_out_of_order_or_past_the_end_are_refused() {
        let mut s = Vec::new();
        s.extend_from_slice(&encode_header(&header(false)));
        let rec = |kind, off: u64, len: u64| {
            let mut h = record_header(kind, 0, off, len);
            seal(&mut h, &[]);
            h
        };
        let a = rec(KIND_ZERO, 4096, 4096);
        let b = rec(KIND_ZERO, 0, 4096);
        let past = rec(KIND_ZERO, (1 << 24) - 1, 2);
        let mut two = s.clone();
        two.extend_from_slice(&a);
        two.extend_from_slice(&b);
        assert!(matches!(read_all(&two), Err(StreamError::BadRecord { index: 1, .. })));
        let mut p = s.clone();
        p.extend_from_slice(&past);
        assert!(matches!(read_all(&p), Err(StreamError::BadRecord { index: 0, .. })));
        let mut w = StreamWriter::new(Vec::new(), header(false)).expect("new");
        w.zero(4096, 1).expect("zero");
        assert!(matches!(w.data(0, &[1]), Err(StreamError::Misuse(_))));
        assert!(matches!(w.data(1 << 24, &[1]), Err(StreamError::Misuse(_))));
    }

    #[test]
    fn bad_headers_are_refused_by_name() {
        let h = encode_header(&header(false));
        let mut m = h;
        m[0] = b'X';
        assert!(matches!(decode_header(&m), Err(StreamError::BadMagic)));
        let mut v = h;
        LE::write_u32(&mut v[8..], 2);
        let crc = crc32c::crc32c(&v[..76]);
        LE::write_u32(&mut v[76..], crc);
        assert!(matches!(decode_header(&v), Err(StreamError::UnsupportedVersion(2))));
        let mut bs = h;
        LE::write_u64(&mut bs[16..], 4096);
        let crc = crc32c::crc32c(&bs[..76]);
        LE::write_u32(&mut bs[76..], crc);
        assert!(matches!(decode_header(&bs), Err(StreamError::BadHeader(_))));
        let mut c = h;
        c[40] ^= 1;
        assert!(matches!(decode_header(&c), Err(StreamError::HeaderChecksum)));
        assert!(Identity::from_hex(&Identity([0xab; 16]).to_hex()) == Some(Identity([0xab; 16])));
        assert!(Identity::from_hex("zz").is_none());
    }
}
