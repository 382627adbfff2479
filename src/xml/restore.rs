//! Restore: read thin_dump XML into IR events ([`read_xml`]), and an IR visitor that
//! builds fresh metadata from them ([`MetadataBuilder`]) on whatever storage a
//! [`RestoreSink`] provides.
//!
//! The document is untrusted: every number is range-checked before it is used,
//! nesting is enforced, a mapping that points past the data space or maps a virtual
//! block twice is an error, and nothing is allocated by a size the document states
//! before that size is checked (the sink decides whether the data space fits).

use std::collections::HashMap;
use std::io::BufRead;
use std::str::FromStr;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use super::ir::{Device, Map, MetadataVisitor, Superblock};
use super::XmlError;
use crate::format::{MAX_DATA_BLOCKS, MAX_DEV_ID};
use crate::io::MetaStorage;
use crate::pool::SECTOR;
use crate::thin::Metadata;
use crate::units::DevId;

/// The attributes of one element.
type Attrs = HashMap<String, String>;

fn attributes(e: &BytesStart<'_>) -> Result<Attrs, XmlError> {
    let mut out = HashMap::new();
    for a in e.attributes() {
        let a = a.map_err(|e| XmlError::BadAttribute(e.to_string()))?;
        let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
        let value = match a.unescape_value() {
            Ok(v) => v.into_owned(),
            Err(e) => return Err(XmlError::BadValue { name: key, reason: e.to_string() }),
        };
        out.insert(key, value);
    }
    Ok(out)
}

fn num<T: FromStr>(attrs: &Attrs, elem: &'static str, name: &'static str) -> Result<T, XmlError> {
    let v = attrs.get(name).ok_or(XmlError::MissingAttribute { elem, name })?;
    v.trim().parse().map_err(|_| XmlError::NotANumber { elem, name, value: v.clone() })
}

fn num_or<T: FromStr>(attrs: &Attrs, elem: &'static str, name: &'static str, default: T) -> Result<T, XmlError> {
    if attrs.contains_key(name) {
        num(attrs, elem, name)
    } else {
        Ok(default)
    }
}

fn superblock_of(a: &Attrs) -> Result<Superblock, XmlError> {
    let e = "superblock";
    Ok(Superblock {
        uuid: a.get("uuid").cloned().unwrap_or_default().into_bytes(),
        time: num(a, e, "time")?,
        transaction: num(a, e, "transaction")?,
        flags: num_or(a, e, "flags", 0)?,
        version: num_or(a, e, "version", 1)?,
        data_block_size: num(a, e, "data_block_size")?,
        nr_data_blocks: num(a, e, "nr_data_blocks")?,
        metadata_snap: if a.contains_key("metadata_snap") { Some(num(a, e, "metadata_snap")?) } else { None },
    })
}

fn device_of(a: &Attrs) -> Result<Device, XmlError> {
    let e = "device";
    let id: u64 = num(a, e, "dev_id")?;
    let dev_id = u32::try_from(id).ok().filter(|&i| u64::from(i) <= MAX_DEV_ID).ok_or(XmlError::DevIdRange(id))?;
    Ok(Device {
        dev_id,
        transaction: num_or(a, e, "transaction", 0)?,
        creation_time: num_or(a, e, "creation_time", 0)?,
        snap_time: num_or(a, e, "snap_time", 0)?,
        // An unreadable count is only a hint lost, not an error.
        mapped_blocks: num(a, e, "mapped_blocks").ok(),
    })
}

fn single_of(a: &Attrs) -> Result<Map, XmlError> {
    let e = "single_mapping";
    Ok(Map::single(num(a, e, "origin_block")?, num(a, e, "data_block")?, num(a, e, "time")?))
}

fn range_of(a: &Attrs) -> Result<Map, XmlError> {
    let e = "range_mapping";
    Ok(Map {
        thin_begin: num(a, e, "origin_begin")?,
        data_begin: num(a, e, "data_begin")?,
        len: num(a, e, "length")?,
        time: num(a, e, "time")?,
    })
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The parser's state: open elements and whether the superblock was seen.
struct Nesting<'v> {
    v: &'v mut dyn MetadataVisitor,
    stack: Vec<Vec<u8>>,
    seen_superblock: bool,
}

