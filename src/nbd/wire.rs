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

use byteorder::{BigEndian as BE, ByteOrder};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands and their flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation status bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// Errors.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Size of a request header.
pub const REQUEST_SIZE: usize = 28;

/// A parsed request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Parse a request header; `None` for a wrong magic.
pub fn parse_request(b: &[u8; REQUEST_SIZE]) -> Option<Request> {
    if BE::read_u32(&b[0..]) != REQUEST_MAGIC {
        return None;
    }
    Some(Request {
        flags: BE::read_u16(&b[4..]),
        kind: BE::read_u16(&b[6..]),
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
    BE::write_u16(&mut b[6..], r.kind);
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
        let r = Request { flags: 1, kind: CMD_WRITE, cookie: 0x0102_0304_0506_0708, offset: 4096, length: 512 };
        let b = encode_request(&r);
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(parse_request(&b), Some(r));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(parse_request(&bad), None);
    }

    #[test]
    fn reply_headers_carry_their_magics() {
        assert_eq!(&simple_reply(EINVAL, 7)[..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22]);
        assert_eq!(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, 0)[..6], &[0x66, 0x8e, 0x33, 0xef, 0, 1]);
        assert_eq!(&option_reply(OPT_GO, REP_ACK, 0)[..8], &OPT_REPLY_MAGIC.to_be_bytes());
    }
}
