//! Dump: walk a pool's metadata into IR events ([`walk`]), and an IR visitor that
//! writes them as thin_dump 0.9's XML ([`XmlWriter`]).

use std::io::Write;

use super::ir::{Device, Map, MetadataVisitor, Superblock};
use super::XmlError;
use crate::pool::Pool;
use crate::thin::Metadata;

/// Mappings fetched per step while walking.
const WINDOW: u64 = 4096;

/// Walk the metadata `md` into `v`: the superblock, then each device in
/// ascending id order with its mappings folded into runs (consecutive virtual and
/// data blocks with the same time). `progress(done, total)` counts mappings, first
/// with `done` 0 once the total is known.
pub fn walk(
    md: &mut Metadata,
    v: &mut dyn MetadataVisitor,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), XmlError> {
    let sb = md.superblock().clone();
    let ids = md.device_ids();
    let mut total = 0u64;
    for &id in &ids {
        total += md.device_info(id)?.mapped_blocks;
    }
    progress(0, total);
    v.superblock_b(&Superblock {
        uuid: sb.uuid.to_vec(),
        time: sb.time,
        transaction: sb.trans_id,
        flags: sb.flags,
        version: sb.version,
        data_block_size: sb.data_block_size,
        nr_data_blocks: sb.data_sm_root.nr_blocks,
        metadata_snap: (sb.held_root != 0).then_some(sb.held_root),
    })?;
    let mut done = 0u64;
    for id in ids {
        let info = md.device_info(id)?;
        v.device_b(&Device {
            dev_id: id,
            mapped_blocks: Some(info.mapped_blocks),
            transaction: info.transaction_id,
            creation_time: info.creation_time,
            snap_time: info.snapshotted_time,
        })?;
        let mut run: Option<Map> = None;
        let mut vb = 0u64;
        loop {
            let batch = md.mapping_window(id, vb, u64::MAX, WINDOW)?;
            let Some(last) = batch.last().map(|m| m.vblock) else { break };
            for m in batch {
                let (b, d, t) = (m.vblock, m.data_block, m.time);
                run = match run.map(|r| (r, r.extended(b, d, t))) {
                    Some((_, Some(longer))) => Some(longer),
                    Some((r, None)) => {
                        v.map(&r)?;
                        Some(Map::single(b, d, t))
                    }
                    None => Some(Map::single(b, d, t)),
                };
                done += 1;
            }
            progress(done, total);
            match last.checked_add(1) {
                Some(n) => vb = n,
                None => break,
            }
        }
        if let Some(r) = run {
            v.map(&r)?;
        }
        v.device_e()?;
    }
    v.superblock_e()
}

/// An IR visitor that writes what Debian's `thin_dump` 0.9 prints, byte for byte:
/// no XML declaration, two spaces of indent per level, runs of one as
/// `single_mapping`, longer ones as `range_mapping`, and `uuid=""` (thin_dump 0.9
/// prints an empty uuid whatever the superblock holds; `metadata_snap` is not
/// printed either).
#[derive(Debug)]
pub struct XmlWriter<W: Write> {
    out: W,
}

impl<W: Write> XmlWriter<W> {
    /// A writer into `out`.
    pub fn new(out: W) -> XmlWriter<W> {
        XmlWriter { out }
    }

    /// The output, back.
    pub fn into_inner(self) -> W {
        self.out
    }

    fn line(&mut self, args: std::fmt::Arguments<'_>) -> Result<(), XmlError> {
        self.out.write_fmt(args).and_then(|()| self.out.write_all(b"\n")).map_err(write_failed)
    }
}

fn write_failed(e: std::io::Error) -> XmlError {
    XmlError::Io { context: "cannot write the dump".into(), source: e }
}

impl<W: Write> MetadataVisitor for XmlWriter<W> {
    fn superblock_b(&mut self, sb: &Superblock) -> Result<(), XmlError> {
        self.line(format_args!(
            "<superblock uuid=\"\" time=\"{}\" transaction=\"{}\" flags=\"{}\" version=\"{}\" data_block_size=\"{}\" nr_data_blocks=\"{}\">",
            sb.time, sb.transaction, sb.flags, sb.version, sb.data_block_size, sb.nr_data_blocks
        ))
    }

    fn superblock_e(&mut self) -> Result<(), XmlError> {
        self.line(format_args!("</superblock>"))
    }

    fn device_b(&mut self, d: &Device) -> Result<(), XmlError> {
        self.line(format_args!(
            "  <device dev_id=\"{}\" mapped_blocks=\"{}\" transaction=\"{}\" creation_time=\"{}\" snap_time=\"{}\">",
            d.dev_id,
            d.mapped_blocks.unwrap_or(0),
            d.transaction,
            d.creation_time,
            d.snap_time
        ))
    }

    fn device_e(&mut self) -> Result<(), XmlError> {
        self.line(format_args!("  </device>"))
    }

    fn map(&mut self, m: &Map) -> Result<(), XmlError> {
        if m.len == 1 {
            self.line(format_args!(
                "    <single_mapping origin_block=\"{}\" data_block=\"{}\" time=\"{}\"/>",
                m.thin_begin, m.data_begin, m.time
            ))
        } else {
            self.line(format_args!(
                "    <range_mapping origin_begin=\"{}\" data_begin=\"{}\" length=\"{}\" time=\"{}\"/>",
                m.thin_begin, m.data_begin, m.len, m.time
            ))
        }
    }
}

/// Write the metadata of `pool` to `out` as thin_dump XML; `progress` as in [`walk`].
/// `out` is flushed at the end.
pub fn dump(pool: &mut Pool, out: &mut dyn Write, progress: &mut dyn FnMut(u64, u64)) -> Result<(), XmlError> {
    let mut w = XmlWriter::new(&mut *out);
    walk(pool.metadata_mut(), &mut w, progress)?;
    out.flush().map_err(write_failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_prints_thin_dump_lines() {
        let mut w = XmlWriter::new(Vec::new());
        let sb = Superblock { uuid: b"abc".to_vec(), time: 2, version: 2, data_block_size: 128, ..Default::default() };
        w.superblock_b(&sb).expect("sb");
        w.device_b(&Device { dev_id: 3, mapped_blocks: Some(3), ..Default::default() }).expect("dev");
        w.map(&Map::single(0, 5, 1)).expect("single");
        w.map(&Map { thin_begin: 4, data_begin: 9, time: 0, len: 2 }).expect("range");
        w.device_e().expect("dev end");
        w.superblock_e().expect("sb end");
        let text = String::from_utf8(w.into_inner()).expect("utf8");
        assert_eq!(
            text,
            "<superblock uuid=\"\" time=\"2\" transaction=\"0\" flags=\"0\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"0\">\n\
             \x20 <device dev_id=\"3\" mapped_blocks=\"3\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n\
             \x20   <single_mapping origin_block=\"0\" data_block=\"5\" time=\"1\"/>\n\
             \x20   <range_mapping origin_begin=\"4\" data_begin=\"9\" length=\"2\" time=\"0\"/>\n\
             \x20 </device>\n\
             </superblock>\n"
        );
    }

    #[test]
    fn runs_extend_only_with_consecutive_blocks_of_the_same_time() {
        let r = Map::single(10, 20, 1);
        assert_eq!(r.extended(11, 21, 1), Some(Map { thin_begin: 10, data_begin: 20, time: 1, len: 2 }));
        assert_eq!(r.extended(11, 22, 1), None);
        assert_eq!(r.extended(11, 21, 2), None);
        assert_eq!(r.extended(12, 22, 1), None);
    }
}
