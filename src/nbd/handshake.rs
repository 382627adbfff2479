//! The handshake: fixed newstyle greeting, then option haggling until the client
//! chooses an export (EXPORT_NAME or GO), aborts, or goes away.
//!
//! This module does no I/O: the connection driver frames each message (the client
//! flags, then each option, its length checked against the limits first) and hands
//! it to [`Negotiation`], which appends its replies to a buffer. Each option is
//! parsed into its typed [`OptionCode`] and answered by one small function; the state
//! the options build up (structured replies, `base:allocation`) lives in
//! [`Negotiation`], and the agreed result is a [`Session`] for the transmission phase.
//!
//! An export opened for INFO or GO is held by an [`Attachment`], a guard that gives
//! it back to the catalog ([`Catalog::close`]) when dropped: on every exit path,
//! including a client that resets while the replies are being written.

use std::io;
use std::sync::Arc;

use byteorder::{BigEndian as BE, ByteOrder};

use super::contexts::{self, Selected};
use super::export::{Catalog, Export};
use super::server::MAX_PAYLOAD;
use super::tls::TlsMode;
use super::wire::{self, OptionCode};

/// Largest option payload read into memory.
pub(super) const MAX_OPTION: u32 = 64 << 10;
/// Option payloads above this are not even skipped: the client is dropped.
pub(super) const MAX_OPTION_SKIP: u32 = 16 << 20;
/// Most metadata context queries in one LIST/SET_META_CONTEXT.
const MAX_QUERIES: u32 = 1024;
/// Longest export name or context query accepted inside INFO/GO/META_CONTEXT.
const MAX_STRING: u32 = 4096;
/// Context id of `base:allocation`.
pub(super) const CTX_BASE_ALLOCATION: u32 = 1;

/// A catalog shared by the server's threads, or borrowed by a one-connection driver.
#[derive(Clone)]
pub(super) enum CatalogRef<'c> {
    /// Owned by the server.
    Shared(Arc<dyn Catalog>),
    /// Borrowed for the life of one connection.
    Borrowed(&'c dyn Catalog),
}

impl CatalogRef<'_> {
    fn get(&self) -> &dyn Catalog {
        match self {
            CatalogRef::Shared(c) => c.as_ref(),
            CatalogRef::Borrowed(c) => *c,
        }
    }
}

/// An export opened from the catalog; dropping it closes it ([`Catalog::close`]).
pub(super) struct Attachment<'c> {
    export: Arc<dyn Export>,
    name: String,
    catalog: CatalogRef<'c>,
}

impl Drop for Attachment<'_> {
    fn drop(&mut self) {
        self.catalog.get().close(&self.name);
    }
}

/// What option haggling agreed on.
pub(super) struct Session<'c> {
    /// The chosen export, closed when the session is dropped.
    attachment: Attachment<'c>,
    /// Structured replies were negotiated.
    pub(super) structured: bool,
    /// `base:allocation` was selected with SET_META_CONTEXT.
    pub(super) base_allocation: bool,
    /// Writes are refused (server setting or export).
    pub(super) read_only: bool,
    /// Other metadata contexts selected with SET_META_CONTEXT.
    pub(super) contexts: Vec<Selected>,
}

impl Session<'_> {
    /// The chosen export.
    pub(super) fn export(&self) -> &dyn Export {
        self.attachment.export.as_ref()
    }
}

/// The server's greeting (fixed newstyle, NO_ZEROES offered).
pub(super) fn greeting() -> [u8; 18] {
    let mut hello = [0u8; 18];
    BE::write_u64(&mut hello[0..], wire::NBDMAGIC);
    BE::write_u64(&mut hello[8..], wire::IHAVEOPT);
    BE::write_u16(&mut hello[16..], wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES);
    hello
}

/// How to read an option's payload, from its 16-byte header.
pub(super) enum Frame {
    /// Read this many payload bytes, then [`Negotiation::handle`] the option.
    Read(OptionCode, u32),
    /// Discard this many bytes, then answer [`Negotiation::too_big`].
    Skip(OptionCode, u32),
}

