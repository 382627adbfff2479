//! The handshake: fixed newstyle greeting, then option haggling until the client
//! chooses an export (EXPORT_NAME or GO), aborts, or goes away.
//!
//! Each option is read whole (its length checked against the limits first), parsed
//! into its typed [`OptionCode`], and answered by one small function; the state the
//! options build up (structured replies, `base:allocation`) lives in [`Negotiation`],
//! and the agreed result is a [`Session`] for the transmission phase.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use byteorder::{BigEndian as BE, ByteOrder};

use super::export::{Catalog, Export};
use super::server::{send, MAX_PAYLOAD};
use super::wire::{self, OptionCode};

/// Largest option payload read into memory.
const MAX_OPTION: u32 = 64 << 10;
/// Option payloads above this are not even skipped: the client is dropped.
const MAX_OPTION_SKIP: u32 = 16 << 20;
/// Most metadata context queries in one LIST/SET_META_CONTEXT.
const MAX_QUERIES: u32 = 1024;
/// Longest export name or context query accepted inside INFO/GO/META_CONTEXT.
const MAX_STRING: u32 = 4096;
/// Context id of `base:allocation`.
pub(super) const CTX_BASE_ALLOCATION: u32 = 1;

/// What option haggling agreed on.
pub(super) struct Session {
    /// The chosen export.
    pub(super) export: Arc<dyn Export>,
    /// The name the client chose it by (given back to [`Catalog::close`]).
    pub(super) name: String,
    /// Structured replies were negotiated.
    pub(super) structured: bool,
    /// `base:allocation` was selected with SET_META_CONTEXT.
    pub(super) base_allocation: bool,
    /// Writes are refused (server setting or export).
    pub(super) read_only: bool,
}

/// The preferred block size to advertise: NBD requires a power of two, and a pool's
/// block size is any multiple of 64 KiB (192 KiB, say), so take the largest power of
/// two dividing it, kept within 512 B..=32 MiB.
fn preferred_block_size(block: u32) -> u32 {
    let pow2 = if block == 0 { 512 } else { 1u32 << block.trailing_zeros() };
    pow2.clamp(512, MAX_PAYLOAD)
}

fn transmission_flags(export: &dyn Export, read_only: bool, structured: bool) -> u16 {
    let mut f = wire::TF_HAS_FLAGS | wire::TF_SEND_FLUSH | wire::TF_SEND_CACHE | wire::TF_CAN_MULTI_CONN;
    if read_only || export.read_only() {
        f |= wire::TF_READ_ONLY;
    } else {
        f |= wire::TF_SEND_FUA | wire::TF_SEND_TRIM | wire::TF_SEND_WRITE_ZEROES | wire::TF_SEND_FAST_ZERO;
    }
    if structured {
        f |= wire::TF_SEND_DF;
    }
    f
}

fn read_u32<R: Read>(r: &mut R) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn skip<R: Read>(r: &mut R, mut n: u64) -> io::Result<()> {
    let mut buf = [0u8; 8192];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..k])?;
        n -= k as u64;
    }
    Ok(())
}

fn invalid_data(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// A bounds-checked reader over an option's payload.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(BE::read_u32)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(BE::read_u16)
    }
    fn string(&mut self, n: u32) -> Option<String> {
        if n > MAX_STRING {
            return None;
        }
        self.take(n as usize).map(|b| String::from_utf8_lossy(b).into_owned())
    }
}

/// The payload of INFO/GO: export name, then the information types asked for.
/// `None` when malformed (short, too long, or with trailing bytes).
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut c = Cursor(data);
    let n = c.u32()?;
    let name = c.string(n)?;
    let k = c.u16()?;
    let mut infos = Vec::new();
    for _ in 0..k {
        infos.push(c.u16()?);
    }
    c.0.is_empty().then_some((name, infos))
}

/// The payload of LIST/SET_META_CONTEXT: export name (ignored), then the queries.
/// `None` when malformed or with more than [`MAX_QUERIES`] queries.
fn parse_meta_context_request(data: &[u8]) -> Option<Vec<String>> {
    let mut c = Cursor(data);
    let n = c.u32()?;
    let _export = c.string(n)?;
    let k = c.u32()?;
    let mut queries = Vec::new();
    for _ in 0..k.min(MAX_QUERIES) {
        let l = c.u32()?;
        queries.push(c.string(l)?);
    }
    (c.0.is_empty() && k <= MAX_QUERIES).then_some(queries)
}

/// What to do after an option.
enum Step {
    /// Keep haggling.
    Next,
    /// Start transmission.
    Serve(Session),
    /// The client aborted.
    Abort,
}

/// The state of option haggling on one connection.
struct Negotiation<'a, W> {
    w: &'a Mutex<W>,
    catalog: &'a dyn Catalog,
    /// The server refuses writes on every export.
    read_only: bool,
    /// The client asked for no zero padding after EXPORT_NAME.
    no_zeroes: bool,
    structured: bool,
    base_allocation: bool,
}

