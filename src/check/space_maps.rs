//! The checker's space-map pass: each map's on-disk counts, read by the one reader
//! of on-disk counts ([`crate::space_map::disk::read_counts`]) straight from
//! storage, compared with the references the tree pass counted.

use super::{Checker, ProblemKind};
use crate::error::MetaError;
use crate::format::checksum::BlockKind;
use crate::format::Block;
use crate::space_map::disk::{self, CountVisitor, Fault, Overflow};

/// Compares one space map's counts with what was expected, recording problems.
struct Compare<'c, 'a, 'e> {
    c: &'c mut Checker<'a>,
    sm: &'static str,
    expected: &'e dyn Fn(&Checker<'a>, u64) -> u32,
    in_use: u64,
}

impl CountVisitor for Compare<'_, '_, '_> {
    fn bitmap(&mut self, _index: usize, loc: u64) -> Result<Option<Box<Block>>, MetaError> {
        Ok(self.c.read(loc, BlockKind::Bitmap))
    }

    fn count(&mut self, b: u64, on_disk: u32, loc: u64) -> Result<(), MetaError> {
        self.in_use += u64::from(on_disk != 0);
        let want = (self.expected)(self.c, b);
        if want != on_disk {
            if self.sm == "metadata" {
                self.c.problem(Some(b), ProblemKind::MetadataCount { expected: want, on_disk });
            } else {
                self.c.problem(Some(loc), ProblemKind::DataCount { data_block: b, expected: want, on_disk });
            }
        }
        Ok(())
    }

    fn fault(&mut self, fault: Fault) -> Result<(), MetaError> {
        let sm = self.sm;
        let (block, kind) = match fault {
            Fault::Tail { loc, block } => (Some(loc), ProblemKind::BitmapTail { sm, first: block }),
            Fault::Below3 { loc, block, count } => (
                Some(loc),
                ProblemKind::Overflow { sm, block, detail: format!("ref-count tree holds {count}, below 3") },
            ),
            Fault::Missing { loc, block } => (
                Some(loc),
                ProblemKind::Overflow {
                    sm,
                    block,
                    detail: "bitmap says 3 or more but the ref-count tree has no entry".into(),
                },
            ),
            Fault::Orphan { block, count } => (
                None,
                ProblemKind::Overflow {
                    sm,
                    block,
                    detail: format!("ref-count tree holds {count} but the bitmap entry is not 3"),
                },
            ),
        };
        self.c.problem(block, kind);
        Ok(())
    }
}

impl<'a> Checker<'a> {
    /// Read one space map's on-disk counts and compare them with `expected(b)`, and
    /// its `nr_allocated` with the blocks in use; returns the blocks in use.
    pub(super) fn compare_space_map(
        &mut self,
        sm: &'static str,
        (nr_blocks, nr_allocated): (u64, u64),
        bitmaps: &[u64],
        overflow: &Overflow,
        expected: &dyn Fn(&Checker<'a>, u64) -> u32,
    ) -> u64 {
        let mut cmp = Compare { c: self, sm, expected, in_use: 0 };
        // The visitor reports every fault and never fails the read.
        let _ = disk::read_counts(nr_blocks, bitmaps, overflow, &mut cmp);
        let in_use = cmp.in_use;
        if in_use != nr_allocated {
            self.problem(None, ProblemKind::NrAllocated { sm, recorded: nr_allocated, counted: in_use });
        }
        in_use
    }
}
