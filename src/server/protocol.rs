//! The typed protocol of the control socket (`DIR/control.sock`), shared by the
//! server and `thinctl`.
//!
//! One connection carries one exchange: the client sends one JSON line, a
//! [`RequestLine`] (`{"version": 1, "request": {"op": "ls"}}`), and the server answers
//! with one JSON line, a [`ResponseLine`] (`{"version": 1, "response": {"result":
//! "listing", ...}}`), then closes. Lines are at most [`MAX_LINE`] bytes.
//!
//! - Changes are [`PoolChange`]s, the typed changes `thinctl` applies to a pool
//!   that is not served: `{"op": "change", "change": {"op": "create", "name": "web",
//!   "size_bytes": 1048576, "id": null}}`.
//! - Replies carry data, never text: a [`ChangeOutcome`], a [`Listing`] or a
//!   [`PoolStatus`]; `thinctl` words them exactly as it does for a pool it opened
//!   itself.
//! - Every failure is a [`ControlError`] with an [`ErrorKind`]: a request that is
//!   not JSON, too long, of an unknown `op`, or of a version the server does not
//!   speak gets one too (kind [`ErrorKind::BadRequest`] or
//!   [`ErrorKind::UnsupportedVersion`]); the server never drops the connection
//!   without an answer unless the client stops talking.
//!
//! Streaming requests (version 2): `send` and `receive` carry a replication stream
//! ([`crate::stream::format`]) on the same connection after their lines.
//!
//! - `send`: the server answers `{"result": "ready"}` (or an error line), then the
//!   stream in frames, each a u32 little-endian length (1..=[`MAX_FRAME`]) and that
//!   many bytes; a frame of length 0 ends the stream and is followed by one more
//!   reply line, [`Response::Sent`] or an error (the frames before it then do not
//!   hold a whole stream). The server takes hidden snapshots at one instant and
//!   streams from them, so clients keep writing meanwhile.
//! - `receive`: the server answers `{"result": "ready"}` (or an error line); only
//!   then does the client send the raw stream, and half-closes the connection at
//!   its end. The server answers [`Response::Received`] or an error; on an error
//!   (a damaged or cut-off stream, a wrong base, a full pool) nothing was changed.
//!   The client stops sending when the server closes early, and reads the answer.
//!
//! Growth: a client sends the version it speaks; a server answers requests of any
//! version up to its own [`PROTOCOL_VERSION`] and refuses newer ones with
//! `UnsupportedVersion`, saying which version it speaks. Fields may be added to
//! replies (readers ignore unknown fields); new requests come with a new version.

use serde::{Deserialize, Serialize};

use crate::thin::DevId;
use crate::volume::{ChangeOutcome, PoolChange};

/// The protocol version this build speaks (3: `attach`, `detach`, `local_devices`).
pub const PROTOCOL_VERSION: u32 = 3;

/// Longest line (request or reply), newline included.
pub const MAX_LINE: usize = 64 * 1024;

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Apply a change (create, snapshot, delete, discard, resize); answered with
    /// [`Response::Changed`]. Deleting a device a client has attached is refused
    /// ([`ErrorKind::Attached`]), atomically with the delete.
    Change {
        /// The change.
        change: PoolChange,
    },
    /// List the devices with their usage; answered with [`Response::Listing`]
    /// (serde ignores other fields of a variant without fields, here and in `Status`).
    Ls,
    /// The pool's status; answered with [`Response::Status`].
    Status,
    /// The runs where device `to` differs from device `from`, taken at one
    /// instant; answered with [`Response::Diff`].
    Diff {
        /// The left device (typically the older snapshot).
        from: String,
        /// The right device.
        to: String,
        /// List `same` runs too.
        #[serde(default)]
        include_same: bool,
    },
    /// Make `device`'s contents `snapshot`'s in O(1); refused while a client has
    /// `device` attached ([`ErrorKind::Attached`]); answered with
    /// [`Response::RolledBack`].
    Rollback {
        /// The device to roll back.
        device: String,
        /// The snapshot whose contents it takes.
        snapshot: String,
    },
    /// Stream device `name` (and the changes since `from`) as a replication stream
    /// (since version 2): answered with [`Response::Ready`], then the stream in
    /// frames, then [`Response::Sent`] or an error (see the module documentation).
    Send {
        /// The device to send.
        name: String,
        /// The base of an incremental stream.
        from: Option<String>,
    },
    /// Receive a replication stream as new device `name` (since version 2):
    /// answered with [`Response::Ready`], after which the client sends the stream and
    /// half-closes; then [`Response::Received`] or an error.
    Receive {
        /// The new device's name.
        name: String,
    },
    /// Attach device `name` as a local block device (ublk, `/dev/ublkbN`; since
    /// version 3); answered with [`Response::Attached`]. The device counts as
    /// attached (so it cannot be deleted) until it is detached.
    Attach {
        /// The device.
        name: String,
        /// The kernel sees a read-only disk and writes are refused.
        #[serde(default)]
        read_only: bool,
    },
    /// Remove the local block device of `name` (since version 3); answered with
    /// [`Response::Detached`].
    Detach {
        /// The device.
        name: String,
    },
    /// The local block devices attached now (since version 3); answered with
    /// [`Response::LocalDevices`].
    LocalDevices,
}

