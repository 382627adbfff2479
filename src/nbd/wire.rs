//! NBD wire constants and big-endian encoding (the NBD protocol, doc/proto.md).
//!
//! Handshake (server first): `NBDMAGIC` u64, `IHAVEOPT` u64, handshake flags u16.
//! Client: flags u32. Option: `IHAVEOPT` u64, option u32, length u32, data.
//! Option reply: magic `0x3e889045565a9` u64, option u32, reply type u32, length u32, data.
//!
//! Request (28 bytes): magic `0x25609513` u32, flags u16, type u16, cookie u64,
//! offset u64, length u32, then `length` bytes of payload for WRITE.
//!
//! Simple reply (16 bytes): magic `0x67446698` u32, error u32, cookie u64, then data.
//! Structured reply chunk (20 bytes): magic `0x668e33ef` u32, flags u16, type u16,
//! cookie u64, length u32, then payload.
//!
//! The option and command codes are also typed ([`OptionCode`], [`Command`]); a code
//! this server does not know is kept as `Unknown(code)` so the handshake and the
//! transmission phase can answer it per the spec (`NBD_REP_ERR_UNSUP`, `EINVAL`).

use byteorder::{BigEndian as BE, ByteOrder};

/// First 8 bytes the server sends: `NBDMAGIC` in ASCII.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Newstyle handshake magic, also the start of every client option: `IHAVEOPT`.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Start of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Start of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Start of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Start of every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
/// Server handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the 124 zero bytes after EXPORT_NAME may be omitted.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes after EXPORT_NAME.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
/// `NBD_OPT_EXPORT_NAME` (1): choose an export, no reply on failure.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT` (2): end the session.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST` (3): list the exports.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS` (5): upgrade to TLS (refused here).
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO` (6): describe an export.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO` (7): describe an export and start transmission on it.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY` (8): use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT` (9): list the matching metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT` (10): select metadata contexts for block status.
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
/// `NBD_REP_ACK`: the option is done.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`: one export in a LIST reply.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`: one information item in an INFO/GO reply.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`: one metadata context (id, name).
pub const REP_META_CONTEXT: u32 = 4;
/// `NBD_REP_ERR_UNSUP`: the option is unknown to the server.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// `NBD_REP_ERR_POLICY`: the option is forbidden by server policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// `NBD_REP_ERR_INVALID`: the option is malformed or not valid now.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// `NBD_REP_ERR_TLS_REQD`: TLS is required before this option.
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// `NBD_REP_ERR_UNKNOWN`: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// `NBD_REP_ERR_TOO_BIG`: the option payload is too large.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Info types.
/// `NBD_INFO_EXPORT`: size u64 and transmission flags u16.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`: the export's name.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`: the export's description.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block size, u32 each.
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
/// Transmission flag: the flags field is valid (always set).
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: FLUSH is supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the FUA command flag is supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: TRIM is supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: WRITE_ZEROES is supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: the DF (don't fragment) command flag is supported.
pub const TF_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections to one export see each other's flushed writes.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: CACHE is supported.
pub const TF_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: the FAST_ZERO command flag is supported.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands and their flags.
/// `NBD_CMD_READ` (0).
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE` (1): followed by `length` bytes of payload.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC` (2): disconnect, no reply.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH` (3).
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM` (4).
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE` (5).
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES` (6).
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS` (7).
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Command flag: force unit access (the write is durable before the reply).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (WRITE_ZEROES): do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (structured READ): reply in one data chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (BLOCK_STATUS): one extent is enough.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (WRITE_ZEROES): fail rather than zero slowly.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunk types and flags.
/// Chunk flag: the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: offset u64 then data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: offset u64 and length u32 of a run of zeroes.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: context id u32 then (length u32, flags u32) extents.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: error u32 and message length u16.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation status bits.
/// `base:allocation` status: the extent is unallocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` status: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

// Errors.
/// Wire errno: operation not permitted (read-only export).
pub const EPERM: u32 = 1;
/// Wire errno: input/output error.
pub const EIO: u32 = 5;
/// Wire errno: out of memory.
pub const ENOMEM: u32 = 12;
/// Wire errno: invalid request.
pub const EINVAL: u32 = 22;
/// Wire errno: no space left (or a write past the end).
pub const ENOSPC: u32 = 28;
/// Wire errno: structured read larger than the maximum payload.
pub const EOVERFLOW: u32 = 75;
/// Wire errno: not supported.
pub const ENOTSUP: u32 = 95;
/// Wire errno: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// An option code, typed. Codes the server does not recognise are kept as
/// `Unknown(code)` (answered with [`REP_ERR_UNSUP`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionCode {
    /// [`OPT_EXPORT_NAME`].
    ExportName,
    /// [`OPT_ABORT`].
    Abort,
    /// [`OPT_LIST`].
    List,
    /// [`OPT_STARTTLS`].
    StartTls,
    /// [`OPT_INFO`].
    Info,
    /// [`OPT_GO`].
    Go,
    /// [`OPT_STRUCTURED_REPLY`].
    StructuredReply,
    /// [`OPT_LIST_META_CONTEXT`].
    ListMetaContext,
    /// [`OPT_SET_META_CONTEXT`].
    SetMetaContext,
    /// Any other code, as sent.
    Unknown(u32),
}