/// Parse an option header and apply the size limits: an oversized payload is
/// skipped (and answered with ERR_TOO_BIG), or drops the client when it is too
/// large even to skip.
pub(super) fn option_frame(head: &[u8; 16]) -> io::Result<Frame> {
    if BE::read_u64(&head[0..]) != wire::IHAVEOPT {
        return Err(invalid_data("bad option magic"));
    }
    let option = OptionCode::from_wire(BE::read_u32(&head[8..]));
    let len = BE::read_u32(&head[12..]);
    if len > MAX_OPTION {
        if len > MAX_OPTION_SKIP || option == OptionCode::ExportName {
            return Err(invalid_data("option too large"));
        }
        return Ok(Frame::Skip(option, len));
    }
    Ok(Frame::Read(option, len))
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

/// The payload of LIST/SET_META_CONTEXT: export name, then the queries.
/// `None` when malformed or with more than [`MAX_QUERIES`] queries.
fn parse_meta_context_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut c = Cursor(data);
    let n = c.u32()?;
    let export = c.string(n)?;
    let k = c.u32()?;
    let mut queries = Vec::new();
    for _ in 0..k.min(MAX_QUERIES) {
        let l = c.u32()?;
        queries.push(c.string(l)?);
    }
    (c.0.is_empty() && k <= MAX_QUERIES).then_some((export, queries))
}

/// What to do after an option.
pub(super) enum Step<'c> {
    /// Keep haggling.
    Next,
    /// Start transmission.
    Serve(Session<'c>),
    /// The client aborted, or was refused and is to be closed.
    Abort,
    /// STARTTLS was acknowledged: start TLS, then call [`Negotiation::tls_started`].
    StartTls,
}

/// The state of option haggling on one connection.
pub(super) struct Negotiation<'c> {
    catalog: CatalogRef<'c>,
    /// The server refuses writes on every export.
    read_only: bool,
    /// The client asked for no zero padding after EXPORT_NAME.
    no_zeroes: bool,
    structured: bool,
    base_allocation: bool,
    /// Other contexts selected with SET_META_CONTEXT.
    contexts: Vec<Selected>,
    /// Every option is refused with this message (the server is over its
    /// connection limit, or shutting down) and this error.
    refuse: Option<(u32, String)>,
    /// TLS offered or required.
    tls_mode: TlsMode,
    /// TLS is running on this connection.
    tls_active: bool,
}

impl<'c> Negotiation<'c> {
    /// After the greeting: `client_flags` are the 4 bytes the client sent first.
    pub(super) fn new(catalog: CatalogRef<'c>, read_only: bool, client_flags: u32) -> io::Result<Negotiation<'c>> {
        if client_flags & !(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES) != 0 {
            return Err(invalid_data("unknown client flags"));
        }
        Ok(Negotiation {
            catalog,
            read_only,
            no_zeroes: client_flags & wire::FLAG_C_NO_ZEROES != 0,
            structured: false,
            base_allocation: false,
            contexts: Vec::new(),
            refuse: None,
            tls_mode: TlsMode::Off,
            tls_active: false,
        })
    }

    /// Answer every option from now on with `error` (`REP_ERR_POLICY` or
    /// `REP_ERR_SHUTDOWN`) and `message`: ABORT is acknowledged, EXPORT_NAME (which
    /// has no error reply) closes the connection.
    pub(super) fn refuse_all(&mut self, error: u32, message: String) {
        self.refuse = Some((error, message));
    }

    fn reply(&self, out: &mut Vec<u8>, option: OptionCode, kind: u32, data: &[u8]) {
        out.extend_from_slice(&wire::option_reply(option.to_wire(), kind, data.len() as u32));
        out.extend_from_slice(data);
    }

    /// The answer to an option whose payload was too large and was skipped.
    pub(super) fn too_big(&self, option: OptionCode, out: &mut Vec<u8>) {
        self.reply(out, option, wire::REP_ERR_TOO_BIG, b"");
    }

    /// Handle one option with its payload; replies are appended to `out`.
    pub(super) fn handle(&mut self, option: OptionCode, data: &[u8], out: &mut Vec<u8>) -> io::Result<Step<'c>> {
        if let Some((error, message)) = &self.refuse {
            return match option {
                OptionCode::Abort => {
                    self.reply(out, option, wire::REP_ACK, b"");
                    Ok(Step::Abort)
                }
                OptionCode::ExportName => Err(io::Error::other(message.clone())),
                _ => {
                    self.reply(out, option, *error, message.as_bytes());
                    Ok(Step::Next)
                }
            };
        }
        if let Some(step) = self.tls_option(option, data, out) {
            return step;
        }
        match option {
            OptionCode::ExportName => self.export_name(data, out),
            OptionCode::Abort => {
                self.reply(out, option, wire::REP_ACK, b"");
                Ok(Step::Abort)
            }
            OptionCode::List => {
                self.list(data, out);
                Ok(Step::Next)
            }
            OptionCode::StructuredReply => {
                self.structured_reply(data, out);
                Ok(Step::Next)
            }
            OptionCode::Info | OptionCode::Go => Ok(self.info_or_go(option, data, out)),
            OptionCode::ListMetaContext | OptionCode::SetMetaContext => {
                self.meta_context(option, data, out);
                Ok(Step::Next)
            }
            OptionCode::StartTls => {
                self.reply(out, option, wire::REP_ERR_POLICY, b"TLS is not offered");
                Ok(Step::Next)
            }
            OptionCode::Unknown(_) => {
                self.reply(out, option, wire::REP_ERR_UNSUP, b"");
                Ok(Step::Next)
            }
        }
    }