impl Request {
    /// Does this request stream bytes after its line (send, receive)?
    pub fn is_streaming(&self) -> bool {
        matches!(self, Request::Send { .. } | Request::Receive { .. })
    }
}

/// What the server answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// The change was applied (committed and saved).
    Changed {
        /// What it did.
        outcome: ChangeOutcome,
        /// The pool's data block size in bytes (to word the outcome).
        block_bytes: u64,
    },
    /// The devices.
    Listing {
        /// The devices with their usage.
        listing: Listing,
    },
    /// The pool's status.
    Status {
        /// The numbers.
        status: PoolStatus,
    },
    /// The diff of two devices.
    Diff {
        /// The runs.
        diff: crate::server::diff::DiffReport,
    },
    /// A rollback was done (committed and saved).
    RolledBack {
        /// What it did.
        outcome: crate::server::rollback::RollbackOutcome,
        /// The pool's data block size in bytes.
        block_bytes: u64,
    },
    /// A streaming request was accepted: the stream follows (send) or may be sent
    /// (receive).
    Ready,
    /// A send finished: every frame was sent.
    Sent {
        /// What was sent.
        report: crate::stream::StreamReport,
    },
    /// A receive finished: the device exists, committed and named.
    Received {
        /// What was received.
        report: crate::stream::StreamReport,
    },
    /// A local block device was attached.
    Attached {
        /// Where it is.
        device: crate::server::local::LocalDevice,
    },
    /// A local block device was removed.
    Detached {
        /// What was removed.
        device: crate::server::local::LocalDevice,
    },
    /// The local block devices attached now.
    LocalDevices {
        /// The devices, ordered by name.
        devices: Vec<crate::server::local::LocalDevice>,
    },
    /// The request failed; nothing it would have changed was changed.
    Error {
        /// Why.
        error: ControlError,
    },
}

/// A request line: the request and the protocol version the client speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestLine {
    /// The client's protocol version.
    pub version: u32,
    /// The request.
    pub request: Request,
}

/// A reply line: the response and the protocol version the server speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseLine {
    /// The server's protocol version.
    pub version: u32,
    /// The response.
    pub response: Response,
}

/// Why a control request failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    /// What kind of failure, for callers that act on it.
    pub kind: ErrorKind,
    /// The message, worded for a user (no `error:` prefix).
    pub message: String,
}

impl ControlError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ControlError {
        ControlError { kind, message: message.into() }
    }
}

/// Kinds of [`ControlError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The line was not a request: not JSON, too long, an unknown `op` or field.
    BadRequest,
    /// The client speaks a newer protocol than the server.
    UnsupportedVersion,
    /// The server is busy (too many control clients at once); try again.
    Busy,
    /// The pool is served read-only, or cannot be changed.
    ReadOnly,
    /// No device has that name.
    NoSuchDevice,
    /// A client has the device attached, so it cannot be deleted.
    Attached,
    /// The pool's data space is full.
    NoSpace,
    /// The metadata is damaged.
    Corrupt,
    /// Any other failure of the request.
    Failed,
}

/// One device and what it uses, as `thinctl ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceUsage {
    /// The device's name.
    pub name: String,
    /// Its thin device id.
    pub id: DevId,
    /// Its virtual size in bytes.
    pub size_bytes: u64,
    /// Creation time (unix seconds), when known.
    pub creation_time: Option<u64>,
    /// The origin's name, for a snapshot whose origin still exists.
    pub snapshot_of: Option<String>,
    /// Mapped blocks.
    pub mapped_blocks: u64,
    /// Mapped blocks that no other device maps.
    pub exclusive_blocks: u64,
    /// dm-thin's creation time of the device (the pool's time counter).
    pub thin_creation_time: u32,
    /// dm-thin's time of the device's last snapshot.
    pub thin_snapshot_time: u32,
    /// dm-thin's transaction id of the device.
    pub thin_transaction_id: u64,
}

/// The devices of a pool, ordered by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// Data block size in bytes.
    pub block_bytes: u64,
    /// The devices.
    pub devices: Vec<DeviceUsage>,
}