impl Nesting<'_> {
    fn open(&mut self, name: &[u8], a: &Attrs) -> Result<(), XmlError> {
        let parent = self.stack.last().map(Vec::as_slice);
        match (name, parent) {
            (b"superblock", None) if !self.seen_superblock => {
                self.seen_superblock = true;
                let sb = superblock_of(a)?;
                self.v.superblock_b(&sb)
            }
            (b"superblock", _) => Err(XmlError::SecondSuperblock),
            (b"device", Some(b"superblock")) => {
                let d = device_of(a)?;
                self.v.device_b(&d)
            }
            (b"single_mapping", Some(b"device")) => {
                let m = single_of(a)?;
                self.v.map(&m)
            }
            (b"range_mapping", Some(b"device")) => {
                let m = range_of(a)?;
                self.v.map(&m)
            }
            (b"def" | b"ref", _) => Err(XmlError::SharedBlocks(lossy(name))),
            (n, p) => Err(XmlError::UnexpectedElement { name: lossy(n), parent: p.map(lossy) }),
        }
    }

    fn close(&mut self, name: &[u8]) -> Result<(), XmlError> {
        match name {
            b"device" => self.v.device_e(),
            b"superblock" => self.v.superblock_e(),
            _ => Ok(()),
        }
    }
}

/// Read thin_dump XML (0.9, or 1.x without `def`/`ref` blocks) from `input` and send
/// its events to `v`. Errors inside the document name the byte where the element
/// starts. `progress` gets the bytes read so far, every few thousand elements.
pub fn read_xml(
    input: &mut dyn BufRead,
    v: &mut dyn MetadataVisitor,
    progress: &mut dyn FnMut(u64),
) -> Result<(), XmlError> {
    let mut reader = Reader::from_reader(input);
    reader.config_mut().trim_text(true);
    reader.config_mut().check_end_names = false;
    let mut buf = Vec::new();
    let mut n = Nesting { v, stack: Vec::new(), seen_superblock: false };
    let mut events = 0u64;
    loop {
        let pos = reader.buffer_position();
        let ev = reader.read_event_into(&mut buf).map_err(|source| XmlError::Syntax { pos, source })?;
        let at = |e: XmlError| XmlError::At { pos, source: Box::new(e) };
        match ev {
            Event::Start(e) => {
                let a = attributes(&e).map_err(at)?;
                n.open(e.name().as_ref(), &a).map_err(at)?;
                n.stack.push(e.name().as_ref().to_vec());
            }
            Event::Empty(e) => {
                let a = attributes(&e).map_err(at)?;
                n.open(e.name().as_ref(), &a).map_err(at)?;
                n.close(e.name().as_ref()).map_err(at)?;
            }
            Event::End(e) => {
                if n.stack.pop().as_deref() != Some(e.name().as_ref()) {
                    return Err(at(XmlError::UnexpectedEnd(lossy(e.name().as_ref()))));
                }
                n.close(e.name().as_ref()).map_err(at)?;
            }
            Event::Text(t) => {
                if !t.iter().all(u8::is_ascii_whitespace) {
                    return Err(at(XmlError::UnexpectedText));
                }
            }
            Event::CData(_) | Event::GeneralRef(_) => return Err(at(XmlError::UnexpectedText)),
            Event::Decl(_) | Event::Comment(_) | Event::PI(_) | Event::DocType(_) => {}
            Event::Eof => break,
        }
        buf.clear();
        events += 1;
        if events % 4096 == 0 {
            progress(reader.buffer_position());
        }
    }
    if let Some(open) = n.stack.last() {
        return Err(XmlError::EndsInside(lossy(open)));
    }
    if !n.seen_superblock {
        return Err(XmlError::NoSuperblock);
    }
    Ok(())
}

/// Where restored metadata goes: the data side, and storage for the metadata.
pub trait RestoreSink {
    /// Called once, at the `<superblock>`: make sure the data side holds
    /// `nr_data_blocks` blocks of `block_bytes` (`data_bytes` in all, already checked
    /// not to overflow), then return storage for the new metadata.
    fn open(
        &mut self,
        nr_data_blocks: u64,
        block_bytes: u64,
        data_bytes: u64,
    ) -> Result<Box<dyn MetaStorage>, XmlError>;

    /// Make the data side durable (before the metadata commit).
    fn sync_data(&mut self) -> std::io::Result<()>;
}

/// What a restore built, once committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The superblock fields of the document ([`Metadata::format`] does not set the
    /// uuid, version and flags: the sink's owner writes them if it wants them).
    pub superblock: Superblock,
    /// Devices restored.
    pub devices: usize,
    /// Mappings restored.
    pub mappings: u64,
    /// Things in the document that were not kept as they were.
    pub warnings: Vec<String>,
}

