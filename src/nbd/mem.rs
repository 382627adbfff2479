//! An in-memory sparse export and catalog, for tests and fuzzing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::export::{Catalog, Export, ExportError, Extent};
use crate::units::pieces;

const BLOCK: u64 = 64 * 1024;

/// A sparse in-memory export of 64 KiB blocks; unwritten blocks are holes.
#[derive(Debug)]
pub struct MemExport {
    size: u64,
    blocks: Mutex<HashMap<u64, Vec<u8>>>,
    read_only: bool,
}

impl MemExport {
    /// An empty export of `size` bytes.
    pub fn new(size: u64, read_only: bool) -> MemExport {
        MemExport { size, blocks: Mutex::new(HashMap::new()), read_only }
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.size
    }
    fn preferred_block_size(&self) -> u32 {
        BLOCK as u32
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        let blocks = self.blocks.lock().map_err(|_| ExportError::Other("lock".into()))?;
        let mut done = 0;
        for p in pieces(offset, buf.len() as u64, BLOCK) {
            let (within, n) = (p.within as usize, p.len as usize);
            match blocks.get(&p.block) {
                Some(data) => buf[done..done + n].copy_from_slice(&data[within..within + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        let mut blocks = self.blocks.lock().map_err(|_| ExportError::Other("lock".into()))?;
        let mut done = 0;
        for p in pieces(offset, data.len() as u64, BLOCK) {
            let (within, n) = (p.within as usize, p.len as usize);
            let blk = blocks.entry(p.block).or_insert_with(|| vec![0; BLOCK as usize]);
            blk[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        let mut blocks = self.blocks.lock().map_err(|_| ExportError::Other("lock".into()))?;
        for p in pieces(offset, len, BLOCK) {
            if p.is_whole(BLOCK) {
                blocks.remove(&p.block);
            }
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, _fast: bool) -> Result<(), ExportError> {
        if may_unmap {
            self.trim(offset, len)?;
        }
        for p in pieces(offset, len, BLOCK) {
            let mapped = self.blocks.lock().map_err(|_| ExportError::Other("lock".into()))?.contains_key(&p.block);
            if mapped || !may_unmap {
                self.write(p.block * BLOCK + p.within, &vec![0u8; p.len as usize])?;
            }
        }
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        let blocks = self.blocks.lock().map_err(|_| ExportError::Other("lock".into()))?;
        let mut out: Vec<Extent> = Vec::new();
        for p in pieces(offset, len, BLOCK) {
            let hole = !blocks.contains_key(&p.block);
            match out.last_mut() {
                Some(e) if e.hole == hole => e.length += p.len,
                _ => out.push(Extent { length: p.len, hole, zero: hole }),
            }
        }
        Ok(out)
    }
}

/// A catalog of named [`MemExport`]s.
#[derive(Debug, Default)]
pub struct MemCatalog {
    exports: Vec<(String, Arc<MemExport>)>,
}

impl MemCatalog {
    /// Exports of the given names and sizes; the first is also the default export.
    pub fn new(exports: &[(&str, u64)]) -> MemCatalog {
        MemCatalog {
            exports: exports.iter().map(|(n, s)| (n.to_string(), Arc::new(MemExport::new(*s, false)))).collect(),
        }
    }
}

impl Catalog for MemCatalog {
    fn list(&self) -> Vec<(String, String)> {
        self.exports.iter().map(|(n, _)| (n.clone(), format!("memory export {n}"))).collect()
    }
    fn open(&self, name: &str) -> Option<Arc<dyn Export>> {
        let found = if name.is_empty() { self.exports.first() } else { self.exports.iter().find(|(n, _)| n == name) };
        found.map(|(_, e)| Arc::clone(e) as Arc<dyn Export>)
    }
}