impl OptionCode {
    /// The typed option for a code from the wire.
    pub fn from_wire(code: u32) -> OptionCode {
        match code {
            OPT_EXPORT_NAME => OptionCode::ExportName,
            OPT_ABORT => OptionCode::Abort,
            OPT_LIST => OptionCode::List,
            OPT_STARTTLS => OptionCode::StartTls,
            OPT_INFO => OptionCode::Info,
            OPT_GO => OptionCode::Go,
            OPT_STRUCTURED_REPLY => OptionCode::StructuredReply,
            OPT_LIST_META_CONTEXT => OptionCode::ListMetaContext,
            OPT_SET_META_CONTEXT => OptionCode::SetMetaContext,
            other => OptionCode::Unknown(other),
        }
    }

    /// The code on the wire (an `Unknown` code is returned as it was received).
    pub fn to_wire(self) -> u32 {
        match self {
            OptionCode::ExportName => OPT_EXPORT_NAME,
            OptionCode::Abort => OPT_ABORT,
            OptionCode::List => OPT_LIST,
            OptionCode::StartTls => OPT_STARTTLS,
            OptionCode::Info => OPT_INFO,
            OptionCode::Go => OPT_GO,
            OptionCode::StructuredReply => OPT_STRUCTURED_REPLY,
            OptionCode::ListMetaContext => OPT_LIST_META_CONTEXT,
            OptionCode::SetMetaContext => OPT_SET_META_CONTEXT,
            OptionCode::Unknown(code) => code,
        }
    }
}

/// A command (request type), typed. Types the server does not recognise are kept
/// as `Unknown(type)` (answered with [`EINVAL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// [`CMD_READ`].
    Read,
    /// [`CMD_WRITE`].
    Write,
    /// [`CMD_DISC`].
    Disc,
    /// [`CMD_FLUSH`].
    Flush,
    /// [`CMD_TRIM`].
    Trim,
    /// [`CMD_CACHE`].
    Cache,
    /// [`CMD_WRITE_ZEROES`].
    WriteZeroes,
    /// [`CMD_BLOCK_STATUS`].
    BlockStatus,
    /// Any other type, as sent.
    Unknown(u16),
}

impl Command {
    /// The typed command for a request type from the wire.
    pub fn from_wire(kind: u16) -> Command {
        match kind {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    /// The request type on the wire (an `Unknown` type is returned as it was received).
    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Unknown(kind) => kind,
        }
    }
}

/// Size of a request header.
pub const REQUEST_SIZE: usize = 28;

/// A request header as it is on the wire (clients and tests build these with a raw
/// `kind`, which may be any code); [`Request::command`] gives the typed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// The command (unknown types kept as [`Command::Unknown`]).
    pub command: Command,
    /// Opaque client cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes (of the payload for WRITE, of the range otherwise).
    pub length: u32,
}

/// Parse a request header; `None` for a wrong magic.
pub fn parse_request(b: &[u8; REQUEST_SIZE]) -> Option<Request> {
    if BE::read_u32(&b[0..]) != REQUEST_MAGIC {
        return None;
    }
    Some(Request {
        flags: BE::read_u16(&b[4..]),
        command: Command::from_wire(BE::read_u16(&b[6..])),
        cookie: BE::read_u64(&b[8..]),
        offset: BE::read_u64(&b[16..]),
        length: BE::read_u32(&b[24..]),
    })
}

/// Encode a request header (for tests and clients).
pub fn encode_request(r: &Request) -> [u8; REQUEST_SIZE] {
    let mut b = [0u8; REQUEST_SIZE];
    BE::write_u32(&mut b[0..], REQUEST_MAGIC);
    BE::write_u16(&mut b[4..], r.flags);
    BE::write_u16(&mut b[6..], r.command.to_wire());
    BE::write_u64(&mut b[8..], r.cookie);
    BE::write_u64(&mut b[16..], r.offset);
    BE::write_u32(&mut b[24..], r.length);
    b
}