/// The mode of a pool, as `dmsetup status` reports a thin-pool's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolMode {
    /// Read-write.
    Rw,
    /// Read-only (by option, by a needs-check flag, or files not writable).
    Ro,
    /// Every data block is in use.
    OutOfDataSpace,
    /// Free metadata is down to the reserve.
    OutOfMetadataSpace,
    /// A metadata write failed; nothing more is accepted until the pool reopens.
    Fail,
}

impl PoolMode {
    /// The mode as `status` prints it: `rw`, `ro`, `out-of-data-space`,
    /// `out-of-metadata-space`, `fail`.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Rw => "rw",
            PoolMode::Ro => "ro",
            PoolMode::OutOfDataSpace => "out-of-data-space",
            PoolMode::OutOfMetadataSpace => "out-of-metadata-space",
            PoolMode::Fail => "fail",
        }
    }
}

impl From<crate::thin::PoolMode> for PoolMode {
    fn from(m: crate::thin::PoolMode) -> Self {
        use crate::thin::PoolMode as E;
        match m {
            E::ReadWrite => PoolMode::Rw,
            E::ReadOnly => PoolMode::Ro,
            E::OutOfDataSpace => PoolMode::OutOfDataSpace,
            E::OutOfMetadataSpace => PoolMode::OutOfMetadataSpace,
            E::Fail => PoolMode::Fail,
        }
    }
}

/// The status of an open pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// The mode.
    pub mode: PoolMode,
    /// The metadata's transaction id.
    pub transaction_id: u64,
    /// Metadata blocks in use.
    pub metadata_used_blocks: u64,
    /// Metadata blocks in all.
    pub metadata_total_blocks: u64,
    /// Data blocks in use.
    pub data_used_blocks: u64,
    /// Data blocks in all.
    pub data_total_blocks: u64,
    /// Data block size in bytes.
    pub data_block_size_bytes: u64,
    /// The held metadata snapshot's block, when one is held.
    pub held_root: Option<u64>,
    /// The needs-check flag.
    pub needs_check: bool,
    /// The pool's time counter.
    pub time: u32,
    /// Number of thin devices in the metadata.
    pub devices: usize,
    /// Why the pool is in its mode (none for `rw`).
    #[serde(default)]
    pub reason: Option<String>,
    /// Metadata blocks kept in reserve (free metadata at or below it is
    /// `out-of-metadata-space`).
    #[serde(default)]
    pub metadata_reserve_blocks: u64,
    /// Thresholds, autoextend and no-space policy in force (a served pool's
    /// include its `thinctl serve` flags).
    #[serde(default)]
    pub health: crate::volume::HealthOptions,
    /// The thresholds use is at or above now: `data`, `metadata`.
    #[serde(default)]
    pub thresholds_crossed: Vec<String>,
}

/// Largest frame of a streamed send.
pub const MAX_FRAME: u32 = 1 << 20;