/// Option haggling. Returns the session to serve, or `None` when the client
/// aborted or went away before choosing an export.
pub(super) fn negotiate<R: Read, W: Write>(
    r: &mut R,
    w: &Mutex<W>,
    catalog: &dyn Catalog,
    read_only: bool,
) -> io::Result<Option<Session>> {
    let mut hello = [0u8; 18];
    BE::write_u64(&mut hello[0..], wire::NBDMAGIC);
    BE::write_u64(&mut hello[8..], wire::IHAVEOPT);
    BE::write_u16(&mut hello[16..], wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES);
    send(w, &[&hello])?;
    let client_flags = read_u32(r)?;
    if client_flags & !(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES) != 0 {
        return Err(invalid_data("unknown client flags"));
    }
    let mut n = Negotiation {
        w,
        catalog,
        read_only,
        no_zeroes: client_flags & wire::FLAG_C_NO_ZEROES != 0,
        structured: false,
        base_allocation: false,
    };
    loop {
        let Some((option, data)) = n.read_option(r)? else { continue };
        match n.handle(option, &data)? {
            Step::Next => {}
            Step::Serve(session) => return Ok(Some(session)),
            Step::Abort => return Ok(None),
        }
    }
}

impl<W: Write> Negotiation<'_, W> {
    fn reply(&self, option: OptionCode, kind: u32, data: &[u8]) -> io::Result<()> {
        send(self.w, &[&wire::option_reply(option.to_wire(), kind, data.len() as u32), data])
    }

    /// Read one option header and, when its length is within the limits, its
    /// payload. An oversized payload is skipped and answered with ERR_TOO_BIG
    /// (`None`), or drops the client when it is too large even to skip.
    fn read_option<R: Read>(&self, r: &mut R) -> io::Result<Option<(OptionCode, Vec<u8>)>> {
        let mut head = [0u8; 16];
        r.read_exact(&mut head)?;
        if BE::read_u64(&head[0..]) != wire::IHAVEOPT {
            return Err(invalid_data("bad option magic"));
        }
        let option = OptionCode::from_wire(BE::read_u32(&head[8..]));
        let len = BE::read_u32(&head[12..]);
        if len > MAX_OPTION {
            if len > MAX_OPTION_SKIP || option == OptionCode::ExportName {
                return Err(invalid_data("option too large"));
            }
            skip(r, len as u64)?;
            self.reply(option, wire::REP_ERR_TOO_BIG, b"")?;
            return Ok(None);
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        Ok(Some((option, data)))
    }

    fn handle(&mut self, option: OptionCode, data: &[u8]) -> io::Result<Step> {
        match option {
            OptionCode::ExportName => self.export_name(data),
            OptionCode::Abort => {
                let _ = self.reply(option, wire::REP_ACK, b"");
                Ok(Step::Abort)
            }
            OptionCode::List => self.list(data).map(|()| Step::Next),
            OptionCode::StructuredReply => self.structured_reply(data).map(|()| Step::Next),
            OptionCode::Info | OptionCode::Go => self.info_or_go(option, data),
            OptionCode::ListMetaContext | OptionCode::SetMetaContext => {
                self.meta_context(option, data).map(|()| Step::Next)
            }
            OptionCode::StartTls => {
                self.reply(option, wire::REP_ERR_POLICY, b"TLS is not offered").map(|()| Step::Next)
            }
            OptionCode::Unknown(_) => self.reply(option, wire::REP_ERR_UNSUP, b"").map(|()| Step::Next),
        }
    }

    /// EXPORT_NAME: the old way to choose an export; an unknown name drops the client
    /// (this option has no error reply).
    fn export_name(&self, data: &[u8]) -> io::Result<Step> {
        let name = String::from_utf8_lossy(data).into_owned();
        let Some(export) = self.catalog.open(&name) else {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("no export named {name:?}")));
        };
        let flags = transmission_flags(export.as_ref(), self.read_only, false);
        let mut reply = vec![0u8; 10];
        BE::write_u64(&mut reply[0..], export.size());
        BE::write_u16(&mut reply[8..], flags);
        if !self.no_zeroes {
            reply.extend_from_slice(&[0u8; 124]);
        }
        send(self.w, &[&reply])?;
        let read_only = self.read_only || export.read_only();
        Ok(Step::Serve(Session { export, name, structured: false, base_allocation: false, read_only }))
    }

    /// LIST: one REP_SERVER per export, then ACK.
    fn list(&self, data: &[u8]) -> io::Result<()> {
        let option = OptionCode::List;
        if !data.is_empty() {
            return self.reply(option, wire::REP_ERR_INVALID, b"");
        }
        for (name, _) in self.catalog.list() {
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            self.reply(option, wire::REP_SERVER, &d)?;
        }
        self.reply(option, wire::REP_ACK, b"")
    }

    /// STRUCTURED_REPLY: takes no payload.
    fn structured_reply(&mut self, data: &[u8]) -> io::Result<()> {
        let option = OptionCode::StructuredReply;
        if !data.is_empty() {
            return self.reply(option, wire::REP_ERR_INVALID, b"");
        }
        self.structured = true;
        self.reply(option, wire::REP_ACK, b"")
    }

    /// INFO and GO: describe the export (INFO_EXPORT, INFO_BLOCK_SIZE, then the
    /// NAME/DESCRIPTION items asked for); GO then starts transmission on it.
    fn info_or_go(&self, option: OptionCode, data: &[u8]) -> io::Result<Step> {
        let Some((name, infos)) = parse_info_request(data) else {
            self.reply(option, wire::REP_ERR_INVALID, b"")?;
            return Ok(Step::Next);
        };
        let Some(export) = self.catalog.open(&name) else {
            self.reply(option, wire::REP_ERR_UNKNOWN, format!("no export named {name:?}").as_bytes())?;
            return Ok(Step::Next);
        };
        let flags = transmission_flags(export.as_ref(), self.read_only, self.structured);
        let mut info = vec![0u8; 12];
        BE::write_u16(&mut info[0..], wire::INFO_EXPORT);
        BE::write_u64(&mut info[2..], export.size());
        BE::write_u16(&mut info[10..], flags);
        self.reply(option, wire::REP_INFO, &info)?;
        let mut bs = vec![0u8; 14];
        BE::write_u16(&mut bs[0..], wire::INFO_BLOCK_SIZE);
        BE::write_u32(&mut bs[2..], 1);
        BE::write_u32(&mut bs[6..], preferred_block_size(export.preferred_block_size()));
        BE::write_u32(&mut bs[10..], MAX_PAYLOAD);
        self.reply(option, wire::REP_INFO, &bs)?;
        for i in infos {
            let Some(d) = self.info_item(i, &name) else { continue };
            self.reply(option, wire::REP_INFO, &d)?;
        }
        self.reply(option, wire::REP_ACK, b"")?;
        if option == OptionCode::Go {
            let read_only = self.read_only || export.read_only();
            return Ok(Step::Serve(Session {
                export,
                name,
                structured: self.structured,
                base_allocation: self.base_allocation,
                read_only,
            }));
        }
        self.catalog.close(&name);
        Ok(Step::Next)
    }

    /// The REP_INFO payload for one requested information type, `None` for the
    /// types not sent on request (EXPORT and BLOCK_SIZE are always sent) or unknown.
    fn info_item(&self, info: u16, name: &str) -> Option<Vec<u8>> {
        let mut d = Vec::new();
        match info {
            wire::INFO_NAME => {
                d.extend_from_slice(&wire::INFO_NAME.to_be_bytes());
                d.extend_from_slice(name.as_bytes());
            }
            wire::INFO_DESCRIPTION => {
                let desc =
                    self.catalog.list().into_iter().find(|(n, _)| *n == name).map(|(_, d)| d).unwrap_or_default();
                d.extend_from_slice(&wire::INFO_DESCRIPTION.to_be_bytes());
                d.extend_from_slice(desc.as_bytes());
            }
            _ => return None,
        }
        Some(d)
    }

    /// LIST_META_CONTEXT and SET_META_CONTEXT: the only context is
    /// `base:allocation`; SET needs structured replies first.
    fn meta_context(&mut self, option: OptionCode, data: &[u8]) -> io::Result<()> {
        let set = option == OptionCode::SetMetaContext;
        if set && !self.structured {
            return self.reply(option, wire::REP_ERR_INVALID, b"negotiate structured replies first");
        }
        let Some(queries) = parse_meta_context_request(data) else {
            return self.reply(option, wire::REP_ERR_INVALID, b"");
        };
        let matches = if queries.is_empty() {
            !set
        } else {
            queries.iter().any(|q| q == "base:allocation" || (!set && q == "base:"))
        };
        if set {
            self.base_allocation = matches;
        }
        if matches {
            let mut d = CTX_BASE_ALLOCATION.to_be_bytes().to_vec();
            d.extend_from_slice(b"base:allocation");
            self.reply(option, wire::REP_META_CONTEXT, &d)?;
        }
        self.reply(option, wire::REP_ACK, b"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preferred_block_size_is_a_power_of_two_dividing_the_pool_block() {
        assert_eq!(preferred_block_size(65536), 65536);
        assert_eq!(preferred_block_size(3 * 65536), 65536);
        assert_eq!(preferred_block_size(1 << 30), MAX_PAYLOAD);
        assert_eq!(preferred_block_size(0), 512);
    }
}