/// An IR visitor that builds new metadata through `Metadata`'s restore support.
pub struct MetadataBuilder<'s> {
    sink: &'s mut dyn RestoreSink,
    md: Option<Metadata>,
    sb: Option<Superblock>,
    /// The current device and the highest virtual block mapped in it so far.
    device: Option<(DevId, Option<u64>)>,
    devices: Vec<DevId>,
    mapped_attr: HashMap<DevId, u64>,
    mappings: u64,
    warnings: Vec<String>,
}

impl<'s> MetadataBuilder<'s> {
    /// A builder that writes into `sink`.
    pub fn new(sink: &'s mut dyn RestoreSink) -> MetadataBuilder<'s> {
        MetadataBuilder {
            sink,
            md: None,
            sb: None,
            device: None,
            devices: Vec::new(),
            mapped_attr: HashMap::new(),
            mappings: 0,
            warnings: Vec::new(),
        }
    }

    fn md(&mut self) -> Result<&mut Metadata, XmlError> {
        self.md.as_mut().ok_or_else(|| XmlError::Invalid("no <superblock> before the devices".into()))
    }

    /// Check the devices' stated mapping counts, and commit the metadata.
    pub fn finish(mut self) -> Result<Restored, XmlError> {
        let mut md = self.md.take().ok_or(XmlError::NoSuperblock)?;
        let mut ids: Vec<(&DevId, &u64)> = self.mapped_attr.iter().collect();
        ids.sort();
        for (&id, &want) in ids {
            let got = md.device_info(id)?.mapped_blocks;
            if got != want {
                self.warnings
                    .push(format!("device {id}: mapped_blocks says {want} but {got} mappings were found; using {got}"));
            }
        }
        let sink = &mut *self.sink;
        md.commit(&mut || sink.sync_data())?;
        drop(md);
        let superblock = self.sb.take().ok_or(XmlError::NoSuperblock)?;
        Ok(Restored { superblock, devices: self.devices.len(), mappings: self.mappings, warnings: self.warnings })
    }
}

fn invalid(e: impl std::fmt::Display) -> XmlError {
    XmlError::Invalid(e.to_string())
}

impl MetadataVisitor for MetadataBuilder<'_> {
    fn superblock_b(&mut self, sb: &Superblock) -> Result<(), XmlError> {
        if sb.uuid.len() > 16 {
            self.warnings.push(format!("the uuid is {} bytes long: only its first 16 are kept", sb.uuid.len()));
        }
        if sb.metadata_snap.is_some_and(|s| s != 0) {
            self.warnings.push("the held metadata snapshot (metadata_snap) is not restored".into());
        }
        if !crate::format::valid_data_block_sectors(sb.data_block_size) {
            return Err(invalid(format_args!(
                "data_block_size {} sectors: it must be a multiple of 128 from 128 to 2097152",
                sb.data_block_size
            )));
        }
        if sb.nr_data_blocks > MAX_DATA_BLOCKS {
            return Err(invalid(format_args!("nr_data_blocks {} is more than 2^40", sb.nr_data_blocks)));
        }
        let bs = u64::from(sb.data_block_size) * SECTOR;
        let data_bytes = sb
            .nr_data_blocks
            .checked_mul(bs)
            .ok_or_else(|| invalid(format_args!("nr_data_blocks {} x {bs} bytes overflows", sb.nr_data_blocks)))?;
        let storage = self.sink.open(sb.nr_data_blocks, bs, data_bytes)?;
        let mut md = Metadata::format(storage, sb.data_block_size, sb.nr_data_blocks)
            .map_err(|e| invalid(format_args!("cannot format the metadata: {e}")))?;
        md.set_time(sb.time).map_err(invalid)?;
        md.set_transaction_id(0, sb.transaction).map_err(invalid)?;
        self.md = Some(md);
        self.sb = Some(sb.clone());
        Ok(())
    }

    fn superblock_e(&mut self) -> Result<(), XmlError> {
        Ok(())
    }

    fn device_b(&mut self, d: &Device) -> Result<(), XmlError> {
        let id = d.dev_id;
        if let Some(m) = d.mapped_blocks {
            self.mapped_attr.insert(id, m);
        }
        self.md()?
            .restore_device(u64::from(id), d.transaction, d.creation_time, d.snap_time)
            .map_err(|err| invalid(format_args!("device {id}: {err}")))?;
        self.device = Some((id, None));
        self.devices.push(id);
        Ok(())
    }

    fn device_e(&mut self) -> Result<(), XmlError> {
        self.device = None;
        Ok(())
    }