/// The JSON line (with its newline) of `value`.
pub fn encode<T: Serialize>(value: &T) -> String {
    // These types hold only strings, numbers and enums: serialising cannot fail.
    let mut s = serde_json::to_string(value).unwrap_or_else(|e| {
        format!(r#"{{"version":{PROTOCOL_VERSION},"response":{{"result":"error","error":{{"kind":"failed","message":"cannot encode: {e}"}}}}}}"#)
    });
    s.push('\n');
    s
}

/// Decode a request line as the server does: a typed error for anything that is
/// not a request this server can answer.
pub fn decode_request(line: &[u8]) -> Result<Request, ControlError> {
    if line.len() > MAX_LINE {
        return Err(ControlError::new(ErrorKind::BadRequest, format!("control request longer than {MAX_LINE} bytes")));
    }
    // Look at the version first, so a newer client gets told so rather than
    // "unknown op".
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let v: Version = serde_json::from_slice(line)
        .map_err(|e| ControlError::new(ErrorKind::BadRequest, format!("bad control request: {e}")))?;
    if v.version > PROTOCOL_VERSION || v.version == 0 {
        return Err(ControlError::new(
            ErrorKind::UnsupportedVersion,
            format!(
                "control protocol version {} is not supported: this server speaks version {PROTOCOL_VERSION}",
                v.version
            ),
        ));
    }
    serde_json::from_slice::<RequestLine>(line)
        .map(|r| r.request)
        .map_err(|e| ControlError::new(ErrorKind::BadRequest, format!("bad control request: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug>(v: T) {
        let line = encode(&v);
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'), "one line: {line}");
        assert_eq!(serde_json::from_str::<T>(&line).expect("decode"), v);
    }

    #[test]
    fn every_request_and_response_round_trips() {
        let changes = [
            PoolChange::Create { name: "web".into(), size_bytes: 1 << 20, id: Some(3) },
            PoolChange::Snapshot { origin: "web".into(), name: "s".into(), id: None },
            PoolChange::Delete { name: "web".into() },
            PoolChange::Discard { name: "web".into(), offset: Some(0), length: None },
            PoolChange::Resize { name: "web".into(), size_bytes: 4096 },
        ];
        let mut requests: Vec<Request> = changes.into_iter().map(|change| Request::Change { change }).collect();
        requests.extend([Request::Ls, Request::Status]);
        requests.extend([
            Request::Attach { name: "web".into(), read_only: true },
            Request::Detach { name: "web".into() },
            Request::LocalDevices,
        ]);
        for request in requests {
            let line = encode(&RequestLine { version: PROTOCOL_VERSION, request: request.clone() });
            assert_eq!(decode_request(line.trim_end().as_bytes()).expect("decode"), request);
        }
        let responses = [
            Response::Changed { outcome: ChangeOutcome::Created { id: 1 }, block_bytes: 65536 },
            Response::Changed {
                outcome: ChangeOutcome::Resized { old_bytes: 2, new_bytes: 1, blocks_discarded: 0 },
                block_bytes: 65536,
            },
            Response::Listing {
                listing: Listing {
                    block_bytes: 65536,
                    devices: vec![DeviceUsage {
                        name: "web".into(),
                        id: 0,
                        size_bytes: 1 << 30,
                        creation_time: None,
                        snapshot_of: Some("x".into()),
                        mapped_blocks: 3,
                        exclusive_blocks: 1,
                        thin_creation_time: 0,
                        thin_snapshot_time: 1,
                        thin_transaction_id: 2,
                    }],
                },
            },
            Response::Status {
                status: PoolStatus {
                    mode: PoolMode::OutOfDataSpace,
                    transaction_id: 1,
                    metadata_used_blocks: 2,
                    metadata_total_blocks: 3,
                    data_used_blocks: 4,
                    data_total_blocks: 4,
                    data_block_size_bytes: 65536,
                    held_root: None,
                    needs_check: false,
                    time: 0,
                    devices: 1,
                    reason: Some("every data block is in use".into()),
                    metadata_reserve_blocks: 16,
                    health: crate::volume::HealthOptions { data_threshold: Some(80), ..Default::default() },
                    thresholds_crossed: vec!["data".into()],
                },
            },
            Response::Error { error: ControlError::new(ErrorKind::Attached, "attached") },
            Response::Attached {
                device: crate::server::local::LocalDevice {
                    name: "web".into(),
                    kind: "ublk".into(),
                    path: "/dev/ublkb0".into(),
                    dev_id: 0,
                    read_only: false,
                },
            },
            Response::LocalDevices { devices: Vec::new() },
        ];
        for response in responses {
            round_trip(ResponseLine { version: PROTOCOL_VERSION, response });
        }
    }

    #[test]
    fn the_wire_form_is_stable() {
        let line = encode(&RequestLine {
            version: 1,
            request: Request::Change { change: PoolChange::Delete { name: "web".into() } },
        });
        assert_eq!(
            line,
            "{\"version\":1,\"request\":{\"op\":\"change\",\"change\":{\"op\":\"delete\",\"name\":\"web\"}}}\n"
        );
        assert_eq!(
            encode(&RequestLine { version: 1, request: Request::Ls }),
            "{\"version\":1,\"request\":{\"op\":\"ls\"}}\n"
        );
    }

    #[test]
    fn what_is_not_a_request_gets_a_typed_error() {
        let kind = |line: &str| decode_request(line.as_bytes()).expect_err(line).kind;
        assert_eq!(kind(""), ErrorKind::BadRequest);
        assert_eq!(kind("not json"), ErrorKind::BadRequest);
        assert_eq!(kind(r#"{"argv": ["ls"]}"#), ErrorKind::BadRequest);
        assert_eq!(kind(r#"{"version": 1, "request": {"op": "format_everything"}}"#), ErrorKind::BadRequest);
        assert_eq!(
            kind(
                r#"{"version": 1, "request": {"op": "change", "change": {"op": "delete", "name": "a", "force": true}}}"#
            ),
            ErrorKind::BadRequest
        );
        assert_eq!(
            kind(r#"{"version": 1, "request": {"op": "change", "change": {"op": "delete"}}}"#),
            ErrorKind::BadRequest
        );
        assert_eq!(kind(r#"{"version": 99, "request": {"op": "ls"}}"#), ErrorKind::UnsupportedVersion);
        assert_eq!(kind(r#"{"version": 0, "request": {"op": "ls"}}"#), ErrorKind::UnsupportedVersion);
        let long = format!(r#"{{"version": 1, "request": {{"op": "ls"}}, "pad": "{}"}}"#, "x".repeat(MAX_LINE));
        assert_eq!(kind(&long), ErrorKind::BadRequest);
    }
}