/// A simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    BE::write_u32(&mut b[0..], SIMPLE_REPLY_MAGIC);
    BE::write_u32(&mut b[4..], error);
    BE::write_u64(&mut b[8..], cookie);
    b
}

/// A structured reply chunk header.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    BE::write_u32(&mut b[0..], STRUCTURED_REPLY_MAGIC);
    BE::write_u16(&mut b[4..], flags);
    BE::write_u16(&mut b[6..], kind);
    BE::write_u64(&mut b[8..], cookie);
    BE::write_u32(&mut b[16..], length);
    b
}

/// The payload of a BLOCK_STATUS reply chunk for one metadata context:
///
/// | bytes | field |
/// |---|---|
/// | 0..4 | context id |
/// | then 8 per extent | length (u32), status flags (u32) |
///
/// `extents` are (length, flags) in order from the request's offset. At most
/// `max_extents` (only the first with `one`, NBD_CMD_FLAG_REQ_ONE) are encoded; no
/// length reaches 4 GiB (each is cut to a multiple of 512 below it) and together
/// they never cover more than `total`. `None` when no extent could be encoded.
pub fn block_status_payload(
    context_id: u32,
    extents: impl IntoIterator<Item = (u64, u32)>,
    total: u64,
    max_extents: usize,
    one: bool,
) -> Option<Vec<u8>> {
    let mut payload = context_id.to_be_bytes().to_vec();
    let mut covered = 0u64;
    for (length, flags) in extents {
        if covered >= total || payload.len() >= 4 + 8 * max_extents {
            break;
        }
        let len = length.min(total - covered).min(u32::MAX as u64 & !511);
        if len == 0 {
            break;
        }
        payload.extend_from_slice(&(len as u32).to_be_bytes());
        payload.extend_from_slice(&flags.to_be_bytes());
        covered += len;
        if one {
            break;
        }
    }
    (payload.len() > 4).then_some(payload)
}

/// An option reply header.
pub fn option_reply(option: u32, kind: u32, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    BE::write_u64(&mut b[0..], OPT_REPLY_MAGIC);
    BE::write_u32(&mut b[8..], option);
    BE::write_u32(&mut b[12..], kind);
    BE::write_u32(&mut b[16..], length);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_round_trips_in_network_byte_order() {
        let r = Request { flags: 1, command: Command::Write, cookie: 0x0102_0304_0506_0708, offset: 4096, length: 512 };
        let b = encode_request(&r);
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(parse_request(&b), Some(r));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(parse_request(&bad), None);
    }

    #[test]
    fn commands_round_trip_and_unknown_ones_keep_their_code() {
        for kind in 0..=u16::MAX {
            assert_eq!(Command::from_wire(kind).to_wire(), kind);
        }
        use Command::*;
        for c in [Read, Write, Disc, Flush, Trim, Cache, WriteZeroes, BlockStatus, Unknown(99)] {
            assert_eq!(Command::from_wire(c.to_wire()), c);
        }
        assert_eq!(Command::from_wire(CMD_BLOCK_STATUS), Command::BlockStatus);
        assert_eq!(Command::from_wire(99), Command::Unknown(99));
        let r = Request { flags: 0, command: Command::WriteZeroes, cookie: 0, offset: 0, length: 0 };
        assert_eq!(r.command, Command::WriteZeroes);
    }

    #[test]
    fn options_round_trip_and_unknown_ones_keep_their_code() {
        for code in (0..64).chain([0xdead, u32::MAX]) {
            assert_eq!(OptionCode::from_wire(code).to_wire(), code);
        }
        use OptionCode::*;
        let known =
            [ExportName, Abort, List, StartTls, Info, Go, StructuredReply, ListMetaContext, SetMetaContext, Unknown(4)];
        for o in known {
            assert_eq!(OptionCode::from_wire(o.to_wire()), o);
        }
        assert_eq!(OptionCode::from_wire(OPT_GO), OptionCode::Go);
        assert_eq!(OptionCode::from_wire(4), OptionCode::Unknown(4));
        assert_eq!(OptionCode::from_wire(0xdead), OptionCode::Unknown(0xdead));
    }

    #[test]
    fn reply_headers_carry_their_magics() {
        assert_eq!(&simple_reply(EINVAL, 7)[..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22]);
        assert_eq!(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, 0)[..6], &[0x66, 0x8e, 0x33, 0xef, 0, 1]);
        assert_eq!(&option_reply(OPT_GO, REP_ACK, 0)[..8], &OPT_REPLY_MAGIC.to_be_bytes());
    }
}