    /// Offer (or require) TLS on this connection.
    pub(super) fn set_tls(&mut self, mode: TlsMode) {
        self.tls_mode = mode;
    }

    /// TLS is up: what was negotiated before it is forgotten (the spec's rule, so
    /// that nothing agreed in plain text survives into the TLS session).
    pub(super) fn tls_started(&mut self) {
        self.tls_active = true;
        self.structured = false;
        self.base_allocation = false;
        self.contexts.clear();
    }

    /// STARTTLS when TLS is offered, and the spec's FORCEDTLS rules when it is
    /// required: before TLS, every option but STARTTLS and ABORT gets
    /// `NBD_REP_ERR_TLS_REQD`, and EXPORT_NAME (which has no error reply) closes.
    /// `None`: the option is handled as usual.
    fn tls_option(&mut self, option: OptionCode, data: &[u8], out: &mut Vec<u8>) -> Option<io::Result<Step<'c>>> {
        if self.tls_mode == TlsMode::Off {
            return None;
        }
        match option {
            OptionCode::StartTls if self.tls_active => {
                self.reply(out, option, wire::REP_ERR_INVALID, b"TLS is already running");
                Some(Ok(Step::Next))
            }
            OptionCode::StartTls if !data.is_empty() => {
                self.reply(out, option, wire::REP_ERR_INVALID, b"STARTTLS takes no data");
                Some(Ok(Step::Next))
            }
            OptionCode::StartTls => {
                self.reply(out, option, wire::REP_ACK, b"");
                Some(Ok(Step::StartTls))
            }
            _ if self.tls_active || self.tls_mode != TlsMode::Require || option == OptionCode::Abort => None,
            OptionCode::ExportName => Some(Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "TLS is required: the client chose an export without STARTTLS",
            ))),
            _ => {
                self.reply(
                    out,
                    option,
                    wire::REP_ERR_TLS_REQD,
                    b"this server requires TLS: send NBD_OPT_STARTTLS first",
                );
                Some(Ok(Step::Next))
            }
        }
    }

    /// Open `name`, held by a guard from this point on.
    fn open(&self, name: &str) -> Option<Attachment<'c>> {
        let export = self.catalog.get().open(name)?;
        Some(Attachment { export, name: name.to_string(), catalog: self.catalog.clone() })
    }

    /// EXPORT_NAME: the old way to choose an export; an unknown name drops the client
    /// (this option has no error reply).
    fn export_name(&self, data: &[u8], out: &mut Vec<u8>) -> io::Result<Step<'c>> {
        let name = String::from_utf8_lossy(data).into_owned();
        let Some(attachment) = self.open(&name) else {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("no export named {name:?}")));
        };
        let export = attachment.export.as_ref();
        let flags = transmission_flags(export, self.read_only, false);
        let mut reply = vec![0u8; 10];
        BE::write_u64(&mut reply[0..], export.size());
        BE::write_u16(&mut reply[8..], flags);
        if !self.no_zeroes {
            reply.extend_from_slice(&[0u8; 124]);
        }
        out.extend_from_slice(&reply);
        let read_only = self.read_only || export.read_only();
        Ok(Step::Serve(Session {
            attachment,
            structured: false,
            base_allocation: false,
            read_only,
            contexts: Vec::new(),
        }))
    }

    /// LIST: one REP_SERVER per export, then ACK.
    fn list(&self, data: &[u8], out: &mut Vec<u8>) {
        let option = OptionCode::List;
        if !data.is_empty() {
            return self.reply(out, option, wire::REP_ERR_INVALID, b"");
        }
        for (name, _) in self.catalog.get().list() {
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            self.reply(out, option, wire::REP_SERVER, &d);
        }
        self.reply(out, option, wire::REP_ACK, b"")
    }

    /// STRUCTURED_REPLY: takes no payload.
    fn structured_reply(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let option = OptionCode::StructuredReply;
        if !data.is_empty() {
            return self.reply(out, option, wire::REP_ERR_INVALID, b"");
        }
        self.structured = true;
        self.reply(out, option, wire::REP_ACK, b"")
    }

    /// INFO and GO: describe the export (INFO_EXPORT, INFO_BLOCK_SIZE, then the
    /// NAME/DESCRIPTION items asked for); GO then starts transmission on it. For
    /// INFO the export is closed again when its guard drops at the end.
    fn info_or_go(&self, option: OptionCode, data: &[u8], out: &mut Vec<u8>) -> Step<'c> {
        let Some((name, infos)) = parse_info_request(data) else {
            self.reply(out, option, wire::REP_ERR_INVALID, b"");
            return Step::Next;
        };
        let Some(attachment) = self.open(&name) else {
            self.reply(out, option, wire::REP_ERR_UNKNOWN, format!("no export named {name:?}").as_bytes());
            return Step::Next;
        };
        let export = attachment.export.as_ref();
        let flags = transmission_flags(export, self.read_only, self.structured);
        let mut info = vec![0u8; 12];
        BE::write_u16(&mut info[0..], wire::INFO_EXPORT);
        BE::write_u64(&mut info[2..], export.size());
        BE::write_u16(&mut info[10..], flags);
        self.reply(out, option, wire::REP_INFO, &info);
        let mut bs = vec![0u8; 14];
        BE::write_u16(&mut bs[0..], wire::INFO_BLOCK_SIZE);
        BE::write_u32(&mut bs[2..], 1);
        BE::write_u32(&mut bs[6..], preferred_block_size(export.preferred_block_size()));
        BE::write_u32(&mut bs[10..], MAX_PAYLOAD);
        self.reply(out, option, wire::REP_INFO, &bs);
        for i in infos {
            let Some(d) = self.info_item(i, &name) else { continue };
            self.reply(out, option, wire::REP_INFO, &d);
        }
        self.reply(out, option, wire::REP_ACK, b"");
        if option == OptionCode::Go {
            let read_only = self.read_only || export.read_only();
            return Step::Serve(Session {
                attachment,
                structured: self.structured,
                base_allocation: self.base_allocation,
                read_only,
                contexts: self.contexts.clone(),
            });
        }
        Step::Next
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
                    self.catalog.get().list().into_iter().find(|(n, _)| *n == name).map(|(_, d)| d).unwrap_or_default();
                d.extend_from_slice(&wire::INFO_DESCRIPTION.to_be_bytes());
                d.extend_from_slice(desc.as_bytes());
            }
            _ => return None,
        }
        Some(d)
    }

    /// LIST_META_CONTEXT and SET_META_CONTEXT: `base:allocation`, and the contexts
    /// the catalog offers for the export named in the request (see `contexts.rs`);
    /// SET needs structured replies first.
    fn meta_context(&mut self, option: OptionCode, data: &[u8], out: &mut Vec<u8>) {
        let set = option == OptionCode::SetMetaContext;
        if set && !self.structured {
            return self.reply(out, option, wire::REP_ERR_INVALID, b"negotiate structured replies first");
        }
        let Some((export, queries)) = parse_meta_context_request(data) else {
            return self.reply(out, option, wire::REP_ERR_INVALID, b"");
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
            // LIST replies carry the reserved id 0 (the spec: clients disregard it).
            let id = if set { CTX_BASE_ALLOCATION } else { 0 };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(b"base:allocation");
            self.reply(out, option, wire::REP_META_CONTEXT, &d);
        }
        let found = contexts::matching(self.catalog.get(), &export, &queries, set);
        let listed: Vec<(u32, String)> = if set {
            self.contexts = contexts::select(found);
            self.contexts.iter().map(|c| (c.id, c.name.clone())).collect()
        } else {
            found.into_iter().map(|(name, _)| (0, name)).collect()
        };
        for (id, name) in listed {
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            self.reply(out, option, wire::REP_META_CONTEXT, &d);
        }
        self.reply(out, option, wire::REP_ACK, b"")
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