    fn map(&mut self, m: &Map) -> Result<(), XmlError> {
        let &Map { thin_begin: vblock, data_begin: data_block, time, len } = m;
        let (id, mut highest) = self.device.ok_or_else(|| invalid("a mapping outside a <device>"))?;
        let nr = self.sb.as_ref().map_or(0, |s| s.nr_data_blocks);
        if len == 0 {
            return Err(invalid(format_args!("device {id}: a range_mapping of length 0")));
        }
        let (Some(_), Some(dend)) = (vblock.checked_add(len - 1), data_block.checked_add(len)) else {
            return Err(invalid(format_args!("device {id}: the mapping at virtual block {vblock} overflows")));
        };
        if dend > nr {
            return Err(invalid(format_args!(
                "device {id}: virtual block {vblock} maps to data block {}, past the end of the pool ({nr} data blocks)",
                dend - 1
            )));
        }
        let md = self.md()?;
        for i in 0..len {
            let v = vblock + i;
            if highest.is_some_and(|h| v <= h) && md.lookup(id, v).map_err(invalid)?.is_some() {
                return Err(invalid(format_args!("device {id} maps virtual block {v} twice")));
            }
            md.restore_mapping(id, v, data_block + i, time).map_err(|e| invalid(format_args!("device {id}: {e}")))?;
            highest = Some(highest.map_or(v, |h| h.max(v)));
        }
        self.mappings += len;
        self.device = Some((id, highest));
        Ok(())
    }
}

/// Read the document from `input` and build its metadata into `sink`, committed.
/// `progress` as in [`read_xml`].
pub fn restore(
    input: &mut dyn BufRead,
    sink: &mut dyn RestoreSink,
    progress: &mut dyn FnMut(u64),
) -> Result<Restored, XmlError> {
    let mut b = MetadataBuilder::new(sink);
    read_xml(input, &mut b, progress)?;
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the events as text.
    #[derive(Default)]
    struct Events(Vec<String>);

    impl MetadataVisitor for Events {
        fn superblock_b(&mut self, sb: &Superblock) -> Result<(), XmlError> {
            self.0.push(format!("sb {} {} {:?}", sb.nr_data_blocks, sb.version, sb.metadata_snap));
            Ok(())
        }
        fn superblock_e(&mut self) -> Result<(), XmlError> {
            self.0.push("/sb".into());
            Ok(())
        }
        fn device_b(&mut self, d: &Device) -> Result<(), XmlError> {
            self.0.push(format!("dev {} {:?}", d.dev_id, d.mapped_blocks));
            Ok(())
        }
        fn device_e(&mut self) -> Result<(), XmlError> {
            self.0.push("/dev".into());
            Ok(())
        }
        fn map(&mut self, m: &Map) -> Result<(), XmlError> {
            self.0.push(format!("map {} {} {} {}", m.thin_begin, m.data_begin, m.len, m.time));
            Ok(())
        }
    }

    fn events(doc: &str) -> Result<Vec<String>, XmlError> {
        let mut ev = Events::default();
        read_xml(&mut doc.as_bytes(), &mut ev, &mut |_| {})?;
        Ok(ev.0)
    }

    #[test]
    fn the_reader_sends_events_in_document_order() {
        let doc = r#"<?xml version="1.0"?>
<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="10">
  <device dev_id="3" mapped_blocks="x">
    <single_mapping origin_block="0" data_block="1" time="0"/>
    <range_mapping origin_begin="4" data_begin="5" length="2" time="1"/>
  </device>
  <device dev_id="4"/>
</superblock>"#;
        assert_eq!(
            events(doc).expect("parses"),
            ["sb 10 1 None", "dev 3 None", "map 0 1 1 0", "map 4 5 2 1", "/dev", "dev 4 None", "/dev", "/sb"]
        );
    }

    #[test]
    fn the_reader_names_what_is_wrong_and_where() {
        let sb = r#"<superblock time="1" transaction="3" data_block_size="128" nr_data_blocks="100">"#;
        let cases = [
            (String::new(), "the XML has no <superblock>"),
            (format!("{sb}<device/></superblock>"), "XML at byte 80: <device> lacks the dev_id attribute"),
            (format!("{sb}<device dev_id=\"16777216\"/>"), "<device dev_id=\"16777216\">: ids go up to 16777215"),
            (format!("{sb}<ref name=\"1\"/>"), "<ref> (shared mapping blocks of thin_dump 1.x) is not supported"),
            ("<x/>".to_string(), "XML at byte 0: unexpected <x> at the top level"),
            (format!("{sb}<device dev_id=\"1\"><x/>"), "unexpected <x> inside <device>"),
            (format!("{sb}<device dev_id=\"1\">"), "the XML ends inside <device>"),
        ];
        for (doc, want) in cases {
            let err = events(&doc).expect_err(&doc).to_string();
            assert!(err.contains(want), "{doc}: {err}");
        }
    }
}
